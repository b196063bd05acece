"""Auto: picks Direct, CG or LiSSA for the problem at hand, and says what it chose and why."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._checks import check_choice, check_interval
from .._memory import available_memory
from .._progress import progress_enabled
from ..core.curvature import Curvature
from ..errors import NotPositiveDefiniteError
from .base import InverseHVPSolver, Solution, non_numerical
from .cg import CG, CGState
from .direct import DENSE_BYTES_PER_ENTRY, Direct, DirectState
from .lissa import LiSSAState
from .spectrum import (
    Spectrum,
    estimate_spectrum,
    lanczos,
    lissa_from_spectrum,
    raise_not_positive_definite,
)

#: Direct is never chosen above this many parameters, whatever the memory: forming H costs p
#: full-data HVPs (in blocks of 256) and the Cholesky p³/3 flops, where CG needs about √κ HVPs.
DENSE_P_CAP = 5_000


def dense_p_limit(memory_fraction: float, memory: int | None = None) -> int:
    """Largest p whose float64 Direct solve (peak ``DENSE_BYTES_PER_ENTRY``·p² bytes) fits in
    ``memory_fraction`` of the available memory, capped at ``DENSE_P_CAP``."""
    mem = available_memory() if memory is None else memory
    return min(DENSE_P_CAP, int(math.isqrt(int(memory_fraction * mem / DENSE_BYTES_PER_ENTRY))))


@dataclass(frozen=True)
class AutoState:
    """What ``Auto.prepare`` decided; passed back to ``Auto.solve``.

    Attributes:
        chosen: the chosen solver's name ("direct", "cg" or "lissa").
        solver: the configured solver that does the solves.
        inner: that solver's prepared state.
        reason: a sentence saying why it was chosen.
        spectrum: Lanczos estimates of H + δI (damping included), or ``None``.
        damping: the damping actually used (larger than the requested one only with
            ``on_indefinite="damp"``).
        default_max_residual: the chosen solver's ``default_max_residual``.
        stats: the numbers every ``Solution.stats`` of this fit carries.
    """

    chosen: str
    solver: InverseHVPSolver[Any]
    inner: DirectState | CGState | LiSSAState
    reason: str
    spectrum: Spectrum | None
    damping: float
    default_max_residual: float
    stats: dict[str, Any]


@dataclass(frozen=True)
class Auto(InverseHVPSolver[AutoState]):
    """Chooses the inverse-HVP solver from p, n, the memory at hand and the spectrum of H + δI.

    The rule, in order:

    1. **Direct** if p ≤ ``max_dense_p`` — exact (float64 Cholesky). By default ``max_dense_p``
       is the largest p whose dense H and factors (about 32·p² bytes at peak) fit in
       ``memory_fraction`` of the available memory, capped at 5 000 because forming H costs
       p full-data HVPs.
    2. **LiSSA** if n > ``cg_max_n`` — each CG iteration is a pass over all n points, while
       LiSSA's whole default budget (depth 1 000 × 4 repeats × 256 points ≈ 10⁶ per-sample HVPs)
       is about one such pass at n = 10⁶. Its scale and depth come from a Lanczos estimate on a
       ``spectrum_sample``-point subsample (see ``lissa_from_spectrum``).
    3. **CG** otherwise, after a full-data Lanczos estimate (``lanczos_steps`` HVPs) of λmax and
       λmin, which checks positive definiteness up front and predicts the iteration count.

    Direct's spectrum comes free: Lanczos runs on the dense matrix it has formed anyway.
    If the (estimated) λmin of H + δI is ≤ 0, ``on_indefinite="raise"`` raises
    ``NotPositiveDefiniteError`` naming the damping that fixes it; ``"damp"`` applies that
    damping (Koh & Liang 2017, §4.2) and records it — the scores then describe H + δ'I.

    Every ``Solution.stats`` (and so every result's ``provenance.solver_stats``) records
    ``chosen``, ``reason``, ``damping_used`` and the spectrum estimates ``spectrum_*``.

    Args:
        max_dense_p: the largest p solved by Direct; ``None`` derives it from memory (0: never).
        memory_fraction: share of the available memory Direct may use when ``max_dense_p`` is
            ``None``.
        cg_max_n: the largest n solved by CG; above it LiSSA is used (0: always LiSSA unless
            Direct).
        rtol: CG's relative tolerance.
        lanczos_steps: Lanczos steps for the spectrum estimate.
        spectrum_sample: training points in the subsample the LiSSA path estimates the spectrum on.
        on_indefinite: "raise" (default) or "damp" when H + δI is not positive definite.
        seed: seeds Lanczos, the subsample and LiSSA.
        progress: the progress bars of the work it runs (Lanczos, CG or LiSSA; ``_progress``).

    Raises:
        InputError: an invalid setting, naming the parameter.
        NotPositiveDefiniteError: (``on_indefinite="raise"``) H + δI has an eigenvalue ≤ 0.

    Examples:
        >>> import torch
        >>> from upweight import Objective, Data
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).eval(), "squared", l2=1.0)
        >>> curv = Curvature(obj, Data.from_any((torch.eye(2), torch.zeros(2, 1))))  # H = I/2 + I
        >>> state = Auto().prepare(curv)
        >>> state.chosen, state.reason.startswith("p = 2 ≤ max_dense_p")
        ('direct', True)
        >>> Auto().solve(state, torch.tensor([[1.5, 3.0]])).value.tolist()
        [[1.0, 2.0]]
    """

    name = "auto"
    approximates = "exact (Direct, CG) or stochastic (LiSSA), as chosen"
    #: the class-level bound is CG's; the chosen solver's own is ``AutoState.default_max_residual``
    default_max_residual = CG.default_max_residual
    max_dense_p: int | None = None
    memory_fraction: float = 0.25
    cg_max_n: int = 1_000_000
    rtol: float = 1e-6
    lanczos_steps: int = 30
    spectrum_sample: int = 4096
    on_indefinite: Literal["raise", "damp"] = "raise"
    seed: int = 0
    progress: bool = non_numerical(True)

    def __post_init__(self) -> None:
        if self.max_dense_p is not None:
            check_interval(
                "Auto", "max_dense_p", self.max_dense_p, 0, None, closed="left", integer=True
            )
        check_interval("Auto", "memory_fraction", self.memory_fraction, 0.0, 1.0, closed="right")
        check_interval("Auto", "cg_max_n", self.cg_max_n, 0, None, closed="left", integer=True)
        check_interval("Auto", "rtol", self.rtol, 0.0, 1.0)
        check_interval(
            "Auto", "lanczos_steps", self.lanczos_steps, 2, None, closed="left", integer=True
        )
        check_interval(
            "Auto", "spectrum_sample", self.spectrum_sample, 1, None, closed="left", integer=True
        )
        check_choice("Auto", "on_indefinite", self.on_indefinite, ("raise", "damp"))
        check_interval("Auto", "seed", self.seed, 0, None, closed="left", integer=True)

    # ── the decision ─────────────────────────────────────────────────────────────────
    def dense_limit(self) -> tuple[int, str]:
        """The p up to which Direct is chosen, and where that number comes from."""
        if self.max_dense_p is not None:
            return self.max_dense_p, "set by the caller"
        mem = available_memory()
        limit = dense_p_limit(self.memory_fraction, mem)
        why = (
            f"float64 H and its factors ({DENSE_BYTES_PER_ENTRY}·p² bytes) within"
            f" {self.memory_fraction:g} of {mem / 2**30:.1f} GiB available memory"
        )
        return limit, why + (f", capped at {DENSE_P_CAP}" if limit == DENSE_P_CAP else "")

    def prepare(self, curvature: Curvature) -> AutoState:
        with progress_enabled(self.progress):
            return self._prepare(curvature)

    def _prepare(self, curvature: Curvature) -> AutoState:
        t0 = time.perf_counter()
        p, n = curvature.p, curvature.n
        limit, limit_why = self.dense_limit()
        if p <= limit:
            why = f"p = {p} ≤ max_dense_p = {limit} ({limit_why}): Direct (exact, float64 Cholesky)"
            state = self._prepare_direct(curvature, why)
        elif n > self.cg_max_n:
            why = (
                f"p = {p} > max_dense_p = {limit} ({limit_why}) and n = {n} > cg_max_n ="
                f" {self.cg_max_n}: LiSSA (stochastic; one CG iteration would pass over all n"
                " points)"
            )
            state = self._prepare_lissa(curvature, why)
        else:
            why = (
                f"p = {p} > max_dense_p = {limit} ({limit_why}) and n = {n} ≤ cg_max_n ="
                f" {self.cg_max_n}: CG (rtol = {self.rtol:g}, one full-data HVP per iteration)"
            )
            state = self._prepare_cg(curvature, why)
        state.stats["prepare_seconds"] = time.perf_counter() - t0
        return state

    def _prepare_direct(self, curvature: Curvature, why: str) -> AutoState:
        direct = Direct(max_p=max(curvature.p, 1))
        damping = curvature.damping
        try:
            inner = direct.prepare(curvature)
        except NotPositiveDefiniteError as err:
            if self.on_indefinite == "raise":
                raise
            damping = err.suggested_damping
            why += (
                f"; H + δI was indefinite (λmin = {err.min_eigenvalue:.3e}), so damping was raised "
                f"from {curvature.damping:g} to {damping:g}"
            )
            inner = direct.prepare(curvature.replace(damping=damping))
        H = inner.H
        spec = lanczos(
            lambda v: H @ v,
            curvature.p,
            k=self.lanczos_steps,
            seed=self.seed,
            source="Lanczos on the dense H + δI formed by Direct",
        )
        return self._state("direct", direct, inner, why, spec, damping)

    def _prepare_cg(self, curvature: Curvature, why: str) -> AutoState:
        spec = estimate_spectrum(curvature, k=self.lanczos_steps, seed=self.seed)
        curvature, spec, damping, why = self._handle_indefinite(
            curvature, spec, why, "CG would meet negative curvature."
        )
        cg = CG(rtol=self.rtol)
        kappa = spec.condition_number
        expected = math.ceil(0.5 * math.sqrt(kappa) * math.log(2.0 / self.rtol))
        why += f"; Lanczos κ ≈ {kappa:.3g}, so at most about {expected} iterations (½√κ·ln(2/rtol))"
        state = self._state("cg", cg, cg.prepare(curvature), why, spec, damping)
        state.stats["expected_iterations"] = expected
        return state

    def _prepare_lissa(self, curvature: Curvature, why: str) -> AutoState:
        spec = estimate_spectrum(
            curvature, k=self.lanczos_steps, seed=self.seed, sample=self.spectrum_sample
        )
        curvature, spec, damping, why = self._handle_indefinite(
            curvature, spec, why, "LiSSA's series diverges along a negative-curvature direction."
        )
        lissa = lissa_from_spectrum(
            curvature, spectrum=spec, seed=self.seed, progress=self.progress
        )
        why += (
            f"; scale = {lissa.scale:.3g} (1.1 × the larger of the Lanczos and minibatch λmax), "
            f"depth = {lissa.depth} from κ ≈ {spec.condition_number:.3g}"
        )
        return self._state("lissa", lissa, lissa.prepare(curvature), why, spec, damping)

    def _handle_indefinite(
        self, curvature: Curvature, spec: Spectrum, why: str, consequence: str
    ) -> tuple[Curvature, Spectrum, float, str]:
        if spec.positive_definite:
            return curvature, spec, curvature.damping, why
        if self.on_indefinite == "raise":
            raise_not_positive_definite(spec, curvature.damping, consequence)
        damping = spec.needed_damping(curvature.damping)
        why += (
            f"; H + δI was indefinite (Lanczos λmin ≈ {spec.lambda_min:.3e}), so damping was raised"
            f" from {curvature.damping:g} to {damping:g}"
        )
        return (
            curvature.replace(damping=damping),
            spec.shifted(damping - curvature.damping),
            damping,
            why,
        )

    def _state(
        self,
        chosen: str,
        solver: InverseHVPSolver[Any],
        inner: DirectState | CGState | LiSSAState,
        why: str,
        spec: Spectrum,
        damping: float,
    ) -> AutoState:
        stats: dict[str, Any] = {
            "chosen": chosen,
            "reason": why,
            "damping_used": damping,
            **spec.as_stats(),
        }
        return AutoState(
            chosen, solver, inner, why, spec, damping, solver.default_max_residual, stats
        )

    # ── the solves ───────────────────────────────────────────────────────────────────
    def solve(self, state: AutoState, rhs: torch.Tensor) -> Solution:
        t0 = time.perf_counter()
        with progress_enabled(self.progress):
            sol = state.solver.solve(state.inner, rhs)
        return dataclasses.replace(
            sol, seconds=time.perf_counter() - t0, stats={**sol.stats, **state.stats}
        )

    def accuracy_advice(self, state: AutoState | None = None) -> str:
        """The advice of the solver ``prepare`` chose (the generic advice without a state)."""
        if state is None:
            return super().accuracy_advice()
        return state.solver.accuracy_advice(state.inner)
