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
from twinloop.policies.saved import (
    load_model,
    policy_paths,
    read_metadata_file,
    reloads_model_setstate,
    ships_model_path_getstate,
    split_trust,
)


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
        #: the user trusted the model file's pickle (``policy:pickle:PATH``)
        self.model_trust_pickle = False

    __getstate__ = ships_model_path_getstate
    __setstate__ = reloads_model_setstate

    def warm_up(self) -> None:
        """One throw-away prediction, so that a slow first call does not fall on a tick.

        Torch's first call in a process is slow (~1 s); the loop's decisions have a deadline.
        """
        self.model.predict(np.zeros(self.observation.size, np.float32), deterministic=True)
        reset = getattr(self.model, "reset", None)  # a frame stack starts empty
        if callable(reset):
            reset()

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


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of the saved policy at ``path`` (its directory or its model zip), checked.

    Raises:
        PolicyConfigError: the file is missing or corrupt, or the policy was saved for another
            env, env layout version, observation or action layout than this code's.

    """
    meta = read_metadata_file(path)
    check_compatible(meta, str(path))
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
    _, model_path = policy_paths(path)
    _, trusted = split_trust(path)
    model = load_model(str(meta.get("algorithm")), model_path, str(path), trust_pickle=trusted)
    obs_shape = getattr(model.observation_space, "shape", None)
    act_shape = getattr(model.action_space, "shape", None)
    if obs_shape != (observation.size,) or act_shape != (action.size,):
        raise PolicyConfigError(
            f"policy {path}: the model's spaces {obs_shape}/{act_shape} do not match its "
            f"metadata's layouts ({observation.size},)/({action.size},)"
        )
    controller = LearnedPolicyController(model, observation, action, patient, meta)
    controller.model_path = str(model_path.resolve())
    controller.model_trust_pickle = trusted
    controller.warm_up()
    return controller
