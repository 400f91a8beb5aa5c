"""Shared pieces of the device fuzz tests (``test_fuzz_devices.py``).

Raw Modbus frames built here from the spec (MBAP header; RTU with its CRC-16), the check that an
answer is a well-formed reply or a Modbus exception, a pipelined Modbus TCP fuzz runner and a
parser of an RTU answer stream. Nothing here knows a device's register map: the tests give it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import socket
import struct
from collections.abc import Callable

#: Exception codes a device may answer (01-04, 06 busy, 0x0B gateway target failed to respond).
EXCEPTION_CODES = frozenset({1, 2, 3, 4, 6, 0x0B})
#: Function codes tried: the implemented ones and many others (diagnostics, file, FIFO, MEI,
#: 0, and codes with the exception bit already set).
FUZZ_FUNCTIONS = (1, 2, 3, 4, 5, 6, 15, 16, 7, 8, 11, 17, 20, 22, 23, 24, 43, 0, 0x7F, 0x81, 0xFF)
#: Floats a register pair may carry that no device may accept as a dose or rate.
HOSTILE_FLOATS = (
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    3.4e38,
    -3.4e38,
    1e9,
    1e6,
    -1.0,
    -1e-45,
)
#: Longest PDU in an MBAP frame (unit id + PDU <= 254 bytes).
MAX_PDU = 253


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu(unit: int, pdu: bytes) -> bytes:
    """An RTU frame: device id, PDU, CRC (low byte first)."""
    body = bytes([unit]) + pdu
    return body + crc16(body).to_bytes(2, "little")


def mbap(tid: int, unit: int, pdu: bytes, *, protocol: int = 0, length: int | None = None) -> bytes:
    """A Modbus TCP frame: MBAP header (length = unit id + PDU unless given) and PDU."""
    size = len(pdu) + 1 if length is None else length
    return struct.pack(">HHHB", tid, protocol, size, unit) + pdu


def f32(value: float) -> bytes:
    """A float32 as two registers, big-endian, high word first."""
    return struct.pack(">f", value)


def read_pdu(function: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function, address, count)


def write_single_pdu(address: int, word: int) -> bytes:
    return struct.pack(">BHH", 6, address, word & 0xFFFF)


def write_multiple_pdu(address: int, data: bytes, *, count: int | None = None) -> bytes:
    """Function 16 with ``data`` (its register count taken from it unless ``count``)."""
    n = len(data) // 2 if count is None else count
    return struct.pack(">BHHB", 16, address, n, len(data) & 0xFF) + data


def random_pdu(rng: random.Random, addresses: list[int]) -> bytes:
    """A PDU with a random function code, address, count and payload (often malformed)."""
    function = rng.choice(FUZZ_FUNCTIONS)
    if rng.random() < 0.3:
        return bytes([function]) + rng.randbytes(rng.choice([0, 1, 2, 3, 4, 5, 6, 9, 20, 60]))
    address = rng.choice([*addresses, 0xFFFF, 0xFFFE, rng.randrange(65536)])
    count = rng.choice([0, 1, 2, 3, 5, 8, 13, 14, 125, 126, 2000, 2001, 0xFFFF])
    pdu = struct.pack(">BHH", function, address, count)
    if function in (15, 16, 23):
        byte_count = rng.choice([0, 1, 2, 4, 2 * count & 0xFF, rng.randrange(256)])
        pdu += bytes([byte_count]) + rng.randbytes(rng.choice([0, byte_count, byte_count + 1]))
    return pdu[:MAX_PDU]


def reply_problem(request: bytes, reply: bytes) -> str | None:
    """Why ``reply`` is neither a well-formed answer to ``request`` nor an exception, or ``None``.

    Both are PDUs (function code first). An exception is two bytes, the request's function code
    with bit 7 set (0x80 when the request's code had it already or was 0) and a known code. A
    normal answer carries the request's function code: reads a byte count matching the quantity
    asked (and that many bytes), writes the echo of address and quantity (or value).
    """
    if len(reply) < 2 or not request:
        return f"short reply {reply.hex()}"
    function, asked = reply[0], request[0]
    if function & 0x80:
        expected = asked | 0x80 if 0 < asked < 0x80 else None
        if len(reply) != 2 or reply[1] not in EXCEPTION_CODES:
            return f"malformed exception {reply.hex()} to {request.hex()}"
        if expected is not None and function != expected:
            return f"exception {reply.hex()} does not name function {asked}"
        return None
    if function != asked or asked not in (1, 2, 3, 4, 5, 6, 15, 16) or len(request) < 5:
        return f"normal reply {reply.hex()} to {request.hex()}"
    count = int.from_bytes(request[3:5], "big")
    if asked in (1, 2, 3, 4):
        size = 2 * count if asked in (3, 4) else (count + 7) // 8
        if reply[1] != size or len(reply) != 2 + size:
            return f"read reply {reply.hex()} does not carry {count} items"
        return None
    if reply != request[:5]:
        return f"write reply {reply.hex()} is not the echo of {request[:5].hex()}"
    return None


@dataclasses.dataclass(frozen=True)
class Sent:
    """A frame for a device: unit id, PDU, and what the device must do with it.

    ``unsafe``: a write the device must refuse (answer with an exception). ``marker``: a frame
    the device must not execute (another unit, a broadcast, a bad CRC): it carries values that
    no executable frame of the run carries, so its execution would show in the device's state.
    """

    unit: int
    pdu: bytes
    unsafe: bool = False
    marker: bool = False


@dataclasses.dataclass(frozen=True)
class Exchange:
    """A sound request and the reply it got."""

    sent: Sent
    reply: bytes


@dataclasses.dataclass
class TcpFuzzResult:
    """What a TCP fuzz run sent and got back."""

    frames: int = 0
    sound: int = 0
    exchanges: list[Exchange] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    stray_replies: int = 0


def _split_mbap(buffer: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """Complete MBAP frames ``(tid, unit, pdu)`` at the start of ``buffer``, and the rest."""
    frames = []
    while len(buffer) >= 7:
        tid, protocol, length = struct.unpack(">HHH", buffer[:6])
        if protocol != 0 or not 2 <= length <= MAX_PDU + 1:
            raise AssertionError(f"malformed MBAP reply header {buffer[:8].hex()}")
        if len(buffer) < 6 + length:
            break
        frames.append((tid, buffer[6], buffer[7 : 6 + length]))
        buffer = buffer[6 + length :]
    return frames, buffer


def hostile_stream(rng: random.Random, unit: int, pdu: bytes) -> bytes:
    """Bytes that are not a sound MBAP frame: random, bad protocol, bad length, oversized."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 40))
    if kind == 1:
        return mbap(rng.randrange(65536), unit, pdu, protocol=rng.randrange(1, 65536))
    if kind == 2:  # a length that disagrees with the body (longer or shorter)
        return mbap(rng.randrange(65536), unit, pdu, length=rng.choice([0, 1, 255, 65535]))
    if kind == 3:  # oversized: a PDU longer than 253 bytes, length field true
        return mbap(rng.randrange(65536), unit, pdu + rng.randbytes(300))
    if kind == 4:  # truncated
        frame = mbap(rng.randrange(65536), unit, pdu)
        return frame[: rng.randrange(1, len(frame))]
    return mbap(rng.randrange(65536), unit, b"")  # length 1: a unit id and no PDU


def _read_reply(sock: socket.socket, buffer: bytes) -> tuple[tuple[int, int, bytes], bytes]:
    """The next MBAP reply on ``sock`` (``buffer``: bytes already read) and the bytes after it."""
    while True:
        frames, rest = _split_mbap(buffer)
        if frames:
            consumed = sum(7 + len(pdu) for _, _, pdu in frames[1:])
            return frames[0], buffer[len(buffer) - len(rest) - consumed :]
        chunk = sock.recv(65536)  # TimeoutError: a sound frame went unanswered
        if not chunk:
            raise AssertionError("the device closed the connection before answering")
        buffer += chunk


def tcp_fuzz(
    address: tuple[str, int],
    rng: random.Random,
    n_frames: int,
    make: Callable[[random.Random], Sent],
    *,
    between: Callable[[], None] | None = None,
    batch: int = 120,
    read_timeout_s: float = 2.0,
) -> TcpFuzzResult:
    """Send ``n_frames`` frames over fresh connections and collect the replies.

    Each connection carries up to ``batch`` sound frames, one at a time (pymodbus 3.16's server
    decodes one frame per received segment and drops a receive buffer over 516 bytes, so
    requests cannot be pipelined), often followed by one hostile stream
    (:func:`hostile_stream`) after which the connection is closed. Every sound frame must be
    answered with its transaction id and unit id (``read_timeout_s`` per read bounds a silent
    device); replies are checked with :func:`reply_problem` and by the caller through
    ``exchanges``. Bytes answering the hostile tail must still be well-formed MBAP frames
    (counted in ``stray_replies``). ``between()`` runs after each connection.
    """
    result = TcpFuzzResult()
    while result.frames < n_frames:
        with socket.create_connection(address, timeout=read_timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = b""
            for tid in range(1, min(rng.randrange(1, batch + 1), n_frames - result.frames) + 1):
                frame = make(rng)
                sock.sendall(mbap(tid, frame.unit, frame.pdu))
                (got_tid, unit, reply), buffer = _read_reply(sock, buffer)
                if (got_tid, unit) != (tid, frame.unit) or buffer:
                    raise AssertionError(f"reply tid {got_tid} unit {unit} to {tid}/{frame.unit}")
                problem = reply_problem(frame.pdu, reply)
                if problem is not None:
                    result.problems.append(problem)
                result.exchanges.append(Exchange(frame, reply))
                result.frames += 1
                result.sound += 1
            if result.frames < n_frames and rng.random() < 0.5:
                unit = rng.choice([0, 1, 255, 7])
                sock.sendall(hostile_stream(rng, unit, random_pdu(rng, [0, 1, 2])))
                result.frames += 1
                sock.settimeout(0.05)
                try:
                    while chunk := sock.recv(65536):
                        frames, buffer = _split_mbap(buffer + chunk)
                        for _, _, pdu in frames:
                            result.stray_replies += 1
                            if len(pdu) < 2:
                                raise AssertionError(f"malformed stray reply {pdu.hex()}")
                except (TimeoutError, ConnectionResetError):
                    pass  # silence or a closed connection after a broken frame
        if between is not None:
            between()
    return result


def split_rtu_replies(stream: bytes, unit: int) -> list[bytes]:
    """The PDUs of a stream of RTU replies from device ``unit``; raises on anything malformed.

    A reply's length follows from its function code: exceptions 2 bytes, reads a byte count,
    writes (5, 6, 15, 16) 5 bytes; each must carry the device id and a correct CRC.
    """
    pdus = []
    at = 0
    while at < len(stream):
        head = stream[at : at + 3]
        if len(head) < 3 or head[0] != unit:
            raise AssertionError(
                f"RTU reply at byte {at} is malformed: {stream[at : at + 9].hex()}"
            )
        function = head[1]
        if function & 0x80:
            size = 2
        elif function in (1, 2, 3, 4):
            size = 2 + head[2]
        elif function in (5, 6, 15, 16):
            size = 5
        else:
            raise AssertionError(f"RTU reply at byte {at} has function {function}")
        frame = stream[at : at + 1 + size + 2]
        if len(frame) < 1 + size + 2 or crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            raise AssertionError(f"RTU reply at byte {at} is cut or has a bad CRC: {frame.hex()}")
        pdus.append(frame[1:-2])
        at += len(frame)
    return pdus


def exchange(address: tuple[str, int], unit: int, pdu: bytes) -> bytes:
    """One request on a fresh connection; the reply PDU (checked by :func:`reply_problem`)."""
    result = tcp_fuzz(address, random.Random(0), 1, lambda _: Sent(unit, pdu))
    assert not result.problems, result.problems
    return result.exchanges[0].reply
