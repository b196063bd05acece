"""Krylov subspaces of a symmetric operator: Lanczos with full reorthogonalisation.

One recurrence serves both the spectrum estimates (``spectrum.lanczos``) and the low-rank
``Arnoldi`` solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .._checks import check_finite, check_interval
from .._progress import progress_bar


@dataclass(frozen=True)
class KrylovDecomposition:
    """m steps of Arnoldi on a symmetric operator A.

    Attributes:
        Q: the orthonormal Krylov basis, shape (m, p) (rows q₁, …, q_m), float64.
        AQ: the products A qⱼ exactly as the operator returned them, (m, p) float64; by
            linearity A(Qᵀy) = AQᵀy for any y, with no further product.
        T: the projected matrix Q A Qᵀ, (m, m) float64, symmetric (tridiagonal up to rounding).
        restarts: how often the Krylov space became invariant before m steps and was restarted
            with a fresh random vector orthogonal to the basis so far.
    """

    Q: torch.Tensor
    AQ: torch.Tensor
    T: torch.Tensor
    restarts: int


def krylov_decomposition(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    p: int,
    *,
    steps: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    desc: str = "Krylov",
) -> KrylovDecomposition:
    """``steps`` Arnoldi steps with full reorthogonalisation on a symmetric operator A of size p.

    Each new vector w = A qⱼ is orthogonalised against *all* previous basis vectors by
    classical Gram–Schmidt applied twice ("twice is enough"); the coefficients are column j of
    the Hessenberg matrix. For symmetric A it is tridiagonal in exact arithmetic — this is the
    Lanczos process with full reorthogonalisation. Its upper triangle holds every computed
    qᵢᵀAqⱼ (i ≤ j), so T = QAQᵀ is taken as that triangle mirrored: the exact Rayleigh quotient
    even where the iteration restarted. If the Krylov space becomes invariant (β ≈ 0: e.g. A
    has fewer distinct eigenvalues than steps, or the start vector misses an eigenspace) the
    iteration restarts from a random vector orthogonal to the basis, so ``steps = p`` always
    yields a full orthonormal basis, and T then has the eigenvalues of A up to rounding.

    The products are kept (``AQ``): with them A can be applied to anything in the span of Q
    without another pass over the data, to the precision of the operator (a float32 operator
    receives, and is exact for, the float32-rounded qⱼ).

    Args:
        matvec: v ↦ Av for v of shape (p,) (e.g. ``Curvature.matvec``).
        p: dimension of A.
        steps: number of steps = products with A; at most p.
        dtype: dtype of the vectors handed to ``matvec``; the recurrence runs in float64.
        seed: seeds the random start (and restart) vectors.
        desc: the label of its progress bar (one update per step, with the current range of Ritz
            values).

    Returns:
        A ``KrylovDecomposition``.

    Raises:
        InputError: steps not in [1, p].
        NonFiniteError: A returned NaN or inf.
    """
    check_interval("krylov_decomposition", "p", p, 1, None, closed="left", integer=True)
    check_interval("krylov_decomposition", "steps", steps, 1, p, closed="both", integer=True)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.zeros(steps, p, dtype=torch.float64)
    AQ = torch.zeros(steps, p, dtype=torch.float64)
    Hc = torch.zeros(steps, steps, dtype=torch.float64)  # Gram–Schmidt coefficients qᵢᵀAqⱼ, i ≤ j
    q = torch.randn(p, generator=gen, dtype=torch.float64)
    q /= q.norm()
    restarts, scale = 0, 0.0
    with progress_bar(desc=desc, total=steps) as bar:
        for j in range(steps):
            Q[j] = q
            w = matvec(q.to(dtype)).reshape(p).to(torch.float64)
            check_finite(
                w,
                "A Hessian-vector product in a Krylov iteration",
                "Check the model and loss for overflow at θ̂.",
            )
            AQ[j] = w
            basis = Q[: j + 1]
            h = torch.zeros(j + 1, dtype=torch.float64)
            for _ in range(2):
                c = basis @ w
                w = w - basis.T @ c
                h += c
            Hc[: j + 1, j] = h
            beta = float(w.norm())
            scale = max(scale, float(h.abs().max()), beta)
            bar.update(1, ritz=partial(_ritz_range, Hc, j + 1))
            if j + 1 == steps:
                break
            if beta > 1e-10 * max(scale, 1e-300):
                q = w / beta
                continue
            # invariant subspace: continue from a random direction orthogonal to it
            restarts += 1
            q = _fresh_direction(Q[: j + 1], gen)
    T = torch.triu(Hc) + torch.triu(Hc, 1).T
    return KrylovDecomposition(Q=Q, AQ=AQ, T=T, restarts=restarts)


def _fresh_direction(basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random unit vector orthogonal to the rows of ``basis`` (fewer rows than columns)."""
    while True:
        q = torch.randn(basis.shape[1], generator=gen, dtype=torch.float64)
        for _ in range(2):
            q = q - basis.T @ (basis @ q)
        norm = float(q.norm())
        if norm > 1e-8:
            return q / norm


def _ritz_range(Hc: torch.Tensor, m: int) -> str:
    """ "[θ_min, θ_max]" of the Ritz values after m steps, from the coefficients' upper triangle
    (for the progress bar)."""
    Hm = Hc[:m, :m]
    theta = torch.linalg.eigvalsh(torch.triu(Hm) + torch.triu(Hm, 1).T)
    return f"[{float(theta[0]):.3g}, {float(theta[-1]):.3g}]"
