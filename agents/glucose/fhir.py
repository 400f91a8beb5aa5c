"""FHIR export of a glucose run: CGM readings and insulin deliveries as a FHIR Bundle.

:func:`export_run` turns a run directory written by ``twinloop run`` (``manifest.json``,
``channels/*.parquet``; see :mod:`twinloop.agents.recording`) into a FHIR ``Bundle`` of type
``collection`` as a JSON-ready ``dict``, so a twin's output can enter a clinical data platform;
:func:`write_bundle` writes it as JSON (CLI: ``twinloop export fhir RUN_DIR --out FILE``).

What every therapy's export shares (FHIR R4 resources validated as R4B, times from
``start``, the ``Patient`` resources and references, the ``HTEST`` label, deterministic ids)
is in :mod:`twinloop.agents.fhir`. The glucose mapping:

CGM readings (``channels/sensor__controller.parquet``: ``patient``, ``t_min``,
``glucose_mg_dl``) → one ``Observation`` each
    ``status`` ``final``; ``category`` ``laboratory``
    (``http://terminology.hl7.org/CodeSystem/observation-category``), because in R4 the
    ``vital-signs`` category obliges the resource to conform to the vital-signs profile,
    whose codes do not include glucose, and glucose is conventionally a laboratory-category
    result (as in US Core); ``code`` LOINC ``2339-0`` "Glucose [Mass/volume] in Blood"
    (``http://loinc.org``, as issue 8 asks; LOINC ``99504-3`` is the interstitial-fluid code
    that CGM-specific guides use); ``valueQuantity`` the reading as recorded, unit ``mg/dL``,
    UCUM (``http://unitsofmeasure.org``) code ``mg/dL``; ``effectiveDateTime`` the reading's
    time; ``device`` a display-only reference naming the simulated CGM. A reading that is not
    finite (a dropped or faulted sample recorded as NaN) has no value to report and is skipped;
    :attr:`FhirExport.skipped_readings` counts them.

Insulin that reached the patient (``channels/actuator__plant.parquet``: ``patient``,
``t_min``, ``basal_u``, ``bolus_u``, one row per minute ``[t_min, t_min + 1)``) →
``MedicationAdministration``
    ``status`` ``completed``; ``medicationCodeableConcept`` insulin: SNOMED CT ``67866001``
    "Insulin" (``http://snomed.info/sct``) and RxNorm ``5856`` "insulin"
    (``http://www.nlm.nih.gov/research/umls/rxnorm``); ``dosage.route`` SNOMED CT
    ``34206005`` "Subcutaneous route"; ``dosage.dose`` in units: ``unit`` ``U``, UCUM code
    ``[iU]`` (the international unit); ``device`` a display-only reference naming the
    simulated pump; ``dosage.text`` says ``basal`` or ``bolus``.

    * **Basal** is merged: consecutive rows of one patient (each ``t_min`` exactly one minute
      after the previous one) with the *same* per-minute amount ``basal_u`` form one segment
      and one resource, with ``effectivePeriod`` from the first minute's start to the last
      minute's end, ``dosage.dose`` the segment's total (the sum of its minutes, rounded to
      1e-10 U), and ``dosage.rateQuantity`` the rate ``60 * basal_u`` in ``U/h`` (UCUM
      ``[iU]/h``). A change of rate or a gap in the recording starts a new segment; a bolus
      does not. Segments at rate 0 (pump suspended) deliver nothing and are not exported;
      :attr:`FhirExport.suspended_basal_min` counts their minutes.
    * **Each bolus** (each row with ``bolus_u > 0``; the pump delivers a bolus within one
      minute) is its own resource with ``effectiveDateTime`` the minute's start and
      ``dosage.dose`` the bolus.

    The total insulin of all ``MedicationAdministration`` resources of a patient is the sum of
    ``basal_u + bolus_u`` of the recording.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from twinloop.agents.fhir import (
    META,
    OBSERVATION_CATEGORY,
    SNOMED,
    FhirExport,
    FhirExportError,
    Ids,
    bundle_export,
    check_start,
    entry,
    iso,
    patient_order,
    patient_references,
    patient_rows,
    quantity,
    read_manifest,
    read_table,
    subject,
    write_export,
)

__all__ = [
    "build_export",
    "export_run",
    "export_tables",
    "write_bundle",
]

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

GLUCOSE_LOINC = "2339-0"
GLUCOSE_DISPLAY = "Glucose [Mass/volume] in Blood"
INSULIN_SNOMED = "67866001"
INSULIN_RXNORM = "5856"
SUBCUTANEOUS_SNOMED = "34206005"

SENSOR_TABLE = "sensor__controller.parquet"
ACTUATOR_TABLE = "actuator__plant.parquet"
_DOSE_DECIMALS = 10
#: What a glucose export reads, for the error when a table is missing.
_NEEDS = "a glucose-loop recording from twinloop run"

_CATEGORY = [
    {"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}
]
_GLUCOSE_CODE = {
    "coding": [{"system": LOINC, "code": GLUCOSE_LOINC, "display": GLUCOSE_DISPLAY}],
    "text": "Glucose (continuous glucose monitor)",
}
_INSULIN = {
    "coding": [
        {"system": SNOMED, "code": INSULIN_SNOMED, "display": "Insulin"},
        {"system": RXNORM, "code": INSULIN_RXNORM, "display": "insulin"},
    ],
    "text": "insulin",
}
_ROUTE = {
    "coding": [{"system": SNOMED, "code": SUBCUTANEOUS_SNOMED, "display": "Subcutaneous route"}]
}
_CGM_DEVICE = {"display": "simulated continuous glucose monitor (twinloop virtual CGM)"}
_PUMP_DEVICE = {"display": "simulated insulin pump (twinloop virtual pump)"}


def _basal_segments(t: NDArray[np.float64], basal: NDArray[np.float64]) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of consecutive minutes at the same per-minute basal amount."""
    segments = []
    i = 0
    while i < len(t):
        j = i + 1
        while j < len(t) and t[j] == t[j - 1] + 1.0 and basal[j] == basal[i]:
            j += 1
        segments.append((i, j))
        i = j
    return segments


def build_export(
    run_dir: str | Path,
    *,
    start: datetime | None = None,
    patient_reference: str | Mapping[str, str] | None = None,
    allow_incomplete: bool = False,
) -> FhirExport:
    """Export a run's CGM readings and insulin deliveries (the module docstring has the mapping).

    Args:
        run_dir: a run directory written by ``twinloop run``.
        start: wall-clock time of the run's minute 0; timezone-aware (default: the
            manifest's ``started_unix_s``, else :data:`DEFAULT_START`).
        patient_reference: references of existing Patients to use instead of exporting
            ``Patient`` resources: a mapping from virtual patient name to reference (e.g.
            ``{"adult#001": "Patient/123"}``), or one reference for a one-patient run.
        allow_incomplete: export an interrupted run instead of refusing it.

    Returns:
        The bundle and what went into it.

    Raises:
        FhirExportError: no such run, an incomplete run, a missing table or column, bad
            insulin amounts, a naive ``start``, or an unknown patient in
            ``patient_reference`` (the message names it).

    """
    run_dir = Path(run_dir)
    _, run_key, start = read_manifest(run_dir, allow_incomplete=allow_incomplete, start=start)
    sensor = read_table(run_dir, SENSOR_TABLE, ["patient", "t_min", "glucose_mg_dl"], needs=_NEEDS)
    actuator = read_table(
        run_dir, ACTUATOR_TABLE, ["patient", "t_min", "basal_u", "bolus_u"], needs=_NEEDS
    )
    return export_tables(
        sensor,
        actuator,
        start=start,
        key=run_key,
        patient_reference=patient_reference,
        source=str(run_dir / "channels" / ACTUATOR_TABLE),
    )


def export_tables(
    sensor: Mapping[str, NDArray[Any]],
    actuator: Mapping[str, NDArray[Any]],
    *,
    start: datetime,
    key: str,
    patient_reference: str | Mapping[str, str] | None = None,
    source: str = "actuator",
) -> FhirExport:
    """Export glucose readings and insulin deliveries given as columns (not a run directory).

    Used by ``twinloop twin replay --fhir`` for a twin's predicted days.

    Args:
        sensor: ``patient``, ``t_min``, ``glucose_mg_dl`` (one row per reading).
        actuator: ``patient``, ``t_min``, ``basal_u`` (units delivered over the minute),
            ``bolus_u`` (one row per minute).
        start: wall-clock time of ``t_min = 0``, timezone-aware.
        key: what the resources' deterministic ids derive from (same key, same ids).
        patient_reference: as :func:`build_export`.
        source: names the actuator table in errors.

    """
    check_start(start)
    for column in ("basal_u", "bolus_u"):
        amounts = actuator[column]
        if not np.all(np.isfinite(amounts) & (amounts >= 0.0)):
            raise FhirExportError(f"{source}: {column} has values that are negative or not finite")
    patients = patient_order(sensor, actuator)
    references = patient_references(patients, patient_reference)
    ids = Ids(key)

    def at(t_min: float) -> str:
        return iso(start + timedelta(minutes=float(t_min)))

    entries: list[dict[str, Any]] = []
    skipped = 0
    suspended = 0
    for name in patients:
        who = subject(name, references, entries)
        rows = patient_rows(sensor, name)
        for t, g in zip(sensor["t_min"][rows], sensor["glucose_mg_dl"][rows], strict=True):
            if not math.isfinite(g):
                skipped += 1
                continue
            observation = {
                "resourceType": "Observation",
                "id": ids(name, "cgm", float(t)),
                "meta": META,
                "status": "final",
                "category": _CATEGORY,
                "code": _GLUCOSE_CODE,
                "subject": who,
                "effectiveDateTime": at(t),
                "valueQuantity": quantity(float(g), "mg/dL", "mg/dL"),
                "device": _CGM_DEVICE,
            }
            entries.append(entry(observation))

        rows = patient_rows(actuator, name)
        t_all = actuator["t_min"][rows]
        basal = actuator["basal_u"][rows]
        bolus = actuator["bolus_u"][rows]
        administrations: list[tuple[float, int, dict[str, Any]]] = []
        for i, j in _basal_segments(t_all, basal):
            if basal[i] == 0.0:
                suspended += j - i
                continue
            rate = round(float(basal[i]) * 60.0, _DOSE_DECIMALS)
            dose = round(math.fsum(basal[i:j]), _DOSE_DECIMALS)
            administrations.append(
                (
                    float(t_all[i]),
                    0,
                    {
                        "resourceType": "MedicationAdministration",
                        "id": ids(name, "basal", float(t_all[i])),
                        "meta": META,
                        "status": "completed",
                        "medicationCodeableConcept": _INSULIN,
                        "subject": who,
                        "effectivePeriod": {"start": at(t_all[i]), "end": at(t_all[j - 1] + 1)},
                        "device": [_PUMP_DEVICE],
                        "dosage": {
                            "text": f"basal {rate:g} U/h for {j - i} min",
                            "route": _ROUTE,
                            "dose": quantity(dose, "U", "[iU]"),
                            "rateQuantity": quantity(rate, "U/h", "[iU]/h"),
                        },
                    },
                )
            )
        for t, amount in zip(t_all, bolus, strict=True):
            if amount <= 0.0:
                continue
            dose = round(float(amount), _DOSE_DECIMALS)
            administrations.append(
                (
                    float(t),
                    1,
                    {
                        "resourceType": "MedicationAdministration",
                        "id": ids(name, "bolus", float(t)),
                        "meta": META,
                        "status": "completed",
                        "medicationCodeableConcept": _INSULIN,
                        "subject": who,
                        "effectiveDateTime": at(t),
                        "device": [_PUMP_DEVICE],
                        "dosage": {
                            "text": f"bolus {dose:g} U",
                            "route": _ROUTE,
                            "dose": quantity(dose, "U", "[iU]"),
                        },
                    },
                )
            )
        administrations.sort(key=lambda a: (a[0], a[1]))
        entries.extend(entry(resource) for _, _, resource in administrations)

    return bundle_export(
        entries,
        key=key,
        start=start,
        patients=patients,
        kinds=("Patient", "Observation", "MedicationAdministration"),
        skipped_readings=skipped,
        suspended_basal_min=suspended,
    )


def export_run(
    run_dir: str | Path,
    *,
    start: datetime | None = None,
    patient_reference: str | Mapping[str, str] | None = None,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """The run as a FHIR ``Bundle`` (type ``collection``), a JSON-ready dict.

    Arguments and errors as :func:`build_export`; the mapping is in the module docstring.
    """
    return build_export(
        run_dir,
        start=start,
        patient_reference=patient_reference,
        allow_incomplete=allow_incomplete,
    ).bundle


def write_bundle(
    run_dir: str | Path,
    out_path: str | Path,
    *,
    start: datetime | None = None,
    patient_reference: str | Mapping[str, str] | None = None,
    allow_incomplete: bool = False,
) -> FhirExport:
    """Export the run (see :func:`build_export`) and write the bundle as JSON to ``out_path``.

    The parent directory is created if needed. Returns what was exported.
    """
    export = build_export(
        run_dir,
        start=start,
        patient_reference=patient_reference,
        allow_incomplete=allow_incomplete,
    )
    return write_export(export, out_path)
