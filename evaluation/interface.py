"""What a therapy's evaluation part declares (``twinloop.evaluation.<package>.therapy.PART``).

An evaluation runs a set of controllers on a declared *protocol* (patients or cohorts × days
× seeds × the therapy's scenario) and ranks them; ``twinloop evaluate --therapy NAME`` asks
the therapy's part for each step below.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class EvaluationPart(Protocol):
    """The evaluation of a therapy's controllers."""

    #: The protocol used when none is named (a shipped protocol's name).
    default_protocol: str

    def shipped_protocols(self) -> tuple[str, ...]:
        """The names of the protocols shipped with the therapy."""
        ...

    def load_protocol(self, protocol: str | Path | None) -> Any:
        """A protocol by shipped name or YAML path (``None``: the default), validated."""
        ...

    def check_controllers(self, controllers: Sequence[str]) -> None:
        """Refuse an empty list, a repeated or an unknown controller (one line each)."""
        ...

    def evaluate(
        self, controllers: Sequence[str], protocol: Any, out: str | Path, **kw: Any
    ) -> Any:
        """Run every controller on the protocol; write the outputs into ``out``.

        The result has ``results``, ``failed``, ``table``, ``out_dir``, ``wall_time_s`` and
        ``hazards``: the patient-runs flagged as out of physiology (each a mapping with
        ``controller``, ``cohort``, ``seed``, ``patient``, ``minutes_non_physiological``), what
        ``--fail-on-hazard`` exits 1 on.
        """
        ...
