"""Wall time of the README's training examples, as a user runs them (one JSON object).

    .venv/bin/python benchmarks/readme_training.py                  # both, side by side
    .venv/bin/python benchmarks/readme_training.py --only sb3       # the SB3 snippet only
    .venv/bin/python benchmarks/readme_training.py --default-n-steps  # + PPO's default n_steps

Each example runs in a fresh Python process (imports, the numba cache's load and torch's start
are in the time, as for a user; the numba cache is warm, as after ``scripts/install.sh``):

* ``sb3`` — the README's stable-baselines3 code block (the one calling ``SB3VecEnv(``), taken
  from README.md itself, so the figure is of the text a user copies;
* ``sb3_default_n_steps`` (``--default-n-steps``) — the same block with PPO's default
  ``n_steps`` (2048) and ``batch_size`` (64), what the README showed before (slow: minutes);
* ``train`` — ``twinloop train policies/configs/t1d_ppo.yaml`` (1 M steps, 64 envs), the
  README's ``twinloop train`` command, without progress bar, into a temporary directory.

The machine's load average is printed before and after: the 2-core machine is shared, and the
figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def readme_sb3_block() -> str:
    """The README's Python code block that trains PPO through ``SB3VecEnv``."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "SB3VecEnv(" in b]
    return block


def _timed(cmd: list[str], cwd: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": round(seconds, 1), "returncode": proc.returncode}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-600:]
    ep = re.findall(r"ep_rew_mean\s*\|\s*([-\d.e+]+)", proc.stdout)
    if ep:
        out["ep_rew_mean_last"] = float(ep[-1])
    steps = re.findall(r"(\d+) steps in", proc.stdout)
    if steps:
        out["steps"] = int(steps[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the examples and print the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("sb3", "train"), help="one example only")
    ap.add_argument(
        "--default-n-steps", action="store_true", help="also the snippet with PPO's default n_steps"
    )
    args = ap.parse_args(argv)
    py = sys.executable
    result: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sb3"):
            block = readme_sb3_block()
            result["sb3"] = _timed([py, "-c", block], tmp)
            if args.default_n_steps:
                default = re.sub(r"n_steps=\d+, batch_size=\d+, ", "", block)
                result["sb3_default_n_steps"] = _timed([py, "-c", default], tmp)
        if args.only in (None, "train"):
            twinloop = str(Path(py).parent / "twinloop")
            config = str(ROOT / "policies" / "configs" / "t1d_ppo.yaml")
            cmd = [twinloop, "train", config, "--out", tmp + "/train", "--no-progress"]
            result["train"] = {"command": "twinloop train policies/configs/t1d_ppo.yaml"}
            result["train"].update(_timed(cmd, tmp))
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
