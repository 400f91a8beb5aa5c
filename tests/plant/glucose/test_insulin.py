import numpy as np
import pytest

from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.insulin import IobBatch, IobTracker, iob_fraction, iob_kernel


def test_endpoints_and_monotone_decay():
    t = np.arange(0, 400, 1.0)
    frac = iob_fraction(t)
    assert frac[0] == 1.0 and frac[360] == 0.0 and frac[-1] == 0.0
    assert np.all(np.diff(frac) <= 0)


def test_hand_computed_value_at_the_peak():
    # tp = 75, td = 360: tau = 75·(1 − 75/360)/(1 − 150/360) = 101.786, a = 2·tau/td = 0.56548,
    # S = 1/(1 − a + (1 + a)·e^(−td/tau)) = 2.08292;
    # IOB(75) = 1 − S·(1 − a)·[(75²/(tau·td·(1 − a)) − 75/tau − 1)·e^(−75/tau) + 1] = 0.69429
    assert float(iob_fraction(75.0)) == pytest.approx(0.69429, abs=2e-4)


def test_activity_peaks_at_the_peak_time():
    t = np.arange(0, 361, 1.0)
    activity = -np.diff(iob_fraction(t, peak_min=55.0, dia_min=300.0))
    assert abs(int(np.argmax(activity)) - 55) <= 1


def test_kernel_covers_the_dia_at_the_period():
    k = iob_kernel(5.0)
    assert k.shape == (72,)
    np.testing.assert_allclose(k, iob_fraction(5.0 * np.arange(1, 73)))


def test_peak_must_be_before_half_the_dia():
    with pytest.raises(ConfigError, match="peak_min"):
        iob_fraction(10.0, peak_min=200.0, dia_min=360.0)


def test_the_batch_tracker_is_one_tracker_per_patient():
    rng = np.random.default_rng(0)
    basal = np.array([0.8, 1.3, 2.0])
    batch = IobBatch(basal)
    singles = [IobTracker(b) for b in basal]
    for minute in range(800):  # longer than the DIA: the ring buffer wraps
        units = rng.exponential(0.05, 3) * (rng.random(3) < 0.3)
        batch.record(units)
        for tracker, u in zip(singles, units, strict=True):
            tracker.record(float(u))
        if minute % 37 == 0:
            np.testing.assert_allclose(
                batch.net_iob_u, [t.net_iob_u for t in singles], rtol=0, atol=1e-12
            )
            np.testing.assert_allclose(
                batch.net_activity_u_per_min,
                [t.net_activity_u_per_min for t in singles],
                rtol=0,
                atol=1e-14,
            )
    assert np.abs(batch.net_iob_u).max() > 0.1  # the doses did move it
