"""``twinloop hil``'s console, captured from real processes: a refused connection is one readable
line (no errno text, no pymodbus ``Repeating....``), and a cable pulled mid-session leaves the
console clean while pymodbus's and the transports' messages go to ``RUN_DIR/hil.log`` — on the
console too only with ``--verbose``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twinloop.hil.console import LOG_NAME
from twinloop.hw_bridge.pty import PtyPair

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[2]
SCALE = "0.05"
NOISE = ("Errno", "Repeating", "pymodbus", "Traceback")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _twinloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinloop", *args]


def test_a_refused_connection_is_one_readable_line(tmp_path: Path) -> None:
    port = _free_port()  # nobody listens there
    out = tmp_path / "run"
    done = subprocess.run(
        _twinloop("hil", "--profile", "insulin_pump_tcp", "--tcp", f"127.0.0.1:{port}",
                  "--cgm-port", str(tmp_path / "cgm"), "--time-scale", SCALE, "--minutes", "10",
                  "--out", str(out), "--wait-s", "0"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"twinloop hil: error: pump at 127.0.0.1:{port}: connection refused — is `twinloop "
        "emulate pump` (or the pump) running there?\n"
    )
    # pymodbus's own account of it is in the run's log
    log = (out / LOG_NAME).read_text()
    assert "Connection refused" in log and "pymodbus" in log


def test_a_port_where_nothing_answers_is_one_readable_line(tmp_path: Path) -> None:
    """The pump's and the CGM's ports exist (pty pairs) but no device is behind them."""
    pump = PtyPair(links=(str(tmp_path / "pump"), None))
    cgm = PtyPair(links=(str(tmp_path / "cgm"), None))
    try:
        done = subprocess.run(
            _twinloop("hil", "--port", str(tmp_path / "pump"), "--cgm-port",
                      str(tmp_path / "cgm"), "--time-scale", SCALE, "--minutes", "10",
                      "--out", str(tmp_path / "run")),
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        pump.close()
        cgm.close()
    assert done.returncode == 2
    assert done.stderr == (
        f"twinloop hil: error: pump at {tmp_path / 'pump'}: no answer — is `twinloop emulate "
        "pump` (or the pump) running there?\n"
    )


def _session(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """An emulator and a 200-min session; the emulator is killed 3 s in (both cables pulled)."""
    pump, cgm, out = tmp_path / "pump", tmp_path / "cgm", tmp_path / "run"
    emulator = subprocess.Popen(
        _twinloop("emulate", "pump", "--rtu-pty", str(pump), "--cgm-pty", str(cgm),
                  "--time-scale", SCALE),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout is not None and "pump: Modbus" in emulator.stdout.readline()
        hil = subprocess.Popen(
            _twinloop("hil", "--port", str(pump), "--cgm-port", str(cgm), "--time-scale", SCALE,
                      "--minutes", "200", "--out", str(out), *extra),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(3.0)
        emulator.terminate()
        emulator.wait(timeout=10)
        stdout, stderr = hil.communicate(timeout=120)
    finally:
        emulator.kill()
        emulator.wait(timeout=10)
    return subprocess.CompletedProcess(hil.args, hil.returncode, stdout, stderr), out


def test_a_pulled_cable_leaves_the_console_clean_and_the_log_has_the_details(tmp_path):
    done, out = _session(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not [word for word in NOISE if word in done.stdout], done.stdout
    assert "alarm RAISED" in done.stdout and "pump communication lost" in done.stdout
    assert f"device log: {out / LOG_NAME}" in done.stdout
    log = (out / LOG_NAME).read_text()
    assert "pymodbus" in log and "port lost" in log  # pymodbus's and the CGM line's messages


def test_verbose_prints_the_device_log_too(tmp_path):
    done, out = _session(tmp_path, "--verbose")
    assert done.returncode == 0, done.stderr
    assert "pymodbus" in done.stderr and "port lost" in done.stderr
    assert "port lost" in (out / LOG_NAME).read_text()  # and still in the log


def test_the_rig_waits_for_an_emulator_that_is_still_starting(tmp_path: Path) -> None:
    """``emulate … &`` then ``hil`` at once (the README's pair): the rig starts first, finds no
    port, says it waits, and runs the session once the emulator's ports appear."""
    pump, cgm = tmp_path / "pump", tmp_path / "cgm"
    hil = subprocess.Popen(
        _twinloop("hil", "--port", str(pump), "--cgm-port", str(cgm), "--time-scale", SCALE,
                  "--minutes", "20", "--out", str(tmp_path / "run")),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.0)  # the rig is up and waiting before the emulator starts
    emulator = subprocess.Popen(
        _twinloop("emulate", "pump", "--rtu-pty", str(pump), "--cgm-pty", str(cgm),
                  "--time-scale", SCALE),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stdout, stderr = hil.communicate(timeout=120)
    finally:
        emulator.kill()
        emulator.wait(timeout=10)
    assert hil.returncode == 0, stderr
    assert stderr.startswith(f"twinloop hil: waiting for pump at {pump} (no such port), up to 10 s")
    assert "timing:" in stdout and "alarm RAISED" not in stdout


def test_a_device_that_never_comes_is_refused_after_the_wait(tmp_path: Path) -> None:
    port = _free_port()
    done = subprocess.run(
        _twinloop("hil", "--profile", "insulin_pump_tcp", "--tcp", f"127.0.0.1:{port}",
                  "--cgm-port", str(tmp_path / "cgm"), "--time-scale", SCALE, "--minutes", "10",
                  "--out", str(tmp_path / "run"), "--wait-s", "1"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"twinloop hil: waiting for pump at 127.0.0.1:{port} (connection refused), up to 1 s…",
        f"twinloop hil: error: pump at 127.0.0.1:{port}: connection refused after waiting 1 s — "
        "is `twinloop emulate pump` (or the pump) running there?",
    ]
