"""``twinloop campaign SPEC``: fault-injection campaigns (``--rerun ID``, ``--faults``).

SPEC is a campaign YAML file or a shipped campaign's name (``glucose_smoke``).

Exit codes (:data:`EXIT_PASS`, :data:`EXIT_FAIL`, and
:data:`twinloop.cli.errors.EXIT_USAGE` as every command's for bad input): 0 the campaign passed;
1 it failed (a requirement fails, more errored runs than ``errors_allowed``, no run judged) or
is incomplete, or ``--rerun`` did not reproduce the stored result; 2 bad input (usage, the
spec, ``--out``) — nothing was judged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twinloop.cli import options
from twinloop.cli.errors import EXIT_USAGE
from twinloop.limits import MAX_WORKERS

#: Exit code of a campaign that passed.
EXIT_PASS = 0
#: Exit code of a campaign that failed or is incomplete (and of a rerun that differs).
EXIT_FAIL = 1

EXIT_CODES = (
    f"exit status: {EXIT_PASS} the campaign passed; {EXIT_FAIL} it failed (a requirement fails, "
    "more errored runs than errors_allowed, no run judged) or is incomplete, or --rerun did not "
    f"reproduce the stored result; {EXIT_USAGE} bad input (usage, the spec, --out)"
)


def add_parser(sub: Any) -> None:
    """Add the ``campaign`` sub-command to the ``twinloop`` parser."""
    p = sub.add_parser(
        "campaign",
        help="run a fault-injection campaign (patients × scenarios × seeds) judged against "
        "safety requirements; resumable; HTML and JSON report",
        description="Run every patient × scenario × seed of SPEC.yaml (campaigns/spec.py "
        "documents the format; shipped examples in campaigns/specs/) as Ray tasks, persisting "
        "each run's result as it finishes into OUT/results/. Rerunning the same command "
        "resumes. OUT/summary.json and OUT/report.html hold the verdicts. A run that raises "
        "or cannot be judged fails every requirement unless the spec allows it "
        "(errors_allowed).",
        epilog=EXIT_CODES,
    )
    p.add_argument("spec", nargs="?", help="campaign specification (YAML)")
    p.add_argument(
        "--out",
        help="campaign directory (default: runs/campaigns/<name>); the same spec's directory "
        "resumes, anything else non-empty is refused without --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: replace an earlier campaign (or run) at --out, and an earlier "
        "--rerun recording",
    )
    p.add_argument("--address", help="run on an existing Ray cluster (HOST:PORT)")
    options.add_count(
        p, "--workers", 1, MAX_WORKERS, "runs in parallel", default_text="default: its CPUs"
    )
    p.add_argument("--inline", action="store_true", help="run in this process, without Ray")
    p.add_argument("--rerun", metavar="ID", help="run one run again with a full recording")
    p.add_argument("--replay", metavar="ID", help=argparse.SUPPRESS)  # the former --rerun
    p.add_argument(
        "--faults", action="store_true", help="list the fault catalogue and exit (no SPEC needed)"
    )
    p.add_argument("--markdown", action="store_true", help="with --faults: as Markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    options.add_verbose(p)
    p.set_defaults(handler=main_campaign)


DOC_HEADER = """# Fault catalogue and safety-requirement vocabulary

Generated from the catalogue (`twinloop campaign --faults --markdown > docs/faults.md`; a test
keeps it in sync): the generic faults of `campaigns/faults.py` and the shared rules of
`campaigns/spec.py`, then each therapy's own, from its campaigns part
(`campaigns/<therapy>/therapy.py`; column *loop*). How faults sit on the loop's channels, and
what each category means: the docstring of `campaigns/faults.py`. The campaign format:
`campaigns/spec.py`; examples: `campaigns/specs/`.

Windows (`start`, `duration`) are in the loop's time unit: minutes for the glucose loop,
seconds for the knee exoskeleton. Wire faults act on the Modbus wire of the emulated pump or
exoskeleton drive (`twinloop.hw_bridge.wire.WireFaults`) and run in campaigns with a `hil:` block,
through the HIL rig (`campaigns/hil.py`; the insulin rig in accelerated time, the
exoskeleton rig at 100 Hz in real time; examples `campaigns/specs/pump_wire_hil.yaml`,
`drive_wire_hil.yaml`); a simulated campaign refuses them.
"""


def catalogue_markdown() -> str:
    """The fault catalogue and the requirement vocabulary as Markdown (docs/faults.md)."""
    from twinloop.campaigns.faults import CATALOGUE, PUBLISHED_PATTERNS
    from twinloop.campaigns.spec import requirement_rules

    lines = [DOC_HEADER]
    # categories in the catalogue's order, the wire (HIL only) last
    categories = dict.fromkeys(f.category for f in CATALOGUE.values() if f.make is not None)
    categories.update(dict.fromkeys(f.category for f in CATALOGUE.values()))
    for category in categories:
        lines.append(f"## {category}\n")
        lines.append(
            "| fault | loop | channels | parameters (default, range, unit) | what it does |"
        )
        lines.append("|---|---|---|---|---|")
        for f in CATALOGUE.values():
            if f.category != category:
                continue
            params = "<br>".join(
                f"`{p.name}` = {p.default:g} ({p.low:g}..{p.high:g} {p.unit}): {p.doc}"
                for p in f.params
            )
            channels = ", ".join(f"`{c}`" for c in f.channels)
            lines.append(f"| `{f.name}` | {f.therapy} | {channels} | {params or '—'} | {f.doc} |")
        lines.append("")
    lines.append(f"{len(CATALOGUE)} fault types.\n")
    lines.append("## Published patterns covered\n")
    lines.append("| pattern | catalogue entry |")
    lines.append("|---|---|")
    for pattern, name in sorted(PUBLISHED_PATTERNS.items()):
        lines.append(f"| {pattern} | `{name}` |")
    lines.append("")
    lines.append("## Safety requirements: the vocabulary\n")
    lines.append("| rule | loop | parameters | checks |")
    lines.append("|---|---|---|---|")
    for rule in requirement_rules().values():
        ps = ", ".join(f"`{k}` ({u})" for k, u in rule.params.items()) or "—"
        lines.append(f"| `{rule.name}` | {rule.therapy} | {ps} | {rule.text} |")
    lines.append("")
    return "\n".join(lines)


def _catalogue() -> int:
    from twinloop.campaigns.faults import CATALOGUE

    for f in CATALOGUE.values():
        params = ", ".join(f"{p.name}={p.default:g} {p.unit}" for p in f.params) or "—"
        print(f"{f.name:26s} {f.category:8s} {f.therapy:9s} on {'|'.join(f.channels)}")
        print(f"{'':26s} {f.doc}")
        print(f"{'':26s} params: {params}")
    return 0


def _claim_campaign_out(out: Path, spec: Any, overwrite: bool) -> None:
    """Refuse ``out`` unless it is new, empty, this spec's campaign (a resume) or overwritten."""
    from twinloop.cli.options import OutputExistsError, claim_out

    pinned = out / "spec.json"
    if not overwrite and pinned.is_file():
        try:
            fingerprint = json.loads(pinned.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            fingerprint = None
        if fingerprint == spec.fingerprint():
            return  # the same campaign: resume
        raise OutputExistsError(
            f"--out {out}: holds results of another spec (fingerprint {fingerprint}, this one "
            f"{spec.fingerprint()}); give another --out, or --overwrite to replace it"
        )
    claim_out(out, overwrite=overwrite)


def main_campaign(args: argparse.Namespace) -> int:
    """Run ``twinloop campaign``: 0 pass, 1 fail or incomplete; errors print one line, 2."""
    from twinloop.campaigns.campaign import expand_runs, rerun, run_campaign, same_result
    from twinloop.campaigns.spec import load_spec
    from twinloop.cli.options import claim_out

    if args.faults:
        if args.markdown:
            print(catalogue_markdown(), end="")
            return 0
        return _catalogue()
    if not args.spec:
        raise ValueError("give SPEC.yaml (or --faults)")
    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("runs") / "campaigns" / spec.name
    if args.replay:
        print("twinloop campaign: warning: --replay is now --rerun", file=sys.stderr)
        args.rerun = args.rerun or args.replay
    if args.rerun:
        target = out / "reruns" / args.rerun
        if args.rerun in {k.id for k in expand_runs(spec)}:  # (rerun refuses another id)
            claim_out(target, overwrite=args.overwrite, option="--rerun recording")
        again = rerun(spec, args.rerun, target)
        print(f"ran {args.rerun} again: full recording in {target}")
        stored = out / "results" / f"{args.rerun}.json"
        if stored.exists():
            same = same_result(json.loads(stored.read_text()), again["result"])
            print("identical to the stored result" if same else "DIFFERENT from the stored result")
            return EXIT_PASS if same else EXIT_FAIL
        return EXIT_PASS
    _claim_campaign_out(out, spec, args.overwrite)
    summary = run_campaign(
        spec,
        out,
        address=args.address,
        workers=args.workers,
        inline=args.inline,
        progress=not args.no_progress,
    )
    runs = summary["runs"]
    ex = summary["execution"]
    rate = f", {ex['runs_per_s']:.1f} runs/s" if ex["runs_per_s"] else ""
    print(
        f"campaign {spec.name}: {runs['finished']}/{runs['total']} runs ({runs['errors']} "
        f"errors); this invocation {ex['runs_this_invocation']} runs in {ex['wall_s']:.1f} s"
        f"{rate}; skipped {ex['skipped_as_done']} already done"
    )
    for r in summary["requirements"]:
        print(f"  {r['id']:8s} {r['verdict']:15s} {r['runs_failing']:5d} failing  {r['text']}")
    for e in summary["errored_runs"][:20]:
        print(f"  errored  {e['id']}: {e['error']}")
    if len(summary["errored_runs"]) > 20:
        print(f"  ... and {len(summary['errored_runs']) - 20} more errored runs (summary.json)")
    why = f" ({'; '.join(summary['verdict_reasons'])})" if summary["verdict_reasons"] else ""
    print(
        f"verdict: {summary['verdict'].upper()}{why}; {out / 'summary.json'}, {out / 'report.html'}"
    )
    return EXIT_PASS if summary["verdict"] == "pass" else EXIT_FAIL
