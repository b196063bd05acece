"""§5.4 fixing mislabeled examples (Koh & Liang 2017, Fig. 6) on the real Enron1 data:
``upweight reproduce mislabel``.

Fast setting (one CLI run, ~10 s idle): the 300 most frequent words, l2 = 1e-2 (better conditioned
than the paper's 1e-4, so the refits take tens of L-BFGS iterations, not hundreds), 1 repeat, one
checkpoint at 10% checked. Measured there: self-influence finds 0.594 of the 414 flips, random
0.109, training loss 0.790; test accuracy 0.9034 flipped → 0.9488 after the influence fixes
(clean: 0.9498). The self-influence values are checked against the closed form for logistic
regression, computed here in NumPy float64 from the data alone:

    ∇θL(z) = −y σ(−y θᵀx) x,   ∇²θL(z) = σ(θᵀx) σ(−θᵀx) x xᵀ,
    H = (1/n) Σⱼ σ(θᵀxⱼ) σ(−θᵀxⱼ) xⱼxⱼᵀ + l2·I,
    I_up,loss(z, z) = −∇θLᵀ H⁻¹ ∇θL = −σ(−y θᵀx)² · xᵀH⁻¹x.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy.special import expit

from conftest import requires_data, shared_data
from upweight.errors import InputError

DATA = shared_data("enron1")
CSV = DATA / "enron1.csv.gz"

pytestmark = requires_data(CSV, "the Enron1 data")

FAST = [
    "--vocab-size",
    "300",
    "--l2",
    "1e-2",
    "--repeats",
    "1",
    "--fractions",
    "0,0.1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from upweight.cli.main import main

    out = tmp_path_factory.mktemp("mislabel")
    rc = main(["reproduce", "mislabel", "--data", str(CSV), "--out", str(out), *FAST])
    return rc, out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def small_spam():
    from sklearn.feature_extraction.text import CountVectorizer

    from upweight.datasets import load_enron

    return load_enron(CSV, vectorizer=CountVectorizer(min_df=5, max_features=300))


def test_cli_writes_figure_results_and_report(run):
    from upweight.paper.mislabel import MislabelResult

    rc, out, r = run
    assert rc == 0
    for name in ("mislabel.png", "results.json", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "mislabel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fields = {f.name for f in dataclasses.fields(MislabelResult)}
    assert fields - {"config"} | {"settings"} <= set(r)
    assert r["experiment"] == "mislabel" and r["fractions"] == [0.0, 0.1]
    for o in ("influence", "loss", "random"):
        c = r["curves"][o]
        assert len(c["accuracy_mean"]) == len(c["found_mean"]) == 2
        assert len(c["found_grid_mean"]) == len(r["grid"]) == 21
        assert c["found_mean"][0] == 0.0 and c["accuracy_mean"][0] == r["flipped_test_accuracy"][0]
    report = (out / "report.md").read_text()
    assert "| quantity | ours | paper |" in report and "4,147" in report and "1,035" in report
    assert "10% checked, influence: flips found" in report


def test_the_setup(run):
    _, _, r = run
    assert (r["n_train"], r["n_test"], r["p"]) == (4137, 1035, 300)
    assert r["n_flipped"] == 414 and len(set(r["flipped_indices"][0])) == 414
    assert (
        r["clean_grad_norm"] < 1e-6
        and r["flipped_grad_norm"][0] < 1e-6
        and r["refit_grad_norm_max"] < 1e-4
    )
    assert r["self_influence_residual"][0] < 1e-8  # Direct in float64
    assert r["self_influence_min"][0] < 0  # I_up,loss(z, z) ≤ 0 for a positive-definite H


def test_self_influence_finds_flips_far_faster_than_random_checking(run):
    _, _, r = run
    found = {o: r["found"][o][0][1] for o in ("influence", "loss", "random")}  # at 10% checked
    # measured: influence 0.594, loss 0.790, random 0.109 (random's expectation: 0.10)
    assert found["influence"] > 0.4
    assert found["influence"] > 3 * found["random"]
    assert 0.03 < found["random"] < 0.2
    acc = {o: r["accuracy"][o][0][1] for o in ("influence", "loss", "random")}
    # fixing the flips found by influence recovers most of the accuracy lost (0.9034 → 0.9488; clean
    # 0.9498)
    assert r["flipped_test_accuracy"][0] < r["clean_test_accuracy"] - 0.02
    assert acc["influence"] > r["flipped_test_accuracy"][0] + 0.02
    assert acc["influence"] > acc["random"] + 0.02


def test_self_influence_matches_the_logistic_closed_form(small_spam):
    """Influence.self_influence (Direct) against −σ(−y s)²·xᵀH⁻¹x from NumPy, on real emails."""
    from upweight import Influence
    from upweight.paper.mislabel import _objective, fit_logreg, spam_tensors
    from upweight.solvers import Direct

    X, y, _, _ = spam_tensors(small_spam)
    X, y = X[:800], y[:800]  # a real subset keeps the fit fast; the check is exact at any n
    l2 = 1e-3
    w, g, _ = fit_logreg(X, y, l2, gtol=1e-10)
    assert g < 1e-8
    idx = [0, 1, 2, 3, 4]
    inf = Influence(_objective(w, l2), solver=Direct(), progress=False).fit((X, y))
    ours = inf.self_influence(train=idx).values
    top = int(np.argmax(np.abs(inf.self_influence().values)))

    Xn, yn, wn = X.numpy(), y.numpy().astype(float), w.numpy()
    s = Xn @ wn
    H = (Xn * (expit(s) * expit(-s))[:, None]).T @ Xn / len(Xn) + l2 * np.eye(Xn.shape[1])
    pts = idx + [top]
    quad = np.einsum("ij,ji->i", Xn[pts], np.linalg.solve(H, Xn[pts].T))
    ref = -(expit(-yn[pts] * s[pts]) ** 2) * quad
    np.testing.assert_allclose(ours, ref[:-1], rtol=1e-6, atol=0)
    np.testing.assert_allclose(inf.self_influence(train=[top]).values, ref[-1:], rtol=1e-6, atol=0)
    assert np.all(ref < 0) and abs(ref[-1]) >= np.abs(ref[:-1]).max()


def test_check_orders_rank_by_magnitude_of_self_influence_and_by_loss():
    from upweight.paper.mislabel import check_orders

    si = np.array([-0.1, -5.0, -0.0, -2.0])
    loss = np.array([0.3, 0.1, 2.0, 0.2])
    o = check_orders(si, loss, np.random.default_rng(0))
    assert o["influence"].tolist() == [1, 3, 0, 2]
    assert o["loss"].tolist() == [2, 0, 3, 1]
    assert sorted(o["random"].tolist()) == [0, 1, 2, 3]


def test_bad_options_are_input_errors(tmp_path, capsys):
    from upweight.cli.main import main
    from upweight.paper.config import MislabelConfig
    from upweight.paper.mislabel import make_solver

    with pytest.raises(InputError, match="fractions"):
        MislabelConfig(fractions=[0.0, 1.5])
    with pytest.raises(InputError, match="flip_fraction"):
        MislabelConfig(flip_fraction=0.0)
    with pytest.raises(InputError, match="solver"):
        MislabelConfig(solver="lissa")
    with pytest.raises(InputError, match="solver"):
        make_solver("lissa")
    assert (
        main(
            ["reproduce", "mislabel", "--data", str(CSV), "--out", str(tmp_path), "--repeats", "0"]
        )
        == 2
    )
    assert "--repeats must be ≥ 1" in capsys.readouterr().err


def test_spacy_lemmas_follow_the_release_filter():
    """``lemmatize=True``: alphabetic, non-stop, in-vocabulary tokens as spaCy lookup lemmas."""
    pytest.importorskip("spacy", reason="lemmatize=True needs spaCy: pip install upweight[lemma]")
    pytest.importorskip(
        "spacy_lookups_data", reason="lemmatize=True needs pip install spacy-lookups-data"
    )
    from upweight.datasets.enron import spacy_lemmas

    out = spacy_lemmas(["the meetings were running 2000 times , qwzxv offers", "Subject: cheaper"])
    # "the", "were" are stop words, "2000" and "," not alphabetic, "qwzxv" out of vocabulary
    assert out == ["meeting run time offer", "Subject cheap"]  # the vectoriser lower-cases


@pytest.mark.slow
def test_load_enron_lemmatize_gives_the_lemma_vocabulary():
    pytest.importorskip("spacy", reason="lemmatize=True needs spaCy: pip install upweight[lemma]")
    pytest.importorskip(
        "spacy_lookups_data", reason="lemmatize=True needs pip install spacy-lookups-data"
    )
    from sklearn.feature_extraction.text import CountVectorizer

    from upweight.datasets import load_enron

    d = load_enron(CSV, lemmatize=True, vectorizer=CountVectorizer(min_df=5))
    # measured: 4,875 words (the tokeniser's vocabulary: 7,211)
    assert d.x_train.shape == (4137, 4875) and d.x_test.shape == (1035, 4875)
    words = set(d.feature_names)
    assert {"meeting", "offer"} <= words and not {"meetings", "the", "offers"} & words
    assert d.docs_train[0] and d.files_train[0].endswith(".txt")  # raw texts stay


@pytest.mark.slow
def test_from_2000_words_self_influence_finds_more_flips_than_loss():
    """Fig. 6's finding where it holds here (docs/reproduction/mislabel.md, "Influence vs loss
    across vocabulary sizes"): with the 2,000 most frequent words and the paper's l2 = 1e-4,
    checking 10% of the training emails by |self-influence| finds more of the flipped labels than
    checking by training loss (measured on the first repeat: 0.592 vs 0.512; random 0.10). At
    300 words loss wins (the fast run above)."""
    from sklearn.feature_extraction.text import CountVectorizer

    from upweight.datasets import load_enron
    from upweight.paper.config import MislabelConfig
    from upweight.paper.mislabel import run_mislabel

    data = load_enron(CSV, vectorizer=CountVectorizer(min_df=5, max_features=2000))
    r = run_mislabel(
        data, MislabelConfig(repeats=1, fractions=(0.0, 0.1), vocab_size=2000), progress=False
    )
    found = {o: r.found[o][0][1] for o in ("influence", "loss", "random")}
    assert found["influence"] > found["loss"] + 0.04
    assert found["loss"] > 3 * found["random"]
