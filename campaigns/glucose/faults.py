"""The glucose therapy's own fault types: the CGM, the insulin pump and the meal data.

* ``sensor`` — CGM-specific value faults on ``sensor->controller`` (spikes, the sensor's
  reporting limits, compression lows, calibration errors); the true glucose is not changed.
* ``actuator`` — the insulin that reaches the patient on ``actuator->plant``. The pump keeps
  reporting what it meant to deliver (the loop tells the twin and the supervisor the pump's own
  report), so every actuator fault here is **silent**, as an occlusion is before a pump's
  pressure alarm.
* ``data`` — the user's meal announcements on ``meal->controller`` and the controller's own
  therapy parameters (carb ratio, correction factor: the ``controller`` target), changed for
  the window and restored.

The generic faults (:mod:`twinloop.campaigns.faults`) apply to this loop too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from twinloop.agents.messages import InsulinDelivery, MealAnnouncement
from twinloop.campaigns.faults import (
    PROBABILITY,
    SENSOR_CHANNELS,
    ActiveFault,
    FaultType,
    drop_messages,
    param,
    value_fault,
)

__all__ = ["CGM_MAX_MG_DL", "CGM_MIN_MG_DL", "GLUCOSE_FAULTS"]

#: The CGM's reporting range, mg/dL (readings are clipped to it by real sensors).
CGM_MIN_MG_DL = 40.0
CGM_MAX_MG_DL = 400.0

_ACTUATOR = ("actuator->plant",)


def _compression(fault: ActiveFault, t: float, value: float) -> float:
    """Pressure-induced sensor attenuation: a dip of ``depth`` shaped as half a sine."""
    span = fault.end - fault.start
    shape = math.sin(math.pi * (t - fault.start) / span) if math.isfinite(span) else 1.0
    return max(value - fault.params["depth_mg_dl"] * shape, 0.0)


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


def _fixed_rate(name: str) -> Callable[[ActiveFault, InsulinDelivery], InsulinDelivery]:
    def change(fault: ActiveFault, d: InsulinDelivery) -> InsulinDelivery:
        return dataclasses.replace(d, basal_u=fault.params[name] / 60.0)

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


# -- the glucose fault types ------------------------------------------------------------
#: The glucose loop's own fault types (the catalogue adds the generic ones).
GLUCOSE_FAULTS: tuple[FaultType, ...] = (
    FaultType(
        "spike_positive",
        "sensor",
        "glucose",
        SENSOR_CHANNELS,
        (
            param("magnitude_mg_dl", "mg/dL", 100.0, 0.0, 500.0, "added to each reading"),
            PROBABILITY,
        ),
        "Readings jump up by `magnitude_mg_dl` (a short window is a spike).",
        value_fault(
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
        SENSOR_CHANNELS,
        (
            param("magnitude_mg_dl", "mg/dL", 100.0, 0.0, 500.0, "subtracted from each reading"),
            PROBABILITY,
        ),
        "Readings drop by `magnitude_mg_dl` (not below 0).",
        value_fault(
            lambda f, t, v: (
                max(v - f.params["magnitude_mg_dl"], 0.0)
                if f.rng.random() < f.params["probability"]
                else v
            )
        ),
        ("mgipsim:negative_spike",),
    ),
    FaultType(
        "clamp_max",
        "sensor",
        "glucose",
        SENSOR_CHANNELS,
        (param("value_mg_dl", "mg/dL", CGM_MAX_MG_DL, 0.0, 1000.0, "the reported value"),),
        "Every reading reports the sensor's maximum.",
        value_fault(lambda f, t, v: f.params["value_mg_dl"]),
        ("mgipsim:max_reading",),
    ),
    FaultType(
        "clamp_min",
        "sensor",
        "glucose",
        SENSOR_CHANNELS,
        (param("value_mg_dl", "mg/dL", CGM_MIN_MG_DL, 0.0, 1000.0, "the reported value"),),
        "Every reading reports the sensor's minimum.",
        value_fault(lambda f, t, v: f.params["value_mg_dl"]),
        ("mgipsim:min_reading",),
    ),
    FaultType(
        "compression_low",
        "sensor",
        "glucose",
        SENSOR_CHANNELS,
        (param("depth_mg_dl", "mg/dL", 60.0, 0.0, 400.0, "the dip's depth at mid-window"),),
        "Pressure-induced sensor attenuation (lying on the sensor at night): a half-sine dip "
        "of `depth_mg_dl` over the window (Baysal et al. 2014).",
        value_fault(_compression),
        (),
    ),
    FaultType(
        "calibration_error",
        "sensor",
        "glucose",
        SENSOR_CHANNELS,
        (
            param("gain", "1", 1.2, 0.1, 5.0, "slope error"),
            param("offset_mg_dl", "mg/dL", -10.0, -200.0, 200.0, "intercept error"),
        ),
        "A wrong calibration: value × `gain` + `offset_mg_dl`.",
        value_fault(lambda f, t, v: v * f.params["gain"] + f.params["offset_mg_dl"]),
        (),
    ),
    FaultType(
        "occlusion",
        "actuator",
        "glucose",
        _ACTUATOR,
        (
            param(
                "severity", "1", 1.0, 0.0, 1.0, "fraction of the insulin that does not get through"
            ),
        ),
        "A blocked infusion set: `severity` of each delivery never reaches the patient; the pump "
        "reports normal delivery.",
        _delivery_fault(_occluded),
        (),
    ),
    FaultType(
        "under_delivery",
        "actuator",
        "glucose",
        _ACTUATOR,
        (param("factor", "1", 0.5, 0.0, 1.0, "fraction delivered"),),
        "Each delivery scaled down by `factor` (mechanical wear); reported as normal.",
        _delivery_fault(_scaled),
        (),
    ),
    FaultType(
        "over_delivery",
        "actuator",
        "glucose",
        _ACTUATOR,
        (param("factor", "1", 1.5, 1.0, 10.0, "delivered multiple"),),
        "Each delivery scaled up by `factor`; reported as normal.",
        _delivery_fault(_scaled),
        (),
    ),
    FaultType(
        "stuck_rate",
        "actuator",
        "glucose",
        _ACTUATOR,
        (),
        "The basal rate at onset is delivered whatever is commanded; boluses are not given.",
        _stuck_rate,
        (),
    ),
    FaultType(
        "stopped_delivery",
        "actuator",
        "glucose",
        _ACTUATOR,
        (),
        "Delivery stops entirely while the pump reports normal delivery.",
        _delivery_fault(_stopped),
        ("mgipsim:unknown_stop",),
    ),
    FaultType(
        "false_bolus",
        "actuator",
        "glucose",
        _ACTUATOR,
        (param("units", "U", 3.0, 0.0, 25.0, "the unrequested bolus"),),
        "An unrequested bolus of `units` at onset (once).",
        _false_bolus,
        ("mgipsim:false_bolus",),
    ),
    FaultType(
        "duplicated_bolus",
        "actuator",
        "glucose",
        _ACTUATOR,
        (),
        "Every bolus in the window is delivered twice.",
        _delivery_fault(_duplicated_bolus),
        (),
    ),
    FaultType(
        "basal_bias",
        "actuator",
        "glucose",
        _ACTUATOR,
        (param("offset_u_per_h", "U/h", 0.5, -35.0, 35.0, "added to the basal rate delivered"),),
        "The basal rate that reaches the patient is off by `offset_u_per_h` (not below 0); the "
        "pump reports normal delivery.",
        _delivery_fault(_basal_offset),
        ("mgipsim:positive_basal", "mgipsim:negative_basal", "mgipsim:unknown_under"),
    ),
    FaultType(
        "max_basal",
        "actuator",
        "glucose",
        _ACTUATOR,
        (param("rate_u_per_h", "U/h", 5.0, 0.0, 35.0, "the basal rate delivered"),),
        "The pump runs its maximum basal rate whatever is commanded.",
        _delivery_fault(_fixed_rate("rate_u_per_h")),
        ("mgipsim:max_basal", "uva:max"),
    ),
    FaultType(
        "min_basal",
        "actuator",
        "glucose",
        _ACTUATOR,
        (param("rate_u_per_h", "U/h", 0.0, 0.0, 35.0, "the basal rate delivered"),),
        "The pump runs its minimum basal rate (0 U/h by default) whatever is commanded.",
        _delivery_fault(_fixed_rate("rate_u_per_h")),
        ("mgipsim:min_basal", "uva:min"),
    ),
    FaultType(
        "false_meal",
        "data",
        "glucose",
        ("meal->controller",),
        (param("carbs_g", "g", 60.0, 1.0, 300.0, "the announced carbohydrates"),),
        "A meal announced at onset that is never eaten.",
        _false_meal,
        ("mgipsim:false_meal",),
        source="meal->controller",
    ),
    FaultType(
        "missed_meal_announcement",
        "data",
        "glucose",
        ("meal->controller",),
        (PROBABILITY,),
        "Meals in the window are eaten but not announced.",
        drop_messages,
        (),
    ),
    FaultType(
        "wrong_carb_count",
        "data",
        "glucose",
        ("meal->controller",),
        (param("factor", "1", 1.5, 0.1, 10.0, "true carbs ÷ announced carbs"),),
        "Announced carbohydrates divided by `factor` (an under-count when > 1).",
        value_fault(_carbs_scaled),
        (),
        "carbs_g",
    ),
    FaultType(
        "wrong_carb_ratio",
        "data",
        "glucose",
        ("controller",),
        (param("factor", "1", 0.7, 0.1, 10.0, "multiplies the controller's carb ratio (g/U)"),),
        "The bolus calculator's carb ratio is wrong by `factor` for the window (< 1: too much "
        "insulin per gram).",
        _controller_param("carb_ratio_g_per_u"),
        (),
        source="meal->controller",
    ),
    FaultType(
        "wrong_correction_factor",
        "data",
        "glucose",
        ("controller",),
        (param("factor", "1", 0.5, 0.1, 10.0, "multiplies the controller's correction factor"),),
        "The correction factor (mg/dL per U) is wrong by `factor` (< 1: over-correction).",
        _controller_param("correction_factor_mg_dl_per_u"),
        (),
        source="meal->controller",
    ),
)
