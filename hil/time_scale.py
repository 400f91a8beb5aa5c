"""A rig and its devices on one clock: the announced time scale and the observed data rate.

A HIL rig and an emulated device each run simulated time at their own ``--time-scale`` (wall
seconds per simulated minute, 60 = real time). At different scales nothing fails loudly: the
rig sees its CGM go stale, or temp basals expire far too early. Two checks make the mismatch
say what it is:

* **announced** (at connect): an emulated device states its scale — the pump in its input
  register ``time_scale_s_per_min`` (``hw_bridge/DEVICES.md``), the CGM in its answer to
  ``$TLCMD,INFO`` — and :func:`check_announced` refuses a scale other than the rig's with one
  line naming both and the fix;
* **observed** (for real devices, which announce nothing): :class:`ClockRateCheck` compares
  how far the device's own clock (the CGM frames' ``t_min``, the pump's heartbeat) advanced
  with how far the rig's did over a window, and reports a device running more than
  :data:`RATE_FACTOR` times faster or slower, with the same hint.
"""

from __future__ import annotations

import dataclasses
import math

#: The fix every mismatch message ends with.
HINT = "start both with the same --time-scale"
#: Relative difference between an announced and the rig's time scale still taken as equal
#: (an announced float32 carries ~7 significant digits).
ANNOUNCED_REL_TOL = 1e-4
#: A device whose clock runs more than this many times faster or slower than the rig's is on
#: another time scale (a rate check cannot be exact: readings arrive when the rig polls).
RATE_FACTOR = 2.0
#: Simulated minutes of the rig over which a device's clock rate is judged.
RATE_WINDOW_MIN = 15.0


class TimeScaleMismatch(ValueError):
    """A device announcing a time scale other than the rig's (the message says both)."""


def mismatch_message(device: str, device_scale: str, rig_s_per_min: float) -> str:
    """``DEVICE runs at time scale X, this rig at Y: start both with the same --time-scale``."""
    return f"{device} runs at time scale {device_scale}, this rig at {rig_s_per_min:g}: {HINT}"


def check_announced(device: str, announced_s_per_min: float, rig_s_per_min: float) -> None:
    """Refuse a device whose announced time scale differs from the rig's.

    Raises:
        TimeScaleMismatch: the scales differ (or the announced one is not a number > 0).

    """
    a = float(announced_s_per_min)
    if not (math.isfinite(a) and a > 0) or not math.isclose(
        a, rig_s_per_min, rel_tol=ANNOUNCED_REL_TOL
    ):
        raise TimeScaleMismatch(mismatch_message(device, f"{a:.6g}", rig_s_per_min))


@dataclasses.dataclass
class ClockRateCheck:
    """Judge a device's clock rate against the rig's from the device's own timestamps.

    Feed :meth:`observe` with the wall time of each observation and the device's clock then
    (simulated minutes: a CGM frame's ``t_min``, a pump's heartbeat). The first observation
    anchors a window; once the rig's clock has run ``window_min`` simulated minutes past it
    (or the device's is already far ahead), the device's progress is compared with the
    rig's, allowing one minute of slack on each (the rig sees data only when it polls). A
    device clock that has not moved at all is not judged (a stalled device is not a time
    scale; one far slower is judged at its next tick). A
    clock that went backwards (a restarted device) starts a new window, and so does
    :meth:`reset` (the rig calls it when the device was out); a judged window that matched
    settles the check (later observations are not judged, so a device fault such as a
    frozen heartbeat is not mistaken for a time scale).

    Attributes:
        device: the device's name in messages (e.g. ``cgm at /tmp/tl-cgm``).
        rig_s_per_min: the rig's wall seconds per simulated minute.
        modulo: the device clock wraps at this value (a 16-bit heartbeat: 65536), or None.

    """

    device: str
    rig_s_per_min: float
    modulo: int | None = None
    window_min: float = RATE_WINDOW_MIN
    factor: float = RATE_FACTOR
    settled: bool = False
    _anchor: tuple[float, int] | None = None
    _last: int | None = None

    def reset(self) -> None:
        """Forget the window (the device was out: the next observation anchors a new one)."""
        self._anchor, self._last, self.settled = None, None, False

    def _backwards(self, last: int, now: int) -> bool:
        if self.modulo is None:
            return now < last
        return (now - last) % self.modulo > self.modulo // 2

    def observe(self, wall_s: float, device_min: int) -> str | None:
        """Record one observation; the mismatch message when the window shows one, else None."""
        last, self._last = self._last, device_min
        if self._anchor is None or (last is not None and self._backwards(last, device_min)):
            self._anchor, self.settled = (wall_s, device_min), False
            return None
        if self.settled:
            return None
        w0, d0 = self._anchor
        advanced = device_min - d0
        if self.modulo is not None:
            advanced %= self.modulo
        if advanced == 0:  # a stalled device, or one far slower: judged at its next tick
            return None
        rig_min = (wall_s - w0) / self.rig_s_per_min
        far_ahead = advanced - 1 > self.factor * (self.window_min + 1)
        if rig_min < self.window_min and not far_ahead:
            return None
        too_fast = advanced - 1 > self.factor * (rig_min + 1)
        too_slow = advanced + 1 < (rig_min - 1) / self.factor
        if not (too_fast or too_slow):
            self.settled = True
            return None
        wall = wall_s - w0
        scale = f"~{wall / advanced:.3g} (observed: {advanced} simulated min in {wall:.3g} s)"
        self._anchor, self.settled = (wall_s, device_min), True  # said once
        return mismatch_message(self.device, scale, self.rig_s_per_min)
