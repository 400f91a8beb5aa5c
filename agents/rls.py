"""Recursive least squares with exponential forgetting, for online parameter estimation.

Estimates ``θ`` in ``y_k = φ_kᵀ θ + v_k`` one sample at a time (Ljung & Söderström 1983,
*Theory and Practice of Recursive Identification*; Åström & Wittenmark, *Adaptive Control*,
ch. 2)::

    K_k = P_{k−1} φ_k / (λ + φ_kᵀ P_{k−1} φ_k)
    θ_k = θ_{k−1} + K_k (y_k − φ_kᵀ θ_{k−1})
    P_k = (P_{k−1} − K_k φ_kᵀ P_{k−1}) / λ

with the forgetting factor ``λ ∈ (0, 1]`` (memory of about ``1/(1 − λ)`` samples), so that a
slowly changing parameter (a patient's residual strength as they fatigue) is tracked. Without
excitation the covariance would grow as ``λ^−k`` (wind-up); the trace of ``P`` is capped at
``max_trace`` (directional forgetting is not needed at this size). Non-finite samples are
skipped and counted.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twinloop.agents.errors import LoopConfigError


class RecursiveLeastSquares:
    """RLS with forgetting for ``n`` parameters (see the module docstring).

    Args:
        n: number of parameters.
        forgetting: λ in (0, 1].
        initial: initial estimate (default zeros).
        initial_variance: initial ``P = initial_variance · I``.
        max_trace: cap of ``trace(P)`` against wind-up.

    """

    def __init__(
        self,
        n: int,
        *,
        forgetting: float = 0.995,
        initial: ArrayLike | None = None,
        initial_variance: float = 1e3,
        max_trace: float = 1e6,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LoopConfigError("n", n, "an integer >= 1")
        if not (isinstance(forgetting, int | float) and 0 < forgetting <= 1):
            raise LoopConfigError("forgetting", forgetting, "0 < λ <= 1")
        if not (isinstance(initial_variance, int | float) and initial_variance > 0):
            raise LoopConfigError("initial_variance", initial_variance, "> 0")
        if not (isinstance(max_trace, int | float) and max_trace >= n * initial_variance):
            raise LoopConfigError(
                "max_trace", max_trace, f">= n · initial_variance ({n * initial_variance:g})"
            )
        self.forgetting = float(forgetting)
        self.max_trace = float(max_trace)
        self.theta = np.zeros(n) if initial is None else np.array(initial, dtype=np.float64)
        if self.theta.shape != (n,):
            raise LoopConfigError("initial", self.theta.shape, f"shape ({n},)")
        self.p = np.eye(n) * float(initial_variance)
        #: samples skipped because they were not finite
        self.skipped = 0
        #: samples used
        self.samples = 0

    def update(self, phi: ArrayLike, y: float) -> NDArray[np.float64]:
        """Account one sample ``y = φᵀθ + v``; return the new estimate (a view)."""
        f = np.asarray(phi, dtype=np.float64)
        if f.shape != self.theta.shape:
            raise LoopConfigError("phi", f.shape, f"shape {self.theta.shape}")
        if not (math.isfinite(y) and np.all(np.isfinite(f))):
            self.skipped += 1
            return self.theta
        pf = self.p @ f
        gain = pf / (self.forgetting + f @ pf)
        self.theta += gain * (y - f @ self.theta)
        self.p -= np.outer(gain, pf)
        self.p = 0.5 * (self.p + self.p.T) / self.forgetting
        trace = float(np.trace(self.p))
        if trace > self.max_trace:
            self.p *= self.max_trace / trace
        self.samples += 1
        return self.theta

    def predict(self, phi: ArrayLike) -> float:
        """``φᵀθ`` with the current estimate."""
        return float(np.asarray(phi, dtype=np.float64) @ self.theta)
