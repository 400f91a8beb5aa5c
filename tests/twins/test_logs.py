"""Import of glucose-therapy logs (twins/logs.py): CSV, Nightscout, twinloop runs, the report."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twinloop.plant.errors import PlantError
from twinloop.twins.identify import log_grid
from twinloop.twins.logs import (
    CSV_COLUMNS,
    LOG_SCHEMA,
    VALUE_COLUMNS,
    LogError,
    TherapyLog,
    read_log,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "twins" / "data" / "example_logs"
HEADER = "time,cgm_mg_dl,basal_u_per_h,bolus_u,carbs_g,note"


def write_csv(path: Path, lines: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def cgm_lines(start: datetime, n: int, *, step_min: float = 5.0, value: int = 120) -> list[str]:
    """``n`` CSV rows of CGM only, every ``step_min`` minutes from ``start``."""
    return [
        f"{(start + timedelta(minutes=step_min * k)).isoformat()},{value},,,," for k in range(n)
    ]


def rows_of(log: TherapyLog) -> list[dict]:
    return log.table.to_pylist()


def issue_rows(issues) -> list[int]:
    return [issue.row for issue in issues]


CET = timezone(timedelta(hours=1))


# ------------------------------------------------------------------------------------------ CSV


def test_csv_round_trip_into_schema_utc_offsets_and_several_values_per_row(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,0.9,,,",  # line 2: CGM and basal
            "2026-03-01T08:05:00+01:00,115,,4.5,60,breakfast",  # line 3: CGM, bolus, carbs
            "2026-03-01T07:10:00Z,118,,,,",  # line 4: UTC, = 08:10+01:00
        ],
    )
    log = read_log(path, patient="me")
    assert log.table.schema.equals(LOG_SCHEMA, check_metadata=True)
    assert log.patient == "me"
    rows = rows_of(log)
    assert len(rows) == 6
    for row in rows:  # exactly one value column set per row
        assert sum(row[c] is not None for c in VALUE_COLUMNS) == 1
        assert row["source"] == "log.csv"
        assert row["time"].utcoffset() == timedelta(0)
    line3 = [r for r in rows if r["source_row"] == 3]
    assert {c for r in line3 for c in VALUE_COLUMNS if r[c] is not None} == {
        "cgm_mg_dl",
        "bolus_u",
        "carbs_g",
    }
    assert all(r["time"] == datetime(2026, 3, 1, 7, 5, tzinfo=UTC) for r in line3)
    assert all(r["utc_offset_min"] == 60 for r in line3)
    assert [r["bolus_u"] for r in line3 if r["bolus_u"] is not None] == [4.5]
    assert [r["carbs_g"] for r in line3 if r["carbs_g"] is not None] == [60.0]
    (utc_row,) = [r for r in rows if r["source_row"] == 4]
    assert utc_row["utc_offset_min"] == 0
    assert utc_row["time"] == datetime(2026, 3, 1, 7, 10, tzinfo=UTC)
    times = log.table.column("time").to_pylist()
    assert times == sorted(times)
    assert log.report.events == {"cgm_mg_dl": 3, "basal_u_per_h": 1, "bolus_u": 1, "carbs_g": 1}
    # the UTC row's offset differs from the other rows': reported, kept
    assert [(i.row, i.action) for i in log.report.issues] == [
        (4, "kept: converted to UTC with its own offset")
    ]
    assert log.report.mixed_time_zones == log.report.issues
    times_np, values = log.series("cgm_mg_dl")
    assert values.tolist() == [110.0, 115.0, 118.0]
    assert times_np[0] == np.datetime64("2026-03-01T07:00:00", "us")


def test_unknown_columns_are_ignored_and_listed_in_the_report(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,0.9,,,,7.2,G6,",  # line 2
            "2026-03-01T08:05:00+01:00,115,,2.5,30,lunch,7.4,G6,x",  # line 3
        ],
        header=HEADER + ",ketones_mmol_l, Device ,",  # a trailing comma: an unnamed column
    )
    log = read_log(path)
    ignored = ("ketones_mmol_l", "device", "(unnamed column 9)")
    assert log.report.ignored_columns == ignored
    assert [(i.row, i.column) for i in log.report.unknown_columns] == [(1, c) for c in ignored]
    assert all(i.action == "ignored: not imported" for i in log.report.unknown_columns)
    # the known columns are imported as without the others; nothing of the others is
    assert log.report.events == {"cgm_mg_dl": 2, "basal_u_per_h": 1, "bolus_u": 1, "carbs_g": 1}
    assert log.report.invalid == () and log.report.notes == ()
    text = log.report.to_text()
    assert "ignored columns: ketones_mmol_l, device, (unnamed column 9)" in text
    assert log.report.as_dict()["ignored_columns"] == list(ignored)
    # a file of the layout lists none
    plain = read_log(write_csv(tmp_path / "plain.csv", ["2026-03-01T08:00:00+01:00,110,,,,"]))
    assert plain.report.ignored_columns == ()
    assert "ignored columns" not in plain.report.to_text()


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ("time;cgm_mg_dl;bolus_u", "no 'time' column; not of the layout: 'time;cgm_mg_dl;bolus_u'"
         " (the layout is comma-separated)"),
        ("time,glucose,insulin", "no value column (one of cgm_mg_dl, basal_u_per_h, bolus_u,"
         " carbs_g); not of the layout: 'glucose', 'insulin'"),
        ("when,cgm_mg_dl", "no 'time' column; not of the layout: 'when'"),
        ("time,cgm_mg_dl,bolus_u,BOLUS_U", "column(s) bolus_u appear more than once"),
    ],
)  # fmt: skip
def test_a_header_the_layout_cannot_read_is_still_refused(tmp_path, header, needle):
    path = write_csv(tmp_path / "log.csv", ["2026-03-01T08:00:00+01:00,110,1,1"], header=header)
    with pytest.raises(LogError) as caught:
        read_log(path)
    message = str(caught.value)
    assert needle in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PlantError)
    if "appear more than once" not in needle:
        for column in CSV_COLUMNS:
            assert column in message
        assert caught.value.report is not None
        assert caught.value.report.ignored_columns


def test_malformed_values_in_known_columns_are_still_dropped_beside_an_ignored_one(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,,abc,,,1",  # line 2: bolus not a number
            "2026-03-01T08:05:00+01:00,,,,,,2",  # line 3: only the ignored column
        ],
        header=HEADER + ",steps",
    )
    log = read_log(path)
    assert [(i.row, i.column) for i in log.report.invalid] == [(2, "bolus_u")]
    assert [(i.row, i.problem) for i in log.report.notes] == [(3, "no value in the row")]
    assert log.report.events["bolus_u"] == 0 and log.report.ignored_columns == ("steps",)


def test_naive_times_refused_unless_tz_names_a_zone(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-28T23:55:00,110,,,,",  # line 2: CET (+01:00)
            "2026-03-29T03:00:00,112,,,,",  # line 3: after the DST change (+02:00)
        ],
    )
    with pytest.raises(LogError) as caught:
        read_log(path)
    message = str(caught.value)
    # one line naming the field, its value, the rows and the option that fixes it
    assert "\n" not in message
    assert message.startswith("log.csv: time='2026-03-28T23:55:00' (row(s) 2, 3) has no UTC")
    assert "--tz ZONE (e.g. --tz Europe/Rome; in Python read_log(..., tz='Europe/Rome'))" in message
    assert "'timezone' column" in message
    log = read_log(path, tz="Europe/Berlin")
    rows = rows_of(log)
    assert [r["utc_offset_min"] for r in rows] == [60, 120]
    assert [r["time"] for r in rows] == [
        datetime(2026, 3, 28, 22, 55, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
    ]
    # a DST change of the declared zone is not a mixture of time zones
    assert log.report.mixed_time_zones == ()
    with pytest.raises(LogError, match="IANA"):
        read_log(path, tz="Mars/Olympus")


def test_negative_insulin_dropped_and_reported_with_its_row(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,0.8,,,",  # line 2
            "2026-03-01T08:05:00+01:00,112,,-2,,",  # line 3: negative bolus
            "2026-03-01T08:10:00+01:00,113,-0.5,,,",  # line 4: negative basal
            "2026-03-01T08:15:00+01:00,114,,30,,",  # line 5: large but possible bolus
        ],
    )
    log = read_log(path)
    issues = {(i.row, i.column): i for i in log.report.out_of_range}
    assert set(issues) == {(3, "bolus_u"), (4, "basal_u_per_h"), (5, "bolus_u")}
    assert issues[3, "bolus_u"].action.startswith("dropped")
    assert "negative insulin" in issues[3, "bolus_u"].problem
    assert issues[4, "basal_u_per_h"].action.startswith("dropped")
    assert issues[5, "bolus_u"].action.startswith("kept")
    bolus = [v for v in log.table.column("bolus_u").to_pylist() if v is not None]
    basal = [v for v in log.table.column("basal_u_per_h").to_pylist() if v is not None]
    assert bolus == [30.0]
    assert basal == [0.8]
    text = log.report.to_text()
    assert "log.csv row 3, bolus_u = -2" in text
    assert "log.csv row 4, basal_u_per_h = -0.5" in text


def test_zero_bolus_and_carbs_are_no_events_but_a_zero_basal_is_a_rate(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,1.0,0,0,",  # line 2: zeros beside CGM and basal
            "2026-03-01T08:05:00+01:00,112,0,0.0,0,",  # line 3: a 0 U/h temp basal starts
            "2026-03-01T08:10:00+01:00,114,,3.5,40,",  # line 4: a real bolus and meal
            "2026-03-01T08:12:00+01:00,,,0,0,",  # line 5: nothing but zeros
            "2026-03-01T08:15:00+01:00,116,1.0,-0,0,",  # line 6: basal resumes
            "2026-03-01T08:20:00+01:00,118,,,,",  # line 7
        ],
    )
    log = read_log(path)
    assert log.report.events == {"cgm_mg_dl": 5, "basal_u_per_h": 3, "bolus_u": 1, "carbs_g": 1}
    _, bolus = log.series("bolus_u")
    _, carbs = log.series("carbs_g")
    assert bolus.tolist() == [3.5] and carbs.tolist() == [40.0]
    _, basal = log.series("basal_u_per_h")
    assert basal.tolist() == [1.0, 0.0, 1.0]
    assert "1 bolus_u (U), 1 carbs_g (g)" in log.report.to_text()
    # the zeros are counted once per column, at their first row; the zeros-only row gets no
    # "no value" note of its own
    zeros = {i.column: i for i in log.report.notes}
    assert set(zeros) == {"bolus_u", "carbs_g"} and len(log.report.notes) == 2
    assert zeros["bolus_u"].row == 2 and zeros["bolus_u"].problem.startswith("4 row(s)")
    assert zeros["carbs_g"].row == 2 and zeros["carbs_g"].problem.startswith("4 row(s)")
    assert zeros["carbs_g"].action == "not imported: 0 g is no event"
    # on the minute grid: no insulin from the zeros, and the 0 U/h basal holds 08:05-08:15
    grid = log_grid(log)
    assert grid.bolus_u.tolist() == [0.0] * 10 + [3.5] + [0.0] * 9
    assert grid.basal_u_per_h.tolist() == [1.0] * 5 + [0.0] * 10 + [1.0] * 5
    assert grid.insulin_u_per_min[5:10].tolist() == [0.0] * 5


def test_glucose_0_and_2000_reported_and_dropped_with_rows(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,,,,",  # line 2
            "2026-03-01T08:05:00+01:00,0,,,,",  # line 3
            "2026-03-01T08:10:00+01:00,2000,,,,",  # line 4
            "2026-03-01T08:15:00+01:00,600,,,,",  # line 5: the upper bound is kept
            "2026-03-01T08:20:00+01:00,abc,,,,",  # line 6: not a number
        ],
    )
    log = read_log(path)
    assert issue_rows(log.report.out_of_range) == [3, 4]
    assert all(i.column == "cgm_mg_dl" for i in log.report.out_of_range)
    assert all(i.action.startswith("dropped") for i in log.report.out_of_range)
    assert [i.value for i in log.report.out_of_range] == ["0", "2000"]
    assert issue_rows(log.report.invalid) == [6]
    assert log.table.column("cgm_mg_dl").to_pylist() == [110.0, 600.0]
    assert log.table.column("source_row").to_pylist() == [2, 5]


def test_duplicates_reported_and_kept_once(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,,2,,",  # line 2
            "2026-03-01T08:00:00+01:00,110,,2,,",  # line 3: the same row again
            "2026-03-01T07:00:00Z,,,,30,",  # line 4: carbs at the same instant (other kind)
            "2026-03-01T08:00:00+01:00,125,,,,",  # line 5: CGM conflicting with line 2's
        ],
    )
    log = read_log(path)
    duplicates = {(i.row, i.column): i for i in log.report.duplicates}
    assert set(duplicates) == {(3, "cgm_mg_dl"), (3, "bolus_u"), (5, "cgm_mg_dl")}
    assert duplicates[3, "cgm_mg_dl"].action.startswith("merged")
    assert "row 2" in duplicates[3, "cgm_mg_dl"].problem
    assert duplicates[5, "cgm_mg_dl"].action.startswith("dropped")
    rows = rows_of(log)
    assert len(rows) == 3  # one CGM (110, line 2), one bolus, the carbs
    assert [r["cgm_mg_dl"] for r in rows if r["cgm_mg_dl"] is not None] == [110.0]
    assert {r["source_row"] for r in rows} == {2, 4}


def test_out_of_order_rows_reported_and_table_sorted(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,,,,",  # line 2
            "2026-03-01T08:10:00+01:00,120,,,,",  # line 3
            "2026-03-01T08:05:00+01:00,115,,,,",  # line 4: backwards
            "2026-03-01T08:15:00+01:00,125,,,,",  # line 5
            "2026-03-01T07:55:00+01:00,105,,,,",  # line 6: backwards
        ],
    )
    log = read_log(path)
    assert issue_rows(log.report.out_of_order) == [4, 6]
    assert "row 3" in log.report.out_of_order[0].problem
    assert "row 5" in log.report.out_of_order[1].problem
    assert log.table.column("cgm_mg_dl").to_pylist() == [105.0, 110.0, 115.0, 120.0, 125.0]
    assert log.table.column("source_row").to_pylist() == [6, 2, 4, 3, 5]


def test_mixed_offsets_reported(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00+01:00,110,,,,",  # line 2
            "2026-03-01T08:05:00+01:00,112,,,,",  # line 3
            "2026-03-01T09:10:00+02:00,114,,,,",  # line 4: another offset
            "2026-03-01T08:15:00+01:00,116,,,,",  # line 5
        ],
    )
    log = read_log(path)
    assert issue_rows(log.report.mixed_time_zones) == [4]
    assert "+02:00" in log.report.mixed_time_zones[0].problem
    assert "+01:00" in log.report.mixed_time_zones[0].problem
    # kept, converted with its own offset
    assert log.table.column("utc_offset_min").to_pylist() == [60, 60, 120, 60]
    assert log.table.column("time").to_pylist()[2] == datetime(2026, 3, 1, 7, 10, tzinfo=UTC)
    # against a declared zone, an offset that is not the zone's at that time is reported
    declared = read_log(path, tz="Europe/Berlin")
    assert issue_rows(declared.report.mixed_time_zones) == [4]
    assert "Europe/Berlin" in declared.report.mixed_time_zones[0].problem


def test_cgm_gaps_longer_than_15_min_reported_with_bounds(tmp_path):
    start = datetime(2026, 3, 1, 8, 0, tzinfo=CET)
    lines = (
        cgm_lines(start, 4)  # 08:00 … 08:15
        + cgm_lines(start + timedelta(minutes=30), 3)  # 15-min step: not a gap
        + cgm_lines(start + timedelta(minutes=90), 2)  # 50-min step: a gap
    )
    log = read_log(write_csv(tmp_path / "log.csv", lines))
    assert log.report.gaps == (
        (datetime(2026, 3, 1, 7, 40, tzinfo=UTC), datetime(2026, 3, 1, 8, 30, tzinfo=UTC)),
    )
    assert "2026-03-01T07:40:00Z -> 2026-03-01T08:30:00Z (50 min)" in log.report.to_text()
    assert log.report.as_dict()["gaps"][0]["minutes"] == 50.0


def test_min_days_refusal_says_needed_and_present(tmp_path):
    start = datetime(2026, 3, 1, 0, 0, tzinfo=CET)
    path = write_csv(tmp_path / "day.csv", cgm_lines(start, 288))  # one full day
    log = read_log(path, min_days=1)
    assert log.days == pytest.approx(1.0)
    assert log.cgm_coverage == pytest.approx(1.0)
    with pytest.raises(LogError) as caught:
        read_log(path, min_days=2)
    message = str(caught.value)
    assert "2 day(s) are needed" in message
    assert "70 %" in message
    assert "at least 404 readings" in message  # ceil(2 × 288 × 0.7)
    assert "present: 1.00 day(s), 100.0 % of slots covered (288 readings" in message
    assert caught.value.report is not None
    # enough days but too sparse: every third slot only (200 of 598 slots over 2.08 days)
    sparse = write_csv(tmp_path / "sparse.csv", cgm_lines(start, 200, step_min=15))
    with pytest.raises(LogError, match=r"present: 2\.08 day\(s\), 33\.4 % of slots covered"):
        read_log(sparse, min_days=2)
    with pytest.raises(LogError, match="min_days"):
        read_log(path, min_days=-1)


def test_csv_comments_blank_lines_and_note_rows(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "# exported by hand\n"  # line 1
        "Time, CGM_mg_dl ,note\n"  # line 2: names case- and space-insensitive
        "\n"  # line 3
        "2026-03-01T08:00:00+01:00,110,\n"  # line 4
        "2026-03-01T08:02:00+01:00,,sensor change\n",  # line 5: no value
        encoding="utf-8",
    )
    log = read_log(path)
    assert log.table.column("source_row").to_pylist() == [4]
    assert issue_rows(log.report.notes) == [5]
    assert log.report.notes[0].value == "sensor change"


def test_csv_timezone_column(tmp_path):
    path = write_csv(
        tmp_path / "log.csv",
        [
            "2026-03-01T08:00:00,110,,,,,Europe/Berlin",  # line 2: naive, the row's zone
            "2026-03-01T08:05:00+01:00,112,,,,,Europe/Berlin",  # line 3: offset matches
            "2026-03-01T02:10:00,114,,,,,America/New_York",  # line 4: another zone
            "2026-03-01T08:15:00,116,,,,,Mars/Olympus",  # line 5: not a zone
        ],
        header=HEADER + ",timezone",
    )
    log = read_log(path)
    assert log.table.column("utc_offset_min").to_pylist() == [60, 60, -300]
    assert log.table.column("time").to_pylist()[2] == datetime(2026, 3, 1, 7, 10, tzinfo=UTC)
    assert issue_rows(log.report.mixed_time_zones) == [4]
    assert "Europe/Berlin" in log.report.mixed_time_zones[0].problem
    assert issue_rows(log.report.invalid) == [5]


# ----------------------------------------------------------------------------------- Nightscout


def ns_entry(t: datetime, sgv: float, offset: int = 60) -> dict:
    return {
        "type": "sgv",
        "sgv": sgv,
        "date": int(t.timestamp() * 1000),
        "dateString": t.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "utcOffset": offset,
    }


def ns_treatment(t: datetime, event_type: str, **fields) -> dict:
    created = t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"eventType": event_type, "created_at": created, **fields}


@pytest.fixture
def nightscout_dir(tmp_path) -> Path:
    folder = tmp_path / "ns"
    folder.mkdir()
    t0 = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)  # 08:00 at +01:00
    entries = [ns_entry(t0 + timedelta(minutes=5 * k), 100 + k) for k in range(24)]
    entries.append({"type": "mbg", "mbg": 120, "date": int(t0.timestamp() * 1000)})
    entries.reverse()  # newest first, as the API returns them
    treatments = [
        ns_treatment(t0, "Meal Bolus", insulin=5.5, carbs=60, utcOffset=60),
        ns_treatment(t0 + timedelta(minutes=20), "Correction Bolus", insulin=1.2, utcOffset=60),
        ns_treatment(t0 + timedelta(minutes=25), "Carb Correction", carbs=15, utcOffset=60),
        ns_treatment(
            t0 + timedelta(minutes=30),
            "Temp Basal",
            absolute=0.4,
            rate=0.4,
            duration=30,
            utcOffset=60,
        ),
        ns_treatment(t0 + timedelta(minutes=40), "Note", notes="walk", utcOffset=60),
    ]
    (folder / "entries.json").write_text(json.dumps(entries))
    (folder / "treatments.json").write_text(json.dumps(treatments))
    return folder


def test_nightscout_entries_and_treatments(nightscout_dir):
    log = read_log(nightscout_dir)
    t0 = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    _, cgm = log.series("cgm_mg_dl")
    assert cgm.tolist() == [100.0 + k for k in range(24)]
    rows = rows_of(log)
    assert all(r["utc_offset_min"] == 60 for r in rows)
    bolus = [(r["time"], r["bolus_u"]) for r in rows if r["bolus_u"] is not None]
    assert bolus == [(t0, 5.5), (t0 + timedelta(minutes=20), 1.2)]
    carbs = [(r["time"], r["carbs_g"]) for r in rows if r["carbs_g"] is not None]
    assert carbs == [(t0, 60.0), (t0 + timedelta(minutes=25), 15.0)]
    basal = [(r["time"], r["basal_u_per_h"]) for r in rows if r["basal_u_per_h"] is not None]
    assert basal == [(t0 + timedelta(minutes=30), 0.4)]
    # the temp basal ends at +60 min, inside the data (CGM to +115 min): rate held, said once
    ends = [i for i in log.report.notes if "temp basal end: scheduled rate unknown" in i.problem]
    assert len(ends) == 1
    assert ends[0].source == "treatments.json"
    assert ends[0].row == 4
    notes = {(i.source, i.row) for i in log.report.notes}
    assert ("entries.json", 1) in notes  # the mbg record (newest first: record 1)
    assert ("treatments.json", 5) in notes  # the Note
    assert log.report.rows_read == {"entries.json": 25, "treatments.json": 5}
    # the two files given as paths read the same
    same = read_log([nightscout_dir / "entries.json", nightscout_dir / "treatments.json"])
    assert same.table.equals(log.table)


def test_nightscout_temp_basal_returns_to_a_known_schedule(nightscout_dir):
    t0 = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    log = read_log(nightscout_dir, scheduled_basal_u_per_h=0.9)
    basal = [
        (r["time"], r["basal_u_per_h"], r["source"])
        for r in rows_of(log)
        if r["basal_u_per_h"] is not None
    ]
    assert basal == [
        (t0, 0.9, "scheduled_basal_u_per_h"),
        (t0 + timedelta(minutes=30), 0.4, "treatments.json"),
        (t0 + timedelta(minutes=60), 0.9, "scheduled_basal_u_per_h"),
    ]
    assert not [i for i in log.report.notes if "scheduled rate unknown" in i.problem]
    # a Nightscout profile: schedule 0.8 U/h until 08:15 local, 1.1 after (Europe/Berlin)
    profile = {
        "defaultProfile": "Default",
        "startDate": "2026-01-01T00:00:00.000Z",
        "store": {
            "Default": {
                "timezone": "Europe/Berlin",
                "basal": [
                    {"time": "00:00", "value": 0.8, "timeAsSeconds": 0},
                    {"time": "08:15", "value": 1.1, "timeAsSeconds": 29700},
                ],
            }
        },
    }
    (nightscout_dir / "profile.json").write_text(json.dumps([profile]))
    log = read_log(nightscout_dir)
    basal = [
        (r["time"], r["basal_u_per_h"]) for r in rows_of(log) if r["basal_u_per_h"] is not None
    ]
    assert basal == [
        (t0, 0.8),
        (t0 + timedelta(minutes=15), 1.1),  # the schedule changes at 08:15 local = 07:15Z
        (t0 + timedelta(minutes=30), 0.4),  # temp basal 07:30Z-08:00Z
        (t0 + timedelta(minutes=60), 1.1),  # back to the schedule
    ]
    assert "profile.json" in log.report.rows_read


def test_nightscout_percent_cancel_suspend_and_combo_bolus(tmp_path):
    t0 = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    entries = [ns_entry(t0 + timedelta(minutes=5 * k), 120) for k in range(40)]  # 3 h 15 min
    treatments = [
        ns_treatment(t0, "Temp Basal", percent=-50, duration=60),  # half of 1.0 U/h
        ns_treatment(t0 + timedelta(minutes=20), "Temp Basal", duration=0),  # cancel
        ns_treatment(t0 + timedelta(minutes=60), "Suspend Pump"),  # open-ended 0 U/h
        ns_treatment(t0 + timedelta(minutes=90), "Resume Pump"),
        ns_treatment(
            t0 + timedelta(minutes=120),
            "Combo Bolus",
            insulin=2.0,
            enteredinsulin=5.0,
            splitNow=40,
            splitExt=60,
            relative=6.0,
            duration=30,
        ),
        ns_treatment(t0 + timedelta(minutes=150), "Temp Basal", absolute=-1.0, duration=30),
    ]
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    (tmp_path / "treatments.json").write_text(json.dumps(treatments))
    without = read_log(tmp_path)
    assert issue_rows(without.report.invalid) == [1]  # percent: scheduled rate unknown
    log = read_log(tmp_path, scheduled_basal_u_per_h=1.0)
    basal = [
        (r["time"], r["basal_u_per_h"]) for r in rows_of(log) if r["basal_u_per_h"] is not None
    ]
    minutes = timedelta(minutes=1)
    assert [((t - t0) / minutes, rate) for t, rate in basal] == [
        (0.0, 0.5),  # percent temp
        (20.0, 1.0),  # cancelled: back to the schedule
        (60.0, 0.0),  # suspended
        (90.0, 1.0),  # resumed
    ]
    assert issue_rows(log.report.out_of_range) == [6]  # the negative temp basal
    bolus = [(r["time"], r["bolus_u"]) for r in rows_of(log) if r["bolus_u"] is not None]
    assert bolus[0] == (t0 + 120 * minutes, 2.0)
    extended = bolus[1:]
    assert [(t - t0) / minutes for t, _ in extended] == [125, 130, 135, 140, 145, 150]
    assert sum(u for _, u in extended) == pytest.approx(3.0)  # 6 U/h over 30 min
    assert any("extended bolus" in i.problem for i in log.report.notes)


def test_nightscout_offsets_mixed_and_time_fields(tmp_path):
    t0 = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    entries = [ns_entry(t0 + timedelta(minutes=5 * k), 120, offset=60) for k in range(5)]
    entries[2]["utcOffset"] = -300
    del entries[3]["date"]  # only dateString
    entries.append({"type": "sgv", "sgv": 130})  # no time
    path = tmp_path / "entries.json"
    path.write_text(json.dumps(entries))
    log = read_log(path)
    assert issue_rows(log.report.mixed_time_zones) == [3]
    assert issue_rows(log.report.invalid) == [6]
    assert log.table.column("utc_offset_min").to_pylist() == [60, 60, -300, 60, 60]
    assert log.table.column("time").to_pylist()[3] == t0 + timedelta(minutes=15)


def test_nightscout_naive_times_refused_naming_tz_unless_a_zone_is_given(tmp_path):
    entries = [
        {"type": "sgv", "sgv": 120 + k, "dateString": f"2026-03-01T08:{5 * k:02d}:00"}
        for k in range(3)
    ]
    path = tmp_path / "entries.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(LogError) as caught:
        read_log(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "entries.json: dateString='2026-03-01T08:00:00' (record(s) 1, 2, 3) has no UTC offset"
    )
    assert "--tz ZONE (e.g. --tz Europe/Rome; in Python read_log(..., tz='Europe/Rome'))" in message
    # the field named is the one read: an ISO string in 'date' too
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "entries.json"
    other.write_text(json.dumps([{"type": "sgv", "sgv": 99, "date": "2026-03-01T09:00:00"}]))
    with pytest.raises(LogError, match=r"^entries\.json: date='2026-03-01T09:00:00' \(record"):
        read_log(other)
    log = read_log(path, tz="Europe/Rome")
    assert log.table.column("time").to_pylist()[0] == datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    assert set(log.table.column("utc_offset_min").to_pylist()) == {60}
    # treatments' naive created_at is UTC, as Nightscout stores it: no zone needed
    treatments = tmp_path / "treatments.json"
    treatments.write_text(
        json.dumps(
            [{"eventType": "Correction Bolus", "created_at": "2026-03-01T07:05:00", "insulin": 1}]
        )
    )
    times, bolus = read_log(treatments).series("bolus_u")
    assert bolus.tolist() == [1.0] and times[0] == np.datetime64("2026-03-01T07:05:00", "us")


# ------------------------------------------------------------------------------------- twinloop


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from twinloop.agents.glucose.loop import LoopConfig
    from twinloop.agents.glucose.run import run_cohort

    out = tmp_path_factory.mktemp("logs") / "run"
    run_cohort(LoopConfig(patients=("adult#001",), days=1), out, progress=False)
    return out


def test_twinloop_run_directory(run_dir):
    log = read_log(run_dir, min_days=1)
    assert log.patient == "adult#001"
    channels = run_dir / "channels"
    glucose = pq.read_table(channels / "sensor__controller.parquet").column("glucose_mg_dl")
    glucose_np = glucose.to_numpy(zero_copy_only=False)
    _, cgm = log.series("cgm_mg_dl")
    assert cgm.size == int(np.isfinite(glucose_np).sum())
    commands = pq.read_table(channels / "supervisor__actuator.parquet")
    _, bolus = log.series("bolus_u")
    approved = commands.column("bolus_u").to_numpy(zero_copy_only=False)
    assert bolus.size > 0
    assert bolus.sum() == pytest.approx(approved.sum())
    _, basal = log.series("basal_u_per_h")
    assert basal.size == commands.num_rows
    meals = pq.read_table(channels / "meal__controller.parquet").column("carbs_g")
    _, carbs = log.series("carbs_g")
    assert carbs.sum() == pytest.approx(sum(meals.to_pylist()))
    assert carbs.size == meals.length()
    first = log.table.column("time")[0].as_py()
    assert first == datetime(2026, 1, 1, tzinfo=UTC)  # minute 0 at the default start
    # another start, in a zone: times shift, offsets follow the zone
    start = datetime(2026, 7, 1, 6, 0, tzinfo=timezone(timedelta(hours=2)))
    shifted = read_log(run_dir / "manifest.json", start=start)
    assert shifted.table.column("time")[0].as_py() == datetime(2026, 7, 1, 4, 0, tzinfo=UTC)
    assert set(shifted.table.column("utc_offset_min").to_pylist()) == {120}
    assert shifted.report.issues == ()
    with pytest.raises(LogError, match="time zone"):
        read_log(run_dir, start=datetime(2026, 1, 1))


def test_twinloop_run_with_several_patients_needs_patient(tmp_path):
    run = tmp_path / "run"
    (run / "channels").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"config": {"patients": ["a", "b"]}}))
    names = ["a", "b"] * 3
    t_min = [0.0, 0.0, 5.0, 5.0, 10.0, 10.0]
    glucose = [100.0, 200.0, math.nan, 210.0, 104.0, 220.0]
    pq.write_table(
        pa.table({"patient": names, "t_min": t_min, "glucose_mg_dl": glucose}),
        run / "channels" / "sensor__controller.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "patient": ["a", "b"],
                "t_min": [0.0, 0.0],
                "basal_u_per_h": [1.0, 2.0],
                "bolus_u": [3.0, 0.0],
                "duration_min": [30.0, 30.0],
            }
        ),
        run / "channels" / "supervisor__actuator.parquet",
    )
    with pytest.raises(LogError, match="2 patients; pass patient= one of a, b"):
        read_log(run)
    with pytest.raises(LogError, match="'c' is not in the run"):
        read_log(run, patient="c")
    log = read_log(run, patient="a")
    assert log.patient == "a"
    _, cgm = log.series("cgm_mg_dl")
    assert cgm.tolist() == [100.0, 104.0]
    assert issue_rows(log.report.invalid) == [3]  # the dropout of patient a, parquet row 3
    assert log.report.invalid[0].action.startswith("dropped")
    assert log.report.gaps == ()
    _, bolus = log.series("bolus_u")
    assert bolus.tolist() == [3.0]
    assert any("meal->controller" in i.column for i in log.report.notes)


# ------------------------------------------------------------------------------ CGM sampling


def sampled_day(path: Path, period: int, *, keep_every: int = 1) -> Path:
    """A day of CGM every ``period`` minutes (every ``keep_every``-th reading kept), basal 1."""
    start = datetime(2026, 3, 1, 0, 0, tzinfo=CET)
    lines = [f"{start.isoformat()},,1.0,,,"]
    for k in range(0, 1440 // period, keep_every):
        lines.append(f"{(start + timedelta(minutes=period * k)).isoformat()},{100 + k % 50},,,,")
    return write_csv(path, lines)


@pytest.mark.parametrize("period", [1, 3, 5])
def test_cgm_every_1_3_or_5_min_covers_its_own_slots_and_lands_on_its_minutes(tmp_path, period):
    log = read_log(sampled_day(tmp_path / "log.csv", period), min_days=1)
    n = 1440 // period
    assert log.cgm_period_min == log.report.cgm_period_min == period
    assert log.cgm_coverage == log.report.cgm_coverage == 1.0
    assert log.days == pytest.approx(1.0)  # the last reading's slot of `period` minutes counted
    assert log.report.gaps == () and log.report.issues == ()
    text = log.report.to_text()
    assert f"a reading every {period} min, 100.0 % of {period}-min slots covered" in text
    assert log.report.as_dict()["cgm_period_min"] == period
    grid = log_grid(log)
    assert grid.minutes == 1440 - period
    readings = np.flatnonzero(~np.isnan(grid.cgm_mg_dl))
    assert readings.tolist() == list(range(0, 1440, period))
    assert grid.cgm_mg_dl[readings].tolist() == [100.0 + k % 50 for k in range(n)]
    assert grid.basal_u_per_h.tolist() == [1.0] * grid.minutes


@pytest.mark.parametrize(("period", "needed"), [(1, 1008), (3, 336), (5, 202)])
def test_half_the_readings_of_any_period_is_too_little_to_fit(tmp_path, period, needed):
    # every other reading: a 1-min CGM with 50 % missing is not a full 2-min CGM
    path = sampled_day(tmp_path / "log.csv", period, keep_every=2)
    log = read_log(path)
    assert log.cgm_period_min == period
    assert log.cgm_coverage == pytest.approx(0.5, abs=0.01)
    with pytest.raises(LogError) as caught:
        read_log(path, min_days=1)
    message = str(caught.value)
    assert (
        f"70 % of the {period}-min slots holding a reading (at least {needed} readings" in message
    )
    assert f"present: 1.00 day(s), {100 * log.cgm_coverage:.1f} % of slots covered" in message


@pytest.mark.parametrize(
    ("steps_s", "period"),
    [
        ([60, 61, 59, 60, 62, 58], 1),  # 1-min with seconds of jitter
        ([180, 181, 179, 360, 180], 3),  # 3-min, a reading missing
        ([300, 298, 302, 600, 300], 5),
        ([120, 120, 120], 1),  # readings every 2 min: a 1-min CGM with half missing
        ([360, 360, 360], 3),
        ([900, 900, 900, 900], 5),  # every 15 min: a 5-min CGM with two of three missing
        ([600, 600, 300], 5),
        ([], 5),  # one reading: the default
    ],
)
def test_the_sampling_period_is_told_from_the_readings(tmp_path, steps_s, period):
    t = datetime(2026, 3, 1, 8, 0, tzinfo=CET)
    lines = [f"{t.isoformat()},120,,,,"]
    for step in steps_s:
        t += timedelta(seconds=step)
        lines.append(f"{t.isoformat()},120,,,,")
    log = read_log(write_csv(tmp_path / "log.csv", lines))
    assert log.cgm_period_min == period


# ------------------------------------------------------------------------------------- examples


def test_example_files_import_and_report(capsys):
    csv_log = read_log(EXAMPLES / "pump_export.csv", min_days=1)
    ns_log = read_log(EXAMPLES / "nightscout", min_days=1)
    for log in (csv_log, ns_log):
        assert log.table.num_rows > 0
        assert log.cgm_coverage >= 0.7
        text = log.report.to_text()
        print(text)
        json.dumps(log.report.as_dict())
    out = capsys.readouterr().out
    assert "pump_export.csv row " in out
    assert "treatments.json row " in out
    # what the examples are documented to contain (docs/logs.md)
    assert [i.value for i in csv_log.report.out_of_range] == ["0"]
    assert len(csv_log.report.duplicates) == 1
    assert len(csv_log.report.gaps) == 1
    assert csv_log.days == pytest.approx(2.0, abs=0.01)
    assert ns_log.report.events["bolus_u"] == 6
    size = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert size < 400_000  # the 14-day synthetic log for twin fits is about 134 kB
    synthetic = read_log(EXAMPLES / "synthetic_adult006_14d.csv", min_days=14)
    assert synthetic.report.issues == () and synthetic.cgm_coverage == 1.0


def test_format_detection_and_errors(tmp_path, nightscout_dir):
    with pytest.raises(LogError, match="no such file"):
        read_log(tmp_path / "missing.csv")
    with pytest.raises(LogError, match="format='xml' is not allowed"):
        read_log(nightscout_dir, format="xml")  # type: ignore[arg-type]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LogError, match=r"neither manifest\.json"):
        read_log(empty)
    # content sniffing: a CSV without extension, a JSON file without extension
    plain = tmp_path / "export"
    plain.write_text(HEADER + "\n2026-03-01T08:00:00+01:00,110,,,,\n")
    assert read_log(plain).report.events["cgm_mg_dl"] == 1
    blob = tmp_path / "dump"
    blob.write_text((nightscout_dir / "treatments.json").read_text())
    assert read_log(blob).report.events["bolus_u"] == 2


def test_shipped_examples_are_found_by_name(tmp_path):
    from twinloop.twins.logs import resolve_log_path, shipped_examples

    examples = shipped_examples()
    assert {"synthetic_adult006_14d", "pump_export", "nightscout"} <= set(examples)
    log = read_log(resolve_log_path("synthetic_adult006_14d"))
    assert log.table.num_rows > 1000
    assert resolve_log_path("nightscout").is_dir()
    mine = tmp_path / "synthetic_adult006_14d"
    mine.write_text("x")
    assert resolve_log_path(mine) == mine  # an existing path wins over a name
    assert resolve_log_path("no_such_log") == Path("no_such_log")
