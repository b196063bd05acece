"""Binary logistic regression on real MNIST 1-vs-7 against the closed form of Koh & Liang §2.3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import fit_linear
from reference import assert_not_constant, logistic_closed_form, spearman


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def logreg_784(mnist_1v7):
    """1,000 real training images, all 784 pixels, l2 = 0.01 (the paper's λ), trained to the
    minimum."""
    d = mnist_1v7
    X = torch.tensor(d.x_train[:1000], dtype=torch.float64)
    y = torch.tensor(d.y_train[:1000])
    Xt = torch.tensor(d.x_test[:8], dtype=torch.float64)
    yt = torch.tensor(d.y_test[:8])
    l2 = 0.01
    model = fit_linear(X, y, "logistic", l2)
    theta = model.weight.detach().numpy().ravel()
    ref_loss, ref_params, _ = logistic_closed_form(
        theta, X.numpy(), y.numpy(), Xt.numpy(), yt.numpy(), l2
    )
    assert_not_constant(ref_loss)
    return model, l2, (X, y), (Xt, yt), ref_loss, ref_params


@pytest.mark.parametrize("solver", [uw.Direct(), uw.CG(rtol=1e-10)], ids=["direct", "cg"])
def test_up_loss_matches_closed_form(logreg_784, solver):
    model, l2, train, test, ref_loss, _ = logreg_784
    inf = uw.Influence(uw.Objective(model, "logistic", l2=l2), solver=solver, progress=False).fit(
        train
    )
    scores = inf.up_loss(test)
    assert scores.values.shape == ref_loss.shape
    assert rel_err(scores.values, ref_loss) < 1e-6


def test_removal_effect_is_minus_up_loss_over_n(logreg_784):
    model, l2, train, test, ref_loss, _ = logreg_784
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    removal = inf.removal_effect(test)
    assert removal.kind == "removal_effect"
    assert rel_err(removal.values, -ref_loss / len(train[0])) < 1e-6


def test_up_params_and_self_influence_match_closed_form(logreg_784):
    model, l2, train, test, _, ref_params = logreg_784
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    sel = [3, 17, 250, 999]
    up = inf.up_params(sel)
    assert up.values.shape == (4, 784)
    assert rel_err(up.values, ref_params[sel]) < 1e-6
    # I_up,loss(z, z) = ∇L(z)ᵀ I_up,params(z)
    X, y = train
    theta = model.weight.detach().numpy().ravel()
    s = X.numpy() @ theta
    grads = -(1 / (1 + np.exp(y.numpy() * s)) * y.numpy())[:, None] * X.numpy()
    ref_self = np.einsum("ij,ij->i", grads[sel], ref_params[sel])
    self_inf = inf.self_influence(sel)
    assert rel_err(self_inf.values, ref_self) < 1e-6
    assert (self_inf.values < 0).all()


def test_top_k_orders_harmful_and_helpful(logreg_784):
    model, l2, train, test, ref_loss, _ = logreg_784
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    scores = inf.up_loss(test)
    harmful = scores.top_k(5, test=2, harmful=True)
    helpful = scores.top_k(5, test=2, harmful=False)
    np.testing.assert_array_equal(harmful.train_ids, np.argsort(-ref_loss[2])[:5])
    np.testing.assert_array_equal(helpful.train_ids, np.argsort(ref_loss[2])[:5])
    assert (harmful.values > 0).all() and (helpful.values < 0).all()
    # the removal view ranks the same points: removing a helpful point raises the test loss
    rem = scores.as_removal_effect().top_k(5, test=2, harmful=False)
    np.testing.assert_array_equal(rem.train_ids, helpful.train_ids)
    assert (rem.values > 0).all()


def test_lissa_ranks_like_the_closed_form(small_logreg):
    model, l2, train, test = small_logreg
    X, y = train
    Xt, yt = test
    theta = model.weight.detach().numpy().ravel()
    ref, _, H = logistic_closed_form(
        theta, X.numpy(), y.numpy(), Xt[:4].numpy(), yt[:4].numpy(), l2
    )
    # eigenvalues of H lie in [0.01, 0.16]: 1,000 steps remove the bias; 4 repeats of
    # 128-point minibatches bring the variance down to a few per cent.
    solver = uw.LiSSA(depth=1000, repeats=4, batch_size=128, seed=0, progress=False)
    inf = uw.Influence(uw.Objective(model, "logistic", l2=l2), solver=solver, progress=False).fit(
        train
    )
    scores = inf.up_loss((Xt[:4], yt[:4]))
    for j in range(4):
        assert spearman(scores.values[j], ref[j]) >= 0.99
    assert rel_err(scores.values, ref) < 0.1  # magnitudes too: the scale is divided back out
    assert scores.provenance["solver_scale"] > 0.16  # auto scale above λmax(H) = 0.162
