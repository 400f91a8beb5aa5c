"""The safety supervisor: hard limits on every insulin command, whatever produced it.

The supervisor sits on the controller → actuator channel and no controller can bypass it. At
each control tick it reviews the controller's command (or its absence) and sends the pump a
command that respects every limit below; each change it makes is an :class:`Override` with its
reason, so a recording shows when and why the controller was overruled.

Limits (first version, after the OpenAPS reference design's safety rules):

1. *Invalid commands* (NaN, ±inf, negative) are replaced by the scheduled basal, no bolus.
2. *Maximum temp basal* = min(``max_basal_u_per_h``, 3 × highest scheduled basal,
   4 × current scheduled basal).
3. *Maximum bolus* = ``max_bolus_u``, and no bolus beyond the insulin-on-board limit.
4. *Maximum insulin on board*: net IOB (IOB of the insulin delivered, minus that of the
   scheduled basal in steady state; exponential curve of :mod:`twinloop.plant.glucose.insulin`) plus
   the bolus plus the temp basal's extra insulin over its duration stays ≤ ``max_iob_u``.
5. *Low-glucose suspend*: delivery is suspended (0 U/h, no bolus) while the last CGM reading or
   the twin's 30-min forecast is below ``suspend_below_mg_dl`` (70 by default).
6. *Stale CGM watchdog*: no reading for ``stale_after_min`` (15) ⇒ the scheduled basal or a
   suspension (``stale_action``), no bolus.
7. *Temp duration* ≤ 30 min (``max_temp_duration_min``), as on real pumps.
8. *Missing command* (controller crashed, overran, returned something that is not a dose, or
   its actor is restarting): the safe command — the scheduled basal (or suspension when
   glucose is low or stale).

What accumulates is bounded too, whatever the controller (learned ones included):

9. *Rolling totals*: the insulin delivered over the last 60 min and the last 24 h, plus the
   bolus and the temp basal over its duration, stay ≤ ``max_insulin_1h_u`` and
   ``max_insulin_24h_u`` (the bolus is cut first, then the basal, down to a suspension).
10. *Predictive bolus guard*: insulin above the scheduled basal (a bolus, or a temp basal's
    extra over its duration) is allowed only while the glucose it leads to stays ≥
    ``guard_floor_mg_dl`` over the next ``guard_horizon_min`` minutes. With the twin's view of
    the patient (:class:`~twinloop.policies.glucose.interface.TwinPlanState`) the guard
    simulates the twin's model from it (:class:`~twinloop.policies.glucose.forecast.
    TwinScenarios`), the scheduled basal going on after the command, in the twin's scenario
    and a pessimistic one (announced carbohydrates ``guard_carb_uncertainty`` lower, detected
    unannounced carbohydrates absent, insulin ``guard_sensitivity`` × as effective, and glucose
    starting no higher than the last fresh CGM reading); both must
    stay above the floor, and the extra insulin is scaled down to the largest fraction that
    keeps them there (none if even the scheduled basal does not). The twin's glucose is first
    capped at the last fresh CGM reading × (1 + ``guard_cgm_tolerance``): a twin that runs
    away upward (the CGM at its 400 mg/dL ceiling) must not buy insulin. Without a fresh twin
    state (no twin, the twin failed, a HIL rig) the guard is the linear one of the OpenAPS
    design: ``CGM − ISF · (net IOB + extra) + ISF/CR · COB ≥ floor``, with ``ISF`` =
    ``guard_correction_mg_dl_per_u`` and the announced carbohydrates absorbed linearly over
    ``guard_absorption_min`` minutes (only the ``1 − guard_carb_uncertainty`` part counted).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.messages import (
    CgmReading,
    InsulinCommand,
    InsulinDelivery,
    MealAnnouncement,
    Override,
    TwinEstimate,
)
from twinloop.plant.glucose.insulin import DEFAULT_DIA_MIN, DEFAULT_PEAK_MIN, IobTracker
from twinloop.plant.glucose.models import correction_drop_mg_dl
from twinloop.plant.glucose.patients import PatientParameters
from twinloop.plant.units import MIN_PER_DAY, MIN_PER_H
from twinloop.policies.glucose.forecast import GP_STATE, GT_STATE, TwinScenarios
from twinloop.policies.glucose.interface import TwinPlanState

StaleAction = Literal["scheduled_basal", "suspend"]


@dataclasses.dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """Limits of the supervisor (validated once).

    Attributes:
        scheduled_basal_u_per_h: the patient's programmed basal rate.
        max_basal_u_per_h: absolute cap on any temp basal.
        max_bolus_u: cap on one bolus.
        max_iob_u: cap on net insulin on board (see the module docstring).
        suspend_below_mg_dl: suspend while CGM or its 30-min forecast is below this.
        stale_after_min: a CGM reading older than this is stale.
        stale_action: what to deliver on stale CGM: ``"scheduled_basal"`` or ``"suspend"``.
        max_temp_duration_min: longest temp basal (pumps: 30 min).
        iob_peak_min: peak of the insulin activity curve used for IOB.
        iob_dia_min: duration of insulin action of that curve.
        max_insulin_1h_u: cap on the insulin of any 60 min (delivered + commanded).
        max_insulin_24h_u: cap on the insulin of any 24 h (delivered + commanded).
        guard_floor_mg_dl: the predictive guard keeps every forecast at or above this.
        guard_cgm_tolerance: the guard starts from the twin's glucose, but at most the last
            CGM reading × (1 + this).
        guard_horizon_min: how far the guard looks ahead (whole minutes, 60..720).
        guard_carb_uncertainty: fraction of the announced carbohydrates the guard's
            pessimistic scenario leaves out, 0 <= value < 1.
        guard_sensitivity: insulin sensitivity of that scenario relative to the twin's (>= 1).
        guard_correction_mg_dl_per_u: the linear guard's insulin sensitivity factor.
        guard_carb_ratio_g_per_u: the linear guard's carb ratio (credit of announced carbs).
        guard_absorption_min: the linear guard's carbohydrate absorption time.

    """

    scheduled_basal_u_per_h: float
    max_basal_u_per_h: float = 5.0
    max_bolus_u: float = 15.0
    max_iob_u: float = 10.0
    suspend_below_mg_dl: float = 70.0
    stale_after_min: float = 15.0
    stale_action: StaleAction = "scheduled_basal"
    max_temp_duration_min: float = 30.0
    iob_peak_min: float = DEFAULT_PEAK_MIN
    iob_dia_min: float = DEFAULT_DIA_MIN
    max_insulin_1h_u: float = 25.0
    max_insulin_24h_u: float = 150.0
    guard_floor_mg_dl: float = 80.0
    guard_cgm_tolerance: float = 0.2
    guard_horizon_min: int = 360
    guard_carb_uncertainty: float = 0.3
    guard_sensitivity: float = 1.5
    guard_correction_mg_dl_per_u: float = 50.0
    guard_carb_ratio_g_per_u: float = 10.0
    guard_absorption_min: float = 180.0

    def __post_init__(self) -> None:
        for name in (
            "scheduled_basal_u_per_h",
            "max_basal_u_per_h",
            "max_bolus_u",
            "max_iob_u",
            "suspend_below_mg_dl",
            "stale_after_min",
            "max_temp_duration_min",
            "max_insulin_1h_u",
            "max_insulin_24h_u",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise LoopConfigError(name, value, "a finite number >= 0")
        ranges = {
            "guard_floor_mg_dl": (40.0, 200.0),
            "guard_sensitivity": (1.0, 5.0),
            "guard_correction_mg_dl_per_u": (1.0, 1000.0),
            "guard_carb_ratio_g_per_u": (1.0, 200.0),
            "guard_absorption_min": (30.0, 720.0),
            "guard_cgm_tolerance": (0.0, 1.0),
        }
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if not (isinstance(value, int | float) and lo <= value <= hi):
                raise LoopConfigError(name, value, f"a number in [{lo:g}, {hi:g}]")
        cu = self.guard_carb_uncertainty
        if not (isinstance(cu, int | float) and 0.0 <= cu < 1.0):
            raise LoopConfigError("guard_carb_uncertainty", cu, "0 <= value < 1")
        h = self.guard_horizon_min
        if isinstance(h, bool) or not isinstance(h, int) or not 60 <= h <= 720:
            raise LoopConfigError("guard_horizon_min", h, "whole minutes 60..720")
        if not 0 < self.max_temp_duration_min <= 30:
            raise LoopConfigError(
                "max_temp_duration_min", self.max_temp_duration_min, "0 < minutes <= 30"
            )
        if self.stale_action not in ("scheduled_basal", "suspend"):
            raise LoopConfigError(
                "stale_action", self.stale_action, "'scheduled_basal' or 'suspend'"
            )

    @classmethod
    def for_patient(cls, patient: PatientParameters, **overrides: object) -> SupervisorConfig:
        """Limits derived from the patient's clinical profile.

        Scheduled basal = the patient's steady-state basal; maximum temp basal = 4 × basal
        (the 3×/4× rules then bind); maximum bolus = the bolus of a 100 g meal
        (100 / CR); maximum net IOB = 3 × basal (U/h) + the bolus of an 80 g meal, the
        OpenAPS rule of thumb for ``max_iob``. Rolling totals: 60 min ≤ the maximum bolus +
        an hour of the maximum temp basal; 24 h ≤ 2 × the patient's total daily insulin (a
        pump's maximum daily total). The linear guard's ISF is the larger of the patient's
        correction factor and their model's 1-U drop
        (:func:`~twinloop.plant.glucose.models.correction_drop_mg_dl`), its carb ratio theirs.
        """
        basal = patient.basal_u_per_h
        cr = patient.carb_ratio_g_per_u
        drop = float(correction_drop_mg_dl([patient])[0])
        defaults = {
            "scheduled_basal_u_per_h": basal,
            "max_basal_u_per_h": 4.0 * basal,
            "max_bolus_u": 100.0 / cr,
            "max_iob_u": 3.0 * basal + 80.0 / cr,
            "max_insulin_1h_u": 100.0 / cr + 3.0 * basal,
            "max_insulin_24h_u": 2.0 * patient.total_daily_insulin_u,
            "guard_correction_mg_dl_per_u": max(patient.correction_factor_mg_dl_per_u, drop),
            "guard_carb_ratio_g_per_u": cr,
        }
        return cls(**{**defaults, **overrides})  # type: ignore[arg-type]

    @property
    def max_temp_basal_u_per_h(self) -> float:
        """min(configured max, 3 × highest scheduled basal, 4 × current scheduled basal)."""
        basal = self.scheduled_basal_u_per_h
        return min(self.max_basal_u_per_h, 3.0 * basal, 4.0 * basal)


class _Override(Protocol):
    def __call__(self, reason: str, basal: float, bolus: float) -> None: ...


def _largest_fraction(margin: Callable[[float], float], guess: float | None = None) -> float:
    """Largest fraction in [0, 1] whose ``margin`` is >= 0, ``margin`` falling with it.

    Without a ``guess`` the whole (1) is tried first, then 0. With one (the fraction that the
    previous tick allowed, in insulin units) that holds while 2 % more does not, the search
    ends there after two forecasts; otherwise the guess narrows the bracket. A guess of 0
    tries 0 first (one forecast when nothing can be allowed). In between, the
    root is narrowed by regula falsi (Illinois variant) to within 2 %. The fraction returned
    is always one whose margin was computed and held (or 0).
    """
    step = 0.02
    if guess == 0.0:  # nothing was allowed a tick ago: most often nothing is now
        zero = margin(0.0)
        if zero < 0.0:
            return 0.0
        full = margin(1.0)
        if full >= 0.0:
            return 1.0
        return _regula_falsi(margin, 0.0, zero, 1.0, full, step)
    if guess is not None and 0.0 < guess < 1.0 - step:
        g = margin(guess)
        if g >= 0.0:
            up = margin(guess + step)
            if up < 0.0:
                return guess
            full = margin(1.0)
            if full >= 0.0:
                return 1.0
            return _regula_falsi(margin, guess + step, up, 1.0, full, step)
        zero = margin(0.0)
        if zero < 0.0:
            return 0.0
        return _regula_falsi(margin, 0.0, zero, guess, g, step)
    full = margin(1.0)
    if full >= 0.0:
        return 1.0
    zero = margin(0.0)
    if zero < 0.0:
        return 0.0
    return _regula_falsi(margin, 0.0, zero, 1.0, full, step)


def _regula_falsi(
    margin: Callable[[float], float], lo: float, g_lo: float, hi: float, g_hi: float, tol: float
) -> float:
    """Narrow ``[lo, hi]`` (``margin(lo) >= 0 > margin(hi)``) to ``tol``; return its ``lo``."""
    side = 0
    for _ in range(6):
        if hi - lo <= tol:
            break
        f = min(max(lo + (hi - lo) * g_lo / (g_lo - g_hi), lo + 0.01), hi - 0.01)
        g = margin(f)
        if g >= 0.0:
            lo, g_lo = f, g
            g_hi = g_hi / 2.0 if side == 1 else g_hi  # Illinois: the stuck end halves
            side = 1
        else:
            hi, g_hi = f, g
            g_lo = g_lo / 2.0 if side == -1 else g_lo
            side = -1
    return lo


def _finite_nonnegative(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0.0


class SafetySupervisor:
    """Reviews every command against :class:`SupervisorConfig` (see the module docstring).

    Inputs: CGM readings, twin estimates and plan states, announced meals and the insulin
    actually delivered (``observe_*``), the controller's command at each tick (``review``).
    Output: the command for the pump and the overrides. Rate: the control period.

    Args:
        config: the limits.
        model: the model the twin runs (its plan states are of this model); without it the
            predictive guard is always the linear one.

    """

    def __init__(self, config: SupervisorConfig, model: PatientParameters | None = None) -> None:
        self.config = config
        self._last_cgm: CgmReading | None = None
        self._last_estimate: TwinEstimate | None = None
        self._last_plan: TwinPlanState | None = None
        self._iob = IobTracker(
            config.scheduled_basal_u_per_h, peak_min=config.iob_peak_min, dia_min=config.iob_dia_min
        )
        self._scenarios = None if model is None else TwinScenarios(model, config.guard_horizon_min)
        #: delivered insulin of the last 24 h, one slot per whole minute: units and minute
        self._delivered_u = np.zeros(MIN_PER_DAY)
        self._delivered_t = np.full(MIN_PER_DAY, -np.inf)
        self._meals: collections.deque[tuple[float, float]] = collections.deque()
        #: the twin guard's last cut: (minute, extra insulin it allowed, U), its next guess
        self._guard_allowed: tuple[float, float] | None = None

    def swap_model(self, model: PatientParameters) -> None:
        """The twin runs ``model`` from now on: the guard simulates it too."""
        if self._scenarios is None:
            self._scenarios = TwinScenarios(model, self.config.guard_horizon_min)
        else:
            self._scenarios.swap_model(model)
        self._last_plan = None  # a plan state of the old model is no longer valid

    def observe_cgm(self, reading: CgmReading) -> None:
        """Remember the newest CGM reading (for suspension and the watchdog)."""
        self._last_cgm = reading

    def observe_estimate(self, estimate: TwinEstimate) -> None:
        """Remember the twin's newest estimate (its 30-min forecast drives suspension)."""
        self._last_estimate = estimate

    def observe_plan_state(self, state: TwinPlanState) -> None:
        """Remember the twin's newest plan state (the predictive guard simulates from it)."""
        self._last_plan = state

    def observe_meal(self, meal: MealAnnouncement) -> None:
        """Remember an announced meal (the linear guard credits its carbohydrates)."""
        grams = meal.carbs_g
        if isinstance(grams, int | float) and math.isfinite(grams) and grams > 0:
            self._meals.append((meal.t_min, float(grams)))
        self._forget_absorbed(meal.t_min)

    def _forget_absorbed(self, t_min: float) -> None:
        """Drop the meals absorbed by ``t_min``: no rule looks at them any more."""
        meals, absorbed = self._meals, t_min - self.config.guard_absorption_min
        while meals and meals[0][0] <= absorbed:
            meals.popleft()

    def observe_delivery(self, delivery: InsulinDelivery) -> None:
        """Account one minute of delivered insulin (insulin on board, rolling totals)."""
        units = delivery.total_u
        self._iob.record(units)
        t = delivery.t_min
        if not (math.isfinite(units) and math.isfinite(t)):
            return
        slot = math.floor(t) % MIN_PER_DAY
        if self._delivered_t[slot] == math.floor(t):
            self._delivered_u[slot] += max(units, 0.0)  # a second report of that minute
        else:
            self._delivered_u[slot] = max(units, 0.0)
            self._delivered_t[slot] = math.floor(t)

    def _rolling_sums(self, t_min: float) -> tuple[float, float]:
        """Delivered insulin of the 60 and the 1440 whole minutes before ``t_min``, U."""
        t, u = self._delivered_t, self._delivered_u
        total_24h = float(u[t > t_min - MIN_PER_DAY - 0.5].sum())
        total_1h = float(u[t > t_min - MIN_PER_H - 0.5].sum())
        return total_1h, total_24h

    def tick(
        self,
        t_min: float,
        command: InsulinCommand | None,
        readings: list[CgmReading],
        deliveries: list[InsulinDelivery],
        estimate: TwinEstimate | None = None,
        plan_state: TwinPlanState | None = None,
        meals: list[MealAnnouncement] | None = None,
    ) -> tuple[InsulinCommand, list[Override]]:
        """Observe what happened since the last tick, then review ``command`` (one call/tick)."""
        for reading in readings:
            self.observe_cgm(reading)
        for delivery in deliveries:
            self.observe_delivery(delivery)
        for meal in meals or ():
            self.observe_meal(meal)
        if estimate is not None:
            self.observe_estimate(estimate)
        if plan_state is not None:
            self.observe_plan_state(plan_state)
        return self.review(t_min, command)

    @property
    def net_iob_u(self) -> float:
        """Insulin on board above the scheduled basal's steady state, U (may be negative)."""
        return self._iob.net_iob_u

    def review(
        self, t_min: float, command: InsulinCommand | None
    ) -> tuple[InsulinCommand, list[Override]]:
        """Return the command that goes to the pump, and the overrides that produced it."""
        cfg = self.config
        basal_sched = cfg.scheduled_basal_u_per_h
        overrides: list[Override] = []
        req_basal = command.basal_u_per_h if command is not None else math.nan
        req_bolus = command.bolus_u if command is not None else math.nan

        def override(reason: str, basal: float, bolus: float) -> None:
            overrides.append(Override(t_min, reason, req_basal, req_bolus, basal, bolus))

        duration = cfg.max_temp_duration_min
        if command is None:
            basal, bolus = basal_sched, 0.0
            override("no command: scheduled basal", basal, bolus)
        elif not (_finite_nonnegative(req_basal) and _finite_nonnegative(req_bolus)):
            basal, bolus = basal_sched, 0.0
            override("invalid command: scheduled basal", basal, bolus)
        else:
            basal, bolus = float(req_basal), float(req_bolus)
            d = command.duration_min
            duration = min(d, duration) if _finite_nonnegative(d) and d > 0 else duration

        if basal > cfg.max_temp_basal_u_per_h:
            basal = cfg.max_temp_basal_u_per_h
            override("max temp basal", basal, bolus)
        if bolus > cfg.max_bolus_u:
            bolus = cfg.max_bolus_u
            override("max bolus", basal, bolus)
        headroom = cfg.max_iob_u - self.net_iob_u
        extra_basal_u = max(basal - basal_sched, 0.0) * duration / MIN_PER_H
        if bolus + extra_basal_u > headroom and (bolus > 0.0 or extra_basal_u > 0.0):
            bolus = min(bolus, max(headroom, 0.0))
            if bolus + extra_basal_u > headroom:
                room = max(headroom - bolus, 0.0)
                basal = min(basal, basal_sched + room * MIN_PER_H / duration)
            override("max insulin on board", basal, bolus)
        basal, bolus = self._rolling_limits(t_min, basal, bolus, duration, override)
        basal, bolus = self._guard(t_min, basal, bolus, duration, override)

        cgm = self._last_cgm
        if cgm is None or t_min - cgm.t_min > cfg.stale_after_min:
            basal = 0.0 if cfg.stale_action == "suspend" else basal_sched
            bolus = 0.0
            override(f"stale CGM: {cfg.stale_action.replace('_', ' ')}", basal, bolus)
        else:
            low_now = cgm.glucose_mg_dl < cfg.suspend_below_mg_dl
            est = self._last_estimate
            low_soon = (
                est is not None
                and t_min - est.t_min <= cfg.stale_after_min
                and est.forecast_30_mg_dl < cfg.suspend_below_mg_dl
            )
            if (low_now or low_soon) and (basal > 0.0 or bolus > 0.0):
                basal, bolus = 0.0, 0.0
                why = "CGM" if low_now else "30-min forecast"
                override(f"low-glucose suspend ({why} < {cfg.suspend_below_mg_dl:g})", 0.0, 0.0)
        return InsulinCommand(t_min, basal, bolus, duration), overrides

    def _rolling_limits(
        self, t_min: float, basal: float, bolus: float, duration: float, override: _Override
    ) -> tuple[float, float]:
        """Cut the bolus, then the basal, so the rolling 1-h and 24-h totals hold."""
        cfg = self.config
        sum_1h, sum_24h = self._rolling_sums(t_min)
        for limit, used, label in (
            (cfg.max_insulin_1h_u, sum_1h, "60 min"),
            (cfg.max_insulin_24h_u, sum_24h, "24 h"),
        ):
            room = max(limit - used, 0.0)
            if bolus + basal * duration / MIN_PER_H <= room + 1e-12:
                continue
            bolus = min(bolus, room)
            basal = min(basal, max(room - bolus, 0.0) * MIN_PER_H / duration)
            override(f"max insulin in {label} ({limit:.1f} U)", basal, bolus)
        return basal, bolus

    def _guard(
        self, t_min: float, basal: float, bolus: float, duration: float, override: _Override
    ) -> tuple[float, float]:
        """The predictive bolus guard: scale the insulin above the scheduled basal down."""
        cfg = self.config
        sched = cfg.scheduled_basal_u_per_h
        extra_rate = max(basal - sched, 0.0)
        extra_u = bolus + extra_rate * duration / MIN_PER_H
        if extra_u <= 0.0:
            return basal, bolus
        plan = self._last_plan
        if (
            self._scenarios is not None
            and plan is not None
            and 0.0 <= t_min - plan.t_min <= cfg.stale_after_min
        ):
            plan = self._anchored(t_min, plan)
            last = self._guard_allowed
            guess = None
            if last is not None and 0.0 < t_min - last[0] <= cfg.stale_after_min:
                guess = last[1] / extra_u
            fraction = self._model_fraction(t_min, plan, bolus, extra_rate, duration, guess)
            self._guard_allowed = (t_min, fraction * extra_u) if fraction < 1.0 else None
            why = (
                f"twin forecast: {fraction:.0%} of the extra insulin keeps "
                f">= {cfg.guard_floor_mg_dl:g} mg/dL"
            )
        else:
            fraction, margin = self._linear_fraction(t_min, extra_u)
            why = f"linear forecast {-margin:.0f} mg/dL under its floor"
        if fraction >= 1.0:
            return basal, bolus
        basal = min(basal, sched + fraction * extra_rate)
        bolus = fraction * bolus
        override(f"predictive guard ({why})", basal, bolus)
        return basal, bolus

    def _fresh_cgm_mg_dl(self, t_min: float) -> float | None:
        """The last CGM reading if it is fresh (``stale_after_min``) and finite, else None."""
        cgm = self._last_cgm
        if cgm is None or t_min - cgm.t_min > self.config.stale_after_min:
            return None
        return cgm.glucose_mg_dl if math.isfinite(cgm.glucose_mg_dl) else None

    def _anchored(self, t_min: float, plan: TwinPlanState) -> TwinPlanState:
        """The twin's state with its glucose no higher than the CGM allows.

        A twin that believes glucose higher than the sensor shows (a filter running away
        while the CGM sits at its ceiling, or lagging a fall) would let insulin through that
        the patient cannot take; the guard starts from at most the last fresh reading plus
        ``guard_cgm_tolerance`` (plasma and tissue glucose scaled together). A lower twin
        glucose is kept: it only makes the guard stricter.
        """
        scenarios = self._scenarios
        assert scenarios is not None
        reading = self._fresh_cgm_mg_dl(t_min)
        if reading is None:
            return plan
        cap = reading * (1.0 + self.config.guard_cgm_tolerance)
        twin_bg = plan.x[GP_STATE] / scenarios.vg
        if not twin_bg > cap:
            return plan
        x = list(plan.x)
        x[GP_STATE] *= cap / twin_bg
        x[GT_STATE] *= cap / twin_bg
        return dataclasses.replace(plan, x=tuple(x))

    def _model_fraction(
        self,
        t_min: float,
        plan: TwinPlanState,
        bolus: float,
        extra_rate: float,
        duration: float,
        guess: float | None = None,
    ) -> float:
        """The fraction of the extra insulin that keeps both forecasts above the floor.

        Two forecasts from the twin's plan state (:class:`TwinScenarios`): the twin's own, and
        the pessimistic one — the announced carbohydrates ``guard_carb_uncertainty`` lower and
        insulin ``guard_sensitivity`` × as effective, from glucose no higher than the CGM's.
        ``guess``: a fraction to try first (:func:`_largest_fraction`).
        """
        cfg = self.config
        scenarios = self._scenarios
        assert scenarios is not None
        h = scenarios.horizon_min
        lag = round(t_min - plan.t_min)  # the plan state is at most a few minutes old
        base = np.full(h, cfg.scheduled_basal_u_per_h / MIN_PER_H)
        extra = np.zeros(h)
        k = min(max(round(duration), 0), h - lag)
        extra[lag : lag + k] = extra_rate / MIN_PER_H
        extra[lag] += bolus

        reading = self._fresh_cgm_mg_dl(t_min)
        low_cap = math.inf if reading is None else reading

        def margin(f: float) -> float:
            g = scenarios.simulate(
                plan,
                (base + f * extra)[None, :],
                carb_uncertainty=cfg.guard_carb_uncertainty,
                low_sensitivity=cfg.guard_sensitivity,
                low_glucose_cap_mg_dl=low_cap,
            )
            return float(g[:, 0, lag + 1 :].min()) - cfg.guard_floor_mg_dl

        return _largest_fraction(margin, guess)

    def _linear_fraction(self, t_min: float, extra_u: float) -> tuple[float, float]:
        """The linear guard (see the module docstring): the allowed fraction, and the margin.

        The margin is the forecast's distance above the floor (mg/dL; negative: it fails).
        """
        cfg = self.config
        cgm = self._last_cgm
        if cgm is None or not math.isfinite(cgm.glucose_mg_dl):
            return 0.0, -math.inf
        self._forget_absorbed(t_min)
        cob_g = math.fsum(
            g * (1.0 - max(t_min - t, 0.0) / cfg.guard_absorption_min) for t, g in self._meals
        )
        isf = cfg.guard_correction_mg_dl_per_u
        credit = isf / cfg.guard_carb_ratio_g_per_u * (1.0 - cfg.guard_carb_uncertainty) * cob_g
        base = cgm.glucose_mg_dl + credit - isf * max(self.net_iob_u, 0.0)
        forecast = base - isf * extra_u
        if forecast >= cfg.guard_floor_mg_dl:
            return 1.0, forecast - cfg.guard_floor_mg_dl
        allowed_u = max((base - cfg.guard_floor_mg_dl) / isf, 0.0)
        return min(allowed_u / extra_u, 1.0), forecast - cfg.guard_floor_mg_dl
