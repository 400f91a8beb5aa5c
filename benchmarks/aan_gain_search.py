"""Search assist-as-needed's gains on the knee loop (issue 22): ONE JSON object on stdout.

Every point is :class:`~twinloop.policies.knee.controllers.AssistAsNeededController` with some
of its defaults replaced, run in the product's closed loop (``_row`` of
``benchmarks/exo_assistance.py``: sensors, knee twin, controller, supervisor, 1 kHz plant).
Searched: the impedance's stiffness and damping, the learning gain, the forgetting
rate, the dead zone, ``min_impedance_scale`` and the torque limit (≤ 40 N·m, the supervisor's
default limit), by Optuna's TPE sampler (seeded; its first points are the former defaults, a
hand probe's best, a first run's best and the shipped gains).

A point is *feasible* when, on *mild* and *moderate*, the mean RMS error over the tuning seeds
is ≤ 3°, the exoskeleton does ≤ 50 % of the joint's positive work, there is no limit violation,
and the unit test's own run (``cycles 4``, seed 0) also stays within 3° on both. Among feasible
points the objective is the saving at matched error on *moderate* (``_matched``: impedance's
stiffness bisected until its RMS error is within ``--match-tol-deg`` of the point's, and
``saving = 1 − AAN share / impedance share`` of the positive work). The tolerance is 0.03°
by default, tighter than ``exo_assistance.py``'s 0.1°: a search that maximises the saving
otherwise picks points whose matched impedance lands ~0.1° *below* their error, where
impedance's share is ~0.014 higher (its slope near 2° on *moderate*), ~9 points of "saving"
from the tolerance alone (seen in a first run at 0.1°). *Severe* is reported for
every point (RMS, share, violations) and matched for the chosen point. The chosen point and the
defaults are then validated on other seeds (``--validate-seeds``, 3 4 5), matched on *moderate*
and *severe*. Infeasible points score ``−1 −`` how far they miss (the sampler's gradient).

Usage: ``python benchmarks/aan_gain_search.py [--trials 50] [--seeds 0 1 2]
[--validate-seeds 3 4 5] [--cycles 10]`` (progress on stderr; ≈ 10 min at load 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exo_assistance import STIFFNESS_SWEEP_NM_PER_RAD, _matched, _mean, _row

from twinloop.agents.knee.supervisor import ExoSupervisorConfig

#: the supervisor's command limit (its torque limit less the gear-friction margin), N·m
COMMAND_LIMIT_NM = ExoSupervisorConfig().command_limit_nm

#: AssistAsNeededController's defaults before this search (validated beside the chosen point)
START: dict[str, float] = {
    "stiffness_nm_per_rad": 15.0,
    "damping_nm_s_per_rad": 1.5,
    "learning_gain_nm_per_rad_s": 400.0,
    "forgetting_per_s": 0.1,
    "error_tolerance_deg": 1.5,
    "min_impedance_scale": 0.2,
    "torque_limit_nm": COMMAND_LIMIT_NM,
}
#: the sampler's first points, in its own parameters: the former defaults, a hand probe's best
#: (forgetting 3/s with learning gain 1600: moderate 1.82° at 10 cycles, seeds 0 1 2), a first
#: run's best and the shipped gains
STARTS: tuple[dict[str, float], ...] = (
    {
        "stiffness_nm_per_rad": 15.0,
        "damping_s": 0.1,
        "learning_gain": 400.0,
        "forgetting_per_s": 0.1,
        "error_tolerance_deg": 1.5,
        "min_impedance_scale": 0.2,
        "torque_limit_nm": COMMAND_LIMIT_NM,
    },
    {
        "stiffness_nm_per_rad": 15.0,
        "damping_s": 0.1,
        "learning_gain": 1600.0,
        "forgetting_per_s": 3.0,
        "error_tolerance_deg": 1.5,
        "min_impedance_scale": 0.2,
        "torque_limit_nm": COMMAND_LIMIT_NM,
    },
    {  # the best of a first run (60 trials, stiffness ≤ 60, matched within 0.1°)
        "stiffness_nm_per_rad": 58.8,
        "damping_s": 0.21,
        "learning_gain": 960.0,
        "forgetting_per_s": 4.7,
        "error_tolerance_deg": 2.0,
        "min_impedance_scale": 0.53,
        "torque_limit_nm": 35.0,
    },
    {  # the shipped gains: this search's choice on the plant of 1bd05cd (before main's 3CC-r
        # fatigue average and 17-ms reflex delay), rounded
        "stiffness_nm_per_rad": 69.0,
        "damping_s": 9.7 / 69.0,
        "learning_gain": 3160.0,
        "forgetting_per_s": 5.6,
        "error_tolerance_deg": 1.0,
        "min_impedance_scale": 0.53,
        "torque_limit_nm": COMMAND_LIMIT_NM,
    },
)
RMS_TARGET_DEG = 3.0
SHARE_TARGET = 0.5
TEST_CYCLES = 4  # tests/agents/knee/test_loop.py's run: seed 0, 4 cycles


def controller_kwargs(point: dict[str, float]) -> dict[str, float]:
    """The controller's keyword arguments for a point (the dead zone given in degrees)."""
    out = {k: v for k, v in point.items() if k != "error_tolerance_deg"}
    out["error_tolerance_rad"] = math.radians(point["error_tolerance_deg"])
    return out


def sweep(patient: str, seeds: list[int], cycles: int) -> list[dict[str, float]]:
    """Impedance's mean RMS error and work share at each stiffness of the sweep."""
    out = []
    for k in STIFFNESS_SWEEP_NM_PER_RAD:
        rows = [_row(patient, "impedance", s, cycles, k) for s in seeds]
        out.append(
            {
                "stiffness_nm_per_rad": k,
                "rms_error_deg": _mean(rows, "rms_error_deg"),
                "exo_work_fraction": _mean(rows, "exo_work_fraction"),
            }
        )
    return out


def aan(patient: str, point: dict[str, float], seeds: list[int], cycles: int) -> dict[str, Any]:
    """Assist-as-needed at ``point``: mean RMS error, work share, total limit violations."""
    rows = [_row(patient, "aan", s, cycles, aan=controller_kwargs(point)) for s in seeds]
    return {
        "rms_error_deg": _mean(rows, "rms_error_deg"),
        "exo_work_fraction": _mean(rows, "exo_work_fraction"),
        "limit_violations": int(sum(r["limit_violations"] for r in rows)),
    }


def matched(
    patient: str,
    row: dict[str, Any],
    seeds: list[int],
    cycles: int,
    imp_sweep: list[dict[str, float]],
    tol_deg: float,
) -> dict[str, Any]:
    """``row`` with impedance at matched error (stiffness, RMS, share) and the saving."""
    m = _matched(patient, seeds, cycles, imp_sweep, row["rms_error_deg"], tol_deg)
    if m is None:
        return row | {"matched": None, "saving": None}
    imp = {f: m[f] for f in ("stiffness_nm_per_rad", "rms_error_deg", "exo_work_fraction")}
    return row | {"matched": imp, "saving": 1.0 - row["exo_work_fraction"] / m["exo_work_fraction"]}


def shortfall(rows: dict[str, dict[str, Any]]) -> float:
    """How far a point misses the constraints (0: feasible), in units of each target."""
    miss = 0.0
    for key in ("mild", "moderate", "mild_test", "moderate_test"):
        miss += max(rows[key]["rms_error_deg"] / RMS_TARGET_DEG - 1.0, 0.0)
    for key in ("mild", "moderate"):
        miss += max(rows[key]["exo_work_fraction"] / SHARE_TARGET - 1.0, 0.0)
        miss += 0.01 * rows[key]["limit_violations"]
    return miss


def suggest(trial: Any) -> dict[str, float]:
    """A point of the search space (the damping as a multiple of the stiffness)."""
    k = trial.suggest_float("stiffness_nm_per_rad", 0.0, 100.0)
    return {
        "stiffness_nm_per_rad": k,
        "damping_nm_s_per_rad": k * trial.suggest_float("damping_s", 0.02, 0.3, log=True),
        "learning_gain_nm_per_rad_s": trial.suggest_float("learning_gain", 100.0, 5000.0, log=True),
        "forgetting_per_s": trial.suggest_float("forgetting_per_s", 0.02, 10.0, log=True),
        "error_tolerance_deg": trial.suggest_float("error_tolerance_deg", 0.0, 3.0),
        "min_impedance_scale": trial.suggest_float("min_impedance_scale", 0.0, 1.0),
        "torque_limit_nm": trial.suggest_float("torque_limit_nm", 20.0, COMMAND_LIMIT_NM),
    }


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def validate(
    point: dict[str, float], seeds: list[int], cycles: int, tol_deg: float
) -> dict[str, Any]:
    """``point`` on other seeds: every preset, matched on moderate and severe."""
    out: dict[str, Any] = {"mild": aan("mild", point, seeds, cycles)}
    for patient in ("moderate", "severe"):
        imp = sweep(patient, seeds, cycles)
        out[patient] = matched(
            patient, aan(patient, point, seeds, cycles), seeds, cycles, imp, tol_deg
        )
    return out


def main() -> None:
    import optuna
    from tqdm import tqdm

    from twinloop.agents.progress import STARTING, counting_from_first

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--validate-seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--match-tol-deg", type=float, default=0.03)
    parser.add_argument("--sampler-seed", type=int, default=0)
    args = parser.parse_args()
    if not (math.isfinite(args.match_tol_deg) and args.match_tol_deg > 0):
        parser.error(f"--match-tol-deg {args.match_tol_deg}: must be > 0 degrees")
    if args.cycles < 1:
        parser.error(f"--cycles {args.cycles}: must be >= 1")
    if args.trials < 1:
        parser.error(f"--trials {args.trials}: must be >= 1")
    t0 = time.perf_counter()
    seeds, cycles, tol = args.seeds, args.cycles, args.match_tol_deg
    bar = tqdm(total=args.trials + 2, desc="aan search" + STARTING, file=sys.stderr)
    update = counting_from_first(bar, "aan search")
    sweeps = {p: sweep(p, seeds, cycles) for p in ("moderate", "severe")}
    update(1)
    points: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        point = suggest(trial)
        rows = {p: aan(p, point, seeds, cycles) for p in ("mild", "moderate", "severe")}
        for p in ("mild", "moderate"):
            rows[p + "_test"] = aan(p, point, [0], TEST_CYCLES)
        miss = shortfall(rows)
        if miss == 0.0:
            rows["moderate"] = matched(
                "moderate", rows["moderate"], seeds, cycles, sweeps["moderate"], tol
            )
        saving = rows["moderate"].get("saving")
        score = -1.0 - miss if miss > 0 or saving is None else float(saving)
        points.append({"point": point, "feasible": miss == 0.0, "score": score} | rows)
        update(1)
        return score

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.sampler_seed)
    )
    for start in STARTS:
        study.enqueue_trial(start)
    study.optimize(objective, n_trials=args.trials)
    best = max(points, key=lambda r: r["score"])
    chosen: dict[str, Any] = dict(best)
    if best["feasible"]:
        chosen["severe"] = matched("severe", best["severe"], seeds, cycles, sweeps["severe"], tol)
    validation = {
        "chosen": validate(best["point"], args.validate_seeds, cycles, tol),
        "defaults": validate(START, args.validate_seeds, cycles, tol),
    }
    update(1)
    bar.close()
    result = {
        "seeds": seeds,
        "validate_seeds": args.validate_seeds,
        "cycles": cycles,
        "match_tol_deg": tol,
        "impedance_sweeps": _round(sweeps),
        "points": [_round(p) for p in points],
        "chosen": _round(chosen),
        "validation": _round(validation),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
