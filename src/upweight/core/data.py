"""``Data``: one normalised, indexable view of every accepted input form.

Accepted: ``(X, y)`` tensors or NumPy arrays, a ``torch.utils.data.Dataset`` yielding
``(x, y)`` pairs, or a ``DataLoader`` over such a dataset (its dataset is read in order, so the
ids are stable even when the loader shuffles). Every point carries a stable integer id: its
position in the data it was built from.

Inputs may also be a *dict of tensors* with one row per point, as Hugging Face models take them
(``input_ids``, ``attention_mask``, …): ``(X_dict, y)``, a dict holding the targets under
``target`` (default ``"labels"``), or a Dataset whose items are such dicts. The model is then
called with the dict as keyword arguments (``Objective.outputs``).

X and y must be real numbers (float or integer; bool, complex, strings and dates are refused)
and finite, every point checked. Integer X is kept as is (token ids for nn.Embedding; a float
model fed integer pixels is refused by ``Objective.check_data`` with the conversion to make).
Unsigned integers wider than 8 bits become int64, since torch supports few operations on them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._checks import check_finite
from ..errors import DtypeError, EmptyDataError, InputError, ShapeError

#: a model's inputs for a set of points: one tensor, or a dict of tensors sharing the leading axis
Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]


def map_inputs(X: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` applied to the tensor ``X``, or to each tensor of a dict of inputs."""
    return {k: fn(v) for k, v in X.items()} if isinstance(X, Mapping) else fn(X)


_WIDE_UNSIGNED = tuple(
    getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)
)


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    """``a`` as a dense real tensor; unsigned integers wider than 8 bits (which torch supports for
    few operations) become int64."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.layout != torch.strided:
            raise DtypeError(
                f"{what} is a {t.layout} tensor; upweight needs a dense one. Convert it with"
                " .to_dense()."
            )
    elif isinstance(a, np.ndarray):
        if a.dtype == object or a.dtype.kind in "USVmM":
            raise DtypeError(
                f"{what} has dtype {a.dtype}; upweight needs numbers. Convert it with"
                " np.asarray(..., dtype=float)."
            )
        try:
            t = torch.from_numpy(np.ascontiguousarray(a))
        except TypeError as exc:  # long double, …: no torch dtype
            raise DtypeError(
                f"{what} has dtype {a.dtype}, which torch cannot hold. Convert it with"
                " np.asarray(..., dtype=np.float64)."
            ) from exc
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DtypeError(
                f"{what} of type {type(a).__name__} cannot be read as a numeric array: {exc}"
            ) from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise DtypeError(
            f"{what} has dtype {t.dtype}; upweight needs real numbers (float or integer). Convert"
            " it, e.g. with .float()."
        )
    if t.dtype in _WIDE_UNSIGNED:
        if (
            t.dtype == getattr(torch, "uint64", None)
            and t.numel()
            and bool((t.view(torch.int64) < 0).any())
        ):
            i = int(torch.argmax((t.view(torch.int64) < 0).reshape(-1).to(torch.uint8)))
            raise DtypeError(
                f"{what} has dtype uint64 with a value ≥ 2**63 at flat index {i}, beyond int64."
                " Rescale it or convert it to float."
            )
        t = t.to(torch.int64)
    return t


def _stack(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    """``torch.stack`` of one item per point, with a mismatch reported by its first
    offending item."""
    first = parts[0].shape
    for i, t in enumerate(parts):
        if t.shape != first:
            raise ShapeError(
                f"{what}: item {i} has shape {tuple(t.shape)} but item 0 has {tuple(first)}; every"
                " point must have the same shape. Pad or crop them to one shape."
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

    X: Inputs
    y: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def from_any(cls, data: Any, *, what: str = "data", target: str = "labels") -> Data:
        """Normalise ``(X, y)``, a ``Dataset`` or a ``DataLoader`` into validated ``Data``.

        ``X`` may be a dict of tensors (model keyword arguments); a dict (or a Dataset of dicts)
        carries its targets under the key ``target``."""
        if isinstance(data, Data):
            return data
        if isinstance(data, DataLoader):
            data = data.dataset
        if isinstance(data, Mapping):
            if target not in data:
                raise InputError(
                    f"{what} is a dict of inputs without the targets: expected them under"
                    f" {target!r} (keys: {sorted(data)}). Pass (inputs, y), or name the key with"
                    " target=…."
                )
            X = _as_inputs({k: v for k, v in data.items() if k != target}, what)
            y = _as_tensor(data[target], f"{what} {target}")
        elif isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
            X = _as_inputs(data[0], what)
            y = _as_tensor(data[1], f"{what} y")
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__")
            and hasattr(data, "__len__")
            and not isinstance(data, (str, bytes, dict))
        ):
            n = len(data)  # type: ignore[arg-type]
            if n == 0:
                raise EmptyDataError(f"{what} is empty (0 points). Pass at least one (x, y) pair.")
            items = [data[i] for i in range(n)]
            # Hugging Face style: one dict per point
            if all(isinstance(it, Mapping) for it in items):
                return cls.from_any(_stack_dicts(items, what, target), what=what, target=target)
            for i, it in enumerate(items):
                if not (isinstance(it, (tuple, list)) and len(it) == 2):
                    got = (
                        f"a {type(it).__name__} of length {len(it)}"
                        if isinstance(it, (tuple, list))
                        else type(it).__name__
                    )
                    raise InputError(
                        f"{what}: each item of the Dataset must be an (x, y) pair; item {i} is"
                        f" {got}."
                    )
            if all(isinstance(x, Mapping) for x, _ in items):
                X = _as_inputs(_stack_dicts([x for x, _ in items], what, None), what)
            else:
                X = _stack([_as_tensor(x, f"{what} x") for x, _ in items], f"{what} x")
            y = _stack([_as_tensor(t, f"{what} y") for _, t in items], f"{what} y")
        else:
            raise InputError(
                f"{what} of type {type(data).__name__} is not understood. Pass (X, y) arrays, "
                "a torch Dataset of (x, y) pairs, or a DataLoader."
            )
        shapes = {
            k: tuple(t.shape) for k, t in (X.items() if isinstance(X, Mapping) else [("X", X)])
        }
        if any(len(s) == 0 for s in shapes.values()) or y.ndim == 0:
            raise ShapeError(
                f"{what}: X and y need a leading sample axis; got shapes {_shown(shapes)} and"
                f" {tuple(y.shape)}."
            )
        rows = {k: s[0] for k, s in shapes.items()}
        if len(set(rows.values())) > 1:
            raise ShapeError(
                f"{what}: the inputs have different numbers of rows {rows}; each needs one row per"
                " point."
            )
        n = next(iter(rows.values()))
        if n != y.shape[0]:
            raise ShapeError(
                f"{what}: X has {n} rows but y has {y.shape[0]}; they must have one entry per"
                " point."
            )
        if n == 0:
            raise EmptyDataError(f"{what} is empty (0 points). Pass at least one (x, y) pair.")
        for k, t in X.items() if isinstance(X, Mapping) else [("", X)]:
            check_finite(
                t,
                f"{what} X" + (f"[{k!r}]" if k else ""),
                "Remove or impute those entries before computing influence.",
            )
        check_finite(y, f"{what} y", "Remove or impute those entries before computing influence.")
        return cls(X, y, torch.arange(n))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def is_dict(self) -> bool:
        """Whether the inputs are a dict of tensors (model keyword arguments)."""
        return isinstance(self.X, Mapping)

    @property
    def feature_shape(self) -> torch.Size:
        """The shape of one point's input (a single tensor's; for dict inputs use
        ``input_shapes``)."""
        if isinstance(self.X, Mapping):
            raise InputError(
                "These inputs are a dict of tensors; their per-point shapes are Data.input_shapes."
            )
        return self.X.shape[1:]

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per input (``"X"`` for a single tensor), the shape of one point's part of it."""
        items = self.X.items() if isinstance(self.X, Mapping) else [("X", self.X)]
        return {k: tuple(t.shape[1:]) for k, t in items}

    def subset(self, positions: Any) -> Data:
        """The points at ``positions`` (indices into this Data, not ids), keeping their ids."""
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise InputError(
                f"Index out of range: this data has {len(self)} points; got indices"
                f" {idx.min()}..{idx.max()}."
            )
        return Data(map_inputs(self.X, lambda t: t[idx]), self.y[idx], self.ids[idx])

    def without(self, ids: Any) -> Data:
        """All points except those whose id is in ``ids`` (leave-out retraining)."""
        drop = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        keep = ~torch.isin(self.ids, drop)
        return Data(map_inputs(self.X, lambda t: t[keep]), self.y[keep], self.ids[keep])

    def batches(self, batch_size: int) -> Iterator[Data]:
        """Consecutive slices of at most ``batch_size`` points (an int ≥ 1)."""
        try:
            size = operator.index(batch_size)  # int, NumPy or torch integer scalars
        except TypeError:
            size = None
        if size is None or size < 1 or isinstance(batch_size, bool):
            raise InputError(
                f"Data.batches: batch_size must be an integer ≥ 1; got {batch_size!r}."
            )
        for s in range(0, len(self), size):
            yield Data(
                map_inputs(self.X, lambda t, s=s: t[s : s + size]),
                self.y[s : s + size],
                self.ids[s : s + size],
            )

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Data:
        """Cast floating-point X and y to ``dtype`` (integer token ids and class labels keep
        theirs)."""
        X, y = self.X, self.y
        if dtype is not None:
            X = map_inputs(X, lambda t: t.to(dtype) if t.is_floating_point() else t)
            y = y.to(dtype) if y.is_floating_point() else y
        if device is not None:
            X, y = map_inputs(X, lambda t: t.to(device)), y.to(device)
        return Data(X, y, self.ids)


def _shown(shapes: dict[str, tuple[int, ...]]) -> str:
    return str(next(iter(shapes.values()))) if list(shapes) == ["X"] else str(shapes)


def _as_inputs(X: Any, what: str) -> Inputs:
    """A tensor, or a dict of tensors (Hugging Face keyword inputs; a ``BatchEncoding`` is a
    mapping)."""
    if isinstance(X, Mapping):
        if not X:
            raise InputError(f"{what}: the dict of inputs is empty.")
        bad = [k for k in X if not isinstance(k, str)]
        if bad:
            raise InputError(
                f"{what}: input names must be strings (model keyword arguments); got {bad[:3]}."
            )
        return {k: _as_tensor(v, f"{what} X[{k!r}]") for k, v in X.items()}
    return _as_tensor(X, f"{what} X")


def _stack_dicts(items: list[Mapping[str, Any]], what: str, target: str | None) -> dict[str, Any]:
    """One dict of stacked tensors from one dict per point (all with the same keys)."""
    keys = list(items[0])
    for i, it in enumerate(items):
        if list(it) != keys and set(it) != set(keys):
            raise InputError(
                f"{what}: item {i} has keys {sorted(it)} but item 0 has {sorted(keys)}."
            )
    if target is not None and target not in keys:
        raise InputError(
            f"{what}: the Dataset's dict items carry no targets under {target!r} (keys:"
            f" {sorted(keys)})."
        )
    return {
        k: _stack([_as_tensor(it[k], f"{what} {k}") for it in items], f"{what} {k}") for k in keys
    }
