"""Native batched ``twinloop/T1D-v0``: N patients (or scenarios) in one compiled numpy step."""

from __future__ import annotations

import numbers
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from numpy.typing import NDArray

from plant.envs.t1d import make_spaces
from plant.envs.t1d_core import (
    S_ANNOUNCED,
    S_BG,
    S_CARBS,
    S_CGM,
    S_INSULIN,
    S_IOB,
    S_T,
    T1DBatch,
    T1DConfig,
    check_action,
    config_from_kwargs,
)
from plant.errors import ConfigError, ResetNeededError


class T1DVectorEnv(VectorEnv[NDArray[np.float32], NDArray[np.float32], NDArray[Any]]):
    """``num_envs`` copies of :class:`~plant.envs.t1d.T1DEnv` stepped together in one call.

    Spaces, reward, termination and truncation are those of ``T1DEnv`` (see its env card),
    batched along a first axis of length ``num_envs``. Sub-environment ``i`` gets patient
    ``patients[i mod len(patients)]`` (cohorts expanded) unless ``sample_patient``.

    Seeding: ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i``, and its trajectory is
    then identical to that of a ``T1DEnv`` with the same configuration, reset with seed
    ``s + i`` and ``options={"patient": <sub-environment i's patient>}`` and given the same
    actions (the serial and parallel compiled steps give the same numbers).

    Autoreset (``autoreset_mode``, reported in ``metadata["autoreset_mode"]``):

    * ``NEXT_STEP`` (default, Gymnasium 1.x's default): the step after a sub-environment
      terminates or truncates resets it, ignores its action and returns its first observation
      with reward 0 and both flags false;
    * ``SAME_STEP``: a sub-environment that ends is reset within the same step; the returned
      observation is the new episode's first, and ``info["final_obs"]`` (object array, masked
      by ``info["_final_obs"]``) and ``info["final_info"]`` (masked by ``_final_info``) hold the
      last observation and info of the episode that ended. This is the mode
      :class:`policies.sb3_vec_env.SB3VecEnv` uses to feed stable-baselines3.

    Info: the keys of ``T1DEnv``'s info, each an array of shape ``(num_envs,)`` (``patient`` is
    an array of names), with Gymnasium's ``_key`` masks (always all true here).
    """

    metadata: dict[str, Any] = {  # noqa: RUF012
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": [],
    }

    def __init__(
        self,
        num_envs: int = 1,
        config: T1DConfig | None = None,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> None:
        config = config_from_kwargs(config, kwargs)
        modes = {"nextstep": AutoresetMode.NEXT_STEP, "samestep": AutoresetMode.SAME_STEP}
        key = str(getattr(autoreset_mode, "value", autoreset_mode)).replace("_", "").lower()
        if key not in modes:
            raise ConfigError(
                "autoreset_mode", autoreset_mode, "next_step or same_step (or the AutoresetMode)"
            )
        mode = modes[key]
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        if num_envs < 1:
            raise ConfigError("num_envs", num_envs, "an integer >= 1")
        self.config = config
        self.num_envs = num_envs
        self._batch = T1DBatch(config, num_envs)
        self.single_action_space, self.single_observation_space = make_spaces(config)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._shape = (num_envs, 2 if config.bolus_action else 1)
        self._rngs: list[np.random.Generator] = []
        self._autoreset = np.zeros(num_envs, dtype=np.bool_)
        self._names = np.array([p.name for p in self._batch.table], dtype=object)

    def _reset_envs(self, indices: NDArray[np.intp]) -> None:
        b = self._batch
        n_pat = len(b.table)
        rngs = [self._rngs[i] for i in indices]
        if self.config.sample_patient:
            patients = np.array([int(rng.integers(n_pat)) for rng in rngs], dtype=np.intp)
        else:
            patients = indices % n_pat
        b.reset_many(indices, rngs, patients)

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        """Reset every sub-environment; ``seed`` (int ``s`` or one per env) reseeds them."""
        if isinstance(seed, numbers.Integral):
            seeds: list[int | None] = [int(seed) + i for i in range(self.num_envs)]
        elif seed is None:
            seeds = [None] * self.num_envs
        else:
            seeds = list(seed)  # type: ignore[arg-type]  # an Integral was handled above
            if len(seeds) != self.num_envs:
                raise ConfigError(
                    "seed", seed, f"an int or a list of {self.num_envs} seeds (one per env)"
                )
        if seed is not None or not self._rngs:
            self._rngs = [gym.utils.seeding.np_random(s)[0] for s in seeds]
        self._reset_envs(np.arange(self.num_envs))
        self._autoreset[:] = False
        return self._batch.obs.copy(), self._info()

    def step(
        self, actions: NDArray[np.float32]
    ) -> tuple[
        NDArray[np.float32],
        NDArray[np.float64],
        NDArray[np.bool_],
        NDArray[np.bool_],
        dict[str, Any],
    ]:
        """Step every sub-environment (next-step autoreset for those that ended)."""
        if not self._rngs:
            raise ResetNeededError("T1DVectorEnv.step: call reset() first")
        b = self._batch
        a = check_action(actions, self._shape)
        if self._autoreset.any():
            done = np.flatnonzero(self._autoreset)
            self._reset_envs(done)
            b.step(a, active=~self._autoreset)
        else:
            b.step(a)
        reward, terminated, truncated = b.reward.copy(), b.terminated.copy(), b.truncated.copy()
        ended = terminated | truncated
        if self.autoreset_mode is AutoresetMode.NEXT_STEP or not ended.any():
            self._autoreset = ended
            return b.obs.copy(), reward, terminated, truncated, self._info()
        final_obs = np.empty(self.num_envs, dtype=object)
        for i in np.flatnonzero(ended):
            final_obs[i] = b.obs[i].copy()
        final_info = self._info()
        self._reset_envs(np.flatnonzero(ended))
        info = self._info()
        info.update(
            final_obs=final_obs, _final_obs=ended, final_info=final_info, _final_info=ended.copy()
        )
        return b.obs.copy(), reward, terminated, truncated, info

    def _info(self) -> dict[str, Any]:
        s = self._batch.scal
        info = {
            "bg_mg_dl": s[:, S_BG].copy(),
            "cgm_mg_dl": s[:, S_CGM].copy(),
            "insulin_u": s[:, S_INSULIN].copy(),
            "carbs_g": s[:, S_CARBS].copy(),
            "iob_u": s[:, S_IOB].copy(),
            "meal_announced_g": s[:, S_ANNOUNCED].copy(),
            "time_min": s[:, S_T].astype(np.int64) * self.config.control_period_min,
            "patient": self._names[self._batch.patient_index],
        }
        every = np.ones(self.num_envs, dtype=np.bool_)  # Gymnasium's per-key masks: all set
        info.update({f"_{key}": every for key in list(info)})
        return info
