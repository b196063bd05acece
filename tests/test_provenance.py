"""``Provenance``: its fields are what the solver and ``Influence`` really used; it reads as the
flat mapping of the same keys (``solver_*`` included); ``save``/``load`` round-trip it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np
import pytest
import torch

import upweight as uw
from upweight.errors import InputError
from upweight.influence.provenance import Provenance

OLD_KEYS = {
    "solver",
    "damping",
    "curvature",
    "l2",
    "p",
    "dtype",
    "grad_norm",
    "seconds",
    "residual_max",
    "iterations",
    "solve_seconds",
    "max_residual_accepted",
    "accepted",
}


@pytest.fixture(scope="module")
def fitted(small_logreg):
    model, l2, train, test = small_logreg
    solver, damping, bound = uw.CG(rtol=1e-10), 0.01, 1e-6
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2),
        solver=solver,
        damping=damping,
        max_residual=bound,
        progress=False,
    ).fit(train)
    tests = (test[0][:3], test[1][:3])
    return inf, model, l2, train, tests, solver, damping, bound


def _explicit_hessian(model, l2, train, damping):
    """(H + δI) in float64 from the closed form: (1/n)Σσ(s)σ(−s)xxᵀ + (l2 + δ)I (logistic loss)."""
    X = train[0]
    s = X @ model.weight.detach().reshape(-1)
    w = torch.sigmoid(s) * torch.sigmoid(-s)
    return (X * w[:, None]).T @ X / len(X) + (l2 + damping) * torch.eye(
        X.shape[1], dtype=torch.float64
    )


def test_fields_are_what_the_solver_and_influence_used(fitted):
    inf, model, l2, train, tests, solver, damping, bound = fitted
    scores = inf.up_loss(tests)
    prov = scores.provenance
    assert isinstance(prov, Provenance)
    assert prov.solver == solver.config() and prov.solver["rtol"] == 1e-10
    assert prov.damping == damping and prov.l2 == l2 and prov.p == model.weight.numel()
    assert prov.dtype == "torch.float64" and prov.curvature == inf.curvature_.describes
    assert prov.grad_norm == inf.grad_norm_ and prov.seconds > 0
    assert prov.max_residual_accepted == bound
    # the recorded residual: the s_test solve's relative residual ‖(H+δI)x − g‖/‖g‖, per test point
    sol = inf.s_test(tests)
    assert prov.residual_max == pytest.approx(sol.max_residual, rel=1e-6, abs=1e-15)
    A, G = _explicit_hessian(model, l2, train, damping), inf.test_grads(tests)
    measured = ((sol.value @ A - G).norm(dim=1) / G.norm(dim=1)).max().item()
    assert prov.residual_max == pytest.approx(measured, rel=1e-2, abs=1e-13)
    assert prov.residual_max <= bound and prov.accepted is True
    assert prov.iterations == sol.iterations and prov.solve_seconds > 0
    untimed = {
        k: v for k, v in sol.stats.items() if not k.endswith("seconds")
    }  # timings differ per solve
    assert {k: prov.solver_stats[k] for k in untimed} == untimed and set(prov.solver_stats) == set(
        sol.stats
    )
    assert prov.accuracy is None and prov.extras == {}  # an exact solver's residual says it all


def test_mapping_view_keeps_the_flat_keys(fitted):
    inf, *_ = fitted
    auto = uw.Influence(inf.objective, solver=uw.Auto(), damping=inf.damping, progress=False).fit(
        inf.data_
    )
    prov = auto.up_loss(fitted[4]).provenance
    assert isinstance(prov, Mapping)
    stats = prov.solver_stats
    assert stats["chosen"] == "direct"  # p = 49: Auto factorises H
    assert OLD_KEYS | {f"solver_{k}" for k in stats} <= set(prov)
    assert prov["solver_reason"] == stats["reason"] and prov["residual_max"] == prov.residual_max
    assert prov["solver"] == prov.solver and prov.get("solver_chosen") == "direct"
    assert len(prov) == len(list(prov)) and "solver_stats" not in prov and "extras" not in prov
    assert prov == dict(prov)  # equal to the flat dict results carried
    with pytest.raises(TypeError):
        prov["damping"] = 1.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        prov.damping = 1.0  # type: ignore[misc]
    assert Provenance.from_mapping(dict(prov)) == prov  # the flat view describes the record fully


def test_save_load_round_trips(fitted, tmp_path):
    inf, *_, tests, _, _, _ = fitted
    scores = inf.up_loss(tests)
    path = tmp_path / "scores.npz"
    scores.save(path)
    back = uw.InfluenceScores.load(path)
    assert isinstance(back.provenance, Provenance) and back.provenance == scores.provenance
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
    assert meta["provenance"]["solver_stats"] == json.loads(
        json.dumps(dict(scores.provenance.solver_stats))
    )

    tagged = dataclasses.replace(
        scores, provenance=scores.provenance.with_extras(index_seconds=1.5, orders=[1, 2])
    )
    tagged.save(tmp_path / "tagged.npz")
    again = uw.InfluenceScores.load(tmp_path / "tagged.npz").provenance
    assert again.extras == {"index_seconds": 1.5, "orders": [1, 2]} and again["orders"] == [1, 2]
    assert again == tagged.provenance


def test_a_file_in_the_flat_format_still_loads(tmp_path):
    flat = {
        "solver": {"name": "auto", "rtol": 1e-6},
        "damping": 0.0,
        "l2": 0.01,
        "p": 3,
        "dtype": "torch.float64",
        "grad_norm": 1e-12,
        "seconds": 0.5,
        "residual_max": 1e-14,
        "iterations": 1,
        "solve_seconds": 0.1,
        "max_residual_accepted": None,
        "accepted": None,
        "solver_chosen": "direct",
        "solver_reason": "p small",
        "query_rank": 2,
    }
    meta = json.dumps({"n_train": 5, "kind": "up_loss", "provenance": flat})
    np.savez(
        tmp_path / "old.npz",
        values=np.zeros((1, 5)),
        test_ids=np.arange(1),
        train_ids=np.arange(5),
        meta=np.array(meta),
    )
    prov = uw.InfluenceScores.load(tmp_path / "old.npz").provenance
    assert isinstance(prov, Provenance) and dict(prov) == flat
    assert prov.solver_stats == {"chosen": "direct", "reason": "p small"} and prov.extras == {
        "query_rank": 2
    }
    assert (
        prov.residual_max == 1e-14 and prov.accepted is None and prov.max_residual_accepted is None
    )


def test_results_keep_their_extras(fitted):
    inf, *_, tests, _, _, _ = fitted
    group = inf.group_influence(tests, [[0, 1, 2], [3, 4]], order=2)
    assert group.provenance.extras["order"] == 2 and group.provenance["n_groups"] == 2
    assert (
        group.provenance.extras["third_derivative"] is False
        and group.provenance.damping == inf.damping
    )
    fast = uw.fastif_up_loss(inf, tests, uw.KNNPrefilter(k=5))
    assert fast.provenance.extras["k"] == 5 and fast.provenance["index_seconds"] >= 0
    removal = inf.removal_effect_newton(tests, [0, 1])
    assert "Gauss–Newton" in removal.provenance.extras["point_curvature"]
    assert removal.provenance["block_solves"] == removal.provenance.extras["block_solves"]


def test_extras_cannot_hide_a_field():
    with pytest.raises(InputError):
        Provenance(extras={"residual_max": 1.0})
    with pytest.raises(InputError):
        Provenance().with_extras(solver_reason="x")


def test_a_hand_made_mapping_becomes_a_provenance():
    scores = uw.InfluenceScores(
        np.zeros((1, 2)), np.arange(1), np.arange(2), 2, provenance={"note": "x"}
    )
    assert isinstance(scores.provenance, Provenance) and scores.provenance == {"note": "x"}
    assert scores.provenance.extras == {"note": "x"}


def test_provenance_is_the_plain_dict_results_always_carried_and_read_only():
    """``json.dumps``, ``dict(...)``, ``isinstance(..., dict)`` and copies treat it as the flat
    dict of keys; writing to it is refused."""
    import copy

    prov = Provenance(
        solver={"name": "cg", "rtol": 1e-6},
        damping=0.1,
        residual_max=2e-7,
        iterations=4,
        solver_stats={"reason": "small"},
        extras={"order": 2},
    )
    assert isinstance(prov, dict)
    flat = json.loads(json.dumps(prov))
    assert flat["damping"] == 0.1 and flat["solver_reason"] == "small" and flat["order"] == 2
    assert flat["solver"] == {"name": "cg", "rtol": 1e-6} and flat == dict(prov)
    assert copy.deepcopy(prov) == prov and copy.copy(prov) is prov
    for write in (
        lambda: prov.__setitem__("damping", 1.0),
        lambda: prov.update(damping=1.0),
        lambda: prov.pop("damping"),
        prov.clear,
    ):
        with pytest.raises(TypeError, match="read-only"):
            write()
    assert prov["damping"] == 0.1
