"""The HIL report's glucose/insulin plot, checked on the matplotlib figure's data: lines stop at
outages (NaN points), outages are shaded and named in the legend (no labels on the plot), and
commands the pump did not accept are a separate, hollow artist ("not delivered")."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest

from tests.hil.glucose.test_rig import FakeCgm, FakePump, _outage, _rig, _run_until
from twinloop.agents.recording import Recorder, read_channel
from twinloop.hil.glucose.report import (
    NOT_DELIVERED,
    _delivered,
    build_hil_report,
    glucose_insulin_figure,
)
from twinloop.hil.glucose.rig import summarize_rig

CHANNELS = ("sensor->controller", "supervisor->actuator", "pump->acks")


class WritesFailPump(FakePump):
    """Answers reads, but its writes are lost while ``writes_down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.writes_down = threading.Event()

    def write(self, name: str, value: float, *, retry: bool = True) -> int | None:
        if self.writes_down.is_set():
            raise ConnectionError("no answer")
        return super().write(name, value, retry=retry)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A session with a CGM outage (steps 30-80) and lost pump writes (steps 120-140)."""
    run = tmp_path_factory.mktemp("hil") / "run"
    pump, cgm = WritesFailPump(), FakeCgm(glucose=200.0)
    rig = _rig(pump, cgm)
    recorder = Recorder(run, config={"rig": {"time_scale": 0.004}})
    rig.listen(recorder.listener("rig"))
    cut = _outage(cgm.cut, 30, 80, 10_000)
    writes = _outage(pump.writes_down, 120, 140, 170)
    stats = _run_until(rig, lambda k: cut(k) | writes(k))
    recorder.finish({"rig": {"time_scale": 0.004}}, summarize_rig(rig, stats))
    report = build_hil_report(run)
    columns = {c: read_channel(run, c).to_pydict() for c in CHANNELS}  # type: ignore[union-attr]
    return {"report": report, "columns": columns, "outages": report.summary["outages"]}


@pytest.fixture
def figure(session: dict[str, Any]) -> Any:
    c = session["columns"]
    fig = glucose_insulin_figure(*(c[name] for name in CHANNELS), session["outages"])
    yield fig
    plt.close(fig)


def _cgm_outage(session: dict[str, Any]) -> dict[str, Any]:
    return next(o for o in session["outages"] if o["source"] == "cgm")


def test_the_cgm_line_stops_at_the_outage(session, figure):
    ax_g = figure.axes[0]
    [line] = [ln for ln in ax_g.lines if ln.get_label() == "CGM"]
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    outage = _cgm_outage(session)
    start_h, end_h = outage["start_t_min"] / 60, outage["end_t_min"] / 60
    # the line has a NaN between the last reading before the outage and the first after it
    gaps = np.flatnonzero(np.isnan(y))
    assert gaps.size >= 1
    before, after = x[gaps - 1], x[gaps + 1]
    assert np.any((before < start_h) & (after >= end_h - 1 / 60))
    drawn = np.isfinite(y[:-1]) & np.isfinite(y[1:])  # segments matplotlib draws
    assert not np.any(drawn & (x[:-1] < start_h) & (x[1:] > start_h))


def test_outages_are_shaded_and_named_in_the_legend_not_on_the_plot(session, figure):
    ax_g, ax_i = figure.axes
    outage = _cgm_outage(session)
    want = (outage["start_t_min"] / 60, outage["end_t_min"] / 60)
    for ax in (ax_g, ax_i):
        spans = _span_extents(ax)
        assert any(np.allclose(s, want) for s in spans), spans
    labels = [t.get_text() for t in ax_g.get_legend().get_texts()]
    assert "cgm outage: stale data" in labels
    assert not ax_g.texts  # no alarm labels drawn on the plot to overprint each other


def _span_extents(ax: Any) -> list[tuple[float, float]]:
    """The x-extent of every axvspan (a Rectangle in matplotlib >= 3.9, a Polygon before)."""
    out = []
    for p in ax.patches:
        xy = p.get_path().transformed(p.get_patch_transform()).vertices
        out.append((float(xy[:, 0].min()), float(xy[:, 0].max())))
    return out


def test_commands_not_delivered_are_a_separate_hollow_artist(session, figure):
    ax_i = figure.axes[1]
    acks = session["columns"]["pump->acks"]
    lost = sorted(t / 60 for t, ok in zip(acks["t_min"], acks["delivered"], strict=True) if not ok)
    assert lost  # the session did lose commands
    [missed] = [ln for ln in ax_i.lines if ln.get_label() == NOT_DELIVERED]
    assert sorted(missed.get_xdata()) == pytest.approx(lost)
    assert missed.get_markerfacecolor() == "none" and missed.get_linestyle() == "None"
    [step] = [ln for ln in ax_i.lines if ln.get_label() == "temp basal delivered, U/h"]
    x, y = np.asarray(step.get_xdata(), float), np.asarray(step.get_ydata(), float)
    # the step's points: each delivered command's start, and where the line stops, the end of
    # its rate followed by a NaN; no start is a lost command, and the line stops among them
    # (the rate before them held one period at most, as the pump's own temp basal does)
    ends = np.append(np.isnan(y[1:]), False)
    starts = x[np.isfinite(y) & ~ends]
    assert not np.any(np.isclose(starts[:, None], np.asarray(lost)[None, :]))
    period_h = 5 / 60
    assert np.any(np.isnan(y) & (x > lost[0] - 1.5 * period_h) & (x <= lost[-1]))
    assert "not delivered" in [t.get_text() for t in ax_i.get_legend().get_texts()][-1]


def test_without_acks_commands_inside_a_pump_outage_count_as_not_delivered():
    t = np.array([0.0, 5.0, 10.0, 15.0, 20.0])
    outages = [{"source": "pump", "start_t_min": 5.0, "end_t_min": 12.0},
               {"source": "cgm", "start_t_min": 15.0, "end_t_min": None}]  # fmt: skip
    assert _delivered(t, {}, outages).tolist() == [True, False, False, True, True]


def test_the_report_writes_the_plot(session):
    report = session["report"]
    assert all(Path(p).stat().st_size > 0 for p in report.plots)
