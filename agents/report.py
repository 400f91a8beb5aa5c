"""What every therapy's report of a recorded run shares: the recording's errors and its manifest.

A run directory (:mod:`twinloop.agents.recording`) holds ``manifest.json`` (written last, with
``"complete"``), ``summary.json`` and ``channels/*.parquet``; an interrupted run keeps the
``INCOMPLETE`` marker. :func:`check_complete` reads the manifest and refuses an incomplete run
unless asked; :func:`recording_therapy` says which therapy recorded it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twinloop.agents.errors import AgentError
from twinloop.agents.recording import INCOMPLETE_MARKER

MANIFEST_FILE = "manifest.json"

#: The therapy of a recording whose manifest names none (recordings made before therapies
#: were named in manifests were glucose runs).
LEGACY_THERAPY = "glucose"


class ReportError(AgentError):
    """Base class of the errors raised while reporting a recorded run."""


class IncompleteRunError(ReportError, RuntimeError):
    """The run was interrupted or is still being written; its recording may end early.

    Attributes:
        run_dir: the run directory.
        why: what marks it incomplete.

    """

    def __init__(self, run_dir: Path, why: str) -> None:
        self.run_dir = run_dir
        self.why = why
        super().__init__(
            f"{run_dir}: the run is incomplete ({why}); its recording may stop early. "
            "Report it anyway with allow_incomplete=True (CLI: --allow-incomplete)"
        )


class MissingRecordingFileError(ReportError, FileNotFoundError):
    """A file the report needs is not in the run directory.

    Attributes:
        path: the missing file (or directory).
        what: what that file holds.

    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        super().__init__(f"{path}: missing ({what})")


class CorruptRecordingError(ReportError, ValueError):
    """A file of the recording cannot be read or does not hold what a recording holds.

    Attributes:
        path: the file.
        problem: what is wrong with it.

    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` names it in errors)."""
    if not path.is_file():
        raise MissingRecordingFileError(path, what)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecordingError(path, f"not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptRecordingError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def check_complete(run_dir: Path, *, allow_incomplete: bool) -> tuple[dict[str, Any] | None, bool]:
    """The manifest (``None`` if an interrupted run has none) and whether the run is complete."""
    if not run_dir.is_dir():
        raise MissingRecordingFileError(run_dir, "run directory")
    marker = (run_dir / INCOMPLETE_MARKER).exists()
    manifest_path = run_dir / MANIFEST_FILE
    why: list[str] = []
    manifest: dict[str, Any] | None = None
    if manifest_path.is_file() or not marker:
        manifest = read_json(manifest_path, "manifest of the run")
        if manifest.get("complete") is not True:
            why.append(f"{MANIFEST_FILE} says complete={manifest.get('complete')!r}")
    else:
        why.append(f"no {MANIFEST_FILE}")
    if marker:
        why.append(f"the {INCOMPLETE_MARKER} marker is present")
    if why and not allow_incomplete:
        raise IncompleteRunError(run_dir, "; ".join(why))
    return manifest, not why


def recording_therapy(manifest: dict[str, Any] | None) -> str:
    """The therapy that made a recording, from its manifest (``config.therapy``)."""
    config = (manifest or {}).get("config", {})
    therapy = config.get("therapy") if isinstance(config, dict) else None
    return therapy if isinstance(therapy, str) and therapy else LEGACY_THERAPY


def is_rig_recording(manifest: dict[str, Any] | None) -> bool:
    """Whether a recording is a HIL rig's session (its manifest's config has ``rig``)."""
    config = (manifest or {}).get("config", {})
    return isinstance(config, dict) and "rig" in config
