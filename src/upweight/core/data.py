"""``Data``: one normalised, indexable view of every accepted input form.

Accepted: ``(X, y)`` tensors or NumPy arrays, a ``torch.utils.data.Dataset`` yielding
``(x, y)`` pairs, or a ``DataLoader`` over such a dataset (its dataset is read in order, so the
ids are stable even when the loader shuffles). Every point carries a stable integer id: its
position in the data it was built from.

X and y must be real numbers (float or integer; bool, complex, strings and dates are refused)
and finite, every point checked. Integer X is kept as is (token ids for nn.Embedding; a float
model fed integer pixels is refused by ``Objective.check_data`` with the conversion to make).
Unsigned integers wider than 8 bits become int64, since torch supports few operations on them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._checks import check_finite
from ..errors import DtypeError, EmptyDataError, InputError, ShapeError

_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    """``a`` as a dense real tensor; unsigned integers wider than 8 bits (which torch supports for
    few operations) become int64."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.layout != torch.strided:
            raise DtypeError(f"{what} is a {t.layout} tensor; upweight needs a dense one. Convert it with .to_dense().")
    elif isinstance(a, np.ndarray):
        if a.dtype == object or a.dtype.kind in "USVmM":
            raise DtypeError(f"{what} has dtype {a.dtype}; upweight needs numbers. Convert it with np.asarray(..., dtype=float).")
        try:
            t = torch.from_numpy(np.ascontiguousarray(a))
        except TypeError as exc:  # long double, …: no torch dtype
            raise DtypeError(
                f"{what} has dtype {a.dtype}, which torch cannot hold. Convert it with np.asarray(..., dtype=np.float64)."
            ) from exc
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DtypeError(f"{what} of type {type(a).__name__} cannot be read as a numeric array: {exc}") from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise DtypeError(f"{what} has dtype {t.dtype}; upweight needs real numbers (float or integer). Convert it, e.g. with .float().")
    if t.dtype in _WIDE_UNSIGNED:
        if t.dtype == getattr(torch, "uint64", None) and t.numel() and bool((t.view(torch.int64) < 0).any()):
            i = int(torch.argmax((t.view(torch.int64) < 0).reshape(-1).to(torch.uint8)))
            raise DtypeError(
                f"{what} has dtype uint64 with a value ≥ 2**63 at flat index {i}, beyond int64. Rescale it or convert it to float."
            )
        t = t.to(torch.int64)
    return t


def _stack(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    """``torch.stack`` of one item per point, with a mismatch reported by its first offending item."""
    first = parts[0].shape
    for i, t in enumerate(parts):
        if t.shape != first:
            raise ShapeError(
                f"{what}: item {i} has shape {tuple(t.shape)} but item 0 has {tuple(first)}; every point must have the "
                "same shape. Pad or crop them to one shape."
            )
    return torch.stack(parts)


@dataclass(frozen=True)
class Data:
    """Inputs ``X`` (n, *feature_shape), targets ``y`` (n, ...) and stable integer ``ids`` (n,).

    Examples:
        >>> import torch
        >>> d = Data.from_any((torch.zeros(5, 3), torch.tensor([0, 1, 0, 1, 1])))
        >>> len(d), tuple(d.feature_shape), d.without([1, 2]).ids.tolist()
        (5, (3,), [0, 3, 4])
    """

    X: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def from_any(cls, data: Any, *, what: str = "data") -> Data:
        """Normalise ``(X, y)``, a ``Dataset`` or a ``DataLoader`` into validated ``Data``."""
        if isinstance(data, Data):
            return data
        if isinstance(data, DataLoader):
            data = data.dataset
        if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
            X = _as_tensor(data[0], f"{what} X")
            y = _as_tensor(data[1], f"{what} y")
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, dict))
        ):
            n = len(data)  # type: ignore[arg-type]
            if n == 0:
                raise EmptyDataError(f"{what} is empty (0 points). Pass at least one (x, y) pair.")
            items = [data[i] for i in range(n)]
            for i, it in enumerate(items):
                if not (isinstance(it, (tuple, list)) and len(it) == 2):
                    got = f"a {type(it).__name__} of length {len(it)}" if isinstance(it, (tuple, list)) else type(it).__name__
                    raise InputError(f"{what}: each item of the Dataset must be an (x, y) pair; item {i} is {got}.")
            X = _stack([_as_tensor(x, f"{what} x") for x, _ in items], f"{what} x")
            y = _stack([_as_tensor(t, f"{what} y") for _, t in items], f"{what} y")
        else:
            raise InputError(
                f"{what} of type {type(data).__name__} is not understood. Pass (X, y) arrays, "
                "a torch Dataset of (x, y) pairs, or a DataLoader."
            )
        if X.ndim == 0 or y.ndim == 0:
            raise ShapeError(f"{what}: X and y need a leading sample axis; got shapes {tuple(X.shape)} and {tuple(y.shape)}.")
        if X.shape[0] != y.shape[0]:
            raise ShapeError(
                f"{what}: X has {X.shape[0]} rows but y has {y.shape[0]}; they must have one entry per point."
            )
        if X.shape[0] == 0:
            raise EmptyDataError(f"{what} is empty (0 points). Pass at least one (x, y) pair.")
        check_finite(X, f"{what} X", "Remove or impute those entries before computing influence.")
        check_finite(y, f"{what} y", "Remove or impute those entries before computing influence.")
        return cls(X, y, torch.arange(X.shape[0]))

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def feature_shape(self) -> torch.Size:
        return self.X.shape[1:]

    def subset(self, positions: Any) -> Data:
        """The points at ``positions`` (indices into this Data, not ids), keeping their ids."""
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise InputError(f"Index out of range: this data has {len(self)} points; got indices {idx.min()}..{idx.max()}.")
        return Data(self.X[idx], self.y[idx], self.ids[idx])

    def without(self, ids: Any) -> Data:
        """All points except those whose id is in ``ids`` (leave-out retraining)."""
        drop = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        keep = ~torch.isin(self.ids, drop)
        return Data(self.X[keep], self.y[keep], self.ids[keep])

    def batches(self, batch_size: int) -> Iterator[Data]:
        """Consecutive slices of at most ``batch_size`` points (an int ≥ 1)."""
        try:
            size = operator.index(batch_size)  # int, NumPy or torch integer scalars
        except TypeError:
            size = None
        if size is None or size < 1 or isinstance(batch_size, bool):
            raise InputError(f"Data.batches: batch_size must be an integer ≥ 1; got {batch_size!r}.")
        for s in range(0, len(self), size):
            yield Data(self.X[s : s + size], self.y[s : s + size], self.ids[s : s + size])

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Data:
        """Cast floating-point X and y to ``dtype`` (integer token ids and class labels keep theirs)."""
        X, y = self.X, self.y
        if dtype is not None:
            X = X.to(dtype) if X.is_floating_point() else X
            y = y.to(dtype) if y.is_floating_point() else y
        if device is not None:
            X, y = X.to(device), y.to(device)
        return Data(X, y, self.ids)
