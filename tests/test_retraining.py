"""Influence against actual re-optimisation: finite-difference upweighting, input perturbation,
and leave-one-out retraining (Koh & Liang 2017, Fig. 2) on real MNIST 1-vs-7."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from reference import assert_not_constant
from upweight.core.losses import logistic
from upweight.errors import StoreMismatchError


def refit_params(model, loss, l2, X, y, weights=None, init=None):
    obj = uw.Objective(model, loss, l2=l2)
    res = uw.refit(
        obj, uw.Data.from_any((X, y)), weights=weights, init=init, gtol=1e-13, newton=True
    )
    assert res.grad_norm < 1e-12
    return res.params


def test_up_params_matches_finite_difference_reoptimisation(small_logreg):
    """dθ̂/dε at ε = 0 for R(θ) + ε·L(z, θ), by central differences of two exact refits."""
    model, l2, (X, y), _ = small_logreg
    n = len(X)
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit((X, y))
    eps = 1e-4
    for i in (5, 123):
        got = inf.up_params([i]).values[0]
        w_plus, w_minus = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        w_plus[i] += n * eps  # (1/n)Σ wⱼLⱼ with wᵢ = 1 + nε is R + εL(zᵢ)
        w_minus[i] -= n * eps
        th_p = refit_params(model, "logistic", l2, X, y, w_plus)["weight"].reshape(-1)
        th_m = refit_params(model, "logistic", l2, X, y, w_minus)["weight"].reshape(-1)
        fd = ((th_p - th_m) / (2 * eps)).numpy()
        assert_not_constant(fd)
        assert np.linalg.norm(got - fd) / np.linalg.norm(fd) < 1e-5


def test_pert_loss_matches_finite_difference_reoptimisation(small_logreg):
    """d/dh of the test loss after retraining with x_i moved to x_i + h·u equals (1/n)⟨I_pert,loss,
    u⟩."""
    model, l2, (X, y), (Xt, yt) = small_logreg
    n = len(X)
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit((X, y))
    test = (Xt[:2], yt[:2])
    sel = [7, 42]
    pert = inf.pert_loss(test, train=sel)
    assert pert.values.shape == (2, 2, 49)
    rng = np.random.default_rng(0)
    h = 1e-3
    theta0 = {"weight": model.weight.detach()}
    for a, i in enumerate(sel):
        u = torch.tensor(rng.standard_normal(49))
        losses = []
        for sign in (+1, -1):
            Xp = X.clone()
            Xp[i] += sign * h * u
            th = refit_params(model, "logistic", l2, Xp, y, init=theta0)["weight"]
            losses.append(logistic(Xt[:2] @ th.T, yt[:2]).numpy())
        fd = (losses[0] - losses[1]) / (2 * h)
        predicted = pert.values[:, a, :] @ u.numpy() / n
        assert_not_constant(fd)
        np.testing.assert_allclose(predicted, fd, rtol=1e-4)
    # a batch of 3 with 2 test points: one training point per call (pairs ≤ batch), the same values
    small = (
        uw.Influence(
            uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False, batch_size=3
        )
        .fit((X, y))
        .pert_loss(test, train=[*sel, 100])
    )
    np.testing.assert_allclose(small.values[:, :2], pert.values, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def paper_logreg(mnist_1v7):
    """The paper's binary task: all 11,800 real 1-vs-7 training images, 784 pixels, l2 = 0.01."""
    from conftest import fit_linear

    d = mnist_1v7
    X = torch.tensor(d.x_train, dtype=torch.float64)
    y = torch.tensor(d.y_train)
    model = fit_linear(X, y, "logistic", 0.01, gtol=1e-9)
    Xt = torch.tensor(d.x_test, dtype=torch.float64)
    yt = torch.tensor(d.y_test)
    wrong = np.flatnonzero(np.sign((Xt @ model.weight.detach().T).numpy().ravel()) != yt.numpy())
    return model, (X, y), (Xt, yt), wrong


def test_leave_one_out_matches_influence_on_top_20(paper_logreg):
    """Paper Fig. 2 (left), on 1-vs-7: Pearson ≥ 0.99 and slope in [0.9, 1.1] over the top 20."""
    model, train, (Xt, yt), wrong = paper_logreg
    i = int(wrong[0])  # a wrongly classified test image, as in the paper
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=0.01), solver=uw.CG(rtol=1e-8), progress=False
    ).fit(train)
    check = uw.leave_one_out(inf, (Xt[i : i + 1], yt[i : i + 1]), k=20, progress=False)
    assert len(check.actual) == 20
    assert_not_constant(check.actual)
    assert check.retrain_grad_norm < 1e-6
    assert check.pearson >= 0.99
    assert 0.9 <= check.slope <= 1.1
    # the top 20 by |influence| really are the 20 largest predicted effects
    scores = inf.removal_effect((Xt[i : i + 1], yt[i : i + 1])).values[0]
    assert np.abs(check.predicted).min() >= np.sort(np.abs(scores))[-20] - 1e-15


def test_leave_one_out_with_random_points_and_user_train_fn(small_logreg):
    """select='random' and a user-supplied train_fn (here an exact refit written by the user)."""
    model, l2, train, (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    n = len(train[0])

    def train_fn(objective, data, init):
        # the user's own refit on the m = n − 1 remaining points. Removing z keeps the paper's
        # objective (1/n)Σ_{j≠i}L + (l2/2)‖θ‖² = (m/n)·[(1/m)Σ_{j≠i}L + (l2·n/m)/2‖θ‖²].
        obj = uw.Objective(model, "logistic", l2=l2 * n / len(data))
        return uw.refit(obj, data, init=init, gtol=1e-12).params

    a = uw.leave_one_out(inf, (Xt[:1], yt[:1]), k=8, select="random", seed=1, progress=False)
    b = uw.leave_one_out(
        inf, (Xt[:1], yt[:1]), k=8, select="random", seed=1, train_fn=train_fn, progress=False
    )
    np.testing.assert_array_equal(a.train_ids, b.train_ids)
    # baselines: θ̂ vs its refit
    np.testing.assert_allclose(a.actual, b.actual, rtol=1e-4, atol=1e-8)
    assert a.pearson > 0.95


# ── resumable and distributed leave-one-out ─────────────────────────────────────────────
class _CrashAfter:
    """Wraps ``upweight.refit``: raises KeyboardInterrupt on call number ``after + 1`` (a crash)."""

    def __init__(self, real, after: int) -> None:
        self.real, self.after, self.calls = real, after, 0

    def __call__(self, *args, **kwargs):
        if self.calls == self.after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.real(*args, **kwargs)


def test_leave_one_out_resumes_from_its_store_after_a_crash(small_logreg, tmp_path, monkeypatch):
    """A crash after 3 of 8 refits; the rerun with the same store retrains only the 5 left and gives
    the uninterrupted run's numbers bit for bit; a different computation is refused."""
    import upweight.loo.runner as runner

    model, l2, train, (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    test = (Xt[:1], yt[:1])
    whole = uw.leave_one_out(inf, test, k=8, progress=False)
    assert whole.pearson > 0.99  # the retrainings are real (and agree with influence)

    real = runner.refit
    # the full refit + 3 leave-one-outs
    monkeypatch.setattr(runner, "refit", _CrashAfter(real, after=4))
    with pytest.raises(KeyboardInterrupt):
        uw.leave_one_out(inf, test, k=8, progress=False, store=tmp_path / "loo")
    counting = _CrashAfter(real, after=10**9)
    monkeypatch.setattr(runner, "refit", counting)
    resumed = uw.leave_one_out(inf, test, k=8, progress=False, store=tmp_path / "loo")
    assert counting.calls == 1 + 5  # the full refit (the baseline) and the 5 missing points
    assert resumed.provenance["resumed_from_store"] == 3
    np.testing.assert_array_equal(resumed.actual, whole.actual)
    np.testing.assert_array_equal(resumed.train_ids, whole.train_ids)
    assert resumed.pearson == whole.pearson and resumed.retrain_grad_norm == whole.retrain_grad_norm

    again = uw.leave_one_out(inf, test, k=8, progress=False, store=tmp_path / "loo")
    assert again.provenance["resumed_from_store"] == 8 and counting.calls == 1 + 5 + 1
    with pytest.raises(StoreMismatchError, match="gtol"):
        uw.leave_one_out(inf, test, k=8, gtol=1e-7, progress=False, store=tmp_path / "loo")
    with pytest.raises(StoreMismatchError, match="test_data"):
        uw.leave_one_out(inf, (Xt[1:2], yt[1:2]), k=8, progress=False, store=tmp_path / "loo")


def test_leave_one_out_store_records_a_train_fns_settings(small_logreg, tmp_path):
    """A retraining function's plain settings are part of the fingerprint: changing one is
    refused."""
    from dataclasses import dataclass

    model, l2, train, (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    n = len(train[0])

    @dataclass
    class UserRefit:
        gtol: float

        def __call__(self, objective, data, init):
            obj = uw.Objective(model, "logistic", l2=l2 * n / len(data))
            # a RefitResult: its ‖∇R‖ is recorded
            return uw.refit(obj, data, init=init, gtol=self.gtol)

    a = uw.leave_one_out(
        inf, (Xt[:1], yt[:1]), k=4, train_fn=UserRefit(1e-11), progress=False, store=tmp_path
    )
    # recorded, not NaN
    assert 0 < a.retrain_grad_norm < 1e-8 and a.provenance["retrain_iterations_mean"] >= 1
    with pytest.raises(StoreMismatchError, match="retraining.gtol"):
        uw.leave_one_out(
            inf, (Xt[:1], yt[:1]), k=4, train_fn=UserRefit(1e-6), progress=False, store=tmp_path
        )


def test_leave_one_out_on_dask_workers_equals_in_process(small_logreg, dask_executor, tmp_path):
    """Each retraining a task on a 2-worker LocalCluster: the in-process numbers; a store half
    filled in-process is finished on the workers."""
    model, l2, train, (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    test = (Xt[2:3], yt[2:3])
    local = uw.leave_one_out(inf, test, k=6, progress=False)
    remote = uw.leave_one_out(inf, test, k=6, progress=False, executor=dask_executor)
    np.testing.assert_allclose(remote.actual, local.actual, rtol=1e-10, atol=1e-15)
    assert_not_constant(remote.actual)

    ids = local_ids(inf, local)
    uw.leave_one_out(inf, test, ids=ids[:3], progress=False, store=tmp_path)  # 3 in-process
    both = uw.leave_one_out(
        inf, test, ids=ids, progress=False, store=tmp_path, executor=dask_executor
    )
    assert both.provenance["resumed_from_store"] == 3  # and the 3 others on the workers
    np.testing.assert_array_equal(both.actual[:3], local.actual[:3])
    np.testing.assert_allclose(both.actual, local.actual, rtol=1e-10, atol=1e-15)


def test_leave_one_out_store_is_reused_by_a_larger_k_and_other_ids(
    small_logreg, tmp_path, monkeypatch
):
    """Retrainings are kept under the point they removed: k = 8 after k = 5 retrains only 3 points,
    a reordered subset none, and each number is the one a fresh run computes."""
    import upweight.loo.runner as runner

    model, l2, train, (Xt, yt) = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    test = (Xt[:1], yt[:1])
    fresh = uw.leave_one_out(inf, test, k=8, progress=False)
    counting = _CrashAfter(runner.refit, after=10**9)
    monkeypatch.setattr(runner, "refit", counting)
    five = uw.leave_one_out(inf, test, k=5, progress=False, store=tmp_path)
    assert counting.calls == 1 + 5 and five.provenance["resumed_from_store"] == 0
    eight = uw.leave_one_out(inf, test, k=8, progress=False, store=tmp_path)
    assert counting.calls == 1 + 5 + 1 + 3 and eight.provenance["resumed_from_store"] == 5
    np.testing.assert_array_equal(eight.actual, fresh.actual)
    ids = local_ids(inf, fresh)
    picked = uw.leave_one_out(inf, test, ids=ids[[6, 2, 2, 0]], progress=False, store=tmp_path)
    assert counting.calls == 1 + 5 + 1 + 3 + 1 and picked.provenance["resumed_from_store"] == 4
    np.testing.assert_array_equal(picked.actual, fresh.actual[[6, 2, 2, 0]])


def local_ids(inf, comparison):
    """Positions in the fitted training data of a comparison's removed points."""
    pos = {int(v): j for j, v in enumerate(inf.data_.ids.numpy())}
    return np.array([pos[int(t)] for t in comparison.train_ids])
