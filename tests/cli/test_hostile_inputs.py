"""Hostile inputs at the command line (issue 19, item 8): refused in one line, never a traceback.

Every case calls ``twinloop.cli.main.main`` in this process with a value or a file that must be
refused: out-of-range, non-finite or non-numeric numbers, binary, UTF-16, empty, garbage or
oversized (sparse) configs and logs, ``/dev/zero``, directories, extreme timestamps and
durations. Each must end with exit code 2 (:data:`twinloop.cli.errors.EXIT_USAGE`), no
traceback, exactly one ``error:`` line, and that line (or the import report printed above it)
naming the option, file or field. Nothing is run: a case whose value were accepted would fail
for a reason that does not name its option, which this test reports.

Cases that still fail (``evaluate``'s options, another engineer's) are marked
``xfail(strict=True)`` with what happens.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
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
SUBPROCESS_TIMEOUT_S = 8
#: Address-space limit of that child, KiB (a runaway read fails instead of swapping).
SUBPROCESS_MEMORY_KIB = 1_500_000


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


def _fifo(path: Path) -> Path:
    """A named pipe nobody writes to: opening it for reading blocks forever."""
    os.mkfifo(path)
    return path


#: Hostile file contents: name -> writer(directory, suffix, cap) -> path.
FILES: dict[str, Callable[[Path, str, int], Path | str]] = {
    "binary": lambda d, s, c: _write(d / f"binary{s}", b"\x89PNG\r\n\x1a\n\x00\x00\x01\xc3\x28"),
    "utf16": lambda d, s, c: _write(d / f"utf16{s}", "days: 1\nseed: 0\n".encode("utf-16")),
    "nul": lambda d, s, c: _write(d / f"nul{s}", "a: 1\n\x00\x00\n"),
    "huge": lambda d, s, c: _sparse(d / f"huge{s}", c + 1),
    "dev-zero": lambda d, s, c: "/dev/zero",
    "fifo": lambda d, s, c: _fifo(d / f"fifo{s}"),
    "directory": lambda d, s, c: str(d),
    "missing": lambda d, s, c: str(d / f"no-such-file{s}"),
}
#: A few hundred bytes whose aliases expand to 10^10 values (the "billion laughs").
_ALIAS_BOMB = "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)
YAML_CONTENT: dict[str, str] = {
    "garbage-yaml": "a: [unclosed\n  - : :\n\t{{\n",
    "a-list": "- 1\n- 2\n",
    "a-scalar": "42\n",
    "wrong-types": "days: [1, 2]\nseed: {a: 1}\n",
    "huge-counts": "days: 1000000000\nseed: -1\n",
    "recursive-alias": "a: &a [*a, *a]\n",
    "alias-bomb": _ALIAS_BOMB,
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


#: A reader that opens a FIFO blocks: pytest-timeout's SIGALRM ends the case (in this process).
_BLOCKS = pytest.mark.timeout(3)
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
        marks={"fifo": _BLOCKS},
    ),
]


# Device profiles (hw_bridge/, another engineer's): hostile files through `twinloop hil` (the
# profile is read before any device is opened)
PROFILE_FILE_CASES = [
    *_file_cases(
        lambda f: ["hil", "--profile", f, "--cgm-port", f + ".no-port", "--minutes", "1",
                   "--out", f + ".hil"], ".yaml", MAX_CONFIG_BYTES, yaml=True,
        skip=("wrong-types", "huge-counts"),
        marks={"fifo": _BLOCKS},
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "suffix", "cap", "kind", "needle"), FILE_CASES + PROFILE_FILE_CASES
)
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
    child = kind == "dev-zero" and argv[0] in ("campaign", "hil")
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
_numeric(_RUN, "--days", ("2.5", "3651"))
_seed(_RUN)
_numeric([*_RUN, "--clock", "wall"], "--time-scale", ("3601",))
_numeric(_RUN, "--refit-every-days", ("2.5", "3651"), zero=False)
_numeric(_RUN, "--parallel-patients", ("2.5", "10001"))
_EVAL = ["evaluate", "--controller", "basal-bolus", "--inline", "--no-progress",
         "--cohort", "nosuch", "--out", "{tmp}/ev"]  # fmt: skip
_numeric(_EVAL, "--days", ("2.5", "366"))
_numeric(_EVAL, "--workers", ("2.5", "1025"))
_seed(_EVAL)
_CAMPAIGN = ["campaign", "{tmp}/none.yaml", "--inline", "--no-progress"]
_numeric(_CAMPAIGN, "--workers", ("1025", "2.5"))
_EMULATE = ["emulate", "pump"]
_numeric(_EMULATE, "--time-scale", ("3601",))
_seed(_EMULATE)
_numeric(_EMULATE, "--baudrate", ("299", "4000001", "2.5"))
_HIL = ["hil"]
_numeric(_HIL, "--minutes", ("525601", "2.5"))
_numeric(_HIL, "--control-hz", ("9", "501", "2.5"))
_numeric(_HIL, "--watchdog-ms", ("9", "1001", "2.5"))
_numeric(_HIL, "--time-scale", ("3601",))
_numeric(_HIL, "--seconds", ("86401",))

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


# --------------------------------------------------------------------------------------------
# Logs: records with extreme timestamps and durations are dropped by field, never expanded


def _treatments(**record: object) -> str:
    base = {"eventType": "Combo Bolus", "created_at": "2026-01-01T08:00:00Z", "insulin": 1.0}
    return json.dumps([{**base, **record}])


def _entries(**record: object) -> str:
    return json.dumps([{"type": "sgv", "sgv": 120, **record}])


#: (id, file name, content, the field the import report names).
LOG_RECORDS = [
    ("combo-duration-1e9", "treatments.json", _treatments(relative=1, duration=1e9), "duration"),
    ("combo-duration-1e308", "treatments.json", _treatments(relative=1, duration=1e308),
     "duration"),
    ("combo-duration-ms-1e18", "treatments.json",
     _treatments(relative=1, durationInMilliseconds=1e18), "durationInMilliseconds"),
    ("temp-basal-duration-1e9", "treatments.json",
     _treatments(eventType="Temp Basal", absolute=1.0, duration=1e9), "duration"),
    ("suspend-duration-1e12", "treatments.json",
     _treatments(eventType="Suspend Pump", duration=1e12), "duration"),
    ("treatment-year-1", "treatments.json", _treatments(created_at="0001-01-01T00:00:00Z"),
     "created_at"),
    ("treatment-year-9999", "treatments.json", _treatments(created_at="9999-12-31T23:59:59Z"),
     "created_at"),
    ("treatment-ms-1e20", "treatments.json", _treatments(created_at=None, mills=1e20), "mills"),
    ("treatment-ms-negative", "treatments.json", _treatments(created_at=None, mills=-1e15),
     "mills"),
    ("entry-year-1", "entries.json", _entries(dateString="0001-01-01T00:00:00Z"), "dateString"),
    ("entry-ms-1e300", "entries.json", _entries(date=1e300), "date"),
    ("entry-ms-year-1", "entries.json", _entries(date=-62135596800000), "date"),
    ("entry-year-9999-offset", "entries.json", _entries(dateString="9999-12-31T23:59:59-23:59"),
     "dateString"),
    ("csv-year-1", "log.csv", "time,cgm_mg_dl\n0001-01-01T00:00:00+00:00,120\n", "time"),
    ("csv-year-9999", "log.csv", "time,cgm_mg_dl\n9999-12-31T23:59:59-23:59,120\n", "time"),
    ("csv-year-2101", "log.csv", "time,cgm_mg_dl\n2101-01-01T00:00:00+00:00,120\n", "time"),
    ("json-nested", "treatments.json", "[" * 100_000 + "]" * 100_000, "nested"),
    ("json-not-a-list", "entries.json", '"hello"', "entries.json"),
    ("csv-nul", "log.csv", "time,cgm_mg_dl\n2026-01-01T00:00:00Z,1\x0020\n", "log.csv"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "field"),
    [pytest.param(n, c, f, id=i) for i, n, c, f in LOG_RECORDS],
)
def test_a_hostile_log_record_is_dropped_or_refused_naming_its_field(
    tmp_path: Path, name: str, content: str, field: str
) -> None:
    path = _write(tmp_path / name, content)
    assert_refused(["twin", "fit", str(path), "--out", str(tmp_path / "t.yaml")], field)


def test_a_combo_bolus_of_a_billion_minutes_is_dropped_not_expanded(tmp_path: Path) -> None:
    from twinloop.twins.logs import read_log

    path = _write(tmp_path / "treatments.json", _treatments(relative=1, duration=1e9))
    log = read_log(path)
    assert log.table.num_rows == 1  # the immediate 1 U bolus only, not 2 * 10^8 boluses
    (issue,) = [i for i in log.report.issues if i.column == "duration"]
    assert "longer than" in issue.problem and issue.action.startswith("dropped")


# --------------------------------------------------------------------------------------------
# Config values: counts and sizes in YAML files, refused by key before anything is allocated


def _train_config(**settings: object) -> str:
    base: dict[str, object] = {"algorithm": "ppo", "n_envs": 1, "n_timesteps": 64}
    return json.dumps({"twinloop/T1D-v0": {**base, **settings}})


TRAIN_VALUES = [
    ("n_envs", 100_000_000), ("n_envs", 0), ("n_envs", -1), ("n_envs", 1e308), ("n_envs", "8"),
    ("n_envs", 2.5), ("n_envs", True), ("n_timesteps", 10**11), ("n_timesteps", 0),
    ("n_timesteps", float("nan")), ("checkpoint_freq", -1), ("checkpoint_freq", 10**11),
    ("torch_threads", 100_000), ("torch_threads", 0), ("seeds", [-1]), ("seeds", [2**32]),
    ("seeds", list(range(1001))), ("seeds", []), ("seeds", "abc"), ("n_steps", 10**9),
    ("n_steps", 0), ("batch_size", 10**9), ("n_epochs", 10**6), ("learning_rate", float("inf")),
    ("learning_rate", "abc"), ("gamma", float("nan")), ("policy_kwargs", "dict(a=1)"),
    ("policy_kwargs", {"activation_fn": "os.system"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value"), [pytest.param(k, v, id=f"{k}={str(v)[:20]}") for k, v in TRAIN_VALUES]
)
def test_a_train_config_value_out_of_range_is_refused_naming_its_key(
    tmp_path: Path, key: str, value: object
) -> None:
    path = _write(tmp_path / "train.yaml", _train_config(**{key: value}))
    assert_refused(["train", str(path), "--no-progress"], key)


def test_sac_buffer_and_rollout_sizes_are_bounded(tmp_path: Path) -> None:
    sac = _write(tmp_path / "sac.yaml", _train_config(algorithm="sac", buffer_size=10**9))
    assert_refused(["train", str(sac)], "buffer_size")
    rollout = _write(tmp_path / "ppo.yaml", _train_config(n_envs=1024, n_steps=100_000))
    assert_refused(["train", str(rollout)], "n_steps")


RUN_CONFIG_VALUES = [
    ("days", 1_000_000_000), ("days", "abc"), ("days", [1]), ("seed", -1), ("seed", 2**64),
    ("seed", "x"), ("time_scale", ".inf"), ("time_scale", -1), ("refit_every_days", -1),
    ("parallel_patients", 0), ("no_such_key", 1),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value"), [pytest.param(k, v, id=f"{k}={v}") for k, v in RUN_CONFIG_VALUES]
)
def test_a_run_config_value_out_of_range_is_refused_naming_its_key(
    tmp_path: Path, key: str, value: object
) -> None:
    text = f"{key}: {value}\n"
    path = _write(tmp_path / "run.yaml", text)
    argv = ["run", "--config", str(path), "--placement", "inline", "--patient", "adult#999",
            "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert_refused(argv, key.replace("_", "-") if key != "no_such_key" else key)


# --------------------------------------------------------------------------------------------
# Campaign specs (campaigns/, another engineer's): counts, durations, names


_SPEC = """name: {name}
therapy: glucose
patients: [adult#001]
controller: basal-bolus
days: {days}
seeds: {seeds}
defaults: {{start: 360, duration: 240}}
scenarios:
  - name: s
    faults:
      - {{fault: bias, channel: sensor->controller, start: 420, duration: {duration},
         params: {{offset: 80}}}}
{extra}"""


def _spec(**fields: object) -> str:
    values: dict[str, object] = {"name": "h", "days": 1, "seeds": "[0]", "duration": 30,
                                 "extra": ""}  # fmt: skip
    return _SPEC.format(**{**values, **fields})


SPEC_CASES = [
    pytest.param(_spec(extra="random: {count: 100000000, faults: [stuck]}\n"), "count", True,
                 id="random.count=1e8"),
    pytest.param(_spec(days=1_000_000_000), "days", False, id="days=1e9"),
    pytest.param(_spec(days="1e308"), "days", False, id="days=1e308"),
    pytest.param(_spec(days=-1), "days", False, id="days=-1"),
    pytest.param(_spec(days="abc"), "days", False, id="days=abc"),
    pytest.param(_spec(seeds="[-1]"), "seeds", False, id="seeds=-1"),
    pytest.param(_spec(seeds="abc"), "seeds", False, id="seeds=abc"),
    pytest.param(_spec(duration="1e300"), "duration", False, id="duration=1e300"),
    pytest.param(_spec(duration="-5"), "duration", False, id="duration=-5"),
    pytest.param(_spec(duration=".nan"), "duration", False, id="duration=nan"),
    pytest.param(_spec(name="../../x"), "name", False, id="name=../../x"),
    pytest.param(_spec().replace("{start: 360,", "{start: abc,"), "start", False,
                 id="defaults.start=abc"),
    pytest.param(_spec().replace("duration: 240}", "duration: .nan}"), "duration", False,
                 id="defaults.duration=nan"),
    pytest.param(_spec(extra="random: {count: -1, faults: [stuck]}\n"), "count", False,
                 id="random.count=-1"),
    pytest.param(_spec(extra="random: {count: abc, faults: [stuck]}\n"), "count", False,
                 id="random.count=abc"),
    pytest.param(_spec(extra="random: {count: 10001, faults: [stuck]}\n"), "count", False,
                 id="random.count=10001"),
    pytest.param(_spec(extra="random: {count: 1, seed: -1, faults: [stuck]}\n"), "seed", False,
                 id="random.seed=-1"),
    pytest.param(_spec(extra="random: {count: 1, per_scenario: 0, faults: [stuck]}\n"),
                 "per_scenario", False, id="random.per_scenario=0"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "field", "child"), SPEC_CASES)
def test_a_campaign_spec_value_out_of_range_is_refused_naming_its_field(
    tmp_path: Path, text: str, field: str, child: bool
) -> None:
    path = _write(tmp_path / "spec.yaml", text)
    argv = ["campaign", str(path), "--inline", "--no-progress", "--out", str(tmp_path / "c")]
    assert_refused(argv, field, child=child)


# --------------------------------------------------------------------------------------------
# Device profiles (hw_bridge/, another engineer's): hostile files through `twinloop hil`,
# unsafe contents through the loader (the CLI would connect to the device next)


def _profile(edit: Callable[[str], str]) -> str:
    from importlib import resources

    shipped = resources.files("twinloop.hw_bridge").joinpath("profiles/insulin_pump_tcp.yaml")
    return edit(shipped.read_text(encoding="utf-8"))


PROFILE_CONTENT = [
    ("safe-state-bolus", lambda t: t.replace("safe_state:\n",
     "safe_state:\n  - {register: bolus_u, value: 25}\n", 1), "safe_state", ()),
    ("safe-state-empty", lambda t: t[: t.index("safe_state:")] + "safe_state: []\n",
     "safe_state", ()),
    ("bolus-limit-1000", lambda t: t.replace("minimum: 0, maximum: 25, channel: bolus_u",
     "minimum: 0, maximum: 1000, channel: bolus_u"), "bolus_u", ()),
    ("port-70000", lambda t: t.replace("port: 5020", "port: 70000"), "port", ()),
    ("timeout-inf", lambda t: t.replace("timeout_s: 0.5", "timeout_s: .inf"), "timeout_s", ()),
    ("retries-1e9", lambda t: t.replace("retries: 2", "retries: 1000000000"), "retries", ()),
    ("address-negative", lambda t: t.replace("address: 0, dtype: float32",
     "address: -1, dtype: float32", 1), "address", ()),
    ("maximum-nan", lambda t: t.replace("maximum: 35, channel: basal_u_per_h",
     "maximum: .nan, channel: basal_u_per_h"), "maximum", ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "field"),
    [pytest.param(e, f, id=i, marks=m) for i, e, f, m in PROFILE_CONTENT],
)
def test_an_unsafe_or_out_of_range_profile_is_refused_by_field(
    tmp_path: Path, edit: Callable[[str], str], field: str
) -> None:
    from twinloop.hw_bridge.profile import load_profile

    path = _write(tmp_path / "pump.yaml", _profile(edit))
    with pytest.raises(ValueError, match=field) as err:
        load_profile(path)
    assert str(path) in str(err.value) or "insulin_pump" in str(err.value)


# --------------------------------------------------------------------------------------------
# Saved policies: hostile policy.json / weights behind --controller policy:DIR


def _policy(tmp_path: Path, kind: str) -> Path:
    import shutil

    from twinloop.policies.saved import shipped_policies

    d = tmp_path / "policy"
    shutil.copytree(shipped_policies()["t1d_ppo"], d)
    meta, weights = d / "policy.json", d / "policy.pt"
    if kind == "json-binary":
        _write(meta, b"\x89PNG\x00\x01")
    elif kind == "json-utf16":
        _write(meta, '{"format": "twinloop-policy"}'.encode("utf-16"))
    elif kind == "json-huge":
        _sparse(meta, 2 * 1024 * 1024)
    elif kind == "json-dev-zero":
        meta.unlink()
        meta.symlink_to("/dev/zero")
    elif kind == "json-nested":
        _write(meta, "[" * 100_000 + "]" * 100_000)
    elif kind == "weights-dev-zero":
        weights.unlink()
        weights.symlink_to("/dev/zero")
    elif kind == "weights-garbage":
        _write(weights, b"PK\x03\x04garbage")
    elif kind == "network-huge-space":
        data = json.loads(meta.read_text())
        data["network"]["observation_space"]["shape"] = [10**9]
        meta.write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    "kind",
    ["json-binary", "json-utf16", "json-huge", "json-dev-zero", "json-nested", "weights-dev-zero",
     "weights-garbage", "network-huge-space"],
)  # fmt: skip
def test_a_hostile_saved_policy_is_refused_naming_it(tmp_path: Path, kind: str) -> None:
    d = _policy(tmp_path, kind)
    argv = ["run", "--placement", "inline", "--patient", "adult#001", "--days", "1",
            "--no-progress", "--controller", f"policy:{d}",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert_refused(argv, str(d))


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (["run", "--placement", "inline", "--no-progress", "--config"],
         _ALIAS_BOMB + "patient: *l9\n"),
        (["run", "--placement", "inline", "--no-progress", "--config"], "patient: &p [*p]\n"),
        (["train"], _ALIAS_BOMB + "twinloop/T1D-v0: {seeds: *l9}\n"),
        (["train"], "twinloop/T1D-v0: &t {seeds: [0], policy_kwargs: *t}\n"),
    ],
    ids=["run-bomb", "run-recursive", "train-bomb", "train-recursive"],
)  # fmt: skip
def test_yaml_aliases_that_expand_or_recurse_are_refused_before_use(
    tmp_path: Path, command: list[str], text: str
) -> None:
    path = _write(tmp_path / "aliases.yaml", text)
    code, err = _run([*command, str(path)])
    assert code == EXIT_USAGE and "Traceback" not in err
    assert str(path) in err and ("values (YAML aliases" in err or "recursive alias" in err), err


# --------------------------------------------------------------------------------------------
# Run directories (export fhir, twin fit RUN_DIR): a hostile manifest.json


def _run_dir(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    manifest = d / "manifest.json"
    if kind == "binary":
        _write(manifest, b"\x89PNG\x00\x01")
    elif kind == "utf16":
        _write(manifest, '{"complete": true}'.encode("utf-16"))
    elif kind == "nested":
        _write(manifest, "[" * 100_000 + "]" * 100_000)
    elif kind == "huge":
        _sparse(manifest, MAX_LOG_BYTES + 1)
    elif kind == "not-an-object":
        _write(manifest, "[1, 2]")
    elif kind == "dev-zero":
        manifest.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(manifest)
    return d


RUN_DIR_KINDS = ("binary", "utf16", "nested", "huge", "not-an-object", "dev-zero", "fifo")


@pytest.mark.parametrize("kind", RUN_DIR_KINDS)
@pytest.mark.parametrize("command", ["export", "twin"])
def test_a_run_directory_with_a_hostile_manifest_is_refused_naming_it(
    tmp_path: Path, command: str, kind: str
) -> None:
    d = _run_dir(tmp_path, kind)
    if command == "export":
        argv = ["export", "fhir", str(d), "--out", str(tmp_path / "bundle.json")]
    else:
        argv = ["twin", "fit", str(d), "--out", str(tmp_path / "twin.yaml")]
    assert_refused(argv, str(d))  # the manifest, or the run directory it fails to describe
