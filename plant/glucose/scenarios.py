"""Meal scenarios: fixed daily schedules and the random daily protocol, as minute-indexed plans.

A scenario is a frozen dataclass with ``sample(rng, *, days, start_min=0) -> MealPlan``. The run
covers ``days`` × 1440 minutes; its minute 0 is at clock time ``start_min`` (minutes after
midnight), so meals placed at clock times land at ``clock − start_min`` (+ 1440 per day) in
run minutes. Meals before the start or at/after the end of the run are dropped.

The plan holds, per meal, the grams actually eaten (``carbs_g``) and the grams the patient
counts and announces to the controller (``announced_g``); the two differ by a
:class:`CarbCountingError`. :meth:`MealPlan.to_minutes` turns a plan into the per-minute meal
input taken by :func:`twinloop.plant.glucose.uva_padova.simulate` (grams starting at a minute).

The random protocol is the one of simglucose's ``RandomScenario`` (also used by GluCoEnv):
six meal slots, each taken with a probability, at a truncated-normal time within the slot's
bounds, with a normal amount. See :class:`RandomDailyProtocol` for the details kept and the
choices made.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import ndtr, ndtri

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.units import MIN_PER_DAY

CarbErrorKind = Literal["none", "uniform", "normal"]
_CARB_ERROR_KINDS: tuple[str, ...] = ("none", "uniform", "normal")


def _readonly(a: NDArray[np.generic]) -> None:
    a.flags.writeable = False


#: Largest carb-counting error magnitude (a fraction: the uniform half-width or the normal SD).
MAX_CARB_ERROR = 10.0


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class MealPlan:
    """Meals of one run, in run minutes, sorted by start (ties keep their given order).

    The arrays are converted, validated, sorted (stably, by ``start_min``) and made read-only
    at construction. Two plans compare equal when their arrays are equal.

    Attributes:
        start_min: start of each meal, minutes since the run's minute 0 (int64, >= 0).
        carbs_g: carbohydrate actually eaten, g (float64, finite, >= 0).
        announced_g: carbohydrate the patient counts/announces, g (float64, finite, >= 0):
            ``carbs_g × (1 + counting error)``.

    Raises:
        InvalidInputError: arrays not 1-D, of different lengths, with non-integral or negative
            start minutes, or negative / non-finite grams.

    """

    start_min: NDArray[np.int64]
    carbs_g: NDArray[np.float64]
    announced_g: NDArray[np.float64]

    def __post_init__(self) -> None:
        raw_start = np.asarray(self.start_min)
        carbs = np.array(self.carbs_g, dtype=np.float64)
        announced = np.array(self.announced_g, dtype=np.float64)
        if raw_start.ndim != 1 or carbs.ndim != 1 or announced.ndim != 1:
            raise InvalidInputError(
                f"start_min, carbs_g, announced_g: expected 1-D arrays, got shapes "
                f"{raw_start.shape}, {carbs.shape}, {announced.shape}"
            )
        if not raw_start.shape == carbs.shape == announced.shape:
            raise InvalidInputError(
                f"start_min, carbs_g, announced_g: lengths differ ({raw_start.shape[0]}, "
                f"{carbs.shape[0]}, {announced.shape[0]})"
            )
        if raw_start.size and (
            not np.isfinite(raw_start.astype(np.float64)).all()
            or (raw_start != np.round(raw_start)).any()
            or (raw_start < 0).any()
        ):
            raise InvalidInputError("start_min: must be whole minutes >= 0")
        start = raw_start.astype(np.int64)
        for name, arr in (("carbs_g", carbs), ("announced_g", announced)):
            if not np.isfinite(arr).all() or (arr < 0.0).any():
                raise InvalidInputError(f"{name}: must be finite and >= 0 g")
        order = np.argsort(start, kind="stable")
        sorted_arrays: tuple[tuple[str, NDArray[np.generic]], ...] = (
            ("start_min", start[order]),
            ("carbs_g", carbs[order]),
            ("announced_g", announced[order]),
        )
        for name, sorted_arr in sorted_arrays:
            _readonly(sorted_arr)
            object.__setattr__(self, name, sorted_arr)

    @classmethod
    def empty(cls) -> MealPlan:
        """Return a plan with no meals."""
        return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return int(self.start_min.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MealPlan):
            return NotImplemented
        return (
            np.array_equal(self.start_min, other.start_min)
            and np.array_equal(self.carbs_g, other.carbs_g)
            and np.array_equal(self.announced_g, other.announced_g)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking array fields: unhashable

    def to_minutes(self, n_minutes: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Spread the plan over a horizon of ``n_minutes`` minutes.

        Args:
            n_minutes: horizon length, minutes (>= 0).

        Returns:
            ``(meal_g, announced_g)``, each of shape ``(n_minutes,)``: grams eaten / announced
            starting at each minute. Meals starting at the same minute add up; meals starting at
            or after ``n_minutes`` are dropped.

        Raises:
            InvalidInputError: ``n_minutes`` is not an int >= 0.

        """
        if isinstance(n_minutes, bool) or not isinstance(n_minutes, int | np.integer):
            raise InvalidInputError(f"n_minutes={n_minutes!r}: must be an int >= 0")
        if n_minutes < 0:
            raise InvalidInputError(f"n_minutes={n_minutes!r}: must be an int >= 0")
        keep = self.start_min < n_minutes
        idx = self.start_min[keep]
        meal = np.bincount(idx, weights=self.carbs_g[keep], minlength=int(n_minutes))
        announced = np.bincount(idx, weights=self.announced_g[keep], minlength=int(n_minutes))
        return meal.astype(np.float64), announced.astype(np.float64)


@dataclasses.dataclass(frozen=True, slots=True)
class CarbCountingError:
    """How far the grams a patient announces are from the grams eaten (relative error).

    ``announced = max(0, carbs × (1 + r))`` with ``r = 0`` (``kind="none"``),
    ``r ~ U(−magnitude, +magnitude)`` (``"uniform"``) or ``r ~ N(0, magnitude²)``
    (``"normal"``), one independent ``r`` per meal.

    Attributes:
        kind: ``"none"``, ``"uniform"`` or ``"normal"``.
        magnitude: half-width (uniform) or standard deviation (normal) of the relative error,
            a fraction (0.2 = 20 %); >= 0, and 0 when ``kind="none"``.

    Raises:
        ConfigError: unknown ``kind`` or an invalid ``magnitude``.

    """

    kind: CarbErrorKind = "none"
    magnitude: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _CARB_ERROR_KINDS:
            raise ConfigError("kind", self.kind, f"one of {', '.join(_CARB_ERROR_KINDS)}")
        m = self.magnitude
        if (
            isinstance(m, bool)
            or not isinstance(m, int | float | np.integer | np.floating)
            or not math.isfinite(float(m))
            or not 0 <= m <= MAX_CARB_ERROR
        ):
            raise ConfigError("magnitude", m, f"a finite fraction >= 0 and <= {MAX_CARB_ERROR:g}")
        if self.kind == "none" and m != 0:
            raise ConfigError("magnitude", m, "0 when kind='none'")
        object.__setattr__(self, "magnitude", float(m))

    def factors(self, rng: np.random.Generator, shape: tuple[int, ...]) -> NDArray[np.float64]:
        """Draw multiplicative counting factors ``1 + r`` of the given shape (none for "none").

        Args:
            rng: source of the counting errors.
            shape: shape of the factors (one per meal).

        Returns:
            Factors (announced = max(eaten × factor, 0)).

        """
        if self.kind == "none":
            return np.ones(shape)
        if self.kind == "uniform":
            r = rng.uniform(-self.magnitude, self.magnitude, size=shape)
        else:
            r = rng.normal(0.0, self.magnitude, size=shape)
        out: NDArray[np.float64] = 1.0 + r
        return out

    def announce(self, rng: np.random.Generator, carbs_g: ArrayLike) -> NDArray[np.float64]:
        """Return the announced grams for meals of ``carbs_g`` grams.

        Draws ``carbs_g.size`` values from ``rng`` (none when ``kind="none"``).

        Args:
            rng: source of the counting errors.
            carbs_g: grams eaten, any shape.

        Returns:
            Announced grams (>= 0), same shape.

        """
        carbs = np.asarray(carbs_g, dtype=np.float64)
        out: NDArray[np.float64] = np.maximum(carbs * self.factors(rng, carbs.shape), 0.0)
        return out


#: Start minute of the padding slots of a :class:`MealBatch` (never reached by a run).
NO_MEAL = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class MealBatch:
    """Meal plans of N runs, padded to one width ``M`` (sorted by start within each row).

    Attributes:
        start_min: ``(N, M)`` run minutes; padding slots hold :data:`NO_MEAL`.
        carbs_g: ``(N, M)`` grams eaten; 0 in padding slots.
        announced_g: ``(N, M)`` grams announced; 0 in padding slots.

    """

    start_min: NDArray[np.int64]
    carbs_g: NDArray[np.float64]
    announced_g: NDArray[np.float64]

    def plan(self, i: int) -> MealPlan:
        """Row ``i`` as a :class:`MealPlan`."""
        real = self.start_min[i] != NO_MEAL
        return MealPlan(self.start_min[i][real], self.carbs_g[i][real], self.announced_g[i][real])


def _pack(
    rel: NDArray[np.int64], keep: NDArray[np.bool_], grams: NDArray[np.float64],
    announced: NDArray[np.float64],
) -> MealBatch:  # fmt: skip
    """Pack ``(N, K)`` candidate meals, ``keep`` selecting the real ones, into a MealBatch."""
    n = rel.shape[0]
    key = np.where(keep, rel, NO_MEAL).reshape(n, -1)
    order = np.argsort(key, axis=1, kind="stable")
    width = int(keep.reshape(n, -1).sum(axis=1).max(initial=0))
    order = order[:, :width]
    start = np.take_along_axis(key, order, axis=1)
    pad = start == NO_MEAL
    g = np.where(pad, 0.0, np.take_along_axis(grams.reshape(n, -1), order, axis=1))
    a = np.where(pad, 0.0, np.take_along_axis(announced.reshape(n, -1), order, axis=1))
    return MealBatch(start, g, a)


class MealScenario(Protocol):
    """What every scenario provides: a plan of meals for a run."""

    def sample(self, rng: np.random.Generator, *, days: int, start_min: int = 0) -> MealPlan:
        """Draw the meals of a run of ``days`` days starting at clock minute ``start_min``."""
        ...

    def sample_many(
        self, rngs: Sequence[np.random.Generator], *, days: int, start_min: int = 0
    ) -> MealBatch:
        """``sample`` for several runs at once: row ``i`` equals ``sample(rngs[i], ...)``."""
        ...


#: Most days a scenario is drawn for (a hundred years; a run's own limit is lower).
MAX_SCENARIO_DAYS = 36_500


def _check_run(days: int, start_min: int) -> None:
    if (
        isinstance(days, bool)
        or not isinstance(days, int | np.integer)
        or not 1 <= days <= MAX_SCENARIO_DAYS
    ):
        raise ConfigError("days", days, f"an int from 1 to {MAX_SCENARIO_DAYS}")
    if (
        isinstance(start_min, bool)
        or not isinstance(start_min, int | np.integer)
        or not 0 <= start_min < MIN_PER_DAY
    ):
        raise ConfigError("start_min", start_min, "an int clock minute in [0, 1440)")


def _days_drawn(days: int, start_min: int) -> int:
    """Calendar days the run touches: one more than ``days`` when it does not start at 00:00."""
    return int(days) + (1 if start_min > 0 else 0)


@dataclasses.dataclass(frozen=True, slots=True)
class FixedMealSchedule:
    """Meals at fixed clock times with fixed amounts (the same every day by default).

    Attributes:
        meals: ``(clock_min, grams)`` pairs; ``clock_min`` is a whole number of minutes after
            midnight, in ``[0, 1440)`` when ``repeat_daily``, else ``>= 0`` counted from
            midnight of the run's first day (so 1860 = 07:00 on day 2); grams finite, >= 0.
        repeat_daily: repeat the meals every day of the run.
        carb_error: counting error applied to each meal.

    Raises:
        ConfigError: a malformed meal, a time outside the allowed range or negative grams.

    """

    meals: tuple[tuple[float, float], ...]
    repeat_daily: bool = True
    carb_error: CarbCountingError = CarbCountingError()

    def __post_init__(self) -> None:
        if not isinstance(self.repeat_daily, bool | np.bool_):
            raise ConfigError("repeat_daily", self.repeat_daily, "True or False")
        if not isinstance(self.carb_error, CarbCountingError):
            raise ConfigError("carb_error", self.carb_error, "a CarbCountingError")
        upper = MIN_PER_DAY if self.repeat_daily else math.inf
        meals: list[tuple[float, float]] = []
        for i, meal in enumerate(self.meals):
            try:
                clock, grams = (float(v) for v in meal)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"meals[{i}]", meal, "a (clock_min, grams) pair of numbers"
                ) from None
            if not (math.isfinite(clock) and clock == round(clock) and 0 <= clock < upper):
                allowed = "[0, 1440)" if self.repeat_daily else ">= 0"
                raise ConfigError(f"meals[{i}][0]", meal[0], f"a whole clock minute {allowed}")
            if not (math.isfinite(grams) and grams >= 0.0):
                raise ConfigError(f"meals[{i}][1]", meal[1], "finite grams >= 0")
            meals.append((clock, grams))
        object.__setattr__(self, "meals", tuple(meals))
        object.__setattr__(self, "repeat_daily", bool(self.repeat_daily))

    def sample(self, rng: np.random.Generator, *, days: int, start_min: int = 0) -> MealPlan:
        """Place the meals in a run of ``days`` days whose minute 0 is clock ``start_min``.

        Only the counting error draws from ``rng`` (one draw per meal kept, in time order).

        Args:
            rng: source of the counting errors.
            days: length of the run, days (>= 1).
            start_min: clock time of minute 0, minutes after midnight, in ``[0, 1440)``.

        Returns:
            The plan, in run minutes.

        Raises:
            ConfigError: ``days`` or ``start_min`` out of range.

        """
        return self.sample_many([rng], days=days, start_min=start_min).plan(0)

    def sample_many(
        self, rngs: Sequence[np.random.Generator], *, days: int, start_min: int = 0
    ) -> MealBatch:
        """Plans of ``len(rngs)`` runs; row ``i`` draws its counting errors from ``rngs[i]``."""
        _check_run(days, start_min)
        clock = np.array([m[0] for m in self.meals], dtype=np.int64)
        grams = np.array([m[1] for m in self.meals], dtype=np.float64)
        if self.repeat_daily:
            offsets = MIN_PER_DAY * np.arange(_days_drawn(days, start_min), dtype=np.int64)
            clock = (offsets[:, np.newaxis] + clock[np.newaxis, :]).ravel()
            grams = np.tile(grams, offsets.shape[0])
        rel = clock - start_min
        keep = (rel >= 0) & (rel < days * MIN_PER_DAY)
        order = np.argsort(rel[keep], kind="stable")
        rel, grams = rel[keep][order], grams[keep][order]
        n = len(rngs)
        factors = np.ones((n, rel.shape[0]))
        for i, rng in enumerate(rngs):  # one draw per kept meal, in time order
            factors[i] = self.carb_error.factors(rng, rel.shape)
        announced = np.maximum(grams * factors, 0.0)
        return MealBatch(np.tile(rel, (n, 1)), np.tile(grams, (n, 1)), announced)


def scenario_a(*, carb_error: CarbCountingError | None = None) -> FixedMealSchedule:
    """Return scenario A: 07:00 45 g, 12:00 70 g, 18:00 80 g, every day.

    This is the scenario of the simglucose reference trajectories.

    Args:
        carb_error: counting error; ``None`` means exact counting.

    """
    return FixedMealSchedule(
        meals=((7 * 60, 45.0), (12 * 60, 70.0), (18 * 60, 80.0)),
        repeat_daily=True,
        carb_error=CarbCountingError() if carb_error is None else carb_error,
    )


def _float_tuple(field: str, values: object) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ConfigError(field, values, "a tuple of finite numbers") from None
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(field, values, "a tuple of finite numbers")
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class RandomDailyProtocol:
    """The random daily meal protocol of simglucose's ``RandomScenario`` (and GluCoEnv).

    Each day, slot ``j`` is taken with probability ``probabilities[j]``; its time is a normal of
    mean ``time_mean_h[j]`` and SD ``time_sd_min[j]`` truncated to
    ``[time_lb_h[j], time_ub_h[j]]`` and rounded to the minute; its amount is
    ``max(0, round(N(amount_mean_g[j], amount_sd_g[j]²)))`` grams. As in simglucose, negative
    amounts are floored to 0 (not resampled), and a slot drawn as taken stays in the plan even
    if its amount rounds to 0 g, so the slot probabilities are exactly ``probabilities``. Slots
    are independent, so two meals may fall on the same minute (their grams then add up in
    :meth:`MealPlan.to_minutes`).

    Drawing (vectorised over slots, one day at a time, calendar day by calendar day from
    midnight of the first day): ``n_slots`` uniforms (taken or not), ``n_slots`` uniforms
    turned into truncated-normal times by exact inversion of the CDF (``scipy.special.ndtri``;
    the same distribution as simglucose's ``scipy.stats.truncnorm``, about ten times faster,
    but not the same random stream), ``n_slots`` normals (amounts), then the counting errors
    of the ``n_slots`` amounts. Every slot is drawn whether taken or
    not, so a day's meals do not depend on ``days``: a longer run with the same seed and
    ``start_min`` extends a shorter one. Multi-day runs concatenate the days.

    Attributes:
        slot_names: a name per slot (documentation and reports).
        probabilities: probability that the slot's meal is eaten on a given day, in [0, 1].
        time_lb_h: earliest clock time of the slot, hours after midnight, in [0, 24).
        time_ub_h: latest clock time, hours; ``time_lb_h < time_ub_h <= 24``.
        time_mean_h: mean clock time, hours, within the bounds.
        time_sd_min: SD of the clock time before truncation, minutes; > 0.
        amount_mean_g: mean amount, g; >= 0.
        amount_sd_g: SD of the amount, g; >= 0.
        carb_error: counting error applied to each meal.

    Raises:
        ConfigError: lengths that disagree, or a value out of range (the field is named).

    """

    slot_names: tuple[str, ...] = (
        "breakfast",
        "morning_snack",
        "lunch",
        "afternoon_snack",
        "dinner",
        "evening_snack",
    )
    probabilities: tuple[float, ...] = (0.95, 0.3, 0.95, 0.3, 0.95, 0.3)
    time_lb_h: tuple[float, ...] = (5.0, 9.0, 10.0, 14.0, 16.0, 20.0)
    time_ub_h: tuple[float, ...] = (9.0, 10.0, 14.0, 16.0, 20.0, 23.0)
    time_mean_h: tuple[float, ...] = (7.0, 9.5, 12.0, 15.0, 18.0, 21.5)
    time_sd_min: tuple[float, ...] = (60.0, 30.0, 60.0, 30.0, 60.0, 30.0)
    amount_mean_g: tuple[float, ...] = (45.0, 10.0, 70.0, 10.0, 80.0, 10.0)
    amount_sd_g: tuple[float, ...] = (10.0, 5.0, 10.0, 5.0, 10.0, 5.0)
    carb_error: CarbCountingError = CarbCountingError()

    def __post_init__(self) -> None:
        names = tuple(str(s) for s in self.slot_names)
        if not names:
            raise ConfigError("slot_names", self.slot_names, "at least one slot")
        object.__setattr__(self, "slot_names", names)
        n = len(names)
        fields = (
            "probabilities",
            "time_lb_h",
            "time_ub_h",
            "time_mean_h",
            "time_sd_min",
            "amount_mean_g",
            "amount_sd_g",
        )
        for name in fields:
            values = _float_tuple(name, getattr(self, name))
            if len(values) != n:
                raise ConfigError(name, values, f"{n} values, one per slot of slot_names")
            object.__setattr__(self, name, values)
        for j in range(n):
            p = self.probabilities[j]
            lb, ub, mu = self.time_lb_h[j], self.time_ub_h[j], self.time_mean_h[j]
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"probabilities[{j}]", p, "a probability in [0, 1]")
            if not 0.0 <= lb < 24.0:
                raise ConfigError(f"time_lb_h[{j}]", lb, "hours in [0, 24)")
            if not lb < ub <= 24.0:
                raise ConfigError(f"time_ub_h[{j}]", ub, f"hours in (time_lb_h[{j}]={lb}, 24]")
            if not lb <= mu <= ub:
                raise ConfigError(f"time_mean_h[{j}]", mu, f"hours in [{lb}, {ub}]")
            if not self.time_sd_min[j] > 0.0:
                raise ConfigError(f"time_sd_min[{j}]", self.time_sd_min[j], "minutes > 0")
            if not self.amount_mean_g[j] >= 0.0:
                raise ConfigError(f"amount_mean_g[{j}]", self.amount_mean_g[j], "grams >= 0")
            if not self.amount_sd_g[j] >= 0.0:
                raise ConfigError(f"amount_sd_g[{j}]", self.amount_sd_g[j], "grams >= 0")
        if not isinstance(self.carb_error, CarbCountingError):
            raise ConfigError("carb_error", self.carb_error, "a CarbCountingError")

    @property
    def n_slots(self) -> int:
        """Number of meal slots per day."""
        return len(self.slot_names)

    def sample(self, rng: np.random.Generator, *, days: int, start_min: int = 0) -> MealPlan:
        """Draw the meals of a run of ``days`` days whose minute 0 is clock ``start_min``.

        Args:
            rng: source of all the draws.
            days: length of the run, days (>= 1).
            start_min: clock time of minute 0, minutes after midnight, in ``[0, 1440)``.

        Returns:
            The plan, in run minutes.

        Raises:
            ConfigError: ``days`` or ``start_min`` out of range.

        """
        return self.sample_many([rng], days=days, start_min=start_min).plan(0)

    def sample_many(
        self, rngs: Sequence[np.random.Generator], *, days: int, start_min: int = 0
    ) -> MealBatch:
        """Plans of ``len(rngs)`` runs; row ``i`` draws only from ``rngs[i]``.

        Each generator is called three times per calendar day (slot uniforms, standard normals of
        the amounts, counting factors); the transforms are vectorised over runs and days.
        """
        _check_run(days, start_min)
        prob = np.array(self.probabilities)
        mean_min = 60.0 * np.array(self.time_mean_h)
        sd_min = np.array(self.time_sd_min)
        lb_min, ub_min = 60.0 * np.array(self.time_lb_h), 60.0 * np.array(self.time_ub_h)
        # Truncated normal by inversion: u ~ U(Φ(a), Φ(b)), t = mean + sd·Φ⁻¹(u). The interval
        # always contains the mean (validated), so Φ(a) and Φ(b) are not both in one far tail.
        cdf_lo = ndtr((lb_min - mean_min) / sd_min)
        cdf_width = ndtr((ub_min - mean_min) / sd_min) - cdf_lo
        amount_mean, amount_sd = np.array(self.amount_mean_g), np.array(self.amount_sd_g)
        n_days = _days_drawn(days, start_min)
        k = self.n_slots
        n = len(rngs)
        u = np.empty((n, n_days, 2, k))
        z = np.empty((n, n_days, k))
        factors = np.empty((n, n_days, k))
        for i, rng in enumerate(rngs):  # day by day, so a longer run extends a shorter one
            for d in range(n_days):
                u[i, d] = rng.random((2, k))
                z[i, d] = rng.standard_normal(k)
                factors[i, d] = self.carb_error.factors(rng, (k,))
        taken = u[:, :, 0, :] < prob
        t = mean_min + sd_min * ndtri(cdf_lo + cdf_width * u[:, :, 1, :])
        t = np.clip(t, lb_min, ub_min)  # guards the round-off of the inversion
        day = MIN_PER_DAY * np.arange(n_days, dtype=np.int64)[np.newaxis, :, np.newaxis]
        rel = day + np.round(t).astype(np.int64) - start_min
        grams = np.maximum(np.round(amount_mean + amount_sd * z), 0.0)
        announced = np.maximum(grams * factors, 0.0)
        keep = taken & (rel >= 0) & (rel < days * MIN_PER_DAY)
        return _pack(rel, keep, grams, announced)


#: Scenario factories by name, for the command line (each builds the default configuration).
SCENARIOS: dict[str, Callable[..., MealScenario]] = {
    "A": scenario_a,
    "random": RandomDailyProtocol,
}
