"""Adversarial controllers against the supervisor's shield, on every patient.

Prints one JSON object::

    .venv/bin/python benchmarks/shield_search.py                       # 30 patients, 1 day
    .venv/bin/python benchmarks/shield_search.py --days 2 --random 4 --patients adult#001

Each patient runs the closed loop (random meals with ±30 % counting error, noisy CGM, the twin
on the population model, the supervisor) under attacking controllers:

* ``greedy``: the largest bolus and temp basal every tick (what the per-command limits allow);
* ``bolus`` / ``basal``: only the largest bolus, or only the largest temp basal;
* ``random-K``: K controllers drawing, every tick, a temp basal in [0, 6 × basal] and with
  probability 0.15 a bolus in [0, 3 × a 100-g meal bolus] (seeds 1 … K).

Side by side, in the same run, the same attacks against the supervisor of *per-command limits
only* (the shield's rolling totals and predictive guard disabled), so the shield's effect is
the difference. Reported per patient: the lowest plasma glucose over every attack and which
attack reached it; overall: patients below 54 mg/dL and the lowest glucose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.glucose.supervisor import SafetySupervisor
from twinloop.agents.placement import InlinePlacement
from twinloop.plant.glucose.patients import PatientParameters, get_patient, patient_names
from twinloop.policies.glucose.interface import ControllerInput, Dose

HYPO_MG_DL = 54.0


class _Fixed:
    def __init__(self, basal_u_per_h: float, bolus_u: float) -> None:
        self.dose = Dose(basal_u_per_h, bolus_u)

    def decide(self, obs: ControllerInput) -> Dose:
        return self.dose


class _Random:
    def __init__(self, patient: PatientParameters, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.basal = patient.basal_u_per_h
        self.meal_bolus = 100.0 / patient.carb_ratio_g_per_u

    def decide(self, obs: ControllerInput) -> Dose:
        r = self.rng
        bolus = r.uniform(0.0, 3.0 * self.meal_bolus) if r.random() < 0.15 else 0.0
        return Dose(r.uniform(0.0, 6.0 * self.basal), bolus)


class _PerCommandOnly(SafetySupervisor):
    """The supervisor without the shield (rolling totals, predictive guard): the comparison."""

    def _rolling_limits(self, t_min: float, basal: float, bolus: float, *_: Any) -> Any:
        return basal, bolus

    def _guard(self, t_min: float, basal: float, bolus: float, *_: Any) -> Any:
        return basal, bolus


def _attacks(p: PatientParameters, n_random: int) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {
        "greedy": lambda: _Fixed(1e3, 1e3),
        "bolus": lambda: _Fixed(0.0, 1e3),
        "basal": lambda: _Fixed(1e3, 0.0),
    }
    for k in range(1, n_random + 1):
        out[f"random-{k}"] = lambda k=k: _Random(p, k)
    return out


def _min_glucose(p: PatientParameters, controller: Any, days: int, shield: bool) -> float:
    cfg = LoopConfig(patients=(p.name,), days=days)
    loop = PatientLoop(p, cfg, np.random.default_rng(0), controller)
    if not shield:
        loop.supervisor = _PerCommandOnly(loop.supervisor.config)
        loop.place(InlinePlacement())
    bg: list[float] = []
    loop.channels["plant->sensor"].listen(lambda _, m: bg.append(m.bg_mg_dl))
    loop.run()
    return float(min(bg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", default="all", help="comma-separated names, or all")
    ap.add_argument("--days", type=int, default=1, help="days per attack, 1..7")
    ap.add_argument("--random", type=int, default=2, help="random attackers per patient, 0..20")
    args = ap.parse_args(argv)
    names = patient_names() if args.patients == "all" else args.patients.split(",")
    if not 1 <= args.days <= 7 or not 0 <= args.random <= 20:
        print("shield_search: --days must be 1..7 and --random 0..20", file=sys.stderr)
        return 2
    try:
        patients = [get_patient(n) for n in names]
    except Exception as exc:
        print(f"shield_search: --patients: {exc}", file=sys.stderr)
        return 2
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    for p in patients:
        row: dict[str, Any] = {}
        for label, shield in (("shield", True), ("per_command_limits_only", False)):
            lows = {
                name: _min_glucose(p, make(), args.days, shield)
                for name, make in _attacks(p, args.random).items()
            }
            worst = min(lows, key=lambda k: lows[k])
            row[label] = {"min_bg_mg_dl": round(lows[worst], 1), "attack": worst}
        rows[p.name] = row
        print(p.name, row, file=sys.stderr, flush=True)
    summary = {
        label: {
            "patients_below_54": sum(r[label]["min_bg_mg_dl"] < HYPO_MG_DL for r in rows.values()),
            "lowest_mg_dl": min(r[label]["min_bg_mg_dl"] for r in rows.values()),
        }
        for label in ("shield", "per_command_limits_only")
    }
    out = {
        "benchmark": "shield_search",
        "days": args.days,
        "attacks": list(_attacks(patients[0], args.random)),
        "summary": summary,
        "patients": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
