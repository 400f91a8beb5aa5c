"""The exoskeleton rig's logic against an in-memory drive (the Modbus TCP tests are in tests/e2e).

The fake drive checks every write against the shipped profile exactly as ``ModbusDevice`` does
(``check_write`` raises ``WriteRefused`` before anything is "sent"), keeps a log of what went on
its wire, and runs a minimal CiA 402 state machine. No assertion depends on timing.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from twinloop.agents.knee.supervisor import ExoSupervisorConfig
from twinloop.hil.knee.rig import (
    DRIVE_CHANNELS,
    RULE_PROFILE_LIMIT,
    ExoRig,
    ExoRigConfig,
    ExoRigConfigError,
    ExoRigError,
    drive_register_names,
    profile_torque_limit_nm,
    state_name,
    summarize_exo_rig,
    task_row,
)
from twinloop.hw_bridge.errors import CommunicationError
from twinloop.hw_bridge.profile import check_write, load_profile, shipped_profile
from twinloop.plant.knee.tasks import reference

PROFILE = load_profile(shipped_profile("exo_drive_tcp"))
REGS = drive_register_names(PROFILE)
SOD, RTSO, SO, OE, FAULT = 0x0040, 0x0021, 0x0023, 0x0027, 0x0008


class FakeDrive:
    """A CiA 402 drive in memory, reached "through" the shipped profile."""

    def __init__(
        self, *, state: int = SOD, error: int = 0, max_torque_nm: float = 40.0, watchdog_ms=100
    ) -> None:
        self.state = state
        self.max_torque_nm = max_torque_nm  # maintenance settings: read, never written
        self.watchdog_ms = watchdog_ms
        self.error = error
        self.controlword = 0
        self.wire: list[tuple[str, float]] = []
        self.safe_states = 0
        self.heartbeat = 0
        self.frozen = threading.Event()
        self.down = threading.Event()
        self.refuse_enable = False
        self.angle = math.radians(10.0)

    def read_many(self, names):
        if self.down.is_set():
            raise CommunicationError("exo_drive: read failed after 2 attempt(s): no answer")
        if not self.frozen.is_set():
            self.heartbeat = (self.heartbeat + 10) % 65536
        values = {
            "statusword": self.state | (0x0010 if self.state in (RTSO, SO, OE) else 0),
            "position_rad": self.angle,
            "velocity_rad_s": 0.0,
            "torque_actual_nm": 0.0,
            "torque_demand_nm": 0.0,
            "error_code": self.error,
            "heartbeat": self.heartbeat,
            "max_torque_nm": self.max_torque_nm,
            "watchdog_ms": self.watchdog_ms,
        }
        return {n: values[n] for n in names}

    def write(self, name, value, *, retry=True):
        checked = check_write(PROFILE.register(name), value, device="exo_drive")  # may refuse
        if self.down.is_set():
            raise CommunicationError("exo_drive: write failed: no answer")
        self.wire.append((name, float(checked)))
        if name == "controlword":
            self._controlword(int(checked))
        return None

    def _controlword(self, word: int) -> None:
        previous, self.controlword = self.controlword, word
        if self.state == FAULT:
            if word & 0x80 and not previous & 0x80:
                self.state, self.error = SOD, 0
            return
        if not word & 0x2:
            self.state = SOD
        elif word & 0xF == 0x6 and self.state in (SOD, SO, OE):
            self.state = RTSO
        elif word & 0xF == 0x7 and self.state in (RTSO, OE):
            self.state = SO
        elif word & 0xF == 0xF and self.state in (RTSO, SO) and not self.refuse_enable:
            self.state = OE

    def apply_safe_state(self):
        if self.down.is_set():
            raise CommunicationError("exo_drive: safe state incomplete")
        self.safe_states += 1
        return [(s.register, self.write(s.register, s.value)) for s in PROFILE.safe_state]

    def torques(self):
        return [v for n, v in self.wire if n == "target_torque_nm"]


class Constant:
    def __init__(self, torque_nm):
        self.torque_nm = torque_nm

    def torque(self, obs):
        return self.torque_nm


class Failing:
    def torque(self, obs):
        raise RuntimeError("controller crashed")


def _rig(drive, *, controller=None, **kw):
    kw.setdefault("controller", "impedance")
    kw.setdefault("control_hz", 100)
    kw.setdefault("startup_timeout_s", 0.05)
    cfg = ExoRigConfig(**kw)
    return ExoRig(
        cfg,
        drive=drive,
        registers=REGS,
        torque_limit_nm=profile_torque_limit_nm(PROFILE),
        controller=controller,
    )


def _messages(rig):
    seen: dict[str, list] = {}
    rig.listen(lambda channel, m: seen.setdefault(channel, []).append(m))
    return seen


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("controller", "magic"),
        ("patient", "adult#001"),
        ("task", "marathon"),
        ("seed", -1),
        ("control_hz", 0),
        ("control_hz", 100.0),
        ("seconds", 0),
        ("watchdog_ms", 5),
        ("watchdog_ms", 15),  # < two periods at 100 Hz
        ("alarm_stale_s", 0.01),  # < the supervisor's 30 ms
        ("encoder_stale_s", -1.0),
        ("max_torque_nm", math.nan),
        ("profile", "/nonexistent/drive.yaml"),
        ("profile", "toaster"),
        ("tcp", "localhost"),
        ("startup_timeout_s", 0),
        ("spin_s", 0.01),  # not below the 10 ms period
    ],
)
def test_a_bad_setting_names_its_field(field, value):
    with pytest.raises(ExoRigConfigError) as info:
        ExoRigConfig(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_the_rig_encoder_staleness_replaces_the_supervisors():
    cfg = ExoRigConfig(encoder_stale_s=0.05, alarm_stale_s=0.2)
    assert cfg.supervisor_config().encoder_stale_s == 0.05
    assert (
        ExoRigConfig().supervisor_config().encoder_stale_s == ExoSupervisorConfig().encoder_stale_s
    )


def test_a_profile_without_the_drive_channels_is_refused():
    regs = {c: c for c in DRIVE_CHANNELS if c != "drive_heartbeat"}
    with pytest.raises(ExoRigConfigError, match="drive_heartbeat"):
        ExoRig(ExoRigConfig(), drive=FakeDrive(), registers=regs, torque_limit_nm=30.0)


def test_the_profile_limit_and_the_task_row_the_emulated_patient_draws():
    from twinloop.hw_bridge.emulators.drive.emulator import knee_task_row

    assert profile_torque_limit_nm(PROFILE) == 30.0
    for task in ("cyclic", "sit_to_stand", "hold"):
        for seed in (0, 7):
            assert np.array_equal(task_row(task, seed), knee_task_row(task, seed))
    assert not np.array_equal(task_row("cyclic", 0), task_row("cyclic", 1))


# -- start-up ----------------------------------------------------------------------------------
def test_start_up_resets_a_fault_and_enables_cst_with_watchdog_and_max_torque():
    drive = FakeDrive(state=FAULT, error=0x8130, watchdog_ms=50)
    rig = _rig(drive, watchdog_ms=50)
    rig.enable()
    assert rig.enabled and drive.state == OE
    words = [v for n, v in drive.wire if n == "controlword"]
    assert words == [0x00, 0x80, 0x06, 0x07, 0x0F]
    setup = dict(drive.wire)
    assert setup["modes_of_operation"] == 10
    # the drive's watchdog and torque limit are maintenance settings: read and checked only
    assert "watchdog_ms" not in setup and "max_torque_nm" not in setup
    assert rig.drive_settings == {"max_torque_nm": 40.0, "watchdog_ms": 50.0}
    first_enable = [n for n, _ in drive.wire].index("controlword", 2)
    assert {"modes_of_operation", "target_torque_nm"} <= {n for n, _ in drive.wire[:first_enable]}
    states = [state_name(sw) for _, _, sw in rig.startup]
    assert states[0] == "fault" and states[-1] == "operation enabled"


@pytest.mark.parametrize(
    ("settings", "config"),
    [
        ({"max_torque_nm": 80.0}, {}),  # raised above the 40 N·m the rig accepts
        ({"max_torque_nm": 35.0}, {"max_torque_nm": 30.0}),
        ({"watchdog_ms": 0}, {}),  # switched off
        ({"watchdog_ms": 100}, {"watchdog_ms": 50}),  # longer than the rig accepts
    ],
)
def test_start_up_refuses_a_drive_with_unsafe_maintenance_settings(settings, config):
    drive = FakeDrive(**settings)
    rig = _rig(drive, **config)
    with pytest.raises(ExoRigError, match="maintenance state"):
        rig.enable()
    assert not rig.enabled and drive.state == SOD
    assert drive.safe_states == 1


def test_start_up_from_an_enabled_drive_disables_voltage_first():
    drive = FakeDrive(state=OE)
    _rig(drive).enable()
    assert [v for n, v in drive.wire if n == "controlword"] == [0x00, 0x06, 0x07, 0x0F]


def test_a_drive_that_does_not_enable_is_an_error_and_gets_the_safe_state():
    drive = FakeDrive()
    drive.refuse_enable = True
    rig = _rig(drive)
    with pytest.raises(ExoRigError, match=r"enable operation.*switched on"):
        rig.enable()
    assert not rig.enabled
    assert drive.safe_states == 1
    assert drive.wire[-2:] == [("target_torque_nm", 0.0), ("controlword", 0.0)]


# -- the loop ------------------------------------------------------------------------------------
def test_commands_go_through_the_supervisor_to_the_drive_and_end_in_the_safe_state():
    drive = FakeDrive()
    rig = _rig(drive, seconds=0.3)
    seen = _messages(rig)
    stats = rig.run()
    assert stats.ticks == 30 and rig.ended_by == "completed"
    assert len(seen["sensor->controller"]) == 30
    assert len(seen["task->controller"]) == 30
    assert len(seen["supervisor->actuator"]) == 30
    written = [m.torque_nm for m in seen["actuator->drive"]]
    approved = [m.torque_nm for m in seen["supervisor->actuator"]]
    assert written == approved
    assert any(abs(t) > 0.1 for t in written)  # the impedance pulls toward the reference
    assert drive.torques()[-1] == 0.0 and drive.state == SOD  # safe state: 0 N·m, disabled
    assert drive.safe_states == 1
    assert len(seen["clock->ticks"]) == 30
    t = [m.t_s for m in seen["task->controller"]]
    assert t[0] >= 0.0
    assert np.allclose(np.diff(t), 0.01)


def test_a_command_beyond_the_profile_limit_never_reaches_the_wire():
    drive = FakeDrive()
    rig = _rig(drive, seconds=0.2, controller=Constant(35.0))  # the supervisor allows 40
    seen = _messages(rig)
    rig.run()
    assert max(abs(t) for t in drive.torques()) <= 30.0
    assert 35.0 not in drive.torques()
    refused = seen["actuator->refused"]
    assert len(refused) == 20 and rig.refused_writes == 20
    assert {(o.rule, o.requested_nm, o.approved_nm) for o in refused} == {
        (RULE_PROFILE_LIMIT, 35.0, 0.0)
    }
    assert all(m.torque_nm == 0.0 for m in seen["actuator->drive"])
    assert rig.ended_by == "completed"


def test_the_supervisor_limit_clips_before_the_profile():
    drive = FakeDrive()
    sup = ExoSupervisorConfig(torque_limit_nm=10.0)  # 1.1 N·m of it kept for gear friction
    rig = _rig(drive, seconds=0.1, controller=Constant(-25.0), supervisor=sup)
    rig.run()
    # between the start-up's and the safe state's 0
    assert set(drive.torques()[1:-1]) == {-sup.command_limit_nm}
    assert rig.supervisor.interventions["torque limit"] == 10


def test_a_failing_controller_means_zero_torque():
    drive = FakeDrive()
    rig = _rig(drive, seconds=0.1, controller=Failing())
    seen = _messages(rig)
    rig.run()
    assert set(drive.torques()) == {0.0}
    assert {o.rule for o in seen["supervisor->overrides"]} == {"no command"}
    assert rig.ended_by == "completed"


def test_stale_encoder_data_zeroes_the_torque_then_raises_an_alarm():
    drive = FakeDrive()
    rig = _rig(drive, seconds=2.0, controller=Constant(5.0), alarm_stale_s=0.1)
    seen = _messages(rig)

    def on_tick(k):
        if k == 20:
            drive.frozen.set()  # the heartbeat stops: no fresh position any more

    stats = rig.run(on_tick=on_tick)
    assert stats.ticks < 200
    assert rig.ended_by == "alarm: encoder stale data (0.110 s old)"  # > 0.1 s: 11 ticks
    stale = [o for o in seen["supervisor->overrides"] if o.rule == "stale encoder"]
    assert stale and all(o.approved_nm == 0.0 for o in stale)
    written = seen["actuator->drive"]
    first_stale = stale[0].t_s
    assert all(m.torque_nm == 0.0 for m in written if m.t_s >= first_stale)
    assert all(m.torque_nm == 5.0 for m in written if m.t_s < first_stale)
    # more than 30 ms old (the supervisor's threshold; 3 or 4 ticks as the float rounds)
    assert 0.03 - 1e-9 <= first_stale - seen["sensor->controller"][-1].t_s <= 0.04 + 1e-9
    (alarm,) = seen["rig->alarms"]
    assert alarm.source == "encoder" and "safe state written" in alarm.action
    assert drive.state == SOD and drive.safe_states == 1


def test_lost_communication_raises_an_alarm_and_no_torque_is_commanded_after_it():
    drive = FakeDrive()
    rig = _rig(drive, seconds=2.0, controller=Constant(5.0))
    seen = _messages(rig)

    def on_tick(k):
        if k == 10:
            drive.down.set()

    stats = rig.run(on_tick=on_tick)
    assert stats.ticks < 200
    (alarm,) = seen["rig->alarms"]
    assert alarm.source == "drive" and alarm.condition.startswith("communication lost")
    assert "watchdog" in alarm.action  # the safe state could not be written
    assert rig.ended_by.startswith("alarm: drive communication lost")
    assert all(m.t_s < alarm.t_s for m in seen["actuator->drive"])
    assert len(drive.torques()) == 1 + 11  # start-up, ticks 0..10, nothing after


def test_a_drive_fault_raises_an_alarm_and_applies_the_safe_state():
    drive = FakeDrive()
    rig = _rig(drive, seconds=2.0)
    seen = _messages(rig)

    def on_tick(k):
        if k == 5:
            drive.state, drive.error = FAULT, 0x8130

    rig.run(on_tick=on_tick)
    (alarm,) = seen["rig->alarms"]
    assert alarm.condition == "fault 0x8130 (fault)"
    assert drive.safe_states == 1
    assert rig.ended_by == "alarm: drive fault 0x8130 (fault)"


def test_a_drive_that_leaves_operation_enabled_raises_an_alarm():
    drive = FakeDrive()
    rig = _rig(drive, seconds=2.0)

    def on_tick(k):
        if k == 5:
            drive.state = SO  # someone disabled operation

    rig.run(on_tick=on_tick)
    assert rig.ended_by == "alarm: drive left operation enabled: switched on"


def test_stop_ends_the_session_with_the_safe_state():
    drive = FakeDrive()
    rig = _rig(drive, seconds=60.0)
    rig.run(on_tick=lambda k: rig.stop() if k == 3 else None)
    assert rig.ended_by == "stopped"
    assert drive.state == SOD and drive.torques()[-1] == 0.0


def test_the_summary_has_timing_metrics_and_overrides():
    drive = FakeDrive()
    drive.angle = reference(task_row("cyclic", 0), 0.0)[0]  # the task's start posture
    rig = _rig(drive, seconds=0.3, controller=Constant(35.0))
    stats = rig.run()
    s = summarize_exo_rig(rig, stats)
    assert set(s["timing"]["lateness_ms"]) >= {"p50", "p99", "max"}
    assert s["drive"]["enabled"] is True
    assert s["refused_writes"] == 30
    exo = s["exo"]
    assert exo["limit_violations"] == 0
    assert exo["exo_work_fraction"] is None
    # the fake knee stays where the cyclic task starts and rests for 0.5 s
    assert exo["rms_error_deg"] == pytest.approx(0.0, abs=1e-3)
    assert s["ended_by"] == "completed"
