"""Errors raised by the hardware bridge: one base class, subclasses of builtins."""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error raised by :mod:`hw_bridge`."""


class ProfileError(BridgeError, ValueError):
    """A device profile that does not validate (names the field, the value and what is allowed)."""

    def __init__(self, field: str, value: object, allowed: str, *, source: str = "") -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}={value!r} is not allowed: {allowed}")


class WriteRefused(BridgeError, ValueError):
    """A write the profile forbids (read-only register, value outside its limits); never sent."""


class CommunicationError(BridgeError, ConnectionError):
    """The device did not answer (timeout, disconnect) after the configured retries."""


class DeviceException(BridgeError, RuntimeError):
    """The device answered with a protocol exception (e.g. a Modbus exception code)."""

    def __init__(self, message: str, code: int) -> None:
        self.code = code
        super().__init__(message)
