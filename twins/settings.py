"""A person's therapy settings (basal, carb ratio, correction factor) inferred from their log.

**Basal.** The scheduled basal is the most common logged basal rate over the log's minutes
(:meth:`twinloop.plant.glucose.twin_model.LogGrid.scheduled_basal_u_per_h`): on a pump without a
loop it is the programmed rate; with a loop's temp basals around it, the rate the loop returns
to (the median of the temps would not be).

**Carb ratio and correction factor** from the boluses and their glucose context. A bolus event
is a bolus (boluses less than 15 min apart are one event) with the glucose of the last CGM
reading at most 10 min before it, ``G``, the net insulin on board at it, ``IOB`` (the log's own
insulin above the scheduled basal, exponential curve of :mod:`twinloop.plant.glucose.insulin`,
at least 0), and the carbohydrates logged within 15 min, ``C`` (each carbohydrate entry counts
for its nearest bolus). A meal bolus (``C > 0``) and a stand-alone correction (``C = 0``) both
follow the bolus calculator

    bolus = C/CR + max(0, (G − T)/CF − IOB)

with ``T`` the person's target, unknown. A person may decline the calculator's correction at a
meal (the synthetic person does within 3 h of the last one; pumps let anyone): a meal bolus
counts as ``C/CR`` alone when that is closer to it. ``1/CR``, ``1/CF`` and ``T`` are fitted
jointly by robust least squares (SciPy ``least_squares``, Cauchy loss, within bounds, from six
starts) on the residuals relative to ``0.1 U + 5 %`` of the bolus, so a bolus the person
changed by hand or a stray manual dose weighs little. Events below 70 mg/dL are left out: the
carbohydrates logged then are often a hypo treatment eaten with the meal, not bolused for. A
given setting is held at its value and the others are fitted around it. Each inferred value
carries a 90 % interval: the 5th and 95th percentiles over refits on 200 bootstrap resamples of
the events (seeded: the same log gives the same interval). It is the events' sampling
uncertainty only: a steady deviation from the calculator (hypo carbohydrates in a meal's,
rounding) moves the estimate without widening it, so on logs that follow the calculator almost
exactly it misses the truth more often than 1 in 10 (measured: ``benchmarks/README.md``).

**When the log says too little** the rules of thumb take over, and the setting says so:

* carb ratio — inferred from at least :data:`MIN_MEAL_BOLUSES` meal boluses; with fewer (but
  some) the median of carbs/bolus; with none the "500 rule" ``500/TDI``;
* correction factor (and target) — inferred when at least :data:`MIN_CORRECTIONS` events took
  a correction (a stand-alone correction, or a meal bolus whose fitted correction part is at
  least 0.1 U); otherwise the "1800 rule" ``1800/TDI`` (mg/dL per U). The rule can be far from
  a person's real factor (1.2–3.4× on logs of another simulator; 1.3–4× for the shipped
  UVA/Padova patients).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import least_squares

from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.insulin import IobTracker
from twinloop.plant.glucose.twin_model import LogGrid

__all__ = [
    "INTERVAL",
    "MEAL_WINDOW_MIN",
    "MIN_CORRECTIONS",
    "MIN_MEAL_BOLUSES",
    "THERAPY_LIMITS",
    "BolusEvents",
    "Setting",
    "TherapySettings",
    "bolus_events",
    "check_setting",
    "infer_therapy",
    "therapy_lines",
]

#: Minutes within which carbohydrates belong to a bolus (and boluses to one event).
MEAL_WINDOW_MIN = 15
#: Oldest CGM reading (minutes before the bolus) taken as the glucose the bolus was given at.
GLUCOSE_AGE_MIN = 10
#: Events at a glucose below this are left out of the fit (hypo treatments in the carbs).
LOW_MG_DL = 70.0
#: Below this share of the log's minutes at its most common basal rate, the report asks for the
#: scheduled basal (a loop's temps everywhere).
MODE_SHARE_HINT = 0.3
#: Meal boluses needed to infer the carb ratio.
MIN_MEAL_BOLUSES = 5
#: Events with a correction needed to infer the correction factor (and the target).
MIN_CORRECTIONS = 3
#: A fitted correction part at least this large (U) makes an event a correction.
CORRECTION_MIN_U = 0.1
#: Scale of a bolus's residual: this many units plus :data:`RELATIVE_SCALE` of the bolus.
ABSOLUTE_SCALE_U = 0.1
RELATIVE_SCALE = 0.05
#: Bootstrap resamples of the events for the intervals, and the intervals' nominal coverage.
BOOTSTRAP = 200
INTERVAL = 0.90
#: Plausible settings (given ones are checked against them; inferred ones stay inside).
THERAPY_LIMITS: dict[str, tuple[float, float, str]] = {
    "basal_u_per_h": (0.01, 10.0, "U/h"),
    "carb_ratio_g_per_u": (1.0, 150.0, "g/U"),
    "correction_factor_mg_dl_per_u": (2.0, 1000.0, "mg/dL/U"),
}
#: Bounds of the bolus calculator's target, mg/dL.
TARGET_LIMITS = (60.0, 200.0)
#: The fit starts from each pair of these: the 1800-rule CF times a factor, and a target.
CF_STARTS = (1.0, 0.5, 0.25)
TARGET_STARTS = (100.0, 140.0)
_SETTINGS = ("basal_u_per_h", "carb_ratio_g_per_u", "correction_factor_mg_dl_per_u")


def check_setting(field: str, value: float, name: str | None = None) -> float:
    """``value`` if it is a plausible ``field`` (:data:`THERAPY_LIMITS`).

    Raises:
        ConfigError: outside the limits; names ``name`` (an option, say) or ``field``.

    """
    lo, hi, unit = THERAPY_LIMITS[field]
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(name or field, value, f"{lo:g}–{hi:g} {unit}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One therapy setting: its value, its 90 % interval (inferred ones) and its source.

    Attributes:
        value: the setting.
        low: lower end of the 90 % interval, or ``None``.
        high: upper end, or ``None``.
        source: ``given``, ``inferred``, ``mode``, ``median``, ``500 rule`` or ``1800 rule``.
        detail: where the value came from, in words ("inferred from 23 meal boluses and 6
            corrections", "1800 rule: 2 corrections, 3 needed to infer").

    """

    value: float
    source: str
    detail: str
    low: float | None = None
    high: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for ``twin.yaml``)."""
        return dataclasses.asdict(self)

    def text(self, unit: str) -> str:
        """``9.02 g/U [8.95, 9.10] (inferred from …)``."""
        ci = "" if self.low is None or self.high is None else f" [{_g(self.low)}, {_g(self.high)}]"
        return f"{_g(self.value)} {unit}{ci} ({self.detail})"


def _g(value: float) -> str:
    """Three significant digits, trailing zeros kept below 100 (``9.00``, ``18.0``, ``120``)."""
    return f"{value:.3g}" if abs(value) >= 100 else f"{value:#.3g}"


def _count(n: int, what: str, plural: str) -> str:
    return f"{n} {what if n == 1 else plural}"


@dataclasses.dataclass(frozen=True)
class BolusEvents:
    """A log's bolus events (see the module): one row per event.

    Attributes:
        minute: first bolus minute of each event.
        bolus_u: units of the event.
        carbs_g: carbohydrates logged with it (0: a stand-alone correction).
        glucose_mg_dl: the CGM at the bolus (``NaN`` when no reading was recent enough).
        iob_u: net insulin on board at the bolus, at least 0.

    """

    minute: NDArray[np.int64]
    bolus_u: NDArray[np.float64]
    carbs_g: NDArray[np.float64]
    glucose_mg_dl: NDArray[np.float64]
    iob_u: NDArray[np.float64]

    def take(self, index: NDArray[np.int64] | NDArray[np.bool_]) -> BolusEvents:
        """The events at ``index`` (a mask or indices)."""
        return BolusEvents(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def bolus_events(grid: LogGrid, scheduled_basal_u_per_h: float) -> BolusEvents:
    """The log's bolus events with their carbohydrates, glucose and insulin on board."""
    doses = np.flatnonzero(grid.bolus_u > 0)
    first = np.diff(doses, prepend=-MEAL_WINDOW_MIN - 1) > MEAL_WINDOW_MIN
    label = np.cumsum(first) - 1
    starts = doses[first]
    bolus = np.bincount(label, weights=grid.bolus_u[doses], minlength=starts.size).astype(float)
    carbs = np.zeros(starts.size)
    for eaten in np.flatnonzero(grid.carbs_g > 0).tolist() if doses.size else ():
        nearest = int(np.argmin(np.abs(doses - eaten)))
        if abs(int(doses[nearest]) - eaten) <= MEAL_WINDOW_MIN:
            carbs[label[nearest]] += grid.carbs_g[eaten]
    glucose = np.full(starts.size, np.nan)
    seen = np.flatnonzero(~np.isnan(grid.cgm_mg_dl))
    if seen.size:
        at = np.searchsorted(seen, starts, side="right") - 1
        ok = (at >= 0) & (starts - seen[np.clip(at, 0, None)] <= GLUCOSE_AGE_MIN)
        glucose[ok] = grid.cgm_mg_dl[seen[at[ok]]]
    iob = np.zeros(starts.size)
    tracker = IobTracker(scheduled_basal_u_per_h)
    t = 0
    for j, start in enumerate(starts.tolist()):
        while t < start:
            tracker.record(float(grid.insulin_u_per_min[t]))
            t += 1
        iob[j] = max(tracker.net_iob_u, 0.0)
    return BolusEvents(starts.astype(np.int64), bolus, carbs, glucose, iob)


def _correction(theta: NDArray[np.float64], ev: BolusEvents) -> NDArray[np.float64]:
    """The calculator's correction for each event at ``theta = (1/CR, 1/CF, T)``."""
    _, c, target = theta
    out: NDArray[np.float64] = np.maximum(c * (ev.glucose_mg_dl - target) - ev.iob_u, 0.0)
    return out


def _accepted(theta: NDArray[np.float64], ev: BolusEvents) -> NDArray[np.bool_]:
    """Whether each event's bolus took the correction (closer to it than to the meal alone)."""
    meal = theta[0] * ev.carbs_g - ev.bolus_u
    out: NDArray[np.bool_] = (ev.carbs_g == 0) | (
        np.abs(meal + _correction(theta, ev)) <= np.abs(meal)
    )
    return out


def _residuals(theta: NDArray[np.float64], ev: BolusEvents) -> NDArray[np.float64]:
    """Calculated minus given bolus, in units: with the correction where it was accepted."""
    meal = theta[0] * ev.carbs_g - ev.bolus_u
    out: NDArray[np.float64] = meal + np.where(_accepted(theta, ev), _correction(theta, ev), 0.0)
    return out


def _bounds() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    cr_lo, cr_hi, _ = THERAPY_LIMITS["carb_ratio_g_per_u"]
    cf_lo, cf_hi, _ = THERAPY_LIMITS["correction_factor_mg_dl_per_u"]
    return (
        np.array([1 / cr_hi, 1 / cf_hi, TARGET_LIMITS[0]]),
        np.array([1 / cr_lo, 1 / cf_lo, TARGET_LIMITS[1]]),
    )


def _fit(
    ev: BolusEvents, starts: list[NDArray[np.float64]], free: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """The best of robust fits from ``starts``; the parameters not ``free`` keep their start."""
    scale = ABSOLUTE_SCALE_U + RELATIVE_SCALE * ev.bolus_u
    lo, hi = _bounds()
    best, best_cost = starts[0], math.inf
    for start in starts:
        x0 = np.clip(start, lo, hi)

        def residuals(x: NDArray[np.float64], x0: NDArray[np.float64] = x0) -> NDArray[np.float64]:
            theta = x0.copy()
            theta[free] = x
            out: NDArray[np.float64] = _residuals(theta, ev) / scale
            return out

        res = least_squares(
            residuals, x0[free], bounds=(lo[free], hi[free]), loss="cauchy", x_scale=x0[free]
        )
        if res.cost < best_cost:
            best_cost = res.cost
            best = x0.copy()
            best[free] = res.x
    return best


def _interval(
    ev: BolusEvents, theta: NDArray[np.float64], free: NDArray[np.bool_], seed: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The :data:`INTERVAL` percentile interval of the parameters over bootstrap refits."""
    rng = np.random.default_rng(seed)
    n = ev.bolus_u.size
    draws = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, n, n)
        draws.append(_fit(ev.take(pick), [theta], free))
    tail = 50.0 * (1.0 - INTERVAL)
    lo, hi = np.percentile(np.array(draws), [tail, 100.0 - tail], axis=0)
    return lo, hi


@dataclasses.dataclass(frozen=True)
class TherapySettings:
    """A person's therapy as inferred from (or given for) their log.

    Attributes:
        basal_u_per_h: the scheduled basal.
        carb_ratio_g_per_u: CR.
        correction_factor_mg_dl_per_u: CF.
        target_mg_dl: the bolus calculator's target (when the correction factor was inferred).
        total_daily_insulin_u: all insulin / days.
        meal_boluses: meal boluses with a glucose reading.
        corrections: events with a correction (stand-alone ones included).
        standalone_corrections: boluses without carbohydrates.

    """

    basal_u_per_h: Setting
    carb_ratio_g_per_u: Setting
    correction_factor_mg_dl_per_u: Setting
    target_mg_dl: Setting | None
    total_daily_insulin_u: float
    meal_boluses: int
    corrections: int
    standalone_corrections: int

    def values(self) -> dict[str, float]:
        """The settings a twin's base takes (TDI, CR, CF; the basal is the model's own)."""
        return {
            "total_daily_insulin_u": self.total_daily_insulin_u,
            "carb_ratio_g_per_u": self.carb_ratio_g_per_u.value,
            "correction_factor_mg_dl_per_u": self.correction_factor_mg_dl_per_u.value,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain data (``twin.yaml``'s ``fit: therapy:``)."""
        out: dict[str, Any] = {k: getattr(self, k).as_dict() for k in _SETTINGS}
        out["target_mg_dl"] = None if self.target_mg_dl is None else self.target_mg_dl.as_dict()
        for k in ("total_daily_insulin_u", "meal_boluses", "corrections", "standalone_corrections"):
            out[k] = getattr(self, k)
        return out


def therapy_lines(doc: Mapping[str, Any]) -> list[str]:
    """One line per setting (value, 90 % interval, source) of :meth:`TherapySettings.as_dict`."""
    out = []
    for key, label, unit in (
        ("basal_u_per_h", "basal", "U/h"),
        ("carb_ratio_g_per_u", "CR", "g/U"),
        ("correction_factor_mg_dl_per_u", "CF", "mg/dL/U"),
        ("target_mg_dl", "target", "mg/dL"),
    ):
        if doc.get(key) is not None:
            out.append(f"{label} {Setting(**doc[key]).text(unit)}")
    return out


def _basal(grid: LogGrid, given: float | None) -> Setting:
    if given is not None:
        return Setting(given, "given", "given")
    rate = grid.scheduled_basal_u_per_h()  # 0 when the log has none: the fit refuses it
    share = float(np.mean(np.isclose(grid.basal_u_per_h, rate, rtol=0.0, atol=5e-4)))
    detail = f"the most common logged rate, {100 * share:.0f} % of the time"
    if share < MODE_SHARE_HINT:
        detail += ": few minutes at any one rate, give the scheduled basal"
    return Setting(rate, "mode", detail)


def infer_therapy(
    grid: LogGrid, *, given: Mapping[str, float] | None = None, seed: int = 0
) -> TherapySettings:
    """The person's therapy settings from their log (see the module); ``given`` ones are kept.

    Args:
        grid: the log on a minute grid.
        given: ``basal_u_per_h``, ``carb_ratio_g_per_u``, ``correction_factor_mg_dl_per_u``
            known from elsewhere (others are ignored).
        seed: seed of the bootstrap.

    Raises:
        ConfigError: no insulin in the log; a given setting out of range; no basal.

    """
    known = {k: check_setting(k, v) for k, v in (given or {}).items() if k in _SETTINGS}
    tdi = float(grid.insulin_u_per_min.sum() / grid.days)
    if not tdi > 0:
        raise ConfigError("insulin", 0.0, "a log with insulin (basal or boluses)")
    basal = _basal(grid, known.get("basal_u_per_h"))
    events = bolus_events(grid, basal.value)
    ev = events.take(events.glucose_mg_dl >= LOW_MG_DL)
    meals = int(np.count_nonzero(ev.carbs_g > 0))
    meal = events.carbs_g > 0
    ratios = events.carbs_g[meal] / events.bolus_u[meal]
    cr_given = known.get("carb_ratio_g_per_u")
    cf_given = known.get("correction_factor_mg_dl_per_u")
    cr0 = cr_given or (float(np.median(ratios)) if ratios.size else 500.0 / tdi)
    # the parameters 1/CR, 1/CF and the target T; given ones are held
    free = np.array([cr_given is None, cf_given is None, True])
    theta = lo = hi = np.array([1 / cr0, 1 / (cf_given or 1800.0 / tdi), 120.0])
    corrections = 0
    if (free[0] or free[1]) and ev.bolus_u.size >= free.size:
        cfs = [cf_given] if cf_given else [1800.0 / tdi * f for f in CF_STARTS]
        theta = _fit(
            ev, [np.array([1 / cr0, 1 / cf, t]) for cf in cfs for t in TARGET_STARTS], free
        )
        corrections = int(
            np.count_nonzero(_accepted(theta, ev) & (_correction(theta, ev) >= CORRECTION_MIN_U))
        )
        lo, hi = _interval(ev, theta, free, seed)
    found = (
        f"inferred from {_count(meals, 'meal bolus', 'meal boluses')} and "
        f"{_count(corrections, 'correction', 'corrections')}"
    )

    def inferred(j: int) -> Setting:  # CR and CF from 1/CR and 1/CF
        return Setting(float(1 / theta[j]), "inferred", found, float(1 / hi[j]), float(1 / lo[j]))

    if cr_given is not None:
        cr = Setting(cr_given, "given", "given")
    elif meals >= MIN_MEAL_BOLUSES:
        cr = inferred(0)
    elif ratios.size:
        usable = "" if meals == ratios.size else f" ({meals} with CGM ≥ {LOW_MG_DL:g} mg/dL)"
        why = (
            f"{_count(ratios.size, 'meal bolus', 'meal boluses')}{usable}, {MIN_MEAL_BOLUSES} "
            "needed to infer"
        )
        cr = Setting(float(np.median(ratios)), "median", f"median carbs/bolus: {why}")
    else:
        why = f"no meal boluses, {MIN_MEAL_BOLUSES} needed to infer"
        cr = Setting(500.0 / tdi, "500 rule", f"500 rule: {why}")
    target = None
    if cf_given is not None:
        cf = Setting(cf_given, "given", "given")
    elif corrections >= MIN_CORRECTIONS:
        cf = inferred(1)
        target = Setting(float(theta[2]), "inferred", found, float(lo[2]), float(hi[2]))
    else:
        why = (
            f"{_count(corrections, 'correction', 'corrections')}, {MIN_CORRECTIONS} needed to infer"
        )
        cf = Setting(1800.0 / tdi, "1800 rule", f"1800 rule: {why}")
    return TherapySettings(
        basal_u_per_h=basal,
        carb_ratio_g_per_u=cr,
        correction_factor_mg_dl_per_u=cf,
        target_mg_dl=target,
        total_daily_insulin_u=tdi,
        meal_boluses=meals,
        corrections=corrections,
        standalone_corrections=int(np.count_nonzero(~meal)),
    )
