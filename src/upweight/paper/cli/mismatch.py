"""``upweight reproduce mismatch``: §5.3 domain mismatch on the hospital-readmission data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MismatchConfig
from ._common import config_from_args
from ._common import say as _say

NAME = "mismatch"
HELP = "§5.3 debugging domain mismatch on hospital readmission (Diabetes 130-US hospitals)"
DATA_HELP = "hospital_koh2017.npz, diabetic_data.csv[.gz], dataset_diabetes.zip or their folder"
# written into --out (results.json is written by the runner)
OUTPUTS = ("mismatch.png", "report.md")


#: the options' defaults (the release notebook's settings)
_D = MismatchConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce mismatch``: one per ``MismatchConfig`` field but ``top`` and
    ``baseline`` (same name)."""
    p.add_argument("--l2", type=float, default=_D.l2, help="L2 strength (release notebook: 1e-4)")
    p.add_argument(
        "--seed",
        type=int,
        default=_D.seed,
        help=(
            "pick the non-readmitted child kept at random with this seed "
            "(default: the last in training order, as the release notebook)"
        ),
    )
    p.add_argument(
        "--test-index",
        type=int,
        default=_D.test_index,
        help="test child to explain (default 1742, the notebook's, if misclassified)",
    )


def _config(args: argparse.Namespace) -> MismatchConfig:
    """The run's ``MismatchConfig`` from the options (an InputError names the option)."""
    return config_from_args(MismatchConfig, args)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ...datasets import load_hospital
    from ...report._files import write_text_atomic
    from ..mismatch import PAPER, run_mismatch

    c = _config(args)
    data = load_hospital(args.data)
    _say(
        f"upweight reproduce mismatch — Koh & Liang (2017) §5.3 on {data.name}:"
        f" {len(data.x_train):,} training / {len(data.x_test):,} test points,"
        f" {data.x_train.shape[1]} features"
    )
    r = run_mismatch(data, c, progress=not args.no_progress)
    _say(
        f"removed {len(r.removed)} of the non-readmitted training children → {r.n_train:,} points; "
        f"children kept {r.children_kept} (labels {r.children_kept_labels})"
    )
    _say(
        f"trained logistic regression (l2={r.l2:g}, ‖∇R‖ = {r.grad_norm:.1e});"
        f" {r.test_children_wrong}/{r.test_children} test children misclassified; explaining test"
        f" child {r.test_index} (label {r.test_label:+d}, score {r.test_score:+.3f})"
    )
    _say(
        f"top 4 by |I_up,loss|: {r.top_indices[:4]} (children: {r.top_is_child[:4]}); "
        f"ranks of the 4 children {r.children_rank}"
    )
    _say(
        "|I_up,loss| of the children / largest non-child:"
        f" {', '.join(f'{x:.1f}' for x in r.children_ratio)} (paper: 30–40×)"
    )
    _say(
        f"coefficient of {r.feature_names[17]}: {r.child_coef:+.3f}; {r.coef_larger_than_child}/127"
        " larger (paper: 14/127)"
    )
    _say(
        f"I_pert,loss: rank of {r.feature_names[17]} among 127 features per child"
        f" {r.pert_child_rank}, among the child's non-zero features {r.pert_child_rank_active};"
        f" largest overall: {r.pert_top_feature}"
    )

    _mismatch_figure(r, out / "mismatch.png")
    write_text_atomic(out / "report.md", _mismatch_report(r, PAPER))
    return {"paper_section": "5.3", "paper": PAPER, **r.to_json()}


def _mismatch_figure(r: Any, path: Path) -> Path:
    from ...report import new_figure, save_figure

    up = -np.asarray(r.up_loss_all)  # −I_up,loss, as the paper plots
    child = np.zeros(len(up), bool)
    kept = set(r.children_kept)
    # positions of the kept children in the mismatch training set: rank order of original indices
    removed = np.asarray(r.removed)
    for c in kept:
        child[c - int((removed < c).sum())] = True
    fig = new_figure(figsize=(11.0, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    idx = np.arange(len(up))
    ax1.scatter(idx[~child], up[~child], s=3, color="#9a9a9a", label="other training points")
    ax1.scatter(
        idx[child], up[child], s=40, color="#d62728", zorder=3, label="the 4 training children"
    )
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_xlabel("training point (mismatch set)")
    ax1.set_ylabel("−I_up,loss(z, z_test)")
    ax1.set_title(
        f"Influence on test child {r.test_index}: ratio ≥ {r.ratio_min:.0f}× (paper 30–40×)",
        fontsize=9,
    )
    ax1.legend(fontsize=8, loc="best")
    pert = np.asarray(r.pert_abs_mean)
    colors = ["#d62728" if i == 17 else "#1f5fa8" for i in range(len(pert))]
    ax2.bar(np.arange(len(pert)), pert, color=colors)
    top = int(np.argmax(pert))
    ax2.annotate(r.feature_names[top], (top, pert[top]), fontsize=7, ha="left")
    ax2.annotate(r.feature_names[17], (17, pert[17]), fontsize=7, color="#d62728", ha="left")
    ax2.set_xlabel("feature")
    ax2.set_ylabel("mean |I_pert,loss| over the 4 children")
    ax2.set_title("Which feature of the children matters (red: age_[0-10))", fontsize=9)
    return save_figure(fig, path)


def _mismatch_report(r: Any, paper: dict[str, Any]) -> str:
    rows = [
        (
            "training children (readmitted)",
            f"{len(r.children_original)} ({sum(lab == 1 for lab in r.children_kept_labels)})",
            f"{paper['n_children_train']} ({paper['n_children_readmitted']})",
        ),
        ("non-readmitted children removed", f"{len(r.removed)}", f"{paper['n_removed']}"),
        ("training points after removal", f"{r.n_train:,}", "19,980"),
        ("test children misclassified", f"{r.test_children_wrong}/{r.test_children}", '"many"'),
        (
            "test child explained",
            f"{r.test_index} (label {r.test_label:+d})",
            "a random misclassified child (notebook: 1742)",
        ),
        (
            "ranks of the 4 children by abs(I_up,loss)",
            ", ".join(map(str, sorted(r.children_rank))),
            "top 4",
        ),
        (
            "abs(I_up,loss) child / largest non-child",
            ", ".join(f"{x:.1f}×" for x in r.children_ratio),
            "30–40×",
        ),
        (
            "sign of −I_up,loss: non-readmitted child / readmitted children",
            (
                f"{'+' if -r.children_up_loss[r.children_kept_labels.index(-1)] > 0 else '−'} / "
                + "".join(
                    "+" if -u > 0 else "−"
                    for u, lab in zip(r.children_up_loss, r.children_kept_labels)
                    if lab == 1
                )
            ),
            "+ / −−−",
        ),
        (
            "features with a larger abs(coefficient) than age_[0-10)",
            f"{r.coef_larger_than_child}/127",
            f"{paper['coef_larger_than_child']}/127",
        ),
        (
            "rank of age_[0-10) by abs(I_pert,loss), all 127 features",
            ", ".join(map(str, r.pert_child_rank)),
            '1 ("by far the largest")',
        ),
        (
            "rank of age_[0-10) among each child's non-zero features",
            ", ".join(map(str, r.pert_child_rank_active)),
            "1",
        ),
    ]
    lines = [
        "# Domain mismatch (Koh & Liang 2017, §5.3) — hospital readmission",
        "",
        (
            f"Binary logistic regression with bias, l2 = {r.l2:g} (release notebook), trained to"
            " ‖∇R‖ = "
            f"{r.grad_norm:.1e} in float64; exact Hessian (Direct). Kept non-readmitted child: "
            + (
                "the last in training order (notebook)"
                if r.seed is None
                else f"random, seed {r.seed}"
            )
            + "."
        ),
        "",
        "| quantity | ours | paper |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        (
            "Largest abs(I_pert,loss) over all 127 features, per child:"
            f" {', '.join(r.pert_top_feature)}. I_pert,loss scores a small change of each feature."
            " A feature that is 0 for the child but carries a large coefficient"
            " (discharge_disposition_id_11, 'expired', has the largest) can outscore age_[0-10);"
            " among the features each child actually has, age_[0-10) comes first."
        ),
        "",
        (
            "Figure: `mismatch.png` (left: −I_up,loss over the training points, children in red; "
            "right: mean abs(I_pert,loss) per feature over the 4 children)."
        ),
        "",
    ]
    return "\n".join(lines)
