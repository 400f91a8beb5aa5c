"""The rig's logic against in-memory devices (the byte-stream tests are in tests/e2e)."""

import dataclasses
import json
import threading
import time

import pytest

from twinloop.agents.messages import Alarm
from twinloop.hil.glucose.rig import PUMP_CHANNELS, Rig, RigConfig, RigConfigError, summarize_rig

REGS = {c: c for c in PUMP_CHANNELS}


@dataclasses.dataclass
class Frame:
    glucose_mg_dl: float | None
    status: int = 0


class FakeCgm:
    def __init__(self, glucose=180.0):
        self.glucose = glucose
        self.cut = threading.Event()
        self.connected = True

    def poll(self):
        return [] if self.cut.is_set() else [Frame(self.glucose)]


class FakePump:
    def __init__(self):
        self.writes = []
        self.writes_during_alarm = []
        self.alarm_active = lambda: False
        self.safe_states = 0
        self.down = threading.Event()
        self.total = 0.0

    def read_many(self, names):
        if self.down.is_set():
            raise ConnectionError("no answer")
        self.total += 0.01
        return {n: self.total if n == "delivered_total_u" else 0 for n in names}

    def write(self, name, value, *, retry=True):
        if self.down.is_set():
            raise ConnectionError("no answer")
        self.writes.append((name, value))
        if self.alarm_active():
            self.writes_during_alarm.append((name, value))
        return None

    def apply_safe_state(self):
        if self.down.is_set():
            raise ConnectionError("no answer")
        self.safe_states += 1
        return [("command", None), ("temp_basal_duration_min", None)]


def _rig(pump, cgm, **kw):
    kw.setdefault("cgm_stale_min", 6.0)
    cfg = RigConfig(wall_s_per_sim_min=0.004, minutes=None, **kw)  # 20 ms periods, 4 ms steps
    return Rig(cfg, pump=pump, cgm=cgm, pump_registers=REGS)


def _outage(event, start, end, last):
    """Set ``event`` from step ``start`` to ``end``; stop the run at ``last``."""

    def condition(k):
        if k == start:
            event.set()
        if k == end:
            event.clear()
        return k >= last

    return condition


def _run_until(rig, condition, max_steps=2000):
    def on_step(k):
        if condition(k):
            rig.stop()

    return rig.run(steps=max_steps, on_step=on_step)


def test_commands_reach_the_pump_through_the_supervisor_with_a_short_temp_duration():
    pump, cgm = FakePump(), FakeCgm(glucose=250.0)
    rig = _rig(pump, cgm)
    _run_until(rig, lambda k: k >= 40)
    names = [n for n, _ in pump.writes]
    assert "basal_u_per_h" in names
    durations = {v for n, v in pump.writes if n == "temp_basal_duration_min"}
    assert durations == {10}  # two control periods of 5 min
    cap = rig.supervisor.config.max_temp_basal_u_per_h
    assert all(v <= cap + 1e-9 for n, v in pump.writes if n == "basal_u_per_h")
    assert not rig.alarm_log


def test_stale_cgm_raises_an_alarm_applies_the_safe_state_and_recovers():
    pump, cgm = FakePump(), FakeCgm()
    rig = _rig(pump, cgm)
    pump.alarm_active = lambda: any(a.active for a in rig.alarms.values())
    phase = {"cut_at": None, "back_at": None}

    def condition(k):
        if k == 30:
            cgm.cut.set()
            phase["cut_at"] = k
        if k == 80:
            cgm.cut.clear()
            phase["back_at"] = k
        return k >= 120

    _run_until(rig, condition)
    raised = [a for a in rig.alarm_log if a.active]
    cleared = [a for a in rig.alarm_log if not a.active]
    assert raised and raised[0].source == "cgm" and raised[0].condition == "stale data"
    # written at once, or (a pump exchange in flight: a loaded machine) queued behind it; either
    # way it is written (pump.safe_states below)
    assert raised[0].action.startswith(("safe state written", "control stopped; safe state queued"))
    assert cleared and cleared[0].source == "cgm" and "control resumed" in cleared[0].action
    assert pump.safe_states >= 2  # on the alarm, and again before resuming
    assert pump.writes_during_alarm == []  # only the safe state while the alarm was active
    assert any(n == "basal_u_per_h" for n, _ in pump.writes)  # and control resumed after it
    t_raise = raised[0].t_min
    steps_per_min = rig.config.watchdog_steps / rig.config.control_period_min
    assert 30 / steps_per_min < t_raise <= (30 + 2 * rig.config.watchdog_steps) / steps_per_min


def test_lost_pump_communication_raises_an_alarm_and_recovers_with_the_safe_state_first():
    pump, cgm = FakePump(), FakeCgm()
    rig = _rig(pump, cgm)

    _run_until(rig, _outage(pump.down, 30, 60, 90))
    pump_alarms = [a for a in rig.alarm_log if a.source == "pump"]
    assert [a.active for a in pump_alarms] == [True, False]
    assert "not written" in pump_alarms[0].action  # unreachable: the pump's temp expires alone
    assert "safe state written" in pump_alarms[1].action
    assert isinstance(pump_alarms[0], Alarm)


def test_summary_has_timing_alarms_and_cgm_metrics():
    pump, cgm = FakePump(), FakeCgm(glucose=120.0)
    rig = _rig(pump, cgm)
    stats = _run_until(rig, lambda k: k >= 25)
    summary = summarize_rig(rig, stats)
    assert summary["timing"]["ticks"] == stats.ticks
    assert summary["cgm"]["time_in_range_70_180_pct"] == 100.0
    assert summary["alarms"] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("controller", "magic"),
        ("controller", "mpc"),  # plans on the twin, which the rig does not run
        ("wall_s_per_sim_min", 0),
        ("watchdog_steps", 0),
        ("minutes", 0),
        ("pump_deadline_s", 0),
        ("pump_deadline_s", 61),
        ("pump_deadline_s", True),
    ],
)
def test_bad_rig_settings_name_the_field(field, value):
    with pytest.raises(RigConfigError, match=field):
        RigConfig(**{field: value})


def test_a_pump_profile_without_the_needed_channels_is_refused():
    with pytest.raises(RigConfigError, match="bolus_u"):
        Rig(RigConfig(), pump=FakePump(), cgm=FakeCgm(), pump_registers={"basal_u_per_h": "x"})


def test_an_outage_is_listed_in_the_manifest_the_summary_and_the_report(tmp_path):
    from twinloop.agents.recording import Recorder
    from twinloop.hil.glucose.report import build_hil_report

    pump, cgm = FakePump(), FakeCgm()
    rig = _rig(pump, cgm)
    recorder = Recorder(tmp_path / "run", config={"rig": {"time_scale": 0.004}})
    rig.listen(recorder.listener("rig"))
    recorder.manifest_extra = lambda: {"outages": rig.outages()}
    stats = _run_until(rig, _outage(cgm.cut, 30, 80, 120))
    summary = summarize_rig(rig, stats)
    recorder.finish({"rig": {"time_scale": 0.004}}, summary)
    [outage] = summary["outages"]
    assert outage["source"] == "cgm" and outage["condition"] == "stale data"
    assert outage["start_t_min"] < outage["end_t_min"]
    assert outage["start_wall_s"] < outage["end_wall_s"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["outages"] == summary["outages"]
    report = build_hil_report(tmp_path / "run")
    assert report.summary["outages"] == summary["outages"]  # rebuilt from the alarms channel
    text = report.report_path.read_text()
    assert "## Outages" in text and "| cgm | stale data |" in text


def test_control_stays_stopped_while_another_alarm_is_active():
    pump, cgm = FakePump(), FakeCgm()
    rig = _rig(pump, cgm)
    pump.alarm_active = lambda: any(a.active for a in rig.alarms.values())

    def condition(k):
        if k == 30:
            cgm.cut.set()
            pump.down.set()
        if k == 60:
            pump.down.clear()  # the pump answers again; the CGM is still silent
        if k == 100:
            cgm.cut.clear()
        return k >= 140

    _run_until(rig, condition)
    cleared = [a for a in rig.alarm_log if not a.active]
    assert sorted(a.source for a in cleared) == ["cgm", "pump"]
    other = "pump" if cleared[0].source == "cgm" else "cgm"
    assert f"control stays stopped ({other} alarm active)" in cleared[0].action
    assert "control resumed" in cleared[1].action
    # neither cleared while the CGM was silent, though the pump answered from step 60 on:
    # recovery needs a fresh reading and a pump exchange, both after the outage began
    back_t = 100 * rig.config.control_period_min / rig.config.watchdog_steps
    assert min(a.t_min for a in cleared) >= back_t
    assert pump.writes_during_alarm == []


class SlowPump(FakePump):
    """Each exchange takes about 1.5 watchdog steps."""

    def __init__(self, delay_s):
        super().__init__()
        self.delay_s = delay_s

    def read_many(self, names):
        time.sleep(self.delay_s)
        return super().read_many(names)


def test_a_control_tick_that_finds_the_pump_busy_runs_at_the_next_step():
    cfg = RigConfig(wall_s_per_sim_min=0.02, minutes=None, cgm_stale_min=1000.0)
    pump = SlowPump(delay_s=1.5 * cfg.step_s)
    rig = Rig(cfg, pump=pump, cgm=FakeCgm(glucose=250.0), pump_registers=REGS)
    commands = []
    rig.listen(lambda ch, m: commands.append(m) if ch == "supervisor->actuator" else None)
    periods = 20
    rig.run(steps=periods * cfg.watchdog_steps)
    assert rig.exchanges_skipped > 0  # the watchdog did find the pump thread busy
    assert len(commands) >= periods - 2  # yet (almost) every control period decided
    assert not [a for a in rig.alarm_log if a.source == "pump"]
