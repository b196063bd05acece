"""What ``upweight explain`` explains: a trained model, its data, and how to show both.

Two sources build the same ``Problem``:

* the built-in models (``--data`` or the bundled MNIST 1-vs-7 set): linear models without
  bias trained here to the minimum in float64 — binary logistic regression for labels in
  {−1, +1} or {0, 1}, softmax (multinomial logistic) regression for C ≥ 3 integer labels;
* ``--model SPEC``: the user's trained model and data (``user_model.ModelSpec``), used as given.

Each input is shown as an image, a row of feature values or text (``kind``), decided by what
the data declares or else by its shape (``auto_kind``). Nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import errors
from .user_model import ModelSpec

MIN_IMAGE_SIDE = 8  # a flat vector of d = s² features is drawn as an s×s image only when s ≥ this
TOKEN_IDS_SHOWN = 60
BINARY_LOSSES = ("logistic", "hinge")

# ── the built-in data ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Split:
    """Features float64 (n, d), labels int64, and how to show them.

    Binary data has labels in {−1, +1}; multi-class data has class indices 0 … C−1, whose
    original values are ``label_values``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, ...] | None
    class_names: dict[int, str]  # label (−1/+1, or class index) → what it stands for
    kind: str = "image"
    feature_names: list[str] | None = None
    # multi-class: class index → the label as in the file
    label_values: tuple[Any, ...] | None = None

    @property
    def n_classes(self) -> int:
        return 2 if self.label_values is None else len(self.label_values)


def load_bundled() -> Split:
    from ..datasets import load_mnist_1v7

    d = load_mnist_1v7()
    return Split(
        "MNIST 1 vs 7 (bundled)",
        d.x_train.astype(np.float64),
        d.y_train.astype(np.int64),
        d.x_test.astype(np.float64),
        d.y_test.astype(np.int64),
        d.image_shape,
        {1: "digit 1", -1: "digit 7"},
    )


DATA_EXPECTED = (
    "an .npz written by np.savez with numeric arrays x_train, y_train, x_test, y_test (integer"
    " labels: {-1, +1} or {0, 1} for binary, 0 … C-1 or any C ≥ 3 values for multi-class; optional"
    " string arrays feature_names, class_names and kind = image|tabular); leave --data out for the"
    " bundled MNIST 1-vs-7 set"
)


def _string_array(
    arrays: dict[str, np.ndarray], key: str, path: str, length: int | None
) -> list[str] | None:
    if key not in arrays:
        return None
    a = arrays[key]
    if a.dtype.kind not in "U":
        raise errors.InputError(
            f"--data {path}: {key} must be an array of strings (np.array([...], dtype=str)); "
            f"got dtype {a.dtype}."
        )
    items = [str(v) for v in a.reshape(-1)]
    if length is not None and len(items) != length:
        raise errors.ShapeError(
            f"--data {path}: {key} has {len(items)} entries but there are {length}; give one each."
        )
    return items


def load_npz(path: str) -> Split:
    from ..datasets._base import load_npz as read

    p = Path(path)
    if not p.exists():
        raise errors.InputError(f"--data {path}: no such file. Pass {DATA_EXPECTED}.")
    if not p.is_file():
        raise errors.InputError(
            f"--data {path}: that is a folder, not a file. Pass {DATA_EXPECTED}."
        )
    arrays = read(p, "--data", ("x_train", "y_train", "x_test", "y_test"), DATA_EXPECTED)
    xs, ys = {}, {}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            raise errors.DtypeError(
                f"--data {path}: x_{part} and y_{part} must be numeric; got {x.dtype} and"
                f" {y.dtype}."
            )
        if x.ndim < 2 or len(x) == 0:
            raise errors.ShapeError(
                f"--data {path}: x_{part} must have shape (n, features…) with n ≥ 1; got {x.shape}."
            )
        y = y.reshape(len(y), -1) if y.ndim > 1 else y
        if y.ndim > 1 and y.shape[1] != 1:
            raise errors.ShapeError(
                f"--data {path}: y_{part} must hold one label per point; got shape"
                f" {arrays[f'y_{part}'].shape}."
            )
        y = y.reshape(-1)
        if len(y) != len(x):
            raise errors.ShapeError(
                f"--data {path}: x_{part} has {len(x)} rows but y_{part} has {len(y)}."
            )
        xs[part], ys[part] = x, y
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise errors.ShapeError(
            f"--data {path}: x_train has points of shape {xs['train'].shape[1:]} but x_test"
            f" {xs['test'].shape[1:]}."
        )
    both = np.concatenate([ys["train"], ys["test"]])
    if not np.all(np.isfinite(both)) or not np.all(both == np.round(both)):
        bad = (
            both[~(np.isfinite(both) & (both == np.round(both)))][:3].tolist()
            if both.dtype.kind == "f"
            else []
        )
        raise errors.InputError(
            f"--data {path}: labels must be integers (class labels); found {bad}. Regression "
            "targets need your own model: upweight explain --model FILE.py:FUNCTION."
        )
    labels = sorted(set(np.unique(both).tolist()))
    shape = tuple(int(s) for s in xs["train"].shape[1:])
    d = int(np.prod(shape))
    declared = None
    if "kind" in arrays:
        kinds = _string_array(arrays, "kind", path, 1)
        assert kinds is not None
        declared = kinds[0]
        if declared not in ("image", "tabular"):
            raise errors.InputError(
                f"--data {path}: kind must be 'image' or 'tabular'; got {declared!r}."
            )
    feature_names = _string_array(arrays, "feature_names", path, d)
    label_values: tuple[Any, ...] | None = None
    if set(labels) <= {-1, 1} or set(labels) <= {0, 1}:
        pm = set(labels) <= {-1, 1}
        given = _string_array(arrays, "class_names", path, 2)
        if given is not None:  # in label order: the name of −1 (or 0), then of +1 (or 1)
            names = {-1: given[0], 1: given[1]}
        else:
            names = {} if pm else {1: "was 1", -1: "was 0"}

        def labs(y: np.ndarray) -> np.ndarray:
            return np.where(y == 1, 1, -1).astype(np.int64)

    else:
        label_values = tuple(int(v) for v in labels)
        given = _string_array(arrays, "class_names", path, len(labels))
        names = {} if given is None else dict(enumerate(given))
        index = {v: c for c, v in enumerate(label_values)}

        def labs(y: np.ndarray) -> np.ndarray:
            return np.array([index[int(v)] for v in y], dtype=np.int64)

    def feats(x: np.ndarray) -> np.ndarray:
        out = x.reshape(len(x), -1).astype(np.float64)
        return out / 255.0 if x.dtype == np.uint8 else out

    kind = declared or ("image" if len(shape) >= 2 else flat_kind(d))
    image_shape: tuple[int, ...] | None = None
    if kind == "image":
        if len(shape) >= 2:
            image_shape = shape
        elif math.isqrt(d) ** 2 == d:
            image_shape = (math.isqrt(d),) * 2
    return Split(
        p.name,
        feats(xs["train"]),
        labs(ys["train"]),
        feats(xs["test"]),
        labs(ys["test"]),
        image_shape,
        names,
        kind,
        feature_names,
        label_values,
    )


def flat_kind(d: int) -> str:
    """A point of d features in one axis: an image when d = s² with s ≥ MIN_IMAGE_SIDE, else
    tabular."""
    side = math.isqrt(d)
    return "image" if side * side == d and side >= MIN_IMAGE_SIDE else "tabular"


def auto_kind(X: Any) -> str:
    """How to show inputs that declare nothing: a dict of inputs is text, points of two or more
    axes are images, one axis of d features follows ``flat_kind``."""
    if isinstance(X, Mapping):
        return "text"
    if X.ndim >= 3:
        return "image"
    return flat_kind(int(X.shape[1])) if X.ndim == 2 else "tabular"


# ── the problem ──────────────────────────────────────────────────────────────────────


@dataclass
class Problem:
    """A trained model with its data and the ways to print and show them."""

    name: str  # the data (and model), for titles
    model_text: str  # one line describing the model, e.g. its architecture, loss and l2
    objective: Any  # upweight.Objective at θ̂
    train: Any  # upweight.Data
    test: Any  # upweight.Data
    task: str  # "binary", "multiclass" or "other"
    kind: str  # one of KINDS
    image_shape: tuple[int, ...] | None
    feature_names: list[str] | None
    label_text: Callable[[Any], str]  # a target → how it is printed
    l2: float
    train_text: Sequence[str] | None = None
    test_text: Sequence[str] | None = None
    retrain: Callable[..., Any] | None = None
    positive: Any = 1  # binary: the label that a score > 0 predicts
    negative: Any = -1
    fit_text: str = ""  # how the built-in model was trained

    def point_input(self, part: str, j: int) -> dict[str, Any]:
        """``image=`` / ``features=`` / ``text=`` of point j of "train" or "test", for the
        report."""
        data = self.train if part == "train" else self.test
        if self.kind == "text":
            texts = self.train_text if part == "train" else self.test_text
            if texts is not None:
                return {"text": str(texts[j])}
            X = data.X
            ids = X.get("input_ids", next(iter(X.values()))) if isinstance(X, Mapping) else X
            row = ids[j].reshape(-1).tolist()
            shown = " ".join(
                str(int(v)) if float(v).is_integer() else f"{float(v):g}"
                for v in row[:TOKEN_IDS_SHOWN]
            )
            return {"text": "token ids: " + shown + (" …" if len(row) > TOKEN_IDS_SHOWN else "")}
        x = data.X[j].detach().cpu().numpy()
        if self.kind == "tabular":
            return {"features": x.reshape(-1).astype(np.float64)}
        return {"image": display_image(x, self.image_shape)}


def display_image(x: np.ndarray, image_shape: tuple[int, ...] | None) -> np.ndarray:
    """One point as a picture: reshaped to ``image_shape``; channels first (1, 3 or 4)
    moved last."""
    a = np.asarray(x, dtype=np.float64)
    if image_shape is not None and a.size == int(np.prod(image_shape)):
        a = a.reshape(image_shape)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (3, 4):
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim > 3:
        a = a.reshape(-1, a.shape[-1])
    return a


def _label_pm(names: Mapping[int, str]) -> Callable[[Any], str]:
    def text(y: Any) -> str:
        v = int(y)
        return f"{v:+d} ({names[v]})" if v in names else f"{v:+d}"

    return text


def _label_classes(
    values: Sequence[Any] | None, names: Mapping[Any, str] | None
) -> Callable[[Any], str]:
    def text(y: Any) -> str:
        c = int(y)
        shown = str(values[c]) if values is not None and 0 <= c < len(values) else str(c)
        name = None if not names else names.get(c, names.get(shown))
        return f"{shown} ({name})" if name is not None else shown

    return text


def builtin_problem(split: Split, l2: float) -> Problem:
    """Train the built-in linear model on ``split`` to the minimum in float64."""
    import time

    import upweight as uw

    n, d = split.x_train.shape
    C = split.n_classes
    X, Xt = torch.from_numpy(split.x_train), torch.from_numpy(split.x_test)
    y, yt = torch.from_numpy(split.y_train), torch.from_numpy(split.y_test)
    binary = split.label_values is None
    loss = "logistic" if binary else "cross_entropy"
    model = torch.nn.Linear(d, 1 if binary else C, bias=False).double().eval()
    with torch.no_grad():
        model.weight.zero_()
    t0 = time.perf_counter()
    fit = uw.refit(uw.Objective(model, loss, l2=l2), uw.Data.from_any((X, y), what="training data"))
    with torch.no_grad():
        model.weight.copy_(fit.params["weight"])
    objective = uw.Objective(model, loss, l2=l2)  # θ̂ is read at construction
    if binary:
        text = f"Linear({d} → 1, no bias), logistic loss, l2 = {l2:g}"
        label_text = _label_pm(split.class_names)
    else:
        text = f"Linear({d} → {C}, no bias), softmax cross-entropy over {C} classes, l2 = {l2:g}"
        label_text = _label_classes(split.label_values, split.class_names)
    return Problem(
        name=split.name,
        model_text=text,
        objective=objective,
        train=uw.Data.from_any((X, y), what="training data"),
        test=uw.Data.from_any((Xt, yt), what="test data"),
        task="binary" if binary else "multiclass",
        kind=split.kind,
        image_shape=split.image_shape,
        feature_names=split.feature_names,
        label_text=label_text,
        l2=l2,
        fit_text=(
            f"L-BFGS in float64: {fit.iterations} iterations, ‖∇R(θ̂)‖ = {fit.grad_norm:.2e}, "
            f"{time.perf_counter() - t0:.2f} s"
        ),
    )


def user_problem(spec: ModelSpec, text: str) -> Problem:
    """The problem of ``--model``: the returned model and data as they are (nothing is trained)."""
    import upweight as uw

    train = uw.Data.from_any(spec.train, what="--model's training data")
    test = uw.Data.from_any(spec.test, what="--model's test data")
    objective = uw.Objective(
        spec.model, spec.loss, l2=spec.l2, params=spec.params, l2_exclude=tuple(spec.l2_exclude)
    )
    train, test = train.to(objective.dtype), test.to(objective.dtype)
    objective.check_data(train, what="training")
    objective.check_data(test, what="test")
    for part, data in (("train", train), ("test", test)):
        texts = getattr(spec, f"{part}_text")
        if texts is not None and len(texts) != len(data):
            raise errors.InputError(
                f"--model {text}: {part}_text has {len(texts)} strings but the {part} data has "
                f"{len(data)} points; give one per point."
            )
    kind = spec.kind or auto_kind(train.X)
    if kind in ("image", "tabular") and train.is_dict:
        raise errors.InputError(
            f"--model {text}: kind {kind!r} needs one input tensor per point, but the inputs are a "
            f"dict ({', '.join(train.X)}); use kind='text' or leave kind out."
        )
    image_shape = spec.image_shape
    if kind == "image" and image_shape is None and train.X.ndim == 2:
        side = math.isqrt(int(train.X.shape[1]))
        image_shape = (side, side) if side * side == int(train.X.shape[1]) else None
    feature_names = spec.feature_names
    if feature_names is not None and kind == "tabular":
        d = int(np.prod(tuple(train.X.shape[1:])))
        if len(feature_names) != d:
            raise errors.InputError(
                f"--model {text}: feature_names has {len(feature_names)} names but the points have "
                f"{d} features; give one name per feature."
            )
    loss_name = objective.loss_name
    y_values = torch.unique(torch.cat([train.y.reshape(-1), test.y.reshape(-1)])).tolist()
    if loss_name == "cross_entropy" and train.y.ndim == 1:
        task = "multiclass"
        label_text = _label_classes(None, spec.class_names)
        positive, negative = 1, 0
    elif loss_name in BINARY_LOSSES or type(spec.loss).__name__ == "SmoothHinge":
        task = "binary"
        pm = set(y_values) <= {-1, 1} and -1 in y_values
        names = spec.class_names or {}
        positive, negative = (1, -1) if pm else (1, 0)

        def label_text(y: Any) -> str:
            v = int(y)
            shown = f"{v:+d}" if pm else str(v)
            return f"{shown} ({names[v]})" if v in names else shown

    else:
        task = "other"
        positive, negative = 1, -1

        def label_text(y: Any) -> str:
            return format_values(y)

    p = objective.p
    model_text = (
        f"{type(spec.model).__name__} with p = {p:,} parameters, {loss_name} loss, l2 = {spec.l2:g}"
        f" (from --model {text})"
    )
    return Problem(
        name=spec.name or text,
        model_text=model_text,
        objective=objective,
        train=train,
        test=test,
        task=task,
        kind=kind,
        image_shape=image_shape,
        feature_names=feature_names,
        label_text=label_text,
        l2=spec.l2,
        train_text=spec.train_text,
        test_text=spec.test_text,
        retrain=spec.retrain,
        positive=positive,
        negative=negative,
    )


def format_values(v: Any, limit: int = 4) -> str:
    """A target or model output for printing: a number, or the first few entries of a vector."""
    a = np.asarray(
        v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64
    ).reshape(-1)
    shown = ", ".join(f"{x:.4g}" for x in a[:limit])
    if a.size == 1:
        return shown
    return f"[{shown}{', …' if a.size > limit else ''}]"


# ── predictions ──────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Predictions:
    """The model on one data set: per point its loss, predicted label (as text) and verdict."""

    loss: np.ndarray  # (n,) per-point loss L(z, θ̂)
    predicted: list[str]  # the prediction as printed (label text, or the model output)
    true: list[str]  # the target as printed
    wrong: np.ndarray | None  # (n,) bool: misclassified; None for tasks without classes
    p_positive: np.ndarray | None  # binary logistic: P(y = +1)
    p_predicted: np.ndarray | None  # multi-class: the probability of the predicted class


def predict(problem: Problem, data: Any, batch_size: int = 1024) -> Predictions:
    obj = problem.objective
    params = obj.params
    losses, outs, ys = [], [], []
    with torch.no_grad():
        for batch in data.batches(batch_size):
            out = obj.outputs(params, batch.X)
            losses.append(obj.losses(params, batch.X, batch.y).detach().cpu().double())
            outs.append(out.detach().cpu().double())
            ys.append(batch.y.detach().cpu())
    loss = torch.cat(losses).numpy()
    out = torch.cat(outs)
    y = torch.cat(ys)
    true = [problem.label_text(t) for t in y]
    if problem.task == "multiclass":
        prob = torch.softmax(out.reshape(len(out), -1), dim=1)
        pred = prob.argmax(dim=1)
        return Predictions(
            loss,
            [problem.label_text(c) for c in pred],
            true,
            (pred != y.long()).numpy(),
            None,
            prob.max(dim=1).values.numpy(),
        )
    if problem.task == "binary":
        s = out.reshape(len(out), -1)[:, 0]
        pred = torch.where(s > 0, problem.positive, problem.negative)
        actual = torch.where(y.reshape(-1) > 0, problem.positive, problem.negative)
        p_pos = torch.sigmoid(s).numpy() if obj.loss_name == "logistic" else None
        return Predictions(
            loss, [problem.label_text(c) for c in pred], true, (pred != actual).numpy(), p_pos, None
        )
    return Predictions(loss, [format_values(o) for o in out], true, None, None, None)
