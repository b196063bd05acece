"""``Curvature``: the linear operator H + δI seen by the solvers, with H = ∇²R(θ̂) — or, on request,
its Gauss–Newton part G.

Products with H are Pearlmutter's Hessian-vector products (reverse over reverse: one gradient
with its graph per batch, then one backward pass per vector), streamed over the data in batches.
The dense Hessian is only formed on request, for small p.

Gauss–Newton (``kind="gauss-newton"``): with zᵢ = f(xᵢ; θ) the model output and Jᵢ = ∂zᵢ/∂θ,
∇²θL(zᵢ) = Jᵢᵀ ∇²_z L Jᵢ + Σ_c ∂L/∂z_c ∇²θ z_c; the generalised Gauss–Newton matrix keeps the first
term, G = (1/n) Σᵢ Jᵢᵀ ∇²_z L(zᵢ) Jᵢ + l2·I. For a loss convex in z (cross-entropy, token
cross-entropy, squared, logistic) G is positive semi-definite at every θ — which makes whole-network
influence of a non-convex net well posed (Martens 2010; Bae et al. 2022 call the resulting
quantity the proximal Bregman response function) — and equals H where the output is linear in θ.
Products need no second derivative of the model: one forward-mode JVP (Jv), the loss's own
Hessian in z (``core.output_hessian``: a closed form for the built-in losses, else a double
backward through the loss only), one reverse VJP (Jᵀ·).

The full-data product is a sum over the training points, so with an ``Executor`` it runs as a
map-reduce over partitions of them (each partition's Σᵢ∇²θL(zᵢ)V, summed in partition order);
without one it is the in-process loop.

Structured path (``core.structured``): when θ is exactly one ``nn.Linear`` that produces the
model output from θ-independent inputs (softmax / logistic regression, a frozen feature
extractor with a linear head), the output is linear in θ and the exact product is two matrix
products per batch with cached layer inputs — used automatically (``structured="auto"``; in-process
even with an executor), off with ``structured=False``.

``LinearOperator`` is the protocol the solvers work against: ``Curvature`` implements it, and so
does any restriction of it (K-FAC's ``BlockOperator``), which lets ``CG`` solve on either.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal, NoReturn, Protocol, runtime_checkable

import numpy as np
import torch

from .._checks import check_finite, check_interval
from .._executor import Executor, inside_task, resolve, split_indices, thread_private
from .._progress import progress
from ..errors import CurvatureTooLargeError, InputError, UnsupportedModelError
from . import batching
from .batching import points_within
from .data import Data
from .grads import graph_bytes_per_point
from .objective import Objective
from .output_hessian import output_hessian
from .params import Params

CurvatureKind = Literal["hessian", "gauss-newton"]
KINDS: tuple[str, ...] = ("hessian", "gauss-newton")


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear operator A = (a matrix of the form) H + δI of size p, known only through
    its products — what the iterative solvers (``CG``, the Lanczos/Arnoldi recurrences) need of it.

    Implemented by ``Curvature`` (the full H + δI) and by ``solvers.kfac.BlockOperator`` (H + δI
    restricted to some coordinates).

    Attributes:
        p: the dimension of A.
        dtype: the dtype its products are computed in.
        damping: δ, the damping included in A (for error messages that suggest a larger one).
    """

    p: int
    dtype: torch.dtype
    damping: float

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """AV for V of shape (p,) or (k, p) (rows as vectors)."""
        ...

    def lambda_max(self, *, n_iter: int = 30, seed: int = 0) -> float:
        """Largest-magnitude eigenvalue of A (an estimate)."""
        ...

    def lambda_min(self, *, n_iter: int = 100, seed: int = 0) -> float:
        """Smallest eigenvalue of A (a rough estimate, for error messages)."""
        ...


def operator_lambda_max(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    p: int,
    dtype: torch.dtype,
    *,
    n_iter: int = 30,
    seed: int = 0,
) -> float:
    """Largest-magnitude eigenvalue of the symmetric operator ``matvec`` by power iteration."""
    return power_iteration(matvec, p, dtype, n_iter=n_iter, rtol=1e-3, seed=seed)


def operator_lambda_min(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    p: int,
    dtype: torch.dtype,
    *,
    n_iter: int = 100,
    seed: int = 0,
) -> float:
    """Smallest eigenvalue of the symmetric operator A = ``matvec``, by power iteration on σI − A
    with σ = 1.05·|λmax| ≥ λmax, whose dominant eigenvalue is σ − λmin (a rough estimate)."""
    sigma = abs(operator_lambda_max(matvec, p, dtype, seed=seed)) * 1.05 + 1e-12
    mu = power_iteration(
        lambda v: sigma * v - matvec(v), p, dtype, n_iter=n_iter, rtol=1e-4, seed=seed + 1
    )
    return sigma - mu


class Curvature:
    """H + δI, where H = ∇²θR(θ̂) = (1/n) Σᵢ ∇²θL(zᵢ, θ̂) + l2·I — Koh & Liang (2017) §2.1.

    Args:
        objective: the model, loss and L2 term; θ̂ is ``objective.params``.
        data: the n training points.
        damping: δ ≥ 0 added to the diagonal (Koh & Liang 2017, §4.2, for non-convex models).
        batch_size: at most this many points per HVP batch (the generic path uses fewer when the
            batch's autograd graph would exceed ``HVP_GRAPH_BYTES``; see ``hvp_batch_size``).
        dtype: compute in this dtype (e.g. float64 for Direct); default the model's.
        executor: runs the full-data HVP as a map-reduce over partitions of the data (e.g. a
            ``upweight.distributed.DaskExecutor``); ``None`` keeps the in-process loop.
        structured: "auto" (default) computes the in-process products with the exact structured
            HVP of ``core.structured.LinearOutputHVP`` when θ is exactly one output ``nn.Linear``
            with θ-independent inputs (in-process, also when an executor is given: it is a few
            matrix products over cached inputs), else the generic products of ``kind`` (``hvp_sum``:
            Pearlmutter's reverse over reverse; ``ggn_sum`` for Gauss–Newton); ``True`` requires the
            structured path (``UnsupportedModelError`` naming why it does not apply); ``False``
            always uses the generic products.
        structured_cache_bytes: memory budget for caching the layer inputs and output-Hessian
            data across products (structured path only); above it they are recomputed per product.

    Examples:
        >>> import torch
        >>> from upweight import Objective
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).eval(), "squared", l2=1.0)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.zeros(2, 1)
        >>> Curvature(obj, Data.from_any((X, y))).dense().tolist()  # (1/2)XᵀX + I
        [[1.5, 0.0], [0.0, 3.0]]
    """

    def __init__(
        self,
        objective: Objective,
        data: Data,
        *,
        damping: float = 0.0,
        batch_size: int = 512,
        dtype: torch.dtype | None = None,
        executor: Executor | None = None,
        structured: bool | Literal["auto"] = "auto",
        structured_cache_bytes: int = 2**30,
        kind: CurvatureKind = "hessian",
    ) -> None:
        check_interval("Curvature", "damping", damping, 0.0, None, closed="left")
        if kind not in KINDS:
            raise InputError(
                f"The 'kind' parameter of Curvature must be one of {KINDS}. Got {kind!r}."
            )
        self.kind: CurvatureKind = kind
        if not (structured is True or structured is False or structured == "auto"):
            raise InputError(
                "The 'structured' parameter of Curvature must be 'auto', True or False. Got"
                f" {structured!r}."
            )
        check_interval(
            "Curvature",
            "structured_cache_bytes",
            structured_cache_bytes,
            0,
            None,
            closed="left",
            integer=True,
        )
        check_interval("Curvature", "batch_size", batch_size, 1, None, closed="left", integer=True)
        self.objective = objective
        self.dtype = dtype or objective.dtype
        self.data = data.to(self.dtype)
        self.damping = float(damping)
        self.batch_size = batch_size
        self.params: Params = {n: t.to(self.dtype) for n, t in objective.params.items()}
        self.p = objective.p
        self.n = len(data)
        self.n_matvecs = 0  # full-data HVP blocks computed so far (for diagnostics)
        # the L2 term's Hessian plus damping: l2 + δ on penalised coordinates, δ on the others
        self.diagonal = objective.l2_diagonal(self.dtype) + self.damping
        self.executor: Executor | None = None if executor is None else resolve(executor)
        self._shared: Any = None  # the executor's handle to (objective, data, params), placed once
        self.structured = structured
        self.structured_cache_bytes = int(structured_cache_bytes)
        # LinearOutputHVP once resolved, False when it does not apply
        self._structured_op: Any = None
        self._hvp_batch_size: int | None = None  # measured on first use (generic path)
        self.structured_reason_: str | None = None
        if structured is True:
            self._structured()  # fail early, with the reason

    def replace(self, **changes: Any) -> Curvature:
        """The same operator with some settings changed (``damping``, ``dtype``, ``batch_size``,
        ``kind``, ``executor``, ``structured``, ``structured_cache_bytes``)."""
        settings = dict(
            damping=self.damping,
            batch_size=self.batch_size,
            dtype=self.dtype,
            executor=self.executor,
            structured=self.structured,
            structured_cache_bytes=self.structured_cache_bytes,
            kind=self.kind,
        )
        unknown = set(changes) - set(settings)
        if unknown:
            raise InputError(
                f"Curvature.replace: unknown setting(s) {sorted(unknown)}; settings are"
                f" {sorted(settings)}."
            )
        return Curvature(self.objective, self.data, **{**settings, **changes})

    @property
    def describes(self) -> str:
        """What the operator is, in words (for provenance)."""
        if self.kind == "gauss-newton":
            return "G + δI, G = (1/n) Σᵢ Jᵢᵀ ∇²_z L(zᵢ) Jᵢ + l2·I (generalised Gauss–Newton)"
        return "H + δI, H = ∇²θ R(θ̂) (the Hessian of the regularised training risk)"

    def __getstate__(self) -> dict[str, Any]:
        # shipped to a worker (e.g. inside a CG solver state), the operator computes in-process
        # there
        state = dict(self.__dict__)
        state["executor"] = None
        state["_shared"] = None
        state["_structured_op"] = None  # re-resolved (and its cache rebuilt) where it is used
        return state

    def _structured(self) -> Any:
        """The structured HVP operator if it applies (resolved once), else ``None``."""
        if self.structured is False:
            return None
        if self._structured_op is None:
            from .structured import LinearOutputHVP, linear_output_layer

            try:
                block, why = linear_output_layer(self.objective, self.data)
            except Exception as exc:  # noqa: BLE001 — "auto" falls back to the generic path, True re-raises
                if self.structured is True:
                    raise
                block, why = None, f"checking the model failed: {type(exc).__name__}: {exc}"
            self.structured_reason_ = why
            if block is None:
                if self.structured is True:
                    raise UnsupportedModelError(
                        f"Curvature(structured=True): the structured HVP does not apply: {why}. It"
                        " needs θ to be exactly the weight (and bias) of one nn.Linear whose"
                        " output is the model's output. Use structured='auto'."
                    )
                self._structured_op = False
            else:
                self._structured_op = LinearOutputHVP(
                    self.objective,
                    block,
                    self.params,
                    self.data,
                    batch_size=self.batch_size,
                    cache_bytes=self.structured_cache_bytes,
                )
        return self._structured_op or None

    @property
    def uses_structured(self) -> bool:
        """Whether in-process products use the structured HVP (resolves it on first use)."""
        return self._structured() is not None

    @property
    def hvp_batch_size(self) -> int:
        """Points per generic HVP batch: ``batch_size``, capped so that the batch's autograd graph
        (what each of the k tangent passes of ``hvp_sum`` works through) stays within
        ``HVP_GRAPH_BYTES``.

        Measured once, from the bytes autograd saves for 1 and for 8 training points
        (``graph_bytes_per_point``). Why it pays: glibc's malloc serves every allocation above its
        mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so a tensor of
        that size made in every tangent pass is page-faulted in anew each time; with every tensor of
        the graph below 32 MiB the allocator's caches are reused (timings: section ``hvp-batch`` of
        bench/RESULTS.md). The cap also bounds the graph's memory.
        """
        if self._hvp_batch_size is None:
            per_point = graph_bytes_per_point(self.objective, self.params, self.data)
            self._hvp_batch_size = points_within(
                HVP_GRAPH_BYTES, per_point, self.batch_size, MIN_HVP_BATCH
            )
        return self._hvp_batch_size

    def hvp_sum(self, V: torch.Tensor, batch: Data) -> torch.Tensor:
        """Σ_{i∈batch} ∇²θL(zᵢ, θ̂) vⱼ for each row vⱼ of V (k, p) → (k, p): the loss terms only,
        unnormalised (generic path: in chunks of ``hvp_batch_size`` points)."""
        op = self._structured()
        if op is not None:
            return op.hvp_sum(V.reshape(-1, self.p).to(self.dtype), batch.to(self.dtype))
        V = V.reshape(-1, self.p).to(self.dtype)
        acc = torch.zeros_like(V)
        for chunk in batch.to(self.dtype).batches(self.hvp_batch_size):
            batch_product(self.kind)(self.objective, self.params, V, chunk, out=acc)
        return acc

    def matvec(self, V: torch.Tensor, *, operand_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(H + δI)V for V of shape (p,) or (k, p), over all n training points.

        ``operand_dtype`` (e.g. torch.bfloat16): the structured HVP's matrix products take their
        operands in that dtype (``LinearOutputHVP.hvp_sum_all``; mixed precision for
        ``CG(hvp_dtype=…)``'s iterations); ``UnsupportedModelError`` where the structured HVP does
        not apply."""
        squeeze = V.ndim == 1
        V = V.reshape(-1, self.p).to(self.dtype)
        op = self._structured()
        if operand_dtype == self.dtype:  # products in the compute dtype: the exact path, any model
            operand_dtype = None
        if operand_dtype is not None and op is None:
            raise UnsupportedModelError(
                f"HVP products in {operand_dtype} (CG(hvp_dtype=…)) need the structured HVP, which"
                f" does not apply here: {self.structured_reason_ or 'Curvature(structured=False)'}."
                " It covers θ = one nn.Linear producing the model output (softmax / logistic"
                " regression, a linear head on frozen features); drop hvp_dtype."
            )
        if op is not None:  # a few matmuls over cached inputs: in-process even with an executor
            acc = op.hvp_sum_all(V, operand_dtype)
        elif self.executor is None or inside_task():
            acc = torch.zeros_like(V)
            for batch in self.data.batches(self.hvp_batch_size):
                batch_product(self.kind)(self.objective, self.params, V, batch, out=acc)
        else:
            acc = self._distributed_hvp_sum(V)
        self.n_matvecs += 1
        # in place: k × p arrays are the memory here
        out = acc.div_(self.n).addcmul_(self.diagonal, V)
        return out[0] if squeeze else out

    def _distributed_hvp_sum(self, V: torch.Tensor) -> torch.Tensor:
        """Σᵢ ∇²θL(zᵢ, θ̂)V over all n points as a map-reduce over index partitions of the data."""
        ex = self.executor
        assert ex is not None
        if self._shared is None:
            self._shared = ex.share(
                _HVPContext(self.objective, self.data, self.params, self.hvp_batch_size, self.kind)
            )
        parts = split_indices(self.n, self.batch_size, min_parts=ex.parallelism)
        return ex.map_reduce(_hvp_partition, parts, operator.add, self._shared, V)

    def batch_matvec(self, V: torch.Tensor, batch: Data) -> torch.Tensor:
        """Minibatch estimate (H_batch + l2·I + δI)V, unbiased for (H + δI)V (LiSSA)."""
        squeeze = V.ndim == 1
        V = V.reshape(-1, self.p).to(self.dtype)
        out = self.hvp_sum(V, batch) / len(batch) + self.diagonal * V
        return out[0] if squeeze else out

    def dense(self, *, max_p: int = 20_000, chunk: int = 256) -> torch.Tensor:
        """The explicit (p, p) matrix H + δI: in closed form where the structured HVP applies (θ is
        one output ``nn.Linear``, ``LinearOutputHVP.dense_sum``), else column block by column block
        from HVPs.
        """
        if self.p > max_p:
            raise CurvatureTooLargeError(
                f"A dense Hessian for p={self.p} parameters needs {self.p**2 * 8 / 2**30:.1f} GiB;"
                f" max_p is {max_p}. Use an iterative solver (CG or LiSSA) instead of Direct."
            )
        op = self._structured() if self.executor is None else None
        if op is not None:  # closed form Σᵢ Hᵢ ⊗ ãᵢãᵢᵀ: no HVPs (core/structured.py)
            # op.index puts the layer's vec(W̃) coordinates at their θ positions (a permutation:
            # θ is exactly the layer), so θ's order is dense_sum's rows and columns permuted back
            to_layer = torch.argsort(op.index.to(self.objective.device))
            S = op.dense_sum().to(self.dtype).div_(self.n)
            H = S.index_select(0, to_layer).index_select(1, to_layer)
            H.diagonal().add_(self.diagonal.to(self.dtype).expand(self.p))
            check_finite(H, "The Hessian", "Check the model and loss for overflow at θ̂.")
            return 0.5 * (H + H.T)
        eye = torch.eye(self.p, dtype=self.dtype, device=self.objective.device)
        # with `chunk` tangents in flight, smaller data batches keep the working set in cache
        dense_op = self.replace(batch_size=min(self.batch_size, 512))
        starts = range(0, self.p, chunk)
        cols = [
            dense_op.matvec(eye[s : s + chunk])
            for s in progress(
                starts, desc=f"dense {self.describes} ({self.p} columns)", total=len(starts)
            )
        ]
        H = torch.cat(cols, dim=0)
        check_finite(H, "The Hessian", "Check the model and loss for overflow at θ̂.")
        return 0.5 * (H + H.T)

    def lambda_max(self, *, n_iter: int = 30, seed: int = 0) -> float:
        """Largest-magnitude eigenvalue of H + δI by power iteration (a few full-data HVPs)."""
        return operator_lambda_max(self.matvec, self.p, self.dtype, n_iter=n_iter, seed=seed)

    def lambda_min(self, *, n_iter: int = 100, seed: int = 0) -> float:
        """Smallest eigenvalue of H + δI, by power iteration on σI − (H + δI) with σ ≥ λmax.

        Only used to explain failures (a non-positive-definite H), so a rough estimate will do.
        """
        return operator_lambda_min(self.matvec, self.p, self.dtype, n_iter=n_iter, seed=seed)


#: the autograd graph one generic HVP batch may hold (``Curvature.hvp_batch_size``;
#: ``core.batching``)
HVP_GRAPH_BYTES = batching.GRAPH_BYTES
#: the smallest batch the cap may choose
MIN_HVP_BATCH = batching.MIN_GRAPH_BATCH


class _HVPContext:
    """What an HVP task needs, shipped to each worker once: the objective, the data, θ̂ and which
    curvature."""

    def __init__(
        self,
        objective: Objective,
        data: Data,
        params: Params,
        batch_size: int,
        kind: CurvatureKind = "hessian",
    ) -> None:
        self.objective, self.data, self.params, self.batch_size, self.kind = (
            objective,
            data,
            params,
            batch_size,
            kind,
        )


def _hvp_partition(indices: np.ndarray, ctx: _HVPContext, V: torch.Tensor) -> torch.Tensor:
    """Σ_{i∈indices} ∇²θL(zᵢ, θ̂)V for one partition, (k, p) — the map step of
    ``Curvature.matvec``."""
    ctx = thread_private(ctx, share=(ctx.data, ctx.data.X, ctx.data.y, ctx.data.ids))
    part = ctx.data.subset(torch.from_numpy(np.asarray(indices, dtype=np.int64)))
    acc = torch.zeros_like(V)
    for batch in part.batches(ctx.batch_size):
        batch_product(ctx.kind)(ctx.objective, ctx.params, V, batch, out=acc)
    return acc


def hvp_sum(
    obj: Objective, params: Params, V: torch.Tensor, batch: Data, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_{i∈batch} ∇²θL(zᵢ, θ) vⱼ for each row vⱼ of V (k, p) → (k, p): Pearlmutter's product,
    reverse over reverse; with ``out`` (k, p) the products are added to it in place (and it is
    returned).

    One forward and backward pass builds g = ∇θ Σᵢ L(zᵢ, θ) with its graph; each vⱼ is then one
    more backward pass through that graph, ∇θ⟨g, vⱼ⟩ = H vⱼ. The k tangents share the forward
    pass and the first backward pass, and memory stays that of one double-backward pass whatever k
    is; it also covers more operators than forward-mode AD. A bare linear layer takes the structured
    HVP instead (``core.structured``). Timings against ``vmap`` of forward over reverse: section
    ``hvp`` of bench/RESULTS.md.
    """
    with torch.enable_grad():
        leaves = {name: t.detach().requires_grad_(True) for name, t in params.items()}
        names = list(leaves)
        loss = obj.losses(leaves, batch.X, batch.y).sum()
        if out is None:
            out = torch.zeros_like(V)
        if not loss.requires_grad:  # the loss does not depend on θ at all
            return out
        grads = torch.autograd.grad(
            loss,
            list(leaves.values()),
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        # a gradient without a graph does not depend on θ: its rows (and, by symmetry, columns) of H
        # are 0
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return out
        for j in range(len(V)):
            tangent = obj.space.unflatten(V[j])
            try:
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    list(leaves.values()),
                    [tangent[names[i]] for i in live],
                    retain_graph=j < len(V) - 1,
                    allow_unused=True,
                    materialize_grads=True,
                )
            except RuntimeError as exc:
                err = _no_second_derivative(exc)
                if err is None:
                    raise
                raise err from exc
            hv_of = dict(zip(names, hv))
            # views of out[j]
            for part, name in zip(out[j].split(obj.space.sizes), obj.space.names):
                part.add_(hv_of[name].reshape(-1))
    return out


def ggn_sum(
    obj: Objective, params: Params, V: torch.Tensor, batch: Data, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_{i∈batch} Jᵢᵀ ∇²_z L(zᵢ) Jᵢ vⱼ for each row vⱼ of V (k, p) → (k, p), zᵢ the model output:
    the Gauss–Newton products (see the module docstring), added to ``out`` in place when it is
    given.

    Per batch: one forward with its VJP graph; per vector one forward-mode JVP (Jᵢvⱼ), the loss's
    Hessian in z applied to it (``core.output_hessian``: in closed form for the built-in losses,
    else by a double backward through the loss alone), and one VJP."""
    if out is None:
        out = torch.zeros_like(V)

    def f(p: Params) -> torch.Tensor:
        return obj.outputs(p, batch.X)

    def apply_hz(Jv: torch.Tensor) -> torch.Tensor:  # (k, b, *shape) → ∇²_zL applied point by point
        k, b = Jv.shape[:2]
        return hz.apply(Jv.reshape(k, b, -1).transpose(0, 1)).transpose(0, 1).reshape(Jv.shape)

    with torch.enable_grad():
        z, pull = torch.func.vjp(f, params)
        hz = output_hessian(obj.loss_fn, z, batch.y, generic="implicit", name=obj.loss_name)
        if hz.kind == "zero":  # the loss is linear in z: no Gauss–Newton term
            return out

        def jvp(t: Params) -> torch.Tensor:
            return torch.func.jvp(f, (params,), (t,))[1]

        if not obj._tangent_vmap_refused:
            try:
                # all k tangents in one batched pass (the inputs are not batched, so a model whose
                # attention masks defeat vmap over points still runs here), then all k VJPs at once
                Jv = torch.func.vmap(jvp)(obj.space.unflatten(V))
                HJv = apply_hz(Jv)
                g = torch.func.vmap(lambda u: pull(u)[0])(HJv)
                return out.add_(obj.space.flatten(g, batch_dims=1))
            except RuntimeError as exc:
                if "vmap" not in str(exc) and "Batching rule" not in str(exc):
                    _raise_without_forward_derivative(exc)
                obj._tangent_vmap_refused = True  # one tangent at a time from now on
        for j in range(len(V)):
            try:
                Jv_j = jvp(obj.space.unflatten(V[j]))
            except RuntimeError as exc:
                _raise_without_forward_derivative(exc)
            (gj,) = pull(apply_hz(Jv_j[None])[0])
            out[j].add_(obj.space.flatten(gj))
    return out


def batch_product(kind: CurvatureKind) -> Any:
    """The per-batch product of each kind of curvature: Σ_{i∈batch} (∇²θLᵢ or Jᵢᵀ∇²_zLᵢJᵢ) V."""
    return ggn_sum if kind == "gauss-newton" else hvp_sum


def _raise_without_forward_derivative(exc: RuntimeError) -> NoReturn:
    """Re-raise ``exc``: as an ``UnsupportedModelError`` with the fix when an operator has no
    forward-mode derivative, else unchanged."""
    msg = str(exc)
    if "forward AD" not in msg and "forward-mode" not in msg and "not implemented" not in msg:
        raise exc
    raise UnsupportedModelError(
        "Gauss–Newton products take one forward-mode derivative (JVP) of the model, and PyTorch"
        f" has none for one of its operations ({msg.splitlines()[0]}). For Hugging Face models"
        " build them with attn_implementation='eager'; or use KFAC()/EKFAC(), which approximate"
        " the same Gauss–Newton matrix from layer statistics."
    ) from exc


def _no_second_derivative(exc: RuntimeError) -> UnsupportedModelError | None:
    """An operator without a double backward (PyTorch's fused attention kernels on CPU) as an
    ``UnsupportedModelError`` that says how to get one; ``None`` for any other error."""
    msg = str(exc)
    if "derivative for" not in msg or "not implemented" not in msg:
        return None
    attention = "attention" in msg
    return UnsupportedModelError(
        "A Hessian-vector product needs the second derivative of every operation in the model, and"
        f" PyTorch has none for one of them ({msg.splitlines()[0]})."
        + (
            " It is a fused attention kernel: build the model with eager attention — for Hugging"
            " Face models attn_implementation='eager' in from_config/from_pretrained, or"
            " model.set_attn_implementation('eager') — which computes the same function with"
            " differentiable operations."
            if attention
            else " Replace that operation by a twice-differentiable one."
        )
        + " K-FAC/EK-FAC need no second derivative: KFAC(residual_sample=0) /"
        " EKFAC(residual_sample=0) skip the residual check that would take one."
    )


def power_iteration(
    apply, p: int, dtype: torch.dtype, *, n_iter: int, rtol: float, seed: int
) -> float:
    """Rayleigh quotient of the dominant eigenvector of the symmetric operator ``apply`` (p,) →
    (p,), stopping when it changes by less than ``rtol`` (relative)."""
    v = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(n_iter):
        w = apply(v)
        lam_new = float(v @ w)
        v = w / w.norm().clamp_min(1e-300)
        converged = abs(lam_new - lam) <= rtol * abs(lam_new)
        lam = lam_new
        if converged:
            break
    return lam
