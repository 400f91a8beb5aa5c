import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinloop.cli.main import main

ACCURACY_BAR_MG_DL = 0.5


def _write_inputs(path, reference, patients=None):
    with path.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["minute", "insulin_u_per_min", "meal_g"] + (["patient"] if patients else []))
        for name in patients or [None]:
            i = reference.patients.index(name) if name else 0
            for m in range(reference.insulin_u_per_min.shape[1]):
                row = [
                    m,
                    repr(float(reference.insulin_u_per_min[i, m])),
                    repr(float(reference.meal_g[i, m])),
                ]
                w.writerow(row + ([name] if name else []))


def _read_out(path):
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["patient"], []).append(float(r["bg_mg_dl"]))
    return rows, out


def test_replay_meets_the_accuracy_bar_for_all_30_patients(tmp_path, reference_a):
    inputs = tmp_path / "inputs.csv"
    _write_inputs(inputs, reference_a, patients=list(reference_a.patients))
    out = tmp_path / "traj.csv"
    assert main(["simulate", "--cohort", "all", "--inputs", str(inputs), "--out", str(out)]) == 0
    rows, bg = _read_out(out)
    assert set(rows[0]) >= {"patient", "minute", "bg_mg_dl", "gsub_mg_dl"}
    assert len(bg) == 30
    for i, name in enumerate(reference_a.patients):
        err = np.abs(np.array(bg[name]) - reference_a.bg_mg_dl[i]).max()
        assert err < ACCURACY_BAR_MG_DL, f"{name}: {err:.4f} mg/dL"


def test_replay_same_inputs_for_named_patients_with_start_clock(tmp_path, reference_a):
    inputs = tmp_path / "inputs.csv"
    _write_inputs(inputs, reference_a)  # adolescent#001's inputs, no patient column
    out = tmp_path / "traj.csv"
    args = ["replay", "--patient", "adolescent#001", "--patient", "adult#001"]
    assert main([*args, "--inputs", str(inputs), "--out", str(out), "--start", "06:30"]) == 0
    rows, bg = _read_out(out)
    assert list(bg) == ["adolescent#001", "adult#001"]
    assert rows[0]["clock"] == "06:30" and rows[1441 - 1]["minute"] == "1440"
    np.testing.assert_allclose(bg["adolescent#001"], reference_a.bg_mg_dl[0], atol=0.5)
    assert rows[1440]["insulin_u_per_min"] == ""  # the last row has no inputs


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("minute,insulin_u_per_min\n0,0.1\n", "missing column(s) meal_g"),
        (
            "minute,insulin_u_per_min,meal_g\n0,0.1,0\n1,abc,0\n",
            "row 3, column 'insulin_u_per_min'",
        ),
        ("minute,insulin_u_per_min,meal_g\n0,-0.1,0\n", "row 2, column 'insulin_u_per_min'"),
        ("minute,insulin_u_per_min,meal_g\n0,0.1,nan\n", "row 2, column 'meal_g'"),
        ("minute,insulin_u_per_min,meal_g\n0,0.1,0\n2,0.1,0\n", "row 3, column 'minute'"),
    ],
)
def test_malformed_inputs_name_row_and_column(tmp_path, capsys, content, needle):
    inputs = tmp_path / "inputs.csv"
    inputs.write_text(content)
    code = main(
        [
            "simulate",
            "--patient",
            "adult#001",
            "--inputs",
            str(inputs),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err
    assert "Traceback" not in err


def test_unknown_patient_lists_valid_names_without_traceback(tmp_path):
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("minute,insulin_u_per_min,meal_g\n0,0.1,0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "twinloop", "simulate", "--patient", "adult#042", "--inputs",
         str(inputs),
         "--out", str(tmp_path / "o.csv")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "adult#042" in proc.stderr and "child#010" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "twinloop", "simulate", "--cohort", "elders"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "adolescents, adults, children, all" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_simulate_prints_a_cohort_summary(capsys):
    def run(*args):
        assert main(["simulate", "--cohort", "adults", *args]) == 0
        return capsys.readouterr().out

    out = run("--seed", "1")
    assert "adult#010" in out and "TIR%" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("adult#")]
    summary = [line.split() for line in out.splitlines() if line.startswith("adults ")]
    assert len(rows) == 10 and len(summary) == 1
    # the cohort line is the mean of the patient lines (mean BG and TIR columns)
    for col in (1, 2):
        assert float(summary[0][col]) == pytest.approx(
            np.mean([float(r[col]) for r in rows]),
            abs=0.1,  # both printed to 0.1
        )
    assert _table(run("--seed", "1")) == _table(out)
    assert _table(run("--seed", "2")) != _table(out)


def _table(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("adult")]


def _replay(tmp_path, content: bytes, out=None):
    inputs = tmp_path / "inputs.csv"
    inputs.write_bytes(content)
    out = out or tmp_path / "o.csv"
    return main(["simulate", "--patient", "adult#001", "--inputs", str(inputs), "--out", str(out)])


def test_rows_are_file_lines_even_after_blank_lines(tmp_path, capsys):
    code = _replay(tmp_path, b"minute,insulin_u_per_min,meal_g\n0,0.1,0\n\n1,x,0\n")
    assert code != 0 and "row 4, column 'insulin_u_per_min'" in capsys.readouterr().err


def test_a_utf8_bom_header_is_read(tmp_path):
    assert _replay(tmp_path, b"\xef\xbb\xbfminute,insulin_u_per_min,meal_g\n0,0.1,0\n") == 0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"minute,insulin_u_per_min,meal_g\n0,0.1,0,7\n", "4 fields but the header has 3"),
        (b"minute,insulin_u_per_min,meal_g\n0,0.1,\xff\xfe\n", "not UTF-8"),
    ],
)
def test_other_malformed_files_fail_cleanly(tmp_path, capsys, content, needle):
    assert _replay(tmp_path, content) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unwritable_output_and_bad_seed_fail_cleanly(tmp_path, capsys):
    content = b"minute,insulin_u_per_min,meal_g\n0,0.1,0\n"
    assert _replay(tmp_path, content, out=tmp_path / "missing" / "o.csv") != 0
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--seed", "-1"])
    assert info.value.code != 0
    assert "must be from 0 to 4294967295" in capsys.readouterr().err


def test_replay_is_a_former_name_of_simulate_inputs(tmp_path, capsys):
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("minute,insulin_u_per_min,meal_g\n0,0.02,0\n1,0.02,0\n")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert (
        main(["simulate", "--patient", "adult#001", "--inputs", str(inputs), "--out", str(a)]) == 0
    )
    assert main(["replay", "--patient", "adult#001", "--inputs", str(inputs), "--out", str(b)]) == 0
    assert "replay is now twinloop simulate --inputs" in capsys.readouterr().err
    assert a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--days", "2"], "--days is for a meal scenario"),
        (["--scenario", "A"], "--scenario is for a meal scenario"),
    ],
)
def test_simulate_inputs_refuses_scenario_options(tmp_path, capsys, extra, needle):
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("minute,insulin_u_per_min,meal_g\n0,0.02,0\n")
    argv = ["simulate", "--patient", "adult#001", "--inputs", str(inputs), "--out", "o.csv"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert main(["simulate", "--start", "07:00"]) == 2
    assert "--start and --eat-rate go with --inputs" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from twinloop.agents.recording import new_run_dir

    pattern = str(tmp_path / "runs" / "run-fixed")  # no strftime field: the same name each time
    first, second, third = (new_run_dir(pattern) for _ in range(3))
    assert [first, second, third] == [pattern, f"{pattern}-2", f"{pattern}-3"]
    assert all(Path(d).is_dir() for d in (first, second, third))


def test_a_config_file_may_say_no_progress(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"therapy: knee-exo\ncycles: 1\nno_progress: true\nout: {tmp_path / 'r'}\n")
    assert main(["run", "--config", str(cfg)]) == 0
    assert (tmp_path / "r" / "manifest.json").is_file()


def test_a_reader_that_stops_early_gets_no_error_line(monkeypatch, capsys):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # like `twinloop campaign --faults | head -1` once head has exited
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert main(["campaign", "--faults"]) == 1
    finally:
        monkeypatch.undo()
        closed.close()
    assert capsys.readouterr().err == ""
