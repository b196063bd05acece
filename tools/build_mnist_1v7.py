"""Build the small real MNIST 1-vs-7 subset shipped in upweight.datasets.

Follows the mapping of Koh & Liang's release code (see shared/data/mnist/README.md): the
55,000-image training split is MNIST train rows 5,000-59,999; digit 1 -> label +1, digit 7 ->
label -1; original order. We keep the first N_TRAIN training and N_TEST test images of that
sequence — exactly the paper's binary 1-vs-7 data set. Run from the repository root:  python
tools/build_mnist_1v7.py ../shared/data/mnist/mnist.npz
"""

import sys

import numpy as np

N_TRAIN, N_TEST = 11_800, 2_100  # the paper's counts: 11,894 and 2,163 rounded down to hundreds

src = np.load(sys.argv[1])
xtr, ytr = src["x_train"][5000:], src["y_train"][5000:]
xte, yte = src["x_test"], src["y_test"]


def pick(x, y, n):
    keep = np.flatnonzero((y == 1) | (y == 7))[:n]
    return x[keep], np.where(y[keep] == 1, 1, -1).astype(np.int8), keep


x_train, y_train, id_train = pick(xtr, ytr, N_TRAIN)
x_test, y_test, id_test = pick(xte, yte, N_TEST)
np.savez_compressed(
    "src/upweight/datasets/mnist_1v7.npz",
    x_train=x_train,
    y_train=y_train,
    x_test=x_test,
    y_test=y_test,
    source_index_train=(id_train + 5000).astype(np.int32),
    source_index_test=id_test.astype(np.int32),
)
print(x_train.shape, x_test.shape, (y_train == 1).sum(), (y_test == 1).sum())
