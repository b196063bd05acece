"""Group influence (Koh et al. 2019; Basu, You & Feizi 2020) on real MNIST 1-vs-7, checked against
closed forms (explicit Hessians, third derivatives in NumPy) and against actual group retraining."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch
from sklearn.cluster import KMeans

import upweight as uw
from conftest import fit_linear, pooled
from reference import assert_not_constant, logistic_closed_form
from upweight.errors import InputError, NotFittedError
from upweight.influence.group import GroupInfluence
from upweight.loo.group import GroupLOOComparison, leave_group_out

sigmoid = scipy.special.expit


@pytest.fixture(scope="module")
def fitted(small_logreg):
    """400 real 1-vs-7 images (7×7 pooled, 49 features), l2 = 0.01, logistic regression at its
    minimum."""
    model, l2, (X, y), (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit((X, y))
    return inf, model, l2, (X, y), (Xt, yt)


def coherent_and_random_groups(X: np.ndarray, y: np.ndarray, min_frac: float = 0.1):
    """Coherent groups: the majority-label points of one k-means cluster (k = 4 and 6), each of size
    ≥ min_frac·n; random groups of the same sizes."""
    n = len(X)
    coherent = []
    for k in (4, 6):
        labels = KMeans(k, n_init=4, random_state=0).fit(X).labels_
        for c in range(k):
            idx = np.flatnonzero(labels == c)
            major = 1 if (y[idx] > 0).sum() * 2 >= len(idx) else -1
            g = idx[y[idx] == major]
            if len(g) >= min_frac * n:
                coherent.append(g)
    rng = np.random.default_rng(0)
    random = [rng.choice(n, size=len(g), replace=False) for g in coherent]
    return coherent, random


def closed_form_group(theta, X, y, Xt, yt, l2, U, *, third: bool, quad: bool):
    """Order 1 and 2 of the group removal effect for logistic regression, y ∈ {−1, +1}, in NumPy.

    With s = θᵀx and D = σ(s)σ(−s):  ∇L = −σ(−ys)·y·x,  ∇²L = D·xxᵀ,  ∇³L[v, v] = D(1 −
    2σ(s))(xᵀv)²·x.
      g_U = (1/n)Σ_U ∇L,  H_U = (1/n)Σ_U ∇²L,  Δθ₁ = H⁻¹g_U,
      Δθ₂ = Δθ₁ + H⁻¹H_UΔθ₁ [− ½H⁻¹(1/n)Σᵢ∇³Lᵢ[Δθ₁, Δθ₁]],
      Δf₂ = ∇fᵀΔθ₂ [+ ½Δθ₂ᵀ∇²f Δθ₂] for each test loss f.
    """
    n = len(X)
    _, _, H = logistic_closed_form(theta, X, y, Xt, yt, l2)
    s = X @ theta
    D = sigmoid(s) * sigmoid(-s)
    grads = -(sigmoid(-y * s) * y)[:, None] * X
    d1 = np.linalg.solve(H, grads[U].sum(0) / n)
    HU = (X[U] * D[U][:, None]).T @ X[U] / n
    rhs = HU @ d1
    if third:
        rhs = rhs - 0.5 * ((D * (1 - 2 * sigmoid(s)) * (X @ d1) ** 2) @ X) / n
    d2 = d1 + np.linalg.solve(H, rhs)
    st = Xt @ theta
    gf = -(sigmoid(-yt * st) * yt)[:, None] * Xt  # (n_test, p)
    f1 = gf @ d1
    f2 = gf @ d2
    if quad:
        f2 = f2 + 0.5 * sigmoid(st) * sigmoid(-st) * (Xt @ d2) ** 2
    return d1, d2, f1, f2


# ── order 1: the sum of the individual influences ─────────────────────────────────────────────
def test_order_one_is_the_sum_of_individual_influences(fitted):
    inf, model, l2, (X, y), (Xt, yt) = fitted
    n = len(X)
    rng = np.random.default_rng(3)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, 25, replace=False)] = True
    groups = [np.array([17]), rng.choice(n, 5, replace=False), np.arange(40, 120), mask]
    gi = inf.group_influence((Xt, yt), groups, order=1)
    assert isinstance(gi, GroupInfluence)
    assert gi.values.shape == (len(Xt), 4) and gi.param_change.shape == (4, 49)
    np.testing.assert_array_equal(gi.group_sizes, [1, 5, 80, 25])

    # closed form (Koh & Liang 2017 §2.3): Σ_{z∈U} −I_up,loss(z, z_test)/n and Σ_{z∈U}
    # −I_up,params(z)/n
    theta = model.weight.detach().numpy().ravel()
    up_loss, up_params, _ = logistic_closed_form(
        theta, X.numpy(), y.numpy(), Xt.numpy(), yt.numpy(), l2
    )
    idx = [np.flatnonzero(mask) if g.dtype == bool else g for g in groups]
    expected = np.stack([-up_loss[:, U].sum(1) / n for U in idx], axis=1)
    expected_params = np.stack([-up_params[U].sum(0) / n for U in idx])
    assert_not_constant(expected)
    np.testing.assert_allclose(gi.values, expected, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(gi.param_change, expected_params, rtol=1e-8, atol=1e-14)
    # and the sum of the library's individual removal effects
    single = inf.removal_effect((Xt, yt)).values
    np.testing.assert_allclose(
        gi.values, np.stack([single[:, U].sum(1) for U in idx], axis=1), rtol=1e-8, atol=1e-14
    )
    assert gi.provenance["order"] == 1 and gi.provenance["accepted"]


# ── order 2: the formula, against an explicit-Hessian closed form ────────────────────────────
@pytest.mark.parametrize("third, quad", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_order_two_matches_explicit_closed_form(fitted, solver, third, quad):
    inf, model, l2, (X, y), (Xt, yt) = fitted
    if solver == "cg":
        inf = uw.Influence(inf.objective, solver=uw.CG(rtol=1e-10), progress=False).fit((X, y))
    n = len(X)
    rng = np.random.default_rng(5)
    groups = [
        rng.choice(n, 60, replace=False),
        np.flatnonzero(y.numpy() > 0)[:50],
        np.array([3, 9]),
    ]
    gi = inf.group_influence(
        (Xt[:6], yt[:6]), groups, order=2, third_derivative=third, measure_hessian=quad
    )
    theta = model.weight.detach().numpy().ravel()
    for j, U in enumerate(groups):
        d1, d2, f1, f2 = closed_form_group(
            theta,
            X.numpy(),
            y.numpy(),
            Xt[:6].numpy(),
            yt[:6].numpy(),
            l2,
            U,
            third=third,
            quad=quad,
        )
        assert_not_constant(f2)
        # the second-order term is not negligible here
        assert np.abs(d2 - d1).max() > 1e-3 * np.abs(d1).max()
        tol = 1e-8 if solver == "direct" else 1e-6
        np.testing.assert_allclose(gi.param_change[j], d2, rtol=tol, atol=tol * np.abs(d2).max())
        np.testing.assert_allclose(gi.values[:, j], f2, rtol=tol, atol=tol * np.abs(f2).max())
    assert gi.provenance["third_derivative"] is third and gi.provenance["measure_hessian"] is quad


# ── against actual retraining ─────────────────────────────────────────────────────────────────
def test_small_group_second_order_is_nearly_exact(fitted):
    """For a small group, θ̂₋U − θ̂ from an exact refit: order 2 errs far less than order 1; with
    the third-derivative term (the full second-order expansion) less still than Basu's truncation.
    """
    inf, model, l2, (X, y), _ = fitted
    n = len(X)
    labels = KMeans(6, n_init=4, random_state=0).fit(X.numpy()).labels_
    U = np.flatnonzero(labels == 0)[:3]
    w = torch.ones(n, dtype=torch.float64)
    w[U] = 0.0
    obj = uw.Objective(model, "logistic", l2=l2)
    res = uw.refit(obj, uw.Data.from_any((X, y)), weights=w, gtol=1e-13, newton=True)
    assert res.grad_norm < 1e-12
    true = (res.params["weight"] - model.weight.detach()).numpy().ravel()
    assert_not_constant(true)
    err = {}
    for name, kw in {
        "o1": dict(order=1),
        "basu": dict(order=2),
        "full": dict(order=2, third_derivative=True),
    }.items():
        d = inf.group_influence((X[:1], y[:1]), [U], **kw).param_change[0]
        err[name] = np.linalg.norm(d - true) / np.linalg.norm(true)
    assert err["o1"] > 0.01  # the first-order error is real…
    assert err["basu"] < 0.3 * err["o1"]  # measured 0.21
    assert err["full"] < 0.1 * err["o1"]  # measured 0.03: the error left is O(|U|³/n³)
    assert err["full"] < 0.5 * err["basu"]


@pytest.fixture(scope="module")
def group_retraining(fitted):
    inf, _, _, (X, y), (Xt, yt) = fitted
    coherent, random = coherent_and_random_groups(X.numpy(), y.numpy())
    groups = coherent + random
    labels = ["coherent"] * len(coherent) + ["random"] * len(random)
    check = leave_group_out(inf, (Xt, yt), groups, labels=labels, gtol=1e-10, progress=False)
    basu = leave_group_out(
        inf, (Xt, yt), coherent, orders=(2,), measure_hessian=False, gtol=1e-10, progress=False
    )
    return check, basu, len(coherent), len(X)


def test_leave_group_out_second_order_beats_first_on_coherent_groups(group_retraining):
    """Coherent groups of ≥ 10% of the data (one label within one k-means cluster): both orders
    correlate with the actual change, and the second order is closer to it."""
    check, basu, k, n = group_retraining
    assert isinstance(check, GroupLOOComparison)
    assert k >= 6 and check.group_sizes[:k].min() >= 0.1 * n
    np.testing.assert_array_equal(check.group_sizes[:k], check.group_sizes[k:])
    assert check.retrain_grad_norm < 1e-8
    assert_not_constant(check.actual[:k])
    coh1, coh2 = check.agreement(1, "coherent"), check.agreement(2, "coherent")
    assert coh1["pearson"] > 0.5 and coh2["pearson"] > 0.9
    assert coh2["mae"] < 0.7 * coh1["mae"]
    assert abs(coh2["slope"] - 1) < abs(coh1["slope"] - 1)
    # Basu et al.'s own I⁽²⁾ (no test-Hessian term) beats order 1 as well
    np.testing.assert_allclose(basu.actual, check.actual[:k], rtol=1e-6, atol=1e-9)
    assert basu.mae[2] < coh1["mae"]
    assert abs(basu.slope[2] - 1) < abs(coh1["slope"] - 1)


def test_leave_group_out_coherent_groups_are_where_second_order_helps(group_retraining):
    """Basu et al. (2020): order 1 is fine for random groups and degrades on coherent ones of the
    same sizes; the second order recovers most of the gap."""
    check, _, k, _ = group_retraining
    rnd1, rnd2 = check.agreement(1, "random"), check.agreement(2, "random")
    coh1, coh2 = check.agreement(1, "coherent"), check.agreement(2, "coherent")
    assert_not_constant(check.actual[k:])
    assert rnd1["pearson"] > 0.99 and rnd2["pearson"] > 0.99
    assert rnd2["mae"] < rnd1["mae"]
    assert coh1["mae"] > 5 * rnd1["mae"]  # first order degrades on coherent groups
    assert coh1["pearson"] < rnd1["pearson"]
    # the gain from the second order is larger where the groups are coherent
    assert coh1["mae"] - coh2["mae"] > 5 * (rnd1["mae"] - rnd2["mae"])
    assert coh2["pearson"] - coh1["pearson"] > rnd2["pearson"] - rnd1["pearson"]
    # the summary names both orders and both kinds of group
    text = str(check)
    assert "coherent" in text and "random" in text and "order 2" in text


def test_cross_entropy_with_bias_second_order_against_retraining(mnist_1v7):
    """A two-class softmax with a bias (θ = weight and bias): order 2 tracks the refit better."""
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[400:700], 4), dtype=torch.float64)
    y = torch.tensor((d.y_train[400:700] > 0).astype(np.int64))
    l2 = 0.02
    model = fit_linear(X, y, "cross_entropy", l2, out=2, bias=True)
    obj = uw.Objective(model, "cross_entropy", l2=l2)
    inf = uw.Influence(obj, solver=uw.Direct(), progress=False).fit((X, y))
    U = np.flatnonzero(y.numpy() == 1)[:45]  # 15% of the data, all one class
    w = torch.ones(len(X), dtype=torch.float64)
    w[U] = 0.0
    res = uw.refit(obj, uw.Data.from_any((X, y)), weights=w, gtol=1e-12, newton=True)
    true = obj.space.flatten({k: v - obj.params[k] for k, v in res.params.items()}).numpy()
    e1 = np.linalg.norm(inf.group_influence((X[:2], y[:2]), [U], order=1).param_change[0] - true)
    e2 = np.linalg.norm(inf.group_influence((X[:2], y[:2]), [U], order=2).param_change[0] - true)
    assert_not_constant(true)
    assert e2 < 0.5 * e1


# ── inputs ────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "groups, match",
    [
        ([[]], "empty"),
        ([[0, 400]], "outside"),
        ([[1, 1, 2]], "repeats"),
        (np.arange(5), "list of index arrays"),
        ([1, 2, 3], "list of index arrays"),
        ([], "at least one group"),
        ([np.zeros(7, dtype=bool)], "mask"),
        ([[0.5, 1.0]], "integer"),
    ],
)
def test_bad_groups_are_rejected(fitted, groups, match):
    inf, *_, (Xt, yt) = fitted
    with pytest.raises(InputError, match=match):
        inf.group_influence((Xt[:1], yt[:1]), groups)


def test_bad_options_and_unfitted(fitted):
    inf, model, l2, _, (Xt, yt) = fitted
    with pytest.raises(InputError, match="order"):
        inf.group_influence((Xt[:1], yt[:1]), [[0, 1]], order=3)
    with pytest.raises(InputError, match="orders"):
        leave_group_out(inf, (Xt[:1], yt[:1]), [[0, 1]], orders=(1, 3), progress=False)
    with pytest.raises(InputError, match="labels"):
        leave_group_out(inf, (Xt[:1], yt[:1]), [[0, 1]], labels=["a", "b"], progress=False)
    with pytest.raises(NotFittedError):
        uw.Influence(uw.Objective(model, "logistic", l2=l2)).group_influence(
            (Xt[:1], yt[:1]), [[0]]
        )


def test_leave_group_out_on_dask_workers_and_from_a_store(
    fitted, group_retraining, dask_executor, tmp_path
):
    """The coherent groups' retrainings as tasks on a 2-worker LocalCluster give the in-process
    actual changes; kept in a store, a second call reads them all back instead of retraining."""
    inf, _, _, (X, y), (Xt, yt) = fitted
    check, _, k, _ = group_retraining
    coherent, _ = coherent_and_random_groups(X.numpy(), y.numpy())
    remote = leave_group_out(
        inf,
        (Xt, yt),
        coherent,
        orders=(1,),
        gtol=1e-10,
        progress=False,
        executor=dask_executor,
        store=tmp_path,
    )
    np.testing.assert_allclose(remote.actual, check.actual[:k], rtol=1e-9, atol=1e-14)
    assert remote.provenance["resumed_from_store"] == 0
    again = leave_group_out(
        inf, (Xt, yt), coherent, orders=(1,), gtol=1e-10, progress=False, store=tmp_path
    )
    assert again.provenance["resumed_from_store"] == k
    np.testing.assert_array_equal(again.actual, remote.actual)
    # a group is the set of its positions: the same groups reversed, in another order, are found
    # again
    shuffled = [np.asarray(g)[::-1] for g in coherent[::-1]]
    back = leave_group_out(
        inf, (Xt, yt), shuffled, orders=(1,), gtol=1e-10, progress=False, store=tmp_path
    )
    assert back.provenance["resumed_from_store"] == k
    np.testing.assert_array_equal(back.actual, remote.actual[::-1])
