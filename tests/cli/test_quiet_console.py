"""Ray's own messages stay off the console of a twinloop command unless ``--verbose``.

A real ``twinloop run --placement ray`` in a subprocess (its own embedded Ray, as a user's
command has): Ray's token-authentication notice, its C++ core's lines (``network_util.cc``: no
route out, under ``scripts/offline.sh``) and its loggers go to the log file in
``$TWINLOOP_LOG_DIR``, which the command's status line names; with ``--verbose`` they are on the
console and no log file is written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: A line Ray writes itself: its C++ log format (``[2026-12-07 06:09:58,273 W 3287 3287]
#: network_util.cc:330: ...``), its Python loggers' (``... WARNING worker.py:123 -- ...``) or its
#: token-authentication notice.
RAY_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \S+\.cc:\d+"
    r"|\b(?:INFO|WARNING|ERROR) \S+\.py:\d+ --"
    r"|Token authentication is (?:enabled|disabled)"
)


def _run_on_ray(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    logs = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default mode
    env |= {"TWINLOOP_LOG_DIR": str(logs), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "twinloop", "run", "--patient", "adult#001", "--placement", "ray",
         "--out", str(tmp_path / "run"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, logs


def _ray_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if RAY_LINE.search(line)]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_messages_go_to_the_log_file_unless_verbose(tmp_path: Path) -> None:
    proc, logs = _run_on_ray(tmp_path / "quiet")
    assert _ray_lines(proc.stderr) == [], proc.stderr
    [log] = logs.glob("ray-*.log")
    assert str(log.name) in proc.stderr  # the status line says where Ray's messages are
    text = log.read_text()
    assert "Token authentication is enabled" in text  # Ray's notice, moved, not dropped
    assert "Ray's processes log in " in text  # where Ray's own processes log
    assert "adult#001" in proc.stdout  # our own output is untouched

    proc, logs = _run_on_ray(tmp_path / "verbose", "--verbose")
    assert any("Token authentication is enabled" in line for line in _ray_lines(proc.stderr))
    assert not logs.exists()


ROUTED = """
import logging, warnings
import ray
from twinloop.agents import ray_log
with ray_log.quiet():  # as around ray.init, which leaves the ray logger without handlers
    logging.getLogger("ray").handlers.clear()
logging.getLogger("ray._private.worker").warning("a worker died")
warnings.warn_explicit("deprecated in ray", FutureWarning, ray.__file__, 1)
warnings.warn("ours")
import ray._private.worker as ray_worker  # how the driver prints the raylet's messages
ray_worker.print_to_stdstream({"lines": ["A worker died"], "pid": "raylet", "is_err": False}, False)
"""


def test_ray_s_loggers_and_warnings_after_start_go_to_the_log_file(tmp_path: Path) -> None:
    env = {**os.environ, "TWINLOOP_LOG_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", ROUTED], env=env, capture_output=True, text=True, check=True
    )
    [log] = tmp_path.glob("ray-*.log")
    text = log.read_text()
    assert "WARNING ray._private.worker: a worker died" in text
    assert "FutureWarning: deprecated in ray" in text
    assert "(raylet) A worker died" in text and "worker died" not in proc.stdout
    assert "UserWarning: ours" in proc.stderr  # twinloop's own warnings stay on the console
    assert "worker died" not in proc.stderr and "deprecated in ray" not in proc.stderr


def test_an_unwritable_log_directory_leaves_ray_s_messages_on_the_console(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "TWINLOOP_LOG_DIR": str(blocker / "logs")}  # cannot be created
    proc = subprocess.run(
        [sys.executable, "-c", ROUTED], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "a worker died" in proc.stderr  # Python's last resort: the console


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["evaluate", "--controller", "pid"],
        ["campaign", "glucose_smoke"],
        ["train", "policies/configs/t1d_ppo.yaml"],
        ["twin", "fit", "--each", "log.csv", "--out", "twins"],
        ["twin", "individualize", "--cohort", "adults", "--out", "twins"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_every_command_that_starts_ray_has_verbose(argv: list[str]) -> None:
    from twinloop.cli.main import _parser

    assert _parser().parse_args([*argv, "--verbose"]).verbose is True


def test_only_the_newest_ray_logs_are_kept(tmp_path: Path) -> None:
    import os

    from twinloop.agents.ray_log import prune_logs

    paths = []
    for i in range(7):
        path = tmp_path / f"ray-2026120{i}-000000-{i}.log"
        path.write_text("x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
        paths.append(path)
    other = tmp_path / "notes.txt"  # not a Ray log: never touched
    other.write_text("keep")
    removed = prune_logs(tmp_path, keep=3, spare=paths[0])
    assert sorted(removed) == sorted(paths[1:4])  # the oldest, but the spared one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [paths[0].name, *(p.name for p in paths[4:]), "notes.txt"]
    )
