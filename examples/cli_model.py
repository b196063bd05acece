"""Your own model for ``upweight explain --model``: softmax regression on scikit-learn's wine data.

    upweight explain --model examples/cli_model.py:build --n-test 8 --report out/wine.html

``build()`` trains the model (plain PyTorch, nothing of upweight) and returns it with its data:
178 wines, 13 chemical measurements each, 3 cultivars; 70 % for training, 30 % for testing,
features standardised with the training set's mean and deviation. The model is a
``Linear(13 → 3)`` trained on the mean cross-entropy plus (l2/2)‖θ‖² to the minimum in float64
by full-batch L-BFGS — influence functions assume θ̂ minimises exactly that objective, so the
spec returns the same loss and l2. ``kind="tabular"`` makes the report show feature values.
Takes about a second.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

from upweight.cli import ModelSpec

L2 = 0.01


def build() -> ModelSpec:
    wine = load_wine()
    x_train, x_test, y_train, y_test = train_test_split(
        wine.data, wine.target, test_size=0.3, random_state=0, stratify=wine.target
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    X = torch.tensor((x_train - mean) / std, dtype=torch.float64)
    Xt = torch.tensor((x_test - mean) / std, dtype=torch.float64)
    y, yt = torch.tensor(y_train, dtype=torch.long), torch.tensor(y_test, dtype=torch.long)

    torch.manual_seed(0)
    model = torch.nn.Linear(X.shape[1], 3).double()
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def risk() -> torch.Tensor:
        opt.zero_grad()
        r = torch.nn.functional.cross_entropy(model(X), y)
        r = r + 0.5 * L2 * sum((p**2).sum() for p in model.parameters())
        r.backward()
        return r

    opt.step(risk)
    model.eval()
    return ModelSpec(
        model=model,
        train=(X, y),
        test=(Xt, yt),
        loss="cross_entropy",
        l2=L2,
        kind="tabular",
        feature_names=list(wine.feature_names),
        class_names=[str(c) for c in np.asarray(wine.target_names)],
        name="scikit-learn wine (softmax regression)",
    )
