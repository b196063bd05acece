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
        (
            (nan_at(X, (2, 1)), Y),
            NonFiniteError,
            ["training data X", "1 non-finite", "(2, 1)", "impute"],
        ),
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
    with pytest.raises(
        NonFiniteError, match=r"Model parameter 'weight'.*\(1, 2\).*trained to finite"
    ):
        uw.Objective(model, "cross_entropy")


def test_loss_that_is_not_per_sample():
    obj = uw.Objective(linear(), torch.nn.CrossEntropyLoss())  # reduction='mean'
    with pytest.raises(
        UnsupportedModelError, match=r"shape \(\) for a batch of 4 points.*reduction='none'"
    ):
        uw.Influence(obj, progress=False).fit((X, Y))


def test_model_in_training_mode_with_batchnorm_or_dropout():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm1d.*model.eval\(\)"):
        uw.Objective(model)
    with pytest.raises(UnsupportedModelError, match=r"Dropout.*model.eval\(\)"):
        uw.Objective(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)))


def test_test_points_with_other_feature_shape():
    inf = fit((X, Y))
    with pytest.raises(
        ShapeError, match=r"Test x has shape \(4,\) per point but training x has \(3,\)"
    ):
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
    inf = uw.Influence(obj, solver=lissa, progress=False, grad_tol=1e9, max_residual=0.01).fit(
        (X, Y)
    )
    with pytest.raises(
        InaccurateSolveError, match=r"residual .* > max_residual=0.01\. Increase LiSSA's depth"
    ):
        inf.up_loss((X[:2], Y[:2]))
    inf = uw.Influence(
        obj, solver=lissa, progress=False, grad_tol=1e9, max_residual=0.01, on_inaccurate="warn"
    ).fit((X, Y))
    with pytest.warns(InaccurateSolveWarning):
        scores = inf.up_loss((X[:2], Y[:2]))
    assert scores.provenance["accepted"] is False


def test_index_out_of_range():
    inf = fit((X, Y))
    # Data.subset's or Influence's wording
    with pytest.raises(InputError, match=r"10 (fitted training )?points"):
        inf.up_params([10])


def test_check_finite_fast_path_neither_misses_nor_invents_non_finite_values():
    """The sum-based fast path: a finite tensor whose sum overflows is accepted; one NaN/±inf is
    found."""
    from upweight._checks import check_finite

    check_finite(torch.full((10,), 3e38), "big")  # Σ = inf in float32, every entry finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        X = torch.rand(50, 7)
        X[3, 4] = bad
        with pytest.raises(NonFiniteError, match=r"1 non-finite value\(s\).*index \(3, 4\)"):
            check_finite(X, "X")


# ── targets validated on every point, by the loss's rule ─────────────────────────────────
def _check(model, loss, X, y, what="training"):
    uw.Objective(model, loss).check_data(uw.Data.from_any((X, y)), what=what)


def test_cross_entropy_label_out_of_range_is_named_by_index_value_and_range():
    """Label 10 at index 4,567 of 10,000 with 10 class scores: InputError naming all three."""
    X = torch.randn(10_000, 3, dtype=torch.float64)
    y = torch.arange(10_000) % 10
    y[4567] = 10
    with pytest.raises(
        InputError,
        match=r"training y\[4567\] = 10 is not a class.*\[0, 10\).*outputs 10 class scores",
    ):
        fit((X, y), model=linear(3, 10))
    y[4567] = 3
    y[9998] = -1  # the second-to-last point: every label is checked, not a sample
    with pytest.raises(InputError, match=r"y\[9998\] = -1 is not a class.*\[0, 10\)"):
        _check(linear(3, 10), "cross_entropy", X, y)


def test_cross_entropy_float_labels_say_y_long_or_name_the_fraction():
    with pytest.raises(
        DtypeError, match=r"dtype torch.float64.*integer class labels in \[0, 2\).*y.long\(\)"
    ):
        _check(linear(), "cross_entropy", X, Y.double())
    frac = Y.double()
    frac[6] = 0.5
    with pytest.raises(DtypeError, match=r"y\[6\] = 0.5.*non-integer values"):
        _check(linear(), "cross_entropy", X, frac)


def test_cross_entropy_label_column_and_one_score_models_are_shape_errors():
    with pytest.raises(
        ShapeError,
        match=r"y has shape \(10, 1\).*one integer class label per point.*y.reshape\(-1\)",
    ):
        _check(linear(), "cross_entropy", X, Y[:, None])
    with pytest.raises(ShapeError, match=r"one score per class.*'logistic'"):
        _check(torch.nn.Sequential(linear(3, 1), torch.nn.Flatten(0)), "cross_entropy", X, Y)


def test_cross_entropy_class_probabilities_equal_integer_labels_and_must_lie_in_0_1():
    """Float targets of the output's shape are class probabilities: one-hot rows give −log
    softmax[y]."""
    model = linear(3, 4)
    y = torch.tensor([0, 3, 1, 2, 3, 0, 1, 1, 2, 0])
    onehot = torch.nn.functional.one_hot(y, 4).double()
    obj = uw.Objective(model, "cross_entropy")
    obj.check_data(uw.Data.from_any((X, onehot)), what="training")
    ref = -torch.log_softmax(model(X), dim=1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(
        obj.losses(obj.params, X, onehot), ref.detach(), rtol=1e-12, atol=1e-12
    )
    onehot[8, 1] = 1.5
    with pytest.raises(InputError, match=r"y\[8\] = \[0, 1.5, 1, 0\].*probabilities.*\[0, 1\]"):
        obj.check_data(uw.Data.from_any((X, onehot)), what="training")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_narrow_integer_labels_work_with_cross_entropy(dtype):
    """torch's cross-entropy takes only int64: narrower integer labels are widened (lossless),
    and the losses are −log softmax(output)[y]."""
    model = linear(3, 4)
    y = torch.tensor([0, 3, 1, 2, 3, 0, 1, 1, 2, 0])
    obj = uw.Objective(model, "cross_entropy")
    obj.check_data(uw.Data.from_any((X, y.to(dtype))), what="training")
    ref = -torch.log_softmax(model(X), dim=1).gather(1, y[:, None])[:, 0].detach()
    torch.testing.assert_close(obj.losses(obj.params, X, y.to(dtype)), ref, rtol=1e-12, atol=1e-12)
    from upweight.core.grads import per_sample_grads

    g = per_sample_grads(obj, obj.params, uw.Data.from_any((X, y.to(dtype))))
    # ∂L/∂z = softmax − e_y
    p = torch.softmax(model(X), dim=1).detach() - torch.nn.functional.one_hot(y, 4)
    torch.testing.assert_close(
        g[:, :12].reshape(10, 4, 3), p[:, :, None] * X[:, None, :], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "loss", ["logistic", "hinge", uw.SmoothHinge(0.01)], ids=["logistic", "hinge", "smooth_hinge"]
)
def test_binary_losses_refuse_labels_outside_0_1_or_pm1(loss):
    """Labels {1, 2} would all count as +1 (a model predicting one class): refused at the
    first 2."""
    y = torch.ones(1_000_000, dtype=torch.long)
    y[999_999] = 2  # the last of a million labels is found
    model = linear(3, 1)
    Xb = torch.zeros(1_000_000, 3, dtype=torch.float64)
    with pytest.raises(
        InputError,
        match=(
            r"y\[999999\] = 2: the \w+ loss needs binary labels, all in \{0, 1\} or all in \{-1,"
            r" \+1\}"
        ),
    ):
        _check(model, loss, Xb, y)
    with pytest.raises(
        InputError, match=r"y\[3\] = 0 \(0 and -1 mixed\).*values seen: \[-1, 0, 1\]"
    ):
        _check(model, loss, X, torch.tensor([1, -1, 1, 0, 1, -1, 1, 1, -1, 1]))
    with pytest.raises(InputError, match=r"y\[2\] = 0.5:.*binary labels"):
        _check(model, loss, X, torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ShapeError, match=r"one score per point.*\(n, 2\).*'cross_entropy'"):
        _check(linear(3, 2), loss, X, Y)


def test_binary_label_encodings_0_1_and_pm1_give_the_same_losses():
    """y = 1 is +1 and y ∈ {0, −1} is −1: log(1 + exp(∓s)) in both encodings, int or float."""
    model = linear(3, 1)
    s = model(X)[:, 0].detach()
    y01 = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1, 1])
    ref = torch.nn.functional.softplus(torch.where(y01 == 1, -s, s))
    obj = uw.Objective(model, "logistic")
    for y in (y01, 2 * y01 - 1, y01.double(), (2 * y01 - 1).double()):
        obj.check_data(uw.Data.from_any((X, y)), what="training")
        torch.testing.assert_close(obj.losses(obj.params, X, y), ref, rtol=1e-12, atol=1e-12)


def test_squared_loss_needs_one_target_per_output():
    """y (n,) against 3 outputs would broadcast silently: refused; matching widths are accepted."""
    with pytest.raises(
        ShapeError,
        match=r"y has shape \(10,\) \(1 value\(s\) per point\) but the model outputs 3 per point",
    ):
        _check(linear(3, 3), "squared", X, torch.randn(10, dtype=torch.float64))
    _check(linear(3, 3), "squared", X, torch.randn(10, 3, dtype=torch.float64))
    _check(linear(3, 1), "squared", X, torch.randn(10, dtype=torch.float64))
    _check(linear(3, 1), "squared", X, torch.arange(10))  # integer targets are numbers too


def test_custom_losses_are_not_checked_but_the_library_functions_are():
    """A callable without check_targets is trusted; upweight.core.losses.logistic passed as a
    callable still checks its labels."""
    from upweight.core.losses import logistic

    def my_loss(out, y):
        return (out[:, 0] - y.to(out.dtype)) ** 2

    _check(linear(3, 1), my_loss, X, Y + 1)  # labels {1, 2}: the custom loss decides what they mean
    with pytest.raises(InputError, match=r"y\[1\] = 2: the logistic loss"):
        _check(linear(3, 1), logistic, X, Y + 1)


# ── input dtypes the model cannot take ───────────────────────────────────────────────────
def test_integer_pixels_for_a_float_model_say_convert_to_float():
    pixels = torch.randint(0, 256, (10, 3), dtype=torch.uint8)
    with pytest.raises(
        DtypeError,
        match=(
            r"training X has integer dtype torch.uint8.*computes in"
            r" torch.float64.*X.float\(\).*X.float\(\) / 255"
        ),
    ) as info:
        fit((pixels, Y))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(DtypeError, match=r"test X has integer dtype torch.int64.*X.float\(\)"):
        fit((X, Y)).up_loss((pixels.long()[:2], Y[:2]))


def test_token_ids_keep_working_and_float_ids_say_long():
    """Integer X goes to nn.Embedding unchanged (int64 and int32 ids); float ids are refused."""
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Embedding(6, 2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        .double()
        .eval()
    )
    tokens = torch.randint(0, 6, (10, 4))
    for ids in (tokens, tokens.int()):
        uw.Objective(model, "cross_entropy").check_data(uw.Data.from_any((ids, Y)), what="training")
    with pytest.raises(
        DtypeError, match=r"X has dtype torch.float64.*did not accept.*token ids.*X.long\(\)"
    ):
        _check(model, "cross_entropy", tokens.double(), Y)


# ── an empty selection of θ lists the model's parameters ─────────────────────────────────
def test_empty_parameter_selection_lists_the_parameter_names():
    with pytest.raises(
        InputError, match=r"predicate returned False for all 2 parameters.*\['weight', 'bias'\]"
    ):
        uw.Objective(linear(), params=lambda name, t: name.startswith("head"))
    frozen = linear().requires_grad_(False)
    with pytest.raises(
        InputError,
        match=(
            r"none of the model's 2 parameters requires grad.*\['weight',"
            r" 'bias'\].*requires_grad=True"
        ),
    ):
        uw.Objective(frozen)
    with pytest.raises(InputError, match=r"params=\[\] is empty"):
        uw.Objective(linear(), params=[])
    # 30 parameters
    big = (
        torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(15)])
        .eval()
        .requires_grad_(False)
    )
    with pytest.raises(InputError) as info:
        uw.Objective(big)
    msg = str(info.value)
    assert "'9.bias', … (30 parameters in all)]" in msg  # the first 20 names, then the count
    assert "'10.weight'" not in msg
    with pytest.raises(
        InputError, match=r"'fc9' matches no parameter.*'0.weight'.*\(30 parameters in all\)"
    ):
        uw.Objective(big, params="fc9")
    with pytest.raises(InputError, match="the model has no parameters"):
        uw.Objective(torch.nn.Tanh())
