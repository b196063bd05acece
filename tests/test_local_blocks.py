"""Module-local per-point gradients (``core.local``) for the parameters outside factorable layers —
LayerNorms, position embeddings shared by the batch, biases of tied layers — checked against
autograd's per-point gradients and the explicit float64 Gauss–Newton matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.core.grads import per_sample_grads
from upweight.core.kfac import fit_factors
from upweight.core.layers import find_layers
from upweight.core.structured import structured_scores
from upweight.solvers.kfac import EKFAC, KFAC

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev dependency (pip install -e '.[dev]')"
)

V, T = 40, 8
D64 = torch.float64


def _tokens(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::2, T - 3 :] = 0
    ids[mask == 0] = 0
    return ids, mask


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _gpt_classifier():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        vocab_size=V,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=16,
        num_labels=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2ForSequenceClassification(cfg).double().eval()


def _bert_data(n: int, seed: int = 0) -> uw.Data:
    ids, mask = _tokens(n, seed)
    return uw.Data.from_any(({"input_ids": ids, "attention_mask": mask}, torch.arange(n) % 3))


def explicit_ggn(obj: uw.Objective, data: uw.Data) -> torch.Tensor:
    """(1/n) Σᵢ Jᵢᵀ ∇²_z L(zᵢ) Jᵢ over θ of ``obj`` from torch.autograd.functional (no L2)."""
    names, shapes = list(obj.params), [t.shape for t in obj.params.values()]
    sizes = [t.numel() for t in obj.params.values()]
    flat0 = torch.cat([t.reshape(-1) for t in obj.params.values()])

    def unflat(f):
        return {k: t.reshape(s) for k, t, s in zip(names, f.split(sizes), shapes)}

    # (n, c, p)
    J = torch.autograd.functional.jacobian(lambda f: obj.outputs(unflat(f), data.X), flat0)
    z = obj.outputs(obj.params, data.X).detach()
    G = torch.zeros(len(flat0), len(flat0), dtype=D64)
    for i in range(len(z)):
        p = torch.softmax(z[i], 0)
        G += J[i].T @ (torch.diag(p) - torch.outer(p, p)) @ J[i]
    return G / len(z)


def test_bert_leftover_parameters_are_module_local_and_checked():
    obj = uw.Objective(_bert(), "cross_entropy")
    plan = find_layers(obj, _bert_data(4), embeddings=True, local=True)
    local = {lm.name: lm for lm in plan.local}
    assert plan.other == ()  # every parameter: a Kronecker block or a module-local one
    assert "bert.embeddings.position_embeddings" in local  # input shared by the batch (1, T)
    assert {"bert.embeddings.LayerNorm", "bert.encoder.layer.0.output.LayerNorm"} <= set(local)
    covered = torch.cat(
        [*(b.index.reshape(-1) for b in plan.blocks), *(lm.index for lm in plan.local)]
    )
    assert sorted(covered.tolist()) == list(range(obj.p))  # each coordinate exactly once


class Leaky(torch.nn.Module):
    """A LayerNorm whose weight is also used outside its forward, a Linear called twice, and a
    parameter of the model itself: none has module-local gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.twice = torch.nn.LayerNorm(4)
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.ln(self.fc(x)) * self.ln.weight
        return self.head(self.twice(self.twice(h)) * self.scale)


def test_modules_that_are_not_local_stay_generic_with_their_reason():
    torch.manual_seed(0)
    obj = uw.Objective(Leaky().double().eval(), "cross_entropy")
    data = uw.Data.from_any((torch.randn(6, 4, dtype=D64), torch.arange(6) % 3))
    plan = find_layers(obj, data, local=True)
    assert plan.local == ()
    assert "differ from autograd's" in plan.reasons["ln.weight"]
    assert "not called once" in plan.reasons["twice.weight"]
    assert "the model itself" in plan.reasons["scale"]
    assert set(plan.other) == {"ln.weight", "ln.bias", "twice.weight", "twice.bias", "scale"}


@pytest.mark.parametrize("make", [_bert, _gpt_classifier], ids=["bert", "gpt2"])
def test_structured_scores_with_local_modules_equal_per_sample_gradients(make):
    model = make()
    data = _bert_data(5, seed=1)
    if make is _gpt_classifier:
        data = uw.Data.from_any((data.X, torch.arange(5) % 2))
    obj = uw.Objective(model, "cross_entropy")
    plan = find_layers(obj, data, embeddings=True, local=True)
    assert plan.local and plan.other == ()
    S = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(2), dtype=D64)
    got = structured_scores(obj, plan, data, S)
    G = per_sample_grads(obj, obj.params, data)
    torch.testing.assert_close(got, S @ G.T, rtol=1e-10, atol=1e-12)


def test_local_blocks_are_the_exact_gauss_newton_blocks_and_kfac_inverts_them():
    """G_φφ from the module-local pseudo-gradients equals the explicit GGN restricted to φ, and
    K-FAC's solve on φ's coordinates is (G_φφ + δI)⁻¹v_φ."""
    model = _bert()
    data = _bert_data(6)
    obj = uw.Objective(model, "cross_entropy")
    plan = find_layers(obj, data, embeddings=True, local=True)
    # two captures: sums over batches
    _, fit = fit_factors(obj, data, plan.blocks, batch_size=4, local=plan.local)
    for lm in plan.local:
        sub = uw.Objective(model, "cross_entropy", params=list(lm.params))
        torch.testing.assert_close(
            fit.local_ggn[lm.name], explicit_ggn(sub, data), rtol=1e-9, atol=1e-12
        )
    delta = 0.3
    curv = (
        uw.Influence(
            obj,
            solver=KFAC(),
            curvature="gauss-newton",
            damping=delta,
            progress=False,
            grad_tol=1e9,
        )
        .fit(data)
        .curvature_
    )
    solver = KFAC(residual_sample=0)
    state = solver.prepare(curv)
    assert state.stats["fallback_size"] == 0 and len(state.stats["local_blocks"]) == len(plan.local)
    lm = next(m for m in plan.local if m.name == "bert.embeddings.position_embeddings")
    v = torch.zeros(1, obj.p, dtype=D64)
    v[0, lm.index] = torch.randn(lm.size, generator=torch.Generator().manual_seed(0), dtype=D64)
    x = solver.solve(state, v).value
    exact = torch.linalg.solve(
        fit.local_ggn[lm.name] + delta * torch.eye(lm.size, dtype=D64), v[0, lm.index]
    )
    torch.testing.assert_close(x[0, lm.index], exact, rtol=1e-9, atol=1e-12)
    outside = torch.ones(obj.p, dtype=torch.bool)
    outside[lm.index] = False
    # block-diagonal: nothing leaks into other blocks
    assert float(x[0, outside].abs().max()) == 0.0


def test_whole_bert_ekfac_has_no_cg_fallback_and_scores_structurally():
    data = _bert_data(12)
    test = data.subset(range(3))
    obj = uw.Objective(_bert(), "cross_entropy", l2=0.01)
    inf = uw.Influence(
        obj, solver=EKFAC(), curvature="gauss-newton", progress=False, grad_tol=1e9
    ).fit(data)
    got = inf.up_loss(test)
    assert inf.scoring_ == "structured" and "module-local" in inf.scoring_reason_
    assert got.provenance["iterations"] == 0  # no CG on a fallback block
    assert np.isfinite(got.values).all()
    ref = (
        uw.Influence(
            obj, solver=uw.CG(rtol=1e-10), curvature="gauss-newton", progress=False, grad_tol=1e9
        )
        .fit(data)
        .up_loss(test)
        .values
    )
    for j in range(len(ref)):  # an approximation of the same matrix: it ranks like the exact scores
        assert np.corrcoef(got.values[j], ref[j])[0, 1] > 0.5
    off = uw.Influence(
        obj, solver=EKFAC(max_local=0), curvature="gauss-newton", progress=False, grad_tol=1e9
    ).fit(data)
    # max_local=0: the CG fallback block again
    assert off.up_loss(test).provenance["iterations"] > 0


class _Norms(torch.nn.Module):
    """LayerNorms over one and over two trailing dims, without a bias, and on an input shared by
    the batch (a learned table), around per-token and per-point linear maps."""

    class Table(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(1, 3, 4))

        def forward(self) -> torch.Tensor:
            return self.table

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)
        self.pos = self.Table()
        self.ln_pos = torch.nn.LayerNorm(4)
        self.ln_token = torch.nn.LayerNorm(4)
        self.ln_seq = torch.nn.LayerNorm((3, 4), bias=False)
        self.mid = torch.nn.Linear(12, 5)
        self.ln_vec = torch.nn.LayerNorm(5)
        self.head = torch.nn.Linear(5, 3)
        with torch.no_grad():  # affine parameters away from their 1 / 0 initialisation
            for ln in (self.ln_pos, self.ln_token, self.ln_seq, self.ln_vec):
                ln.weight.normal_()
                if ln.bias is not None:
                    ln.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.ln_token(self.proj(x) + self.ln_pos(self.pos())))
        h = self.ln_seq(h).flatten(1)
        return self.head(torch.tanh(self.ln_vec(self.mid(h))))


def test_layer_norm_gradients_in_closed_form_equal_autograd_per_point():
    """LayerNorm's own per-point gradients (∂L/∂w = Σ c ⊙ x̂, ∂L/∂b = Σ c over the point's tokens):
    over one and two normalised dims, without a bias, on a (b, d) input and on an input shared by
    the batch — against autograd's per-sample gradients, in float64."""
    from upweight.core.structured import structured_per_sample_grads

    model = _Norms().double().eval()
    X = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(1), dtype=D64)
    data = uw.Data.from_any((X, torch.arange(6) % 3))
    obj = uw.Objective(model, "cross_entropy")
    plan = find_layers(obj, data, local=True)
    assert {"ln_pos", "ln_token", "ln_seq", "ln_vec"} <= {lm.name for lm in plan.local}
    got = structured_per_sample_grads(obj, plan, data)
    torch.testing.assert_close(got, per_sample_grads(obj, obj.params, data), rtol=1e-10, atol=1e-12)
