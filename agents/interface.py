"""What a therapy's agents part declares (``twinloop.agents.<package>.therapy.PART``).

The part is how shared code (``twinloop run``, ``twinloop report``, campaigns) builds, runs,
summarises and reports a therapy's closed loop without knowing which therapy it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from twinloop.agents.placement import Placement


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    """A :attr:`RunOption.parse` for an integer (from ``minimum`` to ``maximum`` when given)."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = "an integer" if maximum is None else f"an integer <= {maximum}"

    def parse(value: Any) -> int:
        if isinstance(value, bool | float):
            raise ValueError(allowed)
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(allowed) from None
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise ValueError(allowed)
        return number

    return parse


def positive_number(maximum: float = math.inf) -> Callable[[Any], float]:
    """A :attr:`RunOption.parse` for a finite number > 0 (and ``<= maximum``)."""
    allowed = "a finite number > 0" + ("" if math.isinf(maximum) else f" and <= {maximum:g}")

    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not (0 < number <= maximum and math.isfinite(number)):
            raise ValueError(allowed)
        return number

    return parse


def one_of(choices: Iterable[str]) -> Callable[[Any], str]:
    """A :attr:`RunOption.parse` for one of ``choices``."""
    names = tuple(choices)

    def parse(value: Any) -> str:
        if value not in names:
            raise ValueError(f"one of {', '.join(names)}")
        return str(value)

    return parse


def boolean(value: Any) -> bool:
    """A :attr:`RunOption.parse` for true or false (a flag's value)."""
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


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


@dataclasses.dataclass(frozen=True)
class ReportResult:
    """What a report wrote: the Markdown report and the plots.

    A part may return its own result type with these two attributes.
    """

    report_path: Path
    plots: tuple[Path, ...]


class LoopPart(Protocol):
    """The agents side of a therapy: its loop's options, run, summary and report.

    Optional: ``fhir_export(run_dir, *, start, patient_reference, allow_incomplete)``, the run
    as FHIR resources (a :class:`twinloop.agents.fhir.FhirExport`; ``twinloop export fhir``).
    A therapy without it has runs that are not exported, and the command says so.
    """

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
