"""Every solver against torch.linalg.solve on the real-data Hessian; LiSSA's divergence guard."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.core.curvature import Curvature
from upweight.errors import DivergenceError, InputError, NotConvergedWarning


@pytest.fixture(scope="module")
def curvature(small_logreg):
    model, l2, train, _ = small_logreg
    return Curvature(uw.Objective(model, "logistic", l2=l2), uw.Data.from_any(train), damping=0.01)


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize(
    "solver, tol",
    [
        (uw.Direct(), 1e-10),
        (uw.CG(rtol=1e-10, block=False), 1e-8),
        (uw.CG(rtol=1e-10), 1e-8),
        (uw.LiSSA(depth=300, repeats=4, batch_size=200, progress=False), 0.1),
    ],
    ids=["direct", "cg", "block-cg", "lissa"],
)
def test_solver_conformance(curvature, solver, tol, k):
    H = curvature.dense()  # formed here only as the reference
    V = torch.randn(k, curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    ref = torch.linalg.solve(H, V.T).T
    sol = solver.solve(solver.prepare(curvature), V)
    assert sol.value.shape == (k, curvature.p)
    err = float((sol.value - ref).norm() / ref.norm())
    assert err < tol
    # the reported residual is the true one
    true_res = ((sol.value @ H - V).norm(dim=1) / V.norm(dim=1)).numpy()
    np.testing.assert_allclose(sol.residual.numpy(), true_res, rtol=1e-6, atol=1e-13)
    assert sol.seconds > 0


def test_cg_block_equals_one_at_a_time(curvature):
    V = torch.randn(3, curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cg = uw.CG(rtol=1e-12, block=False)
    block = cg.solve(cg.prepare(curvature), V).value
    single = torch.cat([cg.solve(cg.prepare(curvature), V[j : j + 1]).value for j in range(3)])
    torch.testing.assert_close(block, single, rtol=1e-9, atol=1e-12)


def test_block_cg_shares_one_krylov_space_and_needs_fewer_iterations(curvature):
    """Block CG on 40 right-hand sides (real-data Hessian): each column meets the same rtol as
    independent CG, against torch.linalg.solve, in far fewer HVP blocks."""
    H = curvature.dense()
    V = torch.randn(
        40, curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    ref = torch.linalg.solve(H, V.T).T
    plain = uw.CG(rtol=1e-8, block=False).solve(curvature, V)
    block = uw.CG(rtol=1e-8, block=True).solve(curvature, V)
    assert bool(block.converged.all()) and block.max_residual < 1e-8
    assert float((block.value - ref).norm() / ref.norm()) < 1e-6
    assert block.iterations * 2 < plain.iterations, (block.iterations, plain.iterations)


def test_block_cg_with_dependent_and_zero_right_hand_sides(curvature):
    """A rank-deficient block — a repeated column, a multiple of another, a zero column — does not
    break block CG (its search block stays orthonormal): each column is still its own exact solve.
    """
    H = curvature.dense()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, curvature.p, dtype=torch.float64, generator=g)
    V = torch.stack([a, b, a, -3.0 * b, torch.zeros_like(a)])
    sol = uw.CG(rtol=1e-10, block=True).solve(curvature, V)
    ref = torch.linalg.solve(H, V.T).T
    torch.testing.assert_close(sol.value, ref, rtol=1e-6, atol=1e-8)
    assert bool(sol.converged.all()) and float(sol.value[4].abs().max()) == 0.0


def test_cg_warns_when_it_stops_unconverged(curvature):
    V = torch.randn(2, curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.warns(NotConvergedWarning, match="maxiter=3"):
        sol = uw.CG(rtol=1e-12, maxiter=3).solve(curvature, V)
    assert not bool(sol.converged.any()) and sol.iterations == 3


def test_lissa_too_small_scale_diverges_with_advice_and_auto_converges(small_logreg):
    model, l2, train, test = small_logreg
    obj = uw.Objective(model, "logistic", l2=l2)
    H = Curvature(obj, uw.Data.from_any(train)).dense()
    lmax = float(torch.linalg.eigvalsh(H)[-1])
    bad = uw.LiSSA(scale=lmax / 4, depth=500, progress=False)  # needs scale > λmax/2
    inf = uw.Influence(obj, solver=bad, progress=False).fit(train)
    with pytest.raises(DivergenceError, match=r"scale > λmax/2") as info:
        inf.up_loss((test[0][:2], test[1][:2]))
    assert "LiSSA(scale=" in str(info.value)
    good = uw.Influence(
        obj, solver=uw.LiSSA(depth=500, repeats=2, progress=False), progress=False
    ).fit(train)
    sol = good.s_test((test[0][:2], test[1][:2]))
    assert sol.stats["scale"] > lmax
    ref = torch.linalg.solve(H, good.test_grads((test[0][:2], test[1][:2])).T).T
    assert float((sol.value - ref).norm() / ref.norm()) < 0.15


@pytest.mark.parametrize("depth, damping", [(20, 0.0), (30, 0.05)])
def test_lissa_truncation_is_the_missing_fraction_in_the_least_curved_directions(depth, damping):
    # One training point: every minibatch Hessian is the full one, so the recursion is the
    # deterministic truncated series A⁻¹(I − (I − A/s)ᵗ⁺¹)v. Directions orthogonal to x carry only
    # the L2 term and the damping, λ = l2 + δ, where exactly (1 − λ/s)ᵗ⁺¹ of A⁻¹v is missing.
    torch.manual_seed(0)
    x = torch.randn(1, 5, dtype=torch.float64)
    x /= x.norm()  # the point's Hessian has λmax ≤ 2 + l2 + δ < 2s
    model = torch.nn.Linear(5, 1, bias=False).double()
    obj = uw.Objective(model, "squared", l2=0.2)
    curv = Curvature(obj, uw.Data.from_any((x, torch.zeros(1, 1, dtype=torch.float64))))
    curv = curv.replace(damping=damping)
    v = torch.randn(5, dtype=torch.float64)
    v -= (v @ x[0]) / (x[0] @ x[0]) * x[0]  # v ⟂ x: an eigenvector of A with λ = l2 + δ
    lam = 0.2 + damping
    solver = uw.LiSSA(depth=depth, repeats=1, batch_size=1, scale=3.0, progress=False)
    state = solver.prepare(curv)
    assert state.floor == pytest.approx(lam)
    with pytest.warns(uw.errors.InaccurateSolveWarning, match=r"depth ≥ [\d,]+ brings"):
        sol = solver.solve(state, v[None])
    kept = float(sol.value[0] @ v) * lam / float(v @ v)  # (1 − truncation) of v/λ
    assert 1 - kept == pytest.approx((1 - lam / 3.0) ** (depth + 1), rel=1e-9)
    assert sol.stats["truncation"] == pytest.approx(1 - kept, rel=1e-9)
    deep = uw.LiSSA(depth=solver.depth_for(state, 0.01), repeats=1, batch_size=1, scale=3.0)
    deep = dataclasses.replace(deep, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", uw.errors.InaccurateSolveWarning)
        sol = deep.solve(deep.prepare(curv), v[None])
    assert 1 - float(sol.value[0] @ v) * lam / float(v @ v) <= 0.01


def test_lissa_is_reproducible_from_its_seed(curvature):
    V = torch.randn(2, curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = uw.LiSSA(depth=50, repeats=2, seed=11, progress=False)
    a = s.solve(s.prepare(curvature), V).value
    b = s.solve(s.prepare(curvature), V).value
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: uw.CG(rtol=-1e-6), "rtol"),
        (lambda: uw.CG(maxiter=0), "maxiter"),
        (lambda: uw.LiSSA(depth=0), "depth"),
        (lambda: uw.LiSSA(scale=-2.0), "scale"),
        (lambda: uw.LiSSA(scale="big"), "scale"),
        (lambda: uw.LiSSA(repeats=1.5), "repeats"),
        (lambda: uw.Direct(max_p=0), "max_p"),
        (lambda: uw.SmoothHinge(0.0), "t"),
    ],
)
def test_bad_solver_settings_name_the_parameter(make, name):
    with pytest.raises(InputError, match=f"'{name}' parameter"):
        make()
