"""A HIL session's console: the rig's own lines on the terminal, library noise in the run's log.

pymodbus logs every failed connection attempt (``Connection to (127.0.0.1, 5020) failed:
[Errno 111] Connection refused``, then ``Repeating....``) and the hardware bridge logs its
reconnections; with no handler configured Python prints these warnings on stderr, between the
rig's own lines. :func:`session_log` sends the ``pymodbus`` and ``twinloop`` loggers to the
run's log file (``RUN_DIR/hil.log``, :data:`LOG_NAME`) for the session, and to stderr as well
only when asked (``twinloop hil --verbose``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

#: The session's log file in its run directory.
LOG_NAME = "hil.log"
#: The loggers a session routes (pymodbus's, and the hardware bridge's and the rig's own).
LOGGERS = ("pymodbus", "twinloop")


@contextlib.contextmanager
def session_log(path: str | Path, *, verbose: bool = False) -> Iterator[Path]:
    """Route :data:`LOGGERS` (INFO and above) to ``path`` while the block runs.

    Args:
        path: the log file (its directory is created; appended to).
        verbose: also print those records on stderr.

    Yields:
        ``path``.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.INFO)
        logger.propagate = False  # neither the root's handlers nor Python's last resort
        for handler in handlers:
            logger.addHandler(handler)
    try:
        yield path
    finally:
        for logger, level, propagate in saved:
            for handler in handlers:
                logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handlers[0].close()
