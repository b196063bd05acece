"""Gauss–Newton curvature: G = (1/n) Σᵢ Jᵢᵀ ∇²_z L(zᵢ) Jᵢ + l2·I against explicit float64 Jacobians
and output Hessians, influence with it against an explicit solve, and its identity in provenance and
stores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.core.curvature import Curvature
from upweight.errors import NotPositiveDefiniteError, StoreMismatchError


def _mlp(d_in=4, hidden=5, out=3, seed=0):
    torch.manual_seed(seed)
    return (
        torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, out)
        )
        .double()
        .eval()
    )


def _flat(obj):
    names, shapes = list(obj.params), [t.shape for t in obj.params.values()]
    sizes = [t.numel() for t in obj.params.values()]

    def unflat(flat):
        return {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}

    return torch.cat([t.reshape(-1) for t in obj.params.values()]), unflat


def explicit_ggn(obj: uw.Objective, X, y) -> torch.Tensor:
    """(1/n) Σᵢ Jᵢᵀ ∇²_z L(zᵢ, yᵢ) Jᵢ + l2·I from torch.autograd.functional.jacobian / hessian."""
    flat0, unflat = _flat(obj)
    # (n, *out, p)
    J = torch.autograd.functional.jacobian(lambda f: obj.outputs(unflat(f), X), flat0)
    z = obj.outputs(obj.params, X).detach()
    n, p = len(z), flat0.numel()
    J = J.reshape(n, -1, p)
    G = torch.zeros(p, p, dtype=torch.float64)
    for i in range(n):
        Hz = torch.autograd.functional.hessian(
            lambda zi, i=i: obj.loss_fn(zi.reshape(1, *z.shape[1:]), y[i : i + 1]).sum(),
            z[i].reshape(-1),
        )
        G += J[i].T @ Hz @ J[i]
    return G / n + torch.diag(obj.l2_diagonal(torch.float64))


@pytest.mark.parametrize("loss, out", [("cross_entropy", 3), ("squared", 2), ("logistic", 1)])
def test_ggn_products_equal_the_explicit_gauss_newton_matrix(loss, out):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(15, 4, dtype=torch.float64, generator=g)
    y = {
        "cross_entropy": torch.randint(0, 3, (15,), generator=g),
        "squared": torch.randn(15, 2, dtype=torch.float64, generator=g),
        "logistic": torch.randint(0, 2, (15,), generator=g).double(),
    }[loss]
    obj = uw.Objective(_mlp(out=out), loss, l2=0.05)
    G = Curvature(obj, uw.Data.from_any((X, y)), kind="gauss-newton", damping=0.3).dense()
    expected = explicit_ggn(obj, X, y) + 0.3 * torch.eye(obj.p, dtype=torch.float64)
    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-12)
    # PSD + l2 + δ
    assert (
        float(torch.linalg.eigvalsh(G - 0.35 * torch.eye(obj.p, dtype=torch.float64))[0]) >= -1e-10
    )


def test_ggn_of_token_losses_on_a_causal_lm():
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=12,
        n_embd=4,
        n_layer=1,
        n_head=2,
        n_positions=8,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    lm = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(3, 12, (3, 5), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 3:] = -100
    obj = uw.Objective(
        lm, "causal_lm", l2=0.1, params=["transformer.h.0.mlp.c_proj", "transformer.ln_f"]
    )
    G = Curvature(obj, uw.Data.from_any(({"input_ids": ids}, labels)), kind="gauss-newton").dense()
    torch.testing.assert_close(
        G, explicit_ggn(obj, {"input_ids": ids}, labels), rtol=1e-9, atol=1e-12
    )


def test_ggn_equals_the_hessian_where_the_output_is_linear_in_theta():
    g = torch.Generator().manual_seed(3)
    X, y = (
        torch.randn(30, 4, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (30,), generator=g),
    )
    obj = uw.Objective(_mlp(), "cross_entropy", l2=0.01, params="2")  # θ = the output layer only
    for structured in (True, False):
        d = uw.Data.from_any((X, y))
        H = Curvature(obj, d, structured=structured).dense()
        G = Curvature(obj, d, kind="gauss-newton", structured=structured).dense()
        torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-13)


def test_whole_network_influence_with_gauss_newton_where_the_hessian_is_indefinite(tmp_path):
    g = torch.Generator().manual_seed(4)
    X, y = (
        torch.randn(40, 4, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (40,), generator=g),
    )
    obj = uw.Objective(_mlp(seed=5), "cross_entropy", l2=0.01)
    train, test = (X, y), (X[:3], y[:3])
    with pytest.raises(NotPositiveDefiniteError, match="curvature='gauss-newton'"):
        uw.Influence(obj, solver=uw.Direct(), progress=False, grad_tol=1e9).fit(train)
    inf = uw.Influence(
        obj, solver=uw.CG(rtol=1e-12), curvature="gauss-newton", progress=False, grad_tol=1e9
    ).fit(train)
    scores = inf.up_loss(test, store=tmp_path)
    G = explicit_ggn(obj, X, y)
    flat0, unflat = _flat(obj)

    def grads(Xs, ys):
        return torch.stack(
            [
                torch.func.grad(
                    lambda f, i=i: obj.losses(unflat(f), Xs[i : i + 1], ys[i : i + 1]).sum()
                )(flat0)
                for i in range(len(Xs))
            ]
        )

    exact = -(grads(*test) @ torch.linalg.solve(G, grads(*train).T)).numpy()
    np.testing.assert_allclose(scores.values, exact, rtol=1e-8, atol=1e-11)
    assert scores.provenance["curvature"].startswith("G + δI")
    # a store of GGN scores is not a Hessian one
    with pytest.raises(StoreMismatchError, match="curvature"):
        uw.Influence(obj, solver=uw.CG(rtol=1e-12), damping=1.0, progress=False, grad_tol=1e9).fit(
            train
        ).up_loss(test, store=tmp_path)
    direct = uw.Influence(
        obj, solver=uw.Direct(), curvature="gauss-newton", progress=False, grad_tol=1e9
    ).fit(train)
    np.testing.assert_allclose(direct.up_loss(test).values, exact, rtol=1e-8, atol=1e-11)
