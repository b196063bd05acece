"""Figures for influence results (matplotlib, Agg canvases, no pyplot state).

``loo_scatter`` draws the paper's Fig. 2 (actual vs predicted leave-one-out change in test loss);
``explain_figure`` shows a test image with its most helpful and harmful training images, and
``ranking_figure`` their I_up,loss as bars for inputs that are not images.
Importing ``upweight`` does not import this package (nor matplotlib).
"""

from .plots import explain_figure, loo_scatter, new_figure, ranking_figure, save_figure

__all__ = ["explain_figure", "loo_scatter", "new_figure", "ranking_figure", "save_figure"]
