"""Messages of the exoskeleton loop, stamped ``t_s`` (seconds of task time), units in the names.

Like the glucose loop's :mod:`twinloop.agents.messages` they travel on
:class:`~twinloop.agents.channels.Channel` edges and are recorded as columns named after their
fields. Angles: 0 = full extension, positive = flexion; torques positive in the flexion direction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from twinloop.agents.messages import Record


@dataclasses.dataclass(frozen=True, slots=True)
class ExoMessage(Record):
    """Base class: produced at task time ``t_s`` (seconds since the run started)."""

    t_s: float
    kind: ClassVar[str] = "exo_message"


@dataclasses.dataclass(frozen=True, slots=True)
class JointState(ExoMessage):
    """The knee's true state at the end of a control period (plant → sensor, recorder).

    Work terms are over the period just ended; activations and reflex excitations are the
    muscles' at its end (0–1); ``voluntary_effort`` is the patient's effort scale ε (slacking,
    :mod:`twinloop.plant.knee.model`).
    """

    angle_rad: float
    velocity_rad_s: float
    exo_torque_nm: float
    patient_torque_nm: float
    quad_activation: float
    ham_activation: float
    quad_reflex: float
    ham_reflex: float
    exo_work_j: float
    patient_work_j: float
    angle_min_rad: float
    angle_max_rad: float
    velocity_abs_max_rad_s: float
    voluntary_effort: float
    kind: ClassVar[str] = "joint_state"


@dataclasses.dataclass(frozen=True, slots=True)
class ExoSensorReading(ExoMessage):
    """What the exoskeleton's sensors report (sensor → controller, estimator, supervisor).

    Encoder angle (quantised, noisy) and its velocity by difference; joint torque sensor
    (exo torque + bias + noise); EMG envelopes of the quadriceps and hamstrings (delayed,
    noisy, fraction of maximum).
    """

    angle_rad: float
    velocity_rad_s: float
    torque_sensor_nm: float
    emg_quad: float
    emg_ham: float
    kind: ClassVar[str] = "exo_sensor"


@dataclasses.dataclass(frozen=True, slots=True)
class TaskReference(ExoMessage):
    """The rehabilitation task's reference at ``t_s`` (task → controller, estimator)."""

    reference_rad: float
    reference_velocity_rad_s: float
    kind: ClassVar[str] = "task_reference"


@dataclasses.dataclass(frozen=True, slots=True)
class ExoTorqueCommand(ExoMessage):
    """A torque command (controller → supervisor → drive), N·m."""

    torque_nm: float
    kind: ClassVar[str] = "exo_torque_command"


@dataclasses.dataclass(frozen=True, slots=True)
class ExoOverride(ExoMessage):
    """The exoskeleton supervisor changed a command: the rule, what was asked and what goes on."""

    rule: str
    requested_nm: float
    approved_nm: float
    kind: ClassVar[str] = "exo_override"


@dataclasses.dataclass(frozen=True, slots=True)
class KneeTwinEstimate(ExoMessage):
    """The knee twin's online estimate (estimator → controller, recorder).

    ``patient_torque_nm``: the patient's net muscle torque identified by inverse dynamics;
    ``voluntary_capacity``: the residual voluntary strength, fraction of a healthy knee's
    (0–1); ``spasticity_gain_per_rad_s``: the stretch-reflex gain (excitation per rad/s of
    stretch velocity above threshold); ``residual_rms_nm``: RMS of the model's recent
    prediction error; ``voluntary_effort``: the effort scale ε (0–1) the patient currently
    puts into the intent (1 = full effort; below 1 = "slacking" under assistance, not
    weakness). Last so that positional construction of the older fields stays valid.

    ``voluntary_capacity_low`` / ``voluntary_capacity_high``: the smallest and largest
    residual strengths the data does not reject (the estimator's
    :attr:`~twinloop.agents.knee.estimator.KneeTwinEstimator.consistent_capacity_range`; NaN
    before any evidence). The strength is *identified* only when the data rejected a full
    strength (``high < 1``: the patient's intent saturated); with ``high == 1`` the capacity
    reported is "no weakness seen", only bounded below by ``low`` (see
    :func:`capacity_identified`).
    """

    patient_torque_nm: float
    voluntary_capacity: float
    spasticity_gain_per_rad_s: float
    residual_rms_nm: float
    voluntary_effort: float
    voluntary_capacity_low: float = math.nan
    voluntary_capacity_high: float = math.nan
    kind: ClassVar[str] = "knee_twin_estimate"


def capacity_identified(high: float) -> bool:
    """Whether a voluntary capacity is identified, from the upper end of its consistent range.

    Strength is observable only where the patient's intent exceeds it (the torque saturates):
    then the data rejects the full-strength hypothesis and the upper end is below 1. An upper
    end of 1, or NaN (no evidence yet), means the capacity reported is the prior or "no
    weakness seen", not a measurement of the strength.
    """
    return bool(high < 1.0)
