import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from stable_baselines3 import PPO

from twinloop import plant
from twinloop.plant.glucose.env_vector import T1DVectorEnv
from twinloop.policies.errors import PolicyConfigError
from twinloop.policies.sb3_vec_env import SB3VecEnv

SHORT = {"episode_days": 1 / 24, "include_iob": True}  # 12 steps of 5 min


def test_same_step_autoreset_returns_the_final_obs_and_the_new_episode():
    nxt = T1DVectorEnv(num_envs=2, **SHORT)
    same = T1DVectorEnv(num_envs=2, autoreset_mode="same_step", **SHORT)
    assert same.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    nxt.reset(seed=3)
    same.reset(seed=3)
    a = np.ones((2, 1), np.float32)
    for _ in range(11):
        o1, *_ = nxt.step(a)
        o2, *_ = same.step(a)
        np.testing.assert_array_equal(o1, o2)
    last, _, _, trunc, _ = nxt.step(a)
    first, _, _, _, _ = nxt.step(a)  # next-step mode resets here
    obs, _, _, trunc2, info = same.step(a)
    assert trunc.all() and trunc2.all()
    assert info["_final_obs"].all()
    np.testing.assert_array_equal(np.stack(info["final_obs"]), last)
    np.testing.assert_array_equal(obs, first)
    assert info["final_info"]["time_min"].tolist() == [60, 60]
    assert info["time_min"].tolist() == [0, 0]


def test_adapter_reports_terminal_observation_and_truncation():
    venv = SB3VecEnv(T1DVectorEnv(num_envs=3, autoreset_mode="same_step", **SHORT))
    venv.seed(5)
    obs = venv.reset()
    assert obs.shape == (3, 2)
    for _ in range(11):
        obs, rewards, dones, infos = venv.step(np.ones((3, 1), np.float32))
        assert rewards.dtype == np.float32 and len(infos) == 3 and not dones.any()
    obs, rewards, dones, infos = venv.step(np.ones((3, 1), np.float32))
    assert dones.all()
    assert all(info["TimeLimit.truncated"] for info in infos)
    assert all(info["terminal_observation"].shape == (2,) for info in infos)
    assert not np.array_equal(infos[0]["terminal_observation"], obs[0])


def test_adapter_refuses_next_step_mode():
    with pytest.raises(PolicyConfigError, match="SAME_STEP"):
        SB3VecEnv(T1DVectorEnv(num_envs=2))


def test_ppo_trains_on_the_vector_env_for_64_steps_and_records_episodes():
    venv = gym.make_vec(
        plant.T1D_ID, num_envs=4, vectorization_mode="vector_entry_point",
        autoreset_mode="same_step", **SHORT,
    )  # fmt: skip
    model = PPO("MlpPolicy", SB3VecEnv(venv), n_steps=16, batch_size=32, n_epochs=1, seed=0)
    model.learn(total_timesteps=64)
    assert model.num_timesteps == 64
    # the bare adapter's episode statistics (rollout/ep_rew_mean): each sub-env ended one
    assert len(model.ep_info_buffer) == 4
    assert {e["l"] for e in model.ep_info_buffer} == {12}
    action, _ = model.predict(np.array([[120.0, 2.0]], np.float32), deterministic=True)
    assert action.shape == (1, 1)


def test_adapter_keeps_episode_statistics_like_vec_monitor():
    """SB3 collects ``info["episode"]`` of ended episodes: what ``rollout/ep_rew_mean`` logs."""
    venv = SB3VecEnv(T1DVectorEnv(num_envs=3, autoreset_mode="same_step", **SHORT))
    venv.seed(1)
    venv.reset()
    returns = np.zeros(3)
    for step in range(12):
        _, rewards, dones, infos = venv.step(np.full((3, 1), 0.5, np.float32))
        returns += rewards
        assert dones.all() == (step == 11)
    assert [info["episode"]["l"] for info in infos] == [12, 12, 12]
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], returns, rtol=1e-6)
    _, _, _, infos = venv.step(np.full((3, 1), 0.5, np.float32))
    assert all("episode" not in info for info in infos)  # a new episode runs
