"""``from_sklearn``: the mapping of scikit-learn's objectives onto R(θ) = (1/n)ΣL + (l2/2)‖θ‖².

Each mapping is proved twice, never against upweight's own output:
  1. the gradient of R at scikit-learn's coefficients is ≈ 0 (a NumPy gradient written from the
     formula, and the library's), while a wrong l2 or intercept treatment leaves it clearly ≠ 0;
  2. the predicted removal effect matches *actual refits of the scikit-learn estimator* (a clone
     fitted without the point), with the test loss read from scikit-learn's own predictions.
Data: real MNIST 1-vs-7 (bundled), scikit-learn's bundled digits and diabetes sets.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import torch

import upweight as uw
from conftest import pooled
from reference import assert_not_constant

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_diabetes, load_digits  # noqa: E402
from sklearn.linear_model import (  # noqa: E402
    LinearRegression,
    LogisticRegression,
    Ridge,
    SGDClassifier,
)
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import SVC, LinearSVC  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

from upweight.adapters import from_sklearn  # noqa: E402

TIGHT = dict(tol=1e-10, max_iter=10_000)


# ── data ──────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def mnist(mnist_1v7):
    """2,000 real 1-vs-7 training images pooled to 7×7 = 49 features, 300 test images."""
    d = mnist_1v7
    return (
        pooled(d.x_train[:2000], 4).astype(np.float64),
        d.y_train[:2000],
        pooled(d.x_test[:300], 4).astype(np.float64),
        d.y_test[:300],
    )


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's bundled 8×8 digits, 10 classes: 1,500 train / 297 test, raw pixels 0..16."""
    d = load_digits()
    return d.data[:1500], d.target[:1500], d.data[1500:], d.target[1500:]


@pytest.fixture(scope="module")
def diabetes():
    """scikit-learn's bundled diabetes regression set: 400 train / 42 test, 10 features."""
    d = load_diabetes()
    return d.data[:400], d.target[:400], d.data[400:], d.target[400:]


# ── independent test measurements, from scikit-learn's own predictions ──────────────────
def log_loss(est, X, y):
    P = est.predict_proba(X)
    return -np.log(P[np.arange(len(y)), np.searchsorted(est.classes_, y)])


def half_squared(est, X, y):
    return 0.5 * (est.predict(X) - y) ** 2


def _signed_margin(est, X, y):
    return np.where(y == est.classes_[1], 1.0, -1.0) * est.decision_function(X)


def hinge_loss(est, X, y):
    return np.maximum(0.0, 1.0 - _signed_margin(est, X, y))


def squared_hinge_loss(est, X, y):
    return np.maximum(0.0, 1.0 - _signed_margin(est, X, y)) ** 2


def compare_with_refits(prob, est, X, y, Xt, yt, measure, *, k=10, refit=None, grad_tol=1e-3):
    """Removal effects predicted by upweight vs actual refits of clones of the scikit-learn
    estimator.

    The test point is the one with the largest loss (the paper's wrongly classified point); the k
    training points are those with the largest predicted |effect| (Koh & Liang 2017, Fig. 2).
    Returns (predicted, actual, pearson, slope).
    """
    j = int(np.argmax(measure(est, Xt, yt)))
    xt, ytj = Xt[j : j + 1], yt[j : j + 1]
    inf = uw.Influence(prob.objective, solver=uw.Direct(), progress=False, grad_tol=grad_tol).fit(
        prob.train
    )
    scores = inf.removal_effect(prob.transform(xt, ytj)).values[0]
    ids = np.argsort(-np.abs(scores))[:k]
    refit = refit or (lambda i: clone(est).fit(np.delete(X, i, axis=0), np.delete(y, i)))
    base = measure(est, xt, ytj)[0]
    actual = np.array([measure(refit(int(i)), xt, ytj)[0] - base for i in ids])
    predicted = scores[ids]
    assert_not_constant(actual)
    assert_not_constant(predicted)
    return (
        predicted,
        actual,
        float(scipy.stats.pearsonr(predicted, actual)[0]),
        float(scipy.stats.linregress(predicted, actual).slope),
    )


# ── reference gradients written from the formulas (NumPy, float64) ──────────────────────
def logistic_grad(w, b, X, y01, l2, penalise_b=False):
    """∇ of (1/n)Σ log(1 + e^(−yᵢsᵢ)) + (l2/2)‖w‖², y = ±1 from {0, 1}."""
    sgn = 2.0 * y01 - 1.0
    r = -sgn * scipy.special.expit(-sgn * (X @ w + b)) / len(X)
    return np.r_[X.T @ r + l2 * w, r.sum() + (l2 * b if penalise_b else 0.0)]


def softmax_grad(W, b, X, yidx, l2):
    """∇ of (1/n)Σ −log softmax(Wx + b)[y] + (l2/2)‖W‖² (intercept unpenalised)."""
    P = scipy.special.softmax(X @ W.T + b, axis=1)
    P[np.arange(len(X)), yidx] -= 1.0
    P /= len(X)
    return np.r_[(P.T @ X + l2 * W).ravel(), P.sum(0)]


def squared_grad(w, b, X, y, l2):
    """∇ of (1/n)Σ ½(w·x + b − y)² + (l2/2)‖w‖²."""
    r = (X @ w + b - y) / len(X)
    return np.r_[X.T @ r + l2 * w, r.sum()]


def squared_hinge_grad(w, b_scaled, s, X, y01, l2):
    """∇ over [w, b/s] of (1/n)Σ max(0, 1 − y(w·x + s·b_scaled))² + (l2/2)(‖w‖² + b_scaled²)."""
    sgn = 2.0 * y01 - 1.0
    Xa = np.c_[X, np.full(len(X), s)]
    theta = np.r_[w, b_scaled]
    r = -2.0 * sgn * np.maximum(0.0, 1.0 - sgn * (Xa @ theta)) / len(X)
    return Xa.T @ r + l2 * theta


# ── the README example ──────────────────────────────────────────────────────────────────
def test_three_line_example(mnist):
    X, y, Xt, yt = mnist
    clf = LogisticRegression(C=0.1, **TIGHT).fit(X, y)
    prob = from_sklearn(clf, X, y)
    inf = uw.Influence(prob.objective, progress=False).fit(prob.train)
    scores = inf.up_loss(prob.transform(Xt[:3], yt[:3]))
    assert scores.values.shape == (3, len(X))
    assert_not_constant(scores.values)
    text = prob.describe()
    assert "1/(C·n)" in text and "unpenalised" in text and "logistic" in text
    assert prob.l2 == pytest.approx(1 / (0.1 * len(X)), rel=1e-15)
    assert "not ≈ 0" not in text
    # mapped with data it was not fitted on: the gradient check says so
    other = from_sklearn(clf, X[1000:], y[1000:])
    assert other.grad_norm > 1e-3 and "not ≈ 0" in other.describe()


# ── LogisticRegression ──────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("solver", ["lbfgs", "newton-cg", "liblinear"])
def test_binary_logistic_gradient_is_zero(mnist, solver):
    """½‖w‖² + CΣ log(1+e^(−ys)) ↦ l2 = 1/(C·n); liblinear penalises the intercept, the others do
    not."""
    X, y, Xt, _ = mnist
    n, C = len(X), 0.1
    clf = LogisticRegression(C=C, solver=solver, **TIGHT).fit(X, y)
    prob = from_sklearn(clf, X, y)
    lib = solver == "liblinear"
    w, b = clf.coef_[0], clf.intercept_[0]
    y01 = (y == clf.classes_[1]).astype(float)
    g = logistic_grad(w, b, X, y01, 1 / (C * n), penalise_b=lib)
    assert np.linalg.norm(g) < 1e-6 and prob.grad_norm < 1e-6
    # the other intercept treatment, or another l2 scaling, is not a minimum
    assert (
        np.linalg.norm(logistic_grad(w, b, X, y01, 1 / (C * n), penalise_b=not lib))
        > 100 * np.linalg.norm(g) + 1e-7
    )
    assert np.linalg.norm(logistic_grad(w, b, X, y01, 2 / (C * n), penalise_b=lib)) > 1e-4
    # θ̂ reproduces scikit-learn's scores
    out = prob.objective.outputs(prob.objective.params, torch.as_tensor(Xt)).numpy().ravel()
    np.testing.assert_allclose(out, clf.decision_function(Xt), rtol=1e-12, atol=1e-12)
    assert ("penalised like a weight" in prob.intercept) == lib


@pytest.mark.parametrize("solver", ["lbfgs", "liblinear"])
def test_binary_logistic_influence_matches_sklearn_refits(mnist, solver):
    X, y, Xt, yt = mnist
    clf = LogisticRegression(C=0.1, solver=solver, **TIGHT).fit(X, y)
    prob = from_sklearn(clf, X, y)
    _, _, r, slope = compare_with_refits(prob, clf, X, y, Xt, yt, log_loss)
    assert r >= 0.99 and 0.9 <= slope <= 1.1


def test_sklearn_train_fn_refits_the_estimator(mnist):
    """leave_one_out(train_fn=prob.sklearn_train_fn) measures actual scikit-learn refits."""
    X, y, Xt, yt = mnist
    clf = LogisticRegression(C=0.1, **TIGHT).fit(X, y)
    prob = from_sklearn(clf, X, y)
    assert repr(prob).startswith("SklearnProblem(LogisticRegression(C=0.1")
    inf = uw.Influence(prob.objective, solver=uw.Direct(), progress=False).fit(prob.train)
    check = uw.leave_one_out(
        inf, prob.transform(Xt[:1], yt[:1]), k=4, train_fn=prob.sklearn_train_fn, progress=False
    )
    base = log_loss(clf, Xt[:1], yt[:1])[0]
    by_hand = [
        log_loss(clone(clf).fit(np.delete(X, i, 0), np.delete(y, i)), Xt[:1], yt[:1])[0] - base
        for i in check.train_ids
    ]
    assert_not_constant(check.actual)
    np.testing.assert_allclose(check.actual, by_hand, rtol=1e-6, atol=1e-12)


def test_multinomial_logistic(digits):
    """Softmax over 10 classes: l2 = 1/(C·n), intercept unpenalised, θ in sum-zero class
    coordinates."""
    X, y, Xt, yt = (a / 16.0 if a.dtype.kind == "f" else a for a in digits)
    n, C = len(X), 0.03
    clf = LogisticRegression(C=C, **TIGHT).fit(X, y)
    prob = from_sklearn(clf, X, y)
    g = softmax_grad(clf.coef_, clf.intercept_, X, y, 1 / (C * n))
    assert np.linalg.norm(g) < 1e-6 and prob.grad_norm < 1e-6
    assert np.linalg.norm(softmax_grad(clf.coef_, clf.intercept_, X, y, 0.5 / (C * n))) > 1e-3
    assert prob.objective.p == 9 * 64 + 9  # K − 1 class coordinates: the Hessian is non-singular
    logp = torch.log_softmax(
        prob.objective.outputs(prob.objective.params, torch.as_tensor(Xt)), 1
    ).numpy()
    np.testing.assert_allclose(logp, np.log(clf.predict_proba(Xt)), atol=1e-10)
    np.testing.assert_allclose(prob.objective.model.coef, clf.coef_ - clf.coef_.mean(0), atol=1e-12)
    _, _, r, slope = compare_with_refits(prob, clf, X, y, Xt, yt, log_loss)
    assert r >= 0.99 and 0.9 <= slope <= 1.1


def test_no_penalty_maps_to_zero_l2(diabetes):
    X, t, _, _ = diabetes
    y = (t > np.median(t)).astype(int)  # not separable: the unpenalised minimum exists
    clf = LogisticRegression(C=np.inf, **TIGHT).fit(X, y)
    prob = from_sklearn(clf, X, y)
    assert prob.l2 == 0.0
    assert (
        np.linalg.norm(logistic_grad(clf.coef_[0], clf.intercept_[0], X, y.astype(float), 0.0))
        < 1e-6
    )
    assert prob.grad_norm < 1e-6


# ── Pipeline ────────────────────────────────────────────────────────────────────────────
def test_pipeline_scaler_then_logistic(digits):
    """The scaler is a fixed feature map; refitting only the last step is the exact comparison."""
    X, y, Xt, yt = digits
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, **TIGHT)).fit(X, y)
    prob = from_sklearn(pipe, X, y)
    Z = pipe[:-1].transform(X)
    np.testing.assert_allclose(prob.train[0].numpy(), Z)
    clf = pipe[-1]
    assert np.linalg.norm(softmax_grad(clf.coef_, clf.intercept_, Z, y, 1 / (0.01 * len(X)))) < 1e-6
    assert prob.grad_norm < 1e-6

    def refit_last_step(i):
        return make_pipeline(pipe[0], clone(clf).fit(np.delete(Z, i, axis=0), np.delete(y, i)))

    _, _, r, slope = compare_with_refits(prob, pipe, X, y, Xt, yt, log_loss, refit=refit_last_step)
    assert r >= 0.99 and 0.9 <= slope <= 1.1
    # refitting the whole Pipeline also moves the scaler (an O(1/n) change influence ignores)
    _, _, r_full, _ = compare_with_refits(prob, pipe, X, y, Xt, yt, log_loss)
    assert r_full >= 0.95


# ── Ridge / LinearRegression ────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "est",
    [Ridge(alpha=1.0), Ridge(alpha=0.1, solver="lsqr", tol=1e-12), LinearRegression()],
    ids=repr,
)
def test_least_squares(diabetes, est):
    """‖y − Xw − b‖² + α‖w‖² ↦ squared loss ½r², l2 = α/n, intercept unpenalised."""
    X, y, Xt, yt = diabetes
    est = clone(est).fit(X, y)
    prob = from_sklearn(est, X, y)
    alpha = getattr(est, "alpha", 0.0)
    assert prob.l2 == pytest.approx(alpha / len(X), rel=1e-15)
    g = squared_grad(est.coef_, est.intercept_, X, y, alpha / len(X))
    scale = np.linalg.norm(squared_grad(np.zeros(10), 0.0, X, y, 0.0))
    assert np.linalg.norm(g) < 1e-8 * scale and prob.grad_norm < 1e-8 * scale
    if alpha:
        assert (
            np.linalg.norm(squared_grad(est.coef_, est.intercept_, X, y, 2 * alpha / len(X)))
            > 1e-3 * scale
        )
    _, _, r, slope = compare_with_refits(prob, est, X, y, Xt, yt, half_squared)
    assert r >= 0.99 and 0.9 <= slope <= 1.1


def test_ridge_multi_output(diabetes):
    X, y, _, _ = diabetes
    Y = np.c_[y, np.sqrt(y)]
    est = Ridge(alpha=0.5).fit(X, Y)
    prob = from_sklearn(est, X, Y)
    assert prob.train[1].shape == (len(X), 2)
    for k in range(2):
        assert (
            np.linalg.norm(squared_grad(est.coef_[k], est.intercept_[k], X, Y[:, k], 0.5 / len(X)))
            < 1e-8 * np.abs(Y[:, k]).mean()
        )
    assert prob.grad_norm < 1e-8 * np.abs(Y).mean()


# ── LinearSVC ───────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("scaling", [1.0, 10.0])
def test_linear_svc_squared_hinge_gradient_is_zero(mnist, scaling):
    """½‖[w, b/s]‖² + CΣ max(0, 1 − ys)² ↦ l2 = 1/(C·n), the intercept penalised through s."""
    X, y, Xt, _ = mnist
    C = 0.1
    svc = LinearSVC(C=C, intercept_scaling=scaling, tol=1e-12, max_iter=100_000).fit(X, y)
    prob = from_sklearn(svc, X, y)
    y01 = (y == svc.classes_[1]).astype(float)
    b_scaled = svc.intercept_[0] / scaling
    assert float(prob.objective.params["bias"][0]) == pytest.approx(b_scaled, rel=1e-12)
    g = squared_hinge_grad(svc.coef_[0], b_scaled, scaling, X, y01, 1 / (C * len(X)))
    assert np.linalg.norm(g) < 1e-6 and prob.grad_norm < 1e-6
    # an unpenalised intercept is not liblinear's objective
    g_unpen = g.copy()
    g_unpen[-1] -= b_scaled / (C * len(X))
    assert abs(g_unpen[-1]) > 1e3 * np.linalg.norm(g)
    out = prob.objective.outputs(prob.objective.params, torch.as_tensor(Xt)).numpy().ravel()
    np.testing.assert_allclose(out, svc.decision_function(Xt), rtol=1e-12, atol=1e-12)


def test_linear_svc_squared_hinge_influence_matches_refits(mnist):
    X, y, Xt, yt = mnist
    svc = LinearSVC(C=0.1, tol=1e-12, max_iter=100_000).fit(X, y)
    prob = from_sklearn(svc, X, y)
    _, _, r, slope = compare_with_refits(prob, svc, X, y, Xt, yt, squared_hinge_loss)
    assert r >= 0.99 and 0.9 <= slope <= 1.1


def test_linear_svc_one_vs_rest_is_one_sum(digits):
    """K one-vs-rest problems, each ½‖wₖ‖² + CΣ Lₖ, are one objective with the same l2."""
    X, y, Xt, yt = digits
    X, Xt = X / 16.0, Xt / 16.0
    C = 0.01
    svc = LinearSVC(C=C, tol=1e-10, max_iter=100_000).fit(X, y)
    prob = from_sklearn(svc, X, y)
    assert prob.objective.p == 10 * 65
    for k in (0, 7):
        gk = squared_hinge_grad(
            svc.coef_[k], svc.intercept_[k], 1.0, X, (y == k).astype(float), 1 / (C * len(X))
        )
        assert np.linalg.norm(gk) < 1e-6
    assert prob.grad_norm < 1e-6

    def ovr_squared_hinge(est, X, y):
        Y = np.where(y[:, None] == est.classes_[None, :], 1.0, -1.0)
        return (np.maximum(0.0, 1.0 - Y * est.decision_function(X)) ** 2).sum(1)

    _, _, r, slope = compare_with_refits(prob, svc, X, y, Xt, yt, ovr_squared_hinge)
    assert r >= 0.99 and 0.9 <= slope <= 1.1


def test_linear_svc_hinge_subgradient_and_refits(mnist):
    """Hinge is not differentiable: check the exact optimality condition (a subgradient of
    R = (1/n)Σ hinge + (l2/2)‖[w, b/s]‖² contains 0), then the SmoothHinge(0.001) influence
    against hinge-loss refits — correlated, as in Koh & Liang (2017) Fig. 3 (R = 0.95 there)."""
    X, y, Xt, yt = mnist
    n = len(X)
    svc = LinearSVC(C=0.1, loss="hinge", tol=1e-12, max_iter=100_000, random_state=0).fit(X, y)
    prob = from_sklearn(svc, X, y)
    theta = np.r_[
        prob.objective.params["weight"].numpy().ravel(), prob.objective.params["bias"].numpy()
    ]
    Xa = np.c_[X, np.ones(n)]  # intercept_scaling = 1
    sgn = np.where(y == svc.classes_[1], 1.0, -1.0)
    m = sgn * (Xa @ theta)

    def subgradient_residual(l2):
        # 0 = l2·θ − (1/n)Σ αᵢ yᵢ x̃ᵢ with αᵢ = 1 inside the margin, 0 outside, αᵢ ∈ [0, 1] on it
        on = np.abs(m - 1.0) <= 1e-4
        rhs = l2 * theta - ((m < 1.0 - 1e-4) * sgn) @ Xa / n
        A = (sgn[:, None] * Xa)[on].T / n
        fit = scipy.optimize.lsq_linear(A, rhs, bounds=(0.0, 1.0), method="bvls")
        return np.linalg.norm(A @ fit.x - rhs) / np.linalg.norm(l2 * theta)

    assert subgradient_residual(prob.l2) < 1e-8
    assert subgradient_residual(2 * prob.l2) > 0.1
    assert "SmoothHinge" in prob.loss
    _, _, r, slope = compare_with_refits(prob, svc, X, y, Xt, yt, hinge_loss, grad_tol=1.0)
    assert r >= 0.9 and slope > 0


# ── SGDClassifier ───────────────────────────────────────────────────────────────────────
def test_sgd_log_loss_l2_is_alpha(mnist):
    """(1/n)Σ L + α/2‖w‖² ↦ l2 = α. SGD stops near, not at, the minimum: the gradient under
    l2 = α is far smaller than under α/2 or 2α."""
    X, y, _, _ = mnist
    sgd = SGDClassifier(
        loss="log_loss", alpha=1e-3, tol=None, max_iter=200, average=True, random_state=0
    ).fit(X, y)
    prob = from_sklearn(sgd, X, y)
    assert prob.l2 == 1e-3
    y01 = (y == sgd.classes_[1]).astype(float)
    w, b = sgd.coef_[0], sgd.intercept_[0]
    g = np.linalg.norm(logistic_grad(w, b, X, y01, 1e-3))
    assert g == pytest.approx(prob.grad_norm, rel=1e-6)
    assert 20 * g < min(np.linalg.norm(logistic_grad(w, b, X, y01, f * 1e-3)) for f in (0.5, 2.0))


def test_sgd_hinge_influence_correlates_with_refits(mnist):
    """SGD's weights are only near the hinge minimum and a refit averages over n − 1 points
    (so the penalty shifts too): the honest claim is correlation, not magnitude."""
    X, y, Xt, yt = mnist
    sgd = SGDClassifier(
        loss="hinge", alpha=1e-3, tol=None, max_iter=200, average=True, random_state=0
    ).fit(X, y)
    prob = from_sklearn(sgd, X, y)
    assert any("averages its losses" in note for note in prob.notes)
    _, _, r, _ = compare_with_refits(prob, sgd, X, y, Xt, yt, hinge_loss, grad_tol=1.0)
    assert r >= 0.8


# ── errors ──────────────────────────────────────────────────────────────────────────────
def test_errors_name_the_fix(mnist):
    X, y, _, _ = mnist
    X, y = X[:200], y[:200]
    with pytest.raises(uw.errors.NotFittedError, match=r"\.fit\(X, y\)"):
        from_sklearn(LogisticRegression(), X, y)
    with pytest.raises(uw.errors.UnsupportedModelError, match="Supported: LogisticRegression"):
        from_sklearn(DecisionTreeClassifier().fit(X, y), X, y)
    with pytest.raises(uw.errors.UnsupportedModelError, match="Supported"):
        from_sklearn(SVC(kernel="rbf").fit(X, y), X, y)
    with pytest.raises(uw.errors.UnsupportedModelError, match="l1_ratio=0"):
        from_sklearn(LogisticRegression(l1_ratio=1.0, solver="liblinear").fit(X, y), X, y)
    with pytest.raises(uw.errors.UnsupportedModelError, match="class_weight=None"):
        from_sklearn(LogisticRegression(class_weight="balanced").fit(X, y), X, y)
    with pytest.raises(uw.errors.UnsupportedModelError, match="penalty='l2'"):
        from_sklearn(LinearSVC(penalty="l1").fit(X, y), X, y)
    with pytest.raises(uw.errors.UnsupportedModelError, match="positive=False"):
        from_sklearn(Ridge(positive=True).fit(X, y.astype(float)), X, y)
    clf = LogisticRegression().fit(X, y)
    with pytest.raises(uw.errors.ShapeError, match="200 rows but y has 199"):
        from_sklearn(clf, X, y[:-1])
    with pytest.raises(uw.errors.ShapeError, match="features"):
        from_sklearn(clf, X[:, :10], y)
    prob = from_sklearn(clf, X, y)
    with pytest.raises(
        uw.errors.InputError,
        match=r"y has labels \[3\] that are not among the estimator's classes_",
    ):
        prob.transform(X[:2], np.array([1, 3]))
