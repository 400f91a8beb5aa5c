"""twinloop: closed-loop therapy around a human digital twin.

Every part of twinloop lives under this one import namespace: ``twinloop.plant`` (physiology
and Gymnasium environments), ``twinloop.policies`` (controllers, RL), ``twinloop.agents`` (the
loop's runtime), ``twinloop.hw_bridge`` (transports, device profiles, emulated devices),
``twinloop.hil`` (real-time rigs), the products ``twinloop.campaigns``,
``twinloop.evaluation`` and ``twinloop.twins``, and ``twinloop.cli``. The layers and the
therapy plug-in interface are described in ``docs/architecture.md``.

Importing ``twinloop`` itself is cheap: no subpackage is imported until it is asked for.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__: str = metadata.version("twinloop")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
