"""Result objects that carry their meaning: values, ids, sign convention and provenance.

Sign convention (Koh & Liang 2017): I_up,loss(z, z_test) > 0 means upweighting z raises the
test loss — z is *harmful*; < 0 means z is *helpful*. Removing z changes the test loss by
about −I_up,loss / n (the *removal effect*): a helpful point's removal raises the test loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._checks import check_interval
from ..errors import InputError
from ..store import atomic_write
from .provenance import Provenance, as_provenance, jsonable


@dataclass(frozen=True)
class Ranking:
    """The top training points for one test point: ids, scores and what the scores are."""

    train_ids: np.ndarray
    values: np.ndarray
    kind: str
    label: str

    def __len__(self) -> int:
        return len(self.train_ids)

    def __str__(self) -> str:
        rows = [f"{self.label} — {self.kind}", f"{'rank':>4}  {'train id':>8}  {'score':>12}"]
        rows += [
            f"{r:>4}  {int(i):>8}  {v:>12.4e}"
            for r, (i, v) in enumerate(zip(self.train_ids, self.values), 1)
        ]
        return "\n".join(rows)


@dataclass(frozen=True)
class InfluenceScores:
    """Influence of training points on test measurements, shape (n_test, n_train).

    Attributes:
        values: I_up,loss(z_train, z_test) (``kind="up_loss"``), or the predicted change of the test
            measurement when z_train is removed, −I_up,loss / n (``kind="removal_effect"``).
        test_ids, train_ids: ids of the rows and columns.
        n_train: n, the size of the training set the model was fitted on.
        provenance: a ``Provenance``: solver settings and statistics, damping, residual,
            timings, dtype (also a read-only mapping of the flat keys, e.g. ``["residual_max"]``).
    """

    values: np.ndarray
    test_ids: np.ndarray
    train_ids: np.ndarray
    n_train: int
    kind: Literal["up_loss", "removal_effect"] = "up_loss"
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def to_numpy(self) -> np.ndarray:
        return self.values

    def as_removal_effect(self) -> InfluenceScores:
        """Predicted Δ test measurement if each training point is removed: −I_up,loss / n."""
        if self.kind == "removal_effect":
            return self
        return replace(self, values=-self.values / self.n_train, kind="removal_effect")

    def as_up_loss(self) -> InfluenceScores:
        if self.kind == "up_loss":
            return self
        return replace(self, values=-self.values * self.n_train, kind="up_loss")

    def harmfulness(self, test: int = 0) -> np.ndarray:
        """I_up,loss of every training point on test row ``test`` (> 0: harmful)."""
        return self.as_up_loss().values[_row(test, len(self.test_ids))]

    def top_k(self, k: int, *, test: int = 0, harmful: bool = True) -> Ranking:
        """The k most harmful (largest I_up,loss) or most helpful (most negative) training
        points."""
        check_interval("top_k", "k", k, 0, None, closed="left", integer=True)
        test = _row(test, len(self.test_ids))
        h = self.harmfulness(test)
        order = np.argsort(-h if harmful else h, kind="stable")[:k]
        vals = self.values[test, order]
        what = "I_up,loss" if self.kind == "up_loss" else "removal effect (Δ test loss)"
        return Ranking(
            self.train_ids[order],
            vals,
            what,
            f"{'harmful' if harmful else 'helpful'} for test id {int(self.test_ids[test])}",
        )

    def save(self, path: str | Path) -> None:
        """Write values, ids and provenance to a ``.npz`` file, atomically (no partial file on
        failure)."""
        meta = json.dumps(
            {"n_train": self.n_train, "kind": self.kind, "provenance": jsonable(self.provenance)}
        )
        atomic_write(
            Path(path),
            lambda fh: np.savez_compressed(
                fh,
                values=np.asarray(self.values),
                test_ids=self.test_ids,
                train_ids=self.train_ids,
                meta=np.array(meta),
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> InfluenceScores:
        """Read a file written by ``save`` (never unpickles: object arrays are refused); its
        provenance comes back as the ``Provenance`` that was saved (a file whose provenance was
        saved as a flat mapping is read into one, ``Provenance.from_mapping``)."""
        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError as exc:
            raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
        if head[:2] != b"PK":  # every .npz is a zip archive
            raise InputError(
                f"{path} is not a file written by InfluenceScores.save: it is not an .npz archive "
                f"(it starts with {head!r})."
            )
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                prov = Provenance.from_json(meta["provenance"])
                return cls(
                    f["values"],
                    f["test_ids"],
                    f["train_ids"],
                    int(meta["n_train"]),
                    meta["kind"],
                    prov,
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{path} is not a file written by InfluenceScores.save ({type(exc).__name__}:"
                f" {exc})."
            ) from exc


@dataclass(frozen=True)
class PertScores:
    """I_pert,loss(z_train, z_test) = −∇θf(z_test)ᵀ H⁻¹ ∇x∇θL(z_train) — Koh & Liang (2017) Eq. 5.

    ``values`` has shape (n_test, n_train, *x_shape): moving x_train by a small δ changes the test
    measurement by about (1/n)·values·δ.
    """

    values: np.ndarray
    test_ids: np.ndarray
    train_ids: np.ndarray
    n_train: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))


@dataclass(frozen=True)
class ParamInfluence:
    """I_up,params(z) = −H⁻¹∇θL(z, θ̂) — Koh & Liang (2017) Eq. 1; ``values`` (n_selected, p).

    Removing z moves θ̂ by about −values / n.
    """

    values: np.ndarray
    train_ids: np.ndarray
    n_train: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))


@dataclass(frozen=True)
class SelfInfluence:
    """I_up,loss(z, z) = −∇θL(z)ᵀH⁻¹∇θL(z) for each training point; ``values`` (n_selected,).

    Non-positive for a positive-definite H. Points with the largest magnitude are those the
    model bends most to fit — the first to check for wrong labels (Koh & Liang 2017, §5.4).
    """

    values: np.ndarray
    train_ids: np.ndarray
    n_train: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))

    def top_k(self, k: int) -> Ranking:
        check_interval("top_k", "k", k, 0, None, closed="left", integer=True)
        order = np.argsort(-np.abs(self.values), kind="stable")[:k]
        return Ranking(
            self.train_ids[order], self.values[order], "I_up,loss(z, z)", "largest self-influence"
        )


def _row(test: Any, n_test: int) -> int:
    """A test row index in [−n_test, n_test), as an int, or ``InputError``."""
    if (
        isinstance(test, bool)
        or not isinstance(test, (int, np.integer))
        or not -n_test <= int(test) < n_test
    ):
        raise InputError(
            f"test={test!r} is not a row of these scores: they hold {n_test} test point(s), rows"
            f" 0..{n_test - 1}."
        )
    return int(test)
