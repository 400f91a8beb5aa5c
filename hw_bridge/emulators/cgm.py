"""Emulated CGM: a virtual patient's glucose through the CGM noise model, sent over serial.

:class:`CgmEmulator` opens one end of a serial line (typically a pty of
:class:`twinloop.hw_bridge.pty.PtyPair`) with pyserial and speaks the CGM line protocol of
``hw_bridge/DEVICES.md``:

* every sample period (``spec.sample_period_min`` simulated minutes, counted from the minute
  the emulator was started, the *insertion*) it writes one ``$TLCGM`` frame with the reading of
  :class:`twinloop.plant.glucose.cgm.CGMSensor` (seeded noise) of the patient's subcutaneous glucose
  plus the calibration offset, clipped to 39-400 mg/dL and the sensor's range, one decimal;
* a reader thread answers host commands: ``PING`` → ``ACK``; ``CAL,<mg_dl>`` sets the offset
  so that the latest reading would have read ``mg_dl`` → ``ACK``, within bounds: the reference
  must be plausible (:data:`CAL_MIN_MG_DL`-:data:`CAL_MAX_MG_DL`, else ``NAK,RANGE``), differ
  from the sensor's own uncalibrated reading by at most 20 mg/dL or 20 % of it, whichever is
  larger (else ``NAK,RANGE``), and come at least ``cal_interval_min`` simulated minutes (30) after
  the last accepted calibration (else ``NAK,NOT_READY``). A calibration refused by these bounds
  raises the *calibration alarm* (:attr:`CgmEmulator.calibration_alarm`, logged at WARNING,
  counted in ``stats.calibrations_refused``): the offset is unchanged and samples carry status
  CALIBRATION_REQUIRED with no glucose until an accepted ``CAL``; a bad checksum, an unknown
  command or bad arguments → ``NAK`` (see :class:`twinloop.hw_bridge.line.NakReason`); lines that
  are not frames are ignored. Nothing the host sends stops the device.

Wire time is emulated: a pty moves bytes instantly, so a transmit thread writes one frame, then
keeps the line busy for ``len(frame) · char_time_s(...)`` seconds before the next write. The
patient's thread only queues frames and never waits for the wire.

Fault hooks (:class:`CgmFaults`, ``emulator.faults``) let a fault injector make the sensor
report errors, freeze, go silent, corrupt checksums, answer late, or drop off the line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import serial

from twinloop.hw_bridge.emulators.patient import PatientMinute, VirtualPatient
from twinloop.hw_bridge.errors import CommunicationError
from twinloop.hw_bridge.line import (
    GLUCOSE_MAX_MG_DL,
    GLUCOSE_MIN_MG_DL,
    MAX_COMMAND_NAME,
    SEQ_MODULO,
    TALKER_CMD,
    Ack,
    CgmFrame,
    CgmStatus,
    Frame,
    FrameError,
    FrameErrorKind,
    FrameParser,
    LineConfigError,
    Nak,
    NakReason,
    TraceCallback,
    check_serial_settings,
    checksum,
)
from twinloop.hw_bridge.wire import char_time_s
from twinloop.plant.glucose.cgm import CGMSensor, CGMSpec

__all__ = [
    "CAL_MAX_CHANGE_FRACTION",
    "CAL_MAX_CHANGE_MG_DL",
    "CAL_MAX_MG_DL",
    "CAL_MIN_INTERVAL_MIN",
    "CAL_MIN_MG_DL",
    "CgmEmulator",
    "CgmEmulatorStats",
    "CgmFaultState",
    "CgmFaults",
    "serve_cgm",
]

_log = logging.getLogger(__name__)

_IO_ERRORS = (serial.SerialException, OSError)
_READ_TIMEOUT_S = 0.05  # reader thread: longest blocking read, bounds stop()/disconnect()
_READ_CHUNK = 4096
_NUMBER_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3})?")

#: Plausible fingerstick reference for ``CAL``, mg/dL (what CGMs accept: 40-400).
CAL_MIN_MG_DL = 40.0
CAL_MAX_MG_DL = 400.0
#: Largest accepted difference between the reference and the sensor's own (uncalibrated)
#: reading: the larger of this many mg/dL and :data:`CAL_MAX_CHANGE_FRACTION` of the reading.
CAL_MAX_CHANGE_MG_DL = 20.0
CAL_MAX_CHANGE_FRACTION = 0.2
#: Default shortest time between two accepted calibrations, simulated minutes.
CAL_MIN_INTERVAL_MIN = 30


@dataclasses.dataclass(slots=True)
class CgmEmulatorStats:
    """Counters of a :class:`CgmEmulator`.

    Attributes:
        samples: ``$TLCGM`` frames generated (one per sample period, ``seq`` advances for each).
        frames_sent: ``$TLCGM`` frames written to the port.
        replies_sent: ``$TLACK``/``$TLNAK`` frames written to the port.
        suppressed: frames not queued because of the ``stop_sending`` fault.
        dropped: frames lost: transmit queue full, port closed, or write timed out.
        frames_received: lines with a valid checksum received from the host.
        acks: commands accepted.
        naks: commands refused (including bad checksums).
        ignored: received lines that were not frames (malformed, truncated, overlong).
        bytes_discarded: received bytes that were not part of a valid frame.
        io_errors: read/write errors that closed the port.
        calibrations_refused: ``CAL`` commands refused by the calibration bounds (each raises
            the calibration alarm).
        internal_errors: unexpected exceptions caught to keep the device running (0 unless
            there is a bug).

    """

    samples: int = 0
    frames_sent: int = 0
    replies_sent: int = 0
    suppressed: int = 0
    dropped: int = 0
    frames_received: int = 0
    acks: int = 0
    naks: int = 0
    ignored: int = 0
    bytes_discarded: int = 0
    io_errors: int = 0
    internal_errors: int = 0
    calibrations_refused: int = 0


@dataclasses.dataclass(slots=True)
class CgmFaultState:
    """The faults active now (all off by default). Set them through :class:`CgmFaults`.

    Attributes:
        sensor_error: samples carry status SENSOR_ERROR and no glucose.
        calibration_required: samples carry status CALIBRATION_REQUIRED (a CAL clears it).
        freeze: samples repeat the last glucose reported (``seq`` and ``t_min`` advance).
        stop_sending: nothing is written (samples and answers); ``seq`` keeps advancing, so
            the host sees a gap when sending resumes.
        corrupt_checksum: every frame written has a wrong checksum.
        delay_s: every frame is written this many seconds after it was generated.

    """

    sensor_error: bool = False
    calibration_required: bool = False
    freeze: bool = False
    stop_sending: bool = False
    corrupt_checksum: bool = False
    delay_s: float = 0.0


class CgmFaults:
    """Fault hooks of one :class:`CgmEmulator` (``emulator.faults``); safe from any thread.

    Args:
        disconnect: called by :meth:`disconnect` (closes the emulator's port).
        reconnect: called by :meth:`reconnect` (reopens it).

    """

    def __init__(self, *, disconnect: Callable[[], None], reconnect: Callable[[], None]) -> None:
        self.state = CgmFaultState()
        self._disconnect = disconnect
        self._reconnect = reconnect

    def sensor_error(self, on: bool = True) -> None:
        """Report SENSOR_ERROR (no glucose) in the following samples while ``on``."""
        self.state.sensor_error = bool(on)

    def calibration_required(self, on: bool = True) -> None:
        """Report CALIBRATION_REQUIRED in the following samples until ``off`` or a CAL."""
        self.state.calibration_required = bool(on)

    def freeze(self, on: bool = True) -> None:
        """Repeat the last glucose reported in the following samples while ``on``."""
        self.state.freeze = bool(on)

    def stop_sending(self, on: bool = True) -> None:
        """Write nothing (samples and answers) while ``on``."""
        self.state.stop_sending = bool(on)

    def corrupt_checksum(self, on: bool = True) -> None:
        """Write every following frame with a wrong checksum while ``on``."""
        self.state.corrupt_checksum = bool(on)

    def delay_s(self, seconds: float) -> None:
        """Write every frame ``seconds`` after it was generated (0 removes the delay).

        Raises:
            LineConfigError: ``seconds`` negative or not finite.

        """
        if isinstance(seconds, bool) or not (
            isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0
        ):
            raise LineConfigError("delay_s", seconds, "a finite number >= 0 (seconds)")
        self.state.delay_s = float(seconds)

    def disconnect(self) -> None:
        """Close the emulator's port (the cable is pulled on the device side)."""
        self._disconnect()

    def reconnect(self) -> None:
        """Reopen the emulator's port after :meth:`disconnect` or an I/O error.

        Raises:
            CommunicationError: the port cannot be opened (e.g. the pty pair is gone).

        """
        self._reconnect()

    def clear(self) -> None:
        """Turn every fault off and remove the delay (does not reconnect)."""
        self.state = CgmFaultState()


class CgmEmulator:
    """A CGM on a serial line, measuring one :class:`VirtualPatient`.

    Args:
        patient: the plant; the emulator subscribes to its simulated minutes.
        port: device path (e.g. ``PtyPair().a``) or pyserial URL of the device's end.
        spec: the sensor (sample period, noise, range); default ``CGMSpec()`` (5 min).
        seed: seed of the sensor noise (the first child of ``SeedSequence(seed)``, so it does
            not replay the patient's meal draws for the same seed).
        baudrate: bits per second (paces the writes, see
            :func:`twinloop.hw_bridge.wire.char_time_s`).
        bytesize: data bits (5-8).
        parity: ``N``, ``E``, ``O``, ``M`` or ``S``.
        stopbits: 1, 1.5 or 2.
        warmup_min: simulated minutes after insertion during which samples carry WARMUP.
        queue_frames: frames waiting for the wire at most; more are dropped (counted).
        write_timeout_s: seconds a write may block (a host that does not read) before the
            frame is dropped.
        trace: optional ``trace(sending, data)`` called with every chunk written and read,
            in the emulator's threads; must not raise.
        cal_interval_min: shortest time between two accepted calibrations, simulated minutes
            (>= 0; default :data:`CAL_MIN_INTERVAL_MIN`).

    Raises:
        LineConfigError: a serial setting or argument outside what is allowed.

    """

    def __init__(
        self,
        patient: VirtualPatient,
        port: str,
        *,
        spec: CGMSpec | None = None,
        seed: int = 0,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        warmup_min: int = 0,
        queue_frames: int = 256,
        write_timeout_s: float = 1.0,
        trace: TraceCallback | None = None,
        cal_interval_min: int = CAL_MIN_INTERVAL_MIN,
    ) -> None:
        check_serial_settings(baudrate, bytesize, parity, stopbits)
        if (
            isinstance(cal_interval_min, bool)
            or not isinstance(cal_interval_min, int)
            or not 0 <= cal_interval_min <= 100_000
        ):
            raise LineConfigError(
                "cal_interval_min", cal_interval_min, "an int in 0..100000 (simulated minutes)"
            )
        self.cal_interval_min = cal_interval_min
        self._char_s = char_time_s(baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits)
        if isinstance(warmup_min, bool) or not isinstance(warmup_min, int) or warmup_min < 0:
            raise LineConfigError("warmup_min", warmup_min, "an int >= 0 (simulated minutes)")
        if isinstance(queue_frames, bool) or not isinstance(queue_frames, int) or queue_frames < 1:
            raise LineConfigError("queue_frames", queue_frames, "an int >= 1")
        if not (isinstance(write_timeout_s, int | float) and write_timeout_s > 0):
            raise LineConfigError("write_timeout_s", write_timeout_s, "a number > 0 (seconds)")
        self.spec = spec if spec is not None else CGMSpec()
        self._lo = max(self.spec.min_mg_dl, GLUCOSE_MIN_MG_DL)
        self._hi = min(self.spec.max_mg_dl, GLUCOSE_MAX_MG_DL)
        if not self._lo < self._hi:
            raise LineConfigError(
                "spec", self.spec, f"a range overlapping {GLUCOSE_MIN_MG_DL}-{GLUCOSE_MAX_MG_DL}"
            )
        self.patient = patient
        self.port = port
        self.warmup_min = warmup_min
        self.trace = trace
        self._settings: dict[str, Any] = {
            "baudrate": baudrate,
            "bytesize": bytesize,
            "parity": parity,
            "stopbits": stopbits,
        }
        self._write_timeout_s = float(write_timeout_s)
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        self._sensor = CGMSensor(self.spec, rng)
        self.stats = CgmEmulatorStats()
        self.faults = CgmFaults(disconnect=self._disconnect, reconnect=self._reconnect)
        self._parser = FrameParser()
        self._txq: queue.Queue[tuple[float, bytes, bool]] = queue.Queue(maxsize=queue_frames)
        # _lock: sample state (seq, offset, last values); _rx_lock/_tx_lock: the port, always
        # taken in the order _rx_lock then _tx_lock.
        self._lock = threading.RLock()
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._serial: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = False
        self._insertion_t_min: int | None = None
        self._last_t_min = -1
        self._seq = 0
        self._offset_mg_dl = 0.0
        self._last_cal_t_min: int | None = None
        self._calibration_alarm = False
        self._last_raw_mg_dl: float | None = None
        self._last_glucose_mg_dl: float | None = None
        self._warming_up = warmup_min > 0
        self._last_frame: CgmFrame | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the emulator's port is open."""
        return self._serial is not None

    @property
    def running(self) -> bool:
        """Whether the emulator is started."""
        return self._running

    @property
    def offset_mg_dl(self) -> float:
        """Calibration offset added to the sensor model's reading, mg/dL (set by CAL)."""
        with self._lock:
            return self._offset_mg_dl

    @property
    def calibration_alarm(self) -> bool:
        """Whether a refused calibration raised the alarm (cleared by an accepted ``CAL``).

        While it is raised, samples carry status CALIBRATION_REQUIRED and no glucose.
        """
        with self._lock:
            return self._calibration_alarm

    @property
    def last_frame(self) -> CgmFrame | None:
        """The last sample generated (whether or not it was written)."""
        with self._lock:
            return self._last_frame

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the port, start the threads, subscribe to the patient and send a first sample.

        The first start fixes the insertion minute (the patient's current minute); samples
        follow every ``spec.sample_period_min`` minutes after it. A no-op when running.

        Raises:
            CommunicationError: the port cannot be opened.

        """
        with self._lock:
            if self._running:
                return
            self._open()
            self._stop.clear()
            self._threads = [
                threading.Thread(target=self._tx_loop, name="cgm-emulator-tx", daemon=True),
                threading.Thread(target=self._rx_loop, name="cgm-emulator-rx", daemon=True),
            ]
            for thread in self._threads:
                thread.start()
            self._running = True
            self.patient.listeners.append(self._on_minute)
            latest = self.patient.latest
            if self._insertion_t_min is None:
                self._insertion_t_min = latest.t_min
            self._on_minute(latest)

    def stop(self) -> None:
        """Unsubscribe, stop the threads and close the port (idempotent)."""
        with self._lock:
            self._running = False
            if self._on_minute in self.patient.listeners:
                self.patient.listeners.remove(self._on_minute)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self._close()
        while True:  # frames still queued are lost with the device
            try:
                self._txq.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> CgmEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- port ---------------------------------------------------------------------------------

    def _open(self) -> None:
        with self._rx_lock, self._tx_lock:
            if self._serial is not None:
                return
            try:
                port = serial.serial_for_url(self.port, do_not_open=True, **self._settings)
                port.timeout = _READ_TIMEOUT_S
                port.write_timeout = self._write_timeout_s
                port.open()
            except _IO_ERRORS as exc:
                raise CommunicationError(f"{self.port}: cannot open: {exc}") from exc
            self._parser.reset()
            self._serial = port

    def _close(self) -> None:
        with self._rx_lock, self._tx_lock:
            port, self._serial = self._serial, None
        if port is not None:
            try:
                port.close()
            except _IO_ERRORS as exc:
                _log.debug("%s: close failed: %s", self.port, exc)

    def _disconnect(self) -> None:
        _log.info("%s: fault: disconnect", self.port)
        self._close()

    def _reconnect(self) -> None:
        _log.info("%s: fault: reconnect", self.port)
        self._open()

    def _port_lost(self, exc: BaseException) -> None:
        _log.warning("%s: I/O error, port closed: %s", self.port, exc)
        self.stats.io_errors += 1
        self._close()

    # -- samples (patient thread) -------------------------------------------------------------

    def _on_minute(self, minute: PatientMinute) -> None:
        """Listener of the patient: sample when a sample is due. Never raises."""
        try:
            with self._lock:
                if not self._running or minute.t_min <= self._last_t_min:
                    return
                if self._insertion_t_min is None:  # start() sets it before releasing _lock
                    return
                self._last_t_min = minute.t_min
                since_insertion = minute.t_min - self._insertion_t_min
                if since_insertion % self.spec.sample_period_min != 0:
                    return
                self._sample(minute, since_insertion)
        except Exception:  # a device keeps running; counted so tests see it
            self.stats.internal_errors += 1
            _log.exception("%s: sample at minute %d failed", self.port, minute.t_min)

    def _sample(self, minute: PatientMinute, since_insertion: int) -> None:
        raw: float | None = None
        if math.isfinite(minute.gsub_mg_dl):
            raw = self._sensor.read(float(since_insertion), minute.gsub_mg_dl)
        if raw is not None:
            self._last_raw_mg_dl = raw
        faults = self.faults.state
        self._warming_up = since_insertion < self.warmup_min
        glucose: float | None = None
        if self._warming_up:
            status = CgmStatus.WARMUP
        elif faults.sensor_error or raw is None:
            status = CgmStatus.SENSOR_ERROR
        elif faults.calibration_required or self._calibration_alarm:
            status = CgmStatus.CALIBRATION_REQUIRED
        else:
            status = CgmStatus.OK
            if faults.freeze and self._last_glucose_mg_dl is not None:
                glucose = self._last_glucose_mg_dl
            else:
                glucose = min(max(raw + self._offset_mg_dl, self._lo), self._hi)
        frame = CgmFrame(self._seq, minute.t_min, glucose, status)
        if frame.glucose_mg_dl is not None:
            self._last_glucose_mg_dl = frame.glucose_mg_dl
        self._seq = (self._seq + 1) % SEQ_MODULO
        self._last_frame = frame
        self.stats.samples += 1
        self._emit(frame.encode(), sample=True)

    # -- transmit -----------------------------------------------------------------------------

    def _emit(self, data: bytes, *, sample: bool) -> None:
        """Queue one frame for the wire, applying the send-side faults."""
        faults = self.faults.state
        if faults.stop_sending:
            self.stats.suppressed += 1
            return
        if faults.corrupt_checksum:
            body = data[1:-5]
            data = b"$%s*%02X\r\n" % (body, checksum(body) ^ 0xFF)
        try:
            self._txq.put_nowait((time.monotonic(), data, sample))
        except queue.Full:
            self.stats.dropped += 1

    def _tx_loop(self) -> None:
        line_free_at = 0.0  # monotonic time when the previous frame has left the wire
        while not self._stop.is_set():
            try:
                queued_at, data, sample = self._txq.get(timeout=_READ_TIMEOUT_S)
            except queue.Empty:
                continue
            while True:  # the delay fault is read while waiting, so changing it takes effect
                wait = max(queued_at + self.faults.state.delay_s, line_free_at) - time.monotonic()
                if wait <= 0:
                    break
                if self._stop.wait(min(wait, _READ_TIMEOUT_S)):
                    return
            started = time.monotonic()
            if self._write(data):
                if sample:
                    self.stats.frames_sent += 1
                else:
                    self.stats.replies_sent += 1
            line_free_at = started + len(data) * self._char_s

    def _write(self, data: bytes) -> bool:
        lost: BaseException | None = None
        with self._tx_lock:
            port = self._serial
            if port is None:
                self.stats.dropped += 1
                return False
            try:
                port.write(data)
            except serial.SerialTimeoutException:  # the host does not read: drop, stay open
                self.stats.dropped += 1
                return False
            except _IO_ERRORS as exc:
                lost = exc
        if lost is not None:
            self.stats.dropped += 1
            self._port_lost(lost)
            return False
        if self.trace is not None:
            self.trace(True, data)
        return True

    # -- receive ------------------------------------------------------------------------------

    def _rx_loop(self) -> None:
        while not self._stop.is_set():
            data = b""
            lost: BaseException | None = None
            with self._rx_lock:
                port = self._serial
                if port is not None:
                    try:
                        data = port.read(max(1, min(int(port.in_waiting), _READ_CHUNK)))
                    except _IO_ERRORS as exc:
                        lost = exc
            if port is None:
                self._stop.wait(_READ_TIMEOUT_S)
            elif lost is not None:
                self._port_lost(lost)
            elif data:
                if self.trace is not None:
                    self.trace(False, bytes(data))
                try:
                    self._receive(data)
                except Exception:  # a device keeps running; counted so tests see it
                    self.stats.internal_errors += 1
                    _log.exception("%s: handling %r failed", self.port, data)

    def _receive(self, data: bytes) -> None:
        for item in self._parser.feed(data):
            if isinstance(item, FrameError):
                if item.kind is FrameErrorKind.CHECKSUM and item.fields is not None:
                    self._reply(Nak(_echo_name(item.fields), NakReason.CHECKSUM))
                else:
                    self.stats.ignored += 1
            else:
                self.stats.frames_received += 1
                self._reply(self._answer(item))
        self.stats.bytes_discarded = self._parser.bytes_discarded

    def _answer(self, frame: Frame) -> Ack | Nak:
        fields = frame.fields
        name = _echo_name(fields)
        if fields[0] != TALKER_CMD or len(fields) < 2:
            return Nak(name, NakReason.UNKNOWN)
        args = fields[2:]
        if fields[1] == "PING":
            return Ack(name) if not args else Nak(name, NakReason.ARGUMENT)
        if fields[1] == "CAL":
            return self._calibrate(name, args)
        if fields[1] == "INFO":  # identification: the wall seconds per simulated minute
            if args:
                return Nak(name, NakReason.ARGUMENT)
            return Ack(name, f"{self.patient.wall_s_per_sim_min:.6g}")
        return Nak(name, NakReason.UNKNOWN)

    def _calibrate(self, name: str, args: tuple[str, ...]) -> Ack | Nak:
        if len(args) != 1 or _NUMBER_RE.fullmatch(args[0]) is None:
            return Nak(name, NakReason.ARGUMENT)
        reference_mg_dl = float(args[0])
        with self._lock:
            if not CAL_MIN_MG_DL <= reference_mg_dl <= CAL_MAX_MG_DL:
                return self._refuse_calibration(
                    name,
                    NakReason.RANGE,
                    f"CAL,{reference_mg_dl:g} outside the plausible "
                    f"{CAL_MIN_MG_DL:g}-{CAL_MAX_MG_DL:g} mg/dL",
                )
            raw = self._last_raw_mg_dl
            if raw is None or self._warming_up or self.faults.state.sensor_error:
                return Nak(name, NakReason.NOT_READY)
            now = self._last_t_min
            if (
                self._last_cal_t_min is not None
                and now - self._last_cal_t_min < self.cal_interval_min
            ):
                return self._refuse_calibration(
                    name,
                    NakReason.NOT_READY,
                    f"CAL,{reference_mg_dl:g} {now - self._last_cal_t_min} min after the last "
                    f"one (at least {self.cal_interval_min} min apart)",
                )
            max_change = max(CAL_MAX_CHANGE_MG_DL, CAL_MAX_CHANGE_FRACTION * raw)
            if abs(reference_mg_dl - raw) > max_change:
                return self._refuse_calibration(
                    name,
                    NakReason.RANGE,
                    f"CAL,{reference_mg_dl:g} differs from the sensor's {raw:.1f} mg/dL by more "
                    f"than {max_change:.1f} mg/dL",
                )
            self._offset_mg_dl = reference_mg_dl - raw
            self._last_cal_t_min = now
            self._calibration_alarm = False
            self.faults.state.calibration_required = False
        return Ack(name)

    def _refuse_calibration(self, name: str, reason: NakReason, why: str) -> Nak:
        """Refuse a calibration by its bounds: NAK, count, log, raise the calibration alarm."""
        self._calibration_alarm = True
        self.stats.calibrations_refused += 1
        _log.warning("%s: calibration refused, alarm raised: %s", self.port, why)
        return Nak(name, reason)

    def _reply(self, reply: Ack | Nak) -> None:
        if isinstance(reply, Ack):
            self.stats.acks += 1
        else:
            self.stats.naks += 1
        self._emit(reply.encode(), sample=False)


def _echo_name(fields: tuple[str, ...]) -> str:
    """The name echoed in an answer: the command name, or the talker of another frame."""
    name = fields[1] if fields[0] == TALKER_CMD and len(fields) > 1 else fields[0]
    return name[:MAX_COMMAND_NAME]


def serve_cgm(
    port: str,
    *,
    patient: str = "adult#001",
    seed: int = 0,
    wall_s_per_sim_min: float = 60.0,
    baudrate: int = 9600,
    stop_event: threading.Event | None = None,
) -> None:
    """Run an emulated CGM on ``port`` until ``stop_event`` is set (or Ctrl-C).

    Backs ``twinloop emulate cgm --serial PORT``: one :class:`VirtualPatient` living on the wall
    clock and one :class:`CgmEmulator` measuring it.

    Args:
        port: device path or pyserial URL of the device's end of the line.
        patient: patient name (e.g. ``adult#001``).
        seed: seed of the patient's meals and of the sensor noise.
        wall_s_per_sim_min: wall seconds per simulated minute (60 = real time).
        baudrate: bits per second, 8N1.
        stop_event: set it to stop; None runs until KeyboardInterrupt.

    Raises:
        CommunicationError: the port cannot be opened.

    """
    stop = stop_event if stop_event is not None else threading.Event()
    plant = VirtualPatient(patient, seed=seed, wall_s_per_sim_min=wall_s_per_sim_min)
    with CgmEmulator(plant, port, seed=seed, baudrate=baudrate):
        plant.start()
        try:
            while not stop.wait(0.2):
                pass
        finally:
            plant.stop()
