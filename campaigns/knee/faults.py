"""The knee exoskeleton's own fault types: encoder, torque sensor, EMG and torque command.

The generic faults (:mod:`twinloop.campaigns.faults`) apply to this loop too; windows are in
seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twinloop.campaigns.faults import ActiveFault, FaultType, message_time, param, value_fault

__all__ = ["KNEE_FAULTS"]


def _glitch(fault: ActiveFault, t: float, value: float) -> float:
    if fault.rng.random() < fault.params["probability"]:
        return value + fault.params["magnitude"] * (1.0 if fault.rng.random() < 0.5 else -1.0)
    return value


def _emg_loss(fault: ActiveFault) -> Callable[[Any], Any]:
    def transform(message: Any) -> Any:
        if not fault.active(message_time(message)) or not hasattr(message, "emg_quad"):
            return message
        fault.hits += 1
        return dataclasses.replace(message, emg_quad=0.0, emg_ham=0.0)

    return transform


#: The exoskeleton loop's own fault types (the catalogue adds the generic ones).
KNEE_FAULTS: tuple[FaultType, ...] = (
    FaultType(
        "encoder_glitch",
        "exo",
        "knee-exo",
        ("sensor->controller",),
        (
            param("magnitude", "rad", 0.3, 0.0, 6.3, "size of each glitch"),
            param("probability", "1", 0.05, 0.0, 1.0, "chance of a glitch per reading"),
        ),
        "The knee angle jumps by ±`magnitude` on random readings.",
        value_fault(_glitch),
        (),
        "angle_rad",
    ),
    FaultType(
        "torque_sensor_bias",
        "exo",
        "knee-exo",
        ("sensor->controller",),
        (param("offset_nm", "N·m", 5.0, -100.0, 100.0, "added to the torque sensor"),),
        "The joint torque sensor reads `offset_nm` off.",
        value_fault(lambda f, t, v: v + f.params["offset_nm"]),
        (),
        "torque_sensor_nm",
    ),
    FaultType(
        "torque_saturation",
        "exo",
        "knee-exo",
        ("supervisor->actuator",),
        (param("limit_nm", "N·m", 5.0, 0.0, 100.0, "the actuator's saturated torque"),),
        "The actuator saturates at ±`limit_nm` (a weak motor or a current limit).",
        value_fault(lambda f, t, v: max(-f.params["limit_nm"], min(f.params["limit_nm"], v))),
        (),
    ),
    FaultType(
        "sign_flip",
        "exo",
        "knee-exo",
        ("supervisor->actuator", "sensor->controller"),
        (),
        "The torque command (or the chosen field) changes sign: a swapped motor phase.",
        value_fault(lambda f, t, v: -v),
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
)
