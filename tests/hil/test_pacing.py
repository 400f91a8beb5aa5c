import threading

import pytest

from twinloop.hil.pacing import PacedThread, PacingStats, pace


def test_pace_calls_every_tick_in_order_and_records_each():
    seen = []
    stats = pace(seen.append, 0.001, n_ticks=25)
    assert seen == list(range(25))
    assert stats.ticks == 25 and len(stats.duration_ms) == 25 and len(stats.start_s) == 25
    assert all(b > a for a, b in zip(stats.start_s, stats.start_s[1:], strict=False))
    summary = stats.summary()
    assert summary["ticks"] == 25 and summary["period_ms"] == pytest.approx(1.0)


def test_a_late_tick_is_run_not_skipped_and_an_overrun_is_counted():
    import time

    seen = []

    def slow_third(k):
        seen.append(k)
        if k == 2:
            time.sleep(0.05)  # 10 periods

    stats = pace(slow_third, 0.005, n_ticks=6)
    assert seen == list(range(6))  # nothing skipped
    summary = stats.summary()
    assert summary["overruns"] >= 1
    assert summary["later_than_one_period"] >= 1  # the ticks after the overrun ran late
    assert stats.lateness_ms[3] > 5.0


def test_stop_event_ends_a_paced_thread():
    calls = []
    runner = PacedThread(calls.append, 0.001).start()
    while len(calls) < 5:
        threading.Event().wait(0.001)
    runner.stop()
    stats = runner.join(5)
    assert stats.ticks == len(calls) >= 5


def test_errors_of_the_tick_reach_join():
    def boom(k):
        raise RuntimeError("tick failed")

    runner = PacedThread(boom, 0.001, n_ticks=3).start()
    with pytest.raises(RuntimeError, match="tick failed"):
        runner.join(5)


def test_bad_period_and_endless_runs_are_refused():
    with pytest.raises(ValueError, match="period_s"):
        pace(lambda k: None, 0.0, n_ticks=1)
    with pytest.raises(ValueError, match="n_ticks or a stop"):
        pace(lambda k: None, 0.01)


def test_empty_stats_summary():
    assert PacingStats(0.01).summary() == {"ticks": 0, "period_ms": 10.0}


def test_realtime_is_requested_and_a_refusal_is_reported_not_raised(monkeypatch):
    import os

    asked = []

    def refuse(pid, policy, param):
        asked.append((pid, policy, param.sched_priority))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    runner = PacedThread(lambda k: None, 0.001, n_ticks=3, realtime=True).start()
    assert runner.join(5).ticks == 3  # the loop runs anyway
    assert asked == [(0, os.SCHED_FIFO, 50)]
    assert "SCHED_FIFO refused" in runner.realtime_refused

    monkeypatch.setattr(os, "sched_setscheduler", lambda pid, policy, param: None)
    granted = PacedThread(lambda k: None, 0.001, n_ticks=1, realtime=True).start()
    granted.join(5)
    assert granted.realtime_refused is None
