"""FHIR export of knee-exo runs (agents/knee/fhir.py, ``twinloop export fhir``): the knee angle
and the interaction torque as sampled-data Observations, validated by fhir.resources."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from twinloop.agents.fhir import PATIENT_SYSTEM, FhirExportError
from twinloop.agents.knee.fhir import CODE_SYSTEM, build_knee_export
from twinloop.agents.knee.loop import ExoLoopConfig
from twinloop.agents.knee.run import run_knee_exo
from twinloop.cli.main import main

START = datetime(2026, 3, 2, 9, 30, tzinfo=timezone(timedelta(hours=1)))
UCUM = "http://unitsofmeasure.org"
SENSOR = "sensor__controller.parquet"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("knee-fhir") / "run"
    config = ExoLoopConfig(patients=("moderate", "severe"), cycles=1, controller="aan")
    run_knee_exo(config, out, progress=False)
    return out


def _readings(run_dir: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(run_dir / "channels" / SENSOR).to_pydict()
    return {k: np.asarray(v) for k, v in table.items()}


def _observations(bundle: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(patient, code) → Observation."""
    names = {
        e["fullUrl"]: e["resource"]["identifier"][0]["value"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    }
    out = {}
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            (coding,) = r["code"]["coding"]
            out[(names[r["subject"]["reference"]], coding["code"])] = r
    return out


def _values(data: str) -> np.ndarray:
    return np.array([math.nan if v == "E" else float(v) for v in data.split()])


def test_a_knee_run_exports_valid_fhir_with_angle_and_torque_series(run_dir: Path) -> None:
    export = build_knee_export(run_dir, start=START)
    bundle = export.bundle
    parsed = Bundle.model_validate(json.loads(json.dumps(bundle)))
    assert parsed.type == "collection"
    models = {"Patient": Patient, "Observation": Observation}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        models[resource["resourceType"]].model_validate(resource)
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        assert resource["meta"]["security"][0]["code"] == "HTEST"
    assert export.counts == {"Patient": 2, "Observation": 4} and export.skipped_readings == 0
    patients = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    ]
    assert {(p["identifier"][0]["system"], p["identifier"][0]["value"]) for p in patients} == {
        (PATIENT_SYSTEM, "moderate"), (PATIENT_SYSTEM, "severe")
    }  # fmt: skip
    readings = _readings(run_dir)
    observations = _observations(bundle)
    assert set(observations) == {
        (p, c) for p in ("moderate", "severe")
        for c in ("knee-flexion-angle", "knee-interaction-torque")
    }  # fmt: skip
    for (patient, code), o in observations.items():
        assert o["status"] == "final"
        assert o["code"]["coding"][0]["system"] == CODE_SYSTEM and o["code"]["text"]
        assert o["category"][0]["coding"][0]["code"] == "therapy"
        assert o["bodySite"]["coding"][0] == {
            "system": "http://snomed.info/sct", "code": "72696002",
            "display": "Knee region structure",
        }  # fmt: skip
        rows = readings["patient"] == patient
        t_s = readings["t_s"][rows]
        sampled = o["valueSampledData"]
        assert sampled["period"] == 10.0 and sampled["dimensions"] == 1  # 100 Hz, in ms
        unit = "deg" if code == "knee-flexion-angle" else "N.m"
        origin = sampled["origin"]
        assert (origin["value"], origin["unit"], origin["system"], origin["code"]) == (
            0.0, unit, UCUM, unit
        )  # fmt: skip
        # one value per control tick, in time order, as the sensors recorded them
        values = _values(sampled["data"])
        recorded = (
            np.degrees(readings["angle_rad"][rows])
            if code == "knee-flexion-angle"
            else readings["torque_sensor_nm"][rows]
        )
        assert values.size == t_s.size > 200
        np.testing.assert_allclose(values, recorded, atol=0.0005 + 1e-9)
        begin, end = (datetime.fromisoformat(o["effectivePeriod"][k]) for k in ("start", "end"))
        assert begin == START + timedelta(seconds=float(t_s[0]))
        assert end == START + timedelta(seconds=float(t_s[-1]))
    # the knee flexes through the task and the exoskeleton pushes both ways
    angle = _values(observations[("moderate", "knee-flexion-angle")]["valueSampledData"]["data"])
    assert angle.min() < 20 < 50 < angle.max() < 140
    torque = _values(
        observations[("severe", "knee-interaction-torque")]["valueSampledData"]["data"]
    )
    assert torque.min() < 0 < torque.max()
    # deterministic: the same run gives the same bundle
    assert build_knee_export(run_dir, start=START).bundle == bundle


def test_missing_and_nan_readings_are_e_and_counted(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    table = pq.read_table(copy / "channels" / SENSOR).to_pydict()
    moderate = [i for i, p in enumerate(table["patient"]) if p == "moderate"]
    dropped, nan = moderate[40], moderate[41]  # a lost reading, then a faulted one
    table["angle_rad"][nan] = math.nan
    kept = [i for i in range(len(table["patient"])) if i != dropped]
    pq.write_table(
        pa.table({k: [v[i] for i in kept] for k, v in table.items()}), copy / "channels" / SENSOR
    )
    export = build_knee_export(copy, start=START)
    o = _observations(export.bundle)
    angle = o[("moderate", "knee-flexion-angle")]["valueSampledData"]["data"].split()
    torque = o[("moderate", "knee-interaction-torque")]["valueSampledData"]["data"].split()
    assert angle[40:42] == ["E", "E"] and torque[40] == "E" and torque[41] != "E"
    assert len(angle) == len(moderate)  # the grid of control ticks is kept
    assert export.skipped_readings == 3
    assert "3 control tick(s) without a finite reading (E)" in export.summary()
    Observation.model_validate(o[("moderate", "knee-flexion-angle")])


def test_the_cli_exports_a_knee_run(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle.json"
    rc = main(["export", "fhir", str(run_dir), "--out", str(out), "--start", START.isoformat()])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 resources (2 Patient, 4 Observation) for 2 patient(s)" in printed
    assert json.loads(out.read_text()) == build_knee_export(run_dir, start=START).bundle
    # references to existing Patients instead of exporting them
    rc = main(["export", "fhir", str(run_dir), "--out", str(out), "--patient-reference",
               "moderate=Patient/7", "--patient-reference", "severe=Patient/8"])  # fmt: skip
    assert rc == 0
    bundle = json.loads(out.read_text())
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Observation"] * 4
    assert {e["resource"]["subject"]["reference"] for e in bundle["entry"]} == {
        "Patient/7", "Patient/8"
    }  # fmt: skip


def test_a_knee_run_without_its_readings_is_refused_naming_the_file(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "channels" / SENSOR).unlink()
    with pytest.raises(FhirExportError, match=r"sensor__controller\.parquet: missing .*knee-exo"):
        build_knee_export(copy)
