"""Virtual populations: steady-state derivation, sampling, validity, determinism."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.patients import cohort
from twinloop.plant.glucose.population import (
    DERIVED,
    FREE,
    check,
    derive,
    fit_population,
    sample_population,
)
from twinloop.plant.glucose.uva_padova import simulate


@pytest.fixture(scope="module")
def model():
    return fit_population()


@pytest.fixture(scope="module")
def population(model):
    return sample_population(300, seed=3, model=model)


def _free(p):
    return {k: getattr(p, k) for k in FREE}


def test_the_steady_state_equations_reproduce_the_shipped_table():
    patients = cohort("all")
    assert len(patients) == 30
    for p in patients:
        d = derive(_free(p), p.name)
        for name in DERIVED:
            assert getattr(d, name) == pytest.approx(getattr(p, name), rel=1e-9), (p.name, name)
        np.testing.assert_allclose(d.x0, p.x0, rtol=1e-9, atol=1e-12, err_msg=p.name)


def test_parameters_without_a_steady_state_are_refused_by_name():
    p = cohort("adults")[0]
    free = _free(p) | {"fsnc_mg_per_kg_min": p.egp_basal_mg_per_kg_min * 1.5}
    with pytest.raises(ConfigError, match="Vm0"):
        derive(free, "x")


def test_the_model_is_fitted_per_group_with_a_positive_definite_covariance(model):
    assert set(model.means) == {"children", "adolescents", "adults"}
    assert 0 < model.shrinkage < 1
    assert np.all(np.linalg.eigvalsh(model.cov) > 0)
    assert model.constants["f"] == 0.9  # constant in the table: not sampled
    i = model.names.index("body_weight_kg")
    for group in model.means:
        shipped = np.mean([np.log(p.body_weight_kg) for p in cohort(group)])
        assert model.means[group][i] == pytest.approx(shipped)


def test_a_population_has_the_asked_size_groups_and_unique_names(population):
    patients, rejected = population
    assert len(patients) == 300
    assert collections.Counter(p.cohort for p in patients) == {
        "children": 100,
        "adolescents": 100,
        "adults": 100,
    }
    assert len({p.name for p in patients}) == 300
    assert all("#p3-" in p.name for p in patients)
    assert sum(rejected.values()) > 0  # the model does propose implausible patients


def test_every_member_is_plausible_and_at_steady_state_on_its_basal(model, population):
    patients, _ = population
    assert all(check(p, model) is None for p in patients)
    minutes = 1440
    insulin = np.array([[p.basal_u_per_min] * minutes for p in patients])
    traj = simulate(patients, insulin, np.zeros(minutes))
    gb = np.array([p.glucose_basal_mg_dl for p in patients])[:, None]
    assert np.max(np.abs(traj.bg_mg_dl - gb)) < 0.5
    # and they respond to a meal: glucose rises by tens of mg/dL
    meal = np.zeros(minutes)
    meal[60] = 50.0
    fed = simulate(patients[:30], insulin[:30], meal)
    rise = fed.bg_mg_dl.max(axis=1) - gb[:30, 0]
    assert np.all(rise > 10.0)


def test_members_differ_from_each_other_and_from_the_table(population):
    patients, _ = population
    shipped = {tuple(_free(p).values()) for p in cohort("all")}
    assert not any(tuple(_free(p).values()) in shipped for p in patients)
    adults = [p for p in patients if p.cohort == "adults"]
    spread = np.std([np.log(p.vmx_mg_per_kg_min_per_pmol_l) for p in adults])
    table = np.std([np.log(p.vmx_mg_per_kg_min_per_pmol_l) for p in cohort("adults")])
    assert spread > 0.3 * table


def test_the_same_seed_gives_the_same_population(model, population):
    kept: list[int] = []  # the progress bar's updates: patients kept per batch of draws
    again, _ = sample_population(300, seed=3, model=model, progress=kept.append)
    assert again == population[0]
    assert sum(kept) == 300 and len(kept) >= 3  # at least one batch per age group
    other, _ = sample_population(300, seed=4, model=model)
    assert [dataclasses.astuple(p)[1:] for p in other] != [
        dataclasses.astuple(p)[1:] for p in population[0]
    ]


def test_group_shares_and_bad_input(model):
    adults, _ = sample_population(20, seed=1, groups={"adults": 1.0}, model=model)
    assert {p.cohort for p in adults} == {"adults"}
    with pytest.raises(ConfigError, match="n=0"):
        sample_population(0)
    with pytest.raises(ConfigError, match="'elders'"):
        sample_population(5, groups={"elders": 1.0})
    with pytest.raises(ConfigError, match="groups"):
        sample_population(5, groups={"adults": 0.0})


def test_a_population_round_trips_through_parquet_and_the_command_line(tmp_path, capsys):
    from twinloop.cli.main import main
    from twinloop.plant.glucose.population import read_population

    out = tmp_path / "pop.parquet"
    assert main(["population", "sample", "--n", "30", "--seed", "5", "--out", str(out)]) == 0
    assert "population: 30 patients" in capsys.readouterr().out
    patients = read_population(str(out))
    expected, _ = sample_population(30, seed=5)
    assert patients == expected
    with pytest.raises(SystemExit) as refused:  # argparse: the range is in the option's type
        main(["population", "sample", "--n", "0", "--out", str(out)])
    assert refused.value.code == 2
    assert "--n: '0' must be from 1 to 10000" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="population"):
        read_population(_not_a_population(tmp_path))


def _not_a_population(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    return str(path)


def test_a_population_file_is_accepted_wherever_a_cohort_is(tmp_path):
    """``population:PATH`` among patient names: expansion, the closed loop, a campaign."""
    import json

    import yaml

    from twinloop.agents.glucose.loop import LoopConfig
    from twinloop.agents.glucose.run import run_cohort
    from twinloop.campaigns.campaign import run_campaign
    from twinloop.campaigns.spec import load_spec
    from twinloop.plant.errors import UnknownPatientError
    from twinloop.plant.glucose.cohorts import expand_names, find_patient
    from twinloop.plant.glucose.patients import get_patient
    from twinloop.plant.glucose.population import write_population

    members, _ = sample_population(3, seed=11)
    write_population(str(tmp_path / "pop.parquet"), members)
    token = f"population:{tmp_path / 'pop.parquet'}"
    assert list(expand_names([token, "adult#001"])) == [*members, get_patient("adult#001")]
    assert find_patient(members[0].name, [token]) == members[0]
    assert list(expand_names([members[1].name, token])) == [members[1], *members[::2]]
    with pytest.raises(UnknownPatientError, match="patient"):
        find_patient(members[0].name)
    with pytest.raises(UnknownPatientError, match="population"):
        expand_names([f"population:{tmp_path / 'missing.parquet'}"])
    # the closed loop
    _, summary = run_cohort(LoopConfig(patients=(token,), days=1), tmp_path / "run", progress=False)
    assert set(summary["patients"]) == {p.name for p in members}
    # a campaign, its path relative to the spec
    spec_path = tmp_path / "c.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "pop",
                "patients": ["population:pop.parquet"],
                "seeds": [0],
                "sweep": ["occlusion"],
                "requirements": [{"id": "G1", "rule": "glucose_min", "threshold_mg_dl": 40}],
            }
        )
    )
    spec = load_spec(spec_path)
    assert spec.patients == tuple(p.name for p in members)
    out = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert out["runs"]["ok"] == 6
    result = json.loads(
        (
            tmp_path / "out" / "results" / f"occlusion.{members[0].name.replace('#', '-')}.s0.json"
        ).read_text()
    )
    assert result["patient"] == members[0].name


def test_the_standard_day_keeps_therapy_parameters_suited_to_the_physiology(model, population):
    """Members' own carb ratio on three meals stays within the group's shipped extremes; an
    adult with a quarter of its carb ratio (four times the mealtime insulin) would not."""
    from twinloop.plant.glucose.population import standard_day

    patients, rejected = population
    low, high = standard_day(patients)
    for p, lo, hi in zip(patients, low, high, strict=True):
        b = model.bounds[p.cohort]
        assert lo >= b["standard_day_min_mg_dl"][0] and hi <= b["standard_day_max_mg_dl"][1]
    assert rejected["standard day"] > 0
    adult = cohort("adults")[0]
    overdosed = dataclasses.replace(adult, carb_ratio_g_per_u=adult.carb_ratio_g_per_u / 4)
    lo, _ = standard_day([overdosed])
    assert lo[0] < model.bounds["adults"]["standard_day_min_mg_dl"][0]
    (shipped_low,), _ = standard_day([adult])
    assert shipped_low >= model.bounds["adults"]["standard_day_min_mg_dl"][0]
