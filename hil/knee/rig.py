"""The exoskeleton HIL rig: the knee loop against a servo drive reached through its device profile.

The knee and its patient are outside the program (a real exoskeleton on a real patient, or the
emulated drive of :mod:`twinloop.hw_bridge.emulators.drive.emulator` with the knee plant behind it);
the rig runs the task, the controller and the exoskeleton supervisor on the wall clock and talks to
the drive over Modbus (TCP on loopback for the emulator) through the profile
``hw_bridge/profiles/exo_drive_tcp.yaml``, registers resolved by their twinloop channel names
(:data:`DRIVE_CHANNELS`).

**Start-up** (:meth:`ExoRig.enable`, CiA 402): wait for the drive's self-test; from Fault, a
fault reset (controlword bit 7, 0 → 1); from any other powered state, disable voltage; then
mode 10 (cyclic synchronous torque); the drive's torque limit (``max_torque``) and
communication watchdog are *read and checked*, never written (they are maintenance settings
of the drive, writable only in its maintenance state, which the rig never enters): a limit
above ``max_torque_nm`` or a watchdog that is off or longer than ``watchdog_ms`` refuses the
start; then target torque 0, and *shutdown → switch on → enable operation*, each checked
against the statusword. Any step that fails applies the profile's
safe state and raises :class:`ExoRigError`.

**Task time** starts when the drive reports Operation enabled: task time ``t`` of tick ``k`` is
``k/control_hz`` plus the wall time from that moment to the first tick (a few ms). The emulated
drive restarts its patient's task clock at the same transition
(:class:`twinloop.hw_bridge.emulators.drive.emulator.TaskFollowingJoint`; start it with the same
``--task`` and ``--seed`` as the rig), so the emulated patient follows the reference the controller
tracks, as a real patient follows the one shown on a screen. Both sides draw the task row with
:func:`task_row` (``TASKS[task]().sample(np.random.default_rng(seed))``).

**One control tick** (:func:`twinloop.hil.pacing.pace` in a thread at ``control_hz``: sleep, then
spin the last ``spin_s``):

1. one read request for statusword, position, velocity, torque actual, torque demand, error
   code and heartbeat (input registers 0–9);
2. a *fresh* reading (the heartbeat moved since the previous tick) becomes an
   :class:`~twinloop.agents.knee.messages.ExoSensorReading` stamped with the tick's task time on
   ``sensor->controller``; a reading whose heartbeat did not move keeps its old stamp, so the
   supervisor's ``stale encoder`` rule zeroes the torque once it is older than
   ``encoder_stale_s``; a failed read leaves the newest reading where it was, likewise;
3. the task's reference (``task->controller``), the controller's torque
   (``controller->supervisor``), the supervisor's review (``supervisor->overrides``,
   ``supervisor->actuator``);
4. the approved torque is written as the target torque *through the profile*: a value beyond
   the profile's limit (±30 N·m) is refused before the wire (never reaches the drive; the
   refusal goes on ``actuator->refused`` and 0 N·m is written instead); what was written goes
   on ``actuator->drive``;
5. the tick's lateness and duration go on ``clock->ticks``.

**Alarms and the safe state.** A read or write that fails after the transport's retries
(communication lost), a drive fault (statusword bit 3 or a non-zero error code), a drive that
left Operation enabled, or encoder data older than ``alarm_stale_s`` raises an alarm
(``rig->alarms``), applies the profile's ``safe_state`` (target torque 0, disable voltage;
when the drive can still be reached) and ends the session: after an alarm the rig commands no
torque. A drive that can no longer be reached zeroes its torque by itself, through its
communication watchdog (``watchdog_ms``). A normal end (or :meth:`ExoRig.stop`) applies the
same safe state.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from numpy.typing import NDArray

from twinloop.agents.channels import Channel, Listener
from twinloop.agents.knee.messages import (
    ExoMessage,
    ExoOverride,
    ExoSensorReading,
    ExoTorqueCommand,
    TaskReference,
)
from twinloop.agents.knee.supervisor import ExoSupervisor, ExoSupervisorConfig
from twinloop.agents.messages import Record
from twinloop.hil.glucose.rig import RigConfigError
from twinloop.hil.pacing import PacedThread, PacingStats
from twinloop.hw_bridge.errors import WriteRefused
from twinloop.plant.knee.metrics import exo_metrics
from twinloop.plant.knee.model import PRESETS
from twinloop.plant.knee.tasks import (
    K_KIND,
    K_T,
    K_TOTAL,
    KIND_CYCLIC,
    TASKS,
    reference,
    task_from_name,
)
from twinloop.policies.knee.controllers import EXO_CONTROLLERS, ExoInput, make_exo_controller

#: Controllers the rig can run (``twinloop.policies.knee.controllers``).
EXO_RIG_CONTROLLERS: tuple[str, ...] = EXO_CONTROLLERS

EXO_RIG_CHANNELS = (
    "sensor->controller",
    "task->controller",
    "controller->supervisor",
    "supervisor->overrides",
    "supervisor->actuator",
    "actuator->refused",
    "actuator->drive",
    "drive->status",
    "clock->ticks",
    "rig->alarms",
)

#: The twinloop channels a drive profile must map (see ``hw_bridge/DEVICES.md``).
DRIVE_CHANNELS = (
    "drive_controlword",
    "drive_mode",
    "exo_torque_cmd_nm",
    "exo_max_torque_nm",
    "drive_watchdog_ms",
    "drive_statusword",
    "joint_angle_rad",
    "joint_velocity_rad_s",
    "exo_torque_nm",
    "exo_torque_demand_nm",
    "drive_error_code",
    "drive_heartbeat",
)
#: The highest drive torque limit (0x6072) the rig accepts by default, N·m: the emulated
#: drive's rated torque (the profile's ``max_torque_nm`` maximum).
DRIVE_MAX_TORQUE_NM = 40.0
#: What the rig reads at every tick (one request on the shipped profile).
TICK_READS = (
    "drive_statusword",
    "joint_angle_rad",
    "joint_velocity_rad_s",
    "exo_torque_nm",
    "exo_torque_demand_nm",
    "drive_error_code",
    "drive_heartbeat",
)

# CiA 402 (IEC 61800-7-201) controlword commands and statusword states (mask 0x006F).
CW_DISABLE_VOLTAGE = 0x0000
CW_SHUTDOWN = 0x0006
CW_SWITCH_ON = 0x0007
CW_ENABLE_OPERATION = 0x000F
CW_FAULT_RESET = 0x0080
STATE_MASK = 0x006F
SW_FAULT_BIT = 0x0008
STATES = {
    0x0000: "not ready to switch on",
    0x0040: "switch on disabled",
    0x0021: "ready to switch on",
    0x0023: "switched on",
    0x0027: "operation enabled",
    0x0007: "quick stop active",
    0x000F: "fault reaction active",
    0x0008: "fault",
}
ST_NOT_READY = 0x0000
ST_SWITCH_ON_DISABLED = 0x0040
ST_READY = 0x0021
ST_SWITCHED_ON = 0x0023
ST_OPERATION_ENABLED = 0x0027
ST_FAULT = 0x0008
#: Cyclic synchronous torque mode (0x6060).
CST_MODE = 10
#: Rule name of a command the profile refused (on ``actuator->refused``).
RULE_PROFILE_LIMIT = "profile limit"


def state_name(statusword: int) -> str:
    """The CiA 402 state a statusword shows (``0x....`` when it is no state)."""
    bits = int(statusword) & STATE_MASK
    if bits in STATES:
        return STATES[bits]
    # Switch on disabled and Not ready do not care about bit 5 (quick stop)
    return STATES.get(bits & 0x4F, f"statusword 0x{int(statusword):04X}")


def _state_bits(statusword: int) -> int:
    bits = int(statusword) & STATE_MASK
    return bits & 0x4F if bits & 0x4F in (ST_SWITCH_ON_DISABLED, ST_NOT_READY) else bits


# -- messages of the rig ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class DriveReport(ExoMessage):
    """What the drive reported at a tick besides the sensor values (drive → recorder).

    ``fresh``: the heartbeat moved since the previous tick (the drive is alive and the
    position is new).
    """

    statusword: int
    error_code: int
    heartbeat: int
    torque_demand_nm: float
    fresh: bool
    kind: ClassVar[str] = "drive_report"


@dataclasses.dataclass(frozen=True, slots=True)
class ExoTickTiming(ExoMessage):
    """Wall-clock timing of one rig tick: lateness against its schedule, duration, overrun."""

    lateness_ms: float
    duration_ms: float
    overrun: bool
    kind: ClassVar[str] = "exo_tick_timing"


@dataclasses.dataclass(frozen=True, slots=True)
class ExoAlarm(ExoMessage):
    """A rig alarm: its source (``drive``, ``encoder``), what was detected, what was done.

    ``wall_s``: seconds since the drive was enabled.
    """

    source: str
    condition: str
    active: bool
    action: str
    wall_s: float
    kind: ClassVar[str] = "exo_alarm"


# -- configuration ---------------------------------------------------------------------------
class ExoRigConfigError(RigConfigError):
    """An exoskeleton rig setting outside what is allowed (names the field and the value)."""


class ExoRigError(RuntimeError):
    """The drive could not be brought into Operation enabled (the message says where)."""


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_profile(name: str) -> Path:
    """A profile path from a YAML path or a shipped profile's name (``exo_drive_tcp``)."""
    from twinloop.hw_bridge.profile import shipped_profile

    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return shipped_profile(name)


@dataclasses.dataclass(frozen=True)
class ExoRigConfig:
    """An exoskeleton HIL session (validated once; errors name the field).

    Attributes:
        profile: the drive's profile: a YAML path or a shipped name (``exo_drive_tcp``).
        tcp: ``HOST:PORT`` of the drive, overriding the profile's (None: the profile's).
        controller: ``none`` (zero torque), ``impedance`` or ``aan`` (assist-as-needed).
        patient: the knee preset of the emulated patient (``healthy``, ``mild``,
            ``moderate``, ``severe``): recorded, and what an emulator started for the session
            runs; the rig's own decisions do not depend on it.
        task: ``cyclic``, ``sit_to_stand`` or ``hold`` (:data:`twinloop.plant.knee.tasks.TASKS`).
        seed: seed of the task row (:func:`task_row`); give the emulator the same.
        control_hz: control rate, Hz (10–500).
        seconds: session length, s (None: the task's duration).
        supervisor: the exoskeleton supervisor's limits.
        encoder_stale_s: age at which the supervisor counts a reading as stale and commands
            0 N·m (None: ``supervisor.encoder_stale_s``, 30 ms); replaces the supervisor's.
        alarm_stale_s: encoder data this old raises an alarm, applies the safe state and ends
            the session, s (>= ``encoder_stale_s``).
        watchdog_ms: the longest communication watchdog the drive may have, ms (10–1000, at
            least two control periods); a drive whose watchdog is off or longer is refused.
        max_torque_nm: the highest torque limit (0x6072) the drive may have, N·m (None:
            :data:`DRIVE_MAX_TORQUE_NM`); a drive with a higher limit is refused.
        startup_timeout_s: longest wait for each start-up state, s.
        spin_s: the pacer sleeps until this long before a tick is due, then spins (0–period).
            Shorter than :mod:`twinloop.hil.pacing`'s 2 ms default: on a machine with few cores a
            spinning rig takes the CPU from a drive emulator's 1 kHz thread
            (``benchmarks/exo_hil_timing.py`` measures both).
        realtime: run the pacing thread under ``SCHED_FIFO`` when the OS grants it.

    """

    profile: str = "exo_drive_tcp"
    tcp: str | None = None
    controller: str = "aan"
    patient: str = "moderate"
    task: str = "cyclic"
    seed: int = 0
    control_hz: int = 100
    seconds: float | None = None
    supervisor: ExoSupervisorConfig = dataclasses.field(default_factory=ExoSupervisorConfig)
    encoder_stale_s: float | None = None
    alarm_stale_s: float = 0.1
    watchdog_ms: int = 100
    max_torque_nm: float | None = None
    startup_timeout_s: float = 1.0
    spin_s: float = 0.0005
    realtime: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str | Path) or not str(self.profile):
            raise ExoRigConfigError("profile", self.profile, "a YAML path or a shipped name")
        try:
            path = resolve_profile(str(self.profile))
        except Exception as exc:  # ProfileError: an unknown shipped name
            raise ExoRigConfigError("profile", self.profile, str(exc)) from None
        if not path.is_file():
            raise ExoRigConfigError("profile", self.profile, "an existing YAML file")
        if self.tcp is not None:
            port = str(self.tcp).rpartition(":")[2]
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ExoRigConfigError("tcp", self.tcp, "HOST:PORT with a port in 1..65535")
        if self.controller not in EXO_RIG_CONTROLLERS:
            raise ExoRigConfigError(
                "controller", self.controller, f"one of {', '.join(EXO_RIG_CONTROLLERS)}"
            )
        if self.patient not in PRESETS:
            raise ExoRigConfigError("patient", self.patient, f"one of {', '.join(PRESETS)}")
        if self.task not in TASKS:
            raise ExoRigConfigError("task", self.task, f"one of {', '.join(TASKS)}")
        if not (_integer(self.seed) and self.seed >= 0):
            raise ExoRigConfigError("seed", self.seed, "an integer >= 0")
        if not (_integer(self.control_hz) and 10 <= self.control_hz <= 500):
            raise ExoRigConfigError("control_hz", self.control_hz, "an integer in 10..500")
        if self.seconds is not None and not (_real(self.seconds) and self.seconds > 0):
            raise ExoRigConfigError("seconds", self.seconds, "seconds > 0, or None")
        if not isinstance(self.supervisor, ExoSupervisorConfig):
            raise ExoRigConfigError("supervisor", self.supervisor, "an ExoSupervisorConfig")
        if self.encoder_stale_s is not None and not (
            _real(self.encoder_stale_s) and self.encoder_stale_s > 0
        ):
            raise ExoRigConfigError("encoder_stale_s", self.encoder_stale_s, "seconds > 0")
        if not (_real(self.alarm_stale_s) and self.alarm_stale_s >= self.stale_s):
            raise ExoRigConfigError(
                "alarm_stale_s", self.alarm_stale_s, f"seconds >= encoder_stale_s ({self.stale_s})"
            )
        if not (_integer(self.watchdog_ms) and 10 <= self.watchdog_ms <= 1000):
            raise ExoRigConfigError("watchdog_ms", self.watchdog_ms, "an integer in 10..1000 ms")
        if self.watchdog_ms < 2000.0 * self.period_s:
            raise ExoRigConfigError(
                "watchdog_ms",
                self.watchdog_ms,
                f">= two control periods ({2000.0 * self.period_s:g} ms)",
            )
        if self.max_torque_nm is not None and not (
            _real(self.max_torque_nm) and self.max_torque_nm >= 0
        ):
            raise ExoRigConfigError("max_torque_nm", self.max_torque_nm, "N·m >= 0, or None")
        if not (_real(self.startup_timeout_s) and self.startup_timeout_s > 0):
            raise ExoRigConfigError("startup_timeout_s", self.startup_timeout_s, "seconds > 0")
        if not (_real(self.spin_s) and 0 <= self.spin_s < self.period_s):
            raise ExoRigConfigError(
                "spin_s", self.spin_s, f"seconds in [0, the control period {self.period_s:g})"
            )

    @property
    def period_s(self) -> float:
        """The control period, s."""
        return 1.0 / self.control_hz

    @property
    def stale_s(self) -> float:
        """The encoder staleness the supervisor applies, s."""
        if self.encoder_stale_s is not None:
            return float(self.encoder_stale_s)
        return float(self.supervisor.encoder_stale_s)

    def supervisor_config(self) -> ExoSupervisorConfig:
        """The supervisor's limits with the rig's ``encoder_stale_s``."""
        return dataclasses.replace(self.supervisor, encoder_stale_s=self.stale_s)

    def record(self) -> dict[str, Any]:
        """The configuration as plain values (for the manifest)."""
        out = dataclasses.asdict(self)
        out["profile"] = str(self.profile)
        return out


def task_row(task: str, seed: int) -> NDArray[np.float64]:
    """The task row of ``(task, seed)``: ``TASKS[task]().sample(np.random.default_rng(seed))``.

    The emulated drive's patient draws the same
    (``twinloop.hw_bridge.emulators.drive.emulator.knee_task_row``).
    """
    return task_from_name(task).sample(np.random.default_rng(seed))


def task_period_s(row: NDArray[np.float64]) -> float:
    """The task's cycle period (cyclic) or duration (others), s: the assist-as-needed's phase."""
    return float(row[K_T] if int(row[K_KIND]) == KIND_CYCLIC else row[K_TOTAL])


# -- the drive port --------------------------------------------------------------------------
class DrivePort(Protocol):
    """What the rig needs of a drive (a :class:`twinloop.hw_bridge.modbus_client.ModbusDevice`)."""

    def read_many(self, names: list[str]) -> Mapping[str, Any]:
        """Read registers by name (engineering units)."""
        ...

    def write(self, name: str, value: float, *, retry: bool = True) -> int | None:
        """Write one register through the profile: None when accepted, else the exception code.

        Raises ``WriteRefused`` (before the wire) for a value beyond the profile's limits.
        """
        ...

    def apply_safe_state(self) -> list[tuple[str, int | None]]:
        """Write the profile's safe state."""
        ...


def drive_register_names(profile: Any) -> dict[str, str]:
    """Map each twinloop channel to its register name (the registers' ``channel`` fields)."""
    return {r.channel: r.name for r in profile.registers if getattr(r, "channel", None)}


def profile_torque_limit_nm(profile: Any) -> float:
    """The largest target-torque magnitude the profile lets through, N·m."""
    lo, hi = profile.channel("exo_torque_cmd_nm").limits()
    return float(min(abs(lo), abs(hi)))


@dataclasses.dataclass
class _Samples:
    """Per fresh tick: task time, measured angle/velocity/torque, reference (for the metrics)."""

    t_s: list[float] = dataclasses.field(default_factory=list)
    angle_rad: list[float] = dataclasses.field(default_factory=list)
    velocity_rad_s: list[float] = dataclasses.field(default_factory=list)
    torque_nm: list[float] = dataclasses.field(default_factory=list)
    reference_rad: list[float] = dataclasses.field(default_factory=list)


class ExoRig:
    """The knee-exoskeleton loop on a drive (real or emulated), paced on the wall clock.

    Args:
        config: the session.
        drive: the drive (register names resolved through ``registers``).
        registers: twinloop channel → the profile's register name, for every name of
            :data:`DRIVE_CHANNELS` (:func:`drive_register_names` builds it from a profile).
        torque_limit_nm: the profile's target-torque limit (:func:`profile_torque_limit_nm`);
            the controller's output limit and the metrics' torque limit.
        controller: overrides the configured controller (anything with ``torque(ExoInput)``).

    Attributes:
        enabled: the drive reached Operation enabled.
        startup: ``(step, controlword written or None, statusword read)`` of the start-up.
        alarm_log: every alarm raised, in order.
        safe_state_writes: ``(wall s since enable, register, None | exception code)``.
        ended_by: ``completed``, ``stopped`` or ``alarm: …`` once the session ended.

    """

    def __init__(
        self,
        config: ExoRigConfig,
        *,
        drive: DrivePort,
        registers: Mapping[str, str],
        torque_limit_nm: float,
        controller: Any | None = None,
    ) -> None:
        missing = [c for c in DRIVE_CHANNELS if c not in registers]
        if missing:
            raise ExoRigConfigError("drive profile", sorted(registers), f"channels {missing}")
        if not (_real(torque_limit_nm) and torque_limit_nm > 0):
            raise ExoRigConfigError("torque_limit_nm", torque_limit_nm, "N·m > 0")
        self.config = config
        self.drive = drive
        self.regs = dict(registers)
        self.torque_limit_nm = float(torque_limit_nm)
        self.task_row = task_row(config.task, config.seed)
        self.task_period_s = task_period_s(self.task_row)
        reference(self.task_row, 0.0)  # load the compiled reference now, not in the first tick
        limit = min(self.torque_limit_nm, config.supervisor.command_limit_nm)
        self.controller = controller or make_exo_controller(
            config.controller, period_s=self.task_period_s, torque_limit_nm=limit
        )
        self.supervisor = ExoSupervisor(config.supervisor_config())
        self.channels: dict[str, Channel[Any]] = {n: Channel(n) for n in EXO_RIG_CHANNELS}
        self._read_names = [self.regs[c] for c in TICK_READS]
        self.enabled = False
        self.startup: list[tuple[str, int | None, int]] = []
        #: The drive's maintenance settings as read at start-up (``max_torque_nm``,
        #: ``watchdog_ms``).
        self.drive_settings: dict[str, float] = {}
        self.alarm_log: list[ExoAlarm] = []
        self.safe_state_writes: list[tuple[float, str, int | None]] = []
        self.ended_by = ""
        self.refused_writes = 0
        self.samples = _Samples()
        self.written_nm: list[float] = []
        self.realtime_refused: str | None = None
        self._alarmed = False
        self._safe_applied = False
        self._runner: PacedThread | None = None
        self._t_enabled = math.nan
        self._offset_s = 0.0
        self._last_heartbeat: int | None = None
        self._fresh_t_s = 0.0
        self._reading: ExoSensorReading | None = None
        self.channels["rig->alarms"].listen(lambda _, m: self.alarm_log.append(m))  # type: ignore[arg-type]

    def listen(self, listener: Listener) -> None:
        """Send every message of every channel to ``listener(channel, message)``."""
        for channel in self.channels.values():
            channel.listen(listener)

    # -- time ---------------------------------------------------------------------------------
    def _wall_s(self) -> float:
        """Seconds since the drive was enabled (0 before)."""
        return 0.0 if math.isnan(self._t_enabled) else time.perf_counter() - self._t_enabled

    def t_s(self, k: int) -> float:
        """Task time of tick ``k``, s (aligned to the drive's enable, see the module doc)."""
        return k * self.config.period_s + self._offset_s

    # -- start-up ------------------------------------------------------------------------------
    def _statusword(self) -> int:
        return int(
            self.drive.read_many([self.regs["drive_statusword"]])[self.regs["drive_statusword"]]
        )

    def _command(self, step: str, word: int) -> int:
        code = self.drive.write(self.regs["drive_controlword"], word)
        if code is not None:
            raise ExoRigError(f"start-up: {step}: the drive answered Modbus exception {code}")
        status = self._statusword()
        self.startup.append((step, word, status))
        return status

    def _await(self, step: str, want: int, status: int) -> int:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while _state_bits(status) != want:
            if time.monotonic() > deadline:
                raise ExoRigError(
                    f"start-up: {step}: the drive shows {state_name(status)} (statusword "
                    f"0x{status:04X}), expected {STATES[want]} within "
                    f"{self.config.startup_timeout_s:g} s"
                )
            time.sleep(0.002)
            status = self._statusword()
        return status

    def _setup(self, name: str, value: float) -> None:
        code = self.drive.write(self.regs[name], value)
        if code is not None:
            raise ExoRigError(f"start-up: write {self.regs[name]}={value:g}: exception {code}")

    def _check_drive_settings(self) -> None:
        """Read the drive's torque limit and watchdog (maintenance settings) and check them."""
        cfg = self.config
        limit_name, watchdog_name = self.regs["exo_max_torque_nm"], self.regs["drive_watchdog_ms"]
        values = self.drive.read_many([limit_name, watchdog_name])
        limit_nm, watchdog_ms = float(values[limit_name]), float(values[watchdog_name])
        self.drive_settings = {"max_torque_nm": limit_nm, "watchdog_ms": watchdog_ms}
        most_nm = DRIVE_MAX_TORQUE_NM if cfg.max_torque_nm is None else cfg.max_torque_nm
        if not limit_nm <= most_nm + 1e-9:
            raise ExoRigError(
                f"start-up: the drive's torque limit {limit_nm:g} N·m is above {most_nm:g} N·m "
                "(max_torque_nm); it is set in the drive's maintenance state, not by the rig"
            )
        if not 0 < watchdog_ms <= cfg.watchdog_ms:
            raise ExoRigError(
                f"start-up: the drive's watchdog {watchdog_ms:g} ms is not in 1..{cfg.watchdog_ms} "
                "ms (watchdog_ms; 0 is off); it is set in the drive's maintenance state"
            )

    def enable(self) -> None:
        """Bring the drive into Operation enabled in CST mode (see the module docstring).

        Raises:
            ExoRigError: a state was not reached in time or a write was refused (the safe
                state is applied first).
            CommunicationError: the drive does not answer (likewise).

        """
        cfg = self.config
        try:
            status = self._statusword()
            self.startup.append(("power-on", None, status))
            deadline = time.monotonic() + cfg.startup_timeout_s
            while _state_bits(status) == ST_NOT_READY and time.monotonic() < deadline:
                time.sleep(0.002)  # the drive's self-test
                status = self._statusword()
            if status & SW_FAULT_BIT:
                status = self._await("fault", ST_FAULT, status)  # past Fault reaction active
                error = self.drive.read_many([self.regs["drive_error_code"]])
                self.startup.append(("fault found", None, status))
                self._command("clear controlword", CW_DISABLE_VOLTAGE)
                status = self._command(
                    f"fault reset (error 0x{int(next(iter(error.values()))):04X})",
                    CW_FAULT_RESET,
                )
            elif _state_bits(status) != ST_SWITCH_ON_DISABLED:
                status = self._command("disable voltage", CW_DISABLE_VOLTAGE)
            self._await("switch on disabled", ST_SWITCH_ON_DISABLED, status)
            self._setup("drive_mode", CST_MODE)
            self._check_drive_settings()
            self._setup("exo_torque_cmd_nm", 0.0)
            for step, word, want in (
                ("shutdown", CW_SHUTDOWN, ST_READY),
                ("switch on", CW_SWITCH_ON, ST_SWITCHED_ON),
                ("enable operation", CW_ENABLE_OPERATION, ST_OPERATION_ENABLED),
            ):
                self._await(step, want, self._command(step, word))
        except BaseException:
            self._apply_safe_state()
            raise
        self._t_enabled = time.perf_counter()
        self.enabled = True

    # -- alarms and the safe state -------------------------------------------------------------
    def _apply_safe_state(self) -> str:
        self._safe_applied = True
        try:
            results = self.drive.apply_safe_state()
        except Exception as exc:  # the drive cannot be reached: its watchdog zeroes the torque
            return (
                f"safe state not written ({type(exc).__name__}); the drive's "
                f"{self.config.watchdog_ms} ms watchdog zeroes its torque"
            )
        for name, result in results:
            self.safe_state_writes.append((self._wall_s(), name, result))
        return "safe state written: " + ", ".join(
            f"{name}={'ok' if r is None else f'exception {r}'}" for name, r in results
        )

    def _alarm(self, t_s: float, source: str, condition: str) -> None:
        """Raise an alarm, apply the safe state, end the session (once)."""
        if self._alarmed:
            return
        self._alarmed = True
        wall = self._wall_s()
        action = self._apply_safe_state() + "; session ended"
        self.ended_by = f"alarm: {source} {condition}"
        self.channels["rig->alarms"].send(ExoAlarm(t_s, source, condition, True, action, wall))
        if self._runner is not None:
            self._runner.stop()

    # -- one tick ------------------------------------------------------------------------------
    def step(self, k: int) -> None:
        """Control tick ``k`` (see the module docstring)."""
        if self._alarmed:
            return
        if k == 0:  # task time 0 is the enable; the first tick starts a few ms later
            self._offset_s = self._wall_s()
        cfg = self.config
        t = self.t_s(k)
        try:
            values = self.drive.read_many(self._read_names)
        except Exception as exc:  # lost communication (after the transport's own retries)
            self._alarm(t, "drive", f"communication lost ({type(exc).__name__})")
            return
        r = self.regs
        status = int(values[r["drive_statusword"]])
        error = int(values[r["drive_error_code"]])
        heartbeat = int(values[r["drive_heartbeat"]])
        fresh = heartbeat != self._last_heartbeat
        self._last_heartbeat = heartbeat
        self.channels["drive->status"].send(
            DriveReport(
                t, status, error, heartbeat, float(values[r["exo_torque_demand_nm"]]), fresh
            )
        )
        if status & SW_FAULT_BIT or error:
            self._alarm(t, "drive", f"fault 0x{error:04X} ({state_name(status)})")
            return
        if _state_bits(status) != ST_OPERATION_ENABLED:
            self._alarm(t, "drive", f"left operation enabled: {state_name(status)}")
            return
        if fresh:
            new = ExoSensorReading(
                t,
                float(values[r["joint_angle_rad"]]),
                float(values[r["joint_velocity_rad_s"]]),
                float(values[r["exo_torque_nm"]]),
                math.nan,
                math.nan,
            )
            sent = self.channels["sensor->controller"].send(new)
            if isinstance(sent, ExoSensorReading):
                self._reading = sent
                self._fresh_t_s = t
        if t - self._fresh_t_s > cfg.alarm_stale_s + 1e-9:  # not on a rounding of k·period
            self._alarm(t, "encoder", f"stale data ({t - self._fresh_t_s:.3f} s old)")
            return
        ref, ref_vel = reference(self.task_row, t)
        self.channels["task->controller"].send(TaskReference(t, float(ref), float(ref_vel)))
        reading = self._reading
        command: ExoTorqueCommand | None = None
        if reading is not None:
            obs = ExoInput(
                t,
                reading.angle_rad,
                reading.velocity_rad_s,
                float(ref),
                float(ref_vel),
                torque_sensor_nm=reading.torque_sensor_nm,
            )
            try:
                out = self.channels["controller->supervisor"].send(
                    ExoTorqueCommand(t, float(self.controller.torque(obs)))
                )
                command = out if isinstance(out, ExoTorqueCommand) else None
            except Exception:  # a failing controller: the supervisor's "no command" → 0 N·m
                command = None
            if fresh and reading.t_s == t:
                s = self.samples
                s.t_s.append(t)
                s.angle_rad.append(reading.angle_rad)
                s.velocity_rad_s.append(reading.velocity_rad_s)
                s.torque_nm.append(reading.torque_sensor_nm)
                s.reference_rad.append(float(ref))
        approved, overrides = self.supervisor.review(t, command, reading)
        for o in overrides:
            self.channels["supervisor->overrides"].send(o)
        out_cmd = self.channels["supervisor->actuator"].send(approved)
        torque = float(out_cmd.torque_nm) if isinstance(out_cmd, ExoTorqueCommand) else 0.0
        self._write_torque(t, torque)

    def _write_torque(self, t_s: float, torque_nm: float) -> None:
        name = self.regs["exo_torque_cmd_nm"]
        try:
            try:
                code = self.drive.write(name, torque_nm)
            except WriteRefused:  # beyond the profile's limit: nothing reached the wire
                self.refused_writes += 1
                self.channels["actuator->refused"].send(
                    ExoOverride(t_s, RULE_PROFILE_LIMIT, torque_nm, 0.0)
                )
                torque_nm = 0.0
                code = self.drive.write(name, torque_nm)
        except Exception as exc:  # lost on the way
            self._alarm(t_s, "drive", f"communication lost ({type(exc).__name__})")
            return
        if code is not None:
            self._alarm(t_s, "drive", f"target torque refused (Modbus exception {code})")
            return
        self.written_nm.append(torque_nm)
        self.channels["actuator->drive"].send(ExoTorqueCommand(t_s, torque_nm))

    # -- running ------------------------------------------------------------------------------
    def ticks(self) -> int:
        """Ticks of the session (``seconds``, or the task's duration)."""
        seconds = self.config.seconds
        if seconds is None:
            seconds = float(self.task_row[K_TOTAL])
        return max(1, round(seconds * self.config.control_hz))

    def run(
        self, *, ticks: int | None = None, on_tick: Callable[[int], None] | None = None
    ) -> PacingStats:
        """Enable the drive, run ``ticks`` paced ticks (default :meth:`ticks`), safe state.

        The session ends early on an alarm or :meth:`stop`. The safe state is applied at the
        end whatever happened (once, when an alarm already applied it).

        Raises:
            ExoRigError: the drive could not be enabled.
            CommunicationError: the drive does not answer at start-up.

        """
        cfg = self.config
        n = self.ticks() if ticks is None else ticks

        def tick_done(k: int, late_ms: float, took_ms: float) -> None:
            overrun = took_ms > 1000.0 * cfg.period_s
            self.channels["clock->ticks"].send(
                ExoTickTiming(self.t_s(k), late_ms, took_ms, overrun)
            )
            if on_tick is not None:
                on_tick(k)

        # Collect and freeze what exists now: the pacer's own collection at its start then has
        # nothing to walk, and the first tick follows the enable within the drive's watchdog.
        gc.collect()
        gc.freeze()
        self.enable()
        runner = PacedThread(
            self.step,
            cfg.period_s,
            n_ticks=n,
            name="exo-rig",
            on_tick=tick_done,
            realtime=cfg.realtime,
            spin_s=cfg.spin_s,
        )
        self._runner = runner
        stats: PacingStats | None = None
        try:
            runner.start()
            stats = runner.join()
        finally:
            runner.stop()
            if stats is None:  # interrupted (Ctrl-C): let the loop end before the safe state
                try:
                    stats = runner.join(1.0)
                except Exception:
                    stats = PacingStats(cfg.period_s)
            self.realtime_refused = runner.realtime_refused
            if not self._alarmed:
                self.ended_by = "completed" if stats.ticks >= n else "stopped"
                self._apply_safe_state()
        return stats

    def stop(self) -> None:
        """End a session started by :meth:`run` (from another thread); the safe state follows."""
        if self._runner is not None:
            self._runner.stop()


# -- summary -------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float]:
    a = np.abs(np.asarray(values, dtype=np.float64))
    if a.size == 0:
        return {}
    return {
        "mean_abs": float(a.mean()),
        "rms": float(np.sqrt(np.mean(a * a))),
        "p99_abs": float(np.percentile(a, 99)),
        "max_abs": float(a.max()),
    }


def summarize_exo_rig(rig: ExoRig, stats: PacingStats) -> dict[str, Any]:
    """Timing, drive start-up, alarms, overrides and exoskeleton metrics of a session.

    The metrics use the ticks with a fresh encoder reading (angle, velocity and the drive's
    torque actual against the reference at the same task time). The patient's muscle torque is
    not observable through the drive, so the exoskeleton's share of the joint work is not
    available (``exo_work_fraction`` is None); ``exo_work_j`` is the exoskeleton's positive
    work. Limit violations count samples outside the supervisor's range of motion and velocity
    limit and beyond the profile's torque limit.
    """
    cfg = rig.config
    sup = rig.supervisor.config
    timing = stats.summary()
    s = rig.samples
    out: dict[str, Any] = {
        "rig": "knee-exo",
        "ended_by": rig.ended_by,
        "timing": timing,
        "drive": {
            "enabled": rig.enabled,
            "startup": [
                {"step": step, "controlword": word, "statusword": sw, "state": state_name(sw)}
                for step, word, sw in rig.startup
            ],
            "safe_state_writes": [
                {"wall_s": w, "register": name, "result": res}
                for w, name, res in rig.safe_state_writes
            ],
        },
        "alarms": [dataclasses.asdict(a) for a in rig.alarm_log],
        "overrides": {rule: n for rule, n in rig.supervisor.interventions.items() if n},
        "refused_writes": rig.refused_writes,
        "fresh_readings": len(s.t_s),
        "task": {"name": cfg.task, "seed": cfg.seed, "row": [float(x) for x in rig.task_row]},
        "torque_limit_nm": rig.torque_limit_nm,
        "commanded_torque_nm": _stats(rig.written_nm),
        "measured_torque_nm": _stats(s.torque_nm),
    }
    if len(s.t_s) >= 2:
        m = exo_metrics(
            dt_s=cfg.period_s,
            angle_rad=s.angle_rad,
            reference_rad=s.reference_rad,
            velocity_rad_s=s.velocity_rad_s,
            exo_torque_nm=s.torque_nm,
            muscle_torque_nm=np.zeros(len(s.t_s)),
            rom_rad=(sup.rom_min_rad, sup.rom_max_rad),
            velocity_limit_rad_s=sup.velocity_limit_rad_s,
            torque_limit_nm=rig.torque_limit_nm,
        )
        out["exo"] = {
            "rms_error_deg": float(m.rms_error_deg),
            "max_error_deg": float(m.max_error_deg),
            "exo_work_j": float(m.exo_work_j),
            "exo_work_fraction": None,
            "rom_violations": int(m.rom_violations),
            "velocity_violations": int(m.velocity_violations),
            "torque_violations": int(m.torque_violations),
            "limit_violations": int(m.limit_violations),
            "duration_s": float(m.duration_s),
        }
    return out


# -- a whole session -----------------------------------------------------------------------------
@dataclasses.dataclass
class ExoSession:
    """What :func:`run_exo_session` returns."""

    rig: ExoRig
    stats: PacingStats
    summary: dict[str, Any]
    run_dir: Path | None


def run_exo_session(
    config: ExoRigConfig,
    *,
    out: str | Path | None = None,
    controller: Any | None = None,
    listener: Listener | None = None,
    on_tick: Callable[[int], None] | None = None,
    on_rig: Callable[[ExoRig], None] | None = None,
    flush_every_min: int | None = None,
) -> ExoSession:
    """Load the profile, connect, run the rig, record to ``out`` (when given), summarize.

    Args:
        config: the session.
        out: run directory (channels as Parquet, ``summary.json``, ``manifest.json``).
        controller: overrides the configured controller.
        listener: also receives every message ``(channel, message)``.
        on_tick: called after every tick with its index (from the rig's thread).
        on_rig: called with the rig before it runs (e.g. to keep a handle for :meth:`stop`).
        flush_every_min: minutes of session time between flushes of the recording (default
            :data:`~twinloop.agents.recording.DEFAULT_HIL_FLUSH_EVERY_MIN`).

    Raises:
        ProfileError: the profile does not load; CommunicationError: the drive does not
        answer; ExoRigError: it could not be enabled.

    """
    from twinloop.agents.recording import DEFAULT_HIL_FLUSH_EVERY_MIN, Recorder
    from twinloop.hw_bridge.modbus_client import ModbusDevice
    from twinloop.hw_bridge.profile import load_profile

    profile = load_profile(resolve_profile(str(config.profile)))
    if config.tcp is not None:
        profile = profile.with_overrides(tcp=config.tcp)
    registers = drive_register_names(profile)
    missing = [c for c in DRIVE_CHANNELS if c not in registers]
    if missing:  # before connecting: a pump's profile given by mistake
        raise ExoRigConfigError("profile", config.profile, f"a drive profile (lacks {missing})")
    record = {"exo_rig": config.record() | {"profile_source": str(profile.source)}}
    recorder = (
        Recorder(out, config=record, flush_every_min=DEFAULT_HIL_FLUSH_EVERY_MIN, background=True)
        if out is not None
        else None
    )
    with ModbusDevice(profile) as device:
        rig = ExoRig(
            config,
            drive=device,
            registers=registers,
            torque_limit_nm=profile_torque_limit_nm(profile),
            controller=controller,
        )
        if recorder is not None:
            rig.listen(recorder.listener("rig"))
        if listener is not None:
            rig.listen(listener)
        if on_rig is not None:
            on_rig(rig)
        stats: PacingStats | None = None
        summary: dict[str, Any] = {"complete": False}

        def ticked(k: int) -> None:
            if recorder is not None:  # flushed by session time (simulated = wall here)
                recorder.advance(rig.t_s(k) / 60.0)
            if on_tick is not None:
                on_tick(k)

        try:
            stats = rig.run(on_tick=ticked)
            summary = summarize_exo_rig(rig, stats)
        finally:
            if recorder is not None:
                record["exo_rig"]["transport"] = repr(device)
                recorder.finish(record, summary, complete=stats is not None)
    assert stats is not None
    return ExoSession(rig, stats, summary, recorder.run_dir if recorder is not None else None)


#: Record types the rig sends (for readers of its recordings).
RIG_MESSAGES: tuple[type[Record], ...] = (
    ExoSensorReading,
    TaskReference,
    ExoTorqueCommand,
    ExoOverride,
    DriveReport,
    ExoTickTiming,
    ExoAlarm,
)
