"""The glucose therapy's verdicts: hazard labels, detections and requirements of one run.

Labels per minute of the true plasma glucose: ``below_70``, ``below_54``, ``above_180``,
``above_250``. Hazard episodes: runs of at least :data:`EPISODE_MIN` minutes below 70 mg/dL; a
supervisor override up to :data:`GLUCOSE_HORIZON_MIN` before an episode counts for it.
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
    safe_state_after_agent_fault,
)
from twinloop.campaigns.spec import CampaignSpec, Requirement, Scenario

__all__ = ["GLUCOSE_LABELS", "GLUCOSE_RULES", "evaluate_glucose", "glucose_labels"]

GLUCOSE_LABELS = {
    "below_70": lambda bg: bg < 70.0,
    "below_54": lambda bg: bg < 54.0,
    "above_180": lambda bg: bg > 180.0,
    "above_250": lambda bg: bg > 250.0,
}
#: Minimum length of a glucose hazard episode, min (level-1 hypoglycaemia: >= 15 min < 70).
EPISODE_MIN = 15
#: A detection up to this long before an episode's onset counts for it, min.
GLUCOSE_HORIZON_MIN = 60.0

#: The glucose loop's requirement rules (the shared ones apply too).
GLUCOSE_RULES: tuple[RequirementRule, ...] = (
    RequirementRule(
        "glucose_min",
        {"threshold_mg_dl": "mg/dL"},
        "plasma glucose >= {threshold_mg_dl} mg/dL at every minute",
    ),
    RequirementRule(
        "glucose_max",
        {"threshold_mg_dl": "mg/dL"},
        "plasma glucose <= {threshold_mg_dl} mg/dL at every minute",
    ),
    RequirementRule(
        "time_below_after_fault",
        {"threshold_mg_dl": "mg/dL", "max_min": "min", "window_min": "min"},
        "time below {threshold_mg_dl} mg/dL <= {max_min} min within {window_min} min after "
        "any fault onset",
    ),
    RequirementRule(
        "time_above_after_fault",
        {"threshold_mg_dl": "mg/dL", "max_min": "min", "window_min": "min"},
        "time above {threshold_mg_dl} mg/dL <= {max_min} min within {window_min} min after "
        "any fault onset",
    ),
    RequirementRule(
        "time_in_range_min",
        {"min_pct": "%"},
        "time in 70–180 mg/dL >= {min_pct} % of the run",
    ),
)


def glucose_labels(
    t: np.ndarray, bg: np.ndarray, onset: float | None
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Each hazard label's minutes and time from ``onset``, and its per-sample mask."""
    labels: dict[str, dict[str, Any]] = {}
    masks: dict[str, np.ndarray] = {}
    for name, rule in GLUCOSE_LABELS.items():
        masks[name] = mask = rule(bg)
        labels[name] = {
            "minutes": int(mask.sum()),
            "onset_to_hazard_min": first_at_or_after(t, mask, onset),
        }
    return labels, masks


def evaluate_glucose(
    spec: CampaignSpec, scenario: Scenario, columns: Any, loop: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One glucose run's metrics, labels, detections and verdicts, and its per-minute trace."""
    from twinloop.agents.glucose.run import summarize

    t = column(columns, "plant->sensor", "t_min")
    bg = column(columns, "plant->sensor", "bg_mg_dl")
    patient = loop.patient
    metrics = summarize([patient.name], [patient.cohort], bg[None, :])["patients"][patient.name]
    onsets = scenario.onsets
    onset = onsets[0] if onsets else None
    labels, masks = glucose_labels(t, bg, onset)
    t_over = column(columns, "supervisor->overrides", "t_min")
    reasons = list((columns.get("supervisor->overrides") or {}).get("reason", []))
    hypos = episodes(masks["below_70"], EPISODE_MIN)
    detection: dict[str, Any] = {**detections(t_over, t, hypos, GLUCOSE_HORIZON_MIN)}
    detection["by_rule"] = {r: reasons.count(r) for r in sorted(set(reasons))}
    faults_t = column(columns, "runtime->faults", "t_min")
    verdicts = [
        _judge_glucose(r, t, bg, onsets, faults_t, t_over, reasons, spec, loop)
        for r in spec.requirements
    ]
    # the trace: one row per minute
    n = t.size
    cgm = np.full(n, np.nan)
    t_cgm = column(columns, "sensor->controller", "t_min")
    v_cgm = column(columns, "sensor->controller", "glucose_mg_dl")
    if t_cgm.size:
        idx = np.clip(np.rint(t_cgm).astype(np.int64), 0, n - 1)
        cgm[idx] = v_cgm
    insulin = np.zeros(n)
    t_ins = column(columns, "actuator->plant", "t_min")
    if t_ins.size:
        total = column(columns, "actuator->plant", "basal_u") + column(
            columns, "actuator->plant", "bolus_u"
        )
        np.add.at(insulin, np.clip(t_ins.astype(np.int64), 0, n - 1), total)
    overrides = np.zeros(n, dtype=np.int32)
    if t_over.size:
        np.add.at(overrides, np.clip(np.rint(t_over).astype(np.int64), 0, n - 1), 1)
    trace = {
        "t_min": t,
        "bg_mg_dl": bg,
        "cgm_mg_dl": cgm,
        "insulin_u": insulin,
        "overrides": overrides,
    }
    verdict = {
        "metrics": metrics,
        "labels": labels,
        "first_onset": onset,
        "detection": detection,
        "agent_faults": int(faults_t.size),
        "requirements": verdicts,
    }
    return verdict, trace


def _judge_glucose(
    req: Requirement,
    t: np.ndarray,
    bg: np.ndarray,
    onsets: list[float],
    faults_t: np.ndarray,
    t_over: np.ndarray,
    reasons: list[str],
    spec: CampaignSpec,
    loop: Any,
) -> dict[str, Any]:
    p = dict(req.params)
    out: dict[str, Any] = {"id": req.id, "pass": True}
    if req.rule in ("glucose_min", "glucose_max"):
        thr = p["threshold_mg_dl"]
        bad = bg < thr if req.rule == "glucose_min" else bg > thr
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            extreme = float(bg.min() if req.rule == "glucose_min" else bg.max())
            out.update({"pass": False, "at": float(t[k]), "value": extreme})
    elif req.rule in ("time_below_after_fault", "time_above_after_fault"):
        if not onsets:
            return {"id": req.id, "pass": None, "why": "no fault onset"}
        thr, limit, window = p["threshold_mg_dl"], p["max_min"], p["window_min"]
        bad = bg < thr if req.rule == "time_below_after_fault" else bg > thr
        worst = 0.0
        for onset in onsets:
            sel = (t >= onset) & (t < onset + window)
            minutes = float(bad[sel].sum())
            if minutes > worst:
                worst = minutes
                out["at"] = onset
        out["value"] = worst
        out["pass"] = worst <= limit
    elif req.rule == "time_in_range_min":
        tir = float(np.mean((bg >= 70.0) & (bg <= 180.0)) * 100.0)
        out.update({"pass": tir >= p["min_pct"], "value": tir})
    elif req.rule == "safe_state_after_agent_fault":
        period = float(loop.config.control_period_min)
        safe = np.array([r.startswith("no command") for r in reasons], dtype=bool)
        t_safe = t_over[safe] if t_over.size else t_over
        return safe_state_after_agent_fault(req.id, p["periods"], faults_t, t_safe, period)
    return out
