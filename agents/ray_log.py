"""Ray's own console messages, sent to a log file unless ``--verbose`` asks for them.

Ray writes to the console of the process that starts it: its Python loggers (``ray.*``: the
"Token authentication is enabled for this Ray cluster" notice), the raylet's messages that a
thread of the driver prints to stdout ("A worker died or was killed ..."), lines of its
C++ core written straight to file descriptor 2 (``network_util.cc: Failed to determine local IP
via external connectivity`` on a machine with no route out) and ``warnings`` raised in its
modules. By default :func:`quiet` sends all of them to one file per process,
``ray-YYYYmmdd-HHMMSS-PID.log`` in :func:`log_dir` (``$TWINLOOP_LOG_DIR``, else
``$XDG_CACHE_HOME/twinloop/logs``, else ``~/.cache/twinloop/logs``); the file also names Ray's
session directory, where the output of Ray's own processes (GCS, raylet, workers) is.
After :func:`set_verbose` (a command's ``--verbose``) Ray's messages stay on the console and its
workers' output is forwarded there too (``ray.init(log_to_driver=True)``).

C++ lines are caught while Ray starts and stops (fd 2 points at the log file then); the console
is the process's own the rest of the time, so a crash still shows there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

_state = {"verbose": False, "warnings": False}


def set_verbose(verbose: bool) -> None:
    """Leave Ray's messages on the console (``True``) or send them to :func:`log_path`."""
    _state["verbose"] = verbose


def verbose() -> bool:
    """Whether Ray's messages stay on the console (:func:`set_verbose`)."""
    return _state["verbose"]


def log_dir() -> Path:
    """Where Ray's log files go: ``$TWINLOOP_LOG_DIR``, else the user's cache directory."""
    given = os.environ.get("TWINLOOP_LOG_DIR")
    if given:
        return Path(given)
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "twinloop" / "logs"


@functools.cache
def log_path() -> Path:
    """The Ray log file of this process (named once, at the first call)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return log_dir() / f"ray-{stamp}-{os.getpid()}.log"


def shown_path() -> str:
    """:func:`log_path` as a user reads it (``~`` for the home directory)."""
    path, home = log_path(), Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


#: Ray log files kept in :func:`log_dir`: opening a new one removes the oldest beyond these.
KEEP_LOGS = 50


def prune_logs(directory: Path, keep: int = KEEP_LOGS, *, spare: Path | None = None) -> list[Path]:
    """Remove all but the newest ``keep`` ``ray-*.log`` files of ``directory`` (never ``spare``).

    Returns the removed paths. Files that vanish or cannot be removed meanwhile (another
    process pruning) are skipped: pruning never fails a command.
    """
    logs = []
    for path in directory.glob("ray-*.log"):
        with contextlib.suppress(OSError):
            logs.append((path.stat().st_mtime, path))
    logs.sort(reverse=True)
    removed = []
    for _, path in logs[keep:]:
        if path == spare:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _open_log() -> TextIO:
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    handle = path.open("a", encoding="utf-8")
    if fresh:
        prune_logs(path.parent, spare=path)
    return handle


class _RayLogHandler(logging.FileHandler):
    """The log file's handler on Ray's ``ray`` logger."""


def _route_python() -> None:
    """Ray's loggers write to the log file, not stderr; warnings from Ray's modules too.

    Called after ``ray.init``, which removes every handler of the ``ray`` logger (its
    ``configure_logging=False``), leaving its warnings to Python's last-resort handler: stderr.
    """
    ray_logger = logging.getLogger("ray")
    for old in list(ray_logger.handlers):
        if isinstance(old, logging.StreamHandler) and not isinstance(old, _RayLogHandler):
            ray_logger.removeHandler(old)
    if not any(isinstance(h, _RayLogHandler) for h in ray_logger.handlers):
        handler = _RayLogHandler(log_path(), encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.addHandler(handler)
    ray_logger.propagate = False
    if _state["warnings"]:
        return
    _state["warnings"] = True
    import ray
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "print_to_stdstream"):  # a message from the raylet ("A worker died
        # or was killed ..."), or a worker's output: printed by a thread of the driver

        def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
            with _open_log() as log:
                log.writelines(f"({data.get('pid')}) {line}\n" for line in data.get("lines", ()))

        ray_worker.print_to_stdstream = print_to_stdstream

    ray_dir = str(Path(ray.__file__).parent)
    shown = warnings.showwarning

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if str(filename).startswith(ray_dir):
            with _open_log() as log:
                log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """While Ray starts or stops: its messages (C++ ones included) go to :func:`log_path`.

    Does nothing after :func:`set_verbose` (``True``), nor when the log file cannot be written
    (Ray's messages then stay on the console).
    """
    if verbose():
        yield
        return
    try:
        log = _open_log()
    except OSError:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a detached process): nothing reaches a console anyway
        saved = None
    try:
        if saved is not None:
            os.dup2(log.fileno(), 2)
        log.close()
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    _route_python()


def note_session() -> None:
    """Write where Ray's own processes log (its session directory) into the log file."""
    if verbose():
        return
    import ray

    with contextlib.suppress(Exception):
        logs = ray._private.worker._global_node.get_logs_dir_path()  # type: ignore[attr-defined]
        with _open_log() as log:
            log.write(f"twinloop: Ray's processes log in {logs}\n")
