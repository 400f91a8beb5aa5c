"""FHIR export of a knee-exoskeleton run: the knee angle and the interaction torque over the task.

What a user exports from a rehabilitation session is what the device measured at the joint: the
knee's flexion angle (the drive's encoder) and the torque between the exoskeleton and the limb
(its joint torque sensor), per patient, at the control rate. :func:`build_knee_export` maps a
run directory written by ``twinloop run --therapy knee-exo`` onto FHIR R4 resources (what every
therapy's export shares — times, ``Patient`` resources, the ``HTEST`` label, deterministic ids —
is in :mod:`twinloop.agents.fhir`):

Readings (``channels/sensor__controller.parquet``: ``patient``, ``t_s``, ``angle_rad``,
``torque_sensor_nm``; the control rate ``control_hz`` from the manifest's config) → per patient
two ``Observation`` resources, one per signal, each a time series
    ``status`` ``final``; ``category`` ``therapy``
    (``http://terminology.hl7.org/CodeSystem/observation-category``: observations made during a
    therapy, physical therapy included); ``bodySite`` SNOMED CT ``72696002`` "Knee region
    structure"; ``effectivePeriod`` from the first reading's time to the last's;
    ``valueSampledData`` (FHIR's type for a waveform, as an ECG): ``origin`` 0 in the signal's
    UCUM unit, ``period`` the control period in milliseconds (10 at 100 Hz), ``dimensions`` 1,
    ``data`` the readings in time order separated by spaces (3 decimals), ``E`` (FHIR's "no
    value") for a control tick without a finite reading (a dropped or faulted sample);
    :attr:`~twinloop.agents.fhir.FhirExport.skipped_readings` counts them. ``device`` a
    display-only reference naming the simulated exoskeleton's sensor.

    * **Knee flexion angle**: ``code`` ``knee-flexion-angle`` in the code system
      :data:`CODE_SYSTEM`; degrees (0 = full extension, positive = flexion), UCUM ``deg``.
    * **Interaction torque**: ``code`` ``knee-interaction-torque``; the torque the exoskeleton
      applies to the knee as its joint torque sensor reads it, N·m (positive = flexion), UCUM
      ``N.m``.

    LOINC and SNOMED CT code range-of-motion *findings* and clinical scales, not a joint
    angle's time series nor an exoskeleton's torque, so both signals carry codes of twinloop's own
    code system (:data:`CODE_SYSTEM`, defined here) with a ``text`` that says what they are; a
    platform maps them to its own codes if it has some.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from twinloop.agents import fhir
from twinloop.agents.fhir import FhirExport, FhirExportError

__all__ = ["CODE_SYSTEM", "SIGNALS", "build_knee_export"]

#: twinloop's code system of the exoskeleton's measured signals (no standard code exists).
CODE_SYSTEM = "urn:twinloop:codesystem:exo-signal"
KNEE_SNOMED = "72696002"
SENSOR_TABLE = "sensor__controller.parquet"
#: Decimals of the sampled values (0.001° and 0.001 N·m: below the encoder's and sensor's noise).
DECIMALS = 3
_NEEDS = "a knee-exo recording from twinloop run --therapy knee-exo"


#: Per signal: the recorded column, the factor to the exported unit, the code, its display,
#: the UCUM unit, and the sensor that measured it.
SIGNALS: tuple[tuple[str, float, str, str, str, str], ...] = (
    (
        "angle_rad",
        180.0 / math.pi,
        "knee-flexion-angle",
        "Knee flexion angle (0 = full extension, positive = flexion)",
        "deg",
        "encoder",
    ),
    (
        "torque_sensor_nm",
        1.0,
        "knee-interaction-torque",
        "Exoskeleton-knee interaction torque (positive = flexion)",
        "N.m",
        "joint torque sensor",
    ),
)

_CATEGORY = [
    {"coding": [{"system": fhir.OBSERVATION_CATEGORY, "code": "therapy", "display": "Therapy"}]}
]
_KNEE = {
    "coding": [{"system": fhir.SNOMED, "code": KNEE_SNOMED, "display": "Knee region structure"}]
}


def _sampled(values: NDArray[np.float64]) -> tuple[str, int]:
    """SampledData ``data`` of ``values`` (``E`` where not finite) and how many were not."""
    ok = np.isfinite(values)
    text = " ".join(
        f"{v:.{DECIMALS}f}" if good else "E" for v, good in zip(values, ok, strict=True)
    )
    return text, int((~ok).sum())


def _control_hz(manifest: Mapping[str, Any], path: Path) -> float:
    config = manifest.get("config")
    hz = config.get("control_hz") if isinstance(config, dict) else None
    if isinstance(hz, bool) or not isinstance(hz, int | float) or not 0 < hz <= 10_000:
        raise FhirExportError(f"{path}: config.control_hz={hz!r} is not a control rate in Hz")
    return float(hz)


def build_knee_export(
    run_dir: str | Path,
    *,
    start: datetime | None = None,
    patient_reference: str | Mapping[str, str] | None = None,
    allow_incomplete: bool = False,
) -> FhirExport:
    """Export a knee-exo run's knee angle and interaction torque (the mapping: module docstring).

    Arguments and errors as :func:`twinloop.agents.glucose.fhir.build_export`.
    """
    run_dir = Path(run_dir)
    manifest, key, start = fhir.read_manifest(
        run_dir, allow_incomplete=allow_incomplete, start=start
    )
    hz = _control_hz(manifest, run_dir / "manifest.json")
    columns = ["patient", "t_s", *(s[0] for s in SIGNALS)]
    readings = fhir.read_table(run_dir, SENSOR_TABLE, columns, needs=_NEEDS)
    patients = fhir.patient_order(readings)
    references = fhir.patient_references(patients, patient_reference)
    ids = fhir.Ids(key)
    entries: list[dict[str, Any]] = []
    skipped = 0
    for name in patients:
        who = fhir.subject(name, references, entries)
        rows = fhir.patient_rows(readings, name, "t_s")
        t_s = readings["t_s"][rows]
        tick = np.rint((t_s - t_s[0]) * hz).astype(np.int64)  # the control ticks, from 0
        for column, factor, code, display, unit, sensor in SIGNALS:
            values = np.full(int(tick[-1]) + 1, np.nan)
            values[tick] = readings[column][rows] * factor  # a tick read twice: the later one
            data, missing = _sampled(values)
            skipped += missing
            observation = {
                "resourceType": "Observation",
                "id": ids(name, code),
                "meta": fhir.META,
                "status": "final",
                "category": _CATEGORY,
                "code": {
                    "coding": [{"system": CODE_SYSTEM, "code": code, "display": display}],
                    "text": display,
                },
                "subject": who,
                "effectivePeriod": {
                    "start": fhir.iso(start + timedelta(seconds=float(t_s[0]))),
                    "end": fhir.iso(start + timedelta(seconds=float(t_s[-1]))),
                },
                "bodySite": _KNEE,
                "device": {"display": f"simulated knee exoskeleton's {sensor} (twinloop)"},
                "valueSampledData": {
                    "origin": fhir.quantity(0.0, unit, unit),
                    "period": round(1000.0 / hz, 6),
                    "dimensions": 1,
                    "data": data,
                },
            }
            entries.append(fhir.entry(observation))
    return fhir.bundle_export(
        entries,
        key=key,
        start=start,
        patients=patients,
        kinds=("Patient", "Observation"),
        skipped_readings=skipped,
        skipped_what="control tick(s) without a finite reading (E)",
    )
