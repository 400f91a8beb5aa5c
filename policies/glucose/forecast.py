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
    glucose_tangent,
    simulate,
)
from twinloop.policies.glucose.interface import TwinPlanState

#: the model's stomach and gut states (``q_sto1``, ``q_sto2``, ``q_gut``)
GUT_STATES = slice(0, 3)
#: plasma and tissue glucose (``G_p``, ``G_t``), mg/kg
GP_STATE, GT_STATE = 3, 4
#: remote insulin action ``X`` and delayed insulin ``I_d``
X_STATE, ID_STATE = 6, 8
_NO_STATES = np.empty((0, 0, 0))


def _insulin_action_response(
    patient: PatientParameters, horizon_min: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``δX`` and ``δI_d`` over minutes 0 … H after 1 U given in minute 0, ``(H+1,)`` each.

    The insulin subsystem is linear and time-invariant (and does not see glucose), so this
    impulse response gives the insulin-action perturbation of any change of the insulin plan
    by superposition. It is the difference of two simulations of the model (the scheduled
    basal, with and without the extra unit) from the basal steady state.
    """
    h = horizon_min
    insulin = np.full((2, h), patient.basal_u_per_h / 60.0)
    insulin[1, 0] += 1.0
    tr = simulate([patient, patient], insulin, np.zeros((2, h)), return_states=True)
    assert tr.states is not None
    d = tr.states[1] - tr.states[0]
    return np.ascontiguousarray(d[:, X_STATE]), np.ascontiguousarray(d[:, ID_STATE])


class TwinScenarios:
    """Simulates insulin plans from a twin plan state (see the module docstring).

    Args:
        patient: the model the twin runs.
        horizon_min: whole minutes each plan covers.

    """

    def __init__(self, patient: PatientParameters, horizon_min: int) -> None:
        self.horizon_min = horizon_min
        self._buffers: dict[int, tuple[NDArray[np.float64], ...]] = {}
        #: the states and parameters of the last ``record_states`` call (see :meth:`simulate`)
        self.last_states: NDArray[np.float64] = _NO_STATES
        self.last_params: NDArray[np.float64] = np.empty((0, 0))
        self.swap_model(patient)

    def swap_model(self, patient: PatientParameters) -> None:
        """Simulate ``patient``'s model from now on (a re-fitted twin's)."""
        self.patient = patient
        self.params = parameter_matrix([patient])[0]
        self.vg = float(self.params[P_VG])
        self._insulin_response: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None

    def insulin_response(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``δX`` and ``δI_d`` over minutes 0 … H after 1 U in minute 0 (once per model).

        The insulin subsystem does not depend on the twin's sensitivity or EGP scales, so
        this serves every plan state and both scenarios.
        """
        if self._insulin_response is None:
            self._insulin_response = _insulin_action_response(self.patient, self.horizon_min)
        return self._insulin_response

    def glucose_response(
        self, d_x: NDArray[np.float64], d_id: NDArray[np.float64], row: int = 0
    ) -> NDArray[np.float64]:
        """First-order plasma glucose change (mg/dL) along the last recorded simulation.

        Args:
            d_x: ``(V, H+1)`` perturbations of remote insulin action ``X`` (e.g. a change of
                the insulin plan superposed from :meth:`insulin_response`).
            d_id: ``(V, H+1)`` the matching perturbations of delayed insulin ``I_d``.
            row: which plan of the last ``simulate(..., record_states=True)`` call.

        Returns:
            ``(2, V, H+1)``: each scenario's glucose change of each perturbation, the model
            linearised along that scenario's trajectory
            (:func:`twinloop.plant.glucose.uva_padova.glucose_tangent`).

        """
        rows = self.last_states.shape[0] // 2
        out = np.empty((2, d_x.shape[0], self.horizon_min + 1))
        for s in range(2):
            k = s * rows + row
            glucose_tangent(self.last_states[k], self.last_params[k], d_x, d_id, out[s])
        out /= self.vg
        return out

    def simulate(
        self,
        state: TwinPlanState,
        insulin_u_per_min: NDArray[np.float64],
        *,
        carb_uncertainty: float,
        low_sensitivity: float,
        low_glucose_cap_mg_dl: float = math.inf,
        record_states: bool = False,
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
            record_states: also keep every state of every minute and the model parameters
                of each row (scenario-major: rows ``0 … rows-1`` are scenario 0), in
                :attr:`last_states` ``(2·rows, H+1, 13)`` and :attr:`last_params`
                ``(2·rows, N_PARAMS)``, for linearising along the trajectory; the arrays are
                reused by the next call with as many rows.

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
                np.empty((r2, h + 1, N_STATES)),
            )
            self._buffers[rows] = buf
        x, meal_state, params, insulin, meal, eat, carbs, gp, gs, states = buf
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
            states_out=states if record_states else _NO_STATES,
        )  # fmt: skip
        if record_states:
            self.last_states, self.last_params = states, params
        return (gp / self.vg).reshape(2, rows, h + 1)
