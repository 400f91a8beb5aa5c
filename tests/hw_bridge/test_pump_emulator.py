"""The emulated pump against raw pymodbus sync clients and mbpoll: RTU on a pty, loopback TCP.

The patient is not started: tests advance simulated minutes with ``patient.step_minute()``,
so the pump's state is deterministic; one test runs the whole thing on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import math
import random
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import serial
from pymodbus.client import ModbusSerialClient, ModbusTcpClient, ModbusTlsClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerRTU

from twinloop.hw_bridge.emulators.patient import VirtualPatient
from twinloop.hw_bridge.emulators.pump import (
    BOLUS_RATE_U_PER_MIN,
    HR_BOLUS_U,
    HR_COMMAND,
    HR_SCHEDULED_BASAL_U_PER_H,
    HR_TEMP_BASAL_DURATION_MIN,
    HR_TEMP_BASAL_U_PER_H,
    EmulatorError,
    PumpEmulator,
    run_pump,
)
from twinloop.hw_bridge.pty import PtyPair
from twinloop.hw_bridge.wire import rtu_frame_time_s, rtu_silent_interval_s, usable_parity
from twinloop.plant.glucose.pump import PumpSpec, quantize_basal

pytestmark = pytest.mark.hil

PATIENT = "adult#001"
DEV = 1
TIMEOUT_S = 0.5
F32 = ModbusTcpClient.DATATYPE.FLOAT32
I32 = ModbusTcpClient.DATATYPE.INT32
MBPOLL = shutil.which("mbpoll") or "/usr/bin/mbpoll"


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def patient():
    return VirtualPatient(PATIENT, seed=0, wall_s_per_sim_min=3600.0)  # stepped by hand


@pytest.fixture
def pump(patient):
    emulator = PumpEmulator(patient)
    yield emulator
    emulator.close()


@pytest.fixture
def pty():
    with PtyPair() as pair:
        yield pair


@pytest.fixture
def servers(pump, pty):
    with pump.start_in_thread(rtu=pty.a, tcp=("127.0.0.1", 0)) as thread:
        yield thread


def _tcp_client(servers, timeout_s=TIMEOUT_S):
    client = ModbusTcpClient("127.0.0.1", port=servers.tcp_address[1], timeout=timeout_s, retries=0)
    assert client.connect()
    return client


def _rtu_client(pty, timeout_s=TIMEOUT_S):
    client = ModbusSerialClient(
        pty.b,
        baudrate=115200,
        parity=usable_parity(pty.b, "E"),
        timeout=timeout_s,
        retries=0,
    )
    assert client.connect()
    return client


@pytest.fixture
def tcp_client(servers):
    client = _tcp_client(servers)
    yield client
    client.close()


@pytest.fixture
def rtu_client(servers, pty):
    client = _rtu_client(pty)
    yield client
    client.close()


@pytest.fixture(params=["tcp", "rtu"])
def client(request, servers, pty):
    made = _tcp_client(servers) if request.param == "tcp" else _rtu_client(pty)
    made.transport_name = request.param
    yield made
    made.close()


# -- helpers ---------------------------------------------------------------------------------
def f32(registers):
    return ModbusTcpClient.convert_from_registers(list(registers), F32)


def regs_f32(value):
    return ModbusTcpClient.convert_to_registers(float(value), F32)


def read_inputs(client):
    r = client.read_input_registers(0, count=15, device_id=DEV)
    assert not r.isError(), r
    x = r.registers
    return {
        "delivered_total_u": ModbusTcpClient.convert_from_registers(x[0:2], I32) * 0.001,
        "reservoir_u": f32(x[2:4]),
        "battery_pct": x[4] * 0.1,
        "delivery_rate_u_per_h": f32(x[5:7]),
        "bolus_remaining_u": f32(x[7:9]),
        "alarm_code": x[9],
        "pump_clock_min": ModbusTcpClient.convert_from_registers(x[10:12], I32),
        "heartbeat": x[12],
        "time_scale_s_per_min": f32(x[13:15]),
    }


def read_holding(client):
    r = client.read_holding_registers(0, count=8, device_id=DEV)
    assert not r.isError(), r
    x = r.registers
    return {
        "temp_basal_u_per_h": f32(x[0:2]),
        "temp_basal_duration_min": x[2],
        "bolus_u": f32(x[3:5]),
        "command": x[5],
        "scheduled_basal_u_per_h": f32(x[6:8]),
    }


DI_NAMES = ("occluded", "suspended", "bolus_active", "temp_basal_active", "alarm_active")


def read_discrete(client):
    r = client.read_discrete_inputs(0, count=5, device_id=DEV)
    assert not r.isError(), r
    return dict(zip(DI_NAMES, r.bits[:5], strict=True))


def ok(response):
    assert not response.isError(), response
    return response


def exception_code(response):
    assert response.isError(), f"expected an exception response, got {response}"
    return response.exception_code


def start_bolus(client, units):
    return client.write_registers(HR_BOLUS_U, regs_f32(units), device_id=DEV)


def start_temp_basal(client, u_per_h, minutes):
    return client.write_registers(
        HR_TEMP_BASAL_U_PER_H, [*regs_f32(u_per_h), minutes], device_id=DEV
    )


def rtu_frame(body: bytes) -> bytes:
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


# -- the register map ------------------------------------------------------------------------
def test_every_register_reads_as_the_map_says_at_start(client, patient):
    basal = float(quantize_basal(PumpSpec(), patient.parameters.basal_u_per_h))
    assert basal > 0
    assert read_holding(client) == pytest.approx(
        {
            "temp_basal_u_per_h": 0.0,
            "temp_basal_duration_min": 0,
            "bolus_u": 0.0,
            "command": 0,
            "scheduled_basal_u_per_h": basal,
        },
        rel=1e-6,
    )
    assert read_inputs(client) == pytest.approx(
        {
            "delivered_total_u": 0.0,
            "reservoir_u": 300.0,
            "battery_pct": 100.0,
            "delivery_rate_u_per_h": basal,
            "bolus_remaining_u": 0.0,
            "alarm_code": 0,
            "pump_clock_min": 0,
            "heartbeat": 0,
            "time_scale_s_per_min": patient.wall_s_per_sim_min,  # announced to rigs
        },
        rel=1e-6,
    )
    assert read_discrete(client) == dict.fromkeys(DI_NAMES, False)
    assert ok(client.read_coils(0, count=1, device_id=DEV)).bits[0] is False


def test_minutes_advance_clock_heartbeat_battery_and_delivery(client, patient, pump):
    basal = pump.status().scheduled_basal_u_per_h
    received = sum(patient.step_minute().insulin_u for _ in range(10))
    ir = read_inputs(client)
    assert (ir["pump_clock_min"], ir["heartbeat"]) == (10, 10)
    assert ir["battery_pct"] == pytest.approx(99.9)  # 0.01 %/min, register ×0.1 %
    assert received == pytest.approx(10 * basal / 60.0)
    assert ir["delivered_total_u"] == pytest.approx(received, abs=1e-3)
    assert ir["reservoir_u"] == pytest.approx(300.0 - received, abs=1e-4)


def test_temp_basal_changes_delivery_and_expires_to_scheduled(tcp_client, patient, pump):
    scheduled = pump.status().scheduled_basal_u_per_h
    ok(start_temp_basal(tcp_client, 3.0, 3))
    assert read_holding(tcp_client)["temp_basal_duration_min"] == 3
    assert read_inputs(tcp_client)["delivery_rate_u_per_h"] == pytest.approx(3.0)
    assert read_discrete(tcp_client)["temp_basal_active"] is True
    delivered = [patient.step_minute().insulin_u for _ in range(5)]
    assert delivered[:3] == pytest.approx([3.0 / 60.0] * 3)
    assert delivered[3:] == pytest.approx([scheduled / 60.0] * 2)
    hr = read_holding(tcp_client)
    assert hr["temp_basal_duration_min"] == 0
    assert hr["temp_basal_u_per_h"] == pytest.approx(3.0)  # the setting stays
    assert read_inputs(tcp_client)["delivery_rate_u_per_h"] == pytest.approx(scheduled)
    assert read_discrete(tcp_client)["temp_basal_active"] is False


def test_temp_basal_rate_alone_waits_for_the_duration_and_zero_cancels(tcp_client, patient):
    ok(tcp_client.write_registers(HR_TEMP_BASAL_U_PER_H, regs_f32(0.0), device_id=DEV))
    assert read_discrete(tcp_client)["temp_basal_active"] is False
    ok(tcp_client.write_register(HR_TEMP_BASAL_DURATION_MIN, 30, device_id=DEV))
    assert patient.step_minute().insulin_u == 0.0  # a zero temp basal
    ok(tcp_client.write_register(HR_TEMP_BASAL_DURATION_MIN, 0, device_id=DEV))
    assert patient.step_minute().insulin_u > 0.0


def test_rates_are_quantised_down_when_written(tcp_client, pump):
    ok(tcp_client.write_registers(HR_SCHEDULED_BASAL_U_PER_H, regs_f32(1.234), device_id=DEV))
    assert read_holding(tcp_client)["scheduled_basal_u_per_h"] == pytest.approx(1.2)
    assert pump.status().scheduled_basal_u_per_h == pytest.approx(1.2)


def test_bolus_is_delivered_at_1_5_u_per_min_and_totals_match_the_patient(client, patient, pump):
    basal_per_min = pump.status().scheduled_basal_u_per_h / 60.0
    ok(start_bolus(client, 4.0))
    assert read_holding(client)["bolus_u"] == pytest.approx(4.0)
    assert read_discrete(client)["bolus_active"] is True
    received = []
    remaining = []
    for _ in range(5):
        received.append(patient.step_minute().insulin_u)
        remaining.append(read_inputs(client)["bolus_remaining_u"])
    bolus_part = [u - basal_per_min for u in received]
    assert bolus_part == pytest.approx([BOLUS_RATE_U_PER_MIN, 1.5, 1.0, 0.0, 0.0], abs=1e-9)
    assert remaining == pytest.approx([2.5, 1.0, 0.0, 0.0, 0.0])
    assert read_discrete(client)["bolus_active"] is False
    ir = read_inputs(client)
    assert ir["delivered_total_u"] == pytest.approx(sum(received), abs=1e-3)
    assert ir["reservoir_u"] == pytest.approx(300.0 - sum(received), abs=1e-4)


def test_cancel_bolus_suspend_and_resume(tcp_client, patient):
    ok(start_bolus(tcp_client, 10.0))
    patient.step_minute()
    ok(tcp_client.write_register(HR_COMMAND, 3, device_id=DEV))  # cancel bolus
    assert read_inputs(tcp_client)["bolus_remaining_u"] == 0.0
    assert read_holding(tcp_client)["command"] == 0  # reads 0
    ok(tcp_client.write_coil(0, True, device_id=DEV))  # suspend
    assert ok(tcp_client.read_coils(0, count=1, device_id=DEV)).bits[0] is True
    assert read_discrete(tcp_client)["suspended"] is True
    assert read_inputs(tcp_client)["delivery_rate_u_per_h"] == 0.0
    assert patient.step_minute().insulin_u == 0.0
    ok(tcp_client.write_register(HR_COMMAND, 2, device_id=DEV))  # resume
    assert read_discrete(tcp_client)["suspended"] is False
    assert patient.step_minute().insulin_u > 0.0


def test_occlusion_stops_delivery_and_raises_alarm_1(client, patient, pump):
    ok(start_bolus(client, 5.0))
    pump.occlude(True)
    ir = read_inputs(client)
    assert (ir["alarm_code"], ir["delivery_rate_u_per_h"], ir["bolus_remaining_u"]) == (1, 0.0, 0.0)
    di = read_discrete(client)
    assert di["occluded"] and di["alarm_active"] and not di["bolus_active"]
    assert [patient.step_minute().insulin_u for _ in range(3)] == [0.0, 0.0, 0.0]
    pump.occlude(False)
    assert patient.step_minute().insulin_u > 0.0  # delivery resumes by itself
    assert read_inputs(client)["alarm_code"] == 1  # latched until cleared
    ok(client.write_register(HR_COMMAND, 4, device_id=DEV))
    assert read_inputs(client)["alarm_code"] == 0
    assert read_discrete(client)["alarm_active"] is False


def test_reservoir_and_battery_alarms(tcp_client, patient, pump):
    pump.set_reservoir(15.0)
    assert read_inputs(tcp_client)["alarm_code"] == 2
    pump.set_battery(5.0)
    assert read_inputs(tcp_client)["alarm_code"] == 3
    pump.set_reservoir(0.01)
    ok(start_bolus(tcp_client, 1.0))
    assert patient.step_minute().insulin_u == pytest.approx(0.01)  # no more than is left
    ir = read_inputs(tcp_client)
    assert (ir["alarm_code"], ir["reservoir_u"], ir["delivery_rate_u_per_h"]) == (4, 0.0, 0.0)
    assert read_discrete(tcp_client)["bolus_active"] is False
    assert patient.step_minute().insulin_u == 0.0


def test_a_refused_multi_field_write_changes_nothing(tcp_client, pump):
    before = pump.status()
    # a valid rate with an out-of-range duration in one write: 03, and the rate is not kept
    assert exception_code(start_temp_basal(tcp_client, 2.0, 31)) == 3
    assert pump.status() == before


# -- Modbus exceptions -----------------------------------------------------------------------
def _nan_regs():
    return regs_f32(math.nan)


EXCEPTION_CASES = {
    # 01 ILLEGAL FUNCTION
    "report device id": (None, lambda c: c.report_device_id(device_id=DEV), 1),
    "diagnostics": (None, lambda c: c.diag_read_bus_message_count(device_id=DEV), 1),
    "read/write registers": (
        None,
        lambda c: c.readwrite_registers(
            read_address=0, read_count=1, write_address=5, values=[0], device_id=DEV
        ),
        1,
    ),
    "mask write": (
        None,
        lambda c: c.mask_write_register(address=5, and_mask=0, or_mask=0, device_id=DEV),
        1,
    ),
    # 02 ILLEGAL DATA ADDRESS
    "holding past the map": (
        None,
        lambda c: c.read_holding_registers(7, count=2, device_id=DEV),
        2,
    ),
    "input past the map": (None, lambda c: c.read_input_registers(15, count=1, device_id=DEV), 2),
    "discrete input 5": (None, lambda c: c.read_discrete_inputs(0, count=6, device_id=DEV), 2),
    "coil 1 read": (None, lambda c: c.read_coils(1, count=1, device_id=DEV), 2),
    "coil 1 write": (None, lambda c: c.write_coil(1, True, device_id=DEV), 2),
    "write holding 8": (None, lambda c: c.write_register(8, 1, device_id=DEV), 2),
    "write half a float": (None, lambda c: c.write_register(HR_BOLUS_U, 0, device_id=DEV), 2),
    "write across a float": (None, lambda c: c.write_registers(1, [0, 0], device_id=DEV), 2),
    # 03 ILLEGAL DATA VALUE
    "bolus 30 U": (None, lambda c: start_bolus(c, 30.0), 3),
    "negative bolus": (None, lambda c: start_bolus(c, -1.0), 3),
    "NaN temp basal": (
        None,
        lambda c: c.write_registers(HR_TEMP_BASAL_U_PER_H, _nan_regs(), device_id=DEV),
        3,
    ),
    "infinite scheduled basal": (
        None,
        lambda c: c.write_registers(HR_SCHEDULED_BASAL_U_PER_H, regs_f32(math.inf), device_id=DEV),
        3,
    ),
    "temp basal 36 U/h": (None, lambda c: start_temp_basal(c, 36.0, 10), 3),
    "duration 31 min": (
        None,
        lambda c: c.write_register(HR_TEMP_BASAL_DURATION_MIN, 31, device_id=DEV),
        3,
    ),
    "command 5": (None, lambda c: c.write_register(HR_COMMAND, 5, device_id=DEV), 3),
    # 04 SERVER DEVICE FAILURE
    "bolus while occluded": (lambda p, c: p.occlude(True), lambda c: start_bolus(c, 1.0), 4),
    "temp basal while occluded": (
        lambda p, c: p.occlude(True),
        lambda c: start_temp_basal(c, 1.0, 10),
        4,
    ),
    "resume while occluded": (
        lambda p, c: p.occlude(True),
        lambda c: c.write_register(HR_COMMAND, 2, device_id=DEV),
        4,
    ),
    "resume coil while occluded": (
        lambda p, c: p.occlude(True),
        lambda c: c.write_coil(0, False, device_id=DEV),
        4,
    ),
    "bolus with an empty reservoir": (
        lambda p, c: p.set_reservoir(0.0),
        lambda c: start_bolus(c, 1.0),
        4,
    ),
    "temp basal with an empty reservoir": (
        lambda p, c: p.set_reservoir(0.0),
        lambda c: c.write_register(HR_TEMP_BASAL_DURATION_MIN, 5, device_id=DEV),
        4,
    ),
    # 06 SERVER DEVICE BUSY
    "bolus while a bolus runs": (
        lambda p, c: ok(start_bolus(c, 2.0)),
        lambda c: start_bolus(c, 1.0),
        6,
    ),
}


@pytest.mark.parametrize("case", list(EXCEPTION_CASES), ids=list(EXCEPTION_CASES))
def test_exception_codes(case, client, pump):
    setup, act, expected = EXCEPTION_CASES[case]
    if setup is not None:
        setup(pump, client)
    assert exception_code(act(client)) == expected
    assert not client.read_input_registers(0, count=1, device_id=DEV).isError()  # still fine


def test_wrong_quantity_is_03_not_pymodbus_01(servers):
    """A raw MBAP request for 126 registers (the client API refuses to build one)."""
    with socket.create_connection(("127.0.0.1", servers.tcp_address[1]), timeout=2) as sock:
        sock.sendall(bytes.fromhex("0001 0000 0006 01 03 0000 007e"))
        assert sock.recv(64) == bytes.fromhex("0001 0000 0003 01 83 03")


def test_other_device_ids(tcp_client, rtu_client):
    assert exception_code(tcp_client.read_input_registers(0, count=1, device_id=7)) == 0x0B
    for unit in (0, 255):  # "this device" on Modbus TCP
        assert not tcp_client.read_input_registers(0, count=1, device_id=unit).isError()
    with pytest.raises(ModbusIOException):  # another device on the RTU bus: silence
        rtu_client.read_input_registers(0, count=1, device_id=7)
    assert not rtu_client.read_input_registers(0, count=1, device_id=DEV).isError()


def _wait_for(condition, guard_s=5.0):
    """Poll ``condition()`` until true; the guard only stops a hang (not a speed check)."""
    deadline = time.monotonic() + guard_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_rtu_broadcast_writes_are_refused_counted_and_alarmed(rtu_client, patient, pump):
    before = read_inputs(rtu_client)["reservoir_u"]
    writes = [
        lambda: start_bolus(rtu_client, 10.0),
        lambda: rtu_client.write_register(HR_COMMAND, 1, device_id=0, no_response_expected=True),
        lambda: rtu_client.write_coil(0, True, device_id=0, no_response_expected=True),
        lambda: start_temp_basal(rtu_client, 30.0, 30),
    ]
    for i, write in enumerate(writes):
        if i in (0, 3):  # the helpers address DEV: send the same frames to device id 0
            rtu_client.write_registers(
                HR_BOLUS_U if i == 0 else HR_TEMP_BASAL_U_PER_H,
                regs_f32(10.0) if i == 0 else [*regs_f32(30.0), 30],
                device_id=0,
                no_response_expected=True,
            )
        else:
            write()
        assert _wait_for(lambda n=i + 1: pump.broadcasts_refused == n)
    for _ in range(10):
        patient.step_minute()
    st = pump.status()
    assert not st.suspended and not st.bolus_active and not st.temp_basal_active
    assert st.bolus_remaining_u == 0.0
    inputs = read_inputs(rtu_client)
    assert inputs["alarm_code"] == 6
    assert read_discrete(rtu_client)["alarm_active"]
    basal_only = before - 10 * st.scheduled_basal_u_per_h / 60.0
    assert inputs["reservoir_u"] == pytest.approx(basal_only, abs=1e-3)
    ok(rtu_client.write_register(HR_COMMAND, 4, device_id=DEV))  # clear alarm
    assert read_inputs(rtu_client)["alarm_code"] == 0


@pytest.mark.parametrize(
    ("every_min", "command"),
    [
        (10, lambda c: start_bolus(c, 5.0)),  # 5 U every 10 min: 30 U/h
        (30, lambda c: start_temp_basal(c, 35.0, 30)),  # the largest temp basal, back to back
    ],
    ids=["5 U boluses", "35 U/h temp basals"],
)
def test_cumulative_limits_stop_many_small_in_limit_commands(
    tcp_client, patient, pump, every_min, command
):
    """Try to empty the 300 U reservoir with in-limit commands for a simulated day."""
    refused, accepted = 0, 0
    per_minute: list[float] = []
    for minute in range(24 * 60):
        if minute % every_min == 0:
            response = command(tcp_client)
            if response.isError():
                assert response.exception_code == 4  # device failure: the limit
                refused += 1
                assert read_inputs(tcp_client)["alarm_code"] == 5
                assert read_discrete(tcp_client)["alarm_active"]
                ok(tcp_client.write_register(HR_COMMAND, 4, device_id=DEV))  # clear, try again
            else:
                accepted += 1
        before = pump.status().delivered_total_u
        patient.step_minute()
        per_minute.append(pump.status().delivered_total_u - before)
    assert refused > 10 and accepted >= 2
    assert pump.limit_refusals == refused
    hourly = [sum(per_minute[max(0, i - 59) : i + 1]) for i in range(len(per_minute))]
    daily = [sum(per_minute[max(0, i - 1439) : i + 1]) for i in range(len(per_minute))]
    assert max(hourly) <= 30.0 + 1e-6
    assert max(daily) <= 100.0 + 1e-6
    assert max(daily) > 95.0  # the daily limit is what stopped it
    inputs = read_inputs(tcp_client)
    assert inputs["reservoir_u"] >= 300.0 - 100.0 - 1e-3  # a day: at most the daily limit
    assert inputs["delivered_total_u"] == pytest.approx(sum(per_minute), abs=2e-3)


def test_delivery_is_capped_at_the_hourly_limit_and_alarms(tcp_client, patient):
    pump = PumpEmulator(patient, max_hourly_u=4.0, max_daily_u=50.0, scheduled_basal_u_per_h=0.0)
    try:
        with pump.start_in_thread(tcp=("127.0.0.1", 0)) as servers:
            client = _tcp_client(servers)
            try:
                assert exception_code(start_bolus(client, 5.0)) == 4  # over the limit at once
                assert read_inputs(client)["alarm_code"] == 5
                assert pump.limit_refusals == 1 and pump.status().bolus_remaining_u == 0.0
                ok(client.write_register(HR_COMMAND, 4, device_id=DEV))
                ok(start_temp_basal(client, 3.0, 30))  # 1.5 U: in the limit
                ok(start_bolus(client, 2.0))  # 1.5 + 2.0 <= 4.0
                assert exception_code(start_temp_basal(client, 35.0, 30)) == 4
                for _ in range(60):
                    patient.step_minute()
                assert pump.delivered_in_u(60) <= 4.0 + 1e-9
                assert (
                    exception_code(
                        client.write_registers(
                            HR_SCHEDULED_BASAL_U_PER_H, regs_f32(5.0), device_id=DEV
                        )
                    )
                    == 4
                )
            finally:
                client.close()
    finally:
        pump.close()


def test_limits_are_checked_at_construction(patient):
    with pytest.raises(ValueError, match="max_daily_u"):
        PumpEmulator(patient, max_hourly_u=30.0, max_daily_u=10.0)
    with pytest.raises(ValueError, match="max_hourly_u"):
        PumpEmulator(patient, max_hourly_u=math.nan)


# -- wire faults -----------------------------------------------------------------------------
def test_drop_loses_the_request(client, pump):
    pump.faults.drop = True
    with pytest.raises(ModbusIOException):
        start_bolus(client, 2.0)
    pump.faults.drop = False
    assert pump.status().bolus_remaining_u == 0.0  # never executed
    assert not read_inputs(client)["alarm_code"]


def test_drop_response_executes_but_does_not_answer(client, pump):
    pump.faults.drop_response = True
    with pytest.raises(ModbusIOException):
        start_bolus(client, 2.0)
    pump.faults.clear()
    assert pump.status().bolus_remaining_u == pytest.approx(2.0)
    assert pump.faults.counts["drop_response"] == 1


def test_corrupt_crc_and_bytes_are_rejected_by_the_rtu_client(rtu_client, tcp_client, pump):
    for fault in ("corrupt_crc", "corrupt_bytes"):
        pump.faults.set(**{fault: True})
        with pytest.raises(ModbusIOException):
            rtu_client.read_input_registers(0, count=13, device_id=DEV)
        pump.faults.clear()
        assert not rtu_client.read_input_registers(0, count=13, device_id=DEV).isError()
    pump.faults.corrupt_crc = True  # Modbus TCP has no CRC: unaffected
    assert not tcp_client.read_input_registers(0, count=13, device_id=DEV).isError()


def test_exception_code_fault_answers_everything_without_executing(client, pump):
    pump.faults.exception_code = 4
    assert exception_code(client.read_input_registers(0, count=1, device_id=DEV)) == 4
    assert exception_code(start_bolus(client, 2.0)) == 4
    pump.faults.exception_code = None
    assert pump.status().bolus_remaining_u == 0.0
    assert not client.read_input_registers(0, count=1, device_id=DEV).isError()


def test_delay_is_seen_by_the_client_and_beyond_its_timeout_is_a_timeout(client, pump):
    pump.faults.delay_s = 0.2
    start = time.perf_counter()
    ok(client.read_input_registers(0, count=1, device_id=DEV))
    assert time.perf_counter() - start >= 0.2
    pump.faults.delay_s = 0.8  # > TIMEOUT_S
    late_request = time.perf_counter()
    with pytest.raises(ModbusIOException):
        client.read_input_registers(0, count=1, device_id=DEV)
    pump.faults.clear()
    # wait until the late answer has surely arrived (it is discarded by the client)
    time.sleep(max(0.0, late_request + 0.8 + 0.4 - time.perf_counter()))
    ok(client.read_input_registers(0, count=1, device_id=DEV))


def test_disconnect_tcp_refuses_then_recovers(tcp_client, servers, pump):
    address = ("127.0.0.1", servers.tcp_address[1])
    pump.faults.disconnect(down_s=1.0)
    closed_by = time.monotonic() + 0.8  # the server's loop closes the port asynchronously
    while True:
        with socket.socket() as probe:  # the port is closed while down
            if probe.connect_ex(address) != 0:
                break
        assert time.monotonic() < closed_by, "the port stayed open"
        time.sleep(0.01)
    # while down, a client cannot connect (whether a request already in flight on the old
    # connection is answered races with asyncio's close and pymodbus's client: not asserted)
    tcp_client.close()
    fresh = ModbusTcpClient("127.0.0.1", port=address[1], timeout=TIMEOUT_S, retries=0)
    try:
        assert not fresh.connect()
        with pytest.raises((ConnectionException, ModbusIOException)):
            fresh.read_input_registers(0, count=1, device_id=DEV)
    finally:
        fresh.close()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # reopened on the same port after down_s
        with socket.socket() as probe:
            if probe.connect_ex(address) == 0:
                break
        time.sleep(0.05)
    again = _tcp_client(servers)
    try:
        ok(again.read_input_registers(0, count=1, device_id=DEV))
    finally:
        again.close()


def test_disconnect_rtu_goes_silent_then_recovers(rtu_client, pump):
    pump.faults.disconnect(down_s=0.6)
    with pytest.raises(ModbusIOException):
        rtu_client.read_input_registers(0, count=1, device_id=DEV)
    time.sleep(0.6)
    ok(rtu_client.read_input_registers(0, count=1, device_id=DEV))


def test_freeze_stops_the_registers_from_changing(client, patient, pump):
    patient.step_minute()
    first = read_inputs(client)
    pump.faults.freeze = True
    patient.step_minute()
    patient.step_minute()
    assert read_inputs(client) == first  # heartbeat stale: a stalled pump
    assert pump.status().heartbeat == 3
    pump.faults.freeze = False
    assert read_inputs(client)["heartbeat"] == 3


def test_duplicate_write_delivers_the_bolus_and_answers_busy(tcp_client, pump):
    pump.faults.duplicate_write = True
    assert exception_code(start_bolus(tcp_client, 2.0)) == 6
    pump.faults.clear()
    assert pump.status().bolus_remaining_u == pytest.approx(2.0)


def test_probabilistic_drop_hits_some_requests(tcp_client, pump):
    pump.faults.set(drop=True, probability=0.3)
    tcp_client.comm_params.timeout_connect = 0.1
    failures = 0
    for _ in range(15):
        try:
            tcp_client.read_input_registers(0, count=1, device_id=DEV)
        except ModbusIOException:
            failures += 1
    pump.faults.clear()
    assert 0 < failures < 15
    assert pump.faults.counts["drop"] == failures


def test_rtu_cycle_takes_at_least_its_wire_time(rtu_client):
    request_s = rtu_frame_time_s(8, 115200) + rtu_silent_interval_s(115200)
    response_s = rtu_frame_time_s(31, 115200)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        ok(rtu_client.read_input_registers(0, count=13, device_id=DEV))
        best = min(best, time.perf_counter() - start)
    assert best >= request_s + response_s


def test_start_fails_cleanly_on_a_missing_port(pump, tmp_path):
    with pytest.raises(EmulatorError):
        pump.start_in_thread(rtu=str(tmp_path / "no-such-port"))


# -- mbpoll, a third-party master ------------------------------------------------------------
def _mbpoll(options, target, *flags, write=None):
    """One-shot mbpoll (``-1``), 0-based addresses (``-0``), device 1; ``write`` a value."""
    cmd = [MBPOLL, "-a", "1", "-0", "-1", "-o", "1", *options, *flags, target]
    if write is not None:
        cmd.append(write)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)


def _mbpoll_target(kind, servers, pty):
    if kind == "rtu":
        return ["-m", "rtu", "-b", "115200", "-P", "even"], pty.b
    return ["-m", "tcp", "-p", str(servers.tcp_address[1])], "127.0.0.1"


def _values(stdout):
    return {int(k): float(v) for k, v in re.findall(r"^\[(\d+)\]:\s+(\S+)", stdout, re.MULTILINE)}


@pytest.mark.skipif(not Path(MBPOLL).exists(), reason="mbpoll is not installed")
@pytest.mark.parametrize("kind", ["rtu", "tcp"])
def test_mbpoll_reads_and_gets_refused(kind, servers, pty, pump):
    options, target = _mbpoll_target(kind, servers, pty)
    pump.set_battery(87.5)
    done = _mbpoll(options, target, "-t", "3:float", "-B", "-r", "2")
    assert done.returncode == 0, done.stderr
    assert _values(done.stdout) == {2: 300.0}
    done = _mbpoll(options, target, "-t", "3", "-r", "4")
    assert _values(done.stdout) == {4: 875.0}
    done = _mbpoll(options, target, "-t", "4:float", "-B", "-r", "6")
    assert _values(done.stdout)[6] == pytest.approx(pump.status().scheduled_basal_u_per_h)
    done = _mbpoll(options, target, "-t", "1", "-r", "0", "-c", "5")
    assert _values(done.stdout) == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}
    refused = _mbpoll(options, target, "-t", "4:float", "-B", "-r", "3", write="30")
    assert refused.returncode != 0
    assert "Illegal data value" in refused.stderr
    written = _mbpoll(options, target, "-t", "4:float", "-B", "-r", "3", write="2.5")
    assert written.returncode == 0, written.stderr
    assert pump.status().bolus_remaining_u == pytest.approx(2.5)


# -- TLS ---------------------------------------------------------------------------------------
def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "pump.crt", tmp_path / "pump.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_modbus_tls(pump, tmp_path):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client_ctx.check_hostname = False  # pymodbus passes no server_hostname; the cert is checked
    with pump.start_in_thread(tcp=("127.0.0.1", 0), tls=server_ctx) as servers:
        client = ModbusTlsClient(
            "127.0.0.1", port=servers.tcp_address[1], sslctx=client_ctx, timeout=2, retries=0
        )
        try:
            assert client.connect()
            assert read_inputs(client)["reservoir_u"] == pytest.approx(300.0)
        finally:
            client.close()


# -- other ways to serve --------------------------------------------------------------------
def test_start_rtu_and_start_tcp_handles(pump, pty):
    with pump.start_rtu(pty.a) as rtu, pump.start_tcp("127.0.0.1", 0) as tcp:
        assert rtu.rtu_port == pty.a and tcp.tcp_address is not None
        client = _tcp_client(tcp)
        try:
            assert read_inputs(client)["reservoir_u"] == pytest.approx(300.0)
        finally:
            client.close()
    assert not rtu.alive and not tcp.alive


def test_serve_tcp_coroutine_runs_until_cancelled(pump):
    port = _free_port()

    def poll():
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        try:
            assert client.connect()
            return read_inputs(client)
        finally:
            client.close()

    async def main():
        task = asyncio.create_task(pump.serve_tcp("127.0.0.1", port=port))
        await asyncio.sleep(0.2)
        inputs = await asyncio.to_thread(poll)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return inputs

    assert asyncio.run(main())["reservoir_u"] == pytest.approx(300.0)
    with socket.socket() as probe:  # closed again
        assert probe.connect_ex(("127.0.0.1", port)) != 0


# -- on the wall clock -----------------------------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_pump_on_the_wall_clock_reads_consistent_snapshots():
    port = _free_port()
    stop = threading.Event()
    errors = []

    def run():
        try:
            run_pump(rtu=None, tcp=str(port), wall_s_per_sim_min=0.005, stop_event=stop)
        except Exception as exc:  # reported below
            errors.append(exc)

    runner = threading.Thread(target=run, name="run-pump-test")
    runner.start()
    try:
        client = None
        deadline = time.monotonic() + 5.0
        while client is None and time.monotonic() < deadline:
            candidate = ModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
            if candidate.connect():
                client = candidate
            else:
                time.sleep(0.05)
        assert client is not None, errors
        try:
            last_beat = -1
            for _ in range(100):
                ir = read_inputs(client)
                # one request is one snapshot: what left the reservoir is what was delivered
                assert ir["delivered_total_u"] + ir["reservoir_u"] == pytest.approx(300.0, abs=2e-3)
                assert ir["heartbeat"] >= last_beat
                last_beat = ir["heartbeat"]
                time.sleep(0.002)
            assert last_beat > 5
        finally:
            client.close()
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    assert not errors


# -- fuzz --------------------------------------------------------------------------------------
MBAP_MAX_LENGTH = 254  # unit id + a PDU of at most 253 bytes (longer: pymodbus drops it)
FUZZ_FUNCTIONS = [1, 2, 3, 4, 5, 6, 15, 16, 7, 8, 11, 17, 22, 23, 43, 0, 0x7F, 0x81, 0x90, 0xFF]


def _fuzz_pdu(rng: random.Random) -> bytes:
    fc = rng.choice(FUZZ_FUNCTIONS)
    if rng.random() < 0.4:
        return bytes([fc]) + rng.randbytes(rng.choice([0, 1, 2, 3, 4, 5, 6, 9, 20]))
    address = rng.choice([0, 1, 2, 3, 5, 6, 7, 8, 12, 13, 16, 0xFFFF, rng.randrange(65536)])
    count = rng.choice([0, 1, 2, 5, 8, 13, 125, 126, 2000, 2001, 0xFFFF])
    body = bytes([fc]) + address.to_bytes(2, "big") + count.to_bytes(2, "big")
    if fc in (15, 16, 23):
        byte_count = rng.choice([0, 1, 2, 4, rng.randrange(256)])
        body += bytes([byte_count]) + rng.randbytes(rng.choice([0, byte_count, byte_count + 1]))
    return body


def _fuzz_rtu_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randrange(1, 40))
    frame = rtu_frame(bytes([rng.choice([1, 1, 1, 0, 2, 255])]) + _fuzz_pdu(rng))
    if kind < 0.35:  # one flipped byte
        i = rng.randrange(len(frame))
        frame = frame[:i] + bytes([frame[i] ^ rng.randrange(1, 256)]) + frame[i + 1 :]
    elif kind < 0.45:  # truncated
        frame = frame[: rng.randrange(len(frame))]
    return frame


def _fuzz_mbap_frame(rng: random.Random) -> tuple[bytes, bool]:
    """A random MBAP frame and whether it is well formed (protocol 0, true length <= 254)."""
    if rng.random() < 0.04:
        return rng.randbytes(rng.randrange(1, 30)), False
    body = bytes([rng.choice([1, 1, 1, 0, 255, 7])]) + _fuzz_pdu(rng)
    length = len(body) if rng.random() < 0.96 else rng.randrange(65536)
    protocol = 0 if rng.random() < 0.97 else rng.randrange(1, 65536)
    tid = rng.randrange(65536)
    frame = tid.to_bytes(2, "big") + protocol.to_bytes(2, "big") + length.to_bytes(2, "big") + body
    return frame, protocol == 0 and length == len(body) <= MBAP_MAX_LENGTH


def _drain_until_quiet(port: serial.Serial, quiet_s: float = 0.03) -> None:
    """Read and discard until the line has been silent for ``quiet_s`` (answers to old frames)."""
    last = time.monotonic()
    deadline = last + 5.0
    while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
        if port.read(4096):
            last = time.monotonic()


def _rtu_exchange(port: serial.Serial, body: bytes, answer: bytes) -> bool:
    """Send one request after a silence; whether ``answer`` (without CRC) comes back."""
    _drain_until_quiet(port)
    port.write(rtu_frame(body))
    got = b""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        got += port.read(4096)
        if rtu_frame(answer) in got:
            return True
    return False


def test_fuzz_rtu_server_survives_10000_random_and_mutated_frames(servers, pty, pump):
    rng = random.Random(20240611)
    read_clock = bytes.fromhex("01 04 000a 0002")  # pump_clock_min, int32
    clock_is_0 = bytes.fromhex("01 04 04 0000 0000")
    port = serial.Serial(pty.b, 115200, parity=usable_parity(pty.b, "E"), timeout=0.01)
    try:
        for i in range(10_000):
            port.write(_fuzz_rtu_frame(rng))
            if i % 4 == 0:
                time.sleep(0.002)  # often a real frame boundary, sometimes frames back to back
            if port.in_waiting:
                port.read(port.in_waiting)
            if i % 1000 == 999:
                assert _rtu_exchange(port, read_clock, clock_is_0), f"no answer after {i} frames"
    finally:
        port.close()
    assert servers.alive
    client = _rtu_client(pty, timeout_s=2.0)
    try:
        assert read_inputs(client)["reservoir_u"] <= 300.0
    finally:
        client.close()


def test_fuzz_tcp_server_survives_10000_random_mbap_frames(servers, pump):
    rng = random.Random(7)
    address = ("127.0.0.1", servers.tcp_address[1])
    sent = answered = well_formed = 0
    while sent < 10_000:
        with socket.create_connection(address, timeout=2) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(0.5)
            for _ in range(500):
                frame, sound = _fuzz_mbap_frame(rng)
                try:
                    sock.sendall(frame)
                    sent += 1
                    if not sound:
                        break  # a broken MBAP header leaves the stream waiting: start another
                    well_formed += 1
                    answered += bool(sock.recv(4096))
                except TimeoutError:
                    break  # no answer to a well-formed frame: count it, open another stream
                except OSError:
                    break  # the server closed this connection: open another
    assert answered == well_formed > 8000  # every well-formed frame got an answer
    assert servers.alive
    client = _tcp_client(servers, timeout_s=2.0)
    try:
        assert read_inputs(client)["reservoir_u"] <= 300.0
    finally:
        client.close()
