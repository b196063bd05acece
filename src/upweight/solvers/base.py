"""The inverse-HVP solver protocol: ``prepare(curvature) -> state`` once, ``solve(state, V)`` for
each block of right-hand sides; every solve returns a ``Solution`` with its measured residual.

``InverseHVPSolver`` is generic in its state type: each solver's ``prepare`` returns a dataclass of
named fields (``DirectState``, ``CGState``, ``LiSSAState``, …), which its ``solve`` reads back.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch

from .._checks import check_interval
from ..core.curvature import Curvature


@dataclass(frozen=True)
class Solution:
    """x ≈ (H + δI)⁻¹V for a block V of k right-hand sides.

    Attributes:
        value: the solutions, shape (k, p).
        residual: relative residuals ‖(H + δI)xⱼ − vⱼ‖ / ‖vⱼ‖, shape (k,), measured with one
            extra full-data HVP (or the dense matrix for Direct) — not the solver's own estimate.
            A one-shot approximate solver (``OneShotSolver``: KFAC, EKFAC, Nystrom, DataInf)
            measures at most its ``residual_sample`` evenly spaced right-hand sides of a block;
            the others hold NaN and are marked in ``measured``.
        converged: per right-hand side, whether the solver met its own stopping rule, shape (k,).
        iterations: iterations (CG), steps × repeats (LiSSA) or 0 (Direct).
        seconds: wall time of the solve, residual check included.
        stats: solver-specific numbers (scale used, λmax estimate, …).
        measured: which residuals were measured, bool (k,); ``None`` means all of them. A measured
            residual that is NaN or infinite is a failed solve, never "not measured".
    """

    value: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: int
    seconds: float
    stats: Mapping[str, Any] = field(default_factory=dict)
    measured: torch.Tensor | None = None

    @property
    def measured_mask(self) -> torch.Tensor:
        """Bool (k,): True where ``residual`` was measured."""
        if self.measured is None:
            return torch.ones(self.residual.shape, dtype=torch.bool)
        return self.measured.to(torch.bool).reshape(self.residual.shape)

    @property
    def checked(self) -> bool:
        """Whether any residual of a non-empty block was measured (an empty block counts as
        checked)."""
        return self.residual.numel() == 0 or bool(self.measured_mask.any())

    @property
    def max_residual(self) -> float:
        """The largest measured relative residual: ``inf`` when a measured one is NaN or infinite
        (the solve failed), NaN when none of a non-empty block was measured (``residual_sample=0``),
        0 for an empty block."""
        measured = self.residual[self.measured_mask]
        if measured.numel():
            if not bool(torch.isfinite(measured).all()):
                return float("inf")
            return float(measured.max())
        return float("nan") if self.residual.numel() else 0.0


#: the type of a solver's prepared state (what ``prepare`` returns and ``solve`` takes)
StateT = TypeVar("StateT")

#: the advice an inaccurate solve's error or warning ends with, unless the solver knows better
GENERIC_ACCURACY_ADVICE = "Add damping to improve the conditioning, or use Direct in float64."


class InverseHVPSolver(ABC, Generic[StateT]):
    """Computes (H + δI)⁻¹V in two steps: ``prepare`` does the once-per-fit work and returns the
    solver's state (a ``StateT``), ``solve`` uses it for each block of right-hand sides. Concrete
    solvers are frozen dataclasses of their settings; their states are dataclasses with named
    fields.
    """

    name: ClassVar[str]
    approximates: ClassVar[str] = "exact"
    #: the relative residual ``Influence(max_residual="auto")`` accepts from this solver
    default_max_residual: ClassVar[float] = 0.05

    @abstractmethod
    def prepare(self, curvature: Curvature) -> StateT:
        """Do the once-per-fit work (factorise, estimate λmax, …) and return the solver state."""

    @abstractmethod
    def solve(self, state: StateT, rhs: torch.Tensor) -> Solution:
        """Solve (H + δI)X = rhs for rhs of shape (k, p); returns a ``Solution``."""

    def accuracy_advice(self, state: StateT | None = None) -> str:
        """What to change when a solve's residual exceeds ``Influence``'s ``max_residual``: the
        sentence its ``InaccurateSolveError`` / ``InaccurateSolveWarning`` ends with. ``state`` is
        the prepared state (``Auto`` advises on the solver it chose)."""
        return GENERIC_ACCURACY_ADVICE

    def config(self) -> dict[str, Any]:
        """The solver's numerical settings — its identity in provenance and store fingerprints.
        Settings declared with ``non_numerical`` (a progress bar, raise-or-warn) are left out: they
        change no number, so a rerun with another value resumes the same store."""
        skip = (
            {f.name for f in fields(self) if f.metadata.get("non_numerical")}
            if is_dataclass(self)
            else set()
        )
        return {
            "name": self.name,
            **{
                k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                for k, v in vars(self).items()
                if k not in skip
            },
        }


def non_numerical(default: Any) -> Any:
    """A solver field that changes no number — what is shown (a progress bar) or whether a
    finding raises or warns: left out of ``config()`` (provenance, store fingerprints) and of
    equality.
    """
    return field(default=default, compare=False, metadata={"non_numerical": True})


def gauss_newton_hint(curvature: Any = None) -> str:
    """The sentence a not-positive-definite error adds for the exact Hessian: the Gauss–Newton
    curvature is positive semi-definite by construction (``core.curvature``)."""
    if curvature is not None and getattr(curvature, "kind", "hessian") != "hessian":
        return ""
    return (
        " For a non-convex model, Influence(..., curvature='gauss-newton') uses the Gauss–Newton"
        " matrix instead, positive semi-definite by construction."
    )


def relative_residual(AX: torch.Tensor, X_rhs: torch.Tensor) -> torch.Tensor:
    """‖A xⱼ − vⱼ‖ / ‖vⱼ‖ per row (0 where vⱼ = 0 and A xⱼ = 0)."""
    num = (AX - X_rhs).norm(dim=1)
    den = X_rhs.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num)


#: right-hand sides of a block whose residual a one-shot approximate solver measures by default
RESIDUAL_SAMPLE = 16


@dataclass(frozen=True)
class OneShotSolver(InverseHVPSolver[StateT]):
    """An approximate solver without iterations, X = M⁻¹V for a fixed approximation M of H + δI
    (KFAC, EKFAC, Nystrom, DataInf), whose solves measure the true residual on a sample of the
    right-hand sides (``one_shot_solution``).

    Args:
        residual_sample: right-hand sides per block whose true relative residual
            ‖(H + δI)x − v‖/‖v‖ is measured (evenly spaced; keyword only). They cost one full-data
            HVP of that many vectors per solve, which can exceed the cost of an approximate solve
            itself (``bench/RESULTS.md``). The residual varies between right-hand sides, so fewer
            samples can miss the worst. ``0`` measures none: the solve is then unchecked —
            ``Influence``'s ``max_residual`` cannot reject it, and its provenance says
            ``residual_max = nan``, ``accepted = None``.
    """

    residual_sample: int = field(default=RESIDUAL_SAMPLE, kw_only=True)

    def __post_init__(self) -> None:
        check_interval(
            type(self).__name__,
            "residual_sample",
            self.residual_sample,
            0,
            None,
            closed="left",
            integer=True,
        )


def one_shot_solution(
    curvature: Curvature,
    X: torch.Tensor,
    V: torch.Tensor,
    rhs_dtype: torch.dtype,
    t0: float,
    stats: Mapping[str, Any],
    iterations: int = 0,
    sample: int = RESIDUAL_SAMPLE,
) -> Solution:
    """The ``Solution`` of a non-iterative (approximate) solve X ≈ (H + δI)⁻¹V: X in the curvature's
    dtype, every column marked converged (there is no stopping rule to miss), ``t0`` the solve's
    start, and the true relative residual ‖(H + δI)x − v‖/‖v‖ from one full-data HVP (in V's dtype)
    of at most ``sample`` evenly spaced columns, NaN at the others and marked unmeasured in
    ``Solution.measured`` (all of them for ``sample`` = 0: no HVP).

    Checking every column would cost one full-data HVP per vector — often more than the solve
    itself; self-influence, one solve per chunk of training points, would pay a pass over all n
    points for every training point."""
    Xc = X.to(curvature.dtype)
    k = len(V)
    res = torch.full((k,), float("nan"), dtype=V.dtype)
    if sample <= 0:
        cols = torch.zeros(0, dtype=torch.long)
    else:
        cols = (
            torch.linspace(0, k - 1, sample).round().long().unique()
            if k > sample
            else torch.arange(k)
        )
    if len(cols):
        res[cols] = relative_residual(curvature.matvec(Xc[cols]).to(V.dtype), V[cols])
    measured = f"{len(cols)} of {k} right-hand sides"
    if sample <= 0:
        measured += " (residual_sample=0: not checked)"
    elif len(cols) < k:
        measured += " (evenly spaced)"
    stats = {**stats, "residual_measured": measured}
    mask = torch.zeros(k, dtype=torch.bool)
    mask[cols] = True
    return Solution(
        Xc.to(rhs_dtype),
        res,
        torch.ones(k, dtype=torch.bool),
        iterations,
        time.perf_counter() - t0,
        stats,
        measured=mask,
    )
