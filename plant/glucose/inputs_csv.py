"""Replay per-minute insulin and meal inputs on virtual patients: the CSV formats around simulate().

``inputs.csv`` has the columns ``minute,insulin_u_per_min,meal_g`` and optionally ``patient``:

* ``minute`` — integer minutes 0, 1, 2, … with no gap (per patient when ``patient`` is given);
* ``insulin_u_per_min`` — insulin rate held over ``[minute, minute+1)`` in U/min (a bolus of B
  units given within one minute is a rate of B U/min), ≥ 0;
* ``meal_g`` — grams of carbohydrate of a meal that *starts* at that minute (eaten at the
  eat rate, 5 g/min by default), ≥ 0;
* ``patient`` — optional: the patient these inputs belong to; without it the same inputs apply
  to every patient replayed.

The output has one row per patient and minute (minute 0 … K): ``patient, minute, clock,
bg_mg_dl`` (plasma glucose), ``gsub_mg_dl`` (subcutaneous glucose), ``insulin_u_per_min`` and
``carbs_g`` (grams swallowed over ``[minute, minute+1)``); the inputs of the last row are empty.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import TextIO

import numpy as np
from numpy.typing import NDArray

from twinloop.limits import MAX_LOG_BYTES, InputLimitError, check_file
from twinloop.plant.errors import InvalidInputError
from twinloop.plant.glucose.scenarios import MIN_PER_DAY
from twinloop.plant.glucose.uva_padova import Trajectory

REQUIRED_COLUMNS = ("minute", "insulin_u_per_min", "meal_g")

#: Most minutes per patient an inputs file may hold (one year); the file is at most
#: :data:`twinloop.limits.MAX_LOG_BYTES` bytes.
MAX_INPUT_MINUTES = 366 * MIN_PER_DAY


@dataclasses.dataclass(frozen=True)
class ReplayInputs:
    """Per-minute inputs of one patient (or of every patient when ``patient`` is ``None``)."""

    patient: str | None
    insulin_u_per_min: NDArray[np.float64]
    meal_g: NDArray[np.float64]


def _number(path: Path, row: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(
            f"{path}: row {row}, column {column!r}: {text!r} is not a number"
        ) from None
    if math.isnan(value) or math.isinf(value):
        raise InvalidInputError(f"{path}: row {row}, column {column!r}: {text!r} is not finite")
    return value


def read_inputs_csv(path: str | Path) -> dict[str | None, ReplayInputs]:
    """Read and validate ``inputs.csv``; rows are the file's line numbers (the header is 1).

    Returns:
        Inputs keyed by patient name, or by ``None`` when the file has no ``patient`` column.

    Raises:
        InvalidInputError: missing column, non-numeric/NaN/negative value, or a minute out of
            sequence; the message names the row and the column.

    """
    path = Path(path)
    try:
        check_file(path, MAX_LOG_BYTES)
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _read_inputs(path, handle)
    except InputLimitError as exc:
        raise InvalidInputError(str(exc)) from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise InvalidInputError(f"{path}: malformed CSV: {exc}") from None


def _read_inputs(path: Path, handle: TextIO) -> dict[str | None, ReplayInputs]:
    reader = csv.DictReader(handle)
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InvalidInputError(
            f"{path}: missing column(s) {', '.join(missing)}; the header is "
            f"{','.join(header) or '(empty)'} and must contain {','.join(REQUIRED_COLUMNS)}"
            " (and optionally patient)"
        )
    reader.fieldnames = header
    has_patient = "patient" in header
    series: dict[str | None, tuple[list[float], list[float]]] = {}
    for row in reader:
        row_no = reader.line_num  # the file's line number (blank lines counted)
        if row.get(None):
            raise InvalidInputError(
                f"{path}: row {row_no}: {len(header) + len(row[None])} fields "
                f"but the header has {len(header)}"
            )
        key = (row.get("patient") or "").strip() if has_patient else None
        if has_patient and not key:
            raise InvalidInputError(f"{path}: row {row_no}, column 'patient': empty")
        values = {}
        for column in REQUIRED_COLUMNS:
            text = row.get(column)
            if text is None or text.strip() == "":
                raise InvalidInputError(f"{path}: row {row_no}, column {column!r}: empty")
            values[column] = _number(path, row_no, column, text.strip())
        ins, meals = series.setdefault(key, ([], []))
        expected = len(ins)
        if expected >= MAX_INPUT_MINUTES:
            raise InvalidInputError(
                f"{path}: row {row_no}, column 'minute': more than {MAX_INPUT_MINUTES} minutes "
                f"(one year){f' for patient {key}' if key else ''}"
            )
        if values["minute"] != expected:
            raise InvalidInputError(
                f"{path}: row {row_no}, column 'minute': {values['minute']:g} but minute "
                f"{expected} was expected{f' for patient {key}' if key else ''} "
                "(minutes start at 0 and go up by 1)"
            )
        for column in ("insulin_u_per_min", "meal_g"):
            if values[column] < 0:
                raise InvalidInputError(
                    f"{path}: row {row_no}, column {column!r}: {values[column]:g} is negative"
                )
        ins.append(values["insulin_u_per_min"])
        meals.append(values["meal_g"])
    if not series:
        raise InvalidInputError(f"{path}: no input rows")
    return {
        key: ReplayInputs(key, np.array(ins, dtype=np.float64), np.array(meals, dtype=np.float64))
        for key, (ins, meals) in series.items()
    }


def clock_label(minute: int, start_min: int) -> str:
    """``HH:MM`` clock time of a minute of the run, for a run starting at ``start_min``."""
    t = (start_min + minute) % MIN_PER_DAY
    return f"{t // 60:02d}:{t % 60:02d}"


def write_trajectory_csv(path: str | Path, trajectory: Trajectory, *, start_min: int = 0) -> None:
    """Write a :class:`~.uva_padova.Trajectory` as one row per patient and minute."""
    try:
        handle = Path(path).open("w", newline="")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    n, k1 = trajectory.bg_mg_dl.shape
    with handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["patient", "minute", "clock", "bg_mg_dl", "gsub_mg_dl", "insulin_u_per_min", "carbs_g"]
        )
        clocks = [clock_label(m, start_min) for m in range(k1)]
        for i in range(n):
            name = trajectory.patients[i]
            bg = trajectory.bg_mg_dl[i]
            gs = trajectory.gsub_mg_dl[i]
            ins = trajectory.insulin_u_per_min[i]
            carbs = trajectory.carbs_g_per_min[i]
            writer.writerows(
                [
                    name,
                    m,
                    clocks[m],
                    f"{bg[m]:.6f}",
                    f"{gs[m]:.6f}",
                    f"{ins[m]:.9g}" if m < k1 - 1 else "",
                    f"{carbs[m]:.9g}" if m < k1 - 1 else "",
                ]
                for m in range(k1)
            )
