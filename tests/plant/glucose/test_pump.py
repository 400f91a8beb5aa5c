"""Tests of plant.glucose.pump: spec validation, presets, quantisation and per-minute delivery."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.pump import PumpSpec, delivery_u_per_min, quantize_basal, quantize_bolus

GRID_TOL = 1e-9


def _on_grid(values: np.ndarray, increment: float) -> bool:
    steps = values / increment
    return bool(np.all(np.abs(steps - np.round(steps)) < GRID_TOL))


# --- spec and presets -------------------------------------------------------------------------


def test_defaults() -> None:
    spec = PumpSpec()
    assert (spec.max_basal_u_per_h, spec.basal_increment_u_per_h) == (35.0, 0.05)
    assert (spec.max_bolus_u, spec.bolus_increment_u, spec.pulse_u) == (75.0, 0.05, 0.0)


@pytest.mark.parametrize(
    ("name", "max_basal", "max_bolus"), [("Cozmo", 35.0, 75.0), ("Insulet", 30.0, 30.0)]
)
def test_presets_from_csv(name: str, max_basal: float, max_bolus: float) -> None:
    spec = PumpSpec.preset(name)
    assert spec.max_basal_u_per_h == max_basal
    assert spec.max_bolus_u == max_bolus
    assert spec.basal_increment_u_per_h == 0.05
    assert spec.bolus_increment_u == 0.05
    assert spec.pulse_u == 0.0
    assert name in PumpSpec.preset_names()
    assert PumpSpec.preset(name, pulse_u=0.05).pulse_u == 0.05


def test_unknown_preset_and_override() -> None:
    with pytest.raises(ConfigError) as info:
        PumpSpec.preset("Medtronic")
    assert info.value.field == "preset"
    assert "Cozmo" in str(info.value)
    with pytest.raises(ConfigError) as info:
        PumpSpec.preset("Cozmo", max_basal=3.0)
    assert info.value.field == "overrides"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_basal_u_per_h", 0.0),
        ("max_basal_u_per_h", math.inf),
        ("basal_increment_u_per_h", -0.05),
        ("basal_increment_u_per_h", 50.0),
        ("max_bolus_u", -1.0),
        ("max_bolus_u", math.nan),
        ("bolus_increment_u", 100.0),
        ("bolus_increment_u", "0.05"),
        ("pulse_u", -0.1),
        ("pulse_u", True),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        PumpSpec(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


# --- quantisation -----------------------------------------------------------------------------


@given(
    st.lists(st.floats(min_value=-5.0, max_value=80.0, allow_nan=False), min_size=1, max_size=40),
    st.sampled_from([0.05, 0.025, 0.1, 0.3]),
)
def test_quantize_never_exceeds_request_and_is_within_one_increment(
    request_values: list[float], increment: float
) -> None:
    spec = PumpSpec(basal_increment_u_per_h=increment, bolus_increment_u=increment)
    x = np.array(request_values)
    for quantize, maximum in ((quantize_basal, 35.0), (quantize_bolus, 75.0)):
        q = quantize(spec, x)
        clipped = np.clip(x, 0.0, maximum)
        assert q.shape == x.shape
        assert np.all(q <= clipped)
        assert np.all(q >= 0.0)
        assert np.all(clipped - q < increment + 1e-12)
        assert _on_grid(q, increment)
        np.testing.assert_array_equal(quantize(spec, q), q)  # idempotent


def test_quantize_rounds_down_and_keeps_grid_values() -> None:
    spec = PumpSpec()
    np.testing.assert_allclose(
        quantize_basal(spec, [0.0, 0.049, 0.05, 0.15, 0.7, 1.0, 1.099, 2.0]),
        [0.0, 0.0, 0.05, 0.15, 0.7, 1.0, 1.05, 2.0],
        rtol=0,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        quantize_bolus(spec, [4.999, 5.0, 0.33]), [4.95, 5.0, 0.3], atol=1e-12
    )


def test_quantize_clips_to_limits() -> None:
    spec = PumpSpec.preset("Insulet")
    np.testing.assert_array_equal(quantize_basal(spec, [-1.0, 31.0, math.inf]), [0.0, 30.0, 30.0])
    np.testing.assert_array_equal(quantize_bolus(spec, [-0.5, 45.0]), [0.0, 30.0])


def test_quantize_any_shape_and_zero_increment() -> None:
    spec = PumpSpec(basal_increment_u_per_h=0.0, bolus_increment_u=0.0)
    x = np.array([[0.0123, 1.23456], [7.0, 0.999]])
    np.testing.assert_array_equal(quantize_basal(spec, x), x)
    np.testing.assert_array_equal(quantize_bolus(spec, x), x)
    assert quantize_basal(PumpSpec(), np.ones((2, 3, 4))).shape == (2, 3, 4)


def test_nan_names_the_field() -> None:
    spec = PumpSpec()
    with pytest.raises(InvalidInputError, match="basal_u_per_h"):
        quantize_basal(spec, [1.0, math.nan])
    with pytest.raises(InvalidInputError, match="bolus_u"):
        quantize_bolus(spec, math.nan)
    with pytest.raises(InvalidInputError, match="bolus_u"):
        delivery_u_per_min(spec, [1.0], [math.nan], 5)


# --- delivery ---------------------------------------------------------------------------------


def test_continuous_bolus_in_first_minute_only() -> None:
    spec = PumpSpec()
    basal = np.array([1.2, 0.6, 0.0])
    bolus = np.array([3.0, 0.0, 7.5])
    insulin, residual = delivery_u_per_min(spec, basal, bolus, 5)
    assert insulin.shape == (3, 5)
    np.testing.assert_array_equal(residual, np.zeros(3))
    np.testing.assert_allclose(insulin[:, 1:], np.repeat(basal[:, None] / 60.0, 4, axis=1))
    np.testing.assert_allclose(insulin[:, 0] - basal / 60.0, bolus)
    np.testing.assert_allclose(insulin.sum(axis=1), basal * 5 / 60.0 + bolus)


def test_delivery_applies_quantisation() -> None:
    spec = PumpSpec.preset("Insulet")
    insulin, _ = delivery_u_per_min(spec, [0.73, 50.0], [2.049, 40.0], 3)
    np.testing.assert_allclose(insulin[:, 1], [0.7 / 60.0, 30.0 / 60.0])
    np.testing.assert_allclose(insulin[:, 0] - insulin[:, 1], [2.0, 30.0])


def test_scalars_broadcast_and_minutes_validated() -> None:
    spec = PumpSpec()
    insulin, residual = delivery_u_per_min(spec, 0.6, 0.0, 1)
    assert insulin.shape == (1, 1)
    assert residual.shape == (1,)
    insulin, _ = delivery_u_per_min(spec, [0.6, 1.2], 1.0, 15)
    assert insulin.shape == (2, 15)
    for minutes in (0, -5, 2.5, True):
        with pytest.raises(InvalidInputError, match="minutes"):
            delivery_u_per_min(spec, [1.0], [0.0], minutes)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        delivery_u_per_min(spec, [1.0, 2.0], [0.0, 0.0, 0.0], 5)
    with pytest.raises(InvalidInputError):
        delivery_u_per_min(spec, np.ones((2, 2)), 0.0, 5)
    with pytest.raises(InvalidInputError, match="pulse_residual_u"):
        delivery_u_per_min(PumpSpec(pulse_u=0.05), [1.0], [0.0], 5, np.array([-0.01]))


def test_continuous_delivery_flushes_a_residual() -> None:
    insulin, residual = delivery_u_per_min(PumpSpec(), [0.6], [0.0], 5, np.array([0.03]))
    assert insulin[0, 0] == pytest.approx(0.01 + 0.03)
    assert residual[0] == 0.0


def test_pulses_whole_and_bolus_in_first_minute() -> None:
    spec = PumpSpec(pulse_u=0.05)
    insulin, residual = delivery_u_per_min(spec, [0.0, 0.0], [2.0, 0.35], 5)
    np.testing.assert_allclose(insulin[:, 0], [2.0, 0.35])
    np.testing.assert_array_equal(insulin[:, 1:], 0.0)
    np.testing.assert_allclose(residual, 0.0, atol=1e-12)


def test_pulses_conserve_insulin_over_a_day() -> None:
    spec = PumpSpec(pulse_u=0.05)
    rng = np.random.default_rng(17)
    n, minutes, periods = 6, 5, 288
    residual: np.ndarray | None = None
    delivered_total = np.zeros(n)
    commanded_total = np.zeros(n)
    lag = np.zeros(n)
    for _ in range(periods):
        basal = rng.uniform(0.0, 3.0, n)
        bolus = np.where(rng.random(n) < 0.02, rng.uniform(0.0, 8.0, n), 0.0)
        insulin, residual = delivery_u_per_min(spec, basal, bolus, minutes, residual)
        assert _on_grid(insulin, spec.pulse_u)
        commanded = quantize_basal(spec, basal) * minutes / 60.0 + quantize_bolus(spec, bolus)
        delivered_total += insulin.sum(axis=1)
        commanded_total += commanded
        lag = commanded_total - delivered_total
        # The pump is never ahead of the commands and never more than a pulse behind.
        assert np.all(lag > -1e-9)
        assert np.all(lag < spec.pulse_u + 1e-9)
        np.testing.assert_allclose(residual, lag, atol=1e-9)
    np.testing.assert_allclose(delivered_total + lag, commanded_total, rtol=1e-12)
    assert np.all(delivered_total > 0.0)


def test_pulses_small_basal_accumulates() -> None:
    # 0.3 U/h = 0.005 U/min: one 0.05 U pulse every 10 minutes.
    spec = PumpSpec(pulse_u=0.05)
    residual = None
    per_minute = []
    for _ in range(6):
        insulin, residual = delivery_u_per_min(spec, [0.3], [0.0], 5, residual)
        per_minute.extend(insulin[0])
    pulses = np.flatnonzero(np.array(per_minute) > 0.0)
    np.testing.assert_array_equal(pulses, [9, 19, 29])
    np.testing.assert_allclose(np.array(per_minute)[pulses], 0.05)


def test_batch_equals_one_patient_at_a_time() -> None:
    spec = PumpSpec(pulse_u=0.1)
    basal = np.array([0.9, 1.7, 0.0, 12.3])
    bolus = np.array([0.0, 2.35, 1.0, 0.0])
    residual = np.array([0.02, 0.09, 0.0, 0.05])
    insulin, new_residual = delivery_u_per_min(spec, basal, bolus, 15, residual)
    for i in range(4):
        one, one_res = delivery_u_per_min(
            spec, basal[i : i + 1], bolus[i : i + 1], 15, residual[i : i + 1]
        )
        np.testing.assert_array_equal(insulin[i], one[0])
        np.testing.assert_array_equal(new_residual[i], one_res[0])
