"""Never a silently wrong number: non-finite gradients and residuals, forged stores, memory, solver
findings and options that must not change a result. Each case asserts the error type and the key
words of its message, or exact numbers computed independently (explicit float64 Hessians)."""

from __future__ import annotations

import json
import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.core.curvature import Curvature
from upweight.errors import (
    CurvatureTooLargeError,
    DivergenceError,
    InaccurateSolveError,
    IndefiniteCurvatureWarning,
    InsufficientMemoryError,
    NonFiniteError,
    NotPositiveDefiniteError,
    SolverError,
    StoreMismatchError,
    UnsupportedModelError,
)
from upweight.solvers import Solution


def _softmax_problem(n=40, d=5, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(c, (n,), generator=g)
    model = torch.nn.Linear(d, c).to(dtype).eval()
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(c, d, generator=g, dtype=dtype))
        model.bias.zero_()
    return model, (X, y)


def _influence(model, train, solver=None, **kw):
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    kw.setdefault("grad_tol", 1e9)
    return uw.Influence(obj, solver=solver or uw.CG(rtol=1e-10), progress=False, **kw).fit(train)


def _explicit_hessian(obj: uw.Objective, X, y) -> torch.Tensor:
    """∇²R(θ̂) in float64 from torch.autograd.functional.hessian over the flat θ."""
    names = list(obj.params)
    sizes = [obj.params[n].numel() for n in names]
    flat0 = torch.cat([obj.params[n].reshape(-1) for n in names]).double()

    def risk(flat):
        parts = dict(
            zip(names, [t.reshape(obj.params[n].shape) for t, n in zip(flat.split(sizes), names)])
        )
        return obj.losses(parts, X, y).mean() + obj.regularizer(parts)

    return torch.autograd.functional.hessian(risk, flat0)


# ── finite or an error ──────────────────────────────────────────────────────────────────────
def _overflowing(dtype=torch.float32):
    """A model whose logits for x = (3e38, 0, …) are (+inf, +inf, −inf): log-softmax gives NaN."""
    model, (X, y) = _softmax_problem(dtype=dtype)
    with torch.no_grad():
        model.weight[:, 0] = torch.tensor([5.0, 4.0, -3.0], dtype=dtype)
    big = torch.zeros(X.shape[1], dtype=dtype)
    big[0] = 3e38  # finite in float32
    return model, (X, y), big


def test_overflowing_test_point_is_named_not_scored_as_zero():
    """A finite float32 test input whose logits overflow has a NaN gradient: block CG used to leave
    that row of s_test at 0 and accept it. Now the test point is named."""
    model, (X, y), big = _overflowing()
    inf = _influence(model, (X, y))
    Xt = X[:3].clone()
    Xt[1] = big
    with pytest.raises(NonFiniteError, match=r"test measurement's gradient.*id\(s\) 1\b.*overflow"):
        inf.up_loss((Xt, y[:3]))


def test_nonfinite_training_gradient_names_the_point_at_fit():
    model, (X, y), big = _overflowing()
    X = X.clone()
    X[7] = big
    with pytest.raises(NonFiniteError, match=r"training-loss gradient.*id\(s\) 7\b"):
        _influence(model, (X, y))


def test_cg_refuses_a_nonfinite_right_hand_side():
    model, (X, y) = _softmax_problem()
    curv = Curvature(uw.Objective(model, "cross_entropy", l2=0.1), uw.Data.from_any((X, y)))
    V = torch.ones(3, curv.p, dtype=torch.float64)
    V[2, 4] = float("nan")
    for block in (True, False):
        with pytest.raises(NonFiniteError, match=r"right-hand side of the CG solve.*\(2, 4\)"):
            uw.CG(block=block).solve(curv, V)


class _NaNOnLastProduct:
    """H = diag(1..p) whose product turns NaN after ``good`` calls (e.g. an HVP that overflows
    when CG measures its final residual)."""

    def __init__(self, p: int, good: int) -> None:
        self.p, self.dtype, self.damping, self.good, self.calls = p, torch.float64, 0.0, good, 0
        self.d = torch.arange(1, p + 1, dtype=torch.float64)

    def matvec(self, V, operand_dtype=None):
        self.calls += 1
        out = V * self.d
        return out * float("nan") if self.calls > self.good else out

    def lambda_min(self):
        return 1.0


def test_cg_raises_on_a_nonfinite_measured_residual():
    # 6 iterations solve diag(1..6) exactly; the 7th call measures
    op = _NaNOnLastProduct(6, good=6)
    with pytest.raises(SolverError, match="residual of right-hand side.*not finite"):
        uw.CG(rtol=1e-12, block=False).solve(op, torch.ones(1, 6, dtype=torch.float64))
    assert op.calls == 7


def test_solution_tells_unmeasured_from_measured_nan():
    v = torch.zeros(3, 2)
    unmeasured = Solution(
        v,
        torch.tensor([0.1, float("nan"), 0.2]),
        torch.ones(3, dtype=torch.bool),
        0,
        0.0,
        measured=torch.tensor([True, False, True]),
    )
    assert unmeasured.max_residual == pytest.approx(0.2) and unmeasured.checked
    nothing = Solution(
        v,
        torch.full((3,), float("nan")),
        torch.ones(3, dtype=torch.bool),
        0,
        0.0,
        measured=torch.zeros(3, dtype=torch.bool),
    )
    assert math.isnan(nothing.max_residual) and not nothing.checked
    failed = Solution(
        v, torch.tensor([0.1, float("nan"), 0.2]), torch.ones(3, dtype=torch.bool), 0, 0.0
    )
    assert failed.max_residual == math.inf and failed.checked


class _NaNResidualSolver(uw.Direct):
    """Direct whose solve reports a measured NaN residual for its second right-hand side."""

    def solve(self, state, rhs):
        sol = super().solve(state, rhs)
        res = sol.residual.clone()
        res[min(1, len(res) - 1)] = float("nan")
        return Solution(sol.value, res, sol.converged, sol.iterations, sol.seconds, sol.stats)


@pytest.mark.parametrize("on_inaccurate", ["raise", "warn"])
def test_influence_rejects_a_measured_nan_residual_whatever_on_inaccurate(on_inaccurate):
    model, (X, y) = _softmax_problem()
    inf = _influence(model, (X, y), solver=_NaNResidualSolver(), on_inaccurate=on_inaccurate)
    with pytest.raises(InaccurateSolveError, match="NaN or infinite"):
        inf.up_loss((X[:3], y[:3]))


def test_one_shot_unchecked_solve_stays_unchecked_not_failed():
    """residual_sample=0 leaves every residual unmeasured: provenance says accepted=None,
    not True."""
    model, (X, y) = _softmax_problem()
    inf = _influence(model, (X, y), solver=uw.KFAC(residual_sample=0))
    prov = inf.up_loss((X[:2], y[:2])).provenance
    assert prov["accepted"] is None and math.isnan(prov["residual_max"])


# ── stored s_test is re-verified ──────────────────────────────────────────────────────────
def test_forged_stored_s_test_is_detected_and_solved_again(tmp_path):
    """A chunk replaced by 3 × s_test with an updated checksum used to give scores exactly 3× too
    large."""
    model, (X, y) = _softmax_problem()
    test = (X[:4], y[:4])
    inf = _influence(model, (X, y))
    first = inf.up_loss(test, store=tmp_path).values
    # the exact scores, independently: −∇f(z_test)ᵀ H⁻¹ ∇L(z) with an explicit float64 Hessian
    H = _explicit_hessian(inf.objective, X, y)
    Gt, G = inf.test_grads(test), torch.cat([g for _, g in inf._train_grad_chunks(inf.data_, "g")])
    exact = -(Gt @ torch.linalg.solve(H, G.T)).numpy()
    np.testing.assert_allclose(first, exact, rtol=1e-7, atol=1e-10)

    chunk = tmp_path / "s_test" / "000000.npy"
    np.save(chunk, 3.0 * np.load(chunk), allow_pickle=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    import hashlib

    manifest["arrays"]["s_test"]["chunks"]["0"]["sha256"] = hashlib.sha256(
        chunk.read_bytes()
    ).hexdigest()
    del manifest["arrays"]["scores"]  # make the scores be recomputed from the (forged) s_test
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.warns(UserWarning, match="fails re-verification"):
        again = inf.up_loss(test, store=tmp_path).values
    np.testing.assert_allclose(again, exact, rtol=1e-7, atol=1e-10)
    # and the rewritten s_test is trusted on the next run, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = inf.up_loss(test, store=tmp_path)
    np.testing.assert_array_equal(third.values, again)
    assert third.provenance["solver_store_reverified"] is True


# ── memory is estimated before it is allocated ──────────────────────────────────────────────
def test_dense_up_loss_over_memory_budget_raises_before_any_solve(monkeypatch):
    model, (X, y) = _softmax_problem()
    inf = _influence(model, (X, y))
    calls = []
    monkeypatch.setattr(type(inf.solver), "solve", lambda *a, **k: calls.append(1))
    monkeypatch.setenv("UPWEIGHT_MEMORY_LIMIT", "1K")  # (10, 40) float64 × 2 = 6.4 KB > 0.8 KiB
    with pytest.raises(
        InsufficientMemoryError, match=r"I_up,loss of shape \(10, 40\) needs 6.2 KiB.*store="
    ) as err:
        inf.up_loss((X[:10], y[:10]))
    assert err.value.required_bytes == 2 * 10 * 40 * 8 and calls == []


def test_pert_loss_and_up_params_check_memory_first(monkeypatch):
    model, (X, y) = _softmax_problem()
    inf = _influence(model, (X, y))
    monkeypatch.setenv("UPWEIGHT_MEMORY_LIMIT", "2K")
    with pytest.raises(InsufficientMemoryError, match=r"I_pert,loss of shape \(3, 40, 5\)"):
        inf.pert_loss((X[:3], y[:3]))
    with pytest.raises(InsufficientMemoryError, match=r"I_up,params of shape \(40, 18\)"):
        inf.up_params()
    assert inf.up_params(train=[0, 1]).values.shape == (2, 18)  # a slice fits


def test_direct_limit_comes_from_memory_and_max_p_still_caps(monkeypatch):
    model, (X, y) = _softmax_problem()
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    curv = Curvature(obj, uw.Data.from_any((X, y)))
    monkeypatch.setenv("UPWEIGHT_MEMORY_LIMIT", "10K")  # 32 · 18² = 10,368 B > 0.8 · 10 KiB
    with pytest.raises(
        InsufficientMemoryError, match=r"Direct's dense float64 Hessian for p = 18.*CG"
    ):
        uw.Direct().prepare(curv)
    monkeypatch.delenv("UPWEIGHT_MEMORY_LIMIT")
    with pytest.raises(CurvatureTooLargeError, match=r"max_p=10.*p = 18"):
        uw.Direct(max_p=10).prepare(curv)
    state = uw.Direct().prepare(curv)
    torch.testing.assert_close(state.H, _explicit_hessian(obj, X, y), rtol=1e-10, atol=1e-12)


def test_kfac_factors_check_memory_first(monkeypatch):
    model, (X, y) = _softmax_problem()
    curv = Curvature(uw.Objective(model, "cross_entropy", l2=0.1), uw.Data.from_any((X, y)))
    # cols = 6, out = 3: 8·(3·36 + 3·9) = 1,080 B
    monkeypatch.setenv("UPWEIGHT_MEMORY_LIMIT", "256")
    with pytest.raises(
        InsufficientMemoryError, match=r"Kronecker factors of 1 layer.*6 input columns"
    ):
        uw.KFAC().prepare(curv)


# ── solver findings ─────────────────────────────────────────────────────────────────────────
def _indefinite_curvature(weights=(10.0, 5.0, 2.0, -0.5)):
    """R = (1/n) Σ ½ yᵢ (wᵀxᵢ)² with xᵢ = eᵢ: H = diag(y)/n, indefinite when a yᵢ < 0."""
    n = len(weights)
    model = torch.nn.Linear(n, 1, bias=False).double().eval()
    obj = uw.Objective(model, lambda out, y: 0.5 * y * out.squeeze(-1) ** 2)
    data = uw.Data.from_any(
        (torch.eye(n, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64))
    )
    return Curvature(obj, data)


def test_arnoldi_refuses_or_warns_on_a_negative_ritz_value_it_does_not_keep():
    curv = _indefinite_curvature()  # eigenvalues 2.5, 1.25, 0.5, −0.125
    with pytest.raises(
        NotPositiveDefiniteError, match=r"Ritz value -1.250e-01.*on_indefinite='warn'"
    ) as err:
        uw.Arnoldi(rank=2).prepare(curv)
    assert err.value.min_eigenvalue == pytest.approx(-0.125)
    with pytest.warns(IndefiniteCurvatureWarning, match="indefinite"):
        solver = uw.Arnoldi(rank=2, on_indefinite="warn")
        state = solver.prepare(curv)
    x = solver.solve(state, torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)).value
    # top-2 inverse
    torch.testing.assert_close(x, torch.tensor([[0.4, 0.8, 0.0, 0.0]], dtype=torch.float64))
    assert uw.Arnoldi(rank=2).config() == uw.Arnoldi(rank=2, on_indefinite="warn").config()


def test_lissa_blames_negative_curvature_not_the_scale():
    curv = _indefinite_curvature((10.0, 5.0, 2.0, -5.0))
    solver = uw.LiSSA(scale=10.0, depth=2000, repeats=1, progress=False)
    with pytest.raises(DivergenceError) as err:
        solver.solve(solver.prepare(curv), torch.ones(1, 4, dtype=torch.float64))
    msg = str(err.value)
    assert "negative curvature" in msg and "damping" in msg and "LiSSA(scale=" not in msg


def test_lissa_scale_advice_never_repeats_auto():
    curv = _indefinite_curvature((10.0, 5.0, 2.0, 1.0))
    solver = uw.LiSSA(scale=0.5, depth=500, repeats=1, progress=False)
    with pytest.raises(DivergenceError, match=r"pass LiSSA\(scale=10\) or LiSSA\(scale='auto'\)"):
        solver.solve(solver.prepare(curv), torch.ones(1, 4, dtype=torch.float64))


def test_lissa_blames_the_model_when_its_hvps_are_nan():
    # |r|^1.5 has an infinite second derivative where a residual is exactly 0 (here every point)
    model = torch.nn.Linear(4, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
    obj = uw.Objective(model, lambda out, y: (out.squeeze(-1) - y).abs() ** 1.5)
    data = uw.Data.from_any(
        (torch.eye(4, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    )
    solver = uw.LiSSA(scale=10.0, depth=50, repeats=1, progress=False)
    with pytest.raises(
        DivergenceError, match="Hessian-vector products are NaN or infinite.*no scale can help"
    ):
        solver.solve(solver.prepare(Curvature(obj, data)), torch.ones(1, 4, dtype=torch.float64))


# ── options that change no number ─────────────────────────────────────────────────────────
def test_progress_is_not_part_of_a_solvers_identity(tmp_path):
    model, (X, y) = _softmax_problem()
    assert uw.LiSSA(progress=True).config() == uw.LiSSA(progress=False).config()
    assert uw.Auto(progress=True).config() == uw.Auto(progress=False).config()
    test = (X[:2], y[:2])
    solver = dict(depth=300, repeats=1, scale=10.0)
    a = _influence(model, (X, y), solver=uw.LiSSA(progress=True, **solver)).up_loss(
        test, store=tmp_path
    )
    b = _influence(model, (X, y), solver=uw.LiSSA(progress=False, **solver)).up_loss(
        test, store=tmp_path
    )
    np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(StoreMismatchError, match="solver.depth"):  # a numerical setting still is
        _influence(
            model, (X, y), solver=uw.LiSSA(progress=False, **{**solver, "depth": 301})
        ).up_loss(test, store=tmp_path)


def test_influence_progress_false_silences_its_solvers_bars(monkeypatch):
    import upweight._progress as prog

    shown: list[str] = []

    def fake_tqdm(iterable=None, desc=None, **kw):
        shown.append(desc)
        # a bar the loop updates itself
        return iterable if iterable is not None else mock.MagicMock()

    monkeypatch.setattr(prog, "tqdm", fake_tqdm)
    model, (X, y) = _softmax_problem()
    lissa = uw.LiSSA(depth=20, repeats=1, scale=10.0, progress=True)
    _influence(model, (X, y), solver=lissa, max_residual=None).up_loss((X[:1], y[:1]))
    assert "LiSSA" not in shown
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    uw.Influence(obj, solver=lissa, grad_tol=1e9, max_residual=None).fit((X, y)).up_loss(
        (X[:1], y[:1])
    )
    assert "LiSSA" in shown


# ── the user's model ────────────────────────────────────────────────────────────────────────
def test_model_switched_to_train_mode_after_fit_is_refused():
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
        .double()
        .eval()
    )
    _, (X, y) = _softmax_problem()
    inf = uw.Influence(
        uw.Objective(model, "cross_entropy", l2=0.1, params="2"), progress=False, grad_tol=1e9
    ).fit((X, y))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inf.up_loss((X[:2], y[:2]))
    model.train()
    for call in (
        lambda: inf.up_loss((X[:2], y[:2])),
        lambda: inf.self_influence(),
        lambda: inf.up_params(),
    ):
        with pytest.raises(UnsupportedModelError, match="model.eval()"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ── selections and result objects ───────────────────────────────────────────────────────────
def test_train_selection_is_never_truncated_or_misread():
    """A boolean mask used to be read as 0/1 indices and 0.5 truncated to 0, silently."""
    model, (X, y) = _softmax_problem(n=12)
    inf = _influence(model, (X, y))
    test = (X[:2], y[:2])
    full = inf.up_loss(test).values
    mask = np.zeros(12, dtype=bool)
    mask[[2, 5, 9]] = True
    np.testing.assert_array_equal(inf.up_loss(test, train=mask).values, full[:, [2, 5, 9]])
    np.testing.assert_array_equal(
        inf.up_loss(test, train=torch.tensor([-1, 3.0])).values, full[:, [11, 3]]
    )
    assert inf.self_influence(train=mask).values.shape == (3,)
    for bad, words in [
        ([0.5], "integer positions"),
        (mask[:5], "mask of length 5"),
        ([12], "position 12"),
        ([[1, 2]], "one-dimensional"),
    ]:
        with pytest.raises(uw.errors.InputError, match=words):
            inf.up_loss(test, train=bad)
        with pytest.raises(uw.errors.InputError, match=words):
            inf.up_params(train=bad)


def test_rankings_validate_k_and_the_test_row(tmp_path):
    model, (X, y) = _softmax_problem(n=12)
    scores = _influence(model, (X, y)).up_loss((X[:2], y[:2]))
    with pytest.raises(uw.errors.InputError, match="'k' parameter of top_k"):
        scores.top_k(-1)
    with pytest.raises(uw.errors.InputError, match="test=2 is not a row.*2 test point"):
        scores.top_k(3, test=2)
    assert list(scores.top_k(3, test=-1).train_ids) == list(
        np.argsort(-scores.values[1], kind="stable")[:3]
    )
    path = tmp_path / "s.npz"
    scores.save(path)
    back = uw.InfluenceScores.load(path)
    np.testing.assert_array_equal(back.values, scores.values)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(
        uw.errors.InputError, match=r"not an .npz archive \(it starts with b'a,b"
    ) as err:
        uw.InfluenceScores.load(tmp_path / "t.csv")
    assert "allow_pickle" not in str(err.value)
    np.savez(tmp_path / "obj.npz", values=np.array([object()], dtype=object))
    with pytest.raises(uw.errors.InputError, match="not a file written by InfluenceScores.save"):
        uw.InfluenceScores.load(tmp_path / "obj.npz")


def test_cgs_negative_curvature_error_is_cheap_and_bounds_lambda_min():
    """Explaining negative curvature takes a short Lanczos run (at most 20 products), and the λmin
    it names is a true Rayleigh quotient: at least the exact smallest eigenvalue."""
    curv = _indefinite_curvature((10.0, 5.0, 2.0, -5.0))  # eigenvalues 2.5, 1.25, 0.5, −1.25
    before = curv.n_matvecs
    with pytest.raises(NotPositiveDefiniteError, match="curvature='gauss-newton'") as err:
        uw.CG(rtol=1e-10).solve(curv, torch.ones(1, 4, dtype=torch.float64))
    assert curv.n_matvecs - before <= 4 + 20
    assert -1.25 - 1e-9 <= err.value.min_eigenvalue < 0
