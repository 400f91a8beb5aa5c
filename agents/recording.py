"""Recording a run: every channel to Parquet, a manifest, and summary metrics as JSON.

Layout of a run directory::

    RUN_DIR/
      manifest.json          configuration, seed, versions, git revision, wall time, complete
      summary.json           clinical metrics per patient and per cohort
      channels/<edge>.parquet  one table per channel (``plant->sensor`` is ``plant__sensor``),
                             one row per message: ``patient``, then the message's fields

The manifest is written last. Until then the directory holds a file ``INCOMPLETE``; a run
that is interrupted leaves it there (and a manifest saying ``"complete": false``), so a
half-written recording is never mistaken for a complete one.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinloop.agents.channels import Listener
from twinloop.agents.messages import Record

INCOMPLETE_MARKER = "INCOMPLETE"


def channel_file(channel: str) -> str:
    """File name of a channel's table (``a->b`` → ``a__b.parquet``)."""
    return channel.replace("->", "__") + ".parquet"


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


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a recording depends on."""
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
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / "channels").mkdir(parents=True, exist_ok=True)
        (self.run_dir / INCOMPLETE_MARKER).write_text("recording in progress\n")
        self._parts: list[Columns] = []
        self._started = time.time()

    def listener(self, patient: str) -> Listener:
        """A channel listener that records messages under ``patient``."""
        part: Columns = {}
        self._parts.append(part)
        return column_listener(part, patient)

    def merge(self, columns: Columns) -> None:
        """Append columns recorded elsewhere (e.g. by a patient loop in a Ray worker)."""
        self._parts.append(columns)

    def _merged(self) -> Columns:
        merged: Columns = {}
        for part in self._parts:
            for channel, table in part.items():
                mine = merged.setdefault(channel, {name: [] for name in table})
                for name, values in table.items():
                    mine[name].extend(values)
        return merged

    def tables(self) -> Columns:
        """Everything recorded so far: channel → field → values (patients in order)."""
        return self._merged()

    def column(self, channel: str, field: str) -> list[Any]:
        """The values recorded so far of one field of one channel."""
        out: list[Any] = []
        for part in self._parts:
            out.extend(part.get(channel, {}).get(field, []))
        return out

    def finish(
        self, config: Mapping[str, Any], summary: Mapping[str, Any], *, complete: bool = True
    ) -> Path:
        """Write the tables, the summary and (last) the manifest; return the run directory."""
        merged = self._merged()
        for channel, table in merged.items():
            pq.write_table(
                pa.Table.from_pydict(table), self.run_dir / "channels" / channel_file(channel)
            )
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        manifest = {
            "config": config,
            "versions": versions(),
            "git_revision": git_output("rev-parse", "HEAD") or None,
            "started_unix_s": self._started,
            "wall_time_s": time.time() - self._started,
            "channels": sorted(merged),
            "complete": complete,
        }
        (self.run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
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
