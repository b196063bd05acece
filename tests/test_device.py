"""Device-agnostic influence: the model decides the device. Data batches (on the CPU) are moved to
it as they are consumed, everything is computed there, and results come back as NumPy arrays
equal to the same computation on the CPU.

Parametrised over the devices present: the CPU always (CI), CUDA where a GPU is (``make
gpu-check``); skipped with the reason otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import DEVICES
from upweight.solvers.kfac import EKFAC, KFAC


def _softmax_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 6, generator=g, dtype=torch.float64)
    W = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (X @ W + 0.5 * torch.randn(120, 3, generator=g, dtype=torch.float64)).argmax(1)
    model = (
        torch.nn.Sequential(
            torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)
        )
        .double()
        .eval()
    )
    return model, (X, y), (X[:4], y[:4])


def _on(model: torch.nn.Module, device: str) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make_solver",
    [
        lambda: uw.Direct(),
        lambda: uw.CG(rtol=1e-10),
        lambda: KFAC(),
        lambda: EKFAC(),
        lambda: uw.Arnoldi(rank=20),
    ],
    ids=["direct", "cg", "kfac", "ekfac", "arnoldi"],
)
def test_scores_on_the_models_device_equal_the_cpus(device, make_solver):
    model, train, test = _softmax_problem()
    results = []
    for where in ("cpu", device):
        m = _on(model, where)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        obj = uw.Objective(m, "cross_entropy", l2=0.05)
        inf = uw.Influence(
            obj,
            solver=make_solver(),
            curvature="gauss-newton",
            damping=0.01,
            progress=False,
            grad_tol=1e9,
            max_residual=None,
        ).fit(train)  # data given on the CPU
        scores = inf.up_loss(test)
        assert isinstance(scores.values, np.ndarray) and np.isfinite(scores.values).all()
        # the model is not changed
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
        assert next(m.parameters()).device.type == torch.device(where).type
        results.append(scores.values)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_dict_batches_on_the_models_device(device):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=2,
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 30, (10, 8), generator=g)
    mask = torch.ones(10, 8, dtype=torch.long)
    mask[::3, 5:] = 0
    train = ({"input_ids": ids, "attention_mask": mask}, torch.arange(10) % 2)
    test = ({"input_ids": ids[:2], "attention_mask": mask[:2]}, torch.tensor([0, 1]))
    results = []
    for where in ("cpu", device):
        obj = uw.Objective(_on(model, where), "cross_entropy", l2=0.01)
        inf = uw.Influence(
            obj,
            solver=EKFAC(),
            curvature="gauss-newton",
            progress=False,
            grad_tol=1e9,
            max_residual=None,
        ).fit(train)
        assert inf.scoring_ == "structured"
        results.append(inf.up_loss(test).values)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_leave_one_out_retrains_on_the_models_device(device):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.3 * torch.randn(60, generator=g, dtype=torch.float64) > 0).long()
    model = torch.nn.Linear(4, 2).double().eval()
    fit = uw.refit(uw.Objective(model, "cross_entropy", l2=0.1), uw.Data.from_any((X, y)))
    model.load_state_dict(fit.params)
    obj = uw.Objective(_on(model, device), "cross_entropy", l2=0.1)
    inf = uw.Influence(obj, solver=uw.Direct(), progress=False).fit((X, y))
    check = uw.leave_one_out(inf, (X[:2], y[:2]), k=4, progress=False)
    assert check.pearson > 0.95 and np.isfinite(check.actual).all()
