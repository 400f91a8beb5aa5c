"""``twinloop report RUN_DIR``: rebuild a recording's summary, plots and ``report.md``.

The recording's manifest names its therapy (``config.therapy``; older glucose recordings name
none); the therapy's agents part reports a simulated run, its HIL part a rig's session.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Add ``report`` to the ``twinloop`` parser."""
    report = sub.add_parser(
        "report",
        help="rebuild the summary, plots and report.md of a recorded run or HIL session",
        description="Rebuild summary.json, PNG plots and report.md from a run directory's "
        "recording (twinloop run, twinloop hil), without re-running it.",
    )
    report.add_argument("run_dir", help="a run directory written by twinloop run or hil")
    report.add_argument(
        "--allow-incomplete", action="store_true", help="also report an interrupted run"
    )
    report.set_defaults(handler=main_report)


def main_report(args: argparse.Namespace) -> int:
    """Report the recording with its therapy's part."""
    from twinloop.agents.report import (
        MANIFEST_FILE,
        check_complete,
        is_rig_recording,
        recording_therapy,
    )
    from twinloop.cli.options import therapy_of

    manifest, _ = check_complete(Path(args.run_dir), allow_incomplete=True)
    if manifest is None and not (Path(args.run_dir) / MANIFEST_FILE).exists():
        # an interrupted run without a manifest: its therapy's report says what is missing
        manifest = {}
    therapy = therapy_of(recording_therapy(manifest))
    layer = "hil" if is_rig_recording(manifest) else "agents"
    if not therapy.has(layer) or not hasattr(therapy.part(layer), "report"):
        raise ValueError(
            f"{args.run_dir}: a {therapy.name} {'rig session' if layer == 'hil' else 'run'} "
            "has no report"
        )
    result = therapy.part(layer).report(args.run_dir, allow_incomplete=args.allow_incomplete)
    print(f"report: {result.report_path} ({len(result.plots)} plots)")
    return 0
