"""``upweight reproduce compare-models``: §5.1 (Fig. 4), one test image explained by a
frozen-feature model and by an RBF SVM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ... import errors
from ..config import EXTRACTORS, CompareModelsConfig, FeatureConfig
from ._common import C, config_from_args, markdown_table
from ._common import say as _say

NAME = "compare-models"
HELP = (
    "§5.1 understanding model behaviour: frozen CNN features + logistic regression vs an RBF SVM"
    " (Fig. 4)"
)
DATA_HELP = "MNIST: a folder with the four IDX files, or mnist.npz"
# written into --out (results.json is written by the runner)
OUTPUTS = ("compare_models.png", "report.md")


#: the options' defaults (the paper's settings)
_D = CompareModelsConfig()


def add_feature_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with ``reproduce attack``: the binary task and the feature CNN, one per
    ``FeatureConfig`` field (same name; paper/features.py)."""
    d = FeatureConfig()
    p.add_argument(
        "--digits",
        default=",".join(map(str, d.digits)),
        help="the two MNIST digits (first → +1); 4 vs 9: a visually similar pair",
    )
    p.add_argument(
        "--n-per-class",
        type=int,
        default=d.n_per_class,
        help="training images per class (paper: 900)",
    )
    p.add_argument(
        "--n-test-per-class",
        type=int,
        default=d.n_test_per_class,
        help="test images per class (release code: 300)",
    )
    p.add_argument(
        "--cnn-images",
        type=int,
        default=d.cnn_images,
        help=(
            "10-class MNIST images (outside the task's training set) the feature CNN is trained on"
        ),
    )
    p.add_argument(
        "--cnn-epochs", type=int, default=d.cnn_epochs, help="epochs of feature-CNN training"
    )
    p.add_argument(
        "--n-features",
        type=int,
        default=d.n_features,
        help="size of the CNN feature layer (the top layer's input)",
    )
    p.add_argument(
        "--l2", type=float, default=d.l2, help="L2 strength of the top layer (release code: 0.001)"
    )
    p.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        default=d.extractor,
        help="the frozen feature network: 'cnn' (two convolutions) or 'resnet' (13 convolutions)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the CNN's initialisation, shuffling and image choice",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce compare-models``: one per ``CompareModelsConfig`` field (same
    name)."""
    add_feature_arguments(p)
    p.add_argument(
        "--test-index",
        type=int,
        default=_D.test_index,
        help=(
            "test image to explain (default: the first both models get right inside the SVM margin)"
        ),
    )
    p.add_argument(
        "--gamma-scale",
        type=float,
        default=_D.gamma_scale,
        help="RBF γ = gamma_scale / median squared pixel distance",
    )
    p.add_argument(
        "--t", type=float, default=_D.t, help="smooth-hinge temperature of the SVM (paper: 0.001)"
    )
    p.add_argument(
        "--svm-l2",
        type=float,
        default=_D.svm_l2,
        help="L2 strength of the SVM (release code: 0.001)",
    )
    p.add_argument(
        "--n-tests",
        type=int,
        default=_D.n_tests,
        help="test images the median correlations are taken over",
    )


def parse_digits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise errors.InputError(
            f"--digits must be two digits separated by a comma, e.g. 4,9; got {text!r}."
        ) from exc


def feature_config(cls: type[C], args: argparse.Namespace) -> C:
    """``cls`` (``CompareModelsConfig`` or ``AttackConfig``) from the options (an InputError names
    the option)."""
    return config_from_args(cls, args, digits=parse_digits(args.digits))


def _config(args: argparse.Namespace) -> CompareModelsConfig:
    """The run's ``CompareModelsConfig`` from the options (an InputError names the option)."""
    return feature_config(CompareModelsConfig, args)


def build_setup(config: FeatureConfig, data_path: str) -> Any:
    """Load MNIST from ``data_path`` and build the task, the CNN and the top-layer model (one
    thread, as documented)."""
    import torch

    from ...datasets import load_mnist
    from ..features import build_feature_model

    # the documented timings and the CNN's exact weights are for one thread
    torch.set_num_threads(1)
    try:  # scipy's L-BFGS spins OpenBLAS threads on a busy machine otherwise (10× slower refits)
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    data = load_mnist(data_path)
    c = config
    _say(
        f"training the feature {EXTRACTORS[c.extractor]} on {c.cnn_images:,} 10-class MNIST images "
        f"({c.cnn_epochs} epochs, {c.n_features} features, seed {c.seed}) …"
    )
    setup = build_feature_model(data, c)
    acc = float((np.sign(setup.test_scores()) == setup.task.y_test).mean())
    _say(
        f"{EXTRACTORS[c.extractor]}: {setup.cnn.seconds:.1f}s, 10-class test accuracy"
        f" {setup.cnn.test_accuracy_10class:.4f}; task {c.digits[0]} vs {c.digits[1]}:"
        f" {len(setup.task.y_train):,} train / {len(setup.task.y_test):,} test; top layer"
        f" (l2={c.l2:g}, ‖∇R‖ = {setup.grad_norm:.1e}) test accuracy {acc:.4f}"
    )
    return setup


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ...report._files import write_text_atomic
    from ..compare_models import PAPER, run_compare_models

    c = _config(args)
    setup = build_setup(c, args.data)
    r = run_compare_models(setup, c, progress=not args.no_progress)
    _say(
        f"RBF SVM (γ = {r.rbf_gamma:.4g}, SmoothHinge t={c.t:g}, ‖∇R‖ = {r.rbf.grad_norm:.1e}) "
        "test accuracy "
        f"{r.rbf.test_accuracy:.4f}; explaining test image {r.test_index} (label {r.test_label:+d})"
    )
    for m in (r.feature, r.rbf):
        _say(
            f"{m.name:>7}: Spearman ρ(|I_up,loss|, distance) {m.spearman_abs_vs_distance:+.3f}"
            f" (all), {m.spearman_influential:+.3f} (10% most influential); share of Σ|I| on the"
            f" nearest 10%: {m.mass_nearest_decile:.2f}; medians over {r.n_tests} test images:"
            f" {m.median_spearman_influential:+.3f}, {m.median_mass_nearest_decile:.2f}; helpful"
            f" points of the other label {m.helpful_other_label_fraction:.2f}, in the top 10:"
            f" {m.top10_helpful_other_label}"
        )
    _figure(r, setup.task, out / "compare_models.png")
    write_text_atomic(out / "report.md", _report(r, PAPER))
    return {"paper_section": "5.1", "paper": PAPER, **r.to_json()}


def _figure(r: Any, task: Any, path: Path) -> Path:
    from ...report import new_figure, save_figure

    fig = new_figure(figsize=(11.0, 6.4))
    gs = fig.add_gridspec(2, 5, height_ratios=[1.5, 1.0])
    D = np.asarray(r.distances)
    same = np.asarray(r.train_labels) == r.test_label
    a, b = task.digits
    lab = {
        True: f"same label as the test image ({a if r.test_label > 0 else b})",
        False: f"other label ({b if r.test_label > 0 else a})",
    }
    for col, m, title in (
        (0, r.feature, "CNN features + logistic regression"),
        (1, r.rbf, "RBF SVM (pixels)"),
    ):
        ax = fig.add_subplot(gs[0, 2 * col : 2 * col + 2] if col == 0 else gs[0, 2:4])
        h = -np.asarray(m.up_loss)
        for flag, color in ((False, "#d62728"), (True, "#2ca02c")):
            sel = same == flag
            ax.scatter(D[sel], h[sel], s=5, color=color, alpha=0.6, label=lab[flag])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("‖z − z_test‖² (pixels)")
        ax.set_ylabel("−I_up,loss(z, z_test)  (> 0: helpful)")
        ax.set_title(
            f"{title}\nSpearman ρ(|I|, dist), 10% most influential: {m.spearman_influential:+.2f}; "
            f"Σ|I| on nearest 10%: {m.mass_nearest_decile:.0%}",
            fontsize=8,
        )
        ax.legend(fontsize=7, loc="upper right")
    axt = fig.add_subplot(gs[0, 4])
    axt.imshow(task.x_test[r.test_index].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
    axt.set_title(f"test image {r.test_index}\n(label {a if r.test_label > 0 else b})", fontsize=9)
    axt.axis("off")
    for col, m, name in ((0, r.feature, "features"), (2, r.rbf, "RBF")):
        for j in range(2):
            i = m.top_helpful[j]
            ax = fig.add_subplot(gs[1, col + j])
            ax.imshow(task.x_train[i].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
            digit = a if task.y_train[i] > 0 else b
            ax.set_title(
                f"{name}: helpful #{j + 1}\ntrain {i} (digit {digit}), −I = {-m.up_loss[i]:.3g}",
                fontsize=8,
            )
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _report(r: Any, paper: dict[str, Any]) -> str:
    f, s = r.feature, r.rbf
    rows = [
        (
            "training images",
            f"{r.n_train:,} ({r.digits[0]} vs {r.digits[1]})",
            f"{paper['n_train']:,} (dog vs fish)",
        ),
        (
            "test accuracy: features / RBF SVM",
            f"{f.test_accuracy:.3f} / {s.test_accuracy:.3f}",
            "— / —",
        ),
        (
            "Spearman ρ(abs(I_up,loss), distance), all points: features / RBF",
            f"{f.spearman_abs_vs_distance:+.3f} / {s.spearman_abs_vs_distance:+.3f}",
            "—",
        ),
        (
            "… over the 10% most influential: features / RBF",
            f"{f.spearman_influential:+.3f} / {s.spearman_influential:+.3f}",
            "RBF: falls with distance; Inception: much less",
        ),
        (
            f"… median over {r.n_tests} test images: features / RBF",
            f"{f.median_spearman_influential:+.3f} / {s.median_spearman_influential:+.3f}",
            "—",
        ),
        (
            "share of Σ abs(I_up,loss) on the nearest 10% (pixels): features / RBF",
            f"{f.mass_nearest_decile:.2f} / {s.mass_nearest_decile:.2f}",
            "RBF: far images have almost no influence",
        ),
        (
            f"… median over {r.n_tests} test images: features / RBF",
            f"{f.median_mass_nearest_decile:.2f} / {s.median_mass_nearest_decile:.2f}",
            "—",
        ),
        (
            "helpful points with the other label (fraction): features / RBF",
            f"{f.helpful_other_label_fraction:.2f} / {s.helpful_other_label_fraction:.2f}",
            "Inception: both classes help",
        ),
        (
            "other-label images among the 10 most helpful: features / RBF",
            f"{f.top10_helpful_other_label} / {s.top10_helpful_other_label}",
            "Inception: the 5th most helpful is a dog",
        ),
        (
            "rank of the most helpful other-label image: features / RBF",
            f"{f.first_other_label_helpful_rank} / {s.first_other_label_helpful_rank}",
            "Inception: 5",
        ),
        (
            "100 nearest same-label images that help / other-label that hurt: RBF",
            f"{s.near_same_helpful:.2f} / {s.near_other_harmful:.2f}",
            '"mostly" / "mostly"',
        ),
        (
            "… the same for the feature model",
            f"{f.near_same_helpful:.2f} / {f.near_other_harmful:.2f}",
            "—",
        ),
    ]
    return "\n".join(
        [
            "# Two models, one test image (Koh & Liang 2017, §5.1, Fig. 4)",
            "",
            (
                "Stand-in for Inception v3 on dog vs fish: a small"
                f" {EXTRACTORS[r.cnn.get('extractor', 'cnn')]} trained here on"
                f" {r.cnn['n_images']:,} 10-class MNIST images ({r.cnn['epochs']} epochs, 10-class"
                f" test accuracy {r.cnn['test_accuracy_10class']:.4f}), frozen; logistic regression"
                f" on its {r.cnn['n_features']} features (θ = the top layer only). RBF SVM on raw"
                f" pixels, γ = {r.rbf_gamma:.4g} (= {r.rbf_gamma_scale:g} / median squared"
                f" distance), SmoothHinge t = 0.001. Test image {r.test_index} (label"
                f" {r.test_label:+d}); scores: features {f.test_score:+.3f}, RBF"
                f" {s.test_score:+.3f}."
            ),
            "",
            markdown_table(("quantity", "ours", "paper"), rows),
            "",
            "The paper gives no numbers for Fig. 4, only the shapes described in the last column.",
            "",
            (
                "Figure: `compare_models.png` (top: −I_up,loss against squared pixel distance,"
                " green = same label as the test image; bottom: the two most helpful training"
                " images of each model)."
            ),
            "",
        ]
    )
