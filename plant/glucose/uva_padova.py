"""UVA/Padova 2008 glucose–insulin model: compiled, batched over patients.

The model is the meal simulation model of Dalla Man, Rizza & Cobelli (2007), *IEEE TBME*
54(10):1740-1749, with the subcutaneous insulin (Dalla Man et al. 2007, *J Diabetes Sci
Technol* 1(3):323-330) and subcutaneous glucose compartments of the UVA/Padova T1D simulator
(Kovatchev et al. 2009, *J Diabetes Sci Technol* 3(1):44-55). It has 13 states (see
:class:`twinloop.plant.glucose.patients.PatientParameters` for their order and units).

Inputs are held constant over each minute (zero-order hold):

* insulin in U/min, converted at this boundary to pmol/kg/min (× 6000 / body weight);
* meals in grams *starting* at a minute. A meal is eaten at ``eat_rate_g_per_min`` (5 g/min
  by default), so a 45 g meal enters the stomach over 9 minutes. Gastric emptying is the
  nonlinear ``k_empt(Q_sto)`` of Dalla Man et al. (2006, *IEEE TBME* 53(12)), parametrised by
  ``D̄`` = stomach content when the current meal started + grams of that meal swallowed so far
  (in mg), which is how the 2008 simulator (and simglucose) evaluates it; with no meal yet
  eaten, ``k_empt = k_max``.

Integration is classical fourth-order Runge–Kutta with ``substeps`` steps per minute (four
times as many in minutes when the patient is swallowing, where gastric emptying switches
steeply), compiled with numba; one compiled loop runs every patient and every minute, so a call
advances a batch ``(N, 13)`` by ``K`` minutes with no Python loop. With the default of 1 substep
the plasma glucose of all 30 patients stays within 0.002 mg/dL of simglucose's adaptive dopri5
(rtol 1e-6) over the reference day; ``benchmarks/integrator_accuracy.py`` shows the
speed/accuracy trade-off.

Every state but ``X`` (insulin action relative to basal) is a mass or a concentration, and the
model never reports a negative one: after each step the state is projected onto ``x >= 0``
(:func:`_project_nonnegative`), so a patient an overdose has driven to 0 mg/dL stays at 0, not
below, and recovers as soon as a meal or the liver brings glucose in (simglucose instead freezes
a state's derivative once it is below zero, which held such a patient at -0.16 mg/dL for days).
Trajectories that stay positive are unchanged to the bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.plant.errors import InvalidInputError
from twinloop.plant.glucose.patients import (
    N_PARAMS,
    N_STATES,
    PARAM_FIELDS,
    PMOL_PER_U,
    PatientParameters,
    initial_states,
    parameter_matrix,
)

# Column indices into the parameter matrix (see twinloop.plant.glucose.patients.PARAM_FIELDS).
_I = {name: k for k, name in enumerate(PARAM_FIELDS)}
P_BW = _I["body_weight_kg"]
P_KABS = _I["kabs_per_min"]
P_KMAX = _I["kmax_per_min"]
P_KMIN = _I["kmin_per_min"]
P_B = _I["b"]
P_D = _I["d"]
P_VG = _I["vg_dl_per_kg"]
P_VI = _I["vi_l_per_kg"]
P_VMX = _I["vmx_mg_per_kg_min_per_pmol_l"]
P_KM0 = _I["km0_mg_per_kg"]
P_K1 = _I["k1_per_min"]
P_K2 = _I["k2_per_min"]
P_P2U = _I["p2u_per_min"]
P_M1 = _I["m1_per_min"]
P_M2 = _I["m2_per_min"]
P_M4 = _I["m4_per_min"]
P_M30 = _I["m30_per_min"]
P_KI = _I["ki_per_min"]
P_KP1 = _I["kp1_mg_per_kg_min"]
P_KP2 = _I["kp2_per_min"]
P_KP3 = _I["kp3_mg_per_kg_min_per_pmol_l"]
P_F = _I["f"]
P_KE1 = _I["ke1_per_min"]
P_KE2 = _I["ke2_mg_per_kg"]
P_FSNC = _I["fsnc_mg_per_kg_min"]
P_VM0 = _I["vm0_mg_per_kg_min"]
P_KD = _I["kd_per_min"]
P_KSC = _I["ksc_per_min"]
P_KA1 = _I["ka1_per_min"]
P_KA2 = _I["ka2_per_min"]
P_IB = _I["insulin_basal_pmol_l"]
assert len(_I) == N_PARAMS

# Columns of the per-patient meal state (the eating process is not part of the 13 ODE states).
M_PLANNED_G = 0  #: grams announced but not yet swallowed
M_QSTO_AT_START_MG = 1  #: stomach content when the current/last meal started
M_EATEN_G = 2  #: grams of the current/last meal swallowed so far
M_LAST_RATE_G = 3  #: grams swallowed in the previous minute
N_MEAL_STATE = 4

MG_PER_G = 1000.0

#: Eating speed of the UVA/Padova simulator (and simglucose), g/min.
DEFAULT_EAT_RATE_G_PER_MIN = 5.0


@numba.njit(cache=True, inline="always", error_model="numpy")
def _rhs(
    x: NDArray[np.float64],
    p: NDArray[np.float64],
    meal_mg_per_min: float,
    insulin_pmol_per_kg_min: float,
    dbar_mg: float,
    dx: NDArray[np.float64],
) -> None:
    """Right-hand side ``dx = f(x, u)`` of the 13-state model for one patient (per minute)."""
    kmax = p[P_KMAX]
    kmin = p[P_KMIN]
    kabs = p[P_KABS]
    qsto = x[0] + x[1]
    dx[0] = -kmax * x[0] + meal_mg_per_min
    if dbar_mg > 0.0:
        b = p[P_B]
        d = p[P_D]
        alpha = 5.0 / (2.0 * dbar_mg * (1.0 - b))
        beta = 5.0 / (2.0 * dbar_mg * d)
        kgut = kmin + 0.5 * (kmax - kmin) * (
            math.tanh(alpha * (qsto - b * dbar_mg)) - math.tanh(beta * (qsto - d * dbar_mg)) + 2.0
        )
    else:
        kgut = kmax
    dx[1] = kmax * x[0] - kgut * x[1]
    dx[2] = kgut * x[1] - kabs * x[2]

    # glucose subsystem
    ra = p[P_F] * kabs * x[2] / p[P_BW]
    egp = p[P_KP1] - p[P_KP2] * x[3] - p[P_KP3] * x[8]
    if egp < 0.0:
        egp = 0.0
    renal = p[P_KE1] * (x[3] - p[P_KE2]) if x[3] > p[P_KE2] else 0.0
    k1 = p[P_K1]
    k2 = p[P_K2]
    dgp = egp + ra - p[P_FSNC] - renal - k1 * x[3] + k2 * x[4]
    dx[3] = dgp if x[3] >= 0.0 else 0.0
    uid = (p[P_VM0] + p[P_VMX] * x[6]) * x[4] / (p[P_KM0] + x[4])
    dgt = -uid + k1 * x[3] - k2 * x[4]
    dx[4] = dgt if x[4] >= 0.0 else 0.0

    # insulin subsystem
    m1 = p[P_M1]
    m2 = p[P_M2]
    ka1 = p[P_KA1]
    ka2 = p[P_KA2]
    kd = p[P_KD]
    dip = -(m2 + p[P_M4]) * x[5] + m1 * x[9] + ka1 * x[10] + ka2 * x[11]
    dx[5] = dip if x[5] >= 0.0 else 0.0
    it = x[5] / p[P_VI]
    p2u = p[P_P2U]
    dx[6] = -p2u * x[6] + p2u * (it - p[P_IB])
    ki = p[P_KI]
    dx[7] = -ki * (x[7] - it)
    dx[8] = -ki * (x[8] - x[7])
    dil = -(m1 + p[P_M30]) * x[9] + m2 * x[5]
    dx[9] = dil if x[9] >= 0.0 else 0.0
    disc1 = insulin_pmol_per_kg_min - (ka1 + kd) * x[10]
    dx[10] = disc1 if x[10] >= 0.0 else 0.0
    disc2 = kd * x[10] - ka2 * x[11]
    dx[11] = disc2 if x[11] >= 0.0 else 0.0
    ksc = p[P_KSC]
    dgs = -ksc * x[12] + ksc * x[3]
    dx[12] = dgs if x[12] >= 0.0 else 0.0


@numba.njit(cache=True, inline="always", error_model="numpy")
def _rk4_minute(
    x: NDArray[np.float64],
    p: NDArray[np.float64],
    meal_mg_per_min: float,
    insulin_pmol_per_kg_min: float,
    dbar_mg: float,
    substeps: int,
    k1: NDArray[np.float64],
    k2: NDArray[np.float64],
    k3: NDArray[np.float64],
    k4: NDArray[np.float64],
    tmp: NDArray[np.float64],
) -> None:
    """Advance one patient's state ``x`` in place by one minute with RK4."""
    h = 1.0 / substeps
    for _ in range(substeps):
        _rhs(x, p, meal_mg_per_min, insulin_pmol_per_kg_min, dbar_mg, k1)
        for j in range(N_STATES):
            tmp[j] = x[j] + 0.5 * h * k1[j]
        _rhs(tmp, p, meal_mg_per_min, insulin_pmol_per_kg_min, dbar_mg, k2)
        for j in range(N_STATES):
            tmp[j] = x[j] + 0.5 * h * k2[j]
        _rhs(tmp, p, meal_mg_per_min, insulin_pmol_per_kg_min, dbar_mg, k3)
        for j in range(N_STATES):
            tmp[j] = x[j] + h * k3[j]
        _rhs(tmp, p, meal_mg_per_min, insulin_pmol_per_kg_min, dbar_mg, k4)
        for j in range(N_STATES):
            x[j] += h / 6.0 * (k1[j] + 2.0 * k2[j] + 2.0 * k3[j] + k4[j])
        _project_nonnegative(x)


#: The one state that may be negative: ``X``, insulin action relative to basal (1/min).
X_REMOTE_INSULIN = 6


@numba.njit(cache=True, inline="always", error_model="numpy")
def _project_nonnegative(x: NDArray[np.float64]) -> None:
    """Project a state onto the model's domain: every mass and concentration ``>= 0``.

    Twelve of the 13 states are masses or concentrations (``X`` is relative to basal and may be
    negative). The exact flow of the model cannot leave ``x_j >= 0`` — except that the constant
    insulin-independent uptake ``F_snc`` of ``dG_p`` is not proportional to ``G_p``, so at
    ``G_p = 0`` it would draw glucose that is not there — but an explicit step can overshoot a
    fast-falling state below zero. The step is then projected onto the non-negative orthant
    (the nearest point of the domain), so ``G_p = 0`` means "no glucose" and the state recovers
    as soon as its inflow (a meal's ``Ra``, the liver's ``EGP``) exceeds its outflow. This is
    never active in a physiological trajectory (masses stay far from zero), so those are
    unchanged to the bit.
    """
    for j in range(N_STATES):
        if j != X_REMOTE_INSULIN and x[j] < 0.0:
            x[j] = 0.0


@numba.njit(cache=True, inline="always", error_model="numpy")
def _eat(
    meal: NDArray[np.float64], x: NDArray[np.float64], new_meal_g: float, rate: float
) -> float:
    """Update one patient's eating process for one minute; return grams swallowed this minute."""
    meal[M_PLANNED_G] += new_meal_g
    planned = meal[M_PLANNED_G]
    swallowed = rate if planned > rate else planned
    meal[M_PLANNED_G] = planned - rate if planned > rate else 0.0
    if swallowed > 0.0 and meal[M_LAST_RATE_G] <= 0.0:  # a meal starts
        meal[M_QSTO_AT_START_MG] = x[0] + x[1]
        meal[M_EATEN_G] = 0.0
    if swallowed > 0.0:
        meal[M_EATEN_G] += swallowed
    meal[M_LAST_RATE_G] = swallowed
    return swallowed


#: RK4 substeps per minute are multiplied by this while the patient is swallowing. Early in a
#: meal ``D̄`` is only the grams swallowed so far, so ``k_empt`` switches steeply within the
#: minute; outside meals one step per minute is accurate.
EATING_SUBSTEPS = 4


@numba.njit(cache=True, inline="always", error_model="numpy")
def step_minute(
    xi: NDArray[np.float64],
    mi: NDArray[np.float64],
    p: NDArray[np.float64],
    new_meal_g: float,
    insulin_u_per_min: float,
    eat_rate_g_per_min: float,
    substeps: int,
    eating_substeps: int,
    work: NDArray[np.float64],
) -> float:
    """Advance one patient (state ``xi``, meal state ``mi``) by one minute; return grams swallowed.

    RK4 takes ``substeps`` steps in the minute, or ``substeps * eating_substeps`` while the
    patient is swallowing. ``work`` is scratch space of shape ``(5, 13)``. Compiled; callable
    from other numba kernels.
    """
    swallowed = _eat(mi, xi, new_meal_g, eat_rate_g_per_min)
    dbar = mi[M_QSTO_AT_START_MG] + mi[M_EATEN_G] * MG_PER_G
    n_sub = substeps * eating_substeps if swallowed > 0.0 else substeps
    _rk4_minute(
        xi,
        p,
        swallowed * MG_PER_G,
        insulin_u_per_min * PMOL_PER_U / p[P_BW],
        dbar,
        n_sub,
        work[0],
        work[1],
        work[2],
        work[3],
        work[4],
    )
    return swallowed


@numba.njit(cache=True, error_model="numpy")
def _advance_one(
    i: int,
    x: NDArray[np.float64],
    meal: NDArray[np.float64],
    params: NDArray[np.float64],
    insulin_u_per_min: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    eat_rate_g_per_min: NDArray[np.float64],
    substeps: int,
    eating_substeps: int,
    carbs_out: NDArray[np.float64],
    gp_out: NDArray[np.float64],
    gs_out: NDArray[np.float64],
    states_out: NDArray[np.float64],
) -> None:
    n_min = insulin_u_per_min.shape[1]
    record_states = states_out.shape[0] > 0
    record_glucose = gp_out.shape[0] > 0
    p = params[i]
    xi = x[i]
    mi = meal[i]
    work = np.empty((5, N_STATES))
    rate = eat_rate_g_per_min[i]
    if record_glucose:
        gp_out[i, 0] = xi[3]
        gs_out[i, 0] = xi[12]
    if record_states:
        states_out[i, 0, :] = xi
    for k in range(n_min):
        carbs_out[i, k] = step_minute(
            xi, mi, p, meal_g[i, k], insulin_u_per_min[i, k], rate, substeps, eating_substeps, work
        )
        if record_glucose:
            gp_out[i, k + 1] = xi[3]
            gs_out[i, k + 1] = xi[12]
        if record_states:
            states_out[i, k + 1, :] = xi


@numba.njit(cache=True, error_model="numpy")
def _advance_serial(
    x: NDArray[np.float64],
    meal: NDArray[np.float64],
    params: NDArray[np.float64],
    insulin_u_per_min: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    eat_rate_g_per_min: NDArray[np.float64],
    substeps: int,
    eating_substeps: int,
    carbs_out: NDArray[np.float64],
    gp_out: NDArray[np.float64],
    gs_out: NDArray[np.float64],
    states_out: NDArray[np.float64],
) -> None:
    for i in range(x.shape[0]):
        _advance_one(
            i, x, meal, params, insulin_u_per_min, meal_g, eat_rate_g_per_min, substeps,
            eating_substeps, carbs_out, gp_out, gs_out, states_out,
        )  # fmt: skip


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _advance_parallel(
    x: NDArray[np.float64],
    meal: NDArray[np.float64],
    params: NDArray[np.float64],
    insulin_u_per_min: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    eat_rate_g_per_min: NDArray[np.float64],
    substeps: int,
    eating_substeps: int,
    carbs_out: NDArray[np.float64],
    gp_out: NDArray[np.float64],
    gs_out: NDArray[np.float64],
    states_out: NDArray[np.float64],
) -> None:
    for i in numba.prange(x.shape[0]):
        _advance_one(
            i, x, meal, params, insulin_u_per_min, meal_g, eat_rate_g_per_min, substeps,
            eating_substeps, carbs_out, gp_out, gs_out, states_out,
        )  # fmt: skip


_EMPTY2 = np.empty((0, 0))
_EMPTY3 = np.empty((0, 0, 0))

#: Batches at least this large use every numba thread (see ``parallel`` below).
PARALLEL_MIN_BATCH = 64


def _check_kernel_arrays(
    x: NDArray[np.float64],
    meal_state: NDArray[np.float64],
    params: NDArray[np.float64],
    insulin_u_per_min: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    eat_rate_g_per_min: NDArray[np.float64],
    carbs_out: NDArray[np.float64],
    gp_out: NDArray[np.float64],
    gs_out: NDArray[np.float64],
    states_out: NDArray[np.float64],
) -> None:
    """Shapes the compiled kernel relies on (it does no bounds checking itself)."""
    n = x.shape[0]
    k = insulin_u_per_min.shape[1] if insulin_u_per_min.ndim == 2 else -1
    expected = {
        "x": (x, (n, N_STATES)),
        "meal_state": (meal_state, (n, N_MEAL_STATE)),
        "params": (params, (n, N_PARAMS)),
        "insulin_u_per_min": (insulin_u_per_min, (n, k)),
        "meal_g": (meal_g, (n, k)),
        "eat_rate_g_per_min": (eat_rate_g_per_min, (n,)),
        "carbs_out": (carbs_out, (n, k)),
    }
    if gp_out.size or gs_out.size:
        expected["gp_out"] = (gp_out, (n, k + 1))
        expected["gs_out"] = (gs_out, (n, k + 1))
    if states_out.size:
        expected["states_out"] = (states_out, (n, k + 1, N_STATES))
    for name, (arr, shape) in expected.items():
        if arr.shape != shape or arr.dtype != np.float64:
            raise InvalidInputError(
                f"{name}: expected float64 of shape {shape}, got {arr.dtype} {arr.shape}"
            )


def advance(
    x: NDArray[np.float64],
    meal_state: NDArray[np.float64],
    params: NDArray[np.float64],
    insulin_u_per_min: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    eat_rate_g_per_min: NDArray[np.float64],
    *,
    substeps: int = 1,
    eating_substeps: int = EATING_SUBSTEPS,
    carbs_out: NDArray[np.float64],
    gp_out: NDArray[np.float64] = _EMPTY2,
    gs_out: NDArray[np.float64] = _EMPTY2,
    states_out: NDArray[np.float64] = _EMPTY3,
    parallel: bool | None = None,
    check: bool = True,
) -> None:
    """Advance a batch in place by ``K`` minutes (the low-level, allocation-free kernel).

    Args:
        x: states, ``(N, 13)`` float64, C-contiguous; updated in place.
        meal_state: eating process, ``(N, 4)`` float64; updated in place.
        params: ``(N, N_PARAMS)`` from :func:`twinloop.plant.glucose.patients.parameter_matrix`.
        insulin_u_per_min: ``(N, K)`` insulin rate in U/min held over each minute.
        meal_g: ``(N, K)`` grams of carbohydrate of meals starting at each minute.
        eat_rate_g_per_min: ``(N,)`` eating speed.
        substeps: RK4 steps per minute (1 is within 0.002 mg/dL of dopri5).
        eating_substeps: factor on ``substeps`` in minutes when the patient is swallowing.
        carbs_out: ``(N, K)`` written with grams swallowed in each minute.
        gp_out: ``(N, K+1)`` written with plasma glucose mass ``G_p`` (mg/kg), or empty.
        gs_out: ``(N, K+1)`` written with subcutaneous glucose mass ``G_s`` (mg/kg), or empty.
        states_out: ``(N, K+1, 13)`` written with every state, or empty.
        parallel: use all numba threads; ``None`` chooses by batch size.
        check: verify shapes and dtypes first (the compiled kernel does no bounds checking);
            callers that allocate their arrays once may skip it in their hot path.

    """
    if check:
        _check_kernel_arrays(
            x, meal_state, params, insulin_u_per_min, meal_g, eat_rate_g_per_min,
            carbs_out, gp_out, gs_out, states_out,
        )  # fmt: skip
    if parallel is None:
        parallel = x.shape[0] >= PARALLEL_MIN_BATCH and numba.get_num_threads() > 1
    kernel = _advance_parallel if parallel else _advance_serial
    kernel(
        x, meal_state, params, insulin_u_per_min, meal_g, eat_rate_g_per_min, substeps,
        eating_substeps, carbs_out, gp_out, gs_out, states_out,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Result of :func:`simulate`: one row per patient, one column per minute.

    Attributes:
        patients: patient names, length N.
        bg_mg_dl: plasma glucose ``G_p/V_g``, ``(N, K+1)``; column k is minute k.
        gsub_mg_dl: subcutaneous glucose ``G_s/V_g``, ``(N, K+1)``.
        carbs_g_per_min: grams swallowed over ``[k, k+1)``, ``(N, K)``.
        insulin_u_per_min: insulin rate over ``[k, k+1)``, ``(N, K)``.
        states: every state, ``(N, K+1, 13)``, or ``None`` unless asked for.

    """

    patients: tuple[str, ...]
    bg_mg_dl: NDArray[np.float64]
    gsub_mg_dl: NDArray[np.float64]
    carbs_g_per_min: NDArray[np.float64]
    insulin_u_per_min: NDArray[np.float64]
    states: NDArray[np.float64] | None


def _as_batch(name: str, value: ArrayLike, n: int) -> NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (n, arr.shape[0]))
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InvalidInputError(
            f"{name}: expected shape (K,) or ({n}, K) for {n} patients, got {np.shape(value)}"
        )
    if not np.all(np.isfinite(arr)):
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise InvalidInputError(f"{name}: non-finite value at patient {r}, minute {c}")
    if np.any(arr < 0):
        r, c = np.argwhere(arr < 0)[0]
        raise InvalidInputError(f"{name}: negative value {arr[r, c]} at patient {r}, minute {c}")
    return np.ascontiguousarray(arr)


def simulate(
    patients: Sequence[PatientParameters],
    insulin_u_per_min: ArrayLike,
    meal_g: ArrayLike,
    *,
    eat_rate_g_per_min: float = DEFAULT_EAT_RATE_G_PER_MIN,
    x0: ArrayLike | None = None,
    substeps: int = 1,
    eating_substeps: int = EATING_SUBSTEPS,
    return_states: bool = False,
    parallel: bool | None = None,
) -> Trajectory:
    """Simulate N patients for K minutes from their default (or given) initial states.

    Args:
        patients: the patients (see :func:`twinloop.plant.glucose.patients.resolve_patients`).
        insulin_u_per_min: insulin rate in U/min over each minute, ``(K,)`` for all patients or
            ``(N, K)``; a bolus of B units delivered within one minute is a rate of B U/min.
        meal_g: grams of carbohydrate of a meal starting at each minute, ``(K,)`` or ``(N, K)``.
        eat_rate_g_per_min: eating speed (5 g/min as in the UVA/Padova simulator).
        x0: initial states ``(N, 13)``; default: each patient's table state.
        substeps: RK4 steps per minute.
        eating_substeps: factor on ``substeps`` while the patient swallows (1 = plain RK4).
        return_states: also return all 13 states per minute.
        parallel: use all numba threads; ``None`` chooses by batch size.

    Returns:
        The :class:`Trajectory`.

    Raises:
        InvalidInputError: shapes disagree, or an input is negative or not finite.

    """
    n = len(patients)
    ins = _as_batch("insulin_u_per_min", insulin_u_per_min, n)
    meals = _as_batch("meal_g", meal_g, n)
    if ins.shape != meals.shape:
        raise InvalidInputError(
            f"insulin_u_per_min and meal_g cover different minutes: {ins.shape} vs {meals.shape}"
        )
    if not eat_rate_g_per_min > 0:
        raise InvalidInputError(f"eat_rate_g_per_min={eat_rate_g_per_min!r}: must be > 0")
    if substeps < 1 or eating_substeps < 1:
        raise InvalidInputError(
            f"substeps={substeps!r}, eating_substeps={eating_substeps!r}: both must be >= 1"
        )
    x = initial_states(patients) if x0 is None else np.array(x0, dtype=np.float64, order="C")
    if x.shape != (n, N_STATES):
        raise InvalidInputError(f"x0: expected shape ({n}, {N_STATES}), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InvalidInputError("x0: states must be finite")
    params = parameter_matrix(patients)
    k = ins.shape[1]
    meal_state = np.zeros((n, N_MEAL_STATE))
    carbs = np.empty((n, k))
    gp = np.empty((n, k + 1))
    gs = np.empty((n, k + 1))
    states = np.empty((n, k + 1, N_STATES)) if return_states else _EMPTY3
    advance(
        x, meal_state, params, ins, meals, np.full(n, float(eat_rate_g_per_min)),
        substeps=substeps, eating_substeps=eating_substeps, carbs_out=carbs, gp_out=gp,
        gs_out=gs, states_out=states, parallel=parallel,
    )  # fmt: skip
    vg = params[:, P_VG : P_VG + 1]
    return Trajectory(
        patients=tuple(p.name for p in patients),
        bg_mg_dl=gp / vg,
        gsub_mg_dl=gs / vg,
        carbs_g_per_min=carbs,
        insulin_u_per_min=ins,
        states=states if return_states else None,
    )


@numba.njit(cache=True, inline="always", error_model="numpy")
def _glucose_jacobian(
    x: NDArray[np.float64], p: NDArray[np.float64], out: NDArray[np.float64]
) -> None:
    """``∂ġ_p/∂G_p``, ``∂ġ_t/∂G_t``, ``∂ġ_p/∂I_d``, ``∂ġ_t/∂X`` at state ``x`` (into ``out``)."""
    on = 1.0 if p[P_KP1] - p[P_KP2] * x[3] - p[P_KP3] * x[8] > 0.0 else 0.0
    km = p[P_KM0] + x[4]
    out[0] = -p[P_KP2] * on - (p[P_KE1] if x[3] > p[P_KE2] else 0.0) - p[P_K1]
    out[1] = -(p[P_VM0] + p[P_VMX] * x[6]) * p[P_KM0] / (km * km) - p[P_K2]
    out[2] = -p[P_KP3] * on
    out[3] = -p[P_VMX] * x[4] / km


@numba.njit(cache=True, error_model="numpy")
def glucose_tangent(
    states: NDArray[np.float64],
    p: NDArray[np.float64],
    d_x: NDArray[np.float64],
    d_id: NDArray[np.float64],
    out: NDArray[np.float64],
) -> None:
    """Linearised response of plasma glucose to perturbations of insulin action, along a path.

    The insulin subsystem is linear in the infused insulin, and glucose sees insulin only
    through remote insulin action ``X`` (utilisation ``(V_m0 + V_mx·X)·G_t/(K_m0 + G_t)``) and
    delayed insulin ``I_d`` (production ``k_p1 − k_p2·G_p − k_p3·I_d``, floored at 0). Given a
    nominal trajectory and the perturbations ``δX``, ``δI_d`` that a change of the insulin input
    causes along it, the first-order change of ``(G_p, G_t)`` obeys the time-varying linear
    system ``δz' = A(t)·δz + B(t)·(δI_d, δX)`` with ``A``, ``B`` the Jacobians of the glucose
    equations at the nominal state (the production's floor and renal clearance's threshold as
    the nominal state has them). It is integrated with Heun's method, one step per minute.

    Args:
        states: ``(K+1, 13)`` nominal states, minute 0 … K (``advance``'s ``states_out`` row).
        p: ``(N_PARAMS,)`` the parameters the nominal trajectory ran with.
        d_x: ``(V, K+1)`` ``δX`` of each of ``V`` input perturbations at each minute.
        d_id: ``(V, K+1)`` ``δI_d`` of each perturbation.
        out: ``(V, K+1)`` written with ``δG_p`` (mg/kg; divide by ``V_G`` for mg/dL).

    """
    nv = d_x.shape[0]
    n_min = states.shape[0] - 1
    k1, k2 = p[P_K1], p[P_K2]
    zp = np.zeros(nv)
    zt = np.zeros(nv)
    jac = np.empty((2, 4))  # per minute: a00, a11, b_id, b_x (a01 = k2, a10 = k1)
    _glucose_jacobian(states[0], p, jac[0])
    for j in range(nv):
        out[j, 0] = 0.0
    for k in range(n_min):
        now = k % 2
        nxt = 1 - now
        _glucose_jacobian(states[k + 1], p, jac[nxt])
        a00, a11, b_id, b_x = jac[now, 0], jac[now, 1], jac[now, 2], jac[now, 3]
        c00, c11, e_id, e_x = jac[nxt, 0], jac[nxt, 1], jac[nxt, 2], jac[nxt, 3]
        for j in range(nv):
            f_p = a00 * zp[j] + k2 * zt[j] + b_id * d_id[j, k]
            f_t = k1 * zp[j] + a11 * zt[j] + b_x * d_x[j, k]
            q_p = zp[j] + f_p
            q_t = zt[j] + f_t
            g_p = c00 * q_p + k2 * q_t + e_id * d_id[j, k + 1]
            g_t = k1 * q_p + c11 * q_t + e_x * d_x[j, k + 1]
            zp[j] += 0.5 * (f_p + g_p)
            zt[j] += 0.5 * (f_t + g_t)
            out[j, k + 1] = zp[j]
