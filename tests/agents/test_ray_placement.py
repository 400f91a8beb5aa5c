import json
import subprocess
import sys
import time

import numpy as np
import pytest

from twinloop.agents.glucose.loop import LoopConfig, PatientLoop
from twinloop.agents.placement import PlacementError, RayPlacement, start_ray
from twinloop.plant.glucose.patients import get_patient

pytestmark = pytest.mark.ray


def _trajectory(placement=None):
    p = get_patient("adolescent#006")
    loop = PatientLoop(p, LoopConfig(patients=(p.name,)), np.random.default_rng(7))
    if placement is not None:
        loop.place(placement)
    bg, commands = [], []
    loop.channels["plant->sensor"].listen(lambda _, m: bg.append(m.bg_mg_dl))
    loop.channels["supervisor->actuator"].listen(lambda _, m: commands.append(m))
    try:
        loop.run()
    finally:
        loop.close()
    return np.array(bg), commands


def test_ray_and_inline_placements_give_identical_trajectories(ray_started):
    inline_bg, inline_cmd = _trajectory()
    placement = RayPlacement()
    try:
        ray_bg, ray_cmd = _trajectory(placement)
    finally:
        placement.close()
    np.testing.assert_array_equal(inline_bg, ray_bg)
    assert inline_cmd == ray_cmd


def test_unreachable_address_fails_fast_with_a_clear_error():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="not reachable"):
        start_ray("127.0.0.1:1")
    assert time.monotonic() - t0 < 30


@pytest.mark.ray_cluster
def test_run_on_an_existing_two_node_cluster(tmp_path, loopback_cluster):
    """`twinloop run --address --placement ray` on a head node plus a second node, on loopback.

    (Without ``--placement``, ``--address`` runs each patient's loop as a Ray task.)
    """
    address, env = loopback_cluster
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "twinloop", "run", "--address", address, "--patient", "adult#001",
         "--placement", "ray", "--out", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["placement"] == "ray"
    assert "agents ray" in proc.stdout


def test_a_killed_actor_is_restarted_and_the_loop_holds_the_safe_command(ray_started):
    import ray

    p = get_patient("adult#004")
    loop = PatientLoop(p, LoopConfig(patients=(p.name,)), np.random.default_rng(3))
    placement = RayPlacement(max_restarts=3)
    loop.place(placement)
    faults, requested = [], []
    loop.channels["runtime->faults"].listen(lambda _, m: faults.append(m))
    loop.channels["controller->supervisor"].listen(lambda _, m: requested.append(m.t_min))
    try:
        for _ in range(60):
            loop.tick()
        ray.kill(placement.actor("controller"), no_restart=False)
        for _ in range(60):
            loop.tick()
        assert "controller" in placement._channels  # its direct channel, opened again
    finally:
        loop.close()
        placement.close()
    assert faults and faults[0].agent == "controller" and faults[0].t_min >= 300
    assert "safe command" in faults[0].fallback
    assert max(requested) > faults[-1].t_min  # the restarted controller answers again
    assert len({round(t) for t in requested}) < 120  # the gap is there


@pytest.mark.parametrize("placement", ["ray", "ray-patients"])
def test_a_cohort_on_ray_records_what_inline_records(ray_started, tmp_path, placement):
    """Patients in lockstep on shared agent actors (ray), or whole loops in workers."""
    from twinloop.agents.glucose.run import run_cohort
    from twinloop.agents.placement import RayPatientsPlacement

    cfg = LoopConfig(patients=("adult#001", "child#002", "adolescent#003"))
    inline_dir, inline_summary = run_cohort(cfg, tmp_path / "inline", progress=False)
    where = RayPlacement() if placement == "ray" else RayPatientsPlacement()
    try:
        ray_dir, ray_summary = run_cohort(cfg, tmp_path / "ray", progress=False, placement=where)
    finally:
        if isinstance(where, RayPlacement):
            assert len(where._actors) == 5  # one actor per kind of agent, not per patient
            where.close()
    assert ray_summary == inline_summary
    import pyarrow.parquet as pq

    for name in (
        "plant__sensor",
        "supervisor__actuator",
        "sensor__controller",
        "estimator__controller",
    ):
        a = pq.read_table(inline_dir / "channels" / f"{name}.parquet").to_pydict()
        b = pq.read_table(ray_dir / "channels" / f"{name}.parquet").to_pydict()
        assert a == b


def test_actors_called_the_ordinary_way_give_the_same_trajectories(ray_started):
    """``direct=False``: every round through Ray's task path, as before the direct channels."""
    inline_bg, inline_cmd = _trajectory()
    placement = RayPlacement(direct=False)
    try:
        ray_bg, ray_cmd = _trajectory(placement)
        assert not placement._channels
    finally:
        placement.close()
    np.testing.assert_array_equal(inline_bg, ray_bg)
    assert inline_cmd == ray_cmd


def test_a_late_answer_is_not_taken_for_the_next_rounds(ray_started):
    """A call that overruns its timeout fails; its answer, arriving later, is discarded."""
    from types import SimpleNamespace

    from twinloop.agents.placement import Request

    placement = RayPlacement()
    try:
        ref = placement.host(SimpleNamespace(sleep=time.sleep, same=int), label="slow")
        (warm,) = placement.execute([Request(ref, "same", (1,))])
        assert warm.value == 1 and "slow" in placement._channels  # the direct channel is open
        (late,) = placement.execute([Request(ref, "sleep", (1.0,), timeout_s=0.2)])
        assert isinstance(late.error, TimeoutError)
        (answer,) = placement.execute([Request(ref, "same", (7,), timeout_s=10.0)])
        assert answer.error is None and answer.value == 7  # not the sleep's None
    finally:
        placement.close()


def test_an_actor_the_driver_cannot_reach_directly_is_called_the_ray_way(ray_started, monkeypatch):
    """No direct channel (e.g. a node's port closed to the driver): Ray's task path, same loop."""
    import twinloop.agents.placement as placement_module

    tried = []

    def refused(address, authkey):
        tried.append(address)
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(placement_module, "Client", refused)
    inline_bg, inline_cmd = _trajectory()
    placement = RayPlacement()
    try:
        ray_bg, ray_cmd = _trajectory(placement)
        assert tried and not placement._channels
        assert len(tried) <= 5 * placement_module.CHANNEL_ATTEMPTS  # not once per round
    finally:
        placement.close()
    np.testing.assert_array_equal(inline_bg, ray_bg)
    assert inline_cmd == ray_cmd
