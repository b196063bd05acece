"""The retraining a *damped* influence function predicts, for a θ̂ that is not a minimum.

Koh & Liang's removal effect linearises the minimiser of the training risk around θ̂, which
assumes ∇R(θ̂) = 0 and H ≻ 0. A transformer trained for a few epochs, or any non-convex model,
meets neither: there ``Influence(damping=δ)`` solves with H + δI (§4.2), and "retrain without z"
from scratch is not what it predicts (another local minimum, and the training run's own noise).
What it does predict, to first order, is the response of an objective that is stationary at θ̂
by construction and has curvature H + δI there (Bae et al. 2022, *If influence functions are the
answer, then what is the question?*, §3: the proximal Bregman response function):

* ``curvature="hessian"``: Jᵤ(θ) = (1/n) Σᵢ wᵢ L(zᵢ, θ) − gᵀ(θ − θ̂) + ½(θ − θ̂)ᵀ(Λ + δI)(θ − θ̂),
  with g = (1/n) Σᵢ ∇L(zᵢ, θ̂) and Λ the L2 term's diagonal (``Objective.l2_diagonal``);
* ``curvature="gauss-newton"``: Jᵤ(θ) = (1/n) Σᵢ D_L(zᵢ(θ), zᵢ(θ̂)) − (1/n) Σ_{i∈U} L(zᵢ, θ) +
  ½(θ − θ̂)ᵀ(Λ + δI)(θ − θ̂), with D_L(z, ẑ) = L(z) − L(ẑ) − ∇L(ẑ)ᵀ(z − ẑ) the Bregman divergence
  of the loss in the model output (whose Hessian in θ at θ̂ is the Gauss–Newton matrix).

With nothing removed (wᵢ = 1, U = ∅) both are stationary at θ̂ with Hessian H + δI (resp. G + δI)
— exactly the matrix ``Influence`` inverts — and removing the set U (wᵢ = 0 for i ∈ U) moves the
minimiser by (H + δI)⁻¹(1/n)Σ_{i∈U}∇L(zᵢ, θ̂) + O(|U|²/n²): the first-order prediction of
``Influence.removal_effect``. ``ProximalRefit`` is the ``train_fn`` of ``leave_one_out`` /
``leave_group_out`` that minimises Jᵤ by L-BFGS in float64, warm-started at θ̂.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_interval
from ..core.data import Data
from ..core.objective import Objective
from ..core.params import Params
from ..errors import InputError
from ..influence.engine import Influence
from .retrain import RefitResult


class ProximalRefit:
    """``train_fn`` for ``leave_one_out`` / ``leave_group_out``: minimise the proximal objective
    Jᵤ of a fitted ``Influence`` (module docstring) without the removed points, by float64 L-BFGS
    from θ̂ to max |∇Jᵤ| ≤ ``gtol``.

    Args:
        influence: the fitted ``Influence`` whose predictions are checked: its objective,
            training data, damping δ and curvature ("hessian" or "gauss-newton") define Jᵤ.
        gtol: stop when max |∇Jᵤ(θ)| ≤ gtol.
        maxiter: L-BFGS iteration cap.
        batch_size: training points per forward pass.

    Examples:
        >>> import upweight as uw  # doctest: +SKIP
        >>> inf = uw.Influence(obj, damping=0.01).fit(train)  # doctest: +SKIP
        >>> uw.leave_one_out(inf, test, k=10, train_fn=uw.ProximalRefit(inf))  # doctest: +SKIP
    """

    def __init__(
        self,
        influence: Influence,
        *,
        gtol: float = 1e-8,
        maxiter: int = 2000,
        batch_size: int = 256,
    ) -> None:
        if getattr(influence, "data_", None) is None:
            raise InputError(
                "ProximalRefit needs a fitted Influence: call influence.fit(...) first."
            )
        check_interval("ProximalRefit", "gtol", gtol, 0.0, None)
        check_interval("ProximalRefit", "maxiter", maxiter, 1, None, integer=True)
        check_interval("ProximalRefit", "batch_size", batch_size, 1, None, integer=True)
        kind = influence.curvature
        if kind not in ("hessian", "gauss-newton"):
            raise InputError(
                f"ProximalRefit: Influence(curvature={kind!r}) has no proximal objective here; it"
                " supports 'hessian' and 'gauss-newton'."
            )
        self.curvature = kind
        self.damping = float(influence.damping)
        self.gtol, self.maxiter, self.batch_size = gtol, maxiter, batch_size
        # what every retraining shares, computed once: the data in float64, θ̂, the quadratic's
        # diagonal Λ + δ and (Hessian form) the gradient correction, a pass over the data
        objective = influence.objective
        self._data = influence.data_.to(torch.float64)
        self._anchor = {
            k: objective.params[k].detach().to(objective.device, torch.float64)
            for k in objective.space.names
        }
        self._quad = objective.l2_diagonal(torch.float64).to(objective.device) + self.damping
        self._fixed = self._gradient_correction(objective, self._data, self._anchor)

    def config(self) -> dict[str, Any]:
        return {
            "what": "proximal refit (Bae et al. 2022)",
            "curvature": self.curvature,
            "damping": self.damping,
            "gtol": self.gtol,
            "maxiter": self.maxiter,
        }

    def __call__(self, objective: Objective, data_without: Data, init: Params) -> RefitResult:
        import scipy.optimize

        data, anchor, quad, fixed = self._data, self._anchor, self._quad, self._fixed
        n = len(data)
        kept = torch.from_numpy(np.isin(data.ids.cpu().numpy(), data_without.ids.cpu().numpy()))
        space = objective.space
        device = objective.device
        theta_hat = space.flatten(anchor)

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            theta = torch.from_numpy(x).to(device, torch.float64)
            d = theta - theta_hat
            value = float(0.5 * (quad * d * d).sum())
            g = quad * d
            if fixed is not None:
                value -= float(fixed @ d)
                g = g - fixed
            # one batch's graph at a time
            for s, batch in zip(range(0, n, self.batch_size), data.batches(self.batch_size)):
                leaf = theta.clone().requires_grad_(True)
                w = kept[s : s + len(batch)]
                term = self._batch_term(objective, space.unflatten(leaf), anchor, batch, w) / n
                (gb,) = torch.autograd.grad(term, leaf)
                value += float(term.detach())
                g = g + gb
            return value, g.detach().cpu().numpy()

        x0 = theta_hat.detach().cpu().numpy()
        res = scipy.optimize.minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            options={
                "maxiter": self.maxiter,
                "gtol": self.gtol,
                "ftol": 0.0,
                "maxcor": 30,
                "maxls": 50,
            },
        )
        _, g = fun(res.x)
        theta = space.unflatten(torch.from_numpy(res.x).to(device, torch.float64))
        return RefitResult(theta, float(np.linalg.norm(g)), int(res.nit))

    def _gradient_correction(
        self, objective: Objective, data: Data, anchor: Params
    ) -> torch.Tensor | None:
        """g = (1/n) Σᵢ ∇L(zᵢ, θ̂) for the Hessian form (the Gauss–Newton form needs none: each
        Bregman term is stationary at θ̂)."""
        if self.curvature != "hessian":
            return None
        theta = objective.space.flatten(anchor).requires_grad_(True)
        params = objective.space.unflatten(theta)
        g = torch.zeros_like(theta, requires_grad=False)
        for batch in data.batches(self.batch_size):  # one batch's graph at a time
            total = objective.losses(params, batch.X, batch.y).sum() / len(data)
            g += torch.autograd.grad(total, theta)[0]
        return g

    def _batch_term(
        self, objective: Objective, params: Params, anchor: Params, batch: Data, kept: torch.Tensor
    ) -> torch.Tensor:
        """Σ over the batch of the data term of Jᵤ (not yet divided by n)."""
        w = kept.to(device=objective.device, dtype=torch.float64)
        if self.curvature == "hessian":
            return (objective.losses(params, batch.X, batch.y) * w).sum()
        y = batch.y.to(objective.device)
        with torch.no_grad():
            z_hat = objective.outputs(anchor, batch.X)
        with torch.enable_grad():
            z0 = z_hat.detach().requires_grad_(True)
            loss_hat = objective.loss_fn(z0, y)
            (dz,) = torch.autograd.grad(loss_hat.sum(), z0)
        z = objective.outputs(params, batch.X)
        loss = objective.loss_fn(z, y)
        linear = (dz * (z - z_hat)).reshape(len(batch), -1).sum(1)
        bregman = loss - loss_hat.detach() - linear
        return bregman.sum() - (loss * (1 - w)).sum()
