"""What a therapy's policies part declares (``twinloop.policies.<package>.therapy.PART``)."""

from __future__ import annotations

from typing import Protocol

#: Prefix of a saved policy among controller names: ``policy:PATH``.
POLICY_PREFIX = "policy:"


class PolicyPart(Protocol):
    """The controllers of a therapy."""

    #: The built-in controllers' names (``policy:PATH`` is accepted besides them).
    controllers: tuple[str, ...]
    #: The controller a command uses when none is named.
    default_controller: str

    def check_controller(self, name: object) -> str | None:
        """``None`` when ``name`` is one of the therapy's controllers, else what is allowed."""
        ...
