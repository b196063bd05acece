"""Progress bars (``upweight._progress``): every long loop draws one, with its live values, and
one switch — ``Influence(progress=False)``, ``progress_enabled(False)`` or ``UPWEIGHT_PROGRESS=0``
— silences them all. The bars' delay is set to 0 here so that the fast test problems draw."""

from __future__ import annotations

import math
import re

import pytest
import torch

import upweight as uw
from upweight import _progress
from upweight.core.curvature import Curvature
from upweight.solvers.arnoldi import Arnoldi
from upweight.solvers.auto import Auto
from upweight.solvers.cg import CG
from upweight.solvers.datainf import DataInf
from upweight.solvers.lissa import LiSSA
from upweight.solvers.nystrom import Nystrom
from upweight.solvers.spectrum import lanczos

N, P, BATCH = 60, 12, 16
FIT_DESC = "∇R(θ̂) over the training points"


@pytest.fixture
def instant(monkeypatch):
    """Bars draw at once and on every update."""
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    monkeypatch.setattr(_progress, "MININTERVAL", 0.0)
    monkeypatch.delenv(_progress.ENV_VAR, raising=False)


def problem(l2: float = 0.1):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, P, dtype=torch.float64, generator=gen) * torch.linspace(
        0.2, 3.0, P, dtype=torch.float64
    )
    y = torch.randn(N, 1, dtype=torch.float64, generator=gen)
    model = torch.nn.Linear(P, 1, bias=False).double().eval()
    return uw.Objective(model, "squared", l2=l2), (X, y), (X[:3], y[:3])


def influence(solver, progress: bool = True, **kw) -> uw.Influence:
    obj, train, _ = problem()
    return uw.Influence(
        obj, solver=solver, progress=progress, batch_size=BATCH, grad_tol=math.inf, **kw
    ).fit(train)


def counts(err: str, desc: str) -> list[tuple[int, int]]:
    """Every (n, total) the bar ``desc`` drew."""
    return [
        (int(a), int(b))
        for a, b in re.findall(re.escape(desc) + r":\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)", err)
    ]


def updates(err: str, desc: str) -> int:
    seen = counts(err, desc)
    assert seen, f"no bar {desc!r} in {err!r}"
    return max(n for n, _ in seen)


@pytest.mark.parametrize(("block", "desc"), [(True, "Block CG"), (False, "CG")])
def test_cg_bar_counts_iterations_and_shows_the_residual(instant, capsys, block, desc):
    inf = influence(CG(rtol=1e-10, block=block))
    fit_err = capsys.readouterr().err
    assert updates(fit_err, FIT_DESC) == -(-N // BATCH)
    _, _, test = problem()
    res = inf.up_loss(test)
    err = capsys.readouterr().err
    it = res.provenance["iterations"]
    assert it >= 3
    assert updates(err, desc) == it
    assert {t for _, t in counts(err, desc)} == {res.provenance["solver_maxiter"]}
    residuals = [
        float(r) for r in re.findall(re.escape(desc) + r":[^\r\n]*residual=([0-9.e+-]+)", err)
    ]
    assert residuals and residuals[-1] < 1e-10 < residuals[0]  # the live value, down to the target
    assert "rtol=1.00e-10" in err


def test_preconditioned_cg_and_nystrom_sketch(instant, capsys):
    inf = influence(CG(rtol=1e-10, preconditioner=Nystrom(rank=5, block_size=2)))
    sol = inf.inverse_hvp(inf.test_grads(problem()[2]))
    err = capsys.readouterr().err
    assert updates(err, "Nyström sketch (rank 5)") == sol.stats["preconditioner_hvp_passes"] == 3
    assert updates(err, "Preconditioned block CG") == sol.iterations
    assert "residual=" in err


def test_arnoldi_bar_counts_krylov_steps(instant, capsys):
    inf = influence(Arnoldi(rank=4))
    res = inf.up_loss(problem()[2])
    err = capsys.readouterr().err
    assert updates(err, "Arnoldi") == res.provenance["solver_krylov_steps"] == 8
    assert re.search(r"ritz=\[[-0-9.e+]+, [-0-9.e+]+\]", err)


def test_lanczos_and_auto(instant, capsys):
    inf = influence(Auto(max_dense_p=0, lanczos_steps=7, rtol=1e-8))
    res = inf.up_loss(problem()[2])
    err = capsys.readouterr().err
    assert updates(err, "Lanczos") == res.provenance["solver_spectrum_lanczos_steps"] == 7
    assert updates(err, "Block CG") == res.provenance["iterations"]
    lanczos(lambda v: 2.0 * v, 5, k=3)
    assert updates(capsys.readouterr().err, "Lanczos") == 3


def test_lissa_bar_counts_steps(instant, capsys):
    inf = influence(
        LiSSA(depth=20, repeats=2, batch_size=BATCH), on_inaccurate="warn", max_residual=None
    )
    res = inf.up_loss(problem()[2])
    err = capsys.readouterr().err
    assert updates(err, "LiSSA") == res.provenance["iterations"] == 40
    assert "repeat=2/2" in err


def test_datainf_gradient_passes(instant, capsys):
    inf = influence(DataInf(), max_residual=None)
    chunks = -(-N // BATCH)  # chunks of per-sample gradients (batch_size bounds them at this p)
    assert updates(capsys.readouterr().err, "DataInf: gradient norms") == chunks
    inf.up_loss(problem()[2])
    err = capsys.readouterr().err
    for desc in ("DataInf: solve", "DataInf: Fisher residual"):
        assert updates(err, desc) == chunks


def test_kfac_factor_eigen_and_correction_passes(instant, capsys):
    from upweight.solvers.kfac import EKFAC

    inf = influence(EKFAC(residual_sample=0), max_residual=None)
    err = capsys.readouterr().err
    captures = inf.state_.stats["fit_passes"], -(-N // inf.state_.stats["fit_points_per_capture"])
    assert captures[0] == 2
    assert updates(err, "K-FAC factors") == captures[1]
    assert updates(err, "EK-FAC eigenvalue correction") == captures[1]
    assert updates(err, "K-FAC eigendecompositions") == len(inf.state_.factors) == 1


def test_direct_dense_hessian_columns(instant, capsys):
    inf = influence(uw.Direct(), structured=False)  # HVP columns, not the closed form
    err = capsys.readouterr().err
    # one block of ≤ 256 columns
    assert updates(err, f"dense {inf.curvature_.describes} ({P} columns)") == 1


def everything(progress: bool = True) -> None:
    test = problem()[2]
    from upweight.solvers.kfac import EKFAC

    for solver in (
        CG(rtol=1e-10),
        CG(rtol=1e-10, block=False, preconditioner=Nystrom(rank=4)),
        Arnoldi(rank=4),
        EKFAC(),
        Auto(max_dense_p=0, lanczos_steps=5),
        LiSSA(depth=5, repeats=1, batch_size=BATCH),
    ):
        influence(solver, progress=progress, max_residual=None).up_loss(test)


def test_progress_false_silences_every_bar(instant, capfd):
    everything(progress=False)
    assert capfd.readouterr().err == ""


def test_environment_variable_silences_every_bar(instant, capfd, monkeypatch):
    monkeypatch.setenv("UPWEIGHT_PROGRESS", "0")
    everything()
    assert capfd.readouterr().err == ""


def test_progress_enabled_block_silences_a_bare_solver(instant, capfd):
    obj, train, _ = problem()
    curv = Curvature(obj, uw.Data.from_any(train))
    with _progress.progress_enabled(False):
        for solver in (CG(rtol=1e-10), Arnoldi(rank=3), Nystrom(rank=3, block_size=1)):
            solver.solve(solver.prepare(curv), torch.ones(1, P, dtype=torch.float64))
    assert capfd.readouterr().err == ""
    CG(rtol=1e-10).solve(curv, torch.ones(1, P, dtype=torch.float64))
    assert "Block CG" in capfd.readouterr().err


def test_short_loops_print_nothing_with_the_default_delay(capfd, monkeypatch):
    monkeypatch.delenv(_progress.ENV_VAR, raising=False)
    assert _progress.DELAY >= 1.0
    influence(CG(rtol=1e-10)).up_loss(problem()[2])
    assert capfd.readouterr().err == ""


def test_live_values_are_evaluated_only_when_drawn(monkeypatch):
    """A live value (e.g. a residual on the GPU, whose read is a device sync) is computed only when
    the bar redraws: never when bars are off, and not before the delay."""
    monkeypatch.delenv(_progress.ENV_VAR, raising=False)
    calls = []

    def value() -> float:
        calls.append(1)
        return 0.5

    with _progress.progress_bar(desc="off", total=5, enabled=False) as bar:
        assert not bar
        for _ in range(5):
            bar.update(1, residual=value)
    with _progress.progress_bar(desc="slow to show", total=5) as bar:  # the default 2 s delay
        assert bar
        for _ in range(5):
            bar.update(1, residual=value)
    assert calls == []
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    monkeypatch.setattr(_progress, "MININTERVAL", 0.0)
    with _progress.progress_bar(desc="shown", total=5) as bar:
        for _ in range(5):
            bar.update(1, residual=value, t=torch.tensor(3.0), it=2, name="x")
        assert bar.n == 5
    assert len(calls) == 5


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_environment_values_that_switch_off(monkeypatch, value):
    monkeypatch.setenv("UPWEIGHT_PROGRESS", value)
    assert not _progress.progress_on()
    monkeypatch.setenv("UPWEIGHT_PROGRESS", "1")
    assert _progress.progress_on()
    with _progress.progress_enabled(False):
        assert not _progress.progress_on()
    assert not _progress.progress_on(False)
