"""``twinloop twin fit | replay | synth``: twins of real people from their logs.

* ``twinloop twin fit LOGS... --out twin.yaml`` — import the log (CSV, Nightscout, a twinloop
  run; :mod:`twinloop.twins.logs`), print its import report, fit the twin
  (:mod:`twinloop.twins.identify`) and write it; ``--validate-days N`` keeps the last N days out and
  reports the twin's fidelity on them; ``--each`` fits every LOG as a different person, in parallel
  on Ray.
* ``twinloop twin replay twin.yaml LOGS... --controller NAME`` (or ``--basal-scale``,
  ``--basal-u-per-h``, ``--cr``, ``--cf``) — the logged days on the twin under the logged therapy
  and the alternative, with rescue carbohydrates, over posterior draws
  (:mod:`twinloop.twins.person`).
* ``twinloop twin synth --patient NAME --days 14 --out log.csv`` — a synthetic log of a known
  virtual patient (:mod:`twinloop.twins.synthetic`), to test the pipeline against ground truth.
* ``twinloop twin individualize --cohort adults --days 7 --out DIR`` — one twin per patient,
  fitted from a synthetic log of the patient's life (or a log of ``--logs DIR``), written as
  ``DIR/<patient>.yaml`` for a loop's ``twin:DIR`` (:mod:`twinloop.twins.individualize`).

Errors print one line ``twinloop twin: error: ...`` (with the import report when a log is
refused) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from twinloop.cli.errors import EXIT_USAGE
from twinloop.cli.options import add_count, add_verbose, finite, number, seed

#: Most days of a log fitted, validated or replayed, and of a synthetic log.
MAX_LOG_DAYS = 3650.0
MAX_SYNTH_DAYS = 365
#: Most blocks of a daily sensitivity profile; most posterior draws of a replay.
MAX_PROFILE_BLOCKS = 48
MAX_DRAWS = 10_000
#: Largest factor on the logged basal; body weight range, kg; most parallel fits.
MAX_BASAL_SCALE = 10.0
BODY_WEIGHT_KG = (1.0, 400.0)
MAX_WORKERS = 1024


def _days_option(
    parser: argparse.ArgumentParser,
    flag: str,
    text: str,
    *,
    positive: bool = False,
    default: float | None = None,
) -> None:
    """A number of days of a log: finite, ``>= 0`` (``> 0`` if ``positive``), at most 3650."""
    low = "> 0" if positive else ">= 0"
    parser.add_argument(
        flag,
        type=number(0.0, MAX_LOG_DAYS, low_open=positive),
        default=default,
        help=f"{text}; {low} and <= {MAX_LOG_DAYS:g}",
    )


def add_parser(sub: Any) -> None:
    """Add the ``twin`` sub-command to the ``twinloop`` parser."""
    p = sub.add_parser(
        "twin",
        help="fit a person's twin to their logs, replay alternative therapies on it",
        description="Twins of real people: fit a personalised UVA/Padova model to logged CGM, "
        "insulin and meals (twins/identify.py), replay the logged days under another therapy "
        "(twins/person.py), or write a synthetic log of a known virtual patient.",
    )
    action = p.add_subparsers(dest="twin_command", required=True)

    f = action.add_parser(
        "fit",
        help="fit a twin to a log (MAP, optionally a Laplace posterior)",
        description="Import the log, print its import report, fit the twin and write it as YAML.",
    )
    f.add_argument(
        "logs",
        nargs="+",
        help="log files or directories (merged: one person), or a shipped example's name "
        "(synthetic_adult006_14d, pump_export, nightscout)",
    )
    f.add_argument("--out", required=True, help="the twin's YAML (a directory with --each)")
    f.add_argument("--name", help="the twin's name (default: the first log's name)")
    f.add_argument(
        "--group",
        default="adults",
        choices=("children", "adolescents", "adults"),
        help="age group of the prior (default adults)",
    )
    _days_option(f, "--fit-days", "fit only the first D days", positive=True)
    _days_option(
        f,
        "--validate-days",
        "keep the last D days out of the fit and report the twin's fidelity on them",
        default=0.0,
    )
    add_count(
        f,
        "--profile-blocks",
        0,
        MAX_PROFILE_BLOCKS,
        "fit a daily insulin-sensitivity profile of B equal blocks (e.g. 4)",
        0,
        "default 0: none",
    )
    f.add_argument("--posterior", action="store_true", help="also compute the Laplace posterior")
    f.add_argument("--tz", help="IANA time zone of naive times in the log (e.g. Europe/Berlin)")
    f.add_argument(
        "--body-weight-kg",
        type=number(*BODY_WEIGHT_KG),
        help=f"body weight, {BODY_WEIGHT_KG[0]:g} to {BODY_WEIGHT_KG[1]:g} kg (default: group "
        "mean)",
    )
    f.add_argument(
        "--basal-u-per-h",
        "--basal",
        type=finite,
        help="scheduled basal, U/h (default: the most common logged rate)",
    )
    f.add_argument(
        "--cr",
        type=finite,
        help="carb ratio, g/U (default: inferred from the log's meal boluses; with fewer than "
        "5, the median carbs/bolus or the 500 rule)",
    )
    f.add_argument(
        "--cf",
        type=finite,
        help="correction factor, mg/dL/U (default: inferred from the log's corrections; with "
        "fewer than 3, the 1800 rule)",
    )
    f.add_argument(
        "--each",
        action="store_true",
        help="every LOG is a different person: fit them in parallel (Ray) into the --out directory",
    )
    add_count(f, "--workers", 1, MAX_WORKERS, "parallel fits with --each", None, "default: CPUs")
    f.add_argument("--inline", action="store_true", help="with --each: no Ray, one by one")
    f.add_argument("--address", help="with --each: a Ray cluster (default: embedded, loopback)")
    add_verbose(f)

    r = action.add_parser(
        "replay",
        help="replay logged days on a twin under another therapy",
        description="Re-run the log's days on the twin with the logged meals, under the logged "
        "therapy (like-for-like: no carbohydrates beyond the log's) and under the alternative (a "
        "controller, or a changed basal, CR or CF) with rescue carbohydrates (10 g every 15 min "
        "below 70 mg/dL, as ReplayBG), over posterior draws when the twin has a posterior. From "
        "--from-day D > 0 each draw starts where its online estimator got by filtering the log "
        "up to day D.",
    )
    r.add_argument("twin", help="a twin written by `twinloop twin fit`")
    r.add_argument(
        "logs", nargs="+", help="the log files or directories to replay (or an example's name)"
    )
    r.add_argument(
        "--controller",
        help="basal-bolus, pid, oref0, mpc or policy:PATH (policy:pickle:PATH loads an SB3 "
        "model.zip with pickle: only a file you trust)",
    )
    r.add_argument(
        "--model",
        default="fit",
        help="what a planning controller (mpc) plans on, through a twin estimator: fit (default: "
        "this twin's MAP), oracle (each posterior draw's own parameters), population, "
        "population:sample or twin:PATH; the plant is always this twin's posterior draws",
    )
    r.add_argument(
        "--basal-scale",
        type=number(0.0, MAX_BASAL_SCALE),
        default=1.0,
        help=f"factor on the logged basal, 0 to {MAX_BASAL_SCALE:g}",
    )
    r.add_argument("--basal-u-per-h", type=finite, help="a flat basal replacing the logged one")
    r.add_argument("--cr", type=finite, help="a new carb ratio, g/U (meal boluses recomputed)")
    r.add_argument("--cf", type=finite, help="a new correction factor, mg/dL/U")
    _days_option(
        r,
        "--from-day",
        "start at day D of the log, from the state filtered from the log before it "
        "(default 0: the basal steady state at the first reading, 3 h not scored)",
        default=0.0,
    )
    _days_option(r, "--days", "replay D days (default: to the end)", positive=True)
    add_count(r, "--draws", 1, MAX_DRAWS, "posterior draws", 50)
    r.add_argument("--seed", type=seed, default=0, help="seed of the draws, 0 to 2^32-1")
    r.add_argument(
        "--no-rescue",
        action="store_true",
        help="no rescue carbohydrates for the alternative (the logged therapy never has any)",
    )
    r.add_argument("--tz", help="IANA time zone of naive times in the log")
    r.add_argument(
        "--out",
        help="directory for replay.json, the per-minute trajectories (replay_trajectories.parquet "
        "and .csv) and replay.png; must be new or empty",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an earlier replay at --out")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r.add_argument(
        "--fhir",
        help="also write the twin's predicted days under the alternative therapy (the MAP "
        "draw: CGM every 5 min, insulin delivered) as a FHIR R4 Bundle to this JSON file",
    )

    s = action.add_parser(
        "synth",
        help="write a synthetic log of a known virtual patient (ground truth for fits)",
        description="Simulate D days of a virtual patient on basal-bolus therapy with random "
        "meals, carb-counting error, CGM error and rescue carbohydrates, and write the log in "
        "the documented CSV layout (twins/synthetic.py).",
    )
    s.add_argument("--patient", required=True, help="a patient's name (adult#001, adult#p7-0042)")
    s.add_argument(
        "--population", help="a population file (twinloop population sample) holding --patient"
    )
    add_count(s, "--days", 1, MAX_SYNTH_DAYS, "days", 14)
    s.add_argument("--seed", type=seed, default=0, help="seed, 0 to 2^32-1")
    s.add_argument("--out", required=True, help="the CSV log")
    s.add_argument(
        "--carb-error",
        type=number(0.0, 1.0),
        default=0.1,
        help="carb-counting error SD, a fraction from 0 to 1 (0.1)",
    )
    s.add_argument("--cgm", default="GuardianRT", help="CGM error model (default GuardianRT)")

    i = action.add_parser(
        "individualize",
        help="fit one twin per patient of a cohort (DIR/<patient>.yaml, for twin:DIR)",
        description="For each patient: simulate D days of their life under their usual "
        "basal-bolus therapy with a CGM (or take their log from --logs), fit their twin (the "
        "prior of their age group; body weight, age, basal, CR and CF as a clinic knows them) "
        "and write DIR/<patient>.yaml, DIR/logs/<patient>.csv and DIR/individualize.json (fit "
        "RMSE, time, and for synthetic logs the fitted vs true parameters). Fits run in parallel "
        "on Ray. Twins already in DIR for the same log and settings are reused, not refitted.",
    )
    i.add_argument(
        "--patient",
        action="append",
        default=[],
        help="a glucose patient (repeatable): adult#001, or a member of a --cohort population",
    )
    i.add_argument(
        "--cohort",
        action="append",
        default=[],
        help="a cohort (repeatable): adolescents|adults|children|all, or population:PATH",
    )
    add_count(i, "--days", 1, MAX_SYNTH_DAYS, "days of each synthetic log", 7)
    i.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the synthetic logs, 0 to 2^32-1 (default 0; per patient)",
    )
    i.add_argument("--out", required=True, help="the directory of twins (created)")
    i.add_argument(
        "--logs",
        help="a directory of real logs named <patient>.csv (adult#001.csv), one per patient, "
        "fitted instead of synthetic logs",
    )
    i.add_argument("--tz", help="IANA time zone of naive times in --logs")
    i.add_argument("--inline", action="store_true", help="fit in this process, one by one (no Ray)")
    add_count(i, "--workers", 1, MAX_WORKERS, "parallel fits on Ray", None, "default: CPUs")
    i.add_argument("--address", help="a Ray cluster (default: embedded Ray, loopback only)")
    add_verbose(i)
    i.add_argument(
        "--force", action="store_true", help="refit every twin, even those that could be reused"
    )
    p.set_defaults(handler=main_twin)


def _error(text: object, report: Any = None) -> int:
    if report is not None:
        print(report.to_text(), file=sys.stderr)
    print(f"twinloop twin: error: {text}".splitlines()[0], file=sys.stderr)
    return EXIT_USAGE


def _overrides(args: argparse.Namespace) -> dict[str, float]:
    """The given settings; the therapy's checked for range (the error names the option)."""
    from twinloop.twins.settings import THERAPY_LIMITS, check_setting

    out = {}
    for arg, key in (
        ("body_weight_kg", "body_weight_kg"),
        ("basal_u_per_h", "basal_u_per_h"),
        ("cr", "carb_ratio_g_per_u"),
        ("cf", "correction_factor_mg_dl_per_u"),
    ):
        v = getattr(args, arg, None)
        if v is not None:
            out[key] = float(v)
            if key in THERAPY_LIMITS:
                check_setting(key, out[key], "--" + arg.replace("_", "-"))
    return out


def _fit_text(result: dict[str, Any]) -> str:
    from twinloop.twins.settings import therapy_lines

    fit = result["fit"]
    lines = [
        f"twin {fit.model.name} ({fit.model.group} prior): fitted {fit.fit['minutes'] / 1440:.2f} "
        f"days, {fit.fit['cgm_readings']} CGM readings, RMSE {fit.fit['rmse_mg_dl']:.1f} mg/dL, "
        f"{fit.fit['seconds']:.1f} s",
        "  therapy (90 % intervals):",
        *(f"    {line}" for line in therapy_lines(fit.fit["therapy"])),
    ]
    for name, row in fit.parameters().items():
        ci = f"  [{row['ci95_low']:.4g}, {row['ci95_high']:.4g}]" if "ci95_low" in row else ""
        lines.append(f"  {name:28s} {row['map']:.4g}{ci}")
    checked = result.get("validation")
    if checked:
        t, c = checked["twin"], checked["logged_cgm"]
        lines.append(
            f"  held out {checked['held_out_days']:.2f} days: CGM RMSE {checked['rmse_mg_dl']:.1f}"
            f" mg/dL (bias {checked['bias_mg_dl']:+.1f}); TIR twin "
            f"{t['time_in_range_70_180_pct']:.1f} % vs CGM {c['time_in_range_70_180_pct']:.1f} %"
            f"; <70 {t['time_below_70_pct']:.1f} vs {c['time_below_70_pct']:.1f} %"
        )
        lines.append(_note(checked["meaning"]))
    return "\n".join(lines)


def _note(text: str, indent: str = "    ") -> str:
    """``text`` in parentheses, wrapped to the console's 100 columns under ``indent``."""
    import textwrap

    return textwrap.fill(f"({text})", width=100, initial_indent=indent, subsequent_indent=indent)


def _write(result: dict[str, Any], path: Path) -> None:
    from twinloop.twins.identify import write_twin

    write_twin(
        result["fit"],
        path,
        extra={
            "logs": result["paths"],
            "validation": result.get("validation"),
            "import_report": result["report"]["counts"],
        },
    )


def _main_fit(args: argparse.Namespace) -> int:
    from twinloop.twins.logs import LogError, resolve_log_path
    from twinloop.twins.person import FitRequest, fit_many

    overrides = _overrides(args)

    def request(paths: tuple[str, ...], name: str | None) -> FitRequest:
        return FitRequest(
            paths=paths,
            name=name,
            group=args.group,
            fit_days=args.fit_days,
            validate_days=args.validate_days,
            profile_blocks=args.profile_blocks,
            posterior=args.posterior,
            tz=args.tz,
            overrides=overrides,
        )

    if not args.each:
        from twinloop.twins.person import fit_log

        try:
            fit, log, checked = fit_log(
                request(tuple(map(str, map(resolve_log_path, args.logs))), args.name)
            )
        except LogError as exc:
            return _error(exc, exc.report)
        print(log.report.to_text(max_per_category=5))
        result = {
            "fit": fit,
            "paths": list(args.logs),
            "report": log.report.as_dict(),
            "validation": checked,
        }
        _write(result, Path(args.out))
        print(_fit_text(result))
        print(f"-> {args.out}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requests = [request((str(resolve_log_path(p)),), None) for p in args.logs]
    from tqdm import tqdm

    began = time.perf_counter()
    progress = sys.stderr.isatty()
    if not args.inline:  # Ray first: its start is not the fits' time (the bar's ETA)
        from twinloop.agents.placement import ray_status_line, start_ray

        if progress:
            print(ray_status_line("twin fit", args.address), file=sys.stderr, flush=True)
        start_ray(args.address)
    from twinloop.agents.progress import STARTING, counting_from_first

    failed = 0
    with tqdm(  # the average since the first fit (smoothing=0): fits finish in parallel batches
        total=len(requests), unit="fit", desc="twins" + STARTING, smoothing=0, disable=not progress
    ) as bar:
        advance = counting_from_first(bar, "twins")  # the workers' start is not the fits'
        for fitted in fit_many(
            requests, inline=args.inline, address=args.address, workers=args.workers
        ):
            advance(1)
            if "error" in fitted:
                failed += 1
                bar.write(f"{fitted['paths'][0]}: error: {fitted['error']}", file=sys.stderr)
                continue
            path = out / f"{fitted['name']}.yaml"
            _write(fitted, path)
            bar.write(_fit_text(fitted) + f"\n-> {path}", file=sys.stdout)
    print(
        f"twins: {len(requests) - failed} fitted, {failed} failed, in "
        f"{time.perf_counter() - began:.1f} s"
    )
    return 1 if failed else 0


_LABELS = {
    "time_in_range_70_180_pct": "TIR 70-180 %",
    "time_below_70_pct": "<70 %",
    "time_below_54_pct": "<54 %",
    "time_above_180_pct": ">180 %",
    "time_above_250_pct": ">250 %",
    "mean_mg_dl": "mean mg/dL",
    "insulin_u_per_day": "insulin U/day",
    "rescues_per_day": "rescues/day",
}


def _rescue_text(rule: dict[str, float] | None) -> str:
    if rule is None:
        return "none (the log's carbs only)"
    return (
        f"{rule['grams']:g} g below {rule['below_mg_dl']:g} mg/dL, every {rule['interval_min']:g}"
        " min"
    )


def replay_table(result: dict[str, Any]) -> str:
    """The replay's metrics as a text table: the MAP twin's [5–95 % over the draws].

    The point value is the MAP draw's, not the draws' median: on ground truth
    (``benchmarks/twin_ground_truth.py``) the median of the draws' time below 70 runs low for
    people prone to hypoglycaemia (13 of 20 within 1.5 points, against 15 for the MAP).
    """

    def cell(s: dict[str, float], signed: bool = False) -> str:
        fmt = "{:+.1f}" if signed else "{:.1f}"
        if result["draws"] == 1:
            return fmt.format(s["map"])
        return f"{fmt.format(s['map'])} [{fmt.format(s['p5'])}, {fmt.format(s['p95'])}]"

    a, b = result["therapies"]
    head = ["metric", a["therapy"], b["therapy"], "difference"]
    rows = [
        [label, cell(a["metrics"][k]), cell(b["metrics"][k]), cell(result["difference"][k], True)]
        for k, label in _LABELS.items()
    ]
    rows.append(["rescue rule", *(_rescue_text(t["rescue"]) for t in (a, b)), ""])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def cgm_line(result: dict[str, Any]) -> str:
    """What the replay table's numbers are, and the log's own CGM over the same days."""
    c = result["logged_cgm"]
    draws = result["draws"]
    spread = f"; [5–95 %] over the {draws} draws" if draws > 1 else ""
    cgm = (
        "the log's CGM over the same days: no readings"
        if not c["readings"]
        else (
            f"the log's CGM over the same days ({c['readings']} readings): TIR 70-180 "
            f"{c['time_in_range_70_180_pct']:.1f} %, <70 {c['time_below_70_pct']:.1f} %, <54 "
            f"{c['time_below_54_pct']:.1f} %, >180 {c['time_above_180_pct']:.1f} %, mean "
            f"{c['mean_mg_dl']:.1f} mg/dL"
        )
    )
    return "\n".join(
        [
            f"table: the twin's sensor glucose over {result['days']:.2f} replayed days, the MAP "
            f"draw's value{spread}; 'logged' is the twin under the log's own therapy",
            cgm,
            _note(result["meaning"], indent="  "),
        ]
    )


def _plot(result: dict[str, Any], table: dict[str, Any], path: Path) -> list[str]:
    """The logged CGM (dots) and the twin's median and 5–95 % band under both therapies.

    Returns the legend's labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(11, 4))
    hours = table["minute"] / 60.0
    alternative = result["therapies"][1]["therapy"]
    for name, label, colour in (
        ("twin_logged", "twin, logged therapy", "tab:grey"),
        ("twin_alternative", f"twin, {alternative}", "tab:blue"),
    ):
        lo, hi = table[f"{name}_p5_mg_dl"], table[f"{name}_p95_mg_dl"]
        ax.fill_between(hours, lo, hi, color=colour, alpha=0.25, linewidth=0)
        ax.plot(hours, table[f"{name}_median_mg_dl"], color=colour, linewidth=0.8, label=label)
    seen = ~np.isnan(table["cgm_mg_dl"])
    ax.plot(hours[seen], table["cgm_mg_dl"][seen], ".", color="black", markersize=2,
            label="logged CGM")  # fmt: skip
    ax.axhspan(70, 180, color="tab:green", alpha=0.08)
    ax.set_xlabel("hours from the start of the replay")
    ax.set_ylabel("glucose, mg/dL")
    ax.set_title(
        f"twin {result['twin']} from {str(table['time'][0])[:16]} UTC: median and 5–95 % over "
        f"{result['draws']} draw(s)"
    )
    legend = ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [t.get_text() for t in legend.get_texts()]


def write_trajectories(result: dict[str, Any], table: dict[str, Any], out: Path) -> list[Path]:
    """The replay's per-minute trajectories as ``replay_trajectories.parquet`` and ``.csv``.

    The Parquet file's metadata names the therapy of each column group.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    columns = dict(table)
    columns["time"] = pa.array(table["time"], pa.timestamp("us", tz="UTC"))
    arrow = pa.table(columns)
    therapies = {"twin_logged": "logged", "twin_alternative": result["therapies"][1]["therapy"]}
    arrow = arrow.replace_schema_metadata({"twinloop_replay_therapies": json.dumps(therapies)})
    parquet = out / "replay_trajectories.parquet"
    pq.write_table(arrow, parquet)
    iso = np.datetime_as_string(table["time"], unit="s", timezone="UTC")
    csv = out / "replay_trajectories.csv"
    pa_csv.write_csv(arrow.set_column(1, "time", pa.array(iso)), csv)
    return [parquet, csv]


def _fhir(result: dict[str, Any], name: str, start: Any, twin_path: str) -> Any:
    """The MAP draw's predicted days under the alternative therapy as a FHIR export."""
    import hashlib

    import numpy as np

    from twinloop.twins.fhir import export_tables

    trace = result["traces"][1]
    n = trace.basal_u_per_h.shape[1]
    t_cgm = np.arange(0, n + 1, 5, dtype=np.float64)
    key = hashlib.sha256(
        Path(twin_path).read_bytes()
        + str(result["therapies"][1]["therapy"]).encode()
        + start.isoformat().encode()
    ).hexdigest()
    return export_tables(
        {
            "patient": np.full(t_cgm.size, name),
            "t_min": t_cgm,
            "glucose_mg_dl": np.round(trace.gsub_mg_dl[0, ::5], 1),
        },
        {
            "patient": np.full(n, name),
            "t_min": np.arange(n, dtype=np.float64),
            "basal_u": trace.basal_u_per_h[0] / 60.0,
            "bolus_u": trace.bolus_u[0],
        },
        start=start,
        key=key,
        source="the replay's insulin",
    )


def _main_replay(args: argparse.Namespace) -> int:
    from twinloop.cli.options import claim_out
    from twinloop.twins.identify import MIN_PER_DAY, log_grid, read_twin
    from twinloop.twins.logs import LogError, read_log, resolve_log_path
    from twinloop.twins.person import ReplayTherapy, replay, trajectory_table
    from twinloop.twins.replay import RescueRule

    _overrides(args)  # the settings' ranges, naming the options
    therapy = ReplayTherapy(
        controller=args.controller,
        basal_scale=args.basal_scale,
        basal_u_per_h=args.basal_u_per_h,
        carb_ratio_g_per_u=args.cr,
        correction_factor_mg_dl_per_u=args.cf,
        model=args.model,
    )
    if args.draws < 1:
        return _error(f"--draws {args.draws} is not allowed: an integer >= 1")
    if args.out:  # refused before the replay, not after it
        claim_out(args.out, overwrite=args.overwrite, remove=False)
    fit = read_twin(args.twin)
    try:
        grid = log_grid(read_log([resolve_log_path(p) for p in args.logs], tz=args.tz))
    except LogError as exc:
        return _error(exc, exc.report)
    first = round(args.from_day * MIN_PER_DAY)
    last = grid.minutes if args.days is None else first + round(args.days * MIN_PER_DAY)
    if not 0 <= first < last <= grid.minutes:
        return _error(
            f"--from-day {args.from_day:g} --days {args.days} is not inside the log's "
            f"{grid.days:.2f} days"
        )
    rescue = None if args.no_rescue else RescueRule()
    if args.out:  # the inputs are good: the earlier replay goes (--overwrite)
        claim_out(args.out, overwrite=args.overwrite)
    result = replay(
        fit,
        grid,
        therapy,
        first_min=first,
        last_min=last,
        draws=args.draws,
        seed=args.seed,
        rescue=rescue,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    begun = result["start"]
    print(
        f"twin {result['twin']}: {result['days']:.2f} days replayed, {result['draws']} draw(s)"
        f"{' of the Laplace posterior' if result['posterior'] else ' (MAP; no posterior)'}, "
        + (
            f"each from the state its estimator filtered from the log's first {args.from_day:g} "
            f"days ({begun['filter_seconds']:.1f} s)"
            if begun["kind"] == "filtered"
            else f"from the basal steady state ({begun['burn_in_min']} min not scored)"
        )
        + f"; rescue carbs for {result['therapies'][1]['therapy']} only: "
        f"{_rescue_text(result['therapies'][1]['rescue'])}"
    )
    print(replay_table(result))
    print(cgm_line(result))
    window = grid.window(first, last)
    if args.fhir:
        export = _fhir(result, fit.model.name, window.start, args.twin)
        print(f"FHIR: {export.summary()} -> {args.fhir}")
        Path(args.fhir).parent.mkdir(parents=True, exist_ok=True)
        Path(args.fhir).write_text(json.dumps(export.bundle, indent=1), encoding="utf-8")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {k: v for k, v in result.items() if k != "traces"}
        (out / "replay.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        table = trajectory_table(result, window)
        written = write_trajectories(result, table, out)
        _plot(result, table, out / "replay.png")
        print(
            f"-> {', '.join(str(p) for p in [out / 'replay.json', *written, out / 'replay.png'])}"
        )
    return 0


def _main_synth(args: argparse.Namespace) -> int:
    import numpy as np

    from twinloop.plant.glucose.cohorts import find_patient, population_token
    from twinloop.plant.glucose.scenarios import CarbCountingError
    from twinloop.twins.synthetic import synthetic_log

    populations = [population_token(args.population)] if args.population else []
    patient = find_patient(args.patient, populations)
    log = synthetic_log(
        patient,
        days=args.days,
        seed=args.seed,
        cgm=args.cgm,
        carb_error=CarbCountingError("normal", args.carb_error)
        if args.carb_error > 0
        else CarbCountingError(),
    )
    log.write(args.out)
    print(
        f"synthetic log of {patient.name}: {args.days} days, "
        f"{int(np.count_nonzero(~np.isnan(log.cgm_mg_dl)))} CGM readings -> {args.out}"
    )
    return 0


def _main_individualize(args: argparse.Namespace) -> int:
    from twinloop.plant.errors import ConfigError
    from twinloop.twins.individualize import individualize

    names = [*args.cohort, *args.patient]
    if not names:
        raise ValueError("--patient/--cohort: none given; at least one (adult#001, adults, all)")
    logs = None
    if args.logs is not None:
        from twinloop.plant.glucose.cohorts import expand_names

        folder = Path(args.logs)
        if not folder.is_dir():
            raise ConfigError("--logs", args.logs, "a directory of logs named <patient>.csv")
        logs = {}
        for patient in expand_names(names, field="patients"):
            path = folder / f"{patient.name}.csv"
            if not path.is_file():
                raise ConfigError("--logs", args.logs, f"a directory holding {path.name}")
            logs[patient.name] = path
    result = individualize(
        names,
        args.out,
        days=args.days,
        seed=args.seed,
        logs=logs,
        tz=args.tz,
        address=args.address,
        inline=args.inline,
        workers=args.workers,
        force=args.force,
        progress=sys.stderr.isatty(),
    )
    print(result.table())
    fitted, reused = len(result.fitted), len(result.reused)
    what = f"{fitted} fitted" + (
        f", {reused} reused (already in {args.out} for the same logs and settings)"
        if reused
        else ""
    )
    print(f"twins: {what}, in {result.stages['total']:.1f} s -> {result.out_dir}")
    print(f"manifest: {result.manifest}")
    return 0


def main_twin(args: argparse.Namespace) -> int:
    """Run ``twinloop twin``; errors print one line and return 2."""
    if args.twin_command == "individualize":
        return _main_individualize(args)
    if args.twin_command == "fit":
        return _main_fit(args)
    if args.twin_command == "replay":
        return _main_replay(args)
    return _main_synth(args)
