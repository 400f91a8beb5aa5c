"""``twinloop/T1D-v0``: one virtual type-1-diabetes patient (UVA/Padova 2008) as a Gymnasium env."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ResetNeededError, UnknownPatientError
from twinloop.plant.glucose.env_core import (
    OBS_MAX_IOB_U,
    OBS_MAX_MEAL_G,
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


def make_spaces(config: T1DConfig) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Action and observation spaces of one environment for ``config``."""
    if config.bolus_action:
        action_space = gym.spaces.Box(
            low=np.zeros(2, dtype=np.float32),
            high=np.array([config.max_basal_u_per_h, config.max_bolus_u], dtype=np.float32),
            dtype=np.float32,
        )
    else:
        action_space = gym.spaces.Box(
            low=0.0, high=config.max_basal_u_per_h, shape=(1,), dtype=np.float32
        )
    low = [config.cgm.min_mg_dl] * config.history_len
    high = [config.cgm.max_mg_dl] * config.history_len
    if config.include_iob:
        low.append(0.0)
        high.append(OBS_MAX_IOB_U)
    if config.include_meal:
        low.append(0.0)
        high.append(OBS_MAX_MEAL_G)
    observation_space = gym.spaces.Box(
        low=np.array(low, dtype=np.float32), high=np.array(high, dtype=np.float32), dtype=np.float32
    )
    return action_space, observation_space


class T1DEnv(gym.Env[NDArray[Any], NDArray[Any]]):
    """One virtual patient with type 1 diabetes, treated by an insulin pump, seen through a CGM.

    ## Description
    The plant is the UVA/Padova 2008 model (13 states, see :mod:`twinloop.plant.glucose.uva_padova`)
    of one of the 30 virtual patients, stepped at 1 min with the patient's meals from a scenario
    (the random six-slot daily protocol by default). Each environment step lasts
    ``control_period_min`` (5 min by default): the action is held over it by the pump, the plant
    advances, and the CGM returns a noisy reading of subcutaneous glucose.

    ## Action space
    ``Box(0, max_basal_u_per_h, (1,), float32)``: the basal rate in **U/h** for the step. With
    ``bolus_action=True``: ``Box([0, 0], [max_basal_u_per_h, max_bolus_u], (2,))``, the basal
    rate in U/h and a bolus in **U** delivered within the step's first minute. Actions outside the
    space are clipped to it; the pump then rounds *down* to its increments (0.05 U/h, 0.05 U)
    and caps at its maxima. A NaN action raises :class:`twinloop.plant.errors.InvalidInputError`.

    ## Observation space
    ``Box(float32)`` of length ``history_len + include_iob + include_meal``:

    | index | meaning | unit | min | max |
    |---|---|---|---|---|
    | 0 … history_len−1 | CGM readings, oldest first, one per step | mg/dL | 40 | 400 |
    | next, if ``include_iob`` | insulin on board (exponential curve) | U | 0 | 500 |
    | last, if ``include_meal`` | announced carbs starting in the coming step | g | 0 | 1000 |

    The CGM bounds are the CGM's clipping range (``cgm.min_mg_dl``, ``cgm.max_mg_dl``); the
    insulin-on-board curve peaks at 75 min with a 6-h duration of action by default.

    ## Reward
    By default ``1 − risk(BG)/100`` in ``[0, 1]``, with the Kovatchev risk
    ``r = 10·(1.509·(ln(BG)^1.084 − 5.381))²`` of true plasma glucose at the end of the step
    (1 at 112.5 mg/dL, falling towards 0 in severe hypo- or hyperglycaemia). A custom
    ``reward_fn(bg_mg_dl, cgm_mg_dl, insulin_u, carbs_g)`` on arrays of shape ``(1,)`` replaces
    it (see :data:`twinloop.plant.glucose.env_core.RewardFn`).

    Stepping before ``reset()`` or after the episode ended raises
    :class:`twinloop.plant.errors.ResetNeededError`.

    ## Starting state
    The patient's default initial state (basal steady state), the first CGM reading repeated
    over the history, insulin on board of the basal rate; meals and CGM noise are drawn from
    ``np_random`` at reset (child generators), so the same seed gives the same episode.

    ## Episode end
    *Terminated* when true plasma glucose leaves ``[terminate_below_mg_dl,
    terminate_above_mg_dl]`` (40 and 600 mg/dL by default). *Truncated* after
    ``episode_days`` (1 day = 288 steps of 5 min).

    ## Info
    ``bg_mg_dl`` (true plasma glucose), ``cgm_mg_dl``, ``insulin_u`` (delivered during the step),
    ``carbs_g`` (swallowed during the step), ``iob_u``, ``meal_announced_g`` (coming step),
    ``time_min`` (minutes since the episode start) and ``patient``.

    ## Arguments
    Keyword arguments are the fields of :class:`twinloop.plant.glucose.env_core.T1DConfig`, or
    ``config=`` one instance; ``patient="adult#001"`` is accepted for ``patients``.

    ## Version history
    * v0: initial version.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, config: T1DConfig | None = None, **kwargs: Any) -> None:
        config = config_from_kwargs(config, kwargs)
        self.config = config
        self._batch = T1DBatch(config, 1)
        self.action_space, self.observation_space = make_spaces(config)
        self._shape = (1, 2 if config.bolus_action else 1)
        self._needs_reset = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        """Start an episode; ``seed`` reseeds ``np_random``, which draws everything random.

        ``options={"patient": NAME}`` picks that patient (one of the configured ones) for this
        episode instead of the first or a random one.
        """
        super().reset(seed=seed)
        b = self._batch
        names = [p.name for p in b.table]
        chosen = (options or {}).get("patient")
        if chosen is not None:
            if chosen not in names:
                raise UnknownPatientError("options['patient']", str(chosen), names)
            patient = names.index(chosen)
        elif self.config.sample_patient:
            patient = int(self.np_random.integers(len(names)))
        else:
            patient = 0
        b.reset_many(np.zeros(1, dtype=np.intp), [self.np_random], np.array([patient]))
        self._needs_reset = False
        return b.obs[0].copy(), self._info()

    def step(
        self, action: NDArray[np.float32]
    ) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        """Hold ``action`` for one control period and return the new CGM-based observation."""
        if self._needs_reset:
            raise ResetNeededError(
                "T1DEnv.step: call reset() first (before the first step and after an episode "
                "terminates or is truncated)"
            )
        b = self._batch
        b.step(check_action(action, self._shape))
        self._needs_reset = bool(b.terminated[0] or b.truncated[0])
        return (
            b.obs[0].copy(),
            float(b.reward[0]),
            bool(b.terminated[0]),
            bool(b.truncated[0]),
            self._info(),
        )

    def _info(self) -> dict[str, Any]:
        s = self._batch.scal[0]
        return {
            "bg_mg_dl": float(s[S_BG]),
            "cgm_mg_dl": float(s[S_CGM]),
            "insulin_u": float(s[S_INSULIN]),
            "carbs_g": float(s[S_CARBS]),
            "iob_u": float(s[S_IOB]),
            "meal_announced_g": float(s[S_ANNOUNCED]),
            "time_min": int(s[S_T]) * self.config.control_period_min,
            "patient": self._batch.table[int(self._batch.patient_index[0])].name,
        }
