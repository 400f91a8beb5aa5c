"""Where the loop's model comes from: oracle, the group's mean, a sampled member, a twin."""

import dataclasses
import json
import math

import numpy as np
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.glucose.run import run_cohort
from twinloop.agents.glucose.supervisor import SupervisorConfig
from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.models import (
    DEFAULT_MODEL,
    loop_model,
    parse_model,
    population_model,
)
from twinloop.plant.glucose.patients import get_patient
from twinloop.plant.glucose.twin_model import TwinFit, TwinModel, write_twin
from twinloop.policies.glucose.controllers import make_controller


@pytest.mark.parametrize(
    ("spec", "kind", "sample", "path"),
    [
        ("oracle", "oracle", False, None),
        ("population", "population", False, None),
        ("population:sample", "population", True, None),
        ("twin:some/dir", "twin", False, "some/dir"),
        ("fit", "fit", False, None),
    ],
)
def test_specs_parse_and_round_trip(spec, kind, sample, path):
    choice = parse_model(spec)
    assert (choice.kind, choice.sample, choice.path) == (kind, sample, path)
    assert choice.spec == spec


@pytest.mark.parametrize("spec", ["", "twin:", "twin:  ", "Population", "mean", 3, None])
def test_bad_specs_are_refused_naming_the_field_and_what_is_allowed(spec):
    with pytest.raises(ConfigError) as err:
        parse_model(spec)
    assert "model=" in str(err.value) and "twin:PATH" in str(err.value)


def test_population_model_keeps_the_persons_clinical_settings_not_their_physiology():
    true = get_patient("adult#003")
    model = population_model(true)
    for field in (
        "basal_u_per_h",
        "carb_ratio_g_per_u",
        "correction_factor_mg_dl_per_u",
        "body_weight_kg",
    ):
        assert getattr(model, field) == pytest.approx(getattr(true, field))
    assert model.name == true.name
    # the physiology is the group's, not the person's
    assert model.vmx_mg_per_kg_min_per_pmol_l != pytest.approx(true.vmx_mg_per_kg_min_per_pmol_l)
    assert model.glucose_basal_mg_dl != pytest.approx(true.glucose_basal_mg_dl)
    # two adults get the group's physiology; only their insulin sensitivity is calibrated to
    # their own correction factor
    other = population_model(get_patient("adult#007"))
    assert other.kabs_per_min == pytest.approx(model.kabs_per_min)
    assert other.vmx_mg_per_kg_min_per_pmol_l != pytest.approx(model.vmx_mg_per_kg_min_per_pmol_l)
    uncalibrated = population_model(get_patient("adult#007"), calibrate=False)
    assert uncalibrated.vmx_mg_per_kg_min_per_pmol_l == pytest.approx(
        population_model(true, calibrate=False).vmx_mg_per_kg_min_per_pmol_l
    )


def test_a_sampled_member_is_seeded_by_the_patient_and_differs_from_the_mean():
    true = get_patient("child#004")
    a = population_model(true, sample=True)
    b = population_model(true, sample=True)
    mean = population_model(true)
    assert a == b
    assert a.kp3_mg_per_kg_min_per_pmol_l != pytest.approx(mean.kp3_mg_per_kg_min_per_pmol_l)
    assert a.body_weight_kg == pytest.approx(true.body_weight_kg)


def test_oracle_is_the_patient_itself():
    true = get_patient("adolescent#002")
    assert loop_model(parse_model("oracle"), true) is true


def _twin_file(path, name="adult#001", group="adults", basal=1.3, shift=0.5):
    structure = TwinModel.for_group(name, group, basal)
    z = np.zeros(len(structure.names))
    z[0] = shift
    return write_twin(TwinFit(structure, z, None, {}), path)


def test_a_twin_file_or_a_directory_of_twins_gives_each_patient_its_twin(tmp_path):
    true = get_patient("adult#001")
    single = _twin_file(tmp_path / "one.yaml")
    model = loop_model(parse_model(f"twin:{single}"), true)
    assert model.name == "adult#001" and model.basal_u_per_h == pytest.approx(1.3)
    directory = tmp_path / "twins"
    _twin_file(directory / "adult#001.yaml", shift=0.2)
    _twin_file(directory / "adult#002.yaml", name="adult#002", shift=-0.2)
    m1 = loop_model(parse_model(f"twin:{directory}"), true, n_patients=2)
    m2 = loop_model(parse_model(f"twin:{directory}"), get_patient("adult#002"), n_patients=2)
    assert m1.vmx_mg_per_kg_min_per_pmol_l > m2.vmx_mg_per_kg_min_per_pmol_l
    with pytest.raises(InvalidInputError, match=r"no twin of adult#003 .*individualize"):
        loop_model(parse_model(f"twin:{directory}"), get_patient("adult#003"), n_patients=3)
    with pytest.raises(InvalidInputError, match="one person's twin for a run of 2"):
        loop_model(parse_model(f"twin:{single}"), true, n_patients=2)


def test_fit_is_resolved_above_the_loop():
    with pytest.raises(ConfigError, match="individualize"):
        loop_model(parse_model("fit"), get_patient("adult#001"))
    with pytest.raises(LoopConfigError, match="model='fit'"):
        LoopConfig(patients=("adult#001",), model="fit")


def test_the_default_is_a_model_the_loop_could_really_have():
    assert DEFAULT_MODEL == "population"
    assert LoopConfig().model == "population"


def test_the_twin_and_the_mpc_plan_on_the_model_the_plant_and_supervisor_are_the_patient():
    true = get_patient("adult#005")
    config = LoopConfig(patients=(true.name,), controller="mpc", model="population")
    loop = PatientLoop(true, config, np.random.default_rng(0))
    mean = population_model(true)
    assert loop.model == mean
    assert loop.twin is not None and loop.twin.patient == mean
    assert loop.controller.patient == mean
    assert (
        loop._params[0].tolist()
        == PatientLoop(true, dataclasses.replace(config, model="oracle"), np.random.default_rng(0))
        ._params[0]
        .tolist()
    )  # the plant: the true patient
    assert loop.supervisor.config == SupervisorConfig.for_patient(true)
    # a controller that does not plan keeps the clinical profile only: the patient's
    other = get_patient("adult#009")
    bb = make_controller("basal-bolus", true, model=other)
    assert bb.scheduled_basal_u_per_h == pytest.approx(true.basal_u_per_h)
    assert make_controller("mpc", true, model=other).patient == other


def test_the_manifest_says_which_model_and_the_model_changes_the_mpc(tmp_path):
    results = {}
    for model in ("oracle", "population:sample"):
        cfg = LoopConfig(patients=("adult#002",), days=1, controller="mpc", model=model)
        run_dir, summary = run_cohort(cfg, tmp_path / model.replace(":", "-"), progress=False)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["config"]["model"] == model
        results[model] = summary["patients"]["adult#002"]["mean_mg_dl"]
    assert results["oracle"] != pytest.approx(results["population:sample"], abs=1e-6)


def test_run_takes_model_on_the_command_line_and_in_its_config(tmp_path, capsys):
    from twinloop.cli.main import main

    out = tmp_path / "run"
    code = main(
        ["run", "--patient", "adult#001", "--placement", "inline", "--model", "oracle",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0 and "model oracle" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["config"]["model"] == "oracle"
    config = tmp_path / "run.yaml"
    config.write_text("model: twin\n")
    code = main(["run", "--config", str(config), "--placement", "inline"])
    err = capsys.readouterr().err
    assert code == 2 and "--model='twin' is not allowed" in err


def test_the_population_model_is_calibrated_to_the_persons_correction_factor():
    from twinloop.plant.glucose.models import correction_drop_mg_dl, drop_per_correction_factor

    ratio = drop_per_correction_factor("adults")
    assert 0.8 < ratio < 1.5  # the adults' modelled 1-U drop is about their CF
    for name in ("adult#004", "adult#009"):  # the least and one of the most sensitive
        true = get_patient(name)
        target = true.correction_factor_mg_dl_per_u * ratio
        calibrated = population_model(true)
        mean = population_model(true, calibrate=False)
        (drop,) = correction_drop_mg_dl([calibrated])
        (mean_drop,) = correction_drop_mg_dl([mean])
        assert abs(math.log(drop / target)) < 0.1  # within 10 %
        assert abs(math.log(mean_drop / target)) > 0.3  # the uncalibrated mean was far off
        assert calibrated.basal_u_per_h == pytest.approx(true.basal_u_per_h)


def test_run_with_model_fit_fits_the_twin_first_and_plans_on_it(tmp_path, monkeypatch, capsys):
    from twinloop.cli.main import main
    from twinloop.plant.glucose import models

    monkeypatch.setattr(models, "FIT_LOG_DAYS", 2)  # a short log keeps the test fast
    out = tmp_path / "run"
    code = main(
        ["run", "--patient", "adult#002", "--placement", "inline", "--controller", "mpc",
         "--model", "fit", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    twin = out / "twins" / "adult#002.yaml"
    assert twin.is_file() and (out / "twins" / "individualize.json").is_file()
    model = json.loads((out / "manifest.json").read_text())["config"]["model"]
    assert model == f"twin:{(out / 'twins').resolve()}"
    # the loop planned on that twin: its model is the fitted one, not the population mean
    fitted = loop_model(parse_model(model), get_patient("adult#002"))
    assert fitted != population_model(get_patient("adult#002"))
