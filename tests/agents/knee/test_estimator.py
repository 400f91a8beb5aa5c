"""The knee twin against the knee plant: each preset on a cyclic task, a realistic encoder.

Protocols (both 30 s at 100 Hz, cosine cycles 5°–100° with a 2-s period after 0.5 s of rest;
the patient follows the same reference the exoskeleton uses):

* *assistive*: a modest impedance exoskeleton, K = 20 N·m/rad, B = 1 N·m·s/rad;
* *resistive*: K = 10, B = 1, plus an elastic load of −40 N·m/rad × θ resisting flexion, the
  sum clipped to ±40 N·m (resistance training; it drives the intent past a 30 % strength).

Encoder: 131072 counts/rev (2π/131072 rad quantisation) with 0.5 counts of Gaussian noise;
velocity by backward difference; torque sensor = drive torque + a 0.3 N·m bias + 0.2 N·m noise.
"""

import dataclasses
import math
import pickle
import time

import numpy as np
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.knee.estimator import KneeEstimatorConfig, KneeTwinEstimator
from twinloop.agents.knee.messages import ExoSensorReading, TaskReference
from twinloop.plant.knee.model import X_EFFORT, KneePlant, knee_preset
from twinloop.plant.knee.tasks import CyclicFlexionExtension, reference_series
from twinloop.policies.knee.controllers import ExoInput, ImpedanceController

HZ = 100
DT = 1.0 / HZ
COUNT_RAD = 2.0 * math.pi / 131072
PRESETS = ("healthy", "mild", "moderate", "severe")
TRUE_GAIN = {name: knee_preset(name).spasticity_gain_per_rad_s for name in PRESETS}
TRUE_STRENGTH = {name: knee_preset(name).strength_fraction for name in PRESETS}
NOMINAL = knee_preset("healthy")  # what the twin knows: geometry, muscles, drive
#: the estimate's delay behind the true torque: one period (central differences) plus the
#: 4-Hz Butterworth's group delay (√2/(2π·4 Hz) ≈ 56 ms), in samples
TORQUE_LAG = 7


@dataclasses.dataclass
class Run:
    inputs: list  # (reading, reference, applied torque) per tick, as fed to the twin
    estimates: list
    true_patient_nm: np.ndarray
    twin: KneeTwinEstimator
    true_effort: np.ndarray


def _simulate(
    preset,
    *,
    resist=0.0,
    stiffness=20.0,
    damping=1.0,
    seconds=30.0,
    seed=0,
    config=None,
    **patient,
):
    rng = np.random.default_rng(seed)
    period = 2.0
    cycles = math.ceil((seconds - 0.5) / period)
    task = CyclicFlexionExtension(
        low_deg=5.0, high_deg=100.0, period_s=period, cycles=cycles, rest_s=0.5, randomize=False
    ).sample(rng)
    n = round(seconds * HZ)
    t = np.arange(n + 1) * DT
    th_ref, om_ref = reference_series(task, t)
    plant = KneePlant(knee_preset(preset, **patient), theta0_rad=float(th_ref[0]))
    impedance = ImpedanceController(stiffness, damping, torque_limit_nm=40.0)
    twin = KneeTwinEstimator(NOMINAL, config, HZ)
    bias = rng.normal(0.0, 0.3)

    def encoder(theta):
        return round((theta + rng.normal(0.0, 0.5 * COUNT_RAD)) / COUNT_RAD) * COUNT_RAD

    prev = encoder(plant.angle_rad)
    applied = 0.0
    reference = TaskReference(0.0, float(th_ref[0]), 0.0)
    inputs, estimates, true_nm, effort = [], [], [], []
    for k in range(n + 1):
        angle = encoder(plant.angle_rad)
        velocity = (angle - prev) / DT if k else 0.0
        prev = angle
        torque_sensor = plant.exo_torque_nm + bias + rng.normal(0.0, 0.2)
        reading = ExoSensorReading(t[k], angle, velocity, torque_sensor, math.nan, math.nan)
        # the reference in force and the command applied over the period that just ended
        inputs.append((reading, reference, applied))
        estimates.append(twin.step(reading, reference, applied))
        true_nm.append(plant.reading.patient_torque_nm)
        effort.append(float(plant.x[X_EFFORT]))
        obs = ExoInput(t[k], angle, velocity, float(th_ref[k]), float(om_ref[k]))
        applied = max(-40.0, min(40.0, impedance.torque(obs) - resist * angle))
        reference = TaskReference(t[k], float(th_ref[k]), float(om_ref[k]))
        plant.set_reference(reference.reference_rad, reference.reference_velocity_rad_s)
        plant.step(applied, DT)
    return Run(inputs, estimates, np.array(true_nm), twin, np.array(effort))


@pytest.fixture(scope="module")
def assistive():
    return {name: _simulate(name) for name in PRESETS}


@pytest.fixture(scope="module")
def resistive():
    return {name: _simulate(name, resist=40.0, stiffness=10.0) for name in PRESETS}


def _final(runs, field):
    return {name: getattr(run.estimates[-1], field) for name, run in runs.items()}


def test_spasticity_is_ordered_and_close_to_the_truth(assistive):
    # measured (seed 0): 0.0000 / 0.0101 / 0.0204 / 0.0361 for 0 / 0.01 / 0.02 / 0.04
    gain = _final(assistive, "spasticity_gain_per_rad_s")
    assert gain["healthy"] < gain["mild"] < gain["moderate"] < gain["severe"]
    assert gain["healthy"] < 0.002
    for name in ("mild", "moderate", "severe"):
        assert gain[name] == pytest.approx(TRUE_GAIN[name], rel=0.10), name


def test_spasticity_under_the_resistive_protocol_is_still_ordered(resistive):
    # slower movements, fewer fast stretches. Measured with the Riener & Edrich passive moment
    # (issue 22): mild 0.0097, moderate 0.0198, severe 0.0524 (+31 %): the severe knee, too weak
    # to flex against the 40 N·m load, only swings over 5–43° where the hamstrings' passive
    # moment is stiffest (≈ 110 N·m/rad at 5°), and its reflex is over-read
    gain = _final(resistive, "spasticity_gain_per_rad_s")
    assert gain["healthy"] < gain["mild"] < gain["moderate"] < gain["severe"]
    assert gain["moderate"] == pytest.approx(TRUE_GAIN["moderate"], rel=0.25)
    assert gain["severe"] == pytest.approx(TRUE_GAIN["severe"], rel=0.5)


def test_strength_is_identified_where_the_intent_saturates(assistive):
    # on the assistive task only the severe knee's intent exceeds its strength (the others
    # never need more than ~8 % of a healthy knee's torque): severe is identified, the others
    # are reported at 1 ("no weakness seen") with the demonstrated lower bound
    cap = _final(assistive, "voluntary_capacity")
    assert cap["severe"] == pytest.approx(TRUE_STRENGTH["severe"], abs=0.01)  # measured 0.049
    assert cap["healthy"] == cap["mild"] == cap["moderate"] == 1.0
    assert cap["healthy"] >= cap["mild"] >= cap["moderate"] > cap["severe"]
    low, high = assistive["moderate"].twin.consistent_capacity_range
    assert high == 1.0 and 0.0 < low < TRUE_STRENGTH["moderate"]
    low, high = assistive["severe"].twin.consistent_capacity_range
    assert low <= TRUE_STRENGTH["severe"] <= high + 0.02


def test_a_resistive_load_reveals_the_moderate_strength(resistive):
    # the load drives the intent to ~45 % of the hamstrings' healthy maximum: the moderate
    # knee (30 %) saturates, the mild one (60 %) does not — measured 1 / 1 / 0.304 / 0.050
    cap = _final(resistive, "voluntary_capacity")
    assert cap["healthy"] == cap["mild"] == 1.0
    assert cap["moderate"] == pytest.approx(TRUE_STRENGTH["moderate"], abs=0.03)
    assert cap["severe"] == pytest.approx(TRUE_STRENGTH["severe"], abs=0.015)
    assert cap["mild"] > cap["moderate"] > cap["severe"]
    low, _ = resistive["mild"].twin.consistent_capacity_range
    assert low >= 0.35  # what the mild knee demonstrated


@pytest.mark.parametrize("protocol", ["assistive", "resistive"])
def test_the_identified_patient_torque_tracks_the_true_one(protocol, request):
    # measured: correlation 0.93-0.98 as is; after the 70-ms lag, RMS 0.07-0.29 N·m against a
    # true torque of 2.7-14 N·m standard deviation
    for name, run in request.getfixturevalue(protocol).items():
        est = np.array([e.patient_torque_nm for e in run.estimates])[200:]
        true = run.true_patient_nm[200:]
        assert np.all(np.isfinite(est))
        assert np.corrcoef(est, true)[0, 1] > 0.9, name
        lagged = run.true_patient_nm[200 - TORQUE_LAG : -TORQUE_LAG]
        assert np.sqrt(np.mean((est - lagged) ** 2)) < 0.45, name  # severe resistive: 0.40
        assert run.estimates[-1].residual_rms_nm < 1.5, name


def test_the_prior_is_reported_until_there_is_evidence(assistive):
    run = assistive["severe"]
    cfg = run.twin.config
    n_prior = round((cfg.warmup_s + cfg.min_evidence_s) * HZ)
    first = run.estimates[:n_prior]
    assert all(e.voluntary_capacity == cfg.prior_voluntary_capacity for e in first)
    assert run.estimates[n_prior].voluntary_capacity < 0.1  # then the evidence speaks
    assert all(e.spasticity_gain_per_rad_s == cfg.prior_spasticity_gain_per_rad_s for e in first)
    assert math.isnan(run.estimates[0].patient_torque_nm)
    assert math.isnan(run.estimates[0].residual_rms_nm)
    twin = KneeTwinEstimator(
        NOMINAL,
        KneeEstimatorConfig(prior_voluntary_capacity=0.4, prior_spasticity_gain_per_rad_s=0.1),
    )
    est = twin.step(*run.inputs[0])
    assert (est.voluntary_capacity, est.spasticity_gain_per_rad_s) == (0.4, 0.1)
    assert est.t_s == run.inputs[0][0].t_s


def _replay(twin, inputs):
    return [twin.step(*x) for x in inputs]


def test_same_inputs_give_the_same_outputs(assistive):
    inputs = assistive["moderate"].inputs
    first = _replay(KneeTwinEstimator(NOMINAL), inputs)
    assert first == assistive["moderate"].estimates
    twin = KneeTwinEstimator(NOMINAL)
    _replay(twin, inputs[:1000])
    twin.reset()
    assert _replay(twin, inputs) == first
    # a pickled twin (e.g. moved to a Ray actor) continues identically
    twin = KneeTwinEstimator(NOMINAL)
    _replay(twin, inputs[:1500])
    clone = pickle.loads(pickle.dumps(twin))
    assert _replay(clone, inputs[1500:]) == first[1500:]


def test_the_twin_never_reads_the_patients_strength_or_spasticity(assistive):
    inputs = assistive["severe"].inputs[:800]
    told = _replay(KneeTwinEstimator(knee_preset("severe")), inputs)
    assert told == _replay(KneeTwinEstimator(NOMINAL), inputs)


def test_torque_sensor_source_gives_the_same_answer_within_its_bias(assistive):
    twin = KneeTwinEstimator(NOMINAL, KneeEstimatorConfig(exo_torque_source="sensor"))
    est = _replay(twin, assistive["severe"].inputs)[-1]
    # measured 0.0353 (the command source: 0.0361)
    assert est.spasticity_gain_per_rad_s == pytest.approx(TRUE_GAIN["severe"], rel=0.15)
    assert est.voluntary_capacity == pytest.approx(TRUE_STRENGTH["severe"], abs=0.015)


def test_non_finite_inputs_and_gaps_are_skipped_without_poisoning(assistive):
    inputs = list(assistive["severe"].inputs[:1500])
    reading, ref, applied = inputs[700]
    inputs[700] = (dataclasses.replace(reading, angle_rad=math.nan), ref, applied)
    inputs[900] = (inputs[900][0], inputs[900][1], math.inf)
    del inputs[1000:1010]  # a 0.1-s gap in the data
    twin = KneeTwinEstimator(NOMINAL)
    out = _replay(twin, inputs)
    assert twin.skipped == 2
    assert out[700].t_s == reading.t_s
    assert out[700].voluntary_capacity == out[699].voluntary_capacity
    for e in out[-300:]:
        assert math.isfinite(e.voluntary_capacity) and math.isfinite(e.spasticity_gain_per_rad_s)
        assert math.isfinite(e.patient_torque_nm)
    assert out[-1].voluntary_capacity == pytest.approx(TRUE_STRENGTH["severe"], abs=0.015)
    assert out[-1].spasticity_gain_per_rad_s == pytest.approx(TRUE_GAIN["severe"], rel=0.15)


def test_a_step_takes_well_under_a_millisecond(assistive):
    inputs = assistive["mild"].inputs[:600]
    twin = KneeTwinEstimator(NOMINAL)
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        twin.step(*x)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.5e-3  # measured ~0.07 ms


#: a strong assistive impedance under which the patient slacks (Emken et al. 2007)
SLACK_K = {"strong": (200.0, 10.0), "modest": (60.0, 3.0)}


@pytest.fixture(scope="module")
def slacking():
    return {
        (name, level): _simulate(name, stiffness=k, damping=b, seconds=40.0)
        for name in ("healthy", "mild", "moderate")
        for level, (k, b) in SLACK_K.items()
    }


def _effort_error(run):
    est = np.array([e.voluntary_effort for e in run.estimates])
    return np.abs(est - run.true_effort)[round(5.0 * HZ) :]


@pytest.mark.parametrize("level", ["modest", "strong"])
def test_slacking_is_not_read_as_weakness(slacking, level):
    # K = 60 / 200 N·m/rad: the true effort decays to 0.98-0.83 / 0.88-0.57; without the
    # effort term the twin read this as weakness (capacity down to 0.07). Measured: capacity
    # 1.0 ("no weakness seen") throughout, reflex gains within 4 %
    for name in ("healthy", "mild", "moderate"):
        run = slacking[name, level]
        caps = [e.voluntary_capacity for e in run.estimates]
        assert min(caps) >= 0.25, name
        assert caps[-1] == 1.0, name
        gain = run.estimates[-1].spasticity_gain_per_rad_s
        if name == "healthy":
            assert gain < 0.002
        else:
            assert gain == pytest.approx(TRUE_GAIN[name], rel=0.10), name


def test_the_effort_estimate_tracks_the_true_effort(slacking):
    # after 5 s (warm-up, evidence, the filter's transient); measured max |error| 0.027-0.063
    # (the RLS lags the decay by about a second: slope 0.03/s), RMS 0.012-0.029
    decayed = slacking["healthy", "strong"].true_effort
    # the patient did slack (to 0.79: slacking also drops the compensation of the hamstrings'
    # passive moment, and the errors it causes hold the effort up)
    assert decayed[-1] < 0.85
    for key, run in slacking.items():
        err = _effort_error(run)
        assert err.max() < 0.08, key
        assert np.sqrt(np.mean(err**2)) < 0.04, key
        assert 0.0 <= run.estimates[-1].voluntary_effort <= 1.0


def test_without_slacking_the_effort_is_one():
    # measured: 0.987-1.0 (mild), the reflex gain within 3 %
    run = _simulate(
        "mild",
        stiffness=200.0,
        damping=10.0,
        slacking_rate_per_s=0.0,
        slacking_error_gain_per_rad_s=0.0,
    )
    assert np.all(run.true_effort == 1.0)
    effort = np.array([e.voluntary_effort for e in run.estimates])
    assert effort[: round(2.5 * HZ)].min() == 1.0  # the prior
    assert effort[round(5.0 * HZ) :].min() > 0.95
    assert run.estimates[-1].voluntary_capacity == 1.0
    assert run.estimates[-1].spasticity_gain_per_rad_s == pytest.approx(TRUE_GAIN["mild"], rel=0.10)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"forgetting_factor": 1.5}, "forgetting_factor"),
        ({"forgetting_factor": math.nan}, "forgetting_factor"),
        ({"filter_cutoff_hz": 0.0}, "filter_cutoff_hz"),
        ({"capacity_grid": (0.5, 0.2, 1.0)}, "capacity_grid"),
        ({"capacity_grid": (0.2, 0.5)}, "capacity_grid"),
        ({"capacity_grid": ()}, "capacity_grid"),
        ({"reflex_knots_rad_s": (0.0, 1.0)}, "reflex_knots_rad_s"),
        ({"capacity_tolerance": -0.1}, "capacity_tolerance"),
        ({"prior_voluntary_capacity": 1.2}, "prior_voluntary_capacity"),
        ({"prior_spasticity_gain_per_rad_s": 0.5}, "prior_spasticity_gain_per_rad_s"),
        ({"max_spasticity_gain_per_rad_s": 0.0}, "max_spasticity_gain_per_rad_s"),
        ({"warmup_s": -1.0}, "warmup_s"),
        ({"min_evidence_s": True}, "min_evidence_s"),
        ({"initial_variance": 0.0}, "initial_variance"),
        ({"exo_torque_source": "guess"}, "exo_torque_source"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(LoopConfigError, match=field) as info:
        KneeEstimatorConfig(**kwargs)
    assert info.value.field == field


def test_bad_estimator_settings_name_the_field():
    with pytest.raises(LoopConfigError, match="control_hz"):
        KneeTwinEstimator(NOMINAL, control_hz=0)
    with pytest.raises(LoopConfigError, match="filter_cutoff_hz"):
        KneeTwinEstimator(NOMINAL, KneeEstimatorConfig(filter_cutoff_hz=20.0), control_hz=40)
    sea = knee_preset("healthy", exo_series_stiffness_nm_per_rad=300.0)
    with pytest.raises(LoopConfigError, match="exo_torque_source"):
        KneeTwinEstimator(sea)
    KneeTwinEstimator(sea, KneeEstimatorConfig(exo_torque_source="sensor"))


@pytest.mark.parametrize(("delay_s", "hz"), [(0.017, 100), (0.030, 100), (0.017, 200), (0.0, 100)])
def test_the_reflex_delay_is_interpolated_between_control_samples(delay_s, hz):
    """A velocity ramp ω_k = k: the delayed value is k − D·hz exactly, whole periods or not."""
    twin = KneeTwinEstimator(dataclasses.replace(NOMINAL, reflex_delay_s=delay_s), None, hz)
    for k in range(10):
        twin._omega_hist.append(float(k))
        if k >= delay_s * hz + 1:  # once the history reaches back past the delay
            assert twin._delayed_omega() == pytest.approx(k - delay_s * hz, abs=1e-9)
