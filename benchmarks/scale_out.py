"""Scale-out cost model of a campaign: per-run cost, per-task overhead, driver costs; JSON.

Run it network-isolated (it starts the embedded Ray)::

    sh scripts/offline.sh .venv/bin/python benchmarks/scale_out.py
    sh scripts/offline.sh .venv/bin/python benchmarks/scale_out.py --runs 60 --copies 4000

What it measures, side by side in one process (docs/scaling.md turns it into a projection):

* ``run``: the product's campaign runs (30 patients × fault types × 1 day, basal-bolus; the
  full glucose loop with its fault, judged and persisted) — ``--runs`` of them inline, one after
  another, after one run in this process that loads the compiled kernels (``per_run_s``: the
  cost of one run on one core), then the same runs on the embedded Ray with ``--workers``
  workers, after ``--workers`` runs that start the workers (``ray.runs_per_s``: this node's
  throughput; Ray's start and the workers' first runs are timed apart);
* ``task_overhead``: no-op Ray tasks driven exactly as the campaign drives its runs (a window of
  ``2 × workers`` in flight, ``ray.wait`` one at a time, ``ray.get``) — with an empty result and
  with a run's real result and trace as the payload: the driver's round trip per task;
* ``driver``: what the driver does per finished run besides Ray — ``persist`` (the trace as
  Parquet, the result as JSON, both atomically) — and once at the end per result: reading the
  results back, the summary (``summarize_campaign``) and the HTML report, over ``--copies``
  copies of real results;
* ``projection``: the wall time of a 100,000-run campaign on 8 and 64 nodes of
  ``--cores-per-node`` cores from these figures (see docs/scaling.md for the model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from campaign_throughput import machine  # noqa: E402  (benchmarks/ is the script's path)

FAULTS = ("bias", "occlusion", "false_bolus", "stuck", "delay", "over_delivery")


def spec_data() -> dict[str, Any]:
    return {
        "name": "scale",
        "therapy": "glucose",
        "patients": ["all"],
        "controller": "basal-bolus",
        "days": 1,
        "seeds": [0],
        "baseline": False,
        "defaults": {"start": 360, "duration": 240},
        "sweep": list(FAULTS),
        "requirements": [
            {"id": "G1", "rule": "glucose_min", "threshold_mg_dl": 54},
            {"id": "G3", "rule": "glucose_max", "threshold_mg_dl": 400},
            {"id": "G4", "rule": "safe_state_after_agent_fault", "periods": 2},
        ],
    }


def _echo(x: Any) -> Any:
    return x


def task_round_trips(payload: Any, tasks: int, workers: int) -> dict[str, float]:
    """No-op tasks returning ``payload``, driven like the campaign's runs; per-task cost."""
    import ray

    remote = ray.remote(_echo).options(num_cpus=1, max_retries=0)
    ref = ray.put(payload)
    ray.get([remote.remote(ref) for _ in range(2 * workers)])  # workers started
    window = 2 * workers
    began = time.perf_counter()
    in_flight: list[Any] = []
    submitted = 0
    while submitted < tasks or in_flight:
        while submitted < tasks and len(in_flight) < window:
            in_flight.append(remote.remote(ref))
            submitted += 1
        ready, _ = ray.wait(in_flight, num_returns=1)
        in_flight.remove(ready[0])
        ray.get(ready[0])
    wall = time.perf_counter() - began
    return {"tasks": tasks, "wall_s": wall, "per_task_ms": 1e3 * wall / tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="campaign runs timed (40)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (2: this machine)")
    ap.add_argument("--tasks", type=int, default=400, help="no-op tasks timed (400)")
    ap.add_argument("--copies", type=int, default=2000, help="results the driver handles (2000)")
    ap.add_argument("--cores-per-node", type=int, default=2, help="of the projected nodes (2)")
    args = ap.parse_args()

    import ray
    import yaml

    from twinloop.agents.placement import start_ray
    from twinloop.campaigns.campaign import (
        _run_task,
        expand_runs,
        load_results,
        persist,
        run_campaign,
    )
    from twinloop.campaigns.report import write_report
    from twinloop.campaigns.safety import summarize_campaign
    from twinloop.campaigns.spec import load_spec

    load_before = os.getloadavg()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="twinloop-scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        path = tmp / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_data(), sort_keys=False))
        spec = load_spec(path)

        # one run in this process first: the inline runs' forked child inherits loaded kernels
        key = expand_runs(spec)[-1]
        result, trace = _run_task(spec, key)
        began = time.perf_counter()
        run_campaign(spec, tmp / "inline", inline=True, progress=False, limit=args.runs)
        inline_s = time.perf_counter() - began
        per_run_s = inline_s / args.runs

        began = time.perf_counter()
        start_ray(num_cpus=args.workers)
        ray_start_s = time.perf_counter() - began
        began = time.perf_counter()
        run_campaign(spec, tmp / "warm", workers=args.workers, progress=False, limit=args.workers)
        workers_start_s = time.perf_counter() - began  # each worker imports twinloop once
        began = time.perf_counter()
        run_campaign(spec, tmp / "ray", workers=args.workers, progress=False, limit=args.runs)
        ray_s = time.perf_counter() - began
        out["run"] = {
            "runs": args.runs,
            "inline_wall_s": inline_s,
            "per_run_s": per_run_s,
            "ray": {
                "workers": args.workers,
                "ray_start_s": ray_start_s,
                "first_runs_on_fresh_workers_s": workers_start_s,
                "wall_s": ray_s,
                "runs_per_s": args.runs / ray_s,
                "speedup_over_inline": inline_s / ray_s,
            },
        }

        payload_bytes = len(ray.cloudpickle.dumps((result, trace)))
        out["task_overhead"] = {
            "empty": task_round_trips(None, args.tasks, args.workers),
            "run_payload": task_round_trips((result, trace), args.tasks, args.workers),
            "run_payload_bytes": payload_bytes,
        }
        ray.shutdown()

        drv = tmp / "driver"
        ids = []
        began = time.perf_counter()
        for i in range(args.copies):
            copy = {**result, "id": f"{result['id']}-{i}"}
            persist(drv, copy, trace)
            ids.append(copy["id"])
        persist_s = (time.perf_counter() - began) / args.copies
        bytes_per_run = sum(f.stat().st_size for f in drv.rglob("*") if f.is_file()) / args.copies

        class Key:
            def __init__(self, id_: str) -> None:
                self.id = id_

        keys = [Key(i) for i in ids]
        began = time.perf_counter()
        results = load_results(drv, keys)  # type: ignore[arg-type]
        load_s = time.perf_counter() - began
        began = time.perf_counter()
        summary = summarize_campaign(spec, keys, results)
        summarize_s = time.perf_counter() - began
        began = time.perf_counter()
        write_report(drv, spec, summary, results)
        report_s = time.perf_counter() - began
        few = max(args.copies // 10, 1)  # the report's fixed cost: a tenth of the results
        began = time.perf_counter()
        write_report(drv, spec, summarize_campaign(spec, keys[:few], results[:few]), results[:few])
        report_few_s = time.perf_counter() - began
        report_per_run_s = max(report_s - report_few_s, 0.0) / (args.copies - few)
        out["driver"] = {
            "copies": args.copies,
            "persist_per_run_ms": 1e3 * persist_s,
            "bytes_on_disk_per_run": bytes_per_run,
            "load_results_per_run_ms": 1e3 * load_s / args.copies,
            "summarize_per_run_ms": 1e3 * summarize_s / args.copies,
            "report_s": report_s,
            "report_fixed_s": report_few_s - few * report_per_run_s,
            "report_per_run_ms": 1e3 * report_per_run_s,
        }

    # -- projection: 100,000 runs ----------------------------------------------------------
    n = 100_000
    node_runs_per_s = out["run"]["ray"]["runs_per_s"] * args.cores_per_node / args.workers
    # the driver handles finished runs one at a time: a task's round trip with a run's payload
    # (an upper bound on the driver's share: it includes the worker's) plus persisting it
    driver_per_run_s = (
        out["task_overhead"]["run_payload"]["per_task_ms"] + out["driver"]["persist_per_run_ms"]
    ) / 1e3
    d = out["driver"]
    per_result_ms = d["load_results_per_run_ms"] + d["summarize_per_run_ms"]
    end_s = n * (per_result_ms + d["report_per_run_ms"]) / 1e3 + d["report_fixed_s"]
    start_s = out["run"]["ray"]["ray_start_s"] + out["run"]["ray"]["first_runs_on_fresh_workers_s"]
    projection = {}
    for nodes in (8, 64):
        compute_s = n / (node_runs_per_s * nodes)
        driver_s = n * driver_per_run_s
        projection[f"{nodes}_nodes"] = {
            "compute_bound_s": compute_s,
            "driver_bound_s": driver_s,
            "start_s": start_s,
            "end_of_campaign_s": end_s,
            "wall_s": start_s + max(compute_s, driver_s) + end_s,
            "limit": "compute" if compute_s >= driver_s else "driver",
        }
    out["projection"] = {
        "runs": n,
        "cores_per_node": args.cores_per_node,
        "node_runs_per_s": node_runs_per_s,
        "driver_per_run_s": driver_per_run_s,
        **projection,
    }
    out["machine"] = machine(load_before)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
