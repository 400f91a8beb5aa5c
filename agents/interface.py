"""What a therapy's agents part declares (``twinloop.agents.<package>.therapy.PART``).

The part is how shared code (``twinloop run``, ``twinloop report``, campaigns) builds, runs,
summarises and reports a therapy's closed loop without knowing which therapy it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from twinloop.agents.placement import Placement


@dataclasses.dataclass(frozen=True)
class RunOption:
    """An option of ``twinloop run`` that one therapy's loop has (``--days``, ``--task``).

    The same name is the key of a ``--config`` YAML file (``time_scale`` ↔ ``--time-scale``).

    Attributes:
        name: the config key (snake case).
        parse: turns the command line's text (or a YAML scalar) into the value; raises
            ``ValueError`` with what is allowed.
        default: the value when not given.
        help: one line for ``--help``, with the unit.
        flag: a boolean option (``--twin`` / ``--no-twin``).

    """

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag: bool = False


class ReportResult(Protocol):
    """What a report wrote (each therapy's report returns its own result with these)."""

    @property
    def report_path(self) -> Path:
        """The Markdown report."""
        ...

    @property
    def plots(self) -> tuple[Path, ...]:
        """The plots it drew."""
        ...


class LoopPart(Protocol):
    """The agents side of a therapy: its loop's options, run, summary and report."""

    #: Options of ``twinloop run`` that this therapy's loop has.
    run_options: tuple[RunOption, ...]
    #: Placements its loop supports (the first is the default): ``inline``, ``ray``, ...
    placements: tuple[str, ...]
    #: The channels of its loop and the message class each carries (where faults may sit).
    channel_messages: Mapping[str, type]
    #: ``time.strftime`` pattern of a run directory when ``--out`` is not given.
    default_out: str

    def make_config(
        self, *, patients: Sequence[str], seed: int, controller: str, options: Mapping[str, Any]
    ) -> Any:
        """The loop's validated configuration (errors name the field, value and what is allowed)."""
        ...

    def run(
        self, config: Any, out: str | Path, *, placement: Placement, progress: bool
    ) -> tuple[Path, dict[str, Any]]:
        """Run every patient's loop, record every channel; return the run directory, summary."""
        ...

    def summary_lines(
        self, config: Any, summary: Mapping[str, Any], *, placement: str, elapsed_s: float
    ) -> list[str]:
        """The run's result as the lines ``twinloop run`` prints (a header, a table, totals)."""
        ...

    def report(self, run_dir: str | Path, *, allow_incomplete: bool) -> ReportResult:
        """Rebuild the summary, plots and ``report.md`` of a recorded run."""
        ...
