"""The ``twinloop`` command line.

``run`` (the closed loop), ``report``, ``simulate``, ``replay``, ``emulate`` (plant-backed
devices on real protocols) and ``hil`` (the rig).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence

import numpy as np

from twinloop.agents.errors import AgentError
from twinloop.plant.errors import InvalidInputError, PlantError
from twinloop.plant.glucose.uva_padova import DEFAULT_EAT_RATE_G_PER_MIN
from twinloop.policies.errors import PolicyError


def _clock(text: str) -> int:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise argparse.ArgumentTypeError(f"{text!r} is not a clock time HH:MM (00:00-23:59)")
    return int(m.group(1)) * 60 + int(m.group(2))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinloop", description="Closed-loop therapy around a human digital twin."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="simulate a cohort under basal-bolus therapy and print clinical metrics",
        description="Simulate virtual patients (UVA/Padova 2008) for whole days under open-loop "
        "basal-bolus therapy (basal rate + carbs/CR bolus at each announced meal) and print "
        "their clinical metrics.",
    )
    sim.add_argument("--patient", action="append", default=[], help="patient name (repeatable)")
    sim.add_argument(
        "--cohort", action="append", default=[], help="adolescents|adults|children|all"
    )
    sim.add_argument("--scenario", default="random", help="meal scenario: random (default) or A")
    sim.add_argument("--days", type=int, default=1, help="days to simulate (default 1)")
    sim.add_argument("--seed", type=_seed, default=0, help="seed of meals and counting errors")
    sim.add_argument(
        "--carb-error", type=float, default=0.0, help="uniform carb-counting error, e.g. 0.3"
    )
    sim.add_argument("--out", help="also write the per-minute trajectories to this CSV")

    run = sub.add_parser(
        "run",
        help="run the closed loop (sensor, controller, supervisor, pump) on a cohort",
        description="Run the closed loop in simulated time, in process: CGM with noise, the "
        "controller under the safety supervisor, the pump, the UVA/Padova patient; record every "
        "channel to Parquet with a manifest and summary metrics in a run directory.",
    )
    run.add_argument("--patient", action="append", default=[], help="patient name (repeatable)")
    run.add_argument("--cohort", action="append", default=[], help="default: adults")
    run.add_argument("--config", help="YAML file setting any of the options below")
    run.add_argument("--days", type=int, help="simulated days (default 1)")
    run.add_argument(
        "--controller",
        help="basal-bolus (default), pid, oref0, mpc, or policy:PATH (a policy saved by "
        "twinloop train)",
    )
    run.add_argument("--scenario", help="meal scenario: random (default) or A")
    run.add_argument("--seed", type=_seed, help="seed of meals and sensor noise (default 0)")
    run.add_argument("--out", help="run directory (default runs/run-YYYYmmdd-HHMMSS)")
    run.add_argument(
        "--placement",
        choices=["inline", "ray", "ray-patients"],
        help="where agents run: each agent as a Ray actor (ray, the default), in process "
        "(inline), or each patient's whole loop in a Ray worker, patients in parallel "
        "(ray-patients: the fast way to run a large cohort)",
    )
    run.add_argument(
        "--address", help="HOST:PORT of an existing Ray cluster (default: an embedded Ray)"
    )
    run.add_argument(
        "--parallel-patients",
        type=int,
        default=None,
        help="patient loops driven together in lockstep, one call per kind of agent and "
        "round (default: all)",
    )
    run.add_argument("--clock", choices=["sim", "wall"], help="sim (default) or wall clock")
    run.add_argument(
        "--time-scale",
        type=_positive,
        help="wall-clock seconds per simulated minute with --clock wall (default 0.01)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument(
        "--therapy",
        choices=["insulin", "knee-exo"],
        help="insulin (default: the glucose loop) or knee-exo (a knee in a rehabilitation "
        "exoskeleton: --patient names knee presets healthy|mild|moderate|severe, default "
        "moderate; --controller none|impedance|aan (default)|policy:PATH)",
    )
    run.add_argument(
        "--task", help="knee-exo: cyclic (default, flexion-extension), sit_to_stand or hold"
    )
    run.add_argument("--cycles", type=int, help="knee-exo: cycles of the cyclic task (10)")
    run.add_argument("--control-hz", type=int, help="knee-exo: control rate, Hz (100)")
    run.add_argument(
        "--no-twin", action="store_true", help="knee-exo: run without the knee twin estimator"
    )

    report = sub.add_parser(
        "report",
        help="rebuild the summary, plots and report.md of a recorded run",
        description="Rebuild summary.json, PNG plots (glucose, CGM, meals, insulin, supervisor "
        "interventions; ambulatory glucose profiles for multi-day runs) and report.md from a "
        "run directory's recording, without re-running it.",
    )
    report.add_argument("run_dir", help="a run directory written by `twinloop run`")
    report.add_argument(
        "--allow-incomplete", action="store_true", help="also report an interrupted run"
    )

    rep = sub.add_parser(
        "replay",
        help="drive patients with per-minute insulin and meal inputs from a CSV",
        description="Replay per-minute inputs (columns minute,insulin_u_per_min,meal_g and an "
        "optional patient) on virtual patients from their default initial state; write "
        "patient,minute,clock,bg_mg_dl,gsub_mg_dl,insulin_u_per_min,carbs_g.",
    )
    rep.add_argument("--patient", action="append", default=[], help="patient name (repeatable)")
    rep.add_argument(
        "--cohort", action="append", default=[], help="adolescents|adults|children|all"
    )
    rep.add_argument("--inputs", required=True, help="inputs CSV")
    rep.add_argument("--out", required=True, help="output trajectory CSV")
    rep.add_argument("--start", type=_clock, default=0, help="clock time of minute 0 (HH:MM)")
    rep.add_argument(
        "--eat-rate",
        type=_positive,
        default=DEFAULT_EAT_RATE_G_PER_MIN,
        help="eating speed in g/min (default 5)",
    )
    from twinloop.cli.hil import add_parsers

    add_parsers(sub, _positive, _seed)
    from twinloop.cli.evaluate import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)
    from twinloop.cli.train import add_parser as add_train_parser

    add_train_parser(sub, _seed)
    from twinloop.cli.campaign import add_parser as add_campaign_parser

    add_campaign_parser(sub)
    from twinloop.cli.export import add_parser as add_export_parser

    add_export_parser(sub)
    from twinloop.cli.population import add_parser as add_population_parser

    add_population_parser(sub)
    from twinloop.cli.twin import add_parser as add_twin_parser

    add_twin_parser(sub)
    return parser


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
    if args.days < 1:
        raise InvalidInputError(f"--days: {args.days} must be >= 1")
    patients = resolve_patients(args.patient, args.cohort or ([] if args.patient else ["all"]))
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


#: Keys of a ``twinloop run --config`` YAML file, with their defaults.
RUN_DEFAULTS: dict[str, object] = {
    "therapy": "insulin",
    "patients": ["adults"],
    "days": 1,
    "seed": 0,
    "controller": "basal-bolus",
    "scenario": "random",
    "placement": "ray",
    "clock": "sim",
    "time_scale": 0.01,
    "address": None,
    "parallel_patients": None,
    "out": None,
}


#: Keys of a ``twinloop run --therapy knee-exo --config`` YAML file, with their defaults.
EXO_RUN_DEFAULTS: dict[str, object] = {
    "therapy": "knee-exo",
    "patients": ["moderate"],
    "task": "cyclic",
    "cycles": 10,
    "seed": 0,
    "controller": "aan",
    "control_hz": 100,
    "twin": True,
    "placement": "inline",
    "address": None,
    "out": None,
}

#: Options of ``twinloop run`` that only the insulin loop has.
INSULIN_ONLY = ("days", "scenario", "clock", "time_scale", "parallel_patients")
#: Options only the knee-exoskeleton loop has.
EXO_ONLY = ("task", "cycles", "control_hz")


def _therapy(args: argparse.Namespace) -> str:
    """The therapy asked for on the command line or in the YAML file (insulin by default)."""
    if args.therapy:
        return str(args.therapy)
    if args.config:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError):
            return "insulin"  # reported properly when the file is read as settings
        if isinstance(loaded, dict) and loaded.get("therapy") is not None:
            value = loaded["therapy"]
            if value not in ("insulin", "knee-exo"):
                raise InvalidInputError(
                    f"--config {args.config}: therapy={value!r}; allowed: insulin, knee-exo"
                )
            return str(value)
    return "insulin"


def _run_settings(
    args: argparse.Namespace, defaults: dict[str, object] | None = None
) -> argparse.Namespace:
    """Defaults, overridden by the YAML file, overridden by options given on the command line."""
    import yaml

    table = RUN_DEFAULTS if defaults is None else defaults
    settings = dict(table)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except OSError as exc:
            raise InvalidInputError(
                f"--config {args.config}: cannot read: {exc.strerror}"
            ) from None
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"--config {args.config}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"--config {args.config}: expected a mapping of options")
        for key, value in loaded.items():
            if key not in table:
                raise InvalidInputError(
                    f"--config {args.config}: unknown key {key!r}; allowed: {', '.join(table)}"
                )
            expected = type(table[key]) if table[key] is not None else None
            if key == "patients" and isinstance(value, str):
                value = [value]
            ok = expected is None or (isinstance(value, expected) and not isinstance(value, bool))
            if expected is bool:
                ok = isinstance(value, bool)
            if key == "time_scale":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            if not ok:
                raise InvalidInputError(
                    f"--config {args.config}: {key}={value!r} has the wrong type; expected "
                    f"{expected.__name__ if expected else 'a value'} like {table[key]!r}"
                )
            settings[key] = value
    names = [*args.patient, *args.cohort]
    if names:
        settings["patients"] = names
    for key in table:
        value = getattr(args, key, None)
        if key != "patients" and value is not None:
            settings[key] = value
    return argparse.Namespace(**settings)


def _run(cli_args: argparse.Namespace) -> int:
    from twinloop.agents.glucose.loop import LoopConfig
    from twinloop.agents.glucose.run import run_cohort
    from twinloop.agents.placement import (
        InlinePlacement,
        Placement,
        RayPatientsPlacement,
        RayPlacement,
        start_ray,
    )

    therapy = _therapy(cli_args)
    if therapy == "knee-exo":
        return _run_exo(cli_args)
    given = [k for k in EXO_ONLY if getattr(cli_args, k, None) is not None]
    if cli_args.no_twin:
        given.append("no_twin")
    if given:
        raise InvalidInputError(
            f"--{given[0].replace('_', '-')} is an option of --therapy knee-exo only"
        )
    args = _run_settings(cli_args)
    args.no_progress = cli_args.no_progress
    names = list(args.patients)
    config = LoopConfig(
        patients=tuple(names),
        days=args.days,
        seed=args.seed,
        controller=args.controller,
        scenario=args.scenario,
        clock=args.clock,
        wall_s_per_sim_min=args.time_scale,
    )
    out = args.out or time.strftime("runs/run-%Y%m%d-%H%M%S")
    placement: Placement = InlinePlacement()
    if args.placement == "ray-patients":
        start_ray(args.address)
        placement = RayPatientsPlacement()
    elif args.placement == "ray" or args.address:
        start_ray(args.address)
        placement = RayPlacement()
    t0 = time.perf_counter()
    try:
        run_dir, summary = run_cohort(
            config,
            out,
            progress=not args.no_progress,
            placement=placement,
            parallel_patients=args.parallel_patients,
        )
    finally:
        if placement.name.startswith("ray"):
            import ray

            ray.shutdown()
    elapsed = time.perf_counter() - t0
    cols = (
        ("mean", "mean_mg_dl"),
        ("TIR%", "time_in_range_70_180_pct"),
        ("<70%", "time_below_70_pct"),
        ("<54%", "time_below_54_pct"),
        (">180%", "time_above_180_pct"),
    )
    header = f"{'patient':<16}" + "".join(f"{c:>8}" for c, _ in cols)
    print(
        f"twinloop run: {len(summary['patients'])} patients × {args.days} day(s), controller "
        f"{args.controller} under the safety supervisor, seed {args.seed}, agents "
        f"{placement.name}; plasma glucose mg/dL"
    )
    print(header)
    print("-" * len(header))
    for name, row in [*summary["patients"].items(), *summary["cohorts"].items()]:
        print(f"{name:<16}" + "".join(f"{row[f]:8.1f}" for _, f in cols))
    print(f"{len(summary['patients']) * args.days} patient-day(s) in {elapsed:.1f} s")
    if "tick_lateness_ms" in summary:
        late = summary["tick_lateness_ms"]
        print(
            f"wall clock: {late['ticks']} ticks, lateness p50 {late['p50']:.2f} ms, "
            f"p99 {late['p99']:.2f} ms, max {late['max']:.2f} ms"
        )
    print(f"recording: {run_dir}")
    return 0


def _run_exo(cli_args: argparse.Namespace) -> int:
    """``twinloop run --therapy knee-exo``: the knee-exoskeleton loop, recording and report."""
    from twinloop.agents.knee.loop import ExoLoopConfig
    from twinloop.agents.knee.report import build_exo_report
    from twinloop.agents.knee.run import run_knee_exo
    from twinloop.agents.placement import InlinePlacement, Placement, RayPlacement, start_ray

    given = [k for k in INSULIN_ONLY if getattr(cli_args, k, None) is not None]
    if cli_args.cohort:
        given.insert(0, "cohort")
    if given:
        raise InvalidInputError(
            f"--{given[0].replace('_', '-')} is an option of the insulin loop; the knee-exo "
            "run takes --patient (knee presets), --task, --cycles, --controller, --seed, "
            "--control-hz, --no-twin, --placement, --address, --out, --config"
        )
    if cli_args.placement == "ray-patients":
        raise InvalidInputError(
            "--placement ray-patients is for the insulin loop; knee-exo runs inline or ray"
        )
    if cli_args.no_twin:
        cli_args.twin = False
    args = _run_settings(cli_args, EXO_RUN_DEFAULTS)
    config = ExoLoopConfig(
        patients=tuple(str(p) for p in args.patients),
        task=args.task,
        cycles=args.cycles,
        seed=args.seed,
        controller=args.controller,
        control_hz=args.control_hz,
        twin=args.twin,
    )
    out = args.out or time.strftime("runs/exo-%Y%m%d-%H%M%S")
    placement: Placement = InlinePlacement()
    if args.placement == "ray" or args.address:
        start_ray(args.address)
        placement = RayPlacement()
    t0 = time.perf_counter()
    try:
        run_dir, summary = run_knee_exo(
            config, out, progress=not cli_args.no_progress, placement=placement
        )
    finally:
        if placement.name.startswith("ray"):
            import ray

            ray.shutdown()
    elapsed = time.perf_counter() - t0
    report = build_exo_report(run_dir)
    cols = (
        ("RMS err°", "rms_error_deg", "8.2f"),
        ("max err°", "max_error_deg", "8.2f"),
        ("exo work", "exo_work_fraction", "8.0%"),
        ("effort", "patient_effort", "8.3f"),
        ("spastic", "spasticity_events", "8d"),
        ("limits", "limit_violations", "8d"),
    )
    header = f"{'patient':<10}" + "".join(f"{c:>9}" for c, _, _ in cols) + "  overrides"
    seconds = sum(row["duration_s"] for row in summary["patients"].values())
    print(
        f"twinloop run: knee exoskeleton, {len(config.patients)} patient(s), task {config.task}"
        f", controller {config.controller} under the exoskeleton supervisor, "
        f"{config.control_hz} Hz, twin {'on' if config.twin else 'off'}, seed {config.seed}, "
        f"agents {placement.name}"
    )
    print(header)
    print("-" * len(header))
    for name, row in summary["patients"].items():
        overrides = ", ".join(f"{k} {v}" for k, v in row["overrides"].items()) or "none"
        cells = "".join(f" {row[f]:{fmt}}" for _, f, fmt in cols)
        print(f"{name:<10}{cells}  {overrides}")
        if "twin" in row:
            tw = row["twin"]
            print(
                f"{'':<10} twin: voluntary capacity {tw['voluntary_capacity']:.2f} (true "
                f"{tw['voluntary_capacity_true']:.2f}), effort {tw['voluntary_effort']:.2f} "
                f"(true {tw['voluntary_effort_true']:.2f}), spasticity gain "
                f"{tw['spasticity_gain_per_rad_s']:.3f} (true "
                f"{tw['spasticity_gain_true_per_rad_s']:.3f}) /(rad/s)"
            )
    print(
        f"{seconds:.1f} s of task simulated in {elapsed:.1f} s ({seconds / elapsed:.0f}× real time)"
    )
    print(f"recording: {run_dir}; report: {report.report_path} ({len(report.plots)} plots)")
    return 0


def _hardware(args: argparse.Namespace) -> int:
    from twinloop.cli import hil as hil_cli
    from twinloop.hil.glucose.rig import RigConfigError
    from twinloop.hw_bridge.errors import BridgeError

    try:
        return hil_cli.emulate(args) if args.command == "emulate" else hil_cli.hil(args)
    except (BridgeError, RigConfigError, ValueError, OSError) as exc:  # ssl.SSLError is OSError
        return hil_cli.main_error(args.command, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (errors print one line, never a traceback)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "replay":
            return _replay(args)
        if args.command == "run":
            return _run(args)
        if args.command in ("emulate", "hil"):
            return _hardware(args)
        if args.command == "evaluate":
            from twinloop.cli.evaluate import main_evaluate

            return main_evaluate(args)
        if args.command == "train":
            from twinloop.cli.train import main_train

            return main_train(args)
        if args.command == "campaign":
            from twinloop.cli.campaign import main_campaign

            return main_campaign(args)
        if args.command == "export":
            from twinloop.cli.export import main_export

            return main_export(args)
        if args.command == "population":
            from twinloop.cli.population import main_population

            return main_population(args)
        if args.command == "twin":
            from twinloop.cli.twin import main_twin

            return main_twin(args)
        if args.command == "report":
            from twinloop.agents.glucose.report import build_report
            from twinloop.agents.knee.report import build_exo_report, is_exo_recording
            from twinloop.hil.glucose.report import build_hil_report, is_hil_recording

            if is_exo_recording(args.run_dir):
                exo_result = build_exo_report(args.run_dir, allow_incomplete=args.allow_incomplete)
                print(f"report: {exo_result.report_path} ({len(exo_result.plots)} plots)")
                return 0
            if is_hil_recording(args.run_dir):
                hil_result = build_hil_report(args.run_dir, allow_incomplete=args.allow_incomplete)
                print(f"report: {hil_result.report_path} ({len(hil_result.plots)} plots)")
                return 0

            result = build_report(args.run_dir, allow_incomplete=args.allow_incomplete)
            print(f"report: {result.report_path} ({len(result.plots)} plots)")
            return 0
        return _simulate(args)
    except (PlantError, AgentError, PolicyError) as exc:
        print(f"twinloop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
