"""``twinloop evaluate``: controllers × cohorts × seeds of a protocol on Ray, ranked and plotted.

One command re-runs the documented comparison and updates its table in the docs::

    twinloop evaluate --controllers basal-bolus,pid,oref0 --out docs/eval-t1d-standard
        --no-recordings --doc docs/evaluation.md    (one line)

Errors print one line ``twinloop evaluate: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import shlex
import time
from typing import Any

from twinloop.evaluation.evaluate import (
    DEFAULT_PROTOCOL,
    EvaluationConfigError,
    check_controllers,
    check_doc,
    evaluate,
    load_protocol,
    update_doc,
)

#: Exit status of a command-line error.
EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    """Add the ``evaluate`` sub-command to the ``twinloop`` parser."""
    ev = sub.add_parser(
        "evaluate",
        help="compare controllers on an evaluation protocol (cohorts × seeds, on Ray)",
        description="Run every controller on every cohort and seed of an evaluation protocol "
        f"(default: the shipped {DEFAULT_PROTOCOL}: 30 patients, 7 days, random meals with "
        "±30 % carb-counting error, noisy CGM, seeds 0-2), in parallel on Ray, and write "
        "per-patient and comparison CSVs, a ranked Markdown table, plots and a manifest.",
    )
    ev.add_argument(
        "--controllers",
        required=True,
        help="comma-separated: basal-bolus, pid, oref0, mpc, policy:PATH (a policy saved by "
        "twinloop train)",
    )
    ev.add_argument(
        "--protocol",
        help=f"a protocol YAML file or a shipped protocol's name (default {DEFAULT_PROTOCOL})",
    )
    ev.add_argument("--out", help="output directory (default runs/eval-YYYYmmdd-HHMMSS)")
    ev.add_argument("--workers", help="runs at once (default: all CPUs)")
    ev.add_argument(
        "--address", help="HOST:PORT of an existing Ray cluster (default: an embedded Ray)"
    )
    ev.add_argument("--seeds", help="override the protocol's seeds, e.g. 0,1,2")
    ev.add_argument("--days", help="override the protocol's days")
    ev.add_argument(
        "--cohorts", help="override the protocol's cohorts (or patient names), e.g. adults"
    )
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ev.add_argument(
        "--no-recordings",
        action="store_true",
        help="do not keep each run's Parquet recording (~4 MB per 10 patient-weeks) in OUT/runs",
    )
    ev.add_argument(
        "--inline", action="store_true", help="run in this process, one run after another (no Ray)"
    )
    ev.add_argument(
        "--doc",
        help="also write the table and this command between the evaluation markers of this "
        "Markdown file (e.g. docs/evaluation.md)",
    )
    ev.set_defaults(handler=main_evaluate)


def _ints(option: str, text: str, *, minimum: int) -> list[int]:
    values = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise EvaluationConfigError(
                option, text, f"integers >= {minimum}, comma-separated"
            ) from None
        if value < minimum:
            raise EvaluationConfigError(option, text, f"integers >= {minimum}, comma-separated")
        values.append(value)
    return values


def _int(option: str, text: str, *, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise EvaluationConfigError(option, text, f"an integer >= {minimum}") from None
    if value < minimum:
        raise EvaluationConfigError(option, text, f"an integer >= {minimum}")
    return value


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def command_line(args: argparse.Namespace) -> str:
    """The ``twinloop evaluate`` command that reproduces ``args`` (for the manifest and docs)."""
    words = ["twinloop", "evaluate", "--controllers", args.controllers]
    for option in ("protocol", "out", "workers", "address", "seeds", "days", "cohorts", "doc"):
        value = getattr(args, option, None)
        if value is not None:
            words += [f"--{option}", str(value)]
    for flag in ("no_progress", "no_recordings", "inline"):
        if getattr(args, flag, False):
            words.append("--" + flag.replace("_", "-"))
    return shlex.join(words)


def _evaluate(args: argparse.Namespace) -> int:
    controllers = _names(args.controllers)
    check_controllers(controllers)
    if args.doc:
        check_doc(args.doc)  # before the runs, not after
    workers = None if args.workers is None else _int("--workers", args.workers, minimum=1)
    protocol = load_protocol(args.protocol).with_overrides(
        cohorts=_names(args.cohorts) if args.cohorts is not None else None,
        days=_int("--days", args.days, minimum=1) if args.days is not None else None,
        seeds=_ints("--seeds", args.seeds, minimum=0) if args.seeds is not None else None,
    )
    out = args.out or time.strftime("runs/eval-%Y%m%d-%H%M%S")
    command = command_line(args)
    result = evaluate(
        controllers,
        protocol,
        out,
        address=args.address,
        workers=workers,
        progress=not args.no_progress,
        recordings=not args.no_recordings,
        use_ray=not args.inline,
        command=command,
    )
    runs = len(result.results)
    print(
        f"twinloop evaluate: {len(controllers)} controller(s) × {len(protocol.cohorts)} "
        f"cohort(s) × {len(protocol.seeds)} seed(s) = {runs} runs of {protocol.days} day(s) "
        f"in {result.wall_time_s:.1f} s"
        + (f"; {len(result.failed)} run(s) FAILED" if result.failed else "")
    )
    print()
    print(result.table)
    if args.doc:
        update_doc(args.doc, result.table, command=command, wall_time_s=result.wall_time_s)
        print(f"table written into {args.doc}")
    print(f"results: {result.out_dir} (per_patient.csv, comparison.csv, results.md, plots/)")
    return 0


def main_evaluate(args: argparse.Namespace) -> int:
    """Run ``twinloop evaluate``; errors print one line and return 2 (no traceback)."""
    return _evaluate(args)
