"""Emulated devices backed by a virtual patient, speaking the protocols of DEVICES.md."""
