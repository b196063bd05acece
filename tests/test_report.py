"""upweight.report: the leave-one-out scatter (Fig. 2) and the explain figure."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from upweight.errors import InputError
from upweight.loo import LOOComparison
from upweight.report import explain_figure, loo_scatter, new_figure, ranking_figure, save_figure


def _comparison(k: int = 7, scale: float = 1e-2, seed: int = 0) -> LOOComparison:
    rng = np.random.default_rng(seed)
    predicted = rng.normal(0.0, scale, k)
    actual = 1.05 * predicted + rng.normal(0.0, 0.05 * scale, k)
    return LOOComparison(
        train_ids=np.arange(k) * 3,
        predicted=predicted,
        actual=actual,
        test_ids=np.array([4]),
        pearson=0.987654,
        spearman=0.95,
        slope=1.05,
        intercept=1e-6,
        retrain_grad_norm=1e-10,
        seconds=0.1,
    )


def _images(n: int, seed: int = 1) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [(rng.random(784).astype(np.float32), f"#{j}  y = +1\nI = {j:+.3g}") for j in range(n)]


@pytest.mark.parametrize("scale", [1e-2, 1e-7])
def test_loo_scatter_plots_the_comparison(scale: float) -> None:
    c = _comparison(scale=scale)
    fig = new_figure()
    ax = fig.add_subplot()
    assert loo_scatter(c, ax) is ax
    offsets = np.asarray(ax.collections[0].get_offsets())
    np.testing.assert_array_equal(offsets[:, 0], c.predicted)
    np.testing.assert_array_equal(offsets[:, 1], c.actual)
    # the y = x reference line, spanning every point
    xs, ys = ax.lines[0].get_data()
    np.testing.assert_array_equal(xs, ys)
    assert min(xs) <= min(c.predicted.min(), c.actual.min()) and max(xs) >= max(
        c.predicted.max(), c.actual.max()
    )
    assert "Pearson R = 0.9877" in ax.get_title() and "slope = 1.050" in ax.get_title()
    assert "Predicted" in ax.get_xlabel() and "Actual" in ax.get_ylabel()
    if scale < 1e-3:  # tiny effects get a power-of-ten unit in the labels, not unreadable ticks
        assert "10^{-7}" in ax.get_xlabel()


def test_loo_scatter_nan_statistics() -> None:
    c = _comparison(k=2)
    c = LOOComparison(
        c.train_ids,
        c.predicted,
        c.actual,
        c.test_ids,
        float("nan"),
        float("nan"),
        float("nan"),
        float("nan"),
        0.0,
        0.0,
    )
    fig = new_figure()
    ax = loo_scatter(c, fig.add_subplot())
    assert "n/a" in ax.get_title()


def test_explain_figure_axes_and_png(tmp_path) -> None:
    c = _comparison()
    helpful, harmful = _images(5), _images(4, seed=2)
    test_img = np.linspace(0, 1, 784)
    fig = explain_figure(
        test_img, "Test point 4\ntrue y = -1", helpful, harmful, c, (28, 28), title="demo"
    )
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 1 + 5 + 4 + 1
    # order: test image, helpful row, harmful row, scatter
    np.testing.assert_allclose(axes[0].images[0].get_array(), test_img.reshape(28, 28))
    assert axes[0].get_title() == "Test point 4\ntrue y = -1"
    for ax, (img, cap) in zip(axes[1:6], helpful):
        assert ax.images[0].get_array().shape == (28, 28)
        np.testing.assert_allclose(ax.images[0].get_array(), img.reshape(28, 28))
        assert ax.get_xlabel() == cap
        assert ax.images[0].get_cmap().name == "gray"
    assert "helpful" in axes[1].get_ylabel().lower() and "harmful" in axes[6].get_ylabel().lower()
    offsets = np.asarray(axes[-1].collections[0].get_offsets())
    np.testing.assert_array_equal(offsets[:, 0], c.predicted)
    np.testing.assert_array_equal(offsets[:, 1], c.actual)

    path = save_figure(fig, tmp_path / "sub" / "dir" / "explain.png")
    assert path.is_file()
    png = matplotlib.image.imread(path)
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 800


def test_explain_figure_without_comparison_and_odd_shapes(tmp_path) -> None:
    # no LOO panel; features that are not a square image are drawn as a strip
    rng = np.random.default_rng(3)
    fig = explain_figure(rng.random(10), "t", [(rng.random(10), "a")], [], None, None)
    assert len(fig.axes) == 2
    assert fig.axes[1].images[0].get_array().shape == (1, 10)
    # 2-D images pass through unchanged
    fig = explain_figure(rng.random((5, 7)), "t", [], [(rng.random((5, 7)), "b")] * 2, None, None)
    assert len(fig.axes) == 3 and fig.axes[0].images[0].get_array().shape == (5, 7)
    save_figure(fig, tmp_path / "x.png")
    assert matplotlib.image.imread(tmp_path / "x.png").shape[0] > 100


def test_explain_figure_wraps_long_rows(tmp_path) -> None:
    """23 images per kind wrap onto rows of max_columns: the PNG is as wide as for 10."""
    widths = {}
    for k in (10, 23):
        fig = explain_figure(
            np.linspace(0, 1, 784),
            "t",
            _images(k),
            _images(k, seed=2),
            None,
            (28, 28),
            max_columns=10,
        )
        assert len(fig.axes) == 1 + 2 * k
        rows = {round(ax.get_position().y0, 4) for ax in fig.axes[1:]}
        assert len(rows) == 2 * -(-k // 10)
        widths[k] = matplotlib.image.imread(save_figure(fig, tmp_path / f"w{k}.png")).shape[1]
    assert widths[23] == widths[10]
    with pytest.raises(InputError, match="max_columns"):
        explain_figure(np.zeros(4), "t", [], [], max_columns=0)


def test_ranking_figure_bars_are_the_scores(tmp_path) -> None:
    fig = ranking_figure(
        "Test point 3", [("#4", -2.0), ("#9", -1.0)], [("#1", 3.0)], _comparison(), title="x"
    )
    bars = fig.axes[1].patches
    assert [b.get_width() for b in bars] == [-2.0, -1.0, 3.0]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["#4", "#9", "#1"]
    assert len(fig.axes) == 3
    assert matplotlib.image.imread(save_figure(fig, tmp_path / "r.png")).shape[0] > 300


def test_importing_upweight_does_not_import_matplotlib() -> None:
    code = "import sys, upweight; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
