"""Re-fitting the loop's model from its own recording, and swapping models without a glitch."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.glucose import loop as loop_module
from twinloop.agents.glucose.estimator import I_CGM_ERR, I_EGP, I_THETA, TwinEstimator
from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.glucose.refit import LoopLog, RefitJob, RefitResult, run_refit
from twinloop.agents.messages import (
    AgentFault,
    CgmReading,
    InsulinDelivery,
    MealAnnouncement,
    ModelSwap,
    TwinEstimate,
)
from twinloop.plant.glucose.identification import InsufficientDataError
from twinloop.plant.glucose.models import correction_drop_mg_dl, population_model
from twinloop.plant.glucose.patients import get_patient
from twinloop.plant.glucose.uva_padova import simulate
from twinloop.policies.glucose.mpc import MPCController

TRUE = get_patient("adult#007")  # the population model's 1-U drop is 22 % below the truth's
POPULATION = population_model(TRUE)


def _fed_estimator(minutes: int = 480) -> TwinEstimator:
    """A twin on the population model, fed a meal day of the true patient up to ``minutes``."""
    basal = np.full(minutes, TRUE.basal_u_per_h / 60.0)
    eaten = np.zeros(minutes)
    eaten[120] = 60.0
    bolus = eaten / TRUE.carb_ratio_g_per_u
    traj = simulate([TRUE], basal + bolus, eaten)
    est = TwinEstimator(POPULATION, scheduled_basal_u_per_h=TRUE.basal_u_per_h)
    for m in range(minutes + 1):
        if m % 5 == 0:
            est.update(CgmReading(float(m), float(traj.gsub_mg_dl[0, m])))
        if m == minutes:
            break
        if eaten[m] > 0:
            est.observe_meal(MealAnnouncement(float(m), float(eaten[m])))
        est.observe_delivery(InsulinDelivery(float(m), float(basal[m]), float(bolus[m])))
    return est


@pytest.mark.parametrize("minutes", [180, 480])  # an hour after a meal; after it
def test_swapping_the_twins_model_keeps_its_estimate(minutes):
    est = _fed_estimator(minutes)
    t = float(minutes)
    before, x_before, p_before = est.estimate(t), est.state_mean, est.covariance
    assert est.sensitivity_scale != 1.0  # it adapted: the swap must reset it
    est.swap_model(TRUE)
    after, x_after, p_after = est.estimate(t), est.state_mean, est.covariance
    assert est.patient is TRUE
    assert after.bg_mg_dl == pytest.approx(before.bg_mg_dl, abs=1e-9)
    assert after.iob_u == pytest.approx(before.iob_u, abs=1e-9)
    assert after.cob_g == pytest.approx(before.cob_g, abs=1e-9)
    # the CGM the twin expects (its subcutaneous glucose + CGM error) is unchanged too
    vg_old, vg_new = POPULATION.vg_dl_per_kg, TRUE.vg_dl_per_kg
    assert x_after[12] / vg_new == pytest.approx(x_before[12] / vg_old)
    assert x_after[I_CGM_ERR] == x_before[I_CGM_ERR]
    assert x_after[:3] == pytest.approx(x_before[:3])  # the gut's contents (mg)
    # the scales restart at 1 with their prior variance, uncorrelated with the rest
    assert est.sensitivity_scale == 1.0 and est.egp_scale == 1.0
    for j, sd in ((I_THETA, est.config.sensitivity_prior_sd), (I_EGP, est.config.egp_prior_sd)):
        assert p_after[j, j] == pytest.approx(sd**2, rel=1e-3)
        assert np.count_nonzero(p_after[j]) == 1
    # the glucose variance is kept in concentration units
    assert p_after[3, 3] / vg_new**2 == pytest.approx(p_before[3, 3] / vg_old**2)
    assert np.allclose(p_after, p_after.T) and np.linalg.eigvalsh(p_after).min() > 0
    if minutes == 480:  # in a quiet period the two models' 30-min forecasts are close
        assert abs(after.forecast_30_mg_dl - before.forecast_30_mg_dl) < 10.0
    # and the filter goes on: the next reading is fused
    assert est.update(CgmReading(t + 5.0, before.bg_mg_dl))


def test_swapping_back_and_forth_returns_the_same_state():
    est = _fed_estimator()
    x0 = est.state_mean
    est.swap_model(TRUE)
    est.swap_model(POPULATION)
    x1 = est.state_mean
    keep = [j for j in range(x0.size) if j not in (I_THETA, I_EGP)]
    assert x1[keep] == pytest.approx(x0[keep], rel=1e-9, abs=1e-9)


def test_the_mpc_plans_on_the_swapped_model_and_keeps_its_warm_start():
    est = _fed_estimator()
    state = est.plan_state(est.t_min)
    mpc = MPCController.for_patient(POPULATION)
    mpc.plan(state)
    warm = mpc._warm.copy()
    est.swap_model(TRUE)
    state = est.plan_state(est.t_min)
    mpc.swap_model(TRUE)
    assert mpc.patient is TRUE and np.array_equal(mpc._warm, warm)
    fresh = MPCController.for_patient(TRUE)
    fresh._warm = warm.copy()
    assert np.array_equal(mpc.plan(state)[0], fresh.plan(state)[0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"refit_every_days": -1}, "refit_every_days"),
        ({"refit_every_days": 1.5}, "refit_every_days"),
        ({"refit_every_days": True}, "refit_every_days"),
        ({"refit_every_days": 1, "twin": False}, "refit_every_days"),
        ({"refit_window_days": 0}, "refit_window_days"),
        ({"refit_window_days": 31}, "refit_window_days"),
        ({"refit_max_iter": 0}, "refit_max_iter"),
        ({"refit_delay_min": 0}, "refit_delay_min"),
        ({"refit_delay_min": 1441}, "refit_delay_min"),
    ],
)
def test_bad_refit_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(LoopConfigError, match=f"^{field}=") as err:
        LoopConfig(patients=("adult#001",), **kwargs)
    assert "\n" not in str(err.value)


def test_refit_settings_are_in_the_config_dump():
    dumped = dataclasses.asdict(LoopConfig(patients=("adult#001",), refit_every_days=2))
    assert dumped["refit_every_days"] == 2 and dumped["refit_window_days"] == 7


def test_a_fit_with_too_little_cgm_is_refused():
    log = LoopLog(2 * 1440)
    for m in range(0, 2 * 1440, 60):  # hourly readings: too few
        log.reading(CgmReading(float(m), 120.0))
        log.delivery(InsulinDelivery(float(m), 0.02, 0.0))
    with pytest.raises(InsufficientDataError, match="too little CGM"):
        run_refit(RefitJob.for_patient(TRUE, log.grid(0, 2 * 1440), max_iter=5))


# --- the loop ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Fake:
    """A fit that is ready after ``polls`` calls of ready(), or that fails."""

    result_: RefitResult | None
    polls: int = 0
    error: Exception | None = None

    def ready(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def result(self) -> RefitResult:
        if self.error is not None:
            raise self.error
        assert self.result_ is not None
        return self.result_

    def cancel(self) -> None:
        pass


def _messages(loop: PatientLoop) -> dict[str, list]:
    out: dict[str, list] = {}
    loop.listen(lambda ch, m: out.setdefault(ch, []).append(m))
    return out


def _fake_result() -> RefitResult:
    return RefitResult(TRUE, 250, 9.0, 0.1, float(correction_drop_mg_dl([TRUE])[0]))


def test_the_loop_fits_what_its_twin_saw_and_swaps_at_the_fixed_delay(monkeypatch):
    jobs: list[tuple[int, RefitJob]] = []

    def fake_submit(job, *, on_ray):
        assert not on_ray
        jobs.append((loop._t_min, job))
        return _Fake(_fake_result(), polls=10**6)  # never "ready": sim time swaps anyway

    monkeypatch.setattr(loop_module, "submit", fake_submit)
    cfg = LoopConfig(
        patients=(TRUE.name,), days=3, refit_every_days=1, refit_window_days=2,
        refit_delay_min=30,
    )  # fmt: skip
    loop = PatientLoop(TRUE, cfg, np.random.default_rng(1))
    seen = _messages(loop)
    loop.run()
    assert [t for t, _ in jobs] == [1440, 2880]
    swaps = seen["estimator->models"]
    assert [s.t_min for s in swaps] == [1470.0, 2910.0]
    assert all(isinstance(s, ModelSwap) for s in swaps)
    assert swaps[1].window_start_min == 0.0 and swaps[1].fit_started_min == 2880.0
    assert loop.model is TRUE and loop.twin is not None and loop.twin.patient is TRUE
    # the second fit's grid: the last 2 days of what the twin was told
    grid = jobs[1][1].grid
    assert grid.minutes == 2880 and jobs[1][1].group == "adults"
    assert jobs[1][1].basal_u_per_h == TRUE.basal_u_per_h
    assert jobs[1][1].overrides["correction_factor_mg_dl_per_u"] == (
        TRUE.correction_factor_mg_dl_per_u
    )
    readings = {round(r.t_min): r.glucose_mg_dl for r in seen["sensor->controller"]}
    have = np.flatnonzero(~np.isnan(grid.cgm_mg_dl))
    assert list(have) == [m for m in sorted(readings) if m <= 2880]
    assert all(grid.cgm_mg_dl[m] == readings[m] for m in have)
    delivered = np.zeros(2880)
    for d in seen["actuator->plant"]:
        if d.t_min < 2880:
            delivered[round(d.t_min)] += d.total_u
    assert np.allclose(grid.insulin_u_per_min, delivered)
    meals = np.zeros(2880)
    for a in seen["meal->controller"]:
        if a.t_min < 2880:
            meals[round(a.t_min)] += a.carbs_g
    assert np.array_equal(grid.carbs_g, meals) and meals.sum() > 0
    assert grid.minute_of_day[0] == 0 and grid.minute_of_day[-1] == 0


def test_a_failed_fit_is_a_fault_and_the_loop_keeps_its_model(monkeypatch):
    monkeypatch.setattr(
        loop_module,
        "submit",
        lambda job, *, on_ray: _Fake(None, error=InsufficientDataError("too little CGM")),
    )
    cfg = LoopConfig(patients=(TRUE.name,), days=2, refit_every_days=1)
    loop = PatientLoop(TRUE, cfg, np.random.default_rng(1))
    seen = _messages(loop)
    before = loop.model
    loop.run()
    assert loop.model is before and loop.twin is not None and loop.twin.patient is before
    assert "estimator->models" not in seen
    (fault,) = seen["runtime->faults"]
    assert isinstance(fault, AgentFault) and fault.agent == "refit"
    assert fault.t_min == 1500.0 and "too little CGM" in fault.error


def test_on_the_wall_clock_the_model_is_swapped_when_the_fit_arrives(monkeypatch):
    fits: list[_Fake] = []

    def fake_submit(job, *, on_ray):
        fits.append(_Fake(_fake_result(), polls=3))  # ready at the 4th tick after the start
        return fits[-1]

    monkeypatch.setattr(loop_module, "submit", fake_submit)
    cfg = LoopConfig(
        patients=(TRUE.name,), days=2, refit_every_days=1, clock="wall",
        wall_s_per_sim_min=1e-5,
    )  # fmt: skip
    loop = PatientLoop(TRUE, cfg, np.random.default_rng(1))
    seen = _messages(loop)
    loop.run()
    (swap,) = seen["estimator->models"]
    assert swap.t_min == 1440.0 + 4 * 5 and swap.fit_started_min == 1440.0


def test_a_refit_moves_the_model_toward_the_patient_without_a_glitch():
    """A real fit in the worker process, the MPC planning on the twin, two days."""
    cfg = LoopConfig(
        patients=(TRUE.name,), days=2, controller="mpc", refit_every_days=1,
        refit_window_days=2, refit_max_iter=20,
        controller_deadline_s=60.0,  # a loaded machine must not turn a slow plan into a fault
    )  # fmt: skip
    loop = PatientLoop(TRUE, cfg, np.random.default_rng(0))
    seen = _messages(loop)
    start = loop.model
    try:
        loop.run()
    finally:
        loop.close()  # stops the worker process
    assert "runtime->faults" not in seen
    (swap,) = seen["estimator->models"]
    assert swap.t_min == 1500.0 and swap.cgm_readings > 200
    assert loop.model is not start and loop.twin is not None and loop.twin.patient is loop.model
    assert loop.controller.patient is loop.model  # type: ignore[attr-defined]
    # the fitted model's 1-U correction drop is closer to the patient's than the start's
    truth, before, after = correction_drop_mg_dl([TRUE, start, loop.model])
    assert swap.correction_drop_mg_dl_per_u == pytest.approx(after)
    assert abs(math.log(after / truth)) < abs(math.log(before / truth))
    # no jump: the estimate changes across the swap no more than between other ticks of that
    # quiet hour; the 30-min forecast changes with the model (its trend), by a few mg/dL
    est = {e.t_min: e for e in seen["estimator->controller"] if isinstance(e, TwinEstimate)}
    ticks = [t for t in sorted(est) if 1440 <= t <= 1560]
    step_bg = {t: abs(est[t].bg_mg_dl - est[t - 5].bg_mg_dl) for t in ticks}
    step_f30 = {t: abs(est[t].forecast_30_mg_dl - est[t - 5].forecast_30_mg_dl) for t in ticks}
    assert step_bg[1500.0] < 5.0 and step_f30[1500.0] < 15.0
    others = [v for t, v in step_bg.items() if t != 1500.0]
    assert step_bg[1500.0] <= max(others)


def test_the_same_seed_gives_the_same_trajectory_with_refits():
    def run() -> list[float]:
        cfg = LoopConfig(
            patients=(TRUE.name,), days=2, refit_every_days=1, refit_max_iter=5, seed=4
        )
        loop = PatientLoop(TRUE, cfg, np.random.default_rng(4))
        seen = _messages(loop)
        try:
            loop.run()
        finally:
            loop.close()
        assert len(seen["estimator->models"]) == 1
        return [e.bg_mg_dl for e in seen["estimator->controller"]]

    assert run() == run()
