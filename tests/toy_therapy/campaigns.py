"""The toy campaigns part: one own fault type, one own rule, one hazard label, the verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinloop.campaigns.faults import FaultType, param, value_fault
from twinloop.campaigns.interface import CampaignPatients, Headline, RequirementRule, SpecKey
from twinloop.campaigns.safety import (
    column,
    detections,
    episodes,
    first_at_or_after,
    safe_state_after_agent_fault,
)

from .agents import ToyConfig, ToyLoop, loop_rng, metrics
from .plant import PART as PLANT
from .policies import CONTROLLERS

#: The level above which the tank overflows, %.
OVERFLOW_PCT = 90.0


def _seconds(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("an integer >= 1")
    return value


class ToyCampaigns:
    """The toy campaigns part."""

    fault_types = (
        FaultType(
            "valve_stuck",
            "actuator",
            "toy",
            ("supervisor->actuator",),
            (param("valve_pct", "%", 100.0, 0.0, 100.0, "the opening the valve stays at"),),
            "The valve stays at `valve_pct` whatever is commanded.",
            value_fault(lambda f, t, v: f.params["valve_pct"]),
            (),
            "valve_pct",
        ),
    )
    default_fields: Mapping[str, str] = {"toy_reading": "level_pct", "toy_valve": "valve_pct"}
    parameter_targets: tuple[str, ...] = ()
    requirement_rules = (
        RequirementRule(
            "level_max", {"limit_pct": "%"}, "true level <= {limit_pct} % every second"
        ),
    )
    labels = ("overflow",)
    label_unit = "seconds"
    onset_key = "onset_to_hazard_s"
    episode_definition = f"seconds with the level above {OVERFLOW_PCT:g} %; horizon 5 s"
    headline = Headline("rms_error_pct", "rms_error_pct", "RMS level error, %", "mean RMS %")
    spec_keys = (SpecKey("seconds", 120, _seconds, "simulated seconds per run"),)
    default_window = (30.0, 30.0)
    hil_keys: tuple[SpecKey, ...] = ()
    hil_help = "the toy has no HIL sessions"

    def patients(self, names: Sequence[str], spec_dir: Path) -> CampaignPatients:
        """The tank presets, checked."""
        return CampaignPatients(PLANT.patient_names(names))

    def horizon(self, settings: Mapping[str, Any]) -> float:
        """The run's seconds."""
        return float(dict(settings)["seconds"])

    def build_loop(self, spec: Any, key: Any) -> ToyLoop:
        """The tank's loop for the run's seed."""
        config = ToyConfig((key.patient,), key.seed, spec.controller, spec.setting("seconds"))
        return ToyLoop(key.patient, config, loop_rng(key.seed, key.patient))

    def run_loop(self, loop: Any) -> None:
        """Run, then close."""
        try:
            loop.run()
        finally:
            loop.close()

    def evaluate(
        self, spec: Any, scenario: Any, columns: Any, loop: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Label overflow seconds, score the supervisor, judge the requirements."""
        t = column(columns, "plant->sensor", "t_s")
        level = column(columns, "plant->sensor", "level_pct")
        setpoint = CONTROLLERS[spec.controller]().setpoint_pct
        mask = level > OVERFLOW_PCT
        onset = scenario.onsets[0] if scenario.onsets else None
        labels = {
            "overflow": {
                "seconds": float(mask.sum() * loop.config.control_period_s),
                "onset_to_hazard_s": first_at_or_after(t, mask, onset),
            }
        }
        t_over = column(columns, "supervisor->overrides", "t_s")
        rules = list((columns.get("supervisor->overrides") or {}).get("rule", []))
        detection: dict[str, Any] = {**detections(t_over, t, episodes(mask, 1), 5.0)}
        detection["by_rule"] = {r: rules.count(r) for r in sorted(set(rules))}
        faults_t = column(columns, "runtime->faults", "t_min") * 60.0
        verdicts = []
        for req in spec.requirements:
            p = dict(req.params)
            if req.rule == "level_max":
                peak = float(level.max()) if level.size else 0.0
                verdicts.append({"id": req.id, "pass": peak <= p["limit_pct"], "value": peak})
            elif req.rule == "safe_state_after_agent_fault":
                safe = np.array([r == "no command" for r in rules], dtype=bool)
                t_safe = t_over[safe] if t_over.size else t_over
                period = loop.config.control_period_s
                verdicts.append(
                    safe_state_after_agent_fault(req.id, p["periods"], faults_t, t_safe, period)
                )
            else:
                verdicts.append({"id": req.id, "pass": None, "why": f"{req.rule}: not judged"})
        sensed = np.full(t.size, np.nan)
        t_in = column(columns, "sensor->controller", "t_s")
        idx = np.clip(np.rint(t_in).astype(np.int64), 0, max(t.size - 1, 0))
        sensed[idx] = column(columns, "sensor->controller", "level_pct")
        valve = column(columns, "supervisor->actuator", "valve_pct")
        trace = {
            "t_s": t,
            "level_pct": level,
            "sensed_pct": sensed,
            "valve_pct": np.concatenate([valve, np.full(max(t.size - valve.size, 0), np.nan)])[
                : t.size
            ],
        }
        verdict = {
            "metrics": metrics(t, level, setpoint),
            "labels": labels,
            "first_onset": onset,
            "detection": detection,
            "agent_faults": int(faults_t.size),
            "requirements": verdicts,
        }
        return verdict, trace

    def worst_key(self, result: Mapping[str, Any]) -> float:
        """The RMS level error, %."""
        return float(result["metrics"]["rms_error_pct"])

    def plot_trace(self, ax: Any, trace: Mapping[str, Any]) -> float:
        """True and sensed level, and the valve, over seconds."""
        ax.plot(trace["t_s"], trace["level_pct"], label="level (true)")
        ax.plot(trace["t_s"], trace["sensed_pct"], ".", ms=2, label="level as sensed")
        ax.plot(trace["t_s"], trace["valve_pct"], lw=0.8, label="valve")
        ax.set_ylabel("%")
        ax.set_xlabel("s")
        return 1.0

    def run_hil(self, spec: Any, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The toy has no HIL sessions (``hil_keys`` is empty: never called)."""
        raise ValueError("the toy therapy has no HIL sessions")


PART = ToyCampaigns()
