"""K-FAC / EK-FAC factors kept in a ``Store`` (``Influence.fit(train, store=…)``, ``KFAC.prepare(…,
store=…)``, ``core.kfac.FactorStore``): a reloaded fit does no factor pass and gives bit-for-bit the
scores of a fresh one; damping, l2 and the solver's damping reuse the stored factors; another
computation is refused; other solvers are refused; loading checks memory; nothing is pickled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import upweight as uw
import upweight.core.kfac as core_kfac
from upweight.errors import InputError, InsufficientMemoryError, StoreMismatchError
from upweight.solvers.kfac import EKFAC, KFAC

D64 = torch.float64
V, T, D, C = 7, 3, 4, 3


class TinyLM(torch.nn.Module):
    """Embedding → LayerNorm (a module-local block) → tanh → Linear → Linear, × a bare scale
    (a CG fallback block): every kind of block K-FAC keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.ln = torch.nn.LayerNorm(D)
        self.fc = torch.nn.Linear(T * D, 5)
        self.head = torch.nn.Linear(5, C)
        self.scale = torch.nn.Parameter(torch.ones(C))

    def forward(self, x):
        h = torch.tanh(self.ln(self.emb(x))).flatten(1)
        return self.head(torch.tanh(self.fc(h))) * self.scale


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyLM().double().eval()


def _data(n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, C, (n,), generator=g)


TEST = _data(3, seed=5)


def _influence(model, solver, *, l2: float = 0.1, damping: float = 0.01) -> uw.Influence:
    return uw.Influence(
        uw.Objective(model, "cross_entropy", l2=l2),
        solver=solver,
        damping=damping,
        grad_tol=math.inf,
        progress=False,
        max_residual=None,
    )


@pytest.fixture
def captures(monkeypatch):
    """How many captures the factor passes make (``core.kfac.capture``)."""
    count = [0]
    real = core_kfac.capture

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(core_kfac, "capture", counted)
    return count


def _stats(inf: uw.Influence) -> dict:
    return inf.state_.stats


def _same_state(a, b) -> None:
    """Every tensor of two KFAC states equal bit for bit, in the same memory order."""
    for fa, fb in zip(a.factors, b.factors, strict=True):
        for name in ("A", "S", "eig_A", "Q_A", "eig_S", "Q_S", "corrected"):
            ta, tb = getattr(fa, name), getattr(fb, name)
            assert (ta is None) == (tb is None), name
            if ta is not None:
                assert (
                    ta.dtype == tb.dtype == D64
                    and torch.equal(ta, tb)
                    and ta.stride() == tb.stride()
                ), name
        assert fa.locations == fb.locations
    for ia, ib in zip(a.inv_eigs, b.inv_eigs, strict=True):
        assert torch.equal(ia, ib)
    for (_, La), (_, Lb) in zip(a.local, b.local, strict=True):
        assert torch.equal(La, Lb)


@pytest.mark.parametrize("solver", [KFAC(), EKFAC()], ids=["kfac", "ekfac"])
def test_reloaded_factors_give_bit_for_bit_scores_without_a_factor_pass(tmp_path, captures, solver):
    train = _data()
    fresh = _influence(_model(), solver).fit(train)
    expected = fresh.up_loss(TEST).values
    assert fresh.state_.local and fresh.state_.fallback is not None  # all kinds of blocks present

    captures[0] = 0
    first = _influence(_model(), solver).fit(train, store=tmp_path / "f")
    assert captures[0] > 0
    assert _stats(first)["factors_from_store"] is False and _stats(first)["factors_loaded"] == ()
    assert np.array_equal(first.up_loss(TEST).values, expected)

    captures[0] = 0
    again = _influence(_model(), solver).fit(train, store=tmp_path / "f")
    assert captures[0] == 0  # no factor pass
    st = _stats(again)
    assert st["factors_from_store"] is True and st["fit_passes_run"] == 0
    assert st["factors_loaded"] == (
        ("moments", "correction") if solver.eigen_correction else ("moments",)
    )
    assert st["factor_store"] == str(tmp_path / "f")
    _same_state(again.state_, fresh.state_)
    assert np.array_equal(again.up_loss(TEST).values, expected)
    assert again.up_loss(TEST).provenance["solver_factors_from_store"] is True


def test_damping_l2_and_the_solvers_damping_reuse_the_stored_factors(tmp_path, captures):
    train = _data()
    _influence(_model(), EKFAC(), l2=0.1, damping=0.01).fit(train, store=tmp_path)
    for l2, damping, extra in [(0.1, 0.2, 0.0), (0.3, 0.01, 0.05)]:
        captures[0] = 0
        with uw.Store(tmp_path) as st:  # a Store works as a folder path does
            reused = _influence(_model(), EKFAC(damping=extra), l2=l2, damping=damping).fit(
                train, store=st
            )
        assert captures[0] == 0 and _stats(reused)["factors_from_store"] is True
        fresh = _influence(_model(), EKFAC(damping=extra), l2=l2, damping=damping).fit(train)
        _same_state(reused.state_, fresh.state_)
        assert np.array_equal(reused.up_loss(TEST).values, fresh.up_loss(TEST).values)


def test_another_computation_is_refused_naming_what_differs(tmp_path):
    train = _data()
    _influence(_model(), KFAC()).fit(train, store=tmp_path)
    other = _model()
    with torch.no_grad():
        other.fc.weight[0, 0] += 1e-3
    cases = [
        (lambda: _influence(other, KFAC()).fit(train, store=tmp_path), "model.parameters_sha256"),
        (lambda: _influence(_model(), KFAC()).fit(_data(seed=2), store=tmp_path), "train_data."),
        (
            lambda: _influence(_model(), KFAC(max_points=10)).fit(train, store=tmp_path),
            "factors.max_points: stored None, now 10",
        ),
        (
            lambda: _influence(_model(), KFAC(max_local=0)).fit(train, store=tmp_path),
            "factors.max_local",
        ),
        (
            lambda: uw.Influence(
                uw.Objective(_model(), "cross_entropy", l2=0.1),
                solver=KFAC(),
                curvature="gauss-newton",
                grad_tol=math.inf,
                progress=False,
            ).fit(train, store=tmp_path),
            "curvature: stored 'hessian'",
        ),
        (lambda: _influence(_model().float(), KFAC()).fit(train, store=tmp_path), "model.dtype"),
    ]
    for fit, what in cases:
        with pytest.raises(StoreMismatchError, match="different computation") as exc:
            fit()
        assert what in str(exc.value)
    # refused without touching it: the original computation still reads back
    assert (
        _stats(_influence(_model(), KFAC()).fit(train, store=tmp_path))["factors_from_store"]
        is True
    )


def test_kfac_and_ekfac_share_a_store(tmp_path, captures):
    train = _data()
    _influence(_model(), KFAC()).fit(train, store=tmp_path)
    # pass 1 read back, pass 2 run and stored
    ek = _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    assert _stats(ek)["factors_loaded"] == ("moments",) and _stats(ek)["fit_passes_run"] == 1
    fresh = _influence(_model(), EKFAC()).fit(train)
    _same_state(ek.state_, fresh.state_)
    captures[0] = 0
    again = _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    assert captures[0] == 0 and _stats(again)["factors_from_store"] is True
    _same_state(again.state_, fresh.state_)
    kf = _influence(_model(), KFAC()).fit(train, store=tmp_path)  # Λ present but unused
    _same_state(kf.state_, _influence(_model(), KFAC()).fit(train).state_)


def test_an_interrupted_ekfac_fit_resumes_after_pass_one(tmp_path, monkeypatch, captures):
    train = _data()
    real = core_kfac._correct

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(core_kfac, "_correct", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    monkeypatch.setattr(core_kfac, "_correct", real)
    resumed = _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    assert (
        _stats(resumed)["factors_loaded"] == ("moments",) and _stats(resumed)["fit_passes_run"] == 1
    )
    _same_state(resumed.state_, _influence(_model(), EKFAC()).fit(train).state_)


def test_a_damaged_factor_file_is_recomputed(tmp_path):
    train = _data()
    _influence(_model(), KFAC()).fit(train, store=tmp_path)
    f = tmp_path / "layer1_Q_S" / "000000.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    again = _influence(_model(), KFAC()).fit(train, store=tmp_path)
    assert _stats(again)["factors_from_store"] is False
    _same_state(again.state_, _influence(_model(), KFAC()).fit(train).state_)
    assert (
        _stats(_influence(_model(), KFAC()).fit(train, store=tmp_path))["factors_from_store"]
        is True
    )


@pytest.mark.parametrize(
    "solver",
    [uw.CG(), uw.Auto(), uw.CG(preconditioner=KFAC()), uw.Direct()],
    ids=["cg", "auto", "cg-kfac", "direct"],
)
def test_solvers_without_factors_refuse_a_store(tmp_path, solver):
    with pytest.raises(InputError, match=r"fit\(store=...\) keeps the factors of KFAC / EKFAC"):
        _influence(_model(), solver).fit(_data(), store=tmp_path / "f")
    assert not (tmp_path / "f").exists()  # refused before anything was written
    with pytest.raises(InputError, match="folder path or an upweight.Store"):
        _influence(_model(), KFAC()).fit(_data(), store=3)


def test_loading_checks_memory_first(tmp_path, monkeypatch, captures):
    train = _data()
    _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    monkeypatch.setenv("UPWEIGHT_MEMORY_LIMIT", "1000")
    captures[0] = 0
    with pytest.raises(InsufficientMemoryError, match="Kronecker factors"):
        _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    assert captures[0] == 0


def test_store_holds_float64_npy_files_and_json_only(tmp_path):
    train = _data()
    inf = _influence(_model(), EKFAC()).fit(train, store=tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert set(files) - {"manifest.json", ".lock"} == {
        f"{n}/000000.npy" for n in json.loads((tmp_path / "manifest.json").read_text())["arrays"]
    }
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["fingerprint"]["quantity"] == "kfac_factors"
    assert "damping" not in manifest["fingerprint"] and "l2" not in json.dumps(
        manifest["fingerprint"]["objective"]
    )
    names = set(manifest["arrays"])
    n_layers = len(inf.state_.factors)
    assert {"moments_done", "correction_done", "local0_G"} <= names
    assert {
        f"layer{i}_{k}" for i in range(n_layers) for k in ("S", "eig_S", "Q_S", "eig_A", "Lambda")
    } <= names
    emb = [i for i, f in enumerate(inf.state_.factors) if f.identity_A]
    # no V × V
    assert emb and all(f"layer{i}_Q_A" not in names and f"layer{i}_A" not in names for i in emb)
    for name in names:
        a = np.load(tmp_path / name / "000000.npy", allow_pickle=False)
        assert a.dtype == np.float64
    assert [Path(p).name for p in files if not p.endswith(".npy")] == [".lock", "manifest.json"]


def test_prepare_takes_a_store_directly(tmp_path):
    """Without Influence: KFAC.prepare(curvature, store=folder) (and prepare_preconditioner)."""
    from upweight.core.curvature import Curvature

    model = _model()
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    curv = Curvature(obj, uw.Data.from_any(_data()), damping=0.01)
    a = KFAC().prepare(curv, store=tmp_path)
    b = KFAC().prepare_preconditioner(curv, store=tmp_path)
    assert a.stats["factors_from_store"] is False and b.stats["factors_from_store"] is True
    _same_state(a, b)
