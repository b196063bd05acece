"""Running many independent retrainings: kept in a store as they finish, spread over an executor.

``leave_one_out`` (groups of one point) and ``leave_group_out`` retrain the model once per removed
set U — the minimiser of (1/n) Σ_{i∉U} L(zᵢ, θ) + (l2/2)‖θ‖² with the same n and l2 (Koh & Liang
2017, §2: removing z is ε = −1/n) — and measure Σ_test f(z_test, θ̂₋U) − Σ_test f(z_test, θ̂). Each
retraining is independent of the others, so

* with a ``Store``, every finished retraining is written as one chunk (atomically, with its
  checksum) and a rerun computes only the missing ones — an interrupted run loses at most the
  retrainings under way, and the results are the same bit for bit;
* with an executor (``upweight.distributed.DaskExecutor``), each retraining is one task on the
  workers; the context (objective, data, test points, baseline θ) is placed on them once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._executor import Executor, resolve, thread_private
from .._progress import logger, progress
from ..core.data import Data
from ..core.objective import Objective
from ..core.params import Params
from ..influence.engine import Influence
from ..store import Store, array_digest, as_store
from .retrain import RefitResult, refit

#: ``train_fn(objective, data_without_U, init_params)``: the retrained params, or a ``RefitResult``
TrainFn = Callable[[Objective, Data, Params], Params | RefitResult]
StoreLike = str | os.PathLike | Store | None

#: columns of one retraining's row: Δ of the summed test measurement, ‖∇R‖ after the refit (NaN if
#: the train_fn does not report it), iterations of the refit (NaN likewise)
ROW = ("actual", "grad_norm", "iterations")


@dataclass(eq=False)  # hashed by identity: thread_private caches one copy per object and thread
class RetrainContext:
    """What every retraining task needs; placed once per executor (``Executor.share``)."""

    objective: Objective
    data: Data
    test: Data
    base_params: Params
    base: float
    removed: list[np.ndarray]
    train_fn: TrainFn | None = None
    gtol: float = 1e-9
    newton: bool = False

    def measure(self, params: Params) -> float:
        return measure_sum(self.objective, self.test, params)


def measure_sum(objective: Objective, test: Data, params: Params) -> float:
    """Σ_test f(z_test, θ), in the dtype of ``params``."""
    dtype = next(iter(params.values())).dtype
    X, y = test.X, test.y
    with torch.no_grad():
        X = X.to(dtype) if X.is_floating_point() else X
        y = y.to(dtype) if y.is_floating_point() else y
        return float(objective.measurements(params, X, y).sum())


def baseline(objective: Objective, data: Data, train_fn: TrainFn | None, gtol: float,
             newton: bool = False) -> tuple[Params, float]:
    """θ every retraining starts from and is compared with, and its ‖∇R‖: the float64 refit of the
    full data for the default refit, θ̂ itself for a ``train_fn`` (whose own baseline it is)."""
    if train_fn is None:
        full = refit(objective, data, gtol=gtol, newton=newton)
        return full.params, full.grad_norm
    return {k: v.to(objective.dtype) for k, v in objective.params.items()}, float("nan")


def _retrain_without(which: np.ndarray, ctx: RetrainContext) -> np.ndarray:
    """The map step: retrain without the set ``ctx.removed[which[0]]``; one row of ``ROW``."""
    ctx = thread_private(ctx, share=(ctx.data, ctx.test))  # a train_fn may swap a module's parameters
    removed = ctx.removed[int(which[0])]
    n = len(ctx.data)
    if ctx.train_fn is None:
        w = torch.ones(n, dtype=torch.float64)
        w[torch.as_tensor(removed)] = 0.0
        res = refit(ctx.objective, ctx.data, weights=w, init=ctx.base_params, gtol=ctx.gtol, newton=ctx.newton)
    else:
        res = ctx.train_fn(ctx.objective, ctx.data.subset(np.setdiff1d(np.arange(n), removed)), ctx.base_params)
    if isinstance(res, RefitResult):
        params, grad_norm, iterations = res.params, res.grad_norm, float(res.iterations)
    else:
        params, grad_norm, iterations = res, float("nan"), float("nan")
    return np.array([[ctx.measure(params) - ctx.base, grad_norm, iterations]])


def run_retrainings(ctx: RetrainContext, *, store: Store | None, executor: Executor | None, desc: str,
                    progress_bar: bool = True) -> tuple[np.ndarray, int]:
    """One row of ``ROW`` per removed set, and how many were read from ``store``.

    With a store, rows already there are read back, the others computed (through ``executor``)
    and each written as soon as it arrives; an interrupt or error cancels the queued ones.
    """
    k = len(ctx.removed)
    arr = None if store is None else store.chunked("retrainings", shape=(k, len(ROW)), axis=0, chunk_size=1, dtype="float64")
    rows = np.full((k, len(ROW)), np.nan)
    todo = list(range(k)) if arr is None else arr.missing()
    if arr is not None:
        for j in sorted(set(range(k)) - set(todo)):
            rows[j] = arr.read(j)[0]
        if len(todo) < k:
            logger.info("%s: %d of %d retrainings read from store %s", desc, k - len(todo), k, store.path)  # type: ignore[union-attr]
    if not todo:  # all read back: nothing to place on the workers
        return rows, k
    ex = resolve(executor)
    results = ex.map(_retrain_without, [np.array([j]) for j in todo], ex.share(ctx))
    try:
        for j, row in zip(todo, progress(results, desc=desc, total=len(todo), enabled=progress_bar)):
            rows[j] = row[0]
            if arr is not None:
                arr.write(j, row)
    finally:
        results.close()
    return rows, k - len(todo)


def describe_train_fn(train_fn: TrainFn | None, gtol: float, newton: bool = False) -> dict[str, Any]:
    """What a retraining function's results depend on, for a store's fingerprint: its ``config()``
    if it has one, else its name and its plain (number, string, bool) attributes."""
    if train_fn is None:
        return {"name": "upweight.refit", "gtol": gtol, "newton": newton}
    qualname = getattr(train_fn, "__qualname__", None)  # functions have one, instances do not
    if qualname is not None:
        name, fields = f"{train_fn.__module__}.{qualname}", {}
    else:
        kind = type(train_fn)
        name, fields = f"{kind.__module__}.{kind.__qualname__}", dict(getattr(train_fn, "__dict__", {}))
    config = getattr(train_fn, "config", None)
    if callable(config):
        return {"name": name, **dict(config())}
    plain = {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
    return {"name": name, **plain}


def bind_store(store: StoreLike, influence: Influence, quantity: str, removed: list[np.ndarray], test: Data,
               retraining: dict[str, Any]) -> Store | None:
    """``store`` opened and bound to this set of retrainings: θ̂, objective and data (as the
    influence engine's stores), the test points, the removed sets and the retraining settings —
    but not the solver or damping, which the retrainings do not depend on."""
    st = as_store(store)
    if st is None:
        return None
    flat = np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)
    sizes = np.array([len(r) for r in removed], dtype=np.int64)
    fp = influence._fingerprint(quantity, flat, test)
    fp.pop("solver", None)
    fp.pop("damping", None)
    fp.pop("train_selection", None)
    fp.pop("hvp", None)
    fp["removed"] = {"count": len(removed), "positions_sha256": array_digest(flat)["sha256"],
                     "sizes_sha256": array_digest(sizes)["sha256"]}
    fp["retraining"] = retraining
    st.bind(fp)
    return st
