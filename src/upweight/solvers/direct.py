"""Direct: the explicit Hessian and its Cholesky factorisation, for small p."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .._checks import check_interval
from .._memory import check_memory, format_bytes
from ..core.curvature import Curvature
from ..errors import CurvatureTooLargeError, NotPositiveDefiniteError
from .base import InverseHVPSolver, Solution, gauss_newton_hint, relative_residual

#: peak bytes per p² entry while Direct forms and factorises a float64 H: the column blocks, their
#: concatenation, the symmetrised copy (2 temporaries) and then H and its Cholesky factor.
DENSE_BYTES_PER_ENTRY = 4 * 8


def suggest_damping(min_eig: float, current: float, max_eig: float = 0.0) -> float:
    """A round damping δ' ≥ current + max(1.5·|λmin|, 1e-6·|λmax|): H + δ'I is then positive
    definite with a condition number a float64 solve handles (also when λmin is exactly 0)."""
    need = current + max(1.5 * abs(min_eig), 1e-6 * abs(max_eig)) + 1e-12
    mag = 10 ** math.floor(math.log10(need))
    return math.ceil(need / mag) * mag


@dataclass(frozen=True)
class DirectState:
    """What ``Direct.prepare`` computed; passed back to ``Direct.solve``.

    Attributes:
        H: the dense, symmetrised H + δI, shape (p, p), in ``Direct.dtype``.
        L: its lower Cholesky factor, H + δI = LLᵀ.
        prepare_seconds: wall time of ``prepare`` (forming H and factorising it).
    """

    H: torch.Tensor
    L: torch.Tensor
    prepare_seconds: float


@dataclass(frozen=True)
class Direct(InverseHVPSolver[DirectState]):
    """Forms H + δI explicitly (float64 by default) and solves with its Cholesky factor.

    Exact up to rounding; costs p full-data HVPs and O(p³) once, then O(p²) per right-hand side.

    Args:
        dtype: dtype of the dense matrix and the solve (float64 unless you need otherwise).
        max_p: refuse to form the Hessian above this many parameters; ``None`` (default): as many
            as the available memory allows (its peak, ``DENSE_BYTES_PER_ENTRY``·p² bytes in float64,
            is checked before any work; ``upweight._memory``).

    Raises:
        NotPositiveDefiniteError: H + δI has an eigenvalue ≤ 0; the message names the smallest
            eigenvalue and a damping that fixes it.

    Examples:
        >>> import torch
        >>> from upweight import Objective, Data
        >>> from upweight.core.curvature import Curvature
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).eval(), "squared", l2=1.0)
        >>> curv = Curvature(obj, Data.from_any((torch.eye(2), torch.zeros(2, 1))))
        >>> Direct().solve(Direct().prepare(curv), torch.tensor([[1.5, 3.0]])).value.tolist()
        [[1.0, 2.0]]
    """

    name = "direct"
    # a float64 Cholesky solve misses this only if H is numerically singular
    default_max_residual = 1e-4
    dtype: torch.dtype = torch.float64
    max_p: int | None = None

    def __post_init__(self) -> None:
        if self.max_p is not None:
            check_interval("Direct", "max_p", self.max_p, 1, None, closed="left", integer=True)

    def prepare(self, curvature: Curvature) -> DirectState:
        t0 = time.perf_counter()
        p = curvature.p
        alternatives = (
            "Use an iterative solver instead (CG(), or Arnoldi/KFAC for rough answers), or fewer"
            " parameters in θ (Objective(params=...))."
        )
        if self.max_p is not None and p > self.max_p:
            raise CurvatureTooLargeError(
                f"Direct(max_p={self.max_p}) refuses a dense Hessian for p = {p} parameters "
                f"({format_bytes(DENSE_BYTES_PER_ENTRY * p * p)} at its peak). {alternatives}"
            )
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        check_memory(
            DENSE_BYTES_PER_ENTRY // 8 * itemsize * p * p,
            f"Direct's dense {str(self.dtype).removeprefix('torch.')} Hessian for p = {p} (with its"
            " Cholesky factor and temporaries)",
            alternatives=alternatives,
        )
        work = curvature if curvature.dtype == self.dtype else curvature.replace(dtype=self.dtype)
        H = work.dense(max_p=p)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            eig = torch.linalg.eigvalsh(H)
            lmin = float(eig[0])
            fix = suggest_damping(lmin, curvature.damping, float(eig[-1]))
            raise NotPositiveDefiniteError(
                f"The Hessian (damping={curvature.damping:g}) is not positive definite: smallest"
                f" eigenvalue {lmin:.3e}. Pass damping ≥ {fix:.2g} (e.g. Influence(...,"
                f" damping={fix:.2g})), or train the model closer to a minimum."
                + gauss_newton_hint(curvature),
                min_eigenvalue=lmin,
                suggested_damping=fix,
            )
        return DirectState(H=H, L=L, prepare_seconds=time.perf_counter() - t0)

    def solve(self, state: DirectState, rhs: torch.Tensor) -> Solution:
        t0 = time.perf_counter()
        V = rhs.to(self.dtype)
        X = torch.cholesky_solve(V.T, state.L).T
        res = relative_residual(X @ state.H, V)
        return Solution(
            value=X.to(rhs.dtype),
            residual=res,
            converged=torch.ones(len(V), dtype=torch.bool),
            iterations=0,
            seconds=time.perf_counter() - t0,
            stats={"prepare_seconds": state.prepare_seconds},
        )
