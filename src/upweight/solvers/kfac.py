"""KFAC and EKFAC: block-diagonal Kronecker-factored inverses of the Gauss–Newton matrix,
as solvers and as preconditioners for ``CG`` — Martens & Grosse (2015), George et al. (2018),
Grosse et al. (2023).

Per factorable layer (``core.layers``) the block of H + δI is approximated by

    (Q_S ⊗ Q_A) (Λ + dI) (Q_S ⊗ Q_A)ᵀ,   inverse  (Q_S ⊗ Q_A) (Λ + dI)⁻¹ (Q_S ⊗ Q_A)ᵀ,

with Λ = σ ⊗ α (K-FAC) or the eigenvalue correction (EK-FAC, ``core.kfac``), and d the diagonal
of H that the GGN does not hold: the L2 term l2 (Koh & Liang 2017 §2: H = ∇²R includes l2·I),
the curvature's damping δ, and the solver's own extra ``damping``. The parameters of θ in no
factorable layer whose module gives module-local per-point gradients (LayerNorm scales and
shifts, position embeddings, …; ``core.local``) get one dense block per module, the exact GGN
restricted to them, built in the same pass as the factors and inverted by Cholesky; any other
parameter forms one more block, solved by CG on the exact HVP restricted to it — never dropped.
Cross-layer blocks of H are ignored. Factorable layers are ``nn.Linear``, ``nn.Conv2d``
and ``nn.Embedding`` (a bias-free Linear on one-hot token vectors, W̃ = Eᵀ; its activation factor
is diagonal, Q_A = I, kept as V token counts — see ``core.layers``; ``max_vocab`` can cap V).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._checks import check_finite, check_interval
from ..core import batching
from ..core.curvature import Curvature, operator_lambda_max, operator_lambda_min
from ..core.digest import digest_data, fn_name, model_sha256
from ..core.kfac import FactorStore, LayerFactors, Rotation, fit_factors
from ..core.layers import (
    DEFAULT_MAX_VOCAB,
    LayerPlan,
    OutputFactors,
    OutputSampling,
    find_layers,
    resolve_output_factors,
)
from ..core.local import DEFAULT_MAX_LOCAL, LocalModule
from ..errors import InputError, NotPositiveDefiniteError, UnsupportedModelError
from ..store import Store, opened_store
from .base import OneShotSolver, Solution, one_shot_solution
from .cg import CG
from .direct import suggest_damping

APPROXIMATES = (
    "the Gauss–Newton matrix G = (1/n) Σ Jᵢᵀ ∇²_zL(zᵢ) Jᵢ (exact output Hessian, sample-free: for"
    " cross-entropy the softmax covariance diag(p) − ppᵀ, i.e. the true Fisher under the model's"
    " own predictive distribution, not the empirical Fisher), layer-block-diagonal and"
    " Kronecker-factored, plus the L2 term and damping"
)
APPROXIMATES_SAMPLED = (
    "the Gauss–Newton matrix G = (1/n) Σ Jᵢᵀ ∇²_zL(zᵢ) Jᵢ, its output Hessian estimated without "
    "bias by {m} sampled cotangent(s) per point (for cross-entropy p − e_ŷ with labels ŷ drawn "
    "from the model at every position: the Monte-Carlo Fisher, not the empirical Fisher), "
    "layer-block-diagonal and Kronecker-factored, plus the L2 term and damping"
)


class BlockOperator:
    """P(H + δI)Pᵀ: the exact Hessian-vector product restricted to the coordinates ``index``
    (the vector is zero-padded to p, multiplied by the full H + δI, and read back on ``index``).

    A ``core.curvature.LinearOperator`` (``p``, ``dtype``, ``damping``, ``matvec``, ``lambda_max``,
    ``lambda_min``), so ``CG`` solves on it as on a ``Curvature``.
    """

    def __init__(self, curvature: Curvature, index: torch.Tensor) -> None:
        self.curvature = curvature
        self.index = index
        self.p = int(index.numel())
        self.dtype = curvature.dtype
        self.damping = curvature.damping

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        squeeze = V.ndim == 1
        V = V.reshape(-1, self.p).to(self.dtype)
        full = V.new_zeros(len(V), self.curvature.p)
        full[:, self.index] = V
        out = self.curvature.matvec(full)[:, self.index]
        return out[0] if squeeze else out

    def lambda_max(self, *, n_iter: int = 30, seed: int = 0) -> float:
        return operator_lambda_max(self.matvec, self.p, self.dtype, n_iter=n_iter, seed=seed)

    def lambda_min(self, *, n_iter: int = 100, seed: int = 0) -> float:
        return operator_lambda_min(self.matvec, self.p, self.dtype, n_iter=n_iter, seed=seed)


@dataclass
class KFACState:
    """What ``KFAC.prepare`` computed; passed back to ``solve`` / ``precondition``.

    Attributes:
        curvature: the operator H + δI the residuals are measured against.
        plan: the layer blocks and the fallback parameters.
        factors: per layer, A, S, their eigenbases and (EK-FAC) the corrected eigenvalues.
        inv_eigs: per layer, 1/(Λ + d) of shape (out, cols), d folded in (see ``KFAC``).
        fallback: the restricted exact operator on the non-factorable parameters, or ``None``.
        fallback_chol: its Cholesky factor (preconditioner use, small blocks), or ``None``.
        fallback_scale: the scalar that preconditions a large fallback block, or ``None``.
        local: per local module, (the module, the Cholesky factor of its block of G + d).
        stats: the numbers every ``Solution.stats`` of this fit carries.
    """

    curvature: Curvature
    plan: LayerPlan
    factors: list[LayerFactors]
    inv_eigs: list[torch.Tensor]
    fallback: BlockOperator | None
    stats: dict[str, Any]
    fallback_chol: torch.Tensor | None = None
    fallback_scale: float | None = None
    local: list[tuple[LocalModule, torch.Tensor]] = field(default_factory=list)
    #: (Q_S, Q_A, 1/(Λ + d)) per layer in a working dtype, made on first use
    cast_blocks: dict[torch.dtype, list[tuple[torch.Tensor, Rotation | None, torch.Tensor]]] = (
        field(default_factory=dict)
    )

    def blocks_in(
        self, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, Rotation | None, torch.Tensor]]:
        """(Q_S, Q_A, 1/(Λ + d)) per layer in ``dtype``; Q_A as its ``Rotation`` (only its
        coordinates that it mixes are multiplied), ``None`` where it is the identity (an
        embedding: no rotation to apply)."""
        if dtype not in self.cast_blocks:
            self.cast_blocks[dtype] = [
                (
                    f.Q_S.to(dtype),
                    None if f.identity_A else Rotation.of(f.Q_A).to(dtype),
                    inv.to(dtype),
                )
                for f, inv in zip(self.factors, self.inv_eigs)
            ]
        return self.cast_blocks[dtype]


@dataclass(frozen=True)
class KFAC(OneShotSolver):
    """Block-diagonal K-FAC inverse of the Gauss–Newton matrix — Martens & Grosse (2015), ICML.

    **What it approximates** (``approximates = "ggn-kronecker"``): not the Hessian H = ∇²R(θ̂)
    but the Gauss–Newton matrix G = (1/n) Σᵢ Jᵢᵀ ∇²_zL(zᵢ) Jᵢ (J the Jacobian of the model
    output z in θ), computed *exactly and without sampling* where the output is narrow: the output
    Hessian ∇²_zL is factored as Σₖ cₖcₖᵀ and each cₖ is back-propagated (cross-entropy: from
    √pₖ (eₖ − p), c − 1 factors for c classes, so this is the true Fisher under the model's
    predictive distribution — not the empirical Fisher of the observed labels); for wide outputs
    (a language model) it is sampled without bias (*Per-token losses* below). G = H for a linear
    model with a convex loss (logistic / softmax regression); for deeper models G drops the terms
    with the loss's curvature through the hidden layers and is positive semi-definite. G is then
    restricted to one block per factorable layer (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` —
    see ``max_vocab``; cross-layer terms dropped) and each block to S ⊗ A (``core.kfac``): exact for
    one point or a constant output Hessian (squared loss). An embedding E (V × d) is factored as a
    bias-free Linear on one-hot tokens with W = Eᵀ: A = diag(token frequencies), S the cotangent
    moment of its output; ``stats["layers"]`` lists it as ``name (embedding d×V)``.

    **L2 and damping.** H + δI holds l2 on the penalised coordinates and δ everywhere
    (``Curvature.diagonal``). Per block these are added to the eigenvalues, together with this
    solver's ``damping`` (an extra regulariser of the approximation only, default 0): when the
    block's diagonal is constant (weight and bias both penalised or both not) this is exact,
    (Q_S ⊗ Q_A)(Λ + d)⁻¹(Q_S ⊗ Q_A)ᵀ = (approximation + dI)⁻¹. With an unpenalised bias
    (``l2_exclude``) the diagonal is not a multiple of I and its diagonal in the Kronecker
    eigenbasis is used instead (``stats["l2_fold"]`` says which).

    **Parameters in no factorable layer.** Those of a module (not the model itself) of at most
    ``max_local`` parameters whose per-point gradients can be computed inside the module — a
    LayerNorm's scale and shift, a learned position embedding shared by the batch, a small custom
    module (``core.local``; checked against autograd on probe points) — get one dense block per
    module: the exact GGN restricted to them, G_φφ = (1/n) Σᵢₖ uᵢₖuᵢₖᵀ from their module-local
    pseudo-gradients, summed in the factor pass and solved by Cholesky with d on its diagonal
    (``stats["local_blocks"]``). The rest (a bare ``nn.Parameter`` of the model, an embedding over
    ``max_vocab`` tokens (when set) or with ``max_norm`` / ``scale_grad_by_freq`` / ``sparse``, tied
    weights, a shared layer, …) form one block, solved by CG on the exact HVP of H + δI restricted
    to it (``fallback_rtol``); one full-data HVP per CG iteration and right-hand side, the cost that
    dominates on a transformer when it is needed. ``stats["fallback_params"]`` names them. A model
    with no factorable layer in θ is refused: use ``CG`` there.

    **Memory.** Per layer with ``cols`` input columns (inputs + 1 for a bias) and ``out`` outputs,
    the float64 factors take 8·(cols² + out²) bytes for A and S, as much again for their
    eigenvectors Q_A and Q_S, and 8·out·cols for the eigenvalues (Λ for EK-FAC) — an embedding keeps
    V token counts instead of a V × V factor. ``core.kfac.factor_bytes`` adds up the peak of
    building them, and ``fit_factors`` checks it against the available memory before any pass
    (``InsufficientMemoryError`` naming the widest layer). A factor pass holds at most
    ``core.batching.TENSOR_BYTES`` per captured tensor (``core.kfac.capture_batch_size``); the
    train-side scores are computed per chunk of training points (``Influence``'s sweep).

    **Per-token losses: sampled output factors.** The exact output-Hessian factors cost one
    backward pass each, c per point for c outputs: a loss over T tokens of a V-word vocabulary
    would need T·V of them. ``output_factors="auto"`` (the default) keeps them up to
    ``core.layers.MAX_OUTPUT_FACTORS`` outputs and above that *samples*: per point, ``samples``
    (M) cotangents u/√M with E[uuᵀ] = ∇²_zL, one backward pass each whatever T·V — for
    cross-entropy u = p − e_ŷ at every position, ŷ drawn from the model's own softmax there
    (positions with label −100 weigh 0). Since E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag(p) − ppᵀ and the
    positions' labels are independent, Jᵀ E[uuᵀ] J is exactly the GGN: S, Λ and the local blocks
    are unbiased (the Monte-Carlo Fisher; A is exact), with an error ∝ 1/√(M·n). Any other loss
    with a closed form is sampled as Σₖ εₖcₖ with random signs εₖ; a loss without one is refused
    above the cap (``UnsupportedModelError`` naming CG on the Gauss–Newton matrix,
    ``Influence(curvature="gauss-newton")``, the same matrix without factors).
    ``output_factors="exact"`` refuses outputs above the cap, ``"sampled"`` samples any output.
    The draws of point i come from a generator seeded by ``seed`` and its id (``Data.ids``): the
    same factors whatever the batching, an executor's partitions or the device, and EK-FAC's Λ
    reuses the samples of S. ``stats["output_factors"]`` says which were used (and the store's
    fingerprint, so sampled and exact factors never mix). Train-side gradients (the scores) are
    the true loss gradients; only the curvature is sampled.

    **On a cluster.** With ``Influence.fit(data, executor=…)`` (the curvature's executor) the
    passes over the data that build A, S (and Λ for EK-FAC) run as map-reduces over partitions of
    the training points (``core.kfac.fit_factors``); the eigendecompositions stay on the client.
    ``stats["fit_where"]`` says where they ran.

    **Stored factors.** ``Influence.fit(train, store=FOLDER)`` (or ``prepare(curvature, store=…)``)
    keeps every factor tensor in an ``upweight.Store`` as it is computed and reads them back on a
    later fit of the same computation (``factor_fingerprint``), with no pass over the data and
    bit-for-bit the same state; l2, δ and ``damping`` may change in between, another computation is
    refused with ``StoreMismatchError`` (``core.kfac.FactorStore`` lists what is stored).
    ``stats["factors_from_store"]`` says whether every factor was read back.

    **Residual.** Like every solver, each solve measures ‖(H + δI)x − v‖/‖v‖ against the *true*
    Hessian with one full-data HVP. It is the approximation's error, not a convergence failure,
    and it is not bounded by 1 (as Arnoldi's projection residual is): with μ the eigenvalues of
    (H + δI)M⁻¹ it is at most max|μ − 1|, so wherever K-FAC under-estimates the curvature by more
    than 2× it exceeds 1 although x may still be a usable approximation: a residual of a few
    units does not by itself make the answer useless. ``default_max_residual`` is therefore 10:
    ``Influence(max_residual="auto")`` rejects only a solve whose approximation is off by an order
    of magnitude (broken factors, or a Hessian far from its Gauss–Newton part, e.g. an indefinite
    one). It says nothing about how good the scores are: ``Influence.estimate_accuracy(test)``
    measures that against CG on the same curvature. Pass a tighter ``max_residual`` where
    magnitudes matter — or, for exact answers, use K-FAC as a preconditioner:
    ``CG(preconditioner=KFAC())`` solves the true system to ``rtol``.

    Args:
        damping: extra damping added to every Kronecker eigenvalue (≥ 0); makes the solve more
            approximate but guards against tiny eigenvalues when l2 + δ = 0.
        fallback_rtol: CG tolerance of the non-factorable block.
        fallback_maxiter: CG iteration cap of that block (``None``: CG's default).
        fallback_dense_max: as a preconditioner, a non-factorable block of at most this many
            parameters is inverted exactly (its dense restricted Hessian, ⌈p_f/256⌉ HVP passes);
            a larger one is scaled by 1/(mean eigenvalue) estimated from 8 Hutchinson probes.
        max_points: estimate the factor statistics (A, S and EK-FAC's Λ) from at most this many
            training points — a fixed random subset (``seed``) — instead of all n (``None``). The
            factors are means, so a few thousand points estimate them well; as a preconditioner
            (``CG(preconditioner=KFAC(max_points=…))``) the answer stays exact and only the
            iteration count can change.
        seed: seeds the subset of ``max_points`` and the sampled output factors.
        output_factors: "auto" (default), "exact" or "sampled": the output-Hessian factors (see
            *Per-token losses* above).
        samples: sampled cotangents per point with sampled output factors (≥ 1; one backward pass
            each): the estimate's variance falls as 1/samples.
        max_local: the most parameters of one module given a dense module-local block (its
            memory is 8·p_m² bytes and three times that while it is built and factored); a larger
            module's parameters go to the CG fallback block. ``None``: no cap; 0: no local blocks.
        max_vocab: the largest ``nn.Embedding`` vocabulary V that is factored, or ``None`` (the
            default, ``core.layers.DEFAULT_MAX_VOCAB``): no cap — an embedding costs its d × V
            block (eigenvalues, inverse) and V token counts, never a V × V matrix or one-hot
            inputs. A larger embedding goes to the fallback block, its reason naming V and the cap
            (``stats["fallback_reasons"]``).
        residual_sample: right-hand sides per solve whose true residual is measured (keyword only;
            default 16; 0 = unchecked) — see ``OneShotSolver``.

    Raises:
        InputError: a negative or non-finite setting.
        UnsupportedModelError: no ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` weight in θ; or
            output factors of the chosen kind cannot be formed for the loss (the message names
            what can).
        NotPositiveDefiniteError: an eigenvalue of the approximation + d is (numerically) 0 —
            e.g. always-zero input pixels with l2 + δ = 0; the message names a damping.
    """

    name = "kfac"
    approximates = "ggn-kronecker"
    eigen_correction: ClassVar[bool] = False
    #: the residual measures the approximation, not convergence, and can exceed 1 (see above)
    default_max_residual = 10.0
    damping: float = 0.0
    fallback_rtol: float = 1e-6
    fallback_maxiter: int | None = None
    fallback_dense_max: int = 1024
    max_points: int | None = None
    seed: int = 0
    max_vocab: int | None = DEFAULT_MAX_VOCAB
    max_local: int | None = DEFAULT_MAX_LOCAL
    output_factors: OutputFactors = "auto"
    samples: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.max_points is not None:
            check_interval(
                owner, "max_points", self.max_points, 1, None, closed="left", integer=True
            )
        check_interval(owner, "seed", self.seed, 0, None, closed="left", integer=True)
        if self.max_vocab is not None:
            check_interval(owner, "max_vocab", self.max_vocab, 1, None, closed="left", integer=True)
        if self.max_local is not None:
            check_interval(owner, "max_local", self.max_local, 0, None, closed="left", integer=True)
        check_interval(owner, "damping", self.damping, 0.0, None, closed="left")
        check_interval(owner, "fallback_rtol", self.fallback_rtol, 0.0, 1.0)
        if self.fallback_maxiter is not None:
            check_interval(
                owner,
                "fallback_maxiter",
                self.fallback_maxiter,
                1,
                None,
                closed="left",
                integer=True,
            )
        check_interval(
            owner,
            "fallback_dense_max",
            self.fallback_dense_max,
            0,
            None,
            closed="left",
            integer=True,
        )
        if self.output_factors not in ("auto", "exact", "sampled"):
            raise InputError(
                f"{owner}: output_factors must be 'auto', 'exact' or 'sampled'; got "
                f"{self.output_factors!r}."
            )
        check_interval(owner, "samples", self.samples, 1, None, closed="left", integer=True)

    # ── prepare ───────────────────────────────────────────────────────────────────────
    def prepare(
        self, curvature: Curvature, *, store: str | os.PathLike[str] | Store | None = None
    ) -> KFACState:
        """Fit the factors (or read them from ``store``) and fold l2, δ and ``damping`` into them.

        ``store``: a folder or ``upweight.Store`` that keeps the factors
        (``core.kfac.FactorStore``): bound to ``factor_fingerprint`` — θ̂, the training data, the
        loss and output selector, the curvature kind,
        ``max_points``/``seed``/``max_vocab``/``max_local``, the output factors used (exact, or
        sampled with ``samples``) and the layer plan — it supplies every factor tensor it holds
        complete and receives the others as they are computed. K-FAC and EK-FAC share one store (Λ
        is added by the first EK-FAC fit). l2, δ, ``damping`` and the fallback settings enter after
        the factors, so they may differ.

        Raises:
            StoreMismatchError: the store holds the factors of another computation (naming what
                differs).
        """
        with opened_store(store) as st:
            return self._prepare(curvature, st)

    def factor_fingerprint(
        self, curvature: Curvature, plan: LayerPlan, output_factors: str | None = None
    ) -> dict[str, Any]:
        """What the factors depend on: the key of a factor store (``Store.bind``).

        θ̂ (a SHA-256 over the model's parameters and buffers, as the score stores'), the
        parameters of θ and the dtype, the loss and output selector, the training data's digests,
        the curvature kind, the settings that choose the points and layers, the output factors
        used (``output_factors``: "exact", or "sampled" with ``samples``; ``None``: resolved from
        this solver's setting, so "auto" shares a store with what it chose), and the resulting
        layer plan. Not l2, δ, ``damping``
        (added to the eigenvalues afterwards), the fallback settings, nor ``eigen_correction``
        (EK-FAC's Λ is stored next to the K-FAC factors)."""
        obj = curvature.objective
        output = (
            obj.output if obj.output is None or isinstance(obj.output, str) else fn_name(obj.output)
        )
        if output_factors is None:
            output_factors = resolve_output_factors(obj, curvature.data, self.output_factors)
        return {
            "quantity": "kfac_factors",
            "model": {
                "parameters_sha256": model_sha256(obj),
                "theta": list(obj.space.names),
                "dtype": str(obj.dtype),
            },
            "objective": {"loss": obj.loss_name, "output": output},
            "curvature": curvature.kind,
            "train_data": digest_data(curvature.data),
            "factors": {
                "max_points": self.max_points,
                "seed": self.seed,
                "max_vocab": self.max_vocab,
                "max_local": self.max_local,
                "output_factors": output_factors,
                "samples": self.samples if output_factors == "sampled" else None,
            },
            "layers": [f"{b.name} ({b.kind} {b.out_dim}×{b.cols})" for b in plan.blocks],
            "local_blocks": [f"{lm.name} ({lm.size})" for lm in plan.local],
        }

    def _prepare(self, curvature: Curvature, store: Store | None) -> KFACState:
        t0 = time.perf_counter()
        obj = curvature.objective
        plan = find_layers(
            obj,
            curvature.data,
            embeddings=True,
            max_vocab=self.max_vocab,
            local=self.max_local != 0,
            max_local=self.max_local,
        )
        if not plan.blocks:
            reasons = "; ".join(
                [f"{n}: {r}" for n, r in plan.reasons.items()]
                + [
                    f"{n}: module-local (no Kronecker factors)"
                    for lm in plan.local
                    for n in lm.params
                ]
            )
            raise UnsupportedModelError(
                f"{type(self).__name__} found no factorable layer in θ (an nn.Linear, nn.Conv2d or"
                " nn.Embedding whose weight is in θ, called once per forward pass), so it would be"
                f" plain CG. Parameters: {reasons}. Use CG() (or Direct() for small p) instead."
            )
        data = curvature.data
        if self.max_points is not None and self.max_points < len(data):
            gen = torch.Generator().manual_seed(self.seed)
            data = data.subset(
                torch.randperm(len(data), generator=gen)[: self.max_points].sort().values
            )
        mode = resolve_output_factors(obj, data, self.output_factors)
        sampling = OutputSampling(self.samples, self.seed) if mode == "sampled" else None
        fstore = None
        if store is not None:
            store.bind(self.factor_fingerprint(curvature, plan, mode))
            fstore = FactorStore(store, plan.blocks, plan.local)
        factors, fit = fit_factors(
            obj,
            data,
            plan.blocks,
            params=curvature.params,
            batch_size=curvature.batch_size,
            eigen_correction=self.eigen_correction,
            executor=curvature.executor,
            local=plan.local,
            store=fstore,
            sampling=sampling,
        )
        diag = curvature.diagonal.to(torch.float64) + self.damping
        inv_eigs, folds = [], []
        for f in factors:
            # (out, cols): identical rows (one value per parameter tensor, plus δ)
            d = diag[f.block.index]
            lam = f.eigenvalues
            if float(d.max() - d.min()) <= 1e-15 * max(float(d.abs().max()), 1e-300):
                denom = lam + d[0, 0]
                folds.append("exact")
            else:
                # diag of I ⊗ diag(d_A) in the eigenbasis (Q_A = I for an embedding: d_A itself)
                d_A = d[0] if f.Q_A is None else ((f.Q_A**2) * d[0][:, None]).sum(0)
                denom = lam + d_A[None, :]
                folds.append("eigenbasis-diagonal")
            top = float(lam.max()) if lam.numel() else 0.0
            if float(denom.min()) <= 1e-12 * max(top, float(d.abs().max()), 1e-300):
                fix = suggest_damping(0.0, curvature.damping + self.damping, top)
                raise NotPositiveDefiniteError(
                    f"The {type(self).__name__} approximation of layer '{f.block.name}' is"
                    " singular: an eigenvalue of the Kronecker factors plus l2 + damping is"
                    f" {float(denom.min()):.3e} (e.g. an input that is always 0 or an embedding"
                    f" token that never occurs, with l2 + δ = 0). Pass damping ≥ {fix:.2g}"
                    f" (Influence(..., damping={fix:.2g}) or"
                    f" {type(self).__name__}(damping={fix:.2g})), or an l2 term.",
                    min_eigenvalue=float(denom.min()),
                    suggested_damping=fix,
                )
            inv_eigs.append(1.0 / denom)
        local = [
            (lm, self._local_cholesky(lm, fit.local_ggn[lm.name], diag, curvature))
            for lm in plan.local
        ]
        fallback = BlockOperator(curvature, plan.other_index) if plan.other else None
        fold = (
            "exact"
            if all(x == "exact" for x in folds)
            else "eigenbasis-diagonal on "
            + ", ".join(f.block.name for f, x in zip(factors, folds) if x != "exact")
        )
        stats: dict[str, Any] = {
            "approximates": self.approximates,
            "curvature_approximated": (
                APPROXIMATES if sampling is None else APPROXIMATES_SAMPLED.format(m=self.samples)
            ),
            "output_factors": mode,
            "output_samples": None if sampling is None else self.samples,
            "layers": tuple(
                f"{f.block.name or '<model>'} ({f.block.kind} {f.block.out_dim}×{f.block.cols})"
                for f in factors
            ),
            "factored_params": sum(f.block.size for f in factors),
            "local_blocks": tuple(
                f"{lm.name} (dense {lm.size}: exact GGN block)" for lm in plan.local
            ),
            "fallback_params": plan.other,
            "fallback_size": fallback.p if fallback else 0,
            "fallback_method": (
                "CG on the exact HVP restricted to the block" if fallback else "none"
            ),
            "fallback_reasons": tuple(f"{n}: {r}" for n, r in plan.reasons.items()),
            "l2_fold": fold,
            "kfac_damping": self.damping,
            "fit_points": len(data),
            "fit_passes": fit.passes,
            "fit_where": fit.where,
            "fit_points_per_capture": fit.points_per_capture,
            "clamped_output_eigenvalues": fit.clamped_output_eigenvalues,
            "factor_store": None if store is None else str(store.path),
            # True: no pass over the data ran, every factor was read back from the store
            "factors_from_store": fit.passes_run == 0,
            "factors_loaded": fit.loaded,
            "fit_passes_run": fit.passes_run,
            "residual_against": (
                f"the exact {curvature.describes} (one full-data product per solve)"
            ),
            "prepare_seconds": time.perf_counter() - t0,
        }
        return KFACState(curvature, plan, factors, inv_eigs, fallback, stats, local=local)

    def _local_cholesky(
        self, lm: LocalModule, ggn: torch.Tensor, diag: torch.Tensor, curvature: Curvature
    ) -> torch.Tensor:
        """The Cholesky factor of a local module's block G_φφ + d (d: L2, δ and this solver's
        damping). ``ggn`` is this fit's own copy (already in a store, if any): d is added to it in
        place, so a block of a few thousand parameters is held twice at most, not three times."""
        M = ggn
        M.diagonal().add_(diag[lm.index])
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            return L
        ev = torch.linalg.eigvalsh(M)
        fix = suggest_damping(float(ev[0]), curvature.damping + self.damping, float(ev[-1]))
        raise NotPositiveDefiniteError(
            f"The Gauss–Newton block of module '{lm.name}' ({lm.size} parameters) plus l2 + damping"
            f" is singular (smallest eigenvalue {float(ev[0]):.3e}): e.g. a position that never"
            f" occurs, with l2 + δ = 0. Pass damping ≥ {fix:.2g} (Influence(..., damping={fix:.2g})"
            f" or {type(self).__name__}(damping={fix:.2g})), or an l2 term.",
            min_eigenvalue=float(ev[0]),
            suggested_damping=fix,
        )

    def prepare_preconditioner(
        self, curvature: Curvature, *, store: str | os.PathLike[str] | Store | None = None
    ) -> KFACState:
        """``prepare`` (with its ``store``), plus a fixed linear inverse for the fallback block (CG
        needs a fixed SPD preconditioner): its dense restricted Hessian's Cholesky factor if it has
        at most ``fallback_dense_max`` parameters, else 1/(its mean eigenvalue) from 8 Hutchinson
        probes."""
        state = self.prepare(curvature, store=store)
        op = state.fallback
        if op is None:
            return state
        t0 = time.perf_counter()
        if op.p <= self.fallback_dense_max:
            eye = torch.eye(op.p, dtype=op.dtype, device=op.curvature.objective.device)
            Hf = torch.cat([op.matvec(eye[s : s + 256]) for s in range(0, op.p, 256)]).to(
                torch.float64
            )
            Hf = 0.5 * (Hf + Hf.T)
            L, info = torch.linalg.cholesky_ex(Hf)
            if int(info) != 0:
                ev = torch.linalg.eigvalsh(Hf)
                fix = suggest_damping(float(ev[0]), curvature.damping, float(ev[-1]))
                raise NotPositiveDefiniteError(
                    "The Hessian restricted to the parameters outside the factored layers"
                    f" ({', '.join(state.plan.other)}) is not positive definite (smallest"
                    f" eigenvalue {float(ev[0]):.3e}, damping={curvature.damping:g}). Pass damping"
                    f" ≥ {fix:.2g} (e.g. Influence(..., damping={fix:.2g})).",
                    min_eigenvalue=float(ev[0]),
                    suggested_damping=fix,
                )
            state.fallback_chol = L
            state.stats["fallback_preconditioner"] = (
                "exact inverse of the restricted Hessian (dense Cholesky)"
            )
        else:
            gen = torch.Generator().manual_seed(0)
            Z = (torch.randint(0, 2, (8, op.p), generator=gen) * 2 - 1).to(
                op.curvature.objective.device, op.dtype
            )
            mean_eig = float((Z * op.matvec(Z)).sum(1).mean()) / op.p
            scale = (
                1.0 / mean_eig
                if mean_eig > 0
                else 1.0 / max(float(curvature.diagonal.max()), 1e-12)
            )
            state.fallback_scale = scale
            state.stats["fallback_preconditioner"] = (
                f"scaled identity 1/{1 / scale:.3g} (Hutchinson mean eigenvalue)"
            )
        state.stats["fallback_preconditioner_seconds"] = time.perf_counter() - t0
        return state

    # ── apply ─────────────────────────────────────────────────────────────────────────
    @staticmethod
    def apply_blocks(state: KFACState, V: torch.Tensor) -> torch.Tensor:
        """The layer blocks (and local modules' dense blocks, in float64) of the approximate inverse
        applied to V (k, p), in V's dtype (for ``solve``: the model's, float32 or float64); the
        fallback coordinates are left 0."""
        X = torch.zeros_like(V)
        for lm, L in state.local:
            X[:, lm.index] = torch.cholesky_solve(V[:, lm.index].T.to(L.dtype), L).T.to(V.dtype)
        for f, (Q_S, Q_A, inv) in zip(state.factors, state.blocks_in(V.dtype)):
            idx = f.block.index
            # rows at a time, so that each intermediate (rows, out, cols) stays within the tensor
            # budget: a wide block (a transformer's embedding) times many right-hand sides
            rows = batching.points_within(
                batching.TENSOR_BYTES, idx.numel() * V.element_size(), len(V)
            )
            for s in range(0, len(V), rows):
                Y = Q_S.T @ V[s : s + rows, idx]  # rotate into the Kronecker eigenbasis
                if Q_A is not None:
                    Y = Q_A(Y)
                Z = Q_S @ Y.mul_(inv)
                X[s : s + rows, idx] = Z if Q_A is None else Q_A(Z, transpose=True)
        return X

    def precondition(self, state: KFACState, R: torch.Tensor) -> torch.Tensor:
        """M⁻¹R for the preconditioned CG: the layer blocks, and a fixed linear inverse on the
        fallback block (see ``prepare_preconditioner``). R of shape (k, p).

        Computed in R's dtype when it is float32 (CG on a float32 model): M only has to be a
        fixed SPD matrix close to H + δI, so its rounding changes iteration counts, never the
        answer CG converges to — and the rotations, O(out·cols·(out + cols)) per right-hand side
        and layer, cost half as much as in float64 (for wide layers and few training points,
        the dominant cost of preconditioned CG)."""
        work = torch.float32 if R.dtype == torch.float32 else torch.float64
        V = R.reshape(-1, state.curvature.p).to(work)
        X = self.apply_blocks(state, V)
        if state.fallback is not None:
            idx = state.fallback.index
            if state.fallback_chol is not None:
                X[:, idx] = torch.cholesky_solve(V[:, idx].T.double(), state.fallback_chol).T.to(
                    work
                )
            elif state.fallback_scale is not None:
                X[:, idx] = state.fallback_scale * V[:, idx]
            else:
                raise UnsupportedModelError(
                    f"{type(self).__name__}.precondition needs the state of"
                    " prepare_preconditioner(), not prepare()."
                )
        return X.to(R.dtype)

    def solve(self, state: KFACState, rhs: torch.Tensor) -> Solution:
        """X ≈ (H + δI)⁻¹B by the layer blocks (and CG on the fallback block), with its true
        residual.

        The rotations run in the model's dtype (the factors' float64 eigenbases cast once): in
        float32 their rounding (≈ 1e-7 × the block's condition number) is far below the
        Kronecker approximation's own error, and they cost half as much — with many right-hand
        sides, out·cols·(out + cols) multiply-adds each per layer, the bulk of the solve."""
        t0 = time.perf_counter()
        curv = state.curvature
        B = rhs.reshape(-1, curv.p).to(curv.dtype)
        work = torch.float32 if curv.dtype == torch.float32 else torch.float64
        X = self.apply_blocks(state, B.to(work))
        stats = dict(state.stats)
        if state.fallback is not None:
            cg = CG(rtol=self.fallback_rtol, maxiter=self.fallback_maxiter)
            sol_f = cg.solve(state.fallback, B[:, state.fallback.index])
            X[:, state.fallback.index] = sol_f.value.to(work)
            stats.update(
                fallback_iterations=sol_f.iterations, fallback_residual_max=sol_f.max_residual
            )
        X = X.to(curv.dtype)
        check_finite(X, f"The {self.name} solution", "Add damping or check the model at θ̂.")
        return one_shot_solution(
            curv,
            X,
            B,
            rhs.dtype,
            t0,
            stats,
            iterations=int(stats.get("fallback_iterations", 0)),
            sample=self.residual_sample,
        )


@dataclass(frozen=True)
class EKFAC(KFAC):
    """K-FAC with the eigenvalue correction — George et al. (2018), NeurIPS; Grosse et al. (2023).

    **What it approximates** (``approximates = "ggn-ekfac"``): the same layer-block-diagonal
    Gauss–Newton matrix as ``KFAC`` (its output Hessian exact, or sampled: see ``KFAC``'s *Per-token
    losses*; Λ then uses the same sampled pseudo-gradients as S), in the same Kronecker
    eigenbasis Q_S ⊗ Q_A, but with the eigenvalues σ ⊗ α replaced by the diagonal of the GGN
    block in that basis, Λ = (1/n) Σᵢₖ ((Q_S ⊗ Q_A)ᵀ gᵢₖ)², gᵢₖ the per-point GGN
    pseudo-gradients. Λ is the Frobenius-closest matrix to the GGN block with that eigenbasis,
    so EK-FAC is never further from it than K-FAC. One more pass over the data in ``prepare``.
    Everything else (L2/damping fold, fallback block, residual, ``default_max_residual``) is as
    in ``KFAC``.
    """

    name = "ekfac"
    approximates = "ggn-ekfac"
    eigen_correction: ClassVar[bool] = True
