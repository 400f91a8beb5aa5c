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
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.patients import (
    PatientParameters,
    cohort,
    initial_states,
    parameter_matrix,
)
from twinloop.plant.glucose.twin_model import TwinModel, read_twin
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    N_MEAL_STATE,
    P_VG,
    advance,
)

__all__ = [
    "CLINICAL_SETTINGS",
    "DEFAULT_MODEL",
    "FIT_LOG_DAYS",
    "FIT_LOG_SEED",
    "MODEL_HELP",
    "ModelChoice",
    "clinical_settings",
    "loop_model",
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
#: Minutes over which a correction bolus's glucose drop is measured (its action's duration).
CORRECTION_WINDOW_MIN = 360
#: Sensitivity scales tried when calibrating to the correction factor (log-spaced).
_CALIBRATION_SCALES = np.exp(np.linspace(math.log(0.2), math.log(5.0), 49))
#: What a clinic knows of a person (their chart and pump settings), beside the scheduled basal:
#: every model of them keeps these (the population model, a re-fit's prior).
CLINICAL_SETTINGS = (
    "body_weight_kg",
    "age_years",
    "carb_ratio_g_per_u",
    "correction_factor_mg_dl_per_u",
    "total_daily_insulin_u",
)
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


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def correction_drop_mg_dl(models: Sequence[PatientParameters]) -> NDArray[np.float64]:
    """Each model's largest plasma-glucose drop after 1 U on top of its basal steady state.

    The model's own correction factor: the drop over :data:`CORRECTION_WINDOW_MIN` minutes,
    no meal, the scheduled basal going on (mg/dL per U).
    """
    m, k = len(models), CORRECTION_WINDOW_MIN
    params = parameter_matrix(list(models))
    basal = np.array([p.basal_u_per_h / 60.0 for p in models])
    insulin = np.repeat(basal[:, None], k, axis=1)
    insulin[:, 0] += 1.0
    gp = np.empty((m, k + 1))
    eat = np.full(m, DEFAULT_EAT_RATE_G_PER_MIN)
    advance(
        initial_states(list(models)), np.zeros((m, N_MEAL_STATE)), params, insulin,
        np.zeros((m, k)), eat, carbs_out=np.empty((m, k)), gp_out=gp, gs_out=np.empty_like(gp),
        parallel=False, check=False,
    )  # fmt: skip
    g = gp / params[:, P_VG : P_VG + 1]
    drop: NDArray[np.float64] = g[:, 0] - g.min(axis=1)
    return drop


@lru_cache(maxsize=8)
def drop_per_correction_factor(group: str) -> float:
    """The group's median of (a patient's 1-U drop ÷ their correction factor).

    How the group's clinical correction factors relate to its patients' modelled response
    (≈ 1.1 for adults, 1.3 for adolescents, 1.8 for children: the table's children's CFs are
    conservative). A population-level constant, like the group's mean parameters.
    """
    patients = cohort(group)
    ratios = correction_drop_mg_dl(patients) / np.array(
        [p.correction_factor_mg_dl_per_u for p in patients]
    )
    return float(np.median(ratios))


def clinical_settings(patient: PatientParameters) -> dict[str, float]:
    """``patient``'s :data:`CLINICAL_SETTINGS`, as base values of a :class:`TwinModel`."""
    return {k: float(getattr(patient, k)) for k in CLINICAL_SETTINGS}


def _structure(patient: PatientParameters, group: str) -> TwinModel:
    return TwinModel.for_group(
        patient.name,
        group,
        patient.basal_u_per_h,
        profile_blocks=0,
        **clinical_settings(patient),
    )


def _calibrated(
    structure: TwinModel, z: NDArray[np.float64], target_mg_dl: float
) -> PatientParameters:
    """``z`` with ``Vmx`` and ``kp3`` scaled together so that 1 U drops glucose by the target."""
    names = list(structure.names)
    j_vmx = names.index("vmx_mg_per_kg_min_per_pmol_l")
    j_kp3 = names.index("kp3_mg_per_kg_min_per_pmol_l")
    candidates: list[PatientParameters] = []
    for scale in _CALIBRATION_SCALES:
        zc = z.copy()
        zc[j_vmx] += math.log(scale) / structure.prior_sd[j_vmx]
        zc[j_kp3] += math.log(scale) / structure.prior_sd[j_kp3]
        try:
            candidates.append(structure.patient(structure.clip(zc)))
        except ConfigError:
            continue
    drops = correction_drop_mg_dl(candidates)
    return candidates[int(np.argmin(np.abs(np.log(drops / target_mg_dl))))]


def population_model(
    patient: PatientParameters,
    *,
    sample: bool = False,
    calibrate: bool = True,
    group: str | None = None,
) -> PatientParameters:
    """The group's mean model (or a sampled member) at ``patient``'s clinical settings.

    Keeps the patient's name; its basal, carb ratio, correction factor, total daily insulin and
    body weight are the patient's. With ``calibrate`` (default) the model's insulin sensitivity
    (``Vmx`` and ``kp3`` together) is scaled so that a 1-U correction drops its glucose by the
    person's correction factor × the group's :func:`drop_per_correction_factor` — the
    information about sensitivity that the person's settings carry. ``group`` is the age group
    (default: the patient's cohort, from its name), for a person whose name does not tell it.
    """
    cohort = patient.cohort if group is None else group
    structure = _structure(patient, cohort)
    p = len(structure.names)
    z = np.zeros(p)
    if sample:
        rng = np.random.default_rng(_seed(patient.name))
        for _ in range(_SAMPLE_TRIES):
            z = structure.clip(np.clip(rng.standard_normal(p), -2.0, 2.0))
            z[list(structure.names).index("body_weight_kg")] = 0.0  # the weight is known
            try:
                structure.patient(z)
                break
            except ConfigError:
                continue
        else:
            raise ConfigError("model", "population:sample", "a prior draw with a steady state")
    if not calibrate:
        return structure.patient(z)
    target = patient.correction_factor_mg_dl_per_u * drop_per_correction_factor(cohort)
    return _calibrated(structure, z, target)


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
