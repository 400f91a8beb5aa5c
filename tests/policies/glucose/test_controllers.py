import math

import pytest

from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.controllers import (
    BasalBolusController,
    ControllerInput,
    Oref0Controller,
    PIDController,
    make_controller,
)


def _obs(t=0.0, g=120.0, iob=0.0, carbs=0.0):
    return ControllerInput(t, g, 0.0, iob, carbs)


def test_basal_bolus_meal_and_correction_from_the_profile():
    p = get_patient("adult#001")  # CR 10 g/U, CF 8.77 mg/dL/U
    c = BasalBolusController.for_patient(p)
    assert c.decide(_obs()).basal_u_per_h == pytest.approx(p.basal_u_per_h)
    assert c.decide(_obs(g=120, carbs=50)).bolus_u == pytest.approx(5.0)
    # 50 g at 200 mg/dL with 1 U on board: 5 + (200 − 120)/8.77 − 1
    c = BasalBolusController.for_patient(p)
    dose = c.decide(_obs(g=200, iob=1.0, carbs=50))
    assert dose.bolus_u == pytest.approx(5 + 80 / p.correction_factor_mg_dl_per_u - 1)
    # a second correction within 3 h is not stacked
    assert c.decide(_obs(t=60, g=200, carbs=20)).bolus_u == pytest.approx(2.0)
    assert c.decide(_obs(t=300, g=300)).bolus_u > 0  # stand-alone correction above 250
    assert c.decide(_obs(t=310, g=300)).bolus_u == 0.0  # not again within 3 h


def test_pid_raises_insulin_above_target_and_cuts_it_below_with_insulin_feedback():
    p = get_patient("adult#003")
    pid = PIDController.for_patient(p)
    assert pid.decide(_obs(g=120)).basal_u_per_h == pytest.approx(p.basal_u_per_h)
    pid = PIDController.for_patient(p)
    high = pid.decide(_obs(g=200)).basal_u_per_h
    assert high > p.basal_u_per_h
    pid = PIDController.for_patient(p)
    fed_back = pid.decide(_obs(g=200, iob=0.3)).basal_u_per_h
    assert fed_back == pytest.approx(high - pid.k_ifb_per_h * 0.3)
    pid = PIDController.for_patient(p)
    assert pid.decide(_obs(g=40)).basal_u_per_h == 0.0  # 80 below target: clipped at 0
    assert pid.decide(_obs(t=5, g=math.nan)).basal_u_per_h == p.basal_u_per_h


def test_pid_meal_feed_forward_bolus():
    p = get_patient("adult#003")
    pid = PIDController.for_patient(p)
    assert pid.decide(_obs(g=120, carbs=60)).bolus_u == pytest.approx(60 / p.carb_ratio_g_per_u)
    assert pid.decide(_obs(t=5, g=120)).bolus_u == 0.0
    half = PIDController.for_patient(p, meal_bolus_fraction=0.5)
    assert half.decide(_obs(g=120, carbs=60)).bolus_u == pytest.approx(30 / p.carb_ratio_g_per_u)
    none = PIDController.for_patient(p, meal_bolus_fraction=0.0)
    assert none.decide(_obs(g=math.nan, carbs=60)).bolus_u == 0.0


def test_pid_integral_accumulates_and_stops_when_clipped():
    pid = PIDController(1.0, 0.01, td_min=0.0)
    pid.decide(_obs(t=0, g=170))
    assert pid.decide(_obs(t=5, g=170)).basal_u_per_h == pytest.approx(1.5)  # no integral yet
    third = pid.decide(_obs(t=10, g=170)).basal_u_per_h  # integral 50 mg/dL × 5 min, / Ti
    assert third == pytest.approx(1.0 + 0.01 * (50 + 250 / 150))
    low = PIDController(1.0, 0.01, td_min=0.0)
    low.decide(_obs(t=0, g=0.0))  # u < 0: clipped
    low.decide(_obs(t=5, g=0.0))
    assert low._integral_mg_dl_min == 0.0  # anti-windup


@pytest.mark.parametrize("name", ["lqr", "policy:", "Policy:x.zip", ""])
def test_unknown_controller_lists_the_valid_names(name):
    with pytest.raises(PolicyConfigError, match="basal-bolus, pid, oref0, mpc, or policy:PATH"):
        make_controller(name, get_patient("adult#001"))


def _obs5(t, g, iob=0.0, carbs=0.0, activity=0.0, age=0.0):
    return ControllerInput(t, g, age, iob, carbs, activity)


def test_oref0_limits_and_thresholds_follow_the_openaps_rules():
    p = get_patient("adult#002")
    c = Oref0Controller.for_patient(p)
    basal = p.basal_u_per_h
    assert c.suspend_threshold_mg_dl == pytest.approx(100 - 0.5 * (100 - 40))  # 70
    assert c.max_safe_basal_u_per_h() == pytest.approx(min(3 * basal, 3 * basal, 4 * basal))
    tight = Oref0Controller.for_patient(p, max_basal_u_per_h=1.5 * basal)
    assert tight.max_safe_basal_u_per_h() == pytest.approx(1.5 * basal)


def test_oref0_decisions_from_eventual_glucose():
    p = get_patient("adult#002")
    isf, basal = p.correction_factor_mg_dl_per_u, p.basal_u_per_h
    # in range and flat: the scheduled basal
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 110))
    assert c.decide(_obs5(5, 110)).basal_u_per_h == pytest.approx(basal)
    # high and flat, no insulin on board: basal + 2 × (eventual − target)/ISF, capped
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 160))
    want = min(basal + 2 * (160 - 110) / isf, c.max_safe_basal_u_per_h())
    assert c.decide(_obs5(5, 160)).basal_u_per_h == pytest.approx(want)
    # the same glucose with enough insulin on board: eventual glucose in range, no extra
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 160, iob=50 / isf))
    assert c.decide(_obs5(5, 160, iob=50 / isf)).basal_u_per_h == pytest.approx(basal)
    # falling fast towards the threshold: eventual below it → zero temp
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 120))
    assert c.decide(_obs5(5, 108)).basal_u_per_h == 0.0  # 108 − 6·12 = 36 < 70
    # below the threshold itself → zero temp whatever the trend
    c = Oref0Controller.for_patient(p)
    assert c.decide(_obs5(0, 65)).basal_u_per_h == 0.0
    # eventual a little below min_bg: a reduced temp, proportional to the deficit
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 95))
    assert c.decide(_obs5(5, 95)).basal_u_per_h == pytest.approx(
        max(0.0, basal + 2 * (95 - 110) / isf)
    )
    # a rise that insulin activity explains is no deviation: a negative net activity (less
    # insulin than the scheduled basal) has BGI = +4 mg/dL per 5 min, the same as the rise
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 110))
    explained = c.decide(_obs5(5, 114, activity=-4 / (isf * 5))).basal_u_per_h
    c = Oref0Controller.for_patient(p)
    c.decide(_obs5(0, 110))
    unexplained = c.decide(_obs5(5, 114)).basal_u_per_h
    assert explained == pytest.approx(basal)  # eventual = 114: in range
    assert unexplained > basal  # eventual = 114 + 6·4 = 138: above range


def test_oref0_meal_bolus_and_carbs_on_board():
    p = get_patient("adult#001")
    c = Oref0Controller.for_patient(p)
    dose = c.decide(_obs5(0, 110, carbs=60))
    assert dose.bolus_u == pytest.approx(60 / p.carb_ratio_g_per_u)
    assert c._cob_g == 60
    c.decide(_obs5(60, 110))
    assert c._cob_g == pytest.approx(30)  # 30 g/h absorbed
    no_bolus = Oref0Controller.for_patient(p, meal_bolus=False)
    assert no_bolus.decide(_obs5(0, 110, carbs=60)).bolus_u == 0.0


def test_oref0_without_recent_glucose_runs_the_scheduled_basal():
    p = get_patient("adult#001")
    c = Oref0Controller.for_patient(p)
    assert c.decide(_obs5(0, math.nan)).basal_u_per_h == p.basal_u_per_h
    assert c.decide(_obs5(5, 300, age=20)).basal_u_per_h == p.basal_u_per_h


def test_oref0_runs_in_the_loop_and_keeps_adults_in_range():
    import tempfile

    from twinloop.agents.glucose.loop import LoopConfig
    from twinloop.agents.glucose.run import run_cohort

    cfg = LoopConfig(patients=("adult#001", "adult#005"), days=1, controller="oref0")
    with tempfile.TemporaryDirectory() as tmp:
        _, summary = run_cohort(cfg, tmp, progress=False)
    adults = summary["cohorts"]["adults"]
    assert adults["time_in_range_70_180_pct"] > 85.0
    assert adults["time_below_54_pct"] < 1.0
