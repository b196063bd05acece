"""Kronecker factors of the Gauss–Newton matrix per layer (K-FAC) and their eigenvalue
correction (EK-FAC), streamed over the training data.

For a factorable layer (``core.layers``) with W̃ = [W | bias] of shape (out, in+1), the
Gauss–Newton matrix G = (1/n) Σᵢ Jᵢᵀ ∇²_zL(zᵢ) Jᵢ restricted to vec(W̃) (row-major) is

    G_W̃ = (1/n) Σᵢ Σₖ vec(Σₜ bᵢₖₜãᵢₜᵀ) vec(Σₜ bᵢₖₜãᵢₜᵀ)ᵀ,

with cᵢₖ the factors of the output Hessian and bᵢₖₜ their back-propagated cotangents. K-FAC
(Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) replaces it by S ⊗ A with

    A = (1/n) Σᵢ Σₜ ãᵢₜãᵢₜᵀ,        S = (1/n) Σᵢ Σₖ (1/T) Σₜ bᵢₖₜbᵢₖₜᵀ,

exact when one point is used, or when every output Hessian is the same constant (the squared
loss of a linear model: G = I ⊗ E[ããᵀ]). With A = Q_A diag(α) Q_Aᵀ and S = Q_S diag(σ) Q_Sᵀ,
S ⊗ A = (Q_S ⊗ Q_A) diag(σ ⊗ α) (Q_S ⊗ Q_A)ᵀ. EK-FAC (George et al. 2018; Grosse et al. 2023)
keeps the Kronecker eigenbasis but replaces σ ⊗ α by the diagonal of G_W̃ in that basis,

    Λ_{oj} = (1/n) Σᵢ Σₖ ((Q_Sᵀ (Σₜ bᵢₖₜãᵢₜᵀ) Q_A)_{oj})²,

the Frobenius-closest matrix to G_W̃ with that eigenbasis. Both need only passes over the data
in batches; nothing of size n × p is held. Both passes are sums over the training points, so
with an ``Executor`` (``upweight.distributed.DaskExecutor``) each is one map-reduce over index
partitions of the data, the eigendecompositions staying on the client (``fit_factors``).

**Sampled output-Hessian factors** (``fit_factors(sampling=…)``). Where the c exact factors cᵢₖ are
too many (a language model: T positions × V words), M random cotangents uᵢₘ/√M per point with
E[Σₘ uᵢₘuᵢₘᵀ]/M = ∇²_zL(zᵢ) (``core.output_hessian``; for cross-entropy uᵢₜ = pᵢₜ − e_ŷᵢₜ with ŷᵢₜ
drawn from the model at every position — the Monte-Carlo Fisher, Martens & Grosse 2015) take
their place, one backward pass each: S, Λ and the local blocks are then unbiased estimates of the
sums above (A does not depend on them).

**Embeddings** (``core.layers``: a bias-free Linear on one-hot token vectors, W̃ = Eᵀ). Every ã is
one-hot (or 0 at ``padding_idx``), so A = diag(c)/n with c the token counts; it is accumulated as
its diagonal, counted from the captured token ids (no one-hot vectors, no V × V product per batch),
and its eigendecomposition is exact and free,
α = c/n, Q_A = I (``LayerFactors.identity_A``: the rotations by Q_A are skipped in EK-FAC's pass and
in the solvers). S and Λ are as for any layer.

**Kept in a store** (``FactorStore``, ``fit_factors(store=…)``): every factor tensor is written to
an ``upweight.Store`` as soon as it is computed (pass 1's factors and eigendecompositions per layer,
the local blocks, then pass 2's Λ per layer), and a later fit of the same computation reads them
back instead of running the passes — the same float64 tensors, bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._executor import Executor, inside_task, resolve, split_indices, thread_private
from .._memory import check_memory
from .._progress import logger, progress, progress_bar
from ..errors import CurvatureError
from ..store import Store
from . import batching
from .data import Data
from .grads import graph_bytes_per_point
from .layers import LayerBlock, OutputSampling, capture, token_sums
from .local import LocalModule
from .objective import Objective
from .params import Params


@dataclass(frozen=True)
class Rotation:
    """Y ↦ Y·Q (or Y·Qᵀ) for an orthogonal Q that leaves some coordinates alone — its column there
    is the unit vector — multiplying only the block of the other coordinates: an input factor with
    zero rows (``stable_eigh``: on a 1 × 1 feature map a 3 × 3 convolution's A has 8/9 of them)
    rotates its live columns only, (b·m² instead of b·cols² multiply-adds for m live columns).

    Attributes:
        Q: the block of Q on ``live`` (m, m), or all of Q when ``live`` is ``None``.
        live: the coordinates Q mixes (m,), ascending; ``None``: all of them.
    """

    Q: torch.Tensor
    live: torch.Tensor | None = None

    @classmethod
    def of(cls, Q: torch.Tensor) -> Rotation:
        """The rotation by Q, its unit columns (Q[:, j] = eⱼ, so Q[j, :] = eⱼᵀ too) left alone."""
        unit = (Q.diagonal() == 1) & ((Q != 0).sum(0) == 1)
        if not bool(unit.any()):
            return cls(Q)
        live = (~unit).nonzero().squeeze(1)
        return cls(Q[live[:, None], live].contiguous(), live)

    def to(self, dtype: torch.dtype) -> Rotation:
        return Rotation(self.Q.to(dtype), self.live)

    def __call__(self, Y: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """Y·Q (``transpose``: Y·Qᵀ) over Y's last dimension."""
        Q = self.Q.T if transpose else self.Q
        if self.live is None:
            return Y @ Q
        out = Y.clone()
        out[..., self.live] = Y[..., self.live] @ Q
        return out


@dataclass
class LayerFactors:
    """The K-FAC factors of one layer and their eigendecompositions (float64).

    Attributes:
        block: the layer.
        A: (cols, cols) activation second moment; ``None`` when ``identity_A`` (A = diag(eig_A)).
        S: (out, out) cotangent second moment.
        eig_A, Q_A: eigenvalues (clamped ≥ 0) and eigenvectors of A; Q_A ``None`` when
            ``identity_A``.
        eig_S, Q_S: eigenvalues (clamped ≥ 0) and eigenvectors of S.
        corrected: EK-FAC eigenvalues Λ of shape (out, cols), or ``None`` (K-FAC: σ ⊗ α).
        locations: T, the locations per point (1 for a plain Linear).
        identity_A: A is diagonal and Q_A is the identity (an Embedding; eig_A then is A's
            diagonal in token order, not sorted): neither is stored (V × V), rotating by Q_A is
            skipped; ``activation()`` / ``activation_basis()`` form them for small layers and tests.
    """

    block: LayerBlock
    A: torch.Tensor | None
    S: torch.Tensor
    eig_A: torch.Tensor = field(repr=False)
    Q_A: torch.Tensor | None = field(repr=False)
    eig_S: torch.Tensor = field(repr=False)
    Q_S: torch.Tensor = field(repr=False)
    locations: int = 1
    corrected: torch.Tensor | None = field(default=None, repr=False)
    identity_A: bool = False

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The block's eigenvalues in the Kronecker basis, shape (out, cols): Λ, or σ ⊗ α."""
        if self.corrected is not None:
            return self.corrected
        return self.eig_S[:, None] * self.eig_A[None, :]

    def activation(self) -> torch.Tensor:
        """A, dense (cols, cols) — formed from eig_A when ``identity_A``."""
        return torch.diag(self.eig_A) if self.A is None else self.A

    def activation_basis(self) -> torch.Tensor:
        """Q_A, dense (cols, cols) — the identity when ``identity_A``."""
        if self.Q_A is None:
            return torch.eye(len(self.eig_A), dtype=self.eig_A.dtype, device=self.eig_A.device)
        return self.Q_A

    def kronecker(self) -> torch.Tensor:
        """S ⊗ A as a dense (size, size) matrix in vec(W̃) row-major order (small layers; tests)."""
        return torch.kron(self.S, self.activation())

    def basis(self) -> torch.Tensor:
        """Q_S ⊗ Q_A, dense (small layers; tests)."""
        return torch.kron(self.Q_S.contiguous(), self.activation_basis().contiguous())


@dataclass(frozen=True)
class FitStats:
    """What fitting the factors cost and met.

    Attributes:
        passes: passes over the data (1 K-FAC, 2 EK-FAC).
        points: n.
        clamped_output_eigenvalues: negative output-Hessian eigenvalues set to 0 (GGN only).
        where: "in-process", or the executor that ran the map-reduce passes and how many
            partitions each pass had.
        points_per_capture: training points per forward/backward capture (``capture_batch_size``).
        local_ggn: the exact GGN block of each local module's parameters (module docstring).
    """

    passes: int
    points: int
    clamped_output_eigenvalues: int
    where: str = "in-process"
    points_per_capture: int = 0
    #: per local module (``core.local``), its dense Gauss–Newton block G_φφ (float64), from pass 1
    local_ggn: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: what was read from a ``FactorStore`` instead of computed: "moments" (pass 1: A, S, their
    #: eigendecompositions, the local blocks) and/or "correction" (pass 2: EK-FAC's Λ)
    loaded: tuple[str, ...] = ()
    #: passes over the data this fit ran (``passes`` less those read from a store)
    passes_run: int = 0


class _Sums:
    """Float64 sums over training points, keyed by layer name, that add (the reduce step).

    ``locations`` (T per layer, the same for every point: the data have one feature shape) and
    ``clamped`` travel along pass 1's sums.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        locations: dict[str, int] | None = None,
        clamped: int = 0,
    ) -> None:
        self.tensors, self.locations, self.clamped = tensors, dict(locations or {}), clamped

    def __add__(self, other: _Sums) -> _Sums:
        tensors = {k: self.tensors[k] + other.tensors[k] for k in self.tensors}
        return _Sums(tensors, {**self.locations, **other.locations}, self.clamped + other.clamped)


class _FactorContext:
    """What a factor-statistics task needs, shipped to each worker once: the objective, the data,
    the layer blocks (whose modules are the objective's, so they travel together), θ̂, the batch
    size (which also bounds an executor's partitions), the points per capture within it
    (``capture_batch_size``) and the output-Hessian sampling (``None``: exact factors)."""

    def __init__(
        self,
        objective: Objective,
        data: Data,
        blocks: Sequence[LayerBlock],
        params: Params | None,
        batch_size: int,
        local: Sequence[LocalModule] = (),
        sampling: OutputSampling | None = None,
    ) -> None:
        self.objective, self.data, self.blocks, self.local = (
            objective,
            data,
            list(blocks),
            list(local),
        )
        self.params, self.batch_size, self.sampling = params, batch_size, sampling
        self.step = capture_batch_size(
            objective, data, self.blocks, params, batch_size, self.local, sampling
        )


def capture_batch_size(
    objective: Objective,
    data: Data,
    blocks: Sequence[LayerBlock],
    params: Params | None,
    batch_size: int,
    local: Sequence[LocalModule] = (),
    sampling: OutputSampling | None = None,
) -> int:
    """Points per capture in the factor passes: at most ``batch_size``, and so few that the largest
    captured tensor — a layer's GGN cotangents (K, b, T, out) or inputs (b, T, cols) — holds at most
    ``core.batching.TENSOR_BYTES`` counted at 8 bytes per value (float64, the widest dtype a pass
    uses), so a float32 model's captures stay within half of it; and so few that all of a capture —
    every layer's captured tensors and the forward pass's autograd graph (``graph_bytes_per_point``)
    — holds at most ``core.batching.CAPTURE_BYTES``: a transformer has many layers and large
    activations per point.

    Measured on one point. Why: tensors above glibc's mmap threshold are page-faulted in anew in
    every batch (``core.batching``), so a convolution's large captures run faster in small batches
    than in one big one (``bench/bench_batch_budget.py``; its numbers are in bench/RESULTS.md).
    """
    if len(data) < 2:
        return max(1, batch_size)
    cap = capture(
        objective,
        blocks,
        data.subset([0]),
        params=params,
        cotangents="ggn",
        token_ids=True,
        local=local,
        sampling=sampling,
    )
    tensors = [*cap.a.values(), *cap.g.values(), *cap.local.values()]
    widest = max(t.numel() for t in tensors) * 8
    total = sum(t.numel() for t in tensors) * 8 + graph_bytes_per_point(
        objective, params or objective.params, data, second_order=False
    )
    return min(
        batching.points_within(batching.TENSOR_BYTES, widest, batch_size),
        batching.points_within(batching.CAPTURE_BYTES, total, batch_size, batching.MIN_GRAPH_BATCH),
    )


def _batches(ctx: _FactorContext, data: Data, desc: str) -> Iterator[Data]:
    """The captures of one pass, with a progress bar in-process (not in an executor's tasks)."""
    return progress(
        data.batches(ctx.step),
        desc=desc,
        total=-(-len(data) // ctx.step),
        enabled=not inside_task(),
    )


def _private(ctx: _FactorContext) -> _FactorContext:
    d = ctx.data
    return thread_private(ctx, share=(d, d.X, d.y, d.ids))


def _subset(ctx: _FactorContext, indices: np.ndarray) -> Data:
    return ctx.data.subset(torch.from_numpy(np.asarray(indices, dtype=np.int64)))


def _moment_sums(ctx: _FactorContext, data: Data) -> _Sums:
    """Σᵢ Σₜ ãᵢₜãᵢₜᵀ and Σᵢ Σₖ (1/T) Σₜ bᵢₖₜbᵢₖₜᵀ per layer over ``data`` (pass 1), and Σᵢₖ uᵢₖuᵢₖᵀ
    per local module (its pseudo-gradients, ``core.local``), in float64."""
    sums: dict[str, torch.Tensor] = {}
    locs: dict[str, int] = {}
    rows = _GramRows(sums)
    clamped = done = 0
    for batch in _batches(ctx, data, "K-FAC factors"):
        cap = capture(
            ctx.objective,
            ctx.blocks,
            batch,
            params=ctx.params,
            cotangents="ggn",
            token_ids=True,
            local=ctx.local,
            sampling=ctx.sampling,
        )
        clamped += cap.clamped
        for lm in ctx.local:
            u = cap.local_grads(lm).reshape(-1, lm.size)
            _accumulate(sums, "L:" + lm.name, u.T @ u)
        for blk in ctx.blocks:
            a = cap.a[blk.name]  # (b, T, cols); an embedding's token ids (b, T), −1 = padding
            g = cap.g[blk.name]  # (K, b, T, out)
            T = a.shape[1]
            locs[blk.name] = T
            g2 = g.reshape(-1, g.shape[-1])
            # one batch's products in the compute dtype, accumulated over batches in float64;
            # an embedding's one-hot ã: Σ ããᵀ is diagonal, kept as its diagonal — the token counts
            if blk.kind == "embedding":
                ids = a.reshape(-1)
                _accumulate(
                    sums, "A:" + blk.name, torch.bincount(ids[ids >= 0], minlength=blk.in_dim)
                )
            else:
                rows.add("A:" + blk.name, a.reshape(-1, a.shape[-1]))
            rows.add("S:" + blk.name, g2, divisor=T)
        done += len(batch)
        if done // ctx.batch_size > (done - len(batch)) // ctx.batch_size:
            rows.flush()  # rows never gathered across batch_size: an executor's partitions agree
    rows.flush()
    return _Sums(sums, locs, clamped)


class _GramRows:
    """Σ rrᵀ over the rows r of many captures, one product per gathered block of rows: a wide
    factor fed a few rows per capture (a convolution's 1×1 feature maps, the small captures of a
    large network) would otherwise cost a full-size product and add per capture, bound by memory
    traffic rather than arithmetic. Rows wait until they number twice the factor's width or take
    ``GRAM_ROW_BYTES``, and at every ``batch_size`` points of the pass (``_moment_sums``), so an
    executor whose partitions are those batches sums exactly the same products; each product is in
    the rows' dtype, the sums in float64."""

    def __init__(self, sums: dict[str, torch.Tensor]) -> None:
        self.sums = sums
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.divisor: dict[str, int] = {}

    def add(self, key: str, r: torch.Tensor, divisor: int = 1) -> None:
        """Add Σ rrᵀ/divisor over the rows r of ``r`` (rows, width) to ``sums[key]``."""
        self.pending.setdefault(key, []).append(r)
        self.divisor[key] = divisor
        n = sum(len(x) for x in self.pending[key])
        if n >= 2 * r.shape[1] or n * r.shape[1] * r.element_size() >= GRAM_ROW_BYTES:
            self._product(key)

    def _product(self, key: str) -> None:
        R = torch.cat(self.pending.pop(key))
        gram = R.T @ R
        d = self.divisor[key]
        _accumulate(self.sums, key, gram if d == 1 else gram.to(torch.float64) / d)

    def flush(self) -> None:
        for key in list(self.pending):
            self._product(key)


#: the rows ``_GramRows`` gathers for one factor before its product
GRAM_ROW_BYTES = batching.TENSOR_BYTES // 4


def _accumulate(sums: dict[str, torch.Tensor], key: str, batch_sum: torch.Tensor) -> None:
    """``sums[key] += batch_sum`` in float64, in place after the first batch: a wide block (a
    module-local GGN block of a few thousand parameters) then needs no float64 copy of each batch's
    product and no new accumulator per batch."""
    acc = sums.get(key)
    if acc is None:
        sums[key] = batch_sum.to(torch.float64, copy=True)
    else:
        acc.add_(batch_sum)  # promoted to the accumulator's float64, exactly


def _moment_partition(indices: np.ndarray, ctx: _FactorContext) -> _Sums:
    """Pass 1 on one partition of training-point indices — the map step of ``fit_factors``."""
    ctx = _private(ctx)
    return _moment_sums(ctx, _subset(ctx, indices))


def _correction_sums(
    ctx: _FactorContext,
    data: Data,
    bases: Sequence[tuple[Rotation | None, torch.Tensor]],
    max_elements: int,
) -> _Sums:
    """Σᵢ Σₖ (Q_Sᵀ Gᵢₖ Q_A)² per layer over ``data`` (pass 2), accumulated over batches in float64;
    ``bases`` holds (Q_A, Q_S) per block, in block order, Q_A as its ``Rotation``, ``None`` where it
    is the identity (an embedding).

    Each batch's rotations, squares and sums run in the captured cotangents' dtype (the model's): in
    float32 their rounding (of the order of float32's epsilon per term; every term is a square, so
    nothing cancels) is far below the gap between EK-FAC and the GGN it approximates, and float32
    products cost about half of float64 ones. A float64 model keeps float64 throughout."""
    device = ctx.objective.device
    sums = {
        blk.name: torch.zeros(blk.out_dim, blk.cols, dtype=torch.float64, device=device)
        for blk in ctx.blocks
    }
    cast: dict[torch.dtype, list[tuple[Rotation | None, torch.Tensor]]] = {}
    for batch in _batches(ctx, data, "EK-FAC eigenvalue correction"):
        cap = capture(
            ctx.objective,
            ctx.blocks,
            batch,
            params=ctx.params,
            cotangents="ggn",
            token_ids=True,
            sampling=ctx.sampling,
        )
        for i, blk in enumerate(ctx.blocks):
            name = blk.name
            dtype = cap.g[name].dtype
            if dtype not in cast:
                cast[dtype] = [
                    (None if QA is None else QA.to(dtype), QS.to(dtype)) for QA, QS in bases
                ]
            QA, QS = cast[dtype][i]
            g = cap.g[name] @ QS  # (K, b, T, out)
            if QA is None:  # one-hot ã (an embedding), Q_A = I
                _add_one_hot_correction(sums[name], cap.a[name], g)
                continue
            a = QA(cap.a[name].to(dtype))  # (b, T, cols)
            if a.shape[1] == 1:
                sums[name] += torch.einsum("kbo,bj->oj", g[:, :, 0] ** 2, a[:, 0] ** 2).to(
                    torch.float64
                )
                continue
            K, b, T, out = g.shape
            step = max(1, max_elements // max(1, K * out * a.shape[2]))
            for s in range(0, b, step):
                G = torch.einsum("kbto,btj->kboj", g[:, s : s + step], a[s : s + step])
                sums[name] += (G**2).sum(dim=(0, 1)).to(torch.float64)
    return _Sums(sums)


def _add_one_hot_correction(acc: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> None:
    """Add Σᵢₖ (Q_Sᵀ Gᵢₖ)² to ``acc`` (out, V) for an embedding (one-hot ã, Q_A = I), from its
    token ids (b, T) (−1 = padding, no gradient), without forming Gᵢₖ = Σₜ bᵢₖₜ ãᵢₜᵀ densely:
    column v of Q_SᵀGᵢₖ is the sum of the rotated cotangents at the positions t where point i has
    token v, so the rotated cotangents (K, b, T, out) are summed per distinct (point, token) pair
    and squared — O(K·b·T·out), not O(K·b·T·out·V)."""
    _, tokens, sums = token_sums(ids, g, acc.shape[1])
    acc.index_add_(1, tokens, (sums**2).sum(0).T.to(acc.dtype))


def _correction_partition(
    indices: np.ndarray,
    ctx: _FactorContext,
    bases: Sequence[tuple[Rotation | None, torch.Tensor]],
    max_elements: int,
) -> _Sums:
    """Pass 2 on one partition of training-point indices — the map step of
    ``correct_eigenvalues``."""
    ctx = _private(ctx)
    return _correction_sums(ctx, _subset(ctx, indices), bases, max_elements)


class _Passes:
    """Runs the passes in-process, or — with an executor, outside a task — as one map-reduce each
    over index partitions of at most ``batch_size`` points (at least ``executor.parallelism`` of
    them), placing the context on the workers once."""

    def __init__(self, ctx: _FactorContext, executor: Executor | None) -> None:
        self.ctx = ctx
        self.executor = None if executor is None or inside_task() else resolve(executor)
        self._handle: Any = None
        self.parts: list[np.ndarray] = []
        if self.executor is not None:
            self.parts = split_indices(
                len(ctx.data), ctx.batch_size, min_parts=self.executor.parallelism
            )

    @property
    def where(self) -> str:
        if self.executor is None:
            return "in-process"
        return f"{self.executor!r}: map-reduce over {len(self.parts)} partitions per pass"

    def _shared(self) -> Any:
        assert self.executor is not None
        if self._handle is None:
            self._handle = self.executor.share(self.ctx)
        return self._handle

    def moments(self) -> _Sums:
        if self.executor is None:
            return _moment_sums(self.ctx, self.ctx.data)
        return self.executor.map_reduce(_moment_partition, self.parts, operator.add, self._shared())

    def correction(
        self, bases: list[tuple[Rotation | None, torch.Tensor]], max_elements: int
    ) -> _Sums:
        if self.executor is None:
            return _correction_sums(self.ctx, self.ctx.data, bases, max_elements)
        # the eigenbases are the same for every task: placed once (a DaskExecutor broadcasts them)
        placed = self.executor.share(bases)
        return self.executor.map_reduce(
            _correction_partition, self.parts, operator.add, self._shared(), placed, max_elements
        )


def factor_bytes(
    blocks: Sequence[LayerBlock],
    *,
    eigen_correction: bool = False,
    local: Sequence[LocalModule] = (),
) -> int:
    """Peak bytes of the float64 factors of ``blocks`` while ``fit_factors`` builds them: per layer
    the sums and then A, Q_A (cols² each, three copies at the eigendecomposition) and S, Q_S (out²
    each, likewise), plus the (out, cols) EK-FAC eigenvalues Λ with ``eigen_correction``. An
    embedding's A is a vector of V token counts, never V × V. Per local module, its dense block and
    a Cholesky factor of it (size² each, three copies)."""
    total = sum(3 * lm.size * lm.size for lm in local)
    for blk in blocks:
        a = blk.cols if blk.kind == "embedding" else 3 * blk.cols * blk.cols
        total += (
            a
            + 3 * blk.out_dim * blk.out_dim
            + (2 * blk.out_dim * blk.cols if eigen_correction else 0)
        )
    return 8 * total


def fit_factors(
    objective: Objective,
    data: Data,
    blocks: Sequence[LayerBlock],
    *,
    params: Params | None = None,
    batch_size: int = 512,
    eigen_correction: bool = False,
    executor: Executor | None = None,
    local: Sequence[LocalModule] = (),
    store: FactorStore | None = None,
    sampling: OutputSampling | None = None,
) -> tuple[list[LayerFactors], FitStats]:
    """A and S for every block in one pass over ``data``, their eigendecompositions, and — with
    ``eigen_correction`` — the EK-FAC eigenvalues Λ in a second pass.

    The cotangents are the GGN's (``capture(..., cotangents="ggn")``): the exact, sample-free
    output Hessian of the loss (for cross-entropy, the softmax covariance diag(p) − ppᵀ) — or,
    with ``sampling`` (``core.layers.OutputSampling``), ``sampling.samples`` random cotangents per
    point whose outer products equal it in expectation (for cross-entropy, labels sampled from the
    model at every position), so A is exact and S and Λ are unbiased estimates of the same sums.
    Each point's samples depend only on the seed and its id: pass 2 reuses pass 1's, and batches
    and partitions do not change them.

    ``executor`` (e.g. ``upweight.distributed.DaskExecutor``): both passes are sums over the
    training points, so each runs as one ``map_reduce`` over partitions of their indices (the
    objective, data and blocks are placed on the workers once; pass 2 also receives the
    eigenvectors of pass 1); the partial float64 sums are added on the client in partition order
    and the eigendecompositions stay there. The result equals the in-process one up to the order
    of the float64 additions (bit-identical when the partitions are the in-process batches, as
    with ``LocalExecutor``). Inside an executor task the passes run in-process.

    ``local``: modules (``core.local``) whose exact Gauss–Newton block G_φφ is summed in pass 1
    from their module-local pseudo-gradients (``FitStats.local_ggn``).

    ``store``: a ``FactorStore`` (its ``Store`` bound to this computation by the caller). What it
    holds complete is read back instead of computed — pass 1's factors, and Λ — after the same
    memory check as a fit; what is computed is written to it as soon as it is (each layer's factors
    after its eigendecomposition, the local blocks after pass 1, Λ after pass 2), so an
    interrupted EK-FAC fit resumes after pass 1. ``FitStats.loaded`` says what was read.
    """
    n = len(data)
    widest = max(blocks, key=lambda b: b.cols if b.kind != "embedding" else 0, default=None)
    check_memory(
        factor_bytes(blocks, eigen_correction=eigen_correction, local=local),
        f"the Kronecker factors of {len(blocks)} layer(s)"
        + (
            f" (the widest, '{widest.name}', has {widest.cols} input columns: a {widest.cols}²"
            " factor)"
            if widest
            else ""
        ),
        alternatives=(
            "Leave the widest layers out of θ (Objective(params=...)), or use CG/Arnoldi, which"
            " need no factors."
        ),
    )
    device = objective.device
    loaded: list[str] = []
    run = 0
    moments = store.load_moments(n, device) if store is not None else None
    passes: _Passes | None = None
    if moments is None:
        if store is not None:
            store.begin_moments()
        ctx = _FactorContext(objective, data, blocks, params, batch_size, local, sampling)
        passes = _Passes(ctx, executor)
        sums = passes.moments()
        run += 1
        factors = []
        with progress_bar(desc="K-FAC eigendecompositions", total=len(blocks), unit="layer") as bar:
            for i, blk in enumerate(blocks):
                factors.append(_eigen_factors(blk, sums, n))
                if store is not None:
                    store.save_layer(i, factors[-1])
                bar.update(1)
        local_ggn = {lm.name: _mean_sym(sums.tensors.pop("L:" + lm.name), n) for lm in local}
        info = {
            "points": n,
            "clamped": sums.clamped,
            "where": passes.where,
            "points_per_capture": passes.ctx.step,
        }
        if store is not None:
            store.save_moments(local_ggn, info)
    else:
        factors, local_ggn, info = moments
        loaded.append("moments")
    if eigen_correction:
        # Λ is read back only with the bases it was computed in (pass 1 read back too)
        if store is not None and moments is not None and store.load_correction(factors, device):
            loaded.append("correction")
        else:
            if store is not None:
                store.begin_correction()
            if passes is None:  # pass 1 was read from the store
                ctx = _FactorContext(objective, data, blocks, params, batch_size, local, sampling)
                passes = _Passes(ctx, executor)
            _correct(passes, factors)
            run += 1
            if store is not None:
                store.save_correction(factors)
    return factors, FitStats(
        2 if eigen_correction else 1,
        n,
        int(info["clamped"]),
        str(info["where"]),
        int(info["points_per_capture"]),
        local_ggn,
        tuple(loaded),
        run,
    )


def _eigen_factors(blk: LayerBlock, sums: _Sums, n: int) -> LayerFactors:
    """A layer's factors A, S from pass 1's sums, and their eigendecompositions."""
    S = _mean_sym(sums.tensors.pop("S:" + blk.name), n)
    identity_A = blk.kind == "embedding"
    A: torch.Tensor | None
    QA: torch.Tensor | None
    # A = diag(token counts)/n: its eigendecomposition is exact and free, nothing V × V
    if identity_A:
        eA = sums.tensors["A:" + blk.name] / n
        A, QA = None, None
    else:
        A = _mean_sym(sums.tensors.pop("A:" + blk.name), n)
        eA, QA = stable_eigh(A, f"the input factor A of '{blk.name}' ({A.shape[0]}×{A.shape[0]})")
    eS, QS = stable_eigh(
        S, f"the output-gradient factor S of '{blk.name}' ({S.shape[0]}×{S.shape[0]})"
    )
    return LayerFactors(
        blk,
        A,
        S,
        eA.clamp_min(0),
        QA,
        eS.clamp_min(0),
        QS,
        sums.locations[blk.name],
        identity_A=identity_A,
    )


def correct_eigenvalues(
    objective: Objective,
    data: Data,
    factors: Sequence[LayerFactors],
    *,
    params: Params | None = None,
    batch_size: int = 512,
    max_elements: int = batching.TENSOR_BYTES // 8,
    executor: Executor | None = None,
    sampling: OutputSampling | None = None,
) -> None:
    """Set ``corrected`` = Λ = (1/n) Σᵢ Σₖ (Q_Sᵀ Gᵢₖ Q_A)² on every factor (EK-FAC), one pass.

    Gᵢₖ = Σₜ bᵢₖₜãᵢₜᵀ is the GGN pseudo-gradient of W̃. For T = 1 the square of the rotated
    outer product is the outer product of the rotated vectors' squares, so Λ is one matrix
    product per batch; for T > 1 the rotated Gᵢₖ are formed in chunks of ``max_elements``.
    With an ``executor`` the pass is a map-reduce over index partitions (see ``fit_factors``);
    ``sampling`` as there.
    """
    ctx = _FactorContext(
        objective, data, [f.block for f in factors], params, batch_size, sampling=sampling
    )
    _correct(_Passes(ctx, executor), factors, max_elements)


def _correct(
    passes: _Passes, factors: Sequence[LayerFactors], max_elements: int = batching.TENSOR_BYTES // 8
) -> None:
    sums = passes.correction(
        [(None if f.identity_A else Rotation.of(f.Q_A), f.Q_S) for f in factors], max_elements
    )
    n = len(passes.ctx.data)
    for f in factors:
        f.corrected = sums.tensors[f.block.name] / n


def stable_eigh(M: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD factor in float64, robust to the rank-deficient and
    ill-conditioned factors of real networks (zero-padded convolutions, dead units, constant
    inputs): LAPACK's divide-and-conquer ``eigh`` first; if it fails to converge, the same matrix
    with a shift of 1e-10·(trace/dim) on the diagonal (removed again from the eigenvalues) and then
    ``eigh`` through an SVD (exact for a symmetric PSD matrix). Raises ``CurvatureError`` naming the
    factor only if all three fail — never LAPACK's raw error.

    Coordinates whose row and column are exactly zero — an input that is always 0 (a convolution
    tap that only ever sees zero padding: on a 1 × 1 feature map, 8 of a 3 × 3 kernel's 9 taps),
    a dead unit — are eigenvectors of eigenvalue 0 as they are: only the other rows' block is
    decomposed, and the eigenvalues come back in the coordinates' order there, not sorted."""
    M = M.to(torch.float64)
    if not torch.equal(M, M.mT):  # a factor of fit_factors is symmetric already: no copy
        M = _sym(M)
    if not bool(torch.isfinite(M).all()):
        raise CurvatureError(
            f"{what} has NaN or infinite entries: the layer's inputs or output gradients overflow."
        )
    dead = (M == 0).all(dim=1)
    if bool(dead.any()):
        live = (~dead).nonzero().squeeze(1)
        e = M.new_zeros(len(M))
        Q = torch.diag(dead.to(M.dtype))  # eᵢ for each zero coordinate
        if len(live):
            e_live, Q_live = _eigh(M[live[:, None], live], what)
            e[live] = e_live
            Q[live[:, None], live] = Q_live
        return e, Q
    return _eigh(M, what)


def _eigh(M: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``stable_eigh``'s three attempts on a symmetric, finite float64 M."""
    try:
        return torch.linalg.eigh(M)
    except RuntimeError:  # torch.linalg.LinAlgError: the algorithm failed to converge
        pass
    shift = 1e-10 * float(torch.diagonal(M).abs().mean().clamp_min(1e-300))
    try:
        e, Q = torch.linalg.eigh(M + shift * torch.eye(len(M), dtype=M.dtype, device=M.device))
        return e - shift, Q
    except RuntimeError:
        pass
    try:
        U, sv, _ = torch.linalg.svd(M)
        order = torch.argsort(sv)
        return sv[order], U[:, order]
    except RuntimeError as exc:
        raise CurvatureError(
            f"The eigendecomposition of {what} failed ({exc}). Add damping, or leave that layer out"
            " of θ (Objective(params=...))."
        ) from exc


def _sym(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.T)


def _mean_sym(total: torch.Tensor, n: int) -> torch.Tensor:
    """``_sym(total / n)``, bit for bit, computed in ``total``'s own memory (which it overwrites):
    a wide factor (a convolution's input factor, a module-local block) then needs one row block of
    extra memory, not two more copies of itself."""
    M = total.div_(n)
    if M.ndim != 2:
        return M
    rows = max(1, (1 << 22) // max(1, M.shape[0]))  # row blocks of at most 4M entries
    for i in range(0, M.shape[0], rows):
        j = min(M.shape[0], i + rows)
        avg = 0.5 * (M[i:j, i:] + M[i:, i:j].T)
        M[i:j, i:] = avg
        M[i:, i:j] = avg.T
    return M


# ── kept in a store ────────────────────────────────────────────────────────────────────
class FactorStore:
    """The tensors of ``fit_factors`` in an ``upweight.Store`` the caller has bound to the
    computation (``Store.bind``: θ̂, data, objective and the settings that change the factors;
    ``solvers.kfac``).

    Arrays (float64, one ``.npy`` file each, listed in the store's manifest with their SHA-256;
    never pickled), ``i`` the layer's position in ``blocks`` and ``j`` the local module's in
    ``local``:

    * ``layer{i}_S``, ``layer{i}_eig_S``, ``layer{i}_Q_S``: S (out, out), its eigenvalues (clamped
      ≥ 0) and eigenvectors;
    * ``layer{i}_A``, ``layer{i}_eig_A``, ``layer{i}_Q_A``: likewise for A (cols, cols) — an
      embedding keeps only ``eig_A`` (V token frequencies);
    * ``local{j}_G``: the dense Gauss–Newton block of local module ``j``;
    * ``moments_done``: [1] once pass 1 is complete; its JSON metadata hold the layer and module
      names and shapes, the points, where the pass ran and its points per capture
      (``layer{i}_eig_A``'s hold the layer's ``locations``);
    * ``layer{i}_Lambda`` (out, cols): EK-FAC's eigenvalues, then ``correction_done`` = [1].

    A pass counts as stored only once its ``*_done`` array holds 1 and every one of its arrays
    passes the store's checks (header, size, checksum); otherwise it is computed again and
    rewritten, its marker (and Λ's, whose bases it changes) first set to 0, so that a run
    interrupted while rewriting never leaves old and new tensors to be read together. An eigenvector
    matrix is saved in the memory order it had (LAPACK returns it column-major) and read back in
    that order, so the reloaded state multiplies exactly as the fresh one.
    """

    def __init__(
        self, store: Store, blocks: Sequence[LayerBlock], local: Sequence[LocalModule] = ()
    ) -> None:
        self.store, self.blocks, self.local = store, list(blocks), list(local)

    def _layout(self) -> dict[str, Any]:
        return {
            "layers": [[b.name, b.kind, b.out_dim, b.cols] for b in self.blocks],
            "local": [[lm.name, lm.size] for lm in self.local],
        }

    def _put(self, name: str, t: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
        t = t.detach().to("cpu", torch.float64)
        transposed = t.ndim == 2 and not t.is_contiguous() and t.mT.is_contiguous()
        a = (t.mT if transposed else t.contiguous()).numpy()
        self.store.put(name, a, {**(meta or {}), "transposed": transposed})

    def _get(self, name: str, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]] | None:
        got = self.store.get(name)
        if got is None:
            return None
        a, meta = got
        if a.dtype != np.float64:
            return None
        t = torch.from_numpy(
            a if isinstance(a, np.ndarray) and not isinstance(a, np.memmap) else np.array(a)
        )
        if meta.get("transposed"):
            t = t.mT
        return t.to(device), meta

    def save_layer(self, i: int, f: LayerFactors) -> None:
        """Write one layer's factors of pass 1 (A, S and their eigendecompositions)."""
        p = f"layer{i}_"
        self._put(p + "S", f.S)
        self._put(p + "eig_S", f.eig_S)
        self._put(p + "Q_S", f.Q_S)
        if f.A is not None:
            self._put(p + "A", f.A)
        if f.Q_A is not None:
            self._put(p + "Q_A", f.Q_A)
        self._put(p + "eig_A", f.eig_A, {"locations": f.locations, "identity_A": f.identity_A})

    def _pending(self, name: str) -> None:
        # listed and intact (a damaged one is dropped and never read)
        if self.store.get(name) is not None:
            self.store.put(name, np.zeros(1), self._layout())

    def _complete(self, name: str) -> dict[str, Any] | None:
        done = self.store.get(name)
        if done is None or done[0].shape != (1,) or float(done[0][0]) != 1.0:
            return None
        return done[1]

    def begin_moments(self) -> None:
        """Before pass 1 is (re)computed: neither pass counts as stored until it is
        written again."""
        self._pending("moments_done")
        self._pending("correction_done")

    def begin_correction(self) -> None:
        """Before pass 2 is (re)computed: Λ does not count as stored until it is written again."""
        self._pending("correction_done")

    def save_moments(self, local_ggn: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write the local blocks, then the marker that pass 1 is complete (with ``info``)."""
        for j, lm in enumerate(self.local):
            self._put(f"local{j}_G", local_ggn[lm.name])
        self.store.put("moments_done", np.ones(1), {**info, **self._layout()})

    def load_moments(
        self, n: int, device: torch.device
    ) -> tuple[list[LayerFactors], dict[str, torch.Tensor], dict[str, Any]] | None:
        """Pass 1's factors, the local blocks and the pass's ``info``, or None when not all are
        stored (or they were stored for another layer plan or number of points)."""
        info = self._complete("moments_done")
        if info is None:
            return None
        layout = self._layout()
        if info.get("points") != n or {k: info.get(k) for k in layout} != layout:
            logger.warning(
                "store %s: its K-FAC factors are for another layer plan or number of points;"
                " computing them again",
                self.store.path,
            )
            return None
        factors = []
        for i, blk in enumerate(self.blocks):
            p = f"layer{i}_"
            got = {k: self._get(p + k, device) for k in ("S", "eig_S", "Q_S", "eig_A")}
            identity_A = blk.kind == "embedding"
            if not identity_A:
                got.update({k: self._get(p + k, device) for k in ("A", "Q_A")})
            if any(v is None for v in got.values()):
                return None
            t = {k: v[0] for k, v in got.items() if v is not None}
            meta = got["eig_A"][1]  # type: ignore[index]
            factors.append(
                LayerFactors(
                    blk,
                    t.get("A"),
                    t["S"],
                    t["eig_A"],
                    t.get("Q_A"),
                    t["eig_S"],
                    t["Q_S"],
                    int(meta["locations"]),
                    identity_A=identity_A,
                )
            )
        local_ggn = {}
        for j, lm in enumerate(self.local):
            g = self._get(f"local{j}_G", device)
            if g is None:
                return None
            local_ggn[lm.name] = g[0]
        logger.info(
            "store %s: K-FAC factors of %d layer(s) read back", self.store.path, len(factors)
        )
        return factors, local_ggn, info

    def save_correction(self, factors: Sequence[LayerFactors]) -> None:
        """Write EK-FAC's Λ per layer, then the marker that pass 2 is complete."""
        for i, f in enumerate(factors):
            assert f.corrected is not None
            self._put(f"layer{i}_Lambda", f.corrected)
        self.store.put("correction_done", np.ones(1), self._layout())

    def load_correction(self, factors: Sequence[LayerFactors], device: torch.device) -> bool:
        """Set ``corrected`` on every factor from the store; False (nothing set) when not all are
        stored."""
        if self._complete("correction_done") != self._layout():
            return False
        got = [self._get(f"layer{i}_Lambda", device) for i in range(len(factors))]
        if any(g is None for g in got):
            return False
        for f, g in zip(factors, got):
            f.corrected = g[0]  # type: ignore[index]
        return True
