"""A toy third therapy, defined only in the tests: it proves that a therapy is one folder per
layer and that shared code (``twinloop run``, ``report``, ``campaign``) needs no edit for it.

The toy is a tank whose level (``level_pct``, % full) follows a valve (``valve_pct``, % open)
as a first-order process ``d level / dt = (valve - level) / tau_s`` with process noise from a
seeded generator; a proportional controller with feed-forward holds it at a set point; a
supervisor keeps the valve within 0..100 % and closes it when no command comes. Time in s.

Register it with ``twinloop.therapy.register_therapy(THERAPY)`` (the test fixture does).
"""

from __future__ import annotations

from twinloop.therapy import Therapy

#: The toy therapy: its parts live in this package (not in twinloop's layer folders).
THERAPY = Therapy(
    name="toy",
    title="a toy tank: a first-order level loop (tests only)",
    package="toy",
    parts={
        "plant": "tests.toy_therapy.plant",
        "policies": "tests.toy_therapy.policies",
        "agents": "tests.toy_therapy.agents",
        "campaigns": "tests.toy_therapy.campaigns",
    },
)
