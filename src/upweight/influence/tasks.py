"""The train-side sweeps of ``Influence`` as executor tasks: contexts, chunk functions and the
sweep.

``up_loss`` and ``self_influence`` score the training points chunk by chunk: each chunk of
training positions is one task ``fn(positions, ctx, *args)`` run by an ``Executor`` (in-process,
or on Dask workers), with ``ctx`` a task context — the objective (θ̂) and the training data, plus
what the task needs besides — placed where the tasks run once per executor and fit
(``Executor.share``).

The chunk functions are module-level so that an executor can send them to a worker by reference
(a worker imports this module). A task on a worker thread takes that thread's copy of the context
(``_private``), since ``torch.func.functional_call`` swaps the model's parameters while it runs.
``sweep`` maps a chunk function over the chunks and, given a store's ``ChunkedArray``, computes
only the chunks the store is missing and writes each as it arrives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._checks import check_finite, check_rows_finite
from .._executor import Executor, thread_private
from .._progress import logger, progress
from ..core.data import Data
from ..core.grads import per_sample_grads
from ..core.layers import LayerPlan
from ..core.objective import Objective
from ..core.structured import Queries, structured_scores
from ..solvers import InverseHVPSolver, Solution
from ..store import ChunkedArray

#: the fix named when a training point's gradient or score is NaN or infinite
TRAIN_FIX = (
    "Check that training point for extreme input values or a label the loss cannot take; its model"
    " output may overflow at θ̂ (evaluate the model in float64: model.double())."
)


class _GradContext:
    """What a scoring task needs, sent to each worker once: the objective (θ̂) and the training
    data."""

    def __init__(self, objective: Objective, data: Data) -> None:
        self.objective, self.data = objective, data


class _SolveContext(_GradContext):
    """A ``_GradContext`` plus the prepared solver, for tasks that solve (H + δI)x = ∇θL(z)."""

    def __init__(
        self, objective: Objective, data: Data, solver: InverseHVPSolver, state: Any
    ) -> None:
        super().__init__(objective, data)
        self.solver, self.state = solver, state


class _StructuredContext(_GradContext):
    """A ``_GradContext`` plus the layer plan for structured scoring (its blocks refer to modules of
    this objective's model, so the two always travel together)."""

    def __init__(self, objective: Objective, data: Data, plan: LayerPlan) -> None:
        super().__init__(objective, data)
        self.plan = plan


def _private(ctx: _GradContext) -> Any:
    """The task context itself on the main thread, else this thread's copy of it
    (``_executor.thread_private``); the training data is shared, not copied."""
    d = ctx.data
    return thread_private(ctx, share=(d, d.X, d.y, d.ids))


def _chunk_grads(indices: np.ndarray, ctx: _GradContext) -> torch.Tensor:
    """Per-sample ∇θL(zᵢ, θ̂) of the training points at ``indices``, shape (b, p); a NaN or inf row
    raises ``NonFiniteError`` naming the point."""
    batch = ctx.data.subset(torch.from_numpy(np.asarray(indices, dtype=np.int64)))
    G = per_sample_grads(ctx.objective, ctx.objective.params, batch)
    check_rows_finite(G, batch.ids, "The training-loss gradient ∇θL(z, θ̂)", TRAIN_FIX)
    return G


def _up_loss_chunk(indices: np.ndarray, ctx: _GradContext, S: torch.Tensor | Queries) -> np.ndarray:
    """−s_testⱼᵀ∇θL(zᵢ, θ̂) for the chunk's training points i, shape (k, b) — Eq. 2's train side.

    A ``_StructuredContext`` scores by structured scoring (``_up_loss_chunk_structured``) with
    s_test already split by layer (``Queries``, each layer's blocks at ``Influence(query_rank=…)``
    when it is set); otherwise S is s_test (k, p), against per-sample gradients."""
    if isinstance(ctx, _StructuredContext):
        assert isinstance(S, Queries)
        return _up_loss_chunk_structured(indices, ctx, S)
    # Influence.fit refuses it
    assert isinstance(S, torch.Tensor), "query_rank needs structured scoring"
    G = _chunk_grads(indices, _private(ctx))
    return (-(S.to(G.dtype) @ G.T)).detach().cpu().numpy()


def _up_loss_chunk_structured(
    indices: np.ndarray, ctx: _StructuredContext, queries: Queries
) -> np.ndarray:
    """``_up_loss_chunk`` by structured scoring: each layer's s_testᵀ∇L(zᵢ) from its inputs and
    output cotangents (``core.structured.structured_scores``), shape (k, b)."""
    ctx = _private(ctx)
    batch = ctx.data.subset(torch.from_numpy(np.asarray(indices, dtype=np.int64)))
    scores = structured_scores(ctx.objective, ctx.plan, batch, queries=queries)
    check_rows_finite(
        scores, batch.ids, "The score s_testᵀ∇θL(z, θ̂) of a training point", TRAIN_FIX, dim=1
    )
    return (-scores).detach().cpu().numpy()


def _self_influence_chunk(indices: np.ndarray, ctx: _SolveContext) -> tuple[np.ndarray, Solution]:
    """(2, b): −∇θL(zᵢ)ᵀ(H + δI)⁻¹∇θL(zᵢ) and each solve's relative residual; plus the Solution
    without its (b, p) value, whose residual the caller checks."""
    ctx = _private(ctx)
    G = _chunk_grads(indices, ctx)
    sol = ctx.solver.solve(ctx.state, G)
    check_finite(
        sol.value, f"The {ctx.solver.name} solution", "Add damping or check the model at θ̂."
    )
    vals = -(G * sol.value.to(G.dtype)).sum(1)
    out = torch.stack([vals, sol.residual.to(vals.dtype).reshape(-1)]).detach().cpu().numpy()
    return out, dataclasses.replace(sol, value=torch.empty(0, G.shape[1], dtype=G.dtype))


def sweep(
    fn: Callable[..., Any],
    positions: np.ndarray,
    ex: Executor,
    ctx: Any,
    args: tuple[Any, ...],
    arr: ChunkedArray | None,
    shape: tuple[int, ...],
    *,
    axis: int,
    desc: str,
    chunk: int,
    dtype: str,
    show_progress: bool,
    on_result: Callable[[Any], np.ndarray] | None = None,
) -> np.ndarray:
    """Run ``fn(chunk_positions, ctx, *args)`` over chunks of the training positions through ``ex``
    and join the results along ``axis`` into an array of ``shape``.

    Chunks are ``chunk`` points (a store's array keeps the chunk size it was written with), so
    results do not depend on the executor. With a store's array ``arr`` only its missing chunks are
    computed, each written as it arrives, and the result is assembled from the store. ``on_result``
    turns a task's result into the chunk's values (and may check it) before it is kept. ``dtype``
    (a NumPy dtype name) is that of the empty result when there are no positions; ``show_progress``
    shows a progress bar.
    """
    chunk = chunk if arr is None else arr.chunk_size
    parts = [positions[s : s + chunk] for s in range(0, len(positions), chunk)]
    todo = list(range(len(parts))) if arr is None else arr.missing()
    if arr is not None and len(todo) < len(parts):
        logger.info(
            "%s: %d of %d chunks already in store %s",
            desc,
            len(parts) - len(todo),
            len(parts),
            arr.store.path,
        )
    done: dict[int, np.ndarray] = {}
    results = progress(
        ex.map(fn, [parts[i] for i in todo], ctx, *args),
        desc=desc,
        total=len(todo),
        enabled=show_progress,
    )
    try:
        for i, res in zip(todo, results):
            values = on_result(res) if on_result is not None else res
            if arr is not None:
                arr.write(i, values)
            else:
                done[i] = values
    finally:
        results.close()  # an error or interrupt cancels the chunks still queued on the executor
    if arr is not None:
        return arr.assemble()
    if not parts:
        return np.zeros(shape, dtype=dtype)
    return np.concatenate([done[i] for i in range(len(parts))], axis=axis)
