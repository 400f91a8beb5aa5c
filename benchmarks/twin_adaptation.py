"""The twin on a population model: adaptation, forecasts and unannounced meals (one JSON object).

    .venv/bin/python benchmarks/twin_adaptation.py                       # everything (~30 min)
    .venv/bin/python benchmarks/twin_adaptation.py --cohort adults --days 2 --parts loop

The twin estimator and the MPC plan on the loop's model (``LoopConfig.model``,
:mod:`twinloop.plant.glucose.models`): ``population`` (the age group's mean at the person's own
clinical settings, its sensitivity calibrated to the person's correction factor), ``fit`` (each
patient's twin fitted from a synthesized 7-day log of their usual therapy), or ``oracle`` (the
plant's true parameters: the upper bound). A controller is ``NAME[@MODEL][/sensitivity-only]``.

Parts:

* ``loop``: closed loops (random meals, ±30 % counting error, CGM noise, the supervisor) per
  cohort of 10, seeded as ``twinloop run`` seeds them (``SeedSequence(seed, spawn_key=(k,))``):
  ``basal-bolus``; ``mpc@population`` (the estimator adapting the insulin-sensitivity and EGP
  scales and estimating unannounced carbohydrates); ``mpc@population/sensitivity-only`` (the
  estimator as it was: sensitivity only, no meal disturbance); ``mpc@fit``; ``mpc@oracle``.
  TIR / < 70 / < 54 of plasma glucose (1-min samples), pooled over the cohort; for each MPC the
  twin's 30-min forecast RMSE of plasma glucose against persistence (the last CGM reading),
  readings after 2 h.
* ``unannounced`` (adults): 20 % of the meals not announced (drawn per patient from a separate
  stream) and the announced ones under-counted by a third (``announced_g`` × 2/3) — the same
  controllers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
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
from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.messages import CgmReading, Message, PlantGlucose, TwinEstimate
from twinloop.agents.placement import InlinePlacement
from twinloop.plant.glucose.cohorts import find_patient
from twinloop.plant.glucose.metrics import glucose_metrics
from twinloop.plant.glucose.patients import PatientParameters, cohort, patient_key
from twinloop.plant.glucose.scenarios import MealPlan
from twinloop.policies.glucose.mpc import MPCController

GROUP = {"adult": "adults", "adolescent": "adolescents", "child": "children"}
WARMUP_MIN = 120
CONTROLLERS = (
    "basal-bolus",
    "mpc@population",
    "mpc@population/sensitivity-only",
    "mpc@fit",
    "mpc@oracle",
)
#: the estimator as it was before EGP adaptation and meal detection
SENSITIVITY_ONLY = {"egp_prior_sd": 0.0, "egp_rate_per_sqrt_day": 0.0, "meal_detection": False}


def hide_meals(plan: MealPlan, rng: np.random.Generator, hidden: float, kept: float) -> MealPlan:
    """``plan`` with a fraction ``hidden`` of the meals unannounced, the others × ``kept``."""
    announced = np.array(plan.announced_g) * kept
    announced[rng.random(announced.size) < hidden] = 0.0
    return MealPlan(plan.start_min, plan.carbs_g, announced)


@dataclasses.dataclass
class Trace:
    """One patient's run: plasma glucose per minute, readings and the twin's forecasts."""

    bg: np.ndarray
    reading_t: list[int]
    reading: list[float]
    forecast30: dict[int, float]
    unannounced_g: list[float]
    scales: tuple[float, float]
    solve_ms: list[float]


def run_one(
    true: PatientParameters,
    controller: str,
    *,
    days: int,
    seed: int,
    unannounced: float = 0.0,
    undercount: float = 0.0,
    twins: str | None = None,
) -> Trace:
    """One closed loop of ``true`` with ``controller`` (see the module docstring).

    ``controller`` is ``NAME[@MODEL][/sensitivity-only]``: the loop's controller, the model the
    twin and the MPC plan on (``LoopConfig.model``; ``fit`` = the twins in ``twins``), and the
    estimator as it was before EGP adaptation and meal detection.
    """
    spec, _, variant = controller.partition("/")
    name, _, model = spec.partition("@")
    if model == "fit":
        model = f"twin:{twins}"
    cfg = LoopConfig(
        patients=(true.name,), days=days, seed=seed, controller=name, model=model or "population"
    )
    ss = np.random.SeedSequence(seed, spawn_key=(patient_key(true.name),))
    rng = np.random.default_rng(ss)
    loop = PatientLoop(true, cfg, rng)
    mpc = loop.controller if isinstance(loop.controller, MPCController) else None
    if variant == "sensitivity-only" and loop.twin is not None:
        est_cfg = dataclasses.replace(EstimatorConfig(), **SENSITIVITY_ONLY)
        loop.twin = TwinEstimator(loop.model, est_cfg, scheduled_basal_u_per_h=true.basal_u_per_h)
        loop.place(InlinePlacement())
    if unannounced or undercount:
        key = (patient_key(true.name), 99)  # a stream of its own: the meals stay the same
        hide_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
        loop.meals = hide_meals(loop.meals, hide_rng, unannounced, 1.0 - undercount)
    bg: list[float] = []
    rt: list[int] = []
    rv: list[float] = []
    f30: dict[int, float] = {}
    hidden: list[float] = []
    solves: list[float] = []

    def listen(channel: str, msg: Message) -> None:
        if channel == "plant->sensor" and isinstance(msg, PlantGlucose):
            bg.append(msg.bg_mg_dl)
        elif channel == "sensor->controller" and isinstance(msg, CgmReading):
            rt.append(round(msg.t_min))
            rv.append(msg.glucose_mg_dl)
        elif channel == "estimator->controller" and isinstance(msg, TwinEstimate):
            f30[round(msg.t_min)] = msg.forecast_30_mg_dl
            hidden.append(getattr(msg, "unannounced_carbs_g", 0.0))
            if mpc is not None:
                solves.append(1000.0 * mpc.last_solve_s)

    loop.listen(listen)
    loop.run()
    twin = loop.twin
    scales = (
        (twin.sensitivity_scale, getattr(twin, "egp_scale", 1.0)) if twin is not None else (1, 1)
    )
    return Trace(np.array(bg), rt, rv, f30, hidden, scales, solves)


def outcome(traces: list[Trace]) -> dict[str, Any]:
    """Pooled TIR / < 70 / < 54 (%) and the lowest glucose of each patient."""
    bg = np.maximum(np.concatenate([t.bg for t in traces]), 1.0)  # a collapse counts at 1
    m = glucose_metrics(bg, sample_period_min=1.0)
    return {
        "tir_pct": round(m.time_in_range_70_180_pct, 2),
        "below_70_pct": round(m.time_below_70_pct, 2),
        "below_54_pct": round(m.time_below_54_pct, 2),
        "above_180_pct": round(m.time_above_180_pct, 2),
        "patients_below_54": int(sum(float(np.min(t.bg)) < 54.0 for t in traces)),
        "min_bg_per_patient": [round(float(np.min(t.bg)), 1) for t in traces],
    }


def forecast_rmse(traces: list[Trace]) -> dict[str, Any]:
    """30-min forecast RMSE of plasma glucose: the twin's and persistence's (last reading)."""
    twin_err: list[float] = []
    pers_err: list[float] = []
    for tr in traces:
        last = dict(zip(tr.reading_t, tr.reading, strict=True))
        for t, f in tr.forecast30.items():
            if t < WARMUP_MIN or t + 30 >= tr.bg.size or t not in last:
                continue
            truth = tr.bg[t + 30]
            twin_err.append(f - truth)
            pers_err.append(last[t] - truth)
    tw = math.sqrt(float(np.mean(np.square(twin_err))))
    pe = math.sqrt(float(np.mean(np.square(pers_err))))
    return {
        "twin_rmse_mg_dl": round(tw, 2),
        "persistence_rmse_mg_dl": round(pe, 2),
        "twin_reduction_vs_persistence": round(1.0 - tw / pe, 3),
        "n_forecasts": len(twin_err),
    }


def _run_named(name: str, controller: str, **kwargs: Any) -> Trace:
    numba.set_num_threads(1)
    return run_one(find_patient(name), controller, **kwargs)


def run_cohort(
    name: str,
    controllers: tuple[str, ...],
    *,
    days: int,
    seed: int,
    workers: int,
    twins: str,
    **meal_errors: float,
) -> dict[str, dict[str, Any]]:
    patients = cohort(name)
    out: dict[str, dict[str, Any]] = {}
    for controller in controllers:
        began = time.perf_counter()
        one = functools.partial(
            _run_named, controller=controller, days=days, seed=seed, twins=twins, **meal_errors
        )
        names = [p.name for p in patients]
        if workers > 1:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                traces = list(pool.map(one, names))
        else:
            traces = [one(n) for n in names]
        entry = outcome(traces)
        if controller.startswith("mpc"):
            entry["forecast_30_min"] = forecast_rmse(traces)
            entry["final_scales_sensitivity_egp"] = [
                [round(v, 3) for v in t.scales] for t in traces
            ]
            solves = np.concatenate([t.solve_ms for t in traces])
            entry["mpc_solve_ms_p50_p99"] = [
                round(float(np.percentile(solves, q)), 2) for q in (50, 99)
            ]
        if meal_errors:
            entry["max_unannounced_estimate_g"] = round(
                max(max(t.unannounced_g, default=0.0) for t in traces), 1
            )
        entry["wall_s"] = round(time.perf_counter() - began, 1)
        print(
            f"{name} {controller}: {entry['tir_pct']} / {entry['below_70_pct']} / "
            f"{entry['below_54_pct']} ({entry['wall_s']} s)",
            file=sys.stderr,
        )
        out[controller] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cohort", action="append", help="default: adults, adolescents, children")
    ap.add_argument("--controller", action="append", help=f"default: {', '.join(CONTROLLERS)}")
    ap.add_argument("--parts", default="loop,unannounced", help="loop, unannounced")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    ap.add_argument("--twins", default="runs/bench-twins", help="where mpc@fit's twins go")
    args = ap.parse_args()
    cohorts = tuple(args.cohort or ("adults", "adolescents", "children"))
    controllers = tuple(args.controller or CONTROLLERS)
    parts = set(args.parts.split(","))
    if any("@fit" in c for c in controllers):  # each patient's twin, fitted from a 7-day log
        from twinloop.twins.individualize import fitted_model

        fitted_model(list(cohorts), args.twins, inline=True, progress=False)
    numba.set_num_threads(1)
    result: dict[str, Any] = {
        "benchmark": "twin_adaptation",
        "days": args.days,
        "seed": args.seed,
        "estimator_config": dataclasses.asdict(EstimatorConfig()),
    }
    if "loop" in parts:
        result["loop"] = {
            c: run_cohort(
                c,
                controllers,
                days=args.days,
                seed=args.seed,
                workers=args.workers,
                twins=args.twins,
            )
            for c in cohorts
        }
    if "unannounced" in parts:
        result["unannounced"] = {
            "what": "20 % of meals unannounced, the others announced at 2/3 of the grams",
            "adults": run_cohort(
                "adults",
                controllers,
                days=args.days,
                seed=args.seed,
                workers=args.workers,
                twins=args.twins,
                unannounced=0.2,
                undercount=1.0 / 3.0,
            ),
        }
    result["machine"] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1_min": round(os.getloadavg()[0], 2),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
