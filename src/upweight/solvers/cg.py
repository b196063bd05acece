"""CG: conjugate gradients on (H + δI)x = v, for all k right-hand sides at once."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_finite, check_interval
from ..core.curvature import Curvature
from ..errors import NotConvergedWarning, NotPositiveDefiniteError
from .base import InverseHVPSolver, Solution, relative_residual
from .direct import suggest_damping


@dataclass(frozen=True)
class CG(InverseHVPSolver):
    """Conjugate gradients with one full-data HVP block per iteration — Koh & Liang (2017) §3.

    The k right-hand sides run as k independent CG recurrences that share each HVP pass over
    the data (one ``vmap``-ed block product), so k test points cost about as much as one.
    A column stops when ‖rⱼ‖ ≤ max(rtol·‖vⱼ‖, atol).

    Args:
        rtol: relative tolerance on the residual.
        atol: absolute tolerance on the residual.
        maxiter: iteration cap; ``None`` means min(2p, 10 000).

    Raises:
        NotPositiveDefiniteError: a search direction with pᵀ(H + δI)p ≤ 0 was met; the message
            estimates λmin and names a damping that fixes it.

    Warns:
        NotConvergedWarning: the cap was reached before the tolerance.
    """

    name = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    maxiter: int | None = None

    def __post_init__(self) -> None:
        check_interval("CG", "rtol", self.rtol, 0.0, 1.0)
        check_interval("CG", "atol", self.atol, 0.0, None, closed="left")
        if self.maxiter is not None:
            check_interval("CG", "maxiter", self.maxiter, 1, None, closed="left", integer=True)

    def prepare(self, curvature: Curvature) -> Any:
        return curvature

    def solve(self, state: Any, rhs: torch.Tensor) -> Solution:
        curv: Curvature = state
        t0 = time.perf_counter()
        B = rhs.to(curv.dtype).reshape(-1, curv.p)
        maxiter = self.maxiter or min(2 * curv.p, 10_000)
        X = torch.zeros_like(B)
        R = B.clone()
        P = R.clone()
        rs = (R * R).sum(1)
        tol = torch.clamp(self.rtol * B.norm(dim=1), min=self.atol)
        it = 0
        while it < maxiter:
            active = rs.sqrt() > tol
            if not bool(active.any()):
                break
            it += 1
            idx = active.nonzero().squeeze(1)
            Pa = P[idx]
            APa = curv.matvec(Pa)
            pAp = (Pa * APa).sum(1)
            if bool((pAp <= 0).any()):
                self._raise_not_pd(curv)
            alpha = rs[idx] / pAp
            X[idx] += alpha[:, None] * Pa
            R[idx] -= alpha[:, None] * APa
            rs_new = (R[idx] * R[idx]).sum(1)
            P[idx] = R[idx] + (rs_new / rs[idx])[:, None] * Pa
            rs[idx] = rs_new
        check_finite(X, "The CG solution", "Check the model and loss at θ̂, or add damping.")
        res = relative_residual(curv.matvec(X), B)
        converged = rs.sqrt() <= tol
        if not bool(converged.all()):
            warnings.warn(
                f"CG stopped at maxiter={maxiter} with {int((~converged).sum())} of {len(B)} right-hand sides "
                f"unconverged (largest relative residual {float(res.max()):.2e} > rtol={self.rtol:g}). "
                "Raise maxiter, loosen rtol, or add damping to improve the conditioning.",
                NotConvergedWarning,
                stacklevel=3,
            )
        return Solution(X.to(rhs.dtype), res, converged, it, time.perf_counter() - t0, {"maxiter": maxiter})

    @staticmethod
    def _raise_not_pd(curv: Curvature) -> None:
        lmin = curv.lambda_min()
        fix = suggest_damping(min(lmin, 0.0), curv.damping)
        raise NotPositiveDefiniteError(
            f"CG met negative curvature: the Hessian (damping={curv.damping:g}) is not positive definite, "
            f"smallest eigenvalue ≈ {lmin:.3e}. Pass damping ≥ {fix:.2g} (e.g. Influence(..., damping={fix:.2g})).",
            min_eigenvalue=lmin,
            suggested_damping=fix,
        )
