"""Therapy settings from a log: the bolus calculator fitted to the boluses, its fallbacks."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np
import pytest

from twinloop.cli.main import main
from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.insulin import iob_fraction
from twinloop.plant.glucose.patients import get_patient
from twinloop.plant.glucose.twin_model import LogGrid
from twinloop.twins.identify import log_grid
from twinloop.twins.logs import read_log
from twinloop.twins.person import FitRequest
from twinloop.twins.settings import (
    MIN_CORRECTIONS,
    MIN_MEAL_BOLUSES,
    bolus_events,
    infer_therapy,
    therapy_lines,
)
from twinloop.twins.synthetic import synthetic_log

START = datetime(2026, 3, 2, tzinfo=UTC)
BASAL = 1.0


def _grid(
    boluses: dict[int, float],
    carbs: dict[int, float] | None = None,
    glucose: dict[int, float] | None = None,
    *,
    days: float = 2.0,
    basal: np.ndarray | None = None,
) -> LogGrid:
    """A log on a minute grid: the given doses, carbohydrates and CGM readings (else 110)."""
    k = int(days * 1440)
    bolus = np.zeros(k)
    meal = np.zeros(k)
    for t, u in boluses.items():
        bolus[t] = u
    for t, g in (carbs or {}).items():
        meal[t] = g
    cgm = np.full(k + 1, np.nan)
    cgm[::5] = 110.0
    for t, g in (glucose or {}).items():
        cgm[t] = g
    rate = np.full(k, BASAL) if basal is None else basal
    return LogGrid(
        start=START,
        insulin_u_per_min=rate / 60.0 + bolus,
        basal_u_per_h=rate,
        bolus_u=bolus,
        carbs_g=meal,
        cgm_mg_dl=cgm,
        minute_of_day=np.arange(k + 1) % 1440,
    )


def _calculator(cr: float, cf: float, target: float) -> LogGrid:
    """Boluses given exactly by the calculator, each 8 h after the last (no insulin on board):
    six meals at glucose 110, four corrections (two with a meal), two meals whose correction was
    declined, and a meal at 62 mg/dL eaten with 15 g of hypo treatment (bolused for the meal)."""
    boluses, carbs, glucose = {}, {}, {}
    meals = [(110.0, m, True) for m in (30.0, 45.0, 60.0, 75.0, 90.0, 50.0)]
    corrections = [(200.0, 0.0, True), (260.0, 0.0, True), (180.0, 40.0, True), (300.0, 60.0, True)]
    odd = [(220.0, 50.0, False), (250.0, 70.0, False), (62.0, 45.0, True)]
    for i, (g, c, accepted) in enumerate(meals + corrections + odd):
        t = 60 + 480 * i
        glucose[t] = g
        boluses[t] = c / cr + (max(0.0, (g - target) / cf) if accepted else 0.0)
        if c:
            carbs[t + 5] = c + (15.0 if g < 70 else 0.0)
    return _grid(boluses, carbs, glucose, days=7.0)


def _first_boluses(grid: LogGrid, n: int) -> LogGrid:
    """The grid with only the first ``n`` of :func:`_calculator`'s boluses."""
    bolus = np.where(np.arange(grid.minutes) < 60 + 480 * n, grid.bolus_u, 0.0)
    return dataclasses.replace(
        grid, bolus_u=bolus, insulin_u_per_min=grid.basal_u_per_h / 60.0 + bolus
    )


def test_the_calculators_settings_are_recovered_from_exact_boluses():
    th = infer_therapy(_calculator(12.0, 40.0, 110.0))
    assert th.carb_ratio_g_per_u.value == pytest.approx(12.0, rel=1e-4)
    assert th.correction_factor_mg_dl_per_u.value == pytest.approx(40.0, rel=1e-4)
    assert th.target_mg_dl is not None and th.target_mg_dl.value == pytest.approx(110.0, abs=0.1)
    assert (th.meal_boluses, th.corrections, th.standalone_corrections) == (10, 4, 2)
    assert (
        th.correction_factor_mg_dl_per_u.detail == "inferred from 10 meal boluses and 4 corrections"
    )
    for s in (th.carb_ratio_g_per_u, th.correction_factor_mg_dl_per_u):
        assert s.source == "inferred" and s.low is not None and s.high is not None
        assert s.low <= s.value <= s.high


def test_insulin_on_board_is_the_logs_own_above_the_scheduled_basal():
    grid = _grid({100: 5.0, 220: 2.0}, {220: 24.0})
    ev = bolus_events(grid, BASAL)
    assert ev.minute.tolist() == [100, 220] and ev.carbs_g.tolist() == [0.0, 24.0]
    assert ev.iob_u[0] == pytest.approx(0.0, abs=1e-9)
    assert ev.iob_u[1] == pytest.approx(5.0 * float(iob_fraction(119.5)), rel=1e-9)
    assert ev.glucose_mg_dl.tolist() == [110.0, 110.0]
    # boluses less than 15 min apart are one event; carbs count for their nearest bolus
    merged = bolus_events(_grid({100: 1.0, 110: 2.0, 140: 1.0}, {112: 30.0, 141: 5.0}), BASAL)
    assert merged.bolus_u.tolist() == [3.0, 1.0] and merged.carbs_g.tolist() == [30.0, 5.0]


def test_the_scheduled_basal_is_the_most_common_rate_not_a_loops_median_temp():
    k = 2 * 1440
    rate = np.full(k, 1.6)
    rate[: int(0.4 * k)] = 0.8  # 40 % at the scheduled rate, 60 % on temps above it
    rate[int(0.4 * k) : int(0.7 * k)] = 2.0
    grid = _grid({}, basal=rate)
    assert np.median(rate) == pytest.approx(1.6)
    assert grid.scheduled_basal_u_per_h() == pytest.approx(0.8)
    basal = infer_therapy(grid).basal_u_per_h
    assert basal.value == pytest.approx(0.8) and basal.source == "mode"
    assert "40 % of the time" in basal.detail
    assert _grid({}, basal=np.zeros(k)).scheduled_basal_u_per_h() == 0.0


def test_the_rules_of_thumb_take_over_when_the_log_has_too_few_boluses():
    only_basal = infer_therapy(_grid({}))
    tdi = only_basal.total_daily_insulin_u
    assert tdi == pytest.approx(24 * BASAL)
    assert only_basal.carb_ratio_g_per_u.value == pytest.approx(500 / tdi)
    assert only_basal.carb_ratio_g_per_u.source == "500 rule"
    assert only_basal.correction_factor_mg_dl_per_u.value == pytest.approx(1800 / tdi)
    cf = only_basal.correction_factor_mg_dl_per_u
    assert cf.source == "1800 rule" and cf.low is None and only_basal.target_mg_dl is None
    assert cf.detail == f"1800 rule: 0 corrections, {MIN_CORRECTIONS} needed to infer"
    # meals bolused at glucose 110 with no correction: CR inferred, CF from the rule
    full = _calculator(12.0, 40.0, 110.0)
    th = infer_therapy(_first_boluses(full, 6))
    assert th.carb_ratio_g_per_u.source == "inferred"
    assert th.carb_ratio_g_per_u.value == pytest.approx(12.0, rel=1e-4)
    assert th.correction_factor_mg_dl_per_u.source == "1800 rule"
    # three meal boluses: the median carbs/bolus
    cr = infer_therapy(_first_boluses(full, 3)).carb_ratio_g_per_u
    assert cr.source == "median" and cr.value == pytest.approx(12.0)
    assert cr.detail == f"median carbs/bolus: 3 meal boluses, {MIN_MEAL_BOLUSES} needed to infer"


def test_given_settings_are_kept_the_others_inferred_around_them_and_checked():
    grid = _calculator(12.0, 40.0, 110.0)
    th = infer_therapy(grid, given={"correction_factor_mg_dl_per_u": 40.0, "basal_u_per_h": 0.9})
    assert th.correction_factor_mg_dl_per_u.source == "given"
    assert th.correction_factor_mg_dl_per_u.value == 40.0 and th.basal_u_per_h.value == 0.9
    assert th.carb_ratio_g_per_u.value == pytest.approx(12.0, rel=1e-3)
    assert th.carb_ratio_g_per_u.source == "inferred"
    with pytest.raises(ConfigError, match=r"carb_ratio_g_per_u=0\.5 is not allowed: 1–150 g/U"):
        infer_therapy(grid, given={"carb_ratio_g_per_u": 0.5})
    with pytest.raises(ConfigError, match="correction_factor_mg_dl_per_u"):
        FitRequest(("x.csv",), overrides={"correction_factor_mg_dl_per_u": float("nan")})


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--cr", "0", "--cr=0.0 is not allowed: 1–150 g/U"),
        ("--cf", "5000", "--cf=5000.0 is not allowed: 2–1000 mg/dL/U"),
        ("--basal", "40", "--basal-u-per-h=40.0 is not allowed: 0.01–10 U/h"),
    ],
)
def test_the_cli_refuses_implausible_settings_naming_the_option(
    tmp_path, capsys, option, value, message
):
    assert main(["twin", "fit", "x.csv", "--out", str(tmp_path / "t.yaml"), option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A week of each patient's life on basal-bolus therapy, read back as a log."""
    out = {}
    for name, seed in (("adult#003", 0), ("child#002", 0), ("adolescent#004", 1)):
        syn = synthetic_log(get_patient(name), days=7, seed=seed)
        path = syn.write(tmp_path_factory.mktemp("logs") / f"{name.replace('#', '_')}.csv")
        out[name] = log_grid(read_log(path))
    return out


@pytest.mark.parametrize("name", ["adult#003", "child#002", "adolescent#004"])
def test_the_inferred_settings_are_the_patients_own(logs, name):
    p = get_patient(name)
    th = infer_therapy(logs[name])
    rule = 1800.0 / th.total_daily_insulin_u
    for s, true, tol in (
        (th.carb_ratio_g_per_u, p.carb_ratio_g_per_u, 0.02),
        (th.correction_factor_mg_dl_per_u, p.correction_factor_mg_dl_per_u, 0.05),
    ):
        assert s.source == "inferred"
        assert s.value == pytest.approx(true, rel=tol)
        assert s.low is not None and s.high is not None and s.low <= true <= s.high
    # the rule of thumb it replaces is 1.3–2.5× off for these three
    assert rule > 1.3 * p.correction_factor_mg_dl_per_u
    assert th.basal_u_per_h.value == pytest.approx(p.basal_u_per_h, abs=5e-4)
    assert th.meal_boluses >= 20 and th.corrections >= 8


def test_a_huge_manual_bolus_does_not_wreck_the_estimate(logs):
    grid = logs["adult#003"]
    clean = infer_therapy(grid)
    bolus = grid.bolus_u.copy()
    meal = int(np.flatnonzero(grid.carbs_g > 20)[3])
    bolus[meal] += 20.0  # a meal bolused with 20 U too many
    quiet = 3000 + int(np.argmin(bolus[3000:3300] + grid.carbs_g[3000:3300]))
    bolus[quiet] += 15.0  # a stray 15 U with no meal
    odd = dataclasses.replace(
        grid, bolus_u=bolus, insulin_u_per_min=grid.basal_u_per_h / 60 + bolus
    )
    th = infer_therapy(odd)
    for key in ("carb_ratio_g_per_u", "correction_factor_mg_dl_per_u"):
        assert getattr(th, key).value == pytest.approx(getattr(clean, key).value, rel=0.02), key


def test_the_report_lines_say_value_interval_and_source(logs):
    doc = infer_therapy(logs["adult#003"]).as_dict()
    lines = therapy_lines(doc)
    assert [line.split()[0] for line in lines] == ["basal", "CR", "CF", "target"]
    assert lines[0] == "basal 1.43 U/h (the most common logged rate, 100 % of the time)"
    cf = doc["correction_factor_mg_dl_per_u"]
    assert lines[2].startswith(f"CF {cf['value']:#.3g} mg/dL/U [{cf['low']:#.3g}, ")
    assert lines[2].endswith("(inferred from 24 meal boluses and 13 corrections)")


def test_it_is_the_pumps_settings_that_are_inferred_not_the_physiologys(tmp_path):
    """A person whose pump holds a CR and CF of their own (not the patient table's)."""
    p = get_patient("adult#003")
    pump = {"carb_ratio_g_per_u": 7.0, "correction_factor_mg_dl_per_u": 25.0}
    syn = synthetic_log(p, days=5, seed=1, settings=pump)
    th = infer_therapy(log_grid(read_log(syn.write(tmp_path / "log.csv"))))
    for key, tol in (("carb_ratio_g_per_u", 0.02), ("correction_factor_mg_dl_per_u", 0.05)):
        s = getattr(th, key)
        assert s.value == pytest.approx(pump[key], rel=tol)
        assert s.low is not None and s.high is not None and s.low <= pump[key] <= s.high
