"""``Influence.estimate_accuracy``: an approximate solver's scores against the exact ones on a
sample, checked against scores from an explicit float64 Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import upweight as uw
from upweight.errors import InaccurateSolveError
from upweight.solvers.kfac import KFAC

D64 = torch.float64


def _problem():
    """A tanh MLP on a 4-class problem with spread-out inputs (K-FAC is far from exact on it)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=D64) * torch.linspace(0.3, 3.0, 6, dtype=D64)
    y = (X @ torch.randn(6, 4, generator=g, dtype=D64)).argmax(1)
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        .double()
        .eval()
    )
    return uw.Objective(model, "cross_entropy", l2=0.01), (X, y), (X[:3], y[:3])


def _explicit_scores(
    inf: uw.Influence, obj: uw.Objective, train, test, positions
) -> tuple[np.ndarray, np.ndarray]:
    """(approximate, exact) scores of the sampled training points: the exact ones from the dense
    Gauss–Newton matrix + δI (Direct in float64 on the same curvature)."""
    direct = uw.Influence(
        obj,
        solver=uw.Direct(),
        curvature="gauss-newton",
        damping=inf.damping,
        progress=False,
        grad_tol=1e9,
    ).fit(train)
    exact = direct.up_loss(test).values[:, positions]
    approx = inf.up_loss(test).values[:, positions]
    return approx, exact


def test_the_estimate_equals_the_explicit_comparison():
    obj, train, test = _problem()
    inf = uw.Influence(
        obj,
        solver=KFAC(),
        curvature="gauss-newton",
        damping=0.05,
        progress=False,
        grad_tol=1e9,
        max_residual=None,
    ).fit(train)
    est = inf.estimate_accuracy(test, n_test=3, n_train=120, rtol=1e-12, seed=3)
    positions = np.searchsorted(inf.data_.ids.numpy(), est.train_ids)
    assert len(positions) == 120 and len(set(positions)) == 120
    approx, exact = _explicit_scores(inf, obj, train, test, positions)
    for j in range(3):
        assert est.spearman[j] == pytest.approx(
            scipy.stats.spearmanr(approx[j], exact[j])[0], abs=1e-9
        )
        assert est.pearson[j] == pytest.approx(np.corrcoef(approx[j], exact[j])[0, 1], abs=1e-9)
        rel = np.linalg.norm(approx[j] - exact[j]) / np.linalg.norm(exact[j])
        assert est.relative_error[j] == pytest.approx(rel, rel=1e-6)
        assert est.sign_agreement[j] == pytest.approx(
            np.mean(np.sign(approx[j]) == np.sign(exact[j]))
        )
    assert est.reference["residual_max"] < 1e-10 and "Gauss" in est.reference["curvature"]
    assert 0.0 < est.relative_error_max and est.spearman_min < 1.0  # K-FAC is not exact here
    assert "not estimated" in inf.up_loss(test).provenance["accuracy"]


def test_an_exact_solver_scores_one_and_a_poor_approximation_is_told_apart():
    obj, train, test = _problem()
    kw = dict(
        curvature="gauss-newton", damping=0.05, progress=False, grad_tol=1e9, max_residual=None
    )
    exact = uw.Influence(obj, solver=uw.Direct(), **kw).fit(train)
    est = exact.estimate_accuracy(test, n_test=2, n_train=100)
    assert (
        est.spearman_min > 1 - 1e-9
        and est.relative_error_max < 1e-6
        and est.sign_agreement.min() == 1.0
    )
    # an exact solver's residual says it all
    assert "accuracy" not in exact.up_loss(test).provenance
    poor = uw.Influence(obj, solver=uw.Arnoldi(rank=1, oversampling=2), **kw).fit(train)
    bad = poor.estimate_accuracy(test, n_test=2, n_train=100)
    assert bad.relative_error_max > 0.3 and bad.relative_error_max > 100 * est.relative_error_max
    assert "Spearman" in str(bad) and set(bad.summary()) >= {
        "spearman_min",
        "relative_error_max",
        "reference",
    }


def test_a_reference_that_does_not_converge_is_refused():
    obj, train, test = _problem()
    inf = uw.Influence(
        obj,
        solver=KFAC(),
        curvature="gauss-newton",
        damping=0.05,
        progress=False,
        grad_tol=1e9,
        max_residual=None,
    ).fit(train)
    with (
        pytest.raises(InaccurateSolveError, match="no reference"),
        pytest.warns(uw.errors.NotConvergedWarning),
    ):
        inf.estimate_accuracy(test, maxiter=1, rtol=1e-12)
    with pytest.raises(uw.errors.InputError, match="n_train"):
        inf.estimate_accuracy(test, n_train=1)
