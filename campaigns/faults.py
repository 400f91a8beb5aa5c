"""The fault catalogue: what can go wrong on each edge of the loop, as data.

A fault is a **transform on a channel** (:mod:`twinloop.agents.channels`): it sees every message of
that edge, and inside its window ``[start, start + duration)`` (in the loop's own time unit,
minutes for the glucose loop, seconds for the exoskeleton's) changes, holds, drops or adds
messages. A scenario (:mod:`twinloop.campaigns.spec`) names faults from :data:`CATALOGUE` with a
channel,
a window and parameters; :func:`attach` builds the transforms and adds them to a loop's
channels, so a fault is never an edit of an agent.

This module holds the **generic** faults, which apply to every therapy's loop: loss, bias,
drift, scaling, stuck, zero, noise, delay and replay on the sensor or any channel and numeric
field; the timing faults (deadline overrun, clock jitter and drift); and the wire faults. Each
therapy's campaigns part (:mod:`twinloop.campaigns.interface`) contributes its own fault types
(``twinloop.campaigns.glucose.faults``: CGM, pump and meal-data faults;
``twinloop.campaigns.knee.faults``: encoder, torque sensor, EMG and actuator faults):
:data:`CATALOGUE` is all of them, asked of the therapy registry.

Categories and their edges:

* ``sensor`` — the reading on ``sensor->controller`` (what both the controller and the
  supervisor see): the value is changed, held, dropped or replayed; the truth is not.
* ``actuator``, ``data``, ``exo`` — a therapy's own (the glucose pump's delivery, meal
  announcements and therapy parameters; the exoskeleton's sensors and torque command).
* ``timing`` — the controller misses its deadline (its command is discarded; the supervisor's
  safe command goes out), or a device's clock jitters or drifts (reading timestamps).
* ``wire`` — the Modbus wire of an emulated device in HIL (``twinloop.hw_bridge.wire.WireFaults``):
  timeouts, dropped frames, bad CRC, exception responses, delays, disconnects, corrupted bytes,
  duplicated writes. They need a device session and are refused by simulated campaigns.

Coverage of the published sets (``covers``): the 17 fault patterns of py-mgipsim's fault
injector and the truncate / hold / max / min / add / subtract / scale attacks of the UVA
fault-injection testbed (:data:`PUBLISHED_PATTERNS` maps each to a catalogue entry).

Every parameter has a unit, a default and an allowed range; :func:`check_params` refuses an
unknown name or a value outside the range, naming both.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, ItemsView, Iterator, Mapping, ValuesView
from typing import Any

import numpy as np

from twinloop.agents.messages import AgentFault

__all__ = [
    "ANY_CHANNEL",
    "CATALOGUE",
    "GENERIC_FAULTS",
    "PROBABILITY",
    "PUBLISHED_PATTERNS",
    "SENSOR_CHANNELS",
    "ActiveFault",
    "FaultType",
    "Param",
    "attach",
    "channel_messages",
    "check_params",
    "drop_messages",
    "fault_types",
    "history_fault",
    "hold_value",
    "message_time",
    "numeric_fields",
    "param",
    "value_fault",
]


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a fault type.

    Attributes:
        name: its key in a scenario.
        unit: its unit (``"1"`` for a ratio).
        default: the value when a scenario does not give it.
        low: smallest allowed value.
        high: largest allowed value.
        doc: what it does.

    """

    name: str
    unit: str
    default: float
    low: float
    high: float
    doc: str


@dataclasses.dataclass(frozen=True)
class FaultType:
    """An entry of the catalogue.

    Attributes:
        name: the key scenarios use.
        category: sensor, actuator, data, timing, exo or wire.
        therapy: ``"any"`` for a generic fault, else the name of the therapy whose campaigns
            part declares it (the only loop it applies to).
        channels: the channels it may sit on (the first is the default).
        params: its parameters.
        doc: what it does, in one or two sentences.
        make: builds the transform for one occurrence (``None`` for wire faults, applied by a
            device session).
        covers: names of published fault patterns it implements.
        field: the message field a value fault changes by default (else the therapy's
            ``default_fields`` for the message's kind).
        source: a fault that adds messages (or acts once per tick) rather than transforming
            them: the channel whose tick sources it joins (``meal->controller``); empty for a
            transform.

    """

    name: str
    category: str
    therapy: str
    channels: tuple[str, ...]
    params: tuple[Param, ...]
    doc: str
    make: Callable[[ActiveFault], Callable[[Any], Any]] | None
    covers: tuple[str, ...] = ()
    field: str = ""
    source: str = ""

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (KeyError if none)."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclasses.dataclass
class ActiveFault:
    """One occurrence of a fault in one run: type, channel, window, parameters, generator.

    ``start`` and ``end`` are in the loop's time unit (min or s); ``end`` may be ``inf``.
    ``field`` is the message field a value fault changes (the channel's default if empty).
    ``loop`` is the loop it is attached to (data faults change its controller).
    """

    fault: FaultType
    channel: str
    start: float
    end: float
    params: dict[str, float]
    rng: np.random.Generator
    field: str = ""
    loop: Any = None
    #: Messages the fault acted on inside its window (changed, dropped, added, or — for a
    #: probabilistic fault that missed — left as they were), for reports.
    hits: int = 0

    def active(self, t: float) -> bool:
        """Whether time ``t`` is inside the window."""
        return self.start <= t < self.end


def check_params(fault: FaultType, given: Mapping[str, object]) -> dict[str, float]:
    """The fault's parameters: ``given`` checked against the catalogue, defaults filled in.

    Raises:
        ValueError: an unknown parameter, or a value outside its range (named).

    """
    known = {p.name: p for p in fault.params}
    out = {p.name: p.default for p in fault.params}
    for name, value in given.items():
        p = known.get(name)
        if p is None:
            allowed = ", ".join(known) or "none"
            raise ValueError(
                f"fault {fault.name!r}: unknown parameter {name!r} (allowed: {allowed})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"fault {fault.name!r}: {name}={value!r} is not a number")
        if not p.low <= float(value) <= p.high:
            raise ValueError(
                f"fault {fault.name!r}: {name}={value!r} is not allowed: "
                f"{p.low:g}..{p.high:g} {p.unit}"
            )
        out[name] = float(value)
    return out


# -- helpers -----------------------------------------------------------------------------------
def message_time(message: Any) -> float:
    """A message's time in its loop's unit (``t_min`` or ``t_s``)."""
    t = getattr(message, "t_min", None)
    return float(message.t_s if t is None else t)


_t = message_time

#: Faults that may sit on any channel (``"*"``): the UVA testbed's truncate / hold / max-min /
#: add-subtract / scale on any variable of the loop, plus loss, delay and replay.
ANY_CHANNEL = "*"


def channel_messages(therapy: Any) -> dict[str, type]:
    """The message class each channel of a therapy's loop carries (where faults may sit).

    Args:
        therapy: a therapy's name or :class:`twinloop.therapy.Therapy` (its agents part says).

    """
    from twinloop.therapy import get_therapy

    return dict(get_therapy(therapy).part("agents").channel_messages)


def _campaign_parts() -> Iterator[Any]:
    """The campaigns part of every registered therapy that has one."""
    from twinloop.therapy import therapies

    for therapy in therapies():
        if therapy.has("campaigns"):
            yield therapy.part("campaigns")


_DEFAULT_FIELDS: dict[tuple[Any, ...], dict[str, str]] = {}


def _default_fields() -> dict[str, str]:
    """Message kind → default field, of every registered therapy (cached per registry state)."""
    from twinloop.therapy import therapies

    state = tuple((t.name, t.package, tuple(sorted(t.parts.items()))) for t in therapies())
    found = _DEFAULT_FIELDS.get(state)
    if found is None:
        found = {}
        for part in _campaign_parts():
            for kind, name in part.default_fields.items():
                found.setdefault(kind, name)
        _DEFAULT_FIELDS.clear()
        _DEFAULT_FIELDS[state] = found
    return found


def default_field(message: Any) -> str:
    """The field a value fault changes in ``message`` when none is given.

    The therapies' ``default_fields`` by the message's kind; else its first numeric field.

    Raises:
        ValueError: the message has no numeric field.

    """
    name = _default_fields().get(getattr(message, "kind", ""))
    if name:
        return name
    fields = numeric_fields(type(message))
    if not fields:
        raise ValueError(
            f"a value fault has no numeric field to change in {type(message).__name__}"
        )
    return fields[0]


def numeric_fields(message_class: type) -> list[str]:
    """The float fields a value fault may change (not the timestamp)."""
    return [
        f.name
        for f in dataclasses.fields(message_class)
        if f.type in ("float", float) and f.name not in ("t_min", "t_s")
    ]


def _field(fault: ActiveFault, message: Any) -> str:
    if not (fault.field or fault.fault.field):
        fault.field = default_field(message)  # resolved once per occurrence
    return fault.field or fault.fault.field


def value_fault(
    change: Callable[[ActiveFault, float, float], float | None],
) -> Callable[[ActiveFault], Callable[[Any], Any]]:
    """A transform that replaces one numeric field by ``change(fault, t, value)`` in the window.

    ``change`` returning ``None`` drops the message.
    """

    def make(fault: ActiveFault) -> Callable[[Any], Any]:
        def transform(message: Any) -> Any:
            t = _t(message)
            if not fault.active(t):
                return message
            name = _field(fault, message)
            new = change(fault, t, float(getattr(message, name)))
            fault.hits += 1
            if new is None:
                return None
            return dataclasses.replace(message, **{name: new})

        return transform

    return make


def history_fault(
    lag_param: str, *, relabel: bool
) -> Callable[[ActiveFault], Callable[[Any], Any]]:
    """Deliver, in the window, the message from ``lag`` earlier (kept in a history).

    ``relabel``: the old value carries the current timestamp (a replay the receiver cannot
    tell); otherwise the old message goes out as it was (a delay the receiver can see by age).
    """

    def make(fault: ActiveFault) -> Callable[[Any], Any]:
        history: deque[Any] = deque()
        lag = fault.params[lag_param]

        def transform(message: Any) -> Any:
            t = _t(message)
            history.append(message)
            while len(history) > 1 and _t(history[1]) <= t - lag:
                history.popleft()
            if not fault.active(t):
                return message
            fault.hits += 1
            old = history[0]
            if _t(old) > t - lag:  # not that much history yet: nothing to deliver
                return None
            if not relabel:
                return old
            name = _field(fault, message)
            return dataclasses.replace(message, **{name: getattr(old, name)})

        return transform

    return make


def hold_value(fault: ActiveFault) -> Callable[[Any], Any]:
    """A transform repeating the value at onset for the whole window (timestamps advance)."""
    held: list[Any] = []

    def transform(message: Any) -> Any:
        if not fault.active(_t(message)):
            held.clear()
            return message
        fault.hits += 1
        if not held:
            held.append(message)
            return message
        name = _field(fault, message)
        return dataclasses.replace(message, **{name: getattr(held[0], name)})

    return transform


def drop_messages(fault: ActiveFault) -> Callable[[Any], Any]:
    """A transform dropping each message of the window (with ``probability``, default 1)."""
    p = fault.params.get("probability", 1.0)

    def transform(message: Any) -> Any:
        if fault.active(_t(message)) and (p >= 1.0 or fault.rng.random() < p):
            fault.hits += 1
            return None
        return message

    return transform


def _noise(fault: ActiveFault, t: float, value: float) -> float:
    return value + float(fault.rng.normal(0.0, fault.params["sd"]))


# -- timing ----------------------------------------------------------------------------------
def _deadline_overrun(fault: ActiveFault) -> Callable[[Any], Any]:
    """The controller's command arrives after its deadline: discarded, reported on faults."""
    p = fault.params["probability"]

    def transform(message: Any) -> Any:
        t = _t(message)
        if not fault.active(t) or (p < 1.0 and fault.rng.random() >= p):
            return message
        fault.hits += 1
        faults = getattr(fault.loop, "channels", {}).get("runtime->faults")
        if faults is not None:  # AgentFault is in minutes (the exo loop's too)
            t_min = t if hasattr(message, "t_min") else t / 60.0
            took = fault.params["overrun_factor"]
            error = f"TimeoutError: decide took {took:g}x its deadline (injected)"
            faults.send(AgentFault(t_min, "controller", error, "command discarded"))
        return None

    return transform


def _clock_fault(
    shift: Callable[[ActiveFault, float], float],
) -> Callable[[ActiveFault], Callable[[Any], Any]]:
    """A transform that moves each message's timestamp by ``shift(fault, t)`` in the window."""

    def make(fault: ActiveFault) -> Callable[[Any], Any]:
        def transform(message: Any) -> Any:
            t = _t(message)
            if not fault.active(t):
                return message
            fault.hits += 1
            name = "t_min" if hasattr(message, "t_min") else "t_s"
            return dataclasses.replace(message, **{name: t + shift(fault, t)})

        return transform

    return make


_clock_jitter = _clock_fault(lambda f, t: float(f.rng.normal(0.0, f.params["sd"])))
_clock_drift = _clock_fault(lambda f, t: f.params["ppm"] * 1e-6 * (t - f.start))


# -- the catalogue ---------------------------------------------------------------------------
SENSOR_CHANNELS = ("sensor->controller",)
PROBABILITY = Param(
    "probability", "1", 1.0, 0.0, 1.0, "chance that each message in the window is hit"
)


def param(name: str, unit: str, default: float, low: float, high: float, doc: str) -> Param:
    """A :class:`Param` (positional shorthand for the catalogue's entries)."""
    return Param(name, unit, default, low, high, doc)


_ENTRIES: list[FaultType] = [
    FaultType(
        "missing_data",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (PROBABILITY,),
        "Readings are lost (each with `probability`): the receiver sees them age.",
        drop_messages,
        ("mgipsim:missing_signal",),
    ),
    FaultType(
        "bias",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (param("offset", "mg/dL or the field's unit", 40.0, -500.0, 500.0, "added to each value"),),
        "A constant offset on every value in the window (negative: subtract).",
        value_fault(lambda f, t, v: v + f.params["offset"]),
        ("mgipsim:positive_bias", "mgipsim:negative_bias", "uva:add", "uva:subtract"),
    ),
    FaultType(
        "drift",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (
            param(
                "rate_per_h",
                "unit/h",
                10.0,
                -200.0,
                200.0,
                "growth of the offset per hour (glucose: mg/dL/h; knee: rad/h)",
            ),
        ),
        "An offset growing linearly from 0 at onset.",
        value_fault(lambda f, t, v: v + f.params["rate_per_h"] * (t - f.start) / 60.0),
        (),
    ),
    FaultType(
        "scaling",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (param("factor", "1", 1.3, 0.0, 10.0, "multiplies each value"),),
        "Every value multiplied by `factor`.",
        value_fault(lambda f, t, v: v * f.params["factor"]),
        ("uva:scale",),
    ),
    FaultType(
        "stuck",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (),
        "The value at onset repeats for the whole window (timestamps advance).",
        hold_value,
        ("mgipsim:repeated_reading", "uva:hold"),
    ),
    FaultType(
        "zero_reading",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (),
        "Every value reads 0.",
        value_fault(lambda f, t, v: 0.0),
        ("mgipsim:zero_reading", "uva:truncate"),
    ),
    FaultType(
        "noise_burst",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (
            param(
                "sd",
                "mg/dL or the field's unit",
                25.0,
                0.0,
                500.0,
                "standard deviation of the added Gaussian noise",
            ),
        ),
        "Added white Gaussian noise of `sd`.",
        value_fault(_noise),
        (),
    ),
    FaultType(
        "delay",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (
            param(
                "lag", "min (s for the knee)", 15.0, 0.0, 1440.0, "how old each delivered value is"
            ),
        ),
        "Each message arrives `lag` late with its own (old) timestamp: the receiver can see its "
        "age.",
        history_fault("lag", relabel=False),
        (),
    ),
    FaultType(
        "replay",
        "sensor",
        "any",
        (*SENSOR_CHANNELS, ANY_CHANNEL),
        (
            param(
                "lag",
                "min (s for the knee)",
                1440.0,
                1.0,
                100000.0,
                "how far back the replayed episode lies (1440 min: yesterday)",
            ),
        ),
        "Values recorded `lag` earlier replayed with current timestamps (a replay attack).",
        history_fault("lag", relabel=True),
        ("mgipsim:repeated_episode",),
    ),
    FaultType(
        "deadline_overrun",
        "timing",
        "any",
        ("controller->supervisor",),
        (
            PROBABILITY,
            param(
                "overrun_factor", "1", 2.0, 1.0, 1000.0, "how late the decision is, in deadlines"
            ),
        ),
        "The controller overruns its deadline: its command is discarded (recorded on "
        "runtime->faults) and the supervisor's safe command goes out.",
        _deadline_overrun,
        (),
    ),
    FaultType(
        "clock_jitter",
        "timing",
        "any",
        ("sensor->controller",),
        (param("sd", "min (s for the knee)", 1.0, 0.0, 60.0, "std. dev. of the timestamp error"),),
        "Message timestamps jitter (the device clock's error).",
        _clock_jitter,
        (),
    ),
    FaultType(
        "clock_drift",
        "timing",
        "any",
        ("sensor->controller",),
        (param("ppm", "ppm", 50000.0, -1e6, 1e6, "clock rate error (50,000 ppm = 72 min/day)"),),
        "The device clock drifts from onset: timestamps run fast (or slow).",
        _clock_drift,
        (),
    ),
]

_WIRE = (
    ("timeout", "drop_response", "The device executes requests but its answers are lost."),
    ("dropped_frame", "drop", "Requests are lost: not executed, no answer."),
    ("bad_crc", "corrupt_crc", "RTU answers carry a wrong CRC."),
    ("modbus_exception", "exception_code", "Every request is answered with an exception."),
    ("delayed_response", "delay_s", "Each answer is delayed."),
    ("disconnect", "disconnect", "The device closes the connection / goes silent."),
    ("byte_corruption", "corrupt_bytes", "One random byte of each answer is flipped."),
    ("duplicated_write", "duplicate_write", "Each write is executed twice (a retried frame)."),
)
for _name, _switch, _doc in _WIRE:
    _params: tuple[Param, ...] = (PROBABILITY,)
    if _switch == "exception_code":
        _params = (param("code", "1", 4.0, 1.0, 11.0, "the Modbus exception code"), PROBABILITY)
    elif _switch == "delay_s":
        _params = (param("delay_s", "s", 0.5, 0.0, 60.0, "added before each answer"), PROBABILITY)
    _ENTRIES.append(
        FaultType(
            _name,
            "wire",
            "any",
            (f"wire:{_switch}",),
            _params,
            _doc + f" (HIL: `WireFaults.{_switch}`).",
            None,
            (),
        )
    )

#: The generic fault types (every therapy's loop), by name.
GENERIC_FAULTS: dict[str, FaultType] = {f.name: f for f in _ENTRIES}


def fault_types(therapy: Any = None) -> dict[str, FaultType]:
    """Fault types by name: the generic ones and those of ``therapy``'s campaigns part.

    Args:
        therapy: a therapy's name or :class:`twinloop.therapy.Therapy`; ``None``: every
            registered therapy's (the whole catalogue).

    """
    out = dict(GENERIC_FAULTS)
    if therapy is None:
        parts = list(_campaign_parts())
    else:
        from twinloop.therapy import get_therapy

        found = get_therapy(therapy)
        parts = [found.part("campaigns")] if found.has("campaigns") else []
    wire = {k: v for k, v in out.items() if v.category == "wire"}
    for part in parts:
        for fault in part.fault_types:
            out.setdefault(fault.name, fault)
    # the wire faults last (the catalogue's order: generic, the therapies', then the wire)
    for name in wire:
        out[name] = out.pop(name)
    return out


class _Catalogue(Mapping[str, FaultType]):
    """Every fault type by name, asked of the therapy registry at each use.

    A therapy registered later (a test's) is included.
    """

    def _all(self) -> dict[str, FaultType]:
        return fault_types()

    def __getitem__(self, name: str) -> FaultType:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def values(self) -> ValuesView[FaultType]:  # one registry walk, not one per item
        return self._all().values()

    def items(self) -> ItemsView[str, FaultType]:
        return self._all().items()


#: Every fault type by name (the generic ones and every therapy's).
CATALOGUE: Mapping[str, FaultType] = _Catalogue()


class _Patterns(Mapping[str, str]):
    """Published pattern → the catalogue entry implementing it."""

    def _all(self) -> dict[str, str]:
        return {pattern: f.name for f in CATALOGUE.values() for pattern in f.covers}

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


#: The published patterns each catalogue entry implements (pattern → entry).
PUBLISHED_PATTERNS: Mapping[str, str] = _Patterns()


def attach(loop: Any, faults: list[ActiveFault]) -> None:
    """Add the transforms (or tick sources) of ``faults`` to ``loop``'s channels.

    A source fault (its type's ``source``: a false meal, a therapy parameter changed for its
    window) becomes a source of that channel, which the loop polls once per tick.

    Raises:
        ValueError: a wire fault (it needs a device session), or a channel the loop lacks.

    """
    for active in faults:
        fault = active.fault
        if fault.make is None:
            raise ValueError(
                f"fault {fault.name!r} acts on the wire of an emulated device: run it in a HIL "
                "scenario, not in simulation"
            )
        active.loop = loop
        built = fault.make(active)
        if fault.source:
            loop.channels[fault.source].add_source(built)
            continue
        channel = loop.channels.get(active.channel)
        if channel is None:
            raise ValueError(
                f"fault {fault.name!r}: the loop has no channel {active.channel!r} "
                f"(it has: {', '.join(loop.channels)})"
            )
        channel.add_transform(built)
