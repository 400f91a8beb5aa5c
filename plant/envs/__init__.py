"""Gymnasium environments of the plants, registered at import of :mod:`plant`."""

from __future__ import annotations

import gymnasium as gym

T1D_ID = "twinloop/T1D-v0"
KNEE_EXO_ID = "twinloop/KneeExo-v0"


def register_envs() -> None:
    """Register the environments (idempotent; the compiled models load only at ``make``)."""
    if T1D_ID not in gym.registry:
        gym.register(
            id=T1D_ID,
            entry_point="twinloop.plant.glucose.env:T1DEnv",
            vector_entry_point="twinloop.plant.glucose.env_vector:T1DVectorEnv",
            disable_env_checker=False,
        )
    if KNEE_EXO_ID not in gym.registry:
        gym.register(
            id=KNEE_EXO_ID,
            entry_point="twinloop.plant.knee.env:KneeExoEnv",
            vector_entry_point="twinloop.plant.knee.env_vector:KneeExoVectorEnv",
            disable_env_checker=False,
        )
