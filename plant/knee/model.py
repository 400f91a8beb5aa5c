"""One-DOF knee (shank + foot) with Hill-type muscles and an exoskeleton drive: compiled, batched.

Conventions
-----------
* **Angle** ``theta`` in rad is knee *flexion*: 0 = full extension, positive = flexion
  (π/2 = shank perpendicular to the thigh). Angular velocity ``omega`` in rad/s, positive =
  flexing. Torques in N·m, positive = flexion direction (an extension assist is negative).
* **Posture**: seated, thigh horizontal (hip flexed 90°), as on a knee-extension rehabilitation
  exoskeleton. The gravity moment about the knee is ``+m·g·d·cos(theta)`` (the extended shank is
  pulled into flexion; at 90° it hangs vertically with no gravity moment). The hip angle
  (``hip_flexion_rad``) only enters the passive moment: lying supine with the thigh on the table
  (hip 0°, the clinical Wartenberg pendulum test) gravity acts the same.
* Time in s. The plant step is fixed at :data:`PLANT_DT_S` = 1 ms.

Model (every parameter of :class:`KneeParams` carries its unit and source)
---------------------------------------------------------------------------
``I·ω̇ = τ_g + τ_pass + τ_muscles + τ_exo`` with

* ``I``, ``m·d``: shank+foot from Winter (2009), *Biomechanics and Motor Control of Human
  Movement*, 4th ed., Table 4.1 ("leg and foot": mass 0.061·M, centre of mass 0.606 of the
  knee–ankle length from the knee, radius of gyration about the knee 0.735 of that length; the
  knee–ankle length is 0.246·H), plus the exoskeleton's shank link and the reflected rotor
  inertia of a rigid drive.
* ``τ_pass = M_RE(θ; φ_H) + k1·exp(−k2·(θ − θ_ext)) − k3·exp(−k2·(θ_flex − θ)) − b·ω``: the
  passive elastic knee moment of Riener & Edrich (1999, *J Biomech* 32:539-544; ten healthy
  subjects), ``M_RE = exp(1.800 − 0.0352·φ_K + 0.0217·φ_H) − exp(−3.971 + 0.0495·φ_K −
  0.0128·φ_H) + exp(2.220 − 0.150·φ_K) − 4.820`` in degrees of knee flexion φ_K and hip flexion
  φ_H (ankle neutral). It contains the passive force of every structure crossing the knee, the
  muscles' included, so the Hill muscles below carry no passive element of their own; its hip
  term is the hamstrings' stretch (sitting upright, φ_H = 90°, it pulls the extended knee into
  flexion with ≈ 47 N·m). Soft end stops (the exponentials, 1.5 N·m at −5° and 140°) bound
  the range where the equation's own terms stay soft; viscous damping ``b``, and end-range
  damping ``λ·(k1·e^… + k3·e^…)·ω`` that grows with the limit moment (Hunt & Crossley 1975 [M]).
  Exponents are capped so the moment cannot overflow.
* Two Hill-type muscles with rigid tendons and constant moment arms (Zajac 1989, *Crit Rev
  Biomed Eng* 17:359-411): quadriceps (extensor, moment ``−r_q·F_q``) and hamstrings (flexor,
  ``+r_h·F_h``). ``F = F_max·a·f_L(l̃)·f_V(ṽ)`` with the Gaussian active force–length
  ``f_L = exp(−(l̃−1)²/γ)``, γ = 0.45, of Thelen (2003, *J Biomech Eng* 125:70-77); the
  force–velocity relation is Hill's (1938) hyperbola ``(1 − u)/(1 + u/A)`` for shortening at
  ``u = v/v_max`` (A = 0.25, v_max = 10 optimal lengths/s, Zajac 1989 / Thelen 2003), and for
  lengthening a hyperbola saturating at ``f_len`` = 1.4 (Thelen 2003's eccentric maximum)
  whose slope at ``v = 0`` equals the shortening branch's (our choice: continuity of ``f_V``
  and of its slope; Thelen's eccentric slope is twice the concentric one). Fibre length
  ``l̃ = 1 ± c·(θ − θ_opt)/L0`` where ``c`` (fibre excursion fraction, 0.5) is the part of the
  muscle–tendon excursion taken by the fibres (an assumption standing in for tendon compliance
  and pennation, which a rigid-tendon model lacks).
* Activation: ``ȧ = (u − a)/τ`` with ``τ = τ_act`` (15 ms) when ``u > a`` and ``τ_deact``
  (50 ms) otherwise (first-order activation dynamics with Thelen 2003's young-adult time
  constants), discretised exactly for ``u`` held over a plant step.
* Excitation ``u = clip(u_vol + u_reflex, 0, 1)``. ``u_vol``: the patient's intent, a PD
  controller on the task reference plus compensation of the limb's static moment,
  ``τ_int = Kp(θ_ref − θ) + Kd(ω_ref − ω) − g_c·(m·g·d·cos θ + τ_pass(θ, 0))``, mapped to the
  muscle that produces its sign (``|τ_int|/(F_max·r)``) and saturated at the patient's residual
  strength fraction.
  ``u_reflex = G·max(0, v_stretch − v_th)``: spasticity as a velocity-dependent stretch reflex
  with a threshold (Lance 1980's definition of spasticity, "a velocity-dependent increase in
  tonic stretch reflexes"); the stretch velocity is ``+ω`` for the quadriceps and ``−ω`` for the
  hamstrings (rad/s), taken ``reflex_delay_s`` (17 ms) earlier from a 1-ms delay line.
* Fatigue: the three-compartment model of Xia & Frey Law (2008, *J Biomech* 41:3046-3052)
  per muscle, motor-unit fractions active ``M_A``, fatigued ``M_F``, resting ``M_R = 1 − M_A −
  M_F``, target load = activation, ``Ṁ_A = C − F·M_A``, ``Ṁ_F = F·M_A − R·M_F`` with their
  controller ``C`` (gains ``L_D = L_R`` = 10 /s), and the rest recovery of Looft, Herkert &
  Frey-Law (2018, *J Biomech* 77:16-25; "3CC-r"): ``R`` is multiplied by ``r`` while the muscle
  rests (its excitation is zero: the target load of Looft's rest intervals; MyoSuite applies
  ``r`` whenever ``M_A`` ≥ the activation, which in a continuous task is about half the time
  the muscle works). Knee-extensor values F = 0.01414 /s,
  R = 0.00169 /s, r = 8.64: the mean of the female and male knee-extensor fits of Rakshit, Xiang
  & Yang (2021, *J Biomech* 110695), as tabulated by MyoSuite (a secondary source; its pooled
  knee row equals its shoulder row and is not used, see ``docs/knee-parameters.md``). The
  force-producing activation is ``min(a, 1 − M_F)`` (residual capacity ``M_A + M_R``).
* Exoskeleton drive: the commanded torque (held over the control period) is clipped to
  ``±exo_max_torque_nm`` and followed at most at ``exo_torque_rate_nm_per_s``; gear friction
  is Coulomb (smoothed by ``tanh(ω/ω_ε)``) plus viscous. Rigid drive (default): the joint gets
  motor torque − friction and the reflected rotor inertia adds to ``I``. Series elastic
  (``exo_series_stiffness_nm_per_rad > 0``): motor side ``J_m·ω̇_m = τ_m − friction(ω_m) −
  b_m·ω_m − k_s(θ_m − θ)`` and the joint gets the spring torque ``k_s(θ_m − θ)``, which is also
  what the drive measures.

Integration: semi-implicit (symplectic) Euler at 1 ms, ``ω += dt·ω̇; θ += dt·ω``. It is
first order like explicit Euler but symplectic, so the undamped pendulum's energy stays
bounded instead of drifting upwards, and it is stable while ``ω_n·dt < 2``. A range-of-motion
limit at ≈ 100 N·m (stiffness ≈ 3500 N·m/rad, ω_n ≈ 80 rad/s) gives ``ω_n·dt ≈ 0.08``; the
exponent cap bounds the stiffest passive moment — the end stop plus Riener & Edrich's capsule
term, both capped — (checked at construction, ``K·dt²/I <= 2``), and
so are the damping slopes (``(b + b_v + τ_c/ω_ε)·dt/I < 1``; the end-range damping is capped
at ``0.5·I/dt``) and the series spring. RK4 would cost four right-hand-side evaluations per
step for no benefit at this step size; activation uses the exact exponential update, fatigue
explicit Euler (``L_D·dt`` = 0.01).

Single-knee API (for device emulators such as ``hw_bridge``)
------------------------------------------------------------
::

    knee = KneePlant(knee_preset("moderate"), np.random.default_rng(0))
    knee.set_reference(theta_ref_rad=0.5, omega_ref_rad_s=0.0)   # the patient's intent
    s = knee.step(exo_torque_cmd_nm=-5.0, dt_s=0.01)             # 10 plant steps of 1 ms
    s.angle_rad, s.velocity_rad_s, s.exo_torque_nm, s.patient_torque_nm

``step`` holds the command over ``dt_s`` (whole 1-ms plant steps; a remainder is carried to
the next call) and returns a :class:`KneeReading` (also kept as ``knee.reading``; the
properties ``angle_rad``, ``velocity_rad_s``, ``exo_torque_nm`` read the same state);
``exo_torque_nm`` is the torque the drive applies to the joint (what its torque sensor would
measure, noise-free). The batched kernel
:func:`advance` is what the Gymnasium environments use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numba
import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError, InvalidInputError, UnknownPatientError

#: Plant integration step (s).
PLANT_DT_S = 1e-3
#: Standard gravity (m/s²).
GRAVITY_M_S2 = 9.80665
#: Exponent cap of the end-stop and Riener & Edrich exponentials: beyond it the moment
#: stops growing (1.5 N·m × e⁹ ≈ 12 kN·m, far above anything physical), which bounds the
#: stiffness the 1-ms step must resolve (checked in :class:`KneeParams`).
ROM_EXPONENT_CAP = 9.0
#: Batches at least this large use every numba thread.
PARALLEL_MIN_BATCH = 64

# Riener & Edrich (1999, J Biomech 32(5):539-544) knee equation, degrees in, N·m out (flexion
# positive), ankle neutral (its φ_A terms vanish): M = exp(c1 + k1·φ_K) − exp(c2 + k2·φ_K)
# + exp(c3 + k3·φ_K) + offset, with c1 = 1.800 + 0.0217·φ_H and c2 = −3.971 − 0.0128·φ_H.
RE_FLEX_CONST, RE_FLEX_PER_KNEE_DEG, RE_FLEX_PER_HIP_DEG = 1.800, -0.0352, 0.0217
RE_EXT_CONST, RE_EXT_PER_KNEE_DEG, RE_EXT_PER_HIP_DEG = -3.971, 0.0495, -0.0128
RE_CAPSULE_CONST, RE_CAPSULE_PER_KNEE_DEG = 2.220, -0.150
RE_OFFSET_NM = -4.820
#: The capsule term's stiffness per unit of its exponential, N·m/rad (0.150/° in radians).
RE_CAPSULE_STIFFNESS_MAX_PER_E = -RE_CAPSULE_PER_KNEE_DEG * 180.0 / math.pi
#: Hip flexion the Riener & Edrich coupling is evaluated in (rad): −15° (extended) to 100°.
HIP_FLEXION_RANGE_RAD = (math.radians(-15.0), math.radians(100.0))

# Knee-extensor fatigue of the three-compartment model with rest recovery (3CC-r, Looft, Herkert
# & Frey-Law 2018 J Biomech 77:16-25): F, R (1/s) and the multiplier r of R while the muscle
# rests (no excitation), the mean of the female (0.01407, 0.00185, 6.32) and male (0.01420, 0.00153,
# 10.96) knee-extensor fits of Rakshit, Xiang & Yang 2021 J Biomech 110695 as tabulated in
# MyoSuite's fatigue model (a secondary source). Its pooled knee row (0.00825, 0.00076, 14.85)
# equals its shoulder row and lies outside both sexes' values, so it is not used.
KNEE_FATIGUE_RATE_PER_S = 0.01414
KNEE_RECOVERY_RATE_PER_S = 0.00169
KNEE_REST_RECOVERY_FACTOR = 8.64

# Winter (2009) Table 4.1, "leg and foot" segment (femoral condyles to medial malleolus).
WINTER_LEG_FOOT_MASS_FRACTION = 0.061
WINTER_LEG_FOOT_COM_FRACTION = 0.606
WINTER_LEG_FOOT_GYRATION_PROXIMAL = 0.735
WINTER_SHANK_LENGTH_PER_HEIGHT = 0.246  # knee (0.285 H) to ankle (0.039 H)


@dataclasses.dataclass(frozen=True)
class KneeParams:
    """Parameters of one knee + exoskeleton (validated at construction; units in the names).

    Defaults are the *healthy* preset. Sources: [W] Winter 2009 Table 4.1; [RE] Riener & Edrich
    1999 *J Biomech* 32:539-544, the passive knee moment's equation with its fitted coefficients
    (ten healthy subjects); [D] Delp et al.
    1990 *IEEE TBME* 37:757-767 lower-limb model (sums over the muscles of each group);
    [T] Thelen 2003 (young adults); [Z] Zajac 1989; [XF] Xia & Frey Law 2008; [L18] Looft,
    Herkert & Frey-Law 2018 *J Biomech* 77:16-25; [R21] Rakshit, Xiang & Yang 2021 *J Biomech*
    110695, female and male knee-extensor fits of the 3CC-r model, averaged (as tabulated in
    MyoSuite; secondary source); [E] Emken, Benitez, Sideris, Bobrow & Reinkensmeyer 2007
    *J Neurophysiol* 97:3997-4006 (motor adaptation as a greedy optimisation of error and
    effort; the "slacking" it predicts under robotic assistance); [A] assumption of this
    model (chosen, documented, to be identified on data).

    Attributes:
        body_mass_kg: body mass M, kg [W scales the segment from it].
        height_m: body height H, m [W].
        exo_link_mass_kg: exoskeleton shank link mass, kg [A].
        exo_link_com_m: its centre of mass from the knee axis, m [A].
        exo_link_inertia_kg_m2: its inertia about the knee axis, kg·m² [A].
        passive_damping_nm_s_per_rad: joint viscous damping, N·m·s/rad [A; order of
            pendulum-test identifications, 0.1–0.5].
        hip_flexion_rad: hip flexion of the posture, rad (90° = sitting upright, 0 = supine); it
            sets the biarticular muscles' share of the passive knee moment [RE].
        rom_extension_limit_rad: soft extension limit θ_ext, rad (−5° = slight hyperextension) [A].
        rom_flexion_limit_rad: soft flexion limit θ_flex, rad (140°) [A].
        rom_moment_nm: k1 = k3, moment at a limit, N·m, of the end stops added to [RE]'s moment
            (its exponentials stay soft past the range it was measured in) [A].
        rom_stiffness_per_rad: k2 = k4, exponential rate, 1/rad (35: ≈ 32 N·m at 5° and
            ≈ 680 N·m at 10° beyond a limit) [A form and value].
        rom_damping_s_per_rad: λ of the end-range damping ``λ·M_rom·ω`` (damping proportional
            to the limit moment, the Hunt & Crossley 1975 *J Appl Mech* 42:440-445 [M] contact
            form), s/rad [A value].
        quad_max_force_n: quadriceps max isometric force, N [D: vastus lateralis 1871 +
            medialis 1294 + intermedius 1365 + rectus femoris 779].
        quad_moment_arm_m: quadriceps moment arm, m (patellar tendon) [A; in vivo effective
            quadriceps moment arms 31.5–47.1 mm (n = 40, PMC4662057); Herzog & Read 1993
            *J Anat* 182:213-230 [M]].
        quad_optimal_length_m: quadriceps optimal fibre length, m [D: vastus intermedius 0.087;
            lateralis 0.084, medialis 0.089, rectus femoris 0.084].
        quad_optimal_angle_rad: knee angle at which the quadriceps is at optimal length, rad
            (70°: knee extension torque peaks at 60–70° of flexion) [A].
        ham_max_force_n: hamstrings max isometric force, N [D: biceps femoris long head 717 +
            short head 402 + semimembranosus 1030 + semitendinosus 328].
        ham_moment_arm_m: hamstrings moment arm, m [A].
        ham_optimal_length_m: hamstrings optimal fibre length, m [D: biceps femoris long head
            0.109; semimembranosus 0.080, semitendinosus 0.201, short head 0.173].
        ham_optimal_angle_rad: angle of optimal hamstring length, rad (30°) [A].
        fiber_excursion_fraction: share of the muscle–tendon excursion taken by the fibres [A].
        max_velocity_l0_per_s: max shortening velocity, optimal lengths/s [Z, T].
        hill_a: Hill's a/F0 (curvature of the force–velocity hyperbola) [Z].
        eccentric_force_max: force–velocity asymptote when lengthening, × F_max [T].
        force_length_width: γ of the Gaussian force–length curve [T].
        activation_time_constant_s: τ_act, s [T: 15 ms, young adults].
        deactivation_time_constant_s: τ_deact, s [T: 50 ms, young adults].
        strength_fraction: residual voluntary strength (max voluntary excitation), 0–1 [A].
        intent_kp_nm_per_rad: proportional gain of the patient's intent, N·m/rad [A].
        intent_kd_nm_s_per_rad: derivative gain of the intent, N·m·s/rad [A].
        static_compensation_fraction: share of the limb's static moment (gravity + the passive
            elastic moment, :func:`static_load_nm`) the patient anticipates [A: an internal model
            of the limb's statics; an error-based learner (Emken 2007) largely cancels a load
            that persists, so 1 for a patient who knows the exercise].
        slacking_rate_per_s: λ, rate at which the patient's voluntary effort decays towards
            ``minimum_effort`` while the task goes well, 1/s [E: the motor system minimises
            error and effort together, a single-state linear update (``u_{i+1} = f·u_i +
            g·e_i``, symbols [M]) with ``f < 1``, so under assistance that removes the error
            its own effort decays ("slacking"); the fitted f, g were not retrieved: value A,
            0.2/s = a retention of 0.82 per 1-s step].
        slacking_error_gain_per_rad_s: g, growth of the effort per radian of tracking error
            and second [E form; value A: effort stays full while the error exceeds
            ``(1 − minimum_effort)·λ/g`` ≈ 1.6°].
        minimum_effort: the floor of the effort scale ε (0–1) that multiplies the voluntary
            intent [A].
        spasticity_gain_per_rad_s: reflex excitation per rad/s of stretch velocity above the
            threshold [A; Lance 1980 definition].
        spasticity_threshold_rad_s: stretch-velocity threshold of the reflex, rad/s [A].
        reflex_delay_s: latency of the stretch reflex, s, rounded to 1 ms, at most
            ``(REFLEX_BUFFER − 1)`` ms; the excitation's delay (the activation dynamics add
            the electromechanical delay) [patellar tendon-reflex EMG latency 17.35 ± 1.56 ms,
            n = 50, Chon et al. 1996 *J Korean Acad Rehabil Med* 20(3):28; 16.37 ± 1.58 ms,
            n = 48, Kim et al. 1997].
        fatigue_rate_per_s: F of the three-compartment model, 1/s [R21 knee: 0.01414].
        recovery_rate_per_s: R, 1/s [R21 knee: 0.00169].
        rest_recovery_factor: r, the multiplier of R while a muscle rests (no excitation; the
            3CC-r model of [L18]) [R21 knee: 8.64; Looft & Frey-Law
            2020 *J Biomech* 106:109762 report r ≈ 15 optimal for the knee].
        fatigue_drive_per_s: L_D = L_R of the compartment controller, 1/s [10, as used with
            [L18]'s parameters; Xia & Frey Law's own value M].
        exo_max_torque_nm: actuator torque limit, N·m [A].
        exo_torque_rate_nm_per_s: actuator torque slew-rate limit, N·m/s [A].
        exo_coulomb_nm: gear Coulomb friction, N·m [A].
        exo_viscous_nm_s_per_rad: gear viscous friction, N·m·s/rad [A].
        exo_friction_smoothing_rad_s: ω_ε of the smoothed Coulomb term, rad/s [A].
        exo_reflected_inertia_kg_m2: rotor inertia × gear ratio², kg·m² [A].
        exo_series_stiffness_nm_per_rad: series elastic spring, N·m/rad; 0 = rigid drive [A].
        exo_motor_damping_nm_s_per_rad: motor-side damping of a series elastic drive [A].

    """

    body_mass_kg: float = 75.0
    height_m: float = 1.75
    exo_link_mass_kg: float = 1.0
    exo_link_com_m: float = 0.2
    exo_link_inertia_kg_m2: float = 0.05
    passive_damping_nm_s_per_rad: float = 0.3
    rom_extension_limit_rad: float = math.radians(-5.0)
    rom_flexion_limit_rad: float = math.radians(140.0)
    rom_moment_nm: float = 1.5
    rom_stiffness_per_rad: float = 35.0
    rom_damping_s_per_rad: float = 0.3
    hip_flexion_rad: float = math.radians(90.0)
    quad_max_force_n: float = 5309.0
    quad_moment_arm_m: float = 0.04
    quad_optimal_length_m: float = 0.087
    quad_optimal_angle_rad: float = math.radians(70.0)
    ham_max_force_n: float = 2477.0
    ham_moment_arm_m: float = 0.03
    ham_optimal_length_m: float = 0.109
    ham_optimal_angle_rad: float = math.radians(30.0)
    fiber_excursion_fraction: float = 0.5
    max_velocity_l0_per_s: float = 10.0
    hill_a: float = 0.25
    eccentric_force_max: float = 1.4
    force_length_width: float = 0.45
    activation_time_constant_s: float = 0.015
    deactivation_time_constant_s: float = 0.050
    strength_fraction: float = 1.0
    intent_kp_nm_per_rad: float = 60.0
    intent_kd_nm_s_per_rad: float = 6.0
    static_compensation_fraction: float = 1.0
    slacking_rate_per_s: float = 0.2
    slacking_error_gain_per_rad_s: float = 5.0
    minimum_effort: float = 0.3
    spasticity_gain_per_rad_s: float = 0.0
    spasticity_threshold_rad_s: float = 3.0
    reflex_delay_s: float = 0.017
    fatigue_rate_per_s: float = KNEE_FATIGUE_RATE_PER_S
    recovery_rate_per_s: float = KNEE_RECOVERY_RATE_PER_S
    rest_recovery_factor: float = KNEE_REST_RECOVERY_FACTOR
    fatigue_drive_per_s: float = 10.0
    exo_max_torque_nm: float = 60.0
    exo_torque_rate_nm_per_s: float = 2000.0
    exo_coulomb_nm: float = 0.5
    exo_viscous_nm_s_per_rad: float = 0.1
    exo_friction_smoothing_rad_s: float = 0.05
    exo_reflected_inertia_kg_m2: float = 0.05
    exo_series_stiffness_nm_per_rad: float = 0.0
    exo_motor_damping_nm_s_per_rad: float = 0.5

    def __post_init__(self) -> None:
        positive = (
            "body_mass_kg", "height_m", "quad_max_force_n", "quad_moment_arm_m",
            "quad_optimal_length_m", "ham_max_force_n", "ham_moment_arm_m",
            "ham_optimal_length_m", "fiber_excursion_fraction", "max_velocity_l0_per_s",
            "hill_a", "force_length_width",
            "activation_time_constant_s", "deactivation_time_constant_s",
            "rom_stiffness_per_rad", "exo_max_torque_nm", "exo_torque_rate_nm_per_s",
            "exo_friction_smoothing_rad_s", "exo_reflected_inertia_kg_m2",
            "spasticity_threshold_rad_s", "fatigue_drive_per_s", "rest_recovery_factor",
        )  # fmt: skip
        non_negative = (
            "exo_link_mass_kg", "exo_link_com_m", "exo_link_inertia_kg_m2",
            "passive_damping_nm_s_per_rad", "rom_moment_nm", "rom_damping_s_per_rad",
            "intent_kp_nm_per_rad", "intent_kd_nm_s_per_rad", "spasticity_gain_per_rad_s",
            "fatigue_rate_per_s", "recovery_rate_per_s", "exo_coulomb_nm",
            "exo_viscous_nm_s_per_rad", "exo_series_stiffness_nm_per_rad",
            "exo_motor_damping_nm_s_per_rad", "slacking_rate_per_s",
            "slacking_error_gain_per_rad_s",
        )  # fmt: skip
        for name in positive + non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(name, value, "a real number")
            if not math.isfinite(value):
                raise ConfigError(name, value, "a finite number")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "> 0")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(name, getattr(self, name), ">= 0")
        for name in ("strength_fraction", "static_compensation_fraction", "minimum_effort"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(name, value, "a fraction in [0, 1]")
        max_delay = (REFLEX_BUFFER - 1) * PLANT_DT_S
        if not 0.0 <= self.reflex_delay_s <= max_delay + 1e-12:
            raise ConfigError("reflex_delay_s", self.reflex_delay_s, f"0 <= value <= {max_delay} s")
        if not self.rest_recovery_factor >= 1.0:
            raise ConfigError(
                "rest_recovery_factor", self.rest_recovery_factor, ">= 1 (rest speeds recovery)"
            )
        if not HIP_FLEXION_RANGE_RAD[0] <= self.hip_flexion_rad <= HIP_FLEXION_RANGE_RAD[1]:
            raise ConfigError(
                "hip_flexion_rad",
                self.hip_flexion_rad,
                f"{HIP_FLEXION_RANGE_RAD[0]:.3f}..{HIP_FLEXION_RANGE_RAD[1]:.3f} rad "
                "(-15°..100° of hip flexion)",
            )
        if not self.eccentric_force_max > 1.0:
            raise ConfigError("eccentric_force_max", self.eccentric_force_max, "> 1")
        if not self.rom_extension_limit_rad < self.rom_flexion_limit_rad:
            raise ConfigError(
                "rom_extension_limit_rad",
                self.rom_extension_limit_rad,
                f"< rom_flexion_limit_rad ({self.rom_flexion_limit_rad})",
            )
        for name in ("quad_optimal_angle_rad", "ham_optimal_angle_rad"):
            value = getattr(self, name)
            if not self.rom_extension_limit_rad <= value <= self.rom_flexion_limit_rad:
                raise ConfigError(name, value, "inside the range of motion")
        for name in ("activation_time_constant_s", "deactivation_time_constant_s"):
            if getattr(self, name) < PLANT_DT_S:
                raise ConfigError(name, getattr(self, name), f">= the plant step {PLANT_DT_S} s")
        inertia = self.joint_inertia_kg_m2
        damping = (
            self.passive_damping_nm_s_per_rad
            + self.exo_viscous_nm_s_per_rad
            + self.exo_coulomb_nm / self.exo_friction_smoothing_rad_s
        )
        if self.exo_series_stiffness_nm_per_rad == 0.0 and damping * PLANT_DT_S / inertia >= 1:
            raise ConfigError(
                "exo_friction_smoothing_rad_s",
                self.exo_friction_smoothing_rad_s,
                f"large enough that the friction slope keeps the 1-ms step stable "
                f"((b + b_v + τ_c/ω_ε)·dt/I < 1, I = {inertia:.3f} kg·m²)",
            )
        # the end stop and the Riener & Edrich capsule term, both at their capped exponent,
        # stiffen the same (extension) end
        k_max = (
            self.rom_moment_nm * self.rom_stiffness_per_rad + RE_CAPSULE_STIFFNESS_MAX_PER_E
        ) * math.exp(ROM_EXPONENT_CAP)
        if k_max * PLANT_DT_S**2 / inertia > 2.0:
            raise ConfigError(
                "rom_stiffness_per_rad",
                self.rom_stiffness_per_rad,
                f"small enough that the stiffest passive moment keeps the 1-ms step stable "
                f"((rom_moment_nm · rom_stiffness_per_rad + {RE_CAPSULE_STIFFNESS_MAX_PER_E:.2f}) "
                f"· e^{ROM_EXPONENT_CAP:g} · dt²/I <= 2, I = {inertia:.3f} kg·m²)",
            )
        k_s = self.exo_series_stiffness_nm_per_rad
        if k_s > 0 and math.sqrt(k_s / self.exo_reflected_inertia_kg_m2) * PLANT_DT_S > 0.5:
            raise ConfigError(
                "exo_series_stiffness_nm_per_rad",
                k_s,
                f"<= {0.25 * self.exo_reflected_inertia_kg_m2 / PLANT_DT_S**2:.0f} "
                "(spring–rotor frequency × 1 ms <= 0.5 for a stable step)",
            )

    @property
    def segment_mass_kg(self) -> float:
        """Shank + foot mass, kg (Winter 2009)."""
        return WINTER_LEG_FOOT_MASS_FRACTION * self.body_mass_kg

    @property
    def segment_length_m(self) -> float:
        """Knee-to-ankle length, m (Winter 2009)."""
        return WINTER_SHANK_LENGTH_PER_HEIGHT * self.height_m

    @property
    def gravity_moment_nm(self) -> float:
        """``m·g·d`` of shank + foot + exo link, N·m (gravity moment = this × cos θ)."""
        seg = self.segment_mass_kg * WINTER_LEG_FOOT_COM_FRACTION * self.segment_length_m
        return GRAVITY_M_S2 * (seg + self.exo_link_mass_kg * self.exo_link_com_m)

    @property
    def joint_inertia_kg_m2(self) -> float:
        """Inertia about the knee of everything that moves with θ, kg·m²."""
        k = WINTER_LEG_FOOT_GYRATION_PROXIMAL * self.segment_length_m
        inertia = self.segment_mass_kg * k * k + self.exo_link_inertia_kg_m2
        if self.exo_series_stiffness_nm_per_rad == 0.0:
            inertia += self.exo_reflected_inertia_kg_m2
        return inertia

    def vector(self) -> NDArray[np.float64]:
        """The parameter row the compiled kernels read (columns ``P_*`` of this module)."""
        p = np.zeros(N_PARAMS)
        p[P_INERTIA] = self.joint_inertia_kg_m2
        p[P_MGD] = self.gravity_moment_nm
        p[P_DAMPING] = self.passive_damping_nm_s_per_rad
        p[P_ROM_LO] = self.rom_extension_limit_rad
        p[P_ROM_HI] = self.rom_flexion_limit_rad
        p[P_ROM_K] = self.rom_moment_nm
        p[P_ROM_B] = self.rom_stiffness_per_rad
        p[P_ROM_DAMP] = self.rom_damping_s_per_rad
        for base, fmax, arm, l0, th in (
            (P_Q, self.quad_max_force_n, self.quad_moment_arm_m, self.quad_optimal_length_m,
             self.quad_optimal_angle_rad),
            (P_H, self.ham_max_force_n, self.ham_moment_arm_m, self.ham_optimal_length_m,
             self.ham_optimal_angle_rad),
        ):  # fmt: skip
            p[base + M_FMAX] = fmax
            p[base + M_ARM] = arm
            p[base + M_STRAIN_PER_RAD] = self.fiber_excursion_fraction * arm / l0
            p[base + M_THOPT] = th
            p[base + M_VEL_PER_RAD_S] = (
                self.fiber_excursion_fraction * arm / (l0 * self.max_velocity_l0_per_s)
            )
        p[P_HILL_A] = self.hill_a
        p[P_FLEN] = self.eccentric_force_max
        p[P_FL_GAMMA] = self.force_length_width
        hip_deg = math.degrees(self.hip_flexion_rad)
        p[P_RE_C1] = RE_FLEX_CONST + RE_FLEX_PER_HIP_DEG * hip_deg
        p[P_RE_C2] = RE_EXT_CONST + RE_EXT_PER_HIP_DEG * hip_deg
        p[P_ACT_ALPHA] = 1.0 - math.exp(-PLANT_DT_S / self.activation_time_constant_s)
        p[P_DEACT_ALPHA] = 1.0 - math.exp(-PLANT_DT_S / self.deactivation_time_constant_s)
        p[P_STRENGTH] = self.strength_fraction
        p[P_KP] = self.intent_kp_nm_per_rad
        p[P_KD] = self.intent_kd_nm_s_per_rad
        p[P_GCOMP] = self.static_compensation_fraction
        p[P_SPAS_GAIN] = self.spasticity_gain_per_rad_s
        p[P_SPAS_THR] = self.spasticity_threshold_rad_s
        p[P_REFLEX_DELAY] = round(self.reflex_delay_s / PLANT_DT_S)
        p[P_FAT_F] = self.fatigue_rate_per_s
        p[P_FAT_R] = self.recovery_rate_per_s
        p[P_FAT_L] = self.fatigue_drive_per_s
        p[P_FAT_REST] = self.rest_recovery_factor
        p[P_TMAX] = self.exo_max_torque_nm
        p[P_RATE] = self.exo_torque_rate_nm_per_s
        p[P_COUL] = self.exo_coulomb_nm
        p[P_VISC] = self.exo_viscous_nm_s_per_rad
        p[P_FEPS] = self.exo_friction_smoothing_rad_s
        p[P_KS] = self.exo_series_stiffness_nm_per_rad
        p[P_JM] = self.exo_reflected_inertia_kg_m2
        p[P_BM] = self.exo_motor_damping_nm_s_per_rad
        p[P_SLACK_RATE] = self.slacking_rate_per_s
        p[P_SLACK_GAIN] = self.slacking_error_gain_per_rad_s
        p[P_EFFORT_MIN] = self.minimum_effort
        return p


# Parameter-row columns.
P_INERTIA, P_MGD, P_DAMPING, P_ROM_LO, P_ROM_HI, P_ROM_K, P_ROM_B = range(7)
M_FMAX, M_ARM, M_STRAIN_PER_RAD, M_THOPT, M_VEL_PER_RAD_S = range(5)
P_Q = 7  #: first column of the quadriceps block (M_* offsets)
P_H = 12  #: first column of the hamstrings block
(
    P_HILL_A, P_FLEN, P_FL_GAMMA, P_RE_C1, P_RE_C2, P_ACT_ALPHA, P_DEACT_ALPHA, P_STRENGTH,
    P_KP, P_KD, P_GCOMP, P_SPAS_GAIN, P_SPAS_THR, P_FAT_F, P_FAT_R, P_FAT_L, P_TMAX, P_RATE,
    P_COUL, P_VISC, P_FEPS, P_KS, P_JM, P_BM, P_ROM_DAMP, P_REFLEX_DELAY, P_SLACK_RATE,
    P_SLACK_GAIN, P_EFFORT_MIN, P_FAT_REST,
) = range(17, 47)  # fmt: skip
N_PARAMS = 47

# State columns (per knee).
X_THETA = 0  #: knee flexion angle, rad
X_OMEGA = 1  #: angular velocity, rad/s
X_ACT_Q = 2  #: quadriceps activation, 0–1
X_ACT_H = 3  #: hamstrings activation, 0–1
X_MA_Q = 4  #: quadriceps active motor-unit fraction M_A
X_MF_Q = 5  #: quadriceps fatigued fraction M_F
X_MA_H = 6  #: hamstrings M_A
X_MF_H = 7  #: hamstrings M_F
X_MOTOR_NM = 8  #: actuator (motor-side) torque after the rate limit, N·m
X_THETA_M = 9  #: motor-side angle of a series elastic drive, rad
X_OMEGA_M = 10  #: motor-side velocity, rad/s
X_DELAY_PTR = 11  #: write position in the reflex delay line
X_EFFORT = 12  #: the patient's voluntary effort scale ε (slacking), minimum_effort–1
X_DELAY_LINE = 13  #: first of REFLEX_BUFFER past velocities (1 ms apart), rad/s
#: Length of the reflex delay line (1-ms samples).
REFLEX_BUFFER = 64
N_STATE = X_DELAY_LINE + REFLEX_BUFFER

# Output columns of advance() (per knee, for the last call).
O_PATIENT_NM = 0  #: net muscle torque at the end, N·m
O_EXO_NM = 1  #: exoskeleton torque on the joint at the end, N·m
O_PATIENT_WORK_J = 2  #: work of the muscles over the call, J
O_EXO_WORK_J = 3  #: work of the exoskeleton on the joint over the call, J
O_REFLEX_Q = 4  #: quadriceps reflex excitation at the end
O_REFLEX_H = 5  #: hamstrings reflex excitation at the end
O_THETA_MIN = 6  #: smallest angle during the call, rad
O_THETA_MAX = 7  #: largest angle during the call, rad
O_OMEGA_ABS_MAX = 8  #: largest |ω| during the call, rad/s
N_OUT = 9

PRESETS: dict[str, dict[str, float]] = {
    "healthy": {},
    "mild": {
        "strength_fraction": 0.6,
        "spasticity_gain_per_rad_s": 0.01,
        "spasticity_threshold_rad_s": 1.0,
        "fatigue_rate_per_s": KNEE_FATIGUE_RATE_PER_S * 1.5,
    },
    "moderate": {
        "strength_fraction": 0.3,
        "spasticity_gain_per_rad_s": 0.02,
        "spasticity_threshold_rad_s": 0.6,
        "fatigue_rate_per_s": KNEE_FATIGUE_RATE_PER_S * 2.0,
    },
    "severe": {
        "strength_fraction": 0.05,
        "spasticity_gain_per_rad_s": 0.04,
        "spasticity_threshold_rad_s": 0.3,
        "fatigue_rate_per_s": KNEE_FATIGUE_RATE_PER_S * 3.0,
        "recovery_rate_per_s": KNEE_RECOVERY_RATE_PER_S * 0.5,
    },
}
"""Impairment presets (overrides of the healthy :class:`KneeParams`).

Assumptions of this model, ordered by severity, to be identified per patient: residual voluntary
strength 100/60/30/5 % (severe, ≈ 11 N·m: below the ≈ 12 N·m needed to lift the shank against
gravity alone); stretch-reflex gain 0/0.01/0.02/0.04 per rad/s above thresholds ∞ (3 rad/s,
unused)/ 1.0/0.6/0.3 rad/s (lower threshold and higher gain = more spastic, Lance 1980, "Symposium
synopsis", in Feldman, Young & Koella (eds), *Spasticity: Disordered Motor Control*, pp. 485-494
[M]) — with the ≈ 212 N·m quadriceps a 3 rad/s (170°/s) stretch then raises a reflex torque of
about 4/10/23 N·m, the order of the reflex torques measured in spastic knees under fast isokinetic
stretches (a few to a few tens of N·m; larger gains drive the severe knee into sustained clonus of
±100 N·m, which the exoskeleton's 60 N·m cannot contain); fatigue rate F ×1, ×1.5, ×2, ×3 the
healthy knee-extensor value of Rakshit et al. (2021) (paretic muscle fatigues sooner; the direction
is debated), and halved recovery for *severe*. The passive moment (Riener & Edrich 1999) is the
healthy one in every preset: Amankwah et al. (2004, *J Rehabil Res Dev* 41(1):15-32) found the
knee's passive moment of spinal cord injury no different from able-bodied subjects' (it differed at
the hip and ankle).
"""


def knee_preset(name: str, **overrides: Any) -> KneeParams:
    """The parameters of preset ``name`` (see :data:`PRESETS`) with field ``overrides``.

    Raises:
        UnknownPatientError: ``name`` is not a preset.
        ConfigError: an override is not a field, or its value is not allowed.

    """
    if name not in PRESETS:
        raise UnknownPatientError("preset", name, PRESETS)
    fields = {f.name for f in dataclasses.fields(KneeParams)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(key, overrides[key], "a field of KneeParams")
    return KneeParams(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Muscle curves (compiled scalars, callable from Python too)


@numba.njit(cache=True, inline="always", error_model="numpy")
def force_length(l_norm: float, gamma: float) -> float:
    """Active force–length ``exp(−(l̃−1)²/γ)`` (Thelen 2003); ``l_norm`` in optimal lengths."""
    d = l_norm - 1.0
    return math.exp(-d * d / gamma)


@numba.njit(cache=True, inline="always", error_model="numpy")
def force_velocity(v_norm: float, hill_a: float, f_len: float) -> float:
    """Force–velocity factor at lengthening velocity ``v_norm`` (units of v_max; < 0 shortens).

    Shortening: Hill's hyperbola ``(1 − u)/(1 + u/A)``, ``u = −v``, 0 at ``u ≥ 1``.
    Lengthening: ``1 + (f_len − 1)·v/(v + c)`` with ``c = (f_len − 1)/(1 + 1/A)`` so that the
    slope at 0 is continuous.
    """
    if v_norm <= 0.0:
        u = min(-v_norm, 1.0)
        return (1.0 - u) / (1.0 + u / hill_a)
    c = (f_len - 1.0) / (1.0 + 1.0 / hill_a)
    return 1.0 + (f_len - 1.0) * v_norm / (v_norm + c)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _muscle_force(
    p: NDArray[np.float64], base: int, sign: float, a_eff: float, theta: float, omega: float
) -> float:
    """Force (N) of the muscle whose block starts at ``base``; ``sign`` +1 quads, −1 hams."""
    l_norm = 1.0 + sign * p[base + M_STRAIN_PER_RAD] * (theta - p[base + M_THOPT])
    v_norm = sign * p[base + M_VEL_PER_RAD_S] * omega
    f = a_eff * force_length(l_norm, p[P_FL_GAMMA]) * force_velocity(v_norm, p[P_HILL_A], p[P_FLEN])
    return p[base + M_FMAX] * f


@numba.njit(cache=True, inline="always", error_model="numpy")
def riener_edrich_moment(p: NDArray[np.float64], theta: float) -> float:
    """Riener & Edrich (1999) passive elastic knee moment at the row's hip angle (N·m)."""
    deg = theta * (180.0 / math.pi)
    cap = ROM_EXPONENT_CAP
    return (
        math.exp(min(p[P_RE_C1] + RE_FLEX_PER_KNEE_DEG * deg, cap))
        - math.exp(min(p[P_RE_C2] + RE_EXT_PER_KNEE_DEG * deg, cap))
        + math.exp(min(RE_CAPSULE_CONST + RE_CAPSULE_PER_KNEE_DEG * deg, cap))
        + RE_OFFSET_NM
    )


@numba.njit(cache=True, inline="always", error_model="numpy")
def _rom_moments(p: NDArray[np.float64], theta: float) -> tuple[float, float]:
    """(extension-limit, flexion-limit) moments of the end stops, both ≥ 0 (N·m)."""
    k = p[P_ROM_K]
    b = p[P_ROM_B]
    ext = k * math.exp(min(b * (p[P_ROM_LO] - theta), ROM_EXPONENT_CAP))
    flex = k * math.exp(min(b * (theta - p[P_ROM_HI]), ROM_EXPONENT_CAP))
    return ext, flex


@numba.njit(cache=True, inline="always", error_model="numpy")
def _elastic_moment(p: NDArray[np.float64], theta: float) -> tuple[float, float]:
    """(passive elastic moment: Riener & Edrich + end stops, N·m; end-stop magnitude, N·m)."""
    ext, flex = _rom_moments(p, theta)
    return riener_edrich_moment(p, theta) + ext - flex, ext + flex


@numba.njit(cache=True, inline="always", error_model="numpy")
def _damped(p: NDArray[np.float64], elastic: float, stops: float, omega: float) -> float:
    """The elastic moment minus viscous and end-stop damping at ``omega`` (N·m)."""
    # Hunt–Crossley contact damping: proportional to the limit moment, capped for stability
    b_rom = min(p[P_ROM_DAMP] * stops, 0.5 * p[P_INERTIA] / PLANT_DT_S)
    return elastic - (p[P_DAMPING] + b_rom) * omega


@numba.njit(cache=True, inline="always", error_model="numpy")
def passive_joint_moment(p: NDArray[np.float64], theta: float, omega: float) -> float:
    """Passive knee moment (N·m, flexion positive) at angle ``theta`` and velocity ``omega``.

    Elastic (Riener & Edrich + end stops) minus viscous and end-stop damping.
    """
    elastic, stops = _elastic_moment(p, theta)
    return _damped(p, elastic, stops, omega)


@numba.njit(cache=True, inline="always", error_model="numpy")
def static_load_nm(p: NDArray[np.float64], theta: float) -> float:
    """Moment (N·m) on the relaxed knee held still at ``theta``: gravity + passive elastic."""
    return p[P_MGD] * math.cos(theta) + _elastic_moment(p, theta)[0]


@numba.njit(cache=True, inline="always", error_model="numpy")
def _fatigue(
    ma: float, mf: float, target: float, f: float, r: float, lgain: float
) -> tuple[float, float]:
    """One explicit-Euler step of Xia & Frey Law (2008); ``(M_A, M_F)``.

    ``r`` is this step's recovery rate: ``R``, or ``r·R`` at rest (3CC-r, chosen by the caller).
    """
    mr = 1.0 - ma - mf
    if ma < target:
        c = lgain * (target - ma) if mr > target - ma else lgain * mr
    else:
        c = lgain * (target - ma)
    dt = PLANT_DT_S
    ma_new = ma + dt * (c - f * ma)
    mf_new = mf + dt * (f * ma - r * mf)
    return min(max(ma_new, 0.0), 1.0), min(max(mf_new, 0.0), 1.0)


@numba.njit(cache=True, inline="always", error_model="numpy")
def substep(
    x: NDArray[np.float64],
    p: NDArray[np.float64],
    cmd_nm: float,
    theta_ref: float,
    omega_ref: float,
    out: NDArray[np.float64],
) -> None:
    """Advance one knee (state row ``x``, parameter row ``p``) by one 1-ms plant step.

    Writes the instantaneous torques and reflexes into ``out`` and accumulates work terms.
    """
    dt = PLANT_DT_S
    th = x[X_THETA]
    om = x[X_OMEGA]
    cos_th = math.cos(th)
    # the passive elastic moment, once per step: the patient anticipates it, the joint feels it
    elastic, stops = _elastic_moment(p, th)
    static_nm = p[P_MGD] * cos_th + elastic
    # patient: voluntary intent (PD on the task + static-load compensation) scaled by the effort,
    # saturated by strength; the effort decays while the error is small (slacking, Emken 2007)
    effort = x[X_EFFORT]
    tau_int = effort * (
        p[P_KP] * (theta_ref - th) + p[P_KD] * (omega_ref - om) - p[P_GCOMP] * static_nm
    )
    effort += dt * (
        p[P_SLACK_GAIN] * abs(theta_ref - th) - p[P_SLACK_RATE] * (effort - p[P_EFFORT_MIN])
    )
    x[X_EFFORT] = min(max(effort, p[P_EFFORT_MIN]), 1.0)
    s = p[P_STRENGTH]
    u_q = min(s, max(0.0, -tau_int) / (p[P_Q + M_FMAX] * p[P_Q + M_ARM]))
    u_h = min(s, max(0.0, tau_int) / (p[P_H + M_FMAX] * p[P_H + M_ARM]))
    # spasticity: velocity-dependent stretch reflex above a threshold, after its latency
    ptr = int(x[X_DELAY_PTR])
    x[X_DELAY_LINE + ptr] = om
    om_late = x[X_DELAY_LINE + (ptr - int(p[P_REFLEX_DELAY])) % REFLEX_BUFFER]
    x[X_DELAY_PTR] = (ptr + 1) % REFLEX_BUFFER
    gain = p[P_SPAS_GAIN]
    reflex_q = gain * max(0.0, om_late - p[P_SPAS_THR])
    reflex_h = gain * max(0.0, -om_late - p[P_SPAS_THR])
    u_q = min(1.0, u_q + reflex_q)
    u_h = min(1.0, u_h + reflex_h)
    # activation dynamics (exact first-order update over the step)
    a_q = x[X_ACT_Q]
    a_q += (u_q - a_q) * (p[P_ACT_ALPHA] if u_q > a_q else p[P_DEACT_ALPHA])
    a_h = x[X_ACT_H]
    a_h += (u_h - a_h) * (p[P_ACT_ALPHA] if u_h > a_h else p[P_DEACT_ALPHA])
    x[X_ACT_Q] = a_q
    x[X_ACT_H] = a_h
    # fatigue (three compartments), force capacity = 1 − M_F; a muscle with no excitation rests
    # (Looft's 3CC-r: recovery × r while the target load is zero)
    fat_f = p[P_FAT_F]
    r_q = p[P_FAT_R] * (p[P_FAT_REST] if u_q == 0.0 else 1.0)
    r_h = p[P_FAT_R] * (p[P_FAT_REST] if u_h == 0.0 else 1.0)
    ma, mf = _fatigue(x[X_MA_Q], x[X_MF_Q], a_q, fat_f, r_q, p[P_FAT_L])
    x[X_MA_Q] = ma
    x[X_MF_Q] = mf
    ae_q = min(a_q, 1.0 - mf)
    ma, mf = _fatigue(x[X_MA_H], x[X_MF_H], a_h, fat_f, r_h, p[P_FAT_L])
    x[X_MA_H] = ma
    x[X_MF_H] = mf
    ae_h = min(a_h, 1.0 - mf)
    tau_pat = -p[P_Q + M_ARM] * _muscle_force(p, P_Q, 1.0, ae_q, th, om) + p[
        P_H + M_ARM
    ] * _muscle_force(p, P_H, -1.0, ae_h, th, om)
    # exoskeleton actuator: saturation, slew-rate limit, friction, optional series spring
    tmax = p[P_TMAX]
    target = min(max(cmd_nm, -tmax), tmax)
    dmax = p[P_RATE] * dt
    tau_m = x[X_MOTOR_NM] + min(max(target - x[X_MOTOR_NM], -dmax), dmax)
    x[X_MOTOR_NM] = tau_m
    k_s = p[P_KS]
    if k_s > 0.0:
        tau_exo = k_s * (x[X_THETA_M] - th)
        om_m = x[X_OMEGA_M]
        fric = p[P_COUL] * math.tanh(om_m / p[P_FEPS]) + (p[P_VISC] + p[P_BM]) * om_m
        om_m += dt * (tau_m - fric - tau_exo) / p[P_JM]
        x[X_OMEGA_M] = om_m
        x[X_THETA_M] += dt * om_m
    else:
        tau_exo = tau_m - p[P_COUL] * math.tanh(om / p[P_FEPS]) - p[P_VISC] * om
    tau = p[P_MGD] * cos_th + _damped(p, elastic, stops, om) + tau_pat + tau_exo
    om += dt * tau / p[P_INERTIA]
    th += dt * om
    x[X_OMEGA] = om
    x[X_THETA] = th
    if k_s == 0.0:
        x[X_THETA_M] = th
        x[X_OMEGA_M] = om
    out[O_PATIENT_NM] = tau_pat
    out[O_EXO_NM] = tau_exo
    out[O_PATIENT_WORK_J] += tau_pat * om * dt
    out[O_EXO_WORK_J] += tau_exo * om * dt
    out[O_REFLEX_Q] = reflex_q
    out[O_REFLEX_H] = reflex_h
    out[O_THETA_MIN] = min(out[O_THETA_MIN], th)
    out[O_THETA_MAX] = max(out[O_THETA_MAX], th)
    out[O_OMEGA_ABS_MAX] = max(out[O_OMEGA_ABS_MAX], abs(om))


@numba.njit(cache=True, inline="always", error_model="numpy")
def advance_row(
    x: NDArray[np.float64],
    p: NDArray[np.float64],
    cmd_nm: float,
    theta_ref: float,
    omega_ref: float,
    k: int,
    out: NDArray[np.float64],
) -> None:
    """``k`` plant steps of one knee with the command held and the reference extrapolated.

    The reference angle moves linearly at ``omega_ref`` over the call (first-order hold of the
    task trajectory over a control period).
    """
    out[O_PATIENT_WORK_J] = 0.0
    out[O_EXO_WORK_J] = 0.0
    out[O_THETA_MIN] = x[X_THETA]
    out[O_THETA_MAX] = x[X_THETA]
    out[O_OMEGA_ABS_MAX] = abs(x[X_OMEGA])
    for j in range(k):
        substep(x, p, cmd_nm, theta_ref + omega_ref * (j * PLANT_DT_S), omega_ref, out)


@numba.njit(cache=True, error_model="numpy")
def _advance_serial(
    x: NDArray[np.float64],
    params: NDArray[np.float64],
    cmd: NDArray[np.float64],
    ref: NDArray[np.float64],
    k: int,
    out: NDArray[np.float64],
) -> None:
    for i in range(x.shape[0]):
        advance_row(x[i], params[i], cmd[i], ref[i, 0], ref[i, 1], k, out[i])


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _advance_parallel(
    x: NDArray[np.float64],
    params: NDArray[np.float64],
    cmd: NDArray[np.float64],
    ref: NDArray[np.float64],
    k: int,
    out: NDArray[np.float64],
) -> None:
    for i in numba.prange(x.shape[0]):
        advance_row(x[i], params[i], cmd[i], ref[i, 0], ref[i, 1], k, out[i])


def advance(
    x: NDArray[np.float64],
    params: NDArray[np.float64],
    cmd_nm: NDArray[np.float64],
    ref: NDArray[np.float64],
    k: int,
    out: NDArray[np.float64],
    *,
    parallel: bool | None = None,
) -> None:
    """Advance N knees in place by ``k`` plant steps of 1 ms (one compiled call).

    Args:
        x: states ``(N, N_STATE)`` (columns ``X_*``), updated in place.
        params: parameter rows ``(N, N_PARAMS)`` from :meth:`KneeParams.vector`.
        cmd_nm: exoskeleton torque commands ``(N,)``, N·m, held over the ``k`` steps.
        ref: the patients' task reference ``(N, 2)``: angle (rad) and velocity (rad/s) at the
            first step (extrapolated linearly over the call).
        k: plant steps (≥ 1).
        out: ``(N, N_OUT)`` outputs (columns ``O_*``), overwritten.
        parallel: use every numba thread (default: when N ≥ :data:`PARALLEL_MIN_BATCH`).

    """
    n = x.shape[0]
    for name, arr, shape in (
        ("x", x, (n, N_STATE)),
        ("params", params, (n, N_PARAMS)),
        ("cmd_nm", cmd_nm, (n,)),
        ("ref", ref, (n, 2)),
        ("out", out, (n, N_OUT)),
    ):
        if arr.shape != shape or arr.dtype != np.float64:
            raise InvalidInputError(
                f"{name}: expected float64 {shape}, got {arr.dtype} {arr.shape}"
            )
    if k < 1:
        raise InvalidInputError(f"k: expected >= 1 plant steps, got {k}")
    if parallel is None:
        parallel = n >= PARALLEL_MIN_BATCH and numba.get_num_threads() > 1
    (_advance_parallel if parallel else _advance_serial)(x, params, cmd_nm, ref, int(k), out)


def initial_state(theta_rad: float, omega_rad_s: float = 0.0) -> NDArray[np.float64]:
    """A rested knee at ``theta_rad``: muscles inactive and rested, full effort, drive at zero."""
    x = np.zeros(N_STATE)
    x[X_THETA] = theta_rad
    x[X_OMEGA] = omega_rad_s
    x[X_THETA_M] = theta_rad
    x[X_OMEGA_M] = omega_rad_s
    x[X_EFFORT] = 1.0
    x[X_DELAY_LINE:] = omega_rad_s
    return x


def static_moment_nm(params: KneeParams, theta_rad: NDArray[np.float64]) -> NDArray[np.float64]:
    """Net moment (N·m) on the resting knee held still at ``theta_rad``: gravity + passive.

    Muscles inactive, zero velocity, drive unpowered (:func:`static_load_nm`). Its zero
    with negative slope is the equilibrium a released (pendulum-test) knee settles at.
    """
    p = params.vector()
    th = np.asarray(theta_rad, dtype=np.float64)
    return np.vectorize(lambda t: static_load_nm(p, float(t)))(th).astype(np.float64)


class KneeReading(NamedTuple):
    """What :meth:`KneePlant.step` returns (true values, SI units in the names)."""

    time_s: float
    angle_rad: float
    velocity_rad_s: float
    exo_torque_nm: float
    patient_torque_nm: float


class KneePlant:
    """One knee + exoskeleton stepped from Python (the API device emulators build on).

    Args:
        params: the patient and drive parameters (e.g. ``knee_preset("moderate")``).
        rng: seeded generator; draws the small initial-angle perturbation
            (``initial_jitter_rad`` standard deviation, default 0 = none).
        theta0_rad: initial angle, rad (default 90°, the seated rest posture).
        initial_jitter_rad: standard deviation of the initial-angle perturbation, rad.

    The patient follows the reference set with :meth:`set_reference` (default: stay at
    ``theta0_rad``); a patient with ``strength_fraction=0`` and no spasticity is passive.

    """

    def __init__(
        self,
        params: KneeParams,
        rng: np.random.Generator | None = None,
        *,
        theta0_rad: float = math.pi / 2,
        initial_jitter_rad: float = 0.0,
    ) -> None:
        self.params = params
        self._p = params.vector()
        jitter = 0.0
        if initial_jitter_rad > 0:
            if rng is None:
                raise ConfigError("rng", rng, "a seeded Generator when initial_jitter_rad > 0")
            jitter = float(rng.normal(0.0, initial_jitter_rad))
        self.x = initial_state(theta0_rad + jitter)
        self._out = np.zeros(N_OUT)
        self._ref = (theta0_rad, 0.0)
        self.time_s = 0.0
        self._pending_s = 0.0
        self.reading = KneeReading(0.0, float(self.x[X_THETA]), 0.0, 0.0, 0.0)

    def set_reference(self, theta_ref_rad: float, omega_ref_rad_s: float = 0.0) -> None:
        """Set what the patient tries to follow: angle (rad) and velocity (rad/s)."""
        self._ref = (float(theta_ref_rad), float(omega_ref_rad_s))

    def step(self, exo_torque_cmd_nm: float, dt_s: float) -> KneeReading:
        """Hold ``exo_torque_cmd_nm`` (N·m, flexion positive) for ``dt_s`` seconds and advance.

        The plant advances in whole 1-ms steps; a remainder of ``dt_s`` is carried over to the
        next call (so wall-clock-paced callers with irregular ``dt_s`` keep plant time equal to
        the sum of their ``dt_s`` within 1 ms). A call shorter than the pending step returns
        the unchanged reading.

        Raises:
            InvalidInputError: a non-finite command, or ``dt_s`` negative or not finite.

        """
        if not (math.isfinite(dt_s) and dt_s >= 0):
            raise InvalidInputError(f"dt_s: expected a finite duration >= 0 s, got {dt_s}")
        if not math.isfinite(exo_torque_cmd_nm):
            raise InvalidInputError(
                f"exo_torque_cmd_nm: expected a finite N·m value, got {exo_torque_cmd_nm}"
            )
        self._pending_s += dt_s
        k = math.floor(self._pending_s / PLANT_DT_S + 1e-9)
        if k < 1:
            return self.reading
        self._pending_s = max(0.0, self._pending_s - k * PLANT_DT_S)
        advance_row(
            self.x, self._p, float(exo_torque_cmd_nm), self._ref[0], self._ref[1], k, self._out
        )
        self.time_s += k * PLANT_DT_S
        self.reading = KneeReading(
            self.time_s,
            float(self.x[X_THETA]),
            float(self.x[X_OMEGA]),
            float(self._out[O_EXO_NM]),
            float(self._out[O_PATIENT_NM]),
        )
        return self.reading

    @property
    def angle_rad(self) -> float:
        """Current knee angle, rad."""
        return float(self.x[X_THETA])

    @property
    def velocity_rad_s(self) -> float:
        """Current knee velocity, rad/s."""
        return float(self.x[X_OMEGA])

    @property
    def exo_torque_nm(self) -> float:
        """Exoskeleton torque on the joint at the end of the last step, N·m."""
        return float(self._out[O_EXO_NM])
