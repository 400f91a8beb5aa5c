"""Synthetic therapy logs of known virtual patients: ground truth for twin identification.

A synthetic person lives ``days`` days on multiple daily injections' logic (a pump's flat
basal, meal boluses from *counted* carbohydrates with the bolus calculator, corrections above
250 mg/dL: :class:`twinloop.policies.glucose.controllers.BasalBolusController` with the patient's
own basal, CR and CF), eats the meals of simglucose's random daily protocol
(:class:`twinloop.plant.glucose.scenarios.RandomDailyProtocol`), counts them with an error (normal,
20 % SD by default), wears a CGM with the error model of :mod:`twinloop.plant.glucose.cgm`
(GuardianRT by default: 5-min readings, autocorrelated Johnson errors of about 11 mg/dL SD) and
treats lows with rescue carbohydrates. Optionally its insulin sensitivity follows a daily profile
(factors on ``Vmx`` and ``kp3`` per block of the local day).

The log holds what a real person's export would: CGM readings, the basal rate, boluses and the
*counted* carbohydrates (rescues included), written in the documented CSV layout of
:mod:`twinloop.twins.logs`; the truth (every minute's glucose, the grams really eaten) stays with
the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from twinloop.plant.glucose.cgm import CGMSpec, cgm_errors, measure
from twinloop.plant.glucose.patients import PatientParameters, initial_states, parameter_matrix
from twinloop.plant.glucose.scenarios import CarbCountingError, RandomDailyProtocol
from twinloop.policies.glucose.controllers import BasalBolusController
from twinloop.twins.replay import LoopTrace, RescueRule, closed_loop

__all__ = ["SyntheticLog", "synthetic_log"]

#: Minute 0 of synthetic logs: a Monday, local midnight.
DEFAULT_START = datetime(2026, 3, 2, 0, 0, tzinfo=timezone(timedelta(hours=1)))
MIN_PER_DAY = 1440


@dataclasses.dataclass(frozen=True)
class SyntheticLog:
    """A synthetic log and its truth.

    Attributes:
        patient: the true patient.
        start: local start (aware).
        csv_text: the log in the CSV layout of :mod:`twinloop.twins.logs`.
        trace: the true closed loop (per-minute glucose, insulin, rescues).
        meal_g: ``(K,)`` grams really eaten per minute (rescues excluded).
        announced_g: ``(K,)`` grams counted per minute.
        cgm_mg_dl: ``(K+1,)`` CGM readings at their minutes, ``NaN`` between.

    """

    patient: PatientParameters
    start: datetime
    csv_text: str
    trace: LoopTrace
    meal_g: NDArray[np.float64]
    announced_g: NDArray[np.float64]
    cgm_mg_dl: NDArray[np.float64]

    def write(self, path: str | Path) -> Path:
        """Write the CSV log."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.csv_text, encoding="utf-8")
        return out


def _profile(factors: Sequence[float], start: datetime) -> tuple[NDArray[np.float64], int, int]:
    blocks = np.asarray(factors, dtype=np.float64)
    if blocks.ndim != 1 or not blocks.size or MIN_PER_DAY % blocks.size or np.any(blocks <= 0):
        raise ValueError(
            f"sensitivity_profile={list(factors)!r}: a list of factors > 0 whose length divides "
            "1440 min"
        )
    start_min = start.hour * 60 + start.minute
    return blocks, MIN_PER_DAY // blocks.size, start_min


def synthetic_log(
    patient: PatientParameters,
    *,
    days: int,
    seed: int,
    cgm: str = "GuardianRT",
    carb_error: CarbCountingError | None = None,
    start: datetime = DEFAULT_START,
    sensitivity_profile: Sequence[float] | None = None,
    settings: Mapping[str, float] | None = None,
) -> SyntheticLog:
    """Simulate ``days`` days of a person's life and the log of them (see the module).

    ``settings`` replaces the person's own therapy settings (``scheduled_basal_u_per_h``,
    ``carb_ratio_g_per_u``, ``correction_factor_mg_dl_per_u``: the pump's, not the physiology's);
    e.g. a carb ratio 25 % below the patient's makes a person prone to hypoglycaemia.
    """
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days={days!r}: an integer >= 1")
    if start.tzinfo is None:
        raise ValueError(f"start={start!r}: an aware datetime (with its UTC offset)")
    spec = CGMSpec.preset(cgm)
    errors = carb_error if carb_error is not None else CarbCountingError("normal", 0.2)
    meal_rng, cgm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    k = days * MIN_PER_DAY
    plan = RandomDailyProtocol(carb_error=errors).sample(meal_rng, days=days)
    meal_g, announced_g = plan.to_minutes(k)
    period = int(spec.sample_period_min)
    n_samples = k // period + 1
    err = cgm_errors(spec, cgm_rng, n_samples)
    per_minute = np.zeros(k + 1)
    per_minute[::period] = err
    sensitivity = None
    if sensitivity_profile is not None:
        blocks, width, start_min = _profile(sensitivity_profile, start)

        def sensitivity(t: int) -> NDArray[np.float64]:
            return np.array([blocks[((start_min + t) % MIN_PER_DAY) // width]])

    allowed = {"scheduled_basal_u_per_h", "carb_ratio_g_per_u", "correction_factor_mg_dl_per_u"}
    for key, value in (settings or {}).items():
        if key not in allowed or not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"settings[{key!r}]={value!r}: one of {sorted(allowed)}, > 0")
    own = {
        "scheduled_basal_u_per_h": patient.basal_u_per_h,
        "carb_ratio_g_per_u": patient.carb_ratio_g_per_u,
        "correction_factor_mg_dl_per_u": patient.correction_factor_mg_dl_per_u,
    }
    controller = BasalBolusController(**(own | dict(settings or {})))
    trace = closed_loop(
        parameter_matrix([patient]),
        initial_states([patient]),
        [controller],
        meal_g=meal_g,
        announced_g=announced_g,
        scheduled_basal_u_per_h=np.array([patient.basal_u_per_h]),
        sensitivity=sensitivity,
        sensor_error_mg_dl=per_minute[None, :],
        rescue=RescueRule(grams=15.0, below_mg_dl=70.0, interval_min=20.0),
        period_min=period,
    )
    readings = np.full(k + 1, np.nan)
    readings[::period] = np.round(measure(trace.gsub_mg_dl[0, ::period], err, spec))
    csv_text = _csv(start, readings, trace, announced_g, days)
    return SyntheticLog(patient, start, csv_text, trace, meal_g, announced_g, readings)


def _csv(
    start: datetime,
    readings: NDArray[np.float64],
    trace: LoopTrace,
    announced_g: NDArray[np.float64],
    days: int,
) -> str:
    k = announced_g.shape[0]
    basal = trace.basal_u_per_h[0]
    bolus = np.round(trace.bolus_u[0] / 0.05) * 0.05  # a pump's 0.05 U steps
    carbs = np.round(announced_g + trace.rescue_g[0])
    basal_rows = {0} | {d * MIN_PER_DAY for d in range(days)}
    basal_rows |= set((np.flatnonzero(np.diff(basal)) + 1).tolist())
    minutes = sorted(
        set(np.flatnonzero(~np.isnan(readings)).tolist())
        | set(np.flatnonzero(bolus > 0).tolist())
        | set(np.flatnonzero(carbs > 0).tolist())
        | basal_rows
    )
    lines = [
        "# synthetic log of a virtual patient (twinloop twin synth)",
        "time,cgm_mg_dl,basal_u_per_h,bolus_u,carbs_g",
    ]
    for t in minutes:
        when = (start + timedelta(minutes=t)).isoformat()
        cgm = f"{readings[t]:.0f}" if t <= k and not np.isnan(readings[t]) else ""
        b = f"{basal[t]:.3f}" if t in basal_rows and t < k else ""
        bo = f"{bolus[t]:.2f}" if t < k and bolus[t] > 0 else ""
        c = f"{carbs[t]:.0f}" if t < k and carbs[t] > 0 else ""
        lines.append(f"{when},{cgm},{b},{bo},{c}")
    return "\n".join(lines) + "\n"
