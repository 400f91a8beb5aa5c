import math

import numpy as np
import pytest

from twinloop.plant.errors import ConfigError
from twinloop.plant.knee.metrics import exo_metrics

DT = 0.01
LIMITS = {"rom_rad": (-0.1, 2.0), "velocity_limit_rad_s": 6.0, "torque_limit_nm": 40.0}


def _trial(k=500, **over):
    t = np.arange(k) * DT
    ref = 0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)
    vel = np.gradient(ref, DT)
    base = {
        "dt_s": DT,
        "angle_rad": ref,
        "reference_rad": ref,
        "velocity_rad_s": vel,
        "exo_torque_nm": np.zeros(k),
        "muscle_torque_nm": np.zeros(k),
        **LIMITS,
    }
    base.update(over)
    return base


def test_rms_error_is_in_degrees():
    args = _trial()
    args["angle_rad"] = args["reference_rad"] + math.radians(3.0)
    m = exo_metrics(**args)
    assert m.rms_error_deg == pytest.approx(3.0)
    assert m.max_error_deg == pytest.approx(3.0)


def test_work_counts_positive_power_only_and_splits_between_exo_and_patient():
    args = _trial()
    vel = args["velocity_rad_s"]
    # the exo pushes along the motion with 2 N·m, the patient with 6 N·m; both brake too
    args["exo_torque_nm"] = 2.0 * np.sign(vel)
    args["muscle_torque_nm"] = 6.0 * np.sign(vel)
    m = exo_metrics(**args)
    assert m.exo_work_fraction == pytest.approx(0.25)
    assert m.exo_work_j == pytest.approx(2.0 * np.abs(vel).sum() * DT)
    braking = dict(args, exo_torque_nm=-2.0 * np.sign(vel))
    assert exo_metrics(**braking).exo_work_j == 0.0
    assert exo_metrics(**braking).exo_work_fraction == 0.0
    idle = _trial()
    assert exo_metrics(**idle).exo_work_fraction == 0.0  # no work at all: 0, not NaN


def test_effort_from_activations_or_torque():
    args = _trial(k=100)
    m = exo_metrics(**args, activations=(np.full(100, 0.3), np.full(100, 0.4)))
    assert m.patient_effort == pytest.approx(0.25)
    assert m.effort_unit == "activation²"
    m2 = exo_metrics(**dict(args, muscle_torque_nm=np.full(100, -5.0)))
    assert m2.patient_effort == pytest.approx(5.0)
    assert m2.effort_unit == "N·m"


def test_spasticity_events_count_reflex_onsets_not_samples():
    reflex = np.zeros(300)
    reflex[10:40] = 3.0  # one burst
    reflex[100:101] = 1.0  # a short one
    reflex[200:260] = 0.3  # below the event threshold
    m = exo_metrics(**_trial(k=300), reflex_torque_nm=reflex)
    assert m.spasticity_events == 2
    reflex[0] = 2.0  # a burst at the first sample counts too
    assert exo_metrics(**_trial(k=300), reflex_torque_nm=reflex).spasticity_events == 3


def test_limit_violations_are_counted_per_kind():
    args = _trial(k=200)
    theta = args["angle_rad"].copy()
    theta[5] = 2.1  # beyond the range of motion
    vel = args["velocity_rad_s"].copy()
    vel[7:9] = -7.0
    tau = np.zeros(200)
    tau[50] = 40.0  # at the limit: fine
    tau[51] = -40.5
    m = exo_metrics(**dict(args, angle_rad=theta, velocity_rad_s=vel, exo_torque_nm=tau))
    assert (m.rom_violations, m.velocity_violations, m.torque_violations) == (1, 2, 1)
    assert m.limit_violations == 4
    assert exo_metrics(**args).limit_violations == 0


def test_batched_trials_give_per_trial_metrics():
    one = _trial(k=200)
    two = dict(one)
    for key in (
        "angle_rad",
        "reference_rad",
        "velocity_rad_s",
        "exo_torque_nm",
        "muscle_torque_nm",
    ):
        two[key] = np.stack([one[key], one[key]])
    two["angle_rad"] = two["angle_rad"] + np.array([[0.0], [math.radians(2.0)]])
    m = exo_metrics(**two)
    np.testing.assert_allclose(m.rms_error_deg, [0.0, 2.0], atol=1e-12)
    assert m.rom_violations.shape == (2,)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dt_s": 0.0}, "dt_s"),
        ({"rom_rad": (1.0, 0.0)}, "rom_rad"),
        ({"torque_limit_nm": -1.0}, "torque_limit_nm"),
        ({"reference_rad": np.zeros(3)}, "reference_rad"),
        ({"angle_rad": np.full(500, np.nan)}, "angle_rad"),
    ],
)
def test_bad_input_names_the_argument(change, field):
    with pytest.raises(ConfigError, match=field):
        exo_metrics(**_trial(**change))
