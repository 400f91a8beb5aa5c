"""Optional parts of twinloop (pip extras) and the one-line error when one is missing.

``pip install twinloop`` installs the plant, environments, the inline loop, the hardware
bridge, HIL rigs and the command line. Two extras add the rest:

* ``ray`` — Ray placements, campaigns and evaluations on Ray, a cluster (``--address``);
* ``rl`` — stable-baselines3, torch and Optuna: ``twinloop train`` (``--optimize``) and
  ``policy:PATH`` controllers.

This module imports nothing of twinloop: any layer may use it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Extra → the distribution names it installs (as imported).
EXTRAS = {"ray": ("ray",), "rl": ("stable_baselines3", "torch", "optuna")}


class MissingExtraError(ImportError):
    """A feature needs an extra that is not installed; the message names the pip command."""

    def __init__(self, what: str, extra: str) -> None:
        self.what = what
        self.extra = extra
        super().__init__(
            f"{what} needs twinloop's {extra!r} extra: pip install 'twinloop[{extra}]'"
        )


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """Import ``module`` of ``extra``, or raise :class:`MissingExtraError` naming ``what``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == module.split(".")[0]:
            raise MissingExtraError(what, extra) from None
        raise
