"""FHIR export of a recorded run: CGM readings and insulin deliveries as a FHIR Bundle.

:func:`export_run` turns a run directory written by ``twinloop run`` (``manifest.json``,
``channels/*.parquet``; see :mod:`twinloop.agents.recording`) into a FHIR ``Bundle`` of type
``collection`` as a JSON-ready ``dict``, so a twin's output can enter a clinical data platform;
:func:`write_bundle` writes it as JSON (CLI: ``twinloop export fhir RUN_DIR --out FILE``).

FHIR version
    The resources are FHIR R4 (4.0.1) ``Patient``, ``Observation`` and
    ``MedicationAdministration`` using only elements whose names, types and cardinalities are
    the same in R4 and R4B (4.3.0). The tests validate every resource with the R4B models of
    ``fhir.resources`` 8.3 (``fhir.resources.R4B``): the releases of that library with true
    R4 models (6.1.0 and older) are built on pydantic 1, and its pydantic-2 releases (7.x, 8.x)
    ship R5 (the default), R4B and older versions, but not R4. R5 is *not* what this emits:
    its ``MedicationAdministration`` renamed ``effective[x]`` to ``occurence[x]``.

Times
    A run counts minutes from its start (``t_min``); FHIR needs absolute times. ``start`` (a
    timezone-aware :class:`~datetime.datetime`; a naive one is refused) is the wall-clock time
    of ``t_min = 0``. By default it is the manifest's ``started_unix_s`` (the moment the
    recording began, in UTC, truncated to the second), or :data:`DEFAULT_START`
    (2026-01-01T00:00:00Z) when the manifest has none. Times are ISO 8601 with their offset.

Patients
    One ``Patient`` per virtual patient in the recording, ``identifier`` =
    ``{system: urn:twinloop:virtual-patient, value: <name, e.g. adult#001>}``, and every other
    resource's ``subject`` references it by its ``urn:uuid:`` full URL. ``patient_reference``
    maps patient names to references of Patients that already exist on the target platform
    (e.g. ``Patient/123``); those patients get no ``Patient`` resource. Every resource carries
    the security label ``HTEST`` ("test health data", ``v3-ActReason``) in ``meta.security``,
    so a platform never mistakes a simulated patient's data for a real person's.

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

Identifiers
    Deterministic, so the same run exports the same bundle: each resource's ``id`` is a UUID 5
    (:data:`NAMESPACE`) of what it records (run, patient, kind, ``t_min``, and for repeated
    times the occurrence), and its entry's ``fullUrl`` is ``urn:uuid:<id>``. The run is
    identified by the SHA-256 of its ``manifest.json``; a ``Patient``'s id depends on the
    virtual patient's name only, so exports of several runs of one virtual patient share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from numpy.typing import NDArray

from twinloop.agents.recording import INCOMPLETE_MARKER
from twinloop.limits import MAX_LOG_BYTES, InputLimitError, check_file

__all__ = [
    "DEFAULT_START",
    "NAMESPACE",
    "PATIENT_SYSTEM",
    "FhirExport",
    "FhirExportError",
    "build_export",
    "export_run",
    "write_bundle",
]

#: ``start`` when neither the caller nor the manifest gives one.
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
#: Identifier system of the virtual patients' names.
PATIENT_SYSTEM = "urn:twinloop:virtual-patient"
#: Namespace of the resources' UUID 5 ids.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:twinloop:fhir-export")

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

GLUCOSE_LOINC = "2339-0"
GLUCOSE_DISPLAY = "Glucose [Mass/volume] in Blood"
INSULIN_SNOMED = "67866001"
INSULIN_RXNORM = "5856"
SUBCUTANEOUS_SNOMED = "34206005"

SENSOR_TABLE = "sensor__controller.parquet"
ACTUATOR_TABLE = "actuator__plant.parquet"
_DOSE_DECIMALS = 10

_META: dict[str, Any] = {
    "security": [{"system": ACT_REASON, "code": "HTEST", "display": "test health data"}]
}
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


class FhirExportError(ValueError):
    """A run that cannot be exported, or an export setting outside what is allowed."""


@dataclasses.dataclass(frozen=True)
class FhirExport:
    """An exported run.

    Attributes:
        bundle: the FHIR ``Bundle`` (type ``collection``) as a JSON-ready dict.
        start: the wall-clock time of ``t_min = 0``.
        patients: the virtual patients, in the order of the recording.
        counts: resources per ``resourceType``.
        skipped_readings: CGM readings not exported because they are not finite (NaN).
        suspended_basal_min: minutes of zero basal (not exported: nothing was delivered).

    """

    bundle: dict[str, Any]
    start: datetime
    patients: tuple[str, ...]
    counts: dict[str, int]
    skipped_readings: int
    suspended_basal_min: int

    def summary(self) -> str:
        """One line: resources per type, skipped readings."""
        per_type = ", ".join(f"{n} {kind}" for kind, n in self.counts.items())
        return (
            f"{len(self.bundle['entry'])} resources ({per_type}) for {len(self.patients)} "
            f"patient(s) from {_iso(self.start)}; {self.skipped_readings} NaN CGM reading(s) "
            "skipped"
        )


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _check_start(start: object) -> datetime:
    if not isinstance(start, datetime):
        raise FhirExportError(
            f"start must be a timezone-aware datetime, got {type(start).__name__} {start!r}"
        )
    offset = start.utcoffset()
    if offset is None:
        raise FhirExportError(
            f"start must be timezone-aware (got the naive datetime {start.isoformat()}); give "
            "it an offset, e.g. 2026-01-01T08:00:00+01:00"
        )
    if offset.total_seconds() % 60:
        raise FhirExportError(f"start's UTC offset {offset} is not a whole number of minutes")
    return start


def _read_manifest(run_dir: Path, *, allow_incomplete: bool) -> tuple[dict[str, Any], bytes]:
    if not run_dir.is_dir():
        raise FhirExportError(f"{run_dir}: no such run directory")
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise FhirExportError(f"{path}: missing (not a run directory written by twinloop run?)")
    try:
        check_file(path, MAX_LOG_BYTES)
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except InputLimitError as exc:
        raise FhirExportError(str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FhirExportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise FhirExportError(f"{path}: expected a JSON object")
    why = []
    if manifest.get("complete") is not True:
        why.append(f"manifest.json says complete={manifest.get('complete')!r}")
    if (run_dir / INCOMPLETE_MARKER).exists():
        why.append(f"the {INCOMPLETE_MARKER} marker is present")
    if why and not allow_incomplete:
        raise FhirExportError(
            f"{run_dir}: the run is incomplete ({'; '.join(why)}); export it anyway with "
            "allow_incomplete=True (CLI: --allow-incomplete)"
        )
    return manifest, raw


def _default_start(manifest: Mapping[str, Any]) -> datetime:
    started = manifest.get("started_unix_s")
    if (
        isinstance(started, int | float)
        and not isinstance(started, bool)
        and math.isfinite(started)
    ):
        return datetime.fromtimestamp(math.floor(started), tz=UTC)
    return DEFAULT_START


def _read_table(run_dir: Path, name: str, columns: list[str]) -> dict[str, NDArray[Any]]:
    path = run_dir / "channels" / name
    if not path.is_file():
        raise FhirExportError(
            f"{path}: missing (exports need a glucose-loop recording from twinloop run)"
        )
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise FhirExportError(f"{path}: no column(s) {', '.join(missing)}")
        table = pq.read_table(path, columns=columns)
        out: dict[str, NDArray[Any]] = {"patient": np.array(table.column("patient").to_pylist())}
        for c in columns[1:]:
            out[c] = np.asarray(table.column(c).to_numpy(), dtype=np.float64)
    except FhirExportError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise FhirExportError(f"{path}: not a readable recording table ({exc})") from None
    if not np.all(np.isfinite(out["t_min"])):
        raise FhirExportError(f"{path}: t_min has values that are not finite")
    return out


def _patient_order(*tables: Mapping[str, NDArray[Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for table in tables:
        for name in table["patient"]:
            seen.setdefault(str(name), None)
    return list(seen)


def _rows(table: Mapping[str, NDArray[Any]], patient: str) -> NDArray[np.intp]:
    """Indices of ``patient``'s rows, by time (stable: ties keep the recorded order)."""
    idx = np.flatnonzero(table["patient"] == patient)
    return idx[np.argsort(table["t_min"][idx], kind="stable")]


class _Ids:
    """Deterministic UUID 5 ids; a repeated key gets an occurrence number."""

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key
        self._seen: dict[str, int] = {}

    def __call__(self, *parts: object) -> str:
        key = "|".join(str(p) for p in parts)
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        full = f"{self.run_key}|{key}" + (f"|#{n}" if n else "")
        return str(uuid.uuid5(NAMESPACE, full))


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _patient(name: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": str(uuid.uuid5(NAMESPACE, f"patient|{name}")),
        "meta": _META,
        "identifier": [{"system": PATIENT_SYSTEM, "value": name}],
        "name": [{"use": "anonymous", "text": f"virtual patient {name}"}],
    }


def _references(
    patients: list[str], patient_reference: str | Mapping[str, str] | None
) -> dict[str, str]:
    if patient_reference is None:
        return {}
    if isinstance(patient_reference, str):
        if len(patients) != 1:
            raise FhirExportError(
                f"patient_reference: one reference for a run of {len(patients)} patients; "
                "give a mapping from patient name to reference"
            )
        patient_reference = {patients[0]: patient_reference}
    unknown = sorted(set(patient_reference) - set(patients))
    if unknown:
        raise FhirExportError(
            f"patient_reference: no patient {', '.join(unknown)} in the run "
            f"(it has {', '.join(patients)})"
        )
    for name, ref in patient_reference.items():
        if not isinstance(ref, str) or not ref.strip():
            raise FhirExportError(f"patient_reference: {name}: {ref!r} is not a reference")
    return dict(patient_reference)


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
    if start is not None:
        _check_start(start)
    manifest, raw_manifest = _read_manifest(run_dir, allow_incomplete=allow_incomplete)
    start = start if start is not None else _default_start(manifest)
    run_key = hashlib.sha256(raw_manifest).hexdigest()
    sensor = _read_table(run_dir, SENSOR_TABLE, ["patient", "t_min", "glucose_mg_dl"])
    actuator = _read_table(run_dir, ACTUATOR_TABLE, ["patient", "t_min", "basal_u", "bolus_u"])
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
    _check_start(start)
    for column in ("basal_u", "bolus_u"):
        amounts = actuator[column]
        if not np.all(np.isfinite(amounts) & (amounts >= 0.0)):
            raise FhirExportError(f"{source}: {column} has values that are negative or not finite")
    patients = _patient_order(sensor, actuator)
    references = _references(patients, patient_reference)
    ids = _Ids(key)

    def at(t_min: float) -> str:
        return _iso(start + timedelta(minutes=float(t_min)))

    entries: list[dict[str, Any]] = []
    skipped = 0
    suspended = 0
    for name in patients:
        if name in references:
            subject = {"reference": references[name], "display": name}
        else:
            patient = _patient(name)
            entries.append(_entry(patient))
            subject = {"reference": f"urn:uuid:{patient['id']}", "display": name}

        rows = _rows(sensor, name)
        for t, g in zip(sensor["t_min"][rows], sensor["glucose_mg_dl"][rows], strict=True):
            if not math.isfinite(g):
                skipped += 1
                continue
            observation = {
                "resourceType": "Observation",
                "id": ids(name, "cgm", float(t)),
                "meta": _META,
                "status": "final",
                "category": _CATEGORY,
                "code": _GLUCOSE_CODE,
                "subject": subject,
                "effectiveDateTime": at(t),
                "valueQuantity": _quantity(float(g), "mg/dL", "mg/dL"),
                "device": _CGM_DEVICE,
            }
            entries.append(_entry(observation))

        rows = _rows(actuator, name)
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
                        "meta": _META,
                        "status": "completed",
                        "medicationCodeableConcept": _INSULIN,
                        "subject": subject,
                        "effectivePeriod": {"start": at(t_all[i]), "end": at(t_all[j - 1] + 1)},
                        "device": [_PUMP_DEVICE],
                        "dosage": {
                            "text": f"basal {rate:g} U/h for {j - i} min",
                            "route": _ROUTE,
                            "dose": _quantity(dose, "U", "[iU]"),
                            "rateQuantity": _quantity(rate, "U/h", "[iU]/h"),
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
                        "meta": _META,
                        "status": "completed",
                        "medicationCodeableConcept": _INSULIN,
                        "subject": subject,
                        "effectiveDateTime": at(t),
                        "device": [_PUMP_DEVICE],
                        "dosage": {
                            "text": f"bolus {dose:g} U",
                            "route": _ROUTE,
                            "dose": _quantity(dose, "U", "[iU]"),
                        },
                    },
                )
            )
        administrations.sort(key=lambda a: (a[0], a[1]))
        entries.extend(_entry(resource) for _, _, resource in administrations)

    kinds = [e["resource"]["resourceType"] for e in entries]
    counts = {
        kind: kinds.count(kind)
        for kind in ("Patient", "Observation", "MedicationAdministration")
        if kind in kinds
    }
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, f"{key}|bundle")),
        "meta": _META,
        "type": "collection",
        "entry": entries,
    }
    # A JSON round trip: plain JSON types only, and no sub-object shared between resources.
    bundle = json.loads(json.dumps(bundle, allow_nan=False))
    return FhirExport(
        bundle=bundle,
        start=start,
        patients=tuple(patients),
        counts=counts,
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
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(export.bundle, indent=1, ensure_ascii=False) + "\n")
    return export
