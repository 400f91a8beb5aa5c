"""``twinloop report`` for a knee-exoskeleton run: summary, plots and ``report.md``.

Rebuilt from the recording alone (never re-running it): the true joint state
(``plant->sensor``), the task's reference (``task->controller``), the commands before and after
the supervisor, its overrides and the twin's estimates. Writes ``summary.json`` (rebuilt, see
:func:`twinloop.agents.knee.run.summarize_exo`), per patient ``plots/<patient>_tracking.png`` (angle
and reference, tracking error, torques: exoskeleton applied and commanded, patient's muscles) and,
when the loop ran the twin, ``plots/<patient>_twin.png`` (its estimates against the preset's
true values), and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from twinloop.agents.knee.run import THERAPY, summarize_exo
from twinloop.agents.recording import channel_file
from twinloop.agents.report import (
    CorruptRecordingError,
    MissingRecordingFileError,
    check_complete,
)
from twinloop.plant.knee.model import knee_preset

DEG = 180.0 / math.pi


@dataclasses.dataclass(frozen=True)
class ExoReport:
    """What :func:`build_exo_report` wrote."""

    run_dir: Path
    report_path: Path
    plots: tuple[Path, ...]
    summary: dict[str, Any]
    complete: bool


def is_exo_recording(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds an exoskeleton run (its manifest's config names the therapy)."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    config = manifest.get("config", {}) if isinstance(manifest, dict) else {}
    return isinstance(config, dict) and config.get("therapy") == THERAPY


def _table(run_dir: Path, channel: str, *, required: bool) -> dict[str, list[Any]]:
    path = run_dir / "channels" / channel_file(channel)
    if not path.is_file():
        if required:
            raise MissingRecordingFileError(path, f"the {channel} table")
        return {}
    try:
        return pq.read_table(path).to_pydict()
    except Exception as exc:  # pyarrow raises several kinds
        raise CorruptRecordingError(path, f"not a readable Parquet table ({exc})") from None


def _rows(table: Mapping[str, Sequence[Any]], patient: str) -> np.ndarray:
    return np.flatnonzero(np.asarray(table.get("patient", [])) == patient)


def _col(table: Mapping[str, Sequence[Any]], name: str, rows: np.ndarray) -> np.ndarray:
    return np.asarray(table[name], dtype=np.float64)[rows]


def _plot_tracking(
    path: Path, patient: str, tables: Mapping[str, Mapping[str, Sequence[Any]]]
) -> Path:
    joint, ref = tables["plant->sensor"], tables["task->controller"]
    jr, rr = _rows(joint, patient), _rows(ref, patient)
    t = _col(joint, "t_s", jr)
    angle = _col(joint, "angle_rad", jr) * DEG
    t_ref, reference = _col(ref, "t_s", rr), _col(ref, "reference_rad", rr) * DEG
    fig = Figure(figsize=(11, 8), constrained_layout=True)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    ax1.plot(t_ref, reference, color="0.4", ls="--", lw=1.2, label="task reference")
    ax1.plot(t, angle, color="tab:blue", lw=1.2, label="knee angle (true)")
    ax1.set_ylabel("knee flexion (°)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"{patient}: tracking, torques")
    n = min(t.size, t_ref.size)
    ax2.plot(t_ref[1:n], angle[1:n] - reference[1:n], color="tab:red", lw=1.0)
    ax2.axhline(0.0, color="0.6", lw=0.6)
    ax2.set_ylabel("error (°)")
    ax3.plot(t, _col(joint, "patient_torque_nm", jr), color="tab:green", lw=1.0,
             label="patient muscles")  # fmt: skip
    ax3.plot(t, _col(joint, "exo_torque_nm", jr), color="tab:orange", lw=1.2,
             label="exoskeleton (applied)")  # fmt: skip
    cmd = tables.get("controller->supervisor", {})
    if cmd:
        cr = _rows(cmd, patient)
        ax3.plot(_col(cmd, "t_s", cr), _col(cmd, "torque_nm", cr), color="0.3", lw=0.7,
                 ls=":", label="controller's command")  # fmt: skip
    ov = tables.get("supervisor->overrides", {})
    if ov:
        orows = _rows(ov, patient)
        if orows.size:
            ax3.scatter(_col(ov, "t_s", orows), _col(ov, "approved_nm", orows), s=10,
                        color="tab:purple", zorder=3, label="supervisor override")  # fmt: skip
    ax3.set_ylabel("torque (N·m, + flexion)")
    ax3.set_xlabel("task time (s)")
    ax3.legend(loc="upper right", fontsize=8, ncol=2)
    fig.savefig(path, dpi=100)
    return path


def _plot_twin(
    path: Path, patient: str, est: Mapping[str, Sequence[Any]], joint: Mapping[str, Sequence[Any]]
) -> Path:
    er, jr = _rows(est, patient), _rows(joint, patient)
    truth = knee_preset(patient)
    t = _col(est, "t_s", er)
    fig = Figure(figsize=(11, 9), constrained_layout=True)
    ax1, ax2, ax4, ax3 = fig.subplots(4, 1, sharex=True)
    ax1.plot(_col(joint, "t_s", jr), _col(joint, "patient_torque_nm", jr), color="tab:green",
             lw=1.0, label="true")  # fmt: skip
    ax1.plot(t, _col(est, "patient_torque_nm", er), color="tab:blue", lw=0.8, alpha=0.8,
             label="twin (inverse dynamics)")  # fmt: skip
    ax1.set_ylabel("patient torque (N·m)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"{patient}: knee twin estimates")
    ax2.plot(t, _col(est, "voluntary_capacity", er), color="tab:blue", label="twin")
    ax2.axhline(truth.strength_fraction, color="k", ls="--", lw=1, label="preset (true)")
    ax2.set_ylabel("voluntary capacity")
    ax2.legend(loc="upper right", fontsize=8)
    ax4.plot(t, _col(est, "voluntary_effort", er), color="tab:blue", label="twin")
    ax4.plot(_col(joint, "t_s", jr), _col(joint, "voluntary_effort", jr), color="k", ls="--",
             lw=1, label="true (slacking)")  # fmt: skip
    ax4.set_ylabel("voluntary effort ε")
    ax4.legend(loc="lower left", fontsize=8)
    ax3.plot(t, _col(est, "spasticity_gain_per_rad_s", er), color="tab:red", label="twin")
    ax3.axhline(truth.spasticity_gain_per_rad_s, color="k", ls="--", lw=1, label="preset (true)")
    ax3.set_ylabel("spasticity gain (1/(rad/s))")
    ax3.set_xlabel("task time (s)")
    ax3.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def _markdown(
    config: Mapping[str, Any], summary: Mapping[str, Any], plots: Sequence[Path], complete: bool
) -> str:
    lines = [
        "# twinloop knee-exoskeleton run",
        "",
        f"Controller **{config.get('controller')}** under the exoskeleton supervisor; task "
        f"**{config.get('task')}** ({config.get('cycles')} cycles when cyclic), "
        f"{config.get('control_hz')} Hz control, plant at 1 kHz, seed {config.get('seed')}, "
        f"twin {'on' if config.get('twin') else 'off'}, agents {config.get('placement')}.",
        "",
    ]
    if not complete:
        lines += ["**Incomplete run**: the recording stopped early.", ""]
    lines += [
        "| patient | RMS error (°) | max error (°) | exo share of work | exo work (J) | "
        "patient work (J) | effort | spasticity events | limit violations | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.get("patients", {}).items():
        overrides = ", ".join(f"{k}: {v}" for k, v in row.get("overrides", {}).items()) or "none"
        lines.append(
            f"| {name} | {row['rms_error_deg']:.2f} | {row['max_error_deg']:.2f} | "
            f"{100 * row['exo_work_fraction']:.0f} % | {row['exo_work_j']:.1f} | "
            f"{row['patient_work_j']:.1f} | {row['patient_effort']:.3f} | "
            f"{row['spasticity_events']} | {row['limit_violations']} | {overrides} |"
        )
    flagged = summary.get("hazard_patients") or []
    if flagged:
        lines += [
            "",
            f"**NON-PHYSIOLOGICAL**: {', '.join(flagged)} — the knee went more than "
            f"{summary.get('hazard_beyond_rom_deg', 0):g}° beyond its anatomical range of motion "
            "or its state was not a number (`ticks_non_physiological` in summary.json).",
        ]
    twins = {n: r["twin"] for n, r in summary.get("patients", {}).items() if "twin" in r}
    if twins:
        lines += [
            "",
            "Twin estimates at the end of the task (true values in brackets). The voluntary "
            "capacity (residual strength) is observable only where the patient's intent "
            "exceeds it and the torque saturates; when the data never showed that, the twin "
            'reports 1.00 ("no weakness seen") with the strength only bounded below by what '
            "the patient demonstrated, marked *not observable* here: a stronger task or less "
            "assistance (a resistive load) would reveal it.",
            "",
            "| patient | voluntary capacity | effort | spasticity gain (1/(rad/s)) | "
            "residual RMS (N·m) |",
            "|---|---|---|---|---|",
        ]
        for name, tw in twins.items():
            capacity = f"{tw['voluntary_capacity']:.2f} [{tw['voluntary_capacity_true']:.2f}]"
            if tw.get("voluntary_capacity_identified") is False:
                low = tw["voluntary_capacity_range"][0]
                bound = f", ≥ {low:.2f} demonstrated" if math.isfinite(low) else ""
                capacity += f" *not observable at this assistance{bound}*"
            lines.append(
                f"| {name} | {capacity}"
                f" | {tw['voluntary_effort']:.2f} [{tw['voluntary_effort_true']:.2f}]"
                f" | {tw['spasticity_gain_per_rad_s']:.3f} "
                f"[{tw['spasticity_gain_true_per_rad_s']:.3f}] | {tw['residual_rms_nm']:.2f} |"
            )
    lines += [
        "",
        "Work is positive mechanical work on the joint; the exoskeleton's share is "
        "W_exo / (W_exo + W_patient). Effort is the mean squared muscle activation. Limits "
        "(range of motion, velocity, torque) are the supervisor's and are judged on the "
        "extremes within each control period.",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def build_exo_report(run_dir: str | Path, *, allow_incomplete: bool = False) -> ExoReport:
    """Rebuild an exoskeleton run's summary, plots and ``report.md`` from its recording."""
    run_dir = Path(run_dir)
    manifest, complete = check_complete(run_dir, allow_incomplete=allow_incomplete)
    config = (manifest or {}).get("config", {}) or {}
    channels = (
        "plant->sensor",
        "task->controller",
        "controller->supervisor",
        "supervisor->overrides",
        "estimator->controller",
    )
    required = ("plant->sensor", "task->controller")
    tables = {c: _table(run_dir, c, required=c in required) for c in channels}
    summary = summarize_exo(config, tables)
    if not complete:
        summary["complete"] = False
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots: list[Path] = []
    for patient in summary["patients"]:
        plots.append(_plot_tracking(plots_dir / f"{patient}_tracking.png", patient, tables))
        if tables["estimator->controller"]:
            plots.append(
                _plot_twin(
                    plots_dir / f"{patient}_twin.png",
                    patient,
                    tables["estimator->controller"],
                    tables["plant->sensor"],
                )
            )
    report = run_dir / "report.md"
    report.write_text(_markdown(config, summary, plots, complete))
    return ExoReport(run_dir, report, tuple(plots), summary, complete)
