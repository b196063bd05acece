"""``ProximalRefit``: the retraining a damped influence function predicts at a θ̂ that is not a
minimum (Bae et al. 2022). Checked against mathematics: its objective is stationary at θ̂ with
curvature H + δI (the explicit float64 Hessian, resp. Gauss–Newton matrix), so removing one of n
points moves the measurement by the first-order prediction up to O(1/n²) — and plain retraining
from θ̂ does not agree there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import TanhMLP
from upweight.errors import InputError

N, D, C = 300, 4, 3


@pytest.fixture(scope="module")
def problem():
    """An MLP a few SGD steps from its initialisation: ∇R(θ̂) far from 0, H indefinite."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(1)
    model = TanhMLP(D, 6, C).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval(), X, y


def _influence(problem, curvature):
    model, X, y = problem
    obj = uw.Objective(model, "cross_entropy", l2=1e-3)
    inf = uw.Influence(
        obj, solver=uw.Direct(), damping=0.3, curvature=curvature, grad_tol=1e9, progress=False
    )
    return inf.fit((X, y))


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_nothing_removed_leaves_theta_hat(problem, curvature):
    """Jᵤ with U = ∅ is stationary at θ̂ although ∇R(θ̂) is not 0."""
    inf = _influence(problem, curvature)
    assert inf.grad_norm_ > 1e-2  # θ̂ is far from a minimum
    obj = inf.objective
    res = uw.ProximalRefit(inf)(obj, inf.data_, obj.params)
    theta_hat = obj.space.flatten(obj.params)
    assert res.iterations <= 1
    assert float((obj.space.flatten(res.params) - theta_hat).abs().max()) < 1e-10


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_removal_effects_match_the_proximal_retraining(problem, curvature):
    """The damped first-order removal effect equals the proximal retraining up to O(1/n²): slope
    ≈ 1 and Pearson ≈ 1 on the most influential points — where plain retraining from θ̂, which
    also descends the gradient θ̂ left, does not agree."""
    model, X, y = problem
    inf = _influence(problem, curvature)
    test = (X[:2], y[:2])
    cmp = uw.leave_one_out(
        inf, test, k=6, train_fn=uw.ProximalRefit(inf, gtol=1e-10), progress=False
    )
    assert np.ptp(cmp.actual) > 0
    assert cmp.retrain_grad_norm < 1e-8
    assert cmp.pearson > 0.99, cmp
    np.testing.assert_allclose(cmp.actual, cmp.predicted, rtol=0.05)

    def plain(objective, data_without, init):  # the training risk without the point, from θ̂
        w = torch.zeros(N, dtype=torch.float64)
        w[data_without.ids] = 1.0
        return uw.refit(objective, inf.data_, weights=w, init=init, gtol=1e-8, maxiter=100)

    off = uw.leave_one_out(inf, test, ids=cmp.train_ids, train_fn=plain, progress=False)
    # it keeps descending the gradient θ̂ left: a shift that dwarfs every removal's effect
    assert bool((np.abs(off.actual - off.predicted) > 5 * np.abs(off.predicted)).all()), off


def test_needs_a_fitted_influence(problem):
    model, *_ = problem
    with pytest.raises(InputError, match="fitted Influence"):
        uw.ProximalRefit(uw.Influence(uw.Objective(model, "cross_entropy")))
