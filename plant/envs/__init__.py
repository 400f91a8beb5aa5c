"""Gymnasium environments of every therapy's plant, registered at import of ``twinloop.plant``.

Each therapy's plant part lists its environments (:class:`~twinloop.plant.interface.
EnvRegistration`); :func:`register_envs` registers them all (cheaply: a compiled model loads
only when its environment is made).
"""

from __future__ import annotations

import gymnasium as gym

T1D_ID = "twinloop/T1D-v0"
KNEE_EXO_ID = "twinloop/KneeExo-v0"


def register_envs() -> None:
    """Register every therapy's environments with Gymnasium (idempotent)."""
    from twinloop.therapy import therapies

    for therapy in therapies():
        for env in therapy.part("plant").envs:
            if env.id not in gym.registry:
                gym.register(
                    id=env.id,
                    entry_point=env.entry_point,
                    vector_entry_point=env.vector_entry_point,
                    disable_env_checker=False,
                )
