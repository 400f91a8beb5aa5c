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
:attr:`DriveServerThread.tcp_address`). :func:`run_drive` is the blocking command-line entry.

The joint thread records every tick's lateness and duration (:attr:`DriveEmulator.timing`, a
:class:`LoopTiming`). :class:`DriveModbus` is the Modbus face alone; the same firmware can run
in a core process of its own behind it (:mod:`twinloop.hw_bridge.emulators.drive.process`, what
``twinloop emulate drive`` serves). :func:`knee_backend` with ``task=`` gives a knee whose
patient follows a rehabilitation task (:class:`TaskFollowingJoint`): the task row of
:func:`knee_task_row`, its clock restarted each time the drive enters Operation enabled (the
drive calls a backend's optional ``on_enable()``), so a rig that starts its task clock at the
same transition sees the patient follow its reference (``hw_bridge/DEVICES.md``, "The patient's
task").

CiA 402 objects are reached through Modbus registers (there is no SDO/PDO layer); the object
index each register stands for is given. Register map (0-based protocol addresses; 32-bit values
big-endian, high word first):

==========================  =====  ======  ========  =========================================
holding register            addr   type    unit      CiA 402 object / meaning
==========================  =====  ======  ========  =========================================
controlword                 0      uint16  –         0x6040 (commands below)
modes_of_operation          1      int16   –         0x6060; only 10 (CST) is accepted
target_torque               2      int16   ‰ rated   0x6071; clamped to ±max_torque by the drive
max_torque                  3      uint16  ‰ rated   0x6072; 0–2000 (the motor's peak is 2×)
watchdog_ms                 4      uint16  ms        communication watchdog; 0 disables it
==========================  =====  ======  ========  =========================================

==========================  =====  ======  ========  =========================================
input register              addr   type    unit      CiA 402 object / meaning
==========================  =====  ======  ========  =========================================
statusword                  0      uint16  –         0x6041 (bits below)
modes_of_operation_display  1      int16   –         0x6061
position_actual             2–3    int32   counts    0x6064; wraps like a multi-turn counter
velocity_actual             4–5    int32   counts/s  0x606C
torque_actual               6      int16   ‰ rated   0x6077 (the joint's measured torque)
torque_demand               7      int16   ‰ rated   0x6074 (applied; 0 unless enabled)
error_code                  8      uint16  –         0x603F (0 none; codes below)
heartbeat                   9      uint16  –         +1 per 1 ms drive tick (mod 65536)
rated_torque                10–11  uint32  mN·m      0x6076
encoder_counts_per_rev      12–13  uint32  counts    0x608F (position encoder resolution)
==========================  =====  ======  ========  =========================================

"‰ rated" is per mille of the rated torque (``rated_torque_nm``, 40 N·m by default), as the
standard has it; the shipped profile ``exo_drive_tcp.yaml`` scales it to N·m.

Controlword (bits 0 switch on, 1 enable voltage, 2 quick stop (active low), 3 enable operation,
7 fault reset, 8 halt) decoded in this order: bit 1 = 0 → *disable voltage*; else bit 2 = 0 →
*quick stop*; else bit 0 = 0 → *shutdown*; else bit 3 = 0 → *switch on* (from Operation enabled:
*disable operation*); else *enable operation*. Bit 7 is only looked at in Fault, where its
0 → 1 edge (against the previous controlword written) is *fault reset*.

Power state machine (transition numbers of IEC 61800-7-201):

==========================  ====================  ========================  ===========
from                        command               to                        transition
==========================  ====================  ========================  ===========
Not ready to switch on      (self-test, 5 ticks)  Switch on disabled        1
Switch on disabled          shutdown              Ready to switch on        2
Ready to switch on          switch on             Switched on               3
Ready to switch on          enable operation      Operation enabled         3 + 4
Switched on                 enable operation      Operation enabled         4
Operation enabled           disable operation     Switched on               5
Switched on                 shutdown              Ready to switch on        6
Ready to switch on          disable voltage/QS    Switch on disabled        7
Operation enabled           shutdown              Ready to switch on        8
Operation enabled           disable voltage       Switch on disabled        9
Switched on                 disable voltage/QS    Switch on disabled        10
Operation enabled           quick stop            Quick stop active         11
Quick stop active           disable voltage       Switch on disabled        12
any but Fault               a fault               Fault reaction active     13
Fault reaction active       (1 tick)              Fault                     14
Fault                       fault reset (edge)    Switch on disabled        15
Quick stop active           enable operation      Operation enabled         16
==========================  ====================  ========================  ===========

Any other command leaves the state as it is. Quick stop behaves as quick stop option code
5–8 (0x605A): the drive stays in Quick stop active until disable voltage or enable operation;
in torque mode its stop is immediate (zero torque, no ramp).

Torque: only in **Operation enabled** (and without halt, bit 8) does the drive apply
``torque_demand = clamp(target_torque, ±max_torque)``; in every other state it applies zero.
While the target torque exceeds ``max_torque`` in Operation enabled the statusword shows
*internal limit active* (bit 11).

Statusword: the state bits of IEC 61800-7-201 (0 ready to switch on, 1 switched on,
2 operation enabled, 3 fault, 5 quick stop, 6 switch on disabled; bit 5 is 1 in Ready to switch
on, Switched on and Operation enabled, 0 in Quick stop active, and left 0 in the states whose
pattern does not care: Not ready, Switch on disabled, Fault reaction active, Fault), plus:
4 voltage enabled (the power stage is energised: Ready to switch on, Switched on, Operation
enabled, Quick stop active); 7 warning (Operation enabled and more than half of the watchdog
time has passed since the last controlword/target-torque write); 9 remote (always, once past
Not ready to switch on); 10 target reached (CST: Operation enabled and the actual torque within
10 ‰ of the demand; Quick stop active once the actual torque is 0); 11 internal limit active;
12 drive follows the command value (CST: Operation enabled, no halt). State values with the
mask 0x006F: Not ready 0x0000, Switch on disabled 0x0040, Ready 0x0021, Switched on 0x0023,
Operation enabled 0x0027, Quick stop active 0x0007, Fault reaction active 0x000F, Fault 0x0008.

Error codes (0x603F, cleared by fault reset): 0x8130 communication watchdog (CiA 301 "life
guard / heartbeat error"): no write of the controlword or the target torque for more than
``watchdog_ms`` while in Operation enabled; 0x6100 internal software (the joint backend raised);
any code given to :meth:`DriveEmulator.inject_fault`.

Modbus exceptions: 01 a function other than 3, 4, 6, 16; 02 an address outside the map, a write
to the input table, or a write that starts or ends inside a 32-bit value; 03 a quantity out of
range, a mode other than 10 (the mode and its display stay unchanged, no fault), a
``max_torque`` above 2000 ‰. Unit ids: ``device_id`` and 0/255 are answered; others get 0x0B.
A multi-register write is checked as a whole and applied atomically in address order.

Thread-safety: the joint thread, the server loop and callers share the state behind one lock;
every read fills its table from one consistent snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusBaseServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from twinloop.hw_bridge.emulators.pump import EmulatorError, ServerThread, server_address
from twinloop.hw_bridge.wire import WireFaults, WireHooks, refuse

__all__ = [
    "CST_MODE",
    "Command",
    "DriveEmulator",
    "DriveServerThread",
    "DriveState",
    "DriveStatus",
    "JointBackend",
    "LoopTiming",
    "PendulumJoint",
    "PlantJointAdapter",
    "Statusword",
    "TaskFollowingJoint",
    "knee_backend",
    "knee_task_row",
    "run_drive",
]

_log = logging.getLogger(__name__)

# -- the register map ---------------------------------------------------------------------
HR_CONTROLWORD = 0
HR_MODES_OF_OPERATION = 1
HR_TARGET_TORQUE = 2
HR_MAX_TORQUE = 3
HR_WATCHDOG_MS = 4
HR_COUNT = 5

IR_STATUSWORD = 0
IR_MODES_DISPLAY = 1
IR_POSITION_ACTUAL = 2
IR_VELOCITY_ACTUAL = 4
IR_TORQUE_ACTUAL = 6
IR_TORQUE_DEMAND = 7
IR_ERROR_CODE = 8
IR_HEARTBEAT = 9
IR_RATED_TORQUE = 10
IR_COUNTS_PER_REV = 12
IR_COUNT = 14

#: Holding-register fields: address → name (all one word).
_HR_FIELDS: dict[int, str] = {
    HR_CONTROLWORD: "controlword",
    HR_MODES_OF_OPERATION: "modes_of_operation",
    HR_TARGET_TORQUE: "target_torque",
    HR_MAX_TORQUE: "max_torque",
    HR_WATCHDOG_MS: "watchdog_ms",
}
#: Function codes the drive implements, with their table and largest quantity.
_FUNCTIONS: dict[int, tuple[str, int]] = {
    3: ("h", 125),
    4: ("i", 125),
    6: ("h", 1),
    16: ("h", 123),
}
_TABLE_SIZE = {"h": HR_COUNT, "i": IR_COUNT}
#: Unit ids a Modbus TCP drive answers besides its own device id.
TCP_ANY_UNIT_IDS = (0, 255)

# -- behaviour ------------------------------------------------------------------------------
#: Cyclic synchronous torque mode (0x6060 value); the only mode this drive has.
CST_MODE = 10
#: Highest ``max_torque`` the drive accepts, ‰ of rated torque (the motor's peak torque).
PEAK_TORQUE_PERMILLE = 2000
#: Highest ``watchdog_ms`` the drive accepts, ms.
MAX_WATCHDOG_MS = 60000
#: Ticks spent in Not ready to switch on (self-test) after power-on.
SELF_TEST_TICKS = 5
#: Ticks spent in Fault reaction active before Fault.
FAULT_REACTION_TICKS = 1
#: "Target reached" window in CST, ‰ of rated torque.
TARGET_WINDOW_PERMILLE = 10
#: Error code of the communication watchdog (CiA 301 life guard / heartbeat error).
ERROR_WATCHDOG = 0x8130
#: Error code of an exception raised by the joint backend (internal software).
ERROR_INTERNAL_SOFTWARE = 0x6100
#: Default encoder resolution, counts per revolution (17 bit).
COUNTS_PER_REV = 131072
#: How far the joint thread may fall behind the wall clock before it resynchronises, s.
MAX_CATCH_UP_S = 0.1
#: Ticks of the joint loop whose timing :class:`LoopTiming` keeps (the newest; 10 min at 1 kHz).
TIMING_WINDOW_TICKS = 600_000


class DriveState(enum.Enum):
    """The CiA 402 power states."""

    NOT_READY_TO_SWITCH_ON = "not ready to switch on"
    SWITCH_ON_DISABLED = "switch on disabled"
    READY_TO_SWITCH_ON = "ready to switch on"
    SWITCHED_ON = "switched on"
    OPERATION_ENABLED = "operation enabled"
    QUICK_STOP_ACTIVE = "quick stop active"
    FAULT_REACTION_ACTIVE = "fault reaction active"
    FAULT = "fault"


class Statusword(enum.IntFlag):
    """Statusword (0x6041) bits."""

    READY_TO_SWITCH_ON = 1 << 0
    SWITCHED_ON = 1 << 1
    OPERATION_ENABLED = 1 << 2
    FAULT = 1 << 3
    VOLTAGE_ENABLED = 1 << 4
    QUICK_STOP = 1 << 5
    SWITCH_ON_DISABLED = 1 << 6
    WARNING = 1 << 7
    REMOTE = 1 << 9
    TARGET_REACHED = 1 << 10
    INTERNAL_LIMIT_ACTIVE = 1 << 11
    FOLLOWS_COMMAND = 1 << 12


#: Mask of the statusword bits that encode the state.
STATE_MASK = 0x006F
#: The state bits (under :data:`STATE_MASK`) of each state.
STATE_BITS: dict[DriveState, int] = {
    DriveState.NOT_READY_TO_SWITCH_ON: 0x0000,
    DriveState.SWITCH_ON_DISABLED: 0x0040,
    DriveState.READY_TO_SWITCH_ON: 0x0021,
    DriveState.SWITCHED_ON: 0x0023,
    DriveState.OPERATION_ENABLED: 0x0027,
    DriveState.QUICK_STOP_ACTIVE: 0x0007,
    DriveState.FAULT_REACTION_ACTIVE: 0x000F,
    DriveState.FAULT: 0x0008,
}
_POWERED = frozenset(
    {
        DriveState.READY_TO_SWITCH_ON,
        DriveState.SWITCHED_ON,
        DriveState.OPERATION_ENABLED,
        DriveState.QUICK_STOP_ACTIVE,
    }
)


class Command(enum.IntEnum):
    """Controlword (0x6040) device-control commands, as values to write.

    Bit 7 (fault reset) is looked at only in Fault; :data:`FAULT_RESET` sets it alone.
    """

    SHUTDOWN = 0x0006
    SWITCH_ON = 0x0007
    DISABLE_VOLTAGE = 0x0000
    QUICK_STOP = 0x0002
    DISABLE_OPERATION = 0x0007
    ENABLE_OPERATION = 0x000F
    FAULT_RESET = 0x0080


#: Controlword halt bit (CST: zero torque while set).
HALT_BIT = 1 << 8
FAULT_RESET_BIT = 1 << 7

S = DriveState
#: (command name, from state) → to state; anything missing leaves the state as it is.
_TRANSITIONS: dict[tuple[str, DriveState], DriveState] = {
    ("shutdown", S.SWITCH_ON_DISABLED): S.READY_TO_SWITCH_ON,  # 2
    ("shutdown", S.SWITCHED_ON): S.READY_TO_SWITCH_ON,  # 6
    ("shutdown", S.OPERATION_ENABLED): S.READY_TO_SWITCH_ON,  # 8
    ("switch_on", S.READY_TO_SWITCH_ON): S.SWITCHED_ON,  # 3
    ("switch_on", S.OPERATION_ENABLED): S.SWITCHED_ON,  # 5 (disable operation)
    ("enable_operation", S.READY_TO_SWITCH_ON): S.OPERATION_ENABLED,  # 3 + 4
    ("enable_operation", S.SWITCHED_ON): S.OPERATION_ENABLED,  # 4
    ("enable_operation", S.QUICK_STOP_ACTIVE): S.OPERATION_ENABLED,  # 16
    ("disable_voltage", S.READY_TO_SWITCH_ON): S.SWITCH_ON_DISABLED,  # 7
    ("disable_voltage", S.SWITCHED_ON): S.SWITCH_ON_DISABLED,  # 10
    ("disable_voltage", S.OPERATION_ENABLED): S.SWITCH_ON_DISABLED,  # 9
    ("disable_voltage", S.QUICK_STOP_ACTIVE): S.SWITCH_ON_DISABLED,  # 12
    ("quick_stop", S.READY_TO_SWITCH_ON): S.SWITCH_ON_DISABLED,  # 7
    ("quick_stop", S.SWITCHED_ON): S.SWITCH_ON_DISABLED,  # 10
    ("quick_stop", S.OPERATION_ENABLED): S.QUICK_STOP_ACTIVE,  # 11
}
del S


def decode_command(controlword: int) -> str:
    """The device-control command a controlword carries (bit 7 aside).

    Returns ``"disable_voltage"``, ``"quick_stop"``, ``"shutdown"``, ``"switch_on"`` (also
    *disable operation*) or ``"enable_operation"``.
    """
    if not controlword & 0x2:
        return "disable_voltage"
    if not controlword & 0x4:
        return "quick_stop"
    if not controlword & 0x1:
        return "shutdown"
    if not controlword & 0x8:
        return "switch_on"
    return "enable_operation"


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
        return PlantJointAdapter(plant, torque_attr="exo_torque_nm")
    from twinloop.plant.knee.tasks import reference  # type: ignore[import-not-found,unused-ignore]

    row = knee_task_row(task, seed)
    kwargs.setdefault("theta0_rad", float(reference(row, 0.0)[0]))
    plant = KneePlant(params, np.random.default_rng(seed), **kwargs)
    return TaskFollowingJoint(plant, row)


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


def check_holding_write(address: int, words: Sequence[int]) -> list[tuple[str, int]] | ExcCodes:
    """Check a write of holding registers as a whole (it does not depend on the drive's state).

    Returns:
        The ``(field, word)`` pairs to apply in address order, or the Modbus exception: 02 an
        address outside the map (or no words), 03 a mode other than CST, a ``max_torque``
        above 2000 ‰ or a ``watchdog_ms`` above 60000.

    """
    if address not in _HR_FIELDS or address + len(words) > HR_COUNT or not words:
        return ExcCodes.ILLEGAL_ADDRESS
    fields = [(_HR_FIELDS[address + i], int(w) & 0xFFFF) for i, w in enumerate(words)]
    for name, word in fields:
        if name == "modes_of_operation" and _signed16(word) != CST_MODE:
            return ExcCodes.ILLEGAL_VALUE
        if name == "max_torque" and word > PEAK_TORQUE_PERMILLE:
            return ExcCodes.ILLEGAL_VALUE
        if name == "watchdog_ms" and word > MAX_WATCHDOG_MS:
            return ExcCodes.ILLEGAL_VALUE
    return fields


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


@dataclasses.dataclass(frozen=True)
class DriveStatus:
    """A consistent snapshot of the drive, in register units and engineering units.

    Attributes:
        state: the power state.
        statusword: 0x6041.
        controlword: 0x6040 as last written.
        mode_display: 0x6061.
        target_torque_permille: 0x6071 as last written, ‰ of rated torque.
        max_torque_permille: 0x6072, ‰.
        torque_demand_permille: 0x6074, the torque applied now, ‰.
        torque_actual_permille: 0x6077, ‰.
        position_counts: 0x6064, encoder counts (wrapped to int32).
        velocity_counts_s: 0x606C, counts/s.
        error_code: 0x603F.
        heartbeat: ticks mod 65536.
        watchdog_ms: the communication watchdog, ms (0: off).
        tick: 1 ms ticks since power-on.
        angle_rad: the joint's angle, rad.
        velocity_rad_s: the joint's velocity, rad/s.
        torque_nm: the joint's measured actuator torque, N·m.

    """

    state: DriveState
    statusword: int
    controlword: int
    mode_display: int
    target_torque_permille: int
    max_torque_permille: int
    torque_demand_permille: int
    torque_actual_permille: int
    position_counts: int
    velocity_counts_s: int
    error_code: int
    heartbeat: int
    watchdog_ms: int
    tick: int
    angle_rad: float
    velocity_rad_s: float
    torque_nm: float


def _wrap(value: int, bits: int) -> int:
    """Two's-complement wrap of ``value`` into a signed ``bits``-bit integer."""
    half = 1 << (bits - 1)
    return ((value + half) % (1 << bits)) - half


def _clip(value: int, bits: int) -> int:
    half = 1 << (bits - 1)
    return max(-half, min(half - 1, value))


def _words32(value: int) -> list[int]:
    """A 32-bit integer (signed or unsigned) as two words, high word first."""
    raw = value & 0xFFFFFFFF
    return [raw >> 16, raw & 0xFFFF]


def _signed16(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


class LoopTimingLike(Protocol):
    """What a drive's ``timing`` offers: :class:`LoopTiming` here, or a core process's."""

    def summary(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...


class DriveModbus:
    """The drive's Modbus face: its register map served by pymodbus over TCP.

    A subclass gives the firmware behind it: ``device_id``, ``faults`` (:class:`WireFaults`),
    ``_images()`` (one consistent snapshot of both tables), ``write_holding()`` and
    ``start_joint()``/``stop_joint()``. :class:`DriveEmulator` runs the firmware in this
    process; :class:`twinloop.hw_bridge.emulators.drive.process.DriveProcess` in a process of its
    own.
    """

    device_id: int
    faults: WireFaults
    #: The joint loop's timing (``summary()``, ``reset()``), wherever the loop runs.
    timing: LoopTimingLike

    def _images(self) -> dict[str, list[int]]:
        raise NotImplementedError

    def write_holding(self, address: int, words: Sequence[int]) -> ExcCodes | None:
        raise NotImplementedError

    def start_joint(self) -> None:
        raise NotImplementedError

    def stop_joint(self, timeout_s: float = 5.0) -> None:
        raise NotImplementedError

    def sim_device(self) -> SimDevice:
        """A pymodbus ``SimDevice`` of the register map whose action runs this drive.

        Its id is 0 (every device id); :meth:`screen` decides which ids are answered. The
        coil and discrete tables hold one dummy bit each (pymodbus needs four tables);
        :meth:`screen` refuses their functions with 01.
        """
        bit = [SimData(0, values=[False], datatype=DataType.BITS)]
        holding = [SimData(0, values=[0] * HR_COUNT, datatype=DataType.UINT16)]
        inputs = [SimData(0, values=[0] * IR_COUNT, datatype=DataType.UINT16)]
        return SimDevice(id=0, simdata=(bit, list(bit), holding, inputs), action=self._action)

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Refresh a table before a read; apply a write (``SimDevice`` action, see pump.py)."""
        del start_address, count
        table = _FUNCTIONS.get(function_code, ("?", 0))[0]
        if set_values is None:
            if function_code == 6 or self.faults.freeze:
                return None  # fc 6 echo read-back keeps the written word
            image = self._images().get(table)
            if image is not None:
                registers[: len(image)] = image
            return None
        if table != "h":
            return ExcCodes.ILLEGAL_ADDRESS
        return self.write_holding(address, [int(v) for v in set_values])

    def screen(self, request: ModbusPDU) -> ModbusPDU | None:
        """Check a decoded request: unit id, function, quantity, address range."""
        if request.dev_id != self.device_id and request.dev_id not in TCP_ANY_UNIT_IDS:
            return refuse(request, ExcCodes.GATEWAY_NO_RESPONSE)
        function = _FUNCTIONS.get(request.function_code)
        if function is None:
            return refuse(request, ExcCodes.ILLEGAL_FUNCTION)
        table, max_quantity = function
        if request.function_code == 6:
            quantity = 1
        elif request.function_code == 16:
            quantity = len(request.registers)
        else:
            quantity = request.count
        if not 1 <= quantity <= max_quantity or (
            request.function_code == 16 and request.count != quantity
        ):
            return refuse(request, ExcCodes.ILLEGAL_VALUE)
        if request.address + quantity > _TABLE_SIZE[table]:
            return refuse(request, ExcCodes.ILLEGAL_ADDRESS)
        return request

    @staticmethod
    def respond(response: ModbusPDU) -> ModbusPDU:
        """Answer 03 (not pymodbus's 01) to an undecodable request of an implemented function."""
        if (
            isinstance(response, ExceptionResponse)
            and response.exception_code == ExcCodes.ILLEGAL_FUNCTION
            and response.function_code & 0x7F in _FUNCTIONS
        ):
            response.exception_code = ExcCodes.ILLEGAL_VALUE
        return response

    async def open_tcp(self, host: str = "127.0.0.1", *, port: int = 502) -> ModbusBaseServer:
        """Open a Modbus TCP server in the running loop; port 0 picks a free one.

        Raises:
            EmulatorError: the address cannot be bound.

        """
        hooks = WireHooks(self.faults, framing="socket", screen=self.screen, respond=self.respond)
        server = ModbusTcpServer(
            self.sim_device(),
            framer=FramerType.SOCKET,
            address=(host, port),
            trace_packet=hooks.trace_packet,
            trace_pdu=cast(Any, hooks.trace_pdu),
        )
        try:
            await server.serve_forever(background=True)
        except (RuntimeError, OSError) as exc:
            raise EmulatorError(f"drive: cannot serve on TCP {host}:{port}: {exc}") from None
        self.faults.attach(server, asyncio.get_running_loop())
        if port == 0:  # reopen (after a disconnect) on the port that was picked
            server.init_setup_connect_listen(host, server_address(server)[1])
        _log.info("drive (device id %d) serving Modbus TCP on %s", self.device_id, host)
        return server

    async def close_server(self, server: ModbusBaseServer) -> None:
        """Stop a server opened by :meth:`open_tcp` (in its loop)."""
        self.faults.detach(server)
        await server.shutdown()
        await asyncio.sleep(0)

    def start_tcp(
        self, host: str = "127.0.0.1", port: int = 502, *, run_joint: bool = True
    ) -> DriveServerThread:
        """Serve Modbus TCP in a background thread (and, with ``run_joint``, step the joint).

        Args:
            host: address to bind (loopback by default).
            port: TCP port; 0 picks a free one (:attr:`DriveServerThread.tcp_address`).
            run_joint: also start the 1 kHz joint thread (:meth:`start_joint`); ``False``
                leaves the stepping to the caller (:meth:`step`).

        Returns:
            The running server; stop it with :meth:`DriveServerThread.stop` (or ``with``),
            which also stops the joint thread.

        Raises:
            EmulatorError: the server could not start.

        """
        thread = DriveServerThread(self, lambda: self.open_tcp(host, port=port))
        thread.start()
        if run_joint:
            self.start_joint()
        return thread


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
            torque_nm = self.permille_to_nm(self._demand(s))
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
        demand = self._demand(s)
        actual = self.nm_to_permille(torque)
        word = STATE_BITS[s.state]
        if s.state in _POWERED:
            word |= Statusword.VOLTAGE_ENABLED
        if s.state != DriveState.NOT_READY_TO_SWITCH_ON:
            word |= Statusword.REMOTE
        enabled = s.state == DriveState.OPERATION_ENABLED
        if enabled:
            if abs(s.target_torque_permille) > s.max_torque_permille:
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
        )

    def _images(self) -> dict[str, list[int]]:
        st = self.status()
        holding = [
            st.controlword,
            st.mode_display & 0xFFFF,
            st.target_torque_permille & 0xFFFF,
            st.max_torque_permille,
            st.watchdog_ms,
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
            ``None``, or the Modbus exception: 02 outside the map, 03 a refused value.

        """
        fields = check_holding_write(address, words)
        if isinstance(fields, ExcCodes):
            return fields
        with self._lock:
            s = self._state
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
                else:
                    s.watchdog_ms = word
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


class DriveServerThread(ServerThread):
    """A drive's Modbus TCP server in a background thread (``drive-server``) with its own loop.

    :meth:`stop` also stops the drive's joint thread. Attributes as :class:`ServerThread`.
    """

    def __init__(self, emulator: DriveModbus, opener: Callable[[], Any]) -> None:
        super().__init__(emulator, [opener], name="drive-server", what="drive server")
        self.drive = emulator

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the server, its thread and the drive's joint thread (idempotent)."""
        self.drive.stop_joint(timeout_s)
        super().stop(timeout_s=timeout_s)


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field}={value!r} is not allowed: an int in {low}..{high}")


def run_drive(
    *,
    host: str = "127.0.0.1",
    port: int = 5021,
    backend_factory: Callable[[], JointBackend] | None = None,
    joint_process: bool = True,
    stop_event: threading.Event | None = None,
    on_ready: Callable[[DriveServerThread], None] | None = None,
) -> dict[str, Any]:
    """Serve an emulated drive on Modbus TCP until ``stop_event`` is set (or Ctrl-C).

    Args:
        host: address to bind.
        port: TCP port (0 picks one; see ``on_ready``).
        backend_factory: builds the joint (a :class:`PendulumJoint` if ``None``); picklable
            when ``joint_process``.
        joint_process: run the firmware and its 1 kHz loop in a process of its own
            (:class:`~twinloop.hw_bridge.emulators.drive.process.DriveProcess`, the default), or in
            a thread of this one (:class:`DriveEmulator`).
        stop_event: set it from another thread to stop; ``None`` runs until interrupted.
        on_ready: called with the running server once it listens.

    Returns:
        The 1 kHz joint loop's timing over the session (:meth:`LoopTiming.summary`).

    Raises:
        ValueError: the joint refused its arguments.
        EmulatorError: the server could not start, or its thread ended unexpectedly.

    """
    factory = backend_factory if backend_factory is not None else PendulumJoint
    drive: DriveModbus
    if joint_process:
        from twinloop.hw_bridge.emulators.drive.process import DriveProcess

        drive = DriveProcess(factory)
    else:
        drive = DriveEmulator(factory())
    stop = stop_event if stop_event is not None else threading.Event()
    try:
        with drive.start_tcp(host, port) as server:
            if on_ready is not None:
                on_ready(server)
            try:
                while not stop.wait(0.5):
                    if not server.alive:
                        raise EmulatorError("drive server thread ended unexpectedly")
            except KeyboardInterrupt:
                pass
            return drive.timing.summary()
    finally:
        close = getattr(drive, "close", None)
        if close is not None:
            close()
