"""The knee-exo therapy's campaigns part: faults, requirements, verdicts, report and HIL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinloop.campaigns.interface import CampaignPatients, Headline, SpecKey
from twinloop.campaigns.knee.faults import KNEE_FAULTS
from twinloop.campaigns.knee.safety import EXO_RULES

#: Most task cycles of one exoskeleton campaign run (a bound, so a typo cannot run forever).
MAX_CYCLES = 10_000


def _cycles(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CYCLES:
        raise ValueError(f"an integer in 1..{MAX_CYCLES}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 600:
        raise ValueError("1..600 s")
    return float(value)


class KneeCampaigns:
    """Campaigns on the knee in the exoskeleton (time unit: s)."""

    fault_types = KNEE_FAULTS
    default_fields: Mapping[str, str] = {
        "exo_sensor": "angle_rad",
        "task_reference": "reference_rad",
        "knee_twin_estimate": "patient_torque_nm",
        "exo_torque_command": "torque_nm",
    }
    parameter_targets: tuple[str, ...] = ()
    requirement_rules = EXO_RULES
    labels = ("exo_limit",)
    label_unit = "seconds"
    onset_key = "onset_to_hazard_s"
    episode_definition = "ticks with a joint limit exceeded; horizon 0.5 s"
    headline = Headline(
        metric="rms_error_deg",
        summary_key="rms_error_deg",
        axis_label="RMS tracking error, °",
        column="mean RMS °",
    )
    spec_keys = (SpecKey("cycles", 10, _cycles, f"task cycles per run (1..{MAX_CYCLES})"),)
    default_window = (5.0, 5.0)
    hil_keys = (SpecKey("seconds", 8.0, _seconds, "seconds per session after enabling"),)
    hil_help = "the emulated CiA 402 drive and the exoskeleton rig at 100 Hz in real time"

    def patients(self, names: Sequence[str], spec_dir: Path) -> CampaignPatients:
        """The knee presets named, checked."""
        from twinloop.plant.knee.therapy import PART as PLANT

        return CampaignPatients(PLANT.patient_names(names))

    def horizon(self, settings: Mapping[str, Any]) -> float:
        """Two seconds per cycle, s."""
        return float(dict(settings)["cycles"]) * 2.0

    def build_loop(self, spec: Any, key: Any) -> Any:
        """The preset's exoskeleton loop for the spec's cycles."""
        from twinloop.agents.knee.loop import ExoLoopConfig
        from twinloop.agents.knee.run import exo_loops

        config = ExoLoopConfig(
            patients=(key.patient,),
            cycles=spec.setting("cycles"),
            seed=key.seed,
            controller=spec.controller,
            twin=spec.twin,
        )
        return exo_loops(config)[0]

    def run_loop(self, loop: Any) -> None:
        """Run the loop to its last cycle, then close it."""
        from twinloop.agents.knee.loop import run_exo_together

        try:
            run_exo_together([loop])
        finally:
            loop.close()

    def evaluate(
        self, spec: Any, scenario: Any, columns: Any, loop: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:func:`twinloop.campaigns.knee.safety.evaluate_exo`."""
        from twinloop.campaigns.knee.safety import evaluate_exo

        return evaluate_exo(spec, scenario, columns, loop)

    def worst_key(self, result: Mapping[str, Any]) -> float:
        """Ticks over a limit plus the RMS tracking error in degrees."""
        return float(result["labels"]["exo_limit"]["ticks"] + result["metrics"]["rms_error_deg"])

    def plot_trace(self, ax: Any, trace: Mapping[str, Any]) -> float:
        """Knee angle and reference (deg) over seconds, the exoskeleton torque on a second axis."""
        ts = np.asarray(trace["t_s"])
        ax.plot(ts, np.degrees(trace["angle_rad"]), label="knee angle (true)")
        ax.plot(ts, np.degrees(trace["reference_rad"]), "--", label="reference")
        ax.set_ylabel("deg")
        ax.set_xlabel("s")
        ax2 = ax.twinx()
        ax2.plot(ts, trace["exo_torque_nm"], color="grey", alpha=0.6, lw=0.8, label="exo torque")
        ax2.set_ylabel("N·m")
        return 1.0

    def run_hil(self, spec: Any, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """:func:`twinloop.campaigns.knee.hil.run_exo_hil`."""
        from twinloop.campaigns.knee.hil import run_exo_hil

        return run_exo_hil(spec, key)


PART = KneeCampaigns()
