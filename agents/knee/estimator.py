"""The knee twin: online identification of the patient's muscle torque, strength and spasticity.

The twin knows the *nominal* limb (:class:`twinloop.plant.knee.model.KneeParams` of the patient's
segment geometry, muscles, intent gains and exoskeleton drive, e.g. ``knee_preset("healthy",
body_mass_kg=…, height_m=…)``); it never reads the patient's ``strength_fraction`` or reflex
gain/threshold (they are overwritten with the healthy defaults at construction) — it
identifies them from the encoder, the task reference and the torque the drive was commanded.
Conventions of :mod:`twinloop.plant.knee.model`: θ knee flexion (rad, 0 = extended), torque positive
= flexion, seated with the thigh horizontal (gravity moment ``mgd·cos θ``).

Equations (one control sample ``k``, period ``Δ``; everything is evaluated at the centre
``t_{k−1}`` of the last three encoder angles)
-------------------------------------------------------------------------------------------
1. Kinematics by central differences: ``ω = (θ_k − θ_{k−2})/2Δ``, ``α = (θ_k − 2θ_{k−1} +
   θ_{k−2})/Δ²``. Exoskeleton torque on the joint: ``τ_exo`` = mean motor torque over the two
   periods around ``t_{k−1}`` (the applied commands through the nominal drive's saturation and
   slew-rate limit) − Coulomb·tanh(ω/ω_ε) − b_v·ω (``exo_torque_source="command"``, the
   default: it has no bias, and the drive is known), or the joint torque sensor's reading at
   ``t_{k−1}`` (``"sensor"``, needed for a series elastic drive; it carries the sensor's
   per-session bias straight into τ_p).
2. Inverse dynamics on the nominal limb — the identified patient torque::

       τ_p = I·α − mgd·cos θ − τ_pass(θ, ω) − τ_exo

   (``τ_pass`` = :func:`twinloop.plant.knee.model.passive_joint_moment`: the Riener & Edrich
   passive elastic moment, which includes the muscles' passive force, the end stops and
   damping), so τ_p is the muscles' active torque.
3. Voluntary regressors, one per strength hypothesis ``s_j``
   (:attr:`KneeEstimatorConfig.capacity_grid`): the nominal intent ``τ_int = Kp(θ_ref − θ) +
   Kd(ω_ref − ω) − g_c·τ_static(θ)`` (``τ_static``: gravity + passive elastic,
   :func:`twinloop.plant.knee.model.static_load_nm`) gives the full-effort excitations ``u_q =
   max(0, −τ_int)/(F_q r_q)``, ``u_h = max(0, τ_int)/(F_h r_h)``. The patient puts an unknown,
   slowly varying *effort* ε ∈ (0, 1] into the intent (slacking, Emken et al. 2007) and the
   excitation saturates at the residual strength: ``min(s_j, ε·u_m)``. Activation dynamics are
   first-order and linear, and the up/down rate choice ``u > a`` is scale invariant, so ``act[ε·w] =
   ε·act[w]`` for any ε > 0, hence ``act[min(s_j, ε·u)] = ε·act[min(s_j/ε, u)]``. With each
   hypothesis' current effort estimate ``ε̂_j`` (its coefficient below, clipped to ``[EFFORT_FLOOR,
   1]``) the regressor is ``v_j = −A_q·act[min(s_j/ε̂_j, u_q)] + A_h·act[min(s_j/ε̂_j, u_h)]``
   (nominal activation 15/50 ms, exact for a held input over Δ; ``A_m = F_m·r_m·f_L(θ)·f_V(ω)`` the
   torque per unit activation) and the voluntary torque is ``ε_j·v_j``: unsaturated it is
   ``ε·A·act[u]``, saturated ``A·act[s_j]`` (ε̂_j ≈ ε_j), whatever the effort.
4. Reflex regressors, a hinge basis over the stretch velocity (the threshold is unknown):
   ``r_i = −A_q·act[max(0, ω(t−D) − c_i)] + A_h·act[max(0, −ω(t−D) − c_i)]`` for the knots
   ``c_i`` (:attr:`KneeEstimatorConfig.reflex_knots_rad_s`), ``D`` the nominal reflex delay
   (``ω(t−D)`` linear between the two control samples around it). A
   reflex ``G·max(0, ω − v_th)`` is ``Σ_i g_i·max(0, ω − c_i)`` with ``Σ g_i = G`` above the knots.
5. Every channel (τ_p, v_j, r_i) goes through the same second-order Butterworth
   low-pass ``F`` (``filter_cutoff_hz``): the model is linear in the unknowns, so
   ``F[y] = ε_j·F[v_j] + Σ_i g_{j,i}·F[r_i]`` still holds for the filtered signals (ε varying
   slowly against the filter), and α needs no separate smoothing. Each hypothesis runs its own
   recursive least squares (its ``v_j`` differs) on ``θ_j = (ε_j, g_{j,1…K})`` — the
   :mod:`twinloop.agents.rls` update with forgetting λ, vectorised over the hypotheses — plus a
   random walk on the effort, ``P_j[ε,ε] += effort_drift_per_sqrt_s²·Δ`` per sample (in the RLS's
   units, a residual variance of 1 N·m²), so ε has a shorter memory than the reflex gains
   (the patient's effort decays with a ≈ 5 s time constant; λ alone remembers ≈ 10 s).
   After each update ε_j is projected onto ``[EFFORT_FLOOR, 1]`` in the metric of ``P_j⁻¹``
   (``θ_j −= P_j[:, ε]·(ε_j − clip(ε_j))/P_j[ε,ε]``): an effort above 1 would otherwise let a
   weaker hypothesis mimic a stronger one (``ε·s_j``). Prior ``ε = prior_voluntary_effort``
   (1), variance ``effort_initial_variance``. Each hypothesis keeps the discounted sum
   ``J_j = Σ λ^{k−n}·e_{j,n}²`` of its a-priori residuals.

Reported (:class:`~twinloop.agents.knee.messages.KneeTwinEstimate`)
----------------------------------------------------------
* ``voluntary_capacity``: the *largest* ``s_j`` the data does not reject,
  ``J_j ≤ (1 + capacity_tolerance)·min J + W·capacity_floor_nm²`` (W = Σ λ^n), refined by a
  parabola through the residual sums when that hypothesis is also the best fit. Strength is
  observable only where the patient's intent exceeds it (the torque saturates); a patient who
  delivers everything they intend is reported at 1 — "no weakness seen" — and
  :attr:`KneeTwinEstimator.consistent_capacity_range` gives the lower bound the data has
  demonstrated. Both ends of that range go out with every estimate
  (``voluntary_capacity_low``/``_high``): an upper end below 1 means the strength is
  identified; at 1 it is not observable under this task and assistance
  (:func:`~twinloop.agents.knee.messages.capacity_identified`), which reports and the console
  say.
* ``spasticity_gain_per_rad_s``: ``Σ g_i`` of the chosen hypothesis over the knots the data
  has explored (stretch velocity ≥ 1.5·c_i for ``min_stretch_s``), i.e. the slope of the
  identified reflex-excitation curve in the highest explored segment, clipped to
  ``[0, max_spasticity_gain_per_rad_s]``.
* ``patient_torque_nm``: ``F[τ_p]``, the filtered inverse-dynamics torque. It refers to about
  one period plus the filter's group delay earlier (≈ 65 ms at 100 Hz and 4 Hz).
* ``residual_rms_nm``: ``√(J/W)`` of the chosen hypothesis.
* ``voluntary_effort``: ``ε`` of the chosen hypothesis, clipped to [0, 1] (the prior until
  there is evidence). It is observable where the intent is below the strength; a knee that
  saturates nearly all the time (severe) constrains only ``ε·u`` beyond ``s`` and its effort
  is loosely determined (errors up to ≈ 0.25 seen, while its capacity stays identified).

Prior: until ``min_evidence_s`` of samples have been used (after ``warmup_s`` of filter
transient), the estimate is the prior — capacity ``prior_voluntary_capacity`` (1: the healthy
nominal knee, no weakness until seen), reflex gain ``prior_spasticity_gain_per_rad_s`` (0) —
and the reflex gain stays at its prior until the first knot has been explored.
``patient_torque_nm`` and ``residual_rms_nm`` are NaN until defined.

Gaps: a non-finite input is skipped (counted in :attr:`KneeTwinEstimator.skipped`) and, like a
reading that does not follow the previous one by one period (±50 %), restarts the differences,
the reflex delay line and the filter; the identification is kept.

Accuracy (measured; ``tests/agents/knee/test_estimator.py``)
--------------------------------------------------------
Each preset of :mod:`twinloop.plant.knee.model` driven by
:class:`twinloop.plant.knee.model.KneePlant` for 30 s on cosine flexion–extension cycles 5°–100°
with a 2-s period, a 131072-count encoder (0.5 counts of noise), the twin at 100 Hz knowing the
healthy nominal limb (seed 0):

==========================  ===========  ===========  ============  =============
strength / reflex gain      healthy      mild         moderate      severe
==========================  ===========  ===========  ============  =============
truth                       1 / 0        0.6 / 0.01   0.3 / 0.02    0.05 / 0.04
assistive exo (K = 20)      1 / 0.0000   1 / 0.0101   1 / 0.0202    0.049 / 0.0397
resistive load (≤ 40 N·m)   1 / 0.0013   1 / 0.0117   0.304/0.0237  0.050 / 0.0416
==========================  ===========  ===========  ============  =============

* Reflex gain: within 1 % under assistance, 5–20 % under the resistive load (slower
  movements). It needs stretch velocities well past the threshold: on the slower default task
  (10°–70°, 3 s, |ω| ≤ 1.1 rad/s) moderate reads 0.0177 (−12 %) and mild's reflex (threshold
  1 rad/s) is hardly stimulated and reads 0.0003.
* Strength: identified to ±0.005 wherever the intent saturates (severe on any task, moderate
  under the resistive load). Healthy, mild and moderate on the assistive task never need more
  than ≈ 8 % of a healthy knee's torque, so their strength is *not observable* there: they
  read 1 with a demonstrated lower bound of 0.08 (0.4 under the load). Mild (60 %) cannot be
  told from healthy within a 40-N·m drive at all: its intent never reaches 60 %.
* Patient torque: correlation with the plant's true muscle torque 0.93–0.98 as reported; once
  the ≈ 70 ms lag is aligned, RMS error 0.07–0.29 N·m against a true torque with 2.7–14 N·m
  standard deviation.
* A twin whose nominal limb is 10 kg off the patient's body mass: severe strength 0.046–0.056,
  reflex gain 0.036–0.044. The torque sensor instead of the command: within 2 %.
* Slacking (Emken et al. 2007, :mod:`twinloop.plant.knee.model`'s effort ε) under assistive
  impedances K = 60 / 200 N·m/rad (B = 3 / 10), 40 s: the true effort of healthy, mild, moderate
  decays to 0.83–0.98 / 0.57–0.88; capacity stays 1 ("no weakness seen"; without the effort term it
  collapsed to 0.07), reflex gains within 4 %, the effort within 0.027–0.063 (max after 5 s;
  the RLS lags the decay by about a second), RMS 0.012–0.029. Slacking disabled: effort
  ≥ 0.987 (mild).
* Convergence: evidence from 2.5 s (warm-up + minimum evidence); settled by 3 s.
* Cost: about 80 µs per step (median; numpy and the plant's compiled muscle curves), p99
  ≈ 0.2 ms on a loaded machine.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.knee.messages import ExoSensorReading, KneeTwinEstimate, TaskReference
from twinloop.plant.knee.model import (
    M_ARM,
    M_FMAX,
    M_STRAIN_PER_RAD,
    M_THOPT,
    M_VEL_PER_RAD_S,
    P_COUL,
    P_FEPS,
    P_FL_GAMMA,
    P_FLEN,
    P_H,
    P_HILL_A,
    P_Q,
    P_VISC,
    KneeParams,
    force_length,
    force_velocity,
    passive_joint_moment,
    static_load_nm,
)

ExoTorqueSource = Literal["command", "sensor"]

#: A hinge knot counts as explored once the stretch velocity has reached this multiple of it.
KNOT_EXPLORED_FACTOR = 1.5

#: Lower clip of an effort estimate where it sets a hypothesis' saturation (``s_j/ε̂``).
EFFORT_FLOOR = 0.05

#: Default grid of residual-strength hypotheses (fractions of the healthy maximum).
DEFAULT_CAPACITY_GRID: tuple[float, ...] = (
    0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6,
    0.7, 0.8, 0.9, 1.0,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KneeEstimatorConfig:
    """Settings of :class:`KneeTwinEstimator` (validated; units in the names).

    Attributes:
        forgetting_factor: λ of the recursive least squares and of the hypotheses' residual
            sums, per control sample (0.999 at 100 Hz: a memory of about 10 s).
        filter_cutoff_hz: cutoff of the second-order Butterworth low-pass applied alike to the
            inverse-dynamics torque and to every regressor.
        capacity_grid: residual-strength hypotheses, increasing, in (0, 1], ending at 1.
        capacity_tolerance: a hypothesis is consistent with the data when its residual sum is
            within ``(1 + tolerance)`` of the best one's (plus the floor below); the largest
            consistent one is reported.
        reflex_knots_rad_s: stretch-velocity knots of the reflex's hinge basis, increasing, > 0.
        max_spasticity_gain_per_rad_s: upper clip of the reported reflex gain.
        prior_voluntary_capacity: reported until there is evidence (0–1; 1 = the nominal
            healthy knee, no weakness until the data shows it).
        prior_spasticity_gain_per_rad_s: reported until there is evidence and the stretch
            velocity has explored the first knot (≥ 0).
        warmup_s: the first ``warmup_s`` after the start (or a gap) only fill the filter.
        min_evidence_s: samples used before the estimates leave the prior.
        min_stretch_s: time the stretch velocity must spend at 1.5× a knot or more before that
            knot's coefficient counts in the reported gain.
        capacity_floor_nm: absolute part of the consistency test: a hypothesis is rejected only
            if it also worsens the RMS fit by more than about this much (N·m), so that noise in
            a quiet stretch of data does not reject a hypothesis.
        initial_variance: initial RLS covariance of the reflex coefficients.
        prior_voluntary_effort: the effort ε assumed at the start (0 < ε ≤ 1; 1 = full effort).
        effort_initial_variance: initial RLS covariance of ε.
        effort_drift_per_sqrt_s: random walk of ε added to its covariance (per √s, in the
            RLS's units of a 1 N·m² residual variance): the effort's shorter memory.
        exo_torque_source: ``"command"`` — the applied command through the nominal drive
            (rate limit, friction; rigid drives only) — or ``"sensor"`` — the joint torque
            sensor.

    """

    forgetting_factor: float = 0.999
    filter_cutoff_hz: float = 4.0
    capacity_grid: tuple[float, ...] = DEFAULT_CAPACITY_GRID
    capacity_tolerance: float = 0.05
    reflex_knots_rad_s: tuple[float, ...] = (0.25, 0.5, 1.0)
    max_spasticity_gain_per_rad_s: float = 0.2
    prior_voluntary_capacity: float = 1.0
    prior_spasticity_gain_per_rad_s: float = 0.0
    warmup_s: float = 0.5
    min_evidence_s: float = 2.0
    min_stretch_s: float = 0.5
    capacity_floor_nm: float = 0.1
    initial_variance: float = 1.0
    exo_torque_source: ExoTorqueSource = "command"
    prior_voluntary_effort: float = 1.0
    effort_initial_variance: float = 0.01
    effort_drift_per_sqrt_s: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "forgetting_factor",
            "filter_cutoff_hz",
            "capacity_tolerance",
            "max_spasticity_gain_per_rad_s",
            "prior_voluntary_capacity",
            "prior_spasticity_gain_per_rad_s",
            "warmup_s",
            "min_evidence_s",
            "min_stretch_s",
            "capacity_floor_nm",
            "initial_variance",
            "prior_voluntary_effort",
            "effort_initial_variance",
            "effort_drift_per_sqrt_s",
        ):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not (ok and math.isfinite(value)):
                raise LoopConfigError(name, value, "a finite real number")
        if not 0.9 <= self.forgetting_factor <= 1.0:
            raise LoopConfigError("forgetting_factor", self.forgetting_factor, "0.9 <= λ <= 1")
        if not self.filter_cutoff_hz > 0:
            raise LoopConfigError("filter_cutoff_hz", self.filter_cutoff_hz, "> 0")
        if not self.capacity_tolerance >= 0:
            raise LoopConfigError("capacity_tolerance", self.capacity_tolerance, ">= 0")
        for name in (
            "max_spasticity_gain_per_rad_s",
            "initial_variance",
            "effort_initial_variance",
        ):
            if not getattr(self, name) > 0:
                raise LoopConfigError(name, getattr(self, name), "> 0")
        for name in (
            "warmup_s",
            "min_evidence_s",
            "min_stretch_s",
            "capacity_floor_nm",
            "effort_drift_per_sqrt_s",
        ):
            if not getattr(self, name) >= 0:
                raise LoopConfigError(name, getattr(self, name), ">= 0")
        if not 0 <= self.prior_voluntary_capacity <= 1:
            raise LoopConfigError(
                "prior_voluntary_capacity", self.prior_voluntary_capacity, "0 <= value <= 1"
            )
        if not 0 < self.prior_voluntary_effort <= 1:
            raise LoopConfigError(
                "prior_voluntary_effort", self.prior_voluntary_effort, "0 < value <= 1"
            )
        if not 0 <= self.prior_spasticity_gain_per_rad_s <= self.max_spasticity_gain_per_rad_s:
            raise LoopConfigError(
                "prior_spasticity_gain_per_rad_s",
                self.prior_spasticity_gain_per_rad_s,
                "0 <= value <= max_spasticity_gain_per_rad_s",
            )
        _check_increasing("capacity_grid", self.capacity_grid, lo=0.0, hi=1.0, last=1.0)
        _check_increasing("reflex_knots_rad_s", self.reflex_knots_rad_s, lo=0.0, hi=math.inf)
        if self.exo_torque_source not in ("command", "sensor"):
            raise LoopConfigError(
                "exo_torque_source", self.exo_torque_source, "'command' or 'sensor'"
            )


def _check_increasing(
    name: str, values: object, *, lo: float, hi: float, last: float | None = None
) -> None:
    ok = isinstance(values, tuple) and len(values) >= 1
    if ok:
        assert isinstance(values, tuple)
        ok = all(
            isinstance(v, int | float) and not isinstance(v, bool) and lo < v <= hi for v in values
        ) and all(a < b for a, b in itertools.pairwise(values))
        if ok and last is not None:
            ok = values[-1] == last
    if not ok:
        end = f", ending at {last:g}" if last is not None else ""
        raise LoopConfigError(
            name, values, f"a non-empty increasing tuple of numbers in ({lo:g}, {hi:g}]{end}"
        )


def _butterworth2(
    cutoff_hz: float, fs_hz: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Second-order Butterworth low-pass by the bilinear transform with pre-warping: (b, a)."""
    k = math.tan(math.pi * cutoff_hz / fs_hz)
    q = math.sqrt(2.0)
    norm = 1.0 / (1.0 + q * k + k * k)
    b0 = k * k * norm
    b = np.array([b0, 2.0 * b0, b0])
    a = np.array([1.0, 2.0 * (k * k - 1.0) * norm, (1.0 - q * k + k * k) * norm])
    return b, a


class KneeTwinEstimator:
    """Identifies the patient's muscle torque, residual strength and reflex gain online.

    Args:
        limb: the nominal knee the twin knows (segment geometry, muscles, intent gains,
            drive); its ``strength_fraction`` and spasticity fields are NOT read.
        config: the estimator's settings.
        control_hz: rate of :meth:`step` (one reading per control period).

    """

    def __init__(
        self, limb: KneeParams, config: KneeEstimatorConfig | None = None, control_hz: int = 100
    ) -> None:
        cfg = config if config is not None else KneeEstimatorConfig()
        if isinstance(control_hz, bool) or not isinstance(control_hz, int) or control_hz < 1:
            raise LoopConfigError("control_hz", control_hz, "an integer >= 1")
        if not cfg.filter_cutoff_hz < 0.4 * control_hz:
            raise LoopConfigError(
                "filter_cutoff_hz", cfg.filter_cutoff_hz, f"< 0.4 × control_hz ({control_hz})"
            )
        if cfg.exo_torque_source == "command" and limb.exo_series_stiffness_nm_per_rad > 0:
            raise LoopConfigError(
                "exo_torque_source",
                cfg.exo_torque_source,
                "'sensor' for a series elastic drive (the command model assumes a rigid drive)",
            )
        # the twin knows the nominal limb only: whatever the caller passed, the fields it must
        # identify are set to the healthy defaults, so they cannot leak in
        nominal = KneeParams()
        self.limb = dataclasses.replace(
            limb,
            strength_fraction=nominal.strength_fraction,
            spasticity_gain_per_rad_s=nominal.spasticity_gain_per_rad_s,
            spasticity_threshold_rad_s=nominal.spasticity_threshold_rad_s,
        )
        limb = self.limb
        self.config = cfg
        self.control_hz = control_hz
        self.dt_s = 1.0 / control_hz
        p = limb.vector()
        self._p = p
        self._inertia = limb.joint_inertia_kg_m2
        self._mgd = limb.gravity_moment_nm
        self._kp = limb.intent_kp_nm_per_rad
        self._kd = limb.intent_kd_nm_s_per_rad
        self._gcomp = limb.static_compensation_fraction
        self._q_max_nm = p[P_Q + M_FMAX] * p[P_Q + M_ARM]
        self._h_max_nm = p[P_H + M_FMAX] * p[P_H + M_ARM]
        self._alpha_up = 1.0 - math.exp(-self.dt_s / limb.activation_time_constant_s)
        self._alpha_down = 1.0 - math.exp(-self.dt_s / limb.deactivation_time_constant_s)
        # the reflex delay in control periods, whole and fractional part (interpolated)
        delay = limb.reflex_delay_s * control_hz
        self._delay = math.floor(delay + 1e-9)
        self._delay_frac = max(0.0, delay - self._delay)
        self._grid = np.array(cfg.capacity_grid, dtype=np.float64)
        self._knots = np.array(cfg.reflex_knots_rad_s, dtype=np.float64)
        self._b, self._a = _butterworth2(cfg.filter_cutoff_hz, float(control_hz))
        self._n_grid = len(cfg.capacity_grid)
        self._n_knots = len(cfg.reflex_knots_rad_s)
        self._warmup = round(cfg.warmup_s * control_hz)
        self._min_stretch = round(cfg.min_stretch_s * control_hz)
        self._min_evidence = max(1, round(cfg.min_evidence_s * control_hz))
        # random walk of the effort per sample, in the RLS's units (residual variance 1 N·m²)
        self._effort_q = cfg.effort_drift_per_sqrt_s**2 * self.dt_s
        self.reset()

    # -- state ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: back to the prior, as after construction."""
        cfg = self.config
        n_ch = 1 + self._n_grid + self._n_knots  # τ_p, v_j, r_i
        self._angles: collections.deque[float] = collections.deque(maxlen=3)
        self._sensor: collections.deque[float] = collections.deque(maxlen=2)
        self._exo_mean: collections.deque[float] = collections.deque(maxlen=2)
        self._refs: collections.deque[TaskReference] = collections.deque(maxlen=4)
        self._omega_hist: collections.deque[float] = collections.deque(maxlen=self._delay + 2)
        self._last_t_s = math.nan
        self._motor_nm = 0.0
        self._act_vol = np.zeros((2, self._n_grid))
        self._act_ref = np.zeros((2, self._n_knots))
        self._z1 = np.zeros(n_ch)
        self._z2 = np.zeros(n_ch)
        self._filter_started = False
        self._samples = 0  # since the last (re)start of the differences
        # one RLS per hypothesis (their voluntary regressors differ): θ_j = (ε_j, g_j1…g_jK)
        n_par = 1 + self._n_knots
        self._theta = np.zeros((self._n_grid, n_par))
        self._theta[:, 0] = cfg.prior_voluntary_effort
        p0 = np.diag([cfg.effort_initial_variance] + [cfg.initial_variance] * self._n_knots)
        self._pcov = np.repeat(p0[np.newaxis], self._n_grid, axis=0)
        self._max_trace = max(1e6, float(np.trace(p0)))
        self._ssr = np.zeros(self._n_grid)
        self._weight = 0.0
        self._used = 0
        #: samples skipped because an input was not finite
        self.skipped = 0
        self._knot_samples = np.zeros(self._n_knots, dtype=np.int64)
        self._choice = self._n_grid - 1
        self._patient_nm = math.nan
        self._last = KneeTwinEstimate(
            math.nan,
            math.nan,
            cfg.prior_voluntary_capacity,
            cfg.prior_spasticity_gain_per_rad_s,
            math.nan,
            cfg.prior_voluntary_effort,
        )

    def _restart(self) -> None:
        """Restart the differences, the delay line and the filter (after a gap in the data).

        The identified coefficients, the hypotheses' residual sums and the activation states
        are kept; the drive model restarts from the next command.
        """
        self._angles.clear()
        self._sensor.clear()
        self._exo_mean.clear()
        self._omega_hist.clear()
        self._last_t_s = math.nan
        self._motor_nm = math.nan
        self._filter_started = False
        self._samples = 0

    @property
    def samples_used(self) -> int:
        """Samples that have updated the identification so far."""
        return self._used

    @property
    def consistent_capacity_range(self) -> tuple[float, float]:
        """Smallest and largest strength hypotheses the data does not reject (0–1).

        The lower end is what the patient has demonstrated; when it is above the grid's first
        value and the upper end is 1, the data shows no saturation (strength not identified,
        only bounded below). ``(nan, nan)`` before any evidence.
        """
        if self._used <= self._min_evidence:
            return math.nan, math.nan
        ok = self._consistent()
        return float(self._grid[ok[0]]), float(self._grid[ok[-1]])

    def _consistent(self) -> NDArray[np.intp]:
        cfg = self.config
        floor = self._weight * cfg.capacity_floor_nm**2
        best = float(self._ssr.min())
        return np.nonzero(self._ssr <= best * (1.0 + cfg.capacity_tolerance) + floor)[0]

    # -- model pieces --------------------------------------------------------------------

    def _muscle_factors(self, theta: float, omega: float) -> tuple[float, float]:
        """(A_q, A_h): the muscles' torque per unit activation (≥ 0)."""
        p = self._p
        out = []
        for base, sign in ((P_Q, 1.0), (P_H, -1.0)):
            l_norm = 1.0 + sign * p[base + M_STRAIN_PER_RAD] * (theta - p[base + M_THOPT])
            v_norm = sign * p[base + M_VEL_PER_RAD_S] * omega
            arm_f = p[base + M_FMAX] * p[base + M_ARM]
            fl = force_length(l_norm, p[P_FL_GAMMA])
            fv = force_velocity(v_norm, p[P_HILL_A], p[P_FLEN])
            out.append(arm_f * fl * fv)
        return out[0], out[1]

    def _delayed_omega(self) -> float:
        """ω(t − D) from the velocity history, linear between the two samples around it."""
        hist = self._omega_hist
        newer = hist[-1 - self._delay] if len(hist) > self._delay else hist[0]
        older = hist[-2 - self._delay] if len(hist) > self._delay + 1 else newer
        return (1.0 - self._delay_frac) * newer + self._delay_frac * older

    def _activate(self, act: NDArray[np.float64], u: NDArray[np.float64]) -> None:
        rate = np.where(u > act, self._alpha_up, self._alpha_down)
        act += (u - act) * rate

    def _drive_mean_nm(self, cmd_nm: float) -> float:
        """Mean motor torque over the period just ended (rate limit of the nominal drive)."""
        lim = self.limb
        target = min(max(cmd_nm, -lim.exo_max_torque_nm), lim.exo_max_torque_nm)
        start = self._motor_nm if math.isfinite(self._motor_nm) else target
        ramp_s = abs(target - start) / lim.exo_torque_rate_nm_per_s
        if ramp_s >= self.dt_s:
            end = start + math.copysign(lim.exo_torque_rate_nm_per_s * self.dt_s, target - start)
            mean = 0.5 * (start + end)
        else:
            end = target
            mean = target - 0.5 * (target - start) * ramp_s / self.dt_s
        self._motor_nm = end
        return mean

    def _reference_at(self, t_s: float) -> tuple[float, float]:
        chosen = self._refs[0]
        for ref in self._refs:
            if ref.t_s <= t_s + 1e-9:
                chosen = ref
        th = chosen.reference_rad + chosen.reference_velocity_rad_s * (t_s - chosen.t_s)
        return th, chosen.reference_velocity_rad_s

    # -- the step ------------------------------------------------------------------------

    def step(
        self, reading: ExoSensorReading, reference: TaskReference, applied_torque_nm: float
    ) -> KneeTwinEstimate:
        """Account one control period; return the twin's estimate at ``reading.t_s``.

        ``applied_torque_nm`` is the command the drive held over the period that just ended
        (the supervisor-approved one). Non-finite inputs are skipped (the last estimate is
        returned, restamped).
        """
        cfg = self.config
        values = (
            reading.t_s,
            reading.angle_rad,
            reference.t_s,
            reference.reference_rad,
            reference.reference_velocity_rad_s,
        )
        exo_in = (
            applied_torque_nm if cfg.exo_torque_source == "command" else (reading.torque_sensor_nm)
        )
        if not all(math.isfinite(v) for v in (*values, exo_in)):
            self.skipped += 1
            self._restart()
            self._last = dataclasses.replace(self._last, t_s=reading.t_s)
            return self._last
        gap = float(reading.t_s) - self._last_t_s
        if self._angles and not abs(gap - self.dt_s) <= 0.5 * self.dt_s:  # a gap or a reversal
            self._restart()
        self._last_t_s = float(reading.t_s)
        self._refs.append(reference)
        self._angles.append(float(reading.angle_rad))
        if cfg.exo_torque_source == "command":
            self._exo_mean.append(self._drive_mean_nm(float(applied_torque_nm)))
        else:
            self._sensor.append(float(reading.torque_sensor_nm))
        self._samples += 1
        if len(self._angles) < 3:
            self._last = dataclasses.replace(self._last, t_s=reading.t_s)
            return self._last
        dt = self.dt_s
        th2, th1, th0 = self._angles  # θ_{k−2}, θ_{k−1}, θ_k
        theta = th1
        omega = (th0 - th2) / (2.0 * dt)
        alpha = (th0 - 2.0 * th1 + th2) / (dt * dt)
        t_c = float(reading.t_s) - dt
        p = self._p
        if cfg.exo_torque_source == "command":
            motor = 0.5 * (self._exo_mean[0] + self._exo_mean[-1])
            exo = motor - p[P_COUL] * math.tanh(omega / p[P_FEPS]) - p[P_VISC] * omega
        else:
            exo = self._sensor[0]
        cos_th = math.cos(theta)
        tau_p = (
            self._inertia * alpha - self._mgd * cos_th - passive_joint_moment(p, theta, omega) - exo
        )
        a_q, a_h = self._muscle_factors(theta, omega)
        # voluntary: the nominal intent, saturated at each strength hypothesis
        th_ref, om_ref = self._reference_at(t_c)
        tau_int = (
            self._kp * (th_ref - theta)
            + self._kd * (om_ref - omega)
            - self._gcomp * static_load_nm(p, theta)
        )
        u_q = max(0.0, -tau_int) / self._q_max_nm
        u_h = max(0.0, tau_int) / self._h_max_nm
        # saturation ε·u ≤ s_j, i.e. u ≤ s_j/ε̂_j with each hypothesis' current effort estimate
        limit = self._grid / np.clip(self._theta[:, 0], EFFORT_FLOOR, 1.0)
        self._activate(self._act_vol[0], np.minimum(limit, u_q))
        self._activate(self._act_vol[1], np.minimum(limit, u_h))
        vol = -a_q * self._act_vol[0] + a_h * self._act_vol[1]
        # reflex: delayed stretch velocity above each knot (quadriceps +ω, hamstrings −ω)
        self._omega_hist.append(omega)
        om_late = self._delayed_omega()
        self._activate(self._act_ref[0], np.maximum(0.0, om_late - self._knots))
        self._activate(self._act_ref[1], np.maximum(0.0, -om_late - self._knots))
        refl = -a_q * self._act_ref[0] + a_h * self._act_ref[1]
        self._knot_samples += np.abs(om_late) >= KNOT_EXPLORED_FACTOR * self._knots
        # the same low-pass on every channel (direct form II transposed)
        x = np.concatenate(([tau_p], vol, refl))
        if not self._filter_started:
            # start in steady state at the first input (unit DC gain)
            self._z2 = (self._b[2] - self._a[2]) * x
            self._z1 = (self._b[1] - self._a[1]) * x + self._z2
            self._filter_started = True
        yf = self._b[0] * x + self._z1
        self._z1 = self._b[1] * x - self._a[1] * yf + self._z2
        self._z2 = self._b[2] * x - self._a[2] * yf
        self._patient_nm = float(yf[0])
        if self._samples > self._warmup:
            self._update(yf[1 : 1 + self._n_grid], yf[1 + self._n_grid :], float(yf[0]))
        self._last = self._estimate(float(reading.t_s))
        return self._last

    def _update(self, vol: NDArray[np.float64], refl: NDArray[np.float64], target: float) -> None:
        """One RLS step of every hypothesis: ``target = ε_j·vol_j + refl·g_j``."""
        cfg = self.config
        lam = cfg.forgetting_factor
        phi = np.empty_like(self._theta)
        phi[:, 0] = vol
        phi[:, 1:] = refl
        err = target - np.einsum("ji,ji->j", phi, self._theta)  # a-priori residuals
        self._ssr = lam * self._ssr + err * err
        self._weight = lam * self._weight + 1.0
        pf = np.einsum("jik,jk->ji", self._pcov, phi)
        gain = pf / (lam + np.einsum("ji,ji->j", phi, pf))[:, np.newaxis]
        self._theta += gain * err[:, np.newaxis]
        pcov = self._pcov - gain[:, :, np.newaxis] * pf[:, np.newaxis, :]
        pcov = 0.5 * (pcov + pcov.transpose(0, 2, 1)) / lam
        # ε ∈ [EFFORT_FLOOR, 1]: project onto the bound in the metric of P⁻¹ (the reflex
        # coefficients move along their correlation with ε)
        excess = self._theta[:, 0] - np.clip(self._theta[:, 0], EFFORT_FLOOR, 1.0)
        self._theta -= pcov[:, :, 0] * (excess / pcov[:, 0, 0])[:, np.newaxis]
        pcov[:, 0, 0] += self._effort_q  # the effort drifts: its own, shorter memory
        trace = np.einsum("jii->j", pcov)
        pcov *= np.minimum(1.0, self._max_trace / trace)[:, np.newaxis, np.newaxis]
        self._pcov = pcov
        self._used += 1
        self._choice = int(self._consistent()[-1])

    def _capacity(self) -> float:
        """The chosen hypothesis, refined by a parabola through its neighbours' residual sums.

        Only when the choice is the best fit and has neighbours on both sides; otherwise the
        grid value (the upper end of the consistent set).
        """
        j = self._choice
        s = self._grid
        if not (0 < j < self._n_grid - 1) or int(np.argmin(self._ssr)) != j:
            return float(s[j])
        x0, x1, x2 = s[j - 1], s[j], s[j + 1]
        y0, y1, y2 = self._ssr[j - 1], self._ssr[j], self._ssr[j + 1]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
        if not a > 0:
            return float(x1)
        return float(min(max(-b / (2.0 * a), x0), x2))

    def _estimate(self, t_s: float) -> KneeTwinEstimate:
        cfg = self.config
        rms = math.sqrt(self._ssr[self._choice] / self._weight) if self._used else math.nan
        evidence = self._used > self._min_evidence
        cap = self._capacity() if evidence else cfg.prior_voluntary_capacity
        explored = self._knot_samples >= self._min_stretch
        if not (evidence and explored[0]):
            gain = cfg.prior_spasticity_gain_per_rad_s
        else:
            top = int(np.nonzero(explored)[0][-1])
            gain = float(np.sum(self._theta[self._choice, 1 : top + 2]))
            gain = min(max(gain, 0.0), cfg.max_spasticity_gain_per_rad_s)
        if evidence:
            effort = min(max(float(self._theta[self._choice, 0]), 0.0), 1.0)
        else:
            effort = cfg.prior_voluntary_effort
        low, high = self.consistent_capacity_range
        return KneeTwinEstimate(t_s, self._patient_nm, cap, gain, rms, effort, low, high)
