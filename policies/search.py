"""Hyperparameter search with Optuna, RL Baselines3 Zoo's way (``twinloop train --optimize``).

As the Zoo's ``--optimize`` does: a study with the TPE sampler (``--sampler tpe``; ``random``
too) and the median pruner (``--pruner median``; ``none`` too), ``--n-trials`` trials of
``--n-timesteps`` steps each, ``--n-startup-trials`` random trials before TPE models the results
and before the pruner prunes, ``--n-evaluations`` evaluations per trial reported to the pruner.
Each trial trains the config with hyperparameters drawn from the algorithm's search space
(:func:`sample_ppo_params`, :func:`sample_sac_params`, after the Zoo's ``hyperparams_opt.py``
ranges) on the config's first seed.

The objective differs from the Zoo's mean episode reward: it is the **clinical score** of the
training's clinical evaluation (:mod:`twinloop.policies.glucose.clinical_eval`: the policy in the
loop, behind the supervisor, on the held-out patients and seeds of ``eval``): time in range
subject to time below 54 mg/dL ≤ ``eval.tbr54_limit_pct``. A trial's value is its best
evaluation's score; the pruner compares the scores at the same evaluation.

Outputs in ``OUT``: ``trial_<n>/seed_<s>/`` (each trial's policy, ``best/``, TensorBoard),
``trials.csv`` (number, state, value, the sampled hyperparameters), ``best_config.yaml`` (the
config with the best trial's hyperparameters, ready for ``twinloop train``).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from twinloop.extras import require
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.training import TrainingConfig, int_field, parse_config, train_one

#: Samplers and pruners by name (the Zoo's ``--sampler``, ``--pruner``).
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")


def sample_ppo_params(trial: Any, n_envs: int) -> dict[str, Any]:
    """PPO hyperparameters of one trial (ranges after the Zoo's ``sample_ppo_params``).

    ``batch_size`` is kept a divisor of the rollout (``n_steps × n_envs``).
    """
    n_steps = trial.suggest_categorical("n_steps", [32, 64, 128, 256, 512])
    batch_size = trial.suggest_categorical("batch_size", [64, 256, 512, 1024, 2048])
    params: dict[str, Any] = {
        "n_steps": n_steps,
        "batch_size": min(batch_size, n_steps * n_envs),
        "gamma": trial.suggest_categorical("gamma", [0.95, 0.98, 0.99, 0.995]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-3, log=True),
        "ent_coef": trial.suggest_float("ent_coef", 1e-8, 0.01, log=True),
        "clip_range": trial.suggest_categorical("clip_range", [0.1, 0.2, 0.3]),
        "n_epochs": trial.suggest_categorical("n_epochs", [5, 10, 20]),
        "gae_lambda": trial.suggest_categorical("gae_lambda", [0.9, 0.95, 0.98]),
        "max_grad_norm": trial.suggest_categorical("max_grad_norm", [0.5, 1.0, 2.0]),
        "vf_coef": trial.suggest_float("vf_coef", 0.2, 1.0),
    }
    params["policy_kwargs"] = _network(trial)
    return params


def sample_sac_params(trial: Any, n_envs: int) -> dict[str, Any]:
    """SAC hyperparameters of one trial (ranges after the Zoo's ``sample_sac_params``)."""
    del n_envs
    params: dict[str, Any] = {
        "gamma": trial.suggest_categorical("gamma", [0.95, 0.98, 0.99, 0.995]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-3, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256, 512]),
        "buffer_size": trial.suggest_categorical("buffer_size", [10_000, 100_000, 1_000_000]),
        "learning_starts": trial.suggest_categorical("learning_starts", [0, 1000, 10_000]),
        "train_freq": trial.suggest_categorical("train_freq", [1, 4, 8, 16]),
        "tau": trial.suggest_categorical("tau", [0.001, 0.005, 0.01, 0.02]),
    }
    params["gradient_steps"] = params["train_freq"]
    params["policy_kwargs"] = _network(trial)
    return params


def _network(trial: Any) -> dict[str, Any]:
    arch = trial.suggest_categorical("net_arch", ["small", "medium"])
    activation = trial.suggest_categorical("activation_fn", ["tanh", "relu"])
    return {
        "net_arch": {"small": [64, 64], "medium": [128, 128]}[arch],
        "activation_fn": activation,
    }


#: Search spaces by algorithm.
SEARCH_SPACES: dict[str, Callable[[Any, int], dict[str, Any]]] = {
    "ppo": sample_ppo_params,
    "sac": sample_sac_params,
}


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a search gave.

    Attributes:
        best_value: the best trial's clinical score (None: no trial completed).
        best_params: its sampled hyperparameters (Optuna's names and values).
        best_config: ``best_config.yaml``'s path (None: no trial completed).
        trials: one row per trial (``number``, ``state``, ``value``, the parameters).

    """

    best_value: float | None
    best_params: dict[str, Any]
    best_config: str | None
    trials: list[dict[str, Any]]


def _section_with(config: TrainingConfig, params: dict[str, Any]) -> dict[str, Any]:
    section = copy.deepcopy(config.source)
    policy_kwargs = {**config.policy_kwargs, **params.get("policy_kwargs", {})}
    section.update({k: v for k, v in params.items() if k != "policy_kwargs"})
    section["policy_kwargs"] = policy_kwargs
    section["algorithm"] = config.algorithm  # (it may have come from a Zoo file's name)
    return section


def optimize(
    config: TrainingConfig,
    out_dir: str | os.PathLike[str],
    *,
    n_trials: int,
    n_timesteps: int | None = None,
    n_evaluations: int = 2,
    n_startup_trials: int = 5,
    sampler: str = "tpe",
    pruner: str = "median",
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> SearchResult:
    """Search the algorithm's hyperparameters for the best clinical score (module docstring).

    Raises:
        PolicyConfigError: bad arguments, an algorithm without a search space, or a config
            whose clinical evaluation is off (``eval: false``: no objective).

    """
    optuna = require("optuna", extra="rl", what="twinloop train --optimize")
    n_trials = int_field("n_trials", n_trials, 1, 10_000)
    n_evaluations = int_field("n_evaluations", n_evaluations, 1, 1000)
    n_startup_trials = int_field("n_startup_trials", n_startup_trials, 0, 10_000)
    if sampler not in SAMPLERS:
        raise PolicyConfigError(f"sampler: {sampler!r} is not allowed: {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise PolicyConfigError(f"pruner: {pruner!r} is not allowed: {', '.join(PRUNERS)}")
    if config.algorithm not in SEARCH_SPACES:
        raise PolicyConfigError(
            f"algorithm: {config.algorithm!r} has no search space; {', '.join(SEARCH_SPACES)} have"
        )
    if not hasattr(config.task, "clinical_callback") or not config.task.eval.freq:
        raise PolicyConfigError(
            f"--optimize: {config.env_id} has no clinical evaluation in this config (eval: "
            "false, or a task family without one); the search's objective is its score"
        )
    steps = int_field("n_timesteps", n_timesteps or config.n_timesteps, 1)
    seed = config.seeds[0]
    eval_freq = max(steps // n_evaluations, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=(
            optuna.samplers.TPESampler(n_startup_trials=n_startup_trials, seed=seed)
            if sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=seed)
        ),
        pruner=(
            optuna.pruners.MedianPruner(
                n_startup_trials=n_startup_trials, n_warmup_steps=n_evaluations // 3
            )
            if pruner == "median"
            else optuna.pruners.NopPruner()
        ),
    )
    space = SEARCH_SPACES[config.algorithm]

    def objective(trial: Any) -> float:
        params = space(trial, config.n_envs)
        section = _section_with(config, params)
        eval_section = {**config.task.eval.describe(), "freq": eval_freq}
        if eval_section["patients"] is None:
            del eval_section["patients"]
        section["eval"] = eval_section
        trial_config = parse_config({config.env_id: section}, source=f"trial {trial.number}")
        trial_config = trial_config.replace(n_timesteps=steps, tensorboard=config.tensorboard)
        evaluations = 0
        pruned = False

        def on_evaluation(record: dict[str, float]) -> bool:
            nonlocal evaluations, pruned
            trial.report(record["score"], evaluations)
            evaluations += 1
            pruned = trial.should_prune()
            return not pruned

        directory = out / f"trial_{trial.number}" / f"seed_{seed}"
        result = train_one(
            trial_config, seed, directory, progress=progress, on_evaluation=on_evaluation
        )
        scores = [e["score"] for e in result.evaluations]
        state = "pruned" if pruned else "complete"
        best = max(scores) if scores else -math.inf
        report(
            f"trial {trial.number}: {state}, clinical score {best:.2f} after "
            f"{result.timesteps} steps ({result.seconds:.0f} s) -> {directory}"
        )
        if pruned:
            raise optuna.TrialPruned()
        return best

    study.optimize(objective, n_trials=n_trials, catch=())
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, **t.params})
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return SearchResult(None, {}, None, rows)
    best = study.best_trial
    fixed = optuna.trial.FixedTrial(best.params)
    section = _section_with(config, space(fixed, config.n_envs))
    path = out / "best_config.yaml"
    header = (
        f"# best of {len(study.trials)} trials of {steps} steps ({sampler} sampler, {pruner} "
        f"pruner): clinical score {best.value:.2f} (trial {best.number}); "
        "written by twinloop train --optimize\n"
    )
    path.write_text(header + yaml.safe_dump({config.env_id: section}, sort_keys=False))
    return SearchResult(best.value, dict(best.params), str(path), rows)
