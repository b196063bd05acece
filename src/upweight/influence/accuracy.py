"""How good an approximate solver's influence scores are, measured against an exact solve.

An approximate solver (K-FAC, EK-FAC, Arnoldi, Nyström, DataInf) replaces (H + δI)⁻¹ by the
inverse of an approximation M, and its residual ‖(H + δI)x − v‖/‖v‖ bounds the error of x only
loosely (with μ the eigenvalues of (H + δI)M⁻¹ it is at most max|μ − 1|, and a residual of a few
units can come with usable rankings or with none). What a user needs is how far the *scores*
I_up,loss(z, z_test) = −∇θf(z_test)ᵀ x are from the exact ones. ``estimate_accuracy`` measures it
on a sample: for the first ``n_test`` test points it solves (H + δI)s = ∇θf(z_test) with the
influence's own solver and with conjugate gradients to ``rtol`` on the same curvature (the same H
or Gauss–Newton matrix, the same damping), and compares the scores of ``n_train`` training points
drawn at random: Spearman and Pearson correlation, the relative error of the scores and the share
of training points scored with the right sign, per test point.

Cost: one block CG solve with ``n_test`` right-hand sides (its iterations × a pass over the
training data each) and the gradients of ``n_train`` training points — about what the exact
method costs for ``n_test`` test points.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._checks import check_interval
from ..errors import InaccurateSolveError
from ..solvers.cg import CG

if TYPE_CHECKING:
    from .engine import Influence


@dataclass(frozen=True)
class AccuracyEstimate:
    """The scores of an influence's solver against CG on the same curvature, on a sample.

    Attributes:
        spearman, pearson: per sampled test point, the correlation of its approximate and exact
            scores over the sampled training points, shape (m,).
        relative_error: per sampled test point, ‖scores − exact‖ / ‖exact‖ over the sample, (m,).
        sign_agreement: per sampled test point, the share of sampled training points whose score
            has the exact score's sign (helpful vs harmful), (m,).
        test_ids, train_ids: the sampled points.
        reference: the exact solve: CG's settings, iterations and largest relative residual.
        seconds: wall time of the estimate.
    """

    spearman: np.ndarray
    pearson: np.ndarray
    relative_error: np.ndarray
    sign_agreement: np.ndarray
    test_ids: np.ndarray
    train_ids: np.ndarray
    reference: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def spearman_min(self) -> float:
        return float(self.spearman.min())

    @property
    def relative_error_max(self) -> float:
        return float(self.relative_error.max())

    def summary(self) -> dict[str, Any]:
        """The estimate as plain numbers (for provenance, JSON and reports)."""
        return {
            "spearman_min": self.spearman_min,
            "spearman_mean": float(self.spearman.mean()),
            "relative_error_max": self.relative_error_max,
            "sign_agreement_min": float(self.sign_agreement.min()),
            "test_points": len(self.test_ids),
            "train_points": len(self.train_ids),
            "reference": dict(self.reference),
        }

    def __str__(self) -> str:
        return (
            f"accuracy on {len(self.test_ids)} test × {len(self.train_ids)} training points against"
            f" CG: Spearman min {self.spearman_min:.4f} (mean {float(self.spearman.mean()):.4f}),"
            f" relative error of the scores max {self.relative_error_max:.3g}, right sign min"
            f" {float(self.sign_agreement.min()):.1%}"
        )


def estimate_accuracy(
    influence: Influence,
    test: Any,
    *,
    n_test: int = 2,
    n_train: int = 512,
    rtol: float = 1e-6,
    maxiter: int | None = None,
    seed: int = 0,
) -> AccuracyEstimate:
    """The computation behind ``Influence.estimate_accuracy``; see that method and this module."""
    check_interval("estimate_accuracy", "n_test", n_test, 1, None, closed="left", integer=True)
    check_interval("estimate_accuracy", "n_train", n_train, 2, None, closed="left", integer=True)
    check_interval("estimate_accuracy", "rtol", rtol, 0.0, 1.0)
    t0 = time.perf_counter()
    test_data = influence._test(test)
    test_data = test_data.subset(range(min(n_test, len(test_data))))
    data = influence.data_
    assert data is not None
    n = len(data)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(n, size=min(n_train, n), replace=False))

    V = influence.test_grads(test_data)
    approx = influence.inverse_hvp(V).value
    cg = CG(rtol=rtol, maxiter=maxiter)
    exact = cg.solve(cg.prepare(influence.curvature_), V)
    reference = {
        "solver": cg.config(),
        "iterations": exact.iterations,
        "residual_max": exact.max_residual,
        "curvature": influence.curvature_.describes,
        "damping": influence.damping,
    }
    if not exact.max_residual <= max(10 * rtol, 1e-4):
        raise InaccurateSolveError(
            "estimate_accuracy: the CG reference stopped at relative residual"
            f" {exact.max_residual:.2e} after {exact.iterations} iterations, so it is no reference."
            " Raise maxiter, loosen rtol, or add damping."
        )
    rows_a, rows_e = [], []
    for _, G in influence._train_grad_chunks(
        data.subset(torch.from_numpy(positions)), "accuracy sample"
    ):
        rows_a.append(-(approx.to(G.dtype) @ G.T))
        rows_e.append(-(exact.value.to(G.dtype) @ G.T))
    a = torch.cat(rows_a, dim=1).double().cpu().numpy()
    e = torch.cat(rows_e, dim=1).double().cpu().numpy()
    import scipy.stats  # here, not at import: it is slow to import

    return AccuracyEstimate(
        spearman=np.array([scipy.stats.spearmanr(x, y)[0] for x, y in zip(a, e)]),
        pearson=np.array([scipy.stats.pearsonr(x, y)[0] for x, y in zip(a, e)]),
        relative_error=np.linalg.norm(a - e, axis=1)
        / np.maximum(np.linalg.norm(e, axis=1), np.finfo(float).tiny),
        sign_agreement=(np.sign(a) == np.sign(e)).mean(axis=1),
        test_ids=test_data.ids.numpy(),
        train_ids=data.ids.numpy()[positions],
        reference=reference,
        seconds=time.perf_counter() - t0,
    )
