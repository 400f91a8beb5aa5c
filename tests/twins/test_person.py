"""Twins from logs: the closed-loop replay, therapies, rescues, synthetic logs, the CLI, Ray."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinloop.agents.glucose.estimator import TwinEstimator
from twinloop.cli.twin import _fit_text, cgm_line
from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.patients import get_patient, initial_states, parameter_matrix
from twinloop.plant.glucose.scenarios import CarbCountingError
from twinloop.plant.glucose.twin_model import read_twin, write_twin
from twinloop.plant.glucose.uva_padova import simulate
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.interface import ControllerInput, Dose, TwinPlanState
from twinloop.twins.identify import log_grid
from twinloop.twins.logs import read_log
from twinloop.twins.person import (
    TWIN_GLUCOSE_MEANING,
    FitRequest,
    ReplayTherapy,
    _planning_estimators,
    cgm_metrics,
    filtered_start,
    fit_log,
    fit_many,
    replay,
    replay_models,
    run_therapy,
    therapy_from_log,
    trajectory_table,
)
from twinloop.twins.replay import LoggedTherapy, RescueRule, closed_loop, filter_log
from twinloop.twins.synthetic import synthetic_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adult_log(tmp_path_factory):
    """Four days of adult#003 on basal-bolus therapy, and the CSV log of them."""
    syn = synthetic_log(get_patient("adult#003"), days=4, seed=5)
    path = syn.write(tmp_path_factory.mktemp("logs") / "adult003.csv")
    return syn, path


@pytest.fixture(scope="module")
def twin(adult_log):
    _, path = adult_log
    fit, _, checked = fit_log(
        FitRequest((str(path),), name="a3", fit_days=3, validate_days=1, posterior=True)
    )
    return fit, checked


def _obs(t: float, g: float = 150.0, iob: float = 0.0, carbs: float = 0.0) -> ControllerInput:
    return ControllerInput(t, g, 0.0, iob, carbs)


def test_the_logged_therapy_in_closed_loop_is_the_open_loop_replay_of_the_log():
    p = get_patient("adult#001")
    k = 600
    basal = np.repeat(np.array([1.0, 1.5, 0.5, 1.2]), k // 4)
    bolus = np.zeros(k)
    carbs = np.zeros(k)
    bolus[[60, 300]] = [4.0, 2.0]
    carbs[[60, 300]] = [50.0, 20.0]
    therapy = LoggedTherapy(
        basal, bolus, carbs, carb_ratio_g_per_u=10.0, correction_factor_mg_dl_per_u=40.0
    )
    trace = closed_loop(
        parameter_matrix([p]), initial_states([p]), [therapy], meal_g=carbs, announced_g=carbs,
        scheduled_basal_u_per_h=np.array([1.0]),
    )  # fmt: skip
    direct = simulate([p], basal / 60 + bolus, carbs)
    np.testing.assert_allclose(trace.gsub_mg_dl[0], direct.gsub_mg_dl[0], rtol=1e-12)
    np.testing.assert_allclose(trace.bg_mg_dl[0], direct.bg_mg_dl[0], rtol=1e-12)
    assert trace.rescues.tolist() == [0]


def test_changed_settings_recompute_meal_boluses_and_scale_corrections():
    k = 120
    basal = np.full(k, 1.0)
    bolus = np.zeros(k)
    carbs = np.zeros(k)
    carbs[10], bolus[10] = 60.0, 6.0  # meal bolus at CR 10
    bolus[70] = 2.0  # a correction
    kept = LoggedTherapy(
        basal, bolus, carbs, carb_ratio_g_per_u=10, correction_factor_mg_dl_per_u=40
    )
    assert kept.decide(_obs(10)).bolus_u == 6.0
    assert kept.decide(_obs(70)).bolus_u == 2.0
    new = LoggedTherapy(
        basal, bolus, carbs, carb_ratio_g_per_u=10, correction_factor_mg_dl_per_u=40,
        new_carb_ratio_g_per_u=12.0, new_correction_factor_mg_dl_per_u=50.0, basal_scale=0.8,
    )  # fmt: skip
    # 60/12 + (150 − 120)/50 − IOB 0.2
    assert new.decide(_obs(10, g=150.0, iob=0.2)).bolus_u == pytest.approx(5.0 + 0.6 - 0.2)
    assert new.decide(_obs(10, g=100.0)).bolus_u == pytest.approx(5.0)  # no negative correction
    assert new.decide(_obs(70)).bolus_u == pytest.approx(2.0 * 40 / 50)
    assert new.decide(_obs(30)).basal_u_per_h == pytest.approx(0.8)
    flat = LoggedTherapy(
        basal, bolus, carbs, carb_ratio_g_per_u=10, correction_factor_mg_dl_per_u=40,
        flat_basal_u_per_h=0.3,
    )  # fmt: skip
    assert flat.decide(_obs(30)).basal_u_per_h == 0.3


def test_rescue_carbohydrates_follow_the_rule_and_lift_the_low():
    p = get_patient("adult#001")
    k = 720
    overdose = LoggedTherapy(
        np.full(k, 6.0), np.zeros(k), np.zeros(k), carb_ratio_g_per_u=10,
        correction_factor_mg_dl_per_u=40,
    )  # fmt: skip
    args = dict(
        meal_g=np.zeros(k), announced_g=np.zeros(k), scheduled_basal_u_per_h=np.array([1.0])
    )
    bare = closed_loop(parameter_matrix([p]), initial_states([p]), [overdose], **args)
    rule = RescueRule(grams=10.0, below_mg_dl=70.0, interval_min=15.0)
    rescued = closed_loop(
        parameter_matrix([p]), initial_states([p]), [overdose], rescue=rule, **args
    )
    assert bare.rescues[0] == 0 and bare.gsub_mg_dl.min() < 70
    times = np.flatnonzero(rescued.rescue_g[0])
    assert times.size > 0
    assert set(rescued.rescue_g[0][times].tolist()) == {10.0}
    assert np.diff(times).min() >= 15
    # every rescue came when the patient was below 70
    assert np.all(rescued.gsub_mg_dl[0, times] < 70)
    assert rescued.gsub_mg_dl.min() > bare.gsub_mg_dl.min()


def test_synthetic_logs_import_cleanly_and_repeat_with_their_seed(adult_log, tmp_path):
    syn, path = adult_log
    log = read_log(path)
    assert log.report.issues == ()
    grid = log_grid(log)
    assert grid.minutes == 4 * 1440
    # the log carries the counted carbohydrates (and the rescues), not the eaten ones
    np.testing.assert_allclose(
        grid.carbs_g.sum(), np.round(syn.announced_g + syn.trace.rescue_g[0]).sum()
    )
    assert not np.allclose(syn.announced_g, syn.meal_g)
    assert synthetic_log(get_patient("adult#003"), days=4, seed=5).csv_text == syn.csv_text
    other = synthetic_log(get_patient("adult#003"), days=4, seed=6).csv_text
    assert other != syn.csv_text
    exact = synthetic_log(get_patient("adult#003"), days=1, seed=5, carb_error=CarbCountingError())
    np.testing.assert_array_equal(exact.announced_g, exact.meal_g)


@pytest.mark.parametrize(("cgm", "period"), [("Navigator", 1), ("Dexcom", 3), ("GuardianRT", 5)])
def test_synthetic_logs_of_1_3_and_5_min_cgms_import_onto_the_grid(tmp_path, cgm, period):
    syn = synthetic_log(get_patient("adult#003"), days=1, seed=5, cgm=cgm)
    log = read_log(syn.write(tmp_path / "log.csv"), min_days=1)
    assert log.report.issues == ()
    assert log.cgm_period_min == period and log.cgm_coverage == 1.0
    assert log.report.events["cgm_mg_dl"] == 1440 // period + 1
    grid = log_grid(log)
    assert grid.minutes == 1440
    # every reading on its minute, none lost or moved
    np.testing.assert_array_equal(grid.cgm_mg_dl, syn.cgm_mg_dl)
    assert np.flatnonzero(~np.isnan(grid.cgm_mg_dl)).tolist() == list(range(0, 1441, period))


def test_the_therapy_read_from_the_log_is_the_one_the_person_used(adult_log):
    _, path = adult_log
    p = get_patient("adult#003")
    settings = therapy_from_log(log_grid(read_log(path)))
    # the bolus calculator fitted to the log's boluses (twins/settings.py): the person's own
    assert settings["carb_ratio_g_per_u"] == pytest.approx(p.carb_ratio_g_per_u, rel=0.02)
    cf = settings["correction_factor_mg_dl_per_u"]
    assert cf == pytest.approx(p.correction_factor_mg_dl_per_u, rel=0.05)
    assert 1800 / settings["total_daily_insulin_u"] > 1.5 * cf  # the rule it replaces
    given = therapy_from_log(log_grid(read_log(path)), {"carb_ratio_g_per_u": 11.0})
    assert given["carb_ratio_g_per_u"] == 11.0


def test_the_fit_carries_the_therapy_it_used_with_intervals_and_sources(twin, tmp_path):
    fit, _ = twin
    therapy = fit.fit["therapy"]
    for key in ("carb_ratio_g_per_u", "correction_factor_mg_dl_per_u"):
        assert therapy[key]["source"] == "inferred"
        assert fit.model.base[key] == therapy[key]["value"]
        assert therapy[key]["low"] <= therapy[key]["value"] <= therapy[key]["high"]
    assert fit.model.basal_u_per_h == therapy["basal_u_per_h"]["value"]
    assert read_twin(write_twin(fit, tmp_path / "t.yaml")).fit["therapy"] == therapy
    text = _fit_text({"fit": fit})
    assert "  therapy (90 % intervals):\n    basal 1.43 U/h (the most common logged rate" in text
    assert "    CF " in text and "corrections)" in text


def test_the_fitted_twin_predicts_held_out_days_better_than_the_prior(twin, adult_log):
    fit, checked = twin
    _, path = adult_log
    grid = log_grid(read_log(path))
    held = np.arange(grid.minutes + 1) >= 3 * 1440
    obs = held & ~np.isnan(grid.cgm_mg_dl)
    prior = fit.model.simulate(np.zeros((1, len(fit.z_map))), grid)[0]
    prior_rmse = float(np.sqrt(np.mean((prior[obs] - grid.cgm_mg_dl[obs]) ** 2)))
    assert checked["rmse_mg_dl"] < prior_rmse
    assert checked["held_out_days"] == pytest.approx(1.0, abs=0.01)
    assert set(checked["twin"]) == set(checked["logged_cgm"])


def test_a_replay_reports_both_therapies_over_posterior_draws(twin, adult_log):
    fit, _ = twin
    _, path = adult_log
    grid = log_grid(read_log(path)).window(1440, 3 * 1440)
    same = replay(fit, grid, ReplayTherapy(), draws=6, seed=1, rescue=None)
    assert same["draws"] == 6 and same["posterior"]
    assert "mean_mg_dl" in same["difference"] and len(same["therapies"]) == 2
    assert all(row["metrics"] for row in same["therapies"])
    for s in same["difference"].values():
        assert s == {"map": 0.0, "median": 0.0, "p5": 0.0, "p95": 0.0}
    for row in same["therapies"]:
        for s in row["metrics"].values():
            assert s["p5"] <= s["median"] <= s["p95"]
    less = replay(fit, grid, ReplayTherapy(basal_scale=0.5), draws=6, seed=1)
    assert less["therapies"][1]["therapy"] == "logged with basal_scale=0.5"
    assert less["difference"]["mean_mg_dl"]["p5"] > 0  # every draw runs higher
    assert less["difference"]["insulin_u_per_day"]["median"] < 0
    # the table's point value is the MAP draw's: a replay of the MAP alone gives it
    alone = replay(fit, grid, ReplayTherapy(basal_scale=0.5), draws=1, seed=1)
    for i in (0, 1):
        for k, s in less["therapies"][i]["metrics"].items():
            assert s["map"] == pytest.approx(alone["therapies"][i]["metrics"][k]["map"]), k
    pid = replay(fit, grid, ReplayTherapy(controller="pid"), draws=3, seed=1)
    assert pid["therapies"][1]["therapy"] == "pid"
    assert math.isfinite(pid["therapies"][1]["metrics"]["time_in_range_70_180_pct"]["median"])


def test_a_replay_says_what_its_tir_is_beside_the_logs_own_cgm(twin, adult_log):
    fit, checked = twin
    _, path = adult_log
    grid = log_grid(read_log(path))
    result = replay(fit, grid, ReplayTherapy(basal_scale=0.8), first_min=2 * 1440, draws=3)
    # the log's CGM over exactly the scored minutes (the window after the start)
    window = grid.window(2 * 1440, grid.minutes)
    readings = window.cgm_mg_dl[~np.isnan(window.cgm_mg_dl)]
    c = result["logged_cgm"]
    assert c["readings"] == readings.size > 2 * 250
    assert c["mean_mg_dl"] == pytest.approx(float(readings.mean()))
    assert c["time_in_range_70_180_pct"] == pytest.approx(
        100 * float(np.mean((readings >= 70) & (readings <= 180))), abs=1e-9
    )
    text = cgm_line(result)
    assert "table: the twin's sensor glucose over 2.00 replayed days" in text
    assert "[5–95 %] over the 3 draws" in text
    assert (
        f"the log's CGM over the same days ({c['readings']} readings): TIR 70-180 "
        f"{c['time_in_range_70_180_pct']:.1f} %, <70 {c['time_below_70_pct']:.1f} %" in text
    )
    flat = " ".join(text.split())
    assert "without sensor noise" in flat and "the sensor's noise and lag" in flat
    assert TWIN_GLUCOSE_MEANING in flat
    # the fit's held-out line carries the same explanation under its two TIRs
    fit_text = " ".join(_fit_text({"fit": fit, "validation": checked}).split())
    assert "TIR twin" in fit_text and TWIN_GLUCOSE_MEANING in fit_text
    assert checked["logged_cgm"] == {
        k: v for k, v in cgm_metrics(grid, 3 * 1440).items() if k != "readings"
    }


class _PlanSpy:
    """A planning controller that records the twin it is given: 2 U at minute 60."""

    needs_twin = True

    def __init__(self, basal_u_per_h: float) -> None:
        self.basal = basal_u_per_h
        self.twins: list[TwinPlanState | None] = []

    def decide(self, obs: ControllerInput) -> Dose:
        self.twins.append(obs.twin)
        return Dose(self.basal, 2.0 if obs.t_min == 60 else 0.0)


def test_a_planning_controller_in_the_closed_loop_plans_on_its_twin_estimator():
    p = get_patient("adult#001")
    k = 240
    meals = np.zeros(k)
    meals[100] = 40.0
    spy = _PlanSpy(p.basal_u_per_h)
    estimator = TwinEstimator(p, scheduled_basal_u_per_h=p.basal_u_per_h)
    trace = closed_loop(
        parameter_matrix([p]), initial_states([p]), [spy], meal_g=meals, announced_g=meals,
        scheduled_basal_u_per_h=np.array([p.basal_u_per_h]), estimators=[estimator],
    )  # fmt: skip
    twins = [t for t in spy.twins if t is not None]
    assert len(twins) == k // 5 and estimator.readings_fused == k // 5  # a reading every tick
    assert [t.t_min for t in twins] == list(range(0, k, 5))
    # the bolus delivered at minute 60 reaches the estimator's subcutaneous insulin
    bw = p.body_weight_kg
    assert twins[13].x[10] - twins[12].x[10] > 0.8 * 2.0 * 6000.0 / bw
    # the meal announced for minute 100 is pending in the plan at the tick of 100
    assert twins[20].pending_meals == ((0, 40.0),)
    # the estimate follows the plant it sees (exact readings, its own model)
    gp_est = twins[-1].x[3] / p.vg_dl_per_kg
    assert gp_est == pytest.approx(trace.bg_mg_dl[0, k - 5], abs=5.0)


def test_a_replayed_mpc_plans_on_the_chosen_model_through_an_estimator(twin, adult_log, tmp_path):
    fit, _ = twin
    _, path = adult_log
    grid = log_grid(read_log(path)).window(1440, 1440 + 600)
    zs = fit.draws(3, 1)

    def run(model: str) -> np.ndarray:
        therapy = ReplayTherapy(controller="mpc", model=model)
        trace = run_therapy(fit, grid, therapy, zs, rescue=None)
        return np.concatenate([trace.basal_u_per_h, trace.bolus_u], axis=1)

    planned_on_fit = run("fit")
    oracle = run("oracle")
    # under oracle each draw plans on its own parameters; under fit, every draw on the MAP: the
    # MAP draw (the first) plans on the same model under both, the others do not
    np.testing.assert_array_equal(planned_on_fit[0], oracle[0])
    assert not np.array_equal(planned_on_fit[1:], oracle[1:])
    # the twin's own file is the same model as fit; the population's mean is another
    write_twin(fit, tmp_path / "a3.yaml")
    np.testing.assert_array_equal(run(f"twin:{tmp_path / 'a3.yaml'}"), planned_on_fit)
    assert not np.array_equal(run("population"), planned_on_fit)


def test_a_replay_names_the_model_a_planning_controller_used(twin, adult_log):
    fit, _ = twin
    _, path = adult_log
    grid = log_grid(read_log(path)).window(1440, 1440 + 360)
    r = replay(fit, grid, ReplayTherapy(controller="mpc", model="population"), draws=2, seed=1)
    assert r["therapies"][1]["therapy"] == "mpc@population"
    assert r["therapies"][1]["model"] == "population" and r["therapies"][0]["model"] is None
    pid = replay(fit, grid, ReplayTherapy(controller="pid", model="oracle"), draws=1, seed=1)
    assert pid["therapies"][1]["therapy"] == "pid" and pid["therapies"][1]["model"] is None


def _largest_meal_of_day_2(grid) -> int:
    day = grid.carbs_g[1440:2880]
    return 1440 + int(np.argmax(day))


def test_a_replay_later_in_the_log_starts_from_the_filtered_state(twin, adult_log):
    fit, _ = twin
    syn, path = adult_log
    grid = log_grid(read_log(path))
    first = _largest_meal_of_day_2(grid) + 60  # an hour after dinner: insulin and gut full
    assert grid.carbs_g[first - 60] >= 60
    last = first + 180
    filtered = replay(fit, grid, ReplayTherapy(), first_min=first, last_min=last, draws=3)
    steady = replay(fit, grid.window(first, last), ReplayTherapy(), draws=3, burn_in_min=0)
    assert filtered["start"]["kind"] == "filtered" and filtered["start"]["burn_in_min"] == 0
    assert steady["start"]["kind"] == "steady"
    true_bg = syn.trace.bg_mg_dl[0, first]
    start_bg = filtered["traces"][0].bg_mg_dl[:, 0]
    assert np.all(np.abs(start_bg - true_bg) < 15.0), (start_bg, true_bg)
    truth = syn.trace.gsub_mg_dl[0, first : last + 1]

    def rmse(result) -> float:
        g = result["traces"][0].gsub_mg_dl[0]  # the MAP draw under the logged therapy
        return float(np.sqrt(np.mean((g - truth) ** 2)))

    # the steady start forgets the meal and bolus on board: its 3 h run is far from the truth
    assert rmse(filtered) < 15.0 < rmse(steady)
    assert rmse(filtered) < 0.5 * rmse(steady)


@pytest.fixture(scope="module")
def started(twin, adult_log):
    """Three draws of the twin filtered over the log's first 2000 minutes."""
    fit, _ = twin
    _, path = adult_log
    grid = log_grid(read_log(path))
    zs = fit.draws(3, 1)
    return fit, grid, zs, filtered_start(fit, grid, 2000, zs)


def test_filtered_start_is_each_draws_estimator_after_the_logs_minutes_before(started):
    fit, grid, zs, start = started
    for z, estimator, x in zip(zs, start.filters, start.x0, strict=True):
        assert estimator.patient == fit.model.patient(z)
        readings = int(np.count_nonzero(~np.isnan(grid.cgm_mg_dl[:2000])))
        assert estimator.readings_fused + estimator.ignored["reading"] == readings
        assert estimator.t_min < 2000
        np.testing.assert_allclose(x, estimator.plan_state(2000.0).x)
    assert not np.allclose(start.x0[0], start.x0[1])  # each draw filters on its own model
    with pytest.raises(ConfigError, match="first_min=0"):
        filtered_start(fit, grid, 0, zs)


def test_a_replay_from_the_logs_start_begins_steady_and_skips_the_burn_in(twin, adult_log):
    fit, _ = twin
    _, path = adult_log
    grid = log_grid(read_log(path)).window(0, 600)
    r = replay(fit, grid, ReplayTherapy(), draws=1)
    assert r["start"] == {"kind": "steady", "burn_in_min": 180, "filter_seconds": None}
    x = r["traces"][0]
    np.testing.assert_allclose(x.gsub_mg_dl[0, 0], grid.cgm_mg_dl[0])
    with pytest.raises(ConfigError, match="first_min/last_min"):
        replay(fit, grid, ReplayTherapy(), first_min=500, last_min=400)


def test_the_loop_continues_estimators_that_filtered_the_log_on_their_clock(adult_log):
    syn, path = adult_log
    p = syn.patient
    grid = log_grid(read_log(path))
    first = 1440
    estimator = filter_log(TwinEstimator(p, scheduled_basal_u_per_h=p.basal_u_per_h), grid, first)
    plan = estimator.plan_state(float(first))
    fused = estimator.readings_fused
    spy = _PlanSpy(p.basal_u_per_h)
    window = grid.window(first, first + 60)
    closed_loop(
        parameter_matrix([p]), np.array([plan.x]), [spy], meal_g=window.carbs_g,
        announced_g=window.carbs_g, scheduled_basal_u_per_h=np.array([p.basal_u_per_h]),
        estimators=[estimator], estimator_clock_min=first,
        meal_state0=np.array([plan.meal_state]),
    )  # fmt: skip
    assert [t.t_min for t in spy.twins] == list(range(first, first + 60, 5))
    assert estimator.readings_fused == fused + 12 and estimator.ignored["reading"] == 0
    # the plant started where the estimator was: its first plan is the same state
    np.testing.assert_allclose(spy.twins[0].x[3], plan.x[3], rtol=0.02)
    with pytest.raises(PolicyConfigError, match=r"estimator\.t_min"):
        filter_log(estimator, grid, first)


def test_a_planning_controller_plans_on_from_the_filter_of_its_model(started):
    fit, grid, zs, start = started
    for spec in ("fit", "oracle", "population"):
        models = replay_models(fit, zs, spec)
        planners = _planning_estimators(fit, models, start)
        assert len({id(e) for e in planners} | {id(f) for f in start.filters}) == 6  # copies
        for model, estimator in zip(models, planners, strict=True):
            assert estimator.patient == model
            assert estimator.t_min == max(np.flatnonzero(~np.isnan(grid.cgm_mg_dl[:2000])))
        if spec != "population":  # the draw's own filter (fit: the MAP, the first draw's)
            own = [start.filters[0]] * 3 if spec == "fit" else start.filters
            for estimator, f in zip(planners, own, strict=True):
                np.testing.assert_array_equal(estimator.state_mean, f.state_mean)


class _IobSpy:
    def __init__(self) -> None:
        self.iob: list[float] = []

    def decide(self, obs: ControllerInput) -> Dose:
        self.iob.append(obs.net_iob_u)
        return Dose(1.0, 0.0)


def test_the_loop_starts_with_the_meal_being_eaten_and_the_insulin_on_board():
    p = get_patient("adult#001")
    k = 120
    no_meal = np.zeros(k)
    meal = no_meal.copy()
    meal[0] = 30.0
    common = dict(announced_g=no_meal, scheduled_basal_u_per_h=np.array([1.0]))
    x0 = parameter_matrix([p]), initial_states([p])
    eating = np.zeros((1, 4))
    eating[0, 0] = 30.0  # 30 g announced, not yet swallowed
    begun = closed_loop(*x0, [_IobSpy()], meal_g=no_meal, meal_state0=eating, **common)
    fresh = closed_loop(*x0, [_IobSpy()], meal_g=meal, **common)
    np.testing.assert_allclose(begun.gsub_mg_dl, fresh.gsub_mg_dl, rtol=1e-12)
    history = np.full(600, 1.0 / 60.0)
    history[-30] += 5.0  # a 5 U bolus half an hour before the start
    spy = _IobSpy()
    closed_loop(*x0, [spy], meal_g=no_meal, insulin_history_u_per_min=history, **common)
    assert spy.iob[0] > 4.0
    cold = _IobSpy()
    closed_loop(*x0, [cold], meal_g=no_meal, **common)
    assert cold.iob[0] == 0.0
    with pytest.raises(PolicyConfigError, match="meal_state0"):
        closed_loop(*x0, [spy], meal_g=no_meal, meal_state0=np.zeros((2, 4)), **common)


def _overdosed(grid):
    """The log with every bolus tripled: the twin goes low under the logged therapy."""
    bolus = grid.bolus_u * 3.0
    return dataclasses.replace(
        grid, bolus_u=bolus, insulin_u_per_min=grid.basal_u_per_h / 60.0 + bolus
    )


def test_the_logged_therapy_is_replayed_without_rescues_the_alternative_with(twin, adult_log):
    fit, _ = twin
    _, path = adult_log
    grid = _overdosed(log_grid(read_log(path)))
    r = replay(fit, grid, ReplayTherapy(), first_min=1440, last_min=2880, draws=3, seed=1)
    logged, alternative = r["therapies"]
    assert logged["rescue"] is None
    assert alternative["rescue"] == dataclasses.asdict(RescueRule())
    assert logged["metrics"]["time_below_70_pct"]["median"] > 0  # low, and not rescued
    assert logged["metrics"]["rescues_per_day"] == {
        "map": 0.0,
        "median": 0.0,
        "p5": 0.0,
        "p95": 0.0,
    }
    assert r["traces"][0].rescue_g.sum() == 0.0
    assert alternative["metrics"]["rescues_per_day"]["median"] > 0  # the same therapy, rescued
    assert r["difference"]["rescues_per_day"]["median"] > 0
    from twinloop.cli.twin import replay_table

    table = replay_table(r)
    assert "none (the log's carbs only)" in table and "10 g below 70 mg/dL" in table


def test_the_replays_trajectories_and_plot_show_what_the_metrics_count(twin, adult_log, tmp_path):
    import pyarrow.parquet as pq

    from twinloop.cli.twin import _plot, write_trajectories

    fit, _ = twin
    _, path = adult_log
    grid = _overdosed(log_grid(read_log(path)))
    first, last = 1440, 2880
    therapy = ReplayTherapy(basal_scale=0.8)
    r = replay(fit, grid, therapy, first_min=first, last_min=last, draws=1)
    window = grid.window(first, last)
    paths = write_trajectories(r, trajectory_table(r, window), tmp_path)
    data = pq.read_table(paths[0])
    assert json.loads(data.schema.metadata[b"twinloop_replay_therapies"]) == {
        "twin_logged": "logged",
        "twin_alternative": "logged with basal_scale=0.8",
    }
    cols = data.to_pydict()
    for name in ("twin_logged", "twin_alternative"):
        for part in ("median", "p5", "p95"):
            assert f"{name}_{part}_mg_dl" in cols
    assert data.num_rows == window.minutes + 1
    assert cols["time"][0] == window.start and str(data.schema.field("time").type.tz) == "UTC"
    cgm = np.array(cols["cgm_mg_dl"], dtype=float)
    np.testing.assert_array_equal(np.isnan(cgm), np.isnan(window.cgm_mg_dl))
    np.testing.assert_array_equal(cgm[~np.isnan(cgm)], window.cgm_mg_dl[~np.isnan(cgm)])
    scored = np.array(cols["scored"])
    assert scored.all()  # a filtered start: every minute counts
    days = r["days"]
    for name, row in zip(("twin_logged", "twin_alternative"), r["therapies"], strict=True):
        m = row["metrics"]
        g = np.array(cols[f"{name}_median_mg_dl"])
        assert g.mean() == pytest.approx(m["mean_mg_dl"]["median"], rel=1e-9)
        assert 100 * (g < 70).mean() == pytest.approx(m["time_below_70_pct"]["median"])
        insulin = np.nansum(cols[f"{name}_insulin_u_per_min"]) / days
        assert insulin == pytest.approx(m["insulin_u_per_day"]["median"], rel=1e-9)
    rescues = np.array(cols["twin_alternative_rescue_g"])
    assert np.nansum(rescues > 0) / days == pytest.approx(
        r["therapies"][1]["metrics"]["rescues_per_day"]["median"]
    )
    assert np.nansum(rescues) > 0
    csv_lines = paths[1].read_text().splitlines()
    assert len(csv_lines) == data.num_rows + 1
    assert csv_lines[0].split(",")[:2] == ['"minute"', '"time"']
    assert csv_lines[1].split(",")[1] == '"' + window.start.strftime("%Y-%m-%dT%H:%M:%SZ") + '"'
    labels = _plot(r, trajectory_table(r, window), tmp_path / "replay.png")
    assert labels == ["twin, logged therapy", "twin, logged with basal_scale=0.8", "logged CGM"]
    assert (tmp_path / "replay.png").stat().st_size > 10_000


def test_replay_options_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"model='magic'.*population"):
        ReplayTherapy(controller="mpc", model="magic")
    with pytest.raises(ConfigError, match="controller"):
        ReplayTherapy(controller="magic")
    with pytest.raises(ConfigError, match="controller"):
        ReplayTherapy(controller="pid", carb_ratio_g_per_u=10)
    with pytest.raises(ConfigError, match="basal_scale"):
        ReplayTherapy(basal_scale=-1)
    with pytest.raises(ConfigError, match="basal_scale"):
        ReplayTherapy(basal_scale=0.5, basal_u_per_h=1.0)
    with pytest.raises(ConfigError, match="fit_days"):
        FitRequest(("x.csv",), fit_days=0.5)


def _twinloop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinloop", *args], cwd=cwd, capture_output=True, text=True,
        timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_the_cli_fits_and_replays_a_synthetic_log(tmp_path):
    log = tmp_path / "a.csv"
    r = _twinloop(
        "twin", "synth", "--patient", "adult#002", "--days", "3", "--out", str(log), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    r = _twinloop(
        "twin", "fit", str(log), "--out", str(tmp_path / "twin.yaml"), "--validate-days", "1",
        "--posterior", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Import report" in r.stdout and "held out 1.00 days: CGM RMSE" in r.stdout
    r = _twinloop(
        "twin", "replay", str(tmp_path / "twin.yaml"), str(log), "--controller", "basal-bolus",
        "--from-day", "1", "--draws", "4", "--out", str(tmp_path / "rep"), "--fhir",
        str(tmp_path / "bundle.json"), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "TIR 70-180 %" in r.stdout and "basal-bolus" in r.stdout
    assert "the log's CGM over the same days" in r.stdout
    doc = json.loads((tmp_path / "rep" / "replay.json").read_text())
    assert doc["draws"] == 4 and doc["therapies"][1]["therapy"] == "basal-bolus"
    r = _twinloop(
        "twin", "replay", str(tmp_path / "twin.yaml"), str(log), "--controller", "mpc",
        "--model", "population", "--from-day", "1", "--days", "0.4", "--draws", "2", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "mpc@population" in r.stdout
    r = _twinloop(
        "twin", "replay", str(tmp_path / "twin.yaml"), str(log), "--controller", "mpc",
        "--model", "magic", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model='magic'" in r.stderr
    assert (tmp_path / "rep" / "replay.png").stat().st_size > 0
    assert (tmp_path / "rep" / "replay_trajectories.csv").stat().st_size > 0
    assert "twin_alternative_rescue_g" in (tmp_path / "rep" / "replay_trajectories.csv").read_text()
    assert doc["start"]["kind"] == "filtered" and doc["therapies"][0]["rescue"] is None
    # the twin's predicted days as FHIR, validated by a maintained FHIR model library
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.medicationadministration import MedicationAdministration
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.patient import Patient

    bundle = json.loads((tmp_path / "bundle.json").read_text())
    Bundle.model_validate(bundle)
    models = {m.__name__: m for m in (Patient, Observation, MedicationAdministration)}
    for entry in bundle["entry"]:
        models[entry["resource"]["resourceType"]].model_validate(entry["resource"])
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Patient") == 1
    assert kinds.count("Observation") == 2 * 288 + 1  # days 2–3, a reading every 5 min
    assert "MedicationAdministration" in kinds
    glucose = [
        e["resource"]["valueQuantity"] for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    ]  # fmt: skip
    assert {g["code"] for g in glucose} == {"mg/dL"}


def test_the_cli_refuses_bad_logs_with_a_report_naming_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "time,cgm_mg_dl,basal_u_per_h,bolus_u\n"
        "2026-03-02T08:00:00+01:00,120,1.0,\n"
        "2026-03-02T08:05:00+01:00,0,,\n"
        "2026-03-02T08:10:00+01:00,2000,,-1\n"
        "2026-03-02T08:02:00+01:00,125,,\n"
        "2026-03-02T09:10:00+02:00,130,,\n"
    )
    r = _twinloop("twin", "fit", str(bad), "--out", str(tmp_path / "t.yaml"), cwd=tmp_path)
    assert r.returncode == 2
    assert "too little CGM data to fit" in r.stderr and "are needed" in r.stderr
    for finding in ("row 3", "row 4", "out_of_order", "mixed_time_zones"):
        assert finding in r.stderr, finding
    assert not (tmp_path / "t.yaml").exists()
    # an unknown column is ignored and listed; this log is refused for its one reading only
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("time,cgm_mg_dl,insulin_units\n2026-03-02T08:00:00Z,120,1\n")
    r = _twinloop("twin", "fit", str(unknown), "--out", str(tmp_path / "t.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "ignored columns: insulin_units" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("twinloop twin: error: too little CGM data")
    assert "Traceback" not in r.stderr
    # naive times: the one-line error names the option that fixes them, which does
    naive = tmp_path / "naive.csv"
    naive.write_text("time,cgm_mg_dl,basal_u_per_h\n2026-03-02T08:00:00,120,1\n")
    r = _twinloop("twin", "fit", str(naive), "--out", str(tmp_path / "t.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "time='2026-03-02T08:00:00' (row(s) 2) has no UTC offset" in r.stderr
    assert "--tz ZONE (e.g. --tz Europe/Rome" in r.stderr
    r = _twinloop(
        "twin", "fit", str(naive), "--tz", "Europe/Rome", "--out", str(tmp_path / "t.yaml"),
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and "too little CGM data" in r.stderr
    assert "no UTC offset" not in r.stderr


@pytest.mark.ray
def test_fits_on_ray_give_the_twins_fitted_inline(ray_started, tmp_path):
    requests = []
    for i, name in enumerate(("adult#004", "adult#005")):
        syn = synthetic_log(get_patient(name), days=2, seed=i)
        requests.append(FitRequest((str(syn.write(tmp_path / f"{i}.csv")),), name=name))
    inline = {r["name"]: r for r in fit_many(requests, inline=True)}
    on_ray = {r["name"]: r for r in fit_many(requests, workers=2)}
    assert set(inline) == set(on_ray) == {"adult#004", "adult#005"}
    for name in inline:
        np.testing.assert_array_equal(inline[name]["fit"].z_map, on_ray[name]["fit"].z_map)


def test_the_cli_fits_each_log_as_its_own_person(tmp_path):
    logs = []
    for name in ("adult#007", "adult#008"):
        path = tmp_path / f"{name.replace('#', '_')}.csv"
        synthetic_log(get_patient(name), days=2, seed=3).write(path)
        logs.append(str(path))
    r = _twinloop("twin", "fit", *logs, "--each", "--inline", "--out", "twins", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "twins: 2 fitted, 0 failed" in r.stdout
    written = sorted(p.name for p in (tmp_path / "twins").iterdir())
    assert written == ["adult_007.yaml", "adult_008.yaml"]
