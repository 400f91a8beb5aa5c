"""Device profiles: shipped profiles, validation errors that name the field, the codec."""

from __future__ import annotations

import copy
import logging
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloop.hw_bridge.errors import ProfileError, WriteRefused
from twinloop.hw_bridge.profile import (
    DTYPES,
    DeviceProfile,
    Register,
    check_write,
    decode,
    encode,
    load_profile,
    parse_profile,
    shipped_profile,
    shipped_profiles,
)

# ---------------------------------------------------------------------------------------------
# shipped profiles
# ---------------------------------------------------------------------------------------------


def test_the_three_profiles_are_shipped():
    assert {"insulin_pump_rtu", "insulin_pump_tcp", "cgm_line"} <= set(shipped_profiles())


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_loads(name: str):
    profile = load_profile(shipped_profile(name))
    assert isinstance(profile, DeviceProfile)
    assert profile.source == str(shipped_profile(name))
    assert profile.registers or profile.fields
    for safe in profile.safe_state:
        assert profile.register(safe.register).writable


def test_shipped_profile_accepts_the_suffix_and_refuses_unknown_names():
    assert shipped_profile("cgm_line.yaml") == shipped_profile("cgm_line")
    with pytest.raises(ProfileError) as info:
        shipped_profile("toaster")
    assert info.value.field == "profile"
    assert "insulin_pump_rtu" in info.value.allowed


def test_the_pump_profiles_share_one_register_map_and_safe_state():
    rtu = load_profile(shipped_profile("insulin_pump_rtu"))
    tcp = load_profile(shipped_profile("insulin_pump_tcp"))
    assert rtu.registers == tcp.registers
    assert rtu.safe_state == tcp.safe_state
    assert (rtu.transport.kind, rtu.transport.baudrate, rtu.transport.parity) == (
        "modbus-rtu",
        115200,
        "N",
    )
    assert (rtu.transport.bytesize, rtu.transport.stopbits, rtu.transport.device_id) == (8, 2, 1)
    assert (tcp.transport.kind, tcp.transport.host, tcp.transport.tcp_port) == (
        "modbus-tcp",
        "127.0.0.1",
        5020,
    )


# (name, table, address, dtype, scale, access) from hw_bridge/DEVICES.md
PUMP_MAP = [
    ("temp_basal_u_per_h", "holding", 0, "float32", 1.0, "rw"),
    ("temp_basal_duration_min", "holding", 2, "uint16", 1.0, "rw"),
    ("bolus_u", "holding", 3, "float32", 1.0, "rw"),
    ("command", "holding", 5, "uint16", 1.0, "rw"),
    ("scheduled_basal_u_per_h", "holding", 6, "float32", 1.0, "rw"),
    ("delivered_total_u", "input", 0, "int32", 0.001, "r"),
    ("reservoir_u", "input", 2, "float32", 1.0, "r"),
    ("battery_pct", "input", 4, "uint16", 0.1, "r"),
    ("delivery_rate_u_per_h", "input", 5, "float32", 1.0, "r"),
    ("bolus_remaining_u", "input", 7, "float32", 1.0, "r"),
    ("alarm_code", "input", 9, "uint16", 1.0, "r"),
    ("pump_clock_min", "input", 10, "int32", 1.0, "r"),
    ("heartbeat", "input", 12, "uint16", 1.0, "r"),
    ("time_scale_s_per_min", "input", 13, "float32", 1.0, "r"),
    ("occluded", "discrete", 0, "bool", 1.0, "r"),
    ("suspended", "discrete", 1, "bool", 1.0, "r"),
    ("bolus_active", "discrete", 2, "bool", 1.0, "r"),
    ("temp_basal_active", "discrete", 3, "bool", 1.0, "r"),
    ("alarm_active", "discrete", 4, "bool", 1.0, "r"),
    ("suspend", "coil", 0, "bool", 1.0, "rw"),
]


def test_the_pump_profile_follows_devices_md():
    profile = load_profile(shipped_profile("insulin_pump_rtu"))
    got = [(r.name, r.table, r.address, r.dtype, r.scale, r.access) for r in profile.registers]
    assert sorted(got) == sorted(PUMP_MAP)
    assert all(r.word_order == "big" for r in profile.registers)
    limits = {r.name: (r.minimum, r.maximum) for r in profile.registers if r.table == "holding"}
    assert limits == {
        "temp_basal_u_per_h": (0, 35),
        "temp_basal_duration_min": (0, 30),
        "bolus_u": (0, 25),
        "command": (0, 4),
        "scheduled_basal_u_per_h": (0, 35),
    }
    assert profile.channel("basal_u_per_h").name == "temp_basal_u_per_h"
    assert profile.channel("bolus_u").name == "bolus_u"
    assert profile.channel("delivered_total_u").name == "delivered_total_u"
    assert [(s.register, s.value) for s in profile.safe_state] == [
        ("command", 3),
        ("temp_basal_duration_min", 0),
    ]


def test_the_cgm_profile_follows_devices_md():
    profile = load_profile(shipped_profile("cgm_line"))
    t = profile.transport
    assert (t.kind, t.baudrate, t.bytesize, t.parity, t.stopbits) == (
        "line-serial",
        9600,
        8,
        "N",
        1,
    )
    assert [(f.name, f.index, f.dtype) for f in profile.fields] == [
        ("seq", 0, "int"),
        ("t_min", 1, "int"),
        ("glucose_mg_dl", 2, "float"),
        ("status", 3, "int"),
    ]
    assert profile.field("glucose_mg_dl").channel == "glucose_mg_dl"
    assert profile.field("glucose_mg_dl").unit == "mg/dL"


def test_lookups_of_unknown_names_are_profile_errors():
    profile = load_profile(shipped_profile("insulin_pump_tcp"))
    for lookup, field in [
        (profile.register, "register"),
        (profile.channel, "channel"),
        (profile.field, "field"),
    ]:
        with pytest.raises(ProfileError) as info:
            lookup("nope")
        assert info.value.field == field
        assert info.value.value == "nope"


# ---------------------------------------------------------------------------------------------
# validation: every kind of malformed profile is refused with the field named
# ---------------------------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    return {
        "name": "test_device",
        "kind": "generic",
        "transport": {"kind": "modbus-tcp", "host": "127.0.0.1", "port": 5020, "device_id": 1},
        "registers": [
            {"name": "rate", "table": "holding", "address": 0, "dtype": "float32",
             "unit": "U/h", "minimum": 0, "maximum": 35, "channel": "basal_u_per_h"},
            {"name": "mode", "table": "holding", "address": 2, "dtype": "uint16",
             "minimum": 0, "maximum": 4, "channel": "pump_command"},
            {"name": "level", "table": "input", "address": 0, "dtype": "uint16", "scale": 0.1},
            {"name": "flag", "table": "coil", "address": 0, "dtype": "bool"},
        ],
        "safe_state": [{"register": "mode", "value": 1}],
    }  # fmt: skip


def _serial(kind: str) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        p["transport"] = {"kind": kind, "port": "/dev/null", "baudrate": 9600}
        if kind == "line-serial":
            del p["registers"], p["safe_state"]
            p["fields"] = [{"name": "a", "index": 0, "dtype": "int"}]

    return edit


def _then(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        for e in edits:
            e(p)

    return edit


def _reg(i: int, **changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is _DELETE:
                del p["registers"][i][key]
            else:
                p["registers"][i][key] = value

    return edit


def _tr(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        p["transport"].update(changes)

    return edit


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        if value is _DELETE:
            del p[key]
        else:
            p[key] = value

    return edit


def _add_reg(**reg: Any) -> Callable[[dict[str, Any]], None]:
    def edit(p: dict[str, Any]) -> None:
        p["registers"].append(reg)

    return edit


_DELETE = object()

MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # unknown keys at every level
    ("unknown top-level key", _set("colour", "red"), "colour"),
    ("unknown register key", _reg(1, scaling=2), "registers[1].scaling"),
    ("unknown transport key", _tr(speed=9600), "transport.speed"),
    ("unknown safe-state key", _set("safe_state", [{"register": "mode", "value": 0, "x": 1}]),
     "safe_state[0].x"),
    # missing required keys
    ("missing name", _set("name", _DELETE), "name"),
    ("missing transport", _set("transport", _DELETE), "transport"),
    ("missing register address", _reg(1, address=_DELETE), "registers[1].address"),
    ("missing transport kind", lambda p: p["transport"].pop("kind"), "transport.kind"),
    ("empty profile", lambda p: p.clear(), "name"),
    # wrong types and values
    ("name not an identifier", _set("name", "my pump"), "name"),
    ("unknown device kind", _set("kind", "toaster"), "kind"),
    ("unknown transport kind", _tr(kind="modbus-udp"), "transport.kind"),
    ("address as a string", _reg(0, address="0"), "registers[0].address"),
    ("address out of range", _reg(1, address=70000), "registers[1].address"),
    ("negative address", _reg(1, address=-1), "registers[1].address"),
    ("32-bit value past the last address", _reg(0, address=65535), "registers[0].address"),
    ("unknown table", _reg(0, table="eeprom"), "registers[0].table"),
    ("unknown dtype", _reg(0, dtype="float64"), "registers[0].dtype"),
    ("unknown word order", _reg(0, word_order="middle"), "registers[0].word_order"),
    ("unknown access", _reg(0, access="x"), "registers[0].access"),
    ("scale zero", _reg(2, scale=0), "registers[2].scale"),
    ("scale a string", _reg(2, scale="0.1"), "registers[2].scale"),
    ("scale infinite", _reg(2, scale=float("inf")), "registers[2].scale"),
    ("unit not a string", _reg(0, unit=5), "registers[0].unit"),
    ("limit a bool", _reg(0, maximum=True), "registers[0].maximum"),
    ("trace not a bool", _tr(trace="yes"), "transport.trace"),
    ("timeout zero", _tr(timeout_s=0), "transport.timeout_s"),
    ("negative retries", _tr(retries=-1), "transport.retries"),
    ("backoff max < initial", _tr(reconnect_backoff_s=[2.0, 1.0]),
     "transport.reconnect_backoff_s[1]"),
    ("backoff not a pair", _tr(reconnect_backoff_s=0.1), "transport.reconnect_backoff_s"),
    ("device id 248", _tr(device_id=248), "transport.device_id"),
    ("tcp port 0", _tr(port=0), "transport.port"),
    ("tcp port a path", _tr(port="/dev/ttyS0"), "transport.port"),
    ("parity X", _then(_serial("modbus-rtu"), _tr(parity="X")), "transport.parity"),
    ("bytesize 6", _then(_serial("modbus-rtu"), _tr(bytesize=6)), "transport.bytesize"),
    ("stopbits 3", _then(_serial("modbus-rtu"), _tr(stopbits=3)), "transport.stopbits"),
    ("baudrate zero", _then(_serial("modbus-rtu"), _tr(baudrate=0)), "transport.baudrate"),
    # keys that do not belong to the transport kind
    ("baudrate on TCP", _tr(baudrate=9600), "transport.baudrate"),
    ("certfile on TCP", _tr(certfile="c.pem"), "transport.certfile"),
    ("host on RTU", _then(_serial("modbus-rtu"), _tr(host="x")), "transport.host"),
    ("device id on a line protocol", _then(_serial("line-serial"), _tr(device_id=1)),
     "transport.device_id"),
    ("certfile without keyfile", _tr(kind="modbus-tls", certfile="/c.pem"), "transport.keyfile"),
    # duplicates and overlaps
    ("duplicate register name", _reg(1, name="rate"), "registers[1].name"),
    ("duplicate channel", _reg(1, channel="basal_u_per_h"), "registers[1].channel"),
    ("overlapping registers", _reg(1, address=1), "registers[1].address"),
    ("overlap with a later register", _add_reg(name="x", table="holding", address=1,
                                               dtype="uint16"), "registers[4].address"),
    # limits and the data type
    ("maximum beyond uint16 x 0.1", _reg(2, access="r", maximum=6553.6), "registers[2].maximum"),
    ("negative minimum on uint16", _reg(1, minimum=-1), "registers[1].minimum"),
    ("int16 minimum beyond range", _reg(1, dtype="int16", minimum=-40000), "registers[1].minimum"),
    ("minimum above maximum", _reg(0, minimum=10, maximum=5), "registers[0].minimum"),
    ("limits on a bool", _reg(3, maximum=1), "registers[3].maximum"),
    # tables
    ("coil that is not a bool", _reg(3, dtype="uint16"), "registers[3].dtype"),
    ("bool in a holding register", _reg(1, dtype="bool"), "registers[1].dtype"),
    ("writable input register", _reg(2, access="rw"), "registers[2].access"),
    ("writable discrete input", _add_reg(name="d", table="discrete", address=0, dtype="bool",
                                         access="rw"), "registers[4].access"),
    # safe state
    ("safe value over the limit", _set("safe_state", [{"register": "mode", "value": 9}]),
     "safe_state[0].value"),
    ("safe value NaN", _set("safe_state", [{"register": "rate", "value": float("nan")}]),
     "safe_state[0].value"),
    ("safe write on a read-only register", _set("safe_state", [{"register": "level", "value": 1}]),
     "safe_state[0].value"),
    ("safe write on an unknown register", _set("safe_state", [{"register": "nope", "value": 1}]),
     "safe_state[0].register"),
    ("safe write not a bool", _set("safe_state", [{"register": "flag", "value": 2}]),
     "safe_state[0].value"),
    # registers vs fields
    ("fields on a Modbus device", _set("fields", [{"name": "a", "index": 0, "dtype": "int"}]),
     "fields"),
    ("no registers on a Modbus device", _then(_set("registers", []), _set("safe_state", [])),
     "registers"),
    ("registers on a line protocol", _then(_serial("line-serial"), _set("registers", [
        {"name": "r", "table": "holding", "address": 0, "dtype": "uint16"}])), "registers"),
    ("duplicate field index", _then(_serial("line-serial"), lambda p: p["fields"].append(
        {"name": "b", "index": 0, "dtype": "float"})), "fields[1].index"),
    ("unknown field dtype", _then(_serial("line-serial"), lambda p: p["fields"][0].update(
        dtype="decimal")), "fields[0].dtype"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "field"), [(e, f) for _, e, f in MALFORMED], ids=[c for c, _, _ in MALFORMED]
)
def test_malformed_profiles_are_refused_naming_the_field(
    edit: Callable[[dict[str, Any]], None], field: str
):
    mapping = _valid()
    parse_profile(copy.deepcopy(mapping))  # the base is valid
    edit(mapping)
    with pytest.raises(ProfileError) as info:
        parse_profile(mapping, source="case.yaml")
    assert info.value.field == field
    assert info.value.allowed
    assert str(info.value).startswith(f"case.yaml: {field}=")


def test_a_profile_that_is_not_a_mapping_is_refused():
    with pytest.raises(ProfileError) as info:
        parse_profile(["a", "list"])
    assert info.value.field == "<profile>"


def test_the_error_says_what_the_type_can_carry():
    mapping = _valid()
    mapping["registers"][2].update(maximum=7000)
    with pytest.raises(ProfileError) as info:
        parse_profile(mapping)
    assert info.value.value == 7000
    assert "6553.5" in info.value.allowed


def test_the_same_address_in_different_tables_is_fine():
    mapping = _valid()
    mapping["registers"].append({"name": "d", "table": "discrete", "address": 0, "dtype": "bool"})
    mapping["registers"].append({"name": "i2", "table": "input", "address": 1, "dtype": "int16"})
    profile = parse_profile(mapping)
    assert [r.address for r in profile.registers if r.table != "holding"] == [0, 0, 0, 1]


def test_defaults():
    profile = parse_profile(_valid())
    t = profile.transport
    assert (t.timeout_s, t.retries, t.trace, t.device_id) == (1.0, 2, False, 1)
    rate, mode, level, flag = profile.registers
    assert (rate.word_order, rate.scale, rate.access) == ("big", 1.0, "rw")
    assert level.access == "r"
    assert level.limits() == pytest.approx((0.0, 6553.5))
    assert flag.access == "rw"
    assert (rate.width, mode.width, flag.width) == (2, 1, 1)


def test_load_profile_reports_yaml_errors_and_resolves_tls_paths(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError) as info:
        load_profile(bad)
    assert info.value.field == "<yaml>"
    good = tmp_path / "tls.yaml"
    good.write_text(
        "name: t\nkind: generic\n"
        "transport: {kind: modbus-tls, port: 8020, certfile: c.pem, keyfile: k.pem,"
        " cafile: ca.pem}\n"
        "registers: [{name: r, table: holding, address: 0, dtype: uint16, access: r}]\n"
    )
    t = load_profile(good).transport
    assert (t.certfile, t.keyfile, t.cafile) == tuple(
        str(tmp_path / n) for n in ("c.pem", "k.pem", "ca.pem")
    )
    assert t.tcp_port == 8020


# ---------------------------------------------------------------------------------------------
# unsafe profiles: a safe state that delivers, an empty one, limits beyond the device's own
# ---------------------------------------------------------------------------------------------


def _edited(name: str, old: str, new: str) -> Callable[[Path], Path]:
    """A copy of shipped profile ``name`` with ``old`` replaced by ``new`` (exactly once)."""

    def write(folder: Path) -> Path:
        text = shipped_profile(name).read_text(encoding="utf-8")
        assert text.count(old) == 1, old
        path = folder / f"{name}_unsafe.yaml"
        path.write_text(text.replace(old, new), encoding="utf-8")
        return path

    return write


PUMP_SAFE = "  - {register: command, value: 3}\n  - {register: temp_basal_duration_min, value: 0}\n"
DRIVE_SAFE = "  - {register: target_torque_nm, value: 0}\n"
UNSAFE = [
    ("25 U bolus safe state", _edited("insulin_pump_tcp", PUMP_SAFE,
        PUMP_SAFE + "  - {register: bolus_u, value: 25}\n"), "safe_state[2].value", 25),
    ("a zero bolus is still a bolus write", _edited("insulin_pump_rtu", PUMP_SAFE,
        "  - {register: bolus_u, value: 0}\n"), "safe_state[0].value", 0),
    ("empty safe state", _edited("insulin_pump_tcp", PUMP_SAFE, ""), "safe_state", None),
    ("empty drive safe state", _edited("exo_drive_tcp",
        DRIVE_SAFE + "  - {register: controlword, value: 0}\n", ""), "safe_state", None),
    ("1000 U bolus limit", _edited("insulin_pump_tcp", "minimum: 0, maximum: 25, channel: bolus_u",
        "minimum: 0, maximum: 1000, channel: bolus_u"), "registers[2].maximum", 1000.0),
    ("a bolus register without a maximum", _edited("insulin_pump_rtu",
        "minimum: 0, maximum: 25, channel: bolus_u", "minimum: 0, channel: bolus_u"),
        "registers[2].maximum", None),
    ("basal limit above the pump's 35 U/h", _edited("insulin_pump_tcp",
        "minimum: 0, maximum: 35, channel: basal_u_per_h",
        "minimum: 0, maximum: 50, channel: basal_u_per_h"), "registers[0].maximum", 50.0),
    ("temp basal above 0 in the safe state", _edited("insulin_pump_tcp", PUMP_SAFE,
        "  - {register: temp_basal_u_per_h, value: 5}\n"
        "  - {register: temp_basal_duration_min, value: 30}\n"), "safe_state[0].value", 5.0),
    ("a temp basal started without a 0 U/h rate", _edited("insulin_pump_tcp", PUMP_SAFE,
        "  - {register: temp_basal_duration_min, value: 30}\n"), "safe_state[0].value", 30.0),
    ("resume in the safe state", _edited("insulin_pump_rtu", PUMP_SAFE,
        "  - {register: command, value: 2}\n"), "safe_state[0].value", 2.0),
    ("the suspend coil released", _edited("insulin_pump_rtu", PUMP_SAFE,
        "  - {register: suspend, value: false}\n"), "safe_state[0].value", False),
    ("the pump's own basal rewritten", _edited("insulin_pump_tcp", PUMP_SAFE,
        "  - {register: scheduled_basal_u_per_h, value: 0}\n"), "safe_state[0].register",
        "scheduled_basal_u_per_h"),
    ("torque safe state non-zero", _edited("exo_drive_tcp", DRIVE_SAFE,
        "  - {register: target_torque_nm, value: 12}\n"), "safe_state[0].value", 12.0),
    ("enable operation in the safe state", _edited("exo_drive_tcp",
        "  - {register: controlword, value: 0}\n", "  - {register: controlword, value: 15}\n"),
        "safe_state[1].value", 15.0),
    ("drive torque limit beyond its rating", _edited("exo_drive_tcp",
        "minimum: 0, maximum: 40, channel: exo_max_torque_nm",
        "minimum: 0, maximum: 80, channel: exo_max_torque_nm"), "registers[3].maximum", 80.0),
    ("target torque beyond the drive's", _edited("exo_drive_tcp",
        "minimum: -30, maximum: 30, channel: exo_torque_cmd_nm",
        "minimum: -60, maximum: 30, channel: exo_torque_cmd_nm"), "registers[2].minimum", -60.0),
    ("a watchdog that may be switched off", _edited("exo_drive_tcp",
        "minimum: 10, maximum: 1000, channel: drive_watchdog_ms",
        "minimum: 0, maximum: 1000, channel: drive_watchdog_ms"), "registers[4].minimum", 0.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("write", "field", "value"),
    [(w, f, v) for _, w, f, v in UNSAFE],
    ids=[c for c, _, _, _ in UNSAFE],
)
def test_unsafe_profiles_are_refused_at_load_naming_file_and_field(
    tmp_path: Path, write: Callable[[Path], Path], field: str, value: object
):
    path = write(tmp_path)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert info.value.field == field
    if value is not None:
        assert info.value.value == value
    message = str(info.value)
    assert message.startswith(f"{path}: {field}=")
    assert "\n" not in message


@pytest.mark.parametrize(
    "safe_state",
    [
        [{"register": "command", "value": 1}],
        [{"register": "suspend", "value": True}],
        [
            {"register": "temp_basal_u_per_h", "value": 0},
            {"register": "temp_basal_duration_min", "value": 30},
        ],
    ],
)
def test_safe_states_that_stop_delivery_are_accepted(safe_state: list[dict[str, Any]]):
    pump = load_profile(shipped_profile("insulin_pump_tcp"))
    mapping = yaml.safe_load(shipped_profile("insulin_pump_tcp").read_text(encoding="utf-8"))
    mapping["safe_state"] = safe_state
    profile = parse_profile(mapping)
    assert profile.registers == pump.registers
    assert [s.register for s in profile.safe_state] == [s["register"] for s in safe_state]


def test_a_read_only_device_needs_no_safe_state():
    profile = load_profile(shipped_profile("cgm_line"))
    assert profile.safe_state == ()


# ---------------------------------------------------------------------------------------------
# command-line overrides
# ---------------------------------------------------------------------------------------------


def test_overrides_of_the_connection_point():
    tcp = load_profile(shipped_profile("insulin_pump_tcp"))
    assert tcp.with_overrides(tcp="10.0.0.2:1502").transport.host == "10.0.0.2"
    assert tcp.with_overrides(tcp="10.0.0.2:1502").transport.tcp_port == 1502
    assert tcp.with_overrides(port="5021").transport.tcp_port == 5021
    assert tcp.with_overrides(host="pump.local", port=1).transport.host == "pump.local"
    assert tcp.registers == tcp.with_overrides(port=5021).registers
    rtu = load_profile(shipped_profile("insulin_pump_rtu"))
    assert rtu.transport.port is None
    assert rtu.with_overrides(port="/dev/ttyUSB1").transport.port == "/dev/ttyUSB1"
    for profile, kwargs, field in [
        (rtu, {"tcp": "127.0.0.1:5020"}, "transport.tcp"),
        (rtu, {"host": "x"}, "transport.host"),
        (rtu, {"port": 5020}, "transport.port"),
        (tcp, {"tcp": "nohost"}, "transport.tcp"),
        (tcp, {"tcp": "h:99999"}, "transport.tcp"),
        (tcp, {"port": "/dev/ttyS0"}, "transport.port"),
    ]:
        with pytest.raises(ProfileError) as info:
            profile.with_overrides(**kwargs)
        assert info.value.field == field


# ---------------------------------------------------------------------------------------------
# codec
# ---------------------------------------------------------------------------------------------


def _r(dtype: str, *, scale: float = 1.0, word_order: str = "big", **kw: Any) -> Register:
    table = "coil" if dtype == "bool" else "holding"
    return Register(
        name="x", table=table, address=0, dtype=dtype, scale=scale,
        word_order=word_order, access="rw", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _words(fmt: str, raw: float | int, word_order: str) -> list[int]:
    """Expected words, computed with struct (independently of pymodbus)."""
    data = struct.pack(">" + fmt, raw)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if word_order == "little" else words


CODEC_CASES = [
    # dtype, scale, engineering value, struct format, raw value
    ("int16", 1.0, -2, "h", -2),
    ("int16", 0.1, -12.3, "h", -123),
    ("uint16", 1.0, 65535, "H", 65535),
    ("uint16", 0.1, 99.9, "H", 999),
    ("int32", 1.0, -70000, "i", -70000),
    ("int32", 0.001, 12.345, "i", 12345),
    ("uint32", 1.0, 0x12345678, "I", 0x12345678),
    ("uint32", 0.01, 1234567.89, "I", 123456789),
    ("float32", 1.0, 1.5, "f", 1.5),
    ("float32", 0.5, -3.0, "f", -6.0),
    ("float32", 1.0, 35.0, "f", 35.0),
]


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize(("dtype", "scale", "value", "fmt", "raw"), CODEC_CASES)
def test_codec_round_trips(dtype: str, scale: float, value: float, fmt: str, raw: Any, word_order):
    reg = _r(dtype, scale=scale, word_order=word_order)
    words = encode(reg, value)
    expected = _words(fmt, raw, word_order)
    assert words == expected
    assert len(expected) == reg.width
    back = decode(reg, expected)
    assert back == pytest.approx(value, abs=abs(scale) / 2)
    if dtype != "float32" and scale == 1.0:
        assert isinstance(back, int)


def test_word_order_matters_for_32_bit_values():
    big = encode(_r("float32"), 1.5)
    little = encode(_r("float32", word_order="little"), 1.5)
    assert big == [0x3FC0, 0x0000]
    assert little == [0x0000, 0x3FC0]
    assert decode(_r("float32"), little) != 1.5


def test_encoding_rounds_to_the_nearest_raw_integer():
    reg = _r("int16", scale=0.5)
    assert encode(reg, 1.3) == [3]  # 2.6 -> 3
    assert encode(reg, 1.2) == [2]  # 2.4 -> 2
    assert encode(reg, -1.3) == [0xFFFD]  # -2.6 -> -3
    assert decode(reg, [3]) == 1.5


def test_bits():
    reg = _r("bool")
    assert encode(reg, True) is True
    assert encode(reg, 0) is False
    assert decode(reg, [True, False]) is True
    assert decode(reg, False) is False
    with pytest.raises(WriteRefused):
        encode(reg, 2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 70000, -1])
def test_encode_refuses_what_the_type_cannot_carry(value: float):
    with pytest.raises(WriteRefused):
        encode(_r("uint16"), value)


def test_decode_refuses_the_wrong_number_of_words():
    with pytest.raises(ValueError, match="expected 2 words"):
        decode(_r("float32"), [1])


_RANGE_CAP = 1e30  # keep float32 values finite after scaling in the property below


@st.composite
def _register_and_value(draw: st.DrawFn) -> tuple[Register, float]:
    dtype = draw(st.sampled_from([d for d in DTYPES if d != "bool"]))
    scale = draw(st.sampled_from([1.0, 0.1, 0.001, 0.5, 2.0, 10.0, -0.25]))
    word_order = draw(st.sampled_from(["big", "little"]))
    reg = _r(dtype, scale=scale, word_order=word_order)
    lo, hi = reg.representable()
    lo, hi = max(lo, -_RANGE_CAP), min(hi, _RANGE_CAP)
    value = draw(st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False))
    return reg, value


@settings(max_examples=400, deadline=None)
@given(_register_and_value())
def test_decode_of_encode_is_identity_within_the_resolution(case: tuple[Register, float]):
    reg, value = case
    back = decode(reg, encode(reg, value))
    if reg.dtype == "float32":
        # float32 keeps 24 significant bits; values below its smallest normal lose more
        tolerance = abs(value) * 2.0**-23 + 1.2e-38 * abs(reg.scale)
    else:
        tolerance = abs(reg.scale) / 2 * (1 + 1e-9) + abs(value) * 1e-15
    assert math.isclose(back, value, rel_tol=0, abs_tol=tolerance)


# ---------------------------------------------------------------------------------------------
# write checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def pump() -> DeviceProfile:
    return load_profile(shipped_profile("insulin_pump_tcp"))


@pytest.mark.parametrize(
    ("register", "value", "why"),
    [
        ("reservoir_u", 100.0, "read-only"),
        ("occluded", True, "read-only"),
        ("bolus_u", 25.01, "0.0..25.0 U"),
        ("bolus_u", -0.1, "0.0..25.0 U"),
        ("temp_basal_u_per_h", float("nan"), "not a finite number"),
        ("temp_basal_u_per_h", float("inf"), "not a finite number"),
        ("temp_basal_duration_min", 31, "0.0..30.0 min"),
        ("bolus_u", True, "a number"),
        ("bolus_u", "2", "a number"),
        ("suspend", 0.5, "a bool"),
    ],
)
def test_check_write_refuses_and_logs(
    pump: DeviceProfile, register: str, value: object, why: str, caplog: pytest.LogCaptureFixture
):
    with (
        caplog.at_level(logging.WARNING, logger="hw_bridge.refused"),
        pytest.raises(WriteRefused) as info,
    ):
        pump.check_write(register, value)
    message = str(info.value)
    assert "insulin_pump" in message
    assert register in message
    assert repr(value) in message
    assert why in message
    records = [r for r in caplog.records if r.name == "hw_bridge.refused"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].register == register  # type: ignore[attr-defined]


def test_check_write_accepts_values_within_the_limits(pump: DeviceProfile, caplog):
    with caplog.at_level(logging.WARNING, logger="hw_bridge.refused"):
        assert pump.check_write("bolus_u", 25) == 25.0
        assert pump.check_write("bolus_u", 0) == 0.0
        assert pump.check_write("suspend", 1) is True
        assert check_write(pump.register("command"), 3, device="p") == 3.0
    assert not caplog.records


def test_limits_default_to_what_the_type_carries():
    reg = _r("int16", scale=0.1)
    assert reg.limits() == pytest.approx((-3276.8, 3276.7))
    assert check_write(reg, 3276.7) == pytest.approx(3276.7)
    with pytest.raises(WriteRefused):
        check_write(reg, 3276.8)
