"""Real-time pacing: call a function every period on the wall clock, and measure how well.

Tick ``k`` is due at ``start + k × period_s``. The pacer sleeps until ``spin_s`` before that,
then spins on :func:`time.perf_counter` for the rest (``time.sleep`` alone wakes up to a few
hundred microseconds late, and a 1 kHz loop cannot afford that). A late tick is never skipped:
it runs at once and its lateness is recorded, so the statistics show every miss.

Per tick the pacer records the *lateness* (start − due), the *duration* of the call, and an
*overrun* when the call took longer than the period. :class:`PacingStats` summarizes them:
percentiles of lateness, *jitter* (the spread of the intervals between consecutive tick starts
around the period) and counts of overruns and of ticks later than one whole period.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: Default spin window before a tick's due time, seconds.
SPIN_S = 0.002


@dataclasses.dataclass
class PacingStats:
    """What a paced run measured; arrays in milliseconds, one entry per tick."""

    period_s: float
    lateness_ms: list[float] = dataclasses.field(default_factory=list)
    duration_ms: list[float] = dataclasses.field(default_factory=list)
    start_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def ticks(self) -> int:
        """Ticks run."""
        return len(self.lateness_ms)

    def summary(self) -> dict[str, Any]:
        """Percentiles of lateness and duration, jitter, overruns and ticks late by a period."""
        period_ms = 1000.0 * self.period_s
        late = np.asarray(self.lateness_ms, dtype=np.float64)
        took = np.asarray(self.duration_ms, dtype=np.float64)
        if late.size == 0:
            return {"ticks": 0, "period_ms": period_ms}
        intervals = 1000.0 * np.diff(np.asarray(self.start_s, dtype=np.float64))
        jitter = np.abs(intervals - period_ms) if intervals.size else np.zeros(1)
        return {
            "ticks": int(late.size),
            "period_ms": period_ms,
            "lateness_ms": {
                "p50": float(np.percentile(late, 50)),
                "p99": float(np.percentile(late, 99)),
                "max": float(late.max()),
                "mean": float(late.mean()),
            },
            "duration_ms": {
                "p50": float(np.percentile(took, 50)),
                "p99": float(np.percentile(took, 99)),
                "max": float(took.max()),
            },
            "jitter_ms": {"p99": float(np.percentile(jitter, 99)), "max": float(jitter.max())},
            "overruns": int((took > period_ms).sum()),
            "later_than_one_period": int((late > period_ms).sum()),
        }


def pace(
    fn: Callable[[int], None],
    period_s: float,
    *,
    n_ticks: int | None = None,
    stop: threading.Event | None = None,
    spin_s: float = SPIN_S,
    on_tick: Callable[[int, float, float], None] | None = None,
    freeze_gc: bool = True,
) -> PacingStats:
    """Call ``fn(k)`` at ``start + k × period_s`` until ``n_ticks`` ran or ``stop`` is set.

    Args:
        fn: the tick; receives its index ``k``.
        period_s: seconds between due times (> 0).
        n_ticks: ticks to run (None: until ``stop``).
        stop: set it to end the run after the current tick.
        spin_s: seconds before a due time at which sleeping gives way to spinning.
        on_tick: called after each tick with ``(k, lateness_ms, duration_ms)``.
        freeze_gc: move existing objects out of the garbage collector's reach for the run
            (``gc.freeze``), which removes most collector pauses from the ticks.

    """
    if not period_s > 0:
        raise ValueError(f"period_s={period_s!r}: must be > 0")
    if n_ticks is None and stop is None:
        raise ValueError("pace: give n_ticks or a stop event")
    stats = PacingStats(period_s)
    if freeze_gc:
        gc.collect()
        gc.freeze()
    start = time.perf_counter() + spin_s
    k = 0
    try:
        while (n_ticks is None or k < n_ticks) and not (stop is not None and stop.is_set()):
            due = start + k * period_s
            wait = due - time.perf_counter()
            if wait > spin_s:
                if stop is not None:
                    if stop.wait(wait - spin_s):
                        break
                else:
                    time.sleep(wait - spin_s)
            while time.perf_counter() < due:
                pass
            began = time.perf_counter()
            fn(k)
            took_ms = 1000.0 * (time.perf_counter() - began)
            late_ms = 1000.0 * (began - due)
            stats.lateness_ms.append(late_ms)
            stats.duration_ms.append(took_ms)
            stats.start_s.append(began)
            if on_tick is not None:
                on_tick(k, late_ms, took_ms)
            k += 1
    finally:
        if freeze_gc:
            gc.unfreeze()
    return stats


def request_realtime(priority: int = 50) -> str | None:
    """Put the calling thread under ``SCHED_FIFO`` at ``priority``; None, or why not.

    Real-time scheduling keeps other processes from preempting the loop (the rare 10–20 ms
    stalls of a shared machine); it needs ``CAP_SYS_NICE`` (root, or a raised ``rtprio``
    limit) and is refused inside an unprivileged user namespace.
    """
    if not hasattr(os, "sched_setscheduler"):
        return "SCHED_FIFO is not available on this OS"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        return f"SCHED_FIFO refused ({exc.strerror or exc})"
    return None


class PacedThread:
    """:func:`pace` in a dedicated thread; :meth:`stop` ends it, :attr:`stats` holds the result.

    ``spin_s`` is :func:`pace`'s spin window. With ``realtime=True`` the thread asks for
    ``SCHED_FIFO`` first (:func:`request_realtime`);
    :attr:`realtime_refused` says why it was not granted (None when it was, or not asked).
    """

    def __init__(
        self,
        fn: Callable[[int], None],
        period_s: float,
        *,
        n_ticks: int | None = None,
        name: str = "paced-loop",
        on_tick: Callable[[int, float, float], None] | None = None,
        realtime: bool = False,
        spin_s: float = SPIN_S,
    ) -> None:
        self._stop = threading.Event()
        self.stats: PacingStats | None = None
        self.error: BaseException | None = None
        self.realtime_refused: str | None = None

        def run() -> None:
            if realtime:
                self.realtime_refused = request_realtime()
            try:
                self.stats = pace(
                    fn, period_s, n_ticks=n_ticks, stop=self._stop, spin_s=spin_s, on_tick=on_tick
                )
            except BaseException as exc:  # handed to join()
                self.error = exc

        self._thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> PacedThread:
        """Start the thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to end after its current tick."""
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> PacingStats:
        """Wait for the end; re-raise what the loop raised."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        if self.stats is None:
            raise TimeoutError("the paced loop did not end in time")
        return self.stats
