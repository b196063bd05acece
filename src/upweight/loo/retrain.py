"""Actual retraining: re-minimise the weighted risk to a gradient-norm tolerance.

Removing z is the paper's ε = −1/n: the refit minimises (1/n) Σ_{j≠i} L(z_j, θ) + (l2/2)‖θ‖²
with the *same* n and l2 — exactly what dropping one term from a sum-of-losses objective
(scikit-learn's C) does. ``weights`` expresses this and any other reweighting (ε-upweighting,
groups) in one mechanism: R_w(θ) = (1/n) Σᵢ wᵢ L(zᵢ, θ) + (l2/2)‖θ‖².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._checks import check_finite, check_interval
from ..core.data import Data
from ..core.grads import risk
from ..core.objective import Objective
from ..core.params import Params
from ..errors import ShapeError


@dataclass(frozen=True)
class RefitResult:
    """θ after refitting, with ‖∇R_w(θ)‖ and the optimiser's iteration count."""

    params: Params
    grad_norm: float
    iterations: int


def refit(
    objective: Objective,
    data: Data,
    *,
    weights: torch.Tensor | None = None,
    init: Params | None = None,
    gtol: float = 1e-9,
    maxiter: int = 5000,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float64,
    newton: bool = False,
) -> RefitResult:
    """Minimise R_w(θ) = (1/n) Σᵢ wᵢ L(zᵢ, θ) + (l2/2)‖θ‖² by L-BFGS in ``dtype``, warm-started.

    Meant for convex objectives (logistic regression, smooth-hinge SVMs, least squares), where
    the warm-started minimiser is the global one.

    Args:
        objective: model, loss and l2; θ not in ``objective.space`` stays fixed.
        data: the n training points (normalisation is always by this n).
        weights: per-point weights wᵢ, shape (n,); 0 removes a point. Default all ones.
        init: starting θ (default θ̂ = ``objective.params``).
        gtol: stop when max |∂R_w/∂θ| ≤ gtol.
        maxiter: L-BFGS iteration cap.
        newton: after L-BFGS, polish with trust-region Newton-CG (exact Hessian-vector products
            by double backward) to ‖∇R_w‖₂ ≤ gtol — for finite-difference-grade minimisers;
            costs several full-data HVPs per step.
    """
    import scipy.optimize
    import scipy.sparse.linalg

    check_interval("refit", "gtol", gtol, 0.0, None)
    objective.check_data(data, what="training")
    if weights is not None:
        wt = torch.as_tensor(weights)
        if wt.shape != (len(data),):
            raise ShapeError(
                f"refit: weights must have one entry per training point, shape ({len(data)},); got"
                f" {tuple(wt.shape)}."
            )
        check_finite(wt, "refit weights", "Use 0 to remove a point and 1 + nε to upweight it.")
    space = objective.space
    start = init if init is not None else objective.params
    x0 = (
        space.flatten({n: start[n].to(dtype) for n in space.names})
        .detach()
        .cpu()
        .numpy()
        .astype(np.float64)
    )
    device = objective.device  # θ lives (and the risk is evaluated) where the model is
    data = data.to(dtype)
    w = None if weights is None else torch.as_tensor(weights, dtype=dtype, device=device)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.from_numpy(x).to(device, dtype).requires_grad_(True)
        r = risk(objective, space.unflatten(theta), data, batch_size, w)
        (g,) = torch.autograd.grad(r, theta)
        return float(r.detach()), g.detach().cpu().numpy().astype(np.float64)

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        theta = torch.from_numpy(x).to(device, dtype).requires_grad_(True)
        r = risk(objective, space.unflatten(theta), data, batch_size, w)
        (g,) = torch.autograd.grad(r, theta, create_graph=True)
        (hv,) = torch.autograd.grad(g @ torch.from_numpy(v).to(device, dtype), theta)
        return hv.detach().cpu().numpy().astype(np.float64)

    res = scipy.optimize.minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": maxiter, "gtol": gtol, "ftol": 0.0, "maxcor": 30, "maxls": 50},
    )
    nit = int(res.nit)
    x = res.x
    _, g = fun(x)
    if newton:
        # Plain Newton steps, solved by CG: near the minimum the loss differences a line search
        # would compare are below float64 resolution, but the gradient still shrinks quadratically.
        p = len(x)
        for _ in range(10):
            if np.linalg.norm(g) <= gtol:
                break
            op = scipy.sparse.linalg.LinearOperator(
                (p, p), matvec=lambda v, x=x: hessp(x, v), dtype=np.float64
            )
            step, _ = scipy.sparse.linalg.cg(op, g, rtol=1e-12, atol=0.0, maxiter=10 * p)
            _, g_new = fun(x - step)
            if np.linalg.norm(g_new) >= np.linalg.norm(g):
                break
            x, g = x - step, g_new
            nit += 1
    theta = space.unflatten(torch.from_numpy(x).to(device, dtype))
    return RefitResult(theta, float(np.linalg.norm(g)), nit)
