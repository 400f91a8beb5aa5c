"""Verdicts that cannot lie (issue 19): errored and unjudgeable runs, exit codes, safe names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import twinloop.campaigns.campaign as campaign
from tests.campaigns.test_campaign import refused
from twinloop.campaigns.campaign import run_campaign, unjudgeable
from twinloop.campaigns.spec import SpecError, load_spec
from twinloop.cli.main import main

#: One patient, one day, the baseline and one overdose: 2 runs of a few seconds each.
TINY = {
    "name": "tiny",
    "therapy": "glucose",
    "patients": ["adult#001"],
    "controller": "basal-bolus",
    "days": 1,
    "seeds": [0],
    "scenarios": [
        {
            "name": "overdose",
            "faults": [
                {"fault": "false_bolus", "start": 700, "duration": 5, "params": {"units": 12}}
            ],
        }
    ],
    "requirements": [
        {"id": "LOW", "rule": "glucose_min", "threshold_mg_dl": 20},
        {"id": "TIR", "rule": "time_in_range_min", "min_pct": 10},
    ],
}


def spec_file(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}, sort_keys=False))
    return path


def cli(*args: str) -> int:
    return main(["campaign", *args, "--inline", "--no-progress"])


def raise_in(monkeypatch: pytest.MonkeyPatch, scenarios: set[str]) -> None:
    """Make every run of ``scenarios`` raise while its loop is built."""
    real = campaign.build_loop

    def build(spec, key):  # type: ignore[no-untyped-def]
        if key.scenario in scenarios:
            raise RuntimeError("the plant exploded (injected by the test)")
        return real(spec, key)

    monkeypatch.setattr(campaign, "build_loop", build)


def test_a_campaign_whose_every_run_raises_fails_and_exits_1(tmp_path, monkeypatch, capsys):
    raise_in(monkeypatch, {"baseline", "overdose"})
    out = tmp_path / "out"
    assert cli(str(spec_file(tmp_path)), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert "verdict: FAIL" in printed and "no run could be judged" in printed
    assert "errored  baseline.adult-001.s0: RuntimeError: the plant exploded" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "fail" and summary["runs"]["ok"] == 0
    for req in summary["requirements"]:  # each errored run fails each requirement
        assert req["verdict"] == "fail" and req["runs_errored"] == 2
        assert sorted(req["failing_ids"]) == ["baseline.adult-001.s0", "overdose.adult-001.s0"]
    assert [e["error"] for e in summary["errored_runs"]] == [
        "RuntimeError: the plant exploded (injected by the test)"
    ] * 2
    report = (out / "report.html").read_text()
    assert "Errored runs (2" in report and "the plant exploded" in report


def test_errored_runs_fail_every_requirement_unless_allowed(tmp_path, monkeypatch):
    raise_in(monkeypatch, {"overdose"})
    spec = load_spec(spec_file(tmp_path))
    mixed = run_campaign(spec, tmp_path / "strict", inline=True, progress=False)
    assert mixed["runs"]["ok"] == 1 and mixed["runs"]["error_ids"] == ["overdose.adult-001.s0"]
    reqs = {r["id"]: r for r in mixed["requirements"]}
    # the baseline passes both; the run that raised fails both (it cannot show it meets them)
    assert reqs["LOW"]["failing_ids"] == reqs["TIR"]["failing_ids"] == ["overdose.adult-001.s0"]
    assert reqs["TIR"]["runs_judged"] == 2 and reqs["TIR"]["runs_failing"] == 1
    assert mixed["verdict"] == "fail"
    assert any("errors_allowed 0" in why for why in mixed["verdict_reasons"])
    # the same results with one error allowed: judged on the baseline alone, and listed
    allowed = load_spec(spec_file(tmp_path, errors_allowed=1))
    assert allowed.fingerprint() == spec.fingerprint()  # the runs are the same runs
    lenient = run_campaign(allowed, tmp_path / "lenient", inline=True, progress=False)
    assert lenient["verdict"] == "pass" and lenient["verdict_reasons"] == []
    assert all(r["verdict"] == "pass" and not r["failing_ids"] for r in lenient["requirements"])
    assert lenient["errored_runs"][0]["id"] == "overdose.adult-001.s0"


def test_a_campaign_that_fails_its_requirements_exits_1_and_one_that_passes_0(tmp_path, capsys):
    failing = spec_file(tmp_path, requirements=[{"id": "G1", "rule": "glucose_min",
                                                 "threshold_mg_dl": 70}])  # fmt: skip
    assert cli(str(failing), "--out", str(tmp_path / "f")) == 1
    assert "verdict: FAIL (requirement G1 fails)" in capsys.readouterr().out
    passing = tmp_path / "pass.yaml"
    low = {"id": "G1", "rule": "glucose_min", "threshold_mg_dl": 54}
    passing.write_text(
        yaml.safe_dump({**TINY, "name": "ok", "scenarios": [], "requirements": [low]})
    )
    assert cli(str(passing), "--out", str(tmp_path / "p")) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    # bad input is 2, as for every command
    assert cli(str(tmp_path / "missing.yaml")) == 2


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda v, t: v["metrics"].__setitem__("mean_mg_dl", math.nan), "mean_mg_dl"),
        (lambda v, t: t.update({k: x[:1] for k, x in t.items()}), "no simulated time"),
    ],
    ids=["nan-metric", "zero-time"],
)
def test_an_unjudgeable_run_is_an_errored_run(tmp_path, monkeypatch, spoil, why):
    real = campaign._simulate

    def simulate(spec, key, listener=None):  # type: ignore[no-untyped-def]
        verdict, trace, hits = real(spec, key, listener)
        if key.scenario == "baseline":
            spoil(verdict, trace)
        return verdict, trace, hits

    monkeypatch.setattr(campaign, "_simulate", simulate)
    spec = load_spec(spec_file(tmp_path, scenarios=[]))
    summary = run_campaign(spec, tmp_path / "out", inline=True, progress=False)
    assert summary["verdict"] == "fail" and summary["runs"]["errors"] == 1
    assert summary["errored_runs"][0]["error"].startswith("unjudgeable: ")
    assert why in summary["errored_runs"][0]["error"]
    assert all(r["verdict"] == "fail" for r in summary["requirements"])


def test_unjudgeable_accepts_a_sound_run():
    trace = {"t_min": [0.0, 1.0]}
    assert unjudgeable({"metrics": {"mean_mg_dl": 120.0, "n": 3}}, trace) is None
    assert "inf_metric" in (unjudgeable({"metrics": {"inf_metric": math.inf}}, trace) or "")


BASE = "therapy: glucose\npatients: [adult#001]\n"


def test_absurd_days_and_errors_allowed_are_refused_at_parse(tmp_path):
    msg = refused(tmp_path, "name: t\n" + BASE + "days: 1000000000\n")
    assert "days=1000000000" in msg and "1..365" in msg
    msg = refused(tmp_path, "name: t\n" + BASE + "errors_allowed: 3\n")
    assert "errors_allowed=3" in msg and "0..1" in msg  # one run: the baseline
    assert "errors_allowed=-1" in refused(tmp_path, "name: t\n" + BASE + "errors_allowed: -1\n")
    assert "errors_allowed=True" in refused(tmp_path, "name: t\n" + BASE + "errors_allowed: true\n")
    knee = "name: k\ntherapy: knee-exo\npatients: [healthy]\ncycles: 1000000000\n"
    assert "cycles=1000000000" in refused(tmp_path, knee)


@pytest.mark.parametrize(
    "name", ["../../x", "/tmp/x", ".hidden", "a/b", "a\x00b", "x" * 65, "", "..", "a b"]
)
def test_unsafe_campaign_and_scenario_names_are_refused(tmp_path, name):
    msg = refused(tmp_path, yaml.safe_dump({"name": name}) + BASE)
    assert f"name={name!r} is not allowed" in msg and "letters, digits" in msg
    scenario = {"name": "ok", "scenarios": [{"name": name, "faults": []}]}
    msg = refused(tmp_path, yaml.safe_dump(scenario) + BASE)
    assert f"scenario name={name!r} is not allowed" in msg


def test_a_file_name_that_is_not_a_safe_name_needs_a_name(tmp_path):
    path = tmp_path / ".sneaky.yaml"
    path.write_text(BASE)
    with pytest.raises(SpecError, match=r"name \(the file's name"):
        load_spec(path)
    path.write_text("name: fine\n" + BASE)
    assert load_spec(path).name == "fine"


def test_out_onto_another_campaign_or_run_is_refused_unless_overwrite(tmp_path, capsys):
    spec = spec_file(tmp_path, scenarios=[], requirements=[])
    out = tmp_path / "out"
    assert cli(str(spec), "--out", str(out)) == 0
    first = (out / "results" / "baseline.adult-001.s0.json").stat().st_mtime_ns
    assert cli(str(spec), "--out", str(out)) == 0  # the same spec resumes (nothing to run)
    assert (out / "results" / "baseline.adult-001.s0.json").stat().st_mtime_ns == first
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "seeds": [1], "scenarios": [], "requirements": []}))
    capsys.readouterr()
    assert cli(str(other), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results of another spec" in err and "--overwrite" in err
    assert cli(str(other), "--out", str(out), "--overwrite") == 0
    assert [p.name for p in (out / "results").iterdir()] == ["baseline.adult-001.s1.json"]
    # a directory that holds something else is never deleted
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert cli(str(spec), "--out", str(foreign), "--overwrite") == 2
    assert "holds no twinloop output" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "precious"
    # a rerun's recording is not overwritten either
    run_id = "baseline.adult-001.s1"
    assert main(["campaign", str(other), "--out", str(out), "--rerun", run_id]) == 0
    assert main(["campaign", str(other), "--out", str(out), "--rerun", run_id]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(["campaign", str(other), "--out", str(out), "--rerun", run_id, "--overwrite"]) == 0
