"""Forecast quality and TIR with and without the loop's daily re-fit (population start).

    .venv/bin/python benchmarks/refit_forecast.py [--patient adult#007] [--days 4]

Per patient and setting: the twin's 30-min forecast RMSE against the true plasma glucose 30 min
later, the persistence forecast's (the CGM reading at the tick), both from the end of day 1 on
(after the first re-fit), time in range, and the 1-U correction drop of the final model vs truth.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.plant.glucose.metrics import glucose_metrics
from twinloop.plant.glucose.models import correction_drop_mg_dl
from twinloop.plant.glucose.patients import get_patient


def one(name: str, days: int, refit: int, controller: str, max_iter: int) -> str:
    truth = get_patient(name)
    cfg = LoopConfig(patients=(name,), days=days, controller=controller, refit_every_days=refit,
                     refit_window_days=7, refit_max_iter=max_iter)  # fmt: skip
    loop = PatientLoop(truth, cfg, np.random.default_rng(0))
    seen: dict[str, list] = {}
    loop.listen(lambda ch, m: seen.setdefault(ch, []).append(m))
    began = time.perf_counter()
    try:
        loop.run()
    finally:
        loop.close()
    took = time.perf_counter() - began
    bg = np.array([m.bg_mg_dl for m in seen["plant->sensor"]])
    cgm = {round(r.t_min): r.glucose_mg_dl for r in seen["sensor->controller"]}
    f, p, y = [], [], []
    for e in seen["estimator->controller"]:
        t = round(e.t_min)
        if t >= 1500 and t + 30 < bg.size:
            f.append(e.forecast_30_mg_dl)
            p.append(cgm[t])
            y.append(bg[t + 30])
    y_ = np.array(y)
    rmse = float(np.sqrt(np.mean((np.array(f) - y_) ** 2)))
    pers = float(np.sqrt(np.mean((np.array(p) - y_) ** 2)))
    tir = float(glucose_metrics(bg[None, :], sample_period_min=1.0).time_in_range_70_180_pct[0])
    truth_drop, final_drop = correction_drop_mg_dl([truth, loop.model])
    swaps, faults = (len(seen.get(c, [])) for c in ("estimator->models", "runtime->faults"))
    return (f"{name:<10} refit={refit} {controller:<12} f30 RMSE {rmse:5.1f} "
            f"persistence {pers:5.1f}"
            f"  TIR {tir:5.1f}%  1-U drop model {final_drop:5.1f} / truth {truth_drop:5.1f}"
            f"  swaps {swaps} faults {faults} {took:5.1f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patient", action="append")
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--controller", default="mpc")
    ap.add_argument("--max-iter", type=int, default=50)
    a = ap.parse_args()
    for name in a.patient or ["adult#007"]:
        for refit in (0, 1):
            print(one(name, a.days, refit, a.controller, a.max_iter), flush=True)


if __name__ == "__main__":
    main()
