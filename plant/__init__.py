"""Physiological plants, devices, scenarios, metrics and Gymnasium environments.

Importing :mod:`plant` registers ``twinloop/T1D-v0`` and ``twinloop/KneeExo-v0`` with Gymnasium
(cheaply: the compiled models load only when an environment is made).
"""

from twinloop.plant.envs import KNEE_EXO_ID, T1D_ID, register_envs

register_envs()

__all__ = ["KNEE_EXO_ID", "T1D_ID", "register_envs"]
