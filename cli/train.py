"""``twinloop train CONFIG.yaml``: train insulin or knee-exoskeleton policies (SB3 PPO/SAC)."""

from __future__ import annotations

import argparse
from typing import Any

from twinloop.cli.options import add_verbose, count

#: Most Ray workers of ``--workers``; most environment steps of ``--timesteps`` (as the
#: config's ``n_timesteps``, docs/training.md).
MAX_WORKERS = 1024
MAX_TIMESTEPS = 10**10


def add_parser(sub: Any) -> None:
    """Add the ``train`` sub-command to the ``twinloop`` parser."""
    from twinloop.cli.options import seed

    p = sub.add_parser(
        "train",
        help="train insulin or knee-exoskeleton policies (PPO/SAC) from a YAML config; saved "
        "policies load as --controller policy:DIR",
        description="Train one policy per seed on twinloop/T1D-v0 or twinloop/KneeExo-v0 (the "
        "config's top-level key) with stable-baselines3, from a YAML configuration in the style "
        "of RL Baselines3 Zoo (docs/training.md; shipped: policies/configs/t1d_ppo.yaml, "
        "t1d_sac.yaml, knee_sac.yaml). Each seed is saved in OUT/seed_<s>/ with policy.pt and "
        "policy.json (loaded without pickle), model.zip (to resume training), checkpoints and "
        "TensorBoard logs.",
    )
    p.add_argument("config", help="training configuration (YAML)")
    p.add_argument("--out", help="output directory (default: the config's output_dir)")
    p.add_argument(
        "--seed",
        type=seed,
        action="append",
        help="train this seed (repeatable; replaces the config's seeds)",
    )
    p.add_argument(
        "--workers",
        type=count(1, MAX_WORKERS),
        help="train the seeds in parallel as Ray tasks on an embedded Ray with N CPUs (1 to "
        f"{MAX_WORKERS})",
    )
    p.add_argument("--address", help="train the seeds on an existing Ray cluster (HOST:PORT)")
    p.add_argument(
        "--timesteps",
        type=count(1, MAX_TIMESTEPS),
        help="environment steps per seed, 1 to 1e10 (overrides the config's n_timesteps)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose(p)
    p.set_defaults(handler=main_train)


def main_train(args: argparse.Namespace) -> int:
    """Run ``twinloop train``; errors print one line and return 2."""
    from twinloop.policies.errors import PolicyError
    from twinloop.policies.training import load_config, train

    try:
        config = load_config(args.config)
        if args.workers is not None or args.address is not None:
            import sys

            from twinloop.agents.placement import ray_status_line, start_ray

            print(ray_status_line("train", args.address), file=sys.stderr, flush=True)
            start_ray(args.address, num_cpus=args.workers if args.address is None else None)
        results = train(
            config,
            args.out,
            seeds=args.seed,
            timesteps=args.timesteps,
            workers=args.workers,
            address=args.address,
            progress=not args.no_progress,
        )
    except (PolicyError, OSError):
        raise
    except Exception as exc:  # Ray/SB3 failures: one line, never a traceback
        raise PolicyError(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    for r in results:
        print(f"seed {r.seed}: {r.timesteps} steps in {r.seconds:.0f} s -> {r.directory}")
    command = config.task.run_command(results[0].directory)
    print(f"run a policy in the loop (behind the safety supervisor):\n  {command}")
    return 0
