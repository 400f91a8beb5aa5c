"""Shared batched core of the knee-exoskeleton environments: configuration and one compiled step.

:class:`~twinloop.plant.knee.env.KneeExoEnv` runs this core with one knee and
:class:`~twinloop.plant.knee.env_vector.KneeExoVectorEnv` with N. A control step (clip the torque
command → ``k`` plant steps of 1 ms → encoder, torque sensor and EMG readings → task reference
→ observation → reward → termination) is one numba call for the whole batch and touches each
row only, so a sub-environment of the vector environment seeded with ``s + i`` follows exactly
the trajectory of the single environment seeded with ``s + i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

import twinloop.plant.knee.model
import twinloop.plant.knee.sensors
import twinloop.plant.knee.tasks
from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.knee.model import (
    N_OUT,
    N_PARAMS,
    N_STATE,
    O_EXO_NM,
    O_OMEGA_ABS_MAX,
    O_THETA_MAX,
    O_THETA_MIN,
    PARALLEL_MIN_BATCH,
    PLANT_DT_S,
    PRESETS,
    X_ACT_H,
    X_ACT_Q,
    X_OMEGA,
    X_THETA,
    KneeParams,
    advance_row,
    initial_state,
    knee_preset,
)
from twinloop.plant.knee.sensors import (
    EMGSpec,
    EncoderSpec,
    TorqueSensorSpec,
    draw_key,
    encoder_counts,
    normal,
)
from twinloop.plant.knee.tasks import K_TOTAL, N_TASK, TaskSpec, reference, task_from_name
from twinloop.plant.numba_cache import drop_stale_cache

drop_stale_cache(
    __file__,
    [
        twinloop.plant.knee.model.__file__,
        twinloop.plant.knee.sensors.__file__,
        twinloop.plant.knee.tasks.__file__,
    ],
)

#: Observation layout: (name, unit, low, high); see the env card of KneeExoEnv.
OBS_ANGLE_MAX_RAD = math.pi
OBS_VELOCITY_MAX_RAD_S = 50.0
OBS_EMG_MAX = 3.0
OBS_REF_VELOCITY_MAX_RAD_S = 20.0
N_OBS = 7


@dataclasses.dataclass(frozen=True)
class KneeExoConfig:
    """Configuration of the knee-exoskeleton environments (validated once, at construction).

    Attributes:
        patients: preset names (``healthy``, ``mild``, ``moderate``, ``severe``) and/or
            :class:`twinloop.plant.knee.model.KneeParams`. The single environment uses the first (or
            ``options={"patient": i}``, or a random one when ``sample_patient``); the vector
            environment gives sub-environment ``i`` patient ``i mod len(patients)``.
        sample_patient: draw the patient uniformly at each reset.
        tasks: task names (``sit_to_stand``, ``cyclic``, ``hold``) and/or
            :class:`twinloop.plant.knee.tasks.TaskSpec`; chosen like the patients.
        sample_task: draw the task uniformly at each reset.
        control_hz: control rate, Hz (100–500, dividing the 1 kHz plant rate).
        normalized_action: action in ``[-1, 1]`` × the torque limit instead of N·m.
        max_torque_nm: action-space bound, N·m (default: the largest ``exo_max_torque_nm`` of
            the patients; each drive still saturates at its own limit).
        encoder: joint encoder model.
        torque_sensor: joint torque sensor model.
        emg: EMG envelope model.
        tracking_scale_rad: angle error that costs 1 reward unit, rad.
        assist_weight: weight of the squared normalised torque command in the reward.
        termination_penalty: subtracted from the reward of a terminating step.
        rom_min_rad: episode terminates if the true angle goes below this, rad.
        rom_max_rad: episode terminates if the true angle goes above this, rad.
        max_velocity_rad_s: episode terminates if ``|ω|`` exceeds this, rad/s.
        initial_jitter_rad: standard deviation of the initial angle about the task start, rad.

    """

    patients: tuple[str | KneeParams, ...] = ("moderate",)
    sample_patient: bool = False
    tasks: tuple[str | TaskSpec, ...] = ("cyclic",)
    sample_task: bool = False
    control_hz: int = 100
    normalized_action: bool = False
    max_torque_nm: float | None = None
    encoder: EncoderSpec = dataclasses.field(default_factory=EncoderSpec)
    torque_sensor: TorqueSensorSpec = dataclasses.field(default_factory=TorqueSensorSpec)
    emg: EMGSpec = dataclasses.field(default_factory=EMGSpec)
    tracking_scale_rad: float = math.radians(10.0)
    assist_weight: float = 0.1
    termination_penalty: float = 10.0
    rom_min_rad: float = math.radians(-10.0)
    rom_max_rad: float = math.radians(130.0)
    max_velocity_rad_s: float = 8.0
    initial_jitter_rad: float = math.radians(2.0)

    def __post_init__(self) -> None:
        for name in ("patients", "tasks"):
            value = getattr(self, name)
            if isinstance(value, str | KneeParams | TaskSpec):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
            if not getattr(self, name):
                raise ConfigError(name, value, "at least one entry")
        for p in self.patients:
            if isinstance(p, str) and p not in PRESETS:
                raise ConfigError("patients", p, f"one of {', '.join(PRESETS)} or KneeParams")
            if not isinstance(p, str | KneeParams):
                raise ConfigError("patients", p, "preset names or KneeParams")
        for t in self.tasks:
            task_from_name(t)
        if not (
            isinstance(self.control_hz, int)
            and 100 <= self.control_hz <= 500
            and 1000 % self.control_hz == 0
        ):
            raise ConfigError(
                "control_hz", self.control_hz, "an integer in 100..500 dividing 1000 (plant rate)"
            )
        if self.max_torque_nm is not None and not self.max_torque_nm > 0:
            raise ConfigError("max_torque_nm", self.max_torque_nm, "> 0 or None")
        for name in ("tracking_scale_rad", "max_velocity_rad_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "> 0")
        for name in ("assist_weight", "termination_penalty", "initial_jitter_rad"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, getattr(self, name), ">= 0")
        if not self.rom_min_rad < self.rom_max_rad:
            raise ConfigError(
                "rom_min_rad", self.rom_min_rad, f"< rom_max_rad ({self.rom_max_rad})"
            )

    def patient_table(self) -> tuple[KneeParams, ...]:
        """The patients' parameters, presets expanded."""
        return tuple(knee_preset(p) if isinstance(p, str) else p for p in self.patients)

    def patient_names(self) -> tuple[str, ...]:
        """A name per patient (the preset name, or ``custom#i``)."""
        return tuple(
            p if isinstance(p, str) else f"custom#{i}" for i, p in enumerate(self.patients)
        )

    def task_table(self) -> tuple[TaskSpec, ...]:
        """The task specs."""
        return tuple(task_from_name(t) for t in self.tasks)

    @property
    def action_limit_nm(self) -> float:
        """Torque bound of the action space, N·m."""
        if self.max_torque_nm is not None:
            return self.max_torque_nm
        return max(p.exo_max_torque_nm for p in self.patient_table())

    @property
    def steps_per_control(self) -> int:
        """Plant steps (1 ms) per control step."""
        return 1000 // self.control_hz


# Per-environment scalar state (float64).
S_STEP = 0  #: control steps taken in this episode
S_N_STEPS = 1  #: episode length in control steps
S_ENC_PREV = 2  #: previous encoder reading, counts
S_BIAS = 3  #: torque-sensor bias, N·m
S_REF_THETA = 4  #: task reference angle at the current time, rad
S_REF_OMEGA = 5  #: task reference velocity at the current time, rad/s
S_CMD = 6  #: torque command applied in the last step (after clipping), N·m
N_SCAL = 7

# Configuration vector.
C_K, C_DT, C_ACT_SCALE, C_ACT_LIM, C_CPR, C_ENC_NOISE, C_TQ_NOISE, C_TQ_RANGE = range(8)
C_EMG_DELAY, C_EMG_MULT, C_EMG_ADD, C_TRACK, C_ASSIST, C_PENALTY = range(8, 14)
C_ROM_LO, C_ROM_HI, C_VMAX = range(14, 17)
N_CFG = 17

#: Normal deviates drawn per control step and knee (encoder, torque, EMG ×2 each muscle).
NOISE_PER_STEP = 6


@numba.njit(cache=True, inline="always", error_model="numpy")
def _sense(
    i: int,
    x: NDArray[np.float64],
    out: NDArray[np.float64],
    scal: NDArray[np.float64],
    keys: NDArray[np.uint64],
    emg_buf: NDArray[np.float64],
    task: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    first: bool,
) -> None:
    """Sensor readings, the task reference and the observation of row ``i`` at its time."""
    step = int(scal[i, S_STEP])
    base = np.uint64(step * NOISE_PER_STEP)
    key = keys[i]
    cpr = cfg[C_CPR]
    counts = encoder_counts(x[i, X_THETA], cpr, cfg[C_ENC_NOISE] * normal(key, base))
    scale = 2.0 * math.pi / cpr
    velocity = 0.0 if first else (counts - scal[i, S_ENC_PREV]) * scale / cfg[C_DT]
    scal[i, S_ENC_PREV] = counts
    rng_t = cfg[C_TQ_RANGE]
    torque = out[i, O_EXO_NM] + scal[i, S_BIAS] + cfg[C_TQ_NOISE] * normal(key, base + np.uint64(1))
    torque = min(max(torque, -rng_t), rng_t)
    # EMG: ring buffer of activations, read D control steps back
    depth = emg_buf.shape[1]
    emg_buf[i, step % depth, 0] = x[i, X_ACT_Q]
    emg_buf[i, step % depth, 1] = x[i, X_ACT_H]
    old = (step - int(cfg[C_EMG_DELAY])) % depth
    emg_q = 0.0
    emg_h = 0.0
    for m in range(2):
        n1 = normal(key, base + np.uint64(2 + 2 * m))
        n2 = normal(key, base + np.uint64(3 + 2 * m))
        e = emg_buf[i, old, m] * (1.0 + cfg[C_EMG_MULT] * n1) + cfg[C_EMG_ADD] * n2
        e = min(max(e, 0.0), OBS_EMG_MAX)
        if m == 0:
            emg_q = e
        else:
            emg_h = e
    th_ref, om_ref = reference(task[i], step * cfg[C_DT])
    scal[i, S_REF_THETA] = th_ref
    scal[i, S_REF_OMEGA] = om_ref
    obs[i, 0] = min(max(counts * scale, -OBS_ANGLE_MAX_RAD), OBS_ANGLE_MAX_RAD)
    obs[i, 1] = min(max(velocity, -OBS_VELOCITY_MAX_RAD_S), OBS_VELOCITY_MAX_RAD_S)
    obs[i, 2] = torque
    obs[i, 3] = emg_q
    obs[i, 4] = emg_h
    obs[i, 5] = min(max(th_ref, -OBS_ANGLE_MAX_RAD), OBS_ANGLE_MAX_RAD)
    obs[i, 6] = min(max(om_ref, -OBS_REF_VELOCITY_MAX_RAD_S), OBS_REF_VELOCITY_MAX_RAD_S)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _step_one(
    i: int,
    action: NDArray[np.float64],
    x: NDArray[np.float64],
    params: NDArray[np.float64],
    out: NDArray[np.float64],
    scal: NDArray[np.float64],
    keys: NDArray[np.uint64],
    emg_buf: NDArray[np.float64],
    task: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    reward: NDArray[np.float64],
    terminated: NDArray[np.bool_],
    truncated: NDArray[np.bool_],
) -> None:
    lim = cfg[C_ACT_LIM]
    cmd = min(max(action[i], -lim), lim) * cfg[C_ACT_SCALE]
    scal[i, S_CMD] = cmd
    advance_row(
        x[i], params[i], cmd, scal[i, S_REF_THETA], scal[i, S_REF_OMEGA], int(cfg[C_K]), out[i]
    )
    scal[i, S_STEP] += 1.0
    _sense(i, x, out, scal, keys, emg_buf, task, cfg, obs, False)
    err = (x[i, X_THETA] - scal[i, S_REF_THETA]) / cfg[C_TRACK]
    u = cmd / (lim * cfg[C_ACT_SCALE])
    r = -(err * err) - cfg[C_ASSIST] * u * u
    bad = not (math.isfinite(x[i, X_THETA]) and math.isfinite(x[i, X_OMEGA]))
    term = (
        bad
        or out[i, O_THETA_MIN] < cfg[C_ROM_LO]
        or out[i, O_THETA_MAX] > cfg[C_ROM_HI]
        or out[i, O_OMEGA_ABS_MAX] > cfg[C_VMAX]
    )
    if term:
        r -= cfg[C_PENALTY]
        if bad:
            r = -cfg[C_PENALTY] - 1.0
            for j in range(obs.shape[1]):
                if not math.isfinite(obs[i, j]):
                    obs[i, j] = 0.0
    reward[i] = r
    terminated[i] = term
    truncated[i] = (not term) and scal[i, S_STEP] >= scal[i, S_N_STEPS]


@numba.njit(cache=True, error_model="numpy")
def _step_serial(
    active: NDArray[np.bool_],
    action: NDArray[np.float64],
    x: NDArray[np.float64],
    params: NDArray[np.float64],
    out: NDArray[np.float64],
    scal: NDArray[np.float64],
    keys: NDArray[np.uint64],
    emg_buf: NDArray[np.float64],
    task: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    reward: NDArray[np.float64],
    terminated: NDArray[np.bool_],
    truncated: NDArray[np.bool_],
) -> None:
    for i in range(x.shape[0]):
        if active[i]:
            _step_one(
                i, action, x, params, out, scal, keys, emg_buf, task, cfg, obs, reward,
                terminated, truncated,
            )  # fmt: skip


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _step_parallel(
    active: NDArray[np.bool_],
    action: NDArray[np.float64],
    x: NDArray[np.float64],
    params: NDArray[np.float64],
    out: NDArray[np.float64],
    scal: NDArray[np.float64],
    keys: NDArray[np.uint64],
    emg_buf: NDArray[np.float64],
    task: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
    reward: NDArray[np.float64],
    terminated: NDArray[np.bool_],
    truncated: NDArray[np.bool_],
) -> None:
    for i in numba.prange(x.shape[0]):
        if active[i]:
            _step_one(
                i, action, x, params, out, scal, keys, emg_buf, task, cfg, obs, reward,
                terminated, truncated,
            )  # fmt: skip


@numba.njit(cache=True, error_model="numpy")
def _sense_rows(
    indices: NDArray[np.intp],
    x: NDArray[np.float64],
    out: NDArray[np.float64],
    scal: NDArray[np.float64],
    keys: NDArray[np.uint64],
    emg_buf: NDArray[np.float64],
    task: NDArray[np.float64],
    cfg: NDArray[np.float64],
    obs: NDArray[np.float32],
) -> None:
    for i in indices:
        _sense(i, x, out, scal, keys, emg_buf, task, cfg, obs, True)


def config_from_kwargs(config: KneeExoConfig | None, kwargs: dict[str, Any]) -> KneeExoConfig:
    """The environments' constructor arguments as one config (``patient=``/``task=`` accepted)."""
    kwargs = dict(kwargs)
    for short, long in (("patient", "patients"), ("task", "tasks")):
        if short in kwargs:
            kwargs[long] = (kwargs.pop(short),)
    if config is None:
        return KneeExoConfig(**kwargs)
    return dataclasses.replace(config, **kwargs) if kwargs else config


class KneeExoBatch:
    """N knees + exoskeletons advanced together by control steps (the engine of both envs)."""

    def __init__(self, config: KneeExoConfig, n: int) -> None:
        self.config = config
        self.n = n
        self.table = config.patient_table()
        self.names = config.patient_names()
        self.tasks = config.task_table()
        self._param_rows = np.stack([p.vector() for p in self.table])
        self.x = np.zeros((n, N_STATE))
        self.params = np.zeros((n, N_PARAMS))
        self.out = np.zeros((n, N_OUT))
        self.scal = np.zeros((n, N_SCAL))
        self.keys = np.zeros(n, dtype=np.uint64)
        depth = config.emg.delay_steps(config.control_hz) + 1
        self.emg_buf = np.zeros((n, depth, 2))
        self.task = np.zeros((n, N_TASK))
        self.obs = np.zeros((n, N_OBS), dtype=np.float32)
        self.reward = np.zeros(n)
        self.terminated = np.zeros(n, dtype=np.bool_)
        self.truncated = np.zeros(n, dtype=np.bool_)
        self.patient_index = np.zeros(n, dtype=np.int64)
        self.task_index = np.zeros(n, dtype=np.int64)
        cfg = np.zeros(N_CFG)
        limit = config.action_limit_nm
        cfg[C_K] = config.steps_per_control
        cfg[C_DT] = config.steps_per_control * PLANT_DT_S
        cfg[C_ACT_SCALE] = limit if config.normalized_action else 1.0
        cfg[C_ACT_LIM] = 1.0 if config.normalized_action else limit
        cfg[C_CPR] = config.encoder.counts_per_rev
        cfg[C_ENC_NOISE] = config.encoder.noise_counts
        cfg[C_TQ_NOISE] = config.torque_sensor.noise_nm
        cfg[C_TQ_RANGE] = config.torque_sensor.range_nm
        cfg[C_EMG_DELAY] = depth - 1
        cfg[C_EMG_MULT] = config.emg.multiplicative_noise
        cfg[C_EMG_ADD] = config.emg.additive_noise
        cfg[C_TRACK] = config.tracking_scale_rad
        cfg[C_ASSIST] = config.assist_weight
        cfg[C_PENALTY] = config.termination_penalty
        cfg[C_ROM_LO] = config.rom_min_rad
        cfg[C_ROM_HI] = config.rom_max_rad
        cfg[C_VMAX] = config.max_velocity_rad_s
        self.cfg_vec = cfg
        self._all = np.ones(n, dtype=np.bool_)
        self._parallel = n >= PARALLEL_MIN_BATCH and numba.get_num_threads() > 1

    def reset_many(
        self,
        indices: NDArray[np.intp],
        rngs: Sequence[np.random.Generator],
        patients: NDArray[np.intp],
        tasks: NDArray[np.intp],
    ) -> None:
        """Start new episodes for rows ``indices`` with table indices ``patients``/``tasks``.

        Row ``indices[j]`` draws from three child generators of ``rngs[j]`` (``spawn(3)``): the
        task's randomisation, the initial angle, and the sensors (noise key, torque bias).
        """
        cfg = self.config
        for j, i in enumerate(indices):
            task_rng, init_rng, sensor_rng = rngs[j].spawn(3)
            row = self.tasks[int(tasks[j])].sample(task_rng)
            self.task[i] = row
            th0, _ = reference(row, 0.0)
            th0 += float(init_rng.normal(0.0, cfg.initial_jitter_rad))
            self.x[i] = initial_state(th0)
            self.keys[i] = draw_key(sensor_rng)
            self.scal[i] = 0.0
            self.scal[i, S_BIAS] = float(sensor_rng.normal(0.0, cfg.torque_sensor.bias_sd_nm))
            self.scal[i, S_N_STEPS] = max(1, round(row[K_TOTAL] * cfg.control_hz))
        self.params[indices] = self._param_rows[patients]
        self.patient_index[indices] = patients
        self.task_index[indices] = tasks
        self.out[indices] = 0.0
        self.emg_buf[indices] = 0.0
        self.reward[indices] = 0.0
        self.terminated[indices] = False
        self.truncated[indices] = False
        _sense_rows(
            np.asarray(indices, dtype=np.intp), self.x, self.out, self.scal, self.keys,
            self.emg_buf, self.task, self.cfg_vec, self.obs,
        )  # fmt: skip

    def step(self, action: NDArray[np.float64], active: NDArray[np.bool_] | None = None) -> None:
        """Advance the active rows by one control step (results in the batch arrays)."""
        kernel = _step_parallel if self._parallel else _step_serial
        kernel(
            self._all if active is None else active, action, self.x, self.params, self.out,
            self.scal, self.keys, self.emg_buf, self.task, self.cfg_vec, self.obs, self.reward,
            self.terminated, self.truncated,
        )  # fmt: skip


def check_action(action: object, n: int) -> NDArray[np.float64]:
    """An action (one torque per env) as float64 ``(n,)``; NaN or a wrong shape raises.

    Raises:
        InvalidInputError: wrong shape (only length-1 axes may be missing or extra) or NaN.

    """
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (n,):
        if a.size != n or any(d not in (1, n) for d in a.shape):
            raise InvalidInputError(f"action: expected shape ({n}, 1) or ({n},), got {a.shape}")
        a = a.reshape(n)
    if np.isnan(a).any():
        raise InvalidInputError(f"action: NaN in {a.tolist()}; actions are exo torques (N·m)")
    return a
