"""FHIR export of a run (twins/fhir.py, ``twinloop export fhir``), validated by fhir.resources.

The resources are validated with the R4B models of fhir.resources (the maintained releases
have no R4 models on pydantic 2; R4B keeps these resources' elements as in R4).
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from twinloop.agents.glucose.loop import LoopConfig
from twinloop.agents.glucose.run import run_cohort
from twinloop.agents.recording import INCOMPLETE_MARKER
from twinloop.cli.main import main
from twinloop.twins.fhir import (
    DEFAULT_START,
    PATIENT_SYSTEM,
    FhirExportError,
    build_export,
    export_run,
)

PATIENTS = ("adult#001", "child#002")
START = datetime(2026, 1, 1, 8, 0, tzinfo=timezone(timedelta(hours=1)))
MODELS = {
    "Patient": Patient,
    "Observation": Observation,
    "MedicationAdministration": MedicationAdministration,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # oref0 changes the temp basal often, suspends, and boluses for meals: every case of the
    # insulin mapping appears in one simulated day of two patients (well under a second).
    out = tmp_path_factory.mktemp("fhir") / "run"
    run_cohort(LoopConfig(patients=PATIENTS, days=1, controller="oref0"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def bundle(run_dir: Path) -> dict[str, Any]:
    return export_run(run_dir, start=START)


def _table(run_dir: Path, name: str) -> dict[str, np.ndarray]:
    t = pq.read_table(run_dir / "channels" / f"{name}.parquet").to_pydict()
    return {k: np.array(v) for k, v in t.items()}


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _patient_names(bundle: dict[str, Any]) -> dict[str, str]:
    """fullUrl of each Patient → the virtual patient's name (its identifier)."""
    out = {}
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Patient":
            (ident,) = r["identifier"]
            assert ident["system"] == PATIENT_SYSTEM
            out[e["fullUrl"]] = ident["value"]
    return out


def _by_patient(bundle: dict[str, Any], kind: str) -> dict[str, list[dict[str, Any]]]:
    names = _patient_names(bundle)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _resources(bundle, kind):
        out[names[r["subject"]["reference"]]].append(r)
    return out


def _minutes(text: str) -> float:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() is not None, text
    return (moment - START).total_seconds() / 60.0


def _codings(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept["coding"]}


def test_bundle_and_every_resource_validate_with_fhir_resources(bundle: dict[str, Any]) -> None:
    parsed = Bundle.model_validate(json.loads(json.dumps(bundle)))
    assert parsed.type == "collection"
    assert len(parsed.entry) == len(bundle["entry"])
    kinds = set()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kinds.add(resource["resourceType"])
        model = MODELS[resource["resourceType"]].model_validate(resource)
        assert model.id == resource["id"]
        assert entry["fullUrl"] == f"urn:uuid:{uuid.UUID(resource['id'])}"
    assert kinds == set(MODELS)
    ids = [e["resource"]["id"] for e in bundle["entry"]]
    assert len(set(ids)) == len(ids)
    # one Patient per virtual patient, every subject resolves to one of them
    assert sorted(_patient_names(bundle).values()) == sorted(PATIENTS)
    for e in bundle["entry"]:
        if e["resource"]["resourceType"] != "Patient":
            assert e["resource"]["subject"]["reference"] in _patient_names(bundle)


def test_observations_carry_loinc_glucose_and_ucum_mg_dl(bundle: dict[str, Any]) -> None:
    observations = _resources(bundle, "Observation")
    assert observations
    for o in observations:
        assert o["status"] == "final"
        assert _codings(o["code"]) == {("http://loinc.org", "2339-0")}
        assert o["code"]["coding"][0]["display"] == "Glucose [Mass/volume] in Blood"
        q = o["valueQuantity"]
        assert (q["unit"], q["system"], q["code"]) == (
            "mg/dL",
            "http://unitsofmeasure.org",
            "mg/dL",
        )
        (category,) = o["category"]
        assert _codings(category) == {
            ("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")
        }
        assert "simulated" in o["device"]["display"]


def test_observations_match_the_recorded_cgm_readings(
    run_dir: Path, bundle: dict[str, Any]
) -> None:
    cgm = _table(run_dir, "sensor__controller")
    observations = _by_patient(bundle, "Observation")
    assert sum(map(len, observations.values())) == int(np.isfinite(cgm["glucose_mg_dl"]).sum())
    for name in PATIENTS:
        mine = cgm["patient"] == name
        recorded = list(zip(cgm["t_min"][mine], cgm["glucose_mg_dl"][mine], strict=True))
        exported = [
            (_minutes(o["effectiveDateTime"]), o["valueQuantity"]["value"])
            for o in observations[name]
        ]
        assert exported == recorded  # every reading, exactly, in order
    # a few exactly, as text: the run's minute 0 is START, reading every 5 minutes
    first = observations[PATIENTS[0]]
    assert first[0]["effectiveDateTime"] == "2026-01-01T08:00:00+01:00"
    assert first[1]["effectiveDateTime"] == "2026-01-01T08:05:00+01:00"
    assert first[0]["valueQuantity"]["value"] == cgm["glucose_mg_dl"][0]
    assert math.isclose(
        sum(o["valueQuantity"]["value"] for obs in observations.values() for o in obs),
        float(np.nansum(cgm["glucose_mg_dl"])),
        rel_tol=1e-12,
    )


def test_nan_readings_are_skipped_and_counted(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "channels" / "sensor__controller.parquet"
    table = pq.read_table(path).to_pydict()
    nan_rows = [3, 10, 11, len(table["t_min"]) - 1]
    for i in nan_rows:
        table["glucose_mg_dl"][i] = math.nan
    pq.write_table(pa.Table.from_pydict(table), path)
    export = build_export(copy, start=START)
    assert export.skipped_readings == len(nan_rows)
    observations = _resources(export.bundle, "Observation")
    assert len(observations) == len(table["t_min"]) - len(nan_rows)
    names = _patient_names(export.bundle)
    exported = {
        (names[o["subject"]["reference"]], _minutes(o["effectiveDateTime"])) for o in observations
    }
    for i in nan_rows:
        assert (table["patient"][i], table["t_min"][i]) not in exported
    Bundle.model_validate(export.bundle)


def test_total_insulin_equals_the_delivered_insulin(run_dir: Path, bundle: dict[str, Any]) -> None:
    delivered = _table(run_dir, "actuator__plant")
    administrations = _by_patient(bundle, "MedicationAdministration")
    total = 0.0
    for name in PATIENTS:
        mine = delivered["patient"] == name
        expected = float(delivered["basal_u"][mine].sum() + delivered["bolus_u"][mine].sum())
        doses = [a["dosage"]["dose"]["value"] for a in administrations[name]]
        assert abs(math.fsum(doses) - expected) < 1e-6
        total += math.fsum(doses)
    assert abs(total - float(delivered["basal_u"].sum() + delivered["bolus_u"].sum())) < 1e-6
    for a in (a for v in administrations.values() for a in v):
        assert a["status"] == "completed"
        assert ("http://snomed.info/sct", "67866001") in _codings(a["medicationCodeableConcept"])
        dose = a["dosage"]["dose"]
        assert (dose["unit"], dose["system"], dose["code"]) == (
            "U",
            "http://unitsofmeasure.org",
            "[iU]",
        )
        assert dose["value"] > 0
        assert _codings(a["dosage"]["route"]) == {("http://snomed.info/sct", "34206005")}


def test_each_bolus_is_its_own_resource(run_dir: Path, bundle: dict[str, Any]) -> None:
    delivered = _table(run_dir, "actuator__plant")
    administrations = _by_patient(bundle, "MedicationAdministration")
    n_boluses = 0
    for name in PATIENTS:
        mine = (delivered["patient"] == name) & (delivered["bolus_u"] > 0)
        expected = list(zip(delivered["t_min"][mine], delivered["bolus_u"][mine], strict=True))
        boluses = [a for a in administrations[name] if "effectiveDateTime" in a]
        assert [
            (_minutes(b["effectiveDateTime"]), b["dosage"]["dose"]["value"]) for b in boluses
        ] == [(t, pytest.approx(u, abs=1e-9)) for t, u in expected]
        for b in boluses:
            assert "effectivePeriod" not in b and "rateQuantity" not in b["dosage"]
            assert b["dosage"]["text"].startswith("bolus")
        n_boluses += len(boluses)
    assert n_boluses >= 2  # the run has meal boluses


def test_basal_is_merged_into_periods_at_a_constant_rate(
    run_dir: Path, bundle: dict[str, Any]
) -> None:
    delivered = _table(run_dir, "actuator__plant")
    administrations = _by_patient(bundle, "MedicationAdministration")
    for name in PATIENTS:
        mine = delivered["patient"] == name
        t, basal = delivered["t_min"][mine], delivered["basal_u"][mine]
        assert np.array_equal(t, np.arange(len(t)))
        periods = [a for a in administrations[name] if "effectivePeriod" in a]
        covered = np.zeros(len(t), dtype=int)
        for p in periods:
            lo = int(_minutes(p["effectivePeriod"]["start"]))
            hi = int(_minutes(p["effectivePeriod"]["end"]))
            assert hi > lo
            rate = p["dosage"]["rateQuantity"]
            assert (rate["unit"], rate["system"], rate["code"]) == (
                "U/h",
                "http://unitsofmeasure.org",
                "[iU]/h",
            )
            # one rate over the whole period, and the dose is what those minutes delivered
            np.testing.assert_allclose(basal[lo:hi] * 60.0, rate["value"], rtol=0, atol=1e-9)
            assert p["dosage"]["dose"]["value"] == pytest.approx(basal[lo:hi].sum(), abs=1e-9)
            covered[lo:hi] += 1
        # every minute with basal is in exactly one period; suspended minutes in none
        assert np.array_equal(covered, (basal > 0).astype(int))
        # a period ends exactly where the rate changes: as many periods as runs of one rate > 0
        starts = np.flatnonzero(np.r_[True, basal[1:] != basal[:-1]])
        assert len(periods) == int((basal[starts] > 0).sum())
        assert len(set(basal[basal > 0])) > 1  # the run did change the rate
        assert len(periods) < len(t) / 5  # far fewer resources than minutes


def test_export_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    first = export_run(run_dir)
    assert json.dumps(first) == json.dumps(export_run(run_dir))
    # the same run elsewhere exports the same bundle
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert export_run(copy) == first
    # another run of the same patients gets other ids (its manifest differs), same Patients
    other = tmp_path / "other"
    run_cohort(LoopConfig(patients=PATIENTS[:1], days=1, seed=1), other, progress=False)
    other_bundle = export_run(other)
    ids = {
        e["resource"]["id"] for e in first["entry"] if e["resource"]["resourceType"] != "Patient"
    }
    assert ids.isdisjoint(
        e["resource"]["id"]
        for e in other_bundle["entry"]
        if e["resource"]["resourceType"] != "Patient"
    )
    assert _patient_names(other_bundle).items() <= _patient_names(first).items()


def test_default_start_is_the_recording_time_else_the_documented_epoch(
    run_dir: Path, tmp_path: Path
) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    expected = datetime.fromtimestamp(math.floor(manifest["started_unix_s"]), tz=UTC)
    export = build_export(run_dir)
    assert export.start == expected
    first = _resources(export.bundle, "Observation")[0]
    assert datetime.fromisoformat(first["effectiveDateTime"]) == expected

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    del manifest["started_unix_s"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    export = build_export(copy)
    assert export.start == DEFAULT_START == datetime(2026, 1, 1, tzinfo=UTC)
    first = _resources(export.bundle, "Observation")[0]
    assert first["effectiveDateTime"] == "2026-01-01T00:00:00+00:00"


def test_start_must_be_timezone_aware(run_dir: Path) -> None:
    with pytest.raises(FhirExportError, match=r"start must be timezone-aware"):
        export_run(run_dir, start=datetime(2026, 1, 1, 8, 0))
    with pytest.raises(FhirExportError, match=r"start must be a timezone-aware datetime"):
        export_run(run_dir, start="2026-01-01T08:00:00+00:00")  # type: ignore[arg-type]


def test_patient_reference_replaces_the_patient_resource(run_dir: Path) -> None:
    bundle = export_run(run_dir, start=START, patient_reference={"adult#001": "Patient/123"})
    assert list(_patient_names(bundle).values()) == ["child#002"]
    refs = {
        r["subject"]["reference"]
        for r in _resources(bundle, "Observation") + _resources(bundle, "MedicationAdministration")
        if r["subject"]["display"] == "adult#001"
    }
    assert refs == {"Patient/123"}
    Bundle.model_validate(bundle)
    with pytest.raises(FhirExportError, match=r"no patient adult#999"):
        export_run(run_dir, patient_reference={"adult#999": "Patient/1"})
    with pytest.raises(FhirExportError, match=r"one reference for a run of 2 patients"):
        export_run(run_dir, patient_reference="Patient/1")


def test_incomplete_run_is_refused_unless_allowed(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / INCOMPLETE_MARKER).write_text("recording in progress\n")
    with pytest.raises(FhirExportError, match=r"incomplete.*allow_incomplete"):
        export_run(copy)
    assert export_run(copy, allow_incomplete=True)["entry"]


def test_cli_writes_a_valid_bundle(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "bundle.json"
    code = main(
        ["export", "fhir", str(run_dir), "--out", str(out), "--start", "2026-01-01T08:00:00+01:00"]
    )
    assert code == 0
    written = json.loads(out.read_text())
    assert written == export_run(run_dir, start=START)
    Bundle.model_validate(written)
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1
    n_obs = len(_resources(written, "Observation"))
    n_ma = len(_resources(written, "MedicationAdministration"))
    assert f"2 Patient, {n_obs} Observation, {n_ma} MedicationAdministration" in stdout[0]
    assert str(out) in stdout[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}"], "no such run directory"),
        (["{run}", "--start", "2026-01-01T08:00:00"], "--start"),
        (["{run}", "--start", "not-a-time"], "--start"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    out = tmp_path / "bundle.json"
    argv = [a.format(missing=tmp_path / "nope", run=run_dir) for a in args]
    code = main(["export", "fhir", *argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("twinloop export: error: ")
    assert needle in lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_a_gap_in_the_recording_ends_a_basal_period(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "channels" / "actuator__plant.parquet"
    table = pq.read_table(path).to_pydict()
    # a patient at a constant basal rate for minutes 20..39; minutes 25..29 lost (dropped)
    keep = [
        i
        for i, (p, t) in enumerate(zip(table["patient"], table["t_min"], strict=True))
        if not (p == PATIENTS[0] and 25 <= t < 30)
    ]
    rows = {k: [v[i] for i in keep] for k, v in table.items()}
    for i, (p, t) in enumerate(zip(rows["patient"], rows["t_min"], strict=True)):
        if p == PATIENTS[0] and 20 <= t < 40:
            rows["basal_u"][i] = 0.0512345
    pq.write_table(pa.Table.from_pydict(rows), path)
    export = build_export(copy, start=START)
    periods = [
        (_minutes(a["effectivePeriod"]["start"]), _minutes(a["effectivePeriod"]["end"]))
        for a in _by_patient(export.bundle, "MedicationAdministration")[PATIENTS[0]]
        if "effectivePeriod" in a
    ]
    assert (20.0, 25.0) in periods and (30.0, 40.0) in periods
    assert not any(lo < 30 and hi > 25 for lo, hi in periods)
    doses = [
        a["dosage"]["dose"]["value"] for a in _resources(export.bundle, "MedicationAdministration")
    ]
    assert abs(math.fsum(doses) - (sum(rows["basal_u"]) + sum(rows["bolus_u"]))) < 1e-6
