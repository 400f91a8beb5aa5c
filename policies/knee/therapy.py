"""The knee-exo therapy's policies part: its controllers."""

from __future__ import annotations

from typing import Any

from twinloop.policies.knee.controllers import EXO_CONTROLLERS, check_controller_name


class KneePolicies:
    """No assistance, impedance, assist-as-needed and saved RL policies."""

    controllers = tuple(EXO_CONTROLLERS)
    default_controller = "aan"

    @property
    def training_family(self) -> Any:
        """Its RL task family (:class:`~.training.KneeExoTask`; needs the ``rl`` extra)."""
        from twinloop.policies.knee.training import KneeExoTask

        return KneeExoTask

    def check_controller(self, name: object) -> str | None:
        """``None`` for an exoskeleton controller, else what is allowed."""
        return check_controller_name(name)


PART = KneePolicies()
