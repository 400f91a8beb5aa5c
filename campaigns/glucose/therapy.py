"""The glucose therapy's campaigns part: faults, requirements, verdicts, report and HIL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinloop.campaigns.glucose.faults import GLUCOSE_FAULTS
from twinloop.campaigns.glucose.safety import GLUCOSE_LABELS, GLUCOSE_RULES
from twinloop.campaigns.interface import CampaignPatients, Headline, SpecKey

#: Longest run of a glucose campaign, simulated days (a run is one patient's loop; a year is
#: ~15 min of one CPU, and beyond it a typo such as ``days: 1000000000`` would run forever).
MAX_DAYS = 365


def _days(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DAYS:
        raise ValueError(f"an integer in 1..{MAX_DAYS}")
    return value


def _wall_s_per_sim_min(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.005 <= value <= 60:
        raise ValueError("0.005..60 s")
    return float(value)


def _minutes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 1440:
        raise ValueError("an integer in 10..1440")
    return value


def _model(value: Any) -> str:
    from twinloop.plant.errors import ConfigError
    from twinloop.plant.glucose.models import MODEL_HELP, parse_model

    try:
        choice = parse_model(value)
    except ConfigError:
        raise ValueError(MODEL_HELP) from None
    if choice.kind == "fit":
        raise ValueError(
            "population, population:sample, twin:DIR or oracle (fit the twins first with "
            "`twinloop twin individualize`, then give twin:DIR)"
        )
    return choice.spec


#: The insulin trace's colour in campaign reports (a strong purple, apart from the glucose's).
INSULIN_COLOUR = "#6a3d9a"


class GlucoseCampaigns:
    """Campaigns on the UVA/Padova patients' closed insulin loop (time unit: min)."""

    fault_types = GLUCOSE_FAULTS
    default_fields: Mapping[str, str] = {
        "cgm": "glucose_mg_dl",
        "meal_announcement": "carbs_g",
        "insulin_command": "basal_u_per_h",
        "insulin_delivery": "basal_u",
        "twin_estimate": "bg_mg_dl",
    }
    parameter_targets = ("controller",)
    requirement_rules = GLUCOSE_RULES
    labels = tuple(GLUCOSE_LABELS)
    label_unit = "minutes"
    onset_key = "onset_to_hazard_min"
    episode_definition = "runs of >= 15 min below 70 mg/dL; horizon 60 min"
    headline = Headline(
        metric="time_in_range_70_180_pct",
        summary_key="time_in_range_pct",
        axis_label="time in range 70–180 mg/dL, %",
        column="mean TIR %",
    )
    spec_keys = (
        SpecKey("days", 1, _days, f"simulated days per run (1..{MAX_DAYS})"),
        SpecKey(
            "model",
            "population",
            _model,
            "what the twin and the MPC plan on: population, population:sample, twin:DIR, oracle",
        ),
    )
    default_window = (360.0, 240.0)
    hil_keys = (
        SpecKey(
            "wall_s_per_sim_min",
            0.02,
            _wall_s_per_sim_min,
            "wall seconds per simulated minute (0.02: a 5-min period is 0.1 s)",
        ),
        SpecKey("minutes", 240, _minutes, "simulated minutes per session"),
    )
    hil_help = "the emulated pump and CGM driven by the insulin rig in accelerated time"

    def patients(self, names: Sequence[str], spec_dir: Path) -> CampaignPatients:
        """Patients, cohorts and ``population:PATH`` files (paths relative to the spec)."""
        from twinloop.plant.glucose.cohorts import (
            POPULATION_PREFIX,
            expand_names,
            population_token,
        )

        tokens = [
            population_token(str((spec_dir / n[len(POPULATION_PREFIX) :]).resolve()))
            if n.startswith(POPULATION_PREFIX)
            else n
            for n in names
        ]
        populations = tuple(n for n in tokens if n.startswith(POPULATION_PREFIX))
        return CampaignPatients(tuple(p.name for p in expand_names(tuple(tokens))), populations)

    def horizon(self, settings: Mapping[str, Any]) -> float:
        """The simulated days, min."""
        return float(dict(settings)["days"] * 1440)

    def build_loop(self, spec: Any, key: Any) -> Any:
        """The patient's :class:`~twinloop.agents.glucose.loop.PatientLoop` (the run's seed)."""
        from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
        from twinloop.plant.glucose.cohorts import find_patient
        from twinloop.plant.glucose.models import loop_model, parse_model
        from twinloop.plant.glucose.patients import patient_key

        # a population member's name resolves with its file named beside it (spec.populations
        # is empty without population files; the loop itself runs only ``key.patient``)
        config = LoopConfig(
            patients=(*spec.populations, key.patient),
            days=spec.setting("days"),
            seed=key.seed,
            controller=spec.controller,
            twin=spec.twin,
            model=spec.setting("model"),
        )
        seq = np.random.SeedSequence(key.seed, spawn_key=(patient_key(key.patient),))
        patient = find_patient(key.patient, spec.populations)  # from the spec's population files
        model = loop_model(parse_model(config.model), patient)  # this run's patient only
        return PatientLoop(patient, config, np.random.default_rng(seq), model=model)

    def run_loop(self, loop: Any) -> None:
        """Run the patient's loop for its days."""
        loop.run()

    def evaluate(
        self, spec: Any, scenario: Any, columns: Any, loop: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:func:`twinloop.campaigns.glucose.safety.evaluate_glucose`."""
        from twinloop.campaigns.glucose.safety import evaluate_glucose

        return evaluate_glucose(spec, scenario, columns, loop)

    def worst_key(self, result: Mapping[str, Any]) -> float:
        """Time below 70 mg/dL weighs ten times time above 250 mg/dL (both %)."""
        m = result["metrics"]
        return float(m["time_below_70_pct"] * 10 + m["time_above_250_pct"])

    def plot_trace(self, ax: Any, trace: Mapping[str, Any]) -> float:
        """True and sensed glucose over hours, the insulin delivered on a second axis.

        The insulin is the cumulative total delivered (U), a solid step line: its slope is the
        rate, a bolus is a step, a suspension or occlusion is flat. (Drawn as one-minute bars
        it was invisible at a report's size: a bar 1/1440 of a day wide is under a pixel.)
        """
        hours = np.asarray(trace["t_min"]) / 60.0
        ax.plot(hours, trace["bg_mg_dl"], label="plasma glucose (true)", lw=1.2)
        ax.plot(hours, trace["cgm_mg_dl"], ".", ms=2, label="CGM as received")
        ax.axhspan(70, 180, color="green", alpha=0.08)
        ax.axhline(54, color="red", lw=0.6, ls="--")
        ax.set_ylabel("mg/dL")
        ax.set_xlabel("hours")
        ax2 = ax.twinx()
        total_u = np.cumsum(np.nan_to_num(np.asarray(trace["insulin_u"], dtype=np.float64)))
        label = "insulin delivered, cumulative (right axis)"
        ax2.step(hours, total_u, where="post", color=INSULIN_COLOUR, lw=1.8, label=label)
        ax2.set_ylim(bottom=0.0)
        ax2.set_ylabel("insulin delivered, U (cumulative)", color=INSULIN_COLOUR)
        ax2.tick_params(axis="y", colors=INSULIN_COLOUR)
        ax.plot([], [], color=INSULIN_COLOUR, lw=1.8, label=label)  # in the glucose legend
        return 60.0

    def run_hil(self, spec: Any, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """:func:`twinloop.campaigns.glucose.hil.run_glucose_hil`."""
        from twinloop.campaigns.glucose.hil import run_glucose_hil

        return run_glucose_hil(spec, key)


PART = GlucoseCampaigns()
