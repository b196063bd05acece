"""``train=``: which of the fitted training points a call of ``Influence`` scores.

Every quantity that takes ``train=`` reads it here, so that integer indices (negative ones counting
from the end, repeats allowed) and boolean masks mean the same everywhere, and anything else is
refused rather than silently truncated or read as 0/1 indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError

TrainSelection = Any  # None (all) or indices into the fitted training data


def selection_positions(train: Any, n: int) -> np.ndarray:
    """``train=`` as positions into n fitted training points: integer indices (negative ones count
    from the end; repeats allowed) or a boolean mask of length n. Anything else — fractional
    numbers, a mask of another length, indices outside [−n, n) — is an ``InputError``, never
    silently truncated or read as 0/1 indices.

    Examples:
        >>> selection_positions([0, -1, 0], 4).tolist()
        [0, 3, 0]
        >>> selection_positions(np.array([True, False, True, False]), 4).tolist()
        [0, 2]
    """
    try:
        a = train.detach().cpu().numpy() if isinstance(train, torch.Tensor) else np.asarray(train)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"train= must be indices or a boolean mask; got {type(train).__name__} ({exc})."
        ) from exc
    a = a.reshape(-1) if a.ndim <= 1 else a
    if a.ndim != 1:
        raise InputError(
            f"train= must be one-dimensional (indices or a boolean mask); got shape {a.shape}."
        )
    if a.dtype == bool:
        if len(a) != n:
            raise InputError(
                f"train= is a boolean mask of length {len(a)}, but {n} training points were fitted."
            )
        return np.flatnonzero(a).astype(np.int64)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if (
            not np.issubdtype(a.dtype, np.floating)
            or not np.all(np.isfinite(a))
            or not np.all(a == np.round(a))
        ):
            raise InputError(
                f"train= must hold integer positions; got dtype {a.dtype} (e.g."
                f" {a.reshape(-1)[:3].tolist()}). Pass integer indices or a boolean mask."
            )
    pos = a.astype(np.int64)
    bad = (pos < -n) | (pos >= n)
    if bad.any():
        raise InputError(
            f"train= holds position {int(pos[bad][0])}, outside the {n} fitted training points"
            f" [−{n}, {n})."
        )
    return np.where(pos < 0, pos + n, pos)
