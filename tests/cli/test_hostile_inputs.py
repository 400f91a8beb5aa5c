"""Hostile inputs at the command line (issue 19, item 8): refused in one line, never a traceback.

Every case calls ``twinloop.cli.main.main`` in this process with a value or a file that must be
refused: out-of-range, non-finite or non-numeric numbers, binary, UTF-16, empty, garbage or
oversized (sparse) configs and logs, ``/dev/zero``, directories, extreme timestamps and
durations. Each must end with exit code 2 (:data:`twinloop.cli.errors.EXIT_USAGE`), no
traceback, exactly one ``error:`` line, and that line (or the import report printed above it)
naming the option, file or field. Nothing is run: a case whose value were accepted would fail
for a reason that does not name its option, which this test reports.

Cases of areas other engineers own (campaign specs, ``run``/``evaluate``/``hil`` options, device
profiles) that still fail are marked ``xfail(strict=True)`` with what happens.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from twinloop.cli.errors import EXIT_USAGE
from twinloop.cli.main import main
from twinloop.limits import MAX_CONFIG_BYTES, MAX_LOG_BYTES

pytestmark = pytest.mark.timeout(30)

#: Values no count, duration, size, seed or scale accepts.
NOT_NUMBERS = ("nan", "inf", "-inf", "abc", "")
HUGE = ("1e9", "1e308")


def _run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return code, err.getvalue()


#: Bound of a case run in a child process (one that would read forever in this one), s.
SUBPROCESS_TIMEOUT_S = 20
#: Address-space limit of that child, KiB (a runaway read fails instead of swapping).
SUBPROCESS_MEMORY_KIB = 3_000_000


def _run_child(argv: list[str]) -> tuple[int, str]:
    """``python -m twinloop ARGV`` with a memory limit; a hang or a crash is exit code -1."""
    import shlex
    import subprocess
    import sys

    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "twinloop", *argv])
    try:
        proc = subprocess.run(
            ["sh", "-c", f"ulimit -v {SUBPROCESS_MEMORY_KIB}; exec {command}"],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, f"no answer within {SUBPROCESS_TIMEOUT_S} s"
    return proc.returncode, proc.stderr


def assert_refused(argv: list[str], needle: str, *, child: bool = False) -> None:
    """``argv`` exits 2 with one error line, no traceback, naming ``needle``."""
    code, err = _run_child(argv) if child else _run(argv)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == EXIT_USAGE, f"exit {code}: {err[-500:]}"
    assert len(errors) == 1, err
    assert needle.lower() in err.lower(), f"{needle!r} not named in: {err[-500:]}"


def _xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


# --------------------------------------------------------------------------------------------
# Files: every format, each kind of hostile content


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk (the reader must refuse it by its size)."""
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


#: Hostile file contents: name -> writer(directory, suffix, cap) -> path.
FILES: dict[str, Callable[[Path, str, int], Path | str]] = {
    "binary": lambda d, s, c: _write(d / f"binary{s}", b"\x89PNG\r\n\x1a\n\x00\x00\x01\xc3\x28"),
    "utf16": lambda d, s, c: _write(d / f"utf16{s}", "days: 1\nseed: 0\n".encode("utf-16")),
    "nul": lambda d, s, c: _write(d / f"nul{s}", "a: 1\n\x00\x00\n"),
    "huge": lambda d, s, c: _sparse(d / f"huge{s}", c + 1),
    "dev-zero": lambda d, s, c: "/dev/zero",
    "directory": lambda d, s, c: str(d),
    "missing": lambda d, s, c: str(d / f"no-such-file{s}"),
}
YAML_CONTENT: dict[str, str] = {
    "garbage-yaml": "a: [unclosed\n  - : :\n\t{{\n",
    "a-list": "- 1\n- 2\n",
    "a-scalar": "42\n",
    "wrong-types": "days: [1, 2]\nseed: {a: 1}\n",
    "huge-counts": "days: 1000000000\nseed: -1\n",
    "anchors": "a: &a [*a, *a]\n",
}


def _file_cases(
    command: Callable[[str], list[str]],
    suffix: str,
    cap: int,
    *,
    yaml: bool,
    needle: Callable[[str], str] | None = None,
    marks: dict[str, pytest.MarkDecorator] | None = None,
    skip: tuple[str, ...] = (),
) -> list[object]:
    kinds = [k for k in list(FILES) + (list(YAML_CONTENT) if yaml else []) if k not in skip]
    return [
        pytest.param(
            command,
            suffix,
            cap,
            kind,
            needle,
            id=f"{command('X')[0]}-{kind}",
            marks=(marks or {}).get(kind, ()),
        )
        for kind in kinds
    ]


def _materialise(tmp_path: Path, suffix: str, cap: int, kind: str) -> str:
    if kind in FILES:
        return str(FILES[kind](tmp_path, suffix, cap))
    return str(_write(tmp_path / f"{kind}{suffix}", YAML_CONTENT[kind]))


_CAMPAIGN_OPEN = _xfail(
    "campaigns/spec.py (not this branch's): reads the spec without a size or type check; "
    "/dev/zero is read forever, a binary or UTF-16 spec ends in a UnicodeDecodeError's text "
    "without the file's name"
)

FILE_CASES = [
    *_file_cases(
        lambda f: [
            "run",
            "--config",
            f,
            "--placement",
            "inline",
            "--patient",
            "adult#001",
            "--no-progress",
        ],
        ".yaml",
        MAX_CONFIG_BYTES,
        yaml=True,
        skip=("wrong-types", "huge-counts"),
    ),
    *_file_cases(lambda f: ["train", f], ".yaml", MAX_CONFIG_BYTES, yaml=True),
    *_file_cases(
        lambda f: ["simulate", "--patient", "adult#001", "--inputs", f, "--out", f + ".out.csv"],
        ".csv",
        MAX_LOG_BYTES,
        yaml=False,
    ),
    *_file_cases(
        lambda f: ["twin", "fit", f, "--out", f + ".twin.yaml"], ".csv", MAX_LOG_BYTES, yaml=False
    ),
    *_file_cases(
        lambda f: ["twin", "fit", f, "--out", f + ".twin.yaml"], ".json", MAX_LOG_BYTES, yaml=False
    ),
    *_file_cases(
        lambda f: ["simulate", "--cohort", f"population:{f}", "--days", "1"],
        ".parquet",
        MAX_LOG_BYTES,
        yaml=False,
    ),
    *_file_cases(
        lambda f: [
            "twin",
            "synth",
            "--patient",
            "adult#p0-0001",
            "--population",
            f,
            "--out",
            f + ".log.csv",
        ],
        ".parquet",
        MAX_LOG_BYTES,
        yaml=False,
    ),
    *_file_cases(
        lambda f: ["campaign", f, "--inline", "--no-progress"],
        ".yaml",
        MAX_CONFIG_BYTES,
        yaml=True,
        marks={k: _CAMPAIGN_OPEN for k in ("binary", "utf16", "dev-zero")},
    ),
]


@pytest.mark.parametrize(("command", "suffix", "cap", "kind", "needle"), FILE_CASES)
def test_a_hostile_file_is_refused_naming_it(
    tmp_path: Path,
    command: Callable[[str], list[str]],
    suffix: str,
    cap: int,
    kind: str,
    needle: Callable[[str], str] | None,
) -> None:
    path = _materialise(tmp_path, suffix, cap, kind)
    argv = command(path)
    if kind == "directory" and argv[0] == "twin":  # a directory of logs: none of them in it
        name = path
    elif kind == "missing" or kind == "directory" or kind in FILES:
        name = Path(path).name if argv[0] == "twin" else path
    else:
        name = Path(path).name
    # /dev/zero where it may be read forever: in a child process with bounded memory and time
    child = kind == "dev-zero" and argv[0] == "campaign"
    assert_refused(argv, needle(path) if needle else name, child=child)
