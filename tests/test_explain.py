"""``upweight.explain``: the helpful and harmful training points of a prediction, checked against
the closed form of Koh & Liang (2017) §2.3 for logistic regression (an explicit float64 Hessian)."""

from __future__ import annotations

import numpy as np
import pytest

import upweight as uw
from reference import logistic_closed_form
from upweight.errors import InputError
from upweight.influence.accuracy import AccuracyEstimate


@pytest.fixture(scope="module")
def case(small_logreg):
    model, l2, train, test = small_logreg
    theta = model.weight.detach().reshape(-1).numpy()
    tests = (test[0][:4], test[1][:4])
    exact, _, _ = logistic_closed_form(
        theta, train[0].numpy(), train[1].numpy(), tests[0].numpy(), tests[1].numpy(), l2
    )
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False
    ).fit(train)
    return inf, theta, tests, exact


def test_rankings_are_the_argsorted_closed_form(case):
    inf, theta, tests, exact = case
    top = 7
    expl = uw.explain(inf, tests, top=top)
    assert isinstance(expl, uw.Explanation) and len(expl) == 4 and expl.top == top
    np.testing.assert_allclose(expl.up_loss, exact, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(expl.removal_effect, -exact / len(inf.data_), rtol=1e-8, atol=1e-14)
    for t in range(4):
        helpful, harmful = (
            np.argsort(exact[t], kind="stable")[:top],
            np.argsort(-exact[t], kind="stable")[:top],
        )
        gaps = np.diff(np.sort(exact[t]))
        assert (
            gaps[: top + 1].min() > 1e-9 and gaps[-top - 1 :].min() > 1e-9
        )  # no near ties to swap
        np.testing.assert_array_equal(expl.helpful[t].train_ids, helpful)  # ids are positions here
        np.testing.assert_array_equal(expl.harmful[t].train_ids, harmful)
        np.testing.assert_allclose(expl.helpful[t].values, exact[t, helpful], rtol=1e-8)
        np.testing.assert_allclose(expl.harmful[t].values, exact[t, harmful], rtol=1e-8)
        assert (expl.helpful[t].values < 0).all() and (
            expl.harmful[t].values > 0
        ).all()  # Eq. 2's signs
    assert "harmful" in expl.convention and "−I_up,loss/n" in expl.convention


def test_prediction_and_test_loss_are_the_models(case):
    inf, theta, tests, _ = case
    expl = uw.explain(inf, tests, top=3)
    margin = tests[0].numpy() @ theta  # θᵀx, the logit of P(y = +1)
    np.testing.assert_allclose(expl.outputs.reshape(-1), margin, rtol=1e-12)
    y = np.where(tests[1].numpy() > 0, 1.0, -1.0)
    np.testing.assert_allclose(expl.measurements, np.logaddexp(0.0, -y * margin), rtol=1e-12)
    np.testing.assert_array_equal(expl.test_ids, np.arange(4))


def test_provenance_is_the_scores_and_an_exact_solver_is_not_estimated(case):
    inf, _, tests, _ = case
    expl = uw.explain(inf, tests, top=3, check_accuracy=True)
    assert isinstance(expl.provenance, uw.Provenance) and expl.provenance is expl.scores.provenance
    assert (
        expl.accuracy is None and expl.provenance.accuracy is None
    )  # Direct's residual bounds its error
    assert expl.provenance.solver == uw.Direct().config() and expl.provenance.accepted is True


def test_an_approximate_solver_is_measured_against_cg(small_logreg):
    model, l2, train, test = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.KFAC(), progress=False
    ).fit(train)
    tests = (test[0][:2], test[1][:2])
    plain = uw.explain(inf, tests, top=3)
    assert plain.accuracy is None and isinstance(
        plain.provenance.accuracy, str
    )  # "not estimated: …"
    checked = uw.explain(inf, tests, top=3, check_accuracy=True)
    assert isinstance(checked.accuracy, AccuracyEstimate)
    assert checked.provenance.accuracy == checked.accuracy.summary()
    assert checked.provenance["accuracy"] == checked.accuracy.summary()


def test_top_is_clipped_to_n_and_refused_below_one(case):
    inf, _, tests, _ = case
    n = len(inf.data_)
    expl = uw.explain(inf, (tests[0][:1], tests[1][:1]), top=n + 5)
    assert expl.top == n and len(expl.helpful[0]) == n
    with pytest.raises(InputError):
        uw.explain(inf, tests, top=0)
    with pytest.raises(InputError):
        uw.explain(object(), tests)  # type: ignore[arg-type]
