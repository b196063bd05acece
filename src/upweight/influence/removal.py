"""Leverage-corrected removal effects: one Newton step on the leave-one-out objective.

Removing zᵢ keeps n and l2 (as ``upweight.refit`` and ``leave_one_out`` do), so the objective the
model is retrained on is R₋ᵢ(θ) = R(θ) − (1/n) L(zᵢ, θ). At θ̂, ∇R₋ᵢ(θ̂) = −gᵢ/n with gᵢ = ∇θL(zᵢ,
θ̂), and one Newton step from θ̂ gives

    Δθᵢ = (H − Hᵢ/n)⁻¹ gᵢ/n,        Δfᵢ(z_test) = ∇θf(z_test, θ̂)ᵀ Δθᵢ,

with H = ∇²R(θ̂) + δI (the fitted curvature, damping included) and Hᵢ the point's own curvature.
Dropping Hᵢ gives Koh & Liang's first-order estimate H⁻¹gᵢ/n = −I_up,params/n, whose Δf is
−I_up,loss/n. The first order misses that removing zᵢ also removes its curvature: the refit moves
further than H⁻¹gᵢ/n, by up to 1/(1 − hᵢ) for a point of leverage hᵢ (below), which matters when
n is small or a point is far out.

The point's curvature is taken as its Gauss–Newton matrix Hᵢ = Jᵢᵀ Aᵢ Jᵢ, Jᵢ = ∂zᵢ/∂θ the Jacobian
of the model output zᵢ ∈ ℝᶜ and Aᵢ = ∇²_z L(zᵢ) the loss's Hessian in the output (C×C). Where the
output is linear in θ (logistic / softmax / linear regression, a linear head on fixed features)
this *is* ∇²θL(zᵢ, θ̂); for a network that is non-linear in θ it drops Σ_c ∂L/∂z_c ∇²θz_c and the
step is an approximation of the Newton step (with ``Influence(curvature="gauss-newton")``, where H
is the Gauss–Newton matrix too, it is exactly the Gauss–Newton step on R₋ᵢ). The L2 term stays in
R₋ᵢ, so it is not part of Hᵢ.

With the eigendecomposition Aᵢ = Qᵢ Λᵢ Qᵢᵀ, Uᵢ = Jᵢᵀ Qᵢ |Λᵢ|^½ (p × rᵢ, zero eigenvalues dropped,
rᵢ ≤ C) and Dᵢ = sign(Λᵢ), Hᵢ = Uᵢ Dᵢ Uᵢᵀ and the Woodbury identity gives

    (H − Uᵢ Dᵢ Uᵢᵀ/n)⁻¹ = H⁻¹ + H⁻¹Uᵢ Kᵢ⁻¹ Uᵢᵀ H⁻¹,      Kᵢ = n Dᵢ − Uᵢᵀ H⁻¹ Uᵢ   (rᵢ × rᵢ),

so, with s_test = H⁻¹∇θf(z_test) (H symmetric),

    Δfᵢ = s_testᵀ gᵢ/n  +  (s_testᵀ Uᵢ) Kᵢ⁻¹ (Uᵢᵀ H⁻¹ gᵢ)/n.

For the binary logistic loss (C = 1) this is Sherman–Morrison with uᵢ = √(σ(s)σ(−s)) xᵢ ∥ gᵢ:
Δθᵢ = H⁻¹gᵢ/(n − uᵢᵀH⁻¹uᵢ). The cost is one block solve with rᵢ ≤ C right-hand sides per point
(H⁻¹Uᵢ) plus one s_test solve; no p × p matrix is formed.

Leverage: hᵢ = λ_max(Uᵢᵀ H⁻¹ Uᵢ)/n. For a loss convex in the output (Dᵢ = I), H − Hᵢ/n is positive
definite exactly when hᵢ < 1 (H^{-½}(H − UᵢUᵢᵀ/n)H^{-½} = I − WWᵀ/n, W = H^{-½}Uᵢ); in general
exactly when Kᵢ has as many positive eigenvalues as Dᵢ and none zero (Haynsworth inertia
additivity of [[H, Uᵢ], [Uᵢᵀ, nDᵢ]]). Where that fails, or an eigenvalue of Kᵢ is within √ε·n of
zero (ε the compute dtype's machine epsilon: a leverage of 1 to the accuracy of the solves, e.g. the
only point with a non-zero feature and no L2 term), the Newton step is undefined or dominated by
round-off: ``CurvatureError`` names the points.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._checks import check_finite
from .._memory import check_memory, tensor_bytes
from .._progress import progress
from ..core import batching
from ..core.data import Data, map_inputs
from ..core.grads import per_sample_grads, point_grads
from ..core.objective import Objective
from ..core.output_hessian import output_hessian
from ..core.params import Params
from ..errors import CurvatureError
from .provenance import Provenance, as_provenance

if TYPE_CHECKING:
    from .engine import Influence, TrainSelection

#: copies of one block of right-hand sides (p × Σrᵢ) a solve and this module hold at once: the
#: block, its solution, and the solver's working vectors (CG keeps a few more blocks of the same
#: shape)
_BLOCK_COPIES = 6


@dataclass(frozen=True)
class RemovalEffect:
    """Predicted change of the test measurement when each training point is removed and the model
    retrained, by one Newton step on the leave-one-out objective (``upweight.influence.removal``).

    Attributes:
        values: Δf ≈ f(z_test, θ̂₋ᵢ) − f(z_test, θ̂) with the point's curvature taken into account,
            shape (n_test, k); > 0: removing the point raises the test measurement.
        first_order: the paper's estimate −I_up,loss/n for the same pairs, shape (n_test, k).
        leverage: hᵢ = λ_max(Uᵢᵀ(H + δI)⁻¹Uᵢ)/n per training point, shape (k,); for a loss convex
            in the output the correction multiplies the step by up to 1/(1 − hᵢ).
        test_ids, train_ids: ids of the rows and columns.
        n_train: n, the size of the training set the model was fitted on.
        provenance: a ``Provenance``: solver, residuals, timings; its ``extras`` say what Hᵢ is.
    """

    values: np.ndarray
    first_order: np.ndarray
    leverage: np.ndarray
    test_ids: np.ndarray
    train_ids: np.ndarray
    n_train: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def total(self) -> np.ndarray:
        """The corrected Δ of the measurement summed over the test points, shape (k,)."""
        return self.values.sum(axis=0)

    def __str__(self) -> str:
        return (
            "RemovalEffect (one Newton step, point's Gauss–Newton curvature):"
            f" {self.values.shape[0]} test point(s) × {self.values.shape[1]} removed point(s) out"
            f" of n={self.n_train}, leverage up to {float(self.leverage.max(initial=0.0)):.3f}"
        )


def point_curvature_factors(
    objective: Objective, params: Params, batch: Data
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's Gauss–Newton curvature Jᵢᵀ ∇²_zL(zᵢ) Jᵢ as Uᵢ Dᵢ Uᵢᵀ, all points' columns
    stacked.

    Returns ``(U, sign, owner)``: U (m, p) the columns Jᵢᵀ qᵢⱼ √|λᵢⱼ| over the non-zero eigenpairs
    (λᵢⱼ, qᵢⱼ) of each point's output Hessian Aᵢ, sign (m,) = sign(λᵢⱼ), owner (m,) the position in
    ``batch`` of the point each column belongs to. Aᵢ and its eigenpairs come from
    ``core.output_hessian`` (``signed_factors``: closed forms for the built-in losses, else
    ``torch.func.hessian`` of the loss in the flattened output); Jᵢᵀq is the gradient of
    θ ↦ qᵀzᵢ(θ) (``core.grads.point_grads``).
    """
    with torch.no_grad():
        out = objective.outputs(params, batch.X)
    oh = output_hessian(
        objective.loss_fn,
        out,
        batch.y,
        name=objective.loss_name,
        purpose="The leverage-corrected removal effect",
    )
    B, sign, keep = oh.signed_factors()  # row j of B[i] = qᵢⱼ √|λᵢⱼ|
    owner, col = keep.nonzero(as_tuple=True)
    if owner.numel() == 0:
        return out.new_zeros((0, objective.p)), out.new_zeros(0), owner
    cot = B[owner, col].to(out.dtype)  # (m, c)
    rows = batch.subset(owner)

    def directional(p: Params, x: Any, q: torch.Tensor) -> torch.Tensor:
        return (objective.outputs(p, map_inputs(x, lambda t: t.unsqueeze(0))).reshape(-1) * q).sum()

    grads = point_grads(directional, params, Data(rows.X, cot, rows.ids), objective)
    U = objective.space.flatten(grads, batch_dims=1)
    return U, sign[owner, col], owner


def newton_removal_effect(
    influence: Influence, test: Any, train: TrainSelection = None
) -> RemovalEffect:
    """The computation behind ``Influence.removal_effect_newton``; see that method and this
    module."""
    t0 = time.perf_counter()
    test_data = influence._test(test)
    positions = influence._positions(train)
    data = influence.data_
    assert data is not None
    obj, n = influence.objective, influence.n_train_
    params = obj.params
    k, T = len(positions), len(test_data)
    influence._check_result_memory(
        3 * tensor_bytes((T, k), "float64"), f"removal effects of shape ({T}, {k})"
    )

    with torch.no_grad():
        c = obj.outputs(params, data.subset([0]).X)[0].numel()
    item = torch.empty((), dtype=obj.dtype).element_size()
    per_point = c * obj.p * item
    check_memory(
        _BLOCK_COPIES * per_point + 2 * c * c * 8,
        f"the leverage correction of one training point ({c} curvature directions × p = {obj.p}"
        " parameters)",
        alternatives="Use the first-order removal_effect (leave_one_out(..., newton=False)).",
    )
    chunk = batching.points_within(batching.TENSOR_BYTES, per_point, influence.batch_size)

    sol_test = influence.s_test(test_data)
    S = sol_test.value.to(torch.float64)  # (T, p)
    first = np.zeros((T, k))
    values = np.zeros((T, k))
    leverage = np.zeros(k)
    bad: list[tuple[int, float]] = []
    residual_max, solves = sol_test.max_residual, 1
    # |eigenvalue| of Kᵢ below this: Kᵢ singular to the solve's accuracy
    singular = math.sqrt(torch.finfo(obj.dtype).eps) * n
    parts = [positions[s : s + chunk] for s in range(0, k, chunk)]
    for start, part in zip(
        range(0, k, chunk),
        progress(
            parts, desc="leverage-corrected removal", total=len(parts), enabled=influence.progress
        ),
    ):
        batch = data.subset(part)
        G = per_sample_grads(obj, params, batch).to(torch.float64)  # (b, p)
        check_finite(G, "The training-loss gradient ∇θL(z, θ̂)")
        U, sign, owner = point_curvature_factors(obj, params, batch)
        check_finite(U, "The point curvature factor Jᵀ√A")
        W = U.new_zeros((0, obj.p))
        if len(U):
            sol = influence.inverse_hvp(U)  # (m, p): H⁻¹Uᵢ for every point of the chunk
            W, solves = sol.value.to(torch.float64), solves + 1
            residual_max = max(residual_max, sol.max_residual)
        U = U.to(torch.float64)
        first[:, start : start + len(part)] = (S @ G.T).cpu().numpy() / n
        for j in range(len(part)):
            cols = (owner == j).nonzero().reshape(-1)
            a = first[:, start + j]
            if cols.numel() == 0:  # a loss flat in the output at this point: no curvature to remove
                values[:, start + j] = a
                continue
            Uj, Wj, D = U[cols], W[cols], sign[cols].to(torch.float64)
            UHU = 0.5 * (Uj @ Wj.T + Wj @ Uj.T)  # Uᵢᵀ H⁻¹ Uᵢ, (r, r)
            K = n * torch.diag(D) - UHU
            mu = torch.linalg.eigvalsh(K)
            leverage[start + j] = float(torch.linalg.eigvalsh(UHU).max()) / n
            definite = (
                int((mu > 0).sum()) == int((D > 0).sum()) and float(mu.abs().min()) > singular
            )
            if not definite:
                bad.append((int(data.ids[int(part[j])]), leverage[start + j]))
                continue
            coef = torch.linalg.solve(K, Wj @ G[j])  # Kᵢ⁻¹ Uᵢᵀ H⁻¹ gᵢ
            values[:, start + j] = a + (S @ Uj.T @ coef).cpu().numpy() / n
    if bad:
        shown = ", ".join(f"id {i} (leverage {h:.3g})" for i, h in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CurvatureError(
            f"Removing training point(s) {shown}{more} leaves a leave-one-out curvature H + δI −"
            " Hᵢ/n that is indefinite, or singular to the accuracy of the solves (leverage 1 or"
            " above: the point alone supplies the curvature of some direction of θ), so one Newton"
            " step on the leave-one-out objective is undefined there. Add l2 or damping, or leave"
            " those points out of the selection; the first-order removal_effect is still defined."
        )
    check_finite(torch.from_numpy(values), "The leverage-corrected removal effect")
    prov = replace(influence._provenance(sol_test, t0), residual_max=residual_max).with_extras(
        estimate="one Newton step on R − L(zᵢ)/n: Δθ = (H + δI − Hᵢ/n)⁻¹∇L(zᵢ)/n, by Woodbury",
        point_curvature="Gauss–Newton Jᵢᵀ∇²_zL Jᵢ (= ∇²θL(zᵢ) where the output is linear in θ)",
        normalisation="removal at fixed n and l2: argmin (1/n)Σ_{j≠i} L(z_j,θ) + (l2/2)‖θ‖²",
        block_solves=solves,
    )
    ids = data.ids.numpy()
    return RemovalEffect(values, first, leverage, test_data.ids.numpy(), ids[positions], n, prov)
