"""``upweight reproduce attack``: §5.2 training-set attacks through I_pert,loss on the
frozen-feature model."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from ...cli._scheduler import open_executor
from ...errors import StoreMismatchError
from ..config import EXTRACTORS, PROJECTIONS, AttackConfig
from ._common import markdown_table
from ._common import say as _say
from .compare_models import add_feature_arguments, build_setup, feature_config

NAME = "attack"
HELP = (
    "§5.2 training-set attacks: perturb training images by sign(I_pert,loss), retrain, flip a test"
    " prediction"
)
DATA_HELP = "MNIST: a folder with the four IDX files, or mnist.npz"
OUTPUTS = ("attack.png", "report.md")  # written into --out (results.json is written by the runner)
FOLDERS = ("targets",)  # kept in --out: the single-target attacks (--fresh discards them)


#: the options' defaults
_D = AttackConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce attack``: one per ``AttackConfig`` field but ``multi_k`` (same
    name), ``--scheduler`` and ``--fresh``."""
    add_feature_arguments(p)
    p.add_argument(
        "--targets",
        type=int,
        default=_D.targets,
        help=(
            "attack only the first N correctly classified test images (alternating classes); "
            "default: all of them, as the paper (591)"
        ),
    )
    p.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default=_D.projection,
        help=(
            "Π: 'same-8bit' (the paper's: each pixel stays in its own 8-bit cell, ε ≤ 0.5 level,"
            " any real value) or 'levels' (whole 8-bit levels: integer --epsilon and --step, a"
            " valid 8-bit image)"
        ),
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help=(
            "L∞ bound in 8-bit levels: each pixel stays within epsilon/255 of the original"
            " (default: the paper's 0.5; with --projection levels an integer ≥ 1, default 8)"
        ),
    )
    p.add_argument(
        "--step",
        type=float,
        default=None,
        help=(
            "α in 8-bit levels per iteration, α = step/255 (default: the paper's 0.02; with"
            " --projection levels an integer ≥ 1, default 1)"
        ),
    )
    p.add_argument(
        "--iterations", type=int, default=_D.iterations, help="iterations per attack (paper: 100)"
    )
    p.add_argument(
        "--max-k",
        type=int,
        default=_D.max_k,
        help="most training images perturbed per target (paper: 10)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=_D.group_size,
        help="test images in the multi-target attack (paper: 30; 0 skips it)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="local|tcp://HOST:PORT",
        help=(
            "attack the targets in parallel on Dask: 'local' starts a LocalCluster (one worker per "
            "core), tcp://host:port uses a running scheduler (pip install 'upweight[dask]'); "
            "default: one after the other in this process"
        ),
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help=(
            "discard the single-target attacks kept in OUT/targets by an earlier run of this "
            "command (by default a rerun with the same settings resumes them and attacks only the "
            "targets still missing)"
        ),
    )


def _config(args: argparse.Namespace) -> AttackConfig:
    """The run's ``AttackConfig`` from the options (an InputError names the option)."""
    return feature_config(AttackConfig, args)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ...report._files import write_text_atomic
    from ..attack import PAPER, run_attack

    c = _config(args)
    setup = build_setup(c, args.data)
    which = "all correctly classified" if c.targets is None else f"{c.targets}"
    _say(
        f"attacking {which} test images: Π = {c.projection}, ε = {c.epsilon:g}/255,"
        f" α = {c.step:g}/255, ≤ {c.iterations}"
        " iterations, k = 1, 1 (2nd), 2, 3, 5, 10 training images, exact retrain of the top layer"
        " after each step"
    )
    with contextlib.ExitStack() as stack:
        executor = open_executor(stack, args.scheduler, _say)
        try:
            r = run_attack(
                setup,
                c,
                progress=not args.no_progress,
                executor=executor,
                store=out / "targets",
                fresh=args.fresh,
            )
        except StoreMismatchError as exc:
            raise StoreMismatchError(
                f"{exc} For this command: rerun with --fresh to discard the attacks kept in "
                f"{out / 'targets'}, or pass another --out."
            ) from exc
    n = len(r.targets)
    if r.resumed:
        _say(f"{r.resumed} of {n} single-target attacks resumed from {out / 'targets'}")
    _say(
        "flipped (cumulative, ≤ k images): "
        + ", ".join(f"k={k}: {v}/{n} ({v / n:.0%})" for k, v in r.flips_by_k.items())
        + f"; every flip verified by a cold retrain: {r.verified_all}"
    )
    if r.multi:
        _say(
            f"multi-target: group of {len(r.multi['group'])} test images; flipped "
            + ", ".join(f"{v['flipped']} with {k} image(s)" for k, v in r.multi["by_k"].items())
        )
    _figure(r, setup.task, out / "attack.png")
    write_text_atomic(out / "report.md", _report(r, PAPER))
    return {"paper_section": "5.2", "paper": PAPER, **r.to_json()}


def _figure(r: Any, task: Any, path: Path) -> Path:
    from ...report import new_figure, save_figure

    fig = new_figure(figsize=(11.0, 3.8))
    gs = fig.add_gridspec(1, 5, width_ratios=[1, 1, 1, 1, 2.2])
    a, b = task.digits
    ex = r.example
    if ex:
        orig = np.asarray(ex["original_levels"][0]) / 255.0
        pert = np.asarray(ex["perturbed_levels"][0]) / 255.0
        run = ex["run"]
        digit = lambda lab: a if lab > 0 else b  # noqa: E731
        panels = [
            (
                orig,
                (
                    f"training image {ex['train'][0]}\n(digit"
                    f" {digit(task.y_train[ex['train'][0]])}), original"
                ),
                0,
                1,
                "gray_r",
            ),
            (
                pert,
                f"perturbed (L∞ = {run['linf_levels']:.3g}/255)\nretrained after each step",
                0,
                1,
                "gray_r",
            ),
            (
                (pert - orig) * 255,
                "difference (levels)",
                -r.epsilon_levels,
                r.epsilon_levels,
                "RdBu_r",
            ),
            (
                task.x_test[ex["target"]],
                (
                    f"test image {ex['target']} (digit {digit(task.y_test[ex['target']])})\n"
                    f"margin {run['margin_before'][0]:+.2f} → {run['margin_after'][0]:+.2f}"
                ),
                0,
                1,
                "gray_r",
            ),
        ]
        for j, (img, title, vmin, vmax, cmap) in enumerate(panels):
            ax = fig.add_subplot(gs[0, j])
            ax.imshow(np.asarray(img).reshape(28, 28), cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=7.5)
            ax.axis("off")
    ax = fig.add_subplot(gs[0, 4])
    ks = list(r.flip_rate)
    ours = [r.flip_rate[k] for k in ks]
    paper = {"1": 0.57, "2": 0.77, "10": 590 / 591}
    x = np.arange(len(ks))
    ax.bar(
        x - 0.2,
        ours,
        0.4,
        color="#1f5fa8",
        label=f"ours ({len(r.targets)} targets, ε = {r.epsilon_levels:g}/255)",
    )
    ax.bar(
        [i + 0.2 for i, k in enumerate(ks) if k in paper],
        [paper[k] for k in ks if k in paper],
        0.4,
        color="#bbbbbb",
        label="paper (591 targets, ε = 0.5/255)",
    )
    for i, v in enumerate(ours):
        ax.text(i - 0.2, v + 0.01, f"{v:.0%}", ha="center", fontsize=7)
    ax.set_xticks(x, [f"≤ {k}" for k in ks])
    ax.set_xlabel("training images perturbed")
    ax.set_ylabel("test predictions flipped")
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Flip rate (each flip verified by retraining)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _report(r: Any, paper: dict[str, Any]) -> str:
    n = len(r.targets)
    fr = r.flip_rate
    rows = [
        (
            "task",
            f"{r.digits[0]} vs {r.digits[1]}, {r.n_train:,} train / {r.n_test} test",
            "dog vs fish, 1,800 / 600",
        ),
        (
            "test images classified correctly",
            f"{r.n_correct}/{r.n_test}",
            f"{paper['n_correct']}/{paper['n_test']}",
        ),
        ("targets attacked", f"{n}", f"{paper['n_correct']}"),
        (
            "perturbation bound (per pixel)",
            (
                f"±{r.epsilon_levels:g}/255, same 8-bit representation"
                if r.projection == "same-8bit"
                else f"±{r.epsilon_levels:g}/255, whole levels (an 8-bit image)"
            ),
            "±0.5/255 (same 8-bit representation)",
        ),
        ("step α, iterations", f"{r.step_levels:g}/255, ≤ {r.iterations}", "0.02/255, 100"),
        (
            "flipped with 1 training image",
            f"{r.flips_by_k.get('1', 0)}/{n} ({fr.get('1', 0):.0%})",
            "335/591 (57%)",
        ),
        ("flipped with ≤ 2", f"{fr.get('2', 0):.0%}", "77%"),
        ("flipped with ≤ 10", f"{fr.get('10', 0):.0%}", "all but 1 (99.8%)"),
        ("every flip verified by a cold retrain", str(r.verified_all), "—"),
        (
            "‖Δx‖₂ / mean distance to class centroid, pixels (1-image flips, median)",
            f"{r.pixel_to_centroid:.3f}",
            "< 0.01",
        ),
        ("… the same in feature space", f"{r.feature_to_centroid:.3f}", '"same order" (~1)'),
        (
            "‖Δx‖₂ per perturbed image / mean distance to class centroid, pixels (every target's"
            " last attack, median)",
            f"{r.pixel_to_centroid_per_image:.4f}",
            "< 0.01",
        ),
        ("… the same in feature space", f"{r.feature_to_centroid_per_image:.4f}", "~1"),
        (
            "feature sensitivity: relative change of the features / of the pixels (median)",
            f"{r.feature_sensitivity:.1f}",
            "≳ 100 (the two rows above)",
        ),
    ]
    if r.multi:
        for k, v in r.multi["by_k"].items():
            rows.append(
                (
                    f"multi-target: group of {len(r.multi['group'])} flipped with {k} image(s)",
                    f"{v['flipped']} (verified {v['verified']})",
                    "16/30 with 1 image" if k == "1" else "—",
                )
            )
    return "\n".join(
        [
            "# Training-set attacks (Koh & Liang 2017, §5.2)",
            "",
            (
                f"Frozen feature {EXTRACTORS[r.cnn.get('extractor', 'cnn')]} (trained here on"
                f" {r.cnn['n_images']:,} 10-class MNIST images;"
                f" stand-in for Inception v3) + logistic regression on its {r.cnn['n_features']}"
                f" features (l2 = {r.l2:g}). For each target, the training images with the largest"
                " ‖I_pert,loss‖₁ are perturbed by α·sign(I_pert,loss) (through the CNN to the"
                " pixels), projected back within ε of the original"
                + (
                    " inside each pixel's own 8-bit cell (the paper's Π)"
                    if r.projection == "same-8bit"
                    else " on the 8-bit grid (whole levels)"
                )
                + ", and the top layer"
                " is retrained exactly after every step; k = 1 (first), 1 (second), 2, 3, 5, 10"
                " images are tried in turn (release code)."
            ),
            "",
            markdown_table(("quantity", "ours", "paper"), rows),
            "",
            (
                "Figure: `attack.png` (a 1-image attack that flipped its target: original,"
                " perturbed, difference, target; right: flip rates next to the paper's)."
            ),
            "",
        ]
    )
