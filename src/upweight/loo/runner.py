"""Running many independent retrainings: kept in a store as they finish, spread over an executor.

``leave_one_out`` (groups of one point) and ``leave_group_out`` retrain the model once per removed
set U — the minimiser of (1/n) Σ_{i∉U} L(zᵢ, θ) + (l2/2)‖θ‖² with the same n and l2 (Koh & Liang
2017, §2: removing z is ε = −1/n) — and measure Σ_test f(z_test, θ̂₋U) − Σ_test f(z_test, θ̂). Each
retraining is independent of the others, so

* with a ``Store``, every finished retraining is written as soon as it arrives (atomically, with
  its checksum), under the name of its removed set (``retraining_key``), and a rerun computes only
  the missing ones — an interrupted run loses at most the retrainings under way, the results are the
  same bit for bit, and a later call with more or other removed sets (a larger k) reuses the ones
  it shares with earlier calls;
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
    y = test.y.to(dtype) if test.y.is_floating_point() else test.y
    with torch.no_grad():  # outputs() casts floating inputs to the dtype of params
        return float(objective.measurements(params, test.X, y).sum())


def baseline(
    objective: Objective, data: Data, train_fn: TrainFn | None, gtol: float, newton: bool = False
) -> tuple[Params, float]:
    """θ every retraining starts from and is compared with, and its ‖∇R‖: the float64 refit of the
    full data for the default refit, θ̂ itself for a ``train_fn`` (whose own baseline it is)."""
    if train_fn is None:
        full = refit(objective, data, gtol=gtol, newton=newton)
        return full.params, full.grad_norm
    return {k: v.to(objective.dtype) for k, v in objective.params.items()}, float("nan")


def _retrain_without(which: np.ndarray, ctx: RetrainContext) -> np.ndarray:
    """The map step: retrain without the set ``ctx.removed[which[0]]``; one row of ``ROW``."""
    # a train_fn may swap a module's parameters
    ctx = thread_private(ctx, share=(ctx.data, ctx.test))
    removed = ctx.removed[int(which[0])]
    n = len(ctx.data)
    if ctx.train_fn is None:
        w = torch.ones(n, dtype=torch.float64)
        w[torch.as_tensor(removed)] = 0.0
        res = refit(
            ctx.objective,
            ctx.data,
            weights=w,
            init=ctx.base_params,
            gtol=ctx.gtol,
            newton=ctx.newton,
        )
    else:
        res = ctx.train_fn(
            ctx.objective, ctx.data.subset(np.setdiff1d(np.arange(n), removed)), ctx.base_params
        )
    if isinstance(res, RefitResult):
        params, grad_norm, iterations = res.params, res.grad_norm, float(res.iterations)
    else:
        params, grad_norm, iterations = res, float("nan"), float("nan")
    return np.array([[ctx.measure(params) - ctx.base, grad_norm, iterations]])


def retraining_key(removed: np.ndarray) -> str:
    """The store name of the retraining without the set ``removed``: a digest of its sorted,
    distinct positions, so that the same set given in another order or at another place is found
    again.

    Examples:
        >>> retraining_key(np.array([7, 3])) == retraining_key(np.array([3, 7, 7]))
        True
    """
    positions = np.unique(np.asarray(removed, dtype=np.int64))
    return "without_" + array_digest(positions)["sha256"][:32]


def run_retrainings(
    ctx: RetrainContext,
    *,
    store: Store | None,
    executor: Executor | None,
    desc: str,
    show_progress: bool = True,
) -> tuple[np.ndarray, int]:
    """One row of ``ROW`` per removed set, and how many of them were read from ``store``.

    With a store, the retrainings it holds (``retraining_key``) are read back, the others computed
    (through ``executor``) and each written as soon as it arrives; an interrupt or error cancels the
    queued ones. A set that occurs twice is retrained once.
    """
    keys = [retraining_key(r) for r in ctx.removed]
    done: dict[str, np.ndarray] = {}
    if store is not None:
        for key in dict.fromkeys(keys):
            got = store.get(key)
            if got is not None and got[0].shape == (1, len(ROW)):
                done[key] = got[0][0]
    resumed = sum(key in done for key in keys)
    if resumed:
        logger.info(
            "%s: %d of %d retrainings read from store %s", desc, resumed, len(keys), store.path
        )  # type: ignore[union-attr]
    first: dict[str, int] = {}  # each set's first position, in order
    for j, key in enumerate(keys):
        first.setdefault(key, j)
    todo = [j for key, j in first.items() if key not in done]
    if todo:
        ex = resolve(executor)
        results = ex.map(_retrain_without, [np.array([j]) for j in todo], ex.share(ctx))
        try:
            for j, row in zip(
                todo, progress(results, desc=desc, total=len(todo), enabled=show_progress)
            ):
                done[keys[j]] = row[0]
                if store is not None:
                    store.put(keys[j], row)
        finally:
            results.close()
    return np.stack([done[key] for key in keys]), resumed


def describe_train_fn(
    train_fn: TrainFn | None, gtol: float, newton: bool = False
) -> dict[str, Any]:
    """What a retraining function's results depend on, for a store's fingerprint: its ``config()``
    if it has one, else its name and its plain (number, string, bool) attributes."""
    if train_fn is None:
        return {"name": "upweight.refit", "gtol": gtol, "newton": newton}
    qualname = getattr(train_fn, "__qualname__", None)  # functions have one, instances do not
    if qualname is not None:
        name, fields = f"{train_fn.__module__}.{qualname}", {}
    else:
        kind = type(train_fn)
        name, fields = (
            f"{kind.__module__}.{kind.__qualname__}",
            dict(getattr(train_fn, "__dict__", {})),
        )
    config = getattr(train_fn, "config", None)
    if callable(config):
        return {"name": name, **dict(config())}
    plain = {
        k: v
        for k, v in fields.items()
        if isinstance(v, (int, float, str, bool)) and not k.startswith("_")
    }
    return {"name": name, **plain}


def bind_store(
    store: StoreLike, influence: Influence, quantity: str, test: Data, retraining: dict[str, Any]
) -> Store | None:
    """``store`` opened and bound to retrainings of this model: θ̂, objective and data (as the
    influence engine's stores), the test points and the retraining settings — but not the solver or
    damping, which the retrainings do not depend on, nor the removed sets, each of which is kept
    under its own name (``retraining_key``)."""
    st = as_store(store)
    if st is None:
        return None
    fp = influence._fingerprint(quantity, np.zeros(0, dtype=np.int64), test)
    for key in ("solver", "damping", "train_selection", "hvp"):
        fp.pop(key, None)
    fp["retraining"] = retraining
    st.bind(fp)
    return st
