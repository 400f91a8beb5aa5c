"""``twinloop evaluate``: controllers × cohorts × seeds of a protocol on Ray, ranked and plotted.

The therapy (``--therapy``, default glucose) is asked for its protocols and its evaluation.
One command re-runs the documented comparison and updates its table in the docs::

    twinloop evaluate --controller basal-bolus --controller pid --controller oref0
        --out docs/eval-t1d-standard --no-recordings --doc docs/evaluation.md    (one line)

``--controller``, ``--cohort`` and ``--seed`` are repeatable (a value may also be a
comma-separated list); the former ``--controllers``, ``--cohorts`` and ``--seeds`` still work,
with a warning. Exit codes (:data:`EXIT_CODES`): 0 every run finished; 1 a run errored (the
table's ✖: it raised as a whole; the others still ran and are reported), or with
``--fail-on-hazard`` a patient-run is flagged (plasma glucose below 20 mg/dL or not a number:
the table's ‡, ``hazard`` in per_patient.csv, ``hazard_patient_runs`` in the manifest); 2 bad
input: errors print one line ``twinloop evaluate: error: ...`` (``--out`` onto an earlier
output without ``--overwrite``, ``--days`` outside 1..365, a seed outside 0..2³²−1 or more than
100 of them, included) and nothing runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from twinloop.limits import MAX_WORKERS

#: Exit code of an evaluation whose runs all finished (and, with ``--fail-on-hazard``, none
#: flagged).
EXIT_OK = 0
#: Exit code of an evaluation with an errored run (``✖``: the run raised as a whole).
EXIT_FAILED = 1
#: Exit code of ``--fail-on-hazard`` when a patient-run is flagged.
EXIT_HAZARD = 1
#: The exit codes, as ``--help`` shows them.
EXIT_CODES = (
    f"exit status: {EXIT_OK} every run finished; {EXIT_FAILED} a run errored (✖ in the table), "
    f"or with --fail-on-hazard a patient-run is flagged (‡); 2 bad input, refused before "
    "anything runs (options, protocol, an earlier output at --out without --overwrite)"
)

#: The therapy evaluated when ``--therapy`` is not given.
DEFAULT_THERAPY = "glucose"
#: Former option → its name now (the values are merged, with a warning).
DEPRECATED = {"controllers": "controller", "cohorts": "cohort", "seeds": "seed"}


def add_parser(sub: Any) -> None:
    """Add the ``evaluate`` sub-command to the ``twinloop`` parser."""
    from twinloop.cli.options import add_therapy, add_verbose

    ev = sub.add_parser(
        "evaluate",
        help="compare controllers on an evaluation protocol (cohorts × seeds, on Ray)",
        description="Run every controller on every cohort and seed of an evaluation protocol "
        "(glucose default: the shipped t1d-standard: 30 patients, 7 days, random meals with "
        "±30 % carb-counting error, noisy CGM, seeds 0-2), in parallel on Ray, and write "
        "per-patient and comparison CSVs, a ranked Markdown table, plots and a manifest. "
        "Patient-runs whose plasma glucose left physiology (below 20 mg/dL, or not a number) "
        "are marked ‡ and listed.",
        epilog=EXIT_CODES,
    )
    add_therapy(ev)
    ev.add_argument(
        "--controller",
        action="append",
        default=[],
        help="a controller to evaluate (repeatable; or comma-separated): glucose basal-bolus, "
        "pid, oref0, mpc, policy:PATH (a policy saved by twinloop train)",
    )
    ev.add_argument(
        "--protocol",
        help="a protocol YAML file or a shipped protocol's name (default: the therapy's, "
        "glucose t1d-standard)",
    )
    ev.add_argument(
        "--out", help="output directory (default runs/eval-YYYYmmdd-HHMMSS); must be new or empty"
    )
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier output at --out")
    ev.add_argument(
        "--fail-on-hazard",
        action="store_true",
        help=f"exit with status {EXIT_HAZARD} when a patient-run is flagged (plasma glucose "
        "below 20 mg/dL or not a number)",
    )
    ev.add_argument("--workers", help=f"runs at once, 1..{MAX_WORKERS} (default: all CPUs)")
    ev.add_argument(
        "--address", help="HOST:PORT of an existing Ray cluster (default: an embedded Ray)"
    )
    ev.add_argument(
        "--seed",
        action="append",
        default=[],
        help="override the protocol's seeds (repeatable; 0..2**32-1, at most 100)",
    )
    ev.add_argument("--days", help="override the protocol's days (1..365)")
    ev.add_argument(
        "--model",
        help="override the protocol's model, what the twin and the MPC plan on: population "
        "(default), population:sample, twin:DIR, fit (fit each patient's twin first) or oracle; "
        "a controller NAME@MODEL (mpc@oracle) plans on MODEL",
    )
    ev.add_argument(
        "--cohort",
        action="append",
        default=[],
        help="override the protocol's cohorts (repeatable; cohort or patient names), e.g. adults",
    )
    for old in DEPRECATED:
        ev.add_argument(f"--{old}", action="append", default=[], help=argparse.SUPPRESS)
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_verbose(ev)
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
            raise ValueError(f"{option}={text!r} is not allowed: integers >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"{option}={text!r} is not allowed: integers >= {minimum}")
        values.append(value)
    return values


def _int(option: str, text: str, *, minimum: int, maximum: int | None = None) -> int:
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}..{maximum}"
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{option}={text!r} is not allowed: {allowed}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{option}={text!r} is not allowed: {allowed}")
    return value


def _merge_deprecated(args: argparse.Namespace) -> None:
    """Fold ``--controllers``/``--cohorts``/``--seeds`` into their new options, with a warning."""
    for old, new in DEPRECATED.items():
        values = getattr(args, old, None) or []
        if values:
            print(
                f"twinloop evaluate: warning: --{old} is deprecated; use --{new} (repeatable)",
                file=sys.stderr,
            )
            setattr(args, new, [*getattr(args, new), *values])


def _listed(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def command_line(args: argparse.Namespace) -> str:
    """The ``twinloop evaluate`` command that reproduces ``args`` (for the manifest and docs)."""
    words = ["twinloop", "evaluate"]
    if args.therapy is not None:
        words += ["--therapy", args.therapy]
    for option in ("controller", "cohort", "seed"):
        for value in _listed(getattr(args, option, [])):
            words += [f"--{option}", value]
    for option in ("protocol", "model", "out", "workers", "address", "days", "doc"):
        given = getattr(args, option, None)
        if given is not None:
            words += [f"--{option}", str(given)]
    for flag in ("no_progress", "no_recordings", "inline", "overwrite", "fail_on_hazard"):
        if getattr(args, flag, False):
            words.append("--" + flag.replace("_", "-"))
    return shlex.join(words)


def _evaluate(args: argparse.Namespace) -> int:
    from twinloop.agents.recording import new_run_dir
    from twinloop.cli.options import claim_out, therapy_of

    _merge_deprecated(args)
    therapy = therapy_of(args.therapy or DEFAULT_THERAPY)
    if not therapy.has("evaluation"):
        raise ValueError(f"the {therapy.name} therapy has no evaluation protocol")
    part = therapy.part("evaluation")
    controllers = _listed(args.controller)
    if not controllers:
        raise ValueError("name the controllers to compare: --controller NAME (repeatable)")
    part.check_controllers(controllers)
    if args.doc:
        part.check_doc(args.doc)  # before the runs, not after
    workers = (
        None
        if args.workers is None
        else _int("--workers", args.workers, minimum=1, maximum=MAX_WORKERS)
    )
    seeds = ",".join(_listed(args.seed))
    protocol = part.load_protocol(args.protocol)
    if any(not str(v).strip().strip(",") for v in args.seed or ()):
        raise ValueError("--seed='' is not allowed: integers in 0..4294967295")
    # the cohorts last: a refused count names its option, whatever the cohort
    overrides: list[tuple[str, dict[str, Any]]] = [
        (
            "--days",
            {"days": _int("--days", args.days, minimum=1) if args.days is not None else None},
        ),
        ("--seed", {"seeds": _ints("--seed", seeds, minimum=0) if seeds else None}),
        ("--model", {} if args.model is None else {"model": args.model}),
        ("--cohort", {"cohorts": _listed(args.cohort) or None}),
    ]
    for option, change in overrides:  # one at a time: a refusal names the option
        try:
            protocol = protocol.with_overrides(**change)
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    if args.out:
        out = str(claim_out(args.out, overwrite=args.overwrite))
    else:
        out = new_run_dir("runs/eval-%Y%m%d-%H%M%S")
    command = command_line(args)
    result = part.evaluate(
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
        part.update_doc(args.doc, result.table, command=command, wall_time_s=result.wall_time_s)
        print(f"table written into {args.doc}")
    hazards = list(getattr(result, "hazards", []))
    for h in hazards[:20]:
        print(
            f"‡ COLLAPSED: {h['controller']} on {h['patient']} ({h['cohort']}, seed {h['seed']}): "
            f"{h['minutes_non_physiological']} min non-physiological"
        )
    if len(hazards) > 20:
        print(f"‡ ... and {len(hazards) - 20} more (manifest.json: hazard_patient_runs)")
    print(f"results: {result.out_dir} (per_patient.csv, comparison.csv, results.md, plots/)")
    status = EXIT_OK
    if result.failed:
        print(
            f"twinloop evaluate: failed: {len(result.failed)} of {runs} run(s) errored (✖ in the "
            f"table; their errors in manifest.json); exit status {EXIT_FAILED}",
            file=sys.stderr,
        )
        status = EXIT_FAILED
    if args.fail_on_hazard and hazards:
        print(
            f"twinloop evaluate: hazard: {len(hazards)} patient-run(s) flagged; exit status "
            f"{EXIT_HAZARD} (--fail-on-hazard)",
            file=sys.stderr,
        )
        status = EXIT_HAZARD
    return status


def main_evaluate(args: argparse.Namespace) -> int:
    """Run ``twinloop evaluate``; errors print one line and return 2 (no traceback)."""
    return _evaluate(args)
