"""Named rewards for training insulin policies on ``twinloop/T1D-v0`` (the env's ``reward_fn``).

Each entry of :data:`REWARDS` is a factory ``make(**params) -> RewardFn | None``; the
:data:`twinloop.plant.glucose.env_core.RewardFn` it returns is called once per step with arrays of
shape ``(N,)``: ``reward_fn(bg_mg_dl, cgm_mg_dl, insulin_u, carbs_g) -> reward`` (true plasma
glucose and CGM at the end of the step in mg/dL, insulin delivered and carbs swallowed during the
step in U and g). ``None`` keeps the env's compiled default.

* ``risk`` — the env's default ``1 − risk(BG)/100`` with the Kovatchev risk, in ``[0, 1]``.
* ``risk_hypo`` — ``1 − (hypo_weight·r_low + r_high)/100`` where ``r_low``/``r_high`` are the
  Kovatchev risk's hypo- and hyperglycaemic parts: the same shape with heavier lows.
* ``tir`` — 1 inside ``[70, 180]`` mg/dL, ``−hypo_penalty`` below 70 and twice that below 54,
  and ``−(BG − 180)/hyper_scale_mg_dl`` above 180 (a time-in-range reward with a heavy hypo
  penalty).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.glucose.env_core import RewardFn
from twinloop.plant.glucose.metrics import (
    KOVATCHEV_ALPHA,
    KOVATCHEV_BETA,
    KOVATCHEV_GAMMA,
    KOVATCHEV_RISK_SCALE,
)
from twinloop.policies.errors import PolicyConfigError

F64 = NDArray[np.float64]


def risk() -> RewardFn | None:
    """Return ``None``: keep the env's default Kovatchev-risk reward, compiled in its step."""
    return None


def risk_hypo(hypo_weight: float = 3.0) -> RewardFn:
    """Kovatchev-risk reward with the hypoglycaemic side weighted ``hypo_weight`` (>= 1) times."""
    if not 1.0 <= float(hypo_weight) <= 100.0:
        raise PolicyConfigError(f"reward.hypo_weight: {hypo_weight!r} is not allowed: 1..100")
    w = float(hypo_weight)

    def reward(bg: F64, cgm: F64, insulin: F64, carbs: F64) -> F64:
        f = KOVATCHEV_ALPHA * (np.log(np.maximum(bg, 1.0)) ** KOVATCHEV_BETA - KOVATCHEV_GAMMA)
        r = KOVATCHEV_RISK_SCALE * f * f
        out: F64 = 1.0 - np.where(f < 0.0, w * r, r) / 100.0
        return out

    return reward


def tir(hypo_penalty: float = 5.0, hyper_scale_mg_dl: float = 200.0) -> RewardFn:
    """Time-in-range reward: 1 in 70–180, ``−hypo_penalty`` < 70 (×2 < 54), linear above 180."""
    if not 0.0 <= float(hypo_penalty) <= 1000.0:
        raise PolicyConfigError(f"reward.hypo_penalty: {hypo_penalty!r} is not allowed: 0..1000")
    if not float(hyper_scale_mg_dl) > 0.0:
        raise PolicyConfigError(
            f"reward.hyper_scale_mg_dl: {hyper_scale_mg_dl!r} is not allowed: > 0 mg/dL"
        )
    p, scale = float(hypo_penalty), float(hyper_scale_mg_dl)

    def reward(bg: F64, cgm: F64, insulin: F64, carbs: F64) -> F64:
        out: F64 = np.where(
            bg < 54.0,
            -2.0 * p,
            np.where(bg < 70.0, -p, np.where(bg <= 180.0, 1.0, -(bg - 180.0) / scale)),
        )
        return out

    return reward


#: Reward names → factories (keyword parameters from the config's ``reward`` mapping).
REWARDS: dict[str, Callable[..., RewardFn | None]] = {
    "risk": risk,
    "risk_hypo": risk_hypo,
    "tir": tir,
}


def parse_reward(value: object) -> tuple[str, dict[str, Any]]:
    """``reward: NAME`` or ``reward: {name: NAME, PARAM: VALUE…}`` → (name, params), checked."""
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, Mapping) and "name" in value:
        params = {str(k): v for k, v in value.items() if k != "name"}
        name = str(value["name"])
    else:
        raise PolicyConfigError(
            f"reward: {value!r} is not allowed: a name ({', '.join(REWARDS)}) or "
            "{name: NAME, PARAM: VALUE}"
        )
    if name not in REWARDS:
        raise PolicyConfigError(
            f"reward: unknown reward {name!r}; rewards are {', '.join(REWARDS)}"
        )
    allowed = list(inspect.signature(REWARDS[name]).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PolicyConfigError(
            f"reward: unknown parameter(s) {', '.join(unknown)} of {name}; parameters are "
            f"{', '.join(allowed) or '(none)'}"
        )
    make_reward(name, params)  # validates the values
    return name, params


def make_reward(name: str, params: Mapping[str, Any]) -> RewardFn | None:
    """The env's ``reward_fn`` for a named reward (``None`` = the env's default)."""
    return REWARDS[name](**params)
