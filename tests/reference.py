"""Independent references for the tests: closed forms in NumPy float64, explicit Hessians from
``torch.autograd.functional.hessian`` and per-sample gradients from a plain autograd loop.

Nothing here calls upweight's gradient, HVP or solver code: the tests compare upweight with
mathematics, never with itself.
"""

from __future__ import annotations

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev


def sigmoid(t: np.ndarray) -> np.ndarray:
    return scipy.special.expit(t)


def logistic_closed_form(
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    Xt: np.ndarray,
    yt: np.ndarray,
    l2: float,
    damping: float = 0.0,
):
    """Koh & Liang (2017) §2.3 for p(y|x) = σ(y θᵀx), y ∈ {−1, +1}, in float64.

    Returns (I_up,loss (n_test, n), I_up,params (n, p), H (p, p)) with
      H = (1/n) Σ σ(θᵀxᵢ)σ(−θᵀxᵢ) xᵢxᵢᵀ + (l2 + damping) I,
      I_up,loss(z, z_test) = −y_test·y·σ(−y_test θᵀx_test)·σ(−y θᵀx)·x_testᵀ H⁻¹ x,
      I_up,params(z) = −H⁻¹∇θL(z) with ∇θL(z) = −σ(−y θᵀx)·y·x.
    """
    X, Xt = np.asarray(X, np.float64), np.asarray(Xt, np.float64)
    y, yt = np.asarray(y, np.float64), np.asarray(yt, np.float64)
    n, p = X.shape
    s = X @ theta
    H = (X * (sigmoid(s) * sigmoid(-s))[:, None]).T @ X / n + (l2 + damping) * np.eye(p)
    Hinv_X = np.linalg.solve(H, X.T)  # (p, n)
    coef_train = sigmoid(-y * s)
    coef_test = sigmoid(-yt * (Xt @ theta))
    up_loss = -(yt * coef_test)[:, None] * (y * coef_train)[None, :] * (Xt @ Hinv_X)
    grads = -(coef_train * y)[:, None] * X
    up_params = -np.linalg.solve(H, grads.T).T
    return up_loss, up_params, H


def explicit_hessian(risk_of_flat, theta: torch.Tensor) -> torch.Tensor:
    """∇²R at θ by ``torch.autograd.functional.hessian`` (double backward), (p, p)."""
    return torch.autograd.functional.hessian(risk_of_flat, theta.detach().clone())


def loop_grads(
    loss_of_flat_one, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Per-sample ∇θ L(zᵢ, θ) by a Python loop of ``torch.autograd.grad`` calls, (n, p)."""
    rows = []
    for i in range(len(X)):
        t = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of_flat_one(t, X[i : i + 1], y[i : i + 1]), t)
        rows.append(g)
    return torch.stack(rows)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import scipy.stats

    return float(scipy.stats.spearmanr(np.ravel(a), np.ravel(b))[0])


def assert_not_constant(a: np.ndarray) -> None:
    """Guard against trivially passing comparisons (all zeros, all equal)."""
    a = np.asarray(a)
    assert np.ptp(a) > 0 and np.abs(a).max() > 0, (
        "values are constant: the comparison would prove nothing"
    )


# ── explicit matrices of small torch models (K-FAC tests) ─────────────────────────────────
def flat_fns(model: torch.nn.Module):
    """(θ flat, unflatten) over all parameters, in named_parameters order (as Objective)."""
    named = list(model.named_parameters())
    sizes = [t.numel() for _, t in named]
    theta = torch.cat([t.detach().reshape(-1) for _, t in named])

    def unflat(flat):
        return {n: t.reshape(s.shape) for (n, s), t in zip(named, flat.split(sizes))}

    return theta, unflat


def explicit_H(model, loss, X, y, l2: float, damping: float = 0.0) -> torch.Tensor:
    """∇²R(θ̂) + δI with R = mean loss + (l2/2)‖θ‖², by double backward."""
    theta, unflat = flat_fns(model)

    def risk(flat):
        return (
            loss(functional_call(model, unflat(flat), (X,)), y).mean() + 0.5 * l2 * (flat**2).sum()
        )

    return explicit_hessian(risk, theta) + damping * torch.eye(len(theta), dtype=theta.dtype)


def explicit_ggn_ce(model, X) -> torch.Tensor:
    """G = (1/n) Σ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ for softmax cross-entropy, J by jacrev per point."""
    theta, unflat = flat_fns(model)
    G = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for i in range(len(X)):
        # (c, p)
        J = jacrev(lambda f, x=X[i : i + 1]: functional_call(model, unflat(f), (x,))[0])(theta)
        p = torch.softmax(functional_call(model, unflat(theta), (X[i : i + 1],))[0], 0).detach()
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return G / len(X)


def ce(out, y):
    """Per-sample softmax cross-entropy."""
    return F.cross_entropy(out, y, reduction="none")


def sq(out, y):
    """Per-sample squared loss ½‖out − y‖²."""
    return 0.5 * ((out - y) ** 2).reshape(len(out), -1).sum(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())
