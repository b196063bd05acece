"""MNIST from a path the user gives: the four IDX files or an .npz, split as in Koh & Liang (2017).

Source: the MNIST database of handwritten digits (Y. LeCun, C. Cortes, C. J. C. Burges),
``yann.lecun.com/exdb/mnist/``: 60,000 training and 10,000 test images, 28×28 greyscale, uint8
pixels 0–255, labels 0–9, in four gzipped IDX files. Licence: the original page states none;
dataset catalogues commonly list MNIST as CC BY-SA 3.0. Nothing is downloaded here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DtypeError, InputError, ShapeError
from ._base import PathArg, SplitData, listing, load_npz, read_bytes, resolve_path

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
N_VALIDATION = 5_000  # the release code's (and TensorFlow's read_data_sets') validation size
_EXPECTED = (
    "a folder with the four MNIST IDX files (train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) "
    "or an .npz with arrays x_train, y_train, x_test, y_test"
)
_WHAT = "load_mnist"


def read_idx(path: PathArg) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array of the shape its header gives.

    IDX is MNIST's format: a big-endian header — two zero bytes, a type byte (0x08 = uint8),
    the number of dimensions, then one uint32 per dimension — followed by the values.

    Args:
        path: an IDX file such as ``train-images-idx3-ubyte.gz``.

    Returns:
        The values, e.g. shape (60000, 28, 28) for training images or (60000,) for labels.

    Raises:
        InputError: the path is missing, or the file is not a uint8 IDX file of consistent size.
    """
    p = resolve_path(path, "read_idx", "an MNIST IDX file such as train-images-idx3-ubyte.gz")
    raw = read_bytes(p, "read_idx")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise InputError(
            f"read_idx: '{p}' is not an MNIST IDX file of uint8 values (its first bytes are "
            f"{raw[:4].hex() or 'missing'}; expected 00 00 08 01/03). Pass one of the four "
            "MNIST files, e.g. train-images-idx3-ubyte.gz."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = (
        tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
        if len(raw) >= header
        else ()
    )
    if len(dims) != ndim or len(raw) - header != int(np.prod(dims)):
        raise InputError(
            f"read_idx: '{p}' is truncated or damaged: its header gives shape {dims} "
            f"but it holds {max(len(raw) - header, 0)} values. Download the file again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (
        stem + ".gz",
        stem,
        stem.replace("-idx", ".idx") + ".gz",
        stem.replace("-idx", ".idx"),
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_raw(p: Path) -> dict[str, np.ndarray]:
    """The four uint8 arrays, from a folder of IDX files, a folder holding mnist.npz, or an .npz."""
    if p.is_dir():
        found = {k: _find_idx(p, stem) for k, stem in IDX_FILES.items()}
        if all(found.values()):
            return {k: read_idx(f) for k, f in found.items()}
        if (p / "mnist.npz").is_file() and not any(found.values()):
            p = p / "mnist.npz"
        else:
            missing = [IDX_FILES[k] + "[.gz]" for k, f in found.items() if f is None]
            raise InputError(
                f"{_WHAT}: folder '{p}' lacks {', '.join(missing)} ({listing(p)}). "
                f"Pass {_EXPECTED}."
            )
    elif p.name.split(".")[0] in IDX_FILES.values():
        raise InputError(
            f"{_WHAT}: '{p}' is a single IDX file; pass the folder that holds all four "
            f"({p.parent}), or read this one with read_idx."
        )
    arrays = load_npz(p, _WHAT, tuple(IDX_FILES), _EXPECTED)
    return {k: arrays[k] for k in IDX_FILES}


def _check(arrays: dict[str, np.ndarray], source: Path) -> None:
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8:
            raise DtypeError(
                f"{_WHAT}: x_{part} in '{source}' has dtype {x.dtype}; expected the raw uint8 "
                "pixels 0–255 (the loader scales them to [0, 1]). Save the original images."
            )
        if x.ndim == 2 and x.shape[1] == 784:
            x = arrays[f"x_{part}"] = x.reshape(len(x), 28, 28)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ShapeError(
                f"{_WHAT}: x_{part} in '{source}' has shape {x.shape}; expected (n, 28, 28) "
                "or (n, 784)."
            )
        if y.dtype.kind not in "iu":
            raise DtypeError(
                f"{_WHAT}: y_{part} in '{source}' has dtype {y.dtype}; expected integer digit"
                " labels 0–9."
            )
        if y.shape != (len(x),):
            raise ShapeError(
                f"{_WHAT}: y_{part} in '{source}' has shape {y.shape}; expected ({len(x)},), "
                f"one label per image of x_{part}."
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise InputError(
                f"{_WHAT}: y_{part} in '{source}' has labels outside 0–9 "
                f"(min {y.min()}, max {y.max()}); expected MNIST digit labels."
            )
    if len(arrays["x_train"]) <= N_VALIDATION:
        raise ShapeError(
            f"{_WHAT}: '{source}' has {len(arrays['x_train'])} training images; the paper's split "
            f"needs more than {N_VALIDATION} (MNIST has 60,000). Pass the full training set."
        )


def load_mnist(
    path: PathArg,
    *,
    split: str = "paper",
    subset: str | None = None,
    flatten: bool = True,
) -> SplitData:
    """Load MNIST from the user's copy and split it as Koh & Liang's release code does.

    Source: the MNIST database (LeCun, Cortes & Burges), ``yann.lecun.com/exdb/mnist/``.
    Licence: none stated on the original page; catalogues commonly list CC BY-SA 3.0.

    Mapping to the paper (release code ``scripts/load_mnist.py``, after TensorFlow's
    ``read_data_sets``):

    * ``split="paper"``: validation = the first 5,000 training images (rows 0–4,999),
      train = the remaining **55,000** (rows 5,000–59,999; the paper's n for 10-class logistic
      regression), test = all 10,000.
    * ``split="full"``: all 60,000 training images, no validation split.
    * ``subset="1v7"`` (§2.3/§4.3 binary task, ``run_hinge_experiment.py``): keep digits 1 and 7
      of the 55,000 and of the test set in original order, digit 1 → +1 and digit 7 → −1, and
      round each count down to a multiple of 100: 11,894 → **11,800** train, 2,163 → **2,100**
      test, no validation. Identical to the bundled :func:`load_mnist_1v7`.
    * ``subset="small10pct"`` (the small CNN, ``load_small_mnist``): ``np.random.seed(0)``,
      shuffle ``np.arange(55000)``, keep the first **5,500** of the 55,000 in that order;
      validation and test unchanged. Uses its own ``RandomState(0)``; the global numpy state
      is untouched.

    Pixels become float32 in [0, 1] (÷255). Labels are int64 digits 0–9 (±1 for ``"1v7"``).

    Args:
        path: a folder with the four IDX files (``train-images-idx3-ubyte.gz`` …, gzipped or
            not), a folder holding ``mnist.npz``, or an ``.npz`` file with uint8 arrays
            ``x_train`` (60000, 28, 28), ``y_train``, ``x_test``, ``y_test``.
        split: ``"paper"`` or ``"full"`` (see above).
        subset: ``None``, ``"1v7"`` or ``"small10pct"``; both subsets need ``split="paper"``.
        flatten: rows of 784 features if True, else images of shape (28, 28).

    Returns:
        SplitData with ``x_train``, ``y_train``, ``x_test``, ``y_test``, ``x_val``/``y_val``
        (``None`` for ``split="full"`` and ``"1v7"``), ``source_index_*`` (row in the original
        60,000-image training file for train and validation, in the 10,000-image test file for
        test), ``name`` (``"mnist"``, ``"mnist_full"``, ``"mnist_1v7"``, ``"mnist_small10pct"``)
        and ``image_shape=(28, 28)``.

    Raises:
        InputError: a missing path, a folder without the four files, a file that is neither
            IDX nor .npz, missing arrays or unknown options. ShapeError / DtypeError for
            arrays of the wrong shape or dtype.

    Examples:
        >>> d = load_mnist("path/to/mnist")  # doctest: +SKIP
        >>> d.x_train.shape, d.x_val.shape, d.x_test.shape  # doctest: +SKIP
        ((55000, 784), (5000, 784), (10000, 784))
    """
    if split not in ("paper", "full"):
        raise InputError(
            f"{_WHAT}: split must be 'paper' (55,000 train + 5,000 validation) or 'full' "
            f"(60,000 train); got {split!r}."
        )
    if subset not in (None, "1v7", "small10pct"):
        raise InputError(f"{_WHAT}: subset must be None, '1v7' or 'small10pct'; got {subset!r}.")
    if subset is not None and split != "paper":
        raise InputError(
            f"{_WHAT}: subset={subset!r} is defined on the paper's 55,000-image split; "
            "use split='paper' (the default)."
        )
    p = resolve_path(path, _WHAT, _EXPECTED)
    arrays = _read_raw(p)
    _check(arrays, p)

    x_all, y_all = arrays["x_train"], arrays["y_train"]
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    idx_test = np.arange(len(y_test))
    idx_val: np.ndarray | None = None
    if split == "full":
        idx_train = np.arange(len(y_all))
    else:
        idx_val = np.arange(N_VALIDATION)
        idx_train = np.arange(N_VALIDATION, len(y_all))
    name = "mnist" if split == "paper" else "mnist_full"
    y_map = lambda y: y.astype(np.int64)  # noqa: E731

    if subset == "1v7":
        name, idx_val = "mnist_1v7", None

        def keep17(idx: np.ndarray, y: np.ndarray) -> np.ndarray:
            keep = idx[(y[idx] == 1) | (y[idx] == 7)]
            return keep[: len(keep) // 100 * 100]

        idx_train, idx_test = keep17(idx_train, y_all), keep17(idx_test, y_test)
        y_map = lambda y: np.where(y == 1, 1, -1).astype(np.int64)  # noqa: E731
    elif subset == "small10pct":
        name = "mnist_small10pct"
        perm = np.arange(len(idx_train))
        np.random.RandomState(0).shuffle(perm)  # == np.random.seed(0); np.random.shuffle(perm)
        idx_train = idx_train[perm[: len(idx_train) // 10]]

    def prep(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255.0
        return x.reshape(len(x), -1) if flatten else x

    return SplitData(
        x_train=prep(x_all[idx_train]),
        y_train=y_map(y_all[idx_train]),
        x_test=prep(x_test[idx_test]),
        y_test=y_map(y_test[idx_test]),
        source_index_train=idx_train,
        source_index_test=idx_test,
        name=name,
        image_shape=(28, 28),
        x_val=None if idx_val is None else prep(x_all[idx_val]),
        y_val=None if idx_val is None else y_map(y_all[idx_val]),
        source_index_val=idx_val,
    )


__all__ = ["load_mnist", "read_idx"]
