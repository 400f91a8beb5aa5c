"""Rehabilitation metrics of an exoskeleton-assisted joint, computed from recorded time series.

All inputs are arrays of one trial sampled at a constant period ``dt_s`` (shape ``(K,)``, or
``(N, K)`` for N trials at once; the metrics are then per trial):

* **RMS tracking error** (degrees): ``sqrt(mean((θ − θ_ref)²))``, reported in degrees although
  angles are radians everywhere else.
* **Work** (J): the positive mechanical work each torque source does on the joint,
  ``Σ max(τ·θ̇, 0)·dt`` — positive power only, because negative work (braking) is not
  assistance. The **exoskeleton's share** is ``W_exo / (W_exo + W_patient)``; 0 when neither
  did positive work. ("Fraction of joint work done by the exoskeleton" of the
  assist-as-needed literature, e.g. Banala et al. 2009, *IEEE TNSRE* 17:2.)
* **Patient effort**: the mean of the squared muscle activations, ``mean(a_ext² + a_flex²)``
  (dimensionless, 0–2), the effort term of Emken et al. 2007 (*J Neurophysiol* 97:3997) —
  or, when no activations are given, the RMS of the patient's net muscle torque (N·m).
* **Spasticity events**: onsets of the stretch reflex, counted as rising edges of
  ``reflex_torque_nm`` above ``reflex_event_nm`` (a reflex burst is one event however long).
* **Limit violations** (must be 0): samples where the joint left its range of motion, exceeded
  the velocity limit, or the exoskeleton torque exceeded its limit (beyond a relative tolerance
  of 1e-9 for rounding).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.plant.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ExoMetrics:
    """Metrics of one trial (floats) or of N trials (arrays of shape ``(N,)``).

    Attributes:
        rms_error_deg: RMS tracking error, degrees.
        max_error_deg: largest absolute tracking error, degrees.
        exo_work_j: positive work of the exoskeleton, J.
        patient_work_j: positive work of the patient's muscles, J.
        exo_work_fraction: ``exo_work_j / (exo_work_j + patient_work_j)`` (0 if both are 0).
        patient_effort: mean squared activation (dimensionless), or RMS muscle torque (N·m)
            when no activations were given (see :attr:`effort_unit`).
        effort_unit: ``"activation²"`` or ``"N·m"``.
        spasticity_events: reflex onsets.
        rom_violations: samples outside the range of motion.
        velocity_violations: samples beyond the velocity limit.
        torque_violations: samples with exoskeleton torque beyond its limit.
        duration_s: trial length, s.

    """

    rms_error_deg: NDArray[np.float64] | float
    max_error_deg: NDArray[np.float64] | float
    exo_work_j: NDArray[np.float64] | float
    patient_work_j: NDArray[np.float64] | float
    exo_work_fraction: NDArray[np.float64] | float
    patient_effort: NDArray[np.float64] | float
    effort_unit: str
    spasticity_events: NDArray[np.int64] | int
    rom_violations: NDArray[np.int64] | int
    velocity_violations: NDArray[np.int64] | int
    torque_violations: NDArray[np.int64] | int
    duration_s: float

    @property
    def limit_violations(self) -> NDArray[np.int64] | int:
        """All limit violations (range of motion, velocity, torque)."""
        return self.rom_violations + self.velocity_violations + self.torque_violations


def _series(name: str, value: ArrayLike, shape: tuple[int, ...] | None) -> NDArray[np.float64]:
    a = np.asarray(value, dtype=np.float64)
    if a.ndim not in (1, 2) or a.shape[-1] < 1:
        raise ConfigError(name, a.shape, "a (K,) or (N, K) array with K >= 1 samples")
    if shape is not None and a.shape != shape:
        raise ConfigError(name, a.shape, f"the shape of angle_rad {shape}")
    if not np.all(np.isfinite(a)):
        raise ConfigError(name, "non-finite values", "finite numbers")
    return a


def _positive_work(
    torque: NDArray[np.float64], velocity: NDArray[np.float64], dt: float
) -> NDArray[np.float64]:
    return np.maximum(torque * velocity, 0.0).sum(axis=-1) * dt


def exo_metrics(
    *,
    dt_s: float,
    angle_rad: ArrayLike,
    reference_rad: ArrayLike,
    velocity_rad_s: ArrayLike,
    exo_torque_nm: ArrayLike,
    muscle_torque_nm: ArrayLike,
    rom_rad: tuple[float, float],
    velocity_limit_rad_s: float,
    torque_limit_nm: float,
    activations: tuple[ArrayLike, ArrayLike] | None = None,
    reflex_torque_nm: ArrayLike | None = None,
    reflex_event_nm: float = 0.5,
) -> ExoMetrics:
    """The metrics of the module docstring for one trial ``(K,)`` or N trials ``(N, K)``.

    Args:
        dt_s: sample period, s (> 0).
        angle_rad: joint angle.
        reference_rad: the task's reference angle.
        velocity_rad_s: joint velocity.
        exo_torque_nm: torque the exoskeleton applied to the joint.
        muscle_torque_nm: the patient's net muscle torque on the joint (voluntary and reflex).
        rom_rad: the range of motion ``(min, max)``.
        velocity_limit_rad_s: the velocity limit (absolute value).
        torque_limit_nm: the exoskeleton's torque limit (absolute value).
        activations: extensor and flexor activations (0–1), for the effort.
        reflex_torque_nm: the stretch reflex's torque, for the spasticity events.
        reflex_event_nm: reflex torque that counts as a reflex onset, N·m.

    Raises:
        ConfigError: bad shapes, non-finite samples or bad limits (naming the argument).

    """
    if not (isinstance(dt_s, int | float) and math.isfinite(dt_s) and dt_s > 0):
        raise ConfigError("dt_s", dt_s, "a sample period > 0 s")
    lo, hi = rom_rad
    if not lo < hi:
        raise ConfigError("rom_rad", rom_rad, "(min, max) with min < max")
    for name, v in (
        ("velocity_limit_rad_s", velocity_limit_rad_s),
        ("torque_limit_nm", torque_limit_nm),
    ):
        if not (isinstance(v, int | float) and v > 0):
            raise ConfigError(name, v, "> 0")
    theta = _series("angle_rad", angle_rad, None)
    shape = theta.shape
    ref = _series("reference_rad", reference_rad, shape)
    vel = _series("velocity_rad_s", velocity_rad_s, shape)
    tau_exo = _series("exo_torque_nm", exo_torque_nm, shape)
    tau_pat = _series("muscle_torque_nm", muscle_torque_nm, shape)
    err_deg = np.degrees(theta - ref)
    rms = np.sqrt(np.mean(err_deg * err_deg, axis=-1))
    worst = np.max(np.abs(err_deg), axis=-1)
    w_exo = _positive_work(tau_exo, vel, dt_s)
    w_pat = _positive_work(tau_pat, vel, dt_s)
    total = w_exo + w_pat
    frac = np.divide(w_exo, total, out=np.zeros_like(total), where=total > 0)
    if activations is not None:
        a_ext = _series("activations[0]", activations[0], shape)
        a_flex = _series("activations[1]", activations[1], shape)
        effort = np.mean(a_ext * a_ext + a_flex * a_flex, axis=-1)
        unit = "activation²"
    else:
        effort = np.sqrt(np.mean(tau_pat * tau_pat, axis=-1))
        unit = "N·m"
    if reflex_torque_nm is not None:
        reflex = _series("reflex_torque_nm", reflex_torque_nm, shape)
        on = np.abs(reflex) > reflex_event_nm
        rising = on[..., 1:] & ~on[..., :-1]
        events = rising.sum(axis=-1) + on[..., 0]
    else:
        events = np.zeros(shape[:-1], dtype=np.int64)
    tol = 1e-9
    rom = ((theta < lo - tol * abs(lo)) | (theta > hi + tol * abs(hi))).sum(axis=-1)
    vel_v = (np.abs(vel) > velocity_limit_rad_s * (1 + tol)).sum(axis=-1)
    tq_v = (np.abs(tau_exo) > torque_limit_nm * (1 + tol)).sum(axis=-1)

    def out(x: NDArray[np.generic]) -> Any:  # a float/int for one trial, else the array
        return x.item() if x.ndim == 0 else x

    return ExoMetrics(
        rms_error_deg=out(rms),
        max_error_deg=out(worst),
        exo_work_j=out(w_exo),
        patient_work_j=out(w_pat),
        exo_work_fraction=out(frac),
        patient_effort=out(effort),
        effort_unit=unit,
        spasticity_events=out(np.asarray(events, dtype=np.int64)),
        rom_violations=out(np.asarray(rom, dtype=np.int64)),
        velocity_violations=out(np.asarray(vel_v, dtype=np.int64)),
        torque_violations=out(np.asarray(tq_v, dtype=np.int64)),
        duration_s=float(shape[-1] * dt_s),
    )
