"""Closed-loop throughput: inline patient-days/s, Ray per-tick overhead, a 210-patient-day run.

Prints one JSON object. Run it network-isolated (it starts Ray)::

    sh scripts/offline.sh .venv/bin/python benchmarks/loop_throughput.py

* ``inline``: one patient's loop (adult#001, basal-bolus under the supervisor, random meals,
  CGM noise) for ``--days`` days in process, ``--repeats`` times: patient-days per second on
  one core (median run; the best run too).
* ``ticks``: the wall time of each control tick of that loop in three placements, ticked in
  turn so that all three see the same load: ``inline``, ``ray`` (the five agents — sensor, twin
  estimator, controller, supervisor, actuator — as five Ray actors reached through their direct
  channels, as ``--placement ray`` runs them) and ``ray_ordinary`` (the same actors called
  through Ray's task path, ``RayPlacement(direct=False)``, the placement before the direct
  channels). Per placement: mean, p50, p99 and max; the overhead of a Ray tick is its time minus
  the inline copy's time for the same tick (mean, p50, p99 over the ticks).
* ``cohort_all_7_days``: :func:`twinloop.agents.glucose.run.run_cohort` on all 30 patients for 7
  days (210 patient-days), recording included, inline; ``..._ray``: the agents as five Ray actors
  shared by the 30 patients driven in lockstep (``twinloop run --cohort all --days 7
  --placement ray``), and its ratio to the inline time of this run; ``..._ray_patients``: each
  patient's loop in a Ray worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.glucose.run import run_cohort
from twinloop.plant.glucose.patients import get_patient


def _inline(days: int, repeats: int) -> dict[str, Any]:
    p = get_patient("adult#001")
    cfg = LoopConfig(patients=(p.name,), days=days)
    PatientLoop(p, LoopConfig(patients=(p.name,)), np.random.default_rng(1)).run()  # warm up
    seconds = []
    for _ in range(repeats):
        loop = PatientLoop(p, cfg, np.random.default_rng(0))
        t0 = time.perf_counter()
        loop.run()
        seconds.append(time.perf_counter() - t0)
    elapsed = float(np.median(seconds))
    ticks = days * 1440 // cfg.control_period_min
    return {
        "days": days,
        "repeats": repeats,
        "seconds": seconds,
        "patient_days_per_s": days / elapsed,
        "patient_days_per_s_best": days / min(seconds),
        "tick_ms": 1000 * elapsed / ticks,
    }


def _ticks(ticks: int) -> dict[str, Any]:
    """The same loop on each placement, ticked in turn: every placement sees the same load.

    Three copies of one patient's loop (same seed, so the same work each tick): inline, on
    :class:`RayPlacement` (direct channels) and on ``RayPlacement(direct=False)``. After a
    warm-up, each of ``ticks`` rounds times one tick of each copy, in an order rotated per round.
    The overhead of a Ray tick is its time minus the inline copy's time for the same tick, taken
    moments apart (its mean and p99 over the ticks).
    """
    from twinloop.agents.placement import RayPlacement, start_ray

    t0 = time.perf_counter()
    start_ray(num_cpus=2)
    out: dict[str, Any] = {"ray_init_s": time.perf_counter() - t0, "actors": 5}
    p = get_patient("adult#001")
    names = ("inline", "ray", "ray_ordinary")
    loops = {n: PatientLoop(p, LoopConfig(patients=(p.name,), days=2), np.random.default_rng(0))
             for n in names}  # fmt: skip
    placements = {"ray": RayPlacement(), "ray_ordinary": RayPlacement(direct=False)}
    for name, placement in placements.items():
        loops[name].place(placement)
    for _ in range(20):  # actors start and channels open lazily: warm up
        for loop in loops.values():
            loop.tick()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(ticks):
        for name in names[i % 3 :] + names[: i % 3]:
            t = time.perf_counter()
            loops[name].tick()
            samples[name].append(1000 * (time.perf_counter() - t))
    for loop in loops.values():
        loop.close()
    for placement in placements.values():
        placement.close()
    inline = np.array(samples["inline"])
    for name in names:
        arr = np.array(samples[name])
        out[name] = {
            "ticks": ticks,
            "tick_ms_mean": float(arr.mean()),
            "tick_ms_p50": float(np.percentile(arr, 50)),
            "tick_ms_p99": float(np.percentile(arr, 99)),
            "tick_ms_max": float(arr.max()),
        }
        if name != "inline":
            overhead = arr - inline
            out[name]["overhead_per_tick_ms_mean"] = float(overhead.mean())
            out[name]["overhead_per_tick_ms_p50"] = float(np.percentile(overhead, 50))
            out[name]["overhead_per_tick_ms_p99"] = float(np.percentile(overhead, 99))
    out["rounds_per_tick"] = 4
    out["actor_calls_per_tick"] = 5
    return out


def _cohort(days: int, placement_name: str) -> dict[str, Any]:
    from twinloop.agents.placement import (
        InlinePlacement,
        Placement,
        RayPatientsPlacement,
        RayPlacement,
    )

    placement: Placement = {
        "inline": InlinePlacement,
        "ray": RayPlacement,
        "ray-patients": RayPatientsPlacement,
    }[placement_name]()
    cfg = LoopConfig(patients=("all",), days=days)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_cohort(cfg, tmp, progress=False, placement=placement)
        elapsed = time.perf_counter() - t0
    if isinstance(placement, RayPlacement):
        placement.close()
    return {
        "placement": placement_name,
        "patients": 30,
        "days": days,
        "patient_days": 30 * days,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=5, help="inline days (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="inline runs; median (default 5)")
    parser.add_argument("--ray-ticks", type=int, default=400, help="timed ticks per placement")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-cohort", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "benchmark": "loop_throughput",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
    }
    out["inline"] = _inline(args.days, args.repeats)
    if not args.skip_ray:
        out["ticks"] = _ticks(args.ray_ticks)
    if not args.skip_cohort:
        out["cohort_all_7_days"] = _cohort(7, "inline")
        if not args.skip_ray:
            out["cohort_all_7_days_ray"] = _cohort(7, "ray")
            out["cohort_all_7_days_ray"]["ratio_to_inline"] = (
                out["cohort_all_7_days_ray"]["seconds"] / out["cohort_all_7_days"]["seconds"]
            )
            out["cohort_all_7_days_ray_patients"] = _cohort(7, "ray-patients")
    out["loadavg_end"] = list(os.getloadavg())
    out["targets"] = {
        "inline_patient_days_per_s_per_core": {
            "target": 20.0,
            "measured": out["inline"]["patient_days_per_s"],
        },
        "ray_overhead_per_tick_ms_p99": {
            "target": 3.0,
            "measured": out["ticks"]["ray"]["overhead_per_tick_ms_p99"] if "ticks" in out else None,
        },
        "cohort_all_7_days_ray_ratio_to_inline": {
            "target": 1.5,
            "measured": out.get("cohort_all_7_days_ray", {}).get("ratio_to_inline"),
        },
        "cohort_all_7_days_s": {
            "target": 180.0,
            "measured": {
                key: out[key]["seconds"]
                for key in (
                    "cohort_all_7_days",
                    "cohort_all_7_days_ray",
                    "cohort_all_7_days_ray_patients",
                )
                if key in out
            },
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
