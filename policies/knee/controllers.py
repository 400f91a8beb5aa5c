"""Exoskeleton torque controllers: impedance (PD) control and assist-as-needed.

A controller is a plain object with ``torque(obs: ExoInput) -> float`` (N·m, positive in the
joint's positive direction), called at the control rate (100–500 Hz). Its output is clipped to
``torque_limit_nm``; the supervisor and the drive's profile enforce their own limits after it.

* :class:`ImpedanceController`: a virtual spring and damper pulling the joint to the task's
  reference, ``τ = K (θ_ref − θ) + B (θ̇_ref − θ̇)`` (Hogan 1985, *J Dyn Sys Meas Control*
  107:1). The exoskeleton then does whatever the patient does not: stiff enough to track
  well, it takes over most of the work.
* :class:`AssistAsNeededController`: an impedance plus a learned feed-forward torque
  along the task, adapted from the tracking error with forgetting — the continuous-time form
  of Emken et al. 2007 (*J Neurophysiol* 97:3997, "Motor adaptation as a greedy optimization
  of error and effort"; the robot's update ``u_{i+1} = f·u_i + g·e_i`` with a forgetting
  factor ``f < 1``), per phase bin of the task as in Banala et al. 2009 (*IEEE TNSRE* 17:2):

  ``u̇_j = g·dz(e) − λ·u_j`` for the bin ``j`` of the current task phase, with ``e = θ_ref − θ``
  and ``dz`` a dead zone of ``±error_tolerance_rad``: inside the tolerance the assistance only
  decays, so it stays as small as the patient's own performance allows ("as needed"), and it
  grows where and when the patient falls behind.

  Twin-aware (``use_twin``, the default): when the knee twin's estimate of the patient's
  residual voluntary capacity ``c`` (0–1, :class:`ExoInput` ``twin_voluntary_capacity``) is
  available, the impedance's stiffness and damping are scaled by
  ``clip(1 − c, min_impedance_scale, 1)`` — the "minimal assist-as-needed" principle of
  Pehlivan, Losey & O'Malley 2016 (*IEEE T-RO* 32(1):113, the feedback gains decrease as the
  estimated patient capability grows). Without a twin estimate (NaN) the gains are unchanged.

Registry: :data:`EXO_CONTROLLERS` names the controllers :func:`make_exo_controller` builds —
``"none"`` (:class:`ZeroTorqueController`, the unassisted baseline), ``"impedance"`` and
``"aan"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.interface import POLICY_PREFIX


@dataclasses.dataclass(frozen=True, slots=True)
class ExoInput:
    """What an exoskeleton controller sees at a control tick.

    Attributes:
        t_s: task time, s.
        angle_rad: measured joint angle (encoder).
        velocity_rad_s: measured joint velocity.
        reference_rad: the task's reference angle.
        reference_velocity_rad_s: the task's reference velocity.
        torque_sensor_nm: the joint torque sensor (NaN when the loop has none).
        emg_quad: quadriceps EMG envelope, fraction of maximum (NaN: none).
        emg_ham: hamstrings EMG envelope (NaN: none).
        twin_patient_torque_nm: the knee twin's identified patient torque (NaN: no twin).
        twin_voluntary_capacity: its residual voluntary strength estimate, 0–1 (NaN: no twin).
        twin_spasticity_gain_per_rad_s: its stretch-reflex gain estimate (NaN: no twin).

    """

    t_s: float
    angle_rad: float
    velocity_rad_s: float
    reference_rad: float
    reference_velocity_rad_s: float
    torque_sensor_nm: float = math.nan
    emg_quad: float = math.nan
    emg_ham: float = math.nan
    twin_patient_torque_nm: float = math.nan
    twin_voluntary_capacity: float = math.nan
    twin_spasticity_gain_per_rad_s: float = math.nan


def _check(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise PolicyConfigError(
            f"{name}={value!r} is not allowed: a finite number {'>=' if allow_zero else '>'} 0"
        )


def _clip(tau: float, limit: float) -> float:
    return min(max(tau, -limit), limit)


@dataclasses.dataclass
class ImpedanceController:
    """``τ = K (θ_ref − θ) + B (θ̇_ref − θ̇)``, clipped to ``±torque_limit_nm``.

    Args:
        stiffness_nm_per_rad: K.
        damping_nm_s_per_rad: B.
        torque_limit_nm: output limit.

    """

    stiffness_nm_per_rad: float = 60.0
    damping_nm_s_per_rad: float = 3.0
    torque_limit_nm: float = 40.0

    def __post_init__(self) -> None:
        _check("stiffness_nm_per_rad", self.stiffness_nm_per_rad, allow_zero=True)
        _check("damping_nm_s_per_rad", self.damping_nm_s_per_rad, allow_zero=True)
        _check("torque_limit_nm", self.torque_limit_nm)

    def torque(self, obs: ExoInput) -> float:
        """The impedance torque, N·m."""
        e = obs.reference_rad - obs.angle_rad
        de = obs.reference_velocity_rad_s - obs.velocity_rad_s
        tau = self.stiffness_nm_per_rad * e + self.damping_nm_s_per_rad * de
        return _clip(tau, self.torque_limit_nm) if math.isfinite(tau) else 0.0


@dataclasses.dataclass
class AssistAsNeededController:
    """Impedance + a feed-forward torque learned per task phase, with forgetting.

    Shipped gains: chosen by ``python benchmarks/aan_gain_search.py`` (Optuna TPE, 50 points,
    seeds 0 1 2, validated on 3 4 5; rounded) on the knee plant of commit 1bd05cd (issue 22's
    literature values): RMS ≤ 3° with the exoskeleton doing ≤ 50 % of the positive work and no
    limit violation on *mild* and *moderate*, then the largest saving of positive assistance work
    against impedance control at matched RMS error on *moderate*: +9 % (*severe*: 2.4°, ≈ 0 %).
    On the plant with the averaged 3CC-r fatigue and 17-ms reflex delay the search's best
    differs from them by less than its matching tolerance's bias (+9.8 % against their +9.4 %
    on seeds 0 1 2, +8.9 % on 3 4 5 with *severe* at 2.7° against their +8.6 % and 2.5°).

    Args:
        period_s: the task's period (cyclic tasks) or duration: the phase is
            ``(t_s mod period_s) / period_s``.
        n_bins: phase bins of the feed-forward torque.
        stiffness_nm_per_rad: the impedance's K, before the twin's scaling (with it,
            ``min_impedance_scale``–1 times this: the more capable the patient, the softer).
        damping_nm_s_per_rad: its B.
        learning_gain_nm_per_rad_s: g, feed-forward growth per radian of error and second.
        forgetting_per_s: λ, decay rate of the feed-forward (1/s).
        error_tolerance_rad: the dead zone of the error.
        torque_limit_nm: output limit (the feed-forward is bounded by it too).
        use_twin: scale the impedance by the twin's capacity estimate when there is one.
        min_impedance_scale: the smallest impedance scale (0–1), for a fully capable patient.

    """

    period_s: float
    n_bins: int = 50
    stiffness_nm_per_rad: float = 69.0
    damping_nm_s_per_rad: float = 9.7
    learning_gain_nm_per_rad_s: float = 3160.0
    forgetting_per_s: float = 5.6
    error_tolerance_rad: float = math.radians(1.0)
    torque_limit_nm: float = 40.0
    use_twin: bool = True
    min_impedance_scale: float = 0.53
    _feedforward_nm: NDArray[np.float64] = dataclasses.field(init=False, repr=False)
    _last_t_s: float | None = dataclasses.field(default=None, init=False, repr=False)
    _scale: float = dataclasses.field(default=1.0, init=False, repr=False)

    def __post_init__(self) -> None:
        _check("period_s", self.period_s)
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int) or self.n_bins < 1:
            raise PolicyConfigError(f"n_bins={self.n_bins!r} is not allowed: an integer >= 1")
        for name in (
            "stiffness_nm_per_rad",
            "damping_nm_s_per_rad",
            "learning_gain_nm_per_rad_s",
            "forgetting_per_s",
            "error_tolerance_rad",
        ):
            _check(name, getattr(self, name), allow_zero=True)
        _check("torque_limit_nm", self.torque_limit_nm)
        if not isinstance(self.use_twin, bool):
            raise PolicyConfigError(f"use_twin={self.use_twin!r} is not allowed: True or False")
        _check("min_impedance_scale", self.min_impedance_scale, allow_zero=True)
        if self.min_impedance_scale > 1:
            raise PolicyConfigError(
                f"min_impedance_scale={self.min_impedance_scale!r} is not allowed: 0 <= value <= 1"
            )
        self._feedforward_nm = np.zeros(self.n_bins)

    @property
    def feedforward_nm(self) -> NDArray[np.float64]:
        """The learned feed-forward torque per phase bin (a copy), N·m."""
        return self._feedforward_nm.copy()

    @property
    def impedance_scale(self) -> float:
        """The factor applied to the stiffness and damping at the last tick (1 = unscaled)."""
        return self._scale

    def impedance_scale_for(self, twin_voluntary_capacity: float) -> float:
        """``clip(1 − capacity, min_impedance_scale, 1)``; 1 without twin or estimate (NaN)."""
        c = twin_voluntary_capacity
        if not (self.use_twin and isinstance(c, int | float) and math.isfinite(c)):
            return 1.0
        return min(max(1.0 - float(c), self.min_impedance_scale), 1.0)

    def _bin(self, t_s: float) -> int:
        phase = (t_s % self.period_s) / self.period_s
        return min(int(phase * self.n_bins), self.n_bins - 1)

    def torque(self, obs: ExoInput) -> float:
        """Adapt the current bin's feed-forward, then return impedance + feed-forward, N·m."""
        e = obs.reference_rad - obs.angle_rad
        de = obs.reference_velocity_rad_s - obs.velocity_rad_s
        if not (math.isfinite(e) and math.isfinite(de)):
            self._last_t_s = obs.t_s
            return 0.0
        dt = 0.0 if self._last_t_s is None else max(obs.t_s - self._last_t_s, 0.0)
        self._last_t_s = obs.t_s
        j = self._bin(obs.t_s)
        tol = self.error_tolerance_rad
        beyond = math.copysign(max(abs(e) - tol, 0.0), e)
        u = self._feedforward_nm[j]
        u += dt * (self.learning_gain_nm_per_rad_s * beyond - self.forgetting_per_s * u)
        self._feedforward_nm[j] = _clip(u, self.torque_limit_nm)
        self._scale = scale = self.impedance_scale_for(obs.twin_voluntary_capacity)
        tau = scale * (self.stiffness_nm_per_rad * e + self.damping_nm_s_per_rad * de) + u
        return _clip(tau, self.torque_limit_nm)


class ExoController(Protocol):
    """What the exoskeleton loop drives: one torque (N·m) per control tick."""

    def torque(self, obs: ExoInput) -> float:
        """The torque to command at this tick, N·m (flexion positive)."""
        ...


@dataclasses.dataclass
class ZeroTorqueController:
    """The unassisted baseline: always 0 N·m (the drive only back-drives with its friction)."""

    def torque(self, obs: ExoInput) -> float:
        """0.0 N·m, whatever the observation."""
        return 0.0


#: Names :func:`make_exo_controller` accepts.
EXO_CONTROLLERS: tuple[str, ...] = ("none", "impedance", "aan")


def check_controller_name(name: object) -> str | None:
    """``None`` for an exoskeleton controller or ``policy:PATH``, else what is allowed."""
    if isinstance(name, str) and (
        name in EXO_CONTROLLERS
        or (name.startswith(POLICY_PREFIX) and len(name) > len(POLICY_PREFIX))
    ):
        return None
    return f"one of {', '.join(EXO_CONTROLLERS)} or policy:PATH (a policy saved by train)"


def make_exo_controller(name: str, *, period_s: float, torque_limit_nm: float) -> ExoController:
    """An exoskeleton controller by name, with default gains.

    Args:
        name: one of :data:`EXO_CONTROLLERS` — ``"none"`` (:class:`ZeroTorqueController`),
            ``"impedance"`` (:class:`ImpedanceController`), ``"aan"``
            (:class:`AssistAsNeededController`, twin-aware).
        period_s: the task's period or duration, s (the assist-as-needed phase bins).
        torque_limit_nm: the controller's output limit, N·m.

    Raises:
        PolicyConfigError: an unknown name (lists the valid ones), or a period or limit that
            is not a finite number > 0.

    """
    if name not in EXO_CONTROLLERS:
        raise PolicyConfigError(
            f"exo controller={name!r} is not allowed: one of {', '.join(EXO_CONTROLLERS)}"
        )
    _check("period_s", period_s)
    _check("torque_limit_nm", torque_limit_nm)
    if name == "impedance":
        return ImpedanceController(torque_limit_nm=torque_limit_nm)
    if name == "aan":
        return AssistAsNeededController(period_s=period_s, torque_limit_nm=torque_limit_nm)
    return ZeroTorqueController()
