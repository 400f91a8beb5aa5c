"""The rig against real emulator processes over socat ptys: owned children, a restart that both
devices recover from (verified by fresh data), a watchdog that keeps ticking on a dead link, and
recordings that survive a SIGKILL of ``twinloop hil``."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.processes import children, command_name, running
from twinloop.agents.recording import INCOMPLETE_MARKER, SEGMENTS_DIR, read_channel
from twinloop.cli.main import main
from twinloop.hil.glucose.rig import Rig, RigConfig, pump_register_names
from twinloop.hw_bridge.emulators.cgm import CgmEmulator
from twinloop.hw_bridge.emulators.patient import VirtualPatient
from twinloop.hw_bridge.line import LineTransport
from twinloop.hw_bridge.modbus_client import ModbusDevice
from twinloop.hw_bridge.profile import load_profile, shipped_profile
from twinloop.hw_bridge.pty import PtyPair

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[2]
#: Wall seconds per simulated minute: 250 ms control periods, 50 ms watchdog steps.
SCALE = 0.05
GUARD_S = 60.0  # the longest any wait below may take before the test fails


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = GUARD_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def _emulator(pump: Path | str, cgm_link: Path, seed: int = 3) -> subprocess.Popen[str]:
    """``twinloop emulate pump``: RTU on the pty link ``pump``, or TCP on ``pump`` = HOST:PORT."""
    where = ["--tcp", pump] if isinstance(pump, str) else ["--rtu-pty", str(pump)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", "pump", *where, "--cgm-pty", str(cgm_link),
         "--time-scale", str(SCALE), "--seed", str(seed)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    assert "pump: Modbus" in banner, banner
    return proc


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _socats(proc: subprocess.Popen[str]) -> list[int]:
    return [c for c in children(proc.pid) if command_name(c) == "socat"]


@pytest.fixture
def links(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield tmp_path / "pump", tmp_path / "cgm"


def test_an_emulator_sigkill_leaves_no_socat_behind(links):
    pump_link, cgm_link = links
    emulator = _emulator(pump_link, cgm_link)
    try:
        socats = _socats(emulator)
        assert len(socats) == 2  # one pty pair per device, both children of the emulator
        emulator.kill()  # SIGKILL: no handler of the emulator runs
        emulator.wait(timeout=10)
        _wait(lambda: not any(running(p) for p in socats), "the socat processes to end", 10)
        _wait(lambda: not pump_link.exists() and not cgm_link.exists(), "the links to go", 10)
    finally:
        emulator.kill()
        emulator.wait(timeout=10)


def test_a_drive_emulator_sigkill_leaves_no_childrunning():
    emulator = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", "drive", "--tcp", "127.0.0.1:0", "--joint",
         "knee"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout is not None
        assert "Modbus TCP on" in emulator.stdout.readline()
        kids = children(emulator.pid)
        assert kids  # the drive's 1 kHz core runs in a process of its own
        emulator.kill()
        emulator.wait(timeout=10)
        _wait(lambda: not any(running(p) for p in kids), "the drive's processes to end", 10)
    finally:
        emulator.kill()
        emulator.wait(timeout=10)


def test_emulate_refuses_a_pty_link_onto_an_existing_file(tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me\n")
    rc = main(["emulate", "pump", "--rtu-pty", str(precious), "--time-scale", "0.05"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "notes.txt" in err and "already exists" in err
    assert "Traceback" not in err
    assert precious.read_text() == "keep me\n"  # not deleted, not replaced by a link
    assert not precious.is_symlink()


def _rig(pump: ModbusDevice, cgm: LineTransport, profile) -> Rig:  # type: ignore[no-untyped-def]
    cfg = RigConfig(patient="adult#001", wall_s_per_sim_min=SCALE, minutes=None, cgm_stale_min=20)
    return Rig(cfg, pump=pump, cgm=cgm, pump_registers=pump_register_names(profile))


@pytest.mark.parametrize("transport", ["rtu", pytest.param("tcp", marks=pytest.mark.slow)])
def test_after_an_emulator_restart_both_devices_recover_and_control_resumes_on_fresh_data(
    links, transport
):
    pump_link, cgm_link = links
    pump_at: Path | str
    if transport == "rtu":
        pump_at = pump_link
        profile = load_profile(shipped_profile("insulin_pump_rtu")).with_overrides(
            port=str(pump_link)
        )
    else:
        pump_at = f"127.0.0.1:{_free_tcp_port()}"
        profile = load_profile(shipped_profile("insulin_pump_tcp")).with_overrides(tcp=pump_at)
    first = _emulator(pump_at, cgm_link)
    old_socats = _socats(first)
    second: subprocess.Popen[str] | None = None
    commands: list = []
    try:
        with (
            ModbusDevice(profile) as pump,
            LineTransport(str(cgm_link), timeout_s=0.05, reconnect_backoff_s=(0.05, 0.5)) as cgm,
        ):
            rig = _rig(pump, cgm, profile)
            rig.listen(lambda ch, m: commands.append(m) if ch == "supervisor->actuator" else None)
            runner = threading.Thread(target=rig.run, name="test-rig-runner")
            runner.start()
            try:
                _wait(lambda: len(rig.glucose_log) >= 3 and len(commands) >= 3, "control")
                first.kill()  # SIGKILL the emulators mid-session
                first.wait(timeout=10)
                _wait(lambda: {a.source for a in rig.alarm_log if a.active} >= {"pump", "cgm"},
                      "both alarms")  # fmt: skip
                _wait(lambda: not pump_link.exists() and not cgm_link.exists(), "old links gone")
                second = _emulator(pump_at, cgm_link, seed=4)
                _wait(lambda: any("control resumed" in a.action for a in rig.alarm_log),
                      "control resumed")  # fmt: skip
                resumed = next(a for a in rig.alarm_log if "control resumed" in a.action)
                _wait(lambda: sum(c.t_min > resumed.t_min for c in commands) >= 3,
                      "decisions after the restart")  # fmt: skip
            finally:
                rig.stop()
                runner.join(timeout=GUARD_S)
        assert not any(running(p) for p in old_socats)  # the dead emulator's socats are gone
        raised = [a for a in rig.alarm_log if a.active]
        start = min(a.t_min for a in raised)
        start_wall = min(a.wall_s for a in raised)
        # resumed only after fresh data: a CGM reading received after the outage began, and
        # every alarm cleared by then; nothing was commanded during the outage
        assert any(start < r.t_min <= resumed.t_min for r in rig.glucose_log)
        assert resumed.wall_s > start_wall
        assert not any(a.active for a in rig.alarms.values())
        assert not [c for c in commands if start < c.t_min < resumed.t_min]
        assert cgm.stats.reconnects + rig.cgm_reopens >= 1  # the CGM came back too
        outages = rig.outages()
        assert {o["source"] for o in outages} == {"pump", "cgm"}
        assert all(o["end_t_min"] is not None and o["end_t_min"] >= o["start_t_min"]
                   for o in outages)  # fmt: skip
        cleared = [a for a in rig.alarm_log if not a.active]
        # "control resumed" only on the last clear, when no alarm remained
        assert ["control resumed" in a.action for a in cleared][-1] is True
        assert sum("control resumed" in a.action for a in cleared) == 1
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)


def test_the_watchdog_keeps_ticking_while_the_pump_link_is_dead(tmp_path):
    """The pump's end of the cable is connected to nothing: each request waits out its
    timeout and retries (0.5 s x 3, then the safe state's writes). The watchdog must go on
    at its period meanwhile (on the old rig, one step blocked ~8 s)."""
    patient = VirtualPatient("adult#001", seed=1, wall_s_per_sim_min=SCALE)
    cgm_pair = PtyPair(tmp_path)
    dead = PtyPair(links=(str(tmp_path / "pump-a"), str(tmp_path / "pump-b")))
    cgm_emu = CgmEmulator(patient, cgm_pair.b, seed=1, baudrate=115200)
    profile = load_profile(shipped_profile("insulin_pump_rtu")).with_overrides(port=dead.a)
    steps = 40  # 2 s of watchdog steps, about one dead request's timeouts and retries
    patient.start()
    cgm_emu.start()
    try:
        with (
            ModbusDevice(profile) as pump,
            LineTransport(cgm_pair.a, baudrate=115200, timeout_s=0.05) as cgm,
        ):
            rig = _rig(pump, cgm, profile)
            ticks: list = []
            rig.listen(lambda ch, m: ticks.append(m) if ch == "clock->ticks" else None)
            stats = rig.run(steps=steps)
    finally:
        cgm_emu.stop()
        patient.stop()
        cgm_pair.close()
        dead.close()
    assert len(ticks) == steps
    pump_alarms = [a for a in rig.alarm_log if a.source == "pump" and a.active]
    assert pump_alarms and pump_alarms[0].condition == "communication lost"
    # raised by the watchdog while the request was still unanswered, not after its retries
    assert "unanswered for" in pump_alarms[0].action
    # the watchdog ran while one exchange was in flight: steps it could not hand over
    assert rig.exchanges_skipped >= steps // 2
    print(f"dead pump link: {steps} watchdog steps of {rig.config.step_s * 1000:.0f} ms, longest "
          f"{max(stats.duration_ms):.1f} ms, {rig.exchanges_skipped} while a request was in "
          "flight")  # fmt: skip


@pytest.mark.slow
def test_a_sigkilled_hil_session_keeps_what_it_flushed(links, tmp_path):
    pump_link, cgm_link = links
    emulator = _emulator(pump_link, cgm_link)
    out = tmp_path / "session"
    flush = 5
    hil = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "hil", "--port", str(pump_link), "--cgm-port",
         str(cgm_link), "--time-scale", str(SCALE), "--minutes", "600", "--flush-every-min",
         str(flush), "--out", str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        folder = out / SEGMENTS_DIR / "clock__ticks"
        _wait(lambda: (folder / "000003.parquet").exists() or hil.poll() is not None,
              "flushed segments")  # fmt: skip
        assert hil.poll() is None, "the session ended before it flushed"
        time.sleep(random.Random(19).uniform(0, flush * SCALE))  # anywhere in an interval
        os.kill(hil.pid, signal.SIGKILL)
        hil.wait(timeout=10)
    finally:
        hil.kill()
        hil.wait(timeout=10)
        emulator.terminate()
        emulator.wait(timeout=10)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and (out / INCOMPLETE_MARKER).exists()
    assert manifest["config"]["rig"]["minutes"] == 600
    assert manifest["recording"]["flush_every_min"] == flush
    assert isinstance(manifest["outages"], list)
    ticks = read_channel(out, "clock->ticks")
    assert ticks is not None
    t = np.asarray(ticks.column("t_min"), dtype=np.float64)
    step_min = 1.0  # 5 watchdog steps per 5-min control period
    assert t[0] == 0.0 and np.allclose(np.diff(t), step_min)  # every step, in order
    # everything up to the last flush is there, which is at most one interval behind the kill
    assert t[-1] >= manifest["recording"]["flushed_through_min"] - step_min
    assert t[-1] >= 3 * flush
    readings = read_channel(out, "sensor->controller")
    assert readings is not None and readings.num_rows >= 2
    # and `twinloop report` reads it (as incomplete)
    assert main(["report", str(out), "--allow-incomplete"]) == 0
    assert "Incomplete run" in (out / "report.md").read_text()
