"""``twinloop pendulum``: the Wartenberg pendulum test on knee presets, judged against the norms.

Every asked preset is released from ``--release-deg`` with relaxed muscles (the preset's stretch
reflex active) in one batch of the compiled knee plant
(:func:`twinloop.plant.knee.pendulum.simulate_pendulum`), measured
(:func:`~twinloop.plant.knee.pendulum.measure_pendulum`: A1, A0, R2, R2n, swings, peak velocity,
period, settled) and judged against the published norm of its cohort
(:mod:`twinloop.plant.knee.pendulum_norms`): ``healthy`` against healthy adults' R2 and peak
velocity (Kim et al. 1996, mean ± 2 SD), the impaired presets against the chronic-stroke R2n
(mean ± 1 SD). The norms were measured without an exoskeleton; Kim et al.'s lying supine (hip 0°,
the default), so at another hip angle or with the drive attached the verdict is indicative.

Exit codes: 0 done (whatever the verdicts); 2 bad input (:data:`twinloop.cli.errors.EXIT_USAGE`),
``--out`` onto an earlier output without ``--overwrite`` included.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinloop.cli import options

if TYPE_CHECKING:
    from twinloop.plant.knee.pendulum import PendulumConfig, PendulumMetrics, PendulumTrace
    from twinloop.plant.knee.pendulum_norms import PendulumNorm

#: The option that sets each :class:`PendulumConfig` field (for one-line errors).
FLAGS = {
    "preset": "--patient",
    "hip_flexion_deg": "--hip-deg",
    "duration_s": "--duration-s",
    "release_angle_deg": "--release-deg",
    "swing_threshold_deg": "--swing-threshold-deg",
}

#: Output files under ``--out``.
JSON_FILE = "pendulum.json"
PNG_FILE = "pendulum.png"


def add_parser(sub: Any) -> None:
    """Add ``pendulum`` to the ``twinloop`` parser."""
    p = sub.add_parser(
        "pendulum",
        help="run the Wartenberg pendulum test on knee presets and compare with the norms",
        description="Release the shank of each knee preset from the horizontal (thigh supported, "
        "muscles relaxed, the preset's stretch reflex active) on the compiled knee plant; print "
        "A1 (first swing), A0 (plateau), R2 = A1/A0, R2n = R2/1.6, swings, first-downswing peak "
        "velocity, period and whether the knee settled; judge each preset against its cohort's "
        "published norm: healthy against healthy adults (Kim et al. 1996, supine, n = 50: R2 and "
        "peak velocity, mean ± 2 SD), mild/moderate/severe against chronic stroke (R2n, n = 20, "
        "mean ± 1 SD). The norms were measured without an exoskeleton, Kim et al.'s supine.",
        epilog="exit status: 0 done (whatever the verdicts); 2 bad input (options, an earlier "
        "output at --out without --overwrite)",
    )
    p.add_argument(
        "--patient",
        action="append",
        default=[],
        help="a knee preset, healthy|mild|moderate|severe (repeatable; default all four)",
    )
    p.add_argument(
        "--hip-deg",
        type=options.finite,
        help="hip flexion, degrees, -15 to 100 (default 0: supine, the set-up of the healthy "
        "norm; 90: seated, the exoskeleton's posture)",
    )
    p.add_argument(
        "--drive",
        choices=("detached", "attached"),
        default="detached",
        help="the exoskeleton drive: detached (the clinical test, default) or attached and "
        "unpowered (back-driven through its friction and inertia)",
    )
    p.add_argument(
        "--duration-s", type=options.finite, help="recorded time after the release, s, > 1 to 120 "
        "(default 20; the plateau is the mean of the last 1 s)",
    )  # fmt: skip
    p.add_argument(
        "--release-deg",
        type=options.finite,
        help="knee flexion at release, degrees, -5 to < 90 (default 0: shank horizontal)",
    )
    p.add_argument(
        "--swing-threshold-deg",
        type=options.finite,
        help="a flexion peak counts as a swing when it exceeds the plateau by more, degrees, > 0 "
        "(default 1)",
    )
    p.add_argument(
        "--out",
        help=f"directory to write {JSON_FILE} (set-up, metrics, norms, verdicts) and {PNG_FILE} "
        "(the angle traces with A0 and A1 marked); must be new or empty",
    )
    options.add_overwrite(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(handler=main_pendulum)


def configs_of(args: argparse.Namespace) -> list[PendulumConfig]:
    """One validated :class:`PendulumConfig` per asked preset (the config's defaults otherwise).

    Raises:
        ValueError: a value out of range, named by its option.

    """
    from twinloop.plant.errors import ConfigError, UnknownPatientError
    from twinloop.plant.knee.model import PRESETS
    from twinloop.plant.knee.pendulum import PendulumConfig

    given = {
        "hip_flexion_deg": args.hip_deg,
        "duration_s": args.duration_s,
        "release_angle_deg": args.release_deg,
        "swing_threshold_deg": args.swing_threshold_deg,
    }
    fields = {k: v for k, v in given.items() if v is not None}
    fields["drive_attached"] = args.drive == "attached"
    configs = []
    for name in dict.fromkeys(args.patient or PRESETS):  # in order, each once
        try:
            configs.append(PendulumConfig(preset=name, **fields))
        except UnknownPatientError as exc:
            raise ValueError(
                f"--patient {exc.value}: not a knee preset; valid: {', '.join(exc.allowed)}"
            ) from None
        except ConfigError as exc:
            if exc.field == "plateau_window_s":  # the fixed 1-s plateau window
                raise ValueError(
                    f"--duration-s {fields['duration_s']:g}: must be longer than the "
                    f"{exc.value:g}-s plateau window (the mean of its last {exc.value:g} s)"
                ) from None
            flag = FLAGS.get(exc.field, exc.field)
            raise ValueError(f"{flag} {exc.value!r} is not allowed: {exc.allowed}") from None
    return configs


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def judged(
    config: PendulumConfig, metrics: PendulumMetrics
) -> list[tuple[PendulumNorm, float, bool]]:
    """Each norm of the preset with the measured value and whether it lies inside."""
    from twinloop.plant.knee.pendulum_norms import norms_for

    out = []
    for norm in norms_for(config.preset):
        value = float(getattr(metrics, norm.measure))
        out.append((norm, value, norm.inside(value)))
    return out


def meaningful(config: PendulumConfig, m: PendulumMetrics) -> bool:
    """The knee swung down from its release: its plateau lies beyond the swing threshold."""
    return m.plateau_deg > config.swing_threshold_deg


def verdict(checks: Sequence[tuple[PendulumNorm, float, bool]], judgeable: bool = True) -> str:
    """``inside`` when every measure is inside its norm, else ``outside (the measures)``.

    ``not judged`` when the test was released at or past the knee's rest angle.
    """
    if not judgeable:
        return "not judged (released at or past the rest angle)"
    outside = [norm.label for norm, _, ok in checks if not ok]
    return "inside" if not outside else f"outside ({', '.join(outside)})"


def setup_notes(config: PendulumConfig) -> list[str]:
    """Why a verdict is only indicative: the test's set-up differs from the norms'."""
    notes = []
    if config.hip_flexion_deg != 0:
        notes.append(
            f"the healthy norm was measured supine (hip 0°; the stroke norm's posture is not "
            f"given); this test is at hip {config.hip_flexion_deg:g}°, so its verdicts are "
            "indicative"
        )
    if config.drive_attached:
        notes.append(
            "the norms were measured without an exoskeleton; with the drive attached its "
            "friction and inertia damp the swing, so the verdicts are indicative"
        )
    return notes


def row_notes(config: PendulumConfig, m: PendulumMetrics) -> list[str]:
    """Why a row's measures mean nothing: released at, or past, the knee's rest angle."""
    if meaningful(config, m):
        return []
    return [
        f"{config.preset}: the knee rests at A0 {m.plateau_deg:.2f}° from its release angle "
        f"(not beyond the {config.swing_threshold_deg:g}° threshold in flexion), so R2 = A1/A0 "
        "means nothing and is not judged; release it in extension of its rest angle "
        "(--release-deg)"
    ]


def result_of(
    configs: Sequence[PendulumConfig], metrics: Sequence[PendulumMetrics]
) -> dict[str, Any]:
    """The JSON document: set-up, each test's config, metrics, norms and verdict."""
    import dataclasses

    tests = []
    for c, m in zip(configs, metrics, strict=True):
        checks = judged(c, m)
        tests.append(
            {
                "config": dataclasses.asdict(c),
                "metrics": {
                    k: (_finite(v) if isinstance(v, float) else v)
                    for k, v in dataclasses.asdict(m).items()
                },
                "norms": [
                    {
                        "norm": norm.as_dict(),
                        "value": _finite(value),
                        "inside": ok if meaningful(c, m) else None,
                    }
                    for norm, value, ok in checks
                ],
                "verdict": verdict(checks, meaningful(c, m)),
                "notes": row_notes(c, m),
            }
        )
    first = configs[0]
    return {
        "test": "Wartenberg pendulum test (twinloop.plant.knee.pendulum)",
        "setup": {
            "hip_flexion_deg": first.hip_flexion_deg,
            "posture": "supine" if first.hip_flexion_deg == 0 else "not supine",
            "drive": "attached" if first.drive_attached else "detached",
            "release_angle_deg": first.release_angle_deg,
            "duration_s": first.duration_s,
            "swing_threshold_deg": first.swing_threshold_deg,
            "plateau_window_s": first.plateau_window_s,
            "muscles": "relaxed: no intent, no static-load compensation; stretch reflex on",
            "notes": setup_notes(first),
        },
        "tests": tests,
    }


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "—"


#: The table's columns: heading, width.
COLUMNS = (
    ("preset", 9),
    ("A1 (°)", 7),
    ("A0 (°)", 7),
    ("R2", 6),
    ("R2n", 6),
    ("swings", 6),
    ("peak vel (°/s)", 14),
    ("period (s)", 10),
    ("settled", 7),
)


def table_row(config: PendulumConfig, m: PendulumMetrics, checks: Any) -> str:
    """One line of the table (the values as printed, the verdict last)."""
    cells = (
        config.preset,
        _num(m.first_swing_deg, ".1f"),
        _num(m.plateau_deg, ".1f"),
        _num(m.relaxation_index, ".3f"),
        _num(m.relaxation_index_normalised, ".3f"),
        str(m.swings),
        _num(m.peak_velocity_deg_s, ".0f"),
        _num(m.period_s, ".3f"),
        "yes" if m.settled else "no",
    )
    line = f"{cells[0]:<{COLUMNS[0][1]}}"
    line += "".join(
        f"  {cell:>{width}}" for cell, (_, width) in zip(cells[1:], COLUMNS[1:], strict=True)
    )
    return f"{line}  {verdict(checks, meaningful(config, m))}"


def _range(norm: PendulumNorm, value: float) -> str:
    unit = f" {norm.unit}" if norm.unit else ""
    digits = ".0f" if norm.unit else ".3f"
    bounds = ".0f" if norm.unit else ".2f"
    return (
        f"{norm.label} {_num(value, digits)}{unit} in {norm.low:{bounds}}–{norm.high:{bounds}}"
        f"{unit}"
    )


def print_table(configs: Sequence[PendulumConfig], metrics: Sequence[PendulumMetrics]) -> None:
    """The console table, then each row's norms and verdicts, then the set-up's caveats."""
    c = configs[0]
    posture = "supine" if c.hip_flexion_deg == 0 else "not supine"
    print(
        f"pendulum test: hip {c.hip_flexion_deg:g}° ({posture}), drive "
        f"{'attached, unpowered' if c.drive_attached else 'detached'}, released at "
        f"{c.release_angle_deg:g}°, {c.duration_s:g} s recorded; angles from the release, swings "
        f"> {c.swing_threshold_deg:g}° beyond the plateau"
    )
    head = f"{COLUMNS[0][0]:<{COLUMNS[0][1]}}"
    head += "".join(f"  {name:>{width}}" for name, width in COLUMNS[1:])
    print(f"{head}  verdict")
    rows = [(cfg, m, judged(cfg, m)) for cfg, m in zip(configs, metrics, strict=True)]
    for cfg, m, checks in rows:
        print(table_row(cfg, m, checks))
    print("judged against (the cohort's mean ± k SD; set-up as published):")
    sources: dict[str, str] = {}
    for cfg, m, checks in rows:
        for norm, value, ok in checks:
            sources[norm.short] = norm.source
            said = ("inside" if ok else "outside") if meaningful(cfg, m) else "not judged"
            print(
                f"  {cfg.preset:<9} {_range(norm, value)}: {said}  "
                f"({norm.cohort}, n = {norm.n}, ± {norm.n_sd:g} SD, {norm.setup}; {norm.short})"
            )
    for short, source in sources.items():
        print(f"  {short}: {source}")
    notes = [n for cfg, m, _ in rows for n in row_notes(cfg, m)] + setup_notes(c)
    for note in notes:
        print(f"note: {note}")


def plot(
    path: Path,
    configs: Sequence[PendulumConfig],
    traces: Sequence[PendulumTrace],
    metrics: Sequence[PendulumMetrics],
) -> None:
    """The angle traces, each with its plateau (A0, dashed) and first-swing peak (A1) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), constrained_layout=True)
    ax = fig.subplots()
    for i, (c, tr, m) in enumerate(zip(configs, traces, metrics, strict=True)):
        color = f"C{i}"
        angle_deg = np.degrees(tr.angle_rad)
        start = float(angle_deg[0])
        ax.plot(tr.time_s, angle_deg, color=color, lw=1.1, label=f"{c.preset}: R2 "
                f"{m.relaxation_index:.3f}")  # fmt: skip
        ax.axhline(start + m.plateau_deg, color=color, ls="--", lw=0.8)
        peak = int(np.argmax(angle_deg - start >= m.first_swing_deg))  # the first flexion peak
        ax.plot(tr.time_s[peak], angle_deg[peak], "o", color=color, ms=5)
        ax.annotate(f"A1 {m.first_swing_deg:.1f}°", (tr.time_s[peak], angle_deg[peak]),
                    textcoords="offset points", xytext=(7, -10), fontsize=8,
                    color=color)  # fmt: skip
        # the plateaus often coincide: their labels stacked above the line's right end
        ax.annotate(f"{c.preset} A0 {m.plateau_deg:.1f}°", (tr.time_s[-1], start + m.plateau_deg),
                    textcoords="offset points", xytext=(-110, 5 + 11 * i), fontsize=8,
                    color=color)  # fmt: skip
    c = configs[0]
    ax.axhline(c.release_angle_deg, color="0.6", lw=0.6)
    ax.invert_yaxis()  # flexion downwards: the shank falls as on the plinth
    ax.set_xlabel("time after release (s)")
    ax.set_ylabel("knee flexion (°)")
    ax.set_title(
        f"Pendulum test, hip {c.hip_flexion_deg:g}°, drive "
        f"{'attached' if c.drive_attached else 'detached'} (dots: first-swing peak A1; dashed: "
        "plateau A0)",
        fontsize=10,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)


def main_pendulum(args: argparse.Namespace) -> int:
    """Run the tests as one batch; print the table (or JSON); write ``--out``'s files."""
    from twinloop.plant.errors import ConfigError
    from twinloop.plant.knee.pendulum import measure_pendulum, simulate_pendulum

    configs = configs_of(args)
    if args.out is not None:
        options.claim_out(args.out, overwrite=args.overwrite, remove=False)
    traces = simulate_pendulum(configs)
    try:
        metrics = measure_pendulum(configs, traces)
    except ConfigError as exc:  # a release at the resting angle: nothing swings
        raise ValueError(
            f"--release-deg {configs[0].release_angle_deg:g}: the knee did not swing ({exc})"
        ) from None
    result = result_of(configs, metrics)
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False, allow_nan=False))
    else:
        print_table(configs, metrics)
    if args.out is not None:
        out = options.claim_out(args.out, overwrite=args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_FILE).write_text(
            json.dumps(result, indent=1, ensure_ascii=False, allow_nan=False) + "\n",
            encoding="utf-8",
        )
        plot(out / PNG_FILE, configs, traces, metrics)
        if not args.json:
            print(f"-> {out / JSON_FILE}, {out / PNG_FILE}")
    return 0
