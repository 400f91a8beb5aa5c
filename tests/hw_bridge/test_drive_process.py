"""The drive with its firmware in a core process of its own (``DriveProcess``), over Modbus TCP.

The firmware is :class:`DriveEmulator`'s (tested in ``test_drive.py``); what is tested here is
the split: reads served from the tables the core publishes, writes checked here and applied by
the core (through a call with the joint loop stopped, through the shared mailbox with it
running), a read after a write seeing the write, the core's death seen on the wire.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from pymodbus.client import ModbusTcpClient

from tests.hw_bridge.test_drive import (
    COMMANDS,
    DEV,
    DISABLE_VOLTAGE,
    ENABLE_OP,
    EXPECTED,
    FAULT_RESET,
    OE,
    RTSO,
    SHUTDOWN,
    SO,
    SOD,
    STATE_WORDS,
    SWITCH_ON,
    TIMEOUT_S,
    command,
    exception_code,
    input_int16,
    ok,
    set_settings,
    state_bits,
    wait_for,
    write_int16,
)
from twinloop.hw_bridge.emulators.drive.modbus import (
    HR_CONTROLWORD,
    HR_MAX_TORQUE,
    HR_MODES_OF_OPERATION,
    HR_TARGET_TORQUE,
    IR_ERROR_CODE,
    IR_STATUSWORD,
    IR_TORQUE_DEMAND,
    DriveState,
)
from twinloop.hw_bridge.emulators.drive.process import DriveProcess, knee_factory
from twinloop.hw_bridge.emulators.modbus_server import EmulatorError

HEARTBEAT = 9


def heartbeat(client) -> int:  # type: ignore[no-untyped-def]
    return ok(client.read_input_registers(HEARTBEAT, count=1, device_id=DEV)).registers[0]


def connect(server) -> ModbusTcpClient:  # type: ignore[no-untyped-def]
    client = ModbusTcpClient("127.0.0.1", port=server.tcp_address[1], timeout=TIMEOUT_S, retries=0)
    assert client.connect()
    return client


def to_switch_on_disabled(client) -> None:  # type: ignore[no-untyped-def]
    """From any state past the self-test: disable voltage, a fault-reset edge, disable voltage."""
    for word in (DISABLE_VOLTAGE, FAULT_RESET, DISABLE_VOLTAGE):
        command(client, word)
    assert state_bits(client) == SOD


def test_the_transition_table_through_the_core_with_the_joint_stopped():
    """Every (state, command) cell of IEC 61800-7-201, relayed to the core and read back."""
    paths = {
        "switch_on_disabled": [],
        "ready_to_switch_on": [SHUTDOWN],
        "switched_on": [SHUTDOWN, SWITCH_ON],
        "operation_enabled": [SHUTDOWN, SWITCH_ON, ENABLE_OP],
        "quick_stop_active": [SHUTDOWN, SWITCH_ON, ENABLE_OP, 0x02],
        "fault": [SHUTDOWN, SWITCH_ON, ENABLE_OP],
    }
    with (
        DriveProcess(watchdog_ms=0) as drive,
        drive.start_tcp("127.0.0.1", 0, run_joint=False) as server,
    ):
        client = connect(server)
        try:
            assert state_bits(client) == 0x00  # not ready: the self-test has not run
            for _ in range(5):
                drive.step()
            assert drive.state == DriveState.SWITCH_ON_DISABLED
            for state, path in paths.items():
                for name, word in COMMANDS.items():
                    to_switch_on_disabled(client)
                    for step_word in path:
                        command(client, step_word)
                    if state == "fault":
                        drive.inject_fault(0x5400)
                        drive.step()
                    assert state_bits(client) == STATE_WORDS[state], (state, name)
                    command(client, word)
                    assert state_bits(client) == EXPECTED[state][name], (state, name)
        finally:
            client.close()


def test_writes_through_the_mailbox_are_seen_by_the_next_read():
    """With the core's 1 kHz loop running, each write's effect is in the very next read."""
    with DriveProcess(watchdog_ms=0) as drive, drive.start_tcp("127.0.0.1", 0) as server:
        client = connect(server)
        try:
            wait_for(lambda: state_bits(client) == SOD, what="switch on disabled")
            first = heartbeat(client)
            wait_for(lambda: heartbeat(client) != first, what="the core's heartbeat")
            set_settings(client, max_torque=400)  # in the core's maintenance state
            for word, expected in ((SHUTDOWN, RTSO), (SWITCH_ON, SO), (ENABLE_OP, OE)):
                command(client, word)
                assert state_bits(client) == expected
            assert exception_code(write_int16(client, HR_MAX_TORQUE, 1000)) == 4  # not now
            for target, demand in ((250, 250), (-300, -300), (900, 400), (-900, -400)):
                ok(write_int16(client, HR_TARGET_TORQUE, target))
                assert input_int16(client, IR_TORQUE_DEMAND) == demand
            # a multi-register write is applied as a whole: shutdown and a new target together
            ok(client.write_registers(HR_CONTROLWORD, [SHUTDOWN], device_id=DEV))
            assert state_bits(client) == RTSO
            assert input_int16(client, IR_TORQUE_DEMAND) == 0
            # refused here, before the core: a mode other than CST (03), outside the map (02)
            assert exception_code(write_int16(client, HR_MODES_OF_OPERATION, 7)) == 3
            assert exception_code(client.write_register(9, 1, device_id=DEV)) == 2
            assert exception_code(write_int16(client, HR_MAX_TORQUE, 2001)) == 3
            assert state_bits(client) == RTSO
        finally:
            client.close()
        assert drive.timing.summary()["ticks"] > 0
        assert drive.error is None


def test_the_watchdog_runs_in_the_core():
    """Enabled and left alone, the core faults with 0x8130 on its own clock."""
    with DriveProcess(watchdog_ms=20) as drive, drive.start_tcp("127.0.0.1", 0) as server:
        client = connect(server)
        try:
            wait_for(lambda: state_bits(client) == SOD, what="switch on disabled")
            for word in (SHUTDOWN, SWITCH_ON, ENABLE_OP):
                command(client, word)
            wait_for(lambda: state_bits(client) == STATE_WORDS["fault"], what="watchdog fault")
            regs = ok(client.read_input_registers(IR_ERROR_CODE, count=1, device_id=DEV))
            assert regs.registers[0] == 0x8130
            assert drive.status().error_code == 0x8130
        finally:
            client.close()


def test_a_dead_core_is_seen_on_the_wire():
    """Killed core: the heartbeat freezes and writes answer exception 04 (device failure)."""
    with DriveProcess(watchdog_ms=0) as drive, drive.start_tcp("127.0.0.1", 0) as server:
        client = connect(server)
        try:
            wait_for(lambda: state_bits(client) == SOD, what="switch on disabled")
            assert drive.pid is not None
            os.kill(drive.pid, signal.SIGKILL)
            wait_for(lambda: not drive.alive, what="the core's end")
            frozen = heartbeat(client)
            time.sleep(0.05)
            assert heartbeat(client) == frozen
            assert (
                exception_code(client.write_register(HR_CONTROLWORD, SHUTDOWN, device_id=DEV)) == 4
            )
            assert ok(client.read_input_registers(IR_STATUSWORD, count=1, device_id=DEV))
            with pytest.raises(EmulatorError, match="ended"):
                drive.status()
        finally:
            client.close()


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="watchdog_ms=-1"):
        DriveProcess(watchdog_ms=-1)
    with pytest.raises(ValueError, match="task='marathon'"):
        DriveProcess(knee_factory("moderate", task="marathon"))


def test_the_knee_follows_its_task_in_the_core():
    """The knee backend built in the core: enabled with zero torque, the patient moves."""
    factory = knee_factory("mild", seed=2, task="cyclic")
    with DriveProcess(factory, watchdog_ms=0) as drive, drive.start_tcp("127.0.0.1", 0) as server:
        client = connect(server)
        try:
            wait_for(lambda: state_bits(client) == SOD, what="switch on disabled")
            for word in (SHUTDOWN, SWITCH_ON, ENABLE_OP):
                command(client, word)
            start = drive.status().angle_rad
            wait_for(lambda: abs(drive.status().angle_rad - start) > 0.05, what="knee motion")
        finally:
            client.close()
