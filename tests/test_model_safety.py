"""upweight never changes the user's model, refuses a model whose forward depends on training mode
or on random draws, and evaluates half-precision models in float32 (checked against float64 solves).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import upweight as uw
from upweight.core.grads import per_sample_grads, pert_directions
from upweight.errors import UnsupportedModelError

D64 = torch.float64


def _data(n=40, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D64), torch.randint(0, k, (n,), generator=g)


class BNNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 5)
        self.bn = torch.nn.BatchNorm1d(5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.fc(x))))


def _bn_model() -> BNNet:
    torch.manual_seed(0)
    model = BNNet().double()
    X, _ = _data(seed=1)
    with torch.no_grad():
        model(X)  # training mode: running statistics away from their initial 0 / 1
    return model.eval()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


# ── (2) the model is never written ───────────────────────────────────────────────────────
def test_batchnorm_buffers_of_a_model_switched_to_train_are_never_updated(monkeypatch):
    """Objective built in eval mode, model.train() afterwards: the objective refuses; and with that
    guard bypassed, a training-mode BatchNorm updates the objective's copies of its buffers, never
    the model's (running_mean, running_var, num_batches_tracked bit-identical)."""
    model = _bn_model()
    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    before = _snapshot(model)
    X, y = _data()
    model.train()
    for call in (
        lambda: obj.outputs(obj.params, X),
        lambda: obj.losses(obj.params, X, y),
        obj.check_eval_mode,
    ):
        with pytest.raises(
            UnsupportedModelError,
            match=r"Module 'bn' \(BatchNorm1d\) of the model is in training mode.*model.eval\(\)",
        ):
            call()
    _assert_unchanged(model, before)

    # the guard off: the buffer copies alone protect the model
    monkeypatch.setattr(obj, "_check_mode_fast", lambda: None)
    obj.outputs(obj.params, X)
    obj.losses(obj.params, X, y)
    with pytest.raises(
        UnsupportedModelError,
        match=r"updates a tensor in place.*BatchNorm in training mode.*call model.eval\(\)",
    ) as info:
        per_sample_grads(obj, obj.params, uw.Data.from_any((X[:5], y[:5])))
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_unchanged(model, before)
    # the training-mode BatchNorm did run: it updated the objective's own copy, twice
    assert int(obj._fixed["bn.num_batches_tracked"]) == int(before["bn.num_batches_tracked"]) + 2
    assert not torch.equal(obj._fixed["bn.running_mean"], before["bn.running_mean"])


def test_fit_and_scores_leave_every_tensor_of_the_model_unchanged():
    """Every state_dict tensor (parameters, BatchNorm buffers) is bit-identical after fit,
    up_loss, up_params and self_influence, with θ = all parameters and with θ = the head only."""
    model = _bn_model()
    before = _snapshot(model)
    X, y = _data()
    for params in (None, "out"):
        obj = uw.Objective(model, "cross_entropy", l2=0.5, params=params)
        inf = uw.Influence(obj, solver=uw.Direct(), damping=0.5, progress=False, grad_tol=1e9).fit(
            (X, y)
        )
        scores = inf.up_loss((X[:3], y[:3])).values
        inf.up_params([0, 1])
        inf.self_influence([2, 3])
        assert np.isfinite(scores).all() and np.ptp(scores) > 0
        _assert_unchanged(model, before)
    assert not model.training


def test_theta_hat_is_read_at_construction():
    """Training the model further after building the objective changes neither θ̂ nor the scores."""
    model = _bn_model()
    X, y = _data()
    obj = uw.Objective(model, "cross_entropy", l2=0.5)
    theta = {k: v.clone() for k, v in obj.params.items()}
    inf = uw.Influence(obj, solver=uw.Direct(), progress=False, grad_tol=1e9).fit((X, y))
    ref = inf.up_loss((X[:2], y[:2])).values
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bn.running_mean.add_(1.0)
    assert all(torch.equal(obj.params[k], theta[k]) for k in theta)
    np.testing.assert_array_equal(inf.up_loss((X[:2], y[:2])).values, ref)


# ── (3) training mode, checked on every module ───────────────────────────────────────────
class FlagDropout(torch.nn.Module):
    """A custom module whose forward depends on its training flag (no nn.Dropout in sight)."""

    def forward(self, x):
        return F.dropout(x, 0.5, training=self.training)


class FlagByName(torch.nn.Module):
    def forward(self, x):
        return x * 2.0 if getattr(self, "training") else x  # noqa: B009 — the flag read by name


class Body(torch.nn.Module):
    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


class Net(torch.nn.Module):
    """Custom modules that never read ``self.training``: deterministic in either mode."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.body = Body(act)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("act, cls", [(FlagDropout(), "FlagDropout"), (FlagByName(), "FlagByName")])
def test_custom_module_reading_the_training_flag_is_refused_by_path(act, cls):
    model = Net(act).double()  # training mode, as after construction
    with pytest.raises(
        UnsupportedModelError,
        match=rf"Module 'body.act' \({cls}\) of the model is in training mode.*Call model.eval\(\)",
    ):
        uw.Objective(model, "cross_entropy")
    obj = uw.Objective(model.eval(), "cross_entropy")  # accepted once in eval mode
    X, y = _data()
    inf = uw.Influence(obj, solver=uw.Direct(), damping=0.1, progress=False, grad_tol=1e9).fit(
        (X, y)
    )
    model.train()  # switched back after the objective was built
    with pytest.raises(UnsupportedModelError, match=r"'body.act'.*model.eval\(\)"):
        obj.check_eval_mode()
    with pytest.raises(UnsupportedModelError, match=r"'body.act'.*model.eval\(\)"):
        uw.Influence(obj, solver=uw.Direct(), progress=False).fit((X, y))
    with pytest.raises(UnsupportedModelError, match=r"'body.act'.*model.eval\(\)"):
        inf.up_loss((X[:2], y[:2]))


def test_modules_that_ignore_the_training_flag_may_stay_in_training_mode():
    """torch.nn layers and custom modules that never read .training compute the same function in
    both modes: accepted in training mode, with scores equal to the eval-mode ones."""
    torch.manual_seed(0)
    X, y = _data()
    for make in (
        lambda: torch.nn.Sequential(
            torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
        ),
        lambda: Net(torch.nn.Tanh()),
    ):
        torch.manual_seed(0)
        train_mode = make().double()
        assert train_mode.training
        eval_mode = copy.deepcopy(train_mode).eval()
        got = [
            uw.Influence(
                uw.Objective(m, "cross_entropy", l2=0.1),
                solver=uw.Direct(),
                damping=2.0,
                progress=False,
                grad_tol=1e9,
            )
            .fit((X, y))
            .up_loss((X[:2], y[:2]))
            .values
            for m in (train_mode, eval_mode)
        ]
        np.testing.assert_array_equal(got[0], got[1])
        assert np.ptp(got[0]) > 0


def test_module_without_readable_source_is_refused_in_training_mode():
    """When the code of a module's class cannot be read, upweight cannot tell whether it reads
    .training, so training mode is refused (and eval mode accepted)."""
    ns: dict = {"torch": torch}
    # no source file
    exec("class Opaque(torch.nn.Module):\n    def forward(self, x):\n        return x\n", ns)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), ns["Opaque"]()).double()
    with pytest.raises(UnsupportedModelError, match=r"Module '1' \(Opaque\).*model.eval\(\)"):
        uw.Objective(model)
    uw.Objective(model.eval())


# ── (4) random forwards ──────────────────────────────────────────────────────────────────
class AlwaysDropout(torch.nn.Module):
    """F.dropout's default is training=True: random in eval mode too, and it never reads
    the flag."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5)


# raised inside torch's jvp
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_random_forward_is_refused_and_vmaps_randomness_error_is_translated():
    model = AlwaysDropout().double().eval()
    obj = uw.Objective(model, "cross_entropy")
    X, y = _data()
    state = torch.get_rng_state()
    with pytest.raises(
        UnsupportedModelError,
        match=r"random in this mode \(dropout\?\) — call model.eval\(\): two forward passes",
    ):
        uw.Influence(obj, progress=False).fit((X, y))
    # the check's forwards leave the caller's random state alone
    assert torch.equal(torch.get_rng_state(), state)
    batch = uw.Data.from_any((X[:4], y[:4]))
    with pytest.raises(
        UnsupportedModelError,
        match=r"random in this mode \(dropout\?\) — call model.eval\(\): torch.func.vmap",
    ) as info:
        per_sample_grads(obj, obj.params, batch)
    assert isinstance(info.value.__cause__, RuntimeError) and "randomness" in str(
        info.value.__cause__
    )
    with pytest.raises(UnsupportedModelError, match=r"random in this mode \(dropout\?\)"):
        pert_directions(obj, obj.params, batch, torch.ones(2, obj.p, dtype=D64))


# ── (7) half precision: evaluated in float32 ─────────────────────────────────────────────
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_model_gives_the_float32_and_float64_scores(half):
    """A bfloat16 / float16 softmax regression: θ̂ in float32, CG scores equal to those of its
    float32 copy and to an explicit float64 Direct solve at the same (half-precision) θ̂; the user's
    model keeps its dtype and values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(half).eval()
    before = _snapshot(model)
    X, y = _data(n=60)
    Xf, Xt, yt = X.float(), X[:3].float(), y[:3]

    obj = uw.Objective(model, "cross_entropy", l2=0.1)
    assert obj.dtype == torch.float32 and all(t.dtype == torch.float32 for t in obj.params.values())
    # half values are exact in float32
    assert torch.equal(obj.params["weight"], model.weight.float())

    def scores(m, solver, X_, Xt_):
        inf = uw.Influence(
            uw.Objective(m, "cross_entropy", l2=0.1),
            solver=solver,
            damping=0.01,
            progress=False,
            grad_tol=1e9,
        )
        return inf.fit((X_, y)).up_loss((Xt_, yt)).values

    got = scores(model, uw.CG(rtol=1e-8), Xf, Xt)
    f32 = scores(copy.deepcopy(model).float(), uw.CG(rtol=1e-8), Xf, Xt)
    f64 = scores(copy.deepcopy(model).double(), uw.Direct(), X, X[:3])
    assert got.dtype == np.float32 and np.ptp(f64) > 0
    np.testing.assert_allclose(got, f32, rtol=1e-5, atol=1e-6 * np.abs(f64).max())
    np.testing.assert_allclose(got, f64, rtol=1e-4, atol=1e-5 * np.abs(f64).max())
    _assert_unchanged(model, before)
    assert model.weight.dtype == half and model.bias.dtype == half


def test_half_precision_fixed_layers_and_buffers_are_cast_to_float32():
    """θ = the bfloat16 head of a bfloat16 network with BatchNorm: the fixed layers and buffers
    run in float32, and the losses equal the float32 copy's."""
    model = _bn_model().to(torch.bfloat16)
    X, y = _data()
    obj = uw.Objective(model, "cross_entropy", params="out")
    ref = uw.Objective(copy.deepcopy(model).float(), "cross_entropy", params="out")
    assert obj.dtype == torch.float32
    torch.testing.assert_close(
        obj.losses(obj.params, X.float(), y), ref.losses(ref.params, X.float(), y), rtol=0, atol=0
    )
    assert model.bn.running_mean.dtype == torch.bfloat16
