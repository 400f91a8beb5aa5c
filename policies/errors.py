"""Errors raised by the policies package: one base class, subclasses of builtins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class PolicyError(Exception):
    """Base class of every error raised by :mod:`policies`."""


class PolicyConfigError(PolicyError, ValueError):
    """A policy, training or adapter setting outside what is allowed."""


def config_section(
    field: str, value: object, keys: Sequence[str], where: str = ""
) -> Mapping[Any, Any]:
    """``value`` if it is a mapping of ``keys`` only, else a one-line refusal naming ``field``.

    ``where`` follows the unknown keys in the message (``" of twinloop/KneeExo-v0"``).
    """
    if not isinstance(value, Mapping):
        raise PolicyConfigError(
            f"{field}: {value!r} is not allowed: a mapping of {', '.join(keys)}"
        )
    unknown = sorted(set(map(str, value)) - set(keys))
    if unknown:
        raise PolicyConfigError(
            f"{field}: unknown key(s) {', '.join(unknown)}{where}; keys are {', '.join(keys)}"
        )
    return value
