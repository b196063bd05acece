"""§5.1 of Koh & Liang (2017), "understanding model behaviour": one test image, two models (Fig. 4).

The paper explains a test fish that two models both classify correctly: (a) Inception v3 with all
but the top layer frozen (= logistic regression on its bottleneck features) and (b) an RBF-kernel
SVM, on 1,800 dog/fish images. With the stand-in of ``paper.features``:

(a) the **feature model**: logistic regression (l2 = 0.001, no intercept) on the 64 features of a
    CNN trained on 10-class MNIST; θ = the top layer only (``Objective(model, "logistic",
    params="top")``), so H is the top layer's Hessian.
(b) the **RBF SVM**: K(x, x') = exp(−γ‖x − x'‖²) on raw pixels. As in the release code
    (``scripts/run_rbf_comparison.py``) the kernel machine is written as a linear model on the
    Cholesky features: K_train = L Lᵀ, φ(x_i) = row i of L for training points and
    φ(x) = L⁻¹ k(x) for any x (k(x)_j = K(x, x_j)); then s(x) = φ(x)ᵀw = Σ_j α_j K(x, x_j) with
    w = Lᵀα and ‖w‖² = αᵀKα, the RKHS norm — exactly the kernel SVM, linear in θ = w ∈ ℝⁿ, so
    influence is well-defined. Loss: SmoothHinge(·, t = 0.001) (paper §5.1), l2 = 0.001 (release
    code), trained to the minimum of the smooth objective (continuation in t, then Newton).
    γ = ``gamma_scale`` / median‖x_i − x_j‖² over training pairs (default 4: the release code's
    γ = 0.05/n on 299×299×3 images in [−1, 1] gives γ‖x − x'‖² of about 4 for typical pairs).

For the test image: −I_up,loss(z, z_test) of every training point against ‖z − z_test‖²₂ (Fig. 4,
bottom left), the two most helpful training images of each model (Fig. 4, bottom right), and
numbers for the paper's claims — the RBF SVM's influence falls off with pixel distance, the feature
model's does not (Spearman correlation of |I_up,loss| with distance, for this image and the median
over many test images both models get right); the RBF SVM's helpful points share the test label,
while the feature model's helpful points include the other class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.stats
import torch

from ..core import Data, Objective, SmoothHinge
from ..errors import InputError
from ..influence import Influence
from ..loo import refit
from ..solvers import Direct
from .config import CompareModelsConfig
from .features import FeatureSetup, check_setup

PAPER = {
    "n_train": 1800,
    "t": 0.001,
    "l2": 0.001,
    "rbf": "influence varies inversely with pixel distance; far images have almost no influence",
    "inception": (
        "much less correlated with pixel distance; helpful images of both classes (5th most helpful"
        " is a dog)"
    ),
}


@dataclass(frozen=True)
class RBFModel:
    """The RBF SVM as a linear model on Cholesky features (see the module docstring)."""

    gamma: float
    L: np.ndarray  # (n, n) lower Cholesky factor of K_train (+ jitter·I)
    x_train: np.ndarray
    model: torch.nn.Linear
    t: float
    l2: float
    grad_norm: float

    def features(self, x: np.ndarray) -> np.ndarray:
        """φ(x) = L⁻¹ k(x), shape (m, n)."""
        k = rbf_kernel(x, self.x_train, self.gamma)
        return scipy.linalg.solve_triangular(self.L, k.T, lower=True).T

    def scores(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(self.features(x))).squeeze(1).numpy()


def sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """‖a_i − b_j‖²₂, shape (len(a), len(b)), clipped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * sq_distances(a, b))


def fit_rbf_svm(
    x: np.ndarray,
    y: np.ndarray,
    *,
    gamma_scale: float = 4.0,
    t: float = 0.001,
    l2: float = 0.001,
    jitter: float = 1e-8,
) -> RBFModel:
    """Train the kernel SVM with SmoothHinge(t) to the minimum of R(w) = mean loss + (l2/2)‖w‖²
    (float64).

    Continuation: minimise for t' = 1, 0.1, 0.01, … down to ``t``, each warm-started at the last,
    then polish with Newton steps (``refit(..., newton=True)``): the smooth hinge at t = 0.001 is
    nearly piecewise linear, so a cold L-BFGS would crawl.
    """
    if gamma_scale <= 0 or t <= 0 or l2 <= 0:
        raise InputError(
            f"fit_rbf_svm: gamma_scale ({gamma_scale}), t ({t}) and l2 ({l2}) must be > 0."
        )
    x = np.asarray(x, np.float64)
    D = sq_distances(x, x)
    med = float(np.median(D[np.triu_indices(len(x), 1)]))
    gamma = gamma_scale / med
    K = np.exp(-gamma * D)
    L = np.linalg.cholesky(K + jitter * np.eye(len(x)))
    Phi, Y = torch.as_tensor(L), torch.as_tensor(np.asarray(y))
    data = Data.from_any((Phi, Y))
    model = torch.nn.Linear(len(x), 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.zero_()
    ts = [tt for tt in (1.0, 0.1, 0.01, 0.001, 1e-4) if tt > t] + [t]
    res = None
    for i, tt in enumerate(ts):
        last = i == len(ts) - 1
        res = refit(
            Objective(model, SmoothHinge(tt), l2=l2),
            data,
            gtol=1e-10 if last else 1e-6,
            maxiter=3000 if last else 500,
            newton=last,
        )
        with torch.no_grad():
            model.weight.copy_(res.params["weight"])
    assert res is not None
    return RBFModel(gamma, L, x, model, t, l2, res.grad_norm)


@dataclass(frozen=True)
class ModelExplanation:
    """One model's explanation of the test image."""

    name: str
    test_accuracy: float
    test_score: float  # s(x_test) (positive = the first digit)
    up_loss: list[float]  # I_up,loss(z_i, z_test) for all training points
    spearman_abs_vs_distance: float  # Spearman ρ(|I_up,loss|, ‖z − z_test‖²)
    # the same ρ over the 10% of training points with the largest |I_up,loss|
    spearman_influential: float
    # among points with −I_up,loss > 0: fraction with the other label
    helpful_other_label_fraction: float
    top10_helpful_other_label: int  # of the 10 most helpful, how many have the other label
    # rank (1 = most helpful) of the most helpful other-label point
    first_other_label_helpful_rank: int
    top_helpful: list[int]  # the 10 most helpful training positions
    # among the 100 nearest (pixels) same-label points: fraction helpful
    near_same_helpful: float
    # among the 100 nearest other-label points: fraction harmful
    near_other_harmful: float
    # share of Σ|I_up,loss| on the 10% of training points nearest in pixels
    mass_nearest_decile: float
    # the same ρ, median over ``n_tests`` test images both models get right
    median_spearman_over_tests: float
    median_mass_nearest_decile: float  # the same share, median over those test images
    # ρ over the 10% most influential, median over those test images
    median_spearman_influential: float
    grad_norm: float


@dataclass(frozen=True)
class CompareResult:
    digits: list[int]
    n_train: int
    n_test: int
    test_index: int
    test_label: int
    distances: list[float]  # ‖z − z_test‖²₂ for every training point
    train_labels: list[int]
    feature: ModelExplanation
    rbf: ModelExplanation
    rbf_gamma: float
    rbf_gamma_scale: float
    n_tests: int
    tests_used: list[int]
    cnn: dict[str, Any]
    config: CompareModelsConfig  # the settings of the run

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything; ``settings`` is the run's ``CompareModelsConfig``."""
        d = asdict(self)
        d["settings"] = d.pop("config")
        return d


def _rho_top(absu: np.ndarray, dist: np.ndarray) -> float:
    """Spearman ρ(|I_up,loss|, distance) over the 10% of points with the largest |I_up,loss|: the
    points that matter (beyond the SVM's margin the smooth hinge is flat, so most SVM influences are
    ≈ 0 whatever their distance, and their ties swamp a ρ over all points)."""
    top = np.argsort(-absu, kind="stable")[: max(3, len(absu) // 10)]
    return float(scipy.stats.spearmanr(absu[top], dist[top])[0])


def _explain(
    name: str,
    up: np.ndarray,
    up_many: np.ndarray,
    dist: np.ndarray,
    dist_many: np.ndarray,
    y: np.ndarray,
    y_test: int,
    acc: float,
    score: float,
    grad_norm: float,
) -> ModelExplanation:
    helpful = -up
    order = np.argsort(-helpful, kind="stable")
    other = y != y_test
    hp = helpful > 0
    ranks_other = np.flatnonzero(other[order])
    same_idx = np.flatnonzero(~other)
    other_idx = np.flatnonzero(other)
    near_same = same_idx[np.argsort(dist[same_idx], kind="stable")[:100]]
    near_other = other_idx[np.argsort(dist[other_idx], kind="stable")[:100]]
    absu = np.abs(up)
    rho_many = [scipy.stats.spearmanr(np.abs(u), d)[0] for u, d in zip(up_many, dist_many)]
    k10 = max(1, len(dist) // 10)
    mass_many = [
        np.abs(u)[np.argsort(d, kind="stable")[:k10]].sum() / np.abs(u).sum()
        for u, d in zip(up_many, dist_many)
    ]
    return ModelExplanation(
        name=name,
        test_accuracy=acc,
        test_score=score,
        up_loss=up.tolist(),
        spearman_abs_vs_distance=float(scipy.stats.spearmanr(absu, dist)[0]),
        spearman_influential=_rho_top(absu, dist),
        helpful_other_label_fraction=float(other[hp].mean()) if hp.any() else float("nan"),
        top10_helpful_other_label=int(other[order[:10]].sum()),
        first_other_label_helpful_rank=int(ranks_other[0]) + 1 if len(ranks_other) else -1,
        top_helpful=order[:10].tolist(),
        near_same_helpful=float((helpful[near_same] > 0).mean()),
        near_other_harmful=float((helpful[near_other] < 0).mean()),
        mass_nearest_decile=float(
            absu[np.argsort(dist, kind="stable")[: max(1, len(dist) // 10)]].sum() / absu.sum()
        ),
        median_spearman_over_tests=float(np.median(rho_many)),
        median_mass_nearest_decile=float(np.median(mass_many)),
        median_spearman_influential=float(
            np.median([_rho_top(np.abs(u), d) for u, d in zip(up_many, dist_many)])
        ),
        grad_norm=grad_norm,
    )


def run_compare_models(
    setup: FeatureSetup, config: CompareModelsConfig | None = None, *, progress: bool = True
) -> CompareResult:
    """Run §5.1 (see the module docstring) and return every number.

    Args:
        setup: ``features.build_feature_model(data, config)`` (the task, the CNN and the feature
            model θ̂), built with ``config``'s ``FeatureConfig`` settings.
        config: the settings (default ``CompareModelsConfig()``: the paper's); its ``test_index``
            (default the first test image both models classify correctly inside the SVM's margin)
            is a position in the task's test set.
        progress: progress bars.
    """
    c = config if config is not None else CompareModelsConfig()
    check_setup(setup, c, "run_compare_models")
    test_index, gamma_scale, t, rbf_l2 = c.test_index, c.gamma_scale, c.t, c.svm_l2
    n_tests = c.n_tests
    task = setup.task
    X, y, Xt, yt = task.x_train, task.y_train, task.x_test, task.y_test
    rbf = fit_rbf_svm(X, y, gamma_scale=gamma_scale, t=t, l2=rbf_l2)
    s_feat = setup.test_scores()
    s_rbf = rbf.scores(Xt)
    # correct under both models, and inside the SVM's margin (0 < y·s < 1): beyond it the smooth
    # hinge at t = 0.001 is flat (its gradient ≈ exp(−(y·s − 1)/t)), so every I_up,loss of the SVM
    # is ≈ 0
    both = np.flatnonzero((np.sign(s_feat) == yt) & (yt * s_rbf > 0) & (yt * s_rbf < 1))
    if len(both) == 0:
        raise InputError(
            "run_compare_models: no test image is classified correctly by both models inside the "
            "SVM's margin."
        )
    if test_index is None:
        test_index = int(both[0])
    elif not 0 <= test_index < len(yt):
        raise InputError(
            f"run_compare_models: test_index {test_index} is outside 0..{len(yt) - 1}."
        )
    elif test_index not in set(both.tolist()):
        raise InputError(
            f"run_compare_models: test image {test_index} is misclassified by at least one model"
            f" (scores: feature {s_feat[test_index]:+.3f}, RBF {s_rbf[test_index]:+.3f}, label"
            f" {yt[test_index]:+d}) or lies outside the SVM's margin, where the smooth hinge is"
            f" flat; pick one both get right within the margin, e.g. {int(both[0])}."
        )
    tests = [test_index] + [int(i) for i in both if i != test_index][: max(n_tests - 1, 0)]

    # (a) feature model: θ = top layer of CNN + top, H over the top layer only
    feat_obj = Objective(setup.model, "logistic", l2=setup.l2, params="top")
    inf_f = Influence(feat_obj, solver=Direct(), progress=progress, grad_tol=1e-6).fit(
        (torch.as_tensor(X), torch.as_tensor(y))
    )
    up_f = inf_f.up_loss((torch.as_tensor(Xt[tests]), torch.as_tensor(yt[tests]))).values
    # (b) RBF SVM on the Cholesky features, SmoothHinge(t)
    rbf_obj = Objective(rbf.model, SmoothHinge(t), l2=rbf_l2)
    inf_r = Influence(rbf_obj, solver=Direct(), progress=progress, grad_tol=1e-6).fit(
        (torch.as_tensor(rbf.L), torch.as_tensor(y))
    )
    up_r = inf_r.up_loss(
        (torch.as_tensor(rbf.features(Xt[tests])), torch.as_tensor(yt[tests]))
    ).values

    dist_many = sq_distances(Xt[tests], X)
    dist = dist_many[0]
    yl = int(yt[test_index])
    acc_f = float((np.sign(s_feat) == yt).mean())
    acc_r = float((np.sign(s_rbf) == yt).mean())
    fe = _explain(
        "feature",
        up_f[0],
        up_f,
        dist,
        dist_many,
        y,
        yl,
        acc_f,
        float(s_feat[test_index]),
        setup.grad_norm,
    )
    rb = _explain(
        "rbf", up_r[0], up_r, dist, dist_many, y, yl, acc_r, float(s_rbf[test_index]), rbf.grad_norm
    )
    return CompareResult(
        digits=list(task.digits),
        n_train=len(y),
        n_test=len(yt),
        test_index=int(test_index),
        test_label=yl,
        distances=dist.tolist(),
        train_labels=y.tolist(),
        feature=fe,
        rbf=rb,
        rbf_gamma=rbf.gamma,
        rbf_gamma_scale=float(gamma_scale),
        n_tests=len(tests),
        tests_used=tests,
        cnn=asdict(setup.cnn),
        config=c,
    )


__all__ = [
    "PAPER",
    "CompareResult",
    "ModelExplanation",
    "RBFModel",
    "fit_rbf_svm",
    "rbf_kernel",
    "run_compare_models",
    "sq_distances",
]
