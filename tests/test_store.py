"""Resumable stores (``upweight.store``) and the executor-driven sweeps of ``Influence``.

Problem: logistic regression on 400 real MNIST 1-vs-7 images pooled to 49 features
(conftest ``small_logreg``), ``batch_size=80`` ⇒ 5 chunks of training points. Scores are
checked against the closed form of Koh & Liang (2017) §2.3, and a resumed run against an
uninterrupted one with ``np.array_equal`` (bit-for-bit).
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

import upweight as uw
import upweight.influence.engine as engine
from reference import assert_not_constant, logistic_closed_form
from upweight._executor import LocalExecutor, split_indices
from upweight.errors import InputError, NotAtMinimumWarning
from upweight.store import Store, StoreError, StoreMismatchError

N_CHUNKS = 5


def make_inf(model, l2, train, **kw):
    kw.setdefault("solver", uw.Direct())
    return uw.Influence(
        uw.Objective(model, "logistic", l2=l2), batch_size=80, progress=False, **kw
    ).fit(train)


@pytest.fixture(scope="module")
def setup(small_logreg):
    model, l2, train, test = small_logreg
    inf = make_inf(model, l2, train)
    ref_up = inf.up_loss(test).values
    ref_self = inf.self_influence().values
    return model, l2, train, test, inf, ref_up, ref_self


class CountingChunks:
    """Wraps a chunk function: records the chunk positions it computes, fails on call
    ``fail_at``."""

    def __init__(self, fn, fail_at=None, exc=RuntimeError):
        self.fn, self.fail_at, self.exc, self.calls = fn, fail_at, exc, []

    def __call__(self, indices, *args):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self.exc("simulated crash")
        self.calls.append(np.asarray(indices).copy())
        return self.fn(indices, *args)


def chunk_starts(calls) -> list[int]:
    return [int(c[0]) for c in calls]


def test_scores_match_closed_form_and_local_executor_is_the_plain_path(setup):
    model, l2, (X, y), (Xt, yt), inf, ref_up, ref_self = setup
    theta = model.weight.detach().numpy().ravel()
    up, _, _ = logistic_closed_form(theta, X.numpy(), y.numpy(), Xt.numpy(), yt.numpy(), l2)
    self_cf, _, _ = logistic_closed_form(theta, X.numpy(), y.numpy(), X.numpy(), y.numpy(), l2)
    assert_not_constant(ref_up)
    np.testing.assert_allclose(ref_up, up, rtol=1e-8, atol=1e-10 * np.abs(up).max())
    np.testing.assert_allclose(ref_self, np.diag(self_cf), rtol=1e-8)
    # an explicit LocalExecutor (fit and sweep) gives bit-for-bit the default results
    loc = uw.Influence(inf.objective, solver=uw.Direct(), batch_size=80, progress=False).fit(
        (X, y), executor=LocalExecutor()
    )
    assert np.array_equal(loc.up_loss((Xt, yt), executor=LocalExecutor()).values, ref_up)
    assert np.array_equal(loc.self_influence().values, ref_self)
    V = torch.randn(
        3, inf.objective.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(loc.curvature_.matvec(V), inf.curvature_.matvec(V))
    sel = [5, 399, 17, 200]
    part = inf.up_loss((Xt, yt), sel)
    assert part.train_ids.tolist() == sel
    # other chunking: rounding only
    np.testing.assert_allclose(part.values, ref_up[:, sel], rtol=1e-12, atol=1e-15)


def test_resume_after_crash_is_identical_and_computes_only_missing_chunks(
    setup, tmp_path, monkeypatch
):
    *_, test, inf, ref_up, _ = setup
    folder = tmp_path / "run"
    crash = CountingChunks(engine._up_loss_chunk, fail_at=2)
    monkeypatch.setattr(engine, "_up_loss_chunk", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        inf.up_loss(test, store=folder)
    assert chunk_starts(crash.calls) == [0, 80]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["arrays"]["scores"]["chunks"]) == ["0", "1"]
    assert manifest["arrays"]["scores"]["chunk_size"] == 80

    rerun = CountingChunks(engine._up_loss_chunk.fn)
    monkeypatch.setattr(engine, "_up_loss_chunk", rerun)
    monkeypatch.setattr(
        uw.Influence, "s_test", lambda *a, **k: pytest.fail("s_test was solved again")
    )
    out = inf.up_loss(test, store=folder)
    assert chunk_starts(rerun.calls) == [160, 240, 320]
    assert np.array_equal(out.values, ref_up)
    assert out.provenance["solver_resumed_from_store"] is True
    # a third run computes nothing
    rerun.calls.clear()
    assert np.array_equal(inf.up_loss(test, store=Store.open(folder)).values, ref_up)
    assert rerun.calls == []


def test_keyboard_interrupt_leaves_store_consistent(setup, tmp_path, monkeypatch):
    *_, inf, _, ref_self = setup
    folder = tmp_path / "self"
    crash = CountingChunks(engine._self_influence_chunk, fail_at=3, exc=KeyboardInterrupt)
    monkeypatch.setattr(engine, "_self_influence_chunk", crash)
    with pytest.raises(KeyboardInterrupt):
        inf.self_influence(store=folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["arrays"]["self_influence"]["chunks"]) == ["0", "1", "2"]
    assert not list(folder.rglob("*.tmp"))
    rerun = CountingChunks(engine._self_influence_chunk.fn)
    monkeypatch.setattr(engine, "_self_influence_chunk", rerun)
    out = inf.self_influence(store=folder)
    assert chunk_starts(rerun.calls) == [240, 320]
    assert np.array_equal(out.values, ref_self)
    assert out.provenance["residual_max"] < 1e-8


def test_crash_between_chunk_file_and_manifest_recomputes_that_chunk(setup, tmp_path, monkeypatch):
    *_, test, inf, ref_up, _ = setup
    folder = tmp_path / "run"
    inf.up_loss(test, store=folder)
    # the file of chunk 3 is in place but the manifest never recorded it
    m = json.loads((folder / "manifest.json").read_text())
    del m["arrays"]["scores"]["chunks"]["3"]
    (folder / "manifest.json").write_text(json.dumps(m))
    rerun = CountingChunks(engine._up_loss_chunk)
    monkeypatch.setattr(engine, "_up_loss_chunk", rerun)
    assert np.array_equal(inf.up_loss(test, store=folder).values, ref_up)
    assert chunk_starts(rerun.calls) == [240]


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape", "flip_bytes", "delete"])
def test_damaged_chunk_is_detected_and_recomputed(setup, tmp_path, monkeypatch, caplog, damage):
    *_, test, inf, ref_up, _ = setup
    folder = tmp_path / "run"
    inf.up_loss(test, store=folder)
    f = folder / "scores" / "000002.npy"
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "wrong_shape":
        np.save(f, np.zeros((30, 79)))
    elif damage == "flip_bytes":
        f.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:]))
    else:
        f.unlink()
    rerun = CountingChunks(engine._up_loss_chunk)
    monkeypatch.setattr(engine, "_up_loss_chunk", rerun)
    with caplog.at_level(logging.WARNING, logger="upweight"):
        out = inf.up_loss(test, store=folder)
    assert chunk_starts(rerun.calls) == [160]
    assert "chunk 2 of 'scores' is damaged" in caplog.text
    assert np.array_equal(out.values, ref_up)


def _changed_model(model, bump):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.weight[0, 0] += bump
    return m


@pytest.mark.filterwarnings("ignore::upweight.errors.NotAtMinimumWarning")
def test_store_refuses_a_different_computation(setup, tmp_path):
    model, l2, (X, y), (Xt, yt), inf, ref_up, _ = setup
    folder = tmp_path / "run"
    inf.up_loss((Xt, yt), store=folder)
    cases = {
        "model.parameters_sha256": (
            lambda: make_inf(_changed_model(model, 1e-3), l2, (X, y)).up_loss(
                (Xt, yt), store=folder
            )
        ),
        "objective.l2: stored 0.01, now 0.02": (
            lambda: make_inf(model, 0.02, (X, y)).up_loss((Xt, yt), store=folder)
        ),
        "train_data.X.sha256": (
            lambda: make_inf(
                model, l2, (X + (torch.arange(len(X)) == 7)[:, None] * 0.01, y)
            ).up_loss((Xt, yt), store=folder)
        ),
        "test_data.y.sha256": lambda: inf.up_loss((Xt, -yt), store=folder),
        "solver.name: stored 'direct', now 'cg'": (
            lambda: make_inf(model, l2, (X, y), solver=uw.CG()).up_loss((Xt, yt), store=folder)
        ),
        "quantity: stored 'up_loss', now 'self_influence'": lambda: inf.self_influence(
            store=folder
        ),
        "train_selection": lambda: inf.up_loss((Xt, yt), list(range(10)), store=folder),
        "damping: stored 0.0, now 0.1": (
            lambda: make_inf(model, l2, (X, y), damping=0.1).up_loss((Xt, yt), store=folder)
        ),
    }
    for phrase, call in cases.items():
        with pytest.raises(StoreMismatchError) as err:
            call()
        msg = str(err.value)
        assert phrase in msg, (phrase, msg)
        assert "new folder" in msg and "overwrite=True" in msg
    # a store the mismatches left untouched still resumes to the same scores
    assert np.array_equal(inf.up_loss((Xt, yt), store=folder).values, ref_up)


def test_other_chunk_size_is_refused_and_overwrite_starts_afresh(setup, tmp_path):
    model, l2, train, test, inf, ref_up, _ = setup
    folder = tmp_path / "run"
    inf.up_loss(test, store=folder)
    other = uw.Influence(inf.objective, solver=uw.Direct(), batch_size=50, progress=False).fit(
        train
    )
    with pytest.raises(StoreMismatchError, match=r"chunk_size: stored 80, now 50.*batch_size=50"):
        other.up_loss(test, store=folder)
    out = other.up_loss(test, store=Store(folder, overwrite=True))
    np.testing.assert_allclose(out.values, ref_up, rtol=1e-12, atol=1e-15)
    assert (
        json.loads((folder / "manifest.json").read_text())["arrays"]["scores"]["chunk_size"] == 50
    )
    with pytest.warns(NotAtMinimumWarning):
        new = make_inf(model, 0.05, train)
    fresh = new.up_loss(test, store=Store(folder, overwrite=True)).values
    assert np.array_equal(fresh, new.up_loss(test).values)
    assert not np.allclose(fresh, ref_up)


def test_store_api_and_bad_inputs(tmp_path):
    s = Store(tmp_path / "s")
    with pytest.raises(StoreError, match="not bound"):
        s.chunked("a", shape=(4,), axis=0, chunk_size=2, dtype="float64")
    s.bind({"x": 1})
    a = s.chunked("a", shape=(3, 5), axis=1, chunk_size=2, dtype="float32")
    assert [a.chunk_shape(i) for i in range(a.n_chunks)] == [(3, 2), (3, 2), (3, 1)]
    with pytest.raises(StoreError, match="must have shape"):
        a.write(2, np.zeros((3, 2)))
    s.put("v", np.arange(4.0), meta={"note": "hi"})
    value, meta = Store.open(tmp_path / "s").get("v")
    assert value.tolist() == [0.0, 1.0, 2.0, 3.0] and meta == {"note": "hi"}
    with pytest.raises(StoreMismatchError, match="dtype: stored 'float32', now 'float64'"):
        s.chunked("a", shape=(3, 5), axis=1, chunk_size=2, dtype="float64")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot be read.*overwrite=True"):
        Store.open(tmp_path / "s")
    assert [p.tolist() for p in split_indices(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [len(p) for p in split_indices(10, 100, min_parts=3)] == [4, 4, 2]


def test_bad_store_and_executor_arguments(setup):
    *_, test, inf, _, _ = setup
    with pytest.raises(InputError, match="store must be a folder path"):
        inf.up_loss(test, store=42)
    with pytest.raises(InputError, match="executor must be an upweight Executor"):
        inf.up_loss(test, executor="dask")
