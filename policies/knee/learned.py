"""A knee-exoskeleton policy saved by ``twinloop train``, loaded as an exo controller.

A policy trained on ``twinloop/KneeExo-v0`` (``policies/configs/knee_sac.yaml``) is saved like
an insulin policy (``model.zip`` + ``policy.json``, see :mod:`twinloop.policies.saved`);
its metadata records the env id, :data:`KNEE_LAYOUT_VERSION`, the observation layout (names, units,
clipping bounds, the fixed normalisation), the action (normalised or N·m, the torque limit) and the
control rate. :func:`load_exo_policy` returns an :class:`ExoPolicyController` whose
``torque(obs: ExoInput) -> float`` (N·m) rebuilds, from the loop's
:class:`~twinloop.policies.knee.controllers.ExoInput`, exactly the env's 7-value observation (the
same order and clipping as :func:`twinloop.plant.knee.env.make_spaces`), runs the policy
deterministically and maps the action to a torque as the env does.

The observation is fed to the network through :class:`KneeObservationScaler`, a fixed affine
normalisation that is part of the saved model: ``model.predict`` takes the env's own,
unnormalised observation.

Missing sensors (``NaN`` in :class:`~twinloop.policies.knee.controllers.ExoInput`): the policy was
trained with a torque sensor and EMG. By default (``sensor_fallback=True``) a missing torque
sensor reading is replaced by the torque the policy commanded at the previous tick (what the
sensor measures, less its bias, noise and the drive's slew and friction), and a missing EMG
envelope by the last finite one (0 before any); with ``sensor_fallback=False`` a missing
reading raises :class:`~twinloop.policies.errors.PolicyError`. A missing angle, velocity or
reference gives 0 N·m (compliant), as the hand-written exo controllers do.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from numpy.typing import NDArray
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from twinloop import plant
from twinloop.plant.knee.env_core import (
    N_OBS,
    OBS_ANGLE_MAX_RAD,
    OBS_EMG_MAX,
    OBS_REF_VELOCITY_MAX_RAD_S,
    OBS_VELOCITY_MAX_RAD_S,
)
from twinloop.policies.errors import PolicyConfigError, PolicyError
from twinloop.policies.knee.controllers import ExoInput
from twinloop.policies.saved import (
    load_model,
    policy_paths,
    read_metadata_file,
    reloads_model_setstate,
    ships_model_path_getstate,
    split_trust,
)

#: Version of the knee policies' observation/action layout; bump it whenever the meaning of the
#: observation (order, units, clipping, normalisation) or of the action changes.
KNEE_LAYOUT_VERSION = 1

#: The env's observation, in order: (name, unit, centre, scale). The network sees
#: ``(obs − centre) · scale`` (:class:`KneeObservationScaler`).
OBSERVATION: tuple[tuple[str, str, float, float], ...] = (
    ("angle_rad", "rad", 0.7, 2.0),
    ("velocity_rad_s", "rad/s", 0.0, 0.5),
    ("torque_sensor_nm", "N·m", 0.0, 1.0 / 30.0),
    ("emg_quad", "fraction of max", 0.0, 2.0),
    ("emg_ham", "fraction of max", 0.0, 2.0),
    ("reference_rad", "rad", 0.7, 2.0),
    ("reference_velocity_rad_s", "rad/s", 0.0, 0.5),
)
assert len(OBSERVATION) == N_OBS


def observation_bounds(torque_sensor_range_nm: float) -> tuple[list[float], list[float]]:
    """The env's clipping bounds ``(low, high)`` of the 7 observation values."""
    tq = float(torque_sensor_range_nm)
    a, v, r = OBS_ANGLE_MAX_RAD, OBS_VELOCITY_MAX_RAD_S, OBS_REF_VELOCITY_MAX_RAD_S
    low = [-a, -v, -tq, 0.0, 0.0, -a, -r]
    high = [a, v, tq, OBS_EMG_MAX, OBS_EMG_MAX, a, r]
    return low, high


def describe_observation(torque_sensor_range_nm: float) -> dict[str, Any]:
    """The observation layout as stored in ``policy.json`` (compared at load)."""
    low, high = observation_bounds(torque_sensor_range_nm)
    return {
        "layout_version": KNEE_LAYOUT_VERSION,
        "names": [o[0] for o in OBSERVATION],
        "units": [o[1] for o in OBSERVATION],
        "low": low,
        "high": high,
        "centre": [o[2] for o in OBSERVATION],
        "scale": [o[3] for o in OBSERVATION],
    }


class KneeObservationScaler(BaseFeaturesExtractor):
    """Features ``(obs − centre) · scale``: a fixed normalisation saved inside the model.

    Args:
        observation_space: the env's 7-value ``Box``.
        centre: value subtracted per entry.
        scale: factor per entry (after the centre).

    """

    def __init__(
        self, observation_space: spaces.Box, centre: list[float], scale: list[float]
    ) -> None:
        n = int(np.prod(observation_space.shape))
        super().__init__(observation_space, n)
        if len(centre) != n or len(scale) != n:
            raise PolicyConfigError(
                f"KneeObservationScaler: centre/scale of length {len(centre)}/{len(scale)}; "
                f"the observation has {n} values"
            )
        self.centre: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:  # noqa: D102
        flat = observations.reshape(observations.shape[0], -1)
        return (flat - self.centre) * self.scale


def features_extractor_kwargs() -> dict[str, Any]:
    """``policy_kwargs`` entries that put :class:`KneeObservationScaler` in a knee policy."""
    return {
        "features_extractor_class": KneeObservationScaler,
        "features_extractor_kwargs": {
            "centre": [o[2] for o in OBSERVATION],
            "scale": [o[3] for o in OBSERVATION],
        },
    }


def _policy_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """The network's ``policy_kwargs`` rebuilt from ``policy.json`` (never unpickled).

    The model archive pickles its ``policy_kwargs``, whose features extractor is named by its
    class path; rebuilding them from the metadata keeps policies saved before a move loadable.
    """
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    saved = config.get("policy_kwargs") if isinstance(config, dict) else None
    net_arch = saved.get("net_arch") if isinstance(saved, dict) else None
    observation = meta["observation"]
    return {
        **({"net_arch": list(net_arch)} if isinstance(net_arch, list) else {}),
        "features_extractor_class": KneeObservationScaler,
        "features_extractor_kwargs": {
            "centre": [float(x) for x in observation["centre"]],
            "scale": [float(x) for x in observation["scale"]],
        },
    }


class ExoPolicyController:
    """Runs a trained knee policy as an exoskeleton controller (see the module docstring).

    Args:
        model: the stable-baselines3 model (``predict(obs, deterministic=True)``).
        metadata: the saved policy's ``policy.json`` (checked by :func:`check_exo_compatible`).
        sensor_fallback: replace a missing torque-sensor or EMG reading (see the module
            docstring) instead of raising.

    Attributes:
        control_hz: the control rate the policy was trained at, Hz.
        normalized_action: the policy's action is in ``[-1, 1]`` × :attr:`torque_limit_nm`.
        torque_limit_nm: the env's action bound, N·m (the torque is clipped to it).

    """

    def __init__(
        self, model: Any, metadata: dict[str, Any], *, sensor_fallback: bool = True
    ) -> None:
        self.model = model
        self.metadata = metadata
        self.sensor_fallback = sensor_fallback
        action = metadata["action"]
        self.control_hz = int(metadata["control_hz"])
        self.normalized_action = bool(action["normalized"])
        self.torque_limit_nm = float(action["limit_nm"])
        obs = metadata["observation"]
        self._low = np.asarray(obs["low"], dtype=np.float64)
        self._high = np.asarray(obs["high"], dtype=np.float64)
        self._last_torque_nm = 0.0
        self._last_emg = [0.0, 0.0]
        #: where the model was loaded from (a copy sent to another process reloads it there)
        self.model_path: str | None = None
        #: the user trusted the model file's pickle (``policy:pickle:PATH``)
        self.model_trust_pickle = False

    __getstate__ = ships_model_path_getstate
    __setstate__ = reloads_model_setstate

    def model_custom_objects(self) -> dict[str, Any]:
        """What the model's archive must not unpickle (its ``policy_kwargs``), rebuilt."""
        return {"policy_kwargs": _policy_kwargs(self.metadata)}

    def warm_up(self) -> None:
        """One throw-away prediction: torch's first call in a process is slow (~1 s)."""
        self.model.predict(np.zeros(N_OBS, np.float32), deterministic=True)
        self.reset()

    def reset(self) -> None:
        """Forget the previous tick (command and EMG held by the sensor fallback)."""
        self._last_torque_nm = 0.0
        self._last_emg = [0.0, 0.0]
        reset = getattr(self.model, "reset", None)  # a frame stack starts empty
        if callable(reset):
            reset()

    def observation(self, obs: ExoInput) -> NDArray[np.float32] | None:
        """The env's observation, shape ``(7,)`` float32, or ``None`` without angle/reference.

        Raises:
            PolicyError: a missing torque-sensor or EMG reading with ``sensor_fallback=False``.

        """
        core = (obs.angle_rad, obs.velocity_rad_s, obs.reference_rad, obs.reference_velocity_rad_s)
        if not all(math.isfinite(v) for v in core):
            return None
        torque = obs.torque_sensor_nm
        emg = [obs.emg_quad, obs.emg_ham]
        missing = [
            name
            for name, v in (("torque_sensor_nm", torque), ("emg_quad", emg[0]), ("emg_ham", emg[1]))
            if not math.isfinite(v)
        ]
        if missing and not self.sensor_fallback:
            raise PolicyError(
                f"exo policy: no {', '.join(missing)} reading (NaN); the policy was trained with "
                "them (load it with sensor_fallback=True to substitute them)"
            )
        if not math.isfinite(torque):
            torque = self._last_torque_nm
        for m in range(2):
            if math.isfinite(emg[m]):
                self._last_emg[m] = emg[m]
            else:
                emg[m] = self._last_emg[m]
        raw = np.array(
            [obs.angle_rad, obs.velocity_rad_s, torque, emg[0], emg[1], obs.reference_rad,
             obs.reference_velocity_rad_s]
        )  # fmt: skip
        return np.clip(raw, self._low, self._high).astype(np.float32)

    def torque_of_action(self, action: NDArray[Any]) -> float:
        """The torque command of a policy action, N·m, clipped as the env clips it."""
        a = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        lim = self.torque_limit_nm
        if self.normalized_action:
            return min(max(a, -1.0), 1.0) * lim
        return min(max(a, -lim), lim)

    def torque(self, obs: ExoInput) -> float:
        """The policy's exoskeleton torque command, N·m (0 without angle or reference)."""
        features = self.observation(obs)
        if features is None:
            tau = 0.0
        else:
            action, _ = self.model.predict(features, deterministic=True)
            tau = self.torque_of_action(action)
        self._last_torque_nm = tau
        return tau


def check_exo_compatible(meta: dict[str, Any], label: str) -> None:
    """Refuse metadata this code cannot run as a knee policy, naming both sides."""
    env_id = meta.get("env_id")
    version = meta.get("env_layout_version")
    if env_id != plant.KNEE_EXO_ID:
        hint = (
            " (an insulin policy: run it with twinloop run --controller policy:PATH)"
            if env_id == plant.T1D_ID
            else ""
        )
        raise PolicyConfigError(
            f"policy {label}: trained on env {env_id!r} (layout version {version!r}){hint}; "
            f"exo policies are {plant.KNEE_EXO_ID} (layout version {KNEE_LAYOUT_VERSION})"
        )
    if version != KNEE_LAYOUT_VERSION:
        raise PolicyConfigError(
            f"policy {label}: saved with {plant.KNEE_EXO_ID} layout version {version!r}; this "
            f"code has layout version {KNEE_LAYOUT_VERSION} (retrain it with twinloop train)"
        )
    try:
        obs = meta["observation"]
        expected = describe_observation(float(obs["high"][2]))
        action = meta["action"]
        control_hz = meta["control_hz"]
        ok = (
            isinstance(action["normalized"], bool)
            and float(action["limit_nm"]) > 0
            and isinstance(control_hz, int)
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PolicyConfigError(
            f"policy {label}: incomplete {plant.KNEE_EXO_ID} metadata ({type(exc).__name__}: {exc})"
        ) from None
    if obs != expected:
        raise PolicyConfigError(
            f"policy {label}: observation layout {json.dumps(obs)} differs from this code's "
            f"{json.dumps(expected)}"
        )
    if not ok:
        raise PolicyConfigError(
            f"policy {label}: action {json.dumps(action)} / control_hz {control_hz!r} not valid"
        )


def read_exo_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked metadata of the knee policy at ``path`` (its directory or model zip).

    Raises:
        PolicyConfigError: missing or corrupt file, or not a knee policy of this layout.

    """
    meta = read_metadata_file(path)
    check_exo_compatible(meta, str(path))
    return meta


def load_exo_policy(
    path: str | os.PathLike[str],
    *,
    control_hz: int | None = None,
    sensor_fallback: bool = True,
) -> ExoPolicyController:
    """The exo controller of the knee policy saved at ``path`` (directory or ``model.zip``).

    Args:
        path: a ``seed_<s>`` directory written by ``twinloop train`` (or its model zip).
        control_hz: the loop's control rate; refused if the policy was trained at another.
        sensor_fallback: see the module docstring.

    Raises:
        PolicyConfigError: missing or corrupt files; a policy of another env (an insulin
            policy: ``twinloop/T1D-v0``, env layout version
            :data:`twinloop.policies.glucose.features.ENV_LAYOUT_VERSION`) or layout version, or
            trained at another control rate (the message names both).

    """
    meta = read_exo_metadata(path)
    if control_hz is not None and control_hz != meta["control_hz"]:
        raise PolicyConfigError(
            f"policy {path}: trained at control_hz={meta['control_hz']}; this loop runs at "
            f"{control_hz} Hz (the observed velocity and the dynamics per step differ)"
        )
    _, model_path = policy_paths(path)
    _, trusted = split_trust(path)
    model = load_model(
        str(meta.get("algorithm")),
        model_path,
        str(path),
        {"policy_kwargs": _policy_kwargs(meta)},
        trust_pickle=trusted,
    )
    obs_shape = getattr(model.observation_space, "shape", None)
    act_space = model.action_space
    bound = 1.0 if meta["action"]["normalized"] else float(meta["action"]["limit_nm"])
    act_ok = getattr(act_space, "shape", None) == (1,) and np.allclose(
        getattr(act_space, "high", np.nan), bound
    )
    if obs_shape != (N_OBS,) or not act_ok:
        raise PolicyConfigError(
            f"policy {path}: the model's spaces {obs_shape}/{act_space} do not match its "
            f"metadata ({N_OBS} observations, an action bounded by ±{bound:g})"
        )
    controller = ExoPolicyController(model, meta, sensor_fallback=sensor_fallback)
    controller.model_path = str(model_path.resolve())
    controller.model_trust_pickle = trusted
    controller.warm_up()
    return controller


__all__ = [
    "KNEE_LAYOUT_VERSION",
    "OBSERVATION",
    "ExoPolicyController",
    "KneeObservationScaler",
    "check_exo_compatible",
    "describe_observation",
    "features_extractor_kwargs",
    "load_exo_policy",
    "read_exo_metadata",
]
