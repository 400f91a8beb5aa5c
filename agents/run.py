"""Run a cohort's closed loops (in process, simulated time) into a recording with a summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.loop import LoopConfig, PatientLoop
from agents.recording import Recorder
from plant.metrics import glucose_metrics
from plant.patients import patient_names
from plant.scenarios import MIN_PER_DAY

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


def summarize(patients: list[str], cohorts: list[str], bg_mg_dl: np.ndarray) -> dict[str, Any]:
    """Metrics of plasma glucose ``(N, T)`` at 1-min samples, per patient and per cohort."""
    m = glucose_metrics(bg_mg_dl, sample_period_min=1.0)
    per_patient = {
        name: {f: float(np.asarray(getattr(m, f))[i]) for f in SUMMARY_FIELDS}
        for i, name in enumerate(patients)
    }
    per_cohort = {}
    for group in dict.fromkeys(cohorts):
        sel = np.array([c == group for c in cohorts])
        per_cohort[group] = {
            f: float(np.asarray(getattr(m, f))[sel].mean()) for f in SUMMARY_FIELDS
        }
    return {"glucose": "plasma, 1-min samples", "patients": per_patient, "cohorts": per_cohort}


def run_cohort(
    config: LoopConfig, run_dir: str | Path, *, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Run every patient's loop, record every channel, and return the directory and summary.

    Each patient draws from ``SeedSequence(config.seed, spawn_key=(k,))`` where ``k`` is its
    position in the full table of 30 patients, so a patient's trajectory does not depend on
    which other patients run with it.
    """
    patients = config.patient_table()
    recorder = Recorder(run_dir)
    table = patient_names()
    seeds = [
        np.random.SeedSequence(config.seed, spawn_key=(table.index(p.name),)) for p in patients
    ]
    total = len(patients) * config.days * MIN_PER_DAY
    bg = np.empty((len(patients), config.days * MIN_PER_DAY + 1))
    complete = False
    config_dict = dataclasses.asdict(config)
    try:
        with tqdm(
            total=total, unit="sim-min", disable=not progress, desc="closed loop", leave=False
        ) as bar:
            for i, (patient, seed) in enumerate(zip(patients, seeds, strict=True)):
                loop = PatientLoop(patient, config, np.random.default_rng(seed))
                loop.listen(recorder.listener(patient.name))
                start = len(recorder.column("plant->sensor", "bg_mg_dl"))
                loop.run(progress=bar.update)
                bg[i] = recorder.column("plant->sensor", "bg_mg_dl")[start:]
        complete = True
    finally:
        summary = (
            summarize([p.name for p in patients], [p.cohort for p in patients], bg)
            if complete
            else {"complete": False}
        )
        recorder.finish(config_dict, summary, complete=complete)
    return Path(run_dir), summary
