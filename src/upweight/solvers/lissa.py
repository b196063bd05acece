"""LiSSA: the stochastic Neumann-series estimator of Agarwal et al. (2016), as used by
Koh & Liang (2017) §3, with the scale divided back out."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._checks import check_interval
from .._progress import progress_bar
from ..core.curvature import Curvature
from ..errors import DivergenceError, InaccurateSolveWarning, InputError
from .base import InverseHVPSolver, Solution, non_numerical, relative_residual
from .direct import suggest_damping


@dataclass(frozen=True)
class LiSSAState:
    """What ``LiSSA.prepare`` decided; passed back to ``LiSSA.solve``.

    Attributes:
        curvature: the operator H + δI whose minibatch estimates drive the recursion (and against
            which the residual is measured).
        scale: s, the scale the series divides by (``LiSSA.scale`` or 1.1 × ``lambda_max``).
        lambda_max: the minibatch λmax estimate behind ``scale="auto"``; ``None`` for a given scale.
        prepare_seconds: wall time of ``prepare``.
        floor: the smallest diagonal term l2 + δ of the operator (0 on unpenalised coordinates
            without damping): the least curvature any direction has while the loss's own
            Hessian is positive semi-definite (a convex model, or Gauss–Newton).
    """

    curvature: Curvature
    scale: float
    lambda_max: float | None
    prepare_seconds: float
    floor: float = 0.0


@dataclass(frozen=True)
class LiSSA(InverseHVPSolver[LiSSAState]):
    """Stochastic inverse-HVP: h₀ = v,  hⱼ = v + (I − Ãⱼ/s) hⱼ₋₁,  x ≈ h_t / s.

    Ãⱼ is the Hessian of R on a fresh minibatch plus (l2 + δ)I, an unbiased estimate of
    A = H + δI; s is the scale. The fixed point is h = s·A⁻¹v, so dividing by s returns A⁻¹v
    with no constant-factor error. The series converges when every Ãⱼ/s has eigenvalues in
    (0, 2), i.e. s > λmax/2; the error in an eigendirection λ decays like (1 − λ/s)ᵗ, so depth t
    must be several times s/λmin. The r repeats are averaged to reduce the variance.

    The truncated series is biased towards zero: in expectation it returns
    A⁻¹(I − (I − A/s)ᵗ⁺¹)v (h_t sums t + 1 terms), so in an eigendirection of curvature λ the
    fraction (1 − λ/s)ᵗ⁺¹ of the answer is missing. ``truncation`` reports that fraction at the
    curvature floor l2 + δ, the worst direction while the loss's Hessian is positive semi-definite.
    Small minibatches need a large scale (one point's Hessian can have a λmax far above the
    average's), so at a fixed depth they truncate more: ``solve`` warns when more than
    ``MAX_TRUNCATION`` is missing.

    Args:
        depth: t, recursion steps per repeat (paper: 5 000 for MNIST).
        repeats: r, independent estimates averaged (paper: 10).
        batch_size: points per minibatch Hessian (the paper's footnote 3). Each step's cost is
            mostly fixed overhead, so larger batches buy a smaller variance cheaply.
        scale: s, or "auto": 1.1 × the largest eigenvalue found by power iteration on a few
            minibatch Hessians (which over-estimate the full one: the safe side).
        seed: seeds a local ``torch.Generator``; same seed, same answer.
        check_every: steps between divergence checks.
        progress: show a progress bar over the steps (the recursion depth of each repeat).

    Raises:
        DivergenceError: ‖hⱼ‖ grew beyond 10·(j+1)·‖v‖ (impossible while the series converges)
            or became NaN/inf; the message estimates λmax and names a scale that works.
    """

    name = "lissa"
    # A stochastic estimate: a residual of a few tenths can still rank training points well, while a
    # diverged or far-from-converged series sits near or above 1. Ask for a tighter max_residual
    # when magnitudes matter.
    default_max_residual = 0.5
    MAX_TRUNCATION = 0.05
    depth: int = 1000
    repeats: int = 4
    batch_size: int = 256
    scale: float | Literal["auto"] = "auto"
    seed: int = 0
    check_every: int = 10
    progress: bool = non_numerical(True)

    def __post_init__(self) -> None:
        check_interval("LiSSA", "depth", self.depth, 1, None, closed="left", integer=True)
        check_interval("LiSSA", "repeats", self.repeats, 1, None, closed="left", integer=True)
        check_interval("LiSSA", "batch_size", self.batch_size, 1, None, closed="left", integer=True)
        check_interval(
            "LiSSA", "check_every", self.check_every, 1, None, closed="left", integer=True
        )
        if self.scale != "auto":
            if isinstance(self.scale, str):
                raise InputError(
                    "The 'scale' parameter of LiSSA must be a positive float or 'auto'. Got"
                    f" {self.scale!r}."
                )
            check_interval("LiSSA", "scale", self.scale, 0.0, None)

    def prepare(self, curvature: Curvature) -> LiSSAState:
        t0 = time.perf_counter()
        lam = None
        scale = self.scale
        if scale == "auto":
            lam = minibatch_lambda_max(curvature, self.batch_size, seed=self.seed)
            scale = 1.1 * lam
        floor = float(curvature.diagonal.min()) if curvature.p else 0.0
        return LiSSAState(curvature, float(scale), lam, time.perf_counter() - t0, floor)

    def truncation(self, state: LiSSAState) -> float:
        """(1 − λ/s)ᵗ⁺¹ at λ = the curvature floor: the fraction of A⁻¹v the depth-t series leaves
        out in the least-curved direction (1.0 when there is no floor)."""
        if state.floor <= 0.0:
            return 1.0
        return abs(1.0 - state.floor / state.scale) ** (self.depth + 1)

    def depth_for(self, state: LiSSAState, fraction: float) -> int | None:
        """The depth at which ``truncation`` falls to ``fraction`` (``None`` without a floor)."""
        rate = abs(1.0 - state.floor / state.scale)
        if state.floor <= 0.0 or rate >= 1.0:
            return None
        return max(1, math.ceil(math.log(fraction) / math.log(rate)) - 1)

    def solve(self, state: LiSSAState, rhs: torch.Tensor) -> Solution:
        curv = state.curvature
        s = state.scale
        t0 = time.perf_counter()
        V = rhs.to(curv.dtype).reshape(-1, curv.p)
        vnorm = V.norm(dim=1)
        n = curv.n
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(V)
        with progress_bar(
            desc="LiSSA", total=self.repeats * self.depth, enabled=self.progress
        ) as bar:
            for rep in range(self.repeats):
                h = V.clone()
                bar.set_postfix(repeat=f"{rep + 1}/{self.repeats}")
                for j in range(1, self.depth + 1):
                    idx = torch.randint(n, (min(self.batch_size, n),), generator=gen)
                    h = V + h - curv.batch_matvec(h, curv.data.subset(idx)) / s
                    if j % self.check_every == 0 or j == self.depth:
                        hn = h.norm(dim=1)
                        if not bool(torch.isfinite(hn).all()) or bool(
                            (hn > 10.0 * (j + 1) * vnorm).any()
                        ):
                            self._raise_divergence(curv, s, rep, j, float(hn.max()))
                    bar.update(1)
                total += h / s
        X = total / self.repeats
        res = relative_residual(curv.matvec(X), V)
        truncation = self.truncation(state)
        if state.floor > 0.0 and truncation > self.MAX_TRUNCATION:
            warnings.warn(
                f"LiSSA(depth={self.depth}) at scale {s:.3g} misses {truncation:.0%} of"
                f" (H + δI)⁻¹v in the directions of least curvature, l2 + δ = {state.floor:.3g}"
                f" ((1 − {state.floor:.3g}/{s:.3g})^{self.depth + 1}): the series is truncated, so"
                " the scores are biased towards zero. " + self._depth_advice(state),
                InaccurateSolveWarning,
                stacklevel=4,
            )
        return Solution(
            X.to(rhs.dtype),
            res,
            torch.ones(len(V), dtype=torch.bool),
            self.repeats * self.depth,
            time.perf_counter() - t0,
            {
                "scale": s,
                "lambda_max": state.lambda_max,
                "hvp_samples": self.repeats * self.depth * self.batch_size,
                "truncation": truncation,
            },
        )

    def accuracy_advice(self, state: LiSSAState | None = None) -> str:
        advice = "Increase LiSSA's depth (t) or repeats (r), or add damping."
        if state is not None and self.truncation(state) > self.MAX_TRUNCATION:
            advice += " " + self._depth_advice(state)
        return advice

    def _depth_advice(self, state: LiSSAState) -> str:
        need = self.depth_for(state, 0.01)
        if need is None:
            return f"The scale {state.scale:.3g} is below (l2 + δ)/2: pass a larger scale."
        return (
            f"depth ≥ {need:,} brings the truncation under 1 %; or a larger batch_size (its"
            " minibatch Hessians have a smaller λmax, so scale='auto' is smaller), or more damping."
        )

    def _raise_divergence(
        self, curv: Curvature, s: float, rep: int, step: int, hnorm: float
    ) -> None:
        """Explain why the series diverged. The recursion hⱼ = v + (I − H_b/s)hⱼ₋₁ converges only
        while every minibatch Hessian H_b has its eigenvalues in (0, 2s): NaN from the model itself,
        a scale below λmax/2, and negative curvature (which no scale fixes) each get their own
        advice.
        """
        where = f"LiSSA diverged at step {step} of repeat {rep} (‖h‖={hnorm:.2e}) with scale={s:g}"
        if not _hvps_finite(curv, self.batch_size, self.seed):
            raise DivergenceError(
                f"{where}: the model's own Hessian-vector products are NaN or infinite at θ̂, so no"
                " scale can help. Check the model for overflow at θ̂ (e.g. evaluate it in float64:"
                " model.double()) and the training data for extreme values."
            )
        lam = minibatch_lambda_max(curv, self.batch_size, seed=self.seed)
        if lam > 0 and 2 * s < lam:
            good = 10 ** math.ceil(math.log10(1.1 * lam))
            alt = "" if self.scale == "auto" else " or LiSSA(scale='auto')"
            raise DivergenceError(
                f"{where}. It needs scale > λmax/2 of the minibatch Hessians, λmax ≈ {lam:.3g};"
                f" pass LiSSA(scale={good:g}){alt}."
            )
        lmin = minibatch_lambda_min(curv, self.batch_size, sigma=max(lam, s), seed=self.seed)
        fix = suggest_damping(min(lmin, 0.0), curv.damping, lam)
        raise DivergenceError(
            f"{where}, which is above λmax/2 ≈ {lam / 2:.3g} of the minibatch Hessians, so the"
            " scale is not the cause: the minibatch Hessians have negative curvature (smallest"
            f" eigenvalue ≈ {lmin:.3g}), where the series cannot converge at any scale. Add damping"
            f" ≥ {fix:.2g} (Influence(..., damping={fix:.2g})), or use CG, which reports whether"
            " the full Hessian is positive definite."
        )


def _hvps_finite(curv: Curvature, batch_size: int, seed: int, n_batches: int = 4) -> bool:
    """Whether a few minibatch HVPs of a random unit vector are finite."""
    gen = torch.Generator().manual_seed(seed + 104729)
    for _ in range(n_batches):
        batch = curv.data.subset(torch.randint(curv.n, (min(batch_size, curv.n),), generator=gen))
        v = torch.randn(curv.p, generator=gen, dtype=curv.dtype)
        if not bool(torch.isfinite(curv.batch_matvec(v / v.norm(), batch)).all()):
            return False
    return True


def _minibatch_rayleigh(
    curv: Curvature, batch_size: int, op: Any, *, n_batches: int, n_iter: int, seed: int
) -> list[float]:
    """Per random minibatch b, the Rayleigh quotient vᵀ op(v, b) after ``n_iter`` power-iteration
    steps with the operator ``op(v, batch)`` — its dominant eigenvalue."""
    gen = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(n_batches):
        batch = curv.data.subset(torch.randint(curv.n, (min(batch_size, curv.n),), generator=gen))
        v = torch.randn(curv.p, generator=gen, dtype=curv.dtype)
        v /= v.norm()
        rq = 0.0
        for _ in range(n_iter):
            w = op(v, batch)
            rq = float(v @ w)
            v = w / w.norm().clamp_min(1e-300)
        found.append(rq)
    return found


def minibatch_lambda_min(
    curv: Curvature,
    batch_size: int,
    *,
    sigma: float,
    n_batches: int = 4,
    n_iter: int = 30,
    seed: int = 0,
) -> float:
    """Smallest eigenvalue of (H_batch + (l2 + δ)I) over a few random minibatches, by power
    iteration on σI − H_batch with σ ≥ λmax (a rough estimate, for error messages)."""
    sigma = abs(sigma) * 1.05 + 1e-12
    mus = _minibatch_rayleigh(
        curv,
        batch_size,
        lambda v, b: sigma * v - curv.batch_matvec(v, b),
        n_batches=n_batches,
        n_iter=n_iter,
        seed=seed + 7927,
    )
    return min(sigma - mu for mu in mus)


def minibatch_lambda_max(
    curv: Curvature, batch_size: int, *, n_batches: int = 4, n_iter: int = 20, seed: int = 0
) -> float:
    """Largest eigenvalue of (H_batch + (l2 + δ)I) over a few random minibatches, by power
    iteration."""
    lams = _minibatch_rayleigh(
        curv, batch_size, curv.batch_matvec, n_batches=n_batches, n_iter=n_iter, seed=seed + 7919
    )
    return max([0.0, *(abs(lam) for lam in lams)])
