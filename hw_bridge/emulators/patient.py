"""A virtual patient living on the wall clock: the plant behind the emulated devices.

The UVA/Padova plant of one patient advances one simulated minute every
``wall_s_per_sim_min`` wall seconds (60 = real time; 0.01 = one simulated day in 14.4 s) in a
background thread. Each minute it asks its *insulin source* (the emulated pump) how many units
were delivered in that minute, advances the plant with them and with the meals of its scenario,
and hands the minute's true glucose to its *listeners* (the emulated CGM). Emulated devices in
one process share one patient, so a pump's insulin lowers the glucose the CGM reports.

The meal plan and every random draw come from ``seed``: the same seed gives the same meals.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from twinloop.plant.glucose.patients import N_STATES, get_patient, parameter_matrix
from twinloop.plant.glucose.scenarios import SCENARIOS, CarbCountingError, MealPlan
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    N_MEAL_STATE,
    P_VG,
    advance,
)

#: Units of insulin delivered in simulated minute ``t_min`` (called once per minute, in order).
InsulinSource = Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class PatientMinute:
    """The truth at the end of simulated minute ``t_min``."""

    t_min: int
    bg_mg_dl: float  # plasma glucose
    gsub_mg_dl: float  # subcutaneous glucose (what a CGM senses)
    insulin_u: float  # delivered during the minute that just ended
    carbs_g: float  # swallowed during the minute that just ended


class VirtualPatient:
    """One UVA/Padova patient advancing on the wall clock (thread-safe).

    Args:
        patient: a name from the patient table (e.g. ``adult#001``).
        seed: seed of the meal plan.
        scenario: meal scenario (``random`` or ``A``), announced meals are not used here.
        days: days of meals planned (the patient keeps living without meals after them).
        wall_s_per_sim_min: wall seconds per simulated minute (> 0).

    """

    def __init__(
        self,
        patient: str = "adult#001",
        *,
        seed: int = 0,
        scenario: str = "random",
        days: int = 7,
        wall_s_per_sim_min: float = 60.0,
    ) -> None:
        if not wall_s_per_sim_min > 0:
            raise ValueError(f"wall_s_per_sim_min={wall_s_per_sim_min!r}: must be > 0")
        self.parameters = get_patient(patient)
        self.wall_s_per_sim_min = float(wall_s_per_sim_min)
        rng = np.random.default_rng(seed)
        sampler = SCENARIOS[scenario](carb_error=CarbCountingError("none", 0.0))
        self.meals: MealPlan = sampler.sample(rng, days=days)
        self._meal_idx = 0
        self._x = np.array(self.parameters.x0, dtype=np.float64).reshape(1, N_STATES)
        self._meal_state = np.zeros((1, N_MEAL_STATE))
        self._params = parameter_matrix([self.parameters])
        self._vg = float(self._params[0, P_VG])
        self._eat = np.array([DEFAULT_EAT_RATE_G_PER_MIN])
        basal_u_per_min = self.parameters.basal_u_per_h / 60.0
        self.insulin_source: InsulinSource = lambda _t: basal_u_per_min
        self.listeners: list[Callable[[PatientMinute], None]] = []
        self._lock = threading.Lock()
        self._t_min = 0
        self._latest = PatientMinute(
            0, float(self._x[0, 3]) / self._vg, float(self._x[0, 12]) / self._vg, 0.0, 0.0
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load) the plant kernel now, on scratch copies of the state.

        The first call of the numba kernel costs tens of milliseconds to seconds; served
        devices must not stall for it at their first simulated minute.
        """
        advance(
            self._x.copy(),
            self._meal_state.copy(),
            self._params,
            np.zeros((1, 1)),
            np.zeros((1, 1)),
            self._eat,
            carbs_out=np.zeros((1, 1)),
            gp_out=np.zeros((1, 2)),
            gs_out=np.zeros((1, 2)),
            check=False,
        )

    @property
    def latest(self) -> PatientMinute:
        """The truth at the newest simulated minute."""
        with self._lock:
            return self._latest

    @property
    def t_min(self) -> int:
        """Simulated minutes elapsed."""
        with self._lock:
            return self._t_min

    def step_minute(self) -> PatientMinute:
        """Advance one simulated minute now (the thread calls this on its schedule)."""
        t = self._t_min
        units = max(0.0, float(self.insulin_source(t)))
        meal = np.zeros((1, 1))
        plan = self.meals
        while self._meal_idx < len(plan) and plan.start_min[self._meal_idx] <= t:
            meal[0, 0] += float(plan.carbs_g[self._meal_idx])
            self._meal_idx += 1
        carbs = np.zeros((1, 1))
        gp = np.zeros((1, 2))
        gs = np.zeros((1, 2))
        advance(
            self._x,
            self._meal_state,
            self._params,
            np.array([[units]]),
            meal,
            self._eat,
            carbs_out=carbs,
            gp_out=gp,
            gs_out=gs,
            check=False,
        )
        minute = PatientMinute(
            t + 1,
            float(gp[0, 1]) / self._vg,
            float(gs[0, 1]) / self._vg,
            units,
            float(carbs[0, 0]),
        )
        with self._lock:
            self._t_min = t + 1
            self._latest = minute
        for listener in list(self.listeners):
            listener(minute)
        return minute

    def start(self) -> None:
        """Start living on the wall clock (a daemon thread)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="virtual-patient", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the clock (the state stays as it is)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self._started_at + (self._t_min + 1) * self.wall_s_per_sim_min
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            self.step_minute()
