"""Lanczos spectrum estimates, the spectrum-configured LiSSA and the Auto solver, against
explicit Hessians (closed form or double backward) and ``torch.linalg.eigvalsh`` / ``solve``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import fit_linear
from upweight.core.curvature import Curvature
from upweight.errors import DivergenceError, InputError, NotPositiveDefiniteError
from upweight.solvers import Auto, Direct, estimate_spectrum, lanczos, lissa_from_spectrum
from upweight.solvers.auto import DENSE_BYTES_PER_ENTRY, DENSE_P_CAP, dense_p_limit


def logistic_hessian(model: torch.nn.Linear, X: torch.Tensor, l2: float) -> torch.Tensor:
    """H = (1/n) Σ σ(θᵀxᵢ)σ(−θᵀxᵢ) xᵢxᵢᵀ + l2·I for the bias-free logistic model (closed form)."""
    s = X @ model.weight.detach().reshape(-1)
    return (X * (torch.sigmoid(s) * torch.sigmoid(-s))[:, None]).T @ X / len(X) + l2 * torch.eye(
        X.shape[1], dtype=X.dtype
    )


@pytest.fixture(scope="module")
def logreg(small_logreg):
    """small_logreg (p = 49, n = 400) with its Curvature and closed-form Hessian."""
    model, l2, train, test = small_logreg
    obj = uw.Objective(model, "logistic", l2=l2)
    curv = Curvature(obj, uw.Data.from_any(train))
    return obj, curv, logistic_hessian(model, train[0], l2), train, test


@pytest.fixture(scope="module")
def logreg_784(mnist_1v7):
    """Logistic regression on 1 000 full-resolution 1-vs-7 images: p = 784, κ ≈ 140."""
    d = mnist_1v7
    X = torch.tensor(d.x_train[:1000].reshape(1000, -1), dtype=torch.float64)
    y = torch.tensor(d.y_train[:1000])
    l2 = 1e-3
    model = fit_linear(X, y, "logistic", l2, gtol=1e-8)
    return uw.Objective(model, "logistic", l2=l2), X, y, logistic_hessian(model, X, l2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ── Lanczos ──────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_lanczos_extremes_match_eigvalsh_on_real_logistic_hessian(logreg_784, damping):
    obj, X, y, H = logreg_784
    curv = Curvature(obj, uw.Data.from_any((X, y)), damping=damping)
    ev = torch.linalg.eigvalsh(H + damping * torch.eye(len(H), dtype=H.dtype))
    lo, hi = float(ev[0]), float(ev[-1])
    spec = estimate_spectrum(curv, k=30)
    assert spec.iterations == 30 and not spec.exact
    # 30 full-data HVPs on p = 784: the extreme Ritz values are within a few per cent (measured:
    # λmax to 1e-15, λmin to 4e-4 relative) — and on the right side (Ritz values are interior)
    assert abs(spec.lambda_max / hi - 1) < 0.01
    assert abs(spec.lambda_min / lo - 1) < 0.03
    assert lo - 1e-12 <= spec.lambda_min and spec.lambda_max <= hi + 1e-12
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in spec.ritz_values)
    # the a-posteriori residual really bounds the distance to the nearest eigenvalue
    assert float((ev - spec.lambda_min).abs().min()) <= spec.residual_min + 1e-12
    assert spec.condition_number == pytest.approx(spec.lambda_max / spec.lambda_min)


def test_lanczos_finds_the_negative_eigenvalue_of_an_untrained_mlp(untrained_mlp):
    model, X, y, H = untrained_mlp
    ev = torch.linalg.eigvalsh(H)
    curv = Curvature(uw.Objective(model, "cross_entropy"), uw.Data.from_any((X, y)))
    spec = estimate_spectrum(curv, k=30)
    assert spec.lambda_min < 0 and not spec.positive_definite
    assert abs(spec.lambda_min / float(ev[0]) - 1) < 0.02
    assert abs(spec.lambda_max / float(ev[-1]) - 1) < 0.02
    assert spec.condition_number == math.inf
    # the suggested damping makes H + δI positive definite, with the promised margin
    fix = spec.needed_damping(0.0)
    assert float(torch.linalg.eigvalsh(H + fix * torch.eye(len(H), dtype=H.dtype))[0]) >= 0.4 * abs(
        float(ev[0])
    )


def test_lanczos_on_a_matrix_with_known_spectrum_is_exact_at_k_equal_p():
    eig = torch.linspace(-2.0, 7.0, 40, dtype=torch.float64)
    Qm, _ = torch.linalg.qr(
        torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    A = Qm @ torch.diag(eig) @ Qm.T
    full = lanczos(lambda v: A @ v, 40, k=100)  # capped at p = 40 steps
    assert full.exact and full.iterations == 40
    np.testing.assert_allclose(full.ritz_values, eig.numpy(), atol=1e-9)
    short = lanczos(lambda v: A @ v, 40, k=15)
    # extremes converge first
    assert -2.0 <= short.lambda_min < -1.5 and 6.5 < short.lambda_max <= 7.0


def test_subsample_spectrum_estimates_the_full_one(logreg_784):
    obj, X, y, H = logreg_784
    curv = Curvature(obj, uw.Data.from_any((X, y)))
    spec = estimate_spectrum(curv, k=20, sample=500)
    assert "500-point subsample" in spec.source
    assert abs(spec.lambda_max / float(torch.linalg.eigvalsh(H)[-1]) - 1) < 0.3


# ── LiSSA configured from the spectrum ───────────────────────────────────────────────
def test_spectrum_lissa_converges_where_a_guessed_scale_diverges(logreg):
    obj, curv, H, _, _ = logreg
    lmax, lmin = (float(e) for e in torch.linalg.eigvalsh(H)[[-1, 0]])
    V = torch.randn(3, curv.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.solve(H, V.T).T
    guessed = uw.LiSSA(scale=lmax / 4, depth=200, repeats=1, progress=False)  # needs scale > λmax/2
    with pytest.raises(DivergenceError, match="diverged"):
        guessed.solve(guessed.prepare(curv), V)
    lissa = lissa_from_spectrum(curv, progress=False)
    assert lissa.scale >= 1.1 * lmax * (1 - 1e-9)  # 1.1 × (at least) the Lanczos λmax
    # depth from the Lanczos κ: (1 − λmin/s)^t ≤ 0.01
    assert (1 - lmin / lissa.scale) ** lissa.depth <= 0.0105
    sol = lissa.solve(lissa.prepare(curv), V)
    assert rel(sol.value, ref) < 0.1  # measured 0.009


def test_lissa_from_spectrum_refuses_an_indefinite_hessian_and_names_damping(untrained_mlp):
    model, X, y, H = untrained_mlp
    curv = Curvature(uw.Objective(model, "cross_entropy"), uw.Data.from_any((X, y)))
    with pytest.raises(NotPositiveDefiniteError, match="damping") as info:
        lissa_from_spectrum(curv, progress=False)
    assert info.value.suggested_damping > -float(torch.linalg.eigvalsh(H)[0])


# ── Auto ─────────────────────────────────────────────────────────────────────────────
def test_auto_picks_direct_for_small_p_and_says_why(logreg):
    obj, curv, H, _, _ = logreg
    state = Auto().prepare(curv)
    assert state.chosen == "direct" and state.default_max_residual == Direct.default_max_residual
    assert state.reason.startswith(f"p = 49 ≤ max_dense_p = {Auto().dense_limit()[0]}")
    V = torch.randn(4, curv.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sol = Auto().solve(state, V)
    assert rel(sol.value, torch.linalg.solve(H, V.T).T) < 1e-10
    assert sol.stats["chosen"] == "direct" and sol.stats["reason"] == state.reason
    # the spectrum comes free from Lanczos on the dense matrix, and is right
    ev = torch.linalg.eigvalsh(H)
    assert sol.stats["spectrum_lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-8)
    assert sol.stats["spectrum_lambda_min"] == pytest.approx(float(ev[0]), rel=1e-3)


def test_auto_picks_cg_above_the_threshold_and_matches_direct(logreg):
    obj, curv, H, _, _ = logreg
    state = Auto(max_dense_p=10, rtol=1e-9).prepare(curv)
    assert state.chosen == "cg"
    assert state.reason.startswith(
        "p = 49 > max_dense_p = 10 (set by the caller) and n = 400 ≤ cg_max_n"
    )
    V = torch.randn(4, curv.p, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sol = Auto(max_dense_p=10, rtol=1e-9).solve(state, V)
    d = Direct()
    assert rel(sol.value, d.solve(d.prepare(curv), V).value) < 1e-6
    assert 0 < sol.iterations <= sol.stats["expected_iterations"]
    assert sol.stats["spectrum_lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6
    )
    # p exactly at the threshold is still Direct
    assert Auto(max_dense_p=49).prepare(curv).chosen == "direct"


def test_auto_picks_spectrum_lissa_above_cg_max_n(logreg):
    obj, curv, H, _, _ = logreg
    state = Auto(max_dense_p=0, cg_max_n=100, progress=False).prepare(curv)
    assert state.chosen == "lissa" and state.default_max_residual == uw.LiSSA.default_max_residual
    assert "n = 400 > cg_max_n = 100" in state.reason and "scale = " in state.reason
    assert state.solver.scale > float(torch.linalg.eigvalsh(H)[-1])
    V = torch.randn(2, curv.p, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sol = Auto().solve(state, V)
    assert rel(sol.value, torch.linalg.solve(H, V.T).T) < 0.1
    # n < 4096
    assert (
        sol.stats["scale"] == state.solver.scale and "subsample" not in sol.stats["spectrum_source"]
    )


def test_dense_limit_is_what_fits_in_the_memory_fraction():
    for mem in (2**30, 5 * 2**30):
        p = dense_p_limit(0.25, memory=mem)
        assert (
            DENSE_BYTES_PER_ENTRY * p**2 <= 0.25 * mem < DENSE_BYTES_PER_ENTRY * (p + 1) ** 2
            or p == DENSE_P_CAP
        )
    assert dense_p_limit(0.25, memory=2**30) == 2896  # ⌊√(2²⁸ / 32)⌋
    assert dense_p_limit(1.0, memory=2**40) == DENSE_P_CAP
    limit, why = Auto().dense_limit()
    assert 0 < limit <= DENSE_P_CAP and "available memory" in why


def test_auto_cg_path_refuses_an_indefinite_hessian_before_any_solve(untrained_mlp):
    model, X, y, H = untrained_mlp
    lmin = float(torch.linalg.eigvalsh(H)[0])
    inf = uw.Influence(
        uw.Objective(model, "cross_entropy"),
        solver=Auto(max_dense_p=0),
        progress=False,
        grad_tol=1e3,
    )
    with pytest.raises(NotPositiveDefiniteError, match=r"Lanczos.*damping") as info:
        inf.fit((X, y))
    assert info.value.min_eigenvalue == pytest.approx(lmin, rel=0.02)
    assert info.value.suggested_damping > -lmin


@pytest.mark.parametrize("max_dense_p", [None, 0], ids=["direct", "cg"])
def test_auto_can_apply_the_damping_it_needs_and_records_it(untrained_mlp, max_dense_p):
    model, X, y, H = untrained_mlp
    curv = Curvature(uw.Objective(model, "cross_entropy"), uw.Data.from_any((X, y)))
    auto = Auto(max_dense_p=max_dense_p, on_indefinite="damp", rtol=1e-10)
    state = auto.prepare(curv)
    delta = state.damping
    Hd = H + delta * torch.eye(len(H), dtype=H.dtype)
    assert delta > -float(torch.linalg.eigvalsh(H)[0]) and float(torch.linalg.eigvalsh(Hd)[0]) > 0
    assert "damping was raised from 0 to" in state.reason
    V = torch.randn(2, len(H), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sol = auto.solve(state, V)
    assert rel(sol.value, torch.linalg.solve(Hd, V.T).T) < 1e-6
    assert sol.stats["damping_used"] == delta and sol.stats["spectrum_lambda_min"] > 0


def test_auto_reason_and_spectrum_reach_the_result_provenance(logreg):
    obj, curv, H, train, test = logreg
    res = (
        uw.Influence(obj, solver=Auto(), progress=False)
        .fit(train)
        .up_loss((test[0][:3], test[1][:3]))
    )
    prov = res.provenance
    assert prov["solver"]["name"] == "auto"
    assert prov["solver_chosen"] == "direct" and prov["solver_reason"].startswith(
        "p = 49 ≤ max_dense_p"
    )
    assert prov["solver_spectrum_lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8
    )
    assert {
        "solver_spectrum_lambda_min",
        "solver_spectrum_condition_number",
        "solver_damping_used",
    } <= set(prov)
    ref = (
        uw.Influence(obj, solver=Direct(), progress=False)
        .fit(train)
        .up_loss((test[0][:3], test[1][:3]))
    )
    np.testing.assert_allclose(res.values, ref.values, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_dense_p": -1}, "max_dense_p"),
        ({"max_dense_p": 2.5}, "max_dense_p"),
        ({"memory_fraction": 0.0}, "memory_fraction"),
        ({"memory_fraction": 1.5}, "memory_fraction"),
        ({"cg_max_n": -3}, "cg_max_n"),
        ({"rtol": 0.0}, "rtol"),
        ({"lanczos_steps": 1}, "lanczos_steps"),
        ({"spectrum_sample": 0}, "spectrum_sample"),
        ({"on_indefinite": "ignore"}, "on_indefinite"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_auto_settings_name_the_parameter(kwargs, name):
    with pytest.raises(InputError, match=f"'{name}' parameter of Auto"):
        Auto(**kwargs)


def test_invalid_spectrum_settings_name_the_parameter(logreg):
    curv = logreg[1]
    with pytest.raises(InputError, match="'k' parameter of lanczos"):
        lanczos(curv.matvec, curv.p, k=0)
    with pytest.raises(InputError, match="'sample' parameter"):
        estimate_spectrum(curv, sample=0)
    with pytest.raises(InputError, match="'tol' parameter"):
        lissa_from_spectrum(curv, tol=1.0)
    with pytest.raises(InputError, match="scale"):
        lissa_from_spectrum(curv, scale=1.0)
