"""``core.output_hessian``: every form of ∇²_z L(z, y) — applied, entries, dense, PSD factors,
signed factors — against ``torch.autograd.functional.hessian`` of the loss in z, in float64, for
each built-in loss and for callable losses (a non-convex one: clamped and counted negative
eigenvalues).
"""

from __future__ import annotations

import pytest
import torch

from upweight.core.losses import (
    SmoothHinge,
    TokenCrossEntropy,
    cross_entropy,
    hinge,
    logistic,
    squared,
)
from upweight.core.output_hessian import closed_form, output_hessian
from upweight.errors import UnsupportedModelError

D64 = torch.float64
B = 5


def _nonconvex(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σₖ yₖcos(zₖ) + z₀z₁z₂ per point: an indefinite Hessian with off-diagonal terms."""
    return (torch.cos(z) * y).sum(1) + z[:, 0] * z[:, 1] * z[:, 2]


def _convex(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the flattened output minus its first entry, plus a quartic term: convex, not
    built in."""
    f = z.reshape(len(z), -1)
    return torch.logsumexp(f, 1) - f[:, 0] * y + 0.1 * (f**2).sum(1) ** 2


def _case(name: str, g: torch.Generator):
    """(loss, outputs (b, *shape), targets, kind of closed form or None)."""
    if name == "cross_entropy":
        return (
            cross_entropy,
            torch.randn(B, 4, dtype=D64, generator=g),
            torch.randint(0, 4, (B,), generator=g),
            "softmax",
        )
    if name == "cross_entropy_probabilities":  # targets need not sum to 1: the Hessian scales by Σy
        return (
            cross_entropy,
            torch.randn(B, 4, dtype=D64, generator=g),
            torch.rand(B, 4, dtype=D64, generator=g),
            "softmax",
        )
    if name == "logistic":
        return (
            logistic,
            torch.randn(B, 1, dtype=D64, generator=g),
            torch.randint(0, 2, (B,), generator=g),
            "diagonal",
        )
    if name == "logistic_flat_pm1":
        y = torch.randint(0, 2, (B,), generator=g) * 2 - 1
        return logistic, 3 * torch.randn(B, dtype=D64, generator=g), y, "diagonal"
    if name == "smooth_hinge":
        y = torch.randint(0, 2, (B,), generator=g) * 2 - 1
        return SmoothHinge(0.5), torch.randn(B, 1, dtype=D64, generator=g), y, "diagonal"
    if name == "squared":
        return (
            squared,
            torch.randn(B, 3, dtype=D64, generator=g),
            torch.randn(B, 3, dtype=D64, generator=g),
            "identity",
        )
    if name == "squared_image":
        return (
            squared,
            torch.randn(B, 2, 2, dtype=D64, generator=g),
            torch.randn(B, 4, dtype=D64, generator=g),
            "identity",
        )
    if name.startswith("token"):
        loss = {
            "token": TokenCrossEntropy(),
            "token_mean": TokenCrossEntropy(reduction="mean"),
            "token_shift": TokenCrossEntropy(shift=True),
            "token_shift_mean": TokenCrossEntropy(shift=True, reduction="mean"),
        }[name]
        y = torch.randint(0, 3, (B, 4), generator=g)
        y[0, 2:] = -100  # padding
        y[1, 0] = -100
        return loss, torch.randn(B, 4, 3, dtype=D64, generator=g), y, "softmax"
    if name == "custom_convex":
        return (
            _convex,
            torch.randn(B, 2, 2, dtype=D64, generator=g),
            torch.randn(B, dtype=D64, generator=g),
            None,
        )
    if name == "custom_nonconvex":
        return (
            _nonconvex,
            torch.randn(B, 3, dtype=D64, generator=g),
            torch.randn(B, 3, dtype=D64, generator=g),
            None,
        )
    raise AssertionError(name)


CASES = [
    "cross_entropy",
    "cross_entropy_probabilities",
    "logistic",
    "logistic_flat_pm1",
    "smooth_hinge",
    "squared",
    "squared_image",
    "token",
    "token_mean",
    "token_shift",
    "token_shift_mean",
    "custom_convex",
    "custom_nonconvex",
]


def reference(loss, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇²_z L(zᵢ, yᵢ) per point, (b, c, c), from torch.autograd.functional.hessian of the loss in
    the flattened zᵢ."""
    shape = z.shape[1:]
    return torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda zi, i=i: loss(zi.reshape(1, *shape), y[i : i + 1]).sum(), z[i].reshape(-1)
            )
            for i in range(len(z))
        ]
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("generic", ["dense", "implicit"])
@pytest.mark.parametrize("name", CASES)
def test_every_form_equals_the_autograd_hessian(name, generic):
    g = torch.Generator().manual_seed(CASES.index(name))
    loss, z, y, kind = _case(name, g)
    H = reference(loss, z, y)
    b, c = H.shape[:2]
    assert closed_form(loss, tuple(z.shape[1:])) == kind
    oh = output_hessian(loss, z, y, generic=generic)
    assert oh.kind == (kind or {"dense": "full", "implicit": "implicit"}[generic])

    U = torch.randn(b, 3, c, dtype=D64, generator=g)
    _close(oh.apply(U), torch.einsum("bcd,bkd->bkc", H, U))
    _close(oh.dense(), H)
    for i in range(c):
        for j in range(c):
            e = oh.entry(i, j)
            _close(e if e is not None else torch.zeros(b, dtype=D64), H[:, i, j])

    ev, Q = torch.linalg.eigh(H)
    psd = Q @ torch.diag_embed(ev.clamp_min(0)) @ Q.transpose(1, 2)  # the PSD part of each Hᵢ
    C, clamped = oh.psd_factors()
    assert C.shape[1:] == z.shape
    Cf = C.reshape(len(C), b, c)
    _close(torch.einsum("kbc,kbd->bcd", Cf, Cf), psd)
    assert clamped == int((ev < -1e-9).sum())

    R, sign, keep = oh.signed_factors()
    assert R.dtype == D64
    _close(torch.einsum("bj,bjc,bjd->bcd", sign * keep, R, R), H)
    # the rank: zero eigenvalues dropped, none other
    assert bool((keep == (ev.abs() > 1e-12)).all())


def test_a_nonconvex_loss_has_its_negative_eigenvalues_clamped_and_counted():
    g = torch.Generator().manual_seed(7)
    loss, z, y, _ = _case("custom_nonconvex", g)
    ev = torch.linalg.eigvalsh(reference(loss, z, y))
    negative = int((ev < 0).sum())
    assert 0 < negative < ev.numel()  # indefinite: some of each sign
    C, clamped = output_hessian(loss, z, y).psd_factors()
    assert clamped == negative
    Cf = C.reshape(len(C), len(z), -1)
    assert float(torch.linalg.eigvalsh(torch.einsum("kbc,kbd->bcd", Cf, Cf)).min()) > -1e-12
    _, sign, keep = output_hessian(loss, z, y).signed_factors()
    assert int(((sign < 0) & keep).sum()) == negative  # the signed form keeps them


@pytest.mark.parametrize("c", [2, 4])
def test_softmax_factors_are_the_closed_form(c):
    """Cross-entropy's factors are closed-form (no eigendecomposition, no sign ambiguity): the c
    vectors fₖ = √pₖ(eₖ − p) reflected into c − 1, gⱼ = fⱼ − f_c·√pⱼ/(1 + √p_c), whose outer
    products still sum to diag(p) − ppᵀ — one backward pass fewer per point in K-FAC."""
    z = torch.randn(3, c, dtype=D64, generator=torch.Generator().manual_seed(1))
    z[2, -1] = 30.0  # the last class near-certain: the reflection stays well-conditioned
    C, clamped = output_hessian(cross_entropy, z, torch.tensor([0, 1, c - 1])).psd_factors()
    p = torch.softmax(z, 1)
    f = [p[:, k : k + 1].sqrt() * (torch.eye(c, dtype=D64)[k] - p) for k in range(c)]
    assert C.shape == (c - 1, 3, c)
    for j in range(c - 1):
        _close(C[j], f[j] - f[-1] * p[:, j : j + 1].sqrt() / (1 + p[:, -1:].sqrt()))
    _close(torch.einsum("kbc,kbd->bcd", C, C), torch.diag_embed(p) - p[:, :, None] * p[:, None])
    assert clamped == 0


def test_a_loss_linear_in_the_output_is_zero_implicitly():
    def linear(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (z * y).sum(1)

    z, y = torch.randn(4, 3, dtype=D64), torch.randn(4, 3, dtype=D64)
    oh = output_hessian(linear, z, y, generic="implicit")
    assert oh.kind == "zero"
    assert float(oh.apply(torch.randn(4, 2, 3, dtype=D64)).abs().max()) == 0.0
    _close(output_hessian(linear, z, y).dense(), torch.zeros(4, 3, 3, dtype=D64))


def test_hinge_has_no_closed_form_and_a_zero_hessian_almost_everywhere():
    z, y = torch.tensor([[0.3], [2.0], [-1.0]], dtype=D64), torch.tensor([1, 1, 0])
    assert closed_form(hinge, (1,)) is None
    _close(output_hessian(hinge, z, y).dense(), torch.zeros(3, 1, 1, dtype=D64))


def test_a_loss_torch_func_cannot_differentiate_is_refused_with_the_purpose_and_fix():
    def opaque(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return z.sum(1) * float(z.sum().item())

    with pytest.raises(
        UnsupportedModelError,
        match=r"(?s)K-FAC needs the Hessian of the loss 'opaque'.*Use another loss",
    ):
        output_hessian(
            opaque, torch.randn(2, 3), torch.zeros(2), purpose="K-FAC", fix="Use another loss."
        )
