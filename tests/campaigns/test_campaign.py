"""Fault-injection campaigns: spec checks (with lines), runs, verdicts, resume, replay."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from twinloop.campaigns.campaign import (
    JUDGED,
    RunKey,
    expand_runs,
    rerun,
    run_campaign,
    run_one,
    same_result,
)
from twinloop.campaigns.spec import SpecError, load_spec
from twinloop.cli.main import main

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "name": "small",
    "therapy": "glucose",
    "patients": ["adult#001", "adult#003"],
    "controller": "basal-bolus",
    "days": 1,
    "seeds": [0],
    "scenarios": [
        {
            "name": "occluded",
            "faults": [
                {"fault": "occlusion", "start": 300, "duration": 240, "params": {"severity": 1.0}}
            ],
        },
        {
            "name": "overdose",
            "faults": [
                {"fault": "false_bolus", "start": 700, "duration": 5, "params": {"units": 20}}
            ],
        },
    ],
    "sweep": ["deadline_overrun"],
    "requirements": [
        {"id": "G1", "rule": "glucose_min", "threshold_mg_dl": 54},
        {
            "id": "G2",
            "rule": "time_below_after_fault",
            "threshold_mg_dl": 70,
            "max_min": 30,
            "window_min": 240,
        },
        {"id": "G4", "rule": "safe_state_after_agent_fault", "periods": 2},
    ],
}


def write_spec(tmp_path: Path, data: dict, name: str = "campaign.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def table(out: Path) -> dict[str, dict]:
    """The campaign's results: id → the judged parts."""
    rows = {}
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        rows[r["id"]] = {k: r.get(k) for k in (*JUDGED, "status")}
    return rows


# -- the spec --------------------------------------------------------------------------------
def refused(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


BASE = "name: t\ntherapy: glucose\npatients: [adult#001]\n"


def test_an_unknown_fault_is_refused_with_its_line(tmp_path):
    msg = refused(
        tmp_path,
        BASE + "scenarios:\n  - name: a\n    faults:\n      - {fault: bais, start: 10}\n",
    )
    assert "bad.yaml:7" in msg and "unknown fault 'bais'" in msg and "bias" in msg


def test_an_unknown_channel_or_parameter_is_refused_with_its_line(tmp_path):
    msg = refused(
        tmp_path,
        BASE + "scenarios:\n  - name: a\n    faults:\n"
        "      - {fault: occlusion, channel: sensor->controller}\n",
    )
    assert "bad.yaml:7" in msg and "'sensor->controller'" in msg and "actuator->plant" in msg
    msg = refused(
        tmp_path,
        BASE + "scenarios:\n  - name: a\n    faults:\n"
        "      - {fault: bias, channel: actuator->plant, field: glucose_mg_dl}\n",
    )
    assert "InsulinDelivery" in msg and "basal_u, bolus_u" in msg
    msg = refused(
        tmp_path,
        BASE + "scenarios:\n  - name: a\n    faults:\n      - fault: bias\n"
        "        params: {ofset: 3}\n",
    )
    assert "bad.yaml:7" in msg and "'ofset'" in msg and "offset" in msg
    msg = refused(
        tmp_path,
        BASE + "scenarios:\n  - name: a\n    faults:\n      - fault: scaling\n"
        "        params: {factor: 99}\n",
    )
    assert "factor=99" in msg and "0..10" in msg


def test_generic_faults_sit_on_any_channel_of_the_loop(tmp_path):
    """UVA-style add/hold/truncate on any variable: a bias on the pump's delivered bolus."""
    data = {**SMALL, "patients": ["adult#001"], "sweep": [], "requirements": [],
            "scenarios": [{"name": "bolus-plus", "faults": [
                {"fault": "bias", "channel": "actuator->plant", "field": "bolus_u",
                 "start": 700, "duration": 1, "params": {"offset": 5}}]},
                {"name": "hold-command", "faults": [
                {"fault": "stuck", "channel": "supervisor->actuator", "start": 300,
                 "duration": 300}]}]}  # fmt: skip
    spec = load_spec(write_spec(tmp_path, data))
    summary = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["runs"]["ok"] == 3
    per = summary["per_scenario"]
    res = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")}
    assert res["bolus-plus.adult-001.s0"]["fault_hits"] == {"bias": 1}
    assert res["hold-command.adult-001.s0"]["fault_hits"]["stuck"] == 60  # 5-min ticks
    # 5 U more insulin than asked for: lower glucose than the baseline
    assert (
        res["bolus-plus.adult-001.s0"]["metrics"]["mean_mg_dl"]
        < res["baseline.adult-001.s0"]["metrics"]["mean_mg_dl"]
    )
    assert per["bolus-plus"]["runs"] == 1


def test_overlapping_faults_are_refused_unless_allowed(tmp_path):
    faults = (
        "    faults:\n"
        "      - {fault: bias, start: 100, duration: 60}\n"
        "      - {fault: drift, start: 130, duration: 60}\n"
    )
    msg = refused(tmp_path, BASE + "scenarios:\n  - name: both\n" + faults)
    assert "bad.yaml:5" in msg and "overlap" in msg and "100–160" in msg
    ok = tmp_path / "ok.yaml"
    ok.write_text(BASE + "scenarios:\n  - name: both\n    overlap: true\n" + faults)
    spec = load_spec(ok)
    assert [f.fault for f in spec.scenario("both").faults] == ["bias", "drift"]


def test_requirements_outside_the_vocabulary_are_refused(tmp_path):
    msg = refused(tmp_path, BASE + "requirements:\n  - {id: R1, rule: never_harm}\n")
    assert "bad.yaml:5" in msg and "never_harm" in msg and "glucose_min" in msg
    msg = refused(tmp_path, BASE + "requirements:\n  - {id: R1, rule: glucose_min}\n")
    assert "needs threshold_mg_dl" in msg
    msg = refused(
        tmp_path, BASE + "requirements:\n  - {id: R1, rule: glucose_min, threshold: 54}\n"
    )
    assert "no parameter 'threshold'" in msg
    msg = refused(
        tmp_path, BASE + "requirements:\n  - {id: R1, rule: exo_torque_within, limit_nm: 3}\n"
    )
    assert "knee-exo" in msg


def test_other_refusals_name_the_field(tmp_path):
    assert "wire" in refused(tmp_path, BASE + "sweep: [bad_crc]\n")
    assert "knee-exo loop" in refused(tmp_path, BASE + "sweep: [sign_flip]\n")
    assert "unknown key 'seed'" in refused(tmp_path, BASE + "seed: 3\n")
    assert "therapy='ventilator'" in refused(tmp_path, "therapy: ventilator\n")
    assert "controller=" in refused(tmp_path, BASE + "controller: magic\n")
    assert "not valid YAML" in refused(tmp_path, BASE + "sweep: [a\n")


def test_a_former_spelling_of_the_therapy_is_the_registry_s(tmp_path, capsys):
    """``therapy: insulin`` (a former spelling) is read as ``glucose``, with a warning."""
    path = tmp_path / "old.yaml"
    path.write_text("name: t\ntherapy: insulin\npatients: [adult#001]\n")
    spec = load_spec(path)
    assert spec.therapy == "glucose" and spec.setting("days") == 1
    assert "deprecated spelling" in capsys.readouterr().err
    assert "'cycles' is a key of knee-exo campaigns" in refused(tmp_path, BASE + "cycles: 3\n")


def test_the_shipped_campaigns_load():
    paths = [
        p for p in sorted((ROOT / "campaigns" / "specs").glob("*.yaml"))
        if "requirements" not in p.name
    ]  # fmt: skip
    assert {p.stem for p in paths} >= {"glucose_smoke", "knee_exo_smoke", "pump_wire_hil"}
    for path in paths:
        spec = load_spec(path)
        assert spec.requirements and len(expand_runs(spec)) > 1
        assert load_spec(path.stem).fingerprint() == spec.fingerprint()  # found by name
    with pytest.raises(SpecError, match="nor a shipped campaign \\(drive_wire_hil, glucose_smoke"):
        load_spec("no_such_campaign")


def test_the_random_generator_is_seeded_and_non_overlapping(tmp_path):
    data = {**SMALL, "scenarios": [], "sweep": [], "random": {
        "count": 20, "seed": 4, "faults": ["bias", "drift", "occlusion", "stuck"],
        "per_scenario": 3, "intensity": 0.5}}  # fmt: skip
    a = load_spec(write_spec(tmp_path, data, "a.yaml"))
    b = load_spec(write_spec(tmp_path, data, "b.yaml"))
    assert a.scenarios == b.scenarios
    random_ones = [s for s in a.scenarios if s.name.startswith("random-")]
    assert len(random_ones) == 20
    for s in random_ones:
        spans = sorted((f.start, f.end) for f in s.faults)
        assert all(x[1] <= y[0] for x, y in itertools.pairwise(spans)), spans
        assert all(f.start >= 0 and f.end <= 1440 for f in s.faults)
    other = load_spec(write_spec(tmp_path, {**data, "random": {**data["random"], "seed": 5}}))
    assert other.scenarios != a.scenarios


# -- runs and verdicts ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_campaign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("campaign")
    spec = load_spec(write_spec(tmp, SMALL))
    out = tmp / "out"
    summary = run_campaign(spec, out, inline=True, progress=False)
    return spec, out, summary


def test_a_campaign_persists_every_run_and_judges_it(small_campaign):
    spec, out, summary = small_campaign
    keys = expand_runs(spec)
    assert len(keys) == 2 * 4  # 2 patients × (baseline + 3 scenarios) × 1 seed
    assert summary["runs"] == {
        "total": 8, "finished": 8, "ok": 8, "errors": 0, "error_ids": [], "errors_allowed": 0
    }  # fmt: skip
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == sorted(k.id for k in keys)
    assert len(list((out / "traces").glob("*.parquet"))) == 8
    per = summary["per_scenario"]
    # the baseline has no hypoglycaemia; a 20 U unrequested bolus (a pump fault) does
    assert per["baseline"]["hazard_rate"]["below_70"] == 0.0
    assert per["overdose"]["hazard_rate"]["below_70"] == 1.0
    # a 4 h occlusion makes both patients hyperglycaemic
    assert per["occluded"]["hazard_rate"]["above_180"] == 1.0
    assert per["occluded"]["mean_hazard_minutes"]["above_180"] > per["baseline"][
        "mean_hazard_minutes"]["above_180"]  # fmt: skip
    reqs = {r["id"]: r for r in summary["requirements"]}
    assert reqs["G1"]["verdict"] == "fail"
    assert set(reqs["G1"]["failing_ids"]) <= {k.id for k in keys if k.scenario == "overdose"}
    assert reqs["G1"]["failing_ids"]
    assert reqs["G4"]["verdict"] == "pass" and reqs["G4"]["runs_judged"] == 2
    assert summary["verdict"] == "fail"
    assert "requirement G1 fails" in summary["verdict_reasons"]
    overdose = json.loads((out / "results" / "overdose.adult-001.s0.json").read_text())
    assert overdose["labels"]["below_70"]["onset_to_hazard_min"] > 0
    assert overdose["fault_hits"] == {"false_bolus": 1}
    report = (out / "report.html").read_text()
    assert "G1" in report and "FAIL" in report and "data:image/png;base64," in report
    assert json.loads((out / "summary.json").read_text())["verdict"] == "fail"


def test_a_deadline_overrun_is_seen_and_the_safe_state_follows(small_campaign):
    _, out, _ = small_campaign
    r = json.loads((out / "results" / "deadline_overrun.adult-001.s0.json").read_text())
    assert r["agent_faults"] == 240 // 5  # one discarded decision per 5-min tick of the window
    assert r["detection"]["by_rule"]["no command: scheduled basal"] >= 48
    assert next(v for v in r["requirements"] if v["id"] == "G4")["pass"] is True


def test_a_run_is_deterministic_and_replays_exactly(small_campaign, tmp_path):
    spec, out, _ = small_campaign
    key = RunKey("occluded", "adult#003", 0)
    again, _ = run_one(spec, key)
    stored = json.loads((out / "results" / f"{key.id}.json").read_text())
    assert same_result(stored, again)
    replay = rerun(spec, key.id, tmp_path / "replay")
    assert same_result(stored, replay["result"])
    assert (tmp_path / "replay" / "manifest.json").exists()
    assert (tmp_path / "replay" / "channels" / "actuator__plant.parquet").exists()
    other, _ = run_one(spec, RunKey("occluded", "adult#003", 1))
    assert not same_result(stored, other)


def test_replay_from_the_command_line(small_campaign, capsys, tmp_path):
    spec, out, _ = small_campaign
    rc = main(["campaign", spec.source, "--out", str(out), "--rerun", "overdose.adult-003.s0"])
    assert rc == 0
    assert "identical to the stored result" in capsys.readouterr().out
    rc = main(["campaign", spec.source, "--out", str(out), "--rerun", "nope.adult-003.s0"])
    assert rc == 2
    assert "no run 'nope.adult-003.s0'" in capsys.readouterr().err
    rc = main(["campaign", spec.source, "--out", str(out), "--replay", "overdose.adult-003.s0",
               "--overwrite"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and "--replay is now --rerun" in captured.err
    assert (out / "reruns" / "overdose.adult-003.s0" / "manifest.json").exists()


def test_a_run_that_raises_is_recorded_and_the_campaign_goes_on(tmp_path, monkeypatch):
    import twinloop.campaigns.campaign as campaign

    real = campaign.build_loop

    def build(spec, key):  # type: ignore[no-untyped-def]
        if key.scenario == "occluded":
            raise RuntimeError("the plant exploded (injected by the test)")
        return real(spec, key)

    monkeypatch.setattr(campaign, "build_loop", build)
    spec = load_spec(write_spec(tmp_path, {**SMALL, "sweep": []}))
    summary = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["runs"]["errors"] == 2 and summary["runs"]["ok"] == 4
    assert sorted(summary["runs"]["error_ids"]) == [
        "occluded.adult-001.s0",
        "occluded.adult-003.s0",
    ]
    bad = json.loads((tmp_path / "out" / "results" / "occluded.adult-001.s0.json").read_text())
    assert bad["status"] == "error" and "the plant exploded" in bad["traceback"]
    assert bad["error"] == "RuntimeError: the plant exploded (injected by the test)"
    # each errored run fails every requirement (errors_allowed: 0)
    assert summary["verdict"] == "fail"
    assert all("occluded.adult-001.s0" in r["failing_ids"] for r in summary["requirements"])
    assert "Traceback" in bad["traceback"]
    assert "occluded.adult-001.s0" in (tmp_path / "out" / "report.html").read_text()
    # errors are run again on resume; once the cause is gone they succeed
    monkeypatch.setattr(campaign, "build_loop", real)
    again = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert again["execution"]["runs_this_invocation"] == 2
    assert again["runs"]["errors"] == 0 and again["runs"]["ok"] == 6


def test_resume_skips_finished_runs_and_ends_with_the_same_table(small_campaign, tmp_path):
    spec, full_out, _ = small_campaign
    out = tmp_path / "resumed"
    partial = run_campaign(spec, out, inline=True, progress=False, limit=3)
    assert partial["runs"]["finished"] == 3
    assert partial["verdict"] in ("incomplete", "fail")  # never a pass with runs missing
    assert "5 of 8 runs not finished" in partial["verdict_reasons"]
    assert not (out / "report.html").exists()
    final = run_campaign(spec, out, inline=True, progress=False)
    assert final["execution"]["skipped_as_done"] == 3
    assert final["execution"]["runs_this_invocation"] == 5
    assert table(out) == table(full_out)
    again = run_campaign(spec, out, inline=True, progress=False)
    assert again["execution"]["runs_this_invocation"] == 0


def test_resuming_with_another_spec_is_refused(small_campaign, tmp_path):
    _spec, out, _ = small_campaign
    changed = load_spec(write_spec(tmp_path, {**SMALL, "seeds": [0, 1]}))
    with pytest.raises(ValueError, match="another spec"):
        run_campaign(changed, out, inline=True, progress=False)


def test_sigkill_then_resume_gives_the_uninterrupted_table(small_campaign, tmp_path):
    """A campaign killed with SIGKILL mid-way resumes to the same table as an unbroken run."""
    spec, full_out, _ = small_campaign
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "twinloop", "campaign", spec.source, "--out", str(out), "--inline",
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((out / "results").glob("*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no result within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "results").glob("*.json")))
    assert done_before < 8, "the campaign finished before it could be killed"
    # every result on disk is whole (written atomically)
    for path in (out / "results").glob("*.json"):
        json.loads(path.read_text())
    rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert rc.returncode == 1, rc.stderr[-2000:]  # the campaign fails G1: exit status 1
    assert "verdict: FAIL" in rc.stdout
    assert f"skipped {done_before} already done" in rc.stdout
    assert table(out) == table(full_out)
    assert not list((out / "results").glob(".*.tmp"))


# -- the exoskeleton -------------------------------------------------------------------------
def test_an_exoskeleton_campaign(tmp_path):
    data = {
        "name": "exo",
        "therapy": "knee-exo",
        "patients": ["moderate"],
        "controller": "aan",
        "cycles": 2,
        "seeds": [0],
        "scenarios": [
            {"name": "flip", "faults": [{"fault": "sign_flip", "start": 1.0, "duration": 2.0}]},
            {"name": "saturated", "faults": [
                {"fault": "torque_saturation", "start": 0.0, "duration": 100.0,
                 "params": {"limit_nm": 0.0}}]},
        ],
        "requirements": [
            {"id": "E1", "rule": "exo_torque_within", "limit_nm": 40},
            {"id": "E2", "rule": "exo_no_limit_violation"},
            {"id": "E3", "rule": "exo_rms_error_max", "max_deg": 3},
        ],
    }  # fmt: skip
    spec = load_spec(write_spec(tmp_path, data))
    summary = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["runs"]["ok"] == 3
    res = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")}
    flip, sat, base = res["flip.moderate.s0"], res["saturated.moderate.s0"], res[
        "baseline.moderate.s0"]  # fmt: skip
    assert flip["fault_hits"]["sign_flip"] > 0
    # no torque at all: the patient tracks alone, worse than with assistance
    assert sat["metrics"]["exo_work_j"] == pytest.approx(0.0, abs=0.05)
    assert sat["metrics"]["rms_error_deg"] > base["metrics"]["rms_error_deg"]
    assert flip["metrics"]["rms_error_deg"] > base["metrics"]["rms_error_deg"]
    assert {r["id"] for r in summary["requirements"]} == {"E1", "E2", "E3"}
    assert (tmp_path / "out" / "report.html").exists()


# -- Ray -------------------------------------------------------------------------------------
@pytest.mark.ray
def test_a_campaign_on_ray_gives_the_inline_table(small_campaign, ray_started, tmp_path):
    spec, full_out, _ = small_campaign
    summary = run_campaign(spec, tmp_path / "ray", progress=False, workers=2)
    assert summary["execution"]["placement"] == "ray:embedded"
    assert table(tmp_path / "ray") == table(full_out)


@pytest.mark.ray
@pytest.mark.ray_cluster
def test_the_same_spec_on_a_two_node_loopback_cluster(small_campaign, tmp_path, loopback_cluster):
    spec, full_out, _ = small_campaign
    address, env = loopback_cluster
    out = tmp_path / "cluster"
    proc = subprocess.run(
        [sys.executable, "-m", "twinloop", "campaign", spec.source, "--address", address, "--out",
         str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]  # the campaign fails G1: exit status 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["execution"]["placement"] == f"ray:{address}"
    assert table(out) == table(full_out)


# -- wire faults through the HIL rig ---------------------------------------------------------
def test_hil_campaign_specs_are_checked(tmp_path):
    hil = "hil: {wall_s_per_sim_min: 0.02, minutes: 60}\n"
    assert "wire faults only" in refused(tmp_path, BASE + hil + "sweep: [bias]\n")
    assert "RTU framing" in refused(tmp_path, BASE + hil + "sweep: [bad_crc]\n")
    assert "'hil:' block" in refused(tmp_path, BASE + "sweep: [timeout]\n")
    msg = refused(
        tmp_path,
        BASE + "requirements:\n  - {id: W1, rule: safe_state_after_lost_communication, "
        "periods: 2}\n",
    )
    assert "needs a 'hil:' campaign" in msg
    assert "minutes=5" in refused(tmp_path, BASE + "hil: {minutes: 5}\nsweep: [timeout]\n")


@pytest.mark.hil
def test_wire_faults_through_the_hil_rig_raise_the_pump_alarm(tmp_path):
    """Each communication-cutting wire fault: the rig's pump alarm and safe state follow
    within two control periods of its onset; a duplicated write cuts nothing."""
    data = {
        "name": "wire",
        "therapy": "glucose",
        "patients": ["adult#001"],
        "controller": "pid",
        "seeds": [0],
        "hil": {"wall_s_per_sim_min": 0.02, "minutes": 60},
        "defaults": {"start": 20, "duration": 15},
        "sweep": ["dropped_frame", "disconnect", "duplicated_write"],
        "requirements": [{"id": "W1", "rule": "safe_state_after_lost_communication",
                          "periods": 2}],
    }  # fmt: skip
    spec = load_spec(write_spec(tmp_path, data))
    summary = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["runs"]["ok"] == 4, summary["runs"]
    res = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")}
    for name in ("dropped_frame", "disconnect"):
        r = res[f"{name}.adult-001.s0"]
        lost = [a for a in r["alarms"] if a["source"] == "pump" and a["condition"] ==
                "communication lost"]  # fmt: skip
        assert lost, r["alarms"]
        assert 20 <= lost[0]["t_min"] <= 20 + 2 * 5
        assert "safe state" in lost[0]["action"]
        assert r["requirements"][0]["pass"] is True
    assert res["dropped_frame.adult-001.s0"]["fault_hits"]["drop"] > 0
    # no pump alarm without a cut (a CGM "stale data" alarm at start-up can happen on a busy
    # machine: the first reading arrives after the rig's first step)
    for name in ("duplicated_write", "baseline"):
        assert not [a for a in res[f"{name}.adult-001.s0"]["alarms"] if a["source"] == "pump"]
    assert res["duplicated_write.adult-001.s0"]["requirements"][0]["pass"] is None
    w1 = summary["requirements"][0]
    assert w1["verdict"] == "pass" and w1["runs_judged"] == 2


def test_the_fault_documentation_is_the_catalogue():
    """docs/faults.md is generated from the catalogue; regenerate it when this fails:
    ``twinloop campaign --faults --markdown > docs/faults.md``."""
    from twinloop.campaigns.faults import CATALOGUE
    from twinloop.cli.campaign import catalogue_markdown

    text = (ROOT / "docs" / "faults.md").read_text()
    assert text == catalogue_markdown()
    assert len(CATALOGUE) >= 30
    for name in CATALOGUE:
        assert f"| `{name}` |" in text


@pytest.mark.hil
def test_wire_faults_on_the_exoskeleton_drive_end_in_the_safe_state(tmp_path):
    small = write_spec(
        tmp_path,
        {
            **yaml.safe_load((ROOT / "campaigns" / "specs" / "drive_wire_hil.yaml").read_text()),
            "hil": {"seconds": 2},
            "defaults": {"start": 1.0, "duration": 0.5},
            "sweep": ["dropped_frame", "disconnect", "duplicated_write"],
        },
    )
    spec = load_spec(small)
    summary = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["runs"]["ok"] == 4, summary["runs"]
    res = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")}
    for name in ("dropped_frame", "disconnect"):
        r = res[f"{name}.moderate.s0"]
        assert r["alarms"] and r["alarms"][0]["source"] == "drive", r["alarms"]
        assert 1.0 <= r["alarms"][0]["t_s"] <= 1.0 + 2 * 0.01
        assert r["metrics"]["ended_by"].startswith("alarm: drive")
        assert next(v for v in r["requirements"] if v["id"] == "X1")["pass"] is True
    assert res["baseline.moderate.s0"]["alarms"] == []
    assert res["baseline.moderate.s0"]["metrics"]["ended_by"] == "completed"
    assert res["duplicated_write.moderate.s0"]["fault_hits"]["duplicate_write"] > 0
    assert next(r for r in summary["requirements"] if r["id"] == "X1")["verdict"] == "pass"


def test_the_lost_communication_verdict():
    from twinloop.campaigns.hil import lost_communication_verdict as _lost_communication
    from twinloop.campaigns.spec import FaultLine, Scenario

    cut = Scenario("s", (FaultLine("timeout", "wire:drop_response", 60.0, 30.0, ()),))
    assert _lost_communication("W", cut, [61.0], 10.0)["pass"] is True
    late = _lost_communication("W", cut, [59.0, 75.0], 10.0)
    assert late["pass"] is False and late["at"] == 60.0 and late["value"] == 15.0
    assert _lost_communication("W", cut, [], 10.0) == {
        "id": "W", "pass": False, "at": 60.0, "value": None
    }  # fmt: skip
    slow = Scenario("s", (FaultLine("delayed_response", "wire:delay_s", 60.0, 30.0, ()),))
    assert _lost_communication("W", slow, [], 10.0)["pass"] is None


def test_the_loops_model_is_a_spec_key_and_fit_is_refused_with_the_way_to_fit(tmp_path):
    spec = load_spec(write_spec(tmp_path, {**SMALL, "model": "oracle"}))
    assert spec.setting("model") == "oracle"
    assert load_spec(write_spec(tmp_path, SMALL, "b.yaml")).setting("model") == "population"
    msg = refused(tmp_path, BASE + "model: fit\n")
    assert "model" in msg and "twinloop twin individualize" in msg
