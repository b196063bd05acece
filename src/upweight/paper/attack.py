"""§5.2 of Koh & Liang (2017), training-set attacks, on the frozen-feature model of §5.1.

The paper's attack (§5.2; release code ``influence/dataset_poisoning.py``,
``scripts/run_data_poisoning_indiv.py``), with the stand-in model of ``paper.features``:

1. θ̂ = the top layer (logistic regression on the frozen CNN features φ(x), l2 = 0.001, no
   intercept), trained to the minimum. Targets: correctly classified test images.
2. For a target z_test, rank the training images by ‖I_pert,loss(z, z_test)‖₁ (the release code's
   selection; ``Influence.pert_loss`` on the full model CNN + top layer with θ = the top layer, so
   ∇x goes through the frozen CNN to the pixels — Eq. 5).
3. Perturb the top-k images (k = 1 (the first), 1 (the second alone), 2, 3, 5, 10, in this order,
   stopping at the first success, as the release code does): z̃ := Π(z̃ + α·sign(I_pert,loss(z̃,
   z_test))), then **retrain the top layer exactly** on the perturbed training set (features of the
   perturbed images recomputed through the CNN; exact Newton on the top layer, warm-started) and
   recompute I_pert,loss at the new θ̂. Stop when the target's prediction flips or after
   ``iterations`` (paper: 100).
4. Π (``AttackConfig.projection``). "same-8bit", the default, is the paper's: each pixel stays
   inside its own 8-bit quantisation cell, within ε ≤ 0.5 level of the original (ε = 0.5: the
   perturbed image has the *same* 8-bit representation), at any real value in between; α = 0.02
   levels. Half a level less 10⁻⁶ is the edge of the cell, so rounding the perturbed image to 8
   bits always gives the original back. "levels" keeps every iterate on the 8-bit grid: values
   k/255 within ε whole levels, α whole levels — a perturbed image that is itself a valid 8-bit
   image, which needs ε ≥ 1 level. Both clip to [0, 255].
5. Every reported flip is verified by a **cold** retrain (from θ = 0) on the perturbed training set.
6. Multi-target variant (paper Fig. 5: one training image flipped 16 of 30 test images of the
   author's dog): a group of same-label test images, f = their average test loss, one (or k)
   training images perturbed to increase it; we count how many of the group flip.

I_pert,loss at each step: H and ∇θf(z_test) involve only the top layer, so s_test = H⁻¹∇θf comes
from the closed-form logistic top layer on the features (``paper.toplayer``: CG on closed-form
products, preconditioned by H at the clean θ̂, since forming H at every step would dominate the run;
``TopLayerAttack.s_test`` computes the same with ``Influence`` + ``Direct``, the tests check they
agree), and the mixed derivative ∇x∇θL(z̃) goes through the CNN
(``upweight.core.grads.pert_directions`` on the full model) — the same two factors
``Influence.pert_loss`` multiplies, without re-running the CNN on all n images at every step. The
tests check the result against central finite differences of actually retrained test losses.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .._executor import Executor, resolve
from .._progress import progress as _progress
from ..core import Data, Objective
from ..core.grads import pert_directions
from ..errors import InputError
from ..influence import Influence
from ..solvers import Direct
from ..store import Store, array_digest
from .config import PROJECTIONS, AttackConfig
from .features import FeatureSetup, check_setup, features_of, fit_top_layer
from .toplayer import LogisticTopLayer

PAPER = {
    "n_train": 1800,
    "n_test": 600,
    "n_correct": 591,
    "alpha_levels": 0.02,
    "box_levels": 0.5,
    "iterations": 100,
    "flip_1": 0.57,  # 335 / 591
    "flip_2": 0.77,
    "flip_10": 590 / 591,  # "all but 1"
    "multi_group": 30,
    "multi_flipped": 16,
}
#: "same-8bit": how far a pixel may move, in levels — half a level less 10⁻⁶, so the perturbed
#: image still rounds to the original
CELL_EDGE = 0.5 - 1e-6
# release code: 1st, 2nd, top-2, 3, 5, 10
SCHEDULE = ((0,), (1,), (0, 1), (0, 1, 2), (0, 1, 2, 3, 4), tuple(range(10)))


@dataclass(frozen=True)
class AttackRun:
    """One attack: a set of training images perturbed against one or several test images."""

    targets: list[int]  # test positions attacked
    train_indices: list[int]  # training positions perturbed
    iterations: int  # steps taken (each followed by an exact retrain)
    flipped: list[bool]  # per target: prediction flipped after the last retrain
    margin_before: list[float]  # y·s of each target at θ̂
    margin_after: list[float]  # … after the attack (retrained)
    verified: list[bool]  # per target: flipped under a cold retrain from θ = 0 as well
    linf_levels: float  # largest |change| of any pixel, in 8-bit levels
    l2_pixels: float  # ‖z̃ − z‖₂ over the perturbed images (pixels in [0, 1])
    l2_features: float  # ‖φ(z̃) − φ(z)‖₂
    # "flipped", "fixed point"/"cycle" (z̃ repeats: nothing new can happen) or "iterations"
    stopped: str


def _levels(x: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] → their 8-bit levels (int); the data must already be on the 8-bit grid."""
    lev = np.rint(np.asarray(x, np.float64) * 255.0)
    if np.abs(lev / 255.0 - x).max() > 1e-6:
        raise InputError(
            "The attack needs 8-bit images (pixel values k/255); these pixels are not on that grid."
        )
    return lev.astype(np.int64)


class TopLayerAttack:
    """The iterated I_pert,loss attack of §5.2 on a ``FeatureSetup`` (state: the clean training
    set)."""

    def __init__(self, setup: FeatureSetup) -> None:
        self.s = setup
        self.y = torch.as_tensor(setup.task.y_train)
        self.yt = torch.as_tensor(setup.task.y_test)
        self.levels = _levels(setup.task.x_train)
        self.w0 = setup.top_weight()
        # H at the clean θ̂, inverted once: the preconditioner of every retrain and s_test solve of
        # every run
        self.top = LogisticTopLayer(setup.F, self.y, setup.l2, self.w0)

    # ── pieces ──────────────────────────────────────────────────────────────────────
    def _model_at(self, w: torch.Tensor) -> Any:
        from .features import TopLayerModel

        m = TopLayerModel(self.s.net).double().eval()
        with torch.no_grad():
            m.top.weight.copy_(w)
        return m

    def s_test(self, F: torch.Tensor, w: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        """H⁻¹ ∇θ (mean test loss over ``targets``) with the library (``Influence`` + ``Direct`` on
        the top-layer objective over features F at weights w) — shape (1, d)."""
        lin = torch.nn.Linear(F.shape[1], 1, bias=False).double().eval()
        with torch.no_grad():
            lin.weight.copy_(w)
        inf = Influence(
            Objective(lin, "logistic", l2=self.s.l2), solver=Direct(), progress=False, grad_tol=1e-6
        )
        inf.fit((F, self.y))
        t = list(targets)
        return inf.s_test((self.s.F_test[t], self.yt[t])).value.mean(0, keepdim=True)

    def s_test_closed(
        self, F: torch.Tensor, w: torch.Tensor, targets: Sequence[int]
    ) -> torch.Tensor:
        """The same s_test from the closed forms of the logistic top layer (used inside the attack
        loop, where forming H at every step would dominate the run time): ∇θ log(1 + exp(−y wᵀφ)) =
        −σ(−m) y φ, solved with H(w; F) by ``LogisticTopLayer.solve`` (CG preconditioned by H at the
        clean θ̂).
        """
        t = list(targets)
        Ft = self.s.F_test[t]
        yt = torch.where(self.yt[t] > 0, 1.0, -1.0).double()
        g = (-(torch.sigmoid(-yt * (Ft @ w[0])) * yt)[:, None] * Ft).mean(0)
        return torch.from_numpy(self.top.solve(F, w, g))[None]

    def pert(
        self, w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """I_pert,loss(z, ·) = −sᵀ∇x∇θL(z, θ) through the CNN for the rows of x, shape (k, 784)."""
        obj = Objective(self._model_at(w), "logistic", l2=self.s.l2, params="top")
        return -pert_directions(obj, obj.params, Data.from_any((x, y)), s)[0]

    def margins(self, F: torch.Tensor, w: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
        del F
        with torch.no_grad():
            s = self.s.F_test[list(targets)] @ w[0]
        return (s * self.yt[list(targets)].to(s.dtype)).numpy()

    # ── the attack ──────────────────────────────────────────────────────────────────
    def run(
        self,
        targets: Sequence[int],
        train: Sequence[int],
        *,
        epsilon: float,
        step: float = 1,
        iterations: int = 100,
        projection: str = "levels",
        stop_on_flip: bool = True,
    ) -> tuple[AttackRun, np.ndarray]:
        """Perturb training images ``train`` to raise the (mean) test loss of ``targets``.

        Returns the run and the perturbed images in 8-bit levels, shape (len(train), 784):
        integers with ``projection="levels"``, reals within their original's cell with
        "same-8bit".
        """
        if projection not in PROJECTIONS:
            raise InputError(
                f"TopLayerAttack.run: projection must be one of {', '.join(PROJECTIONS)}; got"
                f" {projection!r}."
            )
        targets, train = [int(t) for t in targets], [int(i) for i in train]
        base = self.levels[train].astype(np.float64)
        half = epsilon if projection == "levels" else min(float(epsilon), CELL_EDGE)
        lo, hi = np.maximum(base - half, 0.0), np.minimum(base + half, 255.0)
        lev = base.copy()
        yk = self.y[train]
        F = self.s.F.clone()
        w = self.w0.clone()
        before = self.margins(F, w, targets)
        stopped, it = "iterations", 0
        seen = {lev.tobytes()}
        for it in range(1, iterations + 1):
            s = self.s_test_closed(F, w, targets)
            g = self.pert(w, s, torch.as_tensor(lev / 255.0), yk).numpy()
            new = np.clip(lev + step * np.sign(g), lo, hi)
            if new.tobytes() in seen:
                # θ̂ is a function of the training set, so the iteration z̃ ↦ Π(z̃ +
                # α·sign(I_pert,loss)) is a deterministic map of z̃: a repeated z̃ means it cycles
                # through states already seen (none flipped the target), exactly as the remaining
                # iterations would
                stopped, it = ("fixed point" if np.array_equal(new, lev) else "cycle"), it - 1
                break
            seen.add(new.tobytes())
            lev = new
            F[train] = features_of(self.s.net, lev / 255.0)
            w_np, _ = self.top.minimise(F, w)
            w = torch.from_numpy(w_np)[None]
            if stop_on_flip and (self.margins(F, w, targets) < 0).all():
                stopped = "flipped"
                break
        after = self.margins(F, w, targets)
        flipped = (after < 0).tolist()
        verified = [False] * len(targets)
        if any(flipped):
            # from θ = 0: an independent retrain
            cold, _ = fit_top_layer(self.s.net, F, self.y, self.s.l2)
            verified = [
                bool(f and m < 0)
                for f, m in zip(flipped, self.margins(F, cold.top.weight.detach(), targets))
            ]
        dx = (lev - base) / 255.0
        run = AttackRun(
            targets=targets,
            train_indices=train,
            iterations=it,
            flipped=flipped,
            margin_before=before.tolist(),
            margin_after=after.tolist(),
            verified=verified,
            linf_levels=float(np.abs(lev - base).max(initial=0.0)),
            l2_pixels=float(np.linalg.norm(dx)),
            l2_features=float((F[train] - self.s.F[train]).norm()),
            stopped=stopped,
        )
        return run, (np.rint(lev).astype(np.int64) if projection == "levels" else lev)

    def rank_training(self, inf_full: Influence, targets: Sequence[int]) -> np.ndarray:
        """Training positions by decreasing ‖I_pert,loss(z, z_test)‖₁ (mean over ``targets`` for a
        group)."""
        t = list(targets)
        # (m, n, 784)
        vals = inf_full.pert_loss((torch.as_tensor(self.s.task.x_test[t]), self.yt[t])).values
        score = np.abs(vals.mean(0)).sum(-1)
        return np.argsort(-score, kind="stable")


def full_influence(setup: FeatureSetup, progress: bool = False) -> Influence:
    """``Influence`` on the full model (CNN + top layer, θ = the top layer) at θ̂: ``pert_loss``
    reaches the pixels."""
    obj = Objective(setup.model, "logistic", l2=setup.l2, params="top")
    return Influence(obj, solver=Direct(), progress=progress, grad_tol=1e-6).fit(
        (torch.as_tensor(setup.task.x_train), torch.as_tensor(setup.task.y_train))
    )


@dataclass(frozen=True)
class AttackResult:
    """Every number of the §5.2 reproduction."""

    digits: list[int]
    n_train: int
    n_test: int
    n_correct: int
    l2: float
    projection: str
    epsilon_levels: float
    step_levels: float
    iterations: int
    cnn: dict[str, Any]
    grad_norm: float
    targets: list[int]  # correctly classified test positions attacked
    # cumulative: flipped with ≤ k perturbed images (k = 1, 2, 3, 5, 10)
    flips_by_k: dict[str, int]
    flip_rate: dict[str, float]
    solved_with: list[int]  # per target: k of the successful attack (0: not flipped)
    verified_all: bool  # every counted flip also flips under a cold retrain
    runs: list[dict[str, Any]]  # the successful (or last) run per target
    # median over 1-image successes: ‖Δx‖₂ / mean ‖x − class centroid‖₂
    pixel_to_centroid: float
    feature_to_centroid: float  # … the same in feature space
    # median over every target's last attack of k images: ‖Δx‖₂/√k (the root mean square change
    # of one perturbed image) / mean ‖x − class centroid‖₂, in pixels and in features
    pixel_to_centroid_per_image: float
    feature_to_centroid_per_image: float
    # median over the same attacks of (‖Δφ‖₂ / feature spread) / (‖Δx‖₂ / pixel spread): how much
    # larger the change is for the model than in the pixels, each against its class spread
    feature_sensitivity: float
    multi: dict[str, Any] = field(default_factory=dict)
    # one successful 1-image attack, for the figure
    example: dict[str, Any] = field(default_factory=dict)
    config: AttackConfig = field(default_factory=AttackConfig)  # the settings of the run
    resumed: int = 0  # single-target attacks read from a store kept by an earlier run

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything; ``settings`` is the run's ``AttackConfig``."""
        d = asdict(self)
        d["settings"] = d.pop("config")
        return d


def _mean_centroid_distance(X: np.ndarray, y: np.ndarray) -> float:
    d = []
    for c in np.unique(y):
        Xc = X[y == c]
        d.append(np.linalg.norm(Xc - Xc.mean(0), axis=1))
    return float(np.concatenate(d).mean())


_ATTACKERS = threading.local()


def _attacker(setup: FeatureSetup) -> tuple[TopLayerAttack, Influence]:
    """``TopLayerAttack`` and ``full_influence`` for ``setup``, built once per thread (a worker's
    partitions reuse them; two threads never share the modules ``functional_call`` swaps)."""
    cached = getattr(_ATTACKERS, "value", None)
    if cached is None or cached[0] is not setup:
        cached = (setup, TopLayerAttack(setup), full_influence(setup))
        _ATTACKERS.value = cached
    return cached[1], cached[2]


def _attack_partition(
    targets: Sequence[int],
    setup: FeatureSetup,
    schedule: Sequence[tuple[int, ...]],
    epsilon: float,
    step: float,
    iterations: int,
    projection: str,
) -> list[tuple[int, dict[str, Any], list[float] | None]]:
    """The single-target attacks of one partition of targets — the map step of ``run_attack``. Per
    target: (k of the successful attack or 0, its last run, the perturbed levels of a 1-image
    success).
    """
    atk, inf_full = _attacker(setup)
    out = []
    for t in targets:
        ranking = atk.rank_training(inf_full, [int(t)])
        k_ok, last, levels = 0, None, None
        for ks in schedule:
            run, lev = atk.run(
                [int(t)],
                ranking[list(ks)],
                epsilon=epsilon,
                step=step,
                iterations=iterations,
                projection=projection,
            )
            last = run
            if run.flipped[0]:
                k_ok = len(ks)
                levels = lev.tolist() if k_ok == 1 else None
                break
        assert last is not None
        out.append((k_ok, asdict(last), levels))
    return out


#: targets per task when a store keeps the single-target attacks (each kept as its task ends)
STORED_PARTITION = 4


def _store_fingerprint(
    setup: FeatureSetup,
    schedule: Sequence[tuple[int, ...]],
    epsilon: float,
    step: float,
    iterations: int,
    projection: str,
) -> dict[str, Any]:
    """What a single-target attack's outcome depends on: the images, their features and the
    clean top layer (the trained extractor enters through the features), l2 and the attack's
    settings — not which or how many targets a run attacks, nor the joint attack's settings."""
    task = setup.task
    return {
        "computation": "upweight.paper.attack: single-target attacks (§5.2)",
        "x_train": array_digest(np.asarray(task.x_train)),
        "y_train": array_digest(np.asarray(task.y_train)),
        "x_test": array_digest(np.asarray(task.x_test)),
        "y_test": array_digest(np.asarray(task.y_test)),
        "features": array_digest(setup.F.cpu().numpy()),
        "test_features": array_digest(setup.F_test.cpu().numpy()),
        "top_weight": array_digest(setup.top_weight().cpu().numpy()),
        "l2": float(setup.l2),
        "schedule": [list(ks) for ks in schedule],
        "epsilon": float(epsilon),
        "step": float(step),
        "iterations": int(iterations),
        "projection": projection,
    }


def _kept(st: Store, t: int) -> tuple[int, dict[str, Any], list[float] | None] | None:
    """Target ``t``'s single-target outcome as ``_attack_partition`` gives it, from the store."""
    got = st.get(f"target_{t}")
    if got is None:
        return None
    levels, meta = got
    return int(meta["k_ok"]), meta["run"], levels.tolist() if meta["has_levels"] else None


def _keep(st: Store, t: int, outcome: tuple[int, dict[str, Any], list[float] | None]) -> None:
    k_ok, last, levels = outcome
    st.put(
        f"target_{t}",
        np.asarray(levels if levels is not None else [0.0], dtype=np.float64),
        meta={"k_ok": k_ok, "run": last, "has_levels": levels is not None},
    )


def run_attack(
    setup: FeatureSetup,
    config: AttackConfig | None = None,
    *,
    progress: bool = True,
    executor: Executor | None = None,
    store: str | os.PathLike[str] | Store | None = None,
    fresh: bool = False,
) -> AttackResult:
    """Run §5.2 (see the module docstring) on ``setup`` and return every number.

    Args:
        setup: ``features.build_feature_model(data, config)``, built with ``config``'s
            ``FeatureConfig`` settings.
        config: the settings (default ``AttackConfig()``); ``targets`` attacks the first
            correctly classified test images in test order, alternating between the two classes.
        executor: where the single-target attacks run (``None``: in this process, one after the
            other; ``upweight.distributed.DaskExecutor``: partitions of targets on its workers —
            each target's attack is independent, so the results are the same).
        store: a folder (or ``Store``) that keeps each single-target attack as its task ends
            (tasks of ``STORED_PARTITION`` targets); a rerun with the same images, features, top
            layer and attack settings reads them back and attacks only the targets still missing,
            so a stopped run resumes. A store of other settings raises ``StoreMismatchError``.
        fresh: discard what the ``store`` folder keeps first (a ``Store`` passed in follows its
            own ``overwrite``).
    """
    c = config if config is not None else AttackConfig()
    check_setup(setup, c, "run_attack")
    targets, epsilon, step, iterations = c.targets, c.epsilon, c.step, c.iterations
    projection = c.projection
    max_k, group_size, multi_k = c.max_k, c.group_size, c.multi_k
    atk, inf_full = _attacker(setup)
    task = setup.task
    scores = setup.test_scores()
    correct = np.flatnonzero(np.sign(scores) == task.y_test)
    # alternate classes so a prefix of the list is balanced
    pos, neg = correct[task.y_test[correct] > 0], correct[task.y_test[correct] < 0]
    order = [int(v) for pair in zip(pos, neg) for v in pair]
    order += [int(v) for v in (pos[len(neg) :] if len(pos) > len(neg) else neg[len(pos) :])]
    chosen = order if targets is None else order[:targets]
    if targets is not None and not 1 <= targets <= len(order):
        raise InputError(
            f"run_attack: targets must be between 1 and {len(order)} (correctly classified test "
            f"images); got {targets}."
        )
    schedule = [ks for ks in SCHEDULE if max(ks) < max_k]

    ex = resolve(executor)
    opened = (
        nullcontext(store)
        if store is None or isinstance(store, Store)
        else Store(store, overwrite=fresh)
    )
    with opened as st:
        outcomes: dict[int, tuple[int, dict[str, Any], list[float] | None]] = {}
        if st is not None:
            st.bind(_store_fingerprint(setup, schedule, epsilon, step, iterations, projection))
            outcomes = {t: got for t in chosen if (got := _kept(st, t)) is not None}
        todo = [t for t in chosen if t not in outcomes]
        size = 1 if ex.parallelism == 1 else max(1, -(-len(todo) // (4 * ex.parallelism)))
        if st is not None:
            size = min(size, STORED_PARTITION)
        parts = [todo[i : i + size] for i in range(0, len(todo), size)]
        results = ex.map(
            _attack_partition,
            parts,
            ex.share(setup),
            schedule,
            epsilon,
            step,
            iterations,
            projection,
        )
        for part, res in zip(
            parts,
            _progress(results, desc="attacking test images", total=len(parts), enabled=progress),
        ):
            for t, outcome in zip(part, res):
                outcomes[t] = outcome
                if st is not None:
                    _keep(st, t, outcome)
    solved, runs = [], []
    example: dict[str, Any] = {}
    for t in chosen:
        k_ok, last, levels = outcomes[t]
        if not example and levels is not None:  # the first 1-image success in target order
            example = {
                "target": t,
                "train": last["train_indices"],
                "perturbed_levels": levels,
                "original_levels": atk.levels[last["train_indices"]].tolist(),
                "run": last,
            }
        solved.append(k_ok)
        runs.append(last)
    solved_arr = np.asarray(solved)
    ks = [k for k in (1, 2, 3, 5, 10) if k <= max_k]
    flips = {str(k): int(((solved_arr > 0) & (solved_arr <= k)).sum()) for k in ks}
    ok_runs = [r for r in runs if r["flipped"][0]]
    verified_all = all(all(r["verified"]) for r in ok_runs)

    Xp, Fp = task.x_train, setup.F.numpy()
    cp, cf = _mean_centroid_distance(Xp, task.y_train), _mean_centroid_distance(Fp, task.y_train)
    one = [r for r, k in zip(runs, solved) if k == 1]
    ratio_p = float(np.median([r["l2_pixels"] / cp for r in one])) if one else float("nan")
    ratio_f = float(np.median([r["l2_features"] / cf for r in one])) if one else float("nan")
    moved = [r for r in runs if r["l2_pixels"] > 0]  # an unchanged image has no ratio
    per_image_p, per_image_f, sensitivity = (
        (
            float(np.median([f(r) for r in moved]))
            for f in (
                lambda r: r["l2_pixels"] / np.sqrt(len(r["train_indices"])) / cp,
                lambda r: r["l2_features"] / np.sqrt(len(r["train_indices"])) / cf,
                lambda r: (r["l2_features"] / cf) / (r["l2_pixels"] / cp),
            )
        )
        if moved
        else (float("nan"),) * 3
    )

    multi: dict[str, Any] = {}
    if group_size > 0:
        multi = _multi_target(
            atk,
            inf_full,
            setup,
            correct,
            group_size,
            multi_k,
            epsilon,
            step,
            iterations,
            projection,
        )

    return AttackResult(
        digits=list(task.digits),
        n_train=len(task.y_train),
        n_test=len(task.y_test),
        n_correct=len(correct),
        l2=setup.l2,
        projection=projection,
        epsilon_levels=float(epsilon),
        step_levels=float(step),
        iterations=int(iterations),
        cnn=asdict(setup.cnn),
        grad_norm=setup.grad_norm,
        targets=chosen,
        flips_by_k=flips,
        flip_rate={k: v / len(chosen) for k, v in flips.items()},
        solved_with=solved,
        verified_all=verified_all,
        runs=runs,
        pixel_to_centroid=ratio_p,
        feature_to_centroid=ratio_f,
        pixel_to_centroid_per_image=per_image_p,
        feature_to_centroid_per_image=per_image_f,
        feature_sensitivity=sensitivity,
        multi=multi,
        example=example,
        config=c,
        resumed=len(chosen) - len(todo),
    )


def _multi_target(
    atk: TopLayerAttack,
    inf_full: Influence,
    setup: FeatureSetup,
    correct: np.ndarray,
    group_size: int,
    multi_k: Sequence[int],
    epsilon: float,
    step: float,
    iterations: int,
    projection: str,
) -> dict[str, Any]:
    """Paper Fig. 5: one set of perturbed training images against a group of similar test images.

    The group (the paper's 30 photos of one dog): the first correctly classified test image of the
    second digit (label −1) and its ``group_size − 1`` nearest correctly classified neighbours of
    the same label in feature space. f = their mean test loss; the top-k training images by
    ‖I_pert,loss‖₁ of f are perturbed for all ``iterations`` (no early stop), then we count flips.
    """
    yt = setup.task.y_test
    same = correct[yt[correct] < 0]
    if len(same) < group_size:
        return {}
    anchor = int(same[0])
    Ft = setup.F_test.numpy()
    dist = np.linalg.norm(Ft[same] - Ft[anchor], axis=1)
    group = [int(v) for v in same[np.argsort(dist, kind="stable")[:group_size]]]
    ranking = atk.rank_training(inf_full, group)
    out: dict[str, Any] = {"group": group, "anchor": anchor, "by_k": {}}
    for k in multi_k:
        run, _ = atk.run(
            group,
            ranking[:k],
            epsilon=epsilon,
            step=step,
            iterations=iterations,
            projection=projection,
            stop_on_flip=False,
        )
        out["by_k"][str(k)] = {
            "flipped": int(sum(run.flipped)),
            "verified": int(sum(run.verified)),
            "train_indices": run.train_indices,
            "iterations": run.iterations,
            "stopped": run.stopped,
            "linf_levels": run.linf_levels,
        }
    return out


__all__ = [
    "PAPER",
    "CELL_EDGE",
    "SCHEDULE",
    "AttackResult",
    "AttackRun",
    "TopLayerAttack",
    "full_influence",
    "run_attack",
]
