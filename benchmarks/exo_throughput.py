"""Throughput of the knee + exoskeleton plant and of the ``twinloop/KneeExo-v0`` environments.

Prints ONE JSON object to stdout (progress to stderr)::

    .venv/bin/python benchmarks/exo_throughput.py
    .venv/bin/python benchmarks/exo_throughput.py --quick      # smoke test

Measured (best of ``--repeats`` samples after a warm-up; a sample repeats the call until it
lasts ``--min-sample-s``), default config (moderate patient, cyclic task, 100 Hz control =
10 plant steps of 1 ms per env step), a constant zero torque command:

* ``kernel``: :func:`twinloop.plant.knee.model.advance` on 256 knees × 10 plant steps, in
  knee-steps/s, on one thread (serial kernel) and on every thread (``prange`` kernel).
* ``single_env``: ``KneeExoEnv`` (unwrapped) and ``gym.make`` (with Gymnasium's
  ``OrderEnforcing``/``PassiveEnvChecker`` wrappers), reset when an episode ends, in steps/s and
  as a real-time factor (simulated seconds per wall second = steps/s / control_hz).
* ``vector_env``: ``KneeExoVectorEnv`` at batch 64/256/1024 (next-step autoreset included), in
  env-steps/s, one thread and every thread (``numba.set_num_threads``).

Targets (issue 6): vector env ≥ 50,000 env-steps/s at batch 256 on one core; single env ≥ 100×
real time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import gymnasium as gym
import numba
import numpy as np

from twinloop import plant
from twinloop.plant.knee.env import KneeExoEnv
from twinloop.plant.knee.env_vector import KneeExoVectorEnv
from twinloop.plant.knee.model import N_OUT, advance, initial_state, knee_preset


def best_rate(fn: Callable[[], int], repeats: int, min_sample_s: float) -> float:
    """Best units/s over ``repeats`` samples; ``fn`` runs once and returns its unit count."""
    fn()
    best = 0.0
    for _ in range(repeats):
        units = 0
        t0 = time.perf_counter()
        while True:
            units += fn()
            dt = time.perf_counter() - t0
            if dt >= min_sample_s:
                break
        best = max(best, units / dt)
    return best


def kernel_rate(n: int, parallel: bool, repeats: int, min_s: float) -> float:
    x = np.stack([initial_state(0.5)] * n)
    p = np.stack([knee_preset("moderate").vector()] * n)
    out = np.zeros((n, N_OUT))
    cmd = np.zeros(n)
    ref = np.zeros((n, 2))
    ref[:, 0] = 0.5

    def run() -> int:
        advance(x, p, cmd, ref, 10, out, parallel=parallel)
        return n * 10

    return best_rate(run, repeats, min_s)


def single_rate(env: gym.Env, repeats: int, min_s: float) -> float:  # type: ignore[type-arg]
    env.reset(seed=0)
    a = np.zeros(1, np.float32)

    def run() -> int:
        for _ in range(1000):
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()
        return 1000

    return best_rate(run, repeats, min_s)


def vector_rate(n: int, repeats: int, min_s: float) -> float:
    venv = KneeExoVectorEnv(n)
    venv.reset(seed=0)
    a = np.zeros((n, 1), np.float32)

    def run() -> int:
        for _ in range(20):
            venv.step(a)
        return 20 * n

    return best_rate(run, repeats, min_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-sample-s", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, min_s = (1, 0.05) if args.quick else (args.repeats, args.min_sample_s)
    threads = numba.config.NUMBA_NUM_THREADS
    control_hz = KneeExoEnv().config.control_hz
    result: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "numba_threads": threads,
                    "python": platform.python_version(), "numba": numba.__version__},
        "control_hz": control_hz,
    }  # fmt: skip
    print("kernel…", file=sys.stderr)
    numba.set_num_threads(1)
    one = kernel_rate(256, False, repeats, min_s)
    numba.set_num_threads(threads)
    both = kernel_rate(256, True, repeats, min_s)
    result["kernel_knee_steps_per_s"] = {"batch": 256, "one_core": one, "all_cores": both}
    print("single env…", file=sys.stderr)
    numba.set_num_threads(1)
    bare = single_rate(KneeExoEnv(), repeats, min_s)
    wrapped = single_rate(gym.make(plant.KNEE_EXO_ID), repeats, min_s)
    result["single_env"] = {
        "unwrapped_steps_per_s": bare,
        "unwrapped_real_time_factor": bare / control_hz,
        "gym_make_steps_per_s": wrapped,
        "gym_make_real_time_factor": wrapped / control_hz,
    }
    vec: dict[str, dict[str, float]] = {}
    for n in (64, 256, 1024):
        print(f"vector env {n}…", file=sys.stderr)
        numba.set_num_threads(1)
        one = vector_rate(n, repeats, min_s)
        numba.set_num_threads(threads)
        both = vector_rate(n, repeats, min_s)
        vec[str(n)] = {"one_core_env_steps_per_s": one, "all_cores_env_steps_per_s": both}
    result["vector_env"] = vec
    result["targets_met"] = {
        "vector_256_one_core_ge_50k": vec["256"]["one_core_env_steps_per_s"] >= 50_000,
        "single_env_ge_100x_real_time": bare / control_hz >= 100,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
