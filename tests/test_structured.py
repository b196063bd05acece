"""Structured scoring and the structured HVP (core.structured), against mathematics: per-sample
gradients from a plain autograd loop and explicit float64 Hessians by double backward
(tests/reference.py, never upweight's gradient or HVP code), the logistic closed form of Koh &
Liang (2017) §2.3 — and, as the brief asks, equality with the generic (structured=False) path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call

import upweight as uw
from conftest import ConvNet, TanhMLP, fit_linear, pooled
from reference import assert_not_constant, explicit_hessian, logistic_closed_form, loop_grads
from upweight.core.curvature import Curvature
from upweight.core.layers import find_layers
from upweight.core.losses import SmoothHinge
from upweight.core.structured import (
    check_scoring_plan,
    linear_output_layer,
    structured_per_sample_grads,
    structured_scores,
)
from upweight.errors import InputError, UnsupportedModelError

D64 = torch.float64
TOL = 1e-10


# ── helpers (independent of upweight's derivative code) ─────────────────────────────────
def theta_of(obj: uw.Objective) -> tuple[torch.Tensor, callable]:
    """θ flat in the objective's order and a map flat → full parameter dict (fixed ones
    filled in)."""
    names = list(obj.params)
    sizes = [obj.params[n].numel() for n in names]
    theta = torch.cat([obj.params[n].reshape(-1) for n in names])
    full = dict(obj.model.named_parameters())

    def params(flat):
        out = {n: t.detach() for n, t in full.items()}
        out.update({n: t.reshape(obj.params[n].shape) for n, t in zip(names, flat.split(sizes))})
        return out

    return theta, params


def ref_grads(obj: uw.Objective, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    theta, params = theta_of(obj)
    return loop_grads(
        lambda t, x, yy: obj.loss_fn(functional_call(obj.model, params(t), (x,)), yy)[0],
        theta,
        X,
        y,
    )


def ref_hessian(
    obj: uw.Objective, X: torch.Tensor, y: torch.Tensor, damping: float
) -> torch.Tensor:
    """∇²R(θ̂) + δI with R = mean loss + (l2/2)Σ_{penalised}θ², explicit (p, p)."""
    theta, params = theta_of(obj)
    pen = torch.cat(
        [
            torch.full((obj.params[n].numel(),), float(n in obj.l2_names), dtype=D64)
            for n in obj.params
        ]
    )

    def risk(flat):
        return (
            obj.loss_fn(functional_call(obj.model, params(flat), (X,)), y).mean()
            + 0.5 * obj.l2 * (pen * flat**2).sum()
        )

    return explicit_hessian(risk, theta) + damping * torch.eye(len(theta), dtype=D64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ── models on real (pooled) MNIST ───────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def images(mnist_1v7):
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:120], 4), dtype=D64)  # 7×7 = 49 pixels
    y = torch.tensor((d.y_train[:120] > 0).astype(np.int64))
    return X, y


class ScaledMLP(TanhMLP):
    """TanhMLP with a bare per-unit scale: one parameter in no factorable layer."""

    def __init__(self) -> None:
        super().__init__(49, 5, 2)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        return self.fc2(self.scale * torch.tanh(self.fc1(x)))


class TiedLinear(torch.nn.Module):
    """fc is called once, but its weight is also used directly: the layer factorisation is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(49, 49, bias=False)
        self.out = torch.nn.Linear(49, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x) + x @ self.fc.weight))


class Aliased(torch.nn.Module):
    """One Linear registered under two names, called once: one layer, nothing tied."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(49, 2)
        self.also_fc = self.fc

    def forward(self, x):
        return self.fc(x)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        {
            "logreg": lambda: torch.nn.Linear(49, 2),
            "mlp": lambda: TanhMLP(49, 5, 2),
            "conv": ConvNet,
            "scaled": ScaledMLP,
        }[kind]()
        .double()
        .eval()
    )


# ── (1) structured scoring ──────────────────────────────────────────────────────────────
@pytest.mark.parametrize("kind", ["logreg", "mlp", "conv", "scaled"])
def test_structured_scores_equal_per_sample_gradient_products(images, kind):
    X, y = images
    obj = uw.Objective(_model(kind), "cross_entropy", l2=0.01)
    plan = find_layers(obj, uw.Data.from_any((X, y)))
    assert bool(plan.other) == (kind == "scaled")
    S = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(1), dtype=D64)
    got = structured_scores(obj, plan, uw.Data.from_any((X, y)), S)
    ref = S @ ref_grads(obj, X, y).T
    assert_not_constant(ref.numpy())
    assert rel(got, ref) < TOL


def _margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A test measurement unlike the loss: the logit margin of the other class over the label."""
    return out[:, 1] - out[:, 0] * (1 + y)


@pytest.mark.parametrize("measure", [False, True])
@pytest.mark.parametrize("kind", ["logreg", "mlp", "conv", "scaled"])
def test_structured_per_sample_grads_equal_autograd_rows(images, kind, measure):
    """Each point's ∇θL (or ∇θf of a measurement that is not the loss) assembled from the layers'
    captures equals autograd on that point alone — in sub-batches too."""
    X, y = images
    obj = uw.Objective(_model(kind), "cross_entropy", measure=_margin if measure else None)
    data = uw.Data.from_any((X[:7], y[:7]))
    plan = find_layers(obj, data)
    theta, params = theta_of(obj)
    fn = obj.measure_fn if measure else obj.loss_fn
    ref = loop_grads(
        lambda t, x, yy: fn(functional_call(obj.model, params(t), (x,)), yy)[0], theta, X[:7], y[:7]
    )
    assert_not_constant(ref.numpy())
    got = structured_per_sample_grads(obj, plan, data, measure=measure)
    assert rel(got, ref) < TOL
    # one point per sub-batch
    tiny = structured_per_sample_grads(obj, plan, data, measure=measure, max_bytes=1)
    assert rel(tiny, ref) < TOL


@pytest.mark.parametrize("kind", ["logreg", "mlp", "conv", "scaled"])
def test_up_loss_structured_equals_generic_path(images, kind):
    X, y = images
    obj = uw.Objective(_model(kind), "cross_entropy", l2=0.01)
    test = (X[:3], y[:3])
    kw = dict(solver=uw.Direct(), damping=2.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        on = uw.Influence(obj, structured=True, **kw).fit((X, y))
        off = uw.Influence(obj, structured=False, **kw).fit((X, y))
        auto = uw.Influence(obj, **kw).fit((X, y))
    assert on.scoring_ == "structured" and off.scoring_ == "generic"
    # auto needs every θ in a layer
    assert auto.scoring_ == ("generic" if kind == "scaled" else "structured")
    a, b = on.up_loss(test).values, off.up_loss(test).values
    assert_not_constant(b)
    assert np.abs(a - b).max() <= TOL * np.abs(b).max()
    if kind == "scaled":  # auto kept today's path: bit-identical
        assert np.array_equal(auto.up_loss(test).values, b)


def test_weight_used_outside_its_layer_is_caught_by_the_probe(images):
    X, y = images
    torch.manual_seed(0)
    obj = uw.Objective(TiedLinear().double().eval(), "cross_entropy")
    data = uw.Data.from_any((X, y))
    # without probe points find_layers cannot see the reuse; the scoring check's probe catches it
    blind = find_layers(obj)
    assert {b.name for b in blind.blocks} == {"fc", "out"}
    assert "outside its layer" in check_scoring_plan(obj, blind, data)
    # with them, find_layers itself leaves fc to the generic path and says why
    plan = find_layers(obj, data)
    assert {b.name for b in plan.blocks} == {"out"}
    assert "outside the module's forward" in plan.reasons["fc.weight"]
    assert check_scoring_plan(obj, plan, data) is None
    kw = dict(solver=uw.Direct(), damping=1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        on = uw.Influence(obj, structured=True, **kw).fit(data)
        off = uw.Influence(obj, structured=False, **kw).fit(data)
    # the out layer factored, fc's weight by per-sample gradients
    assert on.scoring_ == "structured"
    a, b = on.up_loss((X[:3], y[:3])).values, off.up_loss((X[:3], y[:3])).values
    assert_not_constant(b)
    assert np.abs(a - b).max() <= TOL * np.abs(b).max()


def test_tied_module_weights_are_not_factored_and_an_alias_is(images):
    X, y = images
    torch.manual_seed(0)
    net = (
        torch.nn.Sequential(
            torch.nn.Linear(49, 49),
            torch.nn.Tanh(),
            torch.nn.Linear(49, 49),
            torch.nn.Tanh(),
            torch.nn.Linear(49, 2),
        )
        .double()
        .eval()
    )
    net[2].weight = net[0].weight  # tied: one parameter, gradient from two layers
    obj = uw.Objective(net, "cross_entropy")
    plan = find_layers(obj, uw.Data.from_any((X, y)))
    assert {b.name for b in plan.blocks} == {"4"}
    assert "tied weights" in plan.reasons["0.weight"] and "2.weight" in plan.reasons["0.weight"]
    # a module registered under a second name is still one module, called once: factorable
    plan = find_layers(
        uw.Objective(Aliased().double().eval(), "cross_entropy"), uw.Data.from_any((X, y))
    )
    assert [b.name for b in plan.blocks] == ["fc"] and not plan.other


def test_structured_switch_errors():
    # an embedding that renormalises its weight in the forward pass (max_norm): nothing factorable
    model = (
        torch.nn.Sequential(torch.nn.Embedding(5, 2, max_norm=1.0), torch.nn.Flatten())
        .double()
        .eval()
    )
    obj = uw.Objective(model, "squared")
    data = (torch.tensor([[0], [1], [2]]), torch.zeros(3, 2, dtype=D64))
    with (
        pytest.raises(
            UnsupportedModelError, match="no parameter of θ is in a factorable.*max_norm"
        ),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        uw.Influence(obj, structured=True).fit(data)
    with pytest.raises(InputError, match="'structured' parameter of Influence"):
        uw.Influence(obj, structured="yes").fit(data)
    with pytest.raises(UnsupportedModelError, match="structured=True"):
        Curvature(obj, uw.Data.from_any(data), structured=True)


# ── (2) structured HVP ──────────────────────────────────────────────────────────────────
def _hvp_case(case: str, images):
    X, y = images
    torch.manual_seed(2)
    if case == "logistic":  # binary, ±1 labels
        return (
            uw.Objective(torch.nn.Linear(49, 1).double().eval(), "logistic", l2=0.05),
            X,
            y * 2 - 1,
        )
    if case == "softmax":
        yy = (X[:, 20] * 7).long() % 4
        return (
            uw.Objective(
                torch.nn.Linear(49, 4).double().eval(),
                "cross_entropy",
                l2=0.05,
                l2_exclude=["bias"],
            ),
            X,
            yy,
        )
    if case == "squared":
        return (
            uw.Objective(torch.nn.Linear(49, 3).double().eval(), "squared", l2=0.05),
            X,
            X[:, :3] * 2,
        )
    if case == "smooth_hinge":
        return (
            uw.Objective(torch.nn.Linear(49, 1).double().eval(), SmoothHinge(0.1), l2=0.05),
            X,
            y * 2 - 1,
        )
    # log-cosh regression: a loss with no closed form here (torch.func.hessian)
    if case == "general":

        def logcosh(out, t):
            return torch.log(torch.cosh(out - t)).sum(1)

        return (
            uw.Objective(torch.nn.Linear(49, 2).double().eval(), logcosh, l2=0.05),
            X,
            X[:, :2] * 3,
        )
    # frozen tanh features, trained linear head (bias excluded from l2)
    assert case == "frozen_head"
    model = TanhMLP(49, 6, 3).double().eval()
    yy = (X[:, 20] * 7).long() % 3
    return (
        uw.Objective(model, "cross_entropy", l2=0.05, params="fc2", l2_exclude=["fc2.bias"]),
        X,
        yy,
    )


@pytest.mark.parametrize(
    "case", ["logistic", "softmax", "squared", "smooth_hinge", "general", "frozen_head"]
)
def test_structured_hvp_equals_explicit_hessian(images, case):
    obj, X, y = _hvp_case(case, images)
    data = uw.Data.from_any((X, y))
    damping = 0.3
    curv = Curvature(obj, data, damping=damping, batch_size=50)
    assert curv.uses_structured, curv.structured_reason_
    generic = Curvature(obj, data, damping=damping, batch_size=50, structured=False)
    V = torch.randn(4, obj.p, generator=torch.Generator().manual_seed(3), dtype=D64)
    H = ref_hessian(obj, X, y, damping)
    got = curv.matvec(V)
    assert rel(got, V @ H) < TOL
    assert rel(got, generic.matvec(V)) < TOL
    before = curv.n_matvecs
    assert rel(curv.dense(), H) < TOL  # dense() in closed form: Σᵢ Hᵢ ⊗ ãᵢãᵢᵀ, no HVP
    assert curv.n_matvecs == before
    assert rel(generic.dense(), H) < TOL
    batch = data.subset(range(17))  # minibatch products (LiSSA, group influence)
    assert rel(curv.hvp_sum(V, batch), generic.hvp_sum(V, batch)) < TOL
    uncached = Curvature(obj, data, damping=damping, batch_size=50, structured_cache_bytes=0)
    assert rel(uncached.matvec(V), V @ H) < TOL and uncached._structured_op._chunks is None


def test_structured_hvp_only_where_the_output_is_linear_in_theta(images):
    X, y = images
    data = uw.Data.from_any((X, y))
    mlp = TanhMLP(49, 5, 2).double().eval()
    cases = {
        "all": uw.Objective(mlp, "cross_entropy"),  # θ has two layers
        "hidden": uw.Objective(mlp, "cross_entropy", params="fc1"),  # the output is not fc1's
    }

    class Doubled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(49, 2)

        def forward(self, x):
            return self.fc(x) * 2.0  # the model's output is not the layer's output tensor

    cases["not_returned"] = uw.Objective(Doubled().double().eval(), "cross_entropy")
    for name, obj in cases.items():
        block, why = linear_output_layer(obj, data)
        assert block is None, name
        assert not Curvature(obj, data).uses_structured
    assert Curvature(cases["all"], data, structured=False).structured_reason_ is None


def test_influence_with_structured_paths_matches_the_logistic_closed_form(small_logreg):
    """Koh & Liang (2017) §2.3 closed form, with CG running on the structured HVP and scoring."""
    model, l2, (X, y), (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.CG(rtol=1e-12), progress=False
    ).fit((X, y))
    assert inf.curvature_.uses_structured and inf.scoring_ == "structured"
    got = inf.up_loss((Xt[:5], yt[:5]))
    ref, _, _ = logistic_closed_form(
        model.weight.detach().numpy()[0], X.numpy(), y.numpy(), Xt[:5].numpy(), yt[:5].numpy(), l2
    )
    assert np.abs(got.values - ref).max() <= 1e-9 * np.abs(ref).max()
    assert "structured_hvp" in got.provenance and "structured_scoring" in got.provenance


def test_default_is_bit_identical_where_nothing_is_structured(untrained_mlp):
    """An MLP with a bare parameter: auto keeps the generic HVP and scoring, bit for bit."""
    model, X, y, _ = untrained_mlp
    torch.manual_seed(5)
    m = ScaledMLP().double().eval()
    obj = uw.Objective(m, "cross_entropy", l2=0.1)
    Xp = torch.cat([X, X, X, X[:, :1]], dim=1)  # 49 features from the fixture's real pixels
    kw = dict(solver=uw.CG(rtol=1e-8), damping=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        a = uw.Influence(obj, **kw).fit((Xp, y))
        b = uw.Influence(obj, structured=False, **kw).fit((Xp, y))
    assert not a.curvature_.uses_structured and a.scoring_ == "generic"
    assert np.array_equal(a.up_loss((Xp[:2], y[:2])).values, b.up_loss((Xp[:2], y[:2])).values)


def test_frozen_feature_head_influence_equals_direct_on_explicit_hessian(images):
    """A trained head on frozen features: structured CG + scoring against H⁻¹ from the explicit
    Hessian."""
    X, y = images
    torch.manual_seed(4)
    model = TanhMLP(49, 6, 2).double().eval()
    obj = uw.Objective(model, "cross_entropy", l2=0.05, params="fc2")
    feats = torch.tanh(model.fc1(X)).detach()
    head = fit_linear(feats, y, "cross_entropy", 0.05, out=2, bias=True)
    with torch.no_grad():
        model.fc2.weight.copy_(head.weight)
        model.fc2.bias.copy_(head.bias)
    obj = uw.Objective(model, "cross_entropy", l2=0.05, params="fc2")
    inf = uw.Influence(obj, solver=uw.CG(rtol=1e-12), progress=False).fit((X, y))
    assert inf.curvature_.uses_structured and inf.scoring_ == "structured"
    got = inf.up_loss((X[:3], y[:3])).values
    H = ref_hessian(obj, X, y, 0.0)
    G = ref_grads(obj, X, y)
    ref = -(torch.linalg.solve(H, G[:3].T).T @ G.T).numpy()
    assert_not_constant(ref)
    assert np.abs(got - ref).max() <= 1e-9 * np.abs(ref).max()


def test_conv_scoring_uses_both_contraction_orders(images):
    """k > 1 queries on a conv layer (T > 1) go through per-layer gradients; k = 1 through Qã."""
    X, y = images
    obj = uw.Objective(_model("conv"), "cross_entropy")
    data = uw.Data.from_any((X[:20], y[:20]))
    plan = find_layers(obj, data)
    G = ref_grads(obj, X[:20], y[:20])
    for k in (1, 4):
        S = torch.randn(k, obj.p, generator=torch.Generator().manual_seed(k), dtype=D64)
        assert rel(structured_scores(obj, plan, data, S), S @ G.T) < TOL
        # a memory bound below one point's patches: scored point by point, same values
        assert rel(structured_scores(obj, plan, data, S, max_bytes=1), S @ G.T) < TOL


def test_store_keeps_structured_and_generic_runs_apart(small_logreg, tmp_path):
    """Structured and generic scores agree only to rounding, so a store of one is refused by the
    other; an explicit LocalExecutor takes the same structured paths, bit for bit."""
    from upweight._executor import LocalExecutor
    from upweight.errors import StoreMismatchError

    model, l2, train, (Xt, yt) = small_logreg
    obj = uw.Objective(model, "logistic", l2=l2)
    auto = uw.Influence(obj, solver=uw.Direct(), batch_size=80, progress=False).fit(train)
    first = auto.up_loss((Xt[:3], yt[:3]), store=tmp_path / "s")
    assert np.array_equal(auto.up_loss((Xt[:3], yt[:3]), store=tmp_path / "s").values, first.values)
    loc = uw.Influence(obj, solver=uw.Direct(), batch_size=80, progress=False).fit(
        train, executor=LocalExecutor()
    )
    assert np.array_equal(loc.up_loss((Xt[:3], yt[:3])).values, first.values)
    off = uw.Influence(
        obj, solver=uw.Direct(), batch_size=80, progress=False, structured=False
    ).fit(train)
    with pytest.raises(StoreMismatchError):
        off.up_loss((Xt[:3], yt[:3]), store=tmp_path / "s")
    assert (
        np.abs(off.up_loss((Xt[:3], yt[:3])).values - first.values).max()
        <= 1e-10 * np.abs(first.values).max()
    )


def test_low_rank_query_factors_score_with_the_truncated_svd(images):
    """rank=r scores with the best rank-r approximation of each layer's query block (Eckart–Young),
    computed here with numpy's SVD; r ≥ min(out, cols) is exact."""
    X, y = images
    obj = uw.Objective(_model("mlp"), "cross_entropy")
    data = uw.Data.from_any((X[:30], y[:30]))
    plan = find_layers(obj, data)
    G = ref_grads(obj, X[:30], y[:30])
    S = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(7), dtype=D64)
    S_r = S.clone()
    for blk in plan.blocks:  # fc1: 5×50 blocks, rank 2 truncates; fc2: 2×6, rank 2 is exact
        for j in range(3):
            u, s, vt = np.linalg.svd(S[j, blk.index].numpy(), full_matrices=False)
            S_r[j, blk.index] = torch.from_numpy((u[:, :2] * s[:2]) @ vt[:2])
    got = structured_scores(obj, plan, data, S, rank=2)
    assert rel(got, S_r @ G.T) < TOL
    assert rel(got, S @ G.T) > 1e-3  # and it is an approximation
    assert rel(structured_scores(obj, plan, data, S, rank=6), S @ G.T) < TOL
    with pytest.raises(InputError, match="rank must be a positive integer"):
        structured_scores(obj, plan, data, S, rank=0)


# ── (3) mixed precision: the structured HVP's products in bfloat16 (CG(hvp_dtype=…)) ─────
@pytest.mark.parametrize("case", ["softmax", "frozen_head"])
def test_bfloat16_products_are_the_explicit_hessian_to_bfloat16_precision(images, case):
    obj, X, y = _hvp_case(case, images)
    data = uw.Data.from_any((X, y))
    curv = Curvature(obj, data, batch_size=50)
    V = torch.randn(4, obj.p, generator=torch.Generator().manual_seed(3), dtype=D64)
    H = ref_hessian(obj, X, y, 0.0)
    H_data = H - torch.diag(obj.l2_diagonal(D64))  # the part the products compute: (1/n) Σᵢ ∇²L(zᵢ)
    got = curv.matvec(V, operand_dtype=torch.bfloat16)
    err = rel(got - V * obj.l2_diagonal(D64), V @ H_data)
    assert 1e-5 < err < 2e-2  # bfloat16 operands (8-bit significand), not float64, and not far off
    # from the cached bfloat16 inputs
    assert torch.equal(curv.matvec(V, operand_dtype=torch.bfloat16), got)
    assert torch.bfloat16 in curv._structured_op._low_chunks
    uncached = Curvature(obj, data, batch_size=50, structured_cache_bytes=0)
    assert torch.equal(uncached.matvec(V, operand_dtype=torch.bfloat16), got)
    assert rel(curv.matvec(V), V @ H) < TOL  # exact products are untouched
    assert rel(curv.matvec(V, operand_dtype=D64), V @ H) < TOL  # the compute dtype itself: exact


def test_cg_with_bfloat16_products_measures_its_residual_with_exact_products(images):
    obj, X, y = _hvp_case("softmax", images)
    data = uw.Data.from_any((X, y))
    damping = 0.3  # the softmax's bias shift is a null direction of H (bias not penalised)
    H = ref_hessian(obj, X, y, damping)
    B = torch.randn(5, obj.p, generator=torch.Generator().manual_seed(4), dtype=D64)
    for block in (True, False):
        mixed = uw.CG(rtol=1e-2, hvp_dtype=torch.bfloat16, block=block)
        curv = Curvature(obj, data, damping=damping, batch_size=50)
        sol = mixed.solve(mixed.prepare(curv), B)
        true_res = (sol.value @ H - B).norm(dim=1) / B.norm(dim=1)  # explicit float64 H
        # the check is not in bfloat16
        assert torch.allclose(sol.residual, true_res, rtol=1e-8, atol=0)
        assert float(true_res.max()) < 5e-2
        exact = uw.CG(rtol=1e-2, block=block)
        X_exact = exact.solve(
            exact.prepare(Curvature(obj, data, damping=damping, batch_size=50)), B
        ).value
        assert not torch.equal(sol.value, X_exact)  # the iterations did use bfloat16 products
        X_true = torch.linalg.solve(H, B.T).T
        assert rel(sol.value, X_true) < 0.1
    assert mixed.config()["hvp_dtype"] == "torch.bfloat16" and "hvp_dtype" not in uw.CG().config()


def test_hvp_dtype_errors(images):
    for bad in (torch.int32, "bfloat16"):
        with pytest.raises(InputError, match="hvp_dtype"):
            uw.CG(hvp_dtype=bad)
    with pytest.raises(InputError, match="rtol ≥ 1e-2 with bfloat16"):
        uw.CG(rtol=1e-3, hvp_dtype=torch.bfloat16)  # below bfloat16's machine epsilon 2⁻⁷
    uw.CG(rtol=1e-3, hvp_dtype=torch.float16)  # its epsilon is 2⁻¹⁰
    X, y = images
    obj = uw.Objective(_model("mlp"), "cross_entropy", l2=0.05)  # θ is not one output nn.Linear
    inf = uw.Influence(
        obj, solver=uw.CG(rtol=1e-2, hvp_dtype=torch.bfloat16), progress=False, grad_tol=1e9
    )
    inf.fit((X, y))
    with pytest.raises(UnsupportedModelError, match="need the structured HVP"):
        inf.up_loss((X[:2], y[:2]))
    obj, X, y = _hvp_case("softmax", images)
    generic = Curvature(obj, uw.Data.from_any((X, y)), structured=False)
    with pytest.raises(UnsupportedModelError, match="structured=False"):
        generic.matvec(torch.zeros(1, obj.p, dtype=D64), operand_dtype=torch.bfloat16)
    V = torch.randn(2, obj.p, generator=torch.Generator().manual_seed(5), dtype=D64)
    # the compute dtype: no-op
    assert torch.equal(generic.matvec(V, operand_dtype=D64), generic.matvec(V))
