"""Input forms, chunking, measurements, SmoothHinge and result objects — against explicit math."""

from __future__ import annotations

import numpy as np
import torch

import upweight as uw
from reference import assert_not_constant, logistic_closed_form
from upweight.core.curvature import Curvature


def _influence(model, l2, train, **kw):
    return uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), progress=False, **kw
    ).fit(train)


def test_tensors_numpy_dataset_and_dataloader_give_the_same_scores(small_logreg):
    model, l2, (X, y), (Xt, yt) = small_logreg
    ref = _influence(model, l2, (X, y)).up_loss((Xt[:3], yt[:3])).values
    assert_not_constant(ref)
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=17, shuffle=True)
    for train in ((X.numpy(), y.numpy()), ds, loader):
        got = _influence(model, l2, train).up_loss((Xt[:3], yt[:3])).values
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_chunk_sizes_do_not_change_results(small_logreg):
    model, l2, train, (Xt, yt) = small_logreg
    a = _influence(model, l2, train, batch_size=7).up_loss((Xt[:3], yt[:3])).values
    b = _influence(model, l2, train, batch_size=4096).up_loss((Xt[:3], yt[:3])).values
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_train_subset_selects_columns(small_logreg):
    model, l2, train, (Xt, yt) = small_logreg
    inf = _influence(model, l2, train)
    full = inf.up_loss((Xt[:2], yt[:2]))
    part = inf.up_loss((Xt[:2], yt[:2]), train=[5, 1, 300])
    np.testing.assert_array_equal(part.train_ids, [5, 1, 300])
    np.testing.assert_allclose(part.values, full.values[:, [5, 1, 300]], rtol=1e-12)


def test_measure_other_than_the_loss(small_logreg):
    """Influence on the logit margin y·θᵀx: I = −∇θ(margin)ᵀ H⁻¹ ∇θL(z), margin gradient y·x."""
    model, l2, (X, y), (Xt, yt) = small_logreg

    def margin(out, target):
        return torch.where(target > 0, 1.0, -1.0).to(out.dtype) * out[:, 0]

    obj = uw.Objective(model, "logistic", l2=l2, measure=margin)
    got = (
        uw.Influence(obj, solver=uw.Direct(), progress=False)
        .fit((X, y))
        .up_loss((Xt[:3], yt[:3]))
        .values
    )
    theta = model.weight.detach().numpy().ravel()
    _, up_params, _ = logistic_closed_form(
        theta, X.numpy(), y.numpy(), Xt[:1].numpy(), yt[:1].numpy(), l2
    )
    ref = (yt[:3, None].double().numpy() * Xt[:3].numpy()) @ up_params.T  # ∇margin · I_up,params
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def test_smooth_hinge_values_limit_and_influence(small_logreg):
    s = torch.linspace(-2, 3, 11, dtype=torch.float64)
    ones = torch.ones(11, dtype=torch.long)
    for t in (1.0, 0.1, 0.001):
        np.testing.assert_allclose(
            uw.SmoothHinge(t)(s, ones).numpy(),
            t * np.logaddexp(0.0, (1 - s.numpy()) / t),
            rtol=1e-12,
        )
    np.testing.assert_allclose(
        uw.SmoothHinge(1e-4)(s, ones).numpy(), np.maximum(0, 1 - s.numpy()), atol=1e-4
    )
    np.testing.assert_allclose(uw.hinge(s, -ones).numpy(), np.maximum(0, 1 + s.numpy()))

    # influence under SmoothHinge(t) for a linear model, against its closed-form Hessian
    model, _, (X, y), (Xt, yt) = small_logreg
    t, l2 = 0.1, 0.05
    sh = uw.SmoothHinge(t)
    obj = uw.Objective(model, sh, l2=l2)
    got = (
        uw.Influence(obj, solver=uw.Direct(), progress=False, grad_tol=1e9)
        .fit((X, y))
        .up_loss((Xt[:2], yt[:2]))
        .values
    )
    w = model.weight.detach().numpy().ravel()
    Xn, yn = X.numpy(), np.where(y.numpy() > 0, 1.0, -1.0)
    m = yn * (Xn @ w)
    sig = 1 / (1 + np.exp(-(1 - m) / t))  # dSmoothHinge/d(1 − m)
    H = (Xn * (sig * (1 - sig) / t)[:, None]).T @ Xn / len(Xn) + l2 * np.eye(Xn.shape[1])
    G = -(sig * yn)[:, None] * Xn
    Xtn, ytn = Xt[:2].numpy(), np.where(yt[:2].numpy() > 0, 1.0, -1.0)
    mt = ytn * (Xtn @ w)
    Gt = -(1 / (1 + np.exp(-(1 - mt) / t)) * ytn)[:, None] * Xtn
    ref = -Gt @ np.linalg.solve(H, G.T)
    assert_not_constant(ref)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-12)


def test_results_save_load_and_removal_roundtrip(small_logreg, tmp_path):
    model, l2, train, (Xt, yt) = small_logreg
    scores = _influence(model, l2, train).up_loss((Xt[:2], yt[:2]))
    path = tmp_path / "scores.npz"
    scores.save(path)
    back = uw.InfluenceScores.load(path)
    np.testing.assert_array_equal(back.values, scores.values)
    assert back.n_train == scores.n_train and back.provenance["solver"]["name"] == "direct"
    np.testing.assert_allclose(
        scores.as_removal_effect().as_up_loss().values, scores.values, rtol=1e-14
    )
    assert "harmful for test id 1" in str(scores.top_k(3, test=1))


def test_self_influence_ranks_by_magnitude(small_logreg):
    model, l2, train, _ = small_logreg
    si = _influence(model, l2, train).self_influence()
    top = si.top_k(10)
    assert np.all(np.diff(np.abs(top.values)) <= 0)
    assert np.abs(top.values[-1]) >= np.sort(np.abs(si.values))[-10]


def test_cross_entropy_curvature_with_measure_and_float32_matches_float64(mnist_1v7):
    """A float32 model gives float32-accurate influence; Direct works in float64 inside."""
    from conftest import pooled

    d = mnist_1v7
    X = torch.tensor(pooled(d.x_train[:300], 4))
    y = torch.tensor((d.y_train[:300] > 0).astype(np.int64))
    m64 = torch.nn.Linear(49, 2).double().eval()
    fit = uw.refit(uw.Objective(m64, "cross_entropy", l2=0.01), uw.Data.from_any((X.double(), y)))
    with torch.no_grad():
        m64.weight.copy_(fit.params["weight"])
        m64.bias.copy_(fit.params["bias"])
    m32 = torch.nn.Linear(49, 2).eval()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    a = uw.Influence(
        uw.Objective(m64, "cross_entropy", l2=0.01), solver=uw.Direct(), progress=False
    ).fit((X.double(), y))
    b = uw.Influence(
        uw.Objective(m32, "cross_entropy", l2=0.01), solver=uw.CG(rtol=1e-5), progress=False
    ).fit((X, y))
    va, vb = a.up_loss((X[:3].double(), y[:3])).values, b.up_loss((X[:3], y[:3])).values
    assert vb.dtype == np.float32
    assert np.linalg.norm(va - vb) / np.linalg.norm(va) < 1e-4
    assert isinstance(b.curvature_, Curvature) and b.curvature_.dtype == torch.float32
