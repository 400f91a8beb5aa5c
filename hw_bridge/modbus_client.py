"""Profile-driven synchronous Modbus client (RTU, TCP, TLS): checked writes, retries, tracing.

:class:`ModbusDevice` reads and writes registers *by name* through a
:class:`~twinloop.hw_bridge.profile.DeviceProfile`: it groups reads into as few requests as the map
allows, scales and decodes values into engineering units, and refuses (before anything reaches
the wire) every write the profile forbids. It is synchronous on purpose: the HIL rig calls it
from its own real-time thread. One instance may be shared between threads (calls are
serialised by a lock).

Errors follow pymodbus's split: a fault *reported by the device* (a Modbus exception code) is a
value for writes (:meth:`ModbusDevice.write` returns the code) and a
:class:`~twinloop.hw_bridge.errors.DeviceException` for reads; a fault of the *transport* (timeout,
disconnect, garbled or mismatched answer) is retried ``transport.retries`` times with an
exponential reconnect back-off and then raised as
:class:`~twinloop.hw_bridge.errors.CommunicationError`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from pymodbus.client import ModbusSerialClient, ModbusTcpClient, ModbusTlsClient
from pymodbus.client.base import ModbusBaseSyncClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from twinloop.hw_bridge.errors import (
    CommunicationError,
    DeviceException,
    ProfileError,
    os_error_words,
)
from twinloop.hw_bridge.profile import (
    DeviceProfile,
    Register,
    Transport,
    check_write,
    decode,
    encode,
)

__all__ = [
    "MAX_READ_BITS",
    "MAX_READ_WORDS",
    "FrameTrace",
    "ModbusDevice",
    "ReadBlock",
    "WriteResult",
    "exception_name",
    "plan_reads",
    "tls_context",
]

#: Most registers one read request may carry (Modbus: 125 words).
MAX_READ_WORDS: Final = 125
#: Most bits one read request may carry (Modbus: 2000 coils/inputs).
MAX_READ_BITS: Final = 2000
#: Frames kept in :attr:`ModbusDevice.frames` when ``transport.trace`` is true.
FRAME_RING_SIZE: Final = 1000

#: ``trace(sending, frame)``: ``sending`` is True for a frame sent to the device, False for bytes
#: received (the receive buffer as it grows, so a frame that arrives in pieces is seen more than
#: once); ``frame`` is the raw ADU (RTU: with address and CRC; TCP/TLS: with the MBAP header).
#: Called in the calling thread, inside the request; it must not block.
FrameTrace = Callable[[bool, bytes], None]
#: ``None``: the device accepted the write; an ``int``: the Modbus exception code it answered.
WriteResult = int | None

_LOG = logging.getLogger(__name__)
_READ_FUNCTION: Final = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_EXCEPTION_NAMES: Final = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL DATA ADDRESS",
    3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER DEVICE BUSY",
    8: "MEMORY PARITY ERROR",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET FAILED TO RESPOND",
}
#: What a pymodbus sync client raises for a transport fault (pymodbus's own hierarchy, socket and
#: TLS errors); the retry loop turns them into ``CommunicationError``.
_TRANSPORT_ERRORS: Final = (ModbusException, OSError)


def exception_name(code: int) -> str:
    """The Modbus name of exception ``code`` (e.g. 2 → ``ILLEGAL DATA ADDRESS``)."""
    return _EXCEPTION_NAMES.get(code, f"EXCEPTION {code}")


@dataclass(frozen=True)
class ReadBlock:
    """One read request: ``count`` words or bits of ``table`` from ``address``.

    Attributes:
        table: ``holding``, ``input``, ``coil`` or ``discrete``.
        address: first protocol address.
        count: words (register tables) or bits (bit tables).
        registers: the registers decoded from the answer, by address.

    """

    table: str
    address: int
    count: int
    registers: tuple[Register, ...]


def plan_reads(
    registers: Iterable[Register], *, mapped: Iterable[Register] = ()
) -> list[ReadBlock]:
    """Group registers into as few read requests as possible.

    Registers of one table are merged while they are contiguous, or separated only by
    addresses that ``mapped`` (the profile's readable registers) covers — never across an
    unmapped address, which a device may refuse — and the request stays within 125 words /
    2000 bits. The registers in the gaps are read and discarded: one request of 13 words
    costs far less than three of a few.

    Returns:
        Blocks ordered by table (holding, input, coil, discrete) then address.

    """
    covered: dict[str, set[int]] = {}
    for r in mapped:
        if r.readable:
            covered.setdefault(r.table, set()).update(range(r.address, r.end))
    unique = {(r.table, r.address, r.name): r for r in registers}
    blocks: list[ReadBlock] = []
    for table in ("holding", "input", "coil", "discrete"):
        in_table = sorted((r for r in unique.values() if r.table == table), key=lambda r: r.address)
        limit = MAX_READ_BITS if table in ("coil", "discrete") else MAX_READ_WORDS
        current: list[Register] = []
        for reg in in_table:
            gap = range(current[-1].end, reg.address) if current else range(0)
            if current and (
                reg.address >= current[-1].end
                and all(a in covered.get(table, ()) for a in gap)
                and reg.end - current[0].address <= limit
            ):
                current.append(reg)
                continue
            if current:
                blocks.append(_block(table, current))
            current = [reg]
        if current:
            blocks.append(_block(table, current))
    return blocks


def _block(table: str, registers: Sequence[Register]) -> ReadBlock:
    start = registers[0].address
    return ReadBlock(table, start, registers[-1].end - start, tuple(registers))


#: Shortest poll interval of the RTU receive loop, seconds.
MIN_RTU_POLL_S = 2e-4


class _RtuClient(ModbusSerialClient):
    """``ModbusSerialClient`` that polls its port every two character times (at least 0.2 ms).

    pymodbus 3.16's sync serial client looks for a response every ``max(4 characters, 1 ms)``
    and returns only once two polls see the same byte count: at 115200 baud that adds 1–2 ms
    to a 3–5 ms transaction. Polling faster keeps the cycle close to the frames' wire time
    (``benchmarks/hil_timing.py`` measures both). Relies on the pinned pymodbus's
    ``_recv_interval``.
    """

    def __init__(self, port: str, **kwargs: Any) -> None:
        super().__init__(port, **kwargs)
        self._recv_interval = max(2 * self._t0, MIN_RTU_POLL_S)


class _TlsClient(ModbusTlsClient):
    """``ModbusTlsClient`` that passes ``server_hostname`` so the server name is verified.

    pymodbus 3.16's sync TLS client wraps the socket without a server name, which a context with
    ``check_hostname`` (the safe default) refuses; this connect does the same with the name.
    """

    def __init__(self, transport: Transport, sslctx: ssl.SSLContext, **kwargs: object) -> None:
        super().__init__(transport.host, sslctx=sslctx, port=transport.tcp_port, **kwargs)  # type: ignore[arg-type]
        self._server_hostname = transport.server_hostname or transport.host
        self._sslctx = sslctx

    def connect(self) -> bool:
        """Open the TCP connection and do the TLS handshake; False when either fails."""
        if self.socket:
            return True
        timeout = self.comm_params.timeout_connect
        try:
            raw = socket.create_connection((self.comm_params.host, self.comm_params.port), timeout)
        except OSError as exc:
            _LOG.debug(
                "TLS connect to %s:%s failed: %s", self.comm_params.host, self.comm_params.port, exc
            )
            self.last_error: OSError | None = exc
            return False
        try:
            self.socket = self._sslctx.wrap_socket(
                raw, server_side=False, server_hostname=self._server_hostname
            )
            self.socket.settimeout(timeout)
        except OSError as exc:
            _LOG.debug("TLS handshake with %s failed: %s", self._server_hostname, exc)
            self.last_error = exc
            raw.close()
            self.socket = None
        return self.socket is not None


def connect_failure(transport: Transport, client: object = None) -> str:
    """Why a device's port or connection could not be opened, in words.

    ``connection refused``, ``no answer within 0.5 s``, ``no such port``, ``permission denied``,
    ``TLS handshake failed (...)``, or the system's own words for another error (lower case,
    without the errno). Serial ports are checked on the file system; a TCP address is probed
    with one connection attempt (the TLS client remembers its own last error).
    """
    if transport.is_serial:
        port = str(transport.port)
        if not os.path.exists(port):
            return "no such port"
        if not os.access(port, os.R_OK | os.W_OK):
            return "permission denied"
        return "the port cannot be opened"
    error = getattr(client, "last_error", None)
    if error is None:
        try:
            with socket.create_connection(
                (transport.host, transport.tcp_port), timeout=transport.timeout_s
            ):
                return "the connection was closed at once"
        except OSError as exc:
            error = exc
    return os_error_words(error, timeout_s=transport.timeout_s)


def tls_context(transport: Transport) -> ssl.SSLContext:
    """The client-side TLS context of a ``modbus-tls`` transport.

    Verifies the server against ``cafile`` (or the system CAs) and its name against
    ``server_hostname`` (default ``host``); presents ``certfile``/``keyfile`` when given.

    Raises:
        ProfileError: a certificate or key file that cannot be loaded.

    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if transport.cafile:
            context.load_verify_locations(cafile=transport.cafile)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise ProfileError(
            "transport.cafile", transport.cafile, f"a readable PEM CA ({exc})"
        ) from exc
    if transport.certfile:
        try:
            context.load_cert_chain(transport.certfile, transport.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ProfileError(
                "transport.certfile", transport.certfile, f"a readable PEM cert/key pair ({exc})"
            ) from exc
    return context


class ModbusDevice:
    """A Modbus device reached through its profile (synchronous, thread-safe).

    Args:
        profile: a profile with a ``modbus-rtu``, ``modbus-tcp`` or ``modbus-tls`` transport.
        trace: optional :data:`FrameTrace` called with every raw frame sent and received.
        client: a pre-built pymodbus sync client to use instead of the one the transport
            describes (e.g. RTU framing over TCP); ``trace`` and ``frames`` are then not wired.

    Attributes:
        profile: the profile.
        frames: when ``transport.trace`` is true, the last 1000 frames as
            ``(time.monotonic() seconds, "tx" | "rx", bytes)``.

    Raises:
        ProfileError: the transport is not Modbus, or a serial transport has no port.

    """

    def __init__(
        self,
        profile: DeviceProfile,
        *,
        trace: FrameTrace | None = None,
        client: ModbusBaseSyncClient | None = None,
    ) -> None:
        transport = profile.transport
        if not transport.is_modbus:
            raise ProfileError(
                "transport.kind", transport.kind, "a Modbus transport", source=profile.source
            )
        self.profile = profile
        self.frames: deque[tuple[float, str, bytes]] = deque(maxlen=FRAME_RING_SIZE)
        self._trace = trace
        self._lock = threading.RLock()
        self._backoff_s = transport.reconnect_backoff_s[0]
        self._next_connect_at = 0.0
        self._client = client if client is not None else self._build_client(transport)

    # -- construction ----------------------------------------------------------------------

    def _build_client(self, transport: Transport) -> ModbusBaseSyncClient:
        # pymodbus retries are off: this class retries (with reconnect and back-off) itself.
        common: dict[str, object] = {
            "timeout": transport.timeout_s,
            "retries": 0,
            "trace_packet": self._on_packet,
            "name": self.profile.name,
        }
        if transport.kind == "modbus-rtu":
            if not transport.port:
                raise ProfileError(
                    "transport.port",
                    transport.port,
                    "a serial device path (give it with --port)",
                    source=self.profile.source,
                )
            return _RtuClient(
                transport.port,
                framer=FramerType.RTU,
                baudrate=transport.baudrate,
                bytesize=transport.bytesize,
                parity=transport.parity,
                stopbits=transport.stopbits,
                **common,
            )
        if transport.kind == "modbus-tcp":
            return ModbusTcpClient(
                transport.host,
                framer=FramerType.SOCKET,
                port=transport.tcp_port,
                **common,  # type: ignore[arg-type]
            )
        return _TlsClient(transport, tls_context(transport), framer=FramerType.TLS, **common)

    def _on_packet(self, sending: bool, data: bytes) -> bytes:
        """Pymodbus ``trace_packet`` hook: record and forward, return the data unchanged."""
        if self.profile.transport.trace:
            self.frames.append((time.monotonic(), "tx" if sending else "rx", bytes(data)))
        if self._trace is not None:
            self._trace(sending, bytes(data))
        return data

    # -- connection ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The device's name (from the profile)."""
        return self.profile.name

    @property
    def connected(self) -> bool:
        """Whether the underlying port or socket is open (not whether the device answers)."""
        return bool(getattr(self._client, "socket", None))

    def connect(self) -> None:
        """Open the port or connection, retrying ``transport.retries`` times with back-off.

        Raises:
            CommunicationError: it could not be opened.

        """
        with self._lock:
            attempts = 1 + self.profile.transport.retries
            for attempt in range(attempts):
                if attempt:
                    self._wait_backoff()
                if self._client.connect():
                    self._backoff_s = self.profile.transport.reconnect_backoff_s[0]
                    return
            reason = connect_failure(self.profile.transport, self._client)
            error = CommunicationError(
                f"{self.name} at {self.address}: cannot connect, {reason} ({self._where()}, "
                f"{attempts} attempt(s)) — is the device (or `twinloop emulate`) running there?"
            )
            error.reason = reason
            raise error

    def close(self) -> None:
        """Close the port or connection (idempotent); the next request reconnects."""
        with self._lock:
            self._client.close()

    def __enter__(self) -> ModbusDevice:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> str:
        """Where the device is reached: its serial port, or HOST:PORT."""
        t = self.profile.transport
        return str(t.port) if t.is_serial else f"{t.host}:{t.tcp_port}"

    def _where(self) -> str:
        t = self.profile.transport
        if t.is_serial:
            return f"{t.kind} {t.port} {t.baudrate} {t.bytesize}{t.parity}{t.stopbits}"
        return f"{t.kind} {t.host}:{t.tcp_port}"

    def _ensure_connected(self) -> bool:
        """Open the connection if it is down, at most once per back-off interval (no sleep).

        A real-time caller must not sleep inside a request while the device is gone: between
        attempts, requests fail at once (:class:`CommunicationError`) and the interval doubles
        up to ``reconnect_backoff_s[1]``.
        """
        if self.connected:
            return True
        now = time.monotonic()
        if now < self._next_connect_at:
            return False
        if self._client.connect():
            self._backoff_s = self.profile.transport.reconnect_backoff_s[0]
            self._next_connect_at = 0.0
            return True
        self._next_connect_at = now + self._backoff_s
        self._backoff_s = min(2 * self._backoff_s, self.profile.transport.reconnect_backoff_s[1])
        return False

    def _wait_backoff(self) -> None:
        time.sleep(self._backoff_s)
        self._backoff_s = min(
            max(self._backoff_s * 2, 1e-3) if self._backoff_s else 0.0,
            self.profile.transport.reconnect_backoff_s[1],
        )

    # -- one transaction -------------------------------------------------------------------

    def _transact(
        self,
        what: str,
        request: Callable[[], ModbusPDU],
        check: Callable[[ModbusPDU], str | None],
        *,
        retry: bool = True,
    ) -> ModbusPDU:
        """Run ``request`` until it gets a valid answer (normal or exception response).

        ``check`` returns a reason when a normal answer does not match the request (wrong
        function code, count, echo): that counts as a transport fault.
        """
        transport = self.profile.transport
        attempts = 1 + (transport.retries if retry else 0)
        last = "no attempt"
        for attempt in range(attempts):
            if attempt:
                time.sleep(transport.reconnect_backoff_s[0])
            if not self._ensure_connected():  # gone: fail at once, reconnect on a later call
                raise CommunicationError(
                    f"{self.name}: {what}: not connected ({self._where()}); next attempt "
                    f"in {max(0.0, self._next_connect_at - time.monotonic()):.2f} s"
                )
            try:
                pdu = request()
            except _TRANSPORT_ERRORS as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._client.close()
                continue
            problem = "no answer" if pdu is None else check(pdu)
            if problem is None:
                return pdu
            last = f"invalid answer: {problem}"
            self._client.close()  # flush whatever else is in flight
        raise CommunicationError(f"{self.name}: {what} failed after {attempts} attempt(s): {last}")

    @staticmethod
    def _function_check(pdu: ModbusPDU, function_code: int) -> str | None:
        if pdu.isError():
            if pdu.function_code != function_code | 0x80:
                return f"exception for function {pdu.function_code & 0x7F}, not {function_code}"
            return None
        if pdu.function_code != function_code:
            return f"function code {pdu.function_code}, expected {function_code}"
        return None

    # -- reads -----------------------------------------------------------------------------

    def read(self, name: str) -> float | int | bool:
        """Read one register by name, in engineering units.

        Raises:
            ProfileError: no such register, or it is write-only.
            DeviceException: the device answered a Modbus exception (``.code``).
            CommunicationError: no valid answer after the retries.

        """
        return self.read_many([name])[name]

    def read_many(self, names: Iterable[str]) -> dict[str, float | int | bool]:
        """Read several registers by name with as few requests as the map allows.

        Returns:
            ``{name: value}`` in the order of ``names`` (engineering units: raw x scale).

        Raises:
            ProfileError: an unknown or write-only register.
            DeviceException: the device answered a Modbus exception to one of the requests.
            CommunicationError: no valid answer after the retries.

        """
        wanted = list(dict.fromkeys(names))
        registers = [self.profile.register(n) for n in wanted]
        for reg in registers:
            if not reg.readable:
                raise ProfileError(
                    f"register {reg.name}.access",
                    reg.access,
                    "r or rw to be read",
                    source=self.profile.source,
                )
        values: dict[str, float | int | bool] = {}
        with self._lock:
            for block in plan_reads(registers, mapped=self.profile.registers):
                data = self._read_block(block)
                for reg in block.registers:
                    offset = reg.address - block.address
                    values[reg.name] = decode(reg, data[offset : offset + reg.width])
        return {n: values[n] for n in wanted}

    def _read_block(self, block: ReadBlock) -> list[int] | list[bool]:
        dev = self.profile.transport.device_id
        fc = _READ_FUNCTION[block.table]
        client = self._client
        readers: dict[str, Callable[..., ModbusPDU]] = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        reader = readers[block.table]
        is_bits = block.table in ("coil", "discrete")

        def check(pdu: ModbusPDU) -> str | None:
            if problem := self._function_check(pdu, fc):
                return problem
            if pdu.isError():
                return None
            got = len(pdu.bits) if is_bits else len(pdu.registers)
            if got < block.count or (not is_bits and got != block.count):
                return f"{got} {'bits' if is_bits else 'registers'}, expected {block.count}"
            return None

        what = f"read {block.table} {block.address}..{block.address + block.count - 1}"
        pdu = self._transact(
            what, lambda: reader(block.address, count=block.count, device_id=dev), check
        )
        if pdu.isError():
            code = int(pdu.exception_code)
            names = ", ".join(r.name for r in block.registers)
            raise DeviceException(
                f"{self.name}: {what} ({names}) answered Modbus exception {code} "
                f"({exception_name(code)})",
                code,
            )
        if is_bits:
            return [bool(b) for b in pdu.bits[: block.count]]
        return [int(w) for w in pdu.registers]

    # -- writes ----------------------------------------------------------------------------

    def write(self, name: str, value: float | bool, *, retry: bool = True) -> WriteResult:
        """Write one register by name (engineering units), after :func:`check_write`.

        A refused write never reaches the wire. 16-bit registers use function 6, 32-bit ones
        function 16, coils function 5; the device's echo is checked.

        Args:
            name: register name.
            value: engineering value in the register's unit.
            retry: retry after a transport failure. A retried write may be executed twice when
                only the answer was lost: pass False for non-idempotent commands (e.g. a bolus).

        Returns:
            None when the device accepted the write, else the Modbus exception code it answered
            (e.g. 3 ILLEGAL DATA VALUE, 6 SERVER DEVICE BUSY).

        Raises:
            ProfileError: no such register.
            WriteRefused: read-only register, NaN/inf, or outside the register's limits.
            CommunicationError: no valid answer after the retries.

        """
        register = self.profile.register(name)
        checked = check_write(register, value, device=self.name)
        with self._lock:
            return self._write_checked(register, checked, retry=retry)

    def _write_checked(
        self, register: Register, value: float | bool, *, retry: bool
    ) -> WriteResult:
        dev = self.profile.transport.device_id
        payload = encode(register, value)
        client = self._client
        address = register.address
        request: Callable[[], ModbusPDU]
        if isinstance(payload, bool):
            fc = 5
            bit = payload

            def request() -> ModbusPDU:
                return client.write_coil(address, bit, device_id=dev)

            def echo(pdu: ModbusPDU) -> str | None:
                if pdu.address != address or not pdu.bits or bool(pdu.bits[0]) != bit:
                    return f"echo {pdu.address}={list(pdu.bits)[:1]}, sent {address}={bit}"
                return None

        elif len(payload) == 1:
            fc = 6
            word = payload[0]

            def request() -> ModbusPDU:
                return client.write_register(address, word, device_id=dev)

            def echo(pdu: ModbusPDU) -> str | None:
                if pdu.address != address or list(pdu.registers) != [word]:
                    return f"echo {pdu.address}={list(pdu.registers)}, sent {address}={[word]}"
                return None

        else:
            fc = 16
            words = list(payload)

            def request() -> ModbusPDU:
                return client.write_registers(address, words, device_id=dev)

            def echo(pdu: ModbusPDU) -> str | None:
                if pdu.address != address or pdu.count != len(words):
                    return f"echo {pdu.address}x{pdu.count}, sent {address}x{len(words)}"
                return None

        def check(pdu: ModbusPDU) -> str | None:
            if problem := self._function_check(pdu, fc):
                return problem
            return None if pdu.isError() else echo(pdu)

        what = f"write {register.name}={value!r}"
        pdu = self._transact(what, request, check, retry=retry)
        if pdu.isError():
            code = int(pdu.exception_code)
            _LOG.info(
                "%s: %s answered exception %d (%s)", self.name, what, code, exception_name(code)
            )
            return code
        return None

    def write_many(
        self,
        items: Mapping[str, float | bool] | Iterable[tuple[str, float | bool]],
        *,
        retry: bool = True,
    ) -> list[tuple[str, WriteResult]]:
        """Write several registers in order, one request each, after checking all of them.

        Every write is checked before the first is sent: one refused write refuses them all.

        Returns:
            ``[(name, None | exception code), ...]`` in order.

        Raises:
            ProfileError: an unknown register.
            WriteRefused: one of the writes is refused (nothing was sent).
            CommunicationError: a write got no valid answer (the later ones were not sent).

        """
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        checked = [
            (self.profile.register(n), check_write(self.profile.register(n), v, device=self.name))
            for n, v in pairs
        ]
        with self._lock:
            return [(reg.name, self._write_checked(reg, v, retry=retry)) for reg, v in checked]

    def apply_safe_state(self) -> list[tuple[str, WriteResult]]:
        """Apply the profile's ``safe_state`` writes in order (each retried).

        A transport failure on one write does not stop the others.

        Returns:
            ``[(register, None | exception code), ...]`` in order.

        Raises:
            CommunicationError: after trying all of them, if any got no answer (the message
                lists the outcome of each).

        """
        results: list[tuple[str, WriteResult]] = []
        failures: list[str] = []
        with self._lock:
            for safe in self.profile.safe_state:
                try:
                    results.append((safe.register, self.write(safe.register, safe.value)))
                except CommunicationError as exc:
                    failures.append(str(exc))
        if failures:
            raise CommunicationError(
                f"{self.name}: safe state incomplete; done {results}; failed: {'; '.join(failures)}"
            )
        return results

    def __repr__(self) -> str:
        device_id = self.profile.transport.device_id
        return f"ModbusDevice({self.name!r}, {self._where()}, device_id={device_id})"
