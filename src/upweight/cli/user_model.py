"""``upweight explain --model SPEC``: the user's own trained model and data, from a Python function.

SPEC is ``FILE.py:FUNCTION`` (a path, relative to the working folder or absolute; the file is run
as a module, with its folder first on ``sys.path`` while it is imported and called) or
``MODULE:FUNCTION`` (a dotted module name that Python can import, e.g. an installed package).
The function is called without arguments and returns a ``ModelSpec``, or a dict with the same
keys. Importing the module and calling the function run the user's code in this process, with
the user's rights: ``--model`` is for code the user trusts, as ``python FILE.py`` would be.

Every mistake in the spec — a file that is not there, a module or function that does not exist,
an exception raised by the user's code, a return value of the wrong form — is an
``InputError`` whose one-line message names SPEC, so the command line reports it as a user
error (exit status 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

__all__ = ["KINDS", "ModelSpec", "load_model_spec"]

#: how the inputs are shown: pictures, feature values, or text
KINDS = ("image", "tabular", "text")

EXAMPLE = "examples/cli_model.py:build"


@dataclass
class ModelSpec:
    """What ``--model``'s function returns: a trained model, its data and how to show them.

    Attributes:
        model: the trained ``torch.nn.Module`` in eval mode; its current parameters are θ̂,
            which influence functions assume minimise R(θ) = mean loss + (l2/2)‖θ‖².
        train: the training data it was fitted on — anything ``upweight.Data.from_any``
            accepts: ``(X, y)`` arrays or tensors, a Dataset of ``(x, y)`` pairs, a DataLoader,
            a dict of input tensors with the targets under ``"labels"``.
        test: the test data, in one of the same forms.
        loss: the training loss, a name ``upweight.Objective`` knows ("cross_entropy" for C
            classes with labels 0 … C−1, "logistic" for binary labels {0, 1} or {−1, +1},
            "squared", …) or a callable ``loss(output, target)`` returning one loss per point.
        l2: λ ≥ 0 of the L2 term the model was trained with.
        params: which parameters form θ (``upweight.Objective``'s ``params``); ``None``: all.
        l2_exclude: parameters the L2 term leaves out (``upweight.Objective``'s ``l2_exclude``).
        kind: "image", "tabular" or "text"; ``None`` decides by the inputs: a dict of inputs is
            text, points with two or more axes are images, a vector of d features is an image
            when d is a square of side ≥ 8, and tabular otherwise.
        feature_names: one name per feature, for the tables of tabular points.
        class_names: names of the labels, a sequence indexed by class (cross_entropy) or a
            dict label → name.
        image_shape: how to reshape a flat point into an image, e.g. ``(28, 28)``.
        train_text, test_text: the text of each training and test point, shown for
            ``kind="text"`` (otherwise the token ids are shown).
        retrain: ``train_fn(objective, data_without_z, init_params)`` for the leave-one-out
            check (``upweight.leave_one_out``'s ``train_fn``); ``None`` refits by L-BFGS, which
            finds the minimum for convex models.
        name: what the data or model is called, for titles.
    """

    model: Any
    train: Any
    test: Any
    loss: Any = "cross_entropy"
    l2: float = 0.0
    params: Any = None
    l2_exclude: Sequence[str] = ()
    kind: str | None = None
    feature_names: Sequence[str] | None = None
    class_names: Sequence[str] | Mapping[Any, str] | None = None
    image_shape: Sequence[int] | None = None
    train_text: Sequence[str] | None = None
    test_text: Sequence[str] | None = None
    retrain: Callable[..., Any] | None = None
    name: str = ""


_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))
_REQUIRED = ("model", "train", "test")


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of the exception's traceback (the user's code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _raised(spec: str, doing: str, exc: BaseException) -> InputError:
    return InputError(
        f"--model {spec}: {doing} raised {type(exc).__name__}:"
        f" {_one_line(str(exc)) or '(no message)'}{_where(exc)}; fix that code and try again."
    )


@contextlib.contextmanager
def _first_on_path(folder: str | None) -> Iterator[None]:
    """``folder`` first on ``sys.path`` (unless None), and no bytecode caches written meanwhile:
    the command writes nothing outside its output paths, not even ``__pycache__`` beside FILE.py."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    if folder is not None:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.dont_write_bytecode = before
        if folder is not None:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _parse(spec: str) -> tuple[str, str, bool]:
    """(module or file, function, is_file)."""
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise InputError(
            f"--model {spec}: expected FILE.py:FUNCTION or MODULE:FUNCTION, e.g. {EXAMPLE}."
        )
    if not func.isidentifier():
        raise InputError(
            f"--model {spec}: {func!r} is not a Python function name; expected FILE.py:FUNCTION or "
            f"MODULE:FUNCTION, e.g. {EXAMPLE}."
        )
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise InputError(
            f"--model {spec}: {target!r} is neither a file ending in .py nor a dotted module name; "
            f"e.g. {EXAMPLE} or mypackage.models:build."
        )
    return target, func, is_file


def _import_file(spec: str, target: str) -> tuple[Any, str]:
    path = Path(target)
    if not path.exists():
        raise InputError(
            f"--model {spec}: no such file {target}; give the path of a .py file (relative to the "
            f"working folder or absolute), e.g. {EXAMPLE}."
        )
    if not path.is_file() or path.suffix != ".py":
        raise InputError(
            f"--model {spec}: {target} is not a .py file; give a Python file, e.g. {EXAMPLE}."
        )
    name = "upweight_user_model_" + re.sub(r"\W", "_", path.stem)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"--model {spec}: Python cannot load {target} as a module.")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        with _first_on_path(folder):
            module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except BaseException as exc:  # noqa: BLE001 — the user's code: any failure is theirs to fix
        sys.modules.pop(name, None)
        raise _raised(spec, f"running {target}", exc) from exc
    return module, folder


def _import_module(spec: str, target: str) -> Any:
    try:
        with _first_on_path(None):
            return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise InputError(
                f"--model {spec}: no module named {exc.name!r} can be imported (is it installed or"
                f" on PYTHONPATH?); for a file, write its path: FILE.py:FUNCTION, e.g. {EXAMPLE}."
            ) from exc
        raise _raised(spec, f"importing {target}", exc) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 — the user's code
        raise _raised(spec, f"importing {target}", exc) from exc


def _finite_number(spec: str, what: str, v: Any) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(float(v))
        or float(v) < 0
    ):
        raise InputError(f"--model {spec}: {what} must be a number ≥ 0; got {v!r}.")
    return float(v)


def _strings(spec: str, what: str, v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
        raise InputError(
            f"--model {spec}: {what} must be a list of strings; got {type(v).__name__}."
        )
    items = list(v)
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise InputError(
            f"--model {spec}: {what} must be a list of strings; it holds a {type(bad[0]).__name__}."
        )
    return items


def _checked(spec: str, result: Any) -> ModelSpec:
    if isinstance(result, Mapping):
        unknown = sorted(str(k) for k in result if k not in _FIELDS)
        if unknown:
            raise InputError(
                f"--model {spec}: the returned dict has unknown key(s) {', '.join(unknown)}; the"
                f" keys are {', '.join(_FIELDS)}."
            )
        missing = [k for k in _REQUIRED if k not in result]
        if missing:
            raise InputError(
                f"--model {spec}: the returned dict lacks {', '.join(missing)}; it needs model,"
                " train and test (and may give "
                + ", ".join(k for k in _FIELDS if k not in _REQUIRED)
                + ")."
            )
        result = ModelSpec(**result)
    if not isinstance(result, ModelSpec):
        raise InputError(
            f"--model {spec}: the function returned a {type(result).__name__}; it must return "
            "upweight.cli.ModelSpec(model=…, train=…, test=…) or a dict with those keys."
        )
    if not isinstance(result.model, torch.nn.Module):
        raise InputError(
            f"--model {spec}: 'model' must be a trained torch.nn.Module; got"
            f" {type(result.model).__name__}."
        )
    if result.kind is not None and result.kind not in KINDS:
        raise InputError(
            f"--model {spec}: kind must be one of {', '.join(KINDS)} (or None to decide by the"
            f" data); got {result.kind!r}."
        )
    if not (isinstance(result.loss, str) or callable(result.loss)):
        raise InputError(
            f"--model {spec}: loss must be a name such as 'cross_entropy' or a callable; "
            f"got {type(result.loss).__name__}."
        )
    if result.retrain is not None and not callable(result.retrain):
        raise InputError(
            f"--model {spec}: retrain must be a function train_fn(objective, data, init) or None."
        )
    if not isinstance(result.name, str):
        raise InputError(
            f"--model {spec}: name must be a string; got {type(result.name).__name__}."
        )
    result.l2 = _finite_number(spec, "l2", result.l2)
    result.feature_names = _strings(spec, "feature_names", result.feature_names)
    result.train_text = _strings(spec, "train_text", result.train_text)
    result.test_text = _strings(spec, "test_text", result.test_text)
    if isinstance(result.class_names, Mapping):
        result.class_names = {k: str(v) for k, v in result.class_names.items()}
    else:
        names = _strings(spec, "class_names", result.class_names)
        result.class_names = None if names is None else dict(enumerate(names))
    if result.image_shape is not None:
        shape = tuple(result.image_shape)
        if not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
        ):
            raise InputError(
                f"--model {spec}: image_shape must be positive integers such as (28, 28); got"
                f" {shape!r}."
            )
        result.image_shape = shape
    return result


def load_model_spec(spec: str) -> ModelSpec:
    """Import SPEC's module, call its function and check what it returned (see the module docs).

    Raises:
        InputError: SPEC is malformed, its file or module or function does not exist, the user's
            code raised an exception, or the result is not a ``ModelSpec`` / dict of its fields
            with a ``torch.nn.Module`` model.
    """
    target, func_name, is_file = _parse(spec)
    folder = None
    if is_file:
        module, folder = _import_file(spec, target)
    else:
        module = _import_module(spec, target)
    func = getattr(module, func_name, None)
    if func is None:
        defined = sorted(
            k
            for k, v in vars(module).items()
            if callable(v)
            and not k.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        listed = (
            f" (it defines {', '.join(defined[:8])}{' …' if len(defined) > 8 else ''})"
            if defined
            else ""
        )
        raise InputError(f"--model {spec}: {target} has no function {func_name!r}{listed}.")
    if not callable(func):
        raise InputError(
            f"--model {spec}: {func_name} in {target} is a {type(func).__name__}, not a function."
        )
    try:
        with _first_on_path(folder):
            result = func()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 — the user's code
        raise _raised(spec, f"calling {func_name}()", exc) from exc
    return _checked(spec, result)
