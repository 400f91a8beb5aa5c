"""``twinloop population sample --n N --seed S --out pop.parquet``: virtual populations."""

from __future__ import annotations

import argparse
import time
from typing import Any

from twinloop.cli.options import count, seed
from twinloop.limits import MAX_PATIENTS


def add_parser(sub: Any) -> None:
    """Add the ``population`` sub-command to the ``twinloop`` parser."""
    p = sub.add_parser(
        "population",
        help="sample virtual patients from a distribution fitted to the 30 shipped ones",
        description="Sample N virtual UVA/Padova patients per age group from a log-normal "
        "model fitted to the shipped patients (twinloop.plant.glucose.population), each derived at "
        "its basal "
        "steady state and checked for physiological consistency, and write them as Parquet.",
    )
    action = p.add_subparsers(dest="population_command", required=True)
    s = action.add_parser("sample", help="draw a population and write it as Parquet")
    s.add_argument(
        "--n",
        type=count(1, MAX_PATIENTS),
        required=True,
        help=f"patients to draw, 1 to {MAX_PATIENTS} (~1 ms each)",
    )
    s.add_argument(
        "--seed", type=seed, default=0, help="seed, 0 to 2^32-1 (same seed, same population)"
    )
    s.add_argument("--out", required=True, help="output Parquet file")
    s.add_argument(
        "--group",
        action="append",
        choices=("children", "adolescents", "adults"),
        help="only these age groups, equal shares (repeatable; default all three)",
    )
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=main_population)


def main_population(args: argparse.Namespace) -> int:
    """Run ``twinloop population``; errors print one line and return 2."""
    from tqdm import tqdm

    from twinloop.plant.glucose.population import sample_population, write_population

    began = time.perf_counter()
    groups = {g: 1.0 for g in args.group} if args.group else None
    # updated per batch of draws (a few per age group), the average since the start
    with tqdm(
        total=args.n, unit="patient", desc="population", smoothing=0, leave=False,
        disable=args.no_progress,
    ) as bar:  # fmt: skip
        patients, rejected = sample_population(
            args.n, seed=args.seed, groups=groups, progress=bar.update
        )
    took = time.perf_counter() - began
    write_population(args.out, patients, seed=str(args.seed))
    counts: dict[str, int] = {}
    for p in patients:
        counts[p.cohort] = counts.get(p.cohort, 0) + 1
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
    print(
        f"population: {len(patients)} patients ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        f" in {took:.2f} s; rejected {sum(rejected.values())} ({reasons or 'none'}) -> {args.out}"
    )
    return 0
