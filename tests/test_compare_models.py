"""§5.1 compare models (Koh & Liang 2017, Fig. 4) on real MNIST: ``upweight reproduce
compare-models``.

Fast setting: 4 vs 9, 100 training images per class, a feature CNN trained for one epoch on 2,000
other MNIST images. Measured (seed 0): the 10% most influential training points' |I_up,loss| has
Spearman ρ with pixel distance of about −0.9 for the RBF SVM and about −0.2 for the feature model;
the RBF SVM puts ~0.8 of Σ|I_up,loss| on the nearest 10% of training images, the feature model ~0.2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import requires_data, shared_data
from upweight.cli.main import main

DATA = shared_data("mnist")
pytestmark = requires_data(DATA / "mnist.npz", "the MNIST data")

FAST = [
    "--n-per-class",
    "100",
    "--n-test-per-class",
    "50",
    "--cnn-images",
    "2000",
    "--cnn-epochs",
    "1",
    "--n-features",
    "32",
    "--n-tests",
    "20",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rc = main(
        [
            "reproduce",
            "compare-models",
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--no-progress",
            *FAST,
        ]
    )
    return rc, out, json.loads((out / "results.json").read_text())


def test_cli_writes_figure_results_and_report(run):
    rc, out, r = run
    assert rc == 0
    assert (out / "compare_models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("feature", "rbf", "distances", "test_index", "paper", "rbf_gamma", "seconds"):
        assert key in r, key
    assert len(r["distances"]) == r["n_train"] == 200 and len(r["feature"]["up_loss"]) == 200
    report = (out / "report.md").read_text()
    assert "| quantity | ours | paper |" in report and "5th most helpful is a dog" in report


def test_both_models_classify_the_test_image_correctly(run):
    _, _, r = run
    label = r["test_label"]
    assert r["feature"]["test_score"] * label > 0
    # correct, inside the SVM margin (so its influence is not ≈ 0)
    assert 0 < r["rbf"]["test_score"] * label < 1
    assert r["rbf"]["grad_norm"] < 1e-6 and r["feature"]["grad_norm"] < 1e-6


def test_rbf_influence_falls_with_pixel_distance_more_than_the_feature_models(run):
    _, _, r = run
    f, s = r["feature"], r["rbf"]
    assert s["spearman_influential"] < f["spearman_influential"] - 0.3
    assert s["spearman_influential"] < -0.4
    assert s["mass_nearest_decile"] > f["mass_nearest_decile"] + 0.2
    assert s["median_mass_nearest_decile"] > f["median_mass_nearest_decile"] + 0.2


@pytest.mark.parametrize("extractor", ["cnn", "resnet"])
def test_pert_loss_through_the_frozen_cnn_matches_finite_differences_of_retraining(extractor):
    """I_pert,loss (Eq. 5) of the full model CNN + top layer with θ = the top layer: moving one
    pixel of one training image by ±h, recomputing its features through the CNN and retraining the
    top layer exactly changes the test loss by ≈ ±(h/n)·I_pert,loss[pixel]. The same through the
    residual network (BatchNorm in eval mode)."""
    from upweight.datasets import load_mnist
    from upweight.paper.attack import TopLayerAttack
    from upweight.paper.config import FeatureConfig
    from upweight.paper.features import build_feature_model, features_of

    data = load_mnist(DATA)
    s = build_feature_model(
        data,
        FeatureConfig(
            n_per_class=40,
            n_test_per_class=5,
            cnn_images=600,
            cnn_epochs=1,
            n_features=16,
            extractor=extractor,
        ),
    )
    X, y = torch.as_tensor(s.task.x_train), torch.as_tensor(s.task.y_train)
    obj = uw.Objective(s.model, "logistic", l2=s.l2, params="top")
    assert obj.space.names == ("top.weight",)
    inf = uw.Influence(obj, solver=uw.Direct(), progress=False, grad_tol=1e-6).fit((X, y))
    test = (torch.as_tensor(s.task.x_test[:1]), torch.as_tensor(s.task.y_test[:1]))
    i = int(np.argmax(np.abs(inf.up_loss(test).values[0])))  # an influential training image
    pert = inf.pert_loss(test, train=[i]).values[0, 0]  # (784,)
    j = int(np.argmax(np.abs(pert)))
    # the residual network's ReLUs make φ piecewise linear: a smaller step stays on one piece
    n, h = len(y), (1e-3 if extractor == "cnn" else 1e-5)

    lin = torch.nn.Linear(s.F.shape[1], 1, bias=False).double().eval()

    def test_loss(pixel: int, delta: float) -> float:
        Xp = s.task.x_train[i : i + 1].copy()
        Xp[0, pixel] += delta
        F = s.F.clone()
        F[i] = features_of(s.net, Xp)[0]
        with torch.no_grad():
            lin.weight.copy_(s.top_weight())
        fit = uw.refit(
            uw.Objective(lin, "logistic", l2=s.l2),
            uw.Data.from_any((F, y)),
            gtol=1e-13,
            newton=True,
        )
        with torch.no_grad():
            lin.weight.copy_(fit.params["weight"])
            ft = features_of(s.net, s.task.x_test[:1])
            margin = float(lin(ft)[0, 0]) * float(test[1][0])
            return float(np.log1p(np.exp(-margin)))  # log(1 + exp(−y·s))

    fd = (test_loss(j, h) - test_loss(j, -h)) / (2 * h)
    assert fd == pytest.approx(pert[j] / n, rel=2e-3)
    # a pixel direction with a small I_pert,loss moves the test loss correspondingly little
    k = int(np.argsort(np.abs(pert))[len(pert) // 2])
    fd_small = (test_loss(k, h) - test_loss(k, -h)) / (2 * h)
    assert abs(fd_small - pert[k] / n) < 1e-3 * abs(pert).max() / n

    # the attack loop's closed-form s_test equals the library's Influence + Direct solve
    atk = TopLayerAttack(s)
    np.testing.assert_allclose(
        atk.s_test_closed(s.F, s.top_weight(), [0]).numpy(),
        atk.s_test(s.F, s.top_weight(), [0]).numpy(),
        rtol=1e-8,
        atol=1e-12,
    )
