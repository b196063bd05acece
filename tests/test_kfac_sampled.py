"""K-FAC / EK-FAC with sampled output-Hessian factors (``KFAC(output_factors=...)``), against
mathematics: on a tiny causal language model the exact Gauss–Newton factors S, A and EK-FAC's Λ are
built here by enumerating every position's output-Hessian factors √(wₜpₜₖ)(eₖ − pₜ) (the softmax
covariance, Bishop 2006 §4.3.4) and back-propagating each with autograd; the sampled factors must
approach them as 1/√M, the exact mode must equal them, and sampling must not depend on batching,
partitioning or device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import upweight as uw
from conftest import DEVICES
from reference import spearman
from upweight._executor import LocalExecutor
from upweight.core import layers as layers_mod
from upweight.core.curvature import Curvature
from upweight.core.kfac import correct_eigenvalues, fit_factors
from upweight.core.layers import OutputSampling, find_layers
from upweight.errors import InputError, StoreMismatchError, UnsupportedModelError
from upweight.solvers.kfac import EKFAC, KFAC

D64 = torch.float64
V, T, D = 7, 4, 5


class TinyLM(torch.nn.Module):
    """Embedding → causal running mean (position t sees tokens ≤ t) → tanh Linear → Linear head:
    every position's logits depend on the earlier tokens, so the output-Hessian factors of one
    position reach the layer outputs at every earlier position. ``classes``: a per-sequence
    classifier (mean over positions) instead of a language model."""

    def __init__(self, classes: int | None = None) -> None:
        super().__init__()
        self.classes = classes
        self.emb = torch.nn.Embedding(V, D)
        self.fc = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, classes or V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=x.dtype)[None, :, None]
        z = self.head(torch.tanh(self.fc(x)))
        return z.mean(1) if self.classes else z


def _lm(classes: int | None = None, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(classes).double().eval()


def _tokens(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    labels = ids.clone()
    labels[1, 2:] = -100  # a padded sequence: its last positions are scored nowhere
    return ids, labels


def _exact_reference(model: TinyLM, ids: torch.Tensor, labels: torch.Tensor):
    """Per layer, S, A (float64, as K-FAC defines them: sums over locations, S divided by T) and
    the per-point pseudo-gradients Gᵢₖ = Σₛ bᵢₖₛãᵢₛᵀ of every exact output-Hessian factor of
    ``causal_lm`` (the logits at t predict the label at t + 1; weight 1 where that label is
    scored, else 0)."""
    names = ("emb", "fc", "head")
    mods = {n: getattr(model, n) for n in names}
    outs, ins = {}, {}

    def keep(_m, i, o, n):
        outs[n], ins[n] = o, i[0]

    hooks = [
        m.register_forward_hook(lambda m_, i, o, n=n: keep(m_, i, o, n)) for n, m in mods.items()
    ]
    with torch.enable_grad():
        z = model(ids)
    for h in hooks:
        h.remove()
    n = len(ids)
    p = torch.softmax(z.detach(), -1)  # (n, T, V)
    w = torch.zeros(n, T, dtype=D64)
    w[:, :-1] = (labels[:, 1:] != -100).to(D64)
    a = {"emb": torch.nn.functional.one_hot(ins["emb"], V).to(D64)}
    for nm in ("fc", "head"):
        x = ins[nm].detach()
        a[nm] = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=D64)], -1)
    A = {nm: torch.einsum("btc,btd->cd", a[nm], a[nm]) / n for nm in names}
    S = {nm: 0.0 for nm in names}
    G: dict[str, list[torch.Tensor]] = {nm: [] for nm in names}  # per factor (t, k): (n, out, cols)
    eye = torch.eye(V, dtype=D64)
    for t in range(T):
        for k in range(V):
            c = torch.zeros_like(z)
            c[:, t] = (w[:, t] * p[:, t, k]).sqrt()[:, None] * (eye[k][None] - p[:, t])
            grads = torch.autograd.grad(z, [outs[nm] for nm in names], c, retain_graph=True)
            for nm, b in zip(names, grads):
                b = b.detach()
                S[nm] = S[nm] + torch.einsum("bto,btp->op", b, b) / T / n
                G[nm].append(torch.einsum("bto,btc->boc", b, a[nm]))
    return S, A, {nm: torch.stack(G[nm]) for nm in names}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fit(model, ids, labels, sampling, loss="causal_lm", **kw):
    obj = uw.Objective(model, loss)
    data = uw.Data.from_any((ids, labels))
    plan = find_layers(obj, data, embeddings=True)
    assert [b.name for b in plan.blocks] == ["emb", "fc", "head"] and not plan.other
    return fit_factors(obj, data, plan.blocks, sampling=sampling, **kw)[0]


# ── unbiasedness ──────────────────────────────────────────────────────────────────────────
def test_exact_mode_equals_the_enumerated_output_hessian_factors():
    """T·V = 28 exact factors per sequence: "exact" (and "auto", below the cap) back-propagates
    each."""
    model, (ids, labels) = _lm(), _tokens()
    S, A, _ = _exact_reference(model, ids, labels)
    curv = Curvature(
        uw.Objective(model, "causal_lm", l2=0.1),
        uw.Data.from_any((ids, labels)),
        kind="gauss-newton",
    )
    for mode in ("exact", "auto"):
        state = KFAC(output_factors=mode).prepare(curv)
        assert state.stats["output_factors"] == "exact" and state.stats["output_samples"] is None
        for f in state.factors:
            name = f.block.name
            torch.testing.assert_close(f.S, S[name], rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(f.activation(), A[name], rtol=1e-12, atol=1e-14)


def test_sampled_factors_approach_the_exact_ones_as_one_over_root_m():
    model, (ids, labels) = _lm(), _tokens()
    S, A, _ = _exact_reference(model, ids, labels)
    err = {}
    for M in (16, 1024):
        errs = []
        for seed in range(3):
            got = _fit(model, ids, labels, OutputSampling(M, seed))
            for f in got:  # A holds no output cotangent: exact whatever is sampled
                torch.testing.assert_close(f.activation(), A[f.block.name], rtol=1e-12, atol=1e-14)
            errs.append(np.mean([_rel(f.S, S[f.block.name]) for f in got]))
        err[M] = float(np.mean(errs))
    # E‖Ŝ − S‖ ∝ 1/√M: 64× the samples, 8× smaller (measured 0.140 → 0.018)
    assert err[1024] < 0.04, err
    assert 1 / 20 < err[1024] / err[16] < 1 / 4, err


def test_sampled_eigenvalue_correction_is_unbiased_in_fixed_bases():
    """Λ = (1/n) Σᵢₖ (Q_Sᵀ Gᵢₖ Q_A)² in the exact factors' eigenbases, the Gᵢₖ enumerated here; with
    M sampled cotangents per point it is an average of M unbiased terms."""
    model, (ids, labels) = _lm(), _tokens()
    _, _, G = _exact_reference(model, ids, labels)
    obj, data = uw.Objective(model, "causal_lm"), uw.Data.from_any((ids, labels))
    factors = _fit(model, ids, labels, None)
    exact = {}
    for f in factors:
        QS, QA = f.Q_S, f.activation_basis()
        exact[f.block.name] = (
            torch.einsum("os,kbsc,cj->kboj", QS.T, G[f.block.name], QA) ** 2
        ).sum((0, 1)) / len(ids)
    correct_eigenvalues(obj, data, factors)  # exact mode: the enumerated sum itself
    for f in factors:
        torch.testing.assert_close(f.corrected, exact[f.block.name], rtol=1e-9, atol=1e-13)
    err = {}
    for M in (16, 1024):
        correct_eigenvalues(obj, data, factors, sampling=OutputSampling(M, 3))
        err[M] = np.mean([_rel(f.corrected, exact[f.block.name]) for f in factors])
    assert err[1024] < 0.06 and err[1024] < err[16] / 4, err


def test_sampled_factors_of_a_sequence_classifier_approach_its_exact_factors():
    """One output of 3 classes per sequence: the closed form √pₖ(eₖ − p) against sampled labels."""
    model = _lm(classes=3)
    ids, _ = _tokens(n=8)
    y = torch.arange(8) % 3
    exact = _fit(model, ids, y, None, loss="cross_entropy")
    for M, bound in ((16, 0.6), (4096, 0.04)):
        got = _fit(model, ids, y, OutputSampling(M, 0), loss="cross_entropy")
        for e, s in zip(exact, got):
            assert _rel(s.S, e.S) < bound, (M, e.block.name, _rel(s.S, e.S))


# ── reproducibility and placement ─────────────────────────────────────────────────────────
def test_sampling_is_reproducible_and_independent_of_batching_and_partitions():
    model, (ids, labels) = _lm(), _tokens(n=9)
    ref = _fit(model, ids, labels, OutputSampling(2, 7), batch_size=512, eigen_correction=True)
    again = _fit(model, ids, labels, OutputSampling(2, 7), batch_size=512, eigen_correction=True)
    for a, b in zip(ref, again):  # same seed: bit for bit
        assert torch.equal(a.S, b.S) and torch.equal(a.corrected, b.corrected)
    for kw in (
        {"batch_size": 2},
        {"batch_size": 4},
        {"batch_size": 3, "executor": LocalExecutor()},
    ):
        got = _fit(model, ids, labels, OutputSampling(2, 7), eigen_correction=True, **kw)
        for a, b in zip(
            ref, got
        ):  # the same draws per point; only the float64 summation order differs
            torch.testing.assert_close(b.S, a.S, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(b.corrected, a.corrected, rtol=1e-10, atol=1e-15)
    other = _fit(model, ids, labels, OutputSampling(2, 8), batch_size=512)
    assert min(_rel(a.S, b.S) for a, b in zip(other, ref)) > 1e-3  # another seed, other draws


def test_a_point_keeps_its_draws_in_a_subset():
    """The draws of a point depend on its id, not on its position: fitting points 3..8 alone gives
    the same sums as the full fit less points 0..2 fitted alone."""
    model, (ids, labels) = _lm(), _tokens(n=9)
    obj = uw.Objective(model, "causal_lm")
    data = uw.Data.from_any((ids, labels))
    plan = find_layers(obj, data, embeddings=True)
    s = OutputSampling(1, 5)
    full = fit_factors(obj, data, plan.blocks, sampling=s)[0]
    head = fit_factors(obj, data.subset(range(3)), plan.blocks, sampling=s)[0]
    tail = fit_factors(obj, data.subset(range(3, 9)), plan.blocks, sampling=s)[0]
    for f, h, t in zip(full, head, tail):
        torch.testing.assert_close(f.S, (3 * h.S + 6 * t.S) / 9, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_factors_on_the_models_device_equal_the_cpus(device):
    model, (ids, labels) = _lm(), _tokens()
    ref = _fit(model, ids, labels, OutputSampling(4, 0), eigen_correction=True)
    got = _fit(_lm().to(device), ids, labels, OutputSampling(4, 0), eigen_correction=True)
    for a, b in zip(ref, got):
        assert b.S.device.type == torch.device(device).type
        torch.testing.assert_close(b.S.cpu(), a.S, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.corrected.cpu(), a.corrected, rtol=1e-9, atol=1e-12)


# ── settings, refusals, provenance, store ───────────────────────────────────────────────────
def test_settings_are_checked_and_auto_samples_above_the_cap(monkeypatch):
    with pytest.raises(InputError, match="output_factors"):
        KFAC(output_factors="mc")
    with pytest.raises(InputError, match="samples"):
        EKFAC(samples=0)
    model, (ids, labels) = _lm(), _tokens()
    curv = Curvature(
        uw.Objective(model, "causal_lm", l2=0.1),
        uw.Data.from_any((ids, labels)),
        kind="gauss-newton",
    )
    monkeypatch.setattr(layers_mod, "MAX_OUTPUT_FACTORS", T * V - 1)
    with pytest.raises(
        UnsupportedModelError, match=r"output_factors='sampled'.*curvature='gauss-newton'"
    ):
        KFAC(output_factors="exact").prepare(curv)
    state = KFAC(samples=3, seed=2).prepare(curv)
    assert state.stats["output_factors"] == "sampled" and state.stats["output_samples"] == 3
    assert "3 sampled cotangent(s)" in state.stats["curvature_approximated"]
    direct = _fit(model, ids, labels, OutputSampling(3, 2))
    for f, g in zip(state.factors, direct):
        assert torch.equal(f.S, g.S)


def test_a_wide_loss_without_a_closed_form_is_refused_in_every_mode(monkeypatch):
    def log_cosh(out, y):
        return torch.log(
            torch.cosh(out - torch.nn.functional.one_hot(y, V).to(out.dtype)[:, None])
        ).sum((1, 2))

    model, (ids, _) = _lm(), _tokens()
    curv = Curvature(
        uw.Objective(model, log_cosh), uw.Data.from_any((ids, ids[:, 0])), kind="gauss-newton"
    )
    monkeypatch.setattr(layers_mod, "MAX_OUTPUT_FACTORS", 10)
    for mode in ("auto", "sampled", "exact"):
        with pytest.raises(UnsupportedModelError, match="no closed form.*curvature='gauss-newton'"):
            KFAC(output_factors=mode).prepare(curv)


def test_squared_loss_sampled_with_random_signs_is_unbiased():
    """½‖z − y‖² on (T, V) outputs: ∇²_zL = I, sampled as u = ε, E[εεᵀ] = I."""
    model, (ids, _) = _lm(), _tokens()
    Y = torch.randn(len(ids), T, V, generator=torch.Generator().manual_seed(0), dtype=D64)
    exact = _fit(model, ids, Y, None, loss="squared")
    got = _fit(model, ids, Y, OutputSampling(2048, 0), loss="squared")
    for e, s in zip(exact, got):
        assert _rel(s.S, e.S) < 0.05, (e.block.name, _rel(s.S, e.S))


def _trained_gpt(n: int = 24):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    Vg, Tg = 12, 6
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=Vg,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=Tg,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    lm = transformers.GPT2LMHeadModel(cfg).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.empty(
        n, Tg, dtype=torch.long
    )  # a noisy cycle: token t + 1 follows t (mod V) most of the time
    ids[:, 0] = torch.randint(0, Vg, (n,), generator=g)
    for t in range(1, Tg):
        jump = torch.rand(n, generator=g) < 0.3
        ids[:, t] = torch.where(
            jump, torch.randint(0, Vg, (n,), generator=g), (ids[:, t - 1] + 1) % Vg
        )
    mask = torch.ones(n, Tg, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(lm.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        lm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    return lm.eval(), ({"input_ids": ids, "attention_mask": mask}, labels)


def test_ekfac_on_a_trained_gpt2_ranks_like_cg_on_the_gauss_newton_matrix(monkeypatch):
    """The whole GPT-2 (embeddings, attention, MLP, LayerNorms). The layer-block-diagonal EK-FAC is
    an approximation of the GGN whatever its output factors: measured Spearman against CG
    0.49–0.60 per test point with sampled factors, 0.49–0.65 with exact ones, and 0.81–0.99
    between the two."""
    lm, train = _trained_gpt()
    X, labels = train
    test = ({k: v[:3] for k, v in X.items()}, labels[:3])
    obj = uw.Objective(lm, "causal_lm", l2=1e-3)
    kw = dict(curvature="gauss-newton", damping=1e-2, progress=False, grad_tol=1e9)
    ref = uw.Influence(obj, solver=uw.CG(rtol=1e-8), **kw).fit(train).up_loss(test).values
    exact = uw.Influence(obj, solver=EKFAC(output_factors="exact"), max_residual=None, **kw).fit(
        train
    )
    exact_scores = exact.up_loss(test).values
    monkeypatch.setattr(
        layers_mod, "MAX_OUTPUT_FACTORS", 16
    )  # "auto" samples, as on a real vocabulary
    inf = uw.Influence(obj, solver=EKFAC(samples=4), max_residual=None, **kw).fit(train)
    scores = inf.up_loss(test)
    assert np.isfinite(scores.values).all()
    assert scores.provenance["solver_output_factors"] == "sampled"
    rho = [spearman(scores.values[j], ref[j]) for j in range(len(ref))]
    assert min(rho) > 0.3, rho
    assert min(spearman(scores.values[j], exact_scores[j]) for j in range(len(ref))) > 0.7


def test_sampled_factors_round_trip_through_a_store_and_never_mix_with_exact_ones(
    tmp_path, monkeypatch
):
    model, (ids, labels) = _lm(), _tokens()
    train, test = (ids, labels), (ids[:2], labels[:2])
    obj = uw.Objective(model, "causal_lm", l2=0.1)
    kw = dict(
        curvature="gauss-newton", damping=0.1, progress=False, grad_tol=1e9, max_residual=None
    )
    sampled = EKFAC(output_factors="sampled", samples=2)
    first = uw.Influence(obj, solver=sampled, **kw).fit(train, store=tmp_path / "s")
    again = uw.Influence(obj, solver=sampled, **kw).fit(train, store=tmp_path / "s")
    a, b = first.up_loss(test), again.up_loss(test)
    assert b.provenance["solver_factors_from_store"] is True
    np.testing.assert_array_equal(a.values, b.values)
    uw.Influence(obj, solver=EKFAC(output_factors="exact"), **kw).fit(train, store=tmp_path / "e")
    with pytest.raises(StoreMismatchError, match="output_factors"):
        uw.Influence(obj, solver=sampled, **kw).fit(train, store=tmp_path / "e")
    with pytest.raises(StoreMismatchError, match="samples"):
        uw.Influence(obj, solver=dataclasses.replace(sampled, samples=3), **kw).fit(
            train, store=tmp_path / "s"
        )
