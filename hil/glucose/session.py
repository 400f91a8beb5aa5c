"""``twinloop hil`` for the glucose therapy: the insulin rig against a pump and a CGM.

:func:`run_session` receives the parsed options of ``twinloop hil`` (an ``argparse.Namespace``:
``profile``, ``port``, ``tcp``, ``cgm_profile``, ``cgm_port``, ``patient``, ``controller``,
``time_scale`` (wall s per simulated min), ``minutes``, ``out``, ``realtime``), runs the session,
records it and prints its summary; it returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from twinloop.agents.recording import DEFAULT_HIL_FLUSH_EVERY_MIN, new_run_dir
from twinloop.hw_bridge.profile import shipped_profile

#: The controller of a session when none is named. Not the loop's basal-bolus: no meal
#: announcements reach a rig, so a meal-bolus therapy would deliver basal insulin only.
PART_DEFAULT_CONTROLLER = "pid"


def _profile_path(name: str) -> Path:

    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") or path.exists() else shipped_profile(name)


#: What to check when a device cannot be reached at the start, by device.
CONNECT_HINTS = {
    "pump": "is `twinloop emulate pump` (or the pump) running there?",
    "cgm": "is `twinloop emulate pump --cgm-pty` (or the CGM) connected there?",
}


#: Why a device cannot be opened while it is still starting (an emulator creating its pty
#: links or its listener): the rig waits for these, up to ``--wait-s``, and for nothing else.
NOT_THERE_YET = ("no such port", "connection refused")
#: Seconds between two attempts while waiting.
WAIT_POLL_S = 0.25


def _connect(
    stack: contextlib.ExitStack, device: Any, name: str, hint: str, wait_s: float = 0.0
) -> Any:
    """Open ``device`` on ``stack``; a failure becomes one readable line naming it.

    A device that is not there yet (:data:`NOT_THERE_YET`: a port that does not exist, a
    refused connection) is tried again every :data:`WAIT_POLL_S` for up to ``wait_s`` seconds,
    said once on stderr — so an emulator started just before the rig (``emulate … &`` then
    ``hil``) is waited for. Any other failure (a permission, a device that does not answer) is
    reported at once.
    """
    from twinloop.hw_bridge.errors import CommunicationError

    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return stack.enter_context(device)
        except CommunicationError as exc:
            reason = exc.reason or str(exc)
            if reason not in NOT_THERE_YET or time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:g} s" if said else ""
                raise CommunicationError(f"{name}: {reason}{waited} — {hint}") from None
            if not said:
                print(
                    f"twinloop hil: waiting for {name} ({reason}), up to {wait_s:g} s…",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(WAIT_POLL_S)


def _say_time_scale_mismatch(_channel: str, alarm: Any) -> None:
    """Print a time scale mismatch when it is found (other alarms are listed at the end)."""
    from twinloop.hil.glucose.rig import TIME_SCALE_CONDITION

    if alarm.active and alarm.condition.startswith(TIME_SCALE_CONDITION):
        print(f"twinloop hil: {alarm.source} alarm: {alarm.condition}", file=sys.stderr, flush=True)


def run_session(args: argparse.Namespace) -> int:
    """Run the insulin rig (``twinloop hil``'s options) and print its timing, alarms and CGM."""
    args.profile = args.profile or "insulin_pump_rtu"
    args.patient = args.patient or "adult#001"
    args.controller = args.controller or PART_DEFAULT_CONTROLLER
    if not args.cgm_port:
        raise ValueError("hil: give --cgm-port PORT (the CGM's serial port)")
    from twinloop.agents.recording import Recorder
    from twinloop.hil.console import LOG_NAME, session_log
    from twinloop.hil.glucose.rig import Rig, RigConfig, pump_register_names, summarize_rig
    from twinloop.hw_bridge.errors import CommunicationError
    from twinloop.hw_bridge.line import LineTransport
    from twinloop.hw_bridge.modbus_client import ModbusDevice
    from twinloop.hw_bridge.profile import load_profile

    config = RigConfig(
        patient=args.patient,
        controller=args.controller,
        wall_s_per_sim_min=args.time_scale,
        minutes=args.minutes,
        realtime=args.realtime,
    )
    profile = load_profile(_profile_path(args.profile))
    if args.port or args.tcp:
        profile = profile.with_overrides(port=args.port, tcp=args.tcp)
    cgm_profile = load_profile(_profile_path(args.cgm_profile))
    t = cgm_profile.transport
    out = Path(args.out or new_run_dir("runs/hil-%Y%m%d-%H%M%S"))
    record = {"rig": vars(args) | {"profile": str(profile.source)}}
    flush = getattr(args, "flush_every_min", None) or DEFAULT_HIL_FLUSH_EVERY_MIN
    pump_device = ModbusDevice(profile)
    names = {"pump": f"pump at {pump_device.address}", "cgm": f"cgm at {args.cgm_port}"}
    serial = {k: getattr(t, k) for k in ("baudrate", "parity", "bytesize", "stopbits")}
    line = LineTransport(args.cgm_port, **serial)
    verbose = bool(getattr(args, "verbose", False))
    with session_log(out / LOG_NAME, verbose=verbose), contextlib.ExitStack() as stack:
        wait_s = float(getattr(args, "wait_s", 0.0))
        pump = _connect(stack, pump_device, names["pump"], CONNECT_HINTS["pump"], wait_s)
        cgm = _connect(stack, line, names["cgm"], CONNECT_HINTS["cgm"], wait_s)
        regs = pump_register_names(profile)
        rig = Rig(config, pump=pump, cgm=cgm, pump_registers=regs, device_names=names)
        try:
            rig.check_time_scale()  # an emulator on another time scale: refused in one line
        except CommunicationError:  # connected, but nothing answers (a port without a device)
            hint = CONNECT_HINTS["pump"]
            raise CommunicationError(f"{names['pump']}: no answer — {hint}") from None
        rig.channels["rig->alarms"].listen(_say_time_scale_mismatch)
        recorder = Recorder(out, config=record, flush_every_min=flush, background=True)
        rig.listen(recorder.listener("rig"))
        recorder.manifest_extra = lambda: {"outages": rig.outages()}
        steps = args.minutes // config.control_period_min * config.watchdog_steps
        print(
            f"twinloop hil: {profile.name} + {cgm_profile.name}, {args.minutes} simulated min "
            f"at {args.time_scale:g} s/min ({steps} watchdog steps of "
            f"{config.step_s * 1000:.0f} ms)",
            flush=True,
        )
        complete = False
        try:
            stats = rig.run(steps=steps, on_step=lambda k: recorder.advance(rig.t_min(k)))
            complete = True
        finally:
            summary: dict[str, Any] = summarize_rig(rig, stats) if complete else {"complete": False}
            recorder.finish(record, summary, complete=complete)
    if args.realtime:
        refused = getattr(rig, "realtime_refused", None)
        print(f"real-time scheduling: {refused or 'SCHED_FIFO granted'}")
    timing = summary["timing"]
    late = timing["lateness_ms"]
    print(
        f"timing: {timing['ticks']} steps, lateness p50 {late['p50']:.2f} ms, p99 "
        f"{late['p99']:.2f} ms, max {late['max']:.2f} ms; overruns {timing['overruns']}"
    )
    for alarm in summary["alarms"]:
        state = "RAISED" if alarm["active"] else "cleared"
        print(
            f"alarm {state} at {alarm['t_min']:.0f} min: {alarm['source']} {alarm['condition']}"
            f" — {alarm['action']}"
        )
    if "cgm" in summary:
        c = summary["cgm"]
        print(
            f"CGM: {summary['cgm_readings']} readings, mean {c['mean_mg_dl']:.1f} mg/dL, "
            f"TIR {c['time_in_range_70_180_pct']:.1f} %, <70 {c['time_below_70_pct']:.1f} %"
        )
    for o in summary["outages"]:
        end = "not over at the end" if o["end_t_min"] is None else f"to {o['end_t_min']:.0f} min"
        print(f"outage: {o['source']} {o['condition']} from {o['start_t_min']:.0f} min {end}")
    print(f"recording: {out}")
    print(f"device log: {out / LOG_NAME}")
    return 0
