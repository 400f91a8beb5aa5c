"""Virtual populations: 7-day basal-bolus outcomes of sampled patients against the 30 shipped.

    ../shared/bin/offline .venv/bin/python benchmarks/population_outcomes.py --n 1000

Samples ``--n`` patients (``twinloop.plant.glucose.population.sample_population``, seed ``--seed``)
and runs each, and each of the 30 shipped patients, through the product's closed loop for ``--days``
days with the basal-bolus controller (CGM sensor, supervisor, pump, random meals with
carb-counting error; the twin estimator off, as it does not act on basal-bolus therapy), as Ray
tasks of ``--chunk`` patients. Prints, per age group and overall, the distribution (min, 5th,
50th, 95th percentile, max) of time in range 70–180, time below 70, time above 250 and mean
glucose for both, and whether the population's range covers the shipped range: over all 30
(issue 8's target) and, for information, per age group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIELDS = ("time_in_range_70_180_pct", "time_below_70_pct", "time_above_250_pct", "mean_mg_dl")


def _outcomes(patients: list[Any], days: int, seed: int) -> list[dict[str, float]]:
    """Run each patient's loop inline; its metrics (plasma glucose, 1-min samples)."""
    from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
    from twinloop.plant.glucose.metrics import glucose_metrics
    from twinloop.plant.glucose.patients import patient_key

    config = LoopConfig(patients=("adult#001",), days=days, seed=seed, twin=False)
    out = []
    for p in patients:
        loop = PatientLoop(
            p,
            config,
            np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(patient_key(p.name),))),
        )
        bg: list[float] = []
        loop.channels["plant->sensor"].listen(lambda _, m, bg=bg: bg.append(m.bg_mg_dl))
        loop.run()
        m = glucose_metrics(np.maximum(np.array(bg), 1.0), sample_period_min=1.0)
        out.append({"cohort": p.cohort, **{f: float(getattr(m, f)) for f in FIELDS}})
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for f in FIELDS:
        v = np.array([r[f] for r in rows])
        res[f] = {
            "min": float(v.min()),
            "p5": float(np.percentile(v, 5)),
            "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)),
            "max": float(v.max()),
        }
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=25)
    args = parser.parse_args()
    import ray

    from twinloop.agents.placement import start_ray
    from twinloop.plant.glucose.patients import cohort
    from twinloop.plant.glucose.population import sample_population

    began = time.perf_counter()
    population, rejected = sample_population(args.n, seed=args.seed)
    sample_s = time.perf_counter() - began
    start_ray()
    task = ray.remote(_outcomes).options(num_cpus=1)
    shipped = list(cohort("all"))
    began = time.perf_counter()
    refs_pop = [
        task.remote(population[i : i + args.chunk], args.days, args.seed)
        for i in range(0, len(population), args.chunk)
    ]
    refs_ship = [task.remote(shipped[i : i + 10], args.days, args.seed) for i in range(0, 30, 10)]
    pop = [r for chunk in ray.get(refs_pop) for r in chunk]
    ship = [r for chunk in ray.get(refs_ship) for r in chunk]
    run_s = time.perf_counter() - began
    result: dict[str, Any] = {
        "n": args.n,
        "days": args.days,
        "sample_s": sample_s,
        "loops_s": run_s,
        "rejected": rejected,
        "groups": {},
    }
    for group in ("children", "adolescents", "adults", "all"):
        p_rows = [r for r in pop if group == "all" or r["cohort"] == group]
        s_rows = [r for r in ship if group == "all" or r["cohort"] == group]
        ps, ss = _summary(p_rows), _summary(s_rows)
        covers = {f: ps[f]["min"] <= ss[f]["min"] and ps[f]["max"] >= ss[f]["max"] for f in FIELDS}
        result["groups"][group] = {"population": ps, "shipped": ss, "covers_shipped_range": covers}
    # the issue's target: the range of the 30 shipped patients' outcomes (all groups together)
    met = all(result["groups"]["all"]["covers_shipped_range"].values())
    result["target"] = {"population range covers the 30 shipped patients' range": met}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
