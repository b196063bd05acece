"""``--solver`` is read from the registry ``upweight.solvers.SOLVERS``: every registered name is a
choice and builds an instance of its class, with the command-line options that apply to it."""

from __future__ import annotations

import pytest

import upweight as uw
from upweight.cli._solvers import PRESETS, make_solver
from upweight.cli.main import build_parser
from upweight.solvers import SOLVERS


def _parsed(*argv: str):
    return build_parser().parse_args(["explain", *argv])


def _choices() -> set[str]:
    commands = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    explain = commands.choices["explain"]  # type: ignore[index]
    (action,) = [a for a in explain._actions if "--solver" in a.option_strings]
    return set(action.choices)


def test_the_choices_are_the_registry_and_the_presets():
    assert (
        _choices()
        == set(SOLVERS) | set(PRESETS)
        == {
            "direct",
            "cg",
            "kfac-cg",
            "nystrom-cg",
            "lissa",
            "auto",
            "arnoldi",
            "kfac",
            "ekfac",
            "nystrom",
            "datainf",
        }
    )


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_registered_name_builds_its_class(name):
    solver = make_solver(_parsed("--solver", name))
    assert type(solver) is SOLVERS[name] and solver.name == name


def test_the_options_reach_the_solvers_that_take_them():
    assert make_solver(_parsed("--solver", "cg", "--cg-rtol", "1e-5")) == uw.CG(rtol=1e-5)
    assert make_solver(_parsed()) == uw.CG(rtol=1e-8)  # the default --solver and --cg-rtol
    auto = make_solver(_parsed("--solver", "auto", "--cg-rtol", "1e-4", "--no-progress"))
    assert auto == uw.Auto(rtol=1e-4) and auto.progress is False
    lissa = make_solver(
        _parsed(
            "--solver",
            "lissa",
            "--lissa-depth",
            "7",
            "--lissa-repeats",
            "2",
            "--lissa-batch-size",
            "16",
            "--lissa-scale",
            "3",
        )
    )
    assert (
        lissa == uw.LiSSA(depth=7, repeats=2, batch_size=16, scale=3.0) and lissa.progress is True
    )
    assert make_solver(_parsed("--solver", "direct", "--cg-rtol", "1e-3")) == uw.Direct()


@pytest.mark.parametrize(("name", "inner"), [("kfac-cg", uw.EKFAC), ("nystrom-cg", uw.Nystrom)])
def test_presets_are_cg_with_a_registered_preconditioner(name, inner):
    solver = make_solver(_parsed("--solver", name, "--cg-rtol", "1e-6"))
    assert solver == uw.CG(rtol=1e-6, preconditioner=inner())
    assert type(solver.preconditioner) is inner


def test_a_newly_registered_solver_is_a_choice(monkeypatch):
    monkeypatch.setitem(SOLVERS, "mine", uw.Direct)
    assert "mine" in _choices() and type(make_solver(_parsed("--solver", "mine"))) is uw.Direct
