"""Option types and option groups shared by every ``twinloop`` command, and ``--config`` files.

One vocabulary: ``--therapy``, ``--patient`` and ``--cohort`` (repeatable), ``--controller``,
``--seed``, ``--out``, ``--config``, ``--placement``, ``--address`` mean the same in every
command that has them. A ``--config`` YAML file's keys are the long options' names in snake case
(``time_scale:`` for ``--time-scale``); values given on the command line win over the file's,
which win over the defaults.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from twinloop.limits import (
    MAX_CONFIG_BYTES,
    MAX_SEED,
    InputLimitError,
    check_document,
    read_text,
)


def seed(text: str) -> int:
    """A seed: an integer from 0 to :data:`MAX_SEED`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to {MAX_SEED}")
    return value


def count(low: int, high: int) -> Callable[[str], int]:
    """An option type: an integer from ``low`` to ``high`` (``1e3`` is read as 1000)."""

    def parse(text: str) -> int:
        try:
            number = float(text)
            value = int(number) if number.is_integer() else None
        except (ValueError, OverflowError):
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} must be from {low} to {high}")
        return value

    parse.__name__ = "integer"
    return parse


def add_count(
    parser: argparse.ArgumentParser,
    flag: str,
    low: int,
    high: int,
    text: str,
    default: int | None = None,
    default_text: str | None = None,
) -> None:
    """``flag``: an integer from ``low`` to ``high``, its range and default in the help."""
    shown = default_text or ("" if default is None else f"default {default}")
    parser.add_argument(
        flag,
        type=count(low, high),
        default=default,
        help=f"{text}, {low} to {high}" + (f" ({shown})" if shown else ""),
    )


def number(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An option type: a finite number from ``low`` to ``high`` (``> low`` with ``low_open``)."""

    def parse(text: str) -> float:
        value = _float(text)
        inside = (value > low if low_open else value >= low) and value <= high
        if not math.isfinite(value) or not inside:
            lo = f"> {low:g}" if low_open else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be finite, {lo} and <= {high:g}")
        return value

    parse.__name__ = "number"
    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def finite(text: str) -> float:
    """A finite number (its range is checked where its meaning is known)."""
    value = _float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite and > 0")
    return value


def clock_time(text: str) -> int:
    """A clock time ``HH:MM`` as minutes after midnight."""
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise argparse.ArgumentTypeError(f"{text!r} is not a clock time HH:MM (00:00-23:59)")
    return int(m.group(1)) * 60 + int(m.group(2))


def add_therapy(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--therapy NAME`` (a name of the therapy registry)."""
    from twinloop.therapy import therapies

    names = ", ".join(f"{t.name} ({t.title})" for t in therapies())
    parser.add_argument(
        "--therapy",
        default=default,
        help=f"the therapy: {names}; default glucose",
    )


def add_patients(parser: argparse.ArgumentParser) -> None:
    """``--patient`` and ``--cohort`` (each repeatable)."""
    parser.add_argument(
        "--patient",
        action="append",
        default=[],
        help="a patient of the therapy (repeatable): a glucose patient (adult#001) or a knee "
        "preset (healthy|mild|moderate|severe)",
    )
    parser.add_argument(
        "--cohort",
        action="append",
        default=[],
        help="a cohort (repeatable): adolescents|adults|children|all, or population:PATH",
    )


def therapy_of(name: str) -> Any:
    """The therapy called ``name``; a former spelling works with a one-line notice."""
    from twinloop.therapy import get_therapy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        therapy = get_therapy(name)
    for w in caught:
        print(f"twinloop: warning: {w.message}; use --therapy {therapy.name}", file=sys.stderr)
    return therapy


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: Ray's own messages on the console, else in a log file (ray_log)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=None,
        help="show Ray's own messages (its warnings, its workers' output) on the console; "
        "without it they go to a log file named when Ray starts "
        "($TWINLOOP_LOG_DIR, default ~/.cache/twinloop/logs)",
    )


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be read or holds a key or value that is not allowed."""


#: Keys of former config files, still read, with the key they stand for.
DEPRECATED_KEYS = {"patients": "patient", "cohorts": "cohort", "controllers": "controller"}


def read_config(path: str | None) -> dict[str, Any]:
    """The mapping in a ``--config`` YAML file (empty without a file)."""
    if not path:
        return {}
    import yaml

    label = f"--config {path}"
    try:
        loaded = yaml.safe_load(read_text(path, MAX_CONFIG_BYTES, label))
        check_document(loaded, label)
    except InputLimitError as exc:
        raise ConfigFileError(str(exc)) from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigFileError(f"--config {path}: not valid YAML: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of option names to values")
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        key = str(key).replace("-", "_")
        if key in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[key]
            print(
                f"twinloop: warning: --config {path}: key {key!r} is now {new!r}", file=sys.stderr
            )
            key = new
        out[key] = value
    return out


def check_keys(path: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse keys of a config file that the command does not have, listing the allowed ones."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise ConfigFileError(
                f"--config {path}: unknown key {key!r}; allowed: {', '.join(allowed)}"
            )


def as_list(value: Any) -> list[str]:
    """A YAML scalar or list as a list of strings."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def merged(
    defaults: Mapping[str, Any], config: Mapping[str, Any], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults, overridden by the file's values, overridden by the command line's (not None)."""
    out = dict(defaults)
    out.update(config)
    out.update({k: v for k, v in given.items() if v is not None and v != []})
    return out


class OutputExistsError(ValueError):
    """``--out`` names an earlier run (refused without ``--overwrite``) or something else."""


#: Files that mark a directory as a twinloop output (a run's manifest or its in-progress
#: marker, an evaluation's manifest, a campaign's pinned spec or summary, a twin replay).
OUTPUT_MARKERS = (
    "manifest.json",
    "summary.json",
    "spec.json",
    "INCOMPLETE",
    "replay.json",
    "hil.log",  # a HIL session that stopped before its recording began
    "pendulum.json",  # twinloop pendulum --out
)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace an earlier run at ``--out`` (refused without it)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier twinloop output at --out (without it, a non-empty --out is "
        "refused; a directory that holds no twinloop output is never deleted)",
    )


def is_output(path: Path) -> bool:
    """Whether ``path`` is a directory holding a twinloop output (:data:`OUTPUT_MARKERS`)."""
    return path.is_dir() and any((path / marker).exists() for marker in OUTPUT_MARKERS)


def claim_out(
    path: str | Path, *, overwrite: bool, option: str = "--out", remove: bool = True
) -> Path:
    """``path`` ready for a new output: absent or empty, or an earlier one removed.

    With ``remove`` false, only check (a command that validates more input first calls it
    again, with ``remove``, just before it writes).

    Raises:
        OutputExistsError: ``path`` is not a directory; or it is not empty and ``overwrite``
            is false; or it is not empty and holds no twinloop output (never deleted).

    """
    import shutil

    out = Path(path)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{option} {out}: exists and is not a directory; give another")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not is_output(out):
        raise OutputExistsError(
            f"{option} {out}: not empty and holds no twinloop output; refused (even with "
            "--overwrite, it is not deleted): give another"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{option} {out}: holds an earlier run; give another, or --overwrite to replace it"
        )
    if remove:
        shutil.rmtree(out)
    return out
