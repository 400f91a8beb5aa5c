"""Clinical glucose metrics (TIR, GMI, LBGI/HBGI, GRI, CVGA...) of 1-D or batched glucose traces.

Every metric is computed over the *valid* samples of a trace: ``NaN`` marks a gap (sensor dropout,
missing reading) and is excluded everywhere, so percentages are fractions of the non-``NaN``
samples and ``duration_min`` counts only valid samples. A trace (or a row of a batch) without any
valid sample gives ``NaN`` for every float metric, ``0`` samples, ``0`` minutes and the empty
string as CVGA zone, without raising or warning. Values are never clipped (readings below 40 or
above 400 mg/dL are used as given); a reading that is ``<= 0`` or infinite raises
:class:`~twinloop.plant.errors.InvalidInputError`.

Threshold conventions (mg/dL, the international consensus of Battelino et al. 2019, *Diabetes
Care* 42(8):1593-1603): in range is ``70 <= BG <= 180``; below range is ``BG < 70``, level 2 below
``BG < 54``; above range is ``BG > 180``, level 2 above ``BG > 250``. The five disjoint bands
``< 54``, ``[54, 70)``, ``[70, 180]``, ``(180, 250]``, ``> 250`` therefore cover every valid sample
exactly once.

References:
    * Bergenstal RM et al. (2018) Glucose Management Indicator (GMI): a new term for estimating
      A1C from continuous glucose monitoring. *Diabetes Care* 41(11):2275-2280.
    * Kovatchev BP et al. (1997) Symmetrization of the blood glucose measurement scale and its
      applications. *Diabetes Care* 20(11):1655-1658; Kovatchev BP et al. (2006) Evaluation of a
      new measure of blood glucose variability in diabetes. *Diabetes Care* 29(11):2433-2438.
    * Klonoff DC et al. (2022) A Glycemia Risk Index (GRI) of hypoglycemia and hyperglycemia for
      continuous glucose monitoring validated by clinician ratings. *J Diabetes Sci Technol*
      17(5):1226-1242, doi:10.1177/19322968221085273.
    * Magni L et al. (2008) Evaluating the efficacy of closed-loop glucose regulation via
      control-variability grid analysis. *J Diabetes Sci Technol* 2(4):630-635,
      doi:10.1177/193229680800200414.

"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.plant.errors import InvalidInputError

__all__ = [
    "CVGA_NO_DATA",
    "CVGA_ZONES",
    "GlucoseMetrics",
    "glucose_metrics",
    "risk_index",
]

#: Range thresholds in mg/dL (see the module docstring for which side of each is inclusive).
VERY_LOW_MG_DL = 54.0
LOW_MG_DL = 70.0
HIGH_MG_DL = 180.0
VERY_HIGH_MG_DL = 250.0

#: Glucose Management Indicator (Bergenstal 2018): GMI(%) = 3.31 + 0.02392 x mean glucose (mg/dL).
GMI_INTERCEPT_PCT = 3.31
GMI_SLOPE_PCT_PER_MG_DL = 0.02392

#: Kovatchev symmetrisation f(BG) = alpha * ((ln BG)^beta - gamma), BG in mg/dL; risk r = 10 f^2.
KOVATCHEV_ALPHA = 1.509
KOVATCHEV_BETA = 1.084
KOVATCHEV_GAMMA = 5.381
KOVATCHEV_RISK_SCALE = 10.0

#: Glycemia Risk Index weights (Klonoff 2022) and its cap.
GRI_W_VERY_LOW = 3.0
GRI_W_LOW = 2.4
GRI_W_VERY_HIGH = 1.6
GRI_W_HIGH = 0.8
GRI_MAX = 100.0

#: CVGA: percentiles (as fractions) used as the trace's "minimum" and "maximum" BG (Magni 2008).
CVGA_LOWER_QUANTILE = 0.025
CVGA_UPPER_QUANTILE = 0.975

#: CVGA zone boundaries in mg/dL: minimum BG columns and maximum BG rows.
CVGA_MIN_BG_EDGES_MG_DL = (90.0, 70.0)
CVGA_MAX_BG_EDGES_MG_DL = (180.0, 300.0)

#: The nine CVGA zones, best first.
CVGA_ZONES: tuple[str, ...] = (
    "A",
    "Lower B",
    "B",
    "Upper B",
    "Lower C",
    "Upper C",
    "Lower D",
    "Upper D",
    "E",
)

#: CVGA zone reported for a trace without any valid sample.
CVGA_NO_DATA = ""

# Rows: maximum BG <= 180, (180, 300], > 300. Columns: minimum BG >= 90, [70, 90), < 70.
_CVGA_GRID: NDArray[np.object_] = np.array(
    [
        ["A", "Lower B", "Lower C"],
        ["Upper B", "B", "Lower D"],
        ["Upper C", "Upper D", "E"],
    ],
    dtype=object,
)

_FIELD = "glucose_mg_dl"


@dataclasses.dataclass(frozen=True, slots=True)
class GlucoseMetrics:
    """Clinical metrics of one glucose trace (scalars) or of a batch of traces (arrays ``(N,)``).

    For a 1-D input every float field is a Python ``float``, ``n_samples`` an ``int`` and
    ``cvga_zone`` a ``str``; for a 2-D ``(N, T)`` input every field is an array of shape ``(N,)``
    (``float64``, ``int64`` for ``n_samples``, ``object`` holding ``str`` for ``cvga_zone``).
    Percentages are in percent (0-100) of the valid (non-``NaN``) samples.

    Attributes:
        mean_mg_dl: mean glucose.
        sd_mg_dl: sample standard deviation (``ddof=1``); ``NaN`` with fewer than 2 samples.
        cv_pct: coefficient of variation, ``100 * sd / mean``.
        gmi_pct: Glucose Management Indicator, ``3.31 + 0.02392 * mean`` (Bergenstal 2018).
        time_in_range_70_180_pct: percent of samples with ``70 <= BG <= 180``.
        time_below_70_pct: percent with ``BG < 70`` (includes those below 54).
        time_below_54_pct: percent with ``BG < 54``.
        time_above_180_pct: percent with ``BG > 180`` (includes those above 250).
        time_above_250_pct: percent with ``BG > 250``.
        lbgi: Low Blood Glucose Index, mean over all valid samples of the risk where ``f < 0``
            (0 elsewhere).
        hbgi: High Blood Glucose Index, mean over all valid samples of the risk where ``f > 0``.
        gri: Glycemia Risk Index, ``3.0 VLow + 2.4 Low + 1.6 VHigh + 0.8 High`` capped at 100.
        gri_hypo_component: ``VLow + 0.8 Low`` (not capped).
        gri_hyper_component: ``VHigh + 0.5 High`` (not capped).
        cvga_min_bg_mg_dl: 2.5th percentile of the trace, the CVGA "minimum BG" (x axis).
        cvga_max_bg_mg_dl: 97.5th percentile of the trace, the CVGA "maximum BG" (y axis).
        cvga_zone: one of :data:`CVGA_ZONES`, or :data:`CVGA_NO_DATA` without valid samples.
        n_samples: number of valid (non-``NaN``) samples.
        duration_min: ``n_samples * sample_period_min``.
        min_bg_mg_dl: the lowest valid sample (the safety floor a run reached).

    """

    mean_mg_dl: float | NDArray[np.float64]
    sd_mg_dl: float | NDArray[np.float64]
    cv_pct: float | NDArray[np.float64]
    gmi_pct: float | NDArray[np.float64]
    time_in_range_70_180_pct: float | NDArray[np.float64]
    time_below_70_pct: float | NDArray[np.float64]
    time_below_54_pct: float | NDArray[np.float64]
    time_above_180_pct: float | NDArray[np.float64]
    time_above_250_pct: float | NDArray[np.float64]
    lbgi: float | NDArray[np.float64]
    hbgi: float | NDArray[np.float64]
    gri: float | NDArray[np.float64]
    gri_hypo_component: float | NDArray[np.float64]
    gri_hyper_component: float | NDArray[np.float64]
    cvga_min_bg_mg_dl: float | NDArray[np.float64]
    cvga_max_bg_mg_dl: float | NDArray[np.float64]
    cvga_zone: str | NDArray[np.object_]
    n_samples: int | NDArray[np.int64]
    duration_min: float | NDArray[np.float64]
    min_bg_mg_dl: float | NDArray[np.float64]


def _as_glucose(glucose_mg_dl: ArrayLike, *, max_ndim: int | None) -> NDArray[np.float64]:
    """Convert to float64 and reject readings that are ``<= 0`` or infinite (``NaN`` is a gap)."""
    try:
        g = np.asarray(glucose_mg_dl, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{_FIELD}: not convertible to a float array ({exc})") from exc
    if max_ndim is not None and not 1 <= g.ndim <= max_ndim:
        raise InvalidInputError(
            f"{_FIELD}: expected shape (T,) or (N, T), got {g.shape} ({g.ndim}-D)"
        )
    bad = ~np.isnan(g) & ~((g > 0.0) & np.isfinite(g))
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        index = f"[{', '.join(map(str, where))}]" if where else ""
        raise InvalidInputError(
            f"{_FIELD}{index}={float(g[where])!r}: blood glucose must be finite and > 0 mg/dL "
            f"(NaN marks a gap); {int(np.count_nonzero(bad))} invalid value(s)"
        )
    return g


def _kovatchev_f(g: NDArray[np.float64]) -> NDArray[np.float64]:
    """Kovatchev symmetrising transform ``f(BG)`` of strictly positive (or ``NaN``) glucose.

    For ``0 < BG < 1`` mg/dL, where ``ln BG < 0`` and the real power is undefined,
    ``(ln BG)^1.084`` is evaluated as ``-|ln BG|^1.084`` (odd extension): ``f`` stays real,
    continuous and increasing, so the risk keeps growing as BG tends to 0.
    """
    log_bg = np.log(g)
    return KOVATCHEV_ALPHA * (np.sign(log_bg) * np.abs(log_bg) ** KOVATCHEV_BETA - KOVATCHEV_GAMMA)


def risk_index(glucose_mg_dl: ArrayLike) -> NDArray[np.float64]:
    """Per-sample Kovatchev blood-glucose risk ``r(BG) = 10 f(BG)^2``, element-wise.

    ``f(BG) = 1.509 ((ln BG)^1.084 - 5.381)`` with BG in mg/dL (Kovatchev et al. 1997). The risk is
    0 at ``BG ~ 112.5`` mg/dL (where ``f = 0``), about 36 at 40, 57 at 400 and 100 at 20 and
    600 mg/dL, and grows without bound beyond. LBGI and HBGI are the means of this risk over the
    hypo (``f < 0``) and hyper (``f > 0``) sides; see :func:`glucose_metrics`.

    Args:
        glucose_mg_dl: glucose in mg/dL, any shape (a scalar gives a 0-d array). ``NaN`` is passed
            through as ``NaN``.

    Returns:
        The risk, float64, same shape as the input.

    Raises:
        InvalidInputError: a reading is ``<= 0`` or infinite.

    """
    g = _as_glucose(glucose_mg_dl, max_ndim=None)
    f = _kovatchev_f(g)
    return np.asarray(KOVATCHEV_RISK_SCALE * f * f, dtype=np.float64)


def _row_quantile(
    sorted_g: NDArray[np.float64], n: NDArray[np.int64], q: float
) -> NDArray[np.float64]:
    """Quantile ``q`` of the first ``n[i]`` entries of each sorted row, linear interpolation.

    Same definition as ``numpy.nanpercentile(..., method="linear")`` (Hyndman-Fan type 7), without
    its all-``NaN`` warning: rows with ``n == 0`` give ``NaN``.
    """
    last = np.maximum(n - 1, 0)
    pos = last * q
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, last)
    frac = pos - lo
    a = np.take_along_axis(sorted_g, lo[:, None], axis=1)[:, 0]
    b = np.take_along_axis(sorted_g, hi[:, None], axis=1)[:, 0]
    return np.where(n > 0, a + frac * (b - a), np.nan)


def _cvga_zone(min_bg: NDArray[np.float64], max_bg: NDArray[np.float64]) -> NDArray[np.object_]:
    """Classify CVGA points; ``NaN`` coordinates give :data:`CVGA_NO_DATA`."""
    min_hi, min_lo = CVGA_MIN_BG_EDGES_MG_DL
    max_lo, max_hi = CVGA_MAX_BG_EDGES_MG_DL
    col = np.select([min_bg >= min_hi, min_bg >= min_lo], [0, 1], default=2)
    row = np.select([max_bg <= max_lo, max_bg <= max_hi], [0, 1], default=2)
    zone: NDArray[np.object_] = _CVGA_GRID[row, col]
    valid = ~(np.isnan(min_bg) | np.isnan(max_bg))
    return np.where(valid, zone, CVGA_NO_DATA).astype(object)


def glucose_metrics(glucose_mg_dl: ArrayLike, *, sample_period_min: float) -> GlucoseMetrics:
    """Clinical glucose metrics of one trace ``(T,)`` or of each row of a batch ``(N, T)``.

    Every metric uses only the valid (non-``NaN``) samples; the sample period only sets
    ``duration_min``. Boundaries (mg/dL): in range ``70 <= BG <= 180``, below ``BG < 70`` and
    ``BG < 54``, above ``BG > 180`` and ``BG > 250``.

    * ``sd_mg_dl`` is the sample standard deviation (``ddof=1``); ``cv_pct = 100 sd / mean``.
    * ``gmi_pct = 3.31 + 0.02392 * mean_mg_dl`` (Bergenstal et al. 2018).
    * LBGI/HBGI (Kovatchev et al. 1997, 2006): ``f = 1.509 ((ln BG)^1.084 - 5.381)``,
      ``r = 10 f^2``, ``rl = r`` where ``f < 0`` else 0, ``rh = r`` where ``f > 0`` else 0;
      ``lbgi = mean(rl)`` and ``hbgi = mean(rh)``, both over *all* valid samples.
    * GRI (Klonoff et al. 2022): with VLow = % ``< 54``, Low = % in ``[54, 70)``,
      VHigh = % ``> 250`` and High = % in ``(180, 250]``,
      ``gri = min(3.0 VLow + 2.4 Low + 1.6 VHigh + 0.8 High, 100)``; the (uncapped) components
      are ``gri_hypo_component = VLow + 0.8 Low`` and ``gri_hyper_component = VHigh + 0.5 High``,
      so that ``gri = min(3 hypo + 1.6 hyper, 100)``.
    * CVGA (Magni et al. 2008): each trace is the point (minimum BG, maximum BG), where, as in
      the paper, the 2.5th and 97.5th percentiles of the trace (linear interpolation between
      order statistics, as ``numpy.percentile``) stand in for the minimum and maximum to
      discard isolated outliers. The plot's axes are x = minimum BG with gridlines 110, 90, 70,
      50 (drawn decreasing) and y = maximum BG with gridlines 110, 180, 300, 400; 110, 50 and 400
      only bound the drawing (points beyond are shown on the edge), so the nine zones are set by
      minimum BG ``>= 90`` / ``[70, 90)`` / ``< 70`` and maximum BG ``<= 180`` / ``(180, 300]`` /
      ``> 300`` (a point on a gridline goes to the better zone)::

                             min >= 90   70 <= min < 90   min < 70
          max > 300          Upper C     Upper D          E
          180 < max <= 300   Upper B     B                Lower D
          max <= 180         A           Lower B          Lower C

    Args:
        glucose_mg_dl: glucose in mg/dL, shape ``(T,)`` or ``(N, T)``; ``NaN`` marks a gap.
            Values outside 40-400 mg/dL are used as they are (no clipping).
        sample_period_min: minutes between consecutive samples (> 0), e.g. 1, 3, 5 or 15.

    Returns:
        The metrics: scalars for a 1-D input, arrays of shape ``(N,)`` for a 2-D input. A trace
        without valid samples gives ``NaN`` floats, ``n_samples == 0``, ``duration_min == 0`` and
        ``cvga_zone == CVGA_NO_DATA`` (the empty string).

    Raises:
        InvalidInputError: the input is not 1-D or 2-D, a reading is ``<= 0`` or infinite, or
            ``sample_period_min`` is not a finite number > 0.

    """
    period = float(sample_period_min)
    if not (np.isfinite(period) and period > 0.0):
        raise InvalidInputError(
            f"sample_period_min={sample_period_min!r}: must be a finite number of minutes > 0"
        )
    g_in = _as_glucose(glucose_mg_dl, max_ndim=2)
    one_trace = g_in.ndim == 1
    g = g_in[None, :] if one_trace else g_in
    if g.shape[1] == 0:  # no sample at all: one NaN column changes no metric
        g = np.full((g.shape[0], 1), np.nan)

    valid = ~np.isnan(g)
    n = np.count_nonzero(valid, axis=1).astype(np.int64)
    n_f = n.astype(np.float64)

    def pct(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        # Comparisons with NaN are False, so only valid samples are ever counted.
        return 100.0 * np.count_nonzero(mask, axis=1) / n_f

    f = _kovatchev_f(g)
    risk = KOVATCHEV_RISK_SCALE * f * f
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, g, 0.0).sum(axis=1) / n_f
        dev = np.where(valid, g - mean[:, None], 0.0)
        sd = np.where(n > 1, np.sqrt((dev * dev).sum(axis=1) / (n_f - 1.0)), np.nan)
        cv = 100.0 * sd / mean

        below_54 = pct(g < VERY_LOW_MG_DL)
        below_70 = pct(g < LOW_MG_DL)
        in_range = pct((g >= LOW_MG_DL) & (g <= HIGH_MG_DL))
        above_180 = pct(g > HIGH_MG_DL)
        above_250 = pct(g > VERY_HIGH_MG_DL)
        low_54_70 = pct((g >= VERY_LOW_MG_DL) & (g < LOW_MG_DL))
        high_180_250 = pct((g > HIGH_MG_DL) & (g <= VERY_HIGH_MG_DL))

        lbgi = np.where(valid & (f < 0.0), risk, 0.0).sum(axis=1) / n_f
        hbgi = np.where(valid & (f > 0.0), risk, 0.0).sum(axis=1) / n_f

    gri_raw = (
        GRI_W_VERY_LOW * below_54
        + GRI_W_LOW * low_54_70
        + GRI_W_VERY_HIGH * above_250
        + GRI_W_HIGH * high_180_250
    )
    gri = np.minimum(gri_raw, GRI_MAX)  # NaN (no data) propagates
    hypo = below_54 + (GRI_W_LOW / GRI_W_VERY_LOW) * low_54_70
    hyper = above_250 + (GRI_W_HIGH / GRI_W_VERY_HIGH) * high_180_250

    sorted_g = np.sort(g, axis=1)  # NaN sorts last, so the first n[i] entries are the valid ones
    min_bg = _row_quantile(sorted_g, n, CVGA_LOWER_QUANTILE)
    max_bg = _row_quantile(sorted_g, n, CVGA_UPPER_QUANTILE)
    zone = _cvga_zone(min_bg, max_bg)

    floats: dict[str, NDArray[np.float64]] = {
        "mean_mg_dl": mean,
        "sd_mg_dl": sd,
        "cv_pct": cv,
        "gmi_pct": GMI_INTERCEPT_PCT + GMI_SLOPE_PCT_PER_MG_DL * mean,
        "time_in_range_70_180_pct": in_range,
        "time_below_70_pct": below_70,
        "time_below_54_pct": below_54,
        "time_above_180_pct": above_180,
        "time_above_250_pct": above_250,
        "lbgi": lbgi,
        "hbgi": hbgi,
        "gri": gri,
        "gri_hypo_component": hypo,
        "gri_hyper_component": hyper,
        "cvga_min_bg_mg_dl": min_bg,
        "cvga_max_bg_mg_dl": max_bg,
        "duration_min": n_f * period,
        "min_bg_mg_dl": np.where(n > 0, sorted_g[:, 0], np.nan),
    }
    if one_trace:
        return GlucoseMetrics(
            **{k: float(v[0]) for k, v in floats.items()},
            cvga_zone=str(zone[0]),
            n_samples=int(n[0]),
        )
    return GlucoseMetrics(
        **{k: np.asarray(v, dtype=np.float64) for k, v in floats.items()},
        cvga_zone=zone,
        n_samples=n,
    )
