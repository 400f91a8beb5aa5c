"""Native batched ``twinloop/T1D-v0``: N patients (or scenarios) in one compiled numpy step."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from numpy.typing import NDArray

from twinloop.plant.envs.batched_vector import BatchedVectorEnv
from twinloop.plant.glucose.env import make_spaces
from twinloop.plant.glucose.env_core import (
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


class T1DVectorEnv(BatchedVectorEnv):
    """``num_envs`` copies of :class:`~.env.T1DEnv` stepped together in one call.

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
      :class:`twinloop.policies.sb3_vec_env.SB3VecEnv` uses to feed stable-baselines3.

    Info: the keys of ``T1DEnv``'s info, each an array of shape ``(num_envs,)`` (``patient`` is
    an array of names), with Gymnasium's ``_key`` masks (always all true here).
    """

    def __init__(
        self,
        num_envs: int = 1,
        config: T1DConfig | None = None,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> None:
        config = config_from_kwargs(config, kwargs)
        self._setup(num_envs, autoreset_mode, make_spaces(config))
        self.config = config
        self._batch = T1DBatch(config, num_envs)
        self._shape = (num_envs, 2 if config.bolus_action else 1)
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

    def _check_action(self, actions: NDArray[np.float32]) -> NDArray[np.float64]:
        return check_action(actions, self._shape)

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
