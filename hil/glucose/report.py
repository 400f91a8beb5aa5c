"""``twinloop report`` for a HIL session: timing, alarms, CGM and insulin from its recording.

A rig's recording has no plant truth (the patient is outside the program): the report is built
from what the rig saw and did — the CGM readings (``sensor->controller``), the commands sent
(``supervisor->actuator``), the deliveries the pump reported (``actuator->plant``), the alarms
(``rig->alarms``) and each watchdog step's lateness, duration and overrun (``clock->ticks``).
Each alarm's outage (raised → cleared) is listed in the summary's ``outages`` and in the report.
It writes ``summary.json`` (rebuilt), ``plots/glucose_insulin.png``, ``plots/timing.png`` and
``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from twinloop.agents.recording import channel_file, read_channel
from twinloop.agents.report import CorruptRecordingError, check_complete
from twinloop.hil.glucose.rig import outages
from twinloop.hil.pacing import PacingStats
from twinloop.plant.glucose.metrics import glucose_metrics


@dataclasses.dataclass(frozen=True)
class HilReport:
    """What :func:`build_hil_report` wrote: the report, the plots and the summary."""

    run_dir: Path
    report_path: Path
    plots: tuple[Path, ...]
    summary: dict[str, Any]
    complete: bool


def is_hil_recording(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a rig's recording (its manifest's config has ``rig``)."""
    path = Path(run_dir) / "manifest.json"
    try:
        config = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "rig" in config


def _columns(run_dir: Path, channel: str) -> dict[str, list[Any]]:
    """One channel's columns: its final table, else an interrupted session's segments."""
    try:
        table = read_channel(run_dir, channel)
    except Exception as exc:  # pyarrow raises several kinds
        path = run_dir / "channels" / channel_file(channel)
        raise CorruptRecordingError(path, f"not a readable Parquet table ({exc})") from None
    return {} if table is None else table.to_pydict()


def build_hil_report(run_dir: str | Path, *, allow_incomplete: bool = False) -> HilReport:
    """Rebuild a HIL session's summary, plots and ``report.md`` from its recording."""
    run_dir = Path(run_dir)
    manifest, complete = check_complete(run_dir, allow_incomplete=allow_incomplete)
    rig_cfg = ((manifest or {}).get("config", {}) or {}).get("rig", {})
    scale = float(rig_cfg.get("time_scale", 60.0))
    ticks = _columns(run_dir, "clock->ticks")
    cgm = _columns(run_dir, "sensor->controller")
    sent = _columns(run_dir, "supervisor->actuator")
    delivered = _columns(run_dir, "actuator->plant")
    alarms = _columns(run_dir, "rig->alarms")

    stats = PacingStats(
        period_s=0.0 if not ticks else _step_s(ticks["t_min"], scale),
        lateness_ms=list(ticks.get("lateness_ms", [])),
        duration_ms=list(ticks.get("duration_ms", [])),
    )
    # tick starts on the wall clock: due time (t_min × scale) + lateness
    stats.start_s = [
        t * scale + late / 1000.0
        for t, late in zip(ticks.get("t_min", []), stats.lateness_ms, strict=True)
    ]
    summary: dict[str, Any] = {"timing": stats.summary() if ticks else {"ticks": 0}}
    summary["overruns_recorded"] = int(sum(bool(x) for x in ticks.get("overrun", [])))
    glucose = np.asarray(cgm.get("glucose_mg_dl", []), dtype=np.float64)
    summary["cgm_readings"] = int(glucose.size)
    if glucose.size >= 2:
        m = glucose_metrics(glucose[None, :], sample_period_min=5)
        summary["cgm"] = {
            "mean_mg_dl": float(np.asarray(m.mean_mg_dl)[0]),
            "time_in_range_70_180_pct": float(np.asarray(m.time_in_range_70_180_pct)[0]),
            "time_below_70_pct": float(np.asarray(m.time_below_70_pct)[0]),
        }
    summary["insulin_delivered_u"] = float(
        np.sum(delivered.get("basal_u", [])) + np.sum(delivered.get("bolus_u", []))
    )
    summary["alarms"] = [
        {k: alarms[k][i] for k in alarms if k != "patient"}
        for i in range(len(alarms.get("t_min", [])))
    ]
    summary["outages"] = outages(summary["alarms"])
    if not complete:
        summary["complete"] = False
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))

    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = (
        _plot_glucose_insulin(plots_dir, cgm, sent, alarms),
        _plot_timing(plots_dir, ticks),
    )
    report = run_dir / "report.md"
    report.write_text(_markdown(summary, plots, complete))
    return HilReport(run_dir, report, plots, summary, complete)


def _step_s(t_min: list[float], scale: float) -> float:
    t = np.asarray(t_min, dtype=np.float64)
    return float(np.median(np.diff(t))) * scale if t.size >= 2 else scale


def _plot_glucose_insulin(
    plots_dir: Path,
    cgm: dict[str, list[Any]],
    sent: dict[str, list[Any]],
    alarms: dict[str, list[Any]],
) -> Path:
    fig, (ax_g, ax_i) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax_g.axhspan(70, 180, color="tab:green", alpha=0.12, label="target 70–180 mg/dL")
    if cgm:
        ax_g.plot(np.asarray(cgm["t_min"]) / 60, cgm["glucose_mg_dl"], ".-", label="CGM")
    active = [i for i, a in enumerate(alarms.get("active", [])) if a]
    for i in active:
        t0 = alarms["t_min"][i] / 60
        ends = [
            alarms["t_min"][j] / 60
            for j in range(i + 1, len(alarms["t_min"]))
            if not alarms["active"][j] and alarms["source"][j] == alarms["source"][i]
        ]
        t1 = ends[0] if ends else ax_g.get_xlim()[1]
        ax_g.axvspan(t0, t1, color="tab:red", alpha=0.15)
        ax_g.text(t0, 1.0, f"{alarms['source'][i]}: {alarms['condition'][i]}", fontsize=7,
                  transform=ax_g.get_xaxis_transform(), va="top")  # fmt: skip
    ax_g.set_ylabel("glucose, mg/dL")
    ax_g.legend(loc="upper right", fontsize=8)
    if sent:
        t = np.asarray(sent["t_min"]) / 60
        ax_i.step(t, sent["basal_u_per_h"], where="post", label="temp basal sent, U/h")
        bolus = np.asarray(sent["bolus_u"], dtype=np.float64)
        if np.any(bolus > 0):
            ax_i.stem(t[bolus > 0], bolus[bolus > 0], linefmt="C3-", markerfmt="C3o",
                      basefmt=" ", label="bolus, U")  # fmt: skip
    ax_i.set_ylabel("insulin")
    ax_i.set_xlabel("time since the start, h (simulated)")
    ax_i.legend(loc="upper right", fontsize=8)
    fig.suptitle("HIL session: what the rig saw and sent (red: alarms)")
    path = plots_dir / "glucose_insulin.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_timing(plots_dir: Path, ticks: dict[str, list[Any]]) -> Path:
    fig, (ax_t, ax_h) = plt.subplots(1, 2, figsize=(11, 3.5))
    if ticks:
        late = np.asarray(ticks["lateness_ms"], dtype=np.float64)
        took = np.asarray(ticks["duration_ms"], dtype=np.float64)
        ax_t.plot(late, ".", ms=2, label="lateness")
        ax_t.plot(took, ".", ms=2, label="duration")
        ax_t.set_xlabel("watchdog step")
        ax_t.set_ylabel("ms")
        ax_t.legend(fontsize=8)
        ax_h.hist(late, bins=50, log=True)
        ax_h.set_xlabel("lateness, ms")
        ax_h.set_ylabel("steps")
    path = plots_dir / "timing.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _markdown(summary: dict[str, Any], plots: tuple[Path, ...], complete: bool) -> str:
    lines = ["# HIL session", ""]
    if not complete:
        lines += ["**Incomplete run**: the recording stops where the session was interrupted.", ""]
    timing = summary["timing"]
    if timing.get("ticks"):
        late, took = timing["lateness_ms"], timing["duration_ms"]
        lines += [
            "## Timing",
            "",
            "| steps | period | lateness p50 / p99 / max | duration p50 / p99 / max | "
            "jitter p99 | overruns | later than a period |",
            "|---|---|---|---|---|---|---|",
            f"| {timing['ticks']} | {timing['period_ms']:.1f} ms | {late['p50']:.2f} / "
            f"{late['p99']:.2f} / {late['max']:.2f} ms | {took['p50']:.2f} / {took['p99']:.2f} / "
            f"{took['max']:.2f} ms | {timing['jitter_ms']['p99']:.2f} ms | {timing['overruns']} | "
            f"{timing['later_than_one_period']} |",
            "",
        ]
    lines += ["## Alarms", ""]
    if summary["alarms"]:
        lines += ["| t, min | device | condition | raised | action |", "|---|---|---|---|---|"]
        for a in summary["alarms"]:
            lines.append(
                f"| {a['t_min']:.0f} | {a['source']} | {a['condition']} | "
                f"{'raised' if a['active'] else 'cleared'} | {a['action']} |"
            )
    else:
        lines.append("None.")
    lines += ["", "## Outages", ""]
    if summary["outages"]:
        lines += [
            "| device | condition | from, min | to, min | wall s |",
            "|---|---|---|---|---|",
        ]
        for o in summary["outages"]:
            end = "not over" if o["end_t_min"] is None else f"{o['end_t_min']:.0f}"
            wall = "—" if o["end_wall_s"] is None else f"{o['end_wall_s'] - o['start_wall_s']:.2f}"
            lines.append(
                f"| {o['source']} | {o['condition']} | {o['start_t_min']:.0f} | {end} | {wall} |"
            )
        lines += ["", "The recording has outages: no control decisions were made during them."]
    else:
        lines.append("None.")
    lines += ["", "## CGM and insulin", ""]
    if "cgm" in summary:
        c = summary["cgm"]
        lines.append(
            f"{summary['cgm_readings']} readings, mean {c['mean_mg_dl']:.1f} mg/dL, time in "
            f"range {c['time_in_range_70_180_pct']:.1f} %, below 70 "
            f"{c['time_below_70_pct']:.1f} %; insulin reported delivered "
            f"{summary['insulin_delivered_u']:.2f} U."
        )
    lines += ["", *[f"![{p.stem}](plots/{p.name})" for p in plots], ""]
    return "\n".join(lines)
