"""``leave_one_out``: predicted vs actual effect of removing training points (Koh & Liang 2017, Fig. 2)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.stats
import torch

from .._checks import check_choice, check_interval
from .._progress import progress
from ..core.data import Data
from ..core.objective import Objective
from ..core.params import Params
from ..errors import InputError
from ..influence.engine import Influence
from ..influence.results import InfluenceScores
from .retrain import refit

TrainFn = Callable[[Objective, Data, Params], Params]


@dataclass(frozen=True)
class LOOComparison:
    """Predicted vs actual change of the test measurement when each training point is removed.

    Attributes:
        train_ids: the removed points, shape (k,).
        predicted: −(1/n)·Σ_test I_up,loss(z, z_test), shape (k,).
        actual: f(θ̂₋z) − f(θ̂) summed over the test points, after real retraining, shape (k,).
        pearson, spearman: correlations of predicted and actual.
        slope, intercept: least-squares fit actual ≈ slope·predicted + intercept (slope ≈ 1 means
            the magnitudes are right, not only the ranking).
        retrain_grad_norm: the largest ‖∇R‖ left by any refit (how exact "actual" is).
    """

    train_ids: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    test_ids: np.ndarray
    pearson: float
    spearman: float
    slope: float
    intercept: float
    retrain_grad_norm: float
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"leave-one-out on {len(self.train_ids)} points: Pearson {self.pearson:.4f}, Spearman {self.spearman:.4f}, "
            f"slope {self.slope:.3f} (intercept {self.intercept:.2e})"
        )


def leave_one_out(
    influence: Influence,
    test: Any,
    *,
    k: int = 20,
    select: Literal["top", "random"] = "top",
    ids: Any = None,
    train_fn: TrainFn | None = None,
    gtol: float = 1e-9,
    seed: int = 0,
    scores: InfluenceScores | None = None,
    progress_bar: bool = True,
) -> LOOComparison:
    """Retrain without each chosen training point and compare with the influence prediction.

    Args:
        influence: a fitted ``Influence``.
        test: the test point(s); with several, the measurement is their sum.
        k: how many training points to remove, one at a time.
        select: "top" — the k largest |I_up,loss| (the paper's Fig. 2) — or "random".
        ids: explicit positions in the training data instead of ``select``/``k``.
        train_fn: ``train_fn(objective, data_without_z, init_params) -> params`` for models
            where warm-started L-BFGS does not find the minimum (non-convex); by default the
            convex refit of ``upweight.loo.retrain.refit`` to ‖∇R‖∞ ≤ gtol, in float64.
        seed: for ``select="random"``.
        scores: ``influence.up_loss(test)`` if already computed (saves one solve).

    Returns:
        ``LOOComparison`` with Pearson, Spearman and slope.
    """
    check_interval("leave_one_out", "k", k, 1, None, closed="left", integer=True)
    check_choice("leave_one_out", "select", select, ("top", "random"))
    t0 = time.perf_counter()
    test_data = Data.from_any(test, what="test data")
    if scores is None:
        scores = influence.up_loss(test)
    elif scores.values.shape != (len(test_data), influence.n_train_):
        raise InputError(
            f"scores has shape {scores.values.shape} but test × training is ({len(test_data)}, {influence.n_train_}); "
            "pass influence.up_loss(test) for the same test points and all training points."
        )
    scores = scores.as_up_loss()
    data = influence.data_
    assert data is not None
    n = len(data)
    total = scores.values.sum(axis=0)
    if ids is not None:
        chosen = np.asarray(ids, dtype=np.int64).reshape(-1)
    elif select == "top":
        chosen = np.argsort(-np.abs(total), kind="stable")[: min(k, n)]
    else:
        chosen = np.random.default_rng(seed).choice(n, size=min(k, n), replace=False)
    if chosen.size == 0:
        raise InputError("leave_one_out needs at least one training point to remove.")
    predicted = -total[chosen] / n

    obj = influence.objective
    dtype = torch.float64 if train_fn is None else obj.dtype

    def measure(params: Params) -> float:
        with torch.no_grad():
            X = test_data.X.to(dtype) if test_data.X.is_floating_point() else test_data.X
            y = test_data.y.to(dtype) if test_data.y.is_floating_point() else test_data.y
            return float(obj.measurements(params, X, y).sum())

    grad_norms = []
    if train_fn is None:
        full = refit(obj, data, gtol=gtol)
        base_params, grad_norms = full.params, [full.grad_norm]
    else:
        base_params = {k_: v.to(dtype) for k_, v in obj.params.items()}
    base = measure(base_params)
    actual = np.empty(len(chosen))
    for j, pos in enumerate(progress(chosen, desc="leave-one-out retraining", total=len(chosen), enabled=progress_bar)):
        if train_fn is None:
            w = torch.ones(n, dtype=torch.float64)
            w[int(pos)] = 0.0
            res = refit(obj, data, weights=w, init=base_params, gtol=gtol)
            grad_norms.append(res.grad_norm)
            params = res.params
        else:
            keep = np.setdiff1d(np.arange(n), [int(pos)])
            params = train_fn(obj, data.subset(keep), base_params)
        actual[j] = measure(params) - base

    return LOOComparison(
        train_ids=data.ids.numpy()[chosen],
        predicted=predicted,
        actual=actual,
        test_ids=test_data.ids.numpy(),
        retrain_grad_norm=float(max(grad_norms)) if grad_norms else float("nan"),
        seconds=time.perf_counter() - t0,
        provenance={"select": select, "k": int(len(chosen)), "influence": scores.provenance},
        **_agreement(predicted, actual),
    )


def _agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        nan = float("nan")
        return {"pearson": nan, "spearman": nan, "slope": nan, "intercept": nan}
    fit = scipy.stats.linregress(predicted, actual)
    return {
        "pearson": float(scipy.stats.pearsonr(predicted, actual)[0]),
        "spearman": float(scipy.stats.spearmanr(predicted, actual)[0]),
        "slope": float(fit.slope),
        "intercept": float(fit.intercept),
    }
