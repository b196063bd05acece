"""FastIF kNN pre-filtering (Guo et al. 2021) on the paper's MNIST 1-vs-7 logistic regression.

The model: binary logistic regression on all 11,800 bundled 1-vs-7 training images (784 pixels,
no bias, l2 = 0.01), trained to the minimum. Candidate scores are compared with the exhaustive
scores and with the closed form of Koh & Liang §2.3; the search itself with a brute-force
maximum inner-product search over independently computed (closed-form) gradients.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import upweight as uw
from reference import assert_not_constant, logistic_closed_form, sigmoid
from upweight.errors import InputError, NotAtMinimumWarning, ShapeError
from upweight.influence.fastif import (
    FastIFIndex,
    FastIFScores,
    GaussianProjection,
    KNNPrefilter,
    fastif_up_loss,
)

L2 = 0.01


@pytest.fixture(scope="module")
def setting(mnist_1v7):
    """θ̂, the fitted Influence (CG rtol 1e-8), the test points and their exhaustive scores.

    Test points: all 18 misclassified test images and the first 20 test images (38 in all;
    none of the first 20 is misclassified).
    """
    from conftest import fit_linear

    d = mnist_1v7
    X = torch.tensor(d.x_train, dtype=torch.float64)
    y = torch.tensor(d.y_train)
    model = fit_linear(X, y, "logistic", L2, gtol=1e-9)
    Xt = torch.tensor(d.x_test, dtype=torch.float64)
    yt = torch.tensor(d.y_test)
    wrong = np.flatnonzero(np.sign((Xt @ model.weight.detach().T).numpy().ravel()) != yt.numpy())
    sel = np.unique(np.r_[wrong, np.arange(20)])
    test = (Xt[sel], yt[sel])
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=L2), solver=uw.CG(rtol=1e-8), progress=False
    ).fit((X, y))
    exact = inf.up_loss(test)
    s_test = inf.s_test(test)
    return {
        "model": model,
        "X": X,
        "y": y,
        "test": test,
        "sel": sel,
        "n_wrong": len(wrong),
        "inf": inf,
        "exact": exact,
        "s_test": s_test,
    }


def closed_form_grads(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇θL(z) = −σ(−y θᵀx)·y·x for L = log(1 + exp(−y θᵀx)), one row per point."""
    return -(sigmoid(-y * (X @ theta)) * y)[:, None] * X


def test_candidate_scores_equal_exhaustive_scores_and_closed_form(setting):
    """Every FastIF value is the exhaustive I_up,loss of that training point (1e-10 relative), and
    matches Koh & Liang's closed form −y_t y σ(−y_t θᵀx_t) σ(−y θᵀx) x_tᵀH⁻¹x (float64 NumPy)."""
    inf, exact, test = setting["inf"], setting["exact"], setting["test"]
    fs = fastif_up_loss(inf, test)  # default pre-filter, k = 1,000; solves s_test itself
    m, n = len(setting["sel"]), inf.n_train_
    assert isinstance(fs, FastIFScores)
    assert fs.shape == (m, 1000) and fs.train_positions.shape == (m, 1000)
    # ids of the fitted data are 0..n−1
    np.testing.assert_array_equal(fs.train_ids, fs.train_positions)
    np.testing.assert_array_equal(fs.test_ids, np.arange(m))
    assert fs.n_train == n == 11800
    want = np.take_along_axis(exact.values, fs.train_positions, axis=1)
    assert_not_constant(want)
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert np.all(np.abs(fs.values - want) <= 1e-10 * scale)

    theta = setting["model"].weight.detach().numpy().ravel()
    cf, _, _ = logistic_closed_form(
        theta, setting["X"].numpy(), setting["y"].numpy(), test[0].numpy(), test[1].numpy(), L2
    )
    np.testing.assert_allclose(
        fs.values,
        np.take_along_axis(cf, fs.train_positions, axis=1),
        rtol=1e-6,
        atol=1e-6 * np.abs(cf).max(),
    )

    prov = fs.provenance
    assert (
        prov["k"] == 1000
        and prov["backend"] == "sklearn"
        and prov["metric"] == "inner_product"
        and prov["projection_dim"] == 256
    )
    assert prov["index_reused"] is False and prov["s_test_reused"] is False
    assert 0 < prov["n_scored"] <= m * 1000 and prov["n_scored"] == len(
        np.unique(fs.train_positions)
    )
    for key in ("index_seconds", "s_test_seconds", "candidate_seconds", "scoring_seconds"):
        assert prov[key] >= 0


def test_recall_of_exact_top10_at_k_1000(setting):
    """The issue's criterion: FastIF recall ≥ 0.9 of the exact top-10 at k = 1,000 on MNIST.

    Over the 38 test points (18 misclassified + the first 20), with the default pre-filter
    (projected gradients, m = 256, seed 0, inner-product search, query = the test gradient), the
    measured mean recall of the exact top-10 by |I_up,loss| is 1.000 (every test point 10/10), and
    1.000 for the 10 most harmful and 10 most helpful separately; over seeds 0–4 the mean is
    0.995–1.000 with a worst single test point of 9/10 (bench/FASTIF.md). Asserted: mean ≥ 0.9
    (the issue) and no test point below 0.8, for all three rankings.

    Control: input-space nearest neighbours (the pixels, cosine) find a mean of only 0.35 of the
    top-10 at the same k (Koh & Liang §2.3: influence is not nearest neighbours in input space);
    asserted < 0.6, so the recall above is not what any k = 1,000 subset of 11,800 would give.
    """
    inf, exact, test, s_test = setting["inf"], setting["exact"], setting["test"], setting["s_test"]
    fs = fastif_up_loss(inf, test, KNNPrefilter(k=1000), s_test=s_test)
    for by in ("abs", "harmful", "helpful"):
        r = fs.recall(exact, 10, by=by)
        assert r.shape == (len(setting["sel"]),)
        assert r.mean() >= 0.9, (by, r)
        assert r.min() >= 0.8, (by, r)
    # the ranking of the scored candidates is then the exhaustive ranking
    for i in (0, len(setting["sel"]) - 1):
        for harmful in (True, False):
            got, want = (
                fs.top_k(5, test=i, harmful=harmful),
                exact.top_k(5, test=i, harmful=harmful),
            )
            np.testing.assert_array_equal(got.train_ids, want.train_ids)
            np.testing.assert_allclose(got.values, want.values, rtol=1e-10)

    control = fastif_up_loss(
        inf, test, KNNPrefilter(k=1000, representation="features", metric="cosine"), s_test=s_test
    )
    rc = control.recall(exact, 10)
    assert_not_constant(rc)
    assert rc.mean() < 0.6


def test_k_at_least_n_scores_every_point(setting):
    """k ≥ n: every training point is a candidate (nothing is indexed), recall 1, values =
    exhaustive."""
    inf, exact, test, s_test = setting["inf"], setting["exact"], setting["test"], setting["s_test"]
    n = inf.n_train_
    for k in (n, n + 7):
        index = KNNPrefilter(k=k).fit(inf)
        assert index.exhaustive and index.backend == "none" and index.keys is None and index.k == n
        fs = fastif_up_loss(inf, test, index, s_test=s_test)
        assert fs.shape == (len(setting["sel"]), n)
        for row in fs.train_positions:
            np.testing.assert_array_equal(np.sort(row), np.arange(n))
        np.testing.assert_allclose(
            fs.values,
            np.take_along_axis(exact.values, fs.train_positions, 1),
            rtol=1e-10,
            atol=1e-14,
        )
        assert fs.provenance["index_reused"] is True and fs.provenance["n_scored"] == n
        for by in ("abs", "harmful", "helpful"):
            np.testing.assert_array_equal(fs.recall(exact, 10, by=by), 1.0)
    with pytest.raises(InputError, match="nothing was indexed"):
        KNNPrefilter(k=n).fit(inf).with_k(10)


def test_gradient_keys_and_search_against_closed_form(setting):
    """The index keys are Ω∇θL(z) with the closed-form gradients, and the candidates are the exact
    top-k of |approximate influence| (brute force over all n), for both-sided and one-sided search.
    """
    inf, test = setting["inf"], setting["test"]
    theta = setting["model"].weight.detach().numpy().ravel()
    X, y = setting["X"].numpy(), setting["y"].numpy()
    index = KNNPrefilter(k=300).fit(inf)
    assert (
        isinstance(index, FastIFIndex)
        and index.keys.shape == (11800, 256)
        and index.keys.dtype == np.float32
    )
    Omega = index.projection._full().numpy()
    keys = closed_form_grads(theta, X, y) @ Omega
    assert_not_constant(keys)
    np.testing.assert_allclose(index.keys, keys, rtol=1e-5, atol=1e-6 * np.abs(keys).max())
    # the test-loss gradients, projected
    Q = closed_form_grads(theta, test[0].numpy(), test[1].numpy()) @ Omega
    approx = -(Q @ keys.T)  # ≈ −∇f_testᵀ∇L (H ≈ I)
    for direction, key in (("both", -np.abs(approx)), ("harmful", -approx), ("helpful", approx)):
        c = (
            index.with_k(300).candidates(test)
            if direction == "both"
            else KNNPrefilter(k=300, direction=direction).fit(inf).candidates(test)
        )
        assert c.shape == (len(Q), 300) and c.dtype == np.int64
        assert all(len(np.unique(row)) == 300 for row in c) and c.min() >= 0 and c.max() < 11800
        want = np.argsort(key, axis=1, kind="stable")[:, :300]
        overlap = np.mean([len(np.intersect1d(a, b)) / 300 for a, b in zip(c, want)])
        # float32 keys: swaps only at near-ties of the 300th place
        assert overlap >= 0.995, (direction, overlap)
        np.testing.assert_array_equal(c[:, :5], want[:, :5])  # best first


def test_candidates_order_prefix_and_determinism(setting):
    """Candidates for k' < k are the first k' of those for k; one seed gives one projection."""
    inf, test = setting["inf"], setting["test"]
    index = KNNPrefilter(k=1000).fit(inf)
    c = index.candidates(test)
    np.testing.assert_array_equal(index.with_k(100).candidates(test), c[:, :100])
    np.testing.assert_array_equal(KNNPrefilter(k=100).fit(inf).candidates(test), c[:, :100])
    other = KNNPrefilter(k=1000, seed=1).fit(inf)
    assert not np.array_equal(other.keys, index.keys)
    for metric in ("cosine", "euclidean"):  # kNN proper: nearest first
        big = KNNPrefilter(k=500, metric=metric).fit(inf)
        np.testing.assert_array_equal(big.with_k(50).candidates(test), big.candidates(test)[:, :50])


def test_gaussian_projection():
    """Ω has i.i.d. N(0, 1/m) entries, the same whether cached or regenerated block by block."""
    p, m = 784, 256
    cached = GaussianProjection(p, m, seed=3, dtype=torch.float64)
    blocks = GaussianProjection(p, m, seed=3, dtype=torch.float64, max_cached_bytes=0)
    assert cached._cache is not None and blocks._cache is None
    blocks.rows_per_block = 100  # several blocks
    cached.rows_per_block = 100
    X = torch.randn(5, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cached._cache = cached._full()
    np.testing.assert_allclose(blocks(X).numpy(), cached(X).numpy(), rtol=1e-12, atol=1e-12)
    Omega = cached._full().numpy()
    assert abs(Omega.mean()) < 5 * np.sqrt(1 / m / Omega.size)
    assert abs(Omega.var() * m - 1) < 0.02  # 200,704 entries: the variance estimate's sd is 0.3 %
    other = GaussianProjection(p, m, seed=4, dtype=torch.float64)._full().numpy()
    assert abs(np.corrcoef(Omega.ravel(), other.ravel())[0, 1]) < 0.01


def test_features_representation(setting, small_logreg):
    """Default features = the input to the last nn.Linear: the pixels for a linear model, the hidden
    activations tanh(W₁x + b₁) for an MLP; a callable is applied to the inputs as given."""
    model, l2, train, test = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    idx = KNNPrefilter(k=50, representation="features").fit(inf)
    assert idx.metric == "cosine"
    np.testing.assert_allclose(idx.keys, train[0].numpy(), rtol=1e-6)
    cos = (test[0] / test[0].norm(dim=1, keepdim=True)) @ (
        train[0] / train[0].norm(dim=1, keepdim=True)
    ).T
    want = torch.argsort(-cos, dim=1, stable=True)[:, :5].numpy()
    np.testing.assert_array_equal(idx.candidates(test)[:, :5], want)

    torch.manual_seed(0)
    mlp = (
        torch.nn.Sequential(torch.nn.Linear(49, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        .double()
        .eval()
    )
    with warnings.catch_warnings():
        # an untrained MLP: only the features are checked
        warnings.simplefilter("ignore", NotAtMinimumWarning)
        inf2 = uw.Influence(uw.Objective(mlp, "logistic", l2=l2), progress=False).fit(train)
    idx2 = KNNPrefilter(k=50, representation="features", metric="euclidean").fit(inf2)
    with torch.no_grad():
        hidden = torch.tanh(train[0] @ mlp[0].weight.T + mlp[0].bias).numpy()
    assert_not_constant(hidden)
    np.testing.assert_allclose(idx2.keys, hidden, rtol=1e-5, atol=1e-7)

    idx3 = KNNPrefilter(k=50, representation=lambda X: X[:, :10] * 2).fit(inf)
    np.testing.assert_allclose(idx3.keys, 2 * train[0][:, :10].numpy(), rtol=1e-6)
    assert (
        fastif_up_loss(inf, test, idx3)
        .provenance["representation"]
        .startswith("features (callable")
    )


def test_invalid_arguments(setting):
    inf, test, s_test = setting["inf"], setting["test"], setting["s_test"]
    for kwargs in (
        {"k": 0},
        {"k": 2.5},
        {"metric": "manhattan"},
        {"representation": "pixels"},
        {"projection_dim": 0},
        {"query": "hessian"},
        {"direction": "up"},
        {"backend": "annoy"},
        {"seed": -1},
        {"representation": "features", "query": "s_test"},
        {"metric": "cosine", "direction": "harmful"},
    ):
        with pytest.raises(InputError):
            KNNPrefilter(**kwargs)
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="faiss"):
            KNNPrefilter(k=10, backend="faiss").fit(inf)
    with pytest.raises(InputError):
        fastif_up_loss(inf, test, prefilter="knn")
    with pytest.raises(InputError):
        fastif_up_loss(inf, test, s_test=s_test.value)  # a tensor, not the Solution
    with pytest.raises(ShapeError):
        fastif_up_loss(inf, (test[0][:3], test[1][:3]), KNNPrefilter(k=10), s_test=s_test)
    fs = fastif_up_loss(inf, (test[0][:3], test[1][:3]), KNNPrefilter(k=10))
    with pytest.raises(ShapeError):
        fs.recall(setting["exact"])  # 38 test rows, not 3
    with pytest.raises(uw.errors.NotFittedError):
        KNNPrefilter().fit(uw.Influence(inf.objective))
    with warnings.catch_warnings():
        # θ̂ of the full data, fitted on a subset
        warnings.simplefilter("ignore", NotAtMinimumWarning)
        other = uw.Influence(inf.objective, solver=uw.CG(rtol=1e-8), progress=False).fit(
            (setting["X"][:500], setting["y"][:500])
        )
        index = KNNPrefilter(k=10).fit(other)
        with pytest.raises(InputError, match="another Influence"):
            fastif_up_loss(inf, test, index)
        other.fit((setting["X"][:400], setting["y"][:400]))
    with pytest.raises(InputError, match="re-fitted"):
        index.candidates(test)


class _FakeFlat:
    """A stand-in for FAISS's exact flat indexes (brute force in NumPy), to exercise the
    FAISS glue."""

    def __init__(self, d: int, inner: bool) -> None:
        self.d, self.inner, self.x = d, inner, None

    def add(self, x: np.ndarray) -> None:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape[1] == self.d
        self.x = x.astype(np.float64)

    def search(self, q: np.ndarray, k: int):
        assert q.dtype == np.float32 and q.flags.c_contiguous
        q = q.astype(np.float64)
        score = q @ self.x.T if self.inner else -((q[:, None, :] - self.x[None]) ** 2).sum(-1)
        idx = np.argsort(-score, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(score, idx, 1), idx


def test_faiss_backend_glue(setting, small_logreg, monkeypatch):
    """backend='auto' takes FAISS when it is importable; with a brute-force stand-in for its flat
    indexes the candidates are those of the scikit-learn path (FAISS itself is not installed here).
    """
    import sys
    import types

    fake = types.ModuleType("faiss")
    fake.IndexFlatL2 = lambda d: _FakeFlat(d, inner=False)
    fake.IndexFlatIP = lambda d: _FakeFlat(d, inner=True)
    model, l2, train, test = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    specs = [
        {},
        {"direction": "harmful"},
        {"metric": "cosine"},
        {"metric": "euclidean"},
        {"representation": "features"},
    ]
    ref = [
        KNNPrefilter(k=40, backend="sklearn", projection_dim=16, **kw).fit(inf).candidates(test)
        for kw in specs
    ]
    monkeypatch.setitem(sys.modules, "faiss", fake)
    for kw, want in zip(specs, ref):
        idx = KNNPrefilter(k=40, projection_dim=16, **kw).fit(inf)
        assert idx.backend == "faiss"
        got = idx.candidates(test)
        assert got.shape == want.shape
        overlap = np.mean([len(np.intersect1d(a, b)) / 40 for a, b in zip(got, want)])
        assert overlap >= 0.99, (kw, overlap)  # float32 vs float64 distances: near-ties may swap
