"""Virtual populations: time to sample 1,000 valid virtual patients, as JSON.

    .venv/bin/python benchmarks/population_sample.py [--n 1000] [--seed 7] [--repeats 3]

Fits the per-group log-normal model to the 30 shipped patients
(``twinloop.plant.glucose.population``), then draws until ``--n`` patients pass every check (derived
basal steady state, plausibility bounds, a basal-only day of the compiled model within 0.5 mg/dL of
the basal glucose).
Reported: the fit time, each repeat's sampling time (the first includes numba's load of the
compiled model), the rejections by reason. Target: 1,000 valid patients in at most 10 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from twinloop.plant.glucose.population import fit_population, sample_population

    began = time.perf_counter()
    model = fit_population()
    fit_s = time.perf_counter() - began
    runs = []
    rejected: dict[str, int] = {}
    for k in range(args.repeats):
        began = time.perf_counter()
        patients, rejected = sample_population(args.n, seed=args.seed + k, model=model)
        runs.append(time.perf_counter() - began)
        assert len(patients) == args.n
    worst = max(runs) + fit_s
    print(
        json.dumps(
            {
                "n": args.n,
                "fit_s": fit_s,
                "sample_s": runs,
                "rejected_last_run": rejected,
                "target": {"max_s": TARGET_S, "measured_s": worst, "met": worst <= TARGET_S},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
