"""``twinloop twin individualize``: a twin per patient, a table, reuse, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from twinloop.cli.main import main
from twinloop.twins.identify import read_twin

ROOT = Path(__file__).resolve().parents[2]


def test_individualize_writes_twins_prints_a_table_and_reuses_them(tmp_path, capsys):
    out = tmp_path / "twins"
    args = ["twin", "individualize", "--patient", "adult#004", "--days", "2", "--inline"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["patient", "RMSE", "mg/dL", "fit", "s", "twin"]
    assert lines[1].split()[0] == "adult#004" and lines[1].split()[-1] == "fitted"
    rmse = json.loads((out / "individualize.json").read_text())["patients"]["adult#004"]
    assert f"{rmse['rmse_mg_dl']:.1f}" == lines[1].split()[1]
    assert "twins: 1 fitted, in " in text and str(out) in text
    assert read_twin(out / "adult#004.yaml").model.name == "adult#004"

    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "twins: 0 fitted, 1 reused (already in" in text
    assert text.splitlines()[1].split()[-1] == "reused"

    # the logs just written, given back with --logs: fitted from them
    again = tmp_path / "from_logs"
    assert main([*args, "--logs", str(out / "logs"), "--out", str(again)]) == 0
    doc = json.loads((again / "individualize.json").read_text())
    assert doc["patients"]["adult#004"]["source"] == "log"
    assert (again / "logs" / "adult#004.csv").read_bytes() == (
        out / "logs" / "adult#004.csv"
    ).read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--patient", "adult#999"], "patients: unknown name 'adult#999'"),
        (["--cohort", "elders"], "patients: unknown name 'elders'"),
        ([], "--patient/--cohort: none given"),
        (["--patient", "adult#001", "--logs", "/no/such/dir"], "--logs='/no/such/dir'"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["twin", "individualize", *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinloop twin: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--days", "0"], "argument --days: '0' must be from 1 to 365"),
        (["--workers", "0"], "argument --workers: '0' must be from 1 to 1024"),
    ],
)
def test_counts_out_of_range_are_refused_by_the_parser(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as refused:
        main(["twin", "individualize", "--patient", "adult#001", *extra, "--out",
              str(tmp_path / "o")])  # fmt: skip
    assert refused.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"twinloop twin individualize: error: {message}"
    assert not (tmp_path / "o").exists()


def test_a_logs_directory_without_a_patients_log_is_refused(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "adult#001.csv").write_text("time,cgm_mg_dl\n")
    code = main(
        ["twin", "individualize", "--patient", "adult#001", "--patient", "adult#002", "--logs",
         str(tmp_path / "logs"), "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 2
    assert "a directory holding adult#002.csv" in capsys.readouterr().err


def test_help_and_no_traceback_from_the_command_line(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "twinloop", "twin", "individualize", "--help"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0
    for option in ("--cohort", "--patient", "--days", "--seed", "--out", "--logs", "--inline",
                   "--workers", "--address", "--force"):  # fmt: skip
        assert option in r.stdout, option
    r = subprocess.run(
        [sys.executable, "-m", "twinloop", "twin", "individualize", "--cohort", "adults",
         "--seed", "-3", "--out", "o"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "twinloop twin individualize: error: argument --seed: '-3' must be from 0 to 4294967295"
    )
