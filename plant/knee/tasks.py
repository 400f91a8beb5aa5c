"""Knee rehabilitation tasks as reference trajectories (angle in rad, velocity in rad/s, time in s).

A task is a frozen spec (nominal values + randomisation ranges); :meth:`TaskSpec.sample` turns
it, with a seeded generator, into a task *row* (columns ``K_*``) that the compiled
:func:`reference` evaluates at any time. Angles follow :mod:`twinloop.plant.knee.model` (0 = full
extension, positive = flexion).

* :class:`SitToStandExtension` — rest at ``start_deg`` (90°), then a minimum-jerk extension to
  ``end_deg`` (0°) in ``move_s``, then hold: ``θ = θ0 + (θ1 − θ0)(10τ³ − 15τ⁴ + 6τ⁵)``,
  ``τ = (t − rest)/move`` (Flash & Hogan 1985, *J Neurosci* 5:1688-1703).
* :class:`CyclicFlexionExtension` — ``θ = lo + (hi − lo)(1 − cos 2π f t')/2`` between
  ``low_deg`` (10°) and ``high_deg`` (70°) at 0.25–0.5 Hz, ``cycles`` cycles after a rest.
* :class:`HoldPosture` — hold ``angle_deg`` for ``hold_s`` (a static endurance task, where
  fatigue shows).

Randomisation (``randomize=True``): the movement amplitude is scaled by a factor uniform in
``[1 − amplitude_jitter, 1 + amplitude_jitter]`` about the range's midpoint (hold angle: about
the nominal angle by ± ``amplitude_jitter`` × the angle), and the period/duration is drawn
uniformly in ``[period_min_s, period_max_s]``.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError

# Task-row columns.
K_KIND = 0  #: 0 sit-to-stand extension, 1 cyclic, 2 hold
K_A = 1  #: start / low / hold angle, rad
K_B = 2  #: end / high angle, rad
K_T = 3  #: movement duration or cycle period, s
K_REST = 4  #: rest before the movement starts, s
K_TOTAL = 5  #: task (episode) duration, s
N_TASK = 6

KIND_EXTENSION = 0
KIND_CYCLIC = 1
KIND_HOLD = 2


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Common fields of the task specs (angles in degrees here for readability, rad in rows).

    Attributes:
        amplitude_jitter: relative half-range of the amplitude randomisation (0–0.9).
        randomize: draw amplitude and period at each :meth:`sample`; otherwise nominal.

    """

    amplitude_jitter: float = 0.2
    randomize: bool = True

    def _check(self) -> None:
        if not 0.0 <= self.amplitude_jitter <= 0.9:
            raise ConfigError("amplitude_jitter", self.amplitude_jitter, "0 <= value <= 0.9")

    def sample(self, rng: np.random.Generator) -> NDArray[np.float64]:
        """A task row (columns ``K_*``), randomised from ``rng`` when :attr:`randomize`."""
        raise NotImplementedError

    def _scale(self, rng: np.random.Generator) -> float:
        if not self.randomize or self.amplitude_jitter == 0.0:
            return 1.0
        return float(rng.uniform(1.0 - self.amplitude_jitter, 1.0 + self.amplitude_jitter))

    def _period(self, rng: np.random.Generator, lo: float, hi: float, nominal: float) -> float:
        return float(rng.uniform(lo, hi)) if self.randomize and hi > lo else nominal

    def max_duration_s(self) -> float:
        """Longest task this spec can produce, s."""
        raise NotImplementedError


def _check_range(name: str, lo: float, hi: float) -> None:
    if not 0 < lo <= hi:
        raise ConfigError(name, (lo, hi), "0 < min <= max")


@dataclasses.dataclass(frozen=True)
class SitToStandExtension(TaskSpec):
    """Minimum-jerk extension from ``start_deg`` to ``end_deg`` (sit-to-stand-like).

    Attributes:
        start_deg: starting (seated) angle, degrees.
        end_deg: final angle, degrees.
        move_s: nominal movement duration, s.
        move_min_s: shortest drawn duration, s.
        move_max_s: longest drawn duration, s.
        rest_s: rest at the start, s.
        hold_s: hold at the end, s.

    """

    start_deg: float = 90.0
    end_deg: float = 0.0
    move_s: float = 2.0
    move_min_s: float = 1.5
    move_max_s: float = 3.0
    rest_s: float = 0.5
    hold_s: float = 1.5

    def __post_init__(self) -> None:
        self._check()
        _check_range("move_min_s/move_max_s", self.move_min_s, self.move_max_s)
        if not self.move_s > 0:
            raise ConfigError("move_s", self.move_s, "> 0")
        if self.rest_s < 0 or self.hold_s < 0:
            raise ConfigError("rest_s/hold_s", (self.rest_s, self.hold_s), ">= 0")

    def sample(self, rng: np.random.Generator) -> NDArray[np.float64]:  # noqa: D102
        s = self._scale(rng)
        mid = 0.5 * (self.start_deg + self.end_deg)
        half = 0.5 * (self.start_deg - self.end_deg) * s
        move = self._period(rng, self.move_min_s, self.move_max_s, self.move_s)
        return np.array(
            [KIND_EXTENSION, math.radians(mid + half), math.radians(mid - half), move,
             self.rest_s, self.rest_s + move + self.hold_s]
        )  # fmt: skip

    def max_duration_s(self) -> float:  # noqa: D102
        return self.rest_s + max(self.move_s, self.move_max_s) + self.hold_s


@dataclasses.dataclass(frozen=True)
class CyclicFlexionExtension(TaskSpec):
    """Cosine flexion–extension cycles between ``low_deg`` and ``high_deg``.

    Attributes:
        low_deg: most extended angle, degrees.
        high_deg: most flexed angle, degrees.
        period_s: nominal cycle period, s (0.25–0.5 Hz ⇒ 2–4 s).
        period_min_s: shortest drawn period, s.
        period_max_s: longest drawn period, s.
        cycles: number of cycles.
        rest_s: rest at ``low_deg`` before the first cycle, s.

    """

    low_deg: float = 10.0
    high_deg: float = 70.0
    period_s: float = 3.0
    period_min_s: float = 2.0
    period_max_s: float = 4.0
    cycles: int = 3
    rest_s: float = 0.5

    def __post_init__(self) -> None:
        self._check()
        _check_range("period_min_s/period_max_s", self.period_min_s, self.period_max_s)
        if not self.low_deg < self.high_deg:
            raise ConfigError("low_deg", self.low_deg, f"< high_deg ({self.high_deg})")
        if not self.period_s > 0:
            raise ConfigError("period_s", self.period_s, "> 0")
        if self.cycles < 1:
            raise ConfigError("cycles", self.cycles, "an integer >= 1")
        if self.rest_s < 0:
            raise ConfigError("rest_s", self.rest_s, ">= 0")

    def sample(self, rng: np.random.Generator) -> NDArray[np.float64]:  # noqa: D102
        s = self._scale(rng)
        mid = 0.5 * (self.low_deg + self.high_deg)
        half = 0.5 * (self.high_deg - self.low_deg) * s
        period = self._period(rng, self.period_min_s, self.period_max_s, self.period_s)
        return np.array(
            [KIND_CYCLIC, math.radians(mid - half), math.radians(mid + half), period,
             self.rest_s, self.rest_s + self.cycles * period]
        )  # fmt: skip

    def max_duration_s(self) -> float:  # noqa: D102
        return self.rest_s + self.cycles * max(self.period_s, self.period_max_s)


@dataclasses.dataclass(frozen=True)
class HoldPosture(TaskSpec):
    """Hold ``angle_deg`` for ``hold_s``.

    Attributes:
        angle_deg: angle to hold, degrees.
        hold_s: duration, s.

    """

    angle_deg: float = 30.0
    hold_s: float = 10.0

    def __post_init__(self) -> None:
        self._check()
        if not self.hold_s > 0:
            raise ConfigError("hold_s", self.hold_s, "> 0")

    def sample(self, rng: np.random.Generator) -> NDArray[np.float64]:  # noqa: D102
        angle = math.radians(self.angle_deg * self._scale(rng))
        return np.array([KIND_HOLD, angle, angle, self.hold_s, 0.0, self.hold_s])

    def max_duration_s(self) -> float:  # noqa: D102
        return self.hold_s


#: Tasks by name.
TASKS: dict[str, type[TaskSpec]] = {
    "sit_to_stand": SitToStandExtension,
    "cyclic": CyclicFlexionExtension,
    "hold": HoldPosture,
}


def task_from_name(name: str | TaskSpec) -> TaskSpec:
    """A task spec from its name in :data:`TASKS` (or the spec itself)."""
    if isinstance(name, TaskSpec):
        return name
    if name not in TASKS:
        raise ConfigError("task", name, f"one of {', '.join(TASKS)} or a TaskSpec")
    return TASKS[name]()


@numba.njit(cache=True, inline="always", error_model="numpy")
def reference(task: NDArray[np.float64], t: float) -> tuple[float, float]:
    """Reference ``(angle_rad, velocity_rad_s)`` of task row ``task`` at time ``t`` (s)."""
    kind = int(task[K_KIND])
    a = task[K_A]
    b = task[K_B]
    period = task[K_T]
    tm = t - task[K_REST]
    if kind == KIND_HOLD or tm <= 0.0:
        return a, 0.0
    if kind == KIND_EXTENSION:
        if tm >= period:
            return b, 0.0
        tau = tm / period
        t2 = tau * tau
        shape = t2 * tau * (10.0 - 15.0 * tau + 6.0 * t2)
        dshape = 30.0 * t2 * (1.0 - 2.0 * tau + t2) / period
        return a + (b - a) * shape, (b - a) * dshape
    # cyclic
    w = 2.0 * math.pi / period
    return a + 0.5 * (b - a) * (1.0 - math.cos(w * tm)), 0.5 * (b - a) * w * math.sin(w * tm)


@numba.njit(cache=True, error_model="numpy")
def reference_series(
    task: NDArray[np.float64], t: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:func:`reference` at every time of ``t`` (s): angles (rad) and velocities (rad/s)."""
    th = np.empty(t.shape[0])
    om = np.empty(t.shape[0])
    for j in range(t.shape[0]):
        th[j], om[j] = reference(task, t[j])
    return th, om
