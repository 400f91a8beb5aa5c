"""Hazard labels, detection scores and requirement verdicts of campaign runs, and their summary.

**Hazard labels** are computed per sample of the *true* state (never of what the faulted
sensor said): glucose at every minute from the plant — ``below_70``, ``below_54``,
``above_180``, ``above_250``; the exoskeleton at every control tick — ``exo_limit`` (the joint
left its range of motion or its velocity limit within the period, or the applied torque
exceeded the supervisor's torque limit). For each label: minutes (or seconds) labelled, and the
time from the first fault onset to the first labelled sample at or after it.

**Detections.** The supervisor's overrides are its detections and mitigations (each with its
rule). A hazard *episode* is a run of labelled samples of at least ``EPISODE_MIN`` minutes
(glucose below 70: 15 min, the consensus definition of a level-1 hypoglycaemic event; the
exoskeleton: any labelled tick). Precision = detections that fall in ``[episode onset −
horizon, episode end]`` of some episode ÷ all detections; recall = episodes with at least one
detection in that interval ÷ all episodes (horizon: 60 min glucose, 0.5 s exoskeleton). A
detection that *prevents* an episode counts as a false alarm here — the baseline scenario (same
patients and seeds without faults) is what to compare hazard rates with.

**Requirements** (the vocabulary of :data:`twinloop.campaigns.spec.REQUIREMENT_RULES`) are judged
per
run: ``pass`` true/false, or ``None`` when the rule does not apply (a rule about fault onsets in
the fault-free baseline), with the first violation's time and value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinloop.campaigns.spec import CampaignSpec, Requirement, Scenario

__all__ = ["evaluate_exo", "evaluate_glucose", "summarize_campaign"]

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
EXO_HORIZON_S = 0.5


def _episodes(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Runs of True of at least ``min_len`` samples, as ``(first, last + 1)`` indices."""
    if not mask.any():
        return []
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    runs = edges.reshape(-1, 2)
    return [(int(a), int(b)) for a, b in runs if b - a >= min_len]


def _detections(
    t_det: np.ndarray, t: np.ndarray, episodes: list[tuple[int, int]], horizon: float
) -> dict[str, int]:
    spans = [(t[a] - horizon, t[b - 1]) for a, b in episodes]
    hit = np.zeros(t_det.size, dtype=bool)
    detected = 0
    for lo, hi in spans:
        inside = (t_det >= lo) & (t_det <= hi)
        hit |= inside
        detected += bool(inside.any())
    return {
        "detections": int(t_det.size),
        "true_detections": int(hit.sum()),
        "episodes": len(episodes),
        "detected_episodes": detected,
    }


def _first_at_or_after(t: np.ndarray, mask: np.ndarray, onset: float | None) -> float | None:
    if onset is None:
        return None
    idx = np.flatnonzero(mask & (t >= onset))
    return None if idx.size == 0 else float(t[idx[0]] - onset)


def _col(
    columns: Mapping[str, Mapping[str, Sequence[Any]]], channel: str, field: str
) -> np.ndarray:
    table = columns.get(channel)
    if not table or field not in table:
        return np.zeros(0)
    return np.asarray(table[field], dtype=np.float64)


# -- glucose ---------------------------------------------------------------------------------
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
            "onset_to_hazard_min": _first_at_or_after(t, mask, onset),
        }
    return labels, masks


def evaluate_glucose(
    spec: CampaignSpec, scenario: Scenario, columns: Any, loop: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One glucose run's metrics, labels, detections and verdicts, and its per-minute trace."""
    from twinloop.agents.glucose.run import summarize

    t = _col(columns, "plant->sensor", "t_min")
    bg = _col(columns, "plant->sensor", "bg_mg_dl")
    patient = loop.patient
    metrics = summarize([patient.name], [patient.cohort], bg[None, :])["patients"][patient.name]
    onsets = scenario.onsets
    onset = onsets[0] if onsets else None
    labels, masks = glucose_labels(t, bg, onset)
    t_over = _col(columns, "supervisor->overrides", "t_min")
    reasons = list((columns.get("supervisor->overrides") or {}).get("reason", []))
    episodes = _episodes(masks["below_70"], EPISODE_MIN)
    detection: dict[str, Any] = {**_detections(t_over, t, episodes, GLUCOSE_HORIZON_MIN)}
    detection["by_rule"] = {r: reasons.count(r) for r in sorted(set(reasons))}
    faults_t = _col(columns, "runtime->faults", "t_min")
    verdicts = [
        _judge_glucose(r, t, bg, onsets, faults_t, t_over, reasons, spec, loop)
        for r in spec.requirements
    ]
    # the trace: one row per minute
    n = t.size
    cgm = np.full(n, np.nan)
    t_cgm = _col(columns, "sensor->controller", "t_min")
    v_cgm = _col(columns, "sensor->controller", "glucose_mg_dl")
    if t_cgm.size:
        idx = np.clip(np.rint(t_cgm).astype(np.int64), 0, n - 1)
        cgm[idx] = v_cgm
    insulin = np.zeros(n)
    t_ins = _col(columns, "actuator->plant", "t_min")
    if t_ins.size:
        total = _col(columns, "actuator->plant", "basal_u") + _col(
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
        if faults_t.size == 0:
            return {"id": req.id, "pass": None, "why": "no agent fault"}
        period = float(loop.config.control_period_min)
        safe = np.array([r.startswith("no command") for r in reasons], dtype=bool)
        t_safe = t_over[safe] if t_over.size else t_over
        for tf in faults_t:
            within = (t_safe >= tf) & (t_safe <= tf + p["periods"] * period)
            if not within.any():
                out.update({"pass": False, "at": float(tf)})
                break
    return out


# -- exoskeleton -------------------------------------------------------------------------------
def _fit(values: np.ndarray, n: int) -> np.ndarray:
    """``values`` cut or NaN-padded at the end to ``n`` samples (per-tick columns differ by one)."""
    if values.size >= n:
        return values[:n]
    return np.concatenate([values, np.full(n - values.size, np.nan)])


def evaluate_exo(
    spec: CampaignSpec, scenario: Scenario, columns: Any, loop: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One exoskeleton run's metrics, labels, detections and verdicts, and its per-tick trace."""
    from twinloop.agents.knee.run import config_record, summarize_exo

    record = config_record(loop.config, loop.placement)
    metrics = summarize_exo(record, columns)["patients"][loop.patient]
    sup = record["supervisor"]
    t = _col(columns, "plant->sensor", "t_s")
    lo = _col(columns, "plant->sensor", "angle_min_rad")
    hi = _col(columns, "plant->sensor", "angle_max_rad")
    vmax = _col(columns, "plant->sensor", "velocity_abs_max_rad_s")
    torque = _col(columns, "plant->sensor", "exo_torque_nm")
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
            "onset_to_hazard_s": _first_at_or_after(t, mask, onset),
        }
    }
    t_over = _col(columns, "supervisor->overrides", "t_s")
    rules = list((columns.get("supervisor->overrides") or {}).get("rule", []))
    detection: dict[str, Any] = {**_detections(t_over, t, _episodes(mask, 1), EXO_HORIZON_S)}
    detection["by_rule"] = {r: rules.count(r) for r in sorted(set(rules))}
    faults_t = _col(columns, "runtime->faults", "t_min") * 60.0
    applied = _col(columns, "supervisor->actuator", "torque_nm")
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
            if faults_t.size == 0:
                v = {"id": req.id, "pass": None, "why": "no agent fault"}
            else:
                safe = np.array([r == "no command" for r in rules], dtype=bool)
                t_safe = t_over[safe] if t_over.size else t_over
                for tf in faults_t:
                    if not ((t_safe >= tf - 1e-9) & (t_safe <= tf + p["periods"] * dt)).any():
                        v.update({"pass": False, "at": float(tf)})
                        break
        verdicts.append(v)
    trace = {
        "t_s": t,
        "angle_rad": _col(columns, "plant->sensor", "angle_rad"),
        "reference_rad": _fit(_col(columns, "task->controller", "reference_rad"), t.size),
        "exo_torque_nm": torque,
        "applied_command_nm": _fit(applied, t.size),
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


# -- the campaign ------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarize_campaign(
    spec: CampaignSpec, keys: Sequence[Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """Aggregate the results: runs, errors, hazards per scenario, detection scores, verdicts."""
    ok = [r for r in results if r.get("status") == "ok"]
    errors = [r for r in results if r.get("status") == "error"]
    glucose = spec.therapy == "glucose"
    label_names = list(GLUCOSE_LABELS) if glucose else ["exo_limit"]
    unit = "minutes" if glucose else "seconds"
    per_scenario: dict[str, dict[str, Any]] = {}
    for s in spec.scenarios:
        rows = [r for r in ok if r["scenario"] == s.name]
        entry: dict[str, Any] = {
            "faults": [f.fault for f in s.faults],
            "runs": len(rows),
            "hazard_rate": {},
            "mean_hazard_" + unit: {},
            "median_onset_to_hazard": {},
        }
        for label in label_names:
            amounts = [r["labels"][label][unit] for r in rows]
            key = "onset_to_hazard_min" if glucose else "onset_to_hazard_s"
            delays = [r["labels"][label][key] for r in rows if r["labels"][label][key] is not None]
            entry["hazard_rate"][label] = float(np.mean([a > 0 for a in amounts])) if rows else None
            entry["mean_hazard_" + unit][label] = _mean(amounts)
            entry["median_onset_to_hazard"][label] = float(np.median(delays)) if delays else None
        if glucose:
            entry["time_in_range_pct"] = _mean(
                [r["metrics"]["time_in_range_70_180_pct"] for r in rows]
            )
        else:
            entry["rms_error_deg"] = _mean([r["metrics"]["rms_error_deg"] for r in rows])
        per_scenario[s.name] = entry
    det = {
        k: sum(r["detection"][k] for r in ok)
        for k in ("detections", "true_detections", "episodes", "detected_episodes")
    }
    detection = {
        **det,
        "precision": det["true_detections"] / det["detections"] if det["detections"] else None,
        "recall": det["detected_episodes"] / det["episodes"] if det["episodes"] else None,
        "definition": "see campaigns/safety.py: detections = supervisor overrides; episodes = "
        + (
            "runs of >= 15 min below 70 mg/dL; horizon 60 min"
            if glucose
            else "ticks with a joint limit exceeded; horizon 0.5 s"
        ),
    }
    requirements = []
    for req in spec.requirements:
        judged = [(r["id"], v) for r in ok for v in r["requirements"] if v["id"] == req.id]
        failing = [rid for rid, v in judged if v["pass"] is False]
        applicable = [rid for rid, v in judged if v["pass"] is not None]
        requirements.append(
            {
                **req.as_dict(),
                "verdict": "fail" if failing else ("pass" if applicable else "not applicable"),
                "runs_judged": len(applicable),
                "runs_failing": len(failing),
                "failing_ids": failing,
            }
        )
    worst_key = (
        (lambda r: r["metrics"]["time_below_70_pct"] * 10 + r["metrics"]["time_above_250_pct"])
        if glucose
        else (lambda r: r["labels"]["exo_limit"]["ticks"] + r["metrics"]["rms_error_deg"])
    )
    worst = [r["id"] for r in sorted(ok, key=worst_key, reverse=True)[:5]]
    return {
        "campaign": spec.name,
        "therapy": spec.therapy,
        "fingerprint": spec.fingerprint(),
        "runs": {
            "total": len(keys),
            "finished": len(results),
            "ok": len(ok),
            "errors": len(errors),
            "error_ids": [r["id"] for r in errors],
        },
        "labels": label_names,
        "per_scenario": per_scenario,
        "detection": detection,
        "requirements": requirements,
        "verdict": "fail" if any(r["verdict"] == "fail" for r in requirements) else "pass",
        "worst_runs": worst,
    }
