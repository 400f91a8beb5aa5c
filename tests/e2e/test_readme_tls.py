"""The README's Modbus/TLS session does what it says (``tests/test_readme.py`` checks only that
it exits 0): run by bash in a scratch directory (``hw_bridge`` and ``.venv`` linked from the
repository), with only the TCP port, the CGM's pty path and the run's ``--out`` substituted,
every command reaches the pump with the rig's role ``operator``, and none with ``monitor``
(read only: exception 01 on each write)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.test_readme import readme_blocks
from twinloop.agents.recording import read_channel

NEEDS = not shutil.which("openssl") or not shutil.which("bash")
pytestmark = [pytest.mark.hil, pytest.mark.skipif(NEEDS, reason="needs openssl and bash")]

REPO = Path(__file__).resolve().parents[2]


def tls_block() -> str:
    """The README's ``sh`` block that serves the pump over Modbus/TLS."""
    return next(b.text for b in readme_blocks() if b.lang == "sh" and "--tls" in b.text) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_block(tmp_path: Path, role: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    work = tmp_path / role
    work.mkdir()
    for name in ("hw_bridge", ".venv"):
        (work / name).symlink_to(REPO / name)
    port = _free_port()
    block = tls_block()
    script = (
        block.replace("8020", str(port))
        .replace("/tmp/tl-cgm", str(work / "cgm"))
        .replace("--minutes 60", "--minutes 60 --out run")
        .replace("UTF8String:operator", f"UTF8String:{role}")
    )
    assert script.count(str(port)) == 2 and "--out run" in script  # the block is as expected
    done = subprocess.run(
        ["bash", "-e", "-c", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script],
        cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return done, work / "run"


def _acks(run: Path) -> dict[str, list]:
    table = read_channel(run, "pump->acks")
    assert table is not None
    return table.to_pydict()


def test_the_readme_tls_session_runs_as_written(tmp_path: Path) -> None:
    done, run = _run_block(tmp_path, "operator")
    assert done.returncode == 0, done.stderr
    assert "Modbus/TLS (client certificates required)" in done.stdout
    assert "alarm RAISED" not in done.stdout
    acks = _acks(run)
    assert len(acks["delivered"]) >= 10 and all(acks["delivered"])  # 60 min: a command / 5 min


def test_a_monitor_certificate_only_reads(tmp_path: Path) -> None:
    done, run = _run_block(tmp_path, "monitor")
    assert done.returncode == 0, done.stderr
    acks = _acks(run)
    assert acks["delivered"] and not any(acks["delivered"])
    assert all("exception 1" in d for d in acks["detail"])  # 01: the authorization failure
