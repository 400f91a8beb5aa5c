"""The Wartenberg pendulum test of the knee, run on the compiled plant, and its metrics.

The clinical test (Wartenberg 1951; quantified by Bajd & Vodovnik 1984, *J Biomed Eng* 6:9-16):
the subject sits or lies with the thigh supported and the shank free; the examiner lifts the
shank to the horizontal (full extension) and releases it with the muscles relaxed; the knee swings
and settles hanging down. Spasticity (a velocity-dependent stretch reflex of the quadriceps)
truncates the first flexion swing and damps the oscillation.

Set-up here (:class:`PendulumConfig`): the thigh horizontal (see :mod:`twinloop.plant.knee.model`),
so "shank horizontal" is ``θ = 0`` (full extension); the hip angle is the config's (default 0°,
supine, the set-up of the healthy norms of Kim et al. 1996; 90° is the exoskeleton's seated
posture), and sets the passive moment through Riener & Edrich's hip coupling. The muscles are
relaxed: the patient's intent is zero (``intent_kp_nm_per_rad = intent_kd_nm_s_per_rad =
static_compensation_fraction = 0``, so no voluntary excitation), the stretch reflex of the
preset stays active, and the exoskeleton drive is either **detached** (the clinical test: no
link mass or inertia, no gear friction, no reflected rotor inertia) or **attached and
unpowered** (commanded 0 N·m, back-driven through its friction and inertia). The plant's
parameters are otherwise the preset's, unchanged.

Metrics (:func:`pendulum_metrics`; angles are measured from the release angle ``θ_start``,
in degrees; definitions as standardised by Rahimi et al. 2020, *BioMed Eng OnLine* 19:82):

* ``A0`` (plateau, resting angle): ``θ_rest − θ_start``, with ``θ_rest`` the mean angle over
  the last ``plateau_window_s`` of the trace (``settled`` says whether the angle moved less than
  the swing threshold in that window);
* ``A1`` (first-swing amplitude): ``θ_peak1 − θ_start`` at the first flexion reversal;
* relaxation index ``R2 = A1/A0`` and its normalised form ``R2n = R2/1.6`` (1.6 = the healthy
  mean of Bajd & Vodovnik 1984, a value still to verify in the paper);
* number of swings: flexion peaks (local maxima of ``θ``) that exceed the plateau angle by more
  than ``swing_threshold_deg`` (1° by default);
* peak angular velocity: the largest flexing velocity before the first flexion peak (the first
  downswing), deg/s;
* swing period: mean time between successive counted flexion peaks, s (NaN with fewer than 2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError, UnknownPatientError
from twinloop.plant.knee.model import (
    N_OUT,
    O_PATIENT_NM,
    O_REFLEX_Q,
    PLANT_DT_S,
    PRESETS,
    X_OMEGA,
    X_THETA,
    KneeParams,
    advance,
    initial_state,
    knee_preset,
)

#: Healthy mean relaxation index used to normalise R2 (Bajd & Vodovnik 1984; to verify).
HEALTHY_R2 = 1.6

#: Overrides that relax the muscles: no voluntary intent (the reflex is untouched).
RELAXED_OVERRIDES: dict[str, float] = {
    "intent_kp_nm_per_rad": 0.0,
    "intent_kd_nm_s_per_rad": 0.0,
    "static_compensation_fraction": 0.0,
}

#: Overrides that take the exoskeleton off the leg: no link, no gear friction and a negligible
#: reflected rotor inertia (the plant requires it > 0; 1e-12 kg·m² changes nothing measurable).
DETACHED_DRIVE_OVERRIDES: dict[str, float] = {
    "exo_link_mass_kg": 0.0,
    "exo_link_com_m": 0.0,
    "exo_link_inertia_kg_m2": 0.0,
    "exo_reflected_inertia_kg_m2": 1e-12,
    "exo_coulomb_nm": 0.0,
    "exo_viscous_nm_s_per_rad": 0.0,
}


@dataclasses.dataclass(frozen=True)
class PendulumConfig:
    """One pendulum test (validated at construction).

    Attributes:
        preset: knee preset (``healthy``, ``mild``, ``moderate``, ``severe``).
        hip_flexion_deg: the posture's hip flexion, degrees (0 = supine, the clinical set-up of
            Kim et al. 1996; 90 = sitting upright, the exoskeleton's posture); the thigh stays
            horizontal, so gravity acts the same, but the hamstrings' share of the passive
            moment (Riener & Edrich 1999) grows with it. -15 <= value <= 100.
        drive_attached: the exoskeleton stays on the leg, unpowered and back-driven (``True``),
            or is taken off (``False``, the clinical test).
        duration_s: recorded time after the release, s (0 < value <= 120).
        release_angle_deg: knee flexion at release, degrees (0 = shank horizontal).
        swing_threshold_deg: a flexion peak counts as a swing when it exceeds the plateau angle
            by more than this, degrees (> 0).
        plateau_window_s: the plateau angle is the mean over this final window, s.

    """

    preset: str = "healthy"
    hip_flexion_deg: float = 0.0
    drive_attached: bool = False
    duration_s: float = 20.0
    release_angle_deg: float = 0.0
    swing_threshold_deg: float = 1.0
    plateau_window_s: float = 1.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UnknownPatientError("preset", self.preset, PRESETS)
        if not (math.isfinite(self.hip_flexion_deg) and -15 <= self.hip_flexion_deg <= 100):
            raise ConfigError(
                "hip_flexion_deg", self.hip_flexion_deg, "-15 <= value <= 100 degrees"
            )
        if not isinstance(self.drive_attached, bool):
            raise ConfigError("drive_attached", self.drive_attached, "True or False")
        if not (math.isfinite(self.duration_s) and 0 < self.duration_s <= 120):
            raise ConfigError("duration_s", self.duration_s, "0 < value <= 120 s")
        if not (math.isfinite(self.release_angle_deg) and -5 <= self.release_angle_deg < 90):
            raise ConfigError(
                "release_angle_deg", self.release_angle_deg, "-5 <= value < 90 degrees"
            )
        if not (math.isfinite(self.swing_threshold_deg) and self.swing_threshold_deg > 0):
            raise ConfigError("swing_threshold_deg", self.swing_threshold_deg, "> 0 degrees")
        if not (
            math.isfinite(self.plateau_window_s) and 0 < self.plateau_window_s < self.duration_s
        ):
            raise ConfigError("plateau_window_s", self.plateau_window_s, "0 < value < duration_s")

    def params(self) -> KneeParams:
        """The preset's parameters with relaxed muscles and the drive attached or detached."""
        overrides: dict[str, float] = {
            **RELAXED_OVERRIDES,
            "hip_flexion_rad": math.radians(self.hip_flexion_deg),
        }
        if not self.drive_attached:
            overrides.update(DETACHED_DRIVE_OVERRIDES)
        return knee_preset(self.preset, **overrides)


@dataclasses.dataclass(frozen=True)
class PendulumTrace:
    """A recorded pendulum test, sampled every plant step (1 ms) from the release.

    Attributes:
        time_s: ``(K,)`` times, s (the first sample is the release).
        angle_rad: ``(K,)`` knee flexion, rad.
        velocity_rad_s: ``(K,)`` angular velocity, rad/s.
        reflex_excitation: ``(K,)`` quadriceps stretch-reflex excitation (0–1).
        muscle_torque_nm: ``(K,)`` net muscle torque (the reflex: no passive muscle element), N·m.

    """

    time_s: NDArray[np.float64]
    angle_rad: NDArray[np.float64]
    velocity_rad_s: NDArray[np.float64]
    reflex_excitation: NDArray[np.float64]
    muscle_torque_nm: NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class PendulumMetrics:
    """The pendulum-test measures of one trace (angles in degrees from the release angle).

    Attributes:
        first_swing_deg: ``A1``.
        plateau_deg: ``A0``.
        relaxation_index: ``R2 = A1/A0``.
        relaxation_index_normalised: ``R2n = R2/1.6``.
        swings: flexion peaks beyond the plateau by more than the threshold.
        swing_threshold_deg: that threshold.
        peak_velocity_deg_s: largest flexing velocity in the first downswing.
        period_s: mean time between counted flexion peaks (NaN with fewer than 2).
        settled: the angle moved less than the threshold over the plateau window.

    """

    first_swing_deg: float
    plateau_deg: float
    relaxation_index: float
    relaxation_index_normalised: float
    swings: int
    swing_threshold_deg: float
    peak_velocity_deg_s: float
    period_s: float
    settled: bool


def simulate_pendulum(configs: Sequence[PendulumConfig]) -> list[PendulumTrace]:
    """Run the pendulum tests ``configs`` as one batch on the compiled plant (:func:`advance`).

    Every knee starts at rest at its release angle (reflex delay line at zero velocity) and is
    advanced one 1-ms plant step per call with the drive commanded to 0 N·m, until the longest
    ``duration_s``; each trace is cut to its own duration.
    """
    if not configs:
        raise ConfigError("configs", configs, "at least one PendulumConfig")
    n = len(configs)
    x = np.stack([initial_state(math.radians(c.release_angle_deg)) for c in configs])
    p = np.stack([c.params().vector() for c in configs])
    cmd = np.zeros(n)
    ref = np.stack([[math.radians(c.release_angle_deg), 0.0] for c in configs])
    out = np.zeros((n, N_OUT))
    steps = max(round(c.duration_s / PLANT_DT_S) for c in configs)
    rec = np.empty((4, n, steps + 1))
    rec[:, :, 0] = 0.0
    rec[0, :, 0] = x[:, X_THETA]
    for j in range(1, steps + 1):
        advance(x, p, cmd, ref, 1, out, parallel=False)
        rec[0, :, j] = x[:, X_THETA]
        rec[1, :, j] = x[:, X_OMEGA]
        rec[2, :, j] = out[:, O_REFLEX_Q]
        rec[3, :, j] = out[:, O_PATIENT_NM]
    traces = []
    for i, c in enumerate(configs):
        k = round(c.duration_s / PLANT_DT_S) + 1
        traces.append(
            PendulumTrace(
                np.arange(k, dtype=np.float64) * PLANT_DT_S,
                rec[0, i, :k].copy(),
                rec[1, i, :k].copy(),
                rec[2, i, :k].copy(),
                rec[3, i, :k].copy(),
            )
        )
    return traces


def _local_maxima(y: NDArray[np.float64]) -> NDArray[np.intp]:
    """Indices ``i`` with ``y[i-1] < y[i] >= y[i+1]`` (interior samples only)."""
    return np.flatnonzero((y[1:-1] > y[:-2]) & (y[1:-1] >= y[2:])) + 1


def pendulum_metrics(
    time_s: NDArray[np.float64],
    angle_rad: NDArray[np.float64],
    velocity_rad_s: NDArray[np.float64] | None = None,
    *,
    swing_threshold_deg: float = 1.0,
    plateau_window_s: float = 1.0,
) -> PendulumMetrics:
    """The pendulum measures of one trace (see the module docstring for the definitions).

    Args:
        time_s: ``(K,)`` increasing sample times, s; the first sample is the release.
        angle_rad: ``(K,)`` knee flexion, rad (flexion positive, released from extension).
        velocity_rad_s: ``(K,)`` angular velocity, rad/s (default: ``np.gradient`` of the angle).
        swing_threshold_deg: a flexion peak counts when it exceeds the plateau by more, degrees.
        plateau_window_s: final window whose mean angle is the plateau, s.

    Raises:
        ConfigError: mismatched or too short arrays, a threshold or window out of range, or a
            trace with no flexion peak (nothing to measure).

    """
    t = np.asarray(time_s, dtype=np.float64)
    th_deg = np.degrees(np.asarray(angle_rad, dtype=np.float64))
    if t.ndim != 1 or th_deg.shape != t.shape or t.size < 3:
        raise ConfigError("angle_rad", th_deg.shape, f"1-D, same shape as time_s {t.shape}, >= 3")
    if velocity_rad_s is None:
        om_deg = np.gradient(th_deg, t)
    else:
        om_deg = np.degrees(np.asarray(velocity_rad_s, dtype=np.float64))
        if om_deg.shape != t.shape:
            raise ConfigError("velocity_rad_s", om_deg.shape, f"the shape of time_s {t.shape}")
    if not (math.isfinite(swing_threshold_deg) and swing_threshold_deg > 0):
        raise ConfigError("swing_threshold_deg", swing_threshold_deg, "> 0 degrees")
    span = float(t[-1] - t[0])
    if not (math.isfinite(plateau_window_s) and 0 < plateau_window_s < span):
        raise ConfigError("plateau_window_s", plateau_window_s, f"0 < value < {span:g} s")
    start = float(th_deg[0])
    window = th_deg[t >= t[-1] - plateau_window_s]
    rest = float(window.mean())
    peaks = _local_maxima(th_deg)
    if peaks.size == 0:
        raise ConfigError("angle_rad", "no flexion peak", "a trace that swings")
    first = int(peaks[0])
    a1 = float(th_deg[first] - start)
    a0 = rest - start
    counted = peaks[th_deg[peaks] - rest > swing_threshold_deg]
    period = float(np.mean(np.diff(t[counted]))) if counted.size >= 2 else math.nan
    r2 = a1 / a0 if a0 != 0 else math.nan
    return PendulumMetrics(
        first_swing_deg=a1,
        plateau_deg=a0,
        relaxation_index=r2,
        relaxation_index_normalised=r2 / HEALTHY_R2,
        swings=int(counted.size),
        swing_threshold_deg=float(swing_threshold_deg),
        peak_velocity_deg_s=float(om_deg[: first + 1].max()),
        period_s=period,
        settled=bool(window.max() - window.min() < swing_threshold_deg),
    )


def measure_pendulum(
    configs: Sequence[PendulumConfig], traces: Sequence[PendulumTrace]
) -> list[PendulumMetrics]:
    """Measure each trace of :func:`simulate_pendulum` with its config's thresholds."""
    return [
        pendulum_metrics(
            tr.time_s,
            tr.angle_rad,
            tr.velocity_rad_s,
            swing_threshold_deg=c.swing_threshold_deg,
            plateau_window_s=c.plateau_window_s,
        )
        for c, tr in zip(configs, traces, strict=True)
    ]


def run_pendulum(configs: Sequence[PendulumConfig]) -> list[PendulumMetrics]:
    """Simulate ``configs`` (one batch) and measure each trace with its own thresholds."""
    return measure_pendulum(configs, simulate_pendulum(configs))
