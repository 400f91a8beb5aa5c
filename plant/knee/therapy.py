"""The knee-exo therapy (a knee in a rehabilitation exoskeleton): declaration and plant part."""

from __future__ import annotations

from collections.abc import Sequence

from twinloop.plant.errors import UnknownPatientError
from twinloop.plant.interface import EnvRegistration
from twinloop.therapy import Therapy

THERAPY = Therapy(
    name="knee-exo",
    title="rehabilitation: an impaired knee in a powered exoskeleton",
    package="knee",
    aliases=("knee_exo",),
)


class KneePlant:
    """The knee presets (healthy … severe) and ``twinloop/KneeExo-v0``."""

    time_unit = "s"
    envs = (
        EnvRegistration(
            "twinloop/KneeExo-v0",
            "twinloop.plant.knee.env:KneeExoEnv",
            "twinloop.plant.knee.env_vector:KneeExoVectorEnv",
        ),
    )
    default_patients = ("moderate",)
    cohorts = ()
    patients_help = "a knee preset: healthy|mild|moderate|severe"

    def patient_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """The presets named, checked, without repeats."""
        from twinloop.plant.knee.model import PRESETS

        for name in names:
            if name not in PRESETS:
                raise UnknownPatientError("patient", name, PRESETS)
        return tuple(dict.fromkeys(names))


PART = KneePlant()
