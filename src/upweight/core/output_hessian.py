"""The Hessian of a per-sample loss in the model output, Aᵢ = ∇²_z L(zᵢ, yᵢ): the one place that
knows it, for every built-in loss and, through autograd, for any callable loss.

Every curvature that goes through the model output uses Aᵢ: the Gauss–Newton matrix Σᵢ JᵢᵀAᵢJᵢ
(``core.curvature.ggn_sum``), the exact Hessian of a linear output layer (the structured HVP of
``core.structured``), K-FAC's pseudo-gradients (``core.layers.capture``) and the point curvature
of the leverage-corrected removal (``influence.removal``). They need it in different forms, all
given here by ``OutputHessian`` (built by ``output_hessian``):

* ``apply(U)``: Aᵢuᵢⱼ for tangents U (b, k, c) — products without forming Aᵢ;
* ``entry(i, j)``: Aᵢ[i, j] for every point, as the structured dense Hessian assembles it;
* ``dense()``: Aᵢ as (b, c, c) matrices;
* ``psd_factors()``: vectors cᵢₖ with Σₖ cᵢₖcᵢₖᵀ = Aᵢ, negative eigenvalues clamped to 0 and
  counted (the Gauss–Newton matrix keeps only the PSD part of a loss not convex in z);
* ``sampled_factors(U)``: M random vectors with E[Σₘ uᵢₘuᵢₘᵀ]/M = Aᵢ from uniform numbers U — for
  cross-entropy the residuals p − e_ŷ of labels ŷ sampled from the model (the Monte-Carlo Fisher),
  one backward pass per sample however wide the output (K-FAC on a language model);
* ``signed_factors()``: Aᵢ = Σⱼ sᵢⱼ rᵢⱼrᵢⱼᵀ with signs sᵢⱼ = ±1 and zero eigenvalues dropped,
  in float64 (the Woodbury identity of the removal needs the signs and the rank).

Closed forms, with zᵢ ∈ ℝᶜ the (flattened) output of one point and Σ over the classes:

* cross-entropy, −log softmax(z)[y] on outputs (b, C): A = diag(p) − ppᵀ, p = softmax(z)
  (Bishop 2006, §4.3.4), = Σₖ pₖ(eₖ − p)(eₖ − p)ᵀ, so cₖ = √pₖ (eₖ − p), c − 1 of them once
  reflected (``psd_factors``) (sample-free: the true Fisher, the expectation over the model's own
  predictive distribution). With class probabilities
  y (b, C) as targets the loss is −Σₖ yₖ log pₖ and A = (Σₖ yₖ)(diag(p) − ppᵀ);
* token cross-entropy (``TokenCrossEntropy``, logits (b, T, V)): block diagonal over the positions,
  wₜ(diag(pₜ) − pₜpₜᵀ) with wₜ = 1 for a scored position (1/#scored with ``reduction="mean"``) and 0
  for an ignored one (label −100; with ``shift`` the last position predicts nothing);
* binary logistic, softplus(−ys) on one score s: d²/ds² = σ(s)σ(−s) for y = ±1 (Koh & Liang 2017,
  §2.3);
* smooth hinge, t·softplus(u), u = (1 − ys)/t: d²/ds² = σ(u)σ(−u)/t (Koh & Liang 2017, §4.3);
* squared, ½‖z − y‖²: A = I.

Any other loss (a callable, ``hinge``, cross-entropy on outputs with more than two dimensions):
Aᵢ from ``torch.func.hessian`` of the loss in the flattened output, once per batch (``generic=
"dense"``), or implicitly by a double backward through the loss alone (``generic="implicit"``:
products only, never the c × c matrix — for wide outputs such as a language model's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import hessian, vmap

from .._checks import check_finite
from ..errors import UnsupportedModelError
from .losses import IGNORE_INDEX, SmoothHinge, TokenCrossEntropy, cross_entropy, logistic, squared

HessianKind = Literal["softmax", "diagonal", "identity", "full", "implicit", "zero"]


def closed_form(loss: Callable, shape: tuple[int, ...]) -> HessianKind | None:
    """The kind of closed form ``output_hessian`` uses for ``loss`` on outputs of per-point shape
    ``shape``, or ``None`` where it falls back to autograd."""
    c = 1
    for s in shape:
        c *= s
    if loss is cross_entropy and len(shape) == 1:
        return "softmax"
    if isinstance(loss, TokenCrossEntropy) and len(shape) == 2:
        return "softmax"
    if loss is squared:
        return "identity"
    if (loss is logistic or isinstance(loss, SmoothHinge)) and c == 1:
        return "diagonal"
    return None


@dataclass(frozen=True)
class OutputHessian:
    """Aᵢ = ∇²_z L(zᵢ, yᵢ) for one batch of b outputs of per-point shape ``shape`` (c numbers).

    kind "softmax": ``h`` = p (b, T, V) the softmax over the last axis (T = 1 for cross-entropy on
    (b, C) outputs), ``w`` (b, T) the weight of each position or ``None`` for all ones;
    Aᵢ = blockdiagₜ wₜ(diag(pₜ) − pₜpₜᵀ). "diagonal": ``h`` (b, c), Aᵢ = diag(hᵢ). "identity":
    Aᵢ = I. "full": ``h`` (b, c, c) from ``torch.func.hessian``. "implicit": products by a double
    backward through the loss (``graph`` = (z, ∇_z Σᵢ L)), the other forms from c such products.
    "zero": the loss is linear in z. For "identity" and "zero", ``h`` is an empty (b, 0) tensor that
    carries the batch size, dtype and device.
    """

    kind: HessianKind
    shape: tuple[int, ...]
    h: torch.Tensor
    w: torch.Tensor | None = None
    graph: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def b(self) -> int:
        return self.h.shape[0] if self.kind != "implicit" else self.graph[0].shape[0]  # type: ignore[index]

    @property
    def c(self) -> int:
        c = 1
        for s in self.shape:
            c *= s
        return c

    def apply(self, U: torch.Tensor) -> torch.Tensor:
        """Aᵢuᵢⱼ for tangents U of shape (b, k, c) (c the flattened output) → (b, k, c)."""
        if self.kind == "softmax":
            b, k, c = U.shape
            T, V = self.h.shape[1:]
            if T == 1:
                p = self.h[:, None, 0]  # (b, 1, c)
                out = p * U - p * (U * p).sum(-1, keepdim=True)
                return out * self.w[:, None, :] if self.w is not None else out
            # (b, 1, T, V); one output-sized temporary for k tangents of a wide output
            p = self.h[:, None]
            Ut = U.reshape(b, k, T, V)
            out = p * Ut
            out.addcmul_(p, torch.einsum("bktv,btv->bkt", Ut, self.h)[..., None], value=-1)
            if self.w is not None:
                out.mul_(self.w[:, None, :, None])
            return out.reshape(b, k, c)
        if self.kind == "diagonal":
            return self.h[:, None, :] * U
        if self.kind == "identity":
            return U
        if self.kind == "zero":
            return torch.zeros_like(U)
        if self.kind == "full":
            return torch.einsum("bcd,bkd->bkc", self.h, U)
        z, gz = self.graph  # type: ignore[misc]
        with torch.enable_grad():
            cols = [
                torch.autograd.grad(gz, z, U[:, j].reshape(z.shape), retain_graph=True)[0].reshape(
                    len(z), -1
                )
                for j in range(U.shape[1])
            ]
        return torch.stack(cols, dim=1)

    def entry(self, i: int, j: int) -> torch.Tensor | None:
        """Aₖ[i, j] for every point k of the batch, shape (b,), or ``None`` where it is 0 for all of
        them (i, j index the flattened output)."""
        if self.kind == "softmax":
            V = self.h.shape[2]
            (ti, ki), (tj, kj) = divmod(i, V), divmod(j, V)
            if ti != tj:
                return None
            pi, pj = self.h[:, ti, ki], self.h[:, tj, kj]
            e = -pi * pj
            e = e + pi if i == j else e
            return e * self.w[:, ti] if self.w is not None else e
        if self.kind == "diagonal":
            return self.h[:, i] if i == j else None
        if self.kind == "identity":
            return self.h.new_ones(self.b) if i == j else None
        if self.kind == "zero":
            return None
        if self.kind == "full":
            return self.h[:, i, j]
        return self.dense()[:, i, j]

    def dense(self) -> torch.Tensor:
        """Aᵢ as matrices, shape (b, c, c) (for "full", the Hessian as ``torch.func.hessian`` gave
        it)."""
        if self.kind == "full":
            return self.h
        ref = self.h if self.kind != "implicit" else self.graph[0]  # type: ignore[index]
        eye = torch.eye(self.c, dtype=ref.dtype, device=ref.device)
        return self.apply(eye.expand(self.b, self.c, self.c))  # row k = Aeₖ: A is symmetric

    def psd_factors(self) -> tuple[torch.Tensor, int]:
        """Vectors cᵢₖ with Σₖ cᵢₖcᵢₖᵀ = Aᵢ, shape (K, b, *shape), and the number of negative
        eigenvalues clamped to 0 over the batch (K-FAC's pseudo-gradients back-propagate each cₖ).

        Closed forms: cross-entropy, per position, the c vectors fₖ = √pₖ (eₖ − p) (Σₖ fₖfₖᵀ =
        diag(p) − ppᵀ) are dependent — Σₖ √pₖ fₖ = 0 — so reflecting them by the Householder
        matrix that maps e_c to −√p (v = √p + e_c) makes the last one zero and leaves the other
        c − 1, gⱼ = fⱼ − fᶜ·√pⱼ/(1 + √p_c) (K = c − 1: one backward pass fewer per position
        — half of them for a binary classifier); a diagonal Aᵢ gives
        √hₖ eₖ; the squared loss eₖ. Otherwise Aᵢ is symmetrised and eigendecomposed,
        cₖ = √max(λₖ, 0) qₖ; an eigenvalue below −10⁻¹² · max|λ| counts as clamped.
        """
        b, c = self.b, self.c
        if self.kind == "softmax":
            T, V = self.h.shape[1:]
            p = self.h
            s = (p * self.w[..., None]).sqrt() if self.w is not None else p.sqrt()
            eye = torch.eye(V, dtype=p.dtype, device=p.device)
            u = p.sqrt()
            beta = u[..., :-1] / (1 + u[..., -1:])  # (b, T, V − 1): the reflection's weights
            if V == 1:  # one class: a zero Hessian, one zero factor
                return p.new_zeros(1, b, *self.shape), 0
            if T == 1:
                F = s[:, 0].T[:, :, None] * (eye[:, None, :] - p[None, :, 0, :])  # (V, b, V)
                C = F[:-1] - beta[:, 0].T[:, :, None] * F[-1:]  # (K = V − 1, b, V)
                return C.reshape(T * (V - 1), b, *self.shape), 0
            F = s.permute(1, 2, 0)[:, :, :, None] * (
                eye[None, :, None, :] - p.permute(1, 0, 2)[:, None, :, :]
            )  # (T, V, b, V)
            blk = F[:, :-1] - beta.permute(1, 2, 0)[:, :, :, None] * F[:, -1:]
            C = p.new_zeros(T, V - 1, b, T, V)
            t = torch.arange(T, device=p.device)
            C[t, :, :, t, :] = blk  # factor (t, j) lives on position t only
            return C.reshape(T * (V - 1), b, *self.shape), 0
        if self.kind == "diagonal":
            return torch.diag_embed(self.h.sqrt()).permute(1, 0, 2).reshape(c, b, *self.shape), 0
        if self.kind == "identity":
            C = torch.eye(c, dtype=self.h.dtype, device=self.h.device)[:, None, :].expand(c, b, c)
            return C.reshape(c, b, *self.shape).clone(), 0
        H = self.dense()
        H = 0.5 * (H + H.transpose(1, 2))
        ev, Q = torch.linalg.eigh(H)
        clamped = int((ev < -1e-12 * ev.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)).sum())
        # (K=c, b, c): column k of Q√λ
        C = (Q * ev.clamp_min(0).sqrt()[:, None, :]).permute(2, 0, 1)
        return C.reshape(c, b, *self.shape), clamped

    @property
    def sample_width(self) -> int:
        """Uniform numbers ``sampled_factors`` needs per point and sample: one per position for
        "softmax" (its sampled label), one per output coordinate otherwise (a random sign)."""
        return self.h.shape[1] if self.kind == "softmax" else self.c

    def sampled_factors(self, U: torch.Tensor) -> tuple[torch.Tensor, int]:
        """M random vectors uᵢₘ/√M per point, shape (M, b, *shape), with E[Σₘ uᵢₘuᵢₘᵀ]/M = Aᵢ (the
        PSD part), from uniform numbers U of shape (M, b, ``sample_width``) in [0, 1); and the
        number of negative eigenvalues clamped, as ``psd_factors``.

        "softmax" (the Monte-Carlo Fisher, Martens & Grosse 2015): at every position t a label
        ŷₜ ~ pₜ by inversion of U's number, uₜ = √wₜ (pₜ − e_ŷₜ). E[(pₜ − e_ŷ)(pₜ − e_ŷ)ᵀ] =
        diag(pₜ) − pₜpₜᵀ, and the labels of two positions are independent, so the cross-position
        terms vanish in expectation: E[uuᵀ] = blockdiagₜ wₜ(diag(pₜ) − pₜpₜᵀ) = Aᵢ. Any other
        form: u = Σₖ εₖcₖ over the PSD factors cₖ with random signs εₖ (E[εₖεₗ] = δₖₗ, so E[uuᵀ] =
        Σₖ cₖcₖᵀ): u = ε ⊙ √h for a diagonal Aᵢ, ε for the identity, without forming the factors.
        """
        M, b = U.shape[0], U.shape[1]
        ref = self.h if self.kind != "implicit" else self.graph[0]  # type: ignore[index]
        scale = M**-0.5
        if self.kind == "softmax":
            p = self.h  # (b, T, V)
            V = p.shape[2]
            cdf = p.to(torch.float64).cumsum(-1)
            u = U.to(p.device, torch.float64).permute(1, 2, 0).contiguous()  # (b, T, M)
            labels = torch.searchsorted(cdf, u, right=True).clamp_max(V - 1)  # #{k: cdfₖ ≤ u}
            onehot = torch.nn.functional.one_hot(labels, V).to(p.dtype)  # (b, T, M, V)
            out = (p[:, :, None, :] - onehot).permute(2, 0, 1, 3)  # (M, b, T, V)
            if self.w is not None:
                out = out * self.w.sqrt()[None, :, :, None]
            return (out * scale).reshape(M, b, *self.shape), 0
        sign = torch.where(U.to(ref.device) < 0.5, -1.0, 1.0).to(ref.dtype)  # (M, b, c)
        if self.kind == "diagonal":
            return (sign * self.h.sqrt()[None] * scale).reshape(M, b, *self.shape), 0
        if self.kind == "identity":
            return (sign * scale).reshape(M, b, *self.shape), 0
        C, clamped = self.psd_factors()  # (K = c, b, *shape)
        u = torch.einsum("mbk,kbc->mbc", sign.to(C.dtype), C.reshape(self.c, b, self.c))
        return (u * scale).reshape(M, b, *self.shape), clamped

    def signed_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Aᵢ = Σⱼ sᵢⱼ rᵢⱼrᵢⱼᵀ over its non-zero eigenpairs (λᵢⱼ, qᵢⱼ), in float64.

        Returns ``(R, sign, keep)``: R (b, c, c) with row j = qᵢⱼ√|λᵢⱼ|, sign (b, c) = sign(λᵢⱼ),
        keep (b, c) the eigenvalues above round-off, |λ| > c·ε₆₄·max|λᵢ| (the others are zero
        eigenvalues computed inexactly). ``NonFiniteError`` if Aᵢ has a NaN or infinity.
        """
        A = self.dense()
        A = 0.5 * (A + A.transpose(1, 2)).to(torch.float64)
        check_finite(
            A,
            "The loss's Hessian in the model output ∇²_zL",
            "Check the model outputs for overflow at θ̂.",
        )
        lam, Q = torch.linalg.eigh(A)  # (b, c), (b, c, c): columns of Q are the eigenvectors
        scale = lam.abs().amax(dim=1, keepdim=True)
        keep = lam.abs() > self.c * torch.finfo(torch.float64).eps * scale
        R = (Q * lam.abs().sqrt()[:, None, :]).transpose(1, 2)
        return R, torch.sign(lam), keep


def _softmax_weights(loss: Callable, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The weight wₜ of each position's softmax block (b, T), or ``None`` where all are 1."""
    if isinstance(loss, TokenCrossEntropy):
        labels = y.reshape(z.shape[0], -1).long()
        scored = labels != IGNORE_INDEX
        if loss.shift:  # logits at t predict the label at t + 1; the last position predicts nothing
            scored = torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1)
        w = scored.to(z.dtype)
        if loss.reduction == "mean":
            w = w / scored.sum(dim=1, keepdim=True).clamp_min(1).to(z.dtype)
        return w
    # class probabilities: −Σₖ yₖ log pₖ
    if y.is_floating_point() and tuple(y.shape) == tuple(z.shape):
        return y.to(z.dtype).sum(dim=1, keepdim=True)
    return None


def output_hessian(
    loss: Callable,
    out: torch.Tensor,
    y: torch.Tensor,
    *,
    generic: Literal["dense", "implicit"] = "dense",
    name: str | None = None,
    purpose: str = "This computation",
    fix: str = "",
) -> OutputHessian:
    """∇²_z L(zᵢ, yᵢ) of the per-sample ``loss`` at model outputs ``out`` (b, *shape) and targets
    ``y``.

    Closed forms for the built-in losses (``closed_form``, the module docstring); for any other
    loss, ``generic="dense"`` takes the exact per-point Hessian from ``torch.func.hessian`` (not
    clamped, not symmetrised) and ``generic="implicit"`` keeps the double-backward graph of the loss
    for ``apply`` (kind "zero" when the loss is linear in z). ``name``, ``purpose`` and ``fix`` word
    the ``UnsupportedModelError`` raised when ``torch.func.hessian`` fails on the loss.
    """
    b = out.shape[0]
    shape = tuple(out.shape[1:])
    z = out.detach()
    y = y.to(z.device)
    kind = closed_form(loss, shape)
    if kind == "softmax":
        logits = z if z.ndim == 3 else z[:, None, :]
        return OutputHessian(
            "softmax", shape, torch.softmax(logits, dim=-1), _softmax_weights(loss, z, y)
        )
    if kind == "identity":
        return OutputHessian("identity", shape, z.new_zeros(b, 0))
    if kind == "diagonal":
        s = z.reshape(b, 1)
        if loss is logistic:  # d²/ds² softplus(−ys) = σ(s)σ(−s) for y = ±1
            return OutputHessian("diagonal", shape, torch.sigmoid(s) * torch.sigmoid(-s))
        assert isinstance(loss, SmoothHinge)  # t·softplus(u), u = (1 − ys)/t: σ(u)σ(−u)/t
        sign = torch.where(y.reshape(-1, 1) > 0, 1.0, -1.0).to(s.dtype)
        u = (1.0 - sign * s) / loss.t
        return OutputHessian("diagonal", shape, torch.sigmoid(u) * torch.sigmoid(-u) / loss.t)
    if generic == "implicit":
        with torch.enable_grad():
            zl = z.requires_grad_(True)
            gz = torch.autograd.grad(loss(zl, y).sum(), zl, create_graph=True)[0]
        if not gz.requires_grad:  # the loss is linear in z: no curvature
            return OutputHessian("zero", shape, z.new_zeros(b, 0))
        return OutputHessian("implicit", shape, z.new_zeros(0), graph=(zl, gz))

    def one(zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(zi.reshape(1, *shape), yi.unsqueeze(0))[0]

    c = z[0].numel()
    try:
        Hz = vmap(hessian(one))(z.reshape(b, c), y)
    except Exception as exc:  # noqa: BLE001 — re-raised with the fix
        label = name or getattr(loss, "__name__", type(loss).__name__)
        raise UnsupportedModelError(
            f"{purpose} needs the Hessian of the loss '{label}' in the model output (shape {shape}"
            f" per point), but torch.func.hessian failed on it: {exc}." + (f" {fix}" if fix else "")
        ) from exc
    return OutputHessian("full", shape, Hz.reshape(b, c, c))
