"""Errors raised by the agents package: one base class, subclasses of builtins."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error raised by :mod:`agents`."""


class LoopConfigError(AgentError, ValueError):
    """A loop or agent setting outside what is allowed (names the field and the value)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")
