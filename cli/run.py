"""``twinloop run``: any therapy's closed loop, recorded, with its summary printed.

The therapy (``--therapy``, default ``glucose``) is asked for everything that is its own: the
patients it knows, its controllers, the options of its loop (``--days`` for glucose, ``--task``
for the knee, ...), the placements it supports, how to run, print and report it. An option of
another therapy's loop is refused naming the therapy that has it.

Exit codes: 0 the run finished; 1 with ``--fail-on-hazard``, when a patient-run is flagged
(its summary's ``hazard_patients``: glucose, plasma glucose below
:data:`twinloop.agents.glucose.run.HAZARD_FLOOR_MG_DL` or not a number; knee-exo, the knee more
than :data:`twinloop.agents.knee.run.HAZARD_BEYOND_ROM_DEG` beyond its anatomical range of
motion or its state not a number); 2 bad input
(:data:`twinloop.cli.errors.EXIT_USAGE`, as every command), ``--out`` onto an earlier run
without ``--overwrite`` included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twinloop.cli import options
from twinloop.limits import MAX_SEED

#: Exit code of ``--fail-on-hazard`` when a patient-run is flagged.
EXIT_HAZARD = 1

#: Options every therapy's ``run`` has, with their defaults (None: the therapy's default).
COMMON: dict[str, Any] = {
    "therapy": "glucose",
    "patient": [],
    "cohort": [],
    "controller": None,
    "seed": 0,
    "out": None,
    "placement": None,
    "address": None,
    "progress": True,
    "report": True,
    "overwrite": False,
    "fail_on_hazard": False,
    "verbose": False,
}


def _run_options() -> dict[str, list[tuple[str, Any]]]:
    """Each therapy-specific run option's name → the (therapy, RunOption) that declare it."""
    from twinloop.therapy import therapies

    found: dict[str, list[tuple[str, Any]]] = {}
    for therapy in therapies():
        if therapy.has("agents"):
            for opt in therapy.part("agents").run_options:
                found.setdefault(opt.name, []).append((therapy.name, opt))
    return found


def add_parser(sub: Any) -> None:
    """Add ``run`` to the ``twinloop`` parser."""
    run = sub.add_parser(
        "run",
        help="run a therapy's closed loop (sensor, twin, controller, supervisor, actuator)",
        description="Run the closed loop of a therapy on its patients, in simulated time (or "
        "wall clock), each agent in process or as a Ray actor; record every channel to Parquet "
        "with a manifest and a summary; print the summary. A patient whose glucose left "
        "physiology (below 20 mg/dL, or not a number) is marked COLLAPSED.",
        epilog=f"exit status: 0 done; {EXIT_HAZARD} with --fail-on-hazard when a patient-run is "
        "flagged; 2 bad input (options, config, an earlier run at --out without --overwrite)",
    )
    options.add_therapy(run, default=None)
    options.add_patients(run)
    run.add_argument("--controller", help="a controller of the therapy, or policy:PATH")
    run.add_argument("--seed", type=options.seed, help="seed of the run (default 0)")
    run.add_argument(
        "--out", help="run directory (default runs/run-YYYYmmdd-HHMMSS); must be new or empty"
    )
    run.add_argument(
        "--overwrite", action="store_true", default=None,
        help="replace an earlier run at --out (refused without it)",
    )  # fmt: skip
    run.add_argument(
        "--fail-on-hazard", action="store_true", default=None,
        help=f"exit with status {EXIT_HAZARD} when a patient-run is flagged (glucose: plasma "
        "glucose below 20 mg/dL or not a number; knee-exo: the knee more than 5° beyond its "
        "anatomical range of motion, or its state not a number)",
    )  # fmt: skip
    run.add_argument("--config", help="YAML file setting any of these options (snake_case keys)")
    run.add_argument(
        "--placement",
        help="where agents run: inline (in process), ray-patients (each patient's whole loop in "
        "a Ray worker), ray (each kind of agent a Ray actor, restartable on its own) or auto "
        "(default): glucose by the run's cost — inline unless spreading its patients over the "
        "CPUs saves more than Ray's start (~5 s; e.g. --cohort all --days 7), ray-patients "
        "with --address or then; knee-exo inline, ray with --address",
    )
    run.add_argument(
        "--address", help="HOST:PORT of an existing Ray cluster (default: an embedded Ray)"
    )
    run.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None,
        help="hide the progress bar",
    )  # fmt: skip
    run.add_argument(
        "--no-report", dest="report", action="store_false", default=None,
        help="do not write report.md and the plots at the end (a 30-patient week's 63 plots "
        "take ~14 s; twinloop report RUN_DIR writes them later)",
    )  # fmt: skip
    options.add_verbose(run)
    for name, owners in _run_options().items():
        flag = "--" + name.replace("_", "-")
        which = ", ".join(t for t, _ in owners)
        opt = owners[0][1]
        if opt.flag:
            run.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{which}: {opt.help}",
            )  # fmt: skip
        else:
            run.add_argument(flag, dest=name, default=None, help=f"{which}: {opt.help}")
    run.set_defaults(handler=main_run)


def _check_common(settings: dict[str, Any]) -> None:
    """Refuse a common setting of the wrong kind (a ``--config`` file can hold anything)."""
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is not allowed: an integer from 0 to {MAX_SEED}")
    for flag in ("progress", "report", "overwrite", "fail_on_hazard", "verbose"):
        if not isinstance(settings[flag], bool):
            raise ValueError(f"{flag}={settings[flag]!r} is not allowed: true or false")
    for key in ("therapy", "controller", "out", "placement", "address"):
        value = settings[key]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key}={value!r} is not allowed: a name or a path (text)")


def _fit_twins(names: Sequence[str], out: str | Path, settings: Mapping[str, Any]) -> str:
    """``--model fit``: each patient's twin fitted from a synthesized log, as ``twin:DIR``."""
    from twinloop.twins.individualize import fitted_model

    return fitted_model(
        list(names),
        Path(out) / "twins",
        address=settings["address"],
        inline=settings["placement"] == "inline",
        progress=bool(settings["progress"]),
    )


def _auto_placement(agents: Any, loop_config: Any, address: str | None) -> tuple[str, str]:
    """The therapy's choice when no placement is asked for (its ``auto_placement``, if any)."""
    choose = getattr(agents, "auto_placement", None)
    if choose is not None:
        name, why = choose(loop_config, address)
        return str(name), str(why)
    if address and "ray" in agents.placements:
        return "ray", "--address"
    return agents.placements[0], "the therapy's default"


def main_run(args: argparse.Namespace) -> int:
    """Run the loop; print its summary; write its report; print where they are.

    Every therapy's run ends with its report (``report.md`` and plots, its agents part's
    ``report``: the same as ``twinloop report RUN_DIR`` writes from the recording).
    """
    from twinloop.agents.placement import make_placement, ray_status_line, release_placement
    from twinloop.agents.recording import new_run_dir

    config = options.read_config(args.config)
    name = args.therapy or config.get("therapy") or COMMON["therapy"]
    therapy = options.therapy_of(str(name))
    agents = therapy.part("agents")
    own = {o.name: o for o in agents.run_options}
    others = _run_options()
    # options of another therapy's loop, on the command line or in the file
    for key in [*(k for k in others if getattr(args, k, None) is not None), *config]:
        if key in others and key not in own:
            owners = ", ".join(t for t, _ in others[key])
            raise ValueError(
                f"--{key.replace('_', '-')} is an option of the {owners} loop, not of "
                f"{therapy.name}; its options: "
                + ", ".join("--" + k.replace("_", "-") for k in own)
            )
    for negative in ("progress", "report"):  # the file's spelling of --no-progress, --no-report
        if "no_" + negative in config:
            config[negative] = not config.pop("no_" + negative)
    if args.config:
        options.check_keys(args.config, config, [*COMMON, *own])
    given = {k: getattr(args, k, None) for k in [*COMMON, *own]}
    settings = options.merged({**COMMON, **{k: o.default for k, o in own.items()}}, config, given)
    _check_common(settings)
    if settings["verbose"]:  # --verbose, or the config file's verbose: true
        from twinloop.agents import ray_log

        ray_log.set_verbose(True)
    parsed: dict[str, Any] = {}
    for key, opt in own.items():
        value = settings[key]
        try:
            parsed[key] = value if value is None else opt.parse(value)
        except ValueError as exc:
            raise ValueError(f"--{key.replace('_', '-')}={value!r} is not allowed: {exc}") from None
    plant = therapy.part("plant")
    if options.as_list(settings["cohort"]) and not plant.cohorts:
        raise ValueError(
            f"--cohort: the {therapy.name} therapy has no cohorts; name its patients with "
            f"--patient ({plant.patients_help})"
        )
    names = [*options.as_list(settings["cohort"]), *options.as_list(settings["patient"])]
    plant.patient_names(names or plant.default_patients)  # unknown names: one error line
    controller = settings["controller"] or therapy.part("policies").default_controller
    allowed = therapy.part("policies").check_controller(controller)
    if allowed is not None:
        raise ValueError(f"--controller={controller!r} is not allowed: {allowed}")
    if settings["out"]:
        out = str(options.claim_out(settings["out"], overwrite=settings["overwrite"]))
    else:
        out = new_run_dir(agents.default_out)
    if parsed.get("model") == "fit":  # individualize first: the loop plans on fitted twins
        parsed["model"] = _fit_twins(names or plant.default_patients, out, settings)
    loop_config = agents.make_config(
        patients=names or plant.default_patients,
        seed=settings["seed"],
        controller=str(controller),
        options=parsed,
    )
    placement_name = settings["placement"]
    if placement_name in (None, "auto"):
        placement_name, why = _auto_placement(agents, loop_config, settings["address"])
        print(f"twinloop run: placement {placement_name} ({why}; --placement to choose)")
    if placement_name not in agents.placements:
        raise ValueError(
            f"--placement={placement_name!r} is not allowed for {therapy.name}: one of "
            + ", ".join(("auto", *agents.placements))
        )
    if settings["progress"] and placement_name != "inline":  # seconds before the bar starts
        print(ray_status_line("twinloop run", settings["address"]), file=sys.stderr, flush=True)
    placement = make_placement(placement_name, settings["address"])
    t0 = time.perf_counter()
    try:
        run_dir, summary = agents.run(
            loop_config, out, placement=placement, progress=bool(settings["progress"])
        )
    finally:
        release_placement(placement)
    for line in agents.summary_lines(
        loop_config, summary, placement=placement.name, elapsed_s=time.perf_counter() - t0
    ):
        print(line)
    if settings["report"]:
        t0 = time.perf_counter()
        report = agents.report(run_dir, allow_incomplete=False)
        plots = ""
        if report.plots:
            plots = f"{len(report.plots)} plot(s) in {Path(report.plots[0]).parent}{os.sep}, "
        print(
            f"recording: {run_dir}; report: {report.report_path} "
            f"({plots}written in {time.perf_counter() - t0:.1f} s)"
        )
    else:
        print(f"recording: {run_dir} (no report: --no-report; twinloop report {run_dir} writes it)")
    flagged = summary.get("hazard_patients") or []
    if settings["fail_on_hazard"] and flagged:
        print(
            f"twinloop run: hazard: {len(flagged)} patient-run(s) flagged "
            f"({', '.join(flagged)}); exit status {EXIT_HAZARD} (--fail-on-hazard)",
            file=sys.stderr,
        )
        return EXIT_HAZARD
    return 0
