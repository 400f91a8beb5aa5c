"""Report of a recorded run: summary metrics, plots and a Markdown page, from the recording only.

:func:`build_report` reads a run directory written by
:func:`twinloop.agents.glucose.run.run_cohort` (layout in :mod:`twinloop.agents.recording`) and
never re-runs anything. It writes into that directory::

    RUN_DIR/
      summary.json                 rebuilt from ``plant->sensor`` (agents.glucose.run.summarize)
      report.md                    run description, summary table, interventions, plots
      plots/trace_<patient>.png    glucose, meals, insulin and supervisor interventions
      plots/agp_<patient>.png      ambulatory glucose profile (runs of 2 days or more)
      plots/agp_cohort_<name>.png  the same, pooled over the patients of a cohort

Conventions: minute 0 of a run is midnight (the loop samples its meals with ``start_min=0``),
so ``t_min % 1440`` is the minute of the day. Glucose is plasma glucose (``bg_mg_dl``, one
sample per minute) unless a plot says CGM. Patients are reported in the order in which they
appear in ``plant->sensor`` (the order of the run).

A run whose manifest says ``"complete": false``, or whose directory still holds the
``INCOMPLETE`` marker, is refused with :class:`IncompleteRunError` unless
``allow_incomplete=True``; the summary of such a run carries ``"complete": false``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MultipleLocator
from numpy.typing import ArrayLike, NDArray

from twinloop.agents.glucose.run import summarize, tick_lateness
from twinloop.agents.recording import channel_file, read_channel
from twinloop.agents.report import (
    MANIFEST_FILE,
    CorruptRecordingError,
    IncompleteRunError,
    MissingRecordingFileError,
    ReportError,
    check_complete,
)
from twinloop.plant.errors import UnknownPatientError
from twinloop.plant.glucose.cohorts import expand_names, find_patient, population_tokens
from twinloop.plant.glucose.metrics import HIGH_MG_DL, LOW_MG_DL
from twinloop.plant.glucose.scenarios import MIN_PER_DAY
from twinloop.plant.units import MIN_PER_H

__all__ = [
    "AGP_BIN_MIN",
    "AGP_MIN_DAYS",
    "AmbulatoryGlucoseProfile",
    "CorruptRecordingError",
    "IncompleteRunError",
    "MissingRecordingFileError",
    "ReportError",
    "ReportResult",
    "ReportSettingError",
    "ambulatory_glucose_profile",
    "build_report",
    "intervention_category",
]

#: Folder (inside the run directory) of the plots, and the report's file name.
PLOTS_DIR = "plots"
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
#: Width of the time-of-day bins of the ambulatory glucose profile, minutes.
AGP_BIN_MIN = 15
#: Runs shorter than this many days get no ambulatory glucose profile.
AGP_MIN_DAYS = 2
#: Percentiles of the ambulatory glucose profile.
AGP_PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)

#: Most points drawn per line; longer traces are reduced to their min/max per bucket.
MAX_LINE_POINTS = 4000

_H_PER_DAY = 24

#: The columns read from each channel, besides ``patient`` and ``t_min``.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "plant->sensor": ("bg_mg_dl",),
    "sensor->controller": ("glucose_mg_dl",),
    "meal->controller": ("carbs_g",),
    "controller->supervisor": ("basal_u_per_h",),
    "actuator->plant": ("basal_u", "bolus_u"),
    "supervisor->overrides": ("reason",),
    "clock->ticks": ("lateness_ms",),
}
_TEXT_COLUMNS = frozenset({"reason"})

#: Colours of the supervisor's intervention categories (others get a grey).
_CATEGORY_COLOURS = {
    "low-glucose suspend": "#9467bd",
    "stale CGM": "#7f7f7f",
    "no command": "#000000",
    "invalid command": "#17becf",
    "max temp basal": "#e377c2",
    "max bolus": "#ff7f0e",
    "max insulin on board": "#bcbd22",
}
_OTHER_COLOUR = "#555555"
_PLASMA = "#1f3b73"
_CGM = "#4c9be8"
_BAND = "#2ca02c"
_MEAL = "#a0522d"
_BASAL = "#1f77b4"
_BOLUS = "#d62728"


class ReportSettingError(ReportError, ValueError):
    """A report setting outside what is allowed (names the field and the value)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class AmbulatoryGlucoseProfile:
    """Glucose by time of day, pooled over days (and patients): percentiles per bin.

    Percentiles use linear interpolation between order statistics (numpy's default
    ``"linear"`` method) over the valid (non-NaN) samples of a bin; a bin without any gives
    NaN.

    Attributes:
        bin_min: width of a time-of-day bin, minutes.
        hour_of_day: centre of each bin, hours after midnight, shape ``(B,)``.
        n_samples: valid samples pooled in each bin, shape ``(B,)``.
        p5_mg_dl: 5th percentile, mg/dL, shape ``(B,)``.
        p25_mg_dl: 25th percentile, mg/dL.
        median_mg_dl: median, mg/dL.
        p75_mg_dl: 75th percentile, mg/dL.
        p95_mg_dl: 95th percentile, mg/dL.

    """

    bin_min: int
    hour_of_day: NDArray[np.float64]
    n_samples: NDArray[np.int64]
    p5_mg_dl: NDArray[np.float64]
    p25_mg_dl: NDArray[np.float64]
    median_mg_dl: NDArray[np.float64]
    p75_mg_dl: NDArray[np.float64]
    p95_mg_dl: NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote and computed.

    Attributes:
        run_dir: the run directory.
        report_path: ``RUN_DIR/report.md``.
        summary_path: ``RUN_DIR/summary.json``.
        summary: the rebuilt summary (as written to ``summary_path``).
        summary_unchanged: whether the ``summary.json`` found in the run directory was
            byte-for-byte the rebuilt one (``None`` when there was none).
        complete: whether the run is complete (``False`` only with ``allow_incomplete``).
        patients: patient names, in the order of the run.
        days: days of the run (from the manifest, else from the recording's length).
        plots: every PNG written, per-patient traces first.
        agp_patients: ambulatory glucose profile of each patient (empty under 2 days).
        agp_cohorts: ambulatory glucose profile of each cohort (empty under 2 days).

    """

    run_dir: Path
    report_path: Path
    summary_path: Path
    summary: dict[str, Any]
    summary_unchanged: bool | None
    complete: bool
    patients: tuple[str, ...]
    days: int
    plots: tuple[Path, ...]
    agp_patients: dict[str, AmbulatoryGlucoseProfile]
    agp_cohorts: dict[str, AmbulatoryGlucoseProfile]


# --------------------------------------------------------------------------------------------
# Numerics


def _nan_percentiles(samples: NDArray[np.float64], q: Sequence[float]) -> NDArray[np.float64]:
    """Percentiles ``q`` (in %) of each row of ``samples`` ``(B, M)``, ignoring NaN → ``(K, B)``.

    Vectorized equivalent of ``np.nanpercentile(samples, q, axis=1)`` (linear method): NaN
    sorts last, so the valid samples of a row are its first ``n`` sorted values.
    """
    ordered = np.sort(samples, axis=1)
    n = np.count_nonzero(~np.isnan(samples), axis=1)  # (B,)
    qq = np.asarray(q, dtype=np.float64)[:, None] / 100.0  # (K, 1)
    pos = (np.maximum(n, 1) - 1)[None, :] * qq  # (K, B) virtual index
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0)[None, :])
    frac = pos - lo
    below = np.take_along_axis(ordered, lo.T, axis=1).T
    above = np.take_along_axis(ordered, hi.T, axis=1).T
    out = below + frac * (above - below)
    out[:, n == 0] = np.nan
    return out


def ambulatory_glucose_profile(
    bg_mg_dl: ArrayLike, *, bin_min: int = AGP_BIN_MIN
) -> AmbulatoryGlucoseProfile:
    """Ambulatory glucose profile of 1-min glucose pooled over days and rows.

    Args:
        bg_mg_dl: glucose, mg/dL, shape ``(T,)`` for one patient or ``(N, T)`` for several
            (pooled together); sample ``k`` of a row is minute ``k`` of the run, minute 0
            being midnight. NaN marks a missing sample.
        bin_min: width of a time-of-day bin, minutes; must divide 1440.

    Returns:
        The 5/25/50/75/95th percentiles of each bin (see :class:`AmbulatoryGlucoseProfile`).

    Raises:
        ReportSettingError: ``bin_min`` does not divide a day, or ``bg_mg_dl`` is not 1-D/2-D.

    """
    if not (
        isinstance(bin_min, int) and 1 <= bin_min <= MIN_PER_DAY and MIN_PER_DAY % bin_min == 0
    ):
        raise ReportSettingError("bin_min", bin_min, "a whole number of minutes dividing 1440")
    g = np.asarray(bg_mg_dl, dtype=np.float64)
    if g.ndim == 1:
        g = g[None, :]
    if g.ndim != 2:
        raise ReportSettingError("bg_mg_dl", f"array of shape {g.shape}", "shape (T,) or (N, T)")
    n_rows, n_min = g.shape
    days = max(1, -(-n_min // MIN_PER_DAY))
    padded = np.full((n_rows, days * MIN_PER_DAY), np.nan)
    padded[:, :n_min] = g
    bins = MIN_PER_DAY // bin_min
    # (N, D, B, bin) → (B, N, D, bin) → one row of pooled samples per time-of-day bin.
    pooled = padded.reshape(n_rows, days, bins, bin_min).transpose(2, 0, 1, 3).reshape(bins, -1)
    p = _nan_percentiles(pooled, AGP_PERCENTILES)
    return AmbulatoryGlucoseProfile(
        bin_min=bin_min,
        hour_of_day=(np.arange(bins, dtype=np.float64) + 0.5) * (bin_min / MIN_PER_H),
        n_samples=np.count_nonzero(~np.isnan(pooled), axis=1).astype(np.int64),
        p5_mg_dl=p[0],
        p25_mg_dl=p[1],
        median_mg_dl=p[2],
        p75_mg_dl=p[3],
        p95_mg_dl=p[4],
    )


def intervention_category(reason: str) -> str:
    """Category of a supervisor override reason: its text before any ``:`` or ``(``.

    ``"low-glucose suspend (CGM < 70)"`` → ``"low-glucose suspend"``,
    ``"stale CGM: scheduled basal"`` → ``"stale CGM"``, ``"max bolus"`` → ``"max bolus"``.
    """
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


def _decimate(
    x: NDArray[np.float64], y: NDArray[np.float64], max_points: int = MAX_LINE_POINTS
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Keep the minimum and the maximum of each bucket (in time order), at most ``max_points``."""
    n = y.shape[0]
    if n <= max_points:
        return x, y
    bucket = math.ceil(2 * n / max_points)
    n_buckets = math.ceil(n / bucket)
    yp = np.full(n_buckets * bucket, np.nan)
    yp[:n] = y
    yp2 = yp.reshape(n_buckets, bucket)
    missing = np.isnan(yp2)
    lo = np.where(missing, np.inf, yp2).argmin(axis=1)
    hi = np.where(missing, -np.inf, yp2).argmax(axis=1)
    pair = np.stack([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1)
    idx = (np.arange(n_buckets)[:, None] * bucket + pair).ravel()
    idx = idx[idx < n]
    return x[idx], y[idx]


def _episodes(
    t_min: NDArray[np.float64], gap_min: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Start and end (last event + ``gap_min``) of runs of events no more than ``gap_min`` apart."""
    t = np.sort(t_min)
    if t.size == 0:
        return t, t
    breaks = np.flatnonzero(np.diff(t) > gap_min)
    starts = t[np.r_[0, breaks + 1]]
    ends = t[np.r_[breaks, t.size - 1]] + gap_min
    return starts, ends


# --------------------------------------------------------------------------------------------
# Reading the recording


@dataclasses.dataclass(frozen=True)
class _Table:
    """A channel's file as read: patient names, each row's index into them, and columns."""

    path: Path
    names: list[str]
    code: NDArray[np.intp]
    columns: dict[str, NDArray[Any]]


@dataclasses.dataclass(frozen=True)
class _Channel:
    """A channel's rows grouped by patient (in the run's order), each group sorted by time."""

    path: Path
    patient: NDArray[np.intp]
    columns: dict[str, NDArray[Any]]
    order: NDArray[np.intp]
    bounds: NDArray[np.intp]

    @classmethod
    def index(cls, table: _Table, patients: Sequence[str]) -> _Channel:
        """Group ``table``'s rows by the position of their patient in ``patients``."""
        where = {name: k for k, name in enumerate(patients)}
        unknown = [name for name in table.names if name not in where]
        if unknown:
            raise CorruptRecordingError(
                table.path, f"patient(s) {', '.join(unknown)} not in the plant recording"
            )
        lookup = np.array([where[name] for name in table.names], dtype=np.intp)
        patient = lookup[table.code]
        order = np.lexsort((table.columns["t_min"], patient)).astype(np.intp)
        bounds = np.searchsorted(patient[order], np.arange(len(patients) + 1)).astype(np.intp)
        return cls(table.path, patient, table.columns, order, bounds)

    def rows(self, i: int) -> NDArray[np.intp]:
        """Indices of patient ``i``'s rows, by time."""
        return self.order[self.bounds[i] : self.bounds[i + 1]]

    def of(self, i: int, name: str) -> NDArray[Any]:
        """Column ``name`` of patient ``i``, by time."""
        return self.columns[name][self.rows(i)]


def _read_table(run_dir: Path, channel: str, *, required: bool) -> _Table:
    """Read one channel: its final file, else an interrupted run's flushed segments.

    An absent channel is an empty table when it is not ``required``.
    """
    path = run_dir / "channels" / channel_file(channel)
    names = _COLUMNS[channel]
    try:
        table = read_channel(run_dir, channel)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptRecordingError(path, f"not a readable Parquet table ({exc})") from None
    if table is None:
        if required:
            raise MissingRecordingFileError(path, f"recording of channel {channel}")
        empty: dict[str, NDArray[Any]] = {c: np.empty(0) for c in ("t_min", *names)}
        return _Table(path, [], np.empty(0, dtype=np.intp), empty)
    try:
        schema_names = table.schema.names
        missing = [c for c in ("patient", "t_min", *names) if c not in schema_names]
        if missing:
            raise CorruptRecordingError(
                path, f"column(s) {', '.join(missing)} missing; found {', '.join(schema_names)}"
            )
        table = table.select(["patient", "t_min", *names])
        who = table.column("patient")
        if who.null_count:
            raise CorruptRecordingError(path, f"{who.null_count} row(s) without a patient")
        # Dictionary encoding lists the names in order of first appearance.
        encoded = who.cast(pa.string()).combine_chunks().dictionary_encode()
    except (pa.ArrowException, OSError) as exc:
        raise CorruptRecordingError(path, f"not a readable Parquet table ({exc})") from None
    found = [str(s) for s in encoded.dictionary.to_pylist()]
    code = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.intp)
    columns: dict[str, NDArray[Any]] = {}
    for name in ("t_min", *names):
        col = table.column(name)
        if name in _TEXT_COLUMNS:
            columns[name] = np.array([str(v) for v in col.to_pylist()], dtype=object)
            continue
        try:
            columns[name] = np.asarray(col.to_numpy(), dtype=np.float64)
        except (pa.ArrowException, TypeError, ValueError):
            raise CorruptRecordingError(
                path, f"column {name} is {col.type}, expected numbers"
            ) from None
    t = columns["t_min"]
    if not np.all(np.isfinite(t) & (t >= 0)):
        raise CorruptRecordingError(path, "column t_min holds negative or non-finite times")
    return _Table(path, found, code, columns)


def _run_order(manifest: Mapping[str, Any] | None, plant: _Table, *, complete: bool) -> list[str]:
    """The recorded patients in the order of the run's configuration (else as recorded).

    Loops of several patients may record concurrently, so the order of first appearance
    is not the run's order; the summary lists patients in the configured order.
    """
    names = ((manifest or {}).get("config") or {}).get("patients")
    if not names:
        return plant.names
    try:
        configured = [p.name for p in expand_names(names)]
    except (UnknownPatientError, TypeError) as exc:
        raise CorruptRecordingError(
            Path(plant.path.parents[1], MANIFEST_FILE), f"config.patients: {exc}"
        ) from None
    extra = [n for n in plant.names if n not in configured]
    if extra:
        raise CorruptRecordingError(
            plant.path, f"patient(s) {', '.join(extra)} are not in the run's configuration"
        )
    absent = [n for n in configured if n not in plant.names]
    if absent and complete:
        raise CorruptRecordingError(
            plant.path, f"no rows for patient(s) {', '.join(absent)} of this complete run"
        )
    return [n for n in configured if n in plant.names]


def _plasma_matrix(plant: _Channel, n_patients: int) -> NDArray[np.float64]:
    """Plasma glucose ``(N, T)`` with sample ``k`` at minute ``k`` (NaN where not recorded)."""
    t = plant.columns["t_min"]
    if not np.array_equal(t, np.round(t)):
        raise CorruptRecordingError(plant.path, "column t_min holds non-whole minutes")
    minute = t.astype(np.intp)
    n_min = int(minute.max()) + 1 if minute.size else 0
    bg = np.full((n_patients, n_min), np.nan)
    bg[plant.patient, minute] = plant.columns["bg_mg_dl"]
    return bg


def _cohort_of(name: str, path: Path, populations: tuple[str, ...]) -> str:
    try:
        return find_patient(name, populations).cohort
    except UnknownPatientError:
        raise CorruptRecordingError(path, f"unknown patient {name!r}") from None


# --------------------------------------------------------------------------------------------
# Plots


def _clock_label(x: float, _pos: int | None = None) -> str:
    h = round(x)
    if h % _H_PER_DAY == 0:
        return f"00:00\nday {h // _H_PER_DAY + 1}"
    return f"{h % _H_PER_DAY:02d}:00"


def _time_axis(ax: Axes, days: int, end_h: float) -> None:
    step_h = 3 if days <= 1 else 6 if days <= 3 else 12 if days <= 7 else 24
    ax.xaxis.set_major_locator(MultipleLocator(step_h))
    ax.xaxis.set_major_formatter(FuncFormatter(_clock_label))
    ax.set_xlim(0.0, end_h)
    ax.set_xlabel("time of day (h:min), day of the run at midnight")


def _midnights(ax: Axes, end_h: float) -> None:
    for h in range(_H_PER_DAY, math.ceil(end_h), _H_PER_DAY):
        ax.axvline(h, color="0.6", lw=0.8, zorder=0.5)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    fig.clear()
    return path


def _plot_trace(
    path: Path,
    *,
    title: str,
    days: int,
    period_min: float,
    bg: NDArray[np.float64],
    cgm_t: NDArray[np.float64],
    cgm: NDArray[np.float64],
    meal_t: NDArray[np.float64],
    carbs: NDArray[np.float64],
    delivery_t: NDArray[np.float64],
    basal_u: NDArray[np.float64],
    bolus_u: NDArray[np.float64],
    request_t: NDArray[np.float64],
    request_u_per_h: NDArray[np.float64],
    override_t: NDArray[np.float64],
    override_category: NDArray[Any],
) -> Path:
    """One patient's run: glucose with interventions, announced meals, basal and boluses."""
    fig = Figure(figsize=(13.0, 8.0))
    ax_g, ax_m, ax_i = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3.2, 1.0, 1.6]}
    )
    # Fixed margins (much faster than a layout engine); legends sit right of the axes.
    fig.subplots_adjust(left=0.06, right=0.78, top=0.95, bottom=0.1, hspace=0.12)
    end_h = max(days * _H_PER_DAY, (bg.shape[0] - 1) / MIN_PER_H)

    # Glucose: target band, plasma line, CGM dots.
    ax_g.axhspan(LOW_MG_DL, HIGH_MG_DL, color=_BAND, alpha=0.12, lw=0, zorder=0)
    x, y = _decimate(np.arange(bg.shape[0]) / MIN_PER_H, bg)
    ax_g.plot(x, y, color=_PLASMA, lw=1.1, label="plasma glucose")
    ax_g.plot(cgm_t / MIN_PER_H, cgm, ".", color=_CGM, ms=2.5, label="CGM reading")
    finite = np.concatenate([bg[np.isfinite(bg)], cgm[np.isfinite(cgm)]])
    top = max(300.0, float(finite.max()) + 20.0) if finite.size else 300.0
    bottom = min(40.0, float(finite.min()) - 10.0) if finite.size else 40.0
    ax_g.set_ylim(max(bottom, 0.0), top)
    ax_g.set_ylabel("glucose (mg/dL)")
    ax_g.set_title(title, loc="left", fontsize=11)

    # Supervisor interventions: a line where an episode starts, a shade while it lasts
    # (overrides at successive control ticks form one episode).
    handles: list[Any] = [
        Line2D([], [], color=_PLASMA, lw=1.1, label="plasma glucose"),
        Line2D([], [], ls="", marker=".", color=_CGM, label="CGM reading"),
        Patch(color=_BAND, alpha=0.25, label=f"target {LOW_MG_DL:g}–{HIGH_MG_DL:g} mg/dL"),
    ]
    categories, inverse = np.unique(override_category.astype(str), return_inverse=True)
    for k, category in enumerate(categories):
        colour = _CATEGORY_COLOURS.get(str(category), _OTHER_COLOUR)
        times = override_t[inverse == k]
        starts, ends = _episodes(times, period_min)
        for ax in (ax_g, ax_i):
            ax.vlines(
                starts / MIN_PER_H, 0, 1, transform=ax.get_xaxis_transform(), colors=colour, lw=1.0
            )
            for s, e in zip(starts, ends, strict=True):
                ax.axvspan(s / MIN_PER_H, e / MIN_PER_H, color=colour, alpha=0.15, lw=0)
        # A marker per category at the top, stacked, so coincident categories stay visible.
        ax_g.plot(
            starts / MIN_PER_H,
            np.full(starts.size, 0.985 - 0.035 * k),
            ls="",
            marker="v",
            ms=5,
            color=colour,
            transform=ax_g.get_xaxis_transform(),
        )
        handles.append(
            Line2D(
                [],
                [],
                color=colour,
                lw=1.5,
                marker="v",
                ms=5,
                label=f"supervisor: {category} ({times.size}×)",
            )
        )
    ax_g.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)

    # Announced meals.
    width_h = max(0.25, days * 0.08)
    ax_m.bar(meal_t / MIN_PER_H, carbs, width=width_h, color=_MEAL, label="announced carbs")
    if 0 < carbs.size <= 60:
        for tx, g in zip(meal_t, carbs, strict=True):
            ax_m.annotate(
                f"{g:.0f}",
                (tx / MIN_PER_H, g),
                textcoords="offset points",
                xytext=(0, 1),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax_m.set_ylim(0.0, max(float(carbs.max()) * 1.3, 10.0) if carbs.size else 10.0)
    ax_m.set_ylabel("meal (g carbs)")
    ax_m.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)

    # Insulin: basal rates (steps, U/h) and boluses (stems, U on the right axis).
    rate = basal_u * MIN_PER_H
    if rate.size:
        change = np.r_[True, np.diff(rate) != 0]
        xs = np.r_[delivery_t[change], delivery_t[-1] + 1.0] / MIN_PER_H
        ys = np.r_[rate[change], rate[-1]]
        ax_i.step(xs, ys, where="post", color=_BASAL, lw=1.2, label="basal delivered")
    if request_t.size:
        change = np.r_[True, np.diff(request_u_per_h) != 0]
        ax_i.step(
            np.r_[request_t[change], request_t[-1] + period_min] / MIN_PER_H,
            np.r_[request_u_per_h[change], request_u_per_h[-1]],
            where="post",
            color="0.35",
            lw=0.9,
            ls=":",
            label="basal requested by controller",
        )
    top_rate = max(
        float(rate.max()) if rate.size else 0.0,
        float(np.nanmax(request_u_per_h)) if np.isfinite(request_u_per_h).any() else 0.0,
    )
    ax_i.set_ylim(0.0, max(top_rate * 1.25, 0.5))
    ax_i.set_ylabel("basal (U/h)")
    ax_b = ax_i.twinx()
    dose = bolus_u > 0
    bx, by = delivery_t[dose] / MIN_PER_H, bolus_u[dose]
    ax_b.vlines(bx, 0.0, by, colors=_BOLUS, lw=1.4)
    ax_b.plot(bx, by, "o", color=_BOLUS, ms=3.5, label="bolus delivered")
    ax_b.set_ylim(0.0, max(float(by.max()) * 1.2, 1.0) if by.size else 1.0)
    ax_b.set_ylabel("bolus (U)", color=_BOLUS)
    lines = [*ax_i.get_legend_handles_labels()[0], *ax_b.get_legend_handles_labels()[0]]
    ax_i.legend(handles=lines, loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8)

    for ax in (ax_g, ax_m, ax_i):
        _midnights(ax, end_h)
        ax.grid(axis="y", color="0.9", lw=0.6)
    _time_axis(ax_i, days, end_h)
    return _save(fig, path)


def _plot_agp(
    path: Path,
    agp: AmbulatoryGlucoseProfile,
    *,
    title: str,
    medians: Mapping[str, NDArray[np.float64]] | None = None,
) -> Path:
    """Percentile bands by time of day, target lines, and optionally each patient's median."""
    fig = Figure(figsize=(11.0, 5.0))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.07, right=0.8, top=0.92, bottom=0.11)
    # Close the day: 00:00 and 24:00 take the mean of the first and last bins (midnight).
    h = np.r_[0.0, agp.hour_of_day, float(_H_PER_DAY)]

    def wrap(v: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.r_[(v[0] + v[-1]) / 2, v, (v[0] + v[-1]) / 2]

    ax.fill_between(
        h,
        wrap(agp.p5_mg_dl),
        wrap(agp.p95_mg_dl),
        color=_PLASMA,
        alpha=0.15,
        lw=0,
        label="5–95 %",
    )
    ax.fill_between(
        h,
        wrap(agp.p25_mg_dl),
        wrap(agp.p75_mg_dl),
        color=_PLASMA,
        alpha=0.35,
        lw=0,
        label="25–75 %",
    )
    if medians:
        for k, m in enumerate(medians.values()):
            ax.plot(
                h,
                wrap(m),
                color="0.45",
                lw=0.6,
                alpha=0.8,
                label="median of each patient" if k == 0 else None,
            )
    ax.plot(h, wrap(agp.median_mg_dl), color=_PLASMA, lw=2.0, label="median")
    for level in (LOW_MG_DL, HIGH_MG_DL):
        ax.axhline(level, color=_BAND, lw=1.2, ls="--")
    ax.plot(
        [], [], color=_BAND, lw=1.2, ls="--", label=f"target {LOW_MG_DL:g}–{HIGH_MG_DL:g} mg/dL"
    )
    finite = agp.p95_mg_dl[np.isfinite(agp.p95_mg_dl)]
    ax.set_ylim(
        min(40.0, float(np.nanmin(agp.p5_mg_dl)) - 10.0) if finite.size else 40.0,
        max(300.0, float(finite.max()) + 20.0) if finite.size else 300.0,
    )
    ax.set_xlim(0.0, float(_H_PER_DAY))
    ax.xaxis.set_major_locator(MultipleLocator(3))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{round(x) % 24:02d}:00"))
    ax.set_xlabel("time of day (h:min)")
    ax.set_ylabel("plasma glucose (mg/dL)")
    ax.grid(color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_title(title, loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def _days(days: int) -> str:
    return f"{days} day" if days == 1 else f"{days} days"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unnamed"


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: object, digits: int) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "–"


_TABLE_COLUMNS = (
    ("mean (mg/dL)", "mean_mg_dl", 1),
    ("TIR 70–180 (%)", "time_in_range_70_180_pct", 1),
    ("< 70 (%)", "time_below_70_pct", 1),
    ("< 54 (%)", "time_below_54_pct", 1),
    ("> 180 (%)", "time_above_180_pct", 1),
    ("> 250 (%)", "time_above_250_pct", 1),
    ("LBGI", "lbgi", 2),
    ("HBGI", "hbgi", 2),
    ("GRI", "gri", 1),
)


def _markdown(
    run_dir: Path,
    manifest: Mapping[str, Any] | None,
    summary: Mapping[str, Any],
    *,
    complete: bool,
    days: int,
    counts: Mapping[str, Mapping[str, int]],
    traces: Mapping[str, Path],
    agps: Mapping[str, Path],
    cohort_agps: Mapping[str, Path],
) -> str:
    cfg = (manifest or {}).get("config", {}) or {}
    out = [f"# Run report: {run_dir.name}", ""]
    if not complete:
        out += [
            "> **Incomplete run.** The recording was interrupted; it may stop before the "
            "configured end and its metrics cover only what was recorded.",
            "",
        ]
    facts = [
        ("patients", ", ".join(summary["patients"])),
        ("days", str(days)),
        ("controller", str(cfg.get("controller", "?"))),
        ("meal scenario", str(cfg.get("scenario", "?"))),
        ("seed", str(cfg.get("seed", "?"))),
        ("control period", f"{cfg.get('control_period_min', '?')} min"),
        ("git revision", str((manifest or {}).get("git_revision") or "unknown")),
    ]
    wall = (manifest or {}).get("wall_time_s")
    if isinstance(wall, int | float):
        facts.append(("wall time of the run", f"{wall:.1f} s"))
    late = summary.get("tick_lateness_ms")
    if isinstance(late, Mapping):
        facts.append(
            (
                "wall-clock tick lateness",
                f"{late.get('ticks')} ticks, p50 {_fmt(late.get('p50'), 2)} ms, "
                f"p99 {_fmt(late.get('p99'), 2)} ms, max {_fmt(late.get('max'), 2)} ms",
            )
        )
    out += [f"- **{k}**: {v}" for k, v in facts]
    out += [
        "",
        "## Glucose metrics",
        "",
        "Plasma glucose at 1-min samples (rebuilt from `channels/plant__sensor.parquet`); "
        "cohort rows are the means of their patients' values.",
        "",
        "| | " + " | ".join(c for c, _, _ in _TABLE_COLUMNS) + " |",
        "|---|" + "---:|" * len(_TABLE_COLUMNS),
    ]
    for group in ("patients", "cohorts"):
        for name, row in summary[group].items():
            cells = " | ".join(_fmt(row.get(f), d) for _, f, d in _TABLE_COLUMNS)
            label = f"**{name}**" if group == "cohorts" else name
            out.append(f"| {label} | {cells} |")
    categories = sorted({c for per in counts.values() for c in per})
    out += ["", "## Supervisor interventions", ""]
    if categories:
        out += [
            "Overrides per reason category (one per limit the supervisor applied to a "
            "controller command at a control tick).",
            "",
            "| | " + " | ".join(categories) + " |",
            "|---|" + "---:|" * len(categories),
        ]
        for name, per in counts.items():
            out.append(f"| {name} | " + " | ".join(str(per.get(c, 0)) for c in categories) + " |")
    else:
        out.append("None: the supervisor passed every command unchanged.")
    out += ["", "## Plots", ""]
    for name, path in traces.items():
        rel = path.relative_to(run_dir).as_posix()
        out += [f"### {name}", "", f"![{name}: glucose, meals, insulin]({rel})", ""]
        if name in agps:
            rel = agps[name].relative_to(run_dir).as_posix()
            out += [f"![{name}: ambulatory glucose profile]({rel})", ""]
    if cohort_agps:
        out += ["### Cohorts", ""]
        for name, path in cohort_agps.items():
            rel = path.relative_to(run_dir).as_posix()
            out += [f"![{name}: ambulatory glucose profile]({rel})", ""]
    elif days < AGP_MIN_DAYS:
        out += [f"No ambulatory glucose profile: the run is shorter than {AGP_MIN_DAYS} days.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The report


def build_report(run_dir: str | Path, *, allow_incomplete: bool = False) -> ReportResult:
    """Rebuild a run's summary, plots and ``report.md`` from its recording (never re-running).

    Reads ``manifest.json`` and ``channels/*.parquet``; writes ``summary.json`` (recomputed
    from ``plant->sensor`` with :func:`twinloop.agents.glucose.run.summarize`), ``plots/*.png`` and
    ``report.md`` into ``run_dir``. Every channel the manifest lists must be present; a
    channel it does not list had no messages (the recorder writes no file for it).

    Args:
        run_dir: the run directory.
        allow_incomplete: report an interrupted run (manifest ``complete`` false, or the
            ``INCOMPLETE`` marker present) instead of refusing it.

    Returns:
        What was written and computed (see :class:`ReportResult`).

    Raises:
        IncompleteRunError: the run is incomplete and ``allow_incomplete`` is false.
        MissingRecordingFileError: the directory, the manifest or a channel's file is missing
            (the error names it).
        CorruptRecordingError: a file cannot be read, lacks a column, or has impossible values.

    """
    run_dir = Path(run_dir)
    manifest, complete = check_complete(run_dir, allow_incomplete=allow_incomplete)
    listed = set(manifest.get("channels", ())) if manifest is not None else set()

    plant_table = _read_table(run_dir, "plant->sensor", required=True)
    patients = _run_order(manifest, plant_table, complete=complete)
    if not patients:
        raise CorruptRecordingError(plant_table.path, "no rows: nothing was recorded")
    plant = _Channel.index(plant_table, patients)
    channels = {
        name: _Channel.index(_read_table(run_dir, name, required=name in listed), patients)
        for name in _COLUMNS
        if name != "plant->sensor"
    }
    bg = _plasma_matrix(plant, len(patients))
    configured = ((manifest or {}).get("config") or {}).get("patients")
    populations = population_tokens(configured) if isinstance(configured, list) else ()
    cohorts = [_cohort_of(name, plant.path, populations) for name in patients]

    # (1) Summary, exactly as the run writes it.
    summary = summarize(patients, cohorts, bg)
    lateness = channels["clock->ticks"].columns["lateness_ms"]
    if complete and lateness.size:
        summary["tick_lateness_ms"] = tick_lateness(lateness)
    if not complete:
        summary["complete"] = False
    text = json.dumps(summary, indent=1, default=float)
    summary_path = run_dir / SUMMARY_FILE
    previous = summary_path.read_text() if summary_path.is_file() else None
    summary_path.write_text(text)

    cfg = (manifest or {}).get("config", {}) or {}
    recorded_days = max(1, -(-(bg.shape[1] - 1) // MIN_PER_DAY))
    configured = cfg.get("days")
    days = configured if isinstance(configured, int) and configured >= 1 else recorded_days
    period = float(cfg.get("control_period_min", 5) or 5)

    # (2) Plots.
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    cgm, meal = channels["sensor->controller"], channels["meal->controller"]
    request, delivery = channels["controller->supervisor"], channels["actuator->plant"]
    overrides = channels["supervisor->overrides"]
    traces: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    reasons = overrides.columns["reason"]
    unique_reasons, reason_idx = np.unique(reasons.astype(str), return_inverse=True)
    category = np.array([intervention_category(r) for r in unique_reasons], dtype=object)[
        reason_idx
    ]
    for i, name in enumerate(patients):
        rows = overrides.rows(i)
        cats = category[rows] if rows.size else np.empty(0, dtype=object)
        kinds, n = np.unique(cats.astype(str), return_counts=True)
        counts[name] = {str(k): int(c) for k, c in zip(kinds, n, strict=True)}
        m = summary["patients"][name]
        title = (
            f"{name} ({cohorts[i]}), {_days(days)}, controller {cfg.get('controller', '?')}, "
            f"seed {cfg.get('seed', '?')}: mean {_fmt(m['mean_mg_dl'], 0)} mg/dL, "
            f"TIR {_fmt(m['time_in_range_70_180_pct'], 1)} %, "
            f"< 70: {_fmt(m['time_below_70_pct'], 1)} %"
        )
        traces[name] = _plot_trace(
            plots_dir / f"trace_{_slug(name)}.png",
            title=title,
            days=days,
            period_min=period,
            bg=bg[i],
            cgm_t=cgm.of(i, "t_min"),
            cgm=cgm.of(i, "glucose_mg_dl"),
            meal_t=meal.of(i, "t_min"),
            carbs=meal.of(i, "carbs_g"),
            delivery_t=delivery.of(i, "t_min"),
            basal_u=delivery.of(i, "basal_u"),
            bolus_u=delivery.of(i, "bolus_u"),
            request_t=request.of(i, "t_min"),
            request_u_per_h=request.of(i, "basal_u_per_h"),
            override_t=overrides.of(i, "t_min"),
            override_category=cats,
        )

    agp_patients: dict[str, AmbulatoryGlucoseProfile] = {}
    agp_cohorts: dict[str, AmbulatoryGlucoseProfile] = {}
    agp_plots: dict[str, Path] = {}
    cohort_plots: dict[str, Path] = {}
    if days >= AGP_MIN_DAYS:
        for i, name in enumerate(patients):
            agp = agp_patients[name] = ambulatory_glucose_profile(bg[i])
            agp_plots[name] = _plot_agp(
                plots_dir / f"agp_{_slug(name)}.png",
                agp,
                title=f"{name}: ambulatory glucose profile over {days} days "
                f"({agp.bin_min}-min bins of plasma glucose)",
            )
        for group in dict.fromkeys(cohorts):
            members = [i for i, c in enumerate(cohorts) if c == group]
            agp = agp_cohorts[group] = ambulatory_glucose_profile(bg[members])
            cohort_plots[group] = _plot_agp(
                plots_dir / f"agp_cohort_{_slug(group)}.png",
                agp,
                title=f"cohort {group} ({len(members)} patients): ambulatory glucose "
                f"profile over {days} days ({agp.bin_min}-min bins, patients pooled)",
                medians={patients[i]: agp_patients[patients[i]].median_mg_dl for i in members},
            )

    # (3) The page.
    report_path = run_dir / REPORT_FILE
    report_path.write_text(
        _markdown(
            run_dir,
            manifest,
            summary,
            complete=complete,
            days=days,
            counts=counts,
            traces=traces,
            agps=agp_plots,
            cohort_agps=cohort_plots,
        )
        + "\n"
    )
    return ReportResult(
        run_dir=run_dir,
        report_path=report_path,
        summary_path=summary_path,
        summary=summary,
        summary_unchanged=None if previous is None else previous == text,
        complete=complete,
        patients=tuple(patients),
        days=days,
        plots=(*traces.values(), *agp_plots.values(), *cohort_plots.values()),
        agp_patients=agp_patients,
        agp_cohorts=agp_cohorts,
    )
