"""The therapy registry: every therapy twinloop knows, under one spelling each, and its parts.

A therapy (``glucose``, ``knee-exo``, and the next one) is a set of *parts*, one per layer,
each in a folder of that layer named after the therapy's package (``plant/glucose/``,
``policies/glucose/``, ``agents/glucose/``, ...). Each folder has a ``therapy.py`` module
whose ``PART`` object implements that layer's interface (``twinloop.<layer>.interface``):

======================  =========================================================================
layer                   what the part declares
======================  =========================================================================
``plant``               the therapy itself (:data:`THERAPY`), its Gymnasium environments, the
                        names of its patients (cohorts, presets) and its time unit
``policies``            its controllers (names, default, ``policy:PATH``) and its RL task family
``agents``              its messages and channels, its loop and supervisor, the options of
                        ``twinloop run``, its run, summary table and report
``hil``                 its real-time rig (``twinloop hil --therapy NAME``)
``campaigns``           its fault types and targets, requirement rules, hazard labels and
                        verdicts, and the HIL sessions of a campaign
``evaluation``          its evaluation protocols (``twinloop evaluate``)
``twins``               twins of real people identified from logs
======================  =========================================================================

A part that a therapy lacks is simply absent (the knee has no ``evaluation``); shared code asks
:meth:`Therapy.has` and says so in one line. Shared code never switches on a therapy's name: it
asks this registry.

Where therapies come from:

* the folders of :mod:`twinloop.plant` that have a ``therapy.py`` with a ``THERAPY``
  (the therapies shipped with twinloop);
* the ``twinloop.therapies`` entry-point group (a separate distribution's therapies);
* :func:`register_therapy` (a notebook, a test). Such a therapy may name its parts' modules
  anywhere (``Therapy(parts={"plant": "my_pkg.plant", ...})``).

This module imports nothing of twinloop: it is the bottom of the layers.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import warnings
from collections.abc import Mapping
from importlib import metadata
from typing import Any

__all__ = [
    "LAYERS",
    "Therapy",
    "TherapyError",
    "UnknownTherapyError",
    "get_therapy",
    "register_therapy",
    "therapies",
    "therapy_names",
    "unregister_therapy",
]

#: The layers a therapy may have a part in, bottom first.
LAYERS = ("plant", "policies", "agents", "hil", "campaigns", "evaluation", "twins")

#: The entry-point group of therapies from other distributions.
ENTRY_POINT_GROUP = "twinloop.therapies"


class TherapyError(ValueError):
    """A therapy that cannot be found, or a part it does not have."""


class UnknownTherapyError(TherapyError, KeyError):
    """A therapy name that no registered therapy has (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Therapy:
    """One therapy: its name, what it is, and where each layer's part lives.

    Attributes:
        name: the one spelling, used by every command, config key, file and recording
            (``glucose``, ``knee-exo``): lowercase letters, digits and ``-``.
        title: one line saying what the therapy is, for listings.
        package: the folder name of its parts in each layer (``glucose``, ``knee``).
        aliases: former spellings still accepted, with a deprecation warning.
        parts: layer → module holding that part's ``PART``; by default
            ``twinloop.<layer>.<package>.therapy`` for every layer where that module exists.

    """

    name: str
    title: str
    package: str
    aliases: tuple[str, ...] = ()
    parts: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        ok = self.name and all(c.islower() or c.isdigit() or c == "-" for c in self.name)
        if not ok or self.name.startswith("-"):
            raise TherapyError(
                f"therapy name {self.name!r}: lowercase letters, digits and '-' only"
            )
        unknown = sorted(set(self.parts) - set(LAYERS))
        if unknown:
            raise TherapyError(
                f"therapy {self.name!r}: unknown layer(s) {', '.join(unknown)}; "
                f"layers are {', '.join(LAYERS)}"
            )

    def module(self, layer: str) -> str:
        """The module holding this therapy's part of ``layer``."""
        if layer not in LAYERS:
            raise TherapyError(f"unknown layer {layer!r}; layers are {', '.join(LAYERS)}")
        return self.parts.get(layer, f"twinloop.{layer}.{self.package}.therapy")

    def has(self, layer: str) -> bool:
        """Whether the therapy has a part in ``layer``."""
        name = self.module(layer)
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False

    def part(self, layer: str) -> Any:
        """The therapy's part of ``layer`` (its module's ``PART``), imported on first use.

        Raises:
            TherapyError: the therapy has no part in that layer.

        """
        if not self.has(layer):
            raise TherapyError(f"the {self.name} therapy has no {layer} part")
        module = importlib.import_module(self.module(layer))
        try:
            return module.PART
        except AttributeError:
            raise TherapyError(f"{module.__name__} defines no PART") from None


_REGISTERED: dict[str, Therapy] = {}
_DISCOVERED: dict[str, Therapy] | None = None


def _discover() -> dict[str, Therapy]:
    """The shipped therapies (folders of twinloop.plant) and the entry points' ones."""
    global _DISCOVERED
    if _DISCOVERED is not None:
        return _DISCOVERED
    found: dict[str, Therapy] = {}
    plant = importlib.import_module("twinloop.plant")
    for info in sorted(pkgutil.iter_modules(plant.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        name = f"twinloop.plant.{info.name}.therapy"
        if importlib.util.find_spec(name) is None:
            continue
        therapy = getattr(importlib.import_module(name), "THERAPY", None)
        if isinstance(therapy, Therapy):
            found[therapy.name] = therapy
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            therapy = entry.load()
        except Exception as exc:  # a broken plug-in must not break twinloop
            warnings.warn(f"therapy entry point {entry.name!r} does not load: {exc}", stacklevel=2)
            continue
        if isinstance(therapy, Therapy) and therapy.name not in found:
            found[therapy.name] = therapy
    _DISCOVERED = found
    return found


def therapies() -> tuple[Therapy, ...]:
    """Every known therapy: shipped, from entry points, then registered, in that order."""
    merged = dict(_discover())
    merged.update(_REGISTERED)
    return tuple(merged.values())


def therapy_names() -> tuple[str, ...]:
    """The names of :func:`therapies`."""
    return tuple(t.name for t in therapies())


def register_therapy(therapy: Therapy, *, replace: bool = False) -> Therapy:
    """Add ``therapy`` to the registry (a therapy defined outside twinloop's folders).

    Raises:
        TherapyError: a therapy of that name (or alias) exists and ``replace`` is false.

    """
    if not replace:
        for known in therapies():
            clash = {known.name, *known.aliases} & {therapy.name, *therapy.aliases}
            if clash:
                raise TherapyError(
                    f"therapy {therapy.name!r}: the name {sorted(clash)[0]!r} is taken by "
                    f"{known.name!r}"
                )
    _REGISTERED[therapy.name] = therapy
    return therapy


def unregister_therapy(name: str) -> None:
    """Remove a therapy added with :func:`register_therapy` (no-op if absent)."""
    _REGISTERED.pop(name, None)


def get_therapy(name: str | Therapy) -> Therapy:
    """The therapy called ``name`` (or one of its former spellings, with a warning).

    Raises:
        UnknownTherapyError: no therapy has that name; the message lists the known ones.

    """
    if isinstance(name, Therapy):
        return name
    known = therapies()
    for therapy in known:
        if therapy.name == name:
            return therapy
    for therapy in known:
        if name in therapy.aliases:
            warnings.warn(
                f"therapy {name!r} is a deprecated spelling of {therapy.name!r}",
                DeprecationWarning,
                stacklevel=2,
            )
            return therapy
    raise UnknownTherapyError(
        f"unknown therapy {name!r}; therapies: {', '.join(t.name for t in known)}"
    )
