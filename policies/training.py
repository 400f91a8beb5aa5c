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
own directory (``seed_<s>/``: ``model.zip``, ``policy.json``, ``checkpoints/``, ``tb/``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import yaml
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from tqdm import tqdm

from twinloop import plant
from twinloop.plant.errors import ConfigError, PlantError
from twinloop.plant.glucose.cohorts import expand_names
from twinloop.plant.glucose.env_core import T1DConfig
from twinloop.plant.glucose.pump import PumpSpec
from twinloop.plant.glucose.scenarios import SCENARIOS, CarbCountingError
from twinloop.plant.knee.env_core import KneeExoConfig
from twinloop.plant.knee.model import PRESETS, KneeParams, knee_preset
from twinloop.plant.knee.sensors import EMGSpec, EncoderSpec, TorqueSensorSpec
from twinloop.plant.knee.tasks import TASKS, TaskSpec
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.features import (
    ENV_LAYOUT_VERSION,
    ActionLayout,
    FeatureVecEnv,
    ObservationLayout,
)
from twinloop.policies.glucose.rewards import make_reward, parse_reward
from twinloop.policies.knee.learned import (
    KNEE_LAYOUT_VERSION,
    describe_observation,
    features_extractor_kwargs,
)
from twinloop.policies.saved import (
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILE,
    algorithm_class,
    twinloop_version,
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
    "seeds",
    "checkpoint_freq",
    "tensorboard",
    "output_dir",
    "torch_threads",
)
#: The glucose family's own keys (``twinloop/T1D-v0``).
GLUCOSE_KEYS = ("env", "observation", "action", "reward")
#: The knee-exoskeleton family's own keys (``twinloop/KneeExo-v0``).
KNEE_KEYS = ("env",)
#: twinloop's keys of a glucose config (common + glucose).
TWINLOOP_KEYS = COMMON_KEYS + GLUCOSE_KEYS
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
#: Keys of the glucose ``env`` section.
ENV_KEYS = ("patients", "sample_patient", "episode_days", "scenario", "carb_error")
#: Activation functions ``policy_kwargs.activation_fn`` may name.
ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu", "silu")


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """The glucose training environment (``env`` section of ``twinloop/T1D-v0``).

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


# --- glucose family: twinloop/T1D-v0 -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlucoseTask:
    """The settings of the glucose family (``twinloop/T1D-v0``): the env, features, action, reward.

    Attributes:
        env: the environment (``env`` section).
        observation: the features.
        action: the action mapping.
        reward: reward name (:data:`twinloop.policies.glucose.rewards.REWARDS`).
        reward_params: the reward's parameters.

    """

    #: The family's name (in ``policy.json``).
    family: ClassVar[str] = "glucose"
    #: The family's own top-level keys.
    keys: ClassVar[tuple[str, ...]] = GLUCOSE_KEYS

    env: EnvSettings
    observation: ObservationLayout
    action: ActionLayout
    reward: str
    reward_params: dict[str, Any]

    @classmethod
    def parse(cls, s: Mapping[str, Any]) -> GlucoseTask:
        """From the config section (only :attr:`keys` are read)."""
        reward, reward_params = parse_reward(s.get("reward", "risk"))
        return cls(
            env=EnvSettings.parse(s.get("env")),
            observation=ObservationLayout.parse(
                s.get("observation", {"cgm": 12, "iob": True, "meal": True})
            ),
            action=ActionLayout.parse(s.get("action", "basal+meal_bolus")),
            reward=reward,
            reward_params=reward_params,
        )

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

    def make_vec_env(self, n_envs: int) -> VecEnv:
        """Native T1D vector env → :class:`~twinloop.policies.sb3_vec_env.SB3VecEnv` → features."""
        from twinloop.policies.sb3_vec_env import SB3VecEnv

        venv = gym.make_vec(
            plant.T1D_ID,
            num_envs=n_envs,
            vectorization_mode="vector_entry_point",
            autoreset_mode="same_step",
            config=self.t1d_config(),
        )
        return FeatureVecEnv(SB3VecEnv(venv), self.observation, self.action)

    def policy_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model's ``policy_kwargs`` (as configured)."""
        return kwargs

    def callbacks(self) -> list[BaseCallback]:
        """Extra training callbacks (none)."""
        return []

    def metadata(self) -> dict[str, Any]:
        """The family's part of ``policy.json`` (read by :mod:`~.glucose.learned`)."""
        return {
            "env_layout_version": ENV_LAYOUT_VERSION,
            "control_period_min": self.t1d_config().control_period_min,
            "observation": self.observation.describe(),
            "action": self.action.describe(),
            "reward": {"name": self.reward, "params": self.reward_params},
            "env": self.env.describe(),
        }


# --- knee-exoskeleton family: twinloop/KneeExo-v0 -----------------------------------------

#: Keys of the knee ``env`` section: the fields of :class:`KneeExoConfig`.
KNEE_ENV_KEYS = tuple(f.name for f in dataclasses.fields(KneeExoConfig))
#: Where the glucose keys' roles are played in the knee family (the refusal message).
KNEE_NO_LAYOUT = (
    "the observation is the env's 7 sensor readings (angle, velocity, torque sensor, EMG quad "
    "and ham, reference angle and velocity), the action the exoskeleton torque "
    "(env.normalized_action, env.max_torque_nm), the reward the env's tracking reward "
    "(env.tracking_scale_rad, env.assist_weight, env.termination_penalty)"
)
_KNEE_SPECS: dict[str, type[Any]] = {
    "encoder": EncoderSpec,
    "torque_sensor": TorqueSensorSpec,
    "emg": EMGSpec,
}
_KNEE_BOOLS = ("sample_patient", "sample_task", "normalized_action")


def _fields_of(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _build(cls: type[Any], key: str, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` with unknown fields and bad values as PolicyConfigErrors on ``key``."""
    allowed = _fields_of(cls)
    unknown = sorted(set(map(str, values)) - set(allowed))
    if unknown:
        raise PolicyConfigError(
            f"{key}: unknown key(s) {', '.join(unknown)}; keys are {', '.join(allowed)}"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    clean: dict[str, Any] = {}
    for name, v in ((str(k), v) for k, v in values.items()):
        default = defaults[name]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise PolicyConfigError(f"{key}.{name}: {v!r} is not allowed: true or false")
        elif isinstance(default, int | float):
            whole = isinstance(default, int)
            if whole and isinstance(v, float) and v.is_integer():
                v = int(v)
            ok = isinstance(v, int) if whole else isinstance(v, int | float)
            if isinstance(v, bool) or not ok or not math.isfinite(v):
                kind = "an integer" if whole else "a finite number"
                raise PolicyConfigError(f"{key}.{name}: {v!r} is not allowed: {kind}")
        elif isinstance(v, Mapping | list):
            raise PolicyConfigError(f"{key}.{name}: {v!r} is not allowed: a number or a name")
        clean[name] = v
    try:
        return cls(**clean)
    except ConfigError as exc:
        raise PolicyConfigError(f"{key}.{exc.field}: {exc}") from None
    except TypeError as exc:
        raise PolicyConfigError(f"{key}: {values!r} is not allowed ({exc})") from None


def _knee_patient(value: object) -> str | KneeParams:
    key = "env.patients"
    if isinstance(value, str):
        if value not in PRESETS:
            raise PolicyConfigError(
                f"{key}: unknown knee preset {value!r}; presets are {', '.join(PRESETS)}"
            )
        return value
    if isinstance(value, Mapping) and isinstance(value.get("preset"), str):
        preset = str(value["preset"])
        if preset not in PRESETS:
            raise PolicyConfigError(
                f"{key}: unknown knee preset {preset!r}; presets are {', '.join(PRESETS)}"
            )
        overrides = {str(k): v for k, v in value.items() if k != "preset"}
        base = dataclasses.asdict(knee_preset(preset))
        return _build(KneeParams, f"{key}[{preset}]", {**base, **overrides})
    raise PolicyConfigError(
        f"{key}: {value!r} is not allowed: a knee preset ({', '.join(PRESETS)}) or "
        "{preset: NAME, <KneeParams field>: VALUE, ...}"
    )


def _knee_task(value: object) -> str | TaskSpec:
    key = "env.tasks"
    if isinstance(value, str):
        if value not in TASKS:
            raise PolicyConfigError(f"{key}: unknown task {value!r}; tasks are {', '.join(TASKS)}")
        return value
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        name = str(value["name"])
        if name not in TASKS:
            raise PolicyConfigError(f"{key}: unknown task {name!r}; tasks are {', '.join(TASKS)}")
        fields = {str(k): v for k, v in value.items() if k != "name"}
        return _build(TASKS[name], f"{key}[{name}]", fields)
    raise PolicyConfigError(
        f"{key}: {value!r} is not allowed: a task name ({', '.join(TASKS)}) or "
        "{name: NAME, <task field>: VALUE, ...}"
    )


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyConfigError(f"{key}: {value!r} is not allowed: a finite number")
    return float(value)


def parse_knee_env(value: object) -> KneeExoConfig:
    """The knee ``env`` section (KneeExoConfig fields by name) as a :class:`KneeExoConfig`.

    Unlike the env itself, ``normalized_action`` defaults to true (SAC and PPO act in
    ``[-1, 1]``).

    Raises:
        PolicyConfigError: an unknown key (listing the allowed ones) or a bad value (naming
            the key, the value and what is allowed).

    """
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise PolicyConfigError(
            f"env: {value!r} is not allowed: a mapping of {', '.join(KNEE_ENV_KEYS)}"
        )
    unknown = sorted(set(map(str, value)) - set(KNEE_ENV_KEYS))
    if unknown:
        raise PolicyConfigError(
            f"env: unknown key(s) {', '.join(unknown)} of {plant.KNEE_EXO_ID}; keys are "
            f"{', '.join(KNEE_ENV_KEYS)}"
        )
    kwargs: dict[str, Any] = {"normalized_action": True}
    for key, v in value.items():
        name = str(key)
        if name in ("patients", "tasks"):
            items = [v] if isinstance(v, str | Mapping) else v
            if not isinstance(items, list) or not items:
                raise PolicyConfigError(
                    f"env.{name}: {v!r} is not allowed: a name or a non-empty list"
                )
            parse = _knee_patient if name == "patients" else _knee_task
            kwargs[name] = tuple(parse(item) for item in items)
        elif name in _KNEE_BOOLS:
            if not isinstance(v, bool):
                raise PolicyConfigError(f"env.{name}: {v!r} is not allowed: true or false")
            kwargs[name] = v
        elif name == "control_hz":
            kwargs[name] = _int_field("env.control_hz", v, 1)
        elif name == "max_torque_nm":
            kwargs[name] = None if v is None else _number("env.max_torque_nm", v)
        elif name in _KNEE_SPECS:
            if not isinstance(v, Mapping):
                raise PolicyConfigError(
                    f"env.{name}: {v!r} is not allowed: a mapping of "
                    f"{', '.join(_fields_of(_KNEE_SPECS[name]))}"
                )
            kwargs[name] = _build(_KNEE_SPECS[name], f"env.{name}", v)
        else:
            kwargs[name] = _number(f"env.{name}", v)
    try:
        return KneeExoConfig(**kwargs)
    except ConfigError as exc:
        raise PolicyConfigError(f"env.{exc.field}: {exc}") from None


def describe_knee_env(config: KneeExoConfig) -> dict[str, Any]:
    """JSON-ready form of a :class:`KneeExoConfig` (presets and tasks by name when named)."""

    def item(x: Any) -> Any:
        if isinstance(x, str):
            return x
        if isinstance(x, TaskSpec):
            name = next(n for n, cls in TASKS.items() if isinstance(x, cls))
            return {"name": name, **dataclasses.asdict(x)}
        return dataclasses.asdict(x)

    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name in ("patients", "tasks"):
            out[f.name] = [item(x) for x in v]
        elif f.name in _KNEE_SPECS:
            out[f.name] = dataclasses.asdict(v)
        else:
            out[f.name] = v
    out["action_limit_nm"] = config.action_limit_nm
    return out


@dataclasses.dataclass(frozen=True)
class KneeExoTask:
    """The settings of the knee-exoskeleton family (``twinloop/KneeExo-v0``): only ``env``.

    The observation (7 sensor readings), the action (the exo torque) and the reward are the
    env's; the network sees the observation through
    :class:`twinloop.policies.knee.learned.KneeObservationScaler`, a fixed normalisation saved with
    it.

    Attributes:
        env: the environment's configuration.

    """

    family: ClassVar[str] = "knee_exo"
    keys: ClassVar[tuple[str, ...]] = KNEE_KEYS

    env: KneeExoConfig

    @classmethod
    def parse(cls, s: Mapping[str, Any]) -> KneeExoTask:
        """From the config section (only :attr:`keys` are read)."""
        return cls(env=parse_knee_env(s.get("env")))

    def make_vec_env(self, n_envs: int) -> VecEnv:
        """Native :class:`~twinloop.plant.knee.env_vector.KneeExoVectorEnv` → SB3VecEnv."""
        from twinloop.policies.sb3_vec_env import SB3VecEnv

        venv = gym.make_vec(
            plant.KNEE_EXO_ID,
            num_envs=n_envs,
            vectorization_mode="vector_entry_point",
            autoreset_mode="same_step",
            config=self.env,
        )
        return SB3VecEnv(venv)

    def policy_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model's ``policy_kwargs``: the configured ones + the observation scaler."""
        return {**kwargs, **features_extractor_kwargs()}

    def callbacks(self) -> list[BaseCallback]:
        """Log the tracking error and the exo's share of |work| to TensorBoard."""
        return [_KneeRolloutCallback()]

    def metadata(self) -> dict[str, Any]:
        """The family's part of ``policy.json`` (read by :mod:`twinloop.policies.knee.learned`)."""
        c = self.env
        return {
            "env_layout_version": KNEE_LAYOUT_VERSION,
            "control_hz": c.control_hz,
            "observation": describe_observation(c.torque_sensor.range_nm),
            "action": {
                "normalized": c.normalized_action,
                "limit_nm": c.action_limit_nm,
                "unit": "[-1, 1] x limit_nm" if c.normalized_action else "N·m",
            },
            "reward": {
                "tracking_scale_rad": c.tracking_scale_rad,
                "assist_weight": c.assist_weight,
                "termination_penalty": c.termination_penalty,
            },
            "env": describe_knee_env(c),
        }


class _KneeRolloutCallback(BaseCallback):
    """``rollout/tracking_rms_deg`` and ``rollout/exo_work_share`` (of |work|) over 10 k steps."""

    def __init__(self, every: int = 10_000) -> None:
        super().__init__()
        self._every = every
        self._reset()

    def _reset(self) -> None:
        self._sq = self._n = self._exo = self._pat = 0.0

    def _on_step(self) -> bool:
        infos = self.locals.get("infos") or []
        for info in infos:
            e = float(info.get("tracking_error_rad", 0.0))
            self._sq += e * e
            self._exo += abs(float(info.get("exo_work_j", 0.0)))
            self._pat += abs(float(info.get("patient_work_j", 0.0)))
        self._n += len(infos)
        if self._n >= self._every:
            self.logger.record(
                "rollout/tracking_rms_deg", math.degrees(math.sqrt(self._sq / self._n))
            )
            total = self._exo + self._pat
            self.logger.record("rollout/exo_work_share", self._exo / total if total > 0 else 0.0)
            self._reset()
        return True


#: The task families by env id.
TASK_FAMILIES: dict[str, type[GlucoseTask] | type[KneeExoTask]] = {
    plant.T1D_ID: GlucoseTask,
    plant.KNEE_EXO_ID: KneeExoTask,
}
#: What the settings of a family's task are.
TaskSettings = GlucoseTask | KneeExoTask


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """A validated training configuration (see the module docstring and ``docs/training.md``).

    Attributes:
        env_id: Gymnasium id (``twinloop/T1D-v0`` or ``twinloop/KneeExo-v0``).
        algorithm: ``ppo`` or ``sac``.
        policy: ``MlpPolicy``.
        n_envs: parallel sub-environments of the vector env.
        n_timesteps: environment steps per seed.
        hyperparameters: keyword arguments of the algorithm's constructor.
        policy_kwargs: ``policy_kwargs`` of the constructor (``activation_fn`` by name).
        task: the env family's settings (:class:`GlucoseTask` or :class:`KneeExoTask`).
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
    task: TaskSettings
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

    @property
    def glucose(self) -> GlucoseTask:
        """The glucose settings (PolicyConfigError for another family)."""
        if not isinstance(self.task, GlucoseTask):
            raise PolicyConfigError(
                f"{self.env_id} is not a glucose environment: it has no observation, action "
                f"or reward layout ({KNEE_NO_LAYOUT})"
            )
        return self.task

    @property
    def knee(self) -> KneeExoTask:
        """The knee-exoskeleton settings (PolicyConfigError for another family)."""
        if not isinstance(self.task, KneeExoTask):
            raise PolicyConfigError(f"{self.env_id} is not the knee-exoskeleton environment")
        return self.task

    @property
    def env(self) -> EnvSettings:
        """The glucose env settings (``env`` section)."""
        return self.glucose.env

    @property
    def observation(self) -> ObservationLayout:
        """The glucose features."""
        return self.glucose.observation

    @property
    def action(self) -> ActionLayout:
        """The glucose action mapping."""
        return self.glucose.action

    @property
    def reward(self) -> str:
        """The glucose reward's name."""
        return self.glucose.reward

    @property
    def reward_params(self) -> dict[str, Any]:
        """The glucose reward's parameters."""
        return self.glucose.reward_params

    def t1d_config(self) -> T1DConfig:
        """The ``twinloop/T1D-v0`` configuration the features and actions need."""
        return self.glucose.t1d_config()

    def knee_config(self) -> KneeExoConfig:
        """The ``twinloop/KneeExo-v0`` configuration."""
        return self.knee.env

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


def _check_hyperparameters(
    algorithm: str, params: Mapping[str, Any], twinloop_keys: Sequence[str] = TWINLOOP_KEYS
) -> None:
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
            f"takes {', '.join(allowed)} (and twinloop's keys {', '.join(twinloop_keys)})"
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
    ids = ", ".join(TASK_FAMILIES)
    if not isinstance(document, Mapping) or len(document) != 1:
        raise PolicyConfigError(
            f"{source}: expected one top-level key, the environment id ({ids}), "
            "holding the settings"
        )
    ((env_id, section),) = document.items()
    if env_id not in TASK_FAMILIES:
        raise PolicyConfigError(
            f"{source}: unknown environment id {env_id!r}; environments are {ids}"
        )
    family = TASK_FAMILIES[env_id]
    if not isinstance(section, Mapping):
        raise PolicyConfigError(f"{env_id}: expected a mapping of settings, got {section!r}")
    s = {str(k): v for k, v in section.items()}
    foreign = [
        k
        for other_id, other in TASK_FAMILIES.items()
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
    algorithm = str(s.get("algorithm", "ppo")).lower()
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
    if not isinstance(seeds_value, list) or not seeds_value:
        raise PolicyConfigError(f"seeds: {seeds_value!r} is not allowed: a list of integers >= 0")
    seeds = tuple(_int_field("seeds", v, 0) for v in seeds_value)
    if len(set(seeds)) != len(seeds):
        raise PolicyConfigError(f"seeds: {seeds_value!r} is not allowed: each seed once")
    task = family.parse(s)
    tb = s.get("tensorboard", True)
    if not isinstance(tb, bool):
        raise PolicyConfigError(f"tensorboard: {tb!r} is not allowed: true or false")
    out = s.get("output_dir", "runs/train")
    if not isinstance(out, str) or not out:
        raise PolicyConfigError(f"output_dir: {out!r} is not allowed: a directory path")
    policy_kwargs = _policy_kwargs(s.get("policy_kwargs"))
    if isinstance(task, KneeExoTask):
        taken = sorted(
            {"features_extractor_class", "features_extractor_kwargs"} & set(policy_kwargs)
        )
        if taken:
            raise PolicyConfigError(
                f"policy_kwargs.{taken[0]}: set by twinloop train for {env_id} (the fixed "
                "observation normalisation twinloop.policies.knee.learned.KneeObservationScaler)"
            )
    return TrainingConfig(
        env_id=env_id,
        algorithm=algorithm,
        policy=str(policy),
        n_envs=_int_field("n_envs", s.get("n_envs", 16), 1),
        n_timesteps=_int_field("n_timesteps", s.get("n_timesteps", 100_000), 1),
        hyperparameters=hyper,
        policy_kwargs=policy_kwargs,
        task=task,
        seeds=seeds,
        checkpoint_freq=_int_field("checkpoint_freq", s.get("checkpoint_freq", 0), 0),
        tensorboard=tb,
        output_dir=out,
        torch_threads=_int_field("torch_threads", s.get("torch_threads", 1), 1),
        source=json.loads(json.dumps(s, default=str)),
    )


def _family_hint(env_id: str) -> str:
    if env_id == plant.KNEE_EXO_ID:
        return KNEE_NO_LAYOUT
    return f"{env_id} takes {', '.join(COMMON_KEYS + TASK_FAMILIES[env_id].keys)}"


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
    """The SB3 vector env of ``config``: the family's native vector env → SB3VecEnv → monitor.

    Glucose: T1D vector env → SB3VecEnv → features
    (:class:`~twinloop.policies.glucose.features.FeatureVecEnv`);
    knee: KneeExo vector env → SB3VecEnv (the env's own observation and action).
    :class:`~stable_baselines3.common.vec_env.VecMonitor` adds the episode returns and lengths
    that SB3 logs (``rollout/ep_rew_mean`` in TensorBoard).
    """
    return VecMonitor(config.task.make_vec_env(n_envs or config.n_envs))


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
        "model_file": MODEL_FILE,
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
    if progress:
        callbacks.append(_TqdmCallback(config.n_timesteps, f"seed {seed}"))
    try:
        model.learn(total_timesteps=config.n_timesteps, callback=callbacks, tb_log_name="run")
    finally:
        model.logger.close()  # TensorBoard's writer thread ends with it
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
            :func:`twinloop.agents.placement.start_ray`); ``None`` = one after another in this
            process.
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
            "(twinloop.agents.placement.start_ray, as twinloop train does)"
        )
    task = ray.remote(num_cpus=1)(_train_task)
    refs = [task.remote(config, s, str(_seed_dir(root.resolve(), s))) for s in config.seeds]
    return list(ray.get(refs))


def _train_task(config: TrainingConfig, seed: int, directory: str) -> TrainResult:
    import numba

    numba.set_num_threads(1)  # one CPU per task: the compiled env step too
    return train_one(config, seed, directory, progress=False, torch_threads=1)
