"""``Objective``: the model, its per-sample loss, the L2 term and the test-side measurement,
as pure functions of the parameters (torch.func).

R(θ) = (1/n) Σᵢ L(zᵢ, θ) + (l2/2)‖θ‖²   — Koh & Liang (2017) §2; H = ∇²R(θ̂).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn
from torch.func import functional_call

from .._checks import check_finite, check_interval
from ..errors import InputError, UnsupportedModelError
from .data import Data
from .losses import LOSSES, PerSampleLoss
from .params import Params, ParamSpace

ParamSelector = Union[Sequence[str | nn.Module], Callable[[str, torch.Tensor], bool], str, nn.Module, None]

_TRAIN_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)


class Objective:
    """R(θ) = (1/n) Σᵢ L(zᵢ, θ) + (l2/2)‖θ‖² for an ``nn.Module`` — Koh & Liang (2017) §2.

    Holds no data: the training data arrives at ``Influence.fit``, so one objective serves the
    full fit, leave-one-out refits and test points.

    Args:
        model: a module in eval mode (BatchNorm statistics and dropout are frozen); its current
            parameter values are θ̂.
        loss: a name ("cross_entropy", "logistic", "squared", "hinge") or a callable
            ``loss(output, target)`` returning one loss per sample, shape (b,).
        l2: λ ≥ 0 of the L2 term, folded into R and therefore into H.
        params: which parameters form θ: ``None`` (all that require grad), a name, a module,
            a sequence of names / name prefixes / submodules, or a predicate ``(name, tensor) → bool``.
            The others stay fixed (the paper's frozen feature extractor).
        measure: the test-side quantity f(output, target) → (b,) whose influence is computed;
            defaults to the loss (I_up,loss). E.g. a logit margin.
        l2_exclude: names or name prefixes of parameters in θ that the L2 term leaves out (an
            unpenalised intercept, as scikit-learn does): they get no l2 in R nor in H.

    Examples:
        >>> import torch
        >>> obj = Objective(torch.nn.Linear(3, 2).eval(), "cross_entropy", l2=0.1, params="weight")
        >>> obj.space.names, obj.p
        (('weight',), 6)
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | PerSampleLoss = "cross_entropy",
        *,
        l2: float = 0.0,
        params: ParamSelector = None,
        measure: PerSampleLoss | None = None,
        l2_exclude: Sequence[str] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        for name, mod in model.named_modules():
            if mod.training and isinstance(mod, _TRAIN_MODE_SENSITIVE):
                raise UnsupportedModelError(
                    f"Module '{name or type(mod).__name__}' ({type(mod).__name__}) is in training mode, so the loss "
                    "is random or updates buffers. Call model.eval() before building the Objective."
                )
        check_interval("Objective", "l2", l2, 0.0, None, closed="left")
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise InputError(f"Unknown loss {loss!r}. Use one of {sorted(LOSSES)} or pass a callable loss(output, target) -> (b,).")
            self.loss_name, loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss_name, loss_fn = getattr(loss, "__name__", type(loss).__name__), loss
        else:
            raise InputError(f"loss must be a name or a callable; got {type(loss).__name__}.")
        self.model = model
        self.loss_fn: PerSampleLoss = loss_fn
        self.measure_fn: PerSampleLoss = measure if measure is not None else loss_fn
        self.l2 = float(l2)

        chosen = _select(model, params)
        named = dict(model.named_parameters())
        self.params: Params = {n: named[n].detach() for n in chosen}
        for n, t in self.params.items():
            check_finite(t, f"Model parameter '{n}'", "The model must be trained to finite values before computing influence.")
        self.space = ParamSpace.of(self.params)
        excluded = {n for n in self.params for e in l2_exclude if n == e or n.startswith(e + ".")}
        unknown = [e for e in l2_exclude if not any(n == e or n.startswith(e + ".") for n in self.params)]
        if unknown:
            raise InputError(f"l2_exclude: {unknown} match no parameter of θ. θ is: {list(self.params)}.")
        self.l2_names: tuple[str, ...] = tuple(n for n in self.params if n not in excluded)
        self._fixed: Params = {n: t.detach() for n, t in named.items() if n not in self.params}
        self._fixed.update({n: b.detach() for n, b in model.named_buffers()})
        self._fixed_cache: dict[torch.dtype, Params] = {}

    # ── shape of θ ────────────────────────────────────────────────────────────────────
    @property
    def p(self) -> int:
        """Number of parameters in θ."""
        return self.space.p

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    # ── pure functions of θ ───────────────────────────────────────────────────────────
    def _fixed_as(self, dtype: torch.dtype) -> Params:
        if dtype not in self._fixed_cache:
            self._fixed_cache[dtype] = {n: t.to(dtype) if t.is_floating_point() else t for n, t in self._fixed.items()}
        return self._fixed_cache[dtype]

    def outputs(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        """Model outputs f(X; θ) with the fixed parameters and buffers filled in."""
        dtype = next(iter(params.values())).dtype
        if X.is_floating_point() and X.dtype != dtype:
            X = X.to(dtype)
        return functional_call(self.model, {**self._fixed_as(dtype), **params}, (X,))

    def losses(self, params: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample training losses L(zᵢ, θ), shape (b,)."""
        return self.loss_fn(self.outputs(params, X), y)

    def measurements(self, params: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample test measurements f(z, θ) (default: the loss), shape (b,)."""
        return self.measure_fn(self.outputs(params, X), y)

    def regularizer(self, params: Params) -> torch.Tensor:
        """(l2/2)‖θ‖² over the penalised parameters, folded into R and H."""
        return 0.5 * self.l2 * sum((params[n] * params[n]).sum() for n in self.l2_names)

    def l2_diagonal(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """∇²θ of the L2 term: l2 on penalised coordinates, 0 on excluded ones, shape (p,)."""
        parts = [
            torch.full((size,), self.l2 if name in self.l2_names else 0.0, dtype=dtype or self.dtype)
            for name, size in zip(self.space.names, self.space.sizes)
        ]
        return torch.cat(parts)

    # ── validation ────────────────────────────────────────────────────────────────────
    def check_data(self, data: Data, *, what: str, measure: bool = False) -> None:
        """Run the model on a few points of ``data`` and check the loss is per-sample and finite."""
        b = min(len(data), 4)
        batch = data.subset(range(b))
        fn, fn_name = (self.measure_fn, "measure") if measure else (self.loss_fn, "loss")
        try:
            out = self.outputs(self.params, batch.X)
        except Exception as exc:  # noqa: BLE001 — re-raised with the shapes that explain it
            raise InputError(
                f"The model failed on {what} X of shape {tuple(data.X.shape)} (dtype {data.X.dtype}): {exc}"
            ) from exc
        try:
            val = fn(out, batch.y)
        except Exception as exc:  # noqa: BLE001
            hint = ""
            if self.loss_name == "cross_entropy" and batch.y.is_floating_point():
                hint = " cross_entropy needs integer class labels: pass y as a long tensor (y.long())."
            raise InputError(
                f"The {fn_name} failed on model outputs of shape {tuple(out.shape)} and {what} y of shape "
                f"{tuple(batch.y.shape)} (dtype {batch.y.dtype}): {exc}.{hint}"
            ) from exc
        if tuple(val.shape) != (b,):
            raise UnsupportedModelError(
                f"The {fn_name} returned shape {tuple(val.shape)} for a batch of {b} points; it must return one value "
                f"per sample, shape ({b},). For a torch.nn loss, construct it with reduction='none'."
            )


def _select(model: nn.Module, params: ParamSelector) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, t in named.items() if t.requires_grad]
    elif callable(params) and not isinstance(params, nn.Module):
        chosen = [n for n, t in named.items() if params(n, t)]
    else:
        items = [params] if isinstance(params, (str, nn.Module)) else list(params)
        wanted: set[str] = set()
        for item in items:
            if isinstance(item, nn.Module):
                ids = {id(t) for t in item.parameters()}
                hits = [n for n, t in named.items() if id(t) in ids]
            else:
                hits = [n for n in named if n == item or n.startswith(item + ".")]
            if not hits:
                raise InputError(f"params: {item!r} matches no parameter of the model. Parameters are: {list(named)}.")
            wanted.update(hits)
        chosen = [n for n in named if n in wanted]
    if not chosen:
        raise InputError("No parameters selected for θ: the model has none requiring grad, or the selection is empty.")
    return chosen
