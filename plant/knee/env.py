"""``twinloop/KneeExo-v0``: one impaired knee in a rehabilitation exoskeleton as a Gymnasium env."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError, ResetNeededError
from twinloop.plant.knee.env_core import (
    C_DT,
    OBS_ANGLE_MAX_RAD,
    OBS_EMG_MAX,
    OBS_REF_VELOCITY_MAX_RAD_S,
    OBS_VELOCITY_MAX_RAD_S,
    S_CMD,
    S_REF_OMEGA,
    S_REF_THETA,
    S_STEP,
    KneeExoBatch,
    KneeExoConfig,
    check_action,
    config_from_kwargs,
)
from twinloop.plant.knee.model import (
    O_EXO_NM,
    O_EXO_WORK_J,
    O_OMEGA_ABS_MAX,
    O_PATIENT_NM,
    O_PATIENT_WORK_J,
    O_THETA_MAX,
    O_THETA_MIN,
    X_MF_Q,
    X_OMEGA,
    X_THETA,
)


def make_spaces(config: KneeExoConfig) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Action and observation spaces of one environment for ``config``."""
    bound = 1.0 if config.normalized_action else config.action_limit_nm
    action_space = gym.spaces.Box(low=-bound, high=bound, shape=(1,), dtype=np.float32)
    tq = config.torque_sensor.range_nm
    low = np.array(
        [-OBS_ANGLE_MAX_RAD, -OBS_VELOCITY_MAX_RAD_S, -tq, 0.0, 0.0, -OBS_ANGLE_MAX_RAD,
         -OBS_REF_VELOCITY_MAX_RAD_S], dtype=np.float32,
    )  # fmt: skip
    high = np.array(
        [OBS_ANGLE_MAX_RAD, OBS_VELOCITY_MAX_RAD_S, tq, OBS_EMG_MAX, OBS_EMG_MAX,
         OBS_ANGLE_MAX_RAD, OBS_REF_VELOCITY_MAX_RAD_S], dtype=np.float32,
    )  # fmt: skip
    return action_space, gym.spaces.Box(low=low, high=high, dtype=np.float32)


def info_of(batch: KneeExoBatch, i: int | slice) -> dict[str, Any]:
    """The info values of row(s) ``i`` (floats for an int, arrays for a slice)."""
    x, out, scal = batch.x, batch.out, batch.scal
    dt = batch.cfg_vec[C_DT]
    theta = x[i, X_THETA]
    return {
        "theta_rad": theta,
        "omega_rad_s": x[i, X_OMEGA],
        "ref_theta_rad": scal[i, S_REF_THETA],
        "ref_omega_rad_s": scal[i, S_REF_OMEGA],
        "tracking_error_rad": theta - scal[i, S_REF_THETA],
        "patient_torque_nm": out[i, O_PATIENT_NM],
        "exo_torque_nm": out[i, O_EXO_NM],
        "exo_command_nm": scal[i, S_CMD],
        "patient_work_j": out[i, O_PATIENT_WORK_J],
        "exo_work_j": out[i, O_EXO_WORK_J],
        "quad_fatigue": x[i, X_MF_Q],
        "theta_min_rad": out[i, O_THETA_MIN],
        "theta_max_rad": out[i, O_THETA_MAX],
        "omega_abs_max_rad_s": out[i, O_OMEGA_ABS_MAX],
        "time_s": scal[i, S_STEP] * dt,
    }


class KneeExoEnv(gym.Env[NDArray[Any], NDArray[Any]]):
    """One knee (shank + foot, quadriceps, hamstrings) in a one-DOF rehabilitation exoskeleton.

    ## Description
    The plant is :mod:`twinloop.plant.knee.model`: a seated patient's knee under gravity with
    the passive knee moment of Riener & Edrich (1999) at the posture's hip angle (90° by default:
    ≈ 27 N·m flexing at 10° of flexion; a patient field ``hip_flexion_rad`` changes it), soft
    end stops, Hill-type quadriceps and hamstrings driven by the patient's own intent (a PD
    controller on the task plus the static load, saturated at the residual strength),
    a spastic stretch reflex, muscle fatigue, and an exoskeleton drive with torque and slew
    limits and gear friction. The patient tries to follow a rehabilitation task
    (:mod:`twinloop.plant.knee.tasks`: ``cyclic`` flexion–extension by default, ``sit_to_stand``
    extension, ``hold``); the agent commands the exoskeleton torque that helps. The plant runs
    at 1 kHz; one environment step lasts ``1/control_hz`` s (10 ms at the default 100 Hz) with
    the command held. Angles: 0 = full extension, positive = flexion.

    ## Action space
    ``Box(-T, T, (1,), float32)``: exoskeleton torque command in **N·m** (positive = flexion),
    ``T = max_torque_nm`` (default: the drive limit, 60 N·m). With ``normalized_action=True``:
    ``Box(-1, 1)`` × ``T``. Actions outside the space are clipped; the drive then applies its
    own saturation, slew-rate limit and friction. NaN raises
    :class:`twinloop.plant.errors.InvalidInputError`.

    ## Observation space
    ``Box(float32, (7,))`` (sensor readings, clipped to the bounds):

    | index | meaning | unit | min | max |
    |---|---|---|---|---|
    | 0 | encoder angle (quantised, noisy) | rad | −π | π |
    | 1 | encoder velocity (difference over the step) | rad/s | −50 | 50 |
    | 2 | joint torque sensor (exo torque + bias + noise) | N·m | −range | range |
    | 3 | quadriceps EMG envelope (delayed, noisy) | fraction of max | 0 | 3 |
    | 4 | hamstrings EMG envelope | fraction of max | 0 | 3 |
    | 5 | task reference angle at the new time | rad | −π | π |
    | 6 | task reference velocity | rad/s | −20 | 20 |

    ``range`` is ``torque_sensor.range_nm`` (150 N·m by default).

    ## Reward
    ``−((θ − θ_ref)/tracking_scale_rad)² − assist_weight·(τ_cmd/T)²`` with the *true* angle at
    the end of the step and the reference at that time (so 0 is perfect, unassisted tracking;
    a 10° error costs 1), minus ``termination_penalty`` (10) on a terminating step.

    ## Starting state
    At the task's first reference angle plus ``N(0, initial_jitter_rad²)``, at rest, muscles
    inactive and rested, drive at zero torque. Task randomisation, the initial angle and the
    sensor noise (key, torque bias) come from child generators of ``np_random``, so the same
    seed gives the same episode.

    ## Episode end
    *Terminated* when the true angle leaves ``[rom_min_rad, rom_max_rad]`` (−10°, 130°) or
    ``|ω|`` exceeds ``max_velocity_rad_s`` (8 rad/s) at any plant step of the control period
    (or the state is not finite). *Truncated* at the task's end. Stepping before ``reset()`` or
    after the end raises :class:`twinloop.plant.errors.ResetNeededError`.

    ## Info
    ``theta_rad``, ``omega_rad_s`` (true), ``ref_theta_rad``, ``ref_omega_rad_s``,
    ``tracking_error_rad``, ``patient_torque_nm`` (net muscle torque), ``exo_torque_nm`` (on the
    joint), ``exo_command_nm`` (after clipping), ``patient_work_j`` and ``exo_work_j`` (over the
    step), ``quad_fatigue`` (fatigued fraction ``M_F``), ``theta_min_rad``/``theta_max_rad``
    and ``omega_abs_max_rad_s`` (the extremes over the step's plant steps, which decide
    termination), ``time_s``, ``patient``, ``task``.

    ## Arguments
    Keyword arguments are the fields of :class:`twinloop.plant.knee.env_core.KneeExoConfig`, or
    ``config=`` one instance; ``patient="severe"``/``task="hold"`` are accepted.
    ``reset(options={"patient": i, "task": j})`` picks table entries for one episode.

    ## Version history
    * v0: initial version.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, config: KneeExoConfig | None = None, **kwargs: Any) -> None:
        config = config_from_kwargs(config, kwargs)
        self.config = config
        self._batch = KneeExoBatch(config, 1)
        self.action_space, self.observation_space = make_spaces(config)
        self._needs_reset = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        """Start an episode; ``seed`` reseeds ``np_random``, which draws everything random."""
        super().reset(seed=seed)
        b = self._batch
        options = options or {}
        choice = []
        for key, n, sample in (
            ("patient", len(b.table), self.config.sample_patient),
            ("task", len(b.tasks), self.config.sample_task),
        ):
            if key in options:
                k = options[key]
                if not (isinstance(k, int | np.integer) and 0 <= k < n):
                    raise ConfigError(f"options['{key}']", k, f"an index in 0..{n - 1}")
                choice.append(int(k))
            else:
                choice.append(int(self.np_random.integers(n)) if sample else 0)
        b.reset_many(
            np.zeros(1, dtype=np.intp), [self.np_random], np.array([choice[0]]),
            np.array([choice[1]]),
        )  # fmt: skip
        self._needs_reset = False
        return b.obs[0].copy(), self._info()

    def step(
        self, action: NDArray[np.float32]
    ) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        """Hold the torque command for one control period and return the sensor observation."""
        if self._needs_reset:
            raise ResetNeededError(
                "KneeExoEnv.step: call reset() first (before the first step and after an "
                "episode terminates or is truncated)"
            )
        b = self._batch
        b.step(check_action(action, 1))
        term = bool(b.terminated[0])
        trunc = bool(b.truncated[0])
        self._needs_reset = term or trunc
        return b.obs[0].copy(), float(b.reward[0]), term, trunc, self._info()

    def _info(self) -> dict[str, Any]:
        b = self._batch
        info: dict[str, Any] = {k: float(v) for k, v in info_of(b, 0).items()}
        info["patient"] = b.names[int(b.patient_index[0])]
        info["task"] = int(b.task_index[0])
        return info
