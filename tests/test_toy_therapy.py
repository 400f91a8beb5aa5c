"""A third therapy defined only in the tests (``tests/toy_therapy``) runs through the real
command line — ``twinloop run``, ``report`` and ``campaign`` (inline and on Ray) — with no edit
of shared code; and no shared module switches on a therapy's name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from twinloop.cli.main import main
from twinloop.therapy import register_therapy, unregister_therapy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    """The toy therapy, registered for this module's tests only."""
    from tests.toy_therapy import THERAPY

    register_therapy(THERAPY, replace=True)
    yield THERAPY
    unregister_therapy(THERAPY.name)


# -- twinloop run / report -----------------------------------------------------------------
def test_twinloop_run_and_report_a_toy_run(toy, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--therapy", "toy", "--patient", "slow", "--patient", "fast",
               "--seconds", "60", "--seed", "3", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "toy run: 2 tank(s) × 60 s, seed 3" in printed and f"recording: {out}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["therapy"] == "toy" and manifest["complete"] is True
    truth = pq.read_table(out / "channels" / "plant__sensor.parquet").to_pydict()
    assert truth["patient"].count("slow") == 60 and truth["patient"].count("fast") == 60
    assert truth["t_s"][:3] == [0.0, 1.0, 2.0]
    valve = pq.read_table(out / "channels" / "supervisor__actuator.parquet").to_pydict()
    assert all(0.0 <= v <= 100.0 for v in valve["valve_pct"])
    # the summary printed and stored is the recording's: RMS error to the 50 % set point
    summary = json.loads((out / "summary.json").read_text())
    fast = np.asarray([x for p, x in zip(truth["patient"], truth["level_pct"], strict=True)
                       if p == "fast"])  # fmt: skip
    rms = float(np.sqrt(np.mean((fast - 50.0) ** 2)))
    assert summary["patients"]["fast"]["rms_error_pct"] == pytest.approx(rms)
    assert f"rms error {rms:6.2f} %" in printed
    # the fast tank reaches its set point within the minute; the slow one lags behind it
    assert abs(fast[-10:].mean() - 50.0) < 2.0
    assert summary["patients"]["slow"]["rms_error_pct"] > summary["patients"]["fast"][
        "rms_error_pct"]  # fmt: skip
    # same seed, same recording
    again = tmp_path / "again"
    rc = main(["run", "--therapy", "toy", "--patient", "slow", "--patient", "fast",
               "--seconds", "60", "--seed", "3", "--out", str(again), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert pq.read_table(again / "channels" / "plant__sensor.parquet").to_pydict() == truth
    # twinloop report rebuilds the summary from the Parquet files
    (out / "summary.json").unlink()
    assert main(["report", str(out)]) == 0
    assert "report: " in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (
        f"| fast | {summary['patients']['fast']['mean_level_pct']:.2f} |"
        in (out / "report.md").read_text()
    )


def test_toy_options_and_names_are_checked_by_the_shared_command(toy, tmp_path, capsys):
    assert main(["run", "--therapy", "toy", "--patient", "bathtub", "--out", str(tmp_path)]) == 2
    assert "bathtub" in capsys.readouterr().err
    assert main(["run", "--therapy", "toy", "--days", "2", "--out", str(tmp_path)]) == 2
    assert "--days is an option of the glucose loop, not of toy" in capsys.readouterr().err


# -- twinloop campaign ---------------------------------------------------------------------
SPEC = {
    "name": "toy-faults",
    "therapy": "toy",
    "patients": ["slow"],
    "seconds": 120,
    "seeds": [0, 1],
    "scenarios": [
        {"name": "sensor-low", "faults": [
            {"fault": "bias", "channel": "sensor->controller", "start": 20, "duration": 100,
             "params": {"offset": -40}}]},
    ],
    "sweep": ["valve_stuck", "deadline_overrun"],
    "requirements": [
        {"id": "T1", "rule": "level_max", "limit_pct": 80},
        {"id": "T2", "rule": "safe_state_after_agent_fault", "periods": 1},
    ],
}  # fmt: skip


def _spec(tmp_path: Path, data: dict | None = None) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data or SPEC, sort_keys=False))
    return path


def _table(out: Path) -> dict[str, dict]:
    from twinloop.campaigns.campaign import JUDGED

    rows = {}
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        rows[r["id"]] = {k: r.get(k) for k in (*JUDGED, "status", "fault_hits")}
    return rows


@pytest.fixture(scope="module")
def toy_campaign(toy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy-campaign")
    out = tmp / "inline"
    rc = main(["campaign", str(_spec(tmp)), "--inline", "--out", str(out), "--no-progress"])
    assert rc == 1  # T1 fails: the campaign's verdict is FAIL
    return tmp, out


def test_a_toy_campaign_judges_a_fault_against_its_requirement(toy_campaign):
    _, out = toy_campaign
    summary = json.loads((out / "summary.json").read_text())
    assert summary["therapy"] == "toy" and summary["labels"] == ["overflow"]
    assert summary["runs"] == {
        "total": 8, "finished": 8, "ok": 8, "errors": 0, "error_ids": [], "errors_allowed": 0
    }  # fmt: skip
    res = _table(out)
    # without a fault the level stays near its 50 % set point: T1 passes
    for seed in (0, 1):
        base = res[f"baseline.slow.s{seed}"]
        t1 = next(v for v in base["requirements"] if v["id"] == "T1")
        assert t1["pass"] is True and t1["value"] < 65.0
        assert base["requirements"][1] == {"id": "T2", "pass": None, "why": "no agent fault"}
    # a sensor reading 40 % low makes the controller overfill: T1 fails, on the truth
    low = res["sensor-low.slow.s0"]
    assert low["fault_hits"] == {"bias": 100}
    t1 = next(v for v in low["requirements"] if v["id"] == "T1")
    assert t1["pass"] is False and t1["value"] > 80.0
    # the toy's own fault type on its valve, with the default window (30 s from 30 s)
    stuck = res["valve_stuck.slow.s0"]
    assert stuck["fault_hits"] == {"valve_stuck": 30}
    # a discarded decision: the supervisor closes the valve within the period (T2 passes)
    late = res["deadline_overrun.slow.s0"]
    assert late["agent_faults"] == 30 and late["detection"]["by_rule"]["no command"] == 30
    assert next(v for v in late["requirements"] if v["id"] == "T2")["pass"] is True
    reqs = {r["id"]: r for r in summary["requirements"]}
    assert reqs["T1"]["verdict"] == "fail"
    assert set(reqs["T1"]["failing_ids"]) == {
        "sensor-low.slow.s0", "sensor-low.slow.s1", "valve_stuck.slow.s0", "valve_stuck.slow.s1"
    }  # fmt: skip
    assert reqs["T2"]["verdict"] == "pass" and reqs["T2"]["runs_judged"] == 2
    assert summary["per_scenario"]["baseline"]["hazard_rate"]["overflow"] == 0.0
    assert "rms_error_pct" in summary["per_scenario"]["sensor-low"]
    trace = pq.read_table(out / "traces" / "sensor-low.slow.s0.parquet").to_pydict()
    assert len(trace["t_s"]) == 120 and max(trace["level_pct"]) == pytest.approx(t1["value"])
    report = (out / "report.html").read_text()
    assert "T1" in report and "FAIL" in report and "mean RMS %" in report


def test_a_toy_run_replays_exactly(toy_campaign, capsys):
    tmp, out = toy_campaign
    rc = main(["campaign", str(tmp / "toy.yaml"), "--out", str(out), "--rerun",
               "sensor-low.slow.s1"])  # fmt: skip
    assert rc == 0 and "identical to the stored result" in capsys.readouterr().out
    replay = out / "reruns" / "sensor-low.slow.s1" / "channels" / "sensor__controller.parquet"
    assert pq.read_table(replay).num_rows == 120


@pytest.mark.ray
def test_a_toy_campaign_on_ray_gives_the_inline_table(toy_campaign, ray_started):
    """The toy is registered only in this process: each Ray task carries the therapy and
    registers it in its worker."""
    tmp, inline = toy_campaign
    out = tmp / "ray"
    rc = main(["campaign", str(tmp / "toy.yaml"), "--out", str(out), "--workers", "2",
               "--no-progress"])  # fmt: skip
    assert rc == 1  # T1 fails, as inline
    summary = json.loads((out / "summary.json").read_text())
    assert summary["execution"]["placement"] == "ray:embedded"
    assert summary["runs"]["errors"] == 0, summary["runs"]
    assert _table(out) == _table(inline)


def test_toy_specs_are_checked_with_the_toy_s_vocabulary(toy, tmp_path, capsys):
    def refused(data: dict) -> str:
        assert main(["campaign", str(_spec(tmp_path, data)), "--inline"]) == 2
        return capsys.readouterr().err

    base = {k: v for k, v in SPEC.items() if k not in ("scenarios", "sweep", "requirements")}
    assert "'occlusion' is for the glucose loop, not toy" in refused(
        {**base, "sweep": ["occlusion"]}
    )
    assert "the toy therapy has no HIL sessions" in refused({**base, "hil": {"seconds": 2}})
    msg = refused({**base, "requirements": [{"id": "X", "rule": "glucose_min",
                                             "threshold_mg_dl": 54}]})  # fmt: skip
    assert "is for the glucose loop, not toy" in msg
    assert "seconds=0 is not allowed: an integer >= 1" in refused({**base, "seconds": 0})
    msg = refused({**base, "scenarios": [{"name": "x", "faults": [
        {"fault": "bias", "channel": "meal->controller"}]}]})  # fmt: skip
    assert "cannot sit on channel 'meal->controller'" in msg and "supervisor->actuator" in msg
    # and a glucose spec refuses the toy's own fault type
    glucose = {"name": "g", "therapy": "glucose", "patients": ["adult#001"],
               "sweep": ["valve_stuck"]}  # fmt: skip
    assert "'valve_stuck' is for the toy loop, not glucose" in refused(glucose)


def test_the_catalogue_lists_the_toy_s_fault_and_rule_while_it_is_registered(toy):
    from twinloop.campaigns.faults import CATALOGUE
    from twinloop.campaigns.spec import requirement_rules
    from twinloop.cli.campaign import catalogue_markdown

    assert CATALOGUE["valve_stuck"].therapy == "toy"
    assert requirement_rules("toy")["level_max"].therapy == "toy"
    assert "glucose_min" not in requirement_rules("toy")
    assert "| `valve_stuck` | toy |" in catalogue_markdown()


# -- no shared module switches on a therapy's name --------------------------------------------
NAMES = frozenset({"glucose", "knee-exo", "insulin"})
#: Packages whose shared modules are checked (their therapy folders are the therapies' own).
SHARED = ("cli", "campaigns", "evaluation", "twins", "agents", "hil", "policies", "plant")
THERAPY_FOLDERS = ("glucose", "knee")
#: Shared modules allowed to name a therapy in a comparison, with the reason (none today).
NOT_YET: dict[str, str] = {}


def _names_in(node: ast.AST) -> list[str]:
    """Therapy names among a comparison operand (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and node.value in NAMES:
        return [str(node.value)]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [n for elt in node.elts for n in _names_in(elt)]
    return []


def therapy_switches(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of each comparison, ``in`` test, ``case`` or dict key on a therapy's
    name in ``source`` (docstrings, messages and defaults are not comparisons)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, n) for n in _names_in(operand)]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, n) for n in _names_in(node.value)]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, n) for k in node.keys if k is not None for n in _names_in(k)]
    return found


def test_the_check_finds_switches_and_ignores_docstrings():
    code = '''"""Runs glucose or knee-exo loops."""
DEFAULT = "glucose"
if therapy == "glucose":
    pass
if name in ("knee-exo", "other"):
    pass
TARGETS = {"insulin": 1}
print(f"the {therapy} loop, not glucose")
'''
    assert therapy_switches(code) == [(3, "glucose"), (5, "knee-exo"), (7, "insulin")]


def test_no_shared_module_compares_a_therapy_name():
    offenders = []
    checked = 0
    for package in SHARED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.relative_to(ROOT / package).parts[0] in THERAPY_FOLDERS or rel in NOT_YET:
                continue
            checked += 1
            offenders += [
                f"{rel}:{line}: {name!r}" for line, name in therapy_switches(path.read_text())
            ]
    assert checked > 50
    assert not offenders, "shared code switching on a therapy's name:\n" + "\n".join(offenders)


def test_a_therapy_without_a_fhir_export_is_refused_in_one_line(toy, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--therapy", "toy", "--patient", "slow", "--seconds", "10", "--out",
               str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    assert main(["export", "fhir", str(out), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "a toy run has no FHIR export (exported: glucose, knee-exo)" in err
    assert not (tmp_path / "b.json").exists()
