"""§2.3 of Koh & Liang (2017), Figure 1: the components of influence.

For binary logistic regression, p(y | x) = σ(y θᵀx) with y ∈ {−1, +1} and no bias, the paper
writes I_up,loss (Eq. 2) in closed form:

    I_up,loss(z, z_test) = −y_test·y · σ(−y_test θᵀx_test) · σ(−y θᵀx) · x_testᵀ H⁻¹ x,

    H = (1/n) Σᵢ σ(θᵀxᵢ)σ(−θᵀxᵢ) xᵢxᵢᵀ + l2·I.

Two factors set it apart from the (scaled) inner product x_testᵀx: the training loss term
σ(−y θᵀx), which gives badly fitted points more influence, and H⁻¹, the "resistance" of the
other training points. Figure 1 compares I_up,loss with the variants that drop one or both of
them, as the release code (``scripts/run_components_experiment.py``) does: "without the
training loss" replaces ∇θL(z) = −σ(−yθᵀx)·y·x by −y·x, "without H⁻¹" replaces s_test =
H⁻¹∇θL(z_test) by ∇θL(z_test) itself.

Setting (release code): MNIST 1 (+1) vs 7 (−1), 11,800 training images, logistic regression
without bias, l2 = 0.01 (weight decay 0.01 · ½‖θ‖²), test image 30 of the 1-vs-7 test set (a 7).
I_up,loss comes from ``upweight.Influence`` with the exact solver ``Direct``; the closed form
above is evaluated independently (explicit H in float64) as a check. Panel (b) shows the most
harmful training image with the test image's label (the release code shows the fifth most harmful).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from ..core import Data, Objective
from ..datasets._base import SplitData
from ..errors import InputError
from ..influence import Influence
from ..loo import refit
from ..solvers import Direct
from .config import Fig1Config

RELEASE_TEST_INDEX = 30  # the release code's test image (Fig1Config's default)
VARIANTS = ("no_train_loss", "no_hessian", "no_both")
VARIANT_LABELS = {
    "no_train_loss": "without the train-loss term σ(−yθᵀx)",
    "no_hessian": "without H⁻¹",
    "no_both": "without train loss and H⁻¹",
}
PAPER: dict[str, Any] = {
    "n_train": 11_800,
    "l2": 0.01,
    "bias": False,
    "test_index": RELEASE_TEST_INDEX,
    "test_digit": 7,
}


@dataclass(frozen=True)
class Fig1Result:
    """Every number of the Fig. 1 reproduction. Arrays over training points are in
    training order."""

    n_train: int
    l2: float
    grad_norm: float  # ‖∇R(θ̂)‖ at the refit minimum
    theta: list[float]  # θ̂ (784 weights, no bias)
    test_index: int
    test_label: int  # +1 = digit 1, −1 = digit 7
    test_prob_correct: float  # σ(y_test θᵀx_test)
    train_labels: list[int]
    up_loss: list[float]  # I_up,loss from upweight.Influence (Direct)
    closed_form: list[float]  # the paper's closed form, explicit float64 H
    closed_form_max_rel_err: float  # max |library − closed form| / max |closed form|
    variants: dict[str, list[float]]  # no_train_loss, no_hessian, no_both
    pearson: dict[str, float]  # of each variant with I_up,loss
    spearman: dict[str, float]
    top_k: int
    # of the k most harmful (largest I_up,loss), how many the variant's top k share
    top_harmful_overlap: dict[str, int]
    top_helpful_overlap: dict[str, int]  # … of the k most helpful (most negative)
    # training points with the test label and I > 0 ("full" and each variant)
    same_label_harmful: dict[str, int]
    n_same_label: int
    # the most harmful training image with the test image's label
    harmful_same_label_index: int
    harmful_same_label_up_loss: float
    # its rank among all training points by I_up,loss (1 = most harmful)
    harmful_same_label_rank: int
    harmful_same_label_variant_rank: dict[str, int]
    test_image: list[float]
    harmful_image: list[float]
    image_shape: list[int]
    config: Fig1Config  # the settings of the run

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything; ``settings`` is the run's ``Fig1Config``."""
        d = asdict(self)
        d["settings"] = d.pop("config")
        return d


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def closed_form_up_loss(
    X: np.ndarray, y: np.ndarray, theta: np.ndarray, l2: float, x_test: np.ndarray, y_test: int
) -> np.ndarray:
    """The paper's closed form of I_up,loss for binary logistic regression (§2.3), in float64 NumPy.

    −y_test·y·σ(−y_test θᵀx_test)·σ(−y θᵀx)·x_testᵀH⁻¹x for every training point, with the
    explicit H = (1/n)Σσ(θᵀxᵢ)σ(−θᵀxᵢ)xᵢxᵢᵀ + l2·I. Independent of upweight's autodiff.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.where(np.asarray(y) > 0, 1.0, -1.0)
    s = X @ theta
    d = _sigmoid(s) * _sigmoid(-s)
    H = (X * d[:, None]).T @ X / len(X) + l2 * np.eye(X.shape[1])
    u = np.linalg.solve(H, np.asarray(x_test, dtype=np.float64))
    return -y_test * y * _sigmoid(-y_test * float(theta @ x_test)) * _sigmoid(-y * s) * (X @ u)


def _overlap(a: np.ndarray, b: np.ndarray, k: int, largest: bool) -> int:
    sa = np.argsort(-a if largest else a, kind="stable")[:k]
    sb = np.argsort(-b if largest else b, kind="stable")[:k]
    return len(set(sa.tolist()) & set(sb.tolist()))


def binary_arrays(
    data: SplitData, n_train: int | None, *, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 features and ±1 labels (labels > 0 → +1) of a binary split, training set cut to its
    first ``n_train`` points (at least 10) when given."""
    X = np.asarray(data.x_train, dtype=np.float64)
    y = np.where(np.asarray(data.y_train) > 0, 1, -1).astype(np.int64)
    Xt = np.asarray(data.x_test, dtype=np.float64)
    yt = np.where(np.asarray(data.y_test) > 0, 1, -1).astype(np.int64)
    if n_train is not None:
        if not 10 <= n_train <= len(X):
            raise InputError(f"{what}: n_train must be between 10 and {len(X)}; got {n_train}.")
        X, y = X[:n_train], y[:n_train]
    return X, y, Xt, yt


def run_fig1(
    data: SplitData, config: Fig1Config | None = None, *, progress: bool = True
) -> Fig1Result:
    """Run Fig. 1 (see the module docstring) and return every number.

    Args:
        data: MNIST 1 vs 7 (``load_mnist_1v7()`` or ``load_mnist(path, subset="1v7")``), labels ±1.
        config: the settings (default ``Fig1Config()``: the release code's).
        progress: progress bars.
    """
    c = config if config is not None else Fig1Config()
    l2, test_index, n_train, top_k = c.l2, c.test_index, c.n_train, c.top_k
    X, y, Xt, yt = binary_arrays(data, n_train, what="run_fig1")
    if not 0 <= test_index < len(Xt):
        raise InputError(f"run_fig1: test_index {test_index} is outside 0..{len(Xt) - 1}.")
    if top_k > len(X):
        raise InputError(f"run_fig1: top_k must be between 1 and n_train={len(X)}; got {top_k}.")
    n = len(X)

    model = torch.nn.Linear(X.shape[1], 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.zero_()
    train = (torch.from_numpy(X), torch.from_numpy(y))
    res = refit(Objective(model, "logistic", l2=l2), Data.from_any(train), gtol=1e-10, newton=True)
    with torch.no_grad():
        model.weight.copy_(res.params["weight"])
    theta = res.params["weight"].reshape(-1).numpy().astype(np.float64)

    inf = Influence(Objective(model, "logistic", l2=l2), solver=Direct(), progress=progress).fit(
        train
    )
    test = (
        torch.from_numpy(Xt[test_index : test_index + 1]),
        torch.from_numpy(yt[test_index : test_index + 1]),
    )
    up = inf.up_loss(test).values[0]

    # the variants, from the same pieces the release code swaps out: s_test = H⁻¹∇L(z_test),
    # ∇L(z) = −σ(−yθᵀx)·y·x (paper §2.3), ∇L(z_test) itself in place of s_test without H⁻¹
    s_test = inf.s_test(test).value[0].numpy()
    g_test = inf.test_grads(test)[0].numpy()
    grad_train = -(_sigmoid(-y * (X @ theta)) * y)[:, None] * X
    grad_train_no_loss = -y[:, None] * X
    variants = {
        "no_train_loss": -(grad_train_no_loss @ s_test),
        "no_hessian": -(grad_train @ g_test),
        "no_both": -(grad_train_no_loss @ g_test),
    }
    cf = closed_form_up_loss(X, y, theta, l2, Xt[test_index], int(yt[test_index]))
    err = float(np.abs(up - cf).max() / np.abs(cf).max())

    same = y == yt[test_index]
    harmful_same = int(np.flatnonzero(same)[np.argmax(up[same])])

    def rank_desc(v: np.ndarray, i: int) -> int:
        return int((v > v[i]).sum()) + 1

    img = list(data.image_shape) if data.image_shape else [X.shape[1]]
    return Fig1Result(
        n_train=n,
        l2=float(l2),
        grad_norm=float(res.grad_norm),
        theta=theta.tolist(),
        test_index=int(test_index),
        test_label=int(yt[test_index]),
        test_prob_correct=float(_sigmoid(yt[test_index] * (Xt[test_index] @ theta))),
        train_labels=y.tolist(),
        up_loss=up.tolist(),
        closed_form=cf.tolist(),
        closed_form_max_rel_err=err,
        variants={k: v.tolist() for k, v in variants.items()},
        pearson={k: float(scipy.stats.pearsonr(up, v)[0]) for k, v in variants.items()},
        spearman={k: float(scipy.stats.spearmanr(up, v)[0]) for k, v in variants.items()},
        top_k=int(top_k),
        top_harmful_overlap={k: _overlap(up, v, top_k, True) for k, v in variants.items()},
        top_helpful_overlap={k: _overlap(up, v, top_k, False) for k, v in variants.items()},
        same_label_harmful={
            "full": int((up[same] > 0).sum()),
            **{k: int((v[same] > 0).sum()) for k, v in variants.items()},
        },
        n_same_label=int(same.sum()),
        harmful_same_label_index=harmful_same,
        harmful_same_label_up_loss=float(up[harmful_same]),
        harmful_same_label_rank=rank_desc(up, harmful_same),
        harmful_same_label_variant_rank={
            k: rank_desc(v, harmful_same) for k, v in variants.items()
        },
        test_image=Xt[test_index].tolist(),
        harmful_image=X[harmful_same].tolist(),
        image_shape=img,
        config=c,
    )


__all__ = [
    "PAPER",
    "RELEASE_TEST_INDEX",
    "VARIANTS",
    "VARIANT_LABELS",
    "Fig1Result",
    "closed_form_up_loss",
    "run_fig1",
]
