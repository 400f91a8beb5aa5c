"""A twin's model: the UVA/Padova structure around an age group's mean, and its file.

:class:`TwinModel` is the structure a twin is fitted in (:mod:`twinloop.twins.identify`
fits it to a person's log; the model, its parametrisation and prior are described there):
the group's mean free parameters (:func:`group_base`, from
:func:`twinloop.plant.glucose.population.fit_population`) at the person's scheduled basal, and
the fitted parameters as ``θ = θ₀·exp(s·z)``. :class:`TwinFit` is a fitted twin (MAP, optional
Laplace posterior); :func:`write_twin` / :func:`read_twin` keep it as ``twin.yaml``.

It lives in the plant layer because the closed loop builds its planning model from it (a
population-mean model, or a fitted twin: :mod:`twinloop.plant.glucose.models`) without the
fitting code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.typing import NDArray

from twinloop.plant.errors import ConfigError, InvalidInputError
from twinloop.plant.glucose.patients import (
    N_STATES,
    PMOL_PER_U,
    PatientParameters,
    cohort,
    parameter_matrix,
)
from twinloop.plant.glucose.population import FREE, GROUPS, derive, fit_population
from twinloop.plant.glucose.uva_padova import (
    DEFAULT_EAT_RATE_G_PER_MIN,
    N_MEAL_STATE,
    P_KP3,
    P_VG,
    P_VMX,
    advance,
)

__all__ = [
    "FITTED",
    "LogGrid",
    "TwinFit",
    "TwinModel",
    "group_base",
    "read_twin",
    "write_twin",
]

#: Minutes in a day.
MIN_PER_DAY = 1440
#: Fitted parameters: name → (the population parameter whose log-SD is its prior SD, or a
#: fixed SD; what it scales). Order is the order of ``z``.
FITTED: dict[str, tuple[str | float, str]] = {
    "vmx_mg_per_kg_min_per_pmol_l": ("vmx_mg_per_kg_min_per_pmol_l", "Vmx"),
    "kp3_mg_per_kg_min_per_pmol_l": ("kp3_mg_per_kg_min_per_pmol_l", "kp3"),
    "glucose_basal_mg_dl": ("glucose_basal_mg_dl", "Gb"),
    "egp_basal_mg_per_kg_min": ("egp_basal_mg_per_kg_min", "EGPb"),
    "kabs_per_min": ("kabs_per_min", "kabs"),
    "meal_scale": (0.2, "f × scale"),
    "p2u_per_min": ("p2u_per_min", "p2u"),
    "kmax_per_min": ("kmax_per_min", "kmax"),
    "kmin_per_min": ("kmin_per_min", "kmin"),
    "kd_per_min": ("kd_per_min", "kd"),
    "ka1_per_min": ("ka1_per_min", "ka1"),
    "ka2_per_min": ("ka2_per_min", "ka2"),
    "body_weight_kg": ("body_weight_kg", "BW (meal and insulin doses per kg)"),
    "kp2_per_min": ("kp2_per_min", "kp2"),
    "vg_dl_per_kg": ("vg_dl_per_kg", "Vg"),
    "k1_per_min": ("k1_per_min", "k1"),
    "k2_per_min": ("k2_per_min", "k2"),
    "b": ("b", "b (gastric emptying shape)"),
    "d": ("d", "d (gastric emptying shape)"),
    "ksc_per_min": ("ksc_per_min", "ksc"),
    "km0_mg_per_kg": ("km0_mg_per_kg", "Km0"),
    "m1_per_min": ("m1_per_min", "m1"),
    "m2_per_min": ("m2_per_min", "m2"),
    "m4_per_min": ("m4_per_min", "m4"),
    "m30_per_min": ("m30_per_min", "m30"),
    "vi_l_per_kg": ("vi_l_per_kg", "Vi"),
    "ki_per_min": ("ki_per_min", "ki"),
}
#: Hard limits of a fitted parameter: the shipped patients' range widened by this factor each
#: side (the sensitivity blocks: ±:data:`Z_BOUND` prior SDs).
WIDEN_FACTOR = 1.5
#: Hard limits that replace the widened range: basal glucose (a person's basal may hold it far
#: from the table's 133–153 mg/dL), the meal scale, and ``kabs`` ≤ 1.5/min (faster absorption
#: would make the 1-min RK4 step unstable; the table's largest is 1.23/min).
FIXED_LIMITS = {
    "glucose_basal_mg_dl": (80.0, 250.0),
    "meal_scale": (0.5, 2.0),
    "kabs_per_min": (None, 1.5),
    "b": (None, 0.98),
    "d": (None, 0.98),
}
#: Smallest prior SD (log): the table's patients vary less than people do in some parameters
#: (basal glucose 133–153 mg/dL, SD 0.04 in log).
MIN_PRIOR_SD = 0.15
#: Prior SD of the log of a daily sensitivity block's factor.
BLOCK_PRIOR_SD = 0.3
#: ``z`` stays within this many prior SDs.
Z_BOUND = 5.0
#: Minutes not scored at the start of a fit window (default).
DEFAULT_BURN_IN_MIN = 180
#: Forward-difference step in ``z``.
FD_STEP = 1e-4
#: Format version of ``twin.yaml``.
TWIN_FORMAT = 2
_SCALES = {
    "meal_scale": ("f",),
}
#: Refinement passes after the first fit (each re-estimates ``n_eff``, then re-fits).
REFINE_PASSES = 1


@dataclasses.dataclass(frozen=True)
class LogGrid:
    """A therapy log on a one-minute grid: what the model needs, minute ``k`` = ``start + k``.

    Attributes:
        start: UTC instant of minute 0.
        insulin_u_per_min: ``(K,)`` basal + bolus insulin over each minute, U/min.
        basal_u_per_h: ``(K,)`` the logged basal rate over each minute, U/h.
        bolus_u: ``(K,)`` bolus given in each minute, U.
        carbs_g: ``(K,)`` carbohydrates logged as eaten at each minute, g.
        cgm_mg_dl: ``(K+1,)`` CGM reading at minute k, ``NaN`` where there is none.
        minute_of_day: ``(K+1,)`` local clock minute (0–1439) of each minute.

    """

    start: datetime
    insulin_u_per_min: NDArray[np.float64]
    basal_u_per_h: NDArray[np.float64]
    bolus_u: NDArray[np.float64]
    carbs_g: NDArray[np.float64]
    cgm_mg_dl: NDArray[np.float64]
    minute_of_day: NDArray[np.int64]

    @property
    def minutes(self) -> int:
        """Length ``K`` in minutes."""
        return int(self.insulin_u_per_min.shape[0])

    @property
    def days(self) -> float:
        """Length in days."""
        return self.minutes / MIN_PER_DAY

    def window(self, first_min: int, last_min: int) -> LogGrid:
        """Minutes ``[first_min, last_min)`` as a grid of their own."""
        if not 0 <= first_min < last_min <= self.minutes:
            raise InvalidInputError(
                f"window [{first_min}, {last_min}) is not inside the log's {self.minutes} minutes"
            )
        return LogGrid(
            start=self.start + timedelta(minutes=first_min),
            insulin_u_per_min=self.insulin_u_per_min[first_min:last_min],
            basal_u_per_h=self.basal_u_per_h[first_min:last_min],
            bolus_u=self.bolus_u[first_min:last_min],
            carbs_g=self.carbs_g[first_min:last_min],
            cgm_mg_dl=self.cgm_mg_dl[first_min : last_min + 1],
            minute_of_day=self.minute_of_day[first_min : last_min + 1],
        )

    def scheduled_basal_u_per_h(self) -> float:
        """The basal rate that holds the basal glucose: the most common logged rate above 0.

        The mode over the log's minutes (rates to 0.001 U/h), not the median: with a loop's
        temp basals around the scheduled rate the median is a temp's. 0 when no rate is.
        """
        rates = np.round(self.basal_u_per_h[self.basal_u_per_h > 0], 3)
        if not rates.size:
            return 0.0
        values, counts = np.unique(rates, return_counts=True)
        return float(values[np.argmax(counts)])


# --------------------------------------------------------------------------------------------
# the model


@lru_cache(maxsize=1)
def _population() -> Any:
    return fit_population()


def group_base(group: str) -> tuple[dict[str, float], dict[str, float]]:
    """The group's mean free parameters (natural units) and the prior SDs of :data:`FITTED`."""
    if group not in GROUPS:
        raise ConfigError("group", group, f"one of {', '.join(GROUPS)}")
    model = _population()
    base = dict(model.constants)
    sd_log: dict[str, float] = {}
    for j, name in enumerate(model.names):
        z = float(model.means[group][j])
        base[name] = 1.0 / (1.0 + math.exp(-z)) if name in ("b", "d", "f") else math.exp(z)
        sd_log[name] = math.sqrt(float(model.cov[j, j]))
    sds = {}
    for name, (source, _) in FITTED.items():
        sd = float(source) if isinstance(source, float) else sd_log[source]
        if name in ("b", "d"):
            sd *= 1.0 - base[name]  # the population's SD is of the logit: SD of the log
        sds[name] = max(sd, MIN_PRIOR_SD)
    return base, sds


@lru_cache(maxsize=1)
def _table_ranges() -> dict[str, tuple[float, float]]:
    patients = cohort("all")
    return {
        f: (min(getattr(p, f) for p in patients), max(getattr(p, f) for p in patients))
        for f in FREE
    }


def limits(name: str, base: Mapping[str, float]) -> tuple[float, float]:
    """Hard limits of a fitted parameter in natural units (a scale: relative to ``base``)."""
    targets = _SCALES.get(name, (name,))
    ranges = _table_ranges()
    lo = max(ranges[t][0] / base[t] for t in targets) / WIDEN_FACTOR
    hi = min(ranges[t][1] / base[t] for t in targets) * WIDEN_FACTOR
    if name not in _SCALES:
        lo, hi = lo * base[name], hi * base[name]
    fixed_lo, fixed_hi = FIXED_LIMITS.get(name, (None, None))
    return (lo if fixed_lo is None else fixed_lo, hi if fixed_hi is None else fixed_hi)


def _insulin_basal_pmol_l(base: Mapping[str, float], basal_u_per_h: float) -> float:
    """``Ib`` at which ``u2ss`` equals the scheduled basal (steady-state equations)."""
    u2ss = basal_u_per_h / 60.0 * PMOL_PER_U / base["body_weight_kg"]
    m1, m2, m30, m4 = (base[k] for k in ("m1_per_min", "m2_per_min", "m30_per_min", "m4_per_min"))
    return u2ss / (base["vi_l_per_kg"] * (m2 + m4 - m1 * m2 / (m1 + m30)))


def scale_sensitivity(
    params: NDArray[np.float64], factors: NDArray[np.float64]
) -> NDArray[np.float64]:
    """A copy of the parameter matrix with ``Vmx`` and ``kp3`` × ``factors`` (``(M,)``)."""
    out = params.copy()
    out[:, P_VMX] *= factors
    out[:, P_KP3] *= factors
    return out


@dataclasses.dataclass(frozen=True)
class TwinModel:
    """A twin's structure: the base patient, the fitted parameters and their prior.

    Attributes:
        name: the twin's (the person's) name.
        group: age group of the prior (``children``, ``adolescents``, ``adults``).
        base: every free UVA/Padova parameter (natural units) at ``z = 0``, the therapy
            (``carb_ratio_g_per_u``, ``correction_factor_mg_dl_per_u``, ``total_daily_insulin_u``)
            included; ``insulin_basal_pmol_l`` is re-derived from ``basal_u_per_h``.
        basal_u_per_h: the scheduled basal that holds ``Gb``.
        prior_sd: the prior SD of the log of each fitted parameter (:data:`FITTED`, then the
            sensitivity blocks).
        profile_blocks: number of daily sensitivity blocks (0: none).

    """

    name: str
    group: str
    base: dict[str, float]
    basal_u_per_h: float
    prior_sd: tuple[float, ...]
    profile_blocks: int = 0
    z_bounds: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ConfigError("group", self.group, f"one of {', '.join(GROUPS)}")
        missing = [k for k in FREE if k not in self.base]
        if missing:
            raise ConfigError(
                "base", missing, "every free parameter of twinloop.plant.glucose.population.FREE"
            )
        if not (math.isfinite(self.basal_u_per_h) and self.basal_u_per_h > 0):
            raise ConfigError("basal_u_per_h", self.basal_u_per_h, "a rate > 0 U/h")
        if not (isinstance(self.profile_blocks, int) and 0 <= self.profile_blocks <= 24):
            raise ConfigError("profile_blocks", self.profile_blocks, "an integer in 0–24")
        if self.profile_blocks and MIN_PER_DAY % self.profile_blocks:
            raise ConfigError("profile_blocks", self.profile_blocks, "a divisor of 1440 min")
        if len(self.prior_sd) != len(self.names):
            raise ConfigError("prior_sd", self.prior_sd, f"{len(self.names)} values")
        if not self.z_bounds:
            object.__setattr__(self, "z_bounds", tuple((-Z_BOUND, Z_BOUND) for _ in self.names))
        if len(self.z_bounds) != len(self.names):
            raise ConfigError("z_bounds", self.z_bounds, f"{len(self.names)} (low, high) pairs")

    @classmethod
    def for_group(
        cls,
        name: str,
        group: str,
        basal_u_per_h: float,
        *,
        profile_blocks: int = 0,
        **overrides: float,
    ) -> TwinModel:
        """The twin of a person of ``group`` with the group's mean as its base.

        ``overrides`` replace base values (``body_weight_kg``, ``carb_ratio_g_per_u``,
        ``correction_factor_mg_dl_per_u``, ``total_daily_insulin_u``, ``age_years``).
        """
        base, sds = group_base(group)
        for key, value in overrides.items():
            if key not in base:
                raise ConfigError(key, value, f"one of {', '.join(sorted(base))}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(key, value, "a finite value > 0")
            base[key] = float(value)
        prior = tuple(sds[k] for k in FITTED) + (BLOCK_PRIOR_SD,) * profile_blocks
        bounds = []
        for j, key in enumerate(FITTED):
            lo, hi = limits(key, base)
            ref = base.get(key, 1.0)
            z_lo = math.log(lo / ref) / prior[j]
            z_hi = math.log(hi / ref) / prior[j]
            bounds.append((max(z_lo, -Z_BOUND), min(z_hi, Z_BOUND)))
        bounds += [(-Z_BOUND, Z_BOUND)] * profile_blocks
        return cls(name, group, base, float(basal_u_per_h), prior, profile_blocks, tuple(bounds))

    def clip(self, z: NDArray[np.float64]) -> NDArray[np.float64]:
        """``z`` within the hard limits."""
        lo, hi = np.array(self.z_bounds).T
        out: NDArray[np.float64] = np.clip(z, lo, hi)
        return out

    @property
    def names(self) -> tuple[str, ...]:
        """The fitted parameters, in the order of ``z``."""
        blocks = tuple(f"sensitivity_block_{k}" for k in range(self.profile_blocks))
        return tuple(FITTED) + blocks

    def values(self, z: NDArray[np.float64]) -> dict[str, float]:
        """Natural values of the fitted parameters at ``z`` (scales and factors are relative)."""
        out = {}
        for j, name in enumerate(self.names):
            ref = self.base.get(name, 1.0)
            out[name] = float(ref * math.exp(self.prior_sd[j] * float(z[j])))
        return out

    def patient(self, z: NDArray[np.float64]) -> PatientParameters:
        """The twin at ``z`` as a patient (the daily profile left out: its factors are 1).

        Raises:
            ConfigError: ``z`` admits no basal steady state, or gastric emptying's ``kmin`` is
                not below its ``kmax``.

        """
        v = self.values(z)
        free = dict(self.base)
        for name, value in v.items():
            if name in _SCALES:
                for target in _SCALES[name]:
                    free[target] = self.base[target] * value
            elif name in free:
                free[name] = value
        free["insulin_basal_pmol_l"] = _insulin_basal_pmol_l(free, self.basal_u_per_h)
        patient = derive(free, self.name)
        if not patient.kmin_per_min < patient.kmax_per_min:
            raise ConfigError("kmin_per_min", "kmin >= kmax", "kmin < kmax")
        return patient

    def block_factors(self, z: NDArray[np.float64]) -> NDArray[np.float64]:
        """The daily sensitivity factors at ``z``, ``(profile_blocks,)``."""
        n = len(FITTED)
        sd = np.asarray(self.prior_sd[n:])
        return np.exp(sd * np.asarray(z[n:], dtype=np.float64))

    def simulate(
        self,
        zs: NDArray[np.float64],
        grid: LogGrid,
        *,
        initial_glucose_mg_dl: float | None = None,
        insulin_u_per_min: NDArray[np.float64] | None = None,
        meal_g: NDArray[np.float64] | None = None,
        plasma: bool = False,
    ) -> NDArray[np.float64]:
        """The twin's CGM ``Gs/Vg`` (mg/dL, ``(M, K+1)``) for each row of ``zs`` (``(M, p)``).

        With ``plasma``, its plasma glucose ``Gp/Vg`` instead.

        Starts in the basal steady state with glucose at ``initial_glucose_mg_dl`` (default:
        the grid's first reading) and replays the grid's insulin and meals (or the ones given,
        ``(K,)`` or ``(M, K)``).
        """
        zs = np.atleast_2d(np.asarray(zs, dtype=np.float64))
        m = zs.shape[0]
        params, x = self.states(zs, grid, initial_glucose_mg_dl)
        ins = grid.insulin_u_per_min if insulin_u_per_min is None else insulin_u_per_min
        meals = grid.carbs_g if meal_g is None else meal_g
        ins = np.ascontiguousarray(np.broadcast_to(ins, (m, grid.minutes)), dtype=np.float64)
        meals = np.ascontiguousarray(np.broadcast_to(meals, (m, grid.minutes)), dtype=np.float64)
        meal_state = np.zeros((m, N_MEAL_STATE))
        eat = np.full(m, DEFAULT_EAT_RATE_G_PER_MIN)
        gs = np.empty((m, grid.minutes + 1))
        gs[:, 0] = x[:, 3 if plasma else 12]
        for a, b, factors in self.segments(zs, grid):
            p = params if factors is None else scale_sensitivity(params, factors)
            seg = np.empty((m, b - a + 1))
            other = np.empty_like(seg)
            advance(
                x, meal_state, p, np.ascontiguousarray(ins[:, a:b]),
                np.ascontiguousarray(meals[:, a:b]), eat, carbs_out=np.empty((m, b - a)),
                gp_out=seg if plasma else other, gs_out=other if plasma else seg,
                parallel=False, check=False,
            )  # fmt: skip
            gs[:, a + 1 : b + 1] = seg[:, 1:]
        out: NDArray[np.float64] = gs / params[:, P_VG : P_VG + 1]
        return out

    def states(
        self, zs: NDArray[np.float64], grid: LogGrid, initial_glucose_mg_dl: float | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Parameter matrix ``(M, N_PARAMS)`` and initial states ``(M, 13)`` of each ``z``."""
        patients = [self.patient(z) for z in zs]
        params = parameter_matrix(patients)
        x = np.array([p.x0 for p in patients], dtype=np.float64)
        g0 = initial_glucose_mg_dl
        if g0 is None:
            first = grid.cgm_mg_dl[~np.isnan(grid.cgm_mg_dl)]
            g0 = float(first[0]) if first.size else None
        if g0 is not None:
            gb = np.array([p.glucose_basal_mg_dl for p in patients])
            vg = params[:, P_VG]
            x[:, 4] *= g0 / gb  # Gt
            x[:, 3] = g0 * vg  # Gp
            x[:, 12] = g0 * vg  # Gs
        assert x.shape[1] == N_STATES
        return params, np.ascontiguousarray(x)

    def segments(
        self, zs: NDArray[np.float64], grid: LogGrid
    ) -> list[tuple[int, int, NDArray[np.float64] | None]]:
        """Minute ranges ``[a, b)`` with one sensitivity block each, and the blocks' factors."""
        if not self.profile_blocks:
            return [(0, grid.minutes, None)]
        block = grid.minute_of_day[:-1] // (MIN_PER_DAY // self.profile_blocks)
        edges = np.flatnonzero(np.diff(block)) + 1
        starts = np.concatenate([[0], edges])
        ends = np.concatenate([edges, [grid.minutes]])
        factors = np.array([self.block_factors(z) for z in zs])  # (M, B)
        return [(int(a), int(b), factors[:, block[a]]) for a, b in zip(starts, ends, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """The structure as plain data (see :func:`write_twin`)."""
        return {
            "name": self.name,
            "group": self.group,
            "basal_u_per_h": self.basal_u_per_h,
            "profile_blocks": self.profile_blocks,
            "prior_sd": list(self.prior_sd),
            "z_bounds": [list(b) for b in self.z_bounds],
            "base": dict(self.base),
        }


@dataclasses.dataclass(frozen=True)
class TwinFit:
    """A fitted twin: the model, its MAP, and (optionally) the Laplace posterior.

    Attributes:
        model: the structure.
        z_map: the MAP in standardised coordinates.
        cov_z: the Laplace posterior covariance of ``z``, or ``None``.
        fit: what the fit saw and reached (window, RMSE, σ, n_eff, iterations, seconds).

    """

    model: TwinModel
    z_map: NDArray[np.float64]
    cov_z: NDArray[np.float64] | None
    fit: dict[str, Any]

    @property
    def patient(self) -> PatientParameters:
        """The MAP twin as a patient (without its daily profile)."""
        return self.model.patient(self.z_map)

    def parameters(self) -> dict[str, dict[str, float]]:
        """Each fitted parameter: MAP, and with a posterior its 95 % interval (within limits)."""
        out: dict[str, dict[str, float]] = {}
        v = self.model.values(self.z_map)
        for j, name in enumerate(self.model.names):
            row = {"map": v[name]}
            if self.cov_z is not None:
                half = 1.96 * math.sqrt(float(self.cov_z[j, j]))
                z_lo, z_hi = self.model.z_bounds[j]
                ref = v[name] / math.exp(self.model.prior_sd[j] * float(self.z_map[j]))
                for key, zz in (
                    ("ci95_low", max(float(self.z_map[j]) - half, z_lo)),
                    ("ci95_high", min(float(self.z_map[j]) + half, z_hi)),
                ):
                    row[key] = ref * math.exp(self.model.prior_sd[j] * zz)
            out[name] = row
        return out

    def draws(self, n: int, seed: int) -> NDArray[np.float64]:
        """``n`` posterior draws of ``z`` (the MAP first); just the MAP without a posterior.

        Draws without a steady state are replaced by new ones.
        """
        if self.cov_z is None or n <= 1:
            return self.z_map[None, :].copy()
        rng = np.random.default_rng(seed)
        chol = np.linalg.cholesky(self.cov_z)
        out = [self.z_map]
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n:
                raise ConfigError("posterior", "degenerate", "draws with a steady state")
            z = self.model.clip(self.z_map + chol @ rng.standard_normal(len(self.z_map)))
            try:
                self.model.patient(z)
            except ConfigError:
                continue
            out.append(z)
        return np.array(out)


# --------------------------------------------------------------------------------------------
# twin.yaml


def write_twin(fit: TwinFit, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a fitted twin as YAML: the structure, the MAP, the posterior and the fit.

    The file holds everything needed to rebuild the twin (:func:`read_twin`) without the
    population code: the base parameters, the prior SDs, ``z`` and its covariance. For reading
    by eye it also lists each fitted parameter's MAP (and 95 % interval) and the MAP twin's
    full parameter set.
    """
    patient = fit.patient
    doc: dict[str, Any] = {
        "twinloop_twin": TWIN_FORMAT,
        "model": fit.model.to_dict(),
        "parameters": fit.parameters(),
        "z_map": [float(v) for v in fit.z_map],
        "posterior": None
        if fit.cov_z is None
        else {"kind": "laplace", "cov_z": [[float(v) for v in row] for row in fit.cov_z]},
        "fit": dict(fit.fit),
        "patient": {
            f.name: (list(getattr(patient, f.name)) if f.name == "x0" else getattr(patient, f.name))
            for f in dataclasses.fields(patient)
        },
    }
    if extra:
        doc.update(extra)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return out


def read_twin(path: str | Path) -> TwinFit:
    """Read a twin written by :func:`write_twin`.

    Raises:
        InvalidInputError: not a twin file, or a field that is missing or malformed (named).

    """
    src = Path(path)
    try:
        doc = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"{src}: cannot read a twin: {exc}") from None
    version = doc.get("twinloop_twin") if isinstance(doc, dict) else None
    if isinstance(version, int) and version < TWIN_FORMAT:
        raise InvalidInputError(
            f"{src}: a twin of format {version}, fitted with other parameters; this version "
            f"reads format {TWIN_FORMAT}: fit it again with `twinloop twin fit`"
        )
    if not isinstance(doc, dict) or version != TWIN_FORMAT:
        raise InvalidInputError(
            f"{src}: not a twin file (twinloop_twin: {TWIN_FORMAT} expected; "
            "write one with `twinloop twin fit`)"
        )
    try:
        m = doc["model"]
        model = TwinModel(
            name=str(m["name"]),
            group=str(m["group"]),
            base={str(k): float(v) for k, v in m["base"].items()},
            basal_u_per_h=float(m["basal_u_per_h"]),
            prior_sd=tuple(float(v) for v in m["prior_sd"]),
            profile_blocks=int(m["profile_blocks"]),
            z_bounds=tuple((float(lo), float(hi)) for lo, hi in m.get("z_bounds", ())),
        )
        z = np.asarray(doc["z_map"], dtype=np.float64)
        post = doc.get("posterior")
        cov = None if not post else np.asarray(post["cov_z"], dtype=np.float64)
        fit = dict(doc.get("fit") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{src}: malformed twin file: {exc!r}") from None
    except ConfigError as exc:
        raise InvalidInputError(f"{src}: {exc}") from None
    p = len(model.names)
    if z.shape != (p,) or (cov is not None and cov.shape != (p, p)):
        raise InvalidInputError(f"{src}: z_map/cov_z do not match the {p} fitted parameters")
    return TwinFit(model, z, cov, fit)
