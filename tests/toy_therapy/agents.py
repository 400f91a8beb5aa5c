"""The toy agents part: messages, the loop (sensor, controller, supervisor, valve), run, report."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from twinloop.agents.channels import Channel, Listener
from twinloop.agents.interface import ReportResult, RunOption
from twinloop.agents.messages import Record
from twinloop.agents.placement import Placement

from .plant import PRESETS, TankModel
from .policies import CONTROLLERS


# -- messages (time in s) --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class TankLevel(Record):
    """The true level (plant → sensor), %."""

    t_s: float
    level_pct: float
    kind: ClassVar[str] = "toy_level"


@dataclasses.dataclass(frozen=True, slots=True)
class LevelReading(Record):
    """The level sensor's reading, %."""

    t_s: float
    level_pct: float
    kind: ClassVar[str] = "toy_reading"


@dataclasses.dataclass(frozen=True, slots=True)
class ValveCommand(Record):
    """A valve opening, %."""

    t_s: float
    valve_pct: float
    kind: ClassVar[str] = "toy_valve"


@dataclasses.dataclass(frozen=True, slots=True)
class ValveOverride(Record):
    """The supervisor changed (or supplied) the valve command: why, and what went out, %."""

    t_s: float
    rule: str
    requested_valve_pct: float
    valve_pct: float
    kind: ClassVar[str] = "toy_override"


CHANNELS = (
    "plant->sensor",
    "sensor->controller",
    "controller->supervisor",
    "supervisor->actuator",
    "supervisor->overrides",
    "runtime->faults",
)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A toy run: tanks, seed, controller and length.

    Attributes:
        patients: tank presets.
        seed: the run's seed.
        controller: a controller of the toy (``p``).
        seconds: simulated seconds.
        control_period_s: the loop's period, s.

    """

    patients: tuple[str, ...]
    seed: int = 0
    controller: str = "p"
    seconds: int = 120
    control_period_s: float = 1.0


def loop_rng(seed: int, patient: str) -> np.random.Generator:
    """The generator of one tank's loop: a function of the seed and the tank only."""
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(zlib.crc32(patient.encode()),))
    )


class ToyLoop:
    """One tank's loop: sensor → controller → supervisor → valve, every edge a channel."""

    def __init__(self, patient: str, config: ToyConfig, rng: np.random.Generator) -> None:
        self.patient = patient
        self.config = config
        self.model = TankModel(PRESETS[patient], rng)
        self.rng = rng
        self.controller = CONTROLLERS[config.controller]()
        self.channels: dict[str, Channel[Any]] = {name: Channel(name) for name in CHANNELS}

    def listen(self, listener: Listener) -> None:
        """Send every message of every channel to ``listener`` too."""
        for channel in self.channels.values():
            channel.listen(listener)

    def run(self) -> None:
        """Run ``config.seconds`` of the loop."""
        ch = self.channels
        dt = self.config.control_period_s
        last: LevelReading | None = None
        valve = 0.0
        for k in range(int(self.config.seconds / dt)):
            t = k * dt
            ch["plant->sensor"].send(TankLevel(t, self.model.level_pct))
            noise = 0.5 * float(self.rng.normal())
            reading = ch["sensor->controller"].send(LevelReading(t, self.model.level_pct + noise))
            last = reading if reading is not None else last
            command = None
            if last is not None:
                asked = ValveCommand(t, self.controller.decide(last.level_pct))
                command = ch["controller->supervisor"].send(asked)
            if command is None:  # no decision this tick: the safe state, valve closed
                ch["supervisor->overrides"].send(ValveOverride(t, "no command", float("nan"), 0.0))
                out = ValveCommand(t, 0.0)
            else:
                clipped = min(max(command.valve_pct, 0.0), 100.0)
                if clipped != command.valve_pct:
                    ch["supervisor->overrides"].send(
                        ValveOverride(t, "valve range", command.valve_pct, clipped)
                    )
                out = ValveCommand(t, clipped)
            applied = ch["supervisor->actuator"].send(out)
            valve = applied.valve_pct if applied is not None else valve
            self.model.step(valve, dt)

    def close(self) -> None:
        """Nothing to release (the loop holds no actors)."""


def _positive_int(text: Any) -> int:
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("an integer >= 1")
    return value


def metrics(t_s: np.ndarray, level_pct: np.ndarray, setpoint_pct: float) -> dict[str, float]:
    """Mean level, RMS error to the set point and peak level, % (from a recording)."""
    if level_pct.size == 0:
        return {
            "mean_level_pct": float("nan"),
            "rms_error_pct": float("nan"),
            "max_level_pct": float("nan"),
        }
    return {
        "mean_level_pct": float(level_pct.mean()),
        "rms_error_pct": float(np.sqrt(np.mean((level_pct - setpoint_pct) ** 2))),
        "max_level_pct": float(level_pct.max()),
    }


def summarize(
    tables: Mapping[str, Mapping[str, Sequence[Any]]], patients: Sequence[str]
) -> dict[str, Any]:
    """Per-tank metrics from the ``plant->sensor`` table."""
    truth = tables.get("plant->sensor", {})
    who = np.asarray(truth.get("patient", []))
    t = np.asarray(truth.get("t_s", []), dtype=float)
    level = np.asarray(truth.get("level_pct", []), dtype=float)
    setpoint = CONTROLLERS["p"]().setpoint_pct
    return {"patients": {p: metrics(t[who == p], level[who == p], setpoint) for p in patients}}


class ToyAgents:
    """The toy agents part."""

    run_options = (RunOption("seconds", _positive_int, 120, "simulated seconds (default 120)"),)
    placements = ("inline",)
    channel_messages: Mapping[str, type] = {
        "sensor->controller": LevelReading,
        "controller->supervisor": ValveCommand,
        "supervisor->actuator": ValveCommand,
    }
    default_out = "runs/toy-%Y%m%d-%H%M%S"

    def make_config(
        self, *, patients: Sequence[str], seed: int, controller: str, options: Mapping[str, Any]
    ) -> ToyConfig:
        """The :class:`ToyConfig`."""
        return ToyConfig(tuple(patients), seed, controller, int(options["seconds"]))

    def run(
        self, config: ToyConfig, out: str | Path, *, placement: Placement, progress: bool
    ) -> tuple[Path, dict[str, Any]]:
        """Run every tank's loop in process, recorded with the shared Recorder."""
        from twinloop.agents.recording import Recorder

        recorder = Recorder(out)
        for patient in config.patients:
            loop = ToyLoop(patient, config, loop_rng(config.seed, patient))
            loop.listen(recorder.listener(patient))
            loop.run()
            loop.close()
        summary = summarize(recorder.tables(), config.patients)
        run_dir = recorder.finish({"therapy": "toy", **dataclasses.asdict(config)}, summary)
        return run_dir, summary

    def summary_lines(
        self, config: ToyConfig, summary: Mapping[str, Any], *, placement: str, elapsed_s: float
    ) -> list[str]:
        """A header and one line per tank."""
        lines = [
            f"toy run: {len(config.patients)} tank(s) × {config.seconds} s, seed {config.seed}"
        ]
        for name, row in summary["patients"].items():
            lines.append(
                f"{name:<8} mean {row['mean_level_pct']:6.2f} %  rms error "
                f"{row['rms_error_pct']:6.2f} %  max {row['max_level_pct']:6.2f} %"
            )
        return lines

    def report(self, run_dir: str | Path, *, allow_incomplete: bool) -> ReportResult:
        """Rebuild the summary from the Parquet recording and write ``report.md``."""
        import json

        import pyarrow.parquet as pq

        from twinloop.agents.recording import channel_file
        from twinloop.agents.report import check_complete

        run_dir = Path(run_dir)
        manifest, _ = check_complete(run_dir, allow_incomplete=allow_incomplete)
        patients = tuple((manifest or {}).get("config", {}).get("patients", ()))
        table = pq.read_table(run_dir / "channels" / channel_file("plant->sensor")).to_pydict()
        summary = summarize({"plant->sensor": table}, patients)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        lines = [
            "# Toy run",
            "",
            "| tank | mean level % | RMS error % | max level % |",
            "|---|---|---|---|",
        ]
        for name, row in summary["patients"].items():
            lines.append(
                f"| {name} | {row['mean_level_pct']:.2f} | {row['rms_error_pct']:.2f} | "
                f"{row['max_level_pct']:.2f} |"
            )
        path = run_dir / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return ReportResult(path, ())


PART = ToyAgents()
