"""The glucose therapy (type 1 diabetes, closed-loop insulin): its declaration and plant part."""

from __future__ import annotations

from collections.abc import Sequence

from twinloop.plant.interface import EnvRegistration
from twinloop.therapy import Therapy

THERAPY = Therapy(
    name="glucose",
    title="type 1 diabetes: closed-loop insulin on the UVA/Padova 2008 patients",
    package="glucose",
    aliases=("insulin",),
)


class GlucosePlant:
    """The UVA/Padova 2008 virtual patients, their cohorts and ``twinloop/T1D-v0``."""

    time_unit = "min"
    envs = (
        EnvRegistration(
            "twinloop/T1D-v0",
            "twinloop.plant.glucose.env:T1DEnv",
            "twinloop.plant.glucose.env_vector:T1DVectorEnv",
        ),
    )
    default_patients = ("adults",)
    cohorts = ("adolescents", "adults", "children", "all")
    patients_help = (
        "a patient (adult#001), a cohort (adolescents|adults|children|all) or "
        "population:PATH (a file written by twinloop population sample)"
    )

    def patient_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """Patient, cohort and population names expanded into patients, without repeats."""
        from twinloop.plant.glucose.cohorts import expand_names

        return tuple(p.name for p in expand_names(names))


PART = GlucosePlant()
