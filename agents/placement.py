"""Where agents run: in the loop's own process, or as Ray actors.

Agents are plain objects; the runtime reaches them only through their placement. A loop's tick
is a sequence of *rounds*: each round is a list of :class:`Request` (agent, method, arguments),
and :meth:`Placement.execute` returns one :class:`Outcome` per request — the value, or the
exception the agent raised, and the seconds the agent itself took. :func:`drive` runs several
loops' ticks in lockstep, merging their rounds, so that with :class:`RayPlacement` a round costs
one actor call per *kind* of agent, whatever the number of patients.

:class:`RayPlacement` applies ``ray.remote`` at assembly time to a generic host: one actor per
kind of agent (sensor, twin, controller, supervisor, actuator), owning a pickled copy of each
patient's agent. Because the copy starts from the same state (random generators included) and
receives the same calls in the same order, both placements give identical trajectories in
simulated time. An actor that dies is restarted by Ray (``max_restarts``); the placement then
hands it its agents again, in their initial state, and the calls of that round fail (the loop
holds its safe fallbacks).

What a round costs on Ray: an ordinary actor call goes through Ray's task path (submission, the
actor's task queue, the reply through its owner), about 0.6 ms per call on this project's
2-core machine and several ms at the 99th percentile when the machine is loaded: ~3.5 ms for a
tick's four sequential rounds. So once an actor hosts its agents, the placement opens a *direct
channel* to it (:meth:`_AgentsHost.open_channel`): a socket the actor listens on, at its node's
address, with a random key (``multiprocessing.connection``'s HMAC handshake), served by a thread
of the actor that runs the same :meth:`_AgentsHost.call` as the Ray method. A round then costs
one message each way per actor, ~0.03 ms. Ray still creates, places and restarts the actor and
carries the agents to it (``add``, ``drop``); a channel that breaks (its actor died) is opened
again once the actor is back, and an actor that cannot be reached that way (a node whose port
the driver cannot connect to) is called the ordinary way (``RayPlacement(direct=False)`` always
does). Replies carry their request's number, so an answer that arrives after its round timed
out is discarded, never taken for the next round's.

The embedded Ray is started by :func:`start_ray` with usage statistics off, the dashboard off
and the node on 127.0.0.1; ``address`` connects to an existing cluster instead, after checking
that it answers (an unreachable address fails within seconds, not after Ray's long retries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pickle
import secrets
import socket
import threading
import time
from collections.abc import Generator, Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Protocol

from twinloop.agents.errors import AgentError, LoopConfigError
from twinloop.extras import require

#: Seconds a remote call may take before it counts as failed (per request of the round).
CALL_TIMEOUT_S = 30.0
#: Longest wait for newly hosted agents to reach their actors (actors starting included).
HOSTING_TIMEOUT_S = 120.0
#: Openings of an actor's direct channel tried before its calls go the ordinary way for good.
CHANNEL_ATTEMPTS = 4
_PROTOCOL = pickle.HIGHEST_PROTOCOL


class PlacementError(AgentError, RuntimeError):
    """Ray could not be started or reached."""


class AgentRestarted(AgentError, RuntimeError):
    """The agent's actor died and was restarted; the agent starts again from its initial state."""


@dataclasses.dataclass(frozen=True, eq=False)
class AgentRef:
    """One hosted agent: its kind (``label``), its key in the host, and where it lives."""

    label: str
    key: int
    agent: object | None = None  # in process
    actor: Any = None  # the Ray actor hosting every agent of this label


@dataclasses.dataclass(frozen=True)
class Request:
    """Call ``method(*args)`` on ``ref``'s agent; ``timeout_s`` bounds the wait (remote)."""

    ref: AgentRef
    method: str
    args: tuple[Any, ...] = ()
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a request gave: ``value``, or the ``error`` raised; ``took_s`` of the agent's time."""

    value: Any = None
    error: BaseException | None = None
    took_s: float = 0.0

    def unwrap(self) -> Any:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


#: A loop's tick: yields the requests of each round, receives their outcomes.
Steps = Generator[list[Request], list[Outcome], None]


def _timeout_s(request: Request) -> float:
    return CALL_TIMEOUT_S if request.timeout_s is None else request.timeout_s


def _run_one(agent: object, method: str, args: tuple[Any, ...]) -> Outcome:
    started = time.perf_counter()
    try:
        value = getattr(agent, method)(*args)
    except Exception as exc:  # handed to the loop, which records it and falls back
        return Outcome(error=exc, took_s=time.perf_counter() - started)
    return Outcome(value, took_s=time.perf_counter() - started)


class Placement(Protocol):
    """Hosts a loop's agents and executes the rounds of requests to them."""

    name: str

    def host(self, agent: object, *, label: str) -> AgentRef:
        """Host ``agent`` (its kind is ``label``); the reference goes into requests."""
        ...

    def execute(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run one round: independent requests, one outcome each, in order."""
        ...

    def release(self, refs: Sequence[AgentRef]) -> None:
        """Stop hosting these agents."""
        ...


#: Lanes of :func:`drive` on a placement whose rounds run elsewhere (``submit``/``collect``).
LANES = 2

_Pending = list[tuple[Steps, list[Request]]]


def _started(ticks: Sequence[Steps]) -> _Pending:
    pending: _Pending = []
    for steps in ticks:
        with contextlib.suppress(StopIteration):
            pending.append((steps, next(steps)))
    return pending


def _merged(pending: _Pending) -> list[Request]:
    return [r for _, requests in pending for r in requests]


def _answered(pending: _Pending, outcomes: list[Outcome]) -> _Pending:
    """Hand each loop its outcomes; the loops' next rounds."""
    following: _Pending = []
    i = 0
    for steps, requests in pending:
        mine, i = outcomes[i : i + len(requests)], i + len(requests)
        with contextlib.suppress(StopIteration):
            following.append((steps, steps.send(mine)))
    return following


def drive(placement: Placement, ticks: Sequence[Steps]) -> None:
    """Run several loops' ticks to their end, their rounds merged into one execution each.

    On a placement whose agents run elsewhere (it has ``submit`` and ``collect``, as
    :class:`RayPlacement`), the loops go in :data:`LANES` lanes: while the agents answer one
    lane's round, this thread hands the other lane its outcomes and builds its next round, so
    the loops' own work (channels, plant, recording) overlaps the agents'. Each loop's calls keep
    their order, so its trajectory does not change.
    """
    elsewhere: Any = placement if hasattr(placement, "submit") else None
    n_lanes = min(LANES, len(ticks)) if elsewhere is not None else 1
    if n_lanes < 2:
        pending = _started(ticks)
        while pending:
            pending = _answered(pending, placement.execute(_merged(pending)))
        return
    size = -(-len(ticks) // n_lanes)
    lanes = []
    for first in range(0, len(ticks), size):
        pending = _started(ticks[first : first + size])
        if pending:
            lanes.append((pending, elsewhere.submit(_merged(pending))))
    while lanes:
        pending, handle = lanes.pop(0)
        pending = _answered(pending, elsewhere.collect(handle))
        if pending:
            lanes.append((pending, elsewhere.submit(_merged(pending))))


class InlinePlacement:
    """Every agent runs in the loop's thread."""

    name = "inline"

    def __init__(self) -> None:
        self._keys = itertools.count()

    def host(self, agent: object, *, label: str) -> AgentRef:
        """A reference to ``agent`` itself."""
        return AgentRef(label, next(self._keys), agent=agent)

    def execute(self, requests: Sequence[Request]) -> list[Outcome]:
        """Call each agent in turn."""
        return [_run_one(r.ref.agent, r.method, r.args) for r in requests]

    def release(self, refs: Sequence[AgentRef]) -> None:
        """Nothing to release."""
        return None


class RayPatientsPlacement(InlinePlacement):
    """Each patient's loop runs whole (agents inline) in a Ray worker; patients in parallel.

    One Ray task per patient instead of actor calls per round: the fastest way to spread a
    cohort over a machine's cores or a cluster. Trajectories equal the inline ones.
    """

    name = "ray-patients"


class _Missing(AgentError, KeyError):
    """The host does not hold this agent (its actor was restarted)."""


#: Bytes of a direct channel's request number (it prefixes each request and its reply).
_SEQ = 8
#: Connections an actor's channel accepts until one passes the key's handshake.
_ACCEPTS = 16
#: Seconds to wait for a TCP connection to an actor's channel before calling it the Ray way.
CONNECT_TIMEOUT_S = 5.0


def _no_delay(conn: Connection) -> Connection:
    """Send each message at once (no Nagle delay on the channel's socket).

    A message over 16 KiB goes out in two writes (its length, then its bytes), and Nagle's
    algorithm would hold the second until the first is acknowledged (up to the peer's
    delayed-ACK time, 40 ms on Linux).
    """
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class _AgentsHost:
    """Owns the agents of one kind inside a Ray actor (made remote at assembly time).

    Arguments and results travel as one pickled bytes object per call: Ray serializes each
    top-level argument on its own, and six small arguments cost ~0.5 ms more than one.
    """

    def __init__(self) -> None:
        self.agents: dict[int, object] = {}

    def add(self, key: int, packed_agent: bytes) -> None:
        self.agents[key] = pickle.loads(packed_agent)

    def drop(self, keys: list[int]) -> None:
        for key in keys:
            self.agents.pop(key, None)

    def open_channel(self, authkey: bytes) -> tuple[str, int]:
        """Listen for the placement's direct channel; a thread serves :meth:`call` on it."""
        import ray

        listener = Listener((ray.util.get_node_ip_address(), 0), authkey=authkey)
        name = "twinloop-agents-channel"
        threading.Thread(target=self._serve, args=(listener,), name=name, daemon=True).start()
        address: tuple[str, int] = listener.address
        return address

    def _serve(self, listener: Listener) -> None:
        """Answer each request (its number, then the packed round) until the placement leaves.

        The first connection that passes the key's handshake is the placement's (a connection
        that fails it — the placement's reachability probe, a stranger — is dropped).
        """
        with listener:
            for _ in range(_ACCEPTS):
                try:
                    conn = _no_delay(listener.accept())
                    break
                except (EOFError, OSError, AuthenticationError):
                    continue
            else:
                return
        with conn:
            while True:
                try:
                    message = conn.recv_bytes()
                    conn.send_bytes(message[:_SEQ] + self.call(message[_SEQ:]))
                except (EOFError, OSError):  # the placement closed it (or died)
                    return

    def call(self, packed: bytes) -> bytes:
        out = []
        for key, method, args in pickle.loads(packed):
            agent = self.agents.get(key)
            if agent is None:
                out.append(Outcome(error=_Missing(key)))
            else:
                out.append(_run_one(agent, method, args))
        try:
            return pickle.dumps(out, protocol=_PROTOCOL)
        except Exception:  # an exception that does not pickle: keep its text
            safe = [
                o
                if o.error is None
                else Outcome(error=RuntimeError(repr(o.error)), took_s=o.took_s)
                for o in out
            ]
            return pickle.dumps(safe, protocol=_PROTOCOL)


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


def ray_status_line(command: str, address: str | None) -> str:
    """What ``command`` says while Ray starts (or connects), before its progress bar.

    It names the file Ray's own messages go to (:mod:`twinloop.agents.ray_log`), unless
    ``--verbose`` leaves them on the console.
    """
    from twinloop.agents import ray_log

    where = "" if ray_log.verbose() else f"; Ray's messages: {ray_log.shown_path()}"
    if address:
        return f"{command}: connecting to the Ray cluster at {address}{where}…"
    return f"{command}: starting Ray (embedded, 127.0.0.1{where})…"


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start the embedded Ray (loopback only, no usage stats) or connect to ``address``.

    Ray's own messages go to a log file unless ``--verbose`` (:mod:`twinloop.agents.ray_log`).

    Raises:
        twinloop.extras.MissingExtraError: Ray is not installed (``twinloop[ray]``).

    """
    ray = require("ray", extra="ray", what="running agents on Ray")
    from twinloop.agents import ray_log

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        _check_reachable(address)
    to_driver = ray_log.verbose()  # workers' output on the console only with --verbose
    with ray_log.quiet():
        if address is not None:
            ray.init(address=address, log_to_driver=to_driver, configure_logging=False)
        else:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=to_driver,
                configure_logging=False,
            )
    ray_log.note_session()


def stop_ray() -> None:
    """Stop this process's Ray session (its messages while it stops go where they went)."""
    import ray

    from twinloop.agents import ray_log

    with ray_log.quiet():
        ray.shutdown()


@dataclasses.dataclass(frozen=True)
class _Round:
    """A round in flight: its requests, their indices per actor, what each actor was sent."""

    requests: Sequence[Request]
    groups: dict[str, list[int]]
    refs: dict[str, Any]


class RayPlacement:
    """One Ray actor per kind of agent, hosting that agent for every patient of the run.

    A round costs one actor call per kind of agent it involves, whatever the number of patients
    driven together (:func:`drive`). Actors are restarted by Ray up to ``max_restarts`` times;
    a restarted actor gets its agents again, in their initial state.
    """

    name = "ray"

    def __init__(self, *, max_restarts: int = 3, direct: bool = True) -> None:
        import ray

        if not ray.is_initialized():
            raise PlacementError("RayPlacement: call start_ray() first")
        self._remote = ray.remote(_AgentsHost).options(max_restarts=max_restarts, num_cpus=0)
        self._actors: dict[str, Any] = {}
        self._initial: dict[int, bytes] = {}
        self._keys = itertools.count()
        self._hosting: list[Any] = []  # add() calls not yet known to have finished
        self._direct = direct
        self._channels: dict[str, Connection] = {}  # each actor's direct channel, once open
        self._openings: dict[str, int] = {}  # channel openings tried per actor
        self._authkey = secrets.token_bytes(32)
        self._seq = itertools.count(1)
        self._awaited: dict[str, set[int]] = {}  # requests in flight per direct channel
        self._early: dict[str, dict[int, bytes]] = {}  # replies read before their collect

    def host(self, agent: object, *, label: str) -> AgentRef:
        """Hand a copy of ``agent`` to the actor of its kind (started on first use)."""
        actor = self._actors.get(label)
        if actor is None:
            actor = self._actors[label] = self._remote.remote()
        key = next(self._keys)
        self._initial[key] = pickle.dumps(agent, protocol=_PROTOCOL)
        added = actor.add.remote(key, self._initial[key])  # type: ignore[union-attr]
        self._hosting.append(added)  # ordered before any call to the agent
        return AgentRef(label, key, actor=actor)

    def _wait_hosted(self) -> None:
        """Wait for the agents handed over since the last round to reach their actors.

        Actors starting and agents unpickling (a learned policy imports torch) take seconds;
        this wait never counts against a request's timeout. An agent that failed to arrive
        shows up as a failed call.
        """
        import ray

        pending, self._hosting = self._hosting, []
        with contextlib.suppress(Exception):
            ray.get(pending, timeout=HOSTING_TIMEOUT_S)

    def execute(self, requests: Sequence[Request]) -> list[Outcome]:
        """One call per actor involved (its direct channel, else Ray), all in flight; collect."""
        return self.collect(self.submit(requests))

    def submit(self, requests: Sequence[Request]) -> _Round:
        """Send a round: one call per actor involved; :meth:`collect` its outcomes."""
        if self._hosting:
            self._wait_hosted()
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.ref.label, []).append(i)
        refs = {}
        for label, idx in groups.items():
            items = [(requests[i].ref.key, requests[i].method, requests[i].args) for i in idx]
            refs[label] = self._submit(label, pickle.dumps(items, _PROTOCOL))
        return _Round(requests, groups, refs)

    def collect(self, sent: _Round) -> list[Outcome]:
        """The outcomes of a round sent by :meth:`submit`, in its requests' order."""
        requests, groups, refs = sent.requests, sent.groups, sent.refs
        outcomes: list[Outcome] = [Outcome()] * len(requests)
        for label, idx in groups.items():
            timeout = sum(_timeout_s(requests[i]) for i in idx)
            try:
                results = pickle.loads(self._collect(label, refs[label], timeout))
            except Exception as exc:  # the actor died or did not answer in time
                results = [Outcome(error=exc)] * len(idx)
            for i, outcome in zip(idx, results, strict=True):
                if isinstance(outcome.error, _Missing):  # restarted: hand the agent again
                    key = requests[i].ref.key
                    added = self._actors[label].add.remote(key, self._initial[key])
                    self._hosting.append(added)  # there before the channel's next call
                    outcome = Outcome(error=AgentRestarted(f"{label} actor restarted"))
                outcomes[i] = outcome
        return outcomes

    def _submit(self, label: str, packed: bytes) -> Any:
        """Send an actor its part of the round: the request's number, or a Ray ObjectRef."""
        conn = self._channel(label)
        if conn is None:
            return self._actors[label].call.remote(packed)
        seq = next(self._seq)
        try:
            conn.send_bytes(seq.to_bytes(_SEQ, "big") + packed)
        except OSError as exc:  # the actor died: this round fails, the next opens it again
            self._close_channel(label)
            return exc
        self._awaited.setdefault(label, set()).add(seq)
        return seq

    def _collect(self, label: str, ref: Any, timeout_s: float) -> bytes:
        """The packed outcomes of a request sent by :meth:`_submit` (raises what failed)."""
        import ray

        if isinstance(ref, BaseException):
            raise ref
        if not isinstance(ref, int):
            packed: bytes = ray.get(ref, timeout=timeout_s)
            return packed
        awaited, early = self._awaited.get(label, set()), self._early.setdefault(label, {})
        if ref in early:
            awaited.discard(ref)
            return early.pop(ref)
        conn = self._channels.get(label)
        if conn is None or ref not in awaited:  # its channel closed since it was sent
            raise AgentError(f"{label} actor's channel closed")
        deadline = time.monotonic() + timeout_s
        try:
            while conn.poll(max(0.0, deadline - time.monotonic())):
                message = conn.recv_bytes()
                seq = int.from_bytes(message[:_SEQ], "big")
                if seq == ref:
                    awaited.discard(ref)
                    return message[_SEQ:]
                if seq in awaited:  # another lane's round, sent before this one
                    early[seq] = message[_SEQ:]
                # else the late answer of a round that timed out: nobody's now
        except (EOFError, OSError) as exc:  # the actor died
            self._close_channel(label)
            raise AgentError(f"{label} actor's channel closed ({type(exc).__name__})") from None
        awaited.discard(ref)
        raise TimeoutError(f"{label} actor did not answer within {timeout_s:g} s")

    def _channel(self, label: str) -> Connection | None:
        """The actor's direct channel, opened on first use (None: call it the ordinary way)."""
        conn = self._channels.get(label)
        if conn is not None or not self._direct:
            return conn
        tries = self._openings.get(label, 0)
        if tries >= CHANNEL_ATTEMPTS:
            return None
        self._openings[label] = tries + 1
        import ray

        try:
            opened = self._actors[label].open_channel.remote(self._authkey)
            address = tuple(ray.get(opened, timeout=HOSTING_TIMEOUT_S))
            # a node that cannot be reached fails here within seconds (Client has no timeout)
            socket.create_connection(address, timeout=CONNECT_TIMEOUT_S).close()
            conn = Client(address, authkey=self._authkey)
            self._channels[label] = _no_delay(conn)
        except Exception:  # not reachable that way (or restarting): ordinary calls this round
            return None
        return conn

    def _close_channel(self, label: str) -> None:
        self._awaited.pop(label, None)
        self._early.pop(label, None)
        conn = self._channels.pop(label, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def release(self, refs: Sequence[AgentRef]) -> None:
        """Drop these agents from their actors."""
        by_label: dict[str, list[int]] = {}
        for ref in refs:
            by_label.setdefault(ref.label, []).append(ref.key)
            self._initial.pop(ref.key, None)
        for label, keys in by_label.items():
            self._actors[label].drop.remote(keys)

    def actor(self, label: str) -> Any:
        """The actor hosting the agents of kind ``label``."""
        return self._actors[label]

    def close(self) -> None:
        """Close the direct channels and kill the actors."""
        import ray

        for label in list(self._channels):
            self._close_channel(label)
        for actor in self._actors.values():
            ray.kill(actor)
        self._actors.clear()


#: Every placement by name (a therapy's agents part says which of them its loop supports).
PLACEMENTS = ("inline", "ray", "ray-patients")


def make_placement(name: str, address: str | None = None) -> Placement:
    """The placement called ``name``; the Ray ones start the embedded Ray or join ``address``.

    Release it with :func:`release_placement` (which stops a Ray this call started).
    """
    if name not in PLACEMENTS:
        raise LoopConfigError("placement", name, f"one of {', '.join(PLACEMENTS)}")
    if name == "inline":
        if address is not None:
            raise LoopConfigError("address", address, "only with a Ray placement")
        return InlinePlacement()
    start_ray(address)
    return RayPatientsPlacement() if name == "ray-patients" else RayPlacement()


def release_placement(placement: Placement) -> None:
    """Stop the Ray that :func:`make_placement` started for ``placement`` (if any)."""
    if isinstance(placement, RayPlacement):
        placement.close()
    if placement.name.startswith("ray"):
        stop_ray()
