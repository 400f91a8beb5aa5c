import csv
import dataclasses
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from twinloop.agents.glucose.run import METRICS_FLOOR_MG_DL
from twinloop.cli.main import main
from twinloop.evaluation.glucose.evaluate import (
    DOC_BEGIN,
    DOC_END,
    NUMERIC_FIELDS,
    EvaluationConfigError,
    EvaluationProtocol,
    ProtocolError,
    RunResult,
    check_controllers,
    comparison_rows,
    evaluate,
    load_protocol,
    markdown_table,
    shipped_protocols,
    split_model,
    time_in_ranges_figure,
)
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.metrics import glucose_metrics
from twinloop.plant.glucose.scenarios import CarbCountingError
from twinloop.policies.glucose import controllers as ctl

TINY = EvaluationProtocol(
    name="tiny", cohorts=("adult#001", "child#001"), days=1, seeds=(0, 1), description="test"
)
CONTROLLERS = ["basal-bolus", "pid"]
TICKS_PER_DAY = 1440 // 5


def _csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def inline_eval(tmp_path_factory):
    """The tiny protocol, two controllers, inline (no Ray), recordings kept."""
    out = tmp_path_factory.mktemp("eval-inline")
    result = evaluate(CONTROLLERS, TINY, out, use_ray=False, progress=False, command="test")
    return out, result


# --- the protocol ---------------------------------------------------------------------------


def test_shipped_protocol_is_the_standard_one():
    assert "t1d-standard" in shipped_protocols()
    p = load_protocol()  # the default
    assert p.name == "t1d-standard"
    assert p.cohorts == ("adults", "adolescents", "children")
    assert p.days == 7
    assert p.seeds == (0, 1, 2)
    assert p.scenario == "random"
    assert p.carb_error == CarbCountingError("uniform", 0.3)
    assert p.cgm == CGMSpec()
    assert p.control_period_min == 5
    config = p.loop_config("pid", "children", 2)
    assert (config.patients, config.days, config.seed, config.controller) == (
        ("children",),
        7,
        2,
        "pid",
    )
    assert config.carb_error == p.carb_error and config.cgm == p.cgm


def _yaml(tmp_path, text):
    path = tmp_path / "protocol.yaml"
    path.write_text("name: custom\ncohorts: [adults]\ndays: 1\nseeds: [0]\n" + text)
    return path


def test_a_user_protocol_file_loads(tmp_path):
    path = _yaml(tmp_path, "cgm: {noise: false}\ncarb_error: {kind: normal, magnitude: 0.1}\n")
    p = load_protocol(path)
    assert p.name == "custom" and p.cgm == CGMSpec(noise=False)
    assert p.carb_error == CarbCountingError("normal", 0.1)
    assert p.to_dict()["cgm"]["noise"] is False


@pytest.mark.parametrize(
    ("extra", "field", "value_text", "allowed_text"),
    [
        ("dayz: 3\n", "dayz", "3", "keys name, description, cohorts"),
        ("scenario: B\n", "scenario", "'B'", "random"),
        ("control_period_min: 2\n", "control_period_min", "2", "CGM sample period"),
        ("carb_error: {kind: wild}\n", "carb_error.kind", "'wild'", "uniform"),
        ("carb_error: {kind: uniform, magnitude: -1}\n", "carb_error.magnitude", "-1", ">= 0"),
        ("cgm: {colour: red}\n", "cgm.colour", "'red'", "sample_period_min"),
        ("cgm: noisy\n", "cgm", "'noisy'", "'default' or a mapping"),
    ],
)
def test_protocol_errors_name_field_value_and_allowed(
    tmp_path, extra, field, value_text, allowed_text
):
    path = _yaml(tmp_path, extra)
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    assert info.value.field == field
    message = str(info.value)
    assert str(path) in message and f"{field}={value_text}" in message
    assert allowed_text in message


@pytest.mark.parametrize(
    ("changes", "field", "allowed_text"),
    [
        ({"days": 0}, "days", "integer of days in 1..365"),
        ({"days": 1.5}, "days", "integer of days in 1..365"),
        ({"days": 366}, "days", "integer of days in 1..365"),
        ({"days": 1_000_000_000}, "days", "integer of days in 1..365"),
        ({"seeds": (0, -1)}, "seeds", "integers in 0..4294967295"),
        ({"seeds": (0, 2**32)}, "seeds", "integers in 0..4294967295"),
        ({"seeds": (1, 1)}, "seeds", "distinct"),
        ({"seeds": ()}, "seeds", "at most 100"),
        ({"seeds": tuple(range(101))}, "seeds", "at most 100"),
        ({"cohorts": ("martians",)}, "cohorts", "adolescents, adults, children"),
        ({"cohorts": ()}, "cohorts", "at least one"),
        ({"cohorts": "adults"}, "cohorts", "a list"),
        ({"name": ""}, "name", "non-empty"),
        ({"controller_deadline_s": 0}, "controller_deadline_s", "seconds > 0"),
        ({"controller_deadline_s": 301}, "controller_deadline_s", "<= the control period"),
        ({"model": "truth"}, "model", "population (default), population:sample, twin:PATH"),
        ({"fit_days": 0}, "fit_days", "1..90"),
    ],
)
def test_protocol_validation(changes, field, allowed_text):
    with pytest.raises(ProtocolError) as info:
        dataclasses.replace(TINY, **changes)
    assert info.value.field == field
    assert allowed_text in str(info.value)


def test_the_bounds_of_a_protocol_file_are_refused_at_load_naming_the_field(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: huge\ncohorts: [adults]\ndays: 1000000000\nseeds: [0]\n")
    with pytest.raises(ProtocolError, match=r"huge.yaml: days=1000000000 is not allowed: an "
                       r"integer of days in 1\.\.365"):  # fmt: skip
        load_protocol(path)
    path.write_text(f"name: many\ncohorts: [adults]\ndays: 1\nseeds: {list(range(500))}\n")
    with pytest.raises(ProtocolError) as info:
        load_protocol(path)
    assert "seeds=500 seeds is not allowed" in str(info.value)  # the count, not the list
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--days", "366"], "--days: days=366 is not allowed: an integer of days in 1..365"),
        (["--days", "1e9"], "--days='1e9' is not allowed: an integer >= 1"),
        (["--days", "1000000000"], "--days: days=1000000000 is not allowed"),
        (
            ["--seed", "4294967296"],
            "--seed: seeds=4294967296 is not allowed: distinct integers "
            "in 0..4294967295, at most 100",
        ),
        (["--seed", ",".join(map(str, range(101)))], "--seed: seeds=101 seeds is not allowed"),
    ],
)
def test_cli_bounds_are_refused_at_parse_in_one_line_naming_the_option(tmp_path, capsys, args,
                                                                       expected):  # fmt: skip
    out = tmp_path / "never"
    argv = ["evaluate", "--controller", "basal-bolus", "--cohort", "adult#001", *args,
            "--inline", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("twinloop evaluate: error: ") and expected in line
    assert "Traceback" not in captured.err and not out.exists()  # nothing ran


def test_missing_key_unreadable_and_invalid_yaml(tmp_path):
    bad = tmp_path / "no-days.yaml"
    bad.write_text("name: x\ncohorts: [adults]\nseeds: [0]\n")
    with pytest.raises(ProtocolError, match="days=None is not allowed: a value"):
        load_protocol(bad)
    with pytest.raises(ProtocolError, match="a readable YAML file"):
        load_protocol(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ProtocolError, match="valid YAML"):
        load_protocol(broken)
    with pytest.raises(ProtocolError, match="days=0"):
        TINY.with_overrides(days=0)


# --- outputs of an evaluation ---------------------------------------------------------------


def test_per_patient_csv_holds_every_run_and_patient(inline_eval):
    out, result = inline_eval
    rows = _csv(out / "per_patient.csv")
    keys = [(r["controller"], r["cohort"], r["seed"], r["patient"]) for r in rows]
    assert keys == [
        (c, k, str(s), k) for c in CONTROLLERS for k in TINY.cohorts for s in TINY.seeds
    ]
    assert {r["status"] for r in rows} == {"ok"}
    assert not result.failed
    for column in ("time_in_range_70_180_pct", "lbgi", "gri", "cv_pct", "tdi_u_per_day"):
        assert all(math.isfinite(float(r[column])) for r in rows)
    assert all(int(r["n_samples"]) == 1441 for r in rows)


def test_metrics_recomputed_from_the_recording_match_the_csv(inline_eval):
    out, _ = inline_eval
    row = next(
        r
        for r in _csv(out / "per_patient.csv")
        if (r["controller"], r["cohort"], r["seed"]) == ("pid", "child#001", "1")
    )
    run_dir = out / "runs" / "pid" / "child_001" / "seed-1"
    plant = pq.read_table(run_dir / "channels" / "plant__sensor.parquet").to_pydict()
    bg = np.array(plant["bg_mg_dl"])
    m = glucose_metrics(np.maximum(bg, METRICS_FLOOR_MG_DL), sample_period_min=1.0)
    for field in ("time_in_range_70_180_pct", "time_below_70_pct", "lbgi", "hbgi", "cv_pct"):
        assert float(row[field]) == pytest.approx(getattr(m, field), rel=1e-12), field
    assert row["cvga_zone"] == m.cvga_zone
    pump = pq.read_table(run_dir / "channels" / "actuator__plant.parquet").to_pydict()
    tdi = sum(pump["basal_u"]) + sum(pump["bolus_u"])
    assert float(row["tdi_u_per_day"]) == pytest.approx(tdi / TINY.days, rel=1e-12)
    # the same numbers as the run's own summary (twinloop run's conventions)
    summary = json.loads((run_dir / "summary.json").read_text())["patients"]["child#001"]
    assert float(row["time_in_range_70_180_pct"]) == pytest.approx(
        summary["time_in_range_70_180_pct"], rel=1e-12
    )


def test_comparison_csv_and_table_agree_with_the_per_patient_rows(inline_eval):
    out, _ = inline_eval
    per_patient = _csv(out / "per_patient.csv")
    comparison = _csv(out / "comparison.csv")
    assert len(comparison) == len(CONTROLLERS) * len(TINY.cohorts)
    table = (out / "results.md").read_text()
    for row in comparison:
        mine = [
            r
            for r in per_patient
            if (r["controller"], r["cohort"]) == (row["controller"], row["cohort"])
        ]
        for field in ("time_in_range_70_180_pct", "time_below_70_pct", "tdi_u_per_day"):
            seed_means = [float(r[field]) for r in mine]  # one patient per cohort here
            assert float(row[field]) == pytest.approx(np.mean(seed_means), rel=1e-12)
            assert float(row[f"{field}_sd"]) == pytest.approx(np.std(seed_means, ddof=1))
        tir = float(row["time_in_range_70_180_pct"])
        sd = float(row["time_in_range_70_180_pct_sd"])
        assert f"{tir:.1f} ± {sd:.1f}" in table
    for cohort in TINY.cohorts:
        ranked = [r for r in comparison if r["cohort"] == cohort]
        tirs = [float(r["time_in_range_70_180_pct"]) for r in ranked]
        assert tirs == sorted(tirs, reverse=True)
        assert [r["rank"] for r in ranked] == ["1", "2"]
        assert [r["best"] for r in ranked] == ["True", "False"]
        best = ranked[0]["controller"]
        assert f"| {cohort} | 1 ★ | **`{best}`** |" in table


def test_manifest_and_plots(inline_eval):
    out, result = inline_eval
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"] == TINY.to_dict()
    assert manifest["controllers"] == CONTROLLERS
    assert manifest["command"] == "test"
    assert manifest["execution"] == "inline"
    assert manifest["wall_time_s"] > 0
    assert {"git_revision", "versions", "runs", "started_utc"} <= set(manifest)
    assert "numpy" in manifest["versions"]
    assert len(manifest["runs"]) == 8 and {r["status"] for r in manifest["runs"]} == {"ok"}
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["agp_adult_001.png", "agp_child_001.png", "cvga.png", "time_in_ranges.png"]
    for name in pngs:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in result.files} >= {"per_patient.csv", "manifest.json", "cvga.png"}


@pytest.mark.parametrize(
    ("cohorts", "controllers"),
    [
        (("adults",), ["basal-bolus"]),
        (("adults",), ["basal-bolus", "pid"]),  # 2.6 in wide before: the title was clipped
        (("adult#001", "child#001"), CONTROLLERS),
        (("adults", "adolescents", "children"),
         ["basal-bolus", "pid", "oref0", "mpc", "policy:runs/train/ppo/seed_0"]),
    ],
)  # fmt: skip
def test_the_time_in_ranges_title_and_everything_drawn_lie_inside_the_figure(
    cohorts, controllers, tmp_path
):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    protocol = EvaluationProtocol(name="t1d-standard", cohorts=cohorts, days=1, seeds=(0,))
    rows = [
        {"controller": c, "cohort": h, "time_below_54_pct": 1.0, "time_below_70_pct": 3.0,
         "time_in_range_70_180_pct": 80.0, "time_above_180_pct": 15.0, "time_above_250_pct": 2.0}
        for c in controllers for h in cohorts
    ]  # fmt: skip
    fig = time_in_ranges_figure(rows, controllers, protocol)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    inside = fig.bbox
    title = fig.get_suptitle()
    assert "Time in ranges" in title and "t1d-standard" in title
    (text,) = [t for t in fig.texts if t.get_text() == title]
    box = text.get_window_extent(renderer)
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1, (box, inside)
    assert inside.y0 <= box.y0 and box.y1 <= inside.y1, (box, inside)
    drawn = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    assert inside.x0 <= drawn.x0 and drawn.x1 <= inside.x1 + 1e-6, (drawn, inside)
    assert inside.y0 <= drawn.y0 and drawn.y1 <= inside.y1 + 1e-6, (drawn, inside)
    # the PNG is the figure, not a bbox grown around artists that overflow it
    path = tmp_path / "tir.png"
    fig.savefig(path, dpi=fig.dpi)
    with Image.open(path) as image:
        assert image.size == (round(inside.width), round(inside.height))


# --- ranking --------------------------------------------------------------------------------


def _fake_run(controller, seed, tir, below_70, error=None):
    row = dict.fromkeys(NUMERIC_FIELDS, 0.0)
    row |= {"time_in_range_70_180_pct": tir, "time_below_70_pct": below_70}
    rows = [] if error else [row]
    bg = None if error else np.full((1, 1441), 120.0, dtype=np.float32)
    return RunResult(controller, "adult#001", seed, rows, bg, error=error)


def test_ranking_by_tir_then_less_time_below_70_failed_last():
    p = dataclasses.replace(TINY, cohorts=("adult#001",), seeds=(0,))
    results = [
        _fake_run("a", 0, 90.01, 3.0),  # ties with b at 0.1 %, more time below 70
        _fake_run("b", 0, 89.99, 1.0),
        _fake_run("c", 0, 95.0, 9.0),
        _fake_run("d", 0, 99.0, 0.0, error="RuntimeError: boom"),
    ]
    rows = comparison_rows(results, ["a", "b", "c", "d"], p)
    assert [(r["controller"], r["rank"]) for r in rows] == [("c", 1), ("b", 2), ("a", 3), ("d", "")]
    assert [r["best"] for r in rows] == [True, False, False, False]
    assert math.isnan(rows[0]["time_in_range_70_180_pct_sd"])  # one seed: no spread
    table = markdown_table(rows, p)
    assert "| adult#001 | 1 ★ | **`c`** |" in table
    assert "| adult#001 | — | `d` |" in table and "✖ 1/1 runs failed" in table
    assert "RuntimeError: boom" in table


# --- failing controllers --------------------------------------------------------------------


class _RaisesInDecide:
    def decide(self, obs):
        raise RuntimeError(f"boom at {obs.t_min:g} min")


def _raises_on_make(patient):
    raise RuntimeError(f"cannot make a controller for {patient.name}")


def test_a_failing_controller_is_recorded_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(ctl.CONTROLLERS, "raises-in-decide", lambda patient: _RaisesInDecide())
    monkeypatch.setitem(ctl.CONTROLLERS, "raises-on-make", _raises_on_make)
    p = dataclasses.replace(TINY, cohorts=("adult#001",), seeds=(0,))
    names = ["basal-bolus", "raises-in-decide", "raises-on-make"]
    result = evaluate(names, p, tmp_path, use_ray=False, progress=False, recordings=False)
    rows = {r["controller"]: r for r in _csv(tmp_path / "per_patient.csv")}
    assert rows["basal-bolus"]["status"] == "ok" and rows["basal-bolus"]["controller_faults"] == "0"
    decide = rows["raises-in-decide"]
    assert decide["status"] == "ok"
    assert int(decide["controller_faults"]) == TICKS_PER_DAY
    assert decide["first_controller_fault"] == "RuntimeError: boom at 0 min"
    assert int(decide["overrides_no_command"]) == TICKS_PER_DAY  # the supervisor stood in
    make = rows["raises-on-make"]
    assert make["status"] == "error" and make["time_in_range_70_180_pct"] == ""
    assert "cannot make a controller for adult#001" in make["error"]
    assert [r.controller for r in result.failed] == ["raises-on-make"]
    table = (tmp_path / "results.md").read_text()
    assert "✖ 1/1 runs failed" in table and "† faults in 1 patient-runs" in table
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    failed = [r for r in manifest["runs"] if r["status"] == "error"]
    assert len(failed) == 1 and "RuntimeError" in failed[0]["traceback"]
    assert not (tmp_path / "runs").exists()  # recordings=False


def test_cli_exits_1_when_a_run_errored(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ctl.CONTROLLERS, "raises-on-make", _raises_on_make)
    argv = ["evaluate", "--cohort", "adult#001", "--days", "1", "--seed", "0", "--inline",
            "--no-progress", "--no-recordings"]  # fmt: skip
    bad = tmp_path / "bad"
    assert main([*argv, "--controller", "raises-on-make", "--out", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "✖ 1/1 runs failed" in captured.out  # the table marks it
    assert "twinloop evaluate: failed: 1 of 1 run(s) errored" in captured.err
    assert "Traceback" not in captured.err
    rows = _csv(bad / "per_patient.csv")  # the outputs are still written
    assert [r["status"] for r in rows] == ["error"]


# --- on Ray ---------------------------------------------------------------------------------


@pytest.mark.ray
def test_same_numbers_inline_and_on_ray_with_1_or_2_workers(inline_eval, tmp_path, ray_started):
    out, _ = inline_eval
    expected = (out / "per_patient.csv").read_bytes()
    for workers in (2, 1):
        ray_out = tmp_path / f"w{workers}"
        evaluate(CONTROLLERS, TINY, ray_out, workers=workers, progress=False, recordings=False)
        assert (ray_out / "per_patient.csv").read_bytes() == expected, f"workers={workers}"
        assert (ray_out / "comparison.csv").read_bytes() == (out / "comparison.csv").read_bytes()
        manifest = json.loads((ray_out / "manifest.json").read_text())
        assert manifest["execution"] == "ray embedded" and manifest["workers"] == workers


@pytest.mark.ray
def test_a_run_failing_in_a_ray_worker_is_recorded(tmp_path, ray_started):
    bogus = tmp_path / "not-a-policy.zip"
    bogus.write_bytes(b"this is not a saved policy")
    p = dataclasses.replace(TINY, cohorts=("adult#001",), seeds=(0,))
    result = evaluate(["basal-bolus", f"policy:{bogus}"], p, tmp_path / "out", progress=False)
    assert [r.controller for r in result.failed] == [f"policy:{bogus}"]
    rows = _csv(tmp_path / "out" / "per_patient.csv")
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["error"]


@pytest.mark.ray
@pytest.mark.slow
def test_shipped_protocol_one_day_one_seed_on_ray(tmp_path, ray_started):
    p = load_protocol().with_overrides(days=1, seeds=[0])
    result = evaluate(["basal-bolus"], p, tmp_path, progress=False, recordings=False)
    rows = _csv(tmp_path / "per_patient.csv")
    assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}
    assert [r["cohort"] for r in result.comparison] == ["adults", "adolescents", "children"]


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--controller", "basal-bolus,nope"], "basal-bolus, pid, oref0"),
        (["--controller", "pid", "--controller", "pid"], "distinct names"),
        (["--controller", ","], "--controller NAME"),
        ([], "--controller NAME"),
        (["--controller", "pid", "--seed", "0", "--seed", "x"], "--seed='0,x'"),
        (["--controller", "pid", "--days", "0"], "--days='0'"),
        (["--controller", "pid", "--workers", "0"], "--workers='0'"),
        (["--controller", "pid", "--cohort", "martians"], "cohorts='martians'"),
        (["--controller", "pid", "--protocol", "/nonexistent.yaml"], "a readable YAML file"),
        (["--controller", "policy:/nonexistent.zip"], "existing file"),
        (["--controller", "pid", "--therapy", "knee-exo"], "knee-exo therapy has no evaluation"),
    ],
)
def test_cli_errors_are_one_line_exit_2(capsys, args, expected):
    assert main(["evaluate", *args, "--inline"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("twinloop evaluate: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_runs_prints_the_table_and_updates_the_doc(tmp_path, capsys):
    doc = tmp_path / "evaluation.md"
    doc.write_text(f"# Results\n\nbefore\n\n{DOC_BEGIN}\nold table\n{DOC_END}\n\nafter\n")
    out = tmp_path / "eval"
    args = ["evaluate", "--controller", "basal-bolus", "--cohort", "adult#001", "--days", "1"]
    args += ["--seed", "3", "--out", str(out), "--inline", "--no-progress", "--doc", str(doc)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "| adult#001 | 1 ★ | **`basal-bolus`** |" in printed
    assert str(out) in printed
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Results\n\nbefore")
    assert text.endswith(f"{DOC_END}\n\nafter\n")
    assert "twinloop evaluate --controller basal-bolus --cohort 'adult#001' --seed 3 --out" in text
    assert "--days 1" in text
    assert table.split("\n\n", 1)[1].strip() in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["seeds"] == [3] and manifest["protocol"]["days"] == 1
    assert manifest["command"].startswith("twinloop evaluate --controller basal-bolus")


def test_cli_doc_without_markers_is_an_error(tmp_path, capsys):
    doc = tmp_path / "plain.md"
    doc.write_text("# no markers\n")
    args = ["evaluate", "--controller", "basal-bolus", "--cohort", "adult#001", "--days", "1"]
    args += ["--seed", "0", "--out", str(tmp_path / "o"), "--inline", "--no-progress"]
    assert main([*args, "--doc", str(doc)]) == 2
    assert DOC_BEGIN in capsys.readouterr().err
    assert doc.read_text() == "# no markers\n"
    assert not (tmp_path / "o").exists()  # checked before anything runs


def test_evaluate_rejects_bad_workers(tmp_path):
    with pytest.raises(EvaluationConfigError, match="workers=0"):
        evaluate(["pid"], TINY, tmp_path, workers=0, use_ray=False)


def test_the_protocols_deadline_reaches_the_loop():
    config = dataclasses.replace(TINY, controller_deadline_s=7.5).loop_config("pid", "adults", 0)
    assert config.controller_deadline_s == 7.5
    assert load_protocol("t1d-standard").controller_deadline_s == 60.0


def test_cli_former_plural_options_still_work_with_a_warning(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--controllers", "basal-bolus", "--cohorts", "adult#001", "--days", "1"]
    args += ["--seeds", "2", "--out", str(out), "--inline", "--no-progress", "--no-recordings"]
    assert main(args) == 0
    err = capsys.readouterr().err
    for old, new in (("controllers", "controller"), ("cohorts", "cohort"), ("seeds", "seed")):
        assert f"--{old} is deprecated; use --{new}" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["seeds"] == [2]
    assert manifest["command"].startswith("twinloop evaluate --controller basal-bolus --cohort")


def test_the_protocols_model_and_a_controllers_own_model_reach_the_loop(tmp_path):
    assert load_protocol("t1d-standard").model == "population"
    protocol = dataclasses.replace(TINY, model="population:sample")
    assert protocol.loop_config("mpc", "adults", 0).model == "population:sample"
    assert protocol.loop_config("mpc@oracle", "adults", 0).model == "oracle"
    assert protocol.loop_config("mpc@oracle", "adults", 0).controller == "mpc"
    assert split_model("policy:t1d_ppo@population") == ("policy:t1d_ppo", "population")
    assert split_model("policy:/a/b@c") == ("policy:/a/b@c", None)  # not a model: the name
    fitted = dataclasses.replace(TINY, model="fit")
    with pytest.raises(EvaluationConfigError, match="fitted before the runs"):
        fitted.loop_config("mpc", "adults", 0)
    config = fitted.loop_config("mpc", "adults", 0, fitted=f"twin:{tmp_path}")
    assert config.model == f"twin:{tmp_path}"
    check_controllers(["mpc", "mpc@oracle"])
    with pytest.raises(EvaluationConfigError, match="optionally @MODEL"):
        check_controllers(["mpcc@oracle"])


def test_a_model_yaml_key_loads_and_the_cli_overrides_it(tmp_path, capsys):
    protocol = load_protocol(_yaml(tmp_path, "model: oracle\n"))
    assert protocol.model == "oracle" and protocol.to_dict()["model"] == "oracle"
    code = main(
        ["evaluate", "--controller", "mpc", "--protocol", str(_yaml(tmp_path, "")), "--inline",
         "--model", "twin:/nowhere", "--out", str(tmp_path / "o"), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "twin:/nowhere" in err and len(err.strip().splitlines()) == 1


def test_model_fit_fits_each_patients_twin_before_the_runs(tmp_path):
    protocol = dataclasses.replace(
        TINY, cohorts=("adult#003",), days=1, seeds=(0,), model="fit", fit_days=2
    )
    result = evaluate(["mpc", "mpc@oracle"], protocol, tmp_path, use_ray=False, progress=False)
    assert (tmp_path / "twins" / "adult#003.yaml").is_file()
    rows = {r["controller"]: r for r in result.comparison}
    assert set(rows) == {"mpc", "mpc@oracle"} and not result.failed
    # the fitted twin and the oracle are different models: different trajectories
    assert rows["mpc"]["mean_mg_dl"] != pytest.approx(rows["mpc@oracle"]["mean_mg_dl"], abs=1e-9)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["protocol"]["model"] == "fit"


def test_the_progress_bar_starts_after_ray_and_says_what_it_waits_for(monkeypatch, capsys):
    """The seconds of Ray's start are announced, and not counted in the bar's rate and ETA."""
    import ray

    from twinloop.agents import placement
    from twinloop.evaluation.glucose import evaluate as ev

    class Started(Exception):
        pass

    def start_ray(address=None, *, num_cpus=None):
        raise Started  # stop here: what was printed before Ray started is what we check

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(placement, "start_ray", start_ray)
    with pytest.raises(Started):
        ev._execute([], use_ray=True, address=None, workers=1, progress=True)
    err = capsys.readouterr().err
    assert "evaluate: starting Ray (embedded, 127.0.0.1; Ray's messages: " in err
    assert "run/s" not in err and "0/0" not in err  # no bar yet
