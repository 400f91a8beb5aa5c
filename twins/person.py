"""Twins of real people from their logs: fit (one or many, on Ray), validate, replay therapies.

* :func:`fit_log` — import a log (:func:`twinloop.twins.logs.read_log`), put it on a minute grid,
  take the person's therapy from it (:func:`twinloop.twins.settings.infer_therapy`: basal, carb
  ratio and correction factor with their intervals and sources, or the ones given) and fit a twin
  (:func:`twinloop.twins.identify. fit_twin`), optionally keeping the last days out to validate it
  (:func:`validate`).
* :func:`fit_many` — one fit per log, as Ray tasks on the embedded (loopback) Ray or a cluster,
  or inline.
* :func:`replay` — re-run a log's days on a twin under the logged therapy and an alternative
  (a controller, or changed basal/CR/CF; :mod:`twinloop.twins.replay`), with rescue carbohydrates,
  over posterior draws when the twin has a posterior; reports both therapies' metrics and their
  paired difference, median and 5–95 % over the draws. A controller that plans (the MPC) plans
  through a twin estimator on the replay's model (:data:`REPLAY_MODEL_HELP`), as the loop does:
  by default the replayed twin's MAP, while the plant is the twin's posterior draws. A replay
  that starts later in the log starts from the state each draw's online estimator reaches by
  filtering the log up to then (:func:`filtered_start`). The logged therapy is replayed
  like-for-like, without rescue carbohydrates (the log's carbohydrates hold the person's own);
  the rescue rule applies to the alternative only. :func:`trajectory_table` gives the predicted
  trajectories per minute beside the logged CGM.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from twinloop.agents.glucose.estimator import TwinEstimator
from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.metrics import glucose_metrics
from twinloop.plant.glucose.models import loop_model, parse_model, population_model
from twinloop.plant.glucose.patients import N_STATES, PatientParameters
from twinloop.plant.glucose.twin_model import DEFAULT_BURN_IN_MIN, MIN_PER_DAY, LogGrid, TwinFit
from twinloop.plant.glucose.uva_padova import N_MEAL_STATE
from twinloop.policies.glucose.controllers import (
    PLANNING_CONTROLLERS,
    check_controller_name,
    make_controller,
)
from twinloop.policies.glucose.interface import Controller
from twinloop.twins.identify import fit_twin, log_grid
from twinloop.twins.logs import TherapyLog, read_log
from twinloop.twins.replay import LoggedTherapy, LoopTrace, RescueRule, closed_loop, filter_log
from twinloop.twins.settings import THERAPY_LIMITS, check_setting, infer_therapy

__all__ = [
    "REPLAY_MODEL_HELP",
    "FitRequest",
    "ReplayStart",
    "ReplayTherapy",
    "cgm_metrics",
    "filtered_start",
    "fit_log",
    "fit_many",
    "replay",
    "therapy_from_log",
    "trajectory_table",
    "validate",
]

#: The models a replay's planning controller may plan on (``--model`` of ``twin replay``).
REPLAY_MODEL_HELP = (
    "fit (default: the replayed twin's MAP, fitted from the log), oracle (each posterior "
    "draw's own parameters: an upper bound), population, population:sample or twin:PATH"
)
#: The replay's default model: the twin being replayed.
DEFAULT_REPLAY_MODEL = "fit"
#: ReplayBG's default hypotreatment rule.
DEFAULT_RESCUE = RescueRule()
#: The least a fit needs: days of CGM (at 70 % coverage of the slots of its sampling period).
MIN_FIT_DAYS = 1.0
#: Metrics reported by :func:`validate` and :func:`replay` (GlucoseMetrics fields).
METRICS = (
    "time_in_range_70_180_pct",
    "time_below_70_pct",
    "time_below_54_pct",
    "time_above_180_pct",
    "time_above_250_pct",
    "mean_mg_dl",
)


#: What a twin's time in range is, beside the logged CGM's (the console and docs say it).
TWIN_GLUCOSE_MEANING = (
    "the twin's figures are its modelled sensor glucose (interstitial, without sensor noise) "
    "replaying the logged insulin and carbohydrates; the CGM's include the sensor's noise and "
    "lag and the excursions that the logged carbohydrates do not explain (counting errors, "
    "unlogged food), so the twin usually reads more time in range than the CGM on the same "
    "days: compare therapies on the twin with each other, not the twin with the CGM"
)


def cgm_metrics(grid: LogGrid, first_min: int = 0) -> dict[str, float]:
    """Metrics of the logged CGM readings at minutes ``≥ first_min`` of ``grid`` (+ ``readings``).

    The log's own numbers over the days a twin is scored on: what the person's sensor said,
    beside what the twin predicts (:data:`TWIN_GLUCOSE_MEANING`). NaN when there is no reading.
    """
    cgm = np.asarray(grid.cgm_mg_dl, dtype=np.float64)[first_min:]
    cgm = cgm[~np.isnan(cgm)]
    if not cgm.size:
        return {**dict.fromkeys(METRICS, math.nan), "readings": 0}
    m = glucose_metrics(cgm, sample_period_min=5.0)
    return {**{k: float(getattr(m, k)) for k in METRICS}, "readings": int(cgm.size)}


def therapy_from_log(grid: LogGrid, given: Mapping[str, float] | None = None) -> dict[str, float]:
    """The person's therapy settings as the log shows them: the twin's base values.

    ``total_daily_insulin_u`` (all insulin / days), ``carb_ratio_g_per_u`` and
    ``correction_factor_mg_dl_per_u`` inferred from the log's boluses and their glucose context,
    or the rules of thumb when the log has too few of them, or ``given``
    (:func:`twinloop.twins.settings.infer_therapy`, which also gives each one's interval and
    source).

    Raises:
        ConfigError: no insulin in the log; a given setting out of range.

    """
    return infer_therapy(grid, given=given).values()


@dataclasses.dataclass(frozen=True)
class FitRequest:
    """One person's fit: where the log is and how to fit it.

    Attributes:
        paths: the log's files or directories (merged, :func:`twinloop.twins.logs.read_log`).
        name: the twin's name (default: the first path's stem).
        group: the prior's age group.
        fit_days: fit only the first this many days (default: all but ``validate_days``).
        validate_days: keep the last this many days out and report the twin's fidelity on them.
        profile_blocks: daily insulin-sensitivity blocks (0: none).
        posterior: also compute the Laplace posterior.
        tz: IANA zone of naive times.
        overrides: base values (body weight, age, …; see
            :meth:`twinloop.plant.glucose.twin_model.TwinModel.for_group`), and the settings
            ``basal_u_per_h``, ``carb_ratio_g_per_u``, ``correction_factor_mg_dl_per_u``, which
            replace the ones inferred from the log (each checked against
            :data:`twinloop.twins.settings.THERAPY_LIMITS`).

    """

    paths: tuple[str, ...]
    name: str | None = None
    group: str = "adults"
    fit_days: float | None = None
    validate_days: float = 0.0
    profile_blocks: int = 0
    posterior: bool = False
    tz: str | None = None
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("paths", self.paths, "at least one log file or directory")
        for field in ("fit_days", "validate_days"):
            v = getattr(self, field)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(field, v, "days >= 0")
        if self.fit_days is not None and self.fit_days < 1:
            raise ConfigError("fit_days", self.fit_days, "at least 1 day")
        for field, value in self.overrides.items():
            if field in THERAPY_LIMITS:
                check_setting(field, value)


def fit_log(request: FitRequest) -> tuple[TwinFit, TherapyLog, dict[str, Any] | None]:
    """Import, fit and (with ``validate_days``) validate one person's twin.

    Returns:
        The fit, the imported log (its report included) and the validation (or ``None``).

    Raises:
        LogError: the log cannot be read or is too short (says how much is needed).
        ConfigError: a bad option.

    """
    log = read_log(
        list(request.paths),
        tz=request.tz,
        patient=request.name,
        min_days=MIN_FIT_DAYS + request.validate_days,
    )
    grid = log_grid(log)
    total = grid.minutes
    held = round(request.validate_days * MIN_PER_DAY)
    end = total - held
    if request.fit_days is not None:
        end = min(end, round(request.fit_days * MIN_PER_DAY))
    if end < MIN_FIT_DAYS * MIN_PER_DAY:
        raise ConfigError(
            "fit_days/validate_days",
            f"{end / MIN_PER_DAY:.2f} days left to fit",
            f"at least 1 day to fit (the log spans {grid.days:.2f} days)",
        )
    overrides = dict(request.overrides)
    overrides.pop("basal_u_per_h", None)
    therapy = infer_therapy(grid.window(0, end), given=request.overrides)
    name = request.name or Path(request.paths[0]).stem
    fit = fit_twin(
        grid.window(0, end),
        name=name,
        group=request.group,
        basal_u_per_h=therapy.basal_u_per_h.value,
        profile_blocks=request.profile_blocks,
        posterior=request.posterior,
        overrides={**therapy.values(), **overrides},
    )
    fit = dataclasses.replace(fit, fit={**fit.fit, "therapy": therapy.as_dict()})
    checked = validate(fit, grid, end) if held > 0 else None
    return fit, log, checked


def validate(fit: TwinFit, grid: LogGrid, first_min: int) -> dict[str, Any]:
    """The twin's fidelity on minutes ``≥ first_min`` of ``grid`` (held out of the fit).

    The twin replays the *logged* insulin and meals over the whole grid (from the fit's start,
    so its state at the held-out days is its own); the held-out minutes are scored: CGM RMSE at
    the readings, and the metrics of the twin's glucose against those of the logged CGM.
    """
    sim = fit.model.simulate(fit.z_map[None, :], grid)[0]
    mask = np.arange(grid.minutes + 1) >= first_min
    obs = mask & ~np.isnan(grid.cgm_mg_dl)
    if not obs.any():
        raise ConfigError("validate_days", "no CGM", "held-out days with CGM readings")
    err = sim[obs] - grid.cgm_mg_dl[obs]
    twin = glucose_metrics(sim[obs], sample_period_min=5.0)
    logged = cgm_metrics(grid, first_min)
    logged.pop("readings")
    return {
        "held_out_days": (grid.minutes - first_min) / MIN_PER_DAY,
        "cgm_readings": int(obs.sum()),
        "rmse_mg_dl": float(np.sqrt(np.mean(err**2))),
        "bias_mg_dl": float(np.mean(err)),
        "twin": {k: float(getattr(twin, k)) for k in METRICS},
        "logged_cgm": logged,
        "meaning": TWIN_GLUCOSE_MEANING,
    }


def _fit_task(request: FitRequest) -> dict[str, Any]:
    """A fit as a picklable result (for Ray): the twin's file content, or the error."""
    began = time.perf_counter()
    try:
        fit, log, checked = fit_log(request)
    except (ConfigError, ValueError, OSError) as exc:
        return {"name": request.name, "paths": list(request.paths), "error": str(exc)}
    return {
        "name": fit.model.name,
        "paths": list(request.paths),
        "fit": fit,
        "report": log.report.as_dict(),
        "validation": checked,
        "seconds": time.perf_counter() - began,
    }


def fit_many(
    requests: Sequence[FitRequest],
    *,
    inline: bool = False,
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Fit many people's twins: Ray tasks (embedded loopback Ray, or ``address``), or inline.

    Yields each result as it finishes (see :func:`_fit_task`; an ``error`` key when it failed).
    """
    if inline:
        for r in requests:
            yield _fit_task(r)
        return
    import ray

    from twinloop.agents.placement import start_ray

    start_ray(address)
    n = workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
    remote = ray.remote(_fit_task).options(num_cpus=1, max_retries=0)
    pending = list(reversed(requests))
    in_flight: list[Any] = []
    while pending or in_flight:
        while pending and len(in_flight) < n:
            in_flight.append(remote.remote(pending.pop()))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(ready[0])


# --------------------------------------------------------------------------------------------
# replay


@dataclasses.dataclass(frozen=True)
class ReplayTherapy:
    """The alternative therapy of a replay: a controller, or changes to the logged therapy.

    Attributes:
        controller: a controller name
            (:func:`twinloop.policies.glucose.controllers.make_controller`), or ``None`` for the
            logged therapy with the changes below.
        basal_scale: factor on the logged basal.
        basal_u_per_h: a flat basal replacing the logged one.
        carb_ratio_g_per_u: a new CR (meal boluses recomputed).
        correction_factor_mg_dl_per_u: a new CF.
        model: what a planning controller (the MPC) plans on, through a twin estimator
            (:data:`REPLAY_MODEL_HELP`); the plant is always the twin's draws.

    """

    controller: str | None = None
    basal_scale: float = 1.0
    basal_u_per_h: float | None = None
    carb_ratio_g_per_u: float | None = None
    correction_factor_mg_dl_per_u: float | None = None
    model: str = DEFAULT_REPLAY_MODEL

    def __post_init__(self) -> None:
        try:
            parse_model(self.model)
        except ConfigError:
            raise ConfigError("model", self.model, REPLAY_MODEL_HELP) from None
        if self.controller is not None:
            allowed = check_controller_name(self.controller)
            if allowed is not None:
                raise ConfigError("controller", self.controller, allowed)
            if self.changes():
                raise ConfigError(
                    "controller", self.controller, "either a controller or changed settings"
                )
        for field in ("basal_scale", "basal_u_per_h", "carb_ratio_g_per_u"):
            v = getattr(self, field)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(field, v, "a number > 0")
        cf = self.correction_factor_mg_dl_per_u
        if cf is not None and not (math.isfinite(cf) and cf > 0):
            raise ConfigError("correction_factor_mg_dl_per_u", cf, "a number > 0")
        if self.basal_u_per_h is not None and self.basal_scale != 1.0:
            raise ConfigError("basal_scale", self.basal_scale, "1 when basal_u_per_h is given")

    def changes(self) -> dict[str, float]:
        """The changed settings."""
        out = {}
        if self.basal_scale != 1.0:
            out["basal_scale"] = self.basal_scale
        for field in ("basal_u_per_h", "carb_ratio_g_per_u", "correction_factor_mg_dl_per_u"):
            v = getattr(self, field)
            if v is not None:
                out[field] = v
        return out

    @property
    def plans(self) -> bool:
        """Whether the controller plans on a model (and so uses :attr:`model`)."""
        return self.controller in PLANNING_CONTROLLERS

    def label(self) -> str:
        """A short name for tables."""
        if self.controller is not None:
            if self.plans:
                return f"{self.controller}@{self.model}"
            return self.controller
        changes = self.changes()
        if not changes:
            return "logged"
        return "logged with " + ", ".join(f"{k}={v:g}" for k, v in changes.items())


def replay_models(fit: TwinFit, zs: NDArray[np.float64], spec: str) -> list[PatientParameters]:
    """The model each draw's planning controller plans on (see :data:`REPLAY_MODEL_HELP`).

    Raises:
        ConfigError: not a replay model.
        InvalidInputError: a ``twin:PATH`` that cannot be read.

    """
    try:
        choice = parse_model(spec)
    except ConfigError:
        raise ConfigError("model", spec, REPLAY_MODEL_HELP) from None
    if choice.kind == "oracle":
        return [fit.model.patient(z) for z in zs]
    twin = fit.patient
    if choice.kind == "fit":
        return [twin] * zs.shape[0]
    if choice.kind == "population":  # the person's name need not tell their age group
        model = population_model(twin, sample=choice.sample, group=fit.model.group)
        return [model] * zs.shape[0]
    return [loop_model(choice, twin)] * zs.shape[0]


def _controllers(
    fit: TwinFit,
    zs: NDArray[np.float64],
    grid: LogGrid,
    therapy: ReplayTherapy,
    models: list[PatientParameters] | None,
) -> list[Controller]:
    base = fit.model.base
    out: list[Controller] = []
    for i, z in enumerate(zs):
        if therapy.controller is not None:
            model = None if models is None else models[i]
            out.append(make_controller(therapy.controller, fit.model.patient(z), model=model))
            continue
        out.append(
            LoggedTherapy(
                grid.basal_u_per_h,
                grid.bolus_u,
                grid.carbs_g,
                carb_ratio_g_per_u=base["carb_ratio_g_per_u"],
                correction_factor_mg_dl_per_u=base["correction_factor_mg_dl_per_u"],
                basal_scale=therapy.basal_scale,
                flat_basal_u_per_h=therapy.basal_u_per_h,
                new_carb_ratio_g_per_u=therapy.carb_ratio_g_per_u,
                new_correction_factor_mg_dl_per_u=therapy.correction_factor_mg_dl_per_u,
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class ReplayStart:
    """Where a replay from minute ``first_min`` of a log starts (:func:`filtered_start`).

    Attributes:
        first_min: the replay's first minute in the log.
        history: the log's minutes before it.
        x0: ``(M, 13)`` each draw's model state at ``first_min``: its estimator's mean.
        meal_state: ``(M, N_MEAL_STATE)`` each draw's eating process then (the grams of a meal
            begun before ``first_min`` not yet swallowed).
        filters: each draw's estimator after the history (a planning controller on the same
            model plans on from a copy of it).
        seconds: what the filtering took.

    """

    first_min: int
    history: LogGrid
    x0: NDArray[np.float64]
    meal_state: NDArray[np.float64]
    filters: tuple[TwinEstimator, ...]
    seconds: float


def filtered_start(
    fit: TwinFit, grid: LogGrid, first_min: int, zs: NDArray[np.float64], *, progress: bool = False
) -> ReplayStart:
    """Each draw's state at ``first_min``, filtered from the log's minutes before it.

    For each draw, a :class:`~twinloop.agents.glucose.estimator.TwinEstimator` on the draw's
    patient (its daily sensitivity profile left out) at the twin's scheduled basal filters the
    logged insulin, carbohydrates and CGM of minutes ``[0, first_min)``
    (:func:`twinloop.twins.replay.filter_log`); its mean model state and eating process at
    ``first_min`` are where the draw starts. ``progress`` shows a progress bar (on stderr).

    Raises:
        ConfigError: ``first_min`` is not inside the log.

    """
    if not 0 < first_min < grid.minutes:
        raise ConfigError("first_min", first_min, f"a minute in (0, {grid.minutes}) of the log")
    began = time.perf_counter()
    history = grid.window(0, first_min)
    basal = fit.model.basal_u_per_h
    filters = []
    x0 = np.empty((zs.shape[0], N_STATES))
    meal_state = np.empty((zs.shape[0], N_MEAL_STATE))
    bar = tqdm(zs, desc="filtering the log", unit="draw", disable=not progress, leave=False)
    for i, z in enumerate(bar):
        estimator = TwinEstimator(fit.model.patient(z), scheduled_basal_u_per_h=basal)
        filters.append(filter_log(estimator, history, first_min))
        plan = estimator.plan_state(float(first_min))
        x0[i] = plan.x
        meal_state[i] = plan.meal_state
    seconds = time.perf_counter() - began
    return ReplayStart(first_min, history, x0, meal_state, tuple(filters), seconds)


def _planning_estimators(
    fit: TwinFit, models: list[PatientParameters], start: ReplayStart | None
) -> list[TwinEstimator]:
    """Each draw's twin estimator on its planning model: fresh, or continuing the log's filter.

    With a :class:`ReplayStart`, a model that is a draw's own continues from (a copy of) that
    draw's filter; any other model filters the log's history once.
    """
    basal = fit.model.basal_u_per_h
    if start is None:
        return [TwinEstimator(m, scheduled_basal_u_per_h=basal) for m in models]
    filtered: dict[int, TwinEstimator] = {}
    out = []
    for model in models:
        if id(model) not in filtered:
            own = next((f for f in start.filters if f.patient == model), None)
            if own is None:
                own = TwinEstimator(model, scheduled_basal_u_per_h=basal)
                filter_log(own, start.history, start.first_min)
            filtered[id(model)] = own
        out.append(copy.deepcopy(filtered[id(model)]))
    return out


def run_therapy(
    fit: TwinFit,
    grid: LogGrid,
    therapy: ReplayTherapy,
    zs: NDArray[np.float64],
    *,
    rescue: RescueRule | None,
    start: ReplayStart | None = None,
    progress: Callable[[int], object] | None = None,
) -> LoopTrace:
    """The twin's draws ``zs`` in closed loop over the grid's days under ``therapy``.

    Without ``start`` the draws start in their basal steady state at the grid's first reading;
    with it (``grid`` then being the log's minutes from ``start.first_min``) from the state
    filtered from the log before, with the insulin logged in the day before on board.
    """
    params, x0 = fit.model.states(zs, grid)
    segments = fit.model.segments(zs, grid)
    starts = np.array([a for a, _, _ in segments])

    def sensitivity(t: int) -> NDArray[np.float64] | None:
        seg = segments[int(np.searchsorted(starts, t, side="right")) - 1]
        return seg[2]

    models = replay_models(fit, zs, therapy.model) if therapy.plans else None
    estimators = None if models is None else _planning_estimators(fit, models, start)
    return closed_loop(
        params,
        x0 if start is None else start.x0,
        _controllers(fit, zs, grid, therapy, models),
        meal_g=grid.carbs_g,
        announced_g=grid.carbs_g,
        scheduled_basal_u_per_h=np.full(zs.shape[0], fit.model.basal_u_per_h),
        sensitivity=sensitivity if fit.model.profile_blocks else None,
        rescue=rescue,
        estimators=estimators,
        estimator_clock_min=0 if start is None else start.first_min,
        meal_state0=None if start is None else start.meal_state,
        insulin_history_u_per_min=None
        if start is None
        else start.history.insulin_u_per_min[-MIN_PER_DAY:],
        progress=progress,
    )


def _summary(values: NDArray[np.float64]) -> dict[str, float]:
    """``map``: the MAP draw's (the first); median, 5 and 95 % over the draws."""
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {"map": float(values[0]), "median": float(p50), "p5": float(p5), "p95": float(p95)}


def _metrics(trace: LoopTrace, first: int, days: float) -> dict[str, NDArray[np.float64]]:
    m = glucose_metrics(trace.gsub_mg_dl[:, first:], sample_period_min=1.0)
    out = {k: np.atleast_1d(np.asarray(getattr(m, k), dtype=np.float64)) for k in METRICS}
    out["insulin_u_per_day"] = trace.insulin_u_per_min[:, first:].sum(axis=1) / days
    out["rescues_per_day"] = (trace.rescue_g[:, first:] > 0).sum(axis=1) / days
    return out


def replay(
    fit: TwinFit,
    grid: LogGrid,
    therapy: ReplayTherapy,
    *,
    first_min: int = 0,
    last_min: int | None = None,
    draws: int = 50,
    seed: int = 0,
    rescue: RescueRule | None = DEFAULT_RESCUE,
    burn_in_min: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Replay minutes ``[first_min, last_min)`` of ``grid`` on the twin: logged vs ``therapy``.

    With a posterior, ``draws`` draws of the twin (the MAP first) run together; without, the
    MAP alone. From the log's start (``first_min`` 0) the draws start in their basal steady
    state at the first reading and the first ``burn_in_min`` (default 180) minutes are not
    scored; later in the log they start where each draw's estimator got by filtering the log
    up to ``first_min`` (:func:`filtered_start`) and every minute is scored (default 0).

    The logged therapy is replayed like-for-like: no rescue carbohydrates beyond the log's own
    (they are among its carbohydrates); ``rescue`` applies to ``therapy`` only. ``progress``
    shows a progress bar per therapy (on stderr).

    Returns:
        ``{"therapies": [logged, alternative], "difference": …, "draws": M, "start": …,
        "logged_cgm": …, "meaning": …, "traces": [LoopTrace, LoopTrace], …}``: each therapy's
        metrics (of the twin's sensor glucose; median, p5, p95 over draws) and rescue rule, the
        paired difference alternative − logged, and the log's own CGM metrics over the scored
        minutes (:func:`cgm_metrics`) with what separates the two (``meaning``).

    Raises:
        ConfigError: a window or burn-in outside the log.

    """
    last = grid.minutes if last_min is None else last_min
    if not 0 <= first_min < last <= grid.minutes:
        raise ConfigError(
            "first_min/last_min", f"[{first_min}, {last})", f"minutes within [0, {grid.minutes}]"
        )
    window = grid.window(first_min, last)
    zs = fit.draws(draws, seed)
    start = filtered_start(fit, grid, first_min, zs, progress=progress) if first_min > 0 else None
    if burn_in_min is None:
        burn_in_min = DEFAULT_BURN_IN_MIN if start is None else 0
    if not 0 <= burn_in_min < window.minutes:
        raise ConfigError("burn_in_min", burn_in_min, f"minutes in [0, {window.minutes})")
    days = (window.minutes + 1 - burn_in_min) / MIN_PER_DAY
    results = []
    metrics = []
    traces = []
    for t, rule in ((ReplayTherapy(), None), (therapy, rescue)):
        began = time.perf_counter()
        with tqdm(
            total=window.minutes, desc=t.label(), unit="min", disable=not progress, leave=False
        ) as bar:
            trace = run_therapy(fit, window, t, zs, rescue=rule, start=start, progress=bar.update)
        m = _metrics(trace, burn_in_min, days)
        metrics.append(m)
        traces.append(trace)
        results.append(
            {
                "therapy": t.label(),
                "model": t.model if t.plans else None,
                "rescue": None if rule is None else dataclasses.asdict(rule),
                "metrics": {k: _summary(v) for k, v in m.items()},
                "seconds": time.perf_counter() - began,
            }
        )
    diff = {k: _summary(metrics[1][k] - metrics[0][k]) for k in metrics[0]}
    return {
        "twin": fit.model.name,
        "first_min": first_min,
        "days": days,
        "draws": int(zs.shape[0]),
        "posterior": fit.cov_z is not None,
        "start": {
            "kind": "steady" if start is None else "filtered",
            "burn_in_min": burn_in_min,
            "filter_seconds": None if start is None else start.seconds,
        },
        "therapies": results,
        "difference": diff,
        "logged_cgm": cgm_metrics(window, burn_in_min),
        "meaning": TWIN_GLUCOSE_MEANING,
        "traces": traces,
    }


def trajectory_table(result: dict[str, Any], window: LogGrid) -> dict[str, NDArray[Any]]:
    """The replay's predicted trajectories per minute beside the logged CGM (a table's columns).

    ``window`` is the log's replayed minutes. Columns (``K+1`` rows, minute 0 … K; the insulin
    and rescue of the last minute are ``NaN``): ``minute``, ``time`` (UTC), ``minute_of_day``
    (local clock), ``scored`` (counted in the metrics: after the burn-in), ``cgm_mg_dl`` (the
    logged CGM, ``NaN`` between readings), and for ``twin_logged`` (the twin under the logged
    therapy) and ``twin_alternative``: ``_median_mg_dl``, ``_p5_mg_dl``, ``_p95_mg_dl`` of the
    subcutaneous glucose over the draws and ``_insulin_u_per_min`` (median); and
    ``twin_alternative_rescue_g`` (the rescue grams eaten in the minute, mean over the draws).
    """
    k = window.minutes
    minute = np.arange(k + 1)
    start = np.datetime64(window.start.astimezone(UTC).replace(tzinfo=None), "us")
    out: dict[str, NDArray[Any]] = {
        "minute": minute,
        "time": start + minute.astype("timedelta64[m]"),
        "minute_of_day": np.asarray(window.minute_of_day),
        "scored": minute >= result["start"]["burn_in_min"],
        "cgm_mg_dl": np.asarray(window.cgm_mg_dl, dtype=np.float64),
    }

    def last_nan(per_minute: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.append(per_minute, np.nan)

    for name, trace in zip(("twin_logged", "twin_alternative"), result["traces"], strict=True):
        lo, mid, hi = np.percentile(trace.gsub_mg_dl, [5, 50, 95], axis=0)
        out[f"{name}_median_mg_dl"] = mid
        out[f"{name}_p5_mg_dl"] = lo
        out[f"{name}_p95_mg_dl"] = hi
        out[f"{name}_insulin_u_per_min"] = last_nan(np.median(trace.insulin_u_per_min, axis=0))
    out["twin_alternative_rescue_g"] = last_nan(result["traces"][1].rescue_g.mean(axis=0))
    return out
