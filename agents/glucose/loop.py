"""The glucose loop in simulated time, every edge a :class:`~twinloop.agents.channels.Channel`.

plant → sensor → controller → supervisor → actuator → plant, plus meal announcements.

One :class:`PatientLoop` runs one virtual patient. Per control tick at time ``t`` (minutes):

1. the CGM readings that fell due since the previous tick have already been sent on
   ``sensor->controller`` (and seen by the supervisor);
2. meals starting in ``[t, t + period)`` are announced on ``meal->controller``;
3. the controller decides from the newest reading, its age, the net insulin on board and the
   announced carbs, and sends its command on ``controller->supervisor``; the twin estimator
   (when the loop has one) fuses the new readings in the same round — or, for a controller that
   plans on the twin (``needs_twin = True``, e.g. the MPC), in a round before, and the
   controller gets the twin's :class:`~twinloop.policies.glucose.interface.TwinPlanState` in its
   input;
4. the supervisor reviews it (overrides on ``supervisor->overrides``) and sends the result on
   ``supervisor->actuator``;
5. the actuator delivers minute by minute on ``actuator->plant`` (what reaches the patient;
   the twin, the supervisor and the controller's insulin on board are told the pump's own
   report of it, so a fault on that channel is silent, as an occlusion is) while the plant
   advances, publishing its true glucose each minute on ``plant->sensor``; the sensor reads
   when a sample is due.

An agent that fails at a tick (it raises, or its Ray actor died and is being restarted) is
replaced for that tick by a safe fallback, recorded on ``runtime->faults``: no readings for the
sensor, no command for the controller (the supervisor then sends its safe command), the
scheduled basal without bolus for the supervisor and for the actuator (a pump's own fallback).
A restarted actor starts again from the agent's initial state. Messages on every channel go to
the listeners (the recorder).

Re-fitting the model (``refit_every_days``): every so many simulated days, at the first tick of
the day, the loop fits a new twin to the last ``refit_window_days`` of what its twin saw — the
CGM readings delivered, the insulin the pump reported and the meals announced
(:mod:`twinloop.agents.glucose.refit`) — in a background worker (a Ray task on the ``ray``
placement, else a worker process), so the tick never runs the fit. The new model is swapped in
at the start of a tick, the twin first (:meth:`TwinEstimator.swap_model`: the estimate goes on
from where it was), then a controller that plans on a model (``swap_model``), and the swap is
recorded on ``estimator->models`` (:class:`~twinloop.agents.messages.ModelSwap`). When: in
simulated time at the first tick ``refit_delay_min`` after the fit started (waiting for the
fit there if it has not finished: simulated time is not wall time, so a seed gives one
trajectory whatever the machine); on the wall clock at the first tick after the fit finished
(never waiting; a fit still running when the next is due is not started again). A fit that fails
is recorded on ``runtime->faults`` (agent ``refit``) and the loop keeps its model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from twinloop.agents.channels import Channel, Listener
from twinloop.agents.errors import LoopConfigError
from twinloop.agents.glucose.devices import PumpActuator, SensorAgent
from twinloop.agents.glucose.estimator import TwinEstimator
from twinloop.agents.glucose.refit import LoopLog, Pending, RefitJob, RefitResult, release, submit
from twinloop.agents.glucose.supervisor import SafetySupervisor, SupervisorConfig
from twinloop.agents.messages import (
    AgentFault,
    CgmReading,
    InsulinCommand,
    InsulinDelivery,
    MealAnnouncement,
    Message,
    ModelSwap,
    PlantGlucose,
    TickTiming,
    TwinEstimate,
)
from twinloop.agents.placement import InlinePlacement, Outcome, Placement, Request, Steps, drive
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.cohorts import POPULATION_PREFIX, expand_names, population_token
from twinloop.plant.glucose.insulin import IobTracker
from twinloop.plant.glucose.models import DEFAULT_MODEL, MODEL_HELP, loop_model, parse_model
from twinloop.plant.glucose.patients import N_STATES, PatientParameters, parameter_matrix
from twinloop.plant.glucose.pump import PumpSpec
from twinloop.plant.glucose.scenarios import MIN_PER_DAY, SCENARIOS, CarbCountingError, MealPlan
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    N_MEAL_STATE,
    P_VG,
    advance,
)
from twinloop.policies.glucose.controllers import (
    Controller,
    ControllerInput,
    check_controller_name,
    make_controller,
)
from twinloop.policies.glucose.interface import TwinPlanState, not_a_dose

CHANNELS = (
    "plant->sensor",
    "sensor->controller",
    "meal->controller",
    "controller->supervisor",
    "supervisor->actuator",
    "supervisor->overrides",
    "actuator->plant",
    "clock->ticks",
    "runtime->faults",
    "estimator->controller",
    "estimator->models",
)

#: Below this many seconds to wait, the wall clock spins instead of sleeping.
SPIN_S = 0.002


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """A closed-loop run (validated once).

    Attributes:
        patients: patient and cohort names, expanded in order.
        days: simulated days.
        seed: seed of meals, counting errors and sensor noise (one child stream per patient).
        controller: controller name (see :data:`twinloop.policies.glucose.controllers.CONTROLLERS`).
        scenario: meal scenario name (``random`` or ``A``).
        carb_error: carbohydrate-counting error of the announcements.
        control_period_min: minutes between controller decisions.
        cgm: the sensor; its sample period may not exceed the control period.
        pump: the pump.
        twin: run the twin estimator.
        model: where the twin estimator's and the planning controllers' model comes from
            (:mod:`twinloop.plant.glucose.models`): ``population`` (default), ``population:sample``,
            ``twin:PATH`` or ``oracle``; the plant, the pump and the supervisor's limits are
            always the patient's own. (``fit`` is resolved into ``twin:DIR`` before a loop is
            configured: :mod:`twinloop.twins.individualize`.)
        refit_every_days: re-fit the loop's model from its own recording every this many
            simulated days (0: never; needs the twin); see the module docstring.
        refit_window_days: days of recording each re-fit uses (the last ones), 1..30.
        refit_max_iter: L-BFGS-B iterations per pass of a re-fit
            (:func:`twinloop.plant.glucose.identification.fit_twin`'s ``max_iter``).
        refit_delay_min: in simulated time, minutes between a re-fit's start and the swap of
            its model, 1..1440 (the wall clock swaps when the fit is done).

    """

    patients: tuple[str, ...] = ("adults",)
    days: int = 1
    seed: int = 0
    controller: str = "basal-bolus"
    scenario: str = "random"
    carb_error: CarbCountingError = dataclasses.field(
        default_factory=lambda: CarbCountingError("uniform", 0.3)
    )
    control_period_min: int = 5
    cgm: CGMSpec = dataclasses.field(default_factory=CGMSpec)
    pump: PumpSpec = dataclasses.field(default_factory=PumpSpec)
    twin: bool = True
    controller_deadline_s: float = 1.0
    clock: str = "sim"
    wall_s_per_sim_min: float = 0.01
    model: str = DEFAULT_MODEL
    refit_every_days: int = 0
    refit_window_days: int = 7
    refit_max_iter: int = 200
    refit_delay_min: int = 60

    def __post_init__(self) -> None:
        if not (
            isinstance(self.controller_deadline_s, int | float) and self.controller_deadline_s > 0
        ):
            raise LoopConfigError("controller_deadline_s", self.controller_deadline_s, "> 0 s")
        if self.clock not in ("sim", "wall"):
            raise LoopConfigError("clock", self.clock, "'sim' or 'wall'")
        if not (isinstance(self.wall_s_per_sim_min, int | float) and self.wall_s_per_sim_min > 0):
            raise LoopConfigError("wall_s_per_sim_min", self.wall_s_per_sim_min, "seconds > 0")
        if isinstance(self.patients, str):
            object.__setattr__(self, "patients", (self.patients,))
        object.__setattr__(
            self,
            "patients",
            tuple(
                population_token(n[len(POPULATION_PREFIX) :])
                if n.startswith(POPULATION_PREFIX)
                else n
                for n in self.patients
            ),
        )
        if not (isinstance(self.days, int) and self.days >= 1):
            raise LoopConfigError("days", self.days, "an integer >= 1")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise LoopConfigError("seed", self.seed, "an integer >= 0")
        allowed = check_controller_name(self.controller)
        if allowed is not None:
            raise LoopConfigError("controller", self.controller, allowed)
        if self.scenario not in SCENARIOS:
            raise LoopConfigError("scenario", self.scenario, f"one of {', '.join(SCENARIOS)}")
        if not (isinstance(self.control_period_min, int) and 1 <= self.control_period_min <= 60):
            raise LoopConfigError("control_period_min", self.control_period_min, "1..60 minutes")
        if self.control_period_min < self.cgm.sample_period_min:
            raise LoopConfigError(
                "control_period_min",
                self.control_period_min,
                f">= the CGM sample period ({self.cgm.sample_period_min} min): a controller "
                "cannot run faster than its sensor",
            )
        choice = parse_model(self.model)
        if choice.kind == "fit":
            raise LoopConfigError(
                "model",
                self.model,
                f"{MODEL_HELP}; fit is resolved before the loop: fit the twins "
                "(`twinloop twin individualize`) and give model=twin:DIR",
            )
        object.__setattr__(self, "model", choice.spec)
        self._check_refit()
        self.patient_table()
        if choice.kind == "twin" and not Path(str(choice.path)).expanduser().exists():
            raise LoopConfigError(
                "model", self.model, "twin:PATH of a twin.yaml or a directory of <patient>.yaml"
            )

    def _check_refit(self) -> None:
        def whole(value: object, lo: int, hi: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi

        if not whole(self.refit_every_days, 0, 366):
            raise LoopConfigError(
                "refit_every_days", self.refit_every_days, "whole days 0..366 (0: never)"
            )
        if self.refit_every_days and not self.twin:
            raise LoopConfigError(
                "refit_every_days", self.refit_every_days, "0 without the twin (twin=false)"
            )
        if not whole(self.refit_window_days, 1, 30):
            raise LoopConfigError("refit_window_days", self.refit_window_days, "whole days 1..30")
        if not whole(self.refit_max_iter, 1, 1000):
            raise LoopConfigError("refit_max_iter", self.refit_max_iter, "an integer 1..1000")
        if not whole(self.refit_delay_min, 1, MIN_PER_DAY):
            raise LoopConfigError("refit_delay_min", self.refit_delay_min, "whole minutes 1..1440")

    def model_of(self, patient: PatientParameters) -> PatientParameters:
        """The model the loop of ``patient`` plans on (see ``model``)."""
        choice = parse_model(self.model)
        n = len(self.patient_table()) if choice.kind == "twin" else 1
        return loop_model(choice, patient, n_patients=n)

    def model_table(self) -> tuple[PatientParameters, ...]:
        """The model of each patient of :meth:`patient_table`, in order (read once)."""
        choice, patients = parse_model(self.model), self.patient_table()
        return tuple(loop_model(choice, p, n_patients=len(patients)) for p in patients)

    def patient_table(self) -> tuple[PatientParameters, ...]:
        """The patients of the run, in order."""
        return expand_names(self.patients)


class PatientLoop:
    """The loop of one patient, assembled from plain agents and channels.

    Args:
        patient: the virtual patient.
        config: the run.
        rng: this patient's generator (meals and sensor noise draw from its children).
        controller: overrides the configured controller (e.g. a learned policy).
        model: the model the twin and a planning controller use (default: the configured
            ``model`` of ``patient``, :meth:`LoopConfig.model_of`).

    """

    def __init__(
        self,
        patient: PatientParameters,
        config: LoopConfig,
        rng: np.random.Generator,
        controller: Controller | None = None,
        model: PatientParameters | None = None,
    ) -> None:
        self.patient = patient
        self.config = config
        #: what the twin estimator and a planning controller believe the patient is
        self.model = config.model_of(patient) if model is None else model
        meal_rng, noise_rng = rng.spawn(2)
        scenario = SCENARIOS[config.scenario](carb_error=config.carb_error)
        self.meals: MealPlan = scenario.sample(meal_rng, days=config.days)
        self.sensor = SensorAgent(config.cgm, noise_rng)
        self.controller = controller or make_controller(
            config.controller, patient, model=self.model
        )
        self.supervisor = SafetySupervisor(
            SupervisorConfig.for_patient(patient), model=self.model if config.twin else None
        )
        self.actuator = PumpActuator(config.pump, patient.basal_u_per_h)
        #: What the pump delivers on its own when no valid command reaches it (U/h).
        self.actuator_fallback_u_per_h = self.actuator.scheduled_basal_u_per_h
        self.iob = IobTracker(patient.basal_u_per_h)
        self.twin = (
            TwinEstimator(self.model, scheduled_basal_u_per_h=patient.basal_u_per_h)
            if config.twin
            else None
        )
        #: the controller plans on the twin's model (it gets ``ControllerInput.twin``)
        self._plans_on_twin = bool(getattr(self.controller, "needs_twin", False))
        self.channels: dict[str, Channel[Message]] = {name: Channel(name) for name in CHANNELS}
        self._x = np.array(patient.x0, dtype=np.float64).reshape(1, N_STATES)
        self._meal_state = np.zeros((1, N_MEAL_STATE))
        self._params = parameter_matrix([patient])
        self._vg = float(self._params[0, P_VG])
        self._meal_idx = 0
        self._t_min = 0
        period = config.control_period_min
        self._insulin = np.zeros((1, period))
        self._meal = np.zeros((1, period))
        self._carbs = np.zeros((1, period))
        self._gp = np.zeros((1, period + 1))
        self._gs = np.zeros((1, period + 1))
        self._eat_rate = np.array([DEFAULT_EAT_RATE_G_PER_MIN])
        self._new_readings: list[CgmReading] = []
        self._last_deliveries: list[InsulinDelivery] = []
        #: what the twin saw, for re-fits (None: no re-fit)
        self.log = LoopLog(config.days * MIN_PER_DAY) if config.refit_every_days else None
        self._next_refit_min = config.refit_every_days * MIN_PER_DAY
        self._refit: tuple[int, int, Pending] | None = None  # (started, window start, fit)
        self._pool_fits = 0  # fits submitted to the shared worker process
        self.place(InlinePlacement())

    def listen(self, listener: Listener) -> None:
        """Send every message of every channel to ``listener(channel, message)``."""
        for channel in self.channels.values():
            channel.listen(listener)

    def place(self, placement: Placement) -> None:
        """Host the agents with ``placement`` (call before :meth:`run`; inline by default)."""
        self.placement = placement
        self._sensor = placement.host(self.sensor, label="sensor")
        self._controller = placement.host(self.controller, label="controller")
        self._supervisor = placement.host(self.supervisor, label="supervisor")
        self._actuator = placement.host(self.actuator, label="actuator")
        self._twin = None if self.twin is None else placement.host(self.twin, label="twin")

    def close(self) -> None:
        """Stop hosting the agents (their copies in Ray actors); drop a re-fit under way."""
        if self._refit is not None:
            self._refit[2].cancel()
            self._refit = None
        if self._pool_fits:
            release(self._pool_fits)
            self._pool_fits = 0
        refs = [self._sensor, self._controller, self._supervisor, self._actuator]
        self.placement.release(refs if self._twin is None else [*refs, self._twin])

    def _fault(self, agent: str, exc: BaseException, fallback: str) -> None:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        self.channels["runtime->faults"].send(
            AgentFault(float(self._t_min), agent, error, fallback)
        )

    def _truth(self, t_min: float, gp: float, gs: float) -> PlantGlucose:
        return PlantGlucose(t_min, gp / self._vg, gs / self._vg)

    def _sense(self, truths: list[PlantGlucose]) -> Steps:
        passed = []
        for truth in truths:
            sent = self.channels["plant->sensor"].send(truth)
            if isinstance(sent, PlantGlucose):
                passed.append(sent)
        (outcome,) = yield [Request(self._sensor, "read_many", (passed,))]
        if outcome.error is not None:  # a dead sensor gives no readings; the watchdog takes over
            self._fault("sensor", outcome.error, "no readings")
        for reading in outcome.value or []:
            delivered = self.channels["sensor->controller"].send(reading)
            if isinstance(delivered, CgmReading):
                self._new_readings.append(delivered)
                if self.log is not None:
                    self.log.reading(delivered)

    def _announce(
        self, t0: int, t1: int
    ) -> tuple[float, list[tuple[int, float]], list[MealAnnouncement]]:
        """Announced grams, the true meals and the announcements of ``[t0, t1)``."""
        announced = 0.0
        messages: list[MealAnnouncement] = []
        starts: list[tuple[int, float]] = []
        plan = self.meals
        while self._meal_idx < len(plan) and plan.start_min[self._meal_idx] < t1:
            j = self._meal_idx
            starts.append((int(plan.start_min[j]), float(plan.carbs_g[j])))
            msg = self.channels["meal->controller"].send(
                MealAnnouncement(float(plan.start_min[j]), float(plan.announced_g[j]))
            )
            if isinstance(msg, MealAnnouncement):
                announced += msg.carbs_g
                messages.append(msg)
            self._meal_idx += 1
        for injected in self.channels["meal->controller"].pull(float(t0), float(t1)):
            msg = self.channels["meal->controller"].send(injected)  # e.g. a false meal
            if isinstance(msg, MealAnnouncement):
                announced += msg.carbs_g
                messages.append(msg)
        return announced, starts, messages

    def _observation(self, t: float, announced_g: float) -> ControllerInput:
        reading = self.channels["sensor->controller"].latest
        glucose = reading.glucose_mg_dl if isinstance(reading, CgmReading) else math.nan
        age = t - reading.t_min if reading is not None else math.inf
        return ControllerInput(
            t, glucose, age, self.iob.net_iob_u, announced_g, self.iob.net_activity_u_per_min
        )

    def _command(self, t: float, outcome: Outcome) -> InsulinCommand | None:
        """The controller's command, or None when it failed or overran its deadline."""
        deadline = self.config.controller_deadline_s
        fallback = "no command (supervisor's safe command)"
        if outcome.error is not None:  # a failing controller (or its actor) must not stop therapy
            self._fault("controller", outcome.error, fallback)
            return None
        if outcome.took_s > deadline:  # a controller cannot be interrupted: discard late
            late = TimeoutError(f"decide took {outcome.took_s:.3f} s, deadline {deadline:g} s")
            self._fault("controller", late, fallback)
            return None
        dose = outcome.value
        bad = not_a_dose(dose)
        if bad is not None:  # None, NaN, a wrong type: a fault, as if the controller raised
            self._fault("controller", TypeError(f"decide returned {bad}"), fallback)
            return None
        command = InsulinCommand(t, dose.basal_u_per_h, dose.bolus_u, dose.duration_min)
        sent = self.channels["controller->supervisor"].send(command)
        return sent if isinstance(sent, InsulinCommand) else None

    def _twin_view(self, outcome: Outcome) -> tuple[TwinEstimate | None, TwinPlanState | None]:
        """The estimate and the plan state of a ``step_for_planning`` outcome."""
        if outcome.error is not None:
            return self._estimate(outcome), None
        value, plan_state = outcome.value
        return self._estimate(Outcome(value, None, outcome.took_s)), plan_state

    def _estimate(self, outcome: Outcome) -> TwinEstimate | None:
        if outcome.error is not None:  # the loop goes on without the twin's forecast
            self._fault("twin", outcome.error, "no estimate")
            return None
        sent = self.channels["estimator->controller"].send(outcome.value)
        return sent if isinstance(sent, TwinEstimate) else None

    def tick(self) -> None:
        """One control period: decide, review, actuate, and advance the plant."""
        drive(self.placement, [self.steps()])

    def steps(self) -> Steps:
        """One control period as rounds of agent requests (:func:`~..placement.drive`)."""
        period = self.config.control_period_min
        t0 = self._t_min
        if t0 == 0:
            x = self._x[0]
            yield from self._sense([self._truth(0.0, x[3], x[12])])
        if self.log is not None:
            yield from self._refit_steps(t0)
        announced, starts, meal_messages = self._announce(t0, t0 + period)
        if self.log is not None:
            for message in meal_messages:
                self.log.meal(message)
        readings, self._new_readings = self._new_readings, []
        deliveries, self._last_deliveries = self._last_deliveries, []
        step_args = (float(t0), deliveries, meal_messages, readings)
        observation = self._observation(float(t0), announced)
        deadline = self.config.controller_deadline_s
        estimate: TwinEstimate | None = None
        if self._twin is not None and self._plans_on_twin:
            # the controller plans on the twin: the twin first, then the controller
            (twin_outcome,) = yield [Request(self._twin, "step_for_planning", step_args)]
            estimate, plan_state = self._twin_view(twin_outcome)
            observation = dataclasses.replace(observation, twin=plan_state)
            (outcome,) = yield [Request(self._controller, "decide", (observation,), deadline)]
            command = self._command(float(t0), outcome)
        else:
            # the twin and the controller are independent this tick: one round
            requests = [Request(self._controller, "decide", (observation,), deadline)]
            if self._twin is not None:
                requests.append(Request(self._twin, "step_for_planning", step_args))
            outcomes = yield requests
            command = self._command(float(t0), outcomes[0])
            estimate, plan_state = (
                (None, None) if self._twin is None else self._twin_view(outcomes[1])
            )
        # the supervisor's predictive guard simulates from the twin's plan state
        review = (float(t0), command, readings, deliveries, estimate, plan_state, meal_messages)
        (outcome,) = yield [Request(self._supervisor, "tick", review)]
        if outcome.error is not None:  # without its supervisor the pump runs the scheduled basal
            self._fault("supervisor", outcome.error, "scheduled basal, no bolus")
            basal = self.actuator_fallback_u_per_h
            approved, overrides = InsulinCommand(float(t0), basal, 0.0, float(period)), []
        else:
            approved, overrides = outcome.value
        for o in overrides:
            self.channels["supervisor->overrides"].send(o)
        approved_sent = self.channels["supervisor->actuator"].send(approved)
        cmd = approved_sent if isinstance(approved_sent, InsulinCommand) else None
        insulin = self._insulin
        meal = self._meal
        meal[:] = 0.0
        for m, grams in starts:
            meal[0, m - t0] += grams
        (outcome,) = yield [Request(self._actuator, "actuate", (cmd, float(t0), period))]
        if outcome.error is not None:  # the pump's own fallback: its scheduled basal
            self._fault("actuator", outcome.error, "scheduled basal")
            rate = self.actuator_fallback_u_per_h / 60.0
            deliveries_now = [InsulinDelivery(float(t0 + k), rate, 0.0) for k in range(period)]
        else:
            deliveries_now = outcome.value
        for k, delivery in enumerate(deliveries_now):
            # the channel carries what reaches the patient; the twin and the supervisor get
            # the pump's own report, which a silent actuator fault (an occlusion) leaves as is
            sent = self.channels["actuator->plant"].send(delivery)
            self._last_deliveries.append(delivery)
            if self.log is not None:
                self.log.delivery(delivery)
            self.iob.record(delivery.total_u)  # the controller's insulin on board: reported
            insulin[0, k] = sent.total_u if isinstance(sent, InsulinDelivery) else 0.0
        advance(
            self._x,
            self._meal_state,
            self._params,
            insulin,
            meal,
            self._eat_rate,
            carbs_out=self._carbs,
            gp_out=self._gp,
            gs_out=self._gs,
            check=False,
        )
        self._t_min = t0 + period
        yield from self._sense(
            [
                self._truth(float(t0 + k), self._gp[0, k], self._gs[0, k])
                for k in range(1, period + 1)
            ]
        )

    def _refit_steps(self, t0: int) -> Steps:
        """Swap in a finished re-fit's model when due; start a re-fit when one is due."""
        cfg = self.config
        if self._refit is not None:
            started, first, pending = self._refit
            due = t0 >= started + cfg.refit_delay_min if cfg.clock == "sim" else pending.ready()
            if due:
                self._refit = None
                try:
                    result = pending.result()  # in sim time: waits if the fit is not done
                except Exception as exc:  # a fit that fails leaves the loop as it was
                    self._fault("refit", exc, "keeps its model")
                else:
                    yield from self._swap(t0, started, first, result)
        if t0 >= self._next_refit_min and t0 > 0:
            self._next_refit_min += cfg.refit_every_days * MIN_PER_DAY
            if self._refit is not None:  # wall clock: the previous fit is still running
                busy = RuntimeError("the previous re-fit is still running")
                self._fault("refit", busy, "no new re-fit")
                return
            assert self.log is not None
            first = max(0, t0 - cfg.refit_window_days * MIN_PER_DAY)
            job = RefitJob.for_patient(self.patient, self.log.grid(first, t0), cfg.refit_max_iter)
            try:
                on_ray = self.placement.name == "ray"
                pending = submit(job, on_ray=on_ray)
            except Exception as exc:  # no worker: the loop goes on with its model
                self._fault("refit", exc, "keeps its model")
                return
            self._pool_fits += int(not on_ray)
            self._refit = (t0, first, pending)

    def _swap(self, t0: int, started: int, first: int, result: RefitResult) -> Steps:
        """Swap the twin's model, then the planning controller's; record it."""
        assert self._twin is not None
        (outcome,) = yield [Request(self._twin, "swap_model", (result.model,))]
        if outcome.error is not None:
            self._fault("twin", outcome.error, "keeps its model")
            return
        if callable(getattr(self.controller, "swap_model", None)):
            (outcome,) = yield [Request(self._controller, "swap_model", (result.model,))]
            if outcome.error is not None:  # the twin's state is of the new model already
                self._fault("controller", outcome.error, "plans on its previous model")
        (outcome,) = yield [Request(self._supervisor, "swap_model", (result.model,))]
        if outcome.error is not None:  # its guard goes on simulating the previous model
            self._fault("supervisor", outcome.error, "guard keeps its previous model")
        self.model = result.model
        self.channels["estimator->models"].send(
            ModelSwap(
                float(t0),
                float(started),
                float(first),
                result.cgm_readings,
                result.rmse_mg_dl,
                result.seconds,
                result.correction_drop_mg_dl_per_u,
            )
        )

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        """Run every tick of the configured days (see :func:`run_together`)."""
        run_together([self], progress)


def run_together(
    loops: Sequence[PatientLoop], progress: Callable[[int], None] | None = None
) -> None:
    """Run loops of one configuration tick by tick in lockstep (paced in ``wall`` mode).

    All loops must share a placement: each round of their ticks is one
    :meth:`~twinloop.agents.placement.Placement.execute` (one actor call per kind of agent on Ray).
    In wall-clock mode each tick is scheduled at start + ``t_min`` × the time scale; the loops
    sleep until shortly before and spin the rest, then record the tick's lateness and duration
    on ``clock->ticks``. ``progress`` receives the simulated minutes done (all loops).
    """
    if not loops:
        return
    cfg = loops[0].config
    placement = loops[0].placement
    if any(loop.config != cfg or loop.placement is not placement for loop in loops):
        raise ValueError("run_together: loops must share their configuration and placement")
    period = cfg.control_period_min
    wall = cfg.clock == "wall"
    start = time.perf_counter()
    for _ in range(cfg.days * MIN_PER_DAY // period):
        t_tick = float(loops[0]._t_min)
        if wall:
            due = start + t_tick * cfg.wall_s_per_sim_min
            wait = due - time.perf_counter()
            if wait > SPIN_S:
                time.sleep(wait - SPIN_S)
            while time.perf_counter() < due:
                pass
            began = time.perf_counter()
            drive(placement, [loop.steps() for loop in loops])
            took_ms = 1000.0 * (time.perf_counter() - began)
            timing = TickTiming(t_tick, 1000.0 * (began - due), took_ms)
            for loop in loops:
                loop.channels["clock->ticks"].send(timing)
        else:
            drive(placement, [loop.steps() for loop in loops])
        if progress is not None:
            progress(period * len(loops))
