import collections
import json
import re
import shutil
import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from twinloop.agents.errors import AgentError
from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.glucose.report import (
    AGP_BIN_MIN,
    CorruptRecordingError,
    IncompleteRunError,
    MissingRecordingFileError,
    ReportSettingError,
    ambulatory_glucose_profile,
    build_report,
    intervention_category,
)
from twinloop.agents.glucose.run import run_cohort
from twinloop.agents.recording import INCOMPLETE_MARKER, channel_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PER_DAY = 1440


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A real two-day run of one patient, recorded once; tests work on copies."""
    out = tmp_path_factory.mktemp("recorded") / "run"
    run_cohort(LoopConfig(patients=("adult#001",), days=2), out, progress=False)
    return out


@pytest.fixture
def run_dir(recorded_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(recorded_run, copy)
    return copy


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _write_plant_recording(run_dir, bg_by_patient, *, days, rng=None):
    """A recording holding only ``plant->sensor`` (the manifest lists only that channel)."""
    (run_dir / "channels").mkdir(parents=True)
    names = list(bg_by_patient)
    n = len(next(iter(bg_by_patient.values())))
    patient = np.repeat(names, n)
    t_min = np.tile(np.arange(n, dtype=np.float64), len(names))
    bg = np.concatenate([bg_by_patient[p] for p in names])
    order = rng.permutation(bg.size) if rng is not None else np.arange(bg.size)
    table = pa.table(
        {
            "patient": patient[order].tolist(),
            "t_min": t_min[order],
            "bg_mg_dl": bg[order],
            "gsub_mg_dl": bg[order],
        }
    )
    pq.write_table(table, run_dir / "channels" / channel_file("plant->sensor"))
    manifest = {
        "config": {"days": days, "control_period_min": 5, "controller": "synthetic", "seed": 0},
        "channels": ["plant->sensor"],
        "complete": True,
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------
# Summary


def test_the_report_rebuilds_the_runs_summary_identically(run_dir):
    written = (run_dir / "summary.json").read_text()
    (run_dir / "summary.json").unlink()
    result = build_report(run_dir)
    assert result.summary_unchanged is None  # there was nothing to compare with
    assert (run_dir / "summary.json").read_text() == written
    assert result.summary == json.loads(written)
    assert result.complete and result.patients == ("adult#001",) and result.days == 2
    again = build_report(run_dir)
    assert again.summary_unchanged is True


def test_a_wall_clock_run_recorded_out_of_order_gets_the_same_summary(tmp_path):
    # Loops of several patients may record concurrently: rows of the second patient can come
    # first. The summary keeps the configured order and the wall-clock tick lateness.
    cfg = LoopConfig(
        patients=("adult#001", "adult#002"), days=1, clock="wall", wall_s_per_sim_min=1e-4
    )
    run_dir, summary = run_cohort(cfg, tmp_path / "run", progress=False)
    written = (run_dir / "summary.json").read_text()
    assert "tick_lateness_ms" in summary
    rng = np.random.default_rng(0)
    channels = sorted((run_dir / "channels").glob("*.parquet"))
    assert channels, f"no recorded channels in {run_dir}"
    for path in channels:
        table = pq.read_table(path)
        shuffled = table.take(rng.permutation(table.num_rows))
        second_first = np.argsort(
            np.asarray(shuffled["patient"].to_pylist()) != "adult#002", kind="stable"
        )
        pq.write_table(shuffled.take(second_first), path)
    (run_dir / "summary.json").unlink()
    result = build_report(run_dir)
    assert result.patients == ("adult#001", "adult#002")
    assert (run_dir / "summary.json").read_text() == written
    assert "wall-clock tick lateness" in result.report_path.read_text()


def test_the_summary_comes_from_the_plant_recording_not_from_the_old_file(run_dir):
    original = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text('{"stale": true}')
    path = run_dir / "channels" / channel_file("plant->sensor")
    table = pq.read_table(path)
    shifted = pc.add(table.column("bg_mg_dl"), 50.0)
    pq.write_table(table.set_column(2, "bg_mg_dl", shifted), path)
    result = build_report(run_dir)
    assert result.summary_unchanged is False
    mean = result.summary["patients"]["adult#001"]["mean_mg_dl"]
    assert mean == pytest.approx(original["patients"]["adult#001"]["mean_mg_dl"] + 50.0)
    assert result.summary["cohorts"]["adults"]["mean_mg_dl"] == pytest.approx(mean)


# ------------------------------------------------------------------------------------------
# Plots and page


def test_plots_are_valid_pngs_and_the_page_links_them(run_dir):
    result = build_report(run_dir)
    plots = run_dir / "plots"
    expected = {
        plots / "trace_adult-001.png": (1300, 800),
        plots / "agp_adult-001.png": (1100, 500),
        plots / "agp_cohort_adults.png": (1100, 500),
    }
    assert set(result.plots) == set(expected)
    for path, size in expected.items():
        assert _png_size(path) == size
        assert path.stat().st_size > 20_000, f"{path.name} looks empty"
    page = result.report_path.read_text()
    assert result.report_path == run_dir / "report.md"
    for path in expected:
        assert f"]({path.relative_to(run_dir).as_posix()})" in page
    tir = result.summary["patients"]["adult#001"]["time_in_range_70_180_pct"]
    assert f"| adult#001 | {result.summary['patients']['adult#001']['mean_mg_dl']:.1f} |" in page
    assert f"| {tir:.1f} |" in page
    assert "Incomplete run" not in page


def test_the_page_counts_the_supervisors_interventions_by_category(run_dir):
    result = build_report(run_dir)
    reasons = pq.read_table(run_dir / "channels" / channel_file("supervisor->overrides"))
    counts = collections.Counter(intervention_category(r) for r in reasons["reason"].to_pylist())
    assert counts, "the recorded run should contain overrides"
    page = result.report_path.read_text()
    header = next(line for line in page.splitlines() if "low-glucose suspend" in line)
    cats = [c.strip() for c in header.strip("|").split("|")][1:]
    row = next(
        line
        for line in page.splitlines()
        if line.startswith("| adult#001 | ") and line.count("|") == len(cats) + 2
    )
    values = [int(v) for v in row.strip("|").split("|")[1:]]
    assert dict(zip(cats, values, strict=True)) == {c: counts.get(c, 0) for c in cats}
    assert set(cats) == set(counts)


def test_channel_rows_are_grouped_in_run_order_and_sorted_by_time(tmp_path):
    from twinloop.agents.glucose.report import _Channel, _read_table

    (tmp_path / "channels").mkdir()
    rows = {
        "patient": ["b", "a", "b", "a", "a"],
        "t_min": [10.0, 5.0, 0.0, 0.0, 20.0],
        "carbs_g": [1.0, 2.0, 3.0, 4.0, 5.0],
    }
    pq.write_table(pa.table(rows), tmp_path / "channels" / channel_file("meal->controller"))
    channel = _Channel.index(_read_table(tmp_path, "meal->controller", required=True), ["a", "b"])
    assert channel.of(0, "t_min").tolist() == [0.0, 5.0, 20.0]
    assert channel.of(0, "carbs_g").tolist() == [4.0, 2.0, 5.0]
    assert channel.of(1, "carbs_g").tolist() == [3.0, 1.0]


def test_intervention_categories():
    assert intervention_category("low-glucose suspend (CGM < 70)") == "low-glucose suspend"
    assert intervention_category("low-glucose suspend (30-min forecast < 70)") == (
        "low-glucose suspend"
    )
    assert intervention_category("stale CGM: scheduled basal") == "stale CGM"
    assert intervention_category("max insulin on board") == "max insulin on board"


def test_a_one_day_run_has_no_ambulatory_glucose_profile(tmp_path):
    bg = np.full(MIN_PER_DAY + 1, 120.0)
    _write_plant_recording(tmp_path, {"adult#001": bg}, days=1)
    result = build_report(tmp_path)
    assert [p.name for p in result.plots] == ["trace_adult-001.png"]
    assert result.agp_patients == {} and result.agp_cohorts == {}
    assert "No ambulatory glucose profile" in result.report_path.read_text()


# ------------------------------------------------------------------------------------------
# Ambulatory glucose profile


def test_agp_percentiles_on_a_synthetic_recording(tmp_path):
    # Five days; within 15-min bin b of every day glucose is base(b) + that day's offset, so
    # each bin holds 15 samples of each offset (plus the final sample, minute 7200 = 00:00,
    # in bin 0 at base + the median offset). With numpy's linear percentiles:
    #   offsets -40, -20, 0, 20, 40 (75 samples): p5 -40, p25 -20, p50 0, p75 20, p95 40;
    #   the same + 5 for the second patient; pooled (150 samples, sorted groups of 15:
    #   -40 -35 -20 -15 0 5 20 25 40 45): p5 -40, p25 -20, p50 (0+5)/2, p75 25, p95 45.
    days = 5
    base = np.repeat(100.0 + np.arange(MIN_PER_DAY // AGP_BIN_MIN), AGP_BIN_MIN)
    day_offsets = [0.0, 40.0, -20.0, 20.0, -40.0]  # not in sorted order

    def recording(shift):
        days_bg = [base + off + shift for off in day_offsets]
        return np.concatenate([*days_bg, [base[0] + shift]])

    rng = np.random.default_rng(7)
    _write_plant_recording(
        tmp_path, {"adult#001": recording(0.0), "adult#002": recording(5.0)}, days=days, rng=rng
    )
    result = build_report(tmp_path)
    b = 100.0 + np.arange(96)
    a1, a2, cohort = (
        result.agp_patients["adult#001"],
        result.agp_patients["adult#002"],
        result.agp_cohorts["adults"],
    )
    for agp, expected in (
        (a1, (-40, -20, 0, 20, 40)),
        (a2, (-35, -15, 5, 25, 45)),
        (cohort, (-40, -20, 2.5, 25, 45)),
    ):
        got = (agp.p5_mg_dl, agp.p25_mg_dl, agp.median_mg_dl, agp.p75_mg_dl, agp.p95_mg_dl)
        for values, offset in zip(got, expected, strict=True):
            np.testing.assert_allclose(values, b + offset, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(a1.n_samples, [76] + [75] * 95)
    np.testing.assert_array_equal(cohort.n_samples, [152] + [150] * 95)
    np.testing.assert_allclose(a1.hour_of_day[[0, 1, 95]], [0.125, 0.375, 23.875])
    assert {p.name for p in result.plots} == {
        "trace_adult-001.png",
        "trace_adult-002.png",
        "agp_adult-001.png",
        "agp_adult-002.png",
        "agp_cohort_adults.png",
    }


def test_agp_equals_numpy_nanpercentile_with_gaps():
    rng = np.random.default_rng(3)
    bg = rng.uniform(40.0, 350.0, size=(3, 3 * MIN_PER_DAY + 1))
    bg[rng.random(bg.shape) < 0.2] = np.nan
    bg[:, 60:120] = np.nan  # 01:00-02:00 has no sample at all on day 1...
    bg[:, MIN_PER_DAY + 60 : MIN_PER_DAY + 120] = np.nan
    bg[:, 2 * MIN_PER_DAY + 60 : 2 * MIN_PER_DAY + 120] = np.nan  # ... nor on days 2 and 3
    agp = ambulatory_glucose_profile(bg, bin_min=30)
    padded = np.full((3, 4 * MIN_PER_DAY), np.nan)
    padded[:, : bg.shape[1]] = bg
    per_bin = padded.reshape(3, 4, 48, 30).transpose(2, 0, 1, 3).reshape(48, -1)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        want = np.nanpercentile(per_bin, [5, 25, 50, 75, 95], axis=1)
    got = np.stack([agp.p5_mg_dl, agp.p25_mg_dl, agp.median_mg_dl, agp.p75_mg_dl, agp.p95_mg_dl])
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[:, 2:4]).all() and agp.n_samples[2] == 0
    one = ambulatory_glucose_profile(bg[0], bin_min=30)
    assert one.n_samples.sum() == np.isfinite(bg[0]).sum()


@pytest.mark.parametrize("bin_min", [0, 7, 2000, 15.0])
def test_agp_bin_width_must_divide_a_day(bin_min):
    with pytest.raises(ReportSettingError, match="bin_min"):
        ambulatory_glucose_profile(np.full(100, 120.0), bin_min=bin_min)


# ------------------------------------------------------------------------------------------
# Incomplete and broken recordings


def test_an_interrupted_run_is_refused_unless_allowed(tmp_path, monkeypatch):
    original = PatientLoop.steps

    def steps(self):
        if self.patient.name == "adult#002" and self._t_min >= 600:
            raise RuntimeError("power cut")
        return original(self)

    monkeypatch.setattr(PatientLoop, "steps", steps)
    cfg = LoopConfig(patients=("adult#001", "adult#002"), days=2)
    with pytest.raises(RuntimeError, match="power cut"):
        run_cohort(cfg, tmp_path / "run", progress=False)
    run_dir = tmp_path / "run"
    with pytest.raises(IncompleteRunError, match="complete=False") as err:
        build_report(run_dir)
    assert isinstance(err.value, AgentError) and "allow_incomplete" in str(err.value)
    assert not (run_dir / "report.md").exists()
    assert json.loads((run_dir / "summary.json").read_text()) == {"complete": False}

    result = build_report(run_dir, allow_incomplete=True)
    # the loops ran in lockstep: both patients were recorded up to the cut
    assert not result.complete and result.patients == ("adult#001", "adult#002")
    assert result.summary["complete"] is False
    assert set(result.summary["patients"]) == {"adult#001", "adult#002"}
    assert "Incomplete run" in result.report_path.read_text()


@pytest.mark.parametrize("how", ["manifest says incomplete", "marker", "marker, no manifest"])
def test_incomplete_markers_are_refused(run_dir, how):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if how == "manifest says incomplete":
        manifest["complete"] = False
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
    else:
        (run_dir / INCOMPLETE_MARKER).write_text("recording in progress\n")
    if how == "marker, no manifest":
        (run_dir / "manifest.json").unlink()
    with pytest.raises(IncompleteRunError) as err:
        build_report(run_dir)
    assert str(run_dir) in str(err.value)
    assert build_report(run_dir, allow_incomplete=True).complete is False


@pytest.mark.parametrize(
    "channel",
    [
        "plant->sensor",
        "sensor->controller",
        "meal->controller",
        "controller->supervisor",
        "actuator->plant",
        "supervisor->overrides",
    ],
)
def test_a_missing_channel_file_is_named(run_dir, channel):
    path = run_dir / "channels" / channel_file(channel)
    path.unlink()
    with pytest.raises(MissingRecordingFileError, match=re.escape(channel_file(channel))) as err:
        build_report(run_dir)
    assert err.value.path == path and isinstance(err.value, FileNotFoundError)
    assert channel in str(err.value)


def test_a_missing_manifest_or_directory_is_named(run_dir, tmp_path):
    (run_dir / "manifest.json").unlink()
    with pytest.raises(MissingRecordingFileError, match=re.escape("manifest.json")):
        build_report(run_dir)
    with pytest.raises(MissingRecordingFileError, match="run directory"):
        build_report(tmp_path / "nowhere")


def test_a_channel_without_its_column_is_named(run_dir):
    path = run_dir / "channels" / channel_file("sensor->controller")
    pq.write_table(pq.read_table(path).drop_columns(["glucose_mg_dl"]), path)
    with pytest.raises(CorruptRecordingError, match="glucose_mg_dl") as err:
        build_report(run_dir)
    assert err.value.path == path and isinstance(err.value, ValueError)


def test_an_unreadable_manifest_is_named(run_dir):
    (run_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptRecordingError, match=re.escape("manifest.json")):
        build_report(run_dir)
