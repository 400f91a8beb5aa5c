"""MPC solve time per control tick, in the closed loop, against the 5-min tick.

Prints one JSON object::

    .venv/bin/python benchmarks/mpc_solve_time.py                  # 3 patients × 1 day
    .venv/bin/python benchmarks/mpc_solve_time.py --days 2 --iterations 1,2

For each setting of :class:`twinloop.policies.glucose.mpc.MPCController` (``iterations``:
linearisations per tick), one day of the closed loop (random meals, ±30 % counting error, CGM noise,
the twin estimator, the supervisor) per patient (an adult, an adolescent, a child), after a warm-up
run that compiles the model. Each decision's wall time (the controller's own ``last_solve_s``: the
simulations of the plan and its perturbations and the L-BFGS-B solve) gives p50, p99 and max,
side by side with the whole loop's inline time per tick and the share of the 5-min control
period the worst solve used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.glucose.mpc import MPCController

PATIENTS = ("adult#001", "adolescent#001", "child#001")
TICK_S = 300.0


def _one(iterations: int, days: int) -> dict[str, Any]:
    solves: list[float] = []
    loop_s = 0.0
    ticks = 0
    for name in PATIENTS:
        p = get_patient(name)
        cfg = LoopConfig(patients=(name,), days=days, controller="mpc")
        mpc = MPCController(p, iterations=iterations)
        decide = mpc.decide

        def timed(obs: Any, decide: Any = decide, mpc: MPCController = mpc) -> Any:
            dose = decide(obs)
            solves.append(mpc.last_solve_s)
            return dose

        mpc.decide = timed  # type: ignore[method-assign]
        loop = PatientLoop(p, cfg, np.random.default_rng(0), controller=mpc)
        t0 = time.perf_counter()
        loop.run()
        loop_s += time.perf_counter() - t0
        ticks += days * 288
    s = np.array(solves) * 1000.0
    return {
        "iterations": iterations,
        "decisions": int(s.size),
        "solve_ms_p50": float(np.percentile(s, 50)),
        "solve_ms_p99": float(np.percentile(s, 99)),
        "solve_ms_max": float(s.max()),
        "loop_ms_per_tick": 1000.0 * loop_s / ticks,
        "worst_solve_share_of_tick": float(s.max() / 1000.0 / TICK_S),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--iterations", default="1,2", help="comma-separated settings")
    args = ap.parse_args()
    p = get_patient(PATIENTS[0])
    PatientLoop(p, LoopConfig(patients=(p.name,), controller="mpc"), np.random.default_rng(1))
    warm = LoopConfig(patients=(p.name,), days=1, controller="mpc")
    PatientLoop(p, warm, np.random.default_rng(1)).run()  # compile the model kernels
    results = [_one(int(k), args.days) for k in args.iterations.split(",")]
    out = {
        "benchmark": "mpc_solve_time",
        "patients": list(PATIENTS),
        "days": args.days,
        "horizon_min": MPCController(p).horizon_min,
        "n_blocks": MPCController(p).n_blocks,
        "control_period_s": TICK_S,
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
