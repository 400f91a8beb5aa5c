import math

import pytest

from plant.patients import get_patient
from policies.controllers import (
    BasalBolusController,
    ControllerInput,
    PIDController,
    make_controller,
)
from policies.errors import PolicyConfigError


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
    fed_back = pid.decide(_obs(g=200, iob=3.0)).basal_u_per_h
    assert fed_back == pytest.approx(high - 0.5 * 3.0)
    pid = PIDController.for_patient(p)
    assert pid.decide(_obs(g=60)).basal_u_per_h == 0.0
    assert pid.decide(_obs(t=5, g=math.nan)).basal_u_per_h == p.basal_u_per_h


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


def test_unknown_controller_lists_the_valid_names():
    with pytest.raises(PolicyConfigError, match="basal-bolus, pid"):
        make_controller("mpc", get_patient("adult#001"))
