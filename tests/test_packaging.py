"""The wheel as a user installs it: built from the repository, installed without extras into a
fresh virtual environment outside the checkout, its ``twinloop`` command run from elsewhere.

The test runs offline (``scripts/offline.sh``), so the fresh environment cannot get twinloop's
dependencies from the package index. It gets exactly the distributions of twinloop's base
``Requires-Dist`` closure (no extras) from this test environment instead: their top-level
packages and ``.dist-info`` directories, linked into one directory that a ``.pth`` file of the
fresh environment puts on ``sys.path``. Nothing else of this environment (ray,
stable-baselines3, torch, tensorboard, pytest, the editable twinloop) is visible there, and
``pip check`` in the fresh environment proves the closure satisfies every requirement.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

#: The layer folders at the repository's root; in the wheel they exist only under twinloop/.
LAYERS = ("plant", "policies", "agents", "hw_bridge", "hil", "campaigns", "evaluation", "twins")
#: Distributions that only extras (or the test setup) bring; none may reach the fresh venv.
EXTRA_ONLY = ("ray", "stable-baselines3", "torch", "tensorboard")
#: Package data the wheel must ship (paths inside it).
PACKAGE_DATA = (
    "twinloop/py.typed",
    "twinloop/plant/glucose/data/uva_padova_2008/vpatient_params.csv",
    "twinloop/plant/glucose/data/uva_padova_2008/Quest.csv",
    "twinloop/plant/glucose/data/uva_padova_2008/pump_params.csv",
    "twinloop/plant/glucose/data/uva_padova_2008/sensor_params.csv",
    "twinloop/plant/glucose/data/uva_padova_2008/LICENSE_simglucose_MIT.txt",
    "twinloop/campaigns/specs/glucose_smoke.yaml",
    "twinloop/evaluation/glucose/protocols/t1d-standard.yaml",
    "twinloop/hw_bridge/profiles/insulin_pump_tcp.yaml",
    "twinloop/twins/data/example_logs/pump_export.csv",
    "twinloop/twins/data/example_logs/nightscout/entries.json",
    "twinloop/policies/configs/t1d_ppo.yaml",
    "twinloop/policies/shipped/t1d_ppo/seed_0/policy.json",
    "twinloop/policies/shipped/t1d_ppo/seed_0/policy.pt",
    "twinloop/policies/shipped/knee_sac/seed_0/policy.json",
    "twinloop/policies/shipped/knee_sac/seed_0/policy.pt",
)
#: Data folders of the source tree whose every file must be in the wheel (source → wheel).
DATA_FOLDERS = (
    "plant/glucose/data",
    "campaigns/specs",
    "evaluation/glucose/protocols",
    "hw_bridge/profiles",
    "twins/data",
    "policies/configs",
    "policies/shipped",
)
VERSION = metadata.version("twinloop")
DIST_INFO = f"twinloop-{VERSION}.dist-info"
#: What the source copy leaves out at the root (environments, VCS, caches, build output,
#: recordings) and anywhere (bytecode and Numba caches).
ROOT_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", ".*_cache", ".hypothesis", "runs"
)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")


def _ignored(folder: str, names: list[str]) -> set[str]:
    root = Path(folder) == REPO
    return set(IGNORED(folder, names)) | (set(ROOT_IGNORED(folder, names)) if root else set())


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_closure() -> dict[str, metadata.Distribution]:
    """twinloop's base requirements (no extras of twinloop) and theirs, as installed here."""
    found: dict[str, metadata.Distribution] = {}
    extras_of: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [("twinloop", frozenset())]
    while todo:
        name, extras = todo.pop()
        key = _key(name)
        if key in extras_of and extras <= extras_of[key]:
            continue
        extras_of.setdefault(key, set()).update(extras)
        dist = metadata.distribution(name)
        found[key] = dist
        envs = [{"extra": e} for e in ("", *sorted(extras_of[key]))]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    del found["twinloop"]  # the wheel brings it
    return found


def top_level(dist: metadata.Distribution) -> set[str]:
    """The names a distribution installed directly in site-packages (packages, modules,
    ``.libs`` folders, its ``.dist-info``)."""
    names = {
        f.parts[0]
        for f in dist.files or []
        if f.parts and f.parts[0] not in ("..", "__pycache__") and not f.name.endswith(".pth")
    }
    if not names:
        raise AssertionError(f"{dist.metadata['Name']} has no RECORD; cannot expose it")
    return names


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def site_packages(venv: Path, cwd: Path, env: dict[str, str]) -> str:
    """The fresh venv's site-packages."""
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return ok(run([venv / "bin" / "python", "-c", code], cwd=cwd, env=env)).stdout.strip()


@pytest.fixture(scope="module")
def clean_env() -> dict[str, str]:
    """This environment without anything that would point Python at the checkout or this venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_NO_INDEX"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> Path:
    """The wheel, built offline without build isolation from a copy of the source tree (so the
    checkout gets no build/ or stale build output that would leak into the wheel)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=_ignored)
    out = base / "dist"
    ok(
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", out, source],
            cwd=base, env=clean_env,
        )
    )  # fmt: skip
    (found,) = out.glob("twinloop-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path, clean_env: dict[str, str]) -> Path:
    """A fresh venv outside the checkout with the wheel and exactly its base dependencies."""
    base = tmp_path_factory.mktemp("venv")
    root = base / "venv"
    ok(run([sys.executable, "-m", "venv", "--without-pip", root], cwd=base, env=clean_env))
    python = root / "bin" / "python"
    site = Path(site_packages(root, base, clean_env))
    deps = base / "deps"
    deps.mkdir()
    for dist in base_closure().values():
        origin = Path(str(dist.locate_file("")))
        for name in top_level(dist):
            if not (deps / name).is_symlink():  # a folder two distributions share: once
                (deps / name).symlink_to(origin / name)
    (site / "twinloop_test_deps.pth").write_text(f"{deps}\n")
    # this venv's pip installs into the fresh one (--python): no ensurepip, no index
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python]
    ok(run([*pip, "install", "--no-deps", "--no-index", wheel], cwd=base, env=clean_env))
    ok(run([*pip, "check"], cwd=base, env=clean_env))
    return root


def test_wheel_holds_one_package_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"twinloop", DIST_INFO}, tops
    for layer in LAYERS:
        assert f"twinloop/{layer}/__init__.py" in names, layer
    assert "twinloop/cli/main.py" in names
    missing = [p for p in PACKAGE_DATA if p not in names]
    assert not missing, missing
    shipped = [
        f"twinloop/{p.relative_to(REPO).as_posix()}"
        for folder in DATA_FOLDERS
        for p in (REPO / folder).rglob("*")
        if p.is_file()
    ]
    assert not [p for p in shipped if p not in names]
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".nbi", ".nbc"))]
    meta = zipfile.ZipFile(wheel).read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "twinloop = twinloop.cli.main:main" in meta


def test_fresh_venv_has_no_extras_and_not_the_checkout(
    venv: Path, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    python = venv / "bin" / "python"
    probe = (
        "import importlib.util as u, json, sys, twinloop.plant, twinloop.cli.main as m\n"
        "print(json.dumps({'plant': twinloop.plant.__file__, 'cli': m.__file__,\n"
        "  'missing': [n for n in ('ray', 'stable_baselines3', 'torch', 'tensorboard',\n"
        "    'pytest') if u.find_spec(n) is None], 'path': sys.path}))"
    )
    info = json.loads(ok(run([python, "-c", probe], cwd=tmp_path, env=clean_env)).stdout)
    site = Path(site_packages(venv, tmp_path, clean_env)).resolve()
    for key in ("plant", "cli"):
        path = Path(info[key]).resolve()
        assert path.is_relative_to(site), path
        assert not path.is_relative_to(REPO), path
    assert not [p for p in info["path"] if p and Path(p).resolve().is_relative_to(REPO)]
    assert info["missing"] == ["ray", "stable_baselines3", "torch", "tensorboard", "pytest"]
    for name in ("ray", "stable_baselines3"):
        proc = run([python, "-c", f"import {name}"], cwd=tmp_path, env=clean_env)
        assert proc.returncode != 0, proc.stdout
        assert f"ModuleNotFoundError: No module named '{name}'" in proc.stderr, proc.stderr
    exposed = {_key(d) for d in base_closure()}
    assert not exposed & set(EXTRA_ONLY)


def test_twinloop_commands_from_another_directory(
    venv: Path, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    twinloop = venv / "bin" / "twinloop"

    def tl(*args: str) -> subprocess.CompletedProcess:
        return run([twinloop, *args], cwd=elsewhere, env=clean_env)

    assert ok(tl("--version")).stdout.strip() == f"twinloop {VERSION}"

    proc = ok(
        tl("run", "--placement", "inline", "--days", "1", "--patient", "adult#001",
           "--no-progress", "--out", "run1")
    )  # fmt: skip
    table = proc.stdout.splitlines()
    assert any(line.split()[:1] == ["patient"] and "TIR%" in line for line in table), proc.stdout
    assert any(line.startswith("adult#001 ") for line in table), proc.stdout
    assert "recording: run1" in proc.stdout, proc.stdout
    out = elsewhere / "run1"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert len(list(out.rglob("*.parquet"))) == len(manifest["channels"]) > 0

    proc = ok(tl("campaign", "--faults"))
    assert "missing_data" in proc.stdout and "duplicated_write" in proc.stdout, proc.stdout

    def refused(proc: subprocess.CompletedProcess, extra: str, module: str) -> None:
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"pip install 'twinloop[{extra}]'" in lines[0], proc.stderr
        assert module in lines[0], proc.stderr

    # a small run's default placement (auto) is inline: it needs no Ray
    proc = ok(tl("run", "--patient", "adult#001", "--days", "1", "--no-progress", "--out", "run3"))
    assert "placement inline" in proc.stdout, proc.stdout
    # the ray placement asked for: agents.placement.start_ray asks for the ray extra
    refused(
        tl("run", "--placement", "ray", "--patient", "adult#001", "--days", "1", "--no-progress"),
        "ray",
        "Ray",
    )
    # a saved policy as controller: policies.glucose.learned imports stable_baselines3 (features)
    site = Path(site_packages(venv, elsewhere, clean_env))
    policy = site / "twinloop" / "policies" / "shipped" / "t1d_ppo" / "seed_0"
    assert (policy / "policy.pt").is_file()
    proc = tl("run", "--placement", "inline", "--patient", "adult#001", "--days", "1",
              "--no-progress", "--controller", f"policy:{policy}", "--out", "run2")  # fmt: skip
    refused(proc, "rl", "stable_baselines3 is not installed")
    # twinloop train of a shipped config: policies.training imports stable_baselines3
    config = site / "twinloop" / "policies" / "configs" / "t1d_ppo.yaml"
    refused(
        tl("train", str(config), "--out", "trained"), "rl", "stable_baselines3 is not installed"
    )
