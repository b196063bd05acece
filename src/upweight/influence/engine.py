"""``Influence``: the Koh & Liang (2017) quantities for a fitted ``Objective``.

    I_up,params(z)         = −H⁻¹ ∇θL(z, θ̂)                         (Eq. 1)
    I_up,loss(z, z_test)   = −∇θf(z_test, θ̂)ᵀ H⁻¹ ∇θL(z, θ̂)         (Eq. 2; f = the loss by
    default) removal effect         ≈ −I_up,loss / n                          (removing z is ε =
    −1/n) I_pert,loss(z, z_test) = −∇θf(z_test, θ̂)ᵀ H⁻¹ ∇x∇θL(z, θ̂)       (Eq. 5)

with H = ∇²R(θ̂) + δI. The test gradients are solved as one block (the paper's s_test), and the
training gradients are streamed in chunks: n × p is never held.

Scale-out and resumption (DESIGN §1.4–1.6): the train-side sweeps of ``up_loss`` and
``self_influence`` are maps over chunks of training-point indices run by an ``Executor``
(in-process by default, ``upweight.distributed.DaskExecutor`` on a cluster), and with a
``Store`` every finished chunk (and the s_test solve) is written to disk, so a rerun of the same
call computes only what is missing and returns bit-for-bit the same scores.

Structured scoring (``Influence(structured=…)``, ``core.structured``): for ``nn.Linear`` /
``nn.Conv2d`` layers the train-side dot products s_testᵀ∇θL(zᵢ) are contracted from each layer's
inputs and output cotangents, never forming the per-sample gradients. ``Influence(query_rank=r)``
contracts with the best rank-r approximation of each layer's block of s_test instead (an
approximation of Eq. 2 for wide layers and many test points; see ``Influence``).

``Influence`` holds the estimator and the paper's quantities; the machinery around them lives
beside it: ``influence.tasks`` (the executor tasks and the chunked sweep), ``influence.fingerprint``
(what stored results depend on, and the re-verification of a stored s_test),
``influence.selection`` (``train=``) and ``core.scoring`` (which train-side scoring is used).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch

from .._checks import check_choice, check_finite, check_interval, check_is_fitted, check_rows_finite
from .._executor import Executor, resolve
from .._memory import check_memory, tensor_bytes
from .._progress import logger, progress, progress_enabled
from .._threads import intra_op_threads
from ..core.curvature import Curvature
from ..core.data import Data
from ..core.grads import grad_chunk_size, iter_per_sample_grads, pert_directions, risk_grad
from ..core.objective import Objective
from ..core.scoring import check_query_rank, query_rank_layers, resolve_scoring
from ..core.structured import prepare_queries, structured_per_sample_grads
from ..errors import (
    InaccurateSolveError,
    InaccurateSolveWarning,
    InputError,
    NonFiniteError,
    NotAtMinimumWarning,
    ShapeError,
)
from ..solvers import CG, KFAC, InverseHVPSolver, Solution
from ..solvers.base import relative_residual
from ..store import ChunkedArray, Store, opened_store
from .accuracy import AccuracyEstimate, estimate_accuracy
from .fingerprint import (
    digest_data,
    fingerprint,
    s_test_from_store,
    s_test_meta,
    verify_stored_s_test,
)
from .group import GroupInfluence, compute_group_influence
from .provenance import Provenance
from .removal import RemovalEffect, newton_removal_effect
from .results import InfluenceScores, ParamInfluence, PertScores, SelfInfluence
from .selection import TrainSelection, selection_positions
from .tasks import (
    TRAIN_FIX,
    _GradContext,
    _self_influence_chunk,
    _SolveContext,
    _StructuredContext,
    _up_loss_chunk,
    sweep,
)

StoreLike = Any  # None, a folder path, or a Store


def _sized_threads(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a fitted ``Influence``'s method under ``upweight._threads.intra_op_threads`` for its
    size, p parameters × n training points (one intra-op thread for a small problem on a busy
    machine)."""

    @functools.wraps(method)
    def run(self: Influence, *args: Any, **kwargs: Any) -> Any:
        n = getattr(self, "n_train_", None)
        with intra_op_threads(None if n is None else self.objective.p * n):
            return method(self, *args, **kwargs)

    return run


class Influence:
    """Influence functions for a model at θ̂ — a scikit-learn-style estimator.

    Args:
        objective: model, per-sample loss, L2 term and test measurement.
        solver: inverse-HVP solver (``Direct()``, ``CG()``, ``CG(preconditioner=KFAC())``,
            ``LiSSA()``, ``Arnoldi(rank)``, ``KFAC()``, ``EKFAC()``, ``Nystrom(rank)``,
            ``DataInf()``, ``Auto()``); default ``CG()``.
        damping: δ ≥ 0 added to H (Koh & Liang 2017, §4.2); needed when H is not positive definite.
        curvature: "hessian" (default; the paper's H = ∇²R(θ̂)) or "gauss-newton": H replaced by the
            generalised Gauss–Newton matrix G = (1/n) Σᵢ Jᵢᵀ∇²_zL(zᵢ)Jᵢ + l2·I (``core.curvature``),
            positive semi-definite for losses convex in the model output, so whole-network influence
            of a non-convex net is well posed; equal to H where the output is linear in θ. Its
            products need no second derivative of the model. K-FAC/EK-FAC approximate G either way.
            Recorded in provenance (``curvature``) and store fingerprints.
        batch_size: points per vectorised chunk for HVPs and per-sample gradients (gradient chunks
            are further capped so one holds at most ``core.batching.TENSOR_BYTES`` = 16 MiB, K-FAC's
            captured layer blocks likewise, generic HVP batches so that their autograd graph stays
            within ``core.curvature.HVP_GRAPH_BYTES``: ``Curvature.hvp_batch_size``; see
            ``core.batching``).
        max_residual: largest accepted relative residual ‖(H+δI)x − v‖/‖v‖ of a solve; "auto" takes
            the solver's ``default_max_residual`` (Direct 1e-4, CG 0.05, LiSSA 0.5, Arnoldi 1.0 — a
            low-rank projection's residual is the dropped fraction of v; KFAC/EKFAC, Nystrom,
            DataInf 10 — approximations of other matrices); ``None`` accepts any.
        on_inaccurate: "raise" an ``InaccurateSolveError`` (default) or "warn" and record it.
        grad_tol: ‖∇R(θ̂)‖ above which ``fit`` warns that θ̂ is not a minimum (``math.inf``: never).
        progress: show progress bars on long sweeps.
        structured: how ``up_loss`` scores the training points and how H is multiplied.
            "auto" (default): structured scoring (each ``nn.Linear`` / ``nn.Conv2d`` layer's
            sᵀ∇L(zᵢ) = Σₜ bᵢₜᵀ Q ãᵢₜ from its inputs and output cotangents, no per-sample gradient
            matrix) when every parameter of θ is in such a layer, and the exact structured HVP
            when θ is one output ``nn.Linear`` (``Curvature``); otherwise today's paths.
            ``True``: structured scoring wherever a layer is factorable (the other parameters of θ
            keep per-sample gradients, summed in), ``UnsupportedModelError`` when none is.
            ``False``: per-sample gradients and generic (autograd) HVPs throughout.
            The structured HVP runs in-process even when an executor is given.
        query_rank: ``None`` (default): exact scoring. An int r ≥ 1: ``up_loss`` (and
            ``removal_effect``) score each factorable layer with its block of s_test — the
            (out, cols) matrix Q of each test point's s_test on that layer's [W | bias] —
            replaced by its best rank-r approximation Σ_{ρ≤r} σ_ρ u_ρ v_ρᵀ (truncated SVD; the
            closest rank-r matrix in Frobenius and spectral norm, Eckart–Young), so the layer's
            term of s_testᵀ∇θL(zᵢ) is Σₜ Σ_ρ σ_ρ(bᵢₜᵀu_ρ)(v_ρᵀãᵢₜ). A layer with
            min(out, cols) ≤ r is scored exactly, and so are parameters in no factorable layer.
            It pays for wide layers and many test points: per chunk of b training points with
            T locations and k test points it costs b·T·k·r·(out + cols) multiply-adds instead
            of b·T·k·out·cols (the SVD of each query block is computed once per call,
            ``core.structured.factor_queries``). It needs structured scoring: with
            ``structured="auto"`` and parameters outside factorable layers it switches the mixed
            structured scoring on (as ``structured=True``); where structured scoring cannot be used
            (``structured=False``, no factorable layer, a factorisation that fails the probe check)
            ``fit`` raises ``UnsupportedModelError`` rather than silently scoring exactly.
            ``self_influence``
            ignores it: there each training point is its own query (its solved gradient
            H⁻¹∇θL(zᵢ)), so there is no query block shared across the training points to
            factor once, and it never uses structured scoring. Recorded in the provenance of
            ``up_loss`` (``query_rank``, ``query_rank_layers``) and in a store's fingerprint.

    Examples:
        >>> import torch
        >>> from upweight import Objective, Direct
        >>> X = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64); y = X * 2
        >>> model = torch.nn.Linear(1, 1, bias=False).double().eval()
        >>> # argmin of R: (14/3)(w − 2) + 0.1·w = 0
        >>> with torch.no_grad(): _ = model.weight.fill_(28 / 14.3)
        >>> inf = Influence(Objective(model, "squared", l2=0.1), solver=Direct()).fit((X, y))
        >>> inf.up_loss((X[:1], y[:1])).values.shape
        (1, 3)
    """

    def __init__(
        self,
        objective: Objective,
        *,
        solver: InverseHVPSolver | None = None,
        damping: float = 0.0,
        batch_size: int = 2048,
        max_residual: float | Literal["auto"] | None = "auto",
        on_inaccurate: Literal["raise", "warn"] = "raise",
        grad_tol: float = 1e-3,
        progress: bool = True,
        structured: bool | Literal["auto"] = "auto",
        query_rank: int | None = None,
        curvature: Literal["hessian", "gauss-newton"] = "hessian",
    ) -> None:
        self.objective = objective
        self.solver = solver if solver is not None else CG()
        self.damping = damping
        self.batch_size = batch_size
        self.max_residual = max_residual
        self.on_inaccurate = on_inaccurate
        self.grad_tol = grad_tol
        self.progress = progress
        self.structured = structured
        self.query_rank = query_rank
        self.curvature = curvature
        self.data_: Data | None = None
        self._shared: dict[tuple[int, str], tuple[Executor, Any]] = {}

    # ── fitting ───────────────────────────────────────────────────────────────────────
    def fit(
        self, train: Any, *, executor: Executor | None = None, store: StoreLike = None
    ) -> Influence:
        """Validate the training data, build H + δI and prepare the solver (factorise, …).

        Args:
            train: training points ``(X, y)`` (or Dataset/DataLoader).
            executor: runs the full-data Hessian-vector products (a sum over the training points)
                as a map-reduce over partitions, e.g. ``upweight.distributed.DaskExecutor``; it is
                also the default executor of the later ``up_loss`` / ``self_influence`` calls.
                ``None``: in-process.
            store: ``KFAC`` / ``EKFAC`` only — a folder (or ``Store``) that keeps the solver's
                factors (A, S, their eigendecompositions, EK-FAC's Λ, the module-local blocks;
                float64 ``.npy`` files and a JSON manifest). A later fit of the same model, data,
                loss, curvature kind and factor settings reads them back instead of passing over the
                data, and gets bit-for-bit the same solver state; ``damping``, l2 and the solver's
                own ``damping`` may differ (they enter after the factors). A store of another
                computation raises ``StoreMismatchError`` naming what differs
                (``KFAC.factor_fingerprint``). Give it a folder of its own: a folder holds one
                computation, and ``up_loss(store=…)`` keeps scores under another fingerprint.
                ``stats["factors_from_store"]`` of every solve says whether the factors were read.
                Any other solver with a store raises ``InputError``.

        Sets ``data_``, ``n_train_``, ``curvature_``, ``state_``, ``grad_norm_``, ``executor_``.
        """
        if not isinstance(self.objective, Objective):
            raise InputError(
                f"objective must be an upweight.Objective; got {type(self.objective).__name__}."
            )
        if not isinstance(self.solver, InverseHVPSolver):
            raise InputError(
                "solver must be an upweight solver (Auto, Direct, CG, LiSSA, Arnoldi, KFAC, EKFAC,"
                f" Nystrom, DataInf); got {type(self.solver).__name__}."
            )
        check_interval("Influence", "damping", self.damping, 0.0, None, closed="left")
        check_interval(
            "Influence", "batch_size", self.batch_size, 1, None, closed="left", integer=True
        )
        if self.grad_tol != math.inf:  # inf: never warn
            check_interval("Influence", "grad_tol", self.grad_tol, 0.0, None)
        if self.max_residual not in (None, "auto"):
            check_interval("Influence", "max_residual", self.max_residual, 0.0, None)
        check_choice("Influence", "on_inaccurate", self.on_inaccurate, ("raise", "warn"))
        if not (self.structured is True or self.structured is False or self.structured == "auto"):
            raise InputError(
                "The 'structured' parameter of Influence must be 'auto', True or False. Got"
                f" {self.structured!r}."
            )
        if self.query_rank is not None:
            check_interval(
                "Influence", "query_rank", self.query_rank, 1, None, closed="left", integer=True
            )
        check_choice("Influence", "curvature", self.curvature, ("hessian", "gauss-newton"))
        if executor is not None:
            executor = resolve(executor)
        if store is not None:
            self._check_factor_store(store)

        data = Data.from_any(train, what="training data").to(self.objective.dtype)
        # one thread for a small problem (upweight._threads)
        with intra_op_threads(self.objective.p * len(data)):
            return self._fit(data, executor, store)

    def _fit(self, data: Data, executor: Executor | None, store: StoreLike) -> Influence:
        self.objective.check_data(data, what="training")  # also refuses a model in training mode
        t0 = time.perf_counter()
        g = risk_grad(
            self.objective, self.objective.params, data, self.batch_size, progress=self.progress
        )
        self.grad_norm_ = float(g.norm())
        if not math.isfinite(self.grad_norm_):  # name the training points that make it so
            for batch, G in self._train_grad_chunks(data, "locating non-finite gradients"):
                check_rows_finite(
                    G.norm(dim=1),
                    batch.ids,
                    "The norm of the training-loss gradient ∇θL(z, θ̂)",
                    TRAIN_FIX,
                )
            check_finite(g, "∇R(θ̂)", "Check the model and loss for overflow at θ̂.")
            raise NonFiniteError(
                f"‖∇R(θ̂)‖ overflows in {self.objective.dtype}. Check the model and loss for"
                " overflow at θ̂, or evaluate it in float64 (model.double())."
            )
        if self.grad_norm_ > self.grad_tol:
            warnings.warn(
                f"‖∇R(θ̂)‖ = {self.grad_norm_:.2e} > grad_tol={self.grad_tol:g}: θ̂ is not a"
                " minimum of the regularised training risk, which influence functions assume."
                " Train to convergence, or add damping (Koh & Liang 2017, §4.2) and read the"
                " scores as approximate.",
                NotAtMinimumWarning,
                stacklevel=2,
            )
        choice = resolve_scoring(self.objective, data, self.structured, self.query_rank)
        self._scoring_plan, self.scoring_, self.scoring_reason_ = (
            choice.plan,
            choice.mode,
            choice.reason,
        )
        self._query_rank = check_query_rank(self.query_rank, choice, self.structured)
        self.curvature_ = Curvature(
            self.objective,
            data,
            damping=self.damping,
            batch_size=self.batch_size,
            executor=executor,
            structured=False if self.structured is False else "auto",
            kind=self.curvature,
        )
        with progress_enabled(self.progress), opened_store(store) as st:
            if st is None:
                self.state_ = self.solver.prepare(self.curvature_)
            else:
                assert isinstance(self.solver, KFAC)  # _check_factor_store
                self.state_ = self.solver.prepare(self.curvature_, store=st)
        self.executor_ = executor
        self._shared = {}
        self._train_digest: dict[str, Any] | None = None
        self.data_ = data
        self.n_train_ = len(data)
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info(
            "fitted %s on n=%d, p=%d in %.2fs",
            type(self.solver).__name__,
            self.n_train_,
            self.objective.p,
            self.fit_seconds_,
        )
        return self

    def _check_factor_store(self, store: StoreLike) -> None:
        """Refuse ``fit(store=…)`` for a solver with no factors to keep, or a store that is neither
        a folder path nor a ``Store`` — before any pass over the data."""
        if not isinstance(store, (str, os.PathLike, Store)):
            raise InputError(
                f"store must be a folder path or an upweight.Store; got {type(store).__name__}."
            )
        if not isinstance(self.solver, KFAC):
            raise InputError(
                f"fit(store=...) keeps the factors of KFAC / EKFAC; {type(self.solver).__name__}"
                " has none to keep (nor does CG(preconditioner=KFAC()) yet). Use solver=KFAC() or"
                " EKFAC(), or drop store= from fit and pass it to up_loss / self_influence, which"
                " keep their scores."
            )

    # ── building blocks ───────────────────────────────────────────────────────────────
    def _ready(self) -> None:
        """Fitted, and the model still in eval mode (a model switched back to ``.train()`` after
        ``fit`` would give random or buffer-updating outputs)."""
        check_is_fitted(self, "data_")
        self.objective.check_eval_mode()

    def _train(self, train: TrainSelection) -> Data:
        positions = self._positions(train)
        assert self.data_ is not None
        return self.data_ if train is None else self.data_.subset(positions)

    def _test(self, test: Any) -> Data:
        self._ready()
        assert self.data_ is not None
        data = Data.from_any(test, what="test data").to(self.objective.dtype)
        # keyword inputs: the same names (sequence lengths may differ)
        if data.is_dict or self.data_.is_dict:
            if not (data.is_dict and self.data_.is_dict) or sorted(data.X) != sorted(self.data_.X):
                raise ShapeError(
                    f"Test inputs {data.input_shapes} do not match the training inputs"
                    f" {self.data_.input_shapes}: pass the same keyword inputs."
                )
        elif data.feature_shape != self.data_.feature_shape:
            raise ShapeError(
                f"Test x has shape {tuple(data.feature_shape)} per point but training x has "
                f"{tuple(self.data_.feature_shape)} (test batch of shape {tuple(data.X.shape)})."
            )
        self.objective.check_data(data, what="test", measure=True)
        return data

    def _grad_chunk(self) -> int:
        return grad_chunk_size(self.objective.p, self.batch_size, self.objective.dtype)

    def _score_chunk(self) -> int:
        """Training points per chunk of ``up_loss``: structured scoring holds no (chunk, p)
        gradients and bounds its own captures (``core.structured.structured_scores``), so
        ``batch_size``; the generic path holds per-sample gradients, so ``_grad_chunk()``."""
        return self.batch_size if self.scoring_ == "structured" else self._grad_chunk()

    def _train_grad_chunks(self, data: Data, desc: str) -> Iterator[tuple[Data, torch.Tensor]]:
        """Per-sample training gradients in memory-bounded chunks, with a progress bar."""
        chunk = self._grad_chunk()
        it = iter_per_sample_grads(self.objective, self.objective.params, data, chunk)
        for batch, G in progress(
            it, desc=desc, total=-(-len(data) // chunk), enabled=self.progress
        ):
            check_rows_finite(G, batch.ids, "The training-loss gradient ∇θL(z, θ̂)", TRAIN_FIX)
            yield batch, G

    def test_grads(self, test: Any) -> torch.Tensor:
        """∇θf(z_test, θ̂) for each test point, shape (n_test, p); a NaN or inf gradient (e.g. a
        finite input whose outputs overflow) raises ``NonFiniteError`` naming the test point."""
        data = test if isinstance(test, Data) else self._test(test)
        ref = next(iter(self.objective.params.values()))
        out = torch.empty(len(data), self.objective.p, dtype=ref.dtype, device=ref.device)
        s = 0
        for batch, g in self._test_grad_chunks(data):
            check_rows_finite(
                g,
                batch.ids,
                "The test measurement's gradient ∇θf(z_test, θ̂)",
                "Its model output likely overflows at θ̂: check that input's scale, or evaluate the"
                " model in float64 (model.double()).",
            )
            out[s : s + len(batch)] = g
            s += len(batch)
        return out

    def _test_grad_chunks(self, data: Data) -> Iterator[tuple[Data, torch.Tensor]]:
        """``(batch, ∇θf rows)`` in memory-bounded chunks: with structured scoring from the
        layers' captures (``core.structured.structured_per_sample_grads``: one backward pass per
        chunk, where ``vmap`` may refuse the model), else by the per-sample path."""
        if self.scoring_ != "structured":
            yield from iter_per_sample_grads(
                self.objective, self.objective.params, data, self.batch_size, measure=True
            )
            return
        assert self._scoring_plan is not None
        for batch in data.batches(self._grad_chunk()):
            yield (
                batch,
                structured_per_sample_grads(
                    self.objective, self._scoring_plan, batch, measure=True
                ),
            )

    # ── executors and stores ──────────────────────────────────────────────────────────
    def _positions(self, train: TrainSelection) -> np.ndarray:
        """Positions into the fitted training data of the selected points, shape (n_selected,)."""
        self._ready()
        if train is None:
            return np.arange(self.n_train_, dtype=np.int64)
        return selection_positions(train, self.n_train_)

    def _executor(self, executor: Executor | None) -> Executor:
        return resolve(executor if executor is not None else getattr(self, "executor_", None))

    def _context(self, ex: Executor, kind: Literal["grads", "solve", "structured"]) -> Any:
        """The shared task context for ``ex``, placed once per executor and fit."""
        key = (id(ex), kind)
        hit = self._shared.get(key)
        if hit is not None and hit[0] is ex:
            return hit[1]
        assert self.data_ is not None
        ctx: _GradContext
        if kind == "grads":
            ctx = _GradContext(self.objective, self.data_)
        elif kind == "structured":
            assert self._scoring_plan is not None
            ctx = _StructuredContext(self.objective, self.data_, self._scoring_plan)
        else:
            ctx = _SolveContext(self.objective, self.data_, self.solver, self.state_)
        handle = ex.share(ctx)
        self._shared[key] = (ex, handle)
        return handle

    def _fingerprint(
        self, quantity: str, positions: np.ndarray, test: Data | None
    ) -> dict[str, Any]:
        """What the stored results depend on: θ̂, the objective, damping, solver and data
        (``influence.fingerprint``); the training data's digest is computed once per fit."""
        if self._train_digest is None:
            assert self.data_ is not None
            self._train_digest = digest_data(self.data_)
        return fingerprint(
            self.objective,
            quantity,
            positions,
            test,
            damping=self.damping,
            solver=self.solver,
            train_digest=self._train_digest,
            scoring=getattr(self, "scoring_", "generic"),
            query_rank=getattr(self, "_query_rank", None),
            curvature=self.curvature_,
        )

    def _bind_store(
        self, st: Store | None, quantity: str, positions: np.ndarray, test: Data | None = None
    ) -> None:
        if st is not None:
            st.bind(self._fingerprint(quantity, positions, test))

    def _store_array(
        self, st: Store, name: str, shape: tuple[int, ...], *, axis: int, chunk: int | None = None
    ) -> ChunkedArray:
        chunk = chunk or self._grad_chunk()
        return st.chunked(
            name,
            shape=shape,
            axis=axis,
            chunk_size=chunk,
            dtype=str(torch.empty((), dtype=self.objective.dtype).numpy().dtype),
            hint=(
                f"This run scores {chunk} training points per chunk"
                f" (Influence(batch_size={self.batch_size}), p={self.objective.p})."
            ),
        )

    def _stored_s_test(self, st: Store | None, test: Data) -> Solution:
        """s_test from the store when it holds one that passes re-verification, else solved and
        stored.

        A stored s_test is not trusted on its checksum alone: its residual ‖(H+δI)x −
        ∇θf(z_test)‖/‖∇θf‖ is measured again with one HVP block (on the columns the original solve
        measured) and must agree with the recorded one and pass ``max_residual``; otherwise it is
        solved afresh and rewritten (a warning says why)."""
        if st is not None:
            got = st.get("s_test")
            if got is not None:
                value, meta = got
                why = self._verify_stored_s_test(value, meta, test)
                if why is None:
                    sol = s_test_from_store(value, meta)
                    self._check_residual(sol.max_residual, stacklevel=4)
                    logger.info("s_test read from store %s and re-verified", st.path)
                    return sol
                warnings.warn(
                    f"The s_test stored in {st.path} fails re-verification ({why}); solving it"
                    " again.",
                    UserWarning,
                    stacklevel=3,
                )
        sol = self.s_test(test)
        if st is not None:
            st.put("s_test", sol.value.detach().cpu().numpy(), meta=s_test_meta(sol))
        return sol

    def _verify_stored_s_test(
        self, value: np.ndarray, meta: dict[str, Any], test: Data
    ) -> str | None:
        """None when a stored s_test re-measures to its recorded residual, else the reason it does
        not (``influence.fingerprint.verify_stored_s_test``; one HVP block on the measured columns).
        """

        def remeasure(cols: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
            G = self.test_grads(test.subset(cols))
            with progress_enabled(self.progress):
                return relative_residual(
                    self.curvature_.matvec(X.to(self.curvature_.dtype)).to(G.dtype), G
                ).double()

        return verify_stored_s_test(
            value,
            meta,
            k=len(test),
            p=self.objective.p,
            dtype=self.objective.dtype,
            remeasure=remeasure,
        )

    def _sweep(
        self,
        fn: Callable[..., Any],
        positions: np.ndarray,
        ex: Executor,
        ctx: Any,
        args: tuple[Any, ...],
        arr: ChunkedArray | None,
        shape: tuple[int, ...],
        *,
        axis: int,
        desc: str,
        on_result: Callable[[Any], np.ndarray] | None = None,
        chunk: int | None = None,
    ) -> np.ndarray:
        """Run ``fn(chunk_positions, ctx, *args)`` over chunks of the training positions through
        ``ex`` (``influence.tasks.sweep``).

        Chunks are ``chunk`` points (default ``_grad_chunk()``, memory-bounded), so results do not
        depend on the executor. With a store only its missing chunks are computed, each written as
        it arrives.
        """
        return sweep(
            fn,
            positions,
            ex,
            ctx,
            args,
            arr,
            shape,
            axis=axis,
            desc=desc,
            chunk=chunk or self._grad_chunk(),
            dtype=self._np_dtype(),
            show_progress=self.progress,
            on_result=on_result,
        )

    def _np_dtype(self) -> str:
        return str(torch.empty((), dtype=self.objective.dtype).numpy().dtype)

    def _check_result_memory(self, nbytes: int, what: str, *, store_helps: bool = False) -> None:
        """``InsufficientMemoryError`` before a result that cannot fit is computed
        (``upweight._memory``)."""
        ways = [
            "score a slice of the training points at a time (train=indices)",
            "fewer test points per call",
        ]
        if store_helps:
            ways.insert(
                1,
                "pass store=FOLDER (chunks go to disk and the result is assembled as a memory-map)",
            )
        check_memory(nbytes, what, alternatives="Instead: " + "; ".join(ways) + ".")

    def inverse_hvp(self, V: torch.Tensor) -> Solution:
        """(H + δI)⁻¹V for V of shape (k, p), checked against ``max_residual``."""
        check_is_fitted(self, "data_")
        with progress_enabled(self.progress):
            sol = self.solver.solve(self.state_, V)
        check_finite(
            sol.value, f"The {self.solver.name} solution", "Add damping or check the model at θ̂."
        )
        self._check_residual(sol.max_residual, stacklevel=4)
        return sol

    def _check_residual(self, max_residual: float, *, stacklevel: int = 3) -> None:
        if math.isinf(max_residual):  # Solution.max_residual: a measured residual was NaN or inf
            raise InaccurateSolveError(
                f"The {self.solver.name} solve failed: a measured relative residual ‖(H+δI)x −"
                " v‖/‖v‖ is NaN or infinite, so its solution cannot be trusted (whatever"
                " on_inaccurate says). Check the model for overflow at θ̂ (e.g. model.double()),"
                " or add damping."
            )
        bound = self._residual_bound()
        if bound is not None and max_residual > bound:
            msg = (
                f"The {self.solver.name} solve is inaccurate: relative residual ‖(H+δI)x − v‖/‖v‖ ="
                f" {max_residual:.2e} > max_residual={bound:g}. "
                + self.solver.accuracy_advice(self.state_)
            )
            if self.on_inaccurate == "raise":
                raise InaccurateSolveError(msg)
            warnings.warn(msg, InaccurateSolveWarning, stacklevel=stacklevel)

    def _residual_bound(self) -> float | None:
        if self.max_residual == "auto":
            # Auto's bound is that of the solver it chose in prepare(); it travels on the state
            return getattr(self.state_, "default_max_residual", self.solver.default_max_residual)
        return self.max_residual

    def s_test(self, test: Any) -> Solution:
        """s_test = (H + δI)⁻¹∇θf(z_test, θ̂) for each test point, as one block solve (Koh & Liang
        §3)."""
        return self.inverse_hvp(self.test_grads(test))

    def _provenance(self, sol: Solution | None, started: float) -> Provenance:
        """What a result records (``influence.provenance``): the settings of this fit and, with
        ``sol``, the solve — its residual against the accepted bound, iterations, time, stats."""
        structured = getattr(self, "scoring_", "generic") == "structured"
        base = Provenance(
            solver=self.solver.config(),
            damping=self.damping,
            curvature=self.curvature_.describes,
            l2=self.objective.l2,
            p=self.objective.p,
            dtype=str(self.objective.dtype),
            grad_norm=self.grad_norm_,
            seconds=time.perf_counter() - started,
            structured_scoring=self.scoring_reason_ if structured else None,
            structured_hvp=(
                self.curvature_.structured_reason_
                if getattr(self.curvature_, "_structured_op", None)
                else None
            ),
        )
        if sol is None:
            return base
        bound = self._residual_bound()
        exact = self.solver.approximates.startswith("exact")
        return replace(
            base,
            residual_max=sol.max_residual,
            iterations=sol.iterations,
            solve_seconds=sol.seconds,
            max_residual_accepted=bound,
            accuracy=(
                None
                if exact
                else (
                    f"not estimated: the residual of an approximation ({self.solver.approximates}) "
                    "bounds its error only loosely; Influence.estimate_accuracy(test) measures its "
                    "scores against CG"
                )
            ),
            # None: not checked (a one-shot solver with residual_sample=0 measured no residual)
            accepted=None if not sol.checked else bound is None or sol.max_residual <= bound,
            solver_stats=sol.stats,
        )

    # ── the paper's quantities ────────────────────────────────────────────────────────
    @_sized_threads
    def up_loss(
        self,
        test: Any,
        train: TrainSelection = None,
        *,
        store: StoreLike = None,
        executor: Executor | None = None,
    ) -> InfluenceScores:
        """I_up,loss(z, z_test) = −∇θf(z_test)ᵀ H⁻¹ ∇θL(z) — Koh & Liang (2017) Eq. 2.

        s_test = H⁻¹∇θf(z_test) is one block solve; the training points are then scored chunk by
        chunk (−s_testᵀ∇θL(z) for the chunk's per-sample gradients) through the executor.

        Args:
            test: test points ``(X, y)`` (or Dataset/DataLoader); f is the objective's measure.
            train: indices into the fitted training data, or ``None`` for all.
            store: a folder (or ``Store``) that keeps s_test and every finished chunk of scores;
                rerunning the same call resumes from it with bit-for-bit the same result. A folder
                written for another model, objective, solver or data is refused
                (``StoreMismatchError``); ``Store(path, overwrite=True)`` starts it afresh.
            executor: where the chunks run (e.g. ``upweight.distributed.DaskExecutor``); default:
                the executor given to ``fit``, else in-process.

        Returns:
            ``InfluenceScores`` of shape (n_test, n_train); > 0 means z is harmful to z_test.
        """
        t0 = time.perf_counter()
        test_data = self._test(test)
        positions = self._positions(train)
        if store is None:  # the chunks and their concatenation are held in memory
            self._check_result_memory(
                2 * tensor_bytes((len(test_data), len(positions)), self._np_dtype()),
                f"I_up,loss of shape ({len(test_data)}, {len(positions)})",
                store_helps=True,
            )
        with opened_store(store) as st:
            self._bind_store(st, "up_loss", positions, test_data)
            sol = self._stored_s_test(st, test_data)
            ex = self._executor(executor)
            shape = (len(test_data), len(positions))
            arr = (
                None
                if st is None
                else self._store_array(st, "scores", shape, axis=1, chunk=self._score_chunk())
            )
            ctx = self._context(ex, "structured" if self.scoring_ == "structured" else "grads")
            rank = getattr(self, "_query_rank", None)
            args: tuple[Any, ...] = (sol.value,)
            # split s_test by layer (and truncate it) once, not per chunk
            if self.scoring_ == "structured":
                assert self._scoring_plan is not None
                S = sol.value.reshape(-1, self.objective.p)
                args = (prepare_queries(self._scoring_plan, S, self.objective.dtype, rank),)
                # the queries hold s_test from here on (stored above when there is a store)
                del S
                sol = replace(sol, value=sol.value.new_empty(0))
            values = self._sweep(
                _up_loss_chunk,
                positions,
                ex,
                ctx,
                args,
                arr,
                shape,
                axis=1,
                desc="I_up,loss over training points",
                chunk=self._score_chunk(),
            )
            prov = self._provenance(sol, t0)
            if rank is not None:
                # fit refuses query_rank without structured scoring
                assert self._scoring_plan is not None
                prov = prov.with_extras(
                    query_rank=rank,
                    query_rank_layers=query_rank_layers(self._scoring_plan, rank),
                    query_rank_approximates=(
                        "each layer block of s_test replaced by its best "
                        "rank-r approximation (truncated SVD, Eckart–Young)"
                    ),
                )
            return InfluenceScores(
                values,
                test_data.ids.numpy(),
                self.data_.ids.numpy()[positions],
                self.n_train_,
                "up_loss",
                prov,
            )

    def removal_effect(
        self,
        test: Any,
        train: TrainSelection = None,
        *,
        store: StoreLike = None,
        executor: Executor | None = None,
    ) -> InfluenceScores:
        """Predicted change of the test measurement when each training point is removed: −I_up,loss
        / n."""
        return self.up_loss(test, train, store=store, executor=executor).as_removal_effect()

    @_sized_threads
    def removal_effect_newton(self, test: Any, train: TrainSelection = None) -> RemovalEffect:
        """Predicted change of the test measurement when each training point zᵢ is removed, by one
        Newton step on the leave-one-out objective R − L(zᵢ)/n instead of the first-order
        −I_up,loss/n:

            Δθᵢ = (H + δI − Hᵢ/n)⁻¹ ∇θL(zᵢ, θ̂)/n,    Δf = ∇θf(z_test, θ̂)ᵀ Δθᵢ,

        with Hᵢ the point's Gauss–Newton curvature Jᵢᵀ∇²_zL Jᵢ (its exact Hessian where the model
        output is linear in θ), applied by Woodbury: one block solve with at most C right-hand sides
        per point (C outputs) plus one s_test solve. It corrects the first order's shrinkage by up
        to 1/(1 − leverage) for high-leverage points. ``CurvatureError`` where H + δI − Hᵢ/n is not
        positive definite to the accuracy of the solves. Derivation: ``upweight.influence.removal``.

        Args:
            test: test points ``(X, y)``; f is the objective's measure.
            train: indices into the fitted training data, or ``None`` for all.

        Returns:
            ``RemovalEffect`` with ``values`` (n_test, k), the first-order ``first_order`` beside
            them and each point's ``leverage``.
        """
        return newton_removal_effect(self, test, train)

    @_sized_threads
    def estimate_accuracy(
        self,
        test: Any,
        *,
        n_test: int = 2,
        n_train: int = 512,
        rtol: float = 1e-6,
        maxiter: int | None = None,
        seed: int = 0,
    ) -> AccuracyEstimate:
        """How close this influence's scores are to the exact ones: for the first ``n_test`` test
        points, its solver's s_test and CG's (to ``rtol``, on the same curvature and damping) score
        ``n_train`` training points drawn at random (``seed``); returns their Spearman and Pearson
        correlations, the relative error of the scores and the share with the right sign, per test
        point. Meant for the approximate solvers (K-FAC, EK-FAC, Arnoldi, Nyström, DataInf), whose
        residual says little about the scores; costs about one CG solve with ``n_test`` right-hand
        sides. ``InaccurateSolveError`` if CG does not reach its tolerance. See
        ``upweight.influence.accuracy``."""
        return estimate_accuracy(
            self, test, n_test=n_test, n_train=n_train, rtol=rtol, maxiter=maxiter, seed=seed
        )

    @_sized_threads
    def up_params(self, train: TrainSelection = None) -> ParamInfluence:
        """I_up,params(z) = −H⁻¹∇θL(z, θ̂) — Koh & Liang (2017) Eq. 1; shape (n_selected, p).

        One block solve per chunk of ``batch_size`` training points.
        """
        t0 = time.perf_counter()
        data = self._train(train)
        self._check_result_memory(
            2 * tensor_bytes((len(data), self.objective.p), self._np_dtype()),
            f"I_up,params of shape ({len(data)}, {self.objective.p})",
        )
        rows, last = [], None
        for _, G in self._train_grad_chunks(data, "I_up,params"):
            last = self.inverse_hvp(G)
            rows.append(-last.value)
        return ParamInfluence(
            torch.cat(rows).cpu().numpy(),
            data.ids.numpy(),
            self.n_train_,
            self._provenance(last, t0),
        )

    @_sized_threads
    def self_influence(
        self,
        train: TrainSelection = None,
        *,
        store: StoreLike = None,
        executor: Executor | None = None,
    ) -> SelfInfluence:
        """I_up,loss(z, z) = −∇θL(z)ᵀH⁻¹∇θL(z) for each training point (Koh & Liang 2017, §5.4).

        Needs one inverse-HVP per point: cheap with ``Direct`` (factorised once), n block solves
        with CG/LiSSA. Each chunk (gradients, block solve, dot products) is one executor task; on a
        cluster the solver state travels to each worker once and a CG/LiSSA solve inside a task
        runs its HVPs on that worker.

        Args:
            train: indices into the fitted training data, or ``None`` for all.
            store: a folder (or ``Store``) keeping every finished chunk; see ``up_loss``.
            executor: where the chunks run; default: the executor given to ``fit``, else in-process.
        """
        t0 = time.perf_counter()
        positions = self._positions(train)
        with opened_store(store) as st:
            self._bind_store(st, "self_influence", positions)
            ex = self._executor(executor)
            # row 0: I_up,loss(z, z); row 1: the relative residual of z's solve (for provenance)
            shape = (2, len(positions))
            arr = None if st is None else self._store_array(st, "self_influence", shape, axis=1)
            last: list[Solution] = []
            out = self._sweep(
                _self_influence_chunk,
                positions,
                ex,
                self._context(ex, "solve"),
                (),
                arr,
                shape,
                axis=1,
                desc="self-influence",
                on_result=lambda res: self._accept_chunk_solution(res, last),
            )
            # a copy: the store may return a read-only memmap
            residual = torch.from_numpy(np.array(out[1]))
            # each chunk's solve was checked as it arrived; NaN marks an unmeasured one
            summary = Solution(
                value=torch.empty(0, self.objective.p),
                residual=residual,
                converged=torch.ones(len(residual), dtype=torch.bool),
                iterations=last[-1].iterations if last else 0,
                seconds=sum(s.seconds for s in last),
                stats=dict(last[-1].stats) if last else {"resumed_from_store": True},
                measured=~torch.isnan(residual),
            )
            prov = self._provenance(summary, t0)
            if getattr(self, "_query_rank", None) is not None:
                prov = prov.with_extras(
                    query_rank="not used: each training point is its own query, scored exactly"
                )
            return SelfInfluence(
                out[0].copy(), self.data_.ids.numpy()[positions], self.n_train_, prov
            )

    def _accept_chunk_solution(
        self, result: tuple[np.ndarray, Solution], seen: list[Solution]
    ) -> np.ndarray:
        values, sol = result
        self._check_residual(sol.max_residual, stacklevel=5)
        seen.append(sol)
        return values

    @_sized_threads
    def pert_loss(self, test: Any, train: TrainSelection = None) -> PertScores:
        """I_pert,loss(z, z_test) = −∇θf(z_test)ᵀ H⁻¹ ∇x∇θL(z) — Koh & Liang (2017) Eq. 5.

        Returns ``PertScores`` of shape (n_test, n_train, *x_shape). Moving training input x by
        a small δ changes the test measurement by about (1/n)·⟨values, δ⟩.
        """
        t0 = time.perf_counter()
        test_data = self._test(test)
        data = self._train(train)
        if data.is_dict:
            raise InputError(
                "I_pert,loss differentiates the loss with respect to one continuous input tensor,"
                f" but these inputs are a dict {sorted(data.X)} (token ids, masks, …). Use up_loss"
                " instead."
            )
        shape = (len(test_data), len(data), *data.feature_shape)
        self._check_result_memory(
            2 * tensor_bytes(shape, self._np_dtype()), f"I_pert,loss of shape {shape}"
        )
        sol = self.s_test(test_data)
        parts = []
        # the mixed derivative is vmapped over (test point, training point) pairs, each holding its
        # own activations: keep the pairs per call at one gradient chunk, not the chunk times n_test
        chunk = max(1, self._grad_chunk() // max(1, sol.value.shape[0]))
        for batch in progress(
            data.batches(chunk),
            desc="I_pert,loss",
            total=-(-len(data) // chunk),
            enabled=self.progress,
        ):
            parts.append(-pert_directions(self.objective, self.objective.params, batch, sol.value))
        values = torch.cat(parts, dim=1)
        return PertScores(
            values.detach().cpu().numpy(),
            test_data.ids.numpy(),
            data.ids.numpy(),
            self.n_train_,
            self._provenance(sol, t0),
        )

    @_sized_threads
    def group_influence(
        self,
        test: Any,
        groups: Any,
        *,
        order: int = 1,
        third_derivative: bool = False,
        measure_hessian: bool = True,
    ) -> GroupInfluence:
        """Predicted change of the test measurement when each group U of training points is removed.

        With g_U = (1/n)Σ_{z∈U}∇θL(z, θ̂), H_U = (1/n)Σ_{z∈U}∇²θL(z, θ̂) and H = ∇²R(θ̂) + δI:

            order 1:  Δθ⁽¹⁾ = H⁻¹g_U                 Δf = ∇θf(z_test)ᵀΔθ⁽¹⁾
                      (= Σ_{z∈U} −I_up,loss(z, z_test)/n — Koh et al. 2019)
            order 2:  Δθ⁽²⁾ = Δθ⁽¹⁾ + H⁻¹H_UΔθ⁽¹⁾    Δf = ∇θf(z_test)ᵀΔθ⁽²⁾ +
            ½Δθ⁽²⁾ᵀ∇²θf(z_test)Δθ⁽²⁾
                      (Basu, You & Feizi 2020, at fixed n and l2)

        Removal keeps n and l2 (as ``upweight.refit`` with weight 0 on U). Order 1 costs one
        block solve with one right-hand side per group; order 2 adds one HVP over each group's
        points and a second block solve. No Hessian is formed. Derivation and the exact terms
        kept: ``upweight.influence.group``.

        Args:
            test: test points ``(X, y)`` (or Dataset/DataLoader); f is the objective's measure.
            groups: a list of groups, each an array of positions into the fitted training data
                (or a boolean mask of length n).
            order: 1 (sum of individual influences) or 2 (with the within-group interaction).
            third_derivative: order 2 only — also keep −½H⁻¹∇³R(θ̂)[Δθ⁽¹⁾, Δθ⁽¹⁾], the term Basu et
                al. drop; then Δθ⁽²⁾ is the full second-order expansion in the group weight.
            measure_hessian: order 2 only — add ½Δθ⁽²⁾ᵀ∇²θf Δθ⁽²⁾ to the predicted Δf (False gives
                Basu et al.'s ∇θfᵀΔθ⁽²⁾).

        Returns:
            ``GroupInfluence`` with ``values`` (n_test, n_groups) ≈ f(θ̂₋U) − f(θ̂) (> 0: removing U
            raises the test loss) and ``param_change`` (n_groups, p) ≈ θ̂₋U − θ̂.

        Examples:
            >>> import torch
            >>> from upweight import Objective, Direct
            >>> X = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64); y = X * 2
            >>> model = torch.nn.Linear(1, 1, bias=False).double().eval()
            >>> with torch.no_grad(): _ = model.weight.fill_(28 / 14.3)  # argmin of R
            >>> inf = Influence(Objective(model, "squared", l2=0.1), solver=Direct()).fit((X, y))
            >>> # removing the first two points; the exact refit moves w by
            >>> # −0.0226 = Δθ⁽¹⁾/(1 − H_U/H)
            >>> changes = [inf.group_influence((X, y), [[0, 1]], order=o).param_change
            ...            for o in (1, 2)]
            >>> [round(float(c[0, 0]), 4) for c in changes]
            [-0.0147, -0.0198]
        """
        return compute_group_influence(
            self,
            test,
            groups,
            order=order,
            third_derivative=third_derivative,
            measure_hessian=measure_hessian,
        )
