"""`twinloop emulate` and `twinloop hil` from the command line: a session, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinloop.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.hil
def test_a_hil_session_in_two_commands(tmp_path, capsys):
    pump_link, cgm_link = str(tmp_path / "pump"), str(tmp_path / "cgm")
    emulator = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", "pump", "--rtu-pty", pump_link, "--cgm-pty",
         cgm_link, "--time-scale", "0.05"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        banner = emulator.stdout.readline()
        assert "pump: Modbus RTU" in banner and "cgm: line protocol" in banner
        out = tmp_path / "run"
        rc = main(
            ["hil", "--port", pump_link, "--cgm-port", cgm_link, "--time-scale", "0.05",
             "--minutes", "30", "--out", str(out)]
        )  # fmt: skip
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "timing: 30 steps" in printed and "CGM:" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert manifest["complete"] is True
    assert summary["timing"]["ticks"] == 30 and summary["cgm_readings"] >= 4
    assert (out / "channels" / "clock__ticks.parquet").exists()
    assert (out / "channels" / "supervisor__actuator.parquet").exists()
    assert not os.path.exists(out / "INCOMPLETE")

    # `twinloop report` rebuilds the session's report from the recording alone
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Timing" in report and "## Alarms" in report and "readings" in report
    assert (out / "plots" / "timing.png").stat().st_size > 0
    assert (out / "plots" / "glucose_insulin.png").stat().st_size > 0
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt["timing"]["ticks"] == summary["timing"]["ticks"]
    assert rebuilt["timing"]["lateness_ms"]["max"] == pytest.approx(
        summary["timing"]["lateness_ms"]["max"]
    )
    assert rebuilt["cgm_readings"] == summary["cgm_readings"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["emulate", "pump"], "--rtu PORT"),
        (["emulate", "cgm"], "--serial PORT"),
        (["hil", "--profile", "toaster", "--cgm-port", "/nonexistent"], "profile"),
        (["hil", "--controller", "magic", "--cgm-port", "/x"], "controller"),
    ],
)
def test_bad_input_is_one_line_without_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_malformed_profile_names_the_field(tmp_path, capsys):
    bad = tmp_path / "pump.yaml"
    bad.write_text(
        "name: p\nkind: insulin_pump\ntransport: {kind: modbus-tcp, port: 5020}\n"
        "registers:\n  - {name: a, table: holding, address: 0, dtype: uint16, access: rw,"
        " maximum: 70000}\n"
    )
    assert main(["hil", "--profile", str(bad), "--cgm-port", "/x"]) == 2
    err = capsys.readouterr().err
    assert "registers[0].maximum" in err and "Traceback" not in err
