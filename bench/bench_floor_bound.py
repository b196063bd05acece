#!/usr/bin/env python
"""Lower bounds on the whole exact-accuracy query, in units of the cost floor — the evidence behind
issue 4's "≤ 3× the floor on W1, ≤ 10× on W2" targets.

The query (``bench/peers/bench_peers.py``): I_up,loss of all n training points on K test points
(Koh & Liang 2017, Eq. 2), softmax regression with λ = 0.01, at Spearman ≥ 0.99 against the exact
closed-form answer. The floor: one per-sample-gradient sweep (upweight's ``iter_per_sample_grads``,
float32, timed as in the peer benchmark). With c = 10 classes, q = d + 1 inputs, p = c·q, every
method has to do at least:

* **scoring**: every training gradient gᵢ = rᵢ ⊗ x̃ᵢ against every sⱼ = H⁻¹∇L(z_test,ⱼ):
  ⟨gᵢ, sⱼ⟩ = rᵢᵀSⱼx̃ᵢ, the product X̃ [S₁ᵀ … S_Kᵀ] — n·q·cK multiply-adds, structured or not;
* **s_test**, one of
  - *direct*: H in closed form, ½c(c+1) weighted Gram blocks X̃ᵀdiag(w)X̃ (½c(c+1)·n·q²
    multiply-adds, as c products X̃ᵀ[w ⊙ X̃ …] of widths (c − i)·q) and a Cholesky solve of p × p;
  - *Krylov*: j* HVP passes over the data for the K vectors, each the two products X̃Vᵀ and WᵀX̃
    (2·n·q·cK multiply-adds), where j* is the fewest block-CG iterations whose scores reach mean
    Spearman ≥ 0.99 — measured here by stopping upweight's block CG after j = 1, 2, … iterations.

Each product is timed bare (torch, one thread, random matrices of the right shapes; the fastest
of ``--repeats`` runs after a warm-up, like the floor: the fastest of ``--floor-repeats`` sweeps;
both in a child process whose malloc does not page-fault big blocks in anew, ``timed_in_child``)
in float32, and in bfloat16 as the optimistic bound of a mixed-precision method (bfloat16
operands, float32 accumulation), with the j* of float32 — less precise products did not need
fewer iterations in our trial (block CG to rtol 1e-2 at n = 55,000: 7 iterations with bfloat16
HVPs, 5 with float32). The bound of a method is the sum of its bare products — no loss
evaluation, softmax, test gradients, solver bookkeeping or residual check — so any
implementation takes longer.

The block-CG curve and upweight's whole queries (``Influence(...).fit(train).up_loss(test)`` with
the library's defaults besides the solver: the ∇R check, test gradients, the residual check
included) run in the same child process as the floor and the products, so that all are timed the
same way. Each query is the fastest of ``--method-repeats`` runs after a warm-up; its ratio to the
bound of its kind is issue 24's target: ≤ 1.3× on W2 (block CG in float32 against the float32
Krylov bound, block CG with bfloat16 HVPs against the bfloat16 one), ≤ 1.5× on W1 (against a
direct bound: ``Direct()``, whose H and Cholesky factor are float64, against those products timed
in float64; ``Direct(dtype=torch.float32)`` and block CG against the float32 one; ``Direct()`` on
20 training points measures the part of its query that does not grow with n). On a CPU without
native bfloat16 arithmetic torch emulates bfloat16 products, whose speed then depends on their
shapes: upweight's chunked products can beat the bare whole-matrix ones, and the bfloat16 "bound"
is no lower bound there (a ratio below 1 says so).

Usage (from the repository root; needs MNIST)::

    .venv/bin/python bench/bench_floor_bound.py --out bench/RESULTS.md      # make bench-floor-bound
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import upweight as uw
from upweight import InfluenceScores
from upweight.core.curvature import Curvature
from upweight.solvers.base import InverseHVPSolver

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from _sections import embed_json, read_sections, replace_section  # noqa: E402
from bench_peers import (  # noqa: E402
    L2,
    closed_form_reference,
    load_workload,
    render_summary,
    time_floor,
    train,
)
from bench_solvers import machine_info  # noqa: E402

SECTION = "floor-bound"
ACCURATE = 0.99
TARGETS = {"W1": 3.0, "W2": 10.0}
#: issue 24: a whole query within this many times the bound of its kind
BOUND_TARGETS = {"W1": 1.5, "W2": 1.3}
C = 10  # classes
#: training points of the query that measures Direct's cost apart from the work that grows with n
SETUP_POINTS = 20


def bare_time(fn, repeats: int) -> float:
    """Fewest seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def product_times(
    n: int, q: int, k: int, dtype: torch.dtype, repeats: int, direct: bool
) -> dict[str, float]:
    """Seconds of the bare products: ``score`` X̃ (n, q) @ (q, cK); ``pass`` X̃Vᵀ and WᵀX̃ of one
    HVP pass for K vectors; with ``direct``, ``H`` the c products X̃ᵀ (n, (c − i)·q) of the
    closed-form Hessian and ``chol`` a Cholesky factorisation and solve of p × p with K right-hand
    sides."""
    gen = torch.Generator().manual_seed(0)
    A = torch.rand(n, q, generator=gen).to(dtype)
    V = torch.randn(C * k, q, generator=gen).to(dtype)
    U = torch.randn(n, C * k, generator=gen).to(dtype)
    out = {
        "score": bare_time(lambda: A @ V.T, repeats),
        "pass": bare_time(lambda: (A @ V.T, U.T @ A), repeats),
    }
    if direct:
        B = torch.randn(n, C * q, generator=gen).to(dtype)
        out["H"] = bare_time(lambda: [A.T @ B[:, : (C - i) * q] for i in range(C)], repeats)
        p = C * q
        M = torch.randn(p, p, generator=gen).to(dtype)
        H = M @ M.T / p + torch.eye(p, dtype=dtype)
        R = torch.randn(p, k, generator=gen).to(dtype)
        out["chol"] = bare_time(lambda: torch.cholesky_solve(R, torch.linalg.cholesky(H)), repeats)
    return out


def spearman(values: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rho = [scipy.stats.spearmanr(values[j], ref[j])[0] for j in range(len(ref))]
    return float(np.mean(rho)), float(np.min(rho))


def cg_curve(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    ref: np.ndarray,
    max_iter: int,
) -> list[tuple[int, float, float, float]]:
    """(j, seconds, mean Spearman, min Spearman) of upweight's block CG stopped after j iterations,
    float32, for j = 1, 2, … until the mean Spearman reaches 0.99 (at most ``max_iter``)."""

    def query(j: int) -> np.ndarray:
        inf = uw.Influence(
            uw.Objective(model, "cross_entropy", l2=L2),
            solver=uw.CG(rtol=1e-12, maxiter=j, block=True),
            progress=False,
            on_inaccurate="warn",
            grad_tol=1e9,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf.fit(uw.Data.from_any((X, y)))
            return np.asarray(inf.up_loss((Xt, yt)).values, np.float64)

    query(1)  # one-off costs (torch.func tracing, lazy imports) stay out of the curve
    rows = []
    for j in range(1, max_iter + 1):
        t0 = time.perf_counter()
        values = query(j)
        secs = time.perf_counter() - t0
        mean, low = spearman(values, ref)
        rows.append((j, secs, mean, low))
        print(
            f"    block CG stopped after {j}: {secs:.2f} s, Spearman {mean:.4f} (min {low:.4f})",
            file=sys.stderr,
            flush=True,
        )
        if mean >= ACCURATE:
            break
    return rows


class SubsampledHessian:
    """A preconditioner for ``CG`` (the ``Preconditioner`` protocol), tried here and not shipped:
    M = the damped Hessian of m training points drawn at random, H_m = (1/m)Σ_{i∈S}∇²L(zᵢ) + (λ +
    δ)I, formed in closed form (``Curvature.dense``) and Cholesky-factorised once per fit; M⁻¹R by
    two triangular solves. Cheaper than H where m ≪ n; it pays only if it removes more full-data
    HVP passes than forming and factorising it costs."""

    name = "SubsampledHessian"

    def __init__(self, m: int, seed: int = 0) -> None:
        self.m, self.seed = m, seed

    def prepare_preconditioner(self, curvature: Curvature) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        rows = torch.randperm(curvature.n, generator=gen)[: self.m]
        sub = Curvature(curvature.objective, curvature.data.subset(rows), damping=curvature.damping)
        return torch.linalg.cholesky(sub.dense())

    def precondition(self, state: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(R.T.to(state.dtype), state).T.to(R.dtype)


#: the whole queries timed per workload: label → (solver factory, kind of bound it is held to)
METHODS: dict[str, tuple[Callable[[], InverseHVPSolver], str]] = {
    "Direct()": (lambda: uw.Direct(), "direct, float64"),
    "Direct(dtype=torch.float32)": (lambda: uw.Direct(dtype=torch.float32), "direct"),
    "CG(rtol=1e-2, block=True)": (lambda: uw.CG(rtol=1e-2, block=True), "float32"),
    "CG(rtol=1e-2, block=True, hvp_dtype=torch.bfloat16)": (
        lambda: uw.CG(rtol=1e-2, block=True, hvp_dtype=torch.bfloat16),
        "bfloat16",
    ),
    "CG(rtol=1e-2, block=True, preconditioner=SubsampledHessian(2000))": (
        lambda: uw.CG(rtol=1e-2, block=True, preconditioner=SubsampledHessian(2000)),
        "float32",
    ),
}


def methods_for(name: str) -> list[tuple[str, str]]:
    """(label, kind of bound) of the whole queries timed for workload ``name``."""
    labels = (
        ["Direct()", "Direct(dtype=torch.float32)", "CG(rtol=1e-2, block=True)"]
        if name == "W1"
        else [label for label in METHODS if not label.startswith("Direct(")]
    )
    return [(label, METHODS[label][1]) for label in labels]


def make_solver(label: str) -> InverseHVPSolver:
    return METHODS[label][0]()


def whole_query(
    label: str, state: dict, n: int | None = None
) -> Callable[[], tuple[float, InfluenceScores]]:
    """The whole query with the solver ``label`` (the library's other defaults) on the first ``n``
    training points (``None``: all), as a function returning (seconds, scores)."""
    model = torch.nn.Linear(state["X"].shape[1], C).eval()
    with torch.no_grad():
        model.weight.copy_(state["params"]["weight"])
        model.bias.copy_(state["params"]["bias"])
    train_data = uw.Data.from_any((state["X"][:n], state["y"][:n]))

    def query() -> tuple[float, InfluenceScores]:
        inf = uw.Influence(
            uw.Objective(model, "cross_entropy", l2=L2),
            solver=make_solver(label),
            progress=False,
            on_inaccurate="warn",
        )
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = inf.fit(train_data).up_loss((state["Xt"], state["yt"]))
        return time.perf_counter() - t0, scores

    return query


def time_method(label: str, state: dict, ref: np.ndarray, repeats: int) -> dict:
    """The whole query with the solver ``label``: fastest of ``repeats`` runs after a warm-up, its
    iterations and Spearman against ``ref``."""
    query = whole_query(label, state)
    query()
    runs = [query() for _ in range(repeats)]
    secs, scores = min(runs, key=lambda r: r[0])
    mean, low = spearman(np.asarray(scores.values, np.float64), ref)
    print(f"    {label}: {secs:.3f} s, Spearman {mean:.4f} (min {low:.4f})", file=sys.stderr)
    return {
        "seconds": secs,
        "all_seconds": [r[0] for r in runs],
        "iterations": scores.provenance.get("iterations"),
        "spearman": mean,
        "spearman_min": low,
    }


def timed_in_child(state: dict, n: int, q: int, k: int, args: argparse.Namespace) -> dict:
    """The floor sweeps, the bare products, the block-CG curve and upweight's whole queries, timed
    in a fresh process (``--child``) whose glibc malloc neither serves big blocks by mmap nor trims
    the heap (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` = 4 GiB): otherwise each
    timing depends on what the process allocated before — the same W2 sweep took 0.19 s (peer
    benchmark, after training), 0.40–0.46 s (after this script's training and reference, or in a
    fresh process) and at n = 55,000 0.49 s or 0.89 s — and a floor inflated by page faults would
    make the bounds look lower than they are."""
    with tempfile.TemporaryDirectory(prefix="floor-bound-") as tmp:
        path = os.path.join(tmp, "state.pt")
        torch.save({**state, "n": n, "q": q, "k": k}, path)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            path,
            "--repeats",
            str(args.repeats),
            "--floor-repeats",
            str(args.floor_repeats),
            "--method-repeats",
            str(args.method_repeats),
            "--max-iter",
            str(args.max_iter),
        ]
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": str(2**32),
            "MALLOC_TRIM_THRESHOLD_": str(2**32),
        }
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(path: str, args: argparse.Namespace) -> None:
    """``--child``: time the floor and the bare products for the state in ``path``; print them as
    JSON."""
    state = torch.load(path, weights_only=True)  # tensors, str and numbers: no code unpickled
    n, q, k = state["n"], state["q"], state["k"]
    floors = time_floor(state, repeats=args.floor_repeats)
    # forming H bare is timed where it takes seconds at most
    direct = C * q <= 10_000 and n * q * q * 55 <= 2e11
    f32 = product_times(n, q, k, torch.float32, args.repeats, direct)
    bf16 = product_times(n, q, k, torch.bfloat16, args.repeats, direct=False)
    ref = state["ref"].numpy()
    model = torch.nn.Linear(state["X"].shape[1], C).eval()
    with torch.no_grad():
        model.weight.copy_(state["params"]["weight"])
        model.bias.copy_(state["params"]["bias"])
    curve = cg_curve(model, state["X"], state["y"], state["Xt"], state["yt"], ref, args.max_iter)
    methods = {
        label: time_method(label, state, ref, args.method_repeats)
        for label, _ in methods_for(state["name"])
        if not label.startswith("Direct(") or direct
    }
    out = {"floors": floors, "f32": f32, "bf16": bf16, "curve": curve, "methods": methods}
    if direct:
        out["f64"] = product_times(n, q, k, torch.float64, args.repeats, direct)
        # the part of Direct's query that does not grow with n (besides the Cholesky at p)
        small = whole_query("Direct()", state, SETUP_POINTS)
        small()
        out["setup_seconds"] = min(small()[0] for _ in range(args.method_repeats))
    print(json.dumps(out))


def run_workload(spec: str, k: int, args: argparse.Namespace) -> dict:
    ns = argparse.Namespace(n_test=k, mnist=args.mnist, n_train=20000)
    wl = load_workload(spec, ns)
    n, d = wl.X.shape
    q = d + 1
    print(f"{wl.title}: n = {n:,}, p = {C * q:,}, K = {k}", flush=True)
    W, b, _ = train(wl)
    ref = closed_form_reference(wl, W, b)
    model = torch.nn.Linear(d, C).eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    state = {
        "arch": "linear",
        "params": {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone()},
        "X": torch.from_numpy(wl.X).float(),
        "y": torch.from_numpy(wl.y),
        "Xt": torch.from_numpy(wl.Xt).float(),
        "yt": torch.from_numpy(wl.yt),
        "l2": L2,
        "ref": torch.from_numpy(np.ascontiguousarray(ref)),
        "name": spec.split(":")[0].upper(),
    }
    timings = timed_in_child(state, n, q, k, args)
    floors, f32, bf16 = timings["floors"], timings["f32"], timings["bf16"]
    floor = min(floors)  # the cheapest sweep: what the work costs, not the allocator's slow mode
    print(
        f"  floor {floor:.4f} s (median {statistics.median(floors):.4f} s); float32 {f32}; bfloat16"
        f" {bf16}",
        flush=True,
    )
    curve = [tuple(row) for row in timings["curve"]]
    j_star = curve[-1][0] if curve[-1][2] >= ACCURATE else None
    return {
        "key": wl.key,
        "title": wl.title,
        "name": spec.split(":")[0].upper(),
        "n": n,
        "q": q,
        "k": k,
        "floor": floor,
        "floor_median": statistics.median(floors),
        "floor_repeats": len(floors),
        "f32": f32,
        "bf16": bf16,
        "f64": timings.get("f64"),
        "setup_seconds": timings.get("setup_seconds"),
        "curve": curve,
        "j_star": j_star,
        "methods": timings["methods"],
    }


def lower_bounds(r: dict) -> list[tuple[str, float]]:
    """(method, seconds) of each lower bound of workload ``r``: the sum of the bare products it
    needs."""
    f32, bf, j = r["f32"], r["bf16"], r["j_star"]
    out = []
    if "H" in f32:
        out.append(("direct (H + Cholesky + scoring), float32", bound_of(r, "direct")))
    if r.get("f64"):
        out.append(
            (
                "direct in float64, Direct()'s dtype (H and Cholesky; scoring in the model's)",
                bound_of(r, "direct, float64"),
            )
        )
    if j is not None:
        out.append((f"Krylov, j* = {j} passes + scoring, float32", j * f32["pass"] + f32["score"]))
        out.append((f"Krylov, j* = {j} passes + scoring, bfloat16", j * bf["pass"] + bf["score"]))
    return out


def bound_of(r: dict, kind: str) -> float | None:
    """Seconds of workload ``r``'s bound of ``kind``: "direct" (float32), "direct, float64" (H and
    its Cholesky in float64, the scoring in the model's float32), or "float32" / "bfloat16"
    (Krylov)."""
    f32, bf, j = r["f32"], r["bf16"], r["j_star"]
    if kind == "direct":
        return f32["H"] + f32["chol"] + f32["score"] if "H" in f32 else None
    if kind == "direct, float64":
        f64 = r.get("f64")
        return f64["H"] + f64["chol"] + f32["score"] if f64 else None
    if j is None:
        return None
    prod = f32 if kind == "float32" else bf
    return j * prod["pass"] + prod["score"]


def target_rows(r: dict) -> list[dict]:
    """Issue 24's targets for workload ``r``: each timed query against the bound of its kind (W1:
    a direct bound for every method, as the target names it — Direct() against the one in its own
    float64, the others against the float32 one)."""
    limit = BOUND_TARGETS.get(r["name"])
    rows = []
    for label, kind in methods_for(r["name"]):
        m = r.get("methods", {}).get(label)
        if m is None or limit is None:
            continue
        against = kind if kind.startswith("direct") else "direct" if r["name"] == "W1" else kind
        bound = bound_of(r, against)
        ratio = None if bound is None else m["seconds"] / bound
        # the same products at the iterations the method took: its overhead, apart from how many
        # more iterations than j* its stopping rule needed
        prod = r["bf16"] if kind == "bfloat16" else r["f32"]
        its = m["iterations"]
        own = its * prod["pass"] + prod["score"] if not kind.startswith("direct") and its else None
        accurate = m["spearman"] >= ACCURATE
        rows.append(
            {
                "method": label,
                "against": against,
                "seconds": m["seconds"],
                "iterations": m["iterations"],
                "spearman": m["spearman"],
                "spearman_min": m["spearman_min"],
                "bound": bound,
                "ratio": ratio,
                "ratio_at_iterations": None if own is None else m["seconds"] / own,
                "limit": limit,
                "met": bool(accurate and ratio is not None and ratio <= limit),
            }
        )
    return rows


def summary_data(results: list[dict]) -> dict:
    """What ``bench/peers/bench_peers.py``'s summary quotes, per peer-benchmark workload key: the
    floor and the lowest bound in float32 and overall (bfloat16 included), in units of the floor."""
    out = {}
    for r in results:
        b = lower_bounds(r)
        f32 = [s for what, s in b if "float32" in what]
        out[r["key"]] = {
            "floor_s": r["floor"],
            "j_star": r["j_star"],
            "bound_float32": min(f32) / r["floor"] if f32 else None,
            "bound_any": min(s for _, s in b) / r["floor"] if b else None,
            "targets": target_rows(r),
        }
    return out


def render(results: list[dict], machine: dict[str, str], command: str) -> str:
    lines = [
        (
            "## Lower bounds of the exact-accuracy query against the cost floor (issue 4: ≤ 3× / ≤"
            " 10× the floor), and upweight's queries against them (issue 24: ≤ 1.3× / ≤ 1.5× the"
            " bound)"
        ),
        "",
    ]
    for para in __doc__.split("\n\n")[1:5]:
        lines += [para.strip("\n"), ""]
    lines += [f"Command: `{command}`", "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    for r in results:
        fl, f32, bf, f64 = r["floor"], r["f32"], r["bf16"], r.get("f64") or {}
        target = TARGETS.get(r["name"], float("nan"))
        lines += [
            "",
            f"### {r['title']}" + ("" if "K =" in r["title"] else f", K = {r['k']}"),
            "",
            (
                f"n = {r['n']:,}, q = d + 1 = {r['q']}, p = {C * r['q']:,}, K = {r['k']}; cost"
                f" floor {fl * 1e3:.1f} ms (fastest of {r['floor_repeats']} sweeps; median"
                f" {r['floor_median'] * 1e3:.1f} ms); target ≤ {target:g}× the floor ="
                f" {target * fl * 1e3:.1f} ms."
            ),
            "",
            (
                "| upweight's block CG stopped after j iterations (float32) | seconds | × floor |"
                " Spearman mean (min) |"
            ),
            "|---|--:|--:|--:|",
        ]
        lines += [
            f"| j = {j} | {s:.3f} | {s / fl:.1f} | {m:.4f} ({lo:.4f}) |"
            for j, s, m, lo in r["curve"]
        ]
        j = r["j_star"]
        lines += [
            "",
            "| bare products | float32 ms | bfloat16 ms | float64 ms | × floor (float32) |",
            "|---|--:|--:|--:|--:|",
            (
                f"| scoring: X̃ (n, q) @ (q, cK) | {f32['score'] * 1e3:.1f} |"
                f" {bf['score'] * 1e3:.1f} | – | {f32['score'] / fl:.1f} |"
            ),
            (
                f"| one HVP pass for K vectors: X̃Vᵀ and WᵀX̃ | {f32['pass'] * 1e3:.1f} |"
                f" {bf['pass'] * 1e3:.1f} | – | {f32['pass'] / fl:.1f} |"
            ),
        ]
        if "H" in f32:
            h64, chol64 = (f"{f64[key] * 1e3:.1f}" if key in f64 else "–" for key in ("H", "chol"))
            lines += [
                (
                    f"| closed-form H: c products X̃ᵀ (n, (c − i)·q) | {f32['H'] * 1e3:.1f} | – |"
                    f" {h64} | {f32['H'] / fl:.1f} |"
                ),
                (
                    f"| Cholesky + solve, p × p, K right-hand sides | {f32['chol'] * 1e3:.1f} | – |"
                    f" {chol64} | {f32['chol'] / fl:.1f} |"
                ),
            ]
        bounds = lower_bounds(r)
        lines += ["", "| lower bound | ms | × floor | target |", "|---|--:|--:|---|"]
        for what, secs in bounds:
            ok = "within" if secs <= target * fl else "**above**"
            lines.append(f"| {what} | {secs * 1e3:.1f} | {secs / fl:.1f} | {ok} ≤ {target:g}× |")
        if j is None:
            lines.append(
                f"| Krylov | – | – | block CG did not reach Spearman {ACCURATE} in"
                f" {len(r['curve'])} iterations |"
            )
        rows = target_rows(r)
        if rows:
            lines += [
                "",
                (
                    "| upweight's whole query (issue 24) | seconds | iterations | Spearman mean"
                    " (min) | bound | ms | × bound | × its products | target |"
                ),
                "|---|--:|--:|--:|---|--:|--:|--:|---|",
            ]
            for t in rows:
                ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}"
                own = t["ratio_at_iterations"]
                bound_ms = "–" if t["bound"] is None else f"{t['bound'] * 1e3:.1f}"
                lines.append(
                    f"| `{t['method']}` | {t['seconds']:.3f} | {t['iterations'] or '–'} |"
                    f" {t['spearman']:.4f} ({t['spearman_min']:.4f}) | {t['against']} |"
                    f" {bound_ms} | {ratio} | {'–' if own is None else f'{own:.2f}'} |"
                    f" {'**met**' if t['met'] else 'not met'} ≤ {t['limit']:g}× |"
                )
            setup = r.get("setup_seconds")
            if setup is not None and f64:
                lines += [
                    "",
                    (
                        f"`Direct()` on the first {SETUP_POINTS} training points takes"
                        f" {setup * 1e3:.1f} ms: the part of the query that does not grow with n."
                        f" Of it, the bare float64 Cholesky and solve at p take"
                        f" {f64['chol'] * 1e3:.1f} ms; the other {(setup - f64['chol']) * 1e3:.1f}"
                        " ms are set-up and checks that no bound counts (validating the data,"
                        " the structured path's probes, the ∇R check, test gradients, the"
                        " residual check)."
                    ),
                ]
            lines += [
                "",
                (
                    "*× its products*: the query's time over the bare products of the iterations it"
                    " took (and the scoring), i.e. its overhead apart from stopping later than j*."
                    " Why a residual-based stop comes after j*, iteration by iteration and in"
                    " exact arithmetic too: section `cg-stopping` (`make bench-cg-stopping`)."
                ),
            ]
    lines += ["", embed_json({"bounds": summary_data(results)})]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist", default="../shared/data/mnist/mnist.npz", help="mnist.npz")
    ap.add_argument(
        "--workloads",
        default="W1:100,W2:20000:10,W2:55000:100",
        help="comma-separated WORKLOAD[:n]:K (W1:K, W2:n:K)",
    )
    ap.add_argument(
        "--repeats", type=int, default=5, help="runs of each bare product (the fastest counts)"
    )
    ap.add_argument(
        "--floor-repeats",
        type=int,
        default=10,
        help="per-sample-gradient sweeps (the fastest counts)",
    )
    ap.add_argument("--max-iter", type=int, default=15, help="stop the block-CG curve here")
    ap.add_argument(
        "--method-repeats",
        type=int,
        default=3,
        help="timed runs of each whole query after a warm-up (the fastest counts)",
    )
    ap.add_argument(
        "--out", default=None, help=f"Markdown file whose section {SECTION!r} is (re)written"
    )
    # a state file: time it, print JSON
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        child(args.child, args)
        return
    machine = machine_info(threads_set=True)
    results = []
    for item in args.workloads.split(","):
        parts = item.split(":")
        results.append(run_workload(":".join(parts[:-1]), int(parts[-1]), args))
    text = render(
        results, machine, "python bench/bench_floor_bound.py " + " ".join(argv or sys.argv[1:])
    )
    print(text)
    if args.out:
        replace_section(args.out, SECTION, text)
        if "peers-summary" in read_sections(args.out):  # it quotes this section's bounds
            replace_section(args.out, "peers-summary", render_summary(Path(args.out)))


if __name__ == "__main__":
    main()
