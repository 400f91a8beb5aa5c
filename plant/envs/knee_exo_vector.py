"""Native batched ``twinloop/KneeExo-v0``: N knees + exoskeletons in one compiled step."""

from __future__ import annotations

import numbers
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from numpy.typing import NDArray

from plant.envs.knee_exo import info_of, make_spaces
from plant.envs.knee_exo_core import KneeExoBatch, KneeExoConfig, check_action, config_from_kwargs
from plant.errors import ConfigError, ResetNeededError


class KneeExoVectorEnv(VectorEnv[NDArray[np.float32], NDArray[np.float32], NDArray[Any]]):
    """``num_envs`` copies of :class:`~plant.envs.knee_exo.KneeExoEnv` stepped in one call.

    Spaces, reward, termination and truncation are those of ``KneeExoEnv`` (see its env card),
    batched along a first axis. Sub-environment ``i`` gets patient ``i mod len(patients)`` and
    task ``i mod len(tasks)`` unless ``sample_patient``/``sample_task``.

    Seeding: ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i``; its trajectory is
    then identical to that of a ``KneeExoEnv`` with the same configuration reset with seed
    ``s + i`` and ``options={"patient": i mod P, "task": i mod T}`` (the serial and parallel
    compiled steps give the same numbers).

    Autoreset (``autoreset_mode``, in ``metadata["autoreset_mode"]``): ``NEXT_STEP`` (default)
    or ``SAME_STEP`` (with ``info["final_obs"]``/``info["final_info"]`` and their masks), as
    :class:`plant.envs.t1d_vector.T1DVectorEnv`; ``SAME_STEP`` is what
    :class:`policies.sb3_vec_env.SB3VecEnv` needs.

    Info: the keys of ``KneeExoEnv``'s info as arrays of shape ``(num_envs,)`` with Gymnasium's
    ``_key`` masks (all true).
    """

    metadata: dict[str, Any] = {  # noqa: RUF012
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": [],
    }

    def __init__(
        self,
        num_envs: int = 1,
        config: KneeExoConfig | None = None,
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
        self.autoreset_mode = modes[key]
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        if not (isinstance(num_envs, int) and num_envs >= 1):
            raise ConfigError("num_envs", num_envs, "an integer >= 1")
        self.config = config
        self.num_envs = num_envs
        self._batch = KneeExoBatch(config, num_envs)
        self.single_action_space, self.single_observation_space = make_spaces(config)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs: list[np.random.Generator] = []
        self._autoreset = np.zeros(num_envs, dtype=np.bool_)
        self._names = np.array(self._batch.names, dtype=object)
        self._every = np.ones(num_envs, dtype=np.bool_)

    def _reset_envs(self, indices: NDArray[np.intp]) -> None:
        b = self._batch
        rngs = [self._rngs[i] for i in indices]
        choice = []
        for n, sample in (
            (len(b.table), self.config.sample_patient),
            (len(b.tasks), self.config.sample_task),
        ):
            if sample:
                choice.append(np.array([int(r.integers(n)) for r in rngs], dtype=np.intp))
            else:
                choice.append(indices % n)
        b.reset_many(indices, rngs, choice[0], choice[1])

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
            raise ResetNeededError("KneeExoVectorEnv.step: call reset() first")
        b = self._batch
        a = check_action(actions, self.num_envs)
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

    def _info(self) -> dict[str, Any]:
        b = self._batch
        info: dict[str, Any] = {k: np.array(v) for k, v in info_of(b, slice(None)).items()}
        info["patient"] = self._names[b.patient_index]
        info["task"] = b.task_index.copy()
        info.update({f"_{key}": self._every for key in list(info)})
        return info
