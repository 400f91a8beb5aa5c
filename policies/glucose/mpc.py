"""Model predictive control of insulin, planning on the twin estimator's UVA/Padova model.

At each control tick the controller receives the twin's current view of the patient
(:class:`TwinPlanState`: the 13 model states, the eating process, the adapted insulin
sensitivity and endogenous glucose production, the carbohydrates it detected beyond the
announced, and the announced meals that have not started) and plans the insulin of the next
``horizon_min`` minutes on that model (:mod:`twinloop.plant.glucose.uva_padova`, the twin's
model's parameters with ``Vmx`` and ``kp3`` scaled by the twin's sensitivity estimate and
``kp1`` by its EGP scale, exactly as the twin predicts).

Decision variables
------------------
``n_blocks`` piecewise-constant basal rates ``u_j`` (U/h), block ``j`` covering minutes
``[j·B, (j+1)·B)`` with ``B = horizon_min / n_blocks``, bounded to ``[0, max_rate_u_per_h]``; and,
on a tick where carbohydrates are announced, a meal bolus ``b`` (U) in
``[0, max_meal_bolus_fraction · carbs/CR]`` delivered in the tick's first minute. Only the first
block's rate is applied (as a 30-min temp basal, replaced at the next tick) — the receding
horizon.

Cost
----
Over the predicted plasma glucose of minutes ``k = 1 … H`` in two scenarios — ``G_k``, the
twin's, and ``Ǧ_k``, the same with the carbohydrates still to be absorbed (stomach, gut, the
meal being eaten, the announced meals) scaled by ``1 − carb_uncertainty`` (a meal counted too
high, the usual cause of a post-meal low) after leaving out the grams the twin detected but
nobody announced (``TwinPlanState.unannounced_carbs_g``: they may not come)::

    J = (1/H) Σ_k [ (G_k − target)² + low_weight · (max(0, low − G_k)² + max(0, low − Ǧ_k)²) ]
        + effort_weight · (1/n_blocks) Σ_j ((u_j − basal)/basal)²
        + bolus_weight · (b / (carbs/CR))²

a quadratic deviation from the target, a heavier (added) quadratic penalty below ``low``
(``low_mg_dl``) in both scenarios (a scenario-based robust MPC on the counting error), and the
insulin effort as the deviation of the rates from the scheduled basal (in units of it) and the
meal bolus in units of the carb-ratio bolus.

Solver: successive linearisation
--------------------------------
The model's glucose response to insulin is smooth but nonlinear (Michaelis–Menten utilisation,
renal clearance, the floor of the liver's production). Each iteration simulates the plan in
both scenarios on the nonlinear model (one compiled call, every state of every minute kept),
which gives the trajectory ``G⁰``, and linearises the model along it for the sensitivity
matrix ``S = ∂G/∂v``:

* the insulin subsystem is linear and time-invariant and does not see glucose, so the change
  of remote insulin action ``X`` and delayed insulin ``I_d`` that one unit of a decision
  variable causes is the model's impulse response superposed over the block (or the bolus
  minute); the response is simulated once per model and reused at every tick;
* glucose sees insulin only through ``X`` (utilisation) and ``I_d`` (production), so ``S`` is
  the response of the two glucose states ``G_p``, ``G_t`` linearised along each scenario's
  trajectory (:func:`twinloop.plant.glucose.uva_padova.glucose_tangent`; Heun, one step per
  minute), for all the variables at once: no simulation per perturbation. It matches
  small-step finite differences of the nonlinear model to about 0.1 %
  (``tests/policies/glucose/test_mpc.py``).

On the local model ``G ≈ G⁰ + S (v − v⁰)`` the cost is a convex, piecewise-quadratic function
of ``v``; it is minimised under the bounds by a compiled projected Newton method
(:func:`solve_plan`: the exact Hessian of the current pieces, Newton steps on the variables not
held at a bound, an Armijo search along the projection onto the box; a few iterations). The
plan is linearised ``iterations`` times, each around the previous solution (sequential convex
programming), and the final plan is kept only if the *nonlinear* model's cost is no worse
than that of the nominal plan. The nominal plan of a tick is the previous tick's solution
(warm start), or the scheduled basal. A tick thus costs two nonlinear simulations of one plan
in two scenarios (the nominal plan, the solution) whatever the number of decision variables.
``solver="lbfgsb-fd"`` keeps the solver this replaced (finite-difference sensitivities, one
nonlinear simulation per variable, and scipy's L-BFGS-B) to compare the two.

Parameters from the clinical profile (:meth:`MPCController.for_patient`): the scheduled basal,
the carb ratio, and the maximum rate = 4 × the scheduled basal (the supervisor's maximum temp
basal, the OpenAPS 4 × current-basal rule). The tuning is documented on
:class:`MPCController`.

Without a twin state (a loop without a twin, or the twin failed this tick) the controller
falls back to the scheduled basal and the carb-ratio meal bolus, and counts the fallback in
:attr:`MPCController.fallbacks`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from twinloop.plant.glucose.patients import PatientParameters
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.forecast import TwinScenarios
from twinloop.policies.glucose.interface import ControllerInput, Dose, TwinPlanState


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PolicyConfigError(f"{name}={value!r} is not allowed: a number > 0")
    if not math.isfinite(value):
        raise PolicyConfigError(f"{name}={value!r} is not allowed: a finite number > 0")


#: projected Newton iterations per solve at most (it converges in a few)
_MAX_NEWTON_ITERATIONS = 50


@numba.njit(cache=True, error_model="numpy")
def _trajectory_cost(
    g_nom: NDArray[np.float64],
    g_low: NDArray[np.float64],
    v: NDArray[np.float64],
    terms: NDArray[np.float64],
    consts: NDArray[np.float64],
) -> float:
    """The cost of the module docstring for glucose ``g_nom``, ``g_low`` (minutes 1 … H).

    ``terms`` is ``(3, V)``: each variable's effort reference (the basal, or 0 for the bolus),
    weight and scale; ``consts`` the target, the low threshold and the low penalty's weight.
    """
    ref, weights, scale = terms[0], terms[1], terms[2]
    target, low, low_weight = consts[0], consts[1], consts[2]
    h = g_nom.size
    acc = 0.0
    for k in range(h):
        e = g_nom[k] - target
        a = low - g_nom[k] if g_nom[k] < low else 0.0
        b = low - g_low[k] if g_low[k] < low else 0.0
        acc += e * e + low_weight * (a * a + b * b)
    cost = acc / h
    for j in range(v.size):
        r = (v[j] - ref[j]) / scale[j]
        cost += weights[j] * r * r
    return cost


@numba.njit(cache=True, error_model="numpy")
def _local_glucose(
    g0: NDArray[np.float64],
    sens: NDArray[np.float64],
    dv: NDArray[np.float64],
    g_nom: NDArray[np.float64],
    g_low: NDArray[np.float64],
) -> None:
    """``G = g0 + S·dv`` on minutes 1 … H for both scenarios (the local linear model)."""
    h = g_nom.size
    for k in range(h):
        a = g0[0, k + 1]
        b = g0[1, k + 1]
        for j in range(dv.size):
            a += sens[0, k, j] * dv[j]
            b += sens[1, k, j] * dv[j]
        g_nom[k] = a
        g_low[k] = b


@numba.njit(cache=True, error_model="numpy")
def solve_plan(
    g0: NDArray[np.float64],
    sens: NDArray[np.float64],
    v0: NDArray[np.float64],
    bounds: NDArray[np.float64],
    terms: NDArray[np.float64],
    consts: NDArray[np.float64],
    max_iter: int,
) -> NDArray[np.float64]:
    """Minimise the cost on the local model ``G = g0 + S (v − v0)`` within the bounds.

    Projected Newton (Bertsekas 1982): the variables at a bound whose gradient points out of
    the box are held there; on the others a Newton step with the exact Hessian of the
    piecewise-quadratic cost (the low penalty's pieces as the current point has them), then a
    backtracking (Armijo) search along the projection onto the box. Converges in a few
    iterations (the cost is convex and its pieces quadratic). ``g0`` is ``(2, H+1)`` (the
    nominal and the fewer-carbohydrates scenario, minute 0 first), ``sens`` ``(2, H, V)``,
    ``bounds`` ``(2, V)`` the lower and upper bounds; ``terms`` and ``consts`` as in
    :func:`_trajectory_cost`.
    """
    lower, upper = bounds[0], bounds[1]
    ref, weights, scale = terms[0], terms[1], terms[2]
    target, low, low_weight = consts[0], consts[1], consts[2]
    nv = v0.size
    h = sens.shape[1]
    # the Hessian of the deviation and effort terms (constant): (2/H) S0ᵀ S0 + diag
    base = np.zeros((nv, nv))
    for k in range(h):
        for a in range(nv):
            sa = sens[0, k, a]
            for b in range(a + 1):
                base[a, b] += sa * sens[0, k, b]
    for a in range(nv):
        for b in range(a + 1):
            base[a, b] *= 2.0 / h
            base[b, a] = base[a, b]
        base[a, a] += 2.0 * weights[a] / (scale[a] * scale[a])
    v = np.minimum(np.maximum(v0, lower), upper)
    g_nom = np.empty(h)
    g_low = np.empty(h)
    grad = np.empty(nv)
    hess = np.empty((nv, nv))
    step = np.empty(nv)
    trial = np.empty(nv)
    free = np.empty(nv, dtype=np.bool_)
    _local_glucose(g0, sens, v - v0, g_nom, g_low)
    cost = _trajectory_cost(g_nom, g_low, v, terms, consts)
    for _ in range(max_iter):
        # gradient, and the low-penalty rows of the Hessian
        for a in range(nv):
            grad[a] = 2.0 * weights[a] * (v[a] - ref[a]) / (scale[a] * scale[a])
            for b in range(nv):
                hess[a, b] = base[a, b]
        for k in range(h):
            e = 2.0 * (g_nom[k] - target)
            if g_nom[k] < low:
                e -= 2.0 * low_weight * (low - g_nom[k])
                c = 2.0 * low_weight / h
                for a in range(nv):
                    for b in range(nv):
                        hess[a, b] += c * sens[0, k, a] * sens[0, k, b]
            for a in range(nv):
                grad[a] += e * sens[0, k, a] / h
            if g_low[k] < low:
                e1 = -2.0 * low_weight * (low - g_low[k])
                c = 2.0 * low_weight / h
                for a in range(nv):
                    grad[a] += e1 * sens[1, k, a] / h
                    for b in range(nv):
                        hess[a, b] += c * sens[1, k, a] * sens[1, k, b]
        worst = 0.0
        for a in range(nv):
            at_low = v[a] <= lower[a] and grad[a] > 0.0
            at_high = v[a] >= upper[a] and grad[a] < 0.0
            free[a] = not (at_low or at_high)
            if free[a]:
                worst = max(worst, abs(grad[a]) * scale[a])
        if worst < 1e-9:
            break
        # Newton step on the free variables: Cholesky of their Hessian
        idx = np.nonzero(free)[0]
        nf = idx.size
        m = np.empty((nf, nf))
        rhs = np.empty(nf)
        for a in range(nf):
            rhs[a] = -grad[idx[a]]
            for b in range(nf):
                m[a, b] = hess[idx[a], idx[b]]
        for a in range(nf):
            d = m[a, a]
            for c2 in range(a):
                d -= m[a, c2] * m[a, c2]
            d = math.sqrt(d) if d > 1e-300 else 1e-150
            m[a, a] = d
            for b in range(a + 1, nf):
                t = m[b, a]
                for c2 in range(a):
                    t -= m[b, c2] * m[a, c2]
                m[b, a] = t / d
        for a in range(nf):  # forward, then back substitution
            t = rhs[a]
            for c2 in range(a):
                t -= m[a, c2] * rhs[c2]
            rhs[a] = t / m[a, a]
        for a in range(nf - 1, -1, -1):
            t = rhs[a]
            for c2 in range(a + 1, nf):
                t -= m[c2, a] * rhs[c2]
            rhs[a] = t / m[a, a]
        step[:] = 0.0
        for a in range(nf):
            step[idx[a]] = rhs[a]
        t = 1.0
        new_cost = cost
        for _ls in range(40):
            for a in range(nv):
                trial[a] = min(max(v[a] + t * step[a], lower[a]), upper[a])
            _local_glucose(g0, sens, trial - v0, g_nom, g_low)
            new_cost = _trajectory_cost(g_nom, g_low, trial, terms, consts)
            decrease = 0.0
            for a in range(nv):
                decrease += grad[a] * (trial[a] - v[a])
            if new_cost <= cost + 1e-4 * decrease:
                break
            t *= 0.5
        if not new_cost < cost:
            _local_glucose(g0, sens, v - v0, g_nom, g_low)
            break
        done = cost - new_cost <= 1e-13 * (1.0 + abs(cost))
        v[:] = trial
        cost = new_cost
        if done:
            break
    return v


@dataclasses.dataclass
class MPCController:
    """Receding-horizon insulin planning on the twin (see the module docstring).

    Args:
        patient: the patient whose model the twin runs (its parameters, basal, carb ratio).
        horizon_min: prediction horizon, minutes (>= 120, a multiple of ``n_blocks``).
        n_blocks: piecewise-constant basal moves over the horizon.
        target_mg_dl: glucose target of the cost.
        low_mg_dl: below it the extra low-glucose penalty applies.
        low_weight: weight of that penalty relative to the deviation from the target.
        effort_weight: weight of the rates' deviation from the basal (in basal units)².
        bolus_weight: weight of the meal bolus (in carb-ratio bolus units)².
        max_rate_factor: maximum rate as a multiple of the scheduled basal.
        max_meal_bolus_fraction: upper bound of the meal bolus, × carbs/CR.
        carb_uncertainty: relative error of the carbohydrates the twin believes are still to
            be absorbed, guarded against in the low-glucose penalty (the counting error of the
            announced grams: ±30 % in the evaluation protocol).
        low_scenario_sensitivity: insulin sensitivity of the fewer-carbohydrates scenario
            relative to the twin's (``Vmx`` and ``kp3`` × this; 1 = the twin's): a margin for a
            model whose sensitivity may be off. 1.3 removed adult#009's lows under unannounced
            meals on its fitted twin but cost about 2 TIR points over four hard patients, so
            the default stays 1.
        iterations: linearisations per tick (1 = one convex solve).
        solver: ``"newton"`` (the linearised sensitivities and the compiled projected Newton
            solver of the module docstring) or ``"lbfgsb-fd"``, the solver before it
            (finite-difference sensitivities, one nonlinear simulation per decision variable,
            and scipy's L-BFGS-B), kept to compare the two side by side
            (``benchmarks/mpc_solve_time.py``).

    Tuning (cohorts of 10, 3 days, random meals with ±30 % counting error, seed 0; TIR / time
    below 70 / below 54, %): with a 4-h horizon and no carbohydrate scenario, adults
    98.1 / 0.7 / 0.6 and children 89.9 / 1.2 / 0.9 — overcounted meals (adult#009, child#008)
    drove glucose to ~30 mg/dL; the fewer-carbohydrates scenario removed adult#009's low; a 6-h
    horizon (the insulin's duration of action: a meal bolus can cause a low 5 h later, beyond a
    4-h horizon) removed child#008's: adults 97.9 / 0 / 0, adolescents 86.7 / 0 / 0, children
    89.7 / 0.2 / 0. One linearisation instead of two: children 89.2 / 0.2 / 0.05, adolescents
    86.7 / 0 / 0, at half the solve time (~4 ms instead of ~7 ms per tick on this machine).
    Other weights (target 120 mg/dL, low penalty 30× below 90 mg/dL, effort 100) were not
    searched.

    """

    patient: PatientParameters
    horizon_min: int = 360
    n_blocks: int = 12
    target_mg_dl: float = 120.0
    low_mg_dl: float = 90.0
    low_weight: float = 30.0
    effort_weight: float = 100.0
    bolus_weight: float = 100.0
    max_rate_factor: float = 4.0
    max_meal_bolus_fraction: float = 1.3
    carb_uncertainty: float = 0.3
    low_scenario_sensitivity: float = 1.0
    iterations: int = 1
    solver: str = "newton"
    #: ticks without a twin state (scheduled basal and carb-ratio bolus given instead)
    fallbacks: int = dataclasses.field(default=0, init=False)
    #: wall time of the last plan, seconds
    last_solve_s: float = dataclasses.field(default=0.0, init=False)
    #: the last plan's predicted plasma glucose, mg/dL (minutes 0 … horizon)
    last_prediction_mg_dl: NDArray[np.float64] | None = dataclasses.field(default=None, init=False)

    #: the loop gives this controller the twin's plan state (see ``ControllerInput.twin``)
    needs_twin = True

    def __post_init__(self) -> None:
        h, n = self.horizon_min, self.n_blocks
        if isinstance(h, bool) or not isinstance(h, int) or not 120 <= h <= 720:
            raise PolicyConfigError(f"horizon_min={h!r} is not allowed: whole minutes, 120..720")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 48 or h % n:
            raise PolicyConfigError(
                f"n_blocks={n!r} is not allowed: 1..48 and dividing horizon_min ({h})"
            )
        cu = self.carb_uncertainty
        if isinstance(cu, bool) or not isinstance(cu, int | float) or not 0 <= cu < 1:
            raise PolicyConfigError(f"carb_uncertainty={cu!r} is not allowed: 0 <= value < 1")
        if self.solver not in ("newton", "lbfgsb-fd"):
            raise PolicyConfigError(
                f"solver={self.solver!r} is not allowed: 'newton' or 'lbfgsb-fd'"
            )
        if isinstance(self.iterations, bool) or self.iterations not in range(1, 6):
            raise PolicyConfigError(f"iterations={self.iterations!r} is not allowed: 1..5")
        for name in (
            "target_mg_dl",
            "low_mg_dl",
            "max_rate_factor",
            "max_meal_bolus_fraction",
            "low_scenario_sensitivity",
        ):
            _positive(name, getattr(self, name))
        for name in ("low_weight", "effort_weight", "bolus_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise PolicyConfigError(f"{name}={value!r} is not allowed: a number >= 0")
        self.basal_u_per_h = self.patient.basal_u_per_h
        self.max_rate_u_per_h = self.max_rate_factor * self.basal_u_per_h
        self.carb_ratio_g_per_u = self.patient.carb_ratio_g_per_u
        self._scenarios = TwinScenarios(self.patient, h)
        self._block = h // n
        self._warm: NDArray[np.float64] | None = None  # previous plan's rates, U/h
        self._set_responses()

    @classmethod
    def for_patient(cls, patient: PatientParameters, **overrides: Any) -> MPCController:
        """The controller of ``patient`` (basal, carb ratio and model from its profile)."""
        return cls(patient, **overrides)

    def swap_model(self, patient: PatientParameters) -> None:
        """Plan on ``patient``'s model from the next tick (a re-fitted twin's; see the loop).

        Only the model changes: the clinical settings (scheduled basal, carb ratio, maximum
        rate) stay the person's, and the previous plan stays the warm start. The twin's plan
        state must be of the same model (the loop swaps the twin's model first).
        """
        self.patient = patient
        self._scenarios.swap_model(patient)
        self._set_responses()

    # --- the decision --------------------------------------------------------------------

    def decide(self, obs: ControllerInput) -> Dose:
        """Plan on ``obs.twin`` and return the first move (a temp basal) and the meal bolus."""
        carbs = max(float(obs.meal_carbs_g), 0.0)
        meal_bolus_u = carbs / self.carb_ratio_g_per_u
        state = obs.twin
        if state is None:
            self.fallbacks += 1
            self._warm = None
            return Dose(self.basal_u_per_h, meal_bolus_u)
        began = time.perf_counter()
        rates, bolus = self.plan(state, meal_bolus_u)
        self.last_solve_s = time.perf_counter() - began
        return Dose(float(rates[0]), float(bolus))

    def plan(
        self, state: TwinPlanState, meal_bolus_u: float = 0.0
    ) -> tuple[NDArray[np.float64], float]:
        """The optimal plan from ``state``: block rates (U/h) and the meal bolus (U).

        Args:
            state: the twin's view at the tick.
            meal_bolus_u: the carb-ratio bolus of the carbohydrates announced this tick (0 if
                none): the bolus is a decision variable only when it is positive.

        """
        n = self.n_blocks
        with_bolus = meal_bolus_u > 0.0
        nv = n + int(with_bolus)
        lower = np.zeros(nv)
        upper = np.full(nv, self.max_rate_u_per_h)
        v0 = np.empty(nv)
        v0[:n] = self.basal_u_per_h if self._warm is None else self._warm
        if with_bolus:
            upper[n] = self.max_meal_bolus_fraction * meal_bolus_u
            v0[n] = meal_bolus_u
        v0 = np.clip(v0, lower, upper)
        scale = np.full(nv, self.basal_u_per_h)  # rates in basal units
        ref = np.full(nv, self.basal_u_per_h)  # the effort is the rates' deviation from basal
        weights = np.full(nv, self.effort_weight / n)
        if with_bolus:
            scale[n] = meal_bolus_u
            ref[n] = 0.0
            weights[n] = self.bolus_weight
        terms = np.stack([ref, weights, scale])
        consts = np.array([self.target_mg_dl, self.low_mg_dl, self.low_weight])
        g_nominal = self._simulate(state, v0[None, :], with_bolus, record_states=True)[:, 0]
        cost_nominal = _trajectory_cost(g_nominal[0, 1:], g_nominal[1, 1:], v0, terms, consts)
        v, g = v0, g_nominal
        for _ in range(self.iterations):
            if self.solver == "newton":
                sens = self._sensitivities(nv)
                bounds = np.stack([lower, upper])
                v = solve_plan(g, sens, v, bounds, terms, consts, _MAX_NEWTON_ITERATIONS)
            else:
                v = self._lbfgsb_fd(state, v, with_bolus, lower, upper, scale)
            g = self._simulate(state, v[None, :], with_bolus, record_states=True)[:, 0]
        if _trajectory_cost(g[0, 1:], g[1, 1:], v, terms, consts) > cost_nominal:
            v, g = v0, g_nominal  # the linear model misled the solver: keep the nominal plan
        self.last_prediction_mg_dl = g[0]
        self._warm = v[:n].copy()
        return v[:n].copy(), float(v[n]) if with_bolus else 0.0

    # --- model and cost ------------------------------------------------------------------

    def _cost(
        self,
        v: NDArray[np.float64],
        g0: NDArray[np.float64],
        v0: NDArray[np.float64],
        sens: NDArray[np.float64],
        scale: NDArray[np.float64],
        n: int,
    ) -> tuple[float, NDArray[np.float64]]:
        """Cost and gradient on the local model ``G = g0 + S (v − v0)`` (minutes 1 … H).

        ``g0`` is ``(2, H+1)`` and ``sens`` ``(2, H, nv)``: the nominal scenario (row 0: the
        deviation and the low penalty) and the fewer-carbohydrates scenario (row 1: the low
        penalty only).
        """
        dv = v - v0
        g_nom = g0[0, 1:] + sens[0] @ dv
        g_low = g0[1, 1:] + sens[1] @ dv
        e = g_nom - self.target_mg_dl
        low_nom = np.maximum(self.low_mg_dl - g_nom, 0.0)
        low_low = np.maximum(self.low_mg_dl - g_low, 0.0)
        h = g_nom.size
        w = self.low_weight
        cost = float((e @ e + w * (low_nom @ low_nom + low_low @ low_low)) / h)
        grad = (sens[0].T @ (2.0 * e - 2.0 * w * low_nom) - sens[1].T @ (2.0 * w * low_low)) / h
        rel = (v - np.where(np.arange(v.size) < n, self.basal_u_per_h, 0.0)) / scale
        weights = np.full(v.size, self.effort_weight / n)
        if v.size > n:
            weights[n] = self.bolus_weight
        cost += float(weights @ (rel * rel))
        grad = grad + 2.0 * weights * rel / scale
        return cost, grad

    def _sensitivities(self, nv: int) -> NDArray[np.float64]:
        """``∂G/∂v`` ``(2, H, nv)`` along the last simulated plan (one row, states recorded).

        The insulin-action perturbation of each decision variable (a block's rate, per U/h;
        the bolus, per U) is the model's impulse response superposed
        (:meth:`.forecast.TwinScenarios.insulin_response`, once per model); the glucose
        response to it is the model linearised along each scenario's nominal trajectory
        (:meth:`.forecast.TwinScenarios.glucose_response`).
        """
        d_g = self._scenarios.glucose_response(self._responses[0, :nv], self._responses[1, :nv])
        return np.ascontiguousarray(d_g[:, :, 1:].transpose(0, 2, 1))

    def _finite_differences(
        self, state: TwinPlanState, v: NDArray[np.float64], with_bolus: bool, step_basal: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``G`` of plan ``v`` ``(2, H+1)`` and ``∂G/∂v`` ``(2, H, nv)`` by forward differences.

        The step is ``step_basal`` × the basal for a rate, ``step_basal`` U for the bolus; one
        nonlinear simulation per variable.
        """
        nv = v.size
        step = np.full(nv, step_basal * self.basal_u_per_h)
        if with_bolus:
            step[-1] = step_basal
        plans = np.repeat(v[None, :], nv + 1, axis=0)
        plans[1:] += np.diag(step)
        g = self._simulate(state, plans, with_bolus)
        return g[:, 0], (g[:, 1:, 1:] - g[:, :1, 1:]).transpose(0, 2, 1) / step

    def _lbfgsb_fd(
        self,
        state: TwinPlanState,
        v: NDArray[np.float64],
        with_bolus: bool,
        lower: NDArray[np.float64],
        upper: NDArray[np.float64],
        scale: NDArray[np.float64],
    ) -> NDArray[np.float64]:
        """The solver before the projected Newton one (``solver="lbfgsb-fd"``).

        ``∂G/∂v`` by forward differences (a step of half the basal, or 0.5 U of bolus; one
        nonlinear simulation per variable), then scipy's L-BFGS-B on the local model.
        """
        from scipy.optimize import minimize  # only this solver needs it (~0.3 s to import)

        g0, sens = self._finite_differences(state, v, with_bolus, 0.5)
        res = minimize(
            self._cost,
            v,
            args=(g0, v, sens, scale, self.n_blocks),
            jac=True,
            method="L-BFGS-B",
            bounds=list(zip(lower, upper, strict=True)),
            options={"maxiter": 200},
        )
        return np.clip(res.x, lower, upper)

    def _set_responses(self) -> None:
        """Insulin action per unit of each decision variable (see :meth:`_sensitivities`)."""
        h, n, b = self.horizon_min, self.n_blocks, self._block
        r_x, r_id = self._scenarios.insulin_response()
        resp = np.zeros((2, n + 1, h + 1))
        for j in range(n):
            for m in range(j * b, (j + 1) * b):  # U/h over the block is 1/60 U each minute
                resp[0, j, m:] += r_x[: h + 1 - m] / 60.0
                resp[1, j, m:] += r_id[: h + 1 - m] / 60.0
        resp[0, n], resp[1, n] = r_x, r_id  # the bolus: 1 U in the first minute
        self._responses = resp

    def _simulate(
        self,
        state: TwinPlanState,
        plans: NDArray[np.float64],
        with_bolus: bool,
        record_states: bool = False,
    ) -> NDArray[np.float64]:
        """Plasma glucose (mg/dL) of each plan over minutes 0 … H, ``(2, rows, H+1)``.

        Scenario 0 is the twin's state; scenario 1 has the carbohydrates still to be absorbed
        scaled by ``1 − carb_uncertainty`` (:class:`.forecast.TwinScenarios`).
        """
        n = self.n_blocks
        insulin = np.repeat(plans[:, :n] / 60.0, self._block, axis=1)
        if with_bolus:
            insulin[:, 0] += plans[:, n]
        return self._scenarios.simulate(
            state,
            insulin,
            carb_uncertainty=self.carb_uncertainty,
            low_sensitivity=self.low_scenario_sensitivity,
            record_states=record_states,
        )
