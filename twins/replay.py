"""Replay a log's days on a twin (or on a virtual patient) under a therapy: the closed loop.

:func:`closed_loop` runs M members at once (posterior draws of a twin, or virtual patients):
every ``period_min`` (5) minutes each member's controller sees the member's glucose (plus a
sensor error when given), its insulin on board and the carbohydrates announced in the coming
period, and returns a basal rate for the period and a bolus given at its first minute; then
the compiled model advances every member by the period in one batch. There is no safety
supervisor between the controller and the patient: the replay shows what the therapy itself
does.

**Rescue carbohydrates** (as ReplayBG's default hypotreatment rule, Cappon et al. 2023): when a
member's glucose is below ``below_mg_dl`` (70) at a tick and it has not been rescued in the last
``interval_min`` (15) minutes, it eats ``grams`` (10 g) of fast carbohydrate. Rescues are
counted and reported: a therapy that needs many of them would go low without them.

**Therapies.**

* :class:`LoggedTherapy` — the person's own decisions from the log: the logged basal and
  boluses, optionally with a changed basal (``basal_scale`` or a flat ``basal_u_per_h``), and
  with a changed CR or CF. With a new CR or CF, each meal bolus (a bolus within 15 min of logged
  carbs) is recomputed by the standard bolus calculator, ``carbs/CR + max(0, (G − 120)/CF −
  IOB)`` on the member's glucose; stand-alone corrections are scaled by ``CF_old/CF_new``.
* any controller of :func:`twinloop.policies.glucose.controllers.make_controller` (``basal-bolus``,
  ``pid``, ``oref0``, ``mpc``, ``policy:PATH``), parametrised with the twin's therapy.

**A controller that plans** (``needs_twin``: the MPC) plans on what a twin estimator believes
when ``estimators`` are given: each member's
:class:`~twinloop.agents.glucose.estimator.TwinEstimator` (built on the loop's model, which need
not be the member's) fuses the glucose the controller sees
(clipped to the CGM's range) at every tick, the insulin delivered and the meals announced, as in
:class:`~twinloop.agents.glucose.loop.PatientLoop`. Without an estimator it plans on the member's
exact state: an upper bound no real loop reaches.

**Starting later in a log.** :func:`filter_log` feeds a log's minutes before the replay's first
to an estimator (the insulin of every minute, the carbohydrates at their minute, the CGM
readings): its mean model state and eating process are where a replay from that minute starts
(``x0``, ``meal_state0``), and estimators that filtered the log so far may plan on in the
loop (``estimator_clock_min``: the loop's minute 0 on their clock). ``insulin_history_u_per_min``
puts the insulin delivered before minute 0 on board for the controllers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from twinloop.agents.glucose.estimator import TwinEstimator
from twinloop.agents.messages import CgmReading, InsulinDelivery, MealAnnouncement
from twinloop.plant.glucose.insulin import IobBatch
from twinloop.plant.glucose.patients import N_STATES
from twinloop.plant.glucose.twin_model import LogGrid, scale_sensitivity
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    N_MEAL_STATE,
    P_VG,
    advance,
)
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.interface import Controller, ControllerInput, Dose, TwinPlanState

__all__ = ["LoggedTherapy", "LoopTrace", "RescueRule", "closed_loop", "filter_log"]

#: A bolus this close (minutes) to logged carbohydrates is a meal bolus.
MEAL_BOLUS_WINDOW_MIN = 15
#: Bolus-calculator target, mg/dL.
CALCULATOR_TARGET_MG_DL = 120.0


@dataclasses.dataclass(frozen=True)
class RescueRule:
    """Rescue carbohydrates: ``grams`` when glucose is below ``below_mg_dl``.

    At most one rescue every ``interval_min`` minutes; the defaults are ReplayBG's (10 g every
    15 min while below 70 mg/dL).
    """

    grams: float = 10.0
    below_mg_dl: float = 70.0
    interval_min: float = 15.0

    def __post_init__(self) -> None:
        for name in ("grams", "below_mg_dl", "interval_min"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise PolicyConfigError(f"rescue {name}={v!r} is not allowed: a number > 0")


@dataclasses.dataclass(frozen=True)
class LoopTrace:
    """What a closed loop did, per member and minute.

    Attributes:
        gsub_mg_dl: ``(M, K+1)`` subcutaneous glucose ``Gs/Vg`` (what a CGM measures).
        bg_mg_dl: ``(M, K+1)`` plasma glucose.
        basal_u_per_h: ``(M, K)`` basal rate delivered.
        bolus_u: ``(M, K)`` boluses.
        rescue_g: ``(M, K)`` rescue carbohydrates eaten.
        seen_mg_dl: ``(M, K+1)`` the glucose the controllers saw (at ticks; ``NaN`` between).

    """

    gsub_mg_dl: NDArray[np.float64]
    bg_mg_dl: NDArray[np.float64]
    basal_u_per_h: NDArray[np.float64]
    bolus_u: NDArray[np.float64]
    rescue_g: NDArray[np.float64]
    seen_mg_dl: NDArray[np.float64]

    @property
    def insulin_u_per_min(self) -> NDArray[np.float64]:
        """Total insulin over each minute, U/min."""
        out: NDArray[np.float64] = self.basal_u_per_h / 60.0 + self.bolus_u
        return out

    @property
    def rescues(self) -> NDArray[np.int64]:
        """Number of rescues per member."""
        return np.asarray((self.rescue_g > 0).sum(axis=1), dtype=np.int64)


class LoggedTherapy:
    """The person's logged basal and boluses, optionally with changed settings (see module).

    Args:
        basal_u_per_h: ``(K,)`` logged basal rate.
        bolus_u: ``(K,)`` logged boluses.
        carbs_g: ``(K,)`` logged carbohydrates (to tell meal boluses from corrections).
        carb_ratio_g_per_u: the person's CR (the one the logged boluses used).
        correction_factor_mg_dl_per_u: the person's CF.
        basal_scale: factor on the logged basal.
        flat_basal_u_per_h: a flat basal replacing the logged one.
        new_carb_ratio_g_per_u: a changed CR.
        new_correction_factor_mg_dl_per_u: a changed CF.

    """

    def __init__(
        self,
        basal_u_per_h: NDArray[np.float64],
        bolus_u: NDArray[np.float64],
        carbs_g: NDArray[np.float64],
        *,
        carb_ratio_g_per_u: float,
        correction_factor_mg_dl_per_u: float,
        basal_scale: float = 1.0,
        flat_basal_u_per_h: float | None = None,
        new_carb_ratio_g_per_u: float | None = None,
        new_correction_factor_mg_dl_per_u: float | None = None,
    ) -> None:
        k = basal_u_per_h.shape[0]
        self._basal = (
            np.full(k, float(flat_basal_u_per_h))
            if flat_basal_u_per_h is not None
            else basal_u_per_h * basal_scale
        )
        self._bolus = bolus_u
        self._carbs = carbs_g
        self._cr_new = new_carb_ratio_g_per_u
        self._cf_new = new_correction_factor_mg_dl_per_u
        self._recompute = self._cr_new is not None or self._cf_new is not None
        self._cr = carb_ratio_g_per_u if self._cr_new is None else self._cr_new
        self._cf = correction_factor_mg_dl_per_u if self._cf_new is None else self._cf_new
        self._cf_ratio = correction_factor_mg_dl_per_u / self._cf
        has_carbs = np.convolve(
            carbs_g > 0, np.ones(2 * MEAL_BOLUS_WINDOW_MIN + 1, dtype=bool), mode="same"
        )
        self._meal_bolus = (bolus_u > 0) & has_carbs
        self._period = 5

    def decide(self, obs: ControllerInput) -> Dose:
        """The logged basal for the period and its boluses (recomputed when asked)."""
        t = int(obs.t_min)
        b = min(t + self._period, self._basal.shape[0])
        basal = float(self._basal[t:b].mean())
        if not self._recompute:
            return Dose(basal, float(self._bolus[t:b].sum()))
        bolus = float(self._bolus[t:b][~self._meal_bolus[t:b]].sum()) * self._cf_ratio
        carbs = float(self._carbs[t:b].sum())
        if self._meal_bolus[t:b].any() and carbs > 0:
            bolus += carbs / self._cr
            g = obs.glucose_mg_dl
            extra = (g - CALCULATOR_TARGET_MG_DL) / self._cf - max(obs.net_iob_u, 0.0)
            if math.isfinite(extra) and extra > 0:
                bolus += extra
        return Dose(basal, bolus)


def filter_log(estimator: TwinEstimator, grid: LogGrid, end_min: int) -> TwinEstimator:
    """Feed the log's minutes ``[0, end_min)`` to ``estimator`` (at minute 0 of the log).

    Every minute's logged basal and bolus as an
    :class:`~twinloop.agents.messages.InsulinDelivery`, the logged carbohydrates as a
    :class:`~twinloop.agents.messages.MealAnnouncement` at their minute and every CGM reading
    before ``end_min`` as a :class:`~twinloop.agents.messages.CgmReading`, in time order.

    Returns:
        The estimator, its time the newest reading's minute (use
        :meth:`~twinloop.agents.glucose.estimator.TwinEstimator.plan_state` for its state at
        ``end_min``).

    Raises:
        PolicyConfigError: the estimator is not at minute 0, or ``end_min`` is outside the log.

    """
    if estimator.t_min != 0.0:
        raise PolicyConfigError(
            f"estimator.t_min={estimator.t_min:g} is not allowed: an estimator at minute 0"
        )
    if not 0 <= end_min <= grid.minutes:
        raise PolicyConfigError(
            f"end_min={end_min} is not allowed: a minute in [0, {grid.minutes}] of the log"
        )
    basal = grid.basal_u_per_h[:end_min] / 60.0
    bolus = grid.bolus_u[:end_min]
    carbs = grid.carbs_g[:end_min]
    cgm = grid.cgm_mg_dl[:end_min]
    meals = np.flatnonzero(carbs > 0)
    done = 0
    for r in [*np.flatnonzero(np.isfinite(cgm)).tolist(), end_min]:
        for m in range(done, r):
            estimator.observe_delivery(InsulinDelivery(float(m), float(basal[m]), float(bolus[m])))
        for m in meals[(meals >= done) & (meals < r)].tolist():
            estimator.observe_meal(MealAnnouncement(float(m), float(carbs[m])))
        done = r
        if r < end_min:
            estimator.update(CgmReading(float(r), float(cgm[r])))
    return estimator


def _plan_on_estimator(
    estimator: TwinEstimator,
    t: int,
    glucose_mg_dl: float,
    announced_g: NDArray[np.float64],
    basal_u_per_h: NDArray[np.float64],
    bolus_u: NDArray[np.float64],
) -> TwinPlanState:
    """Tell the estimator the last period's insulin, this tick's meals and reading; its plan."""
    first = t - basal_u_per_h.shape[0]
    deliveries = [
        InsulinDelivery(float(first + j), float(basal_u_per_h[j]) / 60.0, float(bolus_u[j]))
        for j in range(basal_u_per_h.shape[0])
    ]
    meals = [
        MealAnnouncement(float(t + j), float(announced_g[j])) for j in np.flatnonzero(announced_g)
    ]
    cfg = estimator.config
    reading = min(max(glucose_mg_dl, cfg.cgm_min_mg_dl), cfg.cgm_max_mg_dl)
    readings = [CgmReading(float(t), reading)] if math.isfinite(glucose_mg_dl) else []
    _, plan = estimator.step_for_planning(float(t), deliveries, meals, readings)
    return plan


def closed_loop(
    params: NDArray[np.float64],
    x0: NDArray[np.float64],
    controllers: Sequence[Controller],
    *,
    meal_g: NDArray[np.float64],
    announced_g: NDArray[np.float64],
    scheduled_basal_u_per_h: NDArray[np.float64],
    sensitivity: Callable[[int], NDArray[np.float64] | None] | None = None,
    sensor_error_mg_dl: NDArray[np.float64] | None = None,
    rescue: RescueRule | None = None,
    period_min: int = 5,
    estimators: Sequence[TwinEstimator | None] | None = None,
    estimator_clock_min: int = 0,
    meal_state0: NDArray[np.float64] | None = None,
    insulin_history_u_per_min: NDArray[np.float64] | None = None,
    progress: Callable[[int], object] | None = None,
) -> LoopTrace:
    """Run M members in closed loop for ``K`` minutes (see the module).

    Args:
        params: ``(M, N_PARAMS)`` model parameters.
        x0: ``(M, 13)`` initial states.
        controllers: one per member.
        meal_g: ``(M, K)`` or ``(K,)`` grams eaten from each minute.
        announced_g: same shape: grams the controllers are told of (at the tick before).
        scheduled_basal_u_per_h: ``(M,)`` the basal their insulin on board counts as zero.
        sensitivity: minute → ``(M,)`` factors on ``Vmx`` and ``kp3`` from that minute (a daily
            profile), or ``None``.
        sensor_error_mg_dl: ``(M, K+1)`` added to the glucose the controllers see.
        rescue: the rescue rule, or ``None`` for none.
        period_min: minutes between decisions.
        estimators: one per member (or ``None``): the twin estimator a planning controller
            plans on; without one it plans on the member's exact state.
        estimator_clock_min: the loop's minute 0 on the estimators' clock (estimators that
            filtered a log up to the replay's start: :func:`filter_log`).
        meal_state0: ``(M, N_MEAL_STATE)`` initial eating process (grams not yet swallowed of
            a meal begun before minute 0); default none.
        insulin_history_u_per_min: ``(H,)`` or ``(M, H)`` insulin delivered in the minutes
            before minute 0 (oldest first), on board for the controllers; default the
            scheduled basal.
        progress: called with the minutes just simulated, after every period (a progress bar).

    """
    m = params.shape[0]
    k = int(np.shape(meal_g)[-1])
    if x0.shape != (m, N_STATES) or len(controllers) != m:
        raise PolicyConfigError(f"{m} members need x0 ({m}, {N_STATES}) and {m} controllers")
    twins = [None] * m if estimators is None else list(estimators)
    if len(twins) != m:
        raise PolicyConfigError(f"{m} members need {m} estimators (or None), not {len(twins)}")
    if meal_state0 is not None and np.shape(meal_state0) != (m, N_MEAL_STATE):
        raise PolicyConfigError(
            f"meal_state0 of shape {np.shape(meal_state0)} is not allowed: ({m}, {N_MEAL_STATE})"
        )
    meals = np.array(np.broadcast_to(meal_g, (m, k)), dtype=np.float64)
    announced = np.broadcast_to(announced_g, (m, k))
    x = np.array(x0, dtype=np.float64, order="C")
    meal_state = (
        np.zeros((m, N_MEAL_STATE))
        if meal_state0 is None
        else np.array(meal_state0, dtype=np.float64, order="C")
    )
    eat = np.full(m, DEFAULT_EAT_RATE_G_PER_MIN)
    vg = params[:, P_VG]
    states = np.empty((m, k + 1, N_STATES))
    states[:, 0] = x
    basal = np.zeros((m, k))
    bolus = np.zeros((m, k))
    rescue_g = np.zeros((m, k))
    seen = np.full((m, k + 1), np.nan)
    iob = IobBatch(scheduled_basal_u_per_h)
    if insulin_history_u_per_min is not None:
        history = np.broadcast_to(
            insulin_history_u_per_min, (m, np.shape(insulin_history_u_per_min)[-1])
        )
        for j in range(history.shape[1]):
            iob.record(history[:, j])
    last_rescue = np.full(m, -math.inf)
    needs_twin = [bool(getattr(c, "needs_twin", False)) for c in controllers]
    p = params
    for t in range(0, k, period_min):
        b = min(t + period_min, k)
        g_true = x[:, 12] / vg
        g_seen = g_true if sensor_error_mg_dl is None else g_true + sensor_error_mg_dl[:, t]
        seen[:, t] = g_seen
        net_iob_u = iob.net_iob_u
        net_activity = iob.net_activity_u_per_min
        for i, ctrl in enumerate(controllers):
            twin = None
            estimator = twins[i]
            if needs_twin[i] and estimator is not None:
                twin = _plan_on_estimator(
                    estimator, estimator_clock_min + t, float(g_seen[i]), announced[i, t:b],
                    basal[i, max(t - period_min, 0) : t], bolus[i, max(t - period_min, 0) : t],
                )  # fmt: skip
            elif needs_twin[i]:
                pending = tuple(
                    (int(j), float(announced[i, t + j])) for j in np.flatnonzero(announced[i, t:b])
                )
                twin = TwinPlanState(float(t), tuple(x[i]), tuple(meal_state[i]), 1.0, pending)
            obs = ControllerInput(
                t_min=float(t),
                glucose_mg_dl=float(g_seen[i]),
                glucose_age_min=0.0,
                net_iob_u=float(net_iob_u[i]),
                meal_carbs_g=float(announced[i, t:b].sum()),
                net_activity_u_per_min=float(net_activity[i]),
                twin=twin,
            )
            dose = ctrl.decide(obs)
            basal[i, t:b] = max(float(dose.basal_u_per_h), 0.0)
            bolus[i, t] = max(float(dose.bolus_u), 0.0)
        if rescue is not None:
            due = (g_true < rescue.below_mg_dl) & (t - last_rescue >= rescue.interval_min)
            rescue_g[due, t] = rescue.grams
            last_rescue[due] = t
            meals[due, t] += rescue.grams
        if sensitivity is not None:
            factors = sensitivity(t)
            if factors is not None:
                p = scale_sensitivity(params, factors)
        ins = np.ascontiguousarray(basal[:, t:b] / 60.0 + bolus[:, t:b])
        advance(
            x, meal_state, p, ins, np.ascontiguousarray(meals[:, t:b]), eat,
            carbs_out=np.empty((m, b - t)), states_out=(seg := np.empty((m, b - t + 1, N_STATES))),
            parallel=False, check=False,
        )  # fmt: skip
        states[:, t + 1 : b + 1] = seg[:, 1:]
        for j in range(b - t):
            iob.record(ins[:, j])
        if progress is not None:
            progress(b - t)
    return LoopTrace(
        gsub_mg_dl=states[:, :, 12] / vg[:, None],
        bg_mg_dl=states[:, :, 3] / vg[:, None],
        basal_u_per_h=basal,
        bolus_u=bolus,
        rescue_g=rescue_g,
        seen_mg_dl=seen,
    )
