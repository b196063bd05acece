"""Figures for influence results: the paper's leave-one-out scatter (Koh & Liang 2017, Fig. 2)
and an "explain one prediction" panel (test image, most helpful and most harmful training images).

The only module of upweight that imports matplotlib. It never touches pyplot's global state:
every figure is a ``matplotlib.figure.Figure`` with its own Agg canvas, so it can be built in
threads, tests and headless servers, and is freed when it goes out of scope.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..errors import InputError

Captioned = tuple[Any, str]  # (image, caption)

HELPFUL_COLOR = "#1a7f37"
HARMFUL_COLOR = "#c62828"


def new_figure(figsize: tuple[float, float] = (6.0, 4.5), dpi: float = 110) -> Figure:
    """A ``Figure`` with its own Agg canvas (no pyplot, no global backend switch)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def loo_scatter(comparison: Any, ax: Axes, *, color: str = "#1f5fa8") -> Axes:
    """Actual vs predicted change in test loss when each training point is removed — Fig. 2.

    Args:
        comparison: an ``upweight.LOOComparison`` (anything with ``predicted``, ``actual``,
            ``pearson``, ``slope``; ``spearman`` is used when present).
        ax: the axes to draw on.

    Returns:
        ``ax``; its first collection holds the points, in the comparison's order
        (x = predicted, y = actual), and its first line is y = x.
    """
    pred = np.asarray(comparison.predicted, dtype=float).reshape(-1)
    act = np.asarray(comparison.actual, dtype=float).reshape(-1)
    ax.scatter(
        pred, act, s=22, color=color, alpha=0.85, edgecolors="white", linewidths=0.5, zorder=3
    )
    both = np.concatenate([pred, act])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi), 1e-12)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.45", lw=1.0, ls="--", zorder=2, label="y = x")
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=1)
    ax.axvline(0.0, color="0.85", lw=0.8, zorder=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    # Ticks in units of 10^e, written into the axis labels (matplotlib's offset text would
    # collide with the x label); the plotted data stay the comparison's own numbers.
    top = max(abs(lo), abs(hi))
    e = int(math.floor(math.log10(top))) if top > 0 and math.isfinite(top) else 0
    e = 0 if -2 <= e <= 2 else e
    unit = f"  [×$10^{{{e}}}$]" if e else ""
    fmt = FuncFormatter(lambda v, _pos: f"{v / 10.0**e:g}")
    ax.xaxis.set_major_formatter(fmt)
    ax.yaxis.set_major_formatter(fmt)
    ax.set_xlabel(f"Predicted Δ test loss  (−I_up,loss / n){unit}")
    ax.set_ylabel(f"Actual Δ test loss  (retraining){unit}")
    title = (
        f"Leave-one-out retraining, {len(pred)} points\nPearson R ="
        f" {_fmt(comparison.pearson, '.4f')}"
    )
    spearman = getattr(comparison, "spearman", None)
    if spearman is not None:
        title += f", Spearman = {_fmt(spearman, '.3f')}"
    title += f", slope = {_fmt(comparison.slope, '.3f')}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(True, color="0.93", lw=0.6, zorder=0)
    return ax


def _as_image(x: Any, image_shape: Sequence[int] | None) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=float)
    if image_shape is not None:
        return a.reshape(tuple(image_shape))
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return a
    flat = a.reshape(-1)
    side = math.isqrt(flat.size)
    return flat.reshape(side, side) if side * side == flat.size else flat.reshape(1, -1)


def _show(
    ax: Axes, img: np.ndarray, caption: str, *, cmap: str, vmin: float, vmax: float, fontsize: float
) -> None:
    ax.imshow(
        img,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        aspect="equal" if img.shape[0] > 1 else "auto",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("0.7")
    ax.set_xlabel(caption, fontsize=fontsize, labelpad=3)


def explain_figure(
    test_image: Any,
    test_title: str,
    helpful: Sequence[Captioned],
    harmful: Sequence[Captioned],
    comparison: Any | None = None,
    image_shape: Sequence[int] | None = None,
    *,
    title: str | None = None,
    cmap: str = "gray",
    helpful_label: str = "Most helpful\n(I_up,loss < 0)",
    harmful_label: str = "Most harmful\n(I_up,loss > 0)",
    max_columns: int = 10,
) -> Figure:
    """The test image, its most helpful and most harmful training images, and the LOO scatter.

    Args:
        test_image: the test input (flat or shaped; reshaped to ``image_shape``).
        test_title: text above the test image (index, label, prediction).
        helpful: ``(image, caption)`` pairs, most helpful first — drawn in the top row.
        harmful: ``(image, caption)`` pairs, most harmful first — drawn in the bottom row.
        comparison: an ``LOOComparison`` for the scatter panel, or ``None`` to leave it out.
        image_shape: e.g. ``(28, 28)``; ``None`` guesses (square if the size is a square,
            otherwise a 1-pixel-high strip).
        title: optional figure title.
        cmap: colour map of the images (grey by default); all images share one intensity scale.
        max_columns: images per row; longer lists wrap onto more rows, so the width is bounded
            and only the height grows with the number of images.

    Returns:
        A ``Figure`` with 1 + len(helpful) + len(harmful) (+ 1 with a comparison) axes, in that
        order: test image, helpful images, harmful images, scatter. Save it with ``save_figure``.
    """
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 1:
        raise InputError(
            f"explain_figure: max_columns must be an integer ≥ 1; got {max_columns!r}."
        )
    test_img = _as_image(test_image, image_shape)
    helpful_imgs = [(_as_image(img, image_shape), str(cap)) for img, cap in helpful]
    harmful_imgs = [(_as_image(img, image_shape), str(cap)) for img, cap in harmful]
    every = [test_img] + [i for i, _ in helpful_imgs] + [i for i, _ in harmful_imgs]
    vmin = float(min(np.nanmin(i) for i in every))
    vmax = float(max(np.nanmax(i) for i in every))
    if vmax <= vmin:
        vmax = vmin + 1.0

    cols = min(max(len(helpful_imgs), len(harmful_imgs), 1), max_columns)
    row_counts = [max(1, math.ceil(len(imgs) / cols)) for imgs in (helpful_imgs, harmful_imgs)]
    with_scatter = comparison is not None
    widths = [2.1, 1.3 * cols] + ([3.9] if with_scatter else [])
    extra_rows = sum(row_counts) - 2
    fig = new_figure(
        figsize=(sum(widths) + 0.9, 4.4 + 1.7 * extra_rows + (0.35 if title else 0.0)), dpi=110
    )
    outer = fig.add_gridspec(
        1,
        len(widths),
        width_ratios=widths,
        wspace=0.3,
        left=0.02,
        right=0.975,
        bottom=0.12,
        top=0.85 if title else 0.9,
    )

    ax_test = fig.add_subplot(outer[0, 0])
    _show(ax_test, test_img, "", cmap=cmap, vmin=vmin, vmax=vmax, fontsize=8)
    ax_test.set_title(test_title, fontsize=10, fontweight="bold")
    ax_test.set_xlabel("")

    grid = outer[0, 1].subgridspec(sum(row_counts), cols, hspace=0.5, wspace=0.16)
    for first_row, (imgs, label, color) in zip(
        (0, row_counts[0]),
        (
            (helpful_imgs, helpful_label, HELPFUL_COLOR),
            (harmful_imgs, harmful_label, HARMFUL_COLOR),
        ),
    ):
        for j, (img, caption) in enumerate(imgs):
            ax = fig.add_subplot(grid[first_row + j // cols, j % cols])
            _show(ax, img, caption, cmap=cmap, vmin=vmin, vmax=vmax, fontsize=7.5)
            for side in ax.spines.values():
                side.set_color(color)
                side.set_linewidth(1.6)
            if j == 0:
                ax.set_ylabel(label, fontsize=9, color=color, fontweight="bold")

    if with_scatter:
        loo_scatter(comparison, fig.add_subplot(outer[0, 2]))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def ranking_figure(
    test_text: str,
    helpful: Sequence[tuple[str, float]],
    harmful: Sequence[tuple[str, float]],
    comparison: Any | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """The explain figure for inputs that are not images (tabular, text): bars of I_up,loss.

    Args:
        test_text: a few lines about the test point (index, labels, prediction), drawn at the left.
        helpful: ``(name, I_up,loss)`` pairs, most helpful first (negative values, green bars).
        harmful: ``(name, I_up,loss)`` pairs, most harmful first (positive values, red bars).
        comparison: an ``LOOComparison`` for the scatter panel, or ``None`` to leave it out.
        title: optional figure title.

    Returns:
        A ``Figure`` with 2 axes (the text panel and the bars), plus the scatter with a
        comparison. The bars run top to bottom: helpful in rank order, then harmful in rank order.
    """
    items = [(str(nm), float(v), HELPFUL_COLOR) for nm, v in helpful]
    items += [(str(nm), float(v), HARMFUL_COLOR) for nm, v in harmful]
    with_scatter = comparison is not None
    widths = [2.2, 5.2] + ([3.9] if with_scatter else [])
    height = max(4.4, 1.3 + 0.27 * len(items)) + (0.35 if title else 0.0)
    fig = new_figure(figsize=(sum(widths) + 2.4, height), dpi=110)
    outer = fig.add_gridspec(
        1,
        len(widths),
        width_ratios=widths,
        wspace=0.45,
        left=0.02,
        right=0.975,
        bottom=0.1,
        top=0.88 if title else 0.92,
    )
    ax_text = fig.add_subplot(outer[0, 0])
    ax_text.axis("off")
    ax_text.text(
        0.0, 1.0, test_text, va="top", ha="left", fontsize=9.5, transform=ax_text.transAxes
    )
    ax = fig.add_subplot(outer[0, 1])
    ys = np.arange(len(items))
    ax.barh(ys, [v for _, v, _ in items], color=[c for _, _, c in items], height=0.7)
    ax.set_yticks(ys, [nm for nm, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="0.4", lw=0.8)
    ax.set_xlabel("I_up,loss  (< 0 helpful, > 0 harmful)")
    ax.grid(True, axis="x", color="0.93", lw=0.6)
    if with_scatter:
        loo_scatter(comparison, fig.add_subplot(outer[0, 2]))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` atomically, creating parent folders; returns the file written.

    The format comes from the suffix (``.png``, ``.pdf``, ``.svg``, … any format matplotlib can
    write); a name without a suffix gets ``.png`` appended, and the returned path says so. The
    figure is rendered into a temporary file in the same folder, fsynced and moved onto ``path``
    with ``os.replace``: if writing fails (e.g. ``OSError`` for a full disk) the temporary file is
    removed and ``path`` keeps its previous content, or stays absent — never a partial file.

    Raises:
        InputError: the suffix names a format matplotlib cannot write.
        OSError: the folder cannot be created or the file cannot be written.
    """
    from ._files import figure_formats, write_atomic

    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    fmt = path.suffix[1:].lower()
    formats = figure_formats()
    if fmt not in formats:
        raise InputError(
            f"save_figure: cannot write a figure as '{path.suffix}' ({path}); use one of the "
            f"suffixes {', '.join('.' + f for f in formats)}, e.g. {path.with_suffix('.png')}."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return write_atomic(
        path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi or fig.dpi, facecolor="white")
    )
