"""Campaign specifications: cohort × scenarios × seeds, fault scenarios and safety requirements.

A campaign is one YAML file (``twinloop campaign SPEC.yaml``); every check happens here, before
any run starts, and a refusal names the file, the line and what is allowed.

.. code-block:: yaml

    name: glucose-faults            # the campaign (its results directory by default): a safe
                                    # name (see NAME_RULE), as every scenario's name
    therapy: glucose                # a therapy of the registry (``twinloop therapies``)
    patients: [adults]              # the therapy's patients (default: its plant's default)
    controller: basal-bolus         # any controller of the therapy (default: its default)
    days: 1                         # the therapy's own keys: glucose ``days`` (1..365), knee
                                    # ``cycles`` (1..10000)
    seeds: [0, 1, 2]
    twin: true
    defaults:                       # window of a fault that gives none (loop time unit;
      start: 360                    # default: the therapy's own, glucose 360 + 240 min)
      duration: 240
    scenarios:                      # named scenarios, each a list of faults
      - name: sensor-bias
        faults:
          - {fault: bias, channel: sensor->controller, start: 360, duration: 120,
             params: {offset: 60}}
    sweep: [bias, occlusion]        # one single-fault scenario per name, default window/params
    random:                         # scenarios drawn by a seeded generator
      count: 10                     # 1..10000 scenarios
      seed: 7                       # 0..2**32-1
      faults: [bias, drift, occlusion]
      per_scenario: 2               # 1..100 faults each
      intensity: 1.0                # 0..1 scales each parameter from its default to its bound
      overlap: false
    baseline: true                  # also run each patient/seed without faults
    requirements:                   # see requirement_rules() (or a path to a YAML list)
      - {id: R1, rule: glucose_min, threshold_mg_dl: 54}
    hil: {minutes: 60}              # HIL sessions instead: the therapy's ``hil_keys``
    errors_allowed: 0               # runs that may error and the campaign still pass (0..runs)
    run_timeout_s: 3600             # wall-clock seconds one run may take (1..86400): past it,
                                    # the run is killed and is an errored run

What is the therapy's own comes from its parts in the registry (:mod:`twinloop.therapy`): the
patients (plant), controllers (policies), channels and their messages (agents), and its fault
types, parameter targets, requirement rules, spec keys, default fault window and HIL keys
(campaigns, :class:`twinloop.campaigns.interface.CampaignPart`). A former spelling of a
therapy (``insulin``) is read as its name, with a warning.

**Verdicts cannot lie.** A run that raises (a timeout included) or cannot be judged (a metric
that is NaN or infinite, no simulated time) is an *errored* run: it fails every requirement of
the spec (whether a rule would have applied is decided from a run's data, which it lacks), and a
campaign with more errored runs than ``errors_allowed`` (default 0; an integer from 0 to the
campaign's number of runs) fails even without requirements. Within the allowance the errored
runs are listed but not judged. A campaign with no judged run at all fails.

**A run cannot hang the campaign.** ``run_timeout_s`` (default :data:`RUN_TIMEOUT_S` = 3600 s,
a number in 1..86400) bounds one run's wall-clock time: inline, each run is executed in a child
process under a watchdog that kills it (its whole process group) at the timeout; on Ray, the
run's task is cancelled and its worker killed. A timed-out run is an errored run (above). It
does not enter the fingerprint: raise it and rerun to resume, running the timed-out runs again.

Names that become paths (``name``, each scenario's ``name``) must match :data:`NAME_RULE`:
letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most
:data:`NAME_MAX` characters (no ``/``, ``..``, absolute path, NUL or leading dot).

Faults never sit on ``plant->sensor``: that channel is the truth hazards are judged on.
Windows are in the loop's time unit: minutes for glucose, seconds for the exoskeleton. A
scenario whose faults overlap in time on one channel is refused unless it says
``overlap: true`` (the random generator draws non-overlapping windows unless asked).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from twinloop.campaigns.faults import (
    ANY_CHANNEL,
    CATALOGUE,
    FaultType,
    channel_messages,
    check_params,
    fault_types,
    numeric_fields,
)
from twinloop.campaigns.interface import RequirementRule, SpecKey
from twinloop.limits import MAX_CONFIG_BYTES, MAX_SEED, InputLimitError, check_document, read_text
from twinloop.therapy import Therapy, TherapyError, get_therapy, therapies

__all__ = [
    "SHARED_RULES",
    "CampaignSpec",
    "FaultLine",
    "Requirement",
    "Scenario",
    "SpecError",
    "check_name",
    "load_spec",
    "requirement_rules",
]

#: The therapy of a spec that names none (the registry's spelling).
DEFAULT_THERAPY = "glucose"


class SpecError(ValueError):
    """A campaign specification refused before any run: where, and what is allowed."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


#: Wall-clock seconds one run may take when the spec says nothing (``run_timeout_s``).
RUN_TIMEOUT_S = 3600.0
#: What ``run_timeout_s`` may be, seconds (a second to a day).
RUN_TIMEOUT_RANGE_S = (1.0, 86400.0)

#: Longest name of a campaign or scenario (it becomes a file or directory name).
NAME_MAX = 64
#: What a campaign's or a scenario's name must match (it becomes part of paths).
NAME_RULE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}")
NAME_ALLOWED = (
    f"letters, digits, '.', '_' and '-', starting with a letter or digit, at most {NAME_MAX} "
    "characters (it becomes a path)"
)


def check_name(value: object, where: str, key: str) -> str:
    """``value`` if it is a safe name (:data:`NAME_RULE`); otherwise a :class:`SpecError`."""
    if not isinstance(value, str) or not NAME_RULE.fullmatch(value):
        raise SpecError(where, f"{key}={value!r} is not allowed: {NAME_ALLOWED}")
    return value


# -- YAML with line numbers ----------------------------------------------------------------
class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings remember their line (``__line__``, 1-based)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(path: Path) -> Any:
    """The YAML document of ``path``, read through :func:`twinloop.limits.read_text`."""
    try:
        text = read_text(path, MAX_CONFIG_BYTES)
    except InputLimitError as exc:  # "PATH: what", as a SpecError's "where: what"
        raise SpecError(str(path), str(exc).removeprefix(f"{path}: ")) from None
    try:
        document = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass
        check_document(document, str(path))
    except InputLimitError as exc:
        raise SpecError(str(path), str(exc).removeprefix(f"{path}: ")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SpecError(where, f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return document


#: Most scenarios ``random:`` draws (each is a run per patient and seed).
MAX_RANDOM_COUNT = 10_000
#: Most faults in one drawn scenario.
MAX_RANDOM_PER_SCENARIO = 100


def _window_time(key: str, value: object, where: str) -> float:
    """A fault window's ``start`` or ``duration``: a number >= 0 or ``.inf`` (not NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise SpecError(where, f"{key}={value!r} is not allowed: a number >= 0 (or .inf)")
    return float(value)


def _bounded_int(
    node: dict[str, Any], key: str, default: int, low: int, high: int, where: str
) -> int:
    """``node[key]`` (or ``default``) when it is an integer from ``low`` to ``high``."""
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(where, f"{key}={value!r} is not allowed: an integer from {low} to {high}")
    return value


class _Where:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, node: object, parent: object = None) -> str:
        line = node.get("__line__") if isinstance(node, dict) else None
        if line is None and isinstance(parent, dict):
            line = parent.get("__line__")
        return f"{self.path}:{line}" if line else str(self.path)


def _keys(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k != "__line__"}


def _only(node: dict[str, Any], allowed: tuple[str, ...], where: str, what: str) -> None:
    for key in _keys(node):
        if key not in allowed:
            raise SpecError(where, f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})")


# -- faults and scenarios --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FaultLine:
    """One fault of a scenario: what, where, when (loop time unit) and its parameters."""

    fault: str
    channel: str
    start: float
    duration: float
    params: tuple[tuple[str, float], ...]
    field: str = ""

    @property
    def end(self) -> float:
        """When the window closes (``inf`` for a permanent fault)."""
        return self.start + self.duration

    @property
    def type(self) -> FaultType:
        """The catalogue entry."""
        return CATALOGUE[self.fault]

    def as_dict(self) -> dict[str, Any]:
        """The fault as data (``params`` a mapping)."""
        out = dataclasses.asdict(self)
        out["params"] = dict(self.params)
        return out


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A named list of faults (an empty list is the fault-free baseline)."""

    name: str
    faults: tuple[FaultLine, ...]

    @property
    def onsets(self) -> list[float]:
        """The faults' onset times, sorted."""
        return sorted(f.start for f in self.faults)

    def as_dict(self) -> dict[str, Any]:
        """The scenario as data."""
        return {"name": self.name, "faults": [f.as_dict() for f in self.faults]}


@dataclasses.dataclass(frozen=True)
class _Loop:
    """What a spec's faults are checked against: the therapy's faults, channels and targets."""

    therapy: str
    faults: Mapping[str, FaultType]
    messages: Mapping[str, type]
    parameter_targets: tuple[str, ...]


def _fault_line(
    node: object,
    loop: _Loop,
    defaults: tuple[float, float],
    where: _Where,
    parent: object,
    hil: bool = False,
) -> FaultLine:
    here = where(node, parent)
    if not isinstance(node, dict):
        raise SpecError(here, f"a fault must be a mapping with 'fault:', got {node!r}")
    _only(node, ("fault", "channel", "start", "duration", "params", "field"), here, "a fault")
    name = node.get("fault")
    fault = CATALOGUE.get(str(name))
    if fault is None:
        raise SpecError(here, f"unknown fault {name!r} (the catalogue: {', '.join(CATALOGUE)})")
    if fault.category == "wire" and not hil:
        raise SpecError(
            here,
            f"fault {name!r} acts on the wire of an emulated device: give the campaign a "
            "'hil:' block to run it through the HIL rig",
        )
    if hil and fault.category != "wire":
        raise SpecError(
            here, f"fault {name!r} is not a wire fault: a HIL campaign injects wire faults only"
        )
    if hil and name == "bad_crc":
        raise SpecError(here, "fault 'bad_crc' needs RTU framing; HIL campaigns use Modbus TCP")
    if str(name) not in loop.faults:
        raise SpecError(here, f"fault {name!r} is for the {fault.therapy} loop, not {loop.therapy}")
    channel = node.get("channel", fault.channels[0])
    messages = loop.messages
    if hil:
        if channel not in fault.channels:
            raise SpecError(here, f"fault {name!r} sits on {fault.channels[0]!r}, not {channel!r}")
    else:
        targets = (*messages, *loop.parameter_targets)
        allowed = [c for c in fault.channels if c in targets]
        if ANY_CHANNEL in fault.channels:
            allowed = list(dict.fromkeys([*allowed, *messages]))
        if channel not in allowed:
            raise SpecError(
                here, f"fault {name!r} cannot sit on channel {channel!r} (allowed: {allowed})"
            )
    start = node.get("start", defaults[0])
    duration = node.get("duration", defaults[1])
    for key, value in (("start", start), ("duration", duration)):
        _window_time(key, value, here)
    params_node = node.get("params") or {}
    if not isinstance(params_node, dict):
        raise SpecError(here, f"params must be a mapping, got {params_node!r}")
    try:
        params = check_params(fault, _keys(params_node))
    except ValueError as exc:
        raise SpecError(here, str(exc)) from None
    field = node.get("field", "")
    if not isinstance(field, str):
        raise SpecError(here, f"field={field!r} is not a message field name")
    if field and channel in messages:
        fields = numeric_fields(messages[channel])
        if field not in fields:
            raise SpecError(
                here,
                f"field={field!r}: {channel} carries {messages[channel].__name__}, whose "
                f"numeric fields are {', '.join(fields)}",
            )
    return FaultLine(
        str(name), str(channel), float(start), float(duration), tuple(params.items()), field
    )


def _check_overlap(scenario: Scenario, where: str) -> None:
    by_channel: dict[str, list[FaultLine]] = {}
    for f in scenario.faults:
        by_channel.setdefault(f.channel, []).append(f)
    for channel, faults in by_channel.items():
        faults.sort(key=lambda f: f.start)
        for a, b in itertools.pairwise(faults):
            if b.start < a.end:
                raise SpecError(
                    where,
                    f"scenario {scenario.name!r}: {a.fault!r} and {b.fault!r} overlap on "
                    f"{channel} ({a.start:g}–{a.end:g} and {b.start:g}–{b.end:g}); say "
                    "'overlap: true' to allow it",
                )


def random_scenarios(
    pool: list[str],
    *,
    count: int,
    seed: int,
    per_scenario: int,
    intensity: float,
    horizon: float,
    defaults: tuple[float, float],
    overlap: bool,
) -> list[Scenario]:
    """Scenarios drawn from ``pool``: ``per_scenario`` faults each, windows inside the horizon.

    Each parameter is set to ``default + intensity × (bound − default)`` toward the bound on
    the side the default leans to (the larger distance), so ``intensity`` 0 gives the
    catalogue's defaults. Without ``overlap`` the windows of one scenario do not overlap at
    all (they are drawn in disjoint slots of the horizon).
    """
    rng = np.random.default_rng(seed)
    out = []
    duration = defaults[1]
    for k in range(count):
        names = rng.choice(pool, size=per_scenario, replace=len(pool) < per_scenario)
        slots = per_scenario if not overlap else 1
        slot = horizon / slots
        faults = []
        for j, name in enumerate(names):
            fault = CATALOGUE[str(name)]
            span = min(duration, 0.9 * slot)
            base = j * slot if not overlap else 0.0
            start = base + float(rng.uniform(0.0, max(slot - span, 0.0)))
            params = {}
            for p in fault.params:
                bound = p.high if (p.high - p.default) >= (p.default - p.low) else p.low
                value = p.default + intensity * (bound - p.default)
                if math.isfinite(value):
                    params[p.name] = value
            faults.append(
                FaultLine(
                    fault.name,
                    fault.channels[0],
                    round(start, 3),
                    span,
                    tuple(check_params(fault, params).items()),
                )
            )
        out.append(Scenario(f"random-{k:03d}", tuple(faults)))
    return out


# -- requirements ------------------------------------------------------------------------------
#: The rules every therapy's requirements may use (each therapy's part adds its own; its
#: ``evaluate`` and ``run_hil`` judge both).
SHARED_RULES: tuple[RequirementRule, ...] = (
    RequirementRule(
        "safe_state_after_agent_fault",
        {"periods": "control periods"},
        "after a discarded or failed controller decision, the safe command goes out within "
        "{periods} control periods",
    ),
    RequirementRule(
        "safe_state_after_lost_communication",
        {"periods": "control periods"},
        "HIL: after a fault that cuts the device's communication, the rig raises the device's "
        "alarm and applies the safe state within {periods} control periods",
        hil_only=True,
    ),
)


def requirement_rules(therapy: str | Therapy | None = None) -> dict[str, RequirementRule]:
    """The requirement vocabulary: rule name → rule (its ``therapy`` says whose).

    Args:
        therapy: a therapy (name or :class:`~twinloop.therapy.Therapy`): the shared rules and
            its own; ``None``: the shared rules and every registered therapy's.

    """
    rules = {r.name: r for r in SHARED_RULES}
    chosen = therapies() if therapy is None else (get_therapy(therapy),)
    for t in chosen:
        if not t.has("campaigns"):
            continue
        for rule in t.part("campaigns").requirement_rules:
            rules.setdefault(rule.name, dataclasses.replace(rule, therapy=t.name))
    return rules


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A safety requirement: an id, a rule of the vocabulary and its parameters."""

    id: str
    rule: str
    params: tuple[tuple[str, float], ...]
    #: The rule's sentence template (:attr:`RequirementRule.text`).
    template: str = ""

    @property
    def text(self) -> str:
        """The requirement as a sentence."""
        return self.template.format(**dict(self.params))

    def as_dict(self) -> dict[str, Any]:
        """The requirement as data, with its sentence."""
        return {"id": self.id, "rule": self.rule, "params": dict(self.params), "text": self.text}


def _requirement(
    node: object,
    therapy: Therapy,
    rules: Mapping[str, RequirementRule],
    where: _Where,
    parent: object,
) -> Requirement:
    here = where(node, parent)
    if not isinstance(node, dict):
        raise SpecError(
            here, f"a requirement must be a mapping with 'id:' and 'rule:', got {node!r}"
        )
    rule = node.get("rule")
    if rule not in rules:
        other = requirement_rules().get(str(rule))
        if other is not None:
            raise SpecError(
                here, f"rule {rule!r} is for the {other.therapy} loop, not {therapy.name}"
            )
        raise SpecError(
            here,
            f"rule {rule!r} is not in the vocabulary of the {therapy.name} loop (rules: "
            f"{', '.join(rules)}); see docs/faults.md",
        )
    names = rules[str(rule)].params
    rid = node.get("id")
    if not isinstance(rid, str) or not rid:
        raise SpecError(here, f"id={rid!r}: every requirement needs a non-empty string id")
    params = {}
    for key, value in _keys(node).items():
        if key in ("id", "rule", "text"):
            continue
        if key not in names:
            allowed = ", ".join(names) or "none"
            raise SpecError(here, f"rule {rule!r} has no parameter {key!r} (allowed: {allowed})")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise SpecError(here, f"{key}={value!r} is not allowed: a number >= 0 ({names[key]})")
        params[key] = float(value)
    missing = [n for n in names if n not in params]
    if missing:
        raise SpecError(here, f"rule {rule!r} needs {', '.join(missing)}")
    return Requirement(rid, str(rule), tuple(params.items()), rules[str(rule)].text)


# -- the campaign ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CampaignSpec:
    """A validated campaign (see the module docstring for the YAML).

    Attributes:
        therapy: the therapy's name in the registry (a former spelling is resolved).
        settings: the therapy's own spec keys (``spec_keys`` of its campaigns part) and their
            values: glucose ``days``, knee ``cycles``.
        hil: the ``hil:`` block's keys and values (the part's ``hil_keys``), or ``None`` for a
            simulated campaign.
        populations: tokens a worker loads before a run (glucose ``population:PATH``).

    """

    name: str
    therapy: str
    patients: tuple[str, ...]
    controller: str
    seeds: tuple[int, ...]
    scenarios: tuple[Scenario, ...]
    requirements: tuple[Requirement, ...]
    settings: tuple[tuple[str, Any], ...] = ()
    twin: bool = True
    source: str = ""
    hil: tuple[tuple[str, Any], ...] | None = None
    #: Tokens of ``patients`` a worker loads before a run (glucose ``population:PATH``).
    populations: tuple[str, ...] = ()
    #: Errored runs (raised or unjudgeable) the campaign may have and still pass.
    errors_allowed: int = 0
    #: Wall-clock seconds one run may take before it is killed (an errored run).
    run_timeout_s: float = 3600.0

    def setting(self, name: str) -> Any:
        """The value of one of the therapy's spec keys (KeyError if the therapy has none)."""
        return dict(self.settings)[name]

    def hil_setting(self, name: str) -> Any:
        """The value of one key of the ``hil:`` block (KeyError without one)."""
        return dict(self.hil or ())[name]

    def scenario(self, name: str) -> Scenario:
        """The scenario called ``name`` (KeyError if none)."""
        for s in self.scenarios:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """The spec as data (what a run's id and a result's provenance refer to)."""
        return {
            "name": self.name,
            "therapy": self.therapy,
            "patients": list(self.patients),
            "controller": self.controller,
            "seeds": list(self.seeds),
            **dict(self.settings),
            "twin": self.twin,
            "hil": None if self.hil is None else dict(self.hil),
            "scenarios": [s.as_dict() for s in self.scenarios],
            "requirements": [r.as_dict() for r in self.requirements],
            "errors_allowed": self.errors_allowed,
            "run_timeout_s": self.run_timeout_s,
        }

    def fingerprint(self) -> str:
        """A short hash of what decides the runs' results (not the verdict-only fields).

        ``errors_allowed`` and ``run_timeout_s`` are left out: a campaign resumes under another
        allowance or timeout.
        """
        import json

        verdict_only = ("errors_allowed", "run_timeout_s")
        decides = {k: v for k, v in self.as_dict().items() if k not in verdict_only}
        text = json.dumps(decides, sort_keys=True)
        return f"{zlib.crc32(text.encode()):08x}"


#: The keys every campaign has (the therapy's ``spec_keys`` come besides them).
SPEC_KEYS = (
    "name",
    "therapy",
    "patients",
    "controller",
    "seeds",
    "twin",
    "defaults",
    "scenarios",
    "sweep",
    "random",
    "baseline",
    "requirements",
    "hil",
    "errors_allowed",
    "run_timeout_s",
)


def _therapy(value: object, where: str, path: Path) -> Therapy:
    """The spec's therapy from the registry (a former spelling with a warning on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            therapy = get_therapy(str(value))
        except TherapyError:
            names = ", ".join(t.name for t in therapies())
            raise SpecError(where, f"therapy={value!r} is not allowed: one of {names}") from None
    for w in caught:
        print(
            f"twinloop: warning: {path}: {w.message}; write therapy: {therapy.name}",
            file=sys.stderr,
        )
    if not therapy.has("campaigns"):
        raise SpecError(where, f"therapy={value!r}: the {therapy.name} therapy has no campaigns")
    return therapy


def _settings(
    node: dict[str, Any], keys: tuple[SpecKey, ...], where: str
) -> tuple[tuple[str, Any], ...]:
    """The values of ``keys`` in ``node`` (defaults filled in), each checked."""
    out = []
    for key in keys:
        value = node.get(key.name, key.default)
        try:
            out.append((key.name, key.check(value)))
        except (TypeError, ValueError) as exc:
            raise SpecError(where, f"{key.name}={value!r} is not allowed: {exc}") from None
    return tuple(out)


def _error_text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def shipped_specs() -> dict[str, Path]:
    """The campaign specs shipped with twinloop, by name (``glucose_smoke``, ...)."""
    from importlib import resources

    folder = Path(str(resources.files("twinloop.campaigns").joinpath("specs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml")) if "requirements" not in p.stem}


def load_spec(path: str | Path) -> CampaignSpec:
    """Read and check a campaign YAML: a file, or a shipped spec's name (:func:`shipped_specs`).

    Raises:
        SpecError: anything refused, with ``file:line`` and what is allowed.

    """
    from twinloop.plant.errors import PlantError

    path = Path(path)
    if not path.exists():
        shipped = shipped_specs()
        if str(path) not in shipped:
            raise SpecError(
                str(path), f"no such file, nor a shipped campaign ({', '.join(shipped)})"
            )
        path = shipped[str(path)]
    where = _Where(path)
    root = _load_yaml(path)
    if not isinstance(root, dict):
        raise SpecError(str(path), "a campaign is a mapping (name:, therapy:, patients:, ...)")
    here = where(root)
    therapy = _therapy(root.get("therapy", DEFAULT_THERAPY), here, path)
    part = therapy.part("campaigns")
    own_keys = tuple(k.name for k in part.spec_keys)
    if any(key not in (*SPEC_KEYS, *own_keys) for key in _keys(root)):
        others = {
            k.name: t.name
            for t in therapies()
            if t.has("campaigns")
            for k in t.part("campaigns").spec_keys
        }
        for key in _keys(root):
            if key in others and key not in (*SPEC_KEYS, *own_keys):
                raise SpecError(
                    here,
                    f"{key!r} is a key of {others[key]} campaigns, not of {therapy.name} "
                    f"(its own: {', '.join(own_keys) or 'none'})",
                )
    _only(root, (*SPEC_KEYS, *own_keys), here, "a campaign")
    if "name" in root:
        name = check_name(root["name"], here, "name")
    else:
        name = check_name(path.stem, here, "name (the file's name, as none is given)")
    plant = therapy.part("plant")
    patients = root.get("patients", list(plant.default_patients))
    if isinstance(patients, str):
        patients = [patients]
    if not (isinstance(patients, list) and patients and all(isinstance(p, str) for p in patients)):
        raise SpecError(here, f"patients={patients!r}: a list of names")
    try:
        expanded = part.patients(patients, path.parent)
    except (PlantError, KeyError, ValueError) as exc:
        raise SpecError(here, f"patients: {_error_text(exc)}") from None
    controller = root.get("controller", therapy.part("policies").default_controller)
    allowed = therapy.part("policies").check_controller(controller)
    if allowed is not None:
        raise SpecError(here, f"controller={controller!r} is not allowed: {allowed}")
    seeds = root.get("seeds", [0])
    if not (
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise SpecError(here, f"seeds={seeds!r}: a list of integers >= 0")
    settings = _settings(root, part.spec_keys, here)
    twin = root.get("twin", True)
    if not isinstance(twin, bool):
        raise SpecError(here, f"twin={twin!r} is not allowed: true or false")
    hil = None
    hil_node = root.get("hil")
    if hil_node is not None:
        hh = where(hil_node, root)
        hil_names = tuple(k.name for k in part.hil_keys)
        if not hil_names:
            raise SpecError(hh, f"hil: the {therapy.name} therapy has no HIL sessions")
        if not isinstance(hil_node, dict):
            raise SpecError(hh, f"hil: a mapping ({therapy.name}: {', '.join(hil_names)})")
        _only(hil_node, hil_names, hh, f"hil ({therapy.name})")
        hil = _settings(hil_node, part.hil_keys, hh)
    loop = _Loop(
        therapy.name,
        fault_types(therapy),
        channel_messages(therapy),
        tuple(part.parameter_targets),
    )
    defaults_node = root.get("defaults") or {}
    if not isinstance(defaults_node, dict):
        raise SpecError(here, "defaults: a mapping with start: and duration:")
    _only(defaults_node, ("start", "duration"), where(defaults_node, root), "defaults")
    unit_default = part.default_window
    dh = where(defaults_node, root)
    defaults = (
        _window_time("start", defaults_node.get("start", unit_default[0]), dh),
        _window_time("duration", defaults_node.get("duration", unit_default[1]), dh),
    )
    scenarios: list[Scenario] = []
    if root.get("baseline", True):
        scenarios.append(Scenario("baseline", ()))
    for node in root.get("scenarios") or []:
        sh = where(node, root)
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise SpecError(sh, "a scenario is a mapping with name: and faults:")
        _only(node, ("name", "faults", "overlap"), sh, "a scenario")
        check_name(node["name"], sh, "scenario name")
        faults = node.get("faults") or []
        if not isinstance(faults, list):
            raise SpecError(sh, "faults: a list of faults")
        scenario = Scenario(
            node["name"],
            tuple(_fault_line(f, loop, defaults, where, node, hil is not None) for f in faults),
        )
        if not node.get("overlap", False):
            _check_overlap(scenario, sh)
        scenarios.append(scenario)
    sweep = root.get("sweep") or []
    if not isinstance(sweep, list):
        raise SpecError(here, "sweep: a list of fault names")
    for fault_name in sweep:
        line = _fault_line(
            {"fault": fault_name, "__line__": root["__line__"]},
            loop,
            defaults,
            where,
            root,
            hil is not None,
        )
        scenarios.append(Scenario(str(fault_name), (line,)))
    rnd = root.get("random")
    if rnd is not None:
        rh = where(rnd, root)
        if not isinstance(rnd, dict):
            raise SpecError(rh, "random: a mapping (count, seed, faults, per_scenario, ...)")
        _only(
            rnd, ("count", "seed", "faults", "per_scenario", "intensity", "overlap"), rh, "random"
        )
        pool = rnd.get("faults") or []
        for fname in pool:
            _fault_line({"fault": fname, "__line__": rnd["__line__"]}, loop, defaults, where, rnd)
        intensity = rnd.get("intensity", 0.5)
        if not (isinstance(intensity, int | float) and 0 <= intensity <= 1):
            raise SpecError(rh, f"intensity={intensity!r} is not allowed: 0..1")
        if not pool:
            raise SpecError(rh, "random: faults: a non-empty list of fault names")
        horizon = float(part.horizon(settings))
        scenarios.extend(
            random_scenarios(
                [str(x) for x in pool],
                count=_bounded_int(rnd, "count", 10, 1, MAX_RANDOM_COUNT, rh),
                seed=_bounded_int(rnd, "seed", 0, 0, MAX_SEED, rh),
                per_scenario=_bounded_int(rnd, "per_scenario", 1, 1, MAX_RANDOM_PER_SCENARIO, rh),
                intensity=float(intensity),
                horizon=horizon,
                defaults=defaults,
                overlap=bool(rnd.get("overlap", False)),
            )
        )
    scenario_names = [s.name for s in scenarios]
    dupes = sorted({n for n in scenario_names if scenario_names.count(n) > 1})
    if dupes:
        raise SpecError(here, f"scenario names must be unique: {dupes} repeat")
    if not scenarios:
        raise SpecError(here, "no scenario: give scenarios:, sweep:, random: or baseline: true")
    req_node = root.get("requirements") or []
    req_where = where
    if isinstance(req_node, str):
        req_path = (path.parent / req_node).resolve()
        req_where = _Where(req_path)
        req_node = _load_yaml(req_path) or []
    if isinstance(req_node, dict) and "requirements" in req_node:
        req_node = req_node["requirements"]
    if not isinstance(req_node, list):
        raise SpecError(here, "requirements: a list (or the path of a YAML list)")
    rules = requirement_rules(therapy)
    requirements = tuple(_requirement(r, therapy, rules, req_where, root) for r in req_node)
    for r in requirements:
        if rules[r.rule].hil_only and hil is None:
            raise SpecError(here, f"requirement {r.id}: {r.rule} needs a 'hil:' campaign")
    ids = [r.id for r in requirements]
    if len(set(ids)) != len(ids):
        raise SpecError(here, f"requirement ids must be unique: {ids}")
    n_runs = len(expanded.names) * len(scenarios) * len(seeds)
    errors_allowed = root.get("errors_allowed", 0)
    if (
        isinstance(errors_allowed, bool)
        or not isinstance(errors_allowed, int)
        or not 0 <= errors_allowed <= n_runs
    ):
        raise SpecError(
            here,
            f"errors_allowed={errors_allowed!r} is not allowed: an integer in 0..{n_runs} (the "
            "campaign's runs)",
        )
    run_timeout_s = root.get("run_timeout_s", RUN_TIMEOUT_S)
    if (
        isinstance(run_timeout_s, bool)
        or not isinstance(run_timeout_s, int | float)
        or not RUN_TIMEOUT_RANGE_S[0] <= run_timeout_s <= RUN_TIMEOUT_RANGE_S[1]
    ):
        low, high = RUN_TIMEOUT_RANGE_S
        raise SpecError(
            here,
            f"run_timeout_s={run_timeout_s!r} is not allowed: seconds in {low:g}..{high:g} (the "
            "wall-clock time one run may take)",
        )
    return CampaignSpec(
        name=name,
        therapy=therapy.name,
        patients=tuple(expanded.names),
        controller=str(controller),
        seeds=tuple(seeds),
        scenarios=tuple(scenarios),
        requirements=requirements,
        settings=settings,
        twin=twin,
        source=str(path),
        hil=hil,
        populations=tuple(expanded.preload),
        errors_allowed=errors_allowed,
        run_timeout_s=float(run_timeout_s),
    )
