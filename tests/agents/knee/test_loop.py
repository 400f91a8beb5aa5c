import json
import math

import numpy as np
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.knee.loop import ExoLoop, ExoLoopConfig
from twinloop.agents.knee.messages import ExoSensorReading
from twinloop.agents.knee.report import build_exo_report, is_exo_recording
from twinloop.agents.knee.run import exo_loops, run_in_memory, run_knee_exo
from twinloop.agents.recording import column_listener
from twinloop.cli.main import main
from twinloop.plant.knee.env_core import S_CMD

DEG = math.pi / 180


def _run(config, patient=None):
    columns = {}
    loops = exo_loops(config)
    for loop in loops:
        loop.listen(column_listener(columns, loop.patient))
    summary = run_in_memory(loops)
    if patient is None:
        return columns, summary
    rows = [i for i, p in enumerate(columns["plant->sensor"]["patient"]) if p == patient]
    return np.array(columns["plant->sensor"]["angle_rad"])[rows], summary


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"patients": ("athlete",)}, "patients"),
        ({"patients": ()}, "patients"),
        ({"task": "dance"}, "task"),
        ({"cycles": 0}, "cycles"),
        ({"controller": "bang-bang"}, "controller"),
        ({"control_hz": 300}, "control_hz"),
        ({"seed": -1}, "seed"),
        ({"controller_deadline_s": 0}, "controller_deadline_s"),
    ],
)
def test_bad_configuration_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(LoopConfigError, match=field):
        ExoLoopConfig(**kwargs)


def test_same_seed_same_trajectory_and_patients_do_not_depend_on_each_other():
    config = ExoLoopConfig(patients=("moderate",), cycles=1, seed=4)
    alone, _ = _run(config, "moderate")
    again, _ = _run(config, "moderate")
    together, _ = _run(ExoLoopConfig(patients=("mild", "moderate"), cycles=1, seed=4), "moderate")
    other, _ = _run(ExoLoopConfig(patients=("moderate",), cycles=1, seed=5), "moderate")
    assert np.array_equal(alone, again)
    assert np.array_equal(alone, together)
    assert not np.array_equal(alone[: other.size], other[: alone.size])


def test_assist_as_needed_meets_the_targets_on_mild_and_moderate_with_no_limit_violation():
    """Issue 6's target: RMS ≤ 3°, exo ≤ 50 % of the joint work, zero limit violations."""
    _, summary = _run(ExoLoopConfig(patients=("mild", "moderate"), cycles=4, controller="aan"))
    for name in ("mild", "moderate"):
        row = summary["patients"][name]
        assert row["rms_error_deg"] <= 3.0, (name, row)
        assert row["exo_work_fraction"] <= 0.5, (name, row)
        assert row["exo_work_j"] > 0  # it does assist
        assert row["limit_violations"] == 0


def test_unassisted_severe_patient_cannot_follow_and_assistance_helps():
    _, none = _run(ExoLoopConfig(patients=("severe",), cycles=2, controller="none"))
    _, imp = _run(ExoLoopConfig(patients=("severe",), cycles=2, controller="impedance"))
    alone, helped = none["patients"]["severe"], imp["patients"]["severe"]
    assert helped["rms_error_deg"] < 0.5 * alone["rms_error_deg"]
    assert alone["exo_work_fraction"] < 0.05 < helped["exo_work_fraction"]


class _Wild:
    """A controller gone wrong: far beyond the torque limit, raising at some ticks."""

    def __init__(self, raise_every=0):
        self.calls = 0
        self.raise_every = raise_every

    def torque(self, obs):
        self.calls += 1
        if self.raise_every and self.calls % self.raise_every == 0:
            raise RuntimeError("controller crashed")
        return 500.0


def _loop(config, controller=None):
    (loop,) = exo_loops(config)
    if controller is not None:
        loop.controller.controller = controller
    columns = {}
    loop.listen(column_listener(columns, loop.patient))
    return loop, columns


def test_supervisor_clips_a_wild_controller_and_a_crash_gets_zero_torque():
    config = ExoLoopConfig(patients=("moderate",), cycles=1, twin=False)
    loop, columns = _loop(config, _Wild(raise_every=7))
    loop.run()
    applied = np.array(columns["supervisor->actuator"]["torque_nm"])
    assert np.all(np.abs(applied) <= config.supervisor.torque_limit_nm)
    rules = set(columns["supervisor->overrides"]["rule"])
    assert "torque limit" in rules and "no command" in rules
    faults = columns["runtime->faults"]
    assert faults["agent"] and set(faults["agent"]) == {"controller"}
    # the drive never applied more than the supervisor allowed
    exo = np.abs(np.array(columns["plant->sensor"]["exo_torque_nm"]))
    assert exo.max() <= config.supervisor.torque_limit_nm + 1.0  # + gear friction


def test_stale_encoder_data_makes_the_exoskeleton_compliant():
    config = ExoLoopConfig(patients=("moderate",), cycles=1, twin=False, controller="impedance")
    loop, columns = _loop(config)
    cut_s = 1.0

    def freeze(message: ExoSensorReading):
        return None if message.t_s >= cut_s else message

    loop.channels["sensor->controller"].add_transform(freeze)
    loop.run()
    t = np.array(columns["supervisor->actuator"]["t_s"])
    applied = np.array(columns["supervisor->actuator"]["torque_nm"])
    stale_after = cut_s + config.supervisor.encoder_stale_s + 1.5 / config.control_hz
    assert np.all(applied[t > stale_after] == 0.0)
    assert np.any(applied[t < cut_s] != 0.0)
    assert loop.batch.scal[0, S_CMD] == 0.0  # what the drive got last, not only the channel
    assert "stale encoder" in set(columns["supervisor->overrides"]["rule"])


def test_the_twin_estimates_feed_the_controller_and_are_recorded():
    config = ExoLoopConfig(patients=("moderate",), cycles=2, controller="aan")
    loop, columns = _loop(config)
    seen = []
    inner = loop.controller.controller

    class Spy:
        def torque(self, obs):
            seen.append(obs.twin_spasticity_gain_per_rad_s)
            return inner.torque(obs)

    loop.controller.controller = Spy()
    loop.run()
    assert len(columns["estimator->controller"]["t_s"]) == loop.n_ticks
    assert np.isfinite(seen).all()
    assert seen[-1] == columns["estimator->controller"]["spasticity_gain_per_rad_s"][-1]


@pytest.mark.ray
def test_agents_on_ray_actors_give_the_inline_trajectory(ray_started):
    from twinloop.agents.placement import RayPlacement

    config = ExoLoopConfig(patients=("mild",), cycles=1, seed=2)
    inline, _ = _run(config, "mild")
    columns = {}
    loops = exo_loops(config, RayPlacement())
    for loop in loops:
        loop.listen(column_listener(columns, loop.patient))
    run_in_memory(loops)
    assert np.array_equal(inline, np.array(columns["plant->sensor"]["angle_rad"]))


def test_recording_summary_and_report(tmp_path):
    config = ExoLoopConfig(patients=("mild",), cycles=1)
    run_dir, summary = run_knee_exo(config, tmp_path / "run", progress=False)
    assert is_exo_recording(run_dir)
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(
        json.dumps(summary, default=float)
    )
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["therapy"] == "knee-exo"
    report = build_exo_report(run_dir)
    assert report.summary["patients"]["mild"] == summary["patients"]["mild"]
    assert {p.name for p in report.plots} == {"mild_tracking.png", "mild_twin.png"}
    assert all(p.stat().st_size > 10_000 for p in report.plots)
    text = report.report_path.read_text()
    assert "| mild |" in text and "mild_tracking.png" in text


def test_cli_run_knee_exo_then_report(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        ["run", "--therapy", "knee-exo", "--patient", "moderate", "--cycles", "1",
         "--controller", "impedance", "--placement", "inline", "--no-progress", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "moderate" in printed and "RMS err" in printed and "report.md" in printed
    assert (out / "plots" / "moderate_tracking.png").is_file()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patient", "adult#001"], "patient"),
        (["--days", "2"], "--days"),
        (["--cohort", "adults"], "--cohort"),
        (["--controller", "pid"], "controller"),
        (["--placement", "ray-patients"], "ray-patients"),
    ],
)
def test_cli_bad_knee_exo_options_are_one_line_errors(argv, message, capsys, tmp_path):
    code = main(["run", "--therapy", "knee-exo", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_exo_only_options_are_refused_for_the_insulin_loop(capsys):
    assert main(["run", "--cycles", "3"]) == 2
    assert "knee-exo" in capsys.readouterr().err


def test_loop_object_reports_task_time_and_end():
    (loop,) = exo_loops(ExoLoopConfig(patients=("healthy",), task="hold", twin=False))
    assert isinstance(loop, ExoLoop) and loop.t_s == 0.0 and not loop.done
    loop.run()
    assert loop.done and loop.t_s == pytest.approx(loop.n_ticks / 100)


def test_the_shipped_sac_policy_runs_in_the_loop_and_a_wrong_control_rate_is_refused():
    from twinloop.policies.errors import PolicyError

    policy = "policy:policies/shipped/knee_sac/seed_0"
    _, summary = _run(ExoLoopConfig(patients=("moderate",), cycles=2, controller=policy))
    row = summary["patients"]["moderate"]
    assert row["rms_error_deg"] < 1.5 and row["limit_violations"] == 0
    with pytest.raises(PolicyError, match="control"):
        exo_loops(ExoLoopConfig(patients=("moderate",), control_hz=200, controller=policy))
