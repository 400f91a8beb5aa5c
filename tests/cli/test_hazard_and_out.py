"""Issue 19: a collapsed patient is flagged by ``run`` and ``evaluate`` (``--fail-on-hazard``),
and ``--out`` onto an earlier run is refused unless ``--overwrite``."""

from __future__ import annotations

import csv
import json

import pytest

from twinloop.agents.glucose import loop as glucose_loop
from twinloop.agents.glucose.run import HAZARD_FLOOR_MG_DL, non_physiological
from twinloop.agents.glucose.supervisor import SafetySupervisor
from twinloop.cli.main import main

#: child#008 under basal-bolus falls below 20 mg/dL in its first day behind the per-command
#: limits alone (the shield keeps it above 54); adult#001 does not.
RUN = ["run", "--controller", "basal-bolus", "--days", "1", "--placement", "inline",
       "--no-progress"]  # fmt: skip


class _PerCommandOnly(SafetySupervisor):
    """The supervisor without its shield (rolling totals, predictive guard)."""

    def _rolling_limits(self, t_min, basal, bolus, *_):
        return basal, bolus

    def _guard(self, t_min, basal, bolus, *_):
        return basal, bolus


@pytest.fixture
def no_shield(monkeypatch):
    """A collapse to flag: the loops' supervisor keeps only its per-command limits."""
    monkeypatch.setattr(glucose_loop, "SafetySupervisor", _PerCommandOnly)


def rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if "#" in line.split()[0]}


def test_the_floor_flags_low_and_non_finite_glucose():
    assert HAZARD_FLOOR_MG_DL == 20.0
    flags = non_physiological([19.99, 20.0, 400.0, float("nan"), float("inf"), -0.1])
    assert flags.tolist() == [True, False, False, True, False, True]


def test_run_flags_a_collapsed_patient_and_fail_on_hazard_exits_1(tmp_path, capsys, no_shield):
    out = tmp_path / "run"
    args = [*RUN, "--patient", "child#008", "--patient", "adult#001", "--out", str(out)]
    assert main(args) == 0
    table = rows(capsys.readouterr().out)
    assert table["child#008"].endswith("COLLAPSED")
    assert "COLLAPSED" not in table["adult#001"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hazard_patients"] == ["child#008"]
    assert summary["patients"]["child#008"]["non_physiological"] is True
    assert summary["patients"]["child#008"]["minutes_non_physiological"] > 0
    assert summary["patients"]["adult#001"]["minutes_non_physiological"] == 0
    # the same --out again: refused in one line, the recording untouched
    manifest = (out / "manifest.json").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier run" in err and "--overwrite" in err
    assert (out / "manifest.json").read_text() == manifest
    assert main([*args, "--overwrite", "--fail-on-hazard"]) == 1
    assert "hazard: 1 patient-run(s) flagged (child#008)" in capsys.readouterr().err
    safe = [*RUN, "--patient", "adult#001", "--out", str(tmp_path / "safe"), "--fail-on-hazard"]
    assert main(safe) == 0


def test_out_that_holds_something_else_is_never_deleted(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = [*RUN, "--patient", "adult#001", "--out", str(mine), "--overwrite"]
    assert main(args) == 2
    assert "holds no twinloop output" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert main([*RUN, "--patient", "adult#001", "--out", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is a new one
    assert main([*RUN, "--patient", "adult#001", "--out", str(empty)]) == 0


def test_evaluate_flags_a_collapsed_patient_run(tmp_path, capsys, no_shield):
    out = tmp_path / "eval"
    args = ["evaluate", "--controller", "basal-bolus", "--cohort", "child#008", "--days", "1",
            "--seed", "0", "--inline", "--no-recordings", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "‡ 1 patient-runs COLLAPSED" in printed
    assert "‡ COLLAPSED: basal-bolus on child#008 (child#008, seed 0)" in printed
    with (out / "per_patient.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["hazard"] == "non-physiological" and int(row["minutes_non_physiological"]) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hazard_floor_mg_dl"] == 20.0
    assert [h["patient"] for h in manifest["hazard_patient_runs"]] == ["child#008"]
    assert main([*args, "--fail-on-hazard"]) == 2  # an earlier output at --out
    assert "holds an earlier run" in capsys.readouterr().err
    assert main([*args, "--fail-on-hazard", "--overwrite"]) == 1
    assert "hazard: 1 patient-run(s) flagged" in capsys.readouterr().err


def test_hil_and_twin_replay_refuse_an_earlier_run_before_they_start(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "manifest.json").write_text("{}")
    # refused before connecting to a device (nothing listens on port 1) ...
    hil = ["hil", "--therapy", "knee-exo", "--tcp", "127.0.0.1:1", "--seconds", "1"]
    assert main([*hil, "--out", str(earlier)]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "connect" not in err
    # ... and before reading the twin and the log (neither exists)
    replay = ["twin", "replay", str(tmp_path / "no-twin.yaml"), str(tmp_path / "no-log.csv")]
    assert main([*replay, "--out", str(earlier)]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert (earlier / "manifest.json").read_text() == "{}"
    # with --overwrite, the missing twin is what is refused, and the earlier run is still there
    assert main([*replay, "--out", str(earlier), "--overwrite"]) == 2
    assert "holds an earlier run" not in capsys.readouterr().err
    assert (earlier / "manifest.json").read_text() == "{}"


def test_behind_the_shield_the_same_patient_does_not_collapse(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--patient", "child#008", "--out", str(out), "--fail-on-hazard"]) == 0
    assert "COLLAPSED" not in rows(capsys.readouterr().out)["child#008"]
