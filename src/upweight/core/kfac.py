"""Kronecker factors of the Gauss–Newton matrix per layer (K-FAC) and their eigenvalue
correction (EK-FAC), streamed over the training data.

For a factorable layer (``core.layers``) with W̃ = [W | bias] of shape (out, in+1), the
Gauss–Newton matrix G = (1/n) Σᵢ Jᵢᵀ ∇²_zL(zᵢ) Jᵢ restricted to vec(W̃) (row-major) is

    G_W̃ = (1/n) Σᵢ Σₖ vec(Σₜ bᵢₖₜãᵢₜᵀ) vec(Σₜ bᵢₖₜãᵢₜᵀ)ᵀ,

with cᵢₖ the factors of the output Hessian and bᵢₖₜ their back-propagated cotangents. K-FAC
(Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) replaces it by S ⊗ A with

    A = (1/n) Σᵢ Σₜ ãᵢₜãᵢₜᵀ,        S = (1/n) Σᵢ Σₖ (1/T) Σₜ bᵢₖₜbᵢₖₜᵀ,

exact when one point is used, or when every output Hessian is the same constant (the squared
loss of a linear model: G = I ⊗ E[ããᵀ]). With A = Q_A diag(α) Q_Aᵀ and S = Q_S diag(σ) Q_Sᵀ,
S ⊗ A = (Q_S ⊗ Q_A) diag(σ ⊗ α) (Q_S ⊗ Q_A)ᵀ. EK-FAC (George et al. 2018; Grosse et al. 2023)
keeps the Kronecker eigenbasis but replaces σ ⊗ α by the diagonal of G_W̃ in that basis,

    Λ_{oj} = (1/n) Σᵢ Σₖ ((Q_Sᵀ (Σₜ bᵢₖₜãᵢₜᵀ) Q_A)_{oj})²,

the Frobenius-closest matrix to G_W̃ with that eigenbasis. Both need only passes over the data
in batches; nothing of size n × p is held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .data import Data
from .layers import LayerBlock, capture
from .objective import Objective
from .params import Params


@dataclass
class LayerFactors:
    """The K-FAC factors of one layer and their eigendecompositions (float64).

    Attributes:
        block: the layer.
        A: (cols, cols) activation second moment.
        S: (out, out) cotangent second moment.
        eig_A, Q_A: eigenvalues (clamped ≥ 0) and eigenvectors of A.
        eig_S, Q_S: eigenvalues (clamped ≥ 0) and eigenvectors of S.
        corrected: EK-FAC eigenvalues Λ of shape (out, cols), or ``None`` (K-FAC: σ ⊗ α).
        locations: T, the locations per point (1 for a plain Linear).
    """

    block: LayerBlock
    A: torch.Tensor
    S: torch.Tensor
    eig_A: torch.Tensor = field(repr=False)
    Q_A: torch.Tensor = field(repr=False)
    eig_S: torch.Tensor = field(repr=False)
    Q_S: torch.Tensor = field(repr=False)
    locations: int = 1
    corrected: torch.Tensor | None = field(default=None, repr=False)

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The block's eigenvalues in the Kronecker basis, shape (out, cols): Λ, or σ ⊗ α."""
        if self.corrected is not None:
            return self.corrected
        return self.eig_S[:, None] * self.eig_A[None, :]

    def kronecker(self) -> torch.Tensor:
        """S ⊗ A as a dense (size, size) matrix in vec(W̃) row-major order (small layers; tests)."""
        return torch.kron(self.S, self.A)

    def basis(self) -> torch.Tensor:
        """Q_S ⊗ Q_A, dense (small layers; tests)."""
        return torch.kron(self.Q_S, self.Q_A)


@dataclass(frozen=True)
class FitStats:
    """What fitting the factors cost and met."""

    passes: int
    points: int
    clamped_output_eigenvalues: int


def fit_factors(
    objective: Objective,
    data: Data,
    blocks: Sequence[LayerBlock],
    *,
    params: Params | None = None,
    batch_size: int = 512,
    eigen_correction: bool = False,
) -> tuple[list[LayerFactors], FitStats]:
    """A and S for every block in one pass over ``data``, their eigendecompositions, and — with
    ``eigen_correction`` — the EK-FAC eigenvalues Λ in a second pass.

    The cotangents are the GGN's (``capture(..., cotangents="ggn")``): the exact, sample-free
    output Hessian of the loss (for cross-entropy, the softmax covariance diag(p) − ppᵀ).
    """
    n = len(data)
    sums_A: dict[str, torch.Tensor] = {}
    sums_S: dict[str, torch.Tensor] = {}
    locs: dict[str, int] = {}
    clamped = 0
    for batch in data.batches(batch_size):
        cap = capture(objective, blocks, batch, params=params, cotangents="ggn")
        clamped += cap.clamped
        for blk in blocks:
            a = cap.a[blk.name]  # (b, T, cols)
            g = cap.g[blk.name]  # (K, b, T, out)
            T = a.shape[1]
            locs[blk.name] = T
            a2 = a.reshape(-1, a.shape[-1])
            g2 = g.reshape(-1, g.shape[-1])
            # one batch's products in the compute dtype, accumulated over batches in float64
            sums_A[blk.name] = sums_A.get(blk.name, 0) + (a2.T @ a2).to(torch.float64)
            sums_S[blk.name] = sums_S.get(blk.name, 0) + (g2.T @ g2).to(torch.float64) / T
    factors = []
    for blk in blocks:
        A = _sym(sums_A[blk.name] / n)
        S = _sym(sums_S[blk.name] / n)
        eA, QA = torch.linalg.eigh(A)
        eS, QS = torch.linalg.eigh(S)
        factors.append(LayerFactors(blk, A, S, eA.clamp_min(0), QA, eS.clamp_min(0), QS, locs[blk.name]))
    passes = 1
    if eigen_correction:
        correct_eigenvalues(objective, data, factors, params=params, batch_size=batch_size)
        passes = 2
    return factors, FitStats(passes, n, clamped)


def correct_eigenvalues(
    objective: Objective,
    data: Data,
    factors: Sequence[LayerFactors],
    *,
    params: Params | None = None,
    batch_size: int = 512,
    max_elements: int = 2**24,
) -> None:
    """Set ``corrected`` = Λ = (1/n) Σᵢ Σₖ (Q_Sᵀ Gᵢₖ Q_A)² on every factor (EK-FAC), one pass.

    Gᵢₖ = Σₜ bᵢₖₜãᵢₜᵀ is the GGN pseudo-gradient of W̃. For T = 1 the square of the rotated
    outer product is the outer product of the rotated vectors' squares, so Λ is one matrix
    product per batch; for T > 1 the rotated Gᵢₖ are formed in chunks of ``max_elements``.
    """
    n = len(data)
    blocks = [f.block for f in factors]
    sums = {f.block.name: torch.zeros(f.block.out_dim, f.block.cols, dtype=torch.float64) for f in factors}
    for batch in data.batches(batch_size):
        cap = capture(objective, blocks, batch, params=params, cotangents="ggn")
        for f in factors:
            name = f.block.name
            a = cap.a[name].to(torch.float64) @ f.Q_A  # (b, T, cols)
            g = cap.g[name].to(torch.float64) @ f.Q_S  # (K, b, T, out)
            if a.shape[1] == 1:
                sums[name] += torch.einsum("kbo,bj->oj", g[:, :, 0] ** 2, a[:, 0] ** 2)
                continue
            K, b, T, out = g.shape
            step = max(1, max_elements // max(1, K * out * a.shape[2]))
            for s in range(0, b, step):
                G = torch.einsum("kbto,btj->kboj", g[:, s : s + step], a[s : s + step])
                sums[name] += (G**2).sum(dim=(0, 1))
    for f in factors:
        f.corrected = sums[f.block.name] / n


def _sym(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.T)
