"""The settings of the paper's experiments, one frozen dataclass per experiment.

Each is what the experiment's ``run_*`` function computes and where ``upweight reproduce
<experiment>`` takes its options' defaults from; ``dataclasses.asdict`` of it is ``settings`` in
the experiment's results.json. This module imports nothing heavy, so that the CLI can build its
parser from it without importing the experiments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

#: the panels of Fig. 2, in the figure's order
PANELS = ("cg", "lissa", "cnn")
#: θ̃'s learning rate in the CNN panel: constant, or the release code's decay
CNN_TRAIN_SCHEDULES = ("constant", "release")
#: the frozen feature extractors of §5.1–5.2 (``FeatureConfig.extractor``) and how reports name them
EXTRACTORS = {"cnn": "CNN", "resnet": "residual network (13 convolutions)"}
#: the attack's projections Π (``AttackConfig.projection``)
PROJECTIONS = ("same-8bit", "levels")
#: (ε, α) in 8-bit levels when not given: the paper's for its Π, and one level a step within 8
PROJECTION_DEFAULTS = {"same-8bit": (0.5, 0.02), "levels": (8, 1)}
#: the inverse-HVP solvers ``run_mislabel`` takes (names of ``upweight.solvers.SOLVERS``)
MISLABEL_SOLVERS = ("direct", "cg")


def _invalid(config: object, name: str, problem: str) -> InputError:
    """An InputError on the setting ``name``: ``"<Config>: <name> <problem>"``. It carries
    ``setting`` (the field) and ``problem``, so that the CLI can name its option instead."""
    exc = InputError(f"{type(config).__name__}: {name} {problem}")
    exc.setting, exc.problem = name, problem  # type: ignore[attr-defined]
    return exc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(
    config: object, name: str, low: int = 1, *, optional: bool = False, high: int | None = None
) -> None:
    """``config.name`` must be an int ≥ ``low`` (and ≤ ``high``), or None where ``optional``."""
    v = getattr(config, name)
    if optional and v is None:
        return
    if not _is_int(v) or v < low or (high is not None and v > high):
        span = f"≥ {low}" if high is None else f"between {low} and {high}"
        raise _invalid(config, name, f"must be {span} (an integer); got {v!r}.")


def _positive(config: object, name: str, *, zero: bool = False, below: float | None = None) -> None:
    """``config.name`` must be a finite number > 0 (≥ 0 where ``zero``), < ``below`` if given."""
    v = getattr(config, name)
    if not _is_number(v) or v < 0 or (v == 0 and not zero) or (below is not None and v >= below):
        span = ("≥ 0" if zero else "> 0") + ("" if below is None else f" and < {below:g}")
        raise _invalid(config, name, f"must be a number {span}; got {v!r}.")


def _index(config: object, name: str) -> None:
    """``config.name`` must be None or a position ≥ 0."""
    _count(config, name, 0, optional=True)


@dataclass(frozen=True)
class Fig2Config:
    """The settings of a Fig. 2 run: what ``run_fig2`` computes and ``upweight reproduce fig2``'s
    options (whose defaults these are). ``dataclasses.asdict`` of it is ``settings`` in
    results.json.

    ``panels``: a non-empty subset of ``PANELS``. The logistic-regression panels (cg, lissa) use
    ``loo_k`` … ``refit_method`` (``run_logreg_panels``), the CNN panel the ``cnn_*`` fields
    (``run_cnn_panel``); ``seed`` seeds the subsampling, LiSSA and the CNN's initialisation and
    batches. ``lissa_scale``: LiSSA's s (None: ``scale="auto"``). ``cnn_train_schedule``: θ̃'s
    learning rate, "constant" or "release" (the release code's decay, ``fig2.release_lr_factor``).
    """

    panels: tuple[str, ...] = PANELS
    loo_k: int = 500
    train_size: int | None = None
    test_index: int | None = None
    lissa_depth: int = 5_000
    lissa_repeats: int = 10
    lissa_batch_size: int = 256
    lissa_scale: float | None = None
    refit_method: str = "auto"
    cnn_loo_k: int = 100
    cnn_train_size: int | None = None
    cnn_train_steps: int = 3_000
    cnn_train_lr: float = 3e-3
    cnn_train_schedule: str = "constant"
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
            raise _invalid(
                self,
                "panels",
                "must be a comma-separated subset of "
                f"{', '.join(PANELS)}; got {', '.join(self.panels) or 'none'}.",
            )
        for name in (
            "loo_k",
            "lissa_depth",
            "lissa_repeats",
            "lissa_batch_size",
            "cnn_loo_k",
            "cnn_train_steps",
        ):
            _count(self, name)
        for name in ("train_size", "cnn_train_size", "cnn_retrain_steps"):
            _count(self, name, optional=True)
        if self.lissa_scale is not None:
            _positive(self, "lissa_scale")
        _index(self, "test_index")
        _index(self, "cnn_test_index")
        _count(self, "seed", 0)
        _positive(self, "cnn_train_lr")
        if self.cnn_retrain_lr is not None:
            _positive(self, "cnn_retrain_lr")
        _positive(self, "cnn_damping", zero=True)
        if self.refit_method not in ("auto", "newton", "lbfgs"):
            raise _invalid(
                self,
                "refit_method",
                f"must be 'auto', 'newton' or 'lbfgs'; got {self.refit_method!r}.",
            )
        if self.cnn_train_schedule not in CNN_TRAIN_SCHEDULES:
            raise _invalid(
                self,
                "cnn_train_schedule",
                f"must be 'constant' or 'release'; got {self.cnn_train_schedule!r}.",
            )
        if self.cnn_retrain not in ("adam", "momentum"):
            raise _invalid(
                self, "cnn_retrain", f"must be 'adam' or 'momentum'; got {self.cnn_retrain!r}."
            )


@dataclass(frozen=True)
class Fig1Config:
    """The settings of a Fig. 1 run (§2.3): what ``run_fig1`` computes and ``upweight reproduce
    fig1``'s options (whose defaults these are: the release code's). ``dataclasses.asdict`` of it
    is ``settings`` in results.json.

    ``l2``: L2 strength (> 0); ``test_index``: the 1-vs-7 test image (30, a 7); ``n_train``: the
    first n training images (≥ 10; None: all 11,800); ``top_k``: size of the top-harmful and
    top-helpful sets compared.
    """

    l2: float = 0.01
    test_index: int = 30
    n_train: int | None = None
    top_k: int = 10

    def __post_init__(self) -> None:
        _positive(self, "l2")
        _count(self, "test_index", 0)
        _count(self, "n_train", 10, optional=True)
        _count(self, "top_k")


@dataclass(frozen=True)
class Fig3Config:
    """The settings of a Fig. 3 run (§4.3): what ``run_fig3`` computes and ``upweight reproduce
    fig3``'s options (whose defaults these are: the release code's). ``dataclasses.asdict`` of it
    is ``settings`` in results.json.

    ``l2``: L2 strength (> 0; the paper's 0.005‖w‖²); ``test_index``: the test point, used if the
    SVM misclassifies it, else (and for None) the misclassified one of smallest margin;
    ``n_train``: the first n training images (≥ 10; None: all); ``k``: training points removed one
    at a time; ``ts``: the SmoothHinge temperatures (> 0; option ``--t``); ``tol``: the KKT
    tolerance every SVM fit must meet.
    """

    l2: float = 0.01
    test_index: int | None = 1597
    n_train: int | None = None
    k: int = 100
    ts: tuple[float, ...] = (0.001, 0.01, 0.1)
    tol: float = 1e-9

    def __post_init__(self) -> None:
        _positive(self, "l2")
        _index(self, "test_index")
        _count(self, "n_train", 10, optional=True)
        _count(self, "k")
        ts = tuple(self.ts)
        if not ts or not all(_is_number(t) and t > 0 for t in ts):
            raise _invalid(self, "ts", f"must be temperatures > 0, at least one; got {list(ts)}.")
        object.__setattr__(self, "ts", tuple(float(t) for t in ts))
        _positive(self, "tol")


@dataclass(frozen=True)
class FeatureConfig:
    """The binary MNIST task and the feature CNN that §5.1 and §5.2 share
    (``features.build_feature_model``): ``digits`` (first → +1), images per class for training
    and testing, the CNN's 10-class training images (outside the task's), epochs and feature
    size, the top layer's L2 strength (> 0) and the seed of the CNN's initialisation, shuffling
    and image choice. The defaults are the paper's (release code's) settings. ``extractor``: "cnn"
    (two convolutions, ``features.FeatureCNN``) or "resnet" (a 13-convolution residual network,
    ``features.FeatureResNet``).
    """

    digits: tuple[int, int] = (4, 9)
    n_per_class: int = 900
    n_test_per_class: int = 300
    cnn_images: int = 30_000
    cnn_epochs: int = 3
    n_features: int = 64
    l2: float = 1e-3
    seed: int = 0
    extractor: str = "cnn"

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise _invalid(
                self,
                "extractor",
                f"must be one of {', '.join(EXTRACTORS)}; got {self.extractor!r}.",
            )
        digits = tuple(self.digits)
        if (
            len(digits) != 2
            or not all(_is_int(d) and 0 <= d <= 9 for d in digits)
            or digits[0] == digits[1]
        ):
            raise _invalid(
                self,
                "digits",
                f"must be two different digits 0–9, e.g. (4, 9); got {self.digits!r}.",
            )
        object.__setattr__(self, "digits", digits)
        for name in ("n_per_class", "n_test_per_class", "cnn_images", "cnn_epochs", "n_features"):
            _count(self, name)
        _positive(self, "l2")
        _count(self, "seed", 0)


@dataclass(frozen=True)
class CompareModelsConfig(FeatureConfig):
    """The settings of a §5.1 run (Fig. 4): the task and feature CNN (``FeatureConfig``) and what
    ``run_compare_models`` computes; ``upweight reproduce compare-models``'s options take their
    defaults from here. ``dataclasses.asdict`` of it is ``settings`` in results.json.

    ``test_index``: the test image explained (None: the first both models get right inside the
    SVM's margin); ``gamma_scale``: RBF γ = gamma_scale / median squared pixel distance; ``t``:
    the SVM's smooth-hinge temperature; ``svm_l2``: the SVM's L2 strength; ``n_tests``: test images
    the median correlations are taken over.
    """

    test_index: int | None = None
    gamma_scale: float = 4.0
    t: float = 0.001
    svm_l2: float = 1e-3
    n_tests: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        _index(self, "test_index")
        for name in ("gamma_scale", "t", "svm_l2"):
            _positive(self, name)
        _count(self, "n_tests")


@dataclass(frozen=True)
class AttackConfig(FeatureConfig):
    """The settings of a §5.2 run: the task and feature CNN (``FeatureConfig``) and what
    ``run_attack`` computes; ``upweight reproduce attack``'s options take their defaults from
    here. ``dataclasses.asdict`` of it is ``settings`` in results.json.

    ``targets``: attack the first n correctly classified test images (None: all, as the paper);
    ``projection``: Π of the attack, "same-8bit" (the paper's: each pixel stays inside its own
    8-bit quantisation cell, within ``epsilon`` ≤ 0.5 level of the original, at any real value)
    or "levels" (every step lands on the 8-bit grid: whole levels, ``epsilon`` and ``step``
    integers); ``epsilon``: L∞ bound in 8-bit levels (None: the projection's default, 0.5 or 8);
    ``step``: α in levels per iteration (None: 0.02 or 1);
    ``iterations``: the cap per attack; ``max_k``: most training images perturbed per target;
    ``group_size``: test images of the multi-target attack (0 skips it); ``multi_k``: how many
    training images the multi-target attack perturbs.
    """

    targets: int | None = None
    projection: str = "same-8bit"
    epsilon: float | None = None
    step: float | None = None
    iterations: int = 100
    max_k: int = 10
    group_size: int = 30
    multi_k: tuple[int, ...] = (1, 10)

    def __post_init__(self) -> None:
        super().__post_init__()
        _count(self, "targets", optional=True)
        if self.projection not in PROJECTIONS:
            raise _invalid(
                self,
                "projection",
                f"must be one of {', '.join(PROJECTIONS)}; got {self.projection!r}.",
            )
        for name, default in zip(("epsilon", "step"), PROJECTION_DEFAULTS[self.projection]):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.projection == "levels":
            for name in ("epsilon", "step"):  # 8.0 from the command line is 8 levels
                v = getattr(self, name)
                if isinstance(v, float) and v.is_integer():
                    object.__setattr__(self, name, int(v))
            _count(self, "epsilon", high=255)
            _count(self, "step")
        else:
            eps = self.epsilon
            if not _is_number(eps) or not 0 < eps <= 0.5:
                raise _invalid(
                    self,
                    "epsilon",
                    "must be a number in (0, 0.5] with projection='same-8bit' (the pixel stays in"
                    f" its own 8-bit cell); got {eps!r}. For whole levels use projection='levels'.",
                )
            _positive(self, "step")
        for name in ("iterations", "max_k"):
            _count(self, name)
        _count(self, "group_size", 0)
        multi_k = tuple(self.multi_k)
        if not multi_k or not all(_is_int(k) and k >= 1 for k in multi_k):
            raise _invalid(
                self, "multi_k", f"must be integers ≥ 1, at least one; got {list(multi_k)}."
            )
        object.__setattr__(self, "multi_k", multi_k)


@dataclass(frozen=True)
class MismatchConfig:
    """The settings of a §5.3 run: what ``run_mismatch`` computes and ``upweight reproduce
    mismatch``'s options (whose defaults these are: the release notebook's). ``dataclasses.asdict``
    of it is ``settings`` in results.json.

    ``l2``: L2 strength (≥ 0); ``seed``: None keeps the last non-readmitted child in training
    order (the notebook's choice), an int picks the one kept at random; ``test_index``: the test
    child explained (None: 1742 if misclassified, else the first misclassified test child);
    ``top``: how many of the most influential training points are recorded; ``baseline``: also
    train on all 20,000 points to count the misclassified test children before the mismatch.
    """

    l2: float = 1e-4
    seed: int | None = None
    test_index: int | None = None
    top: int = 20
    baseline: bool = False

    def __post_init__(self) -> None:
        _positive(self, "l2", zero=True)
        _count(self, "seed", 0, optional=True)
        _index(self, "test_index")
        _count(self, "top")
        if not isinstance(self.baseline, bool):
            raise _invalid(self, "baseline", f"must be True or False; got {self.baseline!r}.")


@dataclass(frozen=True)
class MislabelConfig:
    """The settings of a §5.4 run (Fig. 6): what ``run_mislabel`` computes and ``upweight
    reproduce mislabel``'s options (whose defaults these are). ``dataclasses.asdict`` of it is
    ``settings`` in results.json.

    ``l2``: L2 strength (> 0; the release script's weight decay); ``flip_fraction``: share of
    training labels flipped per repeat (in (0, 1)); ``fractions``: the checkpoints, fractions of
    the training data checked (in [0, 1]; kept sorted, each once); ``repeats``: random flips
    averaged over (the paper: 40); ``seed``: of the flips and the random checking order;
    ``solver``: one of ``MISLABEL_SOLVERS``; ``gtol``: max |∂R/∂θ| of the clean and flipped
    models, ``refit_gtol`` of the checkpoint refits. ``min_df`` and ``vocab_size`` are how the
    emails become bag-of-words features (``load_enron``'s vectoriser, which the CLI applies before
    ``run_mislabel`` gets the data): the minimum document frequency of a word, and the most
    frequent words kept (None: all); ``lemmatize``: vectorise spaCy lookup lemmas
    (``load_enron(lemmatize=True)``) instead of scikit-learn's tokens.
    """

    l2: float = 1e-4
    flip_fraction: float = 0.1
    fractions: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    repeats: int = 3
    seed: int = 0
    solver: str = "direct"
    gtol: float = 1e-8
    refit_gtol: float = 1e-6
    min_df: int = 5
    vocab_size: int | None = None
    lemmatize: bool = False

    def __post_init__(self) -> None:
        _positive(self, "l2")
        _positive(self, "flip_fraction", below=1.0)
        fr = tuple(self.fractions)
        if not fr or not all(_is_number(f) and 0 <= f <= 1 for f in fr):
            raise _invalid(
                self, "fractions", f"must be in [0, 1] (e.g. 0,0.05,0.1,…,0.3); got {list(fr)}."
            )
        object.__setattr__(self, "fractions", tuple(sorted({float(f) for f in fr})))
        _count(self, "repeats")
        _count(self, "seed", 0)
        if self.solver not in MISLABEL_SOLVERS:
            raise _invalid(
                self,
                "solver",
                f"must be one of {', '.join(MISLABEL_SOLVERS)}; got {self.solver!r}.",
            )
        _positive(self, "gtol")
        _positive(self, "refit_gtol")
        _count(self, "min_df")
        _count(self, "vocab_size", optional=True)
        if not isinstance(self.lemmatize, bool):
            raise _invalid(self, "lemmatize", f"must be True or False; got {self.lemmatize!r}.")
