"""The emulated drive with its 1 kHz firmware in a process of its own, as a real drive has it.

A real servo drive runs its current and torque loop on its own processor: the fieldbus stack
can be busy decoding a frame without delaying the control loop. :class:`DriveEmulator` runs
both in one Python process, so the 1 kHz joint thread and the pymodbus server thread share one
interpreter lock; a tick that falls due while the server decodes a request waits for it
(``benchmarks/exo_hil_timing.py`` measured p99 lateness 0.3–0.5 ms that way, against 0.01 ms
for the same loop in a process of its own under the same load).

:class:`DriveProcess` splits the drive the same way a real one is split:

* the **core** process (``drive-core``, started with the ``spawn`` method) holds the firmware
  — a :class:`~twinloop.hw_bridge.emulators.drive.emulator.DriveEmulator` with its joint, CiA 402
  state machine, watchdog and 1 kHz joint thread — and publishes both register tables into shared
  memory after every tick (a sequence lock: the word before the tables is odd while they are
  written);
* the **communication** side (this process) serves the same register map on Modbus TCP
  (:class:`~twinloop.hw_bridge.emulators.drive.emulator.DriveModbus`): a read copies the last
  published tables (no call into the core), a write is checked here (:func:`check_holding_write`)
  and then applied by the core, which answers once the tables it published show it. So a read that
  follows a write sees the write's effect, as with the in-process drive.

The core's joint is built in the core process from ``backend_factory`` (a picklable callable
such as ``functools.partial(knee_backend, "moderate", seed=0, task="cyclic")``). If the core
process dies, reads return its last tables (the heartbeat stops, which a client detects) and
writes get Modbus exception 04 (device failure).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from pymodbus.constants import ExcCodes

from twinloop.hw_bridge.emulators.drive.emulator import (
    DriveEmulator,
    JointBackend,
    PendulumJoint,
    knee_backend,
)
from twinloop.hw_bridge.emulators.drive.modbus import (
    HR_COUNT,
    IR_COUNT,
    DriveModbus,
    DriveServerThread,
    DriveState,
    DriveStatus,
    check_holding_write,
)
from twinloop.hw_bridge.emulators.modbus_server import EmulatorError
from twinloop.hw_bridge.wire import WireFaults

__all__ = ["DriveProcess", "knee_factory", "run_drive"]

_log = logging.getLogger(__name__)

#: Words of the shared image: the sequence word, the holding and the input table, then the
#: number of mailbox writes the tables show applied.
_IMAGE_WORDS = 1 + HR_COUNT + IR_COUNT + 1
_APPLIED = _IMAGE_WORDS - 1
#: Mailbox of writes for the joint thread: word 0 counts writes posted; then ``_SLOTS`` slots
#: of ``_SLOT_WORDS`` words: address, count, ``HR_COUNT`` words, the result (0 or exception).
_SLOTS = 16
_SLOT_WORDS = 3 + HR_COUNT
_MAILBOX_WORDS = 1 + _SLOTS * _SLOT_WORDS
#: How often a writer looks whether its write is applied, s.
_POLL_S = 50e-6
#: How long a call into the core may take before the core is taken for dead, s.
CALL_TIMEOUT_S = 2.0


class _CoreDrive(DriveEmulator):
    """The firmware in the core process: a drive that publishes its tables after each change."""

    def __init__(self, image: Any, mailbox: Any, backend: JointBackend, **kwargs: Any) -> None:
        super().__init__(backend, **kwargs)
        self._image = image
        self._mailbox = mailbox
        self._applied = 0
        self._publish_lock = threading.Lock()

    def step(self) -> None:
        """Apply the mailbox's writes, run the tick, publish (the joint thread's tick)."""
        self.drain()
        super().step()
        self.publish()

    def drain(self) -> None:
        """Apply the writes posted to the mailbox since the last drain, in order."""
        mailbox = self._mailbox
        posted = mailbox[0]
        while self._applied < posted:
            base = 1 + (self._applied % _SLOTS) * _SLOT_WORDS
            address, count = mailbox[base], mailbox[base + 1]
            result = self.write_holding(address, mailbox[base + 2 : base + 2 + count])
            mailbox[base + 2 + HR_COUNT] = 0 if result is None else int(result)
            self._applied += 1

    def publish(self) -> None:
        """Write both tables to the shared image under the sequence lock."""
        with self._publish_lock:
            tables = self._images()
            image = self._image
            image[0] += 1  # odd: being written
            image[1 : 1 + HR_COUNT] = tables["h"]
            image[1 + HR_COUNT : _APPLIED] = tables["i"]
            image[_APPLIED] = self._applied
            image[0] += 1


def _kind(exc: BaseException) -> str:
    """How the parent re-raises ``exc``: ``ValueError`` for refused arguments, else an error."""
    return "ValueError" if isinstance(exc, ValueError) else type(exc).__name__


def _core_main(
    conn: Connection,
    image: Any,
    mailbox: Any,
    backend_factory: Callable[[], JointBackend],
    drive_kwargs: dict[str, Any],
) -> None:
    """The core process: build the drive, then answer the communication side's calls."""
    try:
        drive = _CoreDrive(image, mailbox, backend_factory(), **drive_kwargs)
        drive.publish()
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("raise", _kind(exc), str(exc)))
        return
    conn.send(("ok", None))
    handlers: dict[str, Callable[..., Any]] = {
        "drain": drive.drain,
        "write": drive.write_holding,
        "step": drive.step,
        "status": drive.status,
        "inject_fault": drive.inject_fault,
        "start_joint": drive.start_joint,
        "stop_joint": drive.stop_joint,
        "timing_summary": drive.timing.summary,
        "timing_reset": drive.timing.reset,
        "resyncs": lambda: drive.resyncs,
        "error": lambda: None if drive.error is None else repr(drive.error),
    }
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == "close":
            drive.stop_joint()
            conn.send(("ok", None))
            break
        try:
            reply = handlers[op](*args)
            if op in ("drain", "write", "inject_fault"):
                drive.publish()
        except Exception as exc:
            conn.send(("raise", _kind(exc), str(exc)))
        else:
            conn.send(("ok", reply))
    drive.stop_joint()


class _RemoteTiming:
    """The core's :class:`~.emulator.LoopTiming`, read through calls."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def summary(self) -> dict[str, Any]:
        """The core's joint-loop timing (``LoopTiming.summary``)."""
        return dict(self._call("timing_summary"))

    def reset(self) -> None:
        """Forget the ticks recorded so far."""
        self._call("timing_reset")


class DriveProcess(DriveModbus):
    """An emulated drive whose firmware and 1 kHz joint loop run in a process of their own.

    Args:
        backend_factory: builds the joint in the core process (picklable; a
            :class:`~twinloop.hw_bridge.emulators.drive.emulator.PendulumJoint` if ``None``).
        device_id: Modbus device id, 1–247.
        faults: the wire-fault switches of its servers (a new :class:`WireFaults` if ``None``).
        start_timeout_s: how long the core may take to start (it imports and warms the
            joint's compiled code), s.
        **drive_kwargs: the other arguments of
            :class:`~twinloop.hw_bridge.emulators.drive.emulator.DriveEmulator`
            (``rated_torque_nm``, ``watchdog_ms``, ``spin_s``, …), checked by the core.

    Close it with :meth:`close` (or ``with``); the core is a daemon process and also ends
    with this one (so it cannot be made from a daemonic process).

    Raises:
        ValueError: an argument the drive refuses (the message names it).
        EmulatorError: the core did not start (or the joint could not be built).

    """

    def __init__(
        self,
        backend_factory: Callable[[], JointBackend] | None = None,
        *,
        device_id: int = 1,
        faults: WireFaults | None = None,
        start_timeout_s: float = 60.0,
        **drive_kwargs: Any,
    ) -> None:
        self.device_id = device_id
        self.faults = faults if faults is not None else WireFaults()
        self._lock = threading.Lock()
        ctx = mp.get_context("spawn")
        self._image = ctx.RawArray("q", _IMAGE_WORDS)
        self._mailbox = ctx.RawArray("q", _MAILBOX_WORDS)
        self._posted = 0
        self._joint_running = False
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_core_main,
            args=(
                child,
                self._image,
                self._mailbox,
                backend_factory if backend_factory is not None else PendulumJoint,
                {"device_id": device_id, **drive_kwargs},
            ),
            name="drive-core",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._closed = False
        try:
            self._receive(start_timeout_s, "start")
        except BaseException:
            self.close()
            raise
        #: The core's joint-loop timing (``summary()``, ``reset()``).
        self.timing = _RemoteTiming(self._call)

    # -- calls into the core -------------------------------------------------------------------
    def _receive(self, timeout_s: float, op: str) -> Any:
        try:
            if not self._conn.poll(timeout_s):
                raise EmulatorError(f"drive core did not answer {op!r} within {timeout_s:g} s")
            status, *reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._ended() from None
        if status == "raise":
            kind, message = reply
            raise (ValueError if kind == "ValueError" else EmulatorError)(message)
        return reply[0]

    def _ended(self) -> EmulatorError:
        """The error for a core process that is gone (with its exit code)."""
        self._process.join(0.1)
        return EmulatorError(f"drive core process ended (exit code {self._process.exitcode})")

    def _call(self, op: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        with self._lock:
            return self._call_locked(op, *args, timeout_s=timeout_s)

    def _call_locked(self, op: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        if self._closed:
            raise EmulatorError("drive core is closed")
        try:
            self._conn.send((op, args))
        except (BrokenPipeError, OSError):
            raise self._ended() from None
        return self._receive(timeout_s, op)

    @property
    def alive(self) -> bool:
        """Whether the core process runs."""
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The core process's id."""
        return self._process.pid

    # -- the firmware, remotely ------------------------------------------------------------------
    def _images(self) -> dict[str, list[int]]:
        """The tables as the core last published them (sequence-locked copy)."""
        image = self._image
        while True:
            before = image[0]
            if not before & 1:
                words = image[1:_APPLIED]
                if image[0] == before:
                    return {"h": words[:HR_COUNT], "i": words[HR_COUNT:]}

    def write_holding(self, address: int, words: Sequence[int]) -> ExcCodes | None:
        """Check a write here, have the core apply it; 04 (device failure) if it cannot.

        With the joint loop running, the write goes through the shared mailbox and the joint
        thread applies it at its next tick (no other thread of the core runs Python meanwhile);
        this returns once the published tables show it. Otherwise it is a call into the core.
        """
        fields = check_holding_write(address, words)
        if isinstance(fields, ExcCodes):
            return fields
        try:
            with self._lock:
                if not self._joint_running:
                    self._posted_pending_writes()
                    result = self._call_locked("write", address, [int(w) for w in words])
                else:
                    result = self._post(address, [int(w) & 0xFFFF for w in words])
        except EmulatorError as exc:
            _log.error("drive: write refused: %s", exc)
            return ExcCodes.DEVICE_FAILURE
        return None if not result else ExcCodes(result)

    def _post(self, address: int, words: list[int]) -> int:
        """Post a write to the mailbox and wait until the tables show it; its result code."""
        mailbox, image = self._mailbox, self._image
        if not self._process.is_alive():
            raise self._ended()
        if self._posted - image[_APPLIED] >= _SLOTS:
            raise EmulatorError("drive core's mailbox is full (its joint loop does not run)")
        base = 1 + (self._posted % _SLOTS) * _SLOT_WORDS
        mailbox[base] = address
        mailbox[base + 1] = len(words)
        mailbox[base + 2 : base + 2 + len(words)] = words
        self._posted += 1
        mailbox[0] = self._posted  # after the slot: the joint thread reads the count first
        deadline = time.perf_counter() + CALL_TIMEOUT_S
        polls = 0
        while image[_APPLIED] < self._posted:
            polls += 1
            if polls % 40 == 0 and not self._process.is_alive():  # every ~2–4 ms
                raise self._ended()
            if time.perf_counter() > deadline:
                raise EmulatorError(f"drive core did not apply a write within {CALL_TIMEOUT_S} s")
            time.sleep(_POLL_S)
        return int(mailbox[base + 2 + HR_COUNT])

    def _posted_pending_writes(self) -> None:
        """Have the core apply what the mailbox still holds (before a call, in order)."""
        if self._image[_APPLIED] < self._posted:
            self._call_locked("drain")

    def step(self) -> None:
        """Run one drive tick in the core (with the joint loop stopped: deterministic tests)."""
        self._call("step")

    def status(self) -> DriveStatus:
        """A consistent snapshot of the drive (from the core)."""
        status: DriveStatus = self._call("status")
        return status

    @property
    def state(self) -> DriveState:
        """The power state now."""
        return self.status().state

    def inject_fault(self, error_code: int) -> None:
        """Raise a device fault with ``error_code`` in the core (transition 13)."""
        self._call("inject_fault", error_code)

    def start_joint(self) -> None:
        """Start the core's 1 kHz joint thread (idempotent)."""
        with self._lock:
            self._call_locked("start_joint")
            self._joint_running = True

    def stop_joint(self, timeout_s: float = 5.0) -> None:
        """Stop the core's joint thread (idempotent; nothing to do once the core is closed)."""
        with self._lock:
            if self._closed or not self._process.is_alive():
                return
            self._call_locked("stop_joint", timeout_s, timeout_s=timeout_s + CALL_TIMEOUT_S)
            self._joint_running = False
            self._posted_pending_writes()

    @property
    def resyncs(self) -> int:
        """Times the core's joint thread fell behind and resynchronised."""
        return int(self._call("resyncs"))

    @property
    def error(self) -> str | None:
        """What the core's joint backend raised (its ``repr``), or ``None``."""
        result = self._call("error")
        return None if result is None else str(result)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the joint loop and end the core process (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.send(("close", ()))
                if self._conn.poll(timeout_s):
                    self._conn.recv()
            except (EOFError, OSError):
                pass
            self._conn.close()
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout_s)

    def __enter__(self) -> DriveProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def knee_factory(
    preset: str = "moderate", *, seed: int = 0, task: str | None = None
) -> Callable[[], JointBackend]:
    """A picklable builder of :func:`~.emulator.knee_backend` for the core."""
    return functools.partial(knee_backend, preset, seed=seed, task=task)


def run_drive(
    *,
    host: str = "127.0.0.1",
    port: int = 5021,
    backend_factory: Callable[[], JointBackend] | None = None,
    joint_process: bool = True,
    stop_event: threading.Event | None = None,
    on_ready: Callable[[DriveServerThread], None] | None = None,
) -> dict[str, Any]:
    """Serve an emulated drive on Modbus TCP until ``stop_event`` is set (or Ctrl-C).

    Args:
        host: address to bind.
        port: TCP port (0 picks one; see ``on_ready``).
        backend_factory: builds the joint (a :class:`PendulumJoint` if ``None``); picklable
            when ``joint_process``.
        joint_process: run the firmware and its 1 kHz loop in a process of its own
            (:class:`DriveProcess`, the default), or in
            a thread of this one (:class:`~.emulator.DriveEmulator`).
        stop_event: set it from another thread to stop; ``None`` runs until interrupted.
        on_ready: called with the running server once it listens.

    Returns:
        The 1 kHz joint loop's timing over the session (:meth:`~.emulator.LoopTiming.summary`).

    Raises:
        ValueError: the joint refused its arguments.
        EmulatorError: the server could not start, or its thread ended unexpectedly.

    """
    factory = backend_factory if backend_factory is not None else PendulumJoint
    drive: DriveModbus = DriveProcess(factory) if joint_process else DriveEmulator(factory())
    stop = stop_event if stop_event is not None else threading.Event()
    try:
        with drive.start_tcp(host, port) as server:
            if on_ready is not None:
                on_ready(server)
            try:
                while not stop.wait(0.5):
                    if not server.alive:
                        raise EmulatorError("drive server thread ended unexpectedly")
            except KeyboardInterrupt:
                pass
            return drive.timing.summary()
    finally:
        close = getattr(drive, "close", None)
        if close is not None:
            close()
