"""Shared fixtures: real data (the bundled MNIST 1-vs-7 set), fitted models, tiny MLPs; and
``shared_data``, where the tests on the larger real data sets find them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import upweight as uw
from reference import explicit_hessian
from upweight.datasets import load_mnist_1v7

# The suite's problems are small: one thread avoids OpenMP spin-waiting, which on a busy
# 2-core machine made tiny tensor ops take milliseconds instead of microseconds.
torch.set_num_threads(1)

#: the environment variable naming the real-data folder (holding mnist/, enron1/, hospital/)
DATA_ENV = "UPWEIGHT_DATA"

#: the CUDA case of a device-parametrised test: skipped, with the reason, where there is no GPU
CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: the GPU path is checked by make gpu-check",
    ),
)
#: the devices a device-parametrised test runs on: the CPU always, CUDA where there is a GPU
DEVICES = ["cpu", CUDA]


def shared_data(*parts: str) -> Path:
    """A path in the real-data folder: ``$UPWEIGHT_DATA`` when it is set (and not empty), else
    ``../shared/data`` beside the repository. Tests that need a file there use ``requires_data`` or
    ``skip_without_data``."""
    env = os.environ.get(DATA_ENV, "").strip()
    root = (
        Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    return root.joinpath(*parts)


def _data_missing(path: Path, what: str) -> str:
    return (
        f"{what} is not at {path} (set ${DATA_ENV} to the folder holding mnist/, enron1/ and "
        "hospital/)"
    )


def requires_data(path: Path, what: str) -> pytest.MarkDecorator:
    """A mark for tests that need a real-data file: they skip where it is absent, except when CI is
    set, where they fail — CI runs beside the data, so a missing file there is a broken layout."""
    if path.exists():
        return pytest.mark.requires_data
    if os.environ.get("CI"):
        return pytest.mark.missing_data(reason=_data_missing(path, what))
    return pytest.mark.skip(reason=_data_missing(path, what))


def skip_without_data(path: Path, what: str) -> None:
    """Inside a test or fixture: skip (fail when CI is set) if a real-data file is absent."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(
                _data_missing(path, what) + "; CI is set, so the real-data tests must run",
                pytrace=False,
            )
        pytest.skip(_data_missing(path, what))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_data: the test reads the real data sets")
    config.addinivalue_line("markers", "missing_data(reason): real data absent while CI is set")


def pytest_runtest_setup(item: pytest.Item) -> None:
    mark = item.get_closest_marker("missing_data")
    if mark is not None:
        pytest.fail(
            mark.kwargs["reason"] + "; CI is set, so the real-data tests must run", pytrace=False
        )


@pytest.fixture(scope="session")
def mnist_1v7():
    return load_mnist_1v7()


def pooled(x: np.ndarray, k: int) -> np.ndarray:
    """Average-pool flattened 28×28 images by k×k (real MNIST pixels in fewer features)."""
    imgs = x.reshape(len(x), 28 // k, k, 28 // k, k)
    return imgs.mean(axis=(2, 4)).reshape(len(x), -1)


def fit_linear(
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    l2: float,
    out: int = 1,
    bias: bool = False,
    gtol: float = 1e-11,
):
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


class TanhMLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(torch.nn.Module):
    """Two Conv2d layers (T = 49 and 9 locations) and a Linear head on 7×7 pooled images."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = torch.nn.Conv2d(3, 2, 3, stride=2)
        self.fc = torch.nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x.reshape(-1, 1, 7, 7)))))
        return self.fc(h.flatten(1))


@pytest.fixture(scope="session")
def dask_executor():
    """One Dask LocalCluster of 2 worker processes (1 thread each) for every test that needs one.

    Workers start with the ``forkserver`` method: with ``spawn`` (Dask's default) closing the
    cluster took 3.7 s instead of 0.1 s here once the workers had imported torch."""
    pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (pip install upweight[dask])"
    )
    dask = pytest.importorskip("dask")
    from upweight.distributed import DaskExecutor

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        executor = DaskExecutor("local", n_workers=2, threads_per_worker=1, processes=True)
    try:
        yield executor
    finally:
        executor.close()
    assert executor.client.status == "closed"


@pytest.fixture(scope="session")
def untrained_mlp(mnist_1v7):
    """A small tanh MLP far from any minimum on real pooled MNIST (p = 116): its Hessian is
    indefinite.

    Returns (model, X, y, H) with H the explicit float64 Hessian of the mean loss (no L2).
    """
    torch.manual_seed(3)
    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:200], 7), dtype=torch.float64)  # 16 features
    y = torch.tensor((d.y_train[:200] > 0).astype(np.int64))
    model = TanhMLP(16, 6, 2).double().eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(3.0)
    named = list(model.named_parameters())
    sizes = [t.numel() for _, t in named]
    theta = torch.cat([t.detach().reshape(-1) for _, t in named])

    def risk(flat):
        params = {n: t.reshape(s.shape) for (n, s), t in zip(named, flat.split(sizes))}
        return F.cross_entropy(torch.func.functional_call(model, params, (X,)), y)

    H = explicit_hessian(risk, theta)
    assert float(torch.linalg.eigvalsh(H)[0]) < -1e-2, "fixture must have an indefinite Hessian"
    return model, X, y, H
