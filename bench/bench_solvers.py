#!/usr/bin/env python
"""Solver benchmark: wall time and accuracy of Direct, CG and LiSSA for I_up,loss.

Workloads (multinomial logistic regression with bias, λ = l2 = 0.01):

* W1 ``digits``: scikit-learn's 8×8 digits, pixels / 16, first 1,500 rows train, the rest test
  (p = 65 · 10 = 650).
* W2 ``mnist``: real MNIST, the Koh & Liang (2017) split — train = rows 5,000..59,999 of the
  official training set (n = 55,000), pixels / 255, flattened (p = 785 · 10 = 7,850).

For each workload the model is first trained to the minimum with ``uw.refit`` (float64 L-BFGS,
‖∇R‖∞ ≤ 1e-9; timed separately). Then, for the first 10 test points, the influence of every
training point, I_up,loss (n_test × n_train), is computed by each solver; each row reports

* wall time of ``Influence.fit`` (prepare: ∇R check + solver prepare, e.g. the dense Hessian and
  Cholesky for Direct, λmax for LiSSA) and of ``up_loss`` (split into the inverse-HVP solve,
  including the library's residual check, and the scoring sweep over the training gradients);
* the ratio of the total to one per-sample-gradient sweep over the training set (the cost floor:
  any method must compute every ∇θL(zᵢ) once);
* Spearman and Pearson correlation of each test row against the exact reference (mean and min
  over the 10 test points), the relative L2 error of the scores, and the solver's measured
  relative residual ‖(H + λI)x − v‖ / ‖v‖ (max over the 10 right-hand sides).

The reference is Direct on a float64 model (dense float64 Hessian + Cholesky). Speed rows run
on a float32 copy of the trained model (the engine computes in the model's dtype; Direct still
forms and factorises H in float64).

Usage (from the repository root)::

    .venv/bin/python bench/bench_solvers.py --out bench/RESULTS.md          # full (make bench)
    .venv/bin/python bench/bench_solvers.py --quick                         # < ~1 min smoke run

``--quick`` subsamples MNIST to n = 5,000, cuts LiSSA's depth, uses CG (rtol 1e-10, float64) as
the MNIST reference and skips the Direct speed row where p > 2,000 (forming a 7,850² Hessian
alone takes about a minute on 2 cores), and writes to bench/RESULTS-quick.md by default.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy
import scipy.stats
import torch

import upweight as uw
from upweight.core.grads import grad_chunk_size, iter_per_sample_grads

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_sections.py, bench/_machine.py
from _machine import bfloat16_support  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
L2 = 0.01
N_TEST = 10
SWEEP_CHUNK = 2048  # = Influence's default batch_size, so the floor uses the chunks the scorer uses
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ── machine ──────────────────────────────────────────────────────────────────────────────
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info(threads_set: bool = False) -> dict[str, str]:
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    if cpu == "unknown":
        cpu = platform.processor() or platform.machine()
    mem = "unknown"
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
            break
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit = (commit or "unknown") + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "CPU": cpu,
        "bfloat16 arithmetic": bfloat16_support(),
        "cores": f"{os.cpu_count()} logical, {affinity} usable by this process",
        "RAM": mem,
        "torch": (
            f"{torch.__version__} (intra-op threads: {torch.get_num_threads()}, "
            + ("set by --threads)" if threads_set else "default)")
        ),
        "numpy / scipy": f"{np.__version__} / {scipy.__version__}",
        "Python": f"{platform.python_version()} on {platform.platform()}",
        "upweight": f"{uw.__version__}, git {commit}",
        "load average at start": (
            " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        ),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ── workloads ────────────────────────────────────────────────────────────────────────────
@dataclass
class Workload:
    key: str
    title: str
    source: str
    X_train: np.ndarray  # float64 (n, d)
    y_train: np.ndarray  # int64 (n,)
    X_test: np.ndarray  # float64 (m, d), the full test set (accuracy); the first N_TEST are scored
    y_test: np.ndarray
    lissa: list[tuple[str, int, int, int]]  # (label, repeats r, depth t, batch size)
    reference: str  # "direct" or "cg"
    run_direct_row: bool
    notes: list[str] = field(default_factory=list)


def load_digits_workload(args: argparse.Namespace) -> Workload:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.data.astype(np.float64) / 16.0
    y = d.target.astype(np.int64)
    n_tr = 1500
    if args.quick:
        lissa = [
            ("depth cut for --quick", 10, 200, args.lissa_batch),
            ("cheap", 1, 100, args.lissa_batch),
        ]
    else:
        lissa = [("paper's r, t", 10, 5000, args.lissa_batch), ("cheap", 1, 1000, args.lissa_batch)]
    return Workload(
        key="digits",
        title="W1 — scikit-learn digits (8×8)",
        source="sklearn.datasets.load_digits; X/16; train = rows 0..1499, test = rows 1500..1796",
        X_train=X[:n_tr],
        y_train=y[:n_tr],
        X_test=X[n_tr:],
        y_test=y[n_tr:],
        lissa=lissa,
        reference=args.reference if args.reference != "auto" else "direct",
        run_direct_row=True,
    )


def load_mnist_workload(args: argparse.Namespace) -> Workload:
    path = Path(args.mnist)
    if not path.is_absolute():
        path = (REPO / path) if (REPO / path).exists() or not path.exists() else path
    path = path.resolve()
    with np.load(path) as f:
        x_train, y_train, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    X = x_train[5000:].reshape(-1, 784).astype(np.float64) / 255.0
    y = y_train[5000:].astype(np.int64)
    Xt = x_test.reshape(-1, 784).astype(np.float64) / 255.0
    yt = y_test.astype(np.int64)
    notes = []
    if args.quick:
        X, y = X[: args.quick_n], y[: args.quick_n]
        lissa = [
            ("depth cut for --quick", 10, 200, args.lissa_batch),
            ("cheap", 1, 100, args.lissa_batch),
        ]
        notes.append(f"--quick: training set cut to its first {len(X):,} rows.")
    else:
        lissa = [("paper's r, t", 10, 5000, args.lissa_batch), ("cheap", 1, 1000, args.lissa_batch)]
    p = (784 + 1) * 10
    if args.reference == "auto":
        reference = "cg" if (args.quick and p > 2000) else "direct"
    else:
        reference = args.reference
    # Direct forms and factorises H in float64 whatever the model's dtype, so when the reference is
    # Direct its row already is Direct's timing: a float32 speed row would repeat ~10 minutes of
    # work.
    run_direct = not (p > 2000 and (args.quick or reference == "direct"))
    return Workload(
        key="mnist",
        title="W2 — MNIST (28×28)",
        source=(
            f"{path}; train = official train rows 5000..59999 (Koh & Liang split), /255; test ="
            " official test set"
        ),
        X_train=X,
        y_train=y,
        X_test=Xt,
        y_test=yt,
        lissa=lissa,
        reference=reference,
        run_direct_row=run_direct,
        notes=notes,
    )


# ── helpers ──────────────────────────────────────────────────────────────────────────────
def make_model(d: int, dtype: torch.dtype) -> torch.nn.Linear:
    model = torch.nn.Linear(d, 10).to(dtype).eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def set_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in params.items():
            named[name].copy_(t.to(named[name].dtype))


def data_as(X: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> uw.Data:
    return uw.Data.from_any((torch.from_numpy(X).to(dtype), torch.from_numpy(y)))


def time_sweep(obj: uw.Objective, data: uw.Data, repeats: int) -> list[float]:
    """Wall time of one pass of per-sample gradients over ``data`` (after one warm-up pass)."""
    for _ in iter_per_sample_grads(obj, obj.params, data, SWEEP_CHUNK):
        pass
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _batch, _grads in iter_per_sample_grads(obj, obj.params, data, SWEEP_CHUNK):
            pass
        times.append(time.perf_counter() - t0)
    return times


def warm_up(obj: uw.Objective, data: uw.Data, test: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Exercise the torch.func code paths (full HVP, minibatch HVP, test grads) on a small
    subset."""
    sub = data.subset(range(min(256, len(data))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uw.Influence(obj, solver=uw.CG(maxiter=3), max_residual=None, progress=False).fit(
            sub
        ).up_loss(test)
        uw.Influence(
            obj,
            solver=uw.LiSSA(depth=5, repeats=1, progress=False),
            max_residual=None,
            progress=False,
        ).fit(sub).up_loss(test)


@dataclass
class Row:
    solver: str
    settings: str
    dtype: str
    prepare_s: float = float("nan")
    solve_s: float = float("nan")
    scoring_s: float = float("nan")
    total_s: float = float("nan")
    ratio: float = float("nan")
    spearman_mean: float = float("nan")
    spearman_min: float = float("nan")
    pearson_mean: float = float("nan")
    rel_err: float = float("nan")
    residual: float = float("nan")
    iterations: str = ""
    notes: list[str] = field(default_factory=list)
    values: np.ndarray | None = None
    is_reference: bool = False
    accepted: bool = True


def run_solver(
    solver_name: str,
    settings: str,
    solver: uw.InverseHVPSolver,
    obj: uw.Objective,
    train: uw.Data,
    test: tuple[torch.Tensor, torch.Tensor],
    sweep_s: float,
) -> Row:
    row = Row(solver_name, settings, str(obj.dtype).replace("torch.", ""))
    log(f"  {solver_name} {settings} [{row.dtype}] ...")
    # The library's own accuracy bound (max_residual="auto": Direct 1e-4, CG 0.05, LiSSA 0.5), but
    # warn instead of raising so that inaccurate rows are still scored and shown.
    inf = uw.Influence(
        obj, solver=solver, progress=False, max_residual="auto", on_inaccurate="warn"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t0 = time.perf_counter()
            inf.fit(train)
            t1 = time.perf_counter()
            scores = inf.up_loss(test)
            t2 = time.perf_counter()
        except uw.errors.UpweightError as exc:
            row.notes.append(f"FAILED: {type(exc).__name__}: {exc}")
            log(f"    failed: {type(exc).__name__}: {exc}")
            return row
    prov = scores.provenance
    row.prepare_s = t1 - t0
    row.solve_s = float(prov["solve_seconds"])
    row.scoring_s = (t2 - t1) - row.solve_s
    row.total_s = t2 - t0
    row.ratio = row.total_s / sweep_s
    row.residual = float(prov["residual_max"])
    row.accepted = bool(prov.get("accepted", True))
    its = int(prov["iterations"])
    if solver_name.startswith("CG"):
        row.iterations = f"{its} it"
    elif solver_name.startswith("LiSSA"):
        row.iterations = f"{its:,} steps"
        lam, scale = prov.get("solver_lambda_max"), prov.get("solver_scale")
        if scale is not None:
            row.notes.append(
                f"scale {scale:.3g}"
                + (f" (1.1·λmax_batch, λmax≈{lam:.3g})" if lam is not None else "")
            )
    else:
        row.iterations = "–"
    for w in caught:
        msg = str(w.message)
        if "is inaccurate" in msg:
            bound = prov.get("max_residual_accepted")
            row.notes.append(
                f"residual above the library's bound max_residual={bound:g}: with the default "
                '`on_inaccurate="raise"` this call raises `InaccurateSolveError`'
            )
            continue
        msg = msg.split(". ")[0]
        if len(msg) > 160:
            msg = msg[:157] + "…"
        row.notes.append(f"{w.category.__name__}: {msg}")
    row.values = np.asarray(scores.values, dtype=np.float64)
    log(
        f"    prepare {row.prepare_s:.2f}s  solve {row.solve_s:.2f}s  scoring {row.scoring_s:.2f}s "
        f" total {row.total_s:.2f}s ({row.ratio:.1f}× sweep)  residual {row.residual:.1e} "
        f" {row.iterations}"
    )
    return row


def compare(row: Row, ref: np.ndarray) -> None:
    if row.values is None:
        return
    sp, pe, rel = [], [], []
    for v, r in zip(row.values, ref):
        sp.append(float(scipy.stats.spearmanr(v, r)[0]))
        pe.append(float(np.corrcoef(v, r)[0, 1]))
        rel.append(float(np.linalg.norm(v - r) / max(np.linalg.norm(r), 1e-300)))
    row.spearman_mean, row.spearman_min = float(np.mean(sp)), float(np.min(sp))
    row.pearson_mean = float(np.mean(pe))
    row.rel_err = float(np.max(rel))
    log(
        f"    vs reference: Spearman mean {row.spearman_mean:.6f} (min {row.spearman_min:.6f}), "
        f"Pearson mean {row.pearson_mean:.6f}, max rel. error {row.rel_err:.1e}"
    )


# ── one workload ─────────────────────────────────────────────────────────────────────────
@dataclass
class Result:
    wl: Workload
    info: dict[str, str]
    rows: list[Row]


def run_workload(wl: Workload, args: argparse.Namespace) -> Result:
    n, d = wl.X_train.shape
    p = (d + 1) * 10
    info: dict[str, str] = {}
    log(f"{wl.title}: n = {n:,}, d = {d}, p = {p:,}")

    # 1. train to the minimum in float64 (not counted)
    model64 = make_model(d, torch.float64)
    obj64 = uw.Objective(model64, "cross_entropy", l2=L2)
    train64 = data_as(wl.X_train, wl.y_train, torch.float64)
    t0 = time.perf_counter()
    fit = uw.refit(obj64, train64)
    train_s = time.perf_counter() - t0
    set_params(model64, fit.params)
    obj64 = uw.Objective(model64, "cross_entropy", l2=L2)  # θ̂ is read at construction
    with torch.no_grad():
        acc_tr = float((model64(train64.X).argmax(1) == train64.y).double().mean())
        acc_te = float(
            (model64(torch.from_numpy(wl.X_test)).argmax(1) == torch.from_numpy(wl.y_test))
            .double()
            .mean()
        )
    log(
        f"  trained in {train_s:.1f}s ({fit.iterations} L-BFGS iterations, ‖∇R‖₂ ="
        f" {fit.grad_norm:.1e}); accuracy train {acc_tr:.4f}, test {acc_te:.4f}"
    )
    info["data"] = wl.source
    info["sizes"] = (
        f"n_train = {n:,}, d = {d}, classes = 10, p = {p:,} (weights + bias), λ = {L2}, {N_TEST}"
        f" test points (the first {N_TEST} of the test set)"
    )
    info["training (not counted)"] = (
        f"uw.refit, float64 L-BFGS from zero: {train_s:.1f} s, {fit.iterations} iterations, "
        f"‖∇R(θ̂)‖₂ = {fit.grad_norm:.1e}; accuracy train {acc_tr:.4f} / test {acc_te:.4f}"
    )

    model32 = make_model(d, torch.float32)
    set_params(model32, fit.params)
    obj32 = uw.Objective(model32, "cross_entropy", l2=L2)
    train32 = data_as(wl.X_train, wl.y_train, torch.float32)
    test64 = (torch.from_numpy(wl.X_test[:N_TEST]), torch.from_numpy(wl.y_test[:N_TEST]))
    test32 = (test64[0].float(), test64[1])

    # 2. warm-up and the cost floor
    log("  warm-up ...")
    warm_up(obj64, train64, test64)
    warm_up(obj32, train32, test32)
    sweeps = {}
    for name, obj, data in (("float32", obj32, train32), ("float64", obj64, train64)):
        times = time_sweep(obj, data, args.sweep_repeats)
        sweeps[name] = float(np.median(times))
        log(
            f"  per-sample-gradient sweep [{name}]: median {sweeps[name]:.3f}s of"
            f" {', '.join(f'{t:.3f}' for t in times)}"
        )
    chunks = [grad_chunk_size(p, SWEEP_CHUNK, dtype) for dtype in (torch.float32, torch.float64)]
    info["cost floor (one per-sample-gradient sweep)"] = (
        f"float32 {sweeps['float32']:.3f} s, float64 {sweeps['float64']:.3f} s (median of"
        f" {args.sweep_repeats} after a warm-up; `iter_per_sample_grads`, chunks of {chunks[0]} /"
        f" {chunks[1]} points: ≤ {SWEEP_CHUNK} and ≤ 16 MiB of gradients)"
    )

    rows: list[Row] = []
    # 3. reference (float64 model)
    if wl.reference == "direct":
        ref_row = run_solver(
            "Direct", "reference", uw.Direct(), obj64, train64, test64, sweeps["float64"]
        )
        info["reference"] = (
            "Direct on the float64 model (dense float64 Hessian, formed in closed form for this"
            " linear model, + Cholesky)"
        )
    else:
        ref_row = run_solver(
            "CG",
            "rtol=1e-10, reference",
            uw.CG(rtol=1e-10),
            obj64,
            train64,
            test64,
            sweeps["float64"],
        )
        info["reference"] = "**CG with rtol = 1e-10 on the float64 model** (not Direct" + (
            ": --quick skips the dense 7,850² Hessian)" if args.quick else ")"
        )
    ref_row.is_reference = True
    if ref_row.values is None:
        raise RuntimeError(f"The reference solve failed: {ref_row.notes}")
    compare(ref_row, ref_row.values)
    rows.append(ref_row)
    ref = ref_row.values

    # 4. speed rows (float32 model)
    specs: list[tuple[str, str, uw.InverseHVPSolver]] = []
    if wl.run_direct_row:
        specs.append(("Direct", "float64 H + Cholesky", uw.Direct()))
    specs += [("CG", "rtol=1e-6", uw.CG(rtol=1e-6)), ("CG", "rtol=1e-3", uw.CG(rtol=1e-3))]
    for label, r, t, b in wl.lissa:
        specs.append(
            (
                "LiSSA",
                f"r={r}, t={t:,}, batch={b} ({label})",
                uw.LiSSA(depth=t, repeats=r, batch_size=b, seed=0, progress=False),
            )
        )
    for solver_name, settings, solver in specs:
        row = run_solver(solver_name, settings, solver, obj32, train32, test32, sweeps["float32"])
        compare(row, ref)
        rows.append(row)
    if not wl.run_direct_row:
        wl.notes.append(
            "No separate float32 Direct row for p > 2,000: Direct works in float64 whatever the"
            " model's dtype, so its cost is the reference row's (or, in --quick, it is skipped)."
        )
    return Result(wl, info, rows)


# ── report ───────────────────────────────────────────────────────────────────────────────
def _f(x: float, fmt: str) -> str:
    return "–" if x != x else format(x, fmt)


def _corr(x: float) -> str:
    """A correlation, written as 1 − ε when it is within 1e-3 of 1 (so near-exact rows stay
    distinguishable)."""
    if x != x:
        return "–"
    return f"1 − {1 - x:.1e}" if 0 < 1 - x < 1e-3 else ("1" if x >= 1 else f"{x:.4f}")


def render(
    results: list[Result],
    machine: dict[str, str],
    args: argparse.Namespace,
    command: str,
    finished: bool,
) -> str:
    out = ["# upweight solver benchmark", ""]
    if args.quick:
        out += [
            (
                "> **--quick run** (MNIST subsampled, LiSSA depth cut, MNIST reference = CG): a"
                " smoke test of the script, not the benchmark. Run `make bench` for the real"
                " numbers."
            ),
            "",
        ]
    if not finished:
        out += ["> **Incomplete**: the run is still going or stopped before the last workload.", ""]
    out += [f"Command: `{command}`", "", "| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    if finished:
        out += [
            f"| load average at end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
            f"| total wall time of the script | {time.perf_counter() - T_START:.0f} s |",
        ]
    out += [
        "",
        (
            "Multinomial logistic regression (`torch.nn.Linear`, with bias, loss `cross_entropy`,"
            " l2 = λ = 0.01), trained to ‖∇R‖∞ ≤ 1e-9. Influence I_up,loss of **all** training"
            " points on 10 test points."
        ),
        "",
        (
            "Columns: *prepare* = `Influence.fit` (∇R check + solver prepare: dense H + Cholesky"
            " for Direct, λmax for LiSSA); *solve* = the inverse-HVP solve of the 10 test"
            " gradients, including the library's one extra full-data HVP to measure the residual;"
            " *scoring* = the rest of `up_loss` (test gradients and the sweep of training gradients"
            " dotted with s_test); *total* = prepare + solve + scoring; *× sweep* = total / one"
            " per-sample-gradient sweep in the same dtype; *Spearman*, *Pearson* = rank / linear"
            " correlation of each test point's n_train scores with the reference (mean over the 10"
            " test points, min in parentheses); *rel. err* = max over test points of ‖scores −"
            " ref‖₂ / ‖ref‖₂; *residual* = max relative residual ‖(H+λI)x − v‖/‖v‖ measured by the"
            " library, marked ✗ where it is above the library's default bound"
            ' (`max_residual="auto"`: Direct 1e-4, CG 0.05, LiSSA 0.5), i.e. where `up_loss`'
            " would raise `InaccurateSolveError` by default (the benchmark passes"
            ' `on_inaccurate="warn"`). dtype = the model\'s dtype (Direct forms and factorises H'
            " in float64 whatever it is). Each row is one timed run after a shared warm-up."
        ),
        "",
    ]
    for res in results:
        out += [f"## {res.wl.title}", ""]
        out += [f"- **{k}**: {v}" for k, v in res.info.items()]
        out += [f"- {note}" for note in res.wl.notes]
        out += [
            "",
            (
                "| solver | settings | dtype | prepare s | solve s | scoring s | total s | × sweep"
                " | Spearman mean (min) | Pearson mean | rel. err | residual | iterations |"
            ),
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        notes = []
        for i, r in enumerate(res.rows, 1):
            name = f"**{r.solver}** (ref.)" if r.is_reference else r.solver
            sp = (
                "(reference)"
                if r.is_reference
                else f"{_corr(r.spearman_mean)} ({_corr(r.spearman_min)})"
            )
            pe = "–" if r.is_reference else _corr(r.pearson_mean)
            re = "–" if r.is_reference else _f(r.rel_err, ".1e")
            mark = f" [{i}]" if r.notes else ""
            out.append(
                f"| {name}{mark} | {r.settings} | {r.dtype} | {_f(r.prepare_s, '.2f')} |"
                f" {_f(r.solve_s, '.2f')} | {_f(r.scoring_s, '.2f')} | {_f(r.total_s, '.2f')} |"
                f" {_f(r.ratio, '.1f')} | {sp} | {pe} | {re} |"
                f" {_f(r.residual, '.1e')}{'' if r.accepted else ' ✗'} | {r.iterations or '–'} |"
            )
            if r.notes:
                notes.append(f"[{i}] " + "; ".join(dict.fromkeys(r.notes)))
        if notes:
            out += ["", *[f"- {n}" for n in notes]]
        out.append("")
    return "\n".join(out)


def write_section(out: Path, report: str) -> None:
    """The report as section ``solvers`` of ``out`` (bench/_sections.py), headings one level down
    (bench/RESULTS.md holds all benchmark tables under one title); the rest of the file is kept."""
    from _sections import replace_section

    replace_section(
        out,
        "solvers",
        "\n".join("#" + ln if ln.startswith("#") else ln for ln in report.splitlines()),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        default=None,
        help="Markdown report (default bench/RESULTS.md; bench/RESULTS-quick.md with --quick)",
    )
    ap.add_argument(
        "--mnist",
        default="../shared/data/mnist/mnist.npz",
        help=(
            "mnist.npz (x_train, y_train, x_test, y_test); a relative path is taken from the"
            " repository root"
        ),
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="MNIST n = 5,000, LiSSA depth cut, CG reference on MNIST: a < 1 min smoke run",
    )
    ap.add_argument(
        "--quick-n", type=int, default=5000, help="MNIST training points kept by --quick"
    )
    ap.add_argument(
        "--workloads", default="digits,mnist", help="comma-separated subset of: digits, mnist"
    )
    ap.add_argument(
        "--reference",
        choices=("auto", "direct", "cg"),
        default="auto",
        help=(
            "exact reference: Direct (float64) or CG rtol=1e-10 (float64); auto = Direct, except CG"
            " for MNIST in --quick"
        ),
    )
    ap.add_argument(
        "--lissa-batch",
        type=int,
        default=256,
        help=(
            "LiSSA minibatch size, both rows (default 256, as the library: on MNIST a 4× lower"
            " residual than 64 for 1.6× the time)"
        ),
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N); default: leave torch's default (the benchmark's setting)",
    )
    ap.add_argument(
        "--sweep-repeats",
        type=int,
        default=3,
        help="timed repeats of the per-sample-gradient sweep (median reported)",
    )
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "bench/RESULTS-quick.md" if args.quick else "bench/RESULTS.md"
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    command = " ".join(
        shlex.quote(a)
        for a in [
            "python",
            os.path.relpath(__file__, Path.cwd()),
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info(threads_set=args.threads is not None)
    log("machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()))
    loaders = {"digits": load_digits_workload, "mnist": load_mnist_workload}
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    for k in keys:
        if k not in loaders:
            ap.error(f"unknown workload {k!r}; choose from {sorted(loaders)}")
    results: list[Result] = []
    for k in keys:
        try:
            results.append(run_workload(loaders[k](args), args))
        except Exception:  # noqa: BLE001 — keep the workloads that finished
            traceback.print_exc()
            write_section(out, render(results, machine, args, command, finished=False))
            return 1
        write_section(out, render(results, machine, args, command, finished=k == keys[-1]))
        log(f"wrote section 'solvers' of {out}")
    print(render(results, machine, args, command, finished=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
