"""Tests of plant.glucose.cgm: spec validation, presets, the error process, clipping, the sensor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.cgm import CGMSensor, CGMSpec, cgm_errors, cgm_errors_batch, measure

N_LONG = 400_000


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _invert_johnson(spec: CGMSpec, eps: np.ndarray) -> np.ndarray:
    """Recover the AR(1) driving process e from ε = ξ + λ sinh((e − γ)/δ) (exact inverse)."""
    return spec.gamma + spec.delta * np.arcsinh((eps - spec.xi) / spec.lam)


def _johnson_moments(spec: CGMSpec) -> tuple[float, float]:
    """Closed-form mean and SD of ε when e ~ N(0, s²), s² = pacf²/(1 − pacf²).

    With Y = (e − γ)/δ ~ N(μ, τ²), μ = −γ/δ, τ = s/δ (lognormal moments of e^{±Y}):
    E[sinh Y] = sinh(μ)·e^{τ²/2} and E[sinh² Y] = (cosh(2μ)·e^{2τ²} − 1)/2, so
    mean ε = ξ + λ·sinh(μ)·e^{τ²/2} and Var ε = λ²·(E[sinh² Y] − E[sinh Y]²).
    For τ = 1/δ this is the textbook Johnson SU mean ξ − λ·e^{1/(2δ²)}·sinh(γ/δ).
    """
    mu = -spec.gamma / spec.delta
    tau2 = (spec.pacf**2 / (1.0 - spec.pacf**2)) / spec.delta**2
    m1 = math.sinh(mu) * math.exp(tau2 / 2.0)
    m2 = (math.cosh(2.0 * mu) * math.exp(2.0 * tau2) - 1.0) / 2.0
    return spec.xi + spec.lam * m1, spec.lam * math.sqrt(m2 - m1**2)


# --- spec and presets -------------------------------------------------------------------------


def test_defaults_are_breton_kovatchev_parameters() -> None:
    spec = CGMSpec()
    assert (spec.pacf, spec.gamma, spec.lam, spec.delta, spec.xi) == (
        0.7,
        -0.5444,
        15.9574,
        1.6898,
        -5.47,
    )
    assert (spec.min_mg_dl, spec.max_mg_dl) == (40.0, 400.0)
    assert spec.noise is True
    assert spec.drift_mg_dl_per_day == 0.0


@pytest.mark.parametrize(("name", "period"), [("Dexcom", 3), ("GuardianRT", 5), ("Navigator", 1)])
def test_presets_take_period_from_csv_and_keep_default_range(name: str, period: int) -> None:
    spec = CGMSpec.preset(name)
    assert spec.sample_period_min == period
    assert isinstance(spec.sample_period_min, int)
    assert (spec.min_mg_dl, spec.max_mg_dl) == (40.0, 400.0)
    assert spec.lam == 15.9574
    assert name in CGMSpec.preset_names()


def test_preset_overrides() -> None:
    spec = CGMSpec.preset("Dexcom", min_mg_dl=39.0, max_mg_dl=600.0, noise=False)
    assert (spec.min_mg_dl, spec.max_mg_dl, spec.noise) == (39.0, 600.0, False)
    assert spec.sample_period_min == 3


def test_unknown_preset_and_override_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        CGMSpec.preset("FreeStyle")
    assert info.value.field == "preset"
    assert "Dexcom" in str(info.value)
    with pytest.raises(ConfigError) as info:
        CGMSpec.preset("Dexcom", period=3)
    assert info.value.field == "overrides"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_period_min", 2),
        ("sample_period_min", 15),
        ("sample_period_min", True),
        ("sample_period_min", "5"),
        ("min_mg_dl", -1.0),
        ("min_mg_dl", math.nan),
        ("max_mg_dl", 40.0),
        ("max_mg_dl", math.inf),
        ("pacf", 1.0),
        ("pacf", -1.0),
        ("gamma", math.nan),
        ("lam", 0.0),
        ("lam", -3.0),
        ("delta", 0.0),
        ("xi", math.inf),
        ("noise", "yes"),
        ("drift_mg_dl_per_day", math.nan),
        ("drift_mg_dl_per_day", "1"),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        CGMSpec(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


def test_spec_is_frozen() -> None:
    spec = CGMSpec()
    with pytest.raises(AttributeError):
        spec.pacf = 0.5  # type: ignore[misc]


# --- the error process ------------------------------------------------------------------------


def test_same_seed_same_errors_different_seed_different() -> None:
    spec = CGMSpec()
    a = cgm_errors(spec, _rng(7), 500)
    b = cgm_errors(spec, _rng(7), 500)
    c = cgm_errors(spec, _rng(8), 500)
    assert a.shape == (500,)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_errors_consume_one_normal_per_sample() -> None:
    rng = _rng(3)
    cgm_errors(CGMSpec(), rng, 10)
    reference = _rng(3)
    reference.standard_normal(10)
    assert rng.random() == reference.random()


def test_batch_rows_equal_single_sensor() -> None:
    spec = CGMSpec(sample_period_min=3, drift_mg_dl_per_day=1.5)
    seeds = [11, 12, 13, 14]
    batch = cgm_errors_batch(spec, [_rng(s) for s in seeds], 200)
    assert batch.shape == (4, 200)
    for i, s in enumerate(seeds):
        np.testing.assert_array_equal(batch[i], cgm_errors(spec, _rng(s), 200))
    assert not np.allclose(batch[0], batch[1])


def test_batch_edge_sizes() -> None:
    spec = CGMSpec()
    assert cgm_errors_batch(spec, [], 5).shape == (0, 5)
    assert cgm_errors_batch(spec, [_rng(0)], 0).shape == (1, 0)
    assert cgm_errors(spec, _rng(0), 0).shape == (0,)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_sample_count(n: object) -> None:
    with pytest.raises(InvalidInputError, match="n_samples"):
        cgm_errors(CGMSpec(), _rng(0), n)  # type: ignore[arg-type]


@pytest.mark.parametrize("pacf", [0.7, 0.3])
@pytest.mark.parametrize("period", [1, 5])
def test_ar1_autocorrelation_at_15_min_and_stationary_variance(pacf: float, period: int) -> None:
    spec = CGMSpec(pacf=pacf, sample_period_min=period)
    e = _invert_johnson(spec, cgm_errors(spec, _rng(2024), N_LONG))
    lag = 15 // period  # samples in 15 minutes: the paper's PACF lag
    r15 = np.corrcoef(e[:-lag], e[lag:])[0, 1]
    r1 = np.corrcoef(e[:-1], e[1:])[0, 1]
    # SE of a sample autocorrelation of an AR(1) here: < 0.003.
    assert abs(r15 - pacf) < 0.015
    assert abs(r1 - pacf ** (period / 15)) < 0.01
    stationary_var = pacf**2 / (1.0 - pacf**2)
    assert spec.stationary_sd**2 == pytest.approx(stationary_var)
    # Relative SE of the sample variance here ≈ 0.35 % (checked over 40 seeds).
    assert e.var() == pytest.approx(stationary_var, rel=0.02)


@pytest.mark.parametrize("period", [1, 3, 5])
def test_errors_follow_the_published_recursion_from_a_stationary_start(period: int) -> None:
    # with pacf_lag_min equal to the sample period the process is the paper's recursion
    spec = CGMSpec(sample_period_min=period, pacf_lag_min=period)
    n = 50
    z = _rng(31).standard_normal(n)
    e = np.empty(n)
    e[0] = z[0] * spec.pacf / math.sqrt(1.0 - spec.pacf**2)  # stationary N(0, ρ²/(1 − ρ²))
    for k in range(1, n):
        e[k] = spec.pacf * (e[k - 1] + z[k])  # e_n = PACF·(e_{n−1} + v_n)
    expected = spec.xi + spec.lam * np.sinh((e - spec.gamma) / spec.delta)
    np.testing.assert_allclose(cgm_errors(spec, _rng(31), n), expected, rtol=0, atol=1e-9)


def test_johnson_mean_and_sd_match_closed_form() -> None:
    spec = CGMSpec()
    eps = cgm_errors(spec, _rng(99), N_LONG)
    mean, sd = _johnson_moments(spec)
    # The paper reports 0.76 mg/dL and 11 mg/dL for the fitted errors.
    assert mean == pytest.approx(0.72, abs=0.02)
    assert sd == pytest.approx(11.0, abs=1.0)
    # Variance of the mean of an AR(1)-driven series ≤ σ²(1 + ρ)/((1 − ρ) n) (a monotone
    # transform does not increase the correlation); allow 5 such standard errors.
    se_mean = sd * math.sqrt((1 + spec.pacf) / ((1 - spec.pacf) * N_LONG))
    assert abs(eps.mean() - mean) < 5 * se_mean
    # Relative SE of the sample SD here ≈ 0.3 % (checked over 40 seeds).
    assert eps.std() == pytest.approx(sd, rel=0.015)


def test_noise_false_gives_zero_errors_and_exact_truth() -> None:
    spec = CGMSpec(noise=False)
    rng = _rng(5)
    errors = cgm_errors(spec, rng, 100)
    np.testing.assert_array_equal(errors, np.zeros(100))
    assert rng.random() == _rng(5).random()  # nothing drawn
    np.testing.assert_array_equal(cgm_errors_batch(spec, [_rng(1), _rng(2)], 7), np.zeros((2, 7)))
    truth = np.linspace(40.0, 400.0, 100)
    np.testing.assert_array_equal(measure(truth, errors, spec), truth)


@pytest.mark.parametrize("period", [1, 3, 5])
def test_drift_is_linear_in_time_since_insertion(period: int) -> None:
    drift = 2.4
    ideal = CGMSpec(sample_period_min=period, noise=False, drift_mg_dl_per_day=drift)
    n = 3 * 1440 // period
    expected = drift * np.arange(n) * period / 1440.0
    np.testing.assert_allclose(cgm_errors(ideal, _rng(0), n), expected, rtol=0, atol=1e-12)
    assert cgm_errors(ideal, _rng(0), n)[1440 // period] == pytest.approx(drift)
    noisy = CGMSpec(sample_period_min=period, drift_mg_dl_per_day=drift)
    plain = CGMSpec(sample_period_min=period)
    diff = cgm_errors(noisy, _rng(4), n) - cgm_errors(plain, _rng(4), n)
    np.testing.assert_allclose(diff, expected, rtol=0, atol=1e-9)


# --- measurement ------------------------------------------------------------------------------


def test_measure_clips_to_device_range_any_shape() -> None:
    spec = CGMSpec(min_mg_dl=40.0, max_mg_dl=400.0)
    truth = np.array([[20.0, 100.0, 390.0], [45.0, 200.0, 500.0]])
    errors = np.array([[5.0, -3.0, 20.0], [-10.0, 0.5, 0.0]])
    readings = measure(truth, errors, spec)
    assert readings.shape == (2, 3)
    np.testing.assert_array_equal(readings, [[40.0, 97.0, 400.0], [40.0, 200.5, 400.0]])
    assert measure(100.0, 1.0, spec) == 101.0
    wide = CGMSpec(min_mg_dl=10.0, max_mg_dl=600.0)
    np.testing.assert_array_equal(measure(truth, errors, wide), truth + errors)


def test_measure_rejects_nan() -> None:
    spec = CGMSpec()
    with pytest.raises(InvalidInputError, match="true_gsub_mg_dl"):
        measure(np.array([100.0, np.nan]), np.zeros(2), spec)
    with pytest.raises(InvalidInputError, match="errors_mg_dl"):
        measure(np.array([100.0, 90.0]), np.array([np.nan, 0.0]), spec)


# --- the stateful sensor ----------------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 3, 5])
def test_sensor_samples_every_period_starting_at_zero(period: int) -> None:
    spec = CGMSpec(sample_period_min=period)
    sensor = CGMSensor(spec, _rng(1))
    got = {t: sensor.read(float(t), 120.0) for t in range(60)}
    due = [t for t, v in got.items() if v is not None]
    assert due == list(range(0, 60, period))
    assert sensor.next_sample_min == 60.0


@pytest.mark.parametrize("chunk", [1, 7, 288])
def test_sensor_errors_equal_cgm_errors(chunk: int) -> None:
    spec = CGMSpec(sample_period_min=5, drift_mg_dl_per_day=-3.0, min_mg_dl=0.0, max_mg_dl=1e4)
    n = 400
    errors = cgm_errors(spec, _rng(21), n)
    sensor = CGMSensor(spec, _rng(21), chunk_samples=chunk)
    readings = [sensor.read(5.0 * k, 200.0) for k in range(n)]
    np.testing.assert_allclose(np.array(readings, dtype=float), 200.0 + errors, rtol=0, atol=1e-12)


def test_sensor_reading_does_not_depend_on_call_rate() -> None:
    spec = CGMSpec(sample_period_min=3)
    errors = cgm_errors(spec, _rng(8), 200)
    every_minute = CGMSensor(spec, _rng(8), chunk_samples=16)
    every_five = CGMSensor(spec, _rng(8), chunk_samples=16)
    for t in range(0, 300):
        a = every_minute.read(float(t), 150.0)
        if t % 5 == 0:
            b = every_five.read(float(t), 150.0)
            # latest due sample k = floor(t/3); the every-five sensor skips samples in between
            assert b == pytest.approx(150.0 + errors[t // 3], abs=1e-12)
            if t % 3 == 0:
                assert a == b


def test_sensor_tolerates_float_time_and_clips() -> None:
    spec = CGMSpec(sample_period_min=5, noise=False, min_mg_dl=40.0, max_mg_dl=400.0)
    sensor = CGMSensor(spec, _rng(0))
    t = 0.0
    readings = []
    for _ in range(30):
        readings.append(sensor.read(t, 500.0))
        t += 1.0 / 3.0 * 3.0 - 1e-13  # accumulated float time slightly below whole minutes
    assert [r for r in readings if r is not None] == [400.0] * 6
    assert sensor.read(30.0, 10.0) == 40.0
    assert sensor.read(30.5, 10.0) is None


def test_sensor_rejects_bad_input() -> None:
    sensor = CGMSensor(CGMSpec(), _rng(0))
    sensor.read(10.0, 100.0)
    with pytest.raises(InvalidInputError, match="t_min"):
        sensor.read(9.0, 100.0)
    with pytest.raises(InvalidInputError, match="t_min"):
        CGMSensor(CGMSpec(), _rng(0)).read(-1.0, 100.0)
    with pytest.raises(InvalidInputError, match="gsub_mg_dl"):
        sensor.read(15.0, math.nan)
    with pytest.raises(ConfigError) as info:
        CGMSensor(CGMSpec(), _rng(0), chunk_samples=0)
    assert info.value.field == "chunk_samples"
