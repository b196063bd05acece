"""Nyström sketch-and-solve / Nyström-preconditioned CG (Frangella, Tropp & Udell 2023) and DataInf
(Kwon et al. 2024) against mathematics: explicit float64 Hessians (closed form or double backward),
the Nyström approximation Y(ΩᵀY)⁺Yᵀ built here from the explicit H, and DataInf's mean of inverses
built here from per-sample gradients computed by a plain autograd loop (never upweight's code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import upweight as uw
from conftest import TanhMLP, fit_linear, pooled
from reference import explicit_hessian, logistic_closed_form, loop_grads
from upweight.core.curvature import Curvature
from upweight.errors import InputError, NotPositiveDefiniteError
from upweight.solvers import nystrom as nystrom_module
from upweight.solvers.cg import CG
from upweight.solvers.datainf import DataInf
from upweight.solvers.nystrom import Nystrom

D64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logistic_hessian(w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ σ(wᵀxᵢ)σ(−wᵀxᵢ) xᵢxᵢᵀ — the loss Hessian of bias-free logistic regression (closed
    form)."""
    s = X @ w
    return (X * (torch.sigmoid(s) * torch.sigmoid(-s))[:, None]).T @ X / len(X)


def rhs(k: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(k, p, dtype=D64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def logreg_49(small_logreg):
    """400 real 1-vs-7 images pooled to 49 features, l2 = 0.01, damping 0.01; closed-form H + δI."""
    model, l2, train, test = small_logreg
    damping = 0.01
    obj = uw.Objective(model, "logistic", l2=l2)
    curv = Curvature(obj, uw.Data.from_any(train), damping=damping)
    H = logistic_hessian(model.weight.detach().reshape(-1), train[0]) + (l2 + damping) * torch.eye(
        49, dtype=D64
    )
    return model, obj, curv, H, l2, damping, train, test


@pytest.fixture(scope="module")
def logreg_784(mnist_1v7):
    """600 real 1-vs-7 images, all 784 pixels (many always dark: H is far from full rank), l2 =
    0.01."""
    d = mnist_1v7
    X = torch.tensor(d.x_train[:600].reshape(600, -1), dtype=D64)
    y = torch.tensor(d.y_train[:600])
    l2 = 0.01
    model = fit_linear(X, y, "logistic", l2)
    obj = uw.Objective(model, "logistic", l2=l2)
    # H − l2·I: the part Nystrom sketches
    A = logistic_hessian(model.weight.detach().reshape(-1), X)
    return obj, uw.Data.from_any((X, y)), A, l2


# ══ Nyström ═══════════════════════════════════════════════════════════════════════════
def test_full_rank_nystrom_is_the_exact_solve(logreg_49):
    _, _, curv, H, l2, damping, _, _ = logreg_49
    V = rhs(4, 49, 0)
    ref = torch.linalg.solve(H, V.T).T
    # rank 64 is capped at p = 49
    for solver in (Nystrom(rank=49), Nystrom(), Nystrom(rank=49, block_size=10)):
        state = solver.prepare(curv)
        sol = solver.solve(state, V)
        assert rel(sol.value, ref) < 1e-10  # measured 2e-15
        true_res = (sol.value @ H - V).norm(dim=1) / V.norm(dim=1)
        np.testing.assert_allclose(sol.residual.numpy(), true_res.numpy(), rtol=1e-5, atol=1e-13)
        assert state.stats["rank"] == 49 and state.stats["mu"] == pytest.approx(l2 + damping)
        # full rank: Λ̂ are the eigenvalues of H − μI
        np.testing.assert_allclose(
            state.eigenvalues.numpy(),
            torch.linalg.eigvalsh(H - (l2 + damping) * torch.eye(49, dtype=D64)).flip(0).numpy(),
            rtol=1e-8,
            atol=1e-12,
        )
    assert (
        state.stats["hvp_passes"] == 5
        and sol.stats["approximates"] == "hessian-nystrom" == Nystrom.approximates
    )


def test_low_rank_nystrom_is_the_explicit_nystrom_approximation(logreg_784):
    obj, data, A, l2 = logreg_784
    mu = l2
    eye = torch.eye(784, dtype=D64)
    V = rhs(3, 784, 1)
    exact = torch.linalg.solve(A + mu * eye, V.T).T
    errors = {}
    ev_A = torch.linalg.eigvalsh(A).flip(0)
    for r in (64, 256):
        solver = Nystrom(rank=r, seed=r)
        state = solver.prepare(Curvature(obj, data))
        Om = state.omega.numpy().T  # (p, r)
        np.testing.assert_allclose(Om.T @ Om, np.eye(r), atol=1e-12)
        # A⟨Ω⟩ = (AΩ)(ΩᵀAΩ)⁺(AΩ)ᵀ from the explicit A, in NumPy float64
        Y = A.numpy() @ Om
        A_nys = Y @ np.linalg.pinv(Om.T @ Y, hermitian=True) @ Y.T
        # torch: one thread (conftest)
        x_ref = torch.linalg.solve(torch.from_numpy(A_nys) + mu * eye, V.T).T.numpy()
        sol = solver.solve(state, V)
        # measured 2e-13
        np.testing.assert_allclose(
            sol.value.numpy(), x_ref, rtol=0, atol=1e-9 * np.abs(x_ref).max()
        )
        # 0 ⪯ Â ⪯ A: each λ̂ᵢ ≤ λᵢ(A) (Loewner order ⇒ eigenvalue order)
        assert (
            bool((state.eigenvalues <= ev_A[:r] + 1e-12).all())
            and float(state.eigenvalues.min()) >= 0
        )
        ev_nys = torch.linalg.eigvalsh(torch.from_numpy(A_nys)).flip(0)[:r]
        np.testing.assert_allclose(state.eigenvalues.numpy(), ev_nys.numpy(), rtol=1e-8, atol=1e-12)
        # the residual is the true one: ‖(A + μI)x − v‖/‖v‖ = ‖(A − Â)(Â + μI)⁻¹v‖/‖v‖
        true_res = (sol.value @ (A + mu * eye) - V).norm(dim=1) / V.norm(dim=1)
        np.testing.assert_allclose(sol.residual.numpy(), true_res.numpy(), rtol=1e-8)
        np.testing.assert_allclose(
            sol.residual.numpy(),
            np.linalg.norm((A.numpy() - A_nys) @ x_ref.T, axis=0) / V.norm(dim=1).numpy(),
            rtol=1e-6,
        )
        errors[r] = rel(sol.value, exact)
    # a bigger sketch is closer to the exact solve (measured 0.029 → 0.002)
    assert errors[256] < 0.5 * errors[64] and errors[64] > 1e-3


def test_nystrom_preconditioned_cg_is_exact_in_fewer_iterations(logreg_784):
    obj, data, A, l2 = logreg_784
    damping = 1e-3  # κ(H + δI) = λmax/(l2 + δ): ill-conditioned
    curv = Curvature(obj, data, damping=damping)
    V = rhs(3, 784, 2)
    exact = torch.linalg.solve(A + (l2 + damping) * torch.eye(784, dtype=D64), V.T).T
    plain = CG(rtol=1e-10)
    pcg = CG(rtol=1e-10, preconditioner=Nystrom(rank=64))
    s_plain = plain.solve(plain.prepare(curv), V)
    s_pcg = pcg.solve(pcg.prepare(curv), V)
    assert rel(s_plain.value, exact) < 1e-8 and rel(s_pcg.value, exact) < 1e-8
    assert s_pcg.iterations <= 0.5 * s_plain.iterations  # measured 27 → 9
    assert s_pcg.stats["preconditioner"] == "nystrom" and s_pcg.stats["preconditioner_rank"] == 64
    # P⁻¹ = (λ̂_r + μ) U(Λ̂ + μI)⁻¹Uᵀ + (I − UUᵀ), built explicitly from the state's U, Λ̂
    st = Nystrom(rank=64).prepare_preconditioner(curv)
    U, lam, mu = st.U.T, st.eigenvalues, st.mu
    P_inv = (lam[-1] + mu) * (U / (lam + mu)) @ U.T + torch.eye(784, dtype=D64) - U @ U.T
    np.testing.assert_allclose(
        Nystrom(rank=64).precondition(st, V).numpy(), (V @ P_inv).numpy(), rtol=1e-10, atol=1e-12
    )


def test_mu_is_the_smallest_diagonal_entry_with_an_unpenalised_bias(small_logreg):
    """l2_exclude=("bias",): H + δI = A + δI with the weights' l2 inside A; μ = 0 without
    damping."""
    model0, l2, (X, y), _ = small_logreg
    model = torch.nn.Linear(49, 1).double().eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    obj = uw.Objective(model, "logistic", l2=l2, l2_exclude=("bias",))
    fit = uw.refit(obj, uw.Data.from_any((X, y)), gtol=1e-10)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(fit.params[name])
    obj = uw.Objective(model, "logistic", l2=l2, l2_exclude=("bias",))
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=D64)], 1)  # θ = (weight, bias)
    H = logistic_hessian(torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]), Xb)
    H += torch.diag(torch.cat([torch.full((49,), l2, dtype=D64), torch.zeros(1, dtype=D64)]))
    V = rhs(2, 50, 3)
    ref = torch.linalg.solve(H, V.T).T
    curv0 = Curvature(obj, uw.Data.from_any((X, y)))
    with pytest.raises(InputError, match="damping="):
        Nystrom(rank=50).prepare(curv0)
    # as a preconditioner μ = 0 is allowed, and PCG still solves the undamped system exactly
    pcg = CG(rtol=1e-11, preconditioner=Nystrom(rank=20))
    assert rel(pcg.solve(pcg.prepare(curv0), V).value, ref) < 1e-8
    damping = 1e-3
    curv = Curvature(obj, uw.Data.from_any((X, y)), damping=damping)
    state = Nystrom(rank=50).prepare(curv)
    assert state.mu == pytest.approx(damping)
    ref_d = torch.linalg.solve(H + damping * torch.eye(50, dtype=D64), V.T).T
    assert rel(Nystrom(rank=50).solve(state, V).value, ref_d) < 1e-9


def test_nystrom_influence_at_full_rank_is_the_closed_form(logreg_49):
    model, obj, _, _, l2, damping, train, test = logreg_49
    inf = uw.Influence(obj, solver=Nystrom(rank=49), damping=damping, progress=False).fit(train)
    scores = inf.up_loss((test[0][:5], test[1][:5]))
    theta = model.weight.detach().numpy().ravel()
    exact, _, _ = logistic_closed_form(
        theta, *(t.numpy() for t in train), test[0][:5].numpy(), test[1][:5].numpy(), l2, damping
    )
    np.testing.assert_allclose(scores.values, exact, rtol=1e-7, atol=1e-10 * np.abs(exact).max())
    assert (
        scores.provenance["solver"]["name"] == "nystrom"
        and scores.provenance["max_residual_accepted"] == 10.0
    )


def test_indefinite_hessian_is_detected_by_the_sketch(untrained_mlp):
    model, X, y, H = untrained_mlp
    lmin = float(torch.linalg.eigvalsh(H)[0])
    obj = uw.Objective(model, "cross_entropy")
    data = uw.Data.from_any((X, y))
    # H + δI itself indefinite: the message names a damping beyond −λmin (at full rank ΩᵀHΩ has λmin
    # exactly)
    with pytest.raises(NotPositiveDefiniteError, match="damping") as info:
        Nystrom(rank=len(H)).prepare(Curvature(obj, data, damping=1e-3))
    assert info.value.suggested_damping > -lmin
    assert info.value.min_eigenvalue == pytest.approx(lmin + 1e-3, rel=1e-6)
    # with that damping H + δI is positive definite, but A = H + δI − μI = H is not: Nystrom still
    # refuses
    with pytest.raises(NotPositiveDefiniteError, match="may still be positive definite"):
        Nystrom(rank=len(H)).prepare(Curvature(obj, data, damping=info.value.suggested_damping))
    # a small sketch sees it too (a random 16-dim compression of H has a negative eigenvalue here)
    with pytest.raises(NotPositiveDefiniteError):
        Nystrom(rank=16).prepare(Curvature(obj, data, damping=1e-3))


def frangella_reference(
    A: np.ndarray, Om: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Frangella, Tropp & Udell (2023), Alg. 2.1, in NumPy float64 from the explicit A and test
    matrix Ω (p, r): Y = AΩ, ν = √p·eps·‖Y‖₂, Y_ν = Y + νΩ, C = chol(ΩᵀY_ν), B = Y_ν C⁻ᵀ = U Σ Vᵀ,
    Λ̂ = max(Σ² − ν, 0).
    """
    p = A.shape[0]
    Y = A @ Om
    nu = np.sqrt(p) * eps * np.linalg.norm(Y, 2)
    Y_nu = Y + nu * Om
    core = Om.T @ Y_nu
    C = np.linalg.cholesky(0.5 * (core + core.T))
    B = np.linalg.solve(C, Y_nu.T).T
    U, sig, _ = np.linalg.svd(B, full_matrices=False)
    return U, np.maximum(sig**2 - nu, 0.0), float(nu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sketch_is_the_shifted_frangella_formula_with_damping(logreg_784, monkeypatch, dtype):
    """The shifted, damped path (μ = l2 + δ, ν > 0) against the paper's formula written out above;
    every thin QR split into row blocks of r rows (TSQR with p // r = 12 blocks). In float32 the
    shift ν = √p·eps₃₂·‖Y‖₂ ≈ 9e-7·λ̂max is far above rounding, and Ω is stored as the float32 Ω
    multiplied.
    """
    monkeypatch.setattr(nystrom_module, "_CHUNK_ELEMENTS", 1)
    obj, data, A, l2 = logreg_784
    damping, r = 1e-3, 64
    mu = l2 + damping
    state = Nystrom(rank=r, seed=3).prepare(Curvature(obj, data, damping=damping, dtype=dtype))
    assert state.omega.dtype == dtype and state.omega.shape == (r, 784) and state.U.dtype == D64
    Om = state.omega.double().numpy().T
    # measured 1e-15 / 8e-9
    np.testing.assert_allclose(Om.T @ Om, np.eye(r), atol=1e-12 if dtype == D64 else 1e-7)
    U_ref, lam_ref, nu_ref = frangella_reference(A.numpy(), Om, float(torch.finfo(dtype).eps))
    # relative tolerances, measured: float64 ≤ 3e-15 everywhere; float32 (HVPs rounded to float32) ν
    # 3e-9, Λ̂ 9e-9·λ̂max, Â 1.5e-7, x 2.8e-7 — while leaving out the shift would move Λ̂ by ν =
    # 8.6e-7·λ̂max, Â by 6.6e-6
    tol_nu, tol_lam, tol_A, tol_x = (1e-12,) * 4 if dtype == D64 else (1e-7, 1e-7, 2e-6, 3e-6)
    assert state.stats["nu"] == pytest.approx(nu_ref, rel=tol_nu) and state.mu == pytest.approx(mu)
    np.testing.assert_allclose(
        state.eigenvalues.numpy(), lam_ref, rtol=0, atol=tol_lam * lam_ref.max()
    )
    U = state.U.numpy()
    np.testing.assert_allclose(U @ U.T, np.eye(r), atol=1e-12)
    A_hat = (U.T * state.eigenvalues.numpy()) @ U
    A_ref = (U_ref * lam_ref) @ U_ref.T
    assert np.linalg.norm(A_hat - A_ref) <= tol_A * np.linalg.norm(A_ref)
    # the shift is far above these tolerances: the test sees Λ̂ = Σ² − ν, not Σ²
    if dtype == torch.float32:
        assert nu_ref > 5 * tol_lam * lam_ref.max()
        assert np.linalg.norm((U_ref * nu_ref) @ U_ref.T) > 3 * tol_A * np.linalg.norm(A_ref)
    # the solve: x = U(Λ̂ + μI)⁻¹Uᵀv + (v − UUᵀv)/μ with the reference factors
    V = rhs(2, 784, 8)
    Vn = V.numpy()
    C = Vn @ U_ref
    x_ref = (C / (lam_ref + mu)) @ U_ref.T + (Vn - C @ U_ref.T) / mu
    x = Nystrom(rank=r, seed=3).solve(state, V).value.numpy()
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=tol_x * np.abs(x_ref).max())


def test_pseudo_inverse_fallback_keeps_the_nystrom_approximation(logreg_784, monkeypatch):
    """r = 700 ≥ rank(A) (always-dark pixels: ~480 of 784): with a random Ω, A⟨Ω⟩ = AΩ(ΩᵀAΩ)⁺ΩᵀA
    is A itself (ΩᵀW has full column rank for A = WΛWᵀ). With the Cholesky of ΩᵀY_ν made to fail,
    the eigh pseudo-inverse drops the core's null directions (fewer than r rows of U) and still
    gives Â = A.
    """
    monkeypatch.setattr(nystrom_module, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda M: (M, torch.tensor(1)))
    obj, data, A, l2 = logreg_784
    r = 700
    state = Nystrom(rank=r).prepare(Curvature(obj, data))
    assert state.stats["core_factorisation"] == "eigh-pseudo-inverse"
    k = state.U.shape[0]
    assert k < r and state.eigenvalues.shape == (k,)
    U = state.U.numpy()
    np.testing.assert_allclose(U @ U.T, np.eye(k), atol=1e-12)  # measured 5e-15
    A_hat = (U.T * state.eigenvalues.numpy()) @ U
    assert np.linalg.norm(A_hat - A.numpy()) <= 1e-10 * np.linalg.norm(A.numpy())  # measured 2e-13
    ev = torch.linalg.eigvalsh(A).flip(0).numpy()  # torch: one thread (conftest)
    # measured 4e-15
    np.testing.assert_allclose(state.eigenvalues.numpy(), ev[:k], rtol=0, atol=1e-12 * ev[0])


def test_tsqr_orthonormalises_in_place(monkeypatch):
    """The in-place thin QR (row blocks of r rows) on a (p, r) array and on the transpose of an (r,
    p) one."""
    monkeypatch.setattr(nystrom_module, "_CHUNK_ELEMENTS", 1)
    assert len(nystrom_module._row_blocks(1000, 30)) == 33
    g = torch.Generator().manual_seed(9)
    M0 = torch.randn(1000, 30, generator=g, dtype=D64) @ torch.diag(
        torch.logspace(0, -8, 30, dtype=D64)
    )
    for M in (M0.clone(), M0.T.contiguous().T):  # contiguous rows; a column-major view
        R = nystrom_module._orthonormalise_columns(M)
        np.testing.assert_allclose((M.T @ M).numpy(), np.eye(30), atol=1e-13)  # measured 2e-15
        assert rel(M @ R, M0) < 1e-14  # measured 2e-16
        # R is the triangular factor: the same as LAPACK's up to the signs of its rows
        R_np = np.linalg.qr(M0.numpy(), mode="r")
        np.testing.assert_allclose(
            np.abs(np.triu(R.numpy())), np.abs(R_np), rtol=1e-8, atol=1e-12 * np.abs(R_np).max()
        )
        np.testing.assert_allclose(np.tril(R.numpy(), -1), 0, atol=0)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"seed": -1}, "seed"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_nystrom_invalid_settings_name_the_parameter(kwargs, param):
    with pytest.raises(InputError, match=f"'{param}' parameter of Nystrom"):
        Nystrom(**kwargs)


# ══ DataInf ═══════════════════════════════════════════════════════════════════════════
def flat_model(model: torch.nn.Module, loss):
    """(θ flat, per-point loss of flat θ, risk of flat θ with l2) for the references."""
    named = list(model.named_parameters())
    sizes = [t.numel() for _, t in named]
    theta = torch.cat([t.detach().reshape(-1) for _, t in named])

    def unflat(flat):
        return {n: t.reshape(s.shape) for (n, s), t in zip(named, flat.split(sizes))}

    def loss_one(flat, x, yy):
        return loss(functional_call(model, unflat(flat), (x,)), yy).sum()

    def risk(flat, X, Y, l2):
        return (
            loss(functional_call(model, unflat(flat), (X,)), Y).mean() + 0.5 * l2 * (flat**2).sum()
        )

    return theta, loss_one, risk, sizes


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def mean_of_inverses(G: np.ndarray, lam: float) -> np.ndarray:
    """(1/n) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ by explicit inversion of every term (no Sherman–Morrison)."""
    d = G.shape[1]
    return np.mean([np.linalg.inv(np.outer(g, g) + lam * np.eye(d)) for g in G], axis=0)


@pytest.fixture(scope="module")
def mlp_data(mnist_1v7):
    """A tanh MLP 16-5-3 (fc1, fc2: two blocks, p = 103) on 40 real pooled images, 3 classes."""
    torch.manual_seed(0)
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:40], 7), dtype=D64)
    y = torch.arange(40) % 3
    model = TanhMLP(16, 5, 3).double().eval()
    theta, loss_one, risk, sizes = flat_model(model, ce)
    G = loop_grads(loss_one, theta, X, y)  # (40, 103), autograd loop
    return model, X, y, G, theta, risk, sizes


def test_one_training_point_makes_the_swap_exact():
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3).double().eval()
    X = torch.randn(1, 5, dtype=D64)
    y = torch.tensor([2])
    l2, damping = 0.3, 0.2
    theta, loss_one, risk, _ = flat_model(model, ce)
    g = loop_grads(loss_one, theta, X, y)[0]
    curv = Curvature(
        uw.Objective(model, "cross_entropy", l2=l2), uw.Data.from_any((X, y)), damping=damping
    )
    V = rhs(3, 18, 4)
    lam = l2 + damping
    ref = torch.linalg.solve(torch.outer(g, g) + lam * torch.eye(18, dtype=D64), V.T).T
    sol = DataInf().solve(DataInf().prepare(curv), V)
    assert rel(sol.value, ref) < 1e-12
    # n = 1: the approximated operator is inverted exactly
    assert sol.stats["fisher_residual_max"] < 1e-12
    assert sol.stats["lambda"] == (pytest.approx(lam),) and sol.stats["lambda_source"] == (
        "l2 + damping",
    )
    # the reported residual is against the true Hessian (double backward), not the Fisher
    Hd = explicit_hessian(lambda f: risk(f, X, y, l2), theta) + damping * torch.eye(18, dtype=D64)
    true_res = (sol.value @ Hd - V).norm(dim=1) / V.norm(dim=1)
    np.testing.assert_allclose(sol.residual.numpy(), true_res.numpy(), rtol=1e-8)
    assert float(true_res.min()) > 1e-3  # H ≠ ggᵀ + λI: the residual is not trivially 0


def test_two_layers_are_two_blocks_of_the_mean_of_inverses(mlp_data):
    model, X, y, G, theta, risk, sizes = mlp_data
    l2 = 0.05
    curv = Curvature(uw.Objective(model, "cross_entropy", l2=l2), uw.Data.from_any((X, y)))
    state = DataInf().prepare(curv)
    assert [b.name for b in state.blocks] == ["fc1", "fc2"]
    assert [b.params for b in state.blocks] == [
        ("fc1.weight", "fc1.bias"),
        ("fc2.weight", "fc2.bias"),
    ]
    V = rhs(4, len(theta), 5)
    sol = DataInf().solve(state, V)
    # the reference: block-diagonal mean of explicitly inverted per-point matrices
    cut = sizes[0] + sizes[1]
    Gn, Vn = G.numpy(), V.numpy()
    M1, M2 = mean_of_inverses(Gn[:, :cut], l2), mean_of_inverses(Gn[:, cut:], l2)
    ref = np.concatenate([Vn[:, :cut] @ M1, Vn[:, cut:] @ M2], axis=1)
    np.testing.assert_allclose(sol.value.numpy(), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    # one block over all of θ (cross-layer terms kept) would be a different operator
    assert np.linalg.norm(Vn @ mean_of_inverses(Gn, l2) - ref) > 1e-3 * np.linalg.norm(ref)
    # the residual against the block-diagonal damped empirical Fisher it approximates
    F1 = Gn[:, :cut].T @ Gn[:, :cut] / len(Gn) + l2 * np.eye(cut)
    F2 = Gn[:, cut:].T @ Gn[:, cut:] / len(Gn) + l2 * np.eye(len(theta) - cut)
    FX = np.concatenate([ref[:, :cut] @ F1, ref[:, cut:] @ F2], axis=1)
    fres = np.linalg.norm(FX - Vn, axis=1) / np.linalg.norm(Vn, axis=1)
    assert sol.stats["fisher_residual_max"] == pytest.approx(float(fres.max()), rel=1e-8)
    # the swap's error obeys the bound ‖mean of inverses − inverse of mean‖₂ ≤ meanᵢ φ(‖gᵢ‖²/λ)/λ
    for j, (Gb, M, Fb) in enumerate([(Gn[:, :cut], M1, F1), (Gn[:, cut:], M2, F2)]):
        err = np.linalg.norm(M - np.linalg.inv(Fb), 2)
        e = (Gb**2).sum(1) / l2
        assert state.stats["swap_error_bound"][j] == pytest.approx(
            float(np.mean(e**2 / (1 + e))), rel=1e-10
        )
        assert 0 < err <= state.stats["swap_error_bound"][j] / l2
    # and the true-Hessian residual is the true one
    Hd = explicit_hessian(lambda f: risk(f, X, y, l2), theta)
    true_res = (sol.value @ Hd - V).norm(dim=1) / V.norm(dim=1)
    np.testing.assert_allclose(sol.residual.numpy(), true_res.numpy(), rtol=1e-8)


def test_lambda_rules(mlp_data):
    model, X, y, G, theta, _, sizes = mlp_data
    cut = sizes[0] + sizes[1]
    # λ_l = 0.1 · (n d_l)⁻¹ Σᵢ ‖gᵢₗ‖²: a tenth of the mean squared gradient entry of the block
    rule = [0.1 * float((G[:, :cut] ** 2).mean()), 0.1 * float((G[:, cut:] ** 2).mean())]
    data = uw.Data.from_any((X, y))
    # no l2, no damping: DataInf's own rule, per block
    st = DataInf().prepare(Curvature(uw.Objective(model, "cross_entropy"), data))
    np.testing.assert_allclose(st.stats["lambda"], rule, rtol=1e-10)
    assert all("datainf rule" in s for s in st.stats["lambda_source"])
    V = rhs(2, len(theta), 6)
    Gn = G.numpy()
    ref = np.concatenate(
        [
            V.numpy()[:, :cut] @ mean_of_inverses(Gn[:, :cut], rule[0]),
            V.numpy()[:, cut:] @ mean_of_inverses(Gn[:, cut:], rule[1]),
        ],
        axis=1,
    )
    np.testing.assert_allclose(DataInf().solve(st, V).value.numpy(), ref, rtol=1e-10)
    # lam="datainf" ignores l2 and damping; a float overrides everything
    curv = Curvature(uw.Objective(model, "cross_entropy", l2=0.5), data, damping=0.1)
    np.testing.assert_allclose(
        DataInf(lam="datainf").prepare(curv).stats["lambda"], rule, rtol=1e-10
    )
    assert DataInf().prepare(curv).stats["lambda"] == (pytest.approx(0.6), pytest.approx(0.6))
    assert DataInf(lam=2.0).prepare(curv).stats["lambda"] == (2.0, 2.0)


def test_large_lambda_gives_v_over_lambda(logreg_49):
    """λ → ∞: x → v/λ, with ‖λx − v‖ = ‖(1/n) Σ gᵢgᵢᵀv/(λ + ‖gᵢ‖²)‖ ≤ meanᵢ ‖gᵢ‖²/(λ +
    ‖gᵢ‖²) ‖v‖."""
    model, obj, curv, _, _, _, (X, y), _ = logreg_49
    w = model.weight.detach().reshape(-1)
    yf = y.to(D64)
    G = -(torch.sigmoid(-yf * (X @ w)) * yf)[:, None] * X  # closed-form logistic gradients
    V = rhs(2, 49, 7)
    for lam in (1e2, 1e6):
        x = DataInf(lam=lam, fisher_residual=False).solve(DataInf(lam=lam).prepare(curv), V).value
        dev = (lam * x - V).norm(dim=1) / V.norm(dim=1)
        bound = float(((G**2).sum(1) / (lam + (G**2).sum(1))).mean())
        assert float(dev.max()) <= bound * (1 + 1e-9)
        assert float(dev.max()) > 1e-3 * bound  # not trivially 0
    assert bound < 1e-4


def test_datainf_influence_on_real_data_is_the_explicit_formula(logreg_49):
    model, obj, _, _, l2, damping, train, test = logreg_49
    X, y = train
    w = model.weight.detach().reshape(-1)
    yf = y.to(D64)
    G = -(torch.sigmoid(-yf * (X @ w)) * yf)[:, None] * X  # closed-form ∇L(zᵢ)
    Xt, yt = test[0][:4], test[1][:4]
    Gt = -(torch.sigmoid(-yt.to(D64) * (Xt @ w)) * yt.to(D64))[:, None] * Xt
    lam = l2 + damping
    M = mean_of_inverses(G.numpy(), lam)
    ref = -(Gt.numpy() @ M @ G.numpy().T)
    inf = uw.Influence(obj, solver=DataInf(), damping=damping, progress=False).fit(train)
    scores = inf.up_loss((Xt, yt))
    np.testing.assert_allclose(scores.values, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    prov = scores.provenance
    assert (
        prov["solver"]["name"] == "datainf"
        and prov["solver_approximates"] == "empirical-fisher-datainf"
    )


def test_datainf_zero_gradient_block_without_damping_is_refused(mlp_data):
    model, X, y, *_ = mlp_data

    class WithDead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.dead = torch.nn.Linear(2, 2).double()  # never called: its gradients are 0

        def forward(self, x):
            return self.net(x)

    obj = uw.Objective(WithDead().eval(), "cross_entropy")
    with pytest.raises(NotPositiveDefiniteError, match="dead"):
        DataInf().prepare(Curvature(obj, uw.Data.from_any((X, y))))


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": "paper"}, "lam"),
        ({"lam": True}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"fisher_residual": "yes"}, "fisher_residual"),
    ],
)
def test_datainf_invalid_settings_name_the_parameter(kwargs, param):
    with pytest.raises(InputError, match=f"'{param}' parameter of DataInf"):
        DataInf(**kwargs)
