"""The glucose therapy's evaluation part: :mod:`twinloop.evaluation.glucose.evaluate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twinloop.evaluation.glucose import evaluate as _evaluation


class GlucoseEvaluation:
    """Controllers × cohorts × seeds on the UVA/Padova patients (``t1d-standard``)."""

    default_protocol = _evaluation.DEFAULT_PROTOCOL

    def shipped_protocols(self) -> tuple[str, ...]:
        """The protocols in ``evaluation/glucose/protocols``."""
        return _evaluation.shipped_protocols()

    def load_protocol(self, protocol: str | Path | None) -> Any:
        """:func:`twinloop.evaluation.glucose.evaluate.load_protocol`."""
        return _evaluation.load_protocol(protocol)

    def check_controllers(self, controllers: Sequence[str]) -> None:
        """:func:`twinloop.evaluation.glucose.evaluate.check_controllers`."""
        _evaluation.check_controllers(list(controllers))

    def evaluate(
        self, controllers: Sequence[str], protocol: Any, out: str | Path, **kw: Any
    ) -> Any:
        """:func:`twinloop.evaluation.glucose.evaluate.evaluate`."""
        return _evaluation.evaluate(list(controllers), protocol, out, **kw)

    def policy_loop_metrics(self, policy_dir: str | Path, *args: Any, **kw: Any) -> Any:
        """:func:`twinloop.evaluation.glucose.evaluate.policy_loop_metrics`."""
        return _evaluation.policy_loop_metrics(policy_dir, *args, **kw)

    def check_doc(self, path: str) -> None:
        """:func:`twinloop.evaluation.glucose.evaluate.check_doc`."""
        _evaluation.check_doc(path)

    def update_doc(self, path: str, table: str, *, command: str, wall_time_s: float) -> None:
        """:func:`twinloop.evaluation.glucose.evaluate.update_doc`."""
        _evaluation.update_doc(path, table, command=command, wall_time_s=wall_time_s)


PART = GlucoseEvaluation()
