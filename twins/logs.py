"""Import of glucose-therapy logs into one typed, unit-explicit table, with a report of problems.

Three formats are read into one table (:data:`LOG_SCHEMA`, one row per event, sorted by time):

* ``"csv"`` — the documented layout below;
* ``"nightscout"`` — a Nightscout ``entries.json`` (CGM) and/or ``treatments.json`` (insulin,
  carbohydrates, temp basals), optionally with ``profile.json`` (the scheduled basal);
* ``"twinloop"`` — a run directory written by ``twinloop run`` (``manifest.json`` +
  ``channels/*.parquet``).

The CSV layout (comma-separated, UTF-8, a header row required, column names case-insensitive,
lines starting with ``#`` and blank lines skipped; ``source_row`` is the file's line number, the
header being line 1 when it comes first):

============== ====================================================================================
column         meaning
============== ====================================================================================
time           required: ISO 8601 with a UTC offset, e.g. ``2026-03-01T08:05:00+01:00`` (or
               ``…Z``). Naive times are refused unless the row's ``timezone`` or ``tz=`` names an
               IANA zone (``Europe/Berlin``); see *Times without a zone* below.
cgm_mg_dl      CGM reading, mg/dL, at any sampling period (1-, 3- and 5-min CGMs alike).
basal_u_per_h  basal rate, U/h, that starts at ``time`` and holds until the next basal row; 0 is
               a rate (a suspend, a zero temp basal) and is imported as one.
bolus_u        bolus, U, given at ``time``; 0 is no bolus (no event).
carbs_g        carbohydrates, g, eaten at ``time``; 0 is no meal (no event).
note           free text (not imported).
timezone       optional IANA zone of the row's time (``Europe/Berlin``).
============== ====================================================================================

Every value column is optional per row; a row with several values gives several events (same
``time``, same ``source_row``). Exports of other tools carry columns of their own: any other
column is **ignored** and listed in the report (:attr:`ImportReport.ignored_columns`, the line
``ignored columns: …`` of its text, and an ``unknown_columns`` issue each). A file the layout
cannot read is still refused (:class:`LogError`): no ``time`` column, no value column, a column
of the layout given twice. The zeros many exports write in every row are no events: a bolus or
carbohydrates of 0 is not imported (one note per column counts them), while a basal of 0 U/h is
a rate and is kept.

**Times without a zone** are refused — a local time cannot be put on the UTC axis without its
zone, and guessing one would shift every meal and bolus against the CGM. The one-line error
names the field, the rows and the fix: ``--tz ZONE`` on the command line (``twinloop twin fit
LOG --tz Europe/Rome``), ``tz="Europe/Rome"`` in Python (:func:`read_log`), or a ``timezone``
column. This holds for CSV times and for Nightscout entries whose only time is a naive
``dateString``; Nightscout treatments' naive ``created_at`` is UTC, as Nightscout stores it.

**Sampling.** The CGM's sampling period is told from the readings: the largest of 1, 3 and 5 min
that divides the most common interval between consecutive readings (5 min with fewer than two
readings). Coverage and the days spanned are counted in slots of that period, so a 1-min log is
held to 70 % of its 1-min slots; a log of readings every 10 or 15 min is read as a 5-min CGM
with readings missing. Gaps are reported above 15 min whatever the period.

What the import checks (each finding is an :class:`Issue` of the :class:`ImportReport`, naming the
source and row; nothing is dropped without one):

* ``unknown_columns`` — CSV columns outside the layout: ignored, not imported;
* ``invalid`` — unreadable times or values, missing readings: dropped;
* ``out_of_range`` — see :data:`RANGES`: CGM outside 20–600 mg/dL (0 and 2,000 included) and
  negative insulin or carbohydrates are impossible and dropped; insulin or carbohydrates above
  the upper bound are possible but implausible: kept and reported;
* ``duplicates`` — rows of the same kind at the same instant: the first (in the order of the
  sources given, then of rows) is kept, each other one reported ("merged" when its value is the
  same, "dropped" when it conflicts);
* ``out_of_order`` — times going backwards in a CSV or a twinloop channel: reported, then sorted
  (Nightscout exports are newest-first, their order is not checked);
* ``mixed_time_zones`` — rows of one source whose UTC offset differs from the source's usual one,
  or, when a zone is declared (``tz=``, a ``timezone`` column, the Nightscout profile's
  ``timezone``), from that zone's offset at that instant (so DST changes are not reported): kept,
  converted with their own offset;
* ``gaps`` — CGM gaps longer than 15 min, as (start, end) UTC times;
* ``notes`` — the rest (records that carry no therapy event, temp basals that end when the
  scheduled rate is unknown, inferred scheduled-basal rows, …).

``read_log(..., min_days=D)`` refuses (:class:`LogError`) when what is left spans less than D days
of CGM or covers less than 70 % of the slots of its sampling period, saying how much is needed
and how much is there. ``docs/logs.md`` documents the formats and the fields read in full.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from twinloop.limits import (
    MAX_LOG_BYTES,
    MAX_YEAR,
    MIN_YEAR,
    InputLimitError,
    check_file,
    decode,
)
from twinloop.plant.errors import InvalidInputError

__all__ = [
    "CATEGORIES",
    "CSV_COLUMNS",
    "DEFAULT_TWINLOOP_START",
    "FORMATS",
    "LOG_SCHEMA",
    "MIN_COVERAGE",
    "RANGES",
    "VALUE_COLUMNS",
    "ImportReport",
    "Issue",
    "LogError",
    "TherapyLog",
    "read_log",
]

#: The four value columns, in their order in the table; exactly one is non-null per row.
VALUE_COLUMNS: Final = ("cgm_mg_dl", "basal_u_per_h", "bolus_u", "carbs_g")
_UNITS: Final = {"cgm_mg_dl": "mg/dL", "basal_u_per_h": "U/h", "bolus_u": "U", "carbs_g": "g"}
_CGM, _BASAL, _BOLUS, _CARBS = 0, 1, 2, 3

#: The one table: one row per event, sorted by time (then by kind, source order).
LOG_SCHEMA: Final = pa.schema(
    [
        pa.field(
            "time",
            pa.timestamp("us", tz="UTC"),
            nullable=False,
            metadata={"description": "instant of the event, UTC"},
        ),
        pa.field(
            "utc_offset_min",
            pa.int16(),
            nullable=False,
            metadata={"unit": "min", "description": "UTC offset of the source's local time"},
        ),
        pa.field(
            "cgm_mg_dl", pa.float64(), metadata={"unit": "mg/dL", "description": "CGM reading"}
        ),
        pa.field(
            "basal_u_per_h",
            pa.float64(),
            metadata={"unit": "U/h", "description": "basal rate from time until the next one"},
        ),
        pa.field("bolus_u", pa.float64(), metadata={"unit": "U", "description": "bolus"}),
        pa.field("carbs_g", pa.float64(), metadata={"unit": "g", "description": "carbohydrates"}),
        pa.field("source", pa.string(), nullable=False, metadata={"description": "file name"}),
        pa.field(
            "source_row",
            pa.int32(),
            nullable=False,
            metadata={"description": "1-based line (CSV) or record number; 0: inferred"},
        ),
    ]
)

#: Plausible range of each value column (inclusive). CGM outside it and negative insulin or
#: carbohydrates are dropped as impossible; insulin or carbohydrates above it are kept, reported.
RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "cgm_mg_dl": (20.0, 600.0),
    "basal_u_per_h": (0.0, 35.0),
    "bolus_u": (0.0, 25.0),
    "carbs_g": (0.0, 250.0),
}

#: Columns of the CSV layout (case-insensitive); any other column is ignored and reported.
CSV_COLUMNS: Final = ("time", *VALUE_COLUMNS, "note", "timezone")

#: The formats :func:`read_log` reads.
FORMATS: Final = ("csv", "nightscout", "twinloop")
Format = Literal["csv", "nightscout", "twinloop"]

#: Report categories, in the order of :meth:`ImportReport.to_text`.
CATEGORIES: Final = (
    "unknown_columns",
    "invalid",
    "out_of_range",
    "duplicates",
    "out_of_order",
    "mixed_time_zones",
    "notes",
)

#: Where a twinloop run's minute 0 is put unless ``start=`` says otherwise.
DEFAULT_TWINLOOP_START: Final = datetime(2026, 1, 1, tzinfo=UTC)

#: CGM gaps longer than this are reported, minutes.
GAP_MIN: Final = 15.0
#: CGM sampling period, minutes, assumed when the readings cannot tell (fewer than two).
DEFAULT_CGM_PERIOD_MIN: Final = 5
#: Interval, minutes, of the boluses an extended (combo) bolus is split into.
EXTENDED_BOLUS_STEP_MIN: Final = 5.0
#: Least CGM coverage :func:`read_log` accepts when ``min_days > 0``.
MIN_COVERAGE: Final = 0.70

#: Longest duration of a temp basal, suspend or extended (combo) bolus read, minutes (a week;
#: a longer one is dropped as invalid, naming the field).
MAX_DURATION_MIN: Final = 7 * 1440.0

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: Timestamps are read from MIN_YEAR to MAX_YEAR (:mod:`twinloop.limits`); others are dropped.
_YEARS: Final = f"years {MIN_YEAR} to {MAX_YEAR}"
_MIN_MS: Final = 0.0
_MAX_MS: Final = (datetime(MAX_YEAR + 1, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds() * 1000.0


def _year_ok(when: datetime) -> bool:
    """``when`` lies in the years logs are read from (an aware time; a naive one too)."""
    return MIN_YEAR <= when.year <= MAX_YEAR


_US_PER_MIN: Final = 60_000_000
_TEMP_BASAL_TYPES: Final = frozenset({"temp basal", "tempbasal"})


class LogError(InvalidInputError):
    """A log that cannot be imported (a :class:`ValueError` and a ``PlantError``).

    Attributes:
        report: what the import found before refusing, when it got that far (else ``None``).

    """

    def __init__(self, message: str, report: ImportReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Issue:
    """One finding of an import.

    Attributes:
        source: file name the finding is about.
        row: 1-based line (CSV) or record number (JSON, Parquet) in ``source``; 0 when the
            finding is about the whole source (a column, an inferred row).
        column: the column or field concerned.
        value: the value as read (text).
        problem: what is wrong.
        action: what was done: ``"kept…"``, ``"dropped: <why>"`` or ``"merged…"``.

    """

    source: str
    row: int
    column: str
    value: str
    problem: str
    action: str

    def to_text(self) -> str:
        """One line: ``source row N, column = value: problem -> action``."""
        where = f"{self.source} row {self.row}" if self.row else self.source
        value = f" = {self.value}" if self.value != "" else ""
        return f"{where}, {self.column}{value}: {self.problem} -> {self.action}"


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What an import read, produced and found.

    Attributes:
        rows_read: rows (CSV) or records (JSON, Parquet) read per source.
        events: rows of the table per value column.
        unknown_columns: CSV columns outside the layout (ignored; :attr:`ignored_columns`).
        invalid: unreadable times or values and missing readings (dropped).
        out_of_range: values outside :data:`RANGES` (impossible ones dropped, others kept).
        duplicates: rows of the same kind at the same instant as an earlier one (merged/dropped).
        out_of_order: rows whose time goes backwards in an ordered source (kept, sorted).
        mixed_time_zones: rows whose UTC offset differs within a source (kept).
        notes: everything else worth knowing (ignored records, inferred rows, …).
        gaps: CGM gaps longer than 15 min, as (last reading before, first reading after), UTC.
        cgm_days: time spanned by the CGM readings, days (the last reading's slot counted).
        cgm_coverage: fraction of the slots of that span (one per sampling period) holding a
            reading.
        cgm_period_min: the CGM's sampling period told from the readings, minutes (1, 3 or 5).

    """

    rows_read: Mapping[str, int]
    events: Mapping[str, int]
    unknown_columns: tuple[Issue, ...] = ()
    invalid: tuple[Issue, ...] = ()
    out_of_range: tuple[Issue, ...] = ()
    duplicates: tuple[Issue, ...] = ()
    out_of_order: tuple[Issue, ...] = ()
    mixed_time_zones: tuple[Issue, ...] = ()
    notes: tuple[Issue, ...] = ()
    gaps: tuple[tuple[datetime, datetime], ...] = ()
    cgm_days: float = 0.0
    cgm_coverage: float = 0.0
    cgm_period_min: int = DEFAULT_CGM_PERIOD_MIN

    @property
    def ignored_columns(self) -> tuple[str, ...]:
        """Names of the CSV columns outside the layout, which were not imported (once each)."""
        return tuple(dict.fromkeys(issue.column for issue in self.unknown_columns))

    @property
    def issues(self) -> tuple[Issue, ...]:
        """Every issue, category by category (see :data:`CATEGORIES`)."""
        out: list[Issue] = []
        for category in CATEGORIES:
            out.extend(getattr(self, category))
        return tuple(out)

    @property
    def counts(self) -> dict[str, int]:
        """Number of issues per category, plus ``gaps``."""
        counts = {category: len(getattr(self, category)) for category in CATEGORIES}
        counts["gaps"] = len(self.gaps)
        return counts

    def to_text(self, max_per_category: int | None = 20) -> str:
        """A human-readable report naming sources and rows.

        Args:
            max_per_category: issues listed per category (``None``: all); the rest is counted.

        """
        lines = [f"Import report: {len(self.rows_read)} source(s)"]
        lines += [f"  {source}: {n} row(s) read" for source, n in self.rows_read.items()]
        lines.append(
            "events: "
            + ", ".join(f"{self.events.get(c, 0)} {c} ({_UNITS[c]})" for c in VALUE_COLUMNS)
        )
        if self.ignored_columns:
            lines.append(f"ignored columns: {', '.join(self.ignored_columns)}")
        lines.append(
            f"CGM: {self.cgm_days:.2f} day(s), a reading every {self.cgm_period_min} min,"
            f" {100 * self.cgm_coverage:.1f} % of {self.cgm_period_min}-min slots covered,"
            f" {len(self.gaps)} gap(s) > {GAP_MIN:g} min"
        )
        for category in CATEGORIES:
            issues: tuple[Issue, ...] = getattr(self, category)
            if not issues:
                lines.append(f"{category}: none")
                continue
            lines.append(f"{category} ({len(issues)}):")
            shown = issues if max_per_category is None else issues[:max_per_category]
            lines += [f"  {issue.to_text()}" for issue in shown]
            if len(shown) < len(issues):
                lines.append(f"  … and {len(issues) - len(shown)} more")
        if self.gaps:
            lines.append(f"gaps (CGM, > {GAP_MIN:g} min, UTC) ({len(self.gaps)}):")
            shown_gaps = self.gaps if max_per_category is None else self.gaps[:max_per_category]
            for start, end in shown_gaps:
                minutes = (end - start) / timedelta(minutes=1)
                lines.append(f"  {_iso_utc(start)} -> {_iso_utc(end)} ({minutes:g} min)")
            if len(shown_gaps) < len(self.gaps):
                lines.append(f"  … and {len(self.gaps) - len(shown_gaps)} more")
        else:
            lines.append("gaps: none")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (times as ISO 8601 strings, UTC)."""
        return {
            "rows_read": dict(self.rows_read),
            "events": dict(self.events),
            "cgm_days": self.cgm_days,
            "cgm_coverage": self.cgm_coverage,
            "cgm_period_min": self.cgm_period_min,
            "ignored_columns": list(self.ignored_columns),
            "counts": self.counts,
            "gaps": [
                {
                    "start": _iso_utc(start),
                    "end": _iso_utc(end),
                    "minutes": (end - start) / timedelta(minutes=1),
                }
                for start, end in self.gaps
            ],
            "issues": {
                category: [dataclasses.asdict(issue) for issue in getattr(self, category)]
                for category in CATEGORIES
            },
        }


@dataclasses.dataclass(frozen=True)
class TherapyLog:
    """An imported log: the table, the report of the import, and whose log it is.

    Attributes:
        table: the events (:data:`LOG_SCHEMA`), sorted by time.
        report: what the import found.
        patient: the patient's name when known (``patient=``, or a one-patient twinloop run).

    """

    table: pa.Table
    report: ImportReport
    patient: str | None = None

    @property
    def days(self) -> float:
        """Time spanned by the CGM readings, days (first reading to one period after the last)."""
        return _cgm_span_coverage(self._cgm_times_us())[0]

    @property
    def cgm_coverage(self) -> float:
        """Fraction of the CGM span's slots (one per sampling period) holding a reading."""
        return _cgm_span_coverage(self._cgm_times_us())[1]

    @property
    def cgm_period_min(self) -> int:
        """The CGM's sampling period told from the readings, minutes (1, 3 or 5)."""
        return _cgm_period_min(self._cgm_times_us())

    def series(self, column: str) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
        """The times (``datetime64[us]``, UTC) and values of one value column's rows."""
        if column not in VALUE_COLUMNS:
            raise LogError(f"column={column!r} is not a value column; use one of {VALUE_COLUMNS}")
        values = self.table.column(column).to_numpy(zero_copy_only=False)
        mask = ~np.isnan(values)
        times = self.table.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        return times[mask].astype("datetime64[us]"), values[mask].astype(np.float64)

    def _cgm_times_us(self) -> NDArray[np.int64]:
        values = self.table.column("cgm_mg_dl").to_numpy(zero_copy_only=False)
        times = self.table.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        return np.asarray(times[~np.isnan(values)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# helpers


def _us(dt: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _from_us(t_us: int | np.integer) -> datetime:
    return _EPOCH + timedelta(microseconds=int(t_us))


def _iso_utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _iso_local(t_us: int | np.integer, offset_min: int) -> str:
    local = _from_us(t_us).astimezone(timezone(timedelta(minutes=int(offset_min))))
    return local.isoformat()


def _fmt_offset(offset_min: int) -> str:
    sign = "-" if offset_min < 0 else "+"
    hours, minutes = divmod(abs(int(offset_min)), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _offset_min(dt: datetime) -> int:
    offset = dt.utcoffset()
    return 0 if offset is None else round(offset / timedelta(minutes=1))


def _zone_offset_min(t_us: int | np.integer, zone: tzinfo) -> int:
    return _offset_min(_from_us(t_us).astimezone(zone))


def _zone(value: str | tzinfo, field: str) -> tzinfo:
    if isinstance(value, tzinfo):
        return value
    try:
        return ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise LogError(
            f"{field}={value!r} is not an IANA time zone (e.g. 'Europe/Berlin', 'UTC')"
        ) from None


def _zone_name(zone: tzinfo) -> str:
    return str(getattr(zone, "key", None) or zone)


def _localize(naive: datetime, zone: tzinfo) -> tuple[datetime, str | None]:
    """Attach ``zone`` to a naive local time; say so when the time is ambiguous or missing."""
    first = naive.replace(tzinfo=zone, fold=0)
    second = naive.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return first, None
    if first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != naive:
        return first, (
            f"local time does not exist in {_zone_name(zone)} (clocks went forward); read with"
            f" the offset before the change ({_fmt_offset(_offset_min(first))})"
        )
    return first, (
        f"local time is ambiguous in {_zone_name(zone)} (clocks went back); read as the first"
        f" occurrence ({_fmt_offset(_offset_min(first))})"
    )


def _number(value: object) -> float | None:
    """A JSON/CSV value as a float; ``None`` when absent; ValueError when not a number."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(value)
    return float(value)


class _Issues:
    """Issues collected during an import, per category."""

    def __init__(self) -> None:
        self.by_category: dict[str, list[Issue]] = {category: [] for category in CATEGORIES}

    def add(
        self,
        category: str,
        source: str,
        row: int,
        column: str,
        value: object,
        problem: str,
        action: str,
    ) -> None:
        self.by_category[category].append(
            Issue(source, int(row), column, _fmt(value), problem, action)
        )


class _Events:
    """Events collected during an import (columns as lists, in source order)."""

    def __init__(self) -> None:
        self.t_us: list[int] = []
        self.offset_min: list[int] = []
        self.kind: list[int] = []
        self.value: list[float] = []
        self.source: list[str] = []
        self.row: list[int] = []

    def add(
        self, t_us: int, offset_min: int, kind: int, value: float, source: str, row: int
    ) -> None:
        self.t_us.append(int(t_us))
        self.offset_min.append(int(offset_min))
        self.kind.append(kind)
        self.value.append(float(value))
        self.source.append(source)
        self.row.append(int(row))


@dataclasses.dataclass
class _Temp:
    """A temporary basal (or a suspend, or a cancel when ``rate`` and ``percent`` are None)."""

    t_us: int
    end_us: float  # +inf: open-ended
    rate: float | None  # U/h
    percent: float | None  # change relative to the scheduled rate, %
    source: str
    row: int
    offset_min: int


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """A daily basal schedule: (seconds after local midnight, U/h) steps in a time zone."""

    source: str
    row: int
    zone: tzinfo
    steps: tuple[tuple[int, float], ...]

    def rate_at(self, t_us: int) -> float:
        local = _from_us(t_us).astimezone(self.zone)
        seconds = local.hour * 3600 + local.minute * 60 + local.second
        index = bisect.bisect_right([s for s, _ in self.steps], seconds) - 1
        return self.steps[index][1]  # index -1 wraps to the last step of the previous day

    def changes(self, t0_us: int, t1_us: int) -> list[int]:
        """Instants in ``(t0, t1]`` at which the scheduled rate may change."""
        if len(self.steps) < 2:
            return []
        first = _from_us(t0_us).astimezone(self.zone).date() - timedelta(days=1)
        last = _from_us(t1_us).astimezone(self.zone).date() + timedelta(days=1)
        out = []
        day = first
        while day <= last:
            midnight = datetime(day.year, day.month, day.day)
            for seconds, _ in self.steps:
                local = (midnight + timedelta(seconds=seconds)).replace(tzinfo=self.zone)
                t_us = _us(local)
                if t0_us < t_us <= t1_us:
                    out.append(t_us)
            day += timedelta(days=1)
        return out


def _check_order(source: str, rows: Sequence[int], t_us: Sequence[int], issues: _Issues) -> None:
    """Report rows (in file order) whose time is earlier than an earlier row's."""
    latest = -math.inf
    latest_row = 0
    for row, t in zip(rows, t_us, strict=True):
        if t < latest:
            issues.add(
                "out_of_order",
                source,
                row,
                "time",
                _iso_utc(_from_us(t)),
                f"earlier than row {latest_row} ({_iso_utc(_from_us(int(latest)))})",
                "kept: sorted into place",
            )
        elif t > latest:
            latest, latest_row = t, row


def _check_zones(
    source: str,
    rows: Sequence[int],
    t_us: Sequence[int],
    offsets: Sequence[int],
    zones: Sequence[tzinfo | None],
    issues: _Issues,
) -> None:
    """Report rows whose UTC offset differs from their zone's or from the source's usual one."""
    named = [(r, t, o, z) for r, t, o, z in zip(rows, t_us, offsets, zones, strict=True) if z]
    if named:
        usual_zone = Counter(_zone_name(z) for *_, z in named).most_common(1)[0][0]
        for row, t, offset, zone in named:
            name = _zone_name(zone)
            expected = _zone_offset_min(t, zone)
            if name != usual_zone:
                issues.add(
                    "mixed_time_zones",
                    source,
                    row,
                    "timezone",
                    name,
                    f"time zone differs from the source's {usual_zone}",
                    "kept: converted to UTC with its own zone",
                )
            elif offset != expected:
                issues.add(
                    "mixed_time_zones",
                    source,
                    row,
                    "time",
                    _iso_local(t, offset),
                    f"UTC offset {_fmt_offset(offset)} is not that of {name} at this time"
                    f" ({_fmt_offset(expected)})",
                    "kept: converted to UTC with its own offset",
                )
    plain = [(r, t, o) for r, t, o, z in zip(rows, t_us, offsets, zones, strict=True) if not z]
    if plain:
        counts = Counter(o for *_, o in plain)
        usual = counts.most_common(1)[0][0]
        for row, t, offset in plain:
            if offset != usual:
                issues.add(
                    "mixed_time_zones",
                    source,
                    row,
                    "time",
                    _iso_local(t, offset),
                    f"UTC offset {_fmt_offset(offset)} differs from the source's usual"
                    f" {_fmt_offset(usual)} ({counts[usual]} of {len(plain)} rows); give the"
                    " zone with --tz ZONE (tz=) if this is a daylight-saving change",
                    "kept: converted to UTC with its own offset",
                )


def _cgm_period_min(t_us: NDArray[np.int64]) -> int:
    """The sampling period of CGM reading times, minutes (1, 3 or 5; 5 with fewer than two).

    :func:`twinloop.plant.glucose.cgm.sampling_period_min` of the intervals between consecutive
    readings, rounded to whole minutes.
    """
    from twinloop.plant.glucose.cgm import sampling_period_min

    times = np.unique(np.asarray(t_us, dtype=np.int64))
    steps = np.round((times[1:] - times[:-1]) / _US_PER_MIN).astype(np.int64)
    return sampling_period_min(steps, default=DEFAULT_CGM_PERIOD_MIN)


def _cgm_span_coverage(t_us: NDArray[np.int64]) -> tuple[float, float]:
    """(days spanned, fraction of the sampling period's slots with a reading) of CGM times."""
    if t_us.size == 0:
        return 0.0, 0.0
    t = np.sort(t_us)
    slot_us = _cgm_period_min(t) * _US_PER_MIN
    slots = np.round((t - t[0]) / slot_us).astype(np.int64)
    n_slots = int(slots[-1]) + 1
    days = ((t[-1] - t[0]) + slot_us) / (1440 * _US_PER_MIN)
    return float(days), float(np.unique(slots).size / n_slots)


# --------------------------------------------------------------------------------------------
# CSV


def _read_csv(path: Path, name: str, tz: tzinfo | None, events: _Events, issues: _Issues) -> int:
    """Read one CSV of the documented layout; return the number of data rows."""
    _check_source(path, name)
    try:
        return _read_csv_rows(path, name, tz, events, issues)
    except UnicodeDecodeError as error:
        raise LogError(f"{name}: not UTF-8 text ({error.reason}; a binary file?)") from None
    except csv.Error as error:
        raise LogError(f"{name}: malformed CSV ({error})") from None


def _check_source(path: Path, name: str) -> None:
    """Refuse a log file that is not a regular file within :data:`MAX_LOG_BYTES` (unread)."""
    try:
        check_file(path, MAX_LOG_BYTES)  # the full path: a device or FIFO is named as given
        with path.open("rb") as stream:
            head = stream.read(2)
    except (InputLimitError, OSError) as error:
        raise LogError(str(error)) from None
    if head in (b"\xff\xfe", b"\xfe\xff"):
        raise LogError(f"{name}: UTF-16 text; save it as UTF-8")


def _read_csv_rows(
    path: Path, name: str, tz: tzinfo | None, events: _Events, issues: _Issues
) -> int:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header: list[str] | None = None
        records: list[tuple[int, list[str]]] = []
        for cells in reader:
            if not cells or all(cell.strip() == "" for cell in cells):
                continue
            if cells[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in cells]
                _check_header(name, reader.line_num, header, issues)
                continue
            records.append((reader.line_num, cells))
    if header is None:
        raise LogError(f"{name}: no header row; the layout's columns are {', '.join(CSV_COLUMNS)}")
    index = {column: i for i, column in enumerate(header)}
    value_columns = [(VALUE_COLUMNS.index(c), c, index[c]) for c in VALUE_COLUMNS if c in index]
    zones: dict[str, tzinfo | None] = {}
    naive_rows: list[tuple[int, str]] = []
    rows: list[int] = []
    times: list[int] = []
    offsets: list[int] = []
    row_zones: list[tzinfo | None] = []
    zeros: dict[str, list[int]] = {"bolus_u": [], "carbs_g": []}  # rows: no event

    for line, cells in records:
        if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header) :]):
            issues.add(
                "invalid",
                name,
                line,
                "(row)",
                ",".join(cells),
                f"{len(cells)} cells but the header has {len(header)}",
                "dropped: cannot tell which value is which",
            )
            continue
        cells = cells + [""] * (len(header) - len(cells))
        text = cells[index["time"]].strip()
        zone: tzinfo | None = tz
        if "timezone" in index and cells[index["timezone"]].strip():
            zone_text = cells[index["timezone"]].strip()
            if zone_text not in zones:
                try:
                    zones[zone_text] = ZoneInfo(zone_text)
                except (ZoneInfoNotFoundError, ValueError):
                    zones[zone_text] = None
            zone = zones[zone_text]
            if zone is None:
                issues.add(
                    "invalid",
                    name,
                    line,
                    "timezone",
                    zone_text,
                    "not an IANA time zone (e.g. Europe/Berlin)",
                    "dropped: time unknown",
                )
                continue
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            issues.add(
                "invalid",
                name,
                line,
                "time",
                text,
                "not an ISO 8601 time (e.g. 2026-03-01T08:05:00+01:00)",
                "dropped: time unknown",
            )
            continue
        if not _year_ok(when):
            issues.add("invalid", name, line, "time", text, _YEARS, "dropped: time unknown")
            continue
        if when.tzinfo is None:
            if zone is None:
                naive_rows.append((line, text))
                continue
            when, problem = _localize(when, zone)
            if problem:
                issues.add("notes", name, line, "time", text, problem, "kept")
        t_us = _us(when)
        offset = _offset_min(when)
        rows.append(line)
        times.append(t_us)
        offsets.append(offset)
        row_zones.append(zone)
        n_values = 0
        n_bad = 0
        n_zero = 0
        for kind, column, i in value_columns:
            cell = cells[i].strip()
            if cell == "":
                continue
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                n_bad += 1
                issues.add(
                    "invalid",
                    name,
                    line,
                    column,
                    cell,
                    f"not a finite number ({_UNITS[column]})",
                    "dropped: no value",
                )
                continue
            if value == 0 and column in zeros:
                zeros[column].append(line)
                n_zero += 1
                continue
            events.add(t_us, offset, kind, value, name, line)
            n_values += 1
        if n_values == 0 and n_bad == 0 and n_zero == 0:
            note = cells[index["note"]].strip() if "note" in index else ""
            issues.add(
                "notes",
                name,
                line,
                "note" if note else "(row)",
                note,
                "no value in the row",
                "dropped: nothing to import",
            )

    if naive_rows:
        raise _naive_times_error(
            name, "time", "row", naive_rows, "an offset in the time or a 'timezone' column"
        )
    for zero_column, lines in zeros.items():
        if lines:
            issues.add(
                "notes",
                name,
                lines[0],
                zero_column,
                "0",
                f"{len(lines)} row(s) with {zero_column} = 0 (the first here)",
                f"not imported: 0 {_UNITS[zero_column]} is no event",
            )
    _check_order(name, rows, times, issues)
    _check_zones(name, rows, times, offsets, row_zones, issues)
    return len(records)


def _naive_times_error(
    name: str, field: str, unit: str, naive: Sequence[tuple[int, object]], other_ways: str
) -> LogError:
    """The refusal of times without a UTC offset, naming the field, the rows and ``--tz``."""
    shown = ", ".join(str(row) for row, _ in naive[:5])
    more = f" ({len(naive)} in all)" if len(naive) > 5 else ""
    return LogError(
        f"{name}: {field}={naive[0][1]!r} ({unit}(s) {shown}{more}) has no UTC offset and no"
        f" time zone; allowed: {other_ways}, or the zone of these local times given with"
        " --tz ZONE (e.g. --tz Europe/Rome; in Python read_log(..., tz='Europe/Rome'))"
    )


def _check_header(name: str, line: int, header: list[str], issues: _Issues) -> None:
    """Refuse a header the layout cannot read; report the columns outside it as ignored."""
    unknown = [
        column or f"(unnamed column {i + 1})"
        for i, column in enumerate(header)
        if column not in CSV_COLUMNS
    ]
    for column in dict.fromkeys(unknown):
        issues.add(
            "unknown_columns",
            name,
            line,
            column,
            "",
            "not a column of the layout",
            "ignored: not imported",
        )
    repeated = sorted({c for c in header if c in CSV_COLUMNS and header.count(c) > 1})
    if repeated:
        raise LogError(f"{name}: column(s) {', '.join(repeated)} appear more than once")
    missing = ""
    if "time" not in header:
        missing = "no 'time' column"
    elif not any(column in header for column in VALUE_COLUMNS):
        missing = f"no value column (one of {', '.join(VALUE_COLUMNS)})"
    if missing:
        hint = " (the layout is comma-separated)" if any(";" in c for c in header) else ""
        found = f"; not of the layout: {', '.join(repr(c) for c in unknown)}" if unknown else ""
        raise LogError(
            f"{name}: {missing}{found}{hint}; the layout allows {', '.join(CSV_COLUMNS)}"
            " (see docs/logs.md)",
            _report(issues, {name: 0}, {}, (), 0.0, 0.0),
        )


# --------------------------------------------------------------------------------------------
# Nightscout


def _json_records(path: Path, name: str) -> list[Any]:
    _check_source(path, name)
    try:
        data = json.loads(decode(path.read_bytes(), name))
    except InputLimitError as error:
        raise LogError(str(error)) from None
    except json.JSONDecodeError as error:
        raise LogError(f"{name}: not valid JSON ({error})") from None
    except RecursionError:
        raise LogError(f"{name}: JSON nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("result"), list):  # API v3 envelope
        data = data["result"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise LogError(f"{name}: expected a JSON list of records")
    return data


def _nightscout_kind(name: str, records: list[Any]) -> str:
    lowered = name.lower()
    for kind in ("entries", "treatments", "profile"):
        if kind in lowered:
            return kind
    for record in records:
        if isinstance(record, dict):
            if "eventType" in record:
                return "treatments"
            if "sgv" in record or "type" in record:
                return "entries"
            if "store" in record or "basal" in record:
                return "profile"
    raise LogError(
        f"{name}: cannot tell Nightscout entries (records with 'sgv') from treatments (records"
        " with 'eventType') or a profile ('store'); name the file entries.json,"
        " treatments.json or profile.json"
    )


def _ns_time(
    record: dict[str, Any], fields: Sequence[str], naive_utc: bool
) -> tuple[datetime | None, str, object]:
    """The first readable time among ``fields``: (datetime or None, field, raw value)."""
    for field in fields:
        raw = record.get(field)
        if raw is None or raw == "":
            continue
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            ms = float(raw)
            if abs(ms) < 1e11:  # seconds since the epoch (API v3 accepts them too)
                ms *= 1000.0
            if not (math.isfinite(ms) and _MIN_MS <= ms < _MAX_MS):
                return None, field, raw
            return _EPOCH + timedelta(milliseconds=ms), field, raw
        if isinstance(raw, str):
            try:
                when = datetime.fromisoformat(raw.strip())
            except ValueError:
                return None, field, raw
            if not _year_ok(when):
                return None, field, raw
            if when.tzinfo is None and naive_utc:
                when = when.replace(tzinfo=UTC)
            return when, field, raw
        return None, field, raw
    return None, fields[0], None


def _ns_offset(
    record: dict[str, Any], when: datetime, iso_fields: Sequence[str], zone: tzinfo | None
) -> int:
    """Local UTC offset of a record: ``utcOffset``, else an ISO field's offset, else ``zone``."""
    raw = record.get("utcOffset")
    try:
        offset = _number(raw)
    except ValueError:
        offset = None
    if offset is not None and math.isfinite(offset):
        return round(offset)
    if zone is not None:
        return _offset_min(when.astimezone(zone))
    for field in iso_fields:
        text = record.get(field)
        if isinstance(text, str):
            try:
                parsed = datetime.fromisoformat(text.strip())
            except ValueError:
                continue
            if parsed.tzinfo is not None:
                return _offset_min(parsed)
    return 0


def _read_entries(
    records: list[Any], name: str, zone: tzinfo | None, events: _Events, issues: _Issues
) -> None:
    rows: list[int] = []
    times: list[int] = []
    offsets: list[int] = []
    naive: list[tuple[int, object]] = []
    naive_field = "dateString"
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            issues.add("invalid", name, row, "(record)", record, "not a JSON object", "dropped")
            continue
        kind = record.get("type", "sgv" if "sgv" in record else None)
        if kind != "sgv":
            issues.add(
                "notes",
                name,
                row,
                "type",
                kind,
                "not a CGM reading (only type 'sgv' is imported)",
                "dropped: not a CGM reading",
            )
            continue
        when, field, raw = _ns_time(record, ("date", "mills", "dateString"), naive_utc=False)
        if when is not None and when.tzinfo is None:
            if zone is None:
                naive_field = naive_field if naive else field
                naive.append((row, raw))
                continue
            when, problem = _localize(when, zone)
            if problem:
                issues.add("notes", name, row, field, raw, problem, "kept")
        if when is None:
            issues.add("invalid", name, row, field, raw, f"no readable time ({_YEARS})", "dropped")
            continue
        try:
            value = _number(record.get("sgv"))
        except ValueError:
            value = math.nan
        if value is None or not math.isfinite(value):
            issues.add(
                "invalid",
                name,
                row,
                "sgv",
                record.get("sgv"),
                "no CGM value (mg/dL)",
                "dropped: no value",
            )
            continue
        t_us = _us(when)
        offset = _ns_offset(record, when, ("dateString",), zone)
        events.add(t_us, offset, _CGM, value, name, row)
        rows.append(row)
        times.append(t_us)
        offsets.append(offset)
    if naive:
        raise _naive_times_error(
            name,
            naive_field,
            "record",
            naive,
            f"a 'date' in ms since the epoch, an offset in the {naive_field}, or a"
            " profile.json with a timezone",
        )
    _check_zones(name, rows, times, offsets, [zone] * len(rows), issues)


def _read_treatments(
    records: list[Any],
    name: str,
    zone: tzinfo | None,
    events: _Events,
    temps: list[_Temp],
    issues: _Issues,
) -> None:
    rows: list[int] = []
    times: list[int] = []
    offsets: list[int] = []
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            issues.add("invalid", name, row, "(record)", record, "not a JSON object", "dropped")
            continue
        event_type = str(record.get("eventType") or "")
        when, field, raw = _ns_time(
            record, ("created_at", "timestamp", "mills", "date"), naive_utc=True
        )
        if when is None:
            issues.add("invalid", name, row, field, raw, f"no readable time ({_YEARS})", "dropped")
            continue
        t_us = _us(when)
        offset = _ns_offset(record, when, ("timestamp", "created_at"), zone)
        rows.append(row)
        times.append(t_us)
        offsets.append(offset)
        try:
            _treatment(record, event_type, name, row, t_us, offset, events, temps, issues)
        except ValueError as error:
            column, value, problem = (
                (*error.args, "not a number")[:3]
                if len(error.args) in (2, 3)
                else ("(record)", "", "not a number")
            )
            issues.add("invalid", name, row, column, value, problem, "dropped: value unknown")
    _check_zones(name, rows, times, offsets, [zone] * len(rows), issues)


def _field_number(record: dict[str, Any], field: str) -> float | None:
    try:
        value = _number(record.get(field))
    except ValueError:
        raise ValueError(field, record.get(field)) from None
    if value is not None and not math.isfinite(value):
        raise ValueError(field, record.get(field))
    return value


def _duration_min(record: dict[str, Any]) -> float | None:
    """The record's duration, minutes (ValueError(field, value, problem) beyond a week)."""
    field = "duration"
    duration = _field_number(record, field)
    if duration is None:
        field = "durationInMilliseconds"
        ms = _field_number(record, field)
        duration = None if ms is None else ms / 60_000.0
    if duration is not None and duration > MAX_DURATION_MIN:
        raise ValueError(
            field, record.get(field), f"a duration longer than {MAX_DURATION_MIN:g} min (a week)"
        )
    return duration


def _treatment(
    record: dict[str, Any],
    event_type: str,
    name: str,
    row: int,
    t_us: int,
    offset: int,
    events: _Events,
    temps: list[_Temp],
    issues: _Issues,
) -> None:
    """Turn one treatment record into events or temp basals (ValueError(field, value): bad)."""
    lowered = event_type.lower()
    if lowered in _TEMP_BASAL_TYPES:
        duration = _duration_min(record)
        absolute = _field_number(record, "absolute")
        rate = absolute
        if rate is None and str(record.get("temp", "")).lower() != "percentage":
            rate = _field_number(record, "rate")
        percent = _field_number(record, "percent") if rate is None else None
        if duration is not None and duration <= 0:
            temps.append(_Temp(t_us, t_us, None, None, name, row, offset))  # a cancel
            return
        if rate is None and percent is None:
            issues.add(
                "invalid",
                name,
                row,
                "absolute",
                "",
                "temp basal without a rate (absolute, rate or percent)",
                "dropped: rate unknown",
            )
            return
        end: float = math.inf
        if duration is None:
            issues.add(
                "notes",
                name,
                row,
                "duration",
                "",
                "temp basal without a duration",
                "kept: held until the next basal row",
            )
        else:
            end = t_us + duration * _US_PER_MIN
        temps.append(_Temp(t_us, end, rate, percent, name, row, offset))
        return
    if lowered == "suspend pump":
        duration = _duration_min(record)
        end = math.inf if not duration or duration <= 0 else t_us + duration * _US_PER_MIN
        temps.append(_Temp(t_us, end, 0.0, None, name, row, offset))
        return
    if lowered == "resume pump":
        temps.append(_Temp(t_us, t_us, None, None, name, row, offset))
        return
    insulin = _field_number(record, "insulin")
    carbs = _field_number(record, "carbs")
    found = False
    if insulin is not None and insulin != 0:
        events.add(t_us, offset, _BOLUS, insulin, name, row)
        found = True
    if carbs is not None and carbs != 0:
        events.add(t_us, offset, _CARBS, carbs, name, row)
        found = True
    if lowered == "combo bolus":
        found = _extended_bolus(record, name, row, t_us, offset, events, issues) or found
    if not found:
        issues.add(
            "notes",
            name,
            row,
            "eventType",
            event_type,
            "carries no insulin or carbohydrates",
            "dropped: nothing to import",
        )


def _extended_bolus(
    record: dict[str, Any],
    name: str,
    row: int,
    t_us: int,
    offset: int,
    events: _Events,
    issues: _Issues,
) -> bool:
    """Split the extended part of a combo bolus into boluses every 5 min; True if any."""
    duration = _duration_min(record)
    relative = _field_number(record, "relative")
    extended: float | None = None
    if relative is not None and duration:
        extended = relative * duration / 60.0
    else:
        entered = _field_number(record, "enteredinsulin")
        split = _field_number(record, "splitExt")
        if entered is not None and split is not None:
            extended = entered * split / 100.0
    if not extended or not duration or duration <= 0:
        return False
    n = max(1, math.ceil(duration / EXTENDED_BOLUS_STEP_MIN))
    step = duration / n
    for k in range(1, n + 1):
        events.add(t_us + round(k * step * _US_PER_MIN), offset, _BOLUS, extended / n, name, row)
    issues.add(
        "notes",
        name,
        row,
        "relative",
        record.get("relative", record.get("splitExt")),
        f"extended bolus of {extended:.3g} U over {duration:g} min",
        f"kept: split into {n} boluses of {extended / n:.3g} U every {step:g} min",
    )
    return True


def _read_profile(
    records: list[Any], name: str, issues: _Issues
) -> tuple[_Schedule | None, tzinfo | None]:
    """The basal schedule and time zone of the newest profile record."""
    candidates: list[tuple[str, int, dict[str, Any]]] = []
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            continue
        profile: Any = record
        store = record.get("store")
        if isinstance(store, dict) and store:
            default = record.get("defaultProfile")
            profile = store.get(default) if default in store else next(iter(store.values()))
        if isinstance(profile, dict) and "basal" in profile:
            started = str(record.get("startDate") or record.get("created_at") or "")
            candidates.append((started, row, profile))
    if not candidates:
        issues.add(
            "notes", name, 0, "basal", "", "no basal schedule found", "scheduled rate unknown"
        )
        return None, None
    started, row, profile = max(candidates, key=lambda c: (c[0], c[1]))
    if len(candidates) > 1:
        issues.add(
            "notes",
            name,
            row,
            "startDate",
            started,
            f"{len(candidates)} profiles; the newest is used for the whole log",
            "kept",
        )
    zone: tzinfo | None = None
    zone_text = profile.get("timezone")
    if zone_text:
        try:
            zone = ZoneInfo(str(zone_text))
        except (ZoneInfoNotFoundError, ValueError):
            issues.add(
                "notes", name, row, "timezone", zone_text, "not an IANA zone", "ignored: UTC used"
            )
    basal = profile.get("basal")
    steps: list[tuple[int, float]] = []
    try:
        if isinstance(basal, list):
            for step in basal:
                seconds = _number(step.get("timeAsSeconds"))
                if seconds is None:
                    hours, minutes = str(step["time"]).split(":")[:2]
                    seconds = int(hours) * 3600 + int(minutes) * 60
                value = _number(step.get("value"))
                if value is None or not math.isfinite(value):
                    raise ValueError(step)
                steps.append((int(seconds) % 86400, value))
        else:
            value = _number(basal)
            if value is None or not math.isfinite(value):
                raise ValueError(basal)
            steps.append((0, value))
    except (ValueError, KeyError, TypeError, AttributeError):
        issues.add(
            "invalid",
            name,
            row,
            "basal",
            basal,
            "unreadable basal schedule",
            "dropped: scheduled rate unknown",
        )
        return None, zone
    if not steps:
        return None, zone
    steps.sort()
    return _Schedule(name, row, zone or UTC, tuple(steps)), zone


# --------------------------------------------------------------------------------------------
# twinloop run directories


def _read_twinloop(
    run_dir: Path,
    patient: str | None,
    start: datetime,
    events: _Events,
    temps: list[_Temp],
    issues: _Issues,
    rows_read: dict[str, int],
) -> tuple[str, _Schedule | None]:
    """Read one patient's CGM, approved commands and announced carbs from a run directory."""
    manifest_path = run_dir / "manifest.json"
    try:
        check_file(manifest_path, MAX_LOG_BYTES)
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (InputLimitError, OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LogError(f"{manifest_path}: not a readable twinloop manifest ({error})") from None
    except RecursionError:
        raise LogError(f"{manifest_path}: JSON nested too deeply") from None
    channels = run_dir / "channels"
    sensor_path = channels / "sensor__controller.parquet"
    if not sensor_path.is_file():
        raise LogError(f"{run_dir}: no channels/sensor__controller.parquet (CGM readings)")
    sensor = pq.read_table(sensor_path)
    names = list(dict.fromkeys(sensor.column("patient").to_pylist()))
    if patient is None:
        if len(names) != 1:
            raise LogError(
                f"{run_dir}: the run holds {len(names)} patients; pass patient= one of"
                f" {', '.join(names)}"
            )
        patient = names[0]
    elif patient not in names:
        raise LogError(
            f"{run_dir}: patient={patient!r} is not in the run; its patients are {', '.join(names)}"
        )
    start_zone = start.tzinfo if start.tzinfo is not None else UTC
    fixed = start.utcoffset() if isinstance(start_zone, timezone) else None
    start_us = _us(start)

    def when(table: pa.Table, source: str) -> tuple[NDArray[np.int64], NDArray[np.int64], Any]:
        mask = np.asarray(table.column("patient").to_pylist(), dtype=object) == patient
        rows = np.flatnonzero(mask) + 1
        t_min = table.column("t_min").to_numpy(zero_copy_only=False)[mask]
        t_us = start_us + np.round(t_min * _US_PER_MIN).astype(np.int64)
        if fixed is not None:
            offsets = np.full(t_us.shape, round(fixed / timedelta(minutes=1)), dtype=np.int64)
        else:
            offsets = np.array([_zone_offset_min(t, start_zone) for t in t_us], dtype=np.int64)
        _check_order(source, rows.tolist(), t_us.tolist(), issues)
        rows_read[source] = int(mask.sum())
        return rows, t_us, offsets

    source = sensor_path.name
    rows, t_us, offsets = when(sensor, source)
    glucose = sensor.column("glucose_mg_dl").to_numpy(zero_copy_only=False)[rows - 1]
    for row, t, offset, value in zip(rows, t_us, offsets, glucose, strict=True):
        if not math.isfinite(value):
            issues.add(
                "invalid",
                source,
                row,
                "glucose_mg_dl",
                float(value),
                "missing reading",
                "dropped: no value",
            )
            continue
        events.add(t, offset, _CGM, value, source, row)

    actuator_path = channels / "supervisor__actuator.parquet"
    if actuator_path.is_file():
        actuator = pq.read_table(actuator_path)
        source = actuator_path.name
        rows, t_us, offsets = when(actuator, source)
        basal = actuator.column("basal_u_per_h").to_numpy(zero_copy_only=False)[rows - 1]
        bolus = actuator.column("bolus_u").to_numpy(zero_copy_only=False)[rows - 1]
        duration = actuator.column("duration_min").to_numpy(zero_copy_only=False)[rows - 1]
        for k in range(rows.size):
            row, t, offset = int(rows[k]), int(t_us[k]), int(offsets[k])
            for column, value in (("basal_u_per_h", basal[k]), ("bolus_u", bolus[k])):
                if not math.isfinite(value):
                    issues.add(
                        "invalid", source, row, column, float(value), "not finite", "dropped"
                    )
            if math.isfinite(basal[k]):
                end = t + duration[k] * _US_PER_MIN if math.isfinite(duration[k]) else math.inf
                temps.append(_Temp(t, end, float(basal[k]), None, source, row, offset))
            if math.isfinite(bolus[k]) and bolus[k] != 0:
                events.add(t, offset, _BOLUS, bolus[k], source, row)
    else:
        issues.add("notes", run_dir.name, 0, "supervisor->actuator", "", "no channel", "no insulin")

    meal_path = channels / "meal__controller.parquet"
    if meal_path.is_file():
        meals = pq.read_table(meal_path)
        source = meal_path.name
        rows, t_us, offsets = when(meals, source)
        carbs = meals.column("carbs_g").to_numpy(zero_copy_only=False)[rows - 1]
        for row, t, offset, value in zip(rows, t_us, offsets, carbs, strict=True):
            if not math.isfinite(value):
                issues.add("invalid", source, row, "carbs_g", float(value), "not finite", "dropped")
            elif value != 0:
                events.add(t, offset, _CARBS, value, source, row)
    else:
        issues.add("notes", run_dir.name, 0, "meal->controller", "", "no channel", "no carbs")
    return patient, _twinloop_schedule(manifest, patient, start_zone)


def _twinloop_schedule(manifest: dict[str, Any], patient: str, zone: tzinfo) -> _Schedule | None:
    """The pump's scheduled basal of a run's patient (the patient's basal, quantized)."""
    from twinloop.plant.glucose.cohorts import find_patient
    from twinloop.plant.glucose.pump import PumpSpec, quantize_basal

    try:
        config = manifest.get("config", {})
        pump = PumpSpec(**config.get("pump", {}))
        populations = config.get("patients") or ()
        rate = float(quantize_basal(pump, find_patient(patient, populations).basal_u_per_h))
    except (KeyError, TypeError, ValueError):
        return None
    return _Schedule("manifest.json", 0, zone, ((0, rate),))


# --------------------------------------------------------------------------------------------
# basal timeline


def _basal_timeline(
    temps: list[_Temp],
    schedule: _Schedule | None,
    t0_us: int,
    t1_us: int,
    events: _Events,
    issues: _Issues,
) -> None:
    """Turn temp basals (with ends) into basal rows, returning to the schedule when known.

    Every temp basal gives a row at its start. Where one ends (or is cancelled) with no other
    starting, the scheduled rate resumes: a row from the schedule when it is known (and at each
    of its changes while no temp runs), else the last rate is held and that is reported once.
    """
    usable: list[_Temp] = []
    for temp in temps:
        if temp.rate is None and temp.percent is not None and schedule is None:
            issues.add(
                "invalid",
                temp.source,
                temp.row,
                "percent",
                temp.percent,
                "percent temp basal: scheduled rate unknown",
                "dropped: rate unknown (give profile.json or scheduled_basal_u_per_h=)",
            )
            continue
        if temp.rate is not None and temp.rate < 0:
            issues.add(
                "out_of_range",
                temp.source,
                temp.row,
                "basal_u_per_h",
                temp.rate,
                "negative insulin is impossible",
                "dropped: impossible value",
            )
            continue
        usable.append(temp)
    if not usable and schedule is None:
        return
    usable.sort(key=lambda temp: temp.t_us)  # stable: source order among equal starts
    effective: list[_Temp] = []
    for temp in usable:
        if not effective or effective[-1].t_us != temp.t_us:
            effective.append(temp)
    starts = [temp.t_us for temp in effective]
    start_set = set(starts)

    def temp_rate(temp: _Temp, t: int) -> float | None:
        """The rate of a temp basal at ``t`` (None: a cancel, or percent without schedule)."""
        if temp.rate is not None:
            return temp.rate
        if temp.percent is not None and schedule is not None:
            return schedule.rate_at(t) * (100.0 + temp.percent) / 100.0
        return None

    for temp in usable:  # a row for every temp basal record (duplicates are reported later)
        rate = temp_rate(temp, temp.t_us)
        if rate is not None:
            events.add(temp.t_us, temp.offset_min, _BASAL, rate, temp.source, temp.row)

    boundaries = set(start_set)
    boundaries.update(int(t.end_us) for t in effective if t.end_us <= t1_us)
    if schedule is not None:
        boundaries.add(t0_us)
        boundaries.update(schedule.changes(t0_us, t1_us))
    running: float | None = None
    inferred = 0
    held: dict[int, _Temp] = {}  # by id: temp basals that ended into an unknown rate
    for b in sorted(boundaries):
        i = bisect.bisect_right(starts, b) - 1
        current = effective[i] if i >= 0 else None
        rate = None
        if current is not None and b < current.end_us:
            rate = temp_rate(current, b)
        if rate is not None and current is not None:  # a temp basal runs
            if b not in start_set and rate != running:  # a percent temp, schedule change
                events.add(b, current.offset_min, _BASAL, rate, current.source, current.row)
                inferred += 1
            running = rate
        elif schedule is not None:  # the scheduled basal runs
            rate = schedule.rate_at(b)
            if rate != running:
                offset = _zone_offset_min(b, schedule.zone)
                events.add(b, offset, _BASAL, rate, schedule.source, schedule.row)
                running = rate
                inferred += 1
        elif current is not None:  # ended, and the scheduled rate is unknown
            held.setdefault(id(current), current)
    if held:
        first = next(iter(held.values()))
        issues.add(
            "notes",
            first.source,
            first.row,
            "duration",
            len(held),
            f"temp basal end: scheduled rate unknown ({len(held)} temp basal(s) end or are"
            " cancelled with no basal row after them)",
            "kept: the last rate held until the next basal row",
        )
    if inferred and schedule is not None:
        issues.add(
            "notes",
            schedule.source,
            schedule.row,
            "basal_u_per_h",
            inferred,
            f"{inferred} basal row(s) inferred from the scheduled basal (where temp basals end"
            " or the schedule changes)",
            "kept",
        )


# --------------------------------------------------------------------------------------------
# the import


def _sources(paths: Sequence[Path], format: str | None) -> list[tuple[str, Path]]:
    """(format, path) of each source, directories expanded."""
    if format is not None and format not in FORMATS:
        raise LogError(f"format={format!r} is not allowed: use one of {', '.join(FORMATS)}")
    out: list[tuple[str, Path]] = []
    for path in paths:
        if not path.exists():
            raise LogError(f"{path}: no such file or directory")
        if path.is_dir():
            if (path / "manifest.json").is_file() and format in (None, "twinloop"):
                out.append(("twinloop", path))
                continue
            found = [
                path / n
                for n in ("entries.json", "treatments.json", "profile.json")
                if (path / n).is_file()
            ]
            if found and format in (None, "nightscout"):
                out += [("nightscout", p) for p in found]
                continue
            raise LogError(
                f"{path}: a directory with neither manifest.json (a twinloop run) nor"
                " entries.json/treatments.json/profile.json (Nightscout)"
                + (f" to read as format={format!r}" if format else "")
            )
        if path.name == "manifest.json" and format in (None, "twinloop"):
            out.append(("twinloop", path.parent))
        elif format is not None:
            out.append((format, path))
        elif path.suffix.lower() == ".csv":
            out.append(("csv", path))
        elif path.suffix.lower() == ".json":
            out.append(("nightscout", path))
        else:
            _check_source(path, str(path))  # never sniff a device or FIFO
            with path.open("rb") as stream:
                head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            out.append(("nightscout" if head[:1] in (b"[", b"{") else "csv", path))
    return out


def _source_names(sources: list[tuple[str, Path]]) -> list[str]:
    names = [path.name for _, path in sources]
    return [
        str(path) if names.count(name) > 1 else name
        for name, (_, path) in zip(names, sources, strict=True)
    ]


def _report(
    issues: _Issues,
    rows_read: Mapping[str, int],
    events: Mapping[str, int],
    gaps: tuple[tuple[datetime, datetime], ...],
    days: float,
    coverage: float,
    period_min: int = DEFAULT_CGM_PERIOD_MIN,
) -> ImportReport:
    return ImportReport(
        rows_read=dict(rows_read),
        events=dict(events),
        gaps=gaps,
        cgm_days=days,
        cgm_coverage=coverage,
        cgm_period_min=period_min,
        **{category: tuple(items) for category, items in issues.by_category.items()},
    )


def _range_check(
    kind: NDArray[np.int64],
    value: NDArray[np.float64],
    source: list[str],
    row: NDArray[np.int64],
    issues: _Issues,
) -> NDArray[np.bool_]:
    """Report values outside :data:`RANGES`; return the mask of the rows kept."""
    keep = np.ones(kind.shape, dtype=bool)
    for code, column in enumerate(VALUE_COLUMNS):
        low, high = RANGES[column]
        unit = _UNITS[column]
        of_kind = kind == code
        for i in np.flatnonzero(of_kind & ((value < low) | (value > high))):
            v = float(value[i])
            if code == _CGM:
                problem = f"outside the {low:g}–{high:g} {unit} a CGM reports"
                if 1.0 < v < low:
                    problem += " (mmol/L? the layout wants mg/dL)"
                action = "dropped: impossible CGM reading"
                keep[i] = False
            elif v < low:
                what = "insulin" if code != _CARBS else "carbohydrates"
                problem, action = f"negative {what} is impossible", "dropped: impossible value"
                keep[i] = False
            else:
                problem = f"above {high:g} {unit}, implausible"
                action = "kept: possible, check the log"
            issues.add("out_of_range", source[i], int(row[i]), column, v, problem, action)
    return keep


def shipped_examples() -> dict[str, Path]:
    """The example logs shipped with twinloop, by name (``synthetic_adult006_14d``, ...)."""
    from importlib import resources

    folder = Path(str(resources.files("twinloop.twins").joinpath("data", "example_logs")))
    found = {p.stem: p for p in sorted(folder.glob("*.csv"))}
    found.update({p.name: p for p in sorted(folder.iterdir()) if p.is_dir()})
    return found


def resolve_log_path(text: str | os.PathLike[str]) -> Path:
    """``text`` as a path, or the shipped example log of that name when no such file exists."""
    path = Path(text)
    if path.exists():
        return path
    return shipped_examples().get(str(text), path)


def read_log(
    path_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    format: Format | None = None,
    patient: str | None = None,
    min_days: float = 0.0,
    tz: str | tzinfo | None = None,
    start: datetime | None = None,
    scheduled_basal_u_per_h: float | None = None,
) -> TherapyLog:
    """Import a glucose-therapy log into one table (:data:`LOG_SCHEMA`) with a report.

    Args:
        path_or_paths: a file, a directory, or several of them (their events are merged; a
            Nightscout directory holds ``entries.json``, ``treatments.json`` and optionally
            ``profile.json``; a twinloop run directory holds ``manifest.json``).
        format: ``"csv"``, ``"nightscout"`` or ``"twinloop"``; ``None`` tells from each path
            (a directory's files, the extension ``.csv``/``.json``, else the content).
        patient: whose log it is; required for a twinloop run with several patients (it picks
            that patient's rows); a label otherwise.
        min_days: refuse (:class:`LogError`) unless the CGM left spans at least this many days
            and covers at least 70 % of the slots of its sampling period (1, 3 or 5 min, told
            from the readings); 0 never refuses for lack of data.
        tz: IANA time zone (``"Europe/Berlin"``) of naive CSV times and of Nightscout records
            without ``utcOffset``; also the declared zone against which offsets are checked
            (offset changes that are this zone's DST changes are then not reported). Without
            it, naive times are refused, naming this option (``--tz ZONE`` on the command
            line).
        start: aware datetime of a twinloop run's minute 0 (default
            :data:`DEFAULT_TWINLOOP_START`, 2026-01-01T00:00Z); local offsets follow its zone.
        scheduled_basal_u_per_h: flat scheduled basal rate, U/h, to which temp basals return
            when they end (overrides a Nightscout profile's schedule and a run's pump setting).

    Returns:
        The log: table, report, patient.

    Raises:
        LogError: a CSV without ``time`` or a value column, naive times without a zone,
            unreadable files, a twinloop run with several patients and no ``patient=``, or too
            little data.

    """
    raw = [path_or_paths] if isinstance(path_or_paths, str | os.PathLike) else list(path_or_paths)
    if not raw:
        raise LogError("path_or_paths is empty: give a file or directory")
    if isinstance(min_days, bool) or not (
        isinstance(min_days, int | float) and math.isfinite(min_days) and min_days >= 0
    ):
        raise LogError(f"min_days={min_days!r} is not allowed: a number of days >= 0")
    zone = None if tz is None else _zone(tz, "tz")
    if start is None:
        start = DEFAULT_TWINLOOP_START
    if start.tzinfo is None or start.utcoffset() is None:
        raise LogError(f"start={start.isoformat()} has no time zone: give an aware datetime")
    if scheduled_basal_u_per_h is not None and not (
        math.isfinite(scheduled_basal_u_per_h) and 0 <= scheduled_basal_u_per_h <= 35
    ):
        raise LogError(
            f"scheduled_basal_u_per_h={scheduled_basal_u_per_h!r} is not allowed: 0 to 35 U/h"
        )
    sources = _sources([Path(p) for p in raw], format)
    names = _source_names(sources)
    events = _Events()
    temps: list[_Temp] = []
    issues = _Issues()
    rows_read: dict[str, int] = {}
    schedule: _Schedule | None = None
    run_patient: str | None = None

    # Profiles first: their time zone is the declared zone of the Nightscout files.
    ns_zone = zone
    loaded: dict[int, tuple[str, list[Any]]] = {}
    for i, ((fmt, path), name) in enumerate(zip(sources, names, strict=True)):
        if fmt != "nightscout":
            continue
        records = _json_records(path, name)
        kind = _nightscout_kind(name, records)
        loaded[i] = (kind, records)
        rows_read[name] = len(records)
        if kind == "profile":
            profile_schedule, profile_zone = _read_profile(records, name, issues)
            schedule = schedule or profile_schedule
            ns_zone = ns_zone or profile_zone
    for i, ((fmt, path), name) in enumerate(zip(sources, names, strict=True)):
        if fmt == "csv":
            rows_read[name] = _read_csv(path, name, zone, events, issues)
        elif fmt == "twinloop":
            try:
                run_patient, run_schedule = _read_twinloop(
                    path, patient, start, events, temps, issues, rows_read
                )
            except (pa.ArrowException, OSError, KeyError) as error:
                first = (str(error).splitlines() or [type(error).__name__])[0]
                raise LogError(f"{name}: not a readable twinloop run ({first})") from None
            schedule = schedule or run_schedule
        else:
            kind, records = loaded[i]
            if kind == "entries":
                _read_entries(records, name, ns_zone, events, issues)
            elif kind == "treatments":
                _read_treatments(records, name, ns_zone, events, temps, issues)
    if scheduled_basal_u_per_h is not None:
        schedule = _Schedule(
            "scheduled_basal_u_per_h", 0, UTC, ((0, float(scheduled_basal_u_per_h)),)
        )

    all_times = events.t_us + [temp.t_us for temp in temps]
    if all_times:
        _basal_timeline(temps, schedule, min(all_times), max(all_times), events, issues)

    t_us = np.asarray(events.t_us, dtype=np.int64)
    offset = np.asarray(events.offset_min, dtype=np.int64)
    kind_arr = np.asarray(events.kind, dtype=np.int64)
    value = np.asarray(events.value, dtype=np.float64)
    row = np.asarray(events.row, dtype=np.int64)
    source = events.source
    keep = _range_check(kind_arr, value, source, row, issues)
    keep &= _deduplicate(t_us, offset, kind_arr, value, source, row, keep, issues)

    index = np.flatnonzero(keep)
    order = index[np.lexsort((index, kind_arr[index], t_us[index]))]
    table = _table(
        t_us[order], offset[order], kind_arr[order], value[order], source, row[order], order
    )
    cgm_times = t_us[order][kind_arr[order] == _CGM]
    gaps = _gaps(cgm_times)
    days, coverage = _cgm_span_coverage(cgm_times)
    period = _cgm_period_min(cgm_times)
    counts = {column: int(np.sum(kind_arr[order] == k)) for k, column in enumerate(VALUE_COLUMNS)}
    report = _report(issues, rows_read, counts, gaps, days, coverage, period)
    if min_days > 0 and (days < min_days or coverage < MIN_COVERAGE):
        needed = math.ceil(min_days * 1440 / period * MIN_COVERAGE)
        raise LogError(
            f"too little CGM data to fit: {min_days:g} day(s) are needed with at least"
            f" {100 * MIN_COVERAGE:.0f} % of the {period}-min slots holding a reading (at least"
            f" {needed} readings at the log's {period}-min sampling); present:"
            f" {days:.2f} day(s), {100 * coverage:.1f} % of slots"
            f" covered ({cgm_times.size} readings, {len(gaps)} gap(s) > {GAP_MIN:g} min,"
            f" {len(report.invalid) + len(report.out_of_range)} value(s) invalid or out of"
            " range)",
            report,
        )
    return TherapyLog(table=table, report=report, patient=patient or run_patient)


def _deduplicate(
    t_us: NDArray[np.int64],
    offset: NDArray[np.int64],
    kind: NDArray[np.int64],
    value: NDArray[np.float64],
    source: list[str],
    row: NDArray[np.int64],
    keep: NDArray[np.bool_],
    issues: _Issues,
) -> NDArray[np.bool_]:
    """Keep the first row of each (kind, instant); report the others. Returns the kept mask."""
    out = np.ones(t_us.shape, dtype=bool)
    index = np.flatnonzero(keep)
    if index.size < 2:
        return out
    order = index[np.lexsort((index, t_us[index], kind[index]))]
    same = (kind[order][1:] == kind[order][:-1]) & (t_us[order][1:] == t_us[order][:-1])
    first = order[0]
    for position in range(1, order.size):
        i = order[position]
        if not same[position - 1]:
            first = i
            continue
        out[i] = False
        column = VALUE_COLUMNS[kind[i]]
        where = f"{source[first]} row {row[first]}"
        at = _iso_local(t_us[i], int(offset[i]))
        if value[i] == value[first]:
            problem = f"duplicate of {where} (same {column} at {at})"
            action = f"merged: kept once ({where})"
        else:
            problem = f"same time ({at}) as {where}, whose value {value[first]:.6g} differs"
            action = f"dropped: conflicts with {where} (its value kept)"
        issues.add("duplicates", source[i], int(row[i]), column, float(value[i]), problem, action)
    return out


def _gaps(cgm_times: NDArray[np.int64]) -> tuple[tuple[datetime, datetime], ...]:
    if cgm_times.size < 2:
        return ()
    long = np.flatnonzero(np.diff(cgm_times) > GAP_MIN * _US_PER_MIN)
    return tuple((_from_us(cgm_times[i]), _from_us(cgm_times[i + 1])) for i in long)


def _table(
    t_us: NDArray[np.int64],
    offset: NDArray[np.int64],
    kind: NDArray[np.int64],
    value: NDArray[np.float64],
    source: list[str],
    row: NDArray[np.int64],
    order: NDArray[np.int64],
) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "time": pa.array(t_us, type=pa.timestamp("us", tz="UTC")),
        "utc_offset_min": pa.array(offset.astype(np.int16), type=pa.int16()),
    }
    for code, column in enumerate(VALUE_COLUMNS):
        columns[column] = pa.array(value, type=pa.float64(), mask=kind != code)
    columns["source"] = pa.array([source[i] for i in order], type=pa.string())
    columns["source_row"] = pa.array(row.astype(np.int32), type=pa.int32())
    return pa.Table.from_pydict(columns, schema=LOG_SCHEMA)
