"""Virtual populations: new UVA/Padova patients sampled from the 30 shipped ones.

**The model.** Per age group (children, adolescents, adults) a multivariate normal on the
*free* parameters in a transformed space: ``log`` of every positive parameter, ``logit`` of the
fractions ``b`` and ``d``. Each group has its own mean; the covariance is the pooled
within-group covariance of the 30 patients (27 degrees of freedom for 35 dimensions, so it is
singular), shrunk toward its diagonal with the Ledoit–Wolf (2004) weight, which makes it
positive definite. Parameters that do not vary in the table (``f`` = 0.9 for every patient)
stay constant.

**Consistency.** The *dependent* parameters are not sampled but derived from the UVA/Padova
steady-state equations (Dalla Man et al. 2007; they reproduce the shipped table's ``kp1``,
``Vm0``, ``u2ss`` and basal state to 1e-12 relative error), so that every sample sits in a
steady state at its basal glucose ``Gb`` under its basal insulin:

* ``Gpb = Gb·Vg``; ``EGPb`` free; ``kp1 = EGPb + kp2·Gpb + kp3·Ib``;
* ``Gtb = (Fsnc − EGPb + k1·Gpb) / k2``; ``Vm0 = (EGPb − Fsnc)(Km0 + Gtb) / Gtb``;
* ``u2ss = Ib·Vi·(m2 + m4 − m1·m2 / (m1 + m30))`` (plasma insulin ``Ipb = Ib·Vi``);
* the basal state ``x0``: empty gut, ``Gp = Gs = Gpb``, ``Gt = Gtb``, ``Ip = Ipb``, ``X = 0``,
  ``I1 = Id = Ib``, ``Il = m2·Ipb / (m1 + m30)``, ``Isc1 = u2ss / (ka1 + kd)``,
  ``Isc2 = kd·Isc1 / ka2``.

**Rejection.** A sample is kept only if it is physiologically consistent (:func:`check`):
``Gtb > 0`` and ``Vm0 > 0`` (basal production above insulin-independent use), ``kmin < kmax``,
``d < b``, basal glucose, body weight, age and total daily insulin per kg inside the shipped
group's range widened by :data:`WIDEN` (25 % in log space each side), the carb ratio and the
correction factor consistent with the total daily insulin as in the table (``CR·TDI`` and
``CF·TDI`` inside the table's range widened likewise), basal insulin ≤ 80 % of the total daily
insulin, a basal-only day of the compiled model that stays within 0.5 mg/dL of ``Gb``, and a
*standard day* (:func:`standard_day`: three meals, each bolused with the patient's own carb
ratio) whose lowest and highest glucose stay within the group's shipped extremes widened by
:data:`WIDEN` — so a sample's therapy parameters suit its physiology about as well as the
table's do (without it a sensitive patient can draw an aggressive carb ratio).

:func:`sample_population` draws until it has ``n`` valid patients (same seed, same population),
named ``<group>#p<seed>-<k>`` (e.g. ``adult#p7-0042``), so their cohort is known.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from twinloop.limits import MAX_PATIENTS, MAX_SEED
from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.patients import N_STATES, PatientParameters, cohort
from twinloop.plant.glucose.uva_padova import simulate

__all__ = [
    "DERIVED",
    "FREE",
    "GROUPS",
    "PopulationModel",
    "check",
    "derive",
    "fit_population",
    "sample_population",
]

#: Age groups: cohort name → the name prefix of its patients.
GROUPS = {"children": "child", "adolescents": "adolescent", "adults": "adult"}
#: Parameters derived from the steady-state equations (never sampled).
DERIVED = ("kp1_mg_per_kg_min", "vm0_mg_per_kg_min", "u2ss_pmol_per_kg_min")
#: Fractions in (0, 1): sampled through ``logit``.
FRACTIONS = ("b", "d", "f")
_SKIP = {"name", "x0", *DERIVED}
#: The sampled parameters, in this order.
FREE: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(PatientParameters) if f.name not in _SKIP
)
#: How far beyond the shipped group's range a sample's plausibility bounds reach (log space).
WIDEN = math.log(1.25)
#: A basal-only day must stay this close to the basal glucose, mg/dL.
STEADY_TOLERANCE_MG_DL = 0.5


def _to_z(name: str, value: NDArray[np.float64]) -> NDArray[np.float64]:
    if name in FRACTIONS:
        return np.log(value / (1.0 - value))
    return np.log(value)


def _from_z(name: str, z: NDArray[np.float64]) -> NDArray[np.float64]:
    if name in FRACTIONS:
        return 1.0 / (1.0 + np.exp(-z))
    return np.exp(z)


def derive(free: dict[str, float], name: str) -> PatientParameters:
    """A patient from its free parameters: the dependent ones and ``x0`` at basal steady state.

    Raises:
        ConfigError: the free parameters admit no steady state (``Gtb <= 0`` or ``Vm0 <= 0``).

    """
    p = free
    gpb = p["glucose_basal_mg_dl"] * p["vg_dl_per_kg"]
    egpb = p["egp_basal_mg_per_kg_min"]
    ib = p["insulin_basal_pmol_l"]
    kp1 = egpb + p["kp2_per_min"] * gpb + p["kp3_mg_per_kg_min_per_pmol_l"] * ib
    gtb = (p["fsnc_mg_per_kg_min"] - egpb + p["k1_per_min"] * gpb) / p["k2_per_min"]
    if not gtb > 0:
        raise ConfigError("Gtb", gtb, "> 0 (no basal steady state)")
    vm0 = (egpb - p["fsnc_mg_per_kg_min"]) * (p["km0_mg_per_kg"] + gtb) / gtb
    if not vm0 > 0:
        raise ConfigError("Vm0", vm0, "> 0 (basal production below insulin-independent use)")
    m1, m2, m30 = p["m1_per_min"], p["m2_per_min"], p["m30_per_min"]
    ipb = ib * p["vi_l_per_kg"]
    u2ss = ipb * (m2 + p["m4_per_min"] - m1 * m2 / (m1 + m30))
    isc1 = u2ss / (p["ka1_per_min"] + p["kd_per_min"])
    isc2 = p["kd_per_min"] * isc1 / p["ka2_per_min"]
    ilb = m2 * ipb / (m1 + m30)
    x0 = (0.0, 0.0, 0.0, gpb, gtb, ipb, 0.0, ib, ib, ilb, isc1, isc2, gpb)
    assert len(x0) == N_STATES
    return PatientParameters(
        name=name,
        x0=tuple(float(v) for v in x0),
        kp1_mg_per_kg_min=float(kp1),
        vm0_mg_per_kg_min=float(vm0),
        u2ss_pmol_per_kg_min=float(u2ss),
        **{k: float(v) for k, v in p.items()},
    )


@dataclasses.dataclass(frozen=True)
class PopulationModel:
    """Per-group means and the shared (shrunk) covariance of the free parameters' ``z``.

    Attributes:
        names: the varying free parameters (the columns of ``means`` and ``cov``).
        constants: the free parameters that do not vary in the table, and their value.
        means: group → mean of ``z``.
        cov: pooled within-group covariance of ``z``, shrunk toward its diagonal.
        shrinkage: the Ledoit–Wolf weight of the diagonal target (0–1).
        bounds: group → (name → (low, high)) plausibility bounds in natural units.
        products: (low, high) of ``CR·TDI`` and of ``CF·TDI`` over the table, widened.

    """

    names: tuple[str, ...]
    constants: dict[str, float]
    means: dict[str, NDArray[np.float64]]
    cov: NDArray[np.float64]
    shrinkage: float
    bounds: dict[str, dict[str, tuple[float, float]]]
    products: dict[str, tuple[float, float]]


def _ledoit_wolf(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Covariance of centred rows ``x`` shrunk toward its diagonal (Ledoit & Wolf 2004 weight)."""
    n = x.shape[0]
    s = x.T @ x / n
    target = np.diag(np.diag(s))
    # squared distance of the sample covariance from the target, and the estimation noise
    delta = float(np.sum((s - target) ** 2))
    beta = float(sum(np.sum((np.outer(r, r) - s) ** 2) for r in x)) / n**2
    weight = 1.0 if delta == 0 else min(1.0, beta / delta)
    return weight * target + (1.0 - weight) * s, weight


def fit_population(patients: Sequence[PatientParameters] | None = None) -> PopulationModel:
    """Fit the per-group model to ``patients`` (default: the 30 shipped ones)."""
    pts = list(patients) if patients is not None else list(cohort("all"))
    groups = {g: [p for p in pts if p.cohort == g] for g in GROUPS}
    constants = {}
    names = []
    for name in FREE:
        values = np.array([getattr(p, name) for p in pts])
        if np.ptp(values) == 0:
            constants[name] = float(values[0])
        else:
            names.append(name)
    z = {
        g: np.column_stack([_to_z(n, np.array([getattr(p, n) for p in ps])) for n in names])
        for g, ps in groups.items()
        if ps
    }
    means = {g: zs.mean(axis=0) for g, zs in z.items()}
    centred = np.vstack([zs - means[g] for g, zs in z.items()])
    cov, weight = _ledoit_wolf(centred)
    # the pooled estimate has len(pts) - groups degrees of freedom, not len(pts)
    cov *= centred.shape[0] / max(centred.shape[0] - len(z), 1)
    bounds: dict[str, dict[str, tuple[float, float]]] = {}
    for g, ps in groups.items():
        if not ps:
            continue
        b: dict[str, tuple[float, float]] = {}
        for name in ("glucose_basal_mg_dl", "body_weight_kg", "age_years"):
            v = np.log([getattr(p, name) for p in ps])
            b[name] = (float(np.exp(v.min() - WIDEN)), float(np.exp(v.max() + WIDEN)))
        per_kg = np.log([p.total_daily_insulin_u / p.body_weight_kg for p in ps])
        b["tdi_u_per_kg"] = (
            float(np.exp(per_kg.min() - WIDEN)),
            float(np.exp(per_kg.max() + WIDEN)),
        )
        bounds[g] = b
    low, high = standard_day(pts)
    for g, ps in groups.items():
        if not ps:
            continue
        sel = np.array([p.cohort == g for p in pts])
        bounds[g]["standard_day_min_mg_dl"] = (
            float(np.exp(np.log(low[sel].min()) - WIDEN)),
            math.inf,
        )
        bounds[g]["standard_day_max_mg_dl"] = (0.0, float(np.exp(np.log(high[sel].max()) + WIDEN)))
    products = {}
    for key, field in (
        ("cr_tdi", "carb_ratio_g_per_u"),
        ("cf_tdi", "correction_factor_mg_dl_per_u"),
    ):
        v = np.log([getattr(p, field) * p.total_daily_insulin_u for p in pts])
        products[key] = (float(np.exp(v.min() - WIDEN)), float(np.exp(v.max() + WIDEN)))
    return PopulationModel(tuple(names), constants, means, cov, weight, bounds, products)


def check(p: PatientParameters, model: PopulationModel) -> str | None:
    """Why ``p`` is not a plausible member of its group (``None``: it is)."""
    if not p.kmin_per_min < p.kmax_per_min:
        return "kmin >= kmax"
    if not p.d < p.b:
        return "d >= b (gastric emptying shape)"
    bounds = model.bounds[p.cohort]
    per_kg = p.total_daily_insulin_u / p.body_weight_kg
    values = {
        "glucose_basal_mg_dl": p.glucose_basal_mg_dl,
        "body_weight_kg": p.body_weight_kg,
        "age_years": p.age_years,
        "tdi_u_per_kg": per_kg,
    }
    for name, value in values.items():
        lo, hi = bounds[name]
        if not lo <= value <= hi:
            return f"{name}={value:.3g} outside {lo:.3g}..{hi:.3g}"
    for key, value in (
        ("cr_tdi", p.carb_ratio_g_per_u * p.total_daily_insulin_u),
        ("cf_tdi", p.correction_factor_mg_dl_per_u * p.total_daily_insulin_u),
    ):
        lo, hi = model.products[key]
        if not lo <= value <= hi:
            return f"{key}={value:.3g} outside {lo:.3g}..{hi:.3g}"
    if p.basal_u_per_h * 24.0 > 0.8 * p.total_daily_insulin_u:
        return "basal insulin above 80 % of the total daily insulin"
    return None


#: The standard day of the therapy check: meals (minute, g), each bolused at the patient's CR.
STANDARD_MEALS = ((420, 50.0), (720, 70.0), (1080, 60.0))


def standard_day(
    patients: Sequence[PatientParameters],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Lowest and highest plasma glucose of each patient's standard day, mg/dL.

    Open loop from the basal steady state: the basal rate all day and, at each meal of
    :data:`STANDARD_MEALS`, a bolus of ``carbs / CR`` — the patient's own therapy parameters
    on an ordinary day.
    """
    minutes = 1440
    insulin = np.repeat(np.array([[p.basal_u_per_min for p in patients]]).T, minutes, axis=1)
    meals = np.zeros((len(patients), minutes))
    cr = np.array([p.carb_ratio_g_per_u for p in patients])
    for t, grams in STANDARD_MEALS:
        meals[:, t] = grams
        insulin[:, t] += grams / cr
    bg = simulate(list(patients), insulin, meals).bg_mg_dl
    return bg.min(axis=1), bg.max(axis=1)


def _steady(patients: list[PatientParameters]) -> NDArray[np.bool_]:
    """Whether a basal-only day of each patient stays within the tolerance of ``Gb``."""
    minutes = 1440
    insulin = np.repeat(np.array([[p.basal_u_per_min for p in patients]]).T, minutes, axis=1)
    bg = simulate(patients, insulin, np.zeros(minutes)).bg_mg_dl
    gb = np.array([p.glucose_basal_mg_dl for p in patients])[:, None]
    return np.all(np.abs(bg - gb) <= STEADY_TOLERANCE_MG_DL, axis=1)


def sample_population(
    n: int,
    *,
    seed: int = 0,
    groups: dict[str, float] | None = None,
    model: PopulationModel | None = None,
    max_draws: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[PatientParameters], dict[str, int]]:
    """Draw ``n`` valid virtual patients; return them and the rejection counts by reason.

    Args:
        n: patients wanted (1 to :data:`MAX_PATIENTS`).
        seed: the generator's seed, 0 to 2**32 - 1 (same seed, same population).
        groups: share of each group (default equal thirds), e.g. ``{"adults": 1.0}``.
        model: the fitted model (default: :func:`fit_population` of the shipped table).
        max_draws: give up after this many draws (default ``50 n``).
        progress: called with the patients kept by each batch of draws (they sum to ``n``).

    Raises:
        ConfigError: a bad ``n``, group or share, or too many rejections.

    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PATIENTS:
        raise ConfigError("n", n, f"an integer from 1 to {MAX_PATIENTS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError("seed", seed, f"an integer from 0 to {MAX_SEED}")
    shares = groups or {g: 1.0 / 3.0 for g in GROUPS}
    for g, w in shares.items():
        if g not in GROUPS:
            raise ConfigError("groups", g, f"one of {', '.join(GROUPS)}")
        if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"groups[{g}]", w, "a finite share >= 0")
    total = sum(shares.values())
    if total <= 0:
        raise ConfigError("groups", shares, "at least one share > 0")
    model = model or fit_population()
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(model.cov)
    wanted = {g: round(n * w / total) for g, w in shares.items()}
    wanted[max(wanted, key=lambda g: shares[g])] += n - sum(wanted.values())
    out: list[PatientParameters] = []
    rejected: dict[str, int] = {}
    limit = max_draws or 50 * n
    draws = 0
    for g, count in wanted.items():
        kept: list[PatientParameters] = []
        while len(kept) < count:
            batch = max(2 * (count - len(kept)), 16)
            draws += batch
            if draws > limit:
                raise ConfigError("n", n, f"reachable: {limit} draws gave {len(out) + len(kept)}")
            z = model.means[g] + rng.standard_normal((batch, len(model.names))) @ chol.T
            values = np.column_stack([_from_z(name, z[:, j]) for j, name in enumerate(model.names)])
            candidates: list[PatientParameters] = []
            for row in values:
                free = model.constants | dict(zip(model.names, row.tolist(), strict=True))
                try:
                    p = derive(free, f"{GROUPS[g]}#candidate")
                except ConfigError as exc:
                    rejected[exc.field] = rejected.get(exc.field, 0) + 1
                    continue
                why = check(p, model)
                if why is not None:
                    key = why.split("=")[0].split(" ")[0]
                    rejected[key] = rejected.get(key, 0) + 1
                    continue
                candidates.append(p)
            if candidates:
                steady = _steady(candidates)
                rejected["not steady"] = rejected.get("not steady", 0) + int((~steady).sum())
                low, high = standard_day(candidates)
                b = model.bounds[g]
                therapy_ok = (low >= b["standard_day_min_mg_dl"][0]) & (
                    high <= b["standard_day_max_mg_dl"][1]
                )
                rejected["standard day"] = rejected.get("standard day", 0) + int(
                    (steady & ~therapy_ok).sum()
                )
                before = len(kept)
                for p, ok in zip(candidates, steady & therapy_ok, strict=True):
                    if ok and len(kept) < count:
                        kept.append(
                            dataclasses.replace(p, name=f"{GROUPS[g]}#p{seed}-{len(kept):04d}")
                        )
                if progress is not None:
                    progress(len(kept) - before)
        out.extend(kept)
    return out, rejected


def write_population(path: str, patients: Sequence[PatientParameters], **metadata: str) -> None:
    """Write patients as Parquet: one row each, a column per parameter (``x0`` a list)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        f.name: [getattr(p, f.name) for p in patients]
        for f in dataclasses.fields(PatientParameters)
    }
    columns["x0"] = [list(p.x0) for p in patients]
    columns["cohort"] = [p.cohort for p in patients]
    table = pa.table(columns).replace_schema_metadata(
        {"twinloop": json.dumps({"kind": "population", **metadata})}
    )
    pq.write_table(table, path)


def read_population(path: str) -> list[PatientParameters]:
    """Read patients written by :func:`write_population`.

    Raises:
        ConfigError: the file is not a twinloop population.

    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twinloop.limits import MAX_LOG_BYTES, InputLimitError, check_file

    try:
        check_file(path, MAX_LOG_BYTES)
        table = pq.read_table(path)
    except InputLimitError as exc:
        raise ConfigError("population", path, f"a twinloop population file ({exc})") from None
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError("population", path, f"a Parquet population file ({first})") from None
    fields = [f.name for f in dataclasses.fields(PatientParameters)]
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise ConfigError("population", path, f"a twinloop population file (lacks {missing[:3]})")
    if table.num_rows > MAX_PATIENTS:
        raise ConfigError("population", path, f"at most {MAX_PATIENTS} patients")
    out = []
    for i, r in enumerate(table.select(fields).to_pylist()):
        try:
            out.append(PatientParameters(**{**r, "x0": tuple(r["x0"])}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"population {path}: row {i}", r.get("name"), f"a valid patient ({exc})"
            ) from None
    return out
