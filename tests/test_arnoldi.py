"""The Arnoldi low-rank solver (Schioppa et al. 2022) against explicit Hessians: its eigenpairs
against ``torch.linalg.eigvalsh``/``eigh``, its solves against ``torch.linalg.solve`` (full rank)
and against the exact inverse on the top-r eigenspace (low rank), and its influence scores
against the closed form of logistic regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import fit_linear
from reference import assert_not_constant, logistic_closed_form, spearman
from upweight.core.curvature import Curvature
from upweight.errors import InputError, NotPositiveDefiniteError
from upweight.solvers import SOLVERS, Arnoldi


def logistic_hessian(model: torch.nn.Linear, X: torch.Tensor, l2: float) -> torch.Tensor:
    """H = (1/n) Σ σ(θᵀxᵢ)σ(−θᵀxᵢ) xᵢxᵢᵀ + l2·I for the bias-free logistic model (closed form)."""
    s = X @ model.weight.detach().reshape(-1)
    return (X * (torch.sigmoid(s) * torch.sigmoid(-s))[:, None]).T @ X / len(X) + l2 * torch.eye(
        X.shape[1], dtype=X.dtype
    )


def logistic_grads(model: torch.nn.Linear, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇θL(z) = −σ(−y θᵀx)·y·x per point, (n, p) (closed form, y ∈ {−1, +1})."""
    yf = y.to(X.dtype)
    return -(torch.sigmoid(-yf * (X @ model.weight.detach().reshape(-1))) * yf)[:, None] * X


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def logreg(small_logreg):
    """small_logreg (p = 49, n = 400) with damping 0.01, its Curvature and closed-form H + δI."""
    model, l2, train, test = small_logreg
    damping = 0.01
    obj = uw.Objective(model, "logistic", l2=l2)
    curv = Curvature(obj, uw.Data.from_any(train), damping=damping)
    H = logistic_hessian(model, train[0], l2 + damping)
    return obj, curv, H, damping, train, test


@pytest.fixture(scope="module")
def logreg_784(mnist_1v7):
    """1 000 real training images, all 784 pixels, l2 = 0.01, trained to the minimum; closed-form H
    and its eigendecomposition (379 dead pixels give the eigenvalue l2 that many times)."""
    d = mnist_1v7
    X = torch.tensor(d.x_train[:1000].reshape(1000, -1), dtype=torch.float64)
    y = torch.tensor(d.y_train[:1000])
    Xt = torch.tensor(d.x_test[:8].reshape(8, -1), dtype=torch.float64)
    yt = torch.tensor(d.y_test[:8])
    l2 = 0.01
    model = fit_linear(X, y, "logistic", l2)
    H = logistic_hessian(model, X, l2)
    ev, E = torch.linalg.eigh(H)
    return model, l2, (X, y), (Xt, yt), H, ev.flip(0), E.flip(1)  # eigenpairs by decreasing λ


# ── full rank: exact ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("k", [1, 8])
def test_full_rank_equals_the_exact_solve(logreg, k):
    obj, curv, H, damping, _, _ = logreg
    # the MNIST 7×7 pooling leaves always-dark pixels: H + δI has the eigenvalue l2 + δ 8 times,
    # so the Krylov space goes invariant early and p steps need restarts
    solver = Arnoldi(rank=curv.p, oversampling=0)
    state = solver.prepare(curv)
    V = torch.randn(k, curv.p, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    ref = torch.linalg.solve(H, V.T).T
    sol = solver.solve(state, V)
    assert sol.value.shape == (k, curv.p)
    assert rel(sol.value, ref) < 1e-10  # measured 3e-15
    # the reported residual is the true one, and ~0 at full rank (the span is everything)
    true_res = (sol.value @ H - V).norm(dim=1) / V.norm(dim=1)
    np.testing.assert_allclose(sol.residual.numpy(), true_res.numpy(), rtol=1e-6, atol=1e-13)
    assert sol.max_residual < 1e-10
    assert (
        sol.stats["rank"] == curv.p
        and sol.stats["krylov_steps"] == curv.p
        and sol.stats["restarts"] > 0
    )
    np.testing.assert_allclose(sol.stats["span_fraction"], 1.0, rtol=1e-12)
    assert sol.stats["approximates"] == "hessian-lowrank" == Arnoldi.approximates
    # the default rank 64 > p = 49 is capped at p: the same exact solve
    capped = Arnoldi()
    assert rel(capped.solve(capped.prepare(curv), V).value, ref) < 1e-10


def test_kept_eigenvalues_are_the_top_of_eigvalsh(logreg):
    obj, curv, H, _, _, _ = logreg
    ev = torch.linalg.eigvalsh(H).flip(0)
    assert float(ev[0] / ev[-1]) > 5, (
        "the spectrum must not be flat, or the comparison proves little"
    )
    full = Arnoldi(rank=curv.p, oversampling=0).prepare(curv)
    np.testing.assert_allclose(full.eigenvalues.numpy(), ev.numpy(), rtol=1e-10)  # measured 2e-15
    torch.testing.assert_close(full.ritz_values, ev.flip(0), rtol=1e-10, atol=0)
    # λ₄…λ₁₀ lie within 16 % of each other: 2·rank steps leave λ₁₀ 1e-6 off, 3·rank steps 1e-15
    top = Arnoldi(rank=10, oversampling=20).prepare(curv)
    np.testing.assert_allclose(top.eigenvalues.numpy(), ev[:10].numpy(), rtol=1e-10)
    # the Ritz vectors are orthonormal eigenvectors: ‖H uᵢ − λᵢ uᵢ‖ from the explicit H
    torch.testing.assert_close(
        top.U @ top.U.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12
    )
    true_resid = (top.U @ H - top.eigenvalues[:, None] * top.U).norm(dim=1)
    assert float(true_resid.max()) < 1e-8 * float(ev[0])
    assert top.stats["lambda_kept_max"] == pytest.approx(float(ev[0]), rel=1e-10)
    assert top.stats["lambda_kept_min"] == pytest.approx(float(ev[9]), rel=1e-8)


# ── low rank on a real problem ────────────────────────────────────────────────────────
def test_low_rank_is_the_exact_inverse_on_the_top_eigenspace(logreg_784):
    model, l2, train, test, H, ev, E = logreg_784
    r = 64
    curv = Curvature(uw.Objective(model, "logistic", l2=l2), uw.Data.from_any(train))
    solver = Arnoldi(rank=r)  # 128 Krylov steps on p = 784
    state = solver.prepare(curv)
    # eigenvalues: the 64 largest of eigvalsh (measured to 4e-15); λ₆₄ and λ₆₅ are only 0.3 % apart
    assert float((ev[r - 1] - ev[r]) / ev[r - 1]) < 0.01
    np.testing.assert_allclose(state.eigenvalues.numpy(), ev[:r].numpy(), rtol=1e-10)
    # solution: U_r Λ_r⁻¹ U_rᵀ v with U_r, Λ_r from torch.linalg.eigh (measured to 3e-13)
    G = torch.cat(
        [
            logistic_grads(model, *test),
            torch.randn(2, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        ]
    )
    Er = E[:, :r]
    ref = (G @ Er) / ev[:r] @ Er.T
    sol = solver.solve(state, G)
    assert rel(sol.value, ref) < 1e-8
    # …which is not the full inverse: the complement is dropped
    full = torch.linalg.solve(H, G.T).T
    assert rel(sol.value, full) > 0.1
    # the residual is the true one, and for a projection it is ‖(I − P)v‖/‖v‖ = √(1 − f²) < 1
    true_res = (sol.value @ H - G).norm(dim=1) / G.norm(dim=1)
    np.testing.assert_allclose(sol.residual.numpy(), true_res.numpy(), rtol=1e-8)
    f = (G @ Er).norm(dim=1) / G.norm(dim=1)
    np.testing.assert_allclose(sol.stats["span_fraction"], f.numpy(), rtol=1e-8)
    np.testing.assert_allclose(sol.residual.numpy(), (1 - f**2).sqrt().numpy(), rtol=1e-8)
    assert 0.5 < sol.max_residual < Arnoldi.default_max_residual == 1.0
    assert sol.stats["projected_residual_max"] < 1e-10 and sol.stats["max_ritz_residual"] < 1e-10


def test_too_little_oversampling_is_visible_in_the_diagnostics(logreg_784):
    """rank + 16 steps do not converge λ₆₄ here; the reported Ritz residuals say so, truthfully."""
    model, l2, train, _, H, ev, E = logreg_784
    curv = Curvature(uw.Objective(model, "logistic", l2=l2), uw.Data.from_any(train))
    state = Arnoldi(rank=64, oversampling=16).prepare(curv)
    true_resid = (state.U @ H - state.eigenvalues[:, None] * state.U).norm(dim=1)
    np.testing.assert_allclose(
        state.ritz_residuals.numpy(), true_resid.numpy(), rtol=1e-6, atol=1e-14
    )
    assert state.stats["max_ritz_residual"] == pytest.approx(
        float((true_resid / state.eigenvalues).max()), rel=1e-6
    )
    # measured 1.1e-2 (vs 6e-14 with the default 2·rank steps)
    assert state.stats["max_ritz_residual"] > 1e-3
    # each kept Ritz value is within its residual of an eigenvalue of H, and below the true λᵢ
    dist = (state.eigenvalues[:, None] - ev[None, :]).abs().min(dim=1).values
    assert bool((dist <= state.ritz_residuals + 1e-14).all())
    assert bool((state.eigenvalues <= ev[:64] + 1e-12).all())


def test_low_rank_influence_against_the_closed_form(logreg_784):
    model, l2, train, test, H, ev, E = logreg_784
    r = 64
    obj = uw.Objective(model, "logistic", l2=l2)
    theta = model.weight.detach().numpy().ravel()
    exact, _, _ = logistic_closed_form(
        theta, train[0].numpy(), train[1].numpy(), test[0].numpy(), test[1].numpy(), l2
    )
    assert_not_constant(exact)
    # the mathematical target: −∇L(z_test)ᵀ U_r Λ_r⁻¹ U_rᵀ ∇L(z) from eigh
    Gt, G = logistic_grads(model, *test), logistic_grads(model, *train)
    Er = E[:, :r]
    projected = -((Gt @ Er) / ev[:r]) @ (G @ Er).T
    # max_residual="auto" accepts it
    inf = uw.Influence(obj, solver=Arnoldi(rank=r), progress=False).fit(train)
    scores = inf.up_loss(test)
    assert scores.values.shape == exact.shape
    np.testing.assert_allclose(
        scores.values, projected.numpy(), rtol=1e-7, atol=1e-9 * np.abs(exact).max()
    )
    # against the exact influence: rankings largely agree, magnitudes shrink (the complement is
    # dropped)
    rho = [spearman(scores.values[j], exact[j]) for j in range(len(exact))]
    assert min(rho) >= 0.9  # measured: min 0.914, mean 0.946 (rank 16: 0.58; rank 128: 0.987)
    # measured 0.108
    assert float(np.linalg.norm(scores.values - exact) / np.linalg.norm(exact)) < 0.2
    prov = scores.provenance
    assert prov["solver"]["name"] == "arnoldi" and prov["solver_approximates"] == "hessian-lowrank"
    assert prov["max_residual_accepted"] == 1.0 and prov["accepted"]
    assert prov["solver_rank"] == r and prov["solver_krylov_steps"] == 2 * r
    # self-influence needs no further HVP pass: −∇L(z)ᵀ U_r Λ_r⁻¹ U_rᵀ ∇L(z)
    before = inf.curvature_.n_matvecs
    selfinf = inf.self_influence(np.arange(50))
    assert inf.curvature_.n_matvecs == before
    ref_self = -(((G[:50] @ Er) ** 2) / ev[:r]).sum(1)
    np.testing.assert_allclose(selfinf.values, ref_self.numpy(), rtol=1e-7)


# ── settings and failures ─────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"oversampling": -1}, "oversampling"),
        ({"oversampling": 1.0}, "oversampling"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_settings_name_the_parameter(kwargs, param):
    with pytest.raises(InputError, match=f"'{param}' parameter of Arnoldi"):
        Arnoldi(**kwargs)


def test_registry_and_config():
    assert SOLVERS["arnoldi"] is Arnoldi
    assert Arnoldi(rank=8, oversampling=4).config() == {
        "name": "arnoldi",
        "rank": 8,
        "oversampling": 4,
        "seed": 0,
    }


def test_indefinite_hessian_raises_with_damping_advice(untrained_mlp):
    model, X, y, H = untrained_mlp
    ev = torch.linalg.eigvalsh(H)
    lmin, p = float(ev[0]), len(ev)
    obj = uw.Objective(model, "cross_entropy")
    with pytest.raises(NotPositiveDefiniteError, match="damping") as info:
        uw.Influence(obj, solver=Arnoldi(rank=16), progress=False, grad_tol=1e3).fit((X, y))
    err = info.value
    assert f"{lmin:.3e}" in str(err)  # the Ritz value has converged to the most negative eigenvalue
    assert err.suggested_damping > -lmin
    # eigenvalues are kept by magnitude: the top 2 of |λ| are λmax and λmin < 0 (by algebraic order
    # both would be positive), so even rank 2 — with the exact spectrum, p Krylov steps — refuses
    by_magnitude = ev[ev.abs().argsort(descending=True)]
    assert float(by_magnitude[0]) > 0 > float(by_magnitude[1]) and float(ev[-2]) > 0
    curv = Curvature(obj, uw.Data.from_any((X, y)))
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        Arnoldi(rank=2, oversampling=p - 2).prepare(curv)
    # with the suggested damping it solves, and matches (H + δI)⁻¹ computed independently
    damped = Curvature(obj, uw.Data.from_any((X, y)), damping=err.suggested_damping)
    solver = Arnoldi(rank=p, oversampling=0)
    V = torch.randn(2, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.solve(H + err.suggested_damping * torch.eye(p, dtype=torch.float64), V.T).T
    assert rel(solver.solve(solver.prepare(damped), V).value, ref) < 1e-10
