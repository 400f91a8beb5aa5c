"""HIL timing: a 100 Hz Modbus TCP loop, Modbus RTU cycles against their wire time, fail-safe.

Prints one JSON object. Run it network-isolated (it starts servers on loopback)::

    ../shared/bin/offline .venv/bin/python benchmarks/hil_timing.py            # 10 min at 100 Hz
    ../shared/bin/offline .venv/bin/python benchmarks/hil_timing.py --tcp-seconds 60

* ``tcp_100hz``: the emulated pump served by ``twinloop emulate pump --tcp`` in its own process;
  a :class:`hw_bridge.modbus_client.ModbusDevice` paced at 100 Hz by :mod:`hil.pacing` in a
  dedicated thread, each tick reading the pump's status (heartbeat, alarm, delivered total,
  bolus remaining: two requests) and writing its temp-basal rate (one request). Lateness
  percentiles, jitter, overruns, ticks later than one period.
* ``rtu_115200``: the emulated pump on a pty at 115200 baud 8N2 with emulated wire time; for each
  kind of request (read 2 / 8 holding registers, read 13 input registers, write 1 / 2 holding
  registers) the client's cycle time against the theoretical wire time of its two frames plus
  one silent interval after each (:func:`hw_bridge.wire.rtu_cycle_wire_time_s`).
* ``failsafe``: the rig against the emulated pump (RTU) and CGM (serial line) on pty pairs at
  0.02 s per simulated minute (a 100 ms control period); the CGM cable is pulled and the time
  until the pump is in its safe state is measured, in control periods.
"""

from __future__ import annotations

import argparse
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
        [sys.executable, "-m", "hil", "emulate", *args],
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


def tcp_100hz(seconds: float) -> dict[str, Any]:
    """The 100 Hz loop over Modbus TCP on loopback."""
    from hil.pacing import pace
    from hw_bridge.modbus_client import ModbusDevice
    from hw_bridge.profile import load_profile, shipped_profile

    port = _free_port()
    proc = _emulator("pump", "--tcp", f"127.0.0.1:{port}", "--time-scale", "0.05")
    try:
        profile = load_profile(shipped_profile("insulin_pump_tcp"))
        profile = profile.with_overrides(tcp=f"127.0.0.1:{port}")
        names = ["heartbeat", "alarm_code", "delivered_total_u", "bolus_remaining_u"]
        with ModbusDevice(profile) as pump:
            for _ in range(50):  # warm up
                pump.read_many(names)

            def tick(k: int) -> None:
                pump.read_many(names)
                pump.write("temp_basal_u_per_h", 0.5 + 0.01 * (k % 50))

            stats = pace(tick, 0.01, n_ticks=int(seconds * 100))
    finally:
        _stop(proc)
    summary = stats.summary()
    summary["seconds"] = seconds
    summary["requests_per_tick"] = 3
    return summary


#: (label, function code, register count): request and response sizes follow from them.
RTU_REQUESTS = (
    ("read 2 holding (FC3)", 3, 2),
    ("read 8 holding (FC3)", 3, 8),
    ("read 13 input (FC4)", 4, 13),
    ("write 1 holding (FC6)", 6, 1),
    ("write 2 holding (FC16)", 16, 2),
)


def _rtu_sizes(fc: int, count: int) -> tuple[int, int]:
    """Request and response bytes of an RTU frame (address, function, data, CRC)."""
    if fc in (3, 4):
        return 8, 5 + 2 * count
    if fc == 6:
        return 8, 8
    return 9 + 2 * count, 8  # FC16


def rtu_115200(cycles: int) -> dict[str, Any]:
    """Cycle times over a pty with emulated wire time, against theory."""
    from pymodbus import FramerType
    from pymodbus.client import ModbusSerialClient

    from hw_bridge.wire import rtu_cycle_wire_time_s

    link = os.path.join(tempfile.mkdtemp(prefix="twinloop-bench-"), "pump")
    proc = _emulator("pump", "--rtu-pty", link, "--time-scale", "0.05")
    out: dict[str, Any] = {"baudrate": 115200, "format": "8N2", "cycles": cycles, "requests": {}}
    try:
        client = ModbusSerialClient(
            link, framer=FramerType.RTU, baudrate=115200, parity="N", stopbits=2,
            timeout=0.5, retries=0,
        )  # fmt: skip
        client.connect()
        calls = {
            3: lambda n: client.read_holding_registers(0, count=n, device_id=1),
            4: lambda n: client.read_input_registers(0, count=n, device_id=1),
            6: lambda n: client.write_register(2, 0, device_id=1),
            16: lambda n: client.write_registers(0, [0] * n, device_id=1),
        }
        for label, fc, count in RTU_REQUESTS:
            req, resp = _rtu_sizes(fc, count)
            theory = rtu_cycle_wire_time_s(req, resp, 115200, parity="N", stopbits=2)
            for _ in range(20):
                calls[fc](count)
            samples = []
            for _ in range(cycles):
                t0 = time.perf_counter()
                result = calls[fc](count)
                samples.append(time.perf_counter() - t0)
                if result.isError():
                    raise RuntimeError(f"{label}: {result}")
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
        client.close()
    finally:
        _stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp-seconds", type=float, default=600.0, help="100 Hz loop length")
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
        out["rtu_115200"] = rtu_115200(args.rtu_cycles)
    if not args.skip_tcp:
        out["tcp_100hz"] = tcp_100hz(args.tcp_seconds)
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
