"""Twin fitting speed: one 7-day MAP fit, and 10 fits one after another vs in parallel on Ray.

    ../shared/bin/offline .venv/bin/python benchmarks/twin_fit_speed.py [--patients 10]
        [--fit-days 7] [--workers 2] [--seed 11]

Writes ``--patients`` synthetic logs of sampled adults (``twinloop.twins.synthetic``, 7 days each by
default), then fits them (``twinloop.twins.person.fit_many``: import, therapy, MAP) twice: inline,
one after another in this process, and as Ray tasks on the embedded Ray (loopback) with
``--workers`` workers. The Ray time is measured from the first submission (Ray's start-up and
its workers' import of the compiled model are reported apart). Targets: one fit ≤ 60 s; the
parallel fits ≥ 1.6× faster than one after another.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_FIT_S = 60.0
TARGET_SPEEDUP = 1.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--fit-days", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    from twinloop.plant.glucose.population import sample_population
    from twinloop.plant.glucose.scenarios import CarbCountingError
    from twinloop.twins.person import FitRequest, fit_many
    from twinloop.twins.synthetic import synthetic_log

    patients, _ = sample_population(args.patients, seed=args.seed, groups={"adults": 1.0})
    with tempfile.TemporaryDirectory() as tmp:
        requests = []
        for i, p in enumerate(patients):
            syn = synthetic_log(
                p, days=args.fit_days, seed=1000 + i, carb_error=CarbCountingError("normal", 0.1)
            )
            path = syn.write(Path(tmp) / f"log_{i}.csv")
            requests.append(FitRequest((str(path),), name=p.name))

        began = time.perf_counter()
        inline = list(fit_many(requests, inline=True))
        serial_s = time.perf_counter() - began
        errors = [r["error"] for r in inline if "error" in r]
        if errors:
            raise SystemExit(f"fits failed: {errors}")
        per_fit = [r["fit"].fit["seconds"] for r in inline]

        import ray

        from twinloop.agents.placement import start_ray

        began = time.perf_counter()
        start_ray(num_cpus=args.workers)
        ray_start_s = time.perf_counter() - began

        @ray.remote(num_cpus=1)
        def warm() -> float:  # each worker imports the model and loads the compiled kernel
            t = time.perf_counter()
            import twinloop.twins.identify  # noqa: F401
            from twinloop.plant.glucose.uva_padova import simulate

            simulate(list(patients[:1]), np.zeros(2), np.zeros(2))
            return time.perf_counter() - t

        began = time.perf_counter()
        ray.get([warm.remote() for _ in range(args.workers)])
        warm_s = time.perf_counter() - began
        began = time.perf_counter()
        parallel = list(fit_many(requests, workers=args.workers))
        parallel_s = time.perf_counter() - began
        ray.shutdown()
    same = all(
        np.allclose(a["fit"].z_map, b["fit"].z_map)
        for a, b in zip(
            sorted(inline, key=lambda r: r["name"]),
            sorted(parallel, key=lambda r: r["name"]),
            strict=True,
        )
    )
    speedup = serial_s / parallel_s
    print(
        json.dumps(
            {
                "benchmark": "twin_fit_speed",
                "config": vars(args),
                "one_fit_s": {
                    "mean": float(np.mean(per_fit)),
                    "max": float(np.max(per_fit)),
                    "target_max": TARGET_FIT_S,
                },
                "serial_s": serial_s,
                "ray": {
                    "start_s": ray_start_s,
                    "worker_warm_up_s": warm_s,
                    "fits_s": parallel_s,
                    "workers": args.workers,
                },
                "speedup": speedup,
                "target_speedup": TARGET_SPEEDUP,
                "same_twins_inline_and_on_ray": same,
                "met": bool(max(per_fit) <= TARGET_FIT_S and speedup >= TARGET_SPEEDUP),
                "unix_time": time.time(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
