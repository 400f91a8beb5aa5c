"""Pairs of connected pseudo-terminals from socat: a serial cable on one machine.

``PtyPair`` starts ``socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B``; bytes written to one
end come out of the other. A pty does not enforce baud rate or parity: emulate wire time and
parity faults in the device (see :mod:`twinloop.hw_bridge.wire`). Closing the pair (or killing
socat) is how a test pulls the cable.

**Owned children.** socat is started with ``PR_SET_PDEATHSIG`` (Linux): when the process that
made the pair dies, even by ``SIGKILL``, the kernel sends socat ``SIGTERM`` and it exits,
removing its links. A restarted emulator then finds its paths free, and a client still holding
the dead pair's end sees the port hang up (and reopens the new one) instead of silence. The
kernel ties the signal to the *thread* that forked, so every socat is started from one daemon
thread of this module that lives as long as the process. :meth:`PtyPair.close` terminates and
reaps socat; :attr:`PtyPair.pid` names it.

**Links are never taken over.** An explicit link path that exists (a file, a directory, or the
link of another live pair) is refused: socat would replace it. Only a dangling symbolic link
(left by a socat killed outright) is removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from twinloop.hw_bridge.errors import BridgeError

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up before any fork: the child only calls it


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the line above
            os._exit(1)

    return preexec


_requests: queue.SimpleQueue[tuple[list[str], Any] | None] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()
_owned = 0  # socat processes started and not yet released: the spawner lives while > 0


def _forget_spawner_in_child() -> None:
    """A forked child has no spawner thread (and owns none of the parent's socats)."""
    global _requests, _spawner, _spawner_lock, _owned
    _requests = queue.SimpleQueue()
    _spawner, _spawner_lock, _owned = None, threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spawner_in_child)


def _serve_spawns() -> None:
    global _spawner
    while True:
        request = _requests.get()
        if request is None:
            with _spawner_lock:
                if _owned == 0:  # nothing left to outlive: end (a later spawn starts anew)
                    _spawner = None
                    return
            continue
        argv, reply = request
        try:
            reply.put(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            )
        except BaseException as exc:  # handed to the caller
            reply.put(exc)


def spawn_owned(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a child that the kernel terminates when this process dies.

    Every child must be handed back with :func:`release_owned` once reaped.
    """
    global _spawner, _owned
    with _spawner_lock:
        _owned += 1
        if _spawner is None:
            _spawner = threading.Thread(target=_serve_spawns, name="pty-spawner", daemon=True)
            _spawner.start()
    reply: queue.SimpleQueue[subprocess.Popen[bytes] | BaseException] = queue.SimpleQueue()
    _requests.put((argv, reply))
    got = reply.get()
    if isinstance(got, BaseException):
        release_owned()
        raise got
    return got


def release_owned() -> None:
    """A child of :func:`spawn_owned` was reaped; the last one lets the spawner thread end."""
    global _owned
    with _spawner_lock:
        _owned -= 1
        if _owned == 0:
            _requests.put(None)


class PtyPair:
    """Two linked pty paths, ``a`` and ``b``, alive until :meth:`close`.

    Args:
        directory: where the two links are made (default: a new temporary directory).
        links: explicit paths for the ``a`` and ``b`` links (None: in ``directory``).
        timeout_s: how long to wait for socat to create the links.

    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        links: tuple[str | None, str | None] = (None, None),
        timeout_s: float = 5.0,
    ) -> None:
        socat = shutil.which("socat")
        if socat is None:
            raise BridgeError("socat is not installed (scripts/install-system.sh installs it)")
        self._tmp = None if directory is not None else tempfile.mkdtemp(prefix="twinloop-pty-")
        folder = Path(directory if directory is not None else self._tmp)  # type: ignore[arg-type]
        self.a = links[0] or str(folder / "pty-a")
        self.b = links[1] or str(folder / "pty-b")
        for link in (self.a, self.b):
            if os.path.islink(link) and not os.path.exists(link):
                os.unlink(link)  # a dangling link left by a killed socat
            elif os.path.lexists(link):
                self._cleanup_tmp()
                raise BridgeError(
                    f"{link}: already exists; a pty link is only made at a free path (remove "
                    "it, or stop the process whose pty it links to)"
                )
        self._released = False
        self._proc = spawn_owned(
            [socat, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"]
        )
        deadline = time.monotonic() + timeout_s
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BridgeError(f"socat did not create the pty pair {self.a} <-> {self.b}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        """The process id of socat."""
        return self._proc.pid

    def _cleanup_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def alive(self) -> bool:
        """Whether socat still links the two ends."""
        return self._proc.poll() is None

    def close(self) -> None:
        """Pull the cable: stop socat (the links disappear)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if not self._released:
            self._proc.wait()  # reaped: no zombie, whoever ended it
            self._released = True
            release_owned()
        self._cleanup_tmp()

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
