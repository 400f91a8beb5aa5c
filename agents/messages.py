"""Timestamped messages exchanged by the agents of the loop, with units in their field names.

Every message is a frozen dataclass whose first field is ``t_min``: the loop time (minutes since
the run started) at which it was produced. Channels carry them; recorders store them as columns
named after the fields, so the units travel with the data. The exoskeleton's messages
(:mod:`twinloop.agents.knee.messages`) share the :class:`Record` root and are stamped ``t_s`` in
seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """Root of everything a channel carries: a frozen dataclass with a ``kind``.

    The glucose loop's messages (:class:`Message`) are stamped in minutes; the exoskeleton
    loop's (:mod:`twinloop.agents.knee.messages`) in seconds.
    """

    #: Name of the message kind in recordings.
    kind: ClassVar[str] = "record"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as the class and the field values, in order.

        Several times faster than the state dataclasses give a slotted class (a dict built
        through :func:`dataclasses.fields` per message), for messages crossing to Ray actors.
        Every field of a record is a positional ``__init__`` field (``__match_args__``).
        """
        names: tuple[str, ...] = self.__match_args__
        return type(self), tuple([getattr(self, name) for name in names])


@dataclasses.dataclass(frozen=True, slots=True)
class Message(Record):
    """Base class: a message produced at loop time ``t_min`` (minutes)."""

    t_min: float

    kind: ClassVar[str] = "message"


@dataclasses.dataclass(frozen=True, slots=True)
class PlantGlucose(Message):
    """The patient's true glucose (plant → sensor): plasma and subcutaneous, mg/dL."""

    bg_mg_dl: float
    gsub_mg_dl: float
    kind: ClassVar[str] = "plant_glucose"


@dataclasses.dataclass(frozen=True, slots=True)
class CgmReading(Message):
    """One CGM reading (sensor → estimator, controller, supervisor), mg/dL."""

    glucose_mg_dl: float
    kind: ClassVar[str] = "cgm"


@dataclasses.dataclass(frozen=True, slots=True)
class MealAnnouncement(Message):
    """Carbohydrates the patient announces (user → controller, estimator), grams."""

    carbs_g: float
    kind: ClassVar[str] = "meal_announcement"


@dataclasses.dataclass(frozen=True, slots=True)
class InsulinCommand(Message):
    """A pump command (controller → supervisor → actuator).

    ``basal_u_per_h`` is a temporary basal rate held for ``duration_min`` minutes (pumps cap it
    at 30 min); after that the pump falls back to the scheduled basal unless a new command
    arrives. ``bolus_u`` is delivered at once.
    """

    basal_u_per_h: float
    bolus_u: float
    duration_min: float
    kind: ClassVar[str] = "insulin_command"


@dataclasses.dataclass(frozen=True, slots=True)
class InsulinDelivery(Message):
    """Insulin the pump actually delivered over ``[t_min, t_min + 1)`` (actuator → plant), U."""

    basal_u: float
    bolus_u: float
    kind: ClassVar[str] = "insulin_delivery"

    @property
    def total_u(self) -> float:
        """Basal plus bolus units delivered in the minute."""
        return self.basal_u + self.bolus_u


@dataclasses.dataclass(frozen=True, slots=True)
class TwinEstimate(Message):
    """The twin estimator's view of the patient (estimator → controller, supervisor).

    ``egp_scale`` is the twin's scale of endogenous glucose production and
    ``unannounced_carbs_g`` the carbohydrates on board it detected beyond those announced
    (both with defaults: older recordings and other producers have neither).
    """

    bg_mg_dl: float
    iob_u: float
    cob_g: float
    insulin_sensitivity_scale: float
    forecast_30_mg_dl: float
    forecast_60_mg_dl: float
    egp_scale: float = 1.0
    unannounced_carbs_g: float = 0.0
    kind: ClassVar[str] = "twin_estimate"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSwap(Message):
    """The loop's model was replaced by a twin re-fitted from the loop's own recording.

    The twin estimator (and a controller that plans on a model) run on the new model from
    ``t_min``. The fit started at ``fit_started_min`` on the CGM, the reported insulin and the
    announced meals of ``[window_start_min, fit_started_min)``; ``cgm_readings`` were scored,
    with a residual RMSE of ``fit_rmse_mg_dl``, in ``fit_seconds`` of wall time.
    ``correction_drop_mg_dl_per_u`` is the new model's glucose drop after a 1-U correction
    (:func:`twinloop.plant.glucose.models.correction_drop_mg_dl`).
    """

    fit_started_min: float
    window_start_min: float
    cgm_readings: int
    fit_rmse_mg_dl: float
    fit_seconds: float
    correction_drop_mg_dl_per_u: float
    kind: ClassVar[str] = "model_swap"


@dataclasses.dataclass(frozen=True, slots=True)
class Override(Message):
    """The supervisor changed a command: what was asked, what goes to the pump, and why."""

    reason: str
    requested_basal_u_per_h: float
    requested_bolus_u: float
    delivered_basal_u_per_h: float
    delivered_bolus_u: float
    kind: ClassVar[str] = "override"


@dataclasses.dataclass(frozen=True, slots=True)
class TickTiming(Message):
    """Wall-clock timing of one control tick in wall-clock mode (clock → recorder).

    ``lateness_ms`` is how late the tick started against its schedule (start of the run +
    ``t_min`` × the time scale); ``duration_ms`` is how long the tick's work took.
    """

    lateness_ms: float
    duration_ms: float
    overrun: bool = False  # the tick's work took longer than its period
    kind: ClassVar[str] = "tick_timing"


@dataclasses.dataclass(frozen=True, slots=True)
class AgentFault(Message):
    """An agent failed to answer at a tick (it raised, its actor died or is restarting).

    The loop substituted ``fallback`` (e.g. "scheduled basal") for what it would have returned.
    """

    agent: str
    error: str
    fallback: str
    kind: ClassVar[str] = "agent_fault"


@dataclasses.dataclass(frozen=True, slots=True)
class Alarm(Message):
    """A rig alarm raised (``active``) or cleared, and what the rig did about it.

    ``source`` is the device (``cgm``, ``pump``); ``condition`` what was detected (``stale
    data``, ``communication lost``, ``device alarm 1``); ``action`` what the rig did (e.g. the
    safe state it applied); ``wall_s`` the rig's wall-clock time since its start, seconds.
    """

    source: str
    condition: str
    active: bool
    action: str
    wall_s: float
    kind: ClassVar[str] = "alarm"
