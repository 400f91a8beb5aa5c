"""Twin identification against synthetic ground truth: held-out fidelity and parameter errors.

    .venv/bin/python benchmarks/twin_identification.py [--patients 10] [--group adults]
        [--carb-error 0.1] [--seed 11] [--days 14] [--fit-days 7] [--profile-blocks 0]

For each of ``--patients`` virtual patients drawn from the population model
(``twinloop.plant.glucose.population.sample_population``, not the 30 shipped ones the prior is built
from), ``twinloop.twins.synthetic`` simulates ``--days`` days: random meals counted with a normal
error of SD ``--carb-error``, optionally a daily sensitivity profile ``--true-profile``, basal-bolus
therapy on the counted carbs, GuardianRT CGM errors, rescue carbohydrates. It writes the CSV
log, which is read back with ``twinloop.twins.logs.read_log`` like any log. The twin is fitted (MAP)
on the first ``--fit-days`` days, then replays the *logged*
insulin and carbohydrates over all days; on the held-out days:

* CGM RMSE: twin vs the logged CGM readings (target ≤ 15 mg/dL);
* TIR error: the twin's time in range 70–180 minus the true patient's (its noise-free
  subcutaneous glucose, every minute; target within ±3 points);
* the *oracle*: the true patient itself replaying the same logged inputs (so the counted,
  not the eaten, carbohydrates). What it misses is the floor that carb-counting error and CGM
  noise put under any twin;
* the fitted parameters' relative errors against the true patient's.

Prints one JSON document: per patient, then the summary (mean, max, how many meet each target).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RMSE_MG_DL = 15.0
TARGET_TIR_PTS = 3.0
#: The fitted quantities compared with the truth (twin patient attribute = true attribute).
COMPARED = (
    "glucose_basal_mg_dl",
    "egp_basal_mg_per_kg_min",
    "vmx_mg_per_kg_min_per_pmol_l",
    "kp3_mg_per_kg_min_per_pmol_l",
    "kabs_per_min",
    "kmax_per_min",
    "p2u_per_min",
    "kd_per_min",
)


def _oracle(true, syn, meals, profile):  # type: ignore[no-untyped-def]
    """The true patient (with its true daily profile) replaying the logged inputs."""
    from twinloop.plant.glucose.patients import initial_states, parameter_matrix
    from twinloop.twins.replay import LoggedTherapy, closed_loop

    if profile is None:
        from twinloop.plant.glucose.uva_padova import simulate

        return simulate([true], syn.trace.insulin_u_per_min[0], meals).gsub_mg_dl[0]
    blocks = np.asarray(profile)
    width = 1440 // blocks.size
    start = syn.start.hour * 60 + syn.start.minute
    therapy = LoggedTherapy(
        syn.trace.basal_u_per_h[0], syn.trace.bolus_u[0], meals,
        carb_ratio_g_per_u=true.carb_ratio_g_per_u,
        correction_factor_mg_dl_per_u=true.correction_factor_mg_dl_per_u,
    )  # fmt: skip
    trace = closed_loop(
        parameter_matrix([true]), initial_states([true]), [therapy], meal_g=meals,
        announced_g=meals, scheduled_basal_u_per_h=np.array([true.basal_u_per_h]),
        sensitivity=lambda t: np.array([blocks[((start + t) % 1440) // width]]),
    )  # fmt: skip
    return trace.gsub_mg_dl[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--group", default="adults")
    parser.add_argument("--carb-error", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--fit-days", type=int, default=7)
    parser.add_argument("--profile-blocks", type=int, default=0)
    parser.add_argument(
        "--true-profile",
        help="the true patients' daily insulin-sensitivity factors, e.g. 0.6,1.1,1.1,1.2 "
        "(blocks of the local day; default none)",
    )
    args = parser.parse_args()
    true_profile = [float(v) for v in args.true_profile.split(",")] if args.true_profile else None

    from tqdm import tqdm

    from twinloop.plant.glucose.metrics import glucose_metrics
    from twinloop.plant.glucose.population import sample_population
    from twinloop.plant.glucose.scenarios import CarbCountingError
    from twinloop.twins.identify import MIN_PER_DAY, log_grid
    from twinloop.twins.logs import read_log
    from twinloop.twins.person import FitRequest, fit_log
    from twinloop.twins.synthetic import synthetic_log

    def tir(g: np.ndarray) -> float:
        return float(glucose_metrics(g, sample_period_min=1.0).time_in_range_70_180_pct)

    def rmse(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - b) ** 2)))

    patients, _ = sample_population(args.patients, seed=args.seed, groups={args.group: 1.0})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, true in enumerate(tqdm(patients, desc="twins", unit="patient")):
            syn = synthetic_log(
                true,
                days=args.days,
                seed=1000 + i,
                carb_error=CarbCountingError("normal", args.carb_error)
                if args.carb_error > 0
                else None,
                sensitivity_profile=true_profile,
            )
            path = syn.write(Path(tmp) / f"log_{i}.csv")
            fit, _, _ = fit_log(
                FitRequest(
                    (str(path),),
                    name=true.name,
                    group=args.group,
                    fit_days=args.fit_days,
                    profile_blocks=args.profile_blocks,
                )
            )
            grid = log_grid(read_log(path))
            first = args.fit_days * MIN_PER_DAY
            twin = fit.model.simulate(fit.z_map[None, :], grid)[0]
            held = np.arange(grid.minutes + 1) >= first
            readings = held & ~np.isnan(grid.cgm_mg_dl)
            truth = syn.trace.gsub_mg_dl[0, : grid.minutes + 1]
            logged_meals = syn.announced_g + syn.trace.rescue_g[0]
            oracle = _oracle(true, syn, logged_meals, true_profile)[: grid.minutes + 1]
            twin_p = fit.patient
            rows.append(
                {
                    "patient": true.name,
                    "fit_s": fit.fit["seconds"],
                    "fit_rmse_mg_dl": fit.fit["rmse_mg_dl"],
                    "held_out_cgm_rmse_mg_dl": rmse(twin[readings], grid.cgm_mg_dl[readings]),
                    "oracle_cgm_rmse_mg_dl": rmse(oracle[readings], grid.cgm_mg_dl[readings]),
                    "held_out_true_rmse_mg_dl": rmse(twin[held], truth[held]),
                    "tir_true_pct": tir(truth[held]),
                    "tir_twin_error_pts": tir(twin[held]) - tir(truth[held]),
                    "tir_oracle_error_pts": tir(oracle[held]) - tir(truth[held]),
                    "fitted_profile": fit.model.block_factors(fit.z_map).tolist(),
                    "parameter_error_pct": {
                        k: 100.0 * (getattr(twin_p, k) / getattr(true, k) - 1.0) for k in COMPARED
                    },
                }
            )

    def col(key: str) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=float)

    rm, tir_err = col("held_out_cgm_rmse_mg_dl"), col("tir_twin_error_pts")
    summary = {
        "held_out_cgm_rmse_mg_dl": {"mean": rm.mean(), "max": rm.max()},
        "oracle_cgm_rmse_mg_dl": {
            "mean": col("oracle_cgm_rmse_mg_dl").mean(),
            "max": col("oracle_cgm_rmse_mg_dl").max(),
        },
        "held_out_true_rmse_mg_dl": {"mean": col("held_out_true_rmse_mg_dl").mean()},
        "tir_twin_abs_error_pts": {"mean": np.abs(tir_err).mean(), "max": np.abs(tir_err).max()},
        "tir_oracle_abs_error_pts": {
            "mean": np.abs(col("tir_oracle_error_pts")).mean(),
            "max": np.abs(col("tir_oracle_error_pts")).max(),
        },
        "patients_meeting_rmse": int((rm <= TARGET_RMSE_MG_DL).sum()),
        "patients_meeting_tir": int((np.abs(tir_err) <= TARGET_TIR_PTS).sum()),
        "patients": len(rows),
        "parameter_abs_error_pct_median": {
            k: float(np.median([abs(r["parameter_error_pct"][k]) for r in rows])) for k in COMPARED
        },
        "fit_s": {"mean": col("fit_s").mean(), "max": col("fit_s").max()},
    }
    print(
        json.dumps(
            {
                "benchmark": "twin_identification",
                "config": vars(args),
                "targets": {"rmse_mg_dl": TARGET_RMSE_MG_DL, "tir_pts": TARGET_TIR_PTS},
                "summary": summary,
                "per_patient": rows,
                "unix_time": time.time(),
            },
            indent=1,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
