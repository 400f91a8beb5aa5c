import dataclasses
import math

import numpy as np
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.glucose.estimator import (
    I_CGM_ERR,
    I_EGP,
    I_THETA,
    N_AUG,
    EstimatorConfig,
    EstimatorInputError,
    TwinEstimator,
)
from twinloop.agents.messages import CgmReading, InsulinDelivery, MealAnnouncement, TwinEstimate
from twinloop.plant.glucose.cgm import CGMSpec, cgm_errors, measure
from twinloop.plant.glucose.patients import PatientParameters, get_patient
from twinloop.plant.glucose.uva_padova import simulate

PATIENT = get_patient("adult#001")


@dataclasses.dataclass
class Run:
    t: np.ndarray  # reading times, min
    bg: np.ndarray  # true plasma glucose per minute
    readings: np.ndarray  # CGM at the reading times
    est_bg: np.ndarray  # twin's glucose at the reading times
    f30: np.ndarray  # twin's 30-min forecasts at the reading times
    scale: np.ndarray  # sensitivity estimates at the reading times
    estimator: TwinEstimator


def _scaled(p: PatientParameters, factor: float) -> PatientParameters:
    return dataclasses.replace(
        p,
        vmx_mg_per_kg_min_per_pmol_l=p.vmx_mg_per_kg_min_per_pmol_l * factor,
        kp3_mg_per_kg_min_per_pmol_l=p.kp3_mg_per_kg_min_per_pmol_l * factor,
    )


def _run(
    *,
    minutes: int = 1440,
    meals: dict[int, tuple[float, float]] | None = None,  # start -> (eaten, announced) grams
    noise_seed: int | None = None,
    truth: PatientParameters = PATIENT,
    dose_scale: float = 1.0,
    x0_glucose_factor: float = 1.0,
    config: EstimatorConfig | None = None,
    check=None,
    model: PatientParameters = PATIENT,
) -> Run:
    """Basal-bolus day for PATIENT, truth from the plant, the twin fed as the loop would."""
    meals = {420: (50.0, 50.0), 720: (70.0, 70.0), 1080: (80.0, 80.0)} if meals is None else meals
    eaten = np.zeros(minutes)
    announced = np.zeros(minutes)
    for start, (g, a) in meals.items():
        if start < minutes:
            eaten[start], announced[start] = g, a
    basal = np.full(minutes, dose_scale * PATIENT.basal_u_per_min)
    bolus = dose_scale * announced / PATIENT.carb_ratio_g_per_u
    x0 = np.array(truth.x0)
    x0[[3, 4, 12]] *= x0_glucose_factor
    traj = simulate([truth], basal + bolus, eaten, x0=x0[np.newaxis])
    t = np.arange(0, minutes + 1, 5)
    gsub = traj.gsub_mg_dl[0, t]
    if noise_seed is None:
        readings = gsub
    else:
        spec = CGMSpec()
        readings = measure(gsub, cgm_errors(spec, np.random.default_rng(noise_seed), t.size), spec)
    est = TwinEstimator(model, config)
    est_bg, f30, scale = (np.empty(t.size) for _ in range(3))
    for m in range(minutes + 1):
        if m % 5 == 0:
            j = m // 5
            est.update(CgmReading(float(m), float(readings[j])))
            e = est.estimate(float(m))
            est_bg[j], f30[j], scale[j] = (
                e.bg_mg_dl,
                e.forecast_30_mg_dl,
                e.insulin_sensitivity_scale,
            )
            if check is not None:
                check(est, e)
        if m == minutes:
            break
        if announced[m] > 0:
            est.observe_meal(MealAnnouncement(float(m), float(announced[m])))
        est.observe_delivery(InsulinDelivery(float(m), float(basal[m]), float(bolus[m])))
    return Run(t, traj.bg_mg_dl[0], readings, est_bg, f30, scale, est)


def _rmse(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def test_tracks_a_noise_free_truth_closely_even_from_a_wrong_start():
    # the truth starts 30 % above the twin's initial state; the sensor is exact
    run = _run(minutes=900, x0_glucose_factor=1.3)
    err = run.est_bg - run.bg[run.t]
    assert abs(err[0]) > 8  # the twin really started off (54 mg/dL before the first reading)
    after = run.t >= 120
    assert np.max(np.abs(err[after])) < 6.0
    assert _rmse(err[after]) < 2.5


def test_with_noisy_cgm_the_estimate_beats_the_raw_cgm_over_a_day():
    meals = {420: (50.0, 60.0), 720: (70.0, 56.0), 1080: (80.0, 92.0)}  # miscounted
    run = _run(meals=meals, noise_seed=3)
    after = run.t >= 120
    truth = run.bg[run.t][after]
    twin_err = _rmse(run.est_bg[after] - truth)
    cgm_err = _rmse(run.readings[after] - truth)
    assert cgm_err > 8.0  # the sensor really is noisy
    assert twin_err < 0.75 * cgm_err


def test_forecasts_beat_persistence_on_a_short_scenario():
    meals = {180: (60.0, 48.0), 480: (75.0, 90.0)}
    run = _run(minutes=720, meals=meals, noise_seed=11)
    ok = (run.t >= 120) & (run.t + 30 <= 720)
    truth = run.bg[run.t[ok] + 30]
    twin = _rmse(run.f30[ok] - truth)
    persistence = _rmse(run.readings[ok] - truth)
    assert twin < 0.7 * persistence


def _assert_symmetric_pd(est: TwinEstimator) -> None:
    p = est.covariance
    assert p.shape == (N_AUG, N_AUG)
    assert np.all(np.isfinite(p))
    assert np.array_equal(p, p.T)
    assert np.linalg.eigvalsh(p).min() > 0.0
    np.linalg.cholesky(p)


def test_covariance_stays_symmetric_positive_definite():
    checks = []

    def check(est: TwinEstimator, _: TwinEstimate) -> None:
        _assert_symmetric_pd(est)
        checks.append(est.t_min)

    meals = {300: (90.0, 40.0), 320: (20.0, 30.0), 900: (100.0, 130.0)}
    run = _run(meals=meals, noise_seed=5, dose_scale=1.6, check=check)  # overdosed: lows, clips
    assert len(checks) == 289
    assert np.min(run.readings) == 40.0  # the sensor clipped at some point: censored readings
    assert run.estimator.covariance_repairs == 0
    # extreme inputs: a huge bolus and a long gap without readings
    est = run.estimator
    est.observe_delivery(InsulinDelivery(1440.0, 0.0, 25.0))
    est.update(CgmReading(1440.0 + 180, 120.0))
    _assert_symmetric_pd(est)


@pytest.mark.parametrize(("factor", "expect"), [(0.6, "lower"), (1.5, "higher")])
def test_sensitivity_scale_moves_toward_the_truth(factor, expect):
    # the truth is less/more sensitive to insulin; doses titrated to it (÷ factor)
    run = _run(truth=_scaled(PATIENT, factor), dose_scale=1.0 / factor, noise_seed=2)
    final = run.scale[-1]
    if expect == "lower":
        assert final < 0.85
    else:
        assert final > 1.2
    assert abs(math.log(final / factor)) < abs(math.log(factor)) / 2  # at least halfway there


def test_sensitivity_scale_stays_near_one_for_the_table_patient():
    run = _run(noise_seed=2)
    assert 0.85 < run.scale[-1] < 1.15


BAD_CONFIG = [
    ("cgm_error_sd_mg_dl", 0.0),
    ("cgm_error_sd_mg_dl", math.nan),
    ("cgm_error_correlation", 1.0),
    ("cgm_error_lag_min", -15.0),
    ("cgm_white_noise_sd_mg_dl", 0.0),
    ("cgm_max_mg_dl", 30.0),
    ("glucose_process_sd_mg_dl_per_sqrt_min", -0.1),
    ("gut_process_rel_sd_per_sqrt_min", math.inf),
    ("insulin_process_rel_sd_per_sqrt_min", "0.1"),
    ("meal_size_rel_sd", -0.2),
    ("initial_glucose_sd_mg_dl", 0.0),
    ("initial_insulin_rel_sd", True),
    ("sensitivity_prior_sd", 3.0),
    ("sensitivity_rate_per_sqrt_day", -1.0),
    ("sensitivity_min_scale", 1.5),
    ("sensitivity_min_scale", 1.0),
    ("sensitivity_max_scale", 0.5),
    ("sensitivity_max_scale", 1.0),
    ("egp_prior_sd", -0.1),
    ("egp_rate_per_sqrt_day", math.nan),
    ("egp_min_scale", 1.0),
    ("egp_max_scale", 0.9),
    ("meal_detection", "yes"),
    ("unannounced_meal_sd_g_per_sqrt_min", -1.0),
    ("meal_gate_memory", 1.0),
    ("meal_gate_threshold_mg_dl", math.inf),
    ("forecast_horizons_min", (30,)),
    ("forecast_horizons_min", (60, 30)),
    ("forecast_horizons_min", (30, 45.5, 60)),
    ("forecast_horizons_min", 30),
    ("forecast_insulin", "bolus"),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(LoopConfigError) as info:
        EstimatorConfig(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_good_config_is_normalised():
    cfg = EstimatorConfig(forecast_horizons_min=[15, 30.0, 60, 120], cgm_error_sd_mg_dl=10)
    assert cfg.forecast_horizons_min == (15, 30, 60, 120)
    assert isinstance(cfg.cgm_error_sd_mg_dl, float)
    assert cfg.cgm_error_phi_per_min == pytest.approx(0.7 ** (1 / 15))
    est = TwinEstimator(PATIENT, cfg)
    out = est.forecasts(0.0)
    assert list(out) == [15, 30, 60, 120]
    assert est.forecast(0.0).shape == (121,)
    e = est.estimate(0.0)
    assert (e.forecast_30_mg_dl, e.forecast_60_mg_dl) == (out[30], out[60])


def test_bad_constructor_arguments():
    with pytest.raises(LoopConfigError) as info:
        TwinEstimator(PATIENT, scheduled_basal_u_per_h=-1.0)
    assert info.value.field == "scheduled_basal_u_per_h"
    with pytest.raises(LoopConfigError):
        TwinEstimator(PATIENT, config={"meal_size_rel_sd": 0.2})  # type: ignore[arg-type]


def test_same_inputs_give_identical_estimates():
    meals = {300: (60.0, 70.0)}
    a = _run(minutes=600, meals=meals, noise_seed=9)
    b = _run(minutes=600, meals=meals, noise_seed=9)
    assert np.array_equal(a.est_bg, b.est_bg)
    assert np.array_equal(a.f30, b.f30)
    assert np.array_equal(a.estimator.covariance, b.estimator.covariance)


def test_stale_late_and_non_finite_messages_are_ignored_and_counted():
    est = TwinEstimator(PATIENT)
    for m in range(10):
        assert est.observe_delivery(InsulinDelivery(float(m), PATIENT.basal_u_per_min, 0.0))
    assert est.update(CgmReading(10.0, 140.0))
    before = est.state_mean
    assert not est.update(CgmReading(5.0, 300.0))  # older than the filter
    assert not est.update(CgmReading(10.0, math.nan))
    assert not est.observe_delivery(InsulinDelivery(3.0, 0.0, 5.0))  # late
    assert not est.observe_delivery(InsulinDelivery(12.0, math.inf, 0.0))
    assert not est.observe_delivery(InsulinDelivery(12.0, -1.0, 0.0))
    assert not est.observe_meal(MealAnnouncement(12.0, -20.0))
    assert est.ignored == {"reading": 2, "delivery": 3, "meal": 1}
    assert np.array_equal(est.state_mean, before)
    with pytest.raises(EstimatorInputError):
        est.estimate(5.0)  # the twin does not look back
    with pytest.raises(EstimatorInputError):
        est.update(CgmReading(12.5, 140.0))  # off the minute grid


def test_iob_and_cob_follow_the_inputs():
    est = TwinEstimator(PATIENT)
    basal = PATIENT.basal_u_per_min
    for m in range(60):
        est.observe_delivery(InsulinDelivery(float(m), basal, 0.0))
    e = est.estimate(60.0)
    assert abs(e.iob_u) < 0.05  # steady basal: nothing on board above it
    assert e.cob_g == pytest.approx(0.0, abs=0.01)
    est.observe_meal(MealAnnouncement(60.0, 50.0))
    est.observe_delivery(InsulinDelivery(60.0, basal, 5.0))
    e = est.estimate(61.0)
    assert e.iob_u == pytest.approx(5.0, abs=0.1)  # the bolus, just delivered
    assert 49.0 < e.cob_g <= 50.0  # announced; a gram may have left the stomach already
    for m in range(61, 240):
        est.observe_delivery(InsulinDelivery(float(m), basal, 0.0))
    later = est.estimate(240.0)
    assert 0.5 < later.iob_u < 4.0
    assert 0.0 < later.cob_g < 35.0
    assert later.forecast_60_mg_dl != later.bg_mg_dl


def test_held_versus_scheduled_insulin_in_forecasts():
    results = {}
    for mode in ("held", "scheduled"):
        est = TwinEstimator(PATIENT, EstimatorConfig(forecast_insulin=mode))
        for m in range(30):
            est.observe_delivery(InsulinDelivery(float(m), 0.0, 0.0))  # suspended
        results[mode] = est.forecast(30.0, 240)
    assert results["held"].shape == (241,)
    assert results["held"][0] == results["scheduled"][0]
    # suspension held for four more hours: glucose rises more than if basal resumes
    assert results["held"][-1] > results["scheduled"][-1] + 5.0


def test_sensitivity_state_is_clipped_to_its_range():
    cfg = EstimatorConfig(sensitivity_min_scale=0.95, sensitivity_max_scale=1.05)
    seen = []

    def check(est: TwinEstimator, e: TwinEstimate) -> None:
        seen.append(e.insulin_sensitivity_scale)
        assert math.log(0.95) - 1e-12 <= est.state_mean[I_THETA] <= math.log(1.05) + 1e-12

    _run(truth=_scaled(PATIENT, 1.6), dose_scale=1 / 1.6, noise_seed=2, config=cfg, check=check)
    assert max(seen) == pytest.approx(1.05)  # it wanted to go further and was held there


def test_plan_state_is_the_estimates_mean_with_the_pending_meals():
    """What a planning controller gets: the same mean as the estimate, the sensitivity scale,
    and the announced meals not started, in minutes from the tick."""
    est = TwinEstimator(PATIENT)
    for m in range(0, 31, 5):
        est.update(CgmReading(float(m), 150.0))
        for k in range(m, m + 5):
            est.observe_delivery(InsulinDelivery(float(k), PATIENT.basal_u_per_min, 0.0))
    est.observe_meal(MealAnnouncement(42.0, 60.0))
    est.observe_meal(MealAnnouncement(35.0, 20.0))
    plan = est.plan_state(35.0)
    e = est.estimate(35.0)
    vg = PATIENT.vg_dl_per_kg
    assert plan.t_min == 35.0
    assert plan.x[3] / vg == pytest.approx(e.bg_mg_dl, rel=1e-12)
    assert plan.sensitivity_scale == e.insulin_sensitivity_scale
    assert plan.pending_meals == ((0, 20.0), (7, 60.0))
    # a plan state later than the filter: the meal at 35 has started, the other is pending
    later = est.plan_state(40.0)
    assert later.pending_meals == ((2, 60.0),)
    assert later.meal_state[0] + later.meal_state[2] == pytest.approx(20.0)
    with pytest.raises(EstimatorInputError):
        est.plan_state(10.0)


def test_the_filter_state_layout():
    """13 model states, the two log-scales, then the CGM error (the last, skipped rows)."""
    assert (N_AUG, I_THETA, I_EGP, I_CGM_ERR) == (16, 13, 14, 15)
    est = TwinEstimator(PATIENT)
    assert est.state_mean.shape == (16,)
    assert est.covariance.shape == (16, 16)
    assert est.sensitivity_scale == 1.0
    assert est.egp_scale == 1.0


def _egp_scaled(p: PatientParameters, factor: float) -> PatientParameters:
    return dataclasses.replace(p, kp1_mg_per_kg_min=p.kp1_mg_per_kg_min * factor)


@pytest.mark.parametrize(("factor", "expect"), [(1.08, "higher"), (0.93, "lower")])
def test_egp_scale_moves_toward_the_truth_when_the_basal_glucose_is_wrong(factor, expect):
    # the truth produces more (less) glucose: on the same basal it settles higher (lower)
    # than the twin's model would; the sensitivity is right
    truth = _egp_scaled(PATIENT, factor)
    run = _run(truth=truth, noise_seed=4, meals={})
    settled = run.bg[-1]
    assert abs(settled - run.bg[0]) > 15.0  # the truth really drifts away from the model's
    final = run.estimator.egp_scale
    if expect == "higher":
        assert final > 1.03
    else:
        assert final < 0.98
    # in a day without meals, at least a third of the way there
    assert abs(math.log(final / factor)) < 2 * abs(math.log(factor)) / 3
    assert 0.8 < run.estimator.sensitivity_scale < 1.25  # not mistaken for a sensitivity


def test_egp_scale_stays_near_one_for_the_table_patient():
    run = _run(noise_seed=2)
    assert 0.97 < run.estimator.egp_scale < 1.03


def test_frozen_egp_scale_stays_at_one():
    cfg = EstimatorConfig(egp_prior_sd=0.0, egp_rate_per_sqrt_day=0.0)
    run = _run(truth=_egp_scaled(PATIENT, 1.08), noise_seed=4, meals={}, config=cfg)
    assert run.estimator.egp_scale == pytest.approx(1.0, abs=2e-3)


def test_egp_state_is_clipped_to_its_range():
    cfg = EstimatorConfig(egp_min_scale=0.99, egp_max_scale=1.01)
    seen = []

    def check(est: TwinEstimator, e: TwinEstimate) -> None:
        seen.append(e.egp_scale)
        assert math.log(0.99) - 1e-12 <= est.state_mean[I_EGP] <= math.log(1.01) + 1e-12

    _run(truth=_egp_scaled(PATIENT, 1.1), noise_seed=4, meals={}, config=cfg, check=check)
    assert max(seen) == pytest.approx(1.01)


def _detected(run: Run) -> tuple[float, float]:
    est = run.estimator
    return est.detected_carbs_g, est.unannounced_carbs_g


def test_an_unannounced_meal_is_detected_and_no_meal_is_not():
    """A 70 g meal nobody announced: the filter puts carbohydrate into the gut; on the same
    day without the meal it does not."""
    seen: list[float] = []

    def check(est: TwinEstimator, e: TwinEstimate) -> None:
        seen.append(est.detected_carbs_g)
        assert e.unannounced_carbs_g == est.unannounced_carbs_g >= 0.0

    child = get_patient("child#003")
    meal = _run(minutes=600, meals={240: (70.0, 0.0)}, noise_seed=3, truth=child, model=child,
                check=check)  # fmt: skip
    quiet = _run(minutes=600, meals={}, noise_seed=3, truth=child, model=child)
    assert max(seen) > 15.0
    assert quiet.estimator.detected_carbs_g < 5.0
    assert max(seen) > 4.0 * max(quiet.estimator.detected_carbs_g, 1.0)
    # the grams are on board while the meal is absorbed, and gone after
    assert _detected(meal)[1] < 5.0


def test_without_meal_detection_nothing_is_detected():
    child = get_patient("child#003")
    cfg = EstimatorConfig(meal_detection=False)
    run = _run(minutes=600, meals={240: (70.0, 0.0)}, noise_seed=3, truth=child, model=child,
               config=cfg)  # fmt: skip
    assert _detected(run) == (0.0, 0.0)
    assert not run.estimator.meal_gate_open


def test_detected_carbohydrates_raise_the_forecast():
    """The detection is what the forecast (and a planner) uses: the twin with detection
    forecasts the meal's rise better than without it."""
    child = get_patient("child#003")
    errs = {}
    for on in (True, False):
        cfg = EstimatorConfig(meal_detection=on)
        run = _run(minutes=600, meals={240: (70.0, 0.0)}, noise_seed=3, truth=child,
                   model=child, config=cfg)  # fmt: skip
        rise = (run.t >= 240) & (run.t <= 330)
        errs[on] = float(np.mean(run.bg[run.t[rise] + 30] - run.f30[rise]))
    assert errs[True] < errs[False]  # less under-forecast


def test_at_the_cgm_ceiling_the_twin_is_held_at_its_plausibility_bound():
    """Readings clipped at 400 say "at least 400"; a filter that filled the gut to explain the
    climb ran on unchecked (to 1,600 mg/dL here, while the truth peaked under 500)."""
    meals = {300: (120.0, 40.0), 720: (120.0, 40.0)}  # under-announced, under-dosed: highs
    bounded = _run(meals=meals, noise_seed=3, dose_scale=0.3)
    assert np.sum(bounded.readings >= 400.0) > 20  # the sensor sat at its ceiling
    assert bounded.bg.max() < 500.0
    bound = bounded.estimator.config.censored_high_bound_mg_dl
    assert bound == 600.0
    assert bounded.estimator.held_at_bound > 0
    assert bounded.est_bg.max() < bound + 60.0
    free = _run(
        meals=meals,
        noise_seed=3,
        dose_scale=0.3,
        config=EstimatorConfig(censored_high_bound_mg_dl=5000.0),
    )
    assert free.estimator.held_at_bound == 0
    assert free.est_bg.max() > 2.0 * bounded.bg.max()  # the runaway the bound prevents


def test_the_plausibility_bound_must_lie_above_the_ceiling():
    with pytest.raises(LoopConfigError, match="censored_high_bound_mg_dl"):
        EstimatorConfig(censored_high_bound_mg_dl=350.0)
