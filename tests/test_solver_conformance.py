"""One table of every public solver, each run through the same checks on small float64 problems
against an explicit Hessian from ``torch.autograd.functional.hessian`` (``reference.explicit_H``,
never upweight's HVP code):

* the solution is finite, of shape (k, p) and of the right-hand side's dtype;
* ``Solution.residual`` is the true relative residual ‖(H + δI)x − v‖/‖v‖ recomputed from the
  explicit matrix wherever ``Solution.measured`` says it was measured, and NaN elsewhere;
* an exact solver matches ``torch.linalg.solve``, and so does an approximate one on a problem
  where its approximation is exact (K-FAC on a linear layer with squared loss or one point,
  Arnoldi and Nyström at full rank, LiSSA with one training point, DataInf with one point whose
  empirical Fisher is its Hessian);
* ``config()`` is JSON-serialisable and stable (equal for equal settings, unchanged by use);
* ``prepare`` and ``solve`` leave the model's parameters untouched;
* ``accuracy_advice`` is a sentence.

Adding a solver is one row of ``ROWS``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import upweight as uw
from reference import ce, explicit_ggn_ce, explicit_H, sq
from upweight.core.curvature import Curvature, LinearOperator
from upweight.solvers import SOLVERS, InverseHVPSolver
from upweight.solvers.cg import CG, CGState
from upweight.solvers.kfac import EKFAC, KFAC, BlockOperator

D64 = torch.float64
K = 4  # right-hand sides per solve


# ── the problems ─────────────────────────────────────────────────────────────────────────
class ScaledMLP(torch.nn.Module):
    """Linear → tanh → Linear → × a bare learned scale per class: the scale is in no layer, so
    K-FAC solves it on its fallback block (a ``BlockOperator``, by CG)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=D64))
        self.fc1 = torch.nn.Linear(4, 6).double()
        self.fc2 = torch.nn.Linear(6, 3).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


@dataclass
class Problem:
    model: torch.nn.Module
    curvature: Curvature
    H: torch.Tensor  # the explicit H + δI
    V: torch.Tensor  # K right-hand sides


def _problem(
    model: torch.nn.Module,
    loss: str,
    X: torch.Tensor,
    y: torch.Tensor,
    l2: float,
    damping: float,
    kind: str = "hessian",
) -> Problem:
    model = model.eval()
    if kind == "hessian":
        H = explicit_H(model, {"squared": sq, "cross_entropy": ce}[loss], X, y, l2, damping)
    else:
        assert loss == "cross_entropy"
        H = explicit_ggn_ce(model, X) + (l2 + damping) * torch.eye(
            sum(t.numel() for t in model.parameters()), dtype=D64
        )
    assert float(torch.linalg.eigvalsh(H)[0]) > 0  # positive definite: every solver applies
    curv = Curvature(
        uw.Objective(model, loss, l2=l2), uw.Data.from_any((X, y)), damping=damping, kind=kind
    )
    V = torch.randn(K, curv.p, dtype=D64, generator=torch.Generator().manual_seed(1))
    return Problem(model, curv, H, V)


def linear_squared() -> Problem:
    """One nn.Linear (4 → 3, bias) with squared loss, n = 40: H = I ⊗ (1/n)Σ ããᵀ + (l2 + δ)I is
    its own Gauss–Newton matrix and exactly Kronecker-factored (constant output Hessian)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    X, y = torch.randn(40, 4, generator=g, dtype=D64), torch.randn(40, 3, generator=g, dtype=D64)
    return _problem(torch.nn.Linear(4, 3).double(), "squared", X, y, l2=0.1, damping=0.01)


def one_point() -> Problem:
    """One point, one output, squared loss, with residual z − y = 1: H_loss = ããᵀ = ggᵀ, so the
    empirical Fisher is the Hessian (DataInf exact), every minibatch is the whole data (LiSSA's
    series is deterministic), and K-FAC's factors are exact."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = torch.nn.Linear(4, 1).double()
    X = torch.randn(1, 4, generator=g, dtype=D64)
    with torch.no_grad():
        y = model(X) - 1.0
    return _problem(model, "squared", X, y, l2=0.5, damping=0.1)


def softmax() -> Problem:
    """Softmax regression (4 → 3, bias), n = 40: convex, but the output Hessian varies per point, so
    K-FAC, DataInf and low-rank sketches are approximations."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    X, y = torch.randn(40, 4, generator=g, dtype=D64), torch.randint(0, 3, (40,), generator=g)
    return _problem(torch.nn.Linear(4, 3).double(), "cross_entropy", X, y, l2=0.05, damping=0.01)


def _mlp(kind: str) -> Problem:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    X, y = torch.randn(30, 4, generator=g, dtype=D64), torch.randint(0, 3, (30,), generator=g)
    return _problem(ScaledMLP(), "cross_entropy", X, y, l2=1.0, damping=0.1, kind=kind)


def mlp() -> Problem:
    """A tanh MLP with a bare scale and cross-entropy, n = 30, far from a minimum (its loss Hessian
    is indefinite; l2 makes H + δI positive definite): no approximation is exact here."""
    return _mlp("hessian")


def mlp_gauss_newton() -> Problem:
    """The same MLP with ``Curvature(kind="gauss-newton")``: G + (l2 + δ)I, G from explicit
    Jacobians."""
    return _mlp("gauss-newton")


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "linear-squared": linear_squared,
    "one-point": one_point,
    "softmax": softmax,
    "mlp": mlp,
    "mlp-gauss-newton": mlp_gauss_newton,
}


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    return {name: make() for name, make in PROBLEMS.items()}


# ── the table ────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[], InverseHVPSolver]
    problem: str
    #: ‖x − x_exact‖/‖x_exact‖ bound where the solve is exact on this problem; ``None``: approximate
    exact_tol: float | None = None


def _pcg(pre) -> Callable[[], CG]:
    return lambda: CG(rtol=1e-12, preconditioner=pre)


FULL = 15  # p of linear-squared: Arnoldi/Nyström at full rank
ROWS = [
    # exact solvers
    Row("direct", lambda: uw.Direct(), "linear-squared", 1e-10),
    Row("direct-mlp", lambda: uw.Direct(), "mlp", 1e-10),
    Row("cg-block", lambda: CG(rtol=1e-12), "linear-squared", 1e-8),
    Row("cg-columns", lambda: CG(rtol=1e-12, block=False), "linear-squared", 1e-8),
    Row("cg-block-mlp", lambda: CG(rtol=1e-12), "mlp", 1e-8),
    Row("cg-columns-mlp", lambda: CG(rtol=1e-12, block=False), "mlp", 1e-8),
    Row("pcg-kfac", _pcg(KFAC()), "linear-squared", 1e-8),
    Row("pcg-kfac-mlp", _pcg(KFAC()), "mlp", 1e-8),  # the scale's block: a dense restricted Hessian
    Row("pcg-ekfac-mlp", _pcg(EKFAC()), "mlp", 1e-8),
    Row("pcg-nystrom-softmax", _pcg(uw.Nystrom(rank=4)), "softmax", 1e-8),
    Row("pcg-nystrom-gauss-newton", _pcg(uw.Nystrom(rank=8)), "mlp-gauss-newton", 1e-8),
    Row("cg-gauss-newton", lambda: CG(rtol=1e-12), "mlp-gauss-newton", 1e-8),
    Row("direct-gauss-newton", lambda: uw.Direct(), "mlp-gauss-newton", 1e-10),
    Row("auto-direct", lambda: uw.Auto(progress=False), "linear-squared", 1e-10),
    Row("auto-cg", lambda: uw.Auto(max_dense_p=0, rtol=1e-12, progress=False), "mlp", 1e-8),
    # approximations, where they are exact
    Row("kfac-exact", lambda: KFAC(), "linear-squared", 1e-8),
    Row("ekfac-exact", lambda: EKFAC(), "linear-squared", 1e-8),
    Row("kfac-one-point", lambda: KFAC(), "one-point", 1e-8),
    Row("arnoldi-full-rank", lambda: uw.Arnoldi(rank=FULL), "linear-squared", 1e-8),
    Row("nystrom-full-rank", lambda: uw.Nystrom(rank=FULL), "linear-squared", 1e-8),
    Row(
        "lissa-one-point", lambda: uw.LiSSA(depth=400, repeats=1, progress=False), "one-point", 1e-8
    ),
    Row("datainf-one-point", lambda: uw.DataInf(), "one-point", 1e-8),
    # approximations, where they are not
    Row("kfac-mlp", lambda: KFAC(), "mlp"),  # the scale by CG on its BlockOperator
    Row("ekfac-mlp", lambda: EKFAC(), "mlp"),
    # 2 of K residuals measured
    Row("kfac-sampled-residual", lambda: KFAC(residual_sample=2), "mlp"),
    Row("kfac-unchecked", lambda: KFAC(residual_sample=0), "linear-squared", 1e-8),
    Row("kfac-softmax", lambda: KFAC(), "softmax"),
    Row("kfac-gauss-newton", lambda: KFAC(), "mlp-gauss-newton"),
    Row("arnoldi-low-rank", lambda: uw.Arnoldi(rank=8), "mlp"),
    Row("arnoldi-low-rank-softmax", lambda: uw.Arnoldi(rank=4), "softmax"),
    Row("nystrom-low-rank", lambda: uw.Nystrom(rank=4), "softmax"),
    Row("nystrom-gauss-newton", lambda: uw.Nystrom(rank=8), "mlp-gauss-newton"),
    Row("datainf-softmax", lambda: uw.DataInf(), "softmax"),
    Row("datainf-mlp", lambda: uw.DataInf(), "mlp"),
    Row("lissa-mlp", lambda: uw.LiSSA(depth=200, repeats=2, batch_size=10, progress=False), "mlp"),
]


def test_the_table_covers_every_registered_solver_and_every_cg_variant():
    made = [row.make() for row in ROWS]
    assert set(SOLVERS.values()) <= {type(s) for s in made}
    cgs = [s for s in made if isinstance(s, CG)]
    assert {s.block for s in cgs} == {True, False}
    assert {type(s.preconditioner) for s in cgs} >= {type(None), KFAC, EKFAC, uw.Nystrom}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_solver_conformance(problems, row):
    prob = problems[row.problem]
    solver = row.make()
    config = solver.config()
    assert json.loads(json.dumps(config)) == config and config["name"] == solver.name
    assert row.make().config() == config  # stable: equal settings, equal identity
    before = {n: t.detach().clone() for n, t in prob.model.state_dict().items()}

    state = solver.prepare(prob.curvature)
    sol = solver.solve(state, prob.V)

    # the model is untouched
    after = prob.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), (
        "prepare/solve changed the model's parameters"
    )
    assert solver.config() == config

    # a finite solution of the right shape and dtype
    x = sol.value
    assert x.shape == prob.V.shape and x.dtype == prob.V.dtype
    assert bool(torch.isfinite(x).all())
    assert sol.residual.shape == (K,) and sol.converged.shape == (K,)

    # the reported residual is the true one, where measured; NaN where not
    true = (x @ prob.H - prob.V).norm(dim=1) / prob.V.norm(dim=1)  # H symmetric: rows (H x_j)ᵀ
    mask = sol.measured_mask
    assert mask.shape == (K,)
    torch.testing.assert_close(sol.residual[mask], true[mask], rtol=1e-6, atol=1e-10)
    assert bool(torch.isnan(sol.residual[~mask]).all())
    if isinstance(solver, uw.KFAC) and solver.residual_sample < K:
        assert int(mask.sum()) == solver.residual_sample
    if bool(mask.any()):
        assert math.isclose(sol.max_residual, float(true[mask].max()), rel_tol=1e-6, abs_tol=1e-10)
    else:
        assert math.isnan(sol.max_residual) and not sol.checked

    # exact where the method (or its approximation on this problem) is exact
    if row.exact_tol is not None:
        ref = torch.linalg.solve(prob.H, prob.V.T).T
        err = float((x - ref).norm() / ref.norm())
        assert err < row.exact_tol, f"{row.id}: ‖x − x_exact‖/‖x_exact‖ = {err:.2e}"

    advice = solver.accuracy_advice(state)
    assert isinstance(advice, str) and advice.endswith(".") and len(advice) > 20


# ── the shared protocols ─────────────────────────────────────────────────────────────────
def test_curvature_and_kfac_block_operator_are_linear_operators_cg_solves_on(problems):
    prob = problems["mlp"]
    curv = prob.curvature
    named = list(prob.model.named_parameters())
    at = [n for n, _ in named].index("scale")
    start = sum(t.numel() for _, t in named[:at])
    index = torch.arange(start, start + 3)  # the bare scale's coordinates in θ
    block = BlockOperator(curv, index)
    for op in (curv, block):
        assert isinstance(op, LinearOperator)
        assert isinstance(op.p, int) and op.dtype == D64 and op.damping == curv.damping
    H_block = prob.H[index][:, index]
    torch.testing.assert_close(
        block.matvec(torch.eye(3, dtype=D64)), H_block, rtol=1e-8, atol=1e-10
    )
    # rough power-iteration estimates (Rayleigh quotients, so inside the spectrum), as for a
    # Curvature
    ev = torch.linalg.eigvalsh(H_block)
    lo, hi = float(ev[0]) * (1 - 1e-9), float(ev[-1]) * (1 + 1e-9)
    assert 0.5 * hi < block.lambda_max() <= hi and lo <= block.lambda_min() < hi
    assert (
        0.5 * float(torch.linalg.eigvalsh(prob.H)[-1])
        < curv.lambda_max()
        <= float(torch.linalg.eigvalsh(prob.H)[-1]) * (1 + 1e-9)
    )
    # CG takes the operator itself or its prepared state
    rhs = prob.V[:, index]
    cg = CG(rtol=1e-12)
    state = cg.prepare(block)
    assert (
        isinstance(state, CGState)
        and state.curvature is block
        and state.preconditioner_state is None
    )
    for s in (state, block):
        torch.testing.assert_close(
            cg.solve(s, rhs).value, torch.linalg.solve(H_block, rhs.T).T, rtol=1e-8, atol=1e-10
        )


def test_states_are_dataclasses_with_named_fields(problems):
    """Direct's and LiSSA's states are dataclasses read by their fields."""
    curv = problems["linear-squared"].curvature
    direct = uw.Direct().prepare(curv)
    assert (
        dataclasses.is_dataclass(direct)
        and direct.H.shape == (curv.p, curv.p)
        and direct.prepare_seconds >= 0
    )
    torch.testing.assert_close(direct.L @ direct.L.T, direct.H)
    lissa = uw.LiSSA(scale=10.0, progress=False).prepare(curv)
    assert lissa.scale == 10.0 and lissa.lambda_max is None and lissa.curvature is curv


def test_accuracy_advice_is_the_solvers_own_and_auto_gives_the_chosen_ones(problems):
    curv = problems["linear-squared"].curvature
    assert "LiSSA's depth" in uw.LiSSA().accuracy_advice()
    assert "CG's maxiter" in CG().accuracy_advice()
    assert "Arnoldi's oversampling" in uw.Arnoldi().accuracy_advice()
    generic = "Add damping to improve the conditioning, or use Direct in float64."
    assert uw.Direct().accuracy_advice() == KFAC().accuracy_advice() == generic
    auto = uw.Auto(max_dense_p=0, progress=False)
    assert auto.accuracy_advice(auto.prepare(curv)) == CG().accuracy_advice()
    assert uw.Auto(progress=False).accuracy_advice(uw.Auto(progress=False).prepare(curv)) == generic
