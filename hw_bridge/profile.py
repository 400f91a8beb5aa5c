"""Declarative device profiles: register maps with units, scaling, limits and access, from YAML.

A profile is validated once, when it is loaded, into frozen dataclasses; everything downstream
(the Modbus client, the line-protocol reader, the emulators) trusts it. A profile that does not
validate is refused with a :class:`~twinloop.hw_bridge.errors.ProfileError` that names the field
path (``registers[3].maximum``), the value found and what is allowed.

YAML layout (every key is checked; unknown keys are refused)::

    name: insulin_pump            # identifier
    kind: insulin_pump            # insulin_pump | cgm | servo_drive | generic
    transport:
      kind: modbus-rtu            # modbus-rtu | modbus-tcp | modbus-tls | line-serial
      port: /dev/ttyUSB0          # serial device path (serial kinds) or TCP port (network kinds)
      baudrate: 115200            # serial kinds only
      parity: E                   # N | E | O
      bytesize: 8                 # 7 | 8
      stopbits: 1                 # 1 | 2
      device_id: 1                # Modbus kinds only, 0..247
      timeout_s: 1.0              # seconds, > 0
      retries: 2                  # extra attempts after a transport failure, >= 0
      reconnect_backoff_s: [0.05, 2.0]   # initial and maximum wait between attempts, seconds
      trace: false                # keep the last frames in memory
    registers:                    # Modbus kinds
      - {name: bolus_u, table: holding, address: 3, dtype: float32, unit: U,
         access: rw, minimum: 0, maximum: 25, channel: bolus_u}
    fields:                       # line-serial kind
      - {name: glucose_mg_dl, index: 2, dtype: float, unit: mg/dL, channel: glucose_mg_dl}
    safe_state:                   # writes that put the device in its safe state, in order
      - {register: command, value: 3}

Safety rules checked at load (each refusal names the field): a device with a writable register
needs a non-empty ``safe_state``, and every safe write must stop or reduce delivery
(:data:`SAFE_WRITES`: no bolus, no temp basal above 0 U/h, drive torque 0, power-removing
controlwords only; a register on any other channel is refused); a writable register on a
channel of :data:`DEVICE_LIMITS` must have ``minimum``/``maximum`` inside the device's own
limits (e.g. ``bolus_u`` at most 25 U).

Engineering value = raw register value x ``scale``; limits (``minimum``/``maximum``) are in
engineering units. The codec (:func:`encode`, :func:`decode`) uses pymodbus's own
``ModbusClientMixin.convert_to_registers``/``convert_from_registers``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Final, Literal, cast

import yaml
from pymodbus.client.mixin import ModbusClientMixin

from twinloop.hw_bridge.errors import ProfileError, WriteRefused
from twinloop.limits import MAX_CONFIG_BYTES, check_document, read_text

__all__ = [
    "ACCESS_MODES",
    "DEVICE_KINDS",
    "DEVICE_LIMITS",
    "DTYPES",
    "LINE_DTYPES",
    "SAFE_WRITES",
    "TABLES",
    "TRANSPORT_KINDS",
    "DeviceProfile",
    "LineField",
    "Register",
    "SafeWrite",
    "Transport",
    "check_write",
    "decode",
    "encode",
    "load_profile",
    "parse_profile",
    "shipped_profile",
    "shipped_profiles",
]

DEVICE_KINDS: Final = ("insulin_pump", "cgm", "servo_drive", "generic")
TRANSPORT_KINDS: Final = ("modbus-rtu", "modbus-tcp", "modbus-tls", "line-serial")
TABLES: Final = ("holding", "input", "coil", "discrete")
DTYPES: Final = ("int16", "uint16", "int32", "uint32", "float32", "bool")
LINE_DTYPES: Final = ("int", "float", "str")
ACCESS_MODES: Final = ("r", "w", "rw")
WORD_ORDERS: Final = ("big", "little")
PARITIES: Final = ("N", "E", "O")

MODBUS_KINDS: Final = frozenset({"modbus-rtu", "modbus-tcp", "modbus-tls"})
SERIAL_KINDS: Final = frozenset({"modbus-rtu", "line-serial"})
NETWORK_KINDS: Final = frozenset({"modbus-tcp", "modbus-tls"})

#: Logger that receives one WARNING record per refused write.
REFUSED_LOGGER: Final = logging.getLogger("hw_bridge.refused")

_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FLOAT32_MAX: Final = 3.4028234663852886e38
_PROFILES_DIR: Final = Path(__file__).resolve().parent / "profiles"

_DATATYPE: Final = {
    "int16": ModbusClientMixin.DATATYPE.INT16,
    "uint16": ModbusClientMixin.DATATYPE.UINT16,
    "int32": ModbusClientMixin.DATATYPE.INT32,
    "uint32": ModbusClientMixin.DATATYPE.UINT32,
    "float32": ModbusClientMixin.DATATYPE.FLOAT32,
}
#: Raw (unscaled) integer range of each integer data type, inclusive.
_INT_RANGE: Final = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}

Value = float | int | bool

#: The device's own limits, by twinloop channel, in the channel's engineering unit: a profile's
#: register on one of these channels must have ``minimum``/``maximum`` inside them
#: (checked at load). They are the hard maxima of the emulated devices (``DEVICES.md``): the
#: pump's ``PumpSpec`` (35 U/h basal, 25 U bolus, 30 min temp basal, commands 0-4), the exo
#: drive's rated torque (40 N·m; the motor's 2x peak is not an exoskeleton limit), its only mode
#: (10, CST) and a communication watchdog that is never off (10..1000 ms).
DEVICE_LIMITS: Final[Mapping[str, tuple[float, float]]] = {
    "basal_u_per_h": (0.0, 35.0),
    "scheduled_basal_u_per_h": (0.0, 35.0),
    "bolus_u": (0.0, 25.0),
    "temp_basal_duration_min": (0.0, 30.0),
    "pump_command": (0.0, 4.0),
    "exo_torque_cmd_nm": (-40.0, 40.0),
    "exo_max_torque_nm": (0.0, 40.0),
    "drive_watchdog_ms": (10.0, 1000.0),
    "drive_mode": (10.0, 10.0),
}

#: What a safe-state write may carry, by twinloop channel: the values allowed and what they
#: mean. A safe state may only stop or reduce delivery: no bolus (any ``bolus_u`` write is
#: refused), a temp basal of 0 U/h only (the scheduled basal is not known when the profile
#: loads, so 0 is the only rate never above it), ``temp_basal_duration_min`` 0 (back to the
#: scheduled basal) or > 0 only after a 0 U/h temp basal in the same safe state, pump
#: commands suspend (1) and cancel bolus (3), the suspend coil on, drive target torque 0 and
#: the controlwords that take the power away (0 disable voltage, 2 quick stop, 6 shutdown).
#: A write to any other channel (or to a register without a channel) is refused.
SAFE_WRITES: Final[Mapping[str, tuple[frozenset[float], str]]] = {
    "pump_command": (frozenset({1.0, 3.0}), "1 (suspend) or 3 (cancel bolus)"),
    "suspend": (frozenset({1.0}), "true (suspend); false would resume delivery"),
    "basal_u_per_h": (
        frozenset({0.0}),
        "0 U/h (a safe state never sets a temp basal above the scheduled basal)",
    ),
    "temp_basal_duration_min": (
        frozenset({0.0}),
        "0 (cancel the temp basal), or > 0 after a 0 U/h temp basal in the safe state",
    ),
    "bolus_u": (frozenset(), "no bolus write in a safe state (use pump command 3)"),
    "exo_torque_cmd_nm": (frozenset({0.0}), "0 N·m (a safe state zeroes the torque)"),
    "drive_controlword": (
        frozenset({0.0, 2.0, 6.0}),
        "0 (disable voltage), 2 (quick stop) or 6 (shutdown)",
    ),
}


# --------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    """How the device is reached.

    Attributes:
        kind: ``modbus-rtu``, ``modbus-tcp``, ``modbus-tls`` or ``line-serial``.
        port: serial device path (serial kinds; ``None`` until given on the command line).
        baudrate: serial line speed, bit/s (serial kinds).
        parity: ``N``, ``E`` or ``O`` (serial kinds).
        bytesize: data bits per character, 7 or 8 (serial kinds).
        stopbits: 1 or 2 (serial kinds).
        host: server host name or address (network kinds).
        tcp_port: server TCP port (network kinds; the YAML key is ``port``).
        certfile: PEM client certificate presented to the server (``modbus-tls``).
        keyfile: PEM private key of ``certfile`` (``modbus-tls``).
        cafile: PEM CA bundle the server certificate is verified against (``modbus-tls``;
            ``None`` = the system's default CAs).
        server_hostname: name checked against the server certificate (``modbus-tls``;
            default: ``host``).
        device_id: Modbus unit/device id, 0..247 (Modbus kinds; 0 only for broadcast).
        timeout_s: how long to wait for an answer, seconds.
        retries: extra attempts after a transport failure (not after a device exception).
        reconnect_backoff_s: ``(initial, max)`` wait between attempts, seconds; doubles from
            ``initial`` up to ``max``.
        trace: keep the last frames in memory (``ModbusDevice.frames``).

    """

    kind: str
    port: str | None = None
    baudrate: int = 19200
    parity: str = "E"
    bytesize: int = 8
    stopbits: int = 1
    host: str = "127.0.0.1"
    tcp_port: int = 502
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    server_hostname: str | None = None
    device_id: int = 1
    timeout_s: float = 1.0
    retries: int = 2
    reconnect_backoff_s: tuple[float, float] = (0.05, 2.0)
    trace: bool = False

    @property
    def is_modbus(self) -> bool:
        """Whether this transport speaks Modbus (RTU, TCP or TLS)."""
        return self.kind in MODBUS_KINDS

    @property
    def is_serial(self) -> bool:
        """Whether this transport is a serial line (``port`` is a device path)."""
        return self.kind in SERIAL_KINDS

    def with_overrides(
        self,
        *,
        port: str | int | None = None,
        host: str | None = None,
        tcp: str | None = None,
    ) -> Transport:
        """Return a copy with the connection point replaced (e.g. from the command line).

        Args:
            port: serial device path (serial kinds) or TCP port number (network kinds).
            host: server host (network kinds).
            tcp: ``"host:port"`` (network kinds), applied before ``host``/``port``.

        Raises:
            ProfileError: an override that does not belong to this transport kind, or a
                malformed value.

        """
        changes: dict[str, Any] = {}
        if tcp is not None:
            if not self.is_network:
                raise ProfileError(
                    "transport.tcp", tcp, f"only for {sorted(NETWORK_KINDS)}, not {self.kind}"
                )
            tcp_host, sep, tcp_port = tcp.rpartition(":")
            if not sep or not tcp_host or not tcp_port.isdigit():
                raise ProfileError("transport.tcp", tcp, "HOST:PORT, e.g. 127.0.0.1:5020")
            changes["host"] = tcp_host.strip("[]")
            changes["tcp_port"] = _check_tcp_port("transport.tcp", int(tcp_port))
        if host is not None:
            if not self.is_network:
                raise ProfileError(
                    "transport.host", host, f"only for {sorted(NETWORK_KINDS)}, not {self.kind}"
                )
            if not host:
                raise ProfileError("transport.host", host, "a non-empty host name or address")
            changes["host"] = host
        if port is not None:
            if self.is_serial:
                if not isinstance(port, str) or not port:
                    raise ProfileError("transport.port", port, "a serial device path")
                changes["port"] = port
            else:
                number = int(port) if isinstance(port, str) and port.isdigit() else port
                if not isinstance(number, int) or isinstance(number, bool):
                    raise ProfileError("transport.port", port, "a TCP port number 1..65535")
                changes["tcp_port"] = _check_tcp_port("transport.port", number)
        return dataclasses.replace(self, **changes)

    @property
    def is_network(self) -> bool:
        """Whether this transport is TCP/TLS (``host`` and ``tcp_port`` apply)."""
        return self.kind in NETWORK_KINDS


@dataclass(frozen=True)
class Register:
    """One value in a Modbus table.

    Attributes:
        name: identifier, unique in the profile.
        table: ``holding``, ``input``, ``coil`` or ``discrete``.
        address: 0-based protocol address of the first word/bit, 0..65535.
        dtype: ``int16``, ``uint16``, ``int32``, ``uint32``, ``float32`` or ``bool``.
        word_order: ``big`` (high word first) or ``little``, for 32-bit types.
        scale: engineering value = raw x scale (non-zero).
        unit: engineering unit, e.g. ``U/h``.
        access: ``r``, ``w`` or ``rw``.
        minimum: lowest engineering value a write may carry (``None`` = what the type holds).
        maximum: highest engineering value a write may carry (``None`` = what the type holds).
        channel: twinloop channel carried by this register (e.g. ``basal_u_per_h``).
        description: free text.

    """

    name: str
    table: str
    address: int
    dtype: str
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    unit: str = ""
    access: str = "r"
    minimum: float | None = None
    maximum: float | None = None
    channel: str | None = None
    description: str = ""

    @property
    def width(self) -> int:
        """Words (registers) or bits this value occupies: 2 for 32-bit types, else 1."""
        return 2 if self.dtype in ("int32", "uint32", "float32") else 1

    @property
    def end(self) -> int:
        """One past the last address this value occupies."""
        return self.address + self.width

    @property
    def is_bit(self) -> bool:
        """Whether the value lives in a bit table (coil or discrete input)."""
        return self.table in ("coil", "discrete")

    @property
    def readable(self) -> bool:
        """Whether reads are allowed (``r`` or ``rw``)."""
        return "r" in self.access

    @property
    def writable(self) -> bool:
        """Whether writes are allowed (``w`` or ``rw``)."""
        return "w" in self.access

    def representable(self) -> tuple[float, float]:
        """The engineering range the data type can carry after scaling, inclusive.

        ``(0, 1)`` for ``bool``; for ``uint16`` with ``scale`` 0.1, ``(0.0, 6553.5)``.
        """
        if self.dtype == "bool":
            return (0.0, 1.0)
        if self.dtype == "float32":
            bound = _FLOAT32_MAX * abs(self.scale)
            return (-bound, bound)
        lo, hi = _INT_RANGE[self.dtype]
        a, b = lo * self.scale, hi * self.scale
        return (min(a, b), max(a, b))

    def limits(self) -> tuple[float, float]:
        """The engineering range a write may carry: ``minimum``/``maximum`` or the type's."""
        lo, hi = self.representable()
        return (
            lo if self.minimum is None else self.minimum,
            hi if self.maximum is None else self.maximum,
        )


@dataclass(frozen=True)
class SafeWrite:
    """One write of the device's safe state.

    Attributes:
        register: name of a writable register.
        value: engineering value (within the register's limits).

    """

    register: str
    value: float | bool


@dataclass(frozen=True)
class LineField:
    """One field of a line-protocol frame (``$TAG,f0,f1,...*HH``).

    Attributes:
        name: identifier, unique in the profile.
        index: position among the comma-separated fields after the sentence tag (0 = first).
        dtype: ``int``, ``float`` or ``str``.
        unit: engineering unit, e.g. ``mg/dL``.
        channel: twinloop channel carried by this field (e.g. ``glucose_mg_dl``).

    """

    name: str
    index: int
    dtype: str
    unit: str = ""
    channel: str | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """A validated device profile.

    Attributes:
        name: identifier of the device model.
        kind: ``insulin_pump``, ``cgm``, ``servo_drive`` or ``generic``.
        transport: how the device is reached.
        registers: the Modbus register map (empty for line-protocol devices).
        fields: the line-protocol fields (empty for Modbus devices).
        safe_state: writes that put the device in its safe state, applied in order.
        source: where the profile came from (a path or ``<string>``), for messages.

    """

    name: str
    kind: str
    transport: Transport
    registers: tuple[Register, ...] = ()
    fields: tuple[LineField, ...] = ()
    safe_state: tuple[SafeWrite, ...] = ()
    source: str = "<string>"
    _by_name: Mapping[str, Register] = dc_field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _by_channel: Mapping[str, Register] = dc_field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {r.name: r for r in self.registers})
        object.__setattr__(self, "_by_channel", {r.channel: r for r in self.registers if r.channel})

    def register(self, name: str) -> Register:
        """The register called ``name``.

        Raises:
            ProfileError: no register has that name.

        """
        try:
            return self._by_name[name]
        except KeyError:
            raise ProfileError(
                "register", name, f"one of {sorted(self._by_name)}", source=self.source
            ) from None

    def channel(self, name: str) -> Register:
        """The register that carries twinloop channel ``name`` (e.g. ``bolus_u``).

        Raises:
            ProfileError: no register carries that channel.

        """
        try:
            return self._by_channel[name]
        except KeyError:
            raise ProfileError(
                "channel", name, f"one of {sorted(self._by_channel)}", source=self.source
            ) from None

    def field(self, name: str) -> LineField:
        """The line-protocol field called ``name``.

        Raises:
            ProfileError: no field has that name.

        """
        for line_field in self.fields:
            if line_field.name == name:
                return line_field
        raise ProfileError(
            "field", name, f"one of {[f.name for f in self.fields]}", source=self.source
        )

    def check_write(self, name: str, value: object) -> float | bool:
        """:func:`check_write` on register ``name`` of this device; returns the checked value."""
        return check_write(self.register(name), value, device=self.name)

    def with_overrides(
        self,
        *,
        port: str | int | None = None,
        host: str | None = None,
        tcp: str | None = None,
    ) -> DeviceProfile:
        """A copy with :meth:`Transport.with_overrides` applied to the transport."""
        transport = self.transport.with_overrides(port=port, host=host, tcp=tcp)
        return dataclasses.replace(self, transport=transport)


# --------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------


def load_profile(path: str | Path) -> DeviceProfile:
    """Load and validate a YAML profile file.

    Relative TLS file paths (``certfile``, ``keyfile``, ``cafile``) are taken relative to the
    profile's folder.

    Raises:
        ProfileError: the YAML does not parse or the profile does not validate.
        InputLimitError: the file is missing, not a regular file (``/dev/zero``, a FIFO: refused
            unread), larger than :data:`~twinloop.limits.MAX_CONFIG_BYTES`, or not UTF-8 text
            (a binary or UTF-16 file); the message names the file.

    """
    path = Path(path)
    text = read_text(path, MAX_CONFIG_BYTES)
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError("<yaml>", str(path), f"valid YAML ({exc})", source=str(path)) from exc
    check_document(mapping, str(path))
    return parse_profile(mapping, source=str(path), base_dir=path.parent)


def parse_profile(
    mapping: object, *, source: str = "<string>", base_dir: str | Path | None = None
) -> DeviceProfile:
    """Validate a profile given as a mapping (e.g. from ``yaml.safe_load``).

    Args:
        mapping: the profile's top-level mapping.
        source: where it came from, used in error messages.
        base_dir: folder that relative TLS file paths are taken relative to.

    Raises:
        ProfileError: naming the field path, the value and what is allowed.

    """
    return _Parser(source, None if base_dir is None else Path(base_dir)).profile(mapping)


class _Parser:
    """Validates one profile; every error names ``source`` and the field path."""

    def __init__(self, source: str, base_dir: Path | None) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, path: str, value: object, allowed: str) -> ProfileError:
        return ProfileError(path, value, allowed, source=self.source)

    # -- primitive checks ------------------------------------------------------------------

    def mapping(
        self,
        path: str,
        value: object,
        *,
        required: Iterable[str],
        optional: Iterable[str] = (),
    ) -> dict[str, Any]:
        required = tuple(required)
        allowed = (*required, *optional)
        if not isinstance(value, Mapping):
            raise self.fail(path or "<profile>", value, "a mapping")
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, value[key], f"a known key: one of {sorted(allowed)}")
        for key in required:
            if key not in value:
                where = f"{path}.{key}" if path else key
                raise self.fail(where, None, "a value (the key is required)")
        return dict(value)

    def string(self, path: str, value: object, *, identifier: bool = False) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, value, "a non-empty string")
        if identifier and not _NAME_RE.match(value):
            raise self.fail(path, value, "an identifier: letters, digits and _, not first digit")
        return value

    def choice(self, path: str, value: object, choices: Sequence[object]) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise self.fail(path, value, f"one of {list(choices)}")
        return value

    def integer(self, path: str, value: object, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, value, "an integer")
        if value < lo or (hi is not None and value > hi):
            raise self.fail(path, value, f"an integer in {lo}..{'' if hi is None else hi}")
        return value

    def number(self, path: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, value, "a number")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(path, value, "a finite number")
        return number

    def boolean(self, path: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, value, "true or false")
        return value

    def sequence(self, path: str, value: object) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, value, "a list")
        return value

    def file(self, path: str, value: object) -> str:
        text = self.string(path, value)
        file_path = Path(text).expanduser()
        if not file_path.is_absolute() and self.base_dir is not None:
            file_path = self.base_dir / file_path
        return str(file_path)

    # -- structure ---------------------------------------------------------------------------

    def profile(self, value: object) -> DeviceProfile:
        top = self.mapping(
            "",
            value,
            required=("name", "kind", "transport"),
            optional=("registers", "fields", "safe_state"),
        )
        name = self.string("name", top["name"], identifier=True)
        kind = self.choice("kind", top["kind"], DEVICE_KINDS)
        transport = self.transport(top["transport"])
        registers = tuple(
            self.register(f"registers[{i}]", item)
            for i, item in enumerate(self.sequence("registers", top.get("registers")))
        )
        fields = tuple(
            self.line_field(f"fields[{i}]", item)
            for i, item in enumerate(self.sequence("fields", top.get("fields")))
        )
        if transport.is_modbus:
            if fields:
                raise self.fail("fields", top["fields"], f"no fields on {transport.kind}")
            if not registers:
                raise self.fail("registers", top.get("registers"), "at least one register")
        else:
            if registers:
                raise self.fail("registers", top["registers"], f"no registers on {transport.kind}")
            if not fields:
                raise self.fail("fields", top.get("fields"), "at least one field")
        self.check_registers(registers)
        self.check_fields(fields)
        self.check_device_limits(registers)
        by_name = {r.name: r for r in registers}
        safe_state = tuple(
            self.safe_write(f"safe_state[{i}]", item, by_name)
            for i, item in enumerate(self.sequence("safe_state", top.get("safe_state")))
        )
        self.check_safe_state(safe_state, by_name, top.get("safe_state"))
        return DeviceProfile(
            name=name,
            kind=kind,
            transport=transport,
            registers=registers,
            fields=fields,
            safe_state=safe_state,
            source=self.source,
        )

    def transport(self, value: object) -> Transport:
        path = "transport"
        if not isinstance(value, Mapping):
            raise self.fail(path, value, "a mapping")
        kind = self.choice(f"{path}.kind", value.get("kind"), TRANSPORT_KINDS)
        optional = ["timeout_s", "retries", "reconnect_backoff_s", "trace"]
        if kind in MODBUS_KINDS:
            optional.append("device_id")
        if kind in SERIAL_KINDS:
            optional += ["port", "baudrate", "parity", "bytesize", "stopbits"]
        if kind in NETWORK_KINDS:
            optional += ["host", "port"]
        if kind == "modbus-tls":
            optional += ["certfile", "keyfile", "cafile", "server_hostname"]
        raw = self.mapping(path, value, required=("kind",), optional=optional)
        out: dict[str, Any] = {"kind": kind}
        if kind == "line-serial":
            out.update(baudrate=9600, parity="N")
        if kind == "modbus-tls":
            out["tcp_port"] = 802
        for key, item in raw.items():
            where = f"{path}.{key}"
            if key == "kind":
                continue
            if key == "port" and kind in SERIAL_KINDS:
                out["port"] = self.string(where, item)
            elif key == "port":
                out["tcp_port"] = _check_tcp_port(where, item, source=self.source)
            elif key == "baudrate":
                out[key] = self.integer(where, item, 1)
            elif key == "parity":
                out[key] = self.choice(where, item, PARITIES)
            elif key == "bytesize":
                out[key] = self.choice(where, item, (7, 8))
            elif key == "stopbits":
                out[key] = self.choice(where, item, (1, 2))
            elif key in ("host", "server_hostname"):
                out[key] = self.string(where, item)
            elif key in ("certfile", "keyfile", "cafile"):
                out[key] = self.file(where, item)
            elif key == "device_id":
                out[key] = self.integer(where, item, 0, 247)
            elif key == "timeout_s":
                out[key] = self.number(where, item)
                if out[key] <= 0:
                    raise self.fail(where, item, "a number of seconds > 0")
            elif key == "retries":
                out[key] = self.integer(where, item, 0, 100)
            elif key == "reconnect_backoff_s":
                out[key] = self.backoff(where, item)
            elif key == "trace":
                out[key] = self.boolean(where, item)
        if ("certfile" in out) != ("keyfile" in out):
            missing = "keyfile" if "certfile" in out else "certfile"
            raise self.fail(f"{path}.{missing}", None, "certfile and keyfile given together")
        return Transport(**out)

    def backoff(self, path: str, value: object) -> tuple[float, float]:
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(path, value, "[initial, max] in seconds")
        initial = self.number(f"{path}[0]", value[0])
        maximum = self.number(f"{path}[1]", value[1])
        if initial < 0:
            raise self.fail(f"{path}[0]", value[0], "seconds >= 0")
        if maximum < initial:
            raise self.fail(f"{path}[1]", value[1], f"seconds >= initial ({initial})")
        return (initial, maximum)

    def register(self, path: str, value: object) -> Register:
        raw = self.mapping(
            path,
            value,
            required=("name", "table", "address", "dtype"),
            optional=(
                "word_order",
                "scale",
                "unit",
                "access",
                "minimum",
                "maximum",
                "channel",
                "description",
            ),
        )
        name = self.string(f"{path}.name", raw["name"], identifier=True)
        table = self.choice(f"{path}.table", raw["table"], TABLES)
        address = self.integer(f"{path}.address", raw["address"], 0, 65535)
        dtype = self.choice(f"{path}.dtype", raw["dtype"], DTYPES)
        is_bit = table in ("coil", "discrete")
        if is_bit and dtype != "bool":
            raise self.fail(f"{path}.dtype", dtype, f"bool (the {table} table holds bits)")
        if not is_bit and dtype == "bool":
            raise self.fail(
                f"{path}.dtype", dtype, f"a numeric type on {table} (bool needs coil/discrete)"
            )
        word_order = self.choice(f"{path}.word_order", raw.get("word_order", "big"), WORD_ORDERS)
        scale = self.number(f"{path}.scale", raw.get("scale", 1.0))
        if scale == 0:
            raise self.fail(f"{path}.scale", raw.get("scale"), "a non-zero number")
        if dtype == "bool" and scale != 1:
            raise self.fail(f"{path}.scale", raw.get("scale"), "1 for bool")
        unit = raw.get("unit", "")
        if not isinstance(unit, str):
            raise self.fail(f"{path}.unit", unit, "a string")
        read_only = table in ("input", "discrete")
        access = self.choice(
            f"{path}.access", raw.get("access", "r" if read_only else "rw"), ACCESS_MODES
        )
        if read_only and access != "r":
            raise self.fail(f"{path}.access", access, f"r (the {table} table is read-only)")
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise self.fail(f"{path}.description", description, "a string")
        channel = raw.get("channel")
        if channel is not None:
            channel = self.string(f"{path}.channel", channel, identifier=True)
        register = Register(
            name=name,
            table=table,
            address=address,
            dtype=dtype,
            word_order=cast(Literal["big", "little"], word_order),
            scale=scale,
            unit=unit,
            access=access,
            channel=channel,
            description=description,
        )
        if register.end - 1 > 65535:
            raise self.fail(f"{path}.address", address, f"0..{65536 - register.width}")
        limits: dict[str, float] = {}
        for key in ("minimum", "maximum"):
            if key not in raw:
                continue
            where = f"{path}.{key}"
            if dtype == "bool":
                raise self.fail(where, raw[key], "no limits on a bool")
            number = self.number(where, raw[key])
            if not _encodable(register, number):
                lo, hi = register.representable()
                raise self.fail(
                    where, raw[key], f"a value {dtype} can carry with scale {scale}: {lo}..{hi}"
                )
            limits[key] = number
        if "minimum" in limits and "maximum" in limits and limits["minimum"] > limits["maximum"]:
            raise self.fail(f"{path}.minimum", raw["minimum"], f"<= maximum ({limits['maximum']})")
        return dataclasses.replace(
            register, minimum=limits.get("minimum"), maximum=limits.get("maximum")
        )

    def check_registers(self, registers: Sequence[Register]) -> None:
        seen_names: dict[str, int] = {}
        seen_channels: dict[str, int] = {}
        for i, reg in enumerate(registers):
            if reg.name in seen_names:
                raise self.fail(
                    f"registers[{i}].name",
                    reg.name,
                    f"a unique name (registers[{seen_names[reg.name]}] has it)",
                )
            seen_names[reg.name] = i
            if reg.channel is not None:
                if reg.channel in seen_channels:
                    raise self.fail(
                        f"registers[{i}].channel",
                        reg.channel,
                        f"a unique channel (registers[{seen_channels[reg.channel]}] has it)",
                    )
                seen_channels[reg.channel] = i
        for table in TABLES:
            in_table = sorted(
                (reg.address, reg.end, i) for i, reg in enumerate(registers) if reg.table == table
            )
            for (_, end_a, ia), (start_b, _, ib) in itertools.pairwise(in_table):
                if start_b < end_a:
                    first, second = sorted((ia, ib))
                    other = registers[first]
                    raise self.fail(
                        f"registers[{second}].address",
                        registers[second].address,
                        f"no overlap with registers[{first}] ({other.name}, {table} "
                        f"{other.address}..{other.end - 1})",
                    )

    def line_field(self, path: str, value: object) -> LineField:
        raw = self.mapping(
            path, value, required=("name", "index", "dtype"), optional=("unit", "channel")
        )
        unit = raw.get("unit", "")
        if not isinstance(unit, str):
            raise self.fail(f"{path}.unit", unit, "a string")
        channel = raw.get("channel")
        if channel is not None:
            channel = self.string(f"{path}.channel", channel, identifier=True)
        return LineField(
            name=self.string(f"{path}.name", raw["name"], identifier=True),
            index=self.integer(f"{path}.index", raw["index"], 0, 255),
            dtype=self.choice(f"{path}.dtype", raw["dtype"], LINE_DTYPES),
            unit=unit,
            channel=channel,
        )

    def check_fields(self, fields: Sequence[LineField]) -> None:
        for attr in ("name", "index", "channel"):
            seen: dict[object, int] = {}
            for i, line_field in enumerate(fields):
                key = getattr(line_field, attr)
                if key is None:
                    continue
                if key in seen:
                    raise self.fail(
                        f"fields[{i}].{attr}", key, f"a unique {attr} (fields[{seen[key]}] has it)"
                    )
                seen[key] = i

    def check_device_limits(self, registers: Sequence[Register]) -> None:
        """Every register on a channel of :data:`DEVICE_LIMITS` has limits inside them."""
        for i, reg in enumerate(registers):
            hard = DEVICE_LIMITS.get(reg.channel or "")
            if hard is None:
                continue
            lo, hi = reg.limits()
            unit = f" {reg.unit}" if reg.unit else ""
            allowed = (
                f"inside the device's own limits {hard[0]:g}..{hard[1]:g}{unit} ({reg.channel})"
            )
            if lo < hard[0]:
                raise self.fail(f"registers[{i}].minimum", reg.minimum, allowed)
            if hi > hard[1]:
                raise self.fail(f"registers[{i}].maximum", reg.maximum, allowed)

    def check_safe_state(
        self, safe_state: Sequence[SafeWrite], by_name: Mapping[str, Register], raw: object
    ) -> None:
        """A safe state only stops or reduces delivery (:data:`SAFE_WRITES`) and is non-empty."""
        if not safe_state and any(reg.writable for reg in by_name.values()):
            raise self.fail(
                "safe_state", raw, "at least one write that stops delivery (the device is writable)"
            )
        zero_temp_basal = False
        for i, safe in enumerate(safe_state):
            channel = by_name[safe.register].channel or ""
            rule = SAFE_WRITES.get(channel)
            where = f"safe_state[{i}].value"
            if rule is None:
                raise self.fail(
                    f"safe_state[{i}].register",
                    safe.register,
                    f"a register on a channel that can stop or reduce delivery: one of "
                    f"{sorted(SAFE_WRITES)} (channel {channel or 'none'} cannot be judged safe)",
                )
            allowed_values, meaning = rule
            value = float(safe.value)
            if channel == "temp_basal_duration_min" and value > 0 and zero_temp_basal:
                continue  # a zero temp basal written before: stopping delivery for a while
            if value not in allowed_values:
                raise self.fail(where, safe.value, meaning)
            if channel == "basal_u_per_h":
                zero_temp_basal = True

    def safe_write(self, path: str, value: object, by_name: Mapping[str, Register]) -> SafeWrite:
        raw = self.mapping(path, value, required=("register", "value"))
        name = self.string(f"{path}.register", raw["register"])
        if name not in by_name:
            raise self.fail(f"{path}.register", name, f"one of {sorted(by_name)}")
        register = by_name[name]
        try:
            checked = _check_value(register, raw["value"], device=self.source)
        except WriteRefused as exc:
            raise self.fail(f"{path}.value", raw["value"], str(exc)) from None
        return SafeWrite(register=name, value=checked)


def _check_tcp_port(path: str, value: object, *, source: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ProfileError(path, value, "a TCP port number 1..65535", source=source)
    return value


# --------------------------------------------------------------------------------------------
# codec and write checks
# --------------------------------------------------------------------------------------------


def _is_bit_value(value: object) -> bool:
    """Whether ``value`` is a bool or the integer 0 or 1."""
    return isinstance(value, bool | numbers.Integral) and value in (0, 1)


def _round_half_away(x: float) -> int:
    """Nearest integer, ties away from zero."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _encodable(register: Register, value: float) -> bool:
    """Whether ``value`` (engineering units, finite) survives encoding into ``register``."""
    if register.dtype == "bool":
        return value in (0, 1)
    raw = value / register.scale
    if register.dtype == "float32":
        return abs(raw) <= _FLOAT32_MAX
    lo, hi = _INT_RANGE[register.dtype]
    return lo <= _round_half_away(raw) <= hi


def encode(register: Register, value: float | bool) -> list[int] | bool:
    """Encode an engineering value into register words (or a bit).

    Raw = value / scale, rounded to the nearest integer (ties away from zero) for integer
    types; 32-bit types are split into two words in ``register.word_order``.

    Args:
        register: where the value goes.
        value: engineering value in ``register.unit``.

    Returns:
        The words to write (``list[int]`` of 1 or 2 unsigned 16-bit words) or, for a bit, the
        ``bool``.

    Raises:
        WriteRefused: the value is not finite or the data type cannot carry it.

    """
    if register.dtype == "bool":
        if not _is_bit_value(value):
            raise WriteRefused(f"{register.name}: {value!r} is not a bool")
        return bool(value)
    number = float(value)
    if not math.isfinite(number) or not _encodable(register, number):
        lo, hi = register.representable()
        raise WriteRefused(
            f"{register.name}: {value!r} cannot be encoded as {register.dtype} "
            f"with scale {register.scale} (range {lo}..{hi})"
        )
    raw = number / register.scale
    datatype = _DATATYPE[register.dtype]
    payload: float | int = raw if register.dtype == "float32" else _round_half_away(raw)
    return ModbusClientMixin.convert_to_registers(payload, datatype, word_order=register.word_order)


def decode(register: Register, words: Sequence[int] | Sequence[bool] | bool) -> Value:
    """Decode register words (or a bit) into an engineering value.

    Args:
        register: where the words come from.
        words: ``register.width`` words as read (unsigned 16-bit), or a bit / list of bits.

    Returns:
        ``bool`` for bits; ``int`` for integer types with scale 1; otherwise ``float``
        (raw x scale, in ``register.unit``).

    Raises:
        ValueError: ``words`` does not hold ``register.width`` words.

    """
    if register.dtype == "bool":
        if isinstance(words, bool | int):
            return bool(words)
        if len(words) < 1:
            raise ValueError(f"{register.name}: no bit to decode")
        return bool(words[0])
    if isinstance(words, bool | int) or len(words) != register.width:
        raise ValueError(f"{register.name}: expected {register.width} words, got {words!r}")
    raw = ModbusClientMixin.convert_from_registers(
        [int(w) for w in words], _DATATYPE[register.dtype], word_order=register.word_order
    )
    if not isinstance(raw, int | float):  # pragma: no cover - pymodbus contract
        raise ValueError(f"{register.name}: pymodbus decoded {raw!r}")
    if register.dtype == "float32":
        return float(raw) * register.scale
    if register.scale == 1:
        return int(raw)
    return raw * register.scale


def _check_value(register: Register, value: object, *, device: str) -> float | bool:
    """Check a write without logging; returns the value as ``float`` or ``bool``."""
    where = f"{device}: write {register.name}={value!r}"
    if not register.writable:
        raise WriteRefused(f"{where} refused: register is read-only (access {register.access!r})")
    if register.dtype == "bool":
        if _is_bit_value(value):
            return bool(value)
        raise WriteRefused(f"{where} refused: a bool (true/false, 0/1) is required")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WriteRefused(f"{where} refused: a number in {register.unit or 'units'} is required")
    number = float(value)
    if not math.isfinite(number):
        raise WriteRefused(f"{where} refused: not a finite number")
    lo, hi = register.limits()
    unit = f" {register.unit}" if register.unit else ""
    if not lo <= number <= hi or not _encodable(register, number):
        raise WriteRefused(f"{where} refused: outside the limits {lo}..{hi}{unit}")
    return number


def check_write(register: Register, value: object, *, device: str = "device") -> float | bool:
    """Check that ``value`` may be written to ``register``; refuse it otherwise.

    Refused: a register without write access, a non-number (or a non-bool for bits), NaN or
    infinity, a value outside ``[minimum, maximum]`` (engineering units) or outside what the
    data type can carry after scaling. Every refusal is logged at WARNING on the logger
    ``hw_bridge.refused`` (extra fields ``device``, ``register``, ``value``).

    Args:
        register: the target register.
        value: engineering value in ``register.unit``.
        device: the device's name, for the message.

    Returns:
        The value as ``float`` (numeric registers) or ``bool`` (bits).

    Raises:
        WriteRefused: naming the device, the register, the value and the limits or access.

    """
    try:
        return _check_value(register, value, device=device)
    except WriteRefused as exc:
        REFUSED_LOGGER.warning(
            "%s", exc, extra={"device": device, "register": register.name, "value": value}
        )
        raise


# --------------------------------------------------------------------------------------------
# shipped profiles
# --------------------------------------------------------------------------------------------


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with twinloop (``hw_bridge/profiles/*.yaml``), sorted."""
    return sorted(p.stem for p in _PROFILES_DIR.glob("*.yaml"))


def shipped_profile(name: str) -> Path:
    """Path of the shipped profile ``name`` (with or without ``.yaml``).

    Raises:
        ProfileError: no shipped profile has that name.

    """
    stem = name.removesuffix(".yaml")
    path = _PROFILES_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise ProfileError("profile", name, f"one of {shipped_profiles()}")
    return path
