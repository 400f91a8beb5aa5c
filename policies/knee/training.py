"""The knee-exo therapy's RL task family: ``twinloop/KneeExo-v0`` settings for ``twinloop train``.

A config section for ``twinloop/KneeExo-v0`` has, besides the common keys of
:mod:`twinloop.policies.training`, only ``env`` (the fields of
:class:`~twinloop.plant.knee.env_core.KneeExoConfig`): the observation, action and reward are
the env's own. Policies trained on it load with
:func:`twinloop.policies.knee.learned.load_exo_policy`.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Mapping
from typing import Any, ClassVar

import gymnasium as gym
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from twinloop.plant.envs import KNEE_EXO_ID
from twinloop.plant.errors import ConfigError
from twinloop.plant.knee.env_core import KneeExoConfig
from twinloop.plant.knee.model import PRESETS, KneeParams, knee_preset
from twinloop.plant.knee.sensors import EMGSpec, EncoderSpec, TorqueSensorSpec
from twinloop.plant.knee.tasks import TASKS, TaskSpec
from twinloop.policies.errors import PolicyConfigError, config_section
from twinloop.policies.knee.learned import (
    KNEE_LAYOUT_VERSION,
    describe_observation,
    features_extractor_kwargs,
)
from twinloop.policies.training import int_field

#: The knee-exoskeleton family's own keys (``twinloop/KneeExo-v0``).
KNEE_KEYS = ("env",)


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
    value = config_section("env", value, KNEE_ENV_KEYS, f" of {KNEE_EXO_ID}")
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
            kwargs[name] = int_field("env.control_hz", v, 1)
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

    env_id: ClassVar[str] = KNEE_EXO_ID
    family: ClassVar[str] = "knee_exo"
    keys: ClassVar[tuple[str, ...]] = KNEE_KEYS
    reserved_policy_kwargs: ClassVar[tuple[str, ...]] = (
        "features_extractor_class",
        "features_extractor_kwargs",
    )
    #: Common keys this family refuses, with the reason.
    unsupported_keys: ClassVar[dict[str, str]] = {
        "frame_stack": "the network's fixed normalisation (KneeObservationScaler) takes exactly "
        "the env's 7 readings, not stacked frames",
    }
    refusal_hint: ClassVar[str | None] = KNEE_NO_LAYOUT

    env: KneeExoConfig

    @classmethod
    def parse(cls, s: Mapping[str, Any]) -> KneeExoTask:
        """From the config section (only :attr:`keys` are read)."""
        return cls(env=parse_knee_env(s.get("env")))

    def knee_config(self) -> KneeExoConfig:
        """The ``twinloop/KneeExo-v0`` configuration."""
        return self.env

    def run_command(self, directory: str) -> str:
        """A ``twinloop run`` command that runs the policy saved in ``directory`` in the loop."""
        patient = next((p for p in self.env.patients if isinstance(p, str)), "moderate")
        return (
            f"twinloop run --therapy knee-exo --patient {patient} "
            f"--controller policy:{shlex.quote(directory)}"
        )

    def make_vec_env(self, n_envs: int) -> VecEnv:
        """Native :class:`~twinloop.plant.knee.env_vector.KneeExoVectorEnv` → SB3VecEnv."""
        from twinloop.policies.sb3_vec_env import SB3VecEnv

        venv = gym.make_vec(
            KNEE_EXO_ID,
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
