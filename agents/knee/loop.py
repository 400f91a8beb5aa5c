"""The knee-exoskeleton closed loop in simulated time, every edge a channel.

plant → sensors → twin → controller → supervisor → drive → plant, at the control rate
(100 Hz by default) while the plant advances at 1 kHz in between.

One :class:`ExoLoop` runs one patient's knee through one rehabilitation task. The plant, the
exoskeleton's drive and its sensors are the engine of ``twinloop/KneeExo-v0``
(:class:`twinloop.plant.knee.env_core.KneeExoBatch`, one row), so a policy trained on the
environment sees exactly the readings it was trained on. Per control tick at task time ``t``:

1. the sensors' readings (encoder angle and velocity, joint torque sensor, EMG envelopes) go on
   ``sensor->controller`` and the task's reference on ``task->controller``;
2. the twin estimator (when the loop has one) identifies the patient's torque, residual
   voluntary capacity and spasticity from the readings and the torque applied over the last
   period, and sends its estimate on ``estimator->controller``;
3. the controller turns readings, reference and estimate into a torque command
   (``controller->supervisor``);
4. the supervisor enforces the torque, velocity and range-of-motion limits and goes compliant
   (zero torque) on stale encoder data (overrides on ``supervisor->overrides``) and sends the
   approved torque on ``supervisor->actuator``;
5. the drive holds it for the period (with its own saturation, slew-rate limit and friction)
   while the knee advances; the true joint state at the end goes on ``plant->sensor``.

The agents are hosted by a :class:`~twinloop.agents.placement.Placement` (in process by default, or
as Ray actors) and exchange messages through :func:`~twinloop.agents.placement.drive`, like the
glucose loop. An agent that fails at a tick is replaced for that tick by a safe fallback recorded on
``runtime->faults``: no estimate for the twin, no command for the controller (the supervisor
then applies zero torque), zero torque for the supervisor itself.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from twinloop.agents.channels import Channel, Listener
from twinloop.agents.errors import LoopConfigError
from twinloop.agents.knee.messages import (
    ExoOverride,
    ExoSensorReading,
    ExoTorqueCommand,
    JointState,
    KneeTwinEstimate,
    TaskReference,
)
from twinloop.agents.knee.supervisor import ExoSupervisor, ExoSupervisorConfig
from twinloop.agents.messages import AgentFault
from twinloop.agents.placement import InlinePlacement, Outcome, Placement, Request, Steps, drive
from twinloop.plant.knee.env_core import (
    S_REF_OMEGA,
    S_REF_THETA,
    S_STEP,
    KneeExoBatch,
    KneeExoConfig,
)
from twinloop.plant.knee.model import (
    O_EXO_NM,
    O_EXO_WORK_J,
    O_OMEGA_ABS_MAX,
    O_PATIENT_NM,
    O_PATIENT_WORK_J,
    O_REFLEX_H,
    O_REFLEX_Q,
    O_THETA_MAX,
    O_THETA_MIN,
    PRESETS,
    X_ACT_H,
    X_ACT_Q,
    X_EFFORT,
    X_OMEGA,
    X_THETA,
    KneeParams,
    knee_preset,
)
from twinloop.plant.knee.sensors import EMGSpec, EncoderSpec, TorqueSensorSpec
from twinloop.plant.knee.tasks import (
    K_KIND,
    K_T,
    K_TOTAL,
    KIND_CYCLIC,
    TASKS,
    CyclicFlexionExtension,
)
from twinloop.policies.knee.controllers import (
    ExoInput,
    check_controller_name,
    make_exo_controller,
)

EXO_CHANNELS = (
    "plant->sensor",
    "sensor->controller",
    "task->controller",
    "estimator->controller",
    "controller->supervisor",
    "supervisor->overrides",
    "supervisor->actuator",
    "runtime->faults",
)

#: The limb the twin knows: the patient's segment and drive, with a healthy knee's muscles and
#: no spasticity as its prior (what it identifies is the impairment).
TWIN_PRIOR_PRESET = "healthy"


@dataclasses.dataclass(frozen=True)
class ExoLoopConfig:
    """A knee-exoskeleton run (validated once).

    Attributes:
        patients: knee presets (``healthy``, ``mild``, ``moderate``, ``severe``), one loop each.
        task: ``cyclic`` (flexion–extension), ``sit_to_stand`` or ``hold``.
        cycles: cycles of the cyclic task (others run once).
        seed: seed of the task's randomisation, the initial angle and the sensor noise (one
            child stream per patient).
        controller: ``none`` (unassisted), ``impedance``, ``aan`` (assist-as-needed) or
            ``policy:PATH`` (a policy trained on ``twinloop/KneeExo-v0``).
        control_hz: control rate, Hz (100–500, dividing the 1 kHz plant rate).
        twin: run the knee twin estimator (its estimate feeds the controller).
        supervisor: the exoskeleton supervisor's limits.
        encoder: joint encoder model.
        torque_sensor: joint torque sensor model.
        emg: EMG envelope model.
        controller_deadline_s: a controller answer slower than this (wall clock) is discarded.

    """

    patients: tuple[str, ...] = ("moderate",)
    task: str = "cyclic"
    cycles: int = 10
    seed: int = 0
    controller: str = "aan"
    control_hz: int = 100
    twin: bool = True
    supervisor: ExoSupervisorConfig = dataclasses.field(default_factory=ExoSupervisorConfig)
    encoder: EncoderSpec = dataclasses.field(default_factory=EncoderSpec)
    torque_sensor: TorqueSensorSpec = dataclasses.field(default_factory=TorqueSensorSpec)
    emg: EMGSpec = dataclasses.field(default_factory=EMGSpec)
    controller_deadline_s: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.patients, str):
            object.__setattr__(self, "patients", (self.patients,))
        if not self.patients:
            raise LoopConfigError("patients", self.patients, "at least one knee preset")
        for p in self.patients:
            if p not in PRESETS:
                raise LoopConfigError("patients", p, f"knee presets: {', '.join(PRESETS)}")
        if self.task not in TASKS:
            raise LoopConfigError("task", self.task, f"one of {', '.join(TASKS)}")
        if isinstance(self.cycles, bool) or not (
            isinstance(self.cycles, int) and 1 <= self.cycles <= 1000
        ):
            raise LoopConfigError("cycles", self.cycles, "an integer in 1..1000")
        if isinstance(self.seed, bool) or not (isinstance(self.seed, int) and self.seed >= 0):
            raise LoopConfigError("seed", self.seed, "an integer >= 0")
        allowed = check_controller_name(self.controller)
        if allowed is not None:
            raise LoopConfigError("controller", self.controller, allowed)
        if not (
            isinstance(self.control_hz, int)
            and not isinstance(self.control_hz, bool)
            and 100 <= self.control_hz <= 500
            and 1000 % self.control_hz == 0
        ):
            raise LoopConfigError(
                "control_hz", self.control_hz, "an integer in 100..500 dividing 1000"
            )
        if not (
            isinstance(self.controller_deadline_s, int | float) and self.controller_deadline_s > 0
        ):
            raise LoopConfigError("controller_deadline_s", self.controller_deadline_s, "> 0 s")

    def env_config(self, patient: str) -> KneeExoConfig:
        """The plant, drive and sensors of ``patient``'s loop, as the environment's config.

        The environment's termination limits are widened out of the way: in the loop the
        supervisor guards the limits, and the metrics count any violation.
        """
        task = CyclicFlexionExtension(cycles=self.cycles) if self.task == "cyclic" else self.task
        return KneeExoConfig(
            patients=(patient,),
            tasks=(task,),
            control_hz=self.control_hz,
            encoder=self.encoder,
            torque_sensor=self.torque_sensor,
            emg=self.emg,
            rom_min_rad=-math.pi,
            rom_max_rad=math.pi,
            max_velocity_rad_s=1e6,
        )


def reflex_torque_nm(params: KneeParams, quad_reflex: float, ham_reflex: float) -> float:
    """The stretch reflexes' torque at full muscle capacity: ``−e_q·F_q·r_q + e_h·F_h·r_h``.

    A nominal value (optimal fibre length, isometric) for counting reflex events, N·m.
    """
    quad = params.quad_max_force_n * params.quad_moment_arm_m
    ham = params.ham_max_force_n * params.ham_moment_arm_m
    return -quad_reflex * quad + ham_reflex * ham


class _Controller:
    """Hosts an exoskeleton controller; ``decide`` is the agent method the loop calls."""

    def __init__(self, name: str, period_s: float, torque_limit_nm: float, control_hz: int) -> None:
        if name.startswith("policy:"):
            from twinloop.policies.knee.learned import load_exo_policy

            # a policy trained at another control rate is refused
            self.controller: Any = load_exo_policy(name[len("policy:") :], control_hz=control_hz)
        else:
            self.controller = make_exo_controller(
                name, period_s=period_s, torque_limit_nm=torque_limit_nm
            )

    def decide(self, obs: ExoInput) -> object:
        # unconverted: the loop treats anything but a finite number as the controller's fault
        torque: object = self.controller.torque(obs)
        return torque


class _Twin:
    """Hosts the knee twin estimator (imported lazily: the estimator is optional)."""

    def __init__(self, limb: KneeParams, control_hz: int) -> None:
        from twinloop.agents.knee.estimator import KneeTwinEstimator

        self.estimator = KneeTwinEstimator(limb, control_hz=control_hz)

    def step(
        self, reading: ExoSensorReading, reference: TaskReference, applied_torque_nm: float
    ) -> KneeTwinEstimate:
        return self.estimator.step(reading, reference, applied_torque_nm)


class ExoLoop:
    """The loop of one knee, assembled from plain agents and channels.

    Args:
        patient: knee preset name.
        config: the run.
        rng: this patient's generator (task, initial angle and sensor noise).

    """

    def __init__(self, patient: str, config: ExoLoopConfig, rng: np.random.Generator) -> None:
        self.patient = patient
        self.config = config
        self.params = knee_preset(patient)
        self.batch = KneeExoBatch(config.env_config(patient), 1)
        zero = np.zeros(1, dtype=np.intp)
        self.batch.reset_many(zero, [rng], zero, zero)
        row = self.batch.task[0]
        self.dt_s = 1.0 / config.control_hz
        self.n_ticks = max(1, round(float(row[K_TOTAL]) * config.control_hz))
        #: the task's period (cyclic) or duration, s: the assist-as-needed's phase
        self.period_s = float(row[K_T] if row[K_KIND] == KIND_CYCLIC else row[K_TOTAL])
        self.supervisor = ExoSupervisor(config.supervisor)
        self.controller = _Controller(
            config.controller, self.period_s, config.supervisor.command_limit_nm, config.control_hz
        )
        limb = knee_preset(
            TWIN_PRIOR_PRESET, body_mass_kg=self.params.body_mass_kg, height_m=self.params.height_m
        )
        self.twin = _Twin(limb, config.control_hz) if config.twin else None
        self.channels: dict[str, Channel[Any]] = {name: Channel(name) for name in EXO_CHANNELS}
        self._applied_nm = 0.0
        self._estimate: KneeTwinEstimate | None = None
        self._action = np.zeros(1)
        self.place(InlinePlacement())

    def listen(self, listener: Listener) -> None:
        """Send every message of every channel to ``listener(channel, message)``."""
        for channel in self.channels.values():
            channel.listen(listener)

    def place(self, placement: Placement) -> None:
        """Host the agents with ``placement`` (call before :meth:`run`; inline by default)."""
        self.placement = placement
        self._controller = placement.host(self.controller, label="exo-controller")
        self._supervisor = placement.host(self.supervisor, label="exo-supervisor")
        self._twin = None if self.twin is None else placement.host(self.twin, label="knee-twin")

    def close(self) -> None:
        """Stop hosting the agents."""
        refs = [self._controller, self._supervisor]
        self.placement.release(refs if self._twin is None else [*refs, self._twin])

    @property
    def t_s(self) -> float:
        """Task time, s."""
        return float(self.batch.scal[0, S_STEP]) * self.dt_s

    @property
    def done(self) -> bool:
        """Whether the task is over."""
        return int(self.batch.scal[0, S_STEP]) >= self.n_ticks

    def _fault(self, agent: str, exc: BaseException, fallback: str) -> None:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        self.channels["runtime->faults"].send(AgentFault(self.t_s / 60.0, agent, error, fallback))

    def _joint_state(self) -> JointState:
        b = self.batch
        x, out = b.x[0], b.out[0]
        return JointState(
            self.t_s,
            float(x[X_THETA]),
            float(x[X_OMEGA]),
            float(out[O_EXO_NM]),
            float(out[O_PATIENT_NM]),
            float(x[X_ACT_Q]),
            float(x[X_ACT_H]),
            float(out[O_REFLEX_Q]),
            float(out[O_REFLEX_H]),
            float(out[O_EXO_WORK_J]),
            float(out[O_PATIENT_WORK_J]),
            float(out[O_THETA_MIN]),
            float(out[O_THETA_MAX]),
            float(out[O_OMEGA_ABS_MAX]),
            float(x[X_EFFORT]),
        )

    def _readings(self) -> tuple[ExoSensorReading | None, TaskReference | None]:
        obs = self.batch.obs[0]
        t = self.t_s
        sent = self.channels["sensor->controller"].send(
            ExoSensorReading(t, *(float(v) for v in obs[:5]))
        )
        ref = self.channels["task->controller"].send(
            TaskReference(
                t, float(self.batch.scal[0, S_REF_THETA]), float(self.batch.scal[0, S_REF_OMEGA])
            )
        )
        return sent, ref

    def _observation(
        self, reading: ExoSensorReading | None, ref: TaskReference | None
    ) -> ExoInput | None:
        reading = reading or self.channels["sensor->controller"].latest
        ref = ref or self.channels["task->controller"].latest
        if reading is None or ref is None:
            return None
        est = self._estimate
        nan = math.nan
        return ExoInput(
            self.t_s,
            reading.angle_rad,
            reading.velocity_rad_s,
            ref.reference_rad,
            ref.reference_velocity_rad_s,
            reading.torque_sensor_nm,
            reading.emg_quad,
            reading.emg_ham,
            est.patient_torque_nm if est else nan,
            est.voluntary_capacity if est else nan,
            est.spasticity_gain_per_rad_s if est else nan,
        )

    def _command(self, outcome: Outcome) -> ExoTorqueCommand | None:
        fallback = "no command (supervisor's zero torque)"
        if outcome.error is not None:
            self._fault("controller", outcome.error, fallback)
            return None
        deadline = self.config.controller_deadline_s
        if outcome.took_s > deadline:
            late = TimeoutError(f"decide took {outcome.took_s:.3f} s, deadline {deadline:g} s")
            self._fault("controller", late, fallback)
            return None
        torque = outcome.value
        if isinstance(torque, bool) or not (
            isinstance(torque, numbers.Real) and math.isfinite(torque)
        ):  # None, NaN, a wrong type: a fault, as if the controller raised
            self._fault("controller", TypeError(f"decide returned {torque!r:.60}"), fallback)
            return None
        sent = self.channels["controller->supervisor"].send(
            ExoTorqueCommand(self.t_s, float(torque))
        )
        return sent if isinstance(sent, ExoTorqueCommand) else None

    def steps(self) -> Steps:
        """One control period as rounds of agent requests (:func:`~..placement.drive`)."""
        t = self.t_s
        if int(self.batch.scal[0, S_STEP]) == 0:
            self.channels["plant->sensor"].send(self._joint_state())
        reading, ref = self._readings()
        if self._twin is not None and reading is not None and ref is not None:
            (outcome,) = yield [Request(self._twin, "step", (reading, ref, self._applied_nm))]
            if outcome.error is not None:
                self._fault("twin", outcome.error, "no estimate")
            else:
                sent = self.channels["estimator->controller"].send(outcome.value)
                if isinstance(sent, KneeTwinEstimate):
                    self._estimate = sent
        obs = self._observation(reading, ref)
        command = None
        if obs is not None:
            deadline = self.config.controller_deadline_s
            (outcome,) = yield [Request(self._controller, "decide", (obs,), deadline)]
            command = self._command(outcome)
        latest = self.channels["sensor->controller"].latest
        (outcome,) = yield [Request(self._supervisor, "review", (t, command, latest))]
        overrides: list[ExoOverride]
        if outcome.error is not None:  # without its supervisor the drive gets zero torque
            self._fault("supervisor", outcome.error, "zero torque")
            approved, overrides = ExoTorqueCommand(t, 0.0), []
        else:
            approved, overrides = outcome.value
        for o in overrides:
            self.channels["supervisor->overrides"].send(o)
        sent = self.channels["supervisor->actuator"].send(approved)
        torque = sent.torque_nm if isinstance(sent, ExoTorqueCommand) else 0.0
        self._applied_nm = torque
        self._action[0] = torque
        self.batch.step(self._action)
        self.channels["plant->sensor"].send(self._joint_state())

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        """Run the whole task (see :func:`run_exo_together`)."""
        run_exo_together([self], progress)


def run_exo_together(
    loops: Sequence[ExoLoop], progress: Callable[[int], None] | None = None
) -> None:
    """Run loops sharing a placement tick by tick in lockstep until every task is over.

    ``progress`` receives the control ticks done (all loops).
    """
    if not loops:
        return
    placement = loops[0].placement
    if any(loop.placement is not placement for loop in loops):
        raise ValueError("run_exo_together: loops must share their placement")
    while True:
        active = [loop for loop in loops if not loop.done]
        if not active:
            return
        drive(placement, [loop.steps() for loop in active])
        if progress is not None:
            progress(len(active))
