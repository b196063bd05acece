"""``Influence``: the Koh & Liang (2017) quantities for a fitted ``Objective``.

    I_up,params(z)         = −H⁻¹ ∇θL(z, θ̂)                         (Eq. 1)
    I_up,loss(z, z_test)   = −∇θf(z_test, θ̂)ᵀ H⁻¹ ∇θL(z, θ̂)         (Eq. 2; f = the loss by default)
    removal effect         ≈ −I_up,loss / n                          (removing z is ε = −1/n)
    I_pert,loss(z, z_test) = −∇θf(z_test, θ̂)ᵀ H⁻¹ ∇x∇θL(z, θ̂)       (Eq. 5)

with H = ∇²R(θ̂) + δI. The test gradients are solved as one block (the paper's s_test), and the
training gradients are streamed in chunks: n × p is never held.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch

from .._checks import check_choice, check_finite, check_interval, check_is_fitted
from .._progress import logger, progress
from ..core.curvature import Curvature
from ..core.data import Data
from ..core.grads import (
    grad_chunk_size,
    iter_per_sample_grads,
    pert_directions,
    risk_grad,
)
from ..core.objective import Objective
from ..errors import (
    InaccurateSolveError,
    InaccurateSolveWarning,
    InputError,
    NotAtMinimumWarning,
    ShapeError,
)
from ..solvers import CG, InverseHVPSolver, Solution
from .group import GroupInfluence, compute_group_influence
from .results import InfluenceScores, ParamInfluence, PertScores, SelfInfluence

TrainSelection = Any  # None (all) or indices into the fitted training data


class Influence:
    """Influence functions for a model at θ̂ — a scikit-learn-style estimator.

    Args:
        objective: model, per-sample loss, L2 term and test measurement.
        solver: inverse-HVP solver (``Direct()``, ``CG()``, ``LiSSA()``, ``Arnoldi(rank)``, ``Auto()``); default ``CG()``.
        damping: δ ≥ 0 added to H (Koh & Liang 2017, §4.2); needed when H is not positive definite.
        batch_size: points per vectorised chunk for HVPs and per-sample gradients (gradient chunks are
            further capped so one holds at most 256 MiB).
        max_residual: largest accepted relative residual ‖(H+δI)x − v‖/‖v‖ of a solve; "auto" takes
            the solver's ``default_max_residual`` (Direct 1e-4, CG 0.05, LiSSA 0.5, Arnoldi 1.0 — a
            low-rank projection's residual is the dropped fraction of v); ``None`` accepts any.
        on_inaccurate: "raise" an ``InaccurateSolveError`` (default) or "warn" and record it.
        grad_tol: ‖∇R(θ̂)‖ above which ``fit`` warns that θ̂ is not a minimum.
        progress: show progress bars on long sweeps.

    Examples:
        >>> import torch
        >>> from upweight import Objective, Direct
        >>> X = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64); y = X * 2
        >>> model = torch.nn.Linear(1, 1, bias=False).double().eval()
        >>> with torch.no_grad(): _ = model.weight.fill_(28 / 14.3)  # argmin of R: (14/3)(w − 2) + 0.1·w = 0
        >>> inf = Influence(Objective(model, "squared", l2=0.1), solver=Direct()).fit((X, y))
        >>> inf.up_loss((X[:1], y[:1])).values.shape
        (1, 3)
    """

    def __init__(
        self,
        objective: Objective,
        *,
        solver: InverseHVPSolver | None = None,
        damping: float = 0.0,
        batch_size: int = 2048,
        max_residual: float | Literal["auto"] | None = "auto",
        on_inaccurate: Literal["raise", "warn"] = "raise",
        grad_tol: float = 1e-3,
        progress: bool = True,
    ) -> None:
        self.objective = objective
        self.solver = solver if solver is not None else CG()
        self.damping = damping
        self.batch_size = batch_size
        self.max_residual = max_residual
        self.on_inaccurate = on_inaccurate
        self.grad_tol = grad_tol
        self.progress = progress
        self.data_: Data | None = None

    # ── fitting ───────────────────────────────────────────────────────────────────────
    def fit(self, train: Any) -> Influence:
        """Validate the training data, build H + δI and prepare the solver (factorise, …).

        Sets ``data_``, ``n_train_``, ``curvature_``, ``state_``, ``grad_norm_``.
        """
        if not isinstance(self.objective, Objective):
            raise InputError(f"objective must be an upweight.Objective; got {type(self.objective).__name__}.")
        if not isinstance(self.solver, InverseHVPSolver):
            raise InputError(f"solver must be an upweight solver (Auto, Direct, CG, LiSSA, Arnoldi); got {type(self.solver).__name__}.")
        check_interval("Influence", "damping", self.damping, 0.0, None, closed="left")
        check_interval("Influence", "batch_size", self.batch_size, 1, None, closed="left", integer=True)
        check_interval("Influence", "grad_tol", self.grad_tol, 0.0, None)
        if self.max_residual not in (None, "auto"):
            check_interval("Influence", "max_residual", self.max_residual, 0.0, None)
        check_choice("Influence", "on_inaccurate", self.on_inaccurate, ("raise", "warn"))

        data = Data.from_any(train, what="training data").to(self.objective.dtype)
        self.objective.check_data(data, what="training")
        t0 = time.perf_counter()
        params = self.objective.params
        g = risk_grad(self.objective, params, data, self.batch_size)
        check_finite(g, "∇R(θ̂)", "Check the model and loss for overflow at θ̂.")
        self.grad_norm_ = float(g.norm())
        if self.grad_norm_ > self.grad_tol:
            warnings.warn(
                f"‖∇R(θ̂)‖ = {self.grad_norm_:.2e} > grad_tol={self.grad_tol:g}: θ̂ is not a minimum of the regularised "
                "training risk, which influence functions assume. Train to convergence, or add damping "
                "(Koh & Liang 2017, §4.2) and read the scores as approximate.",
                NotAtMinimumWarning,
                stacklevel=2,
            )
        self.curvature_ = Curvature(self.objective, data, damping=self.damping, batch_size=self.batch_size)
        self.state_ = self.solver.prepare(self.curvature_)
        self.data_ = data
        self.n_train_ = len(data)
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info("fitted %s on n=%d, p=%d in %.2fs", type(self.solver).__name__, self.n_train_, self.objective.p, self.fit_seconds_)
        return self

    # ── building blocks ───────────────────────────────────────────────────────────────
    def _train(self, train: TrainSelection) -> Data:
        check_is_fitted(self, "data_")
        assert self.data_ is not None
        return self.data_ if train is None else self.data_.subset(train)

    def _test(self, test: Any) -> Data:
        check_is_fitted(self, "data_")
        assert self.data_ is not None
        data = Data.from_any(test, what="test data").to(self.objective.dtype)
        if data.feature_shape != self.data_.feature_shape:
            raise ShapeError(
                f"Test x has shape {tuple(data.feature_shape)} per point but training x has "
                f"{tuple(self.data_.feature_shape)} (test batch of shape {tuple(data.X.shape)})."
            )
        self.objective.check_data(data, what="test", measure=True)
        return data

    def _grad_chunk(self) -> int:
        return grad_chunk_size(self.objective.p, self.batch_size, self.objective.dtype)

    def _train_grad_chunks(self, data: Data, desc: str) -> Iterator[tuple[Data, torch.Tensor]]:
        """Per-sample training gradients in memory-bounded chunks, with a progress bar."""
        chunk = self._grad_chunk()
        it = iter_per_sample_grads(self.objective, self.objective.params, data, chunk)
        return progress(it, desc=desc, total=-(-len(data) // chunk), enabled=self.progress)

    def test_grads(self, test: Any) -> torch.Tensor:
        """∇θf(z_test, θ̂) for each test point, shape (n_test, p)."""
        data = test if isinstance(test, Data) else self._test(test)
        return torch.cat([g for _, g in iter_per_sample_grads(self.objective, self.objective.params, data, self.batch_size, measure=True)])

    def inverse_hvp(self, V: torch.Tensor) -> Solution:
        """(H + δI)⁻¹V for V of shape (k, p), checked against ``max_residual``."""
        check_is_fitted(self, "data_")
        sol = self.solver.solve(self.state_, V)
        check_finite(sol.value, f"The {self.solver.name} solution", "Add damping or check the model at θ̂.")
        bound = self._residual_bound()
        if bound is not None and sol.max_residual > bound:
            msg = (
                f"The {self.solver.name} solve is inaccurate: relative residual ‖(H+δI)x − v‖/‖v‖ = "
                f"{sol.max_residual:.2e} > max_residual={bound:g}. "
                + _accuracy_advice(getattr(self.state_, "chosen", self.solver.name))
            )
            if self.on_inaccurate == "raise":
                raise InaccurateSolveError(msg)
            warnings.warn(msg, InaccurateSolveWarning, stacklevel=3)
        return sol

    def _residual_bound(self) -> float | None:
        if self.max_residual == "auto":
            # Auto's bound is that of the solver it chose in prepare(); it travels on the state
            return getattr(self.state_, "default_max_residual", self.solver.default_max_residual)
        return self.max_residual

    def s_test(self, test: Any) -> Solution:
        """s_test = (H + δI)⁻¹∇θf(z_test, θ̂) for each test point, as one block solve (Koh & Liang §3)."""
        return self.inverse_hvp(self.test_grads(test))

    def _provenance(self, sol: Solution | None, started: float) -> dict[str, Any]:
        prov: dict[str, Any] = {
            "solver": self.solver.config(),
            "damping": self.damping,
            "l2": self.objective.l2,
            "p": self.objective.p,
            "dtype": str(self.objective.dtype),
            "grad_norm": self.grad_norm_,
            "seconds": time.perf_counter() - started,
        }
        if sol is not None:
            prov.update(
                residual_max=sol.max_residual,
                iterations=sol.iterations,
                solve_seconds=sol.seconds,
                max_residual_accepted=self._residual_bound(),
                accepted=self._residual_bound() is None or sol.max_residual <= self._residual_bound(),
                **{f"solver_{k}": v for k, v in sol.stats.items()},
            )
        return prov

    # ── the paper's quantities ────────────────────────────────────────────────────────
    def up_loss(self, test: Any, train: TrainSelection = None) -> InfluenceScores:
        """I_up,loss(z, z_test) = −∇θf(z_test)ᵀ H⁻¹ ∇θL(z) — Koh & Liang (2017) Eq. 2.

        Args:
            test: test points ``(X, y)`` (or Dataset/DataLoader); f is the objective's measure.
            train: indices into the fitted training data, or ``None`` for all.

        Returns:
            ``InfluenceScores`` of shape (n_test, n_train); > 0 means z is harmful to z_test.
        """
        t0 = time.perf_counter()
        test_data = self._test(test)
        sol = self.s_test(test_data)
        S = sol.value
        data = self._train(train)
        cols = []
        for _, G in self._train_grad_chunks(data, "I_up,loss over training points"):
            cols.append(-(S.to(G.dtype) @ G.T))
        values = torch.cat(cols, dim=1)
        return InfluenceScores(
            values.detach().cpu().numpy(), test_data.ids.numpy(), data.ids.numpy(), self.n_train_, "up_loss",
            self._provenance(sol, t0),
        )

    def removal_effect(self, test: Any, train: TrainSelection = None) -> InfluenceScores:
        """Predicted change of the test measurement when each training point is removed: −I_up,loss / n."""
        return self.up_loss(test, train).as_removal_effect()

    def up_params(self, train: TrainSelection = None) -> ParamInfluence:
        """I_up,params(z) = −H⁻¹∇θL(z, θ̂) — Koh & Liang (2017) Eq. 1; shape (n_selected, p).

        One block solve per chunk of ``batch_size`` training points.
        """
        t0 = time.perf_counter()
        data = self._train(train)
        rows, last = [], None
        for _, G in self._train_grad_chunks(data, "I_up,params"):
            last = self.inverse_hvp(G)
            rows.append(-last.value)
        return ParamInfluence(torch.cat(rows).cpu().numpy(), data.ids.numpy(), self.n_train_, self._provenance(last, t0))

    def self_influence(self, train: TrainSelection = None) -> SelfInfluence:
        """I_up,loss(z, z) = −∇θL(z)ᵀH⁻¹∇θL(z) for each training point (Koh & Liang 2017, §5.4).

        Needs one inverse-HVP per point: cheap with ``Direct`` (factorised once), n block solves
        with CG/LiSSA.
        """
        t0 = time.perf_counter()
        data = self._train(train)
        vals, last = [], None
        for _, G in self._train_grad_chunks(data, "self-influence"):
            last = self.inverse_hvp(G)
            vals.append(-(G * last.value.to(G.dtype)).sum(1))
        return SelfInfluence(torch.cat(vals).cpu().numpy(), data.ids.numpy(), self.n_train_, self._provenance(last, t0))

    def pert_loss(self, test: Any, train: TrainSelection = None) -> PertScores:
        """I_pert,loss(z, z_test) = −∇θf(z_test)ᵀ H⁻¹ ∇x∇θL(z) — Koh & Liang (2017) Eq. 5.

        Returns ``PertScores`` of shape (n_test, n_train, *x_shape). Moving training input x by
        a small δ changes the test measurement by about (1/n)·⟨values, δ⟩.
        """
        t0 = time.perf_counter()
        test_data = self._test(test)
        sol = self.s_test(test_data)
        data = self._train(train)
        parts = []
        chunk = self._grad_chunk()
        for batch in progress(data.batches(chunk), desc="I_pert,loss", total=-(-len(data) // chunk), enabled=self.progress):
            parts.append(-pert_directions(self.objective, self.objective.params, batch, sol.value))
        values = torch.cat(parts, dim=1)
        return PertScores(values.detach().cpu().numpy(), test_data.ids.numpy(), data.ids.numpy(), self.n_train_, self._provenance(sol, t0))

    def group_influence(
        self,
        test: Any,
        groups: Any,
        *,
        order: int = 1,
        third_derivative: bool = False,
        measure_hessian: bool = True,
    ) -> GroupInfluence:
        """Predicted change of the test measurement when each group U of training points is removed.

        With g_U = (1/n)Σ_{z∈U}∇θL(z, θ̂), H_U = (1/n)Σ_{z∈U}∇²θL(z, θ̂) and H = ∇²R(θ̂) + δI:

            order 1:  Δθ⁽¹⁾ = H⁻¹g_U                 Δf = ∇θf(z_test)ᵀΔθ⁽¹⁾
                      (= Σ_{z∈U} −I_up,loss(z, z_test)/n — Koh et al. 2019)
            order 2:  Δθ⁽²⁾ = Δθ⁽¹⁾ + H⁻¹H_UΔθ⁽¹⁾    Δf = ∇θf(z_test)ᵀΔθ⁽²⁾ + ½Δθ⁽²⁾ᵀ∇²θf(z_test)Δθ⁽²⁾
                      (Basu, You & Feizi 2020, at fixed n and l2)

        Removal keeps n and l2 (as ``upweight.refit`` with weight 0 on U). Order 1 costs one
        block solve with one right-hand side per group; order 2 adds one HVP over each group's
        points and a second block solve. No Hessian is formed. Derivation and the exact terms
        kept: ``upweight.influence.group``.

        Args:
            test: test points ``(X, y)`` (or Dataset/DataLoader); f is the objective's measure.
            groups: a list of groups, each an array of positions into the fitted training data
                (or a boolean mask of length n).
            order: 1 (sum of individual influences) or 2 (with the within-group interaction).
            third_derivative: order 2 only — also keep −½H⁻¹∇³R(θ̂)[Δθ⁽¹⁾, Δθ⁽¹⁾], the term Basu et
                al. drop; then Δθ⁽²⁾ is the full second-order expansion in the group weight.
            measure_hessian: order 2 only — add ½Δθ⁽²⁾ᵀ∇²θf Δθ⁽²⁾ to the predicted Δf (False gives
                Basu et al.'s ∇θfᵀΔθ⁽²⁾).

        Returns:
            ``GroupInfluence`` with ``values`` (n_test, n_groups) ≈ f(θ̂₋U) − f(θ̂) (> 0: removing U
            raises the test loss) and ``param_change`` (n_groups, p) ≈ θ̂₋U − θ̂.

        Examples:
            >>> import torch
            >>> from upweight import Objective, Direct
            >>> X = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64); y = X * 2
            >>> model = torch.nn.Linear(1, 1, bias=False).double().eval()
            >>> with torch.no_grad(): _ = model.weight.fill_(28 / 14.3)  # argmin of R
            >>> inf = Influence(Objective(model, "squared", l2=0.1), solver=Direct()).fit((X, y))
            >>> # removing the first two points; the exact refit moves w by −0.0226 = Δθ⁽¹⁾/(1 − H_U/H)
            >>> [round(float(inf.group_influence((X, y), [[0, 1]], order=o).param_change[0, 0]), 4) for o in (1, 2)]
            [-0.0147, -0.0198]
        """
        return compute_group_influence(
            self, test, groups, order=order, third_derivative=third_derivative, measure_hessian=measure_hessian
        )


def _accuracy_advice(name: str) -> str:
    if name == "arnoldi":
        return ("A residual above 1 means the kept Ritz pairs are wrong (see solver_max_ritz_residual): "
                "raise Arnoldi's oversampling, or add damping.")
    if name == "lissa":
        return "Increase LiSSA's depth (t) or repeats (r), or add damping."
    if name == "cg":
        return "Raise CG's maxiter or add damping to improve the conditioning."
    return "Add damping to improve the conditioning, or use Direct in float64."
