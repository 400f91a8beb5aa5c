"""Clinical evaluation during training: the policy in the loop, behind the supervisor.

:class:`ClinicalEvalCallback` is an SB3 callback. Every ``eval.freq`` environment steps (and
once at the end of training) it saves the current policy the way ``twinloop train`` saves one
(``policy.pt`` + ``policy.json``, with the frozen ``VecNormalize`` statistics when the config
normalises), runs it as ``--controller policy:DIR`` in the closed loop on a fixed held-out set of
patients and seeds — exactly as ``twinloop evaluate`` runs a policy (the loop's CGM, pump, twin
and safety supervisor; :func:`twinloop.evaluation.glucose.evaluate.policy_loop_metrics`, reached
through the therapy registry's evaluation part) — and logs to
TensorBoard (means over the patient-runs):

* ``clinical/time_in_range_pct`` — plasma glucose 70–180 mg/dL, %;
* ``clinical/time_below_70_pct``, ``clinical/time_below_54_pct``, %;
* ``clinical/supervisor_overrides`` — the supervisor's overrides per patient-day;
* ``clinical/score`` — the selection criterion (:func:`clinical_score`).

The best policy by :func:`clinical_score` is kept in ``<seed dir>/best/`` (``policy.pt``,
``policy.json``, ``clinical.json`` with its metrics and step); every evaluation is appended to
``<seed dir>/evaluations.json``.

The criterion: maximise time in range subject to time below 54 mg/dL ≤ ``eval.tbr54_limit_pct``
(default 1 %, the international consensus target; Battelino et al. 2019). As a single number:
``score = TIR − 100 · max(0, TBR54 − limit)``: feasible policies rank by TIR, and one above the
limit loses 1 point of score per 0.01 % over it, so it ranks below every feasible policy with a
TIR within that margin.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from twinloop.limits import MAX_SEED
from twinloop.policies.errors import PolicyConfigError, config_section

#: Keys of the ``eval`` section of a ``twinloop/T1D-v0`` training config.
EVAL_KEYS = ("freq", "patients", "seeds", "days", "tbr54_limit_pct")
#: Held-out seeds by default: loop seeds no training run uses for its env (the env's own seed
#: stream differs anyway: these are the loop's meals, counting errors and CGM noise).
DEFAULT_EVAL_SEEDS = (1_000_003,)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The ``eval`` section: when and on what the clinical evaluation runs.

    Attributes:
        freq: environment steps between evaluations (0: none, not even at the end).
        patients: patient and cohort names of the held-out runs (``None``: the training
            patients, ``env.patients``).
        seeds: loop seeds of the held-out runs (one run of every patient per seed).
        days: simulated days per run.
        tbr54_limit_pct: the criterion's limit on time below 54 mg/dL, %.

    """

    freq: int = 250_000
    patients: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = DEFAULT_EVAL_SEEDS
    days: int = 1
    tbr54_limit_pct: float = 1.0

    @classmethod
    def parse(cls, value: object) -> EvalSettings:
        """From YAML ``eval`` (absent: the defaults; ``false``: off)."""
        from twinloop.policies.training import int_field

        if value is None or value is True:
            return cls()
        if value is False:
            return cls(freq=0)
        value = config_section("eval", value, EVAL_KEYS)
        kwargs: dict[str, Any] = {}
        if "freq" in value:
            kwargs["freq"] = int_field("eval.freq", value["freq"], 0)
        if "days" in value:
            kwargs["days"] = int_field("eval.days", value["days"], 1, 30)
        if "seeds" in value:
            seeds = value["seeds"]
            seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
            if not isinstance(seeds, list) or not 1 <= len(seeds) <= 100:
                raise PolicyConfigError(
                    f"eval.seeds: {seeds!r} is not allowed: a list of 1 to 100 seeds"
                )
            kwargs["seeds"] = tuple(int_field("eval.seeds", s, 0, MAX_SEED) for s in seeds)
        if "patients" in value:
            p = value["patients"]
            if not (
                isinstance(p, str)
                or (isinstance(p, list) and p and all(isinstance(n, str) for n in p))
            ):
                raise PolicyConfigError(
                    f"eval.patients: {p!r} is not allowed: a patient or cohort name, or a "
                    "non-empty list of them"
                )
            names = (p,) if isinstance(p, str) else tuple(p)
            from twinloop.plant.errors import PlantError
            from twinloop.plant.glucose.cohorts import expand_names

            try:
                expand_names(names, field="eval.patients")
            except PlantError as exc:
                raise PolicyConfigError(str(exc)) from None
            kwargs["patients"] = names
        if "tbr54_limit_pct" in value:
            limit = value["tbr54_limit_pct"]
            number = isinstance(limit, int | float) and not isinstance(limit, bool)
            if not number or not 0 <= limit <= 100:
                raise PolicyConfigError(
                    f"eval.tbr54_limit_pct: {limit!r} is not allowed: a percentage from 0 to 100"
                )
            kwargs["tbr54_limit_pct"] = float(limit)
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out["patients"] = list(self.patients) if self.patients else None
        out["seeds"] = list(self.seeds)
        return out


def clinical_score(tir_pct: float, tbr54_pct: float, limit_pct: float) -> float:
    """The selection criterion: ``TIR − 100 · max(0, TBR54 − limit)`` (module docstring)."""
    return float(tir_pct - 100.0 * max(0.0, tbr54_pct - limit_pct))


class ClinicalEvalCallback(BaseCallback):
    """Evaluate the policy in the loop every ``settings.freq`` steps; keep the best (module doc).

    Args:
        settings: the ``eval`` section.
        patients: the held-out patients (``settings.patients`` or the training ones).
        directory: the seed's output directory (``best/``, ``evaluations.json``, snapshots).
        save_policy: writes the current policy (``policy.pt`` + ``policy.json``) into a
            directory: ``save_policy(model, directory, timesteps)``.
        scenario, carb_error: the loop's meal scenario and counting error (the training env's).
        n_envs: sub-environments (``freq`` is counted in environment steps).
        on_evaluation: called with each evaluation's record (``timesteps``, the metrics,
            ``score``); returning ``False`` stops training (Optuna's pruning).

    """

    def __init__(
        self,
        settings: EvalSettings,
        patients: tuple[str, ...],
        directory: str | Path,
        save_policy: Callable[[Any, Path, int], None],
        *,
        scenario: str = "random",
        carb_error: Any = None,
        n_envs: int = 1,
        on_evaluation: Callable[[dict[str, float]], bool] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.patients = patients
        self.directory = Path(directory)
        self.save_policy = save_policy
        self.scenario = scenario
        self.carb_error = carb_error
        self.freq_calls = max(settings.freq // max(n_envs, 1), 1)
        self.best_score = -np.inf
        self.best_timesteps: int | None = None
        self.history: list[dict[str, float]] = []
        self._last_eval_timesteps = -1
        self.on_evaluation = on_evaluation
        #: training was stopped by ``on_evaluation``
        self.stopped = False

    def _on_step(self) -> bool:
        if self.settings.freq and self.n_calls % self.freq_calls == 0:
            record = self.evaluate()
            if self.on_evaluation is not None and not self.on_evaluation(record):
                self.stopped = True
                return False
        return True

    def _on_training_end(self) -> None:
        done = self._last_eval_timesteps == self.num_timesteps
        if self.settings.freq and not self.stopped and not done:
            record = self.evaluate()
            if self.on_evaluation is not None:
                self.on_evaluation(record)

    def evaluate(self) -> dict[str, float]:
        """Run the current policy in the loop now, log it and keep it if it is the best.

        The global random states that training draws from (Python's, numpy's, torch's) are
        restored afterwards: building the evaluated network draws torch's, so without this
        the same seed would train other weights with the evaluation on than off.
        """
        import random

        import torch

        legacy = np.random.get_state()  # noqa: NPY002 (SB3 draws minibatches from it)
        states = random.getstate(), legacy, torch.get_rng_state()
        try:
            return self._evaluate()
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])  # noqa: NPY002
            torch.set_rng_state(states[2])

    def _evaluate(self) -> dict[str, float]:
        steps = int(self.num_timesteps)
        self._last_eval_timesteps = steps
        snapshot = self.directory / "eval" / f"step_{steps}"
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.mkdir(parents=True)
        self.save_policy(self.model, snapshot, steps)
        from twinloop.plant.glucose.therapy import THERAPY

        # the evaluation layer runs the loop (twinloop evaluate's run_one), found by the registry
        metrics = THERAPY.part("evaluation").policy_loop_metrics(
            snapshot,
            self.patients,
            self.settings.seeds,
            self.settings.days,
            scenario=self.scenario,
            carb_error=self.carb_error,
        )
        score = clinical_score(
            metrics["time_in_range_pct"],
            metrics["time_below_54_pct"],
            self.settings.tbr54_limit_pct,
        )
        record = {"timesteps": float(steps), **metrics, "score": score}
        self.history.append(record)
        for key in (
            "time_in_range_pct",
            "time_below_70_pct",
            "time_below_54_pct",
            "supervisor_overrides",
        ):
            self.logger.record(f"clinical/{key}", metrics[key])
        self.logger.record("clinical/score", score)
        self.logger.dump(steps)
        if score > self.best_score:
            self.best_score, self.best_timesteps = score, steps
            best = self.directory / "best"
            if best.exists():
                shutil.rmtree(best)
            shutil.copytree(snapshot, best)
            clinical = {
                "criterion": "max time_in_range_pct subject to time_below_54_pct <= "
                f"{self.settings.tbr54_limit_pct} (score = TIR - 100 * max(0, TBR54 - limit))",
                **record,
                "eval": self.settings.describe(),
                "patients": list(self.patients),
            }
            (best / "clinical.json").write_text(json.dumps(clinical, indent=2) + "\n")
        shutil.rmtree(snapshot)
        (self.directory / "evaluations.json").write_text(json.dumps(self.history, indent=2) + "\n")
        return record
