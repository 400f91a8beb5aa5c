import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.knee.messages import ExoSensorReading, ExoTorqueCommand
from twinloop.agents.knee.supervisor import RULES, ExoSupervisor, ExoSupervisorConfig

T = 10.0
MID = math.radians(60.0)


def _reading(angle=MID, vel=0.0, t=T):
    return ExoSensorReading(t, angle, vel, 0.0, 0.0, 0.0)


def _review(sup, torque, reading=None, t=T):
    cmd = None if torque is None else ExoTorqueCommand(t, torque)
    return sup.review(t, cmd, _reading() if reading is None else reading)


def test_a_command_within_every_limit_passes_untouched():
    sup = ExoSupervisor()
    out, overrides = _review(sup, 12.5)
    assert out == ExoTorqueCommand(T, 12.5)
    assert overrides == []
    assert sup.interventions == dict.fromkeys(RULES, 0)


@pytest.mark.parametrize(
    "reading",
    [
        None,
        _reading(t=T - 0.031),
        _reading(angle=math.nan),
        _reading(vel=math.inf),
        _reading(t=math.nan),
    ],
    ids=["missing", "old", "nan angle", "inf velocity", "nan time"],
)
def test_stale_encoder_gives_zero_torque(reading):
    sup = ExoSupervisor()
    out, overrides = sup.review(T, ExoTorqueCommand(T, 10.0), reading)
    assert out.torque_nm == 0.0
    assert [(o.rule, o.requested_nm, o.approved_nm) for o in overrides] == [
        ("stale encoder", 10.0, 0.0)
    ]
    assert sup.interventions["stale encoder"] == 1


def test_a_reading_just_within_the_stale_time_is_fresh():
    sup = ExoSupervisor()
    out, overrides = sup.review(T, ExoTorqueCommand(T, 10.0), _reading(t=T - 0.029))
    assert out.torque_nm == 10.0 and overrides == []


@pytest.mark.parametrize("torque", [None, math.nan, math.inf, -math.inf])
def test_no_or_invalid_command_gives_zero_torque(torque):
    sup = ExoSupervisor()
    out, overrides = _review(sup, torque)
    assert out.torque_nm == 0.0
    assert len(overrides) == 1 and overrides[0].rule == "no command"
    assert overrides[0].approved_nm == 0.0 and math.isnan(overrides[0].requested_nm) == (
        torque is None or math.isnan(torque)
    )


def test_stale_and_missing_command_report_only_the_first_rule():
    sup = ExoSupervisor()
    out, overrides = sup.review(T, None, None)
    assert out.torque_nm == 0.0
    assert [o.rule for o in overrides] == ["stale encoder"]


@pytest.mark.parametrize(("torque", "approved"), [(55.0, 38.9), (-100.0, -38.9), (38.9, 38.9)])
def test_torque_is_clipped_to_the_limit_less_the_friction_margin(torque, approved):
    sup = ExoSupervisor()  # 40 N·m at the joint, 1.1 N·m of it kept for gear friction
    out, overrides = _review(sup, torque)
    assert out.torque_nm == approved
    assert [o.rule for o in overrides] == (["torque limit"] if torque != approved else [])


@pytest.mark.parametrize(
    ("angle_deg", "torque", "approved"),
    [
        (121.0, 5.0, 0.0),  # within the 5° margin of the 125° flexion end: no more flexion
        (130.0, 5.0, 0.0),  # beyond it
        (121.0, -5.0, -5.0),  # back into range passes
        (119.0, 5.0, 5.0),  # outside the margin
        (-1.0, -5.0, 0.0),  # within the margin of the −5° extension end: no more extension
        (-9.0, -5.0, 0.0),
        (-1.0, 5.0, 5.0),
        (1.0, -5.0, -5.0),
    ],
)
def test_range_of_motion_removes_torque_pushing_out(angle_deg, torque, approved):
    sup = ExoSupervisor()
    out, overrides = _review(sup, torque, _reading(angle=math.radians(angle_deg)))
    assert out.torque_nm == approved
    assert [o.rule for o in overrides] == (["range of motion"] if approved != torque else [])


@pytest.mark.parametrize(
    ("vel", "torque", "approved"),
    [(7.0, 5.0, 0.0), (-7.0, -5.0, 0.0), (7.0, -5.0, -5.0), (-7.0, 5.0, 5.0), (5.9, 5.0, 5.0)],
)
def test_velocity_limit_removes_torque_along_the_motion(vel, torque, approved):
    sup = ExoSupervisor()
    out, overrides = _review(sup, torque, _reading(vel=vel))
    assert out.torque_nm == approved
    assert [o.rule for o in overrides] == (["velocity limit"] if approved != torque else [])


def test_rules_apply_in_order_each_seeing_the_previous_result():
    sup = ExoSupervisor()
    out, overrides = _review(sup, 90.0, _reading(angle=math.radians(124.0), vel=8.0))
    assert out.torque_nm == 0.0
    assert [(o.rule, o.requested_nm, o.approved_nm) for o in overrides] == [
        ("torque limit", 90.0, 38.9),
        ("range of motion", 90.0, 0.0),
    ]
    # the velocity rule had nothing left to remove; inside the range it acts after the clip
    out, overrides = _review(sup, -90.0, _reading(vel=-8.0))
    assert [o.rule for o in overrides] == ["torque limit", "velocity limit"]
    assert [o.approved_nm for o in overrides] == [-38.9, 0.0]
    assert sup.interventions == {
        "stale encoder": 0,
        "no command": 0,
        "torque limit": 2,
        "range of motion": 1,
        "velocity limit": 1,
    }


def test_interventions_is_a_copy_and_the_supervisor_pickles():
    sup = ExoSupervisor(ExoSupervisorConfig(torque_limit_nm=10.0, friction_margin_nm=0.0))
    _review(sup, 20.0)
    sup.interventions["torque limit"] = 99
    assert sup.interventions["torque limit"] == 1
    clone = pickle.loads(pickle.dumps(sup))
    assert clone.interventions == sup.interventions
    assert clone.config == sup.config
    assert _review(clone, 20.0)[0].torque_nm == 10.0


def test_the_joint_never_feels_more_than_the_limit_from_a_back_driven_drive():
    """A command at the limit while the knee moves against it: gear friction adds to it."""
    from twinloop.plant.knee.model import KneePlant, knee_preset

    cfg = ExoSupervisorConfig()
    sup = ExoSupervisor(cfg)
    params = knee_preset("healthy")
    margin = params.exo_coulomb_nm + params.exo_viscous_nm_s_per_rad * cfg.velocity_limit_rad_s
    assert cfg.friction_margin_nm >= margin  # the default covers the default drive
    for direction in (-1.0, 1.0):
        knee = KneePlant(params, theta0_rad=math.radians(60.0))
        # the patient drives the knee hard against the drive's torque (back-driving it)
        knee.set_reference(math.radians(60.0) + direction * 2.0)
        worst = 0.0
        for k in range(300):
            reading = _reading(angle=knee.angle_rad, vel=knee.velocity_rad_s, t=k * 0.01)
            approved, _ = sup.review(
                k * 0.01, ExoTorqueCommand(k * 0.01, -direction * 1e3), reading
            )
            s = knee.step(approved.torque_nm, 0.01)
            if abs(s.velocity_rad_s) <= cfg.velocity_limit_rad_s:
                worst = max(worst, abs(s.exo_torque_nm))
        assert worst > cfg.command_limit_nm  # friction did add to the command
        assert worst <= cfg.torque_limit_nm


ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-200.0, max_value=200.0),
    st.sampled_from([0.0, -0.0, 1e300, -1e300, math.nan, math.inf, -math.inf]),
)


@settings(max_examples=400, deadline=None)
@given(
    torque=ANY_FLOAT,
    missing_command=st.booleans(),
    angle=st.one_of(st.floats(min_value=-1.0, max_value=3.5), ANY_FLOAT),
    vel=st.one_of(st.floats(min_value=-20.0, max_value=20.0), ANY_FLOAT),
    age=st.floats(min_value=-0.01, max_value=0.1),
    missing_reading=st.booleans(),
    limit=st.floats(min_value=0.1, max_value=100.0),
)
def test_whatever_the_controller_says_the_approved_torque_is_safe(
    torque, missing_command, angle, vel, age, missing_reading, limit
):
    cfg = ExoSupervisorConfig(torque_limit_nm=limit, friction_margin_nm=0.3 * limit)
    sup = ExoSupervisor(cfg)
    command = None if missing_command else ExoTorqueCommand(T, torque)
    reading = None if missing_reading else _reading(angle=angle, vel=vel, t=T - age)
    out, overrides = sup.review(T, command, reading)
    tau = out.torque_nm
    assert math.isfinite(tau)
    assert abs(tau) <= cfg.command_limit_nm < cfg.torque_limit_nm
    assert out.t_s == T
    if (
        missing_reading
        or age > cfg.encoder_stale_s
        or not (math.isfinite(angle) and math.isfinite(vel))
    ):
        assert tau == 0.0
    else:
        if angle >= cfg.rom_max_rad - cfg.rom_margin_rad:
            assert tau <= 0.0
        if angle <= cfg.rom_min_rad + cfg.rom_margin_rad:
            assert tau >= 0.0
        if abs(vel) > cfg.velocity_limit_rad_s:
            assert tau * vel <= 0.0
    changed = missing_command or tau != torque
    assert bool(overrides) == changed
    assert all(o.rule in RULES for o in overrides)
    assert len({o.rule for o in overrides}) == len(overrides)
    assert sum(sup.interventions.values()) == len(overrides)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"torque_limit_nm": 0.0}, "torque_limit_nm"),
        ({"torque_limit_nm": math.nan}, "torque_limit_nm"),
        ({"friction_margin_nm": -0.1}, "friction_margin_nm"),
        ({"friction_margin_nm": 40.0}, "friction_margin_nm"),
        ({"velocity_limit_rad_s": -1.0}, "velocity_limit_rad_s"),
        ({"rom_min_rad": math.inf}, "rom_min_rad"),
        ({"rom_max_rad": math.radians(-10.0)}, "rom_max_rad"),
        ({"rom_margin_rad": -0.01}, "rom_margin_rad"),
        ({"rom_margin_rad": 2.0}, "rom_margin_rad"),
        ({"encoder_stale_s": 0.0}, "encoder_stale_s"),
        ({"encoder_stale_s": True}, "encoder_stale_s"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(LoopConfigError, match=field) as info:
        ExoSupervisorConfig(**kwargs)
    assert info.value.field == field
