import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.glucose.supervisor import SafetySupervisor, SupervisorConfig
from twinloop.agents.messages import CgmReading, InsulinCommand
from twinloop.plant.glucose.patients import get_patient, patient_names
from twinloop.plant.glucose.uva_padova import simulate
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.controllers import ControllerInput, make_controller
from twinloop.policies.glucose.mpc import MPCController, TwinPlanState, solve_plan

# plasma, tissue and subcutaneous glucose states
_GLUCOSE = [3, 4, 12]


def _state(patient, glucose_factor=1.0, scale=1.0, meals=()):
    x = np.array(patient.x0, dtype=float)
    x[_GLUCOSE] *= glucose_factor
    return TwinPlanState(0.0, tuple(x), (0.0, 0.0, 0.0, 0.0), scale, tuple(meals))


def _obs(state, carbs=0.0, glucose=120.0):
    return ControllerInput(0.0, glucose, 0.0, 0.0, carbs, 0.0, state)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("horizon_min", 60),
        ("horizon_min", 365.5),
        ("n_blocks", 7),
        ("carb_uncertainty", 1.0),
        ("low_weight", -1.0),
        ("target_mg_dl", 0.0),
        ("iterations", 0),
        ("solver", "slsqp"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(PolicyConfigError, match=field):
        MPCController(get_patient("adult#001"), **{field: value})


def test_the_plan_model_is_the_patients_uva_padova_model():
    """The prediction of a plan is the plant model's trajectory with the same inputs."""
    p = get_patient("adolescent#003")
    mpc = MPCController(p, carb_uncertainty=0.0)
    state = _state(p, 1.3, 1.0, meals=((20, 40.0),))
    rates = np.linspace(0.0, 2.0 * p.basal_u_per_h, mpc.n_blocks)
    plan = np.append(rates, 3.0)[None, :]
    predicted = mpc._simulate(state, plan, True)[0, 0]
    insulin = np.repeat(rates / 60.0, mpc.horizon_min // mpc.n_blocks)
    insulin[0] += 3.0
    meals = np.zeros(mpc.horizon_min)
    meals[20] = 40.0
    truth = simulate([p], insulin, meals, x0=np.array(state.x)[None, :])
    np.testing.assert_allclose(predicted, truth.bg_mg_dl[0], rtol=1e-9)


def test_fewer_carbs_scenario_scales_what_is_left_to_absorb():
    p = get_patient("adult#004")
    mpc = MPCController(p, carb_uncertainty=0.3)
    x = np.array(p.x0, dtype=float)
    x[0] = 30_000.0  # 30 g in the stomach (mg)
    state = TwinPlanState(0.0, tuple(x), (0.0,) * 4, 1.0, ((30, 50.0),))
    g = mpc._simulate(state, np.full((1, mpc.n_blocks), p.basal_u_per_h), False)[:, 0]
    assert g[1].max() < g[0].max()
    lean = TwinPlanState(0.0, tuple(np.where(np.arange(13) < 3, 0.7 * x, x)), (0.0,) * 4, 1.0)
    lean = TwinPlanState(0.0, lean.x, lean.meal_state, 1.0, ((30, 35.0),))
    lean_g = MPCController(p, carb_uncertainty=0.0)._simulate(
        lean, np.full((1, mpc.n_blocks), p.basal_u_per_h), False
    )[0, 0]
    np.testing.assert_allclose(g[1], lean_g, rtol=1e-9)


def test_the_first_move_rises_with_glucose_from_suspension_to_the_maximum():
    p = get_patient("adult#001")
    factors = [0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 2.0]
    doses = [MPCController(p).decide(_obs(_state(p, f))) for f in factors]
    rates = [d.basal_u_per_h for d in doses]
    assert rates[0] == 0.0  # ~55 mg/dL: suspend
    assert rates[-1] == pytest.approx(4.0 * p.basal_u_per_h)  # ~277 mg/dL: the maximum
    assert all(a <= b for a, b in itertools.pairwise(rates))
    assert rates[2] < p.basal_u_per_h < rates[4]  # ~83 mg/dL below basal, ~139 above
    assert all(d.bolus_u == 0.0 for d in doses)  # no meal, no bolus


def test_the_solution_beats_nearby_plans_on_the_nonlinear_model():
    """Local optimality on the true (nonlinear) cost once re-linearised: no random feasible
    perturbation of the solved plan is better by more than a small tolerance."""
    p = get_patient("adult#006")
    mpc = MPCController(p, iterations=3)
    state = _state(p, 1.4, 0.9, meals=((0, 60.0),))
    rates, bolus = mpc.plan(state, 60.0 / p.carb_ratio_g_per_u)
    v = np.append(rates, bolus)
    n = mpc.n_blocks
    scale = np.append(np.full(n, p.basal_u_per_h), 60.0 / p.carb_ratio_g_per_u)
    upper = np.append(np.full(n, mpc.max_rate_u_per_h), 1.3 * 60.0 / p.carb_ratio_g_per_u)

    def true_cost(plan):
        g = mpc._simulate(state, plan[None, :], True)[:, 0]
        return mpc._cost(plan, g, plan, np.zeros((2, g.shape[1] - 1, plan.size)), scale, n)[0]

    best = true_cost(v)
    basal_plan = np.append(np.full(n, p.basal_u_per_h), 60.0 / p.carb_ratio_g_per_u)
    assert best < true_cost(basal_plan)
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = np.clip(v + rng.normal(0.0, 0.15, v.size) * scale, 0.0, upper)
        assert best <= true_cost(other) * 1.02


def test_meal_bolus_is_planned_within_its_bounds():
    p = get_patient("child#002")
    mpc = MPCController(p)
    carbs = 50.0
    state = _state(p, 1.0, meals=((2, carbs),))
    dose = mpc.decide(_obs(state, carbs))
    cr_bolus = carbs / p.carb_ratio_g_per_u
    assert 0.3 * cr_bolus < dose.bolus_u <= 1.3 * cr_bolus + 1e-12


@settings(max_examples=60, deadline=None)
@given(
    patient=st.sampled_from(patient_names()),
    glucose_factor=st.floats(min_value=0.3, max_value=4.0),
    scale=st.floats(min_value=0.3, max_value=3.0),
    carbs=st.sampled_from([0.0, 10.0, 80.0]),
    stomach_g=st.floats(min_value=0.0, max_value=120.0),
)
def test_plans_stay_in_bounds_and_the_shield_holds(
    patient, glucose_factor, scale, carbs, stomach_g
):
    """Whatever the twin's state, the plan is within [0, max rate] and the bolus bound, and
    what passes the supervisor respects every limit."""
    p = get_patient(patient)
    mpc = MPCController(p)
    x = np.array(p.x0, dtype=float)
    x[_GLUCOSE] *= glucose_factor
    x[0] = stomach_g * 1000.0
    meals = ((0, carbs),) if carbs else ()
    state = TwinPlanState(0.0, tuple(x), (0.0,) * 4, scale, meals)
    dose = mpc.decide(_obs(state, carbs, glucose=min(max(x[3] / 1.9, 40.0), 400.0)))
    assert 0.0 <= dose.basal_u_per_h <= mpc.max_rate_u_per_h + 1e-12
    assert 0.0 <= dose.bolus_u <= 1.3 * carbs / p.carb_ratio_g_per_u + 1e-12
    assert np.all(np.isfinite(mpc.last_prediction_mg_dl))
    sup = SafetySupervisor(SupervisorConfig.for_patient(p))
    sup.observe_cgm(CgmReading(0.0, 120.0))
    out, _ = sup.review(0.0, InsulinCommand(0.0, dose.basal_u_per_h, dose.bolus_u, 30.0))
    cfg = sup.config
    assert 0.0 <= out.basal_u_per_h <= max(cfg.max_temp_basal_u_per_h, cfg.scheduled_basal_u_per_h)
    assert 0.0 <= out.bolus_u <= cfg.max_bolus_u


def test_without_a_twin_it_gives_basal_and_the_carb_ratio_bolus():
    p = get_patient("adult#002")
    mpc = make_controller("mpc", p)
    dose = mpc.decide(ControllerInput(0.0, 150.0, 0.0, 0.0, 45.0))
    assert dose.basal_u_per_h == p.basal_u_per_h
    assert dose.bolus_u == pytest.approx(45.0 / p.carb_ratio_g_per_u)
    assert mpc.fallbacks == 1


@pytest.mark.parametrize("twin", [True, False])
def test_in_the_loop_the_mpc_plans_on_the_twin(twin):
    p = get_patient("adult#003")
    cfg = LoopConfig(patients=(p.name,), days=1, controller="mpc", twin=twin)
    loop = PatientLoop(p, cfg, np.random.default_rng(0))
    faults = []
    loop.channels["runtime->faults"].listen(lambda ch, m: faults.append(m))
    bg = []
    loop.channels["plant->sensor"].listen(lambda ch, m: bg.append(m.bg_mg_dl))
    loop.run()
    mpc = loop.controller
    assert isinstance(mpc, MPCController)
    assert faults == []
    if twin:
        assert mpc.fallbacks == 0
        assert mpc.last_solve_s > 0.0
        assert min(bg) >= 70.0
        assert max(bg) <= 250.0
    else:
        assert mpc.fallbacks == 288
    assert all(math.isfinite(g) for g in bg)


def test_the_plan_model_applies_the_egp_scale_as_the_twin_does():
    """``egp_scale`` multiplies ``kp1`` in the planning model: the prediction is the plant
    model's with that ``kp1``, and a higher EGP gets more insulin."""
    p = get_patient("adult#002")
    mpc = MPCController(p, carb_uncertainty=0.0)
    x = np.array(p.x0, dtype=float)
    state = TwinPlanState(0.0, tuple(x), (0.0,) * 4, 1.0, (), egp_scale=1.1)
    plan = np.full((1, mpc.n_blocks), p.basal_u_per_h)
    predicted = mpc._simulate(state, plan, False)[0, 0]
    truth_p = dataclasses.replace(p, kp1_mg_per_kg_min=1.1 * p.kp1_mg_per_kg_min)
    insulin = np.full(mpc.horizon_min, p.basal_u_per_h / 60.0)
    truth = simulate([truth_p], insulin, np.zeros(mpc.horizon_min), x0=x[None, :])
    np.testing.assert_allclose(predicted, truth.bg_mg_dl[0], rtol=1e-9)
    rates = {}
    for scale in (1.0, 1.1):
        s = TwinPlanState(0.0, tuple(x), (0.0,) * 4, 1.0, (), egp_scale=scale)
        rates[scale] = MPCController(p).plan(s)[0]
    assert rates[1.1][0] > rates[1.0][0] + 0.05 * p.basal_u_per_h


def test_the_fewer_carbs_scenario_drops_the_detected_grams():
    """Detected (unannounced) grams may not come: the low-glucose scenario leaves them out,
    the nominal one keeps them."""
    p = get_patient("adult#004")
    mpc = MPCController(p, carb_uncertainty=0.3)
    x = np.array(p.x0, dtype=float)
    x[2] = 40_000.0  # 40 g in the gut, 30 g of it detected
    plan = np.full((1, mpc.n_blocks), p.basal_u_per_h)
    announced = TwinPlanState(0.0, tuple(x), (0.0,) * 4, 1.0)
    detected = TwinPlanState(0.0, tuple(x), (0.0,) * 4, 1.0, unannounced_carbs_g=30.0)
    g_ann = mpc._simulate(announced, plan, False)[:, 0]
    g_det = mpc._simulate(detected, plan, False)[:, 0]
    np.testing.assert_array_equal(g_ann[0], g_det[0])  # the nominal scenario is the same
    lean_x = x.copy()
    lean_x[2] = 0.7 * 10_000.0  # the 10 g announced, counted 30 % too high; no detected
    lean = TwinPlanState(0.0, tuple(lean_x), (0.0,) * 4, 1.0)
    lean_g = MPCController(p, carb_uncertainty=0.0)._simulate(lean, plan, False)[0, 0]
    np.testing.assert_allclose(g_det[1], lean_g, rtol=1e-9)
    assert g_det[1].max() < g_ann[1].max()


def test_the_low_scenario_can_assume_insulin_more_effective_than_the_twin_says():
    p = get_patient("adult#002")
    state = _state(p, 1.2)
    plan = np.full((1, 12), 2.0 * p.basal_u_per_h)
    plain = MPCController(p, carb_uncertainty=0.0)._simulate(state, plan, False)[:, 0]
    margin = MPCController(p, carb_uncertainty=0.0, low_scenario_sensitivity=1.3)
    g = margin._simulate(state, plan, False)[:, 0]
    np.testing.assert_allclose(g[0], plain[0], rtol=1e-12)  # the nominal scenario unchanged
    np.testing.assert_allclose(plain[1], plain[0], rtol=1e-12)
    assert g[1, -1] < g[0, -1] - 5.0  # more insulin effect: lower at the horizon's end
    with pytest.raises(PolicyConfigError, match="low_scenario_sensitivity"):
        MPCController(p, low_scenario_sensitivity=0.0)


@pytest.mark.parametrize(
    ("name", "factor", "meals", "with_bolus"),
    [
        ("adult#006", 1.4, ((0, 60.0),), True),
        ("child#002", 0.8, (), False),
        ("adolescent#003", 1.1, ((30, 40.0),), False),
    ],
)
def test_the_linearised_sensitivities_match_finite_differences_of_the_model(
    name, factor, meals, with_bolus
):
    """∂G/∂v from the impulse response and the glucose tangent model matches small-step
    forward differences of the nonlinear model, in both scenarios and for every variable."""
    p = get_patient(name)
    mpc = MPCController(p)
    nv = mpc.n_blocks + int(with_bolus)
    v = np.full(nv, 1.5 * p.basal_u_per_h)
    if with_bolus:
        v[-1] = 60.0 / p.carb_ratio_g_per_u
    state = _state(p, factor, 0.9, meals)
    mpc._simulate(state, v[None, :], with_bolus, record_states=True)
    sens = mpc._sensitivities(nv)
    fd = mpc._finite_differences(state, v, with_bolus, 0.01)[1]
    assert sens.shape == fd.shape == (2, mpc.horizon_min, nv)
    err = np.abs(sens - fd).max(axis=1) / np.abs(fd).max(axis=1)
    assert err.max() < 0.002  # measured ≤ 0.0007


def _local_problem(name, factor, scale=1.0):
    p = get_patient(name)
    mpc = MPCController(p)
    n = mpc.n_blocks
    v0 = np.full(n, p.basal_u_per_h)
    state = _state(p, factor, scale)
    g0 = mpc._simulate(state, v0[None, :], False, record_states=True)[:, 0]
    return mpc, g0, mpc._sensitivities(n), v0


@pytest.mark.parametrize(
    ("name", "factor"), [("adult#001", 0.7), ("child#002", 1.3), ("adolescent#005", 2.0)]
)
def test_the_projected_newton_solver_finds_the_box_constrained_minimum(name, factor):
    """On the local model the compiled solver reaches the minimum that a tightly converged
    L-BFGS-B finds (the problem is convex), within the bounds; below, at and above basal."""
    from scipy.optimize import minimize

    mpc, g0, sens, v0 = _local_problem(name, factor)
    n = mpc.n_blocks
    basal = mpc.basal_u_per_h
    lower, upper = np.zeros(n), np.full(n, mpc.max_rate_u_per_h)
    scale = np.full(n, basal)
    weights = np.full(n, mpc.effort_weight / n)
    consts = np.array([mpc.target_mg_dl, mpc.low_mg_dl, mpc.low_weight])
    v = solve_plan(
        g0, sens, v0, np.stack([lower, upper]), np.stack([scale, weights, scale]), consts, 50
    )
    ref = minimize(
        mpc._cost, v0, args=(g0, v0, sens, scale, n), jac=True, method="L-BFGS-B",
        bounds=list(zip(lower, upper, strict=True)),
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
    )  # fmt: skip
    assert np.all((v >= lower) & (v <= upper))
    cost = mpc._cost(v, g0, v0, sens, scale, n)[0]
    assert cost <= ref.fun + 1e-9 * abs(ref.fun)
    np.testing.assert_allclose(v, ref.x, atol=1e-3 * basal)


def test_both_solvers_plan_the_same_first_move():
    """The linearised sensitivities and the projected Newton solver move as the finite
    differences and L-BFGS-B did (the solver they replaced), within 5 % of the basal."""
    for name, factor, meals, carbs in [
        ("adult#006", 1.4, ((0, 60.0),), 60.0),
        ("child#002", 1.3, (), 0.0),
        ("adolescent#003", 0.9, ((30, 40.0),), 0.0),
    ]:
        p = get_patient(name)
        state = _state(p, factor, 1.0, meals)
        bolus_u = carbs / p.carb_ratio_g_per_u
        new = MPCController(p).plan(state, bolus_u)
        old = MPCController(p, solver="lbfgsb-fd").plan(state, bolus_u)
        assert abs(new[0][0] - old[0][0]) <= 0.05 * p.basal_u_per_h, name
        assert abs(new[1] - old[1]) <= 0.05 * max(bolus_u, 1e-9), name
