"""Campaign runs through the HIL rigs: wire faults on an emulated device's Modbus wire.

A spec with a ``hil:`` block (``twinloop.campaigns.spec``) runs each of its runs as a HIL session
(:func:`run_hil`): the therapy's campaigns part runs it (``run_hil``, the ``hil:`` keys are its
``hil_keys``) with the shared pieces here: the wire faults' switches (:data:`WIRE_SWITCH`),
their schedule on the rig's clock (:class:`WireSchedule`) and the verdict of
``safe_state_after_lost_communication`` (:func:`lost_communication_verdict`).

Knee exoskeleton (``twinloop.campaigns.knee.hil``): the emulated CiA 402 drive (the knee behind
it, following the cyclic task) on Modbus TCP and the exoskeleton rig at 100 Hz in real time,
for ``hil.seconds``; the wire faults switch on the drive's ``WireFaults`` on the rig's clock
(seconds since the drive was enabled), and the rig's alarm ends the session in the safe state.

Insulin (``twinloop.campaigns.glucose.hil``): each run is a HIL session on loopback, in
accelerated wall-clock time: a
:class:`~twinloop.hw_bridge.emulators.patient.VirtualPatient` behind the emulated pump (Modbus TCP,
127.0.0.1, a free port) and the emulated CGM (its line protocol over a socat pty pair), the rig
(:class:`twinloop.hil.glucose.rig.Rig`: read, control, supervise, write, with its watchdog and
alarms) driving them through the shipped profile ``insulin_pump_tcp``. The scenario's wire faults
are switched on the pump's :class:`~twinloop.hw_bridge.wire.WireFaults` when the rig's clock enters
their window and off when it leaves it:

================  =====================================================================
fault             switch
================  =====================================================================
timeout           ``drop_response`` (executed, answer lost)
dropped_frame     ``drop`` (not executed, no answer)
modbus_exception  ``exception_code`` = ``code``
delayed_response  ``delay_s`` = ``delay_s`` (wall seconds)
disconnect        ``disconnect(down_s=window)``: the port closes for the window
byte_corruption   ``corrupt_bytes``
duplicated_write  ``duplicate_write``
bad_crc           ``corrupt_crc`` (RTU framing only: refused over TCP)
================  =====================================================================

The pump client's timeout is scaled with the session: half a watchdog step (at least 10 ms)
and no retries instead of the profile's 0.5 s and 2 retries, so that a lost answer costs the
rig one step of its accelerated clock, as half a second costs a real rig. ``delay_s`` of
``delayed_response`` is in wall seconds: give it at that scale (the shipped HIL spec uses
0.05 s, more than the scaled timeout: the answer arrives too late).

The truth is the virtual patient's plasma glucose each simulated minute (its listeners); the
rig's alarms are the detections; ``safe_state_after_lost_communication`` checks that a pump
alarm with the safe state follows each communication-cutting fault within N control periods.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinloop.campaigns.spec import CampaignSpec, Scenario

__all__ = [
    "COMMUNICATION_LOSS",
    "WIRE_SWITCH",
    "WireSchedule",
    "alarms_as_data",
    "lost_communication_verdict",
    "run_hil",
]

#: Catalogue wire faults → the ``WireFaults`` switch they turn on.
WIRE_SWITCH = {
    "timeout": "drop_response",
    "dropped_frame": "drop",
    "bad_crc": "corrupt_crc",
    "modbus_exception": "exception_code",
    "delayed_response": "delay_s",
    "disconnect": "disconnect",
    "byte_corruption": "corrupt_bytes",
    "duplicated_write": "duplicate_write",
}
#: Wire faults after which the rig must see the pump as lost (alarm and safe state).
COMMUNICATION_LOSS = frozenset({"timeout", "dropped_frame", "disconnect", "modbus_exception"})


def alarms_as_data(log: list[Any], clock: str) -> list[dict[str, Any]]:
    """A rig's alarm log as data (``clock``: the alarm's time field, ``t_min`` or ``t_s``)."""
    return [
        {clock: getattr(a, clock), "source": a.source, "condition": a.condition,
         "action": a.action}
        for a in log
    ]  # fmt: skip


def lost_communication_verdict(
    rid: str, scenario: Scenario, t_alarm: list[float], window: float
) -> dict[str, Any]:
    """Judge ``safe_state_after_lost_communication`` on a rig's alarms.

    Passes when an alarm with the safe state follows each communication-cutting fault's onset
    within ``window`` (the rig's time unit).
    """
    cuts = [f.start for f in scenario.faults if f.fault in COMMUNICATION_LOSS]
    if not cuts:
        return {"id": rid, "pass": None, "why": "no communication-cutting fault"}
    alarms = np.asarray(t_alarm, dtype=np.float64)
    for cut in cuts:
        if not ((alarms >= cut) & (alarms <= cut + window)).any():
            later = alarms[alarms >= cut]
            return {
                "id": rid,
                "pass": False,
                "at": cut,
                "value": float(later.min() - cut) if later.size else None,
            }
    return {"id": rid, "pass": True}


class WireSchedule:
    """Switches the scenario's wire faults on and off on the rig's clock.

    Args:
        scenario: the run's scenario (wire faults, windows in the rig's time unit).
        faults: the device's :class:`~twinloop.hw_bridge.wire.WireFaults`.
        scale: wall seconds per rig time unit (a disconnect's down time).

    """

    def __init__(self, scenario: Scenario, faults: Any, scale: float) -> None:
        self.lines = list(scenario.faults)
        self.faults = faults
        self.scale = scale
        self.on = [False] * len(self.lines)

    def at(self, t_min: float) -> None:
        """Switch each fault on or off for rig time ``t_min`` (the rig's time unit)."""
        for i, line in enumerate(self.lines):
            inside = line.start <= t_min < line.end
            if inside == self.on[i]:
                continue
            self.on[i] = inside
            params = dict(line.params)
            switch = WIRE_SWITCH[line.fault]
            if switch == "disconnect":
                if inside:
                    self.faults.disconnect(down_s=line.duration * self.scale, wait_s=0.0)
                continue
            if inside:
                value: Any = True
                if switch == "exception_code":
                    value = int(params["code"])
                elif switch == "delay_s":
                    value = params["delay_s"]
                self.faults.set(**{switch: value, "probability": params.get("probability", 1.0)})
            else:
                off: Any = (
                    0.0 if switch == "delay_s" else (None if switch == "exception_code" else False)
                )
                self.faults.set(**{switch: off})


def run_hil(spec: CampaignSpec, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one HIL session of the campaign with its therapy's part: verdict and trace."""
    from twinloop.therapy import get_therapy

    verdict, trace = get_therapy(spec.therapy).part("campaigns").run_hil(spec, key)
    return verdict, trace
