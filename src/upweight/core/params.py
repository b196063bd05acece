"""``ParamSpace``: which parameters are θ, and the dict ⇄ flat-vector map."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamSpace:
    """Names and shapes of the parameters that make up θ, in a fixed order.

    ``flatten`` maps a params dict to a vector (p,) or, with a leading batch axis, (k, p);
    ``unflatten`` is its inverse.

    Examples:
        >>> import torch
        >>> s = ParamSpace(("w", "b"), ((2, 3), (2,)))
        >>> s.p, tuple(s.unflatten(torch.arange(8.))["b"].tolist())
        (8, (6.0, 7.0))
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> ParamSpace:
        return cls(tuple(params), tuple(tuple(t.shape) for t in params.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def p(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``params`` into (p,) — or (*batch, p) with ``batch_dims`` leading axes."""
        parts = []
        for name in self.names:
            t = params[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vec: torch.Tensor) -> Params:
        """Split a (..., p) vector into a params dict with leading axes kept."""
        if vec.shape[-1] != self.p:
            raise ValueError(
                f"Expected a vector with last dimension p={self.p}; got shape {tuple(vec.shape)}."
            )
        lead = vec.shape[:-1]
        out: Params = {}
        for name, shape, chunk in zip(self.names, self.shapes, vec.split(self.sizes, dim=-1)):
            out[name] = chunk.reshape(*lead, *shape)
        return out
