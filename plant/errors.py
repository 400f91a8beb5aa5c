"""Errors raised by the plant package: one base class, subclasses of builtins."""

from __future__ import annotations

from collections.abc import Iterable


class PlantError(Exception):
    """Base class of every error raised by :mod:`plant`."""


class UnknownPatientError(PlantError, KeyError):
    """A patient or cohort name that is not in the table."""

    def __init__(self, field: str, value: str, allowed: Iterable[str]) -> None:
        self.field = field
        self.value = value
        self.allowed = tuple(allowed)
        super().__init__(
            f"{field}: unknown name {value!r}; valid names are {', '.join(self.allowed)}"
        )

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


class InvalidInputError(PlantError, ValueError):
    """Bad input data (inputs table, action, configuration value)."""


class ConfigError(PlantError, ValueError):
    """A configuration field with a value outside what is allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


class ResetNeededError(PlantError, RuntimeError):
    """An environment was stepped before ``reset()`` or after its episode ended."""
