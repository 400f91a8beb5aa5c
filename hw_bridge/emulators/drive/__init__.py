"""The emulated exoskeleton servo drive, split as a real drive is.

* :mod:`~twinloop.hw_bridge.emulators.drive.modbus` — the Modbus face: the register map, the
  CiA 402 states, commands and statusword, :class:`DriveModbus` and its server thread;
* :mod:`~twinloop.hw_bridge.emulators.drive.emulator` — the firmware in this process
  (:class:`DriveEmulator`) and the joints it drives;
* :mod:`~twinloop.hw_bridge.emulators.drive.process` — the firmware in a core process of its own
  (:class:`DriveProcess`) and :func:`run_drive`, the command-line entry.

Each imports only the ones above it in this list.
"""

from twinloop.hw_bridge.emulators.drive.emulator import (
    DriveEmulator,
    JointBackend,
    LoopTiming,
    PendulumJoint,
    PlantJointAdapter,
    TaskFollowingJoint,
    knee_backend,
    knee_task_row,
)
from twinloop.hw_bridge.emulators.drive.modbus import (
    CST_MODE,
    Command,
    DriveModbus,
    DriveServerThread,
    DriveState,
    DriveStatus,
    Statusword,
    check_holding_write,
)
from twinloop.hw_bridge.emulators.drive.process import DriveProcess, knee_factory, run_drive

__all__ = [
    "CST_MODE",
    "Command",
    "DriveEmulator",
    "DriveModbus",
    "DriveProcess",
    "DriveServerThread",
    "DriveState",
    "DriveStatus",
    "JointBackend",
    "LoopTiming",
    "PendulumJoint",
    "PlantJointAdapter",
    "Statusword",
    "TaskFollowingJoint",
    "check_holding_write",
    "knee_backend",
    "knee_factory",
    "knee_task_row",
    "run_drive",
]
