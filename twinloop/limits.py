"""Bounded input: the size caps of files a user hands to twinloop, checked before reading them.

A config, spec, profile or log is read only when it is a regular file no larger than its cap
(``/dev/zero``, a FIFO or a 10 GB file is refused by its size, without reading it), and decoded
as UTF-8 (a binary or UTF-16 file is refused naming the file). Every refusal is an
:class:`InputLimitError` (a :class:`ValueError`): one line naming the file, what it is, and
what is allowed. The caps (documented in the README, *Input limits*):

* :data:`MAX_CONFIG_BYTES` — YAML configs, campaign specs, device profiles, training configs;
* :data:`MAX_LOG_BYTES` — CGM/pump logs (CSV, Nightscout JSON), per-minute inputs CSVs and
  population files.

A parsed YAML document is checked by :func:`check_document`: YAML aliases share one object
between many places (``a: &a [x, x]; b: &b [*a, *a]; ...`` is a few bytes that expand to 10^9
values), and a recursive alias never ends; both are refused before anything walks them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Largest YAML config/spec/profile read, bytes (1 MiB).
MAX_CONFIG_BYTES = 1024 * 1024
#: Largest log, inputs CSV or population file read, bytes (256 MiB).
MAX_LOG_BYTES = 256 * 1024 * 1024

#: Largest seed (numpy seeds are unsigned; 2**32 - 1 keeps them portable).
MAX_SEED = 2**32 - 1
#: Most virtual patients sampled or read from a population file at once (sampling takes
#: ~15 ms per patient on one core: 10 000 take a few minutes).
MAX_PATIENTS = 10_000

#: Most simulated days of one ``twinloop run`` loop (and its re-fit interval), days.
MAX_RUN_DAYS = 3650
#: Largest wall-clock time scale (``--time-scale`` of ``run --clock wall``, ``emulate``,
#: ``hil``): seconds per simulated minute (60 is real time; 3600 is 60 times slower).
MAX_TIME_SCALE_S_PER_MIN = 3600.0
#: Most parallel workers or patient loops of one command.
MAX_WORKERS = 1024

#: Most values (counting each use of an alias) and deepest nesting of a YAML document.
MAX_DOCUMENT_VALUES = 1_000_000
MAX_DOCUMENT_DEPTH = 64

#: Earliest and latest calendar year of a timestamp read from a log or given as an option.
MIN_YEAR = 1970
MAX_YEAR = 2100


class InputLimitError(ValueError):
    """A file or value outside what twinloop reads (the message names it and the limit)."""


def check_file(path: str | os.PathLike[str], max_bytes: int, label: str | None = None) -> Path:
    """``path`` when it is a regular file of at most ``max_bytes`` bytes, else a refusal.

    Nothing is read: a character device (``/dev/zero``), a FIFO or a directory is refused by
    its type, a larger file by its size. ``label`` names the file in the message (default the
    path).
    """
    p = Path(path)
    name = label or str(path)
    try:
        info = p.stat()
    except OSError as exc:
        raise InputLimitError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputLimitError(f"{name}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputLimitError(f"{name}: not a regular file (a device, pipe or socket)")
    if info.st_size > max_bytes:
        raise InputLimitError(
            f"{name}: {info.st_size} bytes is larger than the {max_bytes} bytes allowed"
        )
    return p


def read_text(path: str | os.PathLike[str], max_bytes: int, label: str | None = None) -> str:
    """The UTF-8 text of ``path`` (a BOM dropped), checked by :func:`check_file` first.

    Raises:
        InputLimitError: not a regular file, too large, unreadable, or not UTF-8 text (a
            binary or UTF-16 file; the message names the file).

    """
    p = check_file(path, max_bytes, label)
    name = label or str(path)
    try:
        data = p.read_bytes()[: max_bytes + 1]
    except OSError as exc:
        raise InputLimitError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return decode(data, name)


def decode(data: bytes, name: str) -> str:
    """``data`` as UTF-8 text (a BOM dropped), or a refusal naming ``name``."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputLimitError(f"{name}: UTF-16 text; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputLimitError(
            f"{name}: not UTF-8 text (byte {exc.start}: {exc.reason}; a binary file?)"
        ) from None
    if "\x00" in text:
        raise InputLimitError(f"{name}: holds NUL characters (a binary file?)")
    return text


def check_document(document: object, name: str) -> None:
    """Refuse a parsed YAML/JSON document with too many values or too deep a nesting.

    Values are counted as a reader walking the document sees them (an alias counts each time
    it is used), up to :data:`MAX_DOCUMENT_VALUES`; nesting up to :data:`MAX_DOCUMENT_DEPTH`
    (a recursive alias exceeds it).
    """
    seen = 0
    stack: list[tuple[object, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_DOCUMENT_VALUES:
            raise InputLimitError(
                f"{name}: more than {MAX_DOCUMENT_VALUES} values (YAML aliases expanding?)"
            )
        if depth > MAX_DOCUMENT_DEPTH:
            raise InputLimitError(
                f"{name}: nested deeper than {MAX_DOCUMENT_DEPTH} levels (a recursive alias?)"
            )
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)
