"""The HIL rig: the insulin loop against a pump and a CGM reached through device profiles.

The plant is outside the program here (a real patient with real devices, or the emulated
devices of :mod:`twinloop.hw_bridge.emulators`); the rig runs the controller and the safety
supervisor on the wall clock and talks to the devices through :mod:`hw_bridge`:

* **sensor**: the CGM's line protocol, drained at every watchdog step; each valid frame becomes a
  :class:`~twinloop.agents.messages.CgmReading` on ``sensor->controller``;
* **actuator**: the pump's Modbus profile; each control tick writes the supervisor's temp basal
  (rate, then its duration) and a bolus through the profile (limits enforced before the wire),
  records whether the pump accepted them (:class:`PumpAck` on ``pump->acks``), then reads back
  the delivered totals, sent as per-minute deliveries on ``actuator->plant``.

**Pacing.** One dedicated thread (:mod:`twinloop.hil.pacing`: sleep, then spin) runs
``watchdog_steps`` watchdog steps per control period; every ``watchdog_steps``-th step is also
a control tick. Each step's lateness and duration, and overruns, go to ``clock->ticks``.

**Watchdog and fail-safe.** The watchdog (the paced thread) never waits on the pump: every pump
transaction (heartbeat, totals, commands, safe state) runs in a second thread, ``hil-pump-io``,
one at a time. At every step the watchdog polls the CGM (non-blocking) and checks that its port
is up and its newest valid reading younger than ``cgm_stale_min`` simulated minutes, and that the
pump answered: a failed exchange, or one in flight for longer than ``pump_deadline_s`` (a dead
link whose transport is still retrying), counts as lost communication. On lost communication or
stale data it raises an alarm (``rig->alarms``) and stops the controller at once; the pump
profile's declared safe state (cancel bolus, scheduled basal) is written by the pump thread when
the pump can be reached (the alarm's ``action`` says which). While the CGM is out the rig reopens
its port once per ``cgm_stale_min`` (a restarted device behind the same path). Temp basals are
always sent with a duration of ``temp_duration_periods`` control periods, so a pump that can no
longer be reached returns to its scheduled basal by itself within that time: the safe state is
reached within two control periods either way.

**Recovery is verified.** An alarm clears only after fresh data from both devices: a valid CGM
reading received after the outage began *and* a successful pump exchange requested after it.
The rig then writes the safe state once more and clears the alarm; its action says ``control
resumed`` only when no other alarm is still active. :func:`outages` lists each alarm's start
and end (a recording's manifest and summary carry them).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from twinloop.agents.channels import Channel, Listener
from twinloop.agents.glucose.supervisor import SafetySupervisor, SupervisorConfig
from twinloop.agents.messages import (
    Alarm,
    CgmReading,
    InsulinCommand,
    InsulinDelivery,
    Message,
    TickTiming,
)
from twinloop.hil.pacing import PacedThread, PacingStats
from twinloop.hil.time_scale import ClockRateCheck, check_announced
from twinloop.hw_bridge.errors import CommunicationError, os_error_words
from twinloop.plant.glucose.insulin import IobTracker
from twinloop.plant.glucose.metrics import glucose_metrics
from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.glucose.controllers import (
    Controller,
    ControllerInput,
    check_controller_name,
    make_controller,
)

#: Controllers that plan on the twin estimator's model, which the rig does not run.
PLANS_ON_TWIN = ("mpc",)

RIG_CHANNELS = (
    "sensor->controller",
    "controller->supervisor",
    "supervisor->actuator",
    "pump->acks",
    "supervisor->overrides",
    "actuator->plant",
    "clock->ticks",
    "rig->alarms",
)

#: Longest wait, at the end of a session, for the pump thread's exchange in flight, seconds.
PUMP_THREAD_JOIN_S = 30.0

#: The twinloop channels a pump profile must map (see ``hw_bridge/DEVICES.md``).
PUMP_CHANNELS = (
    "basal_u_per_h",
    "temp_basal_duration_min",
    "bolus_u",
    "delivered_total_u",
    "bolus_remaining_u",
    "heartbeat",
    "alarm_code",
)
#: The optional pump channel of an emulated pump's announced time scale (s per simulated min).
TIME_SCALE_CHANNEL = "time_scale_s_per_min"
#: The CGM line protocol's identification query (answered ``$TLACK,INFO,<s_per_min>``).
CGM_INFO_COMMAND = "INFO"
#: The alarm condition of a device on another time scale (latched for the session).
TIME_SCALE_CONDITION = "time scale mismatch"


@dataclasses.dataclass(frozen=True, slots=True)
class PumpAck(Message):
    """What became of an approved command at the pump (``pump->acks``, one per command).

    ``delivered``: the pump accepted the temp basal (rate and duration) and, when the command
    had one, the bolus; otherwise ``detail`` says why not (``communication lost``, or the
    register and the Modbus exception code the pump answered).
    """

    basal_u_per_h: float
    bolus_u: float
    delivered: bool
    detail: str
    kind: ClassVar[str] = "pump_ack"


class RigConfigError(ValueError):
    """A rig setting outside what is allowed (names the field and the value)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class RigConfig:
    """A HIL session (validated once).

    Attributes:
        patient: whose clinical profile (basal, carb ratio, correction factor) parameterizes
            the controller and the supervisor.
        controller: controller name (no meal announcements reach a rig: ``pid`` by default).
        wall_s_per_sim_min: wall seconds per simulated minute (60 = real time); must match
            the devices' clock (an emulator's ``--time-scale``).
        control_period_min: simulated minutes between control ticks.
        watchdog_steps: watchdog steps per control period (>= 1).
        cgm_stale_min: simulated minutes without a valid reading before the CGM counts as
            stale (default 11: two missed 5-min samples; a lost port counts at once).
        temp_duration_periods: duration of every temp basal, in control periods.
        minutes: simulated minutes to run (None: until stopped).
        realtime: run the pacing thread under ``SCHED_FIFO`` when the OS grants it.
        pump_deadline_s: wall seconds a pump exchange may stay unanswered before the watchdog
            declares the pump lost (None: one control period, at most 2 s; 0 < value <= 60).

    """

    patient: str = "adult#001"
    controller: str = "pid"
    wall_s_per_sim_min: float = 60.0
    control_period_min: int = 5
    watchdog_steps: int = 5
    cgm_stale_min: float = 11.0
    temp_duration_periods: int = 2
    minutes: int | None = 24 * 60
    realtime: bool = False
    pump_deadline_s: float | None = None

    def __post_init__(self) -> None:
        get_patient(self.patient)  # raises a clear error for an unknown name
        allowed = check_controller_name(self.controller)
        if allowed is not None:
            raise RigConfigError("controller", self.controller, allowed)
        if self.controller in PLANS_ON_TWIN:
            raise RigConfigError(
                "controller",
                self.controller,
                "a controller that does not plan on the twin (the rig runs no twin estimator; "
                "use twinloop run for mpc)",
            )
        if not (isinstance(self.wall_s_per_sim_min, int | float) and self.wall_s_per_sim_min > 0):
            raise RigConfigError("wall_s_per_sim_min", self.wall_s_per_sim_min, "seconds > 0")
        if not (isinstance(self.control_period_min, int) and 1 <= self.control_period_min <= 30):
            raise RigConfigError("control_period_min", self.control_period_min, "1..30 minutes")
        if not (isinstance(self.watchdog_steps, int) and 1 <= self.watchdog_steps <= 100):
            raise RigConfigError("watchdog_steps", self.watchdog_steps, "1..100")
        if not self.cgm_stale_min > 0:
            raise RigConfigError("cgm_stale_min", self.cgm_stale_min, "minutes > 0")
        if not (isinstance(self.temp_duration_periods, int) and self.temp_duration_periods >= 1):
            raise RigConfigError("temp_duration_periods", self.temp_duration_periods, ">= 1")
        if self.minutes is not None and not (isinstance(self.minutes, int) and self.minutes >= 1):
            raise RigConfigError("minutes", self.minutes, "an integer >= 1, or None")
        d = self.pump_deadline_s
        if d is not None and not (
            isinstance(d, int | float) and not isinstance(d, bool) and 0 < d <= 60
        ):
            raise RigConfigError("pump_deadline_s", d, "seconds in (0, 60], or None")

    @property
    def deadline_s(self) -> float:
        """Wall seconds a pump exchange may take before the pump counts as lost."""
        if self.pump_deadline_s is not None:
            return float(self.pump_deadline_s)
        return min(self.control_period_min * self.wall_s_per_sim_min, 2.0)

    @property
    def step_s(self) -> float:
        """Wall seconds between watchdog steps."""
        return self.control_period_min * self.wall_s_per_sim_min / self.watchdog_steps


class PumpPort(Protocol):
    """What the rig needs of a pump (a :class:`twinloop.hw_bridge.modbus_client.ModbusDevice`)."""

    def read_many(self, names: list[str]) -> dict[str, Any]:
        """Read registers by name."""
        ...

    def write(self, name: str, value: float, *, retry: bool = True) -> int | None:
        """Write one register: None when accepted, else the device's exception code.

        ``retry=False``: a write whose answer was lost is not sent again (a bolus must never
        be delivered twice).
        """
        ...

    def apply_safe_state(self) -> list[tuple[str, int | None]]:
        """Write the profile's safe state."""
        ...


class CgmPort(Protocol):
    """What the rig needs of a CGM (a :class:`twinloop.hw_bridge.line.LineTransport`)."""

    def poll(self) -> list[Any]:
        """Complete, valid frames received since the last call (never blocks)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the port is open (False once the cable or the device is gone)."""
        ...


@dataclasses.dataclass
class _AlarmState:
    active: bool = False
    since_wall_s: float = math.nan
    latched: bool = False  # a time scale mismatch: fresh data does not clear it


class PumpWorker:
    """The rig's pump thread: runs submitted jobs one at a time, so no caller waits on the pump.

    :meth:`busy_s` says how long the job in flight has run (0 when idle): the watchdog's view of
    a transaction that does not come back.
    """

    def __init__(self, name: str = "hil-pump-io") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._pending = 0
        self._started_at: float | None = None
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._started_at = time.monotonic()
            try:
                job()
            except Exception as exc:  # kept for the session; the thread goes on
                self.errors.append(exc)
            finally:
                with self._lock:
                    self._started_at = None
                    self._pending -= 1

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job`` behind the others."""
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing queued."""
        with self._lock:
            return self._pending == 0

    def busy_s(self) -> float:
        """Seconds the job in flight has been running (0: none)."""
        with self._lock:
            started = self._started_at
        return 0.0 if started is None else time.monotonic() - started

    def close(self, timeout_s: float) -> bool:
        """Stop after the queued jobs; wait up to ``timeout_s``; whether the thread ended."""
        self._jobs.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class Rig:
    """The insulin loop on hardware (or emulated devices), paced on the wall clock.

    Args:
        config: the session.
        pump: the pump (register names resolved through ``channels``).
        cgm: the CGM.
        pump_registers: twinloop channel → the pump profile's register name, for every name
            of :data:`PUMP_CHANNELS` (:func:`pump_register_names` builds it from a profile).
        controller: overrides the configured controller (e.g. a learned policy).
        device_names: how messages name the devices (default ``pump``, ``cgm``; the session
            gives their ports, e.g. ``pump at 127.0.0.1:5020``).

    """

    def __init__(
        self,
        config: RigConfig,
        *,
        pump: PumpPort,
        cgm: CgmPort,
        pump_registers: dict[str, str],
        controller: Controller | None = None,
        device_names: Mapping[str, str] | None = None,
    ) -> None:
        missing = [c for c in PUMP_CHANNELS if c not in pump_registers]
        if missing:
            raise RigConfigError("pump profile", sorted(pump_registers), f"channels {missing}")
        self.config = config
        self.pump = pump
        self.cgm = cgm
        self.regs = pump_registers
        patient = get_patient(config.patient)
        self.controller = controller or make_controller(config.controller, patient)
        self.supervisor = SafetySupervisor(SupervisorConfig.for_patient(patient))
        self.scheduled_basal_u_per_h = patient.basal_u_per_h
        self.iob = IobTracker(patient.basal_u_per_h)
        self.channels: dict[str, Channel[Message]] = {n: Channel(n) for n in RIG_CHANNELS}
        self.alarms = {"cgm": _AlarmState(), "pump": _AlarmState()}
        #: Guards the rig's state and channels, shared by the watchdog and the pump thread
        #: (never held across a pump transaction).
        self._lock = threading.RLock()
        self._io: PumpWorker | None = None
        self._t0_wall = 0.0
        self._last_valid_wall = math.nan
        self._last_pump_ok_wall = math.nan
        self._last_cgm_reopen_wall = 0.0
        self._control_due = False  # a control tick whose step found the pump thread busy
        self._last_reading: CgmReading | None = None
        self._new_readings: list[CgmReading] = []
        self._deliveries: list[InsulinDelivery] = []
        self._last_total_u: float | None = None
        self._last_bolus_remaining_u = 0.0
        self._bolus_sent_u = 0.0
        self._last_heartbeat: int | None = None
        self.safe_state_writes: list[tuple[float, str, int | None]] = []
        #: Pump exchanges the watchdog did not start because the previous one was in flight.
        self.exchanges_skipped = 0
        #: Times the rig reopened the CGM's port during an outage.
        self.cgm_reopens = 0
        #: Every alarm raised or cleared, and every CGM reading, in order.
        self.alarm_log: list[Alarm] = []
        self.glucose_log: list[CgmReading] = []
        self.channels["rig->alarms"].listen(lambda _, m: self.alarm_log.append(m))  # type: ignore[arg-type]
        self.channels["sensor->controller"].listen(
            lambda _, m: self.glucose_log.append(m)  # type: ignore[arg-type]
        )
        names = {"pump": "pump", "cgm": "cgm"} | dict(device_names or {})
        self.device_names = names
        scale = config.wall_s_per_sim_min
        #: Each device's clock rate against the rig's (None: it announces its time scale, a
        #: pump whose profile maps the register, or a device :meth:`check_time_scale` read).
        announces = TIME_SCALE_CHANNEL in pump_registers
        self.rate_checks: dict[str, ClockRateCheck | None] = {
            "cgm": ClockRateCheck(names["cgm"], scale),
            "pump": None if announces else ClockRateCheck(names["pump"], scale, modulo=65536),
        }

    def check_time_scale(self) -> dict[str, float]:
        """At connect: refuse devices that announce a time scale other than the rig's.

        The pump announces it in the register on :data:`TIME_SCALE_CHANNEL` (when its profile
        maps one), the CGM in its answer to ``$TLCMD,INFO`` (when its transport can send
        commands and the device answers with a value). A device that announces is not
        rate-checked; the others are, from their data (:class:`ClockRateCheck`).

        Returns:
            The scales announced, by device (``pump``, ``cgm``).

        Raises:
            TimeScaleMismatch: a device announced another time scale (one line, with the fix).

        """
        rig = self.config.wall_s_per_sim_min
        announced: dict[str, float] = {}
        register = self.regs.get(TIME_SCALE_CHANNEL)
        if register is not None:
            announced["pump"] = float(self.pump.read_many([register])[register])
        command = getattr(self.cgm, "command", None)
        if command is not None:
            try:
                value = getattr(command(CGM_INFO_COMMAND), "value", None)
                if value is not None:
                    announced["cgm"] = float(value)
            except Exception:  # a real CGM without INFO: its data rate is checked instead
                value = None
        for device, value in announced.items():
            check_announced(self.device_names[device], value, rig)
            self.rate_checks[device] = None
        return announced

    def listen(self, listener: Listener) -> None:
        """Send every message of every channel to ``listener(channel, message)``."""
        for channel in self.channels.values():
            channel.listen(listener)

    # -- time ---------------------------------------------------------------------------------
    def t_min(self, step: int) -> float:
        """Simulated minute of watchdog step ``step``."""
        return step * self.config.control_period_min / self.config.watchdog_steps

    def _wall_s(self) -> float:
        return time.monotonic() - self._t0_wall

    def _pump_thread(self) -> PumpWorker:
        if self._io is None:
            self._io = PumpWorker()
        return self._io

    # -- alarms -------------------------------------------------------------------------------
    def _raise(self, t_min: float, source: str, condition: str, *, in_pump_thread: bool) -> None:
        """Raise ``source``'s alarm (control stops at once) and get the safe state written.

        In the pump thread the safe state is written here; from the watchdog it is handed to
        the pump thread (the alarm is sent from there, with what the write did, unless a pump
        transaction is still in flight: then it is sent at once, saying the write is queued).
        """
        with self._lock:
            state = self.alarms[source]
            check = self.rate_checks[source]
            if check is not None and not state.latched:
                check.reset()  # judge the device's clock again on data after the outage
            if state.active:
                return
            state.active, state.since_wall_s = True, self._wall_s()
            since = state.since_wall_s
        if in_pump_thread:
            self._send_alarm(Alarm(t_min, source, condition, True, self._safe_state(), since))
            return
        io = self._pump_thread()
        if io.idle:
            io.submit(
                lambda: self._send_alarm(
                    Alarm(t_min, source, condition, True, self._safe_state(), since)
                )
            )
            return
        busy = io.busy_s()
        self._send_alarm(
            Alarm(
                t_min,
                source,
                condition,
                True,
                f"control stopped; safe state queued behind a pump exchange unanswered for "
                f"{busy * 1000:.0f} ms",
                since,
            )
        )
        io.submit(self._safe_state)

    def _mismatch(self, t_min: float, source: str, message: str, *, in_pump_thread: bool) -> None:
        """A device on another time scale: a latched alarm whose action carries the hint."""
        condition = f"{TIME_SCALE_CONDITION}: {message}"
        with self._lock:
            state = self.alarms[source]
            already, state.latched = state.active, True
        if not already:
            self._raise(t_min, source, condition, in_pump_thread=in_pump_thread)
        else:
            stopped = "control stays stopped until the session ends"
            self._send_alarm(Alarm(t_min, source, condition, True, stopped, self._wall_s()))

    def _send_alarm(self, alarm: Alarm) -> None:
        with self._lock:
            self.channels["rig->alarms"].send(alarm)

    def _clear_verified(self, t_min: float) -> None:
        """Clear each alarm whose outage has fresh data after it (in the pump thread).

        Called after a successful pump exchange: an alarm clears when a CGM reading received
        after its start, and a pump exchange *asked* after its start, both exist.
        """
        with self._lock:
            due = [
                (source, state.since_wall_s)
                for source, state in self.alarms.items()
                if state.active
                and not state.latched
                and self._last_valid_wall > state.since_wall_s
                and self._last_pump_ok_wall > state.since_wall_s
            ]
        for source, _since in due:
            action = self._safe_state()  # start again from the safe state, then resume
            with self._lock:
                self.alarms[source].active = False
                still = [s for s, st in self.alarms.items() if st.active]
                verdict = (
                    "control resumed"
                    if not still
                    else f"control stays stopped ({', '.join(still)} alarm active)"
                )
                condition = "fresh data" if source == "cgm" else "communication restored"
                self.channels["rig->alarms"].send(
                    Alarm(
                        t_min,
                        source,
                        condition,
                        False,
                        f"{action}; fresh CGM reading and pump exchange verified; {verdict}",
                        self._wall_s(),
                    )
                )

    def _safe_state(self) -> str:
        try:
            results = self.pump.apply_safe_state()
        except Exception as exc:  # the pump cannot be reached: its temp basal runs out alone
            minutes = self.config.temp_duration_periods * self.config.control_period_min
            return (
                f"safe state not written ({_unreachable(exc)}); the pump's temp basal "
                f"expires within {minutes} min"
            )
        with self._lock:
            for name, result in results:
                self.safe_state_writes.append((self._wall_s(), name, result))
        return "safe state written: " + ", ".join(
            f"{name}={'ok' if r is None else f'exception {r}'}" for name, r in results
        )

    # -- one watchdog step ----------------------------------------------------------------------
    def step(self, k: int) -> None:
        """Watchdog step ``k``: never waits on the pump.

        Every ``watchdog_steps``-th step also hands a control tick to the pump thread.
        """
        cfg = self.config
        t_min = self.t_min(k)
        io = self._pump_thread()
        with self._lock:
            self._sense(t_min)
            stale_s = cfg.cgm_stale_min * cfg.wall_s_per_sim_min
            last = self._last_valid_wall if not math.isnan(self._last_valid_wall) else 0.0
            now = self._wall_s()
            cgm_lost = not self.cgm.connected
            cgm_stale = now - last > stale_s
            if self.alarms["cgm"].active and now - self._last_cgm_reopen_wall > stale_s:
                self._reopen_cgm(now)
        if cgm_lost:
            self._raise(t_min, "cgm", "communication lost", in_pump_thread=False)
        elif cgm_stale:
            self._raise(t_min, "cgm", "stale data", in_pump_thread=False)
        busy_s = io.busy_s()
        if busy_s > cfg.deadline_s:
            self._raise(t_min, "pump", "communication lost", in_pump_thread=False)
        control = k % cfg.watchdog_steps == 0 or self._control_due
        if io.idle:
            self._control_due = False
            io.submit(lambda: self._exchange(t_min, control))
        else:  # the previous exchange is still in flight: a control tick waits for the next step
            self._control_due = control
            with self._lock:
                self.exchanges_skipped += 1

    def _reopen_cgm(self, now: float) -> None:
        """During a CGM outage: reopen its port (a device restarted behind the same path)."""
        reopen = getattr(self.cgm, "reopen", None)
        self._last_cgm_reopen_wall = now
        if reopen is not None:
            reopen()
            self.cgm_reopens += 1

    def _exchange(self, t_min: float, control: bool) -> None:
        """In the pump thread: the heartbeat (and at a control tick the totals and commands)."""
        names = [self.regs["heartbeat"], self.regs["alarm_code"]]
        if control:
            names += [self.regs["delivered_total_u"], self.regs["bolus_remaining_u"]]
        asked_wall = self._wall_s()  # an answer is only as fresh as its request
        try:
            status = self.pump.read_many(names)
        except Exception:  # lost communication (after the transport's own retries)
            self._raise(t_min, "pump", "communication lost", in_pump_thread=True)
            return
        with self._lock:
            self._last_pump_ok_wall = asked_wall
            check = self.rate_checks["pump"]
            heartbeat = status.get(self.regs["heartbeat"])
            wrong = None
            if check is not None and isinstance(heartbeat, int | float):
                wrong = check.observe(asked_wall, int(heartbeat))
        if wrong is not None:
            self._mismatch(t_min, "pump", wrong, in_pump_thread=True)
        self._clear_verified(t_min)
        if control:
            with self._lock:
                self._account(t_min, status)
                out = self._control(t_min)
            if out is not None:
                self._send_command(t_min, out)

    def _sense(self, t_min: float) -> None:
        try:
            frames = self.cgm.poll()
        except Exception:  # a transport that raises counts as no data
            frames = []
        self._check_cgm_rate(t_min, frames)
        for frame in frames:
            glucose = getattr(frame, "glucose_mg_dl", None)
            if glucose is None or int(getattr(frame, "status", 0)) != 0:
                continue
            reading = CgmReading(t_min, float(glucose))
            sent = self.channels["sensor->controller"].send(reading)
            if isinstance(sent, CgmReading):
                self._new_readings.append(sent)
                self._last_reading = sent
                self._last_valid_wall = self._wall_s()

    def _check_cgm_rate(self, t_min: float, frames: list[Any]) -> None:
        """Feed the CGM's clock (the newest frame's ``t_min`` of a poll) to its rate check.

        Only the newest frame of each poll counts: frames a device queued before the rig
        opened its port arrive together, and only their last one is as fresh as its arrival.
        """
        check = self.rate_checks["cgm"]
        stamps = [s for s in (getattr(f, "t_min", None) for f in frames) if isinstance(s, int)]
        if check is None or not stamps:
            return
        wrong = check.observe(self._wall_s(), stamps[-1])
        if wrong is not None:
            self._mismatch(t_min, "cgm", wrong, in_pump_thread=False)

    def _account(self, t_min: float, status: dict[str, Any]) -> None:
        """Deliveries since the last control tick, from the pump's totals."""
        total = float(status[self.regs["delivered_total_u"]])
        remaining = float(status[self.regs["bolus_remaining_u"]])
        period = self.config.control_period_min
        if self._last_total_u is not None:
            delivered = max(0.0, total - self._last_total_u)
            bolus = max(0.0, self._last_bolus_remaining_u + self._bolus_sent_u - remaining)
            bolus = min(bolus, delivered)
            basal = delivered - bolus
            for m in range(period):  # the pump reports totals: spread them over the minutes
                d = InsulinDelivery(t_min - period + m, basal / period, bolus / period)
                sent = self.channels["actuator->plant"].send(d)
                if isinstance(sent, InsulinDelivery):
                    self._deliveries.append(sent)
                    self.iob.record(sent.total_u)
        self._last_total_u = total
        self._last_bolus_remaining_u = remaining
        self._bolus_sent_u = 0.0

    def _control(self, t_min: float) -> InsulinCommand | None:
        """The decision of a control tick (under the lock): the command to send, or None."""
        readings, self._new_readings = self._new_readings, []
        deliveries, self._deliveries = self._deliveries, []
        reading = self._last_reading
        glucose = reading.glucose_mg_dl if reading is not None else math.nan
        age = t_min - reading.t_min if reading is not None else math.inf
        if any(a.active for a in self.alarms.values()):
            self.supervisor.tick(t_min, None, readings, deliveries)  # keep it observing
            return None
        obs = ControllerInput(
            t_min, glucose, age, self.iob.net_iob_u, 0.0, self.iob.net_activity_u_per_min
        )
        command: InsulinCommand | None
        try:
            dose = self.controller.decide(obs)
            command = InsulinCommand(t_min, dose.basal_u_per_h, dose.bolus_u, dose.duration_min)
            sent = self.channels["controller->supervisor"].send(command)
            command = sent if isinstance(sent, InsulinCommand) else None
        except Exception:  # a failing controller: the supervisor's safe command goes out
            command = None
        approved, overrides = self.supervisor.tick(t_min, command, readings, deliveries)
        for o in overrides:
            self.channels["supervisor->overrides"].send(o)
        out = self.channels["supervisor->actuator"].send(approved)
        return out if isinstance(out, InsulinCommand) else None

    def _send_command(self, t_min: float, out: InsulinCommand) -> None:
        """In the pump thread: write the approved command (temp basal, its duration, bolus)."""
        duration = self.config.temp_duration_periods * self.config.control_period_min
        refused: list[str] = []
        try:
            for channel, value in (
                ("basal_u_per_h", out.basal_u_per_h),
                ("temp_basal_duration_min", duration),
            ):
                code = self.pump.write(self.regs[channel], value)
                if code is not None:
                    refused.append(f"{self.regs[channel]}: exception {code}")
            bolus_reg = self.regs["bolus_u"]
            if out.bolus_u > 0:
                code = self.pump.write(bolus_reg, out.bolus_u, retry=False)
                if code is None:
                    with self._lock:
                        self._bolus_sent_u = out.bolus_u
                else:
                    refused.append(f"{bolus_reg}: exception {code}")
        except Exception:  # lost on the way
            self._ack(out, "communication lost")
            self._raise(t_min, "pump", "communication lost", in_pump_thread=True)
            return
        self._ack(out, "; ".join(refused))

    def _ack(self, out: InsulinCommand, refused: str) -> None:
        """Record what became of ``out`` (``refused`` empty: delivered)."""
        ack = PumpAck(out.t_min, out.basal_u_per_h, out.bolus_u, not refused, refused)
        with self._lock:
            self.channels["pump->acks"].send(ack)

    # -- running ------------------------------------------------------------------------------
    def run(
        self,
        *,
        steps: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> PacingStats:
        """Run paced in a dedicated thread until ``steps`` (default: the configured minutes)."""
        cfg = self.config
        if steps is None and cfg.minutes is not None:
            steps = math.ceil(cfg.minutes / cfg.control_period_min) * cfg.watchdog_steps
        self._t0_wall = time.monotonic()
        self._last_valid_wall = math.nan
        io = self._pump_thread()

        def on_tick(k: int, late_ms: float, took_ms: float) -> None:
            overrun = took_ms > 1000.0 * cfg.step_s
            self.channels["clock->ticks"].send(TickTiming(self.t_min(k), late_ms, took_ms, overrun))
            if on_step is not None:
                on_step(k)

        runner = PacedThread(
            self.step,
            cfg.step_s,
            n_ticks=steps,
            name="hil-rig",
            on_tick=on_tick,
            realtime=cfg.realtime,
        )
        self._runner = runner
        try:
            runner.start()
            stats = runner.join()
        finally:
            runner.stop()
            # the exchange in flight ends within the transport's timeouts and retries
            io.close(PUMP_THREAD_JOIN_S)
            self._io = None
        #: Why real-time scheduling was refused (None: granted, or not asked).
        self.realtime_refused = runner.realtime_refused
        return stats

    def outages(self) -> list[dict[str, Any]]:
        """Each alarm's outage so far (see :func:`outages`)."""
        with self._lock:
            return outages(dataclasses.asdict(a) for a in self.alarm_log)

    def stop(self) -> None:
        """End a run started by :meth:`run` (from another thread)."""
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.stop()


def _unreachable(exc: BaseException) -> str:
    """Why a pump transaction failed, in words (never raw errno text)."""
    reason = getattr(exc, "reason", None)
    if reason is None and isinstance(exc, OSError) and not isinstance(exc, CommunicationError):
        reason = os_error_words(exc)
    return f"pump unreachable: {reason}" if reason else "pump unreachable"


def outages(alarms: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Outages from a session's alarms (raised, then cleared, per source), in order.

    Each: ``source``, ``condition``, ``start_t_min``, ``end_t_min`` (None: not over when the
    recording ends), ``start_wall_s``, ``end_wall_s``.
    """
    out: list[dict[str, Any]] = []
    open_: dict[str, dict[str, Any]] = {}
    for a in alarms:
        source = str(a["source"])
        if a["active"] and source not in open_:
            open_[source] = {
                "source": source,
                "condition": str(a["condition"]),
                "start_t_min": float(a["t_min"]),
                "end_t_min": None,
                "start_wall_s": float(a["wall_s"]),
                "end_wall_s": None,
            }
            out.append(open_[source])
        elif not a["active"] and source in open_:
            outage = open_.pop(source)
            outage["end_t_min"] = float(a["t_min"])
            outage["end_wall_s"] = float(a["wall_s"])
    return out


def pump_register_names(profile: Any) -> dict[str, str]:
    """Map each twinloop channel to its register name (the registers' ``channel`` fields)."""
    return {r.channel: r.name for r in profile.registers if getattr(r, "channel", None)}


def summarize_rig(rig: Rig, stats: PacingStats) -> dict[str, Any]:
    """Timing, alarms and CGM metrics of a session (what the recording's summary holds)."""
    alarms = rig.alarm_log
    readings = [m.glucose_mg_dl for m in rig.glucose_log]
    out: dict[str, Any] = {
        "timing": stats.summary(),
        "alarms": [dataclasses.asdict(a) for a in alarms],
        "outages": rig.outages(),
        "cgm_readings": len(readings),
        "exchanges_skipped": rig.exchanges_skipped,
        "cgm_reopens": rig.cgm_reopens,
    }
    if len(readings) >= 2:
        m = glucose_metrics(np.asarray(readings, dtype=np.float64)[None, :], sample_period_min=5)
        out["cgm"] = {
            "mean_mg_dl": float(np.asarray(m.mean_mg_dl)[0]),
            "time_in_range_70_180_pct": float(np.asarray(m.time_in_range_70_180_pct)[0]),
            "time_below_70_pct": float(np.asarray(m.time_below_70_pct)[0]),
        }
    return out
