"""Cross-check the plant against simglucose 0.2.11 on scenarios other than the reference A.

For every patient, a seeded random scenario is drawn here (the random daily protocol's meals
over several days, ±30 % carbohydrate-counting error in the boluses, a basal rate that changes
every hour between 0 and 2.5× the patient's basal, occasional correction boluses, and an eating
speed of 3 g/min instead of 5). simglucose then simulates each patient minute by minute with
``T1DPatient.step(Action(CHO=..., insulin=...))`` in a subprocess (its own virtual environment,
``--simglucose-python``, because its pins clash with ours), and twinloop replays the same inputs
with :func:`twinloop.plant.glucose.uva_padova.simulate`. Prints one JSON object: the largest
plasma-glucose difference per patient and overall, against the 0.5 mg/dL bar of issue #2.

    .venv/bin/python benchmarks/crosscheck_simglucose.py --simglucose-python /tmp/sgvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from twinloop.plant.glucose.patients import resolve_patients
from twinloop.plant.glucose.scenarios import RandomDailyProtocol
from twinloop.plant.glucose.uva_padova import simulate

# The simglucose side: standalone, it imports only numpy and simglucose.
_SIMGLUCOSE_DRIVER = r"""
import json, sys
import numpy as np
from simglucose.patient.t1dpatient import Action, T1DPatient
spec = json.load(open(sys.argv[1]))
out = {}
for name, ins, meal in zip(spec["patients"], spec["insulin"], spec["meal"]):
    patient = T1DPatient.withName(name)
    patient.EAT_RATE = spec["eat_rate"]
    vg = patient._params.Vg
    bg = [patient.state[3] / vg]
    for u, m in zip(ins, meal):
        patient.step(Action(insulin=u, CHO=m))
        bg.append(patient.state[3] / vg)
    out[name] = bg
    print(name, file=sys.stderr, flush=True)
json.dump(out, open(sys.argv[2], "w"))
"""


def make_inputs(seed: int, days: int, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-minute insulin (U/min) and meal starts (g) for each patient."""
    patients = resolve_patients(names)
    n_min = 1440 * days
    protocol = RandomDailyProtocol()
    ins = np.zeros((len(patients), n_min))
    meals = np.zeros((len(patients), n_min))
    for i, (p, ss) in enumerate(
        zip(patients, np.random.SeedSequence(seed).spawn(len(patients)), strict=True)
    ):
        rng = np.random.default_rng(ss)
        meal_g, _ = protocol.sample(rng, days=days).to_minutes(n_min)
        factor = np.repeat(rng.uniform(0.0, 2.5, size=n_min // 60 + 1), 60)[:n_min]
        ins[i] = p.basal_u_per_min * factor
        counted = meal_g * rng.uniform(0.7, 1.3, size=n_min)
        ins[i] += counted / p.carb_ratio_g_per_u
        corrections = rng.random(n_min) < 1 / 480  # about three a day
        ins[i] += corrections * rng.uniform(0.5, 3.0, size=n_min)
        meals[i] = meal_g
    return ins, meals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simglucose-python", required=True, help="python with simglucose")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--eat-rate", type=float, default=3.0)
    parser.add_argument("--patient", action="append", help="default: all 30")
    args = parser.parse_args()
    patients = resolve_patients(args.patient or [], [] if args.patient else ["all"])
    names = [p.name for p in patients]
    ins, meals = make_inputs(args.seed, args.days, names)
    ours = simulate(patients, ins, meals, eat_rate_g_per_min=args.eat_rate)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "spec.json")
        result = Path(tmp, "out.json")
        spec.write_text(
            json.dumps(
                {"patients": names, "insulin": ins.tolist(), "meal": meals.tolist(),
                 "eat_rate": args.eat_rate}
            )
        )  # fmt: skip
        driver = Path(tmp, "driver.py")
        driver.write_text(_SIMGLUCOSE_DRIVER)
        subprocess.run([args.simglucose_python, str(driver), str(spec), str(result)], check=True)
        theirs = json.loads(result.read_text())
    per_patient = {}
    above_40 = 0.0
    for i, name in enumerate(names):
        ref = np.array(theirs[name])
        err = np.abs(ours.bg_mg_dl[i] - ref)
        per_patient[name] = float(err.max())
        if (ref >= 40).any():
            above_40 = max(above_40, float(err[ref >= 40].max()))
    worst = max(per_patient, key=lambda k: per_patient[k])
    print(
        json.dumps(
            {
                "scenario": f"random protocol, {args.days} days, seed {args.seed}, eat rate "
                f"{args.eat_rate} g/min, hourly random basal 0-2.5x, ±30% counted boluses, "
                "random corrections",
                "max_abs_bg_error_mg_dl": per_patient[worst],
                "worst_patient": worst,
                "max_abs_bg_error_where_bg_ge_40_mg_dl": above_40,
                "minutes_below_40_mg_dl": int(sum((np.array(theirs[n]) < 40).sum() for n in names)),
                "bar_mg_dl": 0.5,
                "bg_range_mg_dl": [float(ours.bg_mg_dl.min()), float(ours.bg_mg_dl.max())],
                "per_patient_max_abs_bg_error_mg_dl": per_patient,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
