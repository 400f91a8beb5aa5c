"""The knee exoskeleton's verdicts: hazard labels, detections and requirements of one run.

One label per control tick, ``exo_limit``: the joint left its range of motion or its velocity
limit within the period, or the applied torque exceeded the supervisor's torque limit. Every
labelled tick is an episode; a supervisor override up to :data:`EXO_HORIZON_S` before one
counts for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinloop.campaigns.interface import RequirementRule
from twinloop.campaigns.safety import (
    column,
    detections,
    episodes,
    first_at_or_after,
    fit_length,
    safe_state_after_agent_fault,
)
from twinloop.campaigns.spec import CampaignSpec, Scenario

__all__ = ["EXO_RULES", "evaluate_exo"]

#: A detection up to this long before a labelled tick counts for it, s.
EXO_HORIZON_S = 0.5

#: The exoskeleton loop's requirement rules (the shared ones apply too).
EXO_RULES: tuple[RequirementRule, ...] = (
    RequirementRule(
        "exo_torque_within",
        {"limit_nm": "N·m"},
        "|exoskeleton torque applied| <= {limit_nm} N·m at every control tick",
    ),
    RequirementRule(
        "exo_no_limit_violation",
        {},
        "no range-of-motion, velocity or torque limit violation",
    ),
    RequirementRule(
        "exo_rms_error_max",
        {"max_deg": "deg"},
        "RMS tracking error <= {max_deg}°",
    ),
)


def evaluate_exo(
    spec: CampaignSpec, scenario: Scenario, columns: Any, loop: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One exoskeleton run's metrics, labels, detections and verdicts, and its per-tick trace."""
    from twinloop.agents.knee.run import config_record, summarize_exo

    record = config_record(loop.config, loop.placement)
    metrics = summarize_exo(record, columns)["patients"][loop.patient]
    sup = record["supervisor"]
    t = column(columns, "plant->sensor", "t_s")
    lo = column(columns, "plant->sensor", "angle_min_rad")
    hi = column(columns, "plant->sensor", "angle_max_rad")
    vmax = column(columns, "plant->sensor", "velocity_abs_max_rad_s")
    torque = column(columns, "plant->sensor", "exo_torque_nm")
    mask = (
        (lo < float(sup["rom_min_rad"]))
        | (hi > float(sup["rom_max_rad"]))
        | (vmax > float(sup["velocity_limit_rad_s"]))
        | (np.abs(torque) > float(sup["torque_limit_nm"]) + 1e-9)
    )
    onsets = scenario.onsets
    onset = onsets[0] if onsets else None
    dt = 1.0 / float(record["control_hz"])
    labels = {
        "exo_limit": {
            "seconds": float(mask.sum() * dt),
            "ticks": int(mask.sum()),
            "onset_to_hazard_s": first_at_or_after(t, mask, onset),
        }
    }
    t_over = column(columns, "supervisor->overrides", "t_s")
    rules = list((columns.get("supervisor->overrides") or {}).get("rule", []))
    detection: dict[str, Any] = {**detections(t_over, t, episodes(mask, 1), EXO_HORIZON_S)}
    detection["by_rule"] = {r: rules.count(r) for r in sorted(set(rules))}
    faults_t = column(columns, "runtime->faults", "t_min") * 60.0
    applied = column(columns, "supervisor->actuator", "torque_nm")
    verdicts = []
    for req in spec.requirements:
        p = dict(req.params)
        v: dict[str, Any] = {"id": req.id, "pass": True}
        if req.rule == "exo_torque_within":
            peak = float(np.abs(torque).max()) if torque.size else 0.0
            v.update({"pass": peak <= p["limit_nm"] + 1e-9, "value": peak})
        elif req.rule == "exo_no_limit_violation":
            v.update(
                {
                    "pass": int(metrics["limit_violations"]) == 0,
                    "value": int(metrics["limit_violations"]),
                }
            )
        elif req.rule == "exo_rms_error_max":
            rms = float(metrics["rms_error_deg"])
            v.update({"pass": rms <= p["max_deg"], "value": rms})
        elif req.rule == "safe_state_after_agent_fault":
            safe = np.array([r == "no command" for r in rules], dtype=bool)
            t_safe = t_over[safe] if t_over.size else t_over
            v = safe_state_after_agent_fault(
                req.id, p["periods"], faults_t, t_safe, dt, tolerance=1e-9
            )
        verdicts.append(v)
    trace = {
        "t_s": t,
        "angle_rad": column(columns, "plant->sensor", "angle_rad"),
        "reference_rad": fit_length(column(columns, "task->controller", "reference_rad"), t.size),
        "exo_torque_nm": torque,
        "applied_command_nm": fit_length(applied, t.size),
    }
    verdict = {
        "metrics": {k: v for k, v in metrics.items() if k != "twin"},
        "labels": labels,
        "first_onset": onset,
        "detection": detection,
        "agent_faults": int(faults_t.size),
        "requirements": verdicts,
    }
    return verdict, trace
