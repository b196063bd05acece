"""``upweight explain``: why did the model get this test image wrong? (Koh & Liang 2017, §5.1–5.2)

Trains binary logistic regression (no bias, L2 = 0.01 as in the paper) on the bundled MNIST
1-vs-7 data — or on an ``.npz`` you pass — to the minimum in float64, picks a misclassified
test image, lists the training images that helped and hurt it most (I_up,loss and the predicted
change in test loss if each were removed), checks those predictions against actual
leave-one-out retraining (the paper's Fig. 2) and writes a PNG of it all.

This module is the only place in upweight that prints.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import errors
from .._version import __version__
from ._scheduler import check_scheduler, open_executor

# ── data ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class _Split:
    """Features float64 (n, d), labels int64 in {−1, +1}, and how to show them."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, ...] | None
    class_names: dict[int, str]  # label (−1/+1) → what it stands for, e.g. {+1: "1", −1: "7"}


def _load_bundled() -> _Split:
    from ..datasets import load_mnist_1v7

    d = load_mnist_1v7()
    return _Split(
        "MNIST 1 vs 7 (bundled)", d.x_train.astype(np.float64), d.y_train.astype(np.int64),
        d.x_test.astype(np.float64), d.y_test.astype(np.int64), d.image_shape, {1: "digit 1", -1: "digit 7"},
    )


_DATA_EXPECTED = ("an .npz written by np.savez with numeric arrays x_train, y_train, x_test, y_test "
                  "(labels in {-1, +1} or {0, 1}); leave --data out for the bundled MNIST 1-vs-7 set")


def _load_npz(path: str) -> _Split:
    from ..datasets._base import load_npz

    p = Path(path)
    if not p.exists():
        raise errors.InputError(f"--data {path}: no such file. Pass {_DATA_EXPECTED}.")
    if not p.is_file():
        raise errors.InputError(f"--data {path}: that is a folder, not a file. Pass {_DATA_EXPECTED}.")
    arrays = load_npz(p, "--data", ("x_train", "y_train", "x_test", "y_test"), _DATA_EXPECTED)
    xs, ys = {}, {}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            raise errors.DtypeError(f"--data {path}: x_{part} and y_{part} must be numeric; got {x.dtype} and {y.dtype}.")
        if x.ndim < 2 or len(x) == 0:
            raise errors.ShapeError(f"--data {path}: x_{part} must have shape (n, features…) with n ≥ 1; got {x.shape}.")
        y = y.reshape(len(y), -1) if y.ndim > 1 else y
        if y.ndim > 1 and y.shape[1] != 1:
            raise errors.ShapeError(f"--data {path}: y_{part} must hold one label per point; got shape {arrays[f'y_{part}'].shape}.")
        y = y.reshape(-1)
        if len(y) != len(x):
            raise errors.ShapeError(f"--data {path}: x_{part} has {len(x)} rows but y_{part} has {len(y)}.")
        xs[part], ys[part] = x, y
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise errors.ShapeError(
            f"--data {path}: x_train has points of shape {xs['train'].shape[1:]} but x_test {xs['test'].shape[1:]}."
        )
    labels = set(np.unique(np.concatenate([ys["train"], ys["test"]])).tolist())
    if labels <= {-1, 1}:
        names: dict[int, str] = {}
    elif labels <= {0, 1}:
        names = {1: "was 1", -1: "was 0"}
    else:
        shown = sorted(labels)[:6]
        raise errors.InputError(
            f"--data {path}: labels must be in {{-1, +1}} or {{0, 1}} (binary logistic regression); found {shown}"
            f"{' …' if len(labels) > 6 else ''}."
        )

    def feats(x: np.ndarray) -> np.ndarray:
        out = x.reshape(len(x), -1).astype(np.float64)
        return out / 255.0 if x.dtype == np.uint8 else out

    def labs(y: np.ndarray) -> np.ndarray:
        return np.where(y == 1, 1, -1).astype(np.int64)

    shape = tuple(int(s) for s in xs["train"].shape[1:])
    d = int(np.prod(shape))
    if len(shape) == 1:
        side = math.isqrt(d)
        image_shape: tuple[int, ...] | None = (side, side) if side * side == d else None
    else:
        image_shape = shape
    return _Split(p.name, feats(xs["train"]), labs(ys["train"]), feats(xs["test"]), labs(ys["test"]), image_shape, names)


# ── argument parsing ──────────────────────────────────────────────────────────────────


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {s!r}")
    return v


def _pos_float(s: str) -> float:
    v = _nonneg_float(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def _int_at_least(low: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {low}, got {s!r}")
        return v

    parse.__name__ = f"int≥{low}"
    return parse


def _scale(s: str) -> float | str:
    return "auto" if s == "auto" else _pos_float(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upweight",
        description="Influence functions (Koh & Liang, ICML 2017): which training points made the model predict this?",
        epilog=("Exit status: 0 done; 2 a usage error or an error you can fix (bad input, an unusable output path, "
                "a full disk, a missing optional package), reported as one line 'upweight: error: …'; 1 an "
                "internal error (a bug in upweight), shown with its traceback; 130 interrupted."),
    )
    parser.add_argument("--version", action="version", version=f"upweight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = sub.add_parser(
        "explain",
        help="explain a misclassified test image of binary logistic regression (bundled MNIST 1 vs 7)",
        description=(
            "Train binary logistic regression (no bias) to the minimum in float64, pick a misclassified "
            "test point, list the most helpful and most harmful training points by I_up,loss, compare the "
            "predicted removal effects with actual leave-one-out retraining, and write a PNG. "
            "I_up,loss > 0: upweighting the training point raises the test loss (harmful); "
            "removal effect = −I_up,loss/n: predicted change in the test loss if the point is removed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("--data", metavar="PATH.npz", default=None,
                    help="npz with x_train, y_train, x_test, y_test; labels in {-1,+1} or {0,1} (0 → -1); "
                         "uint8 features are scaled to [0, 1]. Default: the bundled MNIST 1-vs-7 set")
    ex.add_argument("--test-index", type=int, default=None, metavar="I",
                    help="test point to explain (default: the first misclassified one)")
    ex.add_argument("--l2", type=_nonneg_float, default=0.01, help="L2 strength λ in R(θ) = mean loss + λ/2‖θ‖²")
    ex.add_argument("--solver", choices=("direct", "cg", "kfac-cg", "nystrom-cg", "lissa", "auto", "arnoldi",
                                          "kfac", "ekfac", "nystrom", "datainf"), default="cg",
                    help="inverse-HVP solver (auto: chosen from p, n, memory and a Lanczos spectrum estimate; "
                         "kfac-cg / nystrom-cg: CG preconditioned with EK-FAC / a rank-64 Nyström sketch; kfac/ekfac: the "
                         "Kronecker-factored GGN alone; nystrom: the sketch alone; datainf: the DataInf closed form)")
    ex.add_argument("--damping", type=_nonneg_float, default=0.0, help="δ added to the Hessian")
    ex.add_argument("--top", type=_int_at_least(1), default=5, help="how many helpful and harmful points to list")
    ex.add_argument("--loo-k", type=_int_at_least(0), default=20,
                    help="retrain without each of the k most influential points (0 skips leave-one-out)")
    ex.add_argument("--out", default="out/explain.png", metavar="PATH.png",
                    help="where to write the figure; the suffix picks the format (.png, .pdf, .svg, …), "
                         "a name without one gets .png")
    ex.add_argument("--report", default=None, metavar="PATH.html",
                    help="also write one self-contained HTML page (.html or .htm; inline images, no network): the "
                         "test point, the ranked training images, the leave-one-out scatter and the solver diagnostics")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")
    ex.add_argument("--store", default=None, metavar="DIR",
                    help="keep s_test, the scores chunk by chunk and each leave-one-out retraining (in "
                         "DIR/leave_one_out) as they finish; rerunning resumes from them (a DIR written for other "
                         "data or settings is refused)")
    ex.add_argument("--fresh", action="store_true",
                    help="discard what --store DIR holds (its scores and leave-one-out retrainings) and start over, "
                         "instead of resuming it or refusing a DIR written for other data or settings")
    ex.add_argument("--scheduler", default=None, metavar="local|tcp://HOST:PORT",
                    help="run the passes over the training data and the leave-one-out retrainings on Dask: "
                         "'local' starts a LocalCluster, tcp://host:port uses a running scheduler "
                         "(pip install 'upweight[dask]'); default: in-process")
    acc = ex.add_argument_group("solver settings")
    acc.add_argument("--cg-rtol", type=_pos_float, default=1e-8, help="CG relative tolerance")
    acc.add_argument("--lissa-depth", type=_int_at_least(1), default=1000, help="LiSSA recursion depth t")
    acc.add_argument("--lissa-repeats", type=_int_at_least(1), default=4, help="LiSSA repeats r")
    acc.add_argument("--lissa-batch-size", type=_int_at_least(1), default=256, help="LiSSA minibatch size")
    acc.add_argument("--lissa-scale", type=_scale, default="auto", help="LiSSA scale s (a number or 'auto')")
    acc.add_argument("--max-residual", type=_pos_float, default=None,
                     help="largest accepted relative residual ‖(H+δI)x − v‖/‖v‖ of the solve "
                          "(default: upweight.Influence's default for the solver)")
    acc.add_argument("--on-inaccurate", choices=("raise", "warn"), default="raise",
                     help="what to do when the solve's residual is above --max-residual")
    ex.set_defaults(func=_explain)
    from .reproduce import add_parser as _add_reproduce

    _add_reproduce(sub)
    return parser


# ── the command ───────────────────────────────────────────────────────────────────────


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _label(y: int, names: dict[int, str]) -> str:
    return f"{int(y):+d} ({names[int(y)]})" if int(y) in names else f"{int(y):+d}"


def _make_solver(args: argparse.Namespace) -> Any:
    import upweight as uw

    if args.solver == "direct":
        return uw.Direct()
    if args.solver == "cg":
        return uw.CG(rtol=args.cg_rtol)
    if args.solver == "arnoldi":
        return uw.Arnoldi()
    if args.solver == "kfac":
        return uw.KFAC()
    if args.solver == "ekfac":
        return uw.EKFAC()
    if args.solver == "kfac-cg":
        return uw.CG(rtol=args.cg_rtol, preconditioner=uw.EKFAC())
    if args.solver == "nystrom-cg":
        return uw.CG(rtol=args.cg_rtol, preconditioner=uw.Nystrom())
    if args.solver == "nystrom":
        return uw.Nystrom()
    if args.solver == "datainf":
        return uw.DataInf()
    if args.solver == "auto":
        return uw.Auto(rtol=args.cg_rtol, progress=not args.no_progress)
    return uw.LiSSA(
        depth=args.lissa_depth, repeats=args.lissa_repeats, batch_size=args.lissa_batch_size,
        scale=args.lissa_scale, progress=not args.no_progress,
    )


def _solver_text(solver: Any) -> str:
    cfg = {k: v for k, v in solver.config().items() if k not in ("name", "progress")}
    inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items())
    return f"{solver.name} ({inner})" if inner else solver.name


def _check_explain_outputs(args: argparse.Namespace) -> tuple[Path, tuple[Any, Any]]:
    """Every path ``explain`` writes, checked before any work (nothing is written here).

    Returns the figure's path (``--out`` with ``.png`` appended when it has no suffix) and the
    stores of ``--store`` — ``(None, None)`` without it — for the scores and for the leave-one-out
    retrainings in ``DIR/leave_one_out``, opened with ``overwrite=--fresh`` (``upweight.Store``'s
    way of starting over, as ``reproduce fig2 --fresh`` does).
    """
    from ..report._files import check_output_file, check_output_folder, figure_formats
    from ..report.html import check_report_path
    from ..store import Store

    out: str | Path = str(args.out)
    p = Path(out)
    if p.name and not p.suffix and not out.endswith(("/", os.sep)) and not p.is_dir():
        out = p.with_name(p.name + ".png")
    figure = check_output_file(out, what="--out", suffixes=tuple("." + f for f in figure_formats()),
                               example="out/explain.png")
    if args.report is not None:
        check_report_path(args.report, what="--report")
    if args.store is None:
        if args.fresh:
            raise errors.InputError("--fresh discards what --store DIR holds, but no --store was given; "
                                    "pass --store DIR too, or leave --fresh out.")
        return figure, (None, None)
    folder = check_output_folder(args.store, what="--store")
    loo = folder / "leave_one_out"
    if loo.exists() and not loo.is_dir():
        raise errors.InputError(f"--store {args.store}: {loo} is a file, but the leave-one-out retrainings are kept "
                                "in a folder of that name; move it away or choose another --store.")
    try:
        return figure, (Store(folder, overwrite=args.fresh), Store(loo, overwrite=args.fresh))
    except errors.StoreError as exc:  # e.g. a manifest that cannot be read
        raise errors.StoreError(f"{exc} On the command line: pass another --store, or move {folder} away.") from exc


@contextlib.contextmanager
def _store_hint(args: argparse.Namespace) -> Any:
    """A store written for another computation: name the command-line fixes."""
    try:
        yield
    except errors.StoreMismatchError as exc:
        raise errors.StoreMismatchError(
            f"{exc} On the command line: rerun with --fresh to discard what --store {args.store} holds, "
            "or pass another --store."
        ) from exc


def _explain(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:  # holds the Dask cluster of --scheduler until the end
        return _explain_in(args, stack)


def _explain_in(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    import upweight as uw

    t_start = time.perf_counter()
    figure_path, stores = _check_explain_outputs(args)  # a bad path is an error now, not after training
    check_scheduler(args.scheduler)
    split = _load_bundled() if args.data is None else _load_npz(args.data)
    n, n_test, d = len(split.x_train), len(split.x_test), split.x_train.shape[1]
    if args.test_index is not None and not 0 <= args.test_index < n_test:
        raise errors.InputError(
            f"--test-index {args.test_index} is out of range: the test set has {n_test} points, "
            f"so it must be between 0 and {n_test - 1}."
        )
    _say(f"upweight explain — binary logistic regression on {split.name}: "
         f"{n:,} training / {n_test:,} test points, {d} features")

    # Train θ̂ = argmin (1/n)Σ log(1 + exp(−y·wᵀx)) + (λ/2)‖w‖² to ‖∇R‖ ≈ 1e-9, in float64.
    X = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    Xt = torch.from_numpy(split.x_test)
    yt = torch.from_numpy(split.y_test)
    model = torch.nn.Linear(d, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.zero_()
    t0 = time.perf_counter()
    fit = uw.refit(uw.Objective(model, "logistic", l2=args.l2), uw.Data.from_any((X, y), what="training data"))
    with torch.no_grad():
        model.weight.copy_(fit.params["weight"])
    objective = uw.Objective(model, "logistic", l2=args.l2)  # θ̂ is read at construction
    with torch.no_grad():
        s_train = model(X).squeeze(1)
        s_test = model(Xt).squeeze(1)
    pred_test = torch.where(s_test > 0, 1, -1)
    wrong = torch.nonzero(pred_test != yt).squeeze(1)
    acc_train = float((torch.where(s_train > 0, 1, -1) == y).double().mean())
    _say(f"model: Linear({d} → 1, no bias), logistic loss, l2 = {args.l2:g}; L-BFGS in float64: "
         f"{fit.iterations} iterations, ‖∇R(θ̂)‖ = {fit.grad_norm:.2e}, {time.perf_counter() - t0:.2f} s")
    _say(f"accuracy: train {100 * acc_train:.2f}%, test {100 * (1 - len(wrong) / n_test):.2f}% "
         f"({len(wrong)} of {n_test:,} test points misclassified)")

    if args.test_index is None:
        if len(wrong) == 0:
            raise errors.InputError("No test point is misclassified; pass --test-index to explain a correct prediction.")
        i, how = int(wrong[0]), "first misclassified"
    else:
        i = args.test_index
        how = "misclassified" if bool(pred_test[i] != yt[i]) else "correctly classified"
    p_pos = float(torch.sigmoid(s_test[i]))
    y_i = int(yt[i])
    status = "MISCLASSIFIED" if int(pred_test[i]) != y_i else "correct"
    loss_i = float(torch.nn.functional.softplus(-y_i * s_test[i]))  # log(1 + exp(−y·wᵀx))
    _say()
    _say(f"test point {i} ({how}): true label {_label(y_i, split.class_names)}, "
         f"predicted P(y=+1) = {p_pos:.4f} → {status}, test loss {loss_i:.4f}")

    # Influence of every training point on this test point's loss.
    solver = _make_solver(args)
    bound_kw = {} if args.max_residual is None else {"max_residual": args.max_residual}
    executor = open_executor(stack, args.scheduler, _say)
    inf = uw.Influence(
        objective, solver=solver, damping=args.damping, on_inaccurate=args.on_inaccurate,
        progress=not args.no_progress, **bound_kw,
    ).fit((X, y), executor=executor)
    test_point = (Xt[i : i + 1], yt[i : i + 1])
    with _store_hint(args):
        scores = inf.up_loss(test_point, store=stores[0])
    up = scores.values[0]
    removal = scores.as_removal_effect().values[0]
    prov = scores.provenance
    rankings = {
        "helpful": scores.top_k(args.top, harmful=False),
        "harmful": scores.top_k(args.top, harmful=True),
    }
    blurbs = {
        "helpful": "most helpful (I_up,loss < 0: upweighting lowers the test loss; removing raises it)",
        "harmful": "most harmful (I_up,loss > 0: upweighting raises the test loss; removing lowers it)",
    }
    for kind in ("helpful", "harmful"):
        _say()
        _say(f"top {len(rankings[kind])} {blurbs[kind]}")
        _say(f"{'rank':>4}  {'train index':>11}  {'label':<14}  {'I_up,loss':>12}  {'removal effect':>14}")
        for r, tid in enumerate(rankings[kind].train_ids, 1):
            j = int(tid)
            _say(f"{r:>4}  {j:>11}  {_label(int(y[j]), split.class_names):<14}  {up[j]:>+12.4e}  {removal[j]:>+14.4e}")
    _say(f"(removal effect = −I_up,loss / n with n = {n}: predicted change in the test loss if the point is removed)")

    _say()
    _say("solver diagnostics")
    _say(f"  solver      {_solver_text(solver)}, damping {args.damping:g}")
    accepted = {None: "not checked", True: "accepted", False: "NOT accepted"}[prov.get("accepted", True)]
    bound = prov.get("max_residual_accepted", inf.max_residual)
    bound_text = f"{bound:g}" if isinstance(bound, (int, float)) else "none"
    _say(f"  residual    {prov['residual_max']:.2e}  (relative ‖(H+δI)x − v‖/‖v‖; {accepted}, bound {bound_text})")
    _say(f"  iterations  {prov['iterations']}")
    if "solver_reason" in prov:
        _say(f"  chosen      {prov['solver_reason']}")
    _say(f"  seconds     {prov['solve_seconds']:.2f} solve, {inf.fit_seconds_:.2f} fit")

    comparison = None
    if args.loo_k > 0:
        _say()
        _say(f"leave-one-out retraining on the {min(args.loo_k, n)} most influential points …")
        with _store_hint(args):
            comparison = uw.leave_one_out(
                inf, test_point, k=args.loo_k, scores=scores, progress=not args.no_progress, executor=executor,
                store=stores[1],
            )
        _say(f"  Pearson {comparison.pearson:.4f}   Spearman {comparison.spearman:.4f}   "
             f"slope {comparison.slope:.4f}   (intercept {comparison.intercept:+.2e})")
        _say(f"  largest ‖∇R‖ after a refit {comparison.retrain_grad_norm:.1e}, {comparison.seconds:.2f} s")
        if comparison.provenance["resumed_from_store"]:
            _say(f"  {comparison.provenance['resumed_from_store']} of {len(comparison.train_ids)} retrainings read "
                 f"from {Path(args.store) / 'leave_one_out'}")

    out = _figure(args, split, i, p_pos, X, rankings, up, removal, comparison, Xt[i], figure_path)
    _say()
    _say(f"figure written to {out}" + (f" (--out {args.out} has no suffix: a PNG)" if not Path(args.out).suffix else ""))
    if args.report is not None:
        extra = [("Influence.fit time (solver set-up) [s]", inf.fit_seconds_, ".2f")]
        report = _report(args, split, i, p_pos, X, rankings, up, removal, comparison, Xt[i], loss_i, prov, extra)
        _say(f"report written to {report}")
    _say(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


def _figure(
    args: argparse.Namespace, split: _Split, i: int, p_pos: float, X: torch.Tensor, rankings: dict[str, Any],
    up: np.ndarray, removal: np.ndarray, comparison: Any, x_test: torch.Tensor, path: Path,
) -> Path:
    from ..report import explain_figure, save_figure

    def captioned(kind: str) -> list[tuple[np.ndarray, str]]:
        items = []
        for tid in rankings[kind].train_ids:
            j = int(tid)
            cap = f"#{j}  y = {int(split.y_train[j]):+d}\nI = {up[j]:+.3g}\nremoved: {removal[j]:+.2g}"
            items.append((X[j].numpy(), cap))
        return items

    y_i = int(split.y_test[i])
    verdict = "misclassified" if (p_pos > 0.5) != (y_i > 0) else "correct"
    test_title = f"Test point {i}\ntrue y = {_label(y_i, split.class_names)}\nP(y=+1) = {p_pos:.3f}\n{verdict}"
    fig = explain_figure(
        x_test.numpy(), test_title, captioned("helpful"), captioned("harmful"), comparison, split.image_shape,
        title=(f"Influence on the test loss of point {i} — logistic regression on {split.name}, "
               f"l2 = {args.l2:g}, {args.solver}"
               + (f", damping {args.damping:g}" if args.damping else "")),
    )
    return save_figure(fig, path)


def _report(
    args: argparse.Namespace, split: _Split, i: int, p_pos: float, X: torch.Tensor, rankings: dict[str, Any],
    up: np.ndarray, removal: np.ndarray, comparison: Any, x_test: torch.Tensor, test_loss: float, provenance: Any,
    extra: list[tuple[str, Any, str]],
) -> Path:
    """Write the ``--report`` page (upweight.report.html) from what the command computed."""
    from ..report.html import ReportPoint, ReportTest, explain_report, write_report

    images = split.image_shape is not None
    points = {
        kind: [
            ReportPoint(int(t), _label(int(split.y_train[int(t)]), split.class_names), float(up[int(t)]),
                        float(removal[int(t)]), X[int(t)].numpy() if images else None)
            for t in rankings[kind].train_ids
        ]
        for kind in ("helpful", "harmful")
    }
    y_i = int(split.y_test[i])
    test = ReportTest(
        index=i, true_label=_label(y_i, split.class_names), predicted_label=_label(1 if p_pos > 0.5 else -1, split.class_names),
        loss=test_loss, p_positive=p_pos, image=x_test.numpy() if images else None,
    )
    n, d = len(split.x_train), split.x_train.shape[1]
    page = explain_report(
        title=f"Why does the model predict this? Test point {i} of {split.name}",
        subtitle=(f"Binary logistic regression (Linear({d} → 1), no bias), l2 = {args.l2:g}, trained to the minimum "
                  f"in float64 on {n:,} training points; upweight {__version__}."),
        test=test, helpful=points["helpful"], harmful=points["harmful"], provenance=provenance, n_train=n,
        comparison=comparison, image_shape=split.image_shape, extra_diagnostics=extra,
    )
    return write_report(page, args.report, what="--report")


# ── entry point ───────────────────────────────────────────────────────────────────────


def _print_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


#: optional dependencies: the module a command imports → what to install
_EXTRAS = {
    "distributed": "pip install 'upweight[dask]'",
    "dask": "pip install 'upweight[dask]'",
    "sklearn": "pip install 'upweight[sklearn]'",
    "scipy": "pip install scipy",
    "PIL": "pip install pillow",
}
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # upweight.store's atomic-write temp files


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _shown_path(name: Any) -> str:
    """A path from an OSError, with an atomic write's temporary file shown as the file it was for."""
    p = Path(os.fsdecode(name))
    m = _TEMP_NAME.match(p.name)
    return str(p.with_name(m["name"]) if m else p)


def _os_error_message(exc: OSError) -> str:
    from ..report._files import os_error_fix

    reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    where = ""
    if exc.filename is not None:
        where = f" ({_shown_path(exc.filename)}"
        where += f" → {_shown_path(exc.filename2)})" if exc.filename2 is not None else ")"
    return f"{reason}{where}; {os_error_fix(exc)}."


def _missing_module(exc: ImportError) -> str | None:
    """The top-level module a failed import could not find, or None when the import failed inside
    upweight itself (a bug, not a missing dependency)."""
    e: BaseException | None = exc
    while e is not None:
        name = getattr(e, "name", None)
        if isinstance(e, ImportError) and name:
            top = name.split(".")[0]
            return None if top == "upweight" else top
        e = e.__cause__
    return None


def _user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for an unexpected one (a bug).

    User errors: every ``upweight.errors.UpweightError`` (bad input, a store of another
    computation, an unreachable scheduler, an inaccurate solve …), an ``OSError`` from reading or
    writing files (permission denied, disk full, a missing file), and an optional dependency that
    is not installed.
    """
    if isinstance(exc, errors.UpweightError):
        hint = ""
        if isinstance(exc, errors.InaccurateSolveError):
            hint = (" (on the command line: --lissa-depth/--lissa-repeats, --cg-rtol, --damping, "
                    "or --on-inaccurate warn to go on anyway)")
        elif isinstance(exc, errors.NotPositiveDefiniteError):
            hint = " (on the command line: --damping)"
        return _one_line(str(exc)) + hint
    if isinstance(exc, OSError):
        return _os_error_message(exc)
    if isinstance(exc, ImportError):
        top = _missing_module(exc)
        if top is None:
            return None
        install = _EXTRAS.get(top, f"pip install {top}")
        return (f"this command needs the package '{top}', which is not installed or cannot be imported "
                f"({_one_line(str(exc))}); install it with: {install}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``upweight`` command line; returns the exit status.

    Exit status: 0 done; 2 a usage error or an error the user can fix, reported on stderr as one
    line ``upweight: error: …`` (what is wrong, the value seen, what to do) and no traceback;
    130 interrupted; 1 an unexpected exception — a bug in upweight —, shown with its full
    traceback and a line saying so, so that it can be reported and is never mistaken for bad input.
    All of this is decided here, in one place, for every command.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed the message
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("default", category=errors.UpweightWarning)
            warnings.showwarning = _print_warning
            return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            traceback.print_exc()
            print(f"upweight: internal error ({type(exc).__name__}): this is a bug in upweight, not a problem with "
                  "your input; please report it with the traceback above.", file=sys.stderr, flush=True)
            return 1
        print(f"upweight: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
