"""Arnoldi: a low-rank inverse of H + δI on its top eigenspace — Schioppa et al. (2022).

Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up Influence Functions", AAAI 2022: run m
steps of the Arnoldi iteration on the Hessian, keep the r dominant Ritz pairs (λᵢ, uᵢ) and
compute influence in the span of u₁, …, u_r, where the inverse is just diag(1/λᵢ):

    (H + δI)⁻¹v  ≈  U_r Λ_r⁻¹ U_rᵀ v  =  Σᵢ₌₁ʳ (uᵢᵀv / λᵢ) uᵢ.

Once the r pairs are known every solve is two thin matrix products, so influence over many
test and training points costs no more HVPs after ``prepare``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._checks import check_choice, check_finite, check_interval
from ..core.curvature import Curvature
from ..errors import IndefiniteCurvatureWarning, NotPositiveDefiniteError
from .base import InverseHVPSolver, Solution, gauss_newton_hint, non_numerical, relative_residual
from .direct import suggest_damping
from .krylov import krylov_decomposition


@dataclass(frozen=True)
class ArnoldiState:
    """What ``Arnoldi.prepare`` computed; passed back to ``Arnoldi.solve``.

    Attributes:
        U: the kept Ritz vectors u₁, …, u_r of H + δI, shape (r, p), orthonormal rows, float64.
        AU: (H + δI)uᵢ, shape (r, p): the recorded HVPs combined by linearity (no new product).
        eigenvalues: the kept Ritz values λ₁, …, λ_r (damping included), by decreasing |λ|.
        ritz_values: all m Ritz values, ascending (the kept ones and the oversampled rest).
        ritz_residuals: ‖(H + δI)uᵢ − λᵢuᵢ‖ of the kept pairs, shape (r,); an eigenvalue of
            H + δI lies within it of λᵢ.
        stats: the numbers every ``Solution.stats`` of this fit carries.
    """

    U: torch.Tensor
    AU: torch.Tensor
    eigenvalues: torch.Tensor
    ritz_values: torch.Tensor
    ritz_residuals: torch.Tensor
    stats: dict[str, Any]


@dataclass(frozen=True)
class Arnoldi(InverseHVPSolver[ArnoldiState]):
    """Low-rank inverse on the top-r eigenspace of H + δI — Schioppa et al. (2022), AAAI.

    **What it approximates** (``approximates = "hessian-lowrank"``): the exact Hessian
    H = ∇²R(θ̂) (not a Gauss–Newton or Fisher matrix) plus damping δ, restricted to its r
    eigendirections of largest |λ|. With u₁, …, u_r those eigenvectors, U_r = [u₁ … u_r] and
    P = U_rU_rᵀ the projector onto their span,

        x = U_r Λ_r⁻¹ U_rᵀ v = Σᵢ₌₁ʳ (uᵢᵀv / λᵢ) uᵢ = (H + δI)⁻¹ P v,

    the exact inverse applied to the part of v in the top eigenspace; the rest, (I − P)v, is
    dropped — influence is computed in that subspace, as in Schioppa et al. It is exact for
    r = p. For r < p it ignores the low-curvature directions, where (H + δI)⁻¹ is largest, so
    influence magnitudes tend to shrink even where rankings agree (self-influence always does:
    vᵀ(H + δI)⁻¹Pv = Σᵢ₌₁ʳ (uᵢᵀv)²/λᵢ is a partial sum of vᵀ(H + δI)⁻¹v).

    **Algorithm.** ``prepare`` runs m = min(rank + oversampling, p) Arnoldi steps (one
    full-data HVP each, ``krylov_decomposition``) from a random start vector, with full
    reorthogonalisation. H + δI is symmetric, so this is the Lanczos process: the projected
    matrix T = QAQᵀ is tridiagonal, and its eigenpairs (θᵢ, sᵢ) give the Ritz pairs (θᵢ, Qᵀsᵢ).
    The r Ritz values of largest magnitude are kept: the dominant eigenpairs converge first,
    and the extra ``oversampling`` steps are what make the r-th one accurate. How many are
    needed depends on the gaps in the spectrum: with clustered eigenvalues a few extra steps
    leave the r-th pair inaccurate and its eigenvector mixed with its neighbours, which m = 2r
    resolves — hence the default ``oversampling = rank``. ``solve`` then
    costs O(k·r·p); memory is 2·m·p float64 numbers while preparing and 2·r·p after.

    **Residual.** (H + δI)x is computed exactly, by linearity, from the HVPs recorded in
    ``prepare`` (x lies in the span of U, and (H + δI)U is known), so the reported residual
    ‖(H + δI)x − v‖/‖v‖ is the true one without a new pass over the data — solves, and so
    ``self_influence``, stay cheap. For exact eigenpairs it equals ‖(I − P)v‖/‖v‖ = √(1 − f²),
    where f = ‖Pv‖/‖v‖ is the fraction of v in the span: it measures the dropped complement,
    not an error, and is below 1 by construction. ``default_max_residual`` is therefore 1.0:
    ``Influence(max_residual="auto")`` rejects only a solve worse than x = 0, which happens
    only if the Ritz pairs are wrong. The accuracy of the low-rank solve itself is
    ``stats["projected_residual_max"]`` = maxⱼ ‖(H + δI)xⱼ − Pvⱼ‖/‖vⱼ‖ (0 for exact eigenpairs).

    **Indefinite H.** A kept Ritz value ≤ 0 (or below 1e-12·max|θ|) would invert a
    negative-curvature (or null) direction: ``prepare`` raises ``NotPositiveDefiniteError``
    naming a damping that fixes it. Keeping the largest |λ| rather than the largest λ is what
    exposes large negative curvature. Every Ritz value is a Rayleigh quotient uᵀ(H + δI)u of a
    unit vector, so a negative one *seen* but not kept still proves H + δI indefinite — the
    assumption influence functions rest on fails, even if the projection itself is well defined:
    ``on_indefinite="raise"`` (default) raises ``NotPositiveDefiniteError`` with the damping that
    fixes it, ``"warn"`` warns (``IndefiniteCurvatureWarning``) and records ``lambda_ritz_min``.
    A negative eigenvalue whose Ritz value has not appeared yet goes undetected.

    Every ``Solution.stats`` (hence every result's ``provenance.solver_stats``) records
    ``approximates``, ``complement``, ``rank``, ``krylov_steps``, ``restarts``, the kept
    eigenvalue range ``lambda_kept_max`` / ``lambda_kept_min``, the smallest Ritz value
    ``lambda_ritz_min``, ``max_ritz_residual`` (maxᵢ ‖(H + δI)uᵢ − λᵢuᵢ‖/|λᵢ|), the fraction f
    per right-hand side (``span_fraction``) with its min and mean, and ``projected_residual_max``.

    Args:
        rank: r, the number of eigenpairs kept (capped at p; the rank used is ``stats["rank"]``).
        oversampling: Arnoldi steps beyond ``rank``; ``None`` means ``rank`` (m = 2r). The total
            is capped at p.
        seed: seeds the random start vector.
        on_indefinite: "raise" (default) or "warn" when a Ritz value below 0 shows H + δI is
            indefinite (see **Indefinite H**).

    Raises:
        InputError: an invalid setting, naming the parameter.
        NotPositiveDefiniteError: a kept eigenvalue of H + δI is ≤ 0 (numerically); the message
            names a damping that fixes it.

    Examples:
        >>> import torch
        >>> from upweight import Objective, Data
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).eval(), "squared", l2=1.0)
        >>> # H = diag(1.5, 1.5)
        >>> curv = Curvature(obj, Data.from_any((torch.eye(2), torch.zeros(2, 1))))
        >>> solver = Arnoldi(rank=2)
        >>> x = solver.solve(solver.prepare(curv), torch.tensor([[1.5, 3.0]])).value
        >>> [round(v, 6) for v in x[0].tolist()]
        [1.0, 2.0]
    """

    name = "arnoldi"
    approximates = "hessian-lowrank"
    #: a projection's residual is ‖(I − P)v‖/‖v‖ ≤ 1 by construction (see the class docstring)
    default_max_residual = 1.0
    rank: int = 64
    oversampling: int | None = None
    seed: int = 0
    on_indefinite: Literal["raise", "warn"] = non_numerical("raise")

    def __post_init__(self) -> None:
        check_interval("Arnoldi", "rank", self.rank, 1, None, closed="left", integer=True)
        check_choice("Arnoldi", "on_indefinite", self.on_indefinite, ("raise", "warn"))
        if self.oversampling is not None:
            check_interval(
                "Arnoldi", "oversampling", self.oversampling, 0, None, closed="left", integer=True
            )
        check_interval("Arnoldi", "seed", self.seed, 0, None, closed="left", integer=True)

    def prepare(self, curvature: Curvature) -> ArnoldiState:
        t0 = time.perf_counter()
        p = curvature.p
        rank = min(self.rank, p)
        steps = min(rank + (rank if self.oversampling is None else self.oversampling), p)
        kd = krylov_decomposition(
            curvature.matvec, p, steps=steps, dtype=curvature.dtype, seed=self.seed, desc="Arnoldi"
        )
        theta, S = torch.linalg.eigh(kd.T)  # ascending
        keep = torch.argsort(theta.abs(), descending=True, stable=True)[:rank]
        lam, Sr = theta[keep], S[:, keep]
        lam_abs_max = float(theta.abs().max())
        # a kept λ ≤ 0 — or so small relative to max|θ| that 1/λ is rounding noise — cannot be
        # inverted
        if float(lam.min()) <= 1e-12 * lam_abs_max:
            self._raise_not_pd(curvature, float(theta[0]), float(lam.min()), float(theta[-1]), rank)
        if float(theta[0]) < -1e-10 * lam_abs_max:  # a Rayleigh quotient < 0: H + δI is indefinite
            if self.on_indefinite == "raise":
                self._raise_not_pd(
                    curvature, float(theta[0]), float(lam.min()), float(theta[-1]), rank, kept=False
                )
            warnings.warn(
                f"Arnoldi saw a negative Ritz value {float(theta[0]):.3e}: H + δI"
                f" (damping={curvature.damping:g}) is indefinite, so θ̂ is not a minimum and"
                " influence is only defined on the kept top eigenspace. Add damping, or train"
                " closer to a minimum.",
                IndefiniteCurvatureWarning,
                stacklevel=3,
            )
        U = Sr.T @ kd.Q  # (r, p) Ritz vectors, orthonormal rows
        AU = Sr.T @ kd.AQ  # (H + δI)U by linearity of the recorded products
        resid = (AU - lam[:, None] * U).norm(dim=1)
        stats: dict[str, Any] = {
            "approximates": self.approximates,
            "complement": "dropped: x = U_r Λ_r⁻¹ U_rᵀ v, the inverse on the top-r eigenspace only",
            "rank": rank,
            "krylov_steps": steps,
            "restarts": kd.restarts,
            "lambda_kept_max": float(lam.max()),
            "lambda_kept_min": float(lam.min()),
            "lambda_ritz_min": float(theta[0]),
            "max_ritz_residual": float((resid / lam.abs()).max()),
            "prepare_seconds": time.perf_counter() - t0,
        }
        return ArnoldiState(
            U=U, AU=AU, eigenvalues=lam, ritz_values=theta, ritz_residuals=resid, stats=stats
        )

    def solve(self, state: ArnoldiState, rhs: torch.Tensor) -> Solution:
        t0 = time.perf_counter()
        p = state.U.shape[1]
        V = rhs.reshape(-1, p).to(torch.float64)
        C = V @ state.U.T  # (k, r): coordinates uᵢᵀvⱼ
        W = C / state.eigenvalues
        X = W @ state.U
        AX = W @ state.AU  # (H + δI)X, exactly, from the recorded HVPs
        check_finite(X, "The Arnoldi solution", "Add damping or check the model at θ̂.")
        vnorm = V.norm(dim=1)
        safe = vnorm.clamp_min(torch.finfo(V.dtype).tiny)
        projected = (AX - C @ state.U).norm(dim=1) / safe  # ‖(H + δI)x − Pv‖/‖v‖
        frac = torch.where(vnorm > 0, C.norm(dim=1) / safe, torch.ones_like(vnorm))  # ‖Pv‖/‖v‖
        k = len(V)
        stats = {
            **state.stats,
            "span_fraction": tuple(float(f) for f in frac),
            "span_fraction_min": float(frac.min()) if k else math.nan,
            "span_fraction_mean": float(frac.mean()) if k else math.nan,
            "projected_residual_max": float(projected.max()) if k else 0.0,
        }
        return Solution(
            value=X.to(rhs.dtype),
            residual=relative_residual(AX, V),
            converged=torch.ones(k, dtype=torch.bool),
            iterations=0,
            seconds=time.perf_counter() - t0,
            stats=stats,
        )

    def accuracy_advice(self, state: ArnoldiState | None = None) -> str:
        return (
            "A residual above 1 means the kept Ritz pairs are wrong (see solver_max_ritz_residual):"
            " raise Arnoldi's oversampling, or add damping."
        )

    @staticmethod
    def _raise_not_pd(
        curv: Curvature,
        ritz_min: float,
        kept_min: float,
        ritz_max: float,
        rank: int,
        kept: bool = True,
    ) -> None:
        lmin = min(ritz_min, kept_min)
        fix = suggest_damping(min(lmin, 0.0), curv.damping, ritz_max)
        where = (
            f"on its top-{rank} eigenspace: Arnoldi keeps an eigenvalue {kept_min:.3e}"
            if kept
            else (
                f"Arnoldi saw the Ritz value {ritz_min:.3e} (a Rayleigh quotient, so a negative"
                " eigenvalue exists)"
            )
        )
        raise NotPositiveDefiniteError(
            f"The Hessian (damping={curv.damping:g}) is not positive definite {where} (Ritz values"
            f" from {ritz_min:.3e} to {ritz_max:.3e}). Arnoldi(on_indefinite='warn') accepts it."
            f" Pass damping ≥ {fix:.2g} (e.g. Influence(..., damping={fix:.2g})), or train the"
            " model closer to a minimum." + gauss_newton_hint(curv),
            min_eigenvalue=lmin,
            suggested_damping=fix,
        )
