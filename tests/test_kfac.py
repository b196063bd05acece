"""K-FAC / EK-FAC (core.layers, core.kfac, solvers.kfac) and K-FAC-preconditioned CG, against
mathematics: explicit float64 Hessians and Gauss–Newton matrices built here with autograd
(never with upweight's HVP code), unfolded conv patches against explicit slicing, and the
Kronecker identity where it holds exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import upweight as uw
from reference import (
    ce,
    explicit_ggn_ce,
    explicit_H,
    loop_grads,
    rel,
    sq,
)
from upweight.core.curvature import Curvature
from upweight.core.kfac import fit_factors
from upweight.core.layers import capture, find_layers
from upweight.errors import InputError, NotPositiveDefiniteError, UnsupportedModelError
from upweight.solvers.cg import CG
from upweight.solvers.kfac import EKFAC, KFAC

D64 = torch.float64


# ── independent references ───────────────────────────────────────────────────────────────
class TanhMLP(torch.nn.Module):
    def __init__(self, d_in: int = 4, hidden: int = 5, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class NormMLP(torch.nn.Module):
    """Linear → bias-free LayerNorm → tanh → Linear → × a bare learned scale per class."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(d_out))
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.ln = torch.nn.LayerNorm(hidden, bias=False)
        self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x)))) * self.scale


# ── (1) exactness where S ⊗ A is the Gauss–Newton block ──────────────────────────────────
def _linear_squared():
    """Squared loss of a linear model: G = H_loss = I ⊗ (1/n)Σ ããᵀ exactly (constant output
    Hessian)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=D64) * torch.tensor(
        [3.0, 1.0, 0.3, 0.1, 2.0], dtype=D64
    )
    Y = torch.randn(40, 3, generator=g, dtype=D64)
    model = torch.nn.Linear(5, 3).double().eval()
    return model, "squared", sq, X, Y


def _softmax_shared_probs():
    """Cross-entropy with W = 0: every point has the same softmax p, so the output Hessian
    diag(p) − ppᵀ is constant and G = (diag(p) − ppᵀ) ⊗ (1/n)Σ ããᵀ exactly."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=g, dtype=D64)
    y = torch.randint(0, 3, (30,), generator=g)
    model = torch.nn.Linear(4, 3).double().eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.5, -1.0, 0.2]))
    return model, "cross_entropy", ce, X, y


def _softmax_one_point():
    """Cross-entropy on a single point: the sums have one term, so G = S ⊗ A."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(1, 4, generator=g, dtype=D64)
    model = torch.nn.Linear(4, 3).double().eval()
    return model, "cross_entropy", ce, X, torch.tensor([2])


@pytest.mark.parametrize(
    "case",
    [_linear_squared, _softmax_shared_probs, _softmax_one_point],
    ids=["squared", "ce-shared-p", "ce-n1"],
)
@pytest.mark.parametrize("solver_cls", [KFAC, EKFAC])
def test_kfac_equals_explicit_inverse_where_the_kronecker_form_is_exact(case, solver_cls):
    model, loss_name, loss, X, y = case()
    l2, damping = 0.1, 0.01
    H = explicit_H(model, loss, X, y, l2) + damping * torch.eye(
        sum(t.numel() for t in model.parameters()), dtype=D64
    )
    curv = Curvature(
        uw.Objective(model, loss_name, l2=l2), uw.Data.from_any((X, y)), damping=damping
    )
    solver = solver_cls()
    state = solver.prepare(curv)
    V = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(5), dtype=D64)
    sol = solver.solve(state, V)
    assert rel(sol.value, torch.linalg.solve(H, V.T).T) < 1e-8
    assert sol.max_residual < 1e-8  # the measured residual against the true H + δI
    assert state.stats["fallback_size"] == 0 and state.stats["l2_fold"] == "exact"
    assert sol.stats["approximates"] == solver.approximates


@pytest.mark.parametrize(
    "case", [_linear_squared, _softmax_shared_probs], ids=["squared", "ce-shared-p"]
)
@pytest.mark.parametrize("solver_cls", [KFAC, EKFAC])
def test_kfac_solve_of_a_float32_model_is_the_exact_inverse_to_float32_rounding(case, solver_cls):
    """A float32 model's K-FAC solve rotates in float32 (the eigenbases are fitted in float64 and
    cast once): where the Kronecker form is exact it still equals the float64 explicit inverse to
    float32 rounding times the block's condition number (< 1e3 here), and comes back in float32."""
    model, loss_name, loss, X, y = case()
    l2, damping = 0.1, 0.01
    H = explicit_H(model, loss, X, y, l2) + damping * torch.eye(
        sum(t.numel() for t in model.parameters()), dtype=D64
    )
    y32 = y.float() if y.is_floating_point() else y
    curv = Curvature(
        uw.Objective(model.float(), loss_name, l2=l2),
        uw.Data.from_any((X.float(), y32)),
        damping=damping,
    )
    solver = solver_cls()
    V = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(5), dtype=D64)
    sol = solver.solve(solver.prepare(curv), V.float())
    assert sol.value.dtype == torch.float32
    # so float32 rounding bounds the error by ~1e-4; it is ~1e-7
    assert float(torch.linalg.cond(H)) < 1e3
    assert rel(sol.value.double(), torch.linalg.solve(H, V.T).T) < 1e-5


def test_extra_kfac_damping_is_added_to_every_eigenvalue():
    model, loss_name, loss, X, y = _linear_squared()
    H = explicit_H(model, loss, X, y, 0.1)
    curv = Curvature(uw.Objective(model, loss_name, l2=0.1), uw.Data.from_any((X, y)))
    solver = KFAC(damping=0.5)
    V = torch.randn(2, curv.p, generator=torch.Generator().manual_seed(6), dtype=D64)
    sol = solver.solve(solver.prepare(curv), V)
    assert rel(sol.value, torch.linalg.solve(H + 0.5 * torch.eye(curv.p, dtype=D64), V.T).T) < 1e-8
    # measured against H (damping 0), which the extra damping perturbs
    assert sol.max_residual > 1e-3


# ── (2) EK-FAC's correction is the GGN's diagonal in the Kronecker basis ─────────────────
@pytest.fixture(scope="module")
def mlp_ggn():
    torch.manual_seed(0)
    model = TanhMLP().double().eval()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 4, generator=g, dtype=D64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, X, y, explicit_ggn_ce(model, X)


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kfac_basis(mlp_ggn):
    model, X, y, G = mlp_ggn
    obj = uw.Objective(model, "cross_entropy")
    plan = find_layers(obj)
    factors, fit = fit_factors(obj, uw.Data.from_any((X, y)), plan.blocks, eigen_correction=True)
    assert fit.passes == 2 and len(factors) == 2
    for f in factors:
        idx = f.block.index.reshape(-1)
        Gb = G[idx][:, idx]
        B = torch.kron(f.Q_S, f.Q_A)
        assert torch.allclose(
            f.corrected.reshape(-1), torch.diagonal(B.T @ Gb @ B), rtol=1e-9, atol=1e-12
        )
        # EK-FAC is the Frobenius projection onto matrices with this eigenbasis, K-FAC one of them
        err_ekfac = float((B @ torch.diag(f.corrected.reshape(-1)) @ B.T - Gb).norm())
        err_kfac = float((torch.kron(f.S, f.A) - Gb).norm())
        assert err_ekfac < err_kfac
        # and K-FAC's eigenvalues in that basis are σ ⊗ α
        assert torch.allclose(
            torch.diagonal(B.T @ torch.kron(f.S, f.A) @ B),
            (f.eig_S[:, None] * f.eig_A).reshape(-1),
            atol=1e-12,
        )


def test_ekfac_is_closer_to_the_ggn_than_kfac_as_an_operator(mlp_ggn):
    """On the whole factored part: ‖M − G_blocks‖_F for the solvers' own inverses (M =
    inverse⁻¹)."""
    model, X, y, G = mlp_ggn
    l2 = 0.05
    curv = Curvature(
        uw.Objective(model, "cross_entropy", l2=l2), uw.Data.from_any((X, y)), dtype=D64
    )
    eye = torch.eye(curv.p, dtype=D64)
    errs = {}
    for solver in (KFAC(), EKFAC()):
        st = solver.prepare(curv)
        Minv = solver.apply_blocks(st, eye)  # block-diagonal: the whole θ is in fc1, fc2
        mask = torch.block_diag(
            *[torch.ones(f.block.size, f.block.size, dtype=D64) for f in st.factors]
        )
        errs[solver.name] = float(((torch.linalg.inv(Minv) - l2 * eye) - G * mask).norm())
    assert errs["ekfac"] < errs["kfac"]


# ── (3) K-FAC-preconditioned CG: exact answers in fewer iterations ───────────────────────
class ShiftMLP(torch.nn.Module):
    """Linear (no bias) → + a bare learned shift → tanh → Linear."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden, bias=False)
        self.shift = torch.nn.Parameter(torch.zeros(hidden))
        self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) + self.shift))


def teacher_problem(model: torch.nn.Module, l2: float, delta: float, seed: int = 0):
    """Badly scaled inputs (scales 10⁻² … 10) and the model's own outputs as squared-loss targets:
    every residual is 0, so H = G + l2·I exactly (no second-derivative term) and H + δI is PD.

    Returns (model, X, Y, l2, δ, H + δI explicit)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(100, 6, generator=g, dtype=D64) * torch.logspace(-2, 1, 6, dtype=D64)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name in ("shift", "scale"):
                prm.copy_(
                    torch.randn(prm.shape, generator=g, dtype=D64)
                    + (1.0 if name == "scale" else 0.0)
                )
        Y = model(X)
    H = explicit_H(model, sq, X, Y, l2) + delta * torch.eye(
        sum(t.numel() for t in model.parameters()), dtype=D64
    )
    assert float(torch.linalg.eigvalsh(H)[0]) > 0
    return model, X, Y, l2, delta, H


@pytest.fixture(scope="module")
def shift_mlp():
    torch.manual_seed(0)
    return teacher_problem(ShiftMLP().double().eval(), 1e-4, 1e-4)


@pytest.fixture(scope="module")
def norm_mlp():
    torch.manual_seed(1)
    return teacher_problem(NormMLP().double().eval(), 1e-3, 1e-3, seed=1)


def _curv(problem, **kw) -> Curvature:
    model, X, Y, l2, delta, _ = problem
    return Curvature(
        uw.Objective(model, "squared", l2=l2, **kw), uw.Data.from_any((X, Y)), damping=delta
    )


def test_kfac_preconditioned_cg_reaches_direct_in_half_the_iterations(shift_mlp):
    H = shift_mlp[-1]
    curv = _curv(shift_mlp)
    V = torch.randn(4, curv.p, generator=torch.Generator().manual_seed(7), dtype=D64)
    exact = torch.linalg.solve(H, V.T).T
    plain = CG(rtol=1e-10, maxiter=2000)
    sol_cg = plain.solve(plain.prepare(curv), V)
    assert bool(sol_cg.converged.all()) and rel(sol_cg.value, exact) < 1e-8
    for pre in (KFAC(), EKFAC()):
        pcg = CG(rtol=1e-10, preconditioner=pre)
        sol = pcg.solve(pcg.prepare(curv), V)
        assert rel(sol.value, exact) < 1e-8
        assert sol.max_residual < 1e-9 and bool(sol.converged.all())
        assert sol.iterations <= sol_cg.iterations // 2, (sol.iterations, sol_cg.iterations)
        assert sol.stats["preconditioner_fallback_params"] == ("shift",)
        assert "dense Cholesky" in sol.stats["preconditioner_fallback_preconditioner"]
        assert "Gauss–Newton" in sol.stats["preconditioner_curvature_approximated"]


def test_preconditioned_cg_with_layernorm_and_a_bare_scale_is_exact(norm_mlp):
    H = norm_mlp[-1]
    curv = _curv(norm_mlp)
    V = torch.randn(2, curv.p, generator=torch.Generator().manual_seed(8), dtype=D64)
    pcg = CG(rtol=1e-10, preconditioner=EKFAC())
    sol = pcg.solve(pcg.prepare(curv), V)
    assert rel(sol.value, torch.linalg.solve(H, V.T).T) < 1e-8
    # a parameter of the model itself
    assert sol.stats["preconditioner_fallback_params"] == ("scale",)
    assert sol.stats["preconditioner_local_blocks"] == ("ln (dense 8: exact GGN block)",)


def test_non_factorable_parameters_are_solved_exactly_not_dropped(norm_mlp):
    """KFAC alone, without module-local blocks: on the LayerNorm weight and the bare scale,
    x_f = H_ff⁻¹v_f (exact restricted Hessian)."""
    H = norm_mlp[-1]
    curv = _curv(norm_mlp)
    solver = KFAC(fallback_rtol=1e-12, max_local=0)
    state = solver.prepare(curv)
    f_idx = state.plan.other_index
    assert len(f_idx) == 3 + 8 and state.stats["fallback_method"].startswith("CG on the exact HVP")
    V = torch.randn(2, curv.p, generator=torch.Generator().manual_seed(8), dtype=D64)
    sol = solver.solve(state, V)
    H_ff = H[f_idx][:, f_idx]
    assert rel(sol.value[:, f_idx], torch.linalg.solve(H_ff, V[:, f_idx].T).T) < 1e-9
    assert sol.stats["fallback_iterations"] > 0
    # the residual is measured against the true H + δI and is that of the approximation
    assert torch.allclose(
        sol.residual, ((sol.value @ H - V).norm(dim=1) / V.norm(dim=1)), rtol=1e-8
    )
    assert float(sol.residual.min()) > 1e-3


def test_one_shot_residual_is_measured_on_evenly_spaced_right_hand_sides(norm_mlp):
    """A block of more than RESIDUAL_SAMPLE right-hand sides: the residual is the true one (against
    the explicit H + δI) on 16 evenly spaced columns and NaN elsewhere; max_residual is their max,
    and self-influence over more points than that still checks and records measured residuals."""
    from upweight.solvers.base import RESIDUAL_SAMPLE

    H = norm_mlp[-1]
    curv = _curv(norm_mlp)
    solver = KFAC()
    state = solver.prepare(curv)
    V = torch.randn(40, curv.p, generator=torch.Generator().manual_seed(9), dtype=D64)
    sol = solver.solve(state, V)
    true = (sol.value @ H - V).norm(dim=1) / V.norm(dim=1)
    measured = ~torch.isnan(sol.residual)
    assert int(measured.sum()) == RESIDUAL_SAMPLE == 16
    assert bool(measured[0]) and bool(measured[-1])  # evenly spaced over the block, ends included
    assert torch.allclose(sol.residual[measured], true[measured], rtol=1e-8)
    assert sol.max_residual == pytest.approx(float(true[measured].max()), rel=1e-8)
    assert sol.stats["residual_measured"] == "16 of 40 right-hand sides (evenly spaced)"
    small = solver.solve(state, V[:5])  # a block of ≤ 16: every residual measured
    assert torch.allclose(
        small.residual, (small.value @ H - V[:5]).norm(dim=1) / V[:5].norm(dim=1), rtol=1e-8
    )
    model, X, Y, l2, delta, _ = norm_mlp
    # nonzero gradients
    Yn = Y + 0.02 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(11), dtype=D64)
    inf = uw.Influence(
        uw.Objective(model, "squared", l2=l2),
        solver=KFAC(),
        damping=delta,
        batch_size=50,
        progress=False,
        grad_tol=1e3,
    ).fit((X, Yn))
    si = inf.self_influence()  # two chunks of 50 training points, 16 residuals measured in each
    assert 1e-3 < si.provenance["residual_max"] < KFAC.default_max_residual


def test_residual_sample_sets_how_many_right_hand_sides_are_checked(norm_mlp):
    """KFAC(residual_sample=4) measures 4 evenly spaced true residuals with one HVP block; 0
    measures none (one HVP block fewer, the same solution), so Influence cannot reject it: its
    provenance says not checked.
    """
    H = norm_mlp[-1]
    curv = _curv(norm_mlp)
    V = torch.randn(40, curv.p, generator=torch.Generator().manual_seed(9), dtype=D64)
    full = KFAC().solve(KFAC().prepare(curv), V)
    four = KFAC(residual_sample=4).solve(KFAC().prepare(curv), V)
    measured = ~torch.isnan(four.residual)
    assert measured.nonzero().flatten().tolist() == [0, 13, 26, 39]
    true = (four.value @ H - V).norm(dim=1) / V.norm(dim=1)
    assert torch.allclose(four.residual[measured], true[measured], rtol=1e-8)
    state = KFAC().prepare(curv)
    hvp_blocks = []
    # the fallback block (LayerNorm, scale) is solved by CG in both
    for solver in (KFAC(), KFAC(residual_sample=0)):
        before = curv.n_matvecs
        none = solver.solve(state, V)
        hvp_blocks.append(curv.n_matvecs - before)
    # the residual check is the one HVP block that 0 skips
    assert hvp_blocks[0] - hvp_blocks[1] == 1
    assert torch.equal(none.value, full.value) and bool(torch.isnan(none.residual).all())
    assert none.max_residual != none.max_residual  # NaN: not measured
    assert (
        none.stats["residual_measured"]
        == "0 of 40 right-hand sides (residual_sample=0: not checked)"
    )
    with pytest.raises(InputError, match="'residual_sample' parameter of EKFAC"):
        EKFAC(residual_sample=-1)
    model, X, Y, l2, delta, _ = norm_mlp
    Yn = Y + 0.02 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(11), dtype=D64)
    obj = uw.Objective(model, "squared", l2=l2)
    # K-FAC's residual here is ≫ 1e-6
    strict = dict(damping=delta, progress=False, grad_tol=1e3, max_residual=1e-6)
    with pytest.raises(uw.errors.InaccurateSolveError):
        uw.Influence(obj, solver=KFAC(), **strict).fit((X, Yn)).up_loss((X[:3], Yn[:3]))
    unchecked = (
        uw.Influence(obj, solver=KFAC(residual_sample=0), **strict)
        .fit((X, Yn))
        .up_loss((X[:3], Yn[:3]))
    )
    prov = unchecked.provenance
    assert prov["accepted"] is None and prov["residual_max"] != prov["residual_max"]
    assert prov["solver"]["residual_sample"] == 0


def test_influence_with_preconditioned_cg_matches_direct(shift_mlp):
    model, X, Y, l2, _, _ = shift_mlp
    # nonzero gradients
    Yn = Y + 0.02 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(10), dtype=D64)
    obj = uw.Objective(model, "squared", l2=l2)
    kw = dict(damping=0.01, progress=False, grad_tol=1e3)
    a = uw.Influence(obj, solver=uw.Direct(), **kw).fit((X, Yn)).up_loss((X[:3], Yn[:3] + 0.1))
    for block in (False, True):
        b = uw.Influence(obj, solver=CG(rtol=1e-10, preconditioner=KFAC(), block=block), **kw).fit(
            (X, Yn)
        )
        scores = b.up_loss((X[:3], Yn[:3] + 0.1))
        assert float(abs(scores.values).max()) > 0
        assert rel(torch.as_tensor(scores.values), torch.as_tensor(a.values)) < 1e-7
        assert scores.provenance["solver_preconditioner"] == "kfac"
    # K-FAC alone: approximate, accepted under its own bound, its residual recorded
    approx = uw.Influence(obj, solver=EKFAC(), **kw).fit((X, Yn)).up_loss((X[:3], Yn[:3] + 0.1))
    assert approx.provenance["max_residual_accepted"] == EKFAC.default_max_residual == 10.0
    assert 0 < approx.provenance["residual_max"] < 10.0
    assert approx.provenance["solver_approximates"] == "ggn-ekfac"


def test_unpenalised_bias_folds_approximately_and_pcg_stays_exact(shift_mlp):
    model, X, Y, l2, delta, _ = shift_mlp
    obj = uw.Objective(model, "squared", l2=l2, l2_exclude=["fc2.bias"])
    H = (
        explicit_H(model, sq, X, Y, 0.0)
        + torch.diag(obj.l2_diagonal(D64))
        + delta * torch.eye(obj.p, dtype=D64)
    )
    curv = Curvature(obj, uw.Data.from_any((X, Y)), damping=delta)
    pcg = CG(rtol=1e-10, preconditioner=KFAC())
    state = pcg.prepare(curv)
    assert state.preconditioner_state.stats["l2_fold"] == "eigenbasis-diagonal on fc2"
    V = torch.randn(2, curv.p, generator=torch.Generator().manual_seed(9), dtype=D64)
    sol = pcg.solve(state, V)
    assert rel(sol.value, torch.linalg.solve(H, V.T).T) < 1e-8


# ── (4) Conv2d: unfolded patches and KFC factors ─────────────────────────────────────────
class TinyConv(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d, flat: int) -> None:
        super().__init__()
        self.conv = conv
        self.head = torch.nn.Linear(flat, 1)

    def rest(self, h):
        return self.head(torch.tanh(h).flatten(1))

    def forward(self, x):
        return self.rest(self.conv(x))


def _explicit_patches(x, conv: torch.nn.Conv2d, bias: bool) -> torch.Tensor:
    """ã of every output pixel by slicing the zero-padded input, (b, T, C·kh·kw [+1])."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    xp = F.pad(x, (pw, pw, ph, ph))
    Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(patch.reshape(len(x), -1))
    a = torch.stack(rows, 1)
    return torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2) if bias else a


@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(kernel_size=3, stride=2, padding=1, bias=True),
        dict(kernel_size=2, stride=1, padding=0, dilation=2, bias=False),
    ],
    ids=["k3s2p1", "k2d2-nobias"],
)
def test_conv2d_factors_from_unfolded_patches_equal_explicit_statistics(conv_kw, monkeypatch):
    import upweight.core.batching as batching

    torch.manual_seed(2)
    conv = torch.nn.Conv2d(2, 3, **conv_kw).double()
    x = torch.randn(7, 2, 6, 6, dtype=D64)
    flat = conv(x).shape[1:].numel()
    model = TinyConv(conv, flat).double().eval()
    # squared loss on one output with target z − 1: ∇_z L = 1 = the output-Hessian factor, so the
    # per-sample loss gradient IS the GGN pseudo-gradient and the explicit statistics can use it
    with torch.no_grad():
        y = model(x) - 1.0
    obj = uw.Objective(model, "squared", params=["conv"])
    plan = find_layers(obj, uw.Data.from_any((x, y)))
    (blk,) = plan.blocks
    assert blk.kind == "conv2d" and plan.other == ()
    bias = conv.bias is not None
    a_ref = _explicit_patches(x, conv, bias)
    T = a_ref.shape[1]
    # (a) captured ã are the patches; Σₜ bₜãₜᵀ is the per-sample gradient of [W | b]
    cap = capture(obj, plan.blocks, uw.Data.from_any((x, y)), cotangents="loss")
    assert torch.allclose(cap.a[blk.name], a_ref, atol=1e-12)
    names = ["conv.weight", "conv.bias"] if bias else ["conv.weight"]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])

    def loss_one(flat, xi, yi):
        params = dict(
            zip(
                names,
                [t.reshape(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)],
            )
        )
        return sq(functional_call(model, params, (xi,)), yi).sum()

    g_ref = loop_grads(loss_one, theta, x, y)  # (n, p) by autograd, per point
    g_cap = torch.einsum("bto,btj->boj", cap.g[blk.name][0], cap.a[blk.name])  # (n, out, cols)
    assert torch.allclose(
        g_cap.reshape(len(x), -1)[:, blk.index.reshape(-1).argsort()], g_ref, atol=1e-12
    )
    # (b) KFC factors: A = (1/n) Σᵢₜ ããᵀ, S = (1/n)(1/T) Σᵢₜ bbᵀ with b = ∂z/∂(conv output)
    h = conv(x).detach().requires_grad_(True)
    (b_ref,) = torch.autograd.grad(model.rest(h).sum(), h)
    b_ref = b_ref.reshape(len(x), 3, -1).transpose(1, 2)  # (n, T, out)
    # the passes capture as many points as keep the largest captured tensor — here max(T·out,
    # T·cols) values per point, K = 1 output-Hessian factor, 8 B each — within the byte budget: set
    # to 2.5 points' worth, 2 per capture
    monkeypatch.setattr(batching, "TENSOR_BYTES", int(2.5 * 8 * T * max(3, a_ref.shape[2])))
    factors, stats = fit_factors(
        obj, uw.Data.from_any((x, y)), plan.blocks, batch_size=512, eigen_correction=True
    )
    assert stats.points_per_capture == 2
    f = factors[0]
    assert f.locations == T > 1
    assert torch.allclose(f.A, torch.einsum("bti,btj->ij", a_ref, a_ref) / len(x), atol=1e-12)
    assert torch.allclose(f.S, torch.einsum("bto,btp->op", b_ref, b_ref) / (len(x) * T), atol=1e-12)
    # (c) EK-FAC: Λ = (1/n) Σᵢ ((Q_S ⊗ Q_A)ᵀ gᵢ)² with gᵢ the explicit per-sample gradients
    G = g_ref[:, blk.index.reshape(-1)]  # into W̃ row-major order
    lam_ref = ((G @ torch.kron(f.Q_S, f.Q_A)) ** 2).mean(0)
    assert torch.allclose(f.corrected.reshape(-1), lam_ref, rtol=1e-10, atol=1e-14)


# ── (5) clear errors ─────────────────────────────────────────────────────────────────────
class OnlyNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.ln = torch.nn.LayerNorm(2)

    def forward(self, x):
        return self.ln(self.fc(x))


def test_errors_name_the_problem():
    for bad in (
        lambda: KFAC(damping=-1.0),
        lambda: EKFAC(damping=float("nan")),
        lambda: KFAC(fallback_rtol=0.0),
    ):
        with pytest.raises(InputError, match="damping|fallback_rtol"):
            bad()
    with pytest.raises(InputError, match="preconditioner"):
        CG(preconditioner=object())
    X, y = torch.randn(10, 3, dtype=D64), torch.randint(0, 2, (10,))
    model = OnlyNorm().double().eval()
    curv = Curvature(uw.Objective(model, "cross_entropy", params="ln"), uw.Data.from_any((X, y)))
    with pytest.raises(UnsupportedModelError, match=r"no factorable layer.*ln\.weight.*CG\(\)"):
        KFAC().prepare(curv)
    # with the weight frozen, the Linear's bias has no Kronecker factors either (only a module-local
    # block)
    curv = Curvature(
        uw.Objective(model, "cross_entropy", params=["fc.bias", "ln"]), uw.Data.from_any((X, y))
    )
    with pytest.raises(UnsupportedModelError, match="fc.bias: module-local"):
        EKFAC().prepare(curv)
    with pytest.raises(
        UnsupportedModelError, match="fc.bias: bias of Linear 'fc' whose weight is not in θ"
    ):
        EKFAC(max_local=0).prepare(curv)


def test_singular_factor_names_a_damping_that_fixes_it():
    X = torch.randn(20, 4, dtype=D64)
    X[:, 2] = 0.0  # a dead input, as MNIST's border pixels
    y = torch.randint(0, 3, (20,))
    model = torch.nn.Linear(4, 3, bias=False).double().eval()
    curv = Curvature(uw.Objective(model, "cross_entropy"), uw.Data.from_any((X, y)))
    with pytest.raises(NotPositiveDefiniteError, match="damping ≥") as info:
        KFAC().prepare(curv)
    fixed = Curvature(
        uw.Objective(model, "cross_entropy"),
        uw.Data.from_any((X, y)),
        damping=info.value.suggested_damping,
    )
    sol = KFAC().solve(KFAC().prepare(fixed), torch.ones(1, 12, dtype=D64))
    assert bool(torch.isfinite(sol.value).all())


def test_shared_layer_goes_to_the_fallback_block_with_its_reason():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    X, y = torch.randn(12, 3, dtype=D64), torch.randint(0, 2, (12,))
    curv = Curvature(
        uw.Objective(Twice().double().eval(), "cross_entropy", l2=0.1), uw.Data.from_any((X, y))
    )
    state = KFAC().prepare(curv)
    assert state.plan.other == ("a.weight", "a.bias")
    assert "called 2 times" in state.stats["fallback_reasons"][0]
    with pytest.raises(UnsupportedModelError, match="prepare_preconditioner"):
        KFAC().precondition(state, torch.ones(1, curv.p, dtype=D64))


def test_tied_weights_go_to_the_fallback_block_and_the_preconditioned_solve_stays_exact():
    torch.manual_seed(0)
    net = (
        torch.nn.Sequential(
            torch.nn.Linear(3, 3),
            torch.nn.Tanh(),
            torch.nn.Linear(3, 3),
            torch.nn.Tanh(),
            torch.nn.Linear(3, 2),
        )
        .double()
        .eval()
    )
    # one parameter used by two layers: no single layer's factors describe it
    net[2].weight = net[0].weight
    X, y = torch.randn(12, 3, dtype=D64), torch.randint(0, 2, (12,))
    curv = Curvature(
        uw.Objective(net, "cross_entropy", l2=0.1), uw.Data.from_any((X, y)), damping=1.0
    )
    pcg = CG(rtol=1e-10, preconditioner=KFAC())
    state = pcg.prepare(curv)
    kstate = state.preconditioner_state
    assert [b.name for b in kstate.plan.blocks] == ["4"]
    assert kstate.plan.other == ("0.weight",)
    assert "tied weights" in kstate.plan.reasons["0.weight"]
    # the biases of the two layers sharing the weight are their modules' own: exact GGN blocks
    assert [(lm.name, lm.params) for lm in kstate.plan.local] == [
        ("0", ("0.bias",)),
        ("2", ("2.bias",)),
    ]
    V = torch.randn(2, curv.p, generator=torch.Generator().manual_seed(3), dtype=D64)
    H = explicit_H(net, ce, X, y, 0.1, damping=1.0)
    assert rel(pcg.solve(state, V).value, torch.linalg.solve(H, V.T).T) < 1e-8


def test_plain_cg_is_unchanged_by_the_preconditioner_option():
    assert CG().config() == {
        "name": "cg",
        "rtol": 1e-6,
        "atol": 0.0,
        "maxiter": None,
        "block": True,
    }
    assert CG(block=False).config()["block"] is False  # kept apart in store fingerprints
    assert "KFAC" in CG(preconditioner=KFAC()).config()["preconditioner"]


def test_factors_from_a_subset_keep_the_preconditioned_solve_exact(shift_mlp):
    """KFAC(max_points=m): statistics from m points; as a preconditioner CG still solves H + δI
    exactly."""
    H = shift_mlp[-1]
    curv = _curv(shift_mlp)
    V = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(8), dtype=D64)
    exact = torch.linalg.solve(H, V.T).T
    n = len(curv.data)
    full = KFAC().prepare(curv)
    for pre in (KFAC(max_points=n // 4), EKFAC(max_points=n // 4, seed=3)):
        state = pre.prepare(curv)
        assert state.stats["fit_points"] == n // 4 and full.stats["fit_points"] == n
        assert not torch.allclose(state.factors[0].A, full.factors[0].A)  # really another sample
        pcg = CG(rtol=1e-10, preconditioner=pre)
        assert rel(pcg.solve(pcg.prepare(curv), V).value, exact) < 1e-8
    assert KFAC(max_points=10 * n).prepare(curv).stats["fit_points"] == n
    for bad in (0, -3, 2.5):
        with pytest.raises(InputError, match="max_points"):
            KFAC(max_points=bad)


def test_factor_eigendecomposition_survives_lapack_failures(monkeypatch):
    """A rank-deficient PSD factor (rank 3 of 6, like the factors of zero-padded convolutions) whose
    eigh fails to converge is decomposed with a tiny shift, then through an SVD; never LAPACK's raw
    error."""
    from upweight.core import kfac as kfac_module
    from upweight.errors import CurvatureError

    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 3, dtype=torch.float64, generator=g)
    M = B @ B.T  # rank 3 of 6, PSD
    real = torch.linalg.eigh
    for fail_first in (1, 2):
        calls = {"n": 0}

        def flaky(A, calls=calls, fail_first=fail_first):
            calls["n"] += 1
            if calls["n"] <= fail_first:
                raise torch.linalg.LinAlgError(
                    "linalg.eigh: The algorithm failed to converge because the input matrix is"
                    " ill-conditioned"
                )
            return real(A)

        monkeypatch.setattr(torch.linalg, "eigh", flaky)
        e, Q = kfac_module.stable_eigh(M, "a test factor")
        monkeypatch.setattr(torch.linalg, "eigh", real)
        torch.testing.assert_close(Q @ torch.diag(e) @ Q.T, M, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(e, real(M)[0], rtol=1e-9, atol=1e-9)
    with pytest.raises(CurvatureError, match="a test factor has NaN"):
        kfac_module.stable_eigh(
            torch.full((2, 2), float("nan"), dtype=torch.float64), "a test factor"
        )


def test_factor_zero_rows_are_eigenvectors_and_only_the_rest_is_decomposed(monkeypatch):
    """A factor with exactly-zero rows and columns (a conv tap that only sees padding, a dead
    unit): eᵢ are its eigenvectors of eigenvalue 0, and LAPACK decomposes only the other block —
    the decomposition still reconstructs M, is orthogonal, and has M's eigenvalues."""
    from upweight.core import kfac as kfac_module

    g = torch.Generator().manual_seed(1)
    B = torch.randn(4, 4, dtype=torch.float64, generator=g)
    live = torch.tensor([1, 3, 4, 7])
    M = torch.zeros(9, 9, dtype=torch.float64)
    M[live[:, None], live] = B @ B.T + 0.1 * torch.eye(4, dtype=torch.float64)
    sizes = []
    real = torch.linalg.eigh

    def spy(A):
        sizes.append(A.shape[0])
        return real(A)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    e, Q = kfac_module.stable_eigh(M, "a padded factor")
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert sizes == [4]
    torch.testing.assert_close(Q @ torch.diag(e) @ Q.T, M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Q.T @ Q, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(e.sort().values, real(M)[0], rtol=1e-10, atol=1e-12)
    dead = torch.tensor([0, 2, 5, 6, 8])
    assert bool((e[dead] == 0).all()) and bool((Q[dead, dead] == 1).all())
    # all rows zero: nothing to decompose
    e0, Q0 = kfac_module.stable_eigh(torch.zeros(3, 3, dtype=torch.float64), "a zero factor")
    assert bool((e0 == 0).all()) and torch.equal(Q0, torch.eye(3, dtype=torch.float64))
    # the rotation by such a Q multiplies the live block only, and equals the dense product
    rot = kfac_module.Rotation.of(Q)
    assert rot.live is not None and rot.live.tolist() == live.tolist() and rot.Q.shape == (4, 4)
    Y = torch.randn(2, 3, 9, dtype=torch.float64, generator=g)
    torch.testing.assert_close(rot(Y), Y @ Q, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rot(Y, transpose=True), Y @ Q.T, rtol=1e-13, atol=1e-13)
    dense = kfac_module.Rotation.of(real(M[live[:, None], live])[1])
    assert dense.live is None
