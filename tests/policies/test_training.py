"""twinloop train: the configuration, tiny PPO/SAC runs, determinism, features, Ray, the CLI."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("stable_baselines3")

from twinloop import plant
from twinloop.agents.glucose.devices import PumpActuator
from twinloop.agents.messages import InsulinCommand
from twinloop.plant.glucose.insulin import IobTracker
from twinloop.plant.glucose.patients import get_patient
from twinloop.plant.glucose.pump import PumpSpec
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.features import ACTION_MODES, FEATURES
from twinloop.policies.glucose.interface import ControllerInput
from twinloop.policies.glucose.learned import LearnedPolicyController
from twinloop.policies.glucose.rewards import REWARDS
from twinloop.policies.saved import ALGORITHMS
from twinloop.policies.training import (
    load_config,
    make_training_env,
    parse_config,
    shipped_config,
    train,
)


def tiny(**overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "algorithm": "ppo",
        "policy": "MlpPolicy",
        "n_envs": 4,
        "n_timesteps": 512,
        "n_steps": 64,
        "batch_size": 64,
        "n_epochs": 2,
        "policy_kwargs": {"net_arch": [16, 16]},
        "env": {"patients": ["adult#001", "adult#002"], "episode_days": 0.25},
        "observation": {"cgm": 6, "iob": True, "meal": True, "clock": True},
        "action": "basal+meal_bolus",
        "reward": "risk",
        "seeds": [0],
        "checkpoint_freq": 256,
        "tensorboard": True,
    }
    section.update(overrides)
    return {plant.T1D_ID: section}


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"algorithm": "dqn"}, ALGORITHMS),
        ({"policy": "CnnPolicy"}, ("MlpPolicy",)),
        ({"observation": {"cgm": 4, "heart_rate": True}}, tuple(FEATURES)),
        ({"reward": "happiness"}, tuple(REWARDS)),
        ({"action": "insulin_pen"}, tuple(ACTION_MODES)),
        ({"action": {"mode": "bolus_only"}}, tuple(ACTION_MODES)),
    ],
    ids=["algorithm", "policy", "feature", "reward", "action", "action-mapping"],
)
def test_unknown_names_are_refused_listing_what_exists(
    overrides: dict[str, Any], names: tuple[str, ...]
) -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(**overrides))
    message = str(err.value)
    for name in names:
        assert name in message
    assert "unknown" in message


def test_unknown_hyperparameters_are_named_against_the_sb3_signature() -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(n_step=64, clip_rnge=0.2))
    message = str(err.value)
    assert "clip_rnge" in message and "n_step" in message
    assert "n_steps" in message  # what PPO takes
    with pytest.raises(PolicyConfigError, match="tau"):  # a SAC hyperparameter, not PPO's
        parse_config(tiny(tau=0.01))


def test_parse_config_sac_without_ppo_keys() -> None:
    doc = tiny(algorithm="sac", tau=0.01)
    for key in ("n_steps", "n_epochs"):
        del doc[plant.T1D_ID][key]
    config = parse_config(doc)
    assert config.algorithm == "sac" and config.hyperparameters["tau"] == 0.01


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        ({"n_envs": 0}, "n_envs", "from 1 to 1024"),
        ({"seeds": [0, -1]}, "seeds", "from 0 to 4294967295"),
        ({"observation": {"cgm": 0}}, "observation.cgm", "1..288"),
        ({"env": {"episode_days": -1}}, "env.episode_days", "0 < days"),
        ({"env": {"patients": ["adult#099"]}}, "adult#099", "adult#001"),
        ({"env": {"scenario": "buffet"}}, "env.scenario", "random"),
        (
            {"action": {"mode": "basal", "max_basal_multiplier": 0.5}},
            "max_basal_multiplier",
            "(1, 10]",
        ),
        ({"reward": {"name": "tir", "hypo_penalty": -1}}, "reward.hypo_penalty", "0..1000"),
        ({"reward": {"name": "tir", "hyperpenalty": 1}}, "hyperpenalty", "hypo_penalty"),
        ({"policy_kwargs": {"activation_fn": "sigmoid"}}, "activation_fn", "tanh"),
        ({"seed": 3}, "seed", "seeds"),
        ({"env": {"patient": "adult#001"}}, "patient", "patients"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(
    overrides: dict[str, Any], field: str, allowed: str
) -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(**overrides))
    assert field in str(err.value)
    assert allowed in str(err.value)


def test_wrong_env_id_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match=plant.T1D_ID):
        parse_config({"CartPole-v1": {}})
    with pytest.raises(PolicyConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("twinloop/T1D-v0: [unclosed\n")
    with pytest.raises(PolicyConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", ["t1d_ppo.yaml", "t1d_sac.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(shipped_config(name))
    assert config.observation.size > 0
    assert config.algorithm == name.split("_")[1].split(".")[0]


# --- features: the env and the loaded controller agree ---------------------------------------


def test_features_equal_between_env_and_controller() -> None:
    """The wrapper's observation equals the controller's for the same history, every step.

    The controller side gets exactly what the loop gives it: net IOB from the loop's
    ``IobTracker`` fed by the loop's pump (``PumpActuator``), the CGM reading and the announced
    carbs; random actions exercise suspension, high temps and meal boluses.
    """
    config = parse_config(tiny(env={"patients": ["adult#001", "adult#004"], "episode_days": 0.5}))
    keep = [0, 1, 2, 3, 4, 5, 6, 8, 9]  # a terminal observation's features but the meal (7)
    env = make_training_env(config, n_envs=2)
    env.seed(3)
    obs = env.reset()
    rng = np.random.default_rng(0)
    pump = PumpSpec()
    patients = [get_patient("adult#001"), get_patient("adult#004")]

    def fresh(i: int) -> tuple[LearnedPolicyController, IobTracker, PumpActuator]:
        p = patients[i]
        ctrl = LearnedPolicyController(None, config.observation, config.action, p)
        return ctrl, IobTracker(p.basal_u_per_h), PumpActuator(pump, p.basal_u_per_h)

    sides = [fresh(0), fresh(1)]
    meal = [0.0, 0.0]
    t = [0.0, 0.0]
    glucose = [float(obs[i][5]) * 100 + 120 for i in range(2)]
    info0 = env.unwrapped.reset_infos  # the SB3VecEnv: raw infos
    compared = resets = boluses = 0
    for i in range(2):
        meal[i] = float(info0[i]["meal_announced_g"])
        glucose[i] = float(info0[i]["cgm_mg_dl"])
    for _step in range(160):  # 144 steps per episode: crosses an autoreset
        for i in range(2):
            ctrl, iob, _ = sides[i]
            ci = ControllerInput(t[i], glucose[i], 0.0, iob.net_iob_u, meal[i])
            mine = ctrl.features(ci)
            assert mine is not None
            np.testing.assert_allclose(mine, obs[i], rtol=0, atol=1e-6)
            compared += 1
        actions = rng.uniform(-1.2, 1.2, size=(2, 1)).astype(np.float32)
        obs, _, dones, infos = env.step(actions)
        for i in range(2):
            ctrl, iob, actuator = sides[i]
            basal, bolus = env.last_doses[i]
            boluses += bolus > 0
            command = InsulinCommand(t[i], float(basal), float(bolus), 30.0)
            minutes = actuator.actuate(command, t[i], 5)
            for d in minutes:
                iob.record(d.total_u)
            if not dones[i]:  # (an ended episode's info is the next one's first)
                # the loop's pump delivered what the env's pump delivered
                assert math.isclose(
                    sum(d.total_u for d in minutes), float(infos[i]["insulin_u"]), abs_tol=1e-9
                )
            if dones[i]:
                resets += 1
                np.testing.assert_allclose(
                    ctrl.features(
                        ControllerInput(
                            t[i] + 5,
                            float(infos[i]["terminal_observation"][5]) * 100 + 120,
                            0.0,
                            iob.net_iob_u,
                            0.0,
                        )
                    )[keep],
                    infos[i]["terminal_observation"][keep],
                    atol=1e-5,
                )
                sides[i] = fresh(i)
                t[i] = 0.0
            else:
                t[i] += 5.0
            meal[i] = float(infos[i]["meal_announced_g"])
            glucose[i] = float(infos[i]["cgm_mg_dl"])
    assert compared == 320 and resets == 2 and boluses > 0


# --- training runs ------------------------------------------------------------------------


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from stable_baselines3 import PPO

    model = PPO.load(str(directory / "model.zip"), device="cpu")
    return {k: v.detach().numpy().copy() for k, v in model.policy.state_dict().items()}


def test_tiny_ppo_run_writes_model_checkpoints_tensorboard(tmp_path: Path) -> None:
    config = parse_config(tiny())
    (result,) = train(config, tmp_path, progress=False)
    d = Path(result.directory)
    assert d == tmp_path / "seed_0"
    assert (d / "model.zip").is_file() and (d / "policy.json").is_file()
    assert sorted(p.name for p in (d / "checkpoints").glob("*.zip")) == [
        "model_256_steps.zip",
        "model_512_steps.zip",
    ]
    (events,) = (d / "tb").rglob("events.out.tfevents.*")
    assert result.timesteps == 512
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "rollout/ep_rew_mean" in scalars  # episodes (72 steps) are monitored
    assert "train/loss" in scalars


def test_tiny_sac_run_writes_model_checkpoints_tensorboard(tmp_path: Path) -> None:
    doc = tiny(
        algorithm="sac",
        n_timesteps=200,
        learning_starts=40,
        batch_size=32,
        buffer_size=1000,
        checkpoint_freq=100,
        action="basal+scaled_meal_bolus",
        reward={"name": "tir", "hypo_penalty": 4},
    )
    for key in ("n_steps", "n_epochs"):
        del doc[plant.T1D_ID][key]
    (result,) = train(parse_config(doc), tmp_path, progress=False)
    d = Path(result.directory)
    assert (d / "model.zip").is_file()
    assert len(list((d / "checkpoints").glob("model_*_steps.zip"))) == 2
    assert list((d / "tb").rglob("events.out.tfevents.*"))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    config = parse_config(tiny(checkpoint_freq=0, tensorboard=False, n_timesteps=256))
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    train(config, tmp_path / "c", seeds=[1], progress=False)
    a = _weights(tmp_path / "a" / "seed_0")
    b = _weights(tmp_path / "b" / "seed_0")
    c = _weights(tmp_path / "c" / "seed_1")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_reward_registry_plugs_into_the_env() -> None:
    """A named reward reaches the env: tir gives exactly 1 in range, risk does not."""
    rewards = {}
    for name in ("risk", "tir"):
        env = make_training_env(parse_config(tiny(reward=name)), n_envs=2)
        env.seed(0)
        env.reset()
        _, r, _, infos = env.step(np.zeros((2, 1), dtype=np.float32))
        rewards[name] = r
        assert all(70 <= i["bg_mg_dl"] <= 180 for i in infos)
    np.testing.assert_array_equal(rewards["tir"], 1.0)
    assert np.all(rewards["risk"] < 1.0)


# --- Ray -------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.usefixtures("ray_started")
def test_two_seeds_as_ray_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_config(tiny(n_timesteps=256, checkpoint_freq=0, tensorboard=False))
    results = train(config, tmp_path, seeds=[0, 1], workers=2, progress=True)
    assert [r.seed for r in results] == [0, 1]
    bar = capsys.readouterr().err.rsplit("\r", 1)[-1]  # the bar's last state: both seeds
    assert "training (seeds on Ray)" in bar and "2/2" in bar and "seed" in bar
    for r in results:
        assert (Path(r.directory) / "model.zip").is_file()
    # a Ray task is the same computation as in process
    train(config, tmp_path / "inproc", seeds=[1], progress=False)
    a = _weights(tmp_path / "seed_1")
    b = _weights(tmp_path / "inproc" / "seed_1")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# --- CLI -------------------------------------------------------------------------------


def test_cli_trains_and_prints_where_and_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinloop.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(checkpoint_freq=0)))
    code = main(
        [
            "train",
            str(cfg),
            "--out",
            str(tmp_path / "out"),
            "--timesteps",
            "256",
            "--seed",
            "2",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert str(tmp_path / "out" / "seed_2") in out
    assert "--controller policy:" in out
    assert (tmp_path / "out" / "seed_2" / "model.zip").is_file()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (tiny(algorithm="a2c"), "ppo, sac"),
        (tiny(observation={"cgm": 3, "ketones": True}), "cgm, iob, meal, clock"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: dict[str, Any], needle: str
) -> None:
    from twinloop.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(copy.deepcopy(content)))
    code = main(["train", str(cfg), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("twinloop train: error: ") and err.count("\n") == 1
    assert needle in err
    assert "Traceback" not in err


def test_shipped_configs_are_found_by_name():
    assert load_config("knee_sac").env_id == "twinloop/KneeExo-v0"
    assert load_config("t1d_ppo") == load_config(shipped_config("t1d_ppo.yaml"))
    with pytest.raises(
        PolicyConfigError, match="nor a shipped config \\(knee_sac, t1d_ppo, t1d_sac\\)"
    ):
        load_config("no_such_config")
