"""FHIR export of recorded runs: what every therapy's mapping shares.

A therapy's agents part may offer ``fhir_export(run_dir, *, start, patient_reference,
allow_incomplete)``: its mapping of a run directory written by ``twinloop run`` (manifest,
``channels/*.parquet``; see :mod:`twinloop.agents.recording`) onto FHIR resources, as a
``Bundle`` of type ``collection`` in a :class:`FhirExport` (CLI: ``twinloop export fhir
RUN_DIR --out FILE``). The mappings: :mod:`twinloop.agents.glucose.fhir` (CGM Observations,
insulin MedicationAdministrations), :mod:`twinloop.agents.knee.fhir` (knee angle and
interaction torque as sampled-data Observations). This module holds what they share:

FHIR version
    The resources are FHIR R4 (4.0.1) using only elements whose names, types and
    cardinalities are the same in R4 and R4B (4.3.0). The tests validate every resource with
    the R4B models of ``fhir.resources`` 8.3 (``fhir.resources.R4B``): the releases of that
    library with true R4 models (6.1.0 and older) are built on pydantic 1, and its pydantic-2
    releases (7.x, 8.x) ship R5 (the default), R4B and older versions, but not R4. R5 is *not*
    what this emits (its ``MedicationAdministration`` renamed ``effective[x]`` to
    ``occurence[x]``, its ``SampledData`` replaced ``period`` by ``interval``).

Times
    A run counts time from its start (``t_min`` or ``t_s``); FHIR needs absolute times.
    ``start`` (a timezone-aware :class:`~datetime.datetime`; a naive one is refused) is the
    wall-clock time of the run's time 0. By default it is the manifest's ``started_unix_s``
    (the moment the recording began, in UTC, truncated to the second), or
    :data:`DEFAULT_START` (2026-01-01T00:00:00Z) when the manifest has none. Times are ISO 8601
    with their offset.

Patients
    One ``Patient`` per virtual patient in the recording, ``identifier`` =
    ``{system: urn:twinloop:virtual-patient, value: <name, e.g. adult#001 or moderate>}``, and
    every other resource's ``subject`` references it by its ``urn:uuid:`` full URL.
    ``patient_reference`` maps patient names to references of Patients that already exist on
    the target platform (e.g. ``Patient/123``); those patients get no ``Patient`` resource.
    Every resource carries the security label ``HTEST`` ("test health data",
    ``v3-ActReason``) in ``meta.security``, so a platform never mistakes a simulated patient's
    data for a real person's.

Identifiers
    Deterministic, so the same run exports the same bundle: each resource's ``id`` is a UUID 5
    (:data:`NAMESPACE`) of what it records (run, patient, kind, time, and for repeated keys the
    occurrence), and its entry's ``fullUrl`` is ``urn:uuid:<id>``. The run is identified by the
    SHA-256 of its ``manifest.json``; a ``Patient``'s id depends on the virtual patient's name
    only, so exports of several runs of one virtual patient share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
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
    "Ids",
    "bundle_export",
    "check_start",
    "entry",
    "iso",
    "patient_order",
    "patient_references",
    "patient_rows",
    "quantity",
    "read_manifest",
    "read_table",
    "subject",
    "write_export",
]

#: ``start`` when neither the caller nor the manifest gives one.
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
#: Identifier system of the virtual patients' names.
PATIENT_SYSTEM = "urn:twinloop:virtual-patient"
#: Namespace of the resources' UUID 5 ids.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:twinloop:fhir-export")

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

META: dict[str, Any] = {
    "security": [{"system": ACT_REASON, "code": "HTEST", "display": "test health data"}]
}


class FhirExportError(ValueError):
    """A run that cannot be exported, or an export setting outside what is allowed."""


@dataclasses.dataclass(frozen=True)
class FhirExport:
    """An exported run.

    Attributes:
        bundle: the FHIR ``Bundle`` (type ``collection``) as a JSON-ready dict.
        start: the wall-clock time of the run's time 0.
        patients: the virtual patients, in the order of the recording.
        counts: resources per ``resourceType``.
        skipped_readings: readings not exported as values because they are not finite (NaN).
        suspended_basal_min: minutes of zero basal (glucose; not exported: nothing was
            delivered).
        skipped_what: what ``skipped_readings`` counts, for :meth:`summary`.

    """

    bundle: dict[str, Any]
    start: datetime
    patients: tuple[str, ...]
    counts: dict[str, int]
    skipped_readings: int
    suspended_basal_min: int = 0
    skipped_what: str = "NaN CGM reading(s) skipped"

    def summary(self) -> str:
        """One line: resources per type, skipped readings."""
        per_type = ", ".join(f"{n} {kind}" for kind, n in self.counts.items())
        return (
            f"{len(self.bundle['entry'])} resources ({per_type}) for {len(self.patients)} "
            f"patient(s) from {iso(self.start)}; {self.skipped_readings} {self.skipped_what}"
        )


def iso(moment: datetime) -> str:
    """``moment`` as FHIR's ``dateTime``/``instant``: ISO 8601 with its offset."""
    return moment.isoformat()


def check_start(start: object) -> datetime:
    """``start`` if it is a timezone-aware datetime at a whole-minute offset; else an error."""
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


def read_manifest(
    run_dir: Path, *, allow_incomplete: bool, start: datetime | None = None
) -> tuple[dict[str, Any], str, datetime]:
    """The run's manifest, the key of its resources' ids (its SHA-256) and its start time.

    ``start`` is checked (:func:`check_start`) and defaults to the manifest's
    ``started_unix_s`` (else :data:`DEFAULT_START`). An incomplete run is refused unless
    ``allow_incomplete``.
    """
    if start is not None:
        check_start(start)
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
    key = hashlib.sha256(raw).hexdigest()
    return manifest, key, start if start is not None else _default_start(manifest)


def _default_start(manifest: Mapping[str, Any]) -> datetime:
    started = manifest.get("started_unix_s")
    if (
        isinstance(started, int | float)
        and not isinstance(started, bool)
        and math.isfinite(started)
    ):
        return datetime.fromtimestamp(math.floor(started), tz=UTC)
    return DEFAULT_START


def read_table(
    run_dir: Path, name: str, columns: Sequence[str], *, needs: str
) -> dict[str, NDArray[Any]]:
    """Columns of ``channels/<name>``: ``patient`` first, then numbers, the time second.

    ``needs`` says what the export needs when the table is missing (e.g. "a glucose-loop
    recording from twinloop run"). The time column must be finite.
    """
    path = run_dir / "channels" / name
    if not path.is_file():
        raise FhirExportError(f"{path}: missing (exports need {needs})")
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
    time = columns[1]
    if not np.all(np.isfinite(out[time])):
        raise FhirExportError(f"{path}: {time} has values that are not finite")
    return out


def patient_order(*tables: Mapping[str, NDArray[Any]]) -> list[str]:
    """The patients of ``tables`` in the order they first appear."""
    seen: dict[str, None] = {}
    for table in tables:
        for name in table["patient"]:
            seen.setdefault(str(name), None)
    return list(seen)


def patient_rows(
    table: Mapping[str, NDArray[Any]], patient: str, time: str = "t_min"
) -> NDArray[np.intp]:
    """Indices of ``patient``'s rows, by ``time`` (stable: ties keep the recorded order)."""
    idx = np.flatnonzero(table["patient"] == patient)
    return idx[np.argsort(table[time][idx], kind="stable")]


class Ids:
    """Deterministic UUID 5 ids; a repeated key gets an occurrence number."""

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key
        self._seen: dict[str, int] = {}

    def __call__(self, *parts: object) -> str:
        """The id of what ``parts`` name (the n-th repeat of a key gets its own)."""
        key = "|".join(str(p) for p in parts)
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        full = f"{self.run_key}|{key}" + (f"|#{n}" if n else "")
        return str(uuid.uuid5(NAMESPACE, full))


def entry(resource: dict[str, Any]) -> dict[str, Any]:
    """The bundle entry of ``resource`` (``fullUrl`` ``urn:uuid:<id>``)."""
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}


def quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    """A UCUM ``Quantity``."""
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _patient(name: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": str(uuid.uuid5(NAMESPACE, f"patient|{name}")),
        "meta": META,
        "identifier": [{"system": PATIENT_SYSTEM, "value": name}],
        "name": [{"use": "anonymous", "text": f"virtual patient {name}"}],
    }


def patient_references(
    patients: list[str], patient_reference: str | Mapping[str, str] | None
) -> dict[str, str]:
    """``patient_reference`` as name → reference, checked against the run's ``patients``."""
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


def subject(
    name: str, references: Mapping[str, str], entries: list[dict[str, Any]]
) -> dict[str, str]:
    """The ``subject`` of ``name``'s resources.

    Its ``Patient`` goes into ``entries`` first unless ``references`` names an existing one.
    """
    if name in references:
        return {"reference": references[name], "display": name}
    patient = _patient(name)
    entries.append(entry(patient))
    return {"reference": f"urn:uuid:{patient['id']}", "display": name}


def bundle_export(
    entries: list[dict[str, Any]],
    *,
    key: str,
    start: datetime,
    patients: Sequence[str],
    kinds: Sequence[str],
    **counts: Any,
) -> FhirExport:
    """The ``collection`` Bundle of ``entries`` and what went into it.

    ``counts``: the :class:`FhirExport` fields of the mapping (e.g. ``skipped_readings``);
    ``kinds``: the resource types, in the order :attr:`FhirExport.counts` lists them.
    """
    found = [e["resource"]["resourceType"] for e in entries]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, f"{key}|bundle")),
        "meta": META,
        "type": "collection",
        "entry": entries,
    }
    # A JSON round trip: plain JSON types only, and no sub-object shared between resources.
    bundle = json.loads(json.dumps(bundle, allow_nan=False))
    return FhirExport(
        bundle=bundle,
        start=start,
        patients=tuple(patients),
        counts={kind: found.count(kind) for kind in kinds if kind in found},
        **counts,
    )


def write_export(export: FhirExport, out_path: str | Path) -> FhirExport:
    """Write ``export``'s bundle as JSON to ``out_path`` (its directory created if needed)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(export.bundle, indent=1, ensure_ascii=False) + "\n")
    return export
