"""§5.2 training-set attack (Koh & Liang 2017) on real MNIST: ``upweight reproduce attack``.

Small setting: 4 vs 9, 100 training images per class, a feature CNN trained for one epoch on 2,000
other MNIST images, whole 8-bit levels (``projection="levels"``), ε = 32/255. Measured (seed 0):
the second target (test image 2, margin 1.87) flips with one perturbed training image after 25
iterations; ε = 8/255 flips neither of the first six.
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

SETUP = {
    "n_per_class": 100,
    "n_test_per_class": 50,
    "cnn_images": 2000,
    "cnn_epochs": 1,
    "n_features": 32,
}
EPS = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETUP.items()]
    rc = main(
        [
            "reproduce",
            "attack",
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--no-progress",
            *args,
            "--targets",
            "2",
            "--max-k",
            "1",
            "--iterations",
            "30",
            "--projection",
            "levels",
            "--epsilon",
            str(EPS),
            "--group-size",
            "3",
        ]
    )
    return rc, out, json.loads((out / "results.json").read_text())


def test_cli_writes_figure_results_and_report(run):
    rc, out, r = run
    assert rc == 0
    assert (out / "attack.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in (
        "flips_by_k",
        "flip_rate",
        "targets",
        "runs",
        "example",
        "multi",
        "paper",
        "verified_all",
    ):
        assert key in r, key
    assert len(r["targets"]) == 2 and set(r["multi"]["by_k"]) == {"1", "10"}
    report = (out / "report.md").read_text()
    assert "| quantity | ours | paper |" in report and "57%" in report and "16/30" in report


def test_one_perturbed_training_image_flips_a_test_prediction(run):
    _, _, r = run
    assert r["flips_by_k"]["1"] >= 1 and r["verified_all"]
    ex = r["example"]
    assert (
        ex
        and ex["run"]["flipped"] == [True]
        and ex["run"]["margin_before"][0] > 0 > ex["run"]["margin_after"][0]
    )


def test_the_perturbed_image_is_a_valid_8bit_image_within_epsilon(run):
    _, _, r = run
    orig = np.asarray(r["example"]["original_levels"])
    pert = np.asarray(r["example"]["perturbed_levels"])
    assert pert.dtype.kind == "i" and pert.min() >= 0 and pert.max() <= 255
    assert 0 < np.abs(pert - orig).max() <= EPS
    for run_ in r["runs"]:
        assert run_["linf_levels"] <= EPS


def test_the_flip_holds_under_an_independent_retrain(run):
    """Rebuild the (deterministic) CNN and task, put the perturbed image in, retrain the top layer
    from θ = 0 with upweight.refit (L-BFGS, not the attack's Newton steps): the target is
    misclassified; with the original image it is not."""
    from upweight.datasets import load_mnist
    from upweight.paper.config import FeatureConfig
    from upweight.paper.features import build_feature_model, features_of

    _, _, r = run
    s = build_feature_model(load_mnist(DATA), FeatureConfig(**SETUP))
    ex = r["example"]
    i, t = ex["train"][0], ex["target"]
    y = torch.as_tensor(s.task.y_train)
    ft = features_of(s.net, s.task.x_test[t : t + 1])[0]

    def margin_after_retrain(image: np.ndarray) -> float:
        F = s.F.clone()
        F[i] = features_of(s.net, image[None])[0]
        lin = torch.nn.Linear(F.shape[1], 1, bias=False).double().eval()
        with torch.no_grad():
            lin.weight.zero_()
        fit = uw.refit(uw.Objective(lin, "logistic", l2=s.l2), uw.Data.from_any((F, y)), gtol=1e-9)
        return float(fit.params["weight"][0] @ ft) * float(s.task.y_test[t])

    assert margin_after_retrain(np.asarray(ex["original_levels"][0]) / 255.0) > 0
    assert margin_after_retrain(np.asarray(ex["perturbed_levels"][0]) / 255.0) < 0


def test_per_image_changes_against_the_class_spread(run):
    """The per-image ratios of the report, from the rebuilt task's class spreads (mean distance to
    the class centroid, in pixels and in features) and each run's ‖Δx‖₂, ‖Δφ‖₂ over its k images:
    every perturbed pixel moves at most ε, so ‖Δx‖₂/√k ≤ ε·√784 per image."""
    from upweight.datasets import load_mnist
    from upweight.paper.config import FeatureConfig
    from upweight.paper.features import build_feature_model

    _, out, r = run
    s = build_feature_model(load_mnist(DATA), FeatureConfig(**SETUP))

    def spread(X: np.ndarray) -> float:
        y = s.task.y_train
        return float(
            np.mean(
                np.concatenate(
                    [np.linalg.norm(X[y == c] - X[y == c].mean(0), axis=1) for c in (-1, 1)]
                )
            )
        )

    cp, cf = spread(s.task.x_train.reshape(len(s.task.x_train), -1)), spread(s.F.numpy())
    runs = [x for x in r["runs"] if x["l2_pixels"] > 0]
    k = np.array([len(x["train_indices"]) for x in runs])
    dx = np.array([x["l2_pixels"] for x in runs]) / np.sqrt(k)
    dphi = np.array([x["l2_features"] for x in runs]) / np.sqrt(k)
    assert r["pixel_to_centroid_per_image"] == pytest.approx(np.median(dx / cp), rel=1e-9)
    assert r["feature_to_centroid_per_image"] == pytest.approx(np.median(dphi / cf), rel=1e-9)
    assert r["feature_sensitivity"] == pytest.approx(np.median((dphi / cf) / (dx / cp)), rel=1e-9)
    assert 0 < dx.max() <= EPS / 255 * 28 + 1e-12
    assert "feature sensitivity" in (out / "report.md").read_text()


def test_targets_attacked_on_dask_workers_give_the_same_results(dask_executor):
    """Each target's attack is independent: partitions of targets on two Dask worker processes give
    what the in-process loop gives (same flips, same margins after each attack)."""
    from upweight.datasets import load_mnist
    from upweight.paper.attack import run_attack
    from upweight.paper.config import AttackConfig, FeatureConfig
    from upweight.paper.features import build_feature_model

    s = build_feature_model(load_mnist(DATA), FeatureConfig(**SETUP))
    # 9 targets on 2 workers: partitions of 2, 2, 2, 2 and 1 targets
    config = AttackConfig(
        **SETUP,
        targets=9,
        projection="levels",
        epsilon=EPS,
        iterations=30,
        max_k=1,
        group_size=0,
    )
    here = run_attack(s, config, progress=False)
    there = run_attack(s, config, progress=False, executor=dask_executor)
    assert here.flips_by_k["1"] >= 1
    assert there.targets == here.targets and there.solved_with == here.solved_with
    assert [r["train_indices"] for r in there.runs] == [r["train_indices"] for r in here.runs]
    np.testing.assert_allclose(
        [r["margin_after"][0] for r in there.runs],
        [r["margin_after"][0] for r in here.runs],
        rtol=1e-8,
        atol=1e-10,
    )
    assert there.example["target"] == here.example["target"]


def test_a_stopped_run_resumes_from_its_store_with_the_same_results(tmp_path):
    """A store keeps each single-target attack: a run over more targets reads the kept ones back
    and attacks only the rest, giving what one uninterrupted run gives; other settings are refused
    (StoreMismatchError), and fresh=True starts over."""
    from upweight.datasets import load_mnist
    from upweight.errors import StoreMismatchError
    from upweight.paper.attack import run_attack
    from upweight.paper.config import AttackConfig, FeatureConfig
    from upweight.paper.features import build_feature_model

    s = build_feature_model(load_mnist(DATA), FeatureConfig(**SETUP))

    def config(targets: int, iterations: int = 30) -> AttackConfig:
        return AttackConfig(
            **SETUP,
            targets=targets,
            projection="levels",
            epsilon=EPS,
            iterations=iterations,
            max_k=1,
            group_size=0,
        )

    kept = tmp_path / "targets"
    stopped = run_attack(s, config(2), progress=False, store=kept)  # "stopped" after 2 targets
    resumed = run_attack(s, config(3), progress=False, store=kept)
    straight = run_attack(s, config(3), progress=False)
    assert (stopped.resumed, resumed.resumed, straight.resumed) == (0, 2, 0)
    assert straight.flips_by_k["1"] >= 1  # a 1-image success, whose perturbed image is kept too
    assert resumed.targets == straight.targets and resumed.solved_with == straight.solved_with
    assert resumed.runs == straight.runs and resumed.example == straight.example
    assert resumed.flips_by_k == straight.flips_by_k
    with pytest.raises(StoreMismatchError, match="iterations"):
        run_attack(s, config(3, iterations=29), progress=False, store=kept)
    again = run_attack(s, config(1), progress=False, store=kept, fresh=True)
    assert again.resumed == 0 and again.runs == straight.runs[:1]
    assert run_attack(s, config(3), progress=False, store=kept).resumed == 1


def test_cli_rerun_resumes_from_out_targets_and_refuses_other_settings(tmp_path, capsys):
    """``reproduce attack`` run twice into one --out: the second run reads its attack back from
    OUT/targets (same numbers); other settings are refused with the way out (--fresh)."""
    args = [
        "reproduce",
        "attack",
        "--data",
        str(DATA),
        "--out",
        str(tmp_path),
        "--no-progress",
        *[f"--{k.replace('_', '-')}={v}" for k, v in SETUP.items()],
        "--targets=1",
        "--max-k=1",
        "--iterations=30",
        "--projection=levels",
        f"--epsilon={EPS}",
        "--group-size=0",
    ]
    assert main(args) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["resumed"] == 0 and (tmp_path / "targets" / "manifest.json").is_file()
    assert main(args) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["resumed"] == 1 and again["runs"] == first["runs"]
    capsys.readouterr()
    rc = main([*args, "--iterations=29"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fresh" in err and "iterations" in err


def test_the_papers_projection_keeps_each_pixel_in_its_8bit_cell_and_raises_the_test_loss():
    """The default Π (the paper's): every perturbed pixel rounds back to its original 8-bit value,
    the steps push pixels to the edge of their cell, and after exact retraining each target's
    margin y·s fell (its test loss rose). Measured on 2 targets: margins 4.977 → 4.945 and
    1.874 → 1.826, fixed points after 49 and 67 steps; none flips at this budget."""
    from upweight.datasets import load_mnist
    from upweight.paper.attack import CELL_EDGE, TopLayerAttack, full_influence
    from upweight.paper.features import build_feature_model

    s = build_feature_model(load_mnist(DATA), uw.paper.config.FeatureConfig(**SETUP))
    atk, inf_full = TopLayerAttack(s), full_influence(s)
    correct = np.flatnonzero(np.sign(s.test_scores()) == s.task.y_test)
    for t in correct[:2]:
        train = atk.rank_training(inf_full, [int(t)])[:1]
        run, lev = atk.run([int(t)], train, epsilon=0.5, step=0.02, projection="same-8bit")
        orig = atk.levels[train]
        assert np.array_equal(np.rint(lev), orig) and lev.min() >= 0 and lev.max() <= 255
        assert np.abs(lev - orig).max() == pytest.approx(CELL_EDGE) == run.linf_levels
        assert run.margin_after[0] < run.margin_before[0]
        # the margin after the attack is the retrained model's: refit from θ = 0 on the new images
        F = s.F.clone()
        F[train] = torch.as_tensor(uw.paper.features.features_of(s.net, lev / 255.0), dtype=F.dtype)
        lin = torch.nn.Linear(F.shape[1], 1, bias=False).double().eval()
        with torch.no_grad():
            lin.weight.zero_()
        y = torch.as_tensor(s.task.y_train)
        fit = uw.refit(uw.Objective(lin, "logistic", l2=s.l2), uw.Data.from_any((F, y)), gtol=1e-10)
        margin = float(fit.params["weight"][0] @ s.F_test[int(t)]) * float(s.task.y_test[t])
        assert margin == pytest.approx(run.margin_after[0], rel=1e-6)
