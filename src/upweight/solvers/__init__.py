"""Inverse-HVP solvers sharing one protocol: ``prepare(curvature) -> state``, ``solve(state, V)``;
each solver's state is a dataclass (``DirectState``, ``CGState``, ``LiSSAState``, …)."""

from .arnoldi import Arnoldi, ArnoldiState
from .auto import Auto, AutoState
from .base import InverseHVPSolver, Solution
from .cg import CG, CGState
from .datainf import DataInf, DataInfState
from .direct import Direct, DirectState
from .kfac import EKFAC, KFAC
from .lissa import LiSSA, LiSSAState
from .nystrom import Nystrom, NystromState
from .spectrum import Spectrum, estimate_spectrum, lanczos, lissa_from_spectrum

SOLVERS: dict[str, type[InverseHVPSolver]] = {
    "direct": Direct,
    "cg": CG,
    "lissa": LiSSA,
    "auto": Auto,
    "arnoldi": Arnoldi,
    "kfac": KFAC,
    "ekfac": EKFAC,
    "nystrom": Nystrom,
    "datainf": DataInf,
}

__all__ = [
    "CG",
    "SOLVERS",
    "Arnoldi",
    "ArnoldiState",
    "Auto",
    "AutoState",
    "CGState",
    "DataInf",
    "DataInfState",
    "Direct",
    "DirectState",
    "EKFAC",
    "InverseHVPSolver",
    "KFAC",
    "LiSSA",
    "LiSSAState",
    "Nystrom",
    "NystromState",
    "Solution",
    "Spectrum",
    "estimate_spectrum",
    "lanczos",
    "lissa_from_spectrum",
]
