"""Published norms of the Wartenberg pendulum test, the one place their numbers live.

Each :class:`PendulumNorm` is a cohort's mean ± SD of one measure of
:class:`~twinloop.plant.knee.pendulum.PendulumMetrics` and the width of the range a value is
judged inside (``n_sd`` standard deviations either side). Sources and their confidence:
docs/knee-literature.md §1.

* Healthy adults (Kim, Chon, Park & Choi 1996, *J Korean Acad Rehabil Med* 20(3):27; 50
  adults, supine, electrogoniometer; abstract verified at https://e-arm.org/journal/view.php?number=3941):
  relaxation index R2 = 1.678 ± 0.090 and first angular velocity 3.873 ± 0.622 rad/s; judged at
  mean ± 2 SD.
* Chronic stroke (20 patients, "Pendulum: a simple test to measure spasticity", abstract at
  https://core.ac.uk/works/74889241; set-up not given there): corrected relaxation index
  R2n of the affected knee 0.65 ± 0.20 (day 1), of the unaffected knee 1.03 ± 0.09; the affected
  knee is judged at mean ± 1 SD.

:func:`norms_for` says which norms a knee preset is compared with: ``healthy`` with Kim et al.'s
R2 and peak velocity, the impaired presets with the chronic-stroke R2n.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from twinloop.plant.errors import UnknownPatientError
from twinloop.plant.knee.model import PRESETS

KIM_1996 = "Kim, Chon, Park & Choi 1996, J Korean Acad Rehabil Med 20(3):27"
STROKE_2 = "Pendulum: a simple test to measure spasticity (core.ac.uk/works/74889241)"


@dataclasses.dataclass(frozen=True)
class PendulumNorm:
    """One published mean ± SD of a pendulum measure and the range a value is judged inside.

    Attributes:
        measure: the :class:`~twinloop.plant.knee.pendulum.PendulumMetrics` attribute it norms.
        label: the measure's short name (``R2``, ``R2n``, ``peak velocity``).
        unit: its unit (empty for a ratio).
        mean: the cohort's mean, in ``unit``.
        sd: the cohort's standard deviation, in ``unit``.
        n_sd: a value is inside when within ``mean ± n_sd·sd``.
        cohort: who was measured.
        n: how many.
        setup: the posture of the measurement as published.
        source: the study.
        short: the study's short name (tables cite it and list ``source`` once).

    """

    measure: str
    label: str
    unit: str
    mean: float
    sd: float
    n_sd: float
    cohort: str
    n: int
    setup: str
    source: str
    short: str

    @property
    def low(self) -> float:
        """The lower bound of the range, ``mean − n_sd·sd``."""
        return self.mean - self.n_sd * self.sd

    @property
    def high(self) -> float:
        """The upper bound of the range, ``mean + n_sd·sd``."""
        return self.mean + self.n_sd * self.sd

    def inside(self, value: float) -> bool:
        """Whether ``value`` lies in ``[low, high]`` (a NaN is outside)."""
        return bool(self.low <= value <= self.high)

    def as_dict(self) -> dict[str, Any]:
        """The norm's fields and its range, for JSON."""
        return {**dataclasses.asdict(self), "low": self.low, "high": self.high}


def _kim_1996(measure: str, label: str, unit: str, mean: float, sd: float) -> PendulumNorm:
    """A healthy adults' norm of Kim et al. 1996 (50 adults, supine), judged at mean ± 2 SD."""
    return PendulumNorm(
        measure, label, unit, mean, sd, 2.0, "healthy adults", 50, "supine", KIM_1996, "Kim 1996"
    )


def _stroke(knee: str, mean: float, sd: float, n_sd: float) -> PendulumNorm:
    """A corrected relaxation index R2n of the 20 chronic-stroke patients (day 1)."""
    return PendulumNorm(
        "relaxation_index_normalised", "R2n", "", mean, sd, n_sd, f"chronic stroke, {knee} knee",
        20, "set-up not given in the abstract", STROKE_2, "stroke (core.ac.uk)",
    )  # fmt: skip


#: Healthy adults' relaxation index R2 (Kim et al. 1996), judged at mean ± 2 SD.
HEALTHY_R2_NORM = _kim_1996("relaxation_index", "R2", "", 1.678, 0.090)

#: Healthy adults' first-swing peak angular velocity (Kim et al. 1996: 3.873 ± 0.622 rad/s),
#: in °/s, judged at mean ± 2 SD.
HEALTHY_PEAK_VELOCITY_NORM = _kim_1996(
    "peak_velocity_deg_s", "peak velocity", "°/s", math.degrees(3.873), math.degrees(0.622)
)

#: The affected knee's corrected relaxation index R2n in chronic stroke, judged at mean ± 1 SD.
STROKE_R2N_NORM = _stroke("affected", 0.65, 0.20, 1.0)

#: The unaffected knee's R2n in the same 20 chronic-stroke patients, judged at mean ± 2 SD.
STROKE_UNAFFECTED_R2N_NORM = _stroke("unaffected", 1.03, 0.09, 2.0)

#: The norms each knee preset is judged against.
PRESET_NORMS: dict[str, tuple[PendulumNorm, ...]] = {
    "healthy": (HEALTHY_R2_NORM, HEALTHY_PEAK_VELOCITY_NORM),
    "mild": (STROKE_R2N_NORM,),
    "moderate": (STROKE_R2N_NORM,),
    "severe": (STROKE_R2N_NORM,),
}


def norms_for(preset: str) -> tuple[PendulumNorm, ...]:
    """The norms the knee preset ``preset`` is judged against.

    Raises:
        UnknownPatientError: ``preset`` is not a knee preset.

    """
    if preset not in PRESETS:
        raise UnknownPatientError("preset", preset, PRESETS)
    return PRESET_NORMS[preset]
