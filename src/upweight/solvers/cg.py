"""CG: conjugate gradients on (H + δI)x = v, for all k right-hand sides at once."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .._checks import check_finite, check_interval
from .._progress import NoBar, ProgressBar, progress_bar
from .._threads import intra_op_threads
from ..core.curvature import Curvature, LinearOperator
from ..errors import InputError, NotConvergedWarning, NotPositiveDefiniteError, SolverError
from .base import RESIDUAL_SAMPLE, InverseHVPSolver, Solution, gauss_newton_hint, relative_residual
from .direct import suggest_damping
from .spectrum import lanczos


@runtime_checkable
class Preconditioner(Protocol):
    """What ``CG(preconditioner=…)`` needs: a once-per-fit ``prepare_preconditioner(curvature)``
    and ``precondition(state, R)`` → M⁻¹R for R of shape (k, p), with M a fixed symmetric
    positive definite approximation of H + δI (e.g. ``KFAC``)."""

    name: str

    def prepare_preconditioner(self, curvature: Curvature) -> Any: ...

    def precondition(self, state: Any, R: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CGState:
    """What ``CG.prepare`` returns; passed back to ``CG.solve``.

    Attributes:
        curvature: the operator A = H + δI of the system Ax = v (a ``Curvature``, or any
            ``LinearOperator`` such as K-FAC's ``BlockOperator``).
        preconditioner_state: what ``preconditioner.prepare_preconditioner`` returned, or ``None``
            for plain CG.
        prepare_seconds: wall time of preparing the preconditioner (0 for plain CG).
    """

    curvature: LinearOperator
    preconditioner_state: Any = None
    prepare_seconds: float = 0.0


#: the former name of ``CGState`` (which then held only preconditioned CG's state)
PCGState = CGState


@dataclass(frozen=True)
class CG(InverseHVPSolver[CGState]):
    """Conjugate gradients with one full-data HVP block per iteration — Koh & Liang (2017) §3.

    By default the k right-hand sides run as one block CG (``block=True``): they share each HVP
    pass over the data *and* one Krylov space, so k test points cost less than one each. With
    ``block=False`` they run as k independent CG recurrences that share each HVP pass. A column
    stops when ‖rⱼ‖ ≤ max(rtol·‖vⱼ‖, atol).

    Args:
        rtol: relative tolerance on the residual.
        atol: absolute tolerance on the residual.
        maxiter: iteration cap; ``None`` means min(2p, 10 000).
        preconditioner: ``None`` (plain CG), or a ``Preconditioner`` such as ``KFAC()``: then
            preconditioned CG on the same system (H + δI)x = v, with the same stopping rule on
            the true recurrence residual ‖rⱼ‖ — the answer is exact to ``rtol`` whatever the
            preconditioner approximates; a good M only cuts the iterations (K-FAC: the
            Gauss–Newton matrix's Kronecker structure, e.g. the pixel covariance of MNIST).
        block: ``True`` (the default) runs block CG (O'Leary 1980, in the breakdown-free form of
            Ji & Li 2017): the k right-hand sides share one Krylov space — each iteration searches
            along an orthonormal block of directions built from every unconverged residual, so
            the largest eigenvalues are resolved once for all of them and many right-hand sides
            converge in far fewer HVP blocks (timings: bench/RESULTS.md). Each iteration adds
            dense work of O(k²p) (a QR of the block and k×k products). For k = 1 it is plain CG.
            ``False``: k independent recurrences sharing each HVP pass. Same stopping rule per
            column; a converged column leaves the block.

        hvp_dtype: ``None`` (default), or a lower-precision dtype such as ``torch.bfloat16`` for the
            HVP products of the iterations (mixed precision; only where the structured HVP applies —
            θ = one ``nn.Linear`` producing the model output, e.g. softmax regression or a linear
            head on frozen features — else ``UnsupportedModelError``): the two matrix products per
            batch take bfloat16 operands with float32 accumulation, Hᵢ and all sums stay in the
            model's dtype. Each product then carries a relative error of about 2⁻⁸, which limits the
            true residual CG can reach to about 1e-2 whatever rtol says — use rtol ≥ 1e-2 (an rtol
            below the dtype's machine epsilon, 7.8e-3 for bfloat16, is refused). The final residual
            is measured with exact products, so ``Solution.residual`` (and ``Influence``'s
            ``max_residual``) judge
            the real solve. It pays only where the hardware multiplies bfloat16 natively: each
            iteration is cheaper, but more of them are needed (timings and rank agreement:
            bench/RESULTS.md); on CPUs without bfloat16 instructions the products are slower than in
            float32.
        residual_sample: right-hand sides per block whose true relative residual ‖(H + δI)x − v‖/‖v‖
            is measured after the iterations (keyword only): evenly spaced, as for the one-shot
            solvers (``OneShotSolver``), plus every column that did not meet the stopping rule. The
            check costs one full-data HVP of that many vectors, so the default (16) measures every
            column of a block of ≤ 16 right-hand sides and 16 of a larger one; ``0`` measures only
            the unconverged columns. The others hold NaN in ``Solution.residual``, are marked in
            ``Solution.measured``, and ``Influence``'s ``max_residual`` judges the measured ones.
            The recurrence residual ‖rⱼ‖ that the stopping rule reads is known for every column, but
            it is not the true residual: rounding (or ``hvp_dtype``) makes the two drift apart as
                the
            iterations go on, so it is reported only in ``Solution.stats`` —
            ``recurrence_residual_max`` (over all columns) and ``residual_gap_max``, the largest
            |true − recurrence| relative residual over the measured columns.

    Raises:
        NotPositiveDefiniteError: a search direction with pᵀ(H + δI)p ≤ 0 was met; the message
            estimates λmin and names a damping that fixes it.

    Warns:
        NotConvergedWarning: the cap was reached before the tolerance.
    """

    name = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Preconditioner | None = None
    block: bool = True
    hvp_dtype: torch.dtype | None = None
    residual_sample: int = field(default=RESIDUAL_SAMPLE, kw_only=True)

    def __post_init__(self) -> None:
        check_interval("CG", "rtol", self.rtol, 0.0, 1.0)
        check_interval(
            "CG", "residual_sample", self.residual_sample, 0, None, closed="left", integer=True
        )
        if self.hvp_dtype is not None and not (
            isinstance(self.hvp_dtype, torch.dtype) and self.hvp_dtype.is_floating_point
        ):
            raise InputError(
                "The 'hvp_dtype' parameter of CG must be None or a floating torch.dtype such as "
                f"torch.bfloat16; got {self.hvp_dtype!r}."
            )
        if self.hvp_dtype is not None and self.rtol < torch.finfo(self.hvp_dtype).eps:
            raise InputError(
                f"CG(rtol={self.rtol:g}, hvp_dtype={self.hvp_dtype}): products with"
                f" {self.hvp_dtype} operands resolve residuals only to about"
                f" {torch.finfo(self.hvp_dtype).eps:.1e} (their machine epsilon), so CG would"
                " iterate without reaching rtol. Use rtol ≥ 1e-2 with bfloat16, or drop hvp_dtype"
                " for a tighter solve."
            )
        check_interval("CG", "atol", self.atol, 0.0, None, closed="left")
        if self.maxiter is not None:
            check_interval("CG", "maxiter", self.maxiter, 1, None, closed="left", integer=True)
        if self.preconditioner is not None and not isinstance(self.preconditioner, Preconditioner):
            raise InputError(
                "The 'preconditioner' parameter of CG must be None or provide"
                " prepare_preconditioner(curvature) and precondition(state, R) (e.g. KFAC()); got"
                f" {type(self.preconditioner).__name__}."
            )

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        if self.preconditioner is None:
            cfg.pop("preconditioner", None)  # plain CG's provenance is unchanged
        if self.hvp_dtype is None:
            cfg.pop("hvp_dtype", None)
        if self.residual_sample == RESIDUAL_SAMPLE:
            # the default's provenance and store fingerprints are unchanged
            cfg.pop("residual_sample", None)
        return cfg

    def prepare(self, curvature: LinearOperator) -> CGState:
        """Plain CG has nothing to prepare; with a preconditioner, its ``prepare_preconditioner``.
        ``curvature`` may be any ``LinearOperator`` (the preconditioner may need a ``Curvature``).
        """
        if self.preconditioner is None:
            return CGState(curvature)
        t0 = time.perf_counter()
        pstate = self.preconditioner.prepare_preconditioner(curvature)
        return CGState(curvature, pstate, time.perf_counter() - t0)

    def solve(self, state: CGState | LinearOperator, rhs: torch.Tensor) -> Solution:
        """(Preconditioned) CG on the block of right-hand sides — block CG (``_block_cg``) or k
        independent recurrences (``_cg``); a column stops once ‖rⱼ‖ ≤ max(rtol·‖vⱼ‖, atol) and
        drops out of the block's HVPs. The residual is then measured with one more HVP (exact
        products, also with ``hvp_dtype``). ``state`` may also be the operator itself, which is then
        prepared here.
        """
        if not isinstance(state, CGState):
            state = self.prepare(state)
        pre = self.preconditioner
        curv = state.curvature
        t0 = time.perf_counter()
        t_pre = 0.0

        def precondition(R: torch.Tensor) -> torch.Tensor:
            nonlocal t_pre
            if pre is None:
                return R
            tp = time.perf_counter()
            Z = pre.precondition(state.preconditioner_state, R).to(curv.dtype)
            t_pre += time.perf_counter() - tp
            return Z

        B = rhs.to(curv.dtype).reshape(-1, curv.p)
        # a NaN column would never pass its stopping test nor enter the block: refuse it up front
        check_finite(
            B,
            "The right-hand side of the CG solve (row = right-hand side, column = parameter)",
            "Check the gradients it was built from (e.g. the test points' outputs may overflow at"
            " θ̂).",
        )
        maxiter = self.maxiter or min(2 * curv.p, 10_000)
        tol = torch.clamp(self.rtol * B.norm(dim=1), min=self.atol)
        what = (
            ("CG" if pre is None else "Preconditioned CG")
            if not self.block
            else ("Block CG" if pre is None else "Preconditioned block CG")
        )
        target = {"residual": 1.0, "rtol": self.rtol} | (
            {"atol": self.atol} if self.atol > 0 else {}
        )
        with intra_op_threads(curv.p * getattr(curv, "n", 0)):
            with progress_bar(desc=what, total=maxiter, postfix=target) as bar:
                if self.block:
                    X, rnorm, it = self._block_cg(curv, B, tol, maxiter, precondition, bar)
                else:
                    X, rnorm, it = self._cg(curv, B, tol, maxiter, precondition, bar)
            check_finite(
                X, f"The {what} solution", "Check the model and loss at θ̂, or add damping."
            )
            converged = rnorm <= tol
            tc = time.perf_counter()
            measured = _residual_columns(len(B), self.residual_sample, converged)
            cols = measured.nonzero().reshape(-1)
            res = torch.full((len(B),), float("nan"), dtype=B.dtype)
            if len(cols):
                res[cols] = relative_residual(curv.matvec(X[cols]), B[cols])
            t_check = time.perf_counter() - tc
        if not bool(torch.isfinite(res[cols]).all()):
            bad = cols[~torch.isfinite(res[cols])].tolist()
            raise SolverError(
                f"{what}: the measured residual of right-hand side(s) {bad[:10]} is not finite (the"
                " HVP (H + δI)x overflowed or is NaN), so the solution cannot be trusted. Check"
                " the model for overflow at θ̂ (e.g. a float64 model), or add damping."
            )
        if not bool(converged.all()):  # every unconverged column is measured
            warnings.warn(
                f"{what} stopped at maxiter={maxiter} with {int((~converged).sum())} of {len(B)}"
                " right-hand sides unconverged (largest relative residual"
                f" {float(res[~converged].max()):.2e} > rtol={self.rtol:g}). Raise maxiter, loosen"
                " rtol, or add damping to improve the conditioning.",
                NotConvergedWarning,
                stacklevel=3,
            )
        bnorm = B.norm(dim=1)
        recurrence = torch.where(
            bnorm > 0, rnorm / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny), rnorm
        )
        stats: dict[str, Any] = {
            "maxiter": maxiter,
            "residual_measured": (
                f"{len(cols)} of {len(B)} right-hand sides"
                + (" (evenly spaced, and every unconverged one)" if len(cols) < len(B) else "")
            ),
            "residual_check_seconds": t_check,
            "recurrence_residual_max": float(recurrence.max()) if len(B) else 0.0,
            "residual_gap_max": (
                float((res[cols] - recurrence[cols]).abs().max()) if len(cols) else float("nan")
            ),
        }
        if pre is not None:
            pstats = getattr(state.preconditioner_state, "stats", {}) or {}
            stats |= {
                "preconditioner": getattr(pre, "name", type(pre).__name__),
                "preconditioner_prepare_seconds": state.prepare_seconds,
                "precondition_seconds": t_pre,
                **{f"preconditioner_{k}": v for k, v in pstats.items()},
            }
        return Solution(
            X.to(rhs.dtype), res, converged, it, time.perf_counter() - t0, stats, measured=measured
        )

    def accuracy_advice(self, state: CGState | None = None) -> str:
        return "Raise CG's maxiter or add damping to improve the conditioning."

    def _cg(
        self,
        curv: LinearOperator,
        B: torch.Tensor,
        tol: torch.Tensor,
        maxiter: int,
        precondition: Any,
        bar: ProgressBar | NoBar,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """k independent (preconditioned) CG recurrences sharing each HVP block: (X, ‖R‖ per row,
        iterations); ``bar`` advances once per iteration, showing the largest relative residual
        ‖rⱼ‖/‖vⱼ‖."""
        X = torch.zeros_like(B)
        R = B.clone()
        Z = precondition(R)
        P = Z.clone()
        rz = (R * Z).sum(1)
        rnorm = R.norm(dim=1)
        self._check_spd_preconditioner(rz, rnorm)
        it = 0
        while it < maxiter:
            active = rnorm > tol
            if not bool(active.any()):
                break
            it += 1
            idx = active.nonzero().squeeze(1)
            Pa = P[idx]
            APa = self._product(curv, Pa)
            pAp = (Pa * APa).sum(1)
            if bool((pAp <= 0).any()):
                self._raise_not_pd(curv, float((pAp / (Pa * Pa).sum(1).clamp_min(1e-300)).min()))
            alpha = rz[idx] / pAp
            X[idx] += alpha[:, None] * Pa
            Ra = R[idx] - alpha[:, None] * APa
            R[idx] = Ra
            Za = precondition(Ra)
            rz_new = (Ra * Za).sum(1)
            rnorm[idx] = Ra.norm(dim=1)
            self._check_spd_preconditioner(rz_new, rnorm[idx])
            P[idx] = Za + (rz_new / rz[idx])[:, None] * Pa
            rz[idx] = rz_new
            bar.update(1, residual=lambda: _max_relative(rnorm, B))
        return X, rnorm, it

    def _block_cg(
        self,
        curv: LinearOperator,
        B: torch.Tensor,
        tol: torch.Tensor,
        maxiter: int,
        precondition: Any,
        bar: ProgressBar | NoBar,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Block CG (O'Leary 1980), breakdown-free (Ji & Li 2017): the search block P (s, p) has
        orthonormal rows spanning Z + βP_prev (Z = M⁻¹R of the unconverged columns), so PAPᵀ is
        well conditioned whatever the residuals' rank; with Q = AP (one HVP block),
        α = (PAPᵀ)⁻¹PRᵀ, X += αᵀP, R −= αᵀQ, β = −(PAPᵀ)⁻¹QZᵀ (A-conjugacy to the last block).
        Rows as vectors throughout: (X, ‖R‖ per row, iterations); ``bar`` as in ``_cg``."""
        X = torch.zeros_like(B)
        R = B.clone()
        Z = precondition(R)
        rnorm = R.norm(dim=1)
        self._check_spd_preconditioner((R * Z).sum(1), rnorm)
        active = rnorm > tol
        if not bool(active.any()):
            return X, rnorm, 0
        P = _orthonormal_rows(Z[active])
        it = 0
        while it < maxiter:
            it += 1
            Q = self._product(curv, P)
            PAP = P @ Q.T
            # its eigenvalues are Rayleigh quotients of H + δI on P's orthonormal rows: inverted
            # through its eigendecomposition (s × s), which also tells negative curvature apart
            evals, U = torch.linalg.eigh((PAP + PAP.T) / 2)
            if float(evals[0]) <= 0:
                self._raise_not_pd(curv, float(evals[0]))
            PAP_inv = (U / evals) @ U.T
            idx = active.nonzero().squeeze(1)
            Ra = R[idx]  # one gather of the active residuals, written back once
            alpha = PAP_inv @ (P @ Ra.T)  # (s, a)
            X[idx] += alpha.T @ P
            Ra -= alpha.T @ Q
            R[idx] = Ra
            rnorm[idx] = Ra.norm(dim=1)
            bar.update(1, residual=lambda: _max_relative(rnorm, B))
            Z = precondition(Ra)
            self._check_spd_preconditioner((Ra * Z).sum(1), rnorm[idx])
            still = rnorm[idx] > tol[idx]
            active[idx] = still
            if not bool(still.any()):
                break
            Z = Z[still]
            beta = -PAP_inv @ (Q @ Z.T)  # (s, a')
            P = _orthonormal_rows(Z + beta.T @ P)
        return X, rnorm, it

    def _product(self, curv: LinearOperator, P: torch.Tensor) -> torch.Tensor:
        """(H + δI)P for the iterations: in ``hvp_dtype`` where set (any operator with ``matvec``
        otherwise, e.g. K-FAC's fallback block)."""
        return (
            curv.matvec(P)
            if self.hvp_dtype is None
            else curv.matvec(P, operand_dtype=self.hvp_dtype)
        )

    def _check_spd_preconditioner(self, rz: torch.Tensor, rnorm: torch.Tensor) -> None:
        if bool(((rz <= 0) & (rnorm > 0)).any()):
            name = getattr(self.preconditioner, "name", type(self.preconditioner).__name__)
            raise SolverError(
                f"The CG preconditioner '{name}' is not positive definite: rᵀM⁻¹r ="
                f" {float(rz.min()):.3e} ≤ 0 for a nonzero residual r. Add damping to the"
                " preconditioner (e.g. KFAC(damping=…)) or drop it."
            )

    @staticmethod
    def _raise_not_pd(curv: LinearOperator, rayleigh: float) -> None:
        """``rayleigh``: the smallest pᵀ(H + δI)p/‖p‖² met along a search direction (≤ 0)."""
        # a short Lanczos run: its smallest Ritz value is a Rayleigh quotient, so an upper bound on
        # λmin
        lmin = min(
            lanczos(curv.matvec, curv.p, k=LANCZOS_STEPS_FOR_ERRORS, dtype=curv.dtype).lambda_min,
            rayleigh,
        )
        fix = suggest_damping(min(lmin, 0.0), curv.damping)
        rounding = ""
        if curv.dtype != torch.float64:
            rounding = (
                f" In {str(curv.dtype).removeprefix('torch.')} this can also be rounding in the"
                " HVPs of an ill-conditioned H: a float64 model (model.double()) tells the two"
                " apart."
            )
        raise NotPositiveDefiniteError(
            f"CG met negative curvature: pᵀ(H + δI)p/‖p‖² = {rayleigh:.3e} along a search"
            f" direction, so the Hessian (damping={curv.damping:g}) is not positive definite"
            f" (smallest eigenvalue ≈ {lmin:.3e}). Pass damping ≥ {fix:.2g} (e.g. Influence(...,"
            f" damping={fix:.2g})).{rounding}{gauss_newton_hint(curv)}",
            min_eigenvalue=lmin,
            suggested_damping=fix,
        )


#: Lanczos steps (full-data products) behind the smallest-eigenvalue estimate of a
#: not-positive-definite error
LANCZOS_STEPS_FOR_ERRORS = 20


def _residual_columns(k: int, sample: int, converged: torch.Tensor) -> torch.Tensor:
    """Bool (k,): the columns whose true residual CG measures — at most ``sample`` evenly spaced
    ones (all of them for k ≤ ``sample``, the choice ``one_shot_solution`` makes) and every
    unconverged one.
    """
    mask = ~converged.to(torch.bool)
    if sample > 0:
        cols = (
            torch.linspace(0, k - 1, sample).round().long().unique()
            if k > sample
            else torch.arange(k)
        )
        mask[cols] = True
    return mask


def _orthonormal_rows(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of W (s, p), s ≤ p: the Q factor of a Householder QR of
    Wᵀ. A row (nearly) dependent on the others still gives a unit row orthogonal to them, so the
    block never loses rank — the "breakdown-free" part."""
    Q, _ = torch.linalg.qr(W.T)
    return Q.T.contiguous()


def _max_relative(rnorm: torch.Tensor, B: torch.Tensor) -> float:
    """The largest relative residual maxⱼ ‖rⱼ‖/‖vⱼ‖ of the iteration (for the progress bar)."""
    if not len(B):
        return 0.0
    return float((rnorm / B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)).max())
