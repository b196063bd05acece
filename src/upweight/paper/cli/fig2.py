"""``upweight reproduce fig2``: Fig. 2 of Koh & Liang (2017) — influence vs leave-one-out retraining
(§4.1–4.2)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from ... import errors
from ...cli._device import check_device
from ...cli._scheduler import open_executor
from ..config import CNN_TRAIN_SCHEDULES, Fig2Config
from ._common import config_from_args, markdown_table
from ._common import say as _say

NAME = "fig2"
HELP = (
    "Fig. 2 (§4.1–4.2): predicted vs actual leave-one-out change in test loss — CG, LiSSA,"
    " non-convex CNN"
)
DATA_HELP = "MNIST: a folder with the four IDX files, a folder holding mnist.npz, or the .npz"
OUTPUTS = ("fig2.png", "report.md")  # written into --out (results.json is written by the runner)
FOLDERS = ("retrainings",)  # kept in --out: the leave-one-out retrainings (--fresh discards them)

_RETRAIN_TEXT = {
    "momentum": "full-batch heavy-ball steps",
    "adam": "Adam steps resumed from θ̃'s moment estimates, on minibatches shared by every run",
}
_TITLES = {
    "cg": "Logistic regression, exact (CG)",
    "lissa": "Logistic regression, stochastic (LiSSA)",
    "cnn": "CNN, non-convex, not converged",
}


#: the options' defaults (the paper's settings)
_D = Fig2Config()
_SCHEDULE_TEXT = {
    "constant": "",
    "release": " with the release code's decay (×0.1 from epoch 10,000, ×0.01 from 20,000)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce fig2``: one per ``Fig2Config`` field (same name, ``--refit`` for
    ``refit_method``), and how the run is carried out (``--scheduler``, ``--device``, ``--fresh``,
    ``--merge``).
    """
    p.add_argument(
        "--panels", default=",".join(_D.panels), help="comma-separated subset of cg, lissa, cnn"
    )
    p.add_argument(
        "--loo-k",
        type=int,
        default=_D.loo_k,
        help="training points of largest |I_up,loss| retrained (logistic regression)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=_D.train_size,
        help=(
            "random subsample of the 55,000 training images for the logistic regression (default:"
            " all)"
        ),
    )
    p.add_argument(
        "--test-index",
        type=int,
        default=_D.test_index,
        help="MNIST test point (default: the first misclassified)",
    )
    p.add_argument(
        "--lissa-depth",
        type=int,
        default=_D.lissa_depth,
        help="LiSSA recursion depth t (paper: 5,000)",
    )
    p.add_argument(
        "--lissa-repeats", type=int, default=_D.lissa_repeats, help="LiSSA repeats r (paper: 10)"
    )
    p.add_argument(
        "--lissa-batch-size",
        type=int,
        default=_D.lissa_batch_size,
        help="points per LiSSA minibatch Hessian (paper: 1)",
    )
    p.add_argument(
        "--lissa-scale",
        type=float,
        default=_D.lissa_scale,
        help="LiSSA's scale s (default: 'auto', 1.1 × the largest λmax of sampled minibatches)",
    )
    p.add_argument(
        "--refit",
        dest="refit_method",
        default=_D.refit_method,
        choices=("auto", "newton", "lbfgs"),
        help=(
            "LOO refits: Newton with the exact Hessian's Cholesky factor, or upweight.refit's "
            "L-BFGS; auto = newton for --loo-k ≥ 50"
        ),
    )
    p.add_argument(
        "--cnn-loo-k",
        type=int,
        default=_D.cnn_loo_k,
        help="CNN training points retrained (paper: 100)",
    )
    p.add_argument(
        "--cnn-train-size",
        type=int,
        default=_D.cnn_train_size,
        help="first N points of the 5,500-image 10%% subset for the CNN (default: all 5,500)",
    )
    p.add_argument(
        "--cnn-train-steps",
        type=int,
        default=_D.cnn_train_steps,
        help="Adam steps (minibatches of 500) to θ̃",
    )
    p.add_argument(
        "--cnn-train-lr",
        type=float,
        default=_D.cnn_train_lr,
        help="Adam's learning rate to θ̃ (the paper's: 1e-4, with --cnn-train-schedule release)",
    )
    p.add_argument(
        "--cnn-train-schedule",
        default=_D.cnn_train_schedule,
        choices=CNN_TRAIN_SCHEDULES,
        help=(
            "θ̃'s learning rate: constant, or the release code's decay (×0.1 from epoch 10,000,"
            " ×0.01 from epoch 20,000; an epoch = n/500 steps)"
        ),
    )
    p.add_argument(
        "--cnn-retrain",
        default=_D.cnn_retrain,
        choices=("adam", "momentum"),
        help=(
            "how each CNN retraining from θ̃ runs: adam = the release code's protocol, Adam resumed"
            " from θ̃'s moment estimates on minibatches of 500 (the same batches in every run, z"
            " dropped from them); momentum = deterministic full-batch heavy-ball steps"
        ),
    )
    p.add_argument(
        "--cnn-retrain-steps",
        type=int,
        default=_D.cnn_retrain_steps,
        help=(
            "steps of each retraining from θ̃ (default: 1,000 for adam — at the default rate the "
            "paper's per-parameter budget of 30,000 steps at 1e-6 —, 100 for momentum)"
        ),
    )
    p.add_argument(
        "--cnn-retrain-lr",
        type=float,
        default=_D.cnn_retrain_lr,
        help=(
            "retraining step size (default: 1/λmax(H) for momentum, 1%% of the training lr for adam"
            " — the release code's decayed rate)"
        ),
    )
    p.add_argument(
        "--cnn-damping",
        type=float,
        default=_D.cnn_damping,
        help="damping δ of H + δI (paper: 0.01)",
    )
    p.add_argument(
        "--cnn-test-index",
        type=int,
        default=_D.cnn_test_index,
        help="test point for the CNN (default: first misclassified)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_D.seed,
        help="seeds subsampling, LiSSA and the CNN's initialisation and batches",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="local|tcp://HOST:PORT",
        help=(
            "run the leave-one-out retrainings in parallel on Dask: 'local' starts a LocalCluster "
            "(one worker per core), tcp://host:port uses a running scheduler "
            "(pip install 'upweight[dask]'); default: one after the other in this process"
        ),
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="NAME",
        help=(
            "torch device of the CNN panel: the network, the data, the influence computation and"
            " every retraining (e.g. cuda); default cpu"
        ),
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help=(
            "discard the retrainings kept in OUT/retrainings by an earlier run of this command "
            "(by default a rerun resumes them and retrains only the points still missing)"
        ),
    )
    p.add_argument(
        "--merge",
        default=None,
        metavar="DIR",
        help=(
            "take the panels this run does not compute from DIR/results.json (an earlier fig2 run)"
        ),
    )


def _config(args: argparse.Namespace) -> Fig2Config:
    """The run's ``Fig2Config`` from the options (an InputError names the option it refuses)."""
    panels = tuple(s.strip() for s in args.panels.split(",") if s.strip())
    return config_from_args(Fig2Config, args, {"refit_method": "--refit"}, panels=panels)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ...datasets import load_mnist
    from ...report._files import write_text_atomic
    from ..fig2 import PAPER, run_fig2

    config = _config(args)
    merge = Path(args.merge) / "results.json" if args.merge else None
    if merge is not None and not merge.parent.is_dir():
        raise errors.InputError(
            f"--merge {args.merge}: no such folder; pass the --out folder of another fig2 run."
        )
    if merge is not None and merge.is_file():
        # a file that is there already must be readable, before any work
        _read_merge(args.merge, merge)
    logreg = any(p in config.panels for p in ("cg", "lissa"))
    mnist = load_mnist(args.data) if logreg else None
    small = load_mnist(args.data, subset="small10pct") if "cnn" in config.panels else None
    _say(f"upweight reproduce fig2 — Koh & Liang (2017) Fig. 2, panels {', '.join(config.panels)}")
    with contextlib.ExitStack() as stack:
        executor = open_executor(stack, args.scheduler, _say)
        try:
            r = run_fig2(
                mnist,
                small,
                config,
                progress=not args.no_progress,
                store=out / "retrainings",
                fresh=args.fresh,
                executor=executor,
                device=check_device(args.device) or "cpu",
            )
        except errors.StoreMismatchError as exc:
            raise errors.StoreMismatchError(
                f"{exc} For this command: rerun with --fresh to discard the retrainings kept in "
                f"{out / 'retrainings'}, or pass another --out."
            ) from exc
    for name in ("cg", "lissa", "cnn"):
        if name in r.panels and r.panels[name].resumed:
            _say(
                f"{name}: {r.panels[name].resumed} of {r.panels[name].k} retrainings resumed from"
                f" {out / 'retrainings'}"
            )
    res = r.to_json()
    merged: dict[str, Any] = {}
    if merge is not None:  # read at the end, so that a run in parallel may finish meanwhile
        if not merge.is_file():
            raise errors.InputError(
                f"--merge {args.merge}: no results.json there; pass the --out folder of a finished"
                " fig2 run."
            )
        merged = _read_merge(args.merge, merge)
    for name, value in merged.get("panels", {}).items():
        res["panels"].setdefault(name, value)
    if merged:
        res["logreg"] = res["logreg"] or merged.get("logreg", {})
        res["cnn"] = res["cnn"] or merged.get("cnn", {})
        res["merged_from"] = str(args.merge)
    lg, cn = res["logreg"], res["cnn"]
    if lg:
        _say(
            f"logistic regression: n={lg['n_train']:,}, p={lg['p']:,},"
            f" ‖∇R(θ̂)‖={lg['grad_norm']:.1e}, test point {lg['test_index']} (label"
            f" {lg['test_label']}, predicted {lg['test_prediction']}); CG {lg['cg_iterations']}"
            f" iterations; {lg['refit_method']} refits {lg['refit_seconds_per_point']:.2f} s/point,"
            f" max ‖∇R₋z‖ {lg['refit_grad_norm_max']:.1e}"
        )
    if cn:
        _say(
            f"CNN: n={cn['n_train']:,}, p={cn['p']:,}, train loss {cn['train_loss']:.3f},"
            f" ‖∇R(θ̃)‖={cn['grad_norm']:.2f}, {cn['damping_note']}; retraining"
            f" {cn['retrain_steps']} steps, lr {cn['retrain_lr']:.3g}; on {cn['device']}"
        )
    for name in ("cg", "lissa", "cnn"):
        if name in res["panels"]:
            p = res["panels"][name]
            _say(
                f"{name:5s}: {p['k']} points, Pearson {p['pearson']:.4f}, Spearman"
                f" {p['spearman']:.4f}, slope {p['slope']:.3f}"
            )
    _figure(res["panels"], out / "fig2.png")
    write_text_atomic(out / "report.md", _report(res, PAPER, args))
    return {"paper_section": "4.1-4.2", "paper": PAPER, **res}


def _read_merge(given: str, merge: Path) -> dict[str, Any]:
    """The results.json of another fig2 run, or an InputError saying why it cannot be used."""
    try:
        merged = json.loads(merge.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InputError(
            f"--merge {given}: {merge} is not a results.json written by fig2 ({exc}); "
            "pass the --out folder of a finished fig2 run."
        ) from exc
    if not isinstance(merged, dict) or not isinstance(merged.get("panels", {}), dict):
        raise errors.InputError(
            f"--merge {given}: {merge} is not a results.json written by fig2 (no 'panels' "
            "mapping); pass the --out folder of a finished fig2 run."
        )
    return merged


def _figure(panels: dict[str, Any], path: Path) -> Path:
    from types import SimpleNamespace

    from ...report import loo_scatter, new_figure, save_figure

    names = [n for n in ("cg", "lissa", "cnn") if n in panels]
    fig = new_figure(figsize=(5.0 * len(names), 5.0))
    colors = {"cg": "#1f5fa8", "lissa": "#6a3d9a", "cnn": "#c0392b"}
    for j, name in enumerate(names):
        p = panels[name]
        ax = fig.add_subplot(1, len(names), j + 1)
        loo_scatter(SimpleNamespace(**p), ax, color=colors[name])
        ax.set_title(
            f"{_TITLES[name]}\n{p['solver']}, {p['k']} points\nPearson R = {p['pearson']:.3f}, "
            f"slope = {p['slope']:.2f}",
            fontsize=9.5,
        )
    fig.tight_layout()
    return save_figure(fig, path)


def _lissa_setting(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The LiSSA panel's minibatch size, its scale and the truncation of its series."""
    panel = res["panels"].get("lissa")
    if panel is None:
        return "not run"
    batch = res.get("settings", {}).get("lissa_batch_size", args.lissa_batch_size)
    d = panel.get("details", {})
    scale, trunc = d.get("scale"), d.get("truncation")
    return (
        f"{batch}, {'-' if scale is None else format(scale, '.3g')},"
        f" {'-' if trunc is None else format(trunc, '.2g')}"
    )


def _report(res: dict[str, Any], paper: dict[str, Any], args: argparse.Namespace) -> str:
    P, lg, cn = res["panels"], res["logreg"], res["cnn"]

    def cell(name: str, key: str, fmt: str = ".4f") -> str:
        return format(P[name][key], fmt) if name in P else "not run"

    rows = [
        (
            "LR training points n / parameters p",
            f"{lg.get('n_train', 'not run')} / {lg.get('p', '-')}",
            "55,000 / 7,840",
        ),
        ("LR points retrained (k)", cell("cg", "k", "d"), "500"),
        ("CG: Pearson R", cell("cg", "pearson"), "on the diagonal (not stated)"),
        ("CG: Spearman", cell("cg", "spearman"), "-"),
        ("CG: slope of actual on predicted", cell("cg", "slope", ".3f"), "≈ 1"),
        (
            "LiSSA (r, t)",
            (
                f"({res.get('settings', {}).get('lissa_repeats', args.lissa_repeats)}, "
                f"{res.get('settings', {}).get('lissa_depth', args.lissa_depth)})"
            ),
            "(10, 5,000)",
        ),
        (
            "LiSSA: batch size, scale, truncation (1 − (l2 + δ)/s)ᵗ⁺¹",
            _lissa_setting(res, args),
            "1, –, –",
        ),
        ("LiSSA: Pearson R", cell("lissa", "pearson"), "on the diagonal (not stated)"),
        ("LiSSA: slope", cell("lissa", "slope", ".3f"), "≈ 1"),
        (
            "CNN training points / parameters",
            f"{cn.get('n_train', 'not run')} / {cn.get('p', '-')}",
            "5,500 / 2,616",
        ),
        ("CNN damping", f"{cn.get('damping_used', '-')}", "0.01"),
        ("CNN points retrained", cell("cnn", "k", "d"), "100"),
        ("CNN: Pearson R", cell("cnn", "pearson", ".3f"), "0.86 (release notebook: 0.875)"),
        ("CNN: Spearman", cell("cnn", "spearman", ".3f"), "-"),
    ]
    lines = [
        "# Fig. 2 — influence vs leave-one-out retraining (Koh & Liang 2017, §4.1–4.2)",
        "",
        markdown_table(("quantity", "ours", "paper"), rows),
        "",
    ]
    if lg:
        lines += [
            (
                f"Logistic regression: 10-class, no bias, L2 = {lg['l2']:g}, θ̂ the float64 minimum"
                f" (‖∇R‖ = {lg['grad_norm']:.1e}); test point {lg['test_index']} (label"
                f" {lg['test_label']}, predicted {lg['test_prediction']}, loss"
                f" {lg['test_loss']:.3f}). Each LOO refit starts at θ̂ and stops at ‖∇R₋z‖∞ ≤ 1e-9"
                f" ({lg['refit_method']}; largest final ‖∇R₋z‖₂ {lg['refit_grad_norm_max']:.1e})."
                " The LiSSA panel uses the CG panel's points and refits."
            ),
            "",
        ]
    if cn:
        lines += [
            (
                f"CNN: all-convolutional tanh network, {cn['p']} parameters, Adam"
                f" ({cn['train_steps']} steps, lr {cn['train_lr']:g}"
                f"{_SCHEDULE_TEXT[cn.get('train_schedule', 'constant')]}, batch"
                f" {cn['batch_size']}; on {cn.get('device', 'cpu')}) to"
                f" θ̃ with train loss {cn['train_loss']:.3f} and ‖∇R(θ̃)‖ = {cn['grad_norm']:.2f}"
                f" (not converged); {cn['damping_note']}. Actual change: retraining from θ̃ for"
                f" {cn['retrain_steps']} {_RETRAIN_TEXT[cn.get('retrain', 'momentum')]} (lr"
                f" {cn['retrain_lr']:.3g}) without z, minus the same retraining with z kept."
                " Against the release code's baseline θ̃ instead of the kept retraining, Pearson R"
                f" = {cn['pearson_vs_theta_tilde']:.3f}."
            ),
            "",
        ]
    lines += ["Figure: `fig2.png`.", ""]
    return "\n".join(lines)
