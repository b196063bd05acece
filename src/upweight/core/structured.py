"""Influence arithmetic that uses the structure of ``nn.Linear`` / ``nn.Conv2d`` layers instead of
materialising per-sample gradients or differentiating twice.

**Structured scoring** (the train side of I_up,loss, Koh & Liang 2017 Eq. 2). For a factorable
layer (``core.layers``) the per-sample gradient of W̃ = [W | bias] is gᵢ = Σₜ bᵢₜ ãᵢₜᵀ, so for a
query row q (a row of s_test, reshaped to the layer's (out, cols) block Q)

    qᵀgᵢ = Σₜ bᵢₜᵀ Q ãᵢₜ,

a batched contraction of the captured inputs ã and output cotangents b with Q: the (n, p) matrix
of per-sample gradients is never formed. For an ``nn.Embedding`` (ã one-hot, W = Eᵀ) the
contraction is a gather, Σₜ bᵢₜᵀ Q[:, xᵢₜ]. Parameters in no factorable layer get their per-point
gradients inside their own module from the same backward pass where it allows (``core.local``:
LayerNorms, position embeddings, …), else the per-sample (vmap∘grad) path restricted to them; the
parts are summed.

**Structured HVP** (exact). When θ is exactly the weight (and bias) of ONE ``nn.Linear`` whose
output is the model's output and whose input does not depend on θ (softmax / logistic / linear
regression, a frozen feature extractor with a trained linear head), the output zᵢ = W̃ãᵢ is
linear in θ, so ∇²θL(zᵢ) = Jᵢᵀ ∇²_zL(zᵢ) Jᵢ exactly (the Gauss–Newton matrix *is* the Hessian)
and, for a tangent V (out, cols),

    Σᵢ ∇²θL(zᵢ)[V] = Σᵢ (Hᵢ uᵢ) ãᵢᵀ,   uᵢ = V ãᵢ,   Hᵢ = ∇²_zL(zᵢ),

two matrix products per batch. Hᵢ comes from ``core.output_hessian``: applied in closed form for
the built-in losses, else the per-sample output Hessian from ``torch.func.hessian``, formed once
(it does not depend on V).
The layer inputs ã and the output-Hessian data are computed once and cached across the
solver's iterations when they fit in the memory budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError, UnsupportedModelError
from . import batching
from .data import Data, Inputs, map_inputs
from .grads import point_grads
from .layers import LayerBlock, LayerPlan, _layer_input, capture, find_layers, token_sums
from .objective import Objective
from .output_hessian import OutputHessian, closed_form, output_hessian
from .params import Params

# ── structured scoring ─────────────────────────────────────────────────────────────────


def subset_per_sample_grads(
    objective: Objective,
    params: Params,
    names: Sequence[str],
    batch: Data,
    *,
    measure: bool = False,
) -> torch.Tensor:
    """Per-sample ∇L(zᵢ) (``measure=True``: ∇f(zᵢ), the test measurement) with respect to the
    parameters ``names`` only (in θ order), shape (b, Σ sizes)."""
    sub = {n: params[n] for n in names}
    rest = {n: t for n, t in params.items() if n not in sub}
    fn = objective.measurements if measure else objective.losses

    def one(s: Params, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        return fn({**rest, **s}, map_inputs(x, lambda t: t.unsqueeze(0)), y.unsqueeze(0))[0]

    g = point_grads(one, sub, batch, objective)
    return torch.cat([g[n].reshape(len(batch), -1) for n in names], dim=1)


def structured_per_sample_grads(
    objective: Objective,
    plan: LayerPlan,
    batch: Data,
    params: Params | None = None,
    *,
    measure: bool = False,
    max_bytes: int = batching.CAPTURE_BYTES,
) -> torch.Tensor:
    """Rows ∇θL(zᵢ, θ) (``measure=True``: ∇θf(zᵢ, θ)) for the points of ``batch``, shape (b, p):
    ``core.grads.per_sample_grads`` from one forward and one backward pass per sub-batch, the batch
    split so that the captured layer inputs and cotangents take at most about ``max_bytes``.

    A factorable layer's rows are Σₜ bᵢₜãᵢₜᵀ from its captured inputs and output cotangents (for
    an ``nn.Embedding`` the cotangents summed into the columns of each point's tokens); a local
    module's come from the same backward pass (``core.local``); the parameters in no such module
    by the per-sample (vmap∘grad) path restricted to them. Needs no ``vmap`` over the model where
    ``plan.other`` is empty — a model ``vmap`` cannot batch (a Hugging Face encoder) then gets its
    per-point gradients without one backward pass per point.
    """
    params = params if params is not None else objective.params
    step = _split_step(objective, plan, batch, params, None, max_bytes)
    if step is None:
        return _grads_of(objective, plan, batch, params, measure)
    return torch.cat(
        [_grads_of(objective, plan, sub, params, measure) for sub in batch.batches(step)]
    )


def _grads_of(
    objective: Objective, plan: LayerPlan, batch: Data, params: Params, measure: bool
) -> torch.Tensor:
    """``structured_per_sample_grads`` of a batch that fits its memory bound, in one capture."""
    ref = next(iter(params.values()))
    b = len(batch)
    G = torch.zeros(b, objective.p, dtype=ref.dtype, device=ref.device)
    if plan.blocks or plan.local:
        cap = capture(
            objective,
            plan.blocks,
            batch,
            params=params,
            cotangents="measure" if measure else "loss",
            token_ids=True,
            local=plan.local,
        )
        for lm in plan.local:
            G[:, lm.index.to(G.device)] = cap.local_grads(lm)[0].to(G.dtype)
        for blk in plan.blocks:
            B = cap.g[blk.name][0].to(G.dtype)  # (b, T, out)
            index = blk.index.to(G.device)
            if blk.kind == "embedding":  # nonzero at each point's distinct tokens only
                points, tokens, sums = token_sums(cap.a[blk.name], B, blk.in_dim)
                G[points[:, None], index[:, tokens].T] = sums
            else:
                G[:, index] = torch.bmm(B.transpose(1, 2), cap.a[blk.name].to(G.dtype))
            del B
    if plan.other:
        other = subset_per_sample_grads(objective, params, plan.other, batch, measure=measure)
        G[:, plan.other_index.to(G.device)] = other.to(G.dtype)
    return G


def _block_scores(Q: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σₜ bᵢₜᵀ Qⱼ ãᵢₜ for Q (k, out, cols), A (b, T, cols), B (b, T, out) → (k, b).

    Contracts in the cheaper order: through Qã (b·T·cols·k·out multiply-adds) or through the
    layer's per-sample gradients Σₜ bᵢₜãᵢₜᵀ (b·T·out·cols + k·b·out·cols) — the latter only pays
    when a layer has many locations T (a convolution) and several queries.
    """
    k, out, cols = Q.shape
    b, T, _ = A.shape
    if T * k <= T + k:
        M = (A.reshape(b * T, cols) @ Q.reshape(k * out, cols).T).reshape(b, T, k, out)
        return torch.einsum("btko,bto->kb", M, B)
    G = torch.einsum("bto,btc->boc", B, A).reshape(b, out * cols)
    return Q.reshape(k, out * cols) @ G.T


def _embedding_table(Q: torch.Tensor) -> torch.Tensor:
    """An embedding block's queries Q (k, d, V) laid out for the gather: one row (d·k) per token,
    and a zero row V for padding (id −1, no gradient)."""
    k, d, V = Q.shape
    return torch.cat([Q.permute(2, 1, 0).reshape(V, d * k), Q.new_zeros(1, d * k)])


def _embedding_block_scores(
    table: torch.Tensor, ids: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """``_block_scores`` for an ``nn.Embedding`` block, whose ã are one-hot token vectors: Σₜ bᵢₜᵀ
    Qⱼ[:, xᵢₜ]. Each point's gradient has a nonzero column only at its distinct tokens (the
    cotangents summed there, ``core.layers.token_sums``), so the scores are one sparse (b, V·d)
    by dense (V·d, k) product with the query table (``_embedding_table``, (V + 1, d·k)): u·d·k
    multiply-adds for the u distinct (point, token) pairs, not the b·T·V·k·d of a product with
    the one-hots."""
    b = ids.shape[0]
    d = B.shape[-1]
    k = table.shape[1] // d
    V = table.shape[0] - 1
    points, tokens, sums = token_sums(ids, B, V)  # sorted by (point, token): coalesced
    offsets = torch.arange(d, device=ids.device)
    index = torch.stack([points.repeat_interleave(d), (tokens[:, None] * d + offsets).reshape(-1)])
    G = torch.sparse_coo_tensor(
        index, sums.reshape(-1), (b, (V + 1) * d), is_coalesced=True, check_invariants=False
    )
    return torch.sparse.mm(G, table.reshape((V + 1) * d, k)).T


def _capture_bytes_per_point(
    objective: Objective,
    plan: LayerPlan,
    point: Data,
    params: Params,
    queries: Queries | None,
) -> int:
    """Bytes that one point holds while it is scored against ``queries`` (``None``: while its
    gradient is assembled, ``structured_per_sample_grads``): its captured inputs and cotangents,
    and per layer the intermediate of the contraction that ``structured_scores`` runs for it
    (measured on ``point``)."""
    cap = capture(
        objective,
        plan.blocks,
        point,
        params=params,
        cotangents="loss",
        token_ids=True,
        local=plan.local,
    )
    k = 0 if queries is None else queries.k
    # the point's column of scores, and each local module's per-point gradient
    total = k + sum(lm.size for lm in plan.local)
    for blk in plan.blocks:
        T = cap.a[blk.name].shape[1]
        if blk.kind == "embedding":  # ids and cotangents; summed per token, two int64 indices
            total += T * (1 + blk.out_dim) + (T * blk.out_dim * 5 if k else 0)
            continue
        total += T * (blk.cols + blk.out_dim)
        if queries is None:  # the block's gradient, before it is put into the result
            total += blk.out_dim * blk.cols
            continue
        if blk.name in queries.lowrank:  # (T, k, r) twice
            total += 2 * T * k * queries.lowrank[blk.name][1].shape[1]
        elif T * k <= T + k:  # _block_scores through Qã
            total += T * k * blk.out_dim
        else:  # through the point's gradient
            total += blk.out_dim * blk.cols
    return total * next(iter(params.values())).element_size()


def _split_step(
    objective: Objective,
    plan: LayerPlan,
    batch: Data,
    params: Params,
    queries: Queries | None,
    max_bytes: int,
) -> int | None:
    """Points per sub-batch so that one capture (``_capture_bytes_per_point``) stays within
    ``max_bytes``, or ``None`` when the whole batch does (or nothing is captured)."""
    if not (plan.blocks or plan.local) or len(batch) <= 1:
        return None
    per_point = _capture_bytes_per_point(objective, plan, batch.subset([0]), params, queries)
    step = max(1, max_bytes // max(per_point, 1))
    return step if step < len(batch) else None


@dataclass(frozen=True)
class Queries:
    """Query rows S (k, p) split once for scoring many batches of training points
    (``prepare_queries``): per factorable layer its block Qⱼ (k, out, cols) — for an embedding the
    gather table, for a layer scored at reduced rank its truncated SVD factors — S on each local
    module's parameters, and S on the remaining parameters in no factorable layer. Gathering a
    layer's block from S copies k·out·cols numbers; a sweep over many chunks does it once, not per
    chunk."""

    k: int
    dense: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    other: torch.Tensor
    local: dict[str, torch.Tensor]


def factor_queries(
    plan: LayerPlan, S: torch.Tensor, rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rank-``rank`` truncated SVD Σᵣ σᵣuᵣvᵣᵀ of every query block Qⱼ (row j of S (k, p) on a
    layer's (out, cols) coordinates), per layer with min(out, cols) > rank (the others are scored
    exactly): ``{layer: (U·σ (k, out, r), Vᵀ (k, r, cols))}``."""
    out = {}
    for blk in plan.blocks:
        # an embedding's exact gather is cheaper
        if blk.kind != "embedding" and rank < min(blk.out_dim, blk.cols):
            # (k, out, m), (k, m), (k, m, cols)
            U, sig, Vh = torch.linalg.svd(S[:, blk.index], full_matrices=False)
            out[blk.name] = (
                (U[:, :, :rank] * sig[:, None, :rank]).contiguous(),
                Vh[:, :rank, :].contiguous(),
            )
    return out


def prepare_queries(
    plan: LayerPlan, S: torch.Tensor, dtype: torch.dtype, rank: int | None = None
) -> Queries:
    """``Queries`` for the rows of S (k, p) in ``dtype``; ``rank``: each layer's blocks by their
    rank-``rank`` truncated SVD (``factor_queries``) where that is smaller than the block."""
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise InputError(
            f"structured_scores: rank must be a positive integer or None; got {rank!r}."
        )
    S = S.to(dtype)
    lowrank = factor_queries(plan, S, rank) if rank is not None else {}
    dense, tables = {}, {}
    for blk in plan.blocks:
        if blk.name in lowrank:
            continue
        if blk.kind == "embedding":
            tables[blk.name] = _embedding_table(S[:, blk.index])
        else:
            dense[blk.name] = S[:, blk.index]
    local = {lm.name: S[:, lm.index] for lm in plan.local}
    return Queries(S.shape[0], dense, tables, lowrank, S[:, plan.other_index], local)


def _block_scores_lowrank(
    Us: torch.Tensor, Vh: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """``_block_scores`` with each Qⱼ = Σᵣ σᵣuᵣvᵣᵀ given by its factors (``factor_queries``):
    Σₜ Σᵣ σᵣ(bᵢₜᵀuᵣ)(vᵣᵀãᵢₜ), b·T·k·r·(out + cols) multiply-adds instead of b·T·k·out·cols."""
    Bu = torch.einsum("bto,kor->btkr", B, Us)
    Av = torch.einsum("btc,krc->btkr", A, Vh)
    return (Bu * Av).sum(dim=(1, 3)).T


def structured_scores(
    objective: Objective,
    plan: LayerPlan,
    batch: Data,
    S: torch.Tensor | None = None,
    params: Params | None = None,
    *,
    max_bytes: int = batching.CAPTURE_BYTES,
    rank: int | None = None,
    queries: Queries | None = None,
) -> torch.Tensor:
    """sⱼᵀ∇θL(zᵢ, θ) for every row sⱼ of S (k, p) and every point of ``batch``: shape (k, b).

    Equal to ``S @ per_sample_grads(batch).T`` (Koh & Liang 2017, Eq. 2 without the sign), but the
    factorable layers are scored from their inputs and output cotangents (one forward and one
    backward pass per sub-batch) instead of materialising (b, p) gradients. The batch is split so
    that the captured layer inputs (for a convolution: every unfolded patch) and the contraction's
    intermediates take at most about ``max_bytes``.

    ``rank``: score each layer with the rank-``rank`` truncated SVD of its query blocks Qⱼ instead
    (an approximation unless ``rank`` ≥ min(out, cols), when the exact contraction is used); worth
    it only for wide layers, where k·out·cols ≫ k·rank·(out + cols). ``queries``: S already split
    by ``prepare_queries(plan, S, dtype, rank)`` (then S and ``rank`` are not needed) — a sweep over
    many chunks of training points splits its queries once.
    """
    params = params if params is not None else objective.params
    dtype = next(iter(params.values())).dtype
    if queries is None:
        if S is None:
            raise InputError(
                "structured_scores: give the query rows S (k, p) or their prepare_queries(...)."
            )
        queries = prepare_queries(plan, S.reshape(-1, objective.p), dtype, rank)
    step = _split_step(objective, plan, batch, params, queries, max_bytes)
    if step is None:
        return _scores_of(objective, plan, batch, params, queries)
    return torch.cat(
        [_scores_of(objective, plan, sub, params, queries) for sub in batch.batches(step)], dim=1
    )


def _scores_of(
    objective: Objective, plan: LayerPlan, batch: Data, params: Params, queries: Queries
) -> torch.Tensor:
    """``structured_scores`` of a batch that fits its memory bound, in one capture."""
    dtype = next(iter(params.values())).dtype
    out = torch.zeros(queries.k, len(batch), dtype=dtype, device=next(iter(params.values())).device)
    if plan.blocks or plan.local:
        cap = capture(
            objective,
            plan.blocks,
            batch,
            params=params,
            cotangents="loss",
            token_ids=True,
            local=plan.local,
        )
        for lm in plan.local:
            out += queries.local[lm.name].to(dtype) @ cap.local_grads(lm)[0].to(dtype).T
        for blk in plan.blocks:
            B = cap.g[blk.name][0].to(dtype)
            if blk.name in queries.tables:
                out += _embedding_block_scores(
                    queries.tables[blk.name].to(dtype), cap.a[blk.name], B
                )
                continue
            A = cap.a[blk.name].to(dtype)
            if blk.name in queries.lowrank:
                Us, Vh = queries.lowrank[blk.name]
                out += _block_scores_lowrank(Us.to(dtype), Vh.to(dtype), A, B)
            else:
                out += _block_scores(queries.dense[blk.name].to(dtype), A, B)
    if plan.other:
        G = subset_per_sample_grads(objective, params, plan.other, batch)
        out += queries.other.to(G.dtype) @ G.T
    return out


def check_scoring_plan(
    objective: Objective, plan: LayerPlan, probe: Data, *, rtol: float = 1e-4
) -> str | None:
    """Check by construction that the layer factorisation gives the true per-sample gradients on
    (at most) two probe points, through four random query rows; returns ``None`` if it does, else
    why not (e.g. a weight also used outside its layer, in a plan from ``find_layers`` without
    probe points — with them, find_layers leaves such a layer out)."""
    from .grads import per_sample_grads  # the generic path, only for this check

    batch = probe.subset(range(min(2, len(probe))))
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(4, objective.p, generator=gen, dtype=torch.float64).to(objective.dtype)
    try:
        got = structured_scores(objective, plan, batch, S)
    except UnsupportedModelError as exc:
        return str(exc)
    G = per_sample_grads(objective, objective.params, batch)
    ref = S @ G.T
    bound = S.norm(dim=1)[:, None] * G.norm(dim=1)[None, :]
    err = (got - ref).abs()
    if bool((err > rtol * bound + 1e-30).any()):
        return (
            "the layer factorisation Σₜ bₜãₜᵀ differs from the per-sample gradient (relative error"
            f" {float((err / bound.clamp_min(1e-30)).max()):.2e}) on a probe point — a factored"
            " weight is probably also used outside its layer"
        )
    return None


def scoring_plan(objective: Objective, data: Data) -> tuple[LayerPlan, str | None]:
    """The factorable layers of θ for structured scoring, and why it cannot be used (or ``None``).

    Returns the plan of ``find_layers`` and a reason string when there is no factorable layer or
    the factorisation fails the probe check.
    """
    # token ids: any vocabulary; module-local gradients for the rest where their module allows
    plan = find_layers(objective, data, embeddings=True, max_vocab=None, local=True, max_local=None)
    if not plan.blocks:
        reasons = "; ".join(f"{n}: {r}" for n, r in plan.reasons.items())
        return (
            plan,
            (
                "no parameter of θ is in a factorable nn.Linear / nn.Conv2d / nn.Embedding"
                f" ({reasons})"
            ),
        )
    return plan, check_scoring_plan(objective, plan, data)


# ── structured HVP for a linear output layer ───────────────────────────────────────────
_PURPOSE = "The structured HVP"
_FIX = "Pass Curvature(structured=False) / Influence(structured=False)."


def _forward_with_input(
    objective: Objective, blk: LayerBlock, params: Params, X: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Run the model once; return (layer input, layer output, model output, input depends on θ)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, inp, out):
        seen["inp"], seen["out"] = inp[0], out

    params = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    h = blk.module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            model_out = objective.outputs(params, X)
    finally:
        h.remove()
    if "inp" not in seen:
        raise UnsupportedModelError(f"Layer '{blk.name}' was not called in the forward pass.")
    return seen["inp"], seen["out"], model_out, bool(seen["inp"].requires_grad)


def linear_output_layer(objective: Objective, probe: Data) -> tuple[LayerBlock | None, str]:
    """The ``nn.Linear`` whose weight (and bias) are exactly θ and whose output is the model's
    output, with an input that does not depend on θ — or ``None`` and why the structured HVP does
    not apply. Checked by construction on two probe points."""
    plan = find_layers(objective, probe)
    if plan.other or len(plan.blocks) != 1:
        return (
            None,
            (
                f"θ is not exactly the parameters of one nn.Linear ({len(plan.blocks)} factorable"
                f" layers; other parameters: {list(plan.other)})"
            ),
        )
    blk = plan.blocks[0]
    if blk.kind != "linear":
        return None, f"θ is the parameters of a {blk.kind} layer, not an nn.Linear"
    inp, out, model_out, depends = _forward_with_input(
        objective, blk, objective.params, probe.subset(range(min(2, len(probe)))).X
    )
    if out is not model_out:
        return (
            None,
            f"the output of nn.Linear '{blk.name}' is not returned unchanged as the model's output",
        )
    if depends:
        return None, f"the input of nn.Linear '{blk.name}' depends on θ"
    if inp.ndim != 2 or model_out.ndim != 2:
        return (
            None,
            (
                f"nn.Linear '{blk.name}' sees inputs of shape {tuple(inp.shape)}; only (batch,"
                " features) is structured"
            ),
        )
    return (
        blk,
        (
            "θ is one nn.Linear producing the model output from θ-independent inputs: H = Σᵢ"
            " Jᵢᵀ∇²_zLᵢ Jᵢ exactly"
        ),
    )


class LinearOutputHVP:
    """Exact Σᵢ∇²θL(zᵢ)V for θ = one output ``nn.Linear`` (see the module docstring), by matmuls.

    Args:
        objective: the model and loss; ``block`` is its output layer (``linear_output_layer``).
        block: that layer.
        params: θ̂ in the compute dtype.
        data: the training data (already in the compute dtype).
        batch_size: points per matmul chunk.
        cache_bytes: keep every chunk's inputs ã and output-Hessian data in memory across calls
            when they take at most this many bytes (for logistic regression ã is X with a column
            of ones); else recompute them (one forward pass of the model per chunk) on each call.
            Products in a lower operand dtype (``hvp_sum_all(V, operand_dtype)``) keep a copy of the
            cached ã in that dtype beside it (bfloat16: half the bytes of float32).
    """

    def __init__(
        self,
        objective: Objective,
        block: LayerBlock,
        params: Params,
        data: Data,
        *,
        batch_size: int,
        cache_bytes: int,
    ) -> None:
        self.objective, self.block, self.params, self.data = objective, block, params, data
        self.batch_size = batch_size
        self.index = block.index.reshape(-1)
        self.dtype = next(iter(params.values())).dtype
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        c = block.out_dim
        per_point = block.cols + (c * c if closed_form(objective.loss_fn, (c,)) is None else c)
        self.cached = len(data) * per_point * itemsize <= cache_bytes
        self._chunks: list[tuple[torch.Tensor, OutputHessian]] | None = None
        # ã in an operand dtype
        self._low_chunks: dict[torch.dtype, list[tuple[torch.Tensor, OutputHessian]]] = {}

    def factors(self, batch: Data) -> tuple[torch.Tensor, OutputHessian]:
        """ã (b, cols) and ∇²_zL for one batch, from one forward pass."""
        seen: dict[str, torch.Tensor] = {}

        def hook(_m, inp, _out):
            seen["inp"] = inp[0]

        h = self.block.module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = self.objective.outputs(self.params, batch.X)
        finally:
            h.remove()
        A = _layer_input(self.block, seen["inp"], self.dtype).reshape(len(batch), self.block.cols)
        return A.to(self.dtype), output_hessian(
            self.objective.loss_fn,
            out.to(self.dtype),
            batch.y,
            name=self.objective.loss_name,
            purpose=_PURPOSE,
            fix=_FIX,
        )

    def _iter_factors(self) -> Iterator[tuple[torch.Tensor, OutputHessian]]:
        if self._chunks is not None:
            yield from self._chunks
            return
        chunks = []
        for batch in self.data.batches(self.batch_size):
            f = self.factors(batch)
            if self.cached:
                chunks.append(f)
            yield f
        if self.cached:
            self._chunks = chunks

    def _apply(
        self, V: torch.Tensor, factors, operand_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Σ over ``factors`` of (Hᵢuᵢⱼ)ãᵢᵀ; with ``operand_dtype`` the two products take their
        operands in that dtype (ã already is) and their results come back to the compute dtype,
        where Hᵢ is applied and the batches are summed."""
        k = V.shape[0]
        blk = self.block
        Vm = V[:, self.index].reshape(k * blk.out_dim, blk.cols)
        if operand_dtype is not None:
            Vm = Vm.to(operand_dtype)
        acc = V.new_zeros(k * blk.out_dim, blk.cols, dtype=self.dtype)
        for A, oc in factors:
            # uᵢⱼ = Vⱼãᵢ: output tangents
            U = (A @ Vm.T).to(self.dtype).reshape(len(A), k, blk.out_dim)
            W = oc.apply(U).reshape(len(A), k * blk.out_dim).to(A.dtype)
            acc += W.T @ A  # Σᵢ (Hᵢuᵢⱼ) ãᵢᵀ (added in the compute dtype)
        out = torch.zeros_like(V)
        out[:, self.index] = acc.reshape(k, -1)
        return out

    def _iter_low_factors(self, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, OutputHessian]]:
        """``_iter_factors`` with ã in ``dtype``, cached beside the compute-dtype chunks when those
        are."""
        if dtype in self._low_chunks:
            yield from self._low_chunks[dtype]
            return
        chunks = []
        for A, oc in self._iter_factors():
            f = (A.to(dtype), oc)
            if self.cached:
                chunks.append(f)
            yield f
        if self.cached:
            self._low_chunks[dtype] = chunks

    def hvp_sum_all(
        self, V: torch.Tensor, operand_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Σᵢ ∇²θL(zᵢ)vⱼ over all the data for V (k, p) → (k, p). ``operand_dtype`` (e.g.
        torch.bfloat16): the two matrix products per batch take their operands in that dtype — mixed
        precision, about 2⁻⁸ relative error per product in bfloat16 — while Hᵢ and the sums stay in
        the compute dtype.
        """
        V = V.to(self.dtype)
        if operand_dtype is None or operand_dtype == self.dtype:
            return self._apply(V, self._iter_factors())
        return self._apply(V, self._iter_low_factors(operand_dtype), operand_dtype)

    def hvp_sum(self, V: torch.Tensor, batch: Data) -> torch.Tensor:
        """Σ_{i∈batch} ∇²θL(zᵢ)vⱼ for V (k, p) → (k, p) (no caching)."""
        return self._apply(V.to(self.dtype), [self.factors(batch)])

    def dense_sum(self) -> torch.Tensor:
        """Σᵢ ∇²θL(zᵢ) as a dense matrix over the layer's coordinates (in vec(W̃) row-major order,
        i.e. θ's coordinates ``self.index``), formed in closed form instead of from p HVPs:

            Σᵢ Hᵢ ⊗ ãᵢãᵢᵀ,   block (c, c') = Ãᵀ diag(Hᵢ[c, c']) Ã,

        for the pairs c ≤ c' of output coordinates (the others by symmetry; only the diagonal pairs
        where Hᵢ is diagonal). That is ½c(c+1)·n·cols² multiply-adds against the 4·n·c·cols·p of p
        HVPs: for softmax regression 2·p/(c + 1)-fold fewer. The blocks of one row c are one product
        Ãᵀ [Hᵢ[c, c']ãᵢ]_{c' ≥ c}, (cols × b) @ (b × m·cols), rather than m small ones.
        """
        blk = self.block
        c, cols = blk.out_dim, blk.cols
        acc = torch.zeros(c, cols, c, cols, dtype=self.dtype, device=self.objective.device)
        for A, oc in self._iter_factors():
            b = len(A)
            for i in range(c):
                pairs = [(j, w) for j in range(i, c) if (w := oc.entry(i, j)) is not None]
                if not pairs:
                    continue
                W = torch.stack([w for _, w in pairs], dim=1)  # (b, m): Hᵢ[c, c'] per point
                # (cols, m·cols)
                row = A.T @ (W[:, :, None] * A[:, None, :]).reshape(b, len(pairs) * cols)
                for k, (j, _) in enumerate(pairs):
                    acc[i, :, j, :] += row[:, k * cols : (k + 1) * cols]
        for i in range(c):
            for j in range(i + 1, c):
                acc[j, :, i, :] = acc[i, :, j, :].T
        return acc.reshape(c * cols, c * cols)
