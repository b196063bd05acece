"""Exact minimisation and Hessian solves for the logistic top layer of the frozen-feature model
(§5.1–5.2).

The top layer is logistic regression on fixed features φᵢ (rows of F, n × d), labels yᵢ ∈ {±1}, no
intercept (the release code's ``BinaryLogisticRegressionWithLBFGS``):

    R(w) = (1/n) Σ log(1 + exp(−mᵢ)) + (l2/2)‖w‖²,    mᵢ = yᵢ wᵀφᵢ
    g(w) = −(1/n) Σ σ(−mᵢ) yᵢ φᵢ + l2·w
    H(w) = (1/n) Σ σ(mᵢ)σ(−mᵢ) φᵢφᵢᵀ + l2·I              (Koh & Liang 2017, §2.3)

The training-set attack (§5.2) needs, after every perturbation step, the retrained minimiser ŵ and
s_test = H(ŵ)⁻¹∇θL(z_test) — two solves with H per step. Forming H costs n·d² and factoring it d³/3:
at d = 2,048 features about 0.3 s + 0.1 s, and a hundred steps per attack made that the whole run
time. The attack's Hessians all stay close to the one at the clean θ̂ (a few images and w move a
little), so ``LogisticTopLayer`` inverts one *reference* Hessian once and solves each H(w; F) x = b
by conjugate gradients (``scipy.sparse.linalg.cg``) on matrix-free products Hv = Fᵀ(c ⊙ Fv)/n + l2·v
(2·n·d multiply-adds), preconditioned by the reference inverse (d² more): a few iterations of ~3 ms
instead of 0.4 s. When the problem has drifted so far that CG does not converge within ``maxiter``
iterations, the reference is refreshed at the current (w, F) (counted in ``refreshes``) and the
solve repeated — never an inexact answer.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg

from ..errors import InaccurateSolveError, InputError


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ


class LogisticTopLayer:
    """The closed forms above, with H solves preconditioned by a fixed (refreshable) reference
    inverse.

    Args:
        F: training features (n, d), float64 (torch or numpy). Later calls may pass a modified copy
            (the attack replaces a few rows); the reference stays usable as long as it is close.
        y: labels, n values; > 0 means +1, anything else −1.
        l2: L2 strength (> 0), so H is positive definite.
        w_ref: the weights (d,) or (1, d) at which the reference Hessian is formed.
        rtol: relative residual ‖H x − b‖ ≤ rtol·‖b‖ of every solve.
        maxiter: CG iterations before the reference is refreshed at the current point.
    """

    def __init__(
        self,
        F: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        l2: float,
        w_ref: torch.Tensor | np.ndarray,
        *,
        rtol: float = 1e-10,
        maxiter: int = 50,
    ) -> None:
        F = self._features(F)
        ys = np.where(np.asarray(y).reshape(-1) > 0, 1.0, -1.0)
        if len(ys) != F.shape[0] or F.shape[0] == 0:
            raise InputError(
                f"LogisticTopLayer: F has {F.shape[0]} rows and y {len(ys)} labels; need the same "
                "positive number."
            )
        if not l2 > 0:
            raise InputError(
                f"LogisticTopLayer: l2 must be > 0 (it keeps H positive definite); got {l2}."
            )
        self.ys, self.l2, self.rtol, self.maxiter = ys, float(l2), float(rtol), int(maxiter)
        self.n, self.d = F.shape
        self.refreshes = 0
        self.iterations = 0  # CG iterations over all solves so far
        self._ref_inv = self._inverse(F, self._vector(w_ref))

    # ── closed forms ────────────────────────────────────────────────────────────────
    def _features(self, F: torch.Tensor | np.ndarray) -> np.ndarray:
        A = F.detach().cpu().numpy() if isinstance(F, torch.Tensor) else np.asarray(F)
        if A.ndim != 2 or A.dtype != np.float64:
            raise InputError(
                f"LogisticTopLayer: features must be a 2-D float64 array; got shape {A.shape}, "
                f"dtype {A.dtype} (cast with .double())."
            )
        return A

    def _vector(self, w: torch.Tensor | np.ndarray) -> np.ndarray:
        v = (
            w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float64)
        ).reshape(-1)
        if v.shape[0] != getattr(self, "d", v.shape[0]):
            raise InputError(
                f"LogisticTopLayer: a weight vector has {v.shape[0]} entries; the features have"
                f" {self.d}."
            )
        return v.astype(np.float64, copy=False)

    def risk(self, F: np.ndarray, w: np.ndarray) -> float:
        m = self.ys * (F @ w)
        return float(np.logaddexp(0.0, -m).mean() + 0.5 * self.l2 * (w @ w))

    def gradient(self, F: np.ndarray, w: np.ndarray) -> np.ndarray:
        m = self.ys * (F @ w)
        return -(F.T @ (_sigmoid(-m) * self.ys)) / self.n + self.l2 * w

    def _curvature(self, F: np.ndarray, w: np.ndarray) -> np.ndarray:
        m = self.ys * (F @ w)
        return _sigmoid(m) * _sigmoid(-m)

    def hessian(self, F: torch.Tensor | np.ndarray, w: torch.Tensor | np.ndarray) -> np.ndarray:
        """H(w) formed explicitly, (d, d) — n·d² work; for references and tests."""
        F, w = self._features(F), self._vector(w)
        c = self._curvature(F, w)
        return (F.T * (c / self.n)) @ F + self.l2 * np.eye(self.d)

    def _inverse(self, F: np.ndarray, w: np.ndarray) -> np.ndarray:
        # an explicit inverse: applying it is one d×d product (≈ 4× faster than two triangular
        # solves)
        return np.linalg.inv(self.hessian(F, w))

    # ── solves ──────────────────────────────────────────────────────────────────────
    def solve(
        self,
        F: torch.Tensor | np.ndarray,
        w: torch.Tensor | np.ndarray,
        b: torch.Tensor | np.ndarray,
        *,
        rtol: float | None = None,
    ) -> np.ndarray:
        """x = H(w; F)⁻¹ b to ‖Hx − b‖ ≤ rtol·‖b‖ (b of shape (d,); rtol defaults to the
        constructor's)."""
        F, w, b = self._features(F), self._vector(w), self._vector(b)
        rtol = self.rtol if rtol is None else float(rtol)
        c = self._curvature(F, w) / self.n
        A = LinearOperator(
            (self.d, self.d), matvec=lambda v: F.T @ (c * (F @ v)) + self.l2 * v, dtype=np.float64
        )
        M = LinearOperator((self.d, self.d), matvec=lambda r: self._ref_inv @ r, dtype=np.float64)
        for attempt in range(2):
            x, info = cg(
                A,
                b,
                x0=self._ref_inv @ b,
                rtol=rtol,
                atol=0.0,
                maxiter=self.maxiter,
                M=M,
                callback=self._count_iteration,
            )
            if info == 0:
                return x
            if attempt == 0:  # drifted too far from the reference: refresh it here and solve again
                self._ref_inv = self._inverse(F, w)
                self.refreshes += 1
        raise InaccurateSolveError(
            "LogisticTopLayer.solve: CG with the Hessian's own inverse as preconditioner did not"
            f" reach rtol={rtol:g} in {self.maxiter} iterations; the features are too badly"
            " conditioned for float64 — raise l2."
        )

    def _count_iteration(self, _x: np.ndarray) -> None:
        self.iterations += 1

    def minimise(
        self,
        F: torch.Tensor | np.ndarray,
        init: torch.Tensor | np.ndarray,
        *,
        gtol: float = 1e-10,
        max_steps: int = 50,
    ) -> tuple[np.ndarray, float]:
        """argmin R(w) by inexact Newton steps with an Armijo backtracking line search, from
        ``init``; stops at ‖g‖₂ ≤ gtol or when no decrease is representable. Returns (w, ‖g‖₂).

        Each step solves H s = g only to ‖Hs − g‖ ≤ η‖g‖ with the forcing term η = min(0.5, √‖g‖₂)
        (Eisenstat & Walker 1996, superlinear): far from the minimum a rough direction suffices, and
        the stopping test is on the exact gradient, so the minimiser is as exact as with exact
        steps.
        """
        F, w = self._features(F), self._vector(init).copy()
        gnorm = float("inf")
        for _ in range(max_steps):
            g = self.gradient(F, w)
            gnorm = float(np.linalg.norm(g))
            if gnorm <= gtol:
                break
            step = self.solve(F, w, g, rtol=min(0.5, gnorm**0.5))
            r0, a, slope = self.risk(F, w), 1.0, float(g @ step)
            while a > 1e-8 and self.risk(F, w - a * step) > r0 - 1e-4 * a * slope:
                a *= 0.5
            if a <= 1e-8:  # at the minimum to float64 precision
                break
            w = w - a * step
        return w, gnorm


__all__ = ["LogisticTopLayer"]
