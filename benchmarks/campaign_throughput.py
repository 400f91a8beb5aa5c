"""Campaign throughput: 30 patients × 20 fault types × 3 seeds × 1 day (1,800 runs), as JSON.

Each run is the product's full glucose loop (CGM sensor, twin estimator, basal-bolus controller,
supervisor, pump; every channel recorded in memory), its fault attached, hazard labels,
detections and four requirements judged, and its result and per-minute trace persisted
atomically (``twinloop.campaigns.campaign.run_campaign``). Run it network-isolated (it starts Ray)::

    ../shared/bin/offline .venv/bin/python benchmarks/campaign_throughput.py
    ../shared/bin/offline .venv/bin/python benchmarks/campaign_throughput.py --seeds 1  # 600 runs

Reported side by side: ``ray`` — the whole campaign on the embedded Ray with ``--workers``
workers (wall time from the call, Ray's start-up included); ``inline`` — the first
``--inline-runs`` runs in this process, one after another (the single-core rate). Target: the
1,800 runs in at most 120 s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Twenty glucose fault types: sensor, actuator, data and timing.
FAULTS = (
    "missing_data",
    "spike_positive",
    "bias",
    "drift",
    "scaling",
    "stuck",
    "clamp_max",
    "zero_reading",
    "noise_burst",
    "compression_low",
    "calibration_error",
    "delay",
    "replay",
    "occlusion",
    "under_delivery",
    "over_delivery",
    "stopped_delivery",
    "false_bolus",
    "missed_meal_announcement",
    "deadline_overrun",
)
TARGET_S = 120.0


def spec_data(seeds: int) -> dict[str, Any]:
    return {
        "name": "throughput",
        "therapy": "glucose",
        "patients": ["all"],
        "controller": "basal-bolus",
        "days": 1,
        "seeds": list(range(seeds)),
        "baseline": False,
        "defaults": {"start": 360, "duration": 240},
        "sweep": list(FAULTS),
        "requirements": [
            {"id": "G1", "rule": "glucose_min", "threshold_mg_dl": 54},
            {"id": "G2", "rule": "time_below_after_fault", "threshold_mg_dl": 70,
             "max_min": 30, "window_min": 240},
            {"id": "G3", "rule": "glucose_max", "threshold_mg_dl": 400},
            {"id": "G4", "rule": "safe_state_after_agent_fault", "periods": 2},
        ],
    }  # fmt: skip


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The machine and its load before (given) and now, for a benchmark's JSON."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per patient and fault (3)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (2)")
    parser.add_argument(
        "--inline-runs", type=int, default=100, help="runs timed inline for the rate (100)"
    )
    args = parser.parse_args()
    import yaml

    from twinloop.campaigns.campaign import run_campaign
    from twinloop.campaigns.spec import load_spec

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="twinloop-campaign-bench-") as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_data(args.seeds), sort_keys=False))
        spec = load_spec(path)
        began = time.perf_counter()
        summary = run_campaign(spec, Path(tmp) / "ray", workers=args.workers, progress=True)
        ray_wall = time.perf_counter() - began
        runs = summary["runs"]["total"]
        inline: dict[str, Any] = {"runs": 0}
        if args.inline_runs > 0:
            began = time.perf_counter()
            part = run_campaign(
                spec, Path(tmp) / "inline", inline=True, progress=False, limit=args.inline_runs
            )
            wall = time.perf_counter() - began
            n = part["execution"]["runs_this_invocation"]
            inline = {"runs": n, "wall_s": wall, "runs_per_s": n / wall}
        size_mb = sum(f.stat().st_size for f in (Path(tmp) / "ray").rglob("*")) / 1e6
    result = {
        "campaign": {
            "patients": 30,
            "fault_types": len(FAULTS),
            "seeds": args.seeds,
            "days": 1,
            "runs": runs,
        },
        "ray": {
            "workers": args.workers,
            "wall_s": ray_wall,
            "runs_per_s": runs / ray_wall,
            "errors": summary["runs"]["errors"],
            "results_on_disk_mb": size_mb,
            "verdicts": {r["id"]: r["verdict"] for r in summary["requirements"]},
        },
        "inline": inline,
        "target": {
            "wall_s_max": TARGET_S if runs == 1800 else TARGET_S * runs / 1800,
            "measured_s": ray_wall,
            "met": ray_wall <= (TARGET_S if runs == 1800 else TARGET_S * runs / 1800),
        },
        "machine": machine(load_before),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
