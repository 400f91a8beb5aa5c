"""Patient names resolved to parameters: shipped patients, cohorts and population files.

A name is one of the 30 shipped patients (``adult#001``), a cohort (``adolescents``,
``adults``, ``children``, ``all``), a population file ``population:PATH`` (every member of a
file written by ``twinloop population sample``), or the name of a member of a population file
*given in the same call*. Nothing is registered in the process: a Ray worker, or any other
process, resolves the same names to the same patients as long as it is handed the same
population tokens. Reading a population file is cached by (absolute path, modification time).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache

from twinloop.plant.errors import UnknownPatientError
from twinloop.plant.glucose.patients import (
    COHORTS,
    PatientParameters,
    cohort,
    patient_names,
    shipped_patients,
)
from twinloop.plant.glucose.population import read_population

__all__ = [
    "POPULATION_PREFIX",
    "expand_names",
    "find_patient",
    "load_population",
    "population_token",
    "population_tokens",
]

#: Prefix of a population file among patient and cohort names: ``population:PATH``.
POPULATION_PREFIX = "population:"


def population_token(path: str) -> str:
    """``population:ABSOLUTE_PATH`` (workers started elsewhere resolve it the same way)."""
    return POPULATION_PREFIX + os.path.abspath(path)


def population_tokens(names: Iterable[object]) -> tuple[str, ...]:
    """The ``population:PATH`` tokens among ``names``, in order."""
    return tuple(n for n in names if isinstance(n, str) and n.startswith(POPULATION_PREFIX))


@cache
def _read(path: str, mtime_ns: int) -> tuple[PatientParameters, ...]:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    return tuple(read_population(path))


def load_population(token: str) -> tuple[PatientParameters, ...]:
    """The members of ``population:PATH``.

    Raises:
        UnknownPatientError: the file does not exist or cannot be read.
        ConfigError: the file is not a twinloop population.

    """
    path = os.path.abspath(token[len(POPULATION_PREFIX) :])
    try:
        mtime_ns = os.stat(path).st_mtime_ns
        return _read(path, mtime_ns)
    except OSError as exc:
        raise UnknownPatientError("population", token, ["an existing population file"]) from exc


def _members(tokens: Iterable[str]) -> dict[str, PatientParameters]:
    """Name → parameters of the members of the population files (first one wins)."""
    members: dict[str, PatientParameters] = {}
    for token in tokens:
        for p in load_population(token):
            members.setdefault(p.name, p)
    return members


def find_patient(name: str, populations: Iterable[str] = ()) -> PatientParameters:
    """One patient's parameters: a shipped one, or a member of one of ``populations``.

    Args:
        name: a patient name.
        populations: ``population:PATH`` tokens the patient may come from (other names in the
            sequence are ignored, so a run's whole list of names may be passed).

    Raises:
        UnknownPatientError: ``name`` is neither a shipped patient nor a member of those files.

    """
    table = shipped_patients()
    if name in table:
        return table[name]
    member = _members(population_tokens(populations)).get(name)
    if member is not None:
        return member
    raise UnknownPatientError("patient", name, patient_names())


def expand_names(names: Iterable[str], *, field: str = "patients") -> tuple[PatientParameters, ...]:
    """Patient and cohort names mixed, expanded in the order given, without repeats.

    ``population:PATH`` stands for every member of a population file
    (``twinloop population sample``); its members may then be named one by one in the same
    call (before or after the token).

    Raises:
        UnknownPatientError: a name is neither a patient nor a cohort (lists both kinds).

    """
    names = tuple(names)
    table = shipped_patients()
    members = _members(population_tokens(names))
    chosen: dict[str, PatientParameters] = {}
    for name in names:
        group: tuple[PatientParameters, ...]
        if name in COHORTS:
            group = cohort(name)
        elif name in table:
            group = (table[name],)
        elif name.startswith(POPULATION_PREFIX):
            group = load_population(name)
        elif name in members:
            group = (members[name],)
        else:
            raise UnknownPatientError(field, name, (*COHORTS, "population:PATH", *table))
        for p in group:
            chosen.setdefault(p.name, p)
    return tuple(chosen.values())
