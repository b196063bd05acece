"""upweight's intra-op thread setting: applied inside upweight's work, torch's own setting restored
after."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import upweight as uw
from upweight import _threads
from upweight.core.curvature import Curvature
from upweight.errors import InputError


@pytest.fixture(autouse=True)
def _clean_setting(monkeypatch):
    monkeypatch.setattr(_threads, "_setting", _threads._UNSET)
    monkeypatch.delenv(_threads.ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def curvature(small_logreg):
    model, l2, train, _ = small_logreg
    return Curvature(uw.Objective(model, "logistic", l2=l2), uw.Data.from_any(train), damping=0.01)


def _threads_seen_by_cg(curvature, monkeypatch, solver=None) -> list[int]:
    """torch.get_num_threads() inside CG's iterations (its HVP products)."""
    seen: list[int] = []
    cg = solver or uw.CG(rtol=1e-6)
    original = type(cg)._product

    def spy(self, curv, P):
        seen.append(torch.get_num_threads())
        return original(self, curv, P)

    monkeypatch.setattr(type(cg), "_product", spy)
    cg.solve(curvature, torch.ones(2, curvature.p, dtype=torch.float64))
    assert seen
    return seen


def test_set_threads_applies_inside_cg_and_restores_after(curvature, monkeypatch):
    torch.set_num_threads(3)
    uw.set_threads(2)
    assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {2}
    assert torch.get_num_threads() == 3


def test_auto_uses_one_thread_for_a_small_problem_and_restores(curvature, monkeypatch):
    assert curvature.p * curvature.n < _threads.SMALL_WORK
    torch.set_num_threads(2)
    assert uw.get_threads() == "auto"
    assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {1}
    assert torch.get_num_threads() == 2


def test_auto_leaves_a_large_problem_alone_on_an_idle_machine(curvature, monkeypatch):
    monkeypatch.setattr(_threads, "SMALL_WORK", 1)
    monkeypatch.setattr(_threads, "free_cores", lambda: 8.0)
    torch.set_num_threads(2)
    assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {2}


@pytest.mark.parametrize(
    ("free", "torch_threads", "expected"),
    [(0.0, 2, 1), (0.4, 4, 1), (1.0, 4, 1), (2.6, 4, 3), (3.0, 3, 3), (None, 3, 3)],
)
def test_auto_gives_a_large_problem_the_free_cores(
    curvature, monkeypatch, free, torch_threads, expected
):
    monkeypatch.setattr(_threads, "SMALL_WORK", 1)
    monkeypatch.setattr(_threads, "free_cores", lambda: free)
    torch.set_num_threads(torch_threads)
    assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {expected}
    assert torch.get_num_threads() == torch_threads


BUSY = "import sys\nprint('ready', flush=True)\nwhile True:\n    pass\n"


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="no /proc/loadavg (not Linux)")
def test_free_cores_counts_other_busy_processes():
    usable = len(os.sched_getaffinity(0))
    n = min(usable, 4)
    procs = [
        subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        free = _threads.free_cores()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # each busy process is always running or runnable; taken as spread over all the machine's cores
    assert free is not None
    assert free <= usable - n * usable / max(os.cpu_count(), usable) + 1e-9


def test_torch_setting_never_touches_torch(curvature, monkeypatch):
    torch.set_num_threads(2)
    uw.set_threads("torch")
    assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {2}


def test_environment_variable(curvature, monkeypatch):
    torch.set_num_threads(3)
    monkeypatch.setenv(_threads.ENV, "2")
    assert uw.get_threads() == 2
    assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {2}
    assert torch.get_num_threads() == 3
    uw.set_threads(1)  # set_threads wins over the environment
    assert uw.get_threads() == 1


def test_threads_context_sets_torch_and_the_setting_for_the_block(curvature, monkeypatch):
    torch.set_num_threads(3)
    uw.set_threads("torch")
    with uw.threads(1):
        assert torch.get_num_threads() == 1 and uw.get_threads() == 1
        assert set(_threads_seen_by_cg(curvature, monkeypatch)) == {1}
    assert torch.get_num_threads() == 3 and uw.get_threads() == "torch"


def test_restored_after_an_error(curvature):
    torch.set_num_threads(3)
    uw.set_threads(1)
    with pytest.raises(InputError):  # a NaN right-hand side is refused inside CG.solve
        uw.CG().solve(curvature, torch.full((1, curvature.p), float("nan"), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="boom"), uw.threads(2):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 3 and uw.get_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two", "", None])
def test_invalid_values_are_refused(bad):
    with pytest.raises(InputError, match="positive int"):
        uw.set_threads(bad)
    with pytest.raises(InputError, match="positive int"), uw.threads(bad):
        pass
    assert uw.get_threads() == "auto"


def test_invalid_environment_variable_is_refused(monkeypatch):
    monkeypatch.setenv(_threads.ENV, "0")
    with pytest.raises(InputError, match="UPWEIGHT_THREADS"):
        uw.get_threads()


def test_cli_threads_option(monkeypatch):
    from upweight.cli import main as cli

    seen = []
    parser = cli.build_parser()
    args = parser.parse_args(["explain", "--threads", "1"])
    assert args.threads == 1
    assert parser.parse_args(["explain", "--threads", "auto"]).threads == "auto"
    assert parser.parse_args(["explain"]).threads is None
    torch.set_num_threads(2)

    def fake(args):
        seen.append((torch.get_num_threads(), uw.get_threads()))
        return 0

    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, fake))
    assert cli.main(["explain", "--threads", "1"]) == 0
    assert seen == [(1, 1)] and torch.get_num_threads() == 2
    assert cli.main(["explain", "--threads", "0"]) == 2  # refused by argparse


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


def test_influence_runs_a_small_problem_on_one_thread_and_restores(small_logreg):
    """Not only CG: ``Influence.fit`` and its quantities (gradients, Direct's dense H, scoring) run
    under the same rule, seen from inside the loss; the caller's torch setting is back afterwards.
    """
    model, l2, train, test = small_logreg
    seen: list[int] = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return uw.core.losses.logistic(out, y)

    loss.check_targets = uw.core.losses.logistic.check_targets  # the built-in loss's label check
    obj = uw.Objective(model, loss, l2=l2)
    torch.set_num_threads(2)
    inf = uw.Influence(obj, solver=uw.Direct(), progress=False).fit(train)
    fitted = len(seen)
    inf.up_loss(test)
    assert fitted > 0 and len(seen) > fitted and set(seen) == {1}
    assert torch.get_num_threads() == 2
    uw.set_threads("torch")
    seen.clear()
    uw.Influence(obj, solver=uw.Direct(), progress=False).fit(train).up_loss(test)
    assert set(seen) == {2}
