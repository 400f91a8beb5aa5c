"""``twinloop hil --therapy knee-exo``: the exoskeleton rig against a CiA 402 drive.

:func:`run_session` receives the parsed options of ``twinloop hil`` (an ``argparse.Namespace``:
``profile``, ``tcp``, ``controller``, ``patient``, ``task``, ``seed``, ``control_hz``,
``seconds``, ``watchdog_ms``, ``realtime``, ``out``), runs the session, records it and prints
its summary; it returns 0, or 1 when an alarm ended the session.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from twinloop.agents.recording import new_run_dir


def run_session(args: argparse.Namespace) -> int:
    """Run the exoskeleton rig against a drive and print its summary (1 if an alarm ended it)."""
    from twinloop.hil.console import LOG_NAME, session_log
    from twinloop.hil.knee.rig import ExoRigConfig, ExoRigError, run_exo_session

    if args.cgm_port or args.port:
        raise ValueError("hil --therapy knee-exo: the drive is on Modbus TCP (--tcp HOST:PORT)")
    config = ExoRigConfig(
        profile=args.profile or "exo_drive_tcp",
        tcp=args.tcp,
        controller=args.controller or "aan",
        patient=args.patient or "moderate",
        task=args.task,
        seed=args.seed,
        control_hz=args.control_hz,
        seconds=args.seconds,
        watchdog_ms=args.watchdog_ms,
        realtime=args.realtime,
    )
    out = Path(args.out or new_run_dir("runs/hil-exo-%Y%m%d-%H%M%S"))
    print(
        f"twinloop hil: knee-exo, controller {config.controller}, task {config.task} (seed "
        f"{config.seed}), patient {config.patient}, "
        + (f"{config.seconds:g} s" if config.seconds else "the task's duration")
        + f" at {config.control_hz} Hz",
        flush=True,
    )
    verbose = bool(getattr(args, "verbose", False))
    try:
        with session_log(out / LOG_NAME, verbose=verbose):
            session = run_exo_session(
                config, out=out, flush_every_min=getattr(args, "flush_every_min", None)
            )
    except ExoRigError as exc:
        raise ValueError(str(exc)) from exc
    print_exo_summary(
        session.summary,
        realtime_refused=session.rig.realtime_refused if args.realtime else None,
        realtime=args.realtime,
    )
    print(f"recording: {out}")
    print(f"device log: {out / LOG_NAME}")
    return 0 if session.rig.ended_by == "completed" else 1


def print_exo_summary(
    summary: dict[str, Any], *, realtime: bool = False, realtime_refused: str | None = None
) -> None:
    """Print an exoskeleton session's summary (``twinloop.hil.knee.rig.summarize_exo_rig``)."""
    drive = summary["drive"]
    states = " → ".join(dict.fromkeys(step["state"] for step in drive["startup"]))
    print(f"drive: {'enabled' if drive['enabled'] else 'NOT enabled'} ({states})")
    exo = summary.get("exo")
    if exo:
        share = exo["exo_work_fraction"]
        print(
            f"tracking: RMS error {exo['rms_error_deg']:.2f}°, max {exo['max_error_deg']:.2f}° "
            f"over {exo['duration_s']:.1f} s; exo positive work {exo['exo_work_j']:.2f} J, work "
            + (
                "share n/a (patient torque not observable through the drive)"
                if share is None
                else f"share {100 * share:.0f} %"
            )
        )
        print(
            f"limit violations: {exo['limit_violations']} (range of motion "
            f"{exo['rom_violations']}, velocity {exo['velocity_violations']}, torque "
            f"{exo['torque_violations']})"
        )
    tq = summary.get("commanded_torque_nm") or {}
    if tq:
        print(
            f"torque commanded: mean |τ| {tq['mean_abs']:.2f} N·m, max |τ| {tq['max_abs']:.2f} "
            f"N·m (profile limit ±{summary['torque_limit_nm']:g}); refused by the profile: "
            f"{summary['refused_writes']}"
        )
    overrides = summary.get("overrides") or {}
    print(
        "supervisor overrides: "
        + (", ".join(f"{rule} {n}" for rule, n in overrides.items()) or "none")
    )
    if realtime:
        print(f"real-time scheduling: {realtime_refused or 'SCHED_FIFO granted'}")
    timing = summary["timing"]
    late = timing.get("lateness_ms")
    if late:
        print(
            f"timing: {timing['ticks']} ticks of {timing['period_ms']:g} ms, lateness p50 "
            f"{late['p50']:.3f} ms, p99 {late['p99']:.3f} ms, max {late['max']:.3f} ms; "
            f"overruns {timing['overruns']}"
        )
    for alarm in summary["alarms"]:
        print(
            f"alarm RAISED at {alarm['t_s']:.2f} s: {alarm['source']} {alarm['condition']}"
            f" — {alarm['action']}"
        )
    print(f"ended: {summary['ended_by']}")
