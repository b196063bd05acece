"""examples/transformers_enron.py end to end (``--tiny``) on the real Enron e-mails: the structure
of results.json, and checks that cannot pass by accident — leave-one-out retraining agrees with the
predicted removal effects, the Hugging Face (dict-batch) path agrees with the plain-tensor path, the
ranked lists carry the signs of the paper's convention, and the LM measure equals −Σ log-softmax of
the continuation tokens recomputed here from the saved model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data, skip_without_data

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev dependency (pip install -e '.[dev]')"
)

# torch's own deprecation of jit.script, raised inside transformers' BERT (as in test_model_safety)
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "transformers_enron.py"


def _enron() -> Path | None:
    cand = shared_data("enron1")
    return cand if (cand / "enron1.csv.gz").exists() else None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    skip_without_data(shared_data("enron1", "enron1.csv.gz"), "the Enron-Spam data")
    data = _enron()
    spec = importlib.util.spec_from_file_location("transformers_enron", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("transformers_enron")
    returned = mod.main(
        [
            "--tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--seed",
            "0",
            "--no-progress",
            "--pooler",
        ]
    )
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return returned, saved, out


def test_results_json_holds_every_number(run):
    returned, res, out = run
    assert set(res) == set(returned) and res["timings"] == returned["timings"]
    for key in ("sizes", "data", "machine", "classifier", "lm", "timings", "tiny", "seed"):
        assert key in res, key
    assert res["tiny"] is True and res["seed"] == 0
    d, sz = res["data"], res["sizes"]
    assert d["n_emails"] == 5172 and d["n_train"] == sz["n_train"] and d["n_test"] == sz["n_test"]
    assert 0 < d["train_spam"] < d["n_train"] and d["vocab"] <= sz["vocab"]
    assert all(v >= 0 for v in res["timings"].values()) and res["timings"]["total"] > 0
    c, lm = res["classifier"], res["lm"]
    assert 0.5 <= c["test_accuracy"] <= 1 and 0.5 <= c["train_accuracy"] <= 1
    assert (
        c["influence"]["provenance"]["solver"]["name"] == "direct"
        and c["influence"]["provenance"]["accepted"]
    )
    assert (
        lm["influence"]["provenance"]["solver"]["name"] == "cg"
        and lm["influence"]["provenance"]["accepted"]
    )
    assert lm["influence"]["provenance"]["damping"] == lm["damping"] > 0
    assert np.isfinite(lm["train_loss_per_token"]) and np.isfinite(lm["test_loss_per_token"])
    # it learned something beyond the uniform distribution
    assert lm["train_loss_per_token"] < np.log(lm["vocab"])
    for name in ("report.md", "classifier.pt", "lm.pt"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Classifier" in report and "## Language model" in report and "leave-one-out" in report


def test_classifier_influence_agrees_with_leave_one_out_retraining(run):
    _, res, _ = run
    c = res["classifier"]
    assert c["theta"] == ["classifier.weight", "classifier.bias"]
    assert c["p"] == 2 * c["config"]["hidden_size"] + 2
    assert c["head_refit_grad_norm"] < 1e-6  # θ̂ is the minimiser the influence function assumes
    assert c["influence"]["all_finite"]
    # the Hugging Face model on dict batches and the same head on cached features: one computation
    assert c["influence"]["features_path_max_rel_diff"] < 1e-8
    loo = c["leave_one_out"]
    assert loo["k"] == res["sizes"]["loo_k"] == len(loo["predicted"]) == len(loo["actual"])
    assert loo["retrain_grad_norm"] < 1e-6
    assert loo["pearson"] > 0.9 and loo["spearman"] > 0.8
    assert 0.8 < loo["slope"] < 1.25
    pred, act = np.array(loo["predicted"]), np.array(loo["actual"])
    assert np.all(np.sign(pred) == np.sign(act)) or np.corrcoef(pred, act)[0, 1] > 0.99
    # the same removals to second order (with the third-derivative term): closer to the refits
    so = c["leave_one_out_second_order"]
    # the same retrainings
    np.testing.assert_allclose(so["actual"], loo["actual"], rtol=1e-6, atol=1e-12)
    # Σ of one = the one
    np.testing.assert_allclose(so["order1"]["predicted"], loo["predicted"], rtol=1e-8)
    assert so["order2"]["pearson"] > 0.9 and so["order2"]["mae"] < so["order1"]["mae"]
    lgo = c["leave_group_out"]
    assert lgo["groups"] == res["sizes"]["groups"] and len(lgo["actual"]) == lgo["groups"]
    assert lgo["order1"]["pearson"] > 0.9 and lgo["order2"]["mae"] < lgo["order1"]["mae"]
    assert lgo["retrain_grad_norm"] < 1e-6


def test_pooler_and_head_cg_and_ekfac(run):
    """θ = pooler + head is not convex: the damping makes H + δI positive definite on the Lanczos
    estimate, CG's solve is accepted, and EK-FAC (Gauss–Newton) ranks like the exact damped Hessian.
    """
    _, res, _ = run
    pool = res["classifier"]["pooler"]
    assert pool["p"] == res["classifier"]["p"] + res["classifier"]["config"]["hidden_size"] * (
        res["classifier"]["config"]["hidden_size"] + 1
    )
    assert pool["damping"] + pool["spectrum"]["lambda_min"] > 0
    assert (
        pool["cg"]["provenance"]["accepted"]
        and pool["cg"]["provenance"]["damping"] == pool["damping"]
    )
    assert (
        pool["gn_cg"]["provenance"]["accepted"]
        and "Gauss–Newton" in pool["gn_cg"]["provenance"]["curvature"]
    )
    assert pool["ekfac"]["provenance"]["solver"]["name"] == "ekfac"
    assert (
        pool["ekfac_vs_gn_cg"]["pearson_vs_gn_cg"] > 0.5
        and pool["gn_cg_vs_cg"]["pearson_vs_cg"] > 0.5
    )


@pytest.mark.parametrize("model", ["classifier", "lm"])
def test_helpful_and_harmful_lists_have_the_paper_signs(run, model):
    """Helpful: the most negative I_up,loss (removing them raises the test measure); harmful: the
    most positive; each list is the extreme of that sign among all n saved scores."""
    _, res, out = run
    part = res[model]
    saved = np.load(out / f"scores_{model}.npz")
    values, train_ids = saved["values"][0], saved["train_ids"]
    n = part.get("n_train", res["data"]["n_train"])
    assert values.shape == (n,) and np.all(np.isfinite(values)) and part["influence"]["all_finite"]
    assert (
        part["influence"]["up_loss_min"] == values.min()
        and part["influence"]["up_loss_max"] == values.max()
    )
    helpful, harmful = part["top"]["helpful"], part["top"]["harmful"]
    k = 5
    assert len(helpful) == min(k, int((values < 0).sum())) and len(harmful) == min(
        k, int((values > 0).sum())
    )
    assert helpful or harmful
    assert [r["train_id"] for r in helpful] == train_ids[
        np.argsort(values, kind="stable")[: len(helpful)]
    ].tolist()
    assert [r["train_id"] for r in harmful] == train_ids[
        np.argsort(-values, kind="stable")[: len(harmful)]
    ].tolist()
    for r in helpful:  # upweighting lowers the test measure, removal raises it by −I_up,loss / n
        assert r["up_loss"] < 0 < r["removal_effect"]
    for r in harmful:
        assert r["removal_effect"] < 0 < r["up_loss"]
    for r in helpful + harmful:
        assert r["up_loss"] == values[r["train_id"]]
        # the LM scores are float32
        np.testing.assert_allclose(r["removal_effect"], -r["up_loss"] / n, rtol=1e-6)


def test_lm_measure_is_minus_log_probability_of_the_greedy_continuation(run):
    _, res, out = run
    lm_res = res["lm"]
    cfg = transformers.GPT2Config.from_dict(lm_res["config"])
    lm = transformers.GPT2LMHeadModel(cfg)
    lm.load_state_dict(torch.load(out / "lm.pt", weights_only=True))
    lm = lm.double().eval()
    prompt, cont = lm_res["prompt"]["ids"], lm_res["continuation"]["ids"]
    assert len(prompt) == res["sizes"]["prompt_len"] and len(cont) == res["sizes"]["gen_len"]
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    P = len(prompt)
    direct = -sum(float(logp[P - 1 + j, t]) for j, t in enumerate(cont))
    # upweight's causal_lm measure on labels with the prompt masked −100 (float32 model)
    np.testing.assert_allclose(lm_res["measure"], direct, rtol=1e-5)
    banned = lm_res["continuation"]["banned_ids"]
    for j, t in enumerate(cont):  # greedy: each token is the most probable non-special one
        allowed = logits[P - 1 + j].clone()
        allowed[banned] = -torch.inf
        assert int(allowed.argmax()) == t
    # H + δI positive on the Lanczos estimate
    assert lm_res["damping"] + lm_res["spectrum"]["lambda_min"] > 0
    assert lm_res["influence"]["all_finite"]
    gn = lm_res["gauss_newton"]
    assert "Gauss–Newton" in gn["provenance"]["curvature"] and gn["provenance"]["accepted"]
    assert "Hessian" in lm_res["influence"]["provenance"]["curvature"]
    assert gn["pearson_vs_hessian"] > 0.5  # the same θ and damping: the two curvatures rank alike
    saved = np.load(out / "scores_lm_gauss_newton.npz")["values"][0]
    assert (
        np.all(np.isfinite(saved))
        and [r["train_id"] for r in gn["top"]["helpful"]]
        == np.argsort(saved, kind="stable")[: len(gn["top"]["helpful"])].tolist()
    )
    # EK-FAC on the same Gauss–Newton matrix: 24 positions × 400 words per e-mail, above the cap
    # of exact output factors, so they are sampled; it approximates the matrix CG solves exactly
    ek = lm_res["ekfac"]
    assert ek["provenance"]["solver_output_factors"] == "sampled" and ek["samples"] == 1
    assert ek["damping"] == gn["damping"] and ek["provenance"]["solver"]["name"] == "ekfac"
    assert np.all(np.isfinite(np.load(out / "scores_lm_ekfac.npz")["values"]))
    assert ek["spearman_vs_gn_cg"] > 0.5  # measured 0.996 (tiny, seed 0)


def test_lm_removal_predictions_agree_with_proximal_retraining(run):
    """The LM's θ̂ is no minimum, so its damped removal effects are checked against the proximal
    refit they predict (``uw.ProximalRefit``), one retraining per removed e-mail: each actual
    change within a few % of its prediction, not only ranked alike."""
    _, res, _ = run
    loo = res["lm"]["leave_one_out"]
    assert loo["n_train"] == res["sizes"]["lm_loo_points"]
    assert len(loo["train_ids"]) == res["sizes"]["lm_loo_k"]
    predicted, actual = np.array(loo["predicted"]), np.array(loo["actual"])
    assert np.all(np.abs(predicted) > 0)
    np.testing.assert_allclose(actual, predicted, rtol=0.05)  # measured ≤ 1 % (tiny, seed 0)
    assert loo["pearson"] > 0.9 and abs(loo["slope"] - 1) < 0.1
    assert loo["retrain_grad_norm"] < 1e-4
