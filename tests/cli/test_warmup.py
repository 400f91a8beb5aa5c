"""After the install's warm-up, the first run of the commands compiles no kernel.

``python -m twinloop.cli.warmup`` fills numba's on-disk cache (``__pycache__`` beside each
kernel's source, as ``scripts/install.sh`` does); a fresh process then runs ``population sample
--n 1000`` (its parallel and serial kernels) and the main job's loop inline, and counts the
kernel signatures it compiled instead of loading: none.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIRST_RUNS = """
import sys
from twinloop.cli.main import main
from twinloop.cli.warmup import kernel_stats
out = sys.argv[1]
assert main(["population", "sample", "--n", "1000", "--out", out + "/pop.parquet"]) == 0
assert main(["run", "--placement", "inline", "--no-progress", "--out", out + "/run"]) == 0
compiled, loaded = kernel_stats()
print("KERNELS", compiled, loaded)
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_first_runs_after_the_warm_up_load_every_kernel_from_the_cache(tmp_path: Path) -> None:
    warm = subprocess.run(
        [sys.executable, "-m", "twinloop.cli.warmup"], capture_output=True, text=True, timeout=1100
    )
    assert warm.returncode == 0, warm.stdout + warm.stderr
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_RUNS, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("KERNELS"))
    compiled, loaded = map(int, line.split()[1:])
    assert loaded > 0
    assert compiled == 0, f"{compiled} kernel signature(s) compiled after the warm-up"
