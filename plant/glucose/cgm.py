"""Continuous glucose monitor (CGM) device model: sampling, Breton-Kovatchev error, clipping.

Error model
-----------
The additive sensor error follows Breton & Kovatchev (2008), "Analysis, modeling, and
simulation of the accuracy of continuous glucose sensors", *J Diabetes Sci Technol*
2(5):853-862 (the model of the UVA/Padova simulator and of simglucose). The paper drives a
Johnson SU ("unbounded system") distribution with a first-order autoregressive process::

    e_1 = v_1,   e_n = PACF · (e_{n-1} + v_n),   v_n ~ N(0, 1) iid,   PACF = 0.7
    ε_n = ξ + λ · sinh((e_n − γ) / δ)                                   (mg/dL)

with ξ = -5.47, λ = 15.9574, δ = 1.6898, γ = -0.5444 fitted to the recalibrated, synchronised
errors of the FreeStyle Navigator against YSI references (sample mean 0.76 mg/dL, SD 11 mg/dL).

What this module follows, and where it departs from the paper:

* The recursion and the transform are exactly the paper's. The only change at the start: the
  paper (and simglucose) start from ``e_1 = v_1`` (variance 1), which is slightly off the
  process's stationary law; here ``e_0`` is drawn from the stationary distribution
  ``N(0, PACF² / (1 − PACF²))`` (variance 0.9608 for PACF = 0.7), so the error statistics do not
  depend on the time since insertion. Note that this stationary variance is *not* 1: the
  recursion as published does not make ``e_n`` exactly standard normal, and we keep it as
  published rather than rescaling it.
* The paper fitted PACF = 0.7 at a lag of **15 minutes** (the YSI reference was sampled every
  15 min); simglucose therefore generates the AR(1) every 15 min and interpolates it (cubic)
  to the sensor's sample time. This module runs the process directly at the sensor's sample
  period ``T`` (1, 3 or 5 min) as the equivalent AR(1) that keeps both the paper's stationary
  law of ``e`` (variance ``σ² = PACF²/(1 − PACF²)``) and its autocorrelation ``PACF`` at a lag
  of ``pacf_lag_min`` (15 min by default)::

      φ = PACF^(T / pacf_lag_min),   e_n = φ·e_{n−1} + √(1 − φ²)·σ·v_n

  so the correlation after ``k`` samples is ``φ^k`` (0.7 after 15 min, whatever ``T``). When
  ``pacf_lag_min == T`` this is exactly the published recursion ``e_n = PACF·(e_{n−1} + v_n)``.
* An optional linear calibration drift, ``drift_mg_dl_per_day``, is *added* to ε: the error at
  sample ``n`` (taken at ``t_n = n · sample_period_min`` minutes after insertion) is
  ``ε_n + drift_mg_dl_per_day · t_n / 1440``. It is deterministic and independent of ``noise``.

A reading is ``clip(true_gsub_mg_dl + error, min_mg_dl, max_mg_dl)`` (see :func:`measure`).

All randomness comes from an explicit :class:`numpy.random.Generator`. The draws are laid out so
that the ``n`` standard-normal draws of a sequence of ``n`` samples are consumed in order, one
per sample; generating a sequence in chunks (as :class:`CGMSensor` does) therefore gives exactly
the same errors as one call to :func:`cgm_errors` with the same generator.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.presets import from_preset
from twinloop.plant.units import MIN_PER_DAY

#: Sample periods (minutes) a :class:`CGMSpec` may have.
SAMPLE_PERIODS_MIN: tuple[int, ...] = (1, 3, 5)


def sampling_period_min(intervals_min: ArrayLike, default: int = 5) -> int:
    """A CGM's sampling period told from the intervals between its readings, minutes.

    The largest of :data:`SAMPLE_PERIODS_MIN` that divides the most common positive interval
    (whole minutes; the shortest of equally common ones); ``default`` without any interval.
    """
    steps = np.asarray(intervals_min, dtype=np.int64)
    steps = steps[steps > 0]
    if steps.size == 0:
        return default
    values, counts = np.unique(steps, return_counts=True)
    common = int(values[np.argmax(counts)])
    return max(p for p in SAMPLE_PERIODS_MIN if common % p == 0)


def _finite(field: str, value: object) -> float:
    """Return ``value`` as a float, or raise :class:`ConfigError` if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(field, value, "a finite real number")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(field, value, "a finite real number")
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class CGMSpec:
    """Configuration of a CGM device (validated once, at construction).

    The Johnson SU parameters are those of Breton & Kovatchev (2008) as distributed in
    ``sensor_params.csv`` (identical for the three presets); see the module docstring for the
    error process.

    Attributes:
        sample_period_min: minutes between two readings; 1, 3 or 5.
        min_mg_dl: lowest reading the device reports (readings are clipped to it), mg/dL.
        max_mg_dl: highest reading the device reports, mg/dL; must exceed ``min_mg_dl``.
        pacf: autocorrelation of the AR(1) driving process at a lag of ``pacf_lag_min`` (-);
            ``|pacf| < 1``; 0.7 at 15 min in Breton & Kovatchev (2008).
        pacf_lag_min: the lag at which ``pacf`` holds, minutes; > 0. Set it to the sample
            period to run the published recursion sample by sample.
        gamma: Johnson SU shape parameter γ (-).
        lam: Johnson SU scale parameter λ, mg/dL; > 0.
        delta: Johnson SU shape parameter δ (-); > 0.
        xi: Johnson SU location parameter ξ, mg/dL.
        noise: whether the random Johnson SU error is generated; ``False`` gives an ideal
            sensor (the drift, if any, still applies).
        drift_mg_dl_per_day: linear calibration drift added to the error, mg/dL per day since
            insertion (``t = 0``); may be negative.

    Raises:
        ConfigError: a field is outside what is allowed (the error names the field).

    """

    sample_period_min: int = 5
    min_mg_dl: float = 40.0
    max_mg_dl: float = 400.0
    pacf: float = 0.7
    pacf_lag_min: float = 15.0
    gamma: float = -0.5444
    lam: float = 15.9574
    delta: float = 1.6898
    xi: float = -5.47
    noise: bool = True
    drift_mg_dl_per_day: float = 0.0

    def __post_init__(self) -> None:
        period = self.sample_period_min
        if (
            isinstance(period, bool)
            or not isinstance(period, int | float | np.integer | np.floating)
            or period not in SAMPLE_PERIODS_MIN
        ):
            raise ConfigError("sample_period_min", period, "one of 1, 3 or 5 (minutes)")
        object.__setattr__(self, "sample_period_min", int(period))
        for name in ("min_mg_dl", "max_mg_dl", "pacf", "gamma", "lam", "delta", "xi"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        object.__setattr__(
            self, "drift_mg_dl_per_day", _finite("drift_mg_dl_per_day", self.drift_mg_dl_per_day)
        )
        if self.min_mg_dl < 0.0:
            raise ConfigError("min_mg_dl", self.min_mg_dl, "a finite value >= 0 mg/dL")
        if self.max_mg_dl <= self.min_mg_dl:
            raise ConfigError(
                "max_mg_dl", self.max_mg_dl, f"a finite value > min_mg_dl={self.min_mg_dl} mg/dL"
            )
        if not -1.0 < self.pacf < 1.0:
            raise ConfigError("pacf", self.pacf, "-1 < pacf < 1 (a stationary AR(1))")
        lag = _finite("pacf_lag_min", self.pacf_lag_min)
        if lag <= 0.0:
            raise ConfigError("pacf_lag_min", self.pacf_lag_min, "a finite value > 0 minutes")
        object.__setattr__(self, "pacf_lag_min", lag)
        if self.lam <= 0.0:
            raise ConfigError("lam", self.lam, "a finite value > 0 mg/dL")
        if self.delta <= 0.0:
            raise ConfigError("delta", self.delta, "a finite value > 0")
        if not isinstance(self.noise, bool | np.bool_):
            raise ConfigError("noise", self.noise, "True or False")
        object.__setattr__(self, "noise", bool(self.noise))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CGMSpec:
        """Build a device of ``sensor_params.csv``: Dexcom (3 min), GuardianRT (5), Navigator (1).

        The preset supplies the sample period and the error parameters. The clipping range is
        *not* taken from the csv (which lists 39/32-600 mg/dL): it stays at the defaults of
        40-400 mg/dL, the reporting range of current devices, unless the caller passes
        ``min_mg_dl``/``max_mg_dl``. Any other field can be overridden too.

        Args:
            name: preset name (case-sensitive).
            **overrides: fields of :class:`CGMSpec` to set instead of the preset's values.

        Raises:
            ConfigError: unknown preset name, unknown field, or an invalid value.

        """
        return from_preset(cls, _sensor_presets(), name, overrides)

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """Names accepted by :meth:`preset`, in csv order."""
        return tuple(_sensor_presets())

    @property
    def stationary_sd(self) -> float:
        """Standard deviation of the stationary AR(1) driving process ``e``: |pacf|/√(1−pacf²)."""
        return abs(self.pacf) / math.sqrt(1.0 - self.pacf**2)

    @property
    def phi_per_sample(self) -> float:
        """AR(1) coefficient per sample: ``pacf ** (sample_period_min / pacf_lag_min)``."""
        return math.copysign(
            abs(self.pacf) ** (self.sample_period_min / self.pacf_lag_min), self.pacf
        )


@cache
def _sensor_presets() -> dict[str, dict[str, Any]]:
    text = (
        resources.files("twinloop.plant.glucose")
        .joinpath("data", "uva_padova_2008", "sensor_params.csv")
        .read_text()
    )
    out: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["Name"]] = {
            "sample_period_min": round(float(row["sample_time"])),
            "pacf": float(row["PACF"]),
            "gamma": float(row["gamma"]),
            "lam": float(row["lambda"]),
            "delta": float(row["delta"]),
            "xi": float(row["xi"]),
        }
    return out


def _check_n_samples(n_samples: int) -> int:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 0:
        raise InvalidInputError(f"n_samples={n_samples!r}: must be an int >= 0")
    return int(n_samples)


def _ar1(
    spec: CGMSpec, z: NDArray[np.float64], e_prev: NDArray[np.float64] | None
) -> NDArray[np.float64]:
    """Run the AR(1) ``e_n = φ·e_{n-1} + √(1−φ²)·σ·z_n`` along the last axis of ``z``.

    With ``e_prev=None`` the first sample is the stationary start ``stationary_sd · z_0``;
    otherwise ``e_prev`` (shape ``z.shape[:-1]``) is the sample before ``z_0``.
    """
    out = np.empty_like(z)
    if z.shape[-1] == 0:
        return out
    if e_prev is None:
        out[..., 0] = spec.stationary_sd * z[..., 0]
        start, prev = 1, out[..., 0]
    else:
        start, prev = 0, e_prev
    if z.shape[-1] > start:
        # imported here: scipy.signal takes ~0.8 s to import, in every process that builds a
        # sensor (each Ray agent's included), for this one call
        from scipy.signal import lfilter

        phi = spec.phi_per_sample
        gain = math.sqrt(1.0 - phi**2) * spec.stationary_sd
        zi = (phi * prev)[..., np.newaxis]
        out[..., start:], _ = lfilter([gain], [1.0, -phi], z[..., start:], zi=zi)
    return out


def _johnson(spec: CGMSpec, e: NDArray[np.float64]) -> NDArray[np.float64]:
    """Johnson SU transform ``ξ + λ·sinh((e − γ)/δ)`` in mg/dL."""
    out: NDArray[np.float64] = spec.xi + spec.lam * np.sinh((e - spec.gamma) / spec.delta)
    return out


def _drift(spec: CGMSpec, first_sample: int, n_samples: int) -> NDArray[np.float64]:
    t_min = (first_sample + np.arange(n_samples, dtype=np.float64)) * spec.sample_period_min
    out: NDArray[np.float64] = spec.drift_mg_dl_per_day * t_min / MIN_PER_DAY
    return out


def cgm_errors(spec: CGMSpec, rng: np.random.Generator, n_samples: int) -> NDArray[np.float64]:
    """Additive sensor errors of one sensor for its first ``n_samples`` samples.

    Sample ``n`` is taken ``n · spec.sample_period_min`` minutes after insertion. With
    ``spec.noise`` the generator is advanced by exactly ``n_samples`` standard-normal draws;
    without it, nothing is drawn.

    Args:
        spec: the device.
        rng: source of all randomness.
        n_samples: number of samples (>= 0).

    Returns:
        Errors in mg/dL, shape ``(n_samples,)``: the Johnson SU error plus the drift; all zero
        when ``spec.noise`` is false and there is no drift.

    Raises:
        InvalidInputError: ``n_samples`` is not an int >= 0.

    """
    n = _check_n_samples(n_samples)
    err = _drift(spec, 0, n)
    if spec.noise:
        err = err + _johnson(spec, _ar1(spec, rng.standard_normal(n), None))
    return err


def cgm_errors_batch(
    spec: CGMSpec, rngs: Sequence[np.random.Generator], n_samples: int
) -> NDArray[np.float64]:
    """Errors of ``N = len(rngs)`` independent sensors, one generator per patient.

    Row ``i`` equals ``cgm_errors(spec, rngs[i], n_samples)`` (the draws are made per
    generator; the recursion and the transform are vectorised over patients).

    Args:
        spec: the device (shared by every patient).
        rngs: one generator per patient.
        n_samples: number of samples per patient (>= 0).

    Returns:
        Errors in mg/dL, shape ``(N, n_samples)``.

    Raises:
        InvalidInputError: ``n_samples`` is not an int >= 0.

    """
    n = _check_n_samples(n_samples)
    err = np.broadcast_to(_drift(spec, 0, n), (len(rngs), n)).copy()
    if spec.noise and len(rngs) > 0:
        z = np.stack([rng.standard_normal(n) for rng in rngs])
        err += _johnson(spec, _ar1(spec, z, None))
    return err


def measure(
    true_gsub_mg_dl: ArrayLike, errors_mg_dl: ArrayLike, spec: CGMSpec
) -> NDArray[np.float64]:
    """Return readings ``clip(true_gsub_mg_dl + errors_mg_dl, spec.min_mg_dl, spec.max_mg_dl)``.

    Args:
        true_gsub_mg_dl: true subcutaneous glucose, mg/dL, any shape.
        errors_mg_dl: additive errors, mg/dL, broadcastable against ``true_gsub_mg_dl``.
        spec: the device (its clipping range).

    Returns:
        Readings in mg/dL, the broadcast shape of the inputs.

    Raises:
        InvalidInputError: an input contains NaN.

    """
    true = np.asarray(true_gsub_mg_dl, dtype=np.float64)
    err = np.asarray(errors_mg_dl, dtype=np.float64)
    if np.isnan(true).any():
        raise InvalidInputError("true_gsub_mg_dl: contains NaN; a finite glucose is required")
    if np.isnan(err).any():
        raise InvalidInputError("errors_mg_dl: contains NaN; finite errors are required")
    out: NDArray[np.float64] = np.clip(true + err, spec.min_mg_dl, spec.max_mg_dl)
    return out


class CGMSensor:
    """One stateful sensor for a loop that asks for a reading at each of its ticks.

    Samples are due at ``t = k · spec.sample_period_min`` minutes (``k = 0, 1, …``; the first at
    ``t = 0``). :meth:`read` returns a reading when at least one sample has fallen due since the
    previous reading, and ``None`` otherwise. The error used is that of the *latest* due sample
    ``k``, so the error at a given time does not depend on how often the loop calls; the errors
    of skipped samples are generated and discarded. Errors are pre-generated in chunks of
    ``chunk_samples``, and the sequence equals ``cgm_errors(spec, rng, n)`` for the same
    generator state.

    Args:
        spec: the device.
        rng: source of the sensor's randomness (owned by the sensor from now on).
        chunk_samples: samples generated at a time (> 0).

    Raises:
        ConfigError: ``chunk_samples`` is not an int > 0.

    """

    def __init__(
        self, spec: CGMSpec, rng: np.random.Generator, *, chunk_samples: int = 288
    ) -> None:
        if (
            isinstance(chunk_samples, bool)
            or not isinstance(chunk_samples, int | np.integer)
            or chunk_samples < 1
        ):
            raise ConfigError("chunk_samples", chunk_samples, "an int >= 1")
        self._spec = spec
        self._rng = rng
        self._chunk = int(chunk_samples)
        self._errors: NDArray[np.float64] = np.empty(0)
        self._first = 0  # sample index of self._errors[0]
        self._e_last: NDArray[np.float64] | None = None  # AR state after the last chunk
        self._next_k = 0  # first sample index not yet reported
        self._last_t_min = -math.inf

    @property
    def spec(self) -> CGMSpec:
        """The device."""
        return self._spec

    @property
    def next_sample_min(self) -> float:
        """Time (minutes) of the next sample that has not been reported yet."""
        return float(self._next_k * self._spec.sample_period_min)

    def _extend(self) -> None:
        spec = self._spec
        first = self._first + self._errors.shape[0]
        err = _drift(spec, first, self._chunk)
        if spec.noise:
            e = _ar1(spec, self._rng.standard_normal(self._chunk), self._e_last)
            self._e_last = e[-1:].reshape(())
            err = err + _johnson(spec, e)
        self._first, self._errors = first, err

    def _error(self, k: int) -> float:
        while k >= self._first + self._errors.shape[0]:
            self._extend()
        return float(self._errors[k - self._first])

    def read(self, t_min: float, gsub_mg_dl: float) -> float | None:
        """Return the reading at time ``t_min`` if a sample is due, else ``None``.

        Args:
            t_min: current time, minutes since insertion; >= 0 and non-decreasing across calls.
            gsub_mg_dl: true subcutaneous glucose now, mg/dL.

        Returns:
            The reading in mg/dL (clipped to the device range), or ``None`` when no sample has
            fallen due since the previous reading.

        Raises:
            InvalidInputError: ``t_min`` negative, not finite or earlier than a previous call;
                ``gsub_mg_dl`` NaN.

        """
        if not math.isfinite(t_min) or t_min < 0.0:
            raise InvalidInputError(f"t_min={t_min!r}: must be a finite time >= 0 minutes")
        if t_min < self._last_t_min:
            raise InvalidInputError(
                f"t_min={t_min!r}: earlier than the previous call at {self._last_t_min} min"
            )
        if math.isnan(gsub_mg_dl):
            raise InvalidInputError("gsub_mg_dl: NaN; a finite glucose is required")
        self._last_t_min = t_min
        # Latest sample index due at t_min, tolerant to float time accumulation (1e-9 sample).
        k = math.floor(t_min / self._spec.sample_period_min + 1e-9)
        if k < self._next_k:
            return None
        self._next_k = k + 1
        value = gsub_mg_dl + self._error(k)
        return float(min(max(value, self._spec.min_mg_dl), self._spec.max_mg_dl))
