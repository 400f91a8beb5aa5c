"""The emulated exoskeleton drive (CiA 402 style) against real pymodbus clients and mbpoll.

Most tests step the drive by hand (``run_joint=False``, ``drive.step()``) so the state machine,
the watchdog and the joint are deterministic; the server is always a real pymodbus Modbus TCP
server on 127.0.0.1 (ephemeral port) and the client a real pymodbus client or ``ModbusDevice``
through the shipped profile. A few tests run the 1 kHz joint thread on the wall clock; they wait
for outcomes (with a deadline), they never assert on timing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from twinloop.hw_bridge.emulators.drive.emulator import (
    KNEE_ROM_RAD,
    ROM_TAPER_RAD,
    DriveEmulator,
    JointBackend,
    PendulumJoint,
    PlantJointAdapter,
)
from twinloop.hw_bridge.emulators.drive.modbus import (
    CST_MODE,
    ERROR_WATCHDOG,
    HR_CONTROLWORD,
    HR_MAINTENANCE,
    HR_MAX_TORQUE,
    HR_MODES_OF_OPERATION,
    HR_TARGET_TORQUE,
    HR_WATCHDOG_MS,
    IR_ERROR_CODE,
    IR_MODES_DISPLAY,
    IR_POSITION_ACTUAL,
    IR_STATUSWORD,
    IR_TORQUE_ACTUAL,
    IR_TORQUE_DEMAND,
    IR_VELOCITY_ACTUAL,
    MAINTENANCE_KEYS,
    SELF_TEST_TICKS,
    DriveState,
    Statusword,
)
from twinloop.hw_bridge.errors import WriteRefused
from twinloop.hw_bridge.modbus_client import ModbusDevice
from twinloop.hw_bridge.profile import load_profile, shipped_profile

pytestmark = pytest.mark.hil

DEV = 1
TIMEOUT_S = 1.0
MBPOLL = shutil.which("mbpoll") or "/usr/bin/mbpoll"
I32 = ModbusTcpClient.DATATYPE.INT32
I16 = ModbusTcpClient.DATATYPE.INT16
ROOT = Path(__file__).resolve().parents[2]

# controlword commands, written as the standard's bit patterns (not taken from the module)
SHUTDOWN, SWITCH_ON, ENABLE_OP, DISABLE_VOLTAGE, QUICK_STOP, FAULT_RESET = (
    0x06,
    0x07,
    0x0F,
    0x00,
    0x02,
    0x80,
)
COMMANDS = {
    "shutdown": SHUTDOWN,
    "switch_on": SWITCH_ON,
    "enable_operation": ENABLE_OP,
    "disable_voltage": DISABLE_VOLTAGE,
    "quick_stop": QUICK_STOP,
    "fault_reset": FAULT_RESET,
}
# statusword & 0x006F of each state (IEC 61800-7-201)
NR, SOD, RTSO, SO, OE, QSA, FAULT = 0x00, 0x40, 0x21, 0x23, 0x27, 0x07, 0x08
STATE_WORDS = {
    "not_ready": NR,
    "switch_on_disabled": SOD,
    "ready_to_switch_on": RTSO,
    "switched_on": SO,
    "operation_enabled": OE,
    "quick_stop_active": QSA,
    "fault": FAULT,
}
# (from state, command) -> to state, from the standard's transition table
EXPECTED = {
    "not_ready": dict.fromkeys(COMMANDS, NR),
    "switch_on_disabled": {
        "shutdown": RTSO,
        "switch_on": SOD,
        "enable_operation": SOD,
        "disable_voltage": SOD,
        "quick_stop": SOD,
        "fault_reset": SOD,
    },
    "ready_to_switch_on": {
        "shutdown": RTSO,
        "switch_on": SO,
        "enable_operation": OE,  # 3 + 4
        "disable_voltage": SOD,
        "quick_stop": SOD,
        "fault_reset": SOD,  # bit 7 ignored outside Fault: 0x80 is disable voltage
    },
    "switched_on": {
        "shutdown": RTSO,
        "switch_on": SO,
        "enable_operation": OE,
        "disable_voltage": SOD,
        "quick_stop": SOD,
        "fault_reset": SOD,
    },
    "operation_enabled": {
        "shutdown": RTSO,
        "switch_on": SO,  # disable operation
        "enable_operation": OE,
        "disable_voltage": SOD,
        "quick_stop": QSA,
        "fault_reset": SOD,
    },
    "quick_stop_active": {
        "shutdown": QSA,
        "switch_on": QSA,
        "enable_operation": OE,  # 16
        "disable_voltage": SOD,
        "quick_stop": QSA,
        "fault_reset": SOD,
    },
    "fault": {
        "shutdown": FAULT,
        "switch_on": FAULT,
        "enable_operation": FAULT,
        "disable_voltage": FAULT,
        "quick_stop": FAULT,
        "fault_reset": SOD,  # 15
    },
}


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def pendulum():
    return PendulumJoint()


@pytest.fixture
def drive(pendulum):
    """A hand-stepped drive without watchdog, past its self-test."""
    emulator = DriveEmulator(pendulum, watchdog_ms=0)
    return emulator


@pytest.fixture
def server(drive):
    with drive.start_tcp("127.0.0.1", 0, run_joint=False) as thread:
        yield thread


@pytest.fixture
def client(server):
    made = ModbusTcpClient("127.0.0.1", port=server.tcp_address[1], timeout=TIMEOUT_S, retries=0)
    assert made.connect()
    yield made
    made.close()


@pytest.fixture
def profile(server):
    return load_profile(shipped_profile("exo_drive_tcp")).with_overrides(
        tcp=f"127.0.0.1:{server.tcp_address[1]}"
    )


class Wire:
    """A ModbusDevice trace hook: every frame sent and received."""

    def __init__(self) -> None:
        self.frames: list[tuple[bool, bytes]] = []

    def __call__(self, sending: bool, data: bytes) -> None:
        self.frames.append((sending, data))


# -- helpers -------------------------------------------------------------------------------
def ok(response):
    assert not response.isError(), response
    return response


def exception_code(response):
    assert response.isError(), f"expected an exception response, got {response}"
    return response.exception_code


def statusword(client) -> int:
    return ok(client.read_input_registers(IR_STATUSWORD, count=1, device_id=DEV)).registers[0]


def state_bits(client) -> int:
    return statusword(client) & 0x006F


def command(client, word: int) -> None:
    ok(client.write_register(HR_CONTROLWORD, word, device_id=DEV))


def input_int16(client, address: int) -> int:
    regs = ok(client.read_input_registers(address, count=1, device_id=DEV)).registers
    return int(client.convert_from_registers(regs, I16))


def input_int32(client, address: int) -> int:
    regs = ok(client.read_input_registers(address, count=2, device_id=DEV)).registers
    return int(client.convert_from_registers(regs, I32))


def write_int16(client, address: int, value: int):
    return client.write_register(address, value & 0xFFFF, device_id=DEV)


def maintenance(client, on: bool = True) -> None:
    """Enter (the two keys, one write each) or leave (0) the drive's maintenance state."""
    for word in MAINTENANCE_KEYS if on else (0,):
        ok(client.write_register(HR_MAINTENANCE, word, device_id=DEV))


def set_settings(client, **words: int) -> None:
    """Write maintenance settings (``max_torque``, ``watchdog_ms``) the way a technician does."""
    maintenance(client)
    for name, word in words.items():
        address = HR_MAX_TORQUE if name == "max_torque" else HR_WATCHDOG_MS
        ok(client.write_register(address, word, device_id=DEV))
    maintenance(client, on=False)


def boot(drive: DriveEmulator) -> None:
    for _ in range(SELF_TEST_TICKS):
        drive.step()
    assert drive.state == DriveState.SWITCH_ON_DISABLED


def bring_to(drive: DriveEmulator, client, state: str) -> None:
    """Bring a fresh drive to ``state`` over Modbus (and by stepping)."""
    if state == "not_ready":
        return
    boot(drive)
    path = {
        "switch_on_disabled": [],
        "ready_to_switch_on": [SHUTDOWN],
        "switched_on": [SHUTDOWN, SWITCH_ON],
        "operation_enabled": [SHUTDOWN, SWITCH_ON, ENABLE_OP],
        "quick_stop_active": [SHUTDOWN, SWITCH_ON, ENABLE_OP, QUICK_STOP],
        "fault": [SHUTDOWN, SWITCH_ON, ENABLE_OP],
    }[state]
    for word in path:
        command(client, word)
    if state == "fault":
        drive.inject_fault(0x5400)
        assert state_bits(client) == 0x0F  # fault reaction active
        drive.step()
    assert state_bits(client) == STATE_WORDS[state]


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        time.sleep(0.005)


# -- the state machine -----------------------------------------------------------------------
def test_power_on_self_test_then_switch_on_disabled(drive, client):
    assert statusword(client) == 0x0000  # not ready to switch on
    boot(drive)
    word = statusword(client)
    assert word & 0x006F == SOD
    assert word & Statusword.REMOTE
    assert not word & Statusword.VOLTAGE_ENABLED
    assert input_int16(client, IR_MODES_DISPLAY) == CST_MODE


@pytest.mark.parametrize("command_name", list(COMMANDS))
@pytest.mark.parametrize("state", list(EXPECTED))
def test_transition_table(drive, client, state, command_name):
    bring_to(drive, client, state)
    command(client, COMMANDS[command_name])
    assert state_bits(client) == EXPECTED[state][command_name]


@pytest.mark.parametrize(
    ("state", "voltage"),
    [
        ("switch_on_disabled", False),
        ("ready_to_switch_on", True),
        ("switched_on", True),
        ("operation_enabled", True),
        ("quick_stop_active", True),
        ("fault", False),
    ],
)
def test_voltage_enabled_and_fault_bits(drive, client, state, voltage):
    bring_to(drive, client, state)
    word = statusword(client)
    assert bool(word & Statusword.VOLTAGE_ENABLED) is voltage
    assert bool(word & Statusword.FAULT) is (state == "fault")
    # bit 5 is 1 in the three states whose pattern has it (0 = quick stop active); the drive
    # leaves it 0 where the standard does not care (switch on disabled, fault)
    running = state in ("ready_to_switch_on", "switched_on", "operation_enabled")
    assert bool(word & Statusword.QUICK_STOP) is running


def test_fault_reset_needs_a_rising_edge_of_bit_7(drive, client):
    bring_to(drive, client, "operation_enabled")
    command(client, ENABLE_OP | FAULT_RESET)  # bit 7 is ignored outside Fault
    assert state_bits(client) == OE
    drive.inject_fault(0x5400)
    drive.step()
    assert state_bits(client) == FAULT
    assert input_int16(client, IR_ERROR_CODE) & 0xFFFF == 0x5400
    command(client, FAULT_RESET)  # bit 7 was already 1: no edge
    assert state_bits(client) == FAULT
    command(client, DISABLE_VOLTAGE)
    command(client, FAULT_RESET)  # 0 -> 1
    assert state_bits(client) == SOD
    assert input_int16(client, IR_ERROR_CODE) == 0


def test_only_cst_mode_is_accepted(drive, client):
    boot(drive)
    assert exception_code(write_int16(client, HR_MODES_OF_OPERATION, 8)) == 3  # CSP refused
    assert exception_code(write_int16(client, HR_MODES_OF_OPERATION, 0)) == 3
    assert input_int16(client, IR_MODES_DISPLAY) == CST_MODE  # display unchanged
    assert state_bits(client) == SOD  # no fault
    ok(write_int16(client, HR_MODES_OF_OPERATION, CST_MODE))
    assert input_int16(client, IR_MODES_DISPLAY) == CST_MODE


def test_modbus_exceptions(drive, client):
    boot(drive)
    assert exception_code(client.read_coils(0, count=1, device_id=DEV)) == 1
    assert exception_code(client.write_register(6, 1, device_id=DEV)) == 2
    assert exception_code(client.write_register(HR_MAINTENANCE, 1, device_id=DEV)) == 3
    assert exception_code(client.read_input_registers(10, count=5, device_id=DEV)) == 2
    assert exception_code(write_int16(client, HR_MAX_TORQUE, 2001)) == 3
    assert exception_code(client.read_holding_registers(0, count=1, device_id=7)) == 0x0B
    # a multi-register write is checked as a whole: nothing of it is applied
    assert exception_code(client.write_registers(2, [100, 2001], device_id=DEV)) == 3
    held = ok(client.read_holding_registers(0, count=6, device_id=DEV)).registers
    assert held == [0, CST_MODE, 0, 1000, 0, 0]


# -- torque ----------------------------------------------------------------------------------
@pytest.mark.parametrize("state", [s for s in EXPECTED if s != "operation_enabled"])
def test_no_torque_outside_operation_enabled(drive, client, pendulum, state):
    bring_to(drive, client, state)
    ok(write_int16(client, HR_TARGET_TORQUE, 500))
    for _ in range(50):
        drive.step()
    assert input_int16(client, IR_TORQUE_DEMAND) == 0
    assert input_int16(client, IR_TORQUE_ACTUAL) == 0
    assert pendulum.angle_rad == 0.0
    assert pendulum.velocity_rad_s == 0.0


def test_torque_in_operation_enabled_and_halt(drive, client, pendulum):
    bring_to(drive, client, "operation_enabled")
    ok(write_int16(client, HR_TARGET_TORQUE, 500))  # 500 ‰ of 40 N·m = 20 N·m
    drive.step()
    assert input_int16(client, IR_TORQUE_DEMAND) == 500
    assert input_int16(client, IR_TORQUE_ACTUAL) == 500
    assert pendulum.torque_nm == pytest.approx(20.0)
    word = statusword(client)
    assert word & Statusword.TARGET_REACHED
    assert word & Statusword.FOLLOWS_COMMAND
    assert not word & Statusword.INTERNAL_LIMIT_ACTIVE
    command(client, ENABLE_OP | 0x100)  # halt
    drive.step()
    assert input_int16(client, IR_TORQUE_DEMAND) == 0
    assert pendulum.torque_nm == 0.0
    assert not statusword(client) & Statusword.FOLLOWS_COMMAND
    command(client, QUICK_STOP)
    drive.step()
    assert state_bits(client) == QSA
    assert pendulum.torque_nm == 0.0


def test_clamp_to_max_torque_sets_internal_limit(drive, client, pendulum):
    boot(drive)
    set_settings(client, max_torque=250)
    bring_to(drive, client, "operation_enabled")
    for target, demand, limited in [(400, 250, True), (-400, -250, True), (200, 200, False)]:
        ok(write_int16(client, HR_TARGET_TORQUE, target))
        drive.step()
        assert input_int16(client, IR_TORQUE_DEMAND) == demand
        assert pendulum.torque_nm == pytest.approx(demand * 0.04)
        assert bool(statusword(client) & Statusword.INTERNAL_LIMIT_ACTIVE) is limited
    ok(write_int16(client, HR_TARGET_TORQUE, 30000))  # far beyond: still clamped
    drive.step()
    assert input_int16(client, IR_TORQUE_DEMAND) == 250
    command(client, SWITCH_ON)  # not enabled: no limit is acting
    assert not statusword(client) & Statusword.INTERNAL_LIMIT_ACTIVE


# -- maintenance state ---------------------------------------------------------------------
def holding(client) -> list[int]:
    return ok(client.read_holding_registers(0, count=6, device_id=DEV)).registers


def test_settings_are_refused_outside_the_maintenance_state(drive, client):
    bring_to(drive, client, "operation_enabled")
    before = holding(client)
    assert exception_code(write_int16(client, HR_MAX_TORQUE, 2000)) == 4  # 80 N·m
    assert exception_code(write_int16(client, HR_WATCHDOG_MS, 0)) == 4  # watchdog off
    # a multi-register write carrying a setting is refused whole: the target is not applied
    assert exception_code(client.write_registers(HR_TARGET_TORQUE, [300, 2000], device_id=DEV)) == 4
    assert holding(client) == before
    assert drive.status().max_torque_permille == 1000
    assert not drive.status().maintenance
    # nor from a powered-on drive: the unlock needs the power stage off
    key = MAINTENANCE_KEYS[0]
    assert exception_code(client.write_register(HR_MAINTENANCE, key, device_id=DEV)) == 4
    assert state_bits(client) == OE


def test_the_maintenance_unlock_sequence(drive, client):
    boot(drive)
    first, second = MAINTENANCE_KEYS
    assert exception_code(client.write_register(HR_MAINTENANCE, second, device_id=DEV)) == 4
    ok(client.write_register(HR_MAINTENANCE, first, device_id=DEV))
    ok(write_int16(client, HR_TARGET_TORQUE, 0))  # anything in between breaks the sequence
    assert exception_code(client.write_register(HR_MAINTENANCE, second, device_id=DEV)) == 4
    # a key written together with anything else: refused
    assert exception_code(client.write_registers(HR_WATCHDOG_MS, [50, first], device_id=DEV)) == 4
    assert holding(client)[HR_MAINTENANCE] == 0
    maintenance(client)
    assert holding(client)[HR_MAINTENANCE] == 1 and drive.status().maintenance
    # in maintenance the power stage stays off
    assert exception_code(client.write_register(HR_CONTROLWORD, SHUTDOWN, device_id=DEV)) == 4
    assert state_bits(client) == SOD
    ok(write_int16(client, HR_MAX_TORQUE, 500))
    ok(write_int16(client, HR_WATCHDOG_MS, 40))
    maintenance(client, on=False)
    assert holding(client)[HR_MAX_TORQUE : HR_MAINTENANCE + 1] == [500, 40, 0]
    assert exception_code(write_int16(client, HR_MAX_TORQUE, 600)) == 4
    command(client, SHUTDOWN)
    assert state_bits(client) == RTSO


def _exo_rig(server):
    from twinloop.hil.knee.rig import ExoRig, ExoRigConfig, drive_register_names

    profile = load_profile(shipped_profile("exo_drive_tcp")).with_overrides(
        tcp=f"127.0.0.1:{server.tcp_address[1]}"
    )
    device = ModbusDevice(profile)
    rig = ExoRig(
        ExoRigConfig(tcp=f"127.0.0.1:{server.tcp_address[1]}"),
        drive=device,
        registers=drive_register_names(profile),
        torque_limit_nm=30.0,
    )
    return device, rig


@pytest.mark.parametrize("tampered", [None, "max_torque", "watchdog_ms"])
def test_the_knee_rig_never_writes_the_maintenance_settings_and_checks_them(tampered):
    from twinloop.hil.knee.rig import ExoRigError

    drive = DriveEmulator(PendulumJoint())
    seen: list[int] = []
    original = drive.write_holding

    def recording(address, words):  # type: ignore[no-untyped-def]
        seen.extend(range(address, address + len(words)))
        return original(address, words)

    drive.write_holding = recording  # type: ignore[method-assign]
    with drive.start_tcp("127.0.0.1", 0) as server:
        wait_for(lambda: drive.state == DriveState.SWITCH_ON_DISABLED, what="self-test")
        if tampered is not None:  # a technician (or an attacker) changed a setting
            client = ModbusTcpClient("127.0.0.1", port=server.tcp_address[1], timeout=TIMEOUT_S)
            assert client.connect()
            set_settings(client, **{tampered: 2000 if tampered == "max_torque" else 0})
            client.close()
            seen.clear()
        device, rig = _exo_rig(server)
        with device:
            if tampered is None:
                rig.enable()
                assert drive.state == DriveState.OPERATION_ENABLED
                assert rig.drive_settings == {"max_torque_nm": 40.0, "watchdog_ms": 100.0}
            else:
                with pytest.raises(ExoRigError, match="maintenance state"):
                    rig.enable()
                assert drive.state == DriveState.SWITCH_ON_DISABLED  # never powered
            device.apply_safe_state()
    assert seen and not {HR_MAX_TORQUE, HR_WATCHDOG_MS, HR_MAINTENANCE} & set(seen)


# -- range of motion -----------------------------------------------------------------------------
def _push_into_extension(rom_rad):  # type: ignore[no-untyped-def]
    """A knee drive told -30 N·m (full extension assist) for 3 s; the angles and last status."""
    from twinloop.hw_bridge.emulators.drive.emulator import knee_backend

    joint = knee_backend("moderate", theta0_rad=math.radians(20.0))
    drive = DriveEmulator(joint, watchdog_ms=0, rom_rad=rom_rad)
    with drive.start_tcp("127.0.0.1", 0, run_joint=False) as server:
        client = ModbusTcpClient("127.0.0.1", port=server.tcp_address[1], timeout=TIMEOUT_S)
        assert client.connect()
        try:
            bring_to(drive, client, "operation_enabled")
            ok(write_int16(client, HR_TARGET_TORQUE, -750))
            angles = []
            for _ in range(3000):
                drive.step()
                angles.append(joint.angle_rad)
            return angles, input_int16(client, IR_TORQUE_DEMAND), statusword(client), drive
        finally:
            client.close()


def test_the_knee_drive_stops_driving_into_hyperextension_whatever_the_target():
    free, free_demand, _, _ = _push_into_extension((-math.pi, math.pi))
    # without the drive's limit the full push reaches the last 5° before hyperextension (the
    # knee's own passive moment, Riener & Edrich's hamstrings and capsule, stops it near 0°)
    assert min(free) < KNEE_ROM_RAD[0] + ROM_TAPER_RAD
    assert free_demand == -750
    angles, demand, word, drive = _push_into_extension(None)  # the knee's own ROM
    assert drive.rom_rad == KNEE_ROM_RAD
    assert min(angles) > KNEE_ROM_RAD[0]
    assert min(angles) > min(free)  # the taper holds the knee further from the limit
    assert -750 < demand < 0  # tapered near the limit, still extending
    assert word & Statusword.INTERNAL_LIMIT_ACTIVE


def test_no_torque_towards_a_rom_limit_beyond_it_only_back_into_range():
    limited = DriveEmulator(PendulumJoint(angle_rad=-0.3), watchdog_ms=0, rom_rad=(-0.2, 1.0))
    with limited.start_tcp("127.0.0.1", 0, run_joint=False) as server:
        c = ModbusTcpClient("127.0.0.1", port=server.tcp_address[1], timeout=TIMEOUT_S)
        assert c.connect()
        try:
            bring_to(limited, c, "operation_enabled")
            ok(write_int16(c, HR_TARGET_TORQUE, -500))  # further out: nothing applied
            limited.step()
            assert input_int16(c, IR_TORQUE_DEMAND) == 0
            assert limited.backend.torque_nm == 0.0
            assert statusword(c) & Statusword.INTERNAL_LIMIT_ACTIVE
            ok(write_int16(c, HR_TARGET_TORQUE, 500))  # back into the range: full torque
            limited.step()
            assert input_int16(c, IR_TORQUE_DEMAND) == 500
            assert not statusword(c) & Statusword.INTERNAL_LIMIT_ACTIVE
        finally:
            c.close()
    with pytest.raises(ValueError, match="rom_rad"):
        DriveEmulator(PendulumJoint(), rom_rad=(1.0, -1.0))
    with pytest.raises(ValueError, match="rom_taper_rad"):
        DriveEmulator(PendulumJoint(), rom_taper_rad=0.0)


# -- watchdog --------------------------------------------------------------------------------
def test_watchdog_faults_and_fault_reset(drive, client, pendulum):
    boot(drive)
    set_settings(client, watchdog_ms=20)
    bring_to(drive, client, "operation_enabled")
    ok(write_int16(client, HR_TARGET_TORQUE, 300))
    for _ in range(15):
        drive.step()
    ok(write_int16(client, HR_TARGET_TORQUE, 300))  # feeds the watchdog
    for _ in range(20):
        drive.step()
    assert state_bits(client) == OE  # 20 ms without a write: not yet more than 20
    assert statusword(client) & Statusword.WARNING  # more than half of it has passed
    drive.step()  # 21 ms
    assert state_bits(client) == 0x0F  # fault reaction active
    assert input_int16(client, IR_TORQUE_DEMAND) == 0
    drive.step()
    assert state_bits(client) == FAULT
    assert ok(client.read_input_registers(IR_ERROR_CODE, count=1)).registers[0] == ERROR_WATCHDOG
    assert pendulum.torque_nm == 0.0
    command(client, FAULT_RESET)
    assert state_bits(client) == SOD
    assert ok(client.read_input_registers(IR_ERROR_CODE, count=1)).registers[0] == 0


def test_watchdog_is_off_outside_operation_enabled(drive, client):
    boot(drive)
    set_settings(client, watchdog_ms=10)
    bring_to(drive, client, "switched_on")
    for _ in range(100):
        drive.step()
    assert state_bits(client) == SO


def test_watchdog_on_the_wall_clock_through_the_profile():
    """The 1 kHz joint thread: an enabled drive left alone faults with 0x8130."""
    drive = DriveEmulator(PendulumJoint(), watchdog_ms=50)
    with drive.start_tcp("127.0.0.1", 0) as server:
        profile = load_profile(shipped_profile("exo_drive_tcp")).with_overrides(
            tcp=f"127.0.0.1:{server.tcp_address[1]}"
        )
        with ModbusDevice(profile) as device:
            wait_for(lambda: device.read("statusword") & 0x6F == SOD, what="switch on disabled")
            assert device.read("watchdog_ms") == 50
            for word in (SHUTDOWN, SWITCH_ON, ENABLE_OP):
                assert device.write("controlword", word) is None
            assert device.write("target_torque_nm", 12.0) is None
            wait_for(lambda: device.read("statusword") & 0x6F == FAULT, what="watchdog fault")
            values = device.read_many(["error_code", "torque_demand_nm", "statusword"])
            assert values["error_code"] == ERROR_WATCHDOG
            assert values["torque_demand_nm"] == 0.0
            assert values["statusword"] & Statusword.FAULT
            assert device.write("controlword", FAULT_RESET) is None
            assert device.read("statusword") & 0x6F == SOD
            assert device.read("error_code") == 0


# -- the joint -------------------------------------------------------------------------------
@pytest.mark.parametrize("torque_permille", [500, -500])
def test_constant_torque_accelerates_the_pendulum(drive, client, pendulum, torque_permille):
    bring_to(drive, client, "operation_enabled")
    ok(write_int16(client, HR_TARGET_TORQUE, torque_permille))  # ±20 N·m > m·g·l = 9.8 N·m
    sign = math.copysign(1, torque_permille)
    previous = 0
    for _ in range(4):
        for _ in range(100):
            drive.step()
        position = input_int32(client, IR_POSITION_ACTUAL)
        velocity = input_int32(client, IR_VELOCITY_ACTUAL)
        assert sign * position > sign * previous
        assert sign * velocity > 0
        previous = position
    # the encoder scale: 131072 counts a revolution
    counts_per_rad = 131072 / (2 * math.pi)
    assert position == round(pendulum.angle_rad * counts_per_rad)
    assert velocity == round(pendulum.velocity_rad_s * counts_per_rad)


def test_positions_read_through_the_profile_in_rad(drive, client, pendulum, profile):
    bring_to(drive, client, "operation_enabled")
    ok(write_int16(client, HR_TARGET_TORQUE, 500))
    for _ in range(300):
        drive.step()
    with ModbusDevice(profile) as device:
        values = device.read_many(
            ["position_rad", "velocity_rad_s", "torque_actual_nm", "encoder_counts_per_rev"]
        )
    step = 2 * math.pi / 131072
    assert values["position_rad"] == pytest.approx(pendulum.angle_rad, abs=step)
    assert values["velocity_rad_s"] == pytest.approx(pendulum.velocity_rad_s, abs=step)
    assert values["torque_actual_nm"] == pytest.approx(20.0)
    assert values["encoder_counts_per_rev"] == 131072
    assert values["position_rad"] > 0


def test_pendulum_physics():
    """Small oscillations have the period 2π·sqrt(I/(m·g·l)); a torque holds asin(τ/(m·g·l))."""
    joint = PendulumJoint(damping_nm_s_rad=0.0, angle_rad=0.05)
    assert isinstance(joint, JointBackend)
    dt = 1e-4
    crossings = []
    previous = joint.angle_rad
    for k in range(1, 40000):
        joint.step(0.0, dt)
        if previous > 0 >= joint.angle_rad:
            crossings.append(k * dt)
        previous = joint.angle_rad
    period = crossings[1] - crossings[0]
    expected = 2 * math.pi * math.sqrt(joint.inertia_kg_m2 / joint.gravity_torque_max_nm)
    assert period == pytest.approx(expected, rel=2e-3)
    damped = PendulumJoint()
    torque = 0.5 * damped.gravity_torque_max_nm
    for _ in range(30000):
        damped.step(torque, 1e-3)
    assert damped.angle_rad == pytest.approx(math.asin(0.5), abs=1e-4)
    assert damped.velocity_rad_s == pytest.approx(0.0, abs=1e-4)


def test_pendulum_refuses_unphysical_parameters():
    with pytest.raises(ValueError, match="inertia"):
        PendulumJoint(mass_kg=4.0, com_m=0.5, inertia_kg_m2=0.5)  # < m·l² = 1
    with pytest.raises(ValueError):
        PendulumJoint(mass_kg=-1.0)
    with pytest.raises(ValueError):
        PendulumJoint().step(math.nan, 1e-3)


def test_adapter_hook_on_a_plant_object():
    class Plant:  # any object with step(torque, dt) and an angle/velocity
        def __init__(self) -> None:
            self.theta, self.omega, self.tau = 0.0, 0.0, 0.0

        def step(self, exo_torque_cmd_nm: float, dt_s: float) -> str:
            self.omega += dt_s * exo_torque_cmd_nm
            self.theta += dt_s * self.omega
            self.tau = 0.9 * exo_torque_cmd_nm
            return "ignored"

    plant = Plant()
    joint = PlantJointAdapter(plant, angle_attr="theta", velocity_attr="omega", torque_attr="tau")
    drive = DriveEmulator(joint, watchdog_ms=0)
    for _ in range(SELF_TEST_TICKS):
        drive.step()
    assert drive.write_holding(HR_TARGET_TORQUE, [250]) is None
    for word in (SHUTDOWN, ENABLE_OP):
        assert drive.write_holding(HR_CONTROLWORD, [word]) is None
    drive.step()
    status = drive.status()
    assert status.state == DriveState.OPERATION_ENABLED
    assert status.torque_nm == pytest.approx(9.0)  # the plant's measured 90 % of 10 N·m
    assert status.angle_rad == plant.theta > 0
    with pytest.raises(TypeError):
        PlantJointAdapter(object())


def test_knee_plant_backend():
    """The knee plant (plant/knee/model.py) behind the drive: flexion torque flexes the knee."""
    pytest.importorskip("twinloop.plant.knee.model")
    from twinloop.hw_bridge.emulators.drive.emulator import knee_backend

    angles = {}
    for torque_permille in (0, 250):
        joint = knee_backend("moderate")
        drive = DriveEmulator(joint, watchdog_ms=0)
        with drive.start_tcp("127.0.0.1", 0, run_joint=False) as server:
            client = ModbusTcpClient("127.0.0.1", port=server.tcp_address[1], timeout=TIMEOUT_S)
            assert client.connect()
            try:
                bring_to(drive, client, "operation_enabled")
                ok(write_int16(client, HR_TARGET_TORQUE, torque_permille))
                for _ in range(300):
                    drive.step()
                angles[torque_permille] = input_int32(client, IR_POSITION_ACTUAL)
                if torque_permille:
                    measured = input_int16(client, IR_TORQUE_ACTUAL) * 0.04
                    assert measured == pytest.approx(joint.torque_nm, abs=0.04)
                    assert measured > 0
            finally:
                client.close()
    assert angles[250] > angles[0]


def test_knee_backend_following_a_task_starts_its_clock_at_each_enable():
    """The emulated patient follows the task row of (task, seed), timed from enable operation."""
    pytest.importorskip("twinloop.plant.knee.model")
    from twinloop.hw_bridge.emulators.drive.emulator import (
        TaskFollowingJoint,
        knee_backend,
        knee_task_row,
    )
    from twinloop.plant.knee.tasks import reference

    joint = knee_backend("moderate", seed=4, task="cyclic")
    assert isinstance(joint, TaskFollowingJoint)
    row = knee_task_row("cyclic", 4)
    assert list(joint.task_row) == list(row)
    assert joint.angle_rad == pytest.approx(reference(row, 0.0)[0])  # the task's start posture
    drive = DriveEmulator(joint, watchdog_ms=0)
    boot(drive)
    assert joint.task_time_s == 0.0 and joint.enables == 0  # waits for the enable
    for word in (SHUTDOWN, SWITCH_ON, ENABLE_OP):
        assert drive.write_holding(HR_CONTROLWORD, [word]) is None
    assert joint.enables == 1
    for _ in range(800):
        drive.step()
    assert joint.task_time_s == pytest.approx(0.8)
    theta, omega = reference(row, joint.task_time_s - drive.dt_s)  # set at the last tick's start
    assert joint.plant._ref == pytest.approx((theta, omega))
    assert drive.write_holding(HR_CONTROLWORD, [ENABLE_OP]) is None  # already enabled: no restart
    assert joint.enables == 1
    for word in (SWITCH_ON, ENABLE_OP):  # disable operation, enable again: the clock restarts
        assert drive.write_holding(HR_CONTROLWORD, [word]) is None
    assert joint.enables == 2 and joint.task_time_s == 0.0
    with pytest.raises(ValueError, match="task"):
        knee_backend("moderate", task="marathon")


def test_loop_timing_percentiles_ring_and_reset():
    from twinloop.hw_bridge.emulators.drive.emulator import LoopTiming

    timing = LoopTiming(0.001, capacity=100)
    assert timing.summary() == {"ticks": 0, "period_ms": 1.0}
    for k in range(150):  # the ring keeps the newest 100: 50..149 µs
        timing.record(k * 1e-6, 2e-6)
    s = timing.summary()
    assert s["ticks"] == 150 and s["window"] == 100
    assert s["lateness_ms"]["p50"] == pytest.approx(0.0995)
    assert s["lateness_ms"]["p99"] == pytest.approx(0.14801)
    assert s["lateness_ms"]["max"] == pytest.approx(0.149)
    assert s["duration_ms"]["p50"] == pytest.approx(0.002)
    assert s["late_by_more_than_period"] == 0
    timing.record(0.0025, 0.0)
    assert timing.summary()["late_by_more_than_period"] == 1
    timing.reset()
    assert timing.summary()["ticks"] == 0
    with pytest.raises(ValueError, match="capacity"):
        LoopTiming(0.001, capacity=0)


def test_the_joint_thread_records_its_lateness():
    drive = DriveEmulator(PendulumJoint(), watchdog_ms=0)
    drive.start_joint()
    try:
        wait_for(lambda: drive.timing.ticks >= 50, what="50 joint ticks")
    finally:
        drive.stop_joint()
    s = drive.timing.summary()
    assert s["ticks"] >= 50 and s["period_ms"] == 1.0
    assert set(s["lateness_ms"]) == {"p50", "p99", "p999", "max"}
    assert 0.0 <= s["lateness_ms"]["p50"] <= s["lateness_ms"]["max"]
    assert s["duration_ms"]["max"] >= 0.0


def test_a_failing_joint_model_faults_the_drive(caplog):
    class Broken(PendulumJoint):
        def step(self, torque_nm: float, dt_s: float) -> None:
            if torque_nm:
                raise FloatingPointError("diverged")
            super().step(torque_nm, dt_s)

    drive = DriveEmulator(Broken(), watchdog_ms=0)
    for _ in range(SELF_TEST_TICKS):
        drive.step()
    for address, word in [(HR_TARGET_TORQUE, 100), (HR_CONTROLWORD, SHUTDOWN)]:
        assert drive.write_holding(address, [word]) is None
    assert drive.write_holding(HR_CONTROLWORD, [ENABLE_OP]) is None
    drive.step()
    drive.step()
    status = drive.status()
    assert status.state == DriveState.FAULT
    assert status.error_code == 0x6100
    assert isinstance(drive.error, FloatingPointError)
    assert drive.write_holding(HR_CONTROLWORD, [FAULT_RESET]) is None
    assert drive.state == DriveState.SWITCH_ON_DISABLED
    drive.step()  # the model is still broken: the drive faults again
    assert drive.state == DriveState.FAULT_REACTION_ACTIVE


# -- the profile -------------------------------------------------------------------------------
def test_profile_limits_block_writes_before_the_wire(drive, client, profile):
    bring_to(drive, client, "operation_enabled")
    seen: list[tuple[int, list[int]]] = []
    original = drive.write_holding

    def recording(address, words):
        seen.append((address, list(words)))
        return original(address, words)

    drive.write_holding = recording  # type: ignore[method-assign]
    wire = Wire()
    with ModbusDevice(profile, trace=wire) as device:
        for name, value in [
            ("target_torque_nm", 35.0),
            ("target_torque_nm", -30.5),
            ("max_torque_nm", 41.0),
            ("watchdog_ms", 0),
            ("modes_of_operation", 8),
            ("target_torque_nm", math.nan),
            ("statusword", 0),
        ]:
            with pytest.raises(WriteRefused):
                device.write(name, value)
        assert wire.frames == []
        assert seen == []
        assert input_int16(client, IR_TORQUE_DEMAND) == 0
        # within the limits: it reaches the drive, which applies it
        assert device.write("target_torque_nm", 25.0) is None
        assert seen == [(HR_TARGET_TORQUE, [625])]
        drive.step()
        assert device.read("torque_demand_nm") == pytest.approx(25.0)
        # the drive's own clamp below the profile's limit (a maintenance setting), flagged
        command(client, 0)
        set_settings(client, max_torque=250)
        for word in (SHUTDOWN, ENABLE_OP):
            command(client, word)
        assert device.read("max_torque_nm") == pytest.approx(10.0)
        drive.step()
        assert device.read("torque_demand_nm") == pytest.approx(10.0)
        assert device.read("statusword") & Statusword.INTERNAL_LIMIT_ACTIVE
        # the safe state: zero torque, power off
        device.apply_safe_state()
    assert drive.state == DriveState.SWITCH_ON_DISABLED
    assert drive.status().target_torque_permille == 0


def test_shipped_profile_matches_the_drive():
    profile = load_profile(shipped_profile("exo_drive_tcp"))
    drive = DriveEmulator()
    assert profile.kind == "servo_drive"
    assert profile.register("target_torque_nm").scale == pytest.approx(drive.rated_torque_nm / 1000)
    assert profile.register("position_rad").scale == pytest.approx(1 / drive.counts_per_rad)
    assert profile.channel("exo_torque_cmd_nm").name == "target_torque_nm"
    lo, hi = profile.register("target_torque_nm").limits()
    assert -drive.rated_torque_nm < lo < 0 < hi < drive.rated_torque_nm


# -- third-party client, command line -------------------------------------------------------------
@pytest.mark.skipif(not Path(MBPOLL).exists(), reason="mbpoll is not installed")
def test_mbpoll_reads_the_statusword(drive, client, server):
    bring_to(drive, client, "operation_enabled")
    port = str(server.tcp_address[1])
    options = ["-m", "tcp", "-p", port, "-a", "1", "-0", "-1", "-o", "1", "-t", "3", "-r", "0"]
    done = subprocess.run(
        [MBPOLL, *options, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    values = {int(k): int(v) for k, v in re.findall(r"^\[(\d+)\]:\s+(\d+)", done.stdout, re.M)}
    expected = (
        OE
        | Statusword.VOLTAGE_ENABLED
        | Statusword.REMOTE
        | Statusword.TARGET_REACHED
        | Statusword.FOLLOWS_COMMAND
    )
    assert values == {IR_STATUSWORD: expected}


def test_cli_emulate_drive_with_a_task_writes_its_joint_timing(tmp_path):
    pytest.importorskip("twinloop.plant.knee.model")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    timing = tmp_path / "timing.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", "drive", "--tcp", "127.0.0.1:0", "--joint",
         "knee", "--patient", "severe", "--task", "sit_to_stand", "--seed", "3",
         "--timing-json", str(timing)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "knee, task sit_to_stand (seed 3)" in line, line
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        rest = proc.stdout.read()
        assert "drive joint loop:" in rest and "lateness p50" in rest
        summary = json.loads(timing.read_text())
        assert summary["ticks"] > 0 and "p99" in summary["lateness_ms"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_emulate_drive_task_needs_the_knee(capsys):
    from twinloop.cli.main import main

    assert main(["emulate", "drive", "--tcp", "127.0.0.1:0", "--task", "cyclic"]) == 2
    err = capsys.readouterr().err
    assert "--joint knee" in err and "Traceback" not in err


def test_cli_emulate_drive():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", "drive", "--tcp", "127.0.0.1:0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"Modbus TCP on 127\.0\.0\.1:(\d+)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        client = ModbusTcpClient("127.0.0.1", port=int(match.group(1)), timeout=TIMEOUT_S)
        assert client.connect()
        try:
            wait_for(lambda: state_bits(client) == SOD, what="switch on disabled")
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
