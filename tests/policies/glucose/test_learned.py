"""Saved policies load as loop controllers; incompatible or broken files are refused clearly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("stable_baselines3")

from twinloop import plant
from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.messages import AgentFault, InsulinCommand, InsulinDelivery
from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.controllers import make_controller
from twinloop.policies.glucose.features import ENV_LAYOUT_VERSION
from twinloop.policies.glucose.interface import ControllerInput, Dose
from twinloop.policies.glucose.learned import LearnedPolicyController, load_policy_controller
from twinloop.policies.saved import PickleTrustWarning
from twinloop.policies.training import parse_config, train


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PPO policy trained on two adults (4 envs, 512 steps)."""
    doc = {
        plant.T1D_ID: {
            "algorithm": "ppo",
            "n_envs": 4,
            "n_timesteps": 512,
            "n_steps": 64,
            "batch_size": 64,
            "n_epochs": 2,
            "policy_kwargs": {"net_arch": [16, 16]},
            "env": {"patients": ["adult#001", "adult#002"], "episode_days": 0.25},
            "observation": {"cgm": 6, "iob": True, "meal": True, "clock": True},
            "action": "basal+meal_bolus",
            "seeds": [5],
            "tensorboard": False,
        }
    }
    (result,) = train(parse_config(doc), tmp_path_factory.mktemp("policy"), progress=False)
    return Path(result.directory)


def copy_of(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(saved, target)
    return target


def edit_metadata(directory: Path, change: Any) -> None:
    meta = json.loads((directory / "policy.json").read_text())
    change(meta)
    (directory / "policy.json").write_text(json.dumps(meta))


def test_saved_policy_loads_by_directory_zip_and_controller_name(saved: Path) -> None:
    patient = get_patient("adult#003")  # not a training patient: the layout is normalised
    for path in (str(saved), str(saved / "model.zip")):
        ctrl = load_policy_controller(path, patient)
        assert isinstance(ctrl, LearnedPolicyController)
    ctrl = make_controller(f"policy:{saved}", patient)
    assert isinstance(ctrl, LearnedPolicyController)
    meta = ctrl.metadata
    assert meta["env_id"] == plant.T1D_ID and meta["env_layout_version"] == ENV_LAYOUT_VERSION
    assert meta["seed"] == 5 and meta["algorithm"] == "ppo"
    assert [f["name"] for f in meta["observation"]["features"]] == ["cgm", "iob", "meal", "clock"]


def test_decide_runs_the_policy_deterministically_and_maps_the_action(saved: Path) -> None:
    patient = get_patient("adult#003")
    a = load_policy_controller(saved, patient)
    b = load_policy_controller(saved, patient)
    doses = []
    for k in range(10):
        meal = 60.0 if k == 4 else 0.0
        obs = ControllerInput(5.0 * k, 150.0 + 5 * k, 0.0, 0.3 * k, meal)
        da, db = a.decide(obs), b.decide(obs)
        assert da == db
        doses.append(da)
        # the basal is within [0, 3 × scheduled basal]; the meal bolus is carbs/CR
        assert 0.0 <= da.basal_u_per_h <= 3.0 * patient.basal_u_per_h + 1e-9
        assert da.bolus_u == pytest.approx(meal / patient.carb_ratio_g_per_u)
    # the controller computes the action the model gives for its features
    c = load_policy_controller(saved, patient)
    obs = ControllerInput(0.0, 180.0, 0.0, 1.0, 0.0)
    features = c.features(obs)
    assert features is not None
    action, _ = c.model.predict(features, deterministic=True)
    a0 = float(np.clip(action[0], -1, 1))
    mult = 1 + a0 if a0 < 0 else 1 + 2 * a0
    assert load_policy_controller(saved, patient).decide(obs).basal_u_per_h == pytest.approx(
        mult * patient.basal_u_per_h
    )


def test_no_glucose_yet_gives_the_neutral_dose(saved: Path) -> None:
    patient = get_patient("adult#001")
    ctrl = load_policy_controller(saved, patient)
    dose = ctrl.decide(ControllerInput(0.0, math.nan, math.inf, 0.0, 30.0))
    assert dose == Dose(patient.basal_u_per_h, 30.0 / patient.carb_ratio_g_per_u)


def test_one_day_loop_behind_the_supervisor(saved: Path) -> None:
    patient = get_patient("adult#001")
    config = LoopConfig(patients=("adult#001",), days=1, controller=f"policy:{saved}")
    loop = PatientLoop(patient, config, np.random.default_rng(0))
    assert isinstance(loop.controller, LearnedPolicyController)
    commands: list[InsulinCommand] = []
    faults: list[AgentFault] = []

    def listen(channel: str, message: Any) -> None:
        if channel == "controller->supervisor":
            commands.append(message)
        elif channel == "runtime->faults":
            faults.append(message)

    loop.listen(listen)
    loop.run()
    assert len(commands) == 288  # one command per 5-min tick, none lost to a fault
    assert faults == []
    assert any(c.bolus_u > 0 for c in commands)  # meal boluses
    assert len({round(c.basal_u_per_h, 6) for c in commands}) > 1  # the policy modulates


def test_twinloop_run_with_a_policy_controller(saved: Path, tmp_path: Path) -> None:
    from twinloop.cli.main import main

    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--patient",
            "adult#002",
            "--days",
            "1",
            "--controller",
            f"policy:{saved}",
            "--placement",
            "inline",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["config"]["controller"] == f"policy:{saved}"


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (
            lambda m: m.update(env_layout_version=ENV_LAYOUT_VERSION + 7),
            [f"env layout version {ENV_LAYOUT_VERSION + 7}", f"version {ENV_LAYOUT_VERSION}"],
        ),
        (
            lambda m: m["observation"]["constants"].update(cgm_center_mg_dl=130.0),
            ["observation layout", '"cgm_center_mg_dl": 130.0', '"cgm_center_mg_dl": 120.0'],
        ),
        (
            lambda m: m["observation"]["features"].append({"name": "lactate", "size": 1}),
            ["observation layout", "lactate", "not representable"],
        ),
        (
            lambda m: m["action"].update(max_basal_multiplier=4.0, bolus="carbs/CR/2"),
            ["action layout", "carbs/CR/2", '"max_basal_multiplier": 4.0'],
        ),
        (lambda m: m.update(env_id="twinloop/T1D-v9"), ["twinloop/T1D-v9", plant.T1D_ID]),
    ],
    ids=["env-version", "obs-constants", "obs-feature", "action", "env-id"],
)
def test_incompatible_metadata_is_refused_naming_both(
    saved: Path, tmp_path: Path, change: Any, needles: list[str]
) -> None:
    d = copy_of(saved, tmp_path)
    edit_metadata(d, change)
    with pytest.raises(PolicyConfigError) as err:
        load_policy_controller(d, get_patient("adult#001"))
    for needle in needles:
        assert needle in str(err.value)


def test_missing_and_corrupt_files_are_policy_config_errors(saved: Path, tmp_path: Path) -> None:
    patient = get_patient("adult#001")
    with pytest.raises(PolicyConfigError, match="no such file"):
        load_policy_controller(tmp_path / "nowhere", patient)
    with pytest.raises(PolicyConfigError, match="no such file"):
        make_controller(f"policy:{tmp_path / 'nowhere'}", patient)
    d = copy_of(saved, tmp_path)
    (d / "policy.pt").write_bytes(b"not a zip at all")
    with pytest.raises(PolicyConfigError, match="cannot load"):
        load_policy_controller(d, patient)
    (d / "policy.pt").unlink()  # model.zip alone needs pickle: refused unless trusted
    with pytest.raises(PolicyConfigError, match="needs pickle"):
        load_policy_controller(d, patient)
    (d / "model.zip").write_bytes(b"not a zip at all")
    with pytest.raises(PolicyConfigError, match="cannot load"), pytest.warns(PickleTrustWarning):
        load_policy_controller(f"pickle:{d}", patient)
    (d / "model.zip").unlink()
    with pytest.raises(PolicyConfigError, match="missing"):
        load_policy_controller(d, patient)
    (d / "policy.json").write_text("{ not json")
    with pytest.raises(PolicyConfigError, match="not valid JSON"):
        load_policy_controller(d, patient)
    (d / "policy.json").unlink()
    with pytest.raises(PolicyConfigError, match="cannot read"):
        load_policy_controller(d, patient)
    e = copy_of(saved, tmp_path / "x")
    (e / "policy.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(PolicyConfigError, match="not a twinloop policy"):
        load_policy_controller(e, patient)


def test_a_copy_ships_the_path_not_the_model_and_decides_alike(saved: Path) -> None:
    import pickle

    patient = get_patient("adult#004")
    ctrl = load_policy_controller(saved, patient)
    ctrl.decide(ControllerInput(0.0, 140.0, 0.0, 0.0, 0.0))
    blob = pickle.dumps(ctrl)
    assert b"torch" not in blob  # what a Ray actor receives: no torch module
    copy = pickle.loads(blob)
    obs = ControllerInput(5.0, 150.0, 0.0, 0.5, 20.0)
    assert copy.decide(obs) == ctrl.decide(obs)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_started")
def test_twinloop_run_with_a_policy_controller_on_ray_actors(saved: Path, tmp_path: Path) -> None:
    from twinloop.cli.main import main

    out = tmp_path / "run"
    args = ["run", "--patient", "adult#002", "--days", "1", "--controller", f"policy:{saved}"]
    code = main([*args, "--placement", "ray", "--out", str(out), "--no-progress"])
    assert code == 0
    import pyarrow.parquet as pq

    # the controller ran in its actor, warmed up when the actor unpickled it: every tick's
    # decision met the loop's 1-s deadline and reached the supervisor
    commands = pq.read_table(out / "channels" / "controller__supervisor.parquet").to_pylist()
    faults_file = out / "channels" / "runtime__faults.parquet"
    faults = pq.read_table(faults_file).to_pylist() if faults_file.exists() else []
    assert faults == []
    assert [c["t_min"] for c in commands] == [5.0 * k for k in range(288)]


SHIPPED_POLICY = Path(__file__).resolve().parents[3] / "policies" / "shipped" / "t1d_ppo" / "seed_0"


def test_the_committed_default_policy_loads_with_the_current_layout() -> None:
    """policies/shipped/t1d_ppo/seed_0 (the evaluation's policy) still matches the code."""
    ctrl = make_controller(f"policy:{SHIPPED_POLICY}", get_patient("adult#005"))
    assert isinstance(ctrl, LearnedPolicyController)
    assert ctrl.metadata["env_layout_version"] == ENV_LAYOUT_VERSION


_ANY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e4, max_value=1e4),
)


@settings(max_examples=40, deadline=None)
@given(
    patient=st.sampled_from(["adult#001", "adolescent#004", "child#008"]),
    steps=st.lists(st.tuples(_ANY, _ANY, _ANY), min_size=1, max_size=16),
)
def test_the_shield_holds_for_the_committed_policy(patient: str, steps: list[Any]) -> None:
    """The learned policy, fed any observations, goes through the supervisor: what reaches
    the pump respects every limit."""
    from twinloop.agents.glucose.supervisor import SafetySupervisor, SupervisorConfig
    from twinloop.agents.messages import CgmReading

    p = get_patient(patient)
    ctrl = make_controller(f"policy:{SHIPPED_POLICY}", p)
    sup = SafetySupervisor(SupervisorConfig.for_patient(p))
    cfg = sup.config
    for k, (glucose, iob, carbs) in enumerate(steps):
        t = 5.0 * k
        obs = ControllerInput(t, glucose, 0.0, iob, carbs if carbs == carbs else 0.0)
        try:
            dose = ctrl.decide(obs)
            command = InsulinCommand(t, dose.basal_u_per_h, dose.bolus_u, dose.duration_min)
        except (ValueError, ArithmeticError):  # a controller may refuse absurd input
            command = None
        if math.isfinite(glucose) and 39.0 <= glucose <= 401.0:
            sup.observe_cgm(CgmReading(t, glucose))
        out, _ = sup.review(t, command)
        cap = max(cfg.max_temp_basal_u_per_h, cfg.scheduled_basal_u_per_h)
        assert 0.0 <= out.basal_u_per_h <= cap
        assert 0.0 <= out.bolus_u <= cfg.max_bolus_u
        extra = max(out.basal_u_per_h - cfg.scheduled_basal_u_per_h, 0.0) * out.duration_min / 60
        assert out.bolus_u + extra <= max(cfg.max_iob_u - sup.net_iob_u, 0.0) + 1e-9
        sup.observe_delivery(InsulinDelivery(t, out.basal_u_per_h / 12, out.bolus_u))


def test_absurd_inputs_give_bounded_finite_features(saved: Path) -> None:
    ctrl = load_policy_controller(saved, get_patient("adult#001"))
    ctrl.features(ControllerInput(0.0, 120.0, 0.0, 0.0, 0.0))
    for iob, carbs in [(1e300, 0.0), (-math.inf, 1e308), (math.nan, math.nan)]:
        f = ctrl.features(ControllerInput(5.0, 120.0, 0.0, iob, carbs))
        assert f is not None
        assert np.all(np.isfinite(f))
        assert np.all(np.abs(f) <= 100.0)
