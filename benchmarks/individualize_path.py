"""Individualization path: synthesize a log per patient and fit each twin, on Ray.

    sh scripts/offline.sh .venv/bin/python benchmarks/individualize_path.py [--cohort all]
        [--days 7] [--seed 0] [--workers N] [--inline] [--out DIR]

Runs :func:`twinloop.twins.individualize.individualize` for the cohort (default ``all``: the 30
shipped patients) into a fresh directory (``--out``, default a temporary one; an existing one
would reuse its twins, so it must not hold them) and prints one JSON object: the wall time of
each stage (``synthesize``: the logs, in this process; ``ray_start``: the embedded Ray;
``fit``: the fits, as Ray tasks — each worker's first task also loads the compiled model),
the total, the fits' RMSE and time, how many converged, and the fitted vs true value of the key
parameters (median and largest absolute error, %). The target of the whole path (synthesize,
fit, then evaluate 7 days × 3 seeds) is 15 min; this measures its first two stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The whole path (synthesize + fit + evaluate) should take at most this long, s.
TARGET_PATH_S = 15 * 60.0


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", default="all")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="parallel fits (default: CPUs)")
    parser.add_argument("--inline", action="store_true", help="no Ray: fits one by one")
    parser.add_argument("--out", help="output directory (default: a temporary one)")
    args = parser.parse_args()

    from twinloop.twins.individualize import MANIFEST, individualize

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "twins"
        if (out / MANIFEST).exists():
            raise SystemExit(f"{out} already holds twins (they would be reused): give a new --out")
        began = time.perf_counter()
        result = individualize(
            [args.cohort],
            out,
            days=args.days,
            seed=args.seed,
            inline=args.inline,
            workers=args.workers,
            progress=sys.stderr.isatty(),
        )
        wall = time.perf_counter() - began
        doc = json.loads((out / MANIFEST).read_text())
    load_after = os.getloadavg()
    entries = list(doc["patients"].values())
    errors: dict[str, list[float]] = {}
    for e in entries:
        for name, row in e["parameters"].items():
            errors.setdefault(name, []).append(abs(row["error_pct"]))
    by_group: dict[str, list[float]] = {}
    for e in entries:
        by_group.setdefault(e["group"], []).append(e["rmse_mg_dl"])
    workers = args.workers
    if workers is None and not args.inline:
        import ray

        workers = int(ray.cluster_resources().get("CPU", 1))
    print(
        json.dumps(
            {
                "benchmark": "individualize_path",
                "config": {**vars(args), "workers": workers},
                "machine": {
                    "cpus": os.cpu_count(),
                    "loadavg_1m_before_after": [load_before[0], load_after[0]],
                },
                "patients": len(entries),
                "stages_s": result.stages,
                "synth_plus_fit_s": wall,
                "target_whole_path_s": TARGET_PATH_S,
                "fit_s": _summary([e["seconds"] for e in entries]),
                "rmse_mg_dl": _summary([e["rmse_mg_dl"] for e in entries]),
                "rmse_mg_dl_median_by_group": {
                    g: float(np.median(v)) for g, v in sorted(by_group.items())
                },
                "converged": sum(bool(e["converged"]) for e in entries),
                "parameter_abs_error_pct": {
                    name: {"median": float(np.median(v)), "max": float(np.max(v))}
                    for name, v in errors.items()
                },
                "versions": doc["versions"],
                "unix_time": time.time(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
