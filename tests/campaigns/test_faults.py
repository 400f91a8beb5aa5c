"""The fault catalogue: its data, parameter checks, every transform's effect, and attach()."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from twinloop.agents.channels import Channel
from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.knee.messages import ExoSensorReading, ExoTorqueCommand
from twinloop.agents.messages import (
    AgentFault,
    CgmReading,
    InsulinCommand,
    InsulinDelivery,
    MealAnnouncement,
    PlantGlucose,
)
from twinloop.campaigns.faults import CATALOGUE, PUBLISHED_PATTERNS, ActiveFault, check_params
from twinloop.campaigns.faults import attach as attach_faults
from twinloop.plant.glucose.patients import get_patient

START, END = 10.0, 20.0
#: Times around and inside the window [10, 20): both edges included.
TIMES = (0.0, 5.0, 9.5, 10.0, 12.0, 15.0, 19.5, 20.0, 25.0)
INSIDE = tuple(t for t in TIMES if START <= t < END)

WIRE = {
    "timeout",
    "dropped_frame",
    "bad_crc",
    "modbus_exception",
    "delayed_response",
    "disconnect",
    "byte_corruption",
    "duplicated_write",
}


def make(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    start: float = START,
    end: float = END,
    channel: str | None = None,
    field: str = "",
    seed: int = 0,
) -> ActiveFault:
    fault = CATALOGUE[name]
    return ActiveFault(
        fault,
        channel or fault.channels[0],
        start,
        end,
        check_params(fault, params or {}),
        np.random.default_rng(seed),
        field,
    )


def transform_of(active: ActiveFault) -> Any:
    assert active.fault.make is not None
    return active.fault.make(active)


def cgm_stream(times: tuple[float, ...] = TIMES) -> list[CgmReading]:
    # distinct values, so a held or replayed value is told from the current one
    return [CgmReading(t, 100.0 + 3.0 * t) for t in times]


def deliveries(times: tuple[float, ...] = TIMES) -> list[InsulinDelivery]:
    return [InsulinDelivery(t, 0.02 + 0.001 * t, 1.0 + 0.1 * t) for t in times]


def feed(transform: Any, messages: list[Any]) -> list[Any]:
    return [transform(m) for m in messages]


def t_of(message: Any) -> float:
    return (
        message.t_s if isinstance(message, ExoSensorReading | ExoTorqueCommand) else message.t_min
    )


def assert_outside_untouched(messages: list[Any], out: list[Any]) -> None:
    """Messages outside the window come out unchanged."""
    outside = [(m, o) for m, o in zip(messages, out, strict=True) if not START <= t_of(m) < END]
    assert outside, "the stream has no message outside the window"
    for m, o in outside:
        assert o == m


def inside_pairs(messages: list[Any], out: list[Any]) -> list[tuple[Any, Any]]:
    pairs = [(m, o) for m, o in zip(messages, out, strict=True) if START <= t_of(m) < END]
    assert pairs, "the stream has no message inside the window"
    return pairs


# -- the catalogue -----------------------------------------------------------------------------
def test_catalogue_has_at_least_30_types_keyed_by_name():
    assert len(CATALOGUE) >= 30
    for name, fault in CATALOGUE.items():
        assert fault.name == name


def test_every_entry_is_documented_and_categorised():
    for fault in CATALOGUE.values():
        assert fault.doc.strip(), fault.name
        assert fault.category in {"sensor", "actuator", "data", "timing", "exo", "wire"}, fault.name
        assert fault.therapy in {"glucose", "knee-exo", "any"}, fault.name
        assert fault.channels, fault.name


def test_every_parameter_default_lies_in_its_range():
    for fault in CATALOGUE.values():
        names = [p.name for p in fault.params]
        assert len(names) == len(set(names)), fault.name
        for p in fault.params:
            assert p.low <= p.default <= p.high, (fault.name, p.name)
            assert p.unit and p.doc, (fault.name, p.name)
            assert fault.param(p.name) is p


def test_param_lookup_of_an_unknown_name_raises_key_error():
    with pytest.raises(KeyError):
        CATALOGUE["bias"].param("gain")


def test_the_eight_wire_faults_have_no_transform_and_the_rest_do():
    wire = {name for name, f in CATALOGUE.items() if f.category == "wire"}
    assert wire == WIRE
    for name, fault in CATALOGUE.items():
        if name in WIRE:
            assert fault.make is None, name
            assert all(c.startswith("wire:") for c in fault.channels), name
        else:
            assert callable(fault.make), name


def test_published_patterns_cover_mgipsim_and_the_uva_testbed():
    uva = {"uva:truncate", "uva:hold", "uva:max", "uva:min", "uva:add", "uva:subtract", "uva:scale"}
    assert uva <= set(PUBLISHED_PATTERNS)
    mgipsim = {p for p in PUBLISHED_PATTERNS if p.startswith("mgipsim:")}
    assert len(mgipsim) >= 17
    assert set(PUBLISHED_PATTERNS) == uva | mgipsim
    for pattern, name in PUBLISHED_PATTERNS.items():
        assert pattern in CATALOGUE[name].covers
    covered = {p for f in CATALOGUE.values() for p in f.covers}
    assert covered == set(PUBLISHED_PATTERNS)


# -- check_params ------------------------------------------------------------------------------
def test_check_params_refuses_an_unknown_parameter_naming_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'bias'.*unknown parameter 'gain'.*allowed: offset"):
        check_params(CATALOGUE["bias"], {"gain": 2.0})
    with pytest.raises(ValueError, match=r"unknown parameter 'x'.*allowed: gain, offset_mg_dl\)"):
        check_params(CATALOGUE["calibration_error"], {"x": 1.0})
    with pytest.raises(ValueError, match=r"unknown parameter 'offset'.*allowed: none"):
        check_params(CATALOGUE["stuck"], {"offset": 1.0})


def test_check_params_refuses_a_value_out_of_range_naming_value_and_range():
    with pytest.raises(ValueError, match=r"offset=600 is not allowed: -500\.\.500 mg/dL"):
        check_params(CATALOGUE["bias"], {"offset": 600})
    with pytest.raises(ValueError, match=r"severity=1\.5 is not allowed: 0\.\.1 1"):
        check_params(CATALOGUE["occlusion"], {"severity": 1.5})
    with pytest.raises(ValueError, match=r"factor=0\.9 is not allowed: 1\.\.10"):
        check_params(CATALOGUE["over_delivery"], {"factor": 0.9})
    with pytest.raises(ValueError, match=r"offset=inf"):
        check_params(CATALOGUE["bias"], {"offset": math.inf})


@pytest.mark.parametrize("value", [True, False, math.nan, "5", None, [1.0]])
def test_check_params_refuses_what_is_not_a_number(value):
    with pytest.raises(ValueError, match=r"offset=.* is not a number"):
        check_params(CATALOGUE["bias"], {"offset": value})


def test_check_params_fills_in_defaults_and_accepts_the_range_bounds():
    assert check_params(CATALOGUE["calibration_error"], {}) == {"gain": 1.2, "offset_mg_dl": -10.0}
    got = check_params(CATALOGUE["calibration_error"], {"gain": 2})
    assert got == {"gain": 2.0, "offset_mg_dl": -10.0}
    assert type(got["gain"]) is float
    assert check_params(CATALOGUE["bias"], {"offset": -500})["offset"] == -500.0
    assert check_params(CATALOGUE["bias"], {"offset": 500.0})["offset"] == 500.0
    assert check_params(CATALOGUE["stuck"], {}) == {}


def test_active_window_includes_its_start_and_excludes_its_end():
    a = make("bias")
    assert not a.active(9.999)
    assert a.active(10.0)
    assert a.active(19.999)
    assert not a.active(20.0)
    forever = make("bias", end=math.inf)
    assert forever.active(1e12)


# -- sensor faults ---------------------------------------------------------------------------
def check_value_fault(active: ActiveFault, expected: Any, messages: list[Any] | None = None):
    """Run a value fault on a CGM stream: outside unchanged, inside ``expected(t, v)``."""
    messages = messages if messages is not None else cgm_stream()
    out = feed(transform_of(active), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o.t_min == m.t_min
        assert o.glucose_mg_dl == pytest.approx(expected(m.t_min, m.glucose_mg_dl), abs=1e-9)
    assert active.hits == len(INSIDE)
    return out


def test_missing_data_drops_every_reading_in_the_window():
    a = make("missing_data")
    messages = cgm_stream()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    assert all(o is None for _, o in inside_pairs(messages, out))
    assert a.hits == len(INSIDE)


def test_missing_data_with_probability_half_drops_about_half():
    a = make("missing_data", {"probability": 0.5}, start=0.0, end=math.inf)
    messages = [CgmReading(float(t), 120.0) for t in range(2000)]
    out = feed(transform_of(a), messages)
    dropped = sum(o is None for o in out)
    assert 850 <= dropped <= 1150
    assert all(o == m for m, o in zip(messages, out, strict=True) if o is not None)
    assert a.hits == dropped


def test_missing_data_with_probability_zero_drops_nothing():
    a = make("missing_data", {"probability": 0.0})
    messages = cgm_stream()
    assert feed(transform_of(a), messages) == messages


def test_spike_positive_adds_its_magnitude():
    check_value_fault(make("spike_positive", {"magnitude_mg_dl": 70}), lambda t, v: v + 70.0)


def test_spike_negative_subtracts_its_magnitude_not_below_zero():
    check_value_fault(make("spike_negative", {"magnitude_mg_dl": 70}), lambda t, v: v - 70.0)
    low = [CgmReading(t, 50.0) for t in TIMES]
    check_value_fault(make("spike_negative", {"magnitude_mg_dl": 70}), lambda t, v: 0.0, low)


def test_spikes_with_probability_half_hit_about_half_the_readings():
    for name, sign in (("spike_positive", 1.0), ("spike_negative", -1.0)):
        a = make(name, {"magnitude_mg_dl": 50, "probability": 0.5}, start=0.0, end=math.inf)
        messages = [CgmReading(float(t), 200.0) for t in range(2000)]
        values = np.array([o.glucose_mg_dl for o in feed(transform_of(a), messages)])
        assert set(np.unique(values)) == {200.0, 200.0 + sign * 50.0}
        assert 850 <= np.sum(values != 200.0) <= 1150


@pytest.mark.parametrize("offset", [40.0, -25.0])
def test_bias_adds_its_offset(offset):
    check_value_fault(make("bias", {"offset": offset}), lambda t, v: v + offset)


def test_bias_on_a_chosen_field_of_an_exo_reading():
    a = make("bias", {"offset": 2.0}, field="torque_sensor_nm")
    reading = ExoSensorReading(12.0, 0.5, 0.1, 3.0, 0.2, 0.3)
    out = transform_of(a)(reading)
    assert out == dataclasses.replace(reading, torque_sensor_nm=5.0)


def test_bias_on_an_exo_reading_changes_the_angle_by_default():
    a = make("bias", {"offset": 0.25})
    reading = ExoSensorReading(12.0, 0.5, 0.1, 3.0, 0.2, 0.3)
    assert transform_of(a)(reading) == dataclasses.replace(reading, angle_rad=0.75)


def test_drift_grows_linearly_per_hour_from_onset():
    # 12 mg/dL per hour: +0 at onset, +1 after 5 min, +1.9 after 9.5 min
    out = check_value_fault(
        make("drift", {"rate_per_h": 12}), lambda t, v: v + 12.0 * (t - START) / 60.0
    )
    assert out[TIMES.index(15.0)].glucose_mg_dl == pytest.approx(100.0 + 45.0 + 1.0)
    check_value_fault(
        make("drift", {"rate_per_h": -30}), lambda t, v: v - 30.0 * (t - START) / 60.0
    )


def test_scaling_multiplies():
    check_value_fault(make("scaling", {"factor": 1.3}), lambda t, v: v * 1.3)
    check_value_fault(make("scaling", {"factor": 0.5}), lambda t, v: v * 0.5)


def test_stuck_repeats_the_first_value_in_the_window_with_advancing_timestamps():
    a = make("stuck")
    messages = cgm_stream()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    first = messages[TIMES.index(START)].glucose_mg_dl
    for m, o in inside_pairs(messages, out):
        assert o.glucose_mg_dl == first
        assert o.t_min == m.t_min
    assert len({m.glucose_mg_dl for m, _ in inside_pairs(messages, out)}) > 1


def test_stuck_holds_again_from_the_next_window_onset():
    a = make("stuck", start=10.0, end=20.0)
    transform = transform_of(a)
    feed(transform, cgm_stream())
    a.start, a.end = 30.0, 40.0  # a second window: the old held value must not come back
    out = feed(transform, [CgmReading(30.0, 77.0), CgmReading(31.0, 88.0)])
    assert [o.glucose_mg_dl for o in out] == [77.0, 77.0]


def test_clamp_max_and_min_report_their_value():
    check_value_fault(make("clamp_max"), lambda t, v: 400.0)
    check_value_fault(make("clamp_min"), lambda t, v: 40.0)
    check_value_fault(make("clamp_max", {"value_mg_dl": 350}), lambda t, v: 350.0)
    check_value_fault(make("clamp_min", {"value_mg_dl": 55}), lambda t, v: 55.0)


def test_zero_reading_reports_zero():
    check_value_fault(make("zero_reading"), lambda t, v: 0.0)


def test_noise_burst_adds_zero_mean_noise_of_its_sd():
    a = make("noise_burst", {"sd": 25}, start=100.0, end=math.inf)
    messages = [CgmReading(float(t), 150.0) for t in range(2100)]
    out = feed(transform_of(a), messages)
    assert all(o == m for m, o in zip(messages[:100], out[:100], strict=True))
    errors = np.array([o.glucose_mg_dl - 150.0 for o in out[100:]])
    assert len(errors) == 2000
    assert np.all(errors != 0.0)
    assert abs(errors.mean()) < 2.0  # 3.5 standard errors (25/sqrt(2000) ~ 0.56)
    assert 22.5 < errors.std() < 27.5
    assert [o.t_min for o in out] == [m.t_min for m in messages]


def test_compression_low_is_a_half_sine_dip_deepest_at_mid_window():
    a = make("compression_low", {"depth_mg_dl": 60}, start=100.0, end=200.0)
    times = (50.0, 100.0, 125.0, 150.0, 175.0, 199.0, 200.0)
    messages = [CgmReading(t, 180.0) for t in times]
    out = feed(transform_of(a), messages)
    got = [o.glucose_mg_dl for o in out]
    dip = 60.0 * math.sin(math.pi / 4)
    assert got[0] == 180.0 and out[0] == messages[0]
    assert got[1] == pytest.approx(180.0)  # onset: no dip yet
    assert got[2] == pytest.approx(180.0 - dip)
    assert got[3] == pytest.approx(120.0)  # mid-window: the full depth
    assert got[4] == pytest.approx(180.0 - dip)
    assert got[5] == pytest.approx(180.0 - 60.0 * math.sin(math.pi * 0.99))
    assert out[6] == messages[6]
    assert min(got) == got[3]


def test_compression_low_does_not_go_below_zero_and_is_flat_for_an_open_window():
    a = make("compression_low", {"depth_mg_dl": 60}, start=100.0, end=200.0)
    assert transform_of(a)(CgmReading(150.0, 30.0)).glucose_mg_dl == 0.0
    forever = make("compression_low", {"depth_mg_dl": 60}, start=100.0, end=math.inf)
    out = feed(transform_of(forever), [CgmReading(t, 180.0) for t in (100.0, 500.0, 1e5)])
    assert [o.glucose_mg_dl for o in out] == [120.0, 120.0, 120.0]


def test_calibration_error_is_gain_then_offset():
    check_value_fault(
        make("calibration_error", {"gain": 1.2, "offset_mg_dl": -10}), lambda t, v: v * 1.2 - 10
    )


def test_delay_delivers_the_message_from_lag_earlier_with_its_old_timestamp():
    a = make("delay", {"lag": 3}, start=10.0, end=20.0)
    times = tuple(float(t) for t in range(30))
    messages = cgm_stream(times)
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for t in range(10, 20):
        assert out[t] == messages[t - 3]  # the old message: old time, old value
        assert out[t].t_min == t - 3.0
    assert a.hits == 10


def test_delay_delivers_nothing_until_there_is_lag_of_history():
    a = make("delay", {"lag": 3}, start=1.0, end=10.0)
    messages = cgm_stream(tuple(float(t) for t in range(8)))
    out = feed(transform_of(a), messages)
    assert out[0] == messages[0]
    assert out[1] is None and out[2] is None
    assert out[3] == messages[0]
    assert out[7] == messages[4]


def test_delay_of_zero_passes_the_current_message():
    a = make("delay", {"lag": 0})
    messages = cgm_stream()
    assert feed(transform_of(a), messages) == messages


def test_replay_delivers_the_old_value_with_the_current_timestamp():
    a = make("replay", {"lag": 5}, start=10.0, end=20.0)
    times = tuple(float(t) for t in range(30))
    messages = cgm_stream(times)
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for t in range(10, 20):
        assert out[t].t_min == float(t)
        assert out[t].glucose_mg_dl == messages[t - 5].glucose_mg_dl
        assert out[t].glucose_mg_dl != messages[t].glucose_mg_dl


def test_replay_delivers_nothing_without_enough_history():
    a = make("replay", {"lag": 5}, start=2.0, end=10.0)
    messages = cgm_stream(tuple(float(t) for t in range(8)))
    out = feed(transform_of(a), messages)
    assert out[:2] == messages[:2]
    assert out[2:5] == [None, None, None]
    assert out[5] == CgmReading(5.0, messages[0].glucose_mg_dl)


# -- actuator faults -----------------------------------------------------------------------------
def check_delivery_fault(active: ActiveFault, expected: Any) -> list[Any]:
    """Outside unchanged; inside ``expected(delivery) -> (basal_u, bolus_u)``."""
    messages = deliveries()
    out = feed(transform_of(active), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        basal, bolus = expected(m)
        assert o.t_min == m.t_min
        assert o.basal_u == pytest.approx(basal, abs=1e-12)
        assert o.bolus_u == pytest.approx(bolus, abs=1e-12)
    return out


def test_occlusion_withholds_its_severity_of_each_delivery():
    check_delivery_fault(make("occlusion"), lambda d: (0.0, 0.0))
    check_delivery_fault(
        make("occlusion", {"severity": 0.25}), lambda d: (0.75 * d.basal_u, 0.75 * d.bolus_u)
    )


def test_under_and_over_delivery_scale_basal_and_bolus():
    check_delivery_fault(
        make("under_delivery", {"factor": 0.4}), lambda d: (0.4 * d.basal_u, 0.4 * d.bolus_u)
    )
    check_delivery_fault(
        make("over_delivery", {"factor": 1.5}), lambda d: (1.5 * d.basal_u, 1.5 * d.bolus_u)
    )


def test_stopped_delivery_delivers_nothing():
    out = check_delivery_fault(make("stopped_delivery"), lambda d: (0.0, 0.0))
    assert all(o.total_u == 0.0 for o in out[TIMES.index(START) : TIMES.index(END)])


def test_actuator_faults_pass_other_messages():
    command = InsulinCommand(12.0, 1.0, 2.0, 30.0)
    for name in ("occlusion", "under_delivery", "stopped_delivery", "duplicated_bolus"):
        assert transform_of(make(name))(command) == command


def test_stuck_rate_holds_the_basal_at_onset_and_gives_no_bolus():
    messages = deliveries()
    onset_basal = messages[TIMES.index(START)].basal_u
    check_delivery_fault(make("stuck_rate"), lambda d: (onset_basal, 0.0))


def test_stuck_rate_holds_the_rate_of_the_next_onset_in_a_new_window():
    a = make("stuck_rate", start=10.0, end=20.0)
    transform = transform_of(a)
    feed(transform, deliveries())
    a.start, a.end = 30.0, 40.0  # a second window: the old stuck rate must not come back
    out = feed(transform, [InsulinDelivery(30.0, 0.5, 1.0), InsulinDelivery(31.0, 0.1, 0.0)])
    assert [(o.basal_u, o.bolus_u) for o in out] == [(0.5, 0.0), (0.5, 0.0)]


def test_false_bolus_adds_its_units_once():
    a = make("false_bolus", {"units": 3})
    messages = deliveries()
    out = feed(transform_of(a), messages)
    first = TIMES.index(START)
    for i, (m, o) in enumerate(zip(messages, out, strict=True)):
        if i == first:
            assert o.bolus_u == pytest.approx(m.bolus_u + 3.0)
            assert o.basal_u == m.basal_u and o.t_min == m.t_min
        else:
            assert o == m
    assert a.hits == 1


def test_duplicated_bolus_doubles_boluses_only():
    check_delivery_fault(make("duplicated_bolus"), lambda d: (d.basal_u, 2.0 * d.bolus_u))


def test_max_and_min_basal_deliver_their_rate_per_minute():
    check_delivery_fault(make("max_basal", {"rate_u_per_h": 6}), lambda d: (0.1, d.bolus_u))
    check_delivery_fault(make("min_basal"), lambda d: (0.0, d.bolus_u))
    check_delivery_fault(make("min_basal", {"rate_u_per_h": 1.2}), lambda d: (0.02, d.bolus_u))


def test_basal_bias_offsets_the_basal_per_minute_not_below_zero():
    check_delivery_fault(
        make("basal_bias", {"offset_u_per_h": 0.6}), lambda d: (d.basal_u + 0.01, d.bolus_u)
    )
    check_delivery_fault(make("basal_bias", {"offset_u_per_h": -30}), lambda d: (0.0, d.bolus_u))


# -- data faults -----------------------------------------------------------------------------
def meals() -> list[MealAnnouncement]:
    return [MealAnnouncement(t, 30.0 + t) for t in TIMES]


def test_missed_meal_announcement_drops_announcements_in_the_window():
    a = make("missed_meal_announcement")
    messages = meals()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    assert all(o is None for _, o in inside_pairs(messages, out))


def test_missed_meal_announcement_with_probability_half_drops_about_half():
    a = make("missed_meal_announcement", {"probability": 0.5}, start=0.0, end=math.inf)
    messages = [MealAnnouncement(float(t), 40.0) for t in range(2000)]
    dropped = sum(o is None for o in feed(transform_of(a), messages))
    assert 850 <= dropped <= 1150


def test_wrong_carb_count_divides_the_announced_carbs():
    a = make("wrong_carb_count", {"factor": 2.5})
    messages = meals()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o == MealAnnouncement(m.t_min, pytest.approx(m.carbs_g / 2.5))


def test_false_meal_is_a_source_announcing_once_at_onset():
    a = make("false_meal", {"carbs_g": 60}, start=302.0, end=400.0, channel="meal->controller")
    source = transform_of(a)
    assert source(295.0, 300.0) == []
    assert source(300.0, 305.0) == [MealAnnouncement(302.0, 60.0)]
    assert source(300.0, 305.0) == []  # never again
    assert source(305.0, 310.0) == []
    assert a.hits == 1


def test_false_meal_window_is_closed_at_t0_and_open_at_t1():
    a = make("false_meal", start=300.0, end=400.0)
    source = transform_of(a)
    assert source(295.0, 300.0) == []
    assert source(300.0, 305.0) == [MealAnnouncement(300.0, 60.0)]


@dataclasses.dataclass(frozen=True)
class FakeController:
    carb_ratio_g_per_u: float = 10.0
    correction_factor_mg_dl_per_u: float = 40.0


@dataclasses.dataclass
class FakeLoop:
    controller: Any = dataclasses.field(default_factory=FakeController)
    channels: dict[str, Channel[Any]] = dataclasses.field(default_factory=dict)


@pytest.mark.parametrize(
    ("name", "attribute", "factor", "other"),
    [
        ("wrong_carb_ratio", "carb_ratio_g_per_u", 0.7, "correction_factor_mg_dl_per_u"),
        ("wrong_correction_factor", "correction_factor_mg_dl_per_u", 0.5, "carb_ratio_g_per_u"),
    ],
)
def test_controller_parameter_faults_scale_in_the_window_and_restore_after(
    name, attribute, factor, other
):
    loop = FakeLoop()
    original = getattr(loop.controller, attribute)
    a = make(name, {"factor": factor}, start=10.0, end=20.0)
    a.loop = loop
    hook = transform_of(a)
    seen = {}
    for t0 in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):
        assert hook(t0, t0 + 5.0) == []
        seen[t0] = getattr(loop.controller, attribute)
        assert getattr(loop.controller, other) == getattr(FakeController(), other)
    assert seen[0.0] == seen[5.0] == original
    # scaled once, not compounded tick after tick
    assert seen[10.0] == seen[15.0] == pytest.approx(original * factor)
    assert seen[20.0] == seen[25.0] == original
    assert a.hits == 1


def test_controller_parameter_fault_without_a_controller_does_nothing():
    a = make("wrong_carb_ratio")
    a.loop = object()
    assert transform_of(a)(10.0, 15.0) == []
    assert a.hits == 0


# -- timing faults -----------------------------------------------------------------------------
def faults_loop() -> tuple[FakeLoop, list[Any]]:
    channel: Channel[Any] = Channel("runtime->faults")
    got: list[Any] = []
    channel.listen(lambda _, m: got.append(m))
    return FakeLoop(channels={"runtime->faults": channel}), got


def test_deadline_overrun_discards_the_command_and_reports_it():
    loop, reported = faults_loop()
    a = make("deadline_overrun", {"overrun_factor": 3})
    a.loop = loop
    messages = [InsulinCommand(t, 1.0, 0.5, 30.0) for t in TIMES]
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    assert all(o is None for _, o in inside_pairs(messages, out))
    assert [f.t_min for f in reported] == list(INSIDE)
    for f in reported:
        assert isinstance(f, AgentFault)
        assert f.agent == "controller"
        assert f.fallback == "command discarded"
        assert f.error.startswith("TimeoutError")
        assert "3x" in f.error


def test_deadline_overrun_on_the_exo_loop_reports_in_minutes():
    loop, reported = faults_loop()
    a = make("deadline_overrun", start=10.0, end=20.0)
    a.loop = loop
    transform = transform_of(a)
    assert transform(ExoTorqueCommand(12.0, 4.0)) is None
    command = ExoTorqueCommand(25.0, 4.0)
    assert transform(command) == command
    assert [f.t_min for f in reported] == [pytest.approx(0.2)]


def test_deadline_overrun_with_probability_half_discards_about_half():
    loop, reported = faults_loop()
    a = make("deadline_overrun", {"probability": 0.5}, start=0.0, end=math.inf)
    a.loop = loop
    out = feed(transform_of(a), [InsulinCommand(float(t), 1.0, 0.0, 30.0) for t in range(2000)])
    dropped = sum(o is None for o in out)
    assert 850 <= dropped <= 1150
    assert len(reported) == dropped == a.hits


def test_deadline_overrun_without_a_faults_channel_still_discards():
    a = make("deadline_overrun")
    assert transform_of(a)(InsulinCommand(12.0, 1.0, 0.0, 30.0)) is None


def test_clock_jitter_moves_timestamps_by_its_sd_and_keeps_values():
    a = make("clock_jitter", {"sd": 1.0}, start=100.0, end=math.inf)
    messages = [CgmReading(float(t), 140.0 + t) for t in range(2100)]
    out = feed(transform_of(a), messages)
    assert all(o == m for m, o in zip(messages[:100], out[:100], strict=True))
    errors = np.array([o.t_min - m.t_min for m, o in zip(messages[100:], out[100:], strict=True)])
    assert np.all(errors != 0.0)
    assert abs(errors.mean()) < 0.12
    assert 0.9 < errors.std() < 1.1
    assert all(o.glucose_mg_dl == m.glucose_mg_dl for m, o in zip(messages, out, strict=True))


def test_clock_jitter_moves_exo_timestamps_in_seconds():
    a = make("clock_jitter", {"sd": 0.5})
    reading = ExoSensorReading(12.0, 0.5, 0.1, 3.0, 0.2, 0.3)
    out = transform_of(a)(reading)
    assert out.t_s != reading.t_s
    assert dataclasses.replace(out, t_s=12.0) == reading


def test_clock_drift_stretches_time_from_onset():
    a = make("clock_drift", {"ppm": 50000})
    messages = cgm_stream()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o.t_min == pytest.approx(m.t_min + 0.05 * (m.t_min - START))
        assert o.glucose_mg_dl == m.glucose_mg_dl
    assert out[TIMES.index(15.0)].t_min == pytest.approx(15.25)
    slow = make("clock_drift", {"ppm": -100000})
    assert transform_of(slow)(CgmReading(15.0, 1.0)).t_min == pytest.approx(14.5)


# -- exoskeleton faults ----------------------------------------------------------------------
def exo_readings(times: tuple[float, ...] = TIMES) -> list[ExoSensorReading]:
    return [ExoSensorReading(t, 0.1 * t, 0.2, 1.0 + t, 0.3, 0.4) for t in times]


def torques(times: tuple[float, ...] = TIMES) -> list[ExoTorqueCommand]:
    return [
        ExoTorqueCommand(t, v) for t, v in zip(times, [8, -8, 3, 8, -8, 3, 0, 8, -8], strict=True)
    ]


def test_encoder_glitch_with_probability_one_moves_every_angle_by_the_magnitude():
    a = make("encoder_glitch", {"magnitude": 0.3, "probability": 1.0}, start=0.0, end=50.0)
    messages = exo_readings(tuple(float(t) for t in range(60)))
    out = feed(transform_of(a), messages)
    steps = []
    for m, o in zip(messages, out, strict=True):
        if m.t_s >= 50.0:
            assert o == m
            continue
        steps.append(o.angle_rad - m.angle_rad)
        assert dataclasses.replace(o, angle_rad=m.angle_rad) == m
    assert len(steps) == 50  # the readings at 0-49 s, inside the window
    assert np.allclose(np.abs(steps), 0.3)
    assert min(steps) < 0 < max(steps)  # both directions


def test_encoder_glitch_with_low_probability_glitches_some_readings():
    a = make("encoder_glitch", {"magnitude": 0.3, "probability": 0.2}, start=0.0, end=math.inf)
    messages = exo_readings(tuple(float(t) for t in range(2000)))
    out = feed(transform_of(a), messages)
    changed = sum(
        not math.isclose(o.angle_rad, m.angle_rad) for m, o in zip(messages, out, strict=True)
    )
    assert 300 <= changed <= 500


def test_encoder_glitch_with_probability_zero_changes_nothing():
    a = make("encoder_glitch", {"probability": 0.0})
    messages = exo_readings()
    assert feed(transform_of(a), messages) == messages


def test_torque_sensor_bias_adds_to_the_torque_sensor_only():
    a = make("torque_sensor_bias", {"offset_nm": -4})
    messages = exo_readings()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o == dataclasses.replace(m, torque_sensor_nm=m.torque_sensor_nm - 4.0)


def test_torque_saturation_clamps_the_command():
    a = make("torque_saturation", {"limit_nm": 5})
    messages = torques()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o.torque_nm == max(-5.0, min(5.0, m.torque_nm))
        assert o.t_s == m.t_s
    assert {o.torque_nm for _, o in inside_pairs(messages, out)} == {5.0, -5.0, 3.0, 0.0}


def test_sign_flip_negates_the_torque_command():
    a = make("sign_flip")
    messages = torques()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o == ExoTorqueCommand(m.t_s, -m.torque_nm)


def test_sign_flip_on_the_torque_sensor_field():
    a = make("sign_flip", channel="sensor->controller", field="torque_sensor_nm")
    reading = ExoSensorReading(12.0, 0.5, 0.1, 3.0, 0.2, 0.3)
    assert transform_of(a)(reading) == dataclasses.replace(reading, torque_sensor_nm=-3.0)


def test_emg_loss_zeroes_both_envelopes_only():
    a = make("emg_loss")
    messages = exo_readings()
    out = feed(transform_of(a), messages)
    assert_outside_untouched(messages, out)
    for m, o in inside_pairs(messages, out):
        assert o == dataclasses.replace(m, emg_quad=0.0, emg_ham=0.0)
    command = ExoTorqueCommand(12.0, 3.0)
    assert transform_of(a)(command) == command


TESTED = {
    "basal_bias",
    "missing_data",
    "spike_positive",
    "spike_negative",
    "bias",
    "drift",
    "scaling",
    "stuck",
    "clamp_max",
    "clamp_min",
    "zero_reading",
    "noise_burst",
    "compression_low",
    "calibration_error",
    "delay",
    "replay",
    "occlusion",
    "under_delivery",
    "over_delivery",
    "stuck_rate",
    "stopped_delivery",
    "false_bolus",
    "duplicated_bolus",
    "max_basal",
    "min_basal",
    "false_meal",
    "missed_meal_announcement",
    "wrong_carb_count",
    "wrong_carb_ratio",
    "wrong_correction_factor",
    "deadline_overrun",
    "clock_jitter",
    "clock_drift",
    "encoder_glitch",
    "torque_sensor_bias",
    "torque_saturation",
    "sign_flip",
    "emg_loss",
}


def test_every_non_wire_fault_has_an_effect_test_here():
    assert {name for name in CATALOGUE if name not in WIRE} == TESTED


# -- attach on a real glucose loop ---------------------------------------------------------------
PATIENT = "adult#001"


def glucose_loop() -> PatientLoop:
    config = LoopConfig(patients=(PATIENT,), days=1)
    return PatientLoop(get_patient(PATIENT), config, np.random.default_rng(0))


def record(loop: PatientLoop, channel: str) -> list[Any]:
    got: list[Any] = []
    loop.channels[channel].listen(lambda _, m: got.append(m))
    return got


def record_raw(loop: PatientLoop, channel: str) -> list[Any]:
    """What enters ``channel`` before any fault (a pass-through transform added first)."""
    got: list[Any] = []

    def tap(m: Any) -> Any:
        got.append(m)
        return m

    loop.channels[channel].add_transform(tap)
    return got


def test_attach_refuses_a_wire_fault():
    loop = glucose_loop()
    with pytest.raises(ValueError, match=r"'timeout'.*HIL"):
        attach_faults(loop, [make("timeout")])


def test_attach_refuses_a_channel_the_loop_lacks():
    loop = glucose_loop()
    with pytest.raises(ValueError, match=r"'bias'.*no channel 'task->controller'"):
        attach_faults(loop, [make("bias", channel="task->controller")])


def test_bias_on_a_real_loop_shifts_delivered_readings_and_leaves_the_truth_channel_alone():
    start, end = 300.0, 600.0
    faulty, clean = glucose_loop(), glucose_loop()
    raw = record_raw(faulty, "sensor->controller")
    active = make("bias", {"offset": 40}, start=start, end=end)
    attach_faults(faulty, [active])
    assert active.loop is faulty
    delivered = record(faulty, "sensor->controller")
    truth = record(faulty, "plant->sensor")
    clean_truth = record(clean, "plant->sensor")
    clean_readings = record(clean, "sensor->controller")
    faulty.run()
    clean.run()

    assert len(raw) == len(delivered) > 0
    inside = 0
    for r, d in zip(raw, delivered, strict=True):
        assert d.t_min == r.t_min
        if start <= r.t_min < end:
            assert d.glucose_mg_dl == pytest.approx(r.glucose_mg_dl + 40.0)
            inside += 1
        else:
            assert d == r
    assert inside == active.hits > 0
    # the truth carries no fault: identical to the clean loop's until the loop reacts
    assert all(isinstance(m, PlantGlucose) for m in truth)
    assert [m.t_min for m in truth] == [m.t_min for m in clean_truth]
    before = [i for i, m in enumerate(truth) if m.t_min <= start]
    assert [truth[i] for i in before] == [clean_truth[i] for i in before]
    # the raw sensor stream before onset is the clean loop's delivered stream
    pre = [m for m in raw if m.t_min < start]
    assert pre == [m for m in clean_readings if m.t_min < start]


def test_occlusion_on_the_actuator_channel_starves_the_patient_silently():
    start, end = 300.0, 600.0
    faulty, clean = glucose_loop(), glucose_loop()
    reported = record_raw(faulty, "actuator->plant")
    active = make("occlusion", {"severity": 1.0}, start=start, end=end)
    attach_faults(faulty, [active])
    received = record(faulty, "actuator->plant")
    truth, clean_truth = record(faulty, "plant->sensor"), record(clean, "plant->sensor")
    iob_records: list[float] = []
    real_record = faulty.iob.record
    faulty.iob.record = lambda units: (iob_records.append(units), real_record(units))[1]  # type: ignore[method-assign]
    faulty.run()
    clean.run()
    # the controller's insulin on board counts what the pump reported, not what got through
    assert iob_records == [d.total_u for d in reported]

    in_window = [d for d in received if start <= d.t_min < end]
    assert len(in_window) == end - start == active.hits
    assert all(d.total_u == 0.0 for d in in_window)
    # the pump itself meant to deliver insulin all along (the fault is silent)
    assert sum(d.total_u for d in reported if start <= d.t_min < end) > 1.0
    assert sum(d.total_u for d in received if d.t_min >= end) > 0.0

    def bg(stream: list[PlantGlucose], lo: float, hi: float) -> np.ndarray:
        return np.array([m.bg_mg_dl for m in stream if lo <= m.t_min < hi])

    assert np.array_equal(bg(truth, 0.0, start + 1), bg(clean_truth, 0.0, start + 1))
    assert bg(truth, end, end + 1)[0] > bg(clean_truth, end, end + 1)[0] + 20.0
    assert bg(truth, start, end + 120).mean() > bg(clean_truth, start, end + 120).mean()


def test_wrong_carb_ratio_on_a_real_loop_is_scaled_in_its_window_and_restored():
    start, end = 300.0, 600.0
    loop = glucose_loop()
    original = loop.controller.carb_ratio_g_per_u
    active = make("wrong_carb_ratio", {"factor": 0.5}, start=start, end=end)
    attach_faults(loop, [active])
    ratios: list[tuple[float, float]] = []
    loop.channels["controller->supervisor"].listen(
        lambda _, m: ratios.append((m.t_min, loop.controller.carb_ratio_g_per_u))
    )
    loop.run()
    assert ratios
    for t, ratio in ratios:
        want = original * 0.5 if start <= t < end else original
        assert ratio == pytest.approx(want), t
    assert loop.controller.carb_ratio_g_per_u == original
    assert active.hits == 1


def test_false_meal_on_a_real_loop_is_announced_once():
    start = 333.0
    loop = glucose_loop()
    assert start not in set(loop.meals.start_min.tolist())
    active = make("false_meal", {"carbs_g": 75}, start=start, end=start + 60)
    attach_faults(loop, [active])
    announced = record(loop, "meal->controller")
    loop.run()
    injected = [m for m in announced if m.t_min == start]
    assert injected == [MealAnnouncement(start, 75.0)]
    assert len(announced) == len(loop.meals) + 1


def test_deadline_overrun_on_a_real_loop_discards_commands_and_reports_them():
    start, end = 300.0, 360.0
    loop = glucose_loop()
    active = make("deadline_overrun", start=start, end=end)
    attach_faults(loop, [active])
    commands = record(loop, "controller->supervisor")
    faults = record(loop, "runtime->faults")
    approved = record(loop, "supervisor->actuator")
    loop.run()
    assert not [c for c in commands if start <= c.t_min < end]
    ticks = [float(t) for t in range(int(start), int(end), loop.config.control_period_min)]
    assert [f.t_min for f in faults] == ticks
    assert all(f.agent == "controller" for f in faults)
    # the supervisor still sends a command every tick of the window
    assert [a.t_min for a in approved if start <= a.t_min < end] == ticks
