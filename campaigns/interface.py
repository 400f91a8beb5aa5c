"""What a therapy's campaigns part declares (``twinloop.campaigns.<package>.therapy.PART``).

Shared campaign code (:mod:`twinloop.campaigns.spec`, ``.campaign``, ``.safety``, ``.report``,
``.hil`` and ``twinloop campaign``) asks this part for everything that is the therapy's own:
its fault types and the targets they may sit on besides its loop's channels, its requirement
rules, its hazard labels, how one run's loop is built, run and judged, the summary's headline
metric, the report's trace plot, the keys of its specs with their defaults, and its HIL
sessions. The loop's channels and their message classes come from the therapy's agents part
(``channel_messages``); its patients from the plant part; its controllers from the policies part.

Times are in the therapy's loop time unit (``twinloop.plant.<package>.therapy.PART.time_unit``:
``min`` for glucose, ``s`` for the knee exoskeleton): fault windows, onsets, horizons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twinloop.campaigns.faults import FaultType


@dataclasses.dataclass(frozen=True)
class SpecKey:
    """A key of a campaign YAML (or of its ``hil:`` block) that one therapy has.

    Attributes:
        name: the YAML key (``days``, ``cycles``, ``minutes``).
        default: its value when the spec does not give it.
        check: returns the value to use, or raises ``ValueError`` saying what is allowed
            (``"an integer >= 1"``); the spec loader names the file, line, key and value.
        help: one line, with the unit.

    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str


@dataclasses.dataclass(frozen=True)
class RequirementRule:
    """A rule of the safety-requirement vocabulary.

    Attributes:
        name: the key specs use (``rule: glucose_min``).
        params: parameter name → its unit (every parameter is required, a number >= 0).
        text: the sentence it checks, a ``str.format`` template over ``params``.
        hil_only: the rule judges HIL sessions only (a spec without ``hil:`` refuses it).
        therapy: the therapy whose part declares it (``"any"`` for the shared rules); set by
            the registry's lookup, not by the part.

    """

    name: str
    params: Mapping[str, str]
    text: str
    hil_only: bool = False
    therapy: str = "any"


@dataclasses.dataclass(frozen=True)
class Headline:
    """The summary's headline metric of a scenario (and the report's distribution plot).

    Attributes:
        metric: the key of a run's ``metrics`` it averages (``time_in_range_70_180_pct``).
        summary_key: its key in each scenario's summary entry (``time_in_range_pct``).
        axis_label: the distribution plot's axis label, with the unit.
        column: the scenario table's column header, with the unit.

    """

    metric: str
    summary_key: str
    axis_label: str
    column: str


@dataclasses.dataclass(frozen=True)
class CampaignPatients:
    """The patients of a spec, expanded, and what a worker loads before running them.

    Attributes:
        names: the patients (each a run's ``patient``).
        preload: tokens a worker must load before building a run (glucose: ``population:PATH``
            files); empty for most therapies.

    """

    names: tuple[str, ...]
    preload: tuple[str, ...] = ()


class CampaignPart(Protocol):
    """The campaigns side of a therapy: its faults, requirements, verdicts, report and HIL."""

    #: Fault types of this therapy only (the generic ones of :mod:`twinloop.campaigns.faults`
    #: apply to every therapy); their ``therapy`` field is the therapy's name.
    fault_types: tuple[FaultType, ...]
    #: Message kind (``Record.kind``) → the numeric field a value fault changes by default.
    default_fields: Mapping[str, str]
    #: Targets faults may sit on besides the loop's channels (glucose: ``controller``, its
    #: therapy parameters); empty for most therapies.
    parameter_targets: tuple[str, ...]
    #: Its own requirement rules (the shared ones, such as ``safe_state_after_agent_fault``,
    #: are in :data:`twinloop.campaigns.spec.SHARED_RULES`; :meth:`evaluate` judges both).
    requirement_rules: tuple[RequirementRule, ...]
    #: Hazard labels of each run, in the order of the summary's tables.
    labels: tuple[str, ...]
    #: The amount a label counts in runs' ``labels[name]`` and the summary: ``"minutes"`` or
    #: ``"seconds"``.
    label_unit: str
    #: The key of a label's delay from the first fault onset in runs' ``labels[name]``, in the
    #: loop time unit (``onset_to_hazard_min``).
    onset_key: str
    #: What a hazard episode and the detection horizon are (the summary's definition).
    episode_definition: str
    #: The summary's headline metric per scenario.
    headline: Headline
    #: The spec's keys of this therapy (glucose ``days``, knee ``cycles``), with defaults.
    spec_keys: tuple[SpecKey, ...]
    #: A fault's window when neither it nor ``defaults:`` gives one: ``(start, duration)``,
    #: loop time unit.
    default_window: tuple[float, float]
    #: The keys of the ``hil:`` block (empty: the therapy has no HIL sessions).
    hil_keys: tuple[SpecKey, ...]
    #: One line saying what a ``hil:`` session of this therapy is (for errors and docs).
    hil_help: str

    def patients(self, names: Sequence[str], spec_dir: Path) -> CampaignPatients:
        """The spec's patient names expanded and checked (paths relative to ``spec_dir``).

        Raises:
            ValueError: a name the therapy does not know (the message lists what is allowed).

        """
        ...

    def horizon(self, settings: Mapping[str, Any]) -> float:
        """The span random fault windows are drawn in, loop time unit (from ``spec_keys``)."""
        ...

    def build_loop(self, spec: Any, key: Any) -> Any:
        """One run's loop, not yet run, for ``spec`` (``CampaignSpec``) and ``key`` (``RunKey``).

        The loop has ``channels`` (name → :class:`twinloop.agents.channels.Channel`, including
        ``runtime->faults`` and ``supervisor->overrides``) and ``listen(listener)``. It is a
        function of the spec, the patient and the seed only (a run can be replayed anywhere).
        """
        ...

    def run_loop(self, loop: Any) -> None:
        """Run ``loop`` to its end (and release what it holds)."""
        ...

    def evaluate(
        self, spec: Any, scenario: Any, columns: Any, loop: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Judge one finished run from its in-memory recording.

        Args:
            spec: the ``CampaignSpec``.
            scenario: the run's ``Scenario``.
            columns: channel → field → values (:func:`twinloop.agents.recording.column_listener`).
            loop: the loop that ran.

        Returns:
            ``(verdict, trace)``: the verdict has ``metrics``, ``labels`` (each with
            :attr:`label_unit` and :attr:`onset_key`), ``first_onset``, ``detection``
            (``detections``, ``true_detections``, ``episodes``, ``detected_episodes``,
            ``by_rule``), ``agent_faults`` and ``requirements`` (one ``{"id", "pass", ...}``
            per requirement of the spec, ``pass`` None when it does not apply); the trace is
            column → equal-length array (written as Parquet, plotted by :meth:`plot_trace`).

        """
        ...

    def worst_key(self, result: Mapping[str, Any]) -> float:
        """How bad a finished run is (higher: worse), to pick the report's worst runs."""
        ...

    def plot_trace(self, ax: Any, trace: Mapping[str, Any]) -> float:
        """Draw a run's trace on a matplotlib ``ax``; return the loop time units per x unit.

        (Glucose plots hours: 60; the knee seconds: 1.) The caller shades fault windows.
        """
        ...

    def run_hil(self, spec: Any, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """One HIL session of a run (wire faults on an emulated device): verdict and trace.

        The verdict is as :meth:`evaluate`'s plus ``alarms`` and ``wire_fault_hits``
        (``WireFaults`` switch → hits). Only called when :attr:`hil_keys` is not empty.
        """
        ...
