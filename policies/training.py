"""Training policies with stable-baselines3 from a YAML configuration (``twinloop train``).

The configuration file follows RL Baselines3 Zoo's hyperparameter files: the environment id is
the top-level key, holding ``n_envs``, ``n_timesteps``, ``policy``, ``policy_kwargs`` and the
algorithm's constructor arguments, plus twinloop's own keys (:data:`COMMON_KEYS` and the keys of
the env's *task family*; every key is documented in ``docs/training.md``)::

    twinloop/T1D-v0:
      algorithm: ppo
      policy: MlpPolicy
      n_envs: 64
      n_timesteps: 1000000
      n_steps: 256            # a PPO hyperparameter, checked against PPO's signature
      env: {patients: [adults], episode_days: 1}
      observation: {cgm: 12, iob: true, meal: true}
      action: basal+meal_bolus
      reward: risk
      seeds: [0]

Each env id belongs to a task family (:data:`TASK_FAMILIES`) that parses its own keys, builds
the SB3 vector env and writes its part of ``policy.json``:

* ``twinloop/T1D-v0`` — :class:`GlucoseTask` (``env``, ``observation``, ``action``,
  ``reward``): insulin policies, loaded by
  :func:`twinloop.policies.glucose.learned.load_policy_controller`;
* ``twinloop/KneeExo-v0`` — :class:`KneeExoTask` (``env``: the fields of
  :class:`~twinloop.plant.knee.env_core.KneeExoConfig`): exoskeleton torque policies on the env's
  own observation, action and reward, loaded by
  :func:`twinloop.policies.knee.learned.load_exo_policy`. The glucose keys are refused for it.

:func:`load_config` validates everything once and returns a :class:`TrainingConfig`;
:func:`train` trains one policy per seed (in process, or as Ray tasks) and saves each in its
own directory (``seed_<s>/``: ``policy.pt`` and ``policy.json``, loaded without pickle;
``model.zip``, SB3's archive to resume training, never loaded unless trusted; ``checkpoints/``,
``tb/``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import yaml
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecFrameStack,
    VecNormalize,
    unwrap_vec_normalize,
)
from tqdm import tqdm

from twinloop.limits import (
    MAX_CONFIG_BYTES,
    MAX_SEED,
    InputLimitError,
    check_document,
    read_text,
)
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.saved import (
    ALGORITHMS,
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILE,
    WEIGHTS_FILE,
    algorithm_class,
    twinloop_version,
    write_weights,
)
from twinloop.policies.zoo import (
    SCHEDULE_KEYS,
    UNSUPPORTED_ZOO_KEYS,
    NormalizeSettings,
    make_action_noise,
    make_filter,
    parse_action_noise,
    parse_frame_stack,
    parse_normalize,
    parse_policy_kwargs,
    parse_schedule,
    schedule,
)

#: Policies a flat feature vector can feed.
POLICIES = ("MlpPolicy",)
#: Keys of a config that are twinloop's, not the algorithm's, in every task family.
COMMON_KEYS = (
    "algorithm",
    "policy",
    "policy_kwargs",
    "n_envs",
    "n_timesteps",
    "normalize",
    "frame_stack",
    "noise_type",
    "noise_std",
    "seeds",
    "checkpoint_freq",
    "tensorboard",
    "output_dir",
    "torch_threads",
)
#: Constructor arguments twinloop sets itself (refused in a config).
RESERVED_HYPERPARAMETERS = (
    "policy",
    "env",
    "seed",
    "device",
    "tensorboard_log",
    "verbose",
    "action_noise",
    "_init_setup_model",
    "policy_kwargs",
)
#: Activation functions ``policy_kwargs.activation_fn`` may name.
ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu", "silu")


class TaskFamily(Protocol):
    """An RL task family: one environment id's own settings (a therapy's ``training_family``).

    Class attributes: ``env_id`` (the Gymnasium id), ``family`` (its name in ``policy.json``),
    ``keys`` (its own top-level keys), ``reserved_policy_kwargs`` (``policy_kwargs`` entries
    twinloop sets), ``refusal_hint`` (what to say when another family's keys are given);
    optionally ``unsupported_keys`` (common keys it refuses, with the reason) and, on the task,
    ``clinical_callback(directory, save_policy, n_envs, on_evaluation)`` (the evaluation during
    training that ``--optimize`` needs).
    ``parse(section) -> task``; a task has ``make_vec_env(n_envs) -> VecEnv``,
    ``policy_kwargs(kwargs) -> dict``, ``callbacks() -> list``, ``metadata() -> dict`` (its part
    of ``policy.json``) and ``run_command(directory) -> str``.
    """

    env_id: ClassVar[str]
    family: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    reserved_policy_kwargs: ClassVar[tuple[str, ...]]
    refusal_hint: ClassVar[str | None]

    @classmethod
    def parse(cls, s: Mapping[str, Any]) -> Any:
        """The family's settings from a config section (only its keys are read)."""
        ...


def task_families() -> dict[str, Any]:
    """The task families by env id: each therapy's policies part's ``training_family``."""
    from twinloop.therapy import therapies

    found: dict[str, Any] = {}
    for therapy in therapies():
        if therapy.has("policies"):
            family = getattr(therapy.part("policies"), "training_family", None)
            if family is not None:
                found[family.env_id] = family
    return found


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """A validated training configuration (see the module docstring and ``docs/training.md``).

    Attributes:
        env_id: Gymnasium id (``twinloop/T1D-v0`` or ``twinloop/KneeExo-v0``).
        algorithm: ``ppo`` or ``sac``.
        policy: ``MlpPolicy``.
        n_envs: parallel sub-environments of the vector env.
        normalize: the Zoo's ``normalize`` (``VecNormalize`` arguments), or None.
        frame_stack: the Zoo's ``frame_stack`` (``VecFrameStack``), or None.
        action_noise: the Zoo's ``noise_type`` and ``noise_std`` (SAC's exploration noise added
            to its actions), or None.
        n_timesteps: environment steps per seed.
        hyperparameters: keyword arguments of the algorithm's constructor.
        policy_kwargs: ``policy_kwargs`` of the constructor (``activation_fn`` by name).
        task: the env family's settings (a :class:`TaskFamily`'s ``parse``).
        seeds: one policy is trained per seed.
        checkpoint_freq: environment steps between checkpoints (0 = none).
        tensorboard: write TensorBoard logs.
        output_dir: where ``seed_<s>/`` directories go (relative to the working directory).
        torch_threads: torch intra-op threads of an in-process run (Ray tasks use 1).
        source: the YAML section as read (stored in the metadata).

    """

    env_id: str
    algorithm: str
    policy: str
    n_envs: int
    n_timesteps: int
    normalize: NormalizeSettings | None
    frame_stack: int | None
    action_noise: tuple[str, float] | None
    hyperparameters: dict[str, Any]
    policy_kwargs: dict[str, Any]
    task: Any
    seeds: tuple[int, ...]
    checkpoint_freq: int
    tensorboard: bool
    output_dir: str
    torch_threads: int
    source: dict[str, Any]

    @property
    def family(self) -> str:
        """The task family: ``glucose`` or ``knee_exo``."""
        return self.task.family

    def __getattr__(self, name: str) -> Any:
        """The family's own settings, reachable on the config (``config.observation``).

        Raises:
            PolicyConfigError: the family has no such setting (says what it has instead).

        """
        task = self.__dict__.get("task")
        if name.startswith("_") or task is None:
            raise AttributeError(name)
        if hasattr(task, name):
            return getattr(task, name)
        hint = type(task).refusal_hint or f"its keys are {', '.join(type(task).keys)}"
        raise PolicyConfigError(f"{self.env_id} has no {name!r} setting: {hint}")

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with fields changed (``seeds``, ``n_timesteps``, ``output_dir`` …)."""
        return dataclasses.replace(self, **changes)


#: Ranges of the config's counts (docs/training.md): parallel envs, steps, checkpoint period,
#: torch threads, seeds.
MAX_N_ENVS = 1024
MAX_TIMESTEPS = 10**10
MAX_TORCH_THREADS = 256
MAX_SEEDS = 1000
#: Ranges of SB3's integer hyperparameters (memory grows with them: the rollout buffer holds
#: ``n_steps × n_envs`` steps, SAC's replay buffer ``buffer_size``).
HYPERPARAMETER_RANGES: dict[str, tuple[int, int]] = {
    "n_steps": (1, 100_000),
    "batch_size": (1, 1_000_000),
    "n_epochs": (1, 1000),
    "buffer_size": (1, 10_000_000),
    "learning_starts": (0, MAX_TIMESTEPS),
    "gradient_steps": (-1, 10_000),
    "train_freq": (1, 1_000_000),
    "target_update_interval": (1, 1_000_000),
    "sde_sample_freq": (-1, 1_000_000),
}
#: Most steps one rollout holds (``n_steps × n_envs``).
MAX_ROLLOUT_STEPS = 10_000_000


def int_field(name: str, value: object, minimum: int, maximum: int = MAX_TIMESTEPS) -> int:
    """``value`` as an integer in ``[minimum, maximum]`` (YAML ``1e6`` too), or a refusal."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e6 in YAML
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise PolicyConfigError(
            f"{name}: {value!r} is not allowed: an integer from {minimum} to {maximum}"
        )
    return value


def _policy_kwargs(value: object) -> dict[str, Any]:
    value = parse_policy_kwargs(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyConfigError(
            f"policy_kwargs: {value!r} is not allowed: a mapping such as "
            "{net_arch: [64, 64], activation_fn: tanh}, or the Zoo's string "
            '"dict(net_arch=[64, 64], activation_fn=nn.Tanh)" (read, never evaluated)'
        )
    out = {str(k): v for k, v in value.items()}
    act = out.get("activation_fn")
    if act is not None and act not in ACTIVATIONS:
        raise PolicyConfigError(
            f"policy_kwargs.activation_fn: {act!r} is not allowed: one of {', '.join(ACTIVATIONS)}"
        )
    return out


def _torch_policy_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    out = dict(kwargs)
    act = out.get("activation_fn")
    if isinstance(act, str):
        out["activation_fn"] = {
            "tanh": torch.nn.Tanh,
            "relu": torch.nn.ReLU,
            "elu": torch.nn.ELU,
            "leaky_relu": torch.nn.LeakyReLU,
            "silu": torch.nn.SiLU,
        }[act]
    return out


def _check_policy_kwargs(algorithm: str, policy: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse ``policy_kwargs`` keys the policy class does not take (one line, listing them)."""
    cls = algorithm_class(algorithm).policy_aliases[policy]
    own = ("self", "observation_space", "action_space", "lr_schedule")
    allowed = [k for k in inspect.signature(cls.__init__).parameters if k not in own]
    if unknown := sorted(set(kwargs) - set(allowed)):
        raise PolicyConfigError(
            f"policy_kwargs: unknown key(s) {', '.join(unknown)}; {policy} of {algorithm} "
            f"({cls.__name__}) takes {', '.join(allowed)}"
        )


def _check_hyperparameters(
    algorithm: str, params: Mapping[str, Any], twinloop_keys: Sequence[str] = COMMON_KEYS
) -> None:
    cls = algorithm_class(algorithm)
    signature = inspect.signature(cls.__init__).parameters
    allowed = [k for k in signature if k != "self" and k not in RESERVED_HYPERPARAMETERS]
    reserved = sorted(set(params) & set(RESERVED_HYPERPARAMETERS))
    if reserved:
        raise PolicyConfigError(
            f"{', '.join(reserved)}: set by twinloop train, not in the config "
            "(seeds: the seeds key; device: cpu; tensorboard_log: the tensorboard key; "
            "action_noise: noise_type and noise_std)"
        )
    if unknown := sorted(set(params) - set(allowed)):
        raise PolicyConfigError(
            f"unknown hyperparameter(s) of {algorithm}: {', '.join(unknown)}; {cls.__name__} "
            f"takes {', '.join(allowed)} (and twinloop's keys {', '.join(twinloop_keys)})"
        )
    for key, value in params.items():
        default = signature[key].default
        is_schedule = isinstance(value, str) and value.startswith("lin_")
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        if numeric and key not in HYPERPARAMETER_RANGES and not is_schedule and wrong:
            raise PolicyConfigError(f"{key}: {value!r} is not allowed: a number")
    for key, (low, high) in HYPERPARAMETER_RANGES.items():
        if key in params and not (key == "train_freq" and isinstance(params[key], list)):
            int_field(key, params[key], low, high)
    for key, v in params.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise PolicyConfigError(f"{key}: {v!r} is not allowed: a finite number")
    for key, v in params.items():
        if isinstance(v, str) and (key in SCHEDULE_KEYS or v.startswith("lin_")):
            parse_schedule(key, v)


def parse_config(
    document: object, *, source: str = "config", algorithm: str | None = None
) -> TrainingConfig:
    """Validate a parsed YAML document (``{env_id: {...}}``) into a :class:`TrainingConfig`.

    As in an RL Zoo hyperparameter file (``hyperparams/ppo.yml``), the document may hold other
    environments' sections too: the one twinloop environment id among its keys is used.
    ``algorithm`` is the default of the section's ``algorithm`` key (a Zoo file's name).

    Raises:
        PolicyConfigError: anything unknown or out of range; the message names the key, the
            value and what is allowed.

    """
    families = task_families()
    ids = ", ".join(families)
    if isinstance(document, Mapping) and len(document) > 1:
        ours = [k for k in document if k in families]
        if len(ours) == 1:
            # the others must look like other environments' sections: a setting at the top
            # level (a mis-indented ``frame_stack: 4``) would otherwise be ignored silently
            settings = {*COMMON_KEYS, *families[ours[0]].keys}
            for key, value in document.items():
                if key != ours[0] and (key in settings or not isinstance(value, Mapping)):
                    raise PolicyConfigError(
                        f"{source}: top-level key {key!r} is not an environment's section; "
                        f"a setting belongs under {ours[0]}:"
                    )
            document = {ours[0]: document[ours[0]]}
    if not isinstance(document, Mapping) or len(document) != 1:
        raise PolicyConfigError(
            f"{source}: expected one top-level key, the environment id ({ids}), "
            "holding the settings"
        )
    ((env_id, section),) = document.items()
    if isinstance(section, Mapping):
        for key, why in UNSUPPORTED_ZOO_KEYS.items():
            if key in section and section[key] is not None:
                raise PolicyConfigError(f"{key}: {section[key]!r} is not supported: {why}")
    if env_id not in families:
        raise PolicyConfigError(
            f"{source}: unknown environment id {env_id!r}; environments are {ids}"
        )
    family = families[env_id]
    if not isinstance(section, Mapping):
        raise PolicyConfigError(f"{env_id}: expected a mapping of settings, got {section!r}")
    s = {str(k): v for k, v in section.items()}
    foreign = [
        k
        for other_id, other in families.items()
        if other_id != env_id
        for k in other.keys
        if k in s and k not in family.keys
    ]
    if foreign:
        raise PolicyConfigError(
            f"{', '.join(dict.fromkeys(foreign))}: not settings of {env_id} (they belong to "
            f"another task family's env); remove them: {_family_hint(env_id)}"
        )
    twinloop_keys = COMMON_KEYS + family.keys
    algorithm = str(s.get("algorithm", algorithm or "ppo")).lower()
    algorithm_class(algorithm)
    policy = s.get("policy", "MlpPolicy")
    if policy not in POLICIES:
        raise PolicyConfigError(
            f"policy: unknown policy {policy!r}; policies are {', '.join(POLICIES)} "
            "(the observation is a flat feature vector)"
        )
    hyper = {k: v for k, v in s.items() if k not in twinloop_keys}
    _check_hyperparameters(algorithm, hyper, twinloop_keys)
    seeds_value = s.get("seeds", [0])
    if isinstance(seeds_value, int) and not isinstance(seeds_value, bool):
        seeds_value = [seeds_value]
    if not isinstance(seeds_value, list) or not 1 <= len(seeds_value) <= MAX_SEEDS:
        raise PolicyConfigError(
            f"seeds: {str(seeds_value)[:60]} is not allowed: a list of 1 to {MAX_SEEDS} "
            f"integers from 0 to {MAX_SEED}"
        )
    seeds = tuple(int_field("seeds", v, 0, MAX_SEED) for v in seeds_value)
    if len(set(seeds)) != len(seeds):
        raise PolicyConfigError(f"seeds: {seeds_value!r} is not allowed: each seed once")
    for key, why in getattr(family, "unsupported_keys", {}).items():
        if s.get(key) not in (None, False, 1):
            raise PolicyConfigError(f"{key}: {s[key]!r} is not supported for {env_id}: {why}")
    task = family.parse(s)
    tb = s.get("tensorboard", True)
    if not isinstance(tb, bool):
        raise PolicyConfigError(f"tensorboard: {tb!r} is not allowed: true or false")
    out = s.get("output_dir", "runs/train")
    if not isinstance(out, str) or not out:
        raise PolicyConfigError(f"output_dir: {out!r} is not allowed: a directory path")
    policy_kwargs = _policy_kwargs(s.get("policy_kwargs"))
    taken = sorted(set(family.reserved_policy_kwargs) & set(policy_kwargs))
    if taken:
        raise PolicyConfigError(
            f"policy_kwargs.{taken[0]}: set by twinloop train for {env_id} (its fixed "
            "observation normalisation)"
        )
    _check_policy_kwargs(algorithm, str(policy), policy_kwargs)
    n_envs = int_field("n_envs", s.get("n_envs", 16), 1, MAX_N_ENVS)
    n_steps = hyper.get("n_steps")
    if isinstance(n_steps, int) and n_steps * n_envs > MAX_ROLLOUT_STEPS:
        raise PolicyConfigError(
            f"n_steps: {n_steps} × n_envs {n_envs} is more than the {MAX_ROLLOUT_STEPS} steps "
            "a rollout may hold"
        )
    return TrainingConfig(
        env_id=env_id,
        algorithm=algorithm,
        policy=str(policy),
        n_envs=n_envs,
        n_timesteps=int_field("n_timesteps", s.get("n_timesteps", 100_000), 1),
        normalize=parse_normalize(s.get("normalize")),
        frame_stack=parse_frame_stack(s.get("frame_stack")),
        action_noise=parse_action_noise(s.get("noise_type"), s.get("noise_std"), algorithm),
        hyperparameters=hyper,
        policy_kwargs=policy_kwargs,
        task=task,
        seeds=seeds,
        checkpoint_freq=int_field("checkpoint_freq", s.get("checkpoint_freq", 0), 0),
        tensorboard=tb,
        output_dir=out,
        torch_threads=int_field("torch_threads", s.get("torch_threads", 1), 1, MAX_TORCH_THREADS),
        source=json.loads(json.dumps(s, default=str)),
    )


def _family_hint(env_id: str) -> str:
    family = task_families()[env_id]
    if family.refusal_hint:
        return str(family.refusal_hint)
    return f"{env_id} takes {', '.join(COMMON_KEYS + family.keys)}"


def load_config(path: str | os.PathLike[str]) -> TrainingConfig:
    """Read and validate a training configuration file (YAML), or a shipped one by name.

    ``path`` may name a configuration of ``policies/configs/`` (``t1d_ppo``, ``knee_sac``) when
    no such file exists.

    Raises:
        PolicyConfigError: the file is missing, not YAML, or its content is not allowed.

    """
    p = Path(path)
    if not p.exists() and p.name == str(path) and not p.suffix:  # a bare name: a shipped config
        shipped = shipped_config(f"{p.name}.yaml")
        if not shipped.is_file():
            names = ", ".join(sorted(c.stem for c in shipped.parent.glob("*.yaml")))
            raise PolicyConfigError(f"{path}: no such config file, nor a shipped config ({names})")
        p = shipped
    try:
        text = read_text(p, MAX_CONFIG_BYTES, str(path))
    except InputLimitError as exc:
        raise PolicyConfigError(str(exc)) from None
    try:
        document = yaml.safe_load(text)
        check_document(document, str(path))
    except yaml.YAMLError as exc:
        raise PolicyConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    except InputLimitError as exc:
        raise PolicyConfigError(str(exc)) from None
    # a Zoo file is named after its algorithm (ppo.yml, sac.yml)
    default = p.stem.lower() if p.stem.lower() in ALGORITHMS else None
    return parse_config(document, source=str(path), algorithm=default)


def shipped_config(name: str = "t1d_ppo.yaml") -> Path:
    """Path of a configuration shipped with twinloop (``policies/configs/``)."""
    return Path(__file__).resolve().parent / "configs" / name


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """One trained seed.

    Attributes:
        seed: the seed.
        directory: the saved policy's directory.
        timesteps: environment steps collected.
        seconds: wall time of building and training, s.
        clinical: the best clinical evaluation (``best/clinical.json``), or None without one.
        evaluations: every clinical evaluation, in order.

    """

    seed: int
    directory: str
    timesteps: int
    seconds: float
    clinical: dict[str, float] | None = None
    evaluations: tuple[dict[str, float], ...] = ()


def make_training_env(config: TrainingConfig, n_envs: int | None = None) -> VecEnv:
    """The SB3 vector env of ``config``: the family's native vector env → SB3VecEnv → ….

    Glucose: T1D vector env → SB3VecEnv → features
    (:class:`~twinloop.policies.glucose.features.FeatureVecEnv`);
    knee: KneeExo vector env → SB3VecEnv (the env's own observation and action). The adapter
    keeps the episode returns and lengths that SB3 logs (``rollout/ep_rew_mean``), of the raw
    reward. Then, as RL Zoo orders them, ``VecNormalize`` (``normalize``) and ``VecFrameStack``
    (``frame_stack``).
    """
    env = config.task.make_vec_env(n_envs or config.n_envs)
    if config.normalize is not None:
        env = VecNormalize(env, **config.normalize.kwargs(algorithm_gamma(config)))
    if config.frame_stack is not None:
        env = VecFrameStack(env, config.frame_stack)
    return env


def algorithm_gamma(config: TrainingConfig) -> float:
    """The discount factor of the run (the config's ``gamma``, else the algorithm's default)."""
    if "gamma" in config.hyperparameters:
        return float(config.hyperparameters["gamma"])
    default = inspect.signature(algorithm_class(config.algorithm).__init__).parameters["gamma"]
    return float(default.default)


def observation_filter(config: TrainingConfig, env: VecEnv) -> dict[str, Any] | None:
    """``policy.json``'s ``observation_filter``: the frozen normalisation and the frame stack."""
    if config.normalize is None and config.frame_stack is None:
        return None
    normalize = unwrap_vec_normalize(env)
    base = normalize.venv if normalize is not None else env
    if isinstance(env, VecFrameStack):
        base = env.venv if normalize is None else base
    size = int(math.prod(base.observation_space.shape or (1,)))
    return make_filter(size, normalize, config.frame_stack).describe()


def policy_metadata(config: TrainingConfig, seed: int, timesteps: int) -> dict[str, Any]:
    """The ``policy.json`` of a saved policy (read by the therapies' ``learned`` modules)."""
    return {
        "format": METADATA_FORMAT,
        "twinloop_version": twinloop_version(),
        "env_id": config.env_id,
        "task_family": config.family,
        **config.task.metadata(),
        "algorithm": config.algorithm,
        "policy": config.policy,
        "seed": seed,
        "timesteps": timesteps,
        "model_file": WEIGHTS_FILE,
        "config": config.source,
    }


def train_one(
    config: TrainingConfig,
    seed: int,
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
    torch_threads: int | None = None,
    on_evaluation: Callable[[dict[str, float]], bool] | None = None,
) -> TrainResult:
    """Train one policy with ``seed`` and save it in ``directory`` (see :func:`train`).

    ``on_evaluation`` gets each clinical evaluation's record; ``False`` stops training (the
    hyperparameter search's pruning, :mod:`twinloop.policies.search`).
    """
    import torch

    started = time.perf_counter()
    torch.set_num_threads(torch_threads or config.torch_threads)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    env = make_training_env(config)
    cls = algorithm_class(config.algorithm)
    hyper = {k: schedule(v) for k, v in config.hyperparameters.items()}
    if config.action_noise is not None:
        hyper["action_noise"] = make_action_noise(*config.action_noise, env.action_space.shape)
    model = cls(
        config.policy,
        env,
        seed=seed,
        device="cpu",
        verbose=0,
        tensorboard_log=str(out / "tb") if config.tensorboard else None,
        policy_kwargs=config.task.policy_kwargs(_torch_policy_kwargs(config.policy_kwargs)) or None,
        **hyper,
    )
    callbacks: list[BaseCallback] = config.task.callbacks()
    if config.checkpoint_freq:
        callbacks.append(
            CheckpointCallback(
                save_freq=max(config.checkpoint_freq // config.n_envs, 1),
                save_path=str(out / "checkpoints"),
                name_prefix="model",
            )
        )

    def save_policy(model: Any, directory: Path, timesteps: int) -> None:
        _save_policy(config, seed, model, env, directory, timesteps)

    make_clinical = getattr(config.task, "clinical_callback", None)
    clinical = (
        make_clinical(out, save_policy, config.n_envs, on_evaluation)
        if callable(make_clinical)
        else None
    )
    if clinical is not None:
        callbacks.append(clinical)
    if progress:
        callbacks.append(_TqdmCallback(config.n_timesteps, f"seed {seed}"))
    try:
        model.learn(total_timesteps=config.n_timesteps, callback=callbacks, tb_log_name="run")
    finally:
        model.logger.close()  # TensorBoard's writer thread ends with it
    model.save(str(out / MODEL_FILE))  # to resume training; loading uses the weights
    normalize = unwrap_vec_normalize(env)
    if normalize is not None:  # the Zoo's file, to resume training (pickle: never loaded here)
        normalize.save(str(out / "vecnormalize.pkl"))
    _save_policy(config, seed, model, env, out, int(model.num_timesteps))
    env.close()
    best = None
    if clinical is not None and clinical.best_timesteps is not None:
        best = next(r for r in clinical.history if r["timesteps"] == clinical.best_timesteps)
    return TrainResult(
        seed,
        str(out),
        int(model.num_timesteps),
        time.perf_counter() - started,
        best,
        tuple(clinical.history) if clinical is not None else (),
    )


def _save_policy(
    config: TrainingConfig, seed: int, model: Any, env: VecEnv, out: Path, timesteps: int
) -> None:
    """Write ``policy.pt`` and ``policy.json`` (with the observation filter) into ``out``."""
    meta = policy_metadata(config, seed, timesteps)
    filt = observation_filter(config, env)
    if filt is not None:
        meta["observation_filter"] = filt
    write_weights(model.policy, config.algorithm, out, meta)
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


class _TqdmCallback(BaseCallback):
    """Progress bar over environment steps (tqdm), as an SB3 callback."""

    def __init__(self, total: int, desc: str) -> None:
        super().__init__()
        self._total, self._desc = total, desc
        self._bar: tqdm[Any] | None = None

    def _on_training_start(self) -> None:
        self._bar = tqdm(total=self._total, desc=self._desc, unit="step", unit_scale=True)

    def _on_step(self) -> bool:
        if self._bar is not None:
            self._bar.update(self.model.num_timesteps - self._bar.n)
        return True

    def _on_training_end(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _seed_dir(root: Path, seed: int) -> Path:
    return root / f"seed_{seed}"


def train(
    config: TrainingConfig,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    timesteps: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> list[TrainResult]:
    """Train one policy per seed; each goes to ``<out_dir>/seed_<s>/``.

    Args:
        config: the validated configuration.
        out_dir: output directory (default ``config.output_dir``).
        seeds: override the config's seeds.
        timesteps: override ``n_timesteps``.
        workers: run the seeds as Ray tasks (``num_cpus=1``, torch 1 thread each) on the
            Ray session of this process, started by the caller (``twinloop train`` starts an
            embedded one with this many CPUs, or connects to ``address``, with
            :func:`twinloop.agents.placement.start_ray`); ``None`` = one after another in this
            process.
        address: ``HOST:PORT`` of an existing Ray cluster (implies Ray; the caller connects).
        progress: show a tqdm progress bar (in-process runs).

    Raises:
        PolicyConfigError: bad overrides, or Ray asked for but not started.

    """
    if seeds is not None:
        config = config.replace(seeds=tuple(int_field("seed", s, 0) for s in seeds))
    if timesteps is not None:
        config = config.replace(n_timesteps=int_field("timesteps", timesteps, 1))
    if workers is not None:
        int_field("workers", workers, 1)
    root = Path(out_dir if out_dir is not None else config.output_dir)
    if workers is None and address is None:
        return [train_one(config, s, _seed_dir(root, s), progress=progress) for s in config.seeds]
    import ray

    if not ray.is_initialized():
        raise PolicyConfigError(
            "workers/address: Ray is not started in this process; start it first "
            "(twinloop.agents.placement.start_ray, as twinloop train does)"
        )
    task = ray.remote(num_cpus=1)(_train_task)
    refs = [task.remote(config, s, str(_seed_dir(root.resolve(), s))) for s in config.seeds]
    # a bar over seeds (a task reports only when its seed is trained); average rate, no
    # smoothing: the seeds run side by side, so the first result sets the pace
    results: dict[Any, TrainResult] = {}
    pending = list(refs)
    with tqdm(
        total=len(refs), desc="training (seeds on Ray)", unit="seed", smoothing=0.0,
        disable=not progress,
    ) as bar:  # fmt: skip
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[ref] = ray.get(ref)
                bar.update(1)
    return [results[ref] for ref in refs]


def _train_task(config: TrainingConfig, seed: int, directory: str) -> TrainResult:
    import numba

    numba.set_num_threads(1)  # one CPU per task: the compiled env step too
    return train_one(config, seed, directory, progress=False, torch_threads=1)
