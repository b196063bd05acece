"""Bad input gets a clear error naming the problem and the fix; the tests check the message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.errors import (
    DtypeError,
    EmptyDataError,
    InaccurateSolveError,
    InaccurateSolveWarning,
    InputError,
    NonFiniteError,
    NotAtMinimumWarning,
    NotFittedError,
    ShapeError,
    UnsupportedModelError,
)


def linear(d=3, out=2):
    torch.manual_seed(0)
    return torch.nn.Linear(d, out).double().eval()


X = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1] * 5)


def fit(data, model=None, **kw):
    obj = uw.Objective(model or linear(), "cross_entropy", l2=0.1)
    return uw.Influence(obj, solver=uw.Direct(), progress=False, grad_tol=1e9, **kw).fit(data)


def nan_at(a, i):
    a = a.clone()
    a[i] = float("nan")
    return a


@pytest.mark.parametrize(
    "data, exc, phrases",
    [
        ((X, Y[:7]), ShapeError, ["10 rows", "7", "one entry per point"]),
        ((X[:0], Y[:0]), EmptyDataError, ["empty", "at least one"]),
        ((nan_at(X, (2, 1)), Y), NonFiniteError, ["training data X", "1 non-finite", "(2, 1)", "impute"]),
        ((X, Y.double()), InputError, ["y.long()"]),
        ((np.array([["a", "b", "c"]] * 10), Y), DtypeError, ["dtype", "numbers"]),
        ((X.to(torch.complex128), Y), DtypeError, ["complex", "real numbers"]),
        ("not data", InputError, ["not understood", "(X, y)"]),
    ],
    ids=["lengths", "empty", "nan-x", "float-labels", "strings", "complex", "unknown-type"],
)
def test_bad_training_data(data, exc, phrases):
    with pytest.raises(exc) as info:
        fit(data)
    for phrase in phrases:
        assert phrase in str(info.value)


def test_nan_in_parameters():
    model = linear()
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"Model parameter 'weight'.*\(1, 2\).*trained to finite"):
        uw.Objective(model, "cross_entropy")


def test_loss_that_is_not_per_sample():
    obj = uw.Objective(linear(), torch.nn.CrossEntropyLoss())  # reduction='mean'
    with pytest.raises(UnsupportedModelError, match=r"shape \(\) for a batch of 4 points.*reduction='none'"):
        uw.Influence(obj, progress=False).fit((X, Y))


def test_model_in_training_mode_with_batchnorm_or_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm1d.*model.eval\(\)"):
        uw.Objective(model)
    with pytest.raises(UnsupportedModelError, match=r"Dropout.*model.eval\(\)"):
        uw.Objective(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)))


def test_test_points_with_other_feature_shape():
    inf = fit((X, Y))
    with pytest.raises(ShapeError, match=r"Test x has shape \(4,\) per point but training x has \(3,\)"):
        inf.up_loss((torch.zeros(2, 4, dtype=torch.float64), Y[:2]))


def test_not_fitted():
    inf = uw.Influence(uw.Objective(linear(), "cross_entropy"))
    with pytest.raises(NotFittedError, match=r"not fitted yet. Call .fit\(train\) first"):
        inf.up_loss((X, Y))


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"damping": -1.0}, "'damping' parameter of Influence"),
        ({"batch_size": 0}, "'batch_size' parameter of Influence"),
        ({"on_inaccurate": "ignore"}, "'on_inaccurate' parameter of Influence must be one of"),
        ({"max_residual": -0.1}, "'max_residual' parameter of Influence"),
    ],
)
def test_bad_influence_settings(kwargs, phrase):
    with pytest.raises(InputError, match=phrase):
        fit((X, Y), **kwargs)


def test_bad_objective_arguments():
    with pytest.raises(InputError, match="Unknown loss 'hinge_loss'"):
        uw.Objective(linear(), "hinge_loss")
    with pytest.raises(InputError, match="'l2' parameter of Objective"):
        uw.Objective(linear(), l2=-1.0)
    with pytest.raises(InputError, match="'fc9' matches no parameter.*'weight', 'bias'"):
        uw.Objective(linear(), params="fc9")
    with pytest.raises(InputError, match="torch.nn.Module"):
        uw.Objective("model")


def test_not_at_minimum_warns_with_the_gradient_norm():
    obj = uw.Objective(linear(), "cross_entropy", l2=0.1)
    with pytest.warns(NotAtMinimumWarning, match=r"‖∇R\(θ̂\)‖ = .* not a minimum.*damping"):
        uw.Influence(obj, solver=uw.Direct(), progress=False).fit((X, Y))


def test_inaccurate_solve_raises_by_default_and_warns_on_request():
    obj = uw.Objective(linear(), "cross_entropy", l2=0.1)
    lissa = uw.LiSSA(depth=2, repeats=1, progress=False)  # far too short to converge
    inf = uw.Influence(obj, solver=lissa, progress=False, grad_tol=1e9, max_residual=0.01).fit((X, Y))
    with pytest.raises(InaccurateSolveError, match=r"residual .* > max_residual=0.01\. Increase LiSSA's depth"):
        inf.up_loss((X[:2], Y[:2]))
    inf = uw.Influence(obj, solver=lissa, progress=False, grad_tol=1e9, max_residual=0.01, on_inaccurate="warn").fit((X, Y))
    with pytest.warns(InaccurateSolveWarning):
        scores = inf.up_loss((X[:2], Y[:2]))
    assert scores.provenance["accepted"] is False


def test_index_out_of_range():
    inf = fit((X, Y))
    with pytest.raises(InputError, match="10 points"):
        inf.up_params([10])


def test_check_finite_fast_path_neither_misses_nor_invents_non_finite_values():
    """The sum-based fast path: a finite tensor whose sum overflows is accepted; one NaN/±inf is found."""
    from upweight._checks import check_finite

    check_finite(torch.full((10,), 3e38), "big")  # Σ = inf in float32, every entry finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        X = torch.rand(50, 7)
        X[3, 4] = bad
        with pytest.raises(NonFiniteError, match=r"1 non-finite value\(s\).*index \(3, 4\)"):
            check_finite(X, "X")
