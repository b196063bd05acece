"""K-FAC / EK-FAC factors of ``nn.Embedding`` layers (core.layers, core.kfac, solvers.kfac), against
mathematics: one-hot statistics, per-sample gradients and output Jacobians built here with plain
autograd, explicit float64 Hessians and Gauss–Newton matrices — never upweight's own HVP code.

An embedding E (V × d) is a bias-free Linear on one-hot token vectors with W = Eᵀ, so its block is
laid out as Eᵀ, its activation factor is A = diag(token frequencies) and its per-sample gradient
is Σₜ e_{xₜ} bₜᵀ (rows at ``padding_idx`` get none)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

import upweight as uw
from reference import (
    ce,
    explicit_ggn_ce,
    explicit_H,
    flat_fns,
    loop_grads,
    rel,
    sq,
)
from upweight._executor import LocalExecutor
from upweight.core.curvature import Curvature
from upweight.core.kfac import fit_factors
from upweight.core.layers import DEFAULT_MAX_VOCAB, capture, find_layers
from upweight.core.structured import (
    _embedding_block_scores,
    _embedding_table,
    linear_output_layer,
    scoring_plan,
    structured_scores,
)
from upweight.errors import InputError, NotPositiveDefiniteError
from upweight.solvers.cg import CG
from upweight.solvers.kfac import EKFAC, KFAC

D64 = torch.float64


# ── independent references ───────────────────────────────────────────────────────────────
def transposed_index(V: int, d: int, offset: int = 0) -> torch.Tensor:
    """Positions in θ of Eᵀ: entry (j, v) of Eᵀ is E[v, j], at offset + v·d + j (row-major E)."""
    return offset + torch.arange(V)[None, :] * d + torch.arange(d)[:, None]


class EmbMeanLinear(torch.nn.Module):
    """Embedding → tanh → mean over the T token positions → Linear."""

    def __init__(self, V: int = 7, d: int = 3, c: int = 4, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, d, padding_idx=padding_idx)
        self.head = torch.nn.Linear(d, c)

    def rest(self, h):
        return self.head(torch.tanh(h).mean(1))

    def forward(self, x):
        return self.rest(self.emb(x))


def _tokens(n: int, T: int, V: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


# ── (1) factor statistics equal explicit one-hot statistics ──────────────────────────────
def test_embedding_factor_statistics_equal_explicit_one_hot_statistics():
    torch.manual_seed(0)
    V, d, c, T, n, pad = 7, 3, 4, 5, 12, 2
    model = EmbMeanLinear(V, d, c, padding_idx=pad).double().eval()
    X = _tokens(n, T, V, seed=1)
    X[0, :2] = pad  # padding tokens, and repeats within a point
    X[1, :3] = 4
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(2))
    data = uw.Data.from_any((X, y))
    obj = uw.Objective(model, "cross_entropy")
    plan = find_layers(obj, data, embeddings=True)
    emb = next(b for b in plan.blocks if b.kind == "embedding")
    assert (emb.out_dim, emb.in_dim, emb.bias, emb.padding_idx) == (
        d,
        V,
        None,
        pad,
    ) and plan.other == ()
    theta, _ = flat_fns(model)
    assert torch.equal(emb.index, transposed_index(V, d))
    assert torch.equal(theta[emb.index], model.emb.weight.detach().T)  # v[..., index] is Eᵀ

    # (a) captured ã: one-hot tokens, 0 at padding; Σₜ bₜãₜᵀ is the per-sample gradient of Eᵀ
    cap = capture(obj, plan.blocks, data, cotangents="loss")
    onehot = torch.zeros(n, T, V, dtype=D64)
    for i in range(n):
        for t in range(T):
            if int(X[i, t]) != pad:
                onehot[i, t, int(X[i, t])] = 1.0
    assert cap.a["emb"].dtype == D64 and torch.equal(cap.a["emb"], onehot)

    def loss_one(flat, xi, yi):
        return ce(functional_call(model, {"emb.weight": flat.reshape(V, d)}, (xi,)), yi).sum()

    # torch: padding row gets 0
    g_ref = loop_grads(loss_one, model.emb.weight.detach().reshape(-1), X, y)
    assert (
        float(g_ref.reshape(n, V, d)[:, pad].abs().max()) == 0.0 and float(g_ref[0].abs().max()) > 0
    )
    # (n, d, V) = per-sample ∇Eᵀ
    g_cap = torch.einsum("bto,btj->boj", cap.g["emb"][0], cap.a["emb"])
    assert torch.allclose(g_cap, g_ref.reshape(n, V, d).transpose(1, 2), atol=1e-13)

    # (b) A = (1/n) Σᵢₜ ããᵀ = diag(token counts)/n; S = (1/(nT)) Σᵢₜ Jᵢₜᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢₜ,
    # Jᵢₜ = ∂zᵢ/∂(embedding output at t) by jacrev on the rest of the model
    counts = torch.bincount(X.reshape(-1), minlength=V).to(D64)
    counts[pad] = 0.0
    S_ref = torch.zeros(d, d, dtype=D64)
    for i in range(n):
        h = model.emb(X[i : i + 1]).detach()
        J = jacrev(lambda hh: model.rest(hh)[0])(h)[:, 0]  # (c, T, d)
        p = torch.softmax(model(X[i : i + 1])[0], 0).detach()
        Hz = torch.diag(p) - torch.outer(p, p)
        S_ref += torch.einsum("ctj,ce,etk->jk", J, Hz, J)
    S_ref /= n * T
    factors, fit = fit_factors(obj, data, plan.blocks, batch_size=5, eigen_correction=True)
    f = next(f for f in factors if f.block.kind == "embedding")
    assert f.identity_A and f.locations == T and fit.points == n
    assert f.A is None and f.Q_A is None  # nothing V × V is stored
    assert torch.allclose(f.activation(), torch.diag(counts / n), atol=1e-15)
    assert torch.allclose(
        f.activation(), torch.einsum("bti,btj->ij", onehot, onehot) / n, atol=1e-15
    )
    assert torch.allclose(f.S, S_ref, rtol=1e-10, atol=1e-14)
    # the eigendecomposition of the diagonal A is exact
    Q_A = f.activation_basis()
    assert torch.allclose(Q_A @ torch.diag(f.eig_A) @ Q_A.T, f.activation(), atol=1e-15)
    # (c) EK-FAC with padding and repeated tokens: Λ is the explicit GGN's diagonal in the basis
    idx = emb.index.reshape(-1)
    B = f.basis()
    assert torch.allclose(
        f.corrected.reshape(-1),
        torch.diagonal(B.T @ explicit_ggn_ce(model, X)[idx][:, idx] @ B),
        rtol=1e-9,
        atol=1e-13,
    )
    assert float(f.corrected[:, pad].abs().max()) == 0.0


# ── (2) exactness where S ⊗ A is the Gauss–Newton block ──────────────────────────────────
def _emb_shared_probs(padding_idx: int | None):
    """Logits = E[x], one token per point, every row of E equal: every point has the same softmax
    p, so the output Hessian is constant, G = (diag(p) − ppᵀ) ⊗ diag(token frequencies) exactly
    (in the Eᵀ layout), and G = H (the logits are linear in E)."""
    V, C = 6, 4
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, V - 1, (30,), generator=g)  # token V − 1 never occurs: only l2 + δ there
    if padding_idx is not None:
        X[::4] = padding_idx
    y = torch.randint(0, C, (30,), generator=g)
    model = torch.nn.Embedding(V, C, padding_idx=padding_idx).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.5, -1.0, 0.2, 0.3], dtype=D64).expand(V, C))
    return model, X, y


def _emb_one_point(padding_idx: int | None):
    """One point: the sums have one term, so G = S ⊗ A (random E)."""
    torch.manual_seed(4)
    model = torch.nn.Embedding(5, 3).double().eval()
    return model, torch.tensor([2]), torch.tensor([1])


@pytest.mark.parametrize(
    "case,padding_idx",
    [(_emb_shared_probs, None), (_emb_shared_probs, 1), (_emb_one_point, None)],
    ids=["shared-p", "shared-p-padding", "n1"],
)
@pytest.mark.parametrize("solver_cls", [KFAC, EKFAC])
def test_kfac_on_an_embedding_equals_the_explicit_inverse_where_exact(
    case, padding_idx, solver_cls
):
    model, X, y = case(padding_idx)
    l2, damping = 0.1, 0.01
    H = explicit_H(model, ce, X, y, l2, damping)
    curv = Curvature(
        uw.Objective(model, "cross_entropy", l2=l2), uw.Data.from_any((X, y)), damping=damping
    )
    solver = solver_cls()
    state = solver.prepare(curv)
    assert state.stats["fallback_size"] == 0 and state.stats["l2_fold"] == "exact"
    assert state.stats["layers"] == (
        f"<model> (embedding {model.embedding_dim}×{model.num_embeddings})",
    )
    V = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(5), dtype=D64)
    sol = solver.solve(state, V)
    assert rel(sol.value, torch.linalg.solve(H, V.T).T) < 1e-8
    assert sol.max_residual < 1e-8


def test_an_unseen_token_without_l2_or_damping_is_refused_with_a_fix():
    model, X, y = _emb_shared_probs(None)  # token 5 never occurs: A has a zero on its diagonal
    curv = Curvature(uw.Objective(model, "cross_entropy"), uw.Data.from_any((X, y)))
    with pytest.raises(NotPositiveDefiniteError, match="token that never occurs.*damping ≥"):
        KFAC().prepare(curv)


# ── (3) EK-FAC's correction is the GGN's diagonal in the Kronecker basis (T > 1) ─────────
def test_ekfac_embedding_eigenvalues_are_the_ggn_diagonal_in_the_kfac_basis():
    torch.manual_seed(6)
    V, d, c, T, n = 7, 3, 4, 4, 25
    model = EmbMeanLinear(V, d, c).double().eval()
    X = _tokens(n, T, V, seed=7)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(8))
    G = explicit_ggn_ce(model, X)
    obj = uw.Objective(model, "cross_entropy")
    plan = find_layers(obj, uw.Data.from_any((X, y)), embeddings=True)
    factors, fit = fit_factors(
        obj, uw.Data.from_any((X, y)), plan.blocks, batch_size=10, eigen_correction=True
    )
    assert fit.passes == 2 and [f.block.kind for f in factors] == ["embedding", "linear"]
    f = factors[0]
    assert f.locations == T > 1
    idx = transposed_index(V, d).reshape(-1)  # emb.weight is θ's first parameter
    assert torch.equal(f.block.index.reshape(-1), idx)
    Gb = G[idx][:, idx]
    B = f.basis()
    assert torch.allclose(
        f.corrected.reshape(-1), torch.diagonal(B.T @ Gb @ B), rtol=1e-9, atol=1e-13
    )
    assert float(f.corrected.max()) > 1e-3
    # EK-FAC is the Frobenius projection onto matrices with this eigenbasis, K-FAC one of them
    err_ekfac = float((B @ torch.diag(f.corrected.reshape(-1)) @ B.T - Gb).norm())
    assert err_ekfac < float((f.kronecker() - Gb).norm())
    # and the identity basis of A: K-FAC's eigenvalues in the basis are σ ⊗ (token frequencies)
    freq = torch.bincount(X.reshape(-1), minlength=V).to(D64) / n
    assert torch.allclose(
        torch.diagonal(B.T @ f.kronecker() @ B), (f.eig_S[:, None] * freq).reshape(-1), atol=1e-13
    )
    # the same sums as a map-reduce over index partitions (pass 2 ships Q_A = None for the
    # embedding)
    fd, fit_d = fit_factors(
        obj,
        uw.Data.from_any((X, y)),
        plan.blocks,
        batch_size=7,
        eigen_correction=True,
        executor=LocalExecutor(),
    )
    assert "map-reduce" in fit_d.where and fd[0].identity_A
    assert torch.allclose(
        fd[0].corrected.reshape(-1), torch.diagonal(B.T @ Gb @ B), rtol=1e-9, atol=1e-13
    )


# ── (4) K-FAC-preconditioned CG on an embedding model is exact ───────────────────────────
class EmbTanhLinear(torch.nn.Module):
    """Embedding → tanh → flatten the T positions → Linear."""

    def __init__(self, V: int = 8, d: int = 3, T: int = 3, c: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, d)
        self.fc = torch.nn.Linear(T * d, c)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)).flatten(1))


def test_kfac_preconditioned_cg_on_an_embedding_model_is_exact():
    torch.manual_seed(9)
    model = EmbTanhLinear().double().eval()
    X = _tokens(60, 3, 8, seed=10)
    with torch.no_grad():  # the model's own outputs as targets: H = G + l2·I, positive definite
        Y = model(X)
    l2, delta = 1e-3, 1e-3
    H = explicit_H(model, sq, X, Y, l2, delta)
    assert float(torch.linalg.eigvalsh(H)[0]) > 0
    curv = Curvature(uw.Objective(model, "squared", l2=l2), uw.Data.from_any((X, Y)), damping=delta)
    V = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(11), dtype=D64)
    exact = torch.linalg.solve(H, V.T).T
    plain = CG(rtol=1e-10, maxiter=2000)
    sol_cg = plain.solve(plain.prepare(curv), V)
    for pre in (KFAC(), EKFAC()):
        pcg = CG(rtol=1e-10, preconditioner=pre)
        sol = pcg.solve(pcg.prepare(curv), V)
        assert rel(sol.value, exact) < 1e-8
        assert sol.max_residual < 1e-9 and bool(sol.converged.all())
        assert sol.iterations < sol_cg.iterations, (sol.iterations, sol_cg.iterations)
        assert sol.stats["preconditioner_layers"] == ("emb (embedding 3×8)", "fc (linear 2×10)")
        assert sol.stats["preconditioner_fallback_params"] == ()
        assert sol.stats["preconditioner_factored_params"] == curv.p
    # the same through Influence: K-FAC-preconditioned CG gives Direct's scores
    Yn = Y + 0.05 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(12), dtype=D64)
    obj = uw.Objective(model, "squared", l2=l2)
    kw = dict(damping=0.01, progress=False, grad_tol=1e3)
    a = uw.Influence(obj, solver=uw.Direct(), **kw).fit((X, Yn)).up_loss((X[:2], Yn[:2] + 0.1))
    b = (
        uw.Influence(obj, solver=CG(rtol=1e-10, preconditioner=KFAC()), **kw)
        .fit((X, Yn))
        .up_loss((X[:2], Yn[:2] + 0.1))
    )
    assert float(abs(torch.as_tensor(a.values)).max()) > 0
    assert rel(torch.as_tensor(b.values), torch.as_tensor(a.values)) < 1e-7


# ── (5) embeddings that are not factored go to the fallback block, with their reason ─────
class TwoEmbeddings(torch.nn.Module):
    def __init__(self, emb2: torch.nn.Embedding) -> None:
        super().__init__()
        self.small = torch.nn.Embedding(4, 2)
        self.other = emb2
        self.fc = torch.nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.small(x[:, 0] % 4) + self.other(x[:, 1])))


@pytest.mark.parametrize(
    "emb2,why",
    [
        (dict(num_embeddings=11, embedding_dim=2), "vocabulary of 11 > max_vocab=10"),
        (dict(num_embeddings=5, embedding_dim=2, max_norm=1.0), "max_norm=1"),
        (
            dict(num_embeddings=5, embedding_dim=2, scale_grad_by_freq=True),
            "scale_grad_by_freq=True",
        ),
        (dict(num_embeddings=5, embedding_dim=2, sparse=True), "sparse=True"),
    ],
    ids=["over-cap", "max_norm", "scale_grad_by_freq", "sparse"],
)
def test_unfactorable_embeddings_land_in_the_fallback_block_with_their_reason(emb2, why):
    torch.manual_seed(13)
    model = TwoEmbeddings(torch.nn.Embedding(**emb2)).double().eval()
    X = torch.stack([_tokens(20, 1, 4, 14)[:, 0], _tokens(20, 1, 5, 15)[:, 0]], 1)
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(16))
    curv = Curvature(
        uw.Objective(model, "cross_entropy", l2=0.1), uw.Data.from_any((X, y)), damping=0.01
    )
    state = KFAC(max_vocab=10).prepare(curv)
    assert state.plan.other == ("other.weight",)
    assert state.stats["layers"] == ("small (embedding 2×4)", "fc (linear 3×3)")
    (reason,) = state.stats["fallback_reasons"]
    assert reason.startswith("other.weight: Embedding 'other'") and why in reason, reason
    assert state.stats["fallback_size"] == emb2["num_embeddings"] * 2


def test_vocab_cap_default_tied_weights_and_bad_settings():
    # no cap: A is V token counts, nothing V × V
    assert KFAC().max_vocab is DEFAULT_MAX_VOCAB is None
    big = torch.nn.Sequential(
        torch.nn.Embedding(5000, 1), torch.nn.Flatten(), torch.nn.Linear(1, 2)
    )
    obj = uw.Objective(big.double().eval(), "cross_entropy")
    assert [b.name for b in find_layers(obj, embeddings=True).blocks] == ["0", "2"]
    plan = find_layers(obj, embeddings=True, max_vocab=4096)
    assert plan.other == ("0.weight",) and "5000 > max_vocab=4096" in plan.reasons["0.weight"]
    assert [b.name for b in plan.blocks] == ["2"]

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.dec = torch.nn.Linear(3, 5, bias=False)
            self.dec.weight = self.emb.weight  # the usual language-model weight tying

        def forward(self, x):
            return self.dec(torch.tanh(self.emb(x)))

    plan = find_layers(uw.Objective(Tied().double().eval(), "cross_entropy"), embeddings=True)
    assert plan.blocks == () and plan.other == ("emb.weight",)
    assert (
        "tied weights" in plan.reasons["emb.weight"] and "dec.weight" in plan.reasons["emb.weight"]
    )
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError, match="max_vocab"):
            KFAC(max_vocab=bad)


# ── the other consumers of find_layers ───────────────────────────────────────────────────
def test_structured_scoring_gathers_embedding_columns_and_the_hvp_leaves_them_out():
    """Structured scoring factors embeddings (one-hot ã, scored by gathering the query's columns at
    the tokens): sⱼᵀ∇θL(zᵢ) against an autograd loop, padding tokens included, and I_up,loss equal
    to the generic path's; the structured HVP (linear heads only) still sees an embedding as a
    generic parameter.
    """
    torch.manual_seed(17)
    V, d, c, T, n = 6, 2, 3, 3, 8
    model = EmbMeanLinear(V, d, c, padding_idx=0).double().eval()
    X = _tokens(n, T, V, seed=18)
    assert bool((X == 0).any())  # some padding tokens, which get no gradient
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(19))
    data = uw.Data.from_any((X, y))
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    plan, why = scoring_plan(obj, data)
    assert (
        [b.kind for b in plan.blocks] == ["embedding", "linear"]
        and plan.other == ()
        and why is None
    )
    S = torch.randn(4, obj.p, generator=torch.Generator().manual_seed(20), dtype=D64)
    theta, unflat = flat_fns(model)
    G = loop_grads(
        lambda f, xi, yi: ce(functional_call(model, unflat(f), (xi,)), yi).sum(), theta, X, y
    )
    assert torch.allclose(structured_scores(obj, plan, data, S), S @ G.T, rtol=1e-10, atol=1e-12)
    # the gather at the token ids equals the dense product with the one-hots, query by query
    blk = plan.blocks[0]
    hot = capture(obj, [blk], data, cotangents="loss")
    ids = capture(obj, [blk], data, cotangents="loss", token_ids=True)
    assert ids.a[blk.name].shape == (n, T) and int((ids.a[blk.name] == -1).sum()) == int(
        (X == 0).sum()
    )
    dense = torch.einsum("btv,kdv,btd->kb", hot.a[blk.name], S[:, blk.index], hot.g[blk.name][0])
    got = _embedding_block_scores(
        _embedding_table(S[:, blk.index]), ids.a[blk.name], ids.g[blk.name][0]
    )
    assert torch.allclose(got, dense, rtol=1e-12, atol=1e-14)
    kw = dict(solver=uw.Direct(), damping=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        on = uw.Influence(obj, **kw).fit(data)
        off = uw.Influence(obj, structured=False, **kw).fit(data)
    assert on.scoring_ == "structured" and off.scoring_ == "generic"
    a, b = on.up_loss((X[:3], y[:3])).values, off.up_loss((X[:3], y[:3])).values
    assert float(np.abs(b).max()) > 0
    assert np.abs(a - b).max() <= 1e-10 * np.abs(b).max()

    emb_only = uw.Objective(torch.nn.Embedding(V, c).double().eval(), "cross_entropy")
    blk, reason = linear_output_layer(emb_only, uw.Data.from_any((X[:, 0], y)))
    assert blk is None and "other parameters: ['weight']" in reason


def test_structured_scoring_has_no_vocabulary_cap():
    """Scoring gathers at token ids, so even a vocabulary above a K-FAC cap someone set is scored
    structurally — exactly (against an autograd loop)."""
    torch.manual_seed(23)
    V = 5000
    model = EmbMeanLinear(V, 2, 3, padding_idx=0).double().eval()
    X = _tokens(6, 4, V, seed=24)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(25))
    data = uw.Data.from_any((X, y))
    obj = uw.Objective(model, "cross_entropy")
    plan, why = scoring_plan(obj, data)
    assert why is None and [b.kind for b in plan.blocks] == ["embedding", "linear"]
    assert (
        "max_vocab" in find_layers(obj, data, embeddings=True, max_vocab=4096).reasons["emb.weight"]
    )
    S = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(26), dtype=D64)
    theta, unflat = flat_fns(model)
    G = loop_grads(
        lambda f, xi, yi: ce(functional_call(model, unflat(f), (xi,)), yi).sum(), theta, X, y
    )
    assert torch.allclose(structured_scores(obj, plan, data, S), S @ G.T, rtol=1e-10, atol=1e-12)
