"""A trained knee policy against the impedance and assist-as-needed controllers on one env.

Prints ONE JSON object to stdout (progress to stderr)::

    .venv/bin/python benchmarks/exo_policy_eval.py --policy policies/shipped/knee_sac/seed_0
    .venv/bin/python benchmarks/exo_policy_eval.py --policy DIR --presets mild moderate \\
        --seeds 0 1 2 3 4 --cycles 5

Each controller drives the same ``twinloop/KneeExo-v0``
(:class:`~twinloop.plant.knee.env.KneeExoEnv`, action in N·m, default termination limits) for each
preset and seed: the cyclic flexion–extension task with ``--cycles`` cycles (amplitude and period
randomised from the seed, so every controller sees the same task, initial angle and sensor noise),
at ``--control-hz``. Controllers:

* ``none`` — zero torque (the drive's friction still acts);
* ``impedance`` — ``ImpedanceController()`` (K 60 N·m/rad, B 3 N·m·s/rad);
* ``aan`` — ``AssistAsNeededController(period_s=<the episode's task period>)``, learning from
  zero within the episode;
* ``policy`` — the saved policy (``--policy DIR``), deterministic.

Every controller gets the env's observation as an
:class:`~twinloop.policies.knee.controllers.ExoInput` (encoder angle and velocity, torque sensor,
EMG, reference), as in the loop. Per run: RMS and maximum tracking error of the *true* angle
(degrees, every control step), the exo's share of |work| (``Σ|W_exo| / (Σ|W_exo| +
Σ|W_patient|)`` over the steps' work, J, integrated by the plant at 1 kHz), its share of
positive work (``Σ max(W, 0)`` per step, the :mod:`twinloop.plant.knee.metrics` definition at the
control rate), RMS torque command (N·m) and whether the episode terminated (left the range of
motion or the velocity limit). The summary is the mean over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np

from twinloop.plant.knee.env import KneeExoEnv
from twinloop.plant.knee.env_core import KneeExoConfig
from twinloop.plant.knee.tasks import K_T, CyclicFlexionExtension
from twinloop.policies.knee.controllers import (
    AssistAsNeededController,
    ExoInput,
    ImpedanceController,
)

CONTROLLERS = ("none", "impedance", "aan", "policy")


def exo_input(obs: np.ndarray, t_s: float) -> ExoInput:
    """The loop's controller input from the env's observation (see the env card)."""
    o = [float(v) for v in obs]
    return ExoInput(t_s, o[0], o[1], o[5], o[6], o[2], o[3], o[4])


def run_episode(
    preset: str,
    controller: str,
    seed: int,
    *,
    cycles: int = 5,
    control_hz: int = 100,
    policy: str | None = None,
) -> dict[str, Any]:
    """One episode of ``controller`` on ``preset`` with ``seed``; the metrics of the docstring."""
    env = KneeExoEnv(
        KneeExoConfig(
            patients=(preset,),
            tasks=(CyclicFlexionExtension(cycles=cycles),),
            control_hz=control_hz,
        )
    )
    obs, info = env.reset(seed=seed)
    period_s = float(env._batch.task[0][K_T])
    ctrl: Any = None
    if controller == "impedance":
        ctrl = ImpedanceController()
    elif controller == "aan":
        ctrl = AssistAsNeededController(period_s=period_s)
    elif controller == "policy":
        from twinloop.policies.knee.learned import load_exo_policy

        if policy is None:
            raise SystemExit("--policy DIR is needed for the policy controller")
        ctrl = load_exo_policy(policy, control_hz=control_hz)
    err, taus = [], []
    w_exo = w_pat = p_exo = p_pat = 0.0
    terminated = False
    while True:
        tau = 0.0 if ctrl is None else float(ctrl.torque(exo_input(obs, info["time_s"])))
        obs, _, terminated, truncated, info = env.step(np.array([tau], np.float32))
        err.append(math.degrees(info["tracking_error_rad"]))
        taus.append(info["exo_command_nm"])
        we, wp = info["exo_work_j"], info["patient_work_j"]
        w_exo += abs(we)
        w_pat += abs(wp)
        p_exo += max(we, 0.0)
        p_pat += max(wp, 0.0)
        if terminated or truncated:
            break
    e = np.asarray(err)
    return {
        "rms_error_deg": float(np.sqrt(np.mean(e * e))),
        "max_error_deg": float(np.max(np.abs(e))),
        "exo_abs_work_share": w_exo / (w_exo + w_pat) if w_exo + w_pat > 0 else 0.0,
        "exo_positive_work_share": p_exo / (p_exo + p_pat) if p_exo + p_pat > 0 else 0.0,
        "rms_torque_nm": float(np.sqrt(np.mean(np.square(taus)))),
        "terminated": bool(terminated),
        "duration_s": len(err) / control_hz,
        "task_period_s": period_s,
    }


def evaluate(
    presets: list[str],
    controllers: list[str],
    seeds: list[int],
    *,
    cycles: int = 5,
    control_hz: int = 100,
    policy: str | None = None,
) -> dict[str, Any]:
    """Mean metrics per preset and controller over ``seeds`` (and the per-seed runs)."""
    out: dict[str, Any] = {}
    for preset in presets:
        out[preset] = {}
        for name in controllers:
            print(f"{preset} {name}…", file=sys.stderr)
            runs = [
                run_episode(preset, name, s, cycles=cycles, control_hz=control_hz, policy=policy)
                for s in seeds
            ]
            mean = {
                k: round(float(np.mean([r[k] for r in runs])), 4)
                for k in runs[0]
                if k not in ("terminated", "task_period_s")
            }
            mean["terminated"] = sum(r["terminated"] for r in runs)
            out[preset][name] = {"mean": mean, "runs": runs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="a knee policy directory saved by twinloop train")
    parser.add_argument("--presets", nargs="+", default=["mild", "moderate"])
    parser.add_argument("--controllers", nargs="+", default=None, choices=CONTROLLERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--control-hz", type=int, default=100)
    args = parser.parse_args()
    controllers = args.controllers or [c for c in CONTROLLERS if c != "policy" or args.policy]
    started = time.perf_counter()
    result = evaluate(
        args.presets,
        controllers,
        args.seeds,
        cycles=args.cycles,
        control_hz=args.control_hz,
        policy=args.policy,
    )
    summary = {p: {c: v["mean"] for c, v in r.items()} for p, r in result.items()}
    doc = {
        "policy": args.policy,
        "task": {"name": "cyclic", "cycles": args.cycles, "control_hz": args.control_hz},
        "seeds": args.seeds,
        "summary": summary,
        "runs": {p: {c: v["runs"] for c, v in r.items()} for p, r in result.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
