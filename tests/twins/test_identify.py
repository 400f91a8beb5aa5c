"""Twin identification: the minute grid, the model's steady state, MAP recovery, the posterior."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.identification import censored_residuals, effective_sample_size
from twinloop.twins.identify import (
    FITTED,
    LogGrid,
    TwinModel,
    fit_twin,
    log_grid,
    read_twin,
    write_twin,
)
from twinloop.twins.logs import LogError, read_log

START = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
P = len(FITTED)


def _z(**values: float) -> np.ndarray:
    """A ``z`` vector: 0 except the named fitted parameters."""
    z = np.zeros(P)
    for name, v in values.items():
        z[list(FITTED).index(name)] = v
    return z


def _grid(days: float, *, basal: float = 1.0, seed: int = 0) -> LogGrid:
    """A log with three bolused meals a day (no CGM yet) on a minute grid."""
    k = int(days * 1440)
    carbs = np.zeros(k)
    bolus = np.zeros(k)
    rng = np.random.default_rng(seed)
    for d in range(int(np.ceil(days))):
        for hour, grams in ((7, 45.0), (12, 70.0), (19, 80.0)):
            t = d * 1440 + hour * 60 + int(rng.integers(-30, 30))
            if t < k:
                carbs[t] = grams * rng.uniform(0.8, 1.2)
                bolus[t] = carbs[t] / 10.0
    basal_u_per_h = np.full(k, basal)
    return LogGrid(
        start=START,
        insulin_u_per_min=basal_u_per_h / 60.0 + bolus,
        basal_u_per_h=basal_u_per_h,
        bolus_u=bolus,
        carbs_g=carbs,
        cgm_mg_dl=np.full(k + 1, np.nan),
        minute_of_day=np.arange(k + 1) % 1440,
    )


def _observed(model: TwinModel, z: np.ndarray, grid: LogGrid, noise_mg_dl: float) -> LogGrid:
    """The grid with 5-min CGM readings of the twin at ``z`` (plus white noise)."""
    g = model.simulate(z[None, :], grid, initial_glucose_mg_dl=140.0)[0]
    rng = np.random.default_rng(1)
    cgm = np.full(grid.minutes + 1, np.nan)
    cgm[::5] = g[::5] + noise_mg_dl * rng.standard_normal(g[::5].shape)
    return LogGrid(
        grid.start, grid.insulin_u_per_min, grid.basal_u_per_h, grid.bolus_u, grid.carbs_g,
        cgm, grid.minute_of_day,
    )  # fmt: skip


def _model(blocks: int = 0) -> TwinModel:
    return TwinModel.for_group("t", "adults", 1.0, profile_blocks=blocks)


def test_the_grid_holds_basal_rows_sums_boluses_and_puts_readings_on_their_minutes(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "time,cgm_mg_dl,basal_u_per_h,bolus_u,carbs_g\n"
        "2026-03-02T08:00:00+01:00,120,0.8,,\n"
        "2026-03-02T08:05:00+01:00,125,,2.0,30\n"
        "2026-03-02T08:05:30+01:00,,,1.0,\n"
        "2026-03-02T08:10:00+01:00,130,1.2,,\n"
        "2026-03-02T08:15:00+01:00,135,,,\n"
    )
    grid = log_grid(read_log(path))
    assert grid.start == datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    assert grid.minutes == 15
    assert grid.cgm_mg_dl[[0, 5, 10, 15]].tolist() == [120, 125, 130, 135]
    assert np.isnan(grid.cgm_mg_dl[1:5]).all()
    assert grid.basal_u_per_h[:10].tolist() == [0.8] * 10
    assert grid.basal_u_per_h[10:].tolist() == [1.2] * 5
    assert grid.bolus_u[5] == 3.0 and grid.bolus_u.sum() == 3.0
    assert grid.carbs_g[5] == 30.0
    np.testing.assert_allclose(grid.insulin_u_per_min, grid.basal_u_per_h / 60 + grid.bolus_u)
    assert grid.minute_of_day[0] == 8 * 60  # local time, +01:00


def test_a_log_without_basal_or_cgm_is_refused_by_name(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("time,cgm_mg_dl,bolus_u\n2026-03-02T08:00:00Z,120,\n2026-03-02T08:05:00Z,,1\n")
    with pytest.raises(LogError, match="no basal rate"):
        log_grid(read_log(path))
    path.write_text("time,basal_u_per_h\n2026-03-02T08:00:00Z,1.0\n")
    with pytest.raises(LogError, match="no CGM"):
        log_grid(read_log(path))


def test_the_twin_at_its_prior_mean_holds_its_basal_glucose_under_the_scheduled_basal():
    model = TwinModel.for_group("t", "adults", 1.3)
    z = np.zeros(len(model.names))
    patient = model.patient(z)
    assert patient.basal_u_per_h == pytest.approx(1.3, rel=1e-12)
    grid = _grid(1.0, basal=1.3)
    flat = LogGrid(
        grid.start, np.full(grid.minutes, 1.3 / 60), grid.basal_u_per_h, np.zeros(grid.minutes),
        np.zeros(grid.minutes), grid.cgm_mg_dl, grid.minute_of_day,
    )  # fmt: skip
    g = model.simulate(z[None, :], flat, initial_glucose_mg_dl=patient.glucose_basal_mg_dl)[0]
    assert np.abs(g - patient.glucose_basal_mg_dl).max() < 0.5


def test_each_fitted_parameter_changes_what_it_names():
    model = _model()
    z = np.zeros(len(model.names))
    base = model.patient(z)
    for j, name in enumerate(FITTED):
        dz = z.copy()
        dz[j] = 1.0
        moved = model.patient(dz)
        factor = float(np.exp(model.prior_sd[j]))
        if name == "meal_scale":
            assert moved.f == pytest.approx(base.f * factor)
        else:
            assert getattr(moved, name) == pytest.approx(getattr(base, name) * factor), name


def test_the_map_fit_recovers_a_twin_of_its_own_structure():
    model = _model()
    truth = _z(
        vmx_mg_per_kg_min_per_pmol_l=0.8, glucose_basal_mg_dl=0.6, egp_basal_mg_per_kg_min=-0.5,
        kabs_per_min=0.4, meal_scale=0.5, p2u_per_min=-0.4, kd_per_min=0.5,
    )  # fmt: skip
    grid = _observed(model, truth, _grid(3.0), noise_mg_dl=2.0)
    fit = fit_twin(grid, burn_in_min=0, starts=1)
    prior_rmse = np.sqrt(
        np.nanmean((model.simulate(np.zeros((1, P)), grid)[0] - grid.cgm_mg_dl) ** 2)
    )
    assert fit.fit["rmse_mg_dl"] < 3.0 < prior_rmse
    # the parameters that glucose reveals best come back close to the truth
    v, t = fit.model.values(fit.z_map), model.values(truth)
    for name in ("glucose_basal_mg_dl", "meal_scale"):
        assert v[name] == pytest.approx(t[name], rel=0.1), name


def test_the_laplace_posterior_covers_the_truth_and_narrows_with_more_data():
    model = _model()
    truth = _z(
        vmx_mg_per_kg_min_per_pmol_l=0.5, glucose_basal_mg_dl=-0.5, egp_basal_mg_per_kg_min=0.3,
        meal_scale=-0.3, p2u_per_min=0.2,
    )  # fmt: skip
    short = fit_twin(_observed(model, truth, _grid(1.0), 8.0), posterior=True, starts=1)
    long = fit_twin(_observed(model, truth, _grid(4.0), 8.0), posterior=True, starts=1)
    for fit in (short, long):
        assert fit.cov_z is not None
        np.testing.assert_allclose(fit.cov_z, fit.cov_z.T)
        assert np.all(np.linalg.eigvalsh(fit.cov_z) > 0)
        # the prior alone has variance 1: the data shrink it
        assert np.all(np.diag(fit.cov_z) <= 1.0 + 1e-9)
    j = list(FITTED).index("glucose_basal_mg_dl")
    assert long.cov_z[j, j] < short.cov_z[j, j]
    for name in ("glucose_basal_mg_dl", "vmx_mg_per_kg_min_per_pmol_l"):
        row = long.parameters()[name]
        assert row["ci95_low"] < model.values(truth)[name] < row["ci95_high"], name
    for name, row in short.parameters().items():
        assert row["ci95_low"] <= row["map"] <= row["ci95_high"], name
    assert short.parameters()["b"]["ci95_high"] <= 0.98 + 1e-12  # within its hard limit
    draws = long.draws(20, seed=3)
    assert draws.shape == (20, P)
    np.testing.assert_array_equal(draws[0], long.z_map)
    np.testing.assert_array_equal(draws, long.draws(20, seed=3))


def test_a_daily_sensitivity_profile_is_recovered():
    model = _model(blocks=4)
    truth = np.zeros(P + 4)
    truth[P:] = [-1.5, 1.0, 0.0, 1.0]  # night resistant, morning and evening sensitive
    grid = _observed(model, truth, _grid(4.0), 2.0)
    fit = fit_twin(grid, profile_blocks=4, burn_in_min=0, starts=1)
    got = fit.model.block_factors(fit.z_map)
    want = model.block_factors(truth)
    assert np.argmin(got) == 0 == np.argmin(want)
    np.testing.assert_allclose(got / got.mean(), want / want.mean(), rtol=0.15)
    without = fit_twin(grid, burn_in_min=0, starts=1)
    assert fit.fit["rmse_mg_dl"] < without.fit["rmse_mg_dl"]


def test_a_twin_file_round_trips(tmp_path):
    model = _model(blocks=2)
    grid = _observed(model, np.zeros(P + 2), _grid(1.0), 5.0)
    fit = fit_twin(grid, profile_blocks=2, posterior=True, starts=1, max_iter=5)
    back = read_twin(write_twin(fit, tmp_path / "twin.yaml"))
    np.testing.assert_array_equal(back.z_map, fit.z_map)
    np.testing.assert_array_equal(back.cov_z, fit.cov_z)
    assert back.model == fit.model
    np.testing.assert_array_equal(
        back.model.simulate(back.z_map[None], grid), fit.model.simulate(fit.z_map[None], grid)
    )


def test_bad_twin_files_are_refused_by_field(tmp_path):
    path = tmp_path / "twin.yaml"
    path.write_text("hello: 1\n")
    with pytest.raises(InvalidInputError, match="not a twin file"):
        read_twin(path)
    path.write_text("twinloop_twin: 2\nmodel: {name: x}\n")
    with pytest.raises(InvalidInputError, match="malformed"):
        read_twin(path)
    path.write_text("twinloop_twin: 1\nmodel: {name: x}\n")
    with pytest.raises(InvalidInputError, match="fit it again"):
        read_twin(path)


def test_too_little_cgm_is_refused_saying_how_much_is_needed():
    model = _model()
    grid = _observed(model, np.zeros(P), _grid(1.0), 5.0)
    sparse = grid.cgm_mg_dl.copy()
    sparse[600:] = np.nan
    thin = LogGrid(
        grid.start, grid.insulin_u_per_min, grid.basal_u_per_h, grid.bolus_u, grid.carbs_g,
        sparse, grid.minute_of_day,
    )  # fmt: skip
    with pytest.raises(LogError, match=r"84 readings after the 180-min burn-in; at least 201"):
        fit_twin(thin)


def test_bad_options_are_refused_by_name():
    grid = _observed(_model(), np.zeros(P), _grid(1.0), 5.0)
    with pytest.raises(ConfigError, match="group"):
        fit_twin(grid, group="elderly")
    with pytest.raises(ConfigError, match="profile_blocks"):
        fit_twin(grid, profile_blocks=7)
    with pytest.raises(ConfigError, match="basal_u_per_h"):
        fit_twin(grid, basal_u_per_h=0.0)
    with pytest.raises(ConfigError, match="body_weight_kg"):
        fit_twin(grid, overrides={"body_weight_kg": -3.0})
    with pytest.raises(InvalidInputError, match="window"):
        grid.window(0, grid.minutes + 1)


def test_a_window_is_the_same_log_from_a_later_start():
    grid = _grid(2.0)
    w = grid.window(1440, 2880)
    assert w.start == grid.start + timedelta(days=1)
    np.testing.assert_array_equal(w.carbs_g, grid.carbs_g[1440:])
    assert w.cgm_mg_dl.shape == (1441,)


def _ar1(minutes: int, phi_per_min: float, seed: int) -> np.ndarray:
    """A stationary AR(1) process every minute, unit variance."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(minutes) * np.sqrt(1.0 - phi_per_min**2)
    x = np.empty(minutes)
    x[0] = rng.standard_normal()
    for t in range(1, minutes):
        x[t] = phi_per_min * x[t - 1] + e[t]
    return x


def test_the_effective_sample_size_depends_on_time_not_on_the_sampling_period():
    minutes = 60_000
    phi = 0.97  # τ = (1 + φ)/(1 − φ) ≈ 66 min
    x = _ar1(minutes, phi, seed=4)
    expected = minutes * (1 - phi) / (1 + phi)
    sizes = {}
    for step in (1, 3, 5):
        idx = np.arange(0, minutes, step)
        sizes[step] = effective_sample_size(x[idx], idx)
        assert sizes[step] == pytest.approx(expected, rel=0.35), step
    assert max(sizes.values()) / min(sizes.values()) < 1.4
    # independent readings are each worth one; gaps in the log do not inflate the count
    white = np.random.default_rng(5).standard_normal(5000)
    idx = np.arange(5000) * 5
    assert effective_sample_size(white, idx) == pytest.approx(5000, rel=0.15)
    keep = (idx // 1440) % 2 == 0  # every other day missing
    assert effective_sample_size(x[idx[keep]], idx[keep]) < effective_sample_size(x[idx], idx)


def test_readings_at_the_cgm_limits_are_censored():
    pred = np.array([30.0, 60.0, 450.0, 380.0, 120.0])
    seen = np.array([40.0, 40.0, 400.0, 400.0, 100.0])
    np.testing.assert_array_equal(
        censored_residuals(pred, seen, 40.0, 400.0), [0.0, 20.0, 0.0, -20.0, 20.0]
    )


def test_a_fit_counts_and_censors_readings_at_the_floor():
    model = _model()
    truth = _z(vmx_mg_per_kg_min_per_pmol_l=0.8)
    grid = _observed(model, truth, _grid(2.0), noise_mg_dl=2.0)
    floor = float(np.nanpercentile(grid.cgm_mg_dl, 10))  # a sensor reading no lower than this
    cgm = np.where(grid.cgm_mg_dl < floor, floor, grid.cgm_mg_dl)
    clipped = LogGrid(
        grid.start, grid.insulin_u_per_min, grid.basal_u_per_h, grid.bolus_u, grid.carbs_g,
        cgm, grid.minute_of_day,
    )  # fmt: skip
    censored = fit_twin(clipped, burn_in_min=0, cgm_range_mg_dl=(floor, 400.0))
    assert censored.fit["censored_readings"] == int(np.sum(cgm <= floor))
    as_values = fit_twin(clipped, burn_in_min=0, cgm_range_mg_dl=(1.0, 400.0))
    assert as_values.fit["censored_readings"] == 0
    # read as "at or below the floor", the clipped lows do not pull the twin up to the floor
    obs = ~np.isnan(grid.cgm_mg_dl)
    low = obs & (grid.cgm_mg_dl < floor)
    sim_c = censored.model.simulate(censored.z_map[None, :], clipped)[0]
    sim_v = as_values.model.simulate(as_values.z_map[None, :], clipped)[0]
    err_c = np.sqrt(np.mean((sim_c[low] - grid.cgm_mg_dl[low]) ** 2))
    err_v = np.sqrt(np.mean((sim_v[low] - grid.cgm_mg_dl[low]) ** 2))
    assert err_c < err_v
    with pytest.raises(ConfigError, match="cgm_range_mg_dl"):
        fit_twin(clipped, cgm_range_mg_dl=(300.0, 100.0))


def test_a_twin_whose_gastric_emptying_has_kmin_above_kmax_is_refused():
    model = _model()
    sd = dict(zip(model.names, model.prior_sd, strict=True))
    # kmin up and kmax down until they cross (within the ±5 SD box of the fit)
    z = _z(kmin_per_min=min(4.0, 2.5 / sd["kmin_per_min"]), kmax_per_min=-4.0)
    values = model.values(z)
    assert values["kmin_per_min"] >= values["kmax_per_min"]
    with pytest.raises(ConfigError, match="kmin"):
        model.patient(z)
