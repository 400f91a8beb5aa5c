"""Errors raised by the hardware bridge: one base class, subclasses of builtins."""

from __future__ import annotations

import errno
import ssl


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
    """The device did not answer (timeout, disconnect) after the configured retries.

    ``reason``: when known, why in a few words (e.g. ``connection refused``), for a caller
    that words the message its own way.
    """

    reason: str | None = None


class DeviceException(BridgeError, RuntimeError):
    """The device answered with a protocol exception (e.g. a Modbus exception code)."""

    def __init__(self, message: str, code: int) -> None:
        self.code = code
        super().__init__(message)


def os_error_words(error: BaseException, *, timeout_s: float | None = None) -> str:
    """An I/O error as a short lower-case phrase, without the errno.

    ``[Errno 111] Connection refused`` → ``connection refused``; a timeout → ``no answer
    within T s``; a missing serial port → ``no such port``; ``permission denied``; a TLS
    failure → ``TLS handshake failed (REASON)``; another error → the system's own words.
    """
    code = getattr(error, "errno", None)
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed ({error.reason or error})"
    if isinstance(error, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(error, TimeoutError) or code == errno.ETIMEDOUT:
        return "no answer" + (f" within {timeout_s:g} s" if timeout_s else "")
    if isinstance(error, FileNotFoundError) or code == errno.ENOENT:
        return "no such port"
    if isinstance(error, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    words = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return str(words).lower()
