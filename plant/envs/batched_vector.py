"""What the native batched vector environments share: seeding, autoreset, the step protocol.

A subclass holds a compiled batch (``self._batch``) with ``obs``, ``reward``, ``terminated``,
``truncated`` arrays and ``step(action, active=None)``, and provides ``_reset_envs(indices)``
(draws from ``self._rngs``), ``_check_action(actions)`` and ``_info()``. This base class gives
both :class:`~twinloop.plant.glucose.env_vector.T1DVectorEnv` and
:class:`~twinloop.plant.knee.env_vector.KneeExoVectorEnv` the same Gymnasium 1.x semantics:

* ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i`` (or one seed per env);
* ``NEXT_STEP`` autoreset: the step after an episode ends resets that sub-environment,
  ignores its action and returns its first observation with reward 0 and both flags false;
* ``SAME_STEP`` autoreset: an ended sub-environment is reset within the step, its last
  observation and info in ``info["final_obs"]``/``info["final_info"]`` (with their masks).
"""

from __future__ import annotations

import numbers
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError, ResetNeededError


def autoreset_mode_of(value: AutoresetMode | str) -> AutoresetMode:
    """``NEXT_STEP`` or ``SAME_STEP`` from the enum or its name (``"same_step"`` …)."""
    modes = {"nextstep": AutoresetMode.NEXT_STEP, "samestep": AutoresetMode.SAME_STEP}
    key = str(getattr(value, "value", value)).replace("_", "").lower()
    if key not in modes:
        raise ConfigError("autoreset_mode", value, "next_step or same_step (or the AutoresetMode)")
    return modes[key]


class BatchedVectorEnv(VectorEnv[NDArray[np.float32], NDArray[np.float32], NDArray[Any]]):
    """Seeding, autoreset and stepping of a native batched environment (module docstring)."""

    metadata: dict[str, Any] = {  # noqa: RUF012
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": [],
    }
    _batch: Any

    def _setup(
        self,
        num_envs: int,
        autoreset_mode: AutoresetMode | str,
        spaces: tuple[gym.spaces.Box, gym.spaces.Box],
    ) -> None:
        """Common construction: the mode, the batched spaces, the generators, the flags."""
        self.autoreset_mode = autoreset_mode_of(autoreset_mode)
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError("num_envs", num_envs, "an integer >= 1")
        self.num_envs = num_envs
        self.single_action_space, self.single_observation_space = spaces
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs: list[np.random.Generator] = []
        self._autoreset = np.zeros(num_envs, dtype=np.bool_)

    def _reset_envs(self, indices: NDArray[np.intp]) -> None:
        raise NotImplementedError

    def _check_action(self, actions: NDArray[np.float32]) -> NDArray[np.float64]:
        raise NotImplementedError

    def _info(self) -> dict[str, Any]:
        raise NotImplementedError

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
        """Step every sub-environment (autoreset per ``autoreset_mode``)."""
        if not self._rngs:
            raise ResetNeededError(f"{type(self).__name__}.step: call reset() first")
        b = self._batch
        a = self._check_action(actions)
        if self._autoreset.any():
            self._reset_envs(np.flatnonzero(self._autoreset))
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
        self._autoreset[:] = False
        info = self._info()
        info.update(
            final_obs=final_obs, _final_obs=ended, final_info=final_info, _final_info=ended.copy()
        )
        return b.obs.copy(), reward, terminated, truncated, info
