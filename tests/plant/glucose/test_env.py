import dataclasses

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from twinloop import plant
from twinloop.plant.errors import (
    ConfigError,
    InvalidInputError,
    ResetNeededError,
    UnknownPatientError,
)
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.env import T1DEnv
from twinloop.plant.glucose.env_core import T1DConfig
from twinloop.plant.glucose.env_vector import T1DVectorEnv
from twinloop.plant.glucose.patients import get_patient
from twinloop.plant.glucose.pump import PumpSpec, delivery_u_per_min
from twinloop.plant.glucose.scenarios import FixedMealSchedule
from twinloop.plant.glucose.uva_padova import simulate

SPECS = [s for s in gym.registry.values() if s.id.startswith("twinloop/T1D")]
CONFIGS = {
    "default": {},
    "rich-obs-bolus": {"history_len": 6, "include_iob": True, "include_meal": True,
                        "bolus_action": True},
}  # fmt: skip


def rollout(env, seed, n, action):
    obs, info = env.reset(seed=seed)
    out = [obs]
    infos = [info]
    for _ in range(n):
        obs, reward, term, trunc, info = env.step(action)
        out.append(np.append(obs, [reward, term, trunc]))
        infos.append(info)
        if term or trunc:
            break
    return np.concatenate(out), infos


def test_registered_with_a_vector_entry_point():
    assert plant.T1D_ID in gym.registry
    spec = gym.registry[plant.T1D_ID]
    assert spec.vector_entry_point is not None


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_passes_gymnasium_and_sb3_env_checkers(spec, kwargs):
    env = gym.make(spec.id, **kwargs)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(T1DEnv(**kwargs), warn=False)


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_same_seed_same_trajectory_other_seed_other_meals_and_noise(kwargs):
    env = T1DEnv(**kwargs)
    action = np.zeros(env.action_space.shape, np.float32)
    action[0] = 1.0  # 1 U/h basal, no bolus
    a, infos_a = rollout(env, 7, 288, action)
    b, _ = rollout(env, 7, 288, action)
    np.testing.assert_array_equal(a, b)
    c, infos_c = rollout(env, 8, 288, action)
    assert not np.array_equal(a, c)
    meals_a = [i["carbs_g"] for i in infos_a]
    meals_c = [i["carbs_g"] for i in infos_c]
    assert meals_a != meals_c
    # reset without a seed continues the generator: a new episode, not a replay
    env.reset(seed=7)
    d, _ = rollout(env, None, 288, action)
    assert not np.array_equal(a, d)


def test_noise_free_env_matches_the_plant_replay():
    """Scenario A under basal-bolus through the env equals simulate() at every 5-min step."""
    p = get_patient("adolescent#003")
    env = T1DEnv(
        patient=p.name, scenario="A", cgm=CGMSpec(noise=False), bolus_action=True,
        pump=PumpSpec(basal_increment_u_per_h=0.0, bolus_increment_u=0.0),
        include_meal=True,
    )  # fmt: skip
    obs, info = env.reset(seed=0)
    bg = [info["bg_mg_dl"]]
    gsub = [info["cgm_mg_dl"]]
    for _ in range(288):
        bolus = obs[-1] / p.carb_ratio_g_per_u  # announced grams of the coming step
        obs, _, term, trunc, info = env.step(np.array([p.basal_u_per_h, bolus], np.float32))
        bg.append(info["bg_mg_dl"])
        gsub.append(info["cgm_mg_dl"])
    assert trunc and not term
    insulin = np.full(1440, p.basal_u_per_min)
    meals = np.zeros(1440)
    for minute, grams in ((420, 45.0), (720, 70.0), (1080, 80.0)):
        insulin[minute] += np.float32(grams / p.carb_ratio_g_per_u)
        meals[minute] = grams
    traj = simulate([p], insulin, meals)
    np.testing.assert_allclose(bg, traj.bg_mg_dl[0, ::5], rtol=1e-5)
    np.testing.assert_allclose(gsub, np.clip(traj.gsub_mg_dl[0, ::5], 40, 400), rtol=1e-5)


@pytest.mark.parametrize(("n", "checked"), [(4, (0, 1, 2, 3)), (70, (0, 33, 69))])
def test_vector_env_sub_envs_equal_single_envs_seeded_s_plus_i(n, checked):
    """Small batches run the serial kernel, large ones the parallel kernel: same results."""
    kwargs = {"patients": ("adults",), "include_iob": True, "include_meal": True,
              "bolus_action": True, "episode_days": 0.5}  # fmt: skip
    venv = gym.make_vec(plant.T1D_ID, num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
    rng = np.random.default_rng(0)
    actions = rng.uniform(0, [2.5, 4.0], size=(150, n, 2)).astype(np.float32)
    actions[..., 1] *= rng.random((150, n)) < 0.03  # an occasional bolus
    vobs, vinfo = venv.reset(seed=100)
    v_traj = [vobs]
    v_rew = []
    for a in actions:
        o, r, _, _, _ = venv.step(a)
        v_traj.append(o)
        v_rew.append(r)
    for i in checked:
        env = T1DEnv(**{**kwargs, "patients": (f"adult#{i % 10 + 1:03d}",)})
        obs, info = env.reset(seed=100 + i)
        assert info["patient"] == vinfo["patient"][i]
        np.testing.assert_array_equal(obs, v_traj[0][i])
        for k, a in enumerate(actions[:144]):
            obs, r, term, _, _ = env.step(a[i])
            np.testing.assert_array_equal(obs, v_traj[k + 1][i])
            assert r == v_rew[k][i]
            if term:  # the vector env autoresets on the next step; compared up to here
                assert k > 20
                break


def test_vector_env_next_step_autoreset():
    venv = T1DVectorEnv(num_envs=3, episode_days=1 / 24)  # 12 steps of 5 min
    obs0, _ = venv.reset(seed=5)
    a = np.ones((3, 1), np.float32)
    for _ in range(11):
        _, _, term, trunc, _ = venv.step(a)
        assert not trunc.any()
    _, _, term, trunc, info = venv.step(a)
    assert trunc.all() and info["time_min"].tolist() == [60, 60, 60]
    obs, reward, term, trunc, info = venv.step(a)  # the reset step
    assert info["time_min"].tolist() == [0, 0, 0]
    assert reward.tolist() == [0.0, 0.0, 0.0] and not term.any() and not trunc.any()
    assert not np.array_equal(obs, obs0)  # a new episode continues the sub-env generators
    _, _, _, _, info = venv.step(a)
    assert info["time_min"].tolist() == [5, 5, 5]


def test_actions_are_clipped_and_quantized_and_nan_raises():
    env = T1DEnv(bolus_action=True, max_basal_u_per_h=4.0, max_bolus_u=10.0)
    env.reset(seed=0)
    *_, info = env.step(np.array([100.0, -3.0], np.float32))
    assert info["insulin_u"] == pytest.approx(4.0 * 5 / 60)
    *_, info = env.step(np.array([1.23, 2.07], np.float32))
    assert info["insulin_u"] == pytest.approx(1.2 * 5 / 60 + 2.05)  # 0.05 increments, rounded down
    with pytest.raises(InvalidInputError, match="NaN"):
        env.step(np.array([np.nan, 0.0], np.float32))


def test_termination_on_severe_hypoglycaemia():
    env = T1DEnv(bolus_action=True, max_bolus_u=75.0, scenario="A")
    env.reset(seed=0)
    for _ in range(288):
        _, _, term, trunc, info = env.step(np.array([5.0, 75.0], np.float32))
        if term or trunc:
            break
    assert term and not trunc and info["bg_mg_dl"] < 40.0


def test_custom_reward_fn_receives_arrays():
    seen = []

    def reward_fn(bg, cgm, insulin, carbs):
        seen.append((bg.shape, cgm.shape, insulin.shape, carbs.shape))
        return -np.abs(bg - 120.0)

    env = T1DEnv(reward_fn=reward_fn)
    env.reset(seed=0)
    _, reward, *_, info = env.step(np.array([1.0], np.float32))
    assert reward == pytest.approx(-abs(info["bg_mg_dl"] - 120.0))
    assert seen == [((1,), (1,), (1,), (1,))]


def test_default_reward_is_one_minus_risk():
    from twinloop.plant.glucose.metrics import risk_index

    env = T1DEnv()
    env.reset(seed=0)
    _, reward, *_, info = env.step(np.array([1.0], np.float32))
    assert reward == pytest.approx(1.0 - float(risk_index(info["bg_mg_dl"])) / 100.0)


def test_iob_starts_at_basal_steady_state_and_rises_after_a_bolus():
    env = T1DEnv(include_iob=True, bolus_action=True, scenario="A")
    p = get_patient("adult#001")
    obs, info = env.reset(seed=0)
    _, _, _, _, steady = env.step(np.array([p.basal_u_per_h, 0.0], np.float32))
    assert steady["iob_u"] == pytest.approx(info["iob_u"], rel=1e-3)
    obs, _, _, _, after = env.step(np.array([p.basal_u_per_h, 3.0], np.float32))
    assert after["iob_u"] == pytest.approx(steady["iob_u"] + 3.0, abs=0.1)
    assert obs[-1] == pytest.approx(after["iob_u"], rel=1e-6)


def test_sample_patient_draws_from_the_cohort():
    env = T1DEnv(patients=("children",), sample_patient=True)
    names = {env.reset(seed=s)[1]["patient"] for s in range(20)}
    assert len(names) > 3 and all(n.startswith("child#") for n in names)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"patients": ("adult#099",)}, UnknownPatientError, "adult#001"),
        ({"scenario": "B"}, ConfigError, "scenario"),
        ({"control_period_min": 7}, ConfigError, "control_period_min"),
        ({"max_basal_u_per_h": 100.0}, ConfigError, "max_basal_u_per_h"),
        ({"history_len": 0}, ConfigError, "history_len"),
        ({"episode_days": 0.001}, ConfigError, "episode_days"),
    ],
)
def test_bad_config_names_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        T1DConfig(**kwargs)


def test_config_object_and_kwargs_combine():
    cfg = T1DConfig(history_len=4)
    env = T1DEnv(cfg, include_iob=True)
    assert env.observation_space.shape == (5,)
    assert dataclasses.replace(cfg).history_len == 4


def test_step_before_reset_and_after_the_end_raises():
    env = T1DEnv(episode_days=1 / 24)
    with pytest.raises(ResetNeededError):
        env.step(np.array([1.0], np.float32))
    env.reset(seed=0)
    for _ in range(12):
        *_, trunc, _ = env.step(np.array([1.0], np.float32))
    assert trunc
    with pytest.raises(ResetNeededError):
        env.step(np.array([1.0], np.float32))
    env.reset()
    env.step(np.array([1.0], np.float32))
    with pytest.raises(ResetNeededError):
        T1DVectorEnv(num_envs=2).step(np.ones((2, 1), np.float32))


@pytest.mark.parametrize("bad", [np.ones((2, 3)), np.ones(3), np.ones((1, 2))])
def test_wrong_action_shapes_are_refused_not_reshaped(bad):
    venv = T1DVectorEnv(num_envs=3, bolus_action=True)
    venv.reset(seed=0)
    with pytest.raises(InvalidInputError, match="expected shape"):
        venv.step(bad)
    env = T1DEnv()
    env.reset(seed=0)
    env.step(1.0)  # a scalar for a one-input action is fine
    with pytest.raises(InvalidInputError, match="expected shape"):
        env.step(np.ones(2))


def test_pump_pulses_in_the_env_match_the_pump_model():
    pump = PumpSpec(pulse_u=0.05)
    env = T1DEnv(pump=pump, scenario="A")
    env.reset(seed=1)
    rng = np.random.default_rng(2)
    residual = np.zeros(1)
    for _ in range(60):
        basal = rng.uniform(0.0, 3.0)
        *_, info = env.step(np.array([basal], np.float32))
        per_min, residual = delivery_u_per_min(
            pump, np.array([np.float32(basal)]), np.zeros(1), 5, residual
        )
        assert info["insulin_u"] == pytest.approx(per_min.sum(), abs=1e-9)


def test_meals_off_the_step_grid_start_at_their_minute():
    """A meal at 07:03 is swallowed from minute 423, inside a 5-min step."""
    p = get_patient("adult#007")
    meals = FixedMealSchedule(meals=((423, 50.0), (1001, 20.0)))
    env = T1DEnv(
        patient=p.name, scenario=meals, cgm=CGMSpec(noise=False),
        pump=PumpSpec(basal_increment_u_per_h=0.0),
    )  # fmt: skip
    _, info = env.reset(seed=0)
    bg = [info["bg_mg_dl"]]
    carbs = []
    for _ in range(288):
        *_, info = env.step(np.array([p.basal_u_per_h], np.float32))
        bg.append(info["bg_mg_dl"])
        carbs.append(info["carbs_g"])
    meal_g = np.zeros(1440)
    meal_g[423], meal_g[1001] = 50.0, 20.0
    traj = simulate([p], np.full(1440, np.float32(p.basal_u_per_h) / 60.0), meal_g)
    np.testing.assert_allclose(bg, traj.bg_mg_dl[0, ::5], rtol=1e-6)
    assert carbs[84] == pytest.approx(10.0)  # minutes 423, 424 of step 84 (420-425)


def test_partial_autoreset_matches_a_single_env_reset_without_seed():
    """Sub-env 0 ends early (a huge bolus); its next episode continues its own generator."""
    kwargs = {"patients": ("adults",), "bolus_action": True, "max_bolus_u": 75.0}
    venv = T1DVectorEnv(num_envs=3, **kwargs)
    venv.reset(seed=40)
    env = T1DEnv(**kwargs)
    env.reset(seed=40)
    a = np.zeros((3, 2), np.float32)
    a[:, 0] = 1.0
    a[0, 1] = 75.0
    for _ in range(288):
        _, _, vterm, _, _ = venv.step(a)
        _, _, term, _, _ = env.step(a[0])
        a[0, 1] = 0.0
        if term:
            break
    assert term and vterm[0] and not vterm[1:].any()
    obs_after, reward, _, _, info = venv.step(a)
    fresh, _ = env.reset()
    np.testing.assert_array_equal(obs_after[0], fresh)
    assert reward[0] == 0.0 and info["time_min"][0] == 0 and info["time_min"][1] > 0


def test_patients_keep_the_given_order_and_unknown_names_list_both_kinds():
    cfg = T1DConfig(patients=("adult#005", "children"))
    names = [p.name for p in cfg.patient_table()]
    assert names[0] == "adult#005" and names[1] == "child#001" and len(names) == 11
    with pytest.raises(UnknownPatientError) as info:
        T1DConfig(patients=("adult005",))
    assert "adults" in str(info.value) and "adult#005" in str(info.value)


def test_reset_option_picks_the_patient():
    env = T1DEnv(patients=("all",))
    assert env.reset(seed=0, options={"patient": "child#004"})[1]["patient"] == "child#004"
    with pytest.raises(UnknownPatientError):
        env.reset(options={"patient": "child#042"})


def test_reward_fn_cannot_corrupt_the_state():
    def greedy(bg, cgm, insulin, carbs):
        bg -= 1000.0  # in-place edit of its own copy
        return np.zeros_like(bg)

    env = T1DEnv(reward_fn=greedy)
    env.reset(seed=0)
    *_, info = env.step(np.array([1.0], np.float32))
    assert 40.0 < info["bg_mg_dl"] < 600.0


def test_child_generators_keep_meals_and_noise_apart():
    """Changing the CGM leaves the meals alone; changing the episode leaves the noise alone."""
    base = T1DEnv(episode_days=1.0)
    other_cgm = T1DEnv(episode_days=1.0, cgm=CGMSpec(sample_period_min=1))
    longer = T1DEnv(episode_days=2.0)

    def run(env, n=120):
        env.reset(seed=9)
        out = [env.step(np.array([1.0], np.float32))[-1] for _ in range(n)]
        return [i["carbs_g"] for i in out], [i["cgm_mg_dl"] - i["bg_mg_dl"] for i in out]

    meals, noise = run(base)
    assert run(other_cgm)[0] == meals
    assert run(longer)[1] == noise
