"""Recording a run: every channel to Parquet, a manifest, and summary metrics as JSON.

Layout of a finished run directory::

    RUN_DIR/
      manifest.json          configuration, seed, versions, git revision, wall time, complete
      summary.json           clinical metrics per patient and per cohort
      channels/<edge>.parquet  one table per channel (``plant->sensor`` is ``plant__sensor``),
                             one row per message: ``patient``, then the message's fields

**Incremental recording.** While a run goes on, :meth:`Recorder.flush` (called by the loops
every ``flush_every_min`` simulated minutes, :data:`FLUSH_EVERY_MIN_RANGE`) writes the rows
recorded since the previous flush as one closed Parquet file per channel,
``segments/<edge>/<n>.parquet`` (written under a temporary name, then renamed: a segment is
either whole or absent). A Parquet file is unreadable without its footer, so the recording is
never one file being appended to: a ``SIGKILL`` loses at most the rows of the current flush
interval, and every segment already written reads back. Each flush also rewrites
``manifest.json`` (``"complete": false``, ``recording.flushed_through_min``, the segments).

:func:`read_channel` is the reader: the final ``channels/<edge>.parquet`` when it exists, else
the segments concatenated (rows grouped by patient in order of first appearance, as in the
final file). On a normal end (or an exception) :meth:`Recorder.finish` writes the final tables
(each under a temporary name, then renamed), removes the segments, and writes the manifest.

The directory holds a file ``INCOMPLETE`` from the start; only a complete run removes it, so a
half-written recording (an exception, a kill) is never mistaken for a complete one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinloop.agents.channels import Listener
from twinloop.agents.messages import Record

INCOMPLETE_MARKER = "INCOMPLETE"
#: Folder of a running recording's flushed segments.
SEGMENTS_DIR = "segments"
#: Simulated minutes between flushes of ``twinloop run``'s recording (``--flush-every-min``).
DEFAULT_FLUSH_EVERY_MIN = 60
#: Simulated minutes between flushes of a HIL session's recording (``--flush-every-min``).
DEFAULT_HIL_FLUSH_EVERY_MIN = 5
#: Allowed flush intervals, simulated minutes (inclusive).
FLUSH_EVERY_MIN_RANGE = (1, 1440)


def check_flush_every_min(value: Any) -> int:
    """A flush interval (simulated minutes) in :data:`FLUSH_EVERY_MIN_RANGE`; ValueError if not."""
    lo, hi = FLUSH_EVERY_MIN_RANGE
    allowed = f"an integer number of simulated minutes in {lo}..{hi}"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(allowed)
    try:
        number = int(str(value).strip()) if not isinstance(value, float) else int(value)
    except ValueError:
        raise ValueError(allowed) from None
    if not lo <= number <= hi:
        raise ValueError(allowed)
    return number


def channel_file(channel: str) -> str:
    """File name of a channel's table (``a->b`` → ``a__b.parquet``)."""
    return channel.replace("->", "__") + ".parquet"


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str)))


def _segment_files(run_dir: Path, channel: str) -> list[Path]:
    folder = run_dir / SEGMENTS_DIR / channel_file(channel).removesuffix(".parquet")
    return sorted(folder.glob("[0-9]*.parquet")) if folder.is_dir() else []


def _patient_order(table: pa.Table) -> pa.Table:
    """Rows grouped by patient in order of first appearance (stable within a patient)."""
    if "patient" not in table.column_names or table.num_rows == 0:
        return table
    encoded = table.column("patient").cast(pa.string()).combine_chunks().dictionary_encode()
    code = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
    return table.take(pa.array(np.argsort(code, kind="stable")))


def read_channel(
    run_dir: str | Path, channel: str, columns: list[str] | None = None
) -> pa.Table | None:
    """One channel of a recording: its final table, else its flushed segments; None if neither.

    Raises:
        pyarrow.ArrowException, OSError: a file that is not readable Parquet.

    """
    run_dir = Path(run_dir)
    final = run_dir / "channels" / channel_file(channel)
    if final.is_file():
        return pq.read_table(final, columns=columns)
    parts = [pq.read_table(p, columns=columns) for p in _segment_files(run_dir, channel)]
    if not parts:
        return None
    return _patient_order(pa.concat_tables(parts, promote_options="permissive"))


def recorded_channels(run_dir: str | Path) -> list[str]:
    """Channels with a final table or flushed segments in ``run_dir`` (file stems, sorted)."""
    run_dir = Path(run_dir)
    stems = {p.stem for p in (run_dir / "channels").glob("*.parquet")}
    segments = run_dir / SEGMENTS_DIR
    if segments.is_dir():
        stems |= {d.name for d in segments.iterdir() if any(d.glob("[0-9]*.parquet"))}
    return sorted(s.replace("__", "->") for s in stems)


def git_output(*args: str) -> str | None:
    """``git ARGS`` run in this source tree: its stripped output, or None (no git, no repo)."""
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def git_revision() -> str | None:
    """The source tree's git revision (looked up once per process)."""
    return git_output("rev-parse", "HEAD")


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a recording depends on (a fresh dict)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    import gymnasium
    import numba
    import scipy

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "gymnasium": gymnasium.__version__,
        "pyarrow": pa.__version__,
    }


Columns = dict[str, dict[str, list[Any]]]


def column_listener(columns: Columns, patient: str) -> Listener:
    """A channel listener appending messages to ``columns[channel][field]`` under ``patient``."""

    def record(channel: str, message: Record) -> None:
        fields = dataclasses.fields(message)
        table = columns.get(channel)
        if table is None:
            table = columns[channel] = {"patient": [], **{f.name: [] for f in fields}}
        table["patient"].append(patient)
        for f in fields:
            table[f.name].append(getattr(message, f.name))

    return record


class Recorder:
    """Collects messages of many patients' loops and writes them as one recording.

    Each patient's messages are kept apart and written in the order the patients were added,
    so the tables do not depend on how the loops were interleaved (lockstep, workers).

    Args:
        run_dir: the recording's directory (created).
        config: the run's configuration, written at once into an interim manifest
            (``"complete": false``) so that a killed run still says what it was.
        flush_every_min: simulated minutes between flushes by :meth:`advance` (None: only
            explicit :meth:`flush` calls). Checked by :func:`check_flush_every_min`.
        background: flushes due by :meth:`advance` run in a thread of their own.

    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: Mapping[str, Any] | None = None,
        flush_every_min: int | None = None,
        background: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        if flush_every_min is not None:
            flush_every_min = check_flush_every_min(flush_every_min)
        self.flush_every_min = flush_every_min
        (self.run_dir / "channels").mkdir(parents=True, exist_ok=True)
        (self.run_dir / INCOMPLETE_MARKER).write_text("recording in progress\n")
        self._parts: list[Columns] = []
        self._flushed: list[dict[str, int]] = []  # per part: channel -> rows already flushed
        self._lock = threading.RLock()  # the rows (listeners append under it)
        self._flush_lock = threading.Lock()  # one flush or finish at a time
        self._background = background
        self._flusher: threading.Thread | None = None
        self._started = time.time()
        self._config: Mapping[str, Any] = config or {}
        self._segments = 0
        #: Called at each flush for more manifest fields (e.g. a rig's outages so far).
        self.manifest_extra: Callable[[], Mapping[str, Any]] | None = None
        self._flushed_through_min: float | None = None
        self._next_flush_min = float(flush_every_min) if flush_every_min else math.inf
        self._write_manifest(complete=False, channels=[])

    def _add_part(self, part: Columns) -> None:
        with self._lock:
            self._parts.append(part)
            self._flushed.append({})

    def listener(self, patient: str) -> Listener:
        """A channel listener that records messages under ``patient`` (thread-safe)."""
        part: Columns = {}
        self._add_part(part)
        record = column_listener(part, patient)
        lock = self._lock

        def locked(channel: str, message: Record) -> None:
            with lock:
                record(channel, message)

        return locked

    def merge(self, columns: Columns) -> None:
        """Append columns recorded elsewhere (e.g. by a patient loop in a Ray worker)."""
        self._add_part(columns)

    def _merged(self, *, unflushed: bool = False) -> Columns:
        merged: Columns = {}
        with self._lock:
            for part, done in zip(self._parts, self._flushed, strict=True):
                for channel, table in part.items():
                    start = done.get(channel, 0) if unflushed else 0
                    mine = merged.setdefault(channel, {name: [] for name in table})
                    n = len(table["patient"])
                    for name, values in table.items():
                        mine[name].extend(values[start:n])
                    if unflushed:
                        done[channel] = n
        return {c: t for c, t in merged.items() if t["patient"]}

    def tables(self) -> Columns:
        """Everything recorded so far: channel → field → values (patients in order)."""
        return self._merged()

    def column(self, channel: str, field: str) -> list[Any]:
        """The values recorded so far of one field of one channel."""
        out: list[Any] = []
        with self._lock:
            for part in self._parts:
                out.extend(part.get(channel, {}).get(field, []))
        return out

    def advance(self, t_min: float) -> None:
        """The loops reached simulated minute ``t_min``: flush when an interval has passed.

        With ``background=True`` the flush runs in a thread of its own (a paced rig's tick
        only hands it over); while one still runs, the next waits for the first call after it.
        """
        if t_min < self._next_flush_min:
            return
        if self._flusher is not None and self._flusher.is_alive():
            return  # due again at the next call
        step = float(self.flush_every_min or 1)
        self._next_flush_min = (t_min // step + 1) * step
        if not self._background:
            self.flush(t_min)
            return
        self._flusher = threading.Thread(
            target=self.flush, args=(t_min,), name="recording-flush", daemon=True
        )
        self._flusher.start()

    def flush(self, through_min: float | None = None) -> int:
        """Write the rows recorded since the last flush as closed segment files; return rows.

        ``through_min`` (the simulated minute the loops reached) goes into the manifest. Only
        taking the new rows holds the lock the listeners take; the files are written after.
        """
        with self._flush_lock:
            fresh = self._merged(unflushed=True)
            seq = self._segments
            rows = 0
            for channel, table in fresh.items():
                stem = channel_file(channel).removesuffix(".parquet")
                folder = self.run_dir / SEGMENTS_DIR / stem
                folder.mkdir(parents=True, exist_ok=True)
                data = pa.Table.from_pydict(table)
                _write_atomically(
                    folder / f"{seq:06d}.parquet", lambda tmp, d=data: pq.write_table(d, tmp)
                )
                rows += data.num_rows
            self._segments += 1
            if through_min is not None:
                self._flushed_through_min = float(through_min)
            extra = self.manifest_extra() if self.manifest_extra is not None else None
            self._write_manifest(
                complete=False, channels=recorded_channels(self.run_dir), extra=extra
            )
            return rows

    def _write_manifest(
        self,
        *,
        complete: bool,
        channels: list[str],
        config: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        manifest = {
            "config": self._config if config is None else config,
            "versions": versions(),
            "git_revision": git_revision(),
            "started_unix_s": self._started,
            "wall_time_s": time.time() - self._started,
            "channels": channels,
            "complete": complete,
            "recording": {
                "flush_every_min": self.flush_every_min,
                "flushed_through_min": self._flushed_through_min,
                "segments": self._segments,
            },
            **(extra or {}),
        }
        _write_json(self.run_dir / "manifest.json", manifest)

    def finish(
        self,
        config: Mapping[str, Any],
        summary: Mapping[str, Any],
        *,
        complete: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the tables, the summary and (last) the manifest; return the run directory.

        ``extra``: more manifest fields (default: :attr:`manifest_extra`'s).
        """
        if extra is None and self.manifest_extra is not None:
            extra = self.manifest_extra()
        if self._flusher is not None:
            self._flusher.join()
        with self._flush_lock:
            merged = self._merged()
            for channel, table in merged.items():
                data = pa.Table.from_pydict(table)
                _write_atomically(
                    self.run_dir / "channels" / channel_file(channel),
                    lambda tmp, d=data: pq.write_table(d, tmp),
                )
            shutil.rmtree(self.run_dir / SEGMENTS_DIR, ignore_errors=True)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
            self._write_manifest(
                complete=complete, channels=sorted(merged), config=config, extra=extra
            )
            if complete:
                (self.run_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
        return self.run_dir


def new_run_dir(pattern: str) -> str:
    """A directory named by ``time.strftime(pattern)`` that no other run has taken.

    The directory is created here (atomically), so two runs started in the same second get
    ``…-HHMMSS`` and ``…-HHMMSS-2`` instead of writing into one another.
    """
    base = time.strftime(pattern)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        name = base if k == 1 else f"{base}-{k}"
        try:
            Path(name).mkdir()
        except FileExistsError:
            continue
        return name
    raise OSError(f"{base}: 999 runs already started this second; give --out")
