"""The knee exoskeleton's HIL sessions: wire faults on the emulated drive's Modbus wire.

The emulated CiA 402 drive (the knee behind it, following the cyclic task) on Modbus TCP and
the exoskeleton rig at 100 Hz in real time, for ``hil: {seconds: S}``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from twinloop.campaigns.hil import WireSchedule, alarms_as_data, lost_communication_verdict
from twinloop.campaigns.spec import CampaignSpec, Scenario

__all__ = ["run_exo_hil"]


def run_exo_hil(spec: CampaignSpec, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One exoskeleton HIL session through the exoskeleton rig, with wire faults on the drive.

    The emulated drive (knee behind it, following the task) on Modbus TCP and the rig at
    100 Hz in real time; the faults switch on the drive's ``WireFaults`` on the rig's clock
    (seconds since the drive was enabled).
    """
    from twinloop.hil.knee.rig import ExoRigConfig, run_exo_session
    from twinloop.hw_bridge.emulators.drive.emulator import DriveEmulator, knee_backend
    from twinloop.hw_bridge.wire import WireFaults

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
            seconds=float(spec.hil_setting("seconds")),
        )
        schedule = WireSchedule(scenario, faults, 1.0)
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
            v = lost_communication_verdict(req.id, scenario, safe, prm["periods"] * period_s)
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
        "alarms": alarms_as_data(rig.alarm_log, "t_s"),
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
