"""Run a cohort's closed loops (in process, simulated time) into a recording with a summary.

:func:`auto_placement` is where ``twinloop run`` puts the agents when no placement is asked for.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop, run_together
from twinloop.agents.placement import InlinePlacement, Placement, RayPatientsPlacement
from twinloop.agents.progress import STARTING, counting_from_first, start_rate_at
from twinloop.agents.recording import (
    DEFAULT_FLUSH_EVERY_MIN,
    Columns,
    Recorder,
    column_listener,
)
from twinloop.plant.glucose.cohorts import find_patient
from twinloop.plant.glucose.metrics import glucose_metrics
from twinloop.plant.glucose.patients import PatientParameters, patient_key
from twinloop.plant.glucose.scenarios import MIN_PER_DAY

#: The therapy's name in recordings' manifests.
THERAPY = "glucose"

SUMMARY_FIELDS = (
    "mean_mg_dl",
    "time_in_range_70_180_pct",
    "time_below_70_pct",
    "time_below_54_pct",
    "time_above_180_pct",
    "time_above_250_pct",
    "lbgi",
    "hbgi",
    "gri",
)


#: Plasma glucose below this (a patient the model has driven to 0 mg/dL or, by the integrator's
#: last step, slightly below) enters the metrics at this value.
METRICS_FLOOR_MG_DL = 1.0


#: Plasma glucose below this, or not a finite number, is not physiology: the patient-run is
#: flagged (``non_physiological``). 20 mg/dL (1.1 mmol/L) is far below level-3 hypoglycaemia
#: (< 54 mg/dL with impairment), where a real person is in neuroglycopenic coma, and below the
#: range the UVA/Padova 2008 model was built on: it has no counter-regulation (glucagon came
#: with the 2013 version), so below it the model only reports that insulin outran every glucose
#: source (a *collapse*, down to 0 mg/dL), not what a body would do.
HAZARD_FLOOR_MG_DL = 20.0


def non_physiological(bg_mg_dl: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Samples below :data:`HAZARD_FLOOR_MG_DL` or not finite (NaN fails ``>=`` too)."""
    return ~(np.asarray(bg_mg_dl, dtype=np.float64) >= HAZARD_FLOOR_MG_DL)


def summarize(patients: list[str], cohorts: list[str], bg_mg_dl: np.ndarray) -> dict[str, Any]:
    """Metrics of plasma glucose ``(N, T)`` at 1-min samples, per patient and per cohort.

    Values below :data:`METRICS_FLOOR_MG_DL` are counted at the floor, and each patient's
    minutes below it are reported as ``minutes_at_floor``. A patient whose glucose left
    physiology (:func:`non_physiological`) has ``non_physiological`` true, its minutes in
    ``minutes_non_physiological``, and is listed in ``hazard_patients``.
    """
    floored = bg_mg_dl < METRICS_FLOOR_MG_DL
    hazard = non_physiological(bg_mg_dl)
    m = glucose_metrics(np.maximum(bg_mg_dl, METRICS_FLOOR_MG_DL), sample_period_min=1.0)
    per_patient = {
        name: {f: float(np.asarray(getattr(m, f))[i]) for f in SUMMARY_FIELDS}
        | {
            "minutes_at_floor": int(floored[i].sum()),
            "minutes_non_physiological": int(hazard[i].sum()),
            "non_physiological": bool(hazard[i].any()),
        }
        for i, name in enumerate(patients)
    }
    per_cohort = {}
    for group in dict.fromkeys(cohorts):
        sel = np.array([c == group for c in cohorts])
        per_cohort[group] = {
            f: float(np.asarray(getattr(m, f))[sel].mean()) for f in SUMMARY_FIELDS
        }
    return {
        "glucose": "plasma, 1-min samples",
        "patients": per_patient,
        "cohorts": per_cohort,
        "hazard_floor_mg_dl": HAZARD_FLOOR_MG_DL,
        "hazard_patients": [n for i, n in enumerate(patients) if hazard[i].any()],
    }


#: One patient's closed loop inline, patient-days per second on one core, by controller,
#: measured idle (``benchmarks/loop_throughput.py``: ~20 with the twin under basal-bolus;
#: ``benchmarks/mpc_solve_time.py``: the MPC ~3.3; pid and oref0 pay the supervisor's predictive
#: guard on most ticks, 4–7; a trained policy, ``policy:PATH``, the same: the shipped PPO 4–6.5);
#: a controller not listed counts at :data:`INLINE_PATIENT_DAYS_PER_S`.
INLINE_PATIENT_DAYS_PER_S_BY_CONTROLLER = {"mpc": 3.3, "pid": 5.0, "oref0": 5.5, "policy": 5.0}
INLINE_PATIENT_DAYS_PER_S = 20.0


def inline_patient_days_per_s(controller: str) -> float:
    """The inline rate assumed for a controller (``mpc@oracle`` as ``mpc``, ``policy:…`` as one)."""
    kind = controller.split("@", 1)[0].split(":", 1)[0]
    return INLINE_PATIENT_DAYS_PER_S_BY_CONTROLLER.get(kind, INLINE_PATIENT_DAYS_PER_S)


#: Seconds of the embedded Ray's start and its workers' first imports (3–8 s measured here).
RAY_START_S = 5.0


def auto_placement(
    config: LoopConfig, address: str | None = None, cpus: int | None = None
) -> tuple[str, str]:
    """The placement of a run that asks for none, by its measured cost, and why.

    * ``address`` (a Ray cluster was asked for): ``ray-patients``, each patient's loop a Ray
      task spread over the cluster's CPUs;
    * a wall-clock run: ``inline`` (it lasts its simulated time whatever the placement);
    * else ``ray-patients`` when spreading the patients over the ``cpus`` (default: this
      process's CPUs) saves more than Ray's start (:data:`RAY_START_S`) on the run's estimated
      inline time (patient-days ÷ the controller's inline rate), and ``inline`` otherwise: the
      main job's 10 patient-days (~0.5 s inline) run inline, a 30-patient week (210
      patient-days, ~10 s) on Ray workers when there are two CPUs or more.

    The actor-per-agent placement (``ray``) is never chosen: it is for a run that wants each
    agent a restartable actor, and costs more than either (``benchmarks/loop_throughput.py``).
    """
    n_patients = len(config.patient_table())
    if address is not None:
        return "ray-patients", f"--address: {n_patients} patient loop(s) as Ray tasks"
    if config.clock == "wall":
        return "inline", "a wall-clock run lasts its simulated time on any placement"
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rate = inline_patient_days_per_s(config.controller)
    patient_days = n_patients * config.days
    inline_s = patient_days / rate
    workers = min(cpus or 1, n_patients)
    saved_s = inline_s * (1.0 - 1.0 / workers)
    cost = f"{patient_days} patient-day(s) ≈ {inline_s:.1f} s inline"
    if saved_s > RAY_START_S:
        return "ray-patients", f"{cost}; {workers} Ray workers save more than Ray's start"
    return "inline", f"{cost}; Ray's start (~{RAY_START_S:g} s) would cost more than it saves"


def tick_lateness(lateness_ms: NDArray[np.float64]) -> dict[str, Any]:
    """Statistics of the ticks' lateness in a wall-clock run (ms)."""
    return {
        "ticks": int(lateness_ms.size),
        "p50": float(np.percentile(lateness_ms, 50)),
        "p99": float(np.percentile(lateness_ms, 99)),
        "max": float(lateness_ms.max()),
    }


#: The progress bar's label until the first round is done (actors starting, kernels loading).
WAITING = "closed loop (starting the agents)"


def _patient_loop_columns(
    config: LoopConfig, name: str, seed: np.random.SeedSequence
) -> tuple[Columns, list[float]]:
    """Run one patient's loop inline and return its recorded columns and plasma glucose."""
    patient = find_patient(name, config.patients)  # a population member: from the run's files
    loop = PatientLoop(patient, config, np.random.default_rng(seed))
    columns: Columns = {}
    loop.listen(column_listener(columns, name))
    loop.run()
    return columns, columns["plant->sensor"]["bg_mg_dl"]


def _run_patients_on_ray(
    config: LoopConfig,
    patients: tuple[PatientParameters, ...],
    seeds: list[np.random.SeedSequence],
    recorder: Recorder,
    config_dict: dict[str, Any],
    progress: bool,
) -> tuple[Path, dict[str, Any]]:
    import ray

    remote = ray.remote(_patient_loop_columns).options(num_cpus=1)
    refs = [remote.remote(config, p.name, s) for p, s in zip(patients, seeds, strict=True)]
    bg = np.empty((len(patients), config.days * MIN_PER_DAY + 1))
    complete = False
    try:
        # one patient's loop per step, the clock from the first (the workers' start is not the
        # loops'), the average since then (smoothing=0): the loops finish in parallel batches
        with tqdm(
            total=len(refs), disable=not progress, desc="patients" + STARTING, unit="patient",
            smoothing=0, leave=False,
        ) as bar:  # fmt: skip
            advance = counting_from_first(bar, "patients")
            for i, ref in enumerate(refs):
                columns, trace = ray.get(ref)
                recorder.merge(columns)  # in patient order: the recording is deterministic
                recorder.flush()  # a finished patient is on disk at once
                bg[i] = trace
                advance(1)
        complete = True
    finally:
        summary: dict[str, Any] = {"complete": False}
        if complete:
            summary = summarize([p.name for p in patients], [p.cohort for p in patients], bg)
        recorder.finish(config_dict, summary, complete=complete)
    return recorder.run_dir, summary


def run_cohort(
    config: LoopConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    placement: Placement | None = None,
    parallel_patients: int | None = None,
    flush_every_min: int = DEFAULT_FLUSH_EVERY_MIN,
) -> tuple[Path, dict[str, Any]]:
    """Run every patient's loop, record every channel, and return the directory and summary.

    Each patient draws from ``SeedSequence(config.seed, spawn_key=(k,))`` where ``k`` is its
    position in the full table of 30 patients, so a patient's trajectory does not depend on
    which other patients run with it (nor on the placement, nor on ``parallel_patients``).

    Args:
        config: the run.
        run_dir: where the recording goes.
        progress: show a progress bar (simulated minutes).
        placement: where agents run (default: inline).
        parallel_patients: patient loops driven together in lockstep, each round of their
            ticks one call per kind of agent (default: all of them).
        flush_every_min: simulated minutes between flushes of the recording (a kill loses at
            most this much; with lockstep groups, minutes are counted over the groups run;
            with :class:`RayPatientsPlacement` a patient's rows are flushed when its loop ends).

    """
    patients = config.patient_table()
    models = config.model_table()  # every model readable before the run
    seeds = [
        np.random.SeedSequence(config.seed, spawn_key=(patient_key(p.name),)) for p in patients
    ]
    n_min = config.days * MIN_PER_DAY
    bg = np.empty((len(patients), n_min + 1))
    complete = False
    config_dict = {"therapy": THERAPY, **dataclasses.asdict(config)}
    placement = placement or InlinePlacement()
    config_dict["placement"] = placement.name
    recorder = Recorder(
        run_dir,
        config=config_dict,
        flush_every_min=flush_every_min,
        background=config.clock == "wall",  # a paced loop does not wait for the disk
    )

    if isinstance(placement, RayPatientsPlacement):
        return _run_patients_on_ray(config, patients, seeds, recorder, config_dict, progress)

    group = max(1, parallel_patients or len(patients))

    started: list[bool] = []

    def run_group(first: int, bar: tqdm) -> None:
        loops, traces = [], []
        done = [0]  # patient-minutes of this group
        for i in range(first, min(first + group, len(patients))):
            loop = PatientLoop(
                patients[i], config, np.random.default_rng(seeds[i]), model=models[i]
            )
            loop.place(placement)
            loop.listen(recorder.listener(patients[i].name))
            trace: list[float] = []
            loop.channels["plant->sensor"].listen(
                lambda _, m, tr=trace: tr.append(m.bg_mg_dl)  # type: ignore[misc]
            )
            loops.append(loop)
            traces.append(trace)
        offset_min = first // group * n_min

        def progressed(n: int) -> None:
            if started:
                bar.update(n)
            else:  # the first round: the agents are up, the bar's clock starts now
                started.append(True)
                start_rate_at(bar, n)
            done[0] += n
            recorder.advance(offset_min + done[0] / len(loops))

        try:
            run_together(loops, progress=progressed)
        finally:
            for loop in loops:
                loop.close()
        for k, trace in enumerate(traces):
            bg[first + k] = trace

    try:
        with tqdm(
            total=len(patients) * n_min,
            unit="sim-min",
            disable=not progress,
            desc=WAITING,
            leave=False,
        ) as bar:
            for first in range(0, len(patients), group):
                run_group(first, bar)
        complete = True
    finally:
        summary: dict[str, Any] = {"complete": False}
        if complete:
            summary = summarize([p.name for p in patients], [p.cohort for p in patients], bg)
            lateness = np.array(recorder.column("clock->ticks", "lateness_ms"), dtype=np.float64)
            if lateness.size:
                summary["tick_lateness_ms"] = tick_lateness(lateness)
        recorder.finish(config_dict, summary, complete=complete)
    return Path(run_dir), summary
