"""The emulated servo drive's Modbus face: its register map and :class:`DriveModbus`.

The drive (:mod:`twinloop.hw_bridge.emulators.drive`) is split as a real one is: this module is
what a client sees on the wire — the register map, the CiA 402 power states, commands and
statusword bits, the check of a holding-register write (:func:`check_holding_write`), a
consistent snapshot of the drive (:class:`DriveStatus`) and :class:`DriveModbus`, the register
map served by a pymodbus 3.16 server built on ``SimDevice`` (its ``action`` coroutine refreshes
the registers on every read and applies every write) in a :class:`DriveServerThread`. The
firmware behind it runs in this process
(:class:`~twinloop.hw_bridge.emulators.drive.emulator.DriveEmulator`) or in a core process of
its own (:class:`~twinloop.hw_bridge.emulators.drive.process.DriveProcess`).

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
maintenance                 5      uint16  –         the maintenance unlock (below); reads 1 in
                                                     the maintenance state, else 0
==========================  =====  ======  ========  =========================================

**Maintenance state.** ``max_torque`` and ``watchdog_ms`` are settings of the drive, not of a
session: they can be written only in the maintenance state (otherwise 04). It is entered by
writing :data:`MAINTENANCE_KEYS` to ``maintenance``: 0x4D41 then 0x494E (``"MA"``, ``"IN"``),
each in a write of its own, the second the very next holding write after the first, with the
power stage off (Not ready, Switch on disabled or Fault; otherwise 04); a second key out of
sequence is refused with 04 and the sequence starts over. In the maintenance state the power
stage stays off: a controlword other than *disable voltage* is refused with 04. Writing 0 to
``maintenance`` leaves it. A control rig never enters it (``twinloop.hil.knee.rig`` reads the
two settings and refuses to start if they are unsafe, it does not write them).

**Range of motion.** A drive given ``rom_rad = (low, high)`` (the knee drive: -5° to 130° of
flexion, :data:`~twinloop.hw_bridge.emulators.drive.emulator.KNEE_ROM_RAD`) limits its own
torque output near them, whatever the target: torque towards ``low`` (negative) is scaled
from full at ``low + taper`` down to 0 at ``low`` and beyond, torque towards ``high`` likewise;
torque back into the range is never reduced. While it reduces the torque, ``torque_demand``
shows the reduced value and the statusword shows *internal limit active* (bit 11).

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
``max_torque`` above 2000 ‰; 04 a write the drive's state forbids (``max_torque`` or
``watchdog_ms`` outside the maintenance state, a maintenance key out of sequence or with the
power stage on, a power-up controlword in maintenance). Unit ids: ``device_id`` and 0/255 are
answered; others get 0x0B.
A multi-register write is checked as a whole and applied atomically in address order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusBaseServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from twinloop.hw_bridge.emulators.modbus_server import EmulatorError, ServerThread, server_address
from twinloop.hw_bridge.wire import WireFaults, WireHooks, refuse

__all__ = [
    "CST_MODE",
    "MAINTENANCE_KEYS",
    "Command",
    "DriveModbus",
    "DriveServerThread",
    "DriveState",
    "DriveStatus",
    "LoopTimingLike",
    "Statusword",
    "check_holding_write",
    "decode_command",
]

_log = logging.getLogger(__name__)

# -- the register map ---------------------------------------------------------------------
HR_CONTROLWORD = 0
HR_MODES_OF_OPERATION = 1
HR_TARGET_TORQUE = 2
HR_MAX_TORQUE = 3
HR_WATCHDOG_MS = 4
HR_MAINTENANCE = 5
HR_COUNT = 6

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
    HR_MAINTENANCE: "maintenance",
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
#: The maintenance unlock: these two words written to ``maintenance``, one write each, the
#: second right after the first (``"MA"``, ``"IN"`` in ASCII), with the power stage off.
MAINTENANCE_KEYS = (0x4D41, 0x494E)
#: What ``maintenance`` reads in the maintenance state (0 otherwise).
MAINTENANCE_ACTIVE = 1
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


def check_holding_write(address: int, words: Sequence[int]) -> list[tuple[str, int]] | ExcCodes:
    """Check a write of holding registers as a whole (it does not depend on the drive's state).

    Returns:
        The ``(field, word)`` pairs to apply in address order, or the Modbus exception: 02 an
        address outside the map (or no words), 03 a mode other than CST, a ``max_torque``
        above 2000 ‰, a ``watchdog_ms`` above 60000 or a ``maintenance`` word other than 0
        and the two keys.

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
        if name == "maintenance" and word not in (0, *MAINTENANCE_KEYS):
            return ExcCodes.ILLEGAL_VALUE
    return fields


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
        maintenance: the drive is in its maintenance state.
        rom_limited: the range-of-motion limit is reducing the torque now.

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
    maintenance: bool = False
    rom_limited: bool = False


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

    def summary(self) -> dict[str, Any]:
        """Ticks, and lateness/duration percentiles in ms (see ``LoopTiming.summary``)."""
        ...

    def reset(self) -> None:
        """Forget every tick recorded so far."""
        ...


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
        """Apply a write of holding registers; the Modbus exception, or ``None`` if applied."""
        raise NotImplementedError

    def start_joint(self) -> None:
        """Start stepping the joint at the drive's tick rate."""
        raise NotImplementedError

    def stop_joint(self, timeout_s: float = 5.0) -> None:
        """Stop stepping the joint (idempotent)."""
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
