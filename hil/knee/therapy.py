"""The knee-exo therapy's HIL part: the exoskeleton rig (its sessions have no report yet)."""

from __future__ import annotations


class KneeRig:
    """The exoskeleton rig (a CiA 402 drive over Modbus TCP at 100 Hz)."""


PART = KneeRig()
