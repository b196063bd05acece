"""``leave_one_out``: predicted vs actual effect of removing training points (Koh & Liang 2017, Fig.
2)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .._checks import check_choice, check_interval
from .._executor import Executor
from ..core.data import Data
from ..errors import CurvatureError, InputError
from ..influence.engine import Influence
from ..influence.results import InfluenceScores
from .runner import (
    RetrainContext,
    StoreLike,
    TrainFn,
    baseline,
    bind_store,
    describe_train_fn,
    measure_sum,
    run_retrainings,
)


@dataclass(frozen=True)
class LOOComparison:
    """Predicted vs actual change of the test measurement when each training point is removed.

    Attributes:
        train_ids: the removed points, shape (k,).
        predicted: the paper's first order −(1/n)·Σ_test I_up,loss(z, z_test), shape (k,).
        actual: f(θ̂₋z) − f(θ̂) summed over the test points, after real retraining, shape (k,).
        pearson, spearman: correlations of predicted and actual.
        slope, intercept: least-squares fit actual ≈ slope·predicted + intercept (slope ≈ 1 means
            the magnitudes are right, not only the ranking).
        retrain_grad_norm: the largest ‖∇R‖ left by any refit (how exact "actual" is).
        predicted_newton: the leverage-corrected estimate (one Newton step on the leave-one-out
            objective, ``Influence.removal_effect_newton``) summed over the test points, shape (k,);
            ``None`` when not computed (``newton=False``, or a ``train_fn`` with ``newton="auto"``).
        pearson_newton, spearman_newton, slope_newton, intercept_newton: its agreement with actual
            (NaN when not computed).
        leverage: each removed point's leverage hᵢ (the corrected step is up to 1/(1 − hᵢ) times
            the first-order one), shape (k,), or ``None``.
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
    predicted_newton: np.ndarray | None = None
    pearson_newton: float = float("nan")
    spearman_newton: float = float("nan")
    slope_newton: float = float("nan")
    intercept_newton: float = float("nan")
    leverage: np.ndarray | None = None

    def __str__(self) -> str:
        text = (
            f"leave-one-out on {len(self.train_ids)} points: Pearson {self.pearson:.4f}, Spearman"
            f" {self.spearman:.4f}, slope {self.slope:.3f} (intercept {self.intercept:.2e})"
        )
        if self.predicted_newton is not None:
            text += (
                f"; leverage-corrected (Newton step): Pearson {self.pearson_newton:.4f}, Spearman"
                f" {self.spearman_newton:.4f}, slope {self.slope_newton:.3f} (intercept"
                f" {self.intercept_newton:.2e})"
            )
        return text


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
    progress: bool = True,
    store: StoreLike = None,
    executor: Executor | None = None,
    newton: bool | Literal["auto"] = "auto",
) -> LOOComparison:
    """Retrain without each chosen training point and compare with the influence prediction.

    Args:
        influence: a fitted ``Influence``.
        test: the test point(s); with several, the measurement is their sum.
        k: how many training points to remove, one at a time.
        select: "top" — the k largest |I_up,loss| (the paper's Fig. 2) — or "random".
        ids: explicit positions in the training data instead of ``select``/``k``.
        train_fn: ``train_fn(objective, data_without_z, init_params)`` returning the retrained
            params (or a ``RefitResult``, whose ‖∇R‖ and iteration count are then recorded) for
            models where warm-started L-BFGS does not find the minimum (non-convex); by default the
            convex refit of ``upweight.loo.retrain.refit`` to ‖∇R‖∞ ≤ gtol, in float64.
        seed: for ``select="random"``.
        scores: ``influence.up_loss(test)`` if already computed (saves one solve).
        progress: show a bar over the retrainings.
        store: a folder (or ``Store``) that keeps every finished retraining as it completes,
            under the point it removed: an interrupted run, called again with the same store,
            retrains only the points still missing and returns the same comparison, and a call
            with a larger ``k`` or other ``ids`` retrains only the points not yet in it. The store
            records what the retrainings depend on (θ̂, objective, data, test points, ``gtol`` and
            ``train_fn`` — its class and plain settings, or its ``config()`` if it has one) and
            refuses another computation (``StoreMismatchError``).
        executor: where the retrainings run — ``None`` in this process one after the other,
            ``upweight.distributed.DaskExecutor`` one task per removed point on its workers (the
            retrainings are independent, so the results are the same).
        newton: also compute the leverage-corrected estimate (``Influence.removal_effect_newton``:
            one Newton step on the leave-one-out objective with the point's own curvature) and its
            agreement with the retrainings. It costs one block solve with at most C right-hand sides
            per removed point (C model outputs), far less than the retrainings, and runs before
            them: a ``CurvatureError`` (a point whose removal leaves the curvature indefinite) stops
            the call early; ``newton=False`` then compares the first order only. "auto" (default):
            on with the default convex refit, off with a ``train_fn`` — there the model is typically
            non-convex or not retrained to the minimum, where the step's premises (∇R(θ̂) = 0, the
            point's Gauss–Newton curvature as its Hessian) do not hold; ``True`` computes it anyway.

    Returns:
        ``LOOComparison`` with Pearson, Spearman and slope of the first order and, with ``newton``,
        of the leverage-corrected estimate.
    """
    check_interval("leave_one_out", "k", k, 1, None, closed="left", integer=True)
    check_choice("leave_one_out", "select", select, ("top", "random"))
    if not (newton is True or newton is False or newton == "auto"):
        raise InputError(
            "The 'newton' parameter of leave_one_out must be True, False or 'auto'. Got"
            f" {newton!r}."
        )
    if newton == "auto":
        newton = train_fn is None
    t0 = time.perf_counter()
    test_data = Data.from_any(test, what="test data")
    if scores is None:
        scores = influence.up_loss(test)
    elif scores.values.shape != (len(test_data), influence.n_train_):
        raise InputError(
            f"scores has shape {scores.values.shape} but test × training is ({len(test_data)},"
            f" {influence.n_train_}); pass influence.up_loss(test) for the same test points and all"
            " training points."
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
    if chosen.min() < 0 or chosen.max() >= n:
        raise InputError(
            f"leave_one_out: ids must be positions 0 … {n - 1} of the training data; got"
            f" {chosen.min()} … {chosen.max()}."
        )
    predicted = -total[chosen] / n
    newton_fields: dict[str, Any] = {}
    newton_provenance = None
    if newton:
        try:
            corrected = influence.removal_effect_newton(test_data, chosen)
        except CurvatureError as exc:
            raise CurvatureError(
                f"{exc} leave_one_out(..., newton=False) compares the first order only."
            ) from exc
        newton_fields = {"predicted_newton": corrected.total(), "leverage": corrected.leverage}
        newton_provenance = corrected.provenance

    obj = influence.objective
    removed = [chosen[j : j + 1] for j in range(len(chosen))]
    st = bind_store(store, influence, "leave_one_out", test_data, describe_train_fn(train_fn, gtol))
    try:
        base_params, base_grad_norm = baseline(obj, data, train_fn, gtol)
        ctx = RetrainContext(
            obj,
            data,
            test_data,
            base_params,
            measure_sum(obj, test_data, base_params),
            removed,
            train_fn,
            gtol,
        )
        rows, resumed = run_retrainings(
            ctx,
            store=st,
            executor=executor,
            desc="leave-one-out retraining",
            show_progress=progress,
        )
    finally:  # a store opened here from a path releases its lock
        if st is not None and st is not store:
            st.close()
    actual = rows[:, 0]
    if newton:
        newton_fields.update(
            {
                f"{key}_newton": v
                for key, v in _agreement(newton_fields["predicted_newton"], actual).items()
            }
        )
    grad_norms = [g for g in [base_grad_norm, *rows[:, 1]] if np.isfinite(g)]
    iters = rows[:, 2][np.isfinite(rows[:, 2])]

    return LOOComparison(
        train_ids=data.ids.numpy()[chosen],
        predicted=predicted,
        actual=actual,
        test_ids=test_data.ids.numpy(),
        retrain_grad_norm=float(max(grad_norms)) if grad_norms else float("nan"),
        seconds=time.perf_counter() - t0,
        provenance={
            "select": select,
            "k": int(len(chosen)),
            "influence": scores.provenance,
            "retrain_iterations_mean": float(iters.mean()) if iters.size else float("nan"),
            "resumed_from_store": resumed,
            **({"newton": newton_provenance} if newton_provenance is not None else {}),
        },
        **_agreement(predicted, actual),
        **newton_fields,
    )


def _agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    import scipy.stats

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
