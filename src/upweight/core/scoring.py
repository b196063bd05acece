"""Which train-side scoring ``Influence.up_loss`` uses, and what ``query_rank`` does per layer.

Structured scoring (``core.structured``) contracts each factorable layer's inputs and output
cotangents with s_test instead of forming per-sample gradients. Whether it is used follows from
``Influence(structured=…, query_rank=…)`` and from what ``scoring_plan`` finds in the model:
``resolve_scoring`` makes that choice once per fit and says why (the reason goes into provenance);
``check_query_rank`` refuses a ``query_rank`` that structured scoring cannot honour rather than
silently scoring exactly; ``query_rank_layers`` describes, per layer, what the rank does.

The messages name ``Influence``'s arguments, since that is where the choice is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UnsupportedModelError
from .data import Data
from .layers import LayerPlan
from .objective import Objective
from .structured import scoring_plan


@dataclass(frozen=True)
class ScoringChoice:
    """How the training points are scored: ``plan`` (the layer plan; ``None`` on the generic path),
    ``mode`` ("structured" or "generic") and ``reason``, the why recorded in provenance."""

    plan: LayerPlan | None
    mode: Literal["structured", "generic"]
    reason: str


def resolve_scoring(
    objective: Objective, data: Data, structured: bool | Literal["auto"], query_rank: int | None
) -> ScoringChoice:
    """The train-side scoring of ``up_loss`` for ``Influence(structured=…, query_rank=…)``.

    ``False``: generic. ``True``: structured wherever a layer is factorable (other parameters by
    per-sample gradients), ``UnsupportedModelError`` when the plan cannot be used. ``"auto"``:
    structured when every parameter of θ is in a factorable layer (or has module-local gradients),
    mixed as with ``True`` when ``query_rank`` is set (the low-rank scoring needs structured
    scoring), else generic.
    """
    if structured is False:
        return ScoringChoice(None, "generic", "structured=False")
    try:
        plan, why = scoring_plan(objective, data)
    except Exception as exc:  # noqa: BLE001 — "auto" keeps the generic path; True reports why below
        plan, why = None, f"{type(exc).__name__}: {exc}"
    if structured is True:
        if plan is None or why is not None:
            raise UnsupportedModelError(
                f"Influence(structured=True): structured scoring cannot be used: {why}. Use"
                " structured='auto' or False."
            )
        return ScoringChoice(
            plan,
            "structured",
            "structured=True"
            + (f"; per-sample gradients for {list(plan.other)}" if plan.other else ""),
        )
    if plan is None or why is not None:
        return ScoringChoice(None, "generic", str(why))
    if plan.other:
        if query_rank is not None:  # the low-rank scoring is asked for: mix, as structured=True
            return ScoringChoice(
                plan,
                "structured",
                f"query_rank={query_rank} with structured='auto': factorable layers "
                f"structured, per-sample gradients for {list(plan.other)}",
            )
        return ScoringChoice(
            None,
            "generic",
            f"parameters outside factorable layers: {list(plan.other)} (structured=True would mix)",
        )
    why = "every parameter of θ is in a factorable nn.Linear / nn.Conv2d / nn.Embedding"
    if plan.local:
        why += (
            f" or has module-local per-point gradients ({', '.join(lm.name for lm in plan.local)})"
        )
    return ScoringChoice(plan, "structured", why)


def check_query_rank(
    query_rank: int | None, choice: ScoringChoice, structured: bool | Literal["auto"]
) -> int | None:
    """``query_rank`` itself; ``UnsupportedModelError`` when it is set but structured scoring,
    which it needs, does not apply (``choice`` from ``resolve_scoring``)."""
    r = query_rank
    if r is not None and choice.mode != "structured":
        fix = (
            "Use structured='auto' (or True) with query_rank, or query_rank=None for exact scoring"
            if structured is False
            else "Use query_rank=None (exact scoring)"
        )
        raise UnsupportedModelError(
            f"Influence(query_rank={r}) approximates the layer blocks of s_test in the structured"
            f" train-side scoring, which cannot be used here: {choice.reason}. {fix}."
        )
    return r


def query_rank_layers(plan: LayerPlan, rank: int) -> tuple[str, ...]:
    """Per layer of ``plan``, whether rank ``rank`` truncates its query blocks or leaves
    them exact."""
    rows = []
    for blk in plan.blocks:
        full = min(blk.out_dim, blk.cols)
        what = (
            f"rank {rank} of {full} (truncated SVD)"
            if rank < full
            else f"exact (query_rank {rank} ≥ min(out, cols) = {full})"
        )
        rows.append(f"{blk.name or '<model>'} ({blk.kind} {blk.out_dim}×{blk.cols}): {what}")
    rows += [f"{lm.name} (module-local, {lm.size} parameters): exact" for lm in plan.local]
    if plan.other:
        rows.append(f"{list(plan.other)}: exact (per-sample gradients, no factorable layer)")
    return tuple(rows)
