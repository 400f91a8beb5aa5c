"""Where agents run: in the loop's own process, or each as a Ray actor.

Agents are plain objects; the runtime reaches them only through a :class:`Handle`, whose
``call(method, *args)`` is a direct method call for :class:`InlinePlacement` and a remote call
to an actor for :class:`RayPlacement`. ``ray.remote`` is applied here, at assembly time, to a
generic host that owns a (pickled) copy of the agent: the agent classes know nothing of Ray.
Because the copy starts from the same state (random generators included) and receives the same
calls in the same order, both placements give identical trajectories in simulated time.

The embedded Ray is started by :func:`start_ray` with usage statistics off, the dashboard off
and the node on 127.0.0.1; ``address`` connects to an existing cluster instead, after checking
that it answers (an unreachable address fails within seconds, not after Ray's long retries).
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Any, Protocol

from agents.errors import AgentError, LoopConfigError

#: Seconds a remote agent call may take before it counts as failed.
CALL_TIMEOUT_S = 30.0


class PlacementError(AgentError, RuntimeError):
    """Ray could not be started or reached."""


class Pending(Protocol):
    """A submitted call; :meth:`result` waits for it (and raises what the agent raised)."""

    def result(self, timeout_s: float | None = None) -> Any:
        """The call's return value (waiting at most ``timeout_s`` for a remote agent)."""
        ...


class _Done:
    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    def result(self, timeout_s: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _RayPending:
    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def result(self, timeout_s: float | None = None) -> Any:
        import ray

        return ray.get(self.ref, timeout=CALL_TIMEOUT_S if timeout_s is None else timeout_s)


class Handle(Protocol):
    """How the runtime calls an agent."""

    def call(self, method: str, *args: Any) -> Any:
        """Call ``agent.method(*args)`` and return its result."""
        ...

    def submit(self, method: str, *args: Any) -> Pending:
        """Start ``agent.method(*args)``; independent calls to other agents may overlap."""
        ...

    def close(self) -> None:
        """Release the agent's resources (an actor)."""
        ...


class _InlineHandle:
    def __init__(self, agent: object) -> None:
        self.agent = agent

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.agent, method)(*args)

    def submit(self, method: str, *args: Any) -> Pending:
        try:
            return _Done(getattr(self.agent, method)(*args))
        except Exception as exc:
            return _Done(error=exc)

    def close(self) -> None:
        return None


class Placement(Protocol):
    """Creates the handles of a loop's agents."""

    name: str

    def host(self, agent: object, *, label: str) -> Handle:
        """A handle through which the runtime calls ``agent``."""
        ...


class InlinePlacement:
    """Every agent runs in the loop's thread."""

    name = "inline"

    def host(self, agent: object, *, label: str) -> Handle:
        """A handle that calls ``agent`` directly."""
        return _InlineHandle(agent)


class RayPatientsPlacement(InlinePlacement):
    """Each patient's loop runs whole (agents inline) in a Ray worker; patients in parallel.

    The efficient way to spread a cohort over a machine's cores or a cluster: one Ray task per
    patient instead of one actor call per agent and tick. Trajectories equal the inline ones.
    """

    name = "ray-patients"


class _AgentHost:
    """Owns one agent inside a Ray actor (made remote at assembly time)."""

    def __init__(self, agent: object) -> None:
        # Ray hands numpy arrays over zero-copy and read-only: own a writable copy.
        self.agent = copy.deepcopy(agent)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.agent, method)(*args)


class _RayHandle:
    def __init__(self, actor: Any, label: str) -> None:
        self.actor = actor
        self.label = label

    def call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(self.actor.call.remote(method, *args), timeout=CALL_TIMEOUT_S)

    def submit(self, method: str, *args: Any) -> Pending:
        return _RayPending(self.actor.call.remote(method, *args))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LoopConfigError("address", address, "HOST:PORT of a Ray cluster's head node")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise PlacementError(
            f"Ray cluster at {address} is not reachable ({exc.strerror or exc}); start one with "
            "`ray start --head --node-ip-address 127.0.0.1` or omit --address"
        ) from None


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start the embedded Ray (loopback only, no usage stats) or connect to ``address``."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )


class RayPlacement:
    """Every agent runs as its own Ray actor (restarted by Ray up to ``max_restarts``)."""

    name = "ray"

    def __init__(self, *, max_restarts: int = 3) -> None:
        import ray

        if not ray.is_initialized():
            raise PlacementError("RayPlacement: call start_ray() first")
        self._remote = ray.remote(_AgentHost).options(max_restarts=max_restarts, num_cpus=0)

    def host(self, agent: object, *, label: str) -> Handle:
        """An actor that owns a copy of ``agent``."""
        return _RayHandle(self._remote.remote(agent), label)
