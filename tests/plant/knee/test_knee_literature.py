"""Yardsticks of issue 22: R&E 1999 reference moment, passive moment at rest, reflex onset."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from twinloop.plant.errors import ConfigError
from twinloop.plant.knee.model import PRESETS, _rom_moments, knee_preset
from twinloop.plant.knee.pendulum import PendulumConfig, run_pendulum
from twinloop.plant.knee.stretch import onset_velocity_deg_s, quadriceps_stretch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "knee_passive_moment.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("knee_passive_moment", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Riener & Edrich 1999 knee equation evaluated in the research notes of issue 22 (section 0 /
# 2.1: the equation is tagged [V], copied identically in several independent codes; these
# values are the notes' own evaluation of it, ankle 0°).
RE_POINTS = [
    # (hip °, knee °, N·m)
    (90.0, 0.0, 47.0),
    (90.0, 30.0, 10.1),
    (90.0, 60.0, 0.2),
    (90.0, 90.0, -3.5),
    (0.0, 0.0, 10.4),
    (0.0, 30.0, -2.7),
    (0.0, 60.0, -4.5),
    (0.0, 90.0, -6.2),
]


@pytest.mark.parametrize(("hip", "knee", "moment"), RE_POINTS)
def test_riener_edrich_reference_reproduces_the_tabulated_points(bench, hip, knee, moment):
    assert float(bench.riener_edrich_knee_moment_nm(knee, hip)) == pytest.approx(moment, abs=0.05)


def test_riener_edrich_signs_follow_twinloop_convention(bench):
    knee = np.array([0.0, 120.0])
    m = bench.riener_edrich_knee_moment_nm(knee, 90.0)
    assert m[0] > 0 > m[1]  # hamstrings flex the extended knee; the quadriceps extend at 120°
    # the hamstring term grows with hip flexion: more flexing moment seated than supine
    assert bench.riener_edrich_knee_moment_nm(10.0, 90.0) > bench.riener_edrich_knee_moment_nm(
        10.0, 0.0
    )


@pytest.mark.parametrize("hip", [0.0, 90.0])
def test_the_plants_passive_moment_is_the_reference_and_the_pendulum_rests_where_it_says(
    bench, hip
):
    angles = np.array([0.0, 20.0, 45.0, 90.0, 120.0])
    parts = bench.twinloop_passive_moment_nm(angles, hip)
    # the end stops computed on their own (not as total − R&E) close the sum
    row = knee_preset("healthy", hip_flexion_rad=math.radians(hip)).vector()
    stops = np.array([np.subtract(*_rom_moments(row, math.radians(a))) for a in angles])
    np.testing.assert_allclose(parts["riener_edrich"] + stops, parts["total"], atol=1e-9)
    # the plant's implementation against the benchmark's independent one (degrees form);
    # the end stops (−5°, 140°) add under 0.2 N·m within 0–120°
    ref = bench.riener_edrich_knee_moment_nm(angles, hip)
    np.testing.assert_allclose(parts["riener_edrich"], ref, atol=1e-9)
    assert np.max(np.abs(parts["end_stops"])) < 0.2
    rest = bench.rest_angles_deg()[f"hip_{hip:g}_deg"]
    assert rest["twinloop"] == pytest.approx(rest["riener_edrich"], abs=0.2)
    (m,) = run_pendulum([PendulumConfig(preset="healthy", hip_flexion_deg=hip, duration_s=20.0)])
    assert m.settled
    assert m.plateau_deg == pytest.approx(rest["twinloop"], abs=0.05)


@pytest.fixture(scope="module")
def sweep():
    v = np.arange(1.0, 121.0, 1.0)
    knees = [PendulumConfig(preset=name).params() for name in PRESETS]
    return v, dict(zip(PRESETS, quadriceps_stretch(knees, v), strict=True))


def test_reflex_turns_on_just_above_each_presets_threshold(sweep):
    v, responses = sweep
    assert math.isnan(onset_velocity_deg_s(v, responses["healthy"].peak_reflex_excitation))
    for name in ("mild", "moderate", "severe"):
        threshold = math.degrees(knee_preset(name).spasticity_threshold_rad_s)
        onset = onset_velocity_deg_s(v, responses[name].peak_reflex_excitation)
        assert threshold < onset <= threshold + 1.0, (name, onset, threshold)


def test_reflex_torque_grows_with_velocity_and_severity_after_the_delay(sweep):
    v, responses = sweep
    i = int(np.flatnonzero(v == 100.0)[0])
    torques = [responses[name].peak_reflex_torque_nm[i] for name in PRESETS]
    assert torques[0] == 0.0
    assert 0 < torques[1] < torques[2] < torques[3]
    severe = responses["severe"].peak_reflex_torque_nm
    assert np.all(np.diff(severe[v > 20]) > 0)
    delay = knee_preset("severe").reflex_delay_s
    assert responses["severe"].onset_latency_s[i] == pytest.approx(delay, abs=1.5e-3)


def test_stretch_rejects_bad_sweeps():
    knee = PendulumConfig().params()
    with pytest.raises(ConfigError, match="velocity_deg_s"):
        quadriceps_stretch([knee], [0.0, 10.0])
    with pytest.raises(ConfigError, match="start_deg"):
        quadriceps_stretch([knee], [10.0], start_deg=60.0, excursion_deg=90.0)
