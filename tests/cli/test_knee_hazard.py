"""A knee-exo run whose joint leaves physiology is flagged, and ``--fail-on-hazard`` exits 1
(issue 19): beyond the patient's anatomical range of motion, or a state not a number."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import twinloop.agents.knee.run as knee_run
from twinloop.agents.knee.run import HAZARD_BEYOND_ROM_DEG, anatomical_rom_rad, non_physiological
from twinloop.cli.main import main

ROM = anatomical_rom_rad("moderate")
RUN = ["run", "--therapy", "knee-exo", "--patient", "moderate", "--cycles", "1", "--no-progress"]


def test_the_anatomical_range_is_the_plants_and_the_margin_is_5_degrees():
    assert [round(math.degrees(x), 6) for x in ROM] == [-5.0, 140.0]
    assert HAZARD_BEYOND_ROM_DEG == 5.0


@pytest.mark.parametrize(
    ("lo_deg", "hi_deg", "velocity", "flagged"),
    [
        (0.0, 90.0, 1.0, False),  # an ordinary flexion-extension
        (-9.9, 144.9, 1.0, False),  # within the margin beyond both soft limits
        (-10.1, 30.0, 1.0, True),  # 10.1° of hyperextension
        (10.0, 145.1, 1.0, True),  # beyond the flexion end
        (float("nan"), 30.0, 1.0, True),
        (0.0, float("inf"), 1.0, True),
        (0.0, 30.0, float("nan"), True),
    ],
)
def test_non_physiological_ticks(lo_deg, hi_deg, velocity, flagged):
    ok = np.array([0.0, 0.0]), np.array([0.5, 0.5]), np.array([0.0, 0.0])
    lo, hi, vel = (np.append(a, x) for a, x in zip(ok, (math.radians(lo_deg),
                                                         math.radians(hi_deg), velocity),
                                                   strict=True))  # fmt: skip
    assert non_physiological(ROM, lo, hi, vel).tolist() == [False, False, flagged]


def test_a_knee_run_beyond_the_range_of_motion_is_flagged_and_fails_on_hazard(
    tmp_path, monkeypatch, capsys
):
    # an ordinary cycle (0-68° of flexion) is physiology: not flagged, exit 0 with the flag
    ok = tmp_path / "ok"
    assert main([*RUN, "--out", str(ok), "--fail-on-hazard"]) == 0
    printed = capsys.readouterr().out
    assert "NON-PHYSIOLOGICAL" not in printed
    summary = json.loads((ok / "summary.json").read_text())
    assert summary["hazard_patients"] == []
    assert summary["patients"]["moderate"]["ticks_non_physiological"] == 0
    # the same cycle on a knee whose anatomy ends at 25° of flexion goes 38° beyond it
    monkeypatch.setattr(knee_run, "anatomical_rom_rad", lambda p: (ROM[0], math.radians(25)))
    bad = tmp_path / "bad"
    assert main([*RUN, "--out", str(bad)]) == 0  # flagged, but no --fail-on-hazard
    printed = capsys.readouterr().out
    assert "moderate" in printed and "NON-PHYSIOLOGICAL\n" in printed
    assert "NON-PHYSIOLOGICAL: 1 patient(s) whose knee went more than 5° beyond" in printed
    summary = json.loads((bad / "summary.json").read_text())
    assert summary["hazard_patients"] == ["moderate"]
    assert summary["patients"]["moderate"]["ticks_non_physiological"] > 0
    assert summary["hazard_beyond_rom_deg"] == 5.0
    assert "**NON-PHYSIOLOGICAL**: moderate" in (bad / "report.md").read_text()
    assert main([*RUN, "--out", str(bad), "--overwrite", "--fail-on-hazard"]) == 1
    captured = capsys.readouterr()
    assert "twinloop run: hazard: 1 patient-run(s) flagged (moderate)" in captured.err
    assert "Traceback" not in captured.err
