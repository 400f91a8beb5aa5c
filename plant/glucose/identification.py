"""Identification of a twin from a log on a minute grid: :func:`fit_twin`.

The numerics of :mod:`twinloop.twins.identify` (which documents the model, the prior, the
likelihood and the posterior), kept in the plant layer so that a closed loop can re-fit its own
model from what it recorded (:mod:`twinloop.agents.glucose.loop`, ``refit_every_days``) without
the log import code above it. ``twinloop.twins.identify.fit_twin`` is this function, with a log's
error (:class:`twinloop.twins.logs.LogError`) for too little CGM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.cgm import sampling_period_min
from twinloop.plant.glucose.twin_model import (
    DEFAULT_BURN_IN_MIN,
    FD_STEP,
    MIN_PER_DAY,
    REFINE_PASSES,
    LogGrid,
    TwinFit,
    TwinModel,
)

__all__ = ["InsufficientDataError", "censored_residuals", "effective_sample_size", "fit_twin"]

#: Longest lag of the residuals' autocorrelation summed for the effective sample size, minutes.
MAX_ACF_LAG_MIN = 1440
#: The CGM's reporting range: readings at its limits are censored (as the online twin's).
CGM_RANGE_MG_DL = (40.0, 400.0)
#: L-BFGS-B's relative tolerance on the objective (≈ 1e-4 on a log-posterior of ~100). Its
#: memory stays at SciPy's 10 pairs: with 30 the result depended on the BLAS thread count.
FTOL = 1e-6


class InsufficientDataError(InvalidInputError):
    """Too little CGM in a grid to fit a twin (says how much is needed and how much there is)."""


# --------------------------------------------------------------------------------------------
# the fit


def _lag1(r: NDArray[np.float64], idx: NDArray[np.int64]) -> float:
    """Lag-1 autocorrelation of residuals at consecutive readings (no gap between them)."""
    d = np.diff(idx)
    step = int(np.median(d)) if d.size else 1
    ok = d == step
    if ok.sum() < 10:
        return 0.0
    a, b = r[:-1][ok], r[1:][ok]
    den = math.sqrt(float(np.dot(a - a.mean(), a - a.mean()) * np.dot(b - b.mean(), b - b.mean())))
    return float(np.clip(np.dot(a - a.mean(), b - b.mean()) / den, 0.0, 0.99)) if den else 0.0


def effective_sample_size(
    r: NDArray[np.float64], idx: NDArray[np.int64], *, max_lag_min: int = MAX_ACF_LAG_MIN
) -> float:
    """The number of independent readings the residuals ``r`` at minutes ``idx`` are worth.

    ``n / τ``, with ``τ = 1 + 2 Σ ρ_k`` the integrated autocorrelation time (in readings) of the
    residual series at the log's sampling step, its autocorrelations ``ρ_k`` estimated over the
    pairs of readings ``k`` steps apart (gaps skipped) and summed by Geyer's initial positive
    sequence (pairs ``ρ_{2m} + ρ_{2m+1}`` while positive and not increasing; Geyer 1992, Stat.
    Sci. 7:473) up to ``max_lag_min``. It depends on the time the residuals stay correlated, not
    on how often the CGM samples: a 1-, 3- or 5-min log of the same days is worth about the same.
    """
    n = idx.size
    if n < 3:
        return float(n)
    d = np.diff(idx)
    step = max(int(np.median(d)), 1)
    on_grid = (idx - idx[0]) % step == 0
    pos = (idx[on_grid] - idx[0]) // step
    series = np.full(int(pos[-1]) + 1, np.nan)
    series[pos] = r[on_grid] - r[on_grid].mean()
    valid = ~np.isnan(series)
    x = np.where(valid, series, 0.0)
    # einsum, not BLAS: the same sums whatever the number of BLAS threads (a fit must not depend
    # on the process it runs in)
    var = float(np.einsum("i,i->", x, x) / valid.sum())
    if not var > 0:
        return float(n)
    max_lag = min(max_lag_min // step, series.size // 4)
    rho = np.ones(max_lag + 1)
    for k in range(1, max_lag + 1):
        pairs = int(np.count_nonzero(valid[:-k] & valid[k:]))
        rho[k] = float(np.einsum("i,i->", x[:-k], x[k:])) / pairs / var if pairs > 10 else 0.0
    tau = -1.0
    previous = math.inf
    for m in range((max_lag + 1) // 2):
        gamma = min(rho[2 * m] + rho[2 * m + 1], previous)
        if gamma <= 0:
            break
        tau += 2.0 * gamma
        previous = gamma
    return float(n / max(tau, 1.0))


def censored_residuals(
    prediction_mg_dl: NDArray[np.float64],
    readings_mg_dl: NDArray[np.float64],
    low_mg_dl: float,
    high_mg_dl: float,
) -> NDArray[np.float64]:
    """Residuals ``prediction − reading``, with readings at the device's limits censored.

    A reading at or below ``low_mg_dl`` says only "at or below the limit": a prediction below
    it costs nothing, one above costs its distance to the limit (and likewise at or above
    ``high_mg_dl``) — as the online twin fuses such readings
    (:meth:`twinloop.agents.glucose.estimator.TwinEstimator.update`).
    """
    r = prediction_mg_dl - readings_mg_dl
    low = readings_mg_dl <= low_mg_dl
    high = readings_mg_dl >= high_mg_dl
    if low.any() or high.any():
        r = np.where(low, np.maximum(prediction_mg_dl - low_mg_dl, 0.0), r)
        r = np.where(high, np.minimum(prediction_mg_dl - high_mg_dl, 0.0), r)
    return r


def fit_twin(
    grid: LogGrid,
    *,
    name: str = "twin",
    group: str = "adults",
    basal_u_per_h: float | None = None,
    profile_blocks: int = 0,
    burn_in_min: int = DEFAULT_BURN_IN_MIN,
    posterior: bool = False,
    min_days: float = 1.0,
    max_iter: int = 200,
    starts: int = 1,
    seed: int = 0,
    overrides: Mapping[str, float] | None = None,
    cgm_range_mg_dl: tuple[float, float] = CGM_RANGE_MG_DL,
) -> TwinFit:
    """Fit a twin to a log on a minute grid (MAP, and optionally the Laplace posterior).

    Args:
        grid: the log (:func:`twinloop.twins.identify.log_grid`); the whole grid is fitted
            (use :meth:`LogGrid.window` to fit part of it).
        name: the twin's name.
        group: the prior's age group.
        basal_u_per_h: the scheduled basal (default: the most common logged rate,
            :meth:`LogGrid.scheduled_basal_u_per_h`).
        profile_blocks: daily insulin-sensitivity blocks (0: none; 4 = 6-hour blocks).
        burn_in_min: minutes at the start that are not scored.
        posterior: also compute the Laplace posterior.
        min_days: refuse a grid with fewer days of scored CGM (at 5-min readings).
        max_iter: L-BFGS-B iterations per pass.
        starts: optimisations from different points (the prior mean, then draws of the prior
            seeded by ``seed``); the best is refined.
        seed: seed of the extra starts.
        overrides: base values (:meth:`TwinModel.for_group`).
        cgm_range_mg_dl: the CGM's reporting limits: readings at or beyond them are censored
            (:func:`censored_residuals`).

    Raises:
        InsufficientDataError: too little CGM to fit (says how much is needed and how much
            there is).
        ConfigError: a bad option (named).

    """
    t0 = time.perf_counter()
    basal = grid.scheduled_basal_u_per_h() if basal_u_per_h is None else basal_u_per_h
    if not basal > 0:
        raise ConfigError(
            "basal_u_per_h",
            basal,
            "> 0 U/h (the log's basal is 0 throughout; give the scheduled one)",
        )
    model = TwinModel.for_group(
        name, group, basal, profile_blocks=profile_blocks, **dict(overrides or {})
    )
    if not 0 <= burn_in_min < grid.minutes:
        raise ConfigError("burn_in_min", burn_in_min, f"minutes in [0, {grid.minutes})")
    idx = np.flatnonzero(~np.isnan(grid.cgm_mg_dl))
    idx = idx[idx >= burn_in_min]
    period = sampling_period_min(np.diff(idx))
    needed = int(min_days * MIN_PER_DAY / period * 0.7)
    if idx.size < max(needed, 12):
        raise InsufficientDataError(
            f"too little CGM to fit a twin: {idx.size} readings after the {burn_in_min}-min "
            f"burn-in; at least {max(needed, 12)} are needed ({min_days:g} day(s) at "
            f"{period}-min readings, 70 % coverage)"
        )
    low, high = cgm_range_mg_dl
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise ConfigError("cgm_range_mg_dl", cgm_range_mg_dl, "(low, high) with 0 <= low < high")
    y = grid.cgm_mg_dl[idx]
    n = idx.size
    p = len(model.names)
    eye = np.eye(p) * FD_STEP

    def residuals(zs: NDArray[np.float64]) -> NDArray[np.float64]:
        return censored_residuals(model.simulate(zs, grid)[:, idx], y, low, high)

    state = {"n_eff": n * period / 50.0, "evals": 0}  # a reading per 50 min, until estimated

    def objective(z: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        zs = np.vstack([z, z + eye])
        try:
            r = residuals(zs)
        except ConfigError:
            return 1e12, np.zeros(p)
        state["evals"] += 1
        ssr = np.einsum("ij,ij->i", r, r)
        f = 0.5 * state["n_eff"] * np.log(ssr / n) + 0.5 * np.einsum("ij,ij->i", zs, zs)
        return float(f[0]), (f[1:] - f[0]) / FD_STEP

    bounds = list(model.z_bounds)
    rng = np.random.default_rng(seed)
    iterations = 0
    best = None
    for k in range(starts):
        z0 = model.clip(np.zeros(p) if k == 0 else np.clip(rng.standard_normal(p), -2.0, 2.0))
        res = minimize(
            objective, z0, jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": max_iter, "ftol": FTOL},
        )  # fmt: skip
        iterations += int(res.nit)
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    z = np.asarray(best.x, dtype=np.float64)
    rho = 0.0
    for _ in range(REFINE_PASSES):
        r0 = residuals(z[None, :])[0]
        rho = _lag1(r0, idx)
        state["n_eff"] = effective_sample_size(r0, idx)
        res = minimize(
            objective, z, jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": max_iter, "ftol": FTOL},
        )  # fmt: skip
        z = np.asarray(res.x, dtype=np.float64)
        iterations += int(res.nit)
    r = residuals(np.vstack([z, z + eye]))
    ssr = float(r[0] @ r[0])
    cov = None
    if posterior:
        jac = (r[1:] - r[0]).T / FD_STEP  # (n, p)
        h = state["n_eff"] / ssr * (jac.T @ jac) + np.eye(p)
        cov = np.linalg.inv(h)
        cov = 0.5 * (cov + cov.T)
    fit = {
        "start": grid.start.isoformat(),
        "minutes": grid.minutes,
        "burn_in_min": burn_in_min,
        "cgm_readings": n,
        "censored_readings": int(np.count_nonzero((y <= low) | (y >= high))),
        "rmse_mg_dl": math.sqrt(ssr / n),
        "lag1_autocorrelation": rho,
        "n_eff": state["n_eff"],
        "iterations": iterations,
        "simulations": state["evals"],
        "converged": bool(res.success),
        "seconds": time.perf_counter() - t0,
    }
    return TwinFit(model, z, cov, fit)
