"""The settings of the paper's experiments, one frozen dataclass per experiment.

Each is what the experiment's ``run_*`` function computes and where ``upweight reproduce
<experiment>`` takes its options' defaults from; ``dataclasses.asdict`` of it is ``settings`` in
the experiment's results.json. This module imports nothing heavy, so that the CLI can build its
parser from it without importing the experiments.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

#: the panels of Fig. 2, in the figure's order
PANELS = ("cg", "lissa", "cnn")


@dataclass(frozen=True)
class Fig2Config:
    """The settings of a Fig. 2 run: what ``run_fig2`` computes and ``upweight reproduce fig2``'s
    options (whose defaults these are). ``dataclasses.asdict`` of it is ``settings`` in results.json.

    ``panels``: a non-empty subset of ``PANELS``. The logistic-regression panels (cg, lissa) use
    ``loo_k`` … ``refit_method`` (``run_logreg_panels``), the CNN panel the ``cnn_*`` fields
    (``run_cnn_panel``); ``seed`` seeds the subsampling, LiSSA and the CNN's initialisation and batches.
    """

    panels: tuple[str, ...] = PANELS
    loo_k: int = 500
    train_size: int | None = None
    test_index: int | None = None
    lissa_depth: int = 5_000
    lissa_repeats: int = 10
    lissa_batch_size: int = 256
    refit_method: str = "auto"
    cnn_loo_k: int = 100
    cnn_train_size: int | None = None
    cnn_train_steps: int = 3_000
    cnn_train_lr: float = 3e-3
    cnn_retrain_steps: int | None = None
    cnn_retrain_lr: float | None = None
    cnn_retrain: str = "adam"
    cnn_damping: float = 0.01
    cnn_test_index: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "panels", tuple(self.panels))
        bad = [p for p in self.panels if p not in PANELS]
        if bad or not self.panels:
            raise InputError(f"panels must be a non-empty subset of {', '.join(PANELS)}; "
                             f"got {', '.join(self.panels) or 'none'}.")
