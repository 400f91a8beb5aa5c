"""Warm numba's on-disk cache so that no command compiles on its first run.

``python -m twinloop.cli.warmup`` (the last step of ``scripts/install.sh``) runs each command's
compiled kernels once, with the argument types the commands use — by running the commands
themselves on the smallest inputs that take the same code paths, in a scratch directory:

* ``population sample`` with a batch large enough for the parallel kernel
  (:data:`twinloop.plant.glucose.uva_padova.PARALLEL_MIN_BATCH`);
* ``run`` of one glucose patient for one day under every shipped glucose controller (the twin
  estimator's kernels, and any a controller compiles), in process;
* ``run --therapy knee-exo`` (the knee's compiled environment step), in process;
* one step of the Gymnasium vector environments ``twinloop/T1D-v0`` and
  ``twinloop/KneeExo-v0`` (what ``train`` and learned policies step; serial kernels only).

Every ``numba.njit`` kernel of the package carries ``cache=True``: its machine code goes to
``__pycache__`` beside its source, keyed by a hash of that source's contents (numba ≥ 0.61), so
a copy of the clone elsewhere, or a later checkout of an unchanged file, still finds it; a
changed source compiles afresh (and :mod:`twinloop.plant.numba_cache` handles kernels that
compile in other modules' functions). Ray workers read the same files.

It prints one line: how many kernels were compiled and how many were already cached. Exit
status 0, or 1 when a step failed (the install is still usable: that command compiles on its
first run).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: Controllers whose loop the warm-up runs (the learned ``policy:PATH`` ones load torch, no numba).
GLUCOSE_CONTROLLERS = ("basal-bolus", "pid", "oref0", "mpc")


def _commands(scratch: Path) -> Iterator[tuple[str, list[str]]]:
    """Each warm-up step's label and ``twinloop`` arguments."""
    from twinloop.plant.glucose.uva_padova import PARALLEL_MIN_BATCH

    # per age group a first batch of 2·n/3 draws: the parallel kernel, then the serial one
    n = PARALLEL_MIN_BATCH * 2
    yield (
        "population sample",
        ["population", "sample", "--n", str(n), "--out", str(scratch / "pop.parquet")],
    )
    for controller in GLUCOSE_CONTROLLERS:
        yield (
            f"run ({controller})",
            [
                "run", "--placement", "inline", "--patient", "adult#001", "--days", "1",
                "--controller", controller, "--no-progress", "--no-report", "--out",
                str(scratch / controller),
            ],
        )  # fmt: skip
    yield (
        "run --therapy knee-exo",
        [
            "run",
            "--therapy",
            "knee-exo",
            "--no-progress",
            "--no-report",
            "--out",
            str(scratch / "knee"),
        ],
    )


def _step_envs() -> int:
    """One reset and step of each vector environment (``train``'s compiled steps); 0."""
    import numpy as np

    from twinloop.plant.glucose.env_vector import T1DVectorEnv
    from twinloop.plant.knee.env_vector import KneeExoVectorEnv

    for env in (T1DVectorEnv(num_envs=2), KneeExoVectorEnv(num_envs=2)):
        env.reset(seed=0)
        space = env.action_space
        env.step(np.zeros(space.shape or (), dtype=np.dtype(space.dtype or np.float32)))
        env.close()
    return 0


def kernel_stats() -> tuple[int, int]:
    """(signatures compiled, signatures loaded from the cache) by this process's kernels."""
    from numba.core.dispatcher import Dispatcher

    compiled = loaded = 0
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("twinloop.") or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and id(value) not in seen:
                seen.add(id(value))
                compiled += sum(value.stats.cache_misses.values())
                loaded += sum(value.stats.cache_hits.values())
    return compiled, loaded


def warm(log: Callable[[str], None] = print) -> bool:
    """Run every warm-up step; return True when all of them succeeded."""
    from twinloop.cli.main import main as twinloop_main

    ok = True
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="twinloop-warmup-") as tmp:
        steps: list[tuple[str, Callable[[], int]]] = [
            (label, lambda argv=argv: twinloop_main(argv))  # type: ignore[misc]
            for label, argv in _commands(Path(tmp))
        ]
        steps.append(("vector environments", _step_envs))
        for label, step in steps:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    status = step()
            except Exception as exc:  # a failed step leaves that command to compile later
                status, out = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
            if status != 0:
                ok = False
                tail = out.getvalue().strip().splitlines()[-1:] or ["(no output)"]
                log(f"warm-up: {label} failed (exit {status}): {tail[0]}")
    compiled, loaded = kernel_stats()
    log(
        f"warm-up: {compiled} kernel signature(s) compiled, {loaded} already cached, "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return ok


if __name__ == "__main__":
    sys.exit(0 if warm() else 1)
