"""``twinloop therapies``: the therapies twinloop knows and the parts each one has."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Add ``therapies`` to the ``twinloop`` parser."""
    p = sub.add_parser(
        "therapies",
        help="list the therapies (and the parts each has: plant, agents, hil, campaigns, ...)",
        description="List the therapies of the registry with their parts, controllers and "
        "patients.",
    )
    p.set_defaults(handler=main_therapies)


def main_therapies(args: argparse.Namespace) -> int:
    """Print one block per therapy."""
    from twinloop.therapy import LAYERS, therapies

    for therapy in therapies():
        parts = [layer for layer in LAYERS if therapy.has(layer)]
        print(f"{therapy.name}: {therapy.title}")
        print(f"  parts: {', '.join(parts)}")
        if therapy.has("policies"):
            pol = therapy.part("policies")
            print(f"  controllers: {', '.join(pol.controllers)}, policy:PATH "
                  f"(default {pol.default_controller})")  # fmt: skip
        if therapy.has("plant"):
            print(f"  patients: {therapy.part('plant').patients_help}")
        if therapy.aliases:
            print(f"  former spellings: {', '.join(therapy.aliases)}")
    return 0
