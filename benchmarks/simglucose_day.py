"""Time simglucose 0.2.11 simulating one patient-day of reference scenario A; print one JSON object.

Standalone on purpose: it imports only the standard library, numpy and simglucose (never
``plant``), so it can run in a separate virtual environment when simglucose's pins
(``gymnasium~=0.29``, ``gym==0.9.4``) clash with the project's. ``plant_throughput.py
--vs-simglucose`` runs it in a subprocess; it can also be run directly::

    /tmp/sgvenv/bin/python benchmarks/simglucose_day.py --patient adult#001 --repeats 3

Scenario A (``/work/shared/reference/simglucose-A/README.md``): start 00:00, meals of 45, 70
and 80 g at 07:00, 12:00 and 18:00, eaten at 5 g/min; insulin = basal ``u2ss·BW/6000`` U/min
every minute plus a bolus of ``carbs/CR`` U delivered within the meal minute. Two ways are
timed:

* ``direct``: ``T1DPatient.withName(...)`` and ``patient.step(Action(CHO=..., insulin=...))``
  once per minute, as the reference trajectories were produced;
* ``env``: the documented simulation stack, ``T1DSimEnv(T1DPatient, CGMSensor("Navigator"),
  InsulinPump("Insulet"), CustomScenario)`` stepped with ``Action(basal=..., bolus=...)`` (both
  U/min) every ``sample_time`` = 1 min (Navigator samples every minute, so a bolus rate held for
  one step is exactly scenario A's one-minute bolus; the pump rounds to its increments).

Only the 1440 steps are timed (patient/env construction is reported separately), best of
``--repeats`` after a one-hour warm-up run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

MINUTES_PER_DAY = 1440
MEALS_A: dict[int, float] = {420: 45.0, 720: 70.0, 1080: 80.0}


def _direct(name: str, minutes: int) -> tuple[float, float, list[float]]:
    """Return (construction seconds, stepping seconds, plasma BG per minute)."""
    import pandas as pd
    from simglucose.patient.t1dpatient import Action, T1DPatient

    t0 = time.perf_counter()
    patient = T1DPatient.withName(name)
    quest = pd.read_csv(_quest_file())
    cr = float(quest.loc[quest.Name == name, "CR"].iloc[0])
    params = patient._params
    basal = float(params.u2ss * params.BW / 6000.0)
    vg = float(params.Vg)
    t1 = time.perf_counter()
    bg = [float(patient.state[3]) / vg]
    for k in range(minutes):
        cho = MEALS_A.get(k, 0.0)
        patient.step(Action(CHO=cho, insulin=basal + cho / cr))
        bg.append(float(patient.state[3]) / vg)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, bg


def _env(name: str, minutes: int) -> tuple[float, float, list[float]]:
    """Like :func:`_direct` through ``T1DSimEnv`` (sensor, pump, custom scenario)."""
    import pandas as pd
    from simglucose.actuator.pump import InsulinPump
    from simglucose.controller.base import Action
    from simglucose.patient.t1dpatient import T1DPatient
    from simglucose.sensor.cgm import CGMSensor
    from simglucose.simulation.env import T1DSimEnv
    from simglucose.simulation.scenario import CustomScenario

    t0 = time.perf_counter()
    patient = T1DPatient.withName(name)
    sensor = CGMSensor.withName("Navigator", seed=1)
    pump = InsulinPump.withName("Insulet")
    scenario = CustomScenario(
        start_time=datetime(2025, 1, 1, 0, 0),
        scenario=[(k / 60.0, g) for k, g in MEALS_A.items()],
    )
    env = T1DSimEnv(patient, sensor, pump, scenario)
    quest = pd.read_csv(_quest_file())
    cr = float(quest.loc[quest.Name == name, "CR"].iloc[0])
    params = patient._params
    basal = float(params.u2ss * params.BW / 6000.0)
    vg = float(params.Vg)
    if int(env.sample_time) != 1:
        raise RuntimeError(f"expected a 1-min sample time, got {env.sample_time}")
    t1 = time.perf_counter()
    bg = [float(env.patient.state[3]) / vg]
    for k in range(minutes):
        cho = MEALS_A.get(k, 0.0)
        env.step(Action(basal=basal, bolus=cho / cr))
        bg.append(float(env.patient.state[3]) / vg)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, bg


def _quest_file() -> str:
    import os

    import simglucose

    return os.path.join(os.path.dirname(simglucose.__file__), "params", "Quest.csv")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patient", default="adult#001")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="direct,env", help="comma list of: direct, env")
    ap.add_argument("--no-trajectory", action="store_true", help="omit the BG trajectories")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"python": sys.version.split()[0], "patient": args.patient}
    try:
        import warnings

        warnings.filterwarnings("ignore")
        import importlib.metadata as md

        import simglucose  # noqa: F401

        out["importable"] = True
        out["versions"] = {
            pkg: md.version(pkg) for pkg in ("simglucose", "numpy", "scipy", "pandas")
        }
    except Exception as exc:  # ImportError, or a broken dependency stack
        out["importable"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        return 0

    runners = {"direct": _direct, "env": _env}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        run = runners[mode]
        run(args.patient, 60)  # warm-up: imports, CSV caches, scipy's ode
        build: list[float] = []
        step: list[float] = []
        bg: list[float] = []
        for _ in range(max(1, args.repeats)):
            b, s, bg = run(args.patient, MINUTES_PER_DAY)
            build.append(b)
            step.append(s)
            print(f"simglucose {mode}: {s:.3f} s / patient-day", file=sys.stderr)
        res: dict[str, Any] = {
            "best_s": min(step),
            "times_s": step,
            "construction_s": min(build),
            "bg_final_mg_dl": bg[-1],
        }
        if not args.no_trajectory:
            res["bg_mg_dl"] = bg
        out[mode] = res
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
