"""A policy saved by ``twinloop train``, loaded as a loop controller (``--controller policy:DIR``).

A saved policy is a directory holding the stable-baselines3 model (``model.zip``) and its
metadata (``policy.json``: twinloop version, env id,
:data:`twinloop.policies.glucose.features.ENV_LAYOUT_VERSION`, observation and action layouts with
their normalisation constants, reward, algorithm, seed and the training config).
:func:`load_policy_controller` refuses a policy whose env layout version, observation layout or
action layout differ from what this code computes, naming both.

The controller rebuilds, from the loop's
:class:`~twinloop.policies.glucose.interface.ControllerInput`, exactly the observation the policy
was trained on (:func:`twinloop.policies.glucose.features.observation_features`, one row): it keeps
its own ring buffer of one CGM reading per tick (the first reading repeated at the start, as the env
does), takes the loop's net insulin on board and announced carbs, runs the policy deterministically
and maps the action with :func:`twinloop.policies.glucose.features.action_to_dose`.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from twinloop import plant
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.patients import PatientParameters
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.glucose.features import (
    ENV_LAYOUT_VERSION,
    ActionLayout,
    ObservationLayout,
    PatientProfile,
    action_to_dose,
    observation_features,
)
from twinloop.policies.glucose.interface import ControllerInput, Dose

METADATA_FILE = "policy.json"
MODEL_FILE = "model.zip"
METADATA_FORMAT = "twinloop-policy"

#: Loaded models by (resolved path, modification time): a cohort shares one model.
_MODELS: dict[tuple[str, float], Any] = {}


def ships_model_path_getstate(self: Any) -> dict[str, Any]:
    """``__getstate__`` of a learned controller: ship the model's path, not the torch module."""
    state = dict(self.__dict__)
    if self.model_path is not None:
        state["model"] = None
    return state


def reloads_model_setstate(self: Any, state: dict[str, Any]) -> None:
    """``__setstate__`` of a learned controller: reload the model from its path, warm it up."""
    self.__dict__.update(state)
    if self.model is None and self.model_path is not None:
        algorithm = str(self.metadata.get("algorithm"))
        self.model = _load_model(algorithm, Path(self.model_path), self.model_path)
        self.warm_up()


class LearnedPolicyController:
    """Runs a trained policy in the loop (see the module docstring).

    Args:
        model: the stable-baselines3 model (``predict(obs, deterministic=True)``).
        observation: the features the policy was trained on.
        action: the action mapping it was trained with.
        patient: the patient (scheduled basal, CR, CF for the normalisation and the doses).
        metadata: the saved policy's metadata (kept for reports).
        cgm: the CGM whose clipping range the env applied to its readings.

    """

    def __init__(
        self,
        model: Any,
        observation: ObservationLayout,
        action: ActionLayout,
        patient: PatientParameters,
        metadata: dict[str, Any] | None = None,
        cgm: CGMSpec | None = None,
    ) -> None:
        self.model = model
        self.observation = observation
        self.action = action
        self.patient = patient
        self.metadata = metadata or {}
        self.profile = PatientProfile.of([patient])
        spec = cgm or CGMSpec()
        self._cgm_range = (float(spec.min_mg_dl), float(spec.max_mg_dl))
        self._history = np.full(observation.cgm_history, math.nan)
        #: where the model was loaded from (a copy sent to another process reloads it there)
        self.model_path: str | None = None

    __getstate__ = ships_model_path_getstate
    __setstate__ = reloads_model_setstate

    def warm_up(self) -> None:
        """One throw-away prediction, so that a slow first call does not fall on a tick.

        Torch's first call in a process is slow (~1 s); the loop's decisions have a deadline.
        """
        self.model.predict(np.zeros(self.observation.size, np.float32), deterministic=True)

    def features(self, obs: ControllerInput) -> NDArray[np.float32] | None:
        """Account this tick's glucose and return the policy's observation, shape ``(size,)``.

        Call once per tick. A missing glucose (``nan``) repeats the previous reading; ``None``
        when no glucose has been seen yet.
        """
        g = obs.glucose_mg_dl
        h = self._history
        if math.isfinite(g):
            g = min(max(g, self._cgm_range[0]), self._cgm_range[1])
            if math.isnan(h[-1]):
                h[:] = g  # the first reading, repeated over the history (as the env starts)
            else:
                h[:-1] = h[1:].copy()
                h[-1] = g
        elif math.isnan(h[-1]):
            return None
        else:
            h[:-1] = h[1:].copy()
        out = observation_features(
            self.observation,
            self.profile,
            cgm_mg_dl=h[np.newaxis, :],
            net_iob_u=np.array([obs.net_iob_u]),
            meal_g=np.array([obs.meal_carbs_g]),
            clock_min=np.array([obs.t_min]),
        )
        return out[0]

    def decide(self, obs: ControllerInput) -> Dose:
        """The policy's dose: temp basal (U/h) and meal bolus (U)."""
        features = self.features(obs)
        if features is None:  # no glucose yet: the mapping's neutral action
            action: NDArray[Any] = np.zeros(self.action.size)
        else:
            action, _ = self.model.predict(features, deterministic=True)
        basal, bolus = action_to_dose(
            self.action, self.profile, np.asarray(action), np.array([obs.meal_carbs_g])
        )
        return Dose(float(basal[0]), float(bolus[0]))


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / METADATA_FILE, p / MODEL_FILE
    if p.suffix == ".zip" or p.is_file():
        return p.parent / METADATA_FILE, p
    raise PolicyConfigError(
        f"policy {path}: no such file or directory (a directory written by twinloop train, "
        f"holding {MODEL_FILE} and {METADATA_FILE}, or its {MODEL_FILE})"
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of the saved policy at ``path`` (its directory or its model zip), checked.

    Raises:
        PolicyConfigError: the file is missing or corrupt, or the policy was saved for another
            env, env layout version, observation or action layout than this code's.

    """
    meta = read_metadata_file(path)
    check_compatible(meta, str(path))
    return meta


def read_metadata_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``policy.json`` of the saved policy at ``path``, of any task family, unchecked.

    Raises:
        PolicyConfigError: the file is missing, not JSON, or not a twinloop policy file.

    """
    meta_path, _ = _paths(path)
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as exc:
        raise PolicyConfigError(
            f"policy {path}: cannot read {meta_path} ({exc.strerror or exc})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyConfigError(f"policy {path}: {meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise PolicyConfigError(
            f"policy {path}: {meta_path} is not a twinloop policy metadata file "
            f"(format {METADATA_FORMAT!r} expected)"
        )
    return meta


def check_compatible(meta: dict[str, Any], label: str) -> tuple[ObservationLayout, ActionLayout]:
    """The layouts of ``meta`` if this code computes them identically, else PolicyConfigError."""
    version = meta.get("env_layout_version")
    if meta.get("env_id") != plant.T1D_ID:
        hint = (
            " (a knee-exoskeleton policy: twinloop run --therapy knee-exo --controller "
            "policy:PATH, twinloop.policies.knee.learned.load_exo_policy)"
            if meta.get("env_id") == plant.KNEE_EXO_ID
            else ""
        )
        raise PolicyConfigError(
            f"policy {label}: trained on env {meta.get('env_id')!r} (env layout version "
            f"{version!r}){hint}; this code runs {plant.T1D_ID} (env layout version "
            f"{ENV_LAYOUT_VERSION})"
        )
    if version != ENV_LAYOUT_VERSION:
        raise PolicyConfigError(
            f"policy {label}: saved with env layout version {version!r}; this code has env "
            f"layout version {ENV_LAYOUT_VERSION} (retrain it with twinloop train)"
        )
    saved_obs = meta.get("observation")
    try:
        observation = ObservationLayout.from_description(saved_obs)  # type: ignore[arg-type]
        current_obs: Any = observation.describe()
    except (PolicyConfigError, KeyError, TypeError, ValueError) as exc:
        current_obs, observation = f"not representable ({exc})", None
    if observation is None or current_obs != saved_obs:
        raise PolicyConfigError(
            f"policy {label}: observation layout {json.dumps(saved_obs)} differs from this "
            f"code's {json.dumps(current_obs)}"
        )
    saved_act = meta.get("action")
    try:
        action = ActionLayout(
            mode=saved_act["mode"],  # type: ignore[index]
            max_basal_multiplier=saved_act["max_basal_multiplier"],  # type: ignore[index]
            bolus_scale=saved_act["bolus_scale"],  # type: ignore[index]
        )
        current_act: Any = action.describe()
    except (PolicyConfigError, KeyError, TypeError) as exc:
        current_act, action = f"not representable ({exc})", None
    if action is None or current_act != saved_act:
        raise PolicyConfigError(
            f"policy {label}: action layout {json.dumps(saved_act)} differs from this code's "
            f"{json.dumps(current_act)}"
        )
    return observation, action


def _load_model(
    algorithm: str,
    model_path: Path,
    label: str,
    custom_objects: dict[str, Any] | None = None,
) -> Any:
    """The SB3 model in ``model_path`` (cached by path and mtime).

    ``custom_objects`` replaces entries of the saved model's data instead of unpickling them
    (SB3's ``load(custom_objects=...)``): a therapy rebuilds what it can from ``policy.json``,
    so a model saved before a class moved still loads.
    """
    from twinloop.policies.training import algorithm_class

    if not model_path.is_file():
        raise PolicyConfigError(f"policy {label}: {model_path} is missing")
    key = (str(model_path.resolve()), model_path.stat().st_mtime)
    if key not in _MODELS:
        cls = algorithm_class(algorithm)
        try:
            if not zipfile.is_zipfile(model_path):
                raise ValueError("not a zip archive")
            _MODELS[key] = cls.load(str(model_path), device="cpu", custom_objects=custom_objects)
        except Exception as exc:  # SB3/torch raise many kinds on a corrupt archive
            raise PolicyConfigError(
                f"policy {label}: cannot load {model_path} ({type(exc).__name__}: {exc})"
            ) from None
    return _MODELS[key]


def load_policy_controller(
    path: str | os.PathLike[str], patient: PatientParameters
) -> LearnedPolicyController:
    """The controller of the policy saved at ``path`` (its directory or model zip) for ``patient``.

    Raises:
        PolicyConfigError: missing or corrupt files, or a policy saved for another env, env
            layout version, observation or action layout (the message names both).

    """
    meta = read_metadata(path)
    observation, action = check_compatible(meta, str(path))
    _, model_path = _paths(path)
    model = _load_model(str(meta.get("algorithm")), model_path, str(path))
    obs_shape = getattr(model.observation_space, "shape", None)
    act_shape = getattr(model.action_space, "shape", None)
    if obs_shape != (observation.size,) or act_shape != (action.size,):
        raise PolicyConfigError(
            f"policy {path}: the model's spaces {obs_shape}/{act_shape} do not match its "
            f"metadata's layouts ({observation.size},)/({action.size},)"
        )
    controller = LearnedPolicyController(model, observation, action, patient, meta)
    controller.model_path = str(model_path.resolve())
    controller.warm_up()
    return controller
