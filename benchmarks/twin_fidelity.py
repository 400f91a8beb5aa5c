"""Fidelity of the twin estimator: forecast RMSE against baselines, sensitivity tracking, cost.

Scenario (per patient, one child seed each): RandomDailyProtocol meals with uniform ±30 %
carbohydrate-counting error, basal-bolus therapy (the patient's basal u2ss·BW/6000 U/min every
minute plus a bolus of announced/CR units within the meal's first minute), truth from
``twinloop.plant.glucose.uva_padova.simulate``, CGM readings every 5 min = clip(true G_s/V_g +
cgm_errors) with the default CGMSpec. The estimator sees, minute by minute, the meal announcement
and the delivery of minute m after its estimate at m, and the reading at m before its estimate at m.

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
import os
import platform
import sys
import time
from typing import Any

import numba
import numpy as np

from twinloop.agents.glucose.estimator import EstimatorConfig, TwinEstimator
from twinloop.agents.messages import CgmReading, InsulinDelivery, MealAnnouncement
from twinloop.plant.glucose.cgm import CGMSpec, cgm_errors, measure
from twinloop.plant.glucose.patients import PatientParameters, cohort
from twinloop.plant.glucose.scenarios import MIN_PER_DAY, CarbCountingError, RandomDailyProtocol
from twinloop.plant.glucose.uva_padova import simulate

WARMUP_MIN = 120
HORIZONS = (30, 60)
PERIOD = 5


@dataclasses.dataclass
class Scenario:
    """Inputs and truth of N patients, one row each."""

    bg: np.ndarray  # (N, K+1) true plasma glucose, mg/dL
    readings: np.ndarray  # (N, K/5+1) CGM readings, mg/dL
    announced: np.ndarray  # (N, K) announced grams at meal starts
    basal: np.ndarray  # (N, K) basal units delivered per minute
    bolus: np.ndarray  # (N, K) bolus units per minute
    days: int


@dataclasses.dataclass
class Case:
    """A scenario and what the twin made of it."""

    scenario: Scenario
    twin_bg: np.ndarray  # (N, K/5+1) estimate of plasma glucose now
    twin_f: dict[int, np.ndarray]  # horizon -> (N, K/5+1) forecasts
    scale: np.ndarray  # (N, K/5+1) sensitivity-scale estimate
    cpu_seconds: float  # process CPU time spent in the estimator calls (and message creation)


def make_scenario(
    truth: tuple[PatientParameters, ...],
    model: tuple[PatientParameters, ...],
    *,
    days: int,
    seed: int,
    dose_scale: float = 1.0,
) -> Scenario:
    """Meals, basal-bolus therapy (of the model patient, times ``dose_scale``), truth, CGM."""
    k = days * MIN_PER_DAY
    protocol = RandomDailyProtocol(carb_error=CarbCountingError("uniform", 0.3))
    children = np.random.SeedSequence(seed).spawn(len(truth))
    meals, announced, basal, bolus, cgm_rngs = [], [], [], [], []
    for p, ss in zip(model, children, strict=True):
        meal_rng, cgm_rng = (np.random.default_rng(s) for s in ss.spawn(2))
        m, a = protocol.sample(meal_rng, days=days).to_minutes(k)
        meals.append(m)
        announced.append(a)
        basal.append(np.full(k, dose_scale * p.basal_u_per_min))
        bolus.append(dose_scale * a / p.carb_ratio_g_per_u)
        cgm_rngs.append(cgm_rng)
    b, bo = np.array(basal), np.array(bolus)
    traj = simulate(truth, b + bo, np.array(meals))
    spec = CGMSpec()
    n_read = k // PERIOD + 1
    errors = np.array([cgm_errors(spec, rng, n_read) for rng in cgm_rngs])
    readings = measure(traj.gsub_mg_dl[:, ::PERIOD], errors, spec)
    return Scenario(traj.bg_mg_dl, readings, np.array(announced), b, bo, days)


def feed(model: tuple[PatientParameters, ...], sc: Scenario, config: EstimatorConfig) -> Case:
    """Run one estimator per patient over the scenario, as the loop would feed it."""
    k = sc.days * MIN_PER_DAY
    n, n_read = sc.readings.shape
    twin_bg = np.empty((n, n_read))
    twin_f = {h: np.empty((n, n_read)) for h in HORIZONS}
    scale = np.empty((n, n_read))
    spent = 0.0
    for i, p in enumerate(model):
        ann, bas = sc.announced[i].tolist(), sc.basal[i].tolist()
        bol, rd = sc.bolus[i].tolist(), sc.readings[i].tolist()
        bg_i, f30, f60, sc_i = twin_bg[i], twin_f[30][i], twin_f[60][i], scale[i]
        t0 = time.process_time()
        est = TwinEstimator(p, config)
        for m in range(k + 1):
            if m % PERIOD == 0:
                j = m // PERIOD
                est.update(CgmReading(float(m), rd[j]))
                e = est.estimate(float(m))
                bg_i[j] = e.bg_mg_dl
                f30[j] = e.forecast_30_mg_dl
                f60[j] = e.forecast_60_mg_dl
                sc_i[j] = e.insulin_sensitivity_scale
            if m == k:
                break
            if ann[m] > 0.0:
                est.observe_meal(MealAnnouncement(float(m), ann[m]))
            est.observe_delivery(InsulinDelivery(float(m), bas[m], bol[m]))
        spent += time.process_time() - t0
    return Case(sc, twin_bg, twin_f, scale, spent)


def _rmse(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(err**2)))


def forecast_metrics(case: Case) -> dict[str, Any]:
    """RMSE of every forecaster at each horizon over the evaluation times (all patients)."""
    sc = case.scenario
    k = sc.bg.shape[1] - 1
    y = sc.readings
    t = np.arange(y.shape[1]) * PERIOD
    slope = np.full_like(y, np.nan)
    slope[:, 2:] = (y[:, 2:] - y[:, :-2]) / (2 * PERIOD)
    line_now = np.full_like(y, np.nan)
    line_now[:, 2:] = (y[:, 2:] + y[:, 1:-1] + y[:, :-2]) / 3 + slope[:, 2:] * PERIOD
    out: dict[str, Any] = {}
    for h in HORIZONS:
        ok = (t >= WARMUP_MIN) & (t + h <= k)
        truth = sc.bg[:, t[ok] + h]
        preds = {
            "twin": case.twin_f[h][:, ok],
            "persistence": y[:, ok],
            "linear_trend": y[:, ok] + h * slope[:, ok],
            "linear_trend_ls_line": line_now[:, ok] + h * slope[:, ok],
        }
        rmse = {name: _rmse(pred - truth) for name, pred in preds.items()}
        best = min(("persistence", "linear_trend", "linear_trend_ls_line"), key=rmse.__getitem__)
        per_patient = np.sqrt(np.mean((preds["twin"] - truth) ** 2, axis=1))
        out[f"{h}_min"] = {
            "rmse_mg_dl": {name: round(v, 2) for name, v in rmse.items()},
            "best_baseline": best,
            "twin_reduction_vs_best_baseline": round(1 - rmse["twin"] / rmse[best], 3),
            "twin_rmse_per_patient_mg_dl": [round(float(v), 1) for v in per_patient],
            "n_forecasts": int(truth.size),
        }
    ok = t >= WARMUP_MIN
    truth_now = sc.bg[:, t[ok]]
    out["now"] = {
        "twin_bg_rmse_mg_dl": round(_rmse(case.twin_bg[:, ok] - truth_now), 2),
        "cgm_vs_plasma_rmse_mg_dl": round(_rmse(y[:, ok] - truth_now), 2),
    }
    out["truth_below_40_mg_dl_fraction"] = round(float(np.mean(sc.bg < 40.0)), 4)
    return out


def sensitivity_metrics(case: Case, true_scale: float) -> dict[str, Any]:
    """Final estimate of the sensitivity scale against the truth, per patient and overall."""
    final = case.scale[:, -1]
    rel = final / true_scale - 1.0
    return {
        "true_scale": true_scale,
        "final_estimate_per_patient": [round(float(v), 3) for v in final],
        "final_estimate_mean": round(float(final.mean()), 3),
        "final_estimate_median": round(float(np.median(final)), 3),
        "final_rel_error_per_patient": [round(float(v), 3) for v in rel],
        "final_abs_rel_error_mean": round(float(np.abs(rel).mean()), 3),
        "final_abs_rel_error_max": round(float(np.abs(rel).max()), 3),
        "estimate_mean_at_end_of_day": [
            round(float(case.scale[:, d * MIN_PER_DAY // PERIOD].mean()), 3)
            for d in range(1, case.scenario.days + 1)
        ],
    }


def scaled(p: PatientParameters, factor: float) -> PatientParameters:
    """The patient with Vmx and kp3 multiplied by ``factor`` (insulin sensitivity)."""
    return dataclasses.replace(
        p,
        vmx_mg_per_kg_min_per_pmol_l=p.vmx_mg_per_kg_min_per_pmol_l * factor,
        kp3_mg_per_kg_min_per_pmol_l=p.kp3_mg_per_kg_min_per_pmol_l * factor,
    )


def sensitivity_case(
    patients: tuple[PatientParameters, ...],
    factor: float,
    *,
    days: int,
    seed: int,
    config: EstimatorConfig,
    titrate: bool,
) -> dict[str, Any]:
    truth = tuple(scaled(p, factor) for p in patients)
    sc = make_scenario(
        truth, patients, days=days, seed=seed, dose_scale=1.0 / factor if titrate else 1.0
    )
    frozen = dataclasses.replace(
        config, sensitivity_prior_sd=0.0, sensitivity_rate_per_sqrt_day=0.0
    )
    adaptive, fixed = feed(patients, sc, config), feed(patients, sc, frozen)
    m, mf = forecast_metrics(adaptive), forecast_metrics(fixed)
    return {
        **sensitivity_metrics(adaptive, factor),
        "truth_below_40_mg_dl_fraction": m["truth_below_40_mg_dl_fraction"],
        "forecast_rmse_mg_dl_adaptive": {
            "30_min": m["30_min"]["rmse_mg_dl"]["twin"],
            "60_min": m["60_min"]["rmse_mg_dl"]["twin"],
        },
        "forecast_rmse_mg_dl_frozen_scale_1": {
            "30_min": mf["30_min"]["rmse_mg_dl"]["twin"],
            "60_min": mf["60_min"]["rmse_mg_dl"]["twin"],
        },
        "best_baseline_rmse_30_min_mg_dl": m["30_min"]["rmse_mg_dl"][m["30_min"]["best_baseline"]],
        "twin_reduction_30_min_vs_best_baseline": m["30_min"]["twin_reduction_vs_best_baseline"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--cohort", default="adults")
    ap.add_argument("--factors", default="0.7,1.4", help="true sensitivity scales to test")
    ap.add_argument("--cost-repeats", type=int, default=3, help="timed runs of the nominal case")
    ap.add_argument("--skip-sensitivity", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 patients, 1 day (smoke test)")
    args = ap.parse_args()
    patients = cohort(args.cohort)
    days = args.days
    if args.quick:
        patients, days = patients[:2], 1
    numba.set_num_threads(1)
    config = EstimatorConfig()
    # warm-up: numba compilation (cached on disk) and first-call costs
    feed(patients[:1], make_scenario(patients[:1], patients[:1], days=1, seed=1), config)

    print(f"nominal case: {len(patients)} patients x {days} days", file=sys.stderr)
    sc = make_scenario(patients, patients, days=days, seed=args.seed)
    runs = [feed(patients, sc, config) for _ in range(max(1, args.cost_repeats))]
    nominal = min(runs, key=lambda c: c.cpu_seconds)
    result: dict[str, Any] = {
        "benchmark": "twin_fidelity",
        "scenario": {
            "patients": [p.name for p in patients],
            "days": days,
            "seed": args.seed,
            "meals": "RandomDailyProtocol(carb_error=CarbCountingError('uniform', 0.3))",
            "therapy": "basal u2ss*BW/6000 U/min + announced/CR U bolus in the meal's first minute",
            "cgm": "CGMSpec() (5 min, Breton-Kovatchev error), clip 40-400 mg/dL",
            "warmup_min": WARMUP_MIN,
            "persistence": "y(t)",
            "linear_trend": "y(t) + h*(y(t) - y(t-10))/10: LS slope of the last 3 readings",
            "linear_trend_ls_line": "LS line through the last 3 readings, evaluated at t+h",
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
    cpu = [c.cpu_seconds for c in runs]
    result["cost"] = {
        "what": "process CPU time of 1440 observe_delivery + 288 update + 288 estimate per "
        "patient-day (message creation included), one numba thread; best of the repeats",
        "cpu_seconds_per_repeat": [round(v, 3) for v in cpu],
        "ms_per_patient_day": round(1e3 * min(cpu) / patient_days, 2),
        "patient_days_per_cpu_s": round(patient_days / min(cpu), 1),
    }
    if not args.skip_sensitivity:
        sens: dict[str, Any] = {"nominal_x1": sensitivity_metrics(nominal, 1.0)}
        for factor in (float(f) for f in args.factors.split(",")):
            for titrate in (True, False):
                label = f"x{factor:g}" + ("_titrated" if titrate else "_nominal_doses")
                print(f"sensitivity case: {label}", file=sys.stderr)
                sens[label] = sensitivity_case(
                    patients, factor, days=days, seed=args.seed, config=config, titrate=titrate
                )
        result["sensitivity"] = sens
    result["machine"] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_min": round(os.getloadavg()[0], 2),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    if not math.isfinite(r30["rmse_mg_dl"]["twin"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
