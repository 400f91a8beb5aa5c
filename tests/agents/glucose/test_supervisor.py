import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.glucose.supervisor import SafetySupervisor, SupervisorConfig
from twinloop.agents.messages import CgmReading, InsulinCommand, InsulinDelivery, TwinEstimate
from twinloop.plant.glucose.patients import get_patient, patient_names
from twinloop.policies.glucose.controllers import CONTROLLERS, ControllerInput, make_controller

ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([0.0, -0.0, 1e300, -1e300, math.nan, math.inf, -math.inf]),
)


def _supervisor(name="adult#001", **overrides):
    return SafetySupervisor(SupervisorConfig.for_patient(get_patient(name), **overrides))


@settings(max_examples=300, deadline=None)
@given(
    patient=st.sampled_from(patient_names()),
    basal=ANY_FLOAT,
    bolus=ANY_FLOAT,
    duration=ANY_FLOAT,
    glucose=st.floats(min_value=39.0, max_value=401.0),
    forecast=st.floats(min_value=0.0, max_value=600.0),
    cgm_age=st.floats(min_value=0.0, max_value=60.0),
    recent_bolus=st.floats(min_value=0.0, max_value=30.0),
    missing=st.booleans(),
)
def test_whatever_the_controller_says_every_limit_holds(
    patient, basal, bolus, duration, glucose, forecast, cgm_age, recent_bolus, missing
):
    sup = _supervisor(patient)
    cfg = sup.config
    t = 100.0
    sup.observe_delivery(InsulinDelivery(t - 30, 0.0, recent_bolus))
    sup.observe_cgm(CgmReading(t - cgm_age, glucose))
    sup.observe_estimate(TwinEstimate(t, glucose, 0.0, 0.0, 1.0, forecast, forecast))
    command = None if missing else InsulinCommand(t, basal, bolus, duration)
    out, overrides = sup.review(t, command)
    assert 0.0 <= out.basal_u_per_h <= max(cfg.max_temp_basal_u_per_h, cfg.scheduled_basal_u_per_h)
    assert 0.0 <= out.bolus_u <= cfg.max_bolus_u
    assert 0.0 < out.duration_min <= 30.0
    extra = max(out.basal_u_per_h - cfg.scheduled_basal_u_per_h, 0.0) * out.duration_min / 60
    assert out.bolus_u + extra <= max(cfg.max_iob_u - sup.net_iob_u, 0.0) + 1e-9
    if cgm_age > cfg.stale_after_min:
        assert out.bolus_u == 0.0 and out.basal_u_per_h == cfg.scheduled_basal_u_per_h
    elif glucose < 70.0 or forecast < 70.0:
        assert out.basal_u_per_h == 0.0 and out.bolus_u == 0.0
    if command is None or (out.basal_u_per_h, out.bolus_u) != (basal, bolus):
        assert overrides, "every change is recorded with a reason"
    else:
        assert not overrides


def test_max_temp_basal_is_the_smallest_of_three_rules():
    cfg = SupervisorConfig(scheduled_basal_u_per_h=1.0, max_basal_u_per_h=10.0)
    assert cfg.max_temp_basal_u_per_h == 3.0
    cfg = SupervisorConfig(scheduled_basal_u_per_h=1.0, max_basal_u_per_h=2.5)
    assert cfg.max_temp_basal_u_per_h == 2.5


def test_overrides_name_their_reason():
    sup = _supervisor()
    sup.observe_cgm(CgmReading(0.0, 60.0))
    out, overrides = sup.review(5.0, InsulinCommand(5.0, 1.0, 2.0, 30.0))
    assert (out.basal_u_per_h, out.bolus_u) == (0.0, 0.0)
    assert overrides[-1].reason.startswith("low-glucose suspend (CGM")
    assert overrides[-1].requested_bolus_u == 2.0


def test_insulin_on_board_blocks_stacked_boluses():
    sup = _supervisor()
    sup.observe_cgm(CgmReading(0.0, 200.0))
    cap = sup.config.max_iob_u
    for _ in range(3):  # deliver boluses as the pump would
        out, _ = sup.review(0.0, InsulinCommand(0.0, sup.config.scheduled_basal_u_per_h, cap, 30))
        sup.observe_delivery(InsulinDelivery(0.0, 0.0, out.bolus_u))
    assert sup.net_iob_u <= cap + 1e-9
    out, overrides = sup.review(1.0, InsulinCommand(1.0, 0.5, 5.0, 30))
    assert out.bolus_u < 0.05 and any("insulin on board" in o.reason for o in overrides)


def test_stale_cgm_can_suspend():
    sup = _supervisor(stale_action="suspend")
    sup.observe_cgm(CgmReading(0.0, 150.0))
    out, overrides = sup.review(20.0, InsulinCommand(20.0, 1.0, 0.0, 30.0))
    assert out.basal_u_per_h == 0.0 and "stale CGM" in overrides[-1].reason


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_bolus_u", -1.0), ("stale_action", "panic"), ("max_temp_duration_min", 45.0)],
)
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(LoopConfigError, match=field):
        SupervisorConfig(scheduled_basal_u_per_h=1.0, **{field: value})


@settings(max_examples=150, deadline=None)
@given(
    controller=st.sampled_from(sorted(CONTROLLERS)),
    patient=st.sampled_from(patient_names()),
    steps=st.lists(st.tuples(ANY_FLOAT, ANY_FLOAT, ANY_FLOAT, ANY_FLOAT), min_size=1, max_size=12),
)
def test_the_shield_holds_for_every_shipped_controller(controller, patient, steps):
    """Each controller of the registry, fed any observations, goes through the supervisor:
    what reaches the pump respects every limit (the shield of every policy)."""
    p = get_patient(patient)
    ctrl = make_controller(controller, p)
    sup = _supervisor(patient)
    cfg = sup.config
    for k, (glucose, iob, carbs, activity) in enumerate(steps):
        t = 5.0 * k
        obs = ControllerInput(t, glucose, 0.0, iob, carbs if carbs == carbs else 0.0, activity)
        try:
            dose = ctrl.decide(obs)
            command = InsulinCommand(t, dose.basal_u_per_h, dose.bolus_u, dose.duration_min)
        except (ValueError, ArithmeticError):  # a controller may refuse absurd input
            command = None
        if math.isfinite(glucose) and 39.0 <= glucose <= 401.0:
            sup.observe_cgm(CgmReading(t, glucose))
        out, _ = sup.review(t, command)
        assert (
            0.0 <= out.basal_u_per_h <= max(cfg.max_temp_basal_u_per_h, cfg.scheduled_basal_u_per_h)
        )
        assert 0.0 <= out.bolus_u <= cfg.max_bolus_u
        assert 0.0 < out.duration_min <= 30.0
        extra = max(out.basal_u_per_h - cfg.scheduled_basal_u_per_h, 0.0) * out.duration_min / 60
        assert out.bolus_u + extra <= max(cfg.max_iob_u - sup.net_iob_u, 0.0) + 1e-9
        sup.observe_delivery(InsulinDelivery(t, out.basal_u_per_h / 12, out.bolus_u))
