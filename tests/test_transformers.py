"""Hugging Face models as they are: dict batches, ``ModelOutput`` returns, token losses with
padding, attention kernels without a second derivative. Tiny models built from configs (no weights
are downloaded), in float64, checked against explicit Hessians and HF's own losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.core.grads import per_sample_grads
from upweight.core.losses import IGNORE_INDEX, TokenCrossEntropy
from upweight.errors import InputError, ShapeError, UnsupportedModelError
from upweight.influence import engine

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev dependency (pip install -e '.[dev]')"
)

V, T = 40, 8


def _tokens(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::2, T - 3 :] = 0  # every other sequence padded
    ids[mask == 0] = 0
    return ids, mask


def _bert(attn="eager"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _gpt():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _flat_hessian(obj: uw.Objective, data: uw.Data) -> torch.Tensor:
    names, shapes = list(obj.params), [t.shape for t in obj.params.values()]
    sizes = [t.numel() for t in obj.params.values()]
    flat0 = torch.cat([t.reshape(-1) for t in obj.params.values()])

    def risk(flat):
        p = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return obj.losses(p, data.X, data.y).mean() + obj.regularizer(p)

    return torch.autograd.functional.hessian(risk, flat0)


def _point_grads_by_autograd(obj: uw.Objective, data: uw.Data, measure=False) -> torch.Tensor:
    rows = []
    for i in range(len(data)):
        one = data.subset([i])
        leaves = {k: t.clone().requires_grad_(True) for k, t in obj.params.items()}
        fn = obj.measurements if measure else obj.losses
        g = torch.autograd.grad(fn(leaves, one.X, one.y).sum(), list(leaves.values()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


# ── batches ─────────────────────────────────────────────────────────────────────────────────
def test_dict_batches_in_every_form_give_the_same_points():
    ids, mask = _tokens(5)
    y = torch.tensor([0, 1, 2, 1, 0])
    forms = [
        ({"input_ids": ids, "attention_mask": mask}, y),
        {"input_ids": ids, "attention_mask": mask, "labels": y},
        [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(5)],
        torch.utils.data.DataLoader(
            [({"input_ids": ids[i], "attention_mask": mask[i]}, y[i]) for i in range(5)],
            batch_size=2,
            shuffle=True,
        ),
    ]
    for form in forms:
        d = uw.Data.from_any(form)
        assert (
            d.is_dict
            and len(d) == 5
            and d.input_shapes == {"input_ids": (T,), "attention_mask": (T,)}
        )
        assert (
            torch.equal(d.X["input_ids"], ids)
            and torch.equal(d.X["attention_mask"], mask)
            and torch.equal(d.y, y)
        )
    sub = uw.Data.from_any(forms[0]).subset([4, 1])
    assert torch.equal(sub.X["input_ids"], ids[[4, 1]]) and sub.ids.tolist() == [4, 1]
    with pytest.raises(InputError, match="without the targets: expected them under 'labels'"):
        uw.Data.from_any({"input_ids": ids})
    with pytest.raises(ShapeError, match="different numbers of rows"):
        uw.Data.from_any(({"input_ids": ids, "attention_mask": mask[:3]}, y))


# ── losses ──────────────────────────────────────────────────────────────────────────────────
def test_token_cross_entropy_is_the_sum_over_scored_tokens_and_padding_counts_nothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [0, 6, 5, 4, 3]])
    loss = TokenCrossEntropy()(logits, labels)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack(
        [-(logp[0, [0, 1, 2], [1, 2, 3]]).sum(), -(logp[1, range(5), labels[1]]).sum()]
    )
    torch.testing.assert_close(loss, expected)
    (gl,) = torch.autograd.grad(loss.sum(), logits)
    assert float(gl[0, 3:].abs().max()) == 0.0  # padded positions get no gradient
    mean = TokenCrossEntropy(reduction="mean")(logits, labels)
    torch.testing.assert_close(mean, expected / torch.tensor([3.0, 5.0], dtype=torch.float64))


def test_causal_lm_loss_equals_hugging_faces_own():
    lm = _gpt()
    ids, mask = _tokens(4)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    obj = uw.Objective(lm, "causal_lm")
    ours = obj.losses(obj.params, {"input_ids": ids, "attention_mask": mask}, labels)
    for i in range(4):  # HF averages over the predicted tokens of the batch: one sequence at a time
        out = lm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i : i + 1])
        n_pred = int((labels[i, 1:] != IGNORE_INDEX).sum())
        # HF: float32 loss
        torch.testing.assert_close(
            ours[i], (out.loss * n_pred).to(ours.dtype), rtol=1e-6, atol=1e-6
        )


def test_token_labels_are_validated():
    lm = _gpt()
    ids, mask = _tokens(3)
    obj = uw.Objective(lm, "causal_lm")
    bad = ids.clone()
    bad[2, 1] = V + 5
    with pytest.raises(InputError, match=rf"y\[2\].*outside the vocabulary \[0, {V}\)"):
        uw.Influence(obj, progress=False).fit(({"input_ids": ids, "attention_mask": mask}, bad))
    empty = ids.clone()
    empty[1, 1:] = IGNORE_INDEX
    with pytest.raises(InputError, match="sequence 1 has no scored token"):
        uw.Influence(obj, progress=False).fit(({"input_ids": ids, "attention_mask": mask}, empty))


# ── gradients and influence ─────────────────────────────────────────────────────────────────
def test_bert_per_sample_gradients_fall_back_from_vmap_and_equal_autograd():
    """BERT builds its attention mask with data-dependent branches that vmap refuses: one backward
    pass per point instead, equal to autograd on each point alone."""
    model = _bert()
    ids, mask = _tokens(4)
    data = uw.Data.from_any(
        ({"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2, 1, 2]))
    )
    obj = uw.Objective(model, "cross_entropy", params=["classifier", "bert.pooler"])
    G = per_sample_grads(obj, obj.params, data)
    torch.testing.assert_close(G, _point_grads_by_autograd(obj, data))
    assert obj._vmap_refused is not None  # the fallback was taken (and is remembered)


@pytest.mark.parametrize("measure", [None, "margin"])
def test_whole_bert_test_gradients_from_captures_equal_autograd(measure, monkeypatch):
    """With structured scoring, test gradients come from one backward pass per chunk (embeddings
    by token, LayerNorms and position embeddings inside their modules) where vmap refuses BERT:
    equal to autograd on each point alone, for the loss and for a measurement that is not it."""
    model = _bert()
    ids, mask = _tokens(5)
    data = uw.Data.from_any(
        ({"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2, 1, 2, 0]))
    )
    fn = (lambda out, y: out[:, 2] - out.gather(1, y[:, None])[:, 0]) if measure else None
    obj = uw.Objective(model, "cross_entropy", measure=fn)
    inf = uw.Influence(obj, damping=1.0, progress=False, grad_tol=1e9, structured=True)
    inf.fit(data)
    assert inf.scoring_ == "structured" and not inf._scoring_plan.other
    ref = _point_grads_by_autograd(obj, data, measure=True)

    def per_point(*_a, **_k):
        raise AssertionError("the per-sample (vmap or per-point) path was taken")

    monkeypatch.setattr(engine, "iter_per_sample_grads", per_point)
    torch.testing.assert_close(inf.test_grads(data), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structured", [True, False])
def test_bert_classifier_influence_equals_the_explicit_hessian(structured):
    model = _bert()
    ids, mask = _tokens(12)
    y = torch.arange(12) % 3
    train = ({"input_ids": ids, "attention_mask": mask}, y)
    test = ({"input_ids": ids[:2], "attention_mask": mask[:2]}, y[:2])
    obj = uw.Objective(
        model,
        "cross_entropy",
        l2=0.5,
        params=["classifier", "bert.pooler", "bert.encoder.layer.0.output"],
    )
    inf = uw.Influence(
        obj,
        solver=uw.CG(rtol=1e-12),
        damping=2.0,
        progress=False,
        grad_tol=1e9,
        structured=structured,
    ).fit(train)
    assert inf.scoring_ == ("structured" if structured else "generic")
    scores = inf.up_loss(test).values
    data, tdata = uw.Data.from_any(train), uw.Data.from_any(test)
    H = _flat_hessian(obj, data) + 2.0 * torch.eye(obj.p, dtype=torch.float64)
    G, Gt = _point_grads_by_autograd(obj, data), _point_grads_by_autograd(obj, tdata, measure=True)
    exact = -(Gt @ torch.linalg.solve(H, G.T)).numpy()
    np.testing.assert_allclose(scores, exact, rtol=1e-7, atol=1e-10)


def test_bert_structured_plan_scores_broadcast_position_embeddings_inside_their_module():
    """Position ids are built inside the model and shared by the batch: the embedding is no
    factorable layer (its rows are not the points'), but its per-point gradients come from its own
    module."""
    model = _bert()
    ids, mask = _tokens(4)
    obj = uw.Objective(model, "cross_entropy")
    from upweight.core.layers import find_layers
    from upweight.core.structured import scoring_plan

    data = uw.Data.from_any(
        ({"input_ids": ids, "attention_mask": mask}, torch.zeros(4, dtype=torch.long))
    )
    plan, why = scoring_plan(obj, data)
    assert why is None and plan.other == ()
    assert "bert.embeddings.position_embeddings" in [lm.name for lm in plan.local]
    assert "bert.embeddings.word_embeddings" in [b.name for b in plan.blocks]
    layers_only = find_layers(obj, data, embeddings=True)
    assert (
        "shared across the batch"
        in layers_only.reasons["bert.embeddings.position_embeddings.weight"]
    )


def test_causal_lm_influence_with_direct_equals_the_explicit_hessian():
    lm = _gpt()
    ids, mask = _tokens(10, seed=3)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    train = ({"input_ids": ids, "attention_mask": mask}, labels)
    completion = labels[:2].clone()
    completion[:, :4] = IGNORE_INDEX  # the measure: −log p(tokens 4… | tokens 0…3)
    obj = uw.Objective(
        lm, "causal_lm", l2=0.1, params=["transformer.ln_f", "transformer.h.0.mlp.c_proj"]
    )
    inf = uw.Influence(obj, solver=uw.Direct(), damping=25.0, progress=False, grad_tol=1e9).fit(
        train
    )
    scores = inf.up_loss(({"input_ids": ids[:2], "attention_mask": mask[:2]}, completion)).values
    data = uw.Data.from_any(train)
    tdata = uw.Data.from_any(({"input_ids": ids[:2], "attention_mask": mask[:2]}, completion))
    H = _flat_hessian(obj, data) + 25.0 * torch.eye(obj.p, dtype=torch.float64)
    G, Gt = _point_grads_by_autograd(obj, data), _point_grads_by_autograd(obj, tdata, measure=True)
    np.testing.assert_allclose(
        scores, -(Gt @ torch.linalg.solve(H, G.T)).numpy(), rtol=1e-8, atol=1e-10
    )


def test_model_output_selection():
    class Returns(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.lin, self.kind = torch.nn.Linear(3, 2).double(), kind

        def forward(self, x):
            z = self.lin(x)
            if self.kind == "tuple":
                return z, z.sum()
            if self.kind == "dict":
                return {"scores": z}
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=z)

    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for kind, output in (
        ("tuple", None),
        ("logits", None),
        ("dict", "scores"),
        ("dict", lambda o: o["scores"]),
    ):
        m = Returns(kind).eval()
        obj = uw.Objective(m, "cross_entropy", output=output)
        torch.testing.assert_close(
            obj.losses(obj.params, X, y),
            torch.nn.functional.cross_entropy(m.lin(X), y, reduction="none"),
        )
    obj = uw.Objective(Returns("dict").eval(), "cross_entropy")
    with pytest.raises(UnsupportedModelError, match="output='logits'"):
        obj.losses(obj.params, X, y)


def test_fused_attention_without_second_derivative_says_use_eager():
    model = _bert(attn="sdpa").float()
    ids, mask = _tokens(6)
    obj = uw.Objective(model, "cross_entropy", params=["bert.encoder.layer.0.attention"])
    with pytest.raises(UnsupportedModelError, match="attn_implementation='eager'"):
        uw.Influence(obj, damping=1.0, progress=False, grad_tol=1e9, structured=False).fit(
            ({"input_ids": ids, "attention_mask": mask}, torch.arange(6) % 3)
        ).up_loss(({"input_ids": ids[:1], "attention_mask": mask[:1]}, torch.tensor([0])))


def test_exact_kfac_on_a_wide_per_token_loss_says_what_to_use_instead(monkeypatch):
    """T·V = 320 exact output factors per sequence, above a cap of 100: "exact" is refused and
    names the sampled factors and Gauss–Newton CG; the default ("auto") samples
    (tests/test_kfac_sampled.py)."""
    from upweight.core import layers

    monkeypatch.setattr(layers, "MAX_OUTPUT_FACTORS", 100)
    lm = _gpt()
    ids, mask = _tokens(6)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    obj = uw.Objective(lm, "causal_lm", l2=0.1)
    match = r"per-token loss.*output_factors='sampled'.*curvature='gauss-newton'"
    with pytest.raises(UnsupportedModelError, match=match):
        uw.Influence(obj, solver=uw.KFAC(output_factors="exact"), progress=False, grad_tol=1e9).fit(
            ({"input_ids": ids, "attention_mask": mask}, labels)
        )
    inf = uw.Influence(obj, solver=uw.KFAC(), progress=False, grad_tol=1e9, damping=1.0).fit(
        ({"input_ids": ids, "attention_mask": mask}, labels)
    )
    assert inf.state_.stats["output_factors"] == "sampled"


def test_whole_bert_with_gauss_newton_kfac_and_ekfac():
    """All parameters of the classifier: K-FAC/EK-FAC over its Linear and Embedding layers, the rest
    (LayerNorms, position embeddings) in their exact Gauss–Newton block; CG on the Gauss–Newton
    matrix is exact, so the approximations are compared with it."""
    model = _bert()
    ids, mask = _tokens(16)
    train = ({"input_ids": ids, "attention_mask": mask}, torch.arange(16) % 3)
    test = ({"input_ids": ids[:4], "attention_mask": mask[:4]}, torch.arange(4) % 3)
    obj = uw.Objective(model, "cross_entropy", l2=0.01)
    exact = uw.Influence(
        obj, solver=uw.CG(rtol=1e-10), curvature="gauss-newton", progress=False, grad_tol=1e9
    ).fit(train)
    ref = exact.up_loss(test).values
    for solver in (uw.KFAC(), uw.EKFAC()):
        approx = uw.Influence(
            obj, solver=solver, curvature="gauss-newton", progress=False, grad_tol=1e9
        ).fit(train)
        got = approx.up_loss(test)
        assert np.isfinite(got.values).all() and got.values.shape == ref.shape
        # approximations of the same matrix: scores agree in sign and rank
        for j in range(len(ref)):
            assert np.corrcoef(got.values[j], ref[j])[0, 1] > 0.5, (type(solver).__name__, j)


def test_gpt2_conv1d_layers_are_factored_as_linear_layers():
    """GPT-2's Conv1D stores its weight as (in, out): structured scoring through those blocks equals
    per-sample gradients (each score −s_testᵀ∇L(zᵢ) checked against the generic path)."""
    lm = _gpt()
    ids, mask = _tokens(8, seed=5)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    obj = uw.Objective(
        lm, "causal_lm", l2=0.1, params=["transformer.h.0.mlp", "transformer.h.0.attn.c_attn"]
    )
    from upweight.core.structured import scoring_plan

    data = uw.Data.from_any(({"input_ids": ids, "attention_mask": mask}, labels))
    plan, why = scoring_plan(obj, data)
    assert why is None and sorted(b.name for b in plan.blocks) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    kw = dict(solver=uw.CG(rtol=1e-12), curvature="gauss-newton", progress=False, grad_tol=1e9)
    test = ({"input_ids": ids[:2], "attention_mask": mask[:2]}, labels[:2])
    fast = uw.Influence(obj, structured=True, **kw).fit(data).up_loss(test).values
    slow = uw.Influence(obj, structured=False, **kw).fit(data).up_loss(test).values
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
