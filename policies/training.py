"""Training insulin policies with stable-baselines3 from a YAML configuration (``twinloop train``).

The configuration file follows RL Baselines3 Zoo's hyperparameter files: the environment id is
the top-level key, holding ``n_envs``, ``n_timesteps``, ``policy``, ``policy_kwargs`` and the
algorithm's constructor arguments, plus twinloop's own keys (:data:`TWINLOOP_KEYS`; every key
is documented in ``docs/training.md``)::

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

:func:`load_config` validates everything once and returns a :class:`TrainingConfig`;
:func:`train` trains one policy per seed (in process, or as Ray tasks) and saves each in its
own directory (``seed_<s>/``: ``model.zip``, ``policy.json``, ``checkpoints/``, ``tb/``) that
:func:`policies.learned.load_policy_controller` loads as a loop controller.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import gymnasium as gym
import yaml
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.vec_env import VecMonitor
from tqdm import tqdm

import plant
from plant.envs.t1d_core import T1DConfig
from plant.errors import PlantError
from plant.patients import expand_names
from plant.pump import PumpSpec
from plant.scenarios import SCENARIOS, CarbCountingError
from policies.errors import PolicyConfigError
from policies.features import (
    ENV_LAYOUT_VERSION,
    ActionLayout,
    FeatureVecEnv,
    ObservationLayout,
)
from policies.learned import METADATA_FILE, METADATA_FORMAT, MODEL_FILE
from policies.rewards import make_reward, parse_reward

#: Algorithms by name (stable-baselines3 classes, imported lazily).
ALGORITHMS = ("ppo", "sac")
#: Policies a flat feature vector can feed.
POLICIES = ("MlpPolicy",)
#: Keys of a config that are twinloop's, not the algorithm's.
TWINLOOP_KEYS = (
    "algorithm",
    "policy",
    "policy_kwargs",
    "n_envs",
    "n_timesteps",
    "env",
    "observation",
    "action",
    "reward",
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
    "_init_setup_model",
    "policy_kwargs",
)
#: Keys of the ``env`` section.
ENV_KEYS = ("patients", "sample_patient", "episode_days", "scenario", "carb_error")
#: Activation functions ``policy_kwargs.activation_fn`` may name.
ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu", "silu")


def algorithm_class(name: str) -> type[Any]:
    """The stable-baselines3 class of ``name`` (``ppo`` or ``sac``)."""
    from stable_baselines3 import PPO, SAC

    classes: dict[str, type[Any]] = {"ppo": PPO, "sac": SAC}
    if name not in classes:
        raise PolicyConfigError(
            f"algorithm: unknown algorithm {name!r}; algorithms are {', '.join(ALGORITHMS)}"
        )
    return classes[name]


def _version() -> str:
    try:
        return importlib_metadata.version("twinloop")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """The training environment (``env`` section).

    Attributes:
        patients: patient and cohort names (``adults``, ``adult#001`` …); sub-environment ``i``
            gets patient ``i mod len(patients)`` unless ``sample_patient``.
        sample_patient: draw a patient at every episode start instead.
        episode_days: episode length, days (truncation).
        scenario: meal scenario name (``random`` or ``A``).
        carb_error: carbohydrate-counting error of the announcements (default uniform ±30 %,
            the loop's default).

    """

    patients: tuple[str, ...] = ("adults",)
    sample_patient: bool = False
    episode_days: float = 1.0
    scenario: str = "random"
    carb_error: CarbCountingError = dataclasses.field(
        default_factory=lambda: CarbCountingError("uniform", 0.3)
    )

    def __post_init__(self) -> None:
        try:
            expand_names(self.patients, field="env.patients")
        except PlantError as exc:
            raise PolicyConfigError(str(exc)) from None
        if self.scenario not in SCENARIOS:
            raise PolicyConfigError(
                f"env.scenario: {self.scenario!r} is not allowed: one of {', '.join(SCENARIOS)}"
            )
        d = self.episode_days
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 30:
            raise PolicyConfigError(f"env.episode_days: {d!r} is not allowed: 0 < days <= 30")

    @classmethod
    def parse(cls, value: object) -> EnvSettings:
        """From YAML ``env`` (``carb_error: 0.3`` or ``{kind: normal, magnitude: 0.2}``)."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise PolicyConfigError(f"env: {value!r} is not allowed: a mapping of {ENV_KEYS}")
        unknown = sorted(set(map(str, value)) - set(ENV_KEYS))
        if unknown:
            raise PolicyConfigError(
                f"env: unknown key(s) {', '.join(unknown)}; keys are {', '.join(ENV_KEYS)}"
            )
        kwargs: dict[str, Any] = {}
        if "patients" in value:
            p = value["patients"]
            kwargs["patients"] = (p,) if isinstance(p, str) else tuple(map(str, p))
        if "sample_patient" in value:
            if not isinstance(value["sample_patient"], bool):
                raise PolicyConfigError(
                    f"env.sample_patient: {value['sample_patient']!r} is not allowed: true/false"
                )
            kwargs["sample_patient"] = value["sample_patient"]
        for key in ("episode_days", "scenario"):
            if key in value:
                kwargs[key] = value[key]
        if "carb_error" in value:
            kwargs["carb_error"] = _carb_error(value["carb_error"])
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "patients": list(self.patients),
            "sample_patient": self.sample_patient,
            "episode_days": self.episode_days,
            "scenario": self.scenario,
            "carb_error": {"kind": self.carb_error.kind, "magnitude": self.carb_error.magnitude},
        }


def _carb_error(value: object) -> CarbCountingError:
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return CarbCountingError("uniform", float(value)) if value else CarbCountingError()
        if isinstance(value, Mapping):
            return CarbCountingError(**{str(k): v for k, v in value.items()})
    except (PlantError, TypeError) as exc:
        raise PolicyConfigError(f"env.carb_error: {value!r} is not allowed: {exc}") from None
    raise PolicyConfigError(
        f"env.carb_error: {value!r} is not allowed: a fraction (uniform) or "
        "{kind: none|uniform|normal, magnitude: FRACTION}"
    )


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """A validated training configuration (see the module docstring and ``docs/training.md``).

    Attributes:
        env_id: Gymnasium id (``twinloop/T1D-v0``).
        algorithm: ``ppo`` or ``sac``.
        policy: ``MlpPolicy``.
        n_envs: parallel sub-environments of the vector env.
        n_timesteps: environment steps per seed (5 min of patient time each).
        hyperparameters: keyword arguments of the algorithm's constructor.
        policy_kwargs: ``policy_kwargs`` of the constructor (``activation_fn`` by name).
        env: the environment.
        observation: the features.
        action: the action mapping.
        reward: reward name (:data:`policies.rewards.REWARDS`).
        reward_params: the reward's parameters.
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
    hyperparameters: dict[str, Any]
    policy_kwargs: dict[str, Any]
    env: EnvSettings
    observation: ObservationLayout
    action: ActionLayout
    reward: str
    reward_params: dict[str, Any]
    seeds: tuple[int, ...]
    checkpoint_freq: int
    tensorboard: bool
    output_dir: str
    torch_threads: int
    source: dict[str, Any]

    def t1d_config(self) -> T1DConfig:
        """The ``twinloop/T1D-v0`` configuration the features and actions need."""
        pump = PumpSpec()
        return T1DConfig(
            patients=self.env.patients,
            sample_patient=self.env.sample_patient,
            scenario=self.env.scenario,
            carb_error=self.env.carb_error,
            episode_days=self.env.episode_days,
            pump=pump,
            max_basal_u_per_h=pump.max_basal_u_per_h,
            bolus_action=self.action.has_bolus,
            max_bolus_u=pump.max_bolus_u,
            history_len=self.observation.cgm_history,
            include_iob=False,
            include_meal=True,
            iob_peak_min=self.observation.iob_peak_min,
            iob_dia_min=self.observation.iob_dia_min,
            reward_fn=make_reward(self.reward, self.reward_params),
        )

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with fields changed (``seeds``, ``n_timesteps``, ``output_dir`` …)."""
        return dataclasses.replace(self, **changes)


def _int_field(name: str, value: object, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e6 in YAML
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyConfigError(f"{name}: {value!r} is not allowed: an integer >= {minimum}")
    return value


def _policy_kwargs(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyConfigError(
            f"policy_kwargs: {value!r} is not allowed: a mapping such as "
            "{net_arch: [64, 64], activation_fn: tanh} (strings are not evaluated)"
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


def _schedule(value: Any) -> Any:
    """Zoo's ``lin_<x>``: a rate decaying linearly from ``x`` to 0 over training."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])

        def rate(progress_remaining: float) -> float:
            return progress_remaining * start

        return rate
    return value


def _check_hyperparameters(algorithm: str, params: Mapping[str, Any]) -> None:
    cls = algorithm_class(algorithm)
    signature = inspect.signature(cls.__init__).parameters
    allowed = [k for k in signature if k != "self" and k not in RESERVED_HYPERPARAMETERS]
    reserved = sorted(set(params) & set(RESERVED_HYPERPARAMETERS))
    if reserved:
        raise PolicyConfigError(
            f"{', '.join(reserved)}: set by twinloop train, not in the config "
            "(seeds: the seeds key; device: cpu; tensorboard_log: the tensorboard key)"
        )
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PolicyConfigError(
            f"unknown hyperparameter(s) of {algorithm}: {', '.join(unknown)}; {cls.__name__} "
            f"takes {', '.join(allowed)} (and twinloop's keys {', '.join(TWINLOOP_KEYS)})"
        )
    for key in ("learning_rate",):
        v = params.get(key)
        if isinstance(v, str) and not v.startswith("lin_"):
            raise PolicyConfigError(
                f"{key}: {v!r} is not allowed: a number or lin_<number> (linear decay)"
            )


def parse_config(document: object, *, source: str = "config") -> TrainingConfig:
    """Validate a parsed YAML document (``{env_id: {...}}``) into a :class:`TrainingConfig`.

    Raises:
        PolicyConfigError: anything unknown or out of range; the message names the key, the
            value and what is allowed.

    """
    if not isinstance(document, Mapping) or len(document) != 1:
        raise PolicyConfigError(
            f"{source}: expected one top-level key, the environment id ({plant.T1D_ID}), "
            "holding the settings"
        )
    ((env_id, section),) = document.items()
    if env_id != plant.T1D_ID:
        raise PolicyConfigError(
            f"{source}: unknown environment id {env_id!r}; environments are {plant.T1D_ID}"
        )
    if not isinstance(section, Mapping):
        raise PolicyConfigError(f"{env_id}: expected a mapping of settings, got {section!r}")
    s = {str(k): v for k, v in section.items()}
    algorithm = str(s.get("algorithm", "ppo")).lower()
    algorithm_class(algorithm)
    policy = s.get("policy", "MlpPolicy")
    if policy not in POLICIES:
        raise PolicyConfigError(
            f"policy: unknown policy {policy!r}; policies are {', '.join(POLICIES)} "
            "(the observation is a flat feature vector)"
        )
    hyper = {k: v for k, v in s.items() if k not in TWINLOOP_KEYS}
    _check_hyperparameters(algorithm, hyper)
    seeds_value = s.get("seeds", [0])
    if isinstance(seeds_value, int) and not isinstance(seeds_value, bool):
        seeds_value = [seeds_value]
    if not isinstance(seeds_value, list) or not seeds_value:
        raise PolicyConfigError(f"seeds: {seeds_value!r} is not allowed: a list of integers >= 0")
    seeds = tuple(_int_field("seeds", v, 0) for v in seeds_value)
    if len(set(seeds)) != len(seeds):
        raise PolicyConfigError(f"seeds: {seeds_value!r} is not allowed: each seed once")
    reward, reward_params = parse_reward(s.get("reward", "risk"))
    tb = s.get("tensorboard", True)
    if not isinstance(tb, bool):
        raise PolicyConfigError(f"tensorboard: {tb!r} is not allowed: true or false")
    out = s.get("output_dir", "runs/train")
    if not isinstance(out, str) or not out:
        raise PolicyConfigError(f"output_dir: {out!r} is not allowed: a directory path")
    return TrainingConfig(
        env_id=env_id,
        algorithm=algorithm,
        policy=str(policy),
        n_envs=_int_field("n_envs", s.get("n_envs", 16), 1),
        n_timesteps=_int_field("n_timesteps", s.get("n_timesteps", 100_000), 1),
        hyperparameters=hyper,
        policy_kwargs=_policy_kwargs(s.get("policy_kwargs")),
        env=EnvSettings.parse(s.get("env")),
        observation=ObservationLayout.parse(
            s.get("observation", {"cgm": 12, "iob": True, "meal": True})
        ),
        action=ActionLayout.parse(s.get("action", "basal+meal_bolus")),
        reward=reward,
        reward_params=reward_params,
        seeds=seeds,
        checkpoint_freq=_int_field("checkpoint_freq", s.get("checkpoint_freq", 0), 0),
        tensorboard=tb,
        output_dir=out,
        torch_threads=_int_field("torch_threads", s.get("torch_threads", 1), 1),
        source=json.loads(json.dumps(s, default=str)),
    )


def load_config(path: str | os.PathLike[str]) -> TrainingConfig:
    """Read and validate a training configuration file (YAML).

    Raises:
        PolicyConfigError: the file is missing, not YAML, or its content is not allowed.

    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    return parse_config(document, source=str(path))


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

    """

    seed: int
    directory: str
    timesteps: int
    seconds: float


def make_training_env(config: TrainingConfig, n_envs: int | None = None) -> VecMonitor:
    """The SB3 vector env of ``config``: native T1D vector env → SB3VecEnv → features → monitor.

    :class:`~stable_baselines3.common.vec_env.VecMonitor` adds the episode returns and lengths
    that SB3 logs (``rollout/ep_rew_mean`` in TensorBoard).
    """
    from policies.sb3_vec_env import SB3VecEnv

    venv = gym.make_vec(
        config.env_id,
        num_envs=n_envs or config.n_envs,
        vectorization_mode="vector_entry_point",
        autoreset_mode="same_step",
        config=config.t1d_config(),
    )
    return VecMonitor(FeatureVecEnv(SB3VecEnv(venv), config.observation, config.action))


def policy_metadata(config: TrainingConfig, seed: int, timesteps: int) -> dict[str, Any]:
    """The ``policy.json`` of a saved policy (see :mod:`policies.learned`)."""
    return {
        "format": METADATA_FORMAT,
        "twinloop_version": _version(),
        "env_id": config.env_id,
        "env_layout_version": ENV_LAYOUT_VERSION,
        "control_period_min": config.t1d_config().control_period_min,
        "observation": config.observation.describe(),
        "action": config.action.describe(),
        "reward": {"name": config.reward, "params": config.reward_params},
        "algorithm": config.algorithm,
        "policy": config.policy,
        "seed": seed,
        "timesteps": timesteps,
        "model_file": MODEL_FILE,
        "env": config.env.describe(),
        "config": config.source,
    }


def train_one(
    config: TrainingConfig,
    seed: int,
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
    torch_threads: int | None = None,
) -> TrainResult:
    """Train one policy with ``seed`` and save it in ``directory`` (see :func:`train`)."""
    import torch

    started = time.perf_counter()
    torch.set_num_threads(torch_threads or config.torch_threads)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    env = make_training_env(config)
    cls = algorithm_class(config.algorithm)
    hyper = {k: _schedule(v) for k, v in config.hyperparameters.items()}
    model = cls(
        config.policy,
        env,
        seed=seed,
        device="cpu",
        verbose=0,
        tensorboard_log=str(out / "tb") if config.tensorboard else None,
        policy_kwargs=_torch_policy_kwargs(config.policy_kwargs) or None,
        **hyper,
    )
    callbacks: list[BaseCallback] = []
    if config.checkpoint_freq:
        callbacks.append(
            CheckpointCallback(
                save_freq=max(config.checkpoint_freq // config.n_envs, 1),
                save_path=str(out / "checkpoints"),
                name_prefix="model",
            )
        )
    if progress:
        callbacks.append(_TqdmCallback(config.n_timesteps, f"seed {seed}"))
    model.learn(total_timesteps=config.n_timesteps, callback=callbacks, tb_log_name="run")
    model.save(str(out / MODEL_FILE))
    meta = policy_metadata(config, seed, int(model.num_timesteps))
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    env.close()
    return TrainResult(seed, str(out), int(model.num_timesteps), time.perf_counter() - started)


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
            :func:`agents.placement.start_ray`); ``None`` = one after another in this process.
        address: ``HOST:PORT`` of an existing Ray cluster (implies Ray; the caller connects).
        progress: show a tqdm progress bar (in-process runs).

    Raises:
        PolicyConfigError: bad overrides, or Ray asked for but not started.

    """
    if seeds is not None:
        config = config.replace(seeds=tuple(_int_field("seed", s, 0) for s in seeds))
    if timesteps is not None:
        config = config.replace(n_timesteps=_int_field("timesteps", timesteps, 1))
    if workers is not None:
        _int_field("workers", workers, 1)
    root = Path(out_dir if out_dir is not None else config.output_dir)
    if workers is None and address is None:
        return [train_one(config, s, _seed_dir(root, s), progress=progress) for s in config.seeds]
    import ray

    if not ray.is_initialized():
        raise PolicyConfigError(
            "workers/address: Ray is not started in this process; start it first "
            "(agents.placement.start_ray, as twinloop train does)"
        )
    task = ray.remote(num_cpus=1)(_train_task)
    refs = [task.remote(config, s, str(_seed_dir(root.resolve(), s))) for s in config.seeds]
    return list(ray.get(refs))


def _train_task(config: TrainingConfig, seed: int, directory: str) -> TrainResult:
    import numba

    numba.set_num_threads(1)  # one CPU per task: the compiled env step too
    return train_one(config, seed, directory, progress=False, torch_threads=1)
