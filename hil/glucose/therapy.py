"""The glucose therapy's HIL part: the insulin rig's session reports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class GlucoseRig:
    """The insulin rig (pump over Modbus, CGM over its serial line)."""

    def report(self, run_dir: str | Path, *, allow_incomplete: bool) -> Any:
        """:func:`twinloop.hil.glucose.report.build_hil_report`."""
        from twinloop.hil.glucose.report import build_hil_report

        return build_hil_report(run_dir, allow_incomplete=allow_incomplete)

    def run_session(self, args: argparse.Namespace) -> int:
        """:func:`twinloop.hil.glucose.session.run_session`."""
        from twinloop.hil.glucose.session import run_session

        return run_session(args)


PART = GlucoseRig()
