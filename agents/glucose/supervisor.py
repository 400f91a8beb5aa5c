"""The safety supervisor: hard limits on every insulin command, whatever produced it.

The supervisor sits on the controller → actuator channel and no controller can bypass it. At
each control tick it reviews the controller's command (or its absence) and sends the pump a
command that respects every limit below; each change it makes is an :class:`Override` with its
reason, so a recording shows when and why the controller was overruled.

Limits (first version, after the OpenAPS reference design's safety rules):

1. *Invalid commands* (NaN, ±inf, negative) are replaced by the scheduled basal, no bolus.
2. *Maximum temp basal* = min(``max_basal_u_per_h``, 3 × highest scheduled basal,
   4 × current scheduled basal).
3. *Maximum bolus* = ``max_bolus_u``, and no bolus beyond the insulin-on-board limit.
4. *Maximum insulin on board*: net IOB (IOB of the insulin delivered, minus that of the
   scheduled basal in steady state; exponential curve of :mod:`twinloop.plant.glucose.insulin`) plus
   the bolus plus the temp basal's extra insulin over its duration stays ≤ ``max_iob_u``.
5. *Low-glucose suspend*: delivery is suspended (0 U/h, no bolus) while the last CGM reading or
   the twin's 30-min forecast is below ``suspend_below_mg_dl`` (70 by default).
6. *Stale CGM watchdog*: no reading for ``stale_after_min`` (15) ⇒ the scheduled basal or a
   suspension (``stale_action``), no bolus.
7. *Temp duration* ≤ 30 min (``max_temp_duration_min``), as on real pumps.
8. *Missing command* (controller crashed, overran, or its actor is restarting): the safe
   command — the scheduled basal (or suspension when glucose is low or stale).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.messages import (
    CgmReading,
    InsulinCommand,
    InsulinDelivery,
    Override,
    TwinEstimate,
)
from twinloop.plant.glucose.insulin import DEFAULT_DIA_MIN, DEFAULT_PEAK_MIN, IobTracker
from twinloop.plant.glucose.patients import PatientParameters
from twinloop.plant.units import MIN_PER_H

StaleAction = Literal["scheduled_basal", "suspend"]


@dataclasses.dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """Limits of the supervisor (validated once).

    Attributes:
        scheduled_basal_u_per_h: the patient's programmed basal rate.
        max_basal_u_per_h: absolute cap on any temp basal.
        max_bolus_u: cap on one bolus.
        max_iob_u: cap on net insulin on board (see the module docstring).
        suspend_below_mg_dl: suspend while CGM or its 30-min forecast is below this.
        stale_after_min: a CGM reading older than this is stale.
        stale_action: what to deliver on stale CGM: ``"scheduled_basal"`` or ``"suspend"``.
        max_temp_duration_min: longest temp basal (pumps: 30 min).
        iob_peak_min: peak of the insulin activity curve used for IOB.
        iob_dia_min: duration of insulin action of that curve.

    """

    scheduled_basal_u_per_h: float
    max_basal_u_per_h: float = 5.0
    max_bolus_u: float = 15.0
    max_iob_u: float = 10.0
    suspend_below_mg_dl: float = 70.0
    stale_after_min: float = 15.0
    stale_action: StaleAction = "scheduled_basal"
    max_temp_duration_min: float = 30.0
    iob_peak_min: float = DEFAULT_PEAK_MIN
    iob_dia_min: float = DEFAULT_DIA_MIN

    def __post_init__(self) -> None:
        for name in (
            "scheduled_basal_u_per_h",
            "max_basal_u_per_h",
            "max_bolus_u",
            "max_iob_u",
            "suspend_below_mg_dl",
            "stale_after_min",
            "max_temp_duration_min",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise LoopConfigError(name, value, "a finite number >= 0")
        if not 0 < self.max_temp_duration_min <= 30:
            raise LoopConfigError(
                "max_temp_duration_min", self.max_temp_duration_min, "0 < minutes <= 30"
            )
        if self.stale_action not in ("scheduled_basal", "suspend"):
            raise LoopConfigError(
                "stale_action", self.stale_action, "'scheduled_basal' or 'suspend'"
            )

    @classmethod
    def for_patient(cls, patient: PatientParameters, **overrides: object) -> SupervisorConfig:
        """Limits derived from the patient's clinical profile.

        Scheduled basal = the patient's steady-state basal; maximum temp basal = 4 × basal
        (the 3×/4× rules then bind); maximum bolus = the bolus of a 100 g meal
        (100 / CR); maximum net IOB = 3 × basal (U/h) + the bolus of an 80 g meal, the
        OpenAPS rule of thumb for ``max_iob``.
        """
        basal = patient.basal_u_per_h
        cr = patient.carb_ratio_g_per_u
        defaults = {
            "scheduled_basal_u_per_h": basal,
            "max_basal_u_per_h": 4.0 * basal,
            "max_bolus_u": 100.0 / cr,
            "max_iob_u": 3.0 * basal + 80.0 / cr,
        }
        return cls(**{**defaults, **overrides})  # type: ignore[arg-type]

    @property
    def max_temp_basal_u_per_h(self) -> float:
        """min(configured max, 3 × highest scheduled basal, 4 × current scheduled basal)."""
        basal = self.scheduled_basal_u_per_h
        return min(self.max_basal_u_per_h, 3.0 * basal, 4.0 * basal)


def _finite_nonnegative(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0.0


class SafetySupervisor:
    """Reviews every command against :class:`SupervisorConfig` (see the module docstring).

    Inputs: CGM readings, twin estimates and the insulin actually delivered (``observe_*``),
    the controller's command at each tick (``review``). Output: the command for the pump and
    the overrides. Rate: the control period.
    """

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self._last_cgm: CgmReading | None = None
        self._last_estimate: TwinEstimate | None = None
        self._iob = IobTracker(
            config.scheduled_basal_u_per_h, peak_min=config.iob_peak_min, dia_min=config.iob_dia_min
        )

    def observe_cgm(self, reading: CgmReading) -> None:
        """Remember the newest CGM reading (for suspension and the watchdog)."""
        self._last_cgm = reading

    def observe_estimate(self, estimate: TwinEstimate) -> None:
        """Remember the twin's newest estimate (its 30-min forecast drives suspension)."""
        self._last_estimate = estimate

    def observe_delivery(self, delivery: InsulinDelivery) -> None:
        """Account one minute of delivered insulin (for insulin on board)."""
        self._iob.record(delivery.total_u)

    def tick(
        self,
        t_min: float,
        command: InsulinCommand | None,
        readings: list[CgmReading],
        deliveries: list[InsulinDelivery],
        estimate: TwinEstimate | None = None,
    ) -> tuple[InsulinCommand, list[Override]]:
        """Observe what happened since the last tick, then review ``command`` (one call/tick)."""
        for reading in readings:
            self.observe_cgm(reading)
        for delivery in deliveries:
            self.observe_delivery(delivery)
        if estimate is not None:
            self.observe_estimate(estimate)
        return self.review(t_min, command)

    @property
    def net_iob_u(self) -> float:
        """Insulin on board above the scheduled basal's steady state, U (may be negative)."""
        return self._iob.net_iob_u

    def review(
        self, t_min: float, command: InsulinCommand | None
    ) -> tuple[InsulinCommand, list[Override]]:
        """Return the command that goes to the pump, and the overrides that produced it."""
        cfg = self.config
        basal_sched = cfg.scheduled_basal_u_per_h
        overrides: list[Override] = []
        req_basal = command.basal_u_per_h if command is not None else math.nan
        req_bolus = command.bolus_u if command is not None else math.nan

        def override(reason: str, basal: float, bolus: float) -> None:
            overrides.append(Override(t_min, reason, req_basal, req_bolus, basal, bolus))

        duration = cfg.max_temp_duration_min
        if command is None:
            basal, bolus = basal_sched, 0.0
            override("no command: scheduled basal", basal, bolus)
        elif not (_finite_nonnegative(req_basal) and _finite_nonnegative(req_bolus)):
            basal, bolus = basal_sched, 0.0
            override("invalid command: scheduled basal", basal, bolus)
        else:
            basal, bolus = float(req_basal), float(req_bolus)
            d = command.duration_min
            duration = min(d, duration) if _finite_nonnegative(d) and d > 0 else duration

        if basal > cfg.max_temp_basal_u_per_h:
            basal = cfg.max_temp_basal_u_per_h
            override("max temp basal", basal, bolus)
        if bolus > cfg.max_bolus_u:
            bolus = cfg.max_bolus_u
            override("max bolus", basal, bolus)
        headroom = cfg.max_iob_u - self.net_iob_u
        extra_basal_u = max(basal - basal_sched, 0.0) * duration / MIN_PER_H
        if bolus + extra_basal_u > headroom and (bolus > 0.0 or extra_basal_u > 0.0):
            bolus = min(bolus, max(headroom, 0.0))
            if bolus + extra_basal_u > headroom:
                room = max(headroom - bolus, 0.0)
                basal = min(basal, basal_sched + room * MIN_PER_H / duration)
            override("max insulin on board", basal, bolus)

        cgm = self._last_cgm
        if cgm is None or t_min - cgm.t_min > cfg.stale_after_min:
            basal = 0.0 if cfg.stale_action == "suspend" else basal_sched
            bolus = 0.0
            override(f"stale CGM: {cfg.stale_action.replace('_', ' ')}", basal, bolus)
        else:
            low_now = cgm.glucose_mg_dl < cfg.suspend_below_mg_dl
            est = self._last_estimate
            low_soon = (
                est is not None
                and t_min - est.t_min <= cfg.stale_after_min
                and est.forecast_30_mg_dl < cfg.suspend_below_mg_dl
            )
            if (low_now or low_soon) and (basal > 0.0 or bolus > 0.0):
                basal, bolus = 0.0, 0.0
                why = "CGM" if low_now else "30-min forecast"
                override(f"low-glucose suspend ({why} < {cfg.suspend_below_mg_dl:g})", 0.0, 0.0)
        return InsulinCommand(t_min, basal, bolus, duration), overrides
