"""Incremental recordings: flushed segments read back, finishing gives the usual files, and a
SIGKILLed ``twinloop run`` keeps what it flushed (at most one flush interval lost)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from twinloop.agents.glucose.report import build_report
from twinloop.agents.messages import CgmReading
from twinloop.agents.recording import (
    INCOMPLETE_MARKER,
    SEGMENTS_DIR,
    Recorder,
    check_flush_every_min,
    read_channel,
)
from twinloop.agents.report import IncompleteRunError

REPO = Path(__file__).resolve().parents[2]
CHANNEL = "sensor->controller"


def _record(recorder: Recorder, minutes: range, patients=("a", "b")) -> None:
    listeners = [recorder.listener(p) for p in patients]
    for t in minutes:
        for k, listen in enumerate(listeners):
            listen(CHANNEL, CgmReading(float(t), 100.0 + k))
        recorder.advance(float(t))


def test_flushes_write_closed_segments_that_read_back_in_patient_order(tmp_path):
    recorder = Recorder(tmp_path / "run", config={"x": 1}, flush_every_min=10)
    _record(recorder, range(35))
    segments = sorted((tmp_path / "run" / SEGMENTS_DIR / "sensor__controller").iterdir())
    assert [p.name for p in segments] == ["000000.parquet", "000001.parquet", "000002.parquet"]
    table = read_channel(tmp_path / "run", CHANNEL)
    assert table is not None
    patient = table.column("patient").to_pylist()
    t = np.asarray(table.column("t_min"))
    # flushed at minutes 10, 20, 30: minutes 0..30 of both patients; 31..34 not yet on disk
    assert patient == ["a"] * 31 + ["b"] * 31
    assert list(t[:31]) == list(range(31)) and list(t[31:]) == list(range(31))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["config"] == {"x": 1}
    assert manifest["recording"]["flushed_through_min"] == 30.0
    assert manifest["recording"]["segments"] == 3
    assert (tmp_path / "run" / INCOMPLETE_MARKER).exists()


@pytest.mark.parametrize("background", [False, True])
def test_finishing_writes_the_same_table_as_an_unflushed_recording(tmp_path, background):
    flushed = Recorder(tmp_path / "flushed", flush_every_min=7, background=background)
    plain = Recorder(tmp_path / "plain")
    _record(flushed, range(50))
    _record(plain, range(50))
    flushed.finish({"x": 1}, {})
    plain.finish({"x": 1}, {})
    name = "channels/sensor__controller.parquet"
    assert pq.read_table(tmp_path / "flushed" / name).equals(
        pq.read_table(tmp_path / "plain" / name)
    )
    assert not (tmp_path / "flushed" / SEGMENTS_DIR).exists()
    assert not (tmp_path / "flushed" / INCOMPLETE_MARKER).exists()
    assert json.loads((tmp_path / "flushed" / "manifest.json").read_text())["complete"] is True


def test_a_half_written_segment_is_not_read(tmp_path):
    recorder = Recorder(tmp_path / "run", flush_every_min=10)
    _record(recorder, range(15))
    folder = tmp_path / "run" / SEGMENTS_DIR / "sensor__controller"
    # what a kill in the middle of a flush leaves: a temporary name, never a segment's
    (folder / ".000001.parquet.tmp").write_bytes(b"PAR1 truncated")
    table = read_channel(tmp_path / "run", CHANNEL)
    assert table is not None and table.num_rows == 2 * 11


@pytest.mark.parametrize("value", [0, 1441, -5, 2.5, True, "ten", ""])
def test_flush_interval_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=r"1\.\.1440"):
        check_flush_every_min(value)


def test_flush_interval_in_range_is_accepted():
    assert check_flush_every_min("5") == 5 and check_flush_every_min(1440) == 1440


def _last_progress(stderr: str) -> int:
    """The last ``n/total`` of tqdm's bar (simulated minutes done, one patient)."""
    found = re.findall(r"(\d+)/\d+ \[", stderr)
    return int(found[-1]) if found else 0


@pytest.mark.slow
def test_a_sigkilled_run_keeps_what_it_flushed(tmp_path):
    out = tmp_path / "run"
    flush = 30
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twinloop", "run", "--patient", "adult#001", "--days", "2",
             "--placement", "inline", "--clock", "wall", "--time-scale", "0.003",
             "--flush-every-min", str(flush), "--out", str(out)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            folder = out / SEGMENTS_DIR / "plant__sensor"
            deadline = time.monotonic() + 90
            # wait for flushed data, not for a guessed time: the third segment on disk
            while not (folder / "000002.parquet").exists():
                assert proc.poll() is None, "the run ended before it flushed"
                assert time.monotonic() < deadline, "no segment was flushed"
                time.sleep(0.02)
            time.sleep(random.Random(19).uniform(0, flush * 0.003))  # anywhere in an interval
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    progress_min = _last_progress(err_path.read_text())
    assert progress_min > 0, "the progress bar showed no simulated minutes"
    table = read_channel(out, "plant->sensor")
    assert table is not None
    t = np.asarray(table.column("t_min"), dtype=np.float64)
    assert set(table.column("patient").to_pylist()) == {"adult#001"}
    assert np.all(np.diff(t) == 1.0)  # every minute, in order, from the start
    assert t[0] == 0.0 and t[-1] >= 2 * flush
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert (out / INCOMPLETE_MARKER).exists()
    assert manifest["recording"]["flush_every_min"] == flush
    assert t[-1] >= manifest["recording"]["flushed_through_min"] - 1
    # at most one flush interval behind what the bar last showed at the kill
    assert progress_min - t[-1] <= flush, (progress_min, t[-1])
    # the project's report refuses it as incomplete, and reads it when asked
    with pytest.raises(IncompleteRunError):
        build_report(out)
    report = build_report(out, allow_incomplete=True)
    assert report.complete is False
