"""``from_sklearn``: a fitted scikit-learn linear model as an ``upweight.Objective``.

Every supported estimator minimises a sum (SGDClassifier: a mean) of per-sample losses plus an
L2 term; dividing that objective by a constant turns it into upweight's

    R(θ) = (1/n) Σᵢ L(zᵢ, θ) + (l2/2)‖θ‖²,

so the estimator's ``coef_`` / ``intercept_`` are θ̂ = argmin R and the influence functions of
Koh & Liang (2017) apply unchanged. The mappings (n = number of training points, s = score,
y = ±1 for binary losses):

    estimator — its objective                                upweight loss L                   l2
    intercept ───────────────────────────────────────────────────────
    ────────────────────────────────  ────────  ─────────────── LogisticRegression, 2 classes
    logistic log(1 + e^(−y·s)),       1/(C·n)   unpenalised ¹
        ½‖w‖² + C·Σ log(1 + e^(−yᵢsᵢ))                        y = +1 for classes_[1]
    LogisticRegression, K > 2 (multinomial)                   cross_entropy −log softmax(s)[y]
    1/(C·n)   unpenalised ¹
        ½‖W‖² + C·Σ −log softmax(sᵢ)[yᵢ]                      (θ in sum-zero coordinates ²)
    LogisticRegression(C=np.inf) / penalty=None               as above                          0
    unpenalised LinearSVC(loss="squared_hinge")                           squared_hinge max(0, 1 −
    y·s)²    1/(C·n)   penalised ³
        ½‖[w, b/s_int]‖² + C·Σ max(0, 1 − yᵢsᵢ)²
    LinearSVC(loss="hinge")                                   SmoothHinge(t) ≈ max(0, 1 − y·s)
    1/(C·n)   penalised ³ SGDClassifier(loss=hinge | squared_hinge | log_loss)      SmoothHinge(t) |
    squared_hinge |  α         unpenalised
        (1/n)·Σ loss + α/2·‖w‖²                               logistic
    Ridge — ‖y − Xw − b‖² + α‖w‖²                             squared ½‖s − y‖²                 α/n
    unpenalised LinearRegression — ‖y − Xw − b‖²                          squared ½‖s − y‖²
    0         unpenalised

    ¹ solver="liblinear" penalises it as LinearSVC does (³).
    ² softmax ignores a constant added to every class score, so with an unpenalised intercept the
      K-class parametrisation has a singular Hessian; θ holds K − 1 sum-zero coordinates instead.
    ³ liblinear appends a constant feature s_int = intercept_scaling and penalises its weight:
      θ holds b = intercept_/s_int and the L2 term covers it.
    Multi-class LinearSVC / SGDClassifier are one-vs-rest: L is the sum of the K binary losses.

(Dividing ½‖w‖² + C Σ L by C·n gives (1/n) Σ L + (1/(C·n))/2 ‖w‖²; dividing Ridge's objective by
2n gives (1/n) Σ ½r² + (α/n)/2 ‖w‖².) A ``Pipeline`` is mapped through its last step; the steps
before it are a fixed feature map (their own dependence on the training data is ignored).

Removing a training point in upweight keeps n and l2 fixed (the paper's ε = −1/n). For every
estimator above except ``SGDClassifier`` this is exactly what refitting the scikit-learn
estimator on the n − 1 remaining points does, because C (or α) multiplies a *sum* of losses.
``SGDClassifier`` averages its losses, so its refit on n − 1 points also weakens the penalty by
(n − 1)/n: to first order the actual change then differs from ``removal_effect`` by one shift
common to every training point, (α/n)·∇f(z_test)ᵀH⁻¹θ̂_w with θ̂_w the penalised part of θ̂
(plus SGD's own optimisation noise).

Non-smooth fits: for the hinge loss, θ̂ is the estimator's hinge solution while influence is
computed with ``SmoothHinge(t)`` at those same weights (Koh & Liang 2017, §4.3). ∇R of the smoothed
objective is then not exactly 0 (support vectors on the margin sit at the hinge), so
``Influence.fit`` may warn that θ̂ is not a minimum; the scores are an approximation whose quality
the paper measured at Pearson's R ≈ 0.95 against hinge-loss retraining. The squared hinge is
differentiable once; its generalised Hessian (piecewise constant) is the one liblinear's own
Newton solver uses, and the mapping is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.data import Data
from ..core.grads import risk_grad
from ..core.losses import SmoothHinge, _margin, cross_entropy, logistic, squared
from ..core.objective import Objective
from ..core.params import Params
from ..errors import InputError, NotFittedError, ShapeError, UnsupportedModelError

__all__ = ["LinearScores", "OneVsRest", "SklearnProblem", "from_sklearn", "squared_hinge"]

_SUPPORTED = (
    "LogisticRegression, LinearSVC, SGDClassifier (hinge, squared_hinge, log_loss), Ridge,"
    " LinearRegression, or a Pipeline whose last step is one of these"
)


# ── losses the core does not have ─────────────────────────────────────────────────────
def squared_hinge(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """max(0, 1 − y·s)² per sample (LinearSVC's default loss); labels > 0 count as +1, others −1.

    Differentiable once; its second derivative is 2 where y·s < 1 and 0 where y·s > 1 — the
    generalised Hessian that liblinear's Newton method uses.
    """
    return F.relu(1.0 - _margin(output, target)) ** 2


@dataclass(frozen=True)
class OneVsRest:
    """Σₖ L_bin(sₖ, ±1) with +1 for the true class k = y: K binary problems in one sum.

    scikit-learn fits one-vs-rest classifiers independently, each minimising ½‖wₖ‖² + C Σᵢ L_bin.
    Their sum over k is one objective whose minimiser is the same K weight vectors, with the
    same per-class C, so it maps to upweight with the same l2.

    Args:
        binary: a per-sample binary loss ``L(score, target)`` (labels > 0 are +1).
        n_classes: K, the number of columns of the model output.

    Examples:
        >>> import torch
        >>> from upweight.core.losses import logistic
        >>> loss = OneVsRest(logistic, 3)  # all scores 0: 3 · log 2 per sample
        >>> [round(v, 4) for v in loss(torch.zeros(2, 3), torch.tensor([0, 2])).tolist()]
        [2.0794, 2.0794]
    """

    binary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    n_classes: int

    @property
    def __name__(self) -> str:  # read by Objective.loss_name
        return f"one_vs_rest({getattr(self.binary, '__name__', type(self.binary).__name__)})"

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = output.reshape(output.shape[0], -1)
        if s.shape[1] != self.n_classes:
            raise ValueError(
                f"OneVsRest needs {self.n_classes} scores per sample; got model output of shape"
                f" {tuple(output.shape)}."
            )
        t = target.reshape(-1)
        total = self.binary(s[:, 0], (t == 0).to(torch.long))
        for k in range(1, self.n_classes):
            total = total + self.binary(s[:, k], (t == k).to(torch.long))
        return total


# ── the linear score model ────────────────────────────────────────────────────────────
class LinearScores(nn.Module):
    """Scores s(x) = x·(B·W)ᵀ + s_int·(B·b): ``nn.Linear`` with two optional reparametrisations.

    - ``basis`` B (K, K−1), orthonormal columns spanning the sum-zero vectors: θ holds K − 1
      class coordinates instead of K. Softmax is invariant to adding one constant to every class
      score, so with an unpenalised intercept (or no penalty) the K-class parametrisation has a
      singular Hessian; in sum-zero coordinates it does not, and ‖B·W‖ = ‖W‖ keeps the L2 term.
    - ``intercept_scaling`` s_int: liblinear appends a constant feature s_int and penalises its
      weight b like any other, so the intercept is s_int·b and the penalty ½b² =
      ½(intercept/s_int)².

    ``coef`` and ``intercept`` give back the scikit-learn-shaped values.

    Args:
        weight: W, shape (K or K−1, d).
        bias: b, shape (K or K−1,), or ``None`` for no intercept.
        basis: B, shape (K, K−1), or ``None``.
        intercept_scaling: s_int.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        basis: torch.Tensor | None = None,
        intercept_scaling: float = 1.0,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.clone())
        self.register_buffer("basis", None if basis is None else basis.clone())
        self.intercept_scaling = float(intercept_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight if self.basis is None else self.basis @ self.weight
        out = x @ W.T
        if self.bias is not None:
            b = self.bias if self.basis is None else self.basis @ self.bias
            out = out + self.intercept_scaling * b
        return out

    @property
    def coef(self) -> np.ndarray:
        """scikit-learn's ``coef_``: B·W, shape (K, d)."""
        with torch.no_grad():
            W = self.weight if self.basis is None else self.basis @ self.weight
        return W.detach().cpu().numpy()

    @property
    def intercept(self) -> np.ndarray:
        """scikit-learn's ``intercept_``: s_int·B·b, shape (K,) (zeros without an intercept)."""
        if self.bias is None:
            return np.zeros(self.coef.shape[0])
        with torch.no_grad():
            b = self.bias if self.basis is None else self.basis @ self.bias
        return (self.intercept_scaling * b).detach().cpu().numpy()


def _sum_zero_basis(K: int) -> np.ndarray:
    """Orthonormal basis (K, K−1) of {v ∈ ℝᴷ : Σ v = 0}."""
    centred = np.eye(K) - 1.0 / K
    q, _ = np.linalg.qr(centred[:, : K - 1])
    return q


# ── the mapping ───────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class _Mapping:
    title: str
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loss_text: str
    l2: float
    l2_text: str
    fit_intercept: bool
    intercept_penalised: bool
    intercept_scaling: float
    sum_zero: bool
    n_out: int
    classes: np.ndarray | None
    notes: tuple[str, ...] = ()
    smoothed: bool = False  # the loss is a smooth stand-in (SmoothHinge): ∇R(θ̂) ≠ 0 is expected

    @property
    def intercept_text(self) -> str:
        if not self.fit_intercept:
            return "none (fit_intercept=False)"
        if self.intercept_penalised:
            return (
                "penalised like a weight, as liblinear does: θ holds b ="
                f" intercept/{self.intercept_scaling:g} (intercept_scaling), so the L2 term is"
                f" ½(intercept/{self.intercept_scaling:g})²"
            )
        return "unpenalised (Objective(l2_exclude=['bias']))"


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _classes(est: Any) -> np.ndarray:
    return np.asarray(est.classes_)


def _no_class_weight(est: Any) -> None:
    cw = getattr(est, "class_weight", None)
    if cw is not None:
        raise UnsupportedModelError(
            f"{type(est).__name__}(class_weight={cw!r}) weights each class's losses; from_sklearn"
            " maps unweighted objectives only. Refit with class_weight=None, or build an"
            " upweight.Objective with a weighted loss yourself."
        )


def _logreg_penalty(est: Any) -> str | None:
    """The effective penalty, read as scikit-learn does (``penalty`` is deprecated from 1.8 in
    favour of l1_ratio/C)."""
    penalty = getattr(est, "penalty", "l2")
    l1_ratio = getattr(est, "l1_ratio", None)
    if penalty == "deprecated":
        if l1_ratio is None or l1_ratio == 0:
            penalty = "l2"
        elif l1_ratio == 1:
            penalty = "l1"
        else:
            penalty = "elasticnet"
    elif penalty == "elasticnet" and l1_ratio == 0:
        penalty = "l2"
    if penalty == "l2" and math.isinf(float(est.C)):
        penalty = None
    return penalty


def _label_repr(v: Any) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def _binary_or_ovr(binary: Callable, binary_text: str, classes: np.ndarray) -> tuple[Any, str, int]:
    K = len(classes)
    if K == 2:
        return (
            binary,
            (
                f"{binary_text}, y = +1 for class {_label_repr(classes[1])}, −1 for class"
                f" {_label_repr(classes[0])}"
            ),
            1,
        )
    return OneVsRest(binary, K), f"one-vs-rest sum over {K} classes of {binary_text}", K


def _map_logistic_regression(est: Any, n: int) -> _Mapping:
    _no_class_weight(est)
    penalty = _logreg_penalty(est)
    if penalty not in ("l2", None):
        raise UnsupportedModelError(
            f"LogisticRegression with a {penalty!r} penalty"
            f" (l1_ratio={getattr(est, 'l1_ratio', None)!r}) is not twice differentiable, so"
            " influence functions do not apply. Refit with an L2 penalty (l1_ratio=0, or"
            " penalty='l2' on scikit-learn < 1.8) or none (C=np.inf)."
        )
    C = float(est.C)
    classes = _classes(est)
    K = len(classes)
    liblinear = est.solver == "liblinear"
    l2, l2_text = (
        (0.0, "0 (no penalty)")
        if penalty is None
        else (1.0 / (C * n), f"1/(C·n) = 1/({_fmt(C)}·{n})")
    )
    multi_class = getattr(est, "multi_class", "deprecated")
    sum_zero = False
    if K == 2:
        if multi_class == "multinomial":
            raise UnsupportedModelError(
                "LogisticRegression(multi_class='multinomial') on 2 classes (scikit-learn < 1.8)"
                " stores a symmetric 2-class softmax in one coef_ row. Refit with"
                " multi_class='auto' (binary logistic) and map that."
            )
        loss, loss_text, n_out = _binary_or_ovr(logistic, "logistic log(1 + exp(−y·s))", classes)
    elif multi_class == "ovr" or liblinear:
        loss, loss_text, n_out = _binary_or_ovr(logistic, "logistic log(1 + exp(−y·s))", classes)
    else:
        loss, n_out, sum_zero = cross_entropy, K, True
        loss_text = (
            f"cross_entropy −log softmax(s)[y] over {K} classes, y = position in classes_ (θ in"
            " sum-zero class coordinates)"
        )
    notes = []
    if penalty is None:
        notes.append(
            "No penalty: H is singular when the classes are separable or features collinear; add"
            " damping if Direct fails."
        )
    return _Mapping(
        title=f"LogisticRegression(C={_fmt(C)}, solver={est.solver!r})"
        + (", penalty=None" if penalty is None else ""),
        loss=loss,
        loss_text=loss_text,
        l2=l2,
        l2_text=l2_text + "; scikit-learn minimises ½‖w‖² + C·Σ loss",
        fit_intercept=bool(est.fit_intercept),
        intercept_penalised=liblinear and bool(est.fit_intercept),
        intercept_scaling=float(est.intercept_scaling) if liblinear else 1.0,
        sum_zero=sum_zero,
        n_out=n_out,
        classes=classes,
        notes=tuple(notes),
    )


def _map_linear_svc(est: Any, n: int, t: float) -> _Mapping:
    _no_class_weight(est)
    if est.penalty != "l2":
        raise UnsupportedModelError(
            f"LinearSVC(penalty={est.penalty!r}) is not twice differentiable, so influence"
            " functions do not apply. Refit with penalty='l2'."
        )
    if est.multi_class != "ovr":
        raise UnsupportedModelError(
            f"LinearSVC(multi_class={est.multi_class!r}) optimises one joint objective that"
            " from_sklearn does not map. Refit with multi_class='ovr'."
        )
    C = float(est.C)
    classes = _classes(est)
    notes: list[str] = []
    if est.loss == "hinge":
        binary, text = SmoothHinge(t), f"SmoothHinge(t={t:g}) t·log(1 + exp((1 − y·s)/t)) ≈ hinge"
        notes.append(
            "Hinge loss: θ̂ is LinearSVC's hinge solution; influence uses SmoothHinge(t) at those"
            " weights (Koh & Liang 2017, §4.3), so ‖∇R(θ̂)‖ is not 0 and Influence.fit may warn."
            " The scores approximate hinge-loss retraining."
        )
    else:
        binary, text = squared_hinge, "squared_hinge max(0, 1 − y·s)²"
    loss, loss_text, n_out = _binary_or_ovr(binary, text, classes)
    return _Mapping(
        title=f"LinearSVC(C={_fmt(C)}, loss={est.loss!r})",
        loss=loss,
        loss_text=loss_text,
        l2=1.0 / (C * n),
        l2_text=f"1/(C·n) = 1/({_fmt(C)}·{n}); liblinear minimises ½‖[w, b]‖² + C·Σ loss",
        fit_intercept=bool(est.fit_intercept),
        intercept_penalised=bool(est.fit_intercept),
        intercept_scaling=float(est.intercept_scaling),
        sum_zero=False,
        n_out=n_out,
        classes=classes,
        notes=tuple(notes),
        smoothed=est.loss == "hinge",
    )


def _map_sgd_classifier(est: Any, n: int, t: float) -> _Mapping:
    _no_class_weight(est)
    binaries = {
        "hinge": (SmoothHinge(t), f"SmoothHinge(t={t:g}) t·log(1 + exp((1 − y·s)/t)) ≈ hinge"),
        "squared_hinge": (squared_hinge, "squared_hinge max(0, 1 − y·s)²"),
        "log_loss": (logistic, "logistic log(1 + exp(−y·s))"),
    }
    if est.loss not in binaries:
        raise UnsupportedModelError(
            f"SGDClassifier(loss={est.loss!r}) is not supported; from_sklearn maps loss='hinge'"
            " (through SmoothHinge), 'squared_hinge' and 'log_loss'. Refit with one of these."
        )
    penalty = est.penalty
    if penalty == "elasticnet" and est.l1_ratio == 0:
        penalty = "l2"
    if penalty not in ("l2", None):
        raise UnsupportedModelError(
            f"SGDClassifier(penalty={penalty!r}) is not twice differentiable, so influence"
            " functions do not apply. Refit with penalty='l2' (or None)."
        )
    alpha = float(est.alpha)
    classes = _classes(est)
    loss, loss_text, n_out = _binary_or_ovr(*binaries[est.loss], classes)
    l2, l2_text = (alpha, f"α = {_fmt(alpha)}") if penalty == "l2" else (0.0, "0 (no penalty)")
    notes = [
        (
            "SGD stops at an approximate minimiser: check grad_norm (‖∇R(θ̂)‖) and fit with a small"
            " tol and many epochs."
        ),
        (
            "SGDClassifier averages its losses, so refitting it on n − 1 points also scales the"
            " penalty by (n − 1)/n: its actual change = removal_effect + a shift common to all"
            " training points (plus SGD's own noise)."
        ),
    ]
    if est.loss == "hinge":
        notes.insert(
            0,
            "Hinge loss: influence uses SmoothHinge(t) at SGD's weights (Koh & Liang 2017, §4.3)."
            " SGD's weights are not the exact hinge minimiser, so few points sit exactly on the"
            " margin and t = 0.001 overstates the magnitudes (the ranking stays right);"
            " smooth_hinge_t = 0.01–0.1 matched SGD refits better in our tests.",
        )
    return _Mapping(
        title=f"SGDClassifier(loss={est.loss!r}, alpha={_fmt(alpha)})",
        loss=loss,
        loss_text=loss_text,
        l2=l2,
        l2_text=l2_text + "; scikit-learn minimises (1/n)·Σ loss + α/2·‖w‖²",
        fit_intercept=bool(est.fit_intercept),
        intercept_penalised=False,
        intercept_scaling=1.0,
        sum_zero=False,
        n_out=n_out,
        classes=classes,
        notes=tuple(notes),
        smoothed=est.loss == "hinge",
    )


def _regression_outputs(est: Any) -> int:
    coef = np.asarray(est.coef_)
    return 1 if coef.ndim == 1 else coef.shape[0]


def _map_ridge(est: Any, n: int) -> _Mapping:
    if getattr(est, "positive", False):
        raise UnsupportedModelError(
            "Ridge(positive=True) is a constrained fit, not a minimum of R. Refit with"
            " positive=False."
        )
    alpha = np.asarray(est.alpha, dtype=np.float64).ravel()
    if alpha.size > 1 and not np.all(alpha == alpha[0]):
        raise UnsupportedModelError(
            f"Ridge with one alpha per target ({alpha.tolist()}) has a different L2 strength per"
            " output; upweight's Objective has one l2. Fit one Ridge per target and map each."
        )
    a = float(alpha[0])
    return _Mapping(
        title=f"Ridge(alpha={_fmt(a)})",
        loss=squared,
        loss_text="squared ½‖s − y‖²",
        l2=a / n,
        l2_text=f"α/n = {_fmt(a)}/{n}; scikit-learn minimises ‖y − Xw − b‖² + α‖w‖²",
        fit_intercept=bool(est.fit_intercept),
        intercept_penalised=False,
        intercept_scaling=1.0,
        sum_zero=False,
        n_out=_regression_outputs(est),
        classes=None,
    )


def _map_linear_regression(est: Any, n: int) -> _Mapping:
    if getattr(est, "positive", False):
        raise UnsupportedModelError(
            "LinearRegression(positive=True) is a constrained fit, not a minimum of R. Refit with"
            " positive=False."
        )
    return _Mapping(
        title="LinearRegression()",
        loss=squared,
        loss_text="squared ½‖s − y‖²",
        l2=0.0,
        l2_text="0; scikit-learn minimises ‖y − Xw − b‖²",
        fit_intercept=bool(est.fit_intercept),
        intercept_penalised=False,
        intercept_scaling=1.0,
        sum_zero=False,
        n_out=_regression_outputs(est),
        classes=None,
        notes=(
            (
                "No penalty: H = XᵀX/n (with the intercept column) must be non-singular — more"
                " points than features, no collinear features."
            ),
        ),
    )


def _map(est: Any, n: int, t: float) -> _Mapping:
    from sklearn.linear_model import (
        LinearRegression,
        LogisticRegression,
        LogisticRegressionCV,
        Ridge,
        SGDClassifier,
    )
    from sklearn.svm import LinearSVC

    if isinstance(est, LogisticRegressionCV):
        raise UnsupportedModelError(
            "LogisticRegressionCV chooses C by cross-validation; map the final model instead: "
            "LogisticRegression(C=cv.C_[0], ...).fit(X, y), then from_sklearn on that."
        )
    if isinstance(est, LogisticRegression):
        return _map_logistic_regression(est, n)
    if isinstance(est, LinearSVC):
        return _map_linear_svc(est, n, t)
    if isinstance(est, SGDClassifier):
        return _map_sgd_classifier(est, n, t)
    if isinstance(est, Ridge):
        return _map_ridge(est, n)
    if isinstance(est, LinearRegression):
        return _map_linear_regression(est, n)
    raise UnsupportedModelError(
        f"from_sklearn does not support {type(est).__name__}. Supported: {_SUPPORTED}. For another"
        " model, write it as a torch.nn.Module and build an upweight.Objective(model, loss,"
        " l2=...) yourself."
    )


def _theta(est: Any, m: _Mapping) -> tuple[np.ndarray, np.ndarray | None]:
    """θ̂ in the parametrisation of ``LinearScores`` / ``nn.Linear``: (weight, bias or None)."""
    coef = np.asarray(est.coef_, dtype=np.float64)
    coef = coef.reshape(1, -1) if coef.ndim == 1 else coef
    if coef.shape[0] != m.n_out:
        raise UnsupportedModelError(
            f"{m.title}: coef_ has {coef.shape[0]} rows; expected {m.n_out} for this mapping."
        )
    bias = (
        np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64)).copy()
        if m.fit_intercept
        else None
    )
    if m.sum_zero:
        B = _sum_zero_basis(m.n_out)
        coef = B.T @ coef
        bias = None if bias is None else B.T @ bias
    if bias is not None and m.intercept_penalised:
        bias = bias / m.intercept_scaling
    return coef, bias


def _build_model(est: Any, m: _Mapping, dtype: torch.dtype) -> nn.Module:
    coef, bias = _theta(est, m)
    W = torch.as_tensor(coef, dtype=dtype)
    b = None if bias is None else torch.as_tensor(bias, dtype=dtype)
    if m.sum_zero or m.intercept_penalised:
        basis = torch.as_tensor(_sum_zero_basis(m.n_out), dtype=dtype) if m.sum_zero else None
        model: nn.Module = LinearScores(W, b, basis=basis, intercept_scaling=m.intercept_scaling)
    else:
        model = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=dtype)
        with torch.no_grad():
            model.weight.copy_(W)
            if b is not None:
                model.bias.copy_(b)
    return model.eval()


# ── data ──────────────────────────────────────────────────────────────────────────────
def _n_rows(a: Any, what: str) -> int:
    shape = getattr(a, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    try:
        return len(a)
    except TypeError as exc:
        raise InputError(
            f"{what} of type {type(a).__name__} has no length; pass an array with one row per"
            " point."
        ) from exc


def _features(prep: Any, X: Any, n_features: int | None, what: str) -> np.ndarray:
    what = f"{what} " if what else ""
    if prep is not None:
        try:
            X = prep.transform(X)
        except Exception as exc:  # noqa: BLE001 — re-raised with the step that failed
            raise InputError(
                f"The Pipeline's preprocessing failed on {what}X: {type(exc).__name__}: {exc}"
            ) from exc
    if hasattr(X, "toarray"):  # scipy.sparse
        X = X.toarray()
    try:
        Z = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{what}X cannot be read as float features ({exc}). Put its encoders in a Pipeline with"
            " the estimator."
        ) from exc
    if Z.ndim != 2:
        raise ShapeError(
            f"{what}X must be 2-D (n_samples, n_features) after preprocessing; got shape {Z.shape}."
        )
    if n_features is not None and Z.shape[1] != n_features:
        raise ShapeError(
            f"{what}X has {Z.shape[1]} features after preprocessing but the estimator was fitted on"
            f" {n_features}."
        )
    return Z


def _labels(y: Any, m: _Mapping, what: str) -> torch.Tensor:
    what = f"{what} " if what else ""
    arr = np.asarray(y)
    if m.classes is None:
        vals = arr.astype(np.float64)
        if m.n_out == 1 and vals.ndim == 2 and vals.shape[1] == 1:
            vals = vals[:, 0]
        if (
            (vals.ndim == 1 and m.n_out != 1)
            or (vals.ndim == 2 and vals.shape[1] != m.n_out)
            or vals.ndim > 2
        ):
            raise ShapeError(
                f"{what}y has shape {arr.shape} but the estimator predicts {m.n_out} target(s) per"
                " point."
            )
        return torch.as_tensor(vals)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ShapeError(f"{what}y must be 1-D class labels; got shape {arr.shape}.")
    classes = m.classes
    pos = np.searchsorted(classes, arr)
    ok = pos < len(classes)
    ok[ok] = classes[pos[ok]] == arr[ok]
    if not ok.all():
        bad = np.unique(arr[~ok])[:5].tolist()
        raise InputError(
            f"{what}y has labels {bad} that are not among the estimator's classes_"
            f" {classes.tolist()}."
        )
    return torch.as_tensor(pos.astype(np.int64))


def _check_fitted(est: Any) -> None:
    from sklearn.exceptions import NotFittedError as SkNotFitted
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(est)
    except SkNotFitted as exc:
        raise NotFittedError(
            f"This {type(est).__name__} is not fitted yet. Call estimator.fit(X, y) on the training"
            " data, then from_sklearn."
        ) from exc


# ── the result ────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True, repr=False)
class SklearnProblem:
    """A fitted scikit-learn model as an upweight problem: objective, encoded training data,
    mapping.

    Attributes:
        objective: ``Objective`` over a linear module (float64 by default) whose parameters are the
            estimator's (``nn.Linear``, or ``LinearScores`` for softmax / liblinear intercepts).
        train: ``(X_features, y_encoded)`` tensors for ``Influence.fit`` — features after the
            Pipeline's preprocessing, class labels as positions in ``classes_``.
        estimator: the estimator passed in (a Pipeline stays a Pipeline).
        final: the linear model itself (the Pipeline's last step).
        loss: the upweight loss, in words.
        l2: λ of R, and ``l2_formula`` how it follows from C / α.
        intercept: how the intercept is handled.
        grad_norm: ‖∇R(θ̂)‖ at the estimator's coefficients (≈ 0 when the estimator converged
            on these data and the mapping is exact).
        notes: caveats for this estimator.
    """

    objective: Objective
    train: tuple[torch.Tensor, torch.Tensor]
    estimator: Any
    final: Any
    loss: str
    l2: float
    l2_formula: str
    intercept: str
    grad_norm: float
    notes: tuple[str, ...]
    _mapping: _Mapping = field(repr=False, compare=False)
    _prep: Any = field(repr=False, compare=False)
    _dtype: torch.dtype = field(repr=False, compare=False)

    def transform(self, X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode test (or any) data as the objective sees it: preprocessing applied, labels mapped.

        Args:
            X: inputs as the estimator (or Pipeline) takes them.
            y: labels (classifiers: values from ``classes_``) or targets (regressors).

        Returns:
            ``(X_features, y_encoded)`` tensors, ready for ``Influence.up_loss`` and friends.
        """
        if _n_rows(X, "X") != _n_rows(y, "y"):
            raise ShapeError(
                f"X has {_n_rows(X, 'X')} rows but y has {_n_rows(y, 'y')}; they must have one"
                " entry per point."
            )
        Z = _features(self._prep, X, int(self.train[0].shape[1]), "")
        return torch.as_tensor(Z, dtype=self._dtype), _labels(y, self._mapping, "")

    def decode(self, y: torch.Tensor) -> np.ndarray:
        """Encoded labels back to the estimator's (``classes_[y]`` for classifiers)."""
        arr = y.detach().cpu().numpy()
        return arr if self._mapping.classes is None else self._mapping.classes[arr.astype(np.int64)]

    def params_of(self, estimator: Any) -> Params:
        """θ of another fitted estimator of the same kind (e.g. a refit), in this objective's
        parametrisation."""
        coef, bias = _theta(estimator, self._mapping)
        out = {"weight": torch.as_tensor(coef, dtype=self.objective.dtype)}
        if bias is not None:
            out["bias"] = torch.as_tensor(bias, dtype=self.objective.dtype)
        return {name: out[name] for name in self.objective.space.names}

    def sklearn_train_fn(
        self, objective: Objective, data: Data, init: Params | None = None
    ) -> Params:
        """Refit a clone of the scikit-learn estimator on ``data`` (features, encoded labels) and
        return its θ.

        The signature of ``leave_one_out(..., train_fn=)``: pass ``train_fn=prob.sklearn_train_fn``
        to compare influence with actual scikit-learn refits. The preprocessing stays fixed;
        ``objective`` and ``init`` are unused (scikit-learn starts from its own initialisation,
        so fit it with a tight ``tol``).
        """
        from sklearn.base import clone

        X = data.X.detach().cpu().numpy().astype(np.float64)
        est = clone(self.final).fit(X, self.decode(data.y))
        if self._mapping.classes is not None and not np.array_equal(
            _classes(est), self._mapping.classes
        ):
            raise InputError(
                f"The refit saw classes {_classes(est).tolist()}, not"
                f" {self._mapping.classes.tolist()}: a class lost all its points."
            )
        return self.params_of(est)

    def describe(self) -> str:
        """The mapping, in words and equations."""
        p, n = self.objective.p, len(self.train[0])
        lines = [
            f"{self._mapping.title} → R(θ) = (1/n)·Σ L + (l2/2)·‖θ‖², n = {n}, p = {p}",
            f"  loss       {self.loss}",
            f"  l2         {_fmt(self.l2)} = {self.l2_formula}",
            f"  intercept  {self.intercept}",
            f"  ‖∇R(θ̂)‖    {self.grad_norm:.2e}",
        ]
        if self._prep is not None:
            lines.append(
                f"  features   {len(self._prep.steps)} Pipeline step(s) before the model, treated"
                " as fixed"
            )
        lines += [f"  note       {note}" for note in self.notes]
        if self.grad_norm > 1e-4 and not self._mapping.smoothed:
            lines.append(
                "  warning    ‖∇R(θ̂)‖ is not ≈ 0: check the estimator was fitted on exactly these"
                " X, y (no sample_weight) with a tight tol (e.g. tol=1e-10, a large max_iter)."
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return (
            f"SklearnProblem({self._mapping.title}, n={len(self.train[0])}, p={self.objective.p},"
            f" l2={_fmt(self.l2)})"
        )


def from_sklearn(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    smooth_hinge_t: float = 0.001,
    dtype: torch.dtype = torch.float64,
) -> SklearnProblem:
    """Map a fitted scikit-learn linear model (or Pipeline ending in one) to an upweight problem.

    The estimator's objective, divided by a constant, is R(θ) = (1/n)Σ L(zᵢ, θ) + (l2/2)‖θ‖² with
    θ̂ = (coef_, intercept_); see the module docstring for the table. In short:

    - ``LogisticRegression``: ½‖w‖² + C Σ Lᵢ ↦ l2 = 1/(C·n); 2 classes → ``logistic`` on one
      score, K > 2 → ``cross_entropy`` (softmax); intercept unpenalised (liblinear: penalised as
      ½(b/intercept_scaling)²). ``penalty=None`` / ``C=inf`` ↦ l2 = 0.
    - ``LinearSVC``: ½‖[w, b/s]‖² + C Σ Lᵢ ↦ l2 = 1/(C·n), intercept penalised as liblinear does;
      ``squared_hinge`` exactly, ``hinge`` through ``SmoothHinge(smooth_hinge_t)``.
    - ``SGDClassifier`` (hinge / squared_hinge / log_loss): (1/n)Σ Lᵢ + α/2‖w‖² ↦ l2 = α.
    - ``Ridge``: ‖y − Xw − b‖² + α‖w‖² ↦ ``squared`` (½r²), l2 = α/n. ``LinearRegression``: l2 = 0.
    - multi-class LinearSVC / SGDClassifier: one-vs-rest, the sum of the K binary losses.

    Args:
        estimator: a fitted estimator, or a fitted ``Pipeline`` whose last step is one.
        X: the training inputs the estimator was fitted on (before the Pipeline's preprocessing).
        y: the training labels / targets it was fitted on (fitted without ``sample_weight``).
        smooth_hinge_t: t of ``SmoothHinge`` for hinge-loss models (Koh & Liang 2017, §4.3).
        dtype: dtype of the model and the data tensors.

    Returns:
        ``SklearnProblem`` with ``objective``, ``train``, ``transform(X, y)`` and ``describe()``.

    Raises:
        NotFittedError: the estimator is not fitted.
        UnsupportedModelError: an unsupported estimator, or an unsupported setting (L1 penalty,
            class_weight, …); the message names the fix.
        ShapeError: X and y lengths differ, or X has the wrong number of features.

    Examples:
        >>> import numpy as np, upweight as uw
        >>> from sklearn.linear_model import LogisticRegression
        >>> from upweight.adapters import from_sklearn
        >>> rng = np.random.default_rng(0); X = rng.normal(size=(60, 3))
        >>> y = (X[:, 0] + rng.normal(size=60) > 0).astype(int)
        >>> clf = LogisticRegression(C=10.0, tol=1e-10, max_iter=1000).fit(X, y)
        >>> prob = from_sklearn(clf, X, y)
        >>> prob.l2 == 1 / (10.0 * 60), prob.grad_norm < 1e-6
        (True, True)
        >>> inf = uw.Influence(prob.objective, solver=uw.Direct(), progress=False).fit(prob.train)
        >>> inf.up_loss(prob.transform(X[:2], y[:2])).values.shape
        (2, 60)
    """
    try:
        from sklearn.pipeline import Pipeline
    except ImportError as exc:  # pragma: no cover — scikit-learn is an optional dependency
        raise ImportError("from_sklearn needs scikit-learn: pip install scikit-learn") from exc
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            f"dtype must be a floating torch.dtype (torch.float64 recommended); got {dtype!r}."
        )
    if (
        not isinstance(smooth_hinge_t, (int, float))
        or isinstance(smooth_hinge_t, bool)
        or not smooth_hinge_t > 0
    ):
        raise InputError(
            f"smooth_hinge_t must be a float > 0 (e.g. 0.001); got {smooth_hinge_t!r}."
        )

    prep = None
    final = estimator
    if isinstance(estimator, Pipeline):
        final = estimator.steps[-1][1]
        if final is None or final == "passthrough":
            raise UnsupportedModelError(
                "The Pipeline's last step is 'passthrough'; it must be a supported estimator: "
                + _SUPPORTED
                + "."
            )
        prep = estimator[:-1] if len(estimator.steps) > 1 else None
    if not hasattr(final, "fit") or not hasattr(final, "get_params"):
        raise UnsupportedModelError(
            f"from_sklearn needs a scikit-learn estimator; got {type(final).__name__}. Supported:"
            f" {_SUPPORTED}."
        )
    _check_fitted(final)

    n, n_y = _n_rows(X, "X"), _n_rows(y, "y")
    if n != n_y:
        raise ShapeError(
            f"X has {n} rows but y has {n_y}; pass the training data the estimator was fitted on,"
            " one label per row."
        )
    mapping = _map(final, n, float(smooth_hinge_t))
    Z = _features(prep, X, getattr(final, "n_features_in_", None), "training")
    labels = _labels(y, mapping, "training")
    model = _build_model(final, mapping, dtype)
    l2_exclude = ["bias"] if mapping.fit_intercept and not mapping.intercept_penalised else []
    objective = Objective(model, mapping.loss, l2=mapping.l2, l2_exclude=l2_exclude)
    train = (torch.as_tensor(Z, dtype=dtype), labels)
    g = risk_grad(
        objective, objective.params, Data.from_any(train, what="training data").to(dtype), 4096
    )
    return SklearnProblem(
        objective=objective,
        train=train,
        estimator=estimator,
        final=final,
        loss=mapping.loss_text,
        l2=mapping.l2,
        l2_formula=mapping.l2_text,
        intercept=mapping.intercept_text,
        grad_norm=float(g.norm()),
        notes=mapping.notes,
        _mapping=mapping,
        _prep=prep,
        _dtype=dtype,
    )
