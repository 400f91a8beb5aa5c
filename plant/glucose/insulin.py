"""Insulin-on-board from delivered doses: the exponential insulin activity curve.

The curve is the exponential model used by OpenAPS (oref0) and Loop, published by D. Maksimovic
(2017, "Exponential insulin curves", LoopKit issue #388): with peak time ``tp`` and duration of
insulin action ``td`` (minutes),

    tau = tp·(1 − tp/td) / (1 − 2·tp/td),  a = 2·tau/td,  S = 1 / (1 − a + (1 + a)·exp(−td/tau))

    IOB(t)/dose = 1 − S·(1 − a)·[(t²/(tau·td·(1 − a)) − t/tau − 1)·exp(−t/tau) + 1],  0 ≤ t ≤ td

and 0 after ``td``. Rapid-acting analogues: peak 75 min, DIA 5–6 h (oref0's defaults).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.plant.errors import ConfigError

DEFAULT_PEAK_MIN = 75.0
DEFAULT_DIA_MIN = 360.0


def iob_fraction(
    t_min: ArrayLike, *, peak_min: float = DEFAULT_PEAK_MIN, dia_min: float = DEFAULT_DIA_MIN
) -> NDArray[np.float64]:
    """Fraction of a dose still on board ``t_min`` minutes after delivery (1 at 0, 0 at DIA).

    Raises:
        ConfigError: ``peak_min`` is not in ``(0, dia_min/2)``.

    """
    if not 0 < peak_min < dia_min / 2:
        raise ConfigError("peak_min", peak_min, f"0 < peak_min < dia_min/2 = {dia_min / 2:g}")
    t = np.asarray(t_min, dtype=np.float64)
    tp, td = float(peak_min), float(dia_min)
    tau = tp * (1 - tp / td) / (1 - 2 * tp / td)
    a = 2 * tau / td
    s = 1 / (1 - a + (1 + a) * np.exp(-td / tau))
    tc = np.clip(t, 0.0, td)
    frac = 1 - s * (1 - a) * ((tc**2 / (tau * td * (1 - a)) - tc / tau - 1) * np.exp(-tc / tau) + 1)
    return np.where(t >= td, 0.0, np.where(t <= 0, 1.0, frac))


def iob_kernel(
    period_min: float, *, peak_min: float = DEFAULT_PEAK_MIN, dia_min: float = DEFAULT_DIA_MIN
) -> NDArray[np.float64]:
    """IOB weights of doses delivered 0, 1, 2, … periods ago, evaluated one period after each.

    A dose delivered at the start of the period that has just ended has aged one period, so
    ``iob = kernel @ doses_newest_first``. The kernel's length covers the DIA. Basal insulin is
    spread over its period, so treating it as delivered at the period's start ages it by half a
    period on average: in basal steady state insulin on board comes out about half of one
    period's basal dose too low (0.05 U of about 2.5 U at 1.3 U/h with 5-min periods).
    """
    n = int(np.ceil(dia_min / period_min))
    return iob_fraction(period_min * np.arange(1, n + 1), peak_min=peak_min, dia_min=dia_min)


def _minute_curves(
    peak_min: float, dia_min: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """IOB weights and last-minute activity of each past minute's insulin, oldest minute first.

    Each minute's insulin is aged from the middle of its minute.
    """
    horizon = int(np.ceil(dia_min))
    ages = np.arange(horizon, 0, -1, dtype=np.float64) - 0.5
    weights = iob_fraction(ages, peak_min=peak_min, dia_min=dia_min)
    # activity: the fraction of each minute's insulin absorbed over the last minute
    activity = iob_fraction(ages - 1.0, peak_min=peak_min, dia_min=dia_min) - weights
    return weights, activity


class IobTracker:
    """Net insulin on board from minute-by-minute delivery (above a scheduled basal).

    ``record(units)`` accounts the insulin delivered in one minute; :attr:`net_iob_u` is the
    insulin on board of everything delivered (exponential curve, each minute's insulin aged
    from the middle of its minute) minus that of the scheduled basal in steady state, so it is
    0 on the scheduled basal, positive after boluses or high temps, negative during suspension.
    The history starts in basal steady state.

    Args:
        scheduled_basal_u_per_h: the basal rate that counts as zero.
        peak_min: peak of the activity curve.
        dia_min: duration of insulin action.

    """

    def __init__(
        self,
        scheduled_basal_u_per_h: float,
        *,
        peak_min: float = DEFAULT_PEAK_MIN,
        dia_min: float = DEFAULT_DIA_MIN,
    ) -> None:
        self._weights, self._activity = _minute_curves(peak_min, dia_min)
        horizon = self._weights.shape[0]
        basal_u_per_min = scheduled_basal_u_per_h / 60.0
        self._history_u = np.full(horizon, basal_u_per_min)
        self._next = 0  # ring-buffer slot of the oldest minute
        self._basal_iob_u = float(self._weights.sum() * basal_u_per_min)
        self._basal_activity = float(self._activity.sum() * basal_u_per_min)

    def record(self, units: float) -> None:
        """Account the insulin delivered in the minute that just ended, U."""
        self._history_u[self._next] = units
        self._next = (self._next + 1) % self._history_u.shape[0]

    def _ordered(self) -> NDArray[np.float64]:
        return np.concatenate((self._history_u[self._next :], self._history_u[: self._next]))

    @property
    def net_iob_u(self) -> float:
        """Insulin on board above the scheduled basal's steady state, U (may be negative)."""
        return float(self._weights @ self._ordered()) - self._basal_iob_u

    @property
    def net_activity_u_per_min(self) -> float:
        """Insulin absorbed in the last minute above the scheduled basal's, U/min.

        Multiplied by the insulin sensitivity (mg/dL per U) it is the glucose impact of the
        insulin on board (oref0's "BGI"), negative of the glucose fall it causes.
        """
        return float(self._activity @ self._ordered()) - self._basal_activity


class IobBatch:
    """:class:`IobTracker` for M patients at once: one ``record`` per minute for all of them.

    ``record(units)`` takes ``(M,)`` units delivered in the minute that just ended;
    :attr:`net_iob_u` and :attr:`net_activity_u_per_min` are ``(M,)`` and equal, patient by
    patient, those of an :class:`IobTracker` fed the same doses.

    Args:
        scheduled_basal_u_per_h: ``(M,)`` basal rates that count as zero.
        peak_min: peak of the activity curve.
        dia_min: duration of insulin action.

    """

    def __init__(
        self,
        scheduled_basal_u_per_h: ArrayLike,
        *,
        peak_min: float = DEFAULT_PEAK_MIN,
        dia_min: float = DEFAULT_DIA_MIN,
    ) -> None:
        self._weights, self._activity = _minute_curves(peak_min, dia_min)
        basal_u_per_min = np.asarray(scheduled_basal_u_per_h, dtype=np.float64) / 60.0
        horizon = self._weights.shape[0]
        self._history_u = np.repeat(basal_u_per_min[:, None], horizon, axis=1)
        self._next = 0
        self._basal_iob_u = self._weights.sum() * basal_u_per_min
        self._basal_activity = self._activity.sum() * basal_u_per_min

    def record(self, units: ArrayLike) -> None:
        """Account the insulin delivered to each patient in the minute that just ended, U."""
        self._history_u[:, self._next] = units
        self._next = (self._next + 1) % self._history_u.shape[1]

    def _dot(self, curve: NDArray[np.float64]) -> NDArray[np.float64]:
        # the ring buffer's slot k holds the minute that is (k - next) mod H oldest
        out: NDArray[np.float64] = self._history_u @ np.roll(curve, self._next)
        return out

    @property
    def net_iob_u(self) -> NDArray[np.float64]:
        """Insulin on board above each scheduled basal's steady state, U, ``(M,)``."""
        out: NDArray[np.float64] = self._dot(self._weights) - self._basal_iob_u
        return out

    @property
    def net_activity_u_per_min(self) -> NDArray[np.float64]:
        """Insulin absorbed in the last minute above each scheduled basal's, U/min, ``(M,)``."""
        out: NDArray[np.float64] = self._dot(self._activity) - self._basal_activity
        return out
