"""Digests that key stored results: of tensors, training data, the model's parameters and buffers,
and a function's name — for the factor store (``solvers.kfac.KFAC.factor_fingerprint``) and the
score stores (``influence.fingerprint``). In core, the lowest layer that needs them (a solver may
not import ``influence``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..store import array_digest
from .data import Data
from .objective import Objective


def tensor_raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor's elements in row-major order (any dtype, bfloat16 included)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def digest_tensor(t: torch.Tensor) -> dict[str, Any]:
    """``store.array_digest`` of a tensor, with its torch dtype and shape."""
    t = t.detach().cpu()
    try:
        a = t.numpy()
    except TypeError:  # bfloat16 & co.: hash the raw bytes
        a = np.frombuffer(tensor_raw_bytes(t), dtype=np.uint8)
    d = array_digest(a)
    d["dtype"] = str(t.dtype)
    d["shape"] = list(t.shape)
    return d


def digest_data(data: Data) -> dict[str, Any]:
    """Digests of the inputs (each keyword input of a dict), the targets and the point ids."""
    X = {k: digest_tensor(t) for k, t in data.X.items()} if data.is_dict else digest_tensor(data.X)
    return {"X": X, "y": digest_tensor(data.y), "ids_sha256": digest_tensor(data.ids)["sha256"]}


def model_sha256(objective: Objective) -> str:
    """SHA-256 over every parameter and buffer of the model (θ̂ and the fixed part) with their
    names."""
    h = hashlib.sha256()
    for name, t in sorted(objective.model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(tensor_raw_bytes(t))
    return h.hexdigest()


def fn_name(fn: Callable[..., Any]) -> str:
    """A function's qualified name (its type's name for a callable object without one)."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
