"""twinloop's passive knee moment against Riener & Edrich (1999), 0–120° of flexion.

Prints ONE JSON object to stdout::

    .venv/bin/python benchmarks/knee_passive_moment.py
    .venv/bin/python benchmarks/knee_passive_moment.py --step-deg 5

Reference (:func:`riener_edrich_knee_moment_nm`, a reference function of this benchmark, not
part of the plant): Riener R, Edrich T 1999, "Identification of passive elastic joint moments in
the lower extremities", *J Biomech* 32(5):539-544, the knee equation of the paper (angles in
degrees, moment in N·m, knee flexion positive and moment positive in flexion, as in twinloop)::

    M_K = exp(1.800 − 0.0460·φ_A − 0.0352·φ_K + 0.0217·φ_H)
        − exp(−3.971 − 0.0004·φ_A + 0.0495·φ_K − 0.0128·φ_H)
        − 4.820 + exp(2.220 − 0.150·φ_K)

(φ_K knee flexion, φ_H hip flexion, φ_A ankle angle, all in degrees; the ankle sign convention
of the paper is to be checked in its Fig. 1 — at the ankle's neutral 0° used here it does not
matter). The form and coefficients are as copied identically in several independent public
codes (research notes of issue 22, tag [V]); the equation number / table of the paper is still
to verify in the paper itself. Ten healthy young subjects; hip 90° with the knee near full
extension (a straight-leg raise) may lie outside the angles they tested.

Since issue 22 the plant's passive moment *is* this equation (``riener_edrich_moment`` in
:mod:`twinloop.plant.knee.model`, coefficients in degrees, at the posture's hip angle) plus soft
end stops beyond the range of motion; this benchmark checks the plant's implementation against the
independent reference function above and shows what the end stops add. twinloop's passive
moment at rest (healthy preset, drive detached; the presets share every passive parameter):
:func:`~twinloop.plant.knee.model.static_moment_nm` minus the gravity moment ``m·g·d·cos θ``,
split into the Riener & Edrich part and the end stops (the rest), at hip 0, 30, 60 and 90°.

Also reported: the resting angle of the hanging shank (zero of gravity + passive moment, the
pendulum-test plateau) with twinloop's passive moment and with the reference, per hip angle.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq

from twinloop.plant.knee.model import (
    P_MGD,
    KneeParams,
    riener_edrich_moment,
    static_moment_nm,
)
from twinloop.plant.knee.pendulum import PendulumConfig


def riener_edrich_knee_moment_nm(
    knee_flexion_deg: ArrayLike, hip_flexion_deg: float = 90.0, ankle_deg: float = 0.0
) -> NDArray[np.float64]:
    """Passive elastic knee moment of Riener & Edrich 1999 (N·m, positive = flexing).

    Args:
        knee_flexion_deg: knee flexion, degrees (0 = full extension).
        hip_flexion_deg: hip flexion, degrees (90 = seated, 0 = supine).
        ankle_deg: ankle angle, degrees (0 = neutral).

    """
    k = np.asarray(knee_flexion_deg, dtype=np.float64)
    h = float(hip_flexion_deg)
    a = float(ankle_deg)
    return np.asarray(
        np.exp(1.800 - 0.0460 * a - 0.0352 * k + 0.0217 * h)
        - np.exp(-3.971 - 0.0004 * a + 0.0495 * k - 0.0128 * h)
        - 4.820
        + np.exp(2.220 - 0.150 * k),
        dtype=np.float64,
    )


#: Hip angles of the comparison: supine (the clinical pendulum set-up) to seated (the exo's).
HIPS_DEG = (0.0, 30.0, 60.0, 90.0)


def knee_at(hip_deg: float) -> KneeParams:
    """The pendulum test's knee (healthy preset, drive detached) at hip flexion ``hip_deg``."""
    return PendulumConfig(preset="healthy", hip_flexion_deg=hip_deg, drive_attached=False).params()


def shank_gravity_moment_nm() -> float:
    """``m·g·d`` of the shank + foot (drive detached), N·m."""
    return float(knee_at(0.0).vector()[P_MGD])


def twinloop_passive_moment_nm(
    theta_deg: ArrayLike, hip_deg: float = 90.0
) -> dict[str, NDArray[np.float64]]:
    """The plant's passive moment at rest, N·m: ``total``, ``riener_edrich`` and ``end_stops``."""
    knee = knee_at(hip_deg)
    p = knee.vector()
    th = np.radians(np.atleast_1d(np.asarray(theta_deg, dtype=np.float64)))
    total = static_moment_nm(knee, th) - p[P_MGD] * np.cos(th)
    re = np.array([riener_edrich_moment(p, float(t)) for t in th])
    return {"total": total, "riener_edrich": re, "end_stops": total - re}


def rest_angle_deg(moment_nm: Callable[[float], float], mgd_nm: float) -> float:
    """Zero of ``m·g·d·cos θ + M(θ)`` between 30° and 130° (the hanging shank's rest angle)."""

    def net(deg: float) -> float:
        return mgd_nm * math.cos(math.radians(deg)) + moment_nm(deg)

    return float(brentq(net, 30.0, 130.0, xtol=1e-6))


def rest_angles_deg() -> dict[str, dict[str, float]]:
    """Rest angles per hip angle with twinloop's passive moment and with the reference."""
    mgd = shank_gravity_moment_nm()
    rest = {}
    for hip in HIPS_DEG:

        def plant(d: float, hip: float = hip) -> float:
            return float(twinloop_passive_moment_nm(d, hip)["total"][0])

        def ref(d: float, hip: float = hip) -> float:
            return float(riener_edrich_knee_moment_nm(d, hip))

        rest[f"hip_{hip:g}_deg"] = {
            "twinloop": rest_angle_deg(plant, mgd),
            "riener_edrich": rest_angle_deg(ref, mgd),
        }
    return rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-deg", type=float, default=10.0)
    parser.add_argument("--max-deg", type=float, default=120.0)
    args = parser.parse_args()
    angles = np.arange(0.0, args.max_deg + args.step_deg / 2, args.step_deg)
    comparisons = {}
    for hip in HIPS_DEG:
        tw = twinloop_passive_moment_nm(angles, hip)
        ref = riener_edrich_knee_moment_nm(angles, hip)
        rows = [
            {
                "knee_flexion_deg": float(a),
                "riener_edrich_nm": round(float(r), 2),
                "twinloop_total_nm": round(float(t), 2),
                "twinloop_end_stops_nm": round(float(e), 3),
                "difference_nm": round(float(t - r), 3),
            }
            for a, r, t, e in zip(angles, ref, tw["total"], tw["end_stops"], strict=True)
        ]
        comparisons[f"hip_{hip:g}_deg"] = {
            "rows": rows,
            "rms_difference_nm": round(float(np.sqrt(np.mean((tw["total"] - ref) ** 2))), 3),
        }
    result = {
        "benchmark": "knee_passive_moment",
        "ankle_deg": 0.0,
        "sign": "N·m, positive = flexing (both)",
        "shank_gravity_moment_mgd_nm": round(shank_gravity_moment_nm(), 3),
        "comparisons": comparisons,
        "rest_angle_deg": {
            k: {n: round(x, 2) for n, x in v.items()} for k, v in rest_angles_deg().items()
        },
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
