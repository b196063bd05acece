"""Shared fixtures: real data (the bundled MNIST 1-vs-7 set), fitted models, tiny MLPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.datasets import load_mnist_1v7

# The suite's problems are small: one thread avoids OpenMP spin-waiting, which on a busy
# 2-core machine made tiny tensor ops take milliseconds instead of microseconds.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_1v7():
    return load_mnist_1v7()


def pooled(x: np.ndarray, k: int) -> np.ndarray:
    """Average-pool flattened 28×28 images by k×k (real MNIST pixels in fewer features)."""
    imgs = x.reshape(len(x), 28 // k, k, 28 // k, k)
    return imgs.mean(axis=(2, 4)).reshape(len(x), -1)


def fit_linear(X: torch.Tensor, y: torch.Tensor, loss: str, l2: float, out: int = 1, bias: bool = False, gtol: float = 1e-11):
    """A float64 linear model trained to the minimum of R (so θ̂ is the paper's θ̂)."""
    model = torch.nn.Linear(X.shape[1], out, bias=bias).double().eval()
    with torch.no_grad():
        model.weight.zero_()
    fit = uw.refit(uw.Objective(model, loss, l2=l2), uw.Data.from_any((X, y)), gtol=gtol)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(fit.params[name])
    return model


@pytest.fixture(scope="session")
def small_logreg(mnist_1v7):
    """Binary logistic regression on 400 real 1-vs-7 images pooled to 7×7 = 49 features."""
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:400], 4), dtype=torch.float64)
    y = torch.tensor(d.y_train[:400])
    Xt = torch.tensor(pooled(d.x_test[:30], 4), dtype=torch.float64)
    yt = torch.tensor(d.y_test[:30])
    l2 = 0.01
    model = fit_linear(X, y, "logistic", l2)
    return model, l2, (X, y), (Xt, yt)
