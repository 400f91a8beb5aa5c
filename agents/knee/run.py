"""Run knee-exoskeleton loops (in process or on Ray actors, simulated time) into a recording.

The recording has the glucose run's layout (``channels/*.parquet``, ``manifest.json`` with
``"therapy": "knee-exo"`` in its config, ``summary.json``); :mod:`twinloop.agents.knee.report` draws
its plots and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from twinloop.agents.knee.loop import ExoLoop, ExoLoopConfig, reflex_torque_nm, run_exo_together
from twinloop.agents.knee.messages import capacity_identified
from twinloop.agents.placement import InlinePlacement, Placement
from twinloop.agents.progress import counting_from_first
from twinloop.agents.recording import Columns, Recorder, column_listener
from twinloop.plant.knee.metrics import exo_metrics
from twinloop.plant.knee.model import PRESETS, knee_preset

THERAPY = "knee-exo"
#: The progress bar's label until the first round is done (actors starting, kernels loading).
WAITING = "exo loop (starting the agents)"

SUMMARY_FIELDS = (
    "rms_error_deg",
    "max_error_deg",
    "exo_work_fraction",
    "exo_work_j",
    "patient_work_j",
    "patient_effort",
    "spasticity_events",
    "limit_violations",
)

#: A reflex torque above this counts as a reflex onset in the metrics, N·m.
REFLEX_EVENT_NM = 2.0

#: How far beyond the patient's anatomical range of motion (the knee model's soft limits,
#: ``rom_extension_limit_rad`` / ``rom_flexion_limit_rad`` of its preset: −5° of hyperextension
#: to 140° of flexion for every preset) the joint may go before the run is flagged, degrees.
#: Past the soft limits the passive structures (capsule, ligaments) carry the joint; 5° beyond
#: (10° of hyperextension, 145° of flexion) the model's limit moment has grown ~20-fold (its
#: exponential rate is 35 /rad): an injury, not a motion of rehabilitation.
HAZARD_BEYOND_ROM_DEG = 5.0


def anatomical_rom_rad(patient: str) -> tuple[float, float]:
    """The patient's anatomical range of motion, rad of flexion: its preset's soft limits."""
    params = knee_preset(patient)
    return params.rom_extension_limit_rad, params.rom_flexion_limit_rad


def non_physiological(
    rom_rad: tuple[float, float],
    angle_min_rad: np.ndarray,
    angle_max_rad: np.ndarray,
    velocity_rad_s: np.ndarray,
) -> np.ndarray:
    """Ticks whose joint state is not physiology (a boolean per tick).

    An angle more than :data:`HAZARD_BEYOND_ROM_DEG` beyond ``rom_rad`` within the tick, or a
    state not finite (NaN fails every comparison, so it is caught too).
    """
    margin = math.radians(HAZARD_BEYOND_ROM_DEG)
    inside = (np.asarray(angle_min_rad, dtype=np.float64) >= rom_rad[0] - margin) & (
        np.asarray(angle_max_rad, dtype=np.float64) <= rom_rad[1] + margin
    )
    return ~(inside & np.isfinite(np.asarray(velocity_rad_s, dtype=np.float64)))


def _column(table: Mapping[str, Sequence[Any]], name: str, rows: np.ndarray) -> np.ndarray:
    return np.asarray(table[name], dtype=np.float64)[rows]


def summarize_exo(
    config: Mapping[str, Any], tables: Mapping[str, Mapping[str, Sequence[Any]]]
) -> dict[str, Any]:
    """Per-patient metrics of a recorded exoskeleton run (tables: channel → field → values).

    Computed from the true joint state at each control tick (``plant->sensor``), the
    supervisor's overrides and the twin's last estimate (with the preset's true values). A
    patient whose joint left physiology at some tick (:func:`non_physiological`: beyond its
    anatomical range of motion by more than :data:`HAZARD_BEYOND_ROM_DEG`, or a state not
    finite) has ``non_physiological`` true, those ticks in ``ticks_non_physiological``, and is
    listed in ``hazard_patients`` (what ``twinloop run --fail-on-hazard`` exits 1 on).
    """
    sup = config["supervisor"]
    joint = tables["plant->sensor"]
    names = np.asarray(joint["patient"])
    per_patient: dict[str, dict[str, Any]] = {}
    dt_s = 1.0 / float(config["control_hz"])
    for patient in dict.fromkeys(joint["patient"]):
        rows = np.flatnonzero(names == patient)
        ref = tables["task->controller"]
        ref_rows = np.flatnonzero(np.asarray(ref["patient"]) == patient)
        params = knee_preset(str(patient))
        angle = _column(joint, "angle_rad", rows)
        reference = _column(ref, "reference_rad", ref_rows)
        n = min(angle.size, reference.size)
        # the state at the end of tick k - 1 is judged against the reference read at tick k
        angle, reference = angle[1:n], reference[1:n]
        k = slice(1, n)
        reflex = np.array(
            [
                reflex_torque_nm(params, q, h)
                for q, h in zip(
                    _column(joint, "quad_reflex", rows)[k],
                    _column(joint, "ham_reflex", rows)[k],
                    strict=True,
                )
            ]
        )
        # limits judged on the extremes within each period, not only its end
        lo = _column(joint, "angle_min_rad", rows)[k]
        hi = _column(joint, "angle_max_rad", rows)[k]
        vmax = _column(joint, "velocity_abs_max_rad_s", rows)[k]
        m = exo_metrics(
            dt_s=dt_s,
            angle_rad=angle,
            reference_rad=reference,
            velocity_rad_s=_column(joint, "velocity_rad_s", rows)[k],
            exo_torque_nm=_column(joint, "exo_torque_nm", rows)[k],
            muscle_torque_nm=_column(joint, "patient_torque_nm", rows)[k],
            rom_rad=(float(sup["rom_min_rad"]), float(sup["rom_max_rad"])),
            velocity_limit_rad_s=float(sup["velocity_limit_rad_s"]),
            torque_limit_nm=float(sup["torque_limit_nm"]),
            activations=(
                _column(joint, "quad_activation", rows)[k],
                _column(joint, "ham_activation", rows)[k],
            ),
            reflex_torque_nm=np.abs(reflex),
            reflex_event_nm=REFLEX_EVENT_NM,
        )
        rom_out = int(np.sum((lo < float(sup["rom_min_rad"])) | (hi > float(sup["rom_max_rad"]))))
        fast = int(np.sum(vmax > float(sup["velocity_limit_rad_s"])))
        row: dict[str, Any] = {f: _scalar(getattr(m, f)) for f in SUMMARY_FIELDS}
        row["limit_violations"] = int(m.torque_violations) + rom_out + fast
        row["rom_violations"] = rom_out
        row["velocity_violations"] = fast
        row["torque_violations"] = int(m.torque_violations)
        hazard = non_physiological(
            anatomical_rom_rad(str(patient)),
            _column(joint, "angle_min_rad", rows),
            _column(joint, "angle_max_rad", rows),
            _column(joint, "velocity_rad_s", rows),
        )
        row["ticks_non_physiological"] = int(hazard.sum())
        row["non_physiological"] = bool(hazard.any())
        row["effort_unit"] = m.effort_unit
        row["duration_s"] = float(m.duration_s)
        ov = tables.get("supervisor->overrides", {})
        rules = [
            r
            for p, r in zip(ov.get("patient", []), ov.get("rule", []), strict=True)
            if p == patient
        ]
        row["overrides"] = {r: rules.count(r) for r in sorted(set(rules))}
        est = tables.get("estimator->controller")
        if est:
            er = np.flatnonzero(np.asarray(est["patient"]) == patient)
            if er.size:
                last = int(er[-1])
                row["twin"] = {
                    "voluntary_capacity": float(est["voluntary_capacity"][last]),
                    "voluntary_capacity_true": params.strength_fraction,
                    "spasticity_gain_per_rad_s": float(est["spasticity_gain_per_rad_s"][last]),
                    "spasticity_gain_true_per_rad_s": params.spasticity_gain_per_rad_s,
                    "residual_rms_nm": float(est["residual_rms_nm"][last]),
                    "voluntary_effort": float(est["voluntary_effort"][last]),
                    "voluntary_effort_true": float(_column(joint, "voluntary_effort", rows)[-1]),
                }
                if "voluntary_capacity_high" in est:  # recordings before these columns lack them
                    low = float(est["voluntary_capacity_low"][last])
                    high = float(est["voluntary_capacity_high"][last])
                    row["twin"]["voluntary_capacity_range"] = [low, high]
                    row["twin"]["voluntary_capacity_identified"] = capacity_identified(high)
        per_patient[str(patient)] = row
    return {
        "therapy": THERAPY,
        "sampling": f"true joint state at each control tick ({config['control_hz']} Hz)",
        "patients": per_patient,
        "hazard_beyond_rom_deg": HAZARD_BEYOND_ROM_DEG,
        "hazard_patients": [n for n, row in per_patient.items() if row["non_physiological"]],
    }


def capacity_text(twin: Mapping[str, Any], *, where: str = "") -> str:
    """The twin's voluntary capacity in words, marked when the data could not identify it.

    ``twin`` is a patient's ``twin`` entry of :func:`summarize_exo`. An identified capacity
    reads ``0.05 (true 0.05)``; one the data could not identify (no saturation seen: the
    strength is only bounded below, :func:`~twinloop.agents.knee.messages.capacity_identified`)
    reads ``1.00 (not observable at this assistance: no weakness seen, ≥ 0.08 demonstrated;
    true 0.30)``, followed by ``where`` (e.g. ``"; see report.md"``). Recordings made before
    the estimator recorded its consistent range read as before, ``1.00 (true 0.30)``.
    """
    value = f"{twin['voluntary_capacity']:.2f}"
    true = f"true {twin['voluntary_capacity_true']:.2f}"
    if "voluntary_capacity_identified" not in twin:
        return f"{value} ({true})"
    if twin["voluntary_capacity_identified"]:
        return f"{value} ({true})"
    low = twin["voluntary_capacity_range"][0]
    shown = (
        "too little data yet"
        if not math.isfinite(low)
        else f"no weakness seen, ≥ {low:.2f} demonstrated"
    )
    return f"{value} (not observable at this assistance: {shown}; {true}{where})"


def _scalar(value: Any) -> float | int:
    a = np.asarray(value)
    return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)


def config_record(config: ExoLoopConfig, placement: Placement) -> dict[str, Any]:
    """The run's configuration as recorded in the manifest."""
    record = dataclasses.asdict(config)
    record["therapy"] = THERAPY
    record["placement"] = placement.name
    return record


def exo_loops(config: ExoLoopConfig, placement: Placement | None = None) -> list[ExoLoop]:
    """One loop per patient of ``config``, hosted by ``placement`` (inline by default).

    Patient ``p`` draws from ``SeedSequence(config.seed, spawn_key=(k,))`` with ``k`` its
    position among the presets, so its trajectory does not depend on the other patients.
    """
    placement = placement or InlinePlacement()
    presets = list(PRESETS)
    loops = []
    for name in config.patients:
        seed = np.random.SeedSequence(config.seed, spawn_key=(presets.index(name),))
        loop = ExoLoop(name, config, np.random.default_rng(seed))
        loop.place(placement)
        loops.append(loop)
    return loops


def run_in_memory(loops: Sequence[ExoLoop]) -> dict[str, Any]:
    """Run ``loops`` to the end without writing a recording; return their summary."""
    columns: Columns = {}
    for loop in loops:
        loop.listen(column_listener(columns, loop.patient))
    try:
        run_exo_together(loops)
    finally:
        for loop in loops:
            loop.close()
    return summarize_exo(config_record(loops[0].config, loops[0].placement), columns)


def run_knee_exo(
    config: ExoLoopConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    placement: Placement | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run every patient's loop in lockstep, record every channel; return directory and summary.

    Seeds as :func:`exo_loops`.
    """
    placement = placement or InlinePlacement()
    record = config_record(config, placement)
    recorder = Recorder(run_dir, config=record)
    loops = exo_loops(config, placement)
    for loop in loops:
        loop.listen(recorder.listener(loop.patient))
    summary: dict[str, Any] = {"complete": False}
    complete = False
    try:
        total = sum(loop.n_ticks for loop in loops)
        with tqdm(total=total, unit="tick", disable=not progress, desc=WAITING, leave=False) as bar:
            # the first round: the agents are up, the bar's clock starts then
            run_exo_together(loops, progress=counting_from_first(bar, "exo loop"))
        complete = True
    finally:
        for loop in loops:
            loop.close()
        if complete:
            summary = summarize_exo(record, recorder.tables())
        recorder.finish(record, summary, complete=complete)
    return Path(run_dir), summary
