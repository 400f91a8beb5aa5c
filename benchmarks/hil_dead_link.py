"""What one pump exchange costs on a dead Modbus RTU link (a pty with nothing behind it).

Prints one JSON object. Run it network-isolated::

    sh scripts/offline.sh .venv/bin/python benchmarks/hil_dead_link.py

``blocking_transport_s``: one heartbeat read and one safe-state write with the shipped RTU
profile (0.5 s timeout, 2 retries) — what one watchdog step waited when the rig made its pump
transactions in the watchdog's own thread. The rig now makes them in a thread of its own; the
watchdog's steps during such an exchange are counted (not timed) by
``tests/e2e/test_rig_recovery.py::test_the_watchdog_keeps_ticking_while_the_pump_link_is_dead``,
which prints its longest step with ``-s``.
"""

from __future__ import annotations

import contextlib
import json
import time

from twinloop.hw_bridge.errors import CommunicationError
from twinloop.hw_bridge.modbus_client import ModbusDevice
from twinloop.hw_bridge.profile import load_profile, shipped_profile
from twinloop.hw_bridge.pty import PtyPair


def main() -> None:
    """Measure and print."""
    with PtyPair() as dead:
        profile = load_profile(shipped_profile("insulin_pump_rtu")).with_overrides(port=dead.a)
        with ModbusDevice(profile) as pump:
            t0 = time.perf_counter()
            with contextlib.suppress(CommunicationError):  # expected: nobody answers
                pump.read_many(["heartbeat", "alarm_code"])
            t1 = time.perf_counter()
            with contextlib.suppress(CommunicationError):
                pump.apply_safe_state()
            t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "blocking_transport_s": {
                    "heartbeat_read": t1 - t0,
                    "safe_state": t2 - t1,
                    "total": t2 - t0,
                }
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
