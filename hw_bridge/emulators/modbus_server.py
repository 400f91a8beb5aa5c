"""Generic pieces of the emulated devices' Modbus servers (pump, drive).

:class:`ServerThread` runs an emulator's pymodbus servers in a background thread with their own
asyncio loop; :func:`server_address` is where a listening TCP/TLS server is bound;
:class:`EmulatorError` is what an emulated device raises when it cannot start or serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, Self

from pymodbus.server import ModbusBaseServer, ModbusTcpServer

from twinloop.hw_bridge.errors import BridgeError

__all__ = ["EmulatorError", "ServerThread", "server_address"]


class EmulatorError(BridgeError, RuntimeError):
    """An emulated device could not start or serve (port busy, bad address, ...)."""


def server_address(server: ModbusBaseServer) -> tuple[str, int]:
    """The ``(host, port)`` a listening TCP/TLS server is bound to."""
    transport = server.transport
    sockets = getattr(transport, "sockets", None)
    if not sockets:
        raise EmulatorError(f"{server} is not a listening TCP server")
    host, port = sockets[0].getsockname()[:2]
    return str(host), int(port)


class _ServesModbus(Protocol):
    async def close_server(self, server: ModbusBaseServer) -> None: ...


class ServerThread:
    """An emulator's Modbus servers in a background thread with their own asyncio loop.

    Attributes:
        tcp_address: ``(host, port)`` of the TCP/TLS server, or ``None``.
        rtu_port: the RTU server's serial port, or ``None``.

    """

    def __init__(
        self,
        emulator: _ServesModbus,
        openers: list[Callable[[], Any]],
        *,
        name: str,
        what: str,
    ) -> None:
        self.emulator = emulator
        self._openers = openers
        self._what = what
        self._loop = asyncio.new_event_loop()
        self._servers: list[ModbusBaseServer] = []
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.tcp_address: tuple[str, int] | None = None
        self.rtu_port: str | None = None

    @property
    def alive(self) -> bool:
        """Whether the server thread runs."""
        return self._thread.is_alive()

    def start(self, *, timeout_s: float = 5.0) -> None:
        """Start the thread and wait until every server listens (or failed)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise EmulatorError(f"{self._what} did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join(timeout_s)
            error = self._error
            raise error if isinstance(error, EmulatorError) else EmulatorError(str(error))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            for opener in self._openers:
                server = await opener()
                self._servers.append(server)
                if isinstance(server, ModbusTcpServer):
                    self.tcp_address = server_address(server)
                else:
                    self.rtu_port = str((server.comm_params.source_address or ("", 0))[0])
        except BaseException as exc:  # report to the starting thread, then clean up
            self._error = exc
        finally:
            self._ready.set()
        try:
            if self._error is None:
                await self._stop.wait()
        finally:
            for server in self._servers:
                await self.emulator.close_server(server)

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the servers and the thread (idempotent)."""
        if self._thread.is_alive() and self._stop is not None:
            stop = self._stop
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(stop.set)
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
