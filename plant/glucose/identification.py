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
from twinloop.plant.glucose.twin_model import (
    DEFAULT_BURN_IN_MIN,
    FD_STEP,
    MIN_PER_DAY,
    REFINE_PASSES,
    LogGrid,
    TwinFit,
    TwinModel,
)

__all__ = ["InsufficientDataError", "fit_twin"]


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
) -> TwinFit:
    """Fit a twin to a log on a minute grid (MAP, and optionally the Laplace posterior).

    Args:
        grid: the log (:func:`twinloop.twins.identify.log_grid`); the whole grid is fitted
            (use :meth:`LogGrid.window` to fit part of it).
        name: the twin's name.
        group: the prior's age group.
        basal_u_per_h: the scheduled basal (default: the median logged basal).
        profile_blocks: daily insulin-sensitivity blocks (0: none; 4 = 6-hour blocks).
        burn_in_min: minutes at the start that are not scored.
        posterior: also compute the Laplace posterior.
        min_days: refuse a grid with fewer days of scored CGM (at 5-min readings).
        max_iter: L-BFGS-B iterations per pass.
        starts: optimisations from different points (the prior mean, then draws of the prior
            seeded by ``seed``); the best is refined.
        seed: seed of the extra starts.
        overrides: base values (:meth:`TwinModel.for_group`).

    Raises:
        InsufficientDataError: too little CGM to fit (says how much is needed and how much
            there is).
        ConfigError: a bad option (named).

    """
    t0 = time.perf_counter()
    basal = grid.scheduled_basal_u_per_h() if basal_u_per_h is None else basal_u_per_h
    if not basal > 0:
        raise ConfigError(
            "basal_u_per_h", basal, "> 0 U/h (the log's median basal is 0; give the scheduled one)"
        )
    model = TwinModel.for_group(
        name, group, basal, profile_blocks=profile_blocks, **dict(overrides or {})
    )
    if not 0 <= burn_in_min < grid.minutes:
        raise ConfigError("burn_in_min", burn_in_min, f"minutes in [0, {grid.minutes})")
    idx = np.flatnonzero(~np.isnan(grid.cgm_mg_dl))
    idx = idx[idx >= burn_in_min]
    needed = int(min_days * MIN_PER_DAY / 5 * 0.7)
    if idx.size < max(needed, 12):
        raise InsufficientDataError(
            f"too little CGM to fit a twin: {idx.size} readings after the {burn_in_min}-min "
            f"burn-in; at least {max(needed, 12)} are needed ({min_days:g} day(s) at 5-min "
            "readings, 70 % coverage)"
        )
    y = grid.cgm_mg_dl[idx]
    n = idx.size
    p = len(model.names)
    eye = np.eye(p) * FD_STEP

    def residuals(zs: NDArray[np.float64]) -> NDArray[np.float64]:
        return model.simulate(zs, grid)[:, idx] - y

    state = {"n_eff": n / 10.0, "evals": 0}

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
            options={"maxiter": max_iter},
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
        state["n_eff"] = max(n * (1.0 - rho) / (1.0 + rho), n / 100.0)
        res = minimize(
            objective, z, jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": max_iter},
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
        "rmse_mg_dl": math.sqrt(ssr / n),
        "lag1_autocorrelation": rho,
        "n_eff": state["n_eff"],
        "iterations": iterations,
        "simulations": state["evals"],
        "converged": bool(res.success),
        "seconds": time.perf_counter() - t0,
    }
    return TwinFit(model, z, cov, fit)
