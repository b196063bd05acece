"""Per-sample gradients ∇θL(zᵢ, θ) (vmap∘grad), ∇R, and the mixed derivative ∇x∇θL for
I_pert,loss — all streamed over the data in chunks so n × p is never held unless asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from .._checks import check_finite
from .._progress import logger, progress_bar
from ..errors import InputError, UnsupportedModelError
from . import batching
from .data import Data, Inputs, map_inputs
from .objective import Objective
from .params import Params


def _single(fn, objective: Objective):
    def f(params: Params, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        return fn(objective, params, map_inputs(x, lambda t: t.unsqueeze(0)), y.unsqueeze(0))[0]

    return f


def _loss(objective: Objective, params: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return objective.losses(params, X, y)


def _measure(
    objective: Objective, params: Params, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return objective.measurements(params, X, y)


def vmap_model_error(exc: BaseException) -> UnsupportedModelError | None:
    """The model-level cause of a torch.func error raised while vmapping the model, or ``None``.

    vmap refuses a random operation (dropout in training mode, or F.dropout without
    ``training=self.training``) and grad refuses an in-place update of a captured tensor (a
    BatchNorm in training mode updating its running statistics); both mean the model is not one
    fixed function of θ.
    """
    msg = str(exc)
    if "randomness" in msg and "vmap" in msg:
        return UnsupportedModelError(
            "The model is random in this mode (dropout?) — call model.eval(): torch.func.vmap"
            " refused a random operation while computing per-sample gradients. A custom module"
            " must pass training=self.training to F.dropout (its default is training=True). torch"
            f" said: {msg}"
        )
    if "in-place operation" in msg and "captured Tensor" in msg:
        return UnsupportedModelError(
            "The model updates a tensor in place during its forward (BatchNorm in training mode"
            " updating its running statistics?), which per-sample gradients cannot follow — call"
            " model.eval(). torch said: " + msg
        )
    return None


def _vmapped(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with torch.func's errors that mean a random or self-modifying model re-raised
    as ``UnsupportedModelError`` (the original kept as ``__cause__``)."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        err = vmap_model_error(exc)
        if err is None:
            raise
        raise err from exc


def per_sample_grads(
    objective: Objective, params: Params, batch: Data, *, measure: bool = False
) -> torch.Tensor:
    """Rows ∇θL(zᵢ, θ) (or ∇θf(zᵢ, θ) with ``measure=True``) for one batch, shape (b, p).

    The regulariser is not included: upweighting z adds ε·L(z, θ) to R (Koh & Liang 2017, §2.1).
    """
    f = _single(_measure if measure else _loss, objective)
    return objective.space.flatten(point_grads(f, params, batch, objective), batch_dims=1)


def point_grads(
    f: Callable[..., torch.Tensor], params: Params, batch: Data, objective: Objective
) -> Params:
    """∇ of ``f(params, xᵢ, yᵢ)`` (one point's scalar) with respect to ``params``, for every point
    of ``batch``: a dict of (b, *shape) tensors. By ``vmap`` over the points; for a model ``vmap``
    cannot batch (Hugging Face encoders build their attention masks with data-dependent branches) by
    one backward pass per point, decided once per objective and logged."""
    if objective._vmap_refused is None:
        try:
            return _vmapped(vmap(grad(f), in_dims=(None, 0, 0)), params, batch.X, batch.y)
        except RuntimeError as exc:
            if not _vmap_unsupported(exc):
                raise
            objective._vmap_refused = str(exc).split("\n")[0]
            logger.info(
                "per-sample gradients: torch.func.vmap cannot batch this model (%s); one backward"
                " pass per point from now on",
                objective._vmap_refused,
            )
    rows = []
    for i in range(len(batch)):
        one = batch.subset([i])
        rows.append(grad(f)(params, map_inputs(one.X, lambda t: t[0]), one.y[0]))
    if not rows:
        return {k: t.new_zeros((0, *t.shape)) for k, t in params.items()}
    return {k: torch.stack([r[k] for r in rows]) for k in params}


def _vmap_unsupported(exc: RuntimeError) -> bool:
    """Whether vmap refused the model itself (data-dependent control flow, ``.item()``, an operator
    without a batching rule) rather than the model being wrong — then a loop over points works."""
    msg = str(exc)
    return "vmap" in msg and any(
        k in msg
        for k in (
            "data-dependent",
            ".item()",
            "Batching rule not implemented",
            "not supported with vmap",
            "does not support",
        )
    )


def grad_chunk_size(
    p: int, batch_size: int, dtype: torch.dtype, max_bytes: int | None = None
) -> int:
    """Points per per-sample-gradient chunk: at most ``batch_size``, and b × p values ≤
    ``max_bytes`` (default ``core.batching.TENSOR_BYTES``: chunks below glibc's mmap threshold are
    not page-faulted in anew each time; see ``core.batching``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = batching.TENSOR_BYTES if max_bytes is None else max_bytes
    return batching.points_within(budget, p * itemsize, batch_size)


def iter_per_sample_grads(
    objective: Objective,
    params: Params,
    data: Data,
    batch_size: int,
    *,
    measure: bool = False,
    max_bytes: int | None = None,
) -> Iterator[tuple[Data, torch.Tensor]]:
    """Yield ``(batch, G_batch)`` with G_batch of shape (b, p), one memory-bounded chunk at a time.

    b is ``batch_size`` or less, so that one chunk of gradients takes at most ``max_bytes``
    (``grad_chunk_size``).
    """
    chunk = grad_chunk_size(objective.p, batch_size, objective.dtype, max_bytes)
    for batch in data.batches(chunk):
        yield batch, per_sample_grads(objective, params, batch, measure=measure)


def risk(
    objective: Objective,
    params: Params,
    data: Data,
    batch_size: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """R(θ) = (1/n) Σᵢ wᵢ L(zᵢ, θ) + (l2/2)‖θ‖², n = len(data); w = 1 unless given (per point, shape
    (n,))."""
    n = len(data)
    total = 0.0
    for s, batch in zip(range(0, n, batch_size), data.batches(batch_size)):
        losses = objective.losses(params, batch.X, batch.y)
        if weights is not None:
            losses = losses * weights[s : s + len(batch)].to(losses.dtype)
        total = total + losses.sum()
    return total / n + objective.regularizer(params)


def graph_bytes_per_point(
    obj: Objective, params: Params, data: Data, *, second_order: bool = True
) -> float:
    """Bytes autograd saves per training point for a batch's graph: of the loss alone
    (``second_order=False``: what one backward pass, e.g. ∇R, needs) or also of its gradient with
    ``create_graph=True`` (``hvp_sum``'s double-backward graph) — the difference between the graphs
    of 8 points and of 1, / 7.

    Each storage counts once (views and tensors saved by several operations); what does not grow
    with the batch (the parameters themselves) cancels in the difference. 0 when the data has < 8
    points.
    """
    if len(data) < 8:
        return 0.0

    def saved_bytes(batch: Data) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:  # one entry per storage: views and repeated saves of one tensor count once
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            # no plain storage (e.g. sparse): count it by identity
            except (RuntimeError, NotImplementedError):
                seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            leaves = {name: t.detach().requires_grad_(True) for name, t in params.items()}
            loss = obj.losses(leaves, batch.X, batch.y).sum()
            if second_order and loss.requires_grad:
                torch.autograd.grad(
                    loss, list(leaves.values()), create_graph=True, allow_unused=True
                )
        return sum(seen.values())

    one, eight = (saved_bytes(data.subset(torch.arange(m))) for m in (1, 8))
    return max(eight - one, 0) / 7


def risk_grad(
    objective: Objective,
    params: Params,
    data: Data,
    batch_size: int,
    weights: torch.Tensor | None = None,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """∇R(θ) as a flat vector (p,), one batch at a time: at most ``batch_size`` points, and so few
    that the batch's autograd graph stays within ``batching.GRAPH_BYTES`` (measured per point,
    ``graph_bytes_per_point``; a transformer's activations make a batch of thousands of sequences
    a large graph). ``progress``: a bar over the batches (``upweight._progress``)."""
    n = len(data)
    step = batching.points_within(
        batching.GRAPH_BYTES,
        graph_bytes_per_point(objective, params, data, second_order=False),
        batch_size,
        batching.MIN_GRAPH_BATCH,
    )
    g: torch.Tensor | None = None
    with progress_bar(
        desc="∇R(θ̂) over the training points", total=-(-n // step), unit="batch", enabled=progress
    ) as bar:
        for s, batch in zip(range(0, n, step), data.batches(step)):
            w = None if weights is None else weights[s : s + len(batch)]

            def part(
                p: Params, batch: Data = batch, w: torch.Tensor | None = w, first: bool = s == 0
            ) -> torch.Tensor:
                losses = objective.losses(p, batch.X, batch.y)
                total = (losses if w is None else losses * w.to(losses.dtype)).sum() / n
                return total + objective.regularizer(p) if first else total

            gb = objective.space.flatten(grad(part)(params))
            g = gb if g is None else g + gb
            bar.update(1)
    assert g is not None, "risk_grad needs at least one training point"
    return g


def pert_directions(
    objective: Objective, params: Params, batch: Data, S: torch.Tensor
) -> torch.Tensor:
    """∇x (sⱼ · ∇θL(xᵢ, yᵢ, θ)) for every row sⱼ of S (k, p) and point i: shape (k, b, *x_shape).

    sᵀ∇θL(x, θ) is the directional derivative of L along s, a JVP in θ; its gradient in x is the
    mixed derivative sᵀ∇x∇θL that I_pert,loss needs (Koh & Liang 2017, Eq. 5).
    """
    if batch.is_dict:
        raise InputError(
            "I_pert,loss differentiates the loss with respect to one continuous input tensor, but"
            f" these inputs are a dict {sorted(batch.X)} (e.g. token ids and masks). Use up_loss"
            " instead."
        )
    if not batch.X.is_floating_point():
        raise InputError(
            "I_pert,loss differentiates the loss with respect to the inputs, but X has dtype"
            f" {batch.X.dtype} (e.g. token ids). Perturbation influence needs continuous inputs;"
            " use up_loss instead."
        )
    f = _single(_loss, objective)
    tangents = objective.space.unflatten(S)

    def directional(x: torch.Tensor, y: torch.Tensor, t: Params) -> torch.Tensor:
        return jvp(lambda p: f(p, x, y), (params,), (t,))[1]

    per_point = grad(directional)  # ∇x of the directional derivative
    over_points = vmap(per_point, in_dims=(0, 0, None))
    out = _vmapped(
        vmap(over_points, in_dims=(None, None, 0)), batch.X.to(S.dtype), batch.y, tangents
    )
    check_finite(out, "∇x∇θL")
    return out
