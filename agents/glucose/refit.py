"""Re-fitting the loop's model from the loop's own recording, off the tick.

A loop with ``refit_every_days`` (:class:`twinloop.agents.glucose.loop.LoopConfig`) keeps a
minute-grid record of what its twin saw — the CGM readings delivered on ``sensor->controller``,
the insulin the pump reported on ``actuator->plant`` and the meals announced on
``meal->controller`` (:class:`LoopLog`) — and every so many simulated days fits a new twin to its
last ``refit_window_days`` (:func:`run_refit`: :func:`twinloop.plant.glucose.identification.
fit_twin` with the person's clinical settings, the prior of their age group and their scheduled
basal). The fit runs in a background worker (:func:`submit`): a Ray task when the loop's agents
are on Ray actors, else a process of a shared :class:`concurrent.futures.ProcessPoolExecutor`
(one worker; the compiled model holds the GIL, so a thread would slow the tick down).
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np

from twinloop.agents.messages import CgmReading, InsulinDelivery, MealAnnouncement
from twinloop.plant.glucose.identification import fit_twin
from twinloop.plant.glucose.models import clinical_settings, correction_drop_mg_dl
from twinloop.plant.glucose.patients import PatientParameters
from twinloop.plant.glucose.twin_model import LogGrid
from twinloop.plant.units import MIN_PER_DAY

#: UTC instant of the loop's minute 0 in the grids it fits (a midnight: the loop's days start
#: at midnight, so the grid's clock minute is the loop's minute of the day).
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class LoopLog:
    """What the twin of one loop saw, on a one-minute grid of the whole run.

    Args:
        minutes: the run's length, minutes (readings up to and including this minute).

    """

    def __init__(self, minutes: int) -> None:
        self.minutes = minutes
        self.basal_u = np.zeros(minutes)
        self.bolus_u = np.zeros(minutes)
        self.carbs_g = np.zeros(minutes)
        self.cgm_mg_dl = np.full(minutes + 1, np.nan)

    def reading(self, reading: CgmReading) -> None:
        """A CGM reading delivered to the controller and the twin (non-finite ones skipped)."""
        m = round(reading.t_min)
        if 0 <= m <= self.minutes and np.isfinite(reading.glucose_mg_dl):
            self.cgm_mg_dl[m] = reading.glucose_mg_dl

    def delivery(self, delivery: InsulinDelivery) -> None:
        """The pump's report of a minute's insulin."""
        m = round(delivery.t_min)
        if 0 <= m < self.minutes:
            self.basal_u[m] += max(float(delivery.basal_u), 0.0)
            self.bolus_u[m] += max(float(delivery.bolus_u), 0.0)

    def meal(self, meal: MealAnnouncement) -> None:
        """An announced meal (what the twin was told, not what was eaten)."""
        m = round(meal.t_min)
        grams = float(meal.carbs_g)
        if 0 <= m < self.minutes and np.isfinite(grams) and grams > 0.0:
            self.carbs_g[m] += grams

    def grid(self, first_min: int, last_min: int) -> LogGrid:
        """Minutes ``[first_min, last_min)`` as a log grid (readings up to ``last_min``)."""
        basal = self.basal_u[first_min:last_min]
        bolus = self.bolus_u[first_min:last_min]
        return LogGrid(
            start=EPOCH + timedelta(minutes=first_min),
            insulin_u_per_min=basal + bolus,
            basal_u_per_h=basal * 60.0,
            bolus_u=bolus.copy(),
            carbs_g=self.carbs_g[first_min:last_min].copy(),
            cgm_mg_dl=self.cgm_mg_dl[first_min : last_min + 1].copy(),
            minute_of_day=np.arange(first_min, last_min + 1, dtype=np.int64) % MIN_PER_DAY,
        )


@dataclasses.dataclass(frozen=True)
class RefitJob:
    """One re-fit: the grid and the person's prior (see :func:`run_refit`)."""

    grid: LogGrid
    name: str
    group: str
    basal_u_per_h: float
    overrides: dict[str, float]
    max_iter: int

    @classmethod
    def for_patient(cls, patient: PatientParameters, grid: LogGrid, max_iter: int) -> RefitJob:
        """The fit of ``patient``'s twin: their age group's prior and clinical settings."""
        settings = clinical_settings(patient)
        return cls(grid, patient.name, patient.cohort, patient.basal_u_per_h, settings, max_iter)


@dataclasses.dataclass(frozen=True)
class RefitResult:
    """A re-fitted model and what its fit reached."""

    model: PatientParameters
    cgm_readings: int
    rmse_mg_dl: float
    seconds: float
    correction_drop_mg_dl_per_u: float


def run_refit(job: RefitJob) -> RefitResult:
    """Fit the twin of ``job`` (MAP, no posterior) and return it as the loop's new model.

    Raises:
        twinloop.plant.glucose.identification.InsufficientDataError: too little CGM.
        twinloop.plant.errors.ConfigError: a fit without a steady state, a bad setting.

    """
    fit = fit_twin(
        job.grid,
        name=job.name,
        group=job.group,
        basal_u_per_h=job.basal_u_per_h,
        overrides=job.overrides,
        max_iter=job.max_iter,
    )
    model = dataclasses.replace(fit.patient, name=job.name)
    return RefitResult(
        model=model,
        cgm_readings=int(fit.fit["cgm_readings"]),
        rmse_mg_dl=float(fit.fit["rmse_mg_dl"]),
        seconds=float(fit.fit["seconds"]),
        correction_drop_mg_dl_per_u=float(correction_drop_mg_dl([model])[0]),
    )


class Pending(Protocol):
    """A fit under way in a worker."""

    def ready(self) -> bool:
        """Whether its result (or error) has arrived."""
        ...

    def result(self) -> RefitResult:
        """The result, waiting for it; raises the fit's error."""
        ...

    def cancel(self) -> None:
        """Give up on it (a result that arrives later is dropped)."""
        ...


@dataclasses.dataclass
class _FuturePending:
    future: Future[RefitResult]

    def ready(self) -> bool:
        return self.future.done()

    def result(self) -> RefitResult:
        return self.future.result()

    def cancel(self) -> None:
        self.future.cancel()


@dataclasses.dataclass
class _RayPending:
    ref: Any

    def ready(self) -> bool:
        import ray

        done, _ = ray.wait([self.ref], timeout=0)
        return bool(done)

    def result(self) -> RefitResult:
        import ray

        result: RefitResult = ray.get(self.ref)
        return result

    def cancel(self) -> None:
        import ray

        ray.cancel(self.ref)


_pool: ProcessPoolExecutor | None = None
_pool_users = 0
_pool_lock = threading.Lock()


def _shutdown_pool(*, wait: bool) -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=wait, cancel_futures=True)
        _pool = None


atexit.register(lambda: _shutdown_pool(wait=False))


def _submit_to_pool(job: RefitJob) -> Future[RefitResult]:
    """Run ``job`` in the shared worker process (started, or restarted if it broke)."""
    global _pool
    with _pool_lock:
        for _ in range(2):
            if _pool is None:
                context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
                _pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
            try:
                return _pool.submit(run_refit, job)
            except BrokenProcessPool:
                _shutdown_pool(wait=False)
        raise BrokenProcessPool("the re-fit worker process could not be started")


def submit(job: RefitJob, *, on_ray: bool) -> Pending:
    """Start ``job`` in the background: a Ray task (``on_ray``) or the worker process.

    The worker process is shared by the loops of this process and started with ``spawn``
    (a script that runs loops with re-fits needs the usual ``if __name__ == "__main__":``
    guard); each loop that used it calls :func:`release` when done, and the last one stops it.
    """
    global _pool_users
    if on_ray:
        import ray

        remote = ray.remote(run_refit).options(num_cpus=1, max_retries=0)
        return _RayPending(remote.remote(job))
    future = _submit_to_pool(job)
    with _pool_lock:
        _pool_users += 1
    return _FuturePending(future)


def release(fits: int) -> None:
    """A loop is done with the worker process after ``fits`` fits submitted there.

    When no loop holds a fit any more, the worker stops (waiting for a fit still running).
    """
    global _pool_users
    with _pool_lock:
        _pool_users = max(_pool_users - fits, 0)
        if _pool_users == 0:
            _shutdown_pool(wait=True)
