"""Group influence: the predicted effect of removing a whole set U of training points.

Removing U sets the weights of its points from 1 to 0 in R(θ) = (1/n) Σᵢ L(zᵢ, θ) + (l2/2)‖θ‖²,
keeping n and l2 (the convention of ``upweight.refit`` and of leave-one-out). Write

    G_U(θ) = (1/n) Σ_{z∈U} L(z, θ),   g_U = ∇G_U(θ̂),   H_U = ∇²G_U(θ̂) = (1/n) Σ_{z∈U} ∇²L(z, θ̂),

and θ(ε) = argmin R(θ) − ε·G_U(θ): θ(0) = θ̂ and θ(1) = θ̂₋U, the model retrained without U.
Differentiating the optimality condition ∇R(θ(ε)) − ε∇G_U(θ(ε)) = 0 at ε = 0 gives

    θ′(0)  = H⁻¹ g_U
    θ″(0)  = H⁻¹ (2 H_U θ′(0) − ∇³R(θ̂)[θ′(0), θ′(0)])

with H = ∇²R(θ̂) + δI. The expansion θ̂₋U − θ̂ ≈ θ′ + ½θ″ at ε = 1 gives the two orders:

    order 1:  Δθ⁽¹⁾ = H⁻¹ g_U = (1/n) Σ_{z∈U} H⁻¹∇L(z, θ̂)
              = the sum of the individual removal effects −I_up,params(z)/n (Koh et al. 2019);
    order 2:  Δθ⁽²⁾ = Δθ⁽¹⁾ + H⁻¹ H_U Δθ⁽¹⁾            (Basu, You & Feizi 2020)
              [ − ½ H⁻¹ ∇³R(θ̂)[Δθ⁽¹⁾, Δθ⁽¹⁾]        only with ``third_derivative=True`` ].

The H_U term is the interaction within U that Basu et al. (2020) keep: how removing
one point of U changes the curvature seen by the others. Like them, the default drops the
third-derivative term of the full risk; ``third_derivative=True`` keeps it, which makes Δθ⁽²⁾
the complete second-order Taylor expansion in the group weight (error O(ε³) instead of O(ε²)).
Basu et al. renormalise the remaining risk by 1/(n − |U|), which puts the factors
(1 − 2p)/(1 − p)² and 1/(1 − p)² (p = |U|/n) on their two terms; removing U at fixed n and l2,
as here, makes both factors 1. For a quadratic loss (∇³R = 0) the exact change is
(H − H_U)⁻¹ g_U = Σₖ (H⁻¹H_U)ᵏ H⁻¹ g_U, of which the orders are the first one and two terms.

The test measurement f (the loss by default) changes by

    order 1:  Δf⁽¹⁾ = ∇θf(z_test, θ̂)ᵀ Δθ⁽¹⁾
    order 2:  Δf⁽²⁾ = ∇θf(z_test, θ̂)ᵀ Δθ⁽²⁾ + ½ Δθ⁽²⁾ᵀ ∇²θf(z_test, θ̂) Δθ⁽²⁾

(the quadratic term only with ``measure_hessian=True``, the default; with ``measure_hessian=False``
and ``third_derivative=False`` order 2 is Basu et al.'s I⁽²⁾(U, z_test) in this normalisation).

Cost: one block inverse-HVP over the groups for order 1 (one right-hand side per group, not per
point); order 2 adds one group-restricted HVP per group (Σ|U| per-point HVPs), one more block
solve, optionally one pass of third directional derivatives over the data, and n_test × n_groups
second directional derivatives of f. No Hessian is formed.

References:
    Koh, Ang, Teo & Liang (2019). On the Accuracy of Influence Functions for Measuring Group
    Effects. NeurIPS. Basu, You & Feizi (2020). On Second-Order Group Influence Functions for
    Black-Box Predictions. ICML.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from .._checks import check_choice, check_finite, check_is_fitted
from .._memory import tensor_bytes
from .._progress import progress
from ..core.data import Data
from ..errors import InputError
from .provenance import Provenance, as_provenance

if TYPE_CHECKING:
    from ..core.curvature import Curvature
    from .engine import Influence


@dataclass(frozen=True)
class GroupInfluence:
    """Predicted effect of removing each group U of training points and retraining.

    Sign convention: ``values[t, u]`` ≈ f(z_test_t, θ̂₋U) − f(z_test_t, θ̂), the change of the test
    measurement (the loss by default) when group u is removed: > 0 means removing U raises the
    test loss (U was *helpful* to that test point), < 0 means U was *harmful*. This is the group
    analogue of ``InfluenceScores.as_removal_effect()``; at order 1 it is exactly the sum of the
    removal effects −I_up,loss(z, z_test)/n over z ∈ U.

    Attributes:
        values: predicted Δ test measurement, shape (n_test, n_groups).
        param_change: predicted θ̂₋U − θ̂ (Δθ⁽¹⁾ or Δθ⁽²⁾), shape (n_groups, p).
        group_sizes: |U| for each group, shape (n_groups,).
        groups: the training ids in each group (ids of the fitted data, positions by default).
        test_ids: ids of the test points (the rows).
        n_train: n, the size of the training set the model was fitted on.
        order: 1 or 2.
        provenance: a ``Provenance``: solver, residuals, timings; its ``extras`` hold the order,
            the first solve's residual and which second-order terms were kept.
    """

    values: np.ndarray
    param_change: np.ndarray
    group_sizes: np.ndarray
    groups: tuple[np.ndarray, ...]
    test_ids: np.ndarray
    n_train: int
    order: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    @property
    def fractions(self) -> np.ndarray:
        """|U| / n for each group."""
        return self.group_sizes / self.n_train

    def total(self) -> np.ndarray:
        """Predicted Δ of the measurement summed over the test points, shape (n_groups,)."""
        return self.values.sum(axis=0)

    def to_numpy(self) -> np.ndarray:
        return self.values

    def __str__(self) -> str:
        return (
            f"GroupInfluence (order {self.order}): {self.values.shape[0]} test point(s) ×"
            f" {len(self.group_sizes)} group(s) of sizes"
            f" {int(self.group_sizes.min())}–{int(self.group_sizes.max())} out of n={self.n_train}"
        )


def normalize_groups(groups: Any, n: int) -> list[np.ndarray]:
    """Validate ``groups`` (a sequence of index arrays or boolean masks of length n) into sorted
    int64 position arrays; raise ``InputError`` for empty groups, out-of-range or repeated indices.
    """
    if (
        isinstance(groups, (np.ndarray, torch.Tensor))
        and np.asarray(groups).ndim == 1
        and np.asarray(groups).dtype != object
    ):
        raise InputError(
            "groups must be a list of index arrays (one per group), not a single flat array; "
            "for one group pass [indices]."
        )
    try:
        items = list(groups)
    except TypeError as exc:
        raise InputError(
            f"groups must be a list of index arrays; got {type(groups).__name__}."
        ) from exc
    if not items:
        raise InputError("groups is empty: pass at least one group (an array of training indices).")
    if all(np.ndim(g) == 0 for g in items):
        raise InputError(
            "groups must be a list of index arrays (one per group), not a flat list of indices; "
            "for one group pass [indices]."
        )
    out = []
    for j, g in enumerate(items):
        a = g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        if a.dtype == bool:
            if a.shape != (n,):
                raise InputError(
                    f"Group {j} is a boolean mask of shape {a.shape}; a mask needs shape ({n},)."
                )
            a = np.flatnonzero(a)
        else:
            a = a.reshape(-1)
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise InputError(
                    f"Group {j} has dtype {a.dtype}; groups hold integer positions into the"
                    " training data."
                )
            a = a.astype(np.int64)
        if a.size == 0:
            raise InputError(f"Group {j} is empty; every group needs at least one training point.")
        if a.min() < 0 or a.max() >= n:
            raise InputError(
                f"Group {j} has indices {a.min()}..{a.max()}, outside the {n} fitted training"
                f" points [0, {n})."
            )
        u = np.unique(a)
        if u.size != a.size:
            raise InputError(
                f"Group {j} repeats {a.size - u.size} index(es); a point can be removed only once."
            )
        out.append(u)
    return out


def _group_loss_grad(inf: Influence, data: Data, chunk: int) -> torch.Tensor:
    """Σ_{z∈data} ∇θL(z, θ̂) as a flat vector (p,), streamed in chunks."""
    obj = inf.objective
    acc = torch.zeros(obj.p, dtype=obj.dtype, device=obj.device)
    for batch in data.batches(chunk):
        g = grad(lambda p, b=batch: obj.losses(p, b.X, b.y).sum())(obj.params)
        acc += obj.space.flatten(g)
    return acc


def _group_hvp(curv: Curvature, v: torch.Tensor, data: Data) -> torch.Tensor:
    """Σ_{z∈data} ∇²θL(z, θ̂) v for one vector v (p,) — ``Curvature.hvp_sum`` over U's
    points only."""
    acc = v.new_zeros(1, curv.p, dtype=curv.dtype)
    for batch in data.batches(curv.batch_size):
        acc += curv.hvp_sum(v.reshape(1, -1), batch)
    return acc[0]


def _third_directional(curv: Curvature, V: torch.Tensor) -> torch.Tensor:
    """(1/n) Σᵢ ∇³θL(zᵢ, θ̂)[vⱼ, vⱼ] for each row vⱼ of V (k, p) → (k, p), over all training points.

    The derivative of the HVP θ ↦ ∇²R(θ)vⱼ along vⱼ (forward over forward over reverse); the L2
    term and the damping have no third derivative.
    """
    obj = curv.objective
    acc = torch.zeros_like(V)
    tangents = obj.space.unflatten(V)
    for batch in curv.data.batches(curv.batch_size):

        def batch_loss(p, b=batch):
            return obj.losses(p, b.X, b.y).sum()

        def third(v):
            return jvp(lambda p: jvp(grad(batch_loss), (p,), (v,))[1], (curv.params,), (v,))[1]

        acc += obj.space.flatten(vmap(third)(tangents), batch_dims=1)
    return acc / curv.n


def _measure_quadratic(inf: Influence, test: Data, D: torch.Tensor) -> torch.Tensor:
    """dⱼᵀ ∇²θf(z_t, θ̂) dⱼ for every test point t and row dⱼ of D (k, p) → (n_test, k).

    Second directional derivatives of the per-point measurements (forward over forward): the
    model acts on each test point separately, so one batched call gives one value per point.
    """
    obj = inf.objective
    tangents = obj.space.unflatten(D)
    rows = []
    for batch in test.batches(inf.batch_size):

        def meas(p, b=batch):
            return obj.measurements(p, b.X, b.y)

        def second(v):
            return jvp(lambda p: jvp(meas, (p,), (v,))[1], (obj.params,), (v,))[1]

        rows.append(vmap(second)(tangents).T)  # (b, k)
    return torch.cat(rows)


def compute_group_influence(
    inf: Influence,
    test: Any,
    groups: Sequence[Any],
    *,
    order: int = 1,
    third_derivative: bool = False,
    measure_hessian: bool = True,
) -> GroupInfluence:
    """The computation behind ``Influence.group_influence``; see that method and this module."""
    check_is_fitted(inf, "data_")
    check_choice("group_influence", "order", order, (1, 2))
    for name, flag in (
        ("third_derivative", third_derivative),
        ("measure_hessian", measure_hessian),
    ):
        if not isinstance(flag, bool):
            raise InputError(
                f"The '{name}' parameter of group_influence must be a bool. Got {flag!r}."
            )
    t0 = time.perf_counter()
    data = inf.data_
    assert data is not None
    n, obj, curv = inf.n_train_, inf.objective, inf.curvature_
    positions = normalize_groups(groups, n)
    test_data = inf._test(test)
    k = len(positions)
    # G, Δθ⁽¹⁾ and, at order 2, its correction and Δθ⁽²⁾: each (k, p), plus the solver's copies
    inf._check_result_memory(
        6 * tensor_bytes((k, obj.p), inf._np_dtype()),
        f"the group influence of {k} groups on p = {obj.p} parameters (several (k, p) blocks)",
    )

    # g_U = (1/n) Σ_{z∈U} ∇L(z): one right-hand side per group
    chunk = inf._grad_chunk()
    G = (
        torch.stack(
            [
                _group_loss_grad(inf, data.subset(pos), chunk)
                for pos in progress(
                    positions, desc="group gradients", total=k, enabled=inf.progress
                )
            ]
        )
        / n
    )
    check_finite(G, "Σ_U ∇θL")
    sol1 = inf.inverse_hvp(G)  # Δθ⁽¹⁾ = H⁻¹ g_U, all groups in one block
    D = sol1.value.to(obj.dtype)
    sol2 = None
    if order == 2:
        cdata = curv.data
        corr = (
            torch.stack(
                [
                    _group_hvp(curv, D[j].to(curv.dtype), cdata.subset(pos))
                    for j, pos in enumerate(
                        progress(positions, desc="group HVPs", total=k, enabled=inf.progress)
                    )
                ]
            )
            / n
        )  # H_U Δθ⁽¹⁾
        if third_derivative:
            corr = corr - 0.5 * _third_directional(curv, D.to(curv.dtype))
        check_finite(corr, "The second-order right-hand side H_U Δθ⁽¹⁾")
        sol2 = inf.inverse_hvp(corr)
        D = D + sol2.value.to(obj.dtype)

    values = inf.test_grads(test_data).to(obj.dtype) @ D.T  # ∇fᵀΔθ, (n_test, k)
    if order == 2 and measure_hessian:
        values = values + 0.5 * _measure_quadratic(inf, test_data, D)
    check_finite(values, "The group influence")

    prov = inf._provenance(sol2 if sol2 is not None else sol1, t0).with_extras(
        order=order,
        n_groups=k,
        normalisation="removal at fixed n and l2: argmin (1/n)Σ_{i∉U} L(zᵢ,θ) + (l2/2)‖θ‖²",
        first_solve_residual_max=sol1.max_residual,
        first_solve_iterations=sol1.iterations,
    )
    if order == 2:
        prov = prov.with_extras(
            terms="Δθ⁽¹⁾ + H⁻¹H_UΔθ⁽¹⁾"
            + (
                " − ½H⁻¹∇³R[Δθ⁽¹⁾,Δθ⁽¹⁾]"
                if third_derivative
                else " (∇³R term dropped, as Basu et al. 2020)"
            ),
            third_derivative=third_derivative,
            measure_hessian=measure_hessian,
        )
    ids = data.ids.numpy()
    return GroupInfluence(
        values=values.detach().cpu().numpy(),
        param_change=D.detach().cpu().numpy(),
        group_sizes=np.array([len(p) for p in positions], dtype=np.int64),
        groups=tuple(ids[p] for p in positions),
        test_ids=test_data.ids.numpy(),
        n_train=n,
        order=order,
        provenance=prov,
    )
