"""The README's Modbus/TLS session runs as written: certificates made with openssl, the emulated
pump serving Modbus/TLS, the rig connecting through the profile the block writes. Run by bash in
a scratch directory (``hw_bridge`` and ``.venv`` linked from the repository), with only the TCP
port, the CGM's pty path and the run's ``--out`` substituted; once with the rig's role
``operator`` (every command delivered) and once ``monitor`` (read only: none delivered)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from twinloop.agents.recording import read_channel

NEEDS = not shutil.which("openssl") or not shutil.which("bash")
pytestmark = [pytest.mark.hil, pytest.mark.skipif(NEEDS, reason="needs openssl and bash")]

REPO = Path(__file__).resolve().parents[2]
ANCHOR = "**Modbus/TLS and client roles.**"


def tls_block() -> str:
    """The first ``sh`` code block after the README's Modbus/TLS paragraph."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("```sh\n", text.index(ANCHOR)) + len("```sh\n")
    return text[start : text.index("```\n", start)]


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
