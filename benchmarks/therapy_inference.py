"""Therapy settings inferred from a log against the known patient's (and the rules of thumb).

    .venv/bin/python benchmarks/therapy_inference.py [--patients adult#003 child#002 ...]
        [--days 7] [--seeds 1] [--carb-error 0.1]

For each shipped patient (default: all 30) and seed, ``twinloop.twins.synthetic`` simulates
``--days`` days of basal-bolus therapy (the patient's own CR and CF, corrections above
250 mg/dL, carbohydrates counted with a normal error of SD ``--carb-error``), writes the CSV log
and reads it back like any log; ``twinloop.twins.settings.infer_therapy`` infers the carb ratio
and correction factor. Prints a table (true value, inferred value and 90 % interval, error,
source; the 1800 rule's CF for comparison) and a summary: median and largest error, how many
intervals hold the true value.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", nargs="*", default=None, help="default: all 30")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per patient")
    parser.add_argument("--carb-error", type=float, default=0.1)
    args = parser.parse_args()

    from twinloop.plant.glucose.patients import cohort, get_patient
    from twinloop.plant.glucose.scenarios import CarbCountingError
    from twinloop.twins.identify import log_grid
    from twinloop.twins.logs import read_log
    from twinloop.twins.settings import Setting, infer_therapy
    from twinloop.twins.synthetic import synthetic_log

    patients = [get_patient(n) for n in args.patients] if args.patients else cohort("all")
    errors: dict[str, list[float]] = {"CR": [], "CF": [], "CF 1800 rule": []}
    inside = {"CR": 0, "CF": 0}
    ratios: list[float] = []
    sources: Counter[str] = Counter()
    print(
        f"{'patient':15s} {'seed':>4s}  {'CR true':>7s}  {'CR inferred [90 %]':24s} {'err':>6s}  "
        f"{'CF true':>7s}  {'CF inferred [90 %]':24s} {'err':>6s}  {'1800/TDI':>8s}  source"
    )

    def cell(s: Setting, true: float, key: str) -> str:
        err = 100 * (s.value / true - 1)
        errors[key].append(abs(err))
        if s.low is not None and s.high is not None and s.low <= true <= s.high:
            inside[key] += 1
        ci = "" if s.low is None else f"[{s.low:.2f}, {s.high:.2f}]"
        return f"{s.value:7.2f} {ci:16s} {err:+5.1f}%"

    with tempfile.TemporaryDirectory() as tmp:
        for p in patients:
            for seed in range(args.seeds):
                syn = synthetic_log(
                    p,
                    days=args.days,
                    seed=seed,
                    carb_error=CarbCountingError("normal", args.carb_error),
                )
                grid = log_grid(read_log(syn.write(Path(tmp) / "log.csv")))
                th = infer_therapy(grid)
                rule = 1800.0 / th.total_daily_insulin_u
                ratios.append(rule / p.correction_factor_mg_dl_per_u)
                errors["CF 1800 rule"].append(abs(100 * (ratios[-1] - 1)))
                sources[th.correction_factor_mg_dl_per_u.source] += 1
                cr, cf = th.carb_ratio_g_per_u, th.correction_factor_mg_dl_per_u
                print(
                    f"{p.name:15s} {seed:4d}  {p.carb_ratio_g_per_u:7.1f}  "
                    f"{cell(cr, p.carb_ratio_g_per_u, 'CR')}  "
                    f"{p.correction_factor_mg_dl_per_u:7.1f}  "
                    f"{cell(cf, p.correction_factor_mg_dl_per_u, 'CF')}  {rule:8.1f}  "
                    f"{cf.detail}",
                    flush=True,
                )
    n = len(errors["CR"])
    for key, errs in errors.items():
        held = f", true value inside the 90 % interval {inside[key]}/{n}" if key in inside else ""
        print(
            f"{key}: |error| median {np.median(errs):.1f} %, max {np.max(errs):.1f} %, "
            f"within 15 %: {sum(e <= 15 for e in errs)}/{n}{held}"
        )
    print(
        f"CF sources: {dict(sources)}; 1800/TDI over the true CF: "
        f"{min(ratios):.2f}–{max(ratios):.2f}×"
    )


if __name__ == "__main__":
    main()
