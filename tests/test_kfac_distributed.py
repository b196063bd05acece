"""K-FAC / EK-FAC factor statistics map-reduced over an executor (``core.kfac.fit_factors``):
equal to the in-process factors — with a ``LocalExecutor`` over partitions that differ from the
in-process batches, and on a Dask LocalCluster of 2 worker processes — and the factors checked
against closed forms computed here from the data (A of the first layer = (1/n)Σ ããᵀ with
ã = [x, 1]; S of the cross-entropy output layer = (1/n)Σ (diag(p) − ppᵀ)).

Tolerances. A, S and Λ are float64 sums over the n = 150 training points; an executor groups
the points differently (partitions of 30 or 75 instead of batches of 32 or 100), so the sums
differ by the rounding of a regrouped float64 sum, at most about n·ε ≈ 3e-14 relative: asserted
1e-12. The EK-FAC operator (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ and the influence scores also go
through eigenvectors, whose perturbation is amplified by 1/(eigenvalue gap); measured here at
≤ 5e-15 relative (the sums at ≤ 6e-16), asserted 1e-10. With the in-process batches as partitions
the result is bit-identical (asserted with ``torch.equal``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import ConvNet, TanhMLP, pooled
from reference import assert_not_constant
from upweight._executor import LocalExecutor, run_task, split_indices
from upweight.core.kfac import LayerFactors, fit_factors
from upweight.core.layers import find_layers
from upweight.solvers.kfac import EKFAC, KFAC

D64 = torch.float64
SUM_TOL = 1e-12  # regrouped float64 sums of n = 150 terms (≈ n·ε ≈ 3e-14)
EIG_TOL = 1e-10  # through eigenvectors: × 1/(eigenvalue gap)
N = 150


@pytest.fixture(scope="module")
def images(mnist_1v7):
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:N], 4), dtype=D64)  # real pixels, 7×7 = 49 features
    y = torch.tensor((d.y_train[:N] > 0).astype(np.int64))
    Xt = torch.tensor(pooled(d.x_test[:4], 4), dtype=D64)
    yt = torch.tensor((d.y_test[:4] > 0).astype(np.int64))
    return (X, y), (Xt, yt)


def make(kind: str) -> uw.Objective:
    torch.manual_seed(0)
    model = {"mlp": lambda: TanhMLP(49, 5, 2), "conv": ConvNet}[kind]().double().eval()
    return uw.Objective(model, "cross_entropy", l2=0.01)


def operator_of(f: LayerFactors) -> torch.Tensor:
    """The layer's approximate GGN block (Q_S ⊗ Q_A) diag(eigenvalues) (Q_S ⊗ Q_A)ᵀ, dense."""
    B = f.basis()
    return B @ torch.diag(f.eigenvalues.reshape(-1)) @ B.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_same_factors(got: list[LayerFactors], ref: list[LayerFactors]) -> None:
    assert [f.block.name for f in got] == [f.block.name for f in ref]
    for g, r in zip(got, ref):
        assert g.locations == r.locations
        assert rel(g.A, r.A) < SUM_TOL and rel(g.S, r.S) < SUM_TOL
        assert rel(g.eig_A, r.eig_A) < SUM_TOL and rel(g.eig_S, r.eig_S) < SUM_TOL
        assert (g.corrected is None) == (r.corrected is None)
        assert rel(operator_of(g), operator_of(r)) < EIG_TOL


def check_closed_forms(obj: uw.Objective, X: torch.Tensor, factors: list[LayerFactors]) -> None:
    """A of fc1 = (1/n)[X 1]ᵀ[X 1]; S of fc2 = (1/n)Σ diag(p) − ppᵀ (the softmax covariance)."""
    by = {f.block.name: f for f in factors}
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=D64)], 1)
    assert rel(by["fc1"].A, Xa.T @ Xa / len(X)) < SUM_TOL
    with torch.no_grad():
        p = torch.softmax(obj.model(X), 1)
    S_ref = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert rel(by["fc2"].S, S_ref) < SUM_TOL


class CountingExecutor(LocalExecutor):
    """A ``LocalExecutor`` that reports ``parallelism`` workers and records each map_reduce."""

    def __init__(self, parallelism: int) -> None:
        self.parallelism = parallelism
        self.calls: list[tuple[str, int]] = []

    def map_reduce(self, fn, partitions, reduce, *args):
        self.calls.append((fn.__name__, len(partitions)))
        return super().map_reduce(fn, partitions, reduce, *args)


# ── LocalExecutor (fast) ────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
def test_local_executor_partitions_equal_in_process(images, kind, ekfac):
    (X, y), _ = images
    obj = make(kind)
    data = uw.Data.from_any((X, y))
    blocks = find_layers(obj, data).blocks
    ref, ref_stats = fit_factors(obj, data, blocks, batch_size=32, eigen_correction=ekfac)
    ex = CountingExecutor(5)  # partitions of ⌈150/5⌉ = 30 points, not the in-process batches of 32
    got, stats = fit_factors(obj, data, blocks, batch_size=32, eigen_correction=ekfac, executor=ex)
    n_parts = len(split_indices(N, 32, min_parts=5))
    assert n_parts == 5
    assert ex.calls == [("_moment_partition", 5)] + (
        [("_correction_partition", 5)] if ekfac else []
    )
    assert stats.passes == ref_stats.passes == (2 if ekfac else 1)
    assert "5 partitions" in stats.where and ref_stats.where == "in-process"
    assert_same_factors(got, ref)
    assert any(float((g.A - r.A).abs().max()) > 0 for g, r in zip(got, ref)), (
        "regrouped sums should differ in rounding"
    )
    if kind == "mlp":
        check_closed_forms(obj, X, got)
    else:
        assert [f.locations for f in got] == [49, 9, 1]


def test_local_executor_with_the_batches_as_partitions_is_bit_identical(images):
    (X, y), _ = images
    obj = make("conv")
    data = uw.Data.from_any((X, y))
    blocks = find_layers(obj, data).blocks
    ref, _ = fit_factors(obj, data, blocks, batch_size=32, eigen_correction=True)
    got, _ = fit_factors(
        obj, data, blocks, batch_size=32, eigen_correction=True, executor=LocalExecutor()
    )
    for g, r in zip(got, ref):
        assert (
            torch.equal(g.A, r.A)
            and torch.equal(g.S, r.S)
            and torch.equal(g.corrected, r.corrected)
        )


def test_inside_a_task_the_passes_stay_in_process(images):
    (X, y), _ = images
    obj = make("mlp")
    data = uw.Data.from_any((X, y))
    blocks = find_layers(obj, data).blocks
    ex = CountingExecutor(3)
    run_task(lambda _part: fit_factors(obj, data, blocks, eigen_correction=True, executor=ex), None)
    assert ex.calls == []


def test_kfac_prepare_passes_the_curvature_executor(images):
    (X, y), test = images
    obj = make("mlp")
    ex = CountingExecutor(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        inf = uw.Influence(
            obj,
            solver=EKFAC(),
            damping=0.1,
            batch_size=64,
            max_residual=None,
            progress=False,
            structured=False,
        ).fit((X, y), executor=ex)
        ref = uw.Influence(
            obj,
            solver=EKFAC(),
            damping=0.1,
            batch_size=64,
            max_residual=None,
            progress=False,
            structured=False,
        ).fit((X, y))
    assert ("_moment_partition", 4) in ex.calls and ("_correction_partition", 4) in ex.calls
    assert (
        "4 partitions" in inf.state_.stats["fit_where"]
        and ref.state_.stats["fit_where"] == "in-process"
    )
    assert_same_factors(inf.state_.factors, ref.state_.factors)


# ── Dask LocalCluster, 2 worker processes ────────────────────────────────────────────────
@pytest.fixture(scope="module")
def dask_ex(dask_executor):
    return dask_executor  # conftest: one LocalCluster of 2 worker processes for the session


def test_dask_factors_equal_in_process_and_closed_forms(images, dask_ex):
    import distributed

    (X, y), _ = images
    assert dask_ex.parallelism == 2
    for kind in ("mlp", "conv"):
        obj = make(kind)
        data = uw.Data.from_any((X, y))
        blocks = find_layers(obj, data).blocks
        # batch_size 100: in-process batches of 100 + 50, on the cluster 2 partitions of 75
        for ekfac in (False, True):
            ref, _ = fit_factors(obj, data, blocks, batch_size=100, eigen_correction=ekfac)
            with distributed.get_task_stream(client=dask_ex.client) as ts:
                got, stats = fit_factors(
                    obj, data, blocks, batch_size=100, eigen_correction=ekfac, executor=dask_ex
                )
            # one task per partition per pass, on the workers
            assert len(ts.data) == 2 * (2 if ekfac else 1)
            # both workers took part
            assert {t["worker"] for t in ts.data} == set(dask_ex.client.nthreads())
            assert "DaskExecutor" in stats.where and "2 partitions" in stats.where
            assert_same_factors(got, ref)
            if kind == "mlp":
                check_closed_forms(obj, X, got)


@pytest.mark.parametrize("solver", [KFAC(), EKFAC()], ids=["kfac", "ekfac"])
def test_dask_influence_scores_equal_in_process(images, dask_ex, solver):
    (X, y), (Xt, yt) = images
    obj = make("conv")
    kw = dict(solver=solver, damping=0.1, batch_size=100, max_residual=None, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        ref = uw.Influence(obj, **kw).fit((X, y))
        dist = uw.Influence(obj, **kw).fit((X, y), executor=dask_ex)
    assert "DaskExecutor" in dist.state_.stats["fit_where"]
    assert_same_factors(dist.state_.factors, ref.state_.factors)
    a, b = dist.up_loss((Xt, yt)).values, ref.up_loss((Xt, yt)).values
    assert_not_constant(b)
    assert np.abs(a - b).max() <= EIG_TOL * np.abs(b).max()


def test_dask_low_rank_query_scoring_equals_in_process(images, dask_ex):
    """Influence(query_rank=1): the rank travels with s_test to the workers' scoring tasks."""
    (X, y), (Xt, yt) = images
    obj = make("conv")
    kw = dict(
        solver=EKFAC(), damping=0.1, batch_size=100, max_residual=None, progress=False, query_rank=1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", uw.errors.NotAtMinimumWarning)
        ref = uw.Influence(obj, **kw).fit((X, y)).up_loss((Xt, yt))
        exact = uw.Influence(obj, **{**kw, "query_rank": None}).fit((X, y)).up_loss((Xt, yt)).values
        dist = uw.Influence(obj, **kw).fit((X, y), executor=dask_ex).up_loss((Xt, yt))
    assert dist.provenance["query_rank"] == 1
    assert np.abs(dist.values - ref.values).max() <= EIG_TOL * np.abs(ref.values).max()
    # rank 1 is an approximation here
    assert np.abs(dist.values - exact).max() > 1e-3 * np.abs(exact).max()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_rows_gathered_over_small_captures_give_the_explicit_sums(images, kind):
    """One point per capture: every factor's rows are gathered over many captures before one
    product (``_GramRows``); the sums equal Σᵢ Σₜ ãᵢₜãᵢₜᵀ and Σᵢ (1/T) Σₖₜ bᵢₖₜbᵢₖₜᵀ formed from one
    capture of all points."""
    from upweight.core import kfac as K
    from upweight.core.layers import capture

    (X, y), _ = images
    obj = make(kind)
    data = uw.Data.from_any((X, y))
    blocks = find_layers(obj, data).blocks
    ctx = K._FactorContext(obj, data, blocks, None, 2048)
    ctx.step = 1
    gathered = []
    product = K._GramRows._product

    def spy(self, key):
        gathered.append(len(self.pending[key]))  # captures whose rows go into one product
        product(self, key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K._GramRows, "_product", spy)
        sums = K._moment_sums(ctx, data).tensors
    cap = capture(obj, blocks, data, cotangents="ggn", token_ids=True)
    for blk in blocks:
        a = cap.a[blk.name].reshape(-1, blk.cols)
        g = cap.g[blk.name]
        S = g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) / g.shape[2]
        assert rel(sums["A:" + blk.name], a.T @ a) < SUM_TOL, blk.name
        assert rel(sums["S:" + blk.name], S) < SUM_TOL, blk.name
    assert max(gathered) > 1, "some factor gathered the rows of several captures"
