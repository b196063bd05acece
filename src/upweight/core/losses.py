"""Per-sample losses ``L(output, target) -> (b,)`` and the targets each one accepts.

Binary losses (logistic, hinge, ``SmoothHinge``) take a score s = f(x) of shape (b,) or (b, 1)
and labels y encoded either as {0, 1} or as {−1, +1}; inside the loss labels > 0 count as +1 and
all others as −1, and the margin is y·s. Any other label set is refused by their
``check_targets``: labels {1, 2}, say, would all count as +1 and train a model that predicts one
class.

Each built-in loss carries a ``check_targets(y, output_shape, what)`` that validates every
target of a data set at once (vectorised: a few reductions over y, so a million labels cost
milliseconds) and raises upweight's errors naming the first offending index, the value seen and
the fix. ``Objective.check_data`` calls it once per data set; a custom callable loss is checked
only if it has such an attribute.

Examples:
    >>> import torch
    >>> logistic.check_targets(torch.tensor([1, 2, 1]), (1,), "training")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    upweight.errors.InputError: training y[1] = 2: the logistic loss needs binary labels, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import check_interval
from ..errors import DtypeError, InputError, ShapeError

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TargetCheck = Callable[[torch.Tensor, tuple[int, ...], str], None]


# ── target validation (one vectorised pass per rule over the whole y) ──────────────────
def _first(bad: torch.Tensor) -> int:
    """Position along axis 0 of the first point with a True in the mask ``bad`` (n, ...)."""
    per_point = bad.reshape(bad.shape[0], -1).any(dim=1)
    return int(torch.argmax(per_point.to(torch.uint8)))  # argmax returns the first maximum


def _entry(y: torch.Tensor, i: int) -> str:
    """``y[i]`` as text: the scalar for one label per point, else the row (first values)."""
    row = y[i].reshape(-1)
    if row.numel() == 1:
        v = row[0].item()
        return repr(int(v)) if float(v).is_integer() and not y.is_floating_point() else repr(v)
    vals = ", ".join(f"{v:g}" for v in row[:6].tolist())
    return f"[{vals}{', …' if row.numel() > 6 else ''}]"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _values_seen(y: torch.Tensor, limit: int = 6) -> str:
    u = torch.unique(y)
    vals = [int(v) if float(v).is_integer() else float(v) for v in u[:limit].tolist()]
    return str(vals)[:-1] + (f", … ({len(u)} distinct)]" if len(u) > limit else "]")


def _one_label_per_point(y: torch.Tensor, loss: str, what: str, expected: str) -> torch.Tensor:
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        return y.reshape(-1)
    raise ShapeError(
        f"{what} y has shape {tuple(y.shape)}: the {loss} loss needs one label per point, shape"
        f" (n,) with {expected}. Pass y.reshape(-1) if it holds one label per row, or use a loss"
        " for multi-output targets."
    )


def _check_class_labels(y: torch.Tensor, output_shape: tuple[int, ...], what: str) -> None:
    """cross_entropy: integer labels in [0, C) with C = output_shape[0] (the model's output width),
    or class probabilities in [0, 1] of the output's per-point shape."""
    if len(output_shape) == 0:
        raise ShapeError(
            f"cross_entropy needs one score per class, model output of shape (n, C); on {what} X"
            " the model returns one value per point. For two classes with one score use the"
            " 'logistic' loss, or return C ≥ 2 scores."
        )
    n_classes = output_shape[0]
    label_shape = (y.shape[0], *output_shape[1:])
    if (
        y.is_floating_point()
        and tuple(y.shape[1:]) == tuple(output_shape)
        and y.shape != label_shape
    ):
        bad = (y < 0) | (y > 1)
        if bool(bad.any()):
            i = _first(bad)
            raise InputError(
                f"{what} y[{i}] = {_entry(y, i)}: float targets of shape (n, {n_classes}) are read"
                " by cross_entropy as class probabilities, which must lie in [0, 1]. Pass integer"
                " class labels of shape (n,) instead (y.long())."
            )
        return
    if tuple(y.shape) != label_shape:
        raise ShapeError(
            f"{what} y has shape {tuple(y.shape)} but the model outputs {n_classes} class scores"
            f" per point (output shape (n, {', '.join(map(str, output_shape))})): cross_entropy"
            f" needs one integer class label per point, y of shape {label_shape}. Pass"
            " y.reshape(-1) for a column of labels, or y.argmax(1) for one-hot rows."
        )
    if y.is_floating_point():
        frac = y != torch.round(y)
        if bool(frac.any()):
            i = _first(frac)
            raise DtypeError(
                f"{what} y[{i}] = {_entry(y, i)}: cross_entropy needs integer class labels in [0,"
                f" {n_classes}); y has dtype {y.dtype} with non-integer values. Pass the class"
                " index of each point as a long tensor."
            )
        raise DtypeError(
            f"{what} y has dtype {y.dtype}: cross_entropy needs integer class labels in [0,"
            f" {n_classes}). Pass y as a long tensor: y.long()."
        )
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        wide = y.long()  # compared in int64: torch wraps a bound too large for int8 / uint8 labels
        bad = (wide < 0) | (wide >= n_classes)
        i = _first(bad)
        raise InputError(
            f"{what} y[{i}] = {_entry(y, i)} is not a class of the model: cross_entropy needs"
            f" labels in [0, {n_classes}) because the model outputs {n_classes} class scores"
            f" (labels seen range over [{lo}, {hi}]). Encode the classes as 0 … {n_classes - 1}, or"
            " give the model one output per class."
        )


def _check_binary_labels(loss: str) -> TargetCheck:
    def check(y: torch.Tensor, output_shape: tuple[int, ...], what: str) -> None:
        if _numel(output_shape) != 1:
            raise ShapeError(
                f"The {loss} loss needs one score per point, model output of shape (n,) or (n, 1);"
                f" the model outputs shape (n, {', '.join(map(str, output_shape))}). For several"
                " classes use 'cross_entropy'."
            )
        t = _one_label_per_point(y, loss, what, "labels in {0, 1} or {-1, +1}")
        lo = float(t.min())
        allowed = (0, 1) if lo >= 0 else (-1, 1)
        bad = (t != allowed[0]) & (t != allowed[1])
        if bool(bad.any()):
            i = _first(bad)
            mixed = " (0 and -1 mixed)" if lo == -1 and float(t[i]) == 0 else ""
            raise InputError(
                f"{what} y[{i}] = {_entry(t, i)}{mixed}: the {loss} loss needs binary labels, all"
                f" in {{0, 1}} or all in {{-1, +1}} (values seen: {_values_seen(t)}). Encode the"
                " two classes as 0 and 1, e.g. y = (y == positive_class).long()."
            )

    check.__name__ = check.__qualname__ = f"check_{loss}_targets"
    return check


def _check_regression_targets(y: torch.Tensor, output_shape: tuple[int, ...], what: str) -> None:
    """squared: any finite values (``Data`` checks finiteness), as many per point as the
    output has."""
    per_out = _numel(output_shape)
    per_y = y[0].numel() if y.shape[0] else 0
    if per_y != per_out:
        raise ShapeError(
            f"{what} y has shape {tuple(y.shape)} ({per_y} value(s) per point) but the model"
            f" outputs {per_out} per point (output shape (n, {', '.join(map(str, output_shape))})):"
            " the squared loss compares them entry by entry. Give y one target per model output,"
            " e.g. y.reshape(n, -1) of matching width."
        )


# ── the losses ────────────────────────────────────────────────────────────────────────
def _margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    s = output.reshape(output.shape[0], -1)
    if s.shape[1] != 1:
        raise ValueError(
            "A binary loss needs one score per sample; got model output of shape"
            f" {tuple(output.shape)}."
        )
    sign = torch.where(target.reshape(-1) > 0, 1.0, -1.0).to(s.dtype)
    return sign * s[:, 0]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multinomial logistic loss −log softmax(output)[target], per sample.

    Integer labels of any width (int32, uint8, …) are widened to int64, which ``F.cross_entropy``
    requires: a lossless conversion with one meaning, so it is done here rather than refused.
    """
    if not target.is_floating_point() and target.dtype != torch.long:
        target = target.long()
    return F.cross_entropy(output, target, reduction="none")


def logistic(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary logistic loss log(1 + exp(−y·s)) — Koh & Liang (2017) §2.3. Labels {0, 1} or
    {−1, +1}."""
    return F.softplus(-_margin(output, target))


def squared(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½‖output − target‖² per sample."""
    diff = output.reshape(output.shape[0], -1) - target.reshape(target.shape[0], -1).to(
        output.dtype
    )
    return 0.5 * (diff**2).sum(dim=1)


def hinge(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hinge(s) = max(0, 1 − y·s), labels {0, 1} or {−1, +1}. Not twice differentiable: its Hessian
    is 0 almost everywhere, so use ``SmoothHinge`` to compute influence (Koh & Liang 2017, §4.3)."""
    return F.relu(1.0 - _margin(output, target))


cross_entropy.check_targets = _check_class_labels  # type: ignore[attr-defined]
logistic.check_targets = _check_binary_labels("logistic")  # type: ignore[attr-defined]
squared.check_targets = _check_regression_targets  # type: ignore[attr-defined]
hinge.check_targets = _check_binary_labels("hinge")  # type: ignore[attr-defined]
_check_smooth_hinge_labels = _check_binary_labels("SmoothHinge")


@dataclass(frozen=True)
class SmoothHinge:
    """SmoothHinge(s, t) = t·log(1 + exp((1 − y·s)/t)) — Koh & Liang (2017), §4.3.

    Tends to the hinge loss as t → 0; the paper found t = 0.001 predicts hinge-loss
    leave-one-out well (Pearson R = 0.95). Labels {0, 1} or {−1, +1}.

    Examples:
        >>> import torch
        >>> round(float(SmoothHinge(0.001)(torch.tensor([3.0]), torch.tensor([1]))[0]), 6)
        0.0
    """

    t: float = 0.001

    def __post_init__(self) -> None:
        check_interval("SmoothHinge", "t", self.t, 0.0, None)

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.t * F.softplus((1.0 - _margin(output, target)) / self.t)

    def check_targets(self, y: torch.Tensor, output_shape: tuple[int, ...], what: str) -> None:
        """Binary labels, all in {0, 1} or all in {−1, +1}; one score per point."""
        _check_smooth_hinge_labels(y, output_shape, what)


#: the label of a token that no loss reads (padding, a prompt in a completion measure) — the
#: Hugging Face convention
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenCrossEntropy:
    """The loss of a sequence: L(z) = Σₜ −log softmax(logitsₜ)[labelₜ] over the tokens t whose label
    is not ``IGNORE_INDEX`` (−100), per sequence — the sum, or with ``reduction="mean"`` the mean
    over those tokens. Padding (label −100) contributes nothing, to the loss or to its gradient.

    With ``shift=True`` (a causal language model) the logits at position t predict the label at
    t + 1, as Hugging Face's ``…ForCausalLM`` models compute their loss: pass the input ids as
    labels, −100 at padding. As a test measurement (``Objective(measure=…)``) on labels that mask
    the prompt with −100 it is −log p(completion | prompt), the negative log-probability of a
    given continuation.

    Model output: logits of shape (b, T, V); labels (b, T) integers in [0, V) or −100.

    Examples:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 4)                     # uniform over 4 tokens
        >>> loss = TokenCrossEntropy()(logits, torch.tensor([[1, 2, -100]]))
        >>> round(float(loss[0]), 4) == round(2 * float(torch.log(torch.tensor(4.0))), 4)
        True
    """

    shift: bool = False
    reduction: str = "sum"

    def __post_init__(self) -> None:
        if self.reduction not in ("sum", "mean"):
            raise InputError(
                "The 'reduction' parameter of TokenCrossEntropy must be 'sum' or 'mean'. Got"
                f" {self.reduction!r}."
            )

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.ndim != 3:
            raise ValueError(
                f"TokenCrossEntropy needs logits of shape (b, T, V); got {tuple(output.shape)}."
            )
        labels = target.long()
        if self.shift:
            output, labels = output[:, :-1], labels[:, 1:]
        b, t, v = output.shape
        tok = F.cross_entropy(
            output.reshape(b * t, v),
            labels.reshape(b * t),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).reshape(b, t)
        total = tok.sum(dim=1)
        if self.reduction == "sum":
            return total
        return total / (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1).to(total.dtype)

    def check_targets(self, y: torch.Tensor, output_shape: tuple[int, ...], what: str) -> None:
        """Integer token labels of shape (n, T) matching the logits, each in [0, V) or −100."""
        if len(output_shape) != 2:
            raise ShapeError(
                "TokenCrossEntropy needs the model's logits per token, shape (n, T, V); the model"
                f" outputs (n, {', '.join(map(str, output_shape))}). For one label per sequence use"
                " 'cross_entropy'."
            )
        T, V = output_shape
        if y.ndim != 2 or y.shape[1] != T:
            raise ShapeError(
                f"{what} y has shape {tuple(y.shape)} but the model outputs {T} positions per"
                f" sequence: token labels need shape (n, {T}), −100 where no token is scored"
                " (padding)."
            )
        if y.is_floating_point():
            raise DtypeError(
                f"{what} y has dtype {y.dtype}: token labels are integer ids. Pass y.long()."
            )
        wide = y.long()
        bad = ((wide < 0) | (wide >= V)) & (wide != IGNORE_INDEX)
        if bool(bad.any()):
            i = _first(bad)
            raise InputError(
                f"{what} y[{i}] = {_entry(y, i)} holds a token id outside the vocabulary [0, {V})"
                " (−100 marks an ignored position). Check the tokenizer's vocabulary size against"
                " the model's."
            )
        scored = (wide[:, 1:] if self.shift else wide) != IGNORE_INDEX
        empty = ~scored.any(dim=1)
        if bool(empty.any()):
            i = _first(empty)
            raise InputError(
                f"{what} sequence {i} has no scored token (all labels −100"
                + (", or only its first, which a causal model never predicts" if self.shift else "")
                + "): its loss and gradient would be 0. Drop it, or give it labels."
            )


token_cross_entropy = TokenCrossEntropy()
causal_lm = TokenCrossEntropy(shift=True)

LOSSES: dict[str, PerSampleLoss] = {
    "cross_entropy": cross_entropy,
    "logistic": logistic,
    "squared": squared,
    "hinge": hinge,
    "token_cross_entropy": token_cross_entropy,
    "causal_lm": causal_lm,
}
