"""What results kept in a ``Store`` depend on, and the check a stored s_test passes before reuse.

A store's fingerprint (``Store.bind``) records θ̂ (a SHA-256 over the model's parameters and
buffers), the objective's settings, damping, the solver's configuration, digests of the training
and test data and of the selected training positions, and the switches that change the numbers
(structured scoring, ``query_rank``, the structured HVP, the curvature). A rerun is only resumed
from a folder whose fingerprint is equal, so these dicts must stay the same for the same
computation: folders written before are still accepted.

A stored s_test is not trusted on its checksum alone: ``verify_stored_s_test`` measures its
residual again and compares it with the recorded one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..core.curvature import Curvature
from ..core.data import Data
from ..core.digest import (
    digest_data,
    fn_name,
    model_sha256,
)  # noqa: F401
from ..core.objective import Objective
from ..solvers import InverseHVPSolver, Solution
from ..store import array_digest


def fingerprint(
    objective: Objective,
    quantity: str,
    positions: np.ndarray,
    test: Data | None,
    *,
    damping: float,
    solver: InverseHVPSolver,
    train_digest: dict[str, Any],
    scoring: str,
    query_rank: int | None,
    curvature: Curvature,
) -> dict[str, Any]:
    """What the stored results of ``quantity`` depend on: θ̂, the objective, damping, solver and
    data.

    ``train_digest`` is ``digest_data`` of the fitted training data (computed once per fit by the
    caller), ``positions`` the selected training points, ``test`` the test points (``None`` for a
    train-only quantity). ``scoring`` ("structured" or "generic") and ``query_rank`` enter the
    fingerprint of ``up_loss`` only; a structured HVP and a curvature other than the Hessian enter
    every fingerprint, since they change s_test.
    """
    fp: dict[str, Any] = {
        "quantity": quantity,
        "model": {
            "parameters_sha256": model_sha256(objective),
            "theta": list(objective.space.names),
            "dtype": str(objective.dtype),
        },
        "objective": {
            "loss": objective.loss_name,
            "measure": fn_name(objective.measure_fn),
            "l2": objective.l2,
            "l2_params": list(objective.l2_names),
        },
        "damping": damping,
        "solver": solver.config(),
        "train_data": train_digest,
        "train_selection": array_digest(positions)["sha256"],
    }
    if test is not None:
        fp["test_data"] = digest_data(test)
    if quantity == "up_loss" and scoring == "structured":
        fp["scoring"] = "structured"  # equal to the generic scores up to rounding, so kept apart
    if quantity == "up_loss" and query_rank is not None:
        # an approximation: never mixed with exact or other-rank chunks
        fp["query_rank"] = query_rank
    if curvature.uses_structured:
        fp["hvp"] = "structured"  # s_test equal to the generic one up to rounding, so kept apart
    if curvature.kind != "hessian":
        fp["curvature"] = curvature.kind
    return fp


# ── a stored s_test ────────────────────────────────────────────────────────────────────


def s_test_meta(sol: Solution) -> dict[str, Any]:
    """The metadata stored beside an s_test: what ``s_test_from_store`` and the re-verification
    read."""
    return {
        "residual": sol.residual.double().tolist(),
        "converged": sol.converged.tolist(),
        "measured": sol.measured_mask.tolist(),
        "iterations": sol.iterations,
        "seconds": sol.seconds,
        "stats": dict(sol.stats),
    }


def s_test_from_store(value: np.ndarray, meta: dict[str, Any]) -> Solution:
    """The ``Solution`` of a stored (and re-verified) s_test; its stats say it was resumed."""
    return Solution(
        value=torch.from_numpy(np.array(value)),
        residual=torch.tensor(meta["residual"], dtype=torch.float64),
        converged=torch.tensor(meta["converged"], dtype=torch.bool),
        iterations=int(meta["iterations"]),
        seconds=float(meta["seconds"]),
        stats={**meta.get("stats", {}), "resumed_from_store": True, "store_reverified": True},
        measured=torch.tensor(
            meta.get("measured", [not math.isnan(r) for r in meta["residual"]]), dtype=torch.bool
        ),
    )


def verify_stored_s_test(
    value: np.ndarray,
    meta: dict[str, Any],
    *,
    k: int,
    p: int,
    dtype: torch.dtype,
    remeasure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> str | None:
    """None when a stored s_test of ``k`` test points re-measures to its recorded residual, else the
    reason it does not.

    ``remeasure(cols, X)`` returns, in float64, the relative residual ‖(H+δI)x − ∇θf(z_test)‖/‖∇θf‖
    of the columns ``cols`` of s_test, whose values are the rows ``X`` (in ``dtype``). Only the
    columns the original solve measured are re-measured; each must agree with its recorded residual
    to a relative 1e-3 plus 100 machine epsilons of ``dtype``."""
    try:
        recorded = torch.tensor(meta["residual"], dtype=torch.float64).reshape(-1)
        measured = torch.tensor(
            meta.get("measured", [not math.isnan(r) for r in meta["residual"]]), dtype=torch.bool
        ).reshape(-1)
    except (KeyError, TypeError, ValueError) as exc:
        return f"its metadata is unreadable: {exc}"
    if value.shape != (k, p) or recorded.shape != (k,) or measured.shape != (k,):
        return f"shape {value.shape} for {k} test points and p = {p}"
    X = torch.from_numpy(np.array(value)).to(dtype)
    if not bool(torch.isfinite(X).all()):
        return "it holds NaN or inf"
    cols = measured.nonzero().reshape(-1)
    if not len(cols):
        return None  # the solve was unchecked (residual_sample=0): nothing to re-measure against
    again = remeasure(cols, X[cols])
    before = recorded[cols]
    tol = 1e-3 * before.abs() + 100 * torch.finfo(dtype).eps
    if not bool(torch.isfinite(again).all()) or bool(((again - before).abs() > tol).any()):
        worst = int((again - before).abs().argmax())
        return (
            f"test point {int(cols[worst])}: residual {float(again[worst]):.3e} now, "
            f"{float(before[worst]):.3e} recorded"
        )
    return None
