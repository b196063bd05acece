"""``upweight reproduce fig1``: §2.3 / Figure 1, the components of influence (logistic regression,
MNIST 1 vs 7)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Fig1Config
from ._common import config_from_args, markdown_table
from ._common import say as _say

NAME = "fig1"
HELP = (
    "§2.3 / Fig. 1 components of influence: I_up,loss vs its variants without train loss and H⁻¹"
    " (MNIST 1 vs 7)"
)
DATA_HELP = (
    "'bundled' (the MNIST 1-vs-7 set shipped with upweight) or your MNIST copy: the folder with the"
    " four IDX files or mnist.npz, split as load_mnist(path, subset='1v7')"
)
OUTPUTS = ("fig1.png", "report.md")  # written into --out (results.json is written by the runner)


def load_1v7(spec: str) -> Any:
    """MNIST 1 vs 7 from ``--data``: ``bundled`` → ``load_mnist_1v7()``, else ``load_mnist(spec,
    subset="1v7")``."""
    from ...datasets import load_mnist, load_mnist_1v7

    if str(spec).strip().lower() == "bundled":
        return load_mnist_1v7()
    return load_mnist(spec, subset="1v7")


#: the options' defaults (the release code's settings)
_D = Fig1Config()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce fig1``: one per ``Fig1Config`` field (same name)."""
    p.add_argument(
        "--l2", type=float, default=_D.l2, help="L2 strength (release code: weight decay 0.01)"
    )
    p.add_argument(
        "--test-index",
        type=int,
        default=_D.test_index,
        help="test image of the 1-vs-7 test set (release code: 30, a 7)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=_D.n_train,
        help="use the first N training images (default: all 11,800)",
    )
    p.add_argument(
        "--top-k", type=int, default=_D.top_k, help="size of the top-harmful/helpful sets compared"
    )


def _config(args: argparse.Namespace) -> Fig1Config:
    """The run's ``Fig1Config`` from the options (an InputError names the option)."""
    return config_from_args(Fig1Config, args)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ...report._files import write_text_atomic
    from ..fig1 import PAPER, run_fig1

    c = _config(args)
    data = load_1v7(args.data)
    n = len(data.x_train) if c.n_train is None else c.n_train
    _say(
        f"upweight reproduce fig1 — Koh & Liang (2017) §2.3 on {data.name}: {n:,} of"
        f" {len(data.x_train):,} training images, test image {c.test_index}"
    )
    r = run_fig1(data, c, progress=not args.no_progress)
    digit = "1" if r.test_label > 0 else "7"
    _say(
        f"logistic regression, no bias, l2={r.l2:g}: ‖∇R‖ = {r.grad_norm:.1e}; test image"
        f" {r.test_index} is a {digit}, p(correct) = {r.test_prob_correct:.3f}"
    )
    _say(
        "I_up,loss (Influence, Direct) vs the paper's closed form: max relative difference"
        f" {r.closed_form_max_rel_err:.1e}"
    )
    for k in ("no_train_loss", "no_hessian", "no_both"):
        _say(
            f"{k:>14}: Pearson {r.pearson[k]:+.3f}, Spearman {r.spearman[k]:+.3f}, top-{r.top_k}"
            f" harmful shared {r.top_harmful_overlap[k]}, helpful shared"
            f" {r.top_helpful_overlap[k]}, same-label harmful"
            f" {r.same_label_harmful[k]}/{r.n_same_label}"
        )
    _say(
        "same-label training points that are harmful (I_up,loss > 0):"
        f" {r.same_label_harmful['full']}/{r.n_same_label}; the most harmful is training image"
        f" {r.harmful_same_label_index} (rank {r.harmful_same_label_rank} overall; rank"
        f" {r.harmful_same_label_variant_rank['no_both']} by the inner-product variant)"
    )

    fig1_figure(r, out / "fig1.png")
    write_text_atomic(out / "report.md", fig1_report(r, PAPER))
    return {"paper_section": "2.3", "paper": PAPER, **r.to_json()}


def fig1_figure(r: Any, path: Path) -> Path:
    """Panel (a): I_up,loss against each variant (green: the test label, red: the other);
    panel (b): the test image and the most harmful training image with its label."""
    from ...report import new_figure, save_figure
    from ..fig1 import VARIANT_LABELS

    up = np.asarray(r.up_loss)
    same = np.asarray(r.train_labels) == r.test_label
    digit, other = ("1", "7") if r.test_label > 0 else ("7", "1")
    fig = new_figure(figsize=(15.0, 3.9))
    gs = fig.add_gridspec(1, 5, width_ratios=[1, 1, 1, 0.55, 0.55], wspace=0.38)
    for j, key in enumerate(("no_train_loss", "no_hessian", "no_both")):
        ax = fig.add_subplot(gs[0, j])
        v = np.asarray(r.variants[key])
        ax.scatter(
            up[~same],
            v[~same],
            s=3,
            color="#d62728",
            alpha=0.45,
            rasterized=True,
            label=f"train {other}s",
        )
        ax.scatter(
            up[same],
            v[same],
            s=3,
            color="#2ca02c",
            alpha=0.45,
            rasterized=True,
            label=f"train {digit}s (test label)",
        )
        ax.axhline(0, color="0.6", lw=0.6)
        ax.axvline(0, color="0.6", lw=0.6)
        ax.set_xlabel("I_up,loss (full)", fontsize=9)
        ax.set_ylabel(f"I_up,loss {VARIANT_LABELS[key].split(' (')[0]}", fontsize=8)
        ax.set_title(
            f"{VARIANT_LABELS[key]}\nPearson {r.pearson[key]:.2f}, Spearman {r.spearman[key]:.2f}, "
            f"top-{r.top_k} harmful shared {r.top_harmful_overlap[key]}",
            fontsize=8.5,
        )
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        if j == 0:
            ax.legend(fontsize=7, loc="best", markerscale=3)
    shape = tuple(r.image_shape) if len(r.image_shape) == 2 else (28, 28)
    for j, (img, cap) in enumerate(
        (
            (r.test_image, f"test image {r.test_index} (a {digit})"),
            (
                r.harmful_image,
                (
                    f"train {r.harmful_same_label_index}: most harmful {digit}\n"
                    f"I_up,loss = {r.harmful_same_label_up_loss:+.3g}"
                ),
            ),
        )
    ):
        ax = fig.add_subplot(gs[0, 3 + j])
        ax.imshow(np.asarray(img).reshape(shape), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(cap, fontsize=8.5)
    fig.suptitle(
        "Components of influence (Koh & Liang 2017, Fig. 1): logistic regression, MNIST 1 vs 7, n"
        f" = {r.n_train:,}",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.14, top=0.80)
    return save_figure(fig, path)


def fig1_report(r: Any, paper: dict[str, Any]) -> str:
    digit = "1" if r.test_label > 0 else "7"
    rows = [
        ("training images (1 vs 7)", f"{r.n_train:,}", f"{paper['n_train']:,}"),
        (
            "model",
            f"logistic regression, no bias, l2 = {r.l2:g}",
            "logistic regression, no bias, weight decay 0.01",
        ),
        (
            "test image",
            f"{r.test_index} (a {digit})",
            f"an arbitrary 7 (release code: {paper['test_index']})",
        ),
        (
            "I_up,loss (upweight, Direct) vs the closed form of §2.3",
            f"max rel. difference {r.closed_form_max_rel_err:.1e}",
            "the closed form",
        ),
        (
            "training 7s harmful to the test 7: full I_up,loss",
            f"{r.same_label_harmful['full']:,} of {r.n_same_label:,}",
            "many (green points above 0)",
        ),
        (
            "… without H⁻¹ / without both",
            f"{r.same_label_harmful['no_hessian']} / {r.same_label_harmful['no_both']}",
            "none: with pixels ≥ 0, x·x_test ≥ 0, so every same-label point is helpful",
        ),
    ]
    for k, desc in (
        ("no_train_loss", "overestimates many points near 0"),
        ("no_hessian", "signs by label only"),
        ("no_both", "points lie far off the diagonal"),
    ):
        rows.append(
            (
                f"variant {k}: Pearson / Spearman with I_up,loss",
                f"{r.pearson[k]:.3f} / {r.spearman[k]:.3f}",
                f"not reported ({desc})",
            )
        )
        rows.append(
            (
                f"variant {k}: of the top {r.top_k} harmful / helpful, shared",
                f"{r.top_harmful_overlap[k]} / {r.top_helpful_overlap[k]}",
                "not reported",
            )
        )
    rows.append(
        (
            "most harmful training image with the test label (panel b)",
            (
                f"train {r.harmful_same_label_index}: rank {r.harmful_same_label_rank} by"
                f" I_up,loss, rank {r.harmful_same_label_variant_rank['no_both']:,} by the"
                " inner-product variant"
            ),
            "a harmful 7 unlike the test 7, which the inner product ranks low",
        )
    )
    return "\n".join(
        [
            "# Components of influence (Koh & Liang 2017, §2.3, Figure 1)",
            "",
            (
                f"MNIST 1 (+1) vs 7 (−1), binary logistic regression without bias, l2 = {r.l2:g},"
                f" trained to ‖∇R‖ = {r.grad_norm:.1e} in float64. I_up,loss from"
                " `upweight.Influence` with the exact solver (`Direct`); the variants drop the"
                " training-loss factor σ(−yθᵀx) and/or replace H⁻¹ by the identity, as the release"
                " code does."
            ),
            "",
            markdown_table(["quantity", "ours", "paper"], rows),
            "",
            (
                "Figure: `fig1.png` (left three panels: I_up,loss against each variant, green ="
                " training images with the test image's label, red = the other digit; right: the"
                " test image and the most harmful training image of the same digit)."
            ),
            "",
        ]
    )
