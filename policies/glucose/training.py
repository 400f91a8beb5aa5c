"""The glucose therapy's RL task family: ``twinloop/T1D-v0`` settings for ``twinloop train``.

A config section for ``twinloop/T1D-v0`` has, besides the common keys of
:mod:`twinloop.policies.training`, ``env`` (patients, episode length, meal scenario, carb-counting
error), ``observation`` (the features), ``action`` (the action mapping) and ``reward``; see
``docs/training.md``. Policies trained on it load with
:func:`twinloop.policies.glucose.learned.load_policy_controller`.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from twinloop.plant.envs import T1D_ID
from twinloop.plant.errors import PlantError
from twinloop.plant.glucose.cohorts import expand_names
from twinloop.plant.glucose.env_core import T1DConfig
from twinloop.plant.glucose.pump import PumpSpec
from twinloop.plant.glucose.scenarios import SCENARIOS, CarbCountingError
from twinloop.policies.errors import PolicyConfigError, config_section
from twinloop.policies.glucose.clinical_eval import ClinicalEvalCallback, EvalSettings
from twinloop.policies.glucose.features import (
    ENV_LAYOUT_VERSION,
    ActionLayout,
    FeatureVecEnv,
    ObservationLayout,
)
from twinloop.policies.glucose.rewards import make_reward, parse_reward

#: The glucose family's own keys (``twinloop/T1D-v0``).
GLUCOSE_KEYS = ("env", "observation", "action", "reward", "eval")
#: Keys of the glucose ``env`` section.
ENV_KEYS = ("patients", "sample_patient", "episode_days", "scenario", "carb_error")


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
        value = config_section("env", value, ENV_KEYS)
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
class GlucoseTask:
    """The settings of the glucose family (``twinloop/T1D-v0``): the env, features, action, reward.

    Attributes:
        env: the environment (``env`` section).
        observation: the features.
        action: the action mapping.
        reward: reward name (:data:`twinloop.policies.glucose.rewards.REWARDS`).
        reward_params: the reward's parameters.
        eval: the clinical evaluation during training (``eval`` section).

    """

    #: The environment it trains on.
    env_id: ClassVar[str] = T1D_ID
    #: The family's name (in ``policy.json``).
    family: ClassVar[str] = "glucose"
    #: The family's own top-level keys.
    keys: ClassVar[tuple[str, ...]] = GLUCOSE_KEYS
    #: ``policy_kwargs`` entries twinloop sets itself for this family (none).
    reserved_policy_kwargs: ClassVar[tuple[str, ...]] = ()
    #: What to say when another family's keys are given (None: list this family's keys).
    refusal_hint: ClassVar[str | None] = None

    env: EnvSettings
    observation: ObservationLayout
    action: ActionLayout
    reward: str
    reward_params: dict[str, Any]
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)

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
            eval=EvalSettings.parse(s.get("eval")),
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
            T1D_ID,
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

    def clinical_callback(
        self,
        directory: Path,
        save_policy: Callable[[Any, Path, int], None],
        n_envs: int,
        on_evaluation: Callable[[dict[str, float]], bool] | None = None,
    ) -> ClinicalEvalCallback | None:
        """The clinical evaluation of ``eval`` (None when ``eval.freq`` is 0)."""
        if not self.eval.freq:
            return None
        return ClinicalEvalCallback(
            self.eval,
            self.eval.patients or self.env.patients,
            directory,
            save_policy,
            scenario=self.env.scenario,
            carb_error=self.env.carb_error,
            n_envs=n_envs,
            on_evaluation=on_evaluation,
        )

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

    def run_command(self, directory: str) -> str:
        """A ``twinloop run`` command that runs the policy saved in ``directory`` in the loop."""
        return f"twinloop run --cohort adults --days 7 --controller policy:{shlex.quote(directory)}"
