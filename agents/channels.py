"""Channels: the named edges of the loop, where recorders listen and fault injectors sit.

A :class:`Channel` carries messages of one kind from one producer to its consumers with
*latest-value* semantics (a consumer reads the newest message, or ``None`` before the first).
Nothing is wired agent to agent: the runtime moves messages through channels, and each channel
runs its transforms in order on every message, so a fault injector (hold, drop, delay, bias,
…) is a transform added to a channel, never an edit of an agent.

Transform contract: ``transform(message) -> message | None`` — return the (possibly changed)
message to pass on, or ``None`` to drop it. A transform may keep state (e.g. a held value).

A channel may also have *sources*: ``source(t0, t1) -> list[message]``, polled by the loop once
per tick (:meth:`Channel.pull`) for messages that no agent produced (a false meal announcement);
the loop sends what they return through the channel like any other message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twinloop.agents.messages import Record

M = TypeVar("M", bound=Record)


Listener = Callable[[str, Record], None]


class Channel(Generic[M]):
    """A named edge of the loop with latest-value semantics and a chain of transforms.

    Args:
        name: the edge, e.g. ``"sensor->estimator"``; recordings use it as a table name.

    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._transforms: list[Callable[[M], M | None]] = []
        self._sources: list[Callable[[float, float], list[M]]] = []
        self._listeners: list[Listener] = []
        self._latest: M | None = None
        self.sent = 0
        self.dropped = 0

    def add_transform(self, transform: Callable[[M], M | None]) -> None:
        """Append a transform; transforms run in the order they were added."""
        self._transforms.append(transform)

    def add_source(self, source: Callable[[float, float], list[M]]) -> None:
        """Add a source of injected messages, polled by :meth:`pull`."""
        self._sources.append(source)

    def pull(self, t0: float, t1: float) -> list[M]:
        """The messages the sources inject in ``[t0, t1)`` (not yet sent)."""
        if not self._sources:
            return []
        return [m for source in self._sources for m in source(t0, t1)]

    def listen(self, listener: Listener) -> None:
        """Call ``listener(channel_name, message)`` for every message that passes."""
        self._listeners.append(listener)

    def send(self, message: M) -> M | None:
        """Pass ``message`` through the transforms; return what was delivered (or ``None``)."""
        self.sent += 1
        out = message
        for transform in self._transforms:
            changed = transform(out)
            if changed is None:
                self.dropped += 1
                return None
            out = changed
        self._latest = out
        for listener in self._listeners:
            listener(self.name, out)
        return out

    @property
    def latest(self) -> M | None:
        """The newest delivered message, or ``None`` before the first."""
        return self._latest
