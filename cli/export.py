"""``twinloop export fhir RUN_DIR --out bundle.json``: a run as a FHIR R4 Bundle.

The run's therapy (its manifest's) maps it, through its agents part's ``fhir_export``: glucose
runs as CGM Observations and insulin MedicationAdministrations
(:mod:`twinloop.agents.glucose.fhir`), knee-exo runs as the knee angle and interaction torque
(:mod:`twinloop.agents.knee.fhir`); what they share is in :mod:`twinloop.agents.fhir`. A
therapy without an export is refused in one line. Errors print one line ``twinloop export:
error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from twinloop.cli.errors import EXIT_USAGE
from twinloop.limits import MAX_YEAR, MIN_YEAR


def add_parser(sub: Any) -> None:
    """Add the ``export`` sub-command (with its format ``fhir``) to the ``twinloop`` parser."""
    p = sub.add_parser(
        "export",
        help="export a recorded run for other systems (fhir: a FHIR R4 Bundle: glucose runs' "
        "CGM Observations and insulin MedicationAdministrations, knee-exo runs' knee angle and "
        "interaction torque)",
        description="Export a run directory written by `twinloop run`.",
    )
    formats = p.add_subparsers(dest="export_format", required=True)
    fhir = formats.add_parser(
        "fhir",
        help="FHIR R4 Bundle (JSON) of the run's measurements (and insulin deliveries)",
        description="Write a run as a FHIR R4 Bundle of type collection, with one Patient per "
        "virtual patient. Glucose runs: the CGM readings as Observations (LOINC 2339-0, "
        "mg/dL) and the insulin that reached each patient as MedicationAdministrations "
        "(boluses one by one, basal merged into periods at a constant rate; units [iU]) — "
        "agents/glucose/fhir.py documents the mapping. Knee-exo runs: per patient the knee "
        "flexion angle (deg) and the exoskeleton-knee interaction torque (N.m) as sampled-data "
        "Observations at the control rate — agents/knee/fhir.py.",
        epilog="example: twinloop export fhir runs/run-20260101-080000 --out bundle.json "
        "--start 2026-01-01T08:00:00+01:00",
    )
    fhir.add_argument("run_dir", help="a run directory written by `twinloop run`")
    fhir.add_argument("--out", required=True, help="the bundle's JSON file")
    fhir.add_argument(
        "--start",
        help="wall-clock time of the run's minute 0, ISO 8601 with an offset, e.g. "
        f"2026-01-01T08:00:00+01:00, years {MIN_YEAR} to {MAX_YEAR} (default: when the run "
        "was recorded)",
    )
    fhir.add_argument(
        "--patient-reference",
        action="append",
        default=[],
        metavar="[NAME=]REF",
        help="reference an existing Patient (e.g. adult#001=Patient/123) instead of exporting "
        "one; REF alone for a one-patient run (repeatable)",
    )
    fhir.add_argument(
        "--allow-incomplete", action="store_true", help="also export an interrupted run"
    )
    p.set_defaults(handler=main_export)


def _error(text: object) -> int:
    print(f"twinloop export: error: {text}".splitlines()[0], file=sys.stderr)
    return EXIT_USAGE


def _start(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--start {text!r} is not an ISO 8601 date-time (e.g. 2026-01-01T08:00:00+01:00)"
        ) from None
    if not MIN_YEAR <= when.year <= MAX_YEAR:
        raise ValueError(f"--start {text!r}: the year must be from {MIN_YEAR} to {MAX_YEAR}")
    return when


def _exporting() -> list[str]:
    """The therapies whose runs ``twinloop export fhir`` exports."""
    from twinloop.therapy import therapies

    return [
        t.name for t in therapies() if t.has("agents") and hasattr(t.part("agents"), "fhir_export")
    ]


def _references(items: list[str]) -> str | dict[str, str] | None:
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out: dict[str, str] = {}
    for item in items:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ValueError(f"--patient-reference {item!r}: expected NAME=REF")
        out[name] = ref
    return out


def main_export(args: argparse.Namespace) -> int:
    """Run ``twinloop export``; errors print one line and return 2."""
    from twinloop.agents.fhir import read_manifest, write_export
    from twinloop.agents.report import recording_therapy
    from twinloop.cli.options import therapy_of

    start = _start(args.start)
    if start is not None and start.utcoffset() is None:
        return _error(
            f"--start {args.start!r} has no UTC offset; give one, e.g. "
            f"{args.start}+00:00 or {args.start}Z"
        )
    manifest, _, _ = read_manifest(Path(args.run_dir), allow_incomplete=True)
    therapy = therapy_of(recording_therapy(manifest))
    agents = therapy.part("agents") if therapy.has("agents") else None
    if agents is None or not hasattr(agents, "fhir_export"):
        return _error(
            f"{args.run_dir}: a {therapy.name} run has no FHIR export (exported: "
            + ", ".join(_exporting())
            + ")"
        )
    export = agents.fhir_export(
        args.run_dir,
        start=start,
        patient_reference=_references(args.patient_reference),
        allow_incomplete=args.allow_incomplete,
    )
    write_export(export, args.out)
    print(f"fhir: {export.summary()} -> {args.out}")
    return 0
