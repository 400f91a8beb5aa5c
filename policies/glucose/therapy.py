"""The glucose therapy's policies part: its controllers."""

from __future__ import annotations

from typing import Any

from twinloop.policies.glucose.controllers import CONTROLLERS, check_controller_name


class GlucosePolicies:
    """Basal-bolus, PID, oref0, MPC and saved RL policies."""

    controllers = tuple(CONTROLLERS)
    default_controller = "basal-bolus"

    @property
    def training_family(self) -> Any:
        """Its RL task family (:class:`~.training.GlucoseTask`; needs the ``rl`` extra)."""
        from twinloop.policies.glucose.training import GlucoseTask

        return GlucoseTask

    def check_controller(self, name: object) -> str | None:
        """``None`` for a glucose controller, else what is allowed."""
        if not isinstance(name, str):
            return check_controller_name("")
        return check_controller_name(name)


PART = GlucosePolicies()
