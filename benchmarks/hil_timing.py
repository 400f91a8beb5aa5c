"""HIL timing: a 100 Hz Modbus TCP loop, and Modbus RTU cycles against their wire time.

Prints one JSON object. Run it network-isolated (it starts servers on loopback)::

    ../shared/bin/offline .venv/bin/python benchmarks/hil_timing.py            # 10 min at 100 Hz
    ../shared/bin/offline .venv/bin/python benchmarks/hil_timing.py --tcp-seconds 60

* ``tcp_100hz``: the emulated pump served by ``twinloop emulate pump --tcp`` in its own process;
  a :class:`twinloop.hw_bridge.modbus_client.ModbusDevice` paced at 100 Hz by
  :mod:`twinloop.hil.pacing`, each tick reading the pump's status (heartbeat, alarm, delivered
  total, bolus remaining: one request for the 13-register block) and writing its temp-basal rate
  (one request). Lateness percentiles, jitter, overruns, ticks later than one period, the ten
  slowest ticks.
* ``rtu_115200``: the emulated pump on a pty at 115200 baud 8N2 with emulated wire time; for each
  request the rig makes (read the temp basal, read the 13-register status block, write the
  temp-basal duration, write its rate) the cycle of our client — the transaction plus the silent
  interval before the next request — against the theoretical wire time of its two frames plus
  one silent interval after each (:func:`twinloop.hw_bridge.wire.rtu_cycle_wire_time_s`);
  ``rtu_19200`` the same at 19200 baud.

The fail-safe time after a pulled cable is measured by the end-to-end test
(``pytest tests/e2e/test_hil_rig.py -s``), which prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _emulator(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinloop", "emulate", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the emulator prints one line once it serves
    if not line.startswith("twinloop emulate"):
        proc.kill()
        raise RuntimeError(
            f"emulator did not start: {line}{proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def tcp_100hz(seconds: float, spin_s: float) -> dict[str, Any]:
    """The 100 Hz loop over Modbus TCP on loopback."""
    from twinloop.hil.pacing import pace
    from twinloop.hw_bridge.modbus_client import ModbusDevice
    from twinloop.hw_bridge.profile import load_profile, shipped_profile

    port = _free_port()
    proc = _emulator("pump", "--tcp", f"127.0.0.1:{port}")  # a pump on real time
    try:
        profile = load_profile(shipped_profile("insulin_pump_tcp"))
        profile = profile.with_overrides(tcp=f"127.0.0.1:{port}")
        names = ["heartbeat", "alarm_code", "delivered_total_u", "bolus_remaining_u"]
        with ModbusDevice(profile) as pump:
            for _ in range(500):  # warm up
                pump.read_many(names)

            def tick(k: int) -> None:
                pump.read_many(names)
                pump.write("temp_basal_u_per_h", 0.5 + 0.01 * (k % 50))

            stats = pace(tick, 0.01, n_ticks=int(seconds * 100), spin_s=spin_s)
    finally:
        _stop(proc)
    summary = stats.summary()
    took = np.asarray(stats.duration_ms)
    worst = np.argsort(took)[-10:][::-1]
    summary["slowest_ticks"] = [
        {"at_s": round(float(k) * 0.01, 2), "duration_ms": float(took[k])} for k in worst
    ]
    summary["seconds"] = seconds
    summary["spin_ms"] = 1000 * spin_s
    summary["requests_per_tick"] = 2  # the status block (one read) and the temp-basal rate
    return summary


#: (label, registers, function code, register count): what our client does, one request each.
RTU_REQUESTS = (
    ("read temp basal (FC3, 2 registers)", ("temp_basal_u_per_h",), 3, 2),
    (
        "read status block (FC4, 13 registers)",
        ("delivered_total_u", "bolus_remaining_u", "alarm_code", "heartbeat"),
        4,
        13,
    ),
    ("write temp basal duration (FC6)", ("temp_basal_duration_min",), 6, 1),
    ("write temp basal rate (FC16, 2 registers)", ("temp_basal_u_per_h",), 16, 2),
)


def _rtu_sizes(fc: int, count: int) -> tuple[int, int]:
    """Request and response bytes of an RTU frame (address, function, data, CRC)."""
    if fc in (3, 4):
        return 8, 5 + 2 * count
    if fc == 6:
        return 8, 8
    return 9 + 2 * count, 8  # FC16


def rtu_cycles(cycles: int, baudrate: int = 115200) -> dict[str, Any]:
    """Cycles of :class:`ModbusDevice` over a pty with emulated wire time, against theory.

    A cycle is one transaction followed by the silent interval a compliant master leaves
    before its next request; its theoretical time is both frames' character times plus a
    silent interval after each (:func:`twinloop.hw_bridge.wire.rtu_cycle_wire_time_s`).
    """
    from twinloop.hw_bridge.modbus_client import ModbusDevice
    from twinloop.hw_bridge.profile import load_profile, shipped_profile
    from twinloop.hw_bridge.wire import precise_sleep, rtu_cycle_wire_time_s, rtu_silent_interval_s

    link = os.path.join(tempfile.mkdtemp(prefix="twinloop-bench-"), "pump")
    proc = _emulator("pump", "--rtu-pty", link, "--baudrate", str(baudrate))  # real time, 8N2
    profile = load_profile(shipped_profile("insulin_pump_rtu")).with_overrides(port=link)
    profile = dataclasses.replace(
        profile, transport=dataclasses.replace(profile.transport, baudrate=baudrate)
    )
    t = profile.transport
    silent = rtu_silent_interval_s(t.baudrate)
    out: dict[str, Any] = {
        "baudrate": t.baudrate,
        "format": f"{t.bytesize}{t.parity}{t.stopbits}",
        "cycles": cycles,
        "requests": {},
    }
    try:
        with ModbusDevice(profile) as pump:
            ops = {
                3: lambda names: pump.read_many(list(names)),
                4: lambda names: pump.read_many(list(names)),
                6: lambda names: pump.write(names[0], 0),
                16: lambda names: pump.write(names[0], 0.8),
            }
            for label, names, fc, count in RTU_REQUESTS:
                req, resp = _rtu_sizes(fc, count)
                theory = rtu_cycle_wire_time_s(
                    req, resp, t.baudrate, bytesize=t.bytesize, parity=t.parity,
                    stopbits=t.stopbits,
                )  # fmt: skip
                for _ in range(20):
                    ops[fc](names)
                samples = []
                for _ in range(cycles):
                    t0 = time.perf_counter()
                    ops[fc](names)
                    precise_sleep(silent)
                    samples.append(time.perf_counter() - t0)
                arr = np.asarray(samples)
                out["requests"][label] = {
                    "request_bytes": req,
                    "response_bytes": resp,
                    "theoretical_ms": 1000 * theory,
                    "cycle_ms_p50": 1000 * float(np.percentile(arr, 50)),
                    "cycle_ms_p99": 1000 * float(np.percentile(arr, 99)),
                    "ratio_p50": float(np.percentile(arr, 50)) / theory,
                    "ratio_p99": float(np.percentile(arr, 99)) / theory,
                }
    finally:
        _stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp-seconds", type=float, default=600.0, help="100 Hz loop length")
    parser.add_argument(
        "--spin-ms", type=float, default=2.0, help="spin window before each tick (2 ms)"
    )
    parser.add_argument("--rtu-cycles", type=int, default=500, help="cycles per request kind")
    parser.add_argument("--skip-tcp", action="store_true")
    parser.add_argument("--skip-rtu", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "benchmark": "hil_timing",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
    }
    if not args.skip_rtu:
        out["rtu_115200"] = rtu_cycles(args.rtu_cycles, 115200)
        out["rtu_19200"] = rtu_cycles(args.rtu_cycles, 19200)
    if not args.skip_tcp:
        out["tcp_100hz"] = tcp_100hz(args.tcp_seconds, args.spin_ms / 1000)
    out["loadavg_end"] = list(os.getloadavg())
    tcp = out.get("tcp_100hz", {})
    out["targets"] = {
        "tcp_100hz_lateness_p99_ms": {
            "target": 1.0,
            "measured": tcp.get("lateness_ms", {}).get("p99"),
        },
        "tcp_100hz_lateness_max_ms": {
            "target": 5.0,
            "measured": tcp.get("lateness_ms", {}).get("max"),
        },
        "tcp_100hz_ticks_later_than_one_period": {
            "target": 0,
            "measured": tcp.get("later_than_one_period"),
        },
        "rtu_cycle_over_wire_time_p50": {
            "target": 1.2,
            "measured": {
                k: v["ratio_p50"] for k, v in out.get("rtu_115200", {}).get("requests", {}).items()
            },
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
