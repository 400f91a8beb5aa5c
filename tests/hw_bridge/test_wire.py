"""Unit tests of hw_bridge.wire: serial timing arithmetic and the fault switches (no I/O)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, WriteMultipleRegistersRequest

from twinloop.hw_bridge.wire import (
    FIXED_SILENT_INTERVAL_S,
    SerialLine,
    WireFaults,
    WireHooks,
    char_time_s,
    precise_sleep,
    refuse,
    rtu_cycle_wire_time_s,
    rtu_frame_time_s,
    rtu_silent_interval_s,
)


@pytest.mark.parametrize(
    ("baudrate", "bytesize", "parity", "stopbits", "bits"),
    [
        (115200, 8, "E", 1, 11),  # the pump's default line: start + 8 + parity + stop
        (9600, 8, "N", 1, 10),  # the CGM's line
        (19200, 8, "N", 2, 11),
        (9600, 7, "O", 1, 10),
        (38400, 8, "E", 2, 12),
    ],
)
def test_char_time_counts_start_data_parity_stop_bits(baudrate, bytesize, parity, stopbits, bits):
    got = char_time_s(baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits)
    assert got == pytest.approx(bits / baudrate, rel=1e-12)


def test_char_time_of_115200_8e1_is_95_5_us():
    assert char_time_s(115200) == pytest.approx(95.486e-6, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"baudrate": 0}, "baudrate"),
        ({"baudrate": math.nan}, "baudrate"),
        ({"baudrate": 9600, "bytesize": 9}, "bytesize"),
        ({"baudrate": 9600, "parity": "X"}, "parity"),
        ({"baudrate": 9600, "stopbits": 3}, "stopbits"),
    ],
)
def test_char_time_rejects_bad_settings_naming_the_field(kwargs, field):
    baudrate = kwargs.pop("baudrate")
    with pytest.raises(ValueError, match=field):
        char_time_s(baudrate, **kwargs)


@pytest.mark.parametrize(
    ("baudrate", "parity", "expected_s"),
    [
        (9600, "N", 3.5 * 10 / 9600),  # 3.646 ms
        (9600, "E", 3.5 * 11 / 9600),  # 4.010 ms
        (19200, "E", 3.5 * 11 / 19200),  # 2.005 ms: at 19200 the rule still computes
        (19201, "E", 1.75e-3),  # above 19200: fixed
        (38400, "N", 1.75e-3),
        (115200, "E", 1.75e-3),
    ],
)
def test_silent_interval_is_3_5_chars_up_to_19200_then_fixed(baudrate, parity, expected_s):
    assert rtu_silent_interval_s(baudrate, parity=parity) == pytest.approx(expected_s, rel=1e-12)
    assert FIXED_SILENT_INTERVAL_S == 1.75e-3


def test_frame_time_is_bytes_times_char_time():
    # read 13 input registers: 8-byte request, 5 + 2·13 = 31-byte response
    assert rtu_frame_time_s(8, 115200) == pytest.approx(8 * 11 / 115200)
    assert rtu_frame_time_s(31, 9600, parity="N") == pytest.approx(31 * 10 / 9600)
    assert rtu_frame_time_s(0, 9600) == 0.0
    with pytest.raises(ValueError, match="n_bytes"):
        rtu_frame_time_s(-1, 9600)


def test_cycle_time_is_both_frames_plus_a_silence_after_each():
    # 115200 8E1: 39 chars · 95.486 µs + 2 · 1.75 ms = 7.224 ms
    assert rtu_cycle_wire_time_s(8, 31, 115200) == pytest.approx(39 * 11 / 115200 + 3.5e-3)
    assert rtu_cycle_wire_time_s(8, 31, 115200) == pytest.approx(7.224e-3, abs=1e-6)
    # 9600 8N1: 39 chars · 1.0417 ms + 2 · 3.646 ms = 47.92 ms
    expected = 39 * 10 / 9600 + 2 * 3.5 * 10 / 9600
    assert rtu_cycle_wire_time_s(8, 31, 9600, parity="N") == pytest.approx(expected)


def test_serial_line_agrees_with_the_functions():
    line = SerialLine(baudrate=9600, parity="N")
    assert line.char_time_s == char_time_s(9600, parity="N")
    assert line.silent_interval_s == rtu_silent_interval_s(9600, parity="N")
    assert line.frame_time_s(8) == pytest.approx(rtu_frame_time_s(8, 9600, parity="N"))
    with pytest.raises(ValueError, match="parity"):
        SerialLine(parity="Q")


def test_precise_sleep_returns_for_zero_and_negative():
    # Sanity bounds only, generous for a loaded machine: non-positive durations return at once
    # (well under 50 ms; -1 s must not be read as 1 s), a positive one waits at least its time.
    for seconds in (0.0, -1.0):
        start = time.perf_counter()
        precise_sleep(seconds)
        assert time.perf_counter() - start < 0.05, seconds
    start = time.perf_counter()
    precise_sleep(1e-4)
    assert time.perf_counter() - start >= 1e-4


def test_fault_switches_validate_and_clear():
    faults = WireFaults(seed=1)
    faults.drop = True
    faults.delay_s = 0.25
    faults.exception_code = 4
    assert (faults.drop, faults.delay_s, faults.exception_code) == (True, 0.25, 4)
    faults.set(corrupt_crc=True, probability=0.5)
    assert faults.snapshot()["corrupt_crc"] is True
    for bad in ({"delay_s": -1.0}, {"probability": 1.5}, {"exception_code": 0}, {"drop": 1}):
        with pytest.raises(ValueError):
            faults.set(**bad)
    with pytest.raises(ValueError, match="unknown"):
        faults.set(bogus=True)
    faults.clear()
    assert faults.snapshot() == WireFaults().snapshot()


def _read_request():
    request = ReadHoldingRegistersRequest(address=0, count=2, dev_id=1, transaction_id=7)
    return request


def test_trace_packet_faults_response_frames_only():
    faults = WireFaults(seed=3)
    hooks = WireHooks(faults, framing="rtu")
    frame = bytes.fromhex("010304000000003a33")
    assert hooks.trace_packet(True, frame) == frame
    assert hooks.trace_packet(False, frame) == frame
    faults.corrupt_crc = True
    corrupted = hooks.trace_packet(True, frame)
    assert corrupted[:-2] == frame[:-2]
    assert corrupted[-2:] == bytes(b ^ 0xFF for b in frame[-2:])
    assert hooks.trace_packet(False, frame) == frame  # received bytes are never touched
    faults.clear()
    faults.corrupt_bytes = True
    flipped = hooks.trace_packet(True, frame)
    assert sum(a != b for a, b in zip(flipped, frame, strict=True)) == 1
    faults.clear()
    faults.drop_response = True
    assert hooks.trace_packet(True, frame) == b""
    assert faults.counts == {"corrupt_crc": 1, "corrupt_bytes": 1, "drop_response": 1}


def test_corrupt_crc_does_nothing_without_a_crc():
    faults = WireFaults()
    faults.corrupt_crc = True
    frame = bytes.fromhex("0001000000050103020000")
    assert WireHooks(faults, framing="socket").trace_packet(True, frame) == frame


def test_corrupt_bytes_is_reproducible_with_the_seed():
    frame = bytes(range(40))

    def run(seed):
        faults = WireFaults(seed=seed)
        faults.corrupt_bytes = True
        hooks = WireHooks(faults, framing="socket")
        return [hooks.trace_packet(True, frame) for _ in range(20)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_trace_pdu_drops_refuses_and_screens_requests():
    faults = WireFaults()
    seen = []

    def screen(request):
        seen.append(request)
        return None if request.dev_id == 9 else request

    hooks = WireHooks(faults, framing="socket", screen=screen)
    request = _read_request()
    assert hooks.trace_pdu(False, request) is request
    response = ExceptionResponse(3, 2)
    assert hooks.trace_pdu(True, response) is response  # responses pass
    faults.drop = True
    assert hooks.trace_pdu(False, request) is None
    faults.clear()
    faults.exception_code = 4
    stand_in = hooks.trace_pdu(False, request)
    assert stand_in is not request
    assert (stand_in.function_code, stand_in.dev_id, stand_in.transaction_id) == (3, 1, 7)
    faults.clear()
    other = ReadHoldingRegistersRequest(address=0, count=2, dev_id=9)
    assert hooks.trace_pdu(False, other) is None
    assert len(seen) == 4


def test_probability_hits_a_seeded_fraction():
    faults = WireFaults(seed=11)
    faults.set(drop=True, probability=0.25)
    hooks = WireHooks(faults, framing="socket")
    dropped = sum(hooks.trace_pdu(False, _read_request()) is None for _ in range(400))
    assert 60 < dropped < 140
    assert faults.counts["drop"] == dropped


def test_duplicate_write_applies_to_writes_only():
    faults = WireFaults()
    faults.duplicate_write = True
    hooks = WireHooks(faults, framing="socket")
    read = _read_request()
    assert hooks.trace_pdu(False, read) is read
    write = WriteMultipleRegistersRequest(address=0, registers=[1, 2], dev_id=1)
    assert hooks.trace_pdu(False, write) is not write


def test_refusal_answers_without_touching_the_datastore():
    stand_in = refuse(_read_request(), ExcCodes.ILLEGAL_VALUE)
    response = asyncio.run(stand_in.datastore_update(None, 1))  # no datastore needed
    assert isinstance(response, ExceptionResponse)
    assert (response.function_code, response.exception_code) == (0x83, 3)


def test_hooks_never_raise():
    def broken(_request):
        raise RuntimeError("boom")

    hooks = WireHooks(WireFaults(), framing="socket", screen=broken)
    request = _read_request()
    assert hooks.trace_pdu(False, request) is request
