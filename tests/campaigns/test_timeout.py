"""A run that hangs cannot hang its campaign (issue 19): ``run_timeout_s``, inline and on Ray."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

import twinloop.campaigns.campaign as campaign
from tests.test_toy_therapy import SPEC as TOY_SPEC
from twinloop.campaigns.spec import RUN_TIMEOUT_S, SpecError, load_spec
from twinloop.cli.main import main
from twinloop.therapy import register_therapy, unregister_therapy

#: One toy tank, two seeds, the fault-free baseline and one sensor fault (40 % low for 10 s):
#: 4 runs of 30 s of simulated time each (milliseconds), judged against the overflow rule.
SPEC = {
    **TOY_SPEC,
    "name": "toy-hang",
    "seconds": 30,
    "scenarios": [{"name": "sensor-low", "faults": [{**TOY_SPEC["scenarios"][0]["faults"][0],
                                                     "start": 5, "duration": 10}]}],
    "sweep": [],
    "requirements": [{"id": "T1", "rule": "level_max", "limit_pct": 95}],
    "run_timeout_s": 1,
}  # fmt: skip


@pytest.fixture
def toy():
    from tests.toy_therapy import THERAPY

    register_therapy(THERAPY, replace=True)
    yield THERAPY
    unregister_therapy(THERAPY.name)


def spec_file(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "toy-hang.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}, sort_keys=False))
    return path


def refused(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_hanging_controller_times_out_inline_each_run_errored(toy, tmp_path, capsys):
    out = tmp_path / "out"
    began = time.monotonic()
    rc = main(["campaign", str(spec_file(tmp_path, controller="hang")), "--inline",
               "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 1
    assert time.monotonic() - began < 60  # four endless runs ended (1 s each, generous bound)
    printed = capsys.readouterr().out
    assert "verdict: FAIL" in printed
    summary = summary_of(out)
    assert summary["runs"]["errors"] == 4 and summary["runs"]["ok"] == 0
    for e in summary["errored_runs"]:
        assert e["error"] == (
            "timeout: the run took longer than run_timeout_s=1 s; its process was killed"
        )
    (req,) = summary["requirements"]
    assert req["verdict"] == "fail" and req["runs_errored"] == 4
    # allowed errors: the campaign still cannot pass with no judged run
    out2 = tmp_path / "allowed"
    rc = main(["campaign", str(spec_file(tmp_path, controller="hang", errors_allowed=4)),
               "--inline", "--no-progress", "--out", str(out2)])  # fmt: skip
    assert rc == 1 and "no run could be judged" in capsys.readouterr().out


def test_after_a_killed_run_the_next_runs_are_judged_as_before(toy, tmp_path, monkeypatch):
    """The first run hangs in its set-up (injected); the worker is killed and a fresh one runs
    the other three, whose results equal those of a campaign without the hang."""
    spec = load_spec(spec_file(tmp_path))
    real = campaign.build_loop

    def build(spec, key):  # type: ignore[no-untyped-def]
        if key.scenario == "baseline" and key.seed == 0:
            while True:
                pass
        return real(spec, key)

    clean = campaign.run_campaign(spec, tmp_path / "clean", inline=True, progress=False)
    assert clean["verdict"] == "pass" and clean["runs"]["ok"] == 4
    monkeypatch.setattr(campaign, "build_loop", build)
    hung = campaign.run_campaign(spec, tmp_path / "hung", inline=True, progress=False)
    assert hung["runs"]["error_ids"] == ["baseline.slow.s0"]
    assert hung["verdict"] == "fail"  # errors_allowed 0
    for run_id in ("baseline.slow.s1", "sensor-low.slow.s0", "sensor-low.slow.s1"):
        a = json.loads((tmp_path / "clean" / "results" / f"{run_id}.json").read_text())
        b = json.loads((tmp_path / "hung" / "results" / f"{run_id}.json").read_text())
        assert b["status"] == "ok" and campaign.same_result(a, b)
    # resuming after the hang is fixed runs the timed-out run again, and passes
    monkeypatch.setattr(campaign, "build_loop", real)
    again = campaign.run_campaign(spec, tmp_path / "hung", inline=True, progress=False)
    assert again["execution"]["runs_this_invocation"] == 1 and again["verdict"] == "pass"


def test_a_run_whose_process_dies_is_an_errored_run(toy, tmp_path, monkeypatch):
    spec = load_spec(spec_file(tmp_path, seeds=[0]))
    real = campaign.build_loop

    def build(spec, key):  # type: ignore[no-untyped-def]
        if key.scenario == "baseline":
            os._exit(3)  # as a crash in native code would
        return real(spec, key)

    monkeypatch.setattr(campaign, "build_loop", build)
    summary = campaign.run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["errored_runs"] == [
        {"id": "baseline.slow.s0", "error": "the run's process died (exit code 3)"}
    ]
    assert summary["runs"]["ok"] == 1  # the next run went on in a fresh process


@pytest.mark.ray
def test_a_hanging_controller_times_out_on_ray(toy, tmp_path, ray_started, capsys):
    out = tmp_path / "ray"
    rc = main(["campaign", str(spec_file(tmp_path, controller="hang", seeds=[0])),
               "--workers", "2", "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 1
    summary = summary_of(out)
    assert summary["execution"]["placement"] == "ray:embedded"
    assert sorted(summary["runs"]["error_ids"]) == ["baseline.slow.s0", "sensor-low.slow.s0"]
    for e in summary["errored_runs"]:
        assert e["error"] == (
            "timeout: the run took longer than run_timeout_s=1 s; its Ray worker was killed"
        )


def test_run_timeout_is_documented_and_range_checked(toy, tmp_path):
    assert load_spec(spec_file(tmp_path, run_timeout_s=2.5)).run_timeout_s == 2.5
    no_key = {k: v for k, v in SPEC.items() if k != "run_timeout_s"}
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(no_key))
    assert load_spec(path).run_timeout_s == RUN_TIMEOUT_S == 3600.0
    for bad in (0, 0.5, 86401, -1, True, "10", float("inf"), float("nan")):
        message = refused(spec_file(tmp_path, run_timeout_s=bad))
        assert f"run_timeout_s={bad!r} is not allowed: seconds in 1..86400" in message
    # the timeout decides no result: a campaign resumes under another one
    a = load_spec(spec_file(tmp_path, run_timeout_s=5))
    assert a.fingerprint() == load_spec(spec_file(tmp_path, run_timeout_s=50)).fingerprint()


HANGING_CAMPAIGN = """
import sys
from tests.toy_therapy import THERAPY
from twinloop.campaigns.campaign import run_campaign
from twinloop.campaigns.spec import load_spec
from twinloop.therapy import register_therapy

register_therapy(THERAPY, replace=True)
run_campaign(load_spec(sys.argv[1]), sys.argv[2], inline=True, progress=False)
"""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_sigkilled_campaign_leaves_no_run_process_behind(toy, tmp_path):
    """The campaign is SIGKILLed while its run hangs (a timeout of 600 s): the run's process,
    in a process group of its own, sees its parent gone and ends."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    spec = spec_file(tmp_path, controller="hang", run_timeout_s=600)
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_CAMPAIGN, str(spec), str(tmp_path / "out")], cwd=root
    )
    run = 0
    try:
        deadline = time.monotonic() + 60
        while not (runs := _children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        (run,) = runs
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while _alive(run) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(run), "the run's process outlived its campaign"
    finally:
        proc.kill()
        proc.wait()
        if run and _alive(run):  # not leave it spinning when the test fails
            os.killpg(run, signal.SIGKILL)
