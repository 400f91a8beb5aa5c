"""Where a closed loop's model of the patient comes from: oracle, population mean, or a twin.

The plant is always the real (virtual) patient. The twin estimator, the MPC and any controller
that plans on a model get *the loop's model* instead, chosen by a spec string:

==========================  =====================================================================
spec                        the model
==========================  =====================================================================
``population`` (default)    the age group's mean UVA/Padova model
                            (:func:`twinloop.plant.glucose.twin_model.group_base`) at the person's
                            own clinical settings — scheduled basal, carb ratio, correction
                            factor, total daily insulin and body weight, what a clinic knows —
                            with the basal steady state re-derived at that basal. A model any
                            person's loop can have on day one; the estimator adapts it online.
``population:sample``       a member of the group drawn from the twin prior
                            (:class:`twinloop.plant.glucose.twin_model.TwinModel`, ``z ~ N(0, I)``
                            within its limits), seeded by the patient's name: a model as wrong
                            as a random person of the group
``twin:PATH``               a fitted twin (``twinloop twin fit``): ``PATH`` is a ``twin.yaml``
                            (a run of one patient) or a directory holding ``<patient>.yaml`` per
                            patient (``twinloop twin individualize``)
``fit``                     fit each patient's twin from a log first, then ``twin:DIR``; resolved
                            above the loop (:mod:`twinloop.twins.individualize`, the CLI)
``oracle``                  the patient's own true parameters: an upper bound no real twin has,
                            kept for comparison and tests
==========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.patients import PatientParameters
from twinloop.plant.glucose.twin_model import TwinModel, read_twin

__all__ = [
    "DEFAULT_MODEL",
    "FIT_LOG_DAYS",
    "FIT_LOG_SEED",
    "MODEL_HELP",
    "ModelChoice",
    "loop_model",
    "loop_models",
    "parse_model",
    "population_model",
    "twin_path",
]

#: The model a loop plans on when the user does not choose one.
DEFAULT_MODEL = "population"
TWIN_PREFIX = "twin:"
#: What ``model`` may be (for error messages and ``--help``).
MODEL_HELP = "population (default), population:sample, twin:PATH, fit, or oracle"
#: Seed of the logs synthesized for ``fit`` (apart from the runs' seeds: a person's past).
FIT_LOG_SEED = 1_000_003
#: Days of each log synthesized for ``fit``.
FIT_LOG_DAYS = 7
#: Draws of the prior tried for ``population:sample`` before giving up.
_SAMPLE_TRIES = 100


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """A parsed model spec.

    Attributes:
        kind: ``oracle``, ``population``, ``twin`` or ``fit``.
        sample: (``population``) a sampled member instead of the mean.
        path: (``twin``) the twin file or directory.

    """

    kind: str
    sample: bool = False
    path: str | None = None

    @property
    def spec(self) -> str:
        """The spec string this choice was parsed from (normalised)."""
        if self.kind == "twin":
            return f"{TWIN_PREFIX}{self.path}"
        return "population:sample" if self.sample else self.kind


def parse_model(spec: object, *, field: str = "model") -> ModelChoice:
    """Parse a model spec (see the module).

    Raises:
        ConfigError: not a spec (names ``field``, the value and what is allowed).

    """
    if not isinstance(spec, str):
        raise ConfigError(field, spec, MODEL_HELP)
    if spec in ("oracle", "population", "fit"):
        return ModelChoice(spec)
    if spec == "population:sample":
        return ModelChoice("population", sample=True)
    if spec.startswith(TWIN_PREFIX) and spec[len(TWIN_PREFIX) :].strip():
        return ModelChoice("twin", path=spec[len(TWIN_PREFIX) :])
    raise ConfigError(field, spec, MODEL_HELP)


def _group(patient: PatientParameters) -> str:
    return patient.cohort


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def population_model(patient: PatientParameters, *, sample: bool = False) -> PatientParameters:
    """The group's mean model (or a sampled member) at ``patient``'s clinical settings.

    Keeps the patient's name; its basal, carb ratio, correction factor, total daily insulin and
    body weight are the patient's.
    """
    structure = TwinModel.for_group(
        patient.name,
        _group(patient),
        patient.basal_u_per_h,
        body_weight_kg=patient.body_weight_kg,
        carb_ratio_g_per_u=patient.carb_ratio_g_per_u,
        correction_factor_mg_dl_per_u=patient.correction_factor_mg_dl_per_u,
        total_daily_insulin_u=patient.total_daily_insulin_u,
    )
    p = len(structure.names)
    if not sample:
        return structure.patient(np.zeros(p))
    rng = np.random.default_rng(_seed(patient.name))
    for _ in range(_SAMPLE_TRIES):
        z = structure.clip(np.clip(rng.standard_normal(p), -2.0, 2.0))
        z[list(structure.names).index("body_weight_kg")] = 0.0  # the weight is known
        try:
            return structure.patient(z)
        except ConfigError:
            continue
    raise ConfigError("model", "population:sample", "a prior draw with a basal steady state")


def twin_path(path: str, patient: PatientParameters, n_patients: int) -> Path:
    """The twin file of ``patient`` under ``twin:PATH`` (a file, or a directory of twins).

    Raises:
        InvalidInputError: no such file, or one twin file for a run of several patients.

    """
    src = Path(path).expanduser()
    if src.is_dir():
        found = src / f"{patient.name}.yaml"
        if not found.is_file():
            raise InvalidInputError(
                f"model=twin:{path}: no twin of {patient.name} ({found.name} missing); fit "
                "one with `twinloop twin individualize` or `twinloop twin fit`"
            )
        return found
    if not src.is_file():
        raise InvalidInputError(
            f"model=twin:{path}: no such twin file or directory (write one with "
            "`twinloop twin fit`)"
        )
    if n_patients != 1:
        raise InvalidInputError(
            f"model=twin:{path}: one person's twin for a run of {n_patients} patients; give a "
            "directory of twins named <patient>.yaml (`twinloop twin individualize`)"
        )
    return src


def loop_model(
    choice: ModelChoice, patient: PatientParameters, *, n_patients: int = 1
) -> PatientParameters:
    """The model the loop of ``patient`` plans on.

    Raises:
        ConfigError: ``fit`` (it is resolved above the loop, into ``twin:DIR``).
        InvalidInputError: a twin that cannot be read (names the file).

    """
    if choice.kind == "oracle":
        return patient
    if choice.kind == "population":
        return population_model(patient, sample=choice.sample)
    if choice.kind == "twin":
        assert choice.path is not None
        fitted = read_twin(twin_path(choice.path, patient, n_patients)).patient
        return dataclasses.replace(fitted, name=patient.name)
    raise ConfigError(
        "model",
        "fit",
        "resolved before the loop starts: fit the twins with `twinloop twin individualize` "
        "(or twinloop.twins.individualize) and run with model=twin:DIR",
    )


def loop_models(
    choice: ModelChoice, patients: Sequence[PatientParameters]
) -> tuple[PatientParameters, ...]:
    """:func:`loop_model` of each patient."""
    return tuple(loop_model(choice, p, n_patients=len(patients)) for p in patients)
