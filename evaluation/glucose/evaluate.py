"""Evaluate therapy controllers on a declared protocol: controllers × cohorts × seeds on Ray.

A protocol (:class:`EvaluationProtocol`, a YAML file; the shipped one is
``evaluation/glucose/protocols/t1d-standard.yaml``) fixes the cohorts, days, seeds, meal scenario,
carbohydrate-counting error, CGM and control period. :func:`evaluate` runs one closed loop per
(controller, cohort, seed) — a *run*, the loop of each patient inline in one Ray task
(:func:`run_one`) — and writes into ``OUT_DIR``::

    OUT_DIR/
      per_patient.csv     one row per controller, cohort, seed and patient: every clinical
                          metric of twinloop.plant.glucose.metrics, total daily insulin, supervisor
                          overrides, controller faults; ``hazard`` ``non-physiological`` when
                          plasma glucose fell below HAZARD_FLOOR_MG_DL (20 mg/dL) or was not a
                          number; status ``error`` and the message for a failed run
      comparison.csv      one row per controller and cohort: mean over seeds and patients, and
                          the standard deviation across seeds of the cohort mean (``*_sd``)
      results.md          the ranked Markdown table (see :func:`markdown_table`)
      manifest.json       protocol, controllers, versions, git revision, wall time, command,
                          the status of every run and the flagged patient-runs
                          (``hazard_patient_runs``)
      plots/time_in_ranges.png     stacked time in ranges, per controller and cohort
      plots/agp_<cohort>.png       ambulatory glucose profile per controller (pooled)
      plots/cvga.png               control-variability grid analysis, one point per patient-run
      runs/<controller>/<cohort>/seed-<n>/   each run's recording (unless recordings=False)

Glucose metrics are those of :func:`twinloop.plant.glucose.metrics.glucose_metrics` on *plasma*
glucose at 1-min samples (as ``twinloop run``'s summary, values below
:data:`twinloop.agents.glucose.run.METRICS_FLOOR_MG_DL` counted at that floor), computed from each
run's recording. A run's numbers depend only on the protocol, the controller, the cohort and the
seed — not on the number of workers nor on which worker ran it — because every patient draws from
``SeedSequence(seed, spawn_key=(k,))`` (see :func:`twinloop.agents.glucose.run.run_cohort`). The one
wall-clock dependence left is the loop's controller deadline (``LoopConfig.controller_deadline_s``,
1 s): a controller whose ``decide`` overruns it is counted in ``controller_faults``.

A controller that raises does not stop the evaluation: inside a run, the loop records the fault
and the supervisor's safe command is used (``controller_faults`` counts the ticks); a run that
fails as a whole (say a policy file that does not load) is recorded with status ``error`` and
its message, and the table marks it.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import importlib.resources
import json
import math
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from numpy.typing import NDArray
from tqdm import tqdm

from twinloop.agents.glucose.loop import LoopConfig
from twinloop.agents.glucose.run import (
    HAZARD_FLOOR_MG_DL,
    METRICS_FLOOR_MG_DL,
    non_physiological,
    run_cohort,
)
from twinloop.agents.recording import channel_file, git_output
from twinloop.plant.errors import ConfigError, PlantError
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.cohorts import expand_names
from twinloop.plant.glucose.metrics import GlucoseMetrics, glucose_metrics
from twinloop.plant.glucose.models import DEFAULT_MODEL, MODEL_HELP, parse_model
from twinloop.plant.glucose.patients import COHORTS, patient_names
from twinloop.plant.glucose.scenarios import MIN_PER_DAY, SCENARIOS, CarbCountingError
from twinloop.policies.glucose.controllers import POLICY_PREFIX, check_controller_name
from twinloop.policies.saved import resolve_policy

__all__ = [
    "DEFAULT_PROTOCOL",
    "DOC_BEGIN",
    "DOC_END",
    "EvaluationConfigError",
    "EvaluationError",
    "EvaluationProtocol",
    "EvaluationResult",
    "ProtocolError",
    "RunResult",
    "RunSpec",
    "check_controllers",
    "check_doc",
    "comparison_rows",
    "evaluate",
    "load_protocol",
    "markdown_table",
    "patient_rows",
    "run_one",
    "shipped_protocols",
    "update_doc",
]

#: The shipped protocol used when none is given.
DEFAULT_PROTOCOL = "t1d-standard"

#: Markers of the results block in a Markdown document (see :func:`update_doc`).
DOC_BEGIN = "<!-- twinloop-evaluate:begin -->"
DOC_END = "<!-- twinloop-evaluate:end -->"

PER_PATIENT_FILE = "per_patient.csv"
COMPARISON_FILE = "comparison.csv"
RESULTS_FILE = "results.md"
MANIFEST_FILE = "manifest.json"
PLOTS_DIR = "plots"
RUNS_DIR = "runs"

#: Supervisor intervention categories counted per patient (``overrides_<slug>``), as
#: :func:`twinloop.agents.glucose.report.intervention_category` names them; others go to
# ``overrides_other``.
OVERRIDE_CATEGORIES = (
    "low-glucose suspend",
    "stale CGM",
    "no command",
    "invalid command",
    "max temp basal",
    "max bolus",
    "max insulin on board",
)

#: The metrics of twinloop.plant.glucose.metrics, in their declared order (``cvga_zone`` is text).
METRIC_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GlucoseMetrics))

#: The column counting each override category (``overrides_low_glucose_suspend``, ...).
_OVERRIDE_COLUMNS: dict[str, str] = {
    c: "overrides_" + re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in OVERRIDE_CATEGORIES
}

#: Numeric per-patient columns besides the glucose metrics, with their meaning and unit.
EXTRA_FIELDS: tuple[str, ...] = (
    "minutes_at_floor",  # minutes of plasma glucose below METRICS_FLOOR_MG_DL
    "minutes_non_physiological",  # minutes below HAZARD_FLOOR_MG_DL or not a number
    "tdi_u_per_day",  # total daily insulin delivered, U/day
    "basal_u_per_day",  # of which basal, U/day
    "bolus_u_per_day",  # of which boluses, U/day
    "overrides_total",  # supervisor overrides over the run (count)
    *_OVERRIDE_COLUMNS.values(),
    "overrides_other",
    "controller_faults",  # ticks at which the controller raised or overran its deadline
    "other_faults",  # faults of the other agents (sensor, twin, supervisor, actuator)
)

#: Leading per-patient columns (identity and status).
KEY_FIELDS = ("controller", "cohort", "seed", "patient", "status", "error")

#: Every column of ``per_patient.csv``, in order.
PER_PATIENT_FIELDS: tuple[str, ...] = (
    *KEY_FIELDS,
    "hazard",  # "non-physiological" when the patient-run is flagged (see HAZARD_FLOOR_MG_DL)
    *METRIC_FIELDS,
    *EXTRA_FIELDS,
    "first_controller_fault",
)

#: Numeric columns averaged in ``comparison.csv``.
NUMERIC_FIELDS: tuple[str, ...] = tuple(
    f for f in (*METRIC_FIELDS, *EXTRA_FIELDS) if f != "cvga_zone"
)

#: Columns of the Markdown table: (metric, header, decimals).
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("time_in_range_70_180_pct", "TIR 70–180 %", 1),
    ("time_below_70_pct", "<70 %", 2),
    ("time_below_54_pct", "<54 %", 2),
    ("time_above_180_pct", ">180 %", 1),
    ("time_above_250_pct", ">250 %", 2),
    ("mean_mg_dl", "mean mg/dL", 1),
    ("cv_pct", "CV %", 1),
    ("lbgi", "LBGI", 2),
    ("hbgi", "HBGI", 2),
    ("tdi_u_per_day", "TDI U/day", 1),
)

#: Decimals of TIR and of time below 70 % at which the ranking compares them (ties below).
RANK_DECIMALS = 1

#: Where ``model: fit`` writes the fitted twins (under the evaluation's directory).
TWINS_DIR = "twins"

_PROTOCOL_KEYS = (
    "name",
    "description",
    "cohorts",
    "days",
    "seeds",
    "scenario",
    "carb_error",
    "cgm",
    "control_period_min",
    "controller_deadline_s",
    "model",
    "fit_days",
)


class EvaluationError(Exception):
    """Base class of the errors raised by :mod:`twinloop.evaluation.glucose.evaluate`."""


class EvaluationConfigError(EvaluationError, ValueError):
    """A setting of the evaluation outside what is allowed (names the field and the value)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


class ProtocolError(EvaluationConfigError):
    """A protocol field (or file) outside what is allowed; ``source`` says which file."""

    def __init__(self, field: str, value: object, allowed: str, *, source: str = "") -> None:
        self.source = source
        super().__init__(field, value, allowed)
        if source:
            self.args = (f"protocol {source}: {self.args[0]}",)


# --------------------------------------------------------------------------------------------
# The protocol


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Count(int):
    """A count shown as ``N things`` in an error (not the whole list)."""

    def __new__(cls, n: int, what: str) -> _Count:
        count = super().__new__(cls, n)
        count.what = what  # type: ignore[attr-defined]
        return count

    def __repr__(self) -> str:
        return f"{int(self)} {self.what}"  # type: ignore[attr-defined]


#: Most simulated days of one run (a year; ``days`` and ``--days``).
MAX_DAYS = 365
#: Largest seed (NumPy's legacy 32-bit seeds; ``seeds`` and ``--seed``).
MAX_SEED = 2**32 - 1
#: Most seeds of one protocol (each one runs every controller on every cohort).
MAX_SEEDS = 100
DAYS_ALLOWED = f"an integer of days in 1..{MAX_DAYS}"
SEEDS_ALLOWED = f"distinct integers in 0..{MAX_SEED}, at most {MAX_SEEDS} of them"


@dataclasses.dataclass(frozen=True)
class EvaluationProtocol:
    """What every controller is evaluated on (validated once, at construction).

    Attributes:
        name: the protocol's name (reports and the manifest).
        cohorts: cohort names (``adults``, ``adolescents``, ``children``, ``all``) or single
            patient names (a cohort of one), each evaluated and reported on its own.
        days: simulated days per run (1..:data:`MAX_DAYS` = 365).
        seeds: seeds of meals, counting errors and sensor noise (distinct integers in
            0..2³²−1, at most :data:`MAX_SEEDS` = 100); one run per seed and cohort.
        scenario: meal scenario (a key of :data:`twinloop.plant.glucose.scenarios.SCENARIOS`).
        carb_error: carbohydrate-counting error of the announced meals.
        cgm: the sensor.
        control_period_min: minutes between controller decisions (1..60, and >= the CGM's
            sample period).
        controller_deadline_s: wall-clock budget of one decision (the loop discards a later
            one and the supervisor's safe command applies). 60 s by default: the real budget
            of a therapy decision is the 5-min period, and a short deadline would make
            simulated results depend on the machine's load.
        model: what the twin estimator and the planning controllers (MPC) plan on
            (:mod:`twinloop.plant.glucose.models`): ``population`` (default: the age group's
            mean at each person's clinical settings), ``population:sample``, ``twin:DIR``,
            ``fit`` (each patient's twin fitted from a synthesized log of their usual therapy
            before the runs: :func:`twinloop.twins.individualize.individualize`) or ``oracle``
            (the patients' true parameters: the upper bound). A controller named
            ``NAME@MODEL`` (``mpc@oracle``) plans on ``MODEL`` instead.
        fit_days: days of each patient's log when ``model`` is ``fit``.
        description: free text.

    Raises:
        ProtocolError: a field outside what is allowed (names the field, the value and what
            is allowed).

    """

    name: str
    cohorts: tuple[str, ...]
    days: int
    seeds: tuple[int, ...]
    scenario: str = "random"
    carb_error: CarbCountingError = dataclasses.field(
        default_factory=lambda: CarbCountingError("uniform", 0.3)
    )
    cgm: CGMSpec = dataclasses.field(default_factory=CGMSpec)
    control_period_min: int = 5
    controller_deadline_s: float = 60.0
    description: str = ""
    model: str = DEFAULT_MODEL
    fit_days: int = 7

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "model", parse_model(self.model).spec)
        except ConfigError:
            raise ProtocolError("model", self.model, MODEL_HELP) from None
        if not (_is_int(self.fit_days) and 1 <= self.fit_days <= 90):
            raise ProtocolError("fit_days", self.fit_days, "an integer of days in 1..90")
        if not (isinstance(self.name, str) and self.name.strip()):
            raise ProtocolError("name", self.name, "a non-empty string")
        if not isinstance(self.description, str):
            raise ProtocolError("description", self.description, "a string")
        if isinstance(self.cohorts, str) or not isinstance(self.cohorts, Sequence):
            raise ProtocolError("cohorts", self.cohorts, "a list of cohort or patient names")
        object.__setattr__(self, "cohorts", tuple(self.cohorts))
        valid = f"cohorts {', '.join(COHORTS)} or patient names like {patient_names()[0]}"
        if not self.cohorts:
            raise ProtocolError("cohorts", list(self.cohorts), f"at least one of {valid}")
        for name in self.cohorts:
            if not isinstance(name, str) or (name not in COHORTS and name not in patient_names()):
                raise ProtocolError("cohorts", name, valid)
        if len(set(self.cohorts)) != len(self.cohorts):
            raise ProtocolError("cohorts", list(self.cohorts), "distinct names")
        if not (_is_int(self.days) and 1 <= self.days <= MAX_DAYS):
            raise ProtocolError("days", self.days, DAYS_ALLOWED)
        if isinstance(self.seeds, str) or not isinstance(self.seeds, Sequence):
            raise ProtocolError("seeds", self.seeds, f"a list of {SEEDS_ALLOWED}")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not 1 <= len(self.seeds) <= MAX_SEEDS:
            raise ProtocolError("seeds", _Count(len(self.seeds), "seeds"), SEEDS_ALLOWED)
        for seed in self.seeds:
            if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
                raise ProtocolError("seeds", seed, SEEDS_ALLOWED)
        if len(set(self.seeds)) != len(self.seeds):
            raise ProtocolError("seeds", list(self.seeds), SEEDS_ALLOWED)
        if self.scenario not in SCENARIOS:
            raise ProtocolError("scenario", self.scenario, f"one of {', '.join(SCENARIOS)}")
        if not isinstance(self.carb_error, CarbCountingError):
            raise ProtocolError("carb_error", self.carb_error, "a CarbCountingError")
        if not isinstance(self.cgm, CGMSpec):
            raise ProtocolError("cgm", self.cgm, "a CGMSpec")
        period = self.control_period_min
        if not (_is_int(period) and 1 <= period <= 60):
            raise ProtocolError("control_period_min", period, "an integer of minutes in 1..60")
        if period < self.cgm.sample_period_min:
            raise ProtocolError(
                "control_period_min",
                period,
                f">= the CGM sample period ({self.cgm.sample_period_min} min)",
            )
        deadline = self.controller_deadline_s
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not 0 < deadline <= 60 * self.control_period_min
        ):
            raise ProtocolError(
                "controller_deadline_s", deadline, "seconds > 0 and <= the control period"
            )

    def loop_config(
        self, controller: str, cohort: str, seed: int, *, fitted: str | None = None
    ) -> LoopConfig:
        """The closed loop of one run: ``controller`` (``NAME`` or ``NAME@MODEL``) on ``cohort``.

        ``fitted`` is the ``twin:DIR`` that ``fit`` resolved to.
        """
        name, model = split_model(controller)
        model = model or self.model
        if model == "fit":
            if fitted is None:
                raise EvaluationConfigError(
                    "model", "fit", "twins fitted before the runs (evaluate() does it)"
                )
            model = fitted
        return LoopConfig(
            patients=(cohort,),
            days=self.days,
            seed=seed,
            controller=name,
            model=model,
            scenario=self.scenario,
            carb_error=self.carb_error,
            control_period_min=self.control_period_min,
            cgm=self.cgm,
            controller_deadline_s=float(self.controller_deadline_s),
        )

    def to_dict(self) -> dict[str, Any]:
        """The protocol as plain data (the YAML form; ``cgm`` in full)."""
        return {
            "name": self.name,
            "description": self.description,
            "cohorts": list(self.cohorts),
            "days": self.days,
            "seeds": list(self.seeds),
            "scenario": self.scenario,
            "carb_error": dataclasses.asdict(self.carb_error),
            "cgm": dataclasses.asdict(self.cgm),
            "control_period_min": self.control_period_min,
            "controller_deadline_s": self.controller_deadline_s,
            "model": self.model,
            "fit_days": self.fit_days,
        }

    def with_overrides(
        self,
        *,
        cohorts: Sequence[str] | None = None,
        days: int | None = None,
        seeds: Sequence[int] | None = None,
        model: str | None = None,
    ) -> EvaluationProtocol:
        """A copy with some fields replaced (validated again); ``None`` keeps a field."""
        changes: dict[str, Any] = {}
        if model is not None:
            changes["model"] = model
        if cohorts is not None:
            changes["cohorts"] = tuple(cohorts)
        if days is not None:
            changes["days"] = days
        if seeds is not None:
            changes["seeds"] = tuple(seeds)
        return dataclasses.replace(self, **changes) if changes else self


def _protocol_dir() -> Any:
    return importlib.resources.files("twinloop.evaluation.glucose") / "protocols"


def shipped_protocols() -> tuple[str, ...]:
    """Names of the protocols shipped in ``evaluation/glucose/protocols`` (files less ``.yaml``)."""
    return tuple(
        sorted(
            p.name[: -len(".yaml")] for p in _protocol_dir().iterdir() if p.name.endswith(".yaml")
        )
    )


def _sub_spec(cls: type[Any], value: object, field: str, source: str, default: Any) -> Any:
    """A CarbCountingError or CGMSpec from ``"default"`` or a mapping of its fields."""
    names = [f.name for f in dataclasses.fields(cls)]
    if value == "default" or value is None:
        return default
    if not isinstance(value, Mapping):
        raise ProtocolError(
            field, value, f"'default' or a mapping of {', '.join(names)}", source=source
        )
    for key in value:
        if key not in names:
            raise ProtocolError(
                f"{field}.{key}", value[key], f"keys {', '.join(names)}", source=source
            )
    try:
        return cls(**value)
    except PlantError as exc:  # ConfigError names the inner field
        inner = getattr(exc, "field", "?")
        raise ProtocolError(
            f"{field}.{inner}",
            getattr(exc, "value", value),
            getattr(exc, "allowed", str(exc)),
            source=source,
        ) from None


def protocol_from_mapping(data: object, *, source: str = "") -> EvaluationProtocol:
    """Build and validate a protocol from its YAML form (see the shipped file for the keys).

    Raises:
        ProtocolError: not a mapping, an unknown or missing key, or a value not allowed.

    """
    if not isinstance(data, Mapping):
        raise ProtocolError(
            "protocol",
            type(data).__name__,
            "a mapping of " + ", ".join(_PROTOCOL_KEYS),
            source=source,
        )
    for key in data:
        if key not in _PROTOCOL_KEYS:
            raise ProtocolError(key, data[key], f"keys {', '.join(_PROTOCOL_KEYS)}", source=source)
    for key in ("name", "cohorts", "days", "seeds"):
        if key not in data:
            raise ProtocolError(key, None, "a value (the key is required)", source=source)
    default = EvaluationProtocol(name="x", cohorts=("adults",), days=1, seeds=(0,))
    try:
        return EvaluationProtocol(
            name=data["name"],
            description=data.get("description", "") or "",
            cohorts=data["cohorts"],
            days=data["days"],
            seeds=data["seeds"],
            scenario=data.get("scenario", default.scenario),
            carb_error=_sub_spec(
                CarbCountingError, data.get("carb_error"), "carb_error", source, default.carb_error
            ),
            cgm=_sub_spec(CGMSpec, data.get("cgm"), "cgm", source, default.cgm),
            control_period_min=data.get("control_period_min", default.control_period_min),
            controller_deadline_s=data.get("controller_deadline_s", default.controller_deadline_s),
            model=data.get("model", default.model),
            fit_days=data.get("fit_days", default.fit_days),
        )
    except ProtocolError as exc:
        if source and not exc.source:
            raise ProtocolError(exc.field, exc.value, exc.allowed, source=source) from None
        raise


def load_protocol(protocol: str | Path | None = None) -> EvaluationProtocol:
    """Load a protocol: a shipped name (default :data:`DEFAULT_PROTOCOL`) or a YAML file.

    Raises:
        ProtocolError: the file cannot be read, is not YAML, or does not validate.

    """
    import yaml

    if protocol is None:
        protocol = DEFAULT_PROTOCOL
    text: str
    if isinstance(protocol, str) and protocol in shipped_protocols():
        source = f"{protocol} (shipped)"
        text = (_protocol_dir() / f"{protocol}.yaml").read_text(encoding="utf-8")
    else:
        source = str(protocol)
        try:
            text = Path(protocol).read_text(encoding="utf-8")
        except OSError as exc:
            raise ProtocolError(
                "file",
                str(protocol),
                f"a readable YAML file or a shipped protocol ({', '.join(shipped_protocols())})"
                f"; {exc.strerror or exc}",
            ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProtocolError("file", source, f"valid YAML ({str(exc).splitlines()[0]})") from None
    return protocol_from_mapping(data, source=source)


# --------------------------------------------------------------------------------------------
# One run (a Ray task)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: ``controller`` on ``cohort`` with ``seed``.

    Attributes:
        controller: controller name.
        cohort: the protocol's cohort entry (a cohort or a patient name).
        seed: the seed.
        config: the loop.
        recording_dir: where the run's recording is kept; ``None`` records into a temporary
            directory, removed once the metrics are computed.

    """

    controller: str
    cohort: str
    seed: int
    config: LoopConfig
    recording_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run gave.

    Attributes:
        controller: controller name.
        cohort: cohort entry.
        seed: the seed.
        rows: per-patient rows (the columns of :data:`PER_PATIENT_FIELDS`).
        bg_mg_dl: plasma glucose ``(patients, days × 1440 + 1)`` at 1-min samples (float32,
            for the ambulatory glucose profiles); ``None`` when the run failed.
        error: ``None``, or the failure (``Type: message``, first line).
        traceback: the failure's traceback text (empty without failure).
        wall_s: seconds the run took in its worker.
        recording: the recording's directory, or ``None`` when not kept.

    """

    controller: str
    cohort: str
    seed: int
    rows: list[dict[str, Any]]
    bg_mg_dl: NDArray[np.float32] | None
    error: str | None = None
    traceback: str = ""
    wall_s: float = 0.0
    recording: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def _read(run_dir: Path, channel: str, columns: list[str]) -> dict[str, NDArray[Any]] | None:
    path = run_dir / "channels" / channel_file(channel)
    if not path.exists():  # a channel without any message has no table
        return None
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def patient_rows(
    run_dir: str | Path, patients: Sequence[str], days: int
) -> tuple[list[dict[str, Any]], NDArray[np.float64]]:
    """Per-patient metrics of a recording (:func:`twinloop.agents.glucose.run.run_cohort`'s layout).

    Args:
        run_dir: the recording.
        patients: patient names, in the order of the run.
        days: simulated days of the run.

    Returns:
        One dict per patient (the metric and extra columns of :data:`PER_PATIENT_FIELDS`) and
        the plasma glucose ``(patients, days × 1440 + 1)``, mg/dL at 1-min samples.

    Raises:
        EvaluationError: a patient's plasma glucose has not ``days × 1440 + 1`` samples.

    """
    run_dir = Path(run_dir)
    n = days * MIN_PER_DAY + 1
    plant = _read(run_dir, "plant->sensor", ["patient", "t_min", "bg_mg_dl"])
    if plant is None:
        raise EvaluationError(f"{run_dir}: no plant->sensor table in the recording")
    bg = np.empty((len(patients), n))
    for i, name in enumerate(patients):
        sel = plant["patient"] == name
        trace = plant["bg_mg_dl"][sel][np.argsort(plant["t_min"][sel], kind="stable")]
        if trace.shape[0] != n:
            raise EvaluationError(
                f"{run_dir}: {name} has {trace.shape[0]} plasma glucose samples, expected {n}"
            )
        bg[i] = trace
    m = glucose_metrics(np.maximum(bg, METRICS_FLOOR_MG_DL), sample_period_min=1.0)
    insulin = _read(run_dir, "actuator->plant", ["patient", "basal_u", "bolus_u"])
    overrides = _read(run_dir, "supervisor->overrides", ["patient", "reason"])
    faults = _read(run_dir, "runtime->faults", ["patient", "agent", "error"])
    from twinloop.agents.glucose.report import (
        intervention_category,  # (matplotlib: imported when needed)
    )

    rows: list[dict[str, Any]] = []
    for i, name in enumerate(patients):
        row: dict[str, Any] = {}
        for f in METRIC_FIELDS:
            value = np.asarray(getattr(m, f))[i]
            row[f] = (
                str(value)
                if f == "cvga_zone"
                else (int(value) if f == "n_samples" else float(value))
            )
        row["minutes_at_floor"] = int((bg[i] < METRICS_FLOOR_MG_DL).sum())
        row["minutes_non_physiological"] = int(non_physiological(bg[i]).sum())
        row["hazard"] = HAZARD if row["minutes_non_physiological"] else ""
        basal = bolus = 0.0
        if insulin is not None:
            sel = insulin["patient"] == name
            basal = float(insulin["basal_u"][sel].sum())
            bolus = float(insulin["bolus_u"][sel].sum())
        row["tdi_u_per_day"] = (basal + bolus) / days
        row["basal_u_per_day"] = basal / days
        row["bolus_u_per_day"] = bolus / days
        counts: collections.Counter[str] = collections.Counter()
        if overrides is not None:
            counts.update(
                intervention_category(str(r))
                for r in overrides["reason"][overrides["patient"] == name]
            )
        row["overrides_total"] = sum(counts.values())
        for category, column in _OVERRIDE_COLUMNS.items():
            row[column] = counts.pop(category, 0)
        row["overrides_other"] = sum(counts.values())
        row["controller_faults"] = row["other_faults"] = 0
        row["first_controller_fault"] = ""
        if faults is not None:
            sel = faults["patient"] == name
            agents, errors = faults["agent"][sel], faults["error"][sel]
            mine = agents == "controller"
            row["controller_faults"] = int(mine.sum())
            row["other_faults"] = int((~mine).sum())
            if mine.any():
                row["first_controller_fault"] = str(errors[mine][0])
        rows.append(row)
    return rows, bg


def run_one(spec: RunSpec) -> RunResult:
    """Run one (controller, cohort, seed) inline and compute its per-patient metrics.

    Never raises for a failure of the run itself: the result then carries ``error``. This is
    the body of one Ray task (and of the inline execution).
    """
    started = time.perf_counter()
    patients = [p.name for p in spec.config.patient_table()]
    scratch = None
    try:
        if spec.recording_dir is None:
            scratch = tempfile.mkdtemp(prefix="twinloop-eval-")
            run_dir = Path(scratch)
        else:
            run_dir = Path(spec.recording_dir)
            if run_dir.exists():  # a previous evaluation's recording
                shutil.rmtree(run_dir)
        run_cohort(spec.config, run_dir, progress=False)
        rows, bg = patient_rows(run_dir, patients, spec.config.days)
    except Exception as exc:  # a failing run is a result, not the end of the evaluation
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return RunResult(
            spec.controller,
            spec.cohort,
            spec.seed,
            [],
            None,
            error=message,
            traceback=traceback.format_exc(limit=8),
            wall_s=time.perf_counter() - started,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return RunResult(
        spec.controller,
        spec.cohort,
        spec.seed,
        rows,
        bg.astype(np.float32),
        wall_s=time.perf_counter() - started,
        recording=spec.recording_dir,
    )


def policy_loop_metrics(
    policy_dir: str | Path,
    patients: tuple[str, ...],
    seeds: tuple[int, ...],
    days: int,
    *,
    scenario: str = "random",
    carb_error: Any = None,
) -> dict[str, float]:
    """Mean clinical metrics of the policy saved in ``policy_dir`` run in the loop.

    One loop run (:func:`twinloop.evaluation.glucose.evaluate.run_one`, inline) per seed over
    ``patients``, controller ``policy:DIR`` behind the safety supervisor: time in range,
    below 70 and 54 mg/dL (%), the supervisor's overrides per patient-day, the patient-runs
    (the clinical evaluation during training, :mod:`twinloop.policies.glucose.clinical_eval`).

    Raises:
        EvaluationError: a run failed (its error is named).

    """
    controller = f"policy:{Path(policy_dir).resolve()}"
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        kwargs: dict[str, Any] = {"scenario": scenario}
        if carb_error is not None:
            kwargs["carb_error"] = carb_error
        config = LoopConfig(
            patients=patients, days=days, seed=seed, controller=controller, **kwargs
        )
        result = run_one(RunSpec(controller, ",".join(patients), seed, config))
        if result.error:
            raise EvaluationError(f"clinical evaluation, seed {seed}: {result.error}")
        rows.extend(result.rows)

    def mean(field: str) -> float:
        return float(np.mean([r[field] for r in rows]))

    return {
        "time_in_range_pct": mean("time_in_range_70_180_pct"),
        "time_below_70_pct": mean("time_below_70_pct"),
        "time_below_54_pct": mean("time_below_54_pct"),
        "supervisor_overrides": mean("overrides_total") / days,
        "patient_runs": float(len(rows)),
    }


def _failed(spec: RunSpec, exc: BaseException) -> RunResult:
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return RunResult(spec.controller, spec.cohort, spec.seed, [], None, error=message)


# --------------------------------------------------------------------------------------------
# Aggregation and the table


def per_patient_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Rows of ``per_patient.csv``: every patient of every run.

    A failed run's patients carry status ``error`` and the message, with empty metrics.
    """
    out: list[dict[str, Any]] = []
    for r in results:
        names = [p.name for p in expand_names([r.cohort])]
        for k, name in enumerate(names):
            key = {
                "controller": r.controller,
                "cohort": r.cohort,
                "seed": r.seed,
                "patient": name,
                "status": "ok" if r.error is None else "error",
                "error": r.error or "",
            }
            values = r.rows[k] if r.error is None else {}
            out.append(key | {f: values.get(f, "") for f in PER_PATIENT_FIELDS if f not in key})
    return out


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def comparison_rows(
    results: Sequence[RunResult], controllers: Sequence[str], protocol: EvaluationProtocol
) -> list[dict[str, Any]]:
    """Rows of ``comparison.csv``: one per cohort and controller, ranked within each cohort.

    Each numeric column is the mean over the successful runs (seeds) of the mean over the
    cohort's patients; ``<column>_sd`` is the sample standard deviation across seeds of the
    cohort mean (``nan`` with fewer than two successful seeds). Controllers are ranked per
    cohort by time in range (higher first), ties (equal at :data:`RANK_DECIMALS` decimals)
    broken by time below 70 mg/dL (lower first); a controller without any successful run comes
    last, unranked.
    """
    by_key = {(r.controller, r.cohort, r.seed): r for r in results}
    out: list[dict[str, Any]] = []
    for cohort in protocol.cohorts:
        rows = []
        for controller in controllers:
            runs = [
                by_key[(controller, cohort, s)]
                for s in protocol.seeds
                if (controller, cohort, s) in by_key
            ]
            ok = [r for r in runs if r.error is None]
            row: dict[str, Any] = {
                "cohort": cohort,
                "controller": controller,
                "rank": "",
                "best": False,
                "runs": len(runs),
                "failed_runs": len(runs) - len(ok),
                "patients": len(ok[0].rows) if ok else 0,
                "first_error": next((r.error for r in runs if r.error), ""),
            }
            for f in NUMERIC_FIELDS:
                seed_means = [float(np.mean([p[f] for p in r.rows])) for r in ok]
                row[f] = float(np.mean(seed_means)) if seed_means else math.nan
                row[f"{f}_sd"] = _sd(seed_means)
            row["patient_runs_at_floor"] = sum(
                1 for r in ok for p in r.rows if p["minutes_at_floor"] > 0
            )
            row["patient_runs_non_physiological"] = sum(
                1 for r in ok for p in r.rows if p["minutes_non_physiological"] > 0
            )
            row["patients_with_controller_faults"] = sum(
                1 for r in ok for p in r.rows if p["controller_faults"] > 0
            )
            rows.append(row)
        ranked = sorted(
            (r for r in rows if r["failed_runs"] < r["runs"]),
            key=lambda r: (
                -round(r["time_in_range_70_180_pct"], RANK_DECIMALS),
                round(r["time_below_70_pct"], RANK_DECIMALS),
            ),
        )
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i
            r["best"] = i == 1
        out.extend(ranked + [r for r in rows if r["rank"] == ""])
    return out


def _fmt(value: float, sd: float, decimals: int) -> str:
    if math.isnan(value):
        return "—"
    text = f"{value:.{decimals}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:.{decimals}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], protocol: EvaluationProtocol) -> str:
    """The comparison as a Markdown table, one block of rows per cohort, ranked.

    ``★`` and bold mark each cohort's best controller; ``†`` a controller that raised (or
    overran its deadline) during runs, the supervisor's safe command standing in; ``✖`` runs
    that failed as a whole (their error follows the table).
    """
    seeds = ", ".join(map(str, protocol.seeds))
    lines = [
        f"Protocol **{protocol.name}**: {protocol.days} day(s), seeds {seeds}, "
        f"{protocol.scenario} meals with {protocol.carb_error.kind} ±"
        f"{100 * protocol.carb_error.magnitude:g} % carb-counting error, CGM "
        f"{'with' if protocol.cgm.noise else 'without'} noise, control every "
        f"{protocol.control_period_min} min; the twin and the MPC plan on the model "
        f"`{protocol.model}` (`NAME@MODEL`: on `MODEL`). Each cell: mean over seeds and "
        "patients of plasma "
        "glucose metrics (1-min samples) ± standard deviation across seeds of the cohort mean. "
        "Ranked per cohort by TIR, ties broken by less time <70 mg/dL; ★ best.",
        "",
        "| cohort | rank | controller | "
        + " | ".join(h for _, h, _ in TABLE_COLUMNS)
        + " | notes |",
        "|" + "---|" * 3 + "---:|" * len(TABLE_COLUMNS) + "---|",
    ]
    notes_below: list[str] = []
    for row in rows:
        name = f"`{row['controller']}`"
        rank = str(row["rank"]) if row["rank"] != "" else "—"
        if row["best"]:
            name, rank = f"**{name}**", f"{rank} ★"
        cells = [_fmt(row[f], row[f"{f}_sd"], d) for f, _, d in TABLE_COLUMNS]
        notes = []
        if row["failed_runs"]:
            notes.append(f"✖ {row['failed_runs']}/{row['runs']} runs failed")
            notes_below.append(
                f"- ✖ `{row['controller']}` on {row['cohort']}: {row['first_error']}"
            )
        if row["patients_with_controller_faults"]:
            notes.append(f"† faults in {row['patients_with_controller_faults']} patient-runs")
        if row["patient_runs_non_physiological"]:
            notes.append(f"‡ {row['patient_runs_non_physiological']} patient-runs COLLAPSED")
        lines.append(
            f"| {row['cohort']} | {rank} | {name} | "
            + " | ".join(cells)
            + f" | {'; '.join(notes)} |"
        )
    if notes_below:
        lines += ["", *notes_below]
    if any(r["patient_runs_non_physiological"] for r in rows):
        lines += [
            "",
            f"‡ plasma glucose fell below {HAZARD_FLOOR_MG_DL:g} mg/dL, out of physiology (the "
            "model's glucose collapsed), in that many patient-runs (`hazard` and "
            "`minutes_non_physiological` in per_patient.csv); minutes below "
            f"{METRICS_FLOOR_MG_DL:g} mg/dL count at that floor in the metrics, which dominates "
            "LBGI.",
        ]
    if any(r["patients_with_controller_faults"] for r in rows):
        lines += [
            "",
            "† the controller raised or overran its deadline at some ticks; the supervisor's "
            "safe command stood in (see `controller_faults` in per_patient.csv).",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Files


def _write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from twinloop.agents.recording import versions

    out = versions()
    for dist in ("twinloop", "ray", "matplotlib", "torch", "stable-baselines3"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def check_doc(path: str | Path) -> str:
    """The text of a Markdown file holding :data:`DOC_BEGIN` then :data:`DOC_END`.

    Raises:
        EvaluationConfigError: the file cannot be read, or lacks the markers (in order).

    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvaluationConfigError(
            "doc", str(path), f"a readable Markdown file ({exc.strerror})"
        ) from None
    begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if begin < 0 or end < begin:
        raise EvaluationConfigError(
            "doc", str(path), f"a Markdown file holding the lines {DOC_BEGIN} and {DOC_END}"
        )
    return text


def update_doc(path: str | Path, table: str, *, command: str, wall_time_s: float) -> None:
    """Replace the block between :data:`DOC_BEGIN` and :data:`DOC_END` in a Markdown file.

    The block receives the command that produced the results, the date, the wall time and the
    table.

    Raises:
        EvaluationConfigError: the file cannot be read, or lacks the markers (in order).

    """
    text = check_doc(path)
    begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    block = (
        f"{DOC_BEGIN}\n\n"
        f"Produced on {today} in {wall_time_s / 60:.1f} min of wall time by\n\n"
        f"```sh\n{command}\n```\n\n{table}\n"
    )
    Path(path).write_text(text[:begin] + block + text[end:], encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas: no display needed)

#: Colours of the glucose bands, lowest first (the usual AGP palette).
_BAND_COLOURS = ("#8b0000", "#e03c31", "#4caf50", "#f5b700", "#e67e22")
_BAND_LABELS = ("<54", "54–70", "70–180", "180–250", ">250")
_CONTROLLER_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

#: CVGA plot limits (Magni 2008): minimum BG from 110 down to 50, maximum BG 110 to 400 mg/dL.
_CVGA_X_MG_DL = (110.0, 50.0)
_CVGA_Y_MG_DL = (110.0, 400.0)


def _figure(n_panels: int, *, width_in: float, height_in: float) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in * n_panels, height_in), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False, sharey=True)[0]
    return fig, list(axes)


def _suptitle(fig: Any, text: str, **kwargs: Any) -> Any:
    """Give ``fig`` the title ``text``, wrapped onto as many lines as it needs to fit the figure.

    Constrained layout makes room for a title above the panels but never widens the figure, so
    a title longer than a narrow figure (one cohort and two controllers: 2.6 in) was clipped on
    both sides. Returns the title's ``Text``.
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    title = fig.suptitle(text, **kwargs)
    renderer = FigureCanvasAgg(fig).get_renderer()
    room = 0.96 * fig.bbox.width
    for lines in range(1, len(text.split()) + 1):
        title.set_text(textwrap.fill(text, width=math.ceil(len(text) / lines)))
        if title.get_window_extent(renderer).width <= room:
            break
    return title


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _label(controller: str) -> str:
    """A controller's name in a plot: ``policy:PATH`` shortened to the file name."""
    if controller.startswith(POLICY_PREFIX):
        return POLICY_PREFIX + Path(controller[len(POLICY_PREFIX) :]).name
    return controller


def _colour(i: int) -> str:
    return _CONTROLLER_COLOURS[i % len(_CONTROLLER_COLOURS)]


def _plot_time_in_ranges(
    path: Path,
    comparison: Sequence[Mapping[str, Any]],
    controllers: Sequence[str],
    protocol: EvaluationProtocol,
) -> Path:
    return _save(time_in_ranges_figure(comparison, controllers, protocol), path)


def time_in_ranges_figure(
    comparison: Sequence[Mapping[str, Any]],
    controllers: Sequence[str],
    protocol: EvaluationProtocol,
) -> Any:
    """The figure of ``time_in_ranges.png``: stacked bands per controller, a panel per cohort.

    Everything drawn lies inside the figure (the title wrapped to its width, the legend and
    tick labels placed by constrained layout).
    """
    n = len(protocol.cohorts)  # at least 4.8 in wide in all: the legend takes ~1.2 in
    fig, axes = _figure(n, width_in=max(4.8 / n, 2.6, 1.0 * len(controllers)), height_in=4.2)
    by_key = {(r["controller"], r["cohort"]): r for r in comparison}
    for ax, cohort in zip(axes, protocol.cohorts, strict=True):
        x = np.arange(len(controllers))
        bottom = np.zeros(len(controllers))
        for band in range(5):
            heights = []
            for c in controllers:
                r = by_key[(c, cohort)]
                v54, v70 = r["time_below_54_pct"], r["time_below_70_pct"]
                v180, v250 = r["time_above_180_pct"], r["time_above_250_pct"]
                heights.append(
                    (v54, v70 - v54, r["time_in_range_70_180_pct"], v180 - v250, v250)[band]
                )
            h = np.nan_to_num(np.array(heights, dtype=np.float64))
            ax.bar(
                x, h, bottom=bottom, color=_BAND_COLOURS[band], label=_BAND_LABELS[band], width=0.7
            )
            bottom += h
        for i, c in enumerate(controllers):
            tir = by_key[(c, cohort)]["time_in_range_70_180_pct"]
            label = "failed" if math.isnan(tir) else f"{tir:.1f}"
            ax.text(i, 50, label, ha="center", va="center", color="white", fontsize=8, rotation=90)
        ax.set_xticks(x, [_label(c) for c in controllers], rotation=30, ha="right", fontsize=8)
        ax.set_title(cohort)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("time in range, % (plasma glucose, mg/dL bands)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right center", fontsize=8, title="mg/dL")
    _suptitle(fig, f"Time in ranges — {protocol.name} (mean over seeds and patients)")
    return fig


def _plot_agp(
    path: Path,
    cohort: str,
    results: Sequence[RunResult],
    controllers: Sequence[str],
    protocol: EvaluationProtocol,
) -> Path:
    from twinloop.agents.glucose.report import ambulatory_glucose_profile

    fig, axes = _figure(len(controllers), width_in=3.6, height_in=3.6)
    for i, (ax, controller) in enumerate(zip(axes, controllers, strict=True)):
        traces = [
            r.bg_mg_dl[:, :-1]
            for r in results
            if r.controller == controller and r.cohort == cohort and r.bg_mg_dl is not None
        ]
        ax.axhspan(70, 180, color="#4caf50", alpha=0.08)
        for level in (54, 70, 180, 250):
            ax.axhline(level, color="#999999", lw=0.6, ls=":" if level in (54, 250) else "--")
        ax.set_title(_label(controller), fontsize=9)
        ax.set_xlim(0, 24)
        ax.set_xticks(range(0, 25, 6))
        ax.set_xlabel("time of day, h")
        if not traces:
            ax.text(12, 200, "no successful run", ha="center")
            continue
        agp = ambulatory_glucose_profile(np.concatenate(traces).astype(np.float64))
        h = agp.hour_of_day
        colour = _colour(i)
        ax.fill_between(
            h, agp.p5_mg_dl, agp.p95_mg_dl, color=colour, alpha=0.15, lw=0, label="5–95 %"
        )
        ax.fill_between(
            h, agp.p25_mg_dl, agp.p75_mg_dl, color=colour, alpha=0.35, lw=0, label="25–75 %"
        )
        ax.plot(h, agp.median_mg_dl, color=colour, lw=1.6, label="median")
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("plasma glucose, mg/dL")
    axes[0].set_ylim(30, 350)
    _suptitle(
        fig,
        f"Ambulatory glucose profile — {cohort}, {protocol.name} "
        f"({len(protocol.seeds)} seed(s) × patients × {protocol.days} day(s) pooled)",
        fontsize=10,
    )
    return _save(fig, path)


def _plot_cvga(
    path: Path,
    results: Sequence[RunResult],
    controllers: Sequence[str],
    protocol: EvaluationProtocol,
) -> Path:
    fig, axes = _figure(len(protocol.cohorts), width_in=4.0, height_in=4.0)
    for ax, cohort in zip(axes, protocol.cohorts, strict=True):
        for x in (90.0, 70.0):
            ax.axvline(x, color="#666666", lw=0.8)
        for y in (180.0, 300.0):
            ax.axhline(y, color="#666666", lw=0.8)
        for text, x, y in (
            ("A", 100, 145),
            ("B", 80, 240),
            ("C", 100, 350),
            ("D", 60, 240),
            ("E", 60, 350),
            ("C", 60, 145),
            ("B", 100, 240),
            ("B", 80, 145),
            ("D", 80, 350),
        ):
            ax.text(x, y, text, color="#bbbbbb", fontsize=11, ha="center", va="center")
        for i, controller in enumerate(controllers):
            rows = [
                p
                for r in results
                if r.controller == controller and r.cohort == cohort
                for p in r.rows
            ]
            if not rows:
                continue
            xs = np.clip(np.array([p["cvga_min_bg_mg_dl"] for p in rows]), 50.0, 110.0)
            ys = np.clip(np.array([p["cvga_max_bg_mg_dl"] for p in rows]), 110.0, 400.0)
            ab = sum(p["cvga_zone"] in ("A", "Lower B", "B", "Upper B") for p in rows)
            ax.scatter(
                xs,
                ys,
                s=14,
                color=_colour(i),
                alpha=0.7,
                clip_on=False,
                label=f"{_label(controller)} (A+B {100 * ab / len(rows):.0f} %)",
            )
        ax.set_xlim(*_CVGA_X_MG_DL)
        ax.set_ylim(*_CVGA_Y_MG_DL)
        ax.set_xlabel("minimum BG (2.5th percentile), mg/dL")
        ax.set_title(cohort)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("maximum BG (97.5th percentile), mg/dL")
    _suptitle(fig, f"CVGA — {protocol.name}, one point per patient and seed", fontsize=10)
    return _save(fig, path)


def write_plots(
    plots_dir: Path,
    results: Sequence[RunResult],
    comparison: Sequence[Mapping[str, Any]],
    controllers: Sequence[str],
    protocol: EvaluationProtocol,
) -> list[Path]:
    """Write the evaluation's PNG plots into ``plots_dir``; return their paths.

    ``time_in_ranges.png`` (stacked bands per controller, one panel per cohort),
    ``agp_<cohort>.png`` (5/25/50/75/95th percentiles of plasma glucose by time of day, pooled
    over seeds, patients and days, one panel per controller) and ``cvga.png``.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _plot_time_in_ranges(plots_dir / "time_in_ranges.png", comparison, controllers, protocol)
    ]
    for cohort in protocol.cohorts:
        paths.append(
            _plot_agp(
                plots_dir / f"agp_{_slug(cohort)}.png", cohort, results, controllers, protocol
            )
        )
    paths.append(_plot_cvga(plots_dir / "cvga.png", results, controllers, protocol))
    return paths


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` wrote and computed.

    Attributes:
        out_dir: the output directory.
        results: every run, in the order controller, cohort, seed.
        comparison: the rows of ``comparison.csv``.
        table: the Markdown table (``results.md``).
        wall_time_s: seconds of the whole evaluation.
        files: every file written (recordings excepted).

    """

    out_dir: Path
    results: tuple[RunResult, ...]
    comparison: list[dict[str, Any]]
    table: str
    wall_time_s: float
    files: tuple[Path, ...]

    @property
    def failed(self) -> tuple[RunResult, ...]:
        """The runs that failed as a whole."""
        return tuple(r for r in self.results if r.error is not None)

    @property
    def hazards(self) -> list[dict[str, Any]]:
        """The flagged patient-runs (:data:`HAZARD`): controller, cohort, seed, patient, minutes."""
        return hazard_patient_runs(self.results)


#: The ``hazard`` of a patient-run whose plasma glucose fell below
#: :data:`twinloop.agents.glucose.run.HAZARD_FLOOR_MG_DL` or was not a number.
HAZARD = "non-physiological"


def hazard_patient_runs(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Every flagged patient-run of ``results``, in their order."""
    return [
        {
            "controller": row["controller"],
            "cohort": row["cohort"],
            "seed": row["seed"],
            "patient": row["patient"],
            "minutes_non_physiological": row["minutes_non_physiological"],
        }
        for row in per_patient_rows(results)
        if row["hazard"]
    ]


def split_model(controller: str) -> tuple[str, str | None]:
    """``NAME@MODEL`` → ``(NAME, MODEL)``; without a valid model suffix ``(name, None)``."""
    name, at, model = controller.rpartition("@")
    if at and name:
        try:
            return name, parse_model(model).spec
        except ConfigError:
            pass
    return controller, None


def check_controllers(controllers: Sequence[str]) -> None:
    """Validate the controller names (known, distinct; policy files exist).

    Raises:
        EvaluationConfigError: names the bad controller and lists what is allowed.

    """
    if not controllers:
        raise EvaluationConfigError("controller", list(controllers), "at least one controller")
    for full in controllers:
        name, _ = split_model(full)
        allowed = check_controller_name(name)
        if allowed is not None:
            raise EvaluationConfigError("controller", full, f"{allowed}; optionally @MODEL")
        if (
            name.startswith(POLICY_PREFIX)
            and not resolve_policy(name[len(POLICY_PREFIX) :]).exists()
        ):
            raise EvaluationConfigError(
                "controller", name, "policy:PATH of an existing file, or a shipped policy's name"
            )
    if len(set(controllers)) != len(controllers):
        raise EvaluationConfigError("controller", list(controllers), "distinct names")


def _execute(
    specs: Sequence[RunSpec],
    *,
    use_ray: bool,
    address: str | None,
    workers: int | None,
    progress: bool,
) -> dict[RunSpec, RunResult]:
    done: dict[RunSpec, RunResult] = {}
    started_here = False
    if use_ray:
        import ray

        from twinloop.agents.placement import ray_status_line, start_ray, stop_ray

        started_here = not ray.is_initialized()
        if started_here:
            if progress:  # the seconds before the bar starts are Ray's, not the runs'
                print(ray_status_line("evaluate", address), file=sys.stderr, flush=True)
            start_ray(address, num_cpus=workers if address is None else None)
    from twinloop.agents.progress import STARTING, counting_from_first

    bar = tqdm(
        total=len(specs), unit="run", desc="evaluate" + STARTING, disable=not progress, smoothing=0
    )
    advance = counting_from_first(bar, "evaluate")  # the workers' start is not the runs'

    def finished(spec: RunSpec, result: RunResult) -> None:
        done[spec] = result
        bar.set_postfix_str(
            f"{spec.controller}/{spec.cohort}/seed {spec.seed}"
            + (" FAILED" if result.error else ""),
            refresh=False,
        )
        advance(1)

    try:
        if not use_ray:
            for spec in specs:
                finished(spec, run_one(spec))
            return done
        remote = ray.remote(run_one).options(num_cpus=1, max_retries=1)
        cap = workers or len(specs)
        queue = collections.deque(specs)
        inflight: dict[Any, RunSpec] = {}
        try:
            while queue or inflight:
                while queue and len(inflight) < cap:
                    spec = queue.popleft()
                    inflight[remote.remote(spec)] = spec
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    spec = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the worker died (or the task was lost)
                        result = _failed(spec, exc)
                    finished(spec, result)
        except BaseException:
            for ref in inflight:
                ray.cancel(ref, force=True)
            raise
    finally:
        bar.close()
        if started_here:
            stop_ray()
    return done


def evaluate(
    controllers: list[str],
    protocol: EvaluationProtocol | str | Path | None,
    out_dir: str | Path,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    *,
    recordings: bool = True,
    use_ray: bool = True,
    command: str | None = None,
    plots: bool = True,
) -> EvaluationResult:
    """Run every controller × cohort × seed of ``protocol`` and write the results.

    Args:
        controllers: controller names (``basal-bolus``, ``pid``, ``oref0``, ``mpc``,
            ``policy:PATH``), in the order of the reports.
        protocol: a protocol, a shipped protocol's name, a YAML file, or ``None`` for
            :data:`DEFAULT_PROTOCOL`.
        out_dir: where the results go (created; files of an earlier evaluation are replaced).
        address: HOST:PORT of an existing Ray cluster; default an embedded Ray on 127.0.0.1
            (usage statistics off), started here and shut down at the end. A Ray already
            initialized in this process is used as it is.
        workers: at most this many runs at once (and the embedded Ray's CPUs); default all
            CPUs. The numbers do not depend on it.
        progress: show a progress bar over finished runs (with ETA), on stderr.
        recordings: keep each run's recording under ``out_dir/runs`` (about 4 MB per 10
            patient-weeks); ``False`` records into temporary directories. With ``address``,
            recordings are written by the workers on their own nodes.
        use_ray: ``False`` runs everything in this process, one run after another.
        command: the command line to put in the manifest.
        plots: write the PNG plots.

    Returns:
        The results (see :class:`EvaluationResult`).

    Raises:
        EvaluationConfigError: bad controllers or workers.
        ProtocolError: the protocol does not load or validate.
        twinloop.agents.placement.PlacementError: Ray cannot be started or reached.

    """
    t0 = time.perf_counter()
    started_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    controllers = list(controllers)
    check_controllers(controllers)
    if workers is not None and not (_is_int(workers) and workers >= 1):
        raise EvaluationConfigError("workers", workers, "an integer >= 1")
    if not isinstance(protocol, EvaluationProtocol):
        protocol = load_protocol(protocol)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fitted = None
    if "fit" in (protocol.model, *(split_model(c)[1] for c in controllers)):
        from twinloop.twins.individualize import fitted_model

        # each patient's twin, from fit_days of a synthesized log of their usual therapy
        fitted = fitted_model(
            list(protocol.cohorts), out / TWINS_DIR, days=protocol.fit_days, address=address,
            inline=not use_ray, workers=workers, progress=progress,
        )  # fmt: skip
    specs = [
        RunSpec(
            controller,
            cohort,
            seed,
            protocol.loop_config(controller, cohort, seed, fitted=fitted),
            str((out / RUNS_DIR / _slug(controller) / _slug(cohort) / f"seed-{seed}").resolve())
            if recordings
            else None,
        )
        for controller in controllers
        for cohort in protocol.cohorts
        for seed in protocol.seeds
    ]
    done = _execute(specs, use_ray=use_ray, address=address, workers=workers, progress=progress)
    results = tuple(done[s] for s in specs)
    comparison = comparison_rows(results, controllers, protocol)
    table = markdown_table(comparison, protocol)
    files = [out / PER_PATIENT_FILE, out / COMPARISON_FILE, out / RESULTS_FILE]
    _write_csv(files[0], PER_PATIENT_FIELDS, per_patient_rows(results))
    comparison_fields = [
        *("cohort", "controller", "rank", "best", "runs", "failed_runs", "patients"),
        *(c for f in NUMERIC_FIELDS for c in (f, f"{f}_sd")),
        "patient_runs_at_floor",
        "patient_runs_non_physiological",
        "patients_with_controller_faults",
        "first_error",
    ]
    _write_csv(files[1], comparison_fields, comparison)
    files[2].write_text(f"# Evaluation: {', '.join(controllers)}\n\n{table}", encoding="utf-8")
    if plots:
        files += write_plots(out / PLOTS_DIR, results, comparison, controllers, protocol)
    wall = time.perf_counter() - t0
    manifest = {
        "protocol": protocol.to_dict(),
        "controllers": controllers,
        "command": command,
        "started_utc": started_utc,
        "wall_time_s": wall,
        "execution": ("ray " + (address or "embedded")) if use_ray else "inline",
        "workers": workers,
        "recordings": recordings,
        "versions": _versions(),
        "python_implementation": platform.python_implementation(),
        "git_revision": git_output("rev-parse", "HEAD"),
        "git_dirty": bool(git_output("status", "--porcelain", "--untracked-files=no")),
        "runs": [
            {
                "controller": r.controller,
                "cohort": r.cohort,
                "seed": r.seed,
                "status": "ok" if r.error is None else "error",
                "error": r.error,
                "traceback": r.traceback or None,
                "wall_s": r.wall_s,
                "recording": r.recording,
            }
            for r in results
        ],
        "hazard_floor_mg_dl": HAZARD_FLOOR_MG_DL,
        "hazard_patient_runs": hazard_patient_runs(results),
        "files": [str(p.relative_to(out)) for p in files],
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
    files.append(out / MANIFEST_FILE)
    return EvaluationResult(out, results, comparison, table, wall, tuple(files))
