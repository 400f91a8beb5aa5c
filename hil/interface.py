"""What a therapy's HIL part declares (``twinloop.hil.<package>.therapy.PART``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class RigPart(Protocol):
    """The real-time rig of a therapy, and the report of its recorded sessions."""

    def report(self, run_dir: str | Path, *, allow_incomplete: bool) -> Any:
        """Rebuild a rig session's summary, plots and ``report.md`` from its recording."""
        ...
