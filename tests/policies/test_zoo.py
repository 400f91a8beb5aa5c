"""RL Zoo's hyperparameter format, the saved observation filter, the clinical evaluation."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from twinloop import plant
from twinloop.plant.glucose.patients import get_patient
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.learned import load_policy_controller
from twinloop.policies.training import make_training_env, parse_config, train
from twinloop.policies.zoo import FilteredPolicy, NormalizeSettings, parse_expression

from .test_training import tiny

# --- the format -----------------------------------------------------------------------------


def test_zoo_expressions_are_read_without_evaluation() -> None:
    text = (
        "dict(log_std_init=-2, ortho_init=False, activation_fn=nn.ReLU, "
        "net_arch=dict(pi=[256, 256], vf=[256, 256]))"
    )
    assert parse_expression(text, "policy_kwargs") == {
        "log_std_init": -2,
        "ortho_init": False,
        "activation_fn": "relu",
        "net_arch": {"pi": [256, 256], "vf": [256, 256]},
    }
    assert parse_expression("{'norm_obs': True, 'norm_reward': False}", "normalize") == {
        "norm_obs": True,
        "norm_reward": False,
    }
    assert parse_expression("dict(activation_fn=th.nn.Tanh)", "p") == {"activation_fn": "tanh"}


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "dict(net_arch=open('x'))",
        "dict(n=1 + 2)",
        "nn.Module",
        "dict(**kw)",
        "os.system",
        "[x for x in y]",
    ],
)
def test_zoo_expressions_refuse_code(text: str) -> None:
    with pytest.raises(PolicyConfigError, match=r"policy_kwargs: .* is not allowed"):
        parse_config(tiny(policy_kwargs=text))


def test_a_zoo_section_is_accepted() -> None:
    config = parse_config(
        tiny(
            n_timesteps=1e3,
            normalize="{'norm_obs': True, 'norm_reward': False}",
            policy_kwargs="dict(net_arch=[32, 32], activation_fn=nn.Tanh)",
            learning_rate="lin_3e-4",
            clip_range="lin_0.2",
            frame_stack=2,
        )
    )
    assert config.n_timesteps == 1000
    assert config.normalize == NormalizeSettings(norm_obs=True, norm_reward=False)
    assert config.policy_kwargs == {"net_arch": [32, 32], "activation_fn": "tanh"}
    assert config.frame_stack == 2
    assert parse_config(tiny(normalize=True)).normalize == NormalizeSettings()
    assert parse_config(tiny(normalize=False)).normalize is None


def test_a_zoo_file_with_other_envs_named_after_its_algorithm(tmp_path: Path) -> None:
    import yaml

    from twinloop.policies.training import load_config

    section = tiny(tau=0.01, learning_starts=10)[plant.T1D_ID]
    for key in ("algorithm", "n_steps", "n_epochs"):
        del section[key]
    zoo = {"Pendulum-v1": {"n_timesteps": 20000, "policy": "MlpPolicy"}, plant.T1D_ID: section}
    (tmp_path / "sac.yml").write_text(yaml.safe_dump(zoo))
    config = load_config(tmp_path / "sac.yml")
    assert config.env_id == plant.T1D_ID and config.algorithm == "sac"
    # a twinloop setting at the top level (mis-indented) is refused, not silently ignored
    for stray in ({"frame_stack": 4}, {"eval": {"freq": 10}}, {"Pendulum-v1": 3}):
        (tmp_path / "bad.yml").write_text(yaml.safe_dump({**zoo, **stray}))
        with pytest.raises(PolicyConfigError, match="is not an environment's section"):
            load_config(tmp_path / "bad.yml")
    (tmp_path / "ppo.yml").write_text(yaml.safe_dump({"Pendulum-v1": {}, "CartPole-v1": {}}))
    with pytest.raises(PolicyConfigError, match="one top-level key"):
        load_config(tmp_path / "ppo.yml")


def test_zoo_action_noise_reaches_sac(tmp_path: Path) -> None:
    from stable_baselines3 import SAC
    from stable_baselines3.common.noise import NormalActionNoise

    sac = {"algorithm": "sac", "n_timesteps": 64, "learning_starts": 16, "batch_size": 16}
    quiet = {"checkpoint_freq": 0, "tensorboard": False, "eval": False}
    doc = tiny(noise_type="normal", noise_std=0.2, **sac, **quiet)
    doc[plant.T1D_ID] = {
        k: v for k, v in doc[plant.T1D_ID].items() if k not in ("n_steps", "n_epochs")
    }
    config = parse_config(doc)
    assert config.action_noise == ("normal", 0.2)
    for bad, needle in (({"noise_type": "pink"}, "pink"), ({"noise_std": -1}, "noise_std")):
        with pytest.raises(PolicyConfigError, match=needle):
            parse_config({plant.T1D_ID: {**doc[plant.T1D_ID], **bad}})
    (result,) = train(config, tmp_path, progress=False)
    model = SAC.load(str(Path(result.directory) / "model.zip"), device="cpu")  # our own file
    noise = model.action_noise.base_noise  # SB3 wraps it in one VecNoise for the n_envs
    assert isinstance(noise, NormalActionNoise)
    np.testing.assert_allclose(noise._sigma, [0.2])


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"env_wrapper": "gymnasium.wrappers.TimeAwareObservation"}, ["env_wrapper", "native"]),
        ({"callback": "rl_zoo3.callbacks.ParallelTrainCallback"}, ["callback", "not supported"]),
        ({"normalize": "{'norm_obs': True, 'norm_rewards': False}"}, ["norm_rewards", "norm_obs"]),
        ({"normalize": "yes"}, ["normalize", "is not allowed"]),
        ({"learning_rate": "lin_fast"}, ["learning_rate", "lin_<number>"]),
        ({"gamma": "lin_0.99"}, ["gamma", "learning_rate, clip_range"]),
        ({"frame_stack": 0}, ["frame_stack", "1 to 64"]),
        ({"eval": {"every": 10}}, ["eval", "every", "freq, patients"]),
        ({"eval": {"patients": ["adult#099"]}}, ["adult#099"]),
        ({"zoo_key": 1}, ["zoo_key", "n_steps", "normalize", "frame_stack"]),
        (
            {"policy_kwargs": "dict(net_arch=[8], colour=1)"},
            ["policy_kwargs", "colour", "ortho_init"],
        ),
        ({"noise_type": "normal", "noise_std": 0.1}, ["noise_type", "PPO takes no action noise"]),
    ],
)
def test_zoo_keys_refused_in_one_line(overrides: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(PolicyConfigError) as err:
        parse_config(tiny(**overrides))
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# --- normalize + frame_stack: trained, saved, replayed in the loop ---------------------------


def test_normalized_stacked_policy_sees_in_the_loop_what_it_saw_in_training(
    tmp_path: Path,
) -> None:
    doc = tiny(
        normalize="{'norm_obs': True, 'norm_reward': False}",
        frame_stack=3,
        checkpoint_freq=0,
        tensorboard=False,
        eval=False,
    )
    config = parse_config(doc)
    (result,) = train(config, tmp_path, progress=False)
    d = Path(result.directory)
    meta = json.loads((d / "policy.json").read_text())
    filt = meta["observation_filter"]
    size = config.observation.size
    assert filt["size"] == size and filt["frame_stack"] == 3
    assert len(filt["normalize"]["mean"]) == size
    assert (d / "vecnormalize.pkl").is_file()

    controller = load_policy_controller(d, get_patient("adult#001"))
    assert isinstance(controller.model, FilteredPolicy)
    # the training chain (VecNormalize with the saved statistics, frozen; VecFrameStack)
    from stable_baselines3.common.vec_env import VecNormalize, unwrap_vec_normalize

    env = make_training_env(config, n_envs=1)
    normalize = unwrap_vec_normalize(env)
    assert normalize is not None
    saved = VecNormalize.load(str(d / "vecnormalize.pkl"), normalize.venv)
    normalize.obs_rms, normalize.training = saved.obs_rms, False
    env.seed(4)
    obs = env.reset()
    controller.model.reset()
    rng = np.random.default_rng(1)
    for _ in range(40):  # within one episode (72 steps)
        raw = np.asarray(normalize.get_original_obs())[0]
        mine = controller.model.filter(raw)
        np.testing.assert_allclose(mine, np.asarray(obs)[0], rtol=0, atol=1e-6)
        obs, _, dones, _ = env.step(rng.uniform(-1, 1, size=(1, 1)).astype(np.float32))
        assert not dones.any()
    frame = controller.model.filter.size
    assert np.any(mine[:frame] != mine[-frame:])  # three different frames, oldest first


# --- the clinical evaluation callback ---------------------------------------------------------


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = directory.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith("clinical/")
    }


def test_clinical_callback_logs_to_tensorboard_and_keeps_the_best(tmp_path: Path) -> None:
    """Two evaluations in the real loop (one patient, one day), written as TensorBoard scalars."""
    doc = tiny(checkpoint_freq=0, eval={"freq": 256, "patients": ["adult#001"], "seeds": [7]})
    (result,) = train(parse_config(doc), tmp_path, progress=False)
    d = Path(result.directory)
    scalars = _scalars(d / "tb")
    for tag in (
        "clinical/time_in_range_pct",
        "clinical/time_below_70_pct",
        "clinical/time_below_54_pct",
        "clinical/supervisor_overrides",
        "clinical/score",
    ):
        assert [step for step, _ in scalars[tag]] == [256, 512], tag
    tir = [v for _, v in scalars["clinical/time_in_range_pct"]]
    assert all(0 <= v <= 100 for v in tir)
    history = json.loads((d / "evaluations.json").read_text())
    assert [h["timesteps"] for h in history] == [256, 512]
    best = json.loads((d / "best" / "clinical.json").read_text())
    assert best["score"] == max(h["score"] for h in history)
    assert result.clinical is not None and result.clinical["score"] == best["score"]
    # the kept policy loads and runs as any saved policy
    controller = load_policy_controller(d / "best", get_patient("adult#001"))
    assert controller.metadata["timesteps"] == best["timesteps"]


def test_the_evaluation_does_not_change_the_trained_weights(tmp_path: Path) -> None:
    from .test_training import _weights

    for name, section in (("off", False), ("on", {"freq": 128, "patients": ["adult#001"]})):
        doc = tiny(checkpoint_freq=0, tensorboard=False, n_timesteps=256, eval=section)
        train(parse_config(doc), tmp_path / name, progress=False)
    assert (tmp_path / "on" / "seed_0" / "best").is_dir()
    off, on = _weights(tmp_path / "off" / "seed_0"), _weights(tmp_path / "on" / "seed_0")
    for key in off:
        np.testing.assert_array_equal(off[key], on[key])


def test_the_best_is_chosen_by_the_clinical_criterion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIR decides among policies within the TBR54 limit; one above it loses to them."""
    from twinloop.evaluation.glucose import evaluate as evaluation

    outcomes = iter(
        [
            (80.0, 0.5),  # 128 steps: feasible, the best so far
            (92.0, 2.5),  # 256: more time in range but 2.5 % below 54: not kept
            (85.0, 0.9),  # 384: feasible and better: kept
            (84.0, 0.0),  # 512: feasible, lower TIR: not kept
        ]
    )
    calls: list[str] = []

    def fake(policy_dir: Any, *args: Any, **kw: Any) -> dict[str, float]:
        calls.append(str(policy_dir))
        assert (Path(policy_dir) / "policy.pt").is_file()
        tir, tbr54 = next(outcomes)
        return {
            "time_in_range_pct": tir,
            "time_below_70_pct": tbr54 + 1,
            "time_below_54_pct": tbr54,
            "supervisor_overrides": 3.0,
            "patient_runs": 1.0,
        }

    monkeypatch.setattr(evaluation, "policy_loop_metrics", fake)
    doc = tiny(checkpoint_freq=0, tensorboard=False, eval={"freq": 128, "tbr54_limit_pct": 1})
    (result,) = train(parse_config(doc), tmp_path, progress=False)
    assert len(calls) == 4
    best = json.loads((tmp_path / "seed_0" / "best" / "clinical.json").read_text())
    assert best["timesteps"] == 384 and best["time_in_range_pct"] == 85.0
    meta = json.loads((tmp_path / "seed_0" / "best" / "policy.json").read_text())
    assert meta["timesteps"] == 384
    assert [e["score"] for e in result.evaluations] == [80.0, 92.0 - 150.0, 85.0, 84.0]


# --- hyperparameter search (Optuna) -----------------------------------------------------------


def test_optimize_from_the_cli_at_tiny_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two real trials (training + clinical evaluation in the loop); the best config trains."""
    import csv

    import yaml

    from twinloop.cli.main import main
    from twinloop.policies.training import load_config

    cfg = tmp_path / "c.yaml"
    doc = tiny(checkpoint_freq=0, tensorboard=False, eval={"patients": ["adult#001"]})
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "opt"
    argv = ["train", str(cfg), "--optimize", "--n-trials", "2", "--n-timesteps", "256"]
    code = main([*argv, "--n-startup-trials", "1", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "trial 0: complete" in printed and "trial 1: complete" in printed
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert {"n_steps", "learning_rate", "gamma", "net_arch"} <= set(rows[0])
    best = max(rows, key=lambda r: float(r["value"]))
    config = load_config(out / "best_config.yaml")
    assert config.hyperparameters["n_steps"] == int(best["n_steps"])
    assert config.hyperparameters["gamma"] == float(best["gamma"])
    assert (out / f"trial_{best['number']}" / "seed_0" / "best" / "policy.pt").is_file()


def test_optimize_prunes_a_trial_below_the_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twinloop.evaluation.glucose import evaluate as evaluation
    from twinloop.policies.search import optimize

    calls: list[str] = []

    def fake(policy_dir: Any, *args: Any, **kw: Any) -> dict[str, float]:
        trial = Path(policy_dir).parts[-4]  # OUT/trial_<n>/seed_0/eval/step_<k>
        calls.append(trial)
        tir = 90.0 if trial == "trial_0" else 50.0
        return {
            "time_in_range_pct": tir,
            "time_below_70_pct": 0.0,
            "time_below_54_pct": 0.0,
            "supervisor_overrides": 0.0,
            "patient_runs": 1.0,
        }

    monkeypatch.setattr(evaluation, "policy_loop_metrics", fake)
    config = parse_config(tiny(checkpoint_freq=0, tensorboard=False))
    lines: list[str] = []
    result = optimize(
        config,
        tmp_path,
        n_trials=2,
        n_timesteps=384,
        n_evaluations=3,
        n_startup_trials=1,
        progress=False,
        report=lines.append,
    )
    assert [r["state"] for r in result.trials] == ["COMPLETE", "PRUNED"]
    assert result.best_value == 90.0
    # trial 1 stopped at its second evaluation (the first is the pruner's warm-up: 3 // 3)
    assert calls.count("trial_1") == 2 and calls.count("trial_0") >= 3
    assert "trial 1: pruned" in lines[1]


def test_optimize_needs_the_clinical_evaluation(tmp_path: Path) -> None:
    from twinloop.policies.search import optimize

    with pytest.raises(PolicyConfigError, match="no clinical evaluation"):
        optimize(parse_config(tiny(eval=False)), tmp_path, n_trials=1)


@pytest.mark.parametrize(
    ("patients", "message"),
    [
        ([], "eval.patients: [] is not allowed"),
        (5, "eval.patients: 5 is not allowed"),
        ([1, 2], "eval.patients: [1, 2] is not allowed"),
        (["adult#999"], "eval.patients: unknown name 'adult#999'"),
    ],
)
def test_eval_patients_must_be_names(patients: object, message: str) -> None:
    from twinloop.policies.glucose.clinical_eval import EvalSettings

    with pytest.raises(PolicyConfigError, match=re.escape(message)):
        EvalSettings.parse({"patients": patients})
    assert EvalSettings.parse({"patients": ["adults"]}).patients == ("adults",)
