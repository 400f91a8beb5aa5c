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
HUGE = ("1000000000", "1e308")


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


# --------------------------------------------------------------------------------------------
# Numbers: each count, duration, size, seed and scale × values outside its documented range

#: (command line before the option, option, values it must refuse, marks by value).
NUMERIC: list[tuple[list[str], str, tuple[str, ...], dict[str, pytest.MarkDecorator]]] = []


def _seed(base: list[str], marks: dict[str, pytest.MarkDecorator] | None = None) -> None:
    """A seed refuses what is not an integer from 0 to 2**32 - 1."""
    NUMERIC.append(
        (base, "--seed", ("-1", "4294967296", "1e308", *NOT_NUMBERS, "1.5"), marks or {})
    )


def _numeric(
    base: list[str],
    option: str,
    extra: tuple[str, ...] = (),
    *,
    zero: bool = True,
    negative: bool = True,
    marks: dict[str, pytest.MarkDecorator] | None = None,
) -> None:
    values = (("-1",) if negative else ()) + (("0",) if zero else ()) + HUGE + NOT_NUMBERS + extra
    NUMERIC.append((base, option, values, marks or {}))


_POP = ["population", "sample", "--out", "{tmp}/pop.parquet"]
_numeric([*_POP, "--seed", "0"], "--n", ("10001", "1.5"))
_seed([*_POP, "--n", "1"])
_SIM = ["simulate", "--patient", "adult#001"]
_numeric(_SIM, "--days", ("366", "2.5"))
_seed(_SIM)
_numeric(_SIM, "--carb-error", ("1.5",), zero=False)
_REPLAY = [*_SIM, "--inputs", "{tmp}/none.csv", "--out", "{tmp}/o.csv"]
_numeric(_REPLAY, "--eat-rate", ("101",))
_numeric(_REPLAY, "--start", ("24:00", "12:60", "-1:00", "7"), zero=False)
_FIT = ["twin", "fit", "{tmp}/none.csv", "--out", "{tmp}/t.yaml"]
_numeric(_FIT, "--fit-days", ("3651",))
_numeric(_FIT, "--validate-days", ("3651",), zero=False)
_numeric(_FIT, "--profile-blocks", ("49", "1.5"), zero=False)
_numeric(_FIT, "--body-weight-kg", ("401",))
_numeric(_FIT, "--basal-u-per-h", ("36",), zero=False)
_numeric(_FIT, "--cr", ("201",))
_numeric(_FIT, "--cf", ("1001",))
_numeric([*_FIT, "--each"], "--workers", ("1025",))
_TREPLAY = ["twin", "replay", "{tmp}/none.yaml", "{tmp}/none.csv"]
_numeric(_TREPLAY, "--draws", ("10001", "2.5"))
_seed(_TREPLAY)
_numeric(_TREPLAY, "--from-day", ("3651",), zero=False)
_numeric(_TREPLAY, "--days", ("3651",))
_numeric(_TREPLAY, "--basal-scale", ("11",), zero=False)
_numeric(_TREPLAY, "--basal-u-per-h", (), zero=False, negative=False)
_numeric(_TREPLAY, "--cr", (), zero=False, negative=False)
_numeric(_TREPLAY, "--cf", (), zero=False, negative=False)
_SYNTH = ["twin", "synth", "--patient", "adult#001", "--out", "{tmp}/s.csv"]
_numeric(_SYNTH, "--days", ("366",))
_seed(_SYNTH)
_numeric(_SYNTH, "--carb-error", ("1.5",), zero=False)
_INDIV = ["twin", "individualize", "--patient", "adult#001", "--out", "{tmp}/tw", "--inline"]
_numeric(_INDIV, "--days", ("366",))
_seed(_INDIV)
_numeric(_INDIV, "--workers", ("1025",))
_TRAIN = ["train", "{tmp}/none.yaml"]
_numeric(_TRAIN, "--workers", ("1025",))
NUMERIC.append((_TRAIN, "--timesteps", ("-1", "0", "1e11", "1e308", *NOT_NUMBERS, "2.5"), {}))
_seed(_TRAIN)

# Other engineers' commands: the values their parsers refuse today, and the rest marked.
# an accepted value fails later on the unknown patient or cohort, fast, without naming it
_RUN = ["run", "--placement", "inline", "--patient", "adult#999", "--no-progress",
        "--out", "{tmp}/run"]  # fmt: skip
_RUN_DAYS = _xfail(
    "cli/run.py (not this branch's): --days has no upper bound; 1e9 days ends in a MemoryError "
    "traceback (allocating 10 TiB)"
)
_numeric(_RUN, "--days", ("2.5",), marks={"1000000000": _RUN_DAYS})
_seed(_RUN)
_RUN_SCALE = _xfail(
    "cli/run.py (not this branch's): --time-scale has no upper bound; a huge scale ends in an "
    "OverflowError traceback (timestamp out of range for time_t)"
)
_numeric(
    [*_RUN, "--clock", "wall"],
    "--time-scale",
    (),
    marks={"1000000000": _RUN_SCALE, "1e308": _RUN_SCALE, "inf": _RUN_SCALE},
)
_RUN_BOUND = _xfail("cli/run.py (not this branch's): no upper bound (10^9 accepted)")
_numeric(_RUN, "--refit-every-days", ("2.5",), zero=False, marks={"1000000000": _RUN_BOUND})
_numeric(_RUN, "--parallel-patients", ("2.5",), marks={"1000000000": _RUN_BOUND})
_EVAL = ["evaluate", "--controller", "basal-bolus", "--inline", "--no-progress",
         "--cohort", "nosuch", "--out", "{tmp}/ev"]  # fmt: skip
_EVAL_DAYS = _xfail(
    "cli/evaluate.py (not this branch's): --days has no upper bound (1e9 accepted; the run "
    "then fails on memory)"
)
_numeric(_EVAL, "--days", ("2.5",), marks={"1000000000": _EVAL_DAYS})
_EVAL_WORKERS = _xfail("cli/evaluate.py (not this branch's): --workers has no upper bound")
_numeric(_EVAL, "--workers", ("2.5",), marks={"1000000000": _EVAL_WORKERS})
_EVAL_SEED = _xfail(
    "cli/evaluate.py (not this branch's): an empty --seed and seeds >= 2**32 are accepted"
)
_seed(_EVAL, marks={"": _EVAL_SEED, "4294967296": _EVAL_SEED})
_CAMPAIGN = ["campaign", "{tmp}/none.yaml", "--inline", "--no-progress"]
_CAMPAIGN_WORKERS = _xfail(
    "cli/campaign.py (not this branch's): --workers is a bare int (-1 and 0 are accepted; with "
    "a real spec -1 runs the campaign)"
)
_numeric(
    _CAMPAIGN,
    "--workers",
    (),
    marks={"-1": _CAMPAIGN_WORKERS, "0": _CAMPAIGN_WORKERS, "1000000000": _CAMPAIGN_WORKERS},
)
_EMULATE = ["emulate", "pump"]
_EMU_SCALE = _xfail(
    "cli/hil.py (not this branch's): emulate --time-scale has no upper bound (1e9, 1e308 "
    "accepted; the issue's 'emulate --time-scale inf' is refused now by options.positive)"
)
_numeric(_EMULATE, "--time-scale", (), marks={"1000000000": _EMU_SCALE, "1e308": _EMU_SCALE})
_seed(_EMULATE)
_EMU_BAUD = _xfail(
    "cli/hil.py (not this branch's): emulate --baudrate is a bare int (-1, 0, 10^9 accepted)"
)
_numeric(
    _EMULATE, "--baudrate", (), marks={"-1": _EMU_BAUD, "0": _EMU_BAUD, "1000000000": _EMU_BAUD}
)
_HIL = ["hil"]
_HIL_LATE = _xfail(
    "cli/hil.py (not this branch's): this value passes the parser (a bare int or an unbounded "
    "number) and is refused, if at all, after the device options"
)
for _option in ("--minutes", "--control-hz", "--watchdog-ms"):
    _numeric(_HIL, _option, (), marks={"-1": _HIL_LATE, "0": _HIL_LATE, "1000000000": _HIL_LATE})
_numeric(_HIL, "--time-scale", (), marks={"1000000000": _HIL_LATE, "1e308": _HIL_LATE})
_numeric(_HIL, "--seconds", (), marks={"1000000000": _HIL_LATE, "1e308": _HIL_LATE})

NUMERIC_CASES = [
    pytest.param(
        base, option, value, id=f"{' '.join(base[:2])} {option}={value}", marks=marks.get(value, ())
    )
    for base, option, values, marks in NUMERIC
    for value in values
]


@pytest.mark.parametrize(("base", "option", "value"), NUMERIC_CASES)
def test_a_number_outside_its_range_is_refused_naming_the_option(
    tmp_path: Path, base: list[str], option: str, value: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in base] + [f"{option}={value}"]
    assert_refused(argv, option)
