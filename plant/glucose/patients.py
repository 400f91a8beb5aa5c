"""The 30 UVA/Padova 2008 virtual patients: typed parameters, names, cohorts and batches.

The parameter table is the one distributed with simglucose (MIT licence, see
``plant/glucose/data/uva_padova_2008/LICENSE_simglucose_MIT.txt`` and the NOTICE file); the clinical
profile (carbohydrate ratio, correction factor, age, total daily insulin) comes from its
``Quest.csv``. Units follow Dalla Man et al. (2007), *IEEE TBME* 54(10):1740-1749 and the 2008
simulator: glucose masses in mg/kg, insulin masses in pmol/kg, volumes in dL/kg (glucose) or
L/kg (insulin), rate constants in 1/min.
"""

from __future__ import annotations

import csv
import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import UnknownPatientError

#: Picomoles of insulin in one international unit (1 U = 6 nmol).
PMOL_PER_U = 6000.0

#: Cohort names and the patient-name prefixes they select.
COHORTS: dict[str, tuple[str, ...]] = {
    "adolescents": ("adolescent#",),
    "adults": ("adult#",),
    "children": ("child#",),
    "all": ("adolescent#", "adult#", "child#"),
}

N_STATES = 13


@dataclasses.dataclass(frozen=True, slots=True)
class PatientParameters:
    """Parameters of one UVA/Padova 2008 virtual patient (units in each field's comment).

    State order of ``x0`` (the 13 compartments): ``q_sto1`` solid stomach glucose (mg),
    ``q_sto2`` liquid stomach glucose (mg), ``q_gut`` intestinal glucose (mg), ``g_p`` plasma
    glucose (mg/kg), ``g_t`` tissue glucose (mg/kg), ``i_p`` plasma insulin (pmol/kg), ``x``
    insulin action on utilisation (pmol/L), ``i_1`` and ``i_d`` delayed insulin signals for
    production (pmol/L), ``i_l`` liver insulin (pmol/kg), ``i_sc1`` and ``i_sc2`` subcutaneous
    insulin (pmol/kg), ``g_s`` subcutaneous glucose (mg/kg).
    """

    name: str  #: e.g. ``adult#001``
    x0: tuple[float, ...]  #: default initial state, 13 values in the order above
    body_weight_kg: float  #: BW
    egp_basal_mg_per_kg_min: float  #: EGPb
    glucose_basal_mg_dl: float  #: Gb
    insulin_basal_pmol_l: float  #: Ib
    kabs_per_min: float  #: intestinal absorption rate
    kmax_per_min: float  #: maximum gastric emptying rate
    kmin_per_min: float  #: minimum gastric emptying rate
    b: float  #: fraction of the dose at which gastric emptying falls to (kmax-kmin)/2 (-)
    d: float  #: fraction of the dose at which gastric emptying is back to (kmax-kmin)/2 (-)
    vg_dl_per_kg: float  #: Vg, glucose distribution volume
    vi_l_per_kg: float  #: Vi, insulin distribution volume
    vmx_mg_per_kg_min_per_pmol_l: float  #: Vmx, insulin-dependent utilisation slope
    km0_mg_per_kg: float  #: Km0, Michaelis-Menten constant of utilisation
    k1_per_min: float  #: plasma to tissue glucose rate
    k2_per_min: float  #: tissue to plasma glucose rate
    p2u_per_min: float  #: insulin action on utilisation rate
    m1_per_min: float  #: liver to plasma insulin rate
    m2_per_min: float  #: plasma to liver insulin rate
    m4_per_min: float  #: peripheral insulin degradation rate
    m30_per_min: float  #: hepatic insulin extraction rate
    ki_per_min: float  #: delay rate of the insulin signal on production
    kp1_mg_per_kg_min: float  #: EGP at zero glucose and insulin
    kp2_per_min: float  #: liver glucose effectiveness
    kp3_mg_per_kg_min_per_pmol_l: float  #: insulin action on the liver
    f: float  #: fraction of intestinal absorption that appears in plasma (-)
    ke1_per_min: float  #: renal glomerular filtration rate
    ke2_mg_per_kg: float  #: renal threshold of glucose
    fsnc_mg_per_kg_min: float  #: insulin-independent utilisation
    vm0_mg_per_kg_min: float  #: insulin-independent part of Vm
    kd_per_min: float  #: subcutaneous insulin degradation/transfer rate
    ksc_per_min: float  #: subcutaneous glucose equilibration rate
    ka1_per_min: float  #: absorption rate from i_sc1
    ka2_per_min: float  #: absorption rate from i_sc2
    u2ss_pmol_per_kg_min: float  #: steady-state (basal) insulin infusion
    carb_ratio_g_per_u: float  #: CR, grams of carbohydrate covered by one unit
    correction_factor_mg_dl_per_u: float  #: CF, glucose drop per unit
    age_years: float  #: age
    total_daily_insulin_u: float  #: TDI

    @property
    def basal_u_per_min(self) -> float:
        """Steady-state basal insulin rate in U/min (u2ss·BW / 6000)."""
        return self.u2ss_pmol_per_kg_min * self.body_weight_kg / PMOL_PER_U

    @property
    def basal_u_per_h(self) -> float:
        """Steady-state basal insulin rate in U/h."""
        return 60.0 * self.basal_u_per_min

    @property
    def initial_bg_mg_dl(self) -> float:
        """Plasma glucose of the default initial state (mg/dL)."""
        return self.x0[3] / self.vg_dl_per_kg

    @property
    def cohort(self) -> str:
        """The cohort this patient belongs to (``adolescents``, ``adults`` or ``children``)."""
        prefix = self.name.split("#", 1)[0]
        return {"adolescent": "adolescents", "adult": "adults", "child": "children"}[prefix]


#: CSV column → dataclass field, for the numeric parameters.
_COLUMNS: dict[str, str] = {
    "BW": "body_weight_kg",
    "EGPb": "egp_basal_mg_per_kg_min",
    "Gb": "glucose_basal_mg_dl",
    "Ib": "insulin_basal_pmol_l",
    "kabs": "kabs_per_min",
    "kmax": "kmax_per_min",
    "kmin": "kmin_per_min",
    "b": "b",
    "d": "d",
    "Vg": "vg_dl_per_kg",
    "Vi": "vi_l_per_kg",
    "Vmx": "vmx_mg_per_kg_min_per_pmol_l",
    "Km0": "km0_mg_per_kg",
    "k1": "k1_per_min",
    "k2": "k2_per_min",
    "p2u": "p2u_per_min",
    "m1": "m1_per_min",
    "m2": "m2_per_min",
    "m4": "m4_per_min",
    "m30": "m30_per_min",
    "ki": "ki_per_min",
    "kp1": "kp1_mg_per_kg_min",
    "kp2": "kp2_per_min",
    "kp3": "kp3_mg_per_kg_min_per_pmol_l",
    "f": "f",
    "ke1": "ke1_per_min",
    "ke2": "ke2_mg_per_kg",
    "Fsnc": "fsnc_mg_per_kg_min",
    "Vm0": "vm0_mg_per_kg_min",
    "kd": "kd_per_min",
    "ksc": "ksc_per_min",
    "ka1": "ka1_per_min",
    "ka2": "ka2_per_min",
    "u2ss": "u2ss_pmol_per_kg_min",
}
_X0_COLUMNS = [f"x0_{i:2d}" for i in range(1, 10)] + [f"x0_{i}" for i in range(10, 14)]


def _data_text(filename: str) -> str:
    return (
        resources.files("twinloop.plant.glucose")
        .joinpath("data", "uva_padova_2008", filename)
        .read_text()
    )


@cache
def _table() -> dict[str, PatientParameters]:
    quest = {row["Name"]: row for row in csv.DictReader(_data_text("Quest.csv").splitlines())}
    table: dict[str, PatientParameters] = {}
    for row in csv.DictReader(_data_text("vpatient_params.csv").splitlines()):
        name = row["Name"]
        q = quest[name]
        table[name] = PatientParameters(
            name=name,
            x0=tuple(float(row[c]) for c in _X0_COLUMNS),
            carb_ratio_g_per_u=float(q["CR"]),
            correction_factor_mg_dl_per_u=float(q["CF"]),
            age_years=float(q["Age"]),
            total_daily_insulin_u=float(q["TDI"]),
            **{field: float(row[col]) for col, field in _COLUMNS.items()},
        )
    return table


def patient_names() -> tuple[str, ...]:
    """All patient names in table order (``adolescent#001`` … ``child#010``)."""
    return tuple(_table())


def shipped_patients() -> Mapping[str, PatientParameters]:
    """The shipped patients by name, in table order (read-only)."""
    return MappingProxyType(_table())


def get_patient(name: str) -> PatientParameters:
    """Return one shipped patient's parameters.

    Members of population files are found by
    :func:`twinloop.plant.glucose.cohorts.find_patient`, given the files they come from.

    Raises:
        UnknownPatientError: ``name`` is not one of :func:`patient_names`.

    """
    try:
        return _table()[name]
    except KeyError:
        raise UnknownPatientError("patient", name, patient_names()) from None


def patient_key(name: str) -> int:
    """A stable integer per patient for seeding: the table index, or a hash of the name."""
    names = patient_names()
    if name in names:
        return names.index(name)
    return 1000 + zlib.crc32(name.encode())


def cohort(name: str) -> tuple[PatientParameters, ...]:
    """Return the patients of a cohort (``adolescents``, ``adults``, ``children``, ``all``).

    Raises:
        UnknownPatientError: ``name`` is not a cohort.

    """
    if name not in COHORTS:
        raise UnknownPatientError("cohort", name, COHORTS)
    prefixes = COHORTS[name]
    return tuple(p for p in _table().values() if p.name.startswith(prefixes))


def resolve_patients(
    patients: Iterable[str] = (), cohorts: Iterable[str] = ()
) -> tuple[PatientParameters, ...]:
    """Patients of the cohorts (in order), then those named one by one, without repeats."""
    chosen: dict[str, PatientParameters] = {}
    for group in cohorts:
        for p in cohort(group):
            chosen.setdefault(p.name, p)
    for name in patients:
        p = get_patient(name)
        chosen.setdefault(p.name, p)
    return tuple(chosen.values())


# --- batched numeric form used by the compiled model -------------------------------------------

#: Columns of the ``(N, N_PARAMS)`` array consumed by :mod:`twinloop.plant.glucose.uva_padova`.
PARAM_FIELDS: tuple[str, ...] = (
    "body_weight_kg",
    "kabs_per_min",
    "kmax_per_min",
    "kmin_per_min",
    "b",
    "d",
    "vg_dl_per_kg",
    "vi_l_per_kg",
    "vmx_mg_per_kg_min_per_pmol_l",
    "km0_mg_per_kg",
    "k1_per_min",
    "k2_per_min",
    "p2u_per_min",
    "m1_per_min",
    "m2_per_min",
    "m4_per_min",
    "m30_per_min",
    "ki_per_min",
    "kp1_mg_per_kg_min",
    "kp2_per_min",
    "kp3_mg_per_kg_min_per_pmol_l",
    "f",
    "ke1_per_min",
    "ke2_mg_per_kg",
    "fsnc_mg_per_kg_min",
    "vm0_mg_per_kg_min",
    "kd_per_min",
    "ksc_per_min",
    "ka1_per_min",
    "ka2_per_min",
    "insulin_basal_pmol_l",
)
N_PARAMS = len(PARAM_FIELDS)


def parameter_matrix(patients: Sequence[PatientParameters]) -> NDArray[np.float64]:
    """Stack patients into a C-contiguous ``(N, N_PARAMS)`` float64 array (see PARAM_FIELDS)."""
    out = np.empty((len(patients), N_PARAMS), dtype=np.float64)
    for i, p in enumerate(patients):
        out[i] = [getattr(p, f) for f in PARAM_FIELDS]
    return out


def initial_states(patients: Sequence[PatientParameters]) -> NDArray[np.float64]:
    """Default initial states, shape ``(N, 13)``."""
    return np.array([p.x0 for p in patients], dtype=np.float64).reshape(len(patients), N_STATES)
