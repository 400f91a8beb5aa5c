"""scripts/install.sh reinstalls only what changed (its stamps), with a stand-in Python.

The stand-in ``.venv/bin/python`` records each call and succeeds, so the test sees which steps
the script ran — ``pip install`` and the numba warm-up — without installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in
  *"sys.version"*) echo "3.11.fake" ;;
  *"pip install"*) [ -e "$(dirname "$0")/../pip-fails" ] && exit 1 ;;
  *"cli.warmup"*) [ -e "$(dirname "$0")/../warmup-fails" ] && exit 1 ;;
esac
exit 0
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A minimal clone: the install scripts, the dependency files, one kernel source, a venv."""
    (tmp_path / "scripts").mkdir()
    for name in ("install.sh", "stamp.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "kernel.py").write_text("@numba.njit(cache=True)\ndef f(): pass\n")
    (tmp_path / "plant" / "other.py").write_text("x = 1\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    site = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / "numpy-2.1.0.dist-info").mkdir()
    return tmp_path


def install(clone: Path, **env: str) -> tuple[bool, bool]:
    """Run install.sh; return (pip ran, warm-up ran)."""
    log = clone / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    subprocess.run(
        ["sh", "scripts/install.sh"],
        cwd=clone,
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    calls = log.read_text() if log.exists() else ""
    return "-m pip install" in calls, "-m twinloop.cli.warmup" in calls


def test_a_fresh_venv_installs_and_warms_then_an_up_to_date_one_does_nothing(clone: Path) -> None:
    assert install(clone) == (True, True)
    assert (clone / ".venv" / "install.stamp").is_file()
    assert (clone / ".venv" / "warm.stamp").is_file()
    assert install(clone) == (False, False)
    assert install(clone) == (False, False)


@pytest.mark.parametrize("name", ["pyproject.toml", "constraints.txt"])
def test_a_changed_dependency_file_reinstalls_and_rewarms(clone: Path, name: str) -> None:
    install(clone)
    with (clone / name).open("a") as f:
        f.write("\n# changed\n")
    assert install(clone) == (True, True)
    assert install(clone) == (False, False)


def test_a_distribution_added_or_removed_by_hand_reinstalls(clone: Path) -> None:
    site = clone / ".venv" / "lib" / "python3.11" / "site-packages"
    install(clone)
    (site / "numpy-2.1.0.dist-info").rename(site / "numpy-2.2.0.dist-info")
    assert install(clone)[0]
    install(clone)
    (site / "numpy-2.2.0.dist-info").rmdir()
    assert install(clone)[0]


def test_a_changed_kernel_source_rewarms_without_reinstalling(clone: Path) -> None:
    install(clone)
    (clone / "plant" / "other.py").write_text("x = 2\n")  # no kernel in it: nothing to do
    assert install(clone) == (False, False)
    with (clone / "plant" / "kernel.py").open("a") as f:
        f.write("# changed\n")
    assert install(clone) == (False, True)
    (clone / "plant" / "new_kernel.py").write_text("@numba.njit(cache=True)\ndef g(): pass\n")
    assert install(clone) == (False, True)
    assert install(clone) == (False, False)


def test_reinstall_is_forced_by_the_environment(clone: Path) -> None:
    install(clone)
    assert install(clone, TWINLOOP_REINSTALL="1") == (True, True)


def test_a_failed_pip_install_writes_no_stamp_and_is_retried(clone: Path) -> None:
    install(clone)
    with (clone / "constraints.txt").open("a") as f:
        f.write("\n# changed\n")
    (clone / ".venv" / "pip-fails").touch()
    failed = subprocess.run(["sh", "scripts/install.sh"], cwd=clone, capture_output=True)
    assert failed.returncode == 1
    assert b"pip install failed" in failed.stderr
    assert not (clone / ".venv" / "install.stamp").exists()
    (clone / ".venv" / "pip-fails").unlink()
    assert install(clone) == (True, True)


def test_a_failed_warm_up_does_not_fail_the_install_and_is_retried(clone: Path) -> None:
    (clone / ".venv" / "warmup-fails").touch()
    assert install(clone) == (True, True)  # exit status 0 (check=True)
    assert not (clone / ".venv" / "warm.stamp").exists()
    (clone / ".venv" / "warmup-fails").unlink()
    assert install(clone) == (False, True)
    assert install(clone) == (False, False)
