"""The glucose therapy's agents part: its loop's options, run, summary table and report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinloop.agents.interface import RunOption, integer, one_of, positive_number
from twinloop.agents.messages import (
    CgmReading,
    InsulinCommand,
    InsulinDelivery,
    MealAnnouncement,
    ModelSwap,
    TwinEstimate,
)
from twinloop.agents.placement import Placement
from twinloop.agents.recording import DEFAULT_FLUSH_EVERY_MIN, check_flush_every_min
from twinloop.limits import MAX_PATIENTS, MAX_RUN_DAYS, MAX_TIME_SCALE_S_PER_MIN
from twinloop.plant.errors import ConfigError
from twinloop.plant.glucose.models import DEFAULT_MODEL, MODEL_HELP, parse_model
from twinloop.plant.glucose.scenarios import SCENARIOS

if TYPE_CHECKING:
    from twinloop.agents.glucose.loop import LoopConfig


def model_spec(value: Any) -> str:
    """A :attr:`RunOption.parse` for the loop's model (:mod:`twinloop.plant.glucose.models`)."""
    try:
        return parse_model(value).spec
    except ConfigError:
        raise ValueError(MODEL_HELP) from None


class GlucoseLoop:
    """Sensor → twin estimator → controller → supervisor → pump around UVA/Padova patients."""

    run_options = (
        RunOption(
            "days",
            integer(1, MAX_RUN_DAYS),
            1,
            f"simulated days, 1 to {MAX_RUN_DAYS} (default 1)",
        ),
        RunOption("scenario", one_of(SCENARIOS), "random", "meal scenario: random (default) or A"),
        RunOption(
            "model",
            model_spec,
            DEFAULT_MODEL,
            "what the twin and the MPC plan on: population (default: the age group's mean at "
            "the person's settings), population:sample, twin:PATH (a twin.yaml or a directory "
            "of <patient>.yaml), fit (fit each patient's twin from a synthesized 7-day log "
            "first) or oracle (the true patient: an upper bound)",
        ),
        RunOption(
            "refit_every_days",
            integer(0, MAX_RUN_DAYS),
            0,
            "re-fit the twin from the loop's own recording every N simulated days (the last 7 "
            f"days, off the tick), 0 to {MAX_RUN_DAYS} (default 0: off)",
        ),
        RunOption(
            "clock",
            one_of(("sim", "wall")),
            "sim",
            "sim (default: as fast as the CPU allows) or wall",
        ),
        RunOption(
            "time_scale",
            positive_number(MAX_TIME_SCALE_S_PER_MIN),
            0.01,
            "wall-clock seconds per simulated minute with --clock wall, > 0 to "
            f"{MAX_TIME_SCALE_S_PER_MIN:g} (default 0.01)",
        ),
        RunOption(
            "flush_every_min",
            check_flush_every_min,
            DEFAULT_FLUSH_EVERY_MIN,
            "simulated minutes between flushes of the recording to disk (1..1440, default 60): "
            "a killed run loses at most this much",
        ),
        RunOption(
            "parallel_patients",
            integer(1, MAX_PATIENTS),
            None,
            "patient loops driven together in lockstep, one call per kind of agent and round, "
            f"1 to {MAX_PATIENTS} (default: all)",
        ),
    )
    placements = ("inline", "ray-patients", "ray")  # auto_placement chooses
    channel_messages: Mapping[str, type] = {
        "sensor->controller": CgmReading,
        "meal->controller": MealAnnouncement,
        "controller->supervisor": InsulinCommand,
        "supervisor->actuator": InsulinCommand,
        "actuator->plant": InsulinDelivery,
        "estimator->controller": TwinEstimate,
        "estimator->models": ModelSwap,
    }
    default_out = "runs/run-%Y%m%d-%H%M%S"

    def make_config(
        self, *, patients: Sequence[str], seed: int, controller: str, options: Mapping[str, Any]
    ) -> tuple[LoopConfig, int | None, int]:
        """The :class:`LoopConfig`, the lockstep group size and the flush interval."""
        from twinloop.agents.glucose.loop import LoopConfig

        config = LoopConfig(
            patients=tuple(patients),
            days=options["days"],
            seed=seed,
            controller=controller,
            scenario=options["scenario"],
            model=options["model"],
            refit_every_days=options["refit_every_days"],
            clock=options["clock"],
            wall_s_per_sim_min=options["time_scale"],
        )
        return config, options.get("parallel_patients"), options["flush_every_min"]

    def run(
        self,
        config: tuple[LoopConfig, int | None, int],
        out: str | Path,
        *,
        placement: Placement,
        progress: bool,
    ) -> tuple[Path, dict[str, Any]]:
        """:func:`twinloop.agents.glucose.run.run_cohort`."""
        from twinloop.agents.glucose.run import run_cohort

        loop_config, parallel, flush = config
        return run_cohort(
            loop_config,
            out,
            progress=progress,
            placement=placement,
            parallel_patients=parallel,
            flush_every_min=flush,
        )

    def auto_placement(
        self, config: tuple[LoopConfig, int | None, int], address: str | None
    ) -> tuple[str, str]:
        """:func:`twinloop.agents.glucose.run.auto_placement`."""
        from twinloop.agents.glucose.run import auto_placement

        return auto_placement(config[0], address)

    def summary_lines(
        self,
        config: tuple[LoopConfig, int | None, int],
        summary: Mapping[str, Any],
        *,
        placement: str,
        elapsed_s: float,
    ) -> list[str]:
        """Plasma-glucose metrics per patient and cohort, then the totals."""
        cfg = config[0]
        cols = (
            ("mean", "mean_mg_dl"),
            ("TIR%", "time_in_range_70_180_pct"),
            ("<70%", "time_below_70_pct"),
            ("<54%", "time_below_54_pct"),
            (">180%", "time_above_180_pct"),
        )
        header = f"{'patient':<16}" + "".join(f"{c:>8}" for c, _ in cols) + "  hazard"
        lines = [
            f"twinloop run: {len(summary['patients'])} patient(s) × {cfg.days} day(s), controller "
            f"{cfg.controller} under the safety supervisor, model {cfg.model}, seed "
            f"{cfg.seed}, agents {placement}; plasma glucose mg/dL",
            header,
            "-" * len(header),
        ]
        for name, row in [*summary["patients"].items(), *summary["cohorts"].items()]:
            flag = "  COLLAPSED" if row.get("non_physiological") else ""
            lines.append(f"{name:<16}" + "".join(f"{row[f]:8.1f}" for _, f in cols) + flag)
        flagged = summary.get("hazard_patients") or []
        if flagged:
            lines.append(
                f"COLLAPSED: {len(flagged)} patient(s) with plasma glucose below "
                f"{summary['hazard_floor_mg_dl']:g} mg/dL or not a number (non-physiological; "
                "minutes_non_physiological in summary.json): "
                + ", ".join(
                    f"{n} ({summary['patients'][n]['minutes_non_physiological']} min)"
                    for n in flagged
                )
            )
        lines.append(f"{len(summary['patients']) * cfg.days} patient-day(s) in {elapsed_s:.1f} s")
        if "tick_lateness_ms" in summary:
            late = summary["tick_lateness_ms"]
            lines.append(
                f"wall clock: {late['ticks']} ticks, lateness p50 {late['p50']:.2f} ms, "
                f"p99 {late['p99']:.2f} ms, max {late['max']:.2f} ms"
            )
        return lines

    def fhir_export(self, run_dir: str | Path, **options: Any) -> Any:
        """:func:`twinloop.agents.glucose.fhir.build_export` (``twinloop export fhir``)."""
        from twinloop.agents.glucose.fhir import build_export

        return build_export(run_dir, **options)

    def report(self, run_dir: str | Path, *, allow_incomplete: bool) -> Any:
        """:func:`twinloop.agents.glucose.report.build_report`."""
        from twinloop.agents.glucose.report import build_report

        return build_report(run_dir, allow_incomplete=allow_incomplete)


PART = GlucoseLoop()
