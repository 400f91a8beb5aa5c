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

from plant.errors import ConfigError

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
