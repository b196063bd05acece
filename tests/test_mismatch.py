"""§5.3 domain mismatch (Koh & Liang 2017) on the real hospital data: ``upweight reproduce
mismatch``.

Measured (l2 = 1e-4, test child 1742): the 4 training children are the top 4 by |I_up,loss|, each
24.5–36.9× the largest non-child (paper: 30–40×); 12/127 coefficients are larger in magnitude than
the child indicator's (paper: 14/127); by |I_pert,loss| the child indicator ranks 2, 5, 2, 2 among
all 127 features (discharge_disposition_id_11 is first) but 1 among each child's non-zero features.
One run of the command (~18 s) serves every test.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import requires_data, shared_data
from upweight.cli.main import main
from upweight.paper import MismatchResult

DATA = shared_data("hospital")
NPZ = DATA / "hospital_koh2017.npz"

pytestmark = requires_data(NPZ, "the hospital data")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mismatch")
    rc = main(["reproduce", "mismatch", "--data", str(NPZ), "--out", str(out), "--no-progress"])
    return rc, out, json.loads((out / "results.json").read_text())


def test_cli_writes_figure_results_and_report(run):
    rc, out, r = run
    assert rc == 0
    for name in ("mismatch.png", "results.json", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "mismatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in (
        "children_kept",
        "top_indices",
        "children_ratio",
        "ratio_min",
        "coef_larger_than_child",
        "pert_child_rank",
        "test_index",
        "paper",
    ):
        assert key in r, key
    fields = {f.name for f in dataclasses.fields(MismatchResult)}
    assert fields - {"config"} | {"settings"} <= set(r)
    report = (out / "report.md").read_text()
    assert "| quantity | ours | paper |" in report and "30–40×" in report and "14/127" in report


def test_the_paper_setup(run):
    _, _, r = run
    assert len(r["children_original"]) == 24 and len(r["removed"]) == 20 and r["n_train"] == 19_980
    assert sorted(r["children_kept_labels"]) == [-1, 1, 1, 1]
    assert r["grad_norm"] < 1e-6
    # a misclassified child
    assert r["test_index"] == 1742 and r["test_label"] == -1 and r["test_score"] > 0


def test_the_four_children_are_the_top_four_by_abs_up_loss(run):
    _, _, r = run
    assert set(r["top_indices"][:4]) == set(r["children_kept"])
    assert all(r["top_is_child"][:4]) and not any(r["top_is_child"][4:])
    assert sorted(r["children_rank"]) == [1, 2, 3, 4]
    assert r["ratio_min"] > 20  # measured 24.5 (paper: 30–40)
    # −I_up,loss: the non-readmitted child helps the test child (label −1), the readmitted ones hurt
    # it
    for u, lab in zip(r["children_up_loss"], r["children_kept_labels"]):
        assert (-u > 0) == (lab == -1)


def test_the_coefficient_of_the_child_indicator_does_not_stand_out(run):
    _, _, r = run
    assert r["feature_names"][17] == "age_[0-10)"
    assert r["coef_larger_than_child"] >= 5  # measured 12 (paper: 14)


def test_pert_loss_points_at_the_child_indicator_among_the_childrens_features(run):
    rc, out, r = run
    assert r["pert_child_rank_active"] == [1, 1, 1, 1]
    assert all(rank <= 5 for rank in r["pert_child_rank"])  # measured 2, 5, 2, 2 among all 127
    # the report reads the ranks it got, not a sentence written for one run
    report = (out / "report.md").read_text()
    beaten = sum(rank > 1 for rank in r["pert_child_rank"])
    assert f"For {beaten} of the 4 children another feature" in report
    assert "Among the features each child actually has, age_[0-10) comes first." in report


def test_the_report_sentence_follows_the_ranks():
    """Where the child indicator comes first for every child, the report says so (the paper's
    reading) — and where it does not, it names what outscores it."""
    from types import SimpleNamespace

    from upweight.paper.cli.mismatch import _pert_reading

    names = [f"f{i}" for i in range(127)]
    names[17] = "age_[0-10)"
    first = SimpleNamespace(
        feature_names=names,
        pert_top_feature=["age_[0-10)"] * 4,
        pert_child_rank=[1, 1, 1, 1],
        pert_child_rank_active=[1, 1, 1, 1],
    )
    text = _pert_reading(first)
    assert "has the largest abs(I_pert,loss) for every child, as in the paper" in text
    assert "outscores" not in text
    second = SimpleNamespace(
        feature_names=names,
        pert_top_feature=["f3", "age_[0-10)", "f3", "f9"],
        pert_child_rank=[2, 1, 3, 2],
        pert_child_rank_active=[1, 1, 2, 1],
    )
    text = _pert_reading(second)
    assert "For 3 of the 4 children another feature (f3, f9) outscores age_[0-10)" in text
    assert "ranks 1, 1, 2, 1." in text and "comes first" not in text


def test_why_the_child_indicator_is_second_over_all_features(run):
    """The measured cause of the rank-2 gap (docs/reproduction/mismatch.md, "Why our numbers
    differ"): discharge_disposition_id_11 ("Expired") is never readmitted, so only the L2 term
    bounds its coefficient; it is the largest, none of the children has it, and I_pert,loss of a
    unit change of it outscores age_[0-10) over all 127 features."""
    import numpy as np

    _, _, r = run
    d = np.load(NPZ)
    names = list(d["feature_names"])
    j = names.index("discharge_disposition_id_11")
    X, y = d["X_train"], d["y_train"]
    expired = X[:, j] == 1
    assert expired.sum() > 100 and y[expired].sum() == 0  # 179, none readmitted
    assert not (expired & (X[:, names.index("age_[0-10)")] == 1)).any()  # no child has it
    assert r["coef_top_features"][0] == "discharge_disposition_id_11"
    assert r["pert_top_feature"] == ["discharge_disposition_id_11"] * 4


def test_stronger_l2_puts_the_child_indicator_first_but_flattens_the_ratio(run):
    """l2 = 1e-3 (10× the notebook's) shrinks that coefficient: age_[0-10) comes first over all
    127 features for some children, but the children stand out only 2–4× (measured 1.9–3.7×)
    instead of 30–40× — no l2 gives both of the paper's readings."""
    from upweight.datasets import load_hospital
    from upweight.paper import run_mismatch
    from upweight.paper.config import MismatchConfig

    _, _, r = run
    assert 1 not in r["pert_child_rank"]
    strong = run_mismatch(load_hospital(NPZ), MismatchConfig(l2=1e-3), progress=False)
    assert 1 in strong.pert_child_rank and "age_[0-10)" in strong.pert_top_feature
    assert strong.ratio_min < 5 < 20 < r["ratio_min"]
