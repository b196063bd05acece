"""Fig. 2 of Koh & Liang (2017) on real MNIST: influence vs actual leave-one-out retraining.

Fast settings (the full-size run is documented in docs/reproduction/fig2.md):

- logistic regression on real MNIST pooled 4×4 to 7×7 pixels (p = 490, so the test can afford
  real refits), n = 2,000, the 20 points of largest |I_up,loss|, asserted CG Pearson ≥ 0.95 and
  slope in [0.8, 1.25], LiSSA (r = 1, t = 400) Pearson ≥ 0.9. Measured on the same pooled data
  at n = 5,000, k = 30 (LiSSA r = 2, t = 1,000): CG Pearson 1.000, slope 1.005; LiSSA 1.000.
  On the full 784 pixels at n = 1,000 the slope was 1.44 (removing one of 1,000 points is not a
  small perturbation), which is why the fast test uses more, pooled points.
- the Newton refits equal ``upweight.refit``'s L-BFGS refits, and the class-pair Hessian equals
  the library's HVP-built dense Hessian (independent computations).
- the all-convolutional tanh CNN on the first 150 images of the 10 % subset, not converged,
  through the CLI (asserted Pearson ≥ 0.5 at seed 0; a 200-image, 8-point run measured 0.83).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import CUDA, requires_data, shared_data
from upweight.cli.main import build_parser, main
from upweight.paper import fig2
from upweight.paper.config import Fig2Config
from upweight.paper.fig2 import (
    AllConvTanh,
    MinibatchAdamRetrainer,
    NewtonRefitter,
    fit_logreg,
    multinomial_hessian,
    release_lr_factor,
    run_logreg_panels,
)

DATA = shared_data("mnist")
pytestmark = requires_data(DATA / "mnist.npz", "the MNIST data")


def _pooled(x: np.ndarray, k: int = 4) -> np.ndarray:
    return x.reshape(len(x), 28 // k, k, 28 // k, k).mean(axis=(2, 4)).reshape(len(x), -1)


@pytest.fixture(scope="module")
def pooled_mnist():
    from upweight.datasets import load_mnist

    d = load_mnist(DATA)
    return dataclasses.replace(d, x_train=_pooled(d.x_train), x_test=_pooled(d.x_test))


def test_logreg_influence_matches_leave_one_out(pooled_mnist):
    panels, info = run_logreg_panels(
        pooled_mnist,
        train_size=2000,
        loo_k=20,
        lissa_depth=400,
        lissa_repeats=1,
        refit_method="newton",
        progress=False,
    )
    assert info["test_misclassified"] and info["grad_norm"] < 1e-7
    # Newton alone gets there in a few gradient evaluations (an L-BFGS fallback would add 40–60)
    assert info["refit_grad_norm_max"] < 1e-8 and info["refit_evaluations_mean"] <= 8, info
    cg, lissa = panels["cg"], panels["lissa"]
    assert cg.k == 20 and cg.train_ids == lissa.train_ids and cg.actual == lissa.actual
    assert cg.pearson >= 0.95 and 0.8 <= cg.slope <= 1.25, (cg.pearson, cg.slope)
    assert lissa.pearson >= 0.9, lissa.pearson
    # removing a point is a real change of the test loss, not rounding noise
    assert max(abs(a) for a in cg.actual) > 1e-4


def test_newton_refit_and_hessian_agree_with_the_library(pooled_mnist):
    X = torch.tensor(pooled_mnist.x_train[:400], dtype=torch.float64)
    y = torch.tensor(pooled_mnist.y_train[:400])
    model, _ = fit_logreg(X, y, 0.01)
    obj = uw.Objective(model, "cross_entropy", l2=0.01)
    data = uw.Data.from_any((X, y))
    H = multinomial_hessian(X, model.weight.detach(), 0.01, dtype=torch.float64)
    H_lib = uw.Curvature(obj, data).dense()
    assert torch.allclose(H, H_lib, atol=1e-10, rtol=1e-8)
    refitter = NewtonRefitter(obj, len(y), torch.linalg.cholesky(H))
    for i in (3, 77):
        keep = np.setdiff1d(np.arange(len(y)), [i])
        res = refitter(obj, data.subset(keep), obj.params)
        ours = res.params["weight"]
        assert res.grad_norm < 1e-8 and res.iterations >= 2
        w = torch.ones(len(y), dtype=torch.float64)
        w[i] = 0.0
        lbfgs = uw.refit(obj, data, weights=w, gtol=1e-10).params["weight"]
        assert float((ours - obj.params["weight"]).norm()) > 1e-4  # it moved
        assert torch.allclose(ours, lbfgs, atol=1e-8), float((ours - lbfgs).abs().max())


def test_all_conv_network_has_the_papers_2616_parameters():
    net = AllConvTanh()
    assert sum(p.numel() for p in net.parameters()) == 2616
    assert net(torch.zeros(3, 784)).shape == (3, 10)


def test_cli_cnn_panel_writes_files_and_resumes_its_retrainings(tmp_path, capsys):
    out = tmp_path / "fig2"
    args = [
        "reproduce",
        "fig2",
        "--data",
        str(DATA),
        "--out",
        str(out),
        "--no-progress",
        "--panels",
        "cnn",
        "--cnn-train-size",
        "150",
        "--cnn-loo-k",
        "8",
        "--cnn-train-steps",
        "100",
        "--cnn-retrain-steps",
        "20",
        "--cnn-retrain",
        "momentum",
    ]
    rc = main(args)
    assert rc == 0
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "results.json").read_text())
    for key in ("panels", "cnn", "settings", "paper", "seconds", "experiment"):
        assert key in r, key
    config = Fig2Config(
        panels=("cnn",),
        cnn_train_size=150,
        cnn_loo_k=8,
        cnn_train_steps=100,
        cnn_retrain_steps=20,
        cnn_retrain="momentum",
    )
    assert r["settings"] == {**dataclasses.asdict(config), "panels": ["cnn"]}
    cnn = r["panels"]["cnn"]
    assert cnn["k"] == 8 and len(cnn["predicted"]) == 8
    assert r["cnn"]["p"] == 2616 and r["cnn"]["grad_norm"] > 1e-3  # θ̃ is not a minimum
    assert r["cnn"]["damping_used"] >= 0.01
    assert cnn["pearson"] >= 0.5, cnn["pearson"]
    report = (out / "report.md").read_text()
    assert "| quantity | ours | paper |" in report and "0.86" in report
    assert cnn["resumed"] == 0 and (out / "retrainings" / "cnn" / "manifest.json").is_file()

    # the same command again: every retraining comes from OUT/retrainings, with the same numbers
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())["panels"]["cnn"]
    assert (
        again["resumed"] == 8
        and again["actual"] == cnn["actual"]
        and again["train_ids"] == cnn["train_ids"]
    )
    # another retraining (the release code's minibatch Adam) is another computation: refused, with
    # the way out
    rc = main([*args, "--cnn-retrain", "adam"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fresh" in err and "MinibatchAdamRetrainer" in err


def test_cli_options_are_the_config_fields_with_its_defaults():
    """``reproduce fig2``'s options give a Fig2Config: the defaults are the paper's settings, each
    option sets its field (the config reaches run_fig2 and results.json's settings as it is)."""
    from upweight.paper.cli.fig2 import _config

    parse = build_parser().parse_args
    assert _config(parse(["reproduce", "fig2", "--data", "x"])) == Fig2Config()
    given = {
        "panels": ("lissa", "cg"),
        "loo_k": 7,
        "train_size": 99,
        "test_index": 3,
        "lissa_depth": 11,
        "lissa_repeats": 2,
        "lissa_batch_size": 13,
        "lissa_scale": 2.5,
        "refit_method": "lbfgs",
        "cnn_loo_k": 5,
        "cnn_train_size": 40,
        "cnn_train_steps": 17,
        "cnn_train_lr": 0.02,
        "cnn_train_schedule": "release",
        "cnn_retrain_steps": 19,
        "cnn_retrain_lr": 0.5,
        "cnn_retrain": "momentum",
        "cnn_damping": 0.25,
        "cnn_test_index": 8,
        "seed": 4,
    }
    argv = ["reproduce", "fig2", "--data", "x", "--panels", "lissa,cg"]
    for name, value in given.items():
        if name != "panels":
            argv += [
                "--refit" if name == "refit_method" else "--" + name.replace("_", "-"),
                str(value),
            ]
    assert _config(parse(argv)) == Fig2Config(**given)
    assert {f.name for f in dataclasses.fields(Fig2Config)} == set(given)  # every field an option
    with pytest.raises(uw.errors.InputError, match="comma-separated subset"):
        Fig2Config(panels=("svm",))


def test_release_schedule_is_the_release_codes_decay():
    """5,500 images in batches of 500 = 11 steps per epoch: the rate falls tenfold at epoch 10,000
    (step 110,000) and again at epoch 20,000 (step 220,000) of the 500,000 steps."""
    f = [release_lr_factor(s, 5_500, 500) for s in (0, 109_999, 110_000, 219_999, 220_000, 499_999)]
    assert f == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert release_lr_factor(25, 20, 10) == 1.0  # 2 steps per epoch: epoch 12 < 10,000


def test_train_cnn_follows_the_schedule(monkeypatch):
    """With the decay moved to epochs 2 and 4 (2 steps per epoch): after 5 steps Adam's rate is a
    tenth of the initial one, after 10 steps a hundredth; "constant" keeps it."""
    monkeypatch.setattr(fig2, "RELEASE_DECAY_EPOCHS", (2, 4))
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(20, 784, generator=g), torch.randint(10, (20,), generator=g)
    kw = {"l2": 1e-3, "lr": 1e-2, "batch_size": 10, "seed": 0, "progress": False}
    for steps, schedule, factor in [
        (3, "release", 1.0),
        (5, "release", 0.1),
        (10, "release", 0.01),
        (10, "constant", 1.0),
    ]:
        _, state = fig2.train_cnn(X, y, steps=steps, schedule=schedule, **kw)
        assert state["param_groups"][0]["lr"] == pytest.approx(1e-2 * factor), (steps, schedule)
    with pytest.raises(uw.errors.InputError, match="cnn-train-schedule"):
        fig2.train_cnn(X, y, steps=1, schedule="cosine", **kw)
    with pytest.raises(uw.errors.InputError, match="cnn_train_schedule must be"):
        Fig2Config(cnn_train_schedule="cosine")


@pytest.mark.parametrize("device", [CUDA])
def test_cnn_panel_on_a_device_agrees_with_the_cpu(device, monkeypatch):
    """The CNN panel with --device: θ̃, influence and retrainings on the device (same batches, same
    initialisation) give the CPU's test loss and predictions to float32 accuracy."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from upweight.datasets import load_mnist

    data = load_mnist(DATA, subset="small10pct")
    kw = {
        "loo_k": 5,
        "train_size": 150,
        "train_steps": 60,
        "retrain": "momentum",
        "retrain_steps": 10,
        "progress": False,
    }
    cpu_panel, cpu = fig2.run_cnn_panel(data, **kw)
    dev_panel, dev = fig2.run_cnn_panel(data, device=device, **kw)
    assert dev["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert dev["test_index"] == cpu["test_index"]
    assert dev["test_loss"] == pytest.approx(cpu["test_loss"], rel=1e-3)
    assert dev_panel.train_ids == cpu_panel.train_ids
    np.testing.assert_allclose(dev_panel.predicted, cpu_panel.predicted, rtol=1e-2, atol=1e-6)


def test_device_option_is_checked_before_any_work(tmp_path, capsys):
    argv = ["reproduce", "fig2", "--data", str(DATA), "--out", str(tmp_path / "o"), "--panels"]
    assert main([*argv, "cnn", "--device", "gpu"]) == 2
    assert "--device 'gpu': not a torch device name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "cnn", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "0 CUDA device(s)" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()  # refused before the output folder was made


def test_bad_panel_name_is_an_input_error(tmp_path, capsys):
    rc = main(
        ["reproduce", "fig2", "--data", str(DATA), "--out", str(tmp_path), "--panels", "cg,svm"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--panels must be a comma-separated subset" in err and "svm" in err


def _adam_warm_start(pooled_mnist, n, l2):
    """A linear softmax model on n pooled images after 200 full-batch Adam steps: X, y, the model,
    the optimiser's state, its objective, the data and θ."""
    X = torch.tensor(pooled_mnist.x_train[:n], dtype=torch.float32)
    y = torch.tensor(pooled_mnist.y_train[:n])
    torch.manual_seed(0)
    model = torch.nn.Linear(X.shape[1], 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(X), y) + 0.5 * l2 * (model.weight**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    obj = uw.Objective(model, "cross_entropy", l2=l2, l2_exclude=["bias"])
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    return X, y, model, opt.state_dict(), obj, uw.Data.from_any((X, y)), init


def test_minibatch_adam_retraining_moves_theta_as_the_exact_leave_one_out(pooled_mnist):
    """The release code's retraining (Adam resumed from its state, fixed steps) on a convex model,
    full batches: removing z changes θ as the exact float64 leave-one-out minimiser does —
    θ₋z − θ_kept against argmin R₋z − argmin R: cosine > 0.99, norms within 5%."""
    n, l2, z = 200, 0.01, 7
    X, y, model, state, obj, data, init = _adam_warm_start(pooled_mnist, n, l2)
    retrain = MinibatchAdamRetrainer(
        model, state, np.arange(n), l2, steps=1500, lr=1e-3, batch_size=n
    )
    kept = retrain(obj, data, init)
    removed = retrain(obj, data.subset(np.setdiff1d(np.arange(n), [z])), init)
    assert all(torch.equal(p, init[k]) for k, p in model.named_parameters())  # θ̃ put back

    def flat(p):
        return torch.cat([p["weight"].reshape(-1), p["bias"]]).double()

    obj64 = uw.Objective(
        torch.nn.Linear(X.shape[1], 10).double(), "cross_entropy", l2=l2, l2_exclude=["bias"]
    )
    d64 = uw.Data.from_any((X.double(), y))
    full = uw.refit(obj64, d64, gtol=1e-12).params
    w = torch.ones(n, dtype=torch.float64)
    w[z] = 0.0
    loo = uw.refit(obj64, d64, weights=w, init=full, gtol=1e-12).params
    moved, exact = flat(removed) - flat(kept), flat(loo) - flat(full)
    assert float(exact.norm()) > 1e-3  # a real change
    assert float(moved @ exact / (moved.norm() * exact.norm())) > 0.99
    assert abs(float(moved.norm() / exact.norm()) - 1) < 0.05


def test_minibatch_adam_retraining_shares_its_batches_between_runs(pooled_mnist):
    """Minibatches of 5 from 50 points for 4 steps: a run without a point that no batch drew is
    the kept run bit for bit; without a point that was drawn, it differs."""
    n, l2, b, steps = 50, 0.01, 5, 4
    _, _, model, state, obj, data, init = _adam_warm_start(pooled_mnist, n, l2)
    retrain = MinibatchAdamRetrainer(
        model, state, np.arange(n), l2, steps=steps, lr=1e-3, batch_size=b, seed=3
    )
    gen = torch.Generator().manual_seed(3)
    drawn = set(torch.cat([torch.randint(n, (b,), generator=gen) for _ in range(steps)]).tolist())
    never = min(set(range(n)) - drawn)
    kept = retrain(obj, data, init)
    same = retrain(obj, data.subset(np.setdiff1d(np.arange(n), [never])), init)
    other = retrain(obj, data.subset(np.setdiff1d(np.arange(n), [min(drawn)])), init)
    assert all(torch.equal(same[k], kept[k]) for k in kept)
    assert not torch.equal(other["weight"], kept["weight"])
    assert not torch.equal(kept["weight"], init["weight"])  # it trained
