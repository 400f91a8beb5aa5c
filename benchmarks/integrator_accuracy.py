"""Speed and accuracy of integrator choices against simglucose's scenario-A reference trajectories.

Prints ONE JSON object to stdout (progress goes to stderr)::

    .venv/bin/python benchmarks/integrator_accuracy.py
    .venv/bin/python benchmarks/integrator_accuracy.py --reference DIR --repeats 5

The reference (``/work/shared/reference/simglucose-A/``, one CSV per patient) is simglucose
0.2.11's noise-free day of scenario A for all 30 patients (scipy ``ode`` dopri5, rtol 1e-6,
atol 1e-12, inputs held over each minute). The inputs are read from the reference itself
(``insulin_U_per_min``, ``cho_announced_g``) and the result is compared with its ``bg_mg_dl``
(plasma glucose ``x4/Vg``) at every minute 0..1440.

Integrators:

* ``rk4``: :func:`twinloop.plant.glucose.uva_padova.simulate` (the compiled fixed-step RK4) with
  ``substeps`` 1, 2, 4 per minute and ``eating_substeps`` 1 (plain RK4) or 4 (the default: 4x the
  substeps in minutes when the patient is swallowing), all 30 patients in one call on one core
  (``parallel=False``, ``numba.set_num_threads(1)``); best of ``--repeats`` samples, each
  repeating the call for at least ``--min-sample-s``.
* ``solve_ivp``: :func:`scipy.integrate.solve_ivp` minute by minute (``DOP853`` and ``LSODA``
  with rtol 1e-6 / atol 1e-9; plus ``RK45``, i.e. dopri5, with the reference's rtol 1e-6 /
  atol 1e-12) on the model's compiled right-hand side
  :func:`twinloop.plant.glucose.uva_padova._rhs`, for 3 patients (``--ivp-patients``), with the
  eating process advanced before each minute by
  :func:`twinloop.plant.glucose.uva_padova._eat` exactly as
  :func:`twinloop.plant.glucose.uva_padova.step_minute` does.

For each: ``max_abs_bg_err_mg_dl`` (max over minutes and patients, with where it happens) and
patient-days/s (wall time of the whole run, one core). The RK4 rows also give the error over
the ``solve_ivp`` patients only, for a like-for-like comparison.

The reference is itself an adaptive solution with rtol 1e-6, so it is not exact. Unless
``--skip-tight``, a near-exact solution (``DOP853``, rtol = atol = 1e-12, same minute-by-minute
loop) of the ``solve_ivp`` patients plus the patient where default RK4 is furthest from the
reference is computed too, and every integrator (and the reference) gets
``max_abs_bg_err_vs_tight_mg_dl`` over those patients.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

DEFAULT_REFERENCE = Path("/work/shared/reference/simglucose-A")
MINUTES_PER_DAY = 1440
IVP_METHODS: tuple[tuple[str, float, float], ...] = (
    ("DOP853", 1e-6, 1e-9),
    ("LSODA", 1e-6, 1e-9),
    ("RK45", 1e-6, 1e-12),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Reference:
    names: tuple[str, ...]
    insulin_u_per_min: NDArray[np.float64]  # (N, 1440)
    meal_g: NDArray[np.float64]  # (N, 1440)
    bg_mg_dl: NDArray[np.float64]  # (N, 1441)


def load_reference(directory: Path) -> Reference:
    files = sorted(p for p in directory.glob("*_[0-9][0-9][0-9].csv"))
    if not files:
        raise SystemExit(f"no <group>_<nnn>.csv reference files in {directory}")
    names: list[str] = []
    ins: list[list[float]] = []
    meals: list[list[float]] = []
    bgs: list[list[float]] = []
    for f in files:
        with f.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if len(rows) != MINUTES_PER_DAY + 1:
            raise SystemExit(f"{f}: expected {MINUTES_PER_DAY + 1} rows, got {len(rows)}")
        names.append(rows[0]["patient"])
        ins.append([float(r["insulin_U_per_min"]) for r in rows[:MINUTES_PER_DAY]])
        meals.append([float(r["cho_announced_g"]) for r in rows[:MINUTES_PER_DAY]])
        bgs.append([float(r["bg_mg_dl"]) for r in rows])
    return Reference(tuple(names), np.array(ins), np.array(meals), np.array(bgs))


def error_summary(
    bg: NDArray[np.float64], ref: NDArray[np.float64], names: Sequence[str]
) -> dict[str, Any]:
    err = np.abs(bg - ref)
    i, k = np.unravel_index(int(np.argmax(err)), err.shape)
    per_patient = err.max(axis=1)
    return {
        "max_abs_bg_err_mg_dl": float(err[i, k]),
        "worst_patient": names[int(i)],
        "worst_minute": int(k),
        "median_of_patient_max_mg_dl": float(np.median(per_patient)),
    }


def run_rk4(
    ref: Reference, ivp_rows: Sequence[int], repeats: int, min_sample_s: float
) -> list[dict[str, Any]]:
    import numba

    from twinloop.plant.glucose.patients import resolve_patients
    from twinloop.plant.glucose.uva_padova import simulate

    numba.set_num_threads(1)
    patients = resolve_patients(ref.names)
    assert tuple(p.name for p in patients) == ref.names
    n = len(patients)
    simulate(patients, ref.insulin_u_per_min, ref.meal_g, parallel=False)  # compile / load cache
    out: list[dict[str, Any]] = []
    for eating in (1, 4):
        for substeps in (1, 2, 4):
            kw: dict[str, Any] = {"substeps": substeps, "eating_substeps": eating}
            traj = simulate(patients, ref.insulin_u_per_min, ref.meal_g, parallel=False, **kw)
            t0 = time.perf_counter()
            simulate(patients, ref.insulin_u_per_min, ref.meal_g, parallel=False, **kw)
            calls = max(1, math.ceil(min_sample_s / (time.perf_counter() - t0)))
            times: list[float] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(calls):
                    simulate(patients, ref.insulin_u_per_min, ref.meal_g, parallel=False, **kw)
                times.append((time.perf_counter() - t0) / calls)
            sub = [ref.names[r] for r in ivp_rows]
            row: dict[str, Any] = {
                "integrator": "rk4",
                "substeps": substeps,
                "eating_substeps": eating,
                "default": substeps == 1 and eating == 4,
                "patients": n,
                **error_summary(traj.bg_mg_dl, ref.bg_mg_dl, ref.names),
                "ivp_patients_max_abs_bg_err_mg_dl": error_summary(
                    traj.bg_mg_dl[list(ivp_rows)], ref.bg_mg_dl[list(ivp_rows)], sub
                )["max_abs_bg_err_mg_dl"],
                "best_s": min(times),
                "patient_days_per_s": n / min(times),
            }
            log(
                f"rk4 substeps={substeps} eating_substeps={eating}: "
                f"err {row['max_abs_bg_err_mg_dl']:.2e} mg/dL, "
                f"{row['patient_days_per_s']:.0f} patient-days/s"
            )
            out.append(row)
    return out


def _ivp_rhs(
    t: float,
    y: NDArray[np.float64],
    params: NDArray[np.float64],
    meal_mg_per_min: float,
    insulin_pmol_per_kg_min: float,
    dbar_mg: float,
) -> NDArray[np.float64]:
    from twinloop.plant.glucose.uva_padova import _rhs

    dx = np.empty(13)
    _rhs(np.ascontiguousarray(y), params, meal_mg_per_min, insulin_pmol_per_kg_min, dbar_mg, dx)
    return dx


def ivp_day(
    name: str,
    insulin_u_per_min: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    method: str,
    rtol: float,
    atol: float,
) -> tuple[NDArray[np.float64], int]:
    """One patient-day minute by minute with ``solve_ivp``; return (BG per minute, RHS calls)."""
    from scipy.integrate import solve_ivp

    from twinloop.plant.glucose.patients import PMOL_PER_U, get_patient, parameter_matrix
    from twinloop.plant.glucose.uva_padova import (
        M_EATEN_G,
        M_QSTO_AT_START_MG,
        MG_PER_G,
        N_MEAL_STATE,
        _eat,
    )

    p = get_patient(name)
    params = parameter_matrix([p])[0]
    x = np.array(p.x0, dtype=np.float64)
    meal = np.zeros(N_MEAL_STATE)
    bg = np.empty(MINUTES_PER_DAY + 1)
    bg[0] = x[3] / p.vg_dl_per_kg
    nfev = 0
    for k in range(MINUTES_PER_DAY):
        swallowed = _eat(meal, x, float(meal_g[k]), 5.0)
        dbar = meal[M_QSTO_AT_START_MG] + meal[M_EATEN_G] * MG_PER_G
        args = (params, swallowed * MG_PER_G, insulin_u_per_min[k] * PMOL_PER_U / p.body_weight_kg)
        sol = solve_ivp(
            _ivp_rhs, (0.0, 1.0), x, method=method, rtol=rtol, atol=atol, args=(*args, dbar)
        )
        if not sol.success:
            raise RuntimeError(f"{method} failed for {name} at minute {k}: {sol.message}")
        nfev += int(sol.nfev)
        x = np.ascontiguousarray(sol.y[:, -1])
        bg[k + 1] = x[3] / p.vg_dl_per_kg
    return bg, nfev


def run_ivp(ref: Reference, rows: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    from twinloop.plant.glucose.uva_padova import _eat, _rhs

    # compile the numba functions outside the timing
    _rhs(np.ones(13), np.ones(31), 0.0, 0.0, 0.0, np.empty(13))
    _eat(np.zeros(4), np.ones(13), 0.0, 5.0)
    names = [ref.names[r] for r in rows]
    out: list[dict[str, Any]] = []
    for method, rtol, atol in IVP_METHODS:
        best = float("inf")
        bg = np.empty((len(rows), MINUTES_PER_DAY + 1))
        nfev = 0
        for _ in range(repeats):
            nfev = 0
            t0 = time.perf_counter()
            for j, r in enumerate(rows):
                bg[j], nf = ivp_day(
                    ref.names[r], ref.insulin_u_per_min[r], ref.meal_g[r], method, rtol, atol
                )
                nfev += nf
            best = min(best, time.perf_counter() - t0)
        row: dict[str, Any] = {
            "integrator": f"solve_ivp {method}",
            "rtol": rtol,
            "atol": atol,
            "patients": len(rows),
            "patient_names": names,
            **error_summary(bg, ref.bg_mg_dl[list(rows)], names),
            "rhs_calls_per_patient_day": nfev / len(rows),
            "best_s": best,
            "patient_days_per_s": len(rows) / best,
            "_bg": bg.copy(),
        }
        log(
            f"solve_ivp {method}: err {row['max_abs_bg_err_mg_dl']:.2e} mg/dL, "
            f"{row['patient_days_per_s']:.3f} patient-days/s"
        )
        out.append(row)
    return out


def add_tight_errors(
    ref: Reference, ivp_rows: Sequence[int], result: dict[str, Any]
) -> dict[str, Any]:
    """Compare every integrator with a DOP853 rtol = atol = 1e-12 solution (see docstring)."""
    from twinloop.plant.glucose.patients import resolve_patients
    from twinloop.plant.glucose.uva_padova import simulate

    default = next(r for r in result["rk4"] if r["default"])
    rows = list(dict.fromkeys([*ivp_rows, ref.names.index(default["worst_patient"])]))
    names = [ref.names[r] for r in rows]
    t0 = time.perf_counter()
    tight = np.array(
        [
            ivp_day(ref.names[r], ref.insulin_u_per_min[r], ref.meal_g[r], "DOP853", 1e-12, 1e-12)[
                0
            ]
            for r in rows
        ]
    )
    seconds = time.perf_counter() - t0
    log(f"tight DOP853 solution of {names}: {seconds:.1f} s")
    patients = resolve_patients(names)
    for r in result["rk4"]:
        kw = {"substeps": r["substeps"], "eating_substeps": r["eating_substeps"]}
        bg = simulate(patients, ref.insulin_u_per_min[rows], ref.meal_g[rows], **kw).bg_mg_dl
        r["max_abs_bg_err_vs_tight_mg_dl"] = error_summary(bg, tight, names)["max_abs_bg_err_mg_dl"]
    ivp_names = [ref.names[r] for r in ivp_rows]
    for r in result.get("solve_ivp", []):
        r["max_abs_bg_err_vs_tight_mg_dl"] = error_summary(
            r["_bg"], tight[[rows.index(i) for i in ivp_rows]], ivp_names
        )["max_abs_bg_err_mg_dl"]
    return {
        "method": "solve_ivp DOP853 rtol=1e-12 atol=1e-12, minute by minute",
        "patients": names,
        "seconds": seconds,
        "reference_vs_tight": error_summary(ref.bg_mg_dl[rows], tight, names),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--repeats", type=int, default=5, help="timing samples of each RK4 run")
    ap.add_argument(
        "--min-sample-s", type=float, default=0.3, help="each RK4 sample repeats the call this long"
    )
    ap.add_argument("--ivp-repeats", type=int, default=1, help="timing samples of solve_ivp")
    ap.add_argument(
        "--ivp-patients",
        default="adolescent#001,adult#001,child#001",
        help="comma-separated patients integrated with solve_ivp",
    )
    ap.add_argument("--skip-ivp", action="store_true")
    ap.add_argument("--skip-tight", action="store_true", help="no DOP853 1e-12 solution")
    args = ap.parse_args(argv)

    import numba

    ref = load_reference(args.reference)
    ivp_rows = [ref.names.index(n.strip()) for n in args.ivp_patients.split(",") if n.strip()]
    versions: dict[str, str | None] = {}
    for pkg in ("numpy", "numba", "scipy", "twinloop"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    result: dict[str, Any] = {
        "benchmark": "integrator_accuracy",
        "repeats": args.repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": str(args.reference),
        "reference_patients": len(ref.names),
        "machine": {
            "cpu_count": os.cpu_count(),
            "numba_threads_used": 1,
            "numba_max_threads": numba.config.NUMBA_NUM_THREADS,  # type: ignore[attr-defined]
            "python": platform.python_version(),
            "versions": versions,
        },
        "loadavg_start": os.getloadavg(),
        "rk4": run_rk4(ref, ivp_rows, args.repeats, args.min_sample_s),
    }
    if not args.skip_ivp:
        result["solve_ivp"] = run_ivp(ref, ivp_rows, args.ivp_repeats)
    if not args.skip_tight:
        result["tight"] = add_tight_errors(ref, ivp_rows, result)
    for r in result.get("solve_ivp", []):
        r.pop("_bg")
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
