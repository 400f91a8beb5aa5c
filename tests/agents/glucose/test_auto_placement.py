"""The placement `twinloop run` takes when none is asked for (by the run's measured cost)."""

import pytest

from twinloop.agents.glucose.loop import LoopConfig
from twinloop.agents.glucose.run import RAY_START_S, auto_placement


@pytest.mark.parametrize(
    ("config", "cpus", "expected"),
    [
        (LoopConfig(patients=("adults",)), 2, "inline"),  # the main job: 10 patient-days
        (LoopConfig(patients=("all",), days=7), 2, "ray-patients"),  # 210 patient-days
        (LoopConfig(patients=("all",), days=7), 1, "inline"),  # one CPU: nothing to spread
        (LoopConfig(patients=("adult#001",), days=60), 8, "inline"),  # one patient: one worker
        (LoopConfig(patients=("adults",), controller="mpc"), 2, "inline"),  # ~3 s, saves 1.5
        (LoopConfig(patients=("all",), days=2, controller="mpc"), 2, "ray-patients"),  # ~18 s
        (LoopConfig(patients=("all",), days=7, clock="wall"), 8, "inline"),
        # a trained policy pays the guard like pid: 30 patient-days ~6 s, split saves ~3 s
        (
            LoopConfig(patients=("all",), controller="policy:policies/shipped/t1d_ppo/seed_0"),
            2,
            "inline",
        ),
        (LoopConfig(patients=("all",), days=2, controller="policy:t1d_ppo"), 2, "ray-patients"),
    ],
)
def test_the_cheaper_placement_by_the_runs_cost(config, cpus, expected):
    name, why = auto_placement(config, cpus=cpus)
    assert name == expected, why
    assert "patient-day" in why or "wall-clock" in why


def test_the_break_even_is_rays_start():
    """Just below the start cost inline, just above on Ray workers (20 patient-days/s inline)."""
    # 2 CPUs halve the inline time: the saving is half of it
    below = LoopConfig(patients=("adults",), days=int(2 * RAY_START_S * 20 / 10))
    above = LoopConfig(patients=("adults",), days=int(2 * RAY_START_S * 20 / 10) + 1)
    assert auto_placement(below, cpus=2)[0] == "inline"
    assert auto_placement(above, cpus=2)[0] == "ray-patients"


def test_a_cluster_address_spreads_the_patients():
    name, why = auto_placement(LoopConfig(patients=("adults",)), "127.0.0.1:6379", cpus=1)
    assert name == "ray-patients" and "--address" in why


def test_twinloop_run_without_placement_runs_a_small_run_inline(tmp_path, capsys):
    from twinloop.cli.main import main

    out = tmp_path / "run"
    code = main(["run", "--patient", "adult#001", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "placement inline (1 patient-day(s)" in printed
    assert "agents inline" in printed
