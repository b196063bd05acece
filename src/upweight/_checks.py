"""Validation helpers with uniform, fix-naming error messages."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch

from .errors import InputError, NonFiniteError, NotFittedError


def check_interval(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    closed: str = "neither",
    integer: bool = False,
) -> None:
    """Raise ``InputError`` unless ``low (<)<= value (<)<= high``.

    ``closed`` is one of "neither", "left", "right", "both", as in scikit-learn's ``Interval``.
    """
    kind = "an int" if integer else "a float"
    lo_br = "[" if closed in ("left", "both") else "("
    hi_br = "]" if closed in ("right", "both") else ")"
    rng = f"{lo_br}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_br}"
    msg = f"The '{name}' parameter of {owner} must be {kind} in {rng}. Got {value!r}."
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise InputError(msg)
    if not math.isfinite(value):
        raise InputError(msg)
    if low is not None and (value < low or (value == low and lo_br == "(")):
        raise InputError(msg)
    if high is not None and (value > high or (value == high and hi_br == ")")):
        raise InputError(msg)


def check_choice(owner: str, name: str, value: Any, choices: Collection[Any]) -> None:
    """Raise ``InputError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise InputError(f"The '{name}' parameter of {owner} must be one of {opts}. Got {value!r}.")


def check_finite(t: torch.Tensor, what: str, fix: str = "") -> None:
    """Raise ``NonFiniteError`` naming how many entries of ``t`` are NaN/inf."""
    if t.is_floating_point() or t.is_complex():
        # fast path: a NaN or ±inf anywhere makes the sum non-finite (one pass, no mask allocated);
        # a finite tensor whose sum overflows falls through to the exact count below, which finds 0
        if t.numel() == 0 or bool(torch.isfinite(t.sum())):
            return
        bad = ~torch.isfinite(t)
        n_bad = int(bad.sum())
        if n_bad:
            first = tuple(int(i) for i in bad.nonzero()[0])
            n_nan = int(torch.isnan(t).sum())
            raise NonFiniteError(
                f"{what} has {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} inf); "
                f"the first at index {first}." + (f" {fix}" if fix else "")
            )


def check_is_fitted(obj: Any, attr: str) -> None:
    """Raise ``NotFittedError`` unless ``obj`` has the fitted attribute ``attr``."""
    if getattr(obj, attr, None) is None:
        raise NotFittedError(
            f"This {type(obj).__name__} is not fitted yet. Call .fit(train) first."
        )


def check_rows_finite(t: torch.Tensor, ids: Any, what: str, fix: str = "", *, dim: int = 0) -> None:
    """Raise ``NonFiniteError`` naming the points (``ids``, one per index of ``dim``) whose slice of
    ``t`` holds a NaN or inf — e.g. the per-sample gradients of a chunk, or a chunk's scores."""
    if (
        not (t.is_floating_point() or t.is_complex())
        or t.numel() == 0
        or bool(torch.isfinite(t.sum()))
    ):
        return
    bad = ~torch.isfinite(t)
    rows = bad.movedim(dim, 0).reshape(t.shape[dim], -1).any(dim=1).nonzero().reshape(-1).tolist()
    if not rows:
        return
    id_list = [int(i) for i in torch.as_tensor(ids).reshape(-1)[rows].tolist()]
    shown = ", ".join(str(i) for i in id_list[:10]) + (
        f", … ({len(id_list)} in all)" if len(id_list) > 10 else ""
    )
    raise NonFiniteError(
        f"{what} is NaN or infinite for point id(s) {shown}." + (f" {fix}" if fix else "")
    )
