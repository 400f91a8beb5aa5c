"""What a therapy's plant part declares (``twinloop.plant.<package>.therapy.PART``).

See :mod:`twinloop.therapy` for the registry and the other layers' parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class EnvRegistration:
    """A Gymnasium environment of the therapy, registered at import of :mod:`twinloop.plant`.

    Attributes:
        id: the versioned id (``twinloop/T1D-v0``).
        entry_point: ``module:Class`` of the single environment.
        vector_entry_point: ``module:Class`` of its native vector environment, if any.

    """

    id: str
    entry_point: str
    vector_entry_point: str | None = None


class PlantPart(Protocol):
    """The plant side of a therapy: its environments, patients and time unit."""

    #: The loop's time unit in recordings, fault windows and reports: ``"min"`` or ``"s"``.
    time_unit: str
    #: Its Gymnasium environments.
    envs: tuple[EnvRegistration, ...]
    #: The patients a command runs when none are named.
    default_patients: tuple[str, ...]
    #: One line saying what a patient name may be (for ``--help`` and errors).
    patients_help: str
    #: Names that stand for groups of patients (``--cohort``); empty when it has none.
    cohorts: tuple[str, ...]

    def patient_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """``names`` (patients, cohorts or presets) expanded and checked, without repeats.

        Raises:
            twinloop.plant.errors.UnknownPatientError: a name the therapy does not know
                (the message lists what is allowed).

        """
        ...
