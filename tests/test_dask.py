"""``DaskExecutor`` on a LocalCluster of 2 worker processes (1 thread each) against the in-process
results and the closed form (Koh & Liang 2017 §2.3), on 400 real MNIST 1-vs-7 images pooled to
49 features (conftest ``small_logreg``).

The cluster is conftest's ``dask_executor`` (shared with tests/test_kfac_distributed.py).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import upweight as uw
import upweight.influence.engine as engine
from reference import assert_not_constant, logistic_closed_form
from upweight.errors import InputError

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (pip install upweight[dask])"
)
dask = pytest.importorskip("dask")

from upweight.distributed import DaskExecutor, ExecutorConnectionError  # noqa: E402

RTOL = 1e-10


@pytest.fixture(scope="module")
def ex(dask_executor):
    return dask_executor  # conftest: one LocalCluster of 2 worker processes for the session


@pytest.fixture(scope="module")
def problem(small_logreg):
    model, l2, (X, y), (Xt, yt) = small_logreg
    theta = model.weight.detach().numpy().ravel()
    up, _, H = logistic_closed_form(theta, X.numpy(), y.numpy(), Xt[:5].numpy(), yt[:5].numpy(), l2)
    self_cf = np.diag(
        logistic_closed_form(theta, X.numpy(), y.numpy(), X.numpy(), y.numpy(), l2)[0]
    )
    return uw.Objective(model, "logistic", l2=l2), (X, y), (Xt[:5], yt[:5]), up, self_cf, H


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_dask_matches_single_process_and_closed_form(ex, problem):
    obj, train, test, up_cf, self_cf, H = problem
    assert ex.parallelism == 2
    local = uw.Influence(obj, solver=uw.Direct(), batch_size=100, progress=False).fit(train)
    dist = uw.Influence(obj, solver=uw.Direct(), batch_size=100, progress=False).fit(
        train, executor=ex
    )
    # HVPs: the full-data sum over 2 partitions on the workers
    V = torch.randn(4, obj.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hv_local, hv_dist = local.curvature_.matvec(V), dist.curvature_.matvec(V)
    assert rel_err(hv_dist, hv_local) < RTOL
    assert rel_err(hv_dist, V.numpy() @ H) < 1e-12
    assert rel_err(dist.state_.H, H) < 1e-12  # Direct's dense H built from distributed HVPs
    u_local, u_dist = local.up_loss(test).values, dist.up_loss(test).values
    assert_not_constant(u_dist)
    assert rel_err(u_dist, u_local) < RTOL
    assert rel_err(u_dist, up_cf) < 1e-8
    s_local, s_dist = local.self_influence().values, dist.self_influence().values
    assert rel_err(s_dist, s_local) < RTOL
    assert rel_err(s_dist, self_cf) < 1e-8


def test_dask_cg_solves_and_cg_state_shipped_to_workers(ex, problem):
    obj, train, test, up_cf, self_cf, _ = problem
    cg = uw.CG(rtol=1e-10)
    local = uw.Influence(obj, solver=cg, batch_size=100, progress=False).fit(train)
    dist = uw.Influence(obj, solver=cg, batch_size=100, progress=False).fit(train, executor=ex)
    # CG's HVPs run on the cluster (one map-reduce per iteration)
    u_dist = dist.up_loss((test[0][:2], test[1][:2])).values
    assert rel_err(u_dist, local.up_loss((test[0][:2], test[1][:2])).values) < RTOL
    assert rel_err(u_dist, up_cf[:2]) < 1e-8
    # self-influence: each chunk's CG solve runs on a worker against its own copy of the data
    sel = list(range(0, 400, 40))
    s_dist = dist.self_influence(sel).values
    assert rel_err(s_dist, local.self_influence(sel).values) < RTOL
    assert rel_err(s_dist, self_cf[sel]) < 1e-8


def test_local_crash_then_dask_resume_is_identical(ex, problem, tmp_path, monkeypatch):
    obj, train, test, *_ = problem
    inf = uw.Influence(obj, solver=uw.Direct(), batch_size=80, progress=False).fit(train)
    ref = inf.up_loss(test).values
    real = engine._up_loss_chunk
    calls = []

    def crash_after_two(indices, *args):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(int(indices[0]))
        return real(indices, *args)

    monkeypatch.setattr(engine, "_up_loss_chunk", crash_after_two)
    with pytest.raises(RuntimeError):
        inf.up_loss(test, store=tmp_path / "run")
    monkeypatch.setattr(engine, "_up_loss_chunk", real)
    out = inf.up_loss(test, store=tmp_path / "run", executor=ex)  # chunks 2–4 on the workers
    assert calls == [0, 80]
    assert rel_err(out.values, ref) < RTOL
    # the stored chunks are returned as written
    assert np.array_equal(out.values[:, :160], ref[:, :160])


def test_unreachable_scheduler_fails_fast_with_a_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(
        ExecutorConnectionError, match=r"tcp://127\.0\.0\.1:9.*within 2 s.*DaskExecutor\('local'\)"
    ):
        DaskExecutor("tcp://127.0.0.1:9", connect_timeout=2)
    assert time.perf_counter() - t0 < 10


def test_bad_arguments():
    with pytest.raises(InputError, match="n_workers must be a positive integer"):
        DaskExecutor("local", n_workers=0)
    with pytest.raises(InputError, match="address must be None, 'local'"):
        DaskExecutor(3.5)


def test_workers_of_a_local_cluster_leave_ctrl_c_to_the_client(ex):
    """Ctrl-C reaches the whole process group: the workers of a cluster the executor started ignore
    it (the client cancels the tasks and closes the cluster) instead of each printing a traceback.
    """
    import signal

    def sigint_ignored() -> bool:
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN

    ignored = ex.client.run(sigint_ignored)
    assert len(ignored) == 2 and all(ignored.values())
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # the client process still gets it
