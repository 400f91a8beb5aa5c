"""The twin estimator: an unscented Kalman filter on this patient's UVA/Padova model.

The twin is an estimator, not a copy (see ``DESIGN.md``): it keeps the 13 states of the
patient's UVA/Padova 2008 model (:mod:`twinloop.plant.glucose.uva_padova`, same parameters as the
plant's patient) in sync with the CGM, fed with the insulin the pump actually delivered and the
meals the patient announced, adapts the patient's insulin sensitivity and endogenous glucose
production slowly, detects carbohydrates nobody announced, and forecasts plasma glucose. Its
model need not be the patient's own: a population model at the person's clinical settings is
what the two scales and the meal disturbance make up for.

Filter state (16 values)
------------------------
======  ==================================================================  ===========
index   meaning                                                             unit
======  ==================================================================  ===========
0-12    the model's states, in :class:`~twinloop.plant.glucose.patients.        as there
        PatientParameters` order (``q_sto1`` … ``g_s``)
13      ``θ = ln s``: log of the insulin-sensitivity scale ``s``, which      -
        multiplies ``Vmx`` (insulin-dependent utilisation) and ``kp3``
        (insulin action on the liver); a random walk
14      ``η = ln r``: log of the endogenous-glucose-production scale ``r``,  -
        which multiplies ``kp1`` (the liver's production at zero glucose
        and insulin, so the glucose the model settles at on a basal); a
        random walk
15      ``e``: the correlated part of the CGM error, an AR(1) process        mg/dL
======  ==================================================================  ===========

Prediction (the unscented part)
-------------------------------
Between two readings the ``2·16 + 1`` sigma points (``α = 1, β = 2, κ = 0``: ``±√16`` standard
deviations along the columns of the Cholesky factor of the covariance) are propagated with the
compiled model, all of them in one :func:`twinloop.plant.glucose.uva_padova.advance` call per
reading interval (``K`` minutes, inputs held per minute), each with its own ``Vmx·s``, ``kp3·s``
and ``kp1·r``. The two sigma points that differ from the mean only in the CGM error ``e`` have
the mean's model trajectory, so 31 rows are integrated. ``e`` decays by ``φ^K`` with
``φ = correlation^(1/lag)`` per minute. Process noise is added per minute (see
:class:`EstimatorConfig`): a random walk on plasma glucose, relative noise on the gut and the
subcutaneous insulin depots, the random walks of ``θ`` and ``η`` and the exact AR(1) noise of
``e``.

Unannounced meals: the *meal gate* watches how much the updates had to raise plasma glucose
(``G_p/V_g`` after minus before the update, smoothed as ``g ← memory·g + correction``); while
``g`` exceeds ``meal_gate_threshold_mg_dl`` (an unexplained rise; never during the first 12
readings, the start's transient) an absolute variance of ``unannounced_meal_sd_g_per_sqrt_min²
· K`` enters ``q_sto2`` and ``q_gut`` at the start of each reading interval, so the sigma points
carry a possible meal through the model and the next readings decide how much carbohydrate
arrived. What the updates put into the stomach and gut is counted as carbohydrate beyond the
announcements (``unannounced_carbs_g``, kept between 0 and the gut's content, absorbed in
proportion with the rest of the gut; ``detected_carbs_g`` the running total).

Inputs: insulin delivered in minute ``m`` (``observe_delivery``) is held over ``[m, m+1)``. A
minute with no delivery observed gets the *held* rate, the basal part of the newest delivery
seen (the scheduled basal before any), up to that delivery's minute; after it, the held rate
or the scheduled basal, as ``forecast_insulin`` says. Announced meals (``observe_meal``) are
eaten by the model at 5 g/min from their start minute, like the plant's meals. Since the grams
are counted with error, once a meal has been swallowed the filter adds
``(meal_size_rel_sd · grams)²`` of variance along the direction of the stomach and gut
contents (a fully correlated scale error on what was swallowed), so the CGM decides how big
the meal really was.

Sigma points are clipped at 0 in the model states that must stay non-negative (all but the
insulin action ``X``); ``θ`` and ``η`` are not clipped in the sigma points (``exp > 0`` anyway).

Update
------
The measurement is ``CGM = G_s/V_g + e + v`` with white ``v`` (``cgm_white_noise_sd_mg_dl``).
It is linear in the state, so the update is the exact Kalman update, in Joseph form, then
symmetrised; the mean is clipped at 0 where the model requires it and its ``θ`` to the
configured sensitivity range and its ``η`` to the EGP range (after the prediction and after the
update). Readings at the
device's clipping limits are censored: fused only when the prediction lies inside the range,
except that at the ceiling a prediction beyond ``censored_high_bound_mg_dl`` is fused as a
reading *at that bound* (a pseudo-measurement, the usual way of holding a Kalman filter to an
inequality constraint; counted in :attr:`TwinEstimator.held_at_bound`).
Stale (older than the filter), late and non-finite messages are ignored and counted in
:attr:`TwinEstimator.ignored`, so a faulty channel cannot crash the estimator.

Outputs
-------
:meth:`TwinEstimator.estimate` propagates the mean (the model with the mean scales)
from the newest reading to the requested time and on over the forecast horizons, with the
insulin delivered where known and afterwards the held basal rate or the scheduled basal
(``forecast_insulin``), no further bolus, and no meals beyond those announced (announced meals
that have not started yet are included):

* ``bg_mg_dl``: plasma glucose ``G_p/V_g``;
* ``iob_u``: **net insulin on board from the model's insulin states**: the insulin in the
  subcutaneous depots, plasma and liver (``I_sc1 + I_sc2 + I_p + I_l``, pmol/kg, × body weight
  / 6000 pmol/U) minus the same sum in the steady state of the scheduled basal. Like the loop's
  :class:`twinloop.plant.glucose.insulin.IobTracker` it is 0 on the scheduled basal and negative
  during a suspension, but it is the model's insulin mass, not the oref0 activity curve;
* ``cob_g``: carbohydrates in the stomach and gut (``q_sto1 + q_sto2 + q_gut``) plus the grams
  of the current meal not yet swallowed;
* ``insulin_sensitivity_scale``: ``exp(θ)`` (the median of the log-normal estimate);
* ``egp_scale``: ``exp(η)``;
* ``unannounced_carbs_g``: the detected carbohydrates on board beyond the announced;
* ``forecast_30_mg_dl`` / ``forecast_60_mg_dl``: plasma glucose 30 and 60 minutes ahead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numba
import numpy as np
from numpy.typing import NDArray

import twinloop.plant.glucose.uva_padova
from twinloop.agents.errors import AgentError, LoopConfigError
from twinloop.agents.messages import CgmReading, InsulinDelivery, MealAnnouncement, TwinEstimate
from twinloop.plant.glucose.patients import (
    N_STATES,
    PMOL_PER_U,
    PatientParameters,
    parameter_matrix,
)
from twinloop.plant.glucose.uva_padova import (
    M_PLANNED_G,
    MG_PER_G,
    N_MEAL_STATE,
    P_BW,
    P_KA1,
    P_KA2,
    P_KD,
    P_KP1,
    P_KP3,
    P_M1,
    P_M2,
    P_M4,
    P_M30,
    P_VG,
    P_VI,
    P_VMX,
    advance,
)
from twinloop.plant.numba_cache import drop_stale_cache
from twinloop.plant.units import MIN_PER_DAY
from twinloop.policies.glucose.interface import TwinPlanState

drop_stale_cache(__file__, [twinloop.plant.glucose.uva_padova.__file__])

ForecastInsulin = Literal["held", "scheduled"]

#: Index of ``θ = ln(insulin-sensitivity scale)`` in the filter state.
I_THETA = N_STATES
#: Index of ``η = ln(EGP scale)`` (the scale of ``kp1``) in the filter state.
I_EGP = N_STATES + 1
#: Index of the correlated CGM error ``e`` (mg/dL) in the filter state.
I_CGM_ERR = N_STATES + 2
#: Length of the filter state.
N_AUG = N_STATES + 3

# Model state indices used here (see twinloop.plant.glucose.patients.PatientParameters).
_Q_STO1, _Q_STO2, _Q_GUT, _G_P, _G_T, _I_P, _X, _I_1, _I_D, _I_L, _I_SC1, _I_SC2, _G_S = range(13)

_EAT_RATE_G_PER_MIN = 5.0
#: readings fused before the meal gate may open (the start's transient is not a meal)
_GATE_WARMUP_READINGS = 12

# Unscented transform: alpha = 1, beta = 2, kappa = 0 (sigma points at ±√n standard deviations,
# zero weight of the centre point in the mean, non-negative covariance weights).
_ALPHA, _BETA, _KAPPA = 1.0, 2.0, 0.0


class EstimatorInputError(AgentError, ValueError):
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
class EstimatorConfig:
    """Noise model, adaptation and forecasts of the twin estimator (validated once).

    Noise figures are standard deviations; "per √min" figures are those of a random walk (the
    variance grows by their square each minute).

    Attributes:
        cgm_error_sd_mg_dl: stationary SD of the correlated CGM error ``e``, mg/dL; > 0.
            11.7 mg/dL is that of :mod:`twinloop.plant.glucose.cgm`'s default (Breton-Kovatchev)
            sensor.
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
        egp_prior_sd: initial SD of ``η = ln r``, the EGP scale on ``kp1`` (log units; 0.1 ≈
            ±10 % of ``kp1``, about ±20 % of the basal production); 0 with a rate of 0 freezes it.
        egp_rate_per_sqrt_day: random walk of ``η``, log units per √day. 0 by default: the
            EGP scale is estimated from its prior in the first hours and then held. A
            drifting EGP scale (0.05/√day) absorbed unannounced meals as production and the
            MPC stacked insulin on it: on fitted twins with 20 % of meals unannounced, adult#009
            went below 54 mg/dL in 2 of 30 adult runs; held, none (TIR 91.1 → 90.5 %).
        egp_min_scale: lowest EGP scale ``r``, in (0, 1).
        egp_max_scale: highest EGP scale, > 1.
        meal_detection: whether the filter estimates carbohydrates nobody announced (the meal
            gate and disturbance of the module docstring).
        unannounced_meal_sd_g_per_sqrt_min: while the meal gate is open, the absolute random
            walk on ``q_sto2`` and on ``q_gut``, grams per √min.
        meal_gate_memory: smoothing of the gate's signal per reading, in ``[0, 0.99]``.
        meal_gate_threshold_mg_dl: the gate opens above this smoothed upward correction of
            plasma glucose, mg/dL.
        forecast_horizons_min: forecast horizons, whole minutes in ``[1, 1440]``, increasing;
            must include 30 and 60 (the fields of :class:`~twinloop.agents.messages.TwinEstimate`).
        forecast_insulin: insulin assumed after the newest delivery seen: ``"held"`` (its
            basal rate goes on, as the pump does during a temp basal) or ``"scheduled"``.
        censored_high_bound_mg_dl: while the CGM sits at its ceiling, the highest glucose
            the filter may believe, mg/dL (> ``cgm_max_mg_dl``): a prediction beyond it is
            pulled back by a pseudo-measurement at the bound. Without it a filter that had
            filled the gut to explain the climb to the ceiling ran on to 2,900 mg/dL while
            the child's plasma glucose was 500.

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
    egp_prior_sd: float = 0.1
    egp_rate_per_sqrt_day: float = 0.0
    egp_min_scale: float = 0.6
    egp_max_scale: float = 1.6
    meal_detection: bool = True
    unannounced_meal_sd_g_per_sqrt_min: float = 15.0
    meal_gate_memory: float = 0.8
    meal_gate_threshold_mg_dl: float = 8.0
    forecast_horizons_min: tuple[int, ...] = (30, 60)
    forecast_insulin: ForecastInsulin = "held"
    censored_high_bound_mg_dl: float = 600.0

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
            "egp_prior_sd": (0.0, 2.0, False),
            "egp_rate_per_sqrt_day": (0.0, 2.0, False),
            "egp_min_scale": (0.0, 1.0, True),
            "egp_max_scale": (1.0, 100.0, False),
            "unannounced_meal_sd_g_per_sqrt_min": (0.0, 100.0, False),
            "meal_gate_memory": (0.0, 0.99, False),
            "meal_gate_threshold_mg_dl": (0.0, 200.0, False),
            "censored_high_bound_mg_dl": (0.0, 5000.0, True),
        }
        for name, (lo, hi, lo_open) in ranges.items():
            object.__setattr__(
                self, name, _number(name, getattr(self, name), lo, hi, lo_open=lo_open)
            )
        if not self.cgm_max_mg_dl > self.cgm_min_mg_dl:
            raise LoopConfigError(
                "cgm_max_mg_dl", self.cgm_max_mg_dl, f"> cgm_min_mg_dl={self.cgm_min_mg_dl:g}"
            )
        if not self.censored_high_bound_mg_dl > self.cgm_max_mg_dl:
            raise LoopConfigError(
                "censored_high_bound_mg_dl",
                self.censored_high_bound_mg_dl,
                f"> cgm_max_mg_dl={self.cgm_max_mg_dl:g}",
            )
        if not self.sensitivity_min_scale < 1.0:
            raise LoopConfigError("sensitivity_min_scale", self.sensitivity_min_scale, "in (0, 1)")
        if not self.sensitivity_max_scale > 1.0:
            raise LoopConfigError(
                "sensitivity_max_scale", self.sensitivity_max_scale, "in (1, 100]"
            )
        if not self.egp_min_scale < 1.0:
            raise LoopConfigError("egp_min_scale", self.egp_min_scale, "in (0, 1)")
        if not self.egp_max_scale > 1.0:
            raise LoopConfigError("egp_max_scale", self.egp_max_scale, "in (1, 100]")
        if not isinstance(self.meal_detection, bool):
            raise LoopConfigError("meal_detection", self.meal_detection, "true or false")
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
        minutes = tuple(int(h) for h in values) if ok else ()
        if (
            not ok
            or 30 not in minutes
            or 60 not in minutes
            or list(minutes) != sorted(set(minutes))
        ):
            raise LoopConfigError("forecast_horizons_min", raw, allowed)
        object.__setattr__(self, "forecast_horizons_min", minutes)

    @property
    def cgm_error_phi_per_min(self) -> float:
        """AR(1) coefficient of the CGM error per minute: ``correlation^(1/lag)``."""
        return float(self.cgm_error_correlation ** (1.0 / self.cgm_error_lag_min))


def _whole_minute(field: str, t_min: float) -> int:
    """Round a message time to the model's minute grid (tolerance 1e-6 min)."""
    m = round(t_min)
    if abs(t_min - m) > 1e-6:
        raise EstimatorInputError(f"{field}={t_min!r}: the twin runs on whole minutes")
    return int(m)


# --- compiled kernels of the filter (small dense linear algebra on the 16-state filter) -------


@numba.njit(cache=True, error_model="numpy")
def _clip_state(x: NDArray[np.float64], bounds: NDArray[np.float64]) -> None:
    """Clip one filter state in place: model non-negativity (all but ``X``), θ and η ranges.

    ``bounds`` is ``(θ_lo, θ_hi, η_lo, η_hi)``.
    """
    for j in range(N_STATES):
        if j != _X and x[j] < 0.0:
            x[j] = 0.0
    x[I_THETA] = min(max(x[I_THETA], bounds[0]), bounds[1])
    x[I_EGP] = min(max(x[I_EGP], bounds[2]), bounds[3])


@numba.njit(cache=True, error_model="numpy")
def _cholesky_lower(a: NDArray[np.float64], out: NDArray[np.float64]) -> bool:
    """Lower Cholesky factor of ``a`` into ``out``; ``False`` if ``a`` is not positive definite."""
    n = a.shape[0]
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= out[j, k] * out[j, k]
        if not s > 0.0:
            return False
        d = math.sqrt(s)
        out[j, j] = d
        for i in range(j):
            out[i, j] = 0.0
        for i in range(j + 1, n):
            s = a[i, j]
            for k in range(j):
                s -= out[i, k] * out[j, k]
            out[i, j] = s / d
    return True


@numba.njit(cache=True, error_model="numpy")
def _sigma_points(
    x: NDArray[np.float64],
    chol: NDArray[np.float64],
    spread: float,
    rows: NDArray[np.int64],
    vmx: float,
    kp3: float,
    kp1: float,
    meal_state: NDArray[np.float64],
    pts: NDArray[np.float64],
    xs: NDArray[np.float64],
    params: NDArray[np.float64],
    meal_rows: NDArray[np.float64],
) -> None:
    """Sigma points ``x, x ± spread·L[:, j]`` (clipped) into ``pts`` ``(2n+1, n)``.

    Also gathers the model rows ``rows`` for :func:`twinloop.plant.glucose.uva_padova.advance`:
    their model states into ``xs``, their ``Vmx·s``, ``kp3·s`` and ``kp1·exp(η)`` into
    ``params`` and the meal state into ``meal_rows``.
    """
    n = x.shape[0]
    for i in range(2 * n + 1):
        pts[i, :] = x
    for j in range(n):
        for i in range(j, n):
            d = spread * chol[i, j]
            pts[1 + j, i] += d
            pts[1 + n + j, i] -= d
    for i in range(2 * n + 1):  # model non-negativity only: θ, η spread freely (exp > 0)
        for j in range(N_STATES):
            if j != _X and pts[i, j] < 0.0:
                pts[i, j] = 0.0
    for r in range(rows.shape[0]):
        src = rows[r]
        xs[r, :] = pts[src, :N_STATES]
        s = math.exp(pts[src, I_THETA])
        params[r, P_VMX] = vmx * s
        params[r, P_KP3] = kp3 * s
        params[r, P_KP1] = kp1 * math.exp(pts[src, I_EGP])
        meal_rows[r, :] = meal_state


@numba.njit(cache=True, error_model="numpy")
def _moments(
    pts: NDArray[np.float64],
    xs: NDArray[np.float64],
    rows: NDArray[np.int64],
    copy_rows: NDArray[np.int64],
    decay: float,
    wm: NDArray[np.float64],
    wc: NDArray[np.float64],
    q_abs: NDArray[np.float64],
    q_rel: NDArray[np.float64],
    minutes: float,
    cgm_error_var: float,
    x: NDArray[np.float64],
    p: NDArray[np.float64],
) -> None:
    """Predicted mean ``x`` and covariance ``p`` of the propagated sigma points, plus noise.

    Scatters the propagated model states ``xs`` back into ``pts`` (the ``copy_rows`` take the
    first model row's), decays the CGM error by ``decay``, and adds the process noise of
    ``minutes`` minutes: ``(q_abs + (q_rel·x)²)·minutes`` on the diagonal, and the AR(1)
    innovation ``cgm_error_var`` on ``e``. ``p`` comes out exactly symmetric.
    """
    n = x.shape[0]
    m = pts.shape[0]
    for r in range(rows.shape[0]):
        pts[rows[r], :N_STATES] = xs[r]
    for r in range(copy_rows.shape[0]):
        pts[copy_rows[r], :N_STATES] = xs[0]
    for i in range(m):
        pts[i, I_CGM_ERR] *= decay
    for j in range(n):
        acc = 0.0
        for i in range(m):
            acc += wm[i] * pts[i, j]
        x[j] = acc
    for i in range(m):
        for j in range(n):
            pts[i, j] -= x[j]
    for a in range(n):
        for b in range(a + 1):
            acc = 0.0
            for i in range(m):
                acc += wc[i] * pts[i, a] * pts[i, b]
            p[a, b] = acc
            p[b, a] = acc
    for j in range(n):
        rel = q_rel[j] * x[j]
        p[j, j] += cgm_error_var if j == I_CGM_ERR else (q_abs[j] + rel * rel) * minutes


@numba.njit(cache=True, error_model="numpy")
def _joseph_update(
    x: NDArray[np.float64],
    p: NDArray[np.float64],
    h: NDArray[np.float64],
    innovation: float,
    r: float,
    work: NDArray[np.float64],
) -> None:
    """Kalman update for a scalar measurement ``h·x + v``, ``var(v) = r``, in Joseph form.

    ``P ← (I − k hᵀ) P (I − k hᵀ)ᵀ + r k kᵀ`` with ``k = P h / (hᵀ P h + r)``, then exactly
    symmetrised. ``work`` is scratch of shape ``(n + 2, n)``.
    """
    n = x.shape[0]
    ph = work[0]
    k = work[1]
    a = work[2:]
    s = r
    for i in range(n):
        acc = 0.0
        for j in range(n):
            acc += p[i, j] * h[j]
        ph[i] = acc
    for i in range(n):
        s += h[i] * ph[i]
    for i in range(n):
        k[i] = ph[i] / s
        x[i] += k[i] * innovation
    # a = (I − k hᵀ) P, then P = a (I − k hᵀ)ᵀ + r k kᵀ
    for i in range(n):
        for j in range(n):
            a[i, j] = p[i, j] - k[i] * ph[j]
    for i in range(n):
        ah = 0.0
        for m in range(n):
            ah += a[i, m] * h[m]
        for j in range(i + 1):
            p[i, j] = a[i, j] - ah * k[j] + r * k[i] * k[j]
    for i in range(n):
        for j in range(i):
            p[j, i] = p[i, j]


class TwinEstimator:
    """Unscented Kalman filter on one patient's UVA/Padova model (see the module docstring).

    Inputs: :class:`~twinloop.agents.messages.InsulinDelivery` every minute (``observe_delivery``),
    :class:`~twinloop.agents.messages.MealAnnouncement` (``observe_meal``), every
    :class:`~twinloop.agents.messages.CgmReading` (``update``). Output: :class:`TwinEstimate`
    (``estimate``). Rate: one update per CGM reading (5 min). Times are whole minutes; messages
    older than the filter's time are ignored (see :attr:`ignored`).

    Args:
        patient: the patient whose model the twin runs (the plant's parameters).
        config: noise model, adaptation and forecasts; ``None`` for the defaults.
        t0_min: loop time of the initial state (the patient's table steady state), minutes.
        scheduled_basal_u_per_h: the basal that counts as zero insulin on board and the rate
            assumed before any delivery is seen, U/h; default the patient's basal.

    Raises:
        LoopConfigError: ``scheduled_basal_u_per_h`` is negative or not finite.
        EstimatorInputError: ``t0_min`` is not a whole minute.

    """

    def __init__(
        self,
        patient: PatientParameters,
        config: EstimatorConfig | None = None,
        *,
        t0_min: float = 0.0,
        scheduled_basal_u_per_h: float | None = None,
    ) -> None:
        cfg = EstimatorConfig() if config is None else config
        if not isinstance(cfg, EstimatorConfig):
            raise LoopConfigError("config", cfg, "a EstimatorConfig or None")
        self.patient = patient
        self.config = cfg
        basal_u_per_h = patient.basal_u_per_h if scheduled_basal_u_per_h is None else (
            _number("scheduled_basal_u_per_h", scheduled_basal_u_per_h, 0.0, 1000.0)
        )  # fmt: skip
        self._scheduled_u_per_min = basal_u_per_h / 60.0
        self._bind_model(patient)
        self._bounds = np.log(
            [
                cfg.sensitivity_min_scale,
                cfg.sensitivity_max_scale,
                cfg.egp_min_scale,
                cfg.egp_max_scale,
            ]
        )
        self._phi = cfg.cgm_error_phi_per_min

        # Unscented weights; the sigma points that need the model are all but the two that
        # differ from the mean only in the CGM error (the last state: its Cholesky column
        # has a single entry).
        n = N_AUG
        lam = _ALPHA**2 * (n + _KAPPA) - n
        self._spread = math.sqrt(n + lam)
        self._wm = np.full(2 * n + 1, 0.5 / (n + lam))
        self._wc = self._wm.copy()
        self._wm[0] = lam / (n + lam)
        self._wc[0] = lam / (n + lam) + (1.0 - _ALPHA**2 + _BETA)
        skip = (1 + I_CGM_ERR, 1 + n + I_CGM_ERR)
        self._rows = np.array([i for i in range(2 * n + 1) if i not in skip], dtype=np.int64)
        self._copy_rows = np.array(skip, dtype=np.int64)
        n_rows = self._rows.shape[0]
        self._pts = np.empty((2 * n + 1, n))
        self._chol = np.zeros((n, n))
        self._xs = np.empty((n_rows, N_STATES))
        self._row_meal_state = np.empty((n_rows, N_MEAL_STATE))
        self._row_rate = np.full(n_rows, _EAT_RATE_G_PER_MIN)
        self._one_rate = np.full(1, _EAT_RATE_G_PER_MIN)
        self._buffers: dict[tuple[int, int], tuple[NDArray[np.float64], ...]] = {}
        self._work = np.empty((n + 2, n))
        self._r = cfg.cgm_white_noise_sd_mg_dl**2
        self._bind_arrays()

        self._t = _whole_minute("t0_min", t0_min)
        x = np.zeros(n)
        x[:N_STATES] = patient.x0
        self._x = x
        self._p = self._initial_covariance()
        self._meal_state = np.zeros(N_MEAL_STATE)
        self._meals: dict[int, float] = {}  # start minute → announced grams, not yet eaten
        self._deliveries: dict[int, float] = {}  # minute → units, not yet propagated
        self._held_u_per_min = self._scheduled_u_per_min
        self._held_from = self._t - 1  # minute of the newest delivery seen
        self._meal_var_mg2 = 0.0  # counting-error variance of meals still being swallowed
        self._gate_mg_dl = 0.0  # smoothed innovation (an unexplained rise when positive)
        self._meal_gate_open = False
        self._unannounced_mg = 0.0  # carbohydrate the filter added to the gut, not yet absorbed
        self._detected_g = 0.0  # carbohydrate the filter added to the gut so far (net)
        #: Messages ignored so far, by kind (stale, late, censored or not finite).
        self.ignored: dict[str, int] = {"reading": 0, "delivery": 0, "meal": 0}
        #: Readings fused so far.
        self.readings_fused = 0
        #: Ceiling readings fused as a pseudo-measurement at ``censored_high_bound_mg_dl``.
        self.held_at_bound = 0
        #: Times the covariance had to be repaired (lost positive definiteness).
        self.covariance_repairs = 0

    # --- public interface ------------------------------------------------------------------

    @property
    def t_min(self) -> float:
        """Loop time of the filter's state (the newest reading fused), minutes."""
        return float(self._t)

    @property
    def state_mean(self) -> NDArray[np.float64]:
        """A copy of the filter's mean, shape ``(16,)`` (see the module docstring)."""
        return self._x.copy()

    @property
    def covariance(self) -> NDArray[np.float64]:
        """A copy of the filter's covariance, shape ``(16, 16)``."""
        return self._p.copy()

    @property
    def sensitivity_scale(self) -> float:
        """Estimated insulin-sensitivity scale ``exp(θ)`` (1 = the table patient)."""
        return math.exp(self._x[I_THETA])

    @property
    def egp_scale(self) -> float:
        """Estimated scale of endogenous glucose production ``exp(η)`` on ``kp1`` (1 = model)."""
        return math.exp(self._x[I_EGP])

    @property
    def unannounced_carbs_g(self) -> float:
        """Carbohydrates on board beyond those announced, g.

        What the filter put into the stomach and gut (an unannounced or under-counted meal)
        and the model has not yet absorbed.
        """
        return self._unannounced_mg / MG_PER_G

    @property
    def detected_carbs_g(self) -> float:
        """Carbohydrates beyond those announced the filter has put into the gut so far, g.

        Net of what it took out again; the grams since absorbed are included.
        """
        return self._detected_g

    @property
    def meal_gate_open(self) -> bool:
        """Whether the unannounced-meal disturbance is active (see :class:`EstimatorConfig`)."""
        return self._meal_gate_open

    def observe_delivery(self, delivery: InsulinDelivery) -> bool:
        """Account the insulin delivered over ``[t_min, t_min + 1)``.

        Returns:
            ``False`` when the delivery is ignored: its minute is already behind the filter
            (late), or its units are negative or not finite.

        Raises:
            EstimatorInputError: ``delivery.t_min`` is not a whole minute.

        """
        m = _whole_minute("delivery.t_min", delivery.t_min)
        basal, bolus = float(delivery.basal_u), float(delivery.bolus_u)
        if m < self._t or not (basal >= 0.0 and bolus >= 0.0) or math.isinf(basal + bolus):
            self.ignored["delivery"] += 1
            return False
        self._deliveries[m] = self._deliveries.get(m, 0.0) + basal + bolus
        if m >= self._held_from:
            self._held_u_per_min, self._held_from = basal, m
        return True

    def observe_meal(self, meal: MealAnnouncement) -> bool:
        """Account an announced meal starting at ``meal.t_min`` (eaten at 5 g/min from then).

        A meal announced for a minute the filter has already passed starts at the filter's
        minute.

        Returns:
            ``False`` when ignored: grams negative or not finite.

        Raises:
            EstimatorInputError: ``meal.t_min`` is not a whole minute.

        """
        m = _whole_minute("meal.t_min", meal.t_min)
        grams = float(meal.carbs_g)
        if not (grams >= 0.0 and math.isfinite(grams)):
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
            filter, not finite, or at a clipping limit the prediction is already beyond).

        Raises:
            EstimatorInputError: ``reading.t_min`` is not a whole minute.

        """
        z = float(reading.glucose_mg_dl)
        m = _whole_minute("reading.t_min", reading.t_min)
        if m < self._t or not math.isfinite(z):
            self.ignored["reading"] += 1
            return False
        self._predict(m)
        x = self._x
        zhat = x[_G_S] / self._vg + x[I_CGM_ERR]
        cfg = self.config
        above = z >= cfg.cgm_max_mg_dl and zhat >= cfg.cgm_max_mg_dl
        if above and zhat > cfg.censored_high_bound_mg_dl:
            # "at or beyond the ceiling" is no licence to believe anything: the twin is held
            # at the plausibility bound by a pseudo-measurement there
            z = cfg.censored_high_bound_mg_dl
            self.held_at_bound += 1
        elif above or (z <= cfg.cgm_min_mg_dl and zhat <= cfg.cgm_min_mg_dl):
            self.ignored["reading"] += 1  # censored: "beyond the limit", as predicted
            return False
        innovation = z - zhat
        gut_before = float(x[_Q_STO1] + x[_Q_STO2] + x[_Q_GUT])
        gp_before = float(x[_G_P])
        _joseph_update(x, self._p, self._h, innovation, self._r, self._work)
        _clip_state(x, self._bounds)
        self.readings_fused += 1
        if cfg.meal_detection:
            gut = float(x[_Q_STO1] + x[_Q_STO2] + x[_Q_GUT])
            before = self._unannounced_mg
            self._unannounced_mg = min(max(before + gut - gut_before, 0.0), gut)
            self._detected_g += (self._unannounced_mg - before) / MG_PER_G
            lam = cfg.meal_gate_memory
            self._gate_mg_dl = lam * self._gate_mg_dl + (x[_G_P] - gp_before) / self._vg
            self._meal_gate_open = (
                self.readings_fused > _GATE_WARMUP_READINGS
                and self._gate_mg_dl > cfg.meal_gate_threshold_mg_dl
            )
        return True

    def estimate(self, t_min: float) -> TwinEstimate:
        """The twin's view at ``t_min`` (>= the filter's time): glucose, IOB, COB, forecasts.

        Raises:
            EstimatorInputError: ``t_min`` is before the filter's time or not a whole minute.

        """
        x, meal_state, bg = self._mean_trajectory(t_min, 60)
        return TwinEstimate(
            t_min=float(round(t_min)),
            bg_mg_dl=float(bg[0]),
            iob_u=self._net_iob_u(x),
            cob_g=float((x[_Q_STO1] + x[_Q_STO2] + x[_Q_GUT]) / MG_PER_G + meal_state[M_PLANNED_G]),
            insulin_sensitivity_scale=self.sensitivity_scale,
            forecast_30_mg_dl=float(bg[30]),
            forecast_60_mg_dl=float(bg[60]),
            egp_scale=self.egp_scale,
            unannounced_carbs_g=self.unannounced_carbs_g,
        )

    def step(
        self,
        t_min: float,
        deliveries: list[InsulinDelivery],
        meals: list[MealAnnouncement],
        readings: list[CgmReading],
    ) -> TwinEstimate:
        """One call per control tick: account what happened since the last, then estimate.

        Deliveries and meal announcements are stored by minute first; the readings are then
        fused in time order (each propagates the filter with the inputs up to its minute).
        """
        for delivery in deliveries:
            self.observe_delivery(delivery)
        for meal in meals:
            self.observe_meal(meal)
        for reading in sorted(readings, key=lambda r: r.t_min):
            self.update(reading)
        return self.estimate(t_min)

    def plan_state(self, t_min: float) -> TwinPlanState:
        """The twin's mean model state at ``t_min`` for a planning controller (MPC).

        The model states and eating process are the mean propagated to ``t_min`` (as in
        :meth:`estimate`); the sensitivity scale is :attr:`sensitivity_scale`; the announced
        meals not yet started are listed with their start in minutes after ``t_min`` (a meal
        announced late, for a minute the filter has passed, starts at once).

        Raises:
            EstimatorInputError: ``t_min`` is before the filter's time or not a whole minute.

        """
        x, meal_state, _ = self._mean_trajectory(t_min, 0)
        m = round(t_min)
        at_filter = m == self._t
        pending = sorted(
            (max(start - m, 0), float(grams))
            for start, grams in self._meals.items()
            if start >= m or at_filter
        )
        return TwinPlanState(
            float(m),
            tuple(float(v) for v in x.ravel()),
            tuple(float(v) for v in meal_state.ravel()),
            self.sensitivity_scale,
            tuple(pending),
            egp_scale=self.egp_scale,
            unannounced_carbs_g=self.unannounced_carbs_g,
        )

    def step_for_planning(
        self,
        t_min: float,
        deliveries: list[InsulinDelivery],
        meals: list[MealAnnouncement],
        readings: list[CgmReading],
    ) -> tuple[TwinEstimate, TwinPlanState]:
        """:meth:`step`, and the :meth:`plan_state` at ``t_min`` for a planning controller."""
        estimate = self.step(t_min, deliveries, meals, readings)
        return estimate, self.plan_state(t_min)

    def forecasts(self, t_min: float) -> dict[int, float]:
        """Plasma glucose at ``t_min`` + each configured forecast horizon, mg/dL by minutes.

        Raises:
            EstimatorInputError: ``t_min`` is before the filter's time or not a whole minute.

        """
        bg = self.forecast(t_min)
        return {h: float(bg[h]) for h in self.config.forecast_horizons_min}

    def forecast(self, t_min: float, horizon_min: int | None = None) -> NDArray[np.float64]:
        """Predicted plasma glucose at ``t_min + 0, 1, …, horizon_min`` minutes, mg/dL.

        Args:
            t_min: start of the forecast (>= the filter's time), minutes.
            horizon_min: whole minutes ahead; default the longest configured horizon.

        Returns:
            Shape ``(horizon_min + 1,)``.

        Raises:
            EstimatorInputError: ``t_min`` before the filter's time, or a bad horizon.

        """
        h = self.config.forecast_horizons_min[-1] if horizon_min is None else horizon_min
        if isinstance(h, bool) or not isinstance(h, int | np.integer) or not 0 <= h <= 10_080:
            raise EstimatorInputError(
                f"horizon_min={horizon_min!r}: must be whole minutes in [0, 10080]"
            )
        return self._mean_trajectory(t_min, int(h))[2]

    def swap_model(self, patient: PatientParameters) -> None:
        """Run the filter on ``patient``'s model from now on, continuing the current estimate.

        For a model re-fitted while the loop runs (:mod:`twinloop.agents.glucose.loop`,
        ``refit_every_days``). The mean and covariance are mapped state by state (a linear map
        ``x ← c + a·x``, ``P ← diag(a) P diag(a)``), so the glucose estimate does not jump:

        * glucose: the concentrations are kept (``G_p``, ``G_s`` × ``Vg_new / Vg_old``; ``G_t``
          keeps its ratio to ``G_p`` relative to each model's basal steady state);
        * the stomach and gut (mg, not per kg) and the eating process are kept;
        * insulin: the excess over each model's basal steady state is kept as an amount (the
          per-kg masses ``I_p``, ``I_l``, ``I_sc1``, ``I_sc2`` × ``BW_old / BW_new``) and as a
          plasma concentration (``I_1``, ``I_d`` and the action ``X`` × ``Vi_old·BW_old /
          (Vi_new·BW_new)``), so the insulin on board is unchanged;
        * the CGM error ``e`` is kept;
        * the sensitivity and EGP scales restart at 1 (the new model is the fit) with their
          prior variance and no correlation with the rest.

        The inputs already observed (deliveries, meals), the meal gate and the detected
        carbohydrates are kept.
        """
        old = self._params[0].copy()
        x_old = np.asarray(self.patient.x0, dtype=np.float64)
        self._bind_model(patient)
        new = self._params[0]
        x_new = np.asarray(patient.x0, dtype=np.float64)
        a = np.ones(N_AUG)
        c = np.zeros(N_AUG)
        a[[_G_P, _G_S]] = new[P_VG] / old[P_VG]
        a[_G_T] = (x_new[_G_T] / x_new[_G_P]) / (x_old[_G_T] / x_old[_G_P]) * a[_G_P]
        mass = old[P_BW] / new[P_BW]
        conc = old[P_VI] * old[P_BW] / (new[P_VI] * new[P_BW])
        for j, factor in ((_I_P, mass), (_I_L, mass), (_I_SC1, mass), (_I_SC2, mass),
                          (_I_1, conc), (_I_D, conc), (_X, conc)):  # fmt: skip
            a[j] = factor
            c[j] = x_new[j] - factor * x_old[j]
        cfg = self.config
        x = c + a * self._x
        x[I_THETA] = x[I_EGP] = 0.0
        p = self._p * np.outer(a, a)
        for j, sd in ((I_THETA, cfg.sensitivity_prior_sd), (I_EGP, cfg.egp_prior_sd)):
            p[j, :] = 0.0
            p[:, j] = 0.0
            p[j, j] = sd**2 + self._q_abs[j]
        self._x = x
        self._bind_arrays()
        _clip_state(self._x, self._bounds)
        self._p = 0.5 * (p + p.T)

    # --- internals -------------------------------------------------------------------------

    def _bind_model(self, patient: PatientParameters) -> None:
        """Set the model's parameters (``patient``) and what follows from them alone."""
        self.patient = patient
        self._params = parameter_matrix([patient])
        p = self._params[0]
        self._vg = float(p[P_VG])
        self._bw = float(p[P_BW])
        self._vmx = float(p[P_VMX])
        self._kp3 = float(p[P_KP3])
        self._kp1 = float(p[P_KP1])
        self._insulin_ss_pmol_kg = self._steady_insulin(self._scheduled_u_per_min)

    def _bind_arrays(self) -> None:
        """The model's rows of the sigma points, the measurement vector and the process noise."""
        self._row_params = np.repeat(self._params, self._rows.shape[0], axis=0)
        self._mean_params = self._params.copy()
        self._h = np.zeros(N_AUG)
        self._h[_G_S] = 1.0 / self._vg
        self._h[I_CGM_ERR] = 1.0
        self._q_abs, self._q_rel = self._process_noise_parts()

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

    def _process_noise_parts(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per-minute process variance: an absolute part and relative SDs (× the mean)."""
        cfg = self.config
        x0 = np.asarray(self.patient.x0)
        q = np.zeros(N_AUG)
        sd_g = cfg.glucose_process_sd_mg_dl_per_sqrt_min * self._vg
        q[_G_P] = sd_g**2
        q[_G_T] = q[_G_S] = (0.1 * sd_g) ** 2
        q[I_THETA] = cfg.sensitivity_rate_per_sqrt_day**2 / MIN_PER_DAY
        q[I_EGP] = cfg.egp_rate_per_sqrt_day**2 / MIN_PER_DAY
        # a floor keeps every direction positive: 1 mg in the stomach and gut, 1e-3 of the
        # basal insulin levels, 0.01 mg/dL of glucose, 1e-5 of θ, per √min
        floor = np.zeros(N_AUG)
        floor[[_Q_STO1, _Q_STO2, _Q_GUT]] = 1.0
        floor[_I_P:_G_S] = 1e-3 * np.maximum(np.abs(x0[_I_P:_G_S]), 1.0)
        floor[[_G_P, _G_T, _G_S]] = 0.01 * self._vg
        floor[I_THETA] = floor[I_EGP] = 1e-5
        q += floor**2
        rel = np.zeros(N_AUG)
        rel[[_Q_STO2, _Q_GUT]] = cfg.gut_process_rel_sd_per_sqrt_min
        rel[[_I_SC1, _I_SC2]] = cfg.insulin_process_rel_sd_per_sqrt_min
        return q, rel

    def _initial_covariance(self) -> NDArray[np.float64]:
        cfg = self.config
        x0 = np.asarray(self.patient.x0)
        p = np.diag(self._q_abs.copy())
        # glucose: one common level (plasma, tissue, subcutaneous) plus a fifth independently
        sd = cfg.initial_glucose_sd_mg_dl * self._vg
        v = np.zeros(N_AUG)
        v[_G_P] = v[_G_S] = sd
        v[_G_T] = sd * x0[_G_T] / x0[_G_P]
        p += np.outer(v, v)
        glucose = [_G_P, _G_T, _G_S]
        p[glucose, glucose] += (0.2 * v[glucose]) ** 2
        ins = np.arange(_I_P, _G_S)
        scale = np.abs(x0[ins])
        scale[ins == _X] = x0[_I_1]  # X is 0 at steady state: use the insulin level's scale
        p[ins, ins] += (cfg.initial_insulin_rel_sd * scale) ** 2
        p[I_THETA, I_THETA] += cfg.sensitivity_prior_sd**2
        p[I_EGP, I_EGP] += cfg.egp_prior_sd**2
        p[I_CGM_ERR, I_CGM_ERR] = cfg.cgm_error_sd_mg_dl**2
        return p

    def _repair_covariance(self) -> None:
        """Restore a symmetric positive-definite covariance (eigenvalues floored)."""
        self.covariance_repairs += 1
        p = 0.5 * (self._p + self._p.T)
        p[~np.isfinite(p)] = 0.0
        w, v = np.linalg.eigh(p)
        w = np.maximum(w, 0.0)
        p = (v * w) @ v.T
        self._p = 0.5 * (p + p.T) + np.diag(self._q_abs)

    def _inputs(self, t0: int, k: int, rows: int) -> tuple[NDArray[np.float64], ...]:
        """Insulin (U/min), meal starts (g) and a carbs buffer for minutes ``t0 … t0+k-1``.

        Each is ``(rows, k)`` (reused buffers). A minute without an observed delivery gets the
        held basal rate (the basal part of the newest delivery seen) if it is not after that
        delivery or ``forecast_insulin`` is ``"held"``, else the scheduled basal. Meals
        announced for minutes the filter has passed start in the first minute when ``t0`` is
        the filter's minute.
        """
        buf = self._buffers.get((rows, k))
        if buf is None:
            buf = (np.empty((rows, k)), np.empty((rows, k)), np.empty((rows, k)))
            if len(self._buffers) < 16:
                self._buffers[(rows, k)] = buf
        insulin, meal, _ = buf
        held = self._held_u_per_min
        gap = max(0, min(self._held_from + 1 - t0, k))  # minutes up to the newest delivery
        insulin[:, :gap] = held
        after = self._scheduled_u_per_min if self.config.forecast_insulin == "scheduled" else held
        insulin[:, gap:] = after
        for minute, units in self._deliveries.items():
            if t0 <= minute < t0 + k:
                insulin[:, minute - t0] = units
        meal[:] = 0.0
        first = t0 if t0 > self._t else -1  # late announcements belong to the filter's minute
        for start, grams in self._meals.items():
            if first <= start < t0 + k:
                meal[:, max(start - t0, 0)] += grams
        return buf

    def _predict(self, t_to: int) -> None:
        """Propagate mean and covariance from the filter's minute to ``t_to``."""
        k = t_to - self._t
        if k <= 0:
            return
        if self._meal_gate_open:
            # an unexplained rise: carbohydrate may be arriving that nobody announced. The
            # disturbance enters the stomach's second compartment and the gut at the start of
            # the interval, so the sigma points carry it through the model to the glucose.
            var = (self.config.unannounced_meal_sd_g_per_sqrt_min * MG_PER_G) ** 2 * k
            self._p[_Q_STO2, _Q_STO2] += var
            self._p[_Q_GUT, _Q_GUT] += var
        gut_before = float(self._x[_Q_STO1] + self._x[_Q_STO2] + self._x[_Q_GUT])
        if not _cholesky_lower(self._p, self._chol):
            self._repair_covariance()
            if not _cholesky_lower(self._p, self._chol):  # pragma: no cover - NaN state
                raise AgentError("twin covariance is not finite; the filter diverged")
        xs, params, meal_rows = self._xs, self._row_params, self._row_meal_state
        _sigma_points(
            self._x, self._chol, self._spread, self._rows, self._vmx, self._kp3, self._kp1,
            self._meal_state, self._pts, xs, params, meal_rows,
        )  # fmt: skip
        insulin, meal, carbs = self._inputs(self._t, k, xs.shape[0])
        started_g = float(meal[0].sum())
        advance(
            xs,
            meal_rows,
            params,
            insulin,
            meal,
            self._row_rate,
            carbs_out=carbs,
            parallel=False,
            check=False,
        )
        self._meal_state[:] = meal_rows[0]
        decay = self._phi**k
        e_var = self.config.cgm_error_sd_mg_dl**2 * (1.0 - decay * decay)
        x, p = self._x, self._p
        _moments(
            self._pts, xs, self._rows, self._copy_rows, decay, self._wm, self._wc,
            self._q_abs, self._q_rel, float(k), e_var, x, p,
        )  # fmt: skip
        # counting error of the meals swallowed: a scale error on the stomach and gut contents
        if started_g > 0.0:
            self._meal_var_mg2 += (self.config.meal_size_rel_sd * started_g * MG_PER_G) ** 2
        if self._meal_var_mg2 > 0.0 and self._meal_state[M_PLANNED_G] <= 0.0:
            gut = np.maximum(x[_Q_STO1 : _Q_GUT + 1], 0.0)
            total = float(gut.sum())
            if total > 0.0:
                u = gut / total
                p[_Q_STO1 : _Q_GUT + 1, _Q_STO1 : _Q_GUT + 1] += self._meal_var_mg2 * np.outer(u, u)
            self._meal_var_mg2 = 0.0
        _clip_state(x, self._bounds)
        if self._unannounced_mg > 0.0:  # absorbed in proportion with the rest of the gut
            swallowed = float(carbs[0].sum()) * MG_PER_G
            gut_now = float(x[_Q_STO1] + x[_Q_STO2] + x[_Q_GUT])
            into = gut_before + swallowed
            share = min(gut_now / into, 1.0) if into > 0.0 else 0.0
            self._unannounced_mg = min(self._unannounced_mg * share, gut_now)
        if self._deliveries:
            self._deliveries = {m: u for m, u in self._deliveries.items() if m >= t_to}
        if self._meals:
            self._meals = {m: g for m, g in self._meals.items() if m >= t_to}
        self._t = t_to

    def _mean_trajectory(
        self, t_min: float, horizon: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Propagate the mean (mean sensitivity) to ``t_min``, then ``horizon`` minutes more.

        Returns:
            ``(x, meal_state, bg)``: the model state ``(13,)`` and the meal state ``(4,)`` at
            ``t_min``, and plasma glucose at ``t_min + 0 … horizon`` (mg/dL).

        """
        m = _whole_minute("t_min", t_min)
        if m < self._t:
            raise EstimatorInputError(
                f"t_min={t_min!r}: before the filter's time {self._t} min; the twin does not "
                "look back"
            )
        x = self._x[:N_STATES].reshape(1, N_STATES).copy()
        meal_state = self._meal_state.reshape(1, N_MEAL_STATE).copy()
        params = self._mean_params
        scale = self.sensitivity_scale
        params[0, P_VMX] = self._vmx * scale
        params[0, P_KP3] = self._kp3 * scale
        params[0, P_KP1] = self._kp1 * self.egp_scale
        if m > self._t:  # up to t_min with the known (or assumed) inputs
            insulin, meal, carbs = self._inputs(self._t, m - self._t, 1)
            advance(
                x,
                meal_state,
                params,
                insulin,
                meal,
                self._one_rate,
                carbs_out=carbs,
                parallel=False,
                check=False,
            )
        gp = np.empty((1, horizon + 1))
        if horizon > 0:
            insulin, meal, carbs = self._inputs(m, horizon, 1)
            advance(
                x.copy(),
                meal_state.copy(),
                params,
                insulin,
                meal,
                self._one_rate,
                carbs_out=carbs,
                gp_out=gp,
                gs_out=np.empty_like(gp),
                parallel=False,
                check=False,
            )
        else:
            gp[0, 0] = x[0, _G_P]
        bg: NDArray[np.float64] = gp[0] / self._vg
        return x[0], meal_state[0], bg
