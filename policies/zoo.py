"""RL Baselines3 Zoo's hyperparameter format: the keys ``twinloop train`` reads the Zoo's way.

A Zoo hyperparameter file (``hyperparams/ppo.yml``) maps an env id to ``n_envs``,
``n_timesteps``, ``policy``, ``normalize``, ``policy_kwargs``, ``frame_stack``, ``env_wrapper``
and the algorithm's constructor arguments, where learning rates and clip ranges may be
``lin_<x>`` schedules and ``policy_kwargs`` is a Python expression *string*
(``"dict(net_arch=[64, 64], activation_fn=nn.ReLU)"``). This module parses those values:

* :func:`parse_expression` reads such a string **without evaluating it**: an :mod:`ast` walk that
  allows literals (numbers, strings, ``True``/``False``/``None``, lists, tuples, dicts),
  ``dict(k=v, ...)`` calls, unary minus and activation names (``nn.ReLU``, ``th.nn.Tanh``,
  ``torch.nn.ELU``) — anything else (another call, an attribute, a name, an operator) is refused
  naming what it found;
* :func:`parse_normalize` turns ``normalize`` (``true``, or ``"{'norm_obs': True, 'norm_reward':
  False}"``, or a mapping) into :class:`NormalizeSettings` (SB3's ``VecNormalize`` arguments);
* :func:`parse_schedule` checks ``lin_<x>`` and :func:`schedule` makes it a linear decay;
* :class:`ObservationFilter` applies what ``VecNormalize`` (frozen statistics) and
  ``VecFrameStack`` did to the training observations to one observation of the loop, so a saved
  policy sees in the loop what it saw in training. Its description is plain JSON in
  ``policy.json`` (``observation_filter``): no pickle is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from twinloop.policies.errors import PolicyConfigError

#: Activation names a ``policy_kwargs`` expression may use (``nn.<name>``), by SB3 class name,
#: mapped to the names of ``policy_kwargs.activation_fn`` in a YAML mapping.
ACTIVATION_CLASSES = {
    "Tanh": "tanh",
    "ReLU": "relu",
    "ELU": "elu",
    "LeakyReLU": "leaky_relu",
    "SiLU": "silu",
}
#: Module prefixes an activation may be written with (``nn.ReLU``, ``th.nn.ReLU`` …).
_ACTIVATION_MODULES = (("nn",), ("th", "nn"), ("torch", "nn"))
#: ``VecNormalize`` arguments a ``normalize`` value may set.
NORMALIZE_KEYS = ("norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon")
#: Zoo keys refused because twinloop's native vector envs cannot take them (with the reason).
UNSUPPORTED_ZOO_KEYS = {
    "env_wrapper": "twinloop's envs are native batched vector envs, not per-sub-env Gymnasium "
    "envs that a wrapper class can wrap; choose the observation, action and reward with the "
    "observation/action/reward keys (twinloop/T1D-v0) or env (twinloop/KneeExo-v0)",
    "vec_env_wrapper": "only normalize (VecNormalize) and frame_stack (VecFrameStack) are "
    "applied, because a saved policy must replay them in the loop",
    "callback": "callbacks are not named in the config (its code would be imported); "
    "twinloop train adds checkpoints (checkpoint_freq) and the clinical evaluation (eval)",
}


def _dotted(node: ast.expr) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return tuple(reversed(parts))
    return None


def _literal(node: ast.expr, field: str) -> Any:
    if isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, bool | int | float | str)
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand, field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyConfigError(f"{field}: a sign applies to numbers only")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e, field) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise PolicyConfigError(f"{field}: ** unpacking is not allowed")
        pairs = zip(node.keys, node.values, strict=True)
        return {_literal(k, field): _literal(v, field) for k, v in pairs}  # type: ignore[arg-type]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "dict"
        and not node.args
        and all(k.arg is not None for k in node.keywords)
    ):
        return {str(k.arg): _literal(k.value, field) for k in node.keywords}
    dotted = _dotted(node)
    if dotted and dotted[:-1] in _ACTIVATION_MODULES and dotted[-1] in ACTIVATION_CLASSES:
        return ACTIVATION_CLASSES[dotted[-1]]
    found = ast.unparse(node)[:60]
    raise PolicyConfigError(
        f"{field}: {found!r} is not allowed: the expression may hold numbers, strings, "
        "True/False/None, lists, tuples, dicts, dict(key=value, ...) and the activations "
        f"{', '.join('nn.' + a for a in ACTIVATION_CLASSES)} (nothing is evaluated)"
    )


def parse_expression(text: str, field: str) -> Any:
    """The value of a Zoo Python-expression string, read without evaluating anything.

    Raises:
        PolicyConfigError: not an expression, or one with anything but the allowed forms (the
            message names the field and the part refused).

    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise PolicyConfigError(
            f"{field}: {text[:60]!r} is not allowed: a Python literal such as "
            "dict(net_arch=[64, 64], activation_fn=nn.Tanh)"
        ) from None
    return _literal(tree.body, field)


def parse_policy_kwargs(value: object) -> object:
    """``policy_kwargs`` as a mapping: a Zoo expression string is parsed (never evaluated)."""
    if isinstance(value, str):
        return parse_expression(value, "policy_kwargs")
    return value


@dataclasses.dataclass(frozen=True)
class NormalizeSettings:
    """SB3 ``VecNormalize`` arguments of a ``normalize`` key (the Zoo's defaults are SB3's)."""

    norm_obs: bool = True
    norm_reward: bool = True
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    gamma: float | None = None  # None: the algorithm's gamma (as the Zoo does)
    epsilon: float = 1e-8

    def kwargs(self, algorithm_gamma: float) -> dict[str, Any]:
        """``VecNormalize``'s keyword arguments."""
        out = dataclasses.asdict(self)
        out["gamma"] = algorithm_gamma if self.gamma is None else self.gamma
        return out


def parse_normalize(value: object) -> NormalizeSettings | None:
    """The Zoo's ``normalize`` as ``VecNormalize`` arguments, or None.

    ``false``/absent → None; ``true`` → SB3's defaults; a mapping (or its Python-literal
    string, as the Zoo writes it) → those arguments.

    Raises:
        PolicyConfigError: another value, an unknown argument or a bad value.

    """
    if value is None or value is False:
        return None
    if value is True:
        return NormalizeSettings()
    mapping = parse_expression(value, "normalize") if isinstance(value, str) else value
    if not isinstance(mapping, Mapping):
        raise PolicyConfigError(
            f"normalize: {value!r} is not allowed: true, false or a mapping of "
            f"{', '.join(NORMALIZE_KEYS)} (as the Zoo writes it: "
            "\"{'norm_obs': True, 'norm_reward': False}\")"
        )
    unknown = sorted(set(map(str, mapping)) - set(NORMALIZE_KEYS))
    if unknown:
        raise PolicyConfigError(
            f"normalize: unknown key(s) {', '.join(unknown)}; keys are {', '.join(NORMALIZE_KEYS)}"
        )
    kwargs: dict[str, Any] = {}
    for key, v in mapping.items():
        if key in ("norm_obs", "norm_reward"):
            if not isinstance(v, bool):
                raise PolicyConfigError(f"normalize.{key}: {v!r} is not allowed: True or False")
        elif key == "gamma" and v is None:
            pass
        elif isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
            raise PolicyConfigError(f"normalize.{key}: {v!r} is not allowed: a number > 0")
        elif key == "gamma" and v > 1:
            raise PolicyConfigError(f"normalize.gamma: {v!r} is not allowed: 0 < gamma <= 1")
        kwargs[str(key)] = v if isinstance(v, bool) or v is None else float(v)
    return NormalizeSettings(**kwargs)


#: Hyperparameters the Zoo lets be ``lin_<x>`` schedules.
SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf")


def parse_schedule(key: str, value: object) -> None:
    """Check a ``lin_<x>`` value (x a finite number > 0), or refuse naming the key."""
    if isinstance(value, str):
        try:
            start = float(value[4:]) if value.startswith("lin_") else math.nan
        except ValueError:
            start = math.nan
        if not math.isfinite(start) or start <= 0 or key not in SCHEDULE_KEYS:
            where = ", ".join(SCHEDULE_KEYS)
            raise PolicyConfigError(
                f"{key}: {value!r} is not allowed: a number, or lin_<number> (a linear "
                f"decay to 0, RL Zoo's schedule) for {where}"
            )


def schedule(value: Any) -> Any:
    """Zoo's ``lin_<x>``: a rate decaying linearly from ``x`` to 0 over training."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])

        def rate(progress_remaining: float) -> float:
            return progress_remaining * start

        return rate
    return value


#: The Zoo's ``noise_type`` values (SB3's action noise classes).
NOISE_TYPES = ("normal", "ornstein-uhlenbeck")


def parse_action_noise(
    noise_type: object, noise_std: object, algorithm: str
) -> tuple[str, float] | None:
    """The Zoo's ``noise_type``/``noise_std`` (off-policy exploration noise), checked, or None."""
    if noise_type is None and noise_std is None:
        return None
    if algorithm == "ppo":
        raise PolicyConfigError(
            "noise_type/noise_std: PPO takes no action noise (its policy is stochastic); "
            "they are SAC's"
        )
    if noise_type not in NOISE_TYPES:
        raise PolicyConfigError(
            f"noise_type: {noise_type!r} is not allowed: {', '.join(NOISE_TYPES)}"
        )
    number = isinstance(noise_std, int | float) and not isinstance(noise_std, bool)
    if not number or not 0 < noise_std < math.inf:  # type: ignore[operator]
        raise PolicyConfigError(f"noise_std: {noise_std!r} is not allowed: a number > 0")
    return str(noise_type), float(noise_std)  # type: ignore[arg-type]


def make_action_noise(noise_type: str, noise_std: float, shape: tuple[int, ...] | None) -> Any:
    """SB3's action noise of the Zoo's ``noise_type`` with σ = ``noise_std`` per action."""
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    size = int(np.prod(shape or (1,)))
    cls = NormalActionNoise if noise_type == "normal" else OrnsteinUhlenbeckActionNoise
    return cls(mean=np.zeros(size), sigma=noise_std * np.ones(size))


def parse_frame_stack(value: object) -> int | None:
    """The Zoo's ``frame_stack`` (observations stacked by ``VecFrameStack``): 2 to 64, or None."""
    if value is None or value is False or value == 1:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 64:
        raise PolicyConfigError(
            f"frame_stack: {value!r} is not allowed: an integer from 1 to 64 (1 = no stacking)"
        )
    return value


@dataclasses.dataclass
class ObservationFilter:
    """What ``VecNormalize`` (frozen) and ``VecFrameStack`` did to training observations.

    Attributes:
        size: the env's observation size (one frame).
        mean, var: ``VecNormalize``'s observation statistics (``None``: not normalised).
        clip_obs, epsilon: its clipping bound and epsilon.
        frame_stack: frames stacked (1: none); the oldest first, zeros before the first.

    """

    size: int
    mean: NDArray[np.float64] | None = None
    var: NDArray[np.float64] | None = None
    clip_obs: float = 10.0
    epsilon: float = 1e-8
    frame_stack: int = 1
    _frames: NDArray[np.float32] | None = dataclasses.field(default=None, repr=False)

    def reset(self) -> None:
        """Forget the stacked frames (a new episode)."""
        self._frames = None

    def __call__(self, obs: NDArray[Any]) -> NDArray[np.float32]:
        """The policy's input for one observation ``(size,)``: normalised, then stacked."""
        x = np.asarray(obs, np.float64).reshape(self.size)
        if self.mean is not None and self.var is not None:
            x = (x - self.mean) / np.sqrt(self.var + self.epsilon)
            x = np.clip(x, -self.clip_obs, self.clip_obs)
        frame = x.astype(np.float32)
        if self.frame_stack == 1:
            return frame
        if self._frames is None:
            self._frames = np.zeros(self.size * self.frame_stack, np.float32)
        self._frames[: -self.size] = self._frames[self.size :].copy()
        self._frames[-self.size :] = frame
        return self._frames.copy()

    def describe(self) -> dict[str, Any]:
        """The ``observation_filter`` section of ``policy.json`` (plain JSON)."""
        normalize = None
        if self.mean is not None and self.var is not None:
            normalize = {
                "mean": [float(v) for v in self.mean],
                "var": [float(v) for v in self.var],
                "clip_obs": self.clip_obs,
                "epsilon": self.epsilon,
            }
        return {"size": self.size, "normalize": normalize, "frame_stack": self.frame_stack}

    @classmethod
    def from_description(cls, value: object, label: str) -> ObservationFilter:
        """From ``policy.json``'s ``observation_filter`` (checked)."""
        bad = PolicyConfigError(
            f"policy {label}: observation_filter: {str(value)[:80]} is not allowed: "
            "{size, normalize: null or {mean, var, clip_obs, epsilon}, frame_stack}"
        )
        if not isinstance(value, Mapping):
            raise bad
        try:
            size = int(value["size"])
            stack = int(value.get("frame_stack", 1))
            norm = value.get("normalize")
            if not 1 <= size <= 100_000 or not 1 <= stack <= 64:
                raise ValueError(size)
            if norm is None:
                return cls(size=size, frame_stack=stack)
            mean = np.asarray(norm["mean"], np.float64)
            var = np.asarray(norm["var"], np.float64)
            clip_obs, eps = float(norm["clip_obs"]), float(norm["epsilon"])
        except (KeyError, TypeError, ValueError):
            raise bad from None
        if (
            mean.shape != (size,)
            or var.shape != (size,)
            or not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all())
        ):
            raise bad
        return cls(size, mean, var, clip_obs, eps, stack)


class FilteredPolicy:
    """A loaded policy whose ``predict`` first applies an :class:`ObservationFilter`.

    Its ``observation_space`` is one frame's (the env's), so the loop's checks and callers see
    the observation they build; ``reset()`` starts a new episode's frame stack.
    """

    def __init__(self, policy: Any, obs_filter: ObservationFilter) -> None:
        from gymnasium import spaces

        self.policy = policy
        self.filter = obs_filter
        self.action_space = policy.action_space
        inner = policy.observation_space
        low = np.full(obs_filter.size, -np.inf, np.float32)
        self.observation_space = spaces.Box(low, -low, dtype=inner.dtype)

    def reset(self) -> None:
        """Forget the stacked frames."""
        self.filter.reset()

    def predict(self, observation: NDArray[Any], *args: Any, **kwargs: Any) -> Any:
        """The wrapped policy's ``predict`` on the filtered observation."""
        return self.policy.predict(self.filter(observation), *args, **kwargs)


def filtered(policy: Any, meta: Mapping[str, Any], label: str) -> Any:
    """``policy``, wrapped in a :class:`FilteredPolicy` when ``meta`` has an observation filter.

    A fresh wrapper each call: its frame stack belongs to one controller.
    """
    description = meta.get("observation_filter")
    if description is None:
        return policy
    obs_filter = ObservationFilter.from_description(description, label)
    if obs_filter.mean is None and obs_filter.frame_stack == 1:
        return policy
    return FilteredPolicy(policy, obs_filter)


def make_filter(size: int, normalize: Any | None, frame_stack: int | None) -> ObservationFilter:
    """The filter of a training env: ``normalize`` is its ``VecNormalize`` (or None)."""
    if normalize is None or not normalize.norm_obs:
        return ObservationFilter(size, frame_stack=frame_stack or 1)
    rms = normalize.obs_rms
    return ObservationFilter(
        size,
        np.asarray(rms.mean, np.float64).copy(),
        np.asarray(rms.var, np.float64).copy(),
        float(normalize.clip_obs),
        float(normalize.epsilon),
        frame_stack or 1,
    )
