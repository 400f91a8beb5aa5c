import dataclasses
import math

import numpy as np
import pytest
from scipy.integrate import cumulative_trapezoid
from scipy.optimize import brentq

from twinloop.plant.errors import ConfigError, InvalidInputError, UnknownPatientError
from twinloop.plant.knee.model import (
    N_OUT,
    O_PATIENT_NM,
    O_REFLEX_H,
    O_REFLEX_Q,
    PRESETS,
    X_ACT_H,
    X_ACT_Q,
    X_MF_Q,
    X_OMEGA,
    X_THETA,
    KneeParams,
    KneePlant,
    advance,
    force_length,
    force_velocity,
    initial_state,
    knee_preset,
    passive_joint_moment,
    static_moment_nm,
)
from twinloop.plant.knee.sensors import EMGSpec, EncoderSpec, encoder_counts, normals
from twinloop.plant.knee.tasks import (
    K_TOTAL,
    CyclicFlexionExtension,
    HoldPosture,
    SitToStandExtension,
    reference_series,
    task_from_name,
)

DEG = math.pi / 180


def passive(name="healthy", **overrides):
    """A patient with no voluntary drive (the reflex, if any, stays)."""
    return knee_preset(name, strength_fraction=0.0, **overrides)


def drop(params, theta0, seconds, cmd=0.0):
    """Release a knee from rest; angles, velocities and patient torques every 1 ms."""
    x = initial_state(theta0)[None].copy()
    p = params.vector()[None]
    out = np.zeros((1, N_OUT))
    ref = np.array([[theta0, 0.0]])
    rows = []
    for _ in range(round(seconds * 1000)):
        advance(x, p, np.array([cmd]), ref, 1, out)
        rows.append((x[0, X_THETA], x[0, X_OMEGA], out[0, O_PATIENT_NM]))
    return np.array(rows)


def equilibrium(params):
    return brentq(lambda t: float(static_moment_nm(params, np.array(t))), 20 * DEG, 135 * DEG)


def test_passive_pendulum_released_from_60_deg_settles_at_the_gravity_equilibrium():
    p = passive()
    eq = equilibrium(p)
    # gravity hangs the shank down; the passive moment (extending beyond ≈ 60° of flexion)
    # holds it short of 90°
    assert 70 * DEG < eq < 88 * DEG
    slope = (static_moment_nm(p, np.array(eq + 1e-4)) - static_moment_nm(p, np.array(eq))) / 1e-4
    assert slope < 0  # a stable equilibrium
    traj = drop(p, 60 * DEG, 20.0)
    assert traj[:, 0].max() > eq + 5 * DEG  # it swings past the equilibrium first
    assert abs(traj[-1, 0] - eq) < 0.2 * DEG
    assert abs(traj[-1, 1]) < 1e-3


def _energy(params, traj, theta0):
    """Kinetic + potential energy (J); potential = −∫ static moment dθ from theta0."""
    grid = np.linspace(-20 * DEG, 160 * DEG, 20001)
    pe = -cumulative_trapezoid(static_moment_nm(params, grid), grid, initial=0.0)
    pe -= np.interp(theta0, grid, pe)
    return 0.5 * params.joint_inertia_kg_m2 * traj[:, 1] ** 2 + np.interp(traj[:, 0], grid, pe)


def test_energy_is_conserved_without_damping_and_never_increases_with_it():
    frictionless = passive(
        passive_damping_nm_s_per_rad=0.0,
        rom_damping_s_per_rad=0.0,  # the swing reaches the flexion end stop's damping
        exo_coulomb_nm=0.0,
        exo_viscous_nm_s_per_rad=0.0,
    )
    traj = drop(frictionless, 10 * DEG, 5.0)
    e = _energy(frictionless, traj, 10 * DEG)
    swing = 0.5 * frictionless.joint_inertia_kg_m2 * np.max(traj[:, 1] ** 2)
    assert swing > 5.0  # a real swing, not a knee at rest
    # symplectic Euler: bounded, no drift (2 %: the swing reaches the stiff flexion end stop)
    assert np.max(np.abs(e)) < 0.02 * swing
    assert abs(np.mean(e[-1000:])) < 0.005 * swing
    damped = passive()
    traj = drop(damped, 10 * DEG, 5.0)
    e = _energy(damped, traj, 10 * DEG)
    assert np.max(np.diff(e)) < 1e-3 * swing  # never gains energy (up to O(dt) wobble)
    assert e[-1] < -0.5 * swing  # and loses most of it


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_range_of_motion_limits_hold_against_the_full_exo_torque(direction):
    # lying supine: sitting upright, the hamstrings' passive moment alone (≈ 47 N·m at full
    # extension, Riener & Edrich) keeps the drive from reaching the extension limit
    p = passive(hip_flexion_rad=0.0)
    traj = drop(p, 45 * DEG, 3.0, cmd=direction * p.exo_max_torque_nm)
    limit = p.rom_extension_limit_rad if direction < 0 else p.rom_flexion_limit_rad
    beyond = direction * (traj[:, 0] - limit)
    # soft, but it holds, even when the knee is slammed into it from 45° at > 10 rad/s
    assert np.abs(traj[:, 1]).max() > 10.0
    assert beyond.max() < 12 * DEG
    assert 0 < beyond[-1] < 7 * DEG  # the 60 N·m do push it slightly past the soft limit
    assert abs(traj[-1, 1]) < 1e-2


def test_activation_follows_first_order_dynamics_with_its_time_constants():
    p = knee_preset(
        "healthy", intent_kp_nm_per_rad=1e5, intent_kd_nm_s_per_rad=0.0,
        static_compensation_fraction=0.0,
    )  # fmt: skip
    knee = KneePlant(p, theta0_rad=45 * DEG)
    knee.set_reference(-10.0)  # far in extension: quadriceps excitation saturates at 1
    a = []
    for _ in range(60):
        knee.step(0.0, 0.001)
        a.append(knee.x[X_ACT_Q])
    t = np.arange(1, 61) * 1e-3
    np.testing.assert_allclose(a, 1 - np.exp(-t / p.activation_time_constant_s), atol=1e-12)
    assert knee.x[X_ACT_H] == 0.0
    knee.set_reference(10.0)  # now flexion: quadriceps off, it deactivates more slowly
    a0 = knee.x[X_ACT_Q]
    a = []
    for _ in range(60):
        knee.step(0.0, 0.001)
        a.append(knee.x[X_ACT_Q])
    np.testing.assert_allclose(a, a0 * np.exp(-t / p.deactivation_time_constant_s), atol=1e-12)


def test_force_length_and_force_velocity_shapes():
    gamma = KneeParams().force_length_width
    assert force_length(1.0, gamma) == 1.0
    for d in (0.1, 0.3, 0.5):
        assert force_length(1 + d, gamma) == pytest.approx(force_length(1 - d, gamma))
        assert force_length(1 + d, gamma) < force_length(1 + d / 2, gamma) < 1.0
    assert force_length(1.5, gamma) == pytest.approx(math.exp(-0.25 / 0.45))
    a, f_len = 0.25, 1.4
    assert force_velocity(0.0, a, f_len) == 1.0
    assert force_velocity(-1.0, a, f_len) == 0.0  # no force at max shortening velocity
    assert force_velocity(-2.0, a, f_len) == 0.0
    assert force_velocity(-0.25, a, f_len) == pytest.approx(0.75 / 2.0)  # Hill hyperbola
    v = np.linspace(-1, 3, 401)
    f = np.array([force_velocity(x, a, f_len) for x in v])
    assert np.all(np.diff(f) > 0) and 1.3 < f[-1] < f_len
    h = 1e-7
    left = (force_velocity(0.0, a, f_len) - force_velocity(-h, a, f_len)) / h
    right = (force_velocity(h, a, f_len) - force_velocity(0.0, a, f_len)) / h
    assert left == pytest.approx(1 + 1 / a, rel=1e-4) and right == pytest.approx(left, rel=1e-4)


def _riener_edrich_deg(knee_deg, hip_deg, ankle_deg=0.0):
    """Riener & Edrich 1999's knee equation as printed: degrees in, N·m out (flexion +)."""
    return (
        math.exp(1.800 - 0.0460 * ankle_deg - 0.0352 * knee_deg + 0.0217 * hip_deg)
        - math.exp(-3.971 - 0.0004 * ankle_deg + 0.0495 * knee_deg - 0.0128 * hip_deg)
        - 4.820
        + math.exp(2.220 - 0.150 * knee_deg)
    )


@pytest.mark.parametrize("hip_deg", [0.0, 30.0, 60.0, 90.0])
def test_passive_moment_is_riener_and_edrich_inside_the_range_of_motion(hip_deg):
    p = knee_preset("healthy", hip_flexion_rad=hip_deg * DEG)
    row = p.vector()
    for knee_deg in (5.0, 20.0, 45.0, 70.0, 95.0, 120.0):
        want = _riener_edrich_deg(knee_deg, hip_deg)
        got = passive_joint_moment(row, knee_deg * DEG, 0.0)
        # the end stops add at most a few hundredths of a N·m this far inside the range
        assert got == pytest.approx(want, abs=0.05), knee_deg
    # the muscles carry no passive element of their own (R&E's moment already holds it):
    # the relaxed knee's static moment is gravity + that passive moment, nothing more
    th = np.array([10.0, 60.0, 110.0]) * DEG
    rest = static_moment_nm(p, th) - p.gravity_moment_nm * np.cos(th)
    np.testing.assert_allclose(rest, [passive_joint_moment(row, t, 0.0) for t in th])
    # viscous damping opposes the motion
    assert passive_joint_moment(row, 45 * DEG, 1.0) == pytest.approx(
        passive_joint_moment(row, 45 * DEG, 0.0) - p.passive_damping_nm_s_per_rad
    )


def test_sitting_upright_the_hamstrings_pull_the_extended_knee_into_flexion():
    supine = knee_preset("healthy", hip_flexion_rad=0.0).vector()
    seated = knee_preset("healthy", hip_flexion_rad=90 * DEG).vector()
    for knee_deg in (0.0, 15.0, 30.0):
        assert (
            passive_joint_moment(seated, knee_deg * DEG, 0.0)
            > passive_joint_moment(supine, knee_deg * DEG, 0.0) + 5.0
        )
    # and the relaxed shank rests more extended lying supine than sitting (hamstrings slack)
    assert equilibrium(knee_preset("healthy", hip_flexion_rad=0.0)) < equilibrium(
        knee_preset("healthy", hip_flexion_rad=90 * DEG)
    )


def test_fatigue_lowers_max_torque_under_sustained_drive_and_recovers_at_rest():
    p = knee_preset("healthy", intent_kp_nm_per_rad=1e4, static_compensation_fraction=0.0)

    def max_effort(knee):
        """One second of maximal extension effort from 45°; the last patient torque (N·m)."""
        knee.x[X_THETA], knee.x[X_OMEGA] = 45 * DEG, 0.0
        knee.set_reference(-10.0)  # far beyond reach: quadriceps excitation saturates
        return knee.step(0.0, 1.0).patient_torque_nm

    knee = KneePlant(p, theta0_rad=45 * DEG)
    fresh = max_effort(knee)
    assert fresh < -150.0  # extension torques are negative
    for _ in range(59):  # a minute of sustained maximal drive, pressed on the extension limit
        knee.step(0.0, 1.0)
    fatigued = knee.x[X_MF_Q]
    assert fatigued > 0.45  # measured 0.547 (F 0.01414/s for a minute of full drive)
    tired = max_effort(knee)
    assert tired > 0.55 * fresh  # much weaker (measured 0.47 of the fresh torque)
    rest = KneePlant(dataclasses.replace(p, strength_fraction=0.0), theta0_rad=90 * DEG)
    rest.x[:] = knee.x
    rest.step(0.0, 600.0)  # ten minutes without voluntary drive
    assert rest.x[X_MF_Q] < 0.1 * fatigued  # recovers at r·R at rest (R alone: 0.36 of it)
    knee.x[:] = rest.x
    recovered = max_effort(knee)
    assert recovered < tired - 20.0  # stronger again


@pytest.mark.parametrize("rest_factor", [1.0, 14.85])
def test_fatigued_units_recover_at_r_times_R_at_rest(rest_factor):
    """3CC-r (Looft et al. 2018): with no target load, ``Ṁ_F = −r·R·M_F`` (``M_A`` is 0)."""
    p = knee_preset("healthy", strength_fraction=0.0, rest_recovery_factor=rest_factor)
    knee = KneePlant(p, theta0_rad=80 * DEG)
    knee.x[X_MF_Q] = 0.5
    knee.step(0.0, 100.0)
    want = 0.5 * math.exp(-rest_factor * p.recovery_rate_per_s * 100.0)
    assert knee.x[X_MF_Q] == pytest.approx(want, rel=1e-3)


def test_a_working_muscle_does_not_get_the_rest_recovery():
    """r multiplies R only while a muscle has no excitation (Looft's rest intervals), not while
    it works with a falling activation (MyoSuite's M_A >= target rule would apply it then)."""

    def fatigue_trace(rest_factor):
        p = knee_preset("healthy", rest_recovery_factor=rest_factor)
        knee = KneePlant(p, theta0_rad=45 * DEG)
        knee.x[X_MF_Q] = 0.3
        trace = []
        for k in range(6000):  # 60 s of 45 ± 10° at 0.5 Hz: the quadriceps hold the shank up
            t = k * 0.01
            knee.set_reference(
                45 * DEG + 10 * DEG * math.sin(math.pi * t),
                10 * DEG * math.pi * math.cos(math.pi * t),
            )
            knee.step(0.0, 0.01)
            trace.append(knee.x[X_MF_Q])
        return np.array(trace)

    np.testing.assert_array_equal(fatigue_trace(1.0), fatigue_trace(14.85))


def _stretch(params, velocity, seconds=0.1):
    """Flex the knee at a constant velocity (imposed) from 20°; last patient torque, reflexes."""
    x = initial_state(20 * DEG)[None].copy()
    p = params.vector()[None]
    out = np.zeros((1, N_OUT))
    ref = np.array([[20 * DEG, 0.0]])
    for _ in range(round(seconds * 1000)):
        x[0, X_OMEGA] = velocity
        advance(x, p, np.zeros(1), ref, 1, out)
    return out[0, O_PATIENT_NM], out[0, O_REFLEX_Q], out[0, O_REFLEX_H]


def test_spasticity_is_a_stretch_reflex_above_a_velocity_threshold_stronger_when_severe():
    base = {
        name: _stretch(passive(name, spasticity_gain_per_rad_s=0.0), 2.0)[0] for name in PRESETS
    }
    for name in ("mild", "moderate", "severe"):
        thr = PRESETS[name]["spasticity_threshold_rad_s"]
        below = _stretch(passive(name), 0.9 * thr)
        assert below[1] == 0.0 and below[2] == 0.0
        above = _stretch(passive(name), thr + 0.5)
        assert above[1] == pytest.approx(PRESETS[name]["spasticity_gain_per_rad_s"] * 0.5)
        assert above[2] == 0.0  # flexing stretches the quadriceps only
        lengthening = _stretch(passive(name), -(thr + 0.5))
        assert lengthening[2] > 0 and lengthening[1] == 0.0
    reflex = {name: _stretch(passive(name), 2.0)[0] - base[name] for name in PRESETS}
    assert reflex["healthy"] == 0.0
    # the reflex resists the flexing stretch with an extension (negative) torque
    assert reflex["severe"] < reflex["moderate"] < reflex["mild"] < -1.0
    # Wartenberg pendulum test: the spastic leg dropped from extension swings less far
    swing = {name: drop(passive(name), 0.0, 2.0)[:, 0].max() for name in PRESETS}
    assert swing["severe"] < swing["moderate"] < swing["mild"] < swing["healthy"]


@pytest.mark.parametrize("delay_ms", [0, 30, 45])
def test_the_stretch_reflex_arrives_after_its_latency(delay_ms):
    p = passive("severe", reflex_delay_s=delay_ms / 1000)
    x = initial_state(20 * DEG)[None].copy()
    params = p.vector()[None]
    out = np.zeros((1, N_OUT))
    reflex = []
    for _ in range(80):
        x[0, X_OMEGA] = 2.0  # a sudden stretch of the quadriceps at 2 rad/s
        advance(x, params, np.zeros(1), np.array([[20 * DEG, 0.0]]), 1, out)
        reflex.append(out[0, O_REFLEX_Q])
    reflex = np.array(reflex)
    assert np.all(reflex[:delay_ms] == 0.0)
    assert np.all(reflex[delay_ms:] > 0.0)


def _follow(name, seconds=8.0):
    knee = KneePlant(knee_preset(name), theta0_rad=10 * DEG)
    task = CyclicFlexionExtension(randomize=False, period_s=2.0, cycles=4)
    row = task.sample(np.random.default_rng(0))
    t = np.arange(round(seconds * 100)) * 0.01
    th_ref, om_ref = reference_series(row, t)
    err = []
    for k in range(t.size):
        knee.set_reference(th_ref[k], om_ref[k])
        err.append(
            knee.step(0.0, 0.01).angle_rad - reference_series(row, t[k : k + 1] + 0.01)[0][0]
        )
    return float(np.sqrt(np.mean(np.square(err))))


def test_impaired_presets_follow_the_task_worse_alone_than_healthy():
    rms = {name: _follow(name) for name in PRESETS}
    assert rms["healthy"] < 4 * DEG
    assert rms["healthy"] < rms["mild"] < rms["moderate"] < rms["severe"]
    assert rms["severe"] > 3 * rms["healthy"]


def test_batched_serial_and_parallel_kernels_agree_and_rows_are_independent():
    n = 80
    rng = np.random.default_rng(3)
    table = [knee_preset(name).vector() for name in PRESETS]
    params = np.stack([table[i % 4] for i in range(n)])
    x0 = np.stack([initial_state(th) for th in rng.uniform(0.2, 1.5, n)])
    cmd = rng.uniform(-20, 20, n)
    ref = np.column_stack([rng.uniform(0, 1.5, n), rng.uniform(-1, 1, n)])
    xs, xp = x0.copy(), x0.copy()
    outs, outp = np.zeros((n, N_OUT)), np.zeros((n, N_OUT))
    for _ in range(20):
        advance(xs, params, cmd, ref, 10, outs, parallel=False)
        advance(xp, params, cmd, ref, 10, outp, parallel=True)
    np.testing.assert_array_equal(xs, xp)
    np.testing.assert_array_equal(outs, outp)
    one = x0[5:6].copy()
    out1 = np.zeros((1, N_OUT))
    for _ in range(20):
        advance(one, params[5:6], cmd[5:6], ref[5:6], 10, out1)
    np.testing.assert_array_equal(one[0], xs[5])


def test_series_elastic_drive_transmits_the_command_through_its_spring():
    p = passive(exo_series_stiffness_nm_per_rad=400.0)
    knee = KneePlant(p, theta0_rad=90 * DEG)
    for _ in range(300):
        reading = knee.step(-10.0, 0.01)
    # at rest, the spring carries the motor torque minus nothing (no motion, no friction)
    assert reading.exo_torque_nm == pytest.approx(-10.0, abs=0.3)
    assert reading.angle_rad < 89 * DEG  # and it extended the knee
    with pytest.raises(ConfigError) as err:
        passive(exo_series_stiffness_nm_per_rad=1e6)
    assert err.value.field == "exo_series_stiffness_nm_per_rad"


def test_knee_plant_api_and_determinism():
    a = KneePlant(knee_preset("mild"), np.random.default_rng(1), initial_jitter_rad=0.05)
    b = KneePlant(knee_preset("mild"), np.random.default_rng(1), initial_jitter_rad=0.05)
    c = KneePlant(knee_preset("mild"), np.random.default_rng(2), initial_jitter_rad=0.05)
    assert a.angle_rad == b.angle_rad != c.angle_rad
    for knee in (a, b):
        knee.set_reference(0.3, 0.0)
        for _ in range(50):
            r = knee.step(-5.0, 0.01)
    assert a.reading == b.reading and r.time_s == pytest.approx(0.5)
    assert a.exo_torque_nm == r.exo_torque_nm and a.velocity_rad_s == r.velocity_rad_s
    # irregular (wall-clock) steps: plant time is their sum, to within one 1-ms step
    t = a.time_s
    for dt in (0.0004, 0.0004, 0.0015, 0.0097):
        a.step(0.0, dt)
    assert a.time_s - t == pytest.approx(0.012)
    assert a.step(0.0, 0.0).time_s == a.time_s
    with pytest.raises(InvalidInputError, match="dt_s"):
        a.step(0.0, -0.001)
    with pytest.raises(InvalidInputError, match="exo_torque_cmd_nm"):
        a.step(float("nan"), 0.01)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body_mass_kg", -70.0),
        ("activation_time_constant_s", 0.0),
        ("deactivation_time_constant_s", 1e-4),
        ("quad_max_force_n", 0.0),
        ("strength_fraction", 1.5),
        ("passive_damping_nm_s_per_rad", -0.1),
        ("exo_max_torque_nm", float("inf")),
        ("eccentric_force_max", 0.9),
        ("rom_extension_limit_rad", 3.0),
        ("quad_optimal_angle_rad", 3.0),
        ("exo_friction_smoothing_rad_s", 1e-5),
        ("rom_stiffness_per_rad", 200.0),
        ("reflex_delay_s", 0.1),
        ("rest_recovery_factor", 0.5),
        ("hip_flexion_rad", 2.0),
        ("hip_flexion_rad", float("nan")),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        KneeParams(**{field: value})
    assert err.value.field == field and field in str(err.value)


def test_the_passive_moments_own_stiffness_is_checked_without_end_stops():
    # Riener & Edrich's capsule term alone, at its capped exponent, is ≈ 7e4 N·m/rad: a tiny
    # detached limb without end stops would be unstable at 1 ms, and is refused
    tiny = {
        "rom_moment_nm": 0.0, "body_mass_kg": 5.0, "height_m": 0.5,
        "exo_link_inertia_kg_m2": 0.0, "exo_reflected_inertia_kg_m2": 1e-12,
        "exo_coulomb_nm": 0.0, "exo_viscous_nm_s_per_rad": 0.0,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="stiffest passive moment"):
        KneeParams(**tiny)
    KneeParams(**{**tiny, "body_mass_kg": 75.0, "height_m": 1.75})  # an adult's shank is fine


def test_presets_and_overrides():
    assert knee_preset("severe").strength_fraction < knee_preset("mild").strength_fraction
    assert knee_preset("moderate", body_mass_kg=90.0).body_mass_kg == 90.0
    with pytest.raises(UnknownPatientError, match="healthy"):
        knee_preset("paralysed")
    with pytest.raises(ConfigError, match="mass_kg"):
        knee_preset("mild", mass_kg=3.0)
    p = KneeParams()
    # Winter (2009): leg+foot 6.1 % of body mass, knee-ankle length 0.246 H
    assert p.segment_mass_kg == pytest.approx(4.575)
    assert p.segment_length_m == pytest.approx(0.4305)


def test_minimum_jerk_extension_and_cyclic_tasks():
    row = SitToStandExtension(randomize=False).sample(np.random.default_rng(0))
    t = np.linspace(0, row[K_TOTAL], 4001)
    th, om = reference_series(row, t)
    assert th[0] == pytest.approx(90 * DEG) and th[-1] == pytest.approx(0.0, abs=1e-12)
    assert om[0] == 0.0 and om[-1] == 0.0
    np.testing.assert_allclose(np.gradient(th, t), om, atol=2e-3)
    # minimum jerk: peak speed 1.875·Δθ/T at mid-movement
    assert np.abs(om).max() == pytest.approx(1.875 * 90 * DEG / 2.0, rel=1e-3)
    row = CyclicFlexionExtension(randomize=False).sample(np.random.default_rng(0))
    t = np.linspace(0, row[K_TOTAL], 6001)
    th, om = reference_series(row, t)
    assert th.min() == pytest.approx(10 * DEG) and th.max() == pytest.approx(70 * DEG, rel=1e-4)
    np.testing.assert_allclose(np.gradient(th, t), om, atol=2e-3)
    hold = HoldPosture(randomize=False, angle_deg=40).sample(np.random.default_rng(0))
    th, om = reference_series(hold, np.linspace(0, 10, 11))
    assert np.all(th == pytest.approx(40 * DEG)) and np.all(om == 0.0)


def test_task_randomisation_is_seeded():
    spec = task_from_name("cyclic")
    a = spec.sample(np.random.default_rng(5))
    assert np.array_equal(a, spec.sample(np.random.default_rng(5)))
    b = spec.sample(np.random.default_rng(6))
    assert not np.array_equal(a, b)
    periods = [spec.sample(np.random.default_rng(s))[3] for s in range(50)]
    assert min(periods) >= 2.0 and max(periods) <= 4.0  # 0.25–0.5 Hz
    with pytest.raises(ConfigError, match="task"):
        task_from_name("jump")
    with pytest.raises(ConfigError) as err:
        CyclicFlexionExtension(low_deg=80.0)
    assert err.value.field == "low_deg"


def test_sensors_quantise_and_draw_reproducible_standard_normals():
    cpr = EncoderSpec().counts_per_rev
    step = 2 * math.pi / cpr
    for theta in np.linspace(-1, 2, 37):
        counts = encoder_counts(theta, cpr, 0.0)
        assert counts == round(counts) and abs(counts * step - theta) <= step / 2 + 1e-12
    z = normals(np.uint64(12345), 0, 40000)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    np.testing.assert_array_equal(z[100:200], normals(np.uint64(12345), 100, 100))
    assert not np.array_equal(z[:100], normals(np.uint64(12346), 0, 100))
    assert EMGSpec(delay_s=0.03).delay_steps(100) == 3
    with pytest.raises(ConfigError) as err:
        EncoderSpec(counts_per_rev=2)
    assert err.value.field == "counts_per_rev"
