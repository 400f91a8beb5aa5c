"""The insulin loop end to end on real byte streams: the rig, the emulated pump over Modbus RTU
(socat pty pair) or TCP (loopback), the emulated CGM over its line protocol (a second pty pair),
one virtual patient behind both devices; and the fail-safe when a cable is pulled."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest

from twinloop.hil.glucose.rig import Rig, RigConfig, pump_register_names
from twinloop.hw_bridge.emulators.cgm import CgmEmulator
from twinloop.hw_bridge.emulators.patient import VirtualPatient
from twinloop.hw_bridge.emulators.pump import PumpEmulator
from twinloop.hw_bridge.line import LineTransport
from twinloop.hw_bridge.modbus_client import ModbusDevice
from twinloop.hw_bridge.profile import DeviceProfile, load_profile, shipped_profile
from twinloop.hw_bridge.pty import PtyPair

pytestmark = pytest.mark.hil

#: Wall seconds per simulated minute: a 5-min control period is 250 ms, a watchdog step 50 ms
#: (an RTU transaction at 115200 baud with honest wire time takes ~5 ms, and the emulators
#: share this process and its GIL with the rig).
SCALE = 0.05
PERIOD_MIN = 5


class Bench:
    """Patient, emulated pump and CGM, and the rig's ends of the cables."""

    def __init__(self, *, tcp: bool = False, scale: float = SCALE) -> None:
        self.patient = VirtualPatient("adult#003", seed=5, wall_s_per_sim_min=scale)
        self.pump = PumpEmulator(self.patient)
        self.closers: list[contextlib.AbstractContextManager[object] | object] = []
        profile: DeviceProfile
        if tcp:
            self.pump_server = self.pump.start_tcp("127.0.0.1", 0)
            host, port = self.pump_server.tcp_address  # type: ignore[misc]
            profile = load_profile(shipped_profile("insulin_pump_tcp"))
            profile = profile.with_overrides(tcp=f"{host}:{port}")
        else:
            self.pump_pair = PtyPair()
            self.pump_server = self.pump.start_rtu(
                self.pump_pair.b, baudrate=115200, parity="N", stopbits=2
            )
            profile = load_profile(shipped_profile("insulin_pump_rtu"))
            profile = profile.with_overrides(port=self.pump_pair.a)
        self.profile = profile
        self.cgm_dir = tempfile.mkdtemp(prefix="twinloop-e2e-")
        self.cgm_pair = PtyPair(self.cgm_dir)
        self.cgm_link = self.cgm_pair.a
        self.cgm = CgmEmulator(self.patient, self.cgm_pair.b, seed=5, baudrate=115200)
        self.cgm.start()
        self.patient.start()

    def pull_cgm_cable(self) -> None:
        self.cgm.stop()
        self.cgm_pair.close()

    def plug_cgm_cable(self) -> None:
        self.cgm_pair = PtyPair(self.cgm_dir)
        self.cgm = CgmEmulator(self.patient, self.cgm_pair.b, seed=6, baudrate=115200)
        self.cgm.start()

    def close(self) -> None:
        self.patient.stop()
        self.cgm.stop()
        self.cgm_pair.close()
        self.pump_server.stop()
        self.pump.close()
        if hasattr(self, "pump_pair"):
            self.pump_pair.close()
        shutil.rmtree(self.cgm_dir, ignore_errors=True)


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.close()


@pytest.fixture
def tcp_bench() -> Iterator[Bench]:
    b = Bench(tcp=True)
    yield b
    b.close()


def _run(bench: Bench, steps: int, on_step=None, messages=None) -> Rig:  # type: ignore[no-untyped-def]
    # in one process with the emulators, steps can be late: stale after 4 missed samples
    cfg = RigConfig(patient="adult#003", wall_s_per_sim_min=SCALE, minutes=None, cgm_stale_min=20)
    with (
        ModbusDevice(bench.profile) as pump,
        LineTransport(bench.cgm_link, baudrate=115200, timeout_s=0.05) as cgm,
    ):
        rig = Rig(cfg, pump=pump, cgm=cgm, pump_registers=pump_register_names(bench.profile))
        if messages is not None:
            rig.listen(lambda channel, m: messages.setdefault(channel, []).append(m))
        rig.run(steps=steps, on_step=on_step)
    return rig


@pytest.mark.parametrize("transport", ["rtu", "tcp"])
def test_the_loop_runs_on_the_emulated_devices(transport, bench, tcp_bench):
    b = bench if transport == "rtu" else tcp_bench
    delivered_before = b.pump.status().delivered_total_u
    messages: dict[str, list] = {}
    rig = _run(b, steps=12 * 5, messages=messages)  # 60 simulated minutes
    assert not rig.alarm_log
    readings = [m.glucose_mg_dl for m in rig.glucose_log]
    assert len(readings) >= 8  # one per 5-min sample
    truth = b.patient.latest.gsub_mg_dl
    assert abs(readings[-1] - truth) < 40  # the CGM reports this patient's glucose
    status = b.pump.status()
    assert status.temp_basal_active  # the rig's commands reached the pump
    assert status.delivered_total_u > delivered_before
    # the rig's deliveries are the pump's own totals (all but the minutes before its first
    # and after its last read: at most two control periods of basal)
    accounted = sum(d.total_u for d in messages["actuator->plant"])
    pumped = status.delivered_total_u - delivered_before
    assert accounted > 0.2
    assert accounted <= pumped + 1e-6
    assert pumped - accounted < 2 * PERIOD_MIN / 60 * rig.supervisor.config.max_temp_basal_u_per_h
    commands = messages["supervisor->actuator"]
    assert len(commands) >= 10  # a command every control tick


def test_pulling_the_cgm_cable_puts_the_pump_in_its_safe_state_within_two_periods(bench):
    events: dict[str, float] = {}
    cut_step = 40
    back_step = 110

    def on_step(k: int) -> None:
        if k == cut_step:
            events["cut_wall_s"] = rig_ref[0]._wall_s()
            bench.pull_cgm_cable()
        if k == back_step:
            bench.plug_cgm_cable()

    rig_ref: list[Rig] = []
    original = Rig.run

    def run_capturing(self, **kw):  # type: ignore[no-untyped-def]
        rig_ref.append(self)
        return original(self, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Rig, "run", run_capturing)
        rig = _run(bench, steps=180, on_step=on_step)
    raised = [a for a in rig.alarm_log if a.active]
    cleared = [a for a in rig.alarm_log if not a.active]
    assert raised and raised[0].source == "cgm" and raised[0].condition == "communication lost"
    assert "safe state written" in raised[0].action
    # within two control periods of the cut, in the rig's time and on the wall clock
    cut_t_min = cut_step * PERIOD_MIN / rig.config.watchdog_steps
    assert raised[0].t_min - cut_t_min <= 2 * PERIOD_MIN
    failsafe_s = raised[0].wall_s - events["cut_wall_s"]
    print(f"fail-safe after the CGM cable was pulled: {failsafe_s * 1000:.0f} ms "
          f"({failsafe_s / (PERIOD_MIN * SCALE):.2f} control periods)")  # fmt: skip
    # the pump really is in the safe state: no temp basal (scheduled basal), no bolus
    writes = [w for w in rig.safe_state_writes if w[0] >= raised[0].wall_s - 1e-9]
    assert {name for _, name, result in writes if result is None} >= {
        "command",
        "temp_basal_duration_min",
    }
    # recovery once the cable is back: alarm cleared, control resumed
    assert cleared and cleared[0].source == "cgm" and "control resumed" in cleared[0].action
    assert bench.pump.status().temp_basal_active  # the controller commands again


def test_pulling_the_pump_cable_raises_the_alarm_and_the_pump_falls_back_alone(bench):
    cut_step = 30
    state: dict[str, object] = {}

    def on_step(k: int) -> None:
        if k == cut_step:
            state["temp_before"] = bench.pump.status().temp_basal_active
            state["clock_at_cut"] = bench.pump.status().pump_clock_min
            bench.pump_pair.close()  # the cable between rig and pump is gone

    rig = _run(bench, steps=cut_step + 3 * 5 * 5, on_step=on_step)
    raised = [a for a in rig.alarm_log if a.active]
    assert raised and raised[0].source == "pump"
    assert raised[0].condition == "communication lost"
    cut_t_min = cut_step * PERIOD_MIN / rig.config.watchdog_steps
    assert raised[0].t_min - cut_t_min <= 2 * PERIOD_MIN
    assert state["temp_before"] is True
    # the rig could not write; the pump's own temp basal (2 periods long) ran out by itself
    status = bench.pump.status()
    assert not status.temp_basal_active
    assert status.pump_clock_min - int(state["clock_at_cut"]) > 2 * PERIOD_MIN  # type: ignore[call-overload]


def test_no_server_thread_is_left_behind():
    names = {t.name for t in threading.enumerate()}
    assert not any("pump" in n or "virtual-patient" in n or "hil-rig" in n for n in names)
