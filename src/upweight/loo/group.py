"""``leave_group_out``: predicted vs actual effect of removing whole groups of training points
(Koh et al. 2019; Basu, You & Feizi 2020).

For each group U the model is retrained without U — the minimiser of
(1/n) Σ_{i∉U} L(zᵢ, θ) + (l2/2)‖θ‖², same n and l2 (``refit`` with weight 0 on U) — and the
actual change of the summed test measurement is compared with the first- and second-order group
influence (``Influence.group_influence``). Basu et al. found that the first-order prediction
degrades for large, coherent groups (one class, one cluster), where the points of U move θ̂ in
the same direction and their interaction H⁻¹H_UΔθ⁽¹⁾ is no longer small; that is where the
second order helps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_interval, check_is_fitted
from .._executor import Executor
from ..core.data import Data
from ..errors import InputError
from ..influence.engine import Influence
from ..influence.group import normalize_groups
from .compare import _agreement
from .runner import (
    RetrainContext,
    StoreLike,
    baseline,
    bind_store,
    describe_train_fn,
    measure_sum,
    run_retrainings,
)


@dataclass(frozen=True)
class GroupLOOComparison:
    """Predicted (orders 1 and/or 2) vs actual change of the summed test measurement per removed
    group.

    Attributes:
        group_sizes: |U| per group, shape (k,).
        labels: a label per group (e.g. "coherent", "random"), or ``None``.
        actual: Σ_test f(θ̂₋U) − Σ_test f(θ̂) after real retraining, shape (k,). > 0: removing U
            raised the (summed) test measurement.
        predicted: {order: predicted Δ, shape (k,)} from ``Influence.group_influence``.
        pearson, spearman, slope, intercept: {order: agreement of predicted with actual}
            (least-squares fit actual ≈ slope·predicted + intercept).
        mae: {order: mean |predicted − actual|} — the most direct "which order is closer" number.
        test_ids: the test points whose measurements are summed.
        retrain_grad_norm: the largest ‖∇R_w‖ left by any refit (how exact "actual" is).
    """

    group_sizes: np.ndarray
    labels: np.ndarray | None
    actual: np.ndarray
    predicted: dict[int, np.ndarray]
    pearson: dict[int, float]
    spearman: dict[int, float]
    slope: dict[int, float]
    intercept: dict[int, float]
    mae: dict[int, float]
    test_ids: np.ndarray
    retrain_grad_norm: float
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(self.predicted)

    def agreement(self, order: int, label: Any = None) -> dict[str, float]:
        """Pearson, Spearman, slope, intercept and MAE of one order, optionally on one label's
        groups."""
        if order not in self.predicted:
            raise InputError(
                f"Order {order} was not computed; this comparison has orders {self.orders}."
            )
        keep = np.ones(len(self.actual), dtype=bool)
        if label is not None:
            if self.labels is None:
                raise InputError(
                    "This comparison has no labels; pass labels=... to leave_group_out."
                )
            keep = self.labels == label
            if not keep.any():
                raise InputError(
                    f"No group has label {label!r}; labels are {sorted(set(self.labels.tolist()))}."
                )
        pred, act = self.predicted[order][keep], self.actual[keep]
        return {**_agreement(pred, act), "mae": float(np.abs(pred - act).mean())}

    def __str__(self) -> str:
        rows = [
            f"leave-group-out on {len(self.actual)} groups (sizes"
            f" {int(self.group_sizes.min())}–{int(self.group_sizes.max())}):"
        ]
        groups = [None] if self.labels is None else [None, *dict.fromkeys(self.labels.tolist())]
        for label in groups:
            for o in self.orders:
                a = self.agreement(o, label)
                tag = "all" if label is None else str(label)
                rows.append(
                    f"  {tag:>10}  order {o}: Pearson {a['pearson']:.4f}, Spearman"
                    f" {a['spearman']:.4f}, slope {a['slope']:.3f}, MAE {a['mae']:.3e}"
                )
        return "\n".join(rows)


def leave_group_out(
    influence: Influence,
    test: Any,
    groups: Sequence[Any],
    *,
    orders: Sequence[int] = (1, 2),
    labels: Sequence[Any] | None = None,
    third_derivative: bool = False,
    measure_hessian: bool = True,
    gtol: float = 1e-9,
    newton: bool = False,
    progress: bool = True,
    store: StoreLike = None,
    executor: Executor | None = None,
) -> GroupLOOComparison:
    """Retrain without each group and compare with the first- and second-order group influence.

    Args:
        influence: a fitted ``Influence`` (convex model: the refit is warm-started L-BFGS).
        test: the test point(s); with several, the measurement is their sum.
        groups: a list of groups, each an array of positions into the fitted training data
            (or a boolean mask of length n) — e.g. random subsets, one class, one k-means cluster.
        orders: which orders of ``Influence.group_influence`` to compare, from {1, 2}.
        labels: optional label per group (e.g. "coherent"/"random") for ``agreement(order, label)``.
        third_derivative, measure_hessian: passed to ``group_influence`` for order 2.
        gtol: refit tolerance max |∂R_w/∂θ| (float64 L-BFGS, as ``leave_one_out``).
        newton: polish each refit with Newton steps (see ``refit``).
        progress: show a bar over the retrainings.
        store: a folder (or ``Store``) keeping every finished retraining under its group (the
            set of positions, in any order); a rerun after an interruption, or a call with more
            groups, retrains only the groups not yet in it (see ``leave_one_out``).
        executor: where the retrainings run (``upweight.distributed.DaskExecutor``: one task per
            group on its workers; the same results).

    Returns:
        ``GroupLOOComparison`` with, per order, the predictions, Pearson, Spearman, slope and
        mean absolute error against the actual change.
    """
    check_interval("leave_group_out", "gtol", gtol, 0.0, None)
    orders = tuple(dict.fromkeys(int(o) for o in orders))
    if not orders or any(o not in (1, 2) for o in orders):
        raise InputError(f"orders must be a non-empty subset of (1, 2); got {orders!r}.")
    t0 = time.perf_counter()
    check_is_fitted(influence, "data_")
    data = influence.data_
    assert data is not None
    n = len(data)
    positions = normalize_groups(groups, n)
    if labels is not None:
        labels_arr = np.asarray(list(labels))
        if labels_arr.shape != (len(positions),):
            raise InputError(
                f"labels has {labels_arr.size} entries for {len(positions)} groups; pass one label"
                " per group."
            )
    else:
        labels_arr = None
    test_data = Data.from_any(test, what="test data")
    removed = [np.asarray(p, dtype=np.int64) for p in positions]
    st = bind_store(
        store, influence, "leave_group_out", test_data, describe_train_fn(None, gtol, newton)
    )
    try:
        predicted, provs = {}, {}
        for o in orders:
            gi = influence.group_influence(
                test_data,
                positions,
                order=o,
                third_derivative=third_derivative,
                measure_hessian=measure_hessian,
            )
            predicted[o] = gi.total()
            provs[o] = gi.provenance

        obj = influence.objective
        base_params, base_grad_norm = baseline(obj, data, None, gtol, newton)
        ctx = RetrainContext(
            obj,
            data,
            test_data,
            base_params,
            measure_sum(obj, test_data, base_params),
            removed,
            gtol=gtol,
            newton=newton,
        )
        rows, resumed = run_retrainings(
            ctx,
            store=st,
            executor=executor,
            desc="leave-group-out retraining",
            show_progress=progress,
        )
    finally:  # a store opened here from a path releases its lock
        if st is not None and st is not store:
            st.close()
    actual = rows[:, 0]
    grad_norms = [base_grad_norm, *rows[:, 1]]

    stats = {
        o: {**_agreement(predicted[o], actual), "mae": float(np.abs(predicted[o] - actual).mean())}
        for o in orders
    }
    return GroupLOOComparison(
        group_sizes=np.array([len(p) for p in positions], dtype=np.int64),
        labels=labels_arr,
        actual=actual,
        predicted=predicted,
        pearson={o: s["pearson"] for o, s in stats.items()},
        spearman={o: s["spearman"] for o, s in stats.items()},
        slope={o: s["slope"] for o, s in stats.items()},
        intercept={o: s["intercept"] for o, s in stats.items()},
        mae={o: s["mae"] for o, s in stats.items()},
        test_ids=test_data.ids.numpy(),
        retrain_grad_norm=float(max(grad_norms)),
        seconds=time.perf_counter() - t0,
        provenance={
            "orders": list(orders),
            "n_groups": len(positions),
            "influence": provs,
            "resumed_from_store": resumed,
        },
    )
