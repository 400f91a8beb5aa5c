"""The saved-policy format: ``model.zip`` (stable-baselines3) + ``policy.json`` (metadata).

``twinloop train`` writes one directory per seed (``seed_<s>/``) holding the model archive
(:data:`MODEL_FILE`) and its metadata (:data:`METADATA_FILE`, format :data:`METADATA_FORMAT`,
with the twinloop version that wrote it, :func:`twinloop_version`). This module knows the
format and nothing of any therapy: the paths of a saved policy (:func:`policy_paths`), its
metadata read and checked to be a twinloop policy file (:func:`read_metadata_file`), the
stable-baselines3 class of an algorithm (:func:`algorithm_class`), the model loaded once per
process (:func:`load_model`, cached by path and modification time, with SB3's
``custom_objects``), and the pickling helpers of a learned controller that ship the model's
path instead of the torch module and reload it in the receiving process
(:func:`ships_model_path_getstate`, :func:`reloads_model_setstate`). The therapies' ``learned``
modules check the metadata's layouts and build their controllers on top of it.
"""

from __future__ import annotations

import json
import os
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from twinloop.policies.errors import PolicyConfigError

__all__ = [
    "ALGORITHMS",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "MODEL_FILE",
    "algorithm_class",
    "load_model",
    "policy_paths",
    "read_metadata_file",
    "reloads_model_setstate",
    "ships_model_path_getstate",
    "twinloop_version",
]

METADATA_FILE = "policy.json"
MODEL_FILE = "model.zip"
METADATA_FORMAT = "twinloop-policy"

#: Algorithms by name (stable-baselines3 classes, imported lazily).
ALGORITHMS = ("ppo", "sac")

#: Loaded models by (resolved path, modification time): a cohort shares one model.
_MODELS: dict[tuple[str, float], Any] = {}


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


def resolve_policy(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists, else the shipped policy of that name (else ``path``)."""
    p = Path(path)
    if p.exists():
        return p
    return shipped_policies().get(str(path), p)


def policy_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(policy.json, model.zip)`` of the saved policy at ``path`` (its directory or zip).

    ``path`` may also name a shipped policy (:func:`shipped_policies`: ``knee_sac``).

    Raises:
        PolicyConfigError: ``path`` does not exist.

    """
    p = resolve_policy(path)
    if p.is_dir():
        return p / METADATA_FILE, p / MODEL_FILE
    if p.suffix == ".zip" or p.is_file():
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
        meta = json.loads(meta_path.read_text())
    except OSError as exc:
        raise PolicyConfigError(
            f"policy {path}: cannot read {meta_path} ({exc.strerror or exc})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
) -> Any:
    """The SB3 model in ``model_path`` (cached by path and mtime).

    ``custom_objects`` replaces entries of the saved model's data instead of unpickling them
    (SB3's ``load(custom_objects=...)``): a therapy rebuilds what it can from ``policy.json``,
    so a model saved before a class moved still loads.

    Raises:
        PolicyConfigError: the archive is missing or cannot be loaded, or the algorithm is
            unknown.

    """
    if not model_path.is_file():
        raise PolicyConfigError(f"policy {label}: {model_path} is missing")
    key = (str(model_path.resolve()), model_path.stat().st_mtime)
    if key not in _MODELS:
        cls = algorithm_class(algorithm)
        try:
            if not zipfile.is_zipfile(model_path):
                raise ValueError("not a zip archive")
            _MODELS[key] = cls.load(str(model_path), device="cpu", custom_objects=custom_objects)
        except Exception as exc:  # SB3/torch raise many kinds on a corrupt archive
            raise PolicyConfigError(
                f"policy {label}: cannot load {model_path} ({type(exc).__name__}: {exc})"
            ) from None
    return _MODELS[key]


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
        self.model = load_model(algorithm, Path(self.model_path), self.model_path, objects)
        self.warm_up()
