"""The HIL rig: the insulin loop against a pump and a CGM reached through device profiles.

The plant is outside the program here (a real patient with real devices, or the emulated
devices of :mod:`twinloop.hw_bridge.emulators`); the rig runs the controller and the safety
supervisor on the wall clock and talks to the devices through :mod:`hw_bridge`:

* **sensor**: the CGM's line protocol, drained at every watchdog step; each valid frame becomes a
  :class:`~twinloop.agents.messages.CgmReading` on ``sensor->controller``;
* **actuator**: the pump's Modbus profile; each control tick writes the supervisor's temp basal
  (rate, then its duration) and a bolus through the profile (limits enforced before the wire),
  then reads back the delivered totals, sent as per-minute deliveries on ``actuator->plant``.

**Pacing.** One dedicated thread (:mod:`twinloop.hil.pacing`: sleep, then spin) runs
``watchdog_steps`` watchdog steps per control period; every ``watchdog_steps``-th step is also
a control tick. Each step's lateness and duration, and overruns, go to ``clock->ticks``.

**Watchdog and fail-safe.** At every step the rig checks that the CGM's port is up and its
newest valid reading younger than ``cgm_stale_min`` simulated minutes, and that the pump answers
(its heartbeat). On lost communication (detected at once) or stale data (once declared) it raises
an alarm (``rig->alarms``), writes the pump profile's declared safe state (cancel bolus,
scheduled basal — when the pump can still be reached) and stops sending the controller's
commands. Temp basals are always sent with a duration of ``temp_duration_periods`` control
periods, so a pump that can no longer be reached returns to its scheduled basal by itself within
that time: the safe state is reached within two control periods either way. When data and
communication return, the rig applies the safe state once more, clears the alarm and resumes
control.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

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
    "supervisor->overrides",
    "actuator->plant",
    "clock->ticks",
    "rig->alarms",
)

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


class Rig:
    """The insulin loop on hardware (or emulated devices), paced on the wall clock.

    Args:
        config: the session.
        pump: the pump (register names resolved through ``channels``).
        cgm: the CGM.
        pump_registers: twinloop channel → the pump profile's register name, for every name
            of :data:`PUMP_CHANNELS` (:func:`pump_register_names` builds it from a profile).
        controller: overrides the configured controller (e.g. a learned policy).

    """

    def __init__(
        self,
        config: RigConfig,
        *,
        pump: PumpPort,
        cgm: CgmPort,
        pump_registers: dict[str, str],
        controller: Controller | None = None,
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
        self._t0_wall = 0.0
        self._last_valid_wall = math.nan
        self._last_reading: CgmReading | None = None
        self._new_readings: list[CgmReading] = []
        self._deliveries: list[InsulinDelivery] = []
        self._last_total_u: float | None = None
        self._last_bolus_remaining_u = 0.0
        self._bolus_sent_u = 0.0
        self._last_heartbeat: int | None = None
        self.safe_state_writes: list[tuple[float, str, int | None]] = []
        #: Every alarm raised or cleared, and every CGM reading, in order.
        self.alarm_log: list[Alarm] = []
        self.glucose_log: list[CgmReading] = []
        self.channels["rig->alarms"].listen(lambda _, m: self.alarm_log.append(m))  # type: ignore[arg-type]
        self.channels["sensor->controller"].listen(
            lambda _, m: self.glucose_log.append(m)  # type: ignore[arg-type]
        )

    def listen(self, listener: Listener) -> None:
        """Send every message of every channel to ``listener(channel, message)``."""
        for channel in self.channels.values():
            channel.listen(listener)

    # -- time ---------------------------------------------------------------------------------
    def _t_min(self, step: int) -> float:
        return step * self.config.control_period_min / self.config.watchdog_steps

    def _wall_s(self) -> float:
        return time.monotonic() - self._t0_wall

    # -- alarms -------------------------------------------------------------------------------
    def _raise(self, t_min: float, source: str, condition: str) -> None:
        state = self.alarms[source]
        if state.active:
            return
        state.active, state.since_wall_s = True, self._wall_s()
        action = self._safe_state(t_min)
        self.channels["rig->alarms"].send(
            Alarm(t_min, source, condition, True, action, state.since_wall_s)
        )

    def _clear(self, t_min: float, source: str, condition: str) -> None:
        state = self.alarms[source]
        if not state.active:
            return
        action = self._safe_state(t_min)  # start again from the safe state, then resume
        state.active = False
        self.channels["rig->alarms"].send(
            Alarm(t_min, source, condition, False, f"{action}; control resumed", self._wall_s())
        )

    def _safe_state(self, t_min: float) -> str:
        try:
            results = self.pump.apply_safe_state()
        except Exception as exc:  # the pump cannot be reached: its temp basal runs out alone
            minutes = self.config.temp_duration_periods * self.config.control_period_min
            return (
                f"safe state not written ({type(exc).__name__}); the pump's temp basal "
                f"expires within {minutes} min"
            )
        for name, result in results:
            self.safe_state_writes.append((self._wall_s(), name, result))
        return "safe state written: " + ", ".join(
            f"{name}={'ok' if r is None else f'exception {r}'}" for name, r in results
        )

    # -- one watchdog step ----------------------------------------------------------------------
    def step(self, k: int) -> None:
        """Watchdog step ``k``; every ``watchdog_steps``-th is also a control tick."""
        cfg = self.config
        t_min = self._t_min(k)
        self._sense(t_min)
        stale_s = cfg.cgm_stale_min * cfg.wall_s_per_sim_min
        last = self._last_valid_wall if not math.isnan(self._last_valid_wall) else 0.0
        if not self.cgm.connected:
            self._raise(t_min, "cgm", "communication lost")
        elif self._wall_s() - last > stale_s:
            self._raise(t_min, "cgm", "stale data")
        elif self.alarms["cgm"].active and self._last_valid_wall > self.alarms["cgm"].since_wall_s:
            self._clear(t_min, "cgm", "fresh data")
        control = k % cfg.watchdog_steps == 0
        names = [self.regs["heartbeat"], self.regs["alarm_code"]]
        if control:
            names += [self.regs["delivered_total_u"], self.regs["bolus_remaining_u"]]
        try:
            status = self.pump.read_many(names)
        except Exception:  # lost communication (after the transport's own retries)
            self._raise(t_min, "pump", "communication lost")
            return
        self._clear(t_min, "pump", "communication restored")
        if control:
            self._account(t_min, status)
            self._control(t_min)

    def _sense(self, t_min: float) -> None:
        try:
            frames = self.cgm.poll()
        except Exception:  # a transport that raises counts as no data
            frames = []
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

    def _control(self, t_min: float) -> None:
        readings, self._new_readings = self._new_readings, []
        deliveries, self._deliveries = self._deliveries, []
        reading = self._last_reading
        glucose = reading.glucose_mg_dl if reading is not None else math.nan
        age = t_min - reading.t_min if reading is not None else math.inf
        if any(a.active for a in self.alarms.values()):
            self.supervisor.tick(t_min, None, readings, deliveries)  # keep it observing
            return
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
        if not isinstance(out, InsulinCommand):
            return
        duration = self.config.temp_duration_periods * self.config.control_period_min
        try:
            self.pump.write(self.regs["basal_u_per_h"], out.basal_u_per_h)
            self.pump.write(self.regs["temp_basal_duration_min"], duration)
            bolus_reg = self.regs["bolus_u"]
            if out.bolus_u > 0 and self.pump.write(bolus_reg, out.bolus_u, retry=False) is None:
                self._bolus_sent_u = out.bolus_u
        except Exception:  # lost on the way: the watchdog sees it at the next step
            self._raise(t_min, "pump", "communication lost")

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

        def on_tick(k: int, late_ms: float, took_ms: float) -> None:
            overrun = took_ms > 1000.0 * cfg.step_s
            self.channels["clock->ticks"].send(
                TickTiming(self._t_min(k), late_ms, took_ms, overrun)
            )
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
        runner.start()
        stats = runner.join()
        #: Why real-time scheduling was refused (None: granted, or not asked).
        self.realtime_refused = runner.realtime_refused
        return stats

    def stop(self) -> None:
        """End a run started by :meth:`run` (from another thread)."""
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.stop()


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
        "cgm_readings": len(readings),
    }
    if len(readings) >= 2:
        m = glucose_metrics(np.asarray(readings, dtype=np.float64)[None, :], sample_period_min=5)
        out["cgm"] = {
            "mean_mg_dl": float(np.asarray(m.mean_mg_dl)[0]),
            "time_in_range_70_180_pct": float(np.asarray(m.time_in_range_70_180_pct)[0]),
            "time_below_70_pct": float(np.asarray(m.time_below_70_pct)[0]),
        }
    return out
