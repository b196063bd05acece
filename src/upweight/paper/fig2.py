"""Figure 2 of Koh & Liang (2017): influence vs actual leave-one-out retraining (§4.1, §4.2).

Three panels, each a scatter of the predicted change in the loss of one wrongly classified test
point when a training point z is removed, −I_up,loss(z, z_test)/n, against the actual change:

1. **cg** — 10-class logistic regression on MNIST (n = 55,000, p = 784 × 10 = 7,840 without a
   bias, as the paper's footnote 4 and its release code; L2 = 0.01), θ̂ the float64 minimum
   (``upweight.refit``); s_test solved exactly with CG; the k = 500 training points of largest
   |I_up,loss| are each removed and the model retrained to ‖∇R₋z‖∞ ≤ 1e-9 from θ̂.
2. **lissa** — the same, with s_test from LiSSA (Agarwal et al. 2016) at the paper's r = 10
   repeats of depth t = 5,000; the actual changes are panel 1's refits (the same points).
3. **cnn** — §4.2, non-convex and not converged: the paper's all-convolutional tanh network
   (release code ``All_CNN_C``: six 3×3/1×1 convolutions, strides 1,2,1,2,1,1, VALID padding,
   8 channels, a spatial mean and a 10 × 10 linear layer: 2,616 parameters; weight decay 0.001
   on the weights) trained with Adam on minibatches of 500 of the 5,500-image 10 % subset and
   stopped early at θ̃. Its Hessian is indefinite; influence uses the paper's damping 0.01 — or,
   if CG meets negative curvature even then, the smallest damping that makes H + δI positive
   definite (recorded). Actual: retrain **from θ̃** without z — the release code's minibatch Adam
   (``MinibatchAdamRetrainer``, batches shared by every run) or full-batch heavy-ball steps
   (``FixedStepRetrainer``) — minus the same retraining with z kept, so that the difference
   isolates the removal.

The refits of panel 1 are the expensive part (one full minimisation per point). With
``refit="newton"`` each is a Newton iteration preconditioned by the exact float64 Cholesky factor
of the full-data Hessian at θ̂ (built once from its 784 × 784 class-pair blocks), which reaches
‖∇R₋z‖∞ ≤ 1e-9 in a few gradient evaluations instead of the many L-BFGS iterations of
``upweight.refit``: the leave-one-out minimiser lies close to θ̂, where Newton converges
quadratically. The result is the same unique minimiser of the strictly convex LOO risk, and every
refit's final gradient norm is recorded (a refit that does not converge falls back to
``upweight.refit``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn

from .._executor import Executor
from .._progress import progress as _progress
from ..core import Data, Objective
from ..core.grads import risk_grad
from ..core.params import Params
from ..datasets._base import SplitData
from ..errors import InputError, NotPositiveDefiniteError
from ..influence import Influence
from ..loo import LOOComparison, RefitResult, leave_one_out, refit
from ..loo.compare import StoreLike
from ..solvers import CG, LiSSA
from ..solvers.spectrum import estimate_spectrum
from ..store import Store
from .config import CNN_TRAIN_SCHEDULES, Fig2Config
from .config import PANELS as PANELS  # re-exported: fig2.PANELS

PAPER: dict[str, Any] = {
    "logreg_n_train": 55_000,
    "logreg_p": 7_840,
    "logreg_l2": 0.01,
    "loo_k": 500,
    "lissa_repeats": 10,
    "lissa_depth": 5_000,
    "cnn_n_train": 5_500,
    "cnn_p": 2_616,
    "cnn_damping": 0.01,
    "cnn_loo_k": 100,
    "cnn_train_iterations": 500_000,
    "cnn_retrain_steps": 30_000,
    "cnn_pearson": 0.86,
    "cnn_pearson_notebook": 0.875,
    "claim_logreg": "points lie on the diagonal (Fig. 2 left and middle)",
}


# ── results ───────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Fig2Panel:
    """One scatter of Fig. 2: predicted (−I_up,loss/n) vs actual change of the test loss."""

    name: str
    solver: str
    k: int
    train_ids: list[int]
    predicted: list[float]
    actual: list[float]
    pearson: float
    spearman: float
    slope: float
    intercept: float
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    resumed: int = 0  # retrainings read from a store kept by an earlier, interrupted run

    @classmethod
    def from_comparison(
        cls, name: str, solver: str, cmp: LOOComparison, seconds: float, **details: Any
    ) -> Fig2Panel:
        return cls(
            name=name,
            solver=solver,
            k=len(cmp.train_ids),
            train_ids=[int(i) for i in cmp.train_ids],
            predicted=[float(v) for v in cmp.predicted],
            actual=[float(v) for v in cmp.actual],
            pearson=cmp.pearson,
            spearman=cmp.spearman,
            slope=cmp.slope,
            intercept=cmp.intercept,
            seconds=seconds,
            details=details,
            resumed=int(cmp.provenance.get("resumed_from_store", 0)),
        )


@dataclass(frozen=True)
class Fig2Result:
    """Every number of the Fig. 2 reproduction; ``panels`` maps "cg"/"lissa"/"cnn" to a panel."""

    panels: dict[str, Fig2Panel]
    config: Fig2Config
    logreg: dict[str, Any]
    cnn: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, floats, strings); ``settings`` is the run's ``Fig2Config``."""
        settings = {**asdict(self.config), "panels": list(self.config.panels)}
        return {
            "panels": {k: asdict(v) for k, v in self.panels.items()},
            "settings": settings,
            "logreg": self.logreg,
            "cnn": self.cnn,
        }


def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and the least-squares line actual ≈ slope·predicted + intercept."""
    fit = scipy.stats.linregress(predicted, actual)
    return {
        "pearson": float(scipy.stats.pearsonr(predicted, actual)[0]),
        "spearman": float(scipy.stats.spearmanr(predicted, actual)[0]),
        "slope": float(fit.slope),
        "intercept": float(fit.intercept),
    }


# ── panel 1–2: multinomial logistic regression ───────────────────────────────────────
def fit_logreg(
    X: torch.Tensor, y: torch.Tensor, l2: float, *, gtol: float = 1e-9
) -> tuple[nn.Linear, dict[str, Any]]:
    """10-class logistic regression without bias (p = d·K), trained to the float64 minimum of R."""
    classes = int(y.max()) + 1
    model = nn.Linear(X.shape[1], classes, bias=False).double().eval()
    with torch.no_grad():
        model.weight.zero_()
    t0 = time.perf_counter()
    res = refit(Objective(model, "cross_entropy", l2=l2), Data.from_any((X, y)), gtol=gtol)
    with torch.no_grad():
        model.weight.copy_(res.params["weight"])
    return model, {
        "fit_seconds": time.perf_counter() - t0,
        "fit_iterations": res.iterations,
        "grad_norm": res.grad_norm,
    }


def multinomial_hessian(
    X: torch.Tensor, W: torch.Tensor, l2: float, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """H = ∇²R at W for R = mean cross-entropy of softmax(XWᵀ) + (l2/2)‖W‖², dense (K·d × K·d),
    float64.

    Block (c, e) is (1/n) Xᵀ diag(p_c δ_ce − p_c p_e) X (+ l2·I on the diagonal), in the row-major
    order of ``W`` (index c·d + j) that upweight's parameter space uses. The Gram products run in
    ``dtype`` (float32: twice as fast; the matrix only preconditions the refits).
    """
    n, d = X.shape
    K = W.shape[0]
    with torch.no_grad():
        P = torch.softmax(X.double() @ W.double().T, dim=1)
        Xc = X.to(dtype)
        H = torch.empty(K * d, K * d, dtype=torch.float64)
        for c in range(K):
            for e in range(c, K):
                w = (P[:, c] * ((1.0 if c == e else 0.0) - P[:, e])).to(dtype)
                B = ((Xc * w[:, None]).T @ Xc).double() / n
                H[c * d : (c + 1) * d, e * d : (e + 1) * d] = B
                if e != c:
                    H[e * d : (e + 1) * d, c * d : (c + 1) * d] = B.T
        H.diagonal().add_(l2)
    return H


@dataclass
class NewtonRefitter:
    """Leave-one-out refits of a convex objective by Newton steps with a fixed Cholesky factor.

    Minimises R₋z(θ) = (1/n) Σ_{j≠z} L(z_j, θ) + (l2/2)‖θ‖² (the same n, as ``upweight.refit``):
    θ ← θ − t·H⁻¹∇R₋z(θ), t halved until ‖∇R₋z‖ falls, H the Hessian at θ̂ (``chol`` its factor).
    Stops at ‖∇R₋z‖∞ ≤ gtol; after ``maxiter`` steps it hands over to ``upweight.refit``.
    Returns a ``RefitResult`` (iterations = gradient evaluations, the fallback's included). Usable
    as ``leave_one_out(..., train_fn=refitter)``.
    """

    objective: Objective
    n: int
    chol: torch.Tensor
    gtol: float = 1e-9
    maxiter: int = 12
    batch_size: int = 4096

    def _grad(self, theta: torch.Tensor, data: Data) -> torch.Tensor:
        space = self.objective.space
        w = torch.full((len(data),), len(data) / self.n, dtype=torch.float64)
        return risk_grad(self.objective, space.unflatten(theta), data, self.batch_size, w)

    def __call__(self, objective: Objective, data: Data, init: Params) -> RefitResult:
        space = self.objective.space
        data = data.to(torch.float64)
        theta = space.flatten({k: init[k].to(torch.float64) for k in space.names})
        g = self._grad(theta, data)
        evals = 1
        for _ in range(self.maxiter):
            if float(g.abs().max()) <= self.gtol:
                break
            step = torch.cholesky_solve(g[:, None], self.chol)[:, 0]
            t = 1.0
            for _ in range(6):
                cand = theta - t * step
                g_new = self._grad(cand, data)
                evals += 1
                if float(g_new.norm()) < float(g.norm()):
                    break
                t *= 0.5
            else:
                break
            theta, g = cand, g_new
        if float(g.abs().max()) > self.gtol:  # not there: the library's L-BFGS finishes the job
            res = refit(
                objective,
                data,
                init=space.unflatten(theta),
                gtol=self.gtol,
                weights=torch.full((len(data),), len(data) / self.n, dtype=torch.float64),
            )
            theta, g, evals = (
                space.flatten(res.params),
                torch.tensor([res.grad_norm]),
                evals + res.iterations,
            )
        return RefitResult(space.unflatten(theta), float(g.norm()), evals)


def pick_misclassified(
    predict: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    test_index: int | None,
) -> tuple[int, bool]:
    """The given test index (and whether it is misclassified), or the first misclassified one."""
    with torch.no_grad():
        pred = predict(X)
    wrong = (pred != y).nonzero().squeeze(1)
    if test_index is None:
        if len(wrong) == 0:
            raise InputError("No test point is misclassified; pass --test-index to pick one.")
        return int(wrong[0]), True
    if not 0 <= test_index < len(y):
        raise InputError(
            f"test index {test_index} is outside the {len(y)} test points; pass 0 … {len(y) - 1}."
        )
    return int(test_index), bool(pred[test_index] != y[test_index])


def run_logreg_panels(
    data: SplitData,
    *,
    panels: Sequence[str] = ("cg", "lissa"),
    l2: float = 0.01,
    loo_k: int = 500,
    train_size: int | None = None,
    test_index: int | None = None,
    lissa_depth: int = 5_000,
    lissa_repeats: int = 10,
    lissa_batch_size: int = 256,
    lissa_scale: float | str = "auto",
    refit_method: str = "auto",
    seed: int = 0,
    progress: bool = True,
    store: StoreLike = None,
    executor: Executor | None = None,
) -> tuple[dict[str, Fig2Panel], dict[str, Any]]:
    """Fig. 2 left (CG) and middle (LiSSA) on 10-class MNIST logistic regression.

    ``store`` keeps each leave-one-out refit as it finishes (a rerun resumes); ``executor`` runs
    the refits on Dask workers (see ``leave_one_out``)."""
    X = torch.tensor(data.x_train, dtype=torch.float64)
    y = torch.tensor(data.y_train, dtype=torch.int64)
    if train_size is not None:
        if not 10 <= train_size <= len(y):
            raise InputError(f"--train-size must be between 10 and {len(y)}; got {train_size}.")
        keep = np.sort(np.random.default_rng(seed).choice(len(y), size=train_size, replace=False))
        X, y = X[keep], y[keep]
    n = len(y)
    if not 3 <= loo_k <= n:
        raise InputError(f"--loo-k must be between 3 and the {n} training points; got {loo_k}.")
    Xt = torch.tensor(data.x_test, dtype=torch.float64)
    yt = torch.tensor(data.y_test, dtype=torch.int64)
    model, info = fit_logreg(X, y, l2)
    ti, wrong = pick_misclassified(lambda A: (A @ model.weight.T).argmax(1), Xt, yt, test_index)
    with torch.no_grad():
        acc = float(((Xt @ model.weight.T).argmax(1) == yt).double().mean())
        logits = Xt[ti] @ model.weight.T
    obj = Objective(model, "cross_entropy", l2=l2)
    test = (Xt[ti : ti + 1], yt[ti : ti + 1])
    info.update(
        n_train=n,
        p=obj.p,
        l2=l2,
        test_index=ti,
        test_misclassified=wrong,
        test_label=int(yt[ti]),
        test_prediction=int(logits.argmax()),
        test_loss=float(torch.nn.functional.cross_entropy(logits[None], yt[ti : ti + 1])),
        test_accuracy=acc,
    )

    t0 = time.perf_counter()
    inf_cg = Influence(obj, solver=CG(rtol=1e-8), progress=progress).fit((X, y))
    scores_cg = inf_cg.up_loss(test)
    info.update(
        cg_iterations=scores_cg.provenance["iterations"],
        cg_residual=scores_cg.provenance["residual_max"],
        cg_seconds=time.perf_counter() - t0,
    )
    top = np.argsort(-np.abs(scores_cg.values[0]), kind="stable")[:loo_k]

    method = refit_method
    if method == "auto":
        method = "newton" if loo_k >= 50 else "lbfgs"
    if method not in ("newton", "lbfgs"):
        raise InputError(f"refit method must be 'auto', 'newton' or 'lbfgs'; got {refit_method!r}.")
    train_fn = None
    if method == "newton":
        t1 = time.perf_counter()
        H = multinomial_hessian(X, model.weight.detach(), l2)
        chol = torch.linalg.cholesky(H)
        del H
        train_fn = NewtonRefitter(obj, n, chol)
        info["hessian_seconds"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    cmp_cg = leave_one_out(
        inf_cg,
        test,
        ids=top,
        scores=scores_cg,
        train_fn=train_fn,
        progress=progress,
        store=store,
        executor=executor,
    )
    refit_seconds = time.perf_counter() - t1
    if train_fn is not None:
        info["refit_evaluations_mean"] = cmp_cg.provenance["retrain_iterations_mean"]
    info.update(
        refit_method=method,
        refit_seconds=refit_seconds,
        refit_seconds_per_point=refit_seconds / len(top),
        refit_grad_norm_max=cmp_cg.retrain_grad_norm,
    )
    out: dict[str, Fig2Panel] = {}
    if "cg" in panels:
        out["cg"] = Fig2Panel.from_comparison(
            "cg", "CG (rtol 1e-8)", cmp_cg, info["cg_seconds"] + refit_seconds
        )

    if "lissa" in panels:
        t2 = time.perf_counter()
        lissa = LiSSA(
            depth=lissa_depth,
            repeats=lissa_repeats,
            batch_size=lissa_batch_size,
            scale=lissa_scale,
            seed=seed,
            progress=progress,
        )
        inf_l = Influence(obj, solver=lissa, on_inaccurate="warn", progress=progress).fit((X, y))
        scores_l = inf_l.up_loss(test)
        pred_l = -scores_l.values[0, top] / n
        agree = agreement(pred_l, cmp_cg.actual)
        own_top = np.argsort(-np.abs(scores_l.values[0]), kind="stable")[:loo_k]
        vs_exact = agreement(scores_l.values[0], scores_cg.values[0])
        cmp_l = dataclasses.replace(cmp_cg, predicted=pred_l, **agree)
        prov = scores_l.provenance
        out["lissa"] = Fig2Panel.from_comparison(
            "lissa",
            f"LiSSA (r={lissa_repeats}, t={lissa_depth}, batch {lissa_batch_size})",
            cmp_l,
            time.perf_counter() - t2,
            scale=prov.get("solver_scale"),
            residual=prov.get("residual_max"),
            truncation=prov.get("solver_truncation"),
            top_k_overlap_with_cg=float(len(np.intersect1d(own_top, top)) / len(top)),
            pearson_vs_cg_all_points=vs_exact["pearson"],
            slope_vs_cg_all_points=vs_exact["slope"],
        )
    return out, info


# ── panel 3: the all-convolutional tanh network (§4.2) ────────────────────────────────
class AllConvTanh(nn.Module):
    """Koh & Liang's small all-convolutional network (after Springenberg et al. 2014), 2,616
    parameters.

    28×28 input → conv3 s1 → conv3 s2 → conv3 s1 → conv3 s2 → conv3 s1 → conv1 (10 channels), each
    with tanh and VALID padding (26, 12, 10, 4, 2, 2 pixels), a spatial mean, and a 10 → 10 linear
    layer.
    """

    def __init__(self, hidden: int = 8, classes: int = 10) -> None:
        super().__init__()
        spec = [
            (1, hidden, 3, 1),
            (hidden, hidden, 3, 2),
            (hidden, hidden, 3, 1),
            (hidden, hidden, 3, 2),
            (hidden, hidden, 3, 1),
            (hidden, 10, 1, 1),
        ]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=s) for i, o, k, s in spec)
        self.fc = nn.Linear(10, classes)
        for m in [*self.convs, self.fc]:  # the release code's truncated normals, zero biases
            fan_in = m.weight[0].numel()
            std = (2.0 if isinstance(m, nn.Conv2d) else 1.0) / math.sqrt(fan_in)
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, 1, 28, 28)
        for conv in self.convs:
            h = torch.tanh(conv(h))
        return self.fc(h.mean(dim=(2, 3)))


def _set_params(model: nn.Module, params: Params) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])


def _weight_decay(model: nn.Module, l2: float) -> torch.Tensor:
    return (
        0.5
        * l2
        * sum((p * p).sum() for name, p in model.named_parameters() if name.endswith("weight"))
    )


#: the release code's learning-rate decay: ×0.1 from the first epoch here, ×0.01 from the second
RELEASE_DECAY_EPOCHS = (10_000, 20_000)


def release_lr_factor(step: int, n: int, batch_size: int) -> float:
    """The release code's learning-rate multiplier at ``step`` (``genericNeuralNet``'s
    ``update_learning_rate``): 1 before epoch 10,000, 0.1 before epoch 20,000, 0.01 after, where an
    epoch is ⌊n / batch_size⌋ steps (11 for the paper's 5,500 images in batches of 500: the rate
    falls at steps 110,000 and 220,000 of the 500,000)."""
    epoch = step // max(n // batch_size, 1)
    first, second = RELEASE_DECAY_EPOCHS
    return 1.0 if epoch < first else 0.1 if epoch < second else 0.01


def train_cnn(
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    schedule: str = "constant",
    progress: bool = True,
) -> tuple[AllConvTanh, dict[str, Any]]:
    """Adam on minibatches (the paper's optimiser and batch size 500), stopped after ``steps``: θ̃,
    and the optimiser's state (its moment estimates), which the release code's retraining resumes.
    ``schedule``: "constant" (``lr`` throughout) or "release" (``lr`` × ``release_lr_factor``, the
    release code's decay). The network is built on ``X``'s device, where it trains.
    """
    if schedule not in CNN_TRAIN_SCHEDULES:
        raise InputError(
            f"--cnn-train-schedule must be one of {CNN_TRAIN_SCHEDULES}; got {schedule!r}."
        )
    torch.manual_seed(seed)
    model = AllConvTanh().to(X.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(y)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 1.0 if schedule == "constant" else release_lr_factor(step, n, batch_size)
    )
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same batches on every device
    for _ in _progress(range(steps), desc="training the CNN", enabled=progress):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen).to(X.device)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx]) + _weight_decay(model, l2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return model.eval(), opt.state_dict()


@dataclass
class MinibatchAdamRetrainer:
    """The release code's retraining: Adam from θ̃ and its moment estimates, on minibatches, for a
    fixed number of steps (Koh & Liang's CNN: 30k steps of 500 images at the checkpoint's decayed
    learning rate, 1e-4 × 0.01).

    Every run draws the same sequence of minibatches — positions of the *full* training set from one
    generator seeded with ``seed`` — and a run without z drops z from the batches that hold it; each
    batch's loss is the sum over the points it keeps divided by ``batch_size``, the minibatch
    estimate of (1/n)Σ_{kept} L. So the kept run and a removal run differ only by z's terms, and
    their difference is the removal's effect, not minibatch noise (the release code drew fresh
    batches per run and compared with θ̃). Usable as ``leave_one_out(..., train_fn=retrainer)``.
    """

    model: nn.Module
    optimizer_state: dict[str, Any]
    ids: np.ndarray
    l2: float
    steps: int
    lr: float
    batch_size: int = 500
    seed: int = 0

    def config(self) -> dict[str, Any]:
        """The settings a store's fingerprint records (θ̃ itself is fingerprinted by the store)."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "l2": self.l2,
            "optimizer_state_sha256": _state_sha256(self.optimizer_state),
        }

    def __call__(self, objective: Objective, data: Data, init: Params) -> Params:
        n = len(self.ids)
        keep = torch.from_numpy(np.isin(self.ids, data.ids.cpu().numpy()))
        row = torch.full((n,), -1, dtype=torch.long)
        row[keep] = torch.arange(int(keep.sum()))  # full position → row of ``data``
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        opt.load_state_dict(copy.deepcopy(self.optimizer_state))
        for group in opt.param_groups:
            group["lr"] = self.lr
        gen = torch.Generator().manual_seed(self.seed)

        def batch_loss() -> torch.Tensor:
            idx = row[torch.randint(n, (min(self.batch_size, n),), generator=gen)]
            idx = idx[idx >= 0].to(data.X.device)
            loss = (
                nn.functional.cross_entropy(self.model(data.X[idx]), data.y[idx], reduction="sum")
                / self.batch_size
            )
            return loss + _weight_decay(self.model, self.l2)

        return _steps_from(self.model, init, opt, batch_loss, self.steps)


def _steps_from(
    model: nn.Module,
    init: Params,
    opt: torch.optim.Optimizer,
    loss: Callable[[], torch.Tensor],
    steps: int,
) -> Params:
    """θ after ``steps`` steps of ``opt`` on ``loss()`` from θ = ``init``; the model is put back to
    ``init``."""
    _set_params(model, init)
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    out = {k: p.detach().clone() for k, p in model.named_parameters()}
    _set_params(model, init)
    return out


def _state_sha256(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state.get("state", {})):
        for name in sorted(state["state"][key]):
            v = state["state"][key][name]
            h.update(f"{key}.{name}".encode())
            h.update(v.detach().cpu().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    return h.hexdigest()


@dataclass
class FixedStepRetrainer:
    """Retrain from θ̃ for a fixed number of deterministic full-batch steps (heavy-ball momentum).

    Minimises (1/n)Σ_{kept} L + (l2/2)‖weights‖² with the original n, so that removing z only drops
    its term. Deterministic: the same data give the same θ, and the run with z kept is the baseline
    that the removal is compared with. Usable as ``leave_one_out(..., train_fn=retrainer)``.
    """

    model: nn.Module
    n: int
    l2: float
    steps: int
    lr: float
    momentum: float = 0.9

    def __call__(self, objective: Objective, data: Data, init: Params) -> Params:
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)

        def full_loss() -> torch.Tensor:
            loss = nn.functional.cross_entropy(self.model(data.X), data.y, reduction="sum") / self.n
            return loss + _weight_decay(self.model, self.l2)

        return _steps_from(self.model, init, opt, full_loss, self.steps)


def run_cnn_panel(
    data: SplitData,
    *,
    loo_k: int = 100,
    train_size: int | None = None,
    l2: float = 0.001,
    damping: float = 0.01,
    train_steps: int = 3_000,
    train_lr: float = 3e-3,
    batch_size: int = 500,
    retrain_steps: int | None = None,
    retrain_lr: float | None = None,
    retrain: str = "adam",
    test_index: int | None = None,
    train_schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
    store: StoreLike = None,
    executor: Executor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Fig2Panel, dict[str, Any]]:
    """Fig. 2 right: the non-convex, non-converged CNN with damping (§4.2).

    θ̃: ``train_steps`` Adam steps at ``train_lr`` with ``train_schedule`` (``train_cnn``); the
    paper's is 500,000 steps at 1e-4 with the release code's decay (``"release"``). ``device``:
    where the network, the data, the influence computation and every retraining run (e.g.
    ``"cuda"``); the minibatches are drawn on the CPU, so they are the same on every device.

    ``retrain``: "adam" — ``MinibatchAdamRetrainer``, the release code's protocol (default 1,000
    steps at lr = 1% of ``train_lr``, as the release code's decayed rate: each parameter moves at
    most ≈ 0.03, as in the paper's 30k steps at 1e-6); "momentum" — ``FixedStepRetrainer``,
    deterministic full-batch heavy-ball steps (default 100 steps at lr 1/λmax(H)). ``store`` keeps
    each retraining as it finishes (a rerun resumes); ``executor`` runs them on Dask workers (see
    ``leave_one_out``)."""
    if retrain not in ("momentum", "adam"):
        raise InputError(f"--cnn-retrain must be 'adam' or 'momentum'; got {retrain!r}.")
    if retrain_steps is None:
        retrain_steps = 1_000 if retrain == "adam" else 100
    X = torch.tensor(data.x_train, dtype=torch.float32).reshape(len(data.x_train), -1)
    y = torch.tensor(data.y_train, dtype=torch.int64)
    if train_size is not None:
        if not 10 <= train_size <= len(y):
            raise InputError(f"--cnn-train-size must be between 10 and {len(y)}; got {train_size}.")
        X, y = X[:train_size], y[:train_size]
    n = len(y)
    if not 3 <= loo_k <= n:
        raise InputError(f"--cnn-loo-k must be between 3 and the {n} training points; got {loo_k}.")
    Xt = torch.tensor(data.x_test, dtype=torch.float32).reshape(len(data.x_test), -1)
    yt = torch.tensor(data.y_test, dtype=torch.int64)
    device = torch.device(device)
    X, y, Xt, yt = X.to(device), y.to(device), Xt.to(device), yt.to(device)
    t0 = time.perf_counter()
    model, adam_state = train_cnn(
        X,
        y,
        l2=l2,
        steps=train_steps,
        lr=train_lr,
        batch_size=batch_size,
        seed=seed,
        schedule=train_schedule,
        progress=progress,
    )
    train_seconds = time.perf_counter() - t0
    ti, wrong = pick_misclassified(lambda A: model(A).argmax(1), Xt, yt, test_index)
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(X), y))
        test_acc = float((model(Xt).argmax(1) == yt).float().mean())
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    obj = Objective(model, "cross_entropy", l2=l2, l2_exclude=biases)
    test = (Xt[ti : ti + 1], yt[ti : ti + 1])

    # H(θ̃) + δI: the paper's δ = 0.01 if CG can use it, else the smallest round δ that makes it PD
    t1 = time.perf_counter()
    inf = Influence(
        obj, solver=CG(rtol=1e-5, maxiter=1000), damping=damping, grad_tol=1e12, progress=progress
    ).fit((X, y))
    spec = estimate_spectrum(inf.curvature_, k=30, seed=seed)
    used = damping
    note = "the paper's damping"
    try:
        scores = inf.up_loss(test)
    except NotPositiveDefiniteError as err:
        used = max(spec.needed_damping(damping), float(err.suggested_damping or 0.0))
        note = (
            f"CG met negative curvature with δ={damping:g} (Lanczos λmin(H+δI) ≈"
            f" {spec.lambda_min:.3g}); used δ={used:.2g}, the smallest round damping that makes"
            " H+δI positive definite"
        )
        inf = Influence(
            obj, solver=CG(rtol=1e-5, maxiter=1000), damping=used, grad_tol=1e12, progress=progress
        ).fit((X, y))
        scores = inf.up_loss(test)
    influence_seconds = time.perf_counter() - t1
    top = np.argsort(-np.abs(scores.values[0]), kind="stable")[:loo_k]

    # actual: retrain from θ̃ with and without z for the same fixed number of steps
    t2 = time.perf_counter()
    retrainer: FixedStepRetrainer | MinibatchAdamRetrainer
    if retrain == "momentum":
        # step size 1/λmax(H): stable for heavy-ball momentum 0.9 (which needs lr < 3.8/λmax)
        lr = retrain_lr if retrain_lr is not None else 1.0 / max(spec.lambda_max - damping, 1e-3)
        retrainer = FixedStepRetrainer(model, n, l2, retrain_steps, lr)
    else:
        lr = retrain_lr if retrain_lr is not None else 0.01 * train_lr
        retrainer = MinibatchAdamRetrainer(
            model, adam_state, np.arange(n), l2, retrain_steps, lr, batch_size, seed
        )
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    kept = retrainer(obj, Data.from_any((X, y)), theta)

    def loss_at(params: Params) -> float:
        with torch.no_grad():
            return float(obj.measurements(params, *test).sum())

    f_tilde, f_kept = loss_at(theta), loss_at(kept)
    cmp = leave_one_out(
        inf,
        test,
        ids=top,
        scores=scores,
        train_fn=retrainer,
        progress=progress,
        store=store,
        executor=executor,
    )
    actual = np.asarray(cmp.actual) - (f_kept - f_tilde)  # f(θ₋z) − f(θ_kept)
    vs_theta = agreement(cmp.predicted, cmp.actual)  # the release code's f(θ₋z) − f(θ̃)
    cmp = dataclasses.replace(cmp, actual=actual, **agreement(cmp.predicted, actual))
    retrain_seconds = time.perf_counter() - t2
    info = {
        "n_train": n,
        "p": obj.p,
        "l2": l2,
        "train_steps": train_steps,
        "train_lr": train_lr,
        "train_schedule": train_schedule,
        "device": str(device),
        "batch_size": batch_size,
        "train_seconds": train_seconds,
        "train_loss": train_loss,
        "test_accuracy": test_acc,
        "grad_norm": inf.grad_norm_,
        "test_index": ti,
        "test_misclassified": wrong,
        "test_label": int(yt[ti]),
        "test_loss": f_tilde,
        "damping_requested": damping,
        "damping_used": used,
        "damping_note": note,
        "lambda_min_H_plus_damping": spec.lambda_min,
        "lambda_max_H_plus_damping": spec.lambda_max,
        "cg_iterations": scores.provenance["iterations"],
        "cg_residual": scores.provenance["residual_max"],
        "influence_seconds": influence_seconds,
        "retrain_steps": retrain_steps,
        "retrain_lr": lr,
        "retrain": retrain,
        "retrain_momentum": getattr(retrainer, "momentum", None),
        "retrain_seconds": retrain_seconds,
        "retrain_seconds_per_point": retrain_seconds / (len(top) + 1),
        "test_loss_drift_kept_retraining": f_kept - f_tilde,
        "pearson_vs_theta_tilde": vs_theta["pearson"],
    }
    panel = Fig2Panel.from_comparison(
        "cnn",
        f"CG, damping {used:g}",
        cmp,
        train_seconds + influence_seconds + retrain_seconds,
        damping=used,
    )
    return panel, info


def _panel_store(
    store: str | os.PathLike[str] | None, panel: str, fresh: bool
) -> AbstractContextManager[Store | None]:
    """The panel's retraining store for a ``with`` block (closed at its end), or ``None``."""
    return nullcontext(None) if store is None else Store(Path(store) / panel, overwrite=fresh)


def run_fig2(
    mnist: SplitData | None,
    mnist_small: SplitData | None,
    config: Fig2Config | None = None,
    *,
    progress: bool = True,
    store: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    executor: Executor | None = None,
    device: str | torch.device = "cpu",
) -> Fig2Result:
    """All panels of Fig. 2 that ``config`` (default ``Fig2Config()``: the paper's settings) asks
    for.

    ``mnist``: ``load_mnist(path)``; ``mnist_small``: ``load_mnist(path, subset="small10pct")``
    (either may be None if its panels are not requested). ``store``: a folder that keeps every
    leave-one-out retraining as it finishes, ``<store>/logreg`` and ``<store>/cnn``; a rerun
    resumes them (``fresh=True`` discards them first). ``executor``: where the retrainings run
    (``upweight.distributed.DaskExecutor``: on its workers). ``device``: where the CNN panel
    computes (``run_cnn_panel``)."""
    c = config if config is not None else Fig2Config()
    out: dict[str, Fig2Panel] = {}
    logreg: dict[str, Any] = {}
    cnn: dict[str, Any] = {}
    if "cg" in c.panels or "lissa" in c.panels:
        if mnist is None:
            raise InputError(
                "the cg/lissa panels need the 55,000-image MNIST split (load_mnist(path))."
            )
        with _panel_store(store, "logreg", fresh) as st:
            res, logreg = run_logreg_panels(
                mnist,
                panels=c.panels,
                loo_k=c.loo_k,
                train_size=c.train_size,
                test_index=c.test_index,
                lissa_depth=c.lissa_depth,
                lissa_repeats=c.lissa_repeats,
                lissa_batch_size=c.lissa_batch_size,
                lissa_scale="auto" if c.lissa_scale is None else c.lissa_scale,
                refit_method=c.refit_method,
                seed=c.seed,
                progress=progress,
                store=st,
                executor=executor,
            )
        out.update(res)
    if "cnn" in c.panels:
        if mnist_small is None:
            raise InputError(
                "the cnn panel needs the 10 % subset (load_mnist(path, subset='small10pct'))."
            )
        with _panel_store(store, "cnn", fresh) as st:
            out["cnn"], cnn = run_cnn_panel(
                mnist_small,
                loo_k=c.cnn_loo_k,
                train_size=c.cnn_train_size,
                damping=c.cnn_damping,
                train_steps=c.cnn_train_steps,
                train_lr=c.cnn_train_lr,
                retrain_steps=c.cnn_retrain_steps,
                retrain_lr=c.cnn_retrain_lr,
                retrain=c.cnn_retrain,
                test_index=c.cnn_test_index,
                train_schedule=c.cnn_train_schedule,
                seed=c.seed,
                progress=progress,
                store=st,
                executor=executor,
                device=device,
            )
    return Fig2Result(panels=out, config=c, logreg=logreg, cnn=cnn)
