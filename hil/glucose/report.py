"""``twinloop report`` for a HIL session: timing, alarms, CGM and insulin from its recording.

A rig's recording has no plant truth (the patient is outside the program): the report is built
from what the rig saw and did — the CGM readings (``sensor->controller``), the commands sent
(``supervisor->actuator``) and what became of each at the pump (``pump->acks``), the deliveries
the pump reported (``actuator->plant``), the alarms (``rig->alarms``) and each watchdog step's
lateness, duration and overrun (``clock->ticks``). In the plot, lines stop at data gaps and
outages, outages are shaded (named in the legend) and commands the pump did not accept are
drawn hollow as "not delivered".
Each alarm's outage (raised → cleared) is listed in the summary's ``outages`` and in the report.
It writes ``summary.json`` (rebuilt), ``plots/glucose_insulin.png``, ``plots/timing.png`` and
``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
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
    acks = _columns(run_dir, "pump->acks")
    run_columns = {"sensor->controller": cgm, "supervisor->actuator": sent, "pump->acks": acks}
    plots = (
        _plot_glucose_insulin(plots_dir, run_columns, summary["outages"]),
        _plot_timing(plots_dir, ticks),
    )
    report = run_dir / "report.md"
    report.write_text(_markdown(summary, plots, complete))
    return HilReport(run_dir, report, plots, summary, complete)


def _step_s(t_min: list[float], scale: float) -> float:
    t = np.asarray(t_min, dtype=np.float64)
    return float(np.median(np.diff(t))) * scale if t.size >= 2 else scale


#: Colour of the shading of each device's outages.
OUTAGE_COLOURS = {"cgm": "tab:red", "pump": "tab:purple"}
#: Label of the commands the pump never accepted.
NOT_DELIVERED = "not delivered (pump unreachable or refused)"


def _with_gaps(
    t: np.ndarray, y: np.ndarray, *, gap_min: float, breaks: Iterable[float] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """``t``, ``y`` with a NaN point wherever a line must not be drawn across.

    Between two consecutive samples more than ``gap_min`` apart, or on either side of a time
    in ``breaks`` (an outage's start), a NaN is inserted so the plotted line stops there.
    """
    if t.size < 2:
        return t, y
    split = np.diff(t) > gap_min
    for b in breaks:
        split |= (t[:-1] < b) & (t[1:] >= b)
    at = np.flatnonzero(split) + 1
    return np.insert(t, at, t[at - 1]), np.insert(y, at, np.nan)


def _held_steps(
    t: np.ndarray, v: np.ndarray, *, hold_min: float, breaks: Iterable[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Points for ``step(where="post")``: each value held to the next, or ``hold_min`` at most.

    Where the next value is more than 1.5 ``hold_min`` later, or an outage starts before it,
    the value ends after ``hold_min`` and the line stops (a NaN) until the next one.
    """
    nxt = np.append(t[1:], np.inf)
    stop = nxt > t + 1.5 * hold_min
    for b in breaks:
        stop |= (t < b) & (nxt >= b)
    counts = 1 + 2 * stop.astype(np.int64)  # the point, then its end and a NaN where it stops
    idx = np.repeat(np.arange(t.size), counts)
    pos = np.arange(idx.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return t[idx] + hold_min * (pos >= 1), np.where(pos == 2, np.nan, v[idx])


def _gap_min(t: np.ndarray, at_least: float) -> float:
    """Twice the usual spacing of ``t`` (its median), and at least ``at_least`` minutes."""
    return max(2.0 * float(np.median(np.diff(t))) if t.size >= 2 else 0.0, at_least)


def _shade_outages(axes: Sequence[Any], outages_: list[dict[str, Any]], end_h: float) -> None:
    """Shade each outage on every axis; one legend entry per device and condition."""
    labelled: set[tuple[str, str]] = set()
    for o in outages_:
        start = o["start_t_min"] / 60
        stop = end_h if o["end_t_min"] is None else o["end_t_min"] / 60
        key = (o["source"], o["condition"])
        colour = OUTAGE_COLOURS.get(o["source"], "tab:gray")
        for k, ax in enumerate(axes):
            first = k == 0 and key not in labelled
            label = f"{o['source']} outage: {o['condition']}" if first else None
            ax.axvspan(start, max(stop, start), color=colour, alpha=0.15, lw=0, label=label)
        labelled.add(key)


def glucose_insulin_figure(
    cgm: dict[str, list[Any]],
    sent: dict[str, list[Any]],
    acks: dict[str, list[Any]],
    outages_: list[dict[str, Any]],
) -> Any:
    """The CGM and the commands of a session (a matplotlib figure; the caller closes it).

    Lines stop at data gaps and at outages (NaN points), outages are shaded and listed in the
    legend (no labels on the plot that could overprint each other), and commands the pump did
    not accept (``pump->acks``; for older recordings: commands inside a pump outage) are drawn
    hollow, apart from the delivered ones, under :data:`NOT_DELIVERED`.
    """
    fig, (ax_g, ax_i) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ax_g.axhspan(70, 180, color="tab:green", alpha=0.12, label="target 70–180 mg/dL")
    ends = [max(c["t_min"]) for c in (cgm, sent) if c.get("t_min")]
    end_h = max(ends) / 60 if ends else 0.0
    starts = [o["start_t_min"] for o in outages_]
    if cgm.get("t_min"):
        t = np.asarray(cgm["t_min"], dtype=np.float64)
        t, g = _with_gaps(
            t,
            np.asarray(cgm["glucose_mg_dl"], dtype=np.float64),
            gap_min=_gap_min(t, 10.0),
            breaks=[o["start_t_min"] for o in outages_ if o["source"] == "cgm"],
        )
        ax_g.plot(t / 60, g, ".-", ms=3, label="CGM")
    _shade_outages((ax_g, ax_i), outages_, end_h)
    ax_g.set_ylabel("glucose, mg/dL")
    if sent.get("t_min"):
        t = np.asarray(sent["t_min"], dtype=np.float64)
        basal = np.asarray(sent["basal_u_per_h"], dtype=np.float64)
        bolus = np.asarray(sent["bolus_u"], dtype=np.float64)
        ok = _delivered(t, acks, outages_)
        period = _gap_min(t, 0.0) / 2  # a temp basal runs until the next command
        td, bd = t[ok], basal[ok]
        if td.size:
            tt, bb = _held_steps(td, bd, hold_min=period, breaks=starts)
            ax_i.step(tt / 60, bb, where="post", label="temp basal delivered, U/h")
        if np.any(~ok):
            ax_i.plot(t[~ok] / 60, basal[~ok], "o", mfc="none", color="C1", label=NOT_DELIVERED)
        given = ok & (bolus > 0)
        if np.any(given):
            ax_i.stem(t[given] / 60, bolus[given], linefmt="C3-", markerfmt="C3o",
                      basefmt=" ", label="bolus delivered, U")  # fmt: skip
        missed = ~ok & (bolus > 0)
        if np.any(missed):
            ax_i.plot(t[missed] / 60, bolus[missed], "^", mfc="none", color="C3",
                      label="bolus not delivered, U")  # fmt: skip
    ax_i.set_ylabel("insulin")
    ax_i.set_xlabel("time since the start, h (simulated)")
    for ax in (ax_g, ax_i):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle("HIL session: what the rig saw and what reached the pump (shaded: outages)")
    return fig


def _delivered(t: np.ndarray, acks: dict[str, list[Any]], outages_: list[dict[str, Any]]) -> Any:
    """Which commands (at times ``t``) the pump accepted.

    From ``pump->acks`` when the recording has it (matched by time); else every command inside
    a pump outage counts as not delivered.
    """
    if acks.get("t_min"):
        fate = dict(zip(acks["t_min"], acks["delivered"], strict=True))
        return np.array([bool(fate.get(x, False)) for x in t.tolist()], dtype=bool)
    ok = np.ones(t.shape, dtype=bool)
    for o in outages_:
        if o["source"] == "pump":
            stop = math.inf if o["end_t_min"] is None else o["end_t_min"]
            ok &= ~((t >= o["start_t_min"]) & (t <= stop))
    return ok


def _plot_glucose_insulin(plots_dir: Path, run_columns: dict[str, dict[str, list[Any]]],
                          outages_: list[dict[str, Any]]) -> Path:  # fmt: skip
    fig = glucose_insulin_figure(
        run_columns["sensor->controller"],
        run_columns["supervisor->actuator"],
        run_columns["pump->acks"],
        outages_,
    )
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
