"""Errors raised by the policies package: one base class, subclasses of builtins."""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of every error raised by :mod:`policies`."""


class PolicyConfigError(PolicyError, ValueError):
    """A policy, training or adapter setting outside what is allowed."""
