"""Glucose forecasts of insulin plans from the twin's view of the patient, in two scenarios.

Shared by the planning controller (:mod:`twinloop.policies.glucose.mpc`) and the supervisor's
predictive bolus guard (:mod:`twinloop.agents.glucose.supervisor`): both ask "where does plasma
glucose go if this insulin is delivered from the twin's current state?".

From a :class:`TwinPlanState` each plan (a row of insulin, U per minute, over the horizon) is
simulated on the twin's model (:mod:`twinloop.plant.glucose.uva_padova`; ``Vmx`` and ``kp3``
× the twin's sensitivity scale, ``kp1`` × its EGP scale) in two scenarios:

0. the twin's nominal view, with the announced meals still to come;
1. the *fewer-carbohydrates* scenario: the grams the twin detected but nobody announced are left
   out (they may not come), the carbohydrates still to be absorbed and the announced meals are
   scaled by ``1 − carb_uncertainty`` (a meal counted too high), and insulin is
   ``low_sensitivity`` × as effective as the twin says (a model whose sensitivity may be off),
   and it starts from glucose no higher than ``low_glucose_cap_mg_dl`` (the sensor's reading).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.glucose.patients import N_STATES, PatientParameters, parameter_matrix
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    M_PLANNED_G,
    MG_PER_G,
    N_MEAL_STATE,
    P_KP1,
    P_KP3,
    P_VG,
    P_VMX,
    advance,
)
from twinloop.policies.glucose.interface import TwinPlanState

#: the model's stomach and gut states (``q_sto1``, ``q_sto2``, ``q_gut``)
GUT_STATES = slice(0, 3)
#: plasma and tissue glucose (``G_p``, ``G_t``), mg/kg
GP_STATE, GT_STATE = 3, 4


class TwinScenarios:
    """Simulates insulin plans from a twin plan state (see the module docstring).

    Args:
        patient: the model the twin runs.
        horizon_min: whole minutes each plan covers.

    """

    def __init__(self, patient: PatientParameters, horizon_min: int) -> None:
        self.horizon_min = horizon_min
        self._buffers: dict[int, tuple[NDArray[np.float64], ...]] = {}
        self.swap_model(patient)

    def swap_model(self, patient: PatientParameters) -> None:
        """Simulate ``patient``'s model from now on (a re-fitted twin's)."""
        self.patient = patient
        self.params = parameter_matrix([patient])[0]
        self.vg = float(self.params[P_VG])

    def simulate(
        self,
        state: TwinPlanState,
        insulin_u_per_min: NDArray[np.float64],
        *,
        carb_uncertainty: float,
        low_sensitivity: float,
        low_glucose_cap_mg_dl: float = math.inf,
    ) -> NDArray[np.float64]:
        """Plasma glucose (mg/dL) of each plan over minutes 0 … H, shape ``(2, rows, H+1)``.

        Args:
            state: the twin's view at the tick.
            insulin_u_per_min: ``(rows, H)`` insulin of each plan, U per minute (a bolus is
                the first minute's extra).
            carb_uncertainty: the fewer-carbohydrates scenario's fraction of carbohydrates
                left out, ``0 <= value < 1``.
            low_sensitivity: that scenario's insulin sensitivity relative to the twin's.
            low_glucose_cap_mg_dl: that scenario starts from at most this plasma glucose
                (plasma and tissue glucose scaled together), e.g. the sensor's reading: a
                twin that believes glucose higher than the sensor shows must not give the
                pessimistic forecast its head start.

        """
        rows = insulin_u_per_min.shape[0]
        h = self.horizon_min
        buf = self._buffers.get(rows)
        if buf is None:
            r2 = 2 * rows
            buf = (
                np.empty((r2, N_STATES)),
                np.empty((r2, N_MEAL_STATE)),
                np.empty((r2, self.params.size)),
                np.empty((r2, h)),
                np.zeros((r2, h)),
                np.full(r2, DEFAULT_EAT_RATE_G_PER_MIN),
                np.empty((r2, h)),
                np.empty((r2, h + 1)),
                np.empty((r2, h + 1)),
            )
            self._buffers[rows] = buf
        x, meal_state, params, insulin, meal, eat, carbs, gp, gs = buf
        keep = 1.0 - carb_uncertainty
        x[:] = state.x
        # the fewer-carbohydrates scenario: the detected (unannounced) grams do not come at
        # all, the announced ones are counted too high by carb_uncertainty
        gut = float(np.sum(x[0, GUT_STATES]))
        detected = min(max(state.unannounced_carbs_g * MG_PER_G, 0.0), gut)
        x[rows:, GUT_STATES] *= keep * (1.0 - detected / gut) if gut > 0.0 else keep
        bg = x[0, GP_STATE] / self.vg
        if bg > low_glucose_cap_mg_dl:
            x[rows:, GP_STATE] *= low_glucose_cap_mg_dl / bg
            x[rows:, GT_STATE] *= low_glucose_cap_mg_dl / bg
        meal_state[:] = state.meal_state
        meal_state[rows:, M_PLANNED_G] *= keep
        params[:] = self.params
        params[:, P_VMX] *= state.sensitivity_scale
        params[:, P_KP3] *= state.sensitivity_scale
        params[:, P_KP1] *= state.egp_scale
        params[rows:, P_VMX] *= low_sensitivity
        params[rows:, P_KP3] *= low_sensitivity
        insulin[:rows] = insulin_u_per_min
        insulin[rows:] = insulin_u_per_min
        meal[:] = 0.0
        for offset, grams in state.pending_meals:
            if 0 <= offset < h:
                meal[:rows, offset] += grams
                meal[rows:, offset] += keep * grams
        advance(
            x, meal_state, params, insulin, meal, eat,
            carbs_out=carbs, gp_out=gp, gs_out=gs, parallel=False, check=False,
        )  # fmt: skip
        return (gp / self.vg).reshape(2, rows, h + 1)
