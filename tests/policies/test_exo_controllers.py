import math

import numpy as np
import pytest

from policies.errors import PolicyConfigError
from policies.exo_controllers import AssistAsNeededController, ExoInput, ImpedanceController


def _obs(t=0.0, angle=0.0, vel=0.0, ref=0.0, ref_vel=0.0):
    return ExoInput(t, angle, vel, ref, ref_vel)


def test_impedance_is_a_spring_and_damper_toward_the_reference():
    c = ImpedanceController(stiffness_nm_per_rad=50.0, damping_nm_s_per_rad=2.0)
    assert c.torque(_obs(angle=0.1, ref=0.3, vel=1.0, ref_vel=0.5)) == pytest.approx(
        50.0 * 0.2 + 2.0 * (-0.5)
    )
    assert c.torque(_obs(angle=0.5, ref=0.5)) == 0.0


def test_impedance_output_is_clipped_and_never_nan():
    c = ImpedanceController(torque_limit_nm=10.0)
    assert c.torque(_obs(ref=3.0)) == 10.0
    assert c.torque(_obs(ref=-3.0)) == -10.0
    assert c.torque(_obs(angle=math.nan)) == 0.0


def test_aan_feedforward_grows_where_the_patient_lags_and_only_there():
    c = AssistAsNeededController(period_s=2.0, n_bins=4, forgetting_per_s=0.0)
    for k in range(2000):  # 20 s at 100 Hz: the patient lags by 5° in the first quarter only
        t = k * 0.01
        lag = math.radians(5.0) if (t % 2.0) < 0.5 else 0.0
        c.torque(_obs(t=t, angle=0.5 - lag, ref=0.5))
    ff = c.feedforward_nm
    assert ff[0] > 1.0
    np.testing.assert_array_equal(ff[1:], 0.0)


def test_aan_assistance_decays_when_the_error_is_within_tolerance():
    c = AssistAsNeededController(period_s=1.0, n_bins=1, forgetting_per_s=0.5)
    for k in range(500):  # a lag to learn from
        c.torque(_obs(t=k * 0.01, angle=0.4, ref=0.5))
    learned = c.feedforward_nm[0]
    for k in range(500, 1500):  # then the patient tracks within 1°: only forgetting
        c.torque(_obs(t=k * 0.01, angle=0.5 - math.radians(1.0), ref=0.5))
    assert c.feedforward_nm[0] == pytest.approx(learned * math.exp(-0.5 * 10.0), rel=0.02)


def test_aan_output_and_feedforward_stay_within_the_limit():
    c = AssistAsNeededController(period_s=1.0, n_bins=2, torque_limit_nm=5.0)
    taus = [c.torque(_obs(t=k * 0.01, angle=-1.0, ref=1.0)) for k in range(3000)]
    assert max(abs(t) for t in taus) <= 5.0
    assert np.all(np.abs(c.feedforward_nm) <= 5.0)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ImpedanceController, {"torque_limit_nm": 0.0}, "torque_limit_nm"),
        (ImpedanceController, {"stiffness_nm_per_rad": -1.0}, "stiffness_nm_per_rad"),
        (AssistAsNeededController, {"period_s": 0.0}, "period_s"),
        (AssistAsNeededController, {"period_s": 1.0, "n_bins": 0}, "n_bins"),
        (AssistAsNeededController, {"period_s": 1.0, "forgetting_per_s": math.nan}, "forgetting"),
    ],
)
def test_bad_settings_name_the_field(cls, kwargs, field):
    with pytest.raises(PolicyConfigError, match=field):
        cls(**kwargs)
