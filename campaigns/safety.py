"""Hazard labels, detection scores and requirement verdicts of campaign runs, and their summary.

Each therapy's campaigns part (:class:`twinloop.campaigns.interface.CampaignPart`) judges its
own runs (``evaluate``) with the helpers here; :func:`summarize_campaign` aggregates any
therapy's results with what its part declares (labels, their unit, the headline metric, the
worst-run ordering).

**Hazard labels** are computed per sample of the *true* state (never of what the faulted
sensor said): glucose at every minute from the plant — ``below_70``, ``below_54``,
``above_180``, ``above_250`` (``twinloop.campaigns.glucose.safety``); the exoskeleton at every
control tick — ``exo_limit`` (``twinloop.campaigns.knee.safety``: the joint left its range of
motion or its velocity limit within the period, or the applied torque exceeded the
supervisor's torque limit). For each label: minutes (or seconds) labelled, and the time from
the first fault onset to the first labelled sample at or after it.

**Detections.** The supervisor's overrides are its detections and mitigations (each with its
rule). A hazard *episode* is a run of labelled samples of at least ``EPISODE_MIN`` minutes
(glucose below 70: 15 min, the consensus definition of a level-1 hypoglycaemic event; the
exoskeleton: any labelled tick). Precision = detections that fall in ``[episode onset −
horizon, episode end]`` of some episode ÷ all detections; recall = episodes with at least one
detection in that interval ÷ all episodes (horizon: 60 min glucose, 0.5 s exoskeleton). A
detection that *prevents* an episode counts as a false alarm here — the baseline scenario (same
patients and seeds without faults) is what to compare hazard rates with.

**Requirements** (the vocabulary of :func:`twinloop.campaigns.spec.requirement_rules`) are
judged per run: ``pass`` true/false, or ``None`` when the rule does not apply (a rule about
fault onsets in the fault-free baseline), with the first violation's time and value.

**Errored runs** (raised, timed out or unjudgeable; ``status`` not ``ok``) are never left out
silently: beyond the spec's ``errors_allowed`` each of them fails every requirement (it cannot
show that it meets one), and the campaign fails. The campaign verdict (:func:`campaign_verdict`)
is ``pass`` only when every run finished, at least one was judged, the errored runs are within
the allowance and no requirement fails; ``incomplete`` when runs are missing; ``fail``
otherwise, with the reasons in ``verdict_reasons``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinloop.campaigns.spec import CampaignSpec

__all__ = [
    "campaign_verdict",
    "column",
    "detections",
    "episodes",
    "first_at_or_after",
    "fit_length",
    "safe_state_after_agent_fault",
    "summarize_campaign",
]


def episodes(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Runs of True of at least ``min_len`` samples, as ``(first, last + 1)`` indices."""
    if not mask.any():
        return []
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    runs = edges.reshape(-1, 2)
    return [(int(a), int(b)) for a, b in runs if b - a >= min_len]


def detections(
    t_det: np.ndarray, t: np.ndarray, episodes: list[tuple[int, int]], horizon: float
) -> dict[str, int]:
    """Detections at times ``t_det`` scored against hazard ``episodes`` of samples at ``t``.

    A detection in ``[onset - horizon, end]`` of an episode is true; an episode with one is
    detected (times and ``horizon`` in the loop time unit).
    """
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


def first_at_or_after(t: np.ndarray, mask: np.ndarray, onset: float | None) -> float | None:
    """Time from ``onset`` to the first sample of ``mask`` at or after it (None if none)."""
    if onset is None:
        return None
    idx = np.flatnonzero(mask & (t >= onset))
    return None if idx.size == 0 else float(t[idx[0]] - onset)


def column(
    columns: Mapping[str, Mapping[str, Sequence[Any]]], channel: str, field: str
) -> np.ndarray:
    """One recorded field of a channel as a float array (empty if never recorded)."""
    table = columns.get(channel)
    if not table or field not in table:
        return np.zeros(0)
    return np.asarray(table[field], dtype=np.float64)


def fit_length(values: np.ndarray, n: int) -> np.ndarray:
    """``values`` cut or NaN-padded at the end to ``n`` samples (per-tick columns differ by one)."""
    if values.size >= n:
        return values[:n]
    return np.concatenate([values, np.full(n - values.size, np.nan)])


def safe_state_after_agent_fault(
    req_id: str,
    periods: float,
    faults_t: np.ndarray,
    t_safe: np.ndarray,
    period: float,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Judge the shared rule ``safe_state_after_agent_fault``.

    Args:
        req_id: the requirement's id.
        periods: the rule's parameter: control periods allowed.
        faults_t: times of the agent faults (``runtime->faults``), loop time unit.
        t_safe: times the supervisor sent its safe command, loop time unit.
        period: the control period, loop time unit.
        tolerance: how early a safe command may be and still count, loop time unit.

    Returns:
        ``{"id", "pass"}`` (``pass`` None without an agent fault, with ``why``), with ``at``
        (the first fault not followed in time) when it fails.

    """
    if faults_t.size == 0:
        return {"id": req_id, "pass": None, "why": "no agent fault"}
    out: dict[str, Any] = {"id": req_id, "pass": True}
    for tf in faults_t:
        if not ((t_safe >= tf - tolerance) & (t_safe <= tf + periods * period)).any():
            out.update({"pass": False, "at": float(tf)})
            break
    return out


# -- the campaign ------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarize_campaign(
    spec: CampaignSpec, keys: Sequence[Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """Aggregate the results: runs, errors, hazards per scenario, detection scores, verdicts."""
    from twinloop.therapy import get_therapy

    part = get_therapy(spec.therapy).part("campaigns")
    ok = [r for r in results if r.get("status") == "ok"]
    errors = [r for r in results if r.get("status") != "ok"]
    # beyond the allowance, every errored run fails every requirement
    counted = [r["id"] for r in errors] if len(errors) > spec.errors_allowed else []
    label_names = list(part.labels)
    unit = part.label_unit
    onset_key = part.onset_key
    headline = part.headline
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
            delays = [
                r["labels"][label][onset_key]
                for r in rows
                if r["labels"][label][onset_key] is not None
            ]
            entry["hazard_rate"][label] = float(np.mean([a > 0 for a in amounts])) if rows else None
            entry["mean_hazard_" + unit][label] = _mean(amounts)
            entry["median_onset_to_hazard"][label] = float(np.median(delays)) if delays else None
        entry[headline.summary_key] = _mean([r["metrics"][headline.metric] for r in rows])
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
        + part.episode_definition,
    }
    requirements = []
    for req in spec.requirements:
        judged = [(r["id"], v) for r in ok for v in r["requirements"] if v["id"] == req.id]
        failing = [rid for rid, v in judged if v["pass"] is False] + counted
        applicable = [rid for rid, v in judged if v["pass"] is not None] + counted
        requirements.append(
            {
                **req.as_dict(),
                "verdict": "fail" if failing else ("pass" if applicable else "not applicable"),
                "runs_judged": len(applicable),
                "runs_failing": len(failing),
                "runs_errored": len(counted),
                "failing_ids": failing,
            }
        )
    worst = [r["id"] for r in sorted(ok, key=part.worst_key, reverse=True)[:5]]
    runs = {
        "total": len(keys),
        "finished": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_ids": [r["id"] for r in errors],
        "errors_allowed": spec.errors_allowed,
    }
    verdict, reasons = campaign_verdict(runs, requirements)
    return {
        "campaign": spec.name,
        "therapy": spec.therapy,
        "fingerprint": spec.fingerprint(),
        "runs": runs,
        "errored_runs": [
            {"id": r["id"], "error": r.get("error") or _last_line(r.get("traceback"))}
            for r in errors
        ],
        "labels": label_names,
        "per_scenario": per_scenario,
        "detection": detection,
        "requirements": requirements,
        "verdict": verdict,
        "verdict_reasons": reasons,
        "worst_runs": worst,
    }


def _last_line(text: str | None) -> str:
    """The last non-empty line of a traceback (the exception), or ``"error"``."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "error"


def campaign_verdict(
    runs: Mapping[str, Any], requirements: Sequence[Mapping[str, Any]]
) -> tuple[str, list[str]]:
    """The campaign's verdict (``pass``, ``fail`` or ``incomplete``) and why it is not a pass.

    Args:
        runs: the summary's ``runs`` (``total``, ``finished``, ``ok``, ``errors``,
            ``errors_allowed``).
        requirements: the summary's requirements, each with its ``verdict``.

    """
    reasons = []
    if runs["finished"] < runs["total"]:
        reasons.append(f"{runs['total'] - runs['finished']} of {runs['total']} runs not finished")
    if runs["errors"] > runs["errors_allowed"]:
        reasons.append(
            f"{runs['errors']} errored run(s), errors_allowed {runs['errors_allowed']}: each "
            "fails every requirement"
        )
    if runs["total"] and runs["finished"] and not runs["ok"]:
        reasons.append("no run could be judged")
    reasons += [f"requirement {r['id']} fails" for r in requirements if r["verdict"] == "fail"]
    if not reasons:
        return "pass", []
    if runs["finished"] < runs["total"] and len(reasons) == 1:
        return "incomplete", reasons
    return "fail", reasons
