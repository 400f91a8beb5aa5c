"""Native batched ``twinloop/KneeExo-v0``: N knees + exoskeletons in one compiled step."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from numpy.typing import NDArray

from twinloop.plant.envs.batched_vector import BatchedVectorEnv
from twinloop.plant.knee.env import info_of, make_spaces
from twinloop.plant.knee.env_core import (
    KneeExoBatch,
    KneeExoConfig,
    check_action,
    config_from_kwargs,
)


class KneeExoVectorEnv(BatchedVectorEnv):
    """``num_envs`` copies of :class:`~twinloop.plant.knee.env.KneeExoEnv` stepped in one call.

    Spaces, reward, termination and truncation are those of ``KneeExoEnv`` (see its env card),
    batched along a first axis. Sub-environment ``i`` gets patient ``i mod len(patients)`` and
    task ``i mod len(tasks)`` unless ``sample_patient``/``sample_task``.

    Seeding: ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i``; its trajectory is
    then identical to that of a ``KneeExoEnv`` with the same configuration reset with seed
    ``s + i`` and ``options={"patient": i mod P, "task": i mod T}`` (the serial and parallel
    compiled steps give the same numbers).

    Autoreset (``autoreset_mode``, in ``metadata["autoreset_mode"]``): ``NEXT_STEP`` (default)
    or ``SAME_STEP`` (with ``info["final_obs"]``/``info["final_info"]`` and their masks), as
    :class:`twinloop.plant.glucose.env_vector.T1DVectorEnv`; ``SAME_STEP`` is what
    :class:`twinloop.policies.sb3_vec_env.SB3VecEnv` needs.

    Info: the keys of ``KneeExoEnv``'s info as arrays of shape ``(num_envs,)`` with Gymnasium's
    ``_key`` masks (all true).
    """

    def __init__(
        self,
        num_envs: int = 1,
        config: KneeExoConfig | None = None,
        *,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> None:
        config = config_from_kwargs(config, kwargs)
        self._setup(num_envs, autoreset_mode, make_spaces(config))
        self.config = config
        self._batch = KneeExoBatch(config, num_envs)
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

    def _check_action(self, actions: NDArray[np.float32]) -> NDArray[np.float64]:
        return check_action(actions, self.num_envs)

    def _info(self) -> dict[str, Any]:
        b = self._batch
        info: dict[str, Any] = {k: np.array(v) for k, v in info_of(b, slice(None)).items()}
        info["patient"] = self._names[b.patient_index]
        info["task"] = b.task_index.copy()
        info.update({f"_{key}": self._every for key in list(info)})
        return info
