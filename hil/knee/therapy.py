"""The knee-exo therapy's HIL part: the exoskeleton rig (its sessions have no report yet)."""

from __future__ import annotations

import argparse


class KneeRig:
    """The exoskeleton rig (a CiA 402 drive over Modbus TCP at 100 Hz)."""

    def run_session(self, args: argparse.Namespace) -> int:
        """:func:`twinloop.hil.knee.session.run_session`."""
        from twinloop.hil.knee.session import run_session

        return run_session(args)


PART = KneeRig()
