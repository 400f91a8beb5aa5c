"""Named device presets read from the shipped csv tables, with per-field overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from twinloop.plant.errors import ConfigError

SpecT = TypeVar("SpecT")


def from_preset(
    cls: type[SpecT], presets: Mapping[str, Mapping[str, Any]], name: str, overrides: dict[str, Any]
) -> SpecT:
    """Build ``cls`` from preset ``name`` with ``overrides`` (fields of the dataclass ``cls``).

    Raises:
        ConfigError: unknown preset name or unknown field (the error lists the allowed ones).

    """
    if name not in presets:
        raise ConfigError("preset", name, f"one of {', '.join(presets)}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in overrides:
        if key not in known:
            raise ConfigError(
                "overrides", key, f"a {cls.__name__} field: {', '.join(sorted(known))}"
            )
    return cls(**{**presets[name], **overrides})
