"""Individualize a cohort: one fitted twin per patient, from a log of that patient's life.

:func:`individualize` is the path behind a loop's ``model: fit``: for each patient it takes a log
— ``days`` days of the patient's life under their usual basal-bolus therapy with a CGM
(:func:`twinloop.twins.synthetic.synthetic_log`, seeded per patient from ``seed``), or a real
log given for that patient — fits the patient's twin to all of it
(:func:`twinloop.twins.person.fit_log`: the prior of the patient's age group, the clinical
settings a clinic knows as overrides) and writes a directory a loop reads as ``twin:DIR``::

    DIR/adult#001.yaml         the twin (twinloop.twins.identify.write_twin), one per patient
    DIR/logs/adult#001.csv     the log it was fitted to
    DIR/individualize.json     the manifest: days, seed, versions, per patient the fit's RMSE,
                               time, convergence and (synthetic logs) fitted vs true parameters

The fits run as Ray tasks (:func:`twinloop.twins.person.fit_many`: embedded Ray bound to
loopback, or a cluster at ``address``) or inline, one by one. Every file is written atomically
(a temporary file, then a rename); the manifest is rewritten after each twin, so an interrupted
run keeps the twins it finished. A patient whose twin in ``out_dir`` was fitted from the same log
(same days, seed and patient for a synthetic log; the same bytes for a given one) with the same
settings is reused, not fitted again (:attr:`PatientTwin.reused`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.cohorts import (
    POPULATION_PREFIX,
    expand_names,
    load_population,
    population_tokens,
)
from twinloop.plant.glucose.models import FIT_LOG_DAYS, FIT_LOG_SEED
from twinloop.plant.glucose.patients import COHORTS, PatientParameters, cohort, patient_key
from twinloop.plant.glucose.twin_model import TWIN_FORMAT, TwinFit, write_twin
from twinloop.twins.person import FitRequest, fit_many
from twinloop.twins.synthetic import synthetic_log

__all__ = [
    "CLINICAL_SETTINGS",
    "KEY_PARAMETERS",
    "MANIFEST",
    "IndividualizeResult",
    "PatientTwin",
    "fitted_model",
    "individualize",
    "log_seed",
    "twin_path",
]

#: The manifest's file name in the output directory.
MANIFEST = "individualize.json"
#: Format of the manifest (and of the reuse key: a change refits).
MANIFEST_FORMAT = 1
#: The patient's settings a clinic knows, given to the fit (``FitRequest.overrides``): body
#: weight and age (the prior's base), the pump's scheduled basal (the rate that holds basal
#: glucose), carb ratio and correction factor (the therapy the twin carries). The total daily
#: insulin is taken from the log.
CLINICAL_SETTINGS = (
    "body_weight_kg",
    "age_years",
    "basal_u_per_h",
    "carb_ratio_g_per_u",
    "correction_factor_mg_dl_per_u",
)
#: Fitted parameters compared with the truth for synthetic patients (``f``: the bioavailability,
#: the group's mean times the fitted meal scale).
KEY_PARAMETERS = (
    "vmx_mg_per_kg_min_per_pmol_l",
    "kp3_mg_per_kg_min_per_pmol_l",
    "glucose_basal_mg_dl",
    "egp_basal_mg_per_kg_min",
    "p2u_per_min",
    "kabs_per_min",
    "kd_per_min",
    "body_weight_kg",
    "f",
)


def log_seed(seed: int, name: str) -> int:
    """The seed of a patient's synthetic log, from ``seed`` and the patient alone.

    ``SeedSequence(seed, spawn_key=(patient_key(name),))``: the same whatever other patients the
    call has.
    """
    ss = np.random.SeedSequence(seed, spawn_key=(patient_key(name),))
    return int(ss.generate_state(1)[0])


def twin_path(out_dir: str | Path, name: str) -> Path:
    """Where a patient's twin is: ``out_dir/<name>.yaml`` (the exact name, ``#`` kept)."""
    return Path(out_dir) / f"{name}.yaml"


@dataclasses.dataclass(frozen=True)
class PatientTwin:
    """One patient's twin as :func:`individualize` left it.

    Attributes:
        name: the patient's name.
        group: the prior's age group (from the patient's cohort).
        twin: the twin's file.
        log: the log it was fitted to (a copy in ``out_dir/logs``, or a given directory).
        source: ``synthetic`` or ``log`` (a given log).
        reused: the twin was already in ``out_dir`` for the same log and settings: not refitted.
        rmse_mg_dl: the fit's CGM RMSE.
        seconds: the fit's time (of the earlier fit when reused).
        converged: the optimiser's verdict.
        parameters: for a synthetic log, each of :data:`KEY_PARAMETERS`: ``fitted``, ``true``
            and ``error_pct``; empty for a given log (its truth is unknown).

    """

    name: str
    group: str
    twin: Path
    log: Path
    source: str
    reused: bool
    rmse_mg_dl: float
    seconds: float
    converged: bool
    parameters: dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class IndividualizeResult:
    """What :func:`individualize` wrote.

    Attributes:
        out_dir: the directory (``twin:DIR`` for a loop).
        manifest: ``out_dir/individualize.json``.
        patients: one entry per patient, in the order asked.
        stages: wall time of each stage, s (``synthesize``, ``ray_start``, ``fit``, ``total``).

    """

    out_dir: Path
    manifest: Path
    patients: tuple[PatientTwin, ...]
    stages: dict[str, float]

    @property
    def fitted(self) -> tuple[str, ...]:
        """Patients fitted by this call."""
        return tuple(p.name for p in self.patients if not p.reused)

    @property
    def reused(self) -> tuple[str, ...]:
        """Patients whose twin was reused."""
        return tuple(p.name for p in self.patients if p.reused)

    def table(self) -> str:
        """A short table: patient, fit RMSE, seconds, reused or fitted."""
        head = ("patient", "RMSE mg/dL", "fit s", "twin")
        rows = [
            (
                p.name,
                f"{p.rmse_mg_dl:.1f}",
                f"{p.seconds:.1f}",
                "reused" if p.reused else ("fitted" if p.converged else "fitted (not converged)"),
            )
            for p in self.patients
        ]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (head, *rows)
        )


# --------------------------------------------------------------------------------------------
# files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha256_log(path: Path) -> str:
    """A log's digest: the file's bytes, or a directory's files (relative names and bytes)."""
    if path.is_file():
        return _sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from twinloop.agents.recording import versions

    out = versions()
    for dist in ("twinloop", "ray"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    """The previous run's per-patient entries (empty when there is none or it is unreadable)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("twinloop_individualize") != MANIFEST_FORMAT:
        return {}
    patients = doc.get("patients")
    return patients if isinstance(patients, dict) else {}


# --------------------------------------------------------------------------------------------
# the plan: what each patient's twin is fitted from


@dataclasses.dataclass(frozen=True)
class _Plan:
    patient: PatientParameters
    group: str
    overrides: dict[str, float]
    given: Path | None  # a given log, or None for a synthetic one
    seed: int | None  # the synthetic log's seed
    key: str  # digest of everything the twin depends on

    @property
    def source(self) -> str:
        return "synthetic" if self.given is None else "log"


def _settings(patient: PatientParameters) -> dict[str, float]:
    out = {}
    for name in CLINICAL_SETTINGS:
        value = float(getattr(patient, name))
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{patient.name}.{name}", value, "a known setting > 0")
        out[name] = value
    return out


def _plan(
    patient: PatientParameters, *, days: int, seed: int, given: Path | None, tz: str | None
) -> _Plan:
    overrides = _settings(patient)
    spec: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "twin_format": TWIN_FORMAT,
        "group": patient.cohort,
        "overrides": overrides,
    }
    s = None
    if given is None:
        s = log_seed(seed, patient.name)
        params = {
            f.name: getattr(patient, f.name)
            for f in dataclasses.fields(patient)
            if f.name != "name"
        }
        spec |= {"days": days, "seed": seed, "log_seed": s, "patient": repr(sorted(params.items()))}
    else:
        spec |= {"log_sha256": _sha256_log(given), "tz": tz}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return _Plan(patient, patient.cohort, overrides, given, s, key)


def _reusable(entry: Any, plan: _Plan, out_dir: Path) -> bool:
    if not isinstance(entry, dict) or entry.get("key") != plan.key or "error" in entry:
        return False
    twin = out_dir / str(entry.get("twin", ""))
    log = out_dir / str(entry.get("log", ""))
    try:
        return (
            twin.is_file()
            and _sha256_file(twin) == entry.get("twin_sha256")
            and (plan.given is not None or log.is_file())
        )
    except OSError:
        return False


def _truth(fit: TwinFit, patient: PatientParameters) -> dict[str, dict[str, float]]:
    fitted = {k: v["map"] for k, v in fit.parameters().items()}
    fitted["f"] = fit.model.base["f"] * fitted["meal_scale"]
    out = {}
    for name in KEY_PARAMETERS:
        true = float(getattr(patient, name))
        out[name] = {
            "fitted": fitted[name],
            "true": true,
            "error_pct": 100.0 * (fitted[name] / true - 1.0),
        }
    return out


def _expand(item: str, names: Sequence[str]) -> tuple[PatientParameters, ...]:
    """One name's patients (a cohort, a population file, or one patient of either)."""
    if item in COHORTS:
        return cohort(item)
    if item.startswith(POPULATION_PREFIX):
        return load_population(item)
    found = expand_names([item, *population_tokens(names)], field="patients")
    return tuple(p for p in found if p.name == item)


def _patients(patients: Sequence[PatientParameters | str]) -> tuple[PatientParameters, ...]:
    """Patients and names (expanded), in the order given, without repeats."""
    if isinstance(patients, str | PatientParameters):
        patients = [patients]
    names = [p for p in patients if isinstance(p, str)]
    chosen: dict[str, PatientParameters] = {}
    for item in patients:
        if isinstance(item, PatientParameters):
            group: tuple[PatientParameters, ...] = (item,)
        elif isinstance(item, str):
            group = _expand(item, names)
        else:
            raise ConfigError("patients", item, "patient or cohort names, or PatientParameters")
        for p in group:
            chosen.setdefault(p.name, p)
    if not chosen:
        raise ConfigError("patients", list(patients), "at least one patient or cohort")
    return tuple(chosen.values())


# --------------------------------------------------------------------------------------------
# the path


def _check_int(field: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ConfigError(field, value, f"an integer >= {least}")
    return int(value)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path.resolve())


def _write_log(plan: _Plan, out: Path, days: int) -> Path:
    """The log the twin is fitted to, in ``out/logs`` (a given directory stays where it is)."""
    name = plan.patient.name
    if plan.given is None:
        assert plan.seed is not None
        log = synthetic_log(plan.patient, days=days, seed=plan.seed)
        path = out / "logs" / f"{name}.csv"
        _atomic_write(path, log.csv_text.encode("utf-8"))
        return path
    if plan.given.is_dir():
        return plan.given.resolve()
    path = out / "logs" / f"{name}{plan.given.suffix}"
    if not (path.exists() and path.resolve() == plan.given.resolve()):
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, plan.given.read_bytes())
    return path


def _entry(
    plan: _Plan, fit: TwinFit, twin: Path, log: Path, out: Path, days: int, seed: int
) -> dict[str, Any]:
    f = fit.fit
    return {
        "twin": _relative(twin, out),
        "twin_sha256": _sha256_file(twin),
        "log": _relative(log, out),
        "log_sha256": _sha256_log(log),
        "source": plan.source,
        "group": plan.group,
        "days": days if plan.given is None else None,
        "seed": seed if plan.given is None else None,
        "log_seed": plan.seed,
        "fitted_days": f["minutes"] / 1440.0,
        "overrides": plan.overrides,
        "rmse_mg_dl": f["rmse_mg_dl"],
        "seconds": f["seconds"],
        "converged": f["converged"],
        "iterations": f["iterations"],
        "cgm_readings": f["cgm_readings"],
        "parameters": _truth(fit, plan.patient) if plan.given is None else {},
        "key": plan.key,
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _result(name: str, entry: Mapping[str, Any], out: Path, reused: bool) -> PatientTwin:
    return PatientTwin(
        name=name,
        group=str(entry["group"]),
        twin=out / str(entry["twin"]),
        log=out / str(entry["log"]),
        source=str(entry["source"]),
        reused=reused,
        rmse_mg_dl=float(entry["rmse_mg_dl"]),
        seconds=float(entry["seconds"]),
        converged=bool(entry["converged"]),
        parameters=dict(entry["parameters"]),
    )


def individualize(
    patients: Sequence[PatientParameters | str],
    out_dir: str | Path,
    *,
    days: int = 7,
    seed: int = 0,
    logs: Mapping[str, str | Path] | None = None,
    tz: str | None = None,
    address: str | None = None,
    inline: bool = False,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> IndividualizeResult:
    """Fit each patient's twin from a log of their life; write ``out_dir`` (see the module).

    Args:
        patients: patients, and patient or cohort names (``adults``, ``adult#001``,
            ``population:PATH``), expanded in order without repeats
            (:func:`twinloop.plant.glucose.cohorts.expand_names`).
        out_dir: the directory to write (created); a loop reads it as ``twin:DIR``.
        days: days of each synthetic log (a given log is fitted on all its days).
        seed: seed of the synthetic logs; each patient's is :func:`log_seed` ``(seed, name)``.
        logs: a real log (a file, or a directory :func:`twinloop.twins.logs.read_log` reads) per
            patient name; the patients without one get a synthetic log.
        tz: IANA zone of naive times in the given logs.
        address: a Ray cluster (default: the embedded Ray, bound to loopback).
        inline: fit in this process, one by one (no Ray).
        workers: parallel fits on Ray (default: the cluster's CPUs).
        force: fit every twin again, even one that could be reused.
        progress: a progress bar on stderr.

    Raises:
        ConfigError: a bad argument (the field, value and what is allowed).
        UnknownPatientError: a name that is neither a patient nor a cohort.
        InvalidInputError: some twins could not be fitted (the others are written; the manifest
            holds each failure's reason).

    """
    began = time.perf_counter()
    days = _check_int("days", days, 1)
    seed = _check_int("seed", seed, 0)
    if workers is not None:
        workers = _check_int("workers", workers, 1)
    if inline and address is not None:
        raise ConfigError("address", address, "no address with inline (fits run in this process)")
    chosen = _patients(patients)
    names = [p.name for p in chosen]
    given: dict[str, Path] = {}
    for name, path in (logs or {}).items():
        if name not in names:
            raise ConfigError("logs", name, f"a log of one of the patients ({', '.join(names)})")
        if not Path(path).exists():
            raise ConfigError(f"logs[{name}]", str(path), "an existing log file or directory")
        given[name] = Path(path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", str(out), "a directory (or a path to create)")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    previous = {} if force else _read_manifest(manifest)
    plans = [_plan(p, days=days, seed=seed, given=given.get(p.name), tz=tz) for p in chosen]
    entries: dict[str, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        entry = previous.get(plan.patient.name)
        if _reusable(entry, plan, out):
            assert isinstance(entry, dict)
            entries[plan.patient.name] = entry
        else:
            todo.append(plan)
    reused = set(entries)
    stages: dict[str, float] = {}
    doc: dict[str, Any] = {
        "twinloop_individualize": MANIFEST_FORMAT,
        "complete": False,
        "days": days,
        "seed": seed,
        "tz": tz,
        "clinical_settings": list(CLINICAL_SETTINGS),
        "versions": _versions(),
        "reused": [n for n in names if n in reused],
        "fitted": [p.patient.name for p in todo],
        "stages_s": stages,
        "patients": {},
    }

    # twins of other patients left in the directory by earlier calls stay listed
    others = {
        n: e
        for n, e in previous.items()
        if n not in names and isinstance(e, dict) and (out / str(e.get("twin", ""))).is_file()
    }

    def save() -> None:
        ordered = {n: entries[n] for n in names if n in entries} | others
        _atomic_write(manifest, json.dumps({**doc, "patients": ordered}, indent=1).encode())

    t = time.perf_counter()
    requests, log_paths = [], {}
    for plan in todo:
        log_paths[plan.patient.name] = path = _write_log(plan, out, days)
        requests.append(
            FitRequest(
                (str(path),),
                name=plan.patient.name,
                group=plan.group,
                tz=tz,
                overrides=dict(plan.overrides),
            )
        )
    stages["synthesize"] = time.perf_counter() - t
    stages["ray_start"] = 0.0
    if requests and not inline:
        from twinloop.agents.placement import ray_status_line, start_ray

        t = time.perf_counter()
        if progress:  # the seconds before the bar starts are Ray's, not the fits'
            print(ray_status_line("twins", address), file=sys.stderr, flush=True)
        start_ray(address)
        stages["ray_start"] = time.perf_counter() - t
    t = time.perf_counter()
    by_name = {p.patient.name: p for p in todo}
    errors: dict[str, str] = {}
    from tqdm import tqdm

    from twinloop.agents.progress import STARTING, counting_from_first

    results = fit_many(requests, inline=inline, address=address, workers=workers)
    with tqdm(  # the average since the first fit (smoothing=0): fits finish in parallel batches
        total=len(requests), unit="twin", desc="twins" + STARTING, smoothing=0, disable=not progress
    ) as bar:
        advance = counting_from_first(bar, "twins")  # the workers' start is not the fits'
        for result in results:
            advance(1)
            name = str(result["name"])
            plan = by_name[name]
            if "error" in result:
                errors[name] = str(result["error"])
                continue
            fit: TwinFit = result["fit"]
            twin = write_twin(
                fit,
                twin_path(out, name),
                extra={
                    "logs": [_relative(log_paths[name], out)],
                    "import_report": result["report"]["counts"],
                    "individualize": {"source": plan.source, "days": days, "seed": seed,
                                      "log_seed": plan.seed, "overrides": plan.overrides},
                },
            )  # fmt: skip
            entries[name] = _entry(plan, fit, twin, log_paths[name], out, days, seed)
            save()
    stages["fit"] = time.perf_counter() - t
    stages["total"] = time.perf_counter() - began
    doc["complete"] = not errors
    doc["errors"] = errors
    save()
    if errors:
        first = next(iter(errors))
        raise InvalidInputError(
            f"{len(errors)} of {len(names)} twins could not be fitted ({first}: "
            f"{errors[first]}); the others are in {out}"
        )
    return IndividualizeResult(
        out_dir=out,
        manifest=manifest,
        patients=tuple(_result(n, entries[n], out, n in reused) for n in names),
        stages=dict(stages),
    )


def fitted_model(
    patients: Sequence[PatientParameters | str],
    out_dir: str | Path,
    *,
    days: int = FIT_LOG_DAYS,
    **options: Any,
) -> str:
    """A loop's ``model: fit`` resolved: each patient's twin fitted into ``out_dir``.

    :func:`individualize` with the logs' own seed (:data:`twinloop.plant.glucose.models.
    FIT_LOG_SEED`, apart from any run's seed); ``options`` are its other keywords. Returns the
    ``twin:DIR`` spec the loop plans on.
    """
    result = individualize(patients, out_dir, days=days, seed=FIT_LOG_SEED, **options)
    return f"twin:{Path(result.out_dir).resolve()}"
