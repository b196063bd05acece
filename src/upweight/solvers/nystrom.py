"""Nyström: a randomized low-rank sketch of the curvature, inverted in closed form, as a solver
(sketch-and-solve) and as a preconditioner for ``CG`` — Frangella, Tropp & Udell (2023).

Frangella, Tropp & Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 44(2),
2023. With a Gaussian test matrix Ω (p × r, orthonormalised) and Y = AΩ (r HVPs, one block), the
Nyström approximation of a positive semi-definite A is

    A⟨Ω⟩ = Y (ΩᵀY)⁺ Yᵀ = U Λ̂ Uᵀ,     0 ⪯ A⟨Ω⟩ ⪯ A,

and the regularised system (A + μI)x = v is solved with the Woodbury form

    x = U (Λ̂ + μI)⁻¹ Uᵀ v + (v − U Uᵀ v) / μ.

Koh & Liang (2017) §3 need (H + δI)⁻¹v with H = ∇²R(θ̂); here H + δI = A + μI with μ the
smallest diagonal entry of the L2 term plus damping (see ``Nystrom``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_finite, check_interval
from .._progress import progress_bar
from ..core.curvature import Curvature
from ..errors import InputError, NotPositiveDefiniteError
from .base import OneShotSolver, Solution, one_shot_solution
from .direct import suggest_damping

SKETCHED = (
    "A = H + δI − μI with μ = min over coordinates of (l2 + δ): the loss Hessian plus any L2"
    " above μ"
)


@dataclass(frozen=True)
class NystromState:
    """What ``Nystrom.prepare`` (or ``prepare_preconditioner``) computed.

    Attributes:
        curvature: the operator H + δI the residuals are measured against.
        U: the eigenvectors of the Nyström approximation Â = U Λ̂ Uᵀ of A, shape (r, p), orthonormal
            rows, float64.
        eigenvalues: Λ̂, shape (r,), descending, ≥ 0 (float64).
        mu: μ, the shift with H + δI = A + μI (the smallest diagonal entry l2 + δ).
        omega: the orthonormalised Gaussian test matrix, as rows (r, p), in the curvature's dtype:
            the Ω actually multiplied (orthonormal up to that dtype's rounding), with Â =
            (AΩ)(ΩᵀAΩ)⁺(AΩ)ᵀ (up to the stabilising shift ν, see ``Nystrom``).
        stats: the numbers every ``Solution.stats`` of this fit carries.
    """

    curvature: Curvature
    U: torch.Tensor
    eigenvalues: torch.Tensor
    mu: float
    omega: torch.Tensor
    stats: dict[str, Any]


@dataclass(frozen=True)
class Nystrom(OneShotSolver[NystromState]):
    """Randomized Nyström sketch-and-solve — Frangella, Tropp & Udell (2023), SIAM J. Matrix Anal.
    Appl.

    **What is sketched.** H + δI = A + μI, where μ = min over coordinates of the curvature's
    diagonal (l2 + δ; ``Curvature.diagonal``) and A = H + δI − μI = ∇²(1/n)ΣL + (l2 + δ − μ) is
    the loss Hessian plus whatever L2 exceeds μ (nothing, unless ``l2_exclude`` leaves some
    parameters unpenalised; then μ = δ and the L2 term of the penalised ones is part of A).
    A is what a convex loss makes positive semi-definite, the precondition of the Nyström
    approximation, and μ is the largest shift that keeps it so. The damping is therefore never
    sketched: it enters exactly, in the closed-form inverse.

    **Algorithm** (Frangella et al.'s randomized Nyström approximation). ``prepare`` draws Ω ∈
    ℝ^{p×r} Gaussian (``seed``), orthonormalises it (QR), and computes Y = AΩ = (H + δI)Ω − μΩ with
    r HVPs in blocks of ``block_size`` (one ``Curvature.matvec`` pass per block). With the
    stabilising shift ν = √p · eps · ‖Y‖₂ (eps of the curvature's dtype), Y_ν = Y + νΩ, the Cholesky
    factor ΩᵀY_ν = LLᵀ (an eigendecomposition with a pseudo-inverse if that fails), B = Y_νL⁻ᵀ and
    its thin SVD B = U Σ Wᵀ give Â = U max(Σ² − ν, 0) Uᵀ, the Nyström approximation A⟨Ω⟩ up to O(ν).
    0 ⪯ Â ⪯ A, and Â = A exactly when r = p. Besides the HVPs' own workspace, the sketch holds Ω (r
    × p, the curvature's dtype, kept in the state) and one float64 r × p array, updated in place
    from AΩ to Y_ν, to Qᵀ of a row-blocked thin QR Y_ν = QR, and to U; the factorisations act on r ×
    r matrices (B's SVD is that of L⁻¹Rᵀ). Then every solve is

        x = (Â + μI)⁻¹v = U (Λ̂ + μI)⁻¹ Uᵀ v + (v − U Uᵀ v)/μ,

    O(k·r·p) plus one full-data HVP for the residual. All r sketched directions are kept: a
    larger sketch truncated to r would only lower Â further below A (Â_trunc ⪯ Â ⪯ A), so no
    oversampling setting.

    **Accuracy.** (A + μI)x − v = (A − Â)(Â + μI)⁻¹v: the error lives in the part of A the
    sketch misses, ‖A − Â‖ ≈ λ_{r+1}(A) for a spectrum that decays (Frangella et al. bound its
    expectation by the spectral tail), amplified by up to 1/μ. Sketch-and-solve is
    therefore accurate only where λ_{r+1}(A) ≪ μ; ``stats["lambda_hat_min_over_mu"]`` (λ̂_r/μ)
    says how far the sketched spectrum still is from that. With a small L2 term (λ̂_r/μ ≳ 1) the
    residual is typically of order 1 and the rankings only roughly agree with exact influence
    (bench/RESULTS.md); unlike ``Arnoldi``, which drops the complement, it keeps that part of v
    scaled by 1/μ. The residual is the approximation's, not a convergence failure, and is not
    bounded by 1;
    ``default_max_residual`` is 10, like ``KFAC``: ``Influence(max_residual="auto")`` rejects
    only a sketch off by an order of magnitude. For exact answers use the sketch as a
    preconditioner, ``CG(preconditioner=Nystrom(rank))``, Frangella et al.'s Nyström PCG:
    P⁻¹ = (λ̂_r + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ), which leaves the answer exact to ``rtol`` and
    cuts the iterations where the sketch captures the top of the spectrum.

    **Indefinite H.** Â is positive semi-definite by construction, so negative curvature would
    be hidden silently. ``prepare`` checks the core ΩᵀAΩ (a compression of A, whose eigenvalues
    interlace A's): a clearly negative eigenvalue raises ``NotPositiveDefiniteError``. If even
    μ + that eigenvalue ≤ 0, H + δI is not positive definite (it is a Rayleigh quotient of
    H + δI) and the message names a damping that fixes it (for ``CG``/``Direct``); in either case
    Nyström itself does not apply, since damping does not change A. Negative curvature outside
    span(Ω) goes undetected.

    Every ``Solution.stats`` records ``approximates``, ``sketched``, ``rank``, ``mu``, the
    stabilising shift ``nu``, ``lambda_hat_max`` / ``lambda_hat_min``,
    ``lambda_hat_min_over_mu``, ``core_min_eigenvalue``, ``core_factorisation`` and
    ``hvp_passes``.

    Args:
        rank: r, the sketch size (capped at p; the rank used is ``stats["rank"]``).
        seed: seeds the Gaussian test matrix.
        block_size: HVPs per ``Curvature.matvec`` call while sketching.
        residual_sample: right-hand sides per solve whose true residual is measured (keyword only;
            default 16; 0 = unchecked) — see ``OneShotSolver``.

    Raises:
        InputError: an invalid setting, naming the parameter; or, for the solver (not the
            preconditioner), μ = 0 (no L2 on some coordinate and ``damping=0``).
        NotPositiveDefiniteError: the sketch shows negative curvature of A (see above).

    Examples:
        >>> import torch
        >>> from upweight import Objective, Data
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).eval(), "squared", l2=1.0)
        >>> # H = diag(1.5, 1.5)
        >>> curv = Curvature(obj, Data.from_any((torch.eye(2), torch.zeros(2, 1))))
        >>> solver = Nystrom(rank=2)
        >>> x = solver.solve(solver.prepare(curv), torch.tensor([[1.5, 3.0]])).value
        >>> [round(v, 6) for v in x[0].tolist()]
        [1.0, 2.0]
    """

    name = "nystrom"
    approximates = "hessian-nystrom"
    #: the residual measures the sketch's missing tail amplified by 1/μ and can exceed 1 (see above)
    default_max_residual = 10.0
    rank: int = 64
    seed: int = 0
    block_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval("Nystrom", "rank", self.rank, 1, None, closed="left", integer=True)
        check_interval("Nystrom", "seed", self.seed, 0, None, closed="left", integer=True)
        check_interval(
            "Nystrom", "block_size", self.block_size, 1, None, closed="left", integer=True
        )

    # ── prepare ───────────────────────────────────────────────────────────────────────
    def prepare(self, curvature: Curvature) -> NystromState:
        mu = float(curvature.diagonal.min()) if curvature.p else 0.0
        if not mu > 0:
            raise InputError(
                "Nystrom sketch-and-solve needs l2 + damping > 0 on every parameter: it inverts"
                f" the part of H outside the sketch as 1/μ, and μ = min(l2 + damping) = {mu:g} here"
                f" (damping={curvature.damping:g}). Pass damping > 0 (e.g. Influence(...,"
                " damping=1e-3)), an l2 term that covers every parameter, or use"
                " CG(preconditioner=Nystrom(...)), which solves exactly."
            )
        return self._sketch(curvature, mu)

    def prepare_preconditioner(self, curvature: Curvature) -> NystromState:
        """The sketch, for ``CG(preconditioner=Nystrom(...))``; μ = 0 is allowed here (the
        directions with λ̂ ≈ 0 are then dropped from U, and P⁻¹ stays positive definite)."""
        mu = float(curvature.diagonal.min()) if curvature.p else 0.0
        state = self._sketch(curvature, mu)
        if mu <= 0:
            lam = state.eigenvalues
            keep = lam > 1e-12 * float(lam.max()) if lam.numel() else lam > 0
            state = NystromState(
                curvature,
                state.U[keep],
                lam[keep],
                mu,
                state.omega,
                {**state.stats, "rank_kept": int(keep.sum())},
            )
        return state

    def _sketch(self, curvature: Curvature, mu: float) -> NystromState:
        """Frangella et al.'s randomized Nyström approximation, with at most ~2 p × r arrays alive:
        Ω (rows, in the operator's dtype) and one float64 (r, p) buffer that holds AΩ, then Y_ν,
        then Qᵀ of the thin QR Y_νᵀ = QR, and finally U — every step on it is in place, and the
        factorisations (Cholesky, SVD) act on r × r matrices only."""
        t0 = time.perf_counter()
        p = curvature.p
        r = min(self.rank, p)
        f64 = torch.float64
        gen = torch.Generator().manual_seed(self.seed)
        gauss = torch.randn(p, r, generator=gen, dtype=f64)
        _orthonormalise_columns(gauss)  # Ω = qr(G) (in place)
        # rows ω₁, …, ω_r: the Ω actually multiplied
        omega = torch.empty(r, p, dtype=curvature.dtype).copy_(gauss.T)
        del gauss
        passes = 0
        # allocated after the first product: the HVPs' own workspace comes first
        Y: torch.Tensor | None = None
        with progress_bar(
            desc=f"Nyström sketch (rank {r})", total=-(-r // self.block_size), unit="pass"
        ) as bar:
            for s in range(0, r, self.block_size):
                block = curvature.matvec(omega[s : s + self.block_size])
                if Y is None:
                    Y = torch.empty(r, p, dtype=f64)
                Y[s : s + self.block_size].copy_(block)
                del block
                passes += 1
                bar.update(1)
        assert Y is not None
        Y.add_(omega, alpha=-mu)  # rows A ωⱼ = (H + δI)ωⱼ − μωⱼ
        check_finite(Y, "The Nyström sketch AΩ", "Check the model and loss for overflow at θ̂.")
        # ΩᵀAΩ compresses A: a clearly negative eigenvalue proves A (hence the loss Hessian)
        # indefinite
        core = _cross(omega, Y)
        core = 0.5 * (core + core.T)
        theta = torch.linalg.eigvalsh(core)
        eps = torch.finfo(curvature.dtype).eps
        top = float(theta.abs().max()) if theta.numel() else 0.0
        if theta.numel() and float(theta[0]) < -100 * eps * max(top, 1e-300) * math.sqrt(r):
            self._raise_indefinite(curvature, mu, float(theta[0]), float(theta[-1]))
        # ‖Y‖₂ = √λ_max(YYᵀ), from the r × r Gram matrix (no SVD of the (r, p) sketch)
        ynorm = math.sqrt(max(float(torch.linalg.eigvalsh(Y @ Y.T)[-1]), 0.0)) if Y.numel() else 0.0
        nu = math.sqrt(p) * eps * ynorm
        Y.add_(omega, alpha=nu)  # Y_ν = Y + νΩ (in place: Y itself is not needed again)
        core_nu = _cross(omega, Y)
        core_nu = 0.5 * (core_nu + core_nu.T)
        # the p × r matrix Y_ν (= Y.T here) = QR, a thin QR in place (Y now holds Qᵀ); then B = Y_ν
        # L⁻ᵀ = Q Mᵀ with the r × r M = L⁻¹Rᵀ = W Σ Vᵀ, so B = (QV) Σ Wᵀ: B's singular values are
        # M's, and U = (QV)ᵀ = VᵀQᵀ
        R = _orthonormalise_columns(Y.T)
        L, info = torch.linalg.cholesky_ex(core_nu)
        if int(info) == 0:
            M = torch.linalg.solve_triangular(L, R.T, upper=False)  # L⁻¹Rᵀ
            how = "cholesky"
        else:  # rank-deficient core beyond the shift: pseudo-inverse square root (the same A⟨Ω⟩)
            w, W = torch.linalg.eigh(core_nu)
            keep = w > r * torch.finfo(f64).eps * max(float(w.abs().max()), 1e-300)
            M = (W[:, keep] / w[keep].sqrt()).T @ R.T
            how = "eigh-pseudo-inverse"
        # M = W Σ Vᵀ → BBᵀ = U Σ² Uᵀ with U = Vᵀ Qᵀ
        _, sig, Vh = torch.linalg.svd(M, full_matrices=False)
        U = _left_multiply_(Vh, Y)
        del Y
        lam = (sig**2 - nu).clamp_min(0.0)
        lam_min = float(lam.min()) if lam.numel() else 0.0
        stats: dict[str, Any] = {
            "approximates": self.approximates,
            "sketched": SKETCHED,
            "rank": r,
            "mu": mu,
            "nu": nu,
            "lambda_hat_max": float(lam.max()) if lam.numel() else 0.0,
            "lambda_hat_min": lam_min,
            "lambda_hat_min_over_mu": lam_min / mu if mu > 0 else math.inf,
            "core_min_eigenvalue": float(theta[0]) if theta.numel() else 0.0,
            "core_factorisation": how,
            "hvp_passes": passes,
            "residual_against": (
                f"the exact {curvature.describes} (one full-data product per solve)"
            ),
            "prepare_seconds": time.perf_counter() - t0,
        }
        return NystromState(curvature, U, lam, mu, omega, stats)

    # ── apply ─────────────────────────────────────────────────────────────────────────
    def solve(self, state: NystromState, rhs: torch.Tensor) -> Solution:
        t0 = time.perf_counter()
        curv = state.curvature
        V = rhs.reshape(-1, curv.p).to(torch.float64)
        C = V @ state.U.T  # (k, r): uᵢᵀvⱼ
        X = (C / (state.eigenvalues + state.mu)) @ state.U + (V - C @ state.U) / state.mu
        check_finite(X, "The Nyström solution", "Add damping or check the model at θ̂.")
        return one_shot_solution(
            curv, X, V, rhs.dtype, t0, state.stats, sample=self.residual_sample
        )

    def precondition(self, state: NystromState, R: torch.Tensor) -> torch.Tensor:
        """P⁻¹R with P⁻¹ = (λ̂_r + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ) (Frangella et al.), R (k, p):
        symmetric positive definite, and (λ̂_r + μ)(Â + μI)⁻¹ on span(U)."""
        V = R.reshape(-1, state.U.shape[1]).to(torch.float64)
        if state.eigenvalues.numel() == 0:
            return V.to(R.dtype)
        C = V @ state.U.T
        scale = float(state.eigenvalues[-1]) + state.mu
        X = (scale * C / (state.eigenvalues + state.mu)) @ state.U + V - C @ state.U
        return X.to(R.dtype)

    @staticmethod
    def _raise_indefinite(curv: Curvature, mu: float, core_min: float, core_max: float) -> None:
        # ωᵀ(H + δI)ω for the unit vector ω = Ω w of the core's smallest eigenpair
        rayleigh = mu + core_min
        if rayleigh <= 0:
            fix = suggest_damping(rayleigh, curv.damping, mu + core_max)
            head = (
                f"The Hessian (damping={curv.damping:g}) is not positive definite: on the Nyström"
                f" sketch it has the Rayleigh quotient {rayleigh:.3e} ≤ 0. Pass damping ≥ {fix:.2g}"
                f" (e.g. Influence(..., damping={fix:.2g})) with CG() or Direct()."
            )
        else:
            fix = curv.damping
            head = (
                f"The Hessian minus its L2/damping shift μ = {mu:g} has negative curvature: ΩᵀAΩ"
                f" has the eigenvalue {core_min:.3e} (H + δI has the Rayleigh quotient"
                f" {rayleigh:.3e} > 0 there, so it may still be positive definite)."
            )
        raise NotPositiveDefiniteError(
            head
            + " Nystrom sketches A = H + δI − μI, which must be positive semi-definite (a convex"
            " loss at a minimum); damping does not change A, so use CG() or Direct() for this"
            " model.",
            min_eigenvalue=rayleigh,
            suggested_damping=fix,
        )


# ── in-place helpers: O(chunk · r) workspace on top of the (r, p) / (p, r) arrays ─────────────────
_CHUNK_ELEMENTS = 1 << 22  # entries per row block (32 MiB of float64)


def _row_blocks(p: int, r: int) -> list[tuple[int, int]]:
    """Split range(p) into contiguous blocks of at least max(r, 1) rows (p ≥ r) of about
    _CHUNK_ELEMENTS / r rows."""
    n = max(1, p // max(r, _CHUNK_ELEMENTS // max(r, 1), 1))
    return [(p * i // n, p * (i + 1) // n) for i in range(n)]


def _orthonormalise_columns(M: torch.Tensor) -> torch.Tensor:
    """Thin QR M = QR of a (p, r) float64 matrix with p ≥ r, overwriting M with Q; returns R (r, r).

    TSQR (tall-skinny QR): a Householder QR of each row block Mᵢ = QᵢRᵢ, then one of the stacked
    Rᵢ = Q̃R; Q's block i is Qᵢ Q̃ᵢ. Backward stable like one Householder QR of M, but with
    row-block workspace only. ``M`` may be a view (e.g. the transpose of an (r, p) array)."""
    p, r = M.shape
    blocks = _row_blocks(p, r)
    if len(blocks) == 1:
        Q, R = torch.linalg.qr(M)
        M.copy_(Q)
        return R
    Rs = []
    for a, b in blocks:
        Qi, Ri = torch.linalg.qr(M[a:b])
        M[a:b].copy_(Qi)
        Rs.append(Ri)
        del Qi
    Q2, R = torch.linalg.qr(torch.cat(Rs))
    for i, (a, b) in enumerate(blocks):
        M[a:b].copy_(M[a:b] @ Q2[i * r : (i + 1) * r])
    return R


def _cross(omega: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """ΩᵀY as the r × r float64 matrix omega @ Yᵀ (rows (r, p)), converting omega column block by
    block."""
    if omega.dtype == Y.dtype:
        return omega @ Y.T
    out = torch.zeros(omega.shape[0], Y.shape[0], dtype=Y.dtype)
    for a, b in _row_blocks(omega.shape[1], omega.shape[0]):
        out += omega[:, a:b].to(Y.dtype) @ Y[:, a:b].T
    return out


def _left_multiply_(S: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """S @ Y for S (k, r), k ≤ r, and Y (r, p), written over Y column block by column block; returns
    the (k, p) result (Y's storage itself when k = r)."""
    k = S.shape[0]
    for a, b in _row_blocks(Y.shape[1], Y.shape[0]):
        Y[:k, a:b] = S @ Y[:, a:b]
    return Y if k == Y.shape[0] else Y[:k].clone()
