"""What the loop and every controller agree on: the controller's input, its output, the protocol.

A controller is a plain object with ``decide(obs: ControllerInput) -> Dose``, called once per
control period; a controller that plans on the twin estimator's model declares
``needs_twin = True`` and then finds the twin's :class:`TwinPlanState` in ``obs.twin``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Protocol

from twinloop.plant.glucose.patients import N_STATES
from twinloop.plant.glucose.uva_padova import N_MEAL_STATE
from twinloop.policies.errors import PolicyConfigError


@dataclasses.dataclass(frozen=True)
class TwinPlanState:
    """The twin's view of the patient at a tick, for planning (what an MPC needs).

    Attributes:
        t_min: the tick, minutes.
        x: the 13 model states (:class:`twinloop.plant.glucose.patients.PatientParameters` order),
            the twin's mean at ``t_min``.
        meal_state: the eating process (``twinloop.plant.glucose.uva_padova`` ``M_*`` columns).
        sensitivity_scale: the twin's insulin-sensitivity scale (multiplies ``Vmx`` and ``kp3``).
        pending_meals: announced meals that start at or after ``t_min``: ``(minutes after
            t_min, grams)``.
        egp_scale: the twin's scale of endogenous glucose production (multiplies ``kp1``).
        unannounced_carbs_g: of the carbohydrates in the stomach and gut (``x[0:3]``), the
            grams the twin detected beyond those announced (uncertain: a planner should not
            count on them to prevent a low).

    """

    t_min: float
    x: tuple[float, ...]
    meal_state: tuple[float, ...]
    sensitivity_scale: float
    pending_meals: tuple[tuple[int, float], ...] = ()
    egp_scale: float = 1.0
    unannounced_carbs_g: float = 0.0

    def __post_init__(self) -> None:
        if len(self.x) != N_STATES or len(self.meal_state) != N_MEAL_STATE:
            raise PolicyConfigError(
                f"TwinPlanState: x has {len(self.x)} states and meal_state "
                f"{len(self.meal_state)}; expected {N_STATES} and {N_MEAL_STATE}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class ControllerInput:
    """What a controller sees at a tick.

    Attributes:
        t_min: loop time, minutes.
        glucose_mg_dl: newest glucose (CGM, or the twin's estimate), ``nan`` if none yet.
        glucose_age_min: minutes since that glucose was measured.
        net_iob_u: insulin on board above the scheduled basal, U.
        meal_carbs_g: carbohydrates announced since the previous tick, g.
        net_activity_u_per_min: insulin absorbed in the last minute above the scheduled basal's
            (:attr:`twinloop.plant.glucose.insulin.IobTracker.net_activity_u_per_min`), U/min.
        twin: the twin estimator's state for planning, given only to controllers that declare
            ``needs_twin = True`` (such as :class:`twinloop.policies.glucose.mpc.MPCController`) in
            a loop with a twin; ``None`` otherwise.

    """

    t_min: float
    glucose_mg_dl: float
    glucose_age_min: float
    net_iob_u: float
    meal_carbs_g: float
    net_activity_u_per_min: float = 0.0
    twin: TwinPlanState | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Dose:
    """A controller's output: temp basal (U/h) for ``duration_min`` and a bolus (U)."""

    basal_u_per_h: float
    bolus_u: float
    duration_min: float = 30.0


def not_a_dose(value: object) -> str | None:
    """Why ``value`` is not a valid :class:`Dose`, or None if it is one.

    A dose has finite basal (U/h) and bolus (U) >= 0 and a finite duration > 0 minutes; the
    loop treats anything else a controller returns (None, NaN, a number, a wrong type) as a
    fault of the controller, like an exception.
    """
    if not isinstance(value, Dose):
        return f"{type(value).__name__} {value!r:.60}, not a Dose"
    for name in ("basal_u_per_h", "bolus_u", "duration_min"):
        x = getattr(value, name)
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            return f"a Dose with {name}={x!r:.40}, not a finite number"
        if x < 0 or (name == "duration_min" and x == 0):
            return f"a Dose with {name}={x!r}, out of range"
    return None


class Controller(Protocol):
    """What the loop calls: one decision per control period."""

    def decide(self, obs: ControllerInput) -> Dose:
        """Return the dose for the coming period."""
        ...
