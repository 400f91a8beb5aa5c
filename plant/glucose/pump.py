"""Insulin pump device model: command limits, quantisation and per-minute (pulsed) delivery.

Units: basal rates in U/h, boluses in U, delivered insulin in U/min (what
:func:`twinloop.plant.glucose.uva_padova.simulate` takes; it converts to pmol/kg/min itself).

How a command becomes insulin:

1. The basal rate is clipped to ``[0, max_basal_u_per_h]`` and rounded **down** to a multiple
   of ``basal_increment_u_per_h``; the bolus likewise with ``max_bolus_u`` and
   ``bolus_increment_u``. Rounding down means a pump never delivers more than it was asked
   for: the result is within one increment below the (clipped) request and never above it.
2. Over a control period of ``minutes`` minutes the basal is delivered at ``basal/60`` U/min
   every minute and the whole bolus within the first minute (a rate of ``bolus`` U/min for one
   minute), as the UVA/Padova simulator and simglucose do.
3. With ``pulse_u > 0`` the pump delivers whole pulses only: each minute the commanded insulin
   is added to an accumulator and every whole pulse in it is delivered, the fraction carried
   over to the next minute (and, through ``pulse_residual_u``, to the next control period). No
   insulin is lost or created: delivered + residual = commanded + initial residual.

Presets come from simglucose's ``pump_params.csv``. Its ``max_basal``/``inc_basal`` columns
are the devices' basal specifications in **U/h** (Cozmo: up to 35 U/h in 0.05 U/h steps;
OmniPod: up to 30 U/h), and ``max_bolus``/``inc_bolus`` are in U. simglucose itself applies
them to its U/min action after converting to pmol, so there the limits read as U/min and the
increments as pmol/min (which makes its quantisation a no-op); this module uses them with the
units of the devices' specifications.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.presets import from_preset
from twinloop.plant.units import MIN_PER_H

#: Relative tolerance (in increments/pulses) for counting whole steps despite float round-off.
STEP_TOL = 1e-9


@dataclasses.dataclass(frozen=True, slots=True)
class PumpSpec:
    """Configuration of an insulin pump (validated once, at construction).

    Attributes:
        max_basal_u_per_h: highest basal rate, U/h; > 0.
        basal_increment_u_per_h: basal resolution, U/h; >= 0 (0 = no quantisation).
        max_bolus_u: largest bolus, U; > 0.
        bolus_increment_u: bolus resolution, U; >= 0 (0 = no quantisation).
        pulse_u: size of one delivery pulse, U; 0 = continuous delivery, > 0 = the pump
            delivers whole pulses and carries the fraction over.

    Raises:
        ConfigError: a field is outside what is allowed (the error names the field).

    """

    max_basal_u_per_h: float = 35.0
    basal_increment_u_per_h: float = 0.05
    max_bolus_u: float = 75.0
    bolus_increment_u: float = 0.05
    pulse_u: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float | np.integer | np.floating)
                or not math.isfinite(float(value))
            ):
                raise ConfigError(field.name, value, "a finite real number")
            object.__setattr__(self, field.name, float(value))
        for name in ("max_basal_u_per_h", "max_bolus_u"):
            if getattr(self, name) <= 0.0:
                raise ConfigError(name, getattr(self, name), "a finite value > 0")
        for name in ("basal_increment_u_per_h", "bolus_increment_u", "pulse_u"):
            if getattr(self, name) < 0.0:
                raise ConfigError(name, getattr(self, name), "a finite value >= 0 (0 = off)")
        if self.basal_increment_u_per_h > self.max_basal_u_per_h:
            raise ConfigError(
                "basal_increment_u_per_h",
                self.basal_increment_u_per_h,
                f"<= max_basal_u_per_h={self.max_basal_u_per_h}",
            )
        if self.bolus_increment_u > self.max_bolus_u:
            raise ConfigError(
                "bolus_increment_u", self.bolus_increment_u, f"<= max_bolus_u={self.max_bolus_u}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PumpSpec:
        """Build a pump of ``pump_params.csv``: ``Cozmo`` or ``Insulet``.

        The csv's ``max_basal``/``inc_basal`` are read as U/h and ``max_bolus``/``inc_bolus`` as
        U (see the module docstring). ``pulse_u`` is not in the csv and defaults to 0
        (continuous delivery); pass it, or any other field, as an override.

        Args:
            name: preset name (case-sensitive).
            **overrides: fields of :class:`PumpSpec` to set instead of the preset's values.

        Raises:
            ConfigError: unknown preset name, unknown field, or an invalid value.

        """
        return from_preset(cls, _pump_presets(), name, overrides)

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """Names accepted by :meth:`preset`, in csv order."""
        return tuple(_pump_presets())


@cache
def _pump_presets() -> dict[str, dict[str, float]]:
    text = (
        resources.files("twinloop.plant.glucose")
        .joinpath("data", "uva_padova_2008", "pump_params.csv")
        .read_text()
    )
    return {
        row["Name"]: {
            "max_basal_u_per_h": float(row["max_basal"]),
            "basal_increment_u_per_h": float(row["inc_basal"]),
            "max_bolus_u": float(row["max_bolus"]),
            "bolus_increment_u": float(row["inc_bolus"]),
        }
        for row in csv.DictReader(text.splitlines())
    }


def _quantize(
    field: str, value: ArrayLike, maximum: float, increment: float
) -> NDArray[np.float64]:
    if isinstance(value, float):  # the per-command path of a pump agent: plain arithmetic
        if math.isnan(value):
            raise InvalidInputError(f"{field}: contains NaN; finite commands are required")
        v = min(max(value, 0.0), maximum)
        if increment > 0.0:
            v = min(math.floor(v / increment + STEP_TOL) * increment, v)
        return np.float64(v)
    x = np.asarray(value, dtype=np.float64)
    if np.isnan(x).any():
        raise InvalidInputError(f"{field}: contains NaN; finite commands are required")
    x = np.clip(x, 0.0, maximum)
    if increment == 0.0:
        return x
    steps = np.floor(x / increment + STEP_TOL)
    # min() guards the float round-off of steps·increment (e.g. 3·0.05 > 0.15 by one ulp).
    out: NDArray[np.float64] = np.minimum(steps * increment, x)
    return out


def quantize_basal(spec: PumpSpec, basal_u_per_h: ArrayLike) -> NDArray[np.float64]:
    """Return the basal rates the pump can deliver for the requested ones.

    Each rate is clipped to ``[0, spec.max_basal_u_per_h]`` (``+inf`` becomes the maximum) and
    rounded down to a multiple of ``spec.basal_increment_u_per_h``, so it never exceeds the
    request and is less than one increment below the clipped request.

    Args:
        spec: the pump.
        basal_u_per_h: requested basal rates, U/h, any shape.

    Returns:
        Deliverable basal rates, U/h, same shape.

    Raises:
        InvalidInputError: ``basal_u_per_h`` contains NaN.

    """
    return _quantize(
        "basal_u_per_h", basal_u_per_h, spec.max_basal_u_per_h, spec.basal_increment_u_per_h
    )


def quantize_bolus(spec: PumpSpec, bolus_u: ArrayLike) -> NDArray[np.float64]:
    """Return the boluses the pump can deliver for the requested ones.

    Clipped to ``[0, spec.max_bolus_u]`` and rounded down to a multiple of
    ``spec.bolus_increment_u`` (never more than requested, less than one increment below).

    Args:
        spec: the pump.
        bolus_u: requested boluses, U, any shape.

    Returns:
        Deliverable boluses, U, same shape.

    Raises:
        InvalidInputError: ``bolus_u`` contains NaN.

    """
    return _quantize("bolus_u", bolus_u, spec.max_bolus_u, spec.bolus_increment_u)


def delivery_u_per_min(
    spec: PumpSpec,
    basal_u_per_h: ArrayLike,
    bolus_u: ArrayLike,
    minutes: int,
    pulse_residual_u: ArrayLike | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Compute the insulin delivered each minute of one control period, for ``N`` pumps.

    The commands are first quantised with :func:`quantize_basal` and :func:`quantize_bolus`
    (idempotent, so already-quantised commands pass unchanged). Minute 0 carries
    ``basal/60 + bolus`` U/min, later minutes ``basal/60`` U/min. With ``spec.pulse_u > 0``
    each minute delivers the whole pulses available in the accumulator (residual + this
    minute's commanded insulin), and the fraction is returned as the new residual. With
    continuous delivery (``pulse_u == 0``) a residual passed in is delivered in minute 0 and the
    new residual is zero.

    Args:
        spec: the pump (shared by every patient).
        basal_u_per_h: basal rates, U/h, shape ``(N,)`` (a scalar broadcasts).
        bolus_u: boluses at the start of the period, U, shape ``(N,)`` (a scalar broadcasts).
        minutes: length of the control period, minutes (>= 1).
        pulse_residual_u: insulin accumulated but not yet delivered, U, shape ``(N,)``, >= 0;
            ``None`` means zero.

    Returns:
        ``(insulin_u_per_min, new_residual_u)``: delivered insulin, U/min, shape
        ``(N, minutes)``, and the accumulator after the period, U, shape ``(N,)``.

    Raises:
        InvalidInputError: NaN commands, shapes that do not broadcast to ``(N,)``, ``minutes``
            not an int >= 1, or a negative / non-finite residual.

    """
    if isinstance(minutes, bool) or not isinstance(minutes, int | np.integer) or minutes < 1:
        raise InvalidInputError(f"minutes={minutes!r}: must be an int >= 1")
    basal = quantize_basal(spec, basal_u_per_h)
    bolus = quantize_bolus(spec, bolus_u)
    residual = (
        np.zeros(()) if pulse_residual_u is None else np.asarray(pulse_residual_u, dtype=np.float64)
    )
    if max(basal.ndim, bolus.ndim, residual.ndim) > 1:
        raise InvalidInputError(
            f"basal_u_per_h, bolus_u, pulse_residual_u: expected shape (N,), got "
            f"{basal.shape}, {bolus.shape}, {residual.shape}"
        )
    try:
        basal, bolus, residual = np.broadcast_arrays(basal, bolus, residual)
    except ValueError:
        raise InvalidInputError(
            f"basal_u_per_h, bolus_u, pulse_residual_u: shapes {basal.shape}, {bolus.shape}, "
            f"{residual.shape} do not broadcast to one (N,)"
        ) from None
    basal, bolus, residual = np.atleast_1d(basal, bolus, residual)
    if not np.isfinite(residual).all() or (residual < 0.0).any():
        raise InvalidInputError("pulse_residual_u: must be finite and >= 0 U")

    n = basal.shape[0]
    commanded = np.empty((n, int(minutes)), dtype=np.float64)
    commanded[:] = (basal / MIN_PER_H)[:, np.newaxis]
    commanded[:, 0] += bolus
    if spec.pulse_u == 0.0:
        commanded[:, 0] += residual
        return commanded, np.zeros(n)

    delivered = np.empty_like(commanded)
    acc = residual.copy()
    for m in range(int(minutes)):
        acc += commanded[:, m]
        pulses = np.floor(acc / spec.pulse_u + STEP_TOL)
        out = np.minimum(pulses * spec.pulse_u, acc)
        delivered[:, m] = out
        acc = np.maximum(acc - out, 0.0)
    return delivered, acc
