"""HVPs, the dense Hessian and influence on non-linear models against explicit float64 Hessians
from ``torch.autograd.functional.hessian`` (double backward) and plain autograd-loop gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import upweight as uw
from conftest import pooled
from reference import assert_not_constant, ce, explicit_H, explicit_hessian, loop_grads
from upweight.core.curvature import Curvature
from upweight.errors import NotPositiveDefiniteError


@pytest.fixture(scope="module")
def digits10(mnist_1v7):
    """Multinomial logistic regression (with bias) on 10-class real MNIST-like digits.

    Uses scikit-learn's 8×8 digits (real handwritten digits, 10 classes, 64 features).
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:300] / 16.0)
    y = torch.tensor(y[:300])
    model = torch.nn.Linear(64, 10).double().eval()
    obj = uw.Objective(model, "cross_entropy", l2=0.05)
    fit = uw.refit(obj, uw.Data.from_any((X, y)), gtol=1e-11)
    with torch.no_grad():
        model.weight.copy_(fit.params["weight"])
        model.bias.copy_(fit.params["bias"])
    return model, X, y


def multinomial_risk(X, y, l2):
    """R(θ) for θ = [W (10×64) row-major, b (10)], written without upweight."""

    def risk(theta):
        W, b = theta[:640].reshape(10, 64), theta[640:]
        logits = X @ W.T + b
        return (
            -(logits.log_softmax(1)[torch.arange(len(y)), y]).mean() + 0.5 * l2 * (theta**2).sum()
        )

    def loss_one(theta, x, t):
        W, b = theta[:640].reshape(10, 64), theta[640:]
        return F.cross_entropy(x @ W.T + b, t, reduction="sum")

    return risk, loss_one


@pytest.mark.parametrize("solver", [uw.Direct(), uw.CG(rtol=1e-10)], ids=["direct", "cg"])
def test_multinomial_up_loss_against_explicit_hessian(digits10, solver):
    model, X, y = digits10
    l2 = 0.05
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    risk, loss_one = multinomial_risk(X, y, l2)
    H = explicit_hessian(risk, theta)
    G = loop_grads(loss_one, theta, X, y)  # (n, p)
    Xt, yt = X[:5] + 0.01, y[:5]  # nearby points as test points
    Gt = loop_grads(loss_one, theta, Xt, yt)
    ref = -(Gt @ torch.linalg.solve(H, G.T)).numpy()
    assert_not_constant(ref)

    inf = uw.Influence(
        uw.Objective(model, "cross_entropy", l2=l2), solver=solver, progress=False
    ).fit((X, y))
    got = inf.up_loss((Xt, yt)).values
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6


def test_dense_curvature_and_hvp_match_explicit_hessian(digits10):
    model, X, y = digits10
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = explicit_hessian(multinomial_risk(X, y, 0.05)[0], theta)
    curv = Curvature(
        uw.Objective(model, "cross_entropy", l2=0.05),
        uw.Data.from_any((X, y)),
        damping=0.3,
        batch_size=64,
    )
    torch.testing.assert_close(
        curv.dense(), H + 0.3 * torch.eye(650, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )
    V = torch.randn(3, 650, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        curv.matvec(V), V @ (H + 0.3 * torch.eye(650, dtype=torch.float64)), rtol=1e-9, atol=1e-12
    )
    # a minibatch product is the Hessian of the minibatch mean loss, plus the L2 and damping terms
    batch = uw.Data.from_any((X, y)).subset(range(40, 90))
    Hb = explicit_hessian(multinomial_risk(X[40:90], y[40:90], 0.05)[0], theta)
    torch.testing.assert_close(
        curv.batch_matvec(V, batch),
        V @ (Hb + 0.3 * torch.eye(650, dtype=torch.float64)),
        rtol=1e-9,
        atol=1e-12,
    )


def mlp_flat_risk(model, X, y, l2, names):
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(theta):
        return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}

    def risk(theta):
        out = torch.func.functional_call(
            model, {**dict(model.named_parameters()), **unflat(theta)}, (X,)
        )
        return F.cross_entropy(out, y) + 0.5 * l2 * (theta**2).sum()

    return risk


def test_non_pd_hessian_raises_with_damping_advice_then_solves_with_damping(untrained_mlp):
    model, X, y, _ = untrained_mlp
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = explicit_hessian(mlp_flat_risk(model, X, y, 0.0, names), theta)
    lmin = float(torch.linalg.eigvalsh(H)[0])
    assert lmin < -1e-4, "fixture must have an indefinite Hessian"
    obj = uw.Objective(model, "cross_entropy")
    with pytest.warns(uw.errors.NotAtMinimumWarning):
        with pytest.raises(NotPositiveDefiniteError) as info:
            uw.Influence(obj, solver=uw.Direct(), progress=False).fit((X, y))
    err = info.value
    assert f"{lmin:.3e}" in str(err) and "damping" in str(err)
    assert err.suggested_damping > -lmin
    # with the suggested damping it solves, and matches (H + δI)⁻¹ computed independently
    inf = uw.Influence(
        obj, solver=uw.Direct(), damping=err.suggested_damping, progress=False, grad_tol=1e3
    ).fit((X, y))
    V = torch.randn(2, len(theta), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sol = inf.inverse_hvp(V)
    ref = torch.linalg.solve(
        H + err.suggested_damping * torch.eye(len(theta), dtype=torch.float64), V.T
    ).T
    # both are float64 solves of a matrix with condition number ~1e6: agree to ~1e-10·cond
    assert float((sol.value - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("block", [False, True], ids=["cg", "block-cg"])
def test_cg_detects_negative_curvature(untrained_mlp, block):
    model, X, y, _ = untrained_mlp
    inf = uw.Influence(
        uw.Objective(model, "cross_entropy"),
        solver=uw.CG(block=block),
        progress=False,
        grad_tol=1e3,
    ).fit((X, y))
    Xt, yt = X[:3], y[:3]
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        inf.up_loss((Xt, yt))


def test_frozen_layers_use_the_hessian_block_of_the_chosen_parameters(untrained_mlp):
    """The paper's "all but the top layer frozen": θ = fc2 only; H is the fc2 block of the full
    Hessian."""
    model, X, y, _ = untrained_mlp
    names = ["fc2.weight", "fc2.bias"]
    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    H = explicit_hessian(mlp_flat_risk(model, X, y, 0.1, names), theta)
    for selector in (
        "fc2",
        model.fc2,
        ["fc2.weight", "fc2.bias"],
        lambda name, t: name.startswith("fc2"),
    ):
        obj = uw.Objective(model, "cross_entropy", l2=0.1, params=selector)
        assert obj.space.names == tuple(names)
        curv = Curvature(obj, uw.Data.from_any((X, y)))
        torch.testing.assert_close(curv.dense(), H, rtol=1e-9, atol=1e-12)


def test_per_sample_grads_with_batchnorm_in_eval_mode(mnist_1v7):
    from upweight.core.grads import per_sample_grads

    torch.manual_seed(0)
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:20], 7), dtype=torch.float64)
    y = torch.tensor((d.y_train[:20] > 0).astype(np.int64))
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()
    model.train()
    model(X)  # populate running statistics
    model.eval()
    obj = uw.Objective(model, "cross_entropy")
    got = per_sample_grads(obj, obj.params, uw.Data.from_any((X, y)))
    names = obj.space.names
    named = dict(model.named_parameters())
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        F.cross_entropy(model(X[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([named[n].grad.reshape(-1) for n in names]))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_integer_token_inputs_and_float32_models():
    """Token-id inputs (an Embedding) work, and float32 agrees with float64 to float32 precision."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 12, (60, 5))
    y = (tokens.sum(1) % 2).long()

    class BagOfEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(12, 3)
            self.out = torch.nn.Linear(3, 2)

        def forward(self, t):
            return self.out(self.emb(t).mean(1))

    m64 = BagOfEmbeddings().double().eval()
    m32 = BagOfEmbeddings().eval()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    names = [n for n, _ in m64.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    sizes = [p.numel() for p in m64.parameters()]
    shapes = [p.shape for p in m64.parameters()]

    def risk(th):
        prm = {n: t.reshape(s) for n, t, s in zip(names, th.split(sizes), shapes)}
        return (
            F.cross_entropy(torch.func.functional_call(m64, prm, (tokens,)), y)
            + 0.5 * 0.1 * (th**2).sum()
        )

    def loss_one(th, x, t):
        prm = {n: a.reshape(s) for n, a, s in zip(names, th.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(m64, prm, (x,)), t, reduction="sum")

    H = explicit_hessian(risk, theta)
    lmin = float(torch.linalg.eigvalsh(H)[0])
    damping = max(0.0, -lmin) + 0.05
    G = loop_grads(loss_one, theta, tokens, y)
    ref = -(
        G[:4] @ torch.linalg.solve(H + damping * torch.eye(len(theta), dtype=torch.float64), G.T)
    ).numpy()
    assert_not_constant(ref)
    for model, tol in ((m64, 1e-8), (m32, 1e-3)):
        inf = uw.Influence(
            uw.Objective(model, "cross_entropy", l2=0.1),
            solver=uw.Direct(),
            damping=damping,
            progress=False,
            grad_tol=1e3,
        )
        got = inf.fit((tokens, y)).up_loss((tokens[:4], y[:4])).values
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol
    # I_pert,loss needs continuous inputs: token ids get a clear error
    with pytest.raises(uw.errors.InputError, match="token ids"):
        inf.pert_loss((tokens[:1], y[:1]), train=[0])


def test_unpenalised_intercept_is_left_out_of_r_and_h(digits10):
    """l2_exclude=["bias"] (scikit-learn's unpenalised intercept): R and H carry l2 on W only."""
    model, X, y = digits10
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def risk(th):
        W, b = th[:640].reshape(10, 64), th[640:]
        return F.cross_entropy(X @ W.T + b, y) + 0.5 * 0.05 * (th[:640] ** 2).sum()

    obj = uw.Objective(model, "cross_entropy", l2=0.05, l2_exclude=["bias"])
    curv = Curvature(obj, uw.Data.from_any((X, y)), damping=0.01)
    ref = explicit_hessian(risk, theta) + 0.01 * torch.eye(650, dtype=torch.float64)
    torch.testing.assert_close(curv.dense(), ref, rtol=1e-9, atol=1e-12)
    assert float(
        obj.regularizer({"weight": model.weight.detach(), "bias": model.bias.detach()})
    ) == float(0.5 * 0.05 * (model.weight.detach() ** 2).sum())
    with pytest.raises(uw.errors.InputError, match="l2_exclude"):
        uw.Objective(model, "cross_entropy", l2=0.05, l2_exclude=["intercept"])


class _WithUnusedParameter(torch.nn.Module):
    """A tanh MLP with a parameter that the forward pass never touches (its gradient has no
    graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
        )
        self.unused = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_many_tangents_through_one_graph_equal_the_explicit_hessian():
    """23 tangents share one gradient graph (one backward pass each): each product is (H + δI)v of
    the explicit float64 Hessian, including the zero rows of a parameter the loss does not use."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = _WithUnusedParameter().double()
    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    names = [n for n, _ in model.named_parameters()]
    shapes = [t.shape for _, t in model.named_parameters()]
    theta = torch.cat([t.detach().reshape(-1) for _, t in model.named_parameters()])

    def risk(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, parts, (X,)), y) + 0.05 * (flat**2).sum()

    H = explicit_hessian(risk, theta) + 0.2 * torch.eye(len(theta), dtype=torch.float64)
    assert names[0] == "unused"  # a module's own parameters come before its children's
    # the unused parameter's rows: only l2 + δ on the diagonal
    assert float(H[:2, 2:].abs().max()) == 0.0
    V = torch.randn(23, len(theta), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = Curvature(
        obj, uw.Data.from_any((X, y)), damping=0.2, batch_size=16, structured=False
    ).matvec(V)
    assert float((got - V @ H).norm() / (V @ H).norm()) < 1e-12
    one = Curvature(
        obj, uw.Data.from_any((X, y)), damping=0.2, batch_size=16, structured=False
    ).matvec(V[:1])
    assert float((one - V[:1] @ H).norm() / (V[:1] @ H).norm()) < 1e-12


def test_hvp_of_a_model_whose_loss_ignores_theta_is_zero():
    """No parameter reaches the loss (all gradients graph-free): the data part of H is exactly 0."""
    from upweight.core.curvature import hvp_sum

    model = _WithUnusedParameter().double()
    obj = uw.Objective(model, "cross_entropy", l2=0.0, params=["unused"])
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = {"unused": model.unused.detach()}
    out = hvp_sum(obj, params, torch.randn(3, 2, dtype=torch.float64), uw.Data.from_any((X, y)))
    assert out.shape == (3, 2) and float(out.abs().max()) == 0.0


class _TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_hvp_batches_capped_by_the_graph_budget_still_give_the_explicit_hessian(monkeypatch):
    """Curvature.hvp_batch_size caps generic HVP batches by the bytes autograd saves per point: the
    measurement covers at least the activations the chain rule needs, the cap is budget // bytes per
    point, and the products over the smaller batches are still (H + δI)V of the explicit float64 H.
    """
    import upweight.core.curvature as curvature_module
    from upweight.core.curvature import graph_bytes_per_point
    from upweight.core.curvature import hvp_sum as module_hvp_sum

    torch.manual_seed(0)
    model = _TinyCNN().double()
    X, y = torch.randn(50, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (50,))
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    data = uw.Data.from_any((X, y))
    per_point = graph_bytes_per_point(obj, obj.params, data)
    # the backward needs at least each point's input (for the conv weight) and its tanh output: 8 B
    # × (36 + 64)
    assert 8 * (36 + 64) <= per_point <= 20 * 8 * (36 + 64)

    monkeypatch.setattr(curvature_module, "MIN_HVP_BATCH", 1)
    monkeypatch.setattr(curvature_module, "HVP_GRAPH_BYTES", int(7.5 * per_point))
    batches: list[int] = []

    def counting_hvp_sum(*args, **kwargs):
        batches.append(len(args[3]))
        return module_hvp_sum(*args, **kwargs)

    monkeypatch.setattr(curvature_module, "hvp_sum", counting_hvp_sum)
    curv = Curvature(obj, data, damping=0.2, batch_size=32, structured=False)
    assert curv.hvp_batch_size == 7
    V = torch.randn(5, obj.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = explicit_H(model, ce, X, y, l2=0.1, damping=0.2)
    assert float((curv.matvec(V) - V @ H).norm() / (V @ H).norm()) < 1e-12
    assert batches == [7] * 7 + [1]
    batches.clear()
    part = data.subset(torch.arange(20))
    H20 = explicit_H(model, ce, X[:20], y[:20], l2=0.0) * 20  # Σ over the 20 points of ∇²L
    assert float((curv.hvp_sum(V, part) - V @ H20).norm() / (V @ H20).norm()) < 1e-12
    assert batches == [7, 7, 6]
    # a generous budget keeps batch_size
    monkeypatch.setattr(curvature_module, "HVP_GRAPH_BYTES", 2**40)
    assert Curvature(obj, data, batch_size=32, structured=False).hvp_batch_size == 32


def test_per_sample_gradient_chunks_stay_within_the_tensor_budget(digits10, monkeypatch):
    """``grad_chunk_size``: b × p × itemsize ≤ ``core.batching.TENSOR_BYTES`` (16 MiB: MNIST softmax
    regression, p = 7,850 float32, 534 points per chunk); with the budget set to 3.5 points' worth
    the sweep yields chunks of 3, and every row is still the closed-form multinomial gradient
    (softmax(Wx + b) − e_y) ⊗ [x, 1]."""
    import upweight.core.batching as batching
    from upweight.core.grads import grad_chunk_size, iter_per_sample_grads

    assert grad_chunk_size(7850, 2048, torch.float32) == 534 == batching.TENSOR_BYTES // (7850 * 4)
    assert grad_chunk_size(7850, 100, torch.float32) == 100  # never above batch_size
    assert grad_chunk_size(10**9, 2048, torch.float32) == 1  # at least one point
    model, X, y = digits10
    obj = uw.Objective(model, "cross_entropy", l2=0.05)
    p = obj.p
    monkeypatch.setattr(batching, "TENSOR_BYTES", int(3.5 * p * 8))
    chunks = list(iter_per_sample_grads(obj, obj.params, uw.Data.from_any((X[:20], y[:20])), 2048))
    assert [len(b) for b, _ in chunks] == [3] * 6 + [2]
    G = torch.cat([g for _, g in chunks])
    with torch.no_grad():
        r = torch.softmax(model(X[:20]), 1) - F.one_hot(y[:20], 10).double()  # (n, 10)
    # θ = [W row-major, b]
    closed = torch.cat([(r[:, :, None] * X[:20, None, :]).reshape(20, -1), r], 1)
    assert float((G - closed).abs().max()) < 1e-12 * float(closed.abs().max())
