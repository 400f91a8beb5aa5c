"""Emulator and rig on one time scale: the emulated devices announce theirs (the pump's input
register, the CGM's ``INFO`` answer) and the rig refuses another at connect, in one line; a
device that announces nothing (a real one) is judged from its data rate, and a mismatch raises
an alarm with the same hint. Real emulators over Modbus RTU on a pty, Modbus TCP and the CGM's
line protocol on a pty; ``twinloop hil`` against a ``twinloop emulate`` process."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_hil_rig import Bench
from twinloop.hil.glucose.rig import (
    TIME_SCALE_CHANNEL,
    TIME_SCALE_CONDITION,
    Rig,
    RigConfig,
    pump_register_names,
)
from twinloop.hil.time_scale import HINT, ClockRateCheck, TimeScaleMismatch
from twinloop.hw_bridge.line import Ack, LineTransport
from twinloop.hw_bridge.modbus_client import ModbusDevice

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[2]
RIG_SCALE = 0.05


@pytest.fixture
def devices(request: pytest.FixtureRequest) -> Iterator[Bench]:
    scale, tcp = request.param
    bench = Bench(tcp=tcp, scale=scale)
    yield bench
    bench.close()


@contextlib.contextmanager
def _connected(d: Bench) -> Iterator[tuple[ModbusDevice, LineTransport]]:
    with (
        ModbusDevice(d.profile) as pump,
        LineTransport(d.cgm_link, baudrate=115200, timeout_s=0.2) as cgm,
    ):
        yield pump, cgm


def _rig(d: Bench, pump: Any, cgm: Any, profile: Any = None) -> Rig:
    cfg = RigConfig(patient="adult#003", wall_s_per_sim_min=RIG_SCALE, minutes=None,
                    cgm_stale_min=20)  # fmt: skip
    regs = pump_register_names(profile or d.profile)
    return Rig(cfg, pump=pump, cgm=cgm, pump_registers=regs,
               device_names={"pump": "emulated pump", "cgm": "emulated cgm"})  # fmt: skip


@pytest.mark.parametrize("devices", [(1.0, False), (1.0, True)], indirect=True,
                         ids=["rtu", "tcp"])  # fmt: skip
def test_a_rig_refuses_an_emulator_at_another_time_scale(devices: Bench) -> None:
    with _connected(devices) as (pump, cgm):
        rig = _rig(devices, pump, cgm)
        with pytest.raises(TimeScaleMismatch) as caught:
            rig.check_time_scale()
    assert str(caught.value) == f"emulated pump runs at time scale 1, this rig at 0.05: {HINT}"
    # the CGM announces it too, on its own line
    with LineTransport(devices.cgm_link, baudrate=115200, timeout_s=0.2) as cgm:
        assert cgm.command("INFO") == Ack("INFO", "1")


@pytest.mark.parametrize("devices", [(RIG_SCALE, False), (RIG_SCALE, True)], indirect=True,
                         ids=["rtu", "tcp"])  # fmt: skip
def test_a_rig_accepts_an_emulator_at_its_time_scale(devices: Bench) -> None:
    with _connected(devices) as (pump, cgm):
        rig = _rig(devices, pump, cgm)
        announced = rig.check_time_scale()
        assert announced == pytest.approx({"pump": RIG_SCALE, "cgm": RIG_SCALE})
        # both announced: neither is judged from its data rate
        assert rig.rate_checks == {"pump": None, "cgm": None}
        rig.run(steps=5 * 5)
    assert not rig.alarm_log


class SilentCgm:
    """A CGM transport that cannot be asked anything (a device without ``INFO``)."""

    def __init__(self, transport: LineTransport) -> None:
        self._t = transport

    def poll(self) -> list[Any]:
        return self._t.poll()

    @property
    def connected(self) -> bool:
        return self._t.connected


@pytest.mark.parametrize("devices", [(RIG_SCALE / 4, False)], indirect=True, ids=["rtu"])
def test_devices_that_announce_nothing_are_judged_by_their_data_rate(devices: Bench) -> None:
    """The devices run 4x faster than the rig: without their announcement (a profile without
    the register, a CGM that cannot be asked) the rig's rate checks raise the alarm."""
    profile = dataclasses.replace(
        devices.profile,
        registers=tuple(r for r in devices.profile.registers if r.channel != TIME_SCALE_CHANNEL),
    )
    with (
        ModbusDevice(profile) as pump,
        LineTransport(devices.cgm_link, baudrate=115200, timeout_s=0.2) as line,
    ):
        rig = _rig(devices, pump, SilentCgm(line), profile)
        assert rig.check_time_scale() == {}
        rig.run(steps=30 * 5)  # 30 simulated minutes of the rig, 1.5 s
    mismatches = [a for a in rig.alarm_log if a.active and TIME_SCALE_CONDITION in a.condition]
    assert {a.source for a in mismatches} == {"pump", "cgm"}
    for alarm in mismatches:
        assert f"this rig at 0.05: {HINT}" in alarm.condition
    # latched: fresh data does not clear it, and control stays stopped
    assert not [a for a in rig.alarm_log if not a.active]
    assert all(state.active for state in rig.alarms.values())


def test_the_rate_check_judges_both_directions_and_a_match() -> None:
    fast = ClockRateCheck("dev", 1.0)
    assert fast.observe(0.0, 0) is None
    message = fast.observe(5.0, 200)  # far ahead before the window is over
    assert message is not None and "runs at time scale ~0.025" in message and HINT in message
    slow = ClockRateCheck("dev", 1.0)
    slow.observe(0.0, 10)
    assert slow.observe(10.0, 10) is None  # window not over
    assert slow.observe(20.0, 10) is None  # a clock standing still: stalled, not judged
    message = slow.observe(25.0, 11)
    assert message is not None and "~25 (observed: 1 simulated min in 25 s)" in message
    same = ClockRateCheck("dev", 1.0)
    same.observe(0.0, 0)
    assert same.observe(16.0, 15) is None and same.settled
    # a 16-bit heartbeat that wraps is not a device running backwards
    wraps = ClockRateCheck("dev", 1.0, modulo=65536)
    wraps.observe(0.0, 65530)
    assert wraps.observe(16.0, 10) is None and wraps.settled
    # a restarted device (clock back to 0) starts a new window instead of a verdict
    restarted = ClockRateCheck("dev", 1.0)
    restarted.observe(0.0, 500)
    assert restarted.observe(16.0, 2) is None and not restarted.settled


def test_twinloop_hil_refuses_a_twinloop_emulate_at_another_time_scale(tmp_path: Path) -> None:
    pump_link, cgm_link = tmp_path / "pump", tmp_path / "cgm"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", "pump", "--rtu-pty", str(pump_link),
         "--cgm-pty", str(cgm_link), "--time-scale", "1.0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout is not None
        assert "pump: Modbus" in emulator.stdout.readline()
        hil = subprocess.run(
            [sys.executable, "-m", "twinloop", "hil", "--port", str(pump_link), "--cgm-port",
             str(cgm_link), "--time-scale", "0.05", "--minutes", "60", "--out",
             str(tmp_path / "run")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
    assert hil.returncode == 2, hil.stderr
    assert hil.stderr.strip() == (
        f"twinloop hil: error: pump at {pump_link} runs at time scale 1, this rig at 0.05: {HINT}"
    )
    assert hil.stdout == ""
