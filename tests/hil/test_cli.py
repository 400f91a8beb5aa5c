import csv
import subprocess
import sys

import numpy as np
import pytest

from hil.cli import main

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
    assert main(["replay", "--cohort", "all", "--inputs", str(inputs), "--out", str(out)]) == 0
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
        ["replay", "--patient", "adult#001", "--inputs", str(inputs), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err
    assert "Traceback" not in err


def test_unknown_patient_lists_valid_names_without_traceback(tmp_path):
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("minute,insulin_u_per_min,meal_g\n0,0.1,0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hil", "replay", "--patient", "adult#042", "--inputs", str(inputs),
         "--out", str(tmp_path / "o.csv")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "adult#042" in proc.stderr and "child#010" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "hil", "simulate", "--cohort", "elders"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "adolescents, adults, children, all" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_simulate_prints_a_cohort_summary(capsys):
    assert main(["simulate", "--cohort", "adults", "--scenario", "A", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "adult#010" in out and "TIR%" in out
    summary = [line for line in out.splitlines() if line.startswith("adults ")]
    assert len(summary) == 1
    tir = float(summary[0].split()[2])
    assert 40.0 < tir <= 100.0  # open-loop basal-bolus keeps most adults mostly in range
