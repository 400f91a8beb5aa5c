"""The profile-driven Modbus client against plain pymodbus servers (TCP, RTU on a pty, TLS)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import ipaddress
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU, FramerSocket, FramerType
from pymodbus.pdu import DecodePDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer, ModbusTlsServer
from pymodbus.simulator import DataType, SimData, SimDevice

from twinloop.hw_bridge.errors import (
    CommunicationError,
    DeviceException,
    ProfileError,
    WriteRefused,
)
from twinloop.hw_bridge.modbus_client import MAX_READ_BITS, MAX_READ_WORDS, ModbusDevice, plan_reads
from twinloop.hw_bridge.profile import (
    DeviceProfile,
    Register,
    load_profile,
    parse_profile,
    shipped_profile,
)
from twinloop.hw_bridge.pty import PtyPair
from twinloop.hw_bridge.wire import MODBUS_ROLE_OID, certificate_role

pytestmark = pytest.mark.hil

# ---------------------------------------------------------------------------------------------
# a plain pymodbus server in a background thread with its own asyncio loop
# ---------------------------------------------------------------------------------------------

HOLDING_WORDS = 32
INPUT_WORDS = 15

# the pump map plus test registers in the spare holding addresses
EXTRA_REGISTERS: list[dict[str, Any]] = [
    {"name": "f32_little", "table": "holding", "address": 10, "dtype": "float32",
     "word_order": "little", "minimum": -100, "maximum": 100},
    {"name": "i32_milli", "table": "holding", "address": 12, "dtype": "int32", "scale": 0.001,
     "minimum": -1000, "maximum": 1000},
    {"name": "i16_tenth", "table": "holding", "address": 14, "dtype": "int16", "scale": 0.1},
    {"name": "u32_little", "table": "holding", "address": 16, "dtype": "uint32",
     "word_order": "little"},
    {"name": "unmapped", "table": "holding", "address": 200, "dtype": "uint16"},
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Busy:
    """SimDevice action: answer SERVER DEVICE BUSY to a write of ``command`` = 4."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, list[Any]]] = []

    async def act(self, fc, start, address, count, registers, values):
        if values is not None:
            self.writes.append((fc, address, list(values)))
            if fc == 6 and address == 5 and list(values) == [4]:
                return ExcCodes.DEVICE_BUSY
        return None


def pump_simdevice(action: Busy | None = None) -> SimDevice:
    """Four separate tables sized for the pump map; discrete inputs 0 and 2 are set."""
    return SimDevice(
        id=1,
        simdata=(
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=[True, False, True] + [False] * 13, datatype=DataType.BITS,
                     readonly=True)],
            [SimData(0, count=HOLDING_WORDS, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, values=[0, 12345, 0x43C8, 0, 999] + [0] * (INPUT_WORDS - 5),
                     datatype=DataType.REGISTERS, readonly=True)],
        ),
        action=None if action is None else action.act,
    )  # fmt: skip


class ServerThread:
    """Runs ``make()`` (a pymodbus server, built inside the loop) in a thread until stop()."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, name="pymodbus-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the pymodbus server did not start")
        if self._error is not None:
            self._thread.join(5)
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = self._make()
            await self._server.serve_forever(background=True)

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture(autouse=True)
def quiet_pymodbus() -> Iterator[None]:
    logger = logging.getLogger("pymodbus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def make_profile(transport: dict[str, Any]) -> DeviceProfile:
    pump = load_profile(shipped_profile("insulin_pump_tcp"))
    registers = [
        {k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in pump.registers
    ]
    mapping = {
        "name": "test_pump",
        "kind": "insulin_pump",
        "transport": {"timeout_s": 0.3, "retries": 2, "reconnect_backoff_s": [0.01, 0.05],
                      "device_id": 1, **transport},
        "registers": registers + copy.deepcopy(EXTRA_REGISTERS),
        "safe_state": [{"register": s.register, "value": s.value} for s in pump.safe_state],
    }  # fmt: skip
    return parse_profile(mapping, source="test")


class Wire:
    """A trace hook that records every frame."""

    def __init__(self) -> None:
        self.frames: list[tuple[bool, bytes]] = []

    def __call__(self, sending: bool, data: bytes) -> None:
        self.frames.append((sending, data))

    @property
    def sent(self) -> list[bytes]:
        return [d for s, d in self.frames if s]


@dataclasses.dataclass
class Rig:
    device: ModbusDevice
    wire: Wire
    action: Busy
    port: int
    server: ServerThread
    raw: Callable[[], ModbusTcpClient]


@pytest.fixture
def tcp_rig() -> Iterator[Rig]:
    action = Busy()
    port = free_port()
    server = ServerThread(
        lambda: ModbusTcpServer(pump_simdevice(action), address=("127.0.0.1", port))
    )
    wire = Wire()
    device = ModbusDevice(make_profile({"kind": "modbus-tcp", "port": port}), trace=wire)

    def raw() -> ModbusTcpClient:
        return ModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)

    rig = Rig(device, wire, action, port, server, raw)
    try:
        with device:
            yield rig
    finally:
        rig.server.stop()  # a test may have replaced it


def raw_holding(rig: Rig, address: int, count: int) -> list[int]:
    """The server's holding registers, read with a plain pymodbus client (not ours)."""
    with rig.raw() as client:
        pdu = client.read_holding_registers(address, count=count, device_id=1)
    assert not pdu.isError()
    return list(pdu.registers)


# ---------------------------------------------------------------------------------------------
# reads and writes
# ---------------------------------------------------------------------------------------------


def test_write_and_read_back_with_scaling_and_word_order(tcp_rig: Rig):
    d = tcp_rig.device
    assert d.write("bolus_u", 2.5) is None
    assert d.write("temp_basal_duration_min", 30) is None
    assert d.write("f32_little", -1.5) is None
    assert d.write("i32_milli", -12.345) is None
    assert d.write("i16_tenth", 3.14) is None
    assert d.write("u32_little", 0x12345678) is None
    assert d.write("suspend", True) is None
    # what is on the server, checked with struct and a plain pymodbus client
    words = raw_holding(tcp_rig, 0, 18)
    be_f32 = struct.unpack(">HH", struct.pack(">f", 2.5))
    assert tuple(words[3:5]) == be_f32  # big word order: high word first
    assert words[2] == 30
    le_f32 = struct.unpack(">HH", struct.pack(">f", -1.5))
    assert tuple(words[10:12]) == le_f32[::-1]  # little word order: low word first
    assert tuple(words[12:14]) == struct.unpack(">HH", struct.pack(">i", -12345))
    assert words[14] == 31  # 3.14 / 0.1 rounded
    assert tuple(words[16:18]) == (0x5678, 0x1234)
    values = d.read_many(
        ["bolus_u", "temp_basal_duration_min", "f32_little", "i32_milli", "i16_tenth",
         "u32_little", "suspend"]
    )  # fmt: skip
    assert values == {
        "bolus_u": 2.5,
        "temp_basal_duration_min": 30,
        "f32_little": -1.5,
        "i32_milli": pytest.approx(-12.345),
        "i16_tenth": pytest.approx(3.1),
        "u32_little": 0x12345678,
        "suspend": True,
    }
    assert list(values) == [
        "bolus_u", "temp_basal_duration_min", "f32_little", "i32_milli", "i16_tenth",
        "u32_little", "suspend",
    ]  # fmt: skip


def test_read_only_tables_are_decoded_with_their_scale(tcp_rig: Rig):
    values = tcp_rig.device.read_many(
        ["delivered_total_u", "reservoir_u", "battery_pct", "occluded", "suspended",
         "bolus_active"]
    )  # fmt: skip
    assert values == {
        "delivered_total_u": pytest.approx(12.345),  # int32 12345 x 0.001
        "reservoir_u": 400.0,  # float32 0x43C80000
        "battery_pct": pytest.approx(99.9),  # uint16 999 x 0.1
        "occluded": True,
        "suspended": False,
        "bolus_active": True,
    }
    assert tcp_rig.device.read("heartbeat") == 0


def test_read_many_groups_contiguous_registers_per_table(tcp_rig: Rig):
    d, wire = tcp_rig.device, tcp_rig.wire
    pump = load_profile(shipped_profile("insulin_pump_tcp"))
    wire.frames.clear()
    values = d.read_many([r.name for r in pump.registers])
    assert set(values) == {r.name for r in pump.registers}
    function_codes = sorted(frame[7] for frame in wire.sent)  # MBAP header is 7 bytes
    assert function_codes == [1, 2, 3, 4]  # one request per table


def test_plan_reads_merges_contiguous_and_splits_at_gaps_and_size_limits():
    def reg(name: str, address: int, dtype: str = "uint16", table: str = "holding") -> Register:
        return Register(name=name, table=table, address=address, dtype=dtype)

    blocks = plan_reads([reg("a", 0), reg("b", 1, "float32"), reg("c", 3), reg("gap", 10)])
    assert [(b.address, b.count) for b in blocks] == [(0, 4), (10, 1)]
    many = [reg(f"r{i}", i) for i in range(300)]
    blocks = plan_reads(many)
    assert [b.count for b in blocks] == [MAX_READ_WORDS, MAX_READ_WORDS, 50]
    # a 32-bit value never straddles two requests
    odd = [reg("x", 0)] + [reg(f"f{i}", 1 + 2 * i, "float32") for i in range(100)]
    assert all(b.count <= MAX_READ_WORDS for b in plan_reads(odd))
    assert sum(len(b.registers) for b in plan_reads(odd)) == 101
    bits = [reg(f"b{i}", i, "bool", "coil") for i in range(2500)]
    assert [b.count for b in plan_reads(bits)] == [MAX_READ_BITS, 500]
    # gaps covered by other mapped registers are read through; unmapped gaps split
    table = [reg("a", 0, "float32"), reg("mid", 2, "float32"), reg("c", 4), reg("far", 9)]
    wanted = [table[0], table[2], table[3]]
    blocks = plan_reads(wanted, mapped=table)
    assert [(b.address, b.count) for b in blocks] == [(0, 5), (9, 1)]
    assert [r.name for r in blocks[0].registers] == ["a", "c"]


def test_refused_writes_never_reach_the_wire(tcp_rig: Rig, caplog: pytest.LogCaptureFixture):
    d, wire = tcp_rig.device, tcp_rig.wire
    before = raw_holding(tcp_rig, 0, 8)
    wire.frames.clear()
    with caplog.at_level(logging.WARNING, logger="hw_bridge.refused"):
        for name, value in [
            ("reservoir_u", 10.0),  # read-only (input register)
            ("occluded", False),  # read-only (discrete input)
            ("bolus_u", 25.5),  # over the limit
            ("temp_basal_u_per_h", -0.1),  # under the limit
            ("temp_basal_u_per_h", float("nan")),
            ("bolus_u", float("inf")),
            ("command", 5),
        ]:
            with pytest.raises(WriteRefused):
                d.write(name, value)
        with pytest.raises(WriteRefused):  # one refusal refuses the batch
            d.write_many([("temp_basal_u_per_h", 1.0), ("temp_basal_duration_min", 31)])
    assert wire.frames == []
    assert len([r for r in caplog.records if r.name == "hw_bridge.refused"]) == 8
    assert raw_holding(tcp_rig, 0, 8) == before
    assert tcp_rig.action.writes == []
    # the same device still writes what is allowed, and that does reach the wire
    assert d.write("bolus_u", 25.0) is None
    assert len(wire.sent) == 1


def test_a_device_exception_on_a_write_is_a_value(tcp_rig: Rig):
    d = tcp_rig.device
    assert d.write("command", 4) == int(ExcCodes.DEVICE_BUSY)
    assert d.write("command", 3) is None


def test_write_many_and_the_safe_state_go_out_in_order(tcp_rig: Rig):
    d = tcp_rig.device
    results = d.write_many({"temp_basal_u_per_h": 1.25, "temp_basal_duration_min": 15})
    assert results == [("temp_basal_u_per_h", None), ("temp_basal_duration_min", None)]
    tcp_rig.action.writes.clear()
    assert d.apply_safe_state() == [("command", None), ("temp_basal_duration_min", None)]
    assert tcp_rig.action.writes == [(6, 5, [3]), (6, 2, [0])]
    assert d.read("temp_basal_duration_min") == 0


def test_a_read_of_a_missing_address_raises_device_exception(tcp_rig: Rig):
    with pytest.raises(DeviceException) as info:
        tcp_rig.device.read("unmapped")
    assert info.value.code == int(ExcCodes.ILLEGAL_ADDRESS)
    assert "unmapped" in str(info.value)
    # a device exception is not retried: exactly one request went out
    tcp_rig.wire.frames.clear()
    with pytest.raises(DeviceException):
        tcp_rig.device.read("unmapped")
    assert len(tcp_rig.wire.sent) == 1


def test_reading_a_write_only_register_or_an_unknown_name_is_a_profile_error(tcp_rig: Rig):
    with pytest.raises(ProfileError):
        tcp_rig.device.read("no_such_register")
    tcp_rig.wire.frames.clear()
    with pytest.raises(ProfileError):
        tcp_rig.device.write("no_such_register", 1)
    assert tcp_rig.wire.frames == []


def test_the_frame_ring_keeps_the_last_1000_frames():
    port = free_port()
    server = ServerThread(lambda: ModbusTcpServer(pump_simdevice(), address=("127.0.0.1", port)))
    try:
        profile = make_profile({"kind": "modbus-tcp", "port": port, "trace": True})
        with ModbusDevice(profile) as d:
            d.read("heartbeat")
            assert [k for _, k, _ in d.frames] == ["tx", "rx"]
            assert d.frames[0][2][7] == 4  # read input registers
            for _ in range(600):
                d.read("heartbeat")
            assert len(d.frames) == 1000
            times = [t for t, _, _ in d.frames]
            assert times == sorted(times)
        untraced = ModbusDevice(make_profile({"kind": "modbus-tcp", "port": port}))
        with untraced:
            untraced.read("heartbeat")
        assert len(untraced.frames) == 0
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# transport faults: retries, CommunicationError, reconnect
# ---------------------------------------------------------------------------------------------


def test_a_stopped_server_gives_communication_error_then_the_device_reconnects(tcp_rig: Rig):
    d = tcp_rig.device
    assert d.write("bolus_u", 1.0) is None
    tcp_rig.server.stop()
    with pytest.raises(CommunicationError, match=r"after 3 attempt\(s\)|not connected"):
        d.read("bolus_u")
    # while the device is gone, requests fail at once (no sleeping in a real-time caller)
    # and the connection is retried at most once per back-off interval
    with pytest.raises(CommunicationError, match="not connected"):
        d.write("bolus_u", 2.0)
    # the server comes back on the same port (with fresh memory)
    port = tcp_rig.port
    tcp_rig.server = ServerThread(
        lambda: ModbusTcpServer(pump_simdevice(), address=("127.0.0.1", port))
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            value = d.read("bolus_u")
            break
        except CommunicationError:
            assert time.monotonic() < deadline, "never reconnected"
            time.sleep(0.02)
    assert value == 0.0
    assert d.write("bolus_u", 2.0) is None
    assert d.read("bolus_u") == 2.0


def test_connect_fails_with_communication_error_when_nobody_listens():
    device = ModbusDevice(make_profile({"kind": "modbus-tcp", "port": free_port()}))
    with pytest.raises(CommunicationError, match="cannot connect"):
        device.connect()
    assert not device.connected


class SilentServer:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("retries", [0, 2])
def test_a_silent_device_is_retried_exactly_retries_times(retries: int):
    silent = SilentServer()
    try:
        wire = Wire()
        profile = make_profile(
            {"kind": "modbus-tcp", "port": silent.port, "retries": retries, "timeout_s": 0.1}
        )
        device = ModbusDevice(profile, trace=wire)
        with pytest.raises(CommunicationError, match=f"after {retries + 1} attempt"):
            device.read("bolus_u")
        assert len(wire.sent) == retries + 1
        wire.frames.clear()
        with pytest.raises(CommunicationError):  # a write with retry=False goes out once
            device.write("bolus_u", 1.0, retry=False)
        assert len(wire.sent) == 1
        device.close()
    finally:
        silent.close()


def test_apply_safe_state_tries_every_write_before_raising():
    silent = SilentServer()
    try:
        wire = Wire()
        profile = make_profile(
            {"kind": "modbus-tcp", "port": silent.port, "retries": 0, "timeout_s": 0.1}
        )
        device = ModbusDevice(profile, trace=wire)
        with pytest.raises(CommunicationError, match="safe state incomplete"):
            device.apply_safe_state()
        assert len(wire.sent) == 2  # both safe-state writes were attempted
        device.close()
    finally:
        silent.close()


# ---------------------------------------------------------------------------------------------
# Modbus RTU on a pty pair
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def rtu_rig() -> Iterator[tuple[ModbusDevice, Wire, PtyPair, ServerThread]]:
    pty = PtyPair()
    # This machine's ptys refuse parity and 7-bit settings (EINVAL): run the pump map at 8N1.
    # A pty does not carry parity anyway (see hw_bridge/pty.py).
    server = ServerThread(
        lambda: ModbusSerialServer(
            pump_simdevice(Busy()), port=pty.a, baudrate=115200, parity="N", timeout=0.2
        )
    )
    profile = make_profile({"kind": "modbus-rtu", "port": pty.b, "baudrate": 115200, "parity": "N"})
    wire = Wire()
    device = ModbusDevice(profile, trace=wire)
    try:
        with device:
            yield device, wire, pty, server
    finally:
        server.stop()
        pty.close()


def test_rtu_read_write_and_exception_codes(rtu_rig):
    device, wire, _, _ = rtu_rig
    assert device.write("temp_basal_u_per_h", 1.75) is None
    assert device.write("f32_little", 42.0) is None
    assert device.write("suspend", True) is None
    assert device.read_many(["temp_basal_u_per_h", "f32_little", "suspend", "occluded"]) == {
        "temp_basal_u_per_h": 1.75,
        "f32_little": 42.0,
        "suspend": True,
        "occluded": True,
    }
    assert device.write("command", 4) == int(ExcCodes.DEVICE_BUSY)
    with pytest.raises(DeviceException) as info:
        device.read("unmapped")
    assert info.value.code == int(ExcCodes.ILLEGAL_ADDRESS)
    # RTU frames: device id first, CRC last
    frame = wire.sent[0]
    assert frame[0] == 1
    assert FramerRTU.check_CRC(frame[:-2], int.from_bytes(frame[-2:], "big"))
    wire.frames.clear()
    with pytest.raises(WriteRefused):
        device.write("bolus_u", 26.0)
    assert wire.frames == []


def test_rtu_pulled_cable_gives_communication_error(rtu_rig):
    device, _, _, server = rtu_rig
    assert device.read("heartbeat") == 0
    server.stop()  # the device stops answering
    with pytest.raises(CommunicationError):
        device.read("heartbeat")


def test_an_rtu_profile_without_a_port_is_refused():
    with pytest.raises(ProfileError) as info:
        ModbusDevice(load_profile(shipped_profile("insulin_pump_rtu")))
    assert info.value.field == "transport.port"
    with pytest.raises(ProfileError) as info:
        ModbusDevice(load_profile(shipped_profile("cgm_line")))
    assert info.value.field == "transport.kind"


# ---------------------------------------------------------------------------------------------
# Modbus TLS with certificates made here
# ---------------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    server: bool = False,
    role_der: bytes | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        usage = (
            x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if role_der is not None:  # the Modbus/TCP Security role extension
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(MODBUS_ROLE_OID), role_der),
            critical=False,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(folder: Path, stem: str, cert: x509.Certificate, key: Any) -> tuple[str, str]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, and a rogue CA's client."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = _key(), _key()
    ca = _cert("twinloop test CA", ca_key, ca=True)
    rogue = _cert("rogue CA", rogue_key, ca=True)
    server_key, client_key, intruder_key = _key(), _key(), _key()
    server = _cert("pump", server_key, (ca.subject, ca_key), server=True)
    client = _cert("hil-rig", client_key, (ca.subject, ca_key))
    intruder = _cert("hil-rig", intruder_key, (rogue.subject, rogue_key))
    paths: dict[str, str] = {}
    paths["ca"], _ = _write_pair(folder, "ca", ca, ca_key)
    paths["rogue_ca"], _ = _write_pair(folder, "rogue_ca", rogue, rogue_key)
    paths["server"], paths["server_key"] = _write_pair(folder, "server", server, server_key)
    paths["client"], paths["client_key"] = _write_pair(folder, "client", client, client_key)
    paths["intruder"], paths["intruder_key"] = _write_pair(
        folder, "intruder", intruder, intruder_key
    )
    return paths


@pytest.fixture
def tls_server(pki: dict[str, str]) -> Iterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server_key"])
    context.verify_mode = ssl.CERT_REQUIRED  # the server requires and verifies client certs
    context.load_verify_locations(cafile=pki["ca"])
    port = free_port()
    server = ServerThread(
        lambda: ModbusTlsServer(
            pump_simdevice(), address=("127.0.0.1", port), sslctx=context,
            framer=FramerType.TLS,
        )
    )  # fmt: skip
    try:
        yield port
    finally:
        server.stop()


def _tls_profile(port: int, **tls: str) -> DeviceProfile:
    return make_profile(
        {"kind": "modbus-tls", "host": "127.0.0.1", "port": port, "retries": 1, **tls}
    )


def test_tls_with_the_right_client_certificate(tls_server: int, pki: dict[str, str]):
    wire = Wire()
    profile = _tls_profile(
        tls_server, certfile=pki["client"], keyfile=pki["client_key"], cafile=pki["ca"]
    )
    with ModbusDevice(profile, trace=wire) as device:
        assert device.write("bolus_u", 3.5) is None
        assert device.read_many(["bolus_u", "reservoir_u"]) == {
            "bolus_u": 3.5,
            "reservoir_u": 400.0,
        }
    assert wire.sent  # the trace sees the cleartext Modbus frames


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param({"certfile": "intruder", "keyfile": "intruder_key", "cafile": "ca"},
                     id="client-cert-from-another-CA"),
        pytest.param({"cafile": "ca"}, id="no-client-cert"),
        pytest.param({"certfile": "client", "keyfile": "client_key", "cafile": "rogue_ca"},
                     id="server-not-trusted"),
        pytest.param({"certfile": "client", "keyfile": "client_key", "cafile": "ca",
                      "server_hostname": "pump.example"}, id="wrong-server-name"),
    ],
)  # fmt: skip
def test_tls_refuses_the_wrong_certificates(
    tls_server: int, pki: dict[str, str], tls: dict[str, str]
):
    files = {k: (pki[v] if k != "server_hostname" else v) for k, v in tls.items()}
    wire = Wire()
    device = ModbusDevice(_tls_profile(tls_server, **files), trace=wire)
    with pytest.raises(CommunicationError):
        device.read("bolus_u")
    assert [d for s, d in wire.frames if not s] == []  # nothing came back
    device.close()


def test_tls_with_an_unreadable_certificate_is_a_profile_error(tmp_path: Path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ProfileError) as info:
        ModbusDevice(_tls_profile(1, certfile=str(bogus), keyfile=str(bogus)))
    assert info.value.field == "transport.certfile"


# ---------------------------------------------------------------------------------------------
# Modbus/TCP Security: the client certificate's role decides who may write (the pump emulator)
# ---------------------------------------------------------------------------------------------


def _utf8string(text: str) -> bytes:
    data = text.encode("utf-8")
    return bytes([0x0C, len(data)]) + data


ROLE_CLIENTS = {
    "operator": _utf8string("operator"),
    "monitor": _utf8string("monitor"),
    "admin": _utf8string("admin"),  # a role the pump does not know
    "no_role": None,
    "not_a_string": bytes([0x02, 0x01, 0x07]),  # an INTEGER where a UTF8String belongs
}


@pytest.fixture(scope="module")
def role_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("role_pki")
    ca_key, server_key = _key(), _key()
    ca = _cert("twinloop test CA", ca_key, ca=True)
    paths: dict[str, str] = {}
    paths["ca"], _ = _write_pair(folder, "ca", ca, ca_key)
    server = _cert("pump", server_key, (ca.subject, ca_key), server=True)
    paths["server"], paths["server_key"] = _write_pair(folder, "server", server, server_key)
    for name, role_der in ROLE_CLIENTS.items():
        key = _key()
        cert = _cert(f"client-{name}", key, (ca.subject, ca_key), role_der=role_der)
        paths[name], paths[f"{name}_key"] = _write_pair(folder, name, cert, key)
    return paths


@pytest.fixture
def tls_pump(role_pki: dict[str, str]) -> Iterator[tuple[Any, int]]:
    from twinloop.hw_bridge.emulators.patient import VirtualPatient
    from twinloop.hw_bridge.emulators.pump import PumpEmulator

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(role_pki["server"], role_pki["server_key"])
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=role_pki["ca"])
    pump = PumpEmulator(VirtualPatient("adult#001", seed=0, wall_s_per_sim_min=3600.0))
    try:
        with pump.start_tcp("127.0.0.1", 0, tls=context) as servers:
            yield pump, servers.tcp_address[1]
    finally:
        pump.close()


def _role_device(role_pki: dict[str, str], port: int, client: str) -> ModbusDevice:
    profile = _tls_profile(
        port, certfile=role_pki[client], keyfile=role_pki[f"{client}_key"], cafile=role_pki["ca"]
    )
    return ModbusDevice(profile)


def test_the_role_is_read_from_the_certificate_extension(role_pki: dict[str, str]):
    def der(name: str) -> bytes:
        pem = Path(role_pki[name]).read_bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    assert certificate_role(der("operator")) == "operator"
    assert certificate_role(der("monitor")) == "monitor"
    assert certificate_role(der("admin")) == "admin"
    assert certificate_role(der("no_role")) is None
    assert certificate_role(der("not_a_string")) is None
    assert certificate_role(None) is None
    assert certificate_role(b"not a certificate") is None


def test_an_operator_certificate_may_write(tls_pump: tuple[Any, int], role_pki: dict[str, str]):
    pump, port = tls_pump
    with _role_device(role_pki, port, "operator") as device:
        assert device.write("bolus_u", 3.5) is None
        assert device.write("suspend", True) is None
        assert device.read("reservoir_u") == pytest.approx(300.0)
    status = pump.status()
    assert status.suspended and status.bolus_remaining_u == 0.0  # suspend cancelled the bolus
    assert pump.authorization.refusals == 0


@pytest.mark.parametrize("client", ["monitor", "no_role", "admin", "not_a_string"])
def test_a_certificate_without_a_writing_role_reads_but_may_not_write(
    tls_pump: tuple[Any, int], role_pki: dict[str, str], client: str
):
    pump, port = tls_pump
    with _role_device(role_pki, port, client) as device:
        assert device.read("reservoir_u") == pytest.approx(300.0)
        assert device.read("scheduled_basal_u_per_h") > 0.0
        for name, value in (("bolus_u", 3.5), ("suspend", True), ("command", 1)):
            # the authorization failure: exception 01, never the pump's own 03 correction
            assert device.write(name, value) == int(ExcCodes.ILLEGAL_FUNCTION)
        assert device.read("bolus_u") == 0.0  # nothing was executed
    status = pump.status()
    assert not status.suspended and status.bolus_remaining_u == 0.0
    assert pump.authorization.refusals == 3


# ---------------------------------------------------------------------------------------------
# fuzz: random and mutated answers through the RTU and socket framers the client uses
# ---------------------------------------------------------------------------------------------


class ScriptedMixin:
    """A pymodbus sync client whose wire is a function: request bytes -> answer bytes."""

    answer: Callable[[bytes], bytes]

    def connect(self) -> bool:
        self.socket = True  # type: ignore[assignment]  # "open"
        return True

    def close(self) -> None:
        self.socket = None

    def send(self, request: bytes, addr: tuple | None = None) -> int:
        self._pending = self.answer(request)
        return len(request)

    def recv(self, size: int | None) -> bytes:
        data, self._pending = getattr(self, "_pending", b""), b""
        return data


class ScriptedRtu(ScriptedMixin, ModbusSerialClient):
    pass


class ScriptedTcp(ScriptedMixin, ModbusTcpClient):
    pass


def _valid_answer_pdu(request_pdu: bytes, rng: random.Random) -> bytes:
    """A well-formed answer PDU (function code + data) to a request PDU."""
    fc = request_pdu[0]
    count = struct.unpack(">H", request_pdu[3:5])[0]
    if fc in (1, 2):
        nbytes = (count + 7) // 8
        return bytes([fc, nbytes]) + bytes(rng.randrange(256) for _ in range(nbytes))
    if fc in (3, 4):
        return bytes([fc, 2 * count]) + bytes(rng.randrange(256) for _ in range(2 * count))
    if fc in (5, 6):
        return request_pdu[:5]  # echo
    if fc == 16:
        return request_pdu[:5]  # address, count
    return bytes([fc | 0x80, 1])


class Reframer:
    """Frames a PDU like the request it answers: RTU (fresh CRC) or MBAP (fresh length)."""

    def __init__(self, rtu: bool) -> None:
        self.rtu = rtu

    def pdu_of(self, frame: bytes) -> bytes:
        return frame[1:-2] if self.rtu else frame[7:]

    def frame(self, request: bytes, pdu: bytes) -> bytes:
        if self.rtu:
            head = request[:1] + pdu
            return head + FramerRTU.compute_CRC(head).to_bytes(2, "big")
        return request[:4] + (len(pdu) + 1).to_bytes(2, "big") + request[6:7] + pdu


def _mutate(request: bytes, valid_pdu: bytes, rng: random.Random, framing: Reframer) -> bytes:
    """A valid answer to ``request``, or one of many ways it can go wrong on a wire."""
    frame = framing.frame(request, valid_pdu)
    choice = rng.randrange(10)
    data = bytearray(frame)
    if choice == 0:
        return frame  # intact
    if choice == 1:
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if choice == 2:
        return bytes(data[: rng.randrange(len(data) + 1)])  # truncated
    if choice == 3:  # garbage after the frame
        return bytes(data) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
    if choice == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))  # garbage
    if choice == 5:  # garbage before the frame
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10))) + bytes(data)
    if choice == 6:  # valid framing around a mangled PDU (wrong count, function, echo ...)
        body = bytearray(valid_pdu)
        body[rng.randrange(len(body))] = rng.randrange(256)
        return framing.frame(request, bytes(body[: rng.randrange(1, len(body) + 1)]))
    if choice == 7:  # a well-framed exception answer, mostly for the right function
        fc = valid_pdu[0] if rng.random() < 0.8 else rng.randrange(1, 0x80)
        return framing.frame(request, bytes([fc | 0x80, rng.randrange(256)]))
    if choice == 8:  # a well-framed PDU of random bytes
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        return framing.frame(request, body)
    return frame + frame  # duplicated


def _fuzz_device(framer: FramerType, seed: int) -> tuple[ModbusDevice, list[int]]:
    rng = random.Random(seed)
    rtu = framer == FramerType.RTU
    framing = Reframer(rtu)
    profile = make_profile(
        {"kind": "modbus-rtu" if rtu else "modbus-tcp", "port": "/dev/null" if rtu else 1,
         "retries": 0, "timeout_s": 0.05, "reconnect_backoff_s": [0.0, 0.0]}
    )  # fmt: skip
    stats = [0]

    def answer(request: bytes) -> bytes:
        stats[0] += 1
        return _mutate(request, _valid_answer_pdu(framing.pdu_of(request), rng), rng, framing)

    if rtu:
        client: Any = ScriptedRtu("/dev/null", timeout=0.05, retries=0)
    else:
        client = ScriptedTcp("127.0.0.1", port=1, timeout=0.05, retries=0)
    client.answer = answer
    return ModbusDevice(profile, client=client), stats


FUZZ_FRAMES = 6000  # per framer: 12,000 answers in all


@pytest.mark.parametrize("framer", [FramerType.RTU, FramerType.SOCKET], ids=["rtu", "socket"])
def test_fuzzed_answers_only_give_values_or_bridge_errors(framer: FramerType):
    device, stats = _fuzz_device(framer, seed=0)
    rng = random.Random(1)
    operations: list[Callable[[], object]] = [
        lambda: device.read_many(["temp_basal_u_per_h", "temp_basal_duration_min", "bolus_u"]),
        lambda: device.read("delivered_total_u"),
        lambda: device.read_many(["occluded", "suspended", "bolus_active"]),
        lambda: device.read("suspend"),
        lambda: device.write("bolus_u", 1.5),
        lambda: device.write("command", 3),
        lambda: device.write("suspend", True),
    ]
    outcomes: dict[str, int] = {}
    for _ in range(FUZZ_FRAMES):  # bounded: one answer per operation (retries 0)
        try:
            operations[rng.randrange(len(operations))]()
            outcome = "value"
        except DeviceException:
            outcome = "device exception"
        except CommunicationError:
            outcome = "communication error"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert stats[0] == FUZZ_FRAMES
    # the fuzz exercised every path: good answers, exception answers and garbage
    assert set(outcomes) == {"value", "device exception", "communication error"}, outcomes


def _random_adu(rng: random.Random, rtu: bool) -> bytes:
    """Random bytes, or (half the time) a plausibly framed random response."""
    if rng.random() < 0.5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    fc = rng.choice([1, 2, 3, 4, 5, 6, 15, 16, rng.randrange(256)])
    n = rng.randrange(0, 260)
    payload = bytes(rng.randrange(256) for _ in range(n))
    if fc in (1, 2, 3, 4) and rng.random() < 0.7:
        payload = bytes([min(n, 255)]) + payload  # a byte count (right or wrong)
    pdu = bytes([fc]) + payload
    if rtu:
        head = bytes([rng.randrange(256)]) + pdu
        return head + FramerRTU.compute_CRC(head).to_bytes(2, "big")
    length = len(pdu) + 1 if rng.random() < 0.8 else rng.randrange(65536)
    return bytes([0, 1, 0, 0]) + length.to_bytes(2, "big") + bytes([1]) + pdu


@pytest.mark.parametrize("framer_class", [FramerRTU, FramerSocket], ids=["rtu", "socket"])
def test_the_framers_raise_only_pymodbus_errors_on_random_frames(framer_class: type):
    rng = random.Random(0)
    framer = framer_class(DecodePDU(False))
    decoded = refused = 0
    for _ in range(10_000):  # bounded; handleFrame itself must return (pytest-timeout guards)
        data = _random_adu(rng, framer_class is FramerRTU)
        try:
            used, pdu = framer.handleFrame(data, 0, 0)
        except ModbusException:
            refused += 1
            continue
        assert 0 <= used <= len(data)
        decoded += pdu is not None
    assert decoded > 0
    assert refused + decoded < 10_000  # some input was incomplete or skipped
