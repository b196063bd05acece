"""``Influence(query_rank=r)``: up_loss with each layer's block of s_test replaced by its best
rank-r approximation (Eckart–Young), against an independent float64 computation: the explicit
Hessian by double backward, s_test by ``torch.linalg.solve``, per-sample gradients by a plain
autograd loop (tests/reference.py) and a numpy truncated SVD of each (out, cols) block of s_test.

Tolerance 1e-10 of the largest score: everything is float64; the truncated SVD of a block is
stable as long as σ_r and σ_{r+1} are well apart (checked below), so the two computations differ
by rounding only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call

import upweight as uw
from conftest import TanhMLP, pooled
from reference import assert_not_constant, explicit_hessian, loop_grads
from upweight.core.layers import find_layers
from upweight.errors import InputError, StoreMismatchError, UnsupportedModelError

D64 = torch.float64
TOL = 1e-10
DAMPING = 4.0  # the models are not at a minimum: damping keeps H + δI positive definite


class ScaledMLP(TanhMLP):
    """A two-layer MLP with a bare per-unit scale: one parameter in no factorable layer."""

    def __init__(self) -> None:
        super().__init__(49, 8, 3)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return self.fc2(self.scale * torch.tanh(self.fc1(x)))


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3 * 7 * 7, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c1(x.reshape(-1, 1, 7, 7))).flatten(1))


class TiedLinear(torch.nn.Module):
    """fc's weight is also used outside fc: fc cannot be factored (find_layers checks it on probe
    points)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(49, 49, bias=False)
        self.out = torch.nn.Linear(49, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x) + x @ self.fc.weight))


class BareLinear(torch.nn.Module):
    """A linear model on a bare parameter: nothing for structured scoring to factor."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(0.01 * torch.randn(3, 49))

    def forward(self, x):
        return x @ self.w.T


def make(kind: str) -> uw.Objective:
    torch.manual_seed(0)
    model = {
        "mlp": lambda: TanhMLP(49, 8, 3),
        "scaled": ScaledMLP,
        "conv": ConvNet,
        "tied": TiedLinear,
    }[kind]()
    return uw.Objective(model.double().eval(), "cross_entropy", l2=0.01)


@pytest.fixture(scope="module")
def digits(mnist_1v7):
    """Real MNIST 1-vs-7 images pooled to 7×7, three classes (7, 1 with ink below / above the
    median)."""
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:80], 4), dtype=D64)
    ink = X.sum(1)
    y = torch.where(torch.tensor(d.y_train[:80]) < 0, 0, torch.where(ink > ink.median(), 1, 2))
    Xt = torch.tensor(pooled(d.x_test[:4], 4), dtype=D64)
    yt = torch.tensor([0, 1, 2, 1])
    return (X, y), (Xt, yt)


# ── the independent reference ────────────────────────────────────────────────────────────
def flat(obj: uw.Objective):
    names = list(obj.params)
    sizes = [obj.params[n].numel() for n in names]
    theta = torch.cat([obj.params[n].reshape(-1) for n in names])
    fixed = {n: t.detach() for n, t in obj.model.named_parameters()}

    def params(f):
        return {
            **fixed,
            **{n: t.reshape(obj.params[n].shape) for n, t in zip(names, f.split(sizes))},
        }

    return theta, params


_CACHE: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}


def exact_parts(obj: uw.Objective, train, test) -> tuple[np.ndarray, np.ndarray]:
    """(S, G): S = (H + δI)⁻¹∇θL(z_test) with H by double backward, G the per-sample training
    gradients by an autograd loop — both float64, cached per model and data."""
    key = (type(obj.model).__name__, id(train[0]))
    if key not in _CACHE:
        (X, y), (Xt, yt) = train, test
        theta, params = flat(obj)

        def loss_one(t, x, yy):
            return obj.loss_fn(functional_call(obj.model, params(t), (x,)), yy)[0]

        def risk(t):
            return (
                obj.loss_fn(functional_call(obj.model, params(t), (X,)), y).mean()
                + 0.5 * obj.l2 * (t**2).sum()
            )

        H = explicit_hessian(risk, theta) + DAMPING * torch.eye(len(theta), dtype=D64)
        G, Gt = loop_grads(loss_one, theta, X, y), loop_grads(loss_one, theta, Xt, yt)
        _CACHE[key] = torch.linalg.solve(H, Gt.T).T.numpy(), G.numpy()
    return _CACHE[key]


def reference(obj: uw.Objective, train, test, rank: int | None) -> np.ndarray:
    """−S_r Gᵀ (``exact_parts``), S_r = S with every layer block truncated to rank r by numpy's
    SVD (the non-factorable coordinates untouched)."""
    S, G = exact_parts(obj, train, test)
    S = S.copy()
    if rank is not None:
        for blk in find_layers(obj, uw.Data.from_any(train)).blocks:
            idx = blk.index.numpy()
            for j in range(len(S)):
                u, s, vt = np.linalg.svd(S[j, idx], full_matrices=False)
                if rank < len(s):
                    assert s[rank - 1] - s[rank] > 1e-3 * s[0], (
                        "σ_r ≈ σ_r+1: the truncation would be ill-posed"
                    )
                S[j, idx] = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return -S @ G.T


def fitted(obj: uw.Objective, train, **kw) -> uw.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        return uw.Influence(obj, solver=uw.Direct(), damping=DAMPING, progress=False, **kw).fit(
            train
        )


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= TOL * float(np.abs(b).max())


# ── rank < min(out, cols): the truncated-SVD scores ─────────────────────────────────────
@pytest.mark.parametrize("kind, rank", [("mlp", 1), ("mlp", 2), ("scaled", 2), ("conv", 1)])
def test_low_rank_scores_equal_the_truncated_svd_reference(digits, kind, rank):
    train, test = digits
    obj = make(kind)
    got = fitted(obj, train, query_rank=rank).up_loss(test)
    ref = reference(obj, train, test, rank)
    exact = reference(obj, train, test, None)
    assert_not_constant(ref)
    assert close(got.values, ref)
    assert not close(got.values, exact)  # an approximation: rank r truncates some layer
    layers = got.provenance["query_rank_layers"]
    assert (
        got.provenance["query_rank"] == rank
        and "Eckart–Young" in got.provenance["query_rank_approximates"]
    )
    if kind == "mlp":  # fc1 8×50, fc2 3×9
        assert layers == (
            f"fc1 (linear 8×50): rank {rank} of 8 (truncated SVD)",
            f"fc2 (linear 3×9): rank {rank} of 3 (truncated SVD)",
        )
    if kind == "scaled":  # the bare scale is scored exactly, from per-sample gradients
        assert layers[-1] == "['scale']: exact (per-sample gradients, no factorable layer)"
        assert "per-sample gradients for ['scale']" in got.provenance["structured_scoring"]


# ── rank ≥ min(out, cols): exact ────────────────────────────────────────────────────────
@pytest.mark.parametrize("kind", ["mlp", "scaled"])
def test_full_rank_equals_exact_up_loss(digits, kind):
    train, test = digits
    obj = make(kind)
    got = fitted(obj, train, query_rank=8).up_loss(test)  # min(out, cols) = 8 and 3
    exact = fitted(obj, train, structured=True).up_loss(test).values
    ref = reference(obj, train, test, None)
    assert close(got.values, exact) and close(got.values, ref)
    assert (
        got.provenance["query_rank_layers"][1]
        == "fc2 (linear 3×9): exact (query_rank 8 ≥ min(out, cols) = 3)"
    )


def test_mlp_with_one_layer_truncated_and_one_exact(digits):
    """rank 3: fc1 (8×50) truncated, fc2 (3×9) exact — the reference truncates only where
    r < min."""
    train, test = digits
    obj = make("mlp")
    got = fitted(obj, train, query_rank=3).up_loss(test)
    assert close(got.values, reference(obj, train, test, 3))
    assert got.provenance["query_rank_layers"][1].endswith(
        "exact (query_rank 3 ≥ min(out, cols) = 3)"
    )


# ── what query_rank does not touch, and errors ──────────────────────────────────────────
def test_self_influence_is_exact_and_says_so(digits):
    train, _ = digits
    obj = make("mlp")
    sel = list(range(0, 80, 10))
    a = fitted(obj, train, query_rank=1).self_influence(sel)
    b = fitted(obj, train).self_influence(sel)
    assert np.array_equal(a.values, b.values)
    assert a.provenance["query_rank"].startswith("not used")


def test_store_keeps_ranks_apart(digits, tmp_path):
    train, test = digits
    obj = make("mlp")
    fitted(obj, train, query_rank=1).up_loss(test, store=tmp_path / "s")
    with pytest.raises(StoreMismatchError):
        fitted(obj, train, query_rank=2).up_loss(test, store=tmp_path / "s")
    with pytest.raises(StoreMismatchError):
        fitted(obj, train).up_loss(test, store=tmp_path / "s")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_query_rank_is_an_input_error(digits, bad):
    train, _ = digits
    with pytest.raises(InputError, match="'query_rank' parameter of Influence must be an int"):
        fitted(make("mlp"), train, query_rank=bad)


def test_query_rank_without_structured_scoring_is_refused(digits):
    train, _ = digits
    with pytest.raises(
        UnsupportedModelError, match=r"query_rank=2.*structured=False.*Use structured='auto'"
    ):
        fitted(make("mlp"), train, query_rank=2, structured=False)
    with pytest.raises(
        UnsupportedModelError,
        match=r"query_rank=2.*no parameter of θ is in a factorable.*query_rank=None",
    ):
        fitted(
            uw.Objective(BareLinear().double().eval(), "cross_entropy", l2=0.01),
            train,
            query_rank=2,
        )
    # a weight also used outside its layer: find_layers leaves that layer to per-sample gradients,
    # and the low-rank scoring applies to the layer that is factorable
    tied = fitted(make("tied"), train, query_rank=2)
    assert tied.scoring_ == "structured" and tied._scoring_plan.other == ("fc.weight",)
