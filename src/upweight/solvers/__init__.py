"""Inverse-HVP solvers sharing one protocol: ``prepare(curvature)``, ``solve(state, V)``."""

from .arnoldi import Arnoldi, ArnoldiState
from .auto import Auto, AutoState
from .base import InverseHVPSolver, Solution
from .cg import CG
from .direct import Direct
from .kfac import EKFAC, KFAC
from .lissa import LiSSA
from .spectrum import Spectrum, estimate_spectrum, lanczos, lissa_from_spectrum

SOLVERS: dict[str, type[InverseHVPSolver]] = {"direct": Direct, "cg": CG, "lissa": LiSSA, "auto": Auto, "arnoldi": Arnoldi,
                                             "kfac": KFAC, "ekfac": EKFAC}

__all__ = [
    "CG",
    "SOLVERS",
    "Arnoldi",
    "ArnoldiState",
    "Auto",
    "AutoState",
    "Direct",
    "EKFAC",
    "InverseHVPSolver",
    "KFAC",
    "LiSSA",
    "Solution",
    "Spectrum",
    "estimate_spectrum",
    "lanczos",
    "lissa_from_spectrum",
]
