"""Exoskeleton HIL timing: the rig's 100 Hz loop over Modbus TCP, and the drive's 1 kHz loop.

Prints one JSON object. Run it network-isolated (it starts a Modbus TCP server on loopback)::

    ../shared/bin/offline .venv/bin/python benchmarks/exo_hil_timing.py             # 30 s
    ../shared/bin/offline .venv/bin/python benchmarks/exo_hil_timing.py --seconds 120

* The **drive**: the emulated CiA 402 drive with the knee plant behind it, its patient
  following the task (``knee_factory(preset, seed=…, task=…)``), served on 127.0.0.1 from
  **its own process** (as a real drive is its own device). With ``--drive-joint process`` (the
  default, as ``twinloop emulate drive``) its firmware and 1 kHz joint loop run in a core
  process of their own (:class:`twinloop.hw_bridge.emulators.drive.process.DriveProcess`); with
  ``thread`` in a thread of the server's process (:class:`DriveEmulator`). The loop sleeps,
  then spins the last ``--drive-spin-us``. Its ``LoopTiming`` is reset when the rig starts
  and read when it ends, so ``drive_1khz`` covers exactly the session: lateness (tick start −
  due) and duration.
* The **rig**: :func:`twinloop.hil.knee.rig.run_exo_session` in this process through the shipped
  profile ``exo_drive_tcp`` — CiA 402 start-up, then at 100 Hz one read (input registers 0–9) and
  one write (target torque) per tick, the task reference, the controller, the supervisor, and a
  recording to a temporary run directory. ``rig_100hz`` is its
  :class:`twinloop.hil.pacing.PacingStats` summary (lateness = tick start − due) with the slowest
  ticks.
* ``targets``: p99 lateness ≤ 1 ms at 100 Hz over Modbus TCP, ≤ 0.2 ms for the 1 kHz loop.

Timing is measured here only; the tests assert none.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_RIG_P99_MS = 1.0
TARGET_DRIVE_P99_MS = 0.2


def _drive_process(
    conn: Connection,
    preset: str,
    task: str,
    seed: int,
    spin_s: float,
    switch_s: float | None,
    realtime: bool,
    joint: str,
) -> None:
    """The drive's process: serve, then answer "reset" / "summary" / "stop" on ``conn``.

    With ``realtime`` the process asks for ``SCHED_FIFO`` before its threads start (they
    inherit it); ``switch_s`` sets its interpreter's GIL switch interval.
    """
    refused = None
    if realtime:
        from twinloop.hil.pacing import request_realtime

        refused = request_realtime()
    if switch_s is not None:
        sys.setswitchinterval(switch_s)
    from twinloop.hw_bridge.emulators.drive.emulator import DriveEmulator, knee_backend
    from twinloop.hw_bridge.emulators.drive.modbus import DriveModbus
    from twinloop.hw_bridge.emulators.drive.process import DriveProcess, knee_factory

    drive: DriveModbus
    if joint == "process":
        drive = DriveProcess(knee_factory(preset, seed=seed, task=task), spin_s=spin_s)
    else:
        drive = DriveEmulator(knee_backend(preset, seed=seed, task=task), spin_s=spin_s)
    with drive.start_tcp("127.0.0.1", 0) as server:
        conn.send((server.tcp_address[1], refused))
        while True:
            command = conn.recv()
            if command == "reset":
                drive.timing.reset()
                conn.send(None)
            elif command == "summary":
                conn.send({**drive.timing.summary(), "resyncs": getattr(drive, "resyncs", None)})
            else:
                break
    close = getattr(drive, "close", None)
    if close is not None:
        close()
    conn.send(None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One session; the JSON's figures."""
    from twinloop.hil.knee.rig import ExoRigConfig, run_exo_session

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    switch_s = None if args.switch_interval_us is None else args.switch_interval_us * 1e-6
    proc = ctx.Process(
        target=_drive_process,
        args=(
            theirs,
            args.preset,
            args.task,
            args.seed,
            args.drive_spin_us * 1e-6,
            switch_s,
            args.realtime,
            args.drive_joint,
        ),
        name="exo-drive",  # not a daemon: its DriveProcess starts a core process
    )
    proc.start()
    try:
        if not ours.poll(60):
            raise RuntimeError("the drive process did not start")
        port, drive_refused = ours.recv()
        config = ExoRigConfig(
            tcp=f"127.0.0.1:{port}",
            controller=args.controller,
            patient=args.preset,
            task=args.task,
            seed=args.seed,
            seconds=args.seconds,
            spin_s=args.rig_spin_us * 1e-6,
            realtime=args.realtime,
        )
        with tempfile.TemporaryDirectory(prefix="twinloop-exo-bench-") as tmp:

            def started(rig: Any) -> None:
                ours.send("reset")
                ours.recv()

            session = run_exo_session(config, out=Path(tmp) / "run", on_rig=started)
        ours.send("summary")
        drive = ours.recv()
        ours.send("stop")
        ours.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    stats = session.stats
    rig = stats.summary()
    late = np.asarray(stats.lateness_ms)
    worst = np.argsort(late)[-10:][::-1]
    rig["slowest_starts"] = [
        {"tick": int(k), "lateness_ms": float(late[k]), "duration_ms": stats.duration_ms[k]}
        for k in worst
    ]
    summary = session.summary
    return {
        "rig_100hz": rig,
        "drive_1khz": drive,
        "session": {
            "ended_by": summary["ended_by"],
            "rms_error_deg": summary.get("exo", {}).get("rms_error_deg"),
            "limit_violations": summary.get("exo", {}).get("limit_violations"),
            "overrides": summary["overrides"],
            "realtime_refused": {"rig": session.rig.realtime_refused, "drive": drive_refused}
            if args.realtime
            else "not asked",
        },
        "targets": {
            "rig_100hz_p99_lateness_ms": {
                "target": TARGET_RIG_P99_MS,
                "measured": rig["lateness_ms"]["p99"],
                "met": rig["lateness_ms"]["p99"] <= TARGET_RIG_P99_MS,
            },
            "drive_1khz_p99_lateness_ms": {
                "target": TARGET_DRIVE_P99_MS,
                "measured": drive["lateness_ms"]["p99"],
                "met": drive["lateness_ms"]["p99"] <= TARGET_DRIVE_P99_MS,
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="session length (30 s)")
    parser.add_argument("--controller", default="aan", help="none, impedance, aan (default)")
    parser.add_argument("--preset", default="moderate", help="knee preset (moderate)")
    parser.add_argument("--task", default="cyclic", help="cyclic (default), sit_to_stand, hold")
    parser.add_argument("--seed", type=int, default=0, help="task seed (0)")
    parser.add_argument(
        "--drive-spin-us", type=float, default=300.0, help="drive: spin window, µs (300)"
    )
    parser.add_argument(
        "--rig-spin-us", type=float, default=500.0, help="rig: spin window, µs (500)"
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="ask SCHED_FIFO for the rig's thread and the drive's process (needs CAP_SYS_NICE)",
    )
    parser.add_argument(
        "--drive-joint",
        choices=("process", "thread"),
        default="process",
        help="drive: 1 kHz firmware in a core process of its own (default) or in a thread of "
        "the server's process",
    )
    parser.add_argument(
        "--switch-interval-us",
        type=float,
        default=None,
        help="drive process: sys.setswitchinterval, µs (default: Python's 5000)",
    )
    args = parser.parse_args()
    if args.seconds < 20:
        print("note: the target asks for a run of at least 20 s", file=sys.stderr)
    started = time.time()
    load_before = os.getloadavg()
    result = run(args)
    result["config"] = vars(args)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
