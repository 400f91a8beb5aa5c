"""The emulated CGM on a pty pair, read by a LineTransport: sampling, noise, CAL, faults."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from twinloop.hw_bridge.emulators.cgm import CgmEmulator, serve_cgm
from twinloop.hw_bridge.emulators.patient import PatientMinute, VirtualPatient
from twinloop.hw_bridge.errors import CommunicationError
from twinloop.hw_bridge.line import (
    Ack,
    CgmFrame,
    CgmStatus,
    LineConfigError,
    LineTransport,
    Nak,
    NakReason,
)
from twinloop.hw_bridge.pty import PtyPair
from twinloop.hw_bridge.wire import char_time_s
from twinloop.plant.glucose.cgm import CGMSpec, cgm_errors

pytestmark = pytest.mark.hil

WALL_S_PER_SIM_MIN = 0.002  # one 5-min sample every 10 ms of wall time
BAUD = 115200  # a 40-byte frame takes 3.5 ms on the emulated wire
GUARD_S = 10.0  # hang guard for waits (not a speed check)
SEED = 3


@pytest.fixture(scope="module", autouse=True)
def compiled_plant() -> None:
    """Load the compiled plant once, so the first simulated minute is not late."""
    VirtualPatient().step_minute()


class Rig:
    """A patient, an emulator on one end of a pty pair and a transport on the other."""

    def __init__(self, **emulator_kwargs: object) -> None:
        self.pty = PtyPair()
        self.patient = VirtualPatient(seed=SEED, wall_s_per_sim_min=WALL_S_PER_SIM_MIN)
        self.truth: dict[int, float] = {0: self.patient.latest.gsub_mg_dl}
        self.patient.listeners.append(self._record)
        self.transport = LineTransport(self.pty.b, baudrate=BAUD, timeout_s=0.3, retries=1)
        self.emulator = CgmEmulator(
            self.patient,
            self.pty.a,
            seed=SEED,
            baudrate=BAUD,
            **emulator_kwargs,  # type: ignore[arg-type]
        )
        self.frames: list[CgmFrame] = []

    def _record(self, minute: PatientMinute) -> None:
        self.truth[minute.t_min] = minute.gsub_mg_dl

    def start(self) -> Rig:
        self.transport.open()
        self.emulator.start()
        self.patient.start()
        return self

    def close(self) -> None:
        self.patient.stop()
        self.emulator.stop()
        self.transport.close()
        self.pty.close()

    def until(self, done: Callable[[list[CgmFrame]], bool]) -> list[CgmFrame]:
        """Poll until ``done(frames received by this call)``; the frames are also kept."""
        got: list[CgmFrame] = []
        deadline = time.monotonic() + GUARD_S
        while not done(got):
            assert time.monotonic() < deadline, f"gave up waiting; got {got[-5:]}"
            got += self.transport.poll()
            time.sleep(0.002)
        self.frames += got
        return got

    def take(self, n: int) -> list[CgmFrame]:
        return self.until(lambda got: len(got) >= n)

    def after(self, seq: int, n: int) -> list[CgmFrame]:
        """The first ``n`` frames received with ``seq`` greater than ``seq``."""
        got = self.until(lambda got: sum(f.seq > seq for f in got) >= n)
        return [f for f in got if f.seq > seq][:n]

    def cut(self) -> int:
        """Seq of the last sample generated: later samples see faults set before this call."""
        frame = self.emulator.last_frame
        assert frame is not None
        return frame.seq


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**emulator_kwargs: object) -> Rig:
        rig = Rig(**emulator_kwargs)
        rigs.append(rig)
        return rig.start()

    yield make
    for rig in rigs:
        rig.close()
        assert rig.emulator.stats.internal_errors == 0


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


def readings(frames: list[CgmFrame]) -> np.ndarray:
    """Glucose of the frames, mg/dL (NaN where a frame carries none)."""
    return np.array([np.nan if f.glucose_mg_dl is None else f.glucose_mg_dl for f in frames])


def expected_readings(rig: Rig, frames: list[CgmFrame], offset_mg_dl: float = 0.0) -> np.ndarray:
    """What the seeded sensor model reads at these frames' minutes (insertion at minute 0)."""
    spec = rig.emulator.spec
    k = np.array([f.t_min // spec.sample_period_min for f in frames])
    rng = np.random.default_rng(np.random.SeedSequence(SEED).spawn(1)[0])
    errors = cgm_errors(spec, rng, int(k.max()) + 1)[k]
    gsub = np.array([rig.truth[f.t_min] for f in frames])
    return np.clip(gsub + errors + offset_mg_dl, 40.0, 400.0)


def test_one_frame_per_sample_period_with_consecutive_seq(rig: Rig) -> None:
    frames = rig.take(20)
    assert [f.seq for f in frames] == list(range(20))
    assert [f.t_min for f in frames] == [5 * i for i in range(20)]
    assert all(f.status is CgmStatus.OK for f in frames)
    assert rig.transport.stats.checksum_errors == rig.transport.stats.malformed == 0
    assert rig.transport.last_frame_monotonic is not None


def test_readings_track_gsub_within_noise(rig: Rig) -> None:
    frames = rig.take(40)
    gsub = np.array([rig.truth[f.t_min] for f in frames])
    # The seeded Breton-Kovatchev error of twinloop.plant.glucose.cgm, exactly (to the 0.1 mg/dL of
    # the wire):
    np.testing.assert_allclose(readings(frames), expected_readings(rig, frames), atol=0.051)
    # ... which is noise around the truth: not zero, not a bias, not wild.
    errors = readings(frames) - gsub
    assert np.std(errors) > 1.0
    assert abs(np.mean(errors)) < 20.0
    assert np.mean(np.abs(errors)) < 25.0


def test_same_seed_same_readings(make_rig: Callable[..., Rig]) -> None:
    first = [f.glucose_mg_dl for f in make_rig().take(10)]
    second = [f.glucose_mg_dl for f in make_rig().take(10)]
    assert first == second


def test_warmup_status(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(warmup_min=15)
    assert rig.transport.command("CAL", 120.0) == Nak("CAL", NakReason.NOT_READY)
    frames = rig.take(5)
    assert [f.status for f in frames] == [CgmStatus.WARMUP] * 3 + [CgmStatus.OK] * 2
    assert [f.glucose_mg_dl is None for f in frames] == [True] * 3 + [False] * 2


def test_commands(rig: Rig) -> None:
    rig.take(1)
    assert rig.transport.command("PING") == Ack("PING")
    assert rig.transport.command("SELFTEST") == Nak("SELFTEST", NakReason.UNKNOWN)
    assert rig.transport.command("PING", "x") == Nak("PING", NakReason.ARGUMENT)
    # identification: the wall seconds per simulated minute of the device's clock
    assert rig.transport.command("INFO") == Ack("INFO", f"{rig.patient.wall_s_per_sim_min:g}")
    assert rig.transport.command("INFO", "x") == Nak("INFO", NakReason.ARGUMENT)
    assert rig.transport.command("CAL") == Nak("CAL", NakReason.ARGUMENT)
    assert rig.transport.command("CAL", "abc") == Nak("CAL", NakReason.ARGUMENT)
    assert rig.transport.command("CAL", 20.0) == Nak("CAL", NakReason.RANGE)
    assert rig.emulator.offset_mg_dl == 0.0
    assert rig.emulator.stats.acks == 2 and rig.emulator.stats.naks == 6


def _latest_reading(rig: Rig) -> float:
    frame = rig.emulator.last_frame
    assert frame is not None and frame.glucose_mg_dl is not None
    return frame.glucose_mg_dl


def test_cal_shifts_readings(rig: Rig) -> None:
    rig.take(3)
    reference = round(_latest_reading(rig) * 1.15, 1)  # within 20 % of the sensor
    assert rig.transport.command("CAL", reference) == Ack("CAL")
    offset = rig.emulator.offset_mg_dl
    assert offset > 10.0
    frames = rig.after(rig.cut(), 8)
    np.testing.assert_allclose(readings(frames), expected_readings(rig, frames, offset), atol=0.051)
    gsub = np.array([rig.truth[f.t_min] for f in frames])
    assert np.mean(readings(frames) - gsub) > 10.0
    assert not rig.emulator.calibration_alarm


def test_cal_400_is_refused_alarmed_and_does_not_shift_readings(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.take(3)
    assert _latest_reading(rig) < 300.0  # the patient is far below 400 mg/dL
    with caplog.at_level("WARNING", logger="twinloop.hw_bridge.emulators.cgm"):
        assert rig.transport.command("CAL", 400.0) == Nak("CAL", NakReason.RANGE)
    assert rig.emulator.offset_mg_dl == 0.0
    assert rig.emulator.calibration_alarm
    assert rig.emulator.stats.calibrations_refused == 1
    assert any("calibration refused" in r.getMessage() for r in caplog.records)
    # the alarm on the line: no glucose, status CALIBRATION_REQUIRED, until a good CAL
    frames = rig.after(rig.cut(), 3)
    assert all(f.status is CgmStatus.CALIBRATION_REQUIRED for f in frames)
    assert all(f.glucose_mg_dl is None for f in frames)
    reference = _latest_raw(rig)
    assert rig.transport.command("CAL", reference) == Ack("CAL")
    assert not rig.emulator.calibration_alarm
    offset = rig.emulator.offset_mg_dl
    assert abs(offset) <= 0.05
    frames = rig.after(rig.cut(), 5)
    assert all(f.status is CgmStatus.OK for f in frames)
    np.testing.assert_allclose(readings(frames), expected_readings(rig, frames, offset), atol=0.051)


def _latest_raw(rig: Rig) -> float:
    """The sensor's own latest reading, to the 0.1 mg/dL a CAL carries (emulator internals)."""
    raw = rig.emulator._last_raw_mg_dl
    assert raw is not None
    return round(raw, 1)


@pytest.mark.parametrize(
    ("reference", "reason"),
    [(30.0, NakReason.RANGE), (450.0, NakReason.RANGE), ("2x", NakReason.RANGE)],
    ids=["below 40", "above 400", "twice the reading"],
)
def test_calibration_bounds(rig: Rig, reference: float | str, reason: NakReason) -> None:
    rig.take(2)
    value = min(2.0 * _latest_reading(rig), 399.0) if reference == "2x" else float(reference)
    assert rig.transport.command("CAL", value) == Nak("CAL", reason)
    assert rig.emulator.offset_mg_dl == 0.0
    assert rig.emulator.calibration_alarm
    assert rig.emulator.stats.calibrations_refused == 1


def test_calibrations_too_close_together_are_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(cal_interval_min=100_000)
    rig.take(2)
    assert rig.transport.command("CAL", _latest_raw(rig)) == Ack("CAL")
    assert rig.transport.command("CAL", _latest_raw(rig)) == Nak("CAL", NakReason.NOT_READY)
    assert rig.emulator.calibration_alarm
    assert rig.emulator.stats.calibrations_refused == 1
    with pytest.raises(LineConfigError):
        CgmEmulator(rig.patient, rig.pty.a, cal_interval_min=-1)


def test_sensor_error_fault(rig: Rig) -> None:
    rig.take(2)
    rig.emulator.faults.sensor_error(True)
    frames = rig.after(rig.cut(), 3)
    assert all(f.status is CgmStatus.SENSOR_ERROR and f.glucose_mg_dl is None for f in frames)
    assert rig.transport.command("CAL", 120.0) == Nak("CAL", NakReason.NOT_READY)
    rig.emulator.faults.sensor_error(False)
    frames = rig.after(rig.cut(), 2)
    assert all(f.status is CgmStatus.OK and f.glucose_mg_dl is not None for f in frames)


def test_calibration_required_fault_cleared_by_cal(rig: Rig) -> None:
    rig.take(2)
    rig.emulator.faults.calibration_required(True)
    frames = rig.after(rig.cut(), 2)
    assert all(f.status is CgmStatus.CALIBRATION_REQUIRED for f in frames)
    assert rig.transport.command("CAL", _latest_raw(rig)) == Ack("CAL")
    frames = rig.after(rig.cut(), 2)
    assert all(f.status is CgmStatus.OK for f in frames)


def test_freeze_fault_repeats_last_value(rig: Rig) -> None:
    rig.take(3)
    rig.emulator.faults.freeze(True)
    frozen = rig.emulator.last_frame
    assert frozen is not None and frozen.glucose_mg_dl is not None
    frames = rig.after(frozen.seq, 6)
    assert {f.glucose_mg_dl for f in frames} == {frozen.glucose_mg_dl}
    assert [f.t_min for f in frames] == [frozen.t_min + 5 * i for i in range(1, 7)]
    rig.emulator.faults.freeze(False)
    frames = rig.after(rig.cut(), 6)
    assert len({f.glucose_mg_dl for f in frames}) > 1


def test_corrupt_checksum_fault(rig: Rig) -> None:
    rig.take(2)
    rig.emulator.faults.corrupt_checksum(True)
    cut = rig.cut()
    before = rig.transport.stats.checksum_errors
    got = rig.until(lambda _got: rig.transport.stats.checksum_errors >= before + 5)
    assert [f for f in got if f.seq > cut] == []
    rig.emulator.faults.corrupt_checksum(False)
    assert len(rig.after(rig.cut(), 2)) == 2


def test_stop_sending_fault(rig: Rig) -> None:
    rig.take(2)
    rig.emulator.faults.stop_sending(True)
    cut = rig.cut()
    got = rig.until(lambda _got: rig.emulator.stats.suppressed >= 5)
    assert [f for f in got if f.seq > cut] == []
    with pytest.raises(CommunicationError):
        rig.transport.command("PING")
    rig.emulator.faults.stop_sending(False)
    (frame,) = rig.after(cut, 1)
    assert frame.seq > cut + 5  # samples kept being taken while silent: the host sees a gap


def test_delay_fault(rig: Rig) -> None:
    rig.take(1)
    rig.emulator.faults.delay_s(60.0)
    with pytest.raises(CommunicationError):
        rig.transport.command("PING")
    rig.emulator.faults.delay_s(0.0)
    assert rig.transport.command("PING") == Ack("PING")
    with pytest.raises(LineConfigError):
        rig.emulator.faults.delay_s(-1.0)


def test_disconnect_fault_and_reconnect(rig: Rig) -> None:
    rig.take(2)
    rig.emulator.faults.disconnect()
    assert not rig.emulator.connected
    cut = rig.cut()
    got = rig.until(lambda _got: rig.emulator.stats.dropped >= 3)
    assert [f for f in got if f.seq > cut] == []
    assert rig.transport.connected  # the pty pair itself is still there
    rig.emulator.faults.reconnect()
    assert rig.emulator.connected
    assert len(rig.after(rig.cut(), 2)) == 2
    assert rig.transport.command("PING") == Ack("PING")


def test_pulling_the_cable(rig: Rig) -> None:
    rig.take(2)
    rig.pty.close()
    rig.until(lambda _got: not rig.transport.connected)
    for _ in range(10):
        assert rig.transport.poll() == []
        assert not rig.transport.connected
    with pytest.raises(CommunicationError):
        rig.transport.command("PING")
    assert rig.transport.stats.disconnects == 1
    assert rig.patient.t_min > 0 and rig.emulator.running  # the device side survives


def test_writes_are_paced_by_wire_time() -> None:
    # Lower bounds only: a busy machine can make gaps longer, never shorter.
    sent: list[tuple[float, int]] = []
    patient = VirtualPatient(seed=SEED)
    with PtyPair() as pty:

        def trace(sending: bool, data: bytes) -> None:
            if sending:
                sent.append((time.monotonic(), len(data)))

        emulator = CgmEmulator(patient, pty.a, baudrate=9600, trace=trace)
        with LineTransport(pty.b) as transport, emulator:  # host first: open() flushes input
            for _ in range(20):  # 4 more samples queued at once
                patient.step_minute()
            frames: list[CgmFrame] = []
            deadline = time.monotonic() + GUARD_S
            while len(frames) < 5 and time.monotonic() < deadline:
                frames += transport.poll()
                time.sleep(0.005)
    assert len(frames) == 5
    char_s = char_time_s(9600, parity="N")
    assert len(sent) == 5
    for (t0, n0), (t1, _) in itertools.pairwise(sent):
        assert t1 - t0 >= 0.95 * n0 * char_s


def test_serve_cgm_until_stopped() -> None:
    stop = threading.Event()
    with PtyPair() as pty, LineTransport(pty.b) as transport:
        thread = threading.Thread(
            target=serve_cgm,
            args=(pty.a,),
            kwargs={"wall_s_per_sim_min": WALL_S_PER_SIM_MIN, "baudrate": BAUD, "stop_event": stop},
        )
        thread.start()
        try:
            frames: list[CgmFrame] = []
            deadline = time.monotonic() + GUARD_S
            while len(frames) < 3 and time.monotonic() < deadline:
                frames += transport.poll()
                time.sleep(0.005)
            assert [f.seq for f in frames[:3]] == [0, 1, 2]
        finally:
            stop.set()
            thread.join(timeout=GUARD_S)
        assert not thread.is_alive()


def test_emulator_rejects_bad_settings() -> None:
    patient = VirtualPatient()
    with pytest.raises(LineConfigError):
        CgmEmulator(patient, "loop://", warmup_min=-1)
    with pytest.raises(LineConfigError):
        CgmEmulator(patient, "loop://", baudrate=0)
    with pytest.raises(LineConfigError):
        CgmEmulator(patient, "loop://", spec=CGMSpec(min_mg_dl=401.0, max_mg_dl=500.0))
    with pytest.raises(CommunicationError):
        CgmEmulator(patient, "/nonexistent/twinloop-tty").start()
