"""``Objective``: the model, its per-sample loss, the L2 term and the test-side measurement,
as pure functions of the parameters (torch.func).

R(θ) = (1/n) Σᵢ L(zᵢ, θ) + (l2/2)‖θ‖²   — Koh & Liang (2017) §2; H = ∇²R(θ̂).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from .._checks import check_finite, check_interval
from ..errors import DtypeError, InputError, UnsupportedModelError, UpweightError
from .data import Data, Inputs, map_inputs
from .losses import LOSSES, PerSampleLoss
from .params import Params, ParamSpace

ParamSelector = Union[
    Sequence[str | nn.Module], Callable[[str, torch.Tensor], bool], str, nn.Module, None
]

# A module in training mode computes a different function than in eval mode only if code reads
# its ``training`` flag: BatchNorm (batch statistics, buffer updates), Dropout, RReLU, RNNs,
# MultiheadAttention, Transformer layers — or a user-defined module calling, e.g.,
# F.dropout(x, training=self.training). ``_reads_training_flag`` looks for such reads in the
# code of the module's class and its bases; the torch.nn layers below are known not to have any
# (a fast path that also skips their docstrings), by exact type: a subclass may override forward.
_MODE_FREE_NAMES = (
    "Identity Linear Bilinear Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d"
    " Embedding EmbeddingBag LayerNorm GroupNorm RMSNorm LocalResponseNorm Flatten Unflatten"
    " Sequential ModuleList ModuleDict ParameterList ParameterDict MaxPool1d MaxPool2d MaxPool3d"
    " AvgPool1d AvgPool2d AvgPool3d LPPool1d LPPool2d LPPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d"
    " AdaptiveMaxPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d ZeroPad1d ZeroPad2d"
    " ZeroPad3d ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d ReflectionPad2d"
    " ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d CircularPad1d"
    " CircularPad2d CircularPad3d Upsample UpsamplingNearest2d UpsamplingBilinear2d PixelShuffle"
    " PixelUnshuffle ChannelShuffle Fold Unfold CosineSimilarity PairwiseDistance Threshold ReLU"
    " ReLU6 LeakyReLU PReLU ELU CELU SELU GELU SiLU Mish GLU Sigmoid LogSigmoid Hardsigmoid Tanh"
    " Hardtanh Hardswish Hardshrink Softshrink Tanhshrink Softplus Softsign Softmin Softmax"
    " Softmax2d LogSoftmax"
)
_MODE_FREE: frozenset[type] = frozenset(
    getattr(nn, n) for n in _MODE_FREE_NAMES.split() if hasattr(nn, n)
)
_MODE_SENSITIVE = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
)


@functools.cache
def _reads_training_flag(cls: type) -> bool:
    """Whether the code of ``cls`` or of a base class (``nn.Module`` itself aside) reads an
    attribute ``training`` (``self.training``, ``getattr(m, "training")``) — docstrings and
    comments do not count. An ``nn.Module`` class whose source cannot be read is assumed to."""
    for c in cls.__mro__:
        if c in (object, nn.Module) or c in _MODE_FREE:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        except (OSError, TypeError, SyntaxError):
            if issubclass(c, nn.Module):
                return True
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "training") or (
                isinstance(node, ast.Constant) and node.value == "training"
            ):
                return True
    return False


def _mode_sensitive(mod: nn.Module) -> bool:
    """Whether ``mod``'s forward can depend on its training flag (see ``_reads_training_flag``)."""
    cls = type(mod)
    if cls in _MODE_FREE:
        return False
    return isinstance(mod, _MODE_SENSITIVE) or _reads_training_flag(cls)


# torch's messages for an input of the wrong dtype reaching a layer (F.linear, conv, embedding)
_DTYPE_FAILURE = re.compile(
    r"dtype|scalar type|input type|same type|FloatTensor|LongTensor|'indices'", re.IGNORECASE
)
_HALF = (torch.float16, torch.bfloat16)


class Objective:
    """R(θ) = (1/n) Σᵢ L(zᵢ, θ) + (l2/2)‖θ‖² for an ``nn.Module`` — Koh & Liang (2017) §2.

    Holds no data: the training data arrives at ``Influence.fit``, so one objective serves the
    full fit, leave-one-out refits and test points.

    The model is read, never written: θ̂ and the buffers (BatchNorm running statistics, …) are
    copied at construction, so training the model further, or switching it to training mode,
    neither changes this objective nor lets upweight change the model.

    Half precision: a model whose θ is float16 or bfloat16 is evaluated in float32 — θ̂ is copied
    to float32 and the fixed parameters, buffers and floating inputs are cast to float32 when
    the model runs — so ``dtype`` is float32 and every solver works in float32. What is computed
    is the influence for the model evaluated in float32 at the half-precision values θ̂ (exactly
    representable in float32); the model itself keeps its dtype.

    Args:
        model: a module in eval mode (BatchNorm uses its running statistics, dropout is off);
            its current parameter values are θ̂. Modules whose forward ignores the training flag
            (Linear, Conv, Embedding, activations, custom modules that never read
            ``self.training``) may stay in training mode; any other module in training mode is
            refused with ``UnsupportedModelError`` (``check_eval_mode``): call ``model.eval()``.
        loss: a name ("cross_entropy", "logistic", "squared", "hinge") or a callable
            ``loss(output, target)`` returning one loss per sample, shape (b,). The named losses
            (and ``SmoothHinge``) validate the targets of every data set (``check_data``).
        l2: λ ≥ 0 of the L2 term, folded into R and therefore into H.
        params: which parameters form θ: ``None`` (all that require grad), a name, a module,
            a sequence of names / name prefixes / submodules, or a predicate ``(name, tensor) →
            bool``. The others stay fixed (the paper's frozen feature extractor).
        measure: the test-side quantity f(output, target) → (b,) whose influence is computed;
            defaults to the loss (I_up,loss). E.g. a logit margin.
        l2_exclude: names or name prefixes of parameters in θ that the L2 term leaves out (an
            unpenalised intercept, as scikit-learn does): they get no l2 in R nor in H.
        output: which tensor of the model's return value the loss and measure read: ``None``
            (default) — a tensor as is, the ``logits`` of a Hugging Face ``ModelOutput`` (or of
            any mapping or object that has them), the first element of a tuple — an attribute
            or key name, or a callable ``output(returned) -> tensor``.

    Examples:
        >>> import torch
        >>> obj = Objective(torch.nn.Linear(3, 2).eval(), "cross_entropy", l2=0.1, params="weight")
        >>> obj.space.names, obj.p
        (('weight',), 6)
        >>> Objective(torch.nn.Linear(3, 2).to(torch.bfloat16), "cross_entropy").dtype
        torch.float32
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
        output: str | Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        # the modules whose training flag can change the forward, read before every evaluation
        self._mode_sensitive: tuple[tuple[str, nn.Module], ...] = tuple(
            (name, mod) for name, mod in model.named_modules() if _mode_sensitive(mod)
        )
        self.check_eval_mode()
        check_interval("Objective", "l2", l2, 0.0, None, closed="left")
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise InputError(
                    f"Unknown loss {loss!r}. Use one of {sorted(LOSSES)} or pass a callable"
                    " loss(output, target) -> (b,)."
                )
            self.loss_name, loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss_name, loss_fn = getattr(loss, "__name__", type(loss).__name__), loss
        else:
            raise InputError(f"loss must be a name or a callable; got {type(loss).__name__}.")
        self.loss_fn: PerSampleLoss = loss_fn
        self.measure_fn: PerSampleLoss = measure if measure is not None else loss_fn
        if not (output is None or isinstance(output, str) or callable(output)):
            raise InputError(
                "output must be None, an attribute/key name such as 'logits', or a callable; got"
                f" {output!r}."
            )
        self.output = output
        self.l2 = float(l2)

        chosen = _select(model, params)
        named = dict(model.named_parameters())
        # θ̂ is a copy (float32 for half-precision parameters): later changes to the model do not
        # reach it
        self.params: Params = {
            n: (
                named[n].detach().to(torch.float32)
                if named[n].dtype in _HALF
                else named[n].detach().clone()
            )
            for n in chosen
        }
        for n, t in self.params.items():
            check_finite(
                t,
                f"Model parameter '{n}'",
                "The model must be trained to finite values before computing influence.",
            )
        self.space = ParamSpace.of(self.params)
        excluded = {n for n in self.params for e in l2_exclude if n == e or n.startswith(e + ".")}
        unknown = [
            e for e in l2_exclude if not any(n == e or n.startswith(e + ".") for n in self.params)
        ]
        if unknown:
            raise InputError(
                f"l2_exclude: {unknown} match no parameter of θ. θ is: {list(self.params)}."
            )
        self.l2_names: tuple[str, ...] = tuple(n for n in self.params if n not in excluded)
        # fixed parameters are shared (upweight only reads them); buffers are copied, because a
        # module in training mode (BatchNorm) updates the buffers it is given in place
        self._fixed: Params = {n: t.detach() for n, t in named.items() if n not in self.params}
        self._fixed.update({n: b.detach().clone() for n, b in model.named_buffers()})
        self._fixed_cache: dict[torch.dtype, Params] = {}
        # what torch.func.vmap refused on this model, learnt on first use (core.grads,
        # core.curvature): then per-sample gradients / Gauss–Newton tangents go one at a time
        self._vmap_refused: str | None = None
        self._tangent_vmap_refused = False

    # ── shape of θ ────────────────────────────────────────────────────────────────────
    @property
    def p(self) -> int:
        """Number of parameters in θ."""
        return self.space.p

    @property
    def dtype(self) -> torch.dtype:
        """The dtype θ is evaluated in (float32 for a half-precision model)."""
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        """The device θ lives on (the model's): inputs are moved there, results are
        computed there."""
        return next(iter(self.params.values())).device

    # ── the model's mode ──────────────────────────────────────────────────────────────
    def check_eval_mode(self) -> None:
        """Raise ``UnsupportedModelError`` if a module whose forward can depend on the training
        flag is in training mode, naming every such module.

        In training mode BatchNorm normalises with batch statistics and updates its running
        buffers, dropout is random, and a user-defined module may read ``self.training``; influence
        needs the model as one fixed function of θ. A module counts as mode-dependent when the code
        of its class (or a base class) reads ``.training`` or cannot be read; torch.nn layers that
        ignore the flag (Linear, Conv, Embedding, LayerNorm, activations, containers, …) and
        user-defined modules that never read it are accepted in either mode, since a model is in
        training mode from its construction on. The check walks the model's modules at each call,
        so it also catches ``model.train()`` called after the objective was built.
        """
        bad = [
            (name, mod)
            for name, mod in self.model.named_modules()
            if mod.training and _mode_sensitive(mod)
        ]
        if not bad:
            return
        shown = ", ".join(f"'{name or '<model>'}' ({type(mod).__name__})" for name, mod in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UnsupportedModelError(
            f"Module {shown}{more} of the model {'is' if len(bad) == 1 else 'are'} in training"
            " mode. There BatchNorm normalises with batch statistics and updates its running"
            " buffers, dropout is random, and a custom module may read self.training, but"
            " influence needs the model as one fixed function of θ. Call model.eval() after"
            " training, before building the Objective or computing influence."
        )

    def _check_mode_fast(self) -> None:
        """``check_eval_mode`` over the modules seen at construction (a loop over their flags)."""
        for _, mod in self._mode_sensitive:
            if mod.training:
                self.check_eval_mode()

    # ── pure functions of θ ───────────────────────────────────────────────────────────
    def fixed_as(self, dtype: torch.dtype) -> Params:
        """The parameters outside θ and the buffers, floating ones cast to ``dtype`` (cached per
        dtype)."""
        if dtype not in self._fixed_cache:
            self._fixed_cache[dtype] = {
                n: t.to(dtype) if t.is_floating_point() else t for n, t in self._fixed.items()
            }
        return self._fixed_cache[dtype]

    def outputs(self, params: Params, X: Inputs) -> torch.Tensor:
        """Model outputs f(X; θ) with the fixed parameters and buffers filled in.

        X is moved to θ's device (and floating inputs cast to θ's dtype); a dict of inputs is
        passed as keyword arguments. What the model returns is reduced to one tensor by
        ``output``: by default a tensor as is, a Hugging Face ``ModelOutput`` (or any mapping or
        object with ``logits``) by its logits, a tuple by its first element.

        Raises ``UnsupportedModelError`` if the model was switched to training mode."""
        self._check_mode_fast()
        ref = next(iter(params.values()))
        dtype, device = ref.dtype, ref.device

        def placed(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        X = map_inputs(X, placed)
        values = {**self.fixed_as(dtype), **params}
        if isinstance(X, Mapping):
            out = functional_call(self.model, values, args=(), kwargs=X)
        else:
            out = functional_call(self.model, values, (X,))
        return _select_output(out, self.output)

    def losses(self, params: Params, X: Inputs, y: torch.Tensor) -> torch.Tensor:
        """Per-sample training losses L(zᵢ, θ), shape (b,)."""
        out = self.outputs(params, X)
        return self.loss_fn(out, y.to(out.device))

    def measurements(self, params: Params, X: Inputs, y: torch.Tensor) -> torch.Tensor:
        """Per-sample test measurements f(z, θ) (default: the loss), shape (b,)."""
        out = self.outputs(params, X)
        return self.measure_fn(out, y.to(out.device))

    def regularizer(self, params: Params) -> torch.Tensor:
        """(l2/2)‖θ‖² over the penalised parameters, folded into R and H."""
        return 0.5 * self.l2 * sum((params[n] * params[n]).sum() for n in self.l2_names)

    def l2_diagonal(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """∇²θ of the L2 term: l2 on penalised coordinates, 0 on excluded ones, shape (p,)."""
        parts = [
            torch.full(
                (size,), self.l2 if name in self.l2_names else 0.0, dtype=dtype or self.dtype
            )
            for name, size in zip(self.space.names, self.space.sizes)
        ]
        return torch.cat(parts)

    # ── validation ────────────────────────────────────────────────────────────────────
    def check_data(self, data: Data, *, what: str, measure: bool = False) -> None:
        """Validate ``data`` for this objective, once per data set.

        Runs the model on a few points (twice: a forward that differs between two runs is random,
        e.g. dropout outside a module), checks that the loss (or measure) returns one finite value
        per point, and validates the targets of *all* points with the loss's ``check_targets``
        (labels in range for cross_entropy, {0, 1} or {−1, +1} for the binary losses, one target per
        output for squared). Input dtypes the model cannot take (integer pixels for a float model,
        float token ids for an embedding) raise ``DtypeError`` with the conversion to make.
        """
        b = min(len(data), 4)
        batch = data.subset(range(b))
        fn, fn_name = (self.measure_fn, "measure") if measure else (self.loss_fn, "loss")
        self.check_eval_mode()
        # the runs leave the caller's (CPU) random state as it was
        with torch.random.fork_rng(devices=[]):
            out = self._checked_forward(batch.X, data, what)
            again = self._checked_forward(batch.X, data, what)
        if not _same_output(out, again):
            raise UnsupportedModelError(
                "The model is random in this mode (dropout?) — call model.eval(): two forward"
                f" passes on the same {b} {what} points gave different outputs, and influence needs"
                " a deterministic model. A custom module must pass training=self.training to"
                " F.dropout (its default is training=True)."
            )
        check = getattr(fn, "check_targets", None)
        if (
            check is not None
            and isinstance(out, torch.Tensor)
            and out.ndim >= 1
            and out.shape[0] == b
        ):
            check(data.y, tuple(out.shape[1:]), what)
        try:
            val = fn(out, batch.y)
        except UpweightError:
            raise
        except Exception as exc:  # noqa: BLE001 — re-raised with the shapes that explain it
            hint = ""
            if self.loss_name == "cross_entropy" and batch.y.is_floating_point():
                hint = (
                    " cross_entropy needs integer class labels: pass y as a long tensor (y.long())."
                )
            raise InputError(
                f"The {fn_name} failed on model outputs of shape {tuple(out.shape)} and {what} y of"
                f" shape {tuple(batch.y.shape)} (dtype {batch.y.dtype}): {exc}.{hint}"
            ) from exc
        if tuple(val.shape) != (b,):
            raise UnsupportedModelError(
                f"The {fn_name} returned shape {tuple(val.shape)} for a batch of {b} points; it"
                f" must return one value per sample, shape ({b},). For a torch.nn loss, construct"
                " it with reduction='none'."
            )

    def _checked_forward(self, X: Inputs, data: Data, what: str) -> torch.Tensor:
        """``outputs`` at θ̂, with a failure explained (dtype fixes for wrong input dtypes)."""
        try:
            out = self.outputs(self.params, X)
        except UpweightError:
            raise
        except Exception as exc:  # noqa: BLE001 — re-raised with the shapes and the fix that explain it
            if data.is_dict:  # keyword inputs: name them all
                raise InputError(
                    f"The model failed on {what} inputs {data.input_shapes} (keyword arguments "
                    f"{sorted(data.X)}): {exc}"
                ) from exc
            shape, dt = tuple(data.X.shape), data.X.dtype
            if _DTYPE_FAILURE.search(str(exc)):
                if not dt.is_floating_point:
                    raise DtypeError(
                        f"{what} X has integer dtype {dt} (shape {shape}) but the model computes in"
                        f" {self.dtype}, and its forward failed: {exc}. Convert the inputs to"
                        " floating point first: X.float() (images stored as uint8: X.float() /"
                        " 255). Integer X is passed to the model unchanged, as token ids for a"
                        " model that starts with nn.Embedding."
                    ) from exc
                raise DtypeError(
                    f"{what} X has dtype {dt} (shape {shape}), which the model's forward did not"
                    f" accept: {exc}. If the model takes token ids (nn.Embedding), pass integer X:"
                    " X.long()."
                ) from exc
            raise InputError(
                f"The model failed on {what} X of shape {shape} (dtype {dt}): {exc}"
            ) from exc
        if isinstance(out, torch.Tensor) and out.ndim == 0:
            b = len(data.subset(range(min(len(data), 4))))
            raise UnsupportedModelError(
                f"The model returned a scalar for {b} {what} points; forward(X) must return one row"
                f" of outputs per point, shape ({b}, ...)."
            )
        return out


def _select_output(out: Any, how: str | Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    """The tensor the loss reads from what the model returned (see ``Objective.outputs``)."""
    if callable(how):
        got = how(out)
    elif isinstance(how, str):
        got = out[how] if isinstance(out, Mapping) and how in out else getattr(out, how, None)
        if got is None:
            raise UnsupportedModelError(
                f"Objective(output={how!r}): the model returned a {type(out).__name__} without "
                f"{how!r}."
            )
    elif isinstance(out, torch.Tensor):
        got = out
    # a Hugging Face ModelOutput is an ordered dict
    elif isinstance(out, Mapping) and "logits" in out:
        got = out["logits"]
    elif getattr(out, "logits", None) is not None:
        got = out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        got = out[0]
    else:
        raise UnsupportedModelError(
            f"The model returned a {type(out).__name__}, not a tensor, and upweight cannot tell"
            " which part the loss reads. Pass Objective(..., output='logits') (an attribute or"
            " key) or output=lambda out: …."
        )
    if not isinstance(got, torch.Tensor):
        raise UnsupportedModelError(
            f"The model output selected by output={how!r} is a {type(got).__name__}, not a tensor."
        )
    return got


def _same_output(a: object, b: object) -> bool:
    """Whether two forwards on the same inputs agree, tensor by tensor — to round-off (some
    kernels reduce in an order that can vary between runs), far tighter than what dropout changes.
    """
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            continue
        if x.shape != y.shape:
            return False
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True):
            return False
    return True


def _names_text(names: Sequence[str], limit: int = 20) -> str:
    """The parameter names for a message: all up to ``limit``, else the first ``limit`` and the
    count."""
    if not names:
        return "the model has no parameters"
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}" + (f", … ({len(names)} parameters in all)]" if len(names) > limit else "]")


def _select(model: nn.Module, params: ParamSelector) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, t in named.items() if t.requires_grad]
        if not chosen:
            raise InputError(
                f"No parameters selected for θ: none of the model's {len(named)} parameters"
                f" requires grad. Parameters are: {_names_text(list(named))}. Set"
                " requires_grad=True on the parameters to analyse, or name them with"
                " Objective(params=[...]), which may select frozen parameters."
            )
    elif callable(params) and not isinstance(params, nn.Module):
        chosen = [n for n, t in named.items() if params(n, t)]
        if not chosen:
            raise InputError(
                "No parameters selected for θ: the params predicate returned False for all"
                f" {len(named)} parameters of the model. Parameters are:"
                f" {_names_text(list(named))}. Fix the predicate, or pass names / name prefixes."
            )
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
                raise InputError(
                    f"params: {item!r} matches no parameter of the model. Parameters are:"
                    f" {_names_text(list(named))}."
                )
            wanted.update(hits)
        chosen = [n for n in named if n in wanted]
        if not chosen:
            raise InputError(
                f"No parameters selected for θ: params={params!r} is empty. Parameters are:"
                f" {_names_text(list(named))}."
            )
    return chosen
