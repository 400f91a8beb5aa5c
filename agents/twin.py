"""The twin estimator: an unscented Kalman filter on this patient's UVA/Padova model.

The twin is an estimator, not a copy (see ``DESIGN.md``): it keeps the 13 states of the
patient's UVA/Padova 2008 model (:mod:`plant.uva_padova`, same parameters as the plant's
patient) in sync with the CGM, fed with the insulin the pump actually delivered and the meals
the patient announced, adapts the patient's insulin sensitivity slowly, and forecasts plasma
glucose.

Filter state (15 values)
------------------------
======  ==================================================================  ===========
index   meaning                                                             unit
======  ==================================================================  ===========
0-12    the model's states, in :class:`plant.patients.PatientParameters`     as there
        order (``q_sto1`` … ``g_s``)
13      ``θ = ln s``: log of the insulin-sensitivity scale ``s``, which      -
        multiplies ``Vmx`` (insulin-dependent utilisation) and ``kp3``
        (insulin action on the liver); a random walk
14      ``e``: the correlated part of the CGM error, an AR(1) process        mg/dL
======  ==================================================================  ===========

Prediction (the unscented part)
-------------------------------
Between two readings the ``2·15 + 1`` sigma points (``α = 1, β = 2, κ = 0``: ``±√15`` standard
deviations along the columns of the Cholesky factor of the covariance) are propagated with the
compiled model, all of them in one :func:`plant.uva_padova.advance` call per reading interval
(``K`` minutes, inputs held per minute), each with its own ``Vmx·s`` and ``kp3·s``. The two
sigma points that differ from the mean only in the CGM error ``e`` have the mean's model
trajectory, so 29 rows are integrated. ``e`` decays by ``φ^K`` with
``φ = correlation^(1/lag)`` per minute. Process noise is added per minute (see
:class:`TwinConfig`): a random walk on plasma glucose, relative noise on the gut and the
subcutaneous insulin depots, the random walk of ``θ`` and the exact AR(1) noise of ``e``.

Inputs: insulin delivered in minute ``m`` (``observe_delivery``) is held over ``[m, m+1)``; a
minute with no delivery observed gets the basal rate of the newest delivery seen before it
(the scheduled basal before any). Announced meals (``observe_meal``) are eaten by the model
at 5 g/min from their start minute, like the plant's meals; since the grams are counted with
error, once a meal has been swallowed the filter adds ``(meal_size_rel_sd · grams)²`` of
variance along the direction of the stomach and gut contents (a fully correlated scale error
on what was swallowed), so the CGM decides how big the meal really was.

Update
------
The measurement is ``CGM = G_s/V_g + e + v`` with white ``v`` (``cgm_white_noise_sd_mg_dl``).
It is linear in the state, so the update is the exact Kalman update, in Joseph form, then
symmetrised; state means are clipped at 0 where the model requires it (every model state but
the insulin action ``X``) and ``θ`` to the configured sensitivity range. Readings at the
device's clipping limits are censored: fused only when the prediction lies inside the range.
Stale (older than the filter), late and non-finite messages are ignored and counted in
:attr:`TwinEstimator.ignored`, so a faulty channel cannot crash the estimator.

Outputs
-------
:meth:`TwinEstimator.estimate` propagates the mean (the model with the mean sensitivity scale)
from the newest reading to the requested time and on over the forecast horizons, with the
insulin delivered where known and afterwards the held (newest) basal rate or the scheduled
basal (``forecast_insulin``), no bolus and no meals beyond those announced:

* ``bg_mg_dl``: plasma glucose ``G_p/V_g``;
* ``iob_u``: **net insulin on board from the model's insulin states**: the insulin in the
  subcutaneous depots, plasma and liver (``I_sc1 + I_sc2 + I_p + I_l``, pmol/kg, × body weight
  / 6000 pmol/U) minus the same sum in the steady state of the scheduled basal. Like the loop's
  :class:`plant.insulin.IobTracker` it is 0 on the scheduled basal and negative during a
  suspension, but it is the model's insulin mass, not the oref0 activity curve;
* ``cob_g``: carbohydrates in the stomach and gut (``q_sto1 + q_sto2 + q_gut``) plus the grams
  of the current meal not yet swallowed;
* ``insulin_sensitivity_scale``: ``exp(θ)`` (the median of the log-normal estimate);
* ``forecast_30_mg_dl`` / ``forecast_60_mg_dl``: plasma glucose 30 and 60 minutes ahead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from agents.errors import AgentError, LoopConfigError
from agents.messages import CgmReading, InsulinDelivery, MealAnnouncement, TwinEstimate
from plant.patients import N_STATES, PMOL_PER_U, PatientParameters, parameter_matrix
from plant.uva_padova import (
    M_PLANNED_G,
    MG_PER_G,
    N_MEAL_STATE,
    P_BW,
    P_KA1,
    P_KA2,
    P_KD,
    P_KP3,
    P_M1,
    P_M2,
    P_M4,
    P_M30,
    P_VG,
    P_VMX,
    advance,
)

ForecastInsulin = Literal["held", "scheduled"]

#: Index of ``θ = ln(insulin-sensitivity scale)`` in the filter state.
I_THETA = N_STATES
#: Index of the correlated CGM error ``e`` (mg/dL) in the filter state.
I_CGM_ERR = N_STATES + 1
#: Length of the filter state.
N_AUG = N_STATES + 2

# Model state indices used here (see plant.patients.PatientParameters).
_Q_STO1, _Q_STO2, _Q_GUT, _G_P, _G_T, _I_P, _X, _I_1, _I_D, _I_L, _I_SC1, _I_SC2, _G_S = range(13)
#: Model states that may go negative: only the insulin action on utilisation ``X``.
_NONNEGATIVE = np.array([j for j in range(N_STATES) if j != _X])

_MIN_PER_DAY = 1440.0
_EAT_RATE_G_PER_MIN = 5.0

# Unscented transform: alpha = 1, beta = 2, kappa = 0 (sigma points at ±√n standard deviations,
# zero weight of the centre point in the mean, non-negative covariance weights).
_ALPHA, _BETA, _KAPPA = 1.0, 2.0, 0.0


class TwinInputError(AgentError, ValueError):
    """A call the estimator cannot serve (e.g. an estimate for a time before the filter's)."""


def _number(field: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """Validate a finite real in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    allowed = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise LoopConfigError(field, value, allowed)
    out = float(value)
    if not math.isfinite(out) or out < lo or out > hi or (lo_open and out == lo):
        raise LoopConfigError(field, value, allowed)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class TwinConfig:
    """Noise model, adaptation and forecasts of the twin estimator (validated once).

    Noise figures are standard deviations; "per √min" figures are those of a random walk (the
    variance grows by their square each minute).

    Attributes:
        cgm_error_sd_mg_dl: stationary SD of the correlated CGM error ``e``, mg/dL; > 0.
            11.7 mg/dL is that of :mod:`plant.cgm`'s default (Breton-Kovatchev) sensor.
        cgm_error_correlation: correlation of ``e`` at a lag of ``cgm_error_lag_min``, in
            ``[0, 1)`` (0.7 at 15 min for that sensor; 0 makes the error white).
        cgm_error_lag_min: the lag at which ``cgm_error_correlation`` holds, minutes; > 0.
        cgm_white_noise_sd_mg_dl: SD of the uncorrelated part of the CGM error, mg/dL; > 0.
        cgm_min_mg_dl: lowest reading the CGM reports, mg/dL (readings there are censored).
        cgm_max_mg_dl: highest reading the CGM reports, mg/dL; > ``cgm_min_mg_dl``.
        glucose_process_sd_mg_dl_per_sqrt_min: random walk on plasma glucose ``G_p`` (mg/dL
            per √min; a tenth of it on ``G_t`` and ``G_s``): what the model does not explain.
        gut_process_rel_sd_per_sqrt_min: relative random walk on ``q_sto2`` and ``q_gut``
            (fraction of their content per √min): variability of gastric emptying/absorption.
        insulin_process_rel_sd_per_sqrt_min: relative random walk on the subcutaneous insulin
            depots ``I_sc1``, ``I_sc2`` (fraction per √min): variability of absorption.
        meal_size_rel_sd: SD of the counting error of announced carbohydrates, as a fraction
            of the announced grams (0.2 = 20 %; uniform ±30 % errors have an SD of 0.17).
        initial_glucose_sd_mg_dl: initial SD of the glucose states (plasma, tissue and
            subcutaneous move together), mg/dL.
        initial_insulin_rel_sd: initial relative SD of the insulin states.
        sensitivity_prior_sd: initial SD of ``θ = ln s`` (log units; 0.3 ≈ ±35 %).
        sensitivity_rate_per_sqrt_day: the adaptation rate: random walk of ``θ``, log units
            per √day; 0 freezes the scale after the prior.
        sensitivity_min_scale: lowest insulin-sensitivity scale ``s`` the filter may reach.
        sensitivity_max_scale: highest scale; ``min < 1 < max``.
        forecast_horizons_min: forecast horizons, whole minutes in ``[1, 1440]``, increasing;
            must include 30 and 60 (the fields of :class:`~agents.messages.TwinEstimate`).
        forecast_insulin: insulin assumed after the newest delivery seen: ``"held"`` (its
            basal rate goes on, as the pump does during a temp basal) or ``"scheduled"``.

    Raises:
        LoopConfigError: a field outside what is allowed (the error names it).

    """

    cgm_error_sd_mg_dl: float = 11.7
    cgm_error_correlation: float = 0.7
    cgm_error_lag_min: float = 15.0
    cgm_white_noise_sd_mg_dl: float = 2.0
    cgm_min_mg_dl: float = 40.0
    cgm_max_mg_dl: float = 400.0
    glucose_process_sd_mg_dl_per_sqrt_min: float = 0.5
    gut_process_rel_sd_per_sqrt_min: float = 0.01
    insulin_process_rel_sd_per_sqrt_min: float = 0.005
    meal_size_rel_sd: float = 0.2
    initial_glucose_sd_mg_dl: float = 20.0
    initial_insulin_rel_sd: float = 0.1
    sensitivity_prior_sd: float = 0.3
    sensitivity_rate_per_sqrt_day: float = 0.1
    sensitivity_min_scale: float = 0.25
    sensitivity_max_scale: float = 4.0
    forecast_horizons_min: tuple[int, ...] = (30, 60)
    forecast_insulin: ForecastInsulin = "held"

    def __post_init__(self) -> None:
        ranges: dict[str, tuple[float, float, bool]] = {
            "cgm_error_sd_mg_dl": (0.0, 200.0, True),
            "cgm_error_correlation": (0.0, 0.999, False),
            "cgm_error_lag_min": (0.0, 1440.0, True),
            "cgm_white_noise_sd_mg_dl": (0.0, 200.0, True),
            "cgm_min_mg_dl": (0.0, 1000.0, False),
            "cgm_max_mg_dl": (0.0, 2000.0, True),
            "glucose_process_sd_mg_dl_per_sqrt_min": (0.0, 100.0, False),
            "gut_process_rel_sd_per_sqrt_min": (0.0, 1.0, False),
            "insulin_process_rel_sd_per_sqrt_min": (0.0, 1.0, False),
            "meal_size_rel_sd": (0.0, 2.0, False),
            "initial_glucose_sd_mg_dl": (0.0, 500.0, True),
            "initial_insulin_rel_sd": (0.0, 5.0, True),
            "sensitivity_prior_sd": (0.0, 2.0, False),
            "sensitivity_rate_per_sqrt_day": (0.0, 2.0, False),
            "sensitivity_min_scale": (0.0, 1.0, True),
            "sensitivity_max_scale": (1.0, 100.0, False),
        }
        for name, (lo, hi, lo_open) in ranges.items():
            object.__setattr__(
                self, name, _number(name, getattr(self, name), lo, hi, lo_open=lo_open)
            )
        if not self.cgm_max_mg_dl > self.cgm_min_mg_dl:
            raise LoopConfigError(
                "cgm_max_mg_dl", self.cgm_max_mg_dl, f"> cgm_min_mg_dl={self.cgm_min_mg_dl:g}"
            )
        if not self.sensitivity_min_scale < 1.0 < self.sensitivity_max_scale:
            raise LoopConfigError(
                "sensitivity_max_scale",
                self.sensitivity_max_scale,
                f"> 1 > sensitivity_min_scale={self.sensitivity_min_scale:g}",
            )
        self._check_horizons()
        if self.forecast_insulin not in ("held", "scheduled"):
            raise LoopConfigError(
                "forecast_insulin", self.forecast_insulin, "'held' or 'scheduled'"
            )

    def _check_horizons(self) -> None:
        allowed = "increasing whole minutes in [1, 1440] that include 30 and 60"
        raw = self.forecast_horizons_min
        try:
            values = tuple(raw)
        except TypeError:
            raise LoopConfigError("forecast_horizons_min", raw, allowed) from None
        ok = all(
            not isinstance(h, bool)
            and isinstance(h, int | float | np.integer | np.floating)
            and math.isfinite(float(h))
            and float(h) == round(float(h))
            and 1 <= h <= 1440
            for h in values
        )
        hours = tuple(int(h) for h in values) if ok else ()
        if not ok or 30 not in hours or 60 not in hours or list(hours) != sorted(set(hours)):
            raise LoopConfigError("forecast_horizons_min", raw, allowed)
        object.__setattr__(self, "forecast_horizons_min", hours)

    @property
    def cgm_error_phi_per_min(self) -> float:
        """AR(1) coefficient of the CGM error per minute: ``correlation^(1/lag)``."""
        return float(self.cgm_error_correlation ** (1.0 / self.cgm_error_lag_min))


def _whole_minute(field: str, t_min: float) -> int:
    """Round a message time to the model's minute grid (tolerance 1e-6 min)."""
    m = round(t_min)
    if abs(t_min - m) > 1e-6:
        raise TwinInputError(f"{field}={t_min!r}: the twin runs on whole minutes")
    return int(m)


class TwinEstimator:
    """Unscented Kalman filter on one patient's UVA/Padova model (see the module docstring).

    Inputs: :class:`~agents.messages.InsulinDelivery` every minute (``observe_delivery``),
    :class:`~agents.messages.MealAnnouncement` (``observe_meal``), every
    :class:`~agents.messages.CgmReading` (``update``). Output: :class:`TwinEstimate`
    (``estimate``). Rate: one update per CGM reading (5 min); messages must arrive in time
    order, all on whole minutes.

    Args:
        patient: the patient whose model the twin runs (the plant's parameters).
        config: noise model, adaptation and forecasts; ``None`` for the defaults.
        t0_min: loop time of the initial state (the patient's table steady state), minutes.
        scheduled_basal_u_per_h: the basal that counts as zero insulin on board and the
            insulin assumed before any delivery is seen; default the patient's basal.

    Raises:
        LoopConfigError: ``scheduled_basal_u_per_h`` is negative or not finite.

    """

    def __init__(
        self,
        patient: PatientParameters,
        config: TwinConfig | None = None,
        *,
        t0_min: float = 0.0,
        scheduled_basal_u_per_h: float | None = None,
    ) -> None:
        cfg = TwinConfig() if config is None else config
        self.patient = patient
        self.config = cfg
        basal_u_per_h = patient.basal_u_per_h if scheduled_basal_u_per_h is None else (
            _number("scheduled_basal_u_per_h", scheduled_basal_u_per_h, 0.0, 1000.0)
        )  # fmt: skip
        self._scheduled_u_per_min = basal_u_per_h / 60.0
        self._params = parameter_matrix([patient])
        p = self._params[0]
        self._vg = float(p[P_VG])
        self._bw = float(p[P_BW])
        self._vmx = float(p[P_VMX])
        self._kp3 = float(p[P_KP3])
        self._theta_lo = math.log(cfg.sensitivity_min_scale)
        self._theta_hi = math.log(cfg.sensitivity_max_scale)
        self._phi = cfg.cgm_error_phi_per_min
        self._insulin_ss_pmol_kg = self._steady_insulin(self._scheduled_u_per_min)

        # Unscented weights and the sigma points that need the model (all but the two that
        # differ from the mean only in the CGM error, the last state).
        n = N_AUG
        lam = _ALPHA**2 * (n + _KAPPA) - n
        self._spread = math.sqrt(n + lam)
        self._wm = np.full(2 * n + 1, 0.5 / (n + lam))
        self._wc = self._wm.copy()
        self._wm[0] = lam / (n + lam)
        self._wc[0] = lam / (n + lam) + (1.0 - _ALPHA**2 + _BETA)
        skip = {1 + I_CGM_ERR, 1 + n + I_CGM_ERR}
        self._model_rows = np.array([i for i in range(2 * n + 1) if i not in skip])
        self._copy_rows = np.array(sorted(skip))
        rows = self._model_rows.shape[0]
        self._row_params = np.repeat(self._params, rows, axis=0)
        self._row_rate = np.full(rows, _EAT_RATE_G_PER_MIN)
        self._one_rate = np.full(1, _EAT_RATE_G_PER_MIN)
        self._h = np.zeros(n)
        self._h[_G_S] = 1.0 / self._vg
        self._h[I_CGM_ERR] = 1.0
        self._r = cfg.cgm_white_noise_sd_mg_dl**2
        self._q_min, self._q_rel = self._process_noise_parts()

        self._t = _whole_minute("t0_min", t0_min)
        x = np.zeros(n)
        x[:N_STATES] = patient.x0
        self._x = x
        self._p = self._initial_covariance()
        self._meal_state = np.zeros((1, N_MEAL_STATE))
        self._meals: dict[int, float] = {}  # start minute → announced grams, not yet eaten
        self._deliveries: dict[int, float] = {}  # minute → units, not yet propagated
        self._held_u_per_min = self._scheduled_u_per_min
        self._held_from = self._t - 1  # minute of the newest delivery seen
        self._meal_var_mg2 = 0.0  # counting-error variance of meals still being swallowed
        self.ignored: dict[str, int] = {"reading": 0, "delivery": 0, "meal": 0}
        self.readings_fused = 0

    # --- public interface ------------------------------------------------------------------

    @property
    def t_min(self) -> float:
        """Loop time of the filter's state (the newest reading fused), minutes."""
        return float(self._t)

    @property
    def state_mean(self) -> NDArray[np.float64]:
        """A copy of the filter's mean, shape ``(15,)`` (see the module docstring)."""
        return self._x.copy()

    @property
    def covariance(self) -> NDArray[np.float64]:
        """A copy of the filter's covariance, shape ``(15, 15)``."""
        return self._p.copy()

    @property
    def sensitivity_scale(self) -> float:
        """Estimated insulin-sensitivity scale ``exp(θ)`` (1 = the table patient)."""
        return math.exp(self._x[I_THETA])

    def observe_delivery(self, delivery: InsulinDelivery) -> bool:
        """Account the insulin delivered over ``[t_min, t_min + 1)``.

        Returns:
            ``False`` when the delivery is ignored: its minute is already behind the filter
            (late), or its units are negative or not finite.

        """
        m = _whole_minute("delivery.t_min", delivery.t_min)
        basal, bolus = float(delivery.basal_u), float(delivery.bolus_u)
        if m < self._t or not (math.isfinite(basal) and math.isfinite(bolus)):
            self.ignored["delivery"] += 1
            return False
        if basal < 0.0 or bolus < 0.0:
            self.ignored["delivery"] += 1
            return False
        self._deliveries[m] = self._deliveries.get(m, 0.0) + basal + bolus
        if m >= self._held_from:
            self._held_u_per_min, self._held_from = basal, m
        return True

    def observe_meal(self, meal: MealAnnouncement) -> bool:
        """Account an announced meal starting at ``meal.t_min`` (eaten at 5 g/min from then).

        A meal announced for a minute the filter has passed starts at the filter's minute.

        Returns:
            ``False`` when ignored: grams negative or not finite.

        """
        m = _whole_minute("meal.t_min", meal.t_min)
        grams = float(meal.carbs_g)
        if not (math.isfinite(grams) and grams >= 0.0):
            self.ignored["meal"] += 1
            return False
        if grams > 0.0:
            m = max(m, self._t)
            self._meals[m] = self._meals.get(m, 0.0) + grams
        return True

    def update(self, reading: CgmReading) -> bool:
        """Propagate the filter to the reading's time and fuse the reading.

        Returns:
            ``True`` when the reading was fused; ``False`` when it was ignored (older than the
            filter, not finite, or censored at a clipping limit the prediction is beyond).

        """
        z = float(reading.glucose_mg_dl)
        m = _whole_minute("reading.t_min", reading.t_min)
        if m < self._t or not math.isfinite(z):
            self.ignored["reading"] += 1
            return False
        self._predict(m)
        x, p, h = self._x, self._p, self._h
        zhat = float(h @ x)
        cfg = self.config
        if (z <= cfg.cgm_min_mg_dl and zhat <= cfg.cgm_min_mg_dl) or (
            z >= cfg.cgm_max_mg_dl and zhat >= cfg.cgm_max_mg_dl
        ):
            return False  # censored: the reading only says "beyond the limit", as predicted
        ph = p @ h
        s = float(h @ ph) + self._r
        k = ph / s
        x += k * (z - zhat)
        a = np.eye(N_AUG) - np.outer(k, h)
        p = a @ p @ a.T + self._r * np.outer(k, k)
        self._p = 0.5 * (p + p.T)
        self._clip(x)
        self.readings_fused += 1
        return True

    def estimate(self, t_min: float) -> TwinEstimate:
        """The twin's view at ``t_min`` (>= the filter's time): glucose, IOB, COB, forecasts.

        Raises:
            TwinInputError: ``t_min`` is before the filter's time or not a whole minute.

        """
        hs = self.config.forecast_horizons_min
        m, states, bg = self._mean_trajectory(t_min, hs[-1])
        lead = m - self._t
        xm = states[lead]
        return TwinEstimate(
            t_min=float(m),
            bg_mg_dl=float(bg[lead]),
            iob_u=self._net_iob_u(xm),
            cob_g=self._cob_g(xm, lead),
            insulin_sensitivity_scale=self.sensitivity_scale,
            forecast_30_mg_dl=float(bg[lead + 30]),
            forecast_60_mg_dl=float(bg[lead + 60]),
        )

    def forecast(self, t_min: float, horizon_min: int | None = None) -> NDArray[np.float64]:
        """Predicted plasma glucose at ``t_min + 0, 1, …, horizon_min`` minutes, mg/dL.

        Args:
            t_min: start of the forecast (>= the filter's time), minutes.
            horizon_min: whole minutes ahead; default the longest configured horizon.

        Raises:
            TwinInputError: ``t_min`` before the filter's time, or a bad horizon.

        """
        h = self.config.forecast_horizons_min[-1] if horizon_min is None else horizon_min
        if isinstance(h, bool) or not isinstance(h, int | np.integer) or not 0 <= h <= 10_080:
            raise TwinInputError(
                f"horizon_min={horizon_min!r}: must be whole minutes in [0, 10080]"
            )
        m, _, bg = self._mean_trajectory(t_min, int(h))
        return bg[m - self._t :].copy()

    # --- internals -------------------------------------------------------------------------

    def _steady_insulin(self, u_per_min: float) -> float:
        """``I_sc1 + I_sc2 + I_p + I_l`` (pmol/kg) in the steady state of a basal (U/min)."""
        p = self._params[0]
        u = u_per_min * PMOL_PER_U / self._bw
        ka1, ka2, kd = p[P_KA1], p[P_KA2], p[P_KD]
        m1, m2, m4, m30 = p[P_M1], p[P_M2], p[P_M4], p[P_M30]
        isc1 = u / (ka1 + kd)
        isc2 = kd * isc1 / ka2
        ip = u / ((m2 + m4) - m1 * m2 / (m1 + m30))
        il = m2 * ip / (m1 + m30)
        return float(isc1 + isc2 + ip + il)

    def _net_iob_u(self, x: NDArray[np.float64]) -> float:
        mass = x[_I_SC1] + x[_I_SC2] + x[_I_P] + x[_I_L] - self._insulin_ss_pmol_kg
        return float(mass * self._bw / PMOL_PER_U)

    def _cob_g(self, x: NDArray[np.float64], lead: int) -> float:
        gut_g = (x[_Q_STO1] + x[_Q_STO2] + x[_Q_GUT]) / MG_PER_G
        # grams announced but not yet swallowed at the estimate's time (approximate when the
        # estimate is ahead of the filter: eaten at 5 g/min meanwhile)
        left = self._meal_state[0, M_PLANNED_G] + sum(
            g for s, g in self._meals.items() if s <= self._t + lead
        )
        left = max(0.0, left - _EAT_RATE_G_PER_MIN * lead) if lead else left
        return float(gut_g + left)

    def _process_noise_parts(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per-minute process variance: an absolute part and relative SDs (× the mean)."""
        cfg = self.config
        x0 = np.asarray(self.patient.x0)
        q = np.zeros(N_AUG)
        sd_g = cfg.glucose_process_sd_mg_dl_per_sqrt_min * self._vg
        q[_G_P] = sd_g**2
        q[_G_T] = (0.1 * sd_g) ** 2
        q[_G_S] = (0.1 * sd_g) ** 2
        q[I_THETA] = cfg.sensitivity_rate_per_sqrt_day**2 / _MIN_PER_DAY
        # a floor keeps every direction positive (1 mg in the gut, 1e-3 of basal insulin
        # levels, 0.01 mg/dL of glucose, per √min)
        floor = np.zeros(N_AUG)
        floor[[_Q_STO1, _Q_STO2, _Q_GUT]] = 1.0
        floor[_I_P:_G_S] = 1e-3 * np.maximum(np.abs(x0[_I_P:_G_S]), 1.0)
        floor[[_G_P, _G_T, _G_S]] = 0.01 * self._vg
        floor[I_THETA] = 1e-5
        q += floor**2
        rel = np.zeros(N_AUG)
        rel[[_Q_STO2, _Q_GUT]] = cfg.gut_process_rel_sd_per_sqrt_min
        rel[[_I_SC1, _I_SC2]] = cfg.insulin_process_rel_sd_per_sqrt_min
        return q, rel

    def _initial_covariance(self) -> NDArray[np.float64]:
        cfg = self.config
        x0 = np.asarray(self.patient.x0)
        p = np.diag(self._q_min.copy())
        # glucose: one common level (plasma, tissue, subcutaneous) plus a fifth independently
        sd = cfg.initial_glucose_sd_mg_dl * self._vg
        v = np.zeros(N_AUG)
        v[_G_P] = v[_G_S] = sd
        v[_G_T] = sd * x0[_G_T] / x0[_G_P]
        p += np.outer(v, v)
        p[[_G_P, _G_T, _G_S], [_G_P, _G_T, _G_S]] += (0.2 * v[[_G_P, _G_T, _G_S]]) ** 2
        ins = np.arange(_I_P, _G_S)
        scale = np.abs(x0[ins])
        scale[ins == _X] = x0[_I_1]  # X is 0 at steady state: use the insulin level's scale
        p[ins, ins] += (cfg.initial_insulin_rel_sd * scale) ** 2
        p[I_THETA, I_THETA] += cfg.sensitivity_prior_sd**2
        p[I_CGM_ERR, I_CGM_ERR] = cfg.cgm_error_sd_mg_dl**2
        return p

    def _clip(self, x: NDArray[np.float64]) -> None:
        """Clip states in place (last axis): model non-negativity and the sensitivity range."""
        x[..., _NONNEGATIVE] = np.maximum(x[..., _NONNEGATIVE], 0.0)
        x[..., I_THETA] = np.clip(x[..., I_THETA], self._theta_lo, self._theta_hi)

    def _cholesky(self, p: NDArray[np.float64]) -> NDArray[np.float64]:
        """Lower Cholesky factor; repairs a covariance that lost positive definiteness."""
        try:
            return np.linalg.cholesky(p)
        except np.linalg.LinAlgError:
            w, v = np.linalg.eigh(0.5 * (p + p.T))
            w = np.maximum(w, 1e-9 * max(float(w.max()), 1e-12))
            self._p = (v * w) @ v.T
            self._p = 0.5 * (self._p + self._p.T) + np.diag(self._q_min)
            return np.linalg.cholesky(self._p)

    def _inputs(self, k: int, rows: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Insulin (U/min) and meal starts (g) over the next ``k`` minutes, ``(rows, k)`` each.

        A minute without an observed delivery gets the held basal rate (the basal part of the
        newest delivery seen) if it is not after that delivery or ``forecast_insulin`` is
        ``"held"``, else the scheduled basal.
        """
        insulin = np.empty((rows, k))
        meal = np.zeros((rows, k))
        t0 = self._t
        held = self._held_u_per_min
        after = self._scheduled_u_per_min if self.config.forecast_insulin == "scheduled" else held
        deliveries = self._deliveries
        for j in range(k):
            u = deliveries.get(t0 + j)
            if u is None:
                u = held if t0 + j <= self._held_from else after
            insulin[:, j] = u
        for start, grams in self._meals.items():
            if start < t0 + k:
                meal[:, max(start - t0, 0)] += grams
        return insulin, meal

    def _sigma_points(self) -> NDArray[np.float64]:
        l_chol = self._cholesky(self._p) * self._spread
        x = self._x
        pts = np.empty((2 * N_AUG + 1, N_AUG))
        pts[0] = x
        pts[1 : N_AUG + 1] = x + l_chol.T
        pts[N_AUG + 1 :] = x - l_chol.T
        self._clip(pts)
        return pts

    def _predict(self, t_to: int) -> None:
        """Propagate mean and covariance from the filter's minute to ``t_to``."""
        k = t_to - self._t
        if k <= 0:
            return
        pts = self._sigma_points()
        rows = self._model_rows
        n_rows = rows.shape[0]
        xs = np.ascontiguousarray(pts[rows, :N_STATES])
        scale = np.exp(pts[rows, I_THETA])
        params = self._row_params
        params[:, P_VMX] = self._vmx * scale
        params[:, P_KP3] = self._kp3 * scale
        meal_state = np.repeat(self._meal_state, n_rows, axis=0)
        insulin, meal = self._inputs(k, n_rows)
        eaten_g = float(meal[0].sum())
        carbs = np.empty((n_rows, k))
        advance(
            xs, meal_state, params, insulin, meal, self._row_rate, carbs_out=carbs, parallel=False
        )
        pts[rows, :N_STATES] = xs
        pts[self._copy_rows, :N_STATES] = xs[0]
        decay = self._phi**k
        pts[:, I_CGM_ERR] *= decay
        self._meal_state = meal_state[:1].copy()

        x = self._wm @ pts
        d = pts - x
        p = (d.T * self._wc) @ d
        q = self._q_min + (self._q_rel * x) ** 2
        q[I_CGM_ERR] = self.config.cgm_error_sd_mg_dl**2 * (1.0 - decay**2)
        q[:I_CGM_ERR] *= k
        p[np.diag_indices(N_AUG)] += q

        # counting error of the meals swallowed: a scale error on the stomach and gut contents
        if eaten_g > 0.0:
            self._meal_var_mg2 += (self.config.meal_size_rel_sd * eaten_g * MG_PER_G) ** 2
        if self._meal_var_mg2 > 0.0 and self._meal_state[0, M_PLANNED_G] <= 0.0:
            gut = np.maximum(x[_Q_STO1 : _Q_GUT + 1], 0.0)
            total = float(gut.sum())
            if total > 0.0:
                u = gut / total
                p[_Q_STO1 : _Q_GUT + 1, _Q_STO1 : _Q_GUT + 1] += self._meal_var_mg2 * np.outer(u, u)
            self._meal_var_mg2 = 0.0

        self._clip(x)
        self._x = x
        self._p = 0.5 * (p + p.T)
        for m in [m for m in self._deliveries if m < t_to]:
            del self._deliveries[m]
        for m in [m for m in self._meals if m < t_to]:
            del self._meals[m]
        self._t = t_to

    def _mean_trajectory(
        self, t_min: float, horizon: int
    ) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
        """Propagate the mean from the filter's minute to ``t_min + horizon``.

        Returns:
            ``(m, states, bg)``: ``t_min`` as a minute, the states ``(K+1, 13)`` and plasma
            glucose ``(K+1,)`` (mg/dL) at the filter's minute + 0 … K.

        """
        m = _whole_minute("t_min", t_min)
        if m < self._t:
            raise TwinInputError(
                f"t_min={t_min!r}: before the filter's time {self._t} min; estimates cannot "
                "look back"
            )
        k = m - self._t + horizon
        x = self._x[:N_STATES].reshape(1, N_STATES).copy()
        params = self._params.copy()
        scale = self.sensitivity_scale
        params[0, P_VMX] = self._vmx * scale
        params[0, P_KP3] = self._kp3 * scale
        meal_state = self._meal_state.copy()
        states = np.empty((1, k + 1, N_STATES))
        if k == 0:
            states[0, 0] = x[0]
        else:
            insulin, meal = self._inputs(k, 1)
            advance(
                x, meal_state, params, insulin, meal, self._one_rate,
                carbs_out=np.empty((1, k)), states_out=states, parallel=False,
            )  # fmt: skip
        return m, states[0], states[0, :, _G_P] / self._vg
