"""``--solver``: its choices and the solver it builds, from the registry ``solvers.SOLVERS``.

Each registered name is a choice. Two tables say the rest as data: which command-line options
each solver takes (``OPTIONS``), and the combined names (``PRESETS``): a registered solver built
with another registered solver as its preconditioner.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..solvers import SOLVERS, InverseHVPSolver


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


#: keyword argument of a solver → how it is read from the parsed arguments
OPTIONS: dict[str, dict[str, Callable[[argparse.Namespace], Any]]] = {
    "cg": {"rtol": lambda a: a.cg_rtol},
    "auto": {"rtol": lambda a: a.cg_rtol, "progress": _progress},
    "lissa": {
        "depth": lambda a: a.lissa_depth,
        "repeats": lambda a: a.lissa_repeats,
        "batch_size": lambda a: a.lissa_batch_size,
        "scale": lambda a: a.lissa_scale,
        "progress": _progress,
    },
}


@dataclass(frozen=True)
class Preset:
    """A registered solver (``base``) preconditioned by another (``preconditioner``)."""

    base: str
    preconditioner: str
    help: str


PRESETS: dict[str, Preset] = {
    "kfac-cg": Preset("cg", "ekfac", "CG preconditioned with EK-FAC"),
    "nystrom-cg": Preset("cg", "nystrom", "CG preconditioned with a rank-64 Nyström sketch"),
}


def solver_choices() -> tuple[str, ...]:
    """The registered names, each followed by the presets built on it."""
    names: list[str] = []
    for name in SOLVERS:
        names.append(name)
        names += [p for p, preset in PRESETS.items() if preset.base == name]
    return tuple(names)


def make_solver(args: argparse.Namespace) -> InverseHVPSolver:
    """The solver ``--solver`` names, with the options that apply to it."""
    preset = PRESETS.get(args.solver)
    name = preset.base if preset is not None else args.solver
    kwargs = {key: read(args) for key, read in OPTIONS.get(name, {}).items()}
    if preset is not None:
        kwargs["preconditioner"] = SOLVERS[preset.preconditioner]()
    return SOLVERS[name](**kwargs)
