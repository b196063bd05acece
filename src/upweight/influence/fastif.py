"""FastIF pre-filtering (Guo et al. 2021, "FastIF: Scalable Influence Functions for Efficient
Model Interpretation and Debugging"): score only the k nearest training points of each test point.

Exhaustive scoring computes I_up,loss(z, z_test) = −∇θf(z_test)ᵀH⁻¹∇θL(z) for every training
point z. FastIF indexes the training points once by a representation, looks up the k nearest
candidates of each test point, and scores only those — with the same s_test = H⁻¹∇θf(z_test)
(solved once, by any solver) and the same per-sample gradients, so a candidate's score is exactly
its exhaustive score. What the pre-filter can get wrong is *which* points it scores: the
``recall`` of the exact top points.

Representations (``KNNPrefilter.representation``):

* ``"gradients"`` (default): rᵢ = Ω ∇θL(zᵢ, θ̂), the per-sample training gradient times a seeded
  Gaussian matrix Ω (p → ``projection_dim``, entries N(0, 1/m)), computed chunk by chunk so n × p
  is never held. With ``metric="inner_product"`` (the default here) the search is maximum
  inner-product search: the query q = Ω∇θf(z_test) (``query="gradient"``) gives
  −qᵀrᵢ ≈ −∇θf(z_test)ᵀ∇θL(zᵢ), the influence with H replaced by I (gradient similarity); with
  ``query="s_test"``, q = Ω s_test and −qᵀrᵢ ≈ I_up,loss itself, up to the projection's error
  (Johnson–Lindenstrauss: |error| ~ ‖s_test‖‖∇L‖/√m). ``direction="both"`` keeps the k largest
  |−qᵀrᵢ| (harmful and helpful together), ``"harmful"`` the k largest, ``"helpful"`` the k smallest.
* ``"features"``: the model's input to its last ``nn.Linear`` (registration order), captured with a
  forward hook — for a linear model, the input itself — or a user callable ``features(X) → (b, d)``;
  the query is the same features of the test point; cosine distance by default.

Koh & Liang (2017, §2.3) warn that influence is *not* nearest neighbours in input space: it weighs
each point by its training loss (through ∇θL) and by H⁻¹. Measured recall of the exact top-k
agrees (``bench/FASTIF.md``): the default (projected gradients, inner product, gradient query)
finds them far more often than pixel distances or cosine/Euclidean distances between gradients.

Neighbour search: scikit-learn's ``NearestNeighbors`` (brute force; maximum inner-product search by
the standard augmentation rᵢ ↦ [rᵢ, √(M² − ‖rᵢ‖²)], q ↦ [q, 0], M = maxᵢ‖rᵢ‖, under which the
Euclidean nearest neighbour is the largest inner product), or FAISS's exact flat indexes if FAISS
is installed (``backend="auto"`` prefers it). Both are optional dependencies, imported lazily.

Cost: the index is one sweep of per-sample gradients (or a forward pass for features) plus the
projection — about one to two exhaustive scoring sweeps, so it pays off when it is reused for many
test batches (pass the fitted ``FastIFIndex`` to ``fastif_up_loss``). Memory: n × m float32 keys,
plus an n × (m + 1) float64 copy for the scikit-learn inner-product search. The s_test solve is the
same as for exhaustive scoring; FastIF saves the scoring sweep over the non-candidates.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

from .._checks import check_choice, check_interval, check_is_fitted
from .._progress import logger, progress
from ..core.data import Data
from ..errors import InputError, NonFiniteError, ShapeError, UnsupportedModelError
from ..solvers import Solution
from .engine import Influence
from .provenance import Provenance, as_provenance
from .results import InfluenceScores, Ranking

Representation = Union[Literal["gradients", "features"], Callable[[torch.Tensor], Any]]

_REPRESENTATIONS = ("gradients", "features")
_METRICS = ("auto", "inner_product", "cosine", "euclidean")
_QUERIES = ("gradient", "s_test")
_DIRECTIONS = ("both", "harmful", "helpful")
_BACKENDS = ("auto", "sklearn", "faiss")


# ── configuration ──────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class KNNPrefilter:
    """A k-nearest-neighbour pre-filter of training points (FastIF, Guo et al. 2021).

    Args:
        k: candidates per test point; k ≥ n scores every training point (exhaustive).
        representation: ``"gradients"`` (projected per-sample training gradients), ``"features"``
            (the input to the model's last ``nn.Linear``), or a callable ``features(X) → (b, d)``
            applied to batches of inputs (training and test alike).
        projection_dim: m, the dimension of the seeded Gaussian projection of the gradients;
            ``None`` or m ≥ p keeps the gradients unprojected (exact inner products, n × p floats).
        metric: ``"inner_product"`` (maximum inner-product search), ``"cosine"`` or ``"euclidean"``;
            ``"auto"`` is inner_product for gradients and cosine for features.
        query: for gradients, what a test point is represented by: ``"gradient"`` (Ω∇θf(z_test);
            gradient similarity, needs no solve) or ``"s_test"`` (Ω H⁻¹∇θf(z_test); the influence up
            to the projection's error — which is large here: H⁻¹ inflates s_test along directions
            the training gradients barely span, so its recall is lower; ``bench/FASTIF.md``).
        direction: inner_product only — ``"both"`` (largest |approximate influence|), ``"harmful"``
            (largest) or ``"helpful"`` (most negative). Prefer ``"both"``: with ``query="gradient"``
            the sign is that of −∇fᵀ∇L, which H⁻¹ can flip (some of the most harmful points can be
            among the most *helpful* by gradient similarity), and with ``query="s_test"`` the
            projection is noisier; the one-sided searches find fewer of the most harmful points than
            the two-sided default (``bench/FASTIF.md``).
        seed: seed of the Gaussian projection.
        backend: ``"sklearn"`` (``NearestNeighbors``, brute force), ``"faiss"`` (exact flat index),
            or ``"auto"``: FAISS if it is installed, else scikit-learn.

    Examples:
        >>> KNNPrefilter(k=500).k
        500
    """

    k: int = 1000
    representation: Representation = "gradients"
    projection_dim: int | None = 256
    metric: Literal["auto", "inner_product", "cosine", "euclidean"] = "auto"
    query: Literal["gradient", "s_test"] = "gradient"
    direction: Literal["both", "harmful", "helpful"] = "both"
    seed: int = 0
    backend: Literal["auto", "sklearn", "faiss"] = "auto"

    def __post_init__(self) -> None:
        check_interval("KNNPrefilter", "k", self.k, 1, None, closed="left", integer=True)
        if not callable(self.representation):
            check_choice("KNNPrefilter", "representation", self.representation, _REPRESENTATIONS)
        if self.projection_dim is not None:
            check_interval(
                "KNNPrefilter",
                "projection_dim",
                self.projection_dim,
                1,
                None,
                closed="left",
                integer=True,
            )
        check_choice("KNNPrefilter", "metric", self.metric, _METRICS)
        check_choice("KNNPrefilter", "query", self.query, _QUERIES)
        check_choice("KNNPrefilter", "direction", self.direction, _DIRECTIONS)
        check_interval("KNNPrefilter", "seed", self.seed, 0, None, closed="left", integer=True)
        check_choice("KNNPrefilter", "backend", self.backend, _BACKENDS)
        if self.query == "s_test" and self.representation != "gradients":
            raise InputError(
                "query='s_test' needs representation='gradients' (s_test lives in parameter"
                f" space); got representation={self._representation_name()!r}."
            )
        if self.direction != "both" and self.resolved_metric != "inner_product":
            raise InputError(
                f"direction={self.direction!r} needs metric='inner_product' (a signed similarity); "
                f"the metric here is {self.resolved_metric!r}."
            )

    @property
    def resolved_metric(self) -> str:
        """The metric ``"auto"`` stands for: inner_product for gradients, cosine for features."""
        if self.metric != "auto":
            return self.metric
        return "inner_product" if self.representation == "gradients" else "cosine"

    def _representation_name(self) -> str:
        if callable(self.representation):
            return (
                "features (callable"
                f" {getattr(self.representation, '__name__', type(self.representation).__name__)})"
            )
        return str(self.representation)

    def describe(self) -> str:
        """A one-line description, e.g. for reports."""
        rep = self._representation_name()
        if self.representation == "gradients":
            rep += f" (projection_dim={self.projection_dim}, query={self.query})"
        extra = f", direction={self.direction}" if self.resolved_metric == "inner_product" else ""
        return f"kNN pre-filter k={self.k}: {rep}, metric={self.resolved_metric}{extra}"

    def fit(self, influence: Influence) -> FastIFIndex:
        """Build the representation of every training point of a fitted ``Influence`` and
        index it."""
        return FastIFIndex(self, influence)


# ── projection ─────────────────────────────────────────────────────────────────────────────
class GaussianProjection:
    """x ↦ xΩ with Ω of shape (p, m), entries i.i.d. N(0, 1/m), so E[(xΩ)·(yΩ)] = x·y.

    Ω is drawn in blocks of rows, each from its own generator seeded by (seed, block), so the
    same Ω results whether it is cached (when p·m values take ≤ ``max_cached_bytes``) or
    regenerated block by block for each chunk of gradients (for large p).
    """

    def __init__(
        self, p: int, m: int, seed: int, dtype: torch.dtype, max_cached_bytes: int = 2**28
    ) -> None:
        self.p, self.m, self.seed, self.dtype = p, m, seed, dtype
        self.rows_per_block = max(1, 2**22 // m)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._cache = self._full() if p * m * itemsize <= max_cached_bytes else None

    def _blocks(self):
        for j, r0 in enumerate(range(0, self.p, self.rows_per_block)):
            r1 = min(self.p, r0 + self.rows_per_block)
            state = np.random.SeedSequence([self.seed, j]).generate_state(2, dtype=np.uint32)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            yield (
                r0,
                r1,
                torch.randn((r1 - r0, self.m), generator=gen, dtype=self.dtype) / math.sqrt(self.m),
            )

    def _full(self) -> torch.Tensor:
        return torch.cat([b for _, _, b in self._blocks()])

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        if self._cache is not None:
            if self._cache.device != X.device:
                self._cache = self._cache.to(X.device)
            return X @ self._cache
        out = torch.zeros((X.shape[0], self.m), dtype=self.dtype, device=X.device)
        for r0, r1, block in self._blocks():
            out += X[:, r0:r1] @ block.to(X.device)
        return out


# ── the fitted index ───────────────────────────────────────────────────────────────────────
class FastIFIndex:
    """A ``KNNPrefilter`` fitted to an ``Influence``: the training representations and their index.

    Attributes:
        prefilter: the configuration.
        influence: the fitted ``Influence`` it belongs to.
        n_train: n.
        metric: the resolved metric.
        backend: ``"sklearn"``, ``"faiss"``, or ``"none"`` when k ≥ n (nothing is indexed: every
            training point is a candidate).
        keys: the training representations, float32 (n, d), or ``None`` when exhaustive.
        projection: the ``GaussianProjection`` of the gradients, or ``None``.
        index_seconds: wall time of building the representations and the index.
    """

    def __init__(self, prefilter: KNNPrefilter, influence: Influence) -> None:
        if not isinstance(prefilter, KNNPrefilter):
            raise InputError(f"prefilter must be a KNNPrefilter; got {type(prefilter).__name__}.")
        if not isinstance(influence, Influence):
            raise InputError(
                f"FastIF needs a fitted upweight.Influence; got {type(influence).__name__}."
            )
        check_is_fitted(influence, "data_")
        t0 = time.perf_counter()
        self.prefilter = prefilter
        self.influence = influence
        self._data = influence.data_
        self.n_train = influence.n_train_
        self.metric = prefilter.resolved_metric
        self.projection: GaussianProjection | None = None
        self.keys: np.ndarray | None = None
        self._index: Any = None
        self._features: Callable[[torch.Tensor], Any] | None = None
        if prefilter.k >= self.n_train:
            self.backend = "none"
        else:
            self.backend = _resolve_backend(prefilter.backend)
            self.keys = self._train_keys()
            self._index = self._build_index(self.keys)
        self.index_seconds = time.perf_counter() - t0
        logger.info(
            "FastIF index (%s, %s) over n=%d built in %.2fs",
            prefilter.describe(),
            self.backend,
            self.n_train,
            self.index_seconds,
        )

    def __repr__(self) -> str:
        dim = None if self.keys is None else self.keys.shape[1]
        return (
            f"FastIFIndex({self.prefilter.describe()}, backend={self.backend},"
            f" n_train={self.n_train}, dim={dim})"
        )

    @property
    def k(self) -> int:
        """Candidates per test point: min(k, n)."""
        return min(self.prefilter.k, self.n_train)

    @property
    def exhaustive(self) -> bool:
        """k ≥ n: every training point is a candidate of every test point."""
        return self.prefilter.k >= self.n_train

    def with_k(self, k: int) -> FastIFIndex:
        """The same index (representations and search structure shared) with another k.

        The candidates for k' ≤ k are the first k' of those for k (up to ties): every order used
        is by distance or by approximate influence.
        """
        pf = replace(self.prefilter, k=k)
        if k < self.n_train and self._index is None:
            raise InputError(
                f"This index was built with k={self.prefilter.k} ≥ n={self.n_train}, so nothing was"
                f" indexed; fit KNNPrefilter(k={k}, ...) instead."
            )
        new = copy.copy(self)
        new.prefilter = pf
        return new

    # ── representations ────────────────────────────────────────────────────────────────
    def _train_keys(self) -> np.ndarray:
        inf, pf = self.influence, self.prefilter
        data = self._data
        assert data is not None
        if pf.representation == "gradients":
            p = inf.objective.p
            m = pf.projection_dim
            if m is not None and m < p:
                self.projection = GaussianProjection(p, m, pf.seed, inf.objective.dtype)
            parts = [
                self._project(G)
                for _, G in inf._train_grad_chunks(data, "FastIF index: training gradients")
            ]
        else:
            self._features = (
                pf.representation
                if callable(pf.representation)
                else _last_linear_input(inf.objective)
            )
            bs = inf.batch_size
            batches = progress(
                data.batches(bs),
                desc="FastIF index: features",
                total=-(-len(data) // bs),
                enabled=inf.progress,
            )
            parts = [self._feature_rows(b.X) for b in batches]
        keys = np.concatenate(parts)
        if keys.shape[0] != self.n_train:
            raise ShapeError(
                f"The representation has {keys.shape[0]} rows for {self.n_train} training points."
            )
        if not np.isfinite(keys).all():
            raise NonFiniteError(
                f"The FastIF representation ({pf._representation_name()}) has non-finite values."
            )
        return keys

    def _project(self, G: torch.Tensor) -> np.ndarray:
        R = self.projection(G) if self.projection is not None else G
        return R.detach().to(torch.float32).cpu().numpy()

    def _feature_rows(self, X: torch.Tensor) -> np.ndarray:
        assert self._features is not None
        out = self._features(X)
        arr = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        if arr.ndim == 0 or arr.shape[0] != X.shape[0]:
            raise ShapeError(
                f"features(X) must return one row per input: X has {X.shape[0]} rows, features(X)"
                f" has shape {arr.shape}."
            )
        return arr.reshape(arr.shape[0], -1).astype(np.float32)

    def _queries(
        self, test: Data, test_grads: torch.Tensor | None, s_test: torch.Tensor | None
    ) -> np.ndarray:
        pf, inf = self.prefilter, self.influence
        if pf.representation != "gradients":
            return self._feature_rows(test.X).astype(np.float64)
        if pf.query == "s_test":
            V = s_test if s_test is not None else inf.s_test(test).value
        else:
            V = test_grads if test_grads is not None else inf.test_grads(test)
        if V.shape != (len(test), inf.objective.p):
            raise ShapeError(
                f"The {pf.query} rows have shape {tuple(V.shape)}; expected ({len(test)},"
                f" {inf.objective.p})."
            )
        return self._project(V).astype(np.float64)

    # ── search ─────────────────────────────────────────────────────────────────────────
    def _build_index(self, keys: np.ndarray) -> Any:
        d = keys.shape[1]
        if self.backend == "faiss":
            faiss = importlib.import_module("faiss")
            if self.metric == "euclidean":
                index = faiss.IndexFlatL2(d)
                index.add(np.ascontiguousarray(keys))
            else:
                index = faiss.IndexFlatIP(d)
                index.add(
                    np.ascontiguousarray(_unit_rows(keys) if self.metric == "cosine" else keys)
                )
            return index
        from sklearn.neighbors import NearestNeighbors

        if self.metric == "inner_product":
            # MIPS → Euclidean NN: ‖[q, 0] − [r, √(M² − ‖r‖²)]‖² = ‖q‖² + M² − 2qᵀr
            sq = (keys.astype(np.float64) ** 2).sum(1)
            extra = np.sqrt(np.maximum(sq.max() - sq, 0.0))
            return NearestNeighbors(algorithm="brute", metric="euclidean").fit(
                np.c_[keys.astype(np.float64), extra]
            )
        return NearestNeighbors(algorithm="brute", metric=self.metric).fit(keys)

    def _search(self, Q: np.ndarray, kk: int) -> np.ndarray:
        if self.backend == "faiss":
            q = _unit_rows(Q) if self.metric == "cosine" else Q
            return self._index.search(np.ascontiguousarray(q, dtype=np.float32), kk)[1].astype(
                np.int64
            )
        q = np.c_[Q, np.zeros(len(Q))] if self.metric == "inner_product" else Q
        return self._index.kneighbors(q, n_neighbors=kk, return_distance=False).astype(np.int64)

    def candidates(
        self,
        test: Any,
        *,
        test_grads: torch.Tensor | None = None,
        s_test: torch.Tensor | None = None,
    ) -> np.ndarray:
        """The k candidates of each test point: positions into the training data, shape (n_test,
        min(k, n)).

        Rows are duplicate-free. Order: nearest first (euclidean, cosine); for inner_product, by
        decreasing approximate |influence| (``"both"``), influence (``"harmful"``) or −influence
        (``"helpful"``). ``test_grads`` / ``s_test`` (n_test, p) may be passed to avoid recomputing
        them (``fastif_up_loss`` does).
        """
        self._check_current()
        test_data = test if isinstance(test, Data) else self.influence._test(test)
        m, n = len(test_data), self.n_train
        if self.exhaustive:
            return np.tile(np.arange(n, dtype=np.int64), (m, 1))
        Q = self._queries(test_data, test_grads, s_test)
        k = self.k
        if self.metric != "inner_product":
            return self._search(Q, k)
        # approximate influence −qᵀr: helpful = largest qᵀr, harmful = largest (−q)ᵀr
        if self.prefilter.direction == "helpful":
            return self._search(Q, k)
        if self.prefilter.direction == "harmful":
            return self._search(-Q, k)
        a, b = self._search(Q, k), self._search(-Q, k)
        assert self.keys is not None
        out = np.empty((m, k), dtype=np.int64)
        for i in range(m):
            u = np.union1d(a[i], b[i])
            approx = np.abs(self.keys[u].astype(np.float64) @ Q[i])
            out[i] = u[np.argsort(-approx, kind="stable")[:k]]
        return out

    def _check_current(self) -> None:
        if self.influence.data_ is not self._data:
            raise InputError(
                "The Influence was re-fitted after this FastIF index was built; fit the"
                " KNNPrefilter again."
            )


def _unit_rows(A: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return (A / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _resolve_backend(backend: str) -> str:
    def has(name: str) -> bool:
        try:
            importlib.import_module(name)
        except ImportError:
            return False
        return True

    if backend == "faiss" or (backend == "auto" and has("faiss")):
        if not has("faiss"):
            raise InputError(
                "backend='faiss' needs FAISS: install faiss-cpu (or faiss-gpu), or use"
                " backend='sklearn'."
            )
        return "faiss"
    if not has("sklearn"):
        raise InputError(
            "FastIF's default neighbour search needs scikit-learn: pip install 'upweight[sklearn]'"
            " (or install faiss-cpu)."
        )
    return "sklearn"


def _last_linear_input(objective: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """features(X): the input to the model's last ``nn.Linear`` (registration order), via a forward
    hook."""
    last = None
    for mod in objective.model.modules():
        if isinstance(mod, nn.Linear):
            last = mod
    if last is None:
        raise UnsupportedModelError(
            "representation='features' takes the input to the model's last nn.Linear, but the model"
            " has none. Pass representation=callable features(X) -> (b, d), or use"
            " representation='gradients'."
        )

    def features(X: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = last.register_forward_hook(
            lambda _m, inputs, _out: captured.append(inputs[0].detach())
        )
        try:
            with torch.no_grad():
                objective.outputs(objective.params, X)
        finally:
            handle.remove()
        if not captured:
            raise UnsupportedModelError(
                "The model's last nn.Linear was not called in its forward pass; pass a features"
                " callable."
            )
        return captured[-1].reshape(X.shape[0], -1)

    features.__name__ = "last_linear_input"
    return features


# ── scores ─────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class FastIFScores:
    """I_up,loss of each test point's k candidates, chosen by a kNN pre-filter (FastIF).

    Attributes:
        values: I_up,loss(z, z_test) of the candidates, shape (n_test, k); > 0 means harmful.
            Each equals the exhaustive score of that training point.
        train_positions: the candidates, positions into the fitted training data, (n_test, k).
        train_ids: their ids, (n_test, k).
        test_ids: ids of the test points, (n_test,).
        n_train: n.
        provenance: a ``Provenance``: solver, residuals; its ``extras`` hold the pre-filter and
            the timings: ``index_seconds`` (building the index; ``index_reused`` says whether it
            was built in an earlier call), ``s_test_seconds`` (test gradients + the s_test solve;
            ≈ 0 with ``s_test_reused``), ``candidate_seconds`` (neighbour search),
            ``scoring_seconds`` (gradients of the candidates dotted with s_test), ``n_scored``
            (distinct candidates).
    """

    values: np.ndarray
    train_positions: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    n_train: int
    kind: Literal["up_loss"] = "up_loss"
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:  # a mapping given by hand becomes the record it describes
        object.__setattr__(self, "provenance", as_provenance(self.provenance))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def top_k(self, k: int, *, test: int = 0, harmful: bool = True) -> Ranking:
        """The k most harmful (largest I_up,loss) or most helpful (most negative) candidates."""
        h = self.values[test]
        order = np.argsort(-h if harmful else h, kind="stable")[:k]
        return Ranking(
            self.train_ids[test, order],
            h[order],
            "I_up,loss (FastIF candidates)",
            f"{'harmful' if harmful else 'helpful'} for test id {int(self.test_ids[test])}",
        )

    def recall(
        self,
        exact: InfluenceScores,
        top: int = 10,
        *,
        by: Literal["abs", "harmful", "helpful"] = "abs",
    ) -> np.ndarray:
        """Per test point, the fraction of the exact top-``top`` training points among the
        candidates.

        ``exact`` holds exhaustive scores of the same test points over all n training points;
        ``by`` ranks them by |I_up,loss|, by I_up,loss (harmful) or by −I_up,loss (helpful).
        """
        check_choice("FastIFScores.recall", "by", by, ("abs", "harmful", "helpful"))
        check_interval("FastIFScores.recall", "top", top, 1, None, closed="left", integer=True)
        ex = exact.as_up_loss().values
        if ex.shape != (len(self.test_ids), self.n_train):
            raise ShapeError(
                f"exact scores have shape {ex.shape}; recall needs the same {len(self.test_ids)}"
                f" test points scored against all n = {self.n_train} training points."
            )
        key = {"abs": -np.abs(ex), "harmful": -ex, "helpful": ex}[by]
        best = np.argsort(key, axis=1, kind="stable")[:, :top]
        best_ids = np.asarray(exact.train_ids)[best]
        return np.array(
            [np.isin(best_ids[i], self.train_ids[i]).mean() for i in range(len(self.test_ids))]
        )


def fastif_up_loss(
    influence: Influence,
    test: Any,
    prefilter: KNNPrefilter | FastIFIndex | None = None,
    *,
    s_test: Solution | None = None,
) -> FastIFScores:
    """I_up,loss(z, z_test) for the k nearest candidates z of each test point (FastIF, Guo et al.
    2021).

    s_test = H⁻¹∇θf(z_test) is solved once for all test points by the ``Influence``'s solver;
    only the union of the candidates' per-sample gradients is computed. Each returned value is
    exactly the exhaustive ``influence.up_loss`` score of that training point.

    Args:
        influence: a fitted ``Influence``.
        test: test points ``(X, y)`` (or Dataset/DataLoader).
        prefilter: a ``KNNPrefilter`` (fitted here; default ``KNNPrefilter()``), or a
            ``FastIFIndex`` from ``KNNPrefilter.fit(influence)`` to reuse one index for many test
            batches.
        s_test: ``influence.s_test(test)`` if it was already solved for these test points (e.g. to
            try several pre-filters); by default it is solved here.

    Returns:
        ``FastIFScores`` of shape (n_test, min(k, n)).
    """
    t0 = time.perf_counter()
    if not isinstance(influence, Influence):
        raise InputError(
            f"influence must be a fitted upweight.Influence; got {type(influence).__name__}."
        )
    check_is_fitted(influence, "data_")
    if prefilter is None:
        prefilter = KNNPrefilter()
    if isinstance(prefilter, KNNPrefilter):
        index, reused = prefilter.fit(influence), False
    elif isinstance(prefilter, FastIFIndex):
        if prefilter.influence is not influence:
            raise InputError(
                "This FastIFIndex was fitted for another Influence; fit the KNNPrefilter on this"
                " one."
            )
        index, reused = prefilter, True
    else:
        raise InputError(
            f"prefilter must be a KNNPrefilter or a FastIFIndex; got {type(prefilter).__name__}."
        )
    index._check_current()

    t1 = time.perf_counter()
    test_data = influence._test(test)
    if s_test is None:
        Gt = influence.test_grads(test_data)
        sol = influence.inverse_hvp(Gt)  # s_test, one block solve for all test points
    else:
        if not isinstance(s_test, Solution):
            raise InputError(
                "s_test must be the Solution returned by influence.s_test(test); got"
                f" {type(s_test).__name__}."
            )
        if tuple(s_test.value.shape) != (len(test_data), influence.objective.p):
            raise ShapeError(
                f"s_test has shape {tuple(s_test.value.shape)} but there are {len(test_data)} test"
                f" points and p = {influence.objective.p} parameters."
            )
        # the test gradients are computed by the index if its query needs them
        sol, Gt = s_test, None
    S = sol.value
    t2 = time.perf_counter()
    cand = index.candidates(test_data, test_grads=Gt, s_test=S)
    t3 = time.perf_counter()
    union = np.unique(cand)
    data = influence._train(union)
    cols = [
        -(S.to(G.dtype) @ G.T)
        for _, G in influence._train_grad_chunks(data, "FastIF: I_up,loss over candidates")
    ]
    scores = torch.cat(cols, dim=1).detach().cpu().numpy()  # (n_test, |union|)
    values = np.take_along_axis(scores, np.searchsorted(union, cand), axis=1)
    t4 = time.perf_counter()

    prov = influence._provenance(sol, t0).with_extras(
        method="FastIF kNN pre-filter (Guo et al. 2021)",
        prefilter=index.prefilter.describe(),
        k=index.k,
        representation=index.prefilter._representation_name(),
        metric=index.metric,
        query=(
            index.prefilter.query if index.prefilter.representation == "gradients" else "features"
        ),
        direction=index.prefilter.direction if index.metric == "inner_product" else None,
        projection_dim=None if index.projection is None else index.projection.m,
        seed=index.prefilter.seed,
        backend=index.backend,
        index_seconds=index.index_seconds,
        index_reused=reused,
        s_test_seconds=t2 - t1,
        s_test_reused=s_test is not None,
        candidate_seconds=t3 - t2,
        scoring_seconds=t4 - t3,
        n_scored=len(union),
        n_train=influence.n_train_,
    )
    ids = influence.data_.ids.numpy()  # type: ignore[union-attr]
    return FastIFScores(
        values, cand, ids[cand], test_data.ids.numpy(), influence.n_train_, "up_loss", prov
    )


__all__ = ["FastIFIndex", "FastIFScores", "GaussianProjection", "KNNPrefilter", "fastif_up_loss"]
