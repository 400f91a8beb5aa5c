"""Progress bars count the work's own rate: the clock starts at the first step, not before."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from twinloop.agents import progress
from twinloop.agents.knee import run as knee_run
from twinloop.agents.knee.loop import ExoLoopConfig


def test_the_first_update_is_counted_before_the_clock_starts() -> None:
    bar = tqdm(total=100, desc="waiting", file=io.StringIO(), mininterval=0)
    before = bar.start_t
    progress.start_rate_at(bar, 5, "loop")
    assert (bar.n, bar.initial, bar.desc) == (5, 5, "loop")
    assert bar.start_t >= before  # the clock restarted
    bar.update(3)
    assert (bar.n, bar.initial, bar.total) == (8, 5, 100)  # the rate counts the 3 only
    bar.close()


def _recorded(bars: list[Any]) -> type[tqdm]:
    """A tqdm that appends each bar it makes to ``bars`` (and draws into a string)."""

    class Recorded(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bars.append(self)
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "mininterval": 0})

    return Recorded


def test_the_knee_run_s_bar_is_in_ticks_and_starts_its_clock_after_the_first_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars: list[Any] = []
    monkeypatch.setattr(knee_run, "tqdm", _recorded(bars))
    config = ExoLoopConfig(patients=("mild",), cycles=1)
    knee_run.run_knee_exo(config, tmp_path / "run", progress=True)
    [bar] = bars
    assert bar.unit == "tick" and bar.desc == "exo loop"
    assert 0 < bar.initial < bar.total  # the first round, before the clock started
    assert bar.n == bar.total == sum(loop.n_ticks for loop in knee_run.exo_loops(config))


def test_twin_fit_each_starts_ray_before_its_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bar's clock must not run while Ray starts (it did: Ray started in the first fit)."""
    import tqdm as tqdm_module

    from twinloop.agents import placement
    from twinloop.cli.main import main
    from twinloop.twins import person

    events: list[Any] = []

    def fit_many(requests: list[Any], **_: Any) -> Any:
        return iter([{"name": "x", "paths": ["log"], "error": "not fitted"}] * len(requests))

    monkeypatch.setattr(placement, "start_ray", lambda *a, **k: events.append("ray"))
    monkeypatch.setattr(tqdm_module, "tqdm", _recorded(events))
    monkeypatch.setattr(person, "fit_many", fit_many)
    code = main(["twin", "fit", "--each", "synthetic_adult006_14d", "--out", str(tmp_path)])
    assert code == 1  # the (fake) fit failed
    assert events[0] == "ray" and isinstance(events[1], tqdm) and len(events) == 2
