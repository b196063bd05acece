"""Factorable layers of θ and what K-FAC needs from them: per-sample layer inputs and
back-propagated output cotangents, captured with forward hooks during one ordinary forward pass.

A layer is *factorable* when it is an ``nn.Linear`` or ``nn.Conv2d`` (no groups, zero padding)
— or, with ``find_layers(embeddings=True)``, an ``nn.Embedding`` — whose weight is in θ, whose
parameters no other module shares (tied weights) and which the model calls exactly once per forward
pass; ``find_layers`` checks on probe points that the gradient below equals autograd's. Its
per-sample gradient is then a sum of outer products over "locations" t (1 for a Linear on (b, d)
inputs, the sequence positions of a Linear on (b, …, d) inputs, the output pixels of a Conv2d,
the token positions of an Embedding):

    ∇W̃ L(zᵢ) = Σₜ bᵢₜ ãᵢₜᵀ,   W̃ = [W | bias],  ãᵢₜ = (aᵢₜ, 1) when the bias is in θ,

with aᵢₜ the layer's input (for Conv2d the unfolded input patch at output pixel t, Grosse &
Martens 2016; Grosse et al. 2023) and bᵢₜ = ∂L(zᵢ)/∂(layer output)ᵢₜ. Every other parameter of
θ (LayerNorm, bare ``nn.Parameter``, a bias whose weight is frozen, …) is left to the caller:
``find_layers`` names them and says why.

**Embeddings** (kind "embedding"). ``nn.Embedding(V, d)`` with weight E (V × d) maps token ids
xᵢₜ to rows E[xᵢₜ]; its per-sample gradient is ∇E L(zᵢ) = Σₜ e_{xᵢₜ} bᵢₜᵀ (e the one-hot vector),
i.e. ∇_{Eᵀ} L(zᵢ) = Σₜ bᵢₜ ãᵢₜᵀ with ãᵢₜ = e_{xᵢₜ} ∈ Rⱽ: an embedding is a bias-free Linear on
one-hot inputs with W = Eᵀ (d × V). Its block is laid out as Eᵀ (out_dim = d, in_dim = V) and
``capture`` returns one-hot ã — or, with ``token_ids=True`` (what K-FAC and structured scoring
use), just the token ids. Rows at ``padding_idx`` get no gradient in torch, so their one-hot
entries are set to 0 (their ids to −1). The activation factor A = (1/n) Σᵢₜ ãᵢₜãᵢₜᵀ is then
diag(token counts)/n, kept as its diagonal (K-FAC counts the captured token ids), so any
vocabulary is factored — unless ``max_vocab`` caps it (default: no cap). Left to the caller are
embeddings with ``max_norm`` (the forward pass rewrites E), ``scale_grad_by_freq`` (the gradient of
one point depends on the token counts of its batch) or ``sparse`` gradients. Embeddings are opt-in
(``embeddings=True``, used by K-FAC / EK-FAC and by structured scoring, which gathers the query's
columns at the tokens instead of multiplying by one-hots); the structured HVP, which handles linear
heads only, sees them as non-factorable parameters.

Besides the loss gradient (``cotangents="loss"``), ``capture`` back-propagates the factors of
the loss's Hessian in the model output (``cotangents="ggn"``): with ∇²_z L(zᵢ) = Σₖ cᵢₖcᵢₖᵀ, the
Gauss–Newton matrix of one point is Σₖ (Jᵢᵀcᵢₖ)(Jᵢᵀcᵢₖ)ᵀ, so the per-layer "pseudo-gradients"
Σₜ bᵢₖₜ ãᵢₜᵀ give it exactly, without sampling labels — or, with ``capture(sampling=...)``, from
random cotangents uᵢₘ with E[Σₘ uᵢₘuᵢₘᵀ] = ∇²_z L(zᵢ) (for cross-entropy the residuals of labels
sampled from the model), unbiased and one backward pass per sample however wide the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, UnsupportedModelError
from .data import Data
from .local import DEFAULT_MAX_LOCAL, LocalModule, Recorder, candidates, module_state
from .losses import TokenCrossEntropy
from .objective import Objective
from .output_hessian import closed_form, output_hessian
from .params import Params


@dataclass(frozen=True)
class LayerBlock:
    """One factorable layer: where its [W | bias] sits in the flat θ and how to read its inputs.

    Attributes:
        name: the module's name in the model ("" for the model itself).
        kind: "linear", "conv2d" or "embedding" (a bias-free Linear on one-hot token inputs, W =
            Eᵀ).
        weight: the weight's parameter name in θ.
        bias: the bias's parameter name if the bias is in θ, else ``None`` (a fixed or absent bias).
        out_dim: output features / channels (rows of W̃); the embedding dimension d for an
            Embedding.
        in_dim: input features, or in_channels·kh·kw for Conv2d (columns of W, without the bias);
            the vocabulary size V for an Embedding.
        index: positions in the flat θ of W̃ = [W | bias], shape (out_dim, in_dim + has_bias), so
            that ``v[..., index]`` is the block of v as an (out, in+1) matrix (for an Embedding the
            transpose of its weight: ``v[..., index]`` is Eᵀ, (d, V)).
        module: the module itself (for the hooks).
        conv: kernel_size, dilation, padding, stride for ``F.unfold`` (Conv2d only).
        padding_idx: the Embedding's ``padding_idx`` (its one-hot inputs are zeroed), else ``None``.
    """

    name: str
    kind: Literal["linear", "conv2d", "embedding"]
    weight: str
    bias: str | None
    out_dim: int
    in_dim: int
    index: torch.Tensor = field(repr=False)
    module: nn.Module = field(repr=False, compare=False)
    conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    padding_idx: int | None = None

    @property
    def cols(self) -> int:
        """Columns of W̃: in_dim, plus one for the bias if it is in θ."""
        return self.in_dim + (self.bias is not None)

    @property
    def size(self) -> int:
        return self.out_dim * self.cols


@dataclass(frozen=True)
class LayerPlan:
    """θ split into factorable layers and the rest.

    Attributes:
        blocks: the factorable layers, in module order.
        other: names of the parameters of θ in no block and no local module (solved another way
            by the caller).
        reasons: for each name in ``other``, why it is not in a block.
        other_index: their positions in the flat θ, ascending.
        local: modules whose parameters get module-local per-point gradients (``core.local``;
            only with ``find_layers(local=True)``), none of their parameters in ``other``.
    """

    blocks: tuple[LayerBlock, ...]
    other: tuple[str, ...]
    reasons: dict[str, str]
    other_index: torch.Tensor
    local: tuple[LocalModule, ...] = ()


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(mod: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of the conv as a pair, or None if it cannot be unfolded as such."""
    if mod.padding_mode != "zeros" or mod.groups != 1:
        return None
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(_pair(mod.dilation), _pair(mod.kernel_size))]
        if any(t % 2 for t in total):
            return None  # "same" with an even receptive field pads asymmetrically
        return (total[0] // 2, total[1] // 2)
    return _pair(mod.padding)


def _offsets(objective: Objective) -> dict[str, int]:
    out, pos = {}, 0
    for name, size in zip(objective.space.names, objective.space.sizes):
        out[name] = pos
        pos += size
    return out


DEFAULT_MAX_VOCAB: int | None = None
"""Largest vocabulary of an ``nn.Embedding`` that ``find_layers(embeddings=True)`` factors by
default: no cap (an embedding's activation factor is diagonal and kept as a vector of V counts)."""


def _embedding_refusal(mod: nn.Embedding, mname: str, max_vocab: int | None) -> str | None:
    """Why an ``nn.Embedding`` cannot be factored, or ``None`` if it can."""
    what = f"Embedding '{mname}'"
    if mod.max_norm is not None:
        return (
            f"{what} has max_norm={mod.max_norm:g}: its forward pass renormalises the weight in"
            " place"
        )
    if mod.scale_grad_by_freq:
        return (
            f"{what} has scale_grad_by_freq=True: a point's gradient depends on the token counts of"
            " its batch"
        )
    if mod.sparse:
        return f"{what} has sparse=True gradients"
    if max_vocab is not None and mod.num_embeddings > max_vocab:
        return (
            f"{what} has a vocabulary of {mod.num_embeddings} > max_vocab={max_vocab}; raise"
            " max_vocab (or pass None) to factor it"
        )
    return None


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter owned by more than one module (tied weights), by id → its names. A module
    registered under two names owns its parameters once (it is one module)."""
    owners: dict[int, dict[int, str]] = {}
    for mname, mod in model.named_modules():
        for pname, t in mod.named_parameters(recurse=False):
            owners.setdefault(id(t), {})[id(mod)] = f"{mname}.{pname}" if mname else pname
    return {k: list(v.values()) for k, v in owners.items() if len(v) > 1}


def _tie_refusal(mod: nn.Module, mname: str, tied: dict[int, list[str]]) -> str | None:
    for what in ("weight", "bias"):
        t = getattr(mod, what, None)
        if isinstance(t, torch.Tensor) and id(t) in tied:
            own = f"{mname}.{what}" if mname else what
            return (
                f"{type(mod).__name__} '{mname}' shares its {what} with"
                f" {[n for n in tied[id(t)] if n != own]} (tied weights: its gradient has"
                " contributions from outside the layer)"
            )
    return None


FACTORISATION_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
"""Relative error allowed between a block's gradient rebuilt from hooks and autograd's (by dtype;
other dtypes use the float32 value)."""


def _factorisation_refusals(
    objective: Objective, blocks: Sequence[LayerBlock], probe: Data
) -> dict[str, str]:
    """Blocks whose gradient on (at most) two probe points, rebuilt from the captured layer inputs
    and output cotangents as Σᵢₜ bᵢₜãᵢₜᵀ, differs from autograd's gradient of θ in the same pass —
    the weight (or bias) is also used outside the module's own forward (reused through ``F.linear``,
    tied to another module's parameter, …). By layer name → why."""
    batch = probe.subset(range(min(2, len(probe))))
    cap = capture(objective, blocks, batch, cotangents="loss", theta_grad=True, token_ids=True)
    assert cap.theta_grad is not None
    flat = objective.space.flatten(cap.theta_grad).double()
    out: dict[str, str] = {}
    for blk in blocks:
        g = cap.g[blk.name][0].double()
        # Σₜ bₜ e_{xₜ}ᵀ: add each cotangent into its token's column (not padding)
        if blk.kind == "embedding":
            ids, keep = cap.a[blk.name].reshape(-1), cap.a[blk.name].reshape(-1) >= 0
            rebuilt = g.new_zeros(blk.out_dim, blk.in_dim).index_add_(
                1, ids[keep], g.reshape(-1, blk.out_dim)[keep].T
            )
        else:
            rebuilt = torch.einsum("bto,btc->oc", g, cap.a[blk.name].double())
        true = flat[blk.index]
        err, scale = float((rebuilt - true).norm()), float(true.norm())
        # the dtype θ is evaluated in
        if err > FACTORISATION_RTOL.get(objective.dtype, 1e-3) * scale:
            rel = f"{err / scale:.1e} relative" if scale > 0 else f"{err:.1e} where autograd's is 0"
            out[blk.name] = (
                f"{type(blk.module).__name__} '{blk.name}': its gradient rebuilt from the layer's"
                f" inputs and output gradients differs from autograd's ({rel}, on {len(batch)}"
                " probe points) — its parameters are also used outside the module's forward (tied"
                " or reused functionally)"
            )
    return out


def find_layers(
    objective: Objective,
    probe: Data | None = None,
    *,
    embeddings: bool = False,
    max_vocab: int | None = DEFAULT_MAX_VOCAB,
    local: bool = False,
    max_local: int | None = DEFAULT_MAX_LOCAL,
) -> LayerPlan:
    """Split θ into factorable ``nn.Linear`` / ``nn.Conv2d`` (/ ``nn.Embedding``) layers and the
    remaining parameters.

    Args:
        objective: the model and θ.
        probe: a few data points; the model is run on two of them with hooks to check that every
            candidate layer is called exactly once (a shared or unused layer is not factorable) and
            that its gradient rebuilt from the hooks equals autograd's (a weight also used outside
            its module is not factorable). Without a probe neither is checked.
        embeddings: also factor ``nn.Embedding`` layers (kind "embedding", see the module
            docstring); off by default, so a consumer that does not handle that kind never sees it.
        max_vocab: with ``embeddings``, the largest vocabulary factored (``None``: no cap); a
            larger embedding is left over with a reason naming its size and this cap.
        local: give the remaining parameters module-local per-point gradients where their module
            allows (``core.local``; needs ``probe``, on which each module's rebuilt gradient must
            equal autograd's); off by default, so a consumer that does not handle them never sees
            them.
        max_local: with ``local``, the most parameters of one such module (``None``: no cap).

    Returns:
        A ``LayerPlan``.
    """
    if (
        embeddings
        and max_vocab is not None
        and (not isinstance(max_vocab, int) or isinstance(max_vocab, bool) or max_vocab < 1)
    ):
        raise InputError(
            f"find_layers: max_vocab must be a positive integer or None; got {max_vocab!r}."
        )
    in_theta = set(objective.params)
    offsets = _offsets(objective)
    tied = _shared_weights(objective.model)
    blocks: list[LayerBlock] = []
    reasons: dict[str, str] = {}
    claimed: set[str] = set()
    # refused for what the module does to its weight: not module-local either
    final: set[str] = set()
    for mname, mod in objective.model.named_modules():
        transposed = _is_transposed_linear(mod)
        if not (isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)) or transposed):
            continue
        prefix = f"{mname}." if mname else ""
        wname, bname = prefix + "weight", prefix + "bias"
        if isinstance(mod, nn.Embedding):
            if wname not in in_theta:
                continue
            if not embeddings:
                reasons[wname] = (
                    f"weight of nn.Embedding '{mname}' (embeddings are factored only with"
                    " embeddings=True, as by K-FAC)"
                )
                continue
            why = _embedding_refusal(mod, mname, max_vocab)
            if why is not None:
                final.add(wname)
            why = why or _tie_refusal(mod, mname, tied)
            if why is not None:
                reasons[wname] = why
                continue
            V, d = mod.num_embeddings, mod.embedding_dim
            # (d, V): Eᵀ
            e_idx = (offsets[wname] + torch.arange(V * d).reshape(V, d)).T.contiguous()
            blocks.append(
                LayerBlock(mname, "embedding", wname, None, d, V, e_idx, mod, None, mod.padding_idx)
            )
            claimed.add(wname)
            continue
        has_bias = getattr(mod, "bias", None) is not None
        if wname not in in_theta:
            if has_bias and bname in in_theta:
                reasons[bname] = f"bias of {type(mod).__name__} '{mname}' whose weight is not in θ"
            continue
        why = _tie_refusal(mod, mname, tied)
        if why is not None:
            reasons[wname] = why
            if has_bias and bname in in_theta:
                reasons[bname] = why
            continue
        conv = None
        if isinstance(mod, nn.Conv2d):
            pad = _conv_padding(mod)
            if pad is None:
                why = (
                    f"Conv2d '{mname}' with groups={mod.groups}, padding={mod.padding!r},"
                    f" padding_mode={mod.padding_mode!r}"
                )
                reasons[wname] = why
                if has_bias and bname in in_theta:
                    reasons[bname] = why
                continue
            conv = (_pair(mod.kernel_size), _pair(mod.dilation), pad, _pair(mod.stride))
            out_dim, in_dim = mod.out_channels, mod.weight[0].numel()
        elif transposed:  # y = x W + b with W of shape (in, out): the linear weight is Wᵀ
            in_dim, out_dim = mod.weight.shape
        else:
            out_dim, in_dim = mod.out_features, mod.in_features
        bias = bname if has_bias and bname in in_theta else None
        if transposed:
            w_idx = (
                offsets[wname] + torch.arange(in_dim * out_dim).reshape(in_dim, out_dim)
            ).T.contiguous()
        else:
            w_idx = offsets[wname] + torch.arange(out_dim * in_dim).reshape(out_dim, in_dim)
        if bias is not None:
            w_idx = torch.cat([w_idx, offsets[bias] + torch.arange(out_dim)[:, None]], dim=1)
        kind: Literal["linear", "conv2d"] = "conv2d" if conv is not None else "linear"
        blocks.append(LayerBlock(mname, kind, wname, bias, out_dim, in_dim, w_idx, mod, conv))
        claimed.update({wname} | ({bias} if bias else set()))
    if probe is not None and blocks:
        calls, rows = _count_calls(objective, blocks, probe)
        kept = []
        for blk in blocks:
            if calls[blk.name] == 1 and rows[blk.name] == min(2, len(probe)):
                kept.append(blk)
                continue
            why = (
                f"{type(blk.module).__name__} '{blk.name}' is called {calls[blk.name]} times per"
                " forward pass (shared or unused)"
            )
            if calls[blk.name] == 1:
                why = (
                    f"{type(blk.module).__name__} '{blk.name}' sees inputs with {rows[blk.name]}"
                    f" row(s) for {min(2, len(probe))} points: one input shared across the batch"
                    " (e.g. position ids built inside the model), so its per-point gradient is not"
                    " Σₜ bₜãₜᵀ of its own rows"
                )
            for n in (blk.weight, blk.bias):
                if n is not None:
                    reasons[n] = why
                    claimed.discard(n)
        bad = _factorisation_refusals(objective, kept, probe) if kept else {}
        blocks = [blk for blk in kept if blk.name not in bad]
        for blk in kept:
            if blk.name in bad:
                for n in (blk.weight, blk.bias):
                    if n is not None:
                        reasons[n] = bad[blk.name]
                        claimed.discard(n)
    locals_: tuple[LocalModule, ...] = ()
    if local and probe is not None:
        left = [n for n in objective.space.names if n not in claimed and n not in final]
        found, why_not = candidates(objective, left, offsets, max_size=max_local)
        refused = _local_refusals(objective, found, probe)
        locals_ = tuple(lm for lm in found if lm.name not in refused)
        for n, why in why_not.items():  # a layer's own reason, where it has one, says more
            reasons.setdefault(n, why)
        for lm in found:
            for n in lm.params:
                if lm.name in refused:
                    reasons.setdefault(n, refused[lm.name])
                else:
                    claimed.add(n)
                    reasons.pop(n, None)
    other = tuple(n for n in objective.space.names if n not in claimed)
    for n in other:
        reasons.setdefault(
            n,
            "not the weight or bias of an nn.Linear / nn.Conv2d"
            + (" / nn.Embedding" if embeddings else ""),
        )
    reasons = {n: reasons[n] for n in other}
    idx = [
        offsets[n] + torch.arange(size)
        for n, size in zip(objective.space.names, objective.space.sizes)
        if n in other
    ]
    other_index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return LayerPlan(tuple(blocks), other, reasons, other_index, locals_)


def _local_refusals(
    objective: Objective, modules: Sequence[LocalModule], probe: Data
) -> dict[str, str]:
    """Local modules whose per-point gradients on (at most) two probe points, summed, differ from
    autograd's gradient of θ in the same pass — or that cannot be run point by point, or are not
    called exactly once. By module name → why."""
    if not modules:
        return {}
    batch = probe.subset(range(min(2, len(probe))))
    try:
        caps = [
            (
                list(modules),
                capture(objective, (), batch, cotangents="loss", theta_grad=True, local=modules),
            )
        ]
    except Exception:  # noqa: BLE001 — find the module(s) responsible, one at a time
        caps = []
        out: dict[str, str] = {}
        for lm in modules:
            try:
                caps.append(
                    (
                        [lm],
                        capture(
                            objective, (), batch, cotangents="loss", theta_grad=True, local=[lm]
                        ),
                    )
                )
            except Exception as exc:  # noqa: BLE001 — the reason is reported, the parameter stays generic
                out[lm.name] = (
                    f"{type(lm.module).__name__} '{lm.name}' cannot be run point by point on its"
                    f" own ({type(exc).__name__}: {str(exc)[:200]})"
                )
    else:
        out = {}
    for mods, cap in caps:
        assert cap.theta_grad is not None
        flat = objective.space.flatten(cap.theta_grad).double()
        for lm in mods:
            if lm.name not in cap.local:
                out[lm.name] = (
                    f"{type(lm.module).__name__} '{lm.name}' is not called once per forward pass"
                    " with one tensor output"
                )
                continue
            rebuilt, true = cap.local[lm.name][0].double().sum(0), flat[lm.index]
            if rebuilt.shape != true.shape:
                out[lm.name] = (
                    f"{type(lm.module).__name__} '{lm.name}' gives per-point gradients of the wrong"
                    " size"
                )
                continue
            err, scale = float((rebuilt - true).norm()), float(true.norm())
            if err > FACTORISATION_RTOL.get(objective.dtype, 1e-3) * max(scale, 1e-30):
                out[lm.name] = (
                    f"{type(lm.module).__name__} '{lm.name}': its per-point gradients computed"
                    f" inside the module differ from autograd's ({err / max(scale, 1e-30):.1e}"
                    f" relative, on {len(batch)} probe points) — its parameters are also used"
                    " outside the module's forward"
                )
    return out


def _is_transposed_linear(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and its relatives): a linear layer y = x W + b whose weight
    is stored as (in, out), recognised by its name and shape without importing transformers."""
    w = getattr(mod, "weight", None)
    return (
        type(mod).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.ndim == 2
        and getattr(mod, "nf", None) == w.shape[1]
    )


def _count_calls(
    objective: Objective, blocks: Sequence[LayerBlock], probe: Data
) -> tuple[dict[str, int], dict[str, int]]:
    """Per block, how often its module runs in one forward pass on (at most) two probe points, and
    the leading size of its input there (the number of points, unless the input is shared by the
    batch).
    """
    calls = {blk.name: 0 for blk in blocks}
    rows = {blk.name: -1 for blk in blocks}
    handles = []
    for blk in blocks:

        def hook(_m, inp, _out, name=blk.name):
            calls[name] += 1
            rows[name] = (
                int(inp[0].shape[0])
                if inp and isinstance(inp[0], torch.Tensor) and inp[0].ndim
                else -1
            )

        handles.append(blk.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            objective.outputs(objective.params, probe.subset(range(min(2, len(probe)))).X)
    finally:
        for h in handles:
            h.remove()
    return calls, rows


# ── the loss's Hessian in the model output ─────────────────────────────────────────────
#: the most exact output-Hessian factors (backward passes per batch) K-FAC computes for one output
MAX_OUTPUT_FACTORS = 4096

#: how K-FAC factors the output Hessian: ``resolve_output_factors``
OutputFactors = Literal["auto", "exact", "sampled"]

_MASK64 = (1 << 64) - 1


def _point_seed(seed: int, point: int) -> int:
    """A 63-bit seed for one training point: SplitMix64's finaliser (Steele, Lea & Flood 2014) of
    the solver's seed and the point's id, so neighbouring ids get unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + (point & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


@dataclass(frozen=True)
class OutputSampling:
    """Sampled output-Hessian factors: ``samples`` random cotangents per point with E[Σₘ uₘuₘᵀ] =
    ∇²_zL (``OutputHessian.sampled_factors``), each one backward pass.

    The uniform numbers of point i come from a CPU generator seeded by (``seed``, the point's id,
    ``Data.ids``): the same draws whatever the batch, the partition of an executor, the pass
    (EK-FAC's correction reuses pass 1's samples) or the device; the labels are then drawn on the
    model's device."""

    samples: int = 1
    seed: int = 0

    def uniforms(self, ids: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
        """(samples, b, width) float64 uniform numbers in [0, 1), row i from point ``ids[i]``'s
        stream."""
        rows = [
            torch.rand(
                self.samples,
                width,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(_point_seed(self.seed, int(i))),
            )
            for i in ids.tolist()
        ]
        return torch.stack(rows, dim=1).to(device)


def resolve_output_factors(
    objective: Objective, probe: Data, mode: OutputFactors
) -> Literal["exact", "sampled"]:
    """Which output-Hessian factors K-FAC uses for this loss and output (``output_factors_for``),
    the output's per-point shape taken from one forward pass on the first point of ``probe``."""
    with torch.no_grad():
        shape = tuple(objective.outputs(objective.params, probe.subset([0]).X).shape[1:])
    return output_factors_for(objective, shape, mode)


def output_factors_for(
    objective: Objective, shape: tuple[int, ...], mode: OutputFactors
) -> Literal["exact", "sampled"]:
    """Which output-Hessian factors K-FAC uses for this loss on outputs of per-point ``shape`` (c
    numbers).

    "exact": the c closed-form or eigendecomposed factors, one backward pass each — refused above
    ``MAX_OUTPUT_FACTORS`` (a per-token loss has T·V of them). "sampled": one backward pass per
    sample; refused for a loss with no closed form above ``MAX_OUTPUT_FACTORS`` outputs (its
    square root would need the dense c × c Hessian). "auto": exact up to ``MAX_OUTPUT_FACTORS``,
    sampled above.

    Raises:
        UnsupportedModelError: the mode is refused for this output; the message names what works.
    """
    c = 1
    for s in shape:
        c *= s
    fn = objective.loss_fn
    if c <= MAX_OUTPUT_FACTORS and mode != "sampled":
        return "exact"
    token = isinstance(fn, TokenCrossEntropy)
    what = " (a per-token loss: sequence length × vocabulary)" if token else ""
    if closed_form(fn, shape) is None and c > MAX_OUTPUT_FACTORS:
        raise UnsupportedModelError(
            f"K-FAC/EK-FAC need factors of the Hessian of the loss '{objective.loss_name}' in the "
            f"model output, {c} numbers per point (shape {shape}), above {MAX_OUTPUT_FACTORS}: "
            "exact factors cost one backward pass each, and sampled ones need its square root, "
            f"which for a loss with no closed form takes the dense {c}×{c} Hessian. Use a built-in "
            "loss, or CG with Influence(..., curvature='gauss-newton') — the same matrix, exactly, "
            "without factors."
        )
    if mode == "exact":
        raise UnsupportedModelError(
            "K-FAC/EK-FAC with output_factors='exact' take the exact Gauss–Newton factors of the "
            f"loss in the model output, one backward pass per factor: {c} of them for outputs of "
            f"shape {shape} per point{what}, above {MAX_OUTPUT_FACTORS}. Pass "
            "output_factors='sampled' (or 'auto'): labels sampled from the model, one backward "
            "pass per sample, unbiased for the same matrix — or use CG with "
            "Influence(..., curvature='gauss-newton'), the same matrix, exactly, without factors."
        )
    return "sampled"


def output_hessian_factors(
    objective: Objective,
    out: torch.Tensor,
    y: torch.Tensor,
    *,
    sampling: OutputSampling | None = None,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Vectors cᵢₖ with Σₖ cᵢₖcᵢₖᵀ = ∇²_z L(zᵢ, yᵢ) (clamped to PSD) — exactly, or in expectation
    with ``sampling`` — shape (K, b, *out.shape[1:]), and the number of negative eigenvalues
    clamped to 0 (``core.output_hessian``).

    Exact (``sampling=None``): ``psd_factors``, K ≤ c (closed forms for the built-in losses, e.g.
    c − 1 reflected √pₖ(eₖ − p) for cross-entropy; an eigendecomposition of the
    ``torch.func.hessian`` of any other loss, the GGN keeping only its PSD part). Sampled:
    ``sampled_factors`` on the uniform numbers of the points ``ids`` (their ``Data.ids``), K =
    ``sampling.samples``. Each factor costs K-FAC one backward pass; ``resolve_output_factors``
    says which outputs each form accepts.
    """
    shape = tuple(out.shape[1:])
    # refuses an output this form cannot factor
    output_factors_for(objective, shape, "exact" if sampling is None else "sampled")
    oh = output_hessian(
        objective.loss_fn,
        out,
        y,
        name=objective.loss_name,
        purpose="K-FAC",
        fix="Use a built-in loss or a twice-differentiable callable.",
    )
    if sampling is None:
        return oh.psd_factors()
    if ids is None:
        raise InputError("output_hessian_factors: sampled factors need the points' ids (Data.ids).")
    return oh.sampled_factors(sampling.uniforms(ids, oh.sample_width, out.device))


# ── capture ────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Captured:
    """One batch's layer inputs and output cotangents.

    Attributes:
        a: per layer, ã of shape (b, T, cols): inputs (unfolded patches for Conv2d, one-hot token
            vectors for an Embedding), with a column of ones appended when the bias is in θ.
        g: per layer, cotangents of shape (K, b, T, out_dim): K = 1 for the loss gradient, the
            number of output-Hessian factors for the GGN.
        clamped: negative output-Hessian eigenvalues set to 0 in this batch (GGN only).
    """

    a: dict[str, torch.Tensor]
    g: dict[str, torch.Tensor]
    clamped: int = 0
    # ∇θ Σᵢ L(zᵢ) from the same pass (``theta_grad=True``)
    theta_grad: dict[str, torch.Tensor] | None = None
    #: per local module (``capture(local=...)``), its per-point (pseudo-)gradients (K, b, size)
    local: dict[str, torch.Tensor] = field(default_factory=dict)

    def local_grads(self, lm: LocalModule) -> torch.Tensor:
        """``local[lm.name]``, or ``UnsupportedModelError`` if this batch did not call the module
        exactly once with one tensor output (it did on the probe points, e.g. a data-dependent
        branch).
        """
        if lm.name not in self.local:
            raise UnsupportedModelError(
                f"Module '{lm.name}' was not called exactly once with one tensor output on this"
                " batch, as it was on the probe points, so its per-point gradients are unknown."
                " Pass KFAC/EKFAC(max_local=0) or Influence(structured=False) to leave it to the"
                " generic path."
            )
        return self.local[lm.name]


def _layer_input(
    blk: LayerBlock, x: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """ã of shape (b, T, cols) from the layer's input x. For an Embedding: the one-hot vectors of
    the token ids (in ``dtype``, default the module weight's), zero at ``padding_idx``."""
    if blk.kind == "embedding":
        ids = x.reshape(x.shape[0], -1).long()
        a = F.one_hot(ids, blk.in_dim).to(
            dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
        )
        if blk.padding_idx is not None:
            a[..., blk.padding_idx] = 0  # torch gives the padding row no gradient
        return a
    if blk.kind == "conv2d":
        assert blk.conv is not None
        k, d, p, s = blk.conv
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (b, C·kh·kw, L)
        a = cols.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if blk.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], dim=2)
    return a


def token_ids_of(blk: LayerBlock, x: torch.Tensor) -> torch.Tensor:
    """An Embedding's input as token ids (b, T), −1 where the token is ``padding_idx`` (no
    gradient): the positions of the ones of ``_layer_input``'s one-hot ã, without the V-wide
    vectors."""
    ids = x.reshape(x.shape[0], -1).long()
    return ids.masked_fill(ids == blk.padding_idx, -1) if blk.padding_idx is not None else ids


def token_sums(
    ids: torch.Tensor, g: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An embedding's cotangents summed per distinct (point, token) pair of a batch: the nonzero
    columns of each point's gradient Σₜ bᵢₜãᵢₜᵀ (ã one-hot), without forming the (out, V) blocks.

    ``ids`` (b, T) token ids (−1 = padding: no gradient), ``g`` (..., b, T, out) cotangents.
    Returns ``(point, token, sums)``: the distinct pairs' point and token indices (u,), sorted by
    point then token, and their summed cotangents (..., u, out)."""
    b, T = ids.shape
    lead, out = g.shape[:-3], g.shape[-1]
    flat = ids.reshape(b * T)
    hit = flat >= 0
    keys = (torch.arange(b, device=ids.device).repeat_interleave(T) * vocab + flat)[hit]
    uniq, inv = torch.unique(keys, return_inverse=True)
    values = g.reshape(*lead, b * T, out)[..., hit, :]
    sums = values.new_zeros(*lead, len(uniq), out).index_add_(-2, inv, values)
    return uniq // vocab, uniq % vocab, sums


def _layer_cotangent(blk: LayerBlock, g: torch.Tensor) -> torch.Tensor:
    if blk.kind == "conv2d":  # (b, out, H', W') → (b, L, out)
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def capture(
    objective: Objective,
    blocks: Sequence[LayerBlock],
    batch: Data,
    *,
    params: Params | None = None,
    cotangents: Literal["loss", "measure", "ggn"] = "ggn",
    theta_grad: bool = False,
    token_ids: bool = False,
    local: Sequence[LocalModule] = (),
    sampling: OutputSampling | None = None,
) -> Captured:
    """Run the model on ``batch`` once with hooks and return each layer's ã and cotangents.

    ``cotangents="loss"``: bᵢₜ = ∂L(zᵢ)/∂(layer output)ᵢₜ (so Σₜ bᵢₜãᵢₜᵀ is the per-sample
    gradient of W̃); ``cotangents="measure"``: the same for the test measurement f(zᵢ)
    (``Objective.measure_fn``). ``cotangents="ggn"``: one backward pass per output-Hessian
    factor cₖ (see ``output_hessian_factors``; with ``sampling``, per sampled factor), giving the
    GGN's pseudo-gradients. Samples are independent in eval mode, so one backward pass of the
    summed loss yields every per-sample cotangent. ``theta_grad=True`` (with ``cotangents="loss"``
    or ``"measure"``) also returns autograd's gradient of the summed loss (or measurement) in every
    parameter of θ, from the same backward pass. ``token_ids=True`` returns an Embedding's ã as its
    token ids (b, T) instead of one-hot vectors (b, T, V), −1 at ``padding_idx``
    (``token_ids_of``). ``local``: modules whose own parameters get module-local per-point
    gradients from the same backward pass(es) (``core.local``), returned in ``Captured.local``; a
    module not called (or without one tensor output) is absent there.
    """
    if theta_grad and cotangents == "ggn":
        raise InputError("capture: theta_grad=True needs cotangents='loss' or 'measure'.")
    params = {n: t.detach().requires_grad_(True) for n, t in (params or objective.params).items()}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for blk in blocks:

        def hook(_m, inp, out, blk=blk):
            if blk.name in outputs:
                raise UnsupportedModelError(
                    f"Layer '{blk.name}' ran twice in one forward pass; K-FAC needs each factored"
                    " layer used once."
                )
            inputs[blk.name] = inp[0].detach()
            outputs[blk.name] = out

        handles.append(blk.module.register_forward_hook(hook))
    recorder = Recorder(local, len(batch))
    try:
        with torch.enable_grad(), recorder.hooks():
            out = objective.outputs(params, batch.X)
    finally:
        for h in handles:
            h.remove()
    missing = [blk.name for blk in blocks if blk.name not in outputs]
    if missing:
        raise UnsupportedModelError(
            f"Layers {missing} were not called in the forward pass; K-FAC cannot factor them."
        )
    names = [blk.name for blk in blocks]
    recorded = [lm for lm in local if recorder.calls[lm.name] == 1 and lm.name in recorder.outputs]
    outs = [outputs[n] for n in names] + [recorder.outputs[lm.name] for lm in recorded]
    clamped = 0
    theta: dict[str, torch.Tensor] | None = None
    with torch.enable_grad():
        if cotangents != "ggn":
            fn = objective.loss_fn if cotangents == "loss" else objective.measure_fn
            loss = fn(out, batch.y.to(out.device)).sum()
            wrt = [*outs, *params.values()] if theta_grad else outs
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            per = [grads[: len(outs)]]
            if theta_grad:
                theta = {
                    n: (
                        torch.zeros_like(t)
                        if gr is None
                        else (gr.to_dense() if gr.is_sparse else gr).detach()
                    )
                    for (n, t), gr in zip(params.items(), grads[len(outs) :])
                }
        else:
            C, clamped = output_hessian_factors(
                objective, out, batch.y, sampling=sampling, ids=batch.ids
            )
            # the last backward pass frees the forward graph: the captures below then hold the
            # memory alone
            per = [
                torch.autograd.grad(
                    out,
                    outs,
                    grad_outputs=C[k].to(out.dtype),
                    retain_graph=k < len(C) - 1,
                    allow_unused=True,
                )
                for k in range(len(C))
            ]
    per = [list(gr) for gr in per]
    g = {}
    for j, blk in enumerate(blocks):
        rows = [gr[j] if gr[j] is not None else torch.zeros_like(outs[j]) for gr in per]
        g[blk.name] = torch.stack([_layer_cotangent(blk, r.detach()) for r in rows])
        for gr in per:  # each layer's cotangents held once: stacked, not also as K tensors
            gr[j] = None
        del rows
    dtypes = {blk.name: outputs[blk.name].dtype for blk in blocks}
    a = {}
    for blk in blocks:  # a layer's input is dropped once its ã is formed (a copy with a bias)
        x = inputs.pop(blk.name)
        a[blk.name] = (
            token_ids_of(blk, x)
            if token_ids and blk.kind == "embedding"
            else _layer_input(blk, x, dtypes[blk.name])
        )
        del x
    loc = {}
    if recorded:
        state = module_state(objective, params, recorded)
        for j, lm in enumerate(recorded, start=len(blocks)):
            loc[lm.name] = recorder.point_grads(lm, state, [gr[j] for gr in per])
    return Captured(a, g, clamped, theta, loc)
