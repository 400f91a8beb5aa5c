"""The therapy registry (twinloop.therapy) and the command line's use of it."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import twinloop
from twinloop.cli.main import main
from twinloop.therapy import (
    LAYERS,
    Therapy,
    TherapyError,
    UnknownTherapyError,
    get_therapy,
    register_therapy,
    therapies,
    therapy_names,
    unregister_therapy,
)


def test_the_shipped_therapies_are_found_with_their_parts():
    assert therapy_names()[:2] == ("glucose", "knee-exo")
    glucose, knee = get_therapy("glucose"), get_therapy("knee-exo")
    for therapy in (glucose, knee):
        for layer in ("plant", "policies", "agents", "hil"):
            assert therapy.has(layer), (therapy.name, layer)
    assert glucose.part("plant").time_unit == "min" and knee.part("plant").time_unit == "s"
    assert "mpc" in glucose.part("policies").controllers
    assert "aan" in knee.part("policies").controllers
    assert glucose.part("plant").patient_names(["adults"])[0] == "adult#001"
    assert knee.part("plant").patient_names(["mild", "mild"]) == ("mild",)
    with pytest.raises(TherapyError, match="no evaluation part"):
        knee.part("evaluation")


def test_a_former_spelling_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'insulin' is a deprecated spelling"):
        assert get_therapy("insulin").name == "glucose"
    with pytest.warns(DeprecationWarning, match="knee-exo"):
        assert get_therapy("knee_exo").name == "knee-exo"


def test_an_unknown_therapy_names_the_known_ones():
    with pytest.raises(
        UnknownTherapyError, match="unknown therapy 'ventilator'; therapies: glucose"
    ):
        get_therapy("ventilator")


def test_register_refuses_a_taken_name_and_bad_declarations():
    with pytest.raises(TherapyError, match="taken by 'glucose'"):
        register_therapy(Therapy("insulin", "x", "x"))
    with pytest.raises(TherapyError, match="lowercase"):
        Therapy("Blood Pressure", "x", "bp")
    with pytest.raises(TherapyError, match="unknown layer"):
        Therapy("bp", "x", "bp", parts={"gui": "x"})
    bp = register_therapy(Therapy("bp", "blood pressure", "bp", parts={"plant": "no.such"}))
    try:
        assert get_therapy("bp") is bp and "bp" in therapy_names()
        assert not bp.has("plant") and not bp.has("agents")
        with pytest.raises(TherapyError, match="the bp therapy has no agents part"):
            bp.part("agents")
    finally:
        unregister_therapy("bp")
    assert "bp" not in therapy_names()
    assert set(LAYERS) >= {"plant", "agents", "campaigns"}
    assert all(isinstance(t, Therapy) for t in therapies())


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"twinloop {twinloop.__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "twinloop", "therapies"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("glucose: ") and "knee-exo: " in proc.stdout
    assert "controllers: none, impedance, aan" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--task", "cyclic"], "--task is an option of the knee-exo loop, not of glucose"),
        (["--therapy", "knee-exo", "--days", "2"], "--days is an option of the glucose loop"),
        (["--therapy", "knee-exo", "--cohort", "adults"], "the knee-exo therapy has no cohorts"),
        (["--therapy", "ventilator"], "unknown therapy 'ventilator'"),
        (["--days", "two"], "--days='two' is not allowed: an integer from 1 to 3650"),
        (["--controller", "aan"], "--controller='aan' is not allowed: one of basal-bolus"),
        (["--placement", "ray-patients", "--therapy", "knee-exo"], "one of auto, inline, ray"),
        (["--placement", "inline", "--address", "127.0.0.1:1"], "only with a Ray placement"),
    ],
)
def test_run_refuses_what_the_therapy_does_not_have_in_one_line(argv, needle, capsys, tmp_path):
    assert main(["run", "--out", str(tmp_path / "x"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_config_keys_are_the_option_names_and_former_keys_still_work(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"therapy: knee-exo\npatient: mild\ncycles: 1\ntwin: false\nout: {tmp_path / 'a'}\n"
    )
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "twin off" in out and "mild" in out
    cfg.write_text(f"therapy: knee-exo\npatients: [severe]\ncycles: 1\nout: {tmp_path / 'b'}\n")
    with warnings.catch_warnings():
        assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "key 'patients' is now 'patient'" in captured.err and "severe" in captured.out
    cfg.write_text("therapy: knee-exo\ndays: 2\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "--days is an option of the glucose loop" in capsys.readouterr().err
    cfg.write_text("therapy: knee-exo\nspeed: 2\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'speed'" in err and "cycles" in err and "patient" in err


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("seed: abc", "seed='abc' is not allowed: an integer from 0 to 4294967295"),
        ("seed: true", "seed=True is not allowed"),
        ("progress: 'no'", "progress='no' is not allowed: true or false"),
        ("out: [a, b]", "out=['a', 'b'] is not allowed"),
    ],
)
def test_a_config_files_common_keys_are_checked(tmp_path, capsys, monkeypatch, line, needle):
    monkeypatch.chdir(tmp_path)  # where a default run directory would go
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"therapy: knee-exo\ncycles: 1\n{line}\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before anything was written
