"""The device agents of the loop: the CGM sensor and the insulin-pump actuator.

Both wrap the device models of :mod:`plant` (no device logic is repeated here): the sensor
turns the plant's true subcutaneous glucose into noisy, clipped readings at its sample period;
the actuator holds the supervisor's temp basal for its duration, falls back to the scheduled
basal when it expires (as real pumps do), delivers boluses, and quantizes everything with
:mod:`twinloop.plant.glucose.pump`.
"""

from __future__ import annotations

import numpy as np

from twinloop.agents.messages import CgmReading, InsulinCommand, InsulinDelivery, PlantGlucose
from twinloop.plant.glucose.cgm import CGMSensor, CGMSpec
from twinloop.plant.glucose.pump import PumpSpec, quantize_basal, quantize_bolus
from twinloop.plant.units import MIN_PER_H


class SensorAgent:
    """CGM over the plant. Input: :class:`PlantGlucose` every minute. Output: CgmReading.

    Rate: the CGM's sample period (``spec.sample_period_min``); :meth:`read` returns ``None``
    between samples.
    """

    def __init__(self, spec: CGMSpec, rng: np.random.Generator) -> None:
        self.spec = spec
        self._cgm = CGMSensor(spec, rng)

    def read(self, truth: PlantGlucose) -> CgmReading | None:
        """A reading when one is due at ``truth.t_min``, else ``None``."""
        value = self._cgm.read(truth.t_min, truth.gsub_mg_dl)
        return None if value is None else CgmReading(truth.t_min, value)

    def read_many(self, truths: list[PlantGlucose]) -> list[CgmReading]:
        """The readings due over a control period's minutes (one call per tick)."""
        out = []
        for truth in truths:
            reading = self.read(truth)
            if reading is not None:
                out.append(reading)
        return out


class PumpActuator:
    """Insulin pump. Input: InsulinCommand (from the supervisor). Output: InsulinDelivery/min.

    A temp basal runs until ``t_min + duration_min`` and then the scheduled basal resumes; a
    bolus is delivered within the next minute (as the UVA/Padova simulator does). Rates and
    doses are rounded down to the pump's increments and capped at its maxima.
    """

    def __init__(self, pump: PumpSpec, scheduled_basal_u_per_h: float) -> None:
        self.pump = pump
        self.scheduled_basal_u_per_h = float(quantize_basal(pump, float(scheduled_basal_u_per_h)))
        self._temp_u_per_h: float | None = None
        self._temp_until_min = -np.inf
        self._pending_bolus_u = 0.0

    def apply(self, command: InsulinCommand) -> None:
        """Start the command's temp basal and queue its bolus."""
        basal = float(quantize_basal(self.pump, float(command.basal_u_per_h)))
        bolus = float(quantize_bolus(self.pump, float(command.bolus_u)))
        self._temp_u_per_h = basal
        self._temp_until_min = command.t_min + command.duration_min
        self._pending_bolus_u += bolus

    def current_basal_u_per_h(self, t_min: float) -> float:
        """The basal rate running at ``t_min`` (temp or scheduled)."""
        if self._temp_u_per_h is not None and t_min < self._temp_until_min:
            return self._temp_u_per_h
        return self.scheduled_basal_u_per_h

    def deliver(self, t_min: float) -> InsulinDelivery:
        """Insulin delivered over ``[t_min, t_min + 1)``."""
        bolus, self._pending_bolus_u = self._pending_bolus_u, 0.0
        return InsulinDelivery(t_min, self.current_basal_u_per_h(t_min) / MIN_PER_H, bolus)

    def actuate(
        self, command: InsulinCommand | None, t0_min: float, minutes: int
    ) -> list[InsulinDelivery]:
        """Apply ``command`` (if any) and deliver the next ``minutes`` minutes (one call/tick)."""
        if command is not None:
            self.apply(command)
        return [self.deliver(t0_min + k) for k in range(minutes)]
