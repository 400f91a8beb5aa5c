"""``twinloop emulate`` (plant-backed devices on real byte streams) and ``twinloop hil`` (the rig).

A HIL session against the emulated devices is two commands::

    twinloop emulate pump --rtu-pty /tmp/tl-pump --cgm-pty /tmp/tl-cgm --time-scale 0.05 &
    twinloop hil --port /tmp/tl-pump --cgm-port /tmp/tl-cgm --time-scale 0.05 --minutes 240

and for the knee exoskeleton (the drive's patient follows the same task and seed as the rig)::

    twinloop emulate drive --tcp 127.0.0.1:5021 --joint knee --patient moderate --task cyclic &
    twinloop hil --therapy knee-exo --profile hw_bridge/profiles/exo_drive_tcp.yaml \
        --controller aan --patient moderate --task cyclic --seconds 20 --out runs/exo

The first makes two pty pairs (the devices' ends stay inside the emulator, the other ends are
linked at the given paths, like the ``/dev/ttyUSB*`` of real devices) and serves the pump over
Modbus RTU and the CGM over its line protocol, both backed by one virtual patient; the second
runs the rig against them through the shipped profiles.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import threading
from pathlib import Path
from typing import Any

from twinloop.limits import MAX_TIME_SCALE_S_PER_MIN

#: Serial baud rates ``emulate --baudrate`` accepts (the standard rates 300 to 4 Mbaud).
MIN_BAUDRATE = 300
MAX_BAUDRATE = 4_000_000
#: Longest HIL session: ``hil --minutes`` (glucose, simulated minutes: a year) and
#: ``hil --seconds`` (knee-exo, seconds: a day).
MAX_HIL_MINUTES = 525_600
MAX_HIL_SECONDS = 86_400.0
#: ``hil --wait-s``: how long the rig waits for a device that is not there yet, s.
DEFAULT_DEVICE_WAIT_S = 10.0
MAX_DEVICE_WAIT_S = 600.0


def add_parser(sub: Any) -> None:
    """Add the ``emulate`` and ``hil`` sub-commands to the ``twinloop`` parser."""
    from twinloop.cli.options import add_count, count, number, seed

    time_scale = number(0.0, MAX_TIME_SCALE_S_PER_MIN, low_open=True)

    emu = sub.add_parser(
        "emulate",
        help="serve a plant-backed emulated device (pump over Modbus, CGM over serial, "
        "exoskeleton drive over Modbus TCP)",
        description="Serve emulated devices backed by one virtual patient (UVA/Padova), "
        "speaking the real protocols (see hw_bridge/DEVICES.md). Runs until interrupted.",
    )
    emu.add_argument("device", choices=["pump", "cgm", "drive"], help="the device to serve")
    emu.add_argument("--rtu", help="pump: serve Modbus RTU on this serial port / pty end")
    emu.add_argument(
        "--rtu-pty", help="pump: make a pty pair and link the client's end at this path"
    )
    emu.add_argument("--tcp", help="pump, drive: serve Modbus TCP on HOST:PORT or PORT")
    emu.add_argument(
        "--joint",
        choices=["pendulum", "knee"],
        default="pendulum",
        help="drive: the joint it moves (a rigid pendulum, or the knee plant: --patient preset)",
    )
    emu.add_argument(
        "--task",
        help="drive --joint knee: the patient follows this rehabilitation task (cyclic, "
        "sit_to_stand, hold) drawn with --seed, its clock started at each enable operation; "
        "give the rig the same --task and --seed (default: the patient holds 90°)",
    )
    emu.add_argument(
        "--timing-json",
        help="drive: at exit, write the 1 kHz joint loop's lateness/duration summary here",
    )
    emu.add_argument(
        "--joint-thread",
        action="store_true",
        help="drive: run the 1 kHz firmware in a thread of the server's process (default: a "
        "process of its own, so Modbus traffic cannot delay it)",
    )
    emu.add_argument(
        "--tls",
        nargs=3,
        metavar=("CERT", "KEY", "CA"),
        help="pump: Modbus/TLS on --tcp with this certificate and key, requiring client "
        "certificates signed by CA; only the role 'operator' (certificate extension "
        "1.3.6.1.4.1.50316.802.1) may write",
    )
    emu.add_argument("--serial", help="cgm: serve the line protocol on this serial port")
    emu.add_argument("--cgm-pty", help="also serve the CGM; link the client's end here")
    emu.add_argument("--cgm-serial", help="also serve the CGM on this serial port")
    emu.add_argument("--bind", default="127.0.0.1", help="TCP bind address (127.0.0.1)")
    emu.add_argument(
        "--patient",
        help="virtual patient (pump, cgm: adult#001) or knee preset (drive --joint knee: "
        "moderate; healthy, mild, moderate, severe)",
    )
    emu.add_argument("--seed", type=seed, default=0, help="seed of meals and sensor noise")
    emu.add_argument(
        "--time-scale",
        type=time_scale,
        default=60.0,
        help="wall seconds per simulated minute (60 = real time), > 0 to "
        f"{MAX_TIME_SCALE_S_PER_MIN:g}; announced to rigs, which refuse another",
    )
    emu.add_argument(
        "--baudrate",
        type=count(MIN_BAUDRATE, MAX_BAUDRATE),
        help=f"serial baud rate, {MIN_BAUDRATE} to {MAX_BAUDRATE} (pump 115200, CGM 9600)",
    )

    emu.set_defaults(handler=emulate)
    hil = sub.add_parser(
        "hil",
        help="run a therapy's loop against real or emulated devices through device profiles "
        "(glucose: a pump and a CGM; knee-exo: an exoskeleton drive)",
        description="The HIL rig: the controller and the safety supervisor on the wall clock, "
        "the pump over Modbus and the CGM over its line protocol through device profiles, a "
        "watchdog with fail-safe, everything recorded.",
    )
    hil.add_argument(
        "--therapy",
        default="glucose",
        help="glucose (pump + CGM, default) or knee-exo (the exoskeleton drive over Modbus TCP)",
    )
    hil.add_argument(
        "--profile",
        help="device profile: a YAML file or a shipped name (glucose: insulin_pump_rtu "
        "(default), insulin_pump_tcp; knee-exo: exo_drive_tcp (default))",
    )
    hil.add_argument("--port", help="the pump's serial port (overrides the profile)")
    hil.add_argument("--tcp", help="the pump's HOST:PORT (overrides the profile)")
    hil.add_argument("--cgm-profile", default="cgm_line", help="CGM profile (cgm_line)")
    hil.add_argument("--cgm-port", help="the CGM's serial port (glucose: required)")
    hil.add_argument(
        "--patient",
        help="clinical profile for the therapy (glucose: adult#001; knee-exo: the knee preset, "
        "moderate)",
    )
    hil.add_argument(
        "--controller",
        help="controller (glucose: pid (default: no meal announcements reach a rig), oref0, "
        "basal-bolus; knee-exo: aan (default), impedance, none)",
    )
    hil.add_argument(
        "--time-scale",
        type=time_scale,
        default=60.0,
        help=f"wall seconds per simulated minute, > 0 to {MAX_TIME_SCALE_S_PER_MIN:g} (60); "
        "the devices' own (an emulator's --time-scale): a device announcing another is refused",
    )
    add_count(hil, "--minutes", 1, MAX_HIL_MINUTES, "simulated minutes to run", 240)
    hil.add_argument(
        "--out", help="run directory (default runs/hil-YYYYmmdd-HHMMSS); must be new or empty"
    )
    hil.add_argument("--overwrite", action="store_true", help="replace an earlier run at --out")
    hil.add_argument(
        "--flush-every-min",
        type=_flush_every_min,
        default=None,
        help="simulated minutes (knee-exo: minutes of the session) between flushes of the "
        "recording to disk (1..1440, default 5): a killed session loses at most this much",
    )
    hil.add_argument(
        "--task", default="cyclic", help="knee-exo: cyclic (default), sit_to_stand, hold"
    )
    hil.add_argument(
        "--seed", type=seed, default=0, help="knee-exo: seed of the task (as the emulator's)"
    )
    hil.add_argument(
        "--seconds",
        type=number(0.0, MAX_HIL_SECONDS, low_open=True),
        help=f"knee-exo: session length, s, > 0 to {MAX_HIL_SECONDS:g} (default: the task's)",
    )
    add_count(hil, "--control-hz", 10, 500, "knee-exo: control rate, Hz", 100)
    add_count(
        hil,
        "--watchdog-ms",
        10,
        1000,
        "knee-exo: the longest drive watchdog accepted, ms (read, never written)",
        100,
    )
    hil.add_argument(
        "--wait-s",
        type=number(0.0, MAX_DEVICE_WAIT_S),
        default=DEFAULT_DEVICE_WAIT_S,
        help=f"glucose: seconds to wait for a device that is not there yet (a port that does "
        f"not exist, a refused connection: an emulator still starting), 0 to "
        f"{MAX_DEVICE_WAIT_S:g} ({DEFAULT_DEVICE_WAIT_S:g})",
    )
    hil.add_argument(
        "--verbose",
        action="store_true",
        help="also print pymodbus's and the device transports' log on stderr (always written "
        "to RUN_DIR/hil.log)",
    )
    hil.add_argument(
        "--realtime",
        action="store_true",
        help="pace the rig under SCHED_FIFO (needs CAP_SYS_NICE; says so when refused)",
    )
    hil.set_defaults(handler=hil_command)


def _flush_every_min(value: str) -> int:
    from twinloop.agents.recording import check_flush_every_min

    try:
        return check_flush_every_min(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: {exc}") from None


def server_tls_context(certfile: str, keyfile: str, cafile: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+) that requires client certificates from ``cafile``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.load_verify_locations(cafile=cafile)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def emulate(args: argparse.Namespace) -> int:
    """Serve the emulated devices until SIGINT/SIGTERM."""
    from twinloop.hw_bridge.emulators.cgm import CgmEmulator
    from twinloop.hw_bridge.emulators.patient import VirtualPatient
    from twinloop.hw_bridge.emulators.pump import PumpEmulator
    from twinloop.hw_bridge.pty import PtyPair

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.device == "drive":
        return _emulate_drive(args, stop)
    args.patient = args.patient or "adult#001"
    patient = VirtualPatient(args.patient, seed=args.seed, wall_s_per_sim_min=args.time_scale)
    closers: list[Any] = []
    lines: list[str] = []
    try:
        if args.device == "pump":
            if not (args.rtu or args.rtu_pty or args.tcp):
                raise ValueError("emulate pump: give --rtu PORT, --rtu-pty LINK or --tcp HOST:PORT")
            pump = PumpEmulator(patient)
            if args.rtu or args.rtu_pty:
                port = args.rtu
                if args.rtu_pty:
                    pair = PtyPair(links=(args.rtu_pty, None))
                    closers.append(pair)
                    port = pair.b
                baud = args.baudrate or 115200
                closers.append(pump.start_rtu(port, baudrate=baud, parity="N", stopbits=2))
                lines.append(f"pump: Modbus RTU on {args.rtu_pty or args.rtu}")
            if args.tcp:
                host, _, port_text = args.tcp.rpartition(":")
                tls = server_tls_context(*args.tls) if args.tls else None
                closers.append(pump.start_tcp(host or args.bind, int(port_text), tls=tls))
                kind = "Modbus/TLS (client certificates required)" if tls else "Modbus TCP"
                lines.append(f"pump: {kind} on {host or args.bind}:{port_text}")
        cgm_port = args.serial if args.device == "cgm" else args.cgm_serial
        if args.device == "cgm" and not (args.serial or args.cgm_pty):
            raise ValueError("emulate cgm: give --serial PORT or --cgm-pty LINK")
        if args.cgm_pty:
            pair = PtyPair(links=(args.cgm_pty, None))
            closers.append(pair)
            cgm_port = pair.b
        if cgm_port:
            cgm = CgmEmulator(patient, cgm_port, seed=args.seed, baudrate=args.baudrate or 9600)
            cgm.start()
            closers.append(cgm)
            lines.append(f"cgm: line protocol on {args.cgm_pty or cgm_port}")
        patient.start()
        print(
            f"twinloop emulate: {args.patient}, {args.time_scale:g} s per simulated minute; "
            + "; ".join(lines),
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        patient.stop()
        for closer in reversed(closers):
            stopper = getattr(closer, "stop", None) or closer.close
            stopper()
    return 0


def _emulate_drive(args: argparse.Namespace, stop: threading.Event) -> int:
    """Serve the emulated exoskeleton drive on Modbus TCP until ``stop`` is set or Ctrl-C."""
    from twinloop.hw_bridge.emulators.drive.emulator import PendulumJoint
    from twinloop.hw_bridge.emulators.drive.process import knee_factory, run_drive

    if not args.tcp:
        raise ValueError("emulate drive: give --tcp HOST:PORT (or PORT)")
    host, _, port_text = args.tcp.rpartition(":")
    if not port_text.isdigit():
        raise ValueError(f"emulate drive: --tcp {args.tcp!r} is not HOST:PORT or PORT")
    if args.joint == "knee":
        factory: Any = knee_factory(args.patient or "moderate", seed=args.seed, task=args.task)
    elif args.task:
        raise ValueError("emulate drive: --task needs --joint knee")
    else:
        factory = PendulumJoint
    task = f", task {args.task} (seed {args.seed})" if args.task else ""

    def ready(server: Any) -> None:
        bound_host, bound_port = server.tcp_address
        print(
            f"twinloop emulate: drive ({args.joint}{task}, CiA 402 style, 1 kHz): Modbus TCP "
            f"on {bound_host}:{bound_port}",
            flush=True,
        )

    timing = run_drive(
        host=host or args.bind,
        port=int(port_text),
        backend_factory=factory,
        joint_process=not args.joint_thread,
        stop_event=stop,
        on_ready=ready,
    )
    if args.timing_json:
        Path(args.timing_json).write_text(json.dumps(timing, indent=1))
    late = timing.get("lateness_ms")
    if late:
        print(
            f"drive joint loop: {timing['ticks']} ticks at 1 kHz, lateness p50 "
            f"{late['p50']:.3f} ms, p99 {late['p99']:.3f} ms, max {late['max']:.3f} ms",
            flush=True,
        )
    return 0


def hil_command(args: argparse.Namespace) -> int:
    """``twinloop hil``: the session of the therapy's rig (its HIL part)."""
    from twinloop.cli.options import claim_out, therapy_of

    therapy = therapy_of(args.therapy)
    if not therapy.has("hil") or not hasattr(therapy.part("hil"), "run_session"):
        raise ValueError(f"the {therapy.name} therapy has no HIL rig")
    if args.out:
        claim_out(args.out, overwrite=args.overwrite)
    return int(therapy.part("hil").run_session(args))
