"""The CGM line protocol: checksum, framing, streaming parser, messages, transport, fuzzing."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloop.hw_bridge.emulators.cgm import CgmEmulator
from twinloop.hw_bridge.emulators.patient import VirtualPatient
from twinloop.hw_bridge.errors import BridgeError, CommunicationError
from twinloop.hw_bridge.line import (
    MAX_LINE_BYTES,
    Ack,
    CgmFrame,
    CgmStatus,
    Command,
    Frame,
    FrameError,
    FrameErrorKind,
    FrameParser,
    LineConfigError,
    LineProtocolError,
    LineTransport,
    Nak,
    checksum,
    encode_frame,
    parse_cgm,
    parse_message,
    parse_reply,
)
from twinloop.hw_bridge.pty import PtyPair

GUARD_S = 10.0  # hang guard for loops that wait for something to arrive (not a speed check)


def lines(data: bytes) -> list[Frame | FrameError]:
    return FrameParser().feed(data)


def valid(data: bytes) -> list[Frame]:
    return [item for item in lines(data) if isinstance(item, Frame)]


# --------------------------------------------------------------------------------------------
# checksum and encode_frame
# --------------------------------------------------------------------------------------------


def test_checksum_hand_computed() -> None:
    # "A,B": 'A' 0x41 ^ ',' 0x2C = 0x6D; 0x6D ^ 'B' 0x42 = 0x2F.
    assert checksum(b"A,B") == 0x2F
    # "TLCMD,PING": T 0x54 ^ L 0x4C = 0x18; ^ C 0x43 = 0x5B; ^ M 0x4D = 0x16; ^ D 0x44 = 0x52;
    # ^ ',' 0x2C = 0x7E; ^ P 0x50 = 0x2E; ^ I 0x49 = 0x67; ^ N 0x4E = 0x29; ^ G 0x47 = 0x6E.
    assert checksum(b"TLCMD,PING") == 0x6E
    assert checksum(b"") == 0
    assert checksum(b"\xff\x0f") == 0xF0


def test_encode_frame_hand_computed() -> None:
    assert encode_frame(["A", "B"]) == b"$A,B*2F\r\n"
    assert encode_frame(["TLCMD", "PING"]) == b"$TLCMD,PING*6E\r\n"
    assert Command("PING").encode() == b"$TLCMD,PING*6E\r\n"


def test_encode_checksum_is_upper_case_hex() -> None:
    line = encode_frame(["TLCGM", "7", "35", "123.4", "0"])
    assert line == b"$TLCGM,7,35,123.4,0*7A\r\n"
    assert CgmFrame(7, 35, 123.4, CgmStatus.OK).encode() == line


def test_encode_status_not_ok_leaves_glucose_empty() -> None:
    line = CgmFrame(8, 40, None, CgmStatus.WARMUP).encode()
    assert line.startswith(b"$TLCGM,8,40,,1*")
    assert int(line[-4:-2], 16) == checksum(b"TLCGM,8,40,,1")


@pytest.mark.parametrize(
    "fields",
    [
        [],
        ["A,B"],
        ["A*"],
        ["$A"],
        ["A\r"],
        ["A\n"],
        ["é"],
        ["X" * (MAX_LINE_BYTES - 5)],
    ],
    ids=["empty", "comma", "star", "dollar", "cr", "lf", "non-ascii", "too-long"],
)
def test_encode_frame_rejects(fields: list[str]) -> None:
    with pytest.raises(LineProtocolError):
        encode_frame(fields)


def test_encode_frame_longest_line_is_accepted() -> None:
    line = encode_frame(["X" * (MAX_LINE_BYTES - 6)])  # '$' + body + '*HH\r\n'
    assert len(line) == MAX_LINE_BYTES
    assert valid(line) == [Frame(("X" * (MAX_LINE_BYTES - 6),), line)]


def test_errors_subclass_builtins() -> None:
    assert issubclass(LineProtocolError, ValueError)
    assert issubclass(LineProtocolError, BridgeError)
    assert issubclass(LineConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def test_parser_resyncs_after_garbage() -> None:
    good1 = b"$A,B*2F\r\n"
    good2 = b"$TLCMD,PING*6E\r\n"
    data = b"\x00\xffnoise" + good1 + b"junk$half a line" + good2 + b"$no-end"
    parser = FrameParser()
    out = parser.feed(data)
    assert [type(item) for item in out] == [Frame, FrameError, Frame]
    assert out[0] == Frame(("A", "B"), good1)
    assert isinstance(out[1], FrameError) and out[1].kind is FrameErrorKind.TRUNCATED
    assert out[2] == Frame(("TLCMD", "PING"), good2)
    assert parser.buffered == len(b"$no-end")
    assert parser.bytes_discarded == len(data) - len(good1) - len(good2) - parser.buffered


def test_parser_byte_by_byte_equals_whole() -> None:
    data = b"xx$A,B*2F\r\n$bad*00\r\n$TLCMD,PING*6E\r\n$$" + b"a" * 100 + b"\n$A,B*2F\r\n"
    whole = FrameParser().feed(data)
    parser = FrameParser()
    split = [item for i in range(len(data)) for item in parser.feed(data[i : i + 1])]
    assert split == whole
    assert sum(isinstance(item, Frame) for item in whole) == 3


def test_parser_split_frame_across_feeds() -> None:
    parser = FrameParser()
    assert parser.feed(b"$TLCMD,PI") == []
    assert parser.buffered == len(b"$TLCMD,PI")
    assert parser.feed(b"NG*6E\r") == []
    assert parser.feed(b"\n") == [Frame(("TLCMD", "PING"), b"$TLCMD,PING*6E\r\n")]
    assert parser.buffered == 0


def test_parser_checksum_error_keeps_fields() -> None:
    (item,) = lines(b"$TLCMD,PING*6F\r\n")
    assert item == FrameError(FrameErrorKind.CHECKSUM, b"$TLCMD,PING*6F\r\n", ("TLCMD", "PING"))


@pytest.mark.parametrize(
    "line",
    [
        b"$TLCMD,PING\r\n",  # no checksum
        b"$TLCMD,PING*6\r\n",  # one hex digit
        b"$TLCMD,PING*6G\r\n",  # not hex
        b"$TLCMD,PI\x01NG*6E\r\n",  # control byte
        b"$TLCMD,\rPING*6E\r\n",  # stray CR
        b"$TLCMD,P\xc9NG*6E\r\n",  # non-ASCII byte
        b"$TL*CMD*6E\r\n",  # '*' inside the body
        b"$\n",
    ],
)
def test_parser_malformed_lines(line: bytes) -> None:
    parser = FrameParser()
    (item,) = parser.feed(line)
    assert isinstance(item, FrameError) and item.kind is FrameErrorKind.MALFORMED
    assert parser.bytes_discarded == len(line)


def test_parser_lenient_on_lower_case_hex_and_bare_newline() -> None:
    assert valid(b"$A,B*2f\r\n") == [Frame(("A", "B"), b"$A,B*2f\r\n")]
    assert valid(b"$A,B*2F\n") == [Frame(("A", "B"), b"$A,B*2F\n")]


def test_parser_overlong_line_is_discarded_up_to_the_newline() -> None:
    body = "X" * (MAX_LINE_BYTES - 5)  # one byte too long once framed
    overlong = b"$%s*%02X\r\n" % (body.encode(), checksum(body.encode()))
    assert len(overlong) == MAX_LINE_BYTES + 1
    parser = FrameParser()
    out = parser.feed(overlong + b"$A,B*2F\r\n")
    assert len(out) == 2
    assert isinstance(out[0], FrameError) and out[0].kind is FrameErrorKind.OVERLONG
    assert len(out[0].raw) == MAX_LINE_BYTES
    assert out[1] == Frame(("A", "B"), b"$A,B*2F\r\n")
    assert parser.bytes_discarded == len(overlong)


def test_parser_overlong_line_resyncs_on_dollar_and_stays_bounded() -> None:
    parser = FrameParser()
    out = parser.feed(b"$" + b"Y" * 10_000)
    assert [item.kind for item in out if isinstance(item, FrameError)] == [FrameErrorKind.OVERLONG]
    assert parser.buffered == 0
    out = parser.feed(b"Z" * 10_000 + b"$A,B*2F\r\n")
    assert out == [Frame(("A", "B"), b"$A,B*2F\r\n")]
    for chunk in (b"$", b"Q" * 50, b"Q" * 50, b"Q" * 50):
        parser.feed(chunk)
        assert parser.buffered < MAX_LINE_BYTES


def test_parser_reset_forgets_partial_line() -> None:
    parser = FrameParser()
    parser.feed(b"$A,B*2")
    parser.reset()
    assert parser.buffered == 0
    assert parser.feed(b"F\r\n") == []
    assert parser.bytes_discarded == len(b"$A,B*2F\r\n")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_parser_any_bytes_property(data: bytes, cuts: list[int]) -> None:
    parser = FrameParser()
    whole = parser.feed(data)
    frames = [item for item in whole if isinstance(item, Frame)]
    for frame in frames:
        body = frame.raw[1 : frame.raw.rindex(b"*")]
        assert int(frame.raw[len(body) + 2 : len(body) + 4], 16) == checksum(body)
        assert len(frame.raw) <= MAX_LINE_BYTES
    # Every byte is in a frame, discarded, or buffered.
    assert sum(len(f.raw) for f in frames) + parser.bytes_discarded + parser.buffered == len(data)
    # The result does not depend on how the input is split.
    split = FrameParser()
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    pieces = [item for a, b in itertools.pairwise(bounds) for item in split.feed(data[a:b])]
    assert pieces == whole


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(0, 65535),
    t_min=st.integers(0, 10**9),
    status=st.sampled_from(CgmStatus),
    glucose=st.floats(39.0, 400.0),
)
def test_cgm_frame_round_trip_property(
    seq: int, t_min: int, status: CgmStatus, glucose: float
) -> None:
    frame = CgmFrame(seq, t_min, glucose if status is CgmStatus.OK else None, status)
    (decoded,) = valid(frame.encode())
    assert parse_cgm(decoded) == frame


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        CgmFrame(0, 0, 39.0, CgmStatus.OK),
        CgmFrame(65535, 1440, 400.0, CgmStatus.OK),
        CgmFrame(12, 60, None, CgmStatus.WARMUP),
        CgmFrame(13, 65, None, CgmStatus.SENSOR_ERROR),
        CgmFrame(14, 70, None, CgmStatus.CALIBRATION_REQUIRED),
        Command("PING"),
        Command("CAL", ("120.5",)),
        Ack("PING"),
        Nak("CAL", "RANGE"),
    ],
    ids=repr,
)
def test_message_round_trip(message: CgmFrame | Command | Ack | Nak) -> None:
    (frame,) = valid(message.encode())
    assert parse_message(frame) == message


def test_cgm_frame_rounds_to_one_decimal() -> None:
    frame = CgmFrame(1, 5, 120.04, CgmStatus.OK)
    assert frame.glucose_mg_dl == 120.0
    assert parse_cgm(valid(frame.encode())[0]) == frame


@pytest.mark.parametrize(
    "fields",
    [
        ("TLCGM", "1", "5", "120.0"),  # 4 fields
        ("TLCGM", "1", "5", "120.0", "0", "x"),  # 6 fields
        ("TLCMD", "1", "5", "120.0", "0"),  # another talker
        ("TLCGM", "65536", "5", "120.0", "0"),  # seq out of range
        ("TLCGM", "-1", "5", "120.0", "0"),
        ("TLCGM", "", "5", "120.0", "0"),
        ("TLCGM", "1", "1.5", "120.0", "0"),  # t_min not an integer
        ("TLCGM", "1", "5", "38.9", "0"),  # glucose below 39
        ("TLCGM", "1", "5", "400.1", "0"),  # glucose above 400
        ("TLCGM", "1", "5", "nan", "0"),
        ("TLCGM", "1", "5", "1e2", "0"),
        ("TLCGM", "1", "5", "120.25", "0"),  # two decimals
        ("TLCGM", "1", "5", " 120.0", "0"),
        ("TLCGM", "1", "5", "", "0"),  # OK without glucose
        ("TLCGM", "1", "5", "120.0", "1"),  # glucose with WARMUP
        ("TLCGM", "1", "5", "", "4"),  # unknown status
        ("TLCGM", "1", "5", "", ""),
    ],
)
def test_parse_cgm_rejects(fields: tuple[str, ...]) -> None:
    with pytest.raises(LineProtocolError):
        parse_cgm(Frame(fields))


def test_parse_reply_and_rejections() -> None:
    assert parse_reply(Frame(("TLACK", "PING"))) == Ack("PING")
    assert parse_reply(Frame(("TLNAK", "CAL", "ARG"))) == Nak("CAL", "ARG")
    assert parse_reply(Frame(("TLACK", "INFO", "0.05"))) == Ack("INFO", "0.05")  # a query's value
    for fields in [("TLACK",), ("TLACK", "A", "B", "C"), ("TLNAK", "CAL"), ("TLCGM", "x")]:
        with pytest.raises(LineProtocolError):
            parse_reply(Frame(fields))
    with pytest.raises(LineProtocolError, match="unknown"):
        parse_message(Frame(("GPGGA", "1")))


@pytest.mark.parametrize("name", ["", "ping", "1PING", "A" * 17, "PI NG", "PI,NG"])
def test_command_name_validation(name: str) -> None:
    with pytest.raises(LineProtocolError):
        Command(name)


def test_cgm_frame_validation() -> None:
    with pytest.raises(LineProtocolError, match="seq"):
        CgmFrame(-1, 0, 100.0, CgmStatus.OK)
    with pytest.raises(LineProtocolError, match="t_min"):
        CgmFrame(0, -5, 100.0, CgmStatus.OK)
    with pytest.raises(LineProtocolError, match="glucose"):
        CgmFrame(0, 0, float("nan"), CgmStatus.OK)
    with pytest.raises(LineProtocolError, match="glucose"):
        CgmFrame(0, 0, 100.0, CgmStatus.SENSOR_ERROR)
    with pytest.raises(LineProtocolError, match="status"):
        CgmFrame(0, 0, None, 7)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# wire time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"baudrate": 0},
        {"baudrate": 9600.0},
        {"baudrate": 9600, "bytesize": 9},
        {"baudrate": 9600, "parity": "X"},
        {"baudrate": 9600, "stopbits": 3},
    ],
)
def test_serial_settings_are_checked(kwargs: dict[str, object]) -> None:
    with pytest.raises(LineConfigError):
        LineTransport("loop://", **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# transport (pyserial over loop:// and over a pty pair)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"retries": -1},
        {"reconnect_backoff_s": (0.0, 1.0)},
        {"reconnect_backoff_s": (2.0, 1.0)},
        {"parity": "Q"},
    ],
)
def test_transport_rejects_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(LineConfigError):
        LineTransport("loop://", **kwargs)  # type: ignore[arg-type]


def test_transport_must_be_open() -> None:
    transport = LineTransport("loop://")
    with pytest.raises(CommunicationError):
        transport.poll()
    with pytest.raises(CommunicationError):
        transport.command("PING")
    with pytest.raises(CommunicationError, match="cannot open"):
        LineTransport("/nonexistent/twinloop-tty").open()


def test_transport_command_times_out_and_retries_over_loopback() -> None:
    sent: list[bytes] = []
    received: list[bytes] = []

    def trace(sending: bool, data: bytes) -> None:
        (sent if sending else received).append(data)

    with LineTransport("loop://", timeout_s=0.02, retries=2, trace=trace) as transport:
        with pytest.raises(CommunicationError, match="no answer to PING after 3"):
            transport.command("PING")
        assert sent == [b"$TLCMD,PING*6E\r\n"] * 3
        # loop:// echoes the commands back: valid frames, but not answers.
        assert b"".join(received) == b"$TLCMD,PING*6E\r\n" * 3
        assert transport.stats.unexpected == 3
        assert transport.poll() == []


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    pair = PtyPair()
    yield pair
    pair.close()


@pytest.fixture
def device_end(pty_pair: PtyPair) -> Iterator[serial.Serial]:
    port = serial.Serial(pty_pair.a, timeout=0.05)
    yield port
    port.close()


def poll_until(transport: LineTransport, done: Callable[[list[CgmFrame]], bool]) -> list[CgmFrame]:
    frames: list[CgmFrame] = []
    deadline = time.monotonic() + GUARD_S
    while not done(frames):
        assert time.monotonic() < deadline, f"gave up waiting; got {frames}"
        frames += transport.poll()
        time.sleep(0.002)
    return frames


def test_transport_poll_frames_and_stats(pty_pair: PtyPair, device_end: serial.Serial) -> None:
    with LineTransport(pty_pair.b) as transport:
        assert transport.poll() == []
        assert transport.last_frame_monotonic is None
        f1 = CgmFrame(1, 5, 101.5, CgmStatus.OK)
        f2 = CgmFrame(2, 10, None, CgmStatus.SENSOR_ERROR)
        bad = bytearray(f1.encode())
        bad[-4:-2] = b"00"
        junk = b"\x00garbage"
        device_end.write(junk + bytes(bad) + f1.encode()[:10])
        bad2 = b"$TLCGM,3,15,999.0,0*00\r\n"
        out_of_range = encode_frame(["TLCGM", "3", "15", "999.0", "0"])  # valid checksum
        device_end.write(f1.encode()[10:] + bad2)
        device_end.write(out_of_range + f2.encode())
        frames = poll_until(transport, lambda got: len(got) >= 2)
        assert frames == [f1, f2]
        assert transport.stats.frames_ok == 2
        assert transport.stats.checksum_errors == 2
        assert transport.stats.malformed == 1
        assert transport.stats.bytes_discarded == len(junk + bad + bad2 + out_of_range)
        assert transport.last_frame_monotonic is not None


@contextlib.contextmanager
def responder(port: serial.Serial, answer: Callable[[Frame, int], bytes | None]) -> Iterator[None]:
    """A scripted device: for the n-th frame received, write ``answer(frame, n)``."""
    stop = threading.Event()

    def run() -> None:
        parser = FrameParser()
        count = 0
        while not stop.is_set():
            data = port.read(1) + port.read(port.in_waiting)  # port timeout: 50 ms
            for item in parser.feed(data):
                if isinstance(item, Frame):
                    reply = answer(item, count)
                    count += 1
                    if reply:
                        port.write(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def test_transport_command_ack_nak_and_retry(pty_pair: PtyPair, device_end: serial.Serial) -> None:
    sample = CgmFrame(4, 20, 150.0, CgmStatus.OK)

    def answer(frame: Frame, n: int) -> bytes | None:
        if n == 0:
            return None  # the first attempt is lost: the transport must retry
        if frame.fields[1] == "PING":
            return sample.encode() + Ack("PING").encode()
        return Nak(frame.fields[1], "RANGE").encode()

    writes: list[bytes] = []
    transport = LineTransport(
        pty_pair.b, timeout_s=0.3, retries=1, trace=lambda s, d: writes.append(d) if s else None
    )
    with transport, responder(device_end, answer):
        assert transport.command("PING") == Ack("PING")
        assert writes == [b"$TLCMD,PING*6E\r\n"] * 2
        assert transport.command("CAL", 500.0) == Nak("CAL", "RANGE")
        assert writes[-1] == Command("CAL", ("500.0",)).encode()
        assert transport.poll() == [sample]  # kept while waiting for the answer


def test_pulled_cable_then_reconnect(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path)
    transport = LineTransport(pair.b, reconnect_backoff_s=(0.01, 0.05))
    try:
        transport.open()
        pair.close()
        deadline = time.monotonic() + GUARD_S
        while transport.connected:
            assert time.monotonic() < deadline
            assert transport.poll() == []
        assert transport.poll() == []
        assert transport.stats.disconnects == 1
        with pytest.raises(CommunicationError):
            transport.command("PING")
        pair = PtyPair(tmp_path)  # the cable is plugged back in
        while not transport.connected:
            assert time.monotonic() < deadline
            transport.poll()
            time.sleep(0.005)
        assert transport.stats.reconnects == 1
        with serial.Serial(pair.a) as device:
            device.write(CgmFrame(9, 45, 88.8, CgmStatus.OK).encode())
            frames = poll_until(transport, bool)
        assert frames == [CgmFrame(9, 45, 88.8, CgmStatus.OK)]
    finally:
        transport.close()
        pair.close()


def test_reopen_reaches_a_device_restarted_behind_the_same_link(tmp_path: Path) -> None:
    link = str(tmp_path / "cgm")
    old = PtyPair(links=(str(tmp_path / "dev-old"), link))
    transport = LineTransport(link)
    new: PtyPair | None = None
    try:
        transport.open()
        os.unlink(link)  # the link moves to a new device while the old pty stays up (silent)
        new = PtyPair(links=(str(tmp_path / "dev-new"), link))
        frame = CgmFrame(3, 15, 123.4, CgmStatus.OK)
        with serial.Serial(new.a) as device:
            device.write(frame.encode())
            device.flush()
            time.sleep(0.05)
            assert transport.poll() == []  # still on the old pty: nothing arrives
            assert transport.connected
            transport.reopen()
            transport.poll()  # opens the port the link now names
            device.write(frame.encode())
            assert set(poll_until(transport, bool)) == {frame}
        assert transport.stats.reconnects == 1
    finally:
        transport.close()
        old.close()
        if new is not None:
            new.close()


def test_reconnect_waits_for_the_backoff(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path)
    transport = LineTransport(pair.b, reconnect_backoff_s=(60.0, 60.0))
    try:
        transport.open()
        pair.close()
        deadline = time.monotonic() + GUARD_S
        while transport.connected:
            assert time.monotonic() < deadline
            transport.poll()
        pair = PtyPair(tmp_path)  # back, but the next attempt is a minute away
        for _ in range(20):
            assert transport.poll() == []
        assert not transport.connected
        assert transport.stats.reconnects == 0
    finally:
        transport.close()
        pair.close()


# --------------------------------------------------------------------------------------------
# fuzzing: ≥10,000 random and mutated frames into the parser and into a running emulator
# --------------------------------------------------------------------------------------------

N_FUZZ = 12_000


def _random_message(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        status = rng.choice(list(CgmStatus))
        glucose = round(rng.uniform(39, 400), 1) if status is CgmStatus.OK else None
        return CgmFrame(rng.randrange(65536), rng.randrange(10**6), glucose, status).encode()
    if kind == 1:
        return Command("PING").encode()
    if kind == 2:
        return Command("CAL", (f"{rng.uniform(0, 600):.1f}",)).encode()
    if kind == 3:
        return Ack(rng.choice(["PING", "CAL"])).encode()
    if kind == 4:
        return Nak("CAL", rng.choice(["RANGE", "ARG"])).encode()
    printable = "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(1, 30)))
    fields = [f for f in printable.replace("$", "").replace("*", "").split(",")] or ["X"]
    return encode_frame(["TLCMD", *fields][:10])


def _mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    op = rng.randrange(10)
    pos = rng.randrange(len(data))
    if op == 0:
        data[pos] ^= 1 << rng.randrange(8)
    elif op == 1:
        data[pos] = rng.randrange(256)
    elif op == 2:
        del data[pos]
    elif op == 3:
        data.insert(pos, rng.randrange(256))
    elif op == 4:
        del data[pos:]
    elif op == 5:
        data[pos:pos] = data[: rng.randrange(len(data))]
    elif op == 6:
        data.insert(pos, ord("$"))
    elif op == 7:
        data[1:1] = b"X" * rng.randrange(60, 200)  # overlong
    elif op == 8:
        data = bytearray(rng.randbytes(rng.randrange(120)))
    else:
        data = bytearray(b"$" + rng.randbytes(rng.randrange(90)) + b"\n")
    return bytes(data)


def fuzz_stream(seed: int, n: int) -> tuple[list[bytes], list[bytes]]:
    """``n`` chunks (one in three an intact frame), and the intact frames in order."""
    rng = random.Random(seed)
    chunks: list[bytes] = []
    intact: list[bytes] = []
    for _ in range(n):
        line = _random_message(rng)
        if rng.random() < 1 / 3:
            intact.append(line)
            chunks.append(line)
        else:
            chunks.append(_mutate(rng, line))
    return chunks, intact


def test_fuzz_parser() -> None:
    chunks, intact = fuzz_stream(seed=2024, n=N_FUZZ)
    data = b"".join(chunks)
    rng = random.Random(7)
    parser = FrameParser()
    out: list[Frame | FrameError] = []
    i = 0
    while i < len(data):  # random split points
        step = rng.randrange(1, 200)
        out += parser.feed(data[i : i + step])
        i += step
    frames = [item.raw for item in out if isinstance(item, Frame)]
    for raw in frames:
        body = raw[1 : raw.rindex(b"*")]
        assert int(raw[len(body) + 2 : len(body) + 4], 16) == checksum(body)
    # Every intact frame is recovered, in order, whatever garbage came before it.
    it = iter(frames)
    assert all(any(raw == good for raw in it) for good in intact)
    assert sum(len(raw) for raw in frames) + parser.bytes_discarded + parser.buffered == len(data)
    kinds = {item.kind for item in out if isinstance(item, FrameError)}
    assert kinds == set(FrameErrorKind)


@pytest.mark.hil
def test_fuzz_emulator_command_input(pty_pair: PtyPair) -> None:
    chunks, _ = fuzz_stream(seed=99, n=N_FUZZ)
    patient = VirtualPatient(seed=0)
    emulator = CgmEmulator(patient, pty_pair.a, baudrate=921600)
    emulator.start()
    try:
        with serial.Serial(pty_pair.b, timeout=0, write_timeout=GUARD_S) as host:
            for start in range(0, len(chunks), 50):
                host.write(b"".join(chunks[start : start + 50]))
                host.read(host.in_waiting)  # drain the device's answers
        assert emulator.stats.frames_received > N_FUZZ // 4
        assert emulator.stats.naks > 0 and emulator.stats.ignored > 0
        with LineTransport(pty_pair.b, timeout_s=1.0, retries=2) as transport:
            assert transport.command("PING") == Ack("PING")
            assert transport.command("PING") == Ack("PING")
        assert emulator.stats.internal_errors == 0
        assert emulator.connected
    finally:
        emulator.stop()
