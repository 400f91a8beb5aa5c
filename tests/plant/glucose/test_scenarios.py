"""Tests of plant.glucose.scenarios: meal plans, carb-counting error, fixed and random scenarios."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import truncnorm

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.scenarios import (
    SCENARIOS,
    CarbCountingError,
    FixedMealSchedule,
    MealPlan,
    RandomDailyProtocol,
    scenario_a,
)

DAY = 1440


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- MealPlan ---------------------------------------------------------------------------------


def test_meal_plan_sorts_and_freezes() -> None:
    plan = MealPlan(np.array([300, 10, 300]), np.array([20.0, 5.0, 7.0]), np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(plan.start_min, [10, 300, 300])
    np.testing.assert_array_equal(plan.carbs_g, [5.0, 20.0, 7.0])  # stable for ties
    np.testing.assert_array_equal(plan.announced_g, [2.0, 1.0, 3.0])
    assert plan.start_min.dtype == np.int64
    assert plan.carbs_g.dtype == np.float64
    assert len(plan) == 3
    with pytest.raises(ValueError, match="read-only"):
        plan.carbs_g[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.carbs_g = np.zeros(3)  # type: ignore[misc]
    same = MealPlan(np.array([10, 300, 300]), np.array([5.0, 20.0, 7.0]), np.array([2.0, 1.0, 3.0]))
    assert plan == same
    assert plan != MealPlan.empty()


def test_to_minutes_adds_same_minute_and_drops_beyond_horizon() -> None:
    plan = MealPlan(
        np.array([0, 5, 5, 99, 100, 250]),
        np.array([10.0, 20.0, 7.0, 1.0, 30.0, 40.0]),
        np.array([11.0, 18.0, 7.0, 1.0, 33.0, 44.0]),
    )
    meal, announced = plan.to_minutes(100)
    assert meal.shape == announced.shape == (100,)
    assert meal[0] == 10.0 and meal[5] == 27.0 and meal[99] == 1.0
    assert announced[5] == 25.0
    assert meal.sum() == 38.0
    assert announced.sum() == 37.0
    empty_meal, empty_announced = MealPlan.empty().to_minutes(10)
    np.testing.assert_array_equal(empty_meal, np.zeros(10))
    np.testing.assert_array_equal(empty_announced, np.zeros(10))
    assert plan.to_minutes(0)[0].shape == (0,)
    with pytest.raises(InvalidInputError, match="n_minutes"):
        plan.to_minutes(-1)


@pytest.mark.parametrize(
    ("start", "carbs", "announced", "match"),
    [
        ([0, 1], [1.0], [1.0, 1.0], "lengths"),
        ([-5], [1.0], [1.0], "start_min"),
        ([1.5], [1.0], [1.0], "start_min"),
        ([0], [-1.0], [1.0], "carbs_g"),
        ([0], [1.0], [math.nan], "announced_g"),
        ([[0]], [[1.0]], [[1.0]], "1-D"),
    ],
)
def test_meal_plan_rejects_bad_arrays(
    start: list[float], carbs: list[float], announced: list[float], match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        MealPlan(np.array(start), np.array(carbs), np.array(announced))


# --- carb-counting error ----------------------------------------------------------------------


def test_no_counting_error_is_exact_and_draws_nothing() -> None:
    rng = _rng(0)
    carbs = np.array([45.0, 70.0])
    np.testing.assert_array_equal(CarbCountingError().announce(rng, carbs), carbs)
    assert rng.random() == _rng(0).random()


def test_uniform_counting_error_bounds() -> None:
    err = CarbCountingError("uniform", 0.3)
    carbs = np.full(20_000, 50.0)
    ratio = err.announce(_rng(1), carbs) / carbs
    assert ratio.min() >= 0.7 and ratio.max() <= 1.3
    assert ratio.min() < 0.705 and ratio.max() > 1.295  # the whole range is used
    assert abs(ratio.mean() - 1.0) < 0.01


def test_normal_counting_error_moments_and_clipping() -> None:
    carbs = np.full(20_000, 60.0)
    ratio = CarbCountingError("normal", 0.2).announce(_rng(2), carbs) / carbs
    assert abs(ratio.mean() - 1.0) < 0.01  # SE 0.0014
    assert ratio.std() == pytest.approx(0.2, rel=0.05)
    wide = CarbCountingError("normal", 2.0).announce(_rng(3), carbs)
    assert wide.min() == 0.0  # clipped, P(1 + r < 0) ≈ 0.31
    assert (wide == 0.0).mean() == pytest.approx(0.31, abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "gaussian"}, "kind"),
        ({"kind": "uniform", "magnitude": -0.1}, "magnitude"),
        ({"kind": "normal", "magnitude": math.inf}, "magnitude"),
        ({"kind": "none", "magnitude": 0.2}, "magnitude"),
    ],
)
def test_counting_error_bad_config(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CarbCountingError(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# --- fixed schedules --------------------------------------------------------------------------


def test_scenario_a_from_midnight() -> None:
    plan = scenario_a().sample(_rng(0), days=1)
    np.testing.assert_array_equal(plan.start_min, [420, 720, 1080])
    np.testing.assert_array_equal(plan.carbs_g, [45.0, 70.0, 80.0])
    np.testing.assert_array_equal(plan.announced_g, plan.carbs_g)
    meal, _ = plan.to_minutes(DAY)
    assert np.flatnonzero(meal).tolist() == [420, 720, 1080]


def test_scenario_a_from_six_am() -> None:
    plan = scenario_a().sample(_rng(0), days=1, start_min=360)
    np.testing.assert_array_equal(plan.start_min, [60, 360, 720])
    np.testing.assert_array_equal(plan.carbs_g, [45.0, 70.0, 80.0])
    two_days = scenario_a().sample(_rng(0), days=2, start_min=360)
    np.testing.assert_array_equal(two_days.start_min, [60, 360, 720, 1500, 1800, 2160])


def test_fixed_schedule_wraps_to_next_day_and_drops_earlier_meals() -> None:
    plan = scenario_a().sample(_rng(0), days=1, start_min=20 * 60)  # 20:00 → 20:00
    np.testing.assert_array_equal(plan.start_min, [660, 960, 1320])  # next day's meals
    plan = scenario_a().sample(_rng(0), days=1, start_min=12 * 60)  # lunch at minute 0
    np.testing.assert_array_equal(plan.start_min, [0, 360, 1140])
    np.testing.assert_array_equal(plan.carbs_g, [70.0, 80.0, 45.0])


def test_fixed_schedule_once() -> None:
    sched = FixedMealSchedule(meals=((1860, 30.0), (60, 10.0)), repeat_daily=False)
    plan = sched.sample(_rng(0), days=3)
    np.testing.assert_array_equal(plan.start_min, [60, 1860])
    np.testing.assert_array_equal(plan.carbs_g, [10.0, 30.0])
    assert len(sched.sample(_rng(0), days=1)) == 1


def test_fixed_schedule_counting_error_deterministic() -> None:
    sched = scenario_a(carb_error=CarbCountingError("uniform", 0.2))
    a = sched.sample(_rng(5), days=3)
    b = sched.sample(_rng(5), days=3)
    c = sched.sample(_rng(6), days=3)
    assert a == b
    assert a != c
    np.testing.assert_array_equal(a.carbs_g, np.tile([45.0, 70.0, 80.0], 3))
    ratio = a.announced_g / a.carbs_g
    assert np.all((ratio >= 0.8) & (ratio <= 1.2))
    assert np.all(ratio != 1.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"meals": ((1440, 10.0),)}, "meals[0][0]"),
        ({"meals": ((-1, 10.0),)}, "meals[0][0]"),
        ({"meals": ((420.5, 10.0),)}, "meals[0][0]"),
        ({"meals": ((420, 10.0), (600, -5.0))}, "meals[1][1]"),
        ({"meals": ((420, 10.0, 3.0),)}, "meals[0]"),
        ({"meals": ((420, 10.0),), "repeat_daily": "yes"}, "repeat_daily"),
        ({"meals": ((420, 10.0),), "carb_error": 0.1}, "carb_error"),
    ],
)
def test_fixed_schedule_bad_config(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        FixedMealSchedule(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"days": 0}, "days"),
        ({"days": 1.5}, "days"),
        ({"days": 1, "start_min": 1440}, "start_min"),
        ({"days": 1, "start_min": -1}, "start_min"),
    ],
)
def test_bad_run_arguments(kwargs: dict[str, object], field: str) -> None:
    for scenario in (scenario_a(), RandomDailyProtocol()):
        with pytest.raises(ConfigError) as info:
            scenario.sample(_rng(0), **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field


# --- random daily protocol --------------------------------------------------------------------


def test_random_protocol_defaults_are_simglucose() -> None:
    p = RandomDailyProtocol()
    assert p.probabilities == (0.95, 0.3, 0.95, 0.3, 0.95, 0.3)
    assert p.time_lb_h == (5.0, 9.0, 10.0, 14.0, 16.0, 20.0)
    assert p.time_ub_h == (9.0, 10.0, 14.0, 16.0, 20.0, 23.0)
    assert p.time_mean_h == (7.0, 9.5, 12.0, 15.0, 18.0, 21.5)
    assert p.time_sd_min == (60.0, 30.0, 60.0, 30.0, 60.0, 30.0)
    assert p.amount_mean_g == (45.0, 10.0, 70.0, 10.0, 80.0, 10.0)
    assert p.amount_sd_g == (10.0, 5.0, 10.0, 5.0, 10.0, 5.0)
    assert p.n_slots == 6


def test_random_protocol_determinism() -> None:
    p = RandomDailyProtocol()
    a = p.sample(_rng(42), days=7)
    assert a == p.sample(_rng(42), days=7)
    assert a != p.sample(_rng(43), days=7)
    assert len(a) > 0


@pytest.mark.parametrize("start_min", [0, 360])
def test_random_protocol_longer_run_extends_shorter(start_min: int) -> None:
    p = RandomDailyProtocol()
    short = p.sample(_rng(9), days=2, start_min=start_min)
    long = p.sample(_rng(9), days=5, start_min=start_min)
    head = long.start_min < 2 * DAY
    np.testing.assert_array_equal(long.start_min[head], short.start_min)
    np.testing.assert_array_equal(long.carbs_g[head], short.carbs_g)


def test_random_protocol_start_min_shifts_clock() -> None:
    p = RandomDailyProtocol()
    from_six = p.sample(_rng(12), days=1, start_min=360)
    from_midnight = p.sample(_rng(12), days=2, start_min=0)
    window = (from_midnight.start_min >= 360) & (from_midnight.start_min < 360 + DAY)
    np.testing.assert_array_equal(from_six.start_min, from_midnight.start_min[window] - 360)
    np.testing.assert_array_equal(from_six.carbs_g, from_midnight.carbs_g[window])


def test_random_protocol_daily_totals() -> None:
    days = 3000
    plan = RandomDailyProtocol().sample(_rng(2025), days=days)
    assert np.all((plan.start_min >= 0) & (plan.start_min < days * DAY))
    assert np.all(np.diff(plan.start_min) >= 0)
    # Meals per day: Σp = 3.75, per-day SD √Σp(1−p) ≈ 0.88 → SE ≈ 0.016.
    assert len(plan) / days == pytest.approx(3.75, abs=0.08)
    np.testing.assert_array_equal(plan.announced_g, plan.carbs_g)
    np.testing.assert_array_equal(plan.carbs_g, np.round(plan.carbs_g))
    assert plan.carbs_g.min() >= 0.0


@pytest.mark.parametrize("slot", range(6))
def test_random_protocol_slot_statistics(slot: int) -> None:
    """Isolate one slot (others at probability 0: the draws are the same) over many days."""
    default = RandomDailyProtocol()
    probabilities = tuple(p if j == slot else 0.0 for j, p in enumerate(default.probabilities))
    proto = dataclasses.replace(default, probabilities=probabilities)
    days = 4000
    plan = proto.sample(_rng(100 + slot), days=days)
    p = default.probabilities[slot]
    assert len(plan) / days == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / days))
    assert np.all(np.bincount(plan.start_min // DAY, minlength=days) <= 1)

    clock = plan.start_min % DAY
    lb, ub = 60 * default.time_lb_h[slot], 60 * default.time_ub_h[slot]
    assert clock.min() >= lb and clock.max() <= ub
    mean, sd = 60 * default.time_mean_h[slot], default.time_sd_min[slot]
    dist = truncnorm((lb - mean) / sd, (ub - mean) / sd, loc=mean, scale=sd)
    assert clock.mean() == pytest.approx(dist.mean(), abs=5 * dist.std() / math.sqrt(len(plan)))
    assert clock.std() == pytest.approx(dist.std(), rel=0.1)

    amount_mean, amount_sd = default.amount_mean_g[slot], default.amount_sd_g[slot]
    # Rounding/flooring moves the mean by < 0.01 g for these parameters.
    tol = 5 * amount_sd / math.sqrt(len(plan)) + 0.01
    assert plan.carbs_g.mean() == pytest.approx(amount_mean, abs=tol)
    assert plan.carbs_g.std() == pytest.approx(amount_sd, rel=0.1)


def test_random_protocol_counting_error() -> None:
    proto = RandomDailyProtocol(carb_error=CarbCountingError("uniform", 0.25))
    plan = proto.sample(_rng(77), days=200)
    positive = plan.carbs_g > 0
    ratio = plan.announced_g[positive] / plan.carbs_g[positive]
    assert np.all((ratio >= 0.75) & (ratio <= 1.25))
    assert ratio.std() > 0.1
    assert np.all(plan.announced_g[~positive] == 0.0)
    # The meals themselves do not depend on the counting error (its draws come last each day).
    exact = RandomDailyProtocol().sample(_rng(77), days=1)
    one_day = proto.sample(_rng(77), days=1)
    np.testing.assert_array_equal(exact.start_min, one_day.start_min)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"probabilities": (0.95, 0.3)}, "probabilities"),
        ({"slot_names": ()}, "slot_names"),
        ({"probabilities": (0.95, 1.3, 0.95, 0.3, 0.95, 0.3)}, "probabilities[1]"),
        ({"time_lb_h": (5.0, 9.0, 10.0, 14.0, 16.0, -1.0)}, "time_lb_h[5]"),
        ({"time_ub_h": (4.0, 10.0, 14.0, 16.0, 20.0, 23.0)}, "time_ub_h[0]"),
        ({"time_ub_h": (9.0, 10.0, 14.0, 16.0, 20.0, 25.0)}, "time_ub_h[5]"),
        ({"time_mean_h": (4.0, 9.5, 12.0, 15.0, 18.0, 21.5)}, "time_mean_h[0]"),
        ({"time_sd_min": (60.0, 30.0, 0.0, 30.0, 60.0, 30.0)}, "time_sd_min[2]"),
        ({"amount_mean_g": (45.0, 10.0, 70.0, 10.0, -80.0, 10.0)}, "amount_mean_g[4]"),
        ({"amount_sd_g": (10.0, 5.0, 10.0, -5.0, 10.0, 5.0)}, "amount_sd_g[3]"),
        ({"amount_sd_g": (10.0, 5.0, 10.0, math.nan, 10.0, 5.0)}, "amount_sd_g"),
        ({"carb_error": "uniform"}, "carb_error"),
    ],
)
def test_random_protocol_bad_config(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        RandomDailyProtocol(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_scenarios_registry() -> None:
    assert set(SCENARIOS) == {"A", "random"}
    for name, factory in SCENARIOS.items():
        plan = factory().sample(_rng(1), days=1, start_min=0)
        assert isinstance(plan, MealPlan), name
    assert SCENARIOS["A"]() == scenario_a()


@pytest.mark.parametrize("start_min", [0, 450])
@pytest.mark.parametrize(
    "scenario",
    [
        RandomDailyProtocol(carb_error=CarbCountingError("uniform", 0.3)),
        scenario_a(carb_error=CarbCountingError("normal", 0.2)),
    ],
    ids=["random", "A"],
)
def test_sample_many_rows_equal_single_samples(scenario, start_min: int) -> None:
    seeds = [3, 4, 5, 6]
    batch = scenario.sample_many(
        [np.random.default_rng(s) for s in seeds], days=3, start_min=start_min
    )
    assert batch.start_min.shape[0] == len(seeds)
    for i, s in enumerate(seeds):
        single = scenario.sample(np.random.default_rng(s), days=3, start_min=start_min)
        assert batch.plan(i) == single
        assert len(single) > 0
