"""The knee-exo therapy's agents part: its loop's options, run, summary table and report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinloop.agents.interface import RunOption, boolean, integer, one_of
from twinloop.agents.knee.messages import (
    ExoSensorReading,
    ExoTorqueCommand,
    KneeTwinEstimate,
    TaskReference,
)
from twinloop.agents.placement import Placement
from twinloop.plant.knee.tasks import TASKS

if TYPE_CHECKING:
    from twinloop.agents.knee.loop import ExoLoopConfig


class KneeLoop:
    """Encoder, torque sensor, EMG → knee twin → controller → exo supervisor → drive."""

    run_options = (
        RunOption(
            "task",
            one_of(TASKS),
            "cyclic",
            "cyclic (default, flexion-extension), sit_to_stand, hold",
        ),
        RunOption(
            "cycles", integer(1, 1000), 10, "cycles of the cyclic task, 1 to 1000 (default 10)"
        ),
        RunOption(
            "control_hz",
            integer(100, 500),
            100,
            "control rate, Hz (default 100; 100-500 dividing 1000)",
        ),
        RunOption("twin", boolean, True, "run the knee twin estimator (default: on)", flag=True),
    )
    placements = ("inline", "ray")
    channel_messages: Mapping[str, type] = {
        "sensor->controller": ExoSensorReading,
        "task->controller": TaskReference,
        "estimator->controller": KneeTwinEstimate,
        "controller->supervisor": ExoTorqueCommand,
        "supervisor->actuator": ExoTorqueCommand,
    }
    default_out = "runs/exo-%Y%m%d-%H%M%S"

    def make_config(
        self, *, patients: Sequence[str], seed: int, controller: str, options: Mapping[str, Any]
    ) -> ExoLoopConfig:
        """The :class:`ExoLoopConfig` (validated)."""
        from twinloop.agents.knee.loop import ExoLoopConfig

        return ExoLoopConfig(
            patients=tuple(patients),
            task=options["task"],
            cycles=options["cycles"],
            seed=seed,
            controller=controller,
            control_hz=options["control_hz"],
            twin=options["twin"],
        )

    def run(
        self, config: ExoLoopConfig, out: str | Path, *, placement: Placement, progress: bool
    ) -> tuple[Path, dict[str, Any]]:
        """:func:`twinloop.agents.knee.run.run_knee_exo` (``twinloop run`` then reports it)."""
        from twinloop.agents.knee.run import run_knee_exo

        return run_knee_exo(config, out, progress=progress, placement=placement)

    def summary_lines(
        self, config: ExoLoopConfig, summary: Mapping[str, Any], *, placement: str, elapsed_s: float
    ) -> list[str]:
        """Tracking, assistance and safety per patient, the twin's estimates, the totals.

        A twin estimate the data could not identify is marked so (``capacity_text``).
        """
        from twinloop.agents.knee.run import capacity_text

        cols = (
            ("RMS err°", "rms_error_deg", "8.2f"),
            ("max err°", "max_error_deg", "8.2f"),
            ("exo work", "exo_work_fraction", "8.0%"),
            ("effort", "patient_effort", "8.3f"),
            ("spastic", "spasticity_events", "8d"),
            ("limits", "limit_violations", "8d"),
        )
        header = f"{'patient':<10}" + "".join(f"{c:>9}" for c, _, _ in cols) + "  overrides"
        flagged = summary.get("hazard_patients") or []
        seconds = sum(row["duration_s"] for row in summary["patients"].values())
        lines = [
            f"twinloop run: knee exoskeleton, {len(config.patients)} patient(s), task "
            f"{config.task}, controller {config.controller} under the exoskeleton supervisor, "
            f"{config.control_hz} Hz, twin {'on' if config.twin else 'off'}, seed {config.seed}, "
            f"agents {placement}",
            header,
            "-" * len(header),
        ]
        for name, row in summary["patients"].items():
            overrides = ", ".join(f"{k} {v}" for k, v in row["overrides"].items()) or "none"
            cells = "".join(f" {row[f]:{fmt}}" for _, f, fmt in cols)
            hazard = "  NON-PHYSIOLOGICAL" if row.get("non_physiological") else ""
            lines.append(f"{name:<10}{cells}  {overrides}{hazard}")
            if "twin" in row:
                tw = row["twin"]
                capacity = capacity_text(tw, where="; see report.md")
                lines.append(f"{'':<10} twin: voluntary capacity {capacity}")
                lines.append(
                    f"{'':<10}       effort {tw['voluntary_effort']:.2f} (true "
                    f"{tw['voluntary_effort_true']:.2f}), spasticity gain "
                    f"{tw['spasticity_gain_per_rad_s']:.3f} (true "
                    f"{tw['spasticity_gain_true_per_rad_s']:.3f}) /(rad/s)"
                )
        if flagged:
            lines.append(
                f"NON-PHYSIOLOGICAL: {len(flagged)} patient(s) whose knee went more than "
                f"{summary['hazard_beyond_rom_deg']:g}° beyond its anatomical range of motion "
                "or whose state was not a number (ticks_non_physiological in summary.json): "
                + ", ".join(
                    f"{n} ({summary['patients'][n]['ticks_non_physiological']} ticks)"
                    for n in flagged
                )
            )
        lines.append(
            f"{seconds:.1f} s of task simulated in {elapsed_s:.1f} s "
            f"({seconds / max(elapsed_s, 1e-9):.1f}× real time)"
        )
        return lines

    def fhir_export(self, run_dir: str | Path, **options: Any) -> Any:
        """:func:`twinloop.agents.knee.fhir.build_knee_export` (``twinloop export fhir``)."""
        from twinloop.agents.knee.fhir import build_knee_export

        return build_knee_export(run_dir, **options)

    def report(self, run_dir: str | Path, *, allow_incomplete: bool) -> Any:
        """:func:`twinloop.agents.knee.report.build_exo_report`."""
        from twinloop.agents.knee.report import build_exo_report

        return build_exo_report(run_dir, allow_incomplete=allow_incomplete)


PART = KneeLoop()
