"""The exoskeleton safety supervisor: hard limits on every torque command, whatever produced it.

It sits on the controller → drive channel (like :mod:`twinloop.agents.glucose.supervisor` for
insulin) and no controller, an RL policy included, can bypass it. At each control tick it reviews
the command (or its absence) against the newest sensor reading and passes on a torque that respects
every rule below; each change is an :class:`~twinloop.agents.knee.messages.ExoOverride` naming the
rule, the torque asked for and the torque approved, so a recording shows when and why the controller
was overruled. Conventions of :mod:`twinloop.plant.knee.model`: angle 0 = full extension, positive =
flexion; torque N·m, positive = flexion.

Rules, applied in this order (each sees the torque the previous ones approved):

1. ``"stale encoder"`` — no reading, a reading older than ``encoder_stale_s`` before the tick
   (or stamped with a non-finite time), or a non-finite angle or velocity: 0 N·m, the
   compliant safe state (a back-drivable drive at zero torque lets the limb move freely; the
   supervisor cannot judge range or speed without a valid encoder). The remaining rules then
   have nothing left to change.
2. ``"no command"`` — the controller sent nothing (crashed, overran, actor restarting) or a
   non-finite torque: 0 N·m.
3. ``"torque limit"`` — clipped to ``±command_limit_nm`` = ``torque_limit_nm −
   friction_margin_nm``: a back-driven drive adds its own gear friction to the torque the joint
   feels (Coulomb + viscous, opposing the motion, hence in the command's direction when the
   joint moves against it), so the command keeps that margin and the joint's torque stays
   within ``torque_limit_nm`` up to ``velocity_limit_rad_s``.
4. ``"range of motion"`` — within ``rom_margin_rad`` of a range-of-motion limit, or beyond it,
   torque that pushes further out is removed: at the flexion end (``θ ≥ rom_max − margin``) no
   positive torque, at the extension end (``θ ≤ rom_min + margin``) no negative torque. Torque
   back into the range passes.
5. ``"velocity limit"`` — ``|ω| > velocity_limit_rad_s``: torque in the direction of motion is
   removed (torque that brakes passes).

A rule that changes nothing reports nothing. :attr:`ExoSupervisor.interventions` counts the
overrides per rule. The class is plain and picklable (it can be hosted as a Ray actor).
"""

from __future__ import annotations

import dataclasses
import math

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.knee.messages import ExoOverride, ExoSensorReading, ExoTorqueCommand

#: Rule names, in the order the rules are applied.
RULE_STALE_ENCODER = "stale encoder"
RULE_NO_COMMAND = "no command"
RULE_TORQUE_LIMIT = "torque limit"
RULE_RANGE_OF_MOTION = "range of motion"
RULE_VELOCITY_LIMIT = "velocity limit"
RULES: tuple[str, ...] = (
    RULE_STALE_ENCODER,
    RULE_NO_COMMAND,
    RULE_TORQUE_LIMIT,
    RULE_RANGE_OF_MOTION,
    RULE_VELOCITY_LIMIT,
)


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ExoSupervisorConfig:
    """Limits of the exoskeleton supervisor (validated once; units in the names).

    Attributes:
        torque_limit_nm: largest torque magnitude the joint may feel from the drive, N·m (> 0).
        friction_margin_nm: what the drive's gear friction can add to the command at the joint
            while back-driven, N·m (0 <= value < torque_limit_nm; default 1.1 = the default
            drive's 0.5 N·m Coulomb + 0.1 N·m·s/rad × the 6 rad/s velocity limit, see
            :class:`twinloop.plant.knee.model.KneeParams`). Commands are clipped to
            :attr:`command_limit_nm`. It covers speeds up to ``velocity_limit_rad_s``: faster
            than that, braking torque still passes and the viscous friction grows with the
            speed (0.1 N·m per rad/s beyond). With a series elastic drive the friction acts
            on the motor side, behind the spring, and this margin is not its bound.
        velocity_limit_rad_s: above this joint speed, torque along the motion is removed,
            rad/s (> 0).
        rom_min_rad: extension end of the allowed range of motion, rad (−5°).
        rom_max_rad: flexion end, rad (125°); ``rom_min_rad < rom_max_rad``.
        rom_margin_rad: distance from a range-of-motion end where torque pushing outwards is
            already removed, rad (≥ 0, less than half the range).
        encoder_stale_s: a reading older than this is stale, s (> 0; 3 control periods at
            100 Hz by default).

    Raises:
        LoopConfigError: a value outside what is allowed (names the field).

    """

    torque_limit_nm: float = 40.0
    friction_margin_nm: float = 1.1
    velocity_limit_rad_s: float = 6.0
    rom_min_rad: float = math.radians(-5.0)
    rom_max_rad: float = math.radians(125.0)
    rom_margin_rad: float = math.radians(5.0)
    encoder_stale_s: float = 0.03

    def __post_init__(self) -> None:
        for name in (
            "torque_limit_nm",
            "friction_margin_nm",
            "velocity_limit_rad_s",
            "rom_min_rad",
            "rom_max_rad",
            "rom_margin_rad",
            "encoder_stale_s",
        ):
            value = getattr(self, name)
            if not _real(value):
                raise LoopConfigError(name, value, "a finite real number")
        for name in ("torque_limit_nm", "velocity_limit_rad_s", "encoder_stale_s"):
            if not getattr(self, name) > 0:
                raise LoopConfigError(name, getattr(self, name), "> 0")
        if not 0 <= self.friction_margin_nm < self.torque_limit_nm:
            raise LoopConfigError(
                "friction_margin_nm",
                self.friction_margin_nm,
                f">= 0 and < torque_limit_nm ({self.torque_limit_nm:g} N·m)",
            )
        if not self.rom_min_rad < self.rom_max_rad:
            raise LoopConfigError(
                "rom_max_rad", self.rom_max_rad, f"> rom_min_rad ({self.rom_min_rad})"
            )
        half_range = 0.5 * (self.rom_max_rad - self.rom_min_rad)
        if not 0 <= self.rom_margin_rad < half_range:
            raise LoopConfigError(
                "rom_margin_rad",
                self.rom_margin_rad,
                f">= 0 and < half the range of motion ({half_range:g} rad)",
            )

    @property
    def command_limit_nm(self) -> float:
        """The largest command magnitude passed to the drive, N·m (limit − friction margin)."""
        return self.torque_limit_nm - self.friction_margin_nm


class ExoSupervisor:
    """Reviews every exoskeleton torque command (see the module docstring for the rules).

    Inputs: the tick time, the controller's command (or ``None``) and the newest encoder
    reading (or ``None``). Output: the command for the drive and the overrides that produced
    it. Rate: the control period.
    """

    def __init__(self, config: ExoSupervisorConfig | None = None) -> None:
        self.config = config if config is not None else ExoSupervisorConfig()
        self._counts: dict[str, int] = dict.fromkeys(RULES, 0)

    @property
    def interventions(self) -> dict[str, int]:
        """Overrides so far per rule name (a copy; every rule listed, zeros included)."""
        return dict(self._counts)

    def _stale(self, t_s: float, reading: ExoSensorReading | None) -> bool:
        if reading is None:
            return True
        if not (_real(reading.t_s) and _real(reading.angle_rad) and _real(reading.velocity_rad_s)):
            return True
        return bool(t_s - reading.t_s > self.config.encoder_stale_s)

    def review(
        self,
        t_s: float,
        command: ExoTorqueCommand | None,
        reading: ExoSensorReading | None,
    ) -> tuple[ExoTorqueCommand, list[ExoOverride]]:
        """Return the command that goes to the drive at ``t_s`` and the overrides made."""
        cfg = self.config
        requested = float(command.torque_nm) if command is not None else math.nan
        overrides: list[ExoOverride] = []
        tau = requested

        def apply(rule: str, new: float) -> None:
            nonlocal tau
            if new != tau:  # NaN → 0 is a change (NaN != 0); 0.0 → -0.0 is not
                overrides.append(ExoOverride(t_s, rule, requested, new))
                self._counts[rule] += 1
            tau = new

        if self._stale(t_s, reading):
            apply(RULE_STALE_ENCODER, 0.0)
        if command is None or not _real(tau):
            apply(RULE_NO_COMMAND, 0.0)
        limit = cfg.command_limit_nm
        apply(RULE_TORQUE_LIMIT, min(max(tau, -limit), limit))
        if reading is not None and tau != 0.0:
            theta = float(reading.angle_rad)
            omega = float(reading.velocity_rad_s)
            out = (tau > 0.0 and theta >= cfg.rom_max_rad - cfg.rom_margin_rad) or (
                tau < 0.0 and theta <= cfg.rom_min_rad + cfg.rom_margin_rad
            )
            if out:
                apply(RULE_RANGE_OF_MOTION, 0.0)
            if abs(omega) > cfg.velocity_limit_rad_s and tau * omega > 0.0:
                apply(RULE_VELOCITY_LIMIT, 0.0)
        return ExoTorqueCommand(t_s, float(tau)), overrides
