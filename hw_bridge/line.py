r"""The CGM line protocol (NMEA-style ASCII frames) and its serial transport over pyserial.

Wire format (see ``hw_bridge/DEVICES.md``, section "CGM — line protocol")::

    $<field>,<field>,...*HH\r\n

``HH`` is the XOR of every byte between ``$`` and ``*`` as two hex digits (upper-case when
sent; either case is accepted). A whole line, ``$`` to ``\n`` included, is at most
:data:`MAX_LINE_BYTES` bytes. Fields are printable ASCII without ``$``, ``*`` and ``,``.

The module has three layers:

* pure framing: :func:`checksum`, :func:`encode_frame`, the streaming :class:`FrameParser`
  (resynchronises on ``$``, bounded buffer, never raises on garbage);
* typed messages: :class:`CgmFrame` (device → host, ``$TLCGM``), :class:`Command`
  (host → device, ``$TLCMD``), :class:`Ack` / :class:`Nak` (device → host answers), with
  ``parse_*`` functions that validate field counts and ranges;
* :class:`LineTransport`: the host end over a serial port (or any pyserial URL such as
  ``loop://``), non-blocking :meth:`LineTransport.poll`, :meth:`LineTransport.command` with
  timeout and retries, and reconnection with exponential backoff when the port disappears.

:func:`twinloop.hw_bridge.wire.char_time_s` gives the wire time of one character, which emulated
devices use to pace their writes (a pty does not enforce the baud rate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from functools import reduce
from operator import xor
from types import TracebackType
from typing import Any

import serial

from twinloop.hw_bridge.errors import BridgeError, CommunicationError, os_error_words

__all__ = [
    "GLUCOSE_MAX_MG_DL",
    "GLUCOSE_MIN_MG_DL",
    "MAX_COMMAND_NAME",
    "MAX_LINE_BYTES",
    "SEQ_MODULO",
    "TALKER_ACK",
    "TALKER_CGM",
    "TALKER_CMD",
    "TALKER_NAK",
    "Ack",
    "CgmFrame",
    "CgmStatus",
    "Command",
    "Frame",
    "FrameError",
    "FrameErrorKind",
    "FrameParser",
    "LineConfigError",
    "LineProtocolError",
    "LineStats",
    "LineTransport",
    "Message",
    "Nak",
    "NakReason",
    "TraceCallback",
    "checksum",
    "encode_frame",
    "parse_cgm",
    "parse_command",
    "parse_message",
    "parse_reply",
]

_log = logging.getLogger(__name__)

#: Longest line on the wire, bytes, from ``$`` to ``\n`` inclusive (as in NMEA 0183).
MAX_LINE_BYTES = 82
#: ``seq`` of :class:`CgmFrame` counts modulo this (0..65535, wraps).
SEQ_MODULO = 65536
#: Lowest glucose the protocol carries, mg/dL.
GLUCOSE_MIN_MG_DL = 39.0
#: Highest glucose the protocol carries, mg/dL.
GLUCOSE_MAX_MG_DL = 400.0
#: Longest command name (``$TLCMD,<name>``); devices echo at most this many characters.
MAX_COMMAND_NAME = 16

TALKER_CGM = "TLCGM"
TALKER_CMD = "TLCMD"
TALKER_ACK = "TLACK"
TALKER_NAK = "TLNAK"

#: Frame trace callback: ``trace(sending, data)``; ``sending`` is True for bytes written to the
#: port, False for bytes read from it; ``data`` is the chunk as it crossed the port. It runs in
#: the caller's thread and must not raise.
TraceCallback = Callable[[bool, bytes], None]

_PARITY_BITS = {"N": 0, "E": 1, "O": 1, "M": 1, "S": 1}
_STOPBITS = (1, 1.5, 2)
# Printable ASCII except '$' (0x24), '*' (0x2A) and ',' (0x2C): what a field may contain.
_FIELD_RE = re.compile(r"[\x20-\x23\x25-\x29\x2b\x2d-\x7e]*")
# A whole line without its final '\n': '$', body (printable ASCII except '$' and '*'), '*HH',
# an optional '\r'.
_LINE_RE = re.compile(rb"\$([\x20-\x23\x25-\x29\x2b-\x7e]*)\*([0-9A-Fa-f]{2})\r?")
_DELIMS_RE = re.compile(rb"[$\n]")
_UINT_RE = re.compile(r"[0-9]{1,10}")
_GLUCOSE_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9])?")
_COMMAND_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,15}")


class LineProtocolError(BridgeError, ValueError):
    """A frame or message that does not follow the line protocol (names the field)."""


class LineConfigError(BridgeError, ValueError):
    """A serial or transport setting outside what is allowed (names the field and the value)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


def checksum(body: bytes) -> int:
    """XOR of every byte of ``body`` (the bytes between ``$`` and ``*``), 0..255."""
    return reduce(xor, body, 0)


def _check_field(name: str, value: str) -> None:
    if not isinstance(value, str) or _FIELD_RE.fullmatch(value) is None:
        raise LineProtocolError(
            f"{name}={value!r}: a field must be printable ASCII without '$', '*' or ','"
        )


def encode_frame(fields: Sequence[str]) -> bytes:
    r"""Encode ``fields`` as one line: ``$`` + comma-joined fields + ``*HH\r\n``.

    Args:
        fields: at least one field, each printable ASCII without ``$``, ``*`` or ``,``.

    Returns:
        The line, at most :data:`MAX_LINE_BYTES` bytes.

    Raises:
        LineProtocolError: no field, a field with a forbidden character, or a line longer
            than :data:`MAX_LINE_BYTES` bytes.

    """
    if isinstance(fields, str | bytes) or len(fields) == 0:
        raise LineProtocolError(f"fields={fields!r}: a non-empty sequence of str is required")
    for index, field in enumerate(fields):
        _check_field(f"fields[{index}]", field)
    body = ",".join(fields).encode("ascii")
    line = b"$%s*%02X\r\n" % (body, checksum(body))
    if len(line) > MAX_LINE_BYTES:
        raise LineProtocolError(
            f"fields: the line would be {len(line)} bytes; at most {MAX_LINE_BYTES} are allowed"
        )
    return line


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    r"""One line with a valid checksum.

    Attributes:
        fields: the comma-separated fields between ``$`` and ``*`` (at least one, maybe empty).
        raw: the line as received, ``$`` to ``\n`` inclusive.

    """

    fields: tuple[str, ...]
    raw: bytes = b""

    @property
    def talker(self) -> str:
        """The first field (the message type, e.g. ``TLCGM``)."""
        return self.fields[0]


class FrameErrorKind(enum.Enum):
    """Why a line was rejected by :class:`FrameParser`."""

    CHECKSUM = "checksum"  # well formed, but the checksum does not match
    MALFORMED = "malformed"  # no '*HH', a forbidden byte, or a stray '\r'
    TRUNCATED = "truncated"  # a new '$' arrived before the line ended
    OVERLONG = "overlong"  # longer than MAX_LINE_BYTES; discarded up to the next '$' or '\n'


@dataclasses.dataclass(frozen=True, slots=True)
class FrameError:
    """A rejected line (a value, not an exception: the parser never raises on input).

    Attributes:
        kind: why it was rejected.
        raw: the rejected bytes (for an overlong line, its first :data:`MAX_LINE_BYTES` bytes).
        fields: the fields, when the line is well formed but its checksum is wrong; else None.

    """

    kind: FrameErrorKind
    raw: bytes
    fields: tuple[str, ...] | None = None


class _State(enum.Enum):
    IDLE = 0  # between lines: discard until '$'
    FRAME = 1  # inside a line
    SKIP = 2  # inside an overlong line: discard until '$' or '\n'


class FrameParser:
    r"""Streaming parser: bytes in, :class:`Frame` and :class:`FrameError` out.

    Bytes outside a line are discarded until the next ``$``; a ``$`` inside a line starts a
    new line (the unfinished one is reported as ``TRUNCATED``); a line that grows beyond
    :data:`MAX_LINE_BYTES` is reported as ``OVERLONG`` and skipped up to the next ``$`` or
    ``\n``, so the buffer never holds more than one line. Splitting the input differently
    across :meth:`feed` calls gives the same result. Every byte fed ends up in exactly one of:
    a returned :class:`Frame` (``raw``), :attr:`bytes_discarded`, or :attr:`buffered`.
    """

    def __init__(self) -> None:
        self._state = _State.IDLE
        self._buf = bytearray()
        self._discarded = 0

    @property
    def bytes_discarded(self) -> int:
        """Bytes fed so far that are not part of a valid frame (garbage, rejected lines)."""
        return self._discarded

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held for the next :meth:`feed` (< MAX_LINE_BYTES)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget an unfinished line (its bytes count as discarded), e.g. after a reconnect."""
        self._discarded += len(self._buf)
        self._buf = bytearray()
        self._state = _State.IDLE

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        """Consume ``data`` and return the lines it completes, in order.

        Args:
            data: any bytes (``bytes``, ``bytearray`` or ``memoryview``).

        Returns:
            One :class:`Frame` per valid line and one :class:`FrameError` per rejected line;
            bytes between lines are counted in :attr:`bytes_discarded` and not reported.

        """
        view = bytes(data)
        out: list[Frame | FrameError] = []
        i, n = 0, len(view)
        while i < n:
            if self._state is _State.IDLE:
                j = view.find(b"$", i)
                if j < 0:
                    self._discarded += n - i
                    break
                self._discarded += j - i
                self._buf = bytearray(b"$")
                self._state = _State.FRAME
                i = j + 1
            elif self._state is _State.FRAME:
                match = _DELIMS_RE.search(view, i)
                end = n if match is None else match.start()
                room = MAX_LINE_BYTES - 1 - len(self._buf)  # bytes allowed before the '\n'
                if end - i > room:
                    raw = bytes(self._buf) + view[i : i + room + 1]
                    out.append(FrameError(FrameErrorKind.OVERLONG, raw))
                    self._discarded += len(self._buf) + (end - i)
                    self._buf = bytearray()
                    self._state = _State.SKIP
                    i = end
                    continue
                self._buf += view[i:end]
                i = end
                if match is None:
                    break
                if view[end] == 0x24:  # '$' before the end of the line
                    out.append(FrameError(FrameErrorKind.TRUNCATED, bytes(self._buf)))
                    self._discarded += len(self._buf)
                    self._buf = bytearray(b"$")
                else:  # '\n'
                    self._buf.append(0x0A)
                    out.append(self._finish(bytes(self._buf)))
                    self._buf = bytearray()
                    self._state = _State.IDLE
                i = end + 1
            else:  # _State.SKIP
                match = _DELIMS_RE.search(view, i)
                if match is None:
                    self._discarded += n - i
                    break
                j = match.start()
                self._discarded += j - i
                if view[j] == 0x24:
                    self._buf = bytearray(b"$")
                    self._state = _State.FRAME
                else:
                    self._discarded += 1
                    self._state = _State.IDLE
                i = j + 1
        return out

    def _finish(self, line: bytes) -> Frame | FrameError:
        match = _LINE_RE.fullmatch(line, 0, len(line) - 1)
        if match is None:
            self._discarded += len(line)
            return FrameError(FrameErrorKind.MALFORMED, line)
        body = match.group(1)
        fields = tuple(body.decode("ascii").split(","))
        if checksum(body) != int(match.group(2), 16):
            self._discarded += len(line)
            return FrameError(FrameErrorKind.CHECKSUM, line, fields)
        return Frame(fields, line)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class CgmStatus(enum.IntEnum):
    """Status field of a ``$TLCGM`` frame."""

    OK = 0
    WARMUP = 1
    SENSOR_ERROR = 2
    CALIBRATION_REQUIRED = 3


class NakReason(enum.StrEnum):
    """Reasons an emulated device gives in ``$TLNAK,<cmd>,<reason>``."""

    CHECKSUM = "CHECKSUM"  # the command's checksum did not match
    UNKNOWN = "UNKNOWN"  # unknown command or message type
    ARGUMENT = "ARG"  # wrong number of arguments or an argument that is not a number
    RANGE = "RANGE"  # a numeric argument outside its range
    NOT_READY = "NOT_READY"  # the device cannot do it now (e.g. CAL during warm-up)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, slots=True)
class CgmFrame:
    """One CGM sample, ``$TLCGM,<seq>,<t_min>,<glucose_mg_dl>,<status>*HH``.

    Attributes:
        seq: frame counter, 0..65535, +1 per frame (wraps).
        t_min: simulated minute of the sample, >= 0.
        glucose_mg_dl: the reading, mg/dL, 39.0-400.0, rounded to 0.1 mg/dL (the wire carries
            one decimal); None exactly when ``status`` is not OK.
        status: sensor status.

    Raises:
        LineProtocolError: a field outside its range, or glucose present/absent against status.

    """

    seq: int
    t_min: int
    glucose_mg_dl: float | None
    status: CgmStatus

    def __post_init__(self) -> None:
        if not _is_int(self.seq) or not 0 <= self.seq < SEQ_MODULO:
            raise LineProtocolError(f"seq={self.seq!r}: an int in 0..{SEQ_MODULO - 1} required")
        if not _is_int(self.t_min) or self.t_min < 0:
            raise LineProtocolError(f"t_min={self.t_min!r}: an int >= 0 (minutes) required")
        try:
            status = CgmStatus(self.status)
        except ValueError:
            allowed = ", ".join(f"{s.value} {s.name}" for s in CgmStatus)
            raise LineProtocolError(f"status={self.status!r}: one of {allowed}") from None
        object.__setattr__(self, "status", status)
        glucose = self.glucose_mg_dl
        if status is CgmStatus.OK:
            rounded = (
                round(float(glucose), 1)
                if isinstance(glucose, int | float) and not isinstance(glucose, bool)
                else math.nan
            )
            if not GLUCOSE_MIN_MG_DL <= rounded <= GLUCOSE_MAX_MG_DL:  # NaN fails too
                raise LineProtocolError(
                    f"glucose_mg_dl={glucose!r}: a number in {GLUCOSE_MIN_MG_DL}-"
                    f"{GLUCOSE_MAX_MG_DL} mg/dL is required when status is OK"
                )
            object.__setattr__(self, "glucose_mg_dl", rounded)
        elif glucose is not None:
            raise LineProtocolError(
                f"glucose_mg_dl={glucose!r}: must be empty (None) when status is {status.name}"
            )

    def to_fields(self) -> tuple[str, ...]:
        """The frame's fields, glucose with one decimal."""
        glucose = "" if self.glucose_mg_dl is None else f"{self.glucose_mg_dl:.1f}"
        return (TALKER_CGM, str(self.seq), str(self.t_min), glucose, str(int(self.status)))

    def encode(self) -> bytes:
        """The frame as a line."""
        return encode_frame(self.to_fields())


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A host command, ``$TLCMD,<name>[,<arg>...]*HH`` (e.g. ``PING``, ``CAL,120.0``).

    Attributes:
        name: upper-case letters, digits and ``_``, starting with a letter, at most
            :data:`MAX_COMMAND_NAME` characters.
        args: the arguments as sent.

    Raises:
        LineProtocolError: a name or argument that cannot be sent.

    """

    name: str
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _COMMAND_NAME_RE.fullmatch(self.name) is None:
            raise LineProtocolError(
                f"name={self.name!r}: upper-case letters, digits and '_', starting with a "
                f"letter, 1-{MAX_COMMAND_NAME} characters"
            )
        object.__setattr__(self, "args", tuple(self.args))
        for index, arg in enumerate(self.args):
            _check_field(f"args[{index}]", arg)

    def to_fields(self) -> tuple[str, ...]:
        """The command's fields."""
        return (TALKER_CMD, self.name, *self.args)

    def encode(self) -> bytes:
        """The command as a line."""
        return encode_frame(self.to_fields())


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """The device accepted command ``command`` (``$TLACK,<cmd>[,<value>]*HH``).

    ``value``: what a query answers (``INFO``: the device's time scale), else None.
    """

    command: str
    value: str | None = None

    def __post_init__(self) -> None:
        _check_field("command", self.command)
        if self.value is not None:
            _check_field("value", self.value)

    def to_fields(self) -> tuple[str, ...]:
        """The answer's fields."""
        if self.value is None:
            return (TALKER_ACK, self.command)
        return (TALKER_ACK, self.command, self.value)

    def encode(self) -> bytes:
        """The answer as a line."""
        return encode_frame(self.to_fields())


@dataclasses.dataclass(frozen=True, slots=True)
class Nak:
    """The device refused command ``command`` (``$TLNAK,<cmd>,<reason>*HH``).

    ``reason`` is usually a :class:`NakReason` value; any field is accepted from a device.
    """

    command: str
    reason: str

    def __post_init__(self) -> None:
        _check_field("command", self.command)
        _check_field("reason", self.reason)

    def to_fields(self) -> tuple[str, ...]:
        """The answer's fields."""
        return (TALKER_NAK, self.command, str(self.reason))

    def encode(self) -> bytes:
        """The answer as a line."""
        return encode_frame(self.to_fields())


#: Any message of the protocol.
Message = CgmFrame | Command | Ack | Nak


def _expect(frame: Frame, talker: str, counts: tuple[int, ...]) -> tuple[str, ...]:
    fields = frame.fields
    if fields[0] != talker:
        raise LineProtocolError(f"talker={fields[0]!r}: {talker!r} expected")
    if len(fields) not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise LineProtocolError(
            f"{talker}: {len(fields)} fields; {expected} expected (talker included)"
        )
    return fields


def _uint(name: str, text: str) -> int:
    if _UINT_RE.fullmatch(text) is None:
        raise LineProtocolError(f"{name}={text!r}: an unsigned decimal integer expected")
    return int(text)


def parse_cgm(frame: Frame) -> CgmFrame:
    """Decode and validate a ``$TLCGM`` frame.

    Args:
        frame: a frame with a valid checksum.

    Returns:
        The sample.

    Raises:
        LineProtocolError: another talker, not 5 fields, a non-numeric field, a value out of
            range, or glucose present/absent against the status.

    """
    _, seq_text, t_text, glucose_text, status_text = _expect(frame, TALKER_CGM, (5,))
    seq = _uint("seq", seq_text)
    t_min = _uint("t_min", t_text)
    status_value = _uint("status", status_text)
    try:
        status = CgmStatus(status_value)
    except ValueError:
        raise LineProtocolError(f"status={status_text!r}: 0, 1, 2 or 3 expected") from None
    glucose: float | None = None
    if glucose_text:
        if _GLUCOSE_RE.fullmatch(glucose_text) is None:
            raise LineProtocolError(
                f"glucose_mg_dl={glucose_text!r}: a decimal number with at most one decimal "
                "expected"
            )
        glucose = float(glucose_text)
    return CgmFrame(seq, t_min, glucose, status)


def parse_command(frame: Frame) -> Command:
    """Decode a ``$TLCMD`` frame (name checked, arguments kept as text).

    Raises:
        LineProtocolError: another talker, no name, or a name that is not a command name.

    """
    fields = frame.fields
    if fields[0] != TALKER_CMD:
        raise LineProtocolError(f"talker={fields[0]!r}: {TALKER_CMD!r} expected")
    if len(fields) < 2:
        raise LineProtocolError(f"{TALKER_CMD}: the command name is missing")
    return Command(fields[1], fields[2:])


def parse_reply(frame: Frame) -> Ack | Nak:
    """Decode a ``$TLACK,<cmd>`` or ``$TLNAK,<cmd>,<reason>`` frame.

    Raises:
        LineProtocolError: another talker or a wrong field count.

    """
    if frame.fields[0] == TALKER_ACK:
        fields = _expect(frame, TALKER_ACK, (2, 3))
        return Ack(fields[1], fields[2] if len(fields) == 3 else None)
    _, command, reason = _expect(frame, TALKER_NAK, (3,))
    return Nak(command, reason)


def parse_message(frame: Frame) -> Message:
    """Decode any frame of the protocol by its talker.

    Raises:
        LineProtocolError: an unknown talker, or what the specific ``parse_*`` raises.

    """
    talker = frame.fields[0]
    if talker == TALKER_CGM:
        return parse_cgm(frame)
    if talker in (TALKER_ACK, TALKER_NAK):
        return parse_reply(frame)
    if talker == TALKER_CMD:
        return parse_command(frame)
    raise LineProtocolError(f"talker={talker!r}: unknown message type")


# --------------------------------------------------------------------------------------------
# Serial settings and wire time
# --------------------------------------------------------------------------------------------


def check_serial_settings(baudrate: int, bytesize: int, parity: str, stopbits: float) -> None:
    if not _is_int(baudrate) or baudrate <= 0:
        raise LineConfigError("baudrate", baudrate, "an int > 0 (bits per second)")
    if not _is_int(bytesize) or not 5 <= bytesize <= 8:
        raise LineConfigError("bytesize", bytesize, "5, 6, 7 or 8 (data bits)")
    if parity not in _PARITY_BITS:
        raise LineConfigError("parity", parity, "one of 'N', 'E', 'O', 'M', 'S'")
    if isinstance(stopbits, bool) or stopbits not in _STOPBITS:
        raise LineConfigError("stopbits", stopbits, "1, 1.5 or 2")


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class LineStats:
    """Counters of a :class:`LineTransport` (cumulative over reconnects).

    Attributes:
        frames_ok: frames with a valid checksum that decoded into a valid message.
        checksum_errors: well-formed lines whose checksum did not match.
        malformed: rejected lines (no ``*HH``, forbidden bytes, truncated by a new ``$``,
            overlong) and valid-checksum frames whose content does not validate.
        overlong: lines longer than :data:`MAX_LINE_BYTES` (also counted in ``malformed``).
        unexpected: valid messages the host does not expect (commands, unsolicited answers).
        bytes_discarded: bytes received that were not part of a valid frame.
        disconnects: times the port was lost.
        reconnects: times it was reopened after a loss.

    """

    frames_ok: int = 0
    checksum_errors: int = 0
    malformed: int = 0
    overlong: int = 0
    unexpected: int = 0
    bytes_discarded: int = 0
    disconnects: int = 0
    reconnects: int = 0


_IO_ERRORS = (serial.SerialException, OSError)
_READ_CHUNK = 4096
_MAX_READ_PER_POLL = 1 << 16


class LineTransport:
    """Host end of the CGM line protocol over a serial port.

    Every public method takes an internal lock, so one transport may be shared by threads
    (calls are serialised).

    Args:
        port: a device path (``/dev/ttyUSB0``, a pty link) or a pyserial URL (``loop://``).
        baudrate: bits per second.
        parity: ``N``, ``E``, ``O``, ``M`` or ``S``.
        bytesize: data bits (5-8).
        stopbits: 1, 1.5 or 2.
        timeout_s: seconds :meth:`command` waits for each answer (> 0); also the write timeout.
        retries: extra attempts of a command after a timeout (>= 0).
        reconnect_backoff_s: ``(first, max)`` seconds between reopen attempts after the port
            is lost; the wait doubles after each failed attempt up to ``max``.
        trace: optional :data:`TraceCallback` called with every chunk written and read.

    Raises:
        LineConfigError: a setting outside what is allowed.

    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        bytesize: int = 8,
        stopbits: float = 1,
        timeout_s: float = 0.2,
        retries: int = 2,
        reconnect_backoff_s: tuple[float, float] = (0.05, 2.0),
        trace: TraceCallback | None = None,
    ) -> None:
        check_serial_settings(baudrate, bytesize, parity, stopbits)
        if not isinstance(port, str) or not port:
            raise LineConfigError("port", port, "a non-empty device path or pyserial URL")
        if isinstance(timeout_s, bool) or not (
            isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0
        ):
            raise LineConfigError("timeout_s", timeout_s, "a finite number > 0 (seconds)")
        if not _is_int(retries) or retries < 0:
            raise LineConfigError("retries", retries, "an int >= 0")
        try:
            first_s, max_s = (float(v) for v in reconnect_backoff_s)
        except (TypeError, ValueError):
            raise LineConfigError(
                "reconnect_backoff_s", reconnect_backoff_s, "a pair (first, max) of seconds"
            ) from None
        if not (math.isfinite(max_s) and 0 < first_s <= max_s):
            raise LineConfigError(
                "reconnect_backoff_s", reconnect_backoff_s, "0 < first <= max (finite seconds)"
            )
        self._port_name = port
        self._settings = {
            "baudrate": baudrate,
            "parity": parity,
            "bytesize": bytesize,
            "stopbits": stopbits,
        }
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self._backoff_first_s = first_s
        self._backoff_max_s = max_s
        self.trace = trace
        self.stats = LineStats()
        #: ``time.monotonic()`` when the last valid CGM frame arrived (None: none yet).
        self.last_frame_monotonic: float | None = None
        self._lock = threading.RLock()
        self._serial: Any = None
        self._wanted = False  # open() succeeded and close() was not called
        self._parser = FrameParser()
        self._invalid_bytes = 0  # valid-checksum frames whose content did not validate
        self._samples: list[CgmFrame] = []
        self._replies: list[Ack | Nak] = []
        self._backoff_s = first_s
        self._next_attempt = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The device path or URL."""
        return self._port_name

    @property
    def connected(self) -> bool:
        """Whether the port is open now (False while waiting to reconnect)."""
        with self._lock:
            return self._serial is not None

    def open(self) -> None:
        """Open the port (a no-op when already open).

        Raises:
            CommunicationError: the port cannot be opened.

        """
        with self._lock:
            if self._serial is not None:
                return
            try:
                self._serial = self._open_port()
            except _IO_ERRORS as exc:
                error = CommunicationError(f"{self._port_name}: cannot open, {os_error_words(exc)}")
                error.reason = os_error_words(exc)
                raise error from exc
            self._wanted = True
            self._backoff_s = self._backoff_first_s

    def close(self) -> None:
        """Close the port; no reconnection is attempted until :meth:`open` is called again."""
        with self._lock:
            self._wanted = False
            self._close_port()

    def reopen(self) -> None:
        """Close the port and reopen it at the next :meth:`poll` (no wait, no backoff).

        For a device that went silent without the port hanging up: a device restarted behind
        the same path (a new pty at the same link) is only reached through a new open.
        """
        with self._lock:
            if not self._wanted:
                return
            self._close_port()
            self._backoff_s = self._backoff_first_s
            self._next_attempt = 0.0

    def __enter__(self) -> LineTransport:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open_port(self) -> Any:
        port = serial.serial_for_url(self._port_name, do_not_open=True, **self._settings)
        port.timeout = 0  # non-blocking reads; command() waits in short slices
        port.write_timeout = self.timeout_s
        port.open()
        return port

    def _close_port(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            with contextlib.suppress(*_IO_ERRORS):  # a port that already vanished
                port.close()
        self._parser.reset()
        self.stats.bytes_discarded = self._parser.bytes_discarded + self._invalid_bytes

    def _lost(self, exc: BaseException) -> None:
        """Mark the port as lost after an I/O error and schedule the first reopen attempt."""
        _log.warning("%s: port lost (%s); reconnecting with backoff", self._port_name, exc)
        self.stats.disconnects += 1
        self._close_port()
        self._backoff_s = self._backoff_first_s
        self._next_attempt = time.monotonic() + self._backoff_s

    def _ensure_connected(self) -> bool:
        """Whether the port is open, trying to reopen it if it was lost and the backoff allows.

        Raises:
            CommunicationError: the transport was never opened, or was closed.

        """
        if self._serial is not None:
            return True
        if not self._wanted:
            raise CommunicationError(f"{self._port_name}: the transport is not open")
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        try:
            self._serial = self._open_port()
        except _IO_ERRORS as exc:
            self._backoff_s = min(self._backoff_s * 2.0, self._backoff_max_s)
            self._next_attempt = now + self._backoff_s
            _log.debug("%s: reopen failed (%s)", self._port_name, exc)
            return False
        self.stats.reconnects += 1
        self._backoff_s = self._backoff_first_s
        _log.info("%s: reconnected", self._port_name)
        return True

    # -- I/O ----------------------------------------------------------------------------------

    def _read_available(self) -> bool:
        """Read and parse what the port holds now; False if the port was lost."""
        port = self._serial
        total = 0
        try:
            while total < _MAX_READ_PER_POLL:
                # A zero-timeout read (not just in_waiting) so that a hung-up port raises.
                want = max(1, min(int(port.in_waiting), _READ_CHUNK))
                data = port.read(want)
                if not data:
                    break
                total += len(data)
                self._consume(data)
                if len(data) < want:
                    break
        except _IO_ERRORS as exc:
            self._lost(exc)
            return False
        return True

    def _wait_and_read(self, wait_s: float) -> bool:
        """Block up to ``wait_s`` seconds for the first byte, then read what is there."""
        port = self._serial
        try:
            port.timeout = wait_s
            try:
                data = port.read(1)
            finally:
                port.timeout = 0
        except _IO_ERRORS as exc:
            self._lost(exc)
            return False
        if data:
            self._consume(data)
            return self._read_available()
        return True

    def _consume(self, data: bytes) -> None:
        if self.trace is not None:
            self.trace(False, bytes(data))
        stats = self.stats
        for item in self._parser.feed(data):
            if isinstance(item, FrameError):
                if item.kind is FrameErrorKind.CHECKSUM:
                    stats.checksum_errors += 1
                else:
                    stats.malformed += 1
                    if item.kind is FrameErrorKind.OVERLONG:
                        stats.overlong += 1
                continue
            try:
                message = parse_message(item)
            except LineProtocolError as exc:
                _log.debug("%s: invalid frame %r: %s", self._port_name, item.raw, exc)
                stats.malformed += 1
                self._invalid_bytes += len(item.raw)
                continue
            stats.frames_ok += 1
            if isinstance(message, CgmFrame):
                self._samples.append(message)
                self.last_frame_monotonic = time.monotonic()
            elif isinstance(message, Ack | Nak):
                self._replies.append(message)
            else:
                stats.unexpected += 1
        stats.bytes_discarded = self._parser.bytes_discarded + self._invalid_bytes

    def _write(self, data: bytes) -> None:
        try:
            self._serial.write(data)
        except _IO_ERRORS as exc:
            self._lost(exc)
            raise CommunicationError(f"{self._port_name}: write failed: {exc}") from exc
        if self.trace is not None:
            self.trace(True, data)

    # -- public I/O ---------------------------------------------------------------------------

    def poll(self) -> list[CgmFrame]:
        """Read what has arrived (never blocks) and return the complete valid CGM frames.

        Rejected lines are counted in :attr:`stats`. While the port is lost this returns ``[]``
        (and :attr:`connected` is False); it tries to reopen the port at most once per backoff
        interval.

        Raises:
            CommunicationError: the transport was never opened, or was closed.

        """
        with self._lock:
            if self._ensure_connected():
                self._read_available()
            self._drop_replies()
            samples, self._samples = self._samples, []
            return samples

    def _drop_replies(self) -> None:
        if self._replies:
            self.stats.unexpected += len(self._replies)
            self._replies.clear()

    def command(self, name: str, *args: str | int | float) -> Ack | Nak:
        """Send ``$TLCMD,<name>,<args...>`` and wait for the device's answer to it.

        CGM frames that arrive meanwhile are kept for the next :meth:`poll`. A :class:`Nak`
        (the device refused) is returned, not raised.

        Args:
            name: command name, e.g. ``PING`` or ``CAL``.
            *args: arguments; a float is sent with one decimal (``CAL`` takes mg/dL).

        Returns:
            The device's :class:`Ack` or :class:`Nak` for ``name``.

        Raises:
            LineProtocolError: a name or argument that cannot be sent.
            CommunicationError: the port is lost, or no answer within ``timeout_s`` after
                ``1 + retries`` attempts.

        """
        fields: list[str] = []
        for index, arg in enumerate(args):
            if isinstance(arg, float):
                if not math.isfinite(arg):
                    raise LineProtocolError(f"args[{index}]={arg!r}: a finite number required")
                fields.append(f"{arg:.1f}")
            elif isinstance(arg, str) or _is_int(arg):
                fields.append(str(arg))
            else:
                raise LineProtocolError(f"args[{index}]={arg!r}: str, int or float expected")
        data = Command(name, tuple(fields)).encode()
        with self._lock:
            if not self._ensure_connected():
                raise CommunicationError(f"{self._port_name}: not connected (reconnecting)")
            if not self._read_available():  # answers to earlier commands are stale now
                raise CommunicationError(f"{self._port_name}: port lost")
            self._drop_replies()
            attempts = 1 + self.retries
            for _attempt in range(attempts):
                self._write(data)
                deadline = time.monotonic() + self.timeout_s
                while True:
                    reply = self._take_reply(name)
                    if reply is not None:
                        return reply
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not self._wait_and_read(remaining):
                        raise CommunicationError(f"{self._port_name}: port lost during {name}")
            raise CommunicationError(
                f"{self._port_name}: no answer to {name} after {attempts} attempt(s) of "
                f"{self.timeout_s} s"
            )

    def _take_reply(self, name: str) -> Ack | Nak | None:
        echo = name[:MAX_COMMAND_NAME]
        while self._replies:
            reply = self._replies.pop(0)
            if reply.command == echo:
                return reply
            self.stats.unexpected += 1
        return None
