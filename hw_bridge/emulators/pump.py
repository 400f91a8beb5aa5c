"""Emulated insulin pump: the Modbus register map of ``hw_bridge/DEVICES.md`` on a virtual patient.

:class:`PumpEmulator` is the pump's firmware: a state machine (basal, temp basal, bolus,
suspend, reservoir, battery, alarms) driven by the simulated minutes of a
:class:`twinloop.hw_bridge.emulators.patient.VirtualPatient`, whose ``insulin_source`` it becomes.
It speaks Modbus through pymodbus 3.16 servers built on ``SimDevice``/``SimData`` (four separate
tables) whose ``action`` coroutine refreshes the registers from the state on every read and applies
every write to the state: over RTU (:meth:`PumpEmulator.serve_rtu`, a serial port such as one
end of :class:`twinloop.hw_bridge.pty.PtyPair`, with wire-time emulation) and over Modbus TCP or TLS
(:meth:`PumpEmulator.serve_tcp`). :meth:`PumpEmulator.start_in_thread` runs the servers in a
background thread with its own event loop; :func:`run_pump` is the blocking command-line entry.

Register map (0-based protocol addresses; 32-bit values big-endian, high word first):

======================  =====  =======  =====  ==================================================
holding register        addr   type     unit   read / write
======================  =====  =======  =====  ==================================================
temp_basal_u_per_h      0–1    float32  U/h    the temp basal rate setting (0–35, quantised)
temp_basal_duration_min 2      uint16   min    write 1–30 starts the temp basal, 0 cancels;
                                               reads the minutes left (0: scheduled basal)
bolus_u                 3–4    float32  U      write 0–25 starts a bolus; reads what is left
command                 5      uint16   –      1 suspend, 2 resume, 3 cancel bolus, 4 clear
                                               alarm (0 does nothing); reads 0
scheduled_basal_u_per_h 6–7    float32  U/h    the pump's own basal (0–35, quantised)
======================  =====  =======  =====  ==================================================

Input registers: ``delivered_total_u`` 0–1 int32 ×0.001 U, ``reservoir_u`` 2–3 float32 U,
``battery_pct`` 4 uint16 ×0.1 %, ``delivery_rate_u_per_h`` 5–6 float32 U/h,
``bolus_remaining_u`` 7–8 float32 U, ``alarm_code`` 9, ``pump_clock_min`` 10–11 int32 min,
``heartbeat`` 12 (+1 per simulated minute, mod 65536), ``time_scale_s_per_min`` 13–14 float32
(the wall seconds per simulated minute its clock runs at: a rig checks it at connect).
Discrete inputs: ``occluded`` 0, ``suspended`` 1, ``bolus_active`` 2, ``temp_basal_active`` 3,
``alarm_active`` 4. Coil: ``suspend`` 0 (1 suspends, 0 resumes).

Behaviour, in the order of a simulated minute (:meth:`PumpEmulator.deliver_minute`): the clock
and heartbeat advance, the battery drains 0.01 %/min; unless suspended, occluded or empty the
pump delivers ``rate/60`` U of basal (the temp basal while one runs, else the scheduled basal)
plus ``min(1.5, left)`` U of bolus, through :func:`twinloop.plant.glucose.pump.delivery_u_per_min`
(pulses of ``spec.pulse_u``), never more than the reservoir holds; a temp basal counts down whether
or not insulin flows and the pump returns to its scheduled basal by itself. Rates and boluses are
quantised (rounded down) with
:func:`~twinloop.plant.glucose.pump.quantize_basal` /
:func:`~twinloop.plant.glucose.pump.quantize_bolus` when written.

Interpretations where ``DEVICES.md`` is silent:

- ``alarm_code`` shows the most severe condition: 1 occlusion (latched: it stays after the
  occlusion is removed until command 4 clears it), then 4 reservoir empty, 5 cumulative insulin
  limit (latched), 6 RTU broadcast refused (latched), 3 battery low (< 10 %), 2 reservoir low
  (< 20 U); 0 none. Command 4 clears the latches.
- Cumulative insulin limits, as real pumps' "max hourly"/"max daily" insulin: basal + bolus
  over any rolling 60 simulated minutes at most ``max_hourly_u`` (default
  :data:`MAX_HOURLY_U`, 30 U) and over any rolling 24 h at most ``max_daily_u`` (default
  :data:`MAX_DAILY_U`, 100 U). A bolus, a temp basal start or a scheduled basal that would
  exceed a limit (what was delivered in the window + the bolus left + the new command) is
  refused with 04 and latches alarm 5; delivery itself is capped at the limit minute by minute
  (the bolus in progress is cancelled, basal stops until the window frees), also latching
  alarm 5. Many small in-limit commands therefore cannot add up past the limits.
- An occlusion, a suspend, and an emptied reservoir cancel the bolus in progress (the rest is
  never delivered). Delivery resumes by itself when the occlusion is removed.
- Delivery commands are: a bolus > 0, a temp basal start (duration > 0), resume (command 2 or
  coil 0 ← 0). They are refused with 04 while occluded or with an empty reservoir; a bolus is
  also refused with 04 while suspended (a suspended pump cannot deliver it).
- A write must cover whole values: a write that starts or ends inside a float32 → 02. A
  multi-register write may span several fields; it is checked as a whole and applied
  atomically, fields in address order. Checks come in Modbus order: 01 function, 03 quantity,
  02 address, then 03 value, 04 device state, 06 busy.
- Device id: RTU answers ``device_id``; broadcasts (id 0) are never executed: they are
  ignored (a broadcast gets no answer), counted (:attr:`PumpEmulator.broadcasts_refused`),
  logged and latch alarm 6. Frames for other ids are ignored (silence). Modbus TCP answers
  unit ids ``device_id``, 0 and 255, and others with 0x0B (gateway target failed to respond).
- Modbus/TLS: each request is authorized by the role in the client certificate
  (:class:`~twinloop.hw_bridge.wire.RoleTlsServer`, :attr:`PumpEmulator.authorization`):
  ``operator`` may write, ``monitor`` and certificates without a known role only read; a
  refused request gets 01 and is not executed.
- ``faults.freeze``: reads return the registers as they were when the freeze began (the
  pump keeps delivering; writes are still executed).

Thread-safety: the patient's minutes run in its thread, the servers in an asyncio loop; the
state is guarded by one lock and every read fills its table from one consistent snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import enum
import itertools
import logging
import math
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusBaseServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from twinloop.hw_bridge.emulators.modbus_server import EmulatorError, ServerThread, server_address
from twinloop.hw_bridge.emulators.patient import InsulinSource, VirtualPatient
from twinloop.hw_bridge.wire import (
    Framing,
    RoleAuthorization,
    RoleTlsServer,
    RtuSerialServer,
    SerialLine,
    StrictWriteSingleCoilRequest,
    WireFaults,
    WireHooks,
    refuse,
    usable_parity,
)
from twinloop.plant.glucose.pump import PumpSpec, delivery_u_per_min, quantize_basal, quantize_bolus

_log = logging.getLogger(__name__)

# -- the register map (DEVICES.md) ------------------------------------------------------------
HR_TEMP_BASAL_U_PER_H = 0
HR_TEMP_BASAL_DURATION_MIN = 2
HR_BOLUS_U = 3
HR_COMMAND = 5
HR_SCHEDULED_BASAL_U_PER_H = 6
HR_COUNT = 8

IR_DELIVERED_TOTAL_U = 0
IR_RESERVOIR_U = 2
IR_BATTERY_PCT = 4
IR_DELIVERY_RATE_U_PER_H = 5
IR_BOLUS_REMAINING_U = 7
IR_ALARM_CODE = 9
IR_PUMP_CLOCK_MIN = 10
IR_HEARTBEAT = 12
IR_TIME_SCALE_S_PER_MIN = 13
IR_COUNT = 15

DI_OCCLUDED = 0
DI_SUSPENDED = 1
DI_BOLUS_ACTIVE = 2
DI_TEMP_BASAL_ACTIVE = 3
DI_ALARM_ACTIVE = 4
DI_COUNT = 5

COIL_SUSPEND = 0
COIL_COUNT = 1

#: Scale of ``delivered_total_u`` (int32 register = round(U / scale)), U per count.
DELIVERED_SCALE_U = 0.001
#: Scale of ``battery_pct`` (uint16 register = round(% / scale)), % per count.
BATTERY_SCALE_PCT = 0.1

# -- behaviour -------------------------------------------------------------------------------
#: Bolus delivery speed, U per simulated minute.
BOLUS_RATE_U_PER_MIN = 1.5
#: Longest temp basal, min.
MAX_TEMP_BASAL_MIN = 30
#: ``alarm_code`` 2 below this, U.
RESERVOIR_LOW_U = 20.0
#: ``alarm_code`` 3 below this, %.
BATTERY_LOW_PCT = 10.0
#: Battery drain, % per simulated minute.
BATTERY_DRAIN_PCT_PER_MIN = 0.01
#: Below this the reservoir counts as empty, U.
EMPTY_U = 1e-9
#: Default cumulative limit over any rolling 60 simulated minutes (basal + bolus), U: at least
#: the largest bolus (25 U) plus a few units of basal, like a pump's "max hourly insulin".
MAX_HOURLY_U = 30.0
#: Default cumulative limit over any rolling 24 simulated hours (basal + bolus), U: a pump's
#: "max daily total" (set well above the patient's total daily dose).
MAX_DAILY_U = 100.0
HOUR_MIN = 60
DAY_MIN = 1440

#: Function codes the pump implements (others → 01), with their table and largest quantity.
_FUNCTIONS: dict[int, tuple[str, int]] = {
    1: ("c", 2000),  # read coils
    2: ("d", 2000),  # read discrete inputs
    3: ("h", 125),  # read holding registers
    4: ("i", 125),  # read input registers
    5: ("c", 1),  # write single coil
    6: ("h", 1),  # write single register
    15: ("c", 1968),  # write multiple coils
    16: ("h", 123),  # write multiple registers
}
_TABLE_SIZE = {"c": COIL_COUNT, "d": DI_COUNT, "h": HR_COUNT, "i": IR_COUNT}
#: Holding-register fields: start address → (name, registers).
_HR_FIELDS: dict[int, tuple[str, int]] = {
    HR_TEMP_BASAL_U_PER_H: ("temp_basal_u_per_h", 2),
    HR_TEMP_BASAL_DURATION_MIN: ("temp_basal_duration_min", 1),
    HR_BOLUS_U: ("bolus_u", 2),
    HR_COMMAND: ("command", 1),
    HR_SCHEDULED_BASAL_U_PER_H: ("scheduled_basal_u_per_h", 2),
}
#: Unit ids a Modbus TCP pump answers besides its own device id.
TCP_ANY_UNIT_IDS = (0, 255)


class Alarm(enum.IntEnum):
    """``alarm_code`` values."""

    NONE = 0
    OCCLUSION = 1
    RESERVOIR_LOW = 2
    BATTERY_LOW = 3
    RESERVOIR_EMPTY = 4
    DELIVERY_LIMIT = 5
    BROADCAST_REFUSED = 6


class Command(enum.IntEnum):
    """``command`` register values."""

    NONE = 0
    SUSPEND = 1
    RESUME = 2
    CANCEL_BOLUS = 3
    CLEAR_ALARM = 4


@dataclasses.dataclass
class _State:
    """The pump's state (guarded by ``PumpEmulator._lock``)."""

    reservoir_u: float
    battery_pct: float
    scheduled_basal_u_per_h: float
    clock_min: int = 0
    heartbeat: int = 0
    delivered_total_u: float = 0.0
    temp_basal_setting_u_per_h: float = 0.0
    temp_basal_u_per_h: float = 0.0
    temp_basal_left_min: int = 0
    bolus_left_u: float = 0.0
    suspended: bool = False
    occluded: bool = False
    occlusion_latched: bool = False
    pulse_residual_u: float = 0.0
    #: Insulin delivered in each of the last ``DAY_MIN`` minutes, oldest first, U.
    recent_u: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=DAY_MIN)
    )
    limit_latched: bool = False
    limit_refusals: int = 0
    broadcast_latched: bool = False
    broadcasts_refused: int = 0

    def delivered_in_u(self, minutes: int) -> float:
        """Insulin delivered in the last ``minutes`` simulated minutes, U."""
        recent = self.recent_u
        return sum(itertools.islice(recent, max(0, len(recent) - minutes), None))

    @property
    def empty(self) -> bool:
        return self.reservoir_u <= EMPTY_U

    @property
    def can_deliver(self) -> bool:
        return not (self.suspended or self.occluded or self.empty)

    @property
    def basal_u_per_h(self) -> float:
        if self.temp_basal_left_min > 0:
            return self.temp_basal_u_per_h
        return self.scheduled_basal_u_per_h

    @property
    def alarm(self) -> Alarm:
        if self.occlusion_latched or self.occluded:
            return Alarm.OCCLUSION
        if self.empty:
            return Alarm.RESERVOIR_EMPTY
        if self.limit_latched:
            return Alarm.DELIVERY_LIMIT
        if self.broadcast_latched:
            return Alarm.BROADCAST_REFUSED
        if self.battery_pct < BATTERY_LOW_PCT:
            return Alarm.BATTERY_LOW
        if self.reservoir_u < RESERVOIR_LOW_U:
            return Alarm.RESERVOIR_LOW
        return Alarm.NONE


@dataclasses.dataclass(frozen=True)
class PumpStatus:
    """A consistent snapshot of the pump, in engineering units (what the registers encode).

    Attributes:
        delivered_total_u: insulin delivered since start, U.
        reservoir_u: insulin left, U.
        battery_pct: battery, %.
        delivery_rate_u_per_h: basal rate being delivered now, U/h (0 when it cannot deliver).
        bolus_remaining_u: bolus still to deliver, U.
        alarm_code: see :class:`Alarm`.
        pump_clock_min: simulated minutes since start.
        heartbeat: +1 per simulated minute, mod 65536.
        occluded: the line is occluded now.
        suspended: delivery suspended by command.
        bolus_active: a bolus is being delivered.
        temp_basal_active: a temp basal runs.
        temp_basal_u_per_h: the temp basal rate setting, U/h.
        temp_basal_left_min: minutes left of the temp basal, min.
        scheduled_basal_u_per_h: the scheduled basal, U/h.

    """

    delivered_total_u: float
    reservoir_u: float
    battery_pct: float
    delivery_rate_u_per_h: float
    bolus_remaining_u: float
    alarm_code: int
    pump_clock_min: int
    heartbeat: int
    occluded: bool
    suspended: bool
    bolus_active: bool
    temp_basal_active: bool
    temp_basal_u_per_h: float
    temp_basal_left_min: int
    scheduled_basal_u_per_h: float

    @property
    def alarm_active(self) -> bool:
        """Whether an alarm is shown."""
        return self.alarm_code != Alarm.NONE


def _f32(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def _i32(value: int) -> list[int]:
    clipped = max(-(2**31), min(2**31 - 1, int(value)))
    hi, lo = struct.unpack(">HH", struct.pack(">i", clipped))
    return [hi, lo]


def _read_f32(registers: Sequence[int]) -> float:
    value: float = struct.unpack(">f", struct.pack(">HH", registers[0], registers[1]))[0]
    return value


def _bits(*flags: bool) -> int:
    return sum(1 << i for i, flag in enumerate(flags) if flag)


class PumpEmulator:
    """An emulated insulin pump (``hw_bridge/DEVICES.md``) delivering into a virtual patient.

    Creating it makes it the patient's ``insulin_source`` (restored by :meth:`close`); the
    patient's clock (``patient.start()``, or ``patient.step_minute()`` in tests) drives it. It
    serves the register map on any number of servers at once (RTU and TCP share the state).

    Args:
        patient: the plant it delivers into.
        spec: limits and resolution (``max_basal_u_per_h`` bounds the rates, ``max_bolus_u``
            the bolus; increments quantise them; ``pulse_u`` makes delivery pulsed).
        reservoir_u: insulin in the reservoir at start, U (>= 0).
        device_id: Modbus device id, 1–247.
        faults: the wire-fault switches of its servers (a new :class:`WireFaults` if ``None``).
        scheduled_basal_u_per_h: the pump's own basal at start, U/h (default: the patient's
            basal, quantised).
        battery_pct: battery at start, %.
        max_hourly_u: cumulative limit over any rolling 60 simulated minutes, U (0-1000).
        max_daily_u: cumulative limit over any rolling 24 h, U (``max_hourly_u``-24000).
        authorization: which client roles may use which function codes on its Modbus/TLS
            servers (default :class:`~twinloop.hw_bridge.wire.RoleAuthorization`: ``operator``
            writes, ``monitor`` and certificates without a role only read).

    Raises:
        ValueError: an argument outside what is allowed (the message names it).

    """

    def __init__(
        self,
        patient: VirtualPatient,
        *,
        spec: PumpSpec = PumpSpec(max_bolus_u=25.0),  # noqa: B008 - frozen, immutable default
        reservoir_u: float = 300.0,
        device_id: int = 1,
        faults: WireFaults | None = None,
        scheduled_basal_u_per_h: float | None = None,
        battery_pct: float = 100.0,
        max_hourly_u: float = MAX_HOURLY_U,
        max_daily_u: float = MAX_DAILY_U,
        authorization: RoleAuthorization | None = None,
    ) -> None:
        if isinstance(device_id, bool) or not (
            isinstance(device_id, int) and 1 <= device_id <= 247
        ):
            raise ValueError(f"device_id={device_id!r} is not allowed: an int in 1..247")
        _check_range("reservoir_u", reservoir_u, 0.0, math.inf)
        _check_range("battery_pct", battery_pct, 0.0, 100.0)
        _check_range("max_hourly_u", max_hourly_u, 0.0, 1000.0)
        _check_range("max_daily_u", max_daily_u, max_hourly_u, 24.0 * 1000.0)
        basal = (
            patient.parameters.basal_u_per_h
            if scheduled_basal_u_per_h is None
            else scheduled_basal_u_per_h
        )
        _check_range("scheduled_basal_u_per_h", basal, 0.0, spec.max_basal_u_per_h)
        self.patient = patient
        self.spec = spec
        self.device_id = device_id
        self.max_hourly_u = float(max_hourly_u)
        self.max_daily_u = float(max_daily_u)
        self.faults = faults if faults is not None else WireFaults()
        #: Role-based authorization of its Modbus/TLS servers (refusals counted there).
        self.authorization = authorization if authorization is not None else RoleAuthorization()
        self._lock = threading.Lock()
        self._state = _State(
            reservoir_u=float(reservoir_u),
            battery_pct=float(battery_pct),
            scheduled_basal_u_per_h=float(quantize_basal(spec, float(basal))),
        )
        self._previous_source: InsulinSource | None = patient.insulin_source
        patient.insulin_source = self.deliver_minute

    # -- the firmware ------------------------------------------------------------------------
    def deliver_minute(self, t_min: int) -> float:
        """Run one simulated minute; return the units delivered in it (the patient's source).

        Args:
            t_min: the patient's minute index (unused: the pump keeps its own clock).

        Returns:
            Insulin delivered during the minute, U.

        """
        del t_min
        with self._lock:
            s = self._state
            s.clock_min += 1
            s.heartbeat = (s.heartbeat + 1) % 65536
            s.battery_pct = max(0.0, s.battery_pct - BATTERY_DRAIN_PCT_PER_MIN)
            units = 0.0
            if s.can_deliver:
                bolus_u = min(BOLUS_RATE_U_PER_MIN, s.bolus_left_u)
                per_min, residual = delivery_u_per_min(
                    self.spec, s.basal_u_per_h, bolus_u, 1, s.pulse_residual_u
                )
                wanted = min(float(per_min[0, 0]), s.reservoir_u)
                allowed = min(
                    self.max_hourly_u - s.delivered_in_u(HOUR_MIN - 1),
                    self.max_daily_u - s.delivered_in_u(DAY_MIN - 1),
                )
                units = max(0.0, min(wanted, allowed))
                if units < wanted - EMPTY_U:  # the cumulative limit: stop, cancel the bolus
                    if not s.limit_latched:
                        _log.warning(
                            "pump: cumulative insulin limit reached (%.3g U/h, %.3g U/day): "
                            "delivery stopped",
                            self.max_hourly_u,
                            self.max_daily_u,
                        )
                    s.limit_latched = True
                    bolus_u = s.bolus_left_u  # the rest of the bolus is never delivered
                s.pulse_residual_u = float(residual[0])
                s.bolus_left_u = max(0.0, s.bolus_left_u - bolus_u)
                if s.bolus_left_u < EMPTY_U:
                    s.bolus_left_u = 0.0
                s.reservoir_u -= units
                s.delivered_total_u += units
                if s.empty:
                    s.reservoir_u = 0.0
                    s.bolus_left_u = 0.0
            s.recent_u.append(units)
            if s.temp_basal_left_min > 0:
                s.temp_basal_left_min -= 1
            return units

    def status(self) -> PumpStatus:
        """A consistent snapshot of the pump."""
        with self._lock:
            return self._status(self._state)

    def _status(self, s: _State) -> PumpStatus:
        return PumpStatus(
            delivered_total_u=s.delivered_total_u,
            reservoir_u=s.reservoir_u,
            battery_pct=s.battery_pct,
            delivery_rate_u_per_h=s.basal_u_per_h if s.can_deliver else 0.0,
            bolus_remaining_u=s.bolus_left_u,
            alarm_code=int(s.alarm),
            pump_clock_min=s.clock_min,
            heartbeat=s.heartbeat,
            occluded=s.occluded,
            suspended=s.suspended,
            bolus_active=s.bolus_left_u > 0.0,
            temp_basal_active=s.temp_basal_left_min > 0,
            temp_basal_u_per_h=s.temp_basal_setting_u_per_h,
            temp_basal_left_min=s.temp_basal_left_min,
            scheduled_basal_u_per_h=s.scheduled_basal_u_per_h,
        )

    # -- device fault hooks ------------------------------------------------------------------
    def occlude(self, on: bool = True) -> None:
        """Occlude the infusion line (``on``) or clear the occlusion.

        An occlusion stops delivery, cancels the bolus in progress and raises alarm 1, which
        stays latched until command 4 (clear alarm) after the occlusion is gone.
        """
        with self._lock:
            s = self._state
            s.occluded = bool(on)
            if on:
                s.occlusion_latched = True
                s.bolus_left_u = 0.0

    def set_reservoir(self, u: float) -> None:
        """Set the insulin left in the reservoir, U (>= 0); 0 empties it (alarm 4)."""
        _check_range("u", u, 0.0, math.inf)
        with self._lock:
            self._state.reservoir_u = float(u)
            if self._state.empty:
                self._state.bolus_left_u = 0.0

    def set_battery(self, pct: float) -> None:
        """Set the battery charge, % (0–100); below 10 % raises alarm 3."""
        _check_range("pct", pct, 0.0, 100.0)
        with self._lock:
            self._state.battery_pct = float(pct)

    def close(self) -> None:
        """Give the patient back its previous insulin source."""
        if self._previous_source is not None and self.patient.insulin_source == self.deliver_minute:
            self.patient.insulin_source = self._previous_source
        self._previous_source = None

    # -- registers ---------------------------------------------------------------------------
    def _images(self) -> dict[str, list[int]]:
        """Every table's registers from one snapshot (coils/discrete inputs packed 16 a word)."""
        st = self.status()
        holding = [
            *_f32(st.temp_basal_u_per_h),
            st.temp_basal_left_min,
            *_f32(st.bolus_remaining_u),
            0,
            *_f32(st.scheduled_basal_u_per_h),
        ]
        inputs = [
            *_i32(round(st.delivered_total_u / DELIVERED_SCALE_U)),
            *_f32(st.reservoir_u),
            round(st.battery_pct / BATTERY_SCALE_PCT),
            *_f32(st.delivery_rate_u_per_h),
            *_f32(st.bolus_remaining_u),
            st.alarm_code,
            *_i32(st.pump_clock_min),
            st.heartbeat,
            *_f32(self.patient.wall_s_per_sim_min),
        ]
        discrete = [
            _bits(st.occluded, st.suspended, st.bolus_active, st.temp_basal_active, st.alarm_active)
        ]
        return {"c": [_bits(st.suspended)], "d": discrete, "h": holding, "i": inputs}

    def sim_device(self) -> SimDevice:
        """A pymodbus ``SimDevice`` of the register map whose action runs this pump.

        Its id is 0 (pymodbus: "every device id"); the servers' ``screen`` decides which ids
        are answered. Each server needs its own ``SimDevice`` (pymodbus copies the tables).
        """
        coils = [SimData(0, values=[False] * COIL_COUNT, datatype=DataType.BITS)]
        discrete = [SimData(0, values=[False] * DI_COUNT, datatype=DataType.BITS)]
        holding = [
            SimData(HR_TEMP_BASAL_U_PER_H, values=0.0, datatype=DataType.FLOAT32),
            SimData(HR_TEMP_BASAL_DURATION_MIN, values=0, datatype=DataType.UINT16),
            SimData(HR_BOLUS_U, values=0.0, datatype=DataType.FLOAT32),
            SimData(HR_COMMAND, values=0, datatype=DataType.UINT16),
            SimData(HR_SCHEDULED_BASAL_U_PER_H, values=0.0, datatype=DataType.FLOAT32),
        ]
        inputs = [
            SimData(IR_DELIVERED_TOTAL_U, values=0, datatype=DataType.INT32),
            SimData(IR_RESERVOIR_U, values=0.0, datatype=DataType.FLOAT32),
            SimData(IR_BATTERY_PCT, values=0, datatype=DataType.UINT16),
            SimData(IR_DELIVERY_RATE_U_PER_H, values=0.0, datatype=DataType.FLOAT32),
            SimData(IR_BOLUS_REMAINING_U, values=0.0, datatype=DataType.FLOAT32),
            SimData(IR_ALARM_CODE, values=0, datatype=DataType.UINT16),
            SimData(IR_PUMP_CLOCK_MIN, values=0, datatype=DataType.INT32),
            SimData(IR_HEARTBEAT, values=0, datatype=DataType.UINT16),
            SimData(IR_TIME_SCALE_S_PER_MIN, values=0.0, datatype=DataType.FLOAT32),
        ]
        return SimDevice(id=0, simdata=(coils, discrete, holding, inputs), action=self._action)

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Run the ``SimDevice`` action (pymodbus): refresh a table before a read, apply a write.

        ``registers`` is the whole table (index 0 = ``start_address``, always 0 here);
        ``set_values`` is ``None`` for reads. Writes with function codes 5 and 6 are read back
        by pymodbus for their echo (``set_values is None`` then): those read-backs keep the
        written value instead of a refresh, so the echo equals the request.
        """
        del start_address, count
        table = _FUNCTIONS.get(function_code, ("?", 0))[0]
        if set_values is None:
            if function_code in (5, 6) or self.faults.freeze:
                return None
            image = self._images().get(table)
            if image is not None:
                registers[: len(image)] = image
            return None
        if table == "h":
            return self._write_holding(address, [int(v) for v in set_values])
        if table == "c":
            return self._write_coils(address, [bool(v) for v in set_values])
        return ExcCodes.ILLEGAL_ADDRESS

    def _write_coils(self, address: int, values: list[bool]) -> ExcCodes | None:
        if address != COIL_SUSPEND or len(values) != COIL_COUNT:
            return ExcCodes.ILLEGAL_ADDRESS
        command = Command.SUSPEND if values[0] else Command.RESUME
        return self._commit(lambda s: self._command(s, command))

    def _write_holding(self, address: int, values: list[int]) -> ExcCodes | None:
        end = address + len(values)
        fields: list[tuple[str, list[int]]] = []
        at = address
        while at < end:
            field = _HR_FIELDS.get(at)
            if field is None or at + field[1] > end:
                return ExcCodes.ILLEGAL_ADDRESS  # starts or ends inside a value
            fields.append((field[0], values[at - address : at - address + field[1]]))
            at += field[1]
        parsed: list[tuple[str, float]] = []
        for name, regs in fields:
            value = _read_f32(regs) if len(regs) == 2 else float(regs[0])
            if not self._value_ok(name, value):
                return ExcCodes.ILLEGAL_VALUE
            parsed.append((name, value))

        def apply(s: _State) -> ExcCodes | None:
            for name, value in parsed:
                code = self._apply(s, name, value)
                if code is not None:
                    return code
            return None

        return self._commit(apply)

    def _value_ok(self, name: str, value: float) -> bool:
        if not math.isfinite(value) or value < 0.0:
            return False
        if name in ("temp_basal_u_per_h", "scheduled_basal_u_per_h"):
            return value <= self.spec.max_basal_u_per_h
        if name == "bolus_u":
            return value <= self.spec.max_bolus_u
        if name == "temp_basal_duration_min":
            return value <= MAX_TEMP_BASAL_MIN
        return value <= max(Command)

    def _commit(self, change: Callable[[_State], ExcCodes | None]) -> ExcCodes | None:
        """Apply ``change`` to a copy of the state; keep it only if no exception resulted."""
        with self._lock:
            trial = copy.copy(self._state)
            code = change(trial)
            if code is None:
                self._state = trial
            elif trial.limit_refusals != self._state.limit_refusals:  # refused, but alarmed
                self._state.limit_latched = True
                self._state.limit_refusals = trial.limit_refusals
            return code

    def _over_limit(self, s: _State, what: str, hour_u: float, day_u: float) -> bool:
        """Whether ``hour_u``/``day_u`` more (within the next hour/day) would break a limit.

        A command that would is refused: this latches alarm 5 and counts the refusal.
        """
        hour = s.delivered_in_u(HOUR_MIN) + s.bolus_left_u + hour_u
        day = s.delivered_in_u(DAY_MIN) + s.bolus_left_u + day_u
        if hour <= self.max_hourly_u + EMPTY_U and day <= self.max_daily_u + EMPTY_U:
            return False
        s.limit_refusals += 1
        _log.warning(
            "pump: %s refused: %.3g U in the last hour, %.3g U in the last day with it "
            "(limits %.3g U/h, %.3g U/day)",
            what,
            hour,
            day,
            self.max_hourly_u,
            self.max_daily_u,
        )
        return True

    def _apply(self, s: _State, name: str, value: float) -> ExcCodes | None:
        if name == "temp_basal_u_per_h":
            s.temp_basal_setting_u_per_h = float(quantize_basal(self.spec, value))
        elif name == "scheduled_basal_u_per_h":
            rate = float(quantize_basal(self.spec, value))
            if rate > self.max_hourly_u and self._over_limit(s, "scheduled basal", rate, 0.0):
                return ExcCodes.DEVICE_FAILURE
            s.scheduled_basal_u_per_h = rate
        elif name == "temp_basal_duration_min":
            minutes = int(value)
            if minutes > 0:
                if s.occluded or s.empty:
                    return ExcCodes.DEVICE_FAILURE
                rate = s.temp_basal_setting_u_per_h
                if self._over_limit(
                    s,
                    f"temp basal {rate:g} U/h for {minutes} min",
                    rate * min(minutes, HOUR_MIN) / 60.0,
                    rate * minutes / 60.0,
                ):
                    return ExcCodes.DEVICE_FAILURE
                s.temp_basal_u_per_h = rate
            s.temp_basal_left_min = minutes
        elif name == "bolus_u":
            bolus = float(quantize_bolus(self.spec, value))
            if bolus > 0.0:
                if s.occluded or s.empty or s.suspended:
                    return ExcCodes.DEVICE_FAILURE
                if s.bolus_left_u > 0.0:
                    return ExcCodes.DEVICE_BUSY
                if self._over_limit(s, f"bolus {bolus:g} U", bolus, bolus):
                    return ExcCodes.DEVICE_FAILURE
                s.bolus_left_u = bolus
        elif name == "command":
            return self._command(s, Command(int(value)))
        return None

    @staticmethod
    def _command(s: _State, command: Command) -> ExcCodes | None:
        if command == Command.SUSPEND:
            s.suspended = True
            s.bolus_left_u = 0.0
        elif command == Command.RESUME:
            if s.occluded or s.empty:
                return ExcCodes.DEVICE_FAILURE
            s.suspended = False
        elif command == Command.CANCEL_BOLUS:
            s.bolus_left_u = 0.0
        elif command == Command.CLEAR_ALARM:
            s.limit_latched = False
            s.broadcast_latched = False
            if not s.occluded:
                s.occlusion_latched = False
        return None

    # -- request screening (before pymodbus touches the tables) -----------------------------
    def screen(self, request: ModbusPDU, *, rtu: bool) -> ModbusPDU | None:
        """Check a decoded request: device id, function, quantity, address range.

        Returns the request, a refusal stand-in (01, 02, 03, 0x0B) or ``None`` (ignore).
        """
        unit = request.dev_id
        if rtu and unit == 0:
            self._refuse_broadcast(request)
            return None  # a broadcast is never answered: and never executed
        if unit != self.device_id:
            if rtu:
                return None  # another device on the bus
            if not rtu and unit not in TCP_ANY_UNIT_IDS:
                return refuse(request, ExcCodes.GATEWAY_NO_RESPONSE)
        function = _FUNCTIONS.get(request.function_code)
        if function is None:
            return refuse(request, ExcCodes.ILLEGAL_FUNCTION)
        table, max_quantity = function
        if request.function_code in (5, 6):
            quantity = 1
        elif request.function_code == 15:
            quantity = len(request.bits)
        elif request.function_code == 16:
            quantity = len(request.registers)
        else:
            quantity = request.count
        if not 1 <= quantity <= max_quantity or (
            request.function_code in (15, 16) and request.count != quantity
        ):
            return refuse(request, ExcCodes.ILLEGAL_VALUE)
        if request.address + quantity > _TABLE_SIZE[table]:
            return refuse(request, ExcCodes.ILLEGAL_ADDRESS)
        return request

    def _refuse_broadcast(self, request: ModbusPDU) -> None:
        with self._lock:
            self._state.broadcast_latched = True
            self._state.broadcasts_refused += 1
        _log.warning(
            "pump: RTU broadcast (device id 0, function %d) refused: not executed (alarm %d)",
            request.function_code,
            Alarm.BROADCAST_REFUSED,
        )

    @property
    def limit_refusals(self) -> int:
        """Commands refused because they would break the hourly or daily insulin limit."""
        with self._lock:
            return self._state.limit_refusals

    @property
    def broadcasts_refused(self) -> int:
        """RTU broadcast requests (device id 0) received and refused."""
        with self._lock:
            return self._state.broadcasts_refused

    def delivered_in_u(self, minutes: int) -> float:
        """Insulin delivered in the last ``minutes`` simulated minutes (at most a day), U."""
        with self._lock:
            return self._state.delivered_in_u(minutes)

    @staticmethod
    def respond(response: ModbusPDU) -> ModbusPDU:
        """Correct pymodbus's answer to an undecodable request of an implemented function.

        pymodbus 3.16 answers a request it cannot decode with 01 ILLEGAL FUNCTION, also when
        the function is known and only the quantity or byte count is wrong (e.g. reading 126
        registers); the Modbus spec and ``DEVICES.md`` want 03 ILLEGAL DATA VALUE there.
        """
        if (
            isinstance(response, ExceptionResponse)
            and response.exception_code == ExcCodes.ILLEGAL_FUNCTION
            and response.function_code & 0x7F in _FUNCTIONS
        ):
            response.exception_code = ExcCodes.ILLEGAL_VALUE
        return response

    # -- servers -----------------------------------------------------------------------------
    def _hooks(self, *, framing: Framing, line: SerialLine | None) -> WireHooks:
        rtu = framing == "rtu"
        return WireHooks(
            self.faults,
            framing=framing,
            line=line,
            screen=lambda request: self.screen(request, rtu=rtu),
            respond=self.respond,
        )

    async def open_rtu(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: int = 1,
        wire_time: bool = True,
    ) -> ModbusBaseServer:
        """Open a Modbus RTU server on serial ``port`` in the running loop and return it.

        Args:
            port: serial device (e.g. ``PtyPair().a``).
            baudrate: bit/s.
            parity: ``"N"``, ``"E"`` or ``"O"`` (a pty that refuses parity is opened with
                ``"N"``; the timing keeps ``parity``, see
                :func:`twinloop.hw_bridge.wire.usable_parity`).
            bytesize: data bits.
            stopbits: stop bits.
            wire_time: emulate the wire time of frames (:mod:`twinloop.hw_bridge.wire`).

        Raises:
            EmulatorError: the port cannot be opened.

        """
        line = SerialLine(baudrate=baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits)
        hooks = self._hooks(framing="rtu", line=line if wire_time else None)
        server = RtuSerialServer(
            self.sim_device(),
            port=port,
            baudrate=baudrate,
            parity=usable_parity(port, parity),
            bytesize=bytesize,
            stopbits=stopbits,
            broadcast_enable=True,
            silent_s=line.silent_interval_s,
            trace_packet=hooks.trace_packet,
            trace_pdu=cast(Any, hooks.trace_pdu),
            custom_pdu=[StrictWriteSingleCoilRequest],
        )
        await self._listen(server, f"RTU {port}")
        return server

    async def open_tcp(
        self, host: str = "127.0.0.1", *, port: int = 502, tls: ssl.SSLContext | None = None
    ) -> ModbusBaseServer:
        """Open a Modbus TCP (or, with ``tls``, Modbus/TLS) server in the running loop.

        Args:
            host: address to bind (loopback by default).
            port: TCP port; 0 picks a free one (see :func:`server_address`).
            tls: a server-side SSL context (certificate loaded) for Modbus/TLS; requests are
                authorized by the client certificate's role (:attr:`authorization`).

        Raises:
            EmulatorError: the address cannot be bound.

        """
        hooks = self._hooks(framing="tls" if tls else "socket", line=None)
        server: ModbusTcpServer
        common: dict[str, Any] = {
            "address": (host, port),
            "trace_packet": hooks.trace_packet,
            "trace_pdu": hooks.trace_pdu,
            "custom_pdu": [StrictWriteSingleCoilRequest],
        }
        if tls is not None:
            server = RoleTlsServer(
                self.sim_device(), sslctx=tls, authorization=self.authorization, **common
            )
        else:
            server = ModbusTcpServer(self.sim_device(), framer=FramerType.SOCKET, **common)
        await self._listen(server, f"TCP {host}:{port}")
        if port == 0:  # reopen (after a disconnect) on the port that was picked
            server.init_setup_connect_listen(host, server_address(server)[1])
        return server

    async def _listen(self, server: ModbusBaseServer, where: str) -> None:
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise EmulatorError(f"pump: cannot serve on {where}: {exc}") from None
        self.faults.attach(server, asyncio.get_running_loop())
        _log.info("pump (device id %d) serving Modbus on %s", self.device_id, where)

    async def close_server(self, server: ModbusBaseServer) -> None:
        """Stop a server opened by :meth:`open_rtu`/:meth:`open_tcp` (in its loop)."""
        self.faults.detach(server)
        await server.shutdown()
        await asyncio.sleep(0)  # let the transports finish closing

    async def serve_rtu(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: int = 1,
        wire_time: bool = True,
    ) -> None:
        """Serve Modbus RTU on ``port`` until cancelled (arguments of :meth:`open_rtu`)."""
        server = await self.open_rtu(
            port,
            baudrate=baudrate,
            parity=parity,
            bytesize=bytesize,
            stopbits=stopbits,
            wire_time=wire_time,
        )
        try:
            await server.serving
        finally:
            await self.close_server(server)

    async def serve_tcp(
        self, host: str = "127.0.0.1", *, port: int = 502, tls: ssl.SSLContext | None = None
    ) -> None:
        """Serve Modbus TCP (TLS with ``tls``) until cancelled (arguments of :meth:`open_tcp`)."""
        server = await self.open_tcp(host, port=port, tls=tls)
        try:
            await server.serving
        finally:
            await self.close_server(server)

    def start_in_thread(
        self,
        *,
        rtu: str | None = None,
        tcp: tuple[str, int] | None = None,
        tls: ssl.SSLContext | None = None,
        baudrate: int = 115200,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: int = 1,
        wire_time: bool = True,
        timeout_s: float = 5.0,
    ) -> PumpServerThread:
        """Serve in a background thread with its own event loop; returns once listening.

        Args:
            rtu: serial port for a Modbus RTU server (``None``: no RTU).
            tcp: ``(host, port)`` for a Modbus TCP server (TLS with ``tls``); port 0 picks one.
            tls: server SSL context for Modbus/TLS on ``tcp``.
            baudrate: RTU bit/s.
            parity: RTU parity letter.
            bytesize: RTU data bits.
            stopbits: RTU stop bits.
            wire_time: emulate RTU wire time.
            timeout_s: how long to wait for the servers to listen, s.

        Returns:
            The running thread; call :meth:`PumpServerThread.stop` (or use it as a context
            manager).

        Raises:
            EmulatorError: a server could not start (the thread is stopped again).

        """
        if rtu is None and tcp is None:
            raise ValueError("start_in_thread: give rtu=PORT and/or tcp=(HOST, PORT)")
        openers: list[Callable[[], Any]] = []
        if rtu is not None:
            rtu_port = rtu
            openers.append(
                lambda: self.open_rtu(
                    rtu_port,
                    baudrate=baudrate,
                    parity=parity,
                    bytesize=bytesize,
                    stopbits=stopbits,
                    wire_time=wire_time,
                )
            )
        if tcp is not None:
            host, port = tcp
            openers.append(lambda: self.open_tcp(host, port=port, tls=tls))
        thread = PumpServerThread(self, openers)
        thread.start(timeout_s=timeout_s)
        return thread

    def start_rtu(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: int = 1,
        wire_time: bool = True,
    ) -> PumpServerThread:
        """Serve Modbus RTU on ``port`` in a background thread (:meth:`start_in_thread`)."""
        return self.start_in_thread(
            rtu=port,
            baudrate=baudrate,
            parity=parity,
            bytesize=bytesize,
            stopbits=stopbits,
            wire_time=wire_time,
        )

    def start_tcp(
        self, host: str = "127.0.0.1", port: int = 502, *, tls: ssl.SSLContext | None = None
    ) -> PumpServerThread:
        """Serve Modbus TCP (TLS with ``tls``) in a background thread (:meth:`start_in_thread`).

        ``port`` may be given positionally: ``(host, port)`` is one address.
        """
        return self.start_in_thread(tcp=(host, port), tls=tls)


class PumpServerThread(ServerThread):
    """Pump servers in a background thread named ``pump-server`` (see :class:`ServerThread`).

    Created by :meth:`PumpEmulator.start_in_thread`.
    """

    def __init__(self, emulator: PumpEmulator, openers: list[Callable[[], Any]]) -> None:
        super().__init__(emulator, openers, name="pump-server", what="pump servers")


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{field}={value!r} is not allowed: a number in [{low}, {high}]")


def _parse_tcp(tcp: str, bind: str) -> tuple[str, int]:
    host, sep, port = tcp.rpartition(":")
    try:
        return (host if sep else bind), int(port)
    except ValueError:
        raise ValueError(f"tcp={tcp!r} is not allowed: PORT or HOST:PORT") from None


def run_pump(
    *,
    rtu: str | None,
    tcp: str | None,
    patient: str = "adult#001",
    seed: int = 0,
    wall_s_per_sim_min: float = 60.0,
    baudrate: int = 115200,
    parity: str = "E",
    bind: str = "127.0.0.1",
    stop_event: threading.Event | None = None,
) -> None:
    """Run an emulated pump on a new virtual patient until ``stop_event`` is set (or Ctrl-C).

    Args:
        rtu: serial port for Modbus RTU, or ``None``.
        tcp: ``PORT`` or ``HOST:PORT`` for Modbus TCP (``HOST`` defaults to ``bind``), or
            ``None``.
        patient: patient name (e.g. ``adult#001``).
        seed: seed of the patient's meals.
        wall_s_per_sim_min: wall seconds per simulated minute (60 = real time).
        baudrate: RTU bit/s.
        parity: RTU parity letter.
        bind: default address of the TCP server (loopback).
        stop_event: set it from another thread to stop; ``None`` runs until interrupted.

    Raises:
        ValueError: neither ``rtu`` nor ``tcp``, or a malformed ``tcp``.
        EmulatorError: a server could not start.

    """
    if rtu is None and tcp is None:
        raise ValueError("run_pump: give rtu=PORT and/or tcp=PORT")
    address = _parse_tcp(tcp, bind) if tcp is not None else None
    plant = VirtualPatient(patient, seed=seed, wall_s_per_sim_min=wall_s_per_sim_min)
    pump = PumpEmulator(plant)
    stop = stop_event if stop_event is not None else threading.Event()
    with pump.start_in_thread(rtu=rtu, tcp=address, baudrate=baudrate, parity=parity) as servers:
        plant.start()
        _log.info("pump running: rtu=%s tcp=%s", servers.rtu_port, servers.tcp_address)
        try:
            while not stop.wait(0.5):
                if not servers.alive:
                    raise EmulatorError("pump server thread ended unexpectedly")
        except KeyboardInterrupt:
            pass
        finally:
            plant.stop()
            pump.close()
