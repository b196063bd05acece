"""CG's final residual check: the true residual ‖(H + δI)x − v‖/‖v‖ of a sample of the right-hand
sides (every one of a block of ≤ 16) and of every unconverged one, against an explicit float64 H."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import upweight as uw
from upweight.core.curvature import Curvature
from upweight.errors import InputError, NotConvergedWarning
from upweight.solvers.base import RESIDUAL_SAMPLE


@pytest.fixture(scope="module")
def curvature(small_logreg):
    model, l2, train, _ = small_logreg
    return Curvature(uw.Objective(model, "logistic", l2=l2), uw.Data.from_any(train), damping=0.01)


def _true_residual(H: torch.Tensor, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    X, V = X.double(), V.double()
    return (X @ H - V).norm(dim=1) / V.norm(dim=1)


def _rhs(k: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(k, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", [True, False], ids=["block", "columns"])
@pytest.mark.parametrize("k", [5, 16, 40])
def test_measured_residuals_are_the_true_ones(curvature, block, k):
    H = curvature.dense()
    V = _rhs(k, curvature.p, k)
    sol = uw.CG(rtol=1e-8, block=block).solve(curvature, V)
    assert bool(sol.converged.all())
    mask = sol.measured_mask
    expected = (
        torch.linspace(0, k - 1, RESIDUAL_SAMPLE).round().long().unique()
        if k > RESIDUAL_SAMPLE
        else torch.arange(k)
    )
    assert mask.nonzero().reshape(-1).tolist() == expected.tolist()
    assert int(mask.sum()) == min(k, RESIDUAL_SAMPLE)
    true = _true_residual(H, sol.value, V)
    torch.testing.assert_close(sol.residual[mask], true[mask], rtol=1e-6, atol=1e-13)
    assert bool(torch.isnan(sol.residual[~mask]).all())
    assert sol.max_residual == pytest.approx(float(true[mask].max()), rel=1e-6)
    # every column met rtol, measured or not; the recurrence and the true residual agree to rounding
    # here
    assert float(true.max()) < 1e-7
    assert sol.stats["residual_measured"].startswith(f"{int(mask.sum())} of {k} right-hand sides")
    assert 0 <= sol.stats["residual_gap_max"] < 1e-10
    assert sol.stats["recurrence_residual_max"] <= 1e-8


@pytest.mark.parametrize("block", [True, False], ids=["block", "columns"])
def test_unconverged_solve_is_reported_and_every_unconverged_column_measured(curvature, block):
    H = curvature.dense()
    V = _rhs(40, curvature.p, 1)
    with pytest.warns(NotConvergedWarning, match="maxiter=1 with 40 of 40"):
        sol = uw.CG(rtol=1e-10, maxiter=1, block=block).solve(curvature, V)
    assert not bool(sol.converged.any()) and sol.iterations == 1
    assert bool(sol.measured_mask.all())  # an unconverged column is always measured
    true = _true_residual(H, sol.value, V)
    torch.testing.assert_close(sol.residual, true, rtol=1e-6, atol=1e-13)
    assert sol.max_residual > 1e-10


def test_unconverged_columns_are_measured_even_with_residual_sample_zero(curvature):
    H = curvature.dense()
    V = _rhs(3, curvature.p, 2)
    V[1] = V[1] * 0  # a zero column converges at once
    with pytest.warns(NotConvergedWarning, match="2 of 3"):
        sol = uw.CG(rtol=1e-12, maxiter=2, block=False, residual_sample=0).solve(curvature, V)
    assert sol.converged.tolist() == [False, True, False]
    assert sol.measured_mask.tolist() == [True, False, True]
    true = _true_residual(H, sol.value, V)
    torch.testing.assert_close(sol.residual[[0, 2]], true[[0, 2]], rtol=1e-6, atol=1e-13)
    assert math.isnan(float(sol.residual[1]))


def test_true_residual_above_rtol_is_detected_where_the_recurrence_claims_convergence(
    curvature, small_logreg
):
    """float32: the recurrence residual keeps falling below rtol while the true one stalls at
    rounding level — the measured (true) residual shows it, and Influence's max_residual can reject
    it."""
    model, l2, train, _ = small_logreg
    m32 = copy.deepcopy(model).float()
    c32 = Curvature(
        uw.Objective(m32, "logistic", l2=l2),
        uw.Data.from_any((train[0].float(), train[1])),
        damping=0.01,
    )
    V = _rhs(20, c32.p, 3).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        sol = uw.CG(rtol=1e-9, maxiter=400).solve(c32, V)
    converged_claimed = sol.converged & sol.measured_mask
    assert bool(converged_claimed.any())
    assert sol.max_residual > 1e-9  # the true residual, not the recurrence's
    true = _true_residual(curvature.dense(), sol.value, V)  # float64 H (the same model in float64)
    mask = sol.measured_mask
    assert float(true[mask].max()) > 1e-9
    assert sol.stats["residual_gap_max"] > 0


def test_residual_sample_setting(curvature):
    assert "residual_sample" not in uw.CG().config()  # the default's fingerprint is unchanged
    assert uw.CG(residual_sample=4).config()["residual_sample"] == 4
    V = _rhs(10, curvature.p, 4)
    sol = uw.CG(rtol=1e-8, residual_sample=0).solve(curvature, V)
    assert not bool(sol.measured_mask.any()) and math.isnan(sol.max_residual) and not sol.checked
    sol = uw.CG(rtol=1e-8, residual_sample=3).solve(curvature, V)
    assert sol.measured_mask.nonzero().reshape(-1).tolist() == [0, 4, 9]
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(InputError, match="residual_sample"):
            uw.CG(residual_sample=bad)
