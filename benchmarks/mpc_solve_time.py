"""MPC solve time per control tick and closed-loop throughput, solvers side by side.

Prints one JSON object::

    .venv/bin/python benchmarks/mpc_solve_time.py                  # 3 patients × 1 day
    .venv/bin/python benchmarks/mpc_solve_time.py --days 2 --iterations 1,2 --solvers newton

For each setting of :class:`twinloop.policies.glucose.mpc.MPCController` (``solver``: the
linearised sensitivities with the compiled projected Newton solver, or the finite differences
with scipy's L-BFGS-B from before; ``iterations``: linearisations per tick), one day of the
closed loop (random meals, ±30 % counting error, CGM noise, the twin estimator, the supervisor)
per patient (an adult, an adolescent, a child), inline in this process (one core), after a
warm-up run that compiles the model. Each decision's wall time (the controller's own
``last_solve_s``: the simulations of the plan, its sensitivities and the solve) gives p50, p99
and max; beside it the supervisor's predictive guard per tick (mean and p99; it simulates the
twin too, for every controller), the whole loop's inline time per tick, its throughput in
patient-days per second on this core, and the share of the 5-min control period the worst
solve used. The settings run one after the other in the same process: compare them within one
run (the machine's load moves absolute figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.glucose.mpc import MPCController

PATIENTS = ("adult#001", "adolescent#001", "child#001")
TICK_S = 300.0


def _one(solver: str, iterations: int, days: int) -> dict[str, Any]:
    solves: list[float] = []
    guards: list[float] = []
    loop_s = 0.0
    ticks = 0
    for name in PATIENTS:
        p = get_patient(name)
        cfg = LoopConfig(patients=(name,), days=days, controller="mpc")
        mpc = MPCController(p, iterations=iterations, solver=solver)
        decide = mpc.decide

        def timed(obs: Any, decide: Any = decide, mpc: MPCController = mpc) -> Any:
            dose = decide(obs)
            solves.append(mpc.last_solve_s)
            return dose

        mpc.decide = timed  # type: ignore[method-assign]
        loop = PatientLoop(p, cfg, np.random.default_rng(0), controller=mpc)
        guard = loop.supervisor._guard

        def timed_guard(*args: Any, guard: Any = guard) -> Any:
            t = time.perf_counter()
            out = guard(*args)
            guards.append(time.perf_counter() - t)
            return out

        loop.supervisor._guard = timed_guard  # type: ignore[method-assign,assignment]
        t0 = time.perf_counter()
        loop.run()
        loop_s += time.perf_counter() - t0
        ticks += days * 288
    s = np.array(solves) * 1000.0
    gd = np.array(guards) * 1000.0
    return {
        "solver": solver,
        "iterations": iterations,
        "decisions": int(s.size),
        "solve_ms_p50": float(np.percentile(s, 50)),
        "solve_ms_p99": float(np.percentile(s, 99)),
        "solve_ms_max": float(s.max()),
        "guard_ms_per_tick_mean": float(gd.mean()),
        "guard_ms_per_tick_p99": float(np.percentile(gd, 99)),
        "loop_ms_per_tick": 1000.0 * loop_s / ticks,
        "patient_days_per_s_per_core": len(PATIENTS) * days / loop_s,
        "worst_solve_share_of_tick": float(s.max() / 1000.0 / TICK_S),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--iterations", default="1", help="comma-separated settings")
    ap.add_argument("--solvers", default="newton,lbfgsb-fd", help="comma-separated settings")
    args = ap.parse_args()
    p = get_patient(PATIENTS[0])
    PatientLoop(p, LoopConfig(patients=(p.name,), controller="mpc"), np.random.default_rng(1))
    warm = LoopConfig(patients=(p.name,), days=1, controller="mpc")
    PatientLoop(p, warm, np.random.default_rng(1)).run()  # compile the model kernels
    results = [
        _one(solver, int(k), args.days)
        for k in args.iterations.split(",")
        for solver in args.solvers.split(",")
    ]
    out = {
        "benchmark": "mpc_solve_time",
        "patients": list(PATIENTS),
        "days": args.days,
        "horizon_min": MPCController(p).horizon_min,
        "n_blocks": MPCController(p).n_blocks,
        "control_period_s": TICK_S,
        "load_average_1min": os.getloadavg()[0],
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
