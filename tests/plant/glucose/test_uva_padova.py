import numpy as np
import pytest

from twinloop.plant.errors import InvalidInputError
from twinloop.plant.glucose.patients import get_patient, resolve_patients
from twinloop.plant.glucose.uva_padova import simulate

ACCURACY_BAR_MG_DL = 0.5  # issue #2: plasma glucose within 0.5 mg/dL at every minute


def test_reproduces_simglucose_scenario_a_for_all_30_patients(reference_a):
    patients = resolve_patients(reference_a.patients)
    traj = simulate(patients, reference_a.insulin_u_per_min, reference_a.meal_g)
    err = np.abs(traj.bg_mg_dl - reference_a.bg_mg_dl)
    worst = int(np.argmax(err.max(axis=1)))
    assert err.max() < ACCURACY_BAR_MG_DL, (
        f"{reference_a.patients[worst]} deviates by {err.max():.4f} mg/dL"
    )
    assert np.abs(traj.gsub_mg_dl - reference_a.gsub_mg_dl).max() < ACCURACY_BAR_MG_DL


def test_meals_are_swallowed_at_the_eat_rate(reference_a):
    patients = resolve_patients(["adult#001"])
    traj = simulate(patients, reference_a.insulin_u_per_min[10], reference_a.meal_g[10])
    carbs = traj.carbs_g_per_min[0]
    assert carbs[420:429].tolist() == [5.0] * 9  # 45 g at 5 g/min starting 07:00
    assert carbs[429] == 0.0
    assert carbs.sum() == pytest.approx(45 + 70 + 80)
    slow = simulate(
        patients,
        reference_a.insulin_u_per_min[10],
        reference_a.meal_g[10],
        eat_rate_g_per_min=2.5,
    )
    assert slow.carbs_g_per_min[0][420:438].tolist() == [2.5] * 18


def test_batch_equals_single_patient_runs_and_parallel_equals_serial(reference_a):
    patients = resolve_patients(reference_a.patients)
    batch = simulate(patients, reference_a.insulin_u_per_min, reference_a.meal_g, parallel=True)
    serial = simulate(patients, reference_a.insulin_u_per_min, reference_a.meal_g, parallel=False)
    np.testing.assert_array_equal(batch.bg_mg_dl, serial.bg_mg_dl)
    for i in (0, 15, 29):
        one = simulate(patients[i : i + 1], reference_a.insulin_u_per_min[i], reference_a.meal_g[i])
        np.testing.assert_array_equal(one.bg_mg_dl[0], batch.bg_mg_dl[i])


def test_basal_steady_state_stays_put():
    p = get_patient("adult#004")
    traj = simulate([p], np.full(600, p.basal_u_per_min), np.zeros(600), return_states=True)
    assert traj.states is not None
    np.testing.assert_allclose(traj.states[0, -1], traj.states[0, 0], rtol=1e-6, atol=1e-6)
    assert traj.bg_mg_dl[0, 0] == pytest.approx(p.initial_bg_mg_dl)


def test_more_insulin_lowers_glucose_and_carbs_raise_it():
    p = get_patient("child#003")
    base = simulate([p], np.full(240, p.basal_u_per_min), np.zeros(240)).bg_mg_dl[0, -1]
    ins = np.full(240, p.basal_u_per_min)
    ins[0] += 2.0
    assert simulate([p], ins, np.zeros(240)).bg_mg_dl[0, -1] < base - 10
    meal = np.zeros(240)
    meal[0] = 30.0
    assert simulate([p], np.full(240, p.basal_u_per_min), meal).bg_mg_dl[0, -1] > base + 10


def test_substeps_converge_to_the_same_solution(reference_a):
    patients = resolve_patients(reference_a.patients[:3])
    one = simulate(patients, reference_a.insulin_u_per_min[:3], reference_a.meal_g[:3])
    eight = simulate(
        patients, reference_a.insulin_u_per_min[:3], reference_a.meal_g[:3], substeps=8
    )
    assert np.abs(one.bg_mg_dl - eight.bg_mg_dl).max() < 0.01


@pytest.mark.parametrize(
    ("insulin", "meals", "match"),
    [
        ([0.1, -0.1], [0, 0], "negative value"),
        ([0.1, np.nan], [0, 0], "non-finite"),
        ([0.1, 0.1], [0, 0, 0], "different minutes"),
        ([[0.1, 0.1]] * 3, [0, 0], "expected shape"),
    ],
)
def test_bad_inputs_are_refused(insulin, meals, match):
    with pytest.raises(InvalidInputError, match=match):
        simulate([get_patient("adult#001")], insulin, meals)


def test_a_collapsed_patient_never_goes_negative_and_a_meal_brings_it_back():
    # issue 19: an insulin overdose drove child#008's plasma glucose below zero, where the
    # frozen derivative held it for good (100 g meals changed nothing). Four times the basal
    # rate after a 5 U bolus keeps the liver suppressed, so only the meal can lift it.
    p = get_patient("child#008")
    minutes, meal_at = 12 * 60, 8 * 60
    insulin = np.full(minutes, 4 * p.basal_u_per_min)
    insulin[0] += 5.0
    meals = np.zeros(minutes)
    meals[meal_at] = 100.0
    traj = simulate([p], insulin, meals, return_states=True)
    bg = traj.bg_mg_dl[0]
    assert traj.states is not None
    masses = np.delete(traj.states[0], 6, axis=1)  # all but X (insulin action, may be < 0)
    assert masses.min() >= 0.0
    assert bg[:meal_at].min() == 0.0  # it did collapse before the meal ...
    assert bg[meal_at - 30 : meal_at + 1].max() < 1.0
    assert bg[meal_at : meal_at + 60].max() > 70.0  # ... and 100 g bring it back within 1 h
