import itertools
import math

import numpy as np
import pytest

from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.knee.controllers import (
    EXO_CONTROLLERS,
    AssistAsNeededController,
    ExoInput,
    ImpedanceController,
    ZeroTorqueController,
    make_exo_controller,
)


def _obs(t=0.0, angle=0.0, vel=0.0, ref=0.0, ref_vel=0.0, capacity=math.nan):
    return ExoInput(t, angle, vel, ref, ref_vel, twin_voluntary_capacity=capacity)


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
        (AssistAsNeededController, {"period_s": 1.0, "min_impedance_scale": -0.1}, "min_imp"),
        (AssistAsNeededController, {"period_s": 1.0, "min_impedance_scale": 1.5}, "min_imp"),
        (AssistAsNeededController, {"period_s": 1.0, "min_impedance_scale": math.nan}, "min_imp"),
        (AssistAsNeededController, {"period_s": 1.0, "use_twin": "yes"}, "use_twin"),
    ],
)
def test_bad_settings_name_the_field(cls, kwargs, field):
    with pytest.raises(PolicyConfigError, match=field):
        cls(**kwargs)


def _impedance_only(**kwargs):
    """An AAN controller whose feed-forward never moves: its output is the scaled impedance."""
    return AssistAsNeededController(
        period_s=1.0,
        stiffness_nm_per_rad=20.0,
        damping_nm_s_per_rad=2.0,
        learning_gain_nm_per_rad_s=0.0,
        **({"min_impedance_scale": 0.2} | kwargs),
    )


TRACKING_ERROR = {"angle": 0.2, "ref": 0.5, "vel": 0.1, "ref_vel": 0.4}  # 20·0.3 + 2·0.3 = 6.6


@pytest.mark.parametrize(
    ("capacity", "scale"),
    [
        (math.nan, 1.0),  # no twin: unchanged
        (0.0, 1.0),
        (0.3, 0.7),
        (0.05, 0.95),
        (0.7, 0.3),
        (0.9, 0.2),  # clipped at min_impedance_scale
        (1.0, 0.2),
        (1.5, 0.2),
        (-0.5, 1.0),
    ],
)
def test_aan_impedance_shrinks_as_the_twin_sees_more_capacity(capacity, scale):
    c = _impedance_only()
    tau = c.torque(_obs(capacity=capacity, **TRACKING_ERROR))
    assert tau == pytest.approx(scale * 6.6)
    assert c.impedance_scale == pytest.approx(scale)


def test_aan_without_twin_behaves_exactly_as_before():
    with_nan = AssistAsNeededController(period_s=2.0, n_bins=4)
    off = AssistAsNeededController(period_s=2.0, n_bins=4, use_twin=False)
    plain = AssistAsNeededController(period_s=2.0, n_bins=4)
    for k in range(500):
        t = k * 0.01
        obs = dict(t=t, angle=0.4 + 0.1 * math.sin(t), vel=0.1 * math.cos(t), ref=0.5)
        a = with_nan.torque(_obs(**obs))
        b = off.torque(_obs(capacity=0.8, **obs))  # the estimate is there but not used
        # the pre-twin formula: K e + B ė + u
        e = obs["ref"] - obs["angle"]
        expected = plain.stiffness_nm_per_rad * e + plain.damping_nm_s_per_rad * (0.0 - obs["vel"])
        tau = plain.torque(_obs(**obs))
        assert a == b == tau
        assert tau == pytest.approx(_clipped(expected + plain.feedforward_nm[plain._bin(t)]))
    np.testing.assert_array_equal(with_nan.feedforward_nm, off.feedforward_nm)


def _clipped(tau, limit=40.0):
    return max(-limit, min(limit, tau))


def test_aan_scale_is_monotone_in_capacity_and_within_bounds():
    c = _impedance_only(min_impedance_scale=0.3)
    scales = [c.impedance_scale_for(x) for x in np.linspace(-1.0, 2.0, 61)]
    assert all(0.3 <= s <= 1.0 for s in scales)
    assert all(a >= b for a, b in itertools.pairwise(scales))


def test_registry_names_and_the_unassisted_baseline():
    assert EXO_CONTROLLERS == ("none", "impedance", "aan")
    zero = make_exo_controller("none", period_s=2.0, torque_limit_nm=30.0)
    assert isinstance(zero, ZeroTorqueController)
    assert zero.torque(_obs(ref=1.0)) == 0.0
    assert zero.torque(_obs(angle=math.nan, capacity=0.1)) == 0.0
    imp = make_exo_controller("impedance", period_s=2.0, torque_limit_nm=30.0)
    assert isinstance(imp, ImpedanceController) and imp.torque_limit_nm == 30.0
    assert imp.torque(_obs(ref=3.0)) == 30.0
    aan = make_exo_controller("aan", period_s=2.5, torque_limit_nm=12.0)
    assert isinstance(aan, AssistAsNeededController)
    assert (aan.period_s, aan.torque_limit_nm, aan.use_twin) == (2.5, 12.0, True)
    for name in EXO_CONTROLLERS:
        ctrl = make_exo_controller(name, period_s=1.0, torque_limit_nm=5.0)
        assert abs(ctrl.torque(_obs(ref=2.0))) <= 5.0


@pytest.mark.parametrize("name", ["zero", "AAN", "", "policy:model.zip", "pid"])
def test_unknown_controller_names_list_the_valid_ones(name):
    with pytest.raises(PolicyConfigError) as info:
        make_exo_controller(name, period_s=2.0, torque_limit_nm=40.0)
    for valid in EXO_CONTROLLERS:
        assert valid in str(info.value)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"period_s": 0.0, "torque_limit_nm": 40.0}, "period_s"),
        ({"period_s": 2.0, "torque_limit_nm": math.inf}, "torque_limit_nm"),
    ],
)
@pytest.mark.parametrize("name", EXO_CONTROLLERS)
def test_registry_rejects_bad_settings_for_every_name(name, kwargs, field):
    with pytest.raises(PolicyConfigError, match=field):
        make_exo_controller(name, **kwargs)
