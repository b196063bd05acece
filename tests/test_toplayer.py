"""``paper.toplayer.LogisticTopLayer``: the attack's retrain and H solves, checked against autograd.

The reference is mathematics, not the module's closed forms: the risk R(w) written out in torch,
its gradient and Hessian by autograd in float64, and the unique minimiser of a strictly convex R
characterised by ∇R = 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upweight.errors import InaccurateSolveError, InputError
from upweight.paper.toplayer import LogisticTopLayer

L2 = 1e-2


def _problem(n: int = 60, d: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.where(F[:, 0] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64) > 0, 1, -1)
    return F, y


def _risk(F: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(-y.double() * (F @ w)).mean() + 0.5 * L2 * (w @ w)


def _autograd_hessian(F: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    return torch.autograd.functional.hessian(lambda v: _risk(F, y, v), w).numpy()


def _autograd_gradient(F: torch.Tensor, y: torch.Tensor, w: np.ndarray) -> np.ndarray:
    v = torch.tensor(w, requires_grad=True)
    _risk(F, y, v).backward()
    return v.grad.numpy()


def test_solve_equals_the_autograd_hessian_solve_away_from_the_reference():
    F, y = _problem()
    w_ref = torch.zeros(F.shape[1], dtype=torch.float64)
    top = LogisticTopLayer(F, y, L2, w_ref)
    # a different point and perturbed features: the reference is only a preconditioner here
    w = torch.linspace(-1.0, 1.5, F.shape[1], dtype=torch.float64)
    F2 = F.clone()
    F2[:5] += 0.3
    b = torch.arange(1.0, F.shape[1] + 1, dtype=torch.float64)
    H = _autograd_hessian(F2, y, w)
    x = top.solve(F2, w, b)
    np.testing.assert_allclose(x, np.linalg.solve(H, b.numpy()), rtol=1e-8, atol=0)
    assert np.linalg.norm(H @ x - b.numpy()) <= 1e-9 * np.linalg.norm(b.numpy())
    assert top.iterations > 1 and top.refreshes == 0
    np.testing.assert_allclose(top.hessian(F2, w), H, rtol=1e-12, atol=1e-15)


def test_minimise_reaches_the_stationary_point_from_warm_and_cold_starts():
    F, y = _problem(seed=1)
    top = LogisticTopLayer(F, y, L2, torch.zeros(F.shape[1], dtype=torch.float64))
    w_cold, g_cold = top.minimise(F, np.zeros(F.shape[1]))
    assert g_cold <= 1e-10
    assert np.linalg.norm(_autograd_gradient(F, y, w_cold)) <= 1e-10
    # the attack's use: features of a few rows move, retrain from the old minimiser
    F2 = F.clone()
    F2[[3, 7]] *= 1.5
    w_warm, _ = top.minimise(F2, w_cold)
    assert np.linalg.norm(_autograd_gradient(F2, y, w_warm)) <= 1e-10
    assert np.linalg.norm(w_warm - w_cold) > 1e-3  # the perturbation did move the minimiser
    # a cold start on the perturbed features ends at the same (unique) minimiser
    w_cold2, _ = top.minimise(F2, np.zeros(F.shape[1]))
    np.testing.assert_allclose(w_cold2, w_warm, rtol=0, atol=1e-9)


def test_a_far_reference_is_refreshed_and_the_answer_stays_exact():
    F, y = _problem(seed=2)
    # reference Hessian of features 100× larger: a poor preconditioner for the real problem
    top = LogisticTopLayer(10.0 * F, y, L2, torch.zeros(F.shape[1], dtype=torch.float64), maxiter=2)
    w = torch.full((F.shape[1],), 0.2, dtype=torch.float64)
    b = torch.ones(F.shape[1], dtype=torch.float64)
    x = top.solve(F, w, b)
    assert top.refreshes == 1
    np.testing.assert_allclose(x, np.linalg.solve(_autograd_hessian(F, y, w), b.numpy()), rtol=1e-8)


def test_an_unreachable_tolerance_raises_instead_of_returning_an_inexact_solve():
    F, y = _problem(seed=3)
    top = LogisticTopLayer(F, y, L2, torch.zeros(F.shape[1], dtype=torch.float64), maxiter=1)
    w = torch.linspace(-3.0, 3.0, F.shape[1], dtype=torch.float64)
    with pytest.raises(InaccurateSolveError, match="raise l2"):
        top.solve(F, w, torch.ones(F.shape[1], dtype=torch.float64), rtol=1e-300)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"F": torch.zeros(5, 3)}, "float64"),
        ({"y": torch.ones(4)}, "same"),
        ({"l2": 0.0}, "l2 must be > 0"),
        ({"w_ref": torch.zeros(4, dtype=torch.float64)}, "4 entries"),
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    args = {
        "F": torch.zeros(5, 3, dtype=torch.float64),
        "y": torch.ones(5),
        "l2": L2,
        "w_ref": torch.zeros(3, dtype=torch.float64),
    }
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        LogisticTopLayer(args["F"], args["y"], args["l2"], args["w_ref"])
