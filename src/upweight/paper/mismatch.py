"""§5.3 of Koh & Liang (2017), "debugging domain mismatch", on the hospital-readmission data.

The experiment, as in the paper and its release notebook (``scripts/hospital_readmission.ipynb``):

1. Start from the balanced 20,000-point training set (``load_hospital``): 24 children under 10
   (feature 17, ``age_[0-10)``), 3 of them readmitted within 30 days (+1), 21 not (−1).
2. Remove 20 of the 21 non-readmitted children, leaving 19,980 points in which 3 of the 4
   children were readmitted. Which 20: by default the first 20 in training order, keeping the
   last one, as the release notebook does; with ``seed`` an int, a
   ``numpy.random.default_rng(seed)`` choice of the one to keep instead.
3. Train binary logistic regression with a bias, ``torch.nn.Linear(127, 1)``, loss
   log(1 + exp(−y·s)), R(θ) = mean loss + (l2/2)‖θ‖² (bias included), to the minimum in float64
   with ``upweight.refit``. ``l2 = 1e-4`` is the release notebook's weight decay (the paper's
   text does not state it).
4. Pick a test child the model gets wrong: by default test point 1742, the child (not
   readmitted) the release notebook explains — the paper says "a random child z_test that the
   model got wrong"; if 1742 is classified correctly, the first misclassified test child.
5. −I_up,loss(z_i, z_test) for every training point (exact Hessian, ``Direct``; p = 128): the 4
   children should dominate (paper: each 30–40× the next most influential non-child). The
   baseline of looking at θ̂: the paper found 14/127 features with a larger coefficient than the
   child indicator.
6. I_pert,loss(z_i, z_test) of the 4 children: which of the 127 features, if changed, moves the
   test loss most (paper: the child indicator, "by far").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..core import Data, Objective
from ..datasets._base import SplitData
from ..errors import InputError
from ..influence import Influence
from ..loo import refit
from ..solvers import Direct
from .config import MismatchConfig

CHILD_COLUMN = 17
CHILD_FEATURE = "age_[0-10)"
NOTEBOOK_TEST_INDEX = 1742
PAPER = {
    "n_children_train": 24,
    "n_children_readmitted": 3,
    "n_removed": 20,
    "ratio_low": 30.0,
    "ratio_high": 40.0,
    "coef_larger_than_child": 14,
    "n_features": 127,
}


@dataclass(frozen=True)
class MismatchResult:
    """Every number of the §5.3 reproduction. Indices of training points are into the ORIGINAL
    20,000-point training set unless named ``*_mismatch`` (into the 19,980 kept)."""

    l2: float
    seed: int | None
    n_train_original: int
    n_train: int
    children_original: list[int]  # the 24 training children (original indices)
    removed: list[int]  # the 20 removed non-readmitted children
    children_kept: list[int]  # the 4 left (original indices)
    children_kept_labels: list[int]  # their labels (+1 readmitted)
    grad_norm: float  # ‖∇R(θ̂)‖ at the refit minimum
    refit_iterations: int
    test_index: int
    test_label: int
    test_score: float  # wᵀx + b of the test child
    test_children: int  # children in the test set
    test_children_wrong: int  # of which misclassified
    test_children_wrong_before: int  # … by the model trained on all 20,000 (−1: not computed)
    top_indices: list[int]  # top training points by |I_up,loss| (original indices)
    top_up_loss: list[float]  # their I_up,loss
    top_is_child: list[bool]
    top_labels: list[int]
    # I_up,loss of the 4 kept children (order of children_kept)
    children_up_loss: list[float]
    children_rank: list[int]  # their rank by |I_up,loss| (1 = largest)
    largest_nonchild_index: int
    largest_nonchild_up_loss: float
    children_ratio: list[float]  # |I_up,loss(child)| / max non-child |I_up,loss|
    ratio_min: float  # the "30–40×" of the paper, for the weakest child
    child_coef: float
    coef_larger_than_child: int  # the paper's "14/127 features had a larger coefficient"
    coef_top_features: list[str]
    # I_pert,loss of each kept child in the child-indicator direction
    pert_child_feature: list[float]
    # rank of the child indicator by |I_pert,loss| among 127 (1 = largest)
    pert_child_rank: list[int]
    pert_child_rank_active: list[int]  # … among the features that are non-zero for that child
    pert_top_feature: list[str]  # feature with the largest |I_pert,loss| for each child
    # mean over the 4 children of |I_pert,loss| per feature (127)
    pert_abs_mean: list[float]
    up_loss_all: list[float]  # I_up,loss for all n_train points (mismatch order)
    feature_names: list[str]
    config: MismatchConfig  # the settings of the run

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything (lists and floats only); ``settings`` is the run's
        ``MismatchConfig``."""
        d = asdict(self)
        d["settings"] = d.pop("config")
        return d


def _fit(X: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.nn.Linear, Any]:
    model = torch.nn.Linear(X.shape[1], 1).double().eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    obj = Objective(model, "logistic", l2=l2)
    # a short L-BFGS warm-up, then refit's Newton-CG polish (the features are unscaled counts, so
    # plain L-BFGS needs ~3,000 iterations): ‖∇R‖ ≈ 1e-15 in about half the time
    res = refit(obj, Data.from_any((X, y)), gtol=1e-9, maxiter=100, newton=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(res.params[name])
    return model, res


def _rank(values: np.ndarray, i: int) -> int:
    """1 + how many entries of |values| are strictly larger than |values[i]|."""
    a = np.abs(values)
    return int((a > a[i]).sum()) + 1


def run_mismatch(
    data: SplitData, config: MismatchConfig | None = None, *, progress: bool = True
) -> MismatchResult:
    """Run §5.3 (see the module docstring) and return every number.

    Args:
        data: ``load_hospital(path)`` (labels ±1 or 0/1; feature 17 must be ``age_[0-10)``).
        config: the settings (default ``MismatchConfig()``: the release notebook's); ``baseline``
            costs another ~10–20 s.
        progress: progress bars in the influence sweeps.
    """
    c = config if config is not None else MismatchConfig()
    l2, seed, test_index, top, baseline = c.l2, c.seed, c.test_index, c.top, c.baseline
    names = list(data.feature_names or ())
    if len(names) <= CHILD_COLUMN or names[CHILD_COLUMN] != CHILD_FEATURE:
        raise InputError(
            f"run_mismatch: feature {CHILD_COLUMN} must be '{CHILD_FEATURE}' (load the data with"
            " upweight.datasets.load_hospital); got"
            f" {names[CHILD_COLUMN] if len(names) > CHILD_COLUMN else 'none'}."
        )
    X = np.asarray(data.x_train, dtype=np.float64)
    y = np.where(np.asarray(data.y_train) == 1, 1, -1).astype(np.int64)
    Xt = np.asarray(data.x_test, dtype=np.float64)
    yt = np.where(np.asarray(data.y_test) == 1, 1, -1).astype(np.int64)
    child = X[:, CHILD_COLUMN] == 1
    neg_children = np.flatnonzero(child & (y == -1))
    if len(neg_children) < 2:
        raise InputError(
            f"run_mismatch: the training set has {len(neg_children)} non-readmitted children; need"
            " ≥ 2."
        )
    if seed is None:
        kept_neg = neg_children[-1]
    else:
        kept_neg = neg_children[np.random.default_rng(seed).integers(len(neg_children))]
    # remove all but one: the paper's data has 21 non-readmitted children, so 20 go
    removed = np.setdiff1d(neg_children, [kept_neg])
    keep = np.setdiff1d(np.arange(len(X)), removed)
    Xm, ym = X[keep], y[keep]
    child_m = child[keep]

    wrong_before = -1
    if baseline:
        m0, _ = _fit(torch.from_numpy(X), torch.from_numpy(y), l2)
        with torch.no_grad():
            s0 = m0(torch.from_numpy(Xt)).squeeze(1).numpy()
        tc = Xt[:, CHILD_COLUMN] == 1
        wrong_before = int((np.where(s0 > 0, 1, -1)[tc] != yt[tc]).sum())

    Xm_t, ym_t = torch.from_numpy(Xm), torch.from_numpy(ym)
    model, res = _fit(Xm_t, ym_t, l2)
    with torch.no_grad():
        s = model(torch.from_numpy(Xt)).squeeze(1).numpy()
    pred = np.where(s > 0, 1, -1)
    test_child = Xt[:, CHILD_COLUMN] == 1
    wrong_children = np.flatnonzero(test_child & (pred != yt))
    if test_index is None:
        if len(wrong_children) == 0:
            raise InputError(
                "run_mismatch: the model misclassifies no test child; nothing to explain."
            )
        test_index = (
            NOTEBOOK_TEST_INDEX
            if NOTEBOOK_TEST_INDEX in set(wrong_children.tolist())
            else int(wrong_children[0])
        )
    elif not 0 <= test_index < len(Xt):
        raise InputError(f"run_mismatch: test_index {test_index} is outside 0..{len(Xt) - 1}.")

    inf = Influence(Objective(model, "logistic", l2=l2), solver=Direct(), progress=progress).fit(
        (Xm_t, ym_t)
    )
    test = (
        torch.from_numpy(Xt[test_index : test_index + 1]),
        torch.from_numpy(yt[test_index : test_index + 1]),
    )
    up = inf.up_loss(test).values[0]
    order = np.argsort(-np.abs(up), kind="stable")[:top]
    kids = np.flatnonzero(child_m)
    nonchild = np.flatnonzero(~child_m)
    j = nonchild[np.argmax(np.abs(up[nonchild]))]
    ratios = np.abs(up[kids]) / abs(up[j])

    w = model.weight.detach().numpy()[0]
    coef_order = np.argsort(-np.abs(w), kind="stable")
    pert = inf.pert_loss(test, torch.from_numpy(kids)).values[0]  # (4, 127)
    ranks, ranks_active, tops = [], [], []
    for r, k in enumerate(kids):
        ranks.append(_rank(pert[r], CHILD_COLUMN))
        active = np.flatnonzero(Xm[k] != 0)
        ranks_active.append(_rank(pert[r, active], int(np.flatnonzero(active == CHILD_COLUMN)[0])))
        tops.append(names[int(np.argmax(np.abs(pert[r])))])

    return MismatchResult(
        l2=float(l2),
        seed=seed,
        n_train_original=len(X),
        n_train=len(Xm),
        children_original=np.flatnonzero(child).tolist(),
        removed=removed.tolist(),
        children_kept=keep[kids].tolist(),
        children_kept_labels=ym[kids].tolist(),
        grad_norm=float(res.grad_norm),
        refit_iterations=int(res.iterations),
        test_index=int(test_index),
        test_label=int(yt[test_index]),
        test_score=float(s[test_index]),
        test_children=int(test_child.sum()),
        test_children_wrong=len(wrong_children),
        test_children_wrong_before=wrong_before,
        top_indices=keep[order].tolist(),
        top_up_loss=up[order].tolist(),
        top_is_child=child_m[order].tolist(),
        top_labels=ym[order].tolist(),
        children_up_loss=up[kids].tolist(),
        children_rank=[_rank(up, int(k)) for k in kids],
        largest_nonchild_index=int(keep[j]),
        largest_nonchild_up_loss=float(up[j]),
        children_ratio=ratios.tolist(),
        ratio_min=float(ratios.min()),
        child_coef=float(w[CHILD_COLUMN]),
        coef_larger_than_child=_rank(w, CHILD_COLUMN) - 1,
        coef_top_features=[names[i] for i in coef_order[:15]],
        pert_child_feature=pert[:, CHILD_COLUMN].tolist(),
        pert_child_rank=ranks,
        pert_child_rank_active=ranks_active,
        pert_top_feature=tops,
        pert_abs_mean=np.abs(pert).mean(0).tolist(),
        up_loss_all=up.tolist(),
        feature_names=names,
        config=c,
    )


__all__ = ["CHILD_COLUMN", "CHILD_FEATURE", "PAPER", "MismatchResult", "run_mismatch"]
