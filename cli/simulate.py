"""``twinloop simulate``: the glucose plant alone, open loop (a meal scenario, or given inputs).

``twinloop simulate`` runs whole days of a meal scenario under basal-bolus therapy;
``twinloop simulate --inputs CSV`` drives the patients with given per-minute inputs (formerly
``twinloop replay``, still accepted with a warning). The default patients are the glucose
therapy's (the adults), as for ``twinloop run``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from twinloop.cli.options import clock_time, count, number, seed
from twinloop.plant.errors import InvalidInputError
from twinloop.plant.glucose.uva_padova import DEFAULT_EAT_RATE_G_PER_MIN

#: Largest ``--days`` of ``simulate``, and most patient-days of one ``simulate`` (the
#: per-minute trajectories of all patients are held in memory: ~0.15 GB per 1000 patient-days).
MAX_DAYS = 365
MAX_PATIENT_DAYS = 3650
#: Fastest ``--eat-rate``, g/min.
MAX_EAT_RATE_G_PER_MIN = 100.0


def _inputs_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--inputs",
        required=required,
        help="drive the patients with the per-minute inputs of this CSV (columns minute, "
        "insulin_u_per_min, meal_g and an optional patient) instead of a meal scenario",
    )
    parser.add_argument(
        "--start", type=clock_time, default=0, help="--inputs: clock time of minute 0 (HH:MM)"
    )
    parser.add_argument(
        "--eat-rate",
        type=number(0.0, MAX_EAT_RATE_G_PER_MIN, low_open=True),
        default=DEFAULT_EAT_RATE_G_PER_MIN,
        help=f"--inputs: eating speed in g/min, > 0 and <= {MAX_EAT_RATE_G_PER_MIN:g} (default 5)",
    )


def add_parser(sub: Any) -> None:
    """Add ``simulate`` (and its former spelling ``replay``) to the ``twinloop`` parser."""
    from twinloop.cli.options import add_patients

    sim = sub.add_parser(
        "simulate",
        help="simulate glucose patients open loop: a meal scenario under basal-bolus therapy, "
        "or per-minute inputs from a CSV",
        description="Simulate virtual patients (UVA/Padova 2008) open loop, without the "
        "loop's agents. With a meal scenario (default): whole days under basal-bolus therapy "
        "(basal rate + carbs/CR bolus at each announced meal), printing their clinical "
        "metrics. With --inputs CSV: the per-minute insulin and meals of the file, from the "
        "patients' default initial state, writing patient,minute,clock,bg_mg_dl,gsub_mg_dl,"
        "insulin_u_per_min,carbs_g to --out.",
    )
    add_patients(sim)
    sim.add_argument("--scenario", help="meal scenario: random (default) or A")
    sim.add_argument(
        "--days",
        type=count(1, MAX_DAYS),
        help=f"days to simulate, 1 to {MAX_DAYS} (default 1; at most {MAX_PATIENT_DAYS} "
        "patient-days in all)",
    )
    sim.add_argument(
        "--seed", type=seed, help="seed of meals and counting errors, 0 to 2^32-1 (default 0)"
    )
    sim.add_argument(
        "--carb-error",
        type=number(0.0, 1.0),
        help="uniform carb-counting error, a fraction from 0 to 1, e.g. 0.3 (default 0)",
    )
    sim.add_argument("--out", help="write the per-minute trajectories to this CSV")
    _inputs_options(sim, required=False)
    sim.set_defaults(handler=_simulate_command)

    rep = sub.add_parser(
        "replay",
        help="(former name of simulate --inputs)",
        description="Deprecated: use twinloop simulate --inputs CSV --out CSV.",
    )
    add_patients(rep)
    rep.add_argument("--out", required=True, help="output trajectory CSV")
    _inputs_options(rep, required=True)
    rep.set_defaults(handler=_replay_command)


#: Options of the scenario mode, refused with --inputs.
SCENARIO_ONLY = ("scenario", "days", "seed", "carb_error")


def _simulate_command(args: argparse.Namespace) -> int:
    if args.inputs:
        given = [k for k in SCENARIO_ONLY if getattr(args, k) is not None]
        if given:
            raise InvalidInputError(
                f"--{given[0].replace('_', '-')} is for a meal scenario; --inputs gives the "
                "meals and insulin itself"
            )
        if not args.out:
            raise InvalidInputError("--inputs needs --out CSV (the trajectories)")
        return _replay(args)
    if args.start != 0 or args.eat_rate != DEFAULT_EAT_RATE_G_PER_MIN:
        raise InvalidInputError("--start and --eat-rate go with --inputs")
    args.scenario = args.scenario or "random"
    args.days = 1 if args.days is None else args.days
    args.seed = 0 if args.seed is None else args.seed
    args.carb_error = 0.0 if args.carb_error is None else args.carb_error
    return _simulate(args)


def _replay_command(args: argparse.Namespace) -> int:
    print(
        "twinloop replay: warning: replay is now twinloop simulate --inputs; this name will go",
        file=sys.stderr,
    )
    return _replay(args)


def _replay(args: argparse.Namespace) -> int:
    from twinloop.plant.glucose.inputs_csv import read_inputs_csv, write_trajectory_csv
    from twinloop.plant.glucose.patients import resolve_patients
    from twinloop.plant.glucose.uva_padova import simulate

    inputs = read_inputs_csv(args.inputs)
    per_patient = None not in inputs
    names = list(args.patient)
    if per_patient and not names and not args.cohort:
        names = [str(k) for k in inputs]
    patients = resolve_patients(names, args.cohort)
    if not patients:
        raise InvalidInputError("name at least one --patient or --cohort")
    if per_patient:
        missing = [p.name for p in patients if p.name not in inputs]
        if missing:
            raise InvalidInputError(
                f"{args.inputs}: column 'patient' has no rows for {', '.join(missing)}"
            )
        rows = [inputs[p.name] for p in patients]
    else:
        rows = [inputs[None]] * len(patients)
    lengths = {len(r.insulin_u_per_min) for r in rows}
    if len(lengths) > 1:
        raise InvalidInputError(
            f"{args.inputs}: patients have different numbers of minutes {sorted(lengths)}; "
            "replay them in separate runs"
        )
    t0 = time.perf_counter()
    traj = simulate(
        patients,
        np.stack([r.insulin_u_per_min for r in rows]),
        np.stack([r.meal_g for r in rows]),
        eat_rate_g_per_min=args.eat_rate,
    )
    elapsed = time.perf_counter() - t0
    write_trajectory_csv(args.out, traj, start_min=args.start)
    k = traj.bg_mg_dl.shape[1] - 1
    print(
        f"replayed {len(patients)} patient(s) × {k} min in {elapsed:.3f} s → {args.out}",
        file=sys.stderr,
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from twinloop.plant.glucose.metrics import glucose_metrics
    from twinloop.plant.glucose.patients import resolve_patients
    from twinloop.plant.glucose.scenarios import MIN_PER_DAY, SCENARIOS, CarbCountingError
    from twinloop.plant.glucose.uva_padova import simulate

    if args.scenario not in SCENARIOS:
        raise InvalidInputError(
            f"--scenario: unknown scenario {args.scenario!r}; valid: {', '.join(SCENARIOS)}"
        )
    patients = resolve_patients(args.patient, args.cohort or ([] if args.patient else ["adults"]))
    if len(patients) * args.days > MAX_PATIENT_DAYS:
        raise InvalidInputError(
            f"--days: {len(patients)} patients × {args.days} days is more than the "
            f"{MAX_PATIENT_DAYS} patient-days one simulate holds in memory; simulate fewer "
            "patients or days per call"
        )
    error = (
        CarbCountingError(kind="uniform", magnitude=args.carb_error)
        if args.carb_error
        else (CarbCountingError())
    )
    scenario = SCENARIOS[args.scenario](carb_error=error)
    n_min = MIN_PER_DAY * args.days
    rngs = [
        np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(len(patients))
    ]
    meals = np.zeros((len(patients), n_min))
    insulin = np.zeros((len(patients), n_min))
    for i, (p, rng) in enumerate(zip(patients, rngs, strict=True)):
        meal_g, announced_g = scenario.sample(rng, days=args.days).to_minutes(n_min)
        meals[i] = meal_g
        insulin[i] = p.basal_u_per_min + announced_g / p.carb_ratio_g_per_u
    simulate(patients[:1], insulin[:1, :1], meals[:1, :1])  # compile (or load the cache) first
    t0 = time.perf_counter()
    traj = simulate(patients, insulin, meals)
    elapsed = time.perf_counter() - t0
    metrics = glucose_metrics(traj.bg_mg_dl, sample_period_min=1.0)
    m = argparse.Namespace(
        **{f: np.asarray(getattr(metrics, f)) for f in metrics.__dataclass_fields__}
    )
    header = (
        f"{'patient':<16}{'mean':>7}{'TIR%':>7}{'<70%':>7}{'<54%':>7}{'>180%':>7}"
        f"{'>250%':>7}{'LBGI':>7}{'HBGI':>7}{'GRI':>7}  CVGA"
    )
    print(
        f"twinloop simulate: {len(patients)} patients × {args.days} day(s), scenario "
        f"{args.scenario}, seed {args.seed}, open-loop basal-bolus; plasma glucose in mg/dL"
    )
    print(header)
    print("-" * len(header))
    for i, p in enumerate(patients):
        print(
            f"{p.name:<16}{m.mean_mg_dl[i]:7.1f}{m.time_in_range_70_180_pct[i]:7.1f}"
            f"{m.time_below_70_pct[i]:7.1f}{m.time_below_54_pct[i]:7.1f}"
            f"{m.time_above_180_pct[i]:7.1f}{m.time_above_250_pct[i]:7.1f}{m.lbgi[i]:7.2f}"
            f"{m.hbgi[i]:7.2f}{m.gri[i]:7.1f}  {m.cvga_zone[i]}"
        )
    print("-" * len(header))
    cohorts = [p.cohort for p in patients]
    for group in dict.fromkeys(cohorts):
        sel = np.array([c == group for c in cohorts])
        print(
            f"{group:<16}{m.mean_mg_dl[sel].mean():7.1f}"
            f"{m.time_in_range_70_180_pct[sel].mean():7.1f}{m.time_below_70_pct[sel].mean():7.1f}"
            f"{m.time_below_54_pct[sel].mean():7.1f}{m.time_above_180_pct[sel].mean():7.1f}"
            f"{m.time_above_250_pct[sel].mean():7.1f}{m.lbgi[sel].mean():7.2f}"
            f"{m.hbgi[sel].mean():7.2f}{m.gri[sel].mean():7.1f}"
        )
    days = len(patients) * args.days
    print(f"simulated {days} patient-day(s) in {elapsed * 1000:.1f} ms")
    if args.out:
        from twinloop.plant.glucose.inputs_csv import write_trajectory_csv

        write_trajectory_csv(args.out, traj)
        print(f"trajectories → {args.out}")
    return 0
