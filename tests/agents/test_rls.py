import math

import numpy as np
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.rls import RecursiveLeastSquares


def test_recovers_constant_parameters_from_noisy_samples():
    rng = np.random.default_rng(0)
    truth = np.array([2.0, -0.5, 0.1])
    rls = RecursiveLeastSquares(3, forgetting=1.0)
    for _ in range(2000):
        phi = rng.normal(size=3)
        rls.update(phi, float(phi @ truth + rng.normal(0.0, 0.05)))
    np.testing.assert_allclose(rls.theta, truth, atol=0.01)


def test_without_forgetting_it_equals_batch_least_squares():
    rng = np.random.default_rng(1)
    phis = rng.normal(size=(50, 2))
    ys = phis @ np.array([1.0, 3.0]) + rng.normal(0.0, 0.1, 50)
    rls = RecursiveLeastSquares(2, forgetting=1.0, initial_variance=1e8, max_trace=1e9)
    for phi, y in zip(phis, ys, strict=True):
        rls.update(phi, float(y))
    batch = np.linalg.lstsq(phis, ys, rcond=None)[0]
    np.testing.assert_allclose(rls.theta, batch, rtol=1e-5)


def test_forgetting_tracks_a_drifting_parameter_and_no_forgetting_lags():
    rng = np.random.default_rng(2)
    fast = RecursiveLeastSquares(1, forgetting=0.98)
    slow = RecursiveLeastSquares(1, forgetting=1.0)
    for k in range(2000):
        truth = 1.0 if k < 1000 else 0.4  # a patient's strength drops (fatigue)
        phi = np.array([1.0 + 0.1 * rng.normal()])
        y = float(phi[0] * truth + rng.normal(0.0, 0.02))
        fast.update(phi, y)
        slow.update(phi, y)
    assert fast.theta[0] == pytest.approx(0.4, abs=0.03)
    assert slow.theta[0] > 0.6


def test_no_excitation_does_not_wind_up_the_covariance():
    rls = RecursiveLeastSquares(2, forgetting=0.9, max_trace=1e4)
    for _ in range(1000):
        rls.update([0.0, 0.0], 0.0)
    assert np.trace(rls.p) <= 1e4 * (1 + 1e-12)
    assert np.all(np.isfinite(rls.p))


def test_non_finite_samples_are_skipped():
    rls = RecursiveLeastSquares(1)
    rls.update([1.0], 2.0)
    before = rls.theta.copy()
    rls.update([math.nan], 1.0)
    rls.update([1.0], math.inf)
    np.testing.assert_array_equal(rls.theta, before)
    assert (rls.skipped, rls.samples) == (2, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 2, "forgetting": 0.0}, "forgetting"),
        ({"n": 2, "initial": [1.0]}, "initial"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(LoopConfigError, match=field):
        RecursiveLeastSquares(**kwargs)
