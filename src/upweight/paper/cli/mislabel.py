"""``upweight reproduce mislabel``: §5.4 fixing mislabeled examples on Enron1 spam (Fig. 6)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MISLABEL_SOLVERS, MislabelConfig
from ._common import config_from_args, markdown_table
from ._common import say as _say

NAME = "mislabel"
HELP = (
    "§5.4 fixing mislabeled examples: check training emails by self-influence, loss or at random"
    " (Enron1 spam)"
)
DATA_HELP = "enron1.tar.gz, enron1.csv.gz, or a folder holding ham/ and spam/"
# written into --out (results.json is written by the runner)
OUTPUTS = ("mislabel.png", "report.md")

_COLORS = {"influence": "#1f5fa8", "loss": "#2e8b57", "random": "#c62828"}
_LABELS = {
    "influence": "self-influence |I_up,loss(z, z)|",
    "loss": "training loss",
    "random": "random",
}


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.05,0.1; got {text!r}"
        ) from exc


#: the options' defaults
_D = MislabelConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce mislabel``: one per ``MislabelConfig`` field but ``gtol`` (same
    name)."""
    p.add_argument(
        "--l2", type=float, default=_D.l2, help="L2 strength (release script's weight decay: 1e-4)"
    )
    p.add_argument(
        "--flip-fraction",
        type=float,
        default=_D.flip_fraction,
        help="share of training labels flipped (paper: 0.1)",
    )
    p.add_argument(
        "--fractions",
        type=_floats,
        default=",".join(f"{f:g}" for f in _D.fractions),
        help="checkpoints: fractions of the training data checked, where the model is retrained",
    )
    p.add_argument(
        "--repeats", type=int, default=_D.repeats, help="random flips to average over (paper: 40)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_D.seed,
        help="seed of the flips and of the random checking order",
    )
    p.add_argument(
        "--solver",
        choices=MISLABEL_SOLVERS,
        default=_D.solver,
        help="inverse-HVP solver for the self-influence of all n points (direct: far cheaper here)",
    )
    p.add_argument(
        "--refit-gtol",
        type=float,
        default=_D.refit_gtol,
        help=f"max |∂R/∂θ| of the checkpoint refits (the clean and flipped models use {_D.gtol:g})",
    )
    p.add_argument(
        "--min-df",
        type=int,
        default=_D.min_df,
        help="minimum document frequency of a vocabulary word (release: 5)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=_D.vocab_size,
        help="keep only the most frequent words (default: all with document frequency ≥ --min-df)",
    )
    p.add_argument(
        "--lemmatize",
        action="store_true",
        default=_D.lemmatize,
        help="vectorise spaCy lookup lemmas of the alphabetic, non-stop, in-vocabulary tokens, as"
        " the release did (needs: pip install upweight[lemma]); default: scikit-learn's tokeniser",
    )


def _config(args: argparse.Namespace) -> MislabelConfig:
    """The run's ``MislabelConfig`` from the options (an InputError names the option)."""
    return config_from_args(MislabelConfig, args)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from sklearn.feature_extraction.text import CountVectorizer

    from ...datasets import load_enron
    from ...report._files import write_text_atomic
    from ..mislabel import PAPER, run_mislabel

    c = _config(args)
    vectorizer = CountVectorizer(min_df=c.min_df, max_features=c.vocab_size)
    lemmatize = c.lemmatize
    data = load_enron(args.data, vectorizer=vectorizer, lemmatize=lemmatize)
    _say(
        "upweight reproduce mislabel — Koh & Liang (2017) §5.4 on Enron1:"
        f" {data.x_train.shape[0]:,} training / {data.x_test.shape[0]:,} test emails,"
        f" {data.x_train.shape[1]:,} bag-of-words features"
        + (" (spaCy lookup lemmas)" if lemmatize else "")
    )
    r = run_mislabel(data, c, progress=not args.no_progress)
    _say(
        f"clean model: test accuracy {r.clean_test_accuracy:.4f} (‖∇R‖ = {r.clean_grad_norm:.1e});"
        f" {r.n_flipped} labels flipped per repeat → test accuracy"
        f" {np.mean(r.flipped_test_accuracy):.4f} (mean of {r.repeats})"
    )
    _say(
        f"self-influence ({r.solver}): prepare {np.mean(r.seconds_prepare):.1f}s, all {r.n_train:,}"
        f" points {np.mean(r.seconds_self_influence):.1f}s, relative residual ≤"
        f" {max(r.self_influence_residual):.1e}; refits {np.mean(r.seconds_refits):.1f}s per repeat"
        f" (max ‖∇R‖ {r.refit_grad_norm_max:.1e})"
    )
    for f in r.fractions:
        if f == 0:
            continue
        at = r.at(f)
        _say(
            f"checked {f:.0%}: "
            + "; ".join(
                f"{o} found {at[o]['found']:.3f}, accuracy {at[o]['accuracy']:.4f}" for o in at
            )
        )
    _figure(r, out / "mislabel.png")
    write_text_atomic(out / "report.md", _report(r, PAPER))
    return {"paper_section": "5.4", "paper": PAPER, **r.to_json()}


def _figure(r: Any, path: Path) -> Path:
    from ...report import new_figure, save_figure

    fig = new_figure(figsize=(10.5, 4.0), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fr = np.asarray(r.fractions)
    for o in ("influence", "loss", "random"):
        ax1.errorbar(
            fr,
            r.mean("accuracy", o),
            yerr=r.sem("accuracy", o),
            color=_COLORS[o],
            marker="o",
            ms=4,
            capsize=3,
            lw=1.5,
            label=_LABELS[o],
        )
        m, e = np.asarray(r.mean("found_grid", o)), np.asarray(r.sem("found_grid", o))
        ax2.plot(r.grid, m, color=_COLORS[o], lw=1.5, label=_LABELS[o])
        ax2.fill_between(r.grid, m - e, m + e, color=_COLORS[o], alpha=0.25, lw=0)
    ax1.axhline(
        r.clean_test_accuracy,
        color="k",
        ls="--",
        lw=1,
        label=f"clean labels ({r.clean_test_accuracy:.3f})",
    )
    ax1.set_xlabel("fraction of training data checked")
    ax1.set_ylabel("test accuracy after fixing")
    ax1.set_title("Test accuracy", fontsize=10)
    ax1.legend(fontsize=8, loc="best", framealpha=0.7)
    ideal_x = [0.0, min(r.flip_fraction, fr[-1]), fr[-1]]
    ax2.plot(
        ideal_x,
        [min(x / r.flip_fraction, 1.0) for x in ideal_x],
        color="#999999",
        lw=0.8,
        ls=":",
        label="ideal (every check a flip)",
    )
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("fraction of training data checked")
    ax2.set_ylabel("fraction of flipped labels found (band: ± s.e.)")
    ax2.set_title("Flips found", fontsize=10)
    ax2.legend(fontsize=8, loc="upper left", framealpha=0.7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Enron1, {r.flip_fraction:.0%} of {r.n_train:,} training labels flipped; mean ± s.e. over "
        f"{r.repeats} repeat{'s' if r.repeats > 1 else ''} (Koh & Liang 2017, Fig. 6)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _report(r: Any, paper: dict[str, Any]) -> str:
    c = r.config
    j10 = [f for f in r.fractions if abs(f - 0.1) < 1e-12]
    rows = [
        (
            "training / test emails",
            f"{r.n_train:,} / {r.n_test:,}",
            "4,147 (typo for 4,137) / 1,035",
        ),
        ("bag-of-words features p", f"{r.p:,}", "not stated (spaCy lemmas, min_df 5)"),
        ("labels flipped", f"{r.n_flipped} ({r.flip_fraction:.0%})", "10%"),
        ("repeats", f"{r.repeats}", "40"),
        ("test accuracy, clean labels", f"{r.clean_test_accuracy:.4f}", "not stated"),
        (
            "test accuracy, flipped, before fixing",
            f"{np.mean(r.flipped_test_accuracy):.4f} ± {_sem(r.flipped_test_accuracy):.4f}",
            "not stated",
        ),
    ]
    for f in j10:
        at = r.at(f)
        for o in ("influence", "loss", "random"):
            rows.append(
                (
                    f"10% checked, {o}: flips found",
                    f"{at[o]['found']:.3f} ± {at[o]['found_sem']:.3f}",
                    "influence ≫ loss ≫ random (Fig. 6 right)",
                )
            )
        for o in ("influence", "loss", "random"):
            rows.append(
                (
                    f"10% checked, {o}: test accuracy",
                    f"{at[o]['accuracy']:.4f} ± {at[o]['accuracy_sem']:.4f}",
                    "influence close to clean (Fig. 6 left)",
                )
            )
    curve_rows = []
    for k, f in enumerate(r.fractions):
        cells = [f"{f:.2f}"]
        for o in ("influence", "loss", "random"):
            cells.append(f"{r.mean('found', o)[k]:.3f}")
        for o in ("influence", "loss", "random"):
            cells.append(f"{r.mean('accuracy', o)[k]:.4f}")
        curve_rows.append(cells)
    max_features = "" if c.vocab_size is None else f", max_features={c.vocab_size}"
    lines = [
        "# Fixing mislabeled examples (Koh & Liang 2017, §5.4, Fig. 6) — Enron1 spam",
        "",
        (
            "Binary logistic regression without intercept on bag-of-words counts (CountVectorizer"
            f" min_df={c.min_df}{max_features}"
            f"{' of spaCy lookup lemmas' if c.lemmatize else ''}),"
            f" l2 = {r.l2:g} (release script's weight decay), trained to the minimum in float64."
            f" Each repeat flips {r.n_flipped} random training labels, retrains, ranks the training"
            f" points by |self-influence| (solver: {r.solver}), by training loss, or at random,"
            " fixes the flipped points among the first k checked, and retrains exactly"
            " (`upweight.refit`, float64 L-BFGS warm-started from the previous checkpoint, to max"
            f" abs gradient {r.refit_gtol:g}; the clean and flipped models to {r.gtol:g}) at each"
            f" checkpoint. ± is the standard error over {r.repeats} repeat(s) (the paper's error"
            " bars are standard deviations over 40)."
        ),
        "",
        markdown_table(("quantity", "ours", "paper"), rows),
        "",
        (
            "Mean curves (fraction checked; flips found by influence / loss / random; test accuracy"
            " by influence / loss / random):"
        ),
        "",
        markdown_table(
            (
                "checked",
                "found: infl.",
                "found: loss",
                "found: random",
                "acc: infl.",
                "acc: loss",
                "acc: random",
            ),
            curve_rows,
        ),
        "",
        (
            f"Cost per repeat: solver preparation {np.mean(r.seconds_prepare):.1f} s,"
            f" self-influence of all {r.n_train:,} points {np.mean(r.seconds_self_influence):.1f} s"
            f" (largest relative residual {max(r.self_influence_residual):.1e}), checkpoint refits"
            f" {np.mean(r.seconds_refits):.1f} s (largest ‖∇R‖ after a refit"
            f" {r.refit_grad_norm_max:.1e})."
        ),
        "",
        (
            "Figure: `mislabel.png` (left: test accuracy after the fixes; right: fraction of"
            " flipped labels found)."
        ),
        "",
    ]
    return "\n".join(lines)


def _sem(values: Any) -> float:
    a = np.asarray(values, dtype=float)
    return float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0
