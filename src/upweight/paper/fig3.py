"""§4.3 of Koh & Liang (2017), Figure 3: influence for a non-differentiable loss (the hinge).

The experiment, as in the paper and its release code (``scripts/run_hinge_experiment.py``):

1. A linear SVM without bias on MNIST 1 vs 7 (11,800 training images, labels ±1), trained on
   the **hinge** loss: R(w) = (1/n) Σᵢ max(0, 1 − yᵢ wᵀxᵢ) + (l2/2)‖w‖², l2 = 0.01 (the
   caption's 0.005‖w‖²₂). Hinge(s) is not differentiable at s = 1 and its second derivative is
   0 everywhere else, so we train it exactly with our own solver (:func:`fit_hinge_svm`: dual
   coordinate descent, then an active-set solve of the KKT system, certified by the KKT
   residual and the duality gap) — not with a smooth surrogate.
2. One wrongly classified test point (release code: test index 1597).
3. I_up,loss(z, z_test) at these **same** hinge weights, computed by ``upweight.Influence``
   with the exact solver (``Direct``) and

   * the raw hinge, its derivative set to 0 at the kink (paper: "we set the derivatives at
     the hinge to 0"); its Hessian is then the L2 term only, H = l2·I;
   * ``SmoothHinge(t)`` = t·log(1 + exp((1 − s)/t)) for each t (the paper: t = 0.001 …
     0.1), as both the training and the test loss of the influence computation.

4. The k = 100 training points of largest |I_up,loss| under the raw hinge (release code:
   ``remove_type='maxinf'`` of the hinge model) are removed one at a time and the **hinge**
   SVM is retrained exactly (warm-started from the full solution). The actual change of the
   test point's hinge loss is compared with each prediction −I_up,loss/n (Pearson R; paper:
   R = 0.95 at t = 0.001, 0.91 at t = 0.1; the release notebook printed 0.63 for the raw
   hinge).

Removing z keeps n and l2 (the refit minimises (1/n) Σ_{j≠i} Hinge + (l2/2)‖w‖², as
``upweight.refit`` with weight 0 does); the release code refitted with 1/(n − 1) instead.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from .._progress import progress as _progress
from ..core import Objective, SmoothHinge
from ..core.losses import hinge
from ..datasets._base import SplitData
from ..errors import InputError, NotAtMinimumWarning, SolverError
from ..influence import Influence
from ..solvers import Direct
from .config import Fig3Config
from .fig1 import binary_arrays

RELEASE_TEST_INDEX = 1597  # the release code's test point (Fig3Config's default)
PAPER: dict[str, Any] = {
    "n_train": 11_800,
    "l2": 0.01,  # 0.005‖w‖² = (l2/2)‖w‖²
    "bias": False,
    "k": 100,
    "test_index": RELEASE_TEST_INDEX,
    "ts": [0.001, 0.01, 0.1],
    "pearson": {"0.001": 0.95, "0.1": 0.91},
    "pearson_release_notebook": {"hinge": 0.632, "0.001": 0.950, "0.1": 0.914},
}


# ── exact hinge-loss SVM ──────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class HingeSVM:
    """The minimiser of R(w) = (1/n) Σ_{i kept} max(0, 1 − yᵢwᵀxᵢ) + (l2/2)‖w‖², with its
    certificate.

    Attributes:
        w: the weights, shape (p,).
        beta: dual coefficients βᵢ ∈ [0, 1] (the subgradient weights; w = Σ βᵢyᵢxᵢ/(l2·n));
            0 for removed points.
        primal, dual: R(w) and the dual objective (1/n)Σβᵢ − (l2/2)‖w‖²; their difference,
            ``gap``, is ≥ 0 and 0 exactly at the optimum.
        kkt: the largest KKT violation over kept points: |mᵢ − 1| where 0 < βᵢ < 1,
            max(0, 1 − mᵢ) where βᵢ = 0, max(0, mᵢ − 1) where βᵢ = 1 (mᵢ = yᵢwᵀxᵢ).
        n_margin, n_bound: points with 0 < β < 1 (exactly on the margin) and β = 1 (inside it).
        epochs: coordinate-descent passes (over the active points); polish_steps: active-set steps.
    """

    w: np.ndarray
    beta: np.ndarray
    primal: float
    dual: float
    gap: float
    kkt: float
    n_margin: int
    n_bound: int
    epochs: int
    polish_steps: int


def _kkt_violation(m: np.ndarray, beta: np.ndarray, keep: np.ndarray) -> np.ndarray:
    v = np.where(
        beta <= 0.0,
        np.maximum(1.0 - m, 0.0),
        np.where(beta >= 1.0, np.maximum(m - 1.0, 0.0), np.abs(1.0 - m)),
    )
    return np.where(keep, v, 0.0)


def _dcd(
    Z: np.ndarray,
    sq: np.ndarray,
    ln: float,
    beta: np.ndarray,
    w: np.ndarray,
    keep: np.ndarray,
    tol: float,
    max_epochs: int,
    rng: np.random.Generator,
) -> int:
    """Dual coordinate descent (Hsieh et al. 2008) on max_β (1/n)Σβᵢ − (1/(2·l2·n²))‖Σβᵢzᵢ‖², 0 ≤ β
    ≤ 1, with shrinking: sweeps over the points that violate the KKT conditions or lie strictly
    inside the box, then a full (vectorised) check. Updates ``beta`` and ``w`` in place."""
    epochs = 0
    while epochs < max_epochs:
        viol = _kkt_violation(Z @ w, beta, keep)
        if viol.max(initial=0.0) <= tol:
            break
        active = np.flatnonzero(keep & ((viol > 0.1 * tol) | ((beta > 0.0) & (beta < 1.0))))
        for _ in range(10):
            epochs += 1
            biggest = 0.0
            for i in rng.permutation(active):
                zi = Z[i]
                g = 1.0 - float(zi @ w)
                b = beta[i]
                nb = min(1.0, max(0.0, b + g * ln / sq[i]))
                if nb != b:
                    biggest = max(biggest, abs(g))
                    w += ((nb - b) / ln) * zi
                    beta[i] = nb
            if biggest <= 0.5 * tol or epochs >= max_epochs:
                break
    return epochs


def _polish(
    Z: np.ndarray,
    ln: float,
    w: np.ndarray,
    beta: np.ndarray,
    keep: np.ndarray,
    tol: float,
    max_steps: int = 30,
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Solve the KKT system exactly for a guessed partition and correct the guess (an active-set
    method).

    With E = {β = 1}, M = {0 < β < 1} (points exactly on the margin) and O = {β = 0}: the
    optimality conditions are w = (Σ_E zᵢ + Σ_M βᵢzᵢ)/(l2·n) and z_iᵀw = 1 on M, a linear system
    of size |M|. Points whose β leaves [0, 1] or whose margin crosses 1 change set; returns
    ``None`` if no consistent partition is found in ``max_steps``.
    """
    m = Z @ w
    near = max(1e3 * tol, 1e-6)
    M = keep & (((beta > 0.0) & (beta < 1.0)) | (np.abs(m - 1.0) <= near))
    E = keep & ~M & (m < 1.0)
    for step in range(1, max_steps + 1):
        gE = Z[E].sum(axis=0)
        idx = np.flatnonzero(M)
        ZM = Z[idx]
        bM = np.zeros(0)
        if len(idx):
            A = ZM @ ZM.T
            rhs = ln - ZM @ gE
            bM = np.linalg.lstsq(A, rhs, rcond=None)[0]
        w_new = (gE + ZM.T @ bM) / ln
        m = Z @ w_new
        rest = keep & ~M & ~E
        bad_O = rest & (m < 1.0 - tol)
        bad_E = E & (m > 1.0 + tol)
        low, high = bM < -tol, bM > 1.0 + tol
        off = len(idx) > 0 and float(np.abs(m[idx] - 1.0).max()) > tol
        if not (bad_O.any() or bad_E.any() or low.any() or high.any() or off):
            b = np.where(E, 1.0, 0.0)
            b[idx] = np.clip(bM, 0.0, 1.0)
            return b, Z.T @ b / ln, step
        if off and not (bad_O.any() or bad_E.any() or low.any() or high.any()):
            return None  # singular system without a consistent solution: more coordinate descent
        M[idx[low]] = False
        M[idx[high]] = False
        E[idx[high]] = True
        M |= bad_O | bad_E
        E &= ~bad_E
    return None


def fit_hinge_svm(
    X: np.ndarray,
    y: np.ndarray,
    l2: float,
    *,
    keep: np.ndarray | None = None,
    beta0: np.ndarray | None = None,
    tol: float = 1e-9,
    max_epochs: int = 20_000,
    seed: int = 0,
) -> HingeSVM:
    """Minimise (1/n) Σ_{i kept} max(0, 1 − yᵢwᵀxᵢ) + (l2/2)‖w‖² exactly (no bias), in float64.

    The hinge-loss SVM of Koh & Liang (2017) §4.3. Dual coordinate descent brings the KKT
    violation to ≤ 1e-3 (then 1e-5, …), after which an active-set solve of the KKT system
    gives the optimum to round-off. The result is accepted only when the KKT violation is
    ≤ ``tol`` (and is returned with the duality gap as a second certificate).

    Args:
        X: features, shape (n, p). y: labels ±1 (or > 0 for +1), shape (n,).
        l2: the L2 strength, > 0.
        keep: boolean mask of the points in the objective (default all); the normalisation
            stays 1/n with n = len(X) (a removed point is weight 0, as ``upweight.refit``).
        beta0: a warm start for the dual coefficients (e.g. the full fit's, for leave-one-out).
        tol: the largest accepted KKT violation (margins are O(1)).
        max_epochs: cap on coordinate-descent passes.

    Raises:
        InputError: bad shapes or l2 ≤ 0. SolverError: no certified optimum within ``max_epochs``.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (len(X),):
        raise InputError(
            f"fit_hinge_svm: X must be (n, p) and y (n,); got {X.shape} and {y.shape}."
        )
    if not (isinstance(l2, (int, float)) and l2 > 0 and math.isfinite(l2)):
        raise InputError(
            f"fit_hinge_svm: l2 must be a finite float > 0 (the hinge SVM needs it); got {l2!r}."
        )
    n = len(X)
    Z = X * np.where(y > 0, 1.0, -1.0)[:, None]
    keep = np.ones(n, bool) if keep is None else np.asarray(keep, bool)
    ln = float(l2) * n
    beta = (
        np.zeros(n)
        if beta0 is None
        else np.clip(np.asarray(beta0, dtype=np.float64), 0.0, 1.0).copy()
    )
    beta[~keep] = 0.0
    w = Z.T @ beta / ln
    sq = np.maximum((Z * Z).sum(axis=1), 1e-300)
    rng = np.random.default_rng(seed)
    epochs, steps, dcd_tol = 0, 0, 1e-3
    while True:
        epochs += _dcd(Z, sq, ln, beta, w, keep, dcd_tol, max_epochs - epochs, rng)
        pol = _polish(Z, ln, w, beta, keep, tol)
        if pol is not None:
            beta_p, w_p, s = pol
            steps += s
            m = Z @ w_p
            kkt = float(_kkt_violation(m, beta_p, keep).max(initial=0.0))
            if kkt <= tol:
                beta, w = beta_p, w_p
                break
        if epochs >= max_epochs or dcd_tol < 1e-13:
            kkt = float(_kkt_violation(Z @ w, beta, keep).max(initial=0.0))
            raise SolverError(
                f"fit_hinge_svm: no certified optimum after {epochs} coordinate-descent passes "
                f"(KKT violation {kkt:.1e} > tol={tol:g}). Raise max_epochs or tol."
            )
        dcd_tol *= 0.01
    m = Z @ w
    ww = float(w @ w)
    primal = 0.5 * l2 * ww + float(np.maximum(1.0 - m[keep], 0.0).sum()) / n
    dual = float(beta.sum()) / n - 0.5 * l2 * ww
    return HingeSVM(
        w=w,
        beta=beta,
        primal=primal,
        dual=dual,
        gap=primal - dual,
        kkt=kkt,
        n_margin=int(((beta > 0) & (beta < 1)).sum()),
        n_bound=int((beta >= 1).sum()),
        epochs=epochs,
        polish_steps=steps,
    )


# ── the losses used for influence ─────────────────────────────────────────────────────
@dataclass(frozen=True)
class HingeZeroAtKink:
    """``upweight.hinge`` with its derivative set to 0 at the kink (Koh & Liang 2017, §4.3).

    Exactly on the margin (|1 − y·s| ≤ ``tol``, i.e. within round-off of the kink for an exactly
    solved SVM), the value is kept but the gradient is 0; elsewhere this is ``upweight.hinge``,
    whose second derivative is 0, so H = l2·I.
    """

    tol: float = 1e-9

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = hinge(output, target)
        sign = torch.where(target.reshape(-1) > 0, 1.0, -1.0).to(output.dtype)
        gap = 1.0 - sign * output.reshape(output.shape[0], -1)[:, 0]
        return torch.where(gap.abs() <= self.tol, value.detach(), value)


def hinge_curves(s: np.ndarray, ts: Sequence[float]) -> dict[str, list[float]]:
    """Hinge(s) and SmoothHinge(s, t) for each t, from the library's losses (paper Fig. 3a).

    s is the margin y·wᵀx; the values use label +1 and score s.
    """
    out = torch.as_tensor(np.asarray(s, dtype=np.float64))
    ones = torch.ones(len(out), dtype=torch.long)
    curves = {"hinge": hinge(out, ones).tolist()}
    for t in ts:
        curves[f"{t:g}"] = SmoothHinge(float(t))(out, ones).tolist()
    return curves


# ── the experiment ────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Fig3Result:
    """Every number of the Fig. 3 reproduction (predictions and actual changes in the order of
    ``removed``)."""

    n_train: int
    l2: float
    ts: list[float]
    test_index: int
    test_index_requested: int | None
    test_label: int
    test_margin: float
    test_hinge_loss: float
    train_accuracy: float
    test_accuracy: float
    svm_primal: float
    svm_gap: float
    svm_kkt: float
    svm_n_margin: int
    svm_n_bound: int
    svm_seconds: float
    k: int
    removed: list[int]  # training positions, by |I_up,loss| of the raw hinge
    # hinge loss change of the test point after exact retraining
    actual: list[float]
    predicted: dict[str, list[float]]  # −I_up,loss/n per loss ("hinge", "0.001", …)
    pearson: dict[str, float]
    spearman: dict[str, float]
    slope: dict[str, float]  # least squares actual ≈ slope·predicted + b
    grad_norm: dict[str, float]  # ‖∇R‖ of each influence loss at the hinge weights
    loo_max_kkt: float  # the largest KKT violation of the 100 retrained SVMs
    loo_max_gap: float  # … and the largest duality gap
    loo_max_rel_gap: float
    loo_seconds: float
    influence_seconds: float
    curves_s: list[float]
    curves: dict[str, list[float]]
    config: Fig3Config  # the settings of the run

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything; ``settings`` is the run's ``Fig3Config``."""
        d = asdict(self)
        d["settings"] = d.pop("config")
        return d


def _agreement(pred: np.ndarray, act: np.ndarray) -> tuple[float, float, float]:
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(act) == 0:
        return float("nan"), float("nan"), float("nan")
    return (
        float(scipy.stats.pearsonr(pred, act)[0]),
        float(scipy.stats.spearmanr(pred, act)[0]),
        float(scipy.stats.linregress(pred, act).slope),
    )


def run_fig3(
    data: SplitData, config: Fig3Config | None = None, *, progress: bool = True
) -> Fig3Result:
    """Run Fig. 3 (see the module docstring) and return every number.

    Args:
        data: MNIST 1 vs 7 (``load_mnist_1v7()`` or ``load_mnist(path, subset="1v7")``), labels ±1.
        config: the settings (default ``Fig3Config()``: the release code's); its ``test_index`` is
            used if the SVM misclassifies that point, else the misclassified test point of
            smallest margin.
        progress: progress bars.
    """
    c = config if config is not None else Fig3Config()
    l2, n_train, test_index, k, ts, tol = c.l2, c.n_train, c.test_index, c.k, c.ts, c.tol
    X, y, Xt, yt = binary_arrays(data, n_train, what="run_fig3")
    n = len(X)
    if k > n:
        raise InputError(f"run_fig3: k must be between 1 and n_train={n}; got {k}.")

    t0 = time.perf_counter()
    svm = fit_hinge_svm(X, y, l2, tol=tol)
    svm_seconds = time.perf_counter() - t0
    w = svm.w
    margins_test = yt * (Xt @ w)
    wrong = np.flatnonzero(margins_test < 0)
    if len(wrong) == 0:
        raise InputError(
            "run_fig3: the SVM classifies every test point correctly; the paper's test point is a "
            "wrongly classified one."
        )
    requested = test_index
    if test_index is None or not (0 <= test_index < len(Xt)) or margins_test[test_index] >= 0:
        if test_index is not None and not 0 <= test_index < len(Xt):
            raise InputError(f"run_fig3: test_index {test_index} is outside 0..{len(Xt) - 1}.")
        test_index = int(wrong[np.argmin(margins_test[wrong])])

    model = torch.nn.Linear(X.shape[1], 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w).reshape(1, -1))
    train = (torch.from_numpy(X), torch.from_numpy(y))
    test = (
        torch.from_numpy(Xt[test_index : test_index + 1]),
        torch.from_numpy(yt[test_index : test_index + 1]),
    )
    losses: list[tuple[str, Any]] = [("hinge", HingeZeroAtKink())] + [
        (f"{t:g}", SmoothHinge(float(t))) for t in ts
    ]
    t1 = time.perf_counter()
    removal: dict[str, np.ndarray] = {}
    grad_norm: dict[str, float] = {}
    for name, loss in losses:
        with warnings.catch_warnings():
            # the smooth hinge (and the raw hinge with derivative 0 at the kink) is not minimised at
            # the hinge weights: the paper computes influence there anyway; ‖∇R‖ is recorded instead
            warnings.simplefilter("ignore", NotAtMinimumWarning)
            inf = Influence(Objective(model, loss, l2=l2), solver=Direct(), progress=progress).fit(
                train
            )
        grad_norm[name] = inf.grad_norm_
        removal[name] = inf.removal_effect(test).values[0]
    influence_seconds = time.perf_counter() - t1

    chosen = np.argsort(-np.abs(removal["hinge"]), kind="stable")[:k]
    base = max(0.0, 1.0 - margins_test[test_index])
    actual = np.empty(len(chosen))
    kkts, gaps, rel = [], [], []
    t2 = time.perf_counter()
    for j, i in enumerate(
        _progress(
            chosen, desc="leave-one-out hinge SVM refits", total=len(chosen), enabled=progress
        )
    ):
        keep = np.ones(n, bool)
        keep[i] = False
        fit = fit_hinge_svm(X, y, l2, keep=keep, beta0=svm.beta, tol=tol)
        kkts.append(fit.kkt)
        gaps.append(fit.gap)
        rel.append(abs(fit.gap) / max(fit.primal, 1e-300))
        actual[j] = max(0.0, 1.0 - float(yt[test_index] * (Xt[test_index] @ fit.w))) - base
    loo_seconds = time.perf_counter() - t2

    predicted = {name: r[chosen] for name, r in removal.items()}
    stats = {name: _agreement(p, actual) for name, p in predicted.items()}
    s = np.round(np.linspace(0.8, 1.2, 401), 12)
    return Fig3Result(
        n_train=n,
        l2=float(l2),
        ts=[float(t) for t in ts],
        test_index=int(test_index),
        test_index_requested=requested,
        test_label=int(yt[test_index]),
        test_margin=float(margins_test[test_index]),
        test_hinge_loss=float(base),
        train_accuracy=float(np.mean(y * (X @ w) > 0)),
        test_accuracy=float(np.mean(margins_test > 0)),
        svm_primal=svm.primal,
        svm_gap=svm.gap,
        svm_kkt=svm.kkt,
        svm_n_margin=svm.n_margin,
        svm_n_bound=svm.n_bound,
        svm_seconds=svm_seconds,
        k=int(len(chosen)),
        removed=chosen.tolist(),
        actual=actual.tolist(),
        predicted={name: p.tolist() for name, p in predicted.items()},
        pearson={name: v[0] for name, v in stats.items()},
        spearman={name: v[1] for name, v in stats.items()},
        slope={name: v[2] for name, v in stats.items()},
        grad_norm=grad_norm,
        loo_max_kkt=float(max(kkts)),
        loo_max_gap=float(max(gaps)),
        loo_max_rel_gap=float(max(rel)),
        loo_seconds=loo_seconds,
        influence_seconds=influence_seconds,
        curves_s=s.tolist(),
        curves=hinge_curves(s, ts),
        config=c,
    )


__all__ = [
    "PAPER",
    "RELEASE_TEST_INDEX",
    "Fig3Result",
    "HingeSVM",
    "HingeZeroAtKink",
    "fit_hinge_svm",
    "hinge_curves",
    "run_fig3",
]
