"""Spectrum estimates of H + δI by Lanczos, and a LiSSA configured from them.

The extreme eigenvalues decide everything an inverse-HVP solver needs to know in advance:
whether H + δI is positive definite at all (λmin > 0; if not, how much damping makes it so),
how fast CG converges (≈ √κ iterations, κ = λmax/λmin) and, for LiSSA, which scale keeps the
Neumann series convergent (s > λmax/2) and how deep it must go ((1 − λmin/s)ᵗ must be small).

Lanczos builds an orthonormal basis Qₖ of the Krylov space span{v, Av, …, Aᵏ⁻¹v} and the
tridiagonal Tₖ = QₖᵀAQₖ; the eigenvalues of Tₖ (Ritz values) approximate those of A, the
extreme ones first and fast — after a few dozen products with A they are usually accurate to a
few per cent, which no power iteration of the same cost matches at the lower end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_interval
from ..core.curvature import Curvature
from ..errors import InputError, NotPositiveDefiniteError
from .base import gauss_newton_hint
from .direct import suggest_damping
from .krylov import krylov_decomposition
from .lissa import LiSSA, minibatch_lambda_max


@dataclass(frozen=True)
class Spectrum:
    """Lanczos estimates of the extreme eigenvalues of a symmetric operator A (here H + δI).

    Ritz values always lie inside [λmin(A), λmax(A)], so ``lambda_max`` can only under-estimate
    the true largest eigenvalue and ``lambda_min`` can only over-estimate the true smallest one;
    the extreme Ritz values converge first, typically to a few per cent in a few dozen steps. An
    eigenvalue of A lies within the corresponding ``residual_*`` of each estimate (‖Ay − θy‖ for its
    Ritz pair).

    Attributes:
        ritz_values: all Ritz values, ascending (eigenvalues of the tridiagonal Tₖ).
        lambda_max: largest Ritz value, estimating λmax(A).
        lambda_min: smallest Ritz value, estimating λmin(A); ≤ 0 means A is certainly not
            positive definite.
        residual_max: ‖Ay − θy‖ of the top Ritz pair (an a-posteriori error bar for ``lambda_max``).
        residual_min: the same for the bottom Ritz pair.
        iterations: Lanczos steps taken = products with A.
        exact: k ≥ p, so the Krylov basis spans the whole space: the Ritz values are the
            eigenvalues of A up to rounding.
        source: what operator the estimate was computed on (full data, a subsample, a dense matrix).
    """

    ritz_values: tuple[float, ...]
    lambda_max: float
    lambda_min: float
    residual_max: float
    residual_min: float
    iterations: int
    exact: bool = False
    source: str = "operator"

    @property
    def condition_number(self) -> float:
        """κ ≈ λmax/λmin; infinite when the estimated λmin ≤ 0."""
        return self.lambda_max / self.lambda_min if self.lambda_min > 0 else math.inf

    @property
    def positive_definite(self) -> bool:
        """Whether the estimated λmin is > 0 (a missed negative eigenvalue is still possible)."""
        return self.lambda_min > 0

    def needed_damping(self, current: float) -> float:
        """The damping that makes A safely positive definite: ``current`` if λmin > 0, else a round
        δ' ≥ current + 1.5·|λmin| (``suggest_damping``), which leaves λmin(H + δ'I) ≈ |λmin|/2."""
        return current if self.positive_definite else suggest_damping(self.lambda_min, current)

    def shifted(self, delta: float) -> Spectrum:
        """The spectrum of A + delta·I (every eigenvalue moves by delta; residuals do not
        change)."""
        return Spectrum(
            tuple(v + delta for v in self.ritz_values),
            self.lambda_max + delta,
            self.lambda_min + delta,
            self.residual_max,
            self.residual_min,
            self.iterations,
            self.exact,
            self.source,
        )

    def as_stats(self, prefix: str = "spectrum_") -> dict[str, Any]:
        """Plain numbers for ``Solution.stats`` and result provenance."""
        return {
            f"{prefix}lambda_max": self.lambda_max,
            f"{prefix}lambda_min": self.lambda_min,
            f"{prefix}residual_max": self.residual_max,
            f"{prefix}residual_min": self.residual_min,
            f"{prefix}condition_number": self.condition_number,
            f"{prefix}lanczos_steps": self.iterations,
            f"{prefix}source": self.source,
        }


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    p: int,
    *,
    k: int = 30,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    source: str = "operator",
) -> Spectrum:
    """k steps of Lanczos with full reorthogonalisation on a symmetric operator A of size p.

    The recurrence is ``krylov.krylov_decomposition`` (shared with the ``Arnoldi`` solver): every
    new basis vector is re-orthogonalised against all previous ones, which costs O(k²p) but keeps
    the Ritz values free of the spurious copies plain Lanczos produces in floating point; k ≪ p,
    so this is negligible next to the k products. It runs in float64 whatever ``dtype`` the
    operator works in, and restarts from a fresh direction if the Krylov space becomes invariant.

    Args:
        matvec: v ↦ Av for v of shape (p,) (e.g. ``Curvature.matvec``).
        p: dimension of A.
        k: number of steps (products with A); capped at p.
        dtype: dtype of the vectors handed to ``matvec``.
        seed: seeds the random start vector.
        source: a label recorded in the result.

    Returns:
        A ``Spectrum``; its extreme Ritz values estimate λmax(A) and λmin(A).

    Raises:
        InputError: k < 1 or p < 1.
        NonFiniteError: A returned NaN or inf.

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float64))
        >>> s = lanczos(lambda v: A @ v, 4, k=4)
        >>> round(s.lambda_min, 10), round(s.lambda_max, 10), s.exact
        (-1.0, 3.0, True)
    """
    check_interval("lanczos", "k", k, 1, None, closed="left", integer=True)
    check_interval("lanczos", "p", p, 1, None, closed="left", integer=True)
    steps = min(k, p)
    kd = krylov_decomposition(matvec, p, steps=steps, dtype=dtype, seed=seed, desc="Lanczos")
    theta, S = torch.linalg.eigh(kd.T)  # ascending Ritz values
    # ‖A y − θ y‖ of each Ritz pair, measured with the recorded products (A is linear)
    resid = (S.T @ kd.AQ - theta[:, None] * (S.T @ kd.Q)).norm(dim=1)
    return Spectrum(
        ritz_values=tuple(float(t) for t in theta),
        lambda_max=float(theta[-1]),
        lambda_min=float(theta[0]),
        residual_max=float(resid[-1]),
        residual_min=float(resid[0]),
        iterations=steps,
        exact=steps == p,
        source=source,
    )


def estimate_spectrum(
    curvature: Curvature, *, k: int = 30, seed: int = 0, sample: int | None = None
) -> Spectrum:
    """Lanczos estimates of λmax and λmin of H + δI (Koh & Liang's H, damping included).

    Args:
        curvature: the operator H + δI.
        k: Lanczos steps; each is one full-data HVP (or one product on the subsample).
        seed: seeds the start vector and the subsample.
        sample: ``None`` uses all n training points. An integer uses a fixed random subset of
            that many points instead — the spectrum of the subsample Hessian, which estimates
            the full one and costs k·sample rather than k·n per-sample HVPs (for very large n).

    Returns:
        A ``Spectrum`` of H + δI (or of the subsample's H_S + δI).
    """
    if sample is not None:
        check_interval("estimate_spectrum", "sample", sample, 1, None, closed="left", integer=True)
    if sample is None or sample >= curvature.n:
        return lanczos(
            curvature.matvec,
            curvature.p,
            k=k,
            dtype=curvature.dtype,
            seed=seed,
            source=f"Lanczos on the full-data H + δI (n = {curvature.n})",
        )
    gen = torch.Generator().manual_seed(seed + 104729)
    subset = curvature.data.subset(torch.randperm(curvature.n, generator=gen)[:sample])
    return lanczos(
        lambda v: curvature.batch_matvec(v, subset),
        curvature.p,
        k=k,
        dtype=curvature.dtype,
        seed=seed,
        source=f"Lanczos on a {sample}-point subsample of the n = {curvature.n} training points",
    )


def lissa_from_spectrum(
    curvature: Curvature,
    *,
    spectrum: Spectrum | None = None,
    k: int = 30,
    safety: float = 1.1,
    tol: float = 0.01,
    max_depth: int = 20_000,
    **lissa_kwargs: Any,
) -> LiSSA:
    """A ``LiSSA`` whose scale (and, unless given, depth) come from the spectrum of H + δI.

    scale s = safety × max(λmax_Lanczos + its residual, λmax of a few minibatch Hessians).
    The Neumann series converges when every minibatch Ã has eigenvalues in (0, 2s), i.e. needs
    s > λmax(Ã)/2 for the minibatch Hessians LiSSA actually uses, not just for the full H. Since
    λmax is convex in the matrix, E[λmax(Ã)] ≥ λmax(E Ã) = λmax(H) (Jensen): the full-data
    Lanczos value is a lower bound on what the minibatches need, while the minibatch power
    iteration (20 steps on 4 batches) is noisy and can under-shoot. The larger of the two is the
    safe one; Ritz values only under-estimate λmax, hence the residual added and the factor 1.1.

    depth t = ⌈(s/λmin)·ln(1/tol)⌉ (capped at ``max_depth``): the error along the slowest
    eigendirection decays like (1 − λmin/s)ᵗ ≤ exp(−t·λmin/s) = tol.

    Args:
        curvature: the operator H + δI LiSSA will be applied to.
        spectrum: a ready estimate of H + δI; computed with ``estimate_spectrum`` if ``None``.
        k: Lanczos steps when the spectrum is computed here.
        safety: factor over the λmax estimate (≥ 1).
        tol: the bias (1 − λmin/s)ᵗ the depth aims for, in (0, 1).
        max_depth: cap on the chosen depth.
        **lissa_kwargs: the other ``LiSSA`` settings (repeats, batch_size, seed, progress, or an
            explicit depth, which is then kept).

    Returns:
        A configured ``LiSSA`` (its ``scale`` and ``depth`` are plain numbers, visible in its
        config).

    Raises:
        NotPositiveDefiniteError: the estimated λmin of H + δI is ≤ 0 — LiSSA would diverge along
            that direction; the message names the damping that fixes it.
        InputError: invalid settings, including ``scale`` in ``lissa_kwargs``.
    """
    check_interval("lissa_from_spectrum", "safety", safety, 1.0, None, closed="left")
    check_interval("lissa_from_spectrum", "tol", tol, 0.0, 1.0)
    check_interval(
        "lissa_from_spectrum", "max_depth", max_depth, 1, None, closed="left", integer=True
    )
    if "scale" in lissa_kwargs:
        raise InputError(
            "lissa_from_spectrum chooses LiSSA's scale itself; pass the other settings only (got"
            " scale=...)."
        )
    spec = (
        spectrum
        if spectrum is not None
        else estimate_spectrum(curvature, k=k, seed=lissa_kwargs.get("seed", 0))
    )
    if not spec.positive_definite:
        raise_not_positive_definite(
            spec, curvature.damping, "LiSSA's series diverges along a negative-curvature direction."
        )
    batch_size = lissa_kwargs.get("batch_size", LiSSA.batch_size)
    mb = minibatch_lambda_max(curvature, batch_size, seed=lissa_kwargs.get("seed", 0))
    scale = safety * max(spec.lambda_max + spec.residual_max, mb)
    if "depth" not in lissa_kwargs:
        lissa_kwargs["depth"] = int(
            min(max_depth, max(1, math.ceil(scale / spec.lambda_min * math.log(1.0 / tol))))
        )
    return LiSSA(scale=float(scale), **lissa_kwargs)


def raise_not_positive_definite(spec: Spectrum, damping: float, why: str = "") -> None:
    """Raise ``NotPositiveDefiniteError`` for a spectrum estimate with λmin ≤ 0, naming the damping
    fix."""
    fix = spec.needed_damping(damping)
    raise NotPositiveDefiniteError(
        f"The Hessian (damping={damping:g}) is not positive definite: Lanczos finds an eigenvalue ≈"
        f" {spec.lambda_min:.3e} (λmax ≈ {spec.lambda_max:.3e}). {why + ' ' if why else ''}Pass"
        f" damping ≥ {fix:.2g} (e.g. Influence(..., damping={fix:.2g})), or train the model closer"
        " to a minimum." + gauss_newton_hint(),
        min_eigenvalue=spec.lambda_min,
        suggested_damping=fix,
    )
