"""Honest serial timing and switchable wire faults for pymodbus servers (emulated devices).

Two things a pseudo-terminal or a loopback socket does not give an emulated device:

1. **Wire time.** A pty moves bytes instantly whatever the baud rate. :class:`WireHooks` makes an
   RTU server wait, before it processes a request, for the time the request frame takes on the
   wire plus one silent interval (t3.5), and before it sends a response, for the response's own
   wire time. The waits use :func:`precise_sleep` and **block the server's event loop** for a
   few milliseconds (115200 baud: a 8-byte request is 0.76 ms + 1.75 ms; a 31-byte response is
   2.96 ms): acceptable for a one-device emulator, whose real counterpart answers one request at
   a time anyway. :class:`RtuSerialServer` also honours the RTU frame boundary: bytes left in the
   receive buffer are discarded when a silence of at least t3.5 precedes new bytes, so a garbage
   frame cannot wedge the server.
2. **Faults.** :class:`WireFaults` is a thread-safe set of switches (delay, drop, corrupt CRC,
   exception responses, frozen registers, disconnects, ...) applied through the ``trace_packet``
   and ``trace_pdu`` hooks of pymodbus 3.16 servers.

What the pymodbus 3.16 server hooks can do (read in ``pymodbus/transaction/transaction.py`` and
``pymodbus/server/requesthandler.py``, verified by experiment):

- ``trace_packet(sending=True, frame) -> bytes`` runs on each complete response frame just before
  ``transport.write``; returning ``b""`` sends nothing (the client times out) and returning other
  bytes sends those (CRC or byte corruption).
- ``trace_packet(sending=False, buffer) -> bytes`` runs on the whole receive buffer (earlier
  unconsumed bytes + the new chunk) each time bytes arrive, possibly several times per frame; the
  framer's consumed length is then applied to the *original* buffer, so this hook cannot safely
  shorten the input. It is left untouched here.
- ``trace_pdu(sending=False, request) -> pdu`` runs once per decoded request frame; returning
  ``None`` drops the request (not executed, no answer). Returning another PDU makes the server
  execute that one: its ``datastore_update`` coroutine produces the response, which is how
  :func:`refuse` answers with an exception without touching the datastore and how delays
  (``asyncio.sleep``, the loop stays free) and duplicated writes are done.
- ``trace_pdu(sending=True, response) -> pdu`` runs on each response PDU before framing,
  including the ``01 ILLEGAL FUNCTION`` answer pymodbus builds itself for a request it cannot
  decode (also for a known function code with e.g. a quantity out of range, where the Modbus
  spec wants ``03``), which carries function code 0x80: :class:`WireHooks` restores the
  request's function code from the received bytes and lets the device correct the code.
- Hooks run inside the transport's ``data_received``: an exception raised there closes a TCP
  connection, so these hooks never raise (they log and pass the data through).

3. **Role-based authorization** on Modbus/TLS (the Modbus/TCP Security specification):
   :class:`RoleTlsServer` gives every connection its own request handler, which reads the
   client certificate's role (:func:`certificate_role`, extension :data:`MODBUS_ROLE_OID`) after
   the handshake and answers a request the role may not make (:class:`RoleAuthorization`)
   with exception 01, before the device's own hooks see it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from pymodbus.datastore import ModbusServerContext
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import WriteSingleCoilRequest
from pymodbus.server import ModbusBaseServer, ModbusSerialServer, ModbusTlsServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimDevice

_log = logging.getLogger(__name__)

#: Bits of parity per character for each pyserial parity letter.
PARITY_BITS: dict[str, int] = {"N": 0, "E": 1, "O": 1, "M": 1, "S": 1}
#: Above this baud rate the Modbus serial line spec fixes t3.5 instead of computing it, bit/s.
FIXED_TIMING_ABOVE_BAUD = 19200
#: The fixed inter-frame silence t3.5 above 19200 baud, s.
FIXED_SILENT_INTERVAL_S = 1.75e-3
#: The two values a write single coil request (function 5) may carry: on and off.
COIL_ON = 0xFF00
COIL_OFF = 0x0000
#: Modbus function codes that write (single/multiple coils and registers, mask, read/write).
WRITE_FUNCTION_CODES = frozenset({5, 6, 15, 16, 22, 23})
#: Modbus function codes that only read (coils, discrete inputs, holding and input registers).
READ_FUNCTION_CODES = frozenset({1, 2, 3, 4})
#: The Modbus/TCP Security role extension (MB-TCP-Security, Modbus.org 2018): an X.509v3
#: extension of the client certificate whose value is an ASN.1 UTF8String naming the role.
MODBUS_ROLE_OID = "1.3.6.1.4.1.50316.802.1"
#: The roles the emulated devices' TLS servers know, and the function codes each may use:
#: ``operator`` any function, ``monitor`` reads only. A certificate without the role
#: extension, or with a role not listed, gets what ``monitor`` gets.
DEFAULT_ROLES: Mapping[str, frozenset[int]] = {
    "operator": frozenset(range(1, 128)),
    "monitor": READ_FUNCTION_CODES,
}

Framing = Literal["rtu", "socket", "tls"]


def char_time_s(
    baudrate: float, *, bytesize: int = 8, parity: str = "E", stopbits: float = 1
) -> float:
    """Return the time one character takes on a UART line.

    A character is 1 start bit + ``bytesize`` data bits + 1 parity bit (none with ``"N"``) +
    ``stopbits`` stop bits; 115200 baud 8E1 is 11 bits = 95.5 µs.

    Args:
        baudrate: line speed, bit/s (> 0).
        bytesize: data bits per character, 5–8.
        parity: ``"N"``, ``"E"``, ``"O"``, ``"M"`` or ``"S"`` (pyserial letters).
        stopbits: stop bits, 1, 1.5 or 2.

    Returns:
        Seconds per character.

    Raises:
        ValueError: an argument outside what is allowed (the message names it).

    """
    if isinstance(baudrate, bool) or not (math.isfinite(baudrate) and baudrate > 0):
        raise ValueError(f"baudrate={baudrate!r} is not allowed: a finite number > 0 bit/s")
    if bytesize not in (5, 6, 7, 8):
        raise ValueError(f"bytesize={bytesize!r} is not allowed: 5, 6, 7 or 8 data bits")
    if parity not in PARITY_BITS:
        raise ValueError(f"parity={parity!r} is not allowed: one of {sorted(PARITY_BITS)}")
    if stopbits not in (1, 1.5, 2):
        raise ValueError(f"stopbits={stopbits!r} is not allowed: 1, 1.5 or 2")
    return (1 + bytesize + PARITY_BITS[parity] + stopbits) / float(baudrate)


def rtu_silent_interval_s(
    baudrate: float, *, bytesize: int = 8, parity: str = "E", stopbits: float = 1
) -> float:
    """Return the RTU inter-frame silence t3.5.

    3.5 character times up to 19200 baud; above 19200 baud the Modbus serial line spec (V1.02,
    §2.5.1.1) fixes it at 1.75 ms.

    Args:
        baudrate: line speed, bit/s.
        bytesize: data bits per character.
        parity: pyserial parity letter.
        stopbits: stop bits.

    Returns:
        Seconds of silence that end a frame.

    """
    char_s = char_time_s(baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits)
    if baudrate > FIXED_TIMING_ABOVE_BAUD:
        return FIXED_SILENT_INTERVAL_S
    return 3.5 * char_s


def rtu_frame_time_s(
    n_bytes: int, baudrate: float, *, bytesize: int = 8, parity: str = "E", stopbits: float = 1
) -> float:
    """Return the time a frame of ``n_bytes`` characters takes on the wire (no silence), s."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes={n_bytes!r} is not allowed: >= 0")
    return n_bytes * char_time_s(baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits)


def rtu_cycle_wire_time_s(
    request_bytes: int,
    response_bytes: int,
    baudrate: float,
    *,
    bytesize: int = 8,
    parity: str = "E",
    stopbits: float = 1,
) -> float:
    """Return the wire time of one request/response cycle: both frames + a t3.5 after each, s.

    This is the lower bound of a poll cycle on a real line; the device's processing time and the
    host's scheduling come on top. Example: reading 13 input registers at 115200 8E1 is an
    8-byte request and a 31-byte response: 39 × 95.5 µs + 2 × 1.75 ms = 7.22 ms.
    """
    line = {"bytesize": bytesize, "parity": parity, "stopbits": stopbits}
    return (
        rtu_frame_time_s(request_bytes, baudrate, **line)  # type: ignore[arg-type]
        + rtu_frame_time_s(response_bytes, baudrate, **line)  # type: ignore[arg-type]
        + 2.0 * rtu_silent_interval_s(baudrate, **line)  # type: ignore[arg-type]
    )


def precise_sleep(seconds: float, *, spin_s: float = 1e-3) -> None:
    """Sleep ``seconds`` accurately: ``time.sleep`` until ``spin_s`` before, then spin.

    The last ``spin_s`` seconds busy-wait on :func:`time.perf_counter` (one CPU core at 100 %
    for at most that long), which gives tens of microseconds of accuracy where ``time.sleep``
    alone overshoots by 50 µs–1 ms. Non-positive durations return at once.

    Args:
        seconds: how long to wait, s.
        spin_s: how much of the end to busy-wait, s (>= 0).

    """
    if not seconds > 0:
        return
    deadline = time.perf_counter() + seconds
    coarse = seconds - spin_s
    if coarse > 0:
        time.sleep(coarse)
    while time.perf_counter() < deadline:
        pass


@dataclasses.dataclass(frozen=True, slots=True)
class SerialLine:
    """Settings of an RTU line, for wire-time emulation.

    Attributes:
        baudrate: bit/s.
        bytesize: data bits per character.
        parity: pyserial parity letter (``"N"``, ``"E"``, ``"O"``, ...).
        stopbits: stop bits.

    """

    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "E"
    stopbits: float = 1

    def __post_init__(self) -> None:
        char_time_s(
            self.baudrate, bytesize=self.bytesize, parity=self.parity, stopbits=self.stopbits
        )

    @property
    def char_time_s(self) -> float:
        """Seconds per character."""
        return char_time_s(
            self.baudrate, bytesize=self.bytesize, parity=self.parity, stopbits=self.stopbits
        )

    @property
    def silent_interval_s(self) -> float:
        """The inter-frame silence t3.5, s."""
        return rtu_silent_interval_s(
            self.baudrate, bytesize=self.bytesize, parity=self.parity, stopbits=self.stopbits
        )

    def frame_time_s(self, n_bytes: int) -> float:
        """Wire time of ``n_bytes`` characters, s."""
        return n_bytes * self.char_time_s


def usable_parity(port: str, parity: str) -> str:
    """Return the parity to ask the OS for when opening ``port``.

    A pseudo-terminal carries no parity bits, and some kernels (sandboxes) refuse ``PARENB`` on
    a pty with ``EINVAL``. For a pty that refuses the requested parity this returns ``"N"``:
    nothing on the "wire" changes, and the wire-time emulation keeps using the requested
    framing. Real serial ports, and ptys that accept the setting, get ``parity`` back.

    Args:
        port: serial device path (e.g. one end of :class:`twinloop.hw_bridge.pty.PtyPair`).
        parity: the requested pyserial parity letter.

    Returns:
        ``parity`` or ``"N"``.

    """
    if parity == "N" or not os.path.realpath(port).startswith("/dev/pts/"):
        return parity
    import termios

    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return parity  # let the real open report the problem
    try:
        attrs = termios.tcgetattr(fd)
        trial = list(attrs)
        trial[2] |= termios.PARENB | (termios.PARODD if parity == "O" else 0)
        termios.tcsetattr(fd, termios.TCSANOW, trial)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        return "N"
    finally:
        os.close(fd)
    return parity


class _StandIn(ModbusPDU):
    """Stands in for a received request: refuses it, delays it, or executes it twice.

    Returned from a ``trace_pdu(False, request)`` hook; the server calls its
    :meth:`datastore_update` instead of the request's. The response keeps the request's
    function code, device id and transaction id.
    """

    def __init__(
        self,
        request: ModbusPDU,
        *,
        exception_code: int = 0,
        delay_s: float = 0.0,
        repeat: int = 1,
    ) -> None:
        super().__init__(dev_id=request.dev_id, transaction_id=request.transaction_id)
        self.function_code = request.function_code
        self.address = request.address
        self.count = request.count
        self.request = request
        self.refusal = int(exception_code)
        self.delay_s = float(delay_s)
        self.repeat = max(1, int(repeat))

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        """Produce the response: after ``delay_s``, the refusal or the request's own answer."""
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if self.refusal:
            return ExceptionResponse(self.function_code, self.refusal, device_id=device_id)
        response = await self.request.datastore_update(context, device_id)
        for _ in range(self.repeat - 1):  # a retry that arrives after the first was executed
            response = await self.request.datastore_update(context, device_id)
        return response


class StrictWriteSingleCoilRequest(WriteSingleCoilRequest):
    """Write single coil (function 5) that refuses a value other than 0xFF00 (on) and 0x0000.

    The Modbus application protocol (6.5) makes any other value illegal, not to be applied;
    pymodbus 3.16 decodes every non-zero value as "on" (an emulated pump suspended on
    ``0x1234`` and echoed ``0xFF00``). Decoding such a request fails here, so the server answers
    the exception pymodbus gives an undecodable request (a device's ``respond`` hook turns its
    01 into 03 ILLEGAL DATA VALUE). Give it to a server as ``custom_pdu=[...]``.
    """

    def decode(self, data: bytes) -> None:
        """Decode address and value; ``ValueError`` for a value that is neither on nor off."""
        value = int.from_bytes(data[2:4], "big") if len(data) >= 4 else None
        if value not in (COIL_ON, COIL_OFF):
            raise ValueError(f"write single coil: value {value!r} is not 0xFF00 or 0x0000")
        super().decode(data)


def refuse(request: ModbusPDU, code: int) -> ModbusPDU:
    """Return a stand-in that answers ``request`` with Modbus exception ``code``, not executing it.

    For use in a ``trace_pdu(False, request)`` hook (see the module docstring).
    """
    if isinstance(request, _StandIn):
        request = request.request
    return _StandIn(request, exception_code=code)


@dataclasses.dataclass(frozen=True, slots=True)
class _Switches:
    delay_s: float = 0.0
    drop: bool = False
    drop_response: bool = False
    corrupt_crc: bool = False
    corrupt_bytes: bool = False
    exception_code: int | None = None
    freeze: bool = False
    duplicate_write: bool = False
    probability: float = 1.0


_FAULT_NAMES = tuple(f.name for f in dataclasses.fields(_Switches))


class WireFaults:
    """A thread-safe set of switchable wire faults for the servers of one emulated device.

    Switch a fault on by assigning its attribute (from any thread); :meth:`clear` switches
    everything off. Per-request faults hit each request with :attr:`probability` (drawn from a
    ``random.Random(seed)``, so a campaign is reproducible).

    Attributes:
        delay_s: extra latency before each answer, s (``asyncio.sleep``: the server's loop stays
            free; with ``delay_s`` > the client's timeout the client times out and the late
            answer is discarded by it).
        drop: requests are lost: not executed, no answer (the client times out).
        drop_response: requests are executed but the answer is lost (the client times out; a
            write did happen).
        corrupt_crc: RTU only: the two CRC bytes of each response are inverted (the client
            rejects the frame); no effect on Modbus TCP, which has no CRC.
        corrupt_bytes: one random byte of each response frame is XOR-ed with a random non-zero
            mask (seeded).
        exception_code: when not ``None``, every request is answered with this Modbus exception
            code (1–255) and not executed.
        freeze: the device's registers stop changing (reads return the last values). Only a
            device implements this (see :class:`twinloop.hw_bridge.emulators.pump.PumpEmulator`);
            the hooks ignore it.
        duplicate_write: each write request is executed twice, as when a master's retry arrives
            after the first copy was executed, and answered with the second execution's
            response (e.g. ``06 BUSY`` for a duplicated bolus). Hook for duplicate-delivery
            scenarios; reads are unaffected.
        probability: chance in [0, 1] that a switched-on per-request fault hits a request.
        counts: how many times each fault hit (``{"drop": 3, ...}``), for reports.

    Args:
        seed: seed of the random draws (probability, corrupted byte position and mask).

    """

    def __init__(self, *, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._switches = _Switches()
        self._rng = random.Random(seed)
        self._counts: dict[str, int] = {}
        self._links: list[_Link] = []

    # -- switches ---------------------------------------------------------------------------
    def _get(self, name: str) -> Any:
        with self._lock:
            return getattr(self._switches, name)

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._switches = dataclasses.replace(self._switches, **changes)

    @property
    def delay_s(self) -> float:
        """Extra latency before each answer, s."""
        value: float = self._get("delay_s")
        return value

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._set(delay_s=_check_switch("delay_s", value))

    @property
    def drop(self) -> bool:
        """Requests are lost: not executed, no answer."""
        value: bool = self._get("drop")
        return value

    @drop.setter
    def drop(self, value: bool) -> None:
        self._set(drop=_check_switch("drop", value))

    @property
    def drop_response(self) -> bool:
        """Requests are executed, their answers lost."""
        value: bool = self._get("drop_response")
        return value

    @drop_response.setter
    def drop_response(self, value: bool) -> None:
        self._set(drop_response=_check_switch("drop_response", value))

    @property
    def corrupt_crc(self) -> bool:
        """RTU responses go out with inverted CRC bytes."""
        value: bool = self._get("corrupt_crc")
        return value

    @corrupt_crc.setter
    def corrupt_crc(self, value: bool) -> None:
        self._set(corrupt_crc=_check_switch("corrupt_crc", value))

    @property
    def corrupt_bytes(self) -> bool:
        """One random byte of each response is flipped (seeded)."""
        value: bool = self._get("corrupt_bytes")
        return value

    @corrupt_bytes.setter
    def corrupt_bytes(self, value: bool) -> None:
        self._set(corrupt_bytes=_check_switch("corrupt_bytes", value))

    @property
    def exception_code(self) -> int | None:
        """Every request is answered with this Modbus exception code."""
        value: int | None = self._get("exception_code")
        return value

    @exception_code.setter
    def exception_code(self, value: int | None) -> None:
        self._set(exception_code=_check_switch("exception_code", value))

    @property
    def freeze(self) -> bool:
        """The device's registers stop changing (implemented by the device)."""
        value: bool = self._get("freeze")
        return value

    @freeze.setter
    def freeze(self, value: bool) -> None:
        self._set(freeze=_check_switch("freeze", value))

    @property
    def duplicate_write(self) -> bool:
        """Each write request is executed twice."""
        value: bool = self._get("duplicate_write")
        return value

    @duplicate_write.setter
    def duplicate_write(self, value: bool) -> None:
        self._set(duplicate_write=_check_switch("duplicate_write", value))

    @property
    def probability(self) -> float:
        """Chance in [0, 1] that a switched-on per-request fault hits."""
        value: float = self._get("probability")
        return value

    @probability.setter
    def probability(self, value: float) -> None:
        self._set(probability=_check_switch("probability", value))

    def set(self, **switches: Any) -> None:
        """Set several switches at once (atomically), e.g. ``set(drop=True, probability=0.1)``.

        Raises:
            ValueError: an unknown switch name or an invalid value.

        """
        unknown = sorted(set(switches) - set(_FAULT_NAMES))
        if unknown:
            raise ValueError(f"unknown wire fault(s) {unknown}: allowed {list(_FAULT_NAMES)}")
        checked = {name: _check_switch(name, value) for name, value in switches.items()}
        self._set(**checked)

    def clear(self) -> None:
        """Switch every fault off (``probability`` back to 1)."""
        with self._lock:
            self._switches = _Switches()

    @property
    def counts(self) -> dict[str, int]:
        """How many times each fault hit so far."""
        with self._lock:
            return dict(self._counts)

    def snapshot(self) -> dict[str, Any]:
        """The current switches as a dict (for logs and reports)."""
        with self._lock:
            return dataclasses.asdict(self._switches)

    def _hit(self, name: str) -> bool:
        """Draw whether an enabled per-request fault hits this time, and count it."""
        with self._lock:
            if not getattr(self._switches, name):
                return False
            p = self._switches.probability
            if p < 1.0 and self._rng.random() >= p:
                return False
            self._counts[name] = self._counts.get(name, 0) + 1
            return True

    def _draw_corruption(self, n: int) -> tuple[int, int]:
        with self._lock:
            return self._rng.randrange(n), self._rng.randrange(1, 256)

    # -- disconnect -------------------------------------------------------------------------
    def attach(self, server: ModbusBaseServer, loop: asyncio.AbstractEventLoop) -> None:
        """Register a running server (in its event loop) for :meth:`disconnect`."""
        with self._lock:
            self._links.append(_Link(server, loop))

    def detach(self, server: ModbusBaseServer) -> None:
        """Forget a server; cancels its pending reopen. Call from the server's own loop."""
        with self._lock:
            links = [link for link in self._links if link.server is server]
            self._links = [link for link in self._links if link.server is not server]
        for link in links:
            link.cancel()

    def disconnect(self, *, down_s: float = 1.0, wait_s: float = 2.0) -> None:
        """Pull the link: close every attached server's connections and port for ``down_s``.

        Modbus TCP/TLS: the client connections are closed and the listening socket too
        (connections are refused) until it reopens on the same port after ``down_s``. RTU: the
        serial port is closed (the client's requests go unanswered) and reopened after
        ``down_s``. ``down_s=math.inf`` leaves it down until the server stops.

        Args:
            down_s: how long the port stays closed, s.
            wait_s: how long to wait for the close to have happened, s (not waited when called
                from a server's own event loop).

        """
        if not down_s >= 0:
            raise ValueError(f"down_s={down_s!r} is not allowed: >= 0 s")
        with self._lock:
            links = list(self._links)
            self._counts["disconnect"] = self._counts.get("disconnect", 0) + 1
        for link in links:
            link.pull(down_s, wait_s)


def _check_switch(name: str, value: Any) -> Any:
    if name == "delay_s":
        if isinstance(value, bool) or not (
            isinstance(value, int | float) and math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"delay_s={value!r} is not allowed: a finite number >= 0 s")
        return float(value)
    if name == "probability":
        if isinstance(value, bool) or not (isinstance(value, int | float) and 0 <= value <= 1):
            raise ValueError(f"probability={value!r} is not allowed: a number in [0, 1]")
        return float(value)
    if name == "exception_code":
        if value is None:
            return None
        if isinstance(value, bool) or not (isinstance(value, int) and 1 <= int(value) <= 255):
            raise ValueError(f"exception_code={value!r} is not allowed: None or 1..255")
        return int(value)
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed: True or False")
    return value


class _Link:
    """One server attached to a :class:`WireFaults`, for disconnects."""

    def __init__(self, server: ModbusBaseServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.reopen: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        if self.reopen is not None:
            self.reopen.cancel()
            self.reopen = None

    def pull(self, down_s: float, wait_s: float) -> None:
        closed = threading.Event()

        def close_now() -> None:
            try:
                self._close()
            finally:
                closed.set()
            if math.isfinite(down_s):
                self.cancel()
                self.reopen = self.loop.create_task(self._reopen(down_s))

        try:
            self.loop.call_soon_threadsafe(close_now)
        except RuntimeError:  # the loop is closed: nothing to pull
            return
        try:
            in_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop = False
        if not in_loop:
            closed.wait(wait_s)

    def _close(self) -> None:
        server = self.server
        for handler in list(server.active_connections.values()):
            handler.close()
        transport = server.transport
        if transport is not None:
            if isinstance(transport, asyncio.AbstractServer):
                transport.close()
            server.transport = None  # type: ignore[assignment]

    async def _reopen(self, down_s: float) -> None:
        await asyncio.sleep(down_s)
        self.reopen = None
        reopen = self.server.transport is None and not self.server.serving.done()
        if reopen and not await self.server.listen():
            _log.warning("could not reopen %s after a disconnect", self.server)


class WireHooks:
    """The ``trace_packet``/``trace_pdu`` hooks of one pymodbus server.

    Applies :class:`WireFaults`, the device's own request screening, and (RTU with ``line``)
    the wire-time emulation described in the module docstring.

    Args:
        faults: the switches (shared by every server of the device).
        framing: ``"rtu"`` (CRC faults apply), ``"socket"`` or ``"tls"``.
        line: RTU line settings for wire-time emulation; ``None`` disables it.
        screen: the device's check of a decoded request, ``screen(request) -> pdu | None``:
            return the request to execute it, a :func:`refuse` stand-in to answer with an
            exception, or ``None`` to ignore it silently (e.g. another RTU device id). Called
            in the server's event loop; must not raise.
        respond: the device's look at each response before it is framed,
            ``respond(response) -> response`` (e.g. to correct the exception code pymodbus
            picks for a request it could not decode). Same rules as ``screen``.

    """

    def __init__(
        self,
        faults: WireFaults,
        *,
        framing: Framing,
        line: SerialLine | None = None,
        screen: Callable[[ModbusPDU], ModbusPDU | None] | None = None,
        respond: Callable[[ModbusPDU], ModbusPDU] | None = None,
    ) -> None:
        self.faults = faults
        self.framing = framing
        self.line = line
        self.screen = screen
        self.respond = respond
        self._received = b""  # the receive buffer last seen (same call stack as its answer)

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Fault and time each response frame (pymodbus ``trace_packet``); pass received bytes."""
        if not sending:
            self._received = data
            return data
        if not data:
            return data
        try:
            faults = self.faults
            if faults._hit("drop_response"):
                return b""
            if self.framing == "rtu" and len(data) >= 2 and faults._hit("corrupt_crc"):
                data = data[:-2] + bytes(b ^ 0xFF for b in data[-2:])
            if faults._hit("corrupt_bytes"):
                pos, mask = faults._draw_corruption(len(data))
                data = data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]
            if self.line is not None:
                precise_sleep(self.line.frame_time_s(len(data)))
        except Exception:  # a hook must never break the transport
            _log.exception("trace_packet hook failed; frame sent unchanged")
        return data

    def trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        """Screen and fault each received request (pymodbus ``trace_pdu``); pass responses."""
        try:
            if sending:
                self._restore_function_code(pdu)
                return self.respond(pdu) if self.respond is not None else pdu
            return self._request(pdu)
        except Exception:
            _log.exception("trace_pdu hook failed; %s passed unchanged", pdu)
            return pdu

    def _restore_function_code(self, response: ModbusPDU) -> None:
        """Give pymodbus's answer to an undecodable request the request's function code.

        pymodbus 3.16 answers a frame it cannot decode with function code 0x80 (the code is
        lost in its decoder); the answer is built while the received bytes are being handled,
        so they are the last buffer :meth:`trace_packet` saw.
        """
        if not (isinstance(response, ExceptionResponse) and response.function_code == 0x80):
            return
        at = 1 if self.framing == "rtu" else 7  # after the device id / the MBAP header
        if len(self._received) > at and 0 < self._received[at] < 0x80:
            response.function_code = self._received[at] | 0x80

    def _request(self, request: ModbusPDU) -> ModbusPDU | None:
        faults = self.faults
        if self.line is not None:
            precise_sleep(
                self.line.frame_time_s(_rtu_frame_len(request)) + self.line.silent_interval_s
            )
        screened = self.screen(request) if self.screen is not None else request
        if screened is None:
            return None  # not for this device: a real RTU device stays silent
        if faults._hit("drop"):
            return None
        code = faults.exception_code
        if code is not None and faults._hit("exception_code"):
            return refuse(request, code)
        delay = faults.delay_s
        delayed = delay > 0 and faults._hit("delay_s")
        twice = request.function_code in WRITE_FUNCTION_CODES and faults._hit("duplicate_write")
        if not (delayed or twice):
            return screened
        if isinstance(screened, _StandIn):
            screened.delay_s = delay if delayed else 0.0
            screened.repeat = 2 if twice and not screened.refusal else 1
            return screened
        return _StandIn(screened, delay_s=delay if delayed else 0.0, repeat=2 if twice else 1)


def _rtu_frame_len(pdu: ModbusPDU) -> int:
    """Length of the RTU frame that carried ``pdu``: id + function code + data + CRC, bytes."""
    try:
        return 4 + len(pdu.encode())
    except Exception:  # an odd request that does not re-encode: assume the minimum read frame
        return 8


class _RtuRequestHandler(ServerRequestHandler):
    """A server connection that honours the RTU frame boundary (a silence of at least t3.5)."""

    def __init__(
        self,
        owner: ModbusBaseServer,
        trace_packet: Callable[[bool, bytes], bytes] | None,
        trace_pdu: Callable[[bool, ModbusPDU], ModbusPDU] | None,
        trace_connect: Callable[[bool], None] | None,
        *,
        silent_s: float,
    ) -> None:
        super().__init__(owner, trace_packet, trace_pdu, trace_connect)
        self._silent_s = silent_s
        self._last_rx = -math.inf

    def datagram_received(self, data: bytes, addr: tuple[Any, ...] | None) -> None:
        """Drop an unfinished frame when a silence of at least t3.5 preceded these bytes."""
        now = time.perf_counter()
        if self.recv_buffer and now - self._last_rx >= self._silent_s:
            _log.debug("RTU: %d stale byte(s) dropped after a silence", len(self.recv_buffer))
            self.recv_buffer = b""
        self._last_rx = now
        super().datagram_received(data, addr)


class RtuSerialServer(ModbusSerialServer):
    """A pymodbus RTU serial server that resynchronises on the t3.5 silence.

    pymodbus 3.16's RTU framer finds frames by CRC only: after a garbled or truncated frame it
    can keep waiting for bytes that will never come, and the next valid request is appended
    to the garbage. This server discards an unfinished frame when at least ``t3.5`` of silence
    (measured between reads, so at best to the loop's resolution) precedes new bytes, as an RTU
    device does. Accepts every keyword of :class:`pymodbus.server.ModbusSerialServer` plus
    ``silent_s`` (default: t3.5 of the line settings).
    """

    def __init__(
        self,
        context: SimDevice | list[SimDevice],
        *,
        silent_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("framer", FramerType.RTU)
        super().__init__(context, **kwargs)
        params = self.comm_params
        self.silent_s = (
            silent_s
            if silent_s is not None
            else rtu_silent_interval_s(
                params.baudrate,
                bytesize=params.bytesize,
                parity=params.parity or "N",
                stopbits=params.stopbits,
            )
        )

    def callback_new_connection(self) -> ServerRequestHandler:
        """Open the port's connection handler (pymodbus calls this when the port opens)."""
        return _RtuRequestHandler(
            self, self.trace_packet, self.trace_pdu, self.trace_connect, silent_s=self.silent_s
        )


# -- Modbus/TCP Security: role-based client authorization -------------------------------------


def _der_utf8string(data: bytes) -> str | None:
    """The text of a DER-encoded ASN.1 UTF8String (tag 0x0C), or ``None`` if it is not one."""
    if len(data) < 2 or data[0] != 0x0C:
        return None
    length, at = data[1], 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes hold the length
        width = length & 0x7F
        if width == 0 or width > 4 or len(data) < 2 + width:
            return None
        length, at = int.from_bytes(data[2 : 2 + width], "big"), 2 + width
    if len(data) != at + length:
        return None
    try:
        return data[at:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def certificate_role(certificate_der: bytes | None) -> str | None:
    """The Modbus role a client certificate carries (:data:`MODBUS_ROLE_OID`), or ``None``.

    ``None`` for no certificate, no role extension, or an extension that is not a DER
    UTF8String.
    """
    if not certificate_der:
        return None
    from cryptography import x509

    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
        extension = certificate.extensions.get_extension_for_oid(
            x509.ObjectIdentifier(MODBUS_ROLE_OID)
        )
    except (ValueError, x509.ExtensionNotFound):
        return None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    return _der_utf8string(value.value)


class RoleAuthorization:
    """Which function codes each client role may use (MB-TCP-Security role-based authorization).

    Args:
        roles: role → function codes allowed (default :data:`DEFAULT_ROLES`).
        default: function codes of a client without a known role (default: reads only).

    Attributes:
        refusals: requests refused so far (each logged at WARNING).

    """

    def __init__(
        self,
        roles: Mapping[str, Iterable[int]] | None = None,
        *,
        default: Iterable[int] = READ_FUNCTION_CODES,
    ) -> None:
        table = DEFAULT_ROLES if roles is None else roles
        self.roles = {str(role): frozenset(codes) for role, codes in table.items()}
        self.default = frozenset(default)
        self.refusals = 0
        self._lock = threading.Lock()

    def allows(self, role: str | None, function_code: int) -> bool:
        """Whether a client with ``role`` may use ``function_code``."""
        codes = self.roles.get(role, self.default) if role is not None else self.default
        return function_code in codes

    def refused(self, role: str | None, request: ModbusPDU, peer: object) -> None:
        """Count and log a refused request."""
        with self._lock:
            self.refusals += 1
        _log.warning(
            "Modbus/TLS: function %d from %s refused: role %r may not use it (exception 01)",
            request.function_code,
            peer,
            role,
        )


class _RoleRequestHandler(ServerRequestHandler):
    """One Modbus/TLS connection: its client's role decides which requests are executed."""

    def __init__(
        self,
        owner: RoleTlsServer,
        trace_packet: Callable[[bool, bytes], bytes] | None,
        trace_pdu: Callable[[bool, ModbusPDU], ModbusPDU] | None,
        trace_connect: Callable[[bool], None] | None,
    ) -> None:
        self._inner_pdu = trace_pdu
        self._authorization = owner.authorization
        self.role: str | None = None
        self._peer: object = None
        self._refused: set[int] = set()
        super().__init__(owner, trace_packet, self._authorize, trace_connect)

    def callback_connected(self) -> None:
        """Read the role from the client certificate once the TLS handshake is done."""
        super().callback_connected()
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.role = certificate_role(der)
        self._peer = self.transport.get_extra_info("peername") if self.transport else None
        _log.info("Modbus/TLS client %s connected with role %r", self._peer, self.role)

    def _authorize(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        try:
            if sending:
                out = self._inner_pdu(True, pdu) if self._inner_pdu is not None else pdu
                if isinstance(out, ExceptionResponse) and out.transaction_id in self._refused:
                    self._refused.discard(out.transaction_id)
                    out.exception_code = 0x01  # a device's own correction must not hide it
                return out
            if not self._authorization.allows(self.role, pdu.function_code):
                self._authorization.refused(self.role, pdu, self._peer)
                self._refused.add(pdu.transaction_id)
                return refuse(pdu, 0x01)
        except Exception:  # a hook must never break the transport
            _log.exception("role authorization hook failed; %s refused", pdu)
            return refuse(pdu, 0x01)
        return self._inner_pdu(False, pdu) if self._inner_pdu is not None else pdu


class RoleTlsServer(ModbusTlsServer):
    """A pymodbus Modbus/TLS server with role-based client authorization (MB-TCP-Security).

    The role is read from each client certificate's :data:`MODBUS_ROLE_OID` extension after
    the handshake; a request whose function code the role may not use is answered with
    exception 01 (illegal function, the specification's authorization failure) and not
    executed, before the device sees it. Accepts every keyword of
    :class:`pymodbus.server.ModbusTlsServer` plus ``authorization``
    (:class:`RoleAuthorization`; default: :data:`DEFAULT_ROLES`). The server's SSL context
    should require client certificates (``verify_mode = CERT_REQUIRED``).
    """

    def __init__(
        self,
        context: SimDevice | list[SimDevice],
        *,
        authorization: RoleAuthorization | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(context, **kwargs)
        self.authorization = authorization if authorization is not None else RoleAuthorization()

    def callback_new_connection(self) -> ServerRequestHandler:
        """A connection handler that authorizes every request by its client's role."""
        return _RoleRequestHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)
