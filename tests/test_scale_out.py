"""Scale-out: an evaluation and a campaign give the same results on a two-node cluster as inline.

The cluster is the ``loopback_cluster`` fixture (a head and a second node on 127.0.0.1, one CPU
each; it stops every Ray process it can see afterwards, so run it where no other Ray runs, or
in a PID namespace: ``unshare -rnpm --fork --mount-proc``). The commands run through the
``twinloop`` command line with ``--address``, the inline references in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.campaigns.test_campaign import SMALL
from twinloop.campaigns.campaign import run_campaign
from twinloop.campaigns.spec import load_spec
from twinloop.evaluation.glucose.evaluate import EvaluationProtocol, evaluate

ROOT = Path(__file__).resolve().parents[1]

#: Two patients of two age groups, two seeds, two controllers: 8 runs of one day.
PROTOCOL = EvaluationProtocol(
    name="scale-out", cohorts=("adult#001", "child#001"), days=1, seeds=(0, 1), description="t"
)
CONTROLLERS = ("basal-bolus", "pid")

#: The campaign tests' small spec: 2 patients × (baseline + 2 faults + 1 swept) × 1 seed, 1 day.
CAMPAIGN = {**SMALL, "name": "scale-out"}


def results(out: Path) -> dict[str, dict]:
    """A campaign's results, id → the whole result but where and how long it ran."""
    rows = {}
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        rows[r["id"]] = {k: v for k, v in r.items() if k not in {"wall_s", "node", "worker"}}
    return rows


def twinloop(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinloop", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.mark.ray
@pytest.mark.ray_cluster
@pytest.mark.timeout(1200)
def test_an_evaluation_and_a_campaign_on_two_nodes_match_inline(
    tmp_path: Path, loopback_cluster: tuple[str, dict[str, str]]
) -> None:
    address, env = loopback_cluster
    # the evaluation: per-patient rows and the comparison, byte for byte
    inline = tmp_path / "eval-inline"
    evaluate(list(CONTROLLERS), PROTOCOL, inline, use_ray=False, progress=False, recordings=False)
    cluster = tmp_path / "eval-cluster"
    proc = twinloop(
        "evaluate", "--controller", ",".join(CONTROLLERS), "--cohort", "adult#001",
        "--cohort", "child#001", "--days", "1", "--seed", "0,1", "--address", address,
        "--no-progress", "--no-recordings", "--out", str(cluster), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((cluster / "manifest.json").read_text())["execution"] == f"ray {address}"
    for name in ("per_patient.csv", "comparison.csv"):
        assert (cluster / name).read_bytes() == (inline / name).read_bytes(), name

    # the campaign: every run's judged result and the verdicts
    spec_path = tmp_path / "campaign.yaml"
    spec_path.write_text(yaml.safe_dump(CAMPAIGN, sort_keys=False))
    inline_summary = run_campaign(
        load_spec(spec_path), tmp_path / "camp-inline", inline=True, progress=False
    )
    out = tmp_path / "camp-cluster"
    proc = twinloop(
        "campaign", str(spec_path), "--address", address, "--out", str(out), "--no-progress",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]  # the overdose fails G1: exit status 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["execution"]["placement"] == f"ray:{address}"
    assert summary["runs"]["ok"] == summary["runs"]["total"] == 8
    assert results(out) == results(tmp_path / "camp-inline")
    assert summary["requirements"] == inline_summary["requirements"]
    assert summary["verdict"] == inline_summary["verdict"] == "fail"
