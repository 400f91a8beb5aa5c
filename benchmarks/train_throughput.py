"""PPO training throughput on the vector environment, end to end (env-steps per second).

Prints one JSON object::

    .venv/bin/python benchmarks/train_throughput.py                 # 64 envs, 200k steps
    .venv/bin/python benchmarks/train_throughput.py --envs 16,64,256 --steps 100000

stable-baselines3's PPO (``MlpPolicy``, CPU torch) learns on ``twinloop/T1D-v0``'s native batched
environment through :class:`twinloop.policies.sb3_vec_env.SB3VecEnv`: collection (the compiled batch
step and the policy's forward pass) and the gradient updates (``n_epochs`` passes over each rollout)
are both in the wall time. For each number of environments: ``model.learn(total_timesteps)``
timed after a short warm-up, env-steps per second, and the share of time spent stepping the
environment alone (measured by timing the adapter's ``step_wait``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import gymnasium as gym


def _one(num_envs: int, steps: int, n_steps: int, threads: int) -> dict[str, Any]:
    import torch
    from stable_baselines3 import PPO

    from twinloop import plant
    from twinloop.policies.sb3_vec_env import SB3VecEnv

    torch.set_num_threads(threads)
    venv = gym.make_vec(
        plant.T1D_ID,
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        autoreset_mode="same_step",
        patients=("adults",),
    )
    env = SB3VecEnv(venv)
    env_time = [0.0]
    step_wait = env.step_wait

    def timed_step_wait() -> Any:
        t0 = time.perf_counter()
        out = step_wait()
        env_time[0] += time.perf_counter() - t0
        return out

    env.step_wait = timed_step_wait  # type: ignore[method-assign]
    rollout = max(n_steps // num_envs, 8) * num_envs
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=rollout // num_envs,
        batch_size=min(2048, rollout),
        n_epochs=4,
        seed=0,
        verbose=0,
        device="cpu",
    )
    model.learn(total_timesteps=rollout)  # warm-up: numba, torch
    env_time[0] = 0.0
    before = model.num_timesteps
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps, reset_num_timesteps=False)
    elapsed = time.perf_counter() - t0
    steps = model.num_timesteps - before  # what was really collected (whole rollouts)
    return {
        "num_envs": num_envs,
        "rollout_steps": rollout,
        "n_epochs": 4,
        "batch_size": min(2048, rollout),
        "torch_threads": threads,
        "env_steps": steps,
        "seconds": elapsed,
        "env_steps_per_s": steps / elapsed,
        "env_share": env_time[0] / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="64", help="comma-separated numbers of environments")
    parser.add_argument("--steps", type=int, default=200_000, help="timed env-steps per run")
    parser.add_argument("--rollout", type=int, default=4096, help="env-steps per PPO rollout")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "benchmark": "train_throughput",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "runs": [
            _one(int(n), args.steps, args.rollout, args.threads) for n in args.envs.split(",")
        ],
    }
    out["loadavg_end"] = list(os.getloadavg())
    best = max(r["env_steps_per_s"] for r in out["runs"])
    out["targets"] = {"ppo_env_steps_per_s": {"target": 3000.0, "measured": best}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
