"""``Provenance``: what a result records about the computation that produced it.

Every result of ``Influence`` (``InfluenceScores``, ``RemovalEffect``, ``GroupInfluence``,
``FastIFScores``, …) carries one. Its fields are named: the solver's settings and its
statistics, the damping and curvature, the measured residual and whether it was accepted,
timings, and ``extras`` for what only one kind of result records (FastIF's ``index_seconds``,
the removal estimate's description of Hᵢ, a group influence's ``order``, …).

A ``Provenance`` is also a read-only ``Mapping`` over a flat view of the same record, in which
the solver's statistics appear as ``solver_<name>`` keys and the extras at the top level:
``scores.provenance["residual_max"]`` and ``scores.provenance["solver_reason"]`` read it so.

``to_json`` / ``from_json`` write and read it as plain JSON (no pickle); ``from_json`` also reads
a flat mapping of the same keys (the ``Mapping`` view, e.g. a file's JSON of it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from ..errors import InputError

FORMAT = "upweight.provenance/1"  # the marker of the structured JSON form
SOLVER_PREFIX = "solver_"  # the flat view's prefix of the solver's statistics

# the fields that describe the solve itself: in the flat view only when a solve was recorded
_SOLVE_KEYS = (
    "residual_max",
    "iterations",
    "solve_seconds",
    "max_residual_accepted",
    "accuracy",
    "accepted",
)


@dataclass(frozen=True, eq=False)
class Provenance(Mapping[str, Any]):
    """What a result records about its computation; a read-only ``Mapping`` of its flat view.

    Attributes:
        solver: the solver's settings, ``InverseHVPSolver.config()`` (its ``name`` among them).
        damping: δ added to H.
        curvature: what H is, in words (``Curvature.describes``).
        l2: λ of the objective's L2 term.
        p: the number of parameters in θ.
        dtype: the dtype the computation ran in, e.g. ``"torch.float64"``.
        grad_norm: ‖∇R(θ̂)‖ at the fitted parameters.
        seconds: wall time of the call that produced the result (gradients, solve, scoring).
        structured_scoring: why the scores were computed per layer without per-sample gradients,
            or ``None`` where they were not.
        structured_hvp: why the HVPs were structured, or ``None`` where they were not.
        residual_max: the largest measured relative residual ‖(H+δI)x − v‖/‖v‖ of the solve;
            ``None`` where no solve is recorded.
        iterations: the solver's iterations.
        solve_seconds: wall time of the solve.
        max_residual_accepted: the bound the residual was checked against (``None``: no bound).
        accuracy: for an approximate solver, a note that its accuracy was not estimated, or the
            numbers of ``AccuracyEstimate.summary()`` once it was; ``None`` for an exact solver.
        accepted: whether the residual passed the bound; ``None`` where it was not checked (a
            one-shot solver that measured no residual).
        solver_stats: the solver's own statistics, ``Solution.stats`` (e.g. Auto's ``chosen`` and
            ``reason``, CG's preconditioner, Arnoldi's rank); ``solver_<name>`` in the flat view.
        extras: what this kind of result adds (e.g. FastIF's ``index_seconds``, a group
            influence's ``order``); top-level keys of the flat view.
    """

    solver: Mapping[str, Any] = field(default_factory=dict)
    damping: float | None = None
    curvature: str | None = None
    l2: float | None = None
    p: int | None = None
    dtype: str | None = None
    grad_norm: float | None = None
    seconds: float | None = None
    structured_scoring: str | None = None
    structured_hvp: str | None = None
    residual_max: float | None = None
    iterations: int | None = None
    solve_seconds: float | None = None
    max_residual_accepted: float | None = None
    accuracy: str | Mapping[str, Any] | None = None
    accepted: bool | None = None
    solver_stats: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", dict(self.solver))
        object.__setattr__(self, "solver_stats", dict(self.solver_stats))
        object.__setattr__(self, "extras", dict(self.extras))
        clash = sorted(k for k in self.extras if k in _NAMED or k.startswith(SOLVER_PREFIX))
        if clash:
            raise InputError(
                f"Provenance extras {clash} would hide a field of the record or a solver "
                "statistic in its flat view; set the field, or use solver_stats."
            )

    # ── the flat, read-only Mapping view ──────────────────────────────────────────────
    def _flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {"solver": self.solver} if self.solver else {}
        for name in _NAMED:
            value = getattr(self, name)
            if name in _SOLVE_KEYS:
                if self.residual_max is not None and (value is not None or name != "accuracy"):
                    flat[name] = value
            elif value is not None:
                flat[name] = value
        flat.update({SOLVER_PREFIX + k: v for k, v in self.solver_stats.items()})
        flat.update(self.extras)
        return flat

    def __getitem__(self, key: str) -> Any:
        return self._flat()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat())

    def __len__(self) -> int:
        return len(self._flat())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Provenance):
            return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))
        if isinstance(other, Mapping):
            return self._flat() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # holds mappings

    def __repr__(self) -> str:
        set_ = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) not in (None, {})
        )
        return f"Provenance({set_})"

    # ── building ──────────────────────────────────────────────────────────────────────
    def with_extras(self, **extras: Any) -> Provenance:
        """A copy with ``extras`` added (a result's own entries)."""
        return replace(self, extras={**self.extras, **extras})

    @classmethod
    def from_mapping(cls, flat: Mapping[str, Any]) -> Provenance:
        """The record of a flat mapping (the ``Mapping`` view, or a dict of those keys):
        ``solver_<name>`` keys become ``solver_stats``, unknown keys ``extras``."""
        if isinstance(flat, Provenance):
            return flat
        if not isinstance(flat, Mapping):
            raise InputError(f"A provenance must be a mapping; got {type(flat).__name__}.")
        named = {k: flat[k] for k in _NAMED if k in flat}
        stats = {
            k[len(SOLVER_PREFIX) :]: v
            for k, v in flat.items()
            if isinstance(k, str) and k.startswith(SOLVER_PREFIX)
        }
        extras = {
            str(k): v
            for k, v in flat.items()
            if k not in _NAMED and k != "solver" and not str(k).startswith(SOLVER_PREFIX)
        }
        solver = flat.get("solver", {})
        solver = solver if isinstance(solver, Mapping) else {"name": str(solver)}
        return cls(solver=solver, solver_stats=stats, extras=extras, **named)

    # ── JSON ──────────────────────────────────────────────────────────────────────────
    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready values: the fields by name, under a format marker."""
        return {"format": FORMAT, **{f.name: jsonable(getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Provenance:
        """The record written by ``to_json``, or one of a flat mapping (``from_mapping``)."""
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in obj.items() if k in known})
        return cls.from_mapping(obj)


def as_provenance(x: Mapping[str, Any] | None) -> Provenance:
    """``x`` as a ``Provenance``: itself, the JSON of ``to_json``, or a flat mapping (``None``:
    an empty record)."""
    return Provenance() if x is None else Provenance.from_json(x)


_NAMED = tuple(
    f.name for f in fields(Provenance) if f.name not in ("solver", "solver_stats", "extras")
)


def jsonable(x: Any) -> Any:
    """``x`` as JSON values: mappings with string keys, lists, numbers, strings, None; NumPy
    scalars as Python numbers; anything else as its ``str``."""
    if isinstance(x, Provenance):
        return x.to_json()
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


__all__ = ["Provenance", "as_provenance", "jsonable"]
