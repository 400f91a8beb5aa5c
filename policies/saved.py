"""The saved-policy format: ``policy.pt`` (network weights) + ``policy.json`` (metadata).

``twinloop train`` writes one directory per seed (``seed_<s>/``) holding the network's weights
(:data:`WEIGHTS_FILE`: a torch ``state_dict`` of tensors only), its metadata
(:data:`METADATA_FILE`, format :data:`METADATA_FORMAT`, with the twinloop version that wrote it,
:func:`twinloop_version`, and a ``network`` section: the policy class, the observation and action
spaces and the network's constructor arguments as plain JSON) and, to resume training, the
stable-baselines3 archive (:data:`MODEL_FILE`).

**Loading runs no code of the file.** :func:`load_model` rebuilds the policy network from the
JSON ``network`` section (classes only from allow-lists: :data:`POLICY_CLASSES`,
:data:`ACTIVATIONS`, :data:`FEATURES_EXTRACTORS`, or what the therapy passes) and reads the
weights with ``torch.load(..., weights_only=True)``, which unpickles tensors and plain containers
and refuses any other object. A policy without that section (a plain SB3 ``model.zip``, whose
``data`` and ``policy.pth`` SB3 unpickles with cloudpickle: a crafted archive runs code) is
refused, unless the user trusts the file: ``--controller policy:pickle:PATH``
(:data:`TRUST_PICKLE_PREFIX`) loads it with SB3 and warns (:class:`PickleTrustWarning`).
:func:`convert_to_safe` re-saves such a policy in the safe format (``twinloop train
--convert DIR`` is not needed: ``python -m twinloop.policies.saved DIR`` does it, trusting DIR).

This module knows the format and nothing of any therapy: the paths of a saved policy
(:func:`policy_paths`), its metadata read and checked to be a twinloop policy file
(:func:`read_metadata_file`), the stable-baselines3 class of an algorithm
(:func:`algorithm_class`), the model loaded once per process (:func:`load_model`, cached by path
and modification time), and the pickling helpers of a learned controller that ship the model's
path instead of the torch module and reload it in the receiving process
(:func:`ships_model_path_getstate`, :func:`reloads_model_setstate`). The therapies' ``learned``
modules check the metadata's layouts and build their controllers on top of it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from twinloop.limits import InputLimitError, check_file, read_text
from twinloop.policies.errors import PolicyConfigError

__all__ = [
    "ALGORITHMS",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "MODEL_FILE",
    "TRUST_PICKLE_PREFIX",
    "WEIGHTS_FILE",
    "PickleTrustWarning",
    "algorithm_class",
    "convert_to_safe",
    "load_model",
    "network_description",
    "policy_paths",
    "read_metadata_file",
    "reloads_model_setstate",
    "ships_model_path_getstate",
    "split_trust",
    "twinloop_version",
    "write_weights",
]

METADATA_FILE = "policy.json"
MODEL_FILE = "model.zip"
WEIGHTS_FILE = "policy.pt"
METADATA_FORMAT = "twinloop-policy"

#: Written before a policy path (``policy:pickle:PATH``): trust the file's pickle (SB3 ``load``).
TRUST_PICKLE_PREFIX = "pickle:"

#: Largest ``policy.json`` read, bytes.
MAX_METADATA_BYTES = 1024 * 1024

#: Largest weights file read, bytes (the shipped policies' are < 1 MB).
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024

#: The policy network's class by algorithm (the only classes the safe format builds).
POLICY_CLASSES = {"ppo": "ActorCriticPolicy", "sac": "SACPolicy"}

#: Activation functions a ``network`` section may name (torch.nn classes).
ACTIVATIONS = ("Tanh", "ReLU", "ELU", "LeakyReLU", "SiLU")

#: Features extractors a ``network`` section may name without the therapy providing it.
FEATURES_EXTRACTORS = ("FlattenExtractor",)

#: Constructor arguments of the policy network kept in the ``network`` section (plain values).
_PLAIN_KWARGS = (
    "normalize_images",
    "net_arch",
    "use_sde",
    "log_std_init",
    "squash_output",
    "full_std",
    "use_expln",
    "ortho_init",
    "clip_mean",
    "n_critics",
    "share_features_extractor",
    "features_extractor_kwargs",
)


class PickleTrustWarning(UserWarning):
    """A policy was loaded with pickle because the user trusted it (``policy:pickle:PATH``)."""


#: Algorithms by name (stable-baselines3 classes, imported lazily).
ALGORITHMS = ("ppo", "sac")

#: Loaded models by (resolved path, modification time): a cohort shares one model.
_MODELS: dict[tuple[str, float, bool], Any] = {}


def clear_model_cache() -> None:
    """Forget the models loaded in this process (the next load reads the archive again)."""
    _MODELS.clear()


def algorithm_class(name: str) -> type[Any]:
    """The stable-baselines3 class of ``name`` (``ppo`` or ``sac``)."""
    from stable_baselines3 import PPO, SAC

    classes: dict[str, type[Any]] = {"ppo": PPO, "sac": SAC}
    if name not in classes:
        raise PolicyConfigError(
            f"algorithm: unknown algorithm {name!r}; algorithms are {', '.join(ALGORITHMS)}"
        )
    return classes[name]


def twinloop_version() -> str:
    """The installed twinloop's version, as written into ``policy.json`` (``unknown`` if none)."""
    try:
        return importlib_metadata.version("twinloop")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def shipped_policies() -> dict[str, Path]:
    """The policies shipped with twinloop by name (``t1d_ppo``, ``knee_sac``; ``NAME/seed_S``).

    A bare name is its ``seed_0``.
    """
    from importlib import resources

    root = Path(str(resources.files("twinloop.policies").joinpath("shipped")))
    found: dict[str, Path] = {}
    for policy in sorted(p for p in root.iterdir() if p.is_dir()):
        for seed in sorted(s for s in policy.iterdir() if (s / METADATA_FILE).is_file()):
            found[f"{policy.name}/{seed.name}"] = seed
        if (policy / "seed_0" / METADATA_FILE).is_file():
            found[policy.name] = policy / "seed_0"
    return found


def split_trust(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(path, trusted)``: ``pickle:PATH`` is ``PATH`` whose pickle the user trusts."""
    text = os.fspath(path)
    if text.startswith(TRUST_PICKLE_PREFIX):
        return text[len(TRUST_PICKLE_PREFIX) :], True
    return text, False


def resolve_policy(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists, else the shipped policy of that name (else ``path``).

    A leading ``pickle:`` (:data:`TRUST_PICKLE_PREFIX`) is not part of the path.
    """
    path, _ = split_trust(path)
    p = Path(path)
    if p.exists():
        return p
    return shipped_policies().get(str(path), p)


def policy_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(policy.json, model file)`` of the saved policy at ``path`` (its directory or a file).

    The model file is :data:`WEIGHTS_FILE` when the directory holds one (the safe format), else
    :data:`MODEL_FILE` (loaded only when trusted, see :func:`load_model`). ``path`` may also
    name a shipped policy (:func:`shipped_policies`: ``knee_sac``).

    Raises:
        PolicyConfigError: ``path`` does not exist.

    """
    p = resolve_policy(path)
    if p.is_dir():
        weights = p / WEIGHTS_FILE
        return p / METADATA_FILE, weights if weights.is_file() else p / MODEL_FILE
    if p.suffix == ".zip" or p.is_file():
        weights = p.parent / WEIGHTS_FILE
        if p.name == MODEL_FILE and weights.is_file():
            return p.parent / METADATA_FILE, weights
        return p.parent / METADATA_FILE, p
    raise PolicyConfigError(
        f"policy {path}: no such file or directory (a directory written by twinloop train, "
        f"holding {MODEL_FILE} and {METADATA_FILE}, or its {MODEL_FILE}) nor a shipped "
        f"policy ({', '.join(n for n in shipped_policies() if '/' not in n)})"
    )


def read_metadata_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``policy.json`` of the saved policy at ``path``, of any task family, unchecked.

    Raises:
        PolicyConfigError: the file is missing, not JSON, or not a twinloop policy file.

    """
    meta_path, _ = policy_paths(path)
    try:
        meta = json.loads(read_text(meta_path, MAX_METADATA_BYTES))
    except InputLimitError as exc:
        raise PolicyConfigError(f"policy {path}: {exc}") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PolicyConfigError(f"policy {path}: {meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise PolicyConfigError(
            f"policy {path}: {meta_path} is not a twinloop policy metadata file "
            f"(format {METADATA_FORMAT!r} expected)"
        )
    return meta


def load_model(
    algorithm: str,
    model_path: Path,
    label: str,
    custom_objects: dict[str, Any] | None = None,
    *,
    trust_pickle: bool = False,
) -> Any:
    """The policy in ``model_path`` (cached by path and mtime), with ``predict`` and spaces.

    A :data:`WEIGHTS_FILE` is loaded the safe way (:func:`load_safe_policy`; the metadata next
    to it describes the network): the result is the SB3 policy network, whose
    ``predict(obs, deterministic=True)`` is the model's. A :data:`MODEL_FILE` without weights
    next to it needs pickle: refused unless ``trust_pickle`` (``policy:pickle:PATH``), then
    loaded with SB3 (``custom_objects`` replaces entries of the archive's data instead of
    unpickling them) and a :class:`PickleTrustWarning` is issued. When ``policy.json`` has an
    ``observation_filter`` (a policy trained with ``normalize`` or ``frame_stack``), the result
    is a fresh :class:`twinloop.policies.zoo.FilteredPolicy` around the cached network: its
    ``predict`` takes the env's observation and applies the frozen ``VecNormalize`` statistics
    and the frame stack first.

    Raises:
        PolicyConfigError: the file is missing or cannot be loaded, needs pickle and is not
            trusted, or the algorithm is unknown.

    """
    if not model_path.is_file():
        raise PolicyConfigError(f"policy {label}: {model_path} is missing")
    key = (str(model_path.resolve()), model_path.stat().st_mtime, trust_pickle)
    if key not in _MODELS:
        _MODELS[key] = _load_model(algorithm, model_path, label, custom_objects, trust_pickle)
    meta_path = model_path.parent / METADATA_FILE
    if not meta_path.is_file():  # a bare model zip (trusted): no observation filter
        return _MODELS[key]
    from twinloop.policies.zoo import filtered

    return filtered(_MODELS[key], read_metadata_file(model_path), label)


def _load_model(
    algorithm: str,
    model_path: Path,
    label: str,
    custom_objects: dict[str, Any] | None,
    trust_pickle: bool,
) -> Any:
    if model_path.suffix == ".pt":
        meta = read_metadata_file(model_path)
        overrides = (custom_objects or {}).get("policy_kwargs") or {}
        return load_safe_policy(algorithm, model_path, meta, label, overrides)
    if not trust_pickle:
        raise PolicyConfigError(
            f"policy {label}: {model_path.name} needs pickle to load (it can run code) and the "
            f"directory has no {WEIGHTS_FILE}; refused. Re-save it safely with python -m "
            f"twinloop.policies.saved DIR, or trust this file: policy:{TRUST_PICKLE_PREFIX}PATH"
        )
    warnings.warn(
        f"policy {label}: loading {model_path} with pickle because it is trusted "
        f"({TRUST_PICKLE_PREFIX}); a crafted file runs code",
        PickleTrustWarning,
        stacklevel=3,
    )
    cls = algorithm_class(algorithm)
    try:
        if not zipfile.is_zipfile(model_path):
            raise ValueError("not a zip archive")
        model = cls.load(str(model_path), device="cpu", custom_objects=custom_objects)
    except Exception as exc:  # SB3/torch raise many kinds on a corrupt archive
        raise PolicyConfigError(
            f"policy {label}: cannot load {model_path} ({type(exc).__name__}: {exc})"
        ) from None
    return model


def _space_description(space: Any) -> dict[str, Any]:
    from gymnasium import spaces

    if not isinstance(space, spaces.Box):
        raise PolicyConfigError(f"the safe policy format stores Box spaces, not {space}")
    return {
        "shape": list(space.shape),
        "dtype": str(space.dtype),
        "low": [float(x) for x in space.low.reshape(-1)],
        "high": [float(x) for x in space.high.reshape(-1)],
    }


def _space(description: object, field: str) -> Any:
    import numpy as np
    from gymnasium import spaces

    try:
        assert isinstance(description, dict)
        shape = tuple(int(n) for n in description["shape"])
        dtype = np.dtype(str(description["dtype"]))
        low = np.asarray(description["low"], dtype=np.float64).reshape(shape)
        high = np.asarray(description["high"], dtype=np.float64).reshape(shape)
        if dtype.kind != "f" or not 1 <= math.prod(shape) <= 1_000_000:
            raise ValueError("a float Box of 1 to 10^6 values")
        return spaces.Box(low=low.astype(dtype), high=high.astype(dtype), dtype=dtype)
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise PolicyConfigError(f"{field}: not a Box description ({exc})") from None


def network_description(policy: Any, algorithm: str) -> dict[str, Any]:
    """The ``network`` section of ``policy.json`` for an SB3 policy network (plain JSON)."""
    if algorithm not in POLICY_CLASSES or type(policy).__name__ != POLICY_CLASSES[algorithm]:
        raise PolicyConfigError(
            f"the safe policy format stores {', '.join(POLICY_CLASSES.values())}, not "
            f"{type(policy).__name__} for {algorithm}"
        )
    params = policy._get_constructor_parameters()
    activation = params["activation_fn"].__name__
    if activation not in ACTIVATIONS:
        raise PolicyConfigError(f"activation {activation} is not one of {', '.join(ACTIVATIONS)}")
    kwargs = {k: params[k] for k in _PLAIN_KWARGS if k in params}
    kwargs = json.loads(json.dumps(kwargs))  # plain JSON values only (raises otherwise)
    return {
        "file": WEIGHTS_FILE,
        "class": POLICY_CLASSES[algorithm],
        "observation_space": _space_description(params["observation_space"]),
        "action_space": _space_description(params["action_space"]),
        "activation_fn": activation,
        "features_extractor": params["features_extractor_class"].__name__,
        "kwargs": kwargs,
    }


def write_weights(policy: Any, algorithm: str, directory: Path, meta: dict[str, Any]) -> None:
    """Save ``policy``'s weights as :data:`WEIGHTS_FILE` and its ``network`` into ``meta``."""
    import torch

    meta["network"] = network_description(policy, algorithm)
    state = {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)


def _policy_class(algorithm: str, name: object) -> Callable[..., Any]:
    if algorithm == "ppo" and name == "ActorCriticPolicy":
        from stable_baselines3.common.policies import ActorCriticPolicy

        return ActorCriticPolicy
    if algorithm == "sac" and name == "SACPolicy":
        from stable_baselines3.sac.policies import SACPolicy

        return SACPolicy
    raise PolicyConfigError(
        f"network.class: {name!r} is not allowed for {algorithm!r}: "
        f"{POLICY_CLASSES.get(algorithm, 'no safe class')}"
    )


def load_safe_policy(
    algorithm: str,
    weights_path: Path,
    meta: dict[str, Any],
    label: str,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The SB3 policy network described by ``meta['network']`` with the weights of the file.

    No object of the files is unpickled: the class and its arguments come from allow-lists and
    JSON (``overrides``: constructor arguments the therapy rebuilds itself, e.g. its features
    extractor), the weights from ``torch.load(weights_only=True)``.

    Raises:
        PolicyConfigError: no or a malformed ``network`` section, a class not allowed, a file
            too large or not a state dict of tensors matching the network.

    """
    import torch
    from stable_baselines3.common.torch_layers import FlattenExtractor

    net = meta.get("network")
    if not isinstance(net, dict):
        raise PolicyConfigError(
            f"policy {label}: policy.json has no 'network' section describing {WEIGHTS_FILE}"
        )
    cls = _policy_class(algorithm, net.get("class"))
    activation = net.get("activation_fn")
    if activation not in ACTIVATIONS:
        raise PolicyConfigError(
            f"policy {label}: network.activation_fn: {activation!r} is not allowed: one of "
            f"{', '.join(ACTIVATIONS)}"
        )
    raw_kwargs = net.get("kwargs")
    if not isinstance(raw_kwargs, dict) or set(raw_kwargs) - set(_PLAIN_KWARGS):
        raise PolicyConfigError(
            f"policy {label}: network.kwargs: a mapping of {', '.join(_PLAIN_KWARGS)}"
        )
    kwargs: dict[str, Any] = {k: v for k, v in raw_kwargs.items() if v is not None}
    kwargs["activation_fn"] = getattr(torch.nn, str(activation))
    extractor = net.get("features_extractor")
    overrides = dict(overrides or {})
    if "features_extractor_class" not in overrides:
        if extractor not in FEATURES_EXTRACTORS:
            raise PolicyConfigError(
                f"policy {label}: network.features_extractor: {extractor!r} is not allowed: "
                f"{', '.join(FEATURES_EXTRACTORS)} (or one the therapy rebuilds)"
            )
        overrides["features_extractor_class"] = FlattenExtractor
    elif getattr(overrides["features_extractor_class"], "__name__", None) != extractor:
        raise PolicyConfigError(
            f"policy {label}: network.features_extractor: {extractor!r}, but this therapy builds "
            f"{overrides['features_extractor_class'].__name__}"
        )
    kwargs.update({k: v for k, v in overrides.items() if k != "net_arch"})
    observation = _space(net.get("observation_space"), f"policy {label}: network.observation_space")
    action = _space(net.get("action_space"), f"policy {label}: network.action_space")
    try:
        check_file(weights_path, MAX_WEIGHTS_BYTES)
    except InputLimitError as exc:
        raise PolicyConfigError(f"policy {label}: {exc}") from None
    try:
        policy = cls(observation, action, lambda _: 0.0, **kwargs)
    except Exception as exc:  # a constructor argument SB3 refuses
        raise PolicyConfigError(
            f"policy {label}: network.kwargs cannot build {cls.__name__} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a state dict")
        policy.load_state_dict(state, strict=True)
    except Exception as exc:  # torch's refusals (unpickling, shapes, keys) are many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PolicyConfigError(
            f"policy {label}: cannot load {weights_path} safely ({type(exc).__name__}: {first})"
        ) from None
    policy.set_training_mode(False)
    return policy


def convert_to_safe(path: str | os.PathLike[str]) -> Path:
    """Re-save the trusted SB3 ``model.zip`` of the policy at ``path`` in the safe format.

    Writes :data:`WEIGHTS_FILE` and the ``network`` section of ``policy.json`` beside it (the
    archive itself is left); returns the weights' path. The archive is unpickled: only for a
    file you trust.
    """
    plain, _ = split_trust(path)
    meta_path, _ = policy_paths(plain)
    directory = meta_path.parent
    meta = read_metadata_file(plain)
    algorithm = str(meta.get("algorithm"))
    custom = None
    if meta.get("env_id") == "twinloop/KneeExo-v0":  # its features extractor is rebuilt
        from twinloop.policies.knee.learned import _policy_kwargs

        custom = {"policy_kwargs": _policy_kwargs(meta)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PickleTrustWarning)
        model = load_model(algorithm, directory / MODEL_FILE, str(plain), custom, trust_pickle=True)
    write_weights(model.policy, algorithm, directory, meta)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    clear_model_cache()
    return directory / WEIGHTS_FILE


def ships_model_path_getstate(self: Any) -> dict[str, Any]:
    """``__getstate__`` of a learned controller: ship the model's path, not the torch module."""
    state = dict(self.__dict__)
    if self.model_path is not None:
        state["model"] = None
    return state


def reloads_model_setstate(self: Any, state: dict[str, Any]) -> None:
    """``__setstate__`` of a learned controller: reload the model from its path, warm it up.

    A controller whose model needs entries rebuilt instead of unpickled (see
    :func:`load_model`) provides them from a ``model_custom_objects()`` method.
    """
    self.__dict__.update(state)
    if self.model is None and self.model_path is not None:
        algorithm = str(self.metadata.get("algorithm"))
        custom = getattr(self, "model_custom_objects", None)
        objects = custom() if callable(custom) else None
        trusted = bool(getattr(self, "model_trust_pickle", False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PickleTrustWarning)  # warned where it was loaded
            self.model = load_model(
                algorithm, Path(self.model_path), self.model_path, objects, trust_pickle=trusted
            )
        self.warm_up()


def main(argv: list[str] | None = None) -> int:
    """``python -m twinloop.policies.saved DIR...``: re-save trusted policies safely."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m twinloop.policies.saved POLICY_DIR...", file=sys.stderr)
        return 2
    for path in paths:
        print(f"{path}: {convert_to_safe(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
