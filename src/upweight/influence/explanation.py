"""``explain``: which training points made the model predict what it does on some test points.

The paper's use case (Koh & Liang 2017, §5.1–5.2): for each test point, I_up,loss(z, z_test) of
every training point z (one block solve for s_test, then one pass over the training data), and
the points with the most negative (helpful) and most positive (harmful) scores. The result is a
value — ``Explanation`` — that a program, the command line or the HTML report renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._checks import check_interval, check_is_fitted
from .._executor import Executor
from ..errors import InputError
from .accuracy import AccuracyEstimate
from .provenance import Provenance, as_provenance
from .results import InfluenceScores, Ranking

if TYPE_CHECKING:
    from ..store import Store
    from .engine import Influence

CONVENTION = (
    "I_up,loss(z, z_test) = −∇θf(z_test)ᵀH⁻¹∇θL(z) (Koh & Liang 2017, Eq. 2): > 0 means "
    "upweighting z raises the test loss (z is harmful), < 0 lowers it (z is helpful); removing z "
    "changes the test loss by about −I_up,loss/n."
)


@dataclass(frozen=True)
class Explanation:
    """The most helpful and most harmful training points of each explained test point.

    Sign convention (``CONVENTION``): I_up,loss(z, z_test) = −∇θf(z_test)ᵀH⁻¹∇θL(z) > 0 means
    upweighting z raises the test measurement f (the loss by default): z is *harmful*; < 0: z is
    *helpful*. Removing z changes f(z_test) by about −I_up,loss/n (``removal_effect``).

    Attributes:
        test_ids: ids of the explained test points, shape (n_test,).
        outputs: the model's output at θ̂ for each test point (its prediction: logits, a logit,
            a regression value), shape (n_test, *output shape).
        measurements: f(z_test, θ̂) for each test point (the test loss by default), (n_test,).
        scores: I_up,loss of every (selected) training point on each test point,
            ``InfluenceScores`` of shape (n_test, n_train).
        helpful: per test point, the ``top`` training points with the most negative I_up,loss,
            most helpful first.
        harmful: per test point, the ``top`` training points with the largest I_up,loss, most
            harmful first.
        provenance: how the scores were computed (``Provenance``); its ``accuracy`` holds the
            measured numbers (``AccuracyEstimate.summary()``) when ``accuracy`` was estimated.
        accuracy: the approximate solver's scores measured against CG, or ``None`` (not asked
            for, or an exact solver, whose residual bounds the error of its scores).
        top: how many points each ranking lists (fewer where there are fewer training points).
    """

    test_ids: np.ndarray
    outputs: np.ndarray
    measurements: np.ndarray
    scores: InfluenceScores
    helpful: tuple[Ranking, ...]
    harmful: tuple[Ranking, ...]
    provenance: Provenance = field(default_factory=Provenance)
    accuracy: AccuracyEstimate | None = None
    top: int = 10
    convention: str = CONVENTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "provenance", as_provenance(self.provenance))

    def __len__(self) -> int:
        return len(self.test_ids)

    @property
    def n_train(self) -> int:
        """n, the size of the training set the model was fitted on."""
        return self.scores.n_train

    @property
    def up_loss(self) -> np.ndarray:
        """I_up,loss(z, z_test), shape (n_test, n_train); > 0: z is harmful."""
        return self.scores.values

    @property
    def removal_effect(self) -> np.ndarray:
        """Predicted change of the test measurement if each training point is removed:
        −I_up,loss/n, shape (n_test, n_train)."""
        return self.scores.as_removal_effect().values

    def __str__(self) -> str:
        parts = [f"Explanation of {len(self)} test point(s); {self.convention}"]
        for t in range(len(self)):
            parts += [str(self.helpful[t]), str(self.harmful[t])]
        return "\n".join(parts)


def explain(
    influence: Influence,
    test: Any,
    *,
    top: int = 10,
    check_accuracy: bool = False,
    store: str | Store | None = None,
    executor: Executor | None = None,
) -> Explanation:
    """Explain the model's predictions on ``test``: the most helpful and harmful training points.

    Scores every training point by I_up,loss(z, z_test) (``Influence.up_loss``: one block solve
    for s_test, then one pass over the training data) and ranks them per test point.

    Args:
        influence: a fitted ``Influence``.
        test: the test point(s) ``(X, y)`` (or Dataset/DataLoader).
        top: how many helpful and how many harmful training points to list per test point.
        check_accuracy: for an approximate solver (K-FAC, EK-FAC, Arnoldi, Nyström, DataInf),
            also measure its scores against CG (``Influence.estimate_accuracy``, about one CG
            solve); an exact solver's residual already bounds its error, so nothing is measured.
        store: a folder (or ``Store``) that keeps s_test and the scores (``Influence.up_loss``).
        executor: where the passes over the training data run (default: ``fit``'s).

    Returns:
        An ``Explanation``: the test points' outputs and measurements, the scores, the rankings
        (I_up,loss < 0 helpful, > 0 harmful), the provenance and the accuracy estimate.
    """
    from .engine import Influence

    if not isinstance(influence, Influence):
        raise InputError(
            f"influence must be a fitted upweight.Influence; got {type(influence).__name__}."
        )
    check_is_fitted(influence, "data_")
    check_interval("explain", "top", top, 1, None, closed="left", integer=True)
    data = influence._test(test)
    scores = influence.up_loss(data, store=store, executor=executor)
    rows = range(len(data))
    helpful = tuple(scores.top_k(top, test=t, harmful=False) for t in rows)
    harmful = tuple(scores.top_k(top, test=t, harmful=True) for t in rows)
    prov, accuracy = scores.provenance, None
    if check_accuracy and prov.accuracy is not None:  # only an approximation records a note there
        accuracy = influence.estimate_accuracy(data)
        prov = replace(prov, accuracy=accuracy.summary())
    outputs, measurements = _predictions(influence, data)
    return Explanation(
        test_ids=data.ids.numpy(),
        outputs=outputs,
        measurements=measurements,
        scores=scores,
        helpful=helpful,
        harmful=harmful,
        provenance=prov,
        accuracy=accuracy,
        top=min(top, scores.values.shape[1]),
    )


def _predictions(influence: Influence, data: Any) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs f(x; θ̂) and the measurements f(z, θ̂) of the test points, in batches."""
    obj = influence.objective
    outs, meas = [], []
    with torch.no_grad():
        for start in range(0, len(data), influence.batch_size):
            part = data.subset(np.arange(start, min(start + influence.batch_size, len(data))))
            out = obj.outputs(obj.params, part.X)
            outs.append(out.detach().cpu())
            meas.append(obj.measure_fn(out, part.y.to(out.device)).detach().cpu())
    return torch.cat(outs).numpy(), torch.cat(meas).numpy()


__all__ = ["CONVENTION", "Explanation", "explain"]
