"""Observation features and action mapping shared by policy training and the loaded controller.

A learned insulin policy sees *normalised* features and acts *relative to the patient's
profile*, so that one policy generalises across the patients of a cohort and runs in the loop
exactly as it was trained:

Observation (features chosen by name, concatenated in the order given):

| feature | size | value | unit of the raw input |
|---|---|---|---|
| ``cgm`` | N | ``(G − 120) / 100`` for the last N CGM readings, oldest first | mg/dL |
| ``iob`` | 1 | ``net_IOB × CF / 100``: net insulin on board as the glucose drop it will cause | U |
| ``meal`` | 1 | ``carbs / CR × CF / 100``: the announced meal as the glucose rise it causes | g |
| ``clock`` | 2 | ``sin, cos(2π · clock / 1440)``, clock = minutes after midnight | min |

``net_IOB`` is insulin on board above the scheduled basal's steady state, exactly as the loop
computes it (:class:`twinloop.plant.glucose.insulin.IobTracker`: exponential curve, peak 75 min, DIA
6 h, each minute's insulin aged from the middle of its minute), *not* the env's own per-period IOB.
CF is the correction factor (mg/dL per U), CR the carbohydrate ratio (g/U).

Action (a mode chosen by name; every component in ``[-1, 1]``, clipped):

* ``a[0]`` → temp basal ``m(a) × scheduled basal`` (U/h) with ``m = 1 + a`` for ``a < 0``
  (``a = −1`` suspends) and ``m = 1 + a·(k − 1)`` for ``a ≥ 0`` (``k`` = ``max_basal_multiplier``,
  3 by default, the supervisor's 3 × basal cap), so ``a = 0`` is the scheduled basal;
* ``basal+meal_bolus`` adds the meal bolus ``announced_carbs / CR`` (U) when carbs are
  announced; ``basal+scaled_meal_bolus`` scales it by ``1 + bolus_scale · a[1]``.

:func:`observation_features` and :func:`action_to_dose` are vectorised over rows (patients);
the training wrapper :class:`FeatureVecEnv` calls them for all sub-environments at once and the
loop's controller (:mod:`twinloop.policies.glucose.learned`) calls them with one row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvObs,
    VecEnvStepReturn,
    VecEnvWrapper,
)

from twinloop.plant.glucose.cohorts import find_patient
from twinloop.plant.glucose.insulin import DEFAULT_DIA_MIN, DEFAULT_PEAK_MIN, iob_fraction
from twinloop.plant.glucose.patients import PatientParameters
from twinloop.plant.glucose.pump import PumpSpec, quantize_basal, quantize_bolus
from twinloop.plant.glucose.scenarios import MIN_PER_DAY
from twinloop.plant.units import MIN_PER_H
from twinloop.policies.errors import PolicyConfigError

#: Version of the observation/action semantics of a saved policy. Bump it whenever the meaning
#: of a feature, a normalisation constant, the action mapping or the env underneath changes:
#: a policy saved under another version is refused on load.
ENV_LAYOUT_VERSION = 1

#: CGM normalisation: ``(G − CGM_CENTER_MG_DL) / CGM_SCALE_MG_DL``.
CGM_CENTER_MG_DL = 120.0
CGM_SCALE_MG_DL = 100.0
#: Glucose-equivalent scale of the ``iob`` and ``meal`` features, mg/dL.
GLUCOSE_EFFECT_SCALE_MG_DL = 100.0

#: Feature names → whether the size is chosen (``cgm: N``) or fixed (the size).
FEATURES: dict[str, int | None] = {"cgm": None, "iob": 1, "meal": 1, "clock": 2}
#: Action modes → number of action components.
ACTION_MODES: dict[str, int] = {"basal": 1, "basal+meal_bolus": 1, "basal+scaled_meal_bolus": 2}
#: Largest CGM history a policy may ask for (readings; 288 = one day at 5 min).
MAX_CGM_HISTORY = 288


def _describe_feature(name: str) -> str:
    return {
        "cgm": f"(G_mg_dl - {CGM_CENTER_MG_DL:g}) / {CGM_SCALE_MG_DL:g}, oldest first",
        "iob": f"net_iob_u * CF / {GLUCOSE_EFFECT_SCALE_MG_DL:g}",
        "meal": f"announced_g / CR * CF / {GLUCOSE_EFFECT_SCALE_MG_DL:g}",
        "clock": "sin, cos of 2*pi*clock_min/1440",
    }[name]


@dataclasses.dataclass(frozen=True)
class ObservationLayout:
    """Which features a policy observes, in order (validated once).

    Attributes:
        features: ``(name, size)`` pairs; names from :data:`FEATURES`, ``cgm`` with its number
            of readings (1 … :data:`MAX_CGM_HISTORY`).
        iob_peak_min: peak of the insulin activity curve of the ``iob`` feature, minutes.
        iob_dia_min: duration of insulin action of that curve, minutes.

    """

    features: tuple[tuple[str, int], ...]
    iob_peak_min: float = DEFAULT_PEAK_MIN
    iob_dia_min: float = DEFAULT_DIA_MIN

    def __post_init__(self) -> None:
        if not self.features:
            raise PolicyConfigError(
                f"observation: no features; choose from {', '.join(FEATURES)} (e.g. cgm: 12)"
            )
        seen: set[str] = set()
        for name, size in self.features:
            if name not in FEATURES:
                raise PolicyConfigError(
                    f"observation: unknown feature {name!r}; features are {', '.join(FEATURES)}"
                )
            if name in seen:
                raise PolicyConfigError(f"observation: feature {name!r} appears twice")
            seen.add(name)
            fixed = FEATURES[name]
            if fixed is None:
                if isinstance(size, bool) or not isinstance(size, int):
                    raise PolicyConfigError(
                        f"observation.{name}: {size!r} is not allowed: a number of readings "
                        f"1..{MAX_CGM_HISTORY}"
                    )
                if not 1 <= size <= MAX_CGM_HISTORY:
                    raise PolicyConfigError(
                        f"observation.{name}: {size!r} is not allowed: a number of readings "
                        f"1..{MAX_CGM_HISTORY}"
                    )
            elif size != fixed:
                raise PolicyConfigError(
                    f"observation.{name}: size {size!r} is not allowed: {name} has size {fixed}"
                )

    @classmethod
    def parse(cls, value: object) -> ObservationLayout:
        """From YAML: a mapping ``{cgm: 12, iob: true, meal: true}`` or a list of names/mappings.

        ``true`` switches a fixed-size feature on, ``false`` leaves it out.
        """
        items: list[tuple[str, Any]] = []
        if isinstance(value, Mapping):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            for entry in value:
                if isinstance(entry, str):
                    items.append((entry, True))
                elif isinstance(entry, Mapping) and len(entry) == 1:
                    ((k, v),) = entry.items()
                    items.append((str(k), v))
                else:
                    raise PolicyConfigError(
                        f"observation: entry {entry!r} is not allowed: a feature name or "
                        f"{{name: size}}; features are {', '.join(FEATURES)}"
                    )
        else:
            raise PolicyConfigError(
                f"observation: {value!r} is not allowed: a mapping such as "
                f"{{cgm: 12, iob: true, meal: true}}; features are {', '.join(FEATURES)}"
            )
        features: list[tuple[str, int]] = []
        for name, v in items:
            if name not in FEATURES:
                raise PolicyConfigError(
                    f"observation: unknown feature {name!r}; features are {', '.join(FEATURES)}"
                )
            fixed = FEATURES[name]
            if fixed is not None and isinstance(v, bool):
                if v:
                    features.append((name, fixed))
                continue
            features.append((name, v))
        return cls(tuple(features))

    @property
    def size(self) -> int:
        """Length of the observation vector."""
        return sum(size for _, size in self.features)

    @property
    def cgm_history(self) -> int:
        """CGM readings the features need (at least 1: the env always keeps one)."""
        return max([size for name, size in self.features if name == "cgm"] or [1])

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored in a saved policy's metadata and compared on load)."""
        return {
            "features": [
                {"name": name, "size": size, "value": _describe_feature(name)}
                for name, size in self.features
            ],
            "size": self.size,
            "constants": {
                "cgm_center_mg_dl": CGM_CENTER_MG_DL,
                "cgm_scale_mg_dl": CGM_SCALE_MG_DL,
                "glucose_effect_scale_mg_dl": GLUCOSE_EFFECT_SCALE_MG_DL,
                "iob_peak_min": self.iob_peak_min,
                "iob_dia_min": self.iob_dia_min,
            },
        }

    @classmethod
    def from_description(cls, desc: Mapping[str, Any]) -> ObservationLayout:
        """Inverse of :meth:`describe` (the constants are checked by the caller)."""
        feats = tuple((str(f["name"]), int(f["size"])) for f in desc["features"])
        consts = desc.get("constants", {})
        return cls(
            feats,
            iob_peak_min=float(consts.get("iob_peak_min", DEFAULT_PEAK_MIN)),
            iob_dia_min=float(consts.get("iob_dia_min", DEFAULT_DIA_MIN)),
        )

    def observation_space(self) -> gym.spaces.Box:
        """The policy's observation space (unbounded float32 box of :attr:`size`)."""
        return gym.spaces.Box(-np.inf, np.inf, shape=(self.size,), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class ActionLayout:
    """How the policy's action in ``[-1, 1]^d`` becomes a dose (validated once).

    Attributes:
        mode: one of :data:`ACTION_MODES`.
        max_basal_multiplier: ``k``: ``a[0] = 1`` asks for ``k ×`` the scheduled basal (> 1).
        bolus_scale: ``basal+scaled_meal_bolus``: the meal bolus is ``carbs/CR × (1 +
            bolus_scale · a[1])``; in ``[0, 1]``.

    """

    mode: str = "basal+meal_bolus"
    max_basal_multiplier: float = 3.0
    bolus_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ACTION_MODES:
            raise PolicyConfigError(
                f"action.mode: unknown action mode {self.mode!r}; modes are "
                f"{', '.join(ACTION_MODES)}"
            )
        k = self.max_basal_multiplier
        if isinstance(k, bool) or not isinstance(k, int | float) or not 1.0 < k <= 10.0:
            raise PolicyConfigError(
                f"action.max_basal_multiplier: {k!r} is not allowed: a number in (1, 10]"
            )
        s = self.bolus_scale
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s <= 1.0:
            raise PolicyConfigError(f"action.bolus_scale: {s!r} is not allowed: in [0, 1]")

    @classmethod
    def parse(cls, value: object) -> ActionLayout:
        """From YAML: a mode name or ``{mode, max_basal_multiplier, bolus_scale}``."""
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(map(str, value)) - known)
            if unknown:
                raise PolicyConfigError(
                    f"action: unknown key(s) {', '.join(unknown)}; keys are {', '.join(known)}"
                )
            return cls(**{str(k): v for k, v in value.items()})
        raise PolicyConfigError(
            f"action: {value!r} is not allowed: a mode ({', '.join(ACTION_MODES)}) or a mapping"
        )

    @property
    def size(self) -> int:
        """Number of action components."""
        return ACTION_MODES[self.mode]

    @property
    def has_bolus(self) -> bool:
        """Whether the dose includes a meal bolus."""
        return self.mode != "basal"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored in a saved policy's metadata and compared on load)."""
        return {
            "mode": self.mode,
            "size": self.size,
            "max_basal_multiplier": float(self.max_basal_multiplier),
            "bolus_scale": float(self.bolus_scale),
            "basal": "a<0: (1+a)*basal; a>=0: (1+a*(k-1))*basal, U/h",
            "bolus": {
                "basal": "none",
                "basal+meal_bolus": "announced_g/CR, U",
                "basal+scaled_meal_bolus": "announced_g/CR*(1+bolus_scale*a[1]), U",
            }[self.mode],
        }

    def action_space(self) -> gym.spaces.Box:
        """The policy's action space, ``Box(-1, 1, (size,))``."""
        return gym.spaces.Box(-1.0, 1.0, shape=(self.size,), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class PatientProfile:
    """Per-row clinical constants the mapping needs (arrays of shape ``(n,)``).

    Attributes:
        basal_u_per_h: scheduled basal, U/h.
        carb_ratio_g_per_u: CR, g/U.
        correction_factor_mg_dl_per_u: CF, mg/dL per U.

    """

    basal_u_per_h: NDArray[np.float64]
    carb_ratio_g_per_u: NDArray[np.float64]
    correction_factor_mg_dl_per_u: NDArray[np.float64]

    @classmethod
    def of(cls, patients: Sequence[PatientParameters]) -> PatientProfile:
        """The profiles of ``patients``, one row each."""
        return cls(
            np.array([p.basal_u_per_h for p in patients], dtype=np.float64),
            np.array([p.carb_ratio_g_per_u for p in patients], dtype=np.float64),
            np.array([p.correction_factor_mg_dl_per_u for p in patients], dtype=np.float64),
        )


#: Bound of every normalised feature (inputs beyond it are clipped; NaN counts as 0).
FEATURE_LIMIT = 100.0


def observation_features(
    layout: ObservationLayout,
    profile: PatientProfile,
    *,
    cgm_mg_dl: NDArray[np.float64],
    net_iob_u: NDArray[np.float64],
    meal_g: NDArray[np.float64],
    clock_min: NDArray[np.float64],
) -> NDArray[np.float32]:
    """The policy's observation for ``n`` rows.

    Args:
        layout: the features.
        profile: the rows' patients.
        cgm_mg_dl: ``(n, H)`` CGM history, oldest first, ``H >= layout.cgm_history`` (the
            newest readings are used).
        net_iob_u: ``(n,)`` net insulin on board, U.
        meal_g: ``(n,)`` carbohydrates announced for the coming period, g.
        clock_min: ``(n,)`` clock time, minutes after midnight (any value; taken mod 1440).

    Returns:
        ``(n, layout.size)`` float32.

    """
    with np.errstate(over="ignore", invalid="ignore"):  # absurd inputs: bounded below
        cf = profile.correction_factor_mg_dl_per_u
        parts: list[NDArray[np.float64]] = []
        for name, size in layout.features:
            if name == "cgm":
                hist = cgm_mg_dl[:, cgm_mg_dl.shape[1] - size :]
                parts.append((hist - CGM_CENTER_MG_DL) / CGM_SCALE_MG_DL)
            elif name == "iob":
                parts.append((net_iob_u * cf / GLUCOSE_EFFECT_SCALE_MG_DL)[:, np.newaxis])
            elif name == "meal":
                effect = meal_g / profile.carb_ratio_g_per_u * cf / GLUCOSE_EFFECT_SCALE_MG_DL
                parts.append(effect[:, np.newaxis])
            else:  # clock
                angle = 2.0 * math.pi * np.mod(clock_min, MIN_PER_DAY) / MIN_PER_DAY
                parts.append(np.stack((np.sin(angle), np.cos(angle)), axis=1))
    out = np.concatenate(parts, axis=1)
    # a faulty input (an absurd or non-finite IOB or meal) must not reach the network as inf
    # or NaN: bounded far outside anything physiological (±100 = ±10,000 mg/dL of effect)
    np.nan_to_num(out, copy=False, nan=0.0, posinf=FEATURE_LIMIT, neginf=-FEATURE_LIMIT)
    return np.clip(out, -FEATURE_LIMIT, FEATURE_LIMIT).astype(np.float32)


def action_to_dose(
    layout: ActionLayout,
    profile: PatientProfile,
    action: NDArray[Any],
    meal_g: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Map ``(n, layout.size)`` policy actions to ``(basal U/h, bolus U)``, each ``(n,)``.

    ``meal_g`` is the carbohydrate announced for the coming period (g). Actions are clipped to
    ``[-1, 1]``; NaN actions give NaN doses (the supervisor refuses them).
    """
    a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1, layout.size), -1.0, 1.0)
    a0 = a[:, 0]
    k = float(layout.max_basal_multiplier)
    multiplier = np.where(a0 < 0.0, 1.0 + a0, 1.0 + a0 * (k - 1.0))
    basal = multiplier * profile.basal_u_per_h
    if layout.mode == "basal":
        bolus = np.zeros_like(basal)
    else:
        bolus = meal_g / profile.carb_ratio_g_per_u
        if layout.mode == "basal+scaled_meal_bolus":
            bolus = bolus * (1.0 + float(layout.bolus_scale) * a[:, 1])
    return basal, bolus


class NetIobBatch:
    """Net insulin on board of ``n`` patients from minute-by-minute delivery, vectorised.

    The same arithmetic as :class:`twinloop.plant.glucose.insulin.IobTracker` (each minute's insulin
    aged from the middle of its minute, net of the scheduled basal's steady state), for a batch: the
    ``iob`` feature in training is the number the loop gives the controller.

    Args:
        basal_u_per_h: ``(n,)`` scheduled basal of each row, U/h.
        peak_min: peak of the activity curve, minutes.
        dia_min: duration of insulin action, minutes.

    """

    def __init__(
        self,
        basal_u_per_h: NDArray[np.float64],
        *,
        peak_min: float = DEFAULT_PEAK_MIN,
        dia_min: float = DEFAULT_DIA_MIN,
    ) -> None:
        horizon = int(np.ceil(dia_min))
        ages = np.arange(horizon, 0, -1, dtype=np.float64) - 0.5  # oldest minute first
        self._weights = iob_fraction(ages, peak_min=peak_min, dia_min=dia_min)
        self.history_u = np.zeros((len(basal_u_per_h), horizon))
        self._basal_iob_u = np.zeros(len(basal_u_per_h))
        self.reset(np.arange(len(basal_u_per_h)), np.asarray(basal_u_per_h, dtype=np.float64))

    def reset(self, rows: NDArray[np.intp], basal_u_per_h: NDArray[np.float64]) -> None:
        """Put ``rows`` in basal steady state (net IOB 0) for their scheduled basal."""
        per_min = basal_u_per_h / MIN_PER_H
        self.history_u[rows] = per_min[:, np.newaxis]
        self._basal_iob_u[rows] = self._weights.sum() * per_min

    def record(self, minutes_u: NDArray[np.float64]) -> None:
        """Account ``(n, m)`` minutes of delivered insulin (U per minute, oldest first)."""
        m = minutes_u.shape[1]
        self.history_u[:, :-m] = self.history_u[:, m:].copy()
        self.history_u[:, -m:] = minutes_u

    @property
    def net_iob_u(self) -> NDArray[np.float64]:
        """``(n,)`` insulin on board above the scheduled basal's steady state, U."""
        out: NDArray[np.float64] = self.history_u @ self._weights - self._basal_iob_u
        return out


def delivered_minutes(
    pump: PumpSpec, basal_u_per_h: NDArray[np.float64], bolus_u: NDArray[np.float64], period: int
) -> NDArray[np.float64]:
    """``(n, period)`` insulin per minute a pump without pulses delivers for these commands, U.

    The basal rate and the bolus are rounded down to the pump's increments (and capped at its
    maxima) as both the env and the loop's pump do; the bolus goes in the first minute.
    """
    basal = quantize_basal(pump, np.asarray(basal_u_per_h, dtype=np.float64)) / MIN_PER_H
    bolus = quantize_bolus(pump, np.asarray(bolus_u, dtype=np.float64))
    minutes = np.repeat(basal[:, np.newaxis], period, axis=1)
    minutes[:, 0] += bolus
    return minutes


class FeatureVecEnv(VecEnvWrapper):
    """SB3 ``VecEnv`` of the policy's view of ``twinloop/T1D-v0``: features in, ``[-1, 1]`` out.

    Wraps an :class:`twinloop.policies.sb3_vec_env.SB3VecEnv` of a ``T1DVectorEnv`` configured with
    ``history_len = layout.cgm_history``, ``include_meal=True``, ``include_iob=False``, a
    pump without pulses and an action space wide enough for every dose the mapping asks for.
    Each step maps the actions to doses (:func:`action_to_dose`) for all sub-environments at
    once, accounts the delivered insulin minute by minute (:class:`NetIobBatch`) and builds
    the features (:func:`observation_features`); terminal observations are translated too.

    Args:
        venv: the SB3 view of the vector env.
        observation: the features.
        action: the action mapping.

    """

    def __init__(self, venv: VecEnv, observation: ObservationLayout, action: ActionLayout) -> None:
        inner = venv.unwrapped if hasattr(venv, "unwrapped") else venv
        t1d = getattr(inner, "venv", None)
        config = getattr(t1d, "config", None)
        if config is None:
            raise PolicyConfigError("FeatureVecEnv: the wrapped env is not a T1D vector env")
        if config.include_iob or not config.include_meal:
            raise PolicyConfigError(
                "FeatureVecEnv: the T1D env must have include_meal=True and include_iob=False"
            )
        if config.history_len < observation.cgm_history:
            raise PolicyConfigError(
                f"FeatureVecEnv: history_len={config.history_len} < the {observation.cgm_history}"
                " CGM readings the features need"
            )
        if config.pump.pulse_u != 0.0:
            raise PolicyConfigError("FeatureVecEnv: the pump must deliver continuously (pulse 0)")
        if action.has_bolus != config.bolus_action:
            raise PolicyConfigError(
                f"FeatureVecEnv: action mode {action.mode} needs bolus_action={action.has_bolus}"
            )
        super().__init__(
            venv,
            observation_space=observation.observation_space(),
            action_space=action.action_space(),
        )
        self.observation = observation
        self.action = action
        self.t1d_config = config
        self._period = int(config.control_period_min)
        self._start_clock = float(config.start_clock_min)
        self._hist_len = int(config.history_len)
        table = config.patient_table()
        self._names = [p.name for p in table]
        self._by_name = {p.name: p for p in table}
        n = self.num_envs
        self._patients: list[str] = [self._names[i % len(self._names)] for i in range(n)]
        self.profile = PatientProfile.of([self._patient(name) for name in self._patients])
        self.iob = NetIobBatch(
            self.profile.basal_u_per_h,
            peak_min=observation.iob_peak_min,
            dia_min=observation.iob_dia_min,
        )
        self.t_min = np.zeros(n)
        self._meal_g = np.zeros(n)
        #: the raw env actions of the last step, ``(n, 1 or 2)``: basal U/h (and bolus U)
        self.last_doses = np.zeros((n, 2 if action.has_bolus else 1))

    def _set_patients(self, rows: NDArray[np.intp], names: Sequence[str]) -> None:
        changed = False
        for i, name in zip(rows, names, strict=True):
            if self._patients[i] != name:
                self._patients[i] = str(name)
                changed = True
        if changed:
            self.profile = PatientProfile.of([self._patient(name) for name in self._patients])

    def _patient(self, name: str) -> PatientParameters:
        """A patient of the env's table (else a shipped one or a member of its populations)."""
        member = self._by_name.get(name)
        if member is not None:
            return member
        return find_patient(name, self.t1d_config.patients)

    def _features(
        self, raw: NDArray[Any], rows: NDArray[np.intp] | None = None
    ) -> NDArray[np.float32]:
        prof = self.profile
        iob = self.iob.net_iob_u
        t = self.t_min
        if rows is not None:
            prof = PatientProfile(
                prof.basal_u_per_h[rows],
                prof.carb_ratio_g_per_u[rows],
                prof.correction_factor_mg_dl_per_u[rows],
            )
            iob, t = iob[rows], t[rows]
        raw = np.asarray(raw, dtype=np.float64)
        return observation_features(
            self.observation,
            prof,
            cgm_mg_dl=raw[:, : self._hist_len],
            net_iob_u=iob,
            meal_g=raw[:, self._hist_len],
            clock_min=self._start_clock + t,
        )

    def _start(self, rows: NDArray[np.intp], infos: Sequence[dict[str, Any]]) -> None:
        self._set_patients(rows, [str(infos[i]["patient"]) for i in rows])
        self.iob.reset(rows, self.profile.basal_u_per_h[rows])
        self.t_min[rows] = 0.0

    def reset(self) -> VecEnvObs:
        """Reset every sub-environment; the features of their first observations."""
        raw = np.asarray(self.venv.reset())
        rows = np.arange(self.num_envs)
        self._start(rows, self.venv.reset_infos)
        self._meal_g = raw[:, self._hist_len].astype(np.float64)
        return self._features(raw)

    def step_async(self, actions: NDArray[Any]) -> None:
        """Map the policy's actions to doses and send them to the env."""
        basal, bolus = action_to_dose(self.action, self.profile, actions, self._meal_g)
        self._basal, self._bolus = basal, bolus
        if self.action.has_bolus:
            self.last_doses = np.stack((basal, bolus), axis=1)
        else:
            self.last_doses = basal[:, np.newaxis]
        self.venv.step_async(self.last_doses)

    def step_wait(self) -> VecEnvStepReturn:
        """Step, account the insulin delivered, and return features (translated terminals)."""
        raw, reward, dones, infos = self.venv.step_wait()
        bolus = self._bolus if self.action.has_bolus else np.zeros(self.num_envs)
        self.iob.record(delivered_minutes(self.t1d_config.pump, self._basal, bolus, self._period))
        self.t_min += self._period
        done_rows = np.flatnonzero(dones)
        if done_rows.size:
            final = np.stack([infos[i]["terminal_observation"] for i in done_rows])
            final_features = self._features(final, done_rows)
            for j, i in enumerate(done_rows):
                infos[i]["terminal_observation"] = final_features[j]
            self._start(done_rows, infos)
        raw = np.asarray(raw)
        self._meal_g = raw[:, self._hist_len].astype(np.float64)
        return self._features(raw), reward, dones, infos
