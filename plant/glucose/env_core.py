"""Shared batched core of the type-1-diabetes environments: configuration and one compiled step.

:class:`~twinloop.plant.glucose.env.T1DEnv` runs this core with one patient and
:class:`~twinloop.plant.glucose.env_vector.T1DVectorEnv` with N. A control step (pump command →
``K`` plant minutes → CGM reading → insulin on board → observation → reward) is one numba call for
the whole batch, so a sub-environment of the vector environment seeded with ``s + i`` follows
exactly the trajectory of the single environment seeded with ``s + i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

import twinloop.plant.glucose.uva_padova
from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.cgm import CGMSpec, cgm_errors_batch
from twinloop.plant.glucose.cohorts import expand_names
from twinloop.plant.glucose.insulin import DEFAULT_DIA_MIN, DEFAULT_PEAK_MIN, iob_kernel
from twinloop.plant.glucose.metrics import (
    KOVATCHEV_ALPHA,
    KOVATCHEV_BETA,
    KOVATCHEV_GAMMA,
    KOVATCHEV_RISK_SCALE,
)
from twinloop.plant.glucose.patients import (
    N_PARAMS,
    N_STATES,
    PatientParameters,
    initial_states,
    parameter_matrix,
)
from twinloop.plant.glucose.pump import STEP_TOL, PumpSpec
from twinloop.plant.glucose.scenarios import (
    MIN_PER_DAY,
    NO_MEAL,
    SCENARIOS,
    CarbCountingError,
    MealBatch,
    MealScenario,
)
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    EATING_SUBSTEPS,
    N_MEAL_STATE,
    P_VG,
    PARALLEL_MIN_BATCH,
    step_minute,
)
from twinloop.plant.numba_cache import drop_stale_cache
from twinloop.plant.units import MIN_PER_H

drop_stale_cache(__file__, [twinloop.plant.glucose.uva_padova.__file__])

#: Reward callback: ``reward_fn(bg_mg_dl, cgm_mg_dl, insulin_u, carbs_g) -> reward``, each an
#: array of shape ``(N,)``: true plasma glucose and CGM reading at the end of the step, insulin
#: delivered and carbohydrate swallowed during the step. Must return shape ``(N,)``.
RewardFn = Callable[
    [NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
    NDArray[np.float64],
]


@dataclasses.dataclass(frozen=True)
class T1DConfig:
    """Configuration of the T1D environments (validated once, at construction).

    Attributes:
        patients: patient and/or cohort names (``adult#001``, ``adults``, ``all`` …). The single
            environment uses the first patient, or draws one per reset when
            ``sample_patient``; the vector environment gives sub-environment ``i`` patient
            ``i mod len(patients)`` (or draws one per reset when ``sample_patient``).
        sample_patient: draw the patient uniformly at each reset (from ``np_random``).
        scenario: meal scenario: a name, ``"random"`` (the published six-slot daily protocol)
            or ``"A"`` (07:00 45 g, 12:00 70 g, 18:00 80 g), or any scenario object with
            ``sample_many`` (e.g. :class:`twinloop.plant.glucose.scenarios.FixedMealSchedule`).
        carb_error: carbohydrate-counting error of the announced meals of a *named* scenario
            (a scenario object carries its own).
        start_clock_min: clock time of the episode's first minute (minutes after midnight).
        episode_days: episode length in days (truncation).
        control_period_min: minutes per environment step (plant steps are 1 min).
        cgm: the CGM device model; its sample period must divide the control period.
        pump: the insulin pump model (increments, maxima, pulses).
        max_basal_u_per_h: upper bound of the basal part of the action space.
        bolus_action: add a bolus part (U, delivered within the step's first minute).
        max_bolus_u: upper bound of the bolus part of the action space.
        history_len: number of CGM readings in the observation (one per control step).
        include_iob: append insulin on board (U) to the observation.
        include_meal: append the announced grams of meals starting in the coming step.
        iob_peak_min: peak of the exponential insulin activity curve.
        iob_dia_min: duration of insulin action of that curve.
        terminate_below_mg_dl: episode terminates when plasma glucose falls below this.
        terminate_above_mg_dl: episode terminates when plasma glucose rises above this.
        eat_rate_g_per_min: eating speed.
        reward_fn: custom reward (see :data:`RewardFn`); ``None`` = the default
            ``1 − risk(BG)/100`` with the Kovatchev risk of true plasma glucose, clipped to
            ``[0, 1]``.

    """

    patients: tuple[str, ...] = ("adult#001",)
    sample_patient: bool = False
    scenario: str | MealScenario = "random"
    carb_error: CarbCountingError = dataclasses.field(default_factory=CarbCountingError)
    start_clock_min: int = 0
    episode_days: float = 1.0
    control_period_min: int = 5
    cgm: CGMSpec = dataclasses.field(default_factory=CGMSpec)
    pump: PumpSpec = dataclasses.field(default_factory=PumpSpec)
    max_basal_u_per_h: float = 5.0
    bolus_action: bool = False
    max_bolus_u: float = 20.0
    history_len: int = 1
    include_iob: bool = False
    include_meal: bool = False
    iob_peak_min: float = DEFAULT_PEAK_MIN
    iob_dia_min: float = DEFAULT_DIA_MIN
    terminate_below_mg_dl: float = 40.0
    terminate_above_mg_dl: float = 600.0
    eat_rate_g_per_min: float = DEFAULT_EAT_RATE_G_PER_MIN
    reward_fn: RewardFn | None = None

    def __post_init__(self) -> None:
        if isinstance(self.patients, str):
            object.__setattr__(self, "patients", (self.patients,))
        if not self.patients:
            raise ConfigError("patients", self.patients, "at least one patient or cohort name")
        if isinstance(self.scenario, str):
            if self.scenario not in SCENARIOS:
                raise ConfigError("scenario", self.scenario, f"one of {', '.join(SCENARIOS)}")
        elif not callable(getattr(self.scenario, "sample_many", None)):
            raise ConfigError(
                "scenario", self.scenario, f"one of {', '.join(SCENARIOS)} or a MealScenario"
            )
        if not 0 <= self.start_clock_min < MIN_PER_DAY:
            raise ConfigError("start_clock_min", self.start_clock_min, "0 <= value < 1440")
        if not 1 <= self.control_period_min <= 60:
            raise ConfigError("control_period_min", self.control_period_min, "1..60 minutes")
        if self.control_period_min % self.cgm.sample_period_min:
            raise ConfigError(
                "control_period_min",
                self.control_period_min,
                f"a multiple of the CGM sample period ({self.cgm.sample_period_min} min)",
            )
        steps = self.episode_days * MIN_PER_DAY / self.control_period_min
        if not (self.episode_days > 0 and steps >= 1 and steps == int(steps)):
            raise ConfigError(
                "episode_days",
                self.episode_days,
                "> 0 and a whole number of control periods",
            )
        if not 0 < self.max_basal_u_per_h <= self.pump.max_basal_u_per_h:
            raise ConfigError(
                "max_basal_u_per_h",
                self.max_basal_u_per_h,
                f"0 < value <= the pump's maximum ({self.pump.max_basal_u_per_h} U/h)",
            )
        if not 0 < self.max_bolus_u <= self.pump.max_bolus_u:
            raise ConfigError(
                "max_bolus_u",
                self.max_bolus_u,
                f"0 < value <= the pump's maximum ({self.pump.max_bolus_u} U)",
            )
        if self.history_len < 1:
            raise ConfigError("history_len", self.history_len, "an integer >= 1")
        if not 0 < self.terminate_below_mg_dl < self.terminate_above_mg_dl:
            raise ConfigError(
                "terminate_below_mg_dl",
                self.terminate_below_mg_dl,
                f"0 < value < terminate_above_mg_dl ({self.terminate_above_mg_dl})",
            )
        if not self.eat_rate_g_per_min > 0:
            raise ConfigError("eat_rate_g_per_min", self.eat_rate_g_per_min, "> 0")
        iob_kernel(self.control_period_min, peak_min=self.iob_peak_min, dia_min=self.iob_dia_min)
        self.patient_table()  # unknown names fail here, with the list of valid ones

    def patient_table(self) -> tuple[PatientParameters, ...]:
        """The patients named by :attr:`patients`, cohorts expanded in place, in order."""
        return expand_names(self.patients)

    @property
    def n_steps(self) -> int:
        """Control steps per episode."""
        return round(self.episode_days * MIN_PER_DAY / self.control_period_min)

    @property
    def obs_size(self) -> int:
        """Length of the observation vector."""
        return self.history_len + int(self.include_iob) + int(self.include_meal)


# Columns of the per-environment scalar state (float64).
S_T = 0  #: control steps taken in this episode
S_PULSE = 1  #: pump pulse accumulator (U)
S_MEAL_PTR = 2  #: index of the next meal event
S_BG = 3  #: plasma glucose at the end of the last step (mg/dL)
S_CGM = 4  #: last CGM reading (mg/dL)
S_INSULIN = 5  #: insulin delivered in the last step (U)
S_CARBS = 6  #: grams swallowed in the last step
S_IOB = 7  #: insulin on board (U)
S_ANNOUNCED = 8  #: announced grams of meals starting in the coming step
N_SCALARS = 9

# Columns of the configuration vector passed to the compiled step (see T1DBatch.__init__).
C_PERIOD = 0
C_MAX_BASAL = 1
C_MAX_BOLUS = 2
C_BASAL_INC = 3
C_BOLUS_INC = 4
C_PULSE = 5
C_CGM_EVERY = 6
C_CGM_LO = 7
C_CGM_HI = 8
C_EAT_RATE = 9
C_BG_LO = 10
C_BG_HI = 11
C_N_STEPS = 12
C_INCLUDE_IOB = 13
C_INCLUDE_MEAL = 14
C_DEFAULT_REWARD = 15
N_CFG = 16

#: Upper bounds of the insulin-on-board and meal parts of the observation (values are clipped).
OBS_MAX_IOB_U = 500.0
OBS_MAX_MEAL_G = 1000.0


@numba.njit(cache=True, inline="always", error_model="numpy")
def _kovatchev_risk(bg: float) -> float:
    """Kovatchev risk ``r(BG)`` of :func:`~..metrics.risk_index` (scalar, compiled)."""
    f = KOVATCHEV_ALPHA * (math.log(max(bg, 1.0)) ** KOVATCHEV_BETA - KOVATCHEV_GAMMA)
    return KOVATCHEV_RISK_SCALE * f * f


@numba.njit(cache=True, inline="always", error_model="numpy")
def _announced_ahead(
    meal_start: NDArray[np.int64],
    meal_announced: NDArray[np.float64],
    ptr: int,
    t0: int,
    period: int,
) -> float:
    total = 0.0
    j = ptr
    while j < meal_start.shape[0] and meal_start[j] < t0 + period:
        if meal_start[j] >= t0:
            total += meal_announced[j]
        j += 1
    return total


@numba.njit(cache=True, inline="always", error_model="numpy")
def _observe(
    i: int,
    scal: NDArray[np.float64],
    hist: NDArray[np.float64],
    include_iob: bool,
    include_meal: bool,
    obs: NDArray[np.float32],
) -> None:
    h = hist.shape[1]
    for j in range(h):
        obs[i, j] = hist[i, j]
    k = h
    if include_iob:
        obs[i, k] = min(scal[i, S_IOB], OBS_MAX_IOB_U)
        k += 1
    if include_meal:
        obs[i, k] = min(scal[i, S_ANNOUNCED], OBS_MAX_MEAL_G)


@numba.njit(cache=True, error_model="numpy")
def _observe_rows(
    indices: NDArray[np.intp],
    scal: NDArray[np.float64],
    hist: NDArray[np.float64],
    include_iob: bool,
    include_meal: bool,
    obs: NDArray[np.float32],
) -> None:
    for i in indices:
        _observe(i, scal, hist, include_iob, include_meal, obs)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _step_one(
    i: int,
    action: NDArray[np.float64],
    x: NDArray[np.float64],
    meal_state: NDArray[np.float64],
    params: NDArray[np.float64],
    scal: NDArray[np.float64],
    meal_start: NDArray[np.int64],
    meal_g: NDArray[np.float64],
    meal_announced: NDArray[np.float64],
    cgm_err: NDArray[np.float64],
    hist: NDArray[np.float64],
    doses: NDArray[np.float64],
    iob_w: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    reward: NDArray[np.float64],
    terminated: NDArray[np.bool_],
    truncated: NDArray[np.bool_],
) -> None:
    """One control step of environment ``i`` (see module docstring)."""
    period = int(cfg[C_PERIOD])
    max_basal_act = cfg[C_MAX_BASAL]
    max_bolus_act = cfg[C_MAX_BOLUS]
    basal_inc = cfg[C_BASAL_INC]
    bolus_inc = cfg[C_BOLUS_INC]
    pulse = cfg[C_PULSE]
    cgm_every = int(cfg[C_CGM_EVERY])
    cgm_lo = cfg[C_CGM_LO]
    cgm_hi = cfg[C_CGM_HI]
    eat_rate = cfg[C_EAT_RATE]
    bg_lo = cfg[C_BG_LO]
    bg_hi = cfg[C_BG_HI]
    n_steps = int(cfg[C_N_STEPS])
    include_iob = cfg[C_INCLUDE_IOB] > 0.0
    include_meal = cfg[C_INCLUDE_MEAL] > 0.0
    default_reward = cfg[C_DEFAULT_REWARD] > 0.0
    has_bolus = action.shape[1] > 1
    work = np.empty((5, N_STATES))
    n_dose = doses.shape[1]
    h = hist.shape[1]
    # pump: clip to the action space, then round down to the pump's increments
    basal = min(max(action[i, 0], 0.0), max_basal_act)
    if basal_inc > 0.0:
        basal = min(math.floor(basal / basal_inc + STEP_TOL) * basal_inc, basal)
    bolus = 0.0
    if has_bolus:
        bolus = min(max(action[i, 1], 0.0), max_bolus_act)
        if bolus_inc > 0.0:
            bolus = min(math.floor(bolus / bolus_inc + STEP_TOL) * bolus_inc, bolus)
    t = int(scal[i, S_T])
    minute0 = t * period
    ptr = int(scal[i, S_MEAL_PTR])
    delivered = 0.0
    carbs = 0.0
    for k in range(period):
        m = minute0 + k
        new_meal = 0.0
        while ptr < meal_start.shape[1] and meal_start[i, ptr] <= m:
            new_meal += meal_g[i, ptr]
            ptr += 1
        due = basal / MIN_PER_H + (bolus if k == 0 else 0.0)
        if pulse > 0.0:
            acc = scal[i, S_PULSE] + due
            due = math.floor(acc / pulse + STEP_TOL) * pulse
            scal[i, S_PULSE] = acc - due
        delivered += due
        carbs += step_minute(
            x[i], meal_state[i], params[i], new_meal, due, eat_rate, 1, EATING_SUBSTEPS, work
        )
    t += 1
    scal[i, S_T] = t
    scal[i, S_MEAL_PTR] = ptr
    bg = x[i, 3] / params[i, P_VG]
    sample = min((t * period) // cgm_every, cgm_err.shape[1] - 1)
    reading = x[i, 12] / params[i, P_VG] + cgm_err[i, sample]
    reading = min(max(reading, cgm_lo), cgm_hi)
    for j in range(h - 1):
        hist[i, j] = hist[i, j + 1]
    hist[i, h - 1] = reading
    for j in range(n_dose - 1, 0, -1):
        doses[i, j] = doses[i, j - 1]
    doses[i, 0] = delivered
    iob = 0.0
    for j in range(n_dose):
        iob += iob_w[j] * doses[i, j]
    scal[i, S_BG] = bg
    scal[i, S_CGM] = reading
    scal[i, S_INSULIN] = delivered
    scal[i, S_CARBS] = carbs
    scal[i, S_IOB] = iob
    scal[i, S_ANNOUNCED] = _announced_ahead(
        meal_start[i], meal_announced[i], ptr, t * period, period
    )
    _observe(i, scal, hist, include_iob, include_meal, obs)
    terminated[i] = bg < bg_lo or bg > bg_hi
    truncated[i] = t >= n_steps
    if default_reward:
        reward[i] = 1.0 - _kovatchev_risk(bg) / 100.0


@numba.njit(cache=True, error_model="numpy")
def _step_serial(
    active: NDArray[np.bool_],
    action: NDArray[np.float64],
    x: NDArray[np.float64],
    meal_state: NDArray[np.float64],
    params: NDArray[np.float64],
    scal: NDArray[np.float64],
    meal_start: NDArray[np.int64],
    meal_g: NDArray[np.float64],
    meal_announced: NDArray[np.float64],
    cgm_err: NDArray[np.float64],
    hist: NDArray[np.float64],
    doses: NDArray[np.float64],
    iob_w: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    reward: NDArray[np.float64],
    terminated: NDArray[np.bool_],
    truncated: NDArray[np.bool_],
) -> None:
    for i in range(x.shape[0]):
        if active[i]:
            _step_one(
                i,
                action,
                x,
                meal_state,
                params,
                scal,
                meal_start,
                meal_g,
                meal_announced,
                cgm_err,
                hist,
                doses,
                iob_w,
                cfg,
                obs,
                reward,
                terminated,
                truncated,
            )


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _step_parallel(
    active: NDArray[np.bool_],
    action: NDArray[np.float64],
    x: NDArray[np.float64],
    meal_state: NDArray[np.float64],
    params: NDArray[np.float64],
    scal: NDArray[np.float64],
    meal_start: NDArray[np.int64],
    meal_g: NDArray[np.float64],
    meal_announced: NDArray[np.float64],
    cgm_err: NDArray[np.float64],
    hist: NDArray[np.float64],
    doses: NDArray[np.float64],
    iob_w: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    reward: NDArray[np.float64],
    terminated: NDArray[np.bool_],
    truncated: NDArray[np.bool_],
) -> None:
    for i in numba.prange(x.shape[0]):
        if active[i]:
            _step_one(
                i,
                action,
                x,
                meal_state,
                params,
                scal,
                meal_start,
                meal_g,
                meal_announced,
                cgm_err,
                hist,
                doses,
                iob_w,
                cfg,
                obs,
                reward,
                terminated,
                truncated,
            )


def config_from_kwargs(config: T1DConfig | None, kwargs: dict[str, Any]) -> T1DConfig:
    """The environments' constructor arguments as one config (``patient=`` → ``patients``)."""
    if "patient" in kwargs:
        kwargs = dict(kwargs)
        kwargs["patients"] = (kwargs.pop("patient"),)
    if config is None:
        return T1DConfig(**kwargs)
    return dataclasses.replace(config, **kwargs) if kwargs else config


class T1DBatch:
    """N patients advanced together by control steps (the engine under both environments)."""

    def __init__(self, config: T1DConfig, n: int) -> None:
        self.config = config
        self.n = n
        self.table = config.patient_table()
        cfg = config
        self.iob_w = iob_kernel(
            cfg.control_period_min, peak_min=cfg.iob_peak_min, dia_min=cfg.iob_dia_min
        )
        self.n_cgm_samples = cfg.n_steps * cfg.control_period_min // cfg.cgm.sample_period_min + 1
        self.x = np.zeros((n, N_STATES))
        self.meal_state = np.zeros((n, N_MEAL_STATE))
        self.params = np.zeros((n, N_PARAMS))
        self.scal = np.zeros((n, N_SCALARS))
        self.meal_start = np.full((n, 1), NO_MEAL, dtype=np.int64)
        self.meal_g = np.zeros((n, 1))
        self.meal_announced = np.zeros((n, 1))
        self.cgm_err = np.zeros((n, self.n_cgm_samples))
        self.hist = np.zeros((n, cfg.history_len))
        self.doses = np.zeros((n, self.iob_w.shape[0]))
        self.obs = np.zeros((n, cfg.obs_size), dtype=np.float32)
        self.reward = np.zeros(n)
        self.terminated = np.zeros(n, dtype=np.bool_)
        self.truncated = np.zeros(n, dtype=np.bool_)
        self.patient_index = np.zeros(n, dtype=np.int64)
        self.cfg_vec = np.zeros(N_CFG)
        for column, value in (
            (C_PERIOD, cfg.control_period_min),
            (C_MAX_BASAL, cfg.max_basal_u_per_h),
            (C_MAX_BOLUS, cfg.max_bolus_u),
            (C_BASAL_INC, cfg.pump.basal_increment_u_per_h),
            (C_BOLUS_INC, cfg.pump.bolus_increment_u),
            (C_PULSE, cfg.pump.pulse_u),
            (C_CGM_EVERY, cfg.cgm.sample_period_min),
            (C_CGM_LO, cfg.cgm.min_mg_dl),
            (C_CGM_HI, cfg.cgm.max_mg_dl),
            (C_EAT_RATE, cfg.eat_rate_g_per_min),
            (C_BG_LO, cfg.terminate_below_mg_dl),
            (C_BG_HI, cfg.terminate_above_mg_dl),
            (C_N_STEPS, cfg.n_steps),
            (C_INCLUDE_IOB, float(cfg.include_iob)),
            (C_INCLUDE_MEAL, float(cfg.include_meal)),
            (C_DEFAULT_REWARD, float(cfg.reward_fn is None)),
        ):
            self.cfg_vec[column] = value
        self._param_rows = parameter_matrix(self.table)
        self._x0_rows = initial_states(self.table)
        self._basal_dose_u = np.array(
            [p.basal_u_per_h * cfg.control_period_min / MIN_PER_H for p in self.table]
        )
        self._scenario: MealScenario = (
            SCENARIOS[cfg.scenario](carb_error=cfg.carb_error)
            if isinstance(cfg.scenario, str)
            else cfg.scenario
        )
        self._days = math.ceil(cfg.episode_days)
        self._all = np.ones(n, dtype=np.bool_)
        self._parallel = n >= PARALLEL_MIN_BATCH

    def reset_many(
        self,
        indices: NDArray[np.intp],
        rngs: Sequence[np.random.Generator],
        patients: NDArray[np.intp],
    ) -> None:
        """Start new episodes for environments ``indices`` with ``patients`` (table indices).

        Environment ``indices[j]`` draws its meals and its CGM noise from two child generators
        of ``rngs[j]`` (``rng.spawn(2)``), so changing the scenario, the episode length or the
        CGM never changes the other stream, and an episode does not depend on which other
        environments are reset with it.
        """
        cfg = self.config
        children = [rng.spawn(2) for rng in rngs]
        meals = self._scenario.sample_many(
            [c[0] for c in children], days=self._days, start_min=cfg.start_clock_min
        )
        err = cgm_errors_batch(cfg.cgm, [c[1] for c in children], self.n_cgm_samples)
        self._store_meals(indices, meals)
        self.cgm_err[indices] = err
        self.patient_index[indices] = patients
        params = self._param_rows[patients]
        x0 = self._x0_rows[patients]
        self.params[indices] = params
        self.x[indices] = x0
        self.meal_state[indices] = 0.0
        reading = np.clip(
            x0[:, 12] / params[:, P_VG] + err[:, 0], cfg.cgm.min_mg_dl, cfg.cgm.max_mg_dl
        )
        self.hist[indices] = reading[:, np.newaxis]
        # the patients start in basal steady state: the dose history is their basal
        self.doses[indices] = self._basal_dose_u[patients][:, np.newaxis]
        scal = np.zeros((len(indices), N_SCALARS))
        scal[:, S_BG] = x0[:, 3] / params[:, P_VG]
        scal[:, S_CGM] = reading
        scal[:, S_IOB] = self._basal_dose_u[patients] * self.iob_w.sum()
        first = (meals.start_min >= 0) & (meals.start_min < cfg.control_period_min)
        scal[:, S_ANNOUNCED] = np.where(first, meals.announced_g, 0.0).sum(axis=1)
        self.scal[indices] = scal
        self.terminated[indices] = False
        self.truncated[indices] = False
        self.reward[indices] = 0.0
        _observe_rows(indices, self.scal, self.hist, cfg.include_iob, cfg.include_meal, self.obs)

    def _store_meals(self, indices: NDArray[np.intp], meals: MealBatch) -> None:
        m = meals.start_min.shape[1]
        if m > self.meal_start.shape[1]:
            pad = ((0, 0), (0, m - self.meal_start.shape[1]))
            self.meal_start = np.pad(self.meal_start, pad, constant_values=NO_MEAL)
            self.meal_g = np.pad(self.meal_g, pad)
            self.meal_announced = np.pad(self.meal_announced, pad)
        self.meal_start[indices] = NO_MEAL
        self.meal_g[indices] = 0.0
        self.meal_announced[indices] = 0.0
        self.meal_start[indices, :m] = meals.start_min
        self.meal_g[indices, :m] = meals.carbs_g
        self.meal_announced[indices, :m] = meals.announced_g

    def step(self, action: NDArray[np.float64], active: NDArray[np.bool_] | None = None) -> None:
        """Advance the active environments by one control step (results in the batch arrays)."""
        kernel = _step_parallel if self._parallel else _step_serial
        kernel(
            self._all if active is None else active,
            action,
            self.x,
            self.meal_state,
            self.params,
            self.scal,
            self.meal_start,
            self.meal_g,
            self.meal_announced,
            self.cgm_err,
            self.hist,
            self.doses,
            self.iob_w,
            self.cfg_vec,
            self.obs,
            self.reward,
            self.terminated,
            self.truncated,
        )
        if self.config.reward_fn is not None:
            s = self.scal
            r = np.asarray(
                self.config.reward_fn(
                    s[:, S_BG].copy(),
                    s[:, S_CGM].copy(),
                    s[:, S_INSULIN].copy(),
                    s[:, S_CARBS].copy(),
                ),
                dtype=np.float64,
            )
            if r.shape != (self.n,):
                raise InvalidInputError(f"reward_fn returned shape {r.shape}; expected ({self.n},)")
            if active is None:
                self.reward[:] = r
            else:
                self.reward[active] = r[active]


def check_action(action: object, shape: Sequence[int]) -> NDArray[np.float64]:
    """Convert an action to float64 of ``shape``; NaN or a wrong shape raises a clear error.

    Only axes of length 1 may be missing or extra (``1.0`` for a one-patient, one-input
    action); any other shape is refused rather than reshaped.

    Raises:
        InvalidInputError: the action has the wrong shape or contains NaN.

    """
    a = np.asarray(action, dtype=np.float64)
    target = tuple(shape)
    if a.shape != target:
        if np.squeeze(a).shape != tuple(d for d in target if d != 1):
            raise InvalidInputError(f"action: expected shape {target}, got {a.shape}")
        a = a.reshape(target)
    if np.isnan(a).any():
        raise InvalidInputError(
            f"action: NaN in {a.tolist()}; actions are insulin rates in U/h (and bolus in U)"
        )
    return a
