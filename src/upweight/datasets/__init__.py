"""Real data sets: a small MNIST subset shipped for the demo, and loaders for the user's own copies.

Loaders (each takes a path the user gives; nothing is downloaded and no other location is read):

* :func:`load_mnist` — MNIST from the four IDX files or an .npz; the paper's 55,000 / 5,000 /
  10,000 split, the binary 1-vs-7 task and the small-CNN 10% subset.
* :func:`load_enron` — Enron-Spam ``enron1`` (tarball, CSV or folder) as bag-of-words with
  scikit-learn's ``CountVectorizer(min_df=5)``, 4,137 train / 1,035 test.
* :func:`load_hospital` — UCI Diabetes 130-US hospitals (CSV, zip or the prepared .npz) as the
  paper's 127 features and balanced 20,000-row training split.

Shipped: ``mnist_1v7.npz``: Koh & Liang's binary MNIST task (§2.3, §4.3) — digits 1 (label +1) and
7 (label −1) from their 55,000-image training split (MNIST train rows 5,000–59,999) and the
test set, in original order, rounded down to 11,800 training and 2,100 test images as in the
authors' code. uint8 pixels, 1.6 MB. Source: LeCun, Cortes & Burges, the MNIST
database. Built by ``tools/build_mnist_1v7.py`` in the upweight repository.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ._base import SplitData
from .enron import TextSplitData, load_enron
from .hospital import load_hospital
from .mnist import load_mnist, read_idx


def load_mnist_1v7(*, flatten: bool = True) -> SplitData:
    """MNIST 1 (label +1) vs 7 (label −1): 11,800 train / 2,100 test images scaled to [0, 1].

    Examples:
        >>> d = load_mnist_1v7()
        >>> d.x_train.shape, d.x_test.shape, sorted(set(d.y_train.tolist()))
        ((11800, 784), (2100, 784), [-1, 1])
    """
    with (
        resources.files(__name__).joinpath("mnist_1v7.npz").open("rb") as fh,
        np.load(fh, allow_pickle=False) as f,
    ):
        arrays = {k: f[k] for k in f.files}

    def prep(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255.0
        return x.reshape(len(x), -1) if flatten else x

    return SplitData(
        x_train=prep(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=prep(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int64),
        source_index_train=arrays["source_index_train"],
        source_index_test=arrays["source_index_test"],
        name="mnist_1v7",
        image_shape=(28, 28),
    )


__all__ = [
    "SplitData",
    "TextSplitData",
    "load_enron",
    "load_hospital",
    "load_mnist",
    "load_mnist_1v7",
    "read_idx",
]
