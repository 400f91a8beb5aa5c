"""The toy policies part: one proportional controller with feed-forward, and one that hangs
(``hang``, for the tests of the campaign's run timeout)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ProportionalController:
    """``valve = setpoint + gain × (setpoint − level)`` (all in %).

    Attributes:
        setpoint_pct: the level to hold, %.
        gain: the proportional gain, % valve per % level error.

    """

    setpoint_pct: float = 50.0
    gain: float = 4.0

    def decide(self, level_pct: float) -> float:
        """The valve command, %, for a sensed level, %."""
        return self.setpoint_pct + self.gain * (self.setpoint_pct - level_pct)


class HangingController(ProportionalController):
    """A controller that never answers: a pure-Python endless loop (nothing in its thread can
    interrupt it), for the campaign's run timeout."""

    def decide(self, level_pct: float) -> float:
        """Never returns."""
        while True:
            level_pct += 0.0


CONTROLLERS = {"p": ProportionalController, "hang": HangingController}


class ToyPolicies:
    """The toy policies part."""

    controllers = tuple(CONTROLLERS)
    default_controller = "p"

    def check_controller(self, name: object) -> str | None:
        """``None`` for ``p``, else what is allowed."""
        return None if name in CONTROLLERS else f"one of {', '.join(CONTROLLERS)}"


PART = ToyPolicies()
