"""Isokinetic stretches of the relaxed quadriceps: the velocity at which the stretch reflex starts.

A measuring tool (issue 22, item 3), the simulated counterpart of the clinical isokinetic
stretch tests of spasticity (a dynamometer moves the relaxed knee at constant velocities; the
stretch reflex shows as EMG and as extra resisting torque above some velocity).

Protocol (:func:`quadriceps_stretch`): each knee (relaxed muscles: no voluntary intent, drive
detached, the preset's reflex active; see :mod:`twinloop.plant.knee.pendulum`) rests at
``start_deg`` for ``hold_s``, then is *moved* (the angle and velocity are imposed every 1-ms plant
step, as by a stiff dynamometer) into flexion — which stretches the quadriceps — at a constant
velocity until ``start_deg + excursion_deg`` or for at most ``max_ramp_s``, whichever comes
first, then held. The compiled plant (:func:`~twinloop.plant.knee.model.advance`) computes the
muscles' response. Each stretch is run twice, with the preset's reflex and with the reflex gain
set to 0, so that the *reflex torque* is the difference of the two muscle torques (what the
reflex adds to the passive resistance).

Reported per velocity: the largest quadriceps reflex excitation, the largest reflex torque
(extending, N·m) and the latency from the start of the ramp to the first non-zero reflex
excitation. :func:`onset_velocity_deg_s` reads off the smallest velocity of the sweep at which a
response crosses a level.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError
from twinloop.plant.knee.model import (
    N_OUT,
    O_PATIENT_NM,
    O_REFLEX_Q,
    PLANT_DT_S,
    X_OMEGA,
    X_THETA,
    KneeParams,
    advance,
    initial_state,
)


@dataclasses.dataclass(frozen=True)
class StretchResponse:
    """Responses of one knee to a sweep of stretch velocities (arrays of shape ``(V,)``).

    Attributes:
        velocity_deg_s: the stretch velocities, deg/s (flexing = quadriceps lengthening).
        peak_reflex_excitation: largest quadriceps reflex excitation (0–1).
        peak_reflex_torque_nm: largest extending torque the reflex adds, N·m (≥ 0).
        onset_latency_s: ramp start to the first non-zero reflex excitation, s (NaN: none).

    """

    velocity_deg_s: NDArray[np.float64]
    peak_reflex_excitation: NDArray[np.float64]
    peak_reflex_torque_nm: NDArray[np.float64]
    onset_latency_s: NDArray[np.float64]


def quadriceps_stretch(
    knees: Sequence[KneeParams],
    velocity_deg_s: Sequence[float] | NDArray[np.float64],
    *,
    start_deg: float = 10.0,
    excursion_deg: float = 90.0,
    hold_s: float = 0.1,
    max_ramp_s: float = 0.5,
) -> list[StretchResponse]:
    """Stretch each knee's quadriceps at every velocity (one batch of the compiled plant).

    Args:
        knees: the knees, relaxed by the caller (e.g. ``PendulumConfig(...).params()``).
        velocity_deg_s: stretch velocities, deg/s (each > 0).
        start_deg: angle held before the ramp, degrees.
        excursion_deg: ramp length, degrees (start + excursion <= 130°).
        hold_s: rest before the ramp, s (> reflex delay, so the delay line starts at rest).
        max_ramp_s: longest ramp, s (slow stretches stop earlier than the excursion).

    Raises:
        ConfigError: an empty list, a velocity <= 0, or angles and durations out of range.

    """
    v = np.asarray(velocity_deg_s, dtype=np.float64)
    if not knees:
        raise ConfigError("knees", knees, "at least one KneeParams")
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ConfigError("velocity_deg_s", velocity_deg_s, "a 1-D list of velocities > 0 deg/s")
    if not (start_deg >= 0.0 and excursion_deg > 0 and start_deg + excursion_deg <= 130.0):
        raise ConfigError(
            "start_deg/excursion_deg", (start_deg, excursion_deg), "0 <= start < end <= 130"
        )
    for name, value in (("hold_s", hold_s), ("max_ramp_s", max_ramp_s)):
        if not (math.isfinite(value) and 0 < value <= 10):
            raise ConfigError(name, value, "0 < value <= 10 s")
    n_v = v.size
    # rows: knee-major, velocity, then (reflex, no reflex)
    p_rows = []
    for knee in knees:
        reflex = knee.vector()
        silent = dataclasses.replace(knee, spasticity_gain_per_rad_s=0.0).vector()
        p_rows.extend([reflex, silent] * n_v)
    p = np.stack(p_rows)
    n = p.shape[0]
    vel = np.tile(np.repeat(np.radians(v), 2), len(knees))
    ramp_s = np.minimum(math.radians(excursion_deg) / vel, max_ramp_s)
    th0 = math.radians(start_deg)
    x = np.stack([initial_state(th0)] * n)
    out = np.zeros((n, N_OUT))
    cmd = np.zeros(n)
    ref = np.zeros((n, 2))
    ref[:, 0] = th0
    steps = round((hold_s + float(ramp_s.max())) / PLANT_DT_S) + 1
    peak_exc = np.zeros(n)
    tau = np.zeros((steps, n))
    onset = np.full(n, np.nan)
    for j in range(steps):
        t_ramp = j * PLANT_DT_S - hold_s  # time since the ramp began (< 0 while held)
        moving = (t_ramp >= 0) & (t_ramp < ramp_s)
        x[:, X_THETA] = th0 + vel * np.clip(t_ramp, 0.0, ramp_s)
        x[:, X_OMEGA] = np.where(moving, vel, 0.0)
        advance(x, p, cmd, ref, 1, out, parallel=False)
        exc = out[:, O_REFLEX_Q]
        onset = np.where(np.isnan(onset) & (exc > 0), t_ramp, onset)
        peak_exc = np.maximum(peak_exc, exc)
        tau[j] = out[:, O_PATIENT_NM]
    # reflex torque: extending (negative) muscle torque beyond the reflex-free twin's
    added = -(tau[:, 0::2] - tau[:, 1::2])
    peak_ext = np.maximum(added.max(axis=0), 0.0)
    responses = []
    for k in range(len(knees)):
        rows = slice(2 * k * n_v, 2 * (k + 1) * n_v, 2)
        cols = slice(k * n_v, (k + 1) * n_v)
        responses.append(
            StretchResponse(
                velocity_deg_s=v.copy(),
                peak_reflex_excitation=peak_exc[rows].copy(),
                peak_reflex_torque_nm=peak_ext[cols].copy(),
                onset_latency_s=onset[rows].copy(),
            )
        )
    return responses


def onset_velocity_deg_s(
    velocity_deg_s: NDArray[np.float64], response: NDArray[np.float64], level: float = 0.0
) -> float:
    """Smallest velocity of an increasing sweep whose response exceeds ``level`` (NaN: none)."""
    hit = np.flatnonzero(np.asarray(response) > level)
    return float(velocity_deg_s[hit[0]]) if hit.size else math.nan
