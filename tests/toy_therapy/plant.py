"""The toy plant: a tank level following a valve, first order, with seeded process noise."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from twinloop.plant.errors import UnknownPatientError
from twinloop.plant.interface import EnvRegistration


@dataclasses.dataclass(frozen=True)
class Tank:
    """A tank preset.

    Attributes:
        name: the preset (a "patient").
        tau_s: the level's time constant, s.
        noise_pct_per_sqrt_s: process noise intensity, % per √s.
        level0_pct: the level at t = 0, %.

    """

    name: str
    tau_s: float
    noise_pct_per_sqrt_s: float = 0.3
    level0_pct: float = 20.0


PRESETS = {"slow": Tank("slow", 20.0), "fast": Tank("fast", 5.0)}


class TankModel:
    """``d level / dt = (valve - level) / tau_s`` plus noise, explicit Euler steps."""

    def __init__(self, tank: Tank, rng: np.random.Generator) -> None:
        self.tank = tank
        self.rng = rng
        self.level_pct = tank.level0_pct

    def step(self, valve_pct: float, dt_s: float) -> float:
        """Advance ``dt_s`` seconds with the valve at ``valve_pct``; return the new level, %."""
        drift = (valve_pct - self.level_pct) / self.tank.tau_s
        noise = self.tank.noise_pct_per_sqrt_s * np.sqrt(dt_s) * float(self.rng.normal())
        self.level_pct = self.level_pct + dt_s * drift + noise
        return self.level_pct


class ToyPlant:
    """The toy plant part."""

    time_unit = "s"
    envs: tuple[EnvRegistration, ...] = ()
    default_patients = ("slow",)
    patients_help = "a tank preset: slow|fast"
    cohorts: tuple[str, ...] = ()

    def patient_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """The presets named, checked, without repeats."""
        for name in names:
            if name not in PRESETS:
                raise UnknownPatientError("patient", name, PRESETS)
        return tuple(dict.fromkeys(names))


PART = ToyPlant()
