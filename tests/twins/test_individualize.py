"""A cohort individualized: one twin per patient, fitted from a log of the patient's life."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import twinloop.twins.individualize as individualize_module
from twinloop.plant.errors import ConfigError, InvalidInputError, UnknownPatientError
from twinloop.plant.glucose.patients import get_patient
from twinloop.twins.identify import read_twin
from twinloop.twins.individualize import (
    KEY_PARAMETERS,
    MANIFEST,
    individualize,
    log_seed,
    twin_path,
)
from twinloop.twins.synthetic import synthetic_log

PATIENTS = ("adult#001", "child#002")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """Two patients of different age groups individualized inline from 2-day logs."""
    out = tmp_path_factory.mktemp("twins")
    return individualize(list(PATIENTS), out, days=2, seed=0, inline=True, progress=False)


@pytest.fixture
def counted(monkeypatch):
    """The fit requests individualize hands to fit_many (names), fits still run."""
    seen: list[str] = []
    real = individualize_module.fit_many

    def fit_many(requests, **kwargs):
        seen.extend(r.name for r in requests)
        return real(requests, **kwargs)

    monkeypatch.setattr(individualize_module, "fit_many", fit_many)
    return seen


def test_each_patient_gets_a_readable_twin_named_after_them(done):
    assert [p.name for p in done.patients] == list(PATIENTS)
    assert sorted(p.name for p in done.out_dir.glob("*.yaml")) == sorted(
        f"{n}.yaml" for n in PATIENTS
    )
    assert done.fitted == PATIENTS and done.reused == ()
    for entry in done.patients:
        assert entry.twin == twin_path(done.out_dir, entry.name)
        twin = read_twin(entry.twin)
        assert twin.model.name == entry.name
        assert entry.log == done.out_dir / "logs" / f"{entry.name}.csv"
        assert entry.log.read_text().startswith("# synthetic log")
        assert math_close(twin.fit["rmse_mg_dl"], entry.rmse_mg_dl)
    assert read_twin(done.out_dir / "adult#001.yaml").model.group == "adults"
    assert read_twin(done.out_dir / "child#002.yaml").model.group == "children"


def math_close(a: float, b: float) -> bool:
    return bool(np.isclose(a, b, rtol=1e-12, atol=0))


def test_the_twin_starts_from_the_settings_a_clinic_knows(done):
    for name in PATIENTS:
        p = get_patient(name)
        model = read_twin(done.out_dir / f"{name}.yaml").model
        assert model.basal_u_per_h == pytest.approx(p.basal_u_per_h, rel=1e-12)
        for key in (
            "body_weight_kg",
            "age_years",
            "carb_ratio_g_per_u",
            "correction_factor_mg_dl_per_u",
        ):
            assert model.base[key] == pytest.approx(getattr(p, key), rel=1e-12), key


def test_the_manifest_holds_the_fits_and_fitted_vs_true_parameters(done):
    doc = json.loads((done.out_dir / MANIFEST).read_text())
    assert doc["complete"] is True and doc["days"] == 2 and doc["seed"] == 0
    assert {"python", "numpy", "scipy"} <= set(doc["versions"])
    assert list(doc["patients"]) == list(PATIENTS)
    assert doc["fitted"] == list(PATIENTS) and doc["reused"] == []
    for name, entry in doc["patients"].items():
        p = get_patient(name)
        twin = read_twin(done.out_dir / entry["twin"])
        assert entry["rmse_mg_dl"] == twin.fit["rmse_mg_dl"]
        assert entry["converged"] == twin.fit["converged"]
        assert entry["seconds"] > 0 and entry["source"] == "synthetic"
        assert entry["log_seed"] == log_seed(0, name)
        assert set(entry["parameters"]) == set(KEY_PARAMETERS)
        fitted = twin.parameters()
        for key, row in entry["parameters"].items():
            assert row["true"] == getattr(p, key), key
            if key != "f":
                assert row["fitted"] == fitted[key]["map"], key
            assert row["error_pct"] == pytest.approx(100 * (row["fitted"] / row["true"] - 1))
    assert not list(done.out_dir.rglob("*.tmp"))


def test_a_second_call_reuses_the_twins_without_fitting(done, counted, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(done.out_dir, out)
    before = {n: (out / f"{n}.yaml").read_bytes() for n in PATIENTS}
    again = individualize(list(PATIENTS), out, days=2, seed=0, inline=True, progress=False)
    assert counted == []
    assert again.reused == PATIENTS and again.fitted == ()
    assert all(p.reused for p in again.patients)
    assert {n: (out / f"{n}.yaml").read_bytes() for n in PATIENTS} == before
    assert json.loads((out / MANIFEST).read_text())["reused"] == list(PATIENTS)
    assert "reused" in again.table()


def test_a_changed_twin_file_or_another_seed_is_fitted_again(done, counted, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(done.out_dir, out)
    path = out / "child#002.yaml"
    path.write_text(path.read_text() + "\n# edited\n")
    again = individualize(list(PATIENTS), out, days=2, seed=0, inline=True, progress=False)
    assert counted == ["child#002"]
    assert again.reused == ("adult#001",) and again.fitted == ("child#002",)
    # the refit reproduces the twin; the manifest lists the new file's digest
    np.testing.assert_array_equal(
        read_twin(path).z_map, read_twin(done.out_dir / "child#002.yaml").z_map
    )
    # only adult#001 for another seed: its twin is refitted, child#002 stays listed
    counted.clear()
    other = individualize(["adult#001"], out, days=2, seed=1, inline=True, progress=False)
    assert counted == ["adult#001"] and other.reused == ()
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["patients"]["adult#001"]["seed"] == 1
    assert doc["patients"]["child#002"]["seed"] == 0
    assert not np.array_equal(
        read_twin(out / "adult#001.yaml").z_map, read_twin(done.out_dir / "adult#001.yaml").z_map
    )


def test_the_same_seed_gives_the_same_twin_whatever_the_other_patients(done, tmp_path):
    alone = individualize(["adult#001"], tmp_path, days=2, seed=0, inline=True, progress=False)
    assert alone.fitted == ("adult#001",)
    assert (tmp_path / "logs" / "adult#001.csv").read_bytes() == (
        done.out_dir / "logs" / "adult#001.csv"
    ).read_bytes()
    np.testing.assert_array_equal(
        read_twin(tmp_path / "adult#001.yaml").z_map,
        read_twin(done.out_dir / "adult#001.yaml").z_map,
    )


def test_log_seeds_differ_per_patient_and_per_seed():
    seeds = {log_seed(s, n) for s in (0, 1) for n in ("adult#001", "adult#002", "child#002")}
    assert len(seeds) == 6
    assert log_seed(3, "adult#001") == log_seed(3, "adult#001")


def test_a_given_log_is_fitted_and_a_failing_one_is_reported(tmp_path):
    syn = synthetic_log(get_patient("adult#003"), days=2, seed=9)
    good = syn.write(tmp_path / "in" / "mine.csv")
    bad = tmp_path / "in" / "bad.csv"
    bad.write_text("time,cgm_mg_dl,basal_u_per_h\n2026-03-02T08:00:00+01:00,120,1.0\n")
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=r"1 of 2 twins could not be fitted \(child#001"):
        individualize(
            ["adult#003", "child#001"],
            out,
            logs={"adult#003": good, "child#001": bad},
            days=1,
            inline=True,
            progress=False,
        )
    assert (out / "logs" / "adult#003.csv").read_bytes() == good.read_bytes()
    twin = read_twin(out / "adult#003.yaml")
    assert twin.fit["minutes"] == 2 * 1440  # all of the given log's days, whatever `days`
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["complete"] is False and set(doc["errors"]) == {"child#001"}
    assert doc["patients"]["adult#003"]["source"] == "log"
    assert doc["patients"]["adult#003"]["parameters"] == {}
    assert not (out / "child#001.yaml").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"days": 0}, ConfigError, "days=0"),
        ({"days": 1.5}, ConfigError, "days=1.5"),
        ({"days": True}, ConfigError, "days=True"),
        ({"seed": -1}, ConfigError, "seed=-1"),
        ({"workers": 0}, ConfigError, "workers=0"),
        ({"inline": True, "address": "127.0.0.1:6379"}, ConfigError, "address="),
        ({"logs": {"adult#002": "x.csv"}}, ConfigError, "logs='adult#002'"),
        ({"logs": {"adult#001": "/no/such/log.csv"}}, ConfigError, r"logs\[adult#001\]="),
    ],
)
def test_bad_arguments_are_refused_naming_the_field(tmp_path, counted, kwargs, error, field):
    with pytest.raises(error, match=field):
        individualize(["adult#001"], tmp_path / "out", **kwargs)
    assert counted == [] and not (tmp_path / "out").exists()


def test_bad_patients_and_output_are_refused(tmp_path, counted):
    with pytest.raises(UnknownPatientError, match="patients: unknown name 'adult#999'"):
        individualize(["adult#999"], tmp_path)
    with pytest.raises(ConfigError, match="patients="):
        individualize([], tmp_path)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ConfigError, match="out_dir="):
        individualize(["adult#001"], afile)
    assert counted == []


class _Stop(Exception):
    pass


def _no_synthesis(patient, **kwargs):
    raise _Stop


def test_names_and_patients_expand_in_order_without_repeats(monkeypatch, tmp_path):
    seen: list[str] = []
    real = individualize_module._plan

    def plan(patient, **kwargs):
        seen.append(patient.name)
        return real(patient, **kwargs)

    monkeypatch.setattr(individualize_module, "_plan", plan)
    monkeypatch.setattr(individualize_module, "synthetic_log", _no_synthesis)
    with pytest.raises(_Stop):
        individualize(["adult#002", "adults", get_patient("child#001")], tmp_path, inline=True)
    expected = ["adult#002"] + [f"adult#{i:03d}" for i in range(1, 11) if i != 2] + ["child#001"]
    assert seen == expected


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_fits_on_ray_give_the_twins_fitted_inline(ray_started, done, tmp_path):
    on_ray = individualize(list(PATIENTS), tmp_path, days=2, seed=0, workers=2, progress=False)
    assert on_ray.fitted == PATIENTS
    for name in PATIENTS:
        np.testing.assert_array_equal(
            read_twin(tmp_path / f"{name}.yaml").z_map,
            read_twin(done.out_dir / f"{name}.yaml").z_map,
        )
