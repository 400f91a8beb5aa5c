"""At what stretch velocity does each knee preset's quadriceps stretch reflex turn on?

Prints ONE JSON object to stdout::

    .venv/bin/python benchmarks/knee_reflex_onset.py
    .venv/bin/python benchmarks/knee_reflex_onset.py --max-deg-s 400 --step-deg-s 1

Every preset (relaxed muscles, drive detached, reflex active) is stretched at constant velocities
from ``--step-deg-s`` to ``--max-deg-s`` in steps of ``--step-deg-s`` (knee moved from 10° into
flexion over 90°, or for at most 0.5 s; see :mod:`twinloop.plant.knee.stretch`). Reported per
preset: the smallest velocity of the sweep at which the reflex excitation becomes non-zero
(``excitation_onset_deg_s``), at which the reflex adds at least ``--torque-level-nm`` of
extending torque (``torque_onset_deg_s``), the preset's configured threshold for comparison,
the onset latency at the fastest velocity, and the reflex torque at a few clinical velocities
(30, 60, 120, 180, 240 °/s when in the sweep). ``null`` = no onset in the sweep.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from twinloop.plant.knee.model import PRESETS, knee_preset
from twinloop.plant.knee.pendulum import PendulumConfig
from twinloop.plant.knee.stretch import onset_velocity_deg_s, quadriceps_stretch

CLINICAL_DEG_S = (30.0, 60.0, 120.0, 180.0, 240.0)


def none_if_nan(v: float, digits: int = 1) -> float | None:
    return None if math.isnan(v) else round(v, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-deg-s", type=float, default=400.0)
    parser.add_argument("--step-deg-s", type=float, default=1.0)
    parser.add_argument("--torque-level-nm", type=float, default=1.0)
    args = parser.parse_args()
    v = np.arange(args.step_deg_s, args.max_deg_s + args.step_deg_s / 2, args.step_deg_s)
    knees = [PendulumConfig(preset=name).params() for name in PRESETS]
    rows = []
    for name, r in zip(PRESETS, quadriceps_stretch(knees, v), strict=True):
        thr = knee_preset(name).spasticity_threshold_rad_s
        gain = knee_preset(name).spasticity_gain_per_rad_s
        at = {
            f"{c:g}": round(float(r.peak_reflex_torque_nm[np.argmin(np.abs(v - c))]), 2)
            for c in CLINICAL_DEG_S
            if v[0] <= c <= v[-1]
        }
        rows.append(
            {
                "preset": name,
                "configured_threshold_deg_s": round(math.degrees(thr), 2),
                "configured_gain_per_rad_s": gain,
                "excitation_onset_deg_s": none_if_nan(
                    onset_velocity_deg_s(v, r.peak_reflex_excitation)
                ),
                "torque_onset_deg_s": none_if_nan(
                    onset_velocity_deg_s(v, r.peak_reflex_torque_nm, args.torque_level_nm)
                ),
                "onset_latency_at_max_velocity_s": none_if_nan(float(r.onset_latency_s[-1]), 3),
                "reflex_torque_nm_at_deg_s": at,
            }
        )
    result = {
        "benchmark": "knee_reflex_onset",
        "sweep_deg_s": [float(v[0]), float(v[-1]), args.step_deg_s],
        "torque_level_nm": args.torque_level_nm,
        "protocol": "imposed constant-velocity flexion from 10° over 90° (at most 0.5 s), "
        "relaxed muscles, drive detached",
        "presets": rows,
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
