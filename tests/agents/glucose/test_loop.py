import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from twinloop.agents.errors import LoopConfigError
from twinloop.agents.glucose.loop import CHANNELS, LoopConfig, PatientLoop
from twinloop.agents.glucose.run import run_cohort
from twinloop.agents.messages import CgmReading
from twinloop.agents.recording import INCOMPLETE_MARKER, channel_file
from twinloop.cli.main import main
from twinloop.plant.glucose.cgm import CGMSpec
from twinloop.plant.glucose.patients import get_patient
from twinloop.plant.glucose.uva_padova import simulate
from twinloop.policies.glucose.controllers import Dose


def _table(run_dir, channel):
    return pq.read_table(run_dir / "channels" / channel_file(channel)).to_pydict()


def test_a_run_records_every_channel_with_manifest_and_summary(tmp_path):
    cfg = LoopConfig(patients=("adult#001", "child#002"), days=1, seed=3)
    run_dir, summary = run_cohort(cfg, tmp_path / "run", progress=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["config"]["seed"] == 3
    assert "numpy" in manifest["versions"]
    assert not (run_dir / INCOMPLETE_MARKER).exists()
    plant = _table(run_dir, "plant->sensor")
    assert len(plant["bg_mg_dl"]) == 2 * 1441
    assert set(plant) == {"patient", "t_min", "bg_mg_dl", "gsub_mg_dl"}
    cgm = _table(run_dir, "sensor->controller")
    assert len(cgm["glucose_mg_dl"]) == 2 * 289  # every 5 min, minute 0 … 1440
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["patients"]["adult#001"]["time_in_range_70_180_pct"] == pytest.approx(
        summary["patients"]["adult#001"]["time_in_range_70_180_pct"]
    )
    assert set(manifest["channels"]) <= set(CHANNELS)


def test_same_seed_same_recording_and_patients_are_independent(tmp_path):
    a = run_cohort(LoopConfig(patients=("adults",), seed=5), tmp_path / "a", progress=False)[0]
    b = run_cohort(LoopConfig(patients=("adult#003",), seed=5), tmp_path / "b", progress=False)[0]
    c = run_cohort(LoopConfig(patients=("adults",), seed=6), tmp_path / "c", progress=False)[0]
    ta, tc = _table(a, "plant->sensor"), _table(c, "plant->sensor")
    assert ta["bg_mg_dl"] != tc["bg_mg_dl"]
    alone = _table(b, "plant->sensor")["bg_mg_dl"]
    assert alone == ta["bg_mg_dl"][2 * 1441 : 3 * 1441]  # adult#003 is third in "adults"
    again = run_cohort(LoopConfig(patients=("adults",), seed=5), tmp_path / "d", progress=False)
    assert _table(again[0], "plant->sensor") == ta


def test_the_loop_plant_equals_a_replay_of_its_own_deliveries():
    p = get_patient("adolescent#004")
    cfg = LoopConfig(patients=(p.name,), cgm=CGMSpec(noise=False), scenario="A")
    loop = PatientLoop(p, cfg, np.random.default_rng(0))
    rec: dict[str, list] = {"bg": [], "insulin": []}
    loop.channels["plant->sensor"].listen(lambda _, m: rec["bg"].append(m.bg_mg_dl))
    loop.channels["actuator->plant"].listen(lambda _, m: rec["insulin"].append(m.total_u))
    loop.run()
    meals = np.zeros(1440)
    meals[[420, 720, 1080]] = [45.0, 70.0, 80.0]
    traj = simulate([p], np.array(rec["insulin"]), meals)
    np.testing.assert_allclose(rec["bg"], traj.bg_mg_dl[0], rtol=1e-9)
    assert max(rec["insulin"]) > 1.0  # the meal boluses went through


class Crashing:
    def decide(self, obs):
        if obs.t_min >= 600:
            raise RuntimeError("controller bug")
        return Dose(5.0, 0.0)


def test_a_crashing_controller_falls_back_to_the_safe_command():
    p = get_patient("adult#002")
    loop = PatientLoop(p, LoopConfig(patients=(p.name,)), np.random.default_rng(1), Crashing())
    overrides = []
    loop.channels["supervisor->overrides"].listen(lambda _, m: overrides.append(m))
    commands = []
    loop.channels["supervisor->actuator"].listen(lambda _, m: commands.append(m))
    loop.run()
    assert len(commands) == 288
    late = [c for c in commands if c.t_min >= 600]
    assert all(
        c.basal_u_per_h in (0.0, loop.supervisor.config.scheduled_basal_u_per_h) for c in late
    )
    reasons = {o.reason for o in overrides}
    assert "no command: scheduled basal" in reasons and "max temp basal" in reasons


def test_a_channel_transform_is_a_fault_seam():
    """Dropping CGM readings after 08:00 makes the supervisor's watchdog take over."""
    p = get_patient("adult#005")
    loop = PatientLoop(p, LoopConfig(patients=(p.name,)), np.random.default_rng(2))
    loop.channels["sensor->controller"].add_transform(
        lambda m: None if isinstance(m, CgmReading) and m.t_min >= 480 else m
    )
    overrides = []
    loop.channels["supervisor->overrides"].listen(lambda _, m: overrides.append(m))
    loop.run()
    stale = [o for o in overrides if o.reason.startswith("stale CGM")]
    assert stale and min(o.t_min for o in stale) == pytest.approx(480 + 15, abs=5)
    assert loop.channels["sensor->controller"].dropped > 100


def test_an_interrupted_run_is_marked_incomplete(tmp_path):
    class Interrupting:
        def decide(self, obs):
            raise KeyboardInterrupt

    cfg = LoopConfig(patients=("adult#001",))
    import twinloop.agents.glucose.run as run_module

    original = run_module.PatientLoop

    def patched(patient, config, rng, **kw):
        return original(patient, config, rng, Interrupting(), **kw)

    run_module.PatientLoop = patched  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cohort(cfg, tmp_path / "run", progress=False)
    finally:
        run_module.PatientLoop = original  # type: ignore[assignment]
    assert (tmp_path / "run" / INCOMPLETE_MARKER).exists()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"] is False


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"controller": "magic"}, "controller"),
        ({"days": 0}, "days"),
        ({"control_period_min": 3, "cgm": CGMSpec(sample_period_min=5)}, "control_period_min"),
    ],
)
def test_bad_loop_config_names_the_field(kwargs, field):
    with pytest.raises(LoopConfigError, match=field):
        LoopConfig(**kwargs)


def test_cli_run_prints_the_summary_and_the_run_directory(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--patient", "adult#001", "--controller", "pid", "--out", str(out)]
    args += ["--placement", "inline"]
    assert main([*args, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "adult#001" in text and "TIR%" in text and str(out) in text
    assert main(["run", "--controller", "magic", "--placement", "inline", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "basal-bolus, pid" in err and "Traceback" not in err


def test_wall_clock_mode_paces_ticks_and_records_lateness(tmp_path):
    cfg = LoopConfig(patients=("adult#001",), clock="wall", wall_s_per_sim_min=0.001)
    t0 = time.perf_counter()
    run_dir, summary = run_cohort(cfg, tmp_path / "wall", progress=False)
    elapsed = time.perf_counter() - t0
    ticks = _table(run_dir, "clock->ticks")
    assert len(ticks["lateness_ms"]) == 288
    assert min(ticks["lateness_ms"]) >= 0.0
    assert summary["tick_lateness_ms"]["ticks"] == 288
    # paced: the last tick is scheduled 1435 sim-min × 1 ms after the start
    assert elapsed >= 1.435
    sim_bg = _table(run_cohort(LoopConfig(patients=("adult#001",)), tmp_path / "sim",
                               progress=False)[0], "plant->sensor")["bg_mg_dl"]  # fmt: skip
    assert _table(run_dir, "plant->sensor")["bg_mg_dl"] == sim_bg  # same trajectory


def test_a_failing_supervisor_or_pump_falls_back_to_the_scheduled_basal():
    p = get_patient("adult#006")
    loop = PatientLoop(p, LoopConfig(patients=(p.name,)), np.random.default_rng(4))

    def broken(*args):
        raise RuntimeError("supervisor bug")

    loop.supervisor.tick = broken  # type: ignore[method-assign]
    loop.actuator.actuate = broken  # type: ignore[method-assign]
    faults, delivered = [], []
    loop.channels["runtime->faults"].listen(lambda _, m: faults.append(m))
    loop.channels["actuator->plant"].listen(lambda _, m: delivered.append(m))
    for _ in range(12):
        loop.tick()
    assert {f.agent for f in faults} == {"supervisor", "actuator"}
    assert all(d.bolus_u == 0.0 for d in delivered)
    rate = loop.actuator.scheduled_basal_u_per_h / 60
    assert all(d.basal_u == pytest.approx(rate) for d in delivered)


def test_cli_run_reads_a_yaml_config_and_command_line_options_win(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "patient: [child#001]\ndays: 1\ncontroller: pid\nplacement: inline\nseed: 3\n"
        f"out: {tmp_path / 'from_yaml'}\n"
    )
    assert main(["run", "--config", str(cfg), "--controller", "basal-bolus", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "from_yaml" / "manifest.json").read_text())
    assert manifest["config"]["patients"] == ["child#001"]
    assert manifest["config"]["controller"] == "basal-bolus"  # the command line wins
    assert manifest["config"]["seed"] == 3 and manifest["config"]["placement"] == "inline"
    capsys.readouterr()
    cfg.write_text("patients: [child#001]\nspeed: 3\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'speed'" in err and "controller" in err and "Traceback" not in err
    cfg.write_text("days: two\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 2
    assert "--days='two' is not allowed: an integer from 1 to 3650" in capsys.readouterr().err


def test_a_controller_overrunning_its_deadline_is_treated_as_missing():
    class Slow:
        def decide(self, obs):
            if 100 <= obs.t_min < 115:
                time.sleep(0.05)
            return Dose(5.0, 0.0)

    p = get_patient("adult#003")
    cfg = LoopConfig(patients=(p.name,), controller_deadline_s=0.01)
    loop = PatientLoop(p, cfg, np.random.default_rng(5), Slow())
    faults, overrides = [], []
    loop.channels["runtime->faults"].listen(lambda _, m: faults.append(m))
    loop.channels["supervisor->overrides"].listen(lambda _, m: overrides.append(m))
    for _ in range(30):
        loop.tick()
    assert [f.t_min for f in faults] == [100.0, 105.0, 110.0]
    assert all("deadline" in f.error for f in faults)
    missing = [o.t_min for o in overrides if o.reason.startswith("no command")]
    assert missing == [100.0, 105.0, 110.0]
