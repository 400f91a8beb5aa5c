"""Pairs of connected pseudo-terminals from socat: a serial cable on one machine.

``PtyPair`` starts ``socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B``; bytes written to one
end come out of the other. A pty does not enforce baud rate or parity: emulate wire time and
parity faults in the device (see :mod:`twinloop.hw_bridge.wire`). Closing the pair (or killing
socat) is how a test pulls the cable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from twinloop.hw_bridge.errors import BridgeError


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
            if os.path.lexists(link) and not os.path.exists(link):
                os.unlink(link)  # a dangling link left by a killed socat
        self._proc = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BridgeError(f"socat did not create the pty pair {self.a} <-> {self.b}")
            time.sleep(0.01)

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
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
