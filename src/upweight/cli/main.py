"""``upweight explain``: why did the model get this test point wrong? (Koh & Liang 2017, §5.1–5.2)

Trains a linear model without bias (L2 = 0.01 as in the paper) on the bundled MNIST 1-vs-7 data
— or on an ``.npz`` you pass: binary logistic regression for two labels, softmax regression for
more — to the minimum in float64, or takes your own trained model and data (``--model
FILE.py:FUNCTION``, see ``user_model``). It picks a misclassified test point, lists the training
points that helped and hurt it most (I_up,loss and the predicted change in test loss if each
were removed), checks those predictions against actual leave-one-out retraining (the paper's
Fig. 2) and writes a figure, and optionally an HTML report with an overview of several test points.

This module is the only place in upweight that prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from .._threads import threads
from .._version import __version__
from ._problem import Predictions, Problem
from ._scheduler import check_scheduler, open_executor
from ._solvers import make_solver, solver_choices

# training points per kind drawn in the --out figure (the tables and the report list all --top)
FIGURE_TOP = 10
OVERVIEW_TOP = 5  # helpful and harmful ids per test point in the overview

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


def _thread_setting(s: str) -> int | str:
    v = s.strip().lower()
    if v in ("auto", "torch"):
        return v
    return _int_at_least(1)(s)


def _index_list(s: str) -> list[int]:
    parts = [p.strip() for p in s.split(",")]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or integers separated by commas (e.g. 3 or 3,8,12), got {s!r}"
        ) from None


def _scale(s: str) -> float | str:
    return "auto" if s == "auto" else _pos_float(s)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None`` (no value: the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upweight",
        description=(
            "Influence functions (Koh & Liang, ICML 2017): which training points made the model"
            " predict this?"
        ),
        epilog=(
            "Exit status: 0 done; 2 a usage error or an error you can fix (bad input, an unusable"
            " output path, a full disk, a missing optional package), reported as one line"
            " 'upweight: error: …'; 1 an internal error (a bug in upweight), shown with its"
            " traceback; 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"upweight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = sub.add_parser(
        "explain",
        help=(
            "explain a test prediction: of logistic / softmax regression trained here, or of your"
            " own model (--model)"
        ),
        description=(
            "Train a linear model without bias to the minimum in float64 (binary logistic"
            " regression for two labels, softmax regression for more; on the bundled MNIST 1-vs-7"
            " set or --data), or take your own trained model and data (--model), pick a"
            " misclassified test point, list the most helpful and most harmful training points by"
            " I_up,loss, compare the predicted removal effects with actual leave-one-out"
            " retraining, and write a figure (and with --report an HTML page). I_up,loss > 0:"
            " upweighting the training point raises the test loss (harmful); removal effect ="
            " −I_up,loss/n: predicted change in the test loss if the point is removed."
        ),
        epilog=(
            "--model FILE.py:FUNCTION or MODULE:FUNCTION imports that Python module and calls"
            " FUNCTION(), which returns upweight.cli.ModelSpec(model=…, train=…, test=…,"
            " loss='cross_entropy', l2=…, kind=…, feature_names=…) or a dict of those keys; see"
            " docs/cli.md. Importing and calling it runs that code in this process with your"
            " rights: only name code you trust."
        ),
        formatter_class=_HelpFormatter,
    )
    src = ex.add_mutually_exclusive_group()
    src.add_argument(
        "--data",
        metavar="PATH.npz",
        default=None,
        help=(
            "npz with x_train, y_train, x_test, y_test; labels in {-1,+1} or {0,1} (0 → -1) train"
            " logistic regression, C ≥ 3 integer labels softmax regression; uint8 features are"
            " scaled to [0, 1]; optional string arrays feature_names, class_names, kind"
            " (image|tabular). Default: the bundled MNIST 1-vs-7 set"
        ),
    )
    src.add_argument(
        "--model",
        metavar="FILE.py:FUNCTION",
        default=None,
        help=(
            "explain your own trained model: FUNCTION() in FILE.py (or in an importable MODULE, "
            "MODULE:FUNCTION) returns the model, its loss and l2, its training and test data "
            "(upweight.cli.ModelSpec); runs that code — only name code you trust"
        ),
    )
    ex.add_argument(
        "--test-index",
        type=_index_list,
        default=None,
        metavar="I[,J,…]",
        help=(
            "test point(s) to explain: the first is explained in detail, all of them (when more"
            " than one) in an overview (default: the first misclassified one, or the one with the"
            " highest loss when none is misclassified)"
        ),
    )
    ex.add_argument(
        "--n-test",
        type=_int_at_least(1),
        default=None,
        metavar="K",
        help=(
            "explain the first K misclassified test points (then the first correct ones if fewer "
            "are misclassified): the first in detail, all K in an overview"
        ),
    )
    ex.add_argument(
        "--l2",
        type=_nonneg_float,
        default=None,
        help=(
            "L2 strength λ in R(θ) = mean loss + λ/2‖θ‖² of the built-in model (default 0.01); "
            "with --model, the function returns it"
        ),
    )
    ex.add_argument(
        "--solver",
        choices=solver_choices(),
        default="cg",
        help=(
            "inverse-HVP solver (auto: chosen from p, n, memory and a Lanczos spectrum estimate;"
            " kfac-cg / nystrom-cg: CG preconditioned with EK-FAC / a rank-64 Nyström sketch;"
            " kfac/ekfac: the Kronecker-factored GGN alone; nystrom: the sketch alone; datainf: the"
            " DataInf closed form)"
        ),
    )
    ex.add_argument("--damping", type=_nonneg_float, default=0.0, help="δ added to the Hessian")
    ex.add_argument(
        "--top",
        type=_int_at_least(1),
        default=5,
        help=(
            f"how many helpful and harmful points to list (the figure draws at most {FIGURE_TOP} of"
            " each; the report lists all, in pages)"
        ),
    )
    ex.add_argument(
        "--loo-k",
        type=_int_at_least(0),
        default=None,
        help=(
            "retrain without each of the k most influential points (0 skips leave-one-out; default"
            " 20, and 0 with --model, whose retraining is L-BFGS from θ̂ unless the function"
            " returns retrain)"
        ),
    )
    ex.add_argument(
        "--out",
        default="out/explain.png",
        metavar="PATH.png",
        help=(
            "where to write the figure; the suffix picks the format (.png, .pdf, .svg, …), "
            "a name without one gets .png"
        ),
    )
    ex.add_argument(
        "--report",
        default=None,
        metavar="PATH.html",
        help=(
            "also write one self-contained HTML page (.html or .htm; inline images, no network, no"
            " scripts): an overview of the test points, the test point, the ranked training points"
            " (images, feature values or text; long rankings in pages), the leave-one-out scatter"
            " and the solver diagnostics"
        ),
    )
    ex.add_argument(
        "--check-accuracy",
        action="store_true",
        help=(
            "for an approximate solver (arnoldi, kfac, ekfac, nystrom, datainf): measure its scores"
            " against CG on the same curvature (2 test points × 512 training points; about one CG"
            " solve)"
        ),
    )
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")
    ex.add_argument(
        "--threads",
        type=_thread_setting,
        default=None,
        metavar="N|auto|torch",
        help=(
            "torch intra-op threads for the whole command (N ≥ 1; on a busy machine 1 keeps small "
            "problems fast), 'auto' (one thread for small problems) or 'torch' (torch's default); "
            "default: the UPWEIGHT_THREADS environment variable, else 'auto' (upweight.set_threads)"
        ),
    )
    ex.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help=(
            "keep s_test, the scores chunk by chunk and each leave-one-out retraining (in"
            " DIR/leave_one_out) as they finish; rerunning resumes from them (a DIR written for"
            " other data or settings is refused)"
        ),
    )
    ex.add_argument(
        "--fresh",
        action="store_true",
        help=(
            "discard what --store DIR holds (its scores and leave-one-out retrainings) and start"
            " over, instead of resuming it or refusing a DIR written for other data or settings"
        ),
    )
    ex.add_argument(
        "--scheduler",
        default=None,
        metavar="local|tcp://HOST:PORT",
        help=(
            "run the passes over the training data and the leave-one-out retrainings on Dask: "
            "'local' starts a LocalCluster, tcp://host:port uses a running scheduler "
            "(pip install 'upweight[dask]'); default: in-process"
        ),
    )
    acc = ex.add_argument_group("solver settings")
    acc.add_argument("--cg-rtol", type=_pos_float, default=1e-8, help="CG relative tolerance")
    acc.add_argument(
        "--lissa-depth", type=_int_at_least(1), default=1000, help="LiSSA recursion depth t"
    )
    acc.add_argument("--lissa-repeats", type=_int_at_least(1), default=4, help="LiSSA repeats r")
    acc.add_argument(
        "--lissa-batch-size", type=_int_at_least(1), default=256, help="LiSSA minibatch size"
    )
    acc.add_argument(
        "--lissa-scale", type=_scale, default="auto", help="LiSSA scale s (a number or 'auto')"
    )
    acc.add_argument(
        "--max-residual",
        type=_pos_float,
        default=None,
        help=(
            "largest accepted relative residual ‖(H+δI)x − v‖/‖v‖ of the solve "
            "(default: upweight.Influence's default for the solver)"
        ),
    )
    acc.add_argument(
        "--on-inaccurate",
        choices=("raise", "warn"),
        default="raise",
        help="what to do when the solve's residual is above --max-residual",
    )
    ex.set_defaults(func=_explain)
    from ..paper.cli import add_parser as _add_reproduce

    _add_reproduce(sub)
    return parser


# ── the command ───────────────────────────────────────────────────────────────────────


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


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
    figure = check_output_file(
        out,
        what="--out",
        suffixes=tuple("." + f for f in figure_formats()),
        example="out/explain.png",
    )
    if args.report is not None:
        check_report_path(args.report, what="--report")
    if args.store is None:
        if args.fresh:
            raise errors.InputError(
                "--fresh discards what --store DIR holds, but no --store was given; "
                "pass --store DIR too, or leave --fresh out."
            )
        return figure, (None, None)
    folder = check_output_folder(args.store, what="--store")
    loo = folder / "leave_one_out"
    if loo.exists() and not loo.is_dir():
        raise errors.InputError(
            f"--store {args.store}: {loo} is a file, but the leave-one-out retrainings are kept "
            "in a folder of that name; move it away or choose another --store."
        )
    try:
        return figure, (Store(folder, overwrite=args.fresh), Store(loo, overwrite=args.fresh))
    except errors.StoreError as exc:  # e.g. a manifest that cannot be read
        raise errors.StoreError(
            f"{exc} On the command line: pass another --store, or move {folder} away."
        ) from exc


@contextlib.contextmanager
def _store_hint(args: argparse.Namespace) -> Any:
    """A store written for another computation: name the command-line fixes."""
    try:
        yield
    except errors.StoreMismatchError as exc:
        raise errors.StoreMismatchError(
            f"{exc} On the command line: rerun with --fresh to discard what --store {args.store}"
            " holds, or pass another --store."
        ) from exc


def _explain(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:  # holds the Dask cluster of --scheduler until the end
        return _explain_in(args, stack)


def _problem(args: argparse.Namespace) -> Problem:
    """The model and data to explain: ``--model``'s, or the built-in model trained on ``--data``."""
    from . import _problem as pb

    if args.model is not None:
        if args.l2 is not None:
            raise errors.InputError(
                "--l2 sets the L2 strength of the built-in model; with --model the function "
                "returns the l2 its model was trained with (ModelSpec.l2). Leave --l2 out."
            )
        from .user_model import load_model_spec

        return pb.user_problem(load_model_spec(args.model), args.model)
    split = pb.load_bundled() if args.data is None else pb.load_npz(args.data)
    if args.test_index is not None:  # a wrong index is refused before training
        _check_test_indices(args.test_index, len(split.x_test))
    return pb.builtin_problem(split, 0.01 if args.l2 is None else args.l2)


def _check_test_indices(indices: list[int], n_test: int) -> None:
    for i in indices:
        if not 0 <= i < n_test:
            raise errors.InputError(
                f"--test-index {i} is out of range: the test set has {n_test} points, "
                f"so it must be between 0 and {n_test - 1}."
            )
    if len(set(indices)) != len(indices):
        raise errors.InputError(
            f"--test-index {','.join(map(str, indices))}: a test point is named twice; name each"
            " once."
        )


def _choose_tests(args: argparse.Namespace, pred: Predictions) -> tuple[list[int], str]:
    """The test points to explain (the first in detail) and how the first was chosen."""
    n_test = len(pred.loss)
    if args.test_index is not None:
        _check_test_indices(args.test_index, n_test)
        i = args.test_index[0]
        how = (
            "chosen"
            if pred.wrong is None
            else ("misclassified" if pred.wrong[i] else "correctly classified")
        )
        return list(args.test_index), how
    if pred.wrong is None:  # no classes: the points with the highest loss
        order = np.argsort(-pred.loss, kind="stable")
        return [int(j) for j in order[: args.n_test or 1]], "highest test loss"
    wrong = np.flatnonzero(pred.wrong)
    if args.n_test is not None:
        right = np.flatnonzero(~pred.wrong)
        chosen = [int(j) for j in np.concatenate([wrong, right])[: args.n_test]]
        return chosen, "first misclassified" if len(wrong) else "correctly classified"
    if len(wrong) == 0:
        return [int(np.argmax(pred.loss))], "highest test loss; none is misclassified"
    return [int(wrong[0])], "first misclassified"


def _verdict(pred: Predictions, i: int) -> str:
    return "" if pred.wrong is None else ("MISCLASSIFIED" if pred.wrong[i] else "correct")


def _test_line(problem: Problem, pred: Predictions, i: int, how: str) -> str:
    head = f"test point {i} ({how}): "
    tail = f"test loss {pred.loss[i]:.4f}"
    if problem.task == "other":
        return head + f"target {pred.true[i]}, model output {pred.predicted[i]}, " + tail
    if pred.p_positive is not None:
        shown = f"predicted P(y=+1) = {pred.p_positive[i]:.4f}"
    elif pred.p_predicted is not None:
        shown = f"predicted {pred.predicted[i]} with P = {pred.p_predicted[i]:.4f}"
    else:
        shown = f"predicted {pred.predicted[i]}"
    return head + f"true label {pred.true[i]}, {shown} → {_verdict(pred, i)}, " + tail


def _explain_in(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    import upweight as uw

    t_start = time.perf_counter()
    # a bad path is an error now, not after training
    figure_path, stores = _check_explain_outputs(args)
    check_scheduler(args.scheduler)
    if args.test_index is not None and args.n_test is not None:
        raise errors.InputError(
            "--test-index names the test points and --n-test counts them; pass one of the two."
        )
    problem = _problem(args)
    n, n_test = len(problem.train), len(problem.test)
    shapes = problem.train.input_shapes
    d = int(np.prod(shapes["X"])) if list(shapes) == ["X"] else None
    _say(
        f"upweight explain — {_task_text(problem, args)} on {problem.name}: {n:,} training /"
        f" {n_test:,} test points"
        + (f", {d} features" if d is not None else f", inputs {', '.join(shapes)}")
    )
    _say(f"model: {problem.model_text}" + (f"; {problem.fit_text}" if problem.fit_text else ""))
    pred = _predict(problem)
    if pred.wrong is not None:
        train_wrong = _predict(problem, train=True).wrong
        assert train_wrong is not None
        n_wrong = int(pred.wrong.sum())
        _say(
            f"accuracy: train {100 * (1 - float(np.mean(train_wrong))):.2f}%, test"
            f" {100 * (1 - n_wrong / n_test):.2f}% ({n_wrong} of {n_test:,} test points"
            " misclassified)"
        )
    else:
        _say(f"mean test loss {float(np.mean(pred.loss)):.4g}")

    indices, how = _choose_tests(args, pred)
    i = indices[0]
    _say()
    _say(_test_line(problem, pred, i, how))
    if len(indices) > 1:
        _say(
            f"and {len(indices) - 1} more test point(s) for the overview:"
            f" {_short_list(indices[1:])}"
        )

    # Influence of every training point on these test points' losses.
    solver = make_solver(args)
    bound_kw = {} if args.max_residual is None else {"max_residual": args.max_residual}
    executor = open_executor(stack, args.scheduler, _say)
    inf = uw.Influence(
        problem.objective,
        solver=solver,
        damping=args.damping,
        on_inaccurate=args.on_inaccurate,
        progress=not args.no_progress,
        **bound_kw,
    ).fit(problem.train, executor=executor)
    tests = problem.test.subset(indices)
    with _store_hint(args):
        expl = uw.explain(
            inf, tests, top=args.top, check_accuracy=args.check_accuracy, store=stores[0]
        )
    all_scores = expl.scores
    scores = dataclasses.replace(
        all_scores, values=all_scores.values[:1], test_ids=all_scores.test_ids[:1]
    )
    up, removal = expl.up_loss[0], expl.removal_effect[0]
    prov = expl.provenance
    rankings = {"helpful": expl.helpful[0], "harmful": expl.harmful[0]}
    _print_rankings(problem, rankings, up, removal)

    overview = _overview(problem, pred, indices, all_scores) if len(indices) > 1 else []
    if overview:
        _print_overview(problem, pred, overview)
    _print_diagnostics(args, solver, inf, expl)

    comparison = None
    loo_k = args.loo_k if args.loo_k is not None else (0 if args.model is not None else 20)
    if loo_k > 0:
        _say()
        _say(f"leave-one-out retraining on the {min(loo_k, n)} most influential points …")
        with _store_hint(args):
            comparison = uw.leave_one_out(
                inf,
                problem.test.subset([i]),
                k=loo_k,
                scores=scores,
                progress=not args.no_progress,
                executor=executor,
                store=stores[1],
                train_fn=problem.retrain,
            )
        _say(
            f"  Pearson {comparison.pearson:.4f}   Spearman {comparison.spearman:.4f}   "
            f"slope {comparison.slope:.4f}   (intercept {comparison.intercept:+.2e})"
        )
        _say(
            f"  largest ‖∇R‖ after a refit {comparison.retrain_grad_norm:.1e},"
            f" {comparison.seconds:.2f} s"
        )
        if comparison.provenance["resumed_from_store"]:
            _say(
                f"  {comparison.provenance['resumed_from_store']} of {len(comparison.train_ids)}"
                f" retrainings read from {Path(args.store) / 'leave_one_out'}"
            )

    out = _figure(args, problem, pred, i, rankings, up, removal, comparison, figure_path)
    _say()
    shown = min(args.top, FIGURE_TOP)
    _say(
        f"figure written to {out}"
        + (f" (--out {args.out} has no suffix: a PNG)" if not Path(args.out).suffix else "")
        + (
            f" (the top {shown} of each kind; all {args.top} are listed above and in --report)"
            if args.top > shown
            else ""
        )
    )
    if args.report is not None:
        extra = [("Influence.fit time (solver set-up) [s]", inf.fit_seconds_, ".2f")]
        report = _report(
            args, problem, pred, i, rankings, up, removal, comparison, prov, extra, overview
        )
        _say(f"report written to {report}")
    _say(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


def _print_rankings(
    problem: Problem, rankings: dict[str, Any], up: np.ndarray, removal: np.ndarray
) -> None:
    blurbs = {
        "helpful": (
            "most helpful (I_up,loss < 0: upweighting lowers the test loss; removing raises it)"
        ),
        "harmful": (
            "most harmful (I_up,loss > 0: upweighting raises the test loss; removing lowers it)"
        ),
    }
    y_train = problem.train.y
    for kind in ("helpful", "harmful"):
        _say()
        _say(f"top {len(rankings[kind])} {blurbs[kind]}")
        _say(
            f"{'rank':>4}  {'train index':>11}  {'label':<14}  {'I_up,loss':>12}  "
            f"{'removal effect':>14}"
        )
        for r, tid in enumerate(rankings[kind].train_ids, 1):
            j = int(tid)
            label = problem.label_text(y_train[j])
            _say(f"{r:>4}  {j:>11}  {label:<14}  {up[j]:>+12.4e}  {removal[j]:>+14.4e}")
    _say(
        f"(removal effect = −I_up,loss / n with n = {len(problem.train)}: predicted change in the "
        "test loss if the point is removed)"
    )


def _print_diagnostics(args: argparse.Namespace, solver: Any, inf: Any, expl: Any) -> None:
    prov = expl.provenance
    _say()
    _say("solver diagnostics")
    _say(f"  solver      {_solver_text(solver)}, damping {args.damping:g}")
    accepted = {None: "not checked", True: "accepted", False: "NOT accepted"}[prov.accepted]
    bound = prov.max_residual_accepted
    bound_text = f"{bound:g}" if isinstance(bound, (int, float)) else "none"
    _say(
        f"  residual    {prov.residual_max:.2e}  (relative ‖(H+δI)x − v‖/‖v‖; {accepted}, "
        f"bound {bound_text})"
    )
    est = expl.accuracy
    if est is not None:
        _say(
            f"  accuracy    Spearman {est.spearman_min:.4f} (min), relative error "
            f"{est.relative_error_max:.3g} (max) against CG on {len(est.test_ids)} test × "
            f"{len(est.train_ids)} training points"
        )
    elif prov.accuracy is not None:
        _say(
            "  accuracy    not estimated (an approximation's residual bounds its error loosely; "
            "--check-accuracy measures it)"
        )
    _say(f"  iterations  {prov.iterations}")
    if "reason" in prov.solver_stats:
        _say(f"  chosen      {prov.solver_stats['reason']}")
    _say(f"  seconds     {prov.solve_seconds:.2f} solve, {inf.fit_seconds_:.2f} fit")


def _task_text(problem: Problem, args: argparse.Namespace) -> str:
    if args.model is not None:
        return f"your {type(problem.objective.model).__name__}"
    return {"binary": "binary logistic regression", "multiclass": "softmax regression"}[
        problem.task
    ]


def _predict(problem: Problem, *, train: bool = False) -> Predictions:
    from ._problem import predict

    return predict(problem, problem.train if train else problem.test)


def _short_list(ids: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(int(j)) for j in ids[:limit])
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


@dataclasses.dataclass(frozen=True)
class _OverviewEntry:
    index: int
    helpful: list[int]
    harmful: list[int]
    up: np.ndarray  # I_up,loss of every training point on this test point
    removal: np.ndarray


def _overview(
    problem: Problem, pred: Predictions, indices: list[int], scores: Any
) -> list[_OverviewEntry]:
    k = OVERVIEW_TOP
    removal = scores.as_removal_effect().values
    entries = []
    for row, i in enumerate(indices):
        entries.append(
            _OverviewEntry(
                i,
                [int(t) for t in scores.top_k(k, test=row, harmful=False).train_ids],
                [int(t) for t in scores.top_k(k, test=row, harmful=True).train_ids],
                scores.values[row],
                removal[row],
            )
        )
    return entries


def _recurring(entries: list[_OverviewEntry]) -> list[tuple[int, list[int], list[int]]]:
    seen: dict[int, tuple[list[int], list[int]]] = {}
    for e in entries:
        for j in e.helpful:
            seen.setdefault(j, ([], []))[0].append(e.index)
        for j in e.harmful:
            seen.setdefault(j, ([], []))[1].append(e.index)
    rows = [(j, h, m) for j, (h, m) in seen.items() if len(h) + len(m) >= 2]
    return sorted(rows, key=lambda r: (-(len(r[1]) + len(r[2])), r[0]))


def _print_overview(problem: Problem, pred: Predictions, entries: list[_OverviewEntry]) -> None:
    _say()
    _say(
        f"overview of {len(entries)} test points (top {OVERVIEW_TOP} helpful / harmful training ids"
        " of each)"
    )
    _say(
        f"{'test':>6}  {'true label':<14}  {'prediction':<14}  {'loss':>8}  {'helpful':<34} "
        " harmful"
    )
    for e in entries:
        true, predicted, loss = pred.true[e.index], pred.predicted[e.index], pred.loss[e.index]
        _say(
            f"{e.index:>6}  {true:<14}  {predicted:<14}  {loss:>8.4f} "
            f" {' '.join(map(str, e.helpful)):<34}  {' '.join(map(str, e.harmful))}"
        )
    rec = _recurring(entries)
    if not rec:
        _say("no training point is in the lists of two or more of these test points")
        return
    _say("training points in the lists of two or more of these test points")
    for j, helped, harmed in rec[:10]:
        _say(
            f"  {j:>8}  {problem.label_text(problem.train.y[j]):<14}  helpful to {len(helped)}"
            + (f" ({_short_list(helped, 6)})" if helped else "")
            + f", harmful to {len(harmed)}"
            + (f" ({_short_list(harmed, 6)})" if harmed else "")
        )
    if len(rec) > 10:
        _say(f"  … and {len(rec) - 10} more (all in --report)")


def _figure(
    args: argparse.Namespace,
    problem: Problem,
    pred: Predictions,
    i: int,
    rankings: dict[str, Any],
    up: np.ndarray,
    removal: np.ndarray,
    comparison: Any,
    path: Path,
) -> Path:
    from ..report import explain_figure, ranking_figure, save_figure

    top = {
        kind: [int(t) for t in rankings[kind].train_ids[:FIGURE_TOP]]
        for kind in ("helpful", "harmful")
    }
    y_train = problem.train.y
    verdict = _verdict(pred, i).lower()
    lines = [f"Test point {i}"]
    if problem.task == "other":
        lines += [f"target {pred.true[i]}", f"output {pred.predicted[i]}"]
    else:
        lines.append(f"true y = {pred.true[i]}")
        if pred.p_positive is not None:
            lines.append(f"P(y=+1) = {pred.p_positive[i]:.3f}")
        else:
            lines.append(f"predicted {pred.predicted[i]}")
            if pred.p_predicted is not None:
                lines.append(f"P = {pred.p_predicted[i]:.3f}")
    if verdict:
        lines.append(verdict)
    shown = f"; top {FIGURE_TOP} of {args.top} shown" if args.top > FIGURE_TOP else ""
    model = _task_text(problem, args) + " on " if args.model is None else ""
    title = (
        f"Influence on the test loss of point {i} — {model}{problem.name}, l2 = {problem.l2:g},"
        f" {args.solver}" + (f", damping {args.damping:g}" if args.damping else "") + shown
    )
    if problem.kind == "image":

        def captioned(kind: str) -> list[tuple[np.ndarray, str]]:
            return [
                (
                    problem.point_input("train", j)["image"],
                    (
                        f"#{j}  y = {problem.label_text(y_train[j]).split(' ')[0]}\nI ="
                        f" {up[j]:+.3g}\nremoved: {removal[j]:+.2g}"
                    ),
                )
                for j in top[kind]
            ]

        fig = explain_figure(
            problem.point_input("test", i)["image"],
            "\n".join(lines),
            captioned("helpful"),
            captioned("harmful"),
            comparison,
            None,
            title=title,
            max_columns=FIGURE_TOP,
        )
    else:

        def bars(kind: str) -> list[tuple[str, float]]:
            return [(f"#{j} ({problem.label_text(y_train[j])})", float(up[j])) for j in top[kind]]

        fig = ranking_figure(
            "\n".join(lines), bars("helpful"), bars("harmful"), comparison, title=title
        )
    return save_figure(fig, path)


def _report_point(
    problem: Problem, j: int, up: np.ndarray, removal: np.ndarray, with_input: bool = True
) -> Any:
    from ..report.html import ReportPoint

    shown = problem.point_input("train", j) if with_input else {}
    return ReportPoint(
        j, problem.label_text(problem.train.y[j]), float(up[j]), float(removal[j]), **shown
    )


def _report(
    args: argparse.Namespace,
    problem: Problem,
    pred: Predictions,
    i: int,
    rankings: dict[str, Any],
    up: np.ndarray,
    removal: np.ndarray,
    comparison: Any,
    provenance: Any,
    extra: list[tuple[str, Any, str]],
    overview: list[_OverviewEntry],
) -> Path:
    """Write the ``--report`` page (upweight.report.html) from what the command computed."""
    from ..report.html import OverviewRow, ReportTest, explain_report, write_report

    points = {
        kind: [_report_point(problem, int(t), up, removal) for t in rankings[kind].train_ids]
        for kind in ("helpful", "harmful")
    }
    test = ReportTest(
        index=i,
        true_label=pred.true[i],
        predicted_label=pred.predicted[i],
        loss=float(pred.loss[i]),
        p_positive=None if pred.p_positive is None else float(pred.p_positive[i]),
        p_predicted=None if pred.p_predicted is None else float(pred.p_predicted[i]),
        **problem.point_input("test", i),
    )
    rows = [
        OverviewRow(
            e.index,
            pred.true[e.index],
            pred.predicted[e.index],
            float(pred.loss[e.index]),
            [_report_point(problem, j, e.up, e.removal, False) for j in e.helpful],
            [_report_point(problem, j, e.up, e.removal, False) for j in e.harmful],
        )
        for e in overview
    ]
    n = len(problem.train)
    how = "trained to the minimum in float64" if args.model is None else "as returned by --model"
    page = explain_report(
        title=f"Why does the model predict this? Test point {i} of {problem.name}",
        subtitle=f"{problem.model_text}, {how}, on {n:,} training points; upweight {__version__}.",
        test=test,
        helpful=points["helpful"],
        harmful=points["harmful"],
        provenance=provenance,
        n_train=n,
        comparison=comparison,
        image_shape=None,
        extra_diagnostics=extra,
        feature_names=problem.feature_names if problem.kind == "tabular" else None,
        overview=rows,
    )
    return write_report(page, args.report, what="--report")


# ── entry point ───────────────────────────────────────────────────────────────────────


def _print_warning(
    message: Any,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: Any = None,
) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


#: optional dependencies: the module a command imports → what to install
_EXTRAS = {
    "distributed": "pip install 'upweight[dask]'",
    "dask": "pip install 'upweight[dask]'",
    "sklearn": "pip install 'upweight[sklearn]'",
    "scipy": "pip install scipy",
    "PIL": "pip install pillow",
}
# upweight.store's atomic-write temp files
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp$")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _shown_path(name: Any) -> str:
    """A path from an OSError, with an atomic write's temporary file shown as the file it
    was for."""
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
            hint = (
                " (on the command line: --lissa-depth/--lissa-repeats, --cg-rtol, --damping, "
                "or --on-inaccurate warn to go on anyway)"
            )
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
        return (
            f"this command needs the package '{top}', which is not installed or cannot be imported "
            f"({_one_line(str(exc))}); install it with: {install}"
        )
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
            setting = getattr(args, "threads", None)
            with threads(setting) if setting is not None else contextlib.nullcontext():
                return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            traceback.print_exc()
            print(
                f"upweight: internal error ({type(exc).__name__}): this is a bug in upweight, not a"
                " problem with your input; please report it with the traceback above.",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(f"upweight: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
