"""Safety campaigns: every patient × scenario × seed of a spec, judged against its requirements.

``twinloop campaign SPEC.yaml`` (:func:`run_campaign`):

* **Runs.** One run = one patient's full closed loop (sensor, twin estimator, controller,
  supervisor, actuator; every channel recorded in memory), built, run and judged by the
  therapy's campaigns part (:class:`twinloop.campaigns.interface.CampaignPart`; for the spec's
  days with glucose, its cycles with the exoskeleton), with the scenario's faults attached to
  its channels
  (:func:`twinloop.campaigns.faults.attach`). Its id is ``SCENARIO.PATIENT.sSEED`` (``#`` written
  ``-``). The loop's generator is the one ``twinloop run`` gives that patient and seed, and the
  faults' generator is ``SeedSequence([seed, crc32(scenario), crc32(patient)])``: a run depends on
  nothing else, so it can be run again alone (:func:`rerun`) or on any worker.
* **Execution.** Inline, or as Ray tasks (one CPU each) on the embedded Ray
  (:func:`twinloop.agents.placement.start_ray`, loopback) or on a cluster (``address``), with a
  progress bar and ETA. At most ``2 × workers`` runs are in flight. A run may take
  ``run_timeout_s`` of wall-clock time (the spec's; :class:`_InlineWorker` runs inline runs in
  a child process under a watchdog, :func:`_on_ray` cancels a Ray task and kills its worker):
  past it, or when its process dies, it is an errored run and the campaign goes on. Each task
  receives the :class:`~twinloop.therapy.Therapy` (a frozen dataclass) and registers it in its
  worker when the worker's registry lacks it (a therapy registered only in the driver, as a test's).
* **Persistence and resume.** Each finished run's result is written at once to
  ``OUT/results/ID.json`` (a temporary file, fsync, then ``os.replace``: a file is there whole
  or not at all) with its trace (``OUT/traces/ID.parquet``, written the same way, before the
  result). Rerunning the same command skips the ids already there, so a campaign killed at any
  point (even SIGKILL) resumes and ends with the same table. ``OUT/spec.json`` pins the spec:
  resuming with another spec is refused.
* **Errors.** A run that raises (a timeout included) is recorded with ``status: "error"``, its
  one-line ``error`` and its traceback; a run that finishes but cannot be judged
  (:func:`unjudgeable`: a metric NaN or infinite, no simulated time) is recorded the same way
  (``error: "unjudgeable: ..."``, with what it measured). The campaign goes on; each errored run
  fails every requirement unless the spec allows it (``errors_allowed``), and the summary and the
  report list them (:func:`twinloop.campaigns.safety.summarize_campaign`). (An errored run is run
  again on resume.)
* **Verdicts.** :mod:`twinloop.campaigns.safety` labels each run's samples with hazards, times fault
  onset to hazard, scores the supervisor's detections and judges each requirement; the summary
  (``OUT/summary.json``) aggregates per fault type and per requirement, with the ids of the
  runs that break it, and ``OUT/report.html`` shows it (:mod:`twinloop.campaigns.report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from twinloop.campaigns.faults import CATALOGUE, ActiveFault, attach
from twinloop.campaigns.spec import CampaignSpec, Scenario
from twinloop.therapy import Therapy, get_therapy, register_therapy, therapy_names

__all__ = [
    "RunKey",
    "expand_runs",
    "rerun",
    "run_campaign",
    "run_one",
    "same_result",
    "unjudgeable",
]

RESULT_VERSION = 1

#: How often an inline run's process checks that the campaign's process is still there, s.
ORPHAN_CHECK_S = 1.0


@dataclasses.dataclass(frozen=True)
class RunKey:
    """One run of a campaign."""

    scenario: str
    patient: str
    seed: int

    @property
    def id(self) -> str:
        """``SCENARIO.PATIENT.sSEED``, safe in file names and URLs."""
        return _safe(f"{self.scenario}.{self.patient}.s{self.seed}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def expand_runs(spec: CampaignSpec) -> list[RunKey]:
    """Every run of the spec, scenario-major (the order of the results table)."""
    return [
        RunKey(s.name, p, seed)
        for s in spec.scenarios
        for p in spec.patients
        for seed in spec.seeds
    ]


def _fault_rng(key: RunKey) -> np.random.Generator:
    seq = np.random.SeedSequence(
        [key.seed, zlib.crc32(key.scenario.encode()), zlib.crc32(key.patient.encode())]
    )
    return np.random.default_rng(seq)


def _actives(scenario: Scenario, key: RunKey) -> list[ActiveFault]:
    rng = _fault_rng(key)
    children = rng.spawn(max(len(scenario.faults), 1))
    return [
        ActiveFault(
            CATALOGUE[f.fault], f.channel, f.start, f.end, dict(f.params), children[i], f.field
        )
        for i, f in enumerate(scenario.faults)
    ]


# -- one run ---------------------------------------------------------------------------------
def _part(spec: CampaignSpec) -> Any:
    """The campaigns part of the spec's therapy."""
    return get_therapy(spec.therapy).part("campaigns")


def build_loop(spec: CampaignSpec, key: RunKey) -> tuple[Any, list[ActiveFault]]:
    """The run's loop with its scenario's faults attached (not yet run)."""
    loop = _part(spec).build_loop(spec, key)
    actives = _actives(spec.scenario(key.scenario), key)
    attach(loop, actives)
    return loop, actives


def ensure_therapy(therapy: Therapy) -> None:
    """Register ``therapy`` in this process if its registry lacks it (a Ray worker's)."""
    if therapy.name not in therapy_names():
        register_therapy(therapy)


def _record(
    key: RunKey, scenario: Scenario, status: str, began: float, **fields: Any
) -> dict[str, Any]:
    """A run's result record: its key and faults, ``fields``, and the wall time since ``began``."""
    return {
        "version": RESULT_VERSION,
        "id": key.id,
        **dataclasses.asdict(key),
        "faults": [f.fault for f in scenario.faults],
        "status": status,
        **fields,
        "wall_s": time.perf_counter() - began,
    }


def _simulate(
    spec: CampaignSpec, key: RunKey, listener: Any = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, int]]:
    """Run ``key``'s loop and judge it: its verdict, trace and fault hits.

    Every channel is recorded in memory, and sent to ``listener`` too when one is given.
    """
    from twinloop.agents.recording import Columns, column_listener

    part = _part(spec)
    loop, actives = build_loop(spec, key)
    columns: Columns = {}
    loop.listen(column_listener(columns, key.patient))
    if listener is not None:
        loop.listen(listener)
    part.run_loop(loop)
    verdict, trace = part.evaluate(spec, spec.scenario(key.scenario), columns, loop)
    return verdict, trace, {a.fault.name: a.hits for a in actives}


def unjudgeable(verdict: dict[str, Any], trace: dict[str, Any]) -> str | None:
    """Why a finished run cannot be judged, or ``None`` when it can.

    A run cannot be judged when its trace covers no simulated time (fewer than two samples) or
    a metric is NaN or infinite: its requirements' checks (``bg < threshold``, ...) would be
    silently false on such values.
    """
    samples = max((len(v) for v in trace.values()), default=0)
    if samples < 2:
        return f"no simulated time (the trace has {samples} sample(s))"
    bad = sorted(
        k
        for k, v in (verdict.get("metrics") or {}).items()
        if isinstance(v, float | np.floating) and not math.isfinite(v)
    )
    if bad:
        return "metrics not finite: " + ", ".join(bad)
    return None


def run_one(spec: CampaignSpec, key: RunKey) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run ``key`` (full loop, in memory recording) and judge it: its result and trace.

    A run that cannot be judged (:func:`unjudgeable`) is a result with ``status: "error"``.
    Exceptions are not caught here (see :func:`_run_task`).
    """
    began = time.perf_counter()
    scenario = spec.scenario(key.scenario)
    if spec.hil is not None:
        from twinloop.campaigns.hil import run_hil

        verdict, trace = run_hil(spec, key)
        hits = verdict.pop("wire_fault_hits")
    else:
        verdict, trace, hits = _simulate(spec, key)
    why = unjudgeable(verdict, trace)
    if why is not None:
        return _record(
            key, scenario, "error", began, error=f"unjudgeable: {why}", fault_hits=hits, **verdict
        ), trace
    return _record(key, scenario, "ok", began, fault_hits=hits, **verdict), trace


def _run_task(
    spec: CampaignSpec, key: RunKey, therapy: Therapy | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A run that never raises: an error becomes a result with its traceback.

    ``therapy``: the spec's therapy, registered here first if this process lacks it.
    """
    began = time.perf_counter()
    try:
        if therapy is not None:
            ensure_therapy(therapy)
        return run_one(spec, key)
    except Exception as exc:
        scenario = spec.scenario(key.scenario)
        error = (f"{type(exc).__name__}: {exc}".strip().splitlines() or ["error"])[0][:300]
        return _record(
            key, scenario, "error", began, error=error, traceback=traceback.format_exc()
        ), None


# -- persistence -----------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temporary file next to ``path``, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _write_trace(path: Path, trace: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _atomic_write(path, lambda tmp: pq.write_table(pa.table(trace), tmp, compression="zstd"))


def persist(out: Path, result: dict[str, Any], trace: dict[str, Any] | None) -> None:
    """Persist one run: its trace first, then its result (the result marks the run done)."""
    if trace is not None:
        _write_trace(out / "traces" / f"{result['id']}.parquet", trace)
    text = _dumps(result)
    _atomic_write(out / "results" / f"{result['id']}.json", lambda tmp: _write_text(tmp, text))


def _clean(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` and numpy scalars as Python (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_clean(value), indent=1, allow_nan=False)


def finished_ids(out: Path) -> set[str]:
    """Ids whose result is on disk and ok (an error is run again)."""
    done = set()
    for path in (out / "results").glob("*.json"):
        try:
            if json.loads(path.read_text()).get("status") == "ok":
                done.add(path.stem)
        except (OSError, ValueError):
            continue
    return done


def load_results(out: Path, keys: list[RunKey]) -> list[dict[str, Any]]:
    """The results of ``keys`` that are on disk, in ``keys``' order."""
    results = []
    for key in keys:
        path = out / "results" / f"{key.id}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results


def _pin_spec(out: Path, spec: CampaignSpec) -> None:
    """Write ``spec.json`` on the first run; refuse to resume with a different spec."""
    pinned = out / "spec.json"
    data = {"fingerprint": spec.fingerprint(), "spec": spec.as_dict(), "source": spec.source}
    if pinned.exists():
        old = json.loads(pinned.read_text())
        if old.get("fingerprint") != data["fingerprint"]:
            raise ValueError(
                f"{out} holds results of another spec (fingerprint {old.get('fingerprint')}, "
                f"this one {data['fingerprint']}): give another --out, or remove that directory"
            )
        return
    _atomic_write(pinned, lambda tmp: _write_text(tmp, json.dumps(data, indent=1)))


# -- execution ---------------------------------------------------------------------------------
def _lost(spec: CampaignSpec, key: RunKey, began: float, error: str) -> dict[str, Any]:
    """The errored result of a run whose process was killed or died (no traceback of its own)."""
    return _record(key, spec.scenario(key.scenario), "error", began, error=error, traceback="")


def _timed_out(spec: CampaignSpec, key: RunKey, began: float, killed: str) -> dict[str, Any]:
    return _lost(
        spec,
        key,
        began,
        f"timeout: the run took longer than run_timeout_s={spec.run_timeout_s:g} s; {killed}",
    )


def _serve(conn: Connection, parent_end: Connection | None, spec: CampaignSpec) -> None:
    """The inline worker: run each key received on ``conn``, send its result back.

    It ends when the campaign's process is gone, even in the middle of a run (an orphan would
    hold a CPU for nothing): it closes its copy of the campaign's end of the pipe (so a dead
    campaign reads as end of file) and watches its parent process from a thread.
    """
    os.setpgid(0, 0)  # its own process group: a kill takes the run's children (socat) too
    if parent_end is not None:  # a forked child inherited it
        parent_end.close()
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch_parent, name="twinloop-orphan-watch", daemon=True).start()
    while True:
        try:
            key = conn.recv()
        except (EOFError, OSError):  # the campaign is gone
            return
        if key is None:
            return
        conn.send(_run_task(spec, key))


class _InlineWorker:
    """One child process that runs a campaign's runs one after another, under a watchdog.

    A run is abandoned after ``spec.run_timeout_s``: its process group is killed (SIGKILL) and
    a fresh child takes the next run. A child that dies (a crash in native code) is an errored
    run too. The child is *forked*: it inherits the driver's state (therapies registered only
    in the driver, preloaded populations) and starts in milliseconds; a fork that inherited a
    lock held by another thread could only hang, which the same watchdog ends.
    """

    def __init__(self, spec: CampaignSpec) -> None:
        methods = multiprocessing.get_all_start_methods()
        self.context: Any = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.spec = spec
        self.process: Any = None
        self.conn: Connection | None = None

    def _start(self) -> Connection:
        parent, child = self.context.Pipe()
        forked = self.context.get_start_method() == "fork"
        self.process = self.context.Process(
            target=_serve,
            args=(child, parent if forked else None, self.spec),
            name="twinloop-campaign-run",
        )
        self.process.start()
        child.close()
        self.conn = parent
        return parent

    def close(self) -> None:
        """Kill the child (and its process group) and reap it."""
        if self.process is None:
            return
        for kill in (os.killpg, os.kill):  # the group; the child alone if it has none yet
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def run(self, key: RunKey) -> tuple[dict[str, Any], Any]:
        """``key``'s result: the child's, or an errored one when it hangs or dies."""
        began = time.perf_counter()
        alive = self.process is not None and self.process.is_alive()
        if self.process is not None and not alive:
            self.close()  # died between runs: reap it, start afresh
        conn = self.conn if alive else self._start()
        assert conn is not None
        conn.send(key)
        if not conn.poll(self.spec.run_timeout_s):
            self.close()
            return _timed_out(self.spec, key, began, "its process was killed"), None
        try:
            result: tuple[dict[str, Any], Any] = conn.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            self.close()
            why = f"the run's process died (exit code {code})"
            return _lost(self.spec, key, began, why), None
        return result


def _inline(spec: CampaignSpec, keys: list[RunKey]) -> Iterator[tuple[dict[str, Any], Any]]:
    worker = _InlineWorker(spec)
    try:
        for key in keys:
            yield worker.run(key)
    finally:
        worker.close()


def _on_ray(
    spec: CampaignSpec, keys: list[RunKey], workers: int
) -> Iterator[tuple[dict[str, Any], Any]]:
    """Each run a Ray task; a run past ``spec.run_timeout_s`` is cancelled (its worker killed).

    At most ``2 × workers`` runs are in flight; a run's clock starts when it is among the
    oldest ``min(workers, the cluster's CPUs)`` unfinished ones (then it holds a CPU, Ray
    starting tasks of one shape in submission order).
    """
    import ray
    from ray.exceptions import RayError

    spec_ref = ray.put(spec)
    therapy = get_therapy(spec.therapy)
    remote = ray.remote(_run_task).options(num_cpus=1, max_retries=0)
    pending = list(reversed(keys))
    in_flight: dict[Any, RunKey] = {}  # in submission order
    began: dict[Any, float] = {}
    window = max(2 * workers, 2)
    running = max(min(workers, int(ray.cluster_resources().get("CPU", 1))), 1)
    while pending or in_flight:
        while pending and len(in_flight) < window:
            key = pending.pop()
            in_flight[remote.remote(spec_ref, key, therapy)] = key
        now = time.perf_counter()
        for ref in list(in_flight)[:running]:
            began.setdefault(ref, now)
        first = min(began[ref] for ref in began)
        wait_s = max(first + spec.run_timeout_s - now, 0.0)
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
        if ready:
            ref = ready[0]
            key = in_flight.pop(ref)
            start = began.pop(ref, time.perf_counter())
            try:
                done = ray.get(ref)
            except RayError as exc:  # the worker died (out of memory, a crash)
                why = f"the run's Ray worker failed: {type(exc).__name__}"
                done = _lost(spec, key, start, why), None
            yield done
            continue
        now = time.perf_counter()
        for ref, start in list(began.items()):
            if now - start >= spec.run_timeout_s:
                ray.cancel(ref, force=True)
                key = in_flight.pop(ref)
                del began[ref]
                yield _timed_out(spec, key, start, "its Ray worker was killed"), None


def run_campaign(
    spec: CampaignSpec,
    out: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    inline: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the campaign into ``out``; return its summary.

    Args:
        spec: the checked spec.
        out: the campaign directory (results, traces, summary, report).
        address: a Ray cluster to run on (default: the embedded one).
        workers: runs in parallel (default: the cluster's CPUs).
        inline: run in this process, one after another (no Ray).
        progress: show a progress bar with the ETA.
        limit: stop after this many runs (tests of the resume; the summary is then partial).

    """
    from tqdm import tqdm

    from twinloop.campaigns.safety import summarize_campaign

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _pin_spec(out, spec)
    keys = expand_runs(spec)
    done = finished_ids(out)
    todo = [k for k in keys if k.id not in done]
    if limit is not None:
        todo = todo[:limit]
    began = time.perf_counter()
    errors = 0
    if todo:
        if inline:
            stream = _inline(spec, todo)
            n_workers = 1
        else:
            from twinloop.agents.placement import ray_status_line, start_ray

            if progress:  # the seconds before the bar starts are Ray's, not the runs'
                print(ray_status_line("campaign", address), file=sys.stderr, flush=True)
            start_ray(address)
            import ray

            n_workers = workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
            stream = _on_ray(spec, todo, n_workers)
        from twinloop.agents.progress import STARTING, counting_from_first

        label = f"campaign {spec.name} ({len(done)} done before)"
        with tqdm(
            total=len(todo),
            unit="run",
            smoothing=0,  # the average since the first run: runs finish in parallel batches
            disable=not progress,
            desc=label + STARTING,
        ) as bar:
            advance = counting_from_first(bar, label)  # the workers' start is not the runs'
            for result, trace in stream:
                persist(out, result, trace)
                errors += result["status"] != "ok"
                advance(1)
                if errors:
                    bar.set_postfix(errors=errors)
    wall_s = time.perf_counter() - began
    results = load_results(out, keys)
    summary = summarize_campaign(spec, keys, results)
    summary["execution"] = {
        "runs_this_invocation": len(todo),
        "skipped_as_done": len(done),
        "wall_s": wall_s,
        "runs_per_s": len(todo) / wall_s if todo and wall_s > 0 else None,
        "placement": "inline" if inline else ("ray:" + (address or "embedded")),
    }
    text = _dumps(summary)
    _atomic_write(out / "summary.json", lambda tmp: _write_text(tmp, text))
    if summary["runs"]["finished"] == summary["runs"]["total"]:
        from twinloop.campaigns.report import write_report

        write_report(out, spec, summary, results)
    return summary


def rerun(spec: CampaignSpec, run_id: str, out: str | Path) -> dict[str, Any]:
    """Run one campaign run again, exactly, with a full recording in ``out``.

    Returns:
        ``{"id", "result", "run_dir"}``: the new result (compare it with the stored one with
        :func:`same_result`) and where the recording is.

    Raises:
        KeyError: no run of the spec has that id.
        ValueError: the campaign runs HIL sessions (not exactly reproducible).

    """
    keys = {k.id: k for k in expand_runs(spec)}
    key = keys.get(run_id)
    if key is None:
        raise KeyError(
            f"no run {run_id!r} in campaign {spec.name!r} (ids look like {next(iter(keys))})"
        )
    if spec.hil is not None:
        raise ValueError(
            f"run {run_id!r} is a HIL session (wall-clock time, emulated devices): it cannot be "
            "replayed exactly; run the campaign again instead"
        )
    from twinloop.agents.recording import Recorder

    out = Path(out)
    recorder = Recorder(out)
    verdict, _, _ = _simulate(spec, key, recorder.listener(key.patient))
    result = {"id": key.id, **dataclasses.asdict(key), **verdict}
    recorder.finish(
        {"campaign": spec.as_dict(), "run": dataclasses.asdict(key)},
        {"verdict": verdict},
        complete=True,
    )
    return {"id": key.id, "result": result, "run_dir": str(out)}


#: The parts of a result a replay must reproduce exactly (not its wall time).
JUDGED = ("metrics", "labels", "first_onset", "detection", "agent_faults", "requirements")


def same_result(stored: dict[str, Any], replayed: dict[str, Any]) -> bool:
    """Whether a replay reproduced a stored result (compared as persisted: JSON)."""
    return all(
        json.loads(_dumps(stored.get(k))) == json.loads(_dumps(replayed.get(k))) for k in JUDGED
    )
