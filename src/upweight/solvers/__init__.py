"""Inverse-HVP solvers sharing one protocol: ``prepare(curvature)``, ``solve(state, V)``."""

from .base import InverseHVPSolver, Solution
from .cg import CG
from .direct import Direct
from .lissa import LiSSA

SOLVERS: dict[str, type[InverseHVPSolver]] = {"direct": Direct, "cg": CG, "lissa": LiSSA}

__all__ = ["CG", "SOLVERS", "Direct", "InverseHVPSolver", "LiSSA", "Solution"]
