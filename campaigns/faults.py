"""The fault catalogue: what can go wrong on each edge of the loop, as data.

A fault is a **transform on a channel** (:mod:`twinloop.agents.channels`): it sees every message of
that edge, and inside its window ``[start, start + duration)`` (in the loop's own time unit,
minutes for the glucose loop, seconds for the exoskeleton's) changes, holds, drops or adds
messages. A scenario (:mod:`hil.scenarios`) names faults from :data:`CATALOGUE` with a channel,
a window and parameters; :func:`attach` builds the transforms and adds them to a loop's
channels, so a fault is never an edit of an agent.

Categories and their edges:

* ``sensor`` — the CGM reading on ``sensor->controller`` (what both the controller and the
  supervisor see): the value is changed, held, dropped or replayed; the true glucose is not.
* ``actuator`` — the insulin that reaches the patient on ``actuator->plant``. The pump keeps
  reporting what it meant to deliver (the loop tells the twin and the supervisor the pump's own
  report), so every actuator fault here is **silent**, as an occlusion is before a pump's
  pressure alarm.
* ``data`` — the user's meal announcements on ``meal->controller`` and the controller's own
  therapy parameters (carb ratio, correction factor), changed for the window and restored.
* ``timing`` — the controller misses its deadline (its command is discarded; the supervisor's
  safe command goes out), or a device's clock jitters or drifts (reading timestamps).
* ``exo`` — the exoskeleton's encoder, torque sensor, EMG and torque command.
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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from twinloop.agents.messages import AgentFault, InsulinDelivery, MealAnnouncement

__all__ = [
    "ANY_CHANNEL",
    "CATALOGUE",
    "PUBLISHED_PATTERNS",
    "ActiveFault",
    "FaultType",
    "Param",
    "attach",
    "check_params",
]

#: The CGM's reporting range, mg/dL (readings are clipped to it by real sensors).
CGM_MIN_MG_DL = 40.0
CGM_MAX_MG_DL = 400.0


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
        therapy: ``"glucose"``, ``"knee-exo"`` or ``"any"`` (the loops it applies to).
        channels: the channels it may sit on (the first is the default).
        params: its parameters.
        doc: what it does, in one or two sentences.
        make: builds the transform for one occurrence (``None`` for wire faults, applied by a
            device session).
        covers: names of published fault patterns it implements.
        field: the message field a value fault changes by default (else the channel's
            :data:`DEFAULT_FIELD`).

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
def _t(message: Any) -> float:
    t = getattr(message, "t_min", None)
    return float(message.t_s if t is None else t)


#: The value a sensor fault changes, per channel's message kind, when a scenario gives no field.
DEFAULT_FIELD = {
    "cgm": "glucose_mg_dl",
    "meal_announcement": "carbs_g",
    "insulin_command": "basal_u_per_h",
    "insulin_delivery": "basal_u",
    "twin_estimate": "bg_mg_dl",
    "exo_sensor": "angle_rad",
    "task_reference": "reference_rad",
    "knee_twin_estimate": "patient_torque_nm",
    "exo_torque_command": "torque_nm",
}

#: Faults that may sit on any channel (``"*"``): the UVA testbed's truncate / hold / max-min /
#: add-subtract / scale on any variable of the loop, plus loss, delay and replay.
ANY_CHANNEL = "*"


def channel_messages(therapy: str) -> dict[str, type]:
    """The message class each channel of a therapy's loop carries (where faults may sit)."""
    if therapy == "glucose":
        from twinloop.agents.messages import CgmReading, InsulinCommand, TwinEstimate

        return {
            "sensor->controller": CgmReading,
            "meal->controller": MealAnnouncement,
            "controller->supervisor": InsulinCommand,
            "supervisor->actuator": InsulinCommand,
            "actuator->plant": InsulinDelivery,
            "estimator->controller": TwinEstimate,
        }
    from twinloop.agents.knee.messages import (
        ExoSensorReading,
        ExoTorqueCommand,
        KneeTwinEstimate,
        TaskReference,
    )

    return {
        "sensor->controller": ExoSensorReading,
        "task->controller": TaskReference,
        "estimator->controller": KneeTwinEstimate,
        "controller->supervisor": ExoTorqueCommand,
        "supervisor->actuator": ExoTorqueCommand,
    }


def numeric_fields(message_class: type) -> list[str]:
    """The float fields a value fault may change (not the timestamp)."""
    return [
        f.name
        for f in dataclasses.fields(message_class)
        if f.type in ("float", float) and f.name not in ("t_min", "t_s")
    ]


def _field(fault: ActiveFault, message: Any) -> str:
    return fault.field or fault.fault.field or DEFAULT_FIELD[message.kind]


def _value_fault(
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


def _history_fault(
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


def _hold(fault: ActiveFault) -> Callable[[Any], Any]:
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


def _drop(fault: ActiveFault) -> Callable[[Any], Any]:
    p = fault.params.get("probability", 1.0)

    def transform(message: Any) -> Any:
        if fault.active(_t(message)) and (p >= 1.0 or fault.rng.random() < p):
            fault.hits += 1
            return None
        return message

    return transform


def _compression(fault: ActiveFault, t: float, value: float) -> float:
    """Pressure-induced sensor attenuation: a dip of ``depth`` shaped as half a sine."""
    span = fault.end - fault.start
    shape = math.sin(math.pi * (t - fault.start) / span) if math.isfinite(span) else 1.0
    return max(value - fault.params["depth_mg_dl"] * shape, 0.0)


def _noise(fault: ActiveFault, t: float, value: float) -> float:
    return value + float(fault.rng.normal(0.0, fault.params["sd"]))


# -- actuator ------------------------------------------------------------------------------------
def _delivery_fault(
    change: Callable[[ActiveFault, InsulinDelivery], InsulinDelivery | None],
) -> Callable[[ActiveFault], Callable[[Any], Any]]:
    def make(fault: ActiveFault) -> Callable[[Any], Any]:
        def transform(message: Any) -> Any:
            if not (isinstance(message, InsulinDelivery) and fault.active(message.t_min)):
                return message
            fault.hits += 1
            return change(fault, message)

        return transform

    return make


def _scaled(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
    f = fault.params["factor"]
    return dataclasses.replace(d, basal_u=d.basal_u * f, bolus_u=d.bolus_u * f)


def _occluded(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
    f = 1.0 - fault.params["severity"]
    return dataclasses.replace(d, basal_u=d.basal_u * f, bolus_u=d.bolus_u * f)


def _stopped(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
    return dataclasses.replace(d, basal_u=0.0, bolus_u=0.0)


def _stuck_rate(fault: ActiveFault) -> Callable[[Any], Any]:
    stuck: list[float] = []

    def transform(message: Any) -> Any:
        if not (isinstance(message, InsulinDelivery) and fault.active(message.t_min)):
            stuck.clear()
            return message
        fault.hits += 1
        if not stuck:
            stuck.append(message.basal_u)
        return dataclasses.replace(message, basal_u=stuck[0], bolus_u=0.0)

    return transform


def _basal_offset(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
    return dataclasses.replace(
        d, basal_u=max(d.basal_u + fault.params["offset_u_per_h"] / 60.0, 0.0)
    )


def _fixed_rate(param: str) -> Callable[[ActiveFault, InsulinDelivery], InsulinDelivery]:
    def change(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
        return dataclasses.replace(d, basal_u=fault.params[param] / 60.0)

    return change


def _false_bolus(fault: ActiveFault) -> Callable[[Any], Any]:
    done: list[bool] = []

    def transform(message: Any) -> Any:
        if done or not (isinstance(message, InsulinDelivery) and fault.active(message.t_min)):
            return message
        done.append(True)
        fault.hits += 1
        return dataclasses.replace(message, bolus_u=message.bolus_u + fault.params["units"])

    return transform


def _duplicated_bolus(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
    return dataclasses.replace(d, bolus_u=2.0 * d.bolus_u)


# -- data ------------------------------------------------------------------------------------
def _false_meal(fault: ActiveFault) -> Callable[..., Any]:
    """A source: announces ``carbs_g`` once at onset (never eaten)."""

    def source(t0: float, t1: float) -> list[Any]:
        if t0 <= fault.start < t1 and fault.hits == 0:
            fault.hits += 1
            return [MealAnnouncement(float(fault.start), fault.params["carbs_g"])]
        return []

    return source


def _carbs_scaled(fault: ActiveFault, t: float, value: float) -> float:
    return value / fault.params["factor"]


def _controller_param(attribute: str) -> Callable[[ActiveFault], Callable[[Any], Any]]:
    """Scale ``controller.<attribute>`` by ``factor`` in the window, restored after it.

    Runs as a tick hook (``(t0, t1) -> []``): the loop calls its sources once per tick.
    """

    def make(fault: ActiveFault) -> Callable[..., Any]:
        saved: list[float] = []

        def hook(t0: float, t1: float) -> list[Any]:
            controller = getattr(fault.loop, "controller", None)
            if controller is None or not hasattr(controller, attribute):
                return []
            if fault.active(t0) and not saved:
                saved.append(getattr(controller, attribute))
                object.__setattr__(controller, attribute, saved[0] * fault.params["factor"])
                fault.hits += 1
            elif saved and not fault.active(t0):
                object.__setattr__(controller, attribute, saved.pop())
            return []

        return hook

    return make


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


# -- exoskeleton -----------------------------------------------------------------------------
def _glitch(fault: ActiveFault, t: float, value: float) -> float:
    if fault.rng.random() < fault.params["probability"]:
        return value + fault.params["magnitude"] * (1.0 if fault.rng.random() < 0.5 else -1.0)
    return value


def _emg_loss(fault: ActiveFault) -> Callable[[Any], Any]:
    def transform(message: Any) -> Any:
        if not fault.active(_t(message)) or not hasattr(message, "emg_quad"):
            return message
        fault.hits += 1
        return dataclasses.replace(message, emg_quad=0.0, emg_ham=0.0)

    return transform


# -- the catalogue ---------------------------------------------------------------------------
_SENSOR = ("sensor->controller",)
_ACT = ("actuator->plant",)
_PROB = Param("probability", "1", 1.0, 0.0, 1.0, "chance that each message in the window is hit")


def _p(name: str, unit: str, default: float, low: float, high: float, doc: str) -> Param:
    return Param(name, unit, default, low, high, doc)


_ENTRIES: list[FaultType] = [
    # sensor ----------------------------------------------------------------------------------
    FaultType(
        "missing_data",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (_PROB,),
        "Readings are lost (each with `probability`): the receiver sees them age.",
        _drop,
        ("mgipsim:missing_signal",),
    ),
    FaultType(
        "spike_positive",
        "sensor",
        "glucose",
        _SENSOR,
        (_p("magnitude_mg_dl", "mg/dL", 100.0, 0.0, 500.0, "added to each reading"), _PROB),
        "Readings jump up by `magnitude_mg_dl` (a short window is a spike).",
        _value_fault(
            lambda f, t, v: (
                v + f.params["magnitude_mg_dl"] if f.rng.random() < f.params["probability"] else v
            )
        ),
        ("mgipsim:positive_spike",),
    ),
    FaultType(
        "spike_negative",
        "sensor",
        "glucose",
        _SENSOR,
        (_p("magnitude_mg_dl", "mg/dL", 100.0, 0.0, 500.0, "subtracted from each reading"), _PROB),
        "Readings drop by `magnitude_mg_dl` (not below 0).",
        _value_fault(
            lambda f, t, v: (
                max(v - f.params["magnitude_mg_dl"], 0.0)
                if f.rng.random() < f.params["probability"]
                else v
            )
        ),
        ("mgipsim:negative_spike",),
    ),
    FaultType(
        "bias",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (_p("offset", "mg/dL or the field's unit", 40.0, -500.0, 500.0, "added to each value"),),
        "A constant offset on every value in the window (negative: subtract).",
        _value_fault(lambda f, t, v: v + f.params["offset"]),
        ("mgipsim:positive_bias", "mgipsim:negative_bias", "uva:add", "uva:subtract"),
    ),
    FaultType(
        "drift",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (
            _p(
                "rate_per_h",
                "unit/h",
                10.0,
                -200.0,
                200.0,
                "growth of the offset per hour (glucose: mg/dL/h; knee: rad/h)",
            ),
        ),
        "An offset growing linearly from 0 at onset.",
        _value_fault(lambda f, t, v: v + f.params["rate_per_h"] * (t - f.start) / 60.0),
        (),
    ),
    FaultType(
        "scaling",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (_p("factor", "1", 1.3, 0.0, 10.0, "multiplies each value"),),
        "Every value multiplied by `factor`.",
        _value_fault(lambda f, t, v: v * f.params["factor"]),
        ("uva:scale",),
    ),
    FaultType(
        "stuck",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (),
        "The value at onset repeats for the whole window (timestamps advance).",
        _hold,
        ("mgipsim:repeated_reading", "uva:hold"),
    ),
    FaultType(
        "clamp_max",
        "sensor",
        "glucose",
        _SENSOR,
        (_p("value_mg_dl", "mg/dL", CGM_MAX_MG_DL, 0.0, 1000.0, "the reported value"),),
        "Every reading reports the sensor's maximum.",
        _value_fault(lambda f, t, v: f.params["value_mg_dl"]),
        ("mgipsim:max_reading",),
    ),
    FaultType(
        "clamp_min",
        "sensor",
        "glucose",
        _SENSOR,
        (_p("value_mg_dl", "mg/dL", CGM_MIN_MG_DL, 0.0, 1000.0, "the reported value"),),
        "Every reading reports the sensor's minimum.",
        _value_fault(lambda f, t, v: f.params["value_mg_dl"]),
        ("mgipsim:min_reading",),
    ),
    FaultType(
        "zero_reading",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (),
        "Every value reads 0.",
        _value_fault(lambda f, t, v: 0.0),
        ("mgipsim:zero_reading", "uva:truncate"),
    ),
    FaultType(
        "noise_burst",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (
            _p(
                "sd",
                "mg/dL or the field's unit",
                25.0,
                0.0,
                500.0,
                "standard deviation of the added Gaussian noise",
            ),
        ),
        "Added white Gaussian noise of `sd`.",
        _value_fault(_noise),
        (),
    ),
    FaultType(
        "compression_low",
        "sensor",
        "glucose",
        _SENSOR,
        (_p("depth_mg_dl", "mg/dL", 60.0, 0.0, 400.0, "the dip's depth at mid-window"),),
        "Pressure-induced sensor attenuation (lying on the sensor at night): a half-sine dip "
        "of `depth_mg_dl` over the window (Baysal et al. 2014).",
        _value_fault(_compression),
        (),
    ),
    FaultType(
        "calibration_error",
        "sensor",
        "glucose",
        _SENSOR,
        (
            _p("gain", "1", 1.2, 0.1, 5.0, "slope error"),
            _p("offset_mg_dl", "mg/dL", -10.0, -200.0, 200.0, "intercept error"),
        ),
        "A wrong calibration: value × `gain` + `offset_mg_dl`.",
        _value_fault(lambda f, t, v: v * f.params["gain"] + f.params["offset_mg_dl"]),
        (),
    ),
    FaultType(
        "delay",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (_p("lag", "min (s for the knee)", 15.0, 0.0, 1440.0, "how old each delivered value is"),),
        "Each message arrives `lag` late with its own (old) timestamp: the receiver can see its "
        "age.",
        _history_fault("lag", relabel=False),
        (),
    ),
    FaultType(
        "replay",
        "sensor",
        "any",
        (*_SENSOR, ANY_CHANNEL),
        (
            _p(
                "lag",
                "min (s for the knee)",
                1440.0,
                1.0,
                100000.0,
                "how far back the replayed episode lies (1440 min: yesterday)",
            ),
        ),
        "Values recorded `lag` earlier replayed with current timestamps (a replay attack).",
        _history_fault("lag", relabel=True),
        ("mgipsim:repeated_episode",),
    ),
    # actuator --------------------------------------------------------------------------------
    FaultType(
        "occlusion",
        "actuator",
        "glucose",
        _ACT,
        (_p("severity", "1", 1.0, 0.0, 1.0, "fraction of the insulin that does not get through"),),
        "A blocked infusion set: `severity` of each delivery never reaches the patient; the pump "
        "reports normal delivery.",
        _delivery_fault(_occluded),
        (),
    ),
    FaultType(
        "under_delivery",
        "actuator",
        "glucose",
        _ACT,
        (_p("factor", "1", 0.5, 0.0, 1.0, "fraction delivered"),),
        "Each delivery scaled down by `factor` (mechanical wear); reported as normal.",
        _delivery_fault(_scaled),
        (),
    ),
    FaultType(
        "over_delivery",
        "actuator",
        "glucose",
        _ACT,
        (_p("factor", "1", 1.5, 1.0, 10.0, "delivered multiple"),),
        "Each delivery scaled up by `factor`; reported as normal.",
        _delivery_fault(_scaled),
        (),
    ),
    FaultType(
        "stuck_rate",
        "actuator",
        "glucose",
        _ACT,
        (),
        "The basal rate at onset is delivered whatever is commanded; boluses are not given.",
        _stuck_rate,
        (),
    ),
    FaultType(
        "stopped_delivery",
        "actuator",
        "glucose",
        _ACT,
        (),
        "Delivery stops entirely while the pump reports normal delivery.",
        _delivery_fault(_stopped),
        ("mgipsim:unknown_stop",),
    ),
    FaultType(
        "false_bolus",
        "actuator",
        "glucose",
        _ACT,
        (_p("units", "U", 3.0, 0.0, 25.0, "the unrequested bolus"),),
        "An unrequested bolus of `units` at onset (once).",
        _false_bolus,
        ("mgipsim:false_bolus",),
    ),
    FaultType(
        "duplicated_bolus",
        "actuator",
        "glucose",
        _ACT,
        (),
        "Every bolus in the window is delivered twice.",
        _delivery_fault(_duplicated_bolus),
        (),
    ),
    FaultType(
        "basal_bias",
        "actuator",
        "glucose",
        _ACT,
        (_p("offset_u_per_h", "U/h", 0.5, -35.0, 35.0, "added to the basal rate delivered"),),
        "The basal rate that reaches the patient is off by `offset_u_per_h` (not below 0); the "
        "pump reports normal delivery.",
        _delivery_fault(_basal_offset),
        ("mgipsim:positive_basal", "mgipsim:negative_basal", "mgipsim:unknown_under"),
    ),
    FaultType(
        "max_basal",
        "actuator",
        "glucose",
        _ACT,
        (_p("rate_u_per_h", "U/h", 5.0, 0.0, 35.0, "the basal rate delivered"),),
        "The pump runs its maximum basal rate whatever is commanded.",
        _delivery_fault(_fixed_rate("rate_u_per_h")),
        ("mgipsim:max_basal", "uva:max"),
    ),
    FaultType(
        "min_basal",
        "actuator",
        "glucose",
        _ACT,
        (_p("rate_u_per_h", "U/h", 0.0, 0.0, 35.0, "the basal rate delivered"),),
        "The pump runs its minimum basal rate (0 U/h by default) whatever is commanded.",
        _delivery_fault(_fixed_rate("rate_u_per_h")),
        ("mgipsim:min_basal", "uva:min"),
    ),
    # data and user ---------------------------------------------------------------------------
    FaultType(
        "false_meal",
        "data",
        "glucose",
        ("meal->controller",),
        (_p("carbs_g", "g", 60.0, 1.0, 300.0, "the announced carbohydrates"),),
        "A meal announced at onset that is never eaten.",
        _false_meal,
        ("mgipsim:false_meal",),
    ),
    FaultType(
        "missed_meal_announcement",
        "data",
        "glucose",
        ("meal->controller",),
        (_PROB,),
        "Meals in the window are eaten but not announced.",
        _drop,
        (),
    ),
    FaultType(
        "wrong_carb_count",
        "data",
        "glucose",
        ("meal->controller",),
        (_p("factor", "1", 1.5, 0.1, 10.0, "true carbs ÷ announced carbs"),),
        "Announced carbohydrates divided by `factor` (an under-count when > 1).",
        _value_fault(_carbs_scaled),
        (),
        "carbs_g",
    ),
    FaultType(
        "wrong_carb_ratio",
        "data",
        "glucose",
        ("controller",),
        (_p("factor", "1", 0.7, 0.1, 10.0, "multiplies the controller's carb ratio (g/U)"),),
        "The bolus calculator's carb ratio is wrong by `factor` for the window (< 1: too much "
        "insulin per gram).",
        _controller_param("carb_ratio_g_per_u"),
        (),
    ),
    FaultType(
        "wrong_correction_factor",
        "data",
        "glucose",
        ("controller",),
        (_p("factor", "1", 0.5, 0.1, 10.0, "multiplies the controller's correction factor"),),
        "The correction factor (mg/dL per U) is wrong by `factor` (< 1: over-correction).",
        _controller_param("correction_factor_mg_dl_per_u"),
        (),
    ),
    # timing ----------------------------------------------------------------------------------
    FaultType(
        "deadline_overrun",
        "timing",
        "any",
        ("controller->supervisor",),
        (
            _PROB,
            _p("overrun_factor", "1", 2.0, 1.0, 1000.0, "how late the decision is, in deadlines"),
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
        (_p("sd", "min (s for the knee)", 1.0, 0.0, 60.0, "std. dev. of the timestamp error"),),
        "Message timestamps jitter (the device clock's error).",
        _clock_jitter,
        (),
    ),
    FaultType(
        "clock_drift",
        "timing",
        "any",
        ("sensor->controller",),
        (_p("ppm", "ppm", 50000.0, -1e6, 1e6, "clock rate error (50,000 ppm = 72 min/day)"),),
        "The device clock drifts from onset: timestamps run fast (or slow).",
        _clock_drift,
        (),
    ),
    # exoskeleton -----------------------------------------------------------------------------
    FaultType(
        "encoder_glitch",
        "exo",
        "knee-exo",
        ("sensor->controller",),
        (
            _p("magnitude", "rad", 0.3, 0.0, 6.3, "size of each glitch"),
            _p("probability", "1", 0.05, 0.0, 1.0, "chance of a glitch per reading"),
        ),
        "The knee angle jumps by ±`magnitude` on random readings.",
        _value_fault(_glitch),
        (),
        "angle_rad",
    ),
    FaultType(
        "torque_sensor_bias",
        "exo",
        "knee-exo",
        ("sensor->controller",),
        (_p("offset_nm", "N·m", 5.0, -100.0, 100.0, "added to the torque sensor"),),
        "The joint torque sensor reads `offset_nm` off.",
        _value_fault(lambda f, t, v: v + f.params["offset_nm"]),
        (),
        "torque_sensor_nm",
    ),
    FaultType(
        "torque_saturation",
        "exo",
        "knee-exo",
        ("supervisor->actuator",),
        (_p("limit_nm", "N·m", 5.0, 0.0, 100.0, "the actuator's saturated torque"),),
        "The actuator saturates at ±`limit_nm` (a weak motor or a current limit).",
        _value_fault(lambda f, t, v: max(-f.params["limit_nm"], min(f.params["limit_nm"], v))),
        (),
    ),
    FaultType(
        "sign_flip",
        "exo",
        "knee-exo",
        ("supervisor->actuator", "sensor->controller"),
        (),
        "The torque command (or the chosen field) changes sign: a swapped motor phase.",
        _value_fault(lambda f, t, v: -v),
        (),
    ),
    FaultType(
        "emg_loss",
        "exo",
        "knee-exo",
        ("sensor->controller",),
        (),
        "Both EMG envelopes read 0 (electrodes off).",
        _emg_loss,
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
    _params: tuple[Param, ...] = (_PROB,)
    if _switch == "exception_code":
        _params = (_p("code", "1", 4.0, 1.0, 11.0, "the Modbus exception code"), _PROB)
    elif _switch == "delay_s":
        _params = (_p("delay_s", "s", 0.5, 0.0, 60.0, "added before each answer"), _PROB)
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

#: Every fault type by name.
CATALOGUE: dict[str, FaultType] = {f.name: f for f in _ENTRIES}

#: The published patterns each catalogue entry implements (pattern → entry).
PUBLISHED_PATTERNS: dict[str, str] = {pattern: f.name for f in _ENTRIES for pattern in f.covers}


def attach(loop: Any, faults: list[ActiveFault]) -> None:
    """Add the transforms (or tick sources) of ``faults`` to ``loop``'s channels.

    A fault on ``controller`` (a therapy parameter) or a source fault (a false meal) becomes a
    source of ``meal->controller``, which the loop polls once per tick.

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
        if fault.name == "false_meal" or active.channel == "controller":
            loop.channels["meal->controller"].add_source(built)
            continue
        channel = loop.channels.get(active.channel)
        if channel is None:
            raise ValueError(
                f"fault {fault.name!r}: the loop has no channel {active.channel!r} "
                f"(it has: {', '.join(loop.channels)})"
            )
        channel.add_transform(built)
