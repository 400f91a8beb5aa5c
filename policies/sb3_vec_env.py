"""Thin adapter from a Gymnasium 1.x ``VectorEnv`` to stable-baselines3's ``VecEnv`` interface.

stable-baselines3 trains on its own ``VecEnv`` API (``step_async``/``step_wait``, done flags,
``infos`` as a list of dicts with ``terminal_observation`` and ``TimeLimit.truncated``) and
refuses a ``gymnasium.vector.VectorEnv``. This adapter runs a native batched environment (such as
``twinloop/T1D-v0``'s) in Gymnasium's ``SAME_STEP`` autoreset mode, which is what SB3 expects,
and translates the rest; it adds no copy of the batch beyond what SB3 needs.

It also keeps the episode statistics that SB3's ``VecMonitor`` keeps: when a sub-environment's
episode ends, its info holds ``episode = {"r": return, "l": length, "t": seconds since the
adapter was made}``, which SB3 collects into ``model.ep_info_buffer`` and logs as
``rollout/ep_rew_mean`` and ``rollout/ep_len_mean``. So the bare adapter needs no ``VecMonitor``
(one wrapped around it replaces them with its own, equal up to float32 rounding).
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from numpy.typing import NDArray
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvObs, VecEnvStepReturn

from twinloop.policies.errors import PolicyConfigError


class SB3VecEnv(VecEnv):
    """stable-baselines3 view of a Gymnasium ``VectorEnv`` in ``SAME_STEP`` autoreset mode.

    Args:
        venv: the vector environment; ``venv.metadata["autoreset_mode"]`` must be
            ``SAME_STEP`` (for ``twinloop/T1D-v0``: ``gym.make_vec(..., vectorization_mode=
            "vector_entry_point", autoreset_mode="same_step")``).

    Seeds set with :meth:`seed` reach the sub-environments at the next reset (sub-environment
    ``i`` gets ``seed + i``, SB3's convention).

    """

    def __init__(self, venv: gym.vector.VectorEnv) -> None:
        mode = venv.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise PolicyConfigError(
                f"venv: autoreset_mode is {mode}; the SB3 adapter needs AutoresetMode.SAME_STEP"
            )
        self.venv = venv
        self._actions: NDArray[Any] | None = None
        self._started_s = time.perf_counter()
        self._episode_return = np.zeros(venv.num_envs, np.float64)
        self._episode_length = np.zeros(venv.num_envs, np.int64)
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    def reset(self) -> VecEnvObs:
        """Reset every sub-environment (with the seeds of :meth:`seed`, if any)."""
        seeds = self._seeds
        seed = seeds if any(s is not None for s in seeds) else None
        obs, info = self.venv.reset(seed=seed)  # type: ignore[arg-type]
        self.reset_infos = self._split_info(info)
        self._reset_seeds()
        self._reset_options()
        self._episode_return[:] = 0.0
        self._episode_length[:] = 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Remember the actions of the next :meth:`step_wait`."""
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Step every sub-environment; an ended one is already reset in the returned obs."""
        obs, reward, terminated, truncated, info = self.venv.step(self._actions)
        dones = terminated | truncated
        infos = self._split_info(info)
        self._episode_return += reward
        self._episode_length += 1
        if dones.any():
            final_obs = info["final_obs"]
            elapsed_s = round(time.perf_counter() - self._started_s, 6)
            for i in np.flatnonzero(dones):
                infos[i]["terminal_observation"] = final_obs[i]
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                infos[i]["episode"] = {
                    "r": float(self._episode_return[i]),
                    "l": int(self._episode_length[i]),
                    "t": elapsed_s,
                }
            self._episode_return[dones] = 0.0
            self._episode_length[dones] = 0
        return obs, reward.astype(np.float32), dones, infos

    def _split_info(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        keys = [k for k in info if not k.startswith("_") and k not in ("final_obs", "final_info")]
        return [{k: info[k][i] for k in keys} for i in range(self.num_envs)]

    def close(self) -> None:
        """Close the vector environment."""
        self.venv.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        """The vector environment's attribute, once per selected sub-environment."""
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        """Set an attribute on the vector environment (shared by all sub-environments)."""
        setattr(self.venv, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of the vector environment once per selected sub-environment."""
        method = getattr(self.venv, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: Any = None) -> list[bool]:
        """Sub-environments of a native vector environment carry no Gymnasium wrappers."""
        return [False for _ in self._get_indices(indices)]
