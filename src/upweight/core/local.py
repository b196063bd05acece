"""Per-point gradients of the parameters outside factorable layers, computed inside their own
module: LayerNorm / RMSNorm scales and shifts, learned position embeddings (whose input is shared
by the whole batch), small custom modules.

A module m called once per forward pass maps its input xᵢ (point i's rows, or an input shared by
the batch) to its output yᵢ = m(xᵢ; φ). With bᵢ = ∂L(zᵢ)/∂yᵢ its output cotangent (from the
ordinary backward pass of the batch, as for a factorable layer in ``core.layers``), the per-point
gradient of its own parameters φ is the module-local vector–Jacobian product

    ∇φ L(zᵢ) = (∂yᵢ/∂φ)ᵀ bᵢ,

evaluated point by point with ``torch.func.vmap`` over m's forward alone — not over the whole
network, which is what a per-sample gradient of φ costs otherwise. For ``nn.LayerNorm``, in every
transformer block, the product has a closed form (y = x̂ ⊙ w + b: Σ bᵢ ⊙ x̂ᵢ and Σ bᵢ over point i's
tokens), taken without a traced call per point. With the output-Hessian factors cₖ as cotangents
(``capture(cotangents="ggn")``), the same product gives the GGN's pseudo-gradients uᵢₖ, and G_φφ =
(1/n) Σᵢₖ uᵢₖuᵢₖᵀ is the Gauss–Newton matrix restricted to φ, exactly (K-FAC keeps it as one dense
block per module, ``solvers.kfac``).

An output shared by the batch (leading size 1 for b > 1 points, e.g. position embeddings added to
every sequence) is expanded to b rows in the forward hook, so that its cotangent is per point;
broadcasting made every later operation see those values anyway.
``core.layers.find_layers(local=True)`` keeps only the modules whose rebuilt gradient Σᵢ ∇φL(zᵢ)
equals autograd's on probe points, so a parameter also used outside its module, a module called
twice, or a forward ``vmap`` cannot run, stays with the caller's generic path, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..errors import UnsupportedModelError
from .objective import Objective
from .params import Params

#: the largest module (in parameters) whose dense Gauss–Newton block K-FAC keeps: 8·p² bytes each
DEFAULT_MAX_LOCAL = 4096


@dataclass(frozen=True)
class LocalModule:
    """A module whose own parameters in θ get module-local per-point gradients.

    Attributes:
        name: the module's name in the model.
        module: the module.
        params: the full names of its parameters in θ (direct parameters of the module), θ order.
        index: their positions in the flat θ, concatenated in ``params`` order.
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    params: tuple[str, ...]
    index: torch.Tensor = field(repr=False)

    @property
    def size(self) -> int:
        return int(self.index.numel())


def candidates(
    objective: Objective, names: Sequence[str], offsets: dict[str, int], *, max_size: int | None
) -> tuple[list[LocalModule], dict[str, str]]:
    """Group the parameters ``names`` by the module that owns them directly; the model itself, a
    parameter owned by several modules, or a module over ``max_size`` parameters is not a
    candidate (by name → why)."""
    sizes = dict(zip(objective.space.names, objective.space.sizes))
    owners: dict[int, list[str]] = {}
    for mname, mod in objective.model.named_modules():
        for pname, t in mod.named_parameters(recurse=False):
            owners.setdefault(id(t), []).append(f"{mname}.{pname}" if mname else pname)
    modules = dict(objective.model.named_modules())
    groups: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for n in names:
        mname = n.rpartition(".")[0]
        t = dict(modules[mname].named_parameters(recurse=False)).get(n.rpartition(".")[2])
        if not mname:
            reasons[n] = "a parameter of the model itself (its module is the whole network)"
        elif t is None or len(owners.get(id(t), ())) > 1:
            reasons[n] = "owned by several modules (tied)"
        else:
            groups.setdefault(mname, []).append(n)
    out = []
    for mname, ps in groups.items():
        size = sum(sizes[n] for n in ps)
        if max_size is not None and size > max_size:
            for n in ps:
                reasons[n] = (
                    f"module '{mname}' has {size} parameters in θ, above the {max_size} of a dense "
                    "module-local block"
                )
            continue
        idx = torch.cat([offsets[n] + torch.arange(sizes[n]) for n in ps])
        out.append(LocalModule(mname, modules[mname], tuple(ps), idx))
    return out, reasons


class Recorder:
    """Forward hooks on local modules for one batch of ``b`` points: keeps each call's inputs and
    output (an output shared by the batch expanded to b rows, see the module docstring)."""

    def __init__(self, modules: Sequence[LocalModule], b: int) -> None:
        self.modules, self.b = list(modules), b
        self.args: dict[str, tuple[Any, ...]] = {}
        self.kwargs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {m.name: 0 for m in modules}

    @contextmanager
    def hooks(self) -> Iterator[Recorder]:
        handles = []
        for lm in self.modules:

            def hook(
                _m: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                out: Any,
                name: str = lm.name,
            ) -> Any:
                self.calls[name] += 1
                if not isinstance(out, torch.Tensor) or out.ndim == 0:
                    return None
                self.args[name] = tuple(_detached(a) for a in args)
                self.kwargs[name] = {k: _detached(v) for k, v in kwargs.items()}
                if self.b > 1 and out.shape[0] == 1:
                    out = out.expand(self.b, *out.shape[1:])
                self.outputs[name] = out
                return out

            handles.append(lm.module.register_forward_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def point_grads(
        self, lm: LocalModule, state: Params, cotangents: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """(K, b, size): the module-local per-point gradients of ``lm``'s parameters for each of the
        K output cotangents (b, …) (``None``: the output did not reach the loss, zero)."""
        prefix = lm.name + "."
        local = {n[len(prefix) :]: state[n] for n in lm.params}
        rest = {
            n[len(prefix) :]: t
            for n, t in state.items()
            if n.startswith(prefix) and n not in lm.params
        }
        args, kwargs, b = self.args[lm.name], self.kwargs[lm.name], self.b
        out = self.outputs[lm.name]
        arg_dims = tuple(0 if _per_point(a, b) else None for a in args)
        kw_dims = {k: 0 if _per_point(v, b) else None for k, v in kwargs.items()}

        def pulled(p: Params, a: tuple[Any, ...], kw: dict[str, Any], cs: torch.Tensor) -> Params:
            a = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(a, arg_dims))
            kw = {k: v.unsqueeze(0) if kw_dims[k] == 0 else v for k, v in kw.items()}
            y, pull = vjp(lambda q: functional_call(lm.module, {**rest, **q}, a, kw), p)
            # one forward, the K cotangents pulled back
            return vmap(pull)(cs.reshape(len(cs), *y.shape))[0]

        for c in cotangents:
            if c is not None and c.shape[0] != b:
                raise UnsupportedModelError(
                    f"Module '{lm.name}': its output cotangent has {c.shape[0]} rows for {b}"
                    " points, so it has no per-point gradients of its own."
                )
        # (K, b, …)
        cs = torch.stack(
            [out.new_zeros(out.shape) if c is None else c.detach() for c in cotangents]
        )
        closed = _layer_norm_grads(lm.module, args, kwargs, cs)
        if closed is not None:
            return torch.cat(
                [closed[n[len(prefix) :]].reshape(len(cs), b, -1) for n in lm.params], dim=2
            )
        # each (b, K, …)
        g = vmap(pulled, in_dims=(None, arg_dims, kw_dims, 1))(local, args, kwargs, cs)
        rows = torch.cat([g[n[len(prefix) :]].reshape(b, len(cs), -1) for n in lm.params], dim=2)
        return rows.transpose(0, 1)


def _layer_norm_grads(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], cs: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """The per-point gradients of an ``nn.LayerNorm``'s own weight and bias in closed form, or
    ``None`` for any other module (the generic ``vmap`` path then): y = x̂ ⊙ w + b with x̂ the
    input normalised over the last dims, so ∂L/∂w = Σ c ⊙ x̂ and ∂L/∂b = Σ c, summed over each
    point's other dims (its tokens), for the cotangents c in ``cs`` (K, b, …) — what the ``vmap``
    of the module's vector–Jacobian product gives, without a traced call per point."""
    if type(module) is not nn.LayerNorm or not module.elementwise_affine or kwargs:
        return None
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    shape = tuple(module.normalized_shape)
    x_hat = torch.nn.functional.layer_norm(args[0], shape, None, None, module.eps).to(cs.dtype)
    # one row per point, or one shared by the batch (broadcast like the output)
    if x_hat.shape[1:] != cs.shape[2:] or x_hat.shape[0] not in (1, cs.shape[1]):
        return None
    # the point's dims besides the normalised ones: its tokens (none for one vector a point; an
    # empty dim list would sum over every dim)
    token_dims = tuple(range(2, cs.ndim - len(shape)))

    def per_point(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=token_dims) if token_dims else t

    out = {"weight": per_point(cs * x_hat)}
    if module.bias is not None:
        out["bias"] = per_point(cs)
    return out


def _detached(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _per_point(v: Any, b: int) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == b


def module_state(objective: Objective, params: Params, modules: Sequence[LocalModule]) -> Params:
    """Every tensor of the local modules as the forward pass saw it: θ's entries from ``params``,
    the fixed ones cast like ``Objective.outputs`` casts them."""
    dtype = next(iter(params.values())).dtype
    prefixes = tuple(lm.name + "." for lm in modules)
    values = {**objective.fixed_as(dtype), **params}
    return {n: t for n, t in values.items() if n.startswith(prefixes)}
