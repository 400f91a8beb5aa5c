"""The glucose therapy's HIL sessions: wire faults on the emulated pump's Modbus wire.

See :mod:`twinloop.campaigns.hil` for the pump, CGM and rig of a session, the wire faults'
switches and the pump client's scaled timeout. The ``hil:`` keys: ``wall_s_per_sim_min``
(wall seconds per simulated minute) and ``minutes`` (simulated minutes per session).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from typing import Any

import numpy as np

from twinloop.campaigns.glucose.safety import EPISODE_MIN, GLUCOSE_HORIZON_MIN, glucose_labels
from twinloop.campaigns.hil import WireSchedule, alarms_as_data, lost_communication_verdict
from twinloop.campaigns.safety import detections, episodes
from twinloop.campaigns.spec import CampaignSpec, Scenario

__all__ = ["run_glucose_hil"]


def run_glucose_hil(spec: CampaignSpec, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one HIL session of the campaign: its verdict and trace."""
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

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # lost frames are the point here
    scale = float(spec.hil_setting("wall_s_per_sim_min"))
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
            minutes=int(spec.hil_setting("minutes")),
            cgm_stale_min=20,
        )
        schedule = WireSchedule(scenario, faults, scale)
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
    from twinloop.plant.glucose.patients import get_patient

    minutes = int(spec.hil_setting("minutes"))
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
        **detections(t_alarm, t, episodes(masks["below_70"], EPISODE_MIN), GLUCOSE_HORIZON_MIN)
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
            v = lost_communication_verdict(req.id, scenario, safe, prm["periods"] * period)
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
        "alarms": alarms_as_data(rig.alarm_log, "t_min"),
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
