"""Physiological plants, devices, scenarios, metrics and Gymnasium environments.

Importing :mod:`plant` registers ``twinloop/T1D-v0`` with Gymnasium (cheaply: the compiled
model loads only when an environment is made).
"""

from plant.envs import T1D_ID, register_envs

register_envs()

__all__ = ["T1D_ID", "register_envs"]
