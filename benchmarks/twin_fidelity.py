"""Fidelity of the twin estimator: forecast RMSE against baselines, sensitivity tracking, cost.

Scenario (per patient, one child seed each): RandomDailyProtocol meals with uniform ±30 %
carbohydrate-counting error, basal-bolus therapy (the patient's basal u2ss·BW/6000 U/min every
minute plus a bolus of announced/CR units within the meal's first minute), truth from
``plant.uva_padova.simulate``, CGM readings every 5 min = clip(true G_s/V_g + cgm_errors) with
the default CGMSpec. The estimator sees, minute by minute, the meal announcement and the
delivery of minute m after its estimate at m, and the reading at m before its estimate at m.

Forecasts are made at every reading time t >= warm-up (2 h) with t + h <= end, and compared
with the true plasma glucose at t + h. Baselines, from the CGM readings only:

* persistence: the last reading y(t);
* linear trend: y(t) + h·(y(t) − y(t−10))/10, i.e. the least-squares slope of the last three
  readings (t−10, t−5, t), anchored at the last reading;
* linear trend (LS line): the least-squares line through the last three readings, evaluated at
  t + h (anchored at the line's value at t rather than at the last reading).

The bar: the twin's 30-min RMSE at least 30 % below the best baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from typing import Any

import numba
import numpy as np

from agents.messages import CgmReading, InsulinDelivery, MealAnnouncement
from agents.twin import TwinConfig, TwinEstimator
from plant.cgm import CGMSpec, cgm_errors, measure
from plant.patients import PatientParameters, cohort
from plant.scenarios import MIN_PER_DAY, CarbCountingError, RandomDailyProtocol
from plant.uva_padova import simulate

WARMUP_MIN = 120
HORIZONS = (30, 60)
PERIOD = 5


@dataclasses.dataclass
class Case:
    bg: np.ndarray  # (N, K+1) true plasma glucose
    readings: np.ndarray  # (N, K/5+1)
    twin_bg: np.ndarray  # (N, K/5+1) estimate of glucose now
    twin_f: dict[int, np.ndarray]  # horizon -> (N, K/5+1)
    scale: np.ndarray  # (N, K/5+1)
    seconds_in_estimator: float
    days: int


def _inputs(
    patients: tuple[PatientParameters, ...], days: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.random.Generator]]:
    k = days * MIN_PER_DAY
    protocol = RandomDailyProtocol(carb_error=CarbCountingError("uniform", 0.3))
    children = np.random.SeedSequence(seed).spawn(len(patients))
    meals, announced, basal, bolus, cgm_rngs = [], [], [], [], []
    for p, ss in zip(patients, children, strict=True):
        meal_rng, cgm_rng = (np.random.default_rng(s) for s in ss.spawn(2))
        plan = protocol.sample(meal_rng, days=days)
        m, a = plan.to_minutes(k)
        meals.append(m)
        announced.append(a)
        basal.append(np.full(k, p.basal_u_per_min))
        bolus.append(a / p.carb_ratio_g_per_u)
        cgm_rngs.append(cgm_rng)
    return np.array(meals), np.array(announced), np.array(basal), np.array(bolus), cgm_rngs


def run_case(
    truth: tuple[PatientParameters, ...],
    model: tuple[PatientParameters, ...],
    *,
    days: int,
    seed: int,
    config: TwinConfig,
) -> Case:
    k = days * MIN_PER_DAY
    meals, announced, basal, bolus, cgm_rngs = _inputs(model, days, seed)
    traj = simulate(truth, basal + bolus, meals)
    spec = CGMSpec()
    n_read = k // PERIOD + 1
    errors = np.array([cgm_errors(spec, rng, n_read) for rng in cgm_rngs])
    readings = measure(traj.gsub_mg_dl[:, ::PERIOD], errors, spec)
    n = len(truth)
    twin_bg = np.empty((n, n_read))
    twin_f = {h: np.empty((n, n_read)) for h in HORIZONS}
    scale = np.empty((n, n_read))
    spent = 0.0
    for i, p in enumerate(model):
        ann, bas, bol, rd = announced[i].tolist(), basal[i].tolist(), bolus[i].tolist(), readings[i]
        f30, f60 = twin_f[30][i], twin_f[60][i]
        t0 = time.perf_counter()
        est = TwinEstimator(p, config)
        for m in range(k + 1):
            if m % PERIOD == 0:
                j = m // PERIOD
                est.update(CgmReading(float(m), float(rd[j])))
                e = est.estimate(float(m))
                twin_bg[i, j] = e.bg_mg_dl
                f30[j] = e.forecast_30_mg_dl
                f60[j] = e.forecast_60_mg_dl
                scale[i, j] = e.insulin_sensitivity_scale
            if m == k:
                break
            if ann[m] > 0.0:
                est.observe_meal(MealAnnouncement(float(m), ann[m]))
            est.observe_delivery(InsulinDelivery(float(m), bas[m], bol[m]))
        spent += time.perf_counter() - t0
    return Case(traj.bg_mg_dl, readings, twin_bg, twin_f, scale, spent, days)


def _rmse(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(err**2)))


def forecast_metrics(case: Case) -> dict[str, Any]:
    """RMSE of every forecaster at each horizon over the evaluation times."""
    k = case.bg.shape[1] - 1
    y = case.readings
    t = np.arange(y.shape[1]) * PERIOD
    slope = np.full_like(y, np.nan)
    slope[:, 2:] = (y[:, 2:] - y[:, :-2]) / (2 * PERIOD)
    line_now = np.full_like(y, np.nan)
    line_now[:, 2:] = (y[:, 2:] + y[:, 1:-1] + y[:, :-2]) / 3 + slope[:, 2:] * PERIOD
    out: dict[str, Any] = {}
    for h in HORIZONS:
        ok = (t >= WARMUP_MIN) & (t + h <= k)
        truth = case.bg[:, t[ok] + h]
        preds = {
            "twin": case.twin_f[h][:, ok],
            "persistence": y[:, ok],
            "linear_trend": y[:, ok] + h * slope[:, ok],
            "linear_trend_ls_line": line_now[:, ok] + h * slope[:, ok],
        }
        rmse = {name: _rmse(pred - truth) for name, pred in preds.items()}
        best_name = min(("persistence", "linear_trend", "linear_trend_ls_line"), key=rmse.get)
        per_patient = np.sqrt(np.mean((preds["twin"] - truth) ** 2, axis=1))
        out[f"{h}_min"] = {
            "rmse_mg_dl": {k_: round(v, 2) for k_, v in rmse.items()},
            "best_baseline": best_name,
            "twin_reduction_vs_best_baseline": round(1 - rmse["twin"] / rmse[best_name], 3),
            "twin_rmse_per_patient_mg_dl": [round(float(v), 1) for v in per_patient],
            "n_forecasts": int(truth.size),
        }
    ok = t >= WARMUP_MIN
    truth_now = case.bg[:, t[ok]]
    out["now"] = {
        "twin_bg_rmse_mg_dl": round(_rmse(case.twin_bg[:, ok] - truth_now), 2),
        "cgm_vs_plasma_rmse_mg_dl": round(_rmse(y[:, ok] - truth_now), 2),
    }
    return out


def sensitivity_metrics(case: Case, true_scale: float) -> dict[str, Any]:
    final = case.scale[:, -1]
    last6h = case.scale[:, -(6 * 60 // PERIOD) :].mean(axis=1)
    rel = final / true_scale - 1.0
    return {
        "true_scale": true_scale,
        "final_estimate_per_patient": [round(float(v), 3) for v in final],
        "final_estimate_mean": round(float(final.mean()), 3),
        "final_estimate_median": round(float(np.median(final)), 3),
        "final_rel_error_per_patient": [round(float(v), 3) for v in rel],
        "final_abs_rel_error_mean": round(float(np.abs(rel).mean()), 3),
        "final_log_error_rms": round(float(np.sqrt(np.mean(np.log(final / true_scale) ** 2))), 3),
        "last_6h_mean_estimate_mean": round(float(last6h.mean()), 3),
        "estimate_mean_at_end_of_day": [
            round(float(case.scale[:, d * MIN_PER_DAY // PERIOD].mean()), 3)
            for d in range(1, case.days + 1)
        ],
    }


def scaled(p: PatientParameters, factor: float) -> PatientParameters:
    return dataclasses.replace(
        p,
        vmx_mg_per_kg_min_per_pmol_l=p.vmx_mg_per_kg_min_per_pmol_l * factor,
        kp3_mg_per_kg_min_per_pmol_l=p.kp3_mg_per_kg_min_per_pmol_l * factor,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--cohort", default="adults")
    ap.add_argument("--factors", default="0.7,1.4", help="true sensitivity scales to test")
    ap.add_argument("--skip-sensitivity", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 patients, 1 day (smoke test)")
    args = ap.parse_args()
    patients = cohort(args.cohort)
    days = args.days
    if args.quick:
        patients, days = patients[:2], 1
    numba.set_num_threads(1)
    config = TwinConfig()
    # warm-up: numba compilation (cached on disk) and first-call costs
    run_case(patients[:1], patients[:1], days=1, seed=args.seed + 1, config=config)

    print(f"nominal case: {len(patients)} patients x {days} days", file=sys.stderr)
    nominal = run_case(patients, patients, days=days, seed=args.seed, config=config)
    result: dict[str, Any] = {
        "benchmark": "twin_fidelity",
        "scenario": {
            "patients": [p.name for p in patients],
            "days": days,
            "seed": args.seed,
            "meals": "RandomDailyProtocol, CarbCountingError('uniform', 0.3)",
            "therapy": "basal u2ss*BW/6000 U/min + announced/CR bolus at meal start",
            "cgm": "CGMSpec() default (5 min, Johnson SU AR(1) error, clip 40-400)",
            "warmup_min": WARMUP_MIN,
            "linear_trend": "y(t) + h*(y(t)-y(t-10))/10 (LS slope of last 3 readings)",
            "linear_trend_ls_line": "LS line through last 3 readings evaluated at t+h",
        },
        "config": dataclasses.asdict(config),
        "nominal": forecast_metrics(nominal),
    }
    r30 = result["nominal"]["30_min"]
    result["bar"] = {
        "target_reduction_30_min": 0.30,
        "measured_reduction_30_min": r30["twin_reduction_vs_best_baseline"],
        "met": r30["twin_reduction_vs_best_baseline"] >= 0.30,
    }
    patient_days = len(patients) * days
    result["cost"] = {
        "estimator_seconds": round(nominal.seconds_in_estimator, 3),
        "ms_per_patient_day": round(1e3 * nominal.seconds_in_estimator / patient_days, 2),
        "patient_days_per_s_one_core": round(patient_days / nominal.seconds_in_estimator, 1),
        "per_day_work": "1440 observe_delivery + 288 update + 288 estimate (30/60-min forecast)",
    }
    if not args.skip_sensitivity:
        sens: dict[str, Any] = {}
        frozen = dataclasses.replace(
            config, sensitivity_prior_sd=0.0, sensitivity_rate_per_sqrt_day=0.0
        )
        for factor in (float(f) for f in args.factors.split(",")):
            print(f"sensitivity case: truth x{factor}", file=sys.stderr)
            truth = tuple(scaled(p, factor) for p in patients)
            case = run_case(truth, patients, days=days, seed=args.seed, config=config)
            fixed = run_case(truth, patients, days=days, seed=args.seed, config=frozen)
            m, mf = forecast_metrics(case), forecast_metrics(fixed)
            sens[f"x{factor:g}"] = {
                **sensitivity_metrics(case, factor),
                "forecast_rmse_30_min_adaptive_vs_frozen_mg_dl": [
                    m["30_min"]["rmse_mg_dl"]["twin"],
                    mf["30_min"]["rmse_mg_dl"]["twin"],
                ],
                "forecast_rmse_60_min_adaptive_vs_frozen_mg_dl": [
                    m["60_min"]["rmse_mg_dl"]["twin"],
                    mf["60_min"]["rmse_mg_dl"]["twin"],
                ],
                "reduction_30_min_vs_best_baseline": m["30_min"]["twin_reduction_vs_best_baseline"],
            }
        sens["nominal_x1"] = sensitivity_metrics(nominal, 1.0)
        result["sensitivity"] = sens
    result["machine"] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "cpu_count": __import__("os").cpu_count(),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    if not math.isfinite(r30["rmse_mg_dl"]["twin"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
