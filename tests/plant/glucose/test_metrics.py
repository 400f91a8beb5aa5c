"""Tests of plant.glucose.metrics against hand-computed values, edge cases and properties."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloop.plant.errors import InvalidInputError
from twinloop.plant.glucose.metrics import (
    CVGA_NO_DATA,
    CVGA_ZONES,
    GlucoseMetrics,
    glucose_metrics,
    risk_index,
)

NAN = float("nan")
FLOAT_FIELDS = tuple(
    f.name for f in dataclasses.fields(GlucoseMetrics) if f.name not in ("cvga_zone", "n_samples")
)
ALL_FIELDS = tuple(f.name for f in dataclasses.fields(GlucoseMetrics))

# ---------------------------------------------------------------------------------------------
# Hand computation for the trace [50, 60, 100, 200, 300] mg/dL sampled every 5 min.
#
# n = 5 valid samples, duration = 5 x 5 = 25 min.
# mean = (50 + 60 + 100 + 200 + 300) / 5 = 710 / 5 = 142.
# deviations: -92, -82, -42, 58, 158; squares: 8464, 6724, 1764, 3364, 24964; sum = 45280.
# SD (ddof=1) = sqrt(45280 / 4) = sqrt(11320) = 106.395488...
# CV = 100 x 106.395488 / 142 = 74.926400...%
# GMI = 3.31 + 0.02392 x 142 = 3.31 + 3.39664 = 6.70664%.
# Bands: <54: {50} -> 20%; <70: {50, 60} -> 40%; [70, 180]: {100} -> 20%;
#        >180: {200, 300} -> 40%; >250: {300} -> 20%.
# GRI: VLow = 20, Low = 40 - 20 = 20, VHigh = 20, High = 40 - 20 = 20
#      raw = 3.0 x 20 + 2.4 x 20 + 1.6 x 20 + 0.8 x 20 = 60 + 48 + 32 + 16 = 156 -> capped 100.
#      hypo = 20 + 0.8 x 20 = 36; hyper = 20 + 0.5 x 20 = 30 (3 x 36 + 1.6 x 30 = 156).
# Kovatchev f = 1.509 ((ln BG)^1.084 - 5.381), r = 10 f^2:
#   BG  ln BG     (ln BG)^1.084  f          r
#   50  3.912023  4.386954      -1.500015   22.50045
#   60  4.094345  4.609012      -1.164929   13.57060
#  100  4.605170  5.235502      -0.219557    0.482051
#  200  5.298317  6.094886       1.077253   11.60475
#  300  5.703782  6.602078       1.842607   33.95199
# LBGI = (22.50045 + 13.57060 + 0.482051) / 5 = 36.55310 / 5 = 7.310620
# HBGI = (11.60475 + 33.95199) / 5 = 45.55674 / 5 = 9.111348
# CVGA percentiles, linear interpolation on the sorted trace (positions 0..4):
#   2.5th:  position 4 x 0.025 = 0.1 -> 50 + 0.1 x (60 - 50) = 51
#   97.5th: position 4 x 0.975 = 3.9 -> 200 + 0.9 x (300 - 200) = 290
#   (51, 290): min < 70 and 180 < max <= 300 -> "Lower D".
# ---------------------------------------------------------------------------------------------
TRACE_1 = [50.0, 60.0, 100.0, 200.0, 300.0]
EXPECTED_1: dict[str, object] = {
    "mean_mg_dl": 142.0,
    "sd_mg_dl": math.sqrt(45280.0 / 4.0),
    "cv_pct": 100.0 * math.sqrt(11320.0) / 142.0,
    "gmi_pct": 6.70664,
    "time_in_range_70_180_pct": 20.0,
    "time_below_70_pct": 40.0,
    "time_below_54_pct": 20.0,
    "time_above_180_pct": 40.0,
    "time_above_250_pct": 20.0,
    "lbgi": 7.310620,
    "hbgi": 9.111348,
    "gri": 100.0,
    "gri_hypo_component": 36.0,
    "gri_hyper_component": 30.0,
    "cvga_min_bg_mg_dl": 51.0,
    "cvga_max_bg_mg_dl": 290.0,
    "cvga_zone": "Lower D",
    "n_samples": 5,
    "duration_min": 25.0,
    "min_bg_mg_dl": 50.0,
}


def assert_metrics(m: GlucoseMetrics, expected: dict[str, object], rel: float = 1e-6) -> None:
    assert set(expected) == set(ALL_FIELDS)
    for name, want in expected.items():
        got = getattr(m, name)
        if isinstance(want, str):
            assert got == want, name
        elif isinstance(want, int):
            assert type(got) is int and got == want, name
        else:
            assert isinstance(got, float), name
            assert got == pytest.approx(want, rel=rel, abs=1e-12), name


def scalar_fields(m: GlucoseMetrics) -> dict[str, object]:
    return {name: getattr(m, name) for name in ALL_FIELDS}


def test_hand_computed_trace_every_field() -> None:
    m = glucose_metrics(np.array(TRACE_1), sample_period_min=5.0)
    assert_metrics(m, EXPECTED_1)


def test_list_input_is_accepted() -> None:
    assert_metrics(glucose_metrics(TRACE_1, sample_period_min=5), EXPECTED_1)


def test_gri_below_cap_and_components() -> None:
    # 10 samples: 50 (<54), 60 ([54,70)), six x 100 (in range), 200 ((180,250]), 300 (>250).
    # VLow = Low = High = VHigh = 10%, TIR = 60%.
    # GRI = 3.0 x 10 + 2.4 x 10 + 1.6 x 10 + 0.8 x 10 = 30 + 24 + 16 + 8 = 78 (< 100, not capped)
    # hypo = 10 + 0.8 x 10 = 18; hyper = 10 + 0.5 x 10 = 15; 3 x 18 + 1.6 x 15 = 54 + 24 = 78.
    m = glucose_metrics([50, 60, 100, 100, 100, 100, 100, 100, 200, 300], sample_period_min=5)
    assert m.gri == pytest.approx(78.0)
    assert m.gri_hypo_component == pytest.approx(18.0)
    assert m.gri_hyper_component == pytest.approx(15.0)
    assert m.time_in_range_70_180_pct == pytest.approx(60.0)


def test_gri_is_capped_at_100_but_components_are_not() -> None:
    # All readings < 54: VLow = 100% -> raw GRI = 3.0 x 100 = 300 -> 100; hypo = 100.
    m = glucose_metrics([40.0, 45.0, 50.0], sample_period_min=5)
    assert m.gri == 100.0
    assert m.gri_hypo_component == pytest.approx(100.0)
    assert m.gri_hyper_component == 0.0
    # All readings > 250: VHigh = 100% -> raw 1.6 x 100 = 160 -> 100; hyper = 100.
    m = glucose_metrics([260.0, 400.0, 600.0], sample_period_min=5)
    assert m.gri == 100.0
    assert m.gri_hyper_component == pytest.approx(100.0)
    assert m.gri_hypo_component == 0.0


def test_range_boundaries() -> None:
    # 8 samples, 12.5% each:
    #   53.9 -> <54 (and <70);  54 and 69.9 -> [54,70) (<70 but not <54);
    #   70 and 180 -> in range (70 <= BG <= 180);
    #   180.1 and 250 -> (180,250] (>180 but not >250);  250.1 -> >250 (and >180).
    # <54: 1/8 = 12.5; <70: 3/8 = 37.5; in range: 2/8 = 25; >180: 3/8 = 37.5; >250: 1/8 = 12.5
    # hypo = 12.5 + 0.8 x 25 = 32.5; hyper = 12.5 + 0.5 x 25 = 25
    # GRI raw = 3 x 12.5 + 2.4 x 25 + 1.6 x 12.5 + 0.8 x 25 = 37.5 + 60 + 20 + 20 = 137.5 -> 100
    trace = [53.9, 54.0, 69.9, 70.0, 180.0, 180.1, 250.0, 250.1]
    m = glucose_metrics(trace, sample_period_min=5)
    assert m.time_below_54_pct == pytest.approx(12.5)
    assert m.time_below_70_pct == pytest.approx(37.5)
    assert m.time_in_range_70_180_pct == pytest.approx(25.0)
    assert m.time_above_180_pct == pytest.approx(37.5)
    assert m.time_above_250_pct == pytest.approx(12.5)
    assert m.gri_hypo_component == pytest.approx(32.5)
    assert m.gri_hyper_component == pytest.approx(25.0)
    assert m.gri == 100.0


def test_nan_gaps_are_excluded_from_every_metric() -> None:
    # Same five valid readings as TRACE_1 with three gaps: every metric, n_samples and the
    # duration (valid samples x period) equal the hand-computed values of TRACE_1.
    trace = np.array([50.0, NAN, 60.0, 100.0, NAN, NAN, 200.0, 300.0])
    assert_metrics(glucose_metrics(trace, sample_period_min=5.0), EXPECTED_1)


def test_sample_period_only_changes_duration() -> None:
    base = scalar_fields(glucose_metrics(TRACE_1, sample_period_min=5.0))
    for period in (1.0, 3.0, 15.0, 0.5):
        other = scalar_fields(glucose_metrics(TRACE_1, sample_period_min=period))
        assert other.pop("duration_min") == pytest.approx(5 * period)
        assert other == {k: v for k, v in base.items() if k != "duration_min"}


def test_values_outside_40_400_are_not_clipped() -> None:
    # Mean of [20, 600] = 310: with clipping to [40, 400] it would be 220.
    m = glucose_metrics([20.0, 600.0], sample_period_min=5)
    assert m.mean_mg_dl == pytest.approx(310.0)
    # r(20) ~ 100.04 (f < 0) and r(600) ~ 99.95 (f > 0): LBGI = 100.04/2, HBGI = 99.95/2.
    assert m.lbgi == pytest.approx(100.0415 / 2, rel=1e-5)
    assert m.hbgi == pytest.approx(99.9481 / 2, rel=1e-5)


def test_single_sample_has_no_sd() -> None:
    m = glucose_metrics([100.0], sample_period_min=5)
    assert m.mean_mg_dl == 100.0
    assert math.isnan(m.sd_mg_dl) and math.isnan(m.cv_pct)
    assert m.n_samples == 1 and m.cvga_zone == "A"


# ------------------------------------------------------------------ no valid samples / batches


def _assert_no_data(m: GlucoseMetrics) -> None:
    for name in FLOAT_FIELDS:
        value = getattr(m, name)
        if name == "duration_min":
            assert value == 0.0
        else:
            assert isinstance(value, float) and math.isnan(value), name
    assert m.n_samples == 0
    assert m.cvga_zone == CVGA_NO_DATA == ""


def test_all_nan_trace_gives_nan_metrics_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_no_data(glucose_metrics(np.full(12, np.nan), sample_period_min=5))
        _assert_no_data(glucose_metrics(np.array([]), sample_period_min=5))


def test_all_nan_row_in_a_batch() -> None:
    batch = np.array([[NAN] * 5, TRACE_1, [NAN, 80.0, NAN, 90.0, NAN]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = glucose_metrics(batch, sample_period_min=5)
    assert m.n_samples.tolist() == [0, 5, 2]
    assert m.duration_min.tolist() == [0.0, 25.0, 10.0]
    assert m.cvga_zone.tolist() == ["", "Lower D", "Lower B"]
    for name in FLOAT_FIELDS:
        value = getattr(m, name)
        if name != "duration_min":
            assert math.isnan(value[0]), name
        assert value[1] == pytest.approx(EXPECTED_1[name]), name


def test_batch_types_and_shapes() -> None:
    m = glucose_metrics(np.array([TRACE_1, TRACE_1]), sample_period_min=5)
    for name in FLOAT_FIELDS:
        value = getattr(m, name)
        assert isinstance(value, np.ndarray) and value.shape == (2,) and value.dtype == np.float64
    assert m.n_samples.shape == (2,) and np.issubdtype(m.n_samples.dtype, np.integer)
    assert m.cvga_zone.dtype == object and m.cvga_zone.shape == (2,)
    assert all(type(z) is str for z in m.cvga_zone)


def test_batched_equals_per_row() -> None:
    rng = np.random.default_rng(20240601)
    batch = rng.uniform(25.0, 480.0, size=(6, 97))
    batch[rng.random(batch.shape) < 0.2] = np.nan
    batch[3] = np.nan  # one row without any valid sample
    batch[4, :90] = np.nan  # one almost-empty row
    m = glucose_metrics(batch, sample_period_min=3.0)
    for i, row in enumerate(batch):
        single = glucose_metrics(row, sample_period_min=3.0)
        for name in FLOAT_FIELDS:
            np.testing.assert_allclose(
                getattr(m, name)[i], getattr(single, name), rtol=1e-12, equal_nan=True
            )
        assert m.n_samples[i] == single.n_samples
        assert m.cvga_zone[i] == single.cvga_zone


def test_empty_batch() -> None:
    m = glucose_metrics(np.zeros((0, 10)), sample_period_min=5)
    assert m.mean_mg_dl.shape == (0,) and m.cvga_zone.shape == (0,)


# ----------------------------------------------------------------------------------- CVGA


def _two_level_trace(low: float, high: float) -> np.ndarray:
    # 20 x low then 21 x high (shuffled): with 41 samples the 2.5th percentile sits at sorted
    # position 40 x 0.025 = 1 (a `low`) and the 97.5th at 40 x 0.975 = 39 (a `high`), so the
    # CVGA point is exactly (low, high).
    trace = np.array([low] * 20 + [high] * 21)
    np.random.default_rng(7).shuffle(trace)
    return trace


# Magni et al. 2008 grid: columns min BG >= 90 | [70, 90) | < 70;
# rows max BG <= 180 | (180, 300] | > 300.
CVGA_CASES = [
    (100.0, 150.0, "A"),
    (80.0, 150.0, "Lower B"),
    (80.0, 250.0, "B"),
    (100.0, 250.0, "Upper B"),
    (60.0, 150.0, "Lower C"),
    (100.0, 350.0, "Upper C"),
    (60.0, 250.0, "Lower D"),
    (80.0, 350.0, "Upper D"),
    (60.0, 350.0, "E"),
    # gridlines belong to the better zone
    (90.0, 180.0, "A"),
    (89.9, 180.0, "Lower B"),
    (90.0, 180.1, "Upper B"),
    (70.0, 180.0, "Lower B"),
    (69.9, 180.0, "Lower C"),
    (70.0, 300.0, "B"),
    (69.9, 300.0, "Lower D"),
    (70.0, 300.1, "Upper D"),
    (90.0, 300.1, "Upper C"),
    (69.9, 300.1, "E"),
    # beyond the drawn axes (110, 50 and 400 mg/dL) the same rules apply
    (120.0, 130.0, "A"),
    (30.0, 100.0, "Lower C"),
    (40.0, 450.0, "E"),
    (120.0, 450.0, "Upper C"),
]


@pytest.mark.parametrize(("low", "high", "zone"), CVGA_CASES)
def test_cvga_zone_of_constructed_trace(low: float, high: float, zone: str) -> None:
    m = glucose_metrics(_two_level_trace(low, high), sample_period_min=5)
    assert m.cvga_min_bg_mg_dl == pytest.approx(low)
    assert m.cvga_max_bg_mg_dl == pytest.approx(high)
    assert m.cvga_zone == zone


def test_every_cvga_zone_is_reached_in_a_batch() -> None:
    batch = np.array([_two_level_trace(lo, hi) for lo, hi, _ in CVGA_CASES[:9]])
    zones = glucose_metrics(batch, sample_period_min=5).cvga_zone
    assert zones.tolist() == [z for _, _, z in CVGA_CASES[:9]]
    assert sorted(zones.tolist()) == sorted(CVGA_ZONES)


def test_cvga_uses_percentiles_not_raw_extremes() -> None:
    # 100 readings of 100 mg/dL, one of 40 and one of 420: raw (min, max) = (40, 420) would be
    # zone E; with 102 samples the 2.5th percentile is at sorted position 101 x 0.025 = 2.525
    # (a 100) and the 97.5th at 98.475 (a 100), so the point is (100, 100): zone A.
    trace = np.array([40.0] + [100.0] * 100 + [420.0])
    m = glucose_metrics(trace, sample_period_min=5)
    assert (m.cvga_min_bg_mg_dl, m.cvga_max_bg_mg_dl) == (100.0, 100.0)
    assert m.cvga_zone == "A"


def test_cvga_percentiles_match_numpy_linear_percentile() -> None:
    rng = np.random.default_rng(3)
    batch = rng.uniform(40.0, 400.0, size=(5, 37))
    batch[rng.random(batch.shape) < 0.3] = np.nan
    m = glucose_metrics(batch, sample_period_min=5)
    np.testing.assert_allclose(m.cvga_min_bg_mg_dl, np.nanpercentile(batch, 2.5, axis=1))
    np.testing.assert_allclose(m.cvga_max_bg_mg_dl, np.nanpercentile(batch, 97.5, axis=1))


# ----------------------------------------------------------------------------- risk index


def test_risk_index_hand_values() -> None:
    # From the table above: r(50) = 22.50045, r(100) = 0.482051, r(300) = 33.95199.
    r = risk_index(np.array([50.0, 100.0, 300.0]))
    np.testing.assert_allclose(r, [22.50045, 0.482051, 33.95199], rtol=1e-6)


def test_risk_index_zero_at_the_symmetry_point() -> None:
    # f = 0 where (ln BG)^1.084 = 5.381, i.e. BG = exp(5.381^(1/1.084)) ~ 112.5 mg/dL.
    bg0 = math.exp(5.381 ** (1 / 1.084))
    assert 112.0 < bg0 < 113.0
    assert float(risk_index(bg0)) == pytest.approx(0.0, abs=1e-20)


def test_risk_index_shape_nan_and_scalar() -> None:
    r = risk_index([[50.0, NAN, 300.0], [100.0, 200.0, 60.0]])
    assert r.shape == (2, 3) and r.dtype == np.float64
    assert math.isnan(r[0, 1])
    assert risk_index(100.0).shape == ()


def test_risk_index_below_1_mg_dl_stays_real_and_increasing() -> None:
    # ln BG < 0 below 1 mg/dL: (ln BG)^1.084 is taken as -|ln BG|^1.084, so risk keeps rising.
    r = risk_index([0.25, 0.5, 1.0, 2.0, 20.0])
    assert np.all(np.isfinite(r))
    assert np.all(np.diff(r) < 0)


def test_lbgi_hbgi_split_the_mean_risk() -> None:
    trace = np.array([45.0, 70.0, 112.0, 113.0, 180.0, 390.0])
    m = glucose_metrics(trace, sample_period_min=5)
    assert m.lbgi + m.hbgi == pytest.approx(float(np.mean(risk_index(trace))))
    # 45, 70 and 112 are below the symmetry point (~112.5): their risk is all in LBGI.
    assert m.lbgi == pytest.approx(float(np.sum(risk_index(trace[:3]))) / 6)


# ----------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize("bad", [0.0, -5.0, float("inf"), float("-inf")])
def test_non_positive_or_infinite_glucose_raises(bad: float) -> None:
    trace = np.array([100.0, 120.0, bad, 90.0])
    with pytest.raises(InvalidInputError, match=r"glucose_mg_dl\[2\]") as info:
        glucose_metrics(trace, sample_period_min=5)
    assert isinstance(info.value, ValueError)
    assert repr(bad) in str(info.value)
    with pytest.raises(InvalidInputError, match="glucose_mg_dl"):
        risk_index(trace)


def test_invalid_glucose_in_batch_names_row_and_column() -> None:
    batch = np.array([[100.0, 120.0, 90.0], [100.0, NAN, -1.0]])
    with pytest.raises(InvalidInputError, match=r"glucose_mg_dl\[1, 2\]=-1\.0"):
        glucose_metrics(batch, sample_period_min=5)


@pytest.mark.parametrize("period", [0.0, -5.0, float("nan"), float("inf")])
def test_invalid_sample_period_raises(period: float) -> None:
    with pytest.raises(InvalidInputError, match="sample_period_min"):
        glucose_metrics(TRACE_1, sample_period_min=period)


@pytest.mark.parametrize("shape", [(), (2, 3, 4)])
def test_wrong_dimensionality_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match="glucose_mg_dl"):
        glucose_metrics(np.full(shape, 100.0), sample_period_min=5)


# --------------------------------------------------------------------------------- properties

_reading = st.one_of(
    st.floats(min_value=1.0, max_value=800.0, allow_nan=False, allow_infinity=False),
    st.just(NAN),
)


@settings(deadline=None, max_examples=200)
@given(st.lists(_reading, min_size=0, max_size=60))
def test_properties_of_any_trace(trace: list[float]) -> None:
    arr = np.array(trace, dtype=np.float64)
    m = glucose_metrics(arr, sample_period_min=5)
    valid = arr[~np.isnan(arr)]
    assert m.n_samples == valid.size
    if valid.size == 0:
        _assert_no_data(m)
        return
    low_54_70 = (m.gri_hypo_component - m.time_below_54_pct) / 0.8
    high_180_250 = (m.gri_hyper_component - m.time_above_250_pct) / 0.5
    # The five disjoint bands <54, [54,70), [70,180], (180,250], >250 cover every sample.
    bands = [
        m.time_below_54_pct,
        low_54_70,
        m.time_in_range_70_180_pct,
        high_180_250,
        m.time_above_250_pct,
    ]
    assert sum(bands) == pytest.approx(100.0)
    assert all(b >= -1e-9 for b in bands)
    assert m.time_below_70_pct + m.time_in_range_70_180_pct + m.time_above_180_pct == (
        pytest.approx(100.0)
    )
    assert m.time_below_54_pct <= m.time_below_70_pct
    assert m.time_above_250_pct <= m.time_above_180_pct
    assert m.lbgi >= 0.0 and m.hbgi >= 0.0
    assert m.lbgi + m.hbgi == pytest.approx(float(np.mean(risk_index(valid))))
    assert 0.0 <= m.gri <= 100.0
    raw = 3.0 * m.gri_hypo_component + 1.6 * m.gri_hyper_component
    assert m.gri == pytest.approx(min(raw, 100.0))
    assert valid.min() - 1e-9 <= m.mean_mg_dl <= valid.max() + 1e-9
    assert m.cvga_min_bg_mg_dl <= m.cvga_max_bg_mg_dl
    assert m.cvga_zone in CVGA_ZONES
    assert m.duration_min == pytest.approx(5.0 * valid.size)


@settings(deadline=None, max_examples=50)
@given(
    st.integers(min_value=1, max_value=5).flatmap(
        lambda t: st.lists(st.lists(_reading, min_size=t, max_size=t), min_size=1, max_size=4)
    )
)
def test_batched_equals_per_row_property(rows: list[list[float]]) -> None:
    batch = np.array(rows, dtype=np.float64)
    m = glucose_metrics(batch, sample_period_min=15)
    for i, row in enumerate(batch):
        single = glucose_metrics(row, sample_period_min=15)
        for name in FLOAT_FIELDS:
            np.testing.assert_allclose(
                getattr(m, name)[i], getattr(single, name), rtol=1e-12, equal_nan=True
            )
        assert m.cvga_zone[i] == single.cvga_zone
        assert m.n_samples[i] == single.n_samples
