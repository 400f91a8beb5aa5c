"""Cold start on a fresh clone: install, warm-up, first and second run of each command; JSON.

    python benchmarks/cold_start.py --clone /work/fresh-cold          # clones this repository
    python benchmarks/cold_start.py --clone /work/fresh-cold --reuse  # an installed clone

Put the clone beside this one (``../shared`` must resolve for the reference data some commands
read). Steps, each timed by wall clock (``time.perf_counter`` around the subprocess):

* ``install_s``: ``sh scripts/install.sh`` on the fresh clone (pip, then the numba warm-up,
  whose own wall ``warmup_s`` it prints); ``install_up_to_date_s``: the same command again;
* ``population_sample``: ``twinloop population sample --n 1000``, first and second run;
* ``main_job``: ``sh scripts/run.sh --no-progress`` (the default placement), first and second
  run, with the loop's own time that the command prints (``loop_s``), and the same job with
  ``--placement inline`` and ``--placement ray-patients`` side by side;
* ``breakdown_s``: what the main job's wall is made of, each part in its own process: Python
  start and imports of ``twinloop run``'s modules, embedded Ray start and shutdown;
* ``main_job_phases_s``: the main job in one process per placement (``ray``, ``inline``,
  ``ray-patients``), the time since the start at which each phase ended: imports, Ray started,
  the loop's first round done (actors up), the loop done and recorded, Ray shut down, the end
  (``--phases-only``: only these, after the up-to-date install);
* ``without_warm_cache``: numba's cache files removed, the first ``population sample`` (what
  the first run cost before the install warmed the cache), then the warm-up again;
* ``kernel_source_changed``: a comment appended to the plant's kernel source: ``install.sh``
  warms again (its stamp), then ``population sample``; the file is restored and re-warmed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
KERNEL_SOURCE = Path("plant/glucose/uva_padova.py")

#: The main job in one process, each phase's end timed from the start (hooks on the placement,
#: the bar's first round and the recording's finish); argv: extra ``twinloop run`` arguments.
PHASES = """
import contextlib, io, json, sys, tempfile, time
t0 = time.perf_counter()
T = {}
import twinloop.cli.main as cli
import twinloop.agents.glucose.run as run
import twinloop.agents.placement as placement
T["imports"] = time.perf_counter()
make, release, first = placement.make_placement, placement.release_placement, run.start_rate_at
finish = run.Recorder.finish
def timed(name, f):
    def g(*a, **k):
        r = f(*a, **k)
        T[name] = time.perf_counter()
        return r
    return g
placement.make_placement = timed("ray_started", make)
placement.release_placement = timed("ray_shut_down", release)
run.start_rate_at = timed("first_round_done", first)
run.Recorder.finish = timed("loop_done_and_recorded", finish)
with contextlib.redirect_stdout(io.StringIO()):
    cli.main(["run", "--out", tempfile.mkdtemp() + "/run", *sys.argv[1:]])
T["end"] = time.perf_counter()
print("PHASES " + json.dumps({k: round(v - t0, 2) for k, v in T.items()}))
"""


def timed(cmd: list[str], cwd: Path, **kw: Any) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"cold_start: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall, p.stdout + p.stderr


def warmup_s(text: str) -> float | None:
    m = re.search(r"warm-up: .* in ([0-9.]+) s", text)
    return float(m.group(1)) if m else None


def loop_s(text: str) -> float | None:
    m = re.search(r"patient-day\(s\) in ([0-9.]+) s", text)
    return float(m.group(1)) if m else None


def drop_numba_cache(clone: Path) -> int:
    n = 0
    for pattern in ("*.nbi", "*.nbc", "*.numba-deps"):
        for f in clone.rglob(pattern):
            if ".venv" not in f.parts:
                f.unlink()
                n += 1
    return n


def phases(clone: Path) -> dict[str, Any]:
    """The main job's phases in one process, per placement (times since the process began)."""
    found: dict[str, Any] = {}
    for placement in ("ray", "inline", "ray-patients"):
        cmd = [str(clone / ".venv/bin/python"), "-c", PHASES, "--placement", placement]
        _, text = timed(["sh", "scripts/offline.sh", *cmd], clone)
        line = next(ln for ln in text.splitlines() if "PHASES " in ln)
        found[placement] = json.loads(line.split("PHASES ", 1)[1])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clone", type=Path, required=True, help="where the fresh clone goes")
    ap.add_argument("--source", type=Path, default=HERE, help="the repository to clone")
    ap.add_argument("--reuse", action="store_true", help="the clone exists and is installed")
    ap.add_argument(
        "--phases-only", action="store_true", help="only the main job's phases (with --reuse)"
    )
    args = ap.parse_args()
    clone = args.clone.resolve()
    out: dict[str, Any] = {"clone": str(clone), "load_avg_start": os.getloadavg()}
    tw = [str(clone / ".venv/bin/twinloop")]
    runs = clone / "bench-runs"

    if not args.reuse:
        if clone.exists():
            sys.exit(f"cold_start: {clone} exists (remove it, or pass --reuse)")
        subprocess.run(["git", "clone", "-q", str(args.source), str(clone)], check=True)
        wall, text = timed(["sh", "scripts/install.sh"], clone)
        out["install_s"] = round(wall, 2)
        out["warmup_s"] = warmup_s(text)
    wall, _ = timed(["sh", "scripts/install.sh"], clone)
    out["install_up_to_date_s"] = round(wall, 3)
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    if args.phases_only:
        out["main_job_phases_s"] = phases(clone)
        print(json.dumps(out, indent=2))
        return

    def population(tag: str) -> float:
        wall, _ = timed(
            [*tw, "population", "sample", "--n", "1000", "--out", str(runs / f"pop-{tag}.pq")],
            clone,
        )
        return round(wall, 2)

    out["population_sample"] = {"first_s": population("1"), "second_s": population("2")}

    def main_job(tag: str, *extra: str) -> dict[str, float | None]:
        wall, text = timed(
            ["sh", "scripts/run.sh", "--no-progress", "--out", str(runs / tag), *extra], clone
        )
        return {"wall_s": round(wall, 2), "loop_s": loop_s(text)}

    out["main_job"] = {
        "first": main_job("run-1"),
        "second": main_job("run-2"),
        "inline": main_job("run-inline", "--placement", "inline"),
        "ray_patients": main_job("run-ray-patients", "--placement", "ray-patients"),
    }
    py = str(clone / ".venv/bin/python")
    imports, _ = timed(
        [py, "-c", "import twinloop.cli.main, twinloop.cli.run, twinloop.agents.glucose.run"],
        clone,
    )
    python_start, _ = timed([py, "-c", "pass"], clone)
    ray_code = (
        "import time; t=time.perf_counter();"
        "from twinloop.agents.placement import start_ray; import ray;"
        "t1=time.perf_counter(); start_ray(); t2=time.perf_counter(); ray.shutdown();"
        "print(f'RAY {t1-t:.3f} {t2-t1:.3f} {time.perf_counter()-t2:.3f}')"
    )
    _, text = timed(["sh", "scripts/offline.sh", py, "-c", ray_code], clone)
    m = re.search(r"RAY ([0-9.]+) ([0-9.]+) ([0-9.]+)", text)
    out["breakdown_s"] = {
        "python_start": round(python_start, 2),
        "imports_of_twinloop_run": round(imports, 2),
        "ray_import": float(m.group(1)) if m else None,
        "ray_start": float(m.group(2)) if m else None,
        "ray_shutdown": float(m.group(3)) if m else None,
    }

    out["main_job_phases_s"] = phases(clone)

    removed = drop_numba_cache(clone)
    cold = population("cold")
    wall, text = timed([py, "-m", "twinloop.cli.warmup"], clone)
    out["without_warm_cache"] = {
        "cache_files_removed": removed,
        "population_sample_first_s": cold,
        "warmup_again_s": round(wall, 2),
        "warmup_line": text.strip().splitlines()[-1],
    }

    source = clone / KERNEL_SOURCE
    original = source.read_text()
    try:
        source.write_text(original + "\n# a change\n")
        wall, text = timed(["sh", "scripts/install.sh"], clone)
        out["kernel_source_changed"] = {
            "file": str(KERNEL_SOURCE),
            "install_s": round(wall, 2),
            "warmup_line": next((ln for ln in text.splitlines() if "warm-up:" in ln), None),
            "population_sample_after_s": population("changed"),
        }
    finally:
        source.write_text(original)
        timed(["sh", "scripts/install.sh"], clone)
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
