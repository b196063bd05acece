"""DataInf: a closed-form, block-diagonal inverse of the damped empirical Fisher — Kwon, Wu, Wu &
Zou (2024).

Kwon, Wu, Wu & Zou, "DataInf: Efficiently estimating data influence in LoRA-tuned LLMs and
diffusion models", ICLR 2024. Per parameter block l, the damped empirical Fisher
G_l + Λ_l = (1/n) Σᵢ (gᵢₗgᵢₗᵀ + Λ_l) (gᵢₗ = ∇θ_l L(zᵢ, θ̂)) is inverted by swapping the mean and
the inverse, each term inverted by Sherman–Morrison:

    (G_l + Λ_l)⁻¹v ≈ (1/n) Σᵢ (gᵢₗgᵢₗᵀ + Λ_l)⁻¹v
                   = Λ_l⁻¹v − (1/n) Σᵢ Λ_l⁻¹gᵢₗ (gᵢₗᵀΛ_l⁻¹v) / (1 + gᵢₗᵀΛ_l⁻¹gᵢₗ),

which for Λ_l = λ_l I is the paper's (1/λ_l)(v − (1/n) Σᵢ gᵢₗ (gᵢₗᵀv)/(λ_l + ‖gᵢₗ‖²)). One pass
over the per-sample gradients per block of right-hand sides; no HVP, no iteration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_finite, check_interval
from .._progress import progress
from ..core.curvature import Curvature
from ..core.grads import grad_chunk_size, iter_per_sample_grads
from ..errors import InputError, NotPositiveDefiniteError
from .base import OneShotSolver, Solution, one_shot_solution, relative_residual

APPROXIMATES = (
    "the empirical Fisher (1/n) Σ ∇L(zᵢ)∇L(zᵢ)ᵀ (observed labels, uncentred) — not the Hessian —"
    " block-diagonal over the modules that own θ's parameters, damped by Λ_l, with its inverse"
    " replaced by the mean of the per-point inverses (Kwon et al. 2024, Eq. 5)"
)
#: DataInf's own damping rule (Kwon et al. 2024, and their released code): λ_l = 0.1 · (n d_l)⁻¹ Σᵢ
#: ‖gᵢₗ‖², a tenth of the mean squared gradient entry of the block (d_l its number of parameters)
DATAINF_RULE = 0.1


@dataclass(frozen=True)
class DataInfBlock:
    """One parameter block: the θ parameters owned directly by one module.

    Attributes:
        name: the module's path ("" for parameters of the root module).
        params: the parameter names in the block.
        index: their coordinates in the flat θ, as a slice when contiguous, else a long tensor.
    """

    name: str
    params: tuple[str, ...]
    index: slice | torch.Tensor


@dataclass(frozen=True)
class DataInfState:
    """What ``DataInf.prepare`` computed; passed back to ``solve``.

    Attributes:
        curvature: the operator H + δI the residuals are measured against (and the data and θ̂
            whose per-sample gradients DataInf uses).
        blocks: the parameter blocks.
        lam: Λ per coordinate of θ, shape (p,), float64 (constant on a block except under
            ``lam="auto"`` with a per-parameter L2 diagonal, e.g. ``l2_exclude``).
        stats: the numbers every ``Solution.stats`` of this fit carries.
    """

    curvature: Curvature
    blocks: tuple[DataInfBlock, ...]
    lam: torch.Tensor
    stats: dict[str, Any]


def module_blocks(names: tuple[str, ...], sizes: tuple[int, ...]) -> tuple[DataInfBlock, ...]:
    """Group θ's parameters by the module that owns them (the name up to its last "."), in order
    of first appearance: weight and bias of one ``nn.Linear`` form one block.

    Examples:
        >>> blocks = module_blocks(("fc1.weight", "fc1.bias", "fc2.weight"), (6, 2, 2))
        >>> [(b.name, b.params) for b in blocks]
        [('fc1', ('fc1.weight', 'fc1.bias')), ('fc2', ('fc2.weight',))]
    """
    offsets, start = {}, 0
    for n, s in zip(names, sizes):
        offsets[n] = (start, start + s)
        start += s
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    blocks = []
    for mod, params in groups.items():
        idx = torch.cat([torch.arange(*offsets[n]) for n in params])
        contiguous = bool((idx[1:] - idx[:-1] == 1).all()) if len(idx) > 1 else True
        index: slice | torch.Tensor = (
            slice(int(idx[0]), int(idx[-1]) + 1) if contiguous and len(idx) else idx
        )
        blocks.append(DataInfBlock(mod, tuple(params), index))
    return tuple(blocks)


@dataclass(frozen=True)
class DataInf(OneShotSolver[DataInfState]):
    """Closed-form block-diagonal inverse of the damped empirical Fisher — Kwon et al. (2024), ICLR.

    **What it approximates** (``approximates = "empirical-fisher-datainf"``): not the Hessian
    H = ∇²R(θ̂) of Koh & Liang (2017) but the *empirical Fisher* G = (1/n) Σᵢ gᵢgᵢᵀ,
    gᵢ = ∇θL(zᵢ, θ̂) with the observed labels, restricted to one diagonal block per module
    (cross-module terms dropped) and damped per block by Λ_l; its inverse is then replaced by
    the mean of the per-point inverses (the swap above, exact by Sherman–Morrison per point).
    For a well-specified model at θ̂, G ≈ the Fisher ≈ the Gauss–Newton part of H, but they
    differ in general (e.g. G is small where the model fits well, H is not).

    **Blocks.** One block per module that directly owns parameters of θ (``module_blocks``):
    the weight and bias of an ``nn.Linear``/``nn.Conv2d`` together, a bare parameter of the
    root module with the root's other parameters. ``stats["blocks"]`` lists them.

    **Damping Λ_l** (``lam``): "auto" (default) uses the curvature's diagonal l2 + δ
    (``Curvature.diagonal``) on a block where it is > 0 on every coordinate — the same
    regulariser the Hessian has; on a block where it is 0 somewhere (no l2, no damping, or an
    unpenalised bias), DataInf's own rule λ_l = 0.1 · meanᵢ ‖gᵢₗ‖²/d_l (a tenth of the mean
    squared gradient entry; d_l = the block's size) is added to it. "datainf"
    always uses the rule (ignoring l2 and δ); a float λ > 0 uses Λ_l = λI on every block.
    ``stats["lambda_source"]`` says which, per block.

    **Error of the swap.** With eᵢ = gᵢₗᵀΛ_l⁻¹gᵢₗ (≈ ‖gᵢₗ‖²/λ_l) and φ(e) = e²/(1 + e), writing
    each term as Λ^{1/2}(I + Eᵢ)Λ^{1/2} and using (I + E)⁻¹ = I − E + E²(I + E)⁻¹, the first-order
    terms cancel and, for the spectral norm,

        ‖(1/n) Σᵢ (gᵢₗgᵢₗᵀ + Λ_l)⁻¹ − (G_l + Λ_l)⁻¹‖ ≤ meanᵢ φ(eᵢ) / min Λ_l,

    second order in ‖g‖²/λ while that is small, and up to meanᵢ eᵢ / λ when it is large: the
    swap is exact for n = 1 and good only where λ_l dominates the per-point curvature gᵢₗgᵢₗᵀ.
    Kwon et al. state the same dependence as an error bound growing with the block dimension
    d_l (‖gᵢₗ‖² grows with d_l), which is why they target small LoRA blocks.
    ``stats["swap_error_bound"]`` is meanᵢ φ(eᵢ) per block (in units of 1/min Λ_l, the largest
    norm the exact inverse can have), computed with eᵢ ≤ ‖gᵢₗ‖²/min Λ_l.

    **Residual.** Like every solver, each solve measures ‖(H + δI)x − v‖/‖v‖ against the *true*
    Hessian with one full-data HVP: the approximation's error, not convergence, and not
    bounded by 1. ``default_max_residual`` is 10 (as ``KFAC``): ``Influence(max_residual="auto")``
    rejects an answer off by more than an order of magnitude. On a large block with a small λ
    (‖gᵢ‖²/λ ≫ 1) the swap's error dominates — the residual can then be far above 10, so "auto"
    refuses it (pass ``max_residual=None`` to accept it, as the paper does) — and a smaller λ,
    such as DataInf's own rule gives there, makes it worse (bench/RESULTS.md compares the
    rankings with exact influence). Read its scores as the paper's approximation, not as Koh &
    Liang's influence.
    With ``fisher_residual=True`` each solve also reports ``stats["fisher_residual_max"]`` =
    maxⱼ ‖(G_bd + Λ)xⱼ − vⱼ‖/‖vⱼ‖ against the block-diagonal damped empirical Fisher it
    approximates — the swap's own error (one more gradient pass).

    **Cost.** ``prepare``: one pass over the per-sample gradients (the block norms). ``solve``:
    one pass (two with ``fisher_residual``), in memory-bounded chunks (``core.grads``) — n × p
    is never held — plus one HVP for the residual.

    Args:
        lam: "auto", "datainf" or a float > 0 (see above).
        fisher_residual: also measure the residual against the approximated operator.
        residual_sample: right-hand sides per solve whose true residual is measured (keyword only;
            default 16; 0 = unchecked) — see ``OneShotSolver``.

    Raises:
        InputError: an invalid setting, naming the parameter.
        NotPositiveDefiniteError: a block whose Λ_l is 0 (all its per-sample gradients are 0 and
            no l2/damping); the message names the damping that fixes it.

    Examples:
        >>> import torch
        >>> from upweight import Objective, Data
        >>> model = torch.nn.Linear(1, 1, bias=False).eval()
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> obj = Objective(model, "squared", l2=1.0)
        >>> # g = −1, λ = 1, so the answer is (g² + λ)⁻¹·2
        >>> curv = Curvature(obj, Data.from_any((torch.ones(1, 1), torch.ones(1, 1))))
        >>> DataInf().solve(DataInf().prepare(curv), torch.tensor([[2.0]])).value.tolist()
        [[1.0]]
    """

    name = "datainf"
    approximates = "empirical-fisher-datainf"
    #: the residual measures the approximation, not convergence, and can exceed 1 (see above)
    default_max_residual = 10.0
    lam: float | str = "auto"
    fisher_residual: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lam, str):
            if self.lam not in ("auto", "datainf"):
                raise InputError(
                    "The 'lam' parameter of DataInf must be 'auto', 'datainf' or a float > 0. Got"
                    f" {self.lam!r}."
                )
        else:
            check_interval("DataInf", "lam", self.lam, 0.0, None)
        if not isinstance(self.fisher_residual, bool):
            raise InputError(
                "The 'fisher_residual' parameter of DataInf must be a bool. Got"
                f" {self.fisher_residual!r}."
            )

    # ── prepare ───────────────────────────────────────────────────────────────────────
    def prepare(self, curvature: Curvature) -> DataInfState:
        t0 = time.perf_counter()
        space = curvature.objective.space
        blocks = module_blocks(space.names, space.sizes)
        n = curvature.n
        sq = torch.zeros(n, len(blocks), dtype=torch.float64)  # ‖gᵢₗ‖² per point and block
        s = 0
        for G in self._grads(curvature, "DataInf: gradient norms"):
            for j, b in enumerate(blocks):
                sq[s : s + len(G), j] = (G[:, b.index] ** 2).sum(1)
            s += len(G)
        mean_sq = sq.mean(0)
        diag = curvature.diagonal.to(torch.float64)
        lam = torch.empty(curvature.p, dtype=torch.float64)
        sources = []
        for j, b in enumerate(blocks):
            d_l = int(lam[b.index].numel())
            rule = DATAINF_RULE * float(mean_sq[j]) / d_l
            if isinstance(self.lam, str) and self.lam == "datainf":
                lam[b.index] = rule
                sources.append("datainf rule 0.1·mean‖g‖²/d")
            elif isinstance(self.lam, str):
                d = diag[b.index]
                if float(d.min()) > 0:
                    lam[b.index] = d
                    sources.append("l2 + damping")
                else:
                    lam[b.index] = d + rule
                    sources.append("l2 + damping + datainf rule 0.1·mean‖g‖²/d")
            else:
                lam[b.index] = float(self.lam)
                sources.append("lam")
        lam_min = torch.stack([lam[b.index].min() for b in blocks])
        if bool((lam_min <= 0).any()):
            bad = [b.name or "<root>" for b, m in zip(blocks, lam_min) if float(m) <= 0]
            raise NotPositiveDefiniteError(
                f"DataInf's damping Λ is 0 on block(s) {bad}: every per-sample gradient there is 0"
                " and there is no l2 or damping. Pass damping > 0 (e.g. Influence(...,"
                " damping=1e-3)) or DataInf(lam=…).",
                min_eigenvalue=0.0,
                suggested_damping=1e-3,
            )
        e = sq / lam_min[None, :]
        bound = (e**2 / (1 + e)).mean(0)
        stats: dict[str, Any] = {
            "approximates": self.approximates,
            "curvature_approximated": APPROXIMATES,
            "blocks": tuple(
                f"{b.name or '<root>'} ({', '.join(b.params)}; {len(lam[b.index])})" for b in blocks
            ),
            "lambda": tuple(float(m) for m in lam_min),
            "lambda_source": tuple(sources),
            "mean_sq_grad_norm": tuple(float(m) for m in mean_sq),
            "max_grad_sq_over_lambda": tuple(float(m) for m in e.max(0).values) if n else (),
            "swap_error_bound": tuple(float(x) for x in bound),
            "residual_against": (
                f"the exact {curvature.describes} (one full-data product per solve)"
            ),
            "prepare_seconds": time.perf_counter() - t0,
        }
        return DataInfState(curvature, blocks, lam, stats)

    @staticmethod
    def _grads(curv: Curvature, desc: str) -> Iterator[torch.Tensor]:
        """The per-sample gradients ∇θL(zᵢ, θ̂) in memory-bounded chunks (b, p), float64, with a
        progress bar."""
        chunks = -(
            -curv.n // grad_chunk_size(curv.objective.p, curv.batch_size, curv.objective.dtype)
        )
        it = iter_per_sample_grads(curv.objective, curv.params, curv.data, curv.batch_size)
        for _, G in progress(it, desc=desc, total=chunks):
            yield G.to(torch.float64)

    # ── solve ─────────────────────────────────────────────────────────────────────────
    def solve(self, state: DataInfState, rhs: torch.Tensor) -> Solution:
        t0 = time.perf_counter()
        curv = state.curvature
        V = rhs.reshape(-1, curv.p).to(torch.float64)
        inv = 1.0 / state.lam
        acc = torch.zeros_like(V)
        for G in self._grads(curv, "DataInf: solve"):
            W = G * inv  # Λ⁻¹gᵢ
            for b in state.blocks:
                Wb = W[:, b.index]
                denom = 1.0 + (G[:, b.index] * Wb).sum(1)  # 1 + gᵢₗᵀΛ⁻¹gᵢₗ
                acc[:, b.index] += ((V[:, b.index] @ Wb.T) / denom) @ Wb
        X = V * inv - acc / curv.n
        check_finite(
            X, "The DataInf solution", "Check the per-sample gradients at θ̂, or add damping."
        )
        stats = dict(state.stats)
        if self.fisher_residual:
            FX = X * state.lam
            for G in self._grads(curv, "DataInf: Fisher residual"):
                for b in state.blocks:
                    Gb = G[:, b.index]
                    FX[:, b.index] += (X[:, b.index] @ Gb.T) @ Gb / curv.n
            stats["fisher_residual_max"] = float(relative_residual(FX, V).max()) if len(V) else 0.0
        return one_shot_solution(curv, X, V, rhs.dtype, t0, stats, sample=self.residual_sample)
