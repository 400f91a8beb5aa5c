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
        "config's top-level key) with stable-baselines3, from a YAML configuration in RL "
        "Baselines3 Zoo's hyperparameter format (docs/training.md; shipped: "
        "policies/configs/t1d_ppo.yaml, t1d_sac.yaml, knee_sac.yaml). Each seed is saved in "
        "OUT/seed_<s>/ with policy.pt and policy.json (loaded without pickle), model.zip (to "
        "resume training), checkpoints and TensorBoard logs; insulin policies are also run in "
        "the loop during training (clinical/* in TensorBoard, the best kept in best/). "
        "--optimize searches hyperparameters with Optuna instead.",
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
        "--n-timesteps",
        dest="timesteps",
        type=count(1, MAX_TIMESTEPS),
        help="environment steps per seed (per trial with --optimize), 1 to 1e10 (overrides the "
        "config's n_timesteps)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose(p)
    g = p.add_argument_group(
        "hyperparameter search (Optuna, RL Zoo's conventions; the objective is the clinical "
        "evaluation's score, docs/training.md)"
    )
    g.add_argument(
        "--optimize",
        action="store_true",
        help="search the algorithm's hyperparameters instead of training the config once; "
        "writes OUT/trials.csv and OUT/best_config.yaml",
    )
    g.add_argument("--n-trials", type=count(1, 10_000), default=10, help="trials (default 10)")
    g.add_argument(
        "--n-evaluations",
        type=count(1, 1000),
        default=2,
        help="clinical evaluations per trial, reported to the pruner (default 2)",
    )
    g.add_argument(
        "--n-startup-trials",
        type=count(0, 10_000),
        default=5,
        help="random trials before TPE samples and the pruner prunes (default 5)",
    )
    g.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="default tpe")
    g.add_argument("--pruner", choices=("median", "none"), default="median", help="default median")
    p.set_defaults(handler=main_train)


def main_train(args: argparse.Namespace) -> int:
    """Run ``twinloop train``; errors print one line and return 2."""
    from twinloop.extras import MissingExtraError
    from twinloop.policies.errors import PolicyError
    from twinloop.policies.training import load_config, train

    try:
        config = load_config(args.config)
        if args.optimize:
            return _optimize(config, args)
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
    except (PolicyError, OSError, MissingExtraError):
        raise
    except Exception as exc:  # Ray/SB3 failures: one line, never a traceback
        raise PolicyError(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    for r in results:
        print(f"seed {r.seed}: {r.timesteps} steps in {r.seconds:.0f} s -> {r.directory}")
        if r.clinical is not None:
            c = r.clinical
            print(
                f"  best in the loop at {c['timesteps']:.0f} steps: time in range "
                f"{c['time_in_range_pct']:.1f} %, below 70 {c['time_below_70_pct']:.2f} %, "
                f"below 54 {c['time_below_54_pct']:.2f} %, {c['supervisor_overrides']:.1f} "
                "supervisor "
                f"overrides/day -> {r.directory}/best"
            )
    command = config.task.run_command(results[0].directory)
    print(f"run a policy in the loop (behind the safety supervisor):\n  {command}")
    return 0


def _optimize(config: Any, args: argparse.Namespace) -> int:
    from pathlib import Path

    from twinloop.policies.errors import PolicyConfigError
    from twinloop.policies.search import optimize

    if args.workers is not None or args.address is not None or args.seed:
        raise PolicyConfigError(
            "--optimize: trials run one after another on the config's first seed; "
            "--workers, --address and --seed are not allowed with it"
        )
    out = Path(args.out or Path(config.output_dir) / "optimize")
    search = ("n_trials", "n_evaluations", "n_startup_trials", "sampler", "pruner")
    options = {name: getattr(args, name) for name in search}
    result = optimize(
        config, out, n_timesteps=args.timesteps, progress=not args.no_progress, **options
    )
    print(f"trials: {out / 'trials.csv'}")
    if result.best_config is None:
        print("no trial completed (all pruned)")
        return 0
    print(f"best clinical score {result.best_value:.2f}; its config: {result.best_config}")
    print(f"train it:\n  twinloop train {result.best_config}")
    return 0
