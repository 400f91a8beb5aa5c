"""Sensors of the knee exoskeleton: joint encoder, joint torque sensor, EMG envelopes.

Noise comes from a *counter-based* generator: each sensor channel of each knee has a 64-bit key
drawn once from a seeded :class:`numpy.random.Generator` (at reset) and a counter; the n-th
normal deviate is a pure function of ``(key, n)`` (SplitMix64 finaliser, Steele, Lea & Flood
2014, then Box–Muller). That keeps the batched, compiled step free of per-row Python generator
calls while every sample stays reproducible from the seed, and a knee's noise never depends on
which other knees share its batch.

Models (units in the field names):

* **Encoder** — the angle is quantised to ``counts_per_rev`` (``round(θ·cpr/2π)·2π/cpr``) after
  adding Gaussian electrical noise of ``noise_counts`` counts; velocity is the backward
  difference of two quantised readings over the control period (what a drive reports).
* **Torque sensor** — ``τ + bias + N(0, noise_nm²)``, the bias drawn once per episode from
  ``N(0, bias_sd_nm²)``, clipped to ``±range_nm``.
* **EMG envelope** — the normalised linear envelope of each muscle modelled as its activation
  delayed by ``delay_s`` (rounded to control periods; electromechanical delay and envelope
  filtering, tens of ms), with multiplicative and additive Gaussian noise, floored at 0:
  ``e = max(0, a(t − D)·(1 + σ_m·n₁) + σ_a·n₂)``.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO53 = float(2**53)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Joint encoder.

    Attributes:
        counts_per_rev: resolution at the joint, counts per revolution (≥ 4).
        noise_counts: standard deviation of the electrical noise, counts (≥ 0).

    """

    counts_per_rev: int = 16384
    noise_counts: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.counts_per_rev, int) and self.counts_per_rev >= 4):
            raise ConfigError("counts_per_rev", self.counts_per_rev, "an integer >= 4")
        if not self.noise_counts >= 0:
            raise ConfigError("noise_counts", self.noise_counts, ">= 0")


@dataclasses.dataclass(frozen=True)
class TorqueSensorSpec:
    """Joint torque sensor.

    Attributes:
        noise_nm: white-noise standard deviation, N·m.
        bias_sd_nm: standard deviation of the per-episode bias, N·m.
        range_nm: measurement range (readings clipped to ±range), N·m.

    """

    noise_nm: float = 0.2
    bias_sd_nm: float = 0.3
    range_nm: float = 150.0

    def __post_init__(self) -> None:
        for name in ("noise_nm", "bias_sd_nm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, getattr(self, name), ">= 0")
        if not self.range_nm > 0:
            raise ConfigError("range_nm", self.range_nm, "> 0")


@dataclasses.dataclass(frozen=True)
class EMGSpec:
    """Surface EMG linear envelopes of the quadriceps and hamstrings (normalised to max).

    Attributes:
        delay_s: delay of the envelope behind activation, s (0–0.2).
        multiplicative_noise: relative noise σ_m.
        additive_noise: additive noise σ_a (fraction of the maximal envelope).

    """

    delay_s: float = 0.03
    multiplicative_noise: float = 0.15
    additive_noise: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.delay_s <= 0.2:
            raise ConfigError("delay_s", self.delay_s, "0 <= value <= 0.2 s")
        for name in ("multiplicative_noise", "additive_noise"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, getattr(self, name), ">= 0")

    def delay_steps(self, control_hz: float) -> int:
        """The delay in whole control periods at ``control_hz``."""
        return round(self.delay_s * control_hz)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _mix(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _uniform(key: np.uint64, n: np.uint64) -> float:
    """Uniform in (0, 1) from ``(key, n)``."""
    z = _mix(key + n * _GOLDEN)
    return ((z >> _S11) + 0.5) / _TWO53


@numba.njit(cache=True, inline="always", error_model="numpy")
def normal(key: np.uint64, n: np.uint64) -> float:
    """The ``n``-th standard normal deviate of stream ``key`` (Box–Muller on two uniforms)."""
    two_n = n + n
    u1 = _uniform(key, two_n)
    u2 = _uniform(key, two_n + np.uint64(1))
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@numba.njit(cache=True, inline="always", error_model="numpy")
def encoder_counts(theta_rad: float, counts_per_rev: float, noise: float) -> float:
    """Encoder reading in counts for angle ``theta_rad`` plus ``noise`` counts (rounded)."""
    return math.floor(theta_rad * counts_per_rev / (2.0 * math.pi) + noise + 0.5)


@numba.njit(cache=True, error_model="numpy")
def normals(key: np.uint64, start: int, count: int) -> NDArray[np.float64]:
    """``count`` deviates of stream ``key`` from index ``start`` (for tests and Python use)."""
    out = np.empty(count)
    for j in range(count):
        out[j] = normal(key, np.uint64(start + j))
    return out


def draw_key(rng: np.random.Generator) -> np.uint64:
    """A stream key drawn from a seeded generator."""
    return np.uint64(rng.integers(0, 2**63, dtype=np.int64))
