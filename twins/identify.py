"""A twin of a real person: a UVA/Padova model identified from logged CGM, insulin and meals.

**The model** is the full UVA/Padova structure of :mod:`twinloop.plant.glucose.uva_padova` (13
states, compiled), started from the population mean of the person's age group
(:func:`twinloop.plant.glucose.population. fit_population` over the 30 shipped patients), with 27
parameters fitted to the log (the
:data:`FITTED` table: every physiological parameter that varies among the shipped patients,
``Ib`` excepted, which is derived) plus a meal scale and, optionally, a daily
insulin-sensitivity profile:

================================ =================================================================
fitted parameter                 what it changes
================================ =================================================================
``vmx_…``, ``kp3_…``             insulin action on glucose use and on production
``glucose_basal_mg_dl``          ``Gb``: the glucose the scheduled basal holds
``egp_basal_mg_per_kg_min``      ``EGPb``: basal endogenous production
``kabs``, ``kmax``, ``kmin``,    meal absorption and gastric emptying
``b``, ``d``
``meal_scale``                   ``f`` (bioavailability): also absorbs a steady carb-counting bias
``p2u_per_min``                  speed of insulin action on glucose use
``kd``, ``ka1``, ``ka2``         subcutaneous insulin absorption
``body_weight_kg``               meal and insulin doses per kg
``kp2``, ``vg``, ``k1``, ``k2``, glucose kinetics and production, insulin kinetics,
``ksc``, ``km0``, ``m1``, ``m2``, the CGM's subcutaneous delay
``m4``, ``m30``, ``vi``, ``ki``
``sensitivity_block_<k>``        (``profile_blocks=B``) ``Vmx`` and ``kp3`` × a factor in the k-th
                                 of B equal blocks of the local day
================================ =================================================================

The rest (``f``, and the therapy: CR, CF, TDI) is the group's mean or the person's. The steady
state is re-derived for each candidate by :func:`twinloop.plant.glucose.population.derive` at its
``Gb`` under the person's scheduled basal rate (which sets ``Ib`` and ``u2ss``: the scheduled basal
holds ``Gb``, as in ReplayBG and the UVA/Padova
simulator). Body weight converts meals and insulin to per-kg doses; its prior is centred on the
group mean, or on the weight given. A sensitivity block's factor changes
``Vmx`` and ``kp3`` with ``kp1`` fixed, so a block with less sensitivity also raises hepatic
production: the dawn phenomenon's mechanism.

**Parametrisation and prior.** Each fitted parameter is ``θ = θ₀·exp(s·z)`` with ``z ~ N(0, 1)``
a priori: ``θ₀`` the group's mean and ``s`` the population's standard deviation of its log
(from the shrunk covariance of :class:`twinloop.plant.glucose.population.PopulationModel`; for the
fractions ``b`` and ``d`` the logit's SD times ``1 − θ₀``), or 0.2 for the meal
scale (carb counting is off by about 20 %) and 0.3 for the sensitivity blocks.

**Likelihood.** The twin's CGM is its subcutaneous glucose ``Gs/Vg``; the logged CGM is that plus
an error of unknown variance σ² (profiled out: ``σ² = SSR/n``). A reading at the CGM's limits
(40 and 400 mg/dL by default, ``cgm_range_mg_dl``) is **censored**: it says "at or beyond the
limit", so a prediction beyond it costs nothing and one inside costs its distance to the limit
(as the online twin treats such readings). Residuals of a misfit model and of a CGM are strongly
autocorrelated, so each reading is worth less than an independent one: the log-likelihood is
weighted by the **effective sample size** ``n_eff = n/τ``, ``τ = 1 + 2Σρ_k`` the integrated
autocorrelation time of the residuals at the log's sampling step, summed by Geyer's initial
positive sequence up to a day (estimated at a first fit, then the fit is refined once). It
counts the time the residuals stay correlated, not the readings: a 1-, 3- or 5-min CGM of the
same days gives about the same ``n_eff``, and no floor is imposed. The first ``burn_in_min``
minutes are not scored: the twin starts in the basal steady state with its glucose set to the
first reading, so insulin and meals before the log are unknown.

**Maximum a posteriori** by L-BFGS-B (SciPy) on ``z`` within ±5 prior SDs, minimising
``½·n_eff·log(SSR/n) + ½·|z|²``. The gradient is a forward difference; the ``1 + p`` simulations
it needs run as one batch of the compiled kernel (7 days × 28 candidates).

**Posterior** (``posterior=True``): the Laplace approximation at the MAP, with the Gauss–Newton
Hessian ``H = n_eff/SSR · JᵀJ + I`` (``J`` the residuals' Jacobian in ``z``), so
``z ~ N(ẑ, H⁻¹)``; draws of it give uncertainty bands (:meth:`TwinFit.draws`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import ParamSpec

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from twinloop.plant.glucose import identification
from twinloop.plant.glucose.identification import InsufficientDataError
from twinloop.plant.glucose.twin_model import (
    FITTED,
    MIN_PER_DAY,
    LogGrid,
    TwinFit,
    TwinModel,
    read_twin,
    write_twin,
)
from twinloop.twins.logs import LogError, TherapyLog

# the model, its file and the fit live in the plant layer (the loop builds planning models from
# them and re-fits its own); they stay importable from here
__all__ = [
    "FITTED",
    "LogGrid",
    "TwinFit",
    "TwinModel",
    "fit_twin",
    "log_grid",
    "read_twin",
    "write_twin",
]

# --------------------------------------------------------------------------------------------
# the log on a minute grid


def _column(table: pa.Table, name: str) -> NDArray[np.float64]:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def log_grid(log: TherapyLog) -> LogGrid:
    """Put an imported log on a one-minute grid from its first to its last CGM reading.

    Basal rows hold until the next basal row (before the first one, the first one's rate
    holds); boluses and carbohydrates are summed per minute; several CGM readings in one minute
    keep the last.

    Raises:
        LogError: the log has no CGM reading or no basal rate.

    """
    table = log.table
    t_us = np.asarray(
        table.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64
    )
    offset = np.asarray(table.column("utc_offset_min").to_numpy(zero_copy_only=False), np.int64)
    cgm = _column(table, "cgm_mg_dl")
    basal = _column(table, "basal_u_per_h")
    has_cgm = ~np.isnan(cgm)
    if not has_cgm.any():
        raise LogError("the log has no CGM reading: a twin is fitted to CGM")
    if np.isnan(basal).all():
        raise LogError(
            "the log has no basal rate: add basal_u_per_h rows (or scheduled_basal_u_per_h=)"
        )
    t0_us = int(t_us[has_cgm].min()) // 60_000_000 * 60_000_000
    minute = (t_us - t0_us) // 60_000_000
    k = int(minute[has_cgm].max())
    if k < 1:
        raise LogError("the log's CGM spans less than a minute")
    inside = (minute >= 0) & (minute < k)
    bolus = np.zeros(k)
    carbs = np.zeros(k)
    for col, out in (("bolus_u", bolus), ("carbs_g", carbs)):
        v = _column(table, col)
        m = inside & ~np.isnan(v)
        np.add.at(out, minute[m], v[m])
    cgm_grid = np.full(k + 1, np.nan)
    m = has_cgm & (minute >= 0) & (minute <= k)
    cgm_grid[minute[m]] = cgm[m]  # later rows (sorted by time) win
    has_basal = ~np.isnan(basal)
    b_min, b_val = minute[has_basal], basal[has_basal]
    idx = np.searchsorted(b_min, np.arange(k), side="right") - 1
    basal_grid = b_val[np.clip(idx, 0, None)]
    at = np.clip(np.searchsorted(minute, np.arange(k + 1), side="right") - 1, 0, None)
    local = (np.arange(k + 1) + t0_us // 60_000_000 + offset[at]) % MIN_PER_DAY
    return LogGrid(
        start=datetime.fromtimestamp(t0_us / 1e6, tz=UTC),
        insulin_u_per_min=basal_grid / 60.0 + bolus,
        basal_u_per_h=basal_grid,
        bolus_u=bolus,
        carbs_g=carbs,
        cgm_mg_dl=cgm_grid,
        minute_of_day=local.astype(np.int64),
    )


# --------------------------------------------------------------------------------------------
# the fit (plant.glucose.identification), with a log's error


_P = ParamSpec("_P")


def _log_errors(fit: Callable[_P, TwinFit]) -> Callable[_P, TwinFit]:
    @functools.wraps(fit)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> TwinFit:
        try:
            return fit(*args, **kwargs)
        except InsufficientDataError as exc:
            raise LogError(str(exc)) from None

    return wrapper


#: :func:`twinloop.plant.glucose.identification.fit_twin`, raising :class:`LogError` (instead of
#: its ``InsufficientDataError``) when the log has too little CGM to fit.
fit_twin = _log_errors(identification.fit_twin)
