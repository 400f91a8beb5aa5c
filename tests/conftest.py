"""Shared fixtures: the simglucose scenario-A reference trajectories from ../shared, the
embedded Ray session, and the thread/process-leak check every test runs under."""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Where the reference trajectories are: $TWINLOOP_REFERENCE_DIR or ../shared/reference."""
    env = os.environ.get("TWINLOOP_REFERENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "reference" / "simglucose-A"


@dataclasses.dataclass(frozen=True)
class Reference:
    patients: tuple[str, ...]
    insulin_u_per_min: np.ndarray  # (30, 1440)
    meal_g: np.ndarray  # (30, 1440) meal sizes at their start minute
    bg_mg_dl: np.ndarray  # (30, 1441)
    gsub_mg_dl: np.ndarray  # (30, 1441)


# -- the leak check ---------------------------------------------------------------------------
LEAK_GRACE_S = 2.0  # how long a test's threads and child processes get to end after it
# Threads that may legitimately outlive the test that started them (matched on the name's start):
SESSION_THREAD_PREFIXES = (
    # Ray's driver threads: the Ray session is shared by the whole test run (``ray_started``,
    # or product code calling start_ray) and only ends with ray.shutdown() or the process.
    "ray_",  # ray_listen_error_messages (and ray_print_logs, ray_import_thread if enabled)
    "PythonGCThread",  # Ray's periodic gc.collect() thread in the driver
    # tqdm's TMonitor: one per process, started with the first progress bar shown, never
    # stopped by tqdm (4.70) even when every bar is closed.
    "tqdm_monitor",
    # pytest-timeout's timer (timeout_method = thread): started before the test, cancelled after.
    "pytest_timeout ",
)


def _session_thread(thread: threading.Thread) -> bool:
    return thread.name.startswith(SESSION_THREAD_PREFIXES)


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads or child processes (multiprocessing) behind.

    Whatever ran before the test (module or session fixtures, the Ray session) is ignored; what
    the test started gets ``LEAK_GRACE_S`` after its teardown to end. Ray's own processes are not
    multiprocessing children and are not seen here. ``@pytest.mark.known_leak(ThreadClass,
    reason=...)`` excuses threads of that class for one test: a product bug, reported, not hidden.
    """
    marker = request.node.get_closest_marker("known_leak")
    excused = tuple(marker.args) if marker else ()
    threads_before = set(threading.enumerate())
    children_before = set(multiprocessing.active_children())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before
            and t.is_alive()
            and not _session_thread(t)
            and type(t).__name__ not in excused
        ]
        children = [p for p in multiprocessing.active_children() if p not in children_before]
        if not (threads or children) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if threads or children:
        left = [f"thread {t.name!r} ({type(t).__name__})" for t in threads] + [
            f"process {p.name!r} (pid {p.pid})" for p in children
        ]
        pytest.fail(f"left running {LEAK_GRACE_S:g} s after the test: {', '.join(left)}")


@pytest.fixture(scope="session")
def reference_a() -> Reference:
    folder = reference_dir()
    if not folder.is_dir():
        pytest.fail(f"reference trajectories not found in {folder}; set TWINLOOP_REFERENCE_DIR")
    names, ins, meals, bg, gs = [], [], [], [], []
    for path in sorted(folder.glob("*_[0-9][0-9][0-9].csv")):
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        names.append(rows[0]["patient"])
        ins.append([float(r["insulin_U_per_min"]) for r in rows[:-1]])
        meals.append([float(r["cho_announced_g"]) for r in rows[:-1]])
        bg.append([float(r["bg_mg_dl"]) for r in rows])
        gs.append([float(r["gsub_mg_dl"]) for r in rows])
    assert len(names) == 30, f"expected 30 reference patients in {folder}, found {len(names)}"
    return Reference(tuple(names), np.array(ins), np.array(meals), np.array(bg), np.array(gs))


@pytest.fixture
def ray_started():
    """The embedded Ray of this test session (started on first use, loopback only)."""
    pytest.importorskip("ray")
    from twinloop.agents.placement import start_ray

    start_ray(num_cpus=2)
    yield


@pytest.fixture
def loopback_cluster():
    """A two-node Ray cluster on 127.0.0.1 (a head and a second node, one CPU each) started
    with the ``ray`` CLI; yields ``(address, env)`` and stops every Ray process after."""
    import os
    import shutil
    import subprocess
    import sys

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_cli) and shutil.which("ray") is None:
        pytest.skip("ray CLI not installed")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = "6397"
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", port,
         "--include-dashboard", "false", *common],
        check=True, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        subprocess.run(
            [ray_cli, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address",
             "127.0.0.1", *common],
            check=True, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def pytest_collection_modifyitems(config, items):
    """Tests that stop every Ray process on the machine (``ray_cluster``) run last."""
    items.sort(key=lambda item: item.get_closest_marker("ray_cluster") is not None)
