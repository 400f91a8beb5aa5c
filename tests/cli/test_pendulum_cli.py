"""``twinloop pendulum``: table and files hold run_pendulum's values, judged by the norms."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from twinloop.cli.main import main
from twinloop.plant.knee.model import PRESETS
from twinloop.plant.knee.pendulum import PendulumConfig, PendulumMetrics, run_pendulum
from twinloop.plant.knee.pendulum_norms import (
    HEALTHY_PEAK_VELOCITY_NORM,
    HEALTHY_R2_NORM,
    PRESET_NORMS,
    STROKE_R2N_NORM,
    norms_for,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(out: str) -> dict[str, list[str]]:
    """The table's rows by preset: the cells split on blanks (the verdict may hold blanks)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in PRESETS and not line.startswith(" "):
            rows[cells[0]] = cells
    return rows


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "—"


def _expected_verdict(preset: str, m: PendulumMetrics) -> str:
    outside = [n.label for n in norms_for(preset) if not n.inside(getattr(m, n.measure))]
    return "inside" if not outside else f"outside ({', '.join(outside)})"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["pendulum", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "config"),
    [
        ((), {}),
        (
            ("--patient", "severe", "--patient", "healthy", "--hip-deg", "90", "--drive",
             "attached", "--duration-s", "8", "--release-deg", "5", "--swing-threshold-deg", "2"),
            {"hip_flexion_deg": 90.0, "drive_attached": True, "duration_s": 8.0,
             "release_angle_deg": 5.0, "swing_threshold_deg": 2.0},
        ),
    ],
    ids=["defaults", "every-option"],
)  # fmt: skip
def test_the_table_holds_run_pendulums_values_and_the_norms_verdicts(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], config: dict[str, object]
) -> None:
    out = _run(capsys, *argv)
    presets = [a for flag, a in itertools.pairwise(argv) if flag == "--patient"]
    presets = presets or list(PRESETS)
    expected = run_pendulum([PendulumConfig(preset=p, **config) for p in presets])  # type: ignore[arg-type]
    rows = _rows(out)
    assert list(rows) == presets  # in the asked order; all four by default
    for p, m in zip(presets, expected, strict=True):
        assert rows[p][1:9] == [
            f"{m.first_swing_deg:.1f}",
            f"{m.plateau_deg:.1f}",
            f"{m.relaxation_index:.3f}",
            f"{m.relaxation_index_normalised:.3f}",
            str(m.swings),
            f"{m.peak_velocity_deg_s:.0f}",
            _num(m.period_s, ".3f"),
            "yes" if m.settled else "no",
        ]
        assert " ".join(rows[p][9:]) == _expected_verdict(p, m)
    # each row's norms, one line per measure, with its range and the study's short name
    for p, m in zip(presets, expected, strict=True):
        for norm in norms_for(p):
            lines = [
                line for line in out.splitlines()
                if line.split()[:1] == [p] and line.startswith("  ") and norm.label in line
            ]  # fmt: skip
            assert len(lines) == 1, (p, norm.label, out)
            ok = norm.inside(getattr(m, norm.measure))
            assert lines[0].split(": ")[1].split()[0] == ("inside" if ok else "outside")
            assert norm.short in lines[0] and norm.setup in lines[0]


def test_the_json_file_holds_config_metrics_norms_and_the_png_is_a_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "pend"
    printed = _run(capsys, "--patient", "mild", "--patient", "healthy", "--out", str(out_dir))
    assert str(out_dir / "pendulum.json") in printed
    doc = json.loads((out_dir / "pendulum.json").read_text(encoding="utf-8"))
    configs = [PendulumConfig(preset="mild"), PendulumConfig(preset="healthy")]
    assert doc["setup"]["hip_flexion_deg"] == 0.0 and doc["setup"]["posture"] == "supine"
    assert doc["setup"]["drive"] == "detached" and doc["setup"]["notes"] == []
    for test, c, m in zip(doc["tests"], configs, run_pendulum(configs), strict=True):
        assert test["config"] == dataclasses.asdict(c)
        expected = {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in dataclasses.asdict(m).items()
        }
        assert test["metrics"] == expected  # JSON floats round-trip exactly
        norms = PRESET_NORMS[c.preset]
        assert [n["norm"] for n in test["norms"]] == [n.as_dict() for n in norms]
        for entry, norm in zip(test["norms"], norms, strict=True):
            assert entry["value"] == getattr(m, norm.measure)
            assert entry["inside"] == norm.inside(getattr(m, norm.measure))
            assert entry["norm"]["low"] == norm.mean - norm.n_sd * norm.sd
    assert (out_dir / "pendulum.png").read_bytes()[:8] == PNG_MAGIC
    assert (out_dir / "pendulum.png").stat().st_size > 10_000  # a drawn figure, not a stub


def test_json_prints_the_files_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    printed = _run(capsys, "--patient", "severe", "--duration-s", "6", "--json", "--out",
                   str(tmp_path / "p"))  # fmt: skip
    assert json.loads(printed) == json.loads((tmp_path / "p" / "pendulum.json").read_text())
    assert json.loads(printed)["tests"][0]["config"]["duration_s"] == 6.0


def test_the_verdict_flips_when_the_healthy_knee_sits_upright(
    capsys: pytest.CaptureFixture[str],
) -> None:
    supine, seated = run_pendulum([PendulumConfig(), PendulumConfig(hip_flexion_deg=90.0)])
    # the case the test is about: supine R2 inside the healthy norm, seated R2 beyond it
    assert HEALTHY_R2_NORM.inside(supine.relaxation_index)
    assert not HEALTHY_R2_NORM.inside(seated.relaxation_index)
    runs = {}
    for hip in ("0", "90"):
        runs[hip] = json.loads(_run(capsys, "--patient", "healthy", "--hip-deg", hip, "--json"))
    r2 = {h: d["tests"][0]["norms"][0] for h, d in runs.items()}
    assert r2["0"]["norm"]["label"] == r2["90"]["norm"]["label"] == "R2"
    assert (r2["0"]["inside"], r2["90"]["inside"]) == (True, False)
    assert r2["90"]["value"] == seated.relaxation_index
    assert runs["0"]["tests"][0]["verdict"] == _expected_verdict("healthy", supine)
    assert runs["90"]["tests"][0]["verdict"] == _expected_verdict("healthy", seated)
    assert "R2" in runs["90"]["tests"][0]["verdict"]
    # seated, the output says the healthy norm is a supine one
    assert any("supine" in note for note in runs["90"]["setup"]["notes"])
    table = _run(capsys, "--patient", "healthy", "--hip-deg", "90")
    assert (
        "note: the healthy norm was measured supine (hip 0°; the stroke norm's posture is not "
        "given); this test is at hip 90°" in table
    )
    assert " ".join(_rows(table)["healthy"][9:]) == _expected_verdict("healthy", seated)


def test_impaired_presets_are_judged_by_the_stroke_norm_and_healthy_by_kims() -> None:
    assert norms_for("healthy") == (HEALTHY_R2_NORM, HEALTHY_PEAK_VELOCITY_NORM)
    for name in ("mild", "moderate", "severe"):
        assert norms_for(name) == (STROKE_R2N_NORM,)
    assert set(PRESET_NORMS) == set(PRESETS)
    assert STROKE_R2N_NORM.inside(STROKE_R2N_NORM.high)
    assert not STROKE_R2N_NORM.inside(math.nextafter(STROKE_R2N_NORM.high, 2.0))
    assert not STROKE_R2N_NORM.inside(math.nan)
    # a plain bool for JSON, also for numpy inputs
    assert json.dumps(HEALTHY_R2_NORM.inside(np.float64(1.7))) == "true"


def test_a_release_at_the_resting_angle_says_r2_means_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (m,) = run_pendulum([PendulumConfig(preset="severe", duration_s=4.0)])
    rest = f"{m.plateau_deg:.2f}"  # released where the knee comes to rest
    doc = json.loads(
        _run(capsys, "--patient", "severe", "--duration-s", "4", "--release-deg", rest, "--json")
    )
    (test,) = doc["tests"]
    assert abs(test["metrics"]["plateau_deg"]) <= 1.0
    assert len(test["notes"]) == 1 and "means nothing" in test["notes"][0]
    assert test["verdict"].startswith("not judged")
    assert all(n["inside"] is None for n in test["norms"])
    table = _run(capsys, "--patient", "severe", "--duration-s", "4", "--release-deg", rest)
    assert "note: severe: the knee rests at A0" in table
    # released past the rest angle (the swing goes into extension, A0 < 0): not judged either
    doc = json.loads(
        _run(capsys, "--patient", "severe", "--duration-s", "4", "--release-deg", "80", "--json")
    )
    (past,) = doc["tests"]
    assert past["metrics"]["plateau_deg"] < 0
    assert past["verdict"].startswith("not judged") and past["notes"]
    # released from the horizontal, as in the clinic: no such note
    doc = json.loads(_run(capsys, "--patient", "severe", "--duration-s", "4", "--json"))
    assert doc["tests"][0]["notes"] == []


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (("--hip-deg", "120"), ("--hip-deg", "120", "-15 <= value <= 100")),
        (("--patient", "nobody"), ("--patient", "nobody", "healthy, mild, moderate, severe")),
        (("--duration-s", "0"), ("--duration-s", "0", "0 < value <= 120")),
        (("--duration-s", "0.5"), ("--duration-s", "0.5", "plateau window")),
        (("--release-deg", "90"), ("--release-deg", "90", "< 90")),
        (("--swing-threshold-deg", "0"), ("--swing-threshold-deg", "0", "> 0")),
        (("--hip-deg", "nan"), ("--hip-deg", "nan", "finite")),
        (("--drive", "loose"), ("--drive", "loose", "detached")),
    ],
    ids=["hip", "patient", "duration-0", "duration-short", "release", "threshold", "nan", "drive"],
)
def test_bad_input_exits_2_with_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    code: object
    try:
        code = main(["pendulum", *argv])
    except SystemExit as exc:  # argparse's own refusals (type, choices) exit too
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    error = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith("twinloop pendulum: error: ")
    for needle in needles:
        assert needle in error[0]


def test_out_onto_an_earlier_output_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "p"
    _run(capsys, "--patient", "severe", "--duration-s", "3", "--out", str(out_dir))
    assert main(["pendulum", "--patient", "mild", "--duration-s", "3", "--out", str(out_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # refused before anything ran: the earlier file is untouched
    assert json.loads((out_dir / "pendulum.json").read_text())["tests"][0]["config"]["preset"] == (
        "severe"
    )
    _run(capsys, "--patient", "mild", "--duration-s", "3", "--out", str(out_dir), "--overwrite")
    assert json.loads((out_dir / "pendulum.json").read_text())["tests"][0]["config"]["preset"] == (
        "mild"
    )
