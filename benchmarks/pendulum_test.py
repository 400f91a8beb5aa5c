"""The Wartenberg pendulum test on every knee preset, with and without the exoskeleton drive.

Prints ONE JSON object to stdout::

    .venv/bin/python benchmarks/pendulum_test.py
    .venv/bin/python benchmarks/pendulum_test.py --duration-s 30 --swing-threshold-deg 1

Each preset (healthy, mild, moderate, severe) is released from the horizontal (0° flexion, thigh
horizontal) lying supine (hip 0°, the set-up of Kim et al. 1996's healthy norms) and sitting
upright (hip 90°, the exoskeleton's posture), with relaxed muscles (no voluntary intent; the
preset's stretch reflex active), once with the drive detached (the clinical test) and once with it
attached and unpowered (0 N·m commanded, back-driven through its friction and inertia); see
:mod:`twinloop.plant.knee.pendulum` for the set-up and the metric definitions. All sixteen tests
run as one batch of the compiled plant at its 1-ms step. Measured, per test: first-swing amplitude
A1, plateau A0 (degrees from the release angle), R2 = A1/A0, R2n = R2/1.6, swings beyond the
plateau by more than the threshold, peak first-downswing velocity, swing period, whether the knee
settled, the largest quadriceps reflex excitation and muscle torque, and whether each measure lies
inside its preset's literature norm (:mod:`twinloop.plant.knee.pendulum_norms`, printed under
``norms``; the norms were measured without an exoskeleton, Kim et al.'s supine).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
from pathlib import Path

import numba
import numpy as np

from twinloop.plant.knee.model import PRESETS
from twinloop.plant.knee.pendulum import PendulumConfig, measure_pendulum, simulate_pendulum
from twinloop.plant.knee.pendulum_norms import PRESET_NORMS, norms_for


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--swing-threshold-deg", type=float, default=1.0)
    args = parser.parse_args()
    configs = [
        PendulumConfig(
            preset=name,
            hip_flexion_deg=hip,
            drive_attached=attached,
            duration_s=args.duration_s,
            swing_threshold_deg=args.swing_threshold_deg,
        )
        for hip in (0.0, 90.0)
        for attached in (False, True)
        for name in PRESETS
    ]
    rows = []
    traces = simulate_pendulum(configs)
    for c, tr, m in zip(configs, traces, measure_pendulum(configs, traces), strict=True):
        rows.append(
            {
                "preset": c.preset,
                "hip_flexion_deg": c.hip_flexion_deg,
                "drive_attached": c.drive_attached,
                "first_swing_deg": round(m.first_swing_deg, 2),
                "plateau_deg": round(m.plateau_deg, 2),
                "r2": round(m.relaxation_index, 3),
                "r2n": round(m.relaxation_index_normalised, 3),
                "swings": m.swings,
                "peak_velocity_deg_s": round(m.peak_velocity_deg_s, 1),
                "period_s": finite_or_none(round(m.period_s, 3)),
                "settled": m.settled,
                "max_reflex_excitation_q": round(float(tr.reflex_excitation.max()), 4),
                "max_extending_muscle_torque_nm": round(float(-tr.muscle_torque_nm.min()), 2),
                "inside_norms": {
                    n.label: n.inside(getattr(m, n.measure)) for n in norms_for(c.preset)
                },
            }
        )
    result = {
        "benchmark": "pendulum_test",
        "setup": {
            "posture": "thigh horizontal; hip 0° (supine) and 90° (seated)",
            "release_angle_deg": configs[0].release_angle_deg,
            "duration_s": args.duration_s,
            "swing_threshold_deg": args.swing_threshold_deg,
            "plateau_window_s": configs[0].plateau_window_s,
            "muscles": "relaxed: no intent, no static-load compensation; stretch reflex on",
            "drive_attached_false": "no exo link, no gear friction, reflected inertia ~0",
            "drive_attached_true": "exo link + reflected inertia + gear friction, 0 N·m command",
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "git": git_revision(),
        },
        "norms": {preset: [n.as_dict() for n in norms] for preset, norms in PRESET_NORMS.items()},
        "tests": rows,
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
