"""``twinloop run`` ends with the run's report for every therapy, and its console marks what the
twin could not observe."""

import json
import re

import pytest
from PIL import Image

from twinloop.agents.knee.run import capacity_text
from twinloop.cli.main import main


def _valid_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG", path
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        image.load()
        return image.size


def test_a_glucose_run_writes_its_report_and_plots_and_says_where(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["run", "--patient", "adult#001", "--patient", "child#002", "--placement", "inline",
         "--no-progress", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    report = out / "report.md"
    assert report.is_file()
    text = report.read_text()
    # the summary table, one row per patient with the run's own numbers
    summary = json.loads((out / "summary.json").read_text())
    assert "| | mean (mg/dL) | TIR 70–180 (%)" in text
    for name in ("adult#001", "child#002"):
        tir = summary["patients"][name]["time_in_range_70_180_pct"]
        assert re.search(rf"^\| {re.escape(name)} \| [\d.]+ \| {tir:.1f} \|", text, re.M), name
    plots = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["trace_adult-001.png", "trace_child-002.png"]
    for plot in plots:
        assert f"plots/{plot.name}" in text
        width, height = _valid_png(plot)
        assert width > 300 and height > 200
    last = printed.strip().splitlines()[-1]
    assert f"report: {report}" in last and f"2 plot(s) in {out / 'plots'}" in last


def test_a_knee_run_marks_an_unobservable_capacity_on_the_console(tmp_path, capsys):
    out = tmp_path / "exo"
    code = main(
        ["run", "--therapy", "knee-exo", "--patient", "moderate", "--patient", "severe",
         "--cycles", "2", "--controller", "aan", "--placement", "inline", "--no-progress",
         "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    twin = json.loads((out / "summary.json").read_text())["patients"]
    # moderate's intent never exceeds its strength under assistance: not identified; severe's
    # saturates: identified (the estimator's own consistent range says which)
    assert twin["moderate"]["twin"]["voluntary_capacity_identified"] is False
    low, high = twin["moderate"]["twin"]["voluntary_capacity_range"]
    assert high == 1.0 and 0 < low < 0.3
    assert twin["severe"]["twin"]["voluntary_capacity_identified"] is True
    lines = dict(_pairs(printed))
    moderate, severe = lines["moderate"], lines["severe"]
    assert "voluntary capacity 1.00 (not observable at this assistance" in moderate
    assert f"≥ {low:.2f} demonstrated; true 0.30; see report.md)" in moderate
    assert "not observable" not in severe and "(true 0.05)" in severe
    text = (out / "report.md").read_text()
    assert "| moderate | 1.00 [0.30] *not observable at this assistance" in text
    assert re.search(r"^\| severe \| 0\.0\d \[0\.05\] \|", text, re.M)
    assert (out / "plots" / "moderate_twin.png").is_file()


def _pairs(printed):
    """(patient, twin line) for each ``twin:`` line of the table (the patient's row above it)."""
    lines = printed.splitlines()
    return [(lines[i - 1].split()[0], line) for i, line in enumerate(lines) if " twin: " in line]


@pytest.mark.parametrize(
    ("twin", "expected"),
    [
        ({"voluntary_capacity": 1.0, "voluntary_capacity_true": 0.3}, "1.00 (true 0.30)"),
        (
            {"voluntary_capacity": 1.0, "voluntary_capacity_true": 0.3,
             "voluntary_capacity_range": [float("nan"), float("nan")],
             "voluntary_capacity_identified": False},
            "1.00 (not observable at this assistance: too little data yet; true 0.30)",
        ),
        (
            {"voluntary_capacity": 0.3, "voluntary_capacity_true": 0.3,
             "voluntary_capacity_range": [0.28, 0.32], "voluntary_capacity_identified": True},
            "0.30 (true 0.30)",
        ),
    ],
)  # fmt: skip
def test_capacity_text_for_old_recordings_no_evidence_and_identified(twin, expected):
    assert capacity_text(twin) == expected


def test_no_report_skips_the_report_and_says_how_to_write_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--patient", "adult#002", "--placement", "inline", "--no-progress"]
    assert main([*args, "--no-report", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"recording: {out} (no report: --no-report; twinloop report {out} writes it)"
    assert not (out / "report.md").exists() and not (out / "plots").exists()
    # the config file's spelling
    config = tmp_path / "run.yaml"
    config.write_text("no_report: true\n")
    assert main([*args, "--config", str(config), "--out", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "report.md").exists()
    assert main(["report", str(out)]) == 0 and (out / "report.md").is_file()
