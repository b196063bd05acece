"""A small MNIST CNN trained here, standing in for the paper's Inception-v3 feature extractor
(§5.1–5.2).

Koh & Liang (2017) §5.1–5.2 freeze a pre-trained Inception v3 (ImageNet) and train only its top
layer — logistic regression on the 2,048 bottleneck features — on 1,800 dog/fish images. Neither
Inception's weights nor the images are available offline, so this module builds the analogue:

* ``FeatureCNN``: conv(1→16, 5×5, stride 2) → SiLU → conv(16→32, 3×3, stride 2) → SiLU → linear
  (1,568 → d) → SiLU = the d "bottleneck" features; a linear head (d → 10) is used for training
  only. SiLU (smooth) everywhere, so the map pixels → features is C∞ and finite differences through
  it are clean.
* It is trained **once, on 10-class MNIST**, on training images that are *not* in the binary task's
  training set — as Inception was trained on a broad task (ImageNet's 1,000 classes) and then reused
  for a narrower one. Training on all 10 digits gives general-purpose stroke features instead of
  features that have already memorised the 1,800 images whose influence we then measure.
* ``binary_task`` builds the paper-sized binary problem: 900 training images per class of two
  digits (paper: 900 dogs + 900 fish) in MNIST order, and a test set (paper: 300 per class).
* ``TopLayerModel`` = the frozen extractor + a bias-free ``Linear(d, 1)`` top layer (the release
  code's ``BinaryLogisticRegressionWithLBFGS`` has no intercept). ``upweight.Objective(model,
  "logistic", params="top")`` makes θ the top layer only, so H is the top layer's Hessian while
  ∇x reaches the pixels through the CNN (I_pert,loss, Eq. 5).

Everything is deterministic given ``seed`` (its own ``torch.Generator`` for initialisation and
shuffling) on a fixed thread count; nothing is cached on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import Data, Objective
from ..datasets._base import SplitData
from ..errors import InputError
from ..loo import refit
from .config import FeatureConfig


class FeatureCNN(nn.Module):
    """Two stride-2 convolutions and a d-unit feature layer, with a 10-way head for training.

    Input: images as rows of 784 pixels in [0, 1] (or (b, 1, 28, 28)). ``features(x)`` → (b, d).
    """

    def __init__(self, n_features: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, stride=2, padding=2)  # 28 → 14
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)  # 14 → 7
        self.fc = nn.Linear(32 * 7 * 7, n_features)
        self.head = nn.Linear(n_features, n_classes)
        self.n_features = n_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, 28, 28)
        h = F.silu(self.conv1(h))
        h = F.silu(self.conv2(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    """A residual block: two 3 × 3 convolutions with BatchNorm, a 1 × 1 projection where the
    shape changes (He et al. 2016's BasicBlock)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class FeatureResNet(nn.Module):
    """A residual network for 28 × 28 images, the deepest extractor that trains here in minutes: a
    stride-2 stem (14 × 14), three stages of two residual blocks (16, 32, 64 channels; 14, 7, 4
    pixels), global average pooling and a d-unit feature layer; 13 convolutions. Same interface as
    ``FeatureCNN``; BatchNorm uses its running statistics once trained (eval mode).
    """

    def __init__(self, n_features: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        widths, blocks, c_in = (16, 32, 64), [], 16
        for i, w in enumerate(widths):
            blocks += [_Block(c_in, w, 1 if i == 0 else 2), _Block(w, w, 1)]
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], n_features)
        self.head = nn.Linear(n_features, n_classes)
        self.n_features = n_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x.reshape(x.shape[0], 1, 28, 28)))
        return F.silu(self.fc(h.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


#: ``FeatureConfig.extractor`` → its network
EXTRACTOR_NETS: dict[str, type[nn.Module]] = {"cnn": FeatureCNN, "resnet": FeatureResNet}


class TopLayerModel(nn.Module):
    """Frozen ``FeatureCNN`` features + a trainable bias-free top layer ``top`` (one logit).

    The paper's "Inception" model (§5.1): only ``top`` is θ (``Objective(..., params="top")``).
    """

    def __init__(self, extractor: FeatureCNN) -> None:
        super().__init__()
        self.extractor = extractor
        self.top = nn.Linear(extractor.n_features, 1, bias=False)
        for p in self.extractor.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.extractor.features(x))


@dataclass(frozen=True)
class CNNTraining:
    """How the feature CNN was trained and how well it does on held-out 10-class MNIST."""

    n_images: int
    epochs: int
    n_features: int
    seed: int
    seconds: float
    test_accuracy_10class: float
    extractor: str = "cnn"


def train_feature_cnn(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_features: int = 64,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    x_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
    extractor: str = "cnn",
) -> tuple[FeatureCNN, CNNTraining]:
    """Train the feature network (``EXTRACTOR_NETS[extractor]``: ``FeatureCNN`` or
    ``FeatureResNet``) with Adam on 10-class cross-entropy; return it in eval mode, float64.

    Args:
        x, y: training images (rows of 784 in [0, 1]) and digit labels 0–9.
        n_features: d, the size of the feature layer (the top layer's input).
        epochs, batch_size, lr: Adam schedule (constant learning rate).
        seed: seeds initialisation and shuffling (a private generator; global RNG untouched).
        x_eval, y_eval: optional held-out images to report the 10-class accuracy on.
        extractor: "cnn" or "resnet".
    """
    if extractor not in EXTRACTOR_NETS:
        raise InputError(
            f"train_feature_cnn: extractor must be one of {', '.join(EXTRACTOR_NETS)}; got"
            f" {extractor!r}."
        )
    if len(x) != len(y) or len(x) == 0:
        raise InputError(
            f"train_feature_cnn: x has {len(x)} rows and y {len(y)}; need the same positive number."
        )
    if epochs < 1 or batch_size < 1 or n_features < 1:
        raise InputError(
            f"train_feature_cnn: epochs ({epochs}), batch_size ({batch_size}) and n_features "
            f"({n_features}) must be ≥ 1."
        )
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Module initialisation draws from the global generator
    try:
        net = EXTRACTOR_NETS[extractor](n_features)
    finally:
        torch.random.set_rng_state(state)
    X = torch.as_tensor(np.asarray(x, dtype=np.float32))
    Y = torch.as_tensor(np.asarray(y, dtype=np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for s in range(0, len(X), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    acc = float("nan")
    if x_eval is not None and y_eval is not None:
        Xe = torch.as_tensor(np.asarray(x_eval, dtype=np.float32))
        with torch.no_grad():
            pred = torch.cat([net(Xe[i : i + 2048]).argmax(1) for i in range(0, len(Xe), 2048)])
        acc = float((pred.cpu().numpy() == np.asarray(y_eval)).mean())
    net = net.double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    return net, CNNTraining(len(X), epochs, n_features, seed, seconds, acc, extractor)


@dataclass(frozen=True)
class BinaryTask:
    """Two MNIST digits as a ±1 task: ``digits[0]`` → +1, ``digits[1]`` → −1 (float64 pixels in [0,
    1])."""

    digits: tuple[int, int]
    x_train: np.ndarray  # (n, 784)
    y_train: np.ndarray  # (n,) ±1
    x_test: np.ndarray
    y_test: np.ndarray
    train_rows: np.ndarray  # rows into the split's x_train
    test_rows: np.ndarray  # rows into the split's x_test


def binary_task(
    data: SplitData,
    digits: tuple[int, int] = (1, 7),
    n_per_class: int = 900,
    n_test_per_class: int = 300,
) -> BinaryTask:
    """The first ``n_per_class`` training and ``n_test_per_class`` test images of each digit, in
    MNIST order (paper §5.1: 900 training images per class; the release code: 300 test images per
    class).
    """
    a, b = digits
    if a == b or not (0 <= a <= 9 and 0 <= b <= 9):
        raise InputError(f"digits must be two different digits 0–9; got {digits}.")
    yl = np.asarray(data.y_train)
    if yl.min() < 0 or yl.max() > 9:
        raise InputError(
            "binary_task needs 10-class MNIST labels 0–9: load the data with "
            "upweight.datasets.load_mnist(path) (no subset)."
        )
    rows, trows = [], []
    for d, k, lab, rr in (
        (a, n_per_class, data.y_train, rows),
        (b, n_per_class, data.y_train, rows),
        (a, n_test_per_class, data.y_test, trows),
        (b, n_test_per_class, data.y_test, trows),
    ):
        found = np.flatnonzero(np.asarray(lab) == d)
        if len(found) < k:
            raise InputError(f"binary_task: only {len(found)} images of digit {d}; asked for {k}.")
        rr.append(found[:k])
    tr, te = np.concatenate(rows), np.concatenate(trows)
    sign = lambda lab: np.where(np.asarray(lab) == a, 1, -1).astype(np.int64)  # noqa: E731
    return BinaryTask(
        (a, b),
        np.asarray(data.x_train[tr], np.float64),
        sign(data.y_train[tr]),
        np.asarray(data.x_test[te], np.float64),
        sign(data.y_test[te]),
        tr,
        te,
    )


def cnn_training_rows(data: SplitData, task: BinaryTask, n_images: int, seed: int) -> np.ndarray:
    """``n_images`` rows of the split's training images (all 10 digits) outside the task's training
    set, drawn with ``numpy.random.default_rng(seed)``."""
    pool = np.setdiff1d(np.arange(len(data.y_train)), task.train_rows)
    if n_images > len(pool):
        raise InputError(
            f"cnn_images={n_images} but only {len(pool)} training images are outside the task."
        )
    return np.sort(np.random.default_rng(seed).choice(pool, size=n_images, replace=False))


def features_of(net: FeatureCNN, x: np.ndarray | torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """φ(x) in float64, shape (n, d)."""
    X = (
        torch.as_tensor(np.asarray(x, dtype=np.float64))
        if not isinstance(x, torch.Tensor)
        else x.double()
    )
    with torch.no_grad():
        return torch.cat([net.features(X[s : s + batch]) for s in range(0, len(X), batch)])


def fit_top_layer(
    net: FeatureCNN,
    feats: torch.Tensor,
    y: np.ndarray | torch.Tensor,
    l2: float,
    init: torch.Tensor | None = None,
) -> tuple[TopLayerModel, float]:
    """Train the top layer (logistic loss, R = mean loss + (l2/2)‖w‖²) on fixed features to the
    minimum in float64 (``upweight.refit``, warm-started at ``init``); returns the model and ‖∇R‖.
    """
    model = TopLayerModel(net).double().eval()
    lin = torch.nn.Linear(feats.shape[1], 1, bias=False).double().eval()
    with torch.no_grad():
        lin.weight.copy_(init if init is not None else torch.zeros_like(lin.weight))
    res = refit(
        Objective(lin, "logistic", l2=l2),
        Data.from_any((feats, torch.as_tensor(y))),
        gtol=1e-10,
        maxiter=2000,
    )
    with torch.no_grad():
        model.top.weight.copy_(res.params["weight"])
    return model, res.grad_norm


__all__ = [
    "BinaryTask",
    "CNNTraining",
    "EXTRACTOR_NETS",
    "FeatureCNN",
    "FeatureResNet",
    "TopLayerModel",
    "binary_task",
    "cnn_training_rows",
    "features_of",
    "fit_top_layer",
    "train_feature_cnn",
]


@dataclass(frozen=True)
class FeatureSetup:
    """The binary task, the trained feature CNN and the top-layer model θ̂ (the paper's "Inception"
    model)."""

    task: BinaryTask
    net: FeatureCNN
    cnn: CNNTraining
    l2: float
    F: torch.Tensor  # φ(x_train), (n, d) float64
    F_test: torch.Tensor  # φ(x_test)
    model: TopLayerModel  # extractor + top layer at θ̂
    grad_norm: float  # ‖∇R(θ̂)‖ of the top-layer fit
    config: FeatureConfig = field(default_factory=FeatureConfig)  # the settings it was built with

    def top_weight(self) -> torch.Tensor:
        return self.model.top.weight.detach().clone()

    def test_scores(self) -> np.ndarray:
        with torch.no_grad():
            return (self.F_test @ self.model.top.weight[0]).numpy()


def build_feature_model(data: SplitData, config: FeatureConfig | None = None) -> FeatureSetup:
    """Build the binary task, train the feature CNN on other MNIST images (10 classes), and fit the
    top layer (logistic regression on φ, no intercept, l2 = 0.001 as in the release code) to θ̂.

    ``config``: the task's and the CNN's settings (default ``FeatureConfig()``, the paper's;
    ``CompareModelsConfig`` and ``AttackConfig`` are ``FeatureConfig`` too)."""
    c = config if config is not None else FeatureConfig()
    digits, n_per_class, n_test_per_class = c.digits, c.n_per_class, c.n_test_per_class
    cnn_images, cnn_epochs, n_features = c.cnn_images, c.cnn_epochs, c.n_features
    l2, seed = c.l2, c.seed
    task = binary_task(data, digits, n_per_class, n_test_per_class)
    rows = cnn_training_rows(data, task, cnn_images, seed)
    net, info = train_feature_cnn(
        data.x_train[rows],
        data.y_train[rows],
        n_features=n_features,
        epochs=cnn_epochs,
        seed=seed,
        x_eval=data.x_test,
        y_eval=data.y_test,
        extractor=c.extractor,
    )
    F, Ft = features_of(net, task.x_train), features_of(net, task.x_test)
    model, g = fit_top_layer(net, F, task.y_train, l2)
    built = FeatureConfig(**feature_settings(c))
    return FeatureSetup(task, net, info, float(l2), F, Ft, model, g, built)


def feature_settings(config: FeatureConfig) -> dict[str, Any]:
    """The ``FeatureConfig`` fields of ``config`` (which may be a ``CompareModelsConfig`` or an
    ``AttackConfig``), by name."""
    return {f.name: getattr(config, f.name) for f in fields(FeatureConfig)}


def check_setup(setup: FeatureSetup, config: FeatureConfig, what: str) -> None:
    """An InputError unless ``setup`` was built with the ``FeatureConfig`` settings of
    ``config``."""
    built, asked = feature_settings(setup.config), feature_settings(config)
    diff = [f"{k}={asked[k]!r} (setup: {built[k]!r})" for k in built if built[k] != asked[k]]
    if diff:
        raise InputError(
            f"{what}: the setup was built with other settings than the config's: "
            f"{', '.join(diff)}; build it with build_feature_model(data, config)."
        )


__all__ += ["FeatureSetup", "build_feature_model", "check_setup", "feature_settings"]
