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
            entry_point="plant.envs.t1d:T1DEnv",
            vector_entry_point="plant.envs.t1d_vector:T1DVectorEnv",
            disable_env_checker=False,
        )
    if KNEE_EXO_ID not in gym.registry:
        gym.register(
            id=KNEE_EXO_ID,
            entry_point="plant.envs.knee_exo:KneeExoEnv",
            vector_entry_point="plant.envs.knee_exo_vector:KneeExoVectorEnv",
            disable_env_checker=False,
        )
