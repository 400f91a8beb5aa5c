"""twinloop train on twinloop/KneeExo-v0: config, tiny SAC/PPO runs, the loaded exo policy."""

from __future__ import annotations

import copy
import json
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("stable_baselines3")

from twinloop import plant
from twinloop.plant.knee.env import KneeExoEnv
from twinloop.plant.knee.env_core import KneeExoConfig
from twinloop.plant.knee.model import KneeParams
from twinloop.plant.knee.tasks import K_T, CyclicFlexionExtension
from twinloop.policies.errors import PolicyConfigError, PolicyError
from twinloop.policies.glucose.features import ENV_LAYOUT_VERSION
from twinloop.policies.glucose.learned import load_policy_controller
from twinloop.policies.knee.controllers import ExoInput, ImpedanceController
from twinloop.policies.knee.learned import (
    KNEE_LAYOUT_VERSION,
    ExoPolicyController,
    KneeObservationScaler,
    load_exo_policy,
)
from twinloop.policies.knee.training import KNEE_ENV_KEYS
from twinloop.policies.training import (
    load_config,
    make_training_env,
    parse_config,
    shipped_config,
    train,
)

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "policies" / "shipped" / "knee_sac" / "seed_0"
GLUCOSE_COMMITTED = REPO / "policies" / "shipped" / "t1d_ppo" / "seed_0"


def tiny(**overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "algorithm": "sac",
        "policy": "MlpPolicy",
        "n_envs": 4,
        "n_timesteps": 400,
        "learning_starts": 100,
        "batch_size": 32,
        "buffer_size": 2000,
        "policy_kwargs": {"net_arch": [16, 16]},
        "env": {"patients": ["moderate", "mild"], "tasks": ["cyclic"], "max_torque_nm": 20},
        "seeds": [0],
        "checkpoint_freq": 200,
        "tensorboard": True,
    }
    section.update(overrides)
    return {plant.KNEE_EXO_ID: section}


def exo_input(obs: np.ndarray, t_s: float = 0.0) -> ExoInput:
    o = [float(v) for v in obs]
    return ExoInput(t_s, o[0], o[1], o[5], o[6], o[2], o[3], o[4])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SAC knee policy (4 envs, 400 steps), with checkpoints and TensorBoard."""
    (result,) = train(parse_config(tiny()), tmp_path_factory.mktemp("knee"), progress=False)
    return Path(result.directory)


def copy_of(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(saved, target)
    return target


def edit_metadata(directory: Path, change: Any) -> None:
    meta = json.loads((directory / "policy.json").read_text())
    change(meta)
    (directory / "policy.json").write_text(json.dumps(meta))


# --- configuration ------------------------------------------------------------------------


def test_knee_config_parses_env_settings_by_name() -> None:
    config = parse_config(
        tiny(
            env={
                "patients": ["moderate", {"preset": "mild", "body_mass_kg": 90}],
                "tasks": ["hold", {"name": "cyclic", "cycles": 5, "randomize": False}],
                "sample_task": True,
                "control_hz": 200,
                "encoder": {"counts_per_rev": 4096},
                "assist_weight": 0.5,
            }
        )
    )
    assert config.env_id == plant.KNEE_EXO_ID and config.family == "knee_exo"
    env = config.knee_config()
    assert isinstance(env, KneeExoConfig)
    assert env.patients[0] == "moderate"
    custom = env.patients[1]
    assert isinstance(custom, KneeParams) and custom.body_mass_kg == 90
    assert custom.strength_fraction == 0.6  # the rest of the mild preset
    assert env.tasks[0] == "hold"
    assert env.tasks[1] == CyclicFlexionExtension(cycles=5, randomize=False)
    assert env.sample_task and env.control_hz == 200 and env.encoder.counts_per_rev == 4096
    assert env.normalized_action  # the training default, unlike the env's
    assert config.hyperparameters == {"learning_starts": 100, "batch_size": 32, "buffer_size": 2000}


def test_knee_env_unknown_key_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(env={"patient": "moderate"}))
    message = str(err.value)
    assert "patient" in message and plant.KNEE_EXO_ID in message
    for key in KNEE_ENV_KEYS:
        assert key in message


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"control_hz": 150}, ["env.control_hz", "dividing 1000"]),
        ({"patients": ["weak"]}, ["env.patients", "weak", "moderate", "severe"]),
        ({"patients": [{"preset": "mild", "strenght": 0.5}]}, ["strenght", "strength_fraction"]),
        ({"patients": [{"preset": "mild", "body_mass_kg": -1}]}, ["body_mass_kg", "> 0"]),
        ({"patients": []}, ["env.patients", "non-empty"]),
        ({"tasks": ["jump"]}, ["env.tasks", "jump", "cyclic", "sit_to_stand"]),
        ({"tasks": [{"name": "cyclic", "cycles": 0}]}, ["cycles", ">= 1"]),
        ({"tasks": [{"name": "cyclic", "period": 2}]}, ["period", "period_min_s"]),
        ({"encoder": {"cpr": 10}}, ["env.encoder", "cpr", "counts_per_rev"]),
        ({"encoder": {"counts_per_rev": 2}}, ["env.encoder.counts_per_rev", ">= 4"]),
        ({"encoder": {"counts_per_rev": 1e3 + 0.5}}, ["env.encoder.counts_per_rev", "integer"]),
        ({"tasks": [{"name": "hold", "randomize": "no"}]}, ["randomize", "true or false"]),
        ({"torque_sensor": {"noise_nm": "low"}}, ["env.torque_sensor.noise_nm", "number"]),
        ({"emg": 0.1}, ["env.emg", "delay_s"]),
        ({"normalized_action": "yes"}, ["env.normalized_action", "true or false"]),
        ({"assist_weight": -1.0}, ["env.assist_weight", ">= 0"]),
        ({"max_torque_nm": "a lot"}, ["env.max_torque_nm", "finite number"]),
        ({"rom_min_rad": 1.0, "rom_max_rad": 0.5}, ["env.rom_min_rad", "rom_max_rad"]),
    ],
)
def test_bad_knee_env_values_name_the_field_and_what_is_allowed(
    env: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(env=env))
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("key", ["observation", "action", "reward"])
def test_glucose_keys_are_refused_for_the_knee_env(key: str) -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(**{key: "basal"}))
    message = str(err.value)
    assert message.startswith(key) and plant.KNEE_EXO_ID in message
    assert "7 sensor readings" in message and "env.assist_weight" in message


def test_knee_keys_and_glucose_accessors() -> None:
    with pytest.raises(PolicyConfigError, match="features_extractor_class"):
        parse_config(tiny(policy_kwargs={"features_extractor_class": "FlattenExtractor"}))
    with pytest.raises(PolicyConfigError, match="tau"):  # SAC's, not PPO's
        parse_config(tiny(algorithm="ppo", tau=0.1))
    config = parse_config(tiny())
    with pytest.raises(PolicyConfigError, match="has no 'observation' setting: the observation is"):
        _ = config.observation
    with pytest.raises(PolicyConfigError, match="has no 't1d_config' setting"):
        config.t1d_config()
    with pytest.raises(PolicyConfigError) as err:
        parse_config({"twinloop/Elbow-v0": {}})
    assert plant.T1D_ID in str(err.value) and plant.KNEE_EXO_ID in str(err.value)


def test_the_shipped_knee_config_is_valid() -> None:
    config = load_config(shipped_config("knee_sac.yaml"))
    env = config.knee_config()
    assert config.algorithm == "sac" and config.torch_threads == 1
    assert env.patients == ("moderate",) and env.tasks == ("cyclic",)
    assert env.control_hz == 100 and env.normalized_action and env.action_limit_nm == 20


def test_the_training_env_is_the_native_knee_vector_env() -> None:
    env = make_training_env(parse_config(tiny()), n_envs=2)
    env.seed(4)
    obs = env.reset()
    assert obs.shape == (2, 7)
    ref = KneeExoEnv(config=parse_config(tiny()).knee_config())
    first, _ = ref.reset(seed=5, options={"patient": 1, "task": 0})  # sub-env 1: seed 4 + 1
    np.testing.assert_array_equal(obs[1], first)
    _, reward, _, infos = env.step(np.zeros((2, 1), np.float32))
    assert reward.shape == (2,) and "tracking_error_rad" in infos[0]


# --- training runs ------------------------------------------------------------------------


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from stable_baselines3 import SAC

    model = SAC.load(str(directory / "model.zip"), device="cpu")
    return {k: v.detach().numpy().copy() for k, v in model.policy.state_dict().items()}


def test_tiny_sac_run_writes_model_metadata_checkpoints_tensorboard(saved: Path) -> None:
    assert (saved / "model.zip").is_file()
    assert sorted(p.name for p in (saved / "checkpoints").glob("*.zip")) == [
        "model_200_steps.zip",
        "model_400_steps.zip",
    ]
    assert list((saved / "tb").rglob("events.out.tfevents.*"))
    meta = json.loads((saved / "policy.json").read_text())
    assert meta["env_id"] == plant.KNEE_EXO_ID and meta["task_family"] == "knee_exo"
    assert meta["env_layout_version"] == KNEE_LAYOUT_VERSION
    assert meta["control_hz"] == 100
    assert meta["action"]["normalized"] is True and meta["action"]["limit_nm"] == 20.0
    assert meta["observation"]["layout_version"] == KNEE_LAYOUT_VERSION
    assert len(meta["observation"]["names"]) == 7 and meta["observation"]["high"][2] == 150.0
    assert meta["env"]["patients"] == ["moderate", "mild"]
    assert meta["algorithm"] == "sac" and meta["seed"] == 0 and meta["timesteps"] == 400


def test_the_policy_torque_is_model_predict_on_the_envs_own_observation(saved: Path) -> None:
    ctrl = load_exo_policy(saved)
    assert isinstance(ctrl, ExoPolicyController)
    config = parse_config(tiny()).knee_config()
    env = KneeExoEnv(config=config)
    obs, info = env.reset(seed=11)
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = exo_input(obs, info["time_s"])
        np.testing.assert_array_equal(ctrl.observation(x), obs)  # bit for bit, float32
        action, _ = ctrl.model.predict(obs, deterministic=True)
        assert ctrl.torque(x) == pytest.approx(float(action[0]) * 20.0, rel=1e-6)
        a = action if rng.random() < 0.7 else rng.uniform(-1, 1, size=1).astype(np.float32)
        obs, _, term, trunc, info = env.step(a)
        if term or trunc:
            obs, info = env.reset()
    assert isinstance(ctrl.model.actor.features_extractor, KneeObservationScaler)


def test_inputs_are_clipped_like_the_env_and_missing_ones_handled(saved: Path) -> None:
    ctrl = load_exo_policy(saved)
    wild = ExoInput(0.0, 9.0, -80.0, -9.0, 33.0, 500.0, 7.0, -1.0)
    np.testing.assert_allclose(
        ctrl.observation(wild), [math.pi, -50.0, 150.0, 3.0, 0.0, -math.pi, 20.0], rtol=1e-6
    )
    assert ctrl.torque(ExoInput(0.0, math.nan, 0.0, 0.5, 0.0, 0.0, 0.1, 0.1)) == 0.0
    good = ExoInput(0.1, 0.4, 0.2, 0.5, 0.3, 1.5, 0.12, 0.04)
    tau = ctrl.torque(good)
    assert abs(tau) <= 20.0
    # no torque sensor: the previous command stands in; no EMG: the last reading
    obs = ctrl.observation(ExoInput(0.2, 0.4, 0.2, 0.5, 0.3, math.nan, math.nan, math.nan))
    assert obs is not None
    np.testing.assert_allclose(obs[2:5], [tau, 0.12, 0.04], rtol=1e-6)
    strict = load_exo_policy(saved, sensor_fallback=False)
    with pytest.raises(PolicyError, match="torque_sensor_nm, emg_quad"):
        strict.torque(ExoInput(0.0, 0.4, 0.2, 0.5, 0.3, math.nan, math.nan, 0.1))


def test_same_seed_same_weights_other_seed_other_weights(saved: Path, tmp_path: Path) -> None:
    config = parse_config(tiny(checkpoint_freq=0, tensorboard=False))
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", seeds=[1], progress=False)
    a = _weights(saved)
    b = _weights(tmp_path / "a" / "seed_0")
    c = _weights(tmp_path / "b" / "seed_1")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_tiny_ppo_run_on_the_knee(tmp_path: Path) -> None:
    doc = tiny(algorithm="ppo", n_steps=64, batch_size=64, n_epochs=1, checkpoint_freq=0)
    for key in ("learning_starts", "buffer_size"):
        del doc[plant.KNEE_EXO_ID][key]
    doc[plant.KNEE_EXO_ID]["env"]["normalized_action"] = False  # N·m: allowed, recorded
    (result,) = train(parse_config(doc), tmp_path, progress=False)
    ctrl = load_exo_policy(result.directory)
    assert ctrl.metadata["algorithm"] == "ppo"
    assert not ctrl.normalized_action and ctrl.torque_limit_nm == 20.0
    assert abs(ctrl.torque(ExoInput(0.0, 0.3, 0.0, 0.5, 0.1, 0.0, 0.1, 0.1))) <= 20.0


# --- loading: what is refused ---------------------------------------------------------------


def test_a_glucose_policy_is_refused_by_the_exo_loader_naming_both() -> None:
    with pytest.raises(PolicyConfigError) as err:
        load_exo_policy(GLUCOSE_COMMITTED)
    message = str(err.value)
    assert plant.T1D_ID in message and plant.KNEE_EXO_ID in message
    assert f"layout version {ENV_LAYOUT_VERSION}" in message
    assert f"layout version {KNEE_LAYOUT_VERSION}" in message


def test_a_knee_policy_is_refused_by_the_insulin_loader_naming_both(saved: Path) -> None:
    from twinloop.plant.glucose.patients import get_patient

    with pytest.raises(PolicyConfigError) as err:
        load_policy_controller(saved, get_patient("adult#001"))
    message = str(err.value)
    assert plant.T1D_ID in message and plant.KNEE_EXO_ID in message
    assert f"env layout version {KNEE_LAYOUT_VERSION}" in message
    assert f"env layout version {ENV_LAYOUT_VERSION}" in message
    assert "--therapy knee-exo" in message


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda m: m.update(env_layout_version=99), ["layout version 99", "retrain"]),
        (lambda m: m["observation"]["scale"].__setitem__(0, 1.0), ["observation layout"]),
        (lambda m: m["observation"].update(names=["a"] * 7), ["observation layout"]),
        (lambda m: m["action"].pop("normalized"), ["incomplete", "normalized"]),
        (lambda m: m["action"].update(normalized=False), ["model's spaces", "±20"]),
        (lambda m: m.update(env_id=plant.T1D_ID), [plant.T1D_ID, plant.KNEE_EXO_ID]),
    ],
    ids=["version", "scale", "names", "incomplete", "units-vs-model", "env-id"],
)
def test_incompatible_knee_metadata_is_refused(
    saved: Path, tmp_path: Path, change: Any, needles: list[str]
) -> None:
    d = copy_of(saved, tmp_path)
    edit_metadata(d, change)
    with pytest.raises(PolicyConfigError) as err:
        load_exo_policy(d)
    for needle in needles:
        assert needle in str(err.value)


def test_missing_files_and_another_control_rate_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match="no such file"):
        load_exo_policy(tmp_path / "nowhere")
    with pytest.raises(PolicyConfigError, match=r"control_hz=100.*200 Hz"):
        load_exo_policy(saved, control_hz=200)
    d = copy_of(saved, tmp_path)
    (d / "policy.pt").unlink()  # the SB3 archive alone needs pickle: refused unless trusted
    with pytest.raises(PolicyConfigError, match="needs pickle"):
        load_exo_policy(d)
    (d / "model.zip").unlink()
    with pytest.raises(PolicyConfigError, match="missing"):
        load_exo_policy(d)
    (d / "policy.json").write_text("{ nope")
    with pytest.raises(PolicyConfigError, match="not valid JSON"):
        load_exo_policy(d)


def test_a_copy_ships_the_path_not_the_model_and_acts_alike(saved: Path) -> None:
    ctrl = load_exo_policy(saved)
    blob = pickle.dumps(ctrl)
    assert b"torch" not in blob  # what a Ray actor receives: no torch module
    clone = pickle.loads(blob)
    x = ExoInput(1.0, 0.5, 0.1, 0.6, 0.2, 2.0, 0.1, 0.05)
    assert clone.torque(x) == ctrl.torque(x)


def test_a_normalized_knee_policy_loads_filtered_and_survives_pickling(tmp_path: Path) -> None:
    from twinloop.policies.zoo import FilteredPolicy

    with pytest.raises(PolicyConfigError, match=r"frame_stack: 2 is not supported .* 7 readings"):
        parse_config(tiny(frame_stack=2))
    doc = tiny(normalize=True, checkpoint_freq=0, tensorboard=False)
    (result,) = train(parse_config(doc), tmp_path, progress=False)
    ctrl = load_exo_policy(result.directory)
    assert isinstance(ctrl.model, FilteredPolicy)
    assert ctrl.model.filter.mean is not None
    clone = pickle.loads(pickle.dumps(ctrl))
    assert isinstance(clone.model, FilteredPolicy)
    x = ExoInput(1.0, 0.5, 0.1, 0.6, 0.2, 2.0, 0.1, 0.05)
    assert [clone.torque(x) for _ in range(3)] == [ctrl.torque(x) for _ in range(3)]


# --- Ray, CLI -----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.usefixtures("ray_started")
def test_knee_seeds_as_ray_tasks_match_in_process(saved: Path, tmp_path: Path) -> None:
    config = parse_config(tiny(checkpoint_freq=0, tensorboard=False, n_timesteps=200))
    results = train(config, tmp_path, seeds=[0, 1], workers=2, progress=False)
    assert [r.seed for r in results] == [0, 1]
    train(config, tmp_path / "inproc", seeds=[1], progress=False)
    a = _weights(tmp_path / "seed_1")
    b = _weights(tmp_path / "inproc" / "seed_1")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_cli_trains_a_knee_policy_and_prints_the_exo_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinloop.cli.main import main

    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(tiny(checkpoint_freq=0, tensorboard=False)))
    code = main(["train", str(cfg), "--out", str(tmp_path / "out"), "--timesteps", "200",
                 "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "--therapy knee-exo --patient moderate --controller policy:" in out
    assert (tmp_path / "out" / "seed_0" / "model.zip").is_file()


def test_cli_knee_config_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinloop.cli.main import main

    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(copy.deepcopy(tiny(reward="risk"))))
    assert main(["train", str(cfg), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinloop train: error: reward") and err.count("\n") == 1


# --- the committed policy -----------------------------------------------------------------


def _episode(preset: str, controller: Any, seed: int) -> float:
    env = KneeExoEnv(KneeExoConfig(patients=(preset,), tasks=(CyclicFlexionExtension(),)))
    obs, info = env.reset(seed=seed)
    if controller is None:
        from twinloop.policies.knee.controllers import AssistAsNeededController

        controller = AssistAsNeededController(period_s=float(env._batch.task[0][K_T]))
    err = []
    while True:
        tau = controller.torque(exo_input(obs, info["time_s"]))
        obs, _, term, trunc, info = env.step(np.array([tau], np.float32))
        err.append(info["tracking_error_rad"])
        assert not term
        if trunc:
            return math.degrees(float(np.sqrt(np.mean(np.square(err)))))


def test_the_committed_knee_policy_loads_and_tracks_better_than_impedance() -> None:
    ctrl = load_exo_policy(COMMITTED, control_hz=100)
    assert sorted(p.name for p in COMMITTED.iterdir()) == ["policy.json", "policy.pt"]
    shipped = yaml.safe_load(shipped_config("knee_sac.yaml").read_text())
    assert ctrl.metadata["config"] == shipped[plant.KNEE_EXO_ID]  # trained from it
    for preset in ("mild", "moderate"):
        policy = _episode(preset, ctrl, seed=3)
        impedance = _episode(preset, ImpedanceController(), seed=3)
        aan = _episode(preset, None, seed=3)
        assert policy < 0.7 * min(impedance, aan), (preset, policy, impedance, aan)


def test_the_committed_knee_policy_survives_pickling_into_another_process() -> None:
    """Its archive pickles a class path from before the move (policies.exo_learned): a copy sent
    to a Ray actor reloads it with the policy_kwargs rebuilt from policy.json, and acts the same."""
    import pickle

    from twinloop.policies.knee.controllers import ExoInput
    from twinloop.policies.saved import clear_model_cache

    ctrl = load_exo_policy(COMMITTED, control_hz=100)
    state = pickle.dumps(ctrl)
    clear_model_cache()  # as in a fresh process: the archive is read again
    copy = pickle.loads(state)
    assert copy.model is not ctrl.model
    obs = ExoInput(
        t_s=0.5, angle_rad=0.6, velocity_rad_s=0.2, torque_sensor_nm=1.0, emg_quad=0.1,
        emg_ham=0.05, reference_rad=0.7, reference_velocity_rad_s=0.3,
    )  # fmt: skip
    assert copy.torque(obs) == ctrl.torque(obs)
