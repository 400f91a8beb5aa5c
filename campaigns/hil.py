"""Campaign runs through the HIL rigs: wire faults on an emulated device's Modbus wire.

Knee exoskeleton (:func:`run_exo_hil`): the emulated CiA 402 drive (the knee behind it,
following the cyclic task) on Modbus TCP and the exoskeleton rig at 100 Hz in real time, for
``hil.seconds``; the wire faults switch on the drive's ``WireFaults`` on the rig's clock
(seconds since the drive was enabled), and the rig's alarm ends the session in the safe state.

Insulin (:func:`run_hil`):

A spec with a ``hil:`` block (``twinloop.campaigns.spec``) runs each of its runs as a HIL session on
loopback, in accelerated wall-clock time: a
:class:`~twinloop.hw_bridge.emulators.patient.VirtualPatient` behind the emulated pump (Modbus TCP,
127.0.0.1, a free port) and the emulated CGM (its line protocol over a socat pty pair), the rig
(:class:`twinloop.hil.glucose.rig.Rig`: read, control, supervise, write, with its watchdog and
alarms) driving them through the shipped profile ``insulin_pump_tcp``. The scenario's wire faults
are switched on the pump's :class:`~twinloop.hw_bridge.wire.WireFaults` when the rig's clock enters
their window and off when it leaves it:

================  =====================================================================
fault             switch
================  =====================================================================
timeout           ``drop_response`` (executed, answer lost)
dropped_frame     ``drop`` (not executed, no answer)
modbus_exception  ``exception_code`` = ``code``
delayed_response  ``delay_s`` = ``delay_s`` (wall seconds)
disconnect        ``disconnect(down_s=window)``: the port closes for the window
byte_corruption   ``corrupt_bytes``
duplicated_write  ``duplicate_write``
bad_crc           ``corrupt_crc`` (RTU framing only: refused over TCP)
================  =====================================================================

The pump client's timeout is scaled with the session: half a watchdog step (at least 10 ms)
and no retries instead of the profile's 0.5 s and 2 retries, so that a lost answer costs the
rig one step of its accelerated clock, as half a second costs a real rig. ``delay_s`` of
``delayed_response`` is in wall seconds: give it at that scale (the shipped HIL spec uses
0.05 s, more than the scaled timeout: the answer arrives too late).

The truth is the virtual patient's plasma glucose each simulated minute (its listeners); the
rig's alarms are the detections; ``safe_state_after_lost_communication`` checks that a pump
alarm with the safe state follows each communication-cutting fault within N control periods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from typing import Any

import numpy as np

from twinloop.campaigns.spec import CampaignSpec, Scenario

__all__ = ["COMMUNICATION_LOSS", "WIRE_SWITCH", "run_hil"]

#: Catalogue wire faults → the ``WireFaults`` switch they turn on.
WIRE_SWITCH = {
    "timeout": "drop_response",
    "dropped_frame": "drop",
    "bad_crc": "corrupt_crc",
    "modbus_exception": "exception_code",
    "delayed_response": "delay_s",
    "disconnect": "disconnect",
    "byte_corruption": "corrupt_bytes",
    "duplicated_write": "duplicate_write",
}
#: Wire faults after which the rig must see the pump as lost (alarm and safe state).
COMMUNICATION_LOSS = frozenset({"timeout", "dropped_frame", "disconnect", "modbus_exception"})


def _alarms(log: list[Any], clock: str) -> list[dict[str, Any]]:
    """A rig's alarm log as data (``clock``: the alarm's time field, ``t_min`` or ``t_s``)."""
    return [
        {clock: getattr(a, clock), "source": a.source, "condition": a.condition,
         "action": a.action}
        for a in log
    ]  # fmt: skip


def _lost_communication(
    rid: str, scenario: Scenario, t_alarm: list[float], window: float
) -> dict[str, Any]:
    """Judge ``safe_state_after_lost_communication`` on a rig's alarms.

    Passes when an alarm with the safe state follows each communication-cutting fault's onset
    within ``window`` (the rig's time unit).
    """
    cuts = [f.start for f in scenario.faults if f.fault in COMMUNICATION_LOSS]
    if not cuts:
        return {"id": rid, "pass": None, "why": "no communication-cutting fault"}
    alarms = np.asarray(t_alarm, dtype=np.float64)
    for cut in cuts:
        if not ((alarms >= cut) & (alarms <= cut + window)).any():
            later = alarms[alarms >= cut]
            return {
                "id": rid,
                "pass": False,
                "at": cut,
                "value": float(later.min() - cut) if later.size else None,
            }
    return {"id": rid, "pass": True}


class _Schedule:
    """Switches the scenario's wire faults on and off on the rig's clock."""

    def __init__(self, scenario: Scenario, faults: Any, scale: float) -> None:
        self.lines = list(scenario.faults)
        self.faults = faults
        self.scale = scale
        self.on = [False] * len(self.lines)

    def at(self, t_min: float) -> None:
        for i, line in enumerate(self.lines):
            inside = line.start <= t_min < line.end
            if inside == self.on[i]:
                continue
            self.on[i] = inside
            params = dict(line.params)
            switch = WIRE_SWITCH[line.fault]
            if switch == "disconnect":
                if inside:
                    self.faults.disconnect(down_s=line.duration * self.scale, wait_s=0.0)
                continue
            if inside:
                value: Any = True
                if switch == "exception_code":
                    value = int(params["code"])
                elif switch == "delay_s":
                    value = params["delay_s"]
                self.faults.set(**{switch: value, "probability": params.get("probability", 1.0)})
            else:
                off: Any = (
                    0.0 if switch == "delay_s" else (None if switch == "exception_code" else False)
                )
                self.faults.set(**{switch: off})


def run_hil(spec: CampaignSpec, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one HIL session of the campaign: its verdict (:mod:`~.safety`) and trace."""
    if spec.therapy == "knee-exo":
        return run_exo_hil(spec, key)
    from twinloop.agents.recording import Columns, column_listener
    from twinloop.hil.glucose.rig import Rig, RigConfig, pump_register_names
    from twinloop.hw_bridge.emulators.cgm import CgmEmulator
    from twinloop.hw_bridge.emulators.patient import VirtualPatient
    from twinloop.hw_bridge.emulators.pump import PumpEmulator
    from twinloop.hw_bridge.line import LineTransport
    from twinloop.hw_bridge.modbus_client import ModbusDevice
    from twinloop.hw_bridge.profile import load_profile, shipped_profile
    from twinloop.hw_bridge.pty import PtyPair
    from twinloop.hw_bridge.wire import WireFaults

    assert spec.hil is not None
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # lost frames are the point here
    scale = spec.hil.wall_s_per_sim_min
    scenario = spec.scenario(key.scenario)
    patient = VirtualPatient(key.patient, seed=key.seed, wall_s_per_sim_min=scale, days=1)
    truth: list[tuple[float, float, float]] = []
    patient.listeners.append(lambda m: truth.append((m.t_min, m.bg_mg_dl, m.insulin_u)))
    faults = WireFaults(seed=key.seed)
    pump = PumpEmulator(patient, faults=faults)
    columns: Columns = {}
    cgm_dir = tempfile.mkdtemp(prefix="twinloop-hil-campaign-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, cgm_dir, ignore_errors=True)
        server = pump.start_tcp("127.0.0.1", 0)
        stack.callback(pump.close)
        stack.callback(server.stop)
        host, port = server.tcp_address  # type: ignore[misc]
        profile = load_profile(shipped_profile("insulin_pump_tcp")).with_overrides(
            tcp=f"{host}:{port}"
        )
        # the client's timeout at the session's time scale: half a watchdog step (>= 10 ms),
        # no retries, so that a lost answer costs the rig one step, as 0.5 s costs a real one
        step_s = 5 * scale / 5
        transport = dataclasses.replace(
            profile.transport, timeout_s=max(0.01, step_s / 2), retries=0
        )
        profile = dataclasses.replace(profile, transport=transport)
        pair = PtyPair(cgm_dir)
        stack.callback(pair.close)
        cgm = CgmEmulator(patient, pair.b, seed=key.seed, baudrate=115200)
        cgm.start()
        stack.callback(cgm.stop)
        config = RigConfig(
            patient=key.patient,
            controller=spec.controller,
            wall_s_per_sim_min=scale,
            minutes=spec.hil.minutes,
            cgm_stale_min=20,
        )
        schedule = _Schedule(scenario, faults, scale)
        patient.start()
        stack.callback(patient.stop)
        pump_dev = stack.enter_context(ModbusDevice(profile))
        line = stack.enter_context(LineTransport(pair.a, baudrate=115200, timeout_s=0.05))
        rig = Rig(config, pump=pump_dev, cgm=line, pump_registers=pump_register_names(profile))
        rig.listen(column_listener(columns, key.patient))
        steps_per_min = config.watchdog_steps / config.control_period_min
        rig.run(on_step=lambda k: schedule.at(k / steps_per_min))
        faults.clear()
    return _evaluate(spec, scenario, truth, rig, config, faults.counts)


def _evaluate(
    spec: CampaignSpec,
    scenario: Scenario,
    truth: list[tuple[float, float, float]],
    rig: Any,
    config: Any,
    counts: dict[str, int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    from twinloop.agents.glucose.run import summarize
    from twinloop.campaigns.safety import (
        EPISODE_MIN,
        GLUCOSE_HORIZON_MIN,
        _detections,
        _episodes,
        glucose_labels,
    )
    from twinloop.plant.glucose.patients import get_patient

    minutes = int(spec.hil.minutes) if spec.hil is not None else 0
    rows = [r for r in truth if r[0] <= minutes] or [(0.0, float("nan"), 0.0)]
    t = np.array([r[0] for r in rows])
    bg = np.array([r[1] for r in rows])
    insulin = np.array([r[2] for r in rows])
    p = get_patient(rig.config.patient)
    metrics = summarize([p.name], [p.cohort], bg[None, :])["patients"][p.name]
    onsets = scenario.onsets
    onset = onsets[0] if onsets else None
    labels, masks = glucose_labels(t, bg, onset)
    raised = [a for a in rig.alarm_log if a.active]
    t_alarm = np.array([a.t_min for a in raised])
    detection: dict[str, Any] = {
        **_detections(t_alarm, t, _episodes(masks["below_70"], EPISODE_MIN), GLUCOSE_HORIZON_MIN)
    }
    detection["by_rule"] = {
        f"{a.source}: {a.condition}": sum(
            1 for b in raised if (b.source, b.condition) == (a.source, a.condition)
        )
        for a in raised
    }
    period = float(config.control_period_min)
    verdicts = []
    for req in spec.requirements:
        prm = dict(req.params)
        v: dict[str, Any] = {"id": req.id, "pass": True}
        if req.rule == "safe_state_after_lost_communication":
            safe = [a.t_min for a in raised if a.source == "pump" and "safe state" in a.action]
            v = _lost_communication(req.id, scenario, safe, prm["periods"] * period)
        elif req.rule == "glucose_min":
            v.update({"pass": bool(bg.min() >= prm["threshold_mg_dl"]), "value": float(bg.min())})
        elif req.rule == "glucose_max":
            v.update({"pass": bool(bg.max() <= prm["threshold_mg_dl"]), "value": float(bg.max())})
        elif req.rule == "time_in_range_min":
            tir = float(metrics["time_in_range_70_180_pct"])
            v.update({"pass": tir >= prm["min_pct"], "value": tir})
        else:
            v = {"id": req.id, "pass": None, "why": f"{req.rule} is not judged on HIL runs"}
        verdicts.append(v)
    verdict = {
        "metrics": metrics,
        "labels": labels,
        "first_onset": onset,
        "detection": detection,
        "agent_faults": 0,
        "alarms": _alarms(rig.alarm_log, "t_min"),
        "wire_fault_hits": counts,
        "requirements": verdicts,
    }
    trace = {
        "t_min": t,
        "bg_mg_dl": bg,
        "cgm_mg_dl": np.full(t.size, np.nan),
        "insulin_u": insulin,
        "overrides": np.zeros(t.size, dtype=np.int32),
    }
    return verdict, trace


def run_exo_hil(spec: CampaignSpec, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One exoskeleton HIL session through the exoskeleton rig, with wire faults on the drive.

    The emulated drive (knee behind it, following the task) on Modbus TCP and the rig at
    100 Hz in real time; the faults switch on the drive's ``WireFaults`` on the rig's clock
    (seconds since the drive was enabled).
    """
    from twinloop.hil.knee.rig import ExoRigConfig, run_exo_session
    from twinloop.hw_bridge.emulators.drive.emulator import DriveEmulator, knee_backend
    from twinloop.hw_bridge.wire import WireFaults

    assert spec.hil is not None
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    scenario = spec.scenario(key.scenario)
    faults = WireFaults(seed=key.seed)
    drive = DriveEmulator(knee_backend(key.patient, seed=key.seed, task="cyclic"), faults=faults)
    with drive.start_tcp("127.0.0.1", 0) as server:
        config = ExoRigConfig(
            tcp=f"127.0.0.1:{server.tcp_address[1]}",  # type: ignore[index]
            controller=spec.controller,
            patient=key.patient,
            task="cyclic",
            seed=key.seed,
            seconds=spec.hil.seconds,
        )
        schedule = _Schedule(scenario, faults, 1.0)
        hz = float(config.control_hz)
        session = run_exo_session(config, on_tick=lambda k: schedule.at(k / hz))
        faults.clear()
    return _evaluate_exo(spec, scenario, session, faults.counts)


def _evaluate_exo(
    spec: CampaignSpec, scenario: Scenario, session: Any, counts: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    s = session.summary
    exo = s.get("exo", {})
    rig = session.rig
    period_s = 1.0 / float(rig.config.control_hz)
    raised = [a for a in rig.alarm_log if a.active]
    onsets = scenario.onsets
    onset = onsets[0] if onsets else None
    violations = int(exo.get("limit_violations", 0) or 0)
    verdicts = []
    for req in spec.requirements:
        prm = dict(req.params)
        v: dict[str, Any] = {"id": req.id, "pass": True}
        if req.rule == "safe_state_after_lost_communication":
            safe = [a.t_s for a in raised if "safe state" in a.action]
            v = _lost_communication(req.id, scenario, safe, prm["periods"] * period_s)
        elif req.rule == "exo_no_limit_violation":
            v.update({"pass": violations == 0, "value": violations})
        elif req.rule == "exo_rms_error_max":
            rms = exo.get("rms_error_deg")
            v.update({"pass": rms is not None and rms <= prm["max_deg"], "value": rms})
        elif req.rule == "exo_torque_within":
            peak = float(np.max(np.abs(rig.samples.torque_nm))) if rig.samples.t_s else 0.0
            v.update({"pass": peak <= prm["limit_nm"] + 1e-9, "value": peak})
        else:
            v = {"id": req.id, "pass": None, "why": f"{req.rule} is not judged on HIL runs"}
        verdicts.append(v)
    samples = rig.samples
    t = np.asarray(samples.t_s, dtype=np.float64)
    verdict = {
        "metrics": {
            "rms_error_deg": exo.get("rms_error_deg"),
            "exo_work_j": exo.get("exo_work_j"),
            "limit_violations": violations,
            "ended_by": s["ended_by"],
            "fresh_readings": s["fresh_readings"],
        },
        "labels": {
            "exo_limit": {
                "seconds": violations * period_s,
                "ticks": violations,
                "onset_to_hazard_s": None,
            }
        },
        "first_onset": onset,
        "detection": {
            "detections": len(raised),
            "true_detections": 0,
            "episodes": 0,
            "detected_episodes": 0,
            "by_rule": {f"{a.source}: {a.condition}": 1 for a in raised},
        },
        "agent_faults": 0,
        "alarms": _alarms(rig.alarm_log, "t_s"),
        "wire_fault_hits": counts,
        "requirements": verdicts,
    }
    trace = {
        "t_s": t,
        "angle_rad": np.asarray(samples.angle_rad, dtype=np.float64),
        "reference_rad": np.asarray(samples.reference_rad, dtype=np.float64),
        "exo_torque_nm": np.asarray(samples.torque_nm, dtype=np.float64),
        "applied_command_nm": np.full(t.size, np.nan),
    }
    return verdict, trace
