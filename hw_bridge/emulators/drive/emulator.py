"""Emulated exoskeleton servo drive: a CiA 402 style register set on Modbus TCP, over a joint model.

:class:`DriveEmulator` is the drive's firmware: the CiA 402 (IEC 61800-7-201) power state
machine driven by the controlword, cyclic synchronous torque mode (CST, mode 10), a torque
limit, a communication watchdog, and a joint it applies torque to (any :class:`JointBackend`:
:class:`PendulumJoint` here, the knee plant through :class:`PlantJointAdapter`). The joint is
stepped at 1 kHz in the drive's own thread (:meth:`DriveEmulator.start_joint`, sleep-then-spin
pacing on the wall clock) or by hand (:meth:`DriveEmulator.step`, deterministic tests). The
register set is served over Modbus TCP by a pymodbus 3.16 server built on ``SimDevice`` whose
``action`` coroutine refreshes the registers on every read and applies every write
(:meth:`DriveEmulator.start_tcp`; port 0 picks a free port, reported in
:attr:`DriveServerThread.tcp_address`). :func:`~.process.run_drive` is the blocking command-line
entry.

The joint thread records every tick's lateness and duration (:attr:`DriveEmulator.timing`, a
:class:`LoopTiming`). :class:`DriveModbus` is the Modbus face alone; the same firmware can run
in a core process of its own behind it (:mod:`twinloop.hw_bridge.emulators.drive.process`, what
``twinloop emulate drive`` serves). :func:`knee_backend` with ``task=`` gives a knee whose
patient follows a rehabilitation task (:class:`TaskFollowingJoint`): the task row of
:func:`knee_task_row`, its clock restarted each time the drive enters Operation enabled (the
drive calls a backend's optional ``on_enable()``), so a rig that starts its task clock at the
same transition sees the patient follow its reference (``hw_bridge/DEVICES.md``, "The patient's
task").

The register map, the power state machine, the statusword, the error codes and the Modbus
exceptions are described in :mod:`twinloop.hw_bridge.emulators.drive.modbus`, the drive's
Modbus face (:class:`~twinloop.hw_bridge.emulators.drive.modbus.DriveModbus`, which
:class:`DriveEmulator` is).

Thread-safety: the joint thread, the server loop and callers share the state behind one lock;
every read fills its table from one consistent snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from array import array
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from pymodbus.constants import ExcCodes

from twinloop.hw_bridge.emulators.drive.modbus import (
    _POWERED,
    _TRANSITIONS,
    COUNTS_PER_REV,
    CST_MODE,
    ERROR_INTERNAL_SOFTWARE,
    ERROR_WATCHDOG,
    FAULT_REACTION_TICKS,
    FAULT_RESET_BIT,
    HALT_BIT,
    MAINTENANCE_ACTIVE,
    MAINTENANCE_KEYS,
    MAX_CATCH_UP_S,
    MAX_WATCHDOG_MS,
    PEAK_TORQUE_PERMILLE,
    SELF_TEST_TICKS,
    STATE_BITS,
    TARGET_WINDOW_PERMILLE,
    TIMING_WINDOW_TICKS,
    DriveModbus,
    DriveState,
    DriveStatus,
    Statusword,
    _clip,
    _signed16,
    _words32,
    _wrap,
    check_holding_write,
    decode_command,
)
from twinloop.hw_bridge.emulators.modbus_server import EmulatorError
from twinloop.hw_bridge.wire import WireFaults

__all__ = [
    "KNEE_ROM_RAD",
    "ROM_TAPER_RAD",
    "DriveEmulator",
    "JointBackend",
    "LoopTiming",
    "PendulumJoint",
    "PlantJointAdapter",
    "TaskFollowingJoint",
    "knee_backend",
    "knee_task_row",
]

_log = logging.getLogger(__name__)

#: Hard range of motion of the knee drive, rad of knee flexion: 5° of hyperextension to 130°
#: of flexion (the knee plant's soft limits are -5° and 140°).
KNEE_ROM_RAD = (math.radians(-5.0), math.radians(130.0))
#: Width of the zone inside a range-of-motion limit over which the drive tapers the torque
#: towards that limit from full to zero, rad (5°).
ROM_TAPER_RAD = math.radians(5.0)


def rom_factor(
    torque: float, angle_rad: float, rom_rad: tuple[float, float], taper_rad: float
) -> float:
    """The fraction (0-1) of ``torque`` the drive applies at ``angle_rad`` near its ROM limits.

    Torque towards the low limit (negative) falls linearly from 1 at ``low + taper_rad`` to 0
    at ``low`` and beyond; torque towards the high limit likewise; torque back into the range
    (or zero) is never reduced.
    """
    low, high = rom_rad
    if torque < 0.0:
        return min(1.0, max(0.0, (angle_rad - low) / taper_rad))
    if torque > 0.0:
        return min(1.0, max(0.0, (high - angle_rad) / taper_rad))
    return 1.0


# -- the joint ---------------------------------------------------------------------------------
@runtime_checkable
class JointBackend(Protocol):
    """A joint the drive applies torque to, stepped by the drive at its tick rate.

    ``angle_rad`` and ``velocity_rad_s`` are the joint's (the drive reads them through its
    encoder); ``torque_nm`` is the actuator torque measured after the last step (N·m). A
    backend may also have an ``on_enable()`` method: the drive calls it (under its lock) each
    time it enters Operation enabled (:class:`TaskFollowingJoint` restarts its task clock).
    """

    def step(self, torque_nm: float, dt_s: float) -> None:
        """Apply ``torque_nm`` (N·m, positive = increasing angle) for ``dt_s`` seconds."""
        ...

    @property
    def angle_rad(self) -> float:
        """Joint angle, rad."""
        ...

    @property
    def velocity_rad_s(self) -> float:
        """Joint angular velocity, rad/s."""
        ...

    @property
    def torque_nm(self) -> float:
        """Measured actuator torque, N·m."""
        ...


class PendulumJoint:
    """A rigid pendulum on a torque-driven joint: ``I·θ̈ = τ − m·g·l·sin θ − b·θ̇``.

    θ is measured from hanging straight down (θ = 0 at rest, positive in the direction of
    positive torque). The defaults are a lower leg (shank + foot) swinging about the knee of a
    seated adult: 4 kg, centre of mass 0.25 m below the joint, inertia about the joint
    0.33 kg·m² (m·l² + the segment's own ≈ 0.08 kg·m²), viscous damping 0.5 N·m·s/rad; the
    largest gravity torque m·g·l is 9.8 N·m. The actuator is an ideal torque source: the
    measured torque is the torque applied in the last step. Integration is semi-implicit
    (symplectic) Euler, stable at the drive's 1 ms step.

    Args:
        mass_kg: segment mass, kg (> 0).
        com_m: distance from the joint to the centre of mass, m (>= 0).
        inertia_kg_m2: moment of inertia about the joint, kg·m² (> 0, >= m·l²).
        damping_nm_s_rad: viscous damping b, N·m·s/rad (>= 0).
        gravity_m_s2: g, m/s².
        angle_rad: initial angle, rad.
        velocity_rad_s: initial angular velocity, rad/s.

    """

    def __init__(
        self,
        *,
        mass_kg: float = 4.0,
        com_m: float = 0.25,
        inertia_kg_m2: float = 0.33,
        damping_nm_s_rad: float = 0.5,
        gravity_m_s2: float = 9.81,
        angle_rad: float = 0.0,
        velocity_rad_s: float = 0.0,
    ) -> None:
        values = {
            "mass_kg": mass_kg,
            "com_m": com_m,
            "inertia_kg_m2": inertia_kg_m2,
            "damping_nm_s_rad": damping_nm_s_rad,
            "gravity_m_s2": gravity_m_s2,
            "angle_rad": angle_rad,
            "velocity_rad_s": velocity_rad_s,
        }
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}={value!r} is not allowed: a finite number")
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is not allowed: a finite number")
        if mass_kg <= 0 or com_m < 0 or damping_nm_s_rad < 0:
            raise ValueError("mass_kg must be > 0, com_m >= 0 and damping_nm_s_rad >= 0")
        if inertia_kg_m2 <= 0 or inertia_kg_m2 < mass_kg * com_m**2 * (1 - 1e-9):
            raise ValueError(
                f"inertia_kg_m2={inertia_kg_m2!r} is not allowed: > 0 and >= m·l² "
                f"({mass_kg * com_m**2:g} kg·m², the parallel-axis theorem)"
            )
        self.mass_kg = float(mass_kg)
        self.com_m = float(com_m)
        self.inertia_kg_m2 = float(inertia_kg_m2)
        self.damping_nm_s_rad = float(damping_nm_s_rad)
        self.gravity_m_s2 = float(gravity_m_s2)
        self._angle_rad = float(angle_rad)
        self._velocity_rad_s = float(velocity_rad_s)
        self._torque_nm = 0.0

    @property
    def gravity_torque_max_nm(self) -> float:
        """The largest gravity torque, m·g·l, N·m (at θ = ±π/2)."""
        return self.mass_kg * self.gravity_m_s2 * self.com_m

    def acceleration_rad_s2(self, torque_nm: float) -> float:
        """θ̈ for ``torque_nm`` at the present state, rad/s²."""
        gravity = self.gravity_torque_max_nm * math.sin(self._angle_rad)
        damping = self.damping_nm_s_rad * self._velocity_rad_s
        return (torque_nm - gravity - damping) / self.inertia_kg_m2

    def step(self, torque_nm: float, dt_s: float) -> None:
        """Apply ``torque_nm`` for ``dt_s`` seconds (semi-implicit Euler)."""
        if not (math.isfinite(torque_nm) and math.isfinite(dt_s) and dt_s > 0):
            raise ValueError(f"step({torque_nm!r}, {dt_s!r}): finite torque and dt_s > 0")
        self._velocity_rad_s += dt_s * self.acceleration_rad_s2(torque_nm)
        self._angle_rad += dt_s * self._velocity_rad_s
        self._torque_nm = float(torque_nm)

    @property
    def angle_rad(self) -> float:
        """Angle from hanging straight down, rad."""
        return self._angle_rad

    @property
    def velocity_rad_s(self) -> float:
        """Angular velocity, rad/s."""
        return self._velocity_rad_s

    @property
    def torque_nm(self) -> float:
        """Torque applied in the last step, N·m (an ideal actuator)."""
        return self._torque_nm


class PlantJointAdapter:
    """The adapter hook: any plant with ``step(torque, dt_s)`` and an angle and a velocity.

    The drive's torque goes to ``plant.step(torque_nm, dt_s)`` as the first positional
    argument (e.g. ``exo_torque_cmd_nm`` of ``twinloop.plant.knee.model.KneePlant``); what ``step``
    returns is ignored. The angle and the velocity are read from the attributes named ``angle_attr``
    and ``velocity_attr`` (rad, rad/s). The measured torque is the attribute ``torque_attr`` when
    given (N·m), else the torque applied in the last step (an ideal actuator).

    Args:
        plant: the plant object.
        angle_attr: its angle attribute, rad.
        velocity_attr: its velocity attribute, rad/s.
        torque_attr: its measured actuator torque attribute, N·m (``None``: ideal actuator).

    Raises:
        TypeError: the plant has no ``step`` or lacks one of the named attributes.

    """

    def __init__(
        self,
        plant: Any,
        *,
        angle_attr: str = "angle_rad",
        velocity_attr: str = "velocity_rad_s",
        torque_attr: str | None = None,
    ) -> None:
        if not callable(getattr(plant, "step", None)):
            raise TypeError(f"{type(plant).__name__} has no step(torque, dt_s) method")
        for attr in (angle_attr, velocity_attr, torque_attr):
            if attr is not None and not hasattr(plant, attr):
                raise TypeError(f"{type(plant).__name__} has no attribute {attr!r}")
        self.plant = plant
        self.angle_attr = angle_attr
        #: Hard range-of-motion limits the drive applies to this joint, rad (``None``: none).
        self.rom_rad: tuple[float, float] | None = None
        self.velocity_attr = velocity_attr
        self.torque_attr = torque_attr
        self._applied_nm = 0.0

    def step(self, torque_nm: float, dt_s: float) -> None:
        """``plant.step(torque_nm, dt_s)``."""
        self.plant.step(torque_nm, dt_s)
        self._applied_nm = float(torque_nm)

    @property
    def angle_rad(self) -> float:
        """The plant's angle, rad."""
        return float(getattr(self.plant, self.angle_attr))

    @property
    def velocity_rad_s(self) -> float:
        """The plant's angular velocity, rad/s."""
        return float(getattr(self.plant, self.velocity_attr))

    @property
    def torque_nm(self) -> float:
        """The plant's measured actuator torque, or the torque applied last, N·m."""
        if self.torque_attr is None:
            return self._applied_nm
        return float(getattr(self.plant, self.torque_attr))


def knee_task_row(task: str, seed: int) -> Any:
    """The task row the emulated patient follows: ``TASKS[task]().sample(default_rng(seed))``.

    ``task`` is a name of :data:`twinloop.plant.knee.tasks.TASKS` (``cyclic``, ``sit_to_stand``,
    ``hold``). A rig that gives its controller the reference of the same ``(task, seed)``
    (``twinloop.hil.knee.rig.task_row`` uses this very recipe) and starts its task clock when it
    enables the drive sees the patient follow the reference it tracks.

    Raises:
        EmulatorError: ``plant`` is not available.
        ValueError: an unknown task name (``twinloop.plant.errors.ConfigError``).

    """
    try:
        import numpy as np

        from twinloop.plant.knee.tasks import task_from_name  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise EmulatorError(f"the knee tasks are not available: {exc}") from None
    return task_from_name(task).sample(np.random.default_rng(seed))


class TaskFollowingJoint(PlantJointAdapter):
    """The knee plant whose patient follows a rehabilitation task on the drive's clock.

    The patient's intent (``KneePlant.set_reference``) is the task's reference
    (``twinloop.plant.knee.tasks.reference(task_row, t)``) at *task time* ``t``, evaluated at the
    start of every drive tick. The task clock stands at 0 (the patient holds the task's start
    posture) until the drive first enters Operation enabled, and restarts from 0 at every entry
    into Operation enabled (:meth:`on_enable`, called by :class:`DriveEmulator`): a rig that
    starts its own task clock when it enables the drive is then aligned with the patient to
    within a tick or two (a real patient would follow the reference shown on a screen).

    Args:
        plant: a ``twinloop.plant.knee.model.KneePlant``.
        task_row: the task row (:func:`knee_task_row`).

    Attributes:
        task_time_s: the patient's task time, s.
        enables: entries into Operation enabled seen.

    """

    def __init__(self, plant: Any, task_row: Any) -> None:
        super().__init__(plant, torque_attr="exo_torque_nm")
        from twinloop.plant.knee.tasks import reference  # type: ignore[import-not-found,unused-ignore]

        self._reference = reference
        self.task_row = task_row
        self.task_time_s = 0.0
        self.enables = 0
        self._running = False
        plant.set_reference(*reference(task_row, 0.0))

    def on_enable(self) -> None:
        """The drive entered Operation enabled: (re)start the task clock at 0."""
        self.task_time_s = 0.0
        self.enables += 1
        self._running = True

    def step(self, torque_nm: float, dt_s: float) -> None:
        """Set the patient's reference at the task time, step the plant, advance the clock."""
        if self._running:
            self.plant.set_reference(*self._reference(self.task_row, self.task_time_s))
            self.task_time_s += dt_s
        super().step(torque_nm, dt_s)


def knee_backend(
    preset: str = "moderate", *, seed: int = 0, task: str | None = None, **kwargs: Any
) -> PlantJointAdapter:
    """The knee plant as a joint: ``KneePlant(knee_preset(preset), rng, **kwargs)``.

    The adapter reads ``angle_rad`` (knee flexion, rad), ``velocity_rad_s`` and, as the
    measured torque, ``exo_torque_nm`` (the torque the exoskeleton drive applies to the joint
    after its own limit, rate limit and friction). Positive torque flexes the knee. Keyword
    arguments go to ``KneePlant`` (e.g. ``theta0_rad``).

    Without ``task`` the patient holds ``theta0_rad`` (90° by default). With ``task`` (a name
    of ``twinloop.plant.knee.tasks.TASKS``) the patient follows the task row :func:`knee_task_row`
    ``(task, seed)`` on the drive's clock (:class:`TaskFollowingJoint`), starting at the task's
    initial angle unless ``theta0_rad`` is given. ``seed`` also seeds the plant's generator.

    The plant's compiled kernels are loaded here (one throwaway step), not on the drive's
    first 1 ms tick.

    Raises:
        EmulatorError: ``twinloop.plant.knee.model`` is not available.

    """
    try:
        import numpy as np

        from twinloop.plant.knee.model import KneePlant, knee_preset  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise EmulatorError(f"the knee plant is not available: {exc}") from None
    params = knee_preset(preset)
    KneePlant(params).step(0.0, 0.001)  # warm-up: load the compiled kernel now
    if task is None:
        plant = KneePlant(params, np.random.default_rng(seed), **kwargs)
        adapter = PlantJointAdapter(plant, torque_attr="exo_torque_nm")
        adapter.rom_rad = KNEE_ROM_RAD
        return adapter
    from twinloop.plant.knee.tasks import reference  # type: ignore[import-not-found,unused-ignore]

    row = knee_task_row(task, seed)
    kwargs.setdefault("theta0_rad", float(reference(row, 0.0)[0]))
    plant = KneePlant(params, np.random.default_rng(seed), **kwargs)
    following = TaskFollowingJoint(plant, row)
    following.rom_rad = KNEE_ROM_RAD
    return following


class LoopTiming:
    """Lateness and duration of a paced loop's ticks (the drive's joint loop), in a ring.

    Tick ``k`` is due at the schedule's time; its *lateness* is its start minus that, its
    *duration* the time its work took. The newest ``capacity`` ticks are kept (preallocated
    ``array('d')``: recording costs two stores per tick and no allocation); :meth:`summary`
    gives percentiles over them and the maximum over every tick since :meth:`reset`.
    Written by one thread; read from any (a summary taken while the loop runs may miss the
    newest tick).

    Args:
        period_s: the loop's period, s.
        capacity: ticks kept for the percentiles (>= 1).

    """

    def __init__(self, period_s: float, capacity: int = TIMING_WINDOW_TICKS) -> None:
        _check_int("capacity", capacity, 1, 2**31 - 1)
        self.period_s = float(period_s)
        self.capacity = capacity
        self._late_s = array("d", bytes(8 * capacity))
        self._took_s = array("d", bytes(8 * capacity))
        self.ticks = 0
        self.max_lateness_s = 0.0
        self.max_duration_s = 0.0

    def record(self, late_s: float, took_s: float) -> None:
        """Record one tick's lateness and duration, s."""
        i = self.ticks % self.capacity
        self._late_s[i] = late_s
        self._took_s[i] = took_s
        self.ticks += 1
        if late_s > self.max_lateness_s:
            self.max_lateness_s = late_s
        if took_s > self.max_duration_s:
            self.max_duration_s = took_s

    def reset(self) -> None:
        """Forget every tick recorded so far (e.g. after a warm-up)."""
        self.ticks = 0
        self.max_lateness_s = 0.0
        self.max_duration_s = 0.0

    def summary(self) -> dict[str, Any]:
        """Ticks, and lateness/duration p50/p99/max in ms (percentiles over the kept ticks).

        ``late_by_more_than_period`` counts kept ticks later than one period; ``window`` is
        how many ticks the percentiles cover.
        """
        n = min(self.ticks, self.capacity)
        period_ms = 1000.0 * self.period_s
        if n == 0:
            return {"ticks": 0, "period_ms": period_ms}
        late = sorted(self._late_s[:n])
        took = sorted(self._took_s[:n])
        return {
            "ticks": self.ticks,
            "window": n,
            "period_ms": period_ms,
            "lateness_ms": {
                "p50": 1000.0 * _percentile(late, 50),
                "p99": 1000.0 * _percentile(late, 99),
                "p999": 1000.0 * _percentile(late, 99.9),
                "max": 1000.0 * self.max_lateness_s,
            },
            "duration_ms": {
                "p50": 1000.0 * _percentile(took, 50),
                "p99": 1000.0 * _percentile(took, 99),
                "max": 1000.0 * self.max_duration_s,
            },
            "late_by_more_than_period": sum(1 for x in late if x > self.period_s),
        }


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, linear interpolation (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# -- the drive -------------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    """The drive's state (guarded by ``DriveEmulator._lock``)."""

    state: DriveState = DriveState.NOT_READY_TO_SWITCH_ON
    controlword: int = 0
    mode: int = CST_MODE
    target_torque_permille: int = 0
    max_torque_permille: int = 1000
    watchdog_ms: int = 100
    error_code: int = 0
    tick: int = 0
    state_since_tick: int = 0
    last_feed_tick: int = 0
    maintenance: bool = False
    #: Maintenance keys written in sequence so far (0 or 1).
    unlock_step: int = 0


class DriveEmulator(DriveModbus):
    """An emulated servo drive (CiA 402 style, see the module docstring) on a joint.

    Args:
        backend: the joint (``PendulumJoint()`` if ``None``).
        rated_torque_nm: the motor's rated torque, N·m (> 0): 1000 ‰ of the torque registers.
        counts_per_rev: encoder resolution, counts per revolution (>= 4).
        device_id: Modbus device id, 1–247.
        watchdog_ms: communication watchdog at power-on, ms (0 disables it).
        max_torque_permille: 0x6072 at power-on, ‰ (0–2000).
        dt_s: the drive tick and joint step, s (1 ms = 1 kHz).
        spin_s: the joint thread sleeps until this long before a tick is due, then spins.
        faults: the wire-fault switches of its servers (a new :class:`WireFaults` if ``None``).
        rom_rad: hard range-of-motion limits ``(low, high)`` of the joint angle, rad: the drive
            tapers its torque towards a limit to zero (module ``drive.modbus``, "Range of
            motion"). ``None``: the backend's own ``rom_rad`` attribute if it has one (the knee
            of :func:`knee_backend`: :data:`KNEE_ROM_RAD`), else no limits (a free pendulum).
        rom_taper_rad: width of the taper zone inside each limit, rad (> 0).

    Raises:
        ValueError: an argument outside what is allowed (the message names it).

    """

    def __init__(
        self,
        backend: JointBackend | None = None,
        *,
        rated_torque_nm: float = 40.0,
        counts_per_rev: int = COUNTS_PER_REV,
        device_id: int = 1,
        watchdog_ms: int = 100,
        max_torque_permille: int = 1000,
        dt_s: float = 0.001,
        spin_s: float = 0.0003,
        faults: WireFaults | None = None,
        rom_rad: tuple[float, float] | None = None,
        rom_taper_rad: float = ROM_TAPER_RAD,
    ) -> None:
        _check_int("device_id", device_id, 1, 247)
        _check_int("counts_per_rev", counts_per_rev, 4, 2**32 - 1)
        _check_int("watchdog_ms", watchdog_ms, 0, MAX_WATCHDOG_MS)
        _check_int("max_torque_permille", max_torque_permille, 0, PEAK_TORQUE_PERMILLE)
        for name, value in (("rated_torque_nm", rated_torque_nm), ("dt_s", dt_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not allowed: a number > 0")
        if not 0 < rated_torque_nm * 1000 <= 2**32 - 1:
            raise ValueError(f"rated_torque_nm={rated_torque_nm!r} does not fit 0x6076 (mN·m)")
        if not (isinstance(spin_s, int | float) and 0 <= spin_s < 1):
            raise ValueError(f"spin_s={spin_s!r} is not allowed: seconds in [0, 1)")
        self.backend: JointBackend = backend if backend is not None else PendulumJoint()
        if not isinstance(self.backend, JointBackend):
            raise ValueError(f"backend={backend!r} is not a JointBackend")
        self.rated_torque_nm = float(rated_torque_nm)
        self.counts_per_rev = int(counts_per_rev)
        self.device_id = device_id
        self.dt_s = float(dt_s)
        self.spin_s = float(spin_s)
        self.faults = faults if faults is not None else WireFaults()
        rom = rom_rad if rom_rad is not None else getattr(self.backend, "rom_rad", None)
        if rom is not None and not (
            isinstance(rom, tuple)
            and len(rom) == 2
            and all(isinstance(x, int | float) and math.isfinite(x) for x in rom)
            and rom[0] < rom[1]
        ):
            raise ValueError(f"rom_rad={rom!r} is not allowed: (low, high) in rad, low < high")
        if not (
            isinstance(rom_taper_rad, int | float)
            and math.isfinite(rom_taper_rad)
            and rom_taper_rad > 0
        ):
            raise ValueError(f"rom_taper_rad={rom_taper_rad!r} is not allowed: rad > 0")
        #: Hard range-of-motion limits of the joint, rad (``None``: none).
        self.rom_rad: tuple[float, float] | None = (
            None if rom is None else (float(rom[0]), float(rom[1]))
        )
        self.rom_taper_rad = float(rom_taper_rad)
        self._lock = threading.Lock()
        self._state = _State(watchdog_ms=watchdog_ms, max_torque_permille=max_torque_permille)
        self._joint_thread: threading.Thread | None = None
        self._joint_stop = threading.Event()
        #: What the joint backend raised (the drive then faults with 0x6100), or ``None``.
        self.error: BaseException | None = None
        #: Times the joint thread fell more than ``MAX_CATCH_UP_S`` behind and resynchronised.
        self.resyncs = 0
        #: Lateness and duration of the joint thread's ticks (:meth:`start_joint`).
        self.timing: LoopTiming = LoopTiming(self.dt_s)

    # -- conversions -------------------------------------------------------------------------
    @property
    def counts_per_rad(self) -> float:
        """Encoder counts per radian."""
        return self.counts_per_rev / (2.0 * math.pi)

    def permille_to_nm(self, permille: float) -> float:
        """‰ of rated torque → N·m."""
        return permille * self.rated_torque_nm / 1000.0

    def nm_to_permille(self, torque_nm: float) -> int:
        """N·m → ‰ of rated torque (rounded, clipped to int16)."""
        return _clip(round(torque_nm * 1000.0 / self.rated_torque_nm), 16)

    # -- the firmware ------------------------------------------------------------------------
    def step(self) -> None:
        """Run one drive tick: self-test, watchdog, fault reaction, then step the joint."""
        with self._lock:
            s = self._state
            s.tick += 1
            since = s.tick - s.state_since_tick
            if s.state == DriveState.NOT_READY_TO_SWITCH_ON and since >= SELF_TEST_TICKS:
                self._enter(s, DriveState.SWITCH_ON_DISABLED)  # 1
            elif s.state == DriveState.FAULT_REACTION_ACTIVE and since >= FAULT_REACTION_TICKS:
                self._enter(s, DriveState.FAULT)  # 14
            elif (
                s.state == DriveState.OPERATION_ENABLED
                and s.watchdog_ms > 0
                and (s.tick - s.last_feed_tick) * self.dt_s * 1000.0 > s.watchdog_ms
            ):
                self._fault(s, ERROR_WATCHDOG)
            if self.error is not None:  # the backend failed: never stepped again, and the
                self._fault(s, ERROR_INTERNAL_SOFTWARE)  # drive faults again after a reset
                return
            torque_nm = self.permille_to_nm(self._output(s, self.backend.angle_rad)[0])
            try:
                self.backend.step(torque_nm, self.dt_s)
            except Exception as exc:  # the drive faults; the joint thread keeps the fault shown
                self.error = exc
                _log.exception("drive: the joint backend raised; fault 0x%04X", 0x6100)
                self._fault(s, ERROR_INTERNAL_SOFTWARE)

    def inject_fault(self, error_code: int) -> None:
        """Raise a device fault with ``error_code`` (0x603F, 1–0xFFFF): transition 13."""
        _check_int("error_code", error_code, 1, 0xFFFF)
        with self._lock:
            self._fault(self._state, error_code)

    def _fault(self, s: _State, code: int) -> None:
        if s.state in (DriveState.FAULT_REACTION_ACTIVE, DriveState.FAULT):
            return
        s.error_code = code
        self._enter(s, DriveState.FAULT_REACTION_ACTIVE)  # 13
        _log.warning("drive: fault 0x%04X", code)

    @staticmethod
    def _enter(s: _State, state: DriveState) -> None:
        s.state = state
        s.state_since_tick = s.tick
        if state == DriveState.OPERATION_ENABLED:
            s.last_feed_tick = s.tick

    @staticmethod
    def _demand(s: _State) -> int:
        """The torque applied now, ‰: the clamped target in Operation enabled, else 0."""
        if s.state != DriveState.OPERATION_ENABLED or s.controlword & HALT_BIT:
            return 0
        limit = s.max_torque_permille
        return max(-limit, min(limit, s.target_torque_permille))

    def _output(self, s: _State, angle_rad: float) -> tuple[int, bool]:
        """The torque applied now, ‰, after the ROM limits; and whether they reduced it."""
        demand = self._demand(s)
        if self.rom_rad is None or demand == 0:
            return demand, False
        applied = round(demand * rom_factor(demand, angle_rad, self.rom_rad, self.rom_taper_rad))
        return applied, applied != demand

    def _controlword(self, s: _State, word: int) -> None:
        previous = s.controlword
        s.controlword = word
        s.last_feed_tick = s.tick
        if s.state == DriveState.FAULT:
            if word & FAULT_RESET_BIT and not previous & FAULT_RESET_BIT:
                s.error_code = 0
                self._enter(s, DriveState.SWITCH_ON_DISABLED)  # 15
            return
        target = _TRANSITIONS.get((decode_command(word), s.state))
        if target is not None:
            entering = target == DriveState.OPERATION_ENABLED and s.state != target
            self._enter(s, target)
            if entering:
                hook = getattr(self.backend, "on_enable", None)
                if callable(hook):  # e.g. TaskFollowingJoint restarts its task clock
                    hook()

    # -- snapshots -----------------------------------------------------------------------------
    def status(self) -> DriveStatus:
        """A consistent snapshot of the drive."""
        with self._lock:
            return self._status(self._state)

    @property
    def state(self) -> DriveState:
        """The power state now."""
        with self._lock:
            return self._state.state

    def _status(self, s: _State) -> DriveStatus:
        joint = self.backend
        angle, velocity, torque = joint.angle_rad, joint.velocity_rad_s, joint.torque_nm
        demand, rom_limited = self._output(s, angle)
        actual = self.nm_to_permille(torque)
        word = STATE_BITS[s.state]
        if s.state in _POWERED:
            word |= Statusword.VOLTAGE_ENABLED
        if s.state != DriveState.NOT_READY_TO_SWITCH_ON:
            word |= Statusword.REMOTE
        enabled = s.state == DriveState.OPERATION_ENABLED
        if enabled:
            if abs(s.target_torque_permille) > s.max_torque_permille or rom_limited:
                word |= Statusword.INTERNAL_LIMIT_ACTIVE
            if abs(actual - demand) <= TARGET_WINDOW_PERMILLE:
                word |= Statusword.TARGET_REACHED
            if not s.controlword & HALT_BIT:
                word |= Statusword.FOLLOWS_COMMAND
            quiet_ms = (s.tick - s.last_feed_tick) * self.dt_s * 1000.0
            if s.watchdog_ms > 0 and quiet_ms > s.watchdog_ms / 2:
                word |= Statusword.WARNING
        elif s.state == DriveState.QUICK_STOP_ACTIVE and actual == 0:
            word |= Statusword.TARGET_REACHED
        return DriveStatus(
            state=s.state,
            statusword=int(word),
            controlword=s.controlword,
            mode_display=s.mode,
            target_torque_permille=s.target_torque_permille,
            max_torque_permille=s.max_torque_permille,
            torque_demand_permille=demand,
            torque_actual_permille=actual,
            position_counts=_wrap(round(angle * self.counts_per_rad), 32),
            velocity_counts_s=_clip(round(velocity * self.counts_per_rad), 32),
            error_code=s.error_code,
            heartbeat=s.tick % 65536,
            watchdog_ms=s.watchdog_ms,
            tick=s.tick,
            angle_rad=angle,
            velocity_rad_s=velocity,
            torque_nm=torque,
            maintenance=s.maintenance,
            rom_limited=rom_limited,
        )

    def _images(self) -> dict[str, list[int]]:
        st = self.status()
        holding = [
            st.controlword,
            st.mode_display & 0xFFFF,
            st.target_torque_permille & 0xFFFF,
            st.max_torque_permille,
            st.watchdog_ms,
            MAINTENANCE_ACTIVE if st.maintenance else 0,
        ]
        inputs = [
            st.statusword,
            st.mode_display & 0xFFFF,
            *_words32(st.position_counts),
            *_words32(st.velocity_counts_s),
            st.torque_actual_permille & 0xFFFF,
            st.torque_demand_permille & 0xFFFF,
            st.error_code,
            st.heartbeat,
            *_words32(round(self.rated_torque_nm * 1000.0)),
            *_words32(self.counts_per_rev),
        ]
        return {"h": holding, "i": inputs}

    def write_holding(self, address: int, words: Sequence[int]) -> ExcCodes | None:
        """Apply a write of holding registers (what a Modbus write does), atomically.

        Returns:
            ``None``, or the Modbus exception: 02 outside the map, 03 a refused value, 04 a
            write the drive's state forbids (maintenance, module ``drive.modbus``).

        """
        fields = check_holding_write(address, words)
        if isinstance(fields, ExcCodes):
            return fields
        with self._lock:
            s = self._state
            refused = self._refusal(s, fields)
            if refused is not None:
                s.unlock_step = 0
                _log.warning("drive: write of %s refused: %s", [n for n, _ in fields], refused)
                return ExcCodes.DEVICE_FAILURE
            unlocking = s.unlock_step
            s.unlock_step = 0  # any write but the first key breaks the sequence
            for name, word in fields:
                if name == "controlword":
                    self._controlword(s, word)
                elif name == "modes_of_operation":
                    s.mode = CST_MODE
                elif name == "target_torque":
                    s.target_torque_permille = _signed16(word)
                    s.last_feed_tick = s.tick
                elif name == "max_torque":
                    s.max_torque_permille = word
                elif name == "watchdog_ms":
                    s.watchdog_ms = word
                elif word == 0:
                    if s.maintenance:
                        _log.warning("drive: maintenance state left")
                    s.maintenance = False
                elif word == MAINTENANCE_KEYS[0]:
                    s.unlock_step = 1
                elif unlocking == 1:
                    s.maintenance = True
                    _log.warning("drive: maintenance state entered")
        return None

    @staticmethod
    def _refusal(s: _State, fields: list[tuple[str, int]]) -> str | None:
        """Why the drive's state forbids this write (maintenance rules), or ``None``."""
        for name, word in fields:
            if name in ("max_torque", "watchdog_ms") and not s.maintenance:
                return f"{name} is writable only in the maintenance state"
            powering = decode_command(word) != "disable_voltage"
            if name == "controlword" and s.maintenance and powering:
                return "the power stage stays off in the maintenance state"
            if name == "maintenance" and word in MAINTENANCE_KEYS:
                if s.state in _POWERED:
                    return "the maintenance state needs the power stage off"
                if len(fields) != 1:
                    return "a maintenance key is written alone"
                if word == MAINTENANCE_KEYS[1] and s.unlock_step != 1:
                    return "the second maintenance key without the first right before it"
        return None

    # -- threads -------------------------------------------------------------------------------
    def start_joint(self) -> None:
        """Step the drive every ``dt_s`` on the wall clock in a thread named ``drive-joint``.

        Pacing: sleep until ``spin_s`` before a tick is due, then spin on
        :func:`time.perf_counter`. A late tick runs at once (drive time keeps up with the wall
        clock); after more than ``MAX_CATCH_UP_S`` behind, the schedule restarts from now
        (:attr:`resyncs` counts it) instead of running a burst of catch-up ticks. Every tick's
        lateness (start − due) and duration go to :attr:`timing` (:class:`LoopTiming`).
        """
        if self._joint_thread is not None and self._joint_thread.is_alive():
            return
        self._joint_stop.clear()
        self._joint_thread = threading.Thread(target=self._run_joint, name="drive-joint")
        self._joint_thread.daemon = True
        self._joint_thread.start()

    def stop_joint(self, timeout_s: float = 5.0) -> None:
        """Stop the joint thread (idempotent)."""
        self._joint_stop.set()
        if self._joint_thread is not None:
            self._joint_thread.join(timeout_s)
            self._joint_thread = None

    def _run_joint(self) -> None:
        period, stop, clock = self.dt_s, self._joint_stop, time.perf_counter
        record = self.timing.record
        due = clock()
        while not stop.is_set():
            due += period
            wait = due - clock()
            if wait > self.spin_s and stop.wait(wait - self.spin_s):
                break
            while clock() < due:
                pass
            began = clock()
            late = began - due
            if late > MAX_CATCH_UP_S:
                due = began
                self.resyncs += 1
            self.step()
            record(late, clock() - began)


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field}={value!r} is not allowed: an int in {low}..{high}")
