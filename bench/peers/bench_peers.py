#!/usr/bin/env python
"""Side-by-side benchmark: upweight against pyDVL, captum, kronfluence and dattri.

Query (issue "Scale"): the influence I_up,loss of **all** training points on K test points
(Koh & Liang 2017, eq. 2) for multinomial logistic regression (``nn.Linear(d, 10)``, float32,
cross-entropy, L2 term λ = 0.01 on weights and bias):

* W1 — scikit-learn digits (first 1,500 rows train, the rest test; p = 650);
* W2 — real MNIST, Koh & Liang's split (train = official train rows 5,000..), cut to its first
  ``--n-train`` rows (p = 7,850); ``W2:2000`` sets n for that workload alone.

The model is trained to the minimum in float64 by ``upweight.refit`` (L-BFGS) and cast to
float32; every method sees that same θ̂ and the same tensors. The **reference** is closed-form
float64 linear algebra, independent of every library: for softmax regression
∇L(z) = (p − e_y) ⊗ x̃ and H = (1/n) Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + λI (x̃ = [x, 1]), formed
densely and solved by Cholesky; it is cross-checked against upweight's float64 Direct (p ≤ 2,000)
or CG (rtol 1e-10).

Each method runs in a **fresh worker process** (imports and data loading are not timed; the
library's own construction, fit/preprocessing and the scoring of all training points are), so
the peak RSS of the child (``ru_maxrss`` from ``os.wait4``) is per method; ``--timeout`` stops a
method and reports it as such. Scores are compared with the reference per test point after the
library's documented sign is applied (Spearman, Pearson; mean and min over the K test points);
a negative correlation after that is reported as a sign flip. The cost floor is one
per-sample-gradient sweep over the training set (upweight's ``iter_per_sample_grads``, float32,
median of 3 after a warm-up), measured in the same run.

Usage (from the repository root, in the bench environment made by bench/peers/setup.sh)::

    .venv-bench/bin/python bench/peers/bench_peers.py --workloads W1,W2 --n-train 20000 --n-test 10
    .venv-bench/bin/python bench/peers/bench_peers.py --workloads W1,W2:2000 --out /tmp/peers.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata as md
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.stats
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from methods import Method, Problem, all_methods  # noqa: E402

L2 = 0.01
ACCURATE = 0.99  # the Spearman bar of the issue's target
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def set_threads(n: int) -> None:
    """One setting for torch and the BLAS/OpenMP pools numpy/scipy use (set before they start)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


# ── workloads ────────────────────────────────────────────────────────────────────────────
@dataclass
class Workload:
    key: str
    title: str
    source: str
    X: np.ndarray  # float64 (n, d)
    y: np.ndarray
    Xt: np.ndarray  # the K test points
    yt: np.ndarray
    info: dict[str, str] = field(default_factory=dict)


def load_workload(spec: str, args: argparse.Namespace) -> Workload:
    name, _, n_txt = spec.partition(":")
    name = {"digits": "W1", "mnist": "W2"}.get(name.lower(), name.upper())
    k = args.n_test
    if name == "W1":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)
        return Workload("W1", "W1 — scikit-learn digits (8×8)",
                        "sklearn load_digits, X/16; train = rows 0..1499, test = rows 1500.. (first K scored)",
                        X[:1500], y[:1500], X[1500:1500 + k], y[1500:1500 + k])
    if name == "W2":
        n = int(n_txt) if n_txt else args.n_train
        path = Path(args.mnist)
        path = path if path.is_absolute() else (REPO / path)
        with np.load(path.resolve()) as f:
            xtr, ytr, xte, yte = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
        X = xtr[5000:5000 + n].reshape(-1, 784).astype(np.float64) / 255.0
        return Workload("W2", f"W2 — MNIST (28×28), n = {len(X):,}",
                        f"{path.resolve()}; train = official train rows 5000..{5000 + len(X) - 1} (Koh & Liang split, "
                        f"first {len(X):,}), /255; test = first K of the official test set",
                        X, ytr[5000:5000 + n].astype(np.int64),
                        xte[:k].reshape(-1, 784).astype(np.float64) / 255.0, yte[:k].astype(np.int64))
    raise SystemExit(f"unknown workload {spec!r}: use W1, W2 or W2:<n>")


# ── training and the closed-form reference ───────────────────────────────────────────────
def train(wl: Workload) -> tuple[np.ndarray, np.ndarray, float]:
    """θ̂ by upweight.refit in float64 (‖∇R‖ ≤ 1e-9): returns W (10, d), b (10,), seconds."""
    import upweight as uw

    model = torch.nn.Linear(wl.X.shape[1], 10).double().eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    obj = uw.Objective(model, "cross_entropy", l2=L2)
    t0 = time.perf_counter()
    fit = uw.refit(obj, uw.Data.from_any((torch.from_numpy(wl.X), torch.from_numpy(wl.y))))
    secs = time.perf_counter() - t0
    wl.info["training (not counted)"] = (f"uw.refit, float64 L-BFGS from zero: {secs:.1f} s, {fit.iterations} iterations, "
                                         f"‖∇R(θ̂)‖₂ = {fit.grad_norm:.1e}")
    return fit.params["weight"].numpy().copy(), fit.params["bias"].numpy().copy(), secs


def softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def closed_form_reference(wl: Workload, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """I_up,loss (K, n) from the closed-form gradient and Hessian of softmax regression, float64.

    Parameters are ordered (class c, feature j) with j = d the bias; the scores do not depend on
    the order. ∇L(z) = (p − e_y) ⊗ x̃; H_(c,c') = (1/n) X̃ᵀ diag(pᵢc(δcc' − pᵢc')) X̃ + λ δcc' I.
    """
    n, d = wl.X.shape
    C, q = 10, d + 1
    Xa = np.hstack([wl.X, np.ones((n, 1))])
    P = softmax(wl.X @ W.T + b)
    H = np.zeros((C * q, C * q))
    for c in range(C):
        for c2 in range(c, C):
            w = P[:, c] * ((c == c2) - P[:, c2])
            blk = Xa.T @ (Xa * w[:, None]) / n
            H[c * q:(c + 1) * q, c2 * q:(c2 + 1) * q] = blk
            if c2 != c:
                H[c2 * q:(c2 + 1) * q, c * q:(c + 1) * q] = blk.T
    H[np.diag_indices_from(H)] += L2
    Xta = np.hstack([wl.Xt, np.ones((len(wl.Xt), 1))])
    Rt = softmax(wl.Xt @ W.T + b) - np.eye(C)[wl.yt]
    Gt = (Rt[:, :, None] * Xta[:, None, :]).reshape(len(wl.Xt), C * q)  # test gradients
    S = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H), Gt.T).T  # H⁻¹∇L_test, (K, C·q)
    R = P - np.eye(C)[wl.y]
    # −∇L_testᵀ H⁻¹ ∇L(zᵢ) = −Σ_c Rᵢc (x̃ᵢ · S_k,c)
    return np.stack([-(R * (Xa @ S[k].reshape(C, q).T)).sum(axis=1) for k in range(len(S))])


def upweight_float64(wl: Workload, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, str]:
    """The cross-check of the reference: upweight on the float64 model (Direct, or CG rtol 1e-10)."""
    import upweight as uw

    model = torch.nn.Linear(wl.X.shape[1], 10).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    p = model.weight.numel() + model.bias.numel()
    solver, label = (uw.Direct(), "Direct") if p <= 2000 else (uw.CG(rtol=1e-10), "CG rtol=1e-10")
    inf = uw.Influence(uw.Objective(model, "cross_entropy", l2=L2), solver=solver, progress=False)
    inf.fit(uw.Data.from_any((torch.from_numpy(wl.X), torch.from_numpy(wl.y))))
    return np.asarray(inf.up_loss((torch.from_numpy(wl.Xt), torch.from_numpy(wl.yt))).values, np.float64), label


def time_floor(state: dict, repeats: int = 3) -> list[float]:
    """One per-sample-gradient sweep over the training set, float32 (the cost floor)."""
    import upweight as uw
    from upweight.core.grads import iter_per_sample_grads

    pb = make_problem(state, "")
    obj = uw.Objective(pb.model, "cross_entropy", l2=L2)
    data = uw.Data.from_any((pb.X, pb.y))
    for _ in iter_per_sample_grads(obj, obj.params, data, 2048):
        pass
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in iter_per_sample_grads(obj, obj.params, data, 2048):
            pass
        times.append(time.perf_counter() - t0)
    return times


# ── the worker: one method in a fresh process ────────────────────────────────────────────
def make_problem(state: dict, workdir: str) -> Problem:
    model = torch.nn.Linear(state["W"].shape[1], 10).float().eval()
    with torch.no_grad():
        model.weight.copy_(state["W"])
        model.bias.copy_(state["b"])
    return Problem(model, state["X"], state["y"], state["Xt"], state["yt"], float(state["l2"]), workdir)


def worker(key: str, state_dir: str, threads: int) -> int:
    import resource
    import warnings

    set_threads(threads)
    method = {m.key: m for m in all_methods()}[key]
    for mod in method.requires:
        importlib.import_module(mod)
    # torch.func's first call imports torch._dynamo (seconds): a one-off of torch, not of any method
    f = lambda w: (w ** 2).sum()  # noqa: E731
    torch.func.vmap(torch.func.grad(f))(torch.ones(2, 3))
    torch.func.jvp(torch.func.grad(f), (torch.ones(3),), (torch.ones(3),))
    state = torch.load(os.path.join(state_dir, "state.pt"))
    workdir = tempfile.mkdtemp(prefix=f"{key}-", dir=state_dir)
    pb = make_problem(state, workdir)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict = {"rss_start_kb": rss0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            scores = method.run(pb)
            out["wall_s"] = time.perf_counter() - t0
            np.save(os.path.join(state_dir, f"{key}.npy"), scores)
        except Exception as exc:  # noqa: BLE001 — reported in the table, the run goes on
            out["wall_s"] = time.perf_counter() - t0
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc()
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught})[:5]
    Path(state_dir, f"{key}.json").write_text(json.dumps(out))
    return 0


# ── the parent: run every method, score it ───────────────────────────────────────────────
@dataclass
class Row:
    method: Method
    status: str = "ok"
    wall_s: float = float("nan")
    peak_mb: float = float("nan")
    delta_mb: float = float("nan")
    spearman: float = float("nan")
    spearman_min: float = float("nan")
    pearson: float = float("nan")
    sign_ok: bool | None = None
    notes: list[str] = field(default_factory=list)


def run_method(m: Method, state_dir: str, args: argparse.Namespace) -> tuple[Row, np.ndarray | None]:
    row = Row(m)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", m.key, "--state", state_dir,
           "--threads", str(args.threads)]
    logf = open(os.path.join(state_dir, f"{m.key}.log"), "w")  # noqa: SIM115
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    limit = int(args.mem_limit_gb * 2**30)

    def cap_memory() -> None:  # a method that needs more address space fails alone, not the machine
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=cap_memory if limit > 0 else None)
    rusage = None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > args.timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, rusage = os.wait4(proc.pid, 0)
            row.status = f"timeout (> {args.timeout:g} s)"
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    logf.close()
    row.peak_mb = rusage.ru_maxrss / 1024 if rusage else float("nan")
    res_path = Path(state_dir, f"{m.key}.json")
    if row.status.startswith("timeout"):
        row.wall_s = float(args.timeout)
        return row, None
    if not res_path.exists():
        tail = Path(state_dir, f"{m.key}.log").read_text().strip().splitlines()[-1:]
        row.status = f"crashed (exit {proc.returncode})" + (f": {tail[0][:200]}" if tail else "")
        return row, None
    res = json.loads(res_path.read_text())
    row.wall_s = res["wall_s"]
    row.delta_mb = row.peak_mb - res["rss_start_kb"] / 1024
    row.notes += res.get("warnings", [])
    if "error" in res:
        row.status = f"error: {res['error']}"
        return row, None
    return row, np.load(os.path.join(state_dir, f"{m.key}.npy"))


def score(row: Row, values: np.ndarray, ref: np.ndarray) -> None:
    if values.shape != ref.shape:
        row.status = f"error: scores of shape {values.shape}, expected {ref.shape}"
        return
    v = row.method.sign * values
    if not np.all(np.isfinite(v)):
        row.status = "non-finite scores"
        return
    sp = [float(scipy.stats.spearmanr(a, r)[0]) for a, r in zip(v, ref)]
    pe = [float(np.corrcoef(a, r)[0, 1]) for a, r in zip(v, ref)]
    row.spearman, row.spearman_min, row.pearson = float(np.mean(sp)), float(np.min(sp)), float(np.mean(pe))
    row.sign_ok = row.spearman >= 0
    if not row.sign_ok:
        row.notes.append("sign opposite to the documented convention (correlations shown as measured)")


def available(m: Method) -> str | None:
    try:
        for mod in m.requires:
            importlib.import_module(mod)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"not installed: {type(exc).__name__}: {exc}"


@dataclass
class Result:
    wl: Workload
    floor_s: float
    rows: list[Row]


def run_workload(wl: Workload, methods: list[Method], args: argparse.Namespace) -> Result:
    n, d = wl.X.shape
    log(f"{wl.title}: n = {n:,}, d = {d}, p = {(d + 1) * 10:,}, K = {len(wl.Xt)}")
    W, b, _ = train(wl)
    log("  trained; " + wl.info["training (not counted)"])
    t0 = time.perf_counter()
    ref = closed_form_reference(wl, W, b)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    chk, chk_label = upweight_float64(wl, W, b)
    t_chk = time.perf_counter() - t0
    rel = float(np.max(np.linalg.norm(chk - ref, axis=1) / np.linalg.norm(ref, axis=1)))
    log(f"  reference {t_ref:.1f}s; upweight float64 {chk_label} {t_chk:.1f}s, max rel. difference {rel:.1e}")
    if rel > 1e-6:
        raise RuntimeError(f"closed-form reference and upweight float64 {chk_label} disagree: {rel:.1e}")
    wl.info["sizes"] = f"n_train = {n:,}, d = {d}, classes = 10, p = {(d + 1) * 10:,}, λ = {L2}, K = {len(wl.Xt)} test points"
    wl.info["reference"] = (f"closed-form float64 H (dense) + Cholesky, {t_ref:.1f} s; agrees with upweight's float64 "
                            f"{chk_label} ({t_chk:.1f} s) to a max relative L2 difference of {rel:.1e}")
    state = {"W": torch.from_numpy(W).float(), "b": torch.from_numpy(b).float(), "X": torch.from_numpy(wl.X).float(),
             "y": torch.from_numpy(wl.y), "Xt": torch.from_numpy(wl.Xt).float(), "yt": torch.from_numpy(wl.yt), "l2": L2}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        state_dir = args.keep or tmp
        os.makedirs(state_dir, exist_ok=True)
        torch.save(state, os.path.join(state_dir, "state.pt"))
        floors = time_floor(state)
        floor = float(np.median(floors))
        wl.info["cost floor"] = (f"one per-sample-gradient sweep, float32: {floor:.3f} s (median of "
                                 f"{', '.join(f'{t:.3f}' for t in floors)}; upweight `iter_per_sample_grads`, chunks of 2048)")
        log(f"  floor {floor:.3f}s")
        rows = []
        for m in methods:
            missing = available(m)
            if missing:
                rows.append(Row(m, status=missing))
                continue
            log(f"  {m.key} ...")
            row, values = run_method(m, state_dir, args)
            if values is not None:
                score(row, values, ref)
            log(f"    {row.status}; wall {row.wall_s:.2f}s, peak {row.peak_mb:.0f} MB, Spearman {row.spearman:.4f} "
                f"(min {row.spearman_min:.4f}), Pearson {row.pearson:.4f}")
            rows.append(row)
    return Result(wl, floor, rows)


# ── report ───────────────────────────────────────────────────────────────────────────────
def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def machine_info(args: argparse.Namespace) -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
        "threads": f"{args.threads} (torch.set_num_threads and OMP/MKL/OpenBLAS_NUM_THREADS, every process)",
        "limits per method": f"timeout {args.timeout:g} s, address space {args.mem_limit_gb:g} GiB (RLIMIT_AS)",
        "Python": platform.python_version(),
        "libraries": ", ".join(f"{d} {_version(d)}" for d in ("torch", "upweight", "pydvl", "captum", "kronfluence",
                                                               "dattri", "numpy", "scipy")),
        "upweight git": commit,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _f(x: float, fmt: str) -> str:
    return "–" if x != x else format(x, fmt)


def _corr(x: float) -> str:
    if x != x:
        return "–"
    return f"1 − {1 - x:.0e}" if 0 < 1 - x < 1e-3 else f"{x:.4f}"


def best_accurate(rows: list[Row], library: str) -> Row | None:
    ok = [r for r in rows if r.method.library == library and r.status == "ok" and abs(r.spearman) >= ACCURATE]
    return min(ok, key=lambda r: r.wall_s) if ok else None


def render_result(res: Result) -> list[str]:
    out = [f"## {res.wl.title}", "", f"- **data**: {res.wl.source}"]
    out += [f"- **{k}**: {v}" for k, v in res.wl.info.items()]
    uw_best = best_accurate(res.rows, "upweight")
    out += [f"- **upweight's fastest method with Spearman ≥ {ACCURATE}**: "
            + (f"{uw_best.method.name} ({uw_best.method.settings}), {uw_best.wall_s:.2f} s" if uw_best else "none"), ""]
    out += ["| method | library | settings | wall s | peak MB (Δ) | Spearman mean (min) | Pearson mean | sign | × floor | × upweight best | status |",
            "|---|---|---|--:|--:|--:|--:|:-:|--:|--:|---|"]
    notes = []
    for i, r in enumerate(res.rows, 1):
        mark = f" [{i}]" if r.notes else ""
        sign = "–" if r.sign_ok is None else ("✓" if r.sign_ok else "✗ flipped")
        vs = r.wall_s / uw_best.wall_s if (uw_best and r.status == "ok") else float("nan")
        out.append(f"| {r.method.name}{mark} | {r.method.library} | {r.method.settings} | {_f(r.wall_s, '.2f')} | "
                   f"{_f(r.peak_mb, '.0f')} ({_f(r.delta_mb, '+.0f')}) | {_corr(r.spearman)} ({_corr(r.spearman_min)}) | "
                   f"{_corr(r.pearson)} | {sign} | {'> ' if r.status.startswith('timeout') else ''}{_f(r.wall_s / res.floor_s, '.1f')} | "
                   f"{_f(vs, '.2f')} | {r.status} |")
        if r.notes:
            notes.append(f"[{i}] " + "; ".join(r.notes))
    out += ["", *[f"- {n}" for n in notes], ""] if notes else [""]
    out += [f"**Fastest method with |Spearman| ≥ {ACCURATE}, per library** (target of the issue: upweight's at least "
            "5× faster than every peer's):", "", "| library | method | wall s | Spearman | upweight's speed-up |", "|---|---|--:|--:|--:|"]
    for lib in dict.fromkeys(r.method.library for r in res.rows):
        b = best_accurate(res.rows, lib)
        if b is None:
            out.append(f"| {lib} | none reached {ACCURATE} | – | – | – |")
        else:
            sp = f"{b.wall_s / uw_best.wall_s:.1f}×" if uw_best else "–"
            out.append(f"| {lib} | {b.method.name} ({b.method.settings}) | {b.wall_s:.2f} | {_corr(b.spearman)} | {sp} |")
    return out + [""]


def render(results: list[Result], machine: dict[str, str], command: str, finished: bool) -> str:
    out = ["# upweight vs peer influence libraries", ""]
    if not finished:
        out += ["> **Incomplete**: the run stopped before its last workload.", ""]
    out += [f"Command: `{command}`", "", "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in machine.items()]]
    if finished:
        out += [f"| load average at end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
                f"| total wall time | {time.perf_counter() - T_START:.0f} s |"]
    out += ["", "Influence I_up,loss of **all** training points on K test points, multinomial logistic regression "
            "(`nn.Linear`, float32, cross-entropy, L2 λ = 0.01 on weights and bias; θ̂ from float64 L-BFGS). Every "
            "method gets the damping that makes its curvature H + λI (see bench/peers/methods.py). Columns: *wall* = "
            "the method in a fresh process, from constructing the library's object through fit/preprocessing to the "
            "scores of all n training points (imports and data loading not counted; each process starts cold, no "
            "warm-up); *peak MB* = peak RSS of that process (`ru_maxrss`), Δ = above its RSS after imports and data "
            "loading; *Spearman*, *Pearson* = correlation with the closed-form reference per test point after the "
            "library's documented sign (pyDVL, captum, kronfluence and dattri document ∇L_testᵀH⁻¹∇L_train = "
            "−I_up,loss), mean (min) over the K test points; *sign* ✗ = negative correlation after that; *× floor* = "
            "wall / one per-sample-gradient sweep; *× upweight best* = wall / upweight's fastest method with "
            f"Spearman ≥ {ACCURATE}.", ""]
    for res in results:
        out += render_result(res)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W2", help="comma list of W1, W2, W2:<n_train>")
    ap.add_argument("--n-train", type=int, default=20000, help="MNIST training points for W2 (default 20,000)")
    ap.add_argument("--n-test", type=int, default=10, help="K, the number of test points (default 10)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per method before it is stopped (default 300)")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0,
                    help="address-space limit per method process (RLIMIT_AS; 0 = none; default 12)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process (default 1, for fairness)")
    ap.add_argument("--methods", default="", help="comma list of method keys or library names to run (default all)")
    ap.add_argument("--skip", default="", help="comma list of method keys or library names to leave out")
    ap.add_argument("--mnist", default="../shared/data/mnist/mnist.npz", help="mnist.npz; relative to the repo root")
    ap.add_argument("--out", default="bench/PEERS.md", help="Markdown report (relative to the current directory)")
    ap.add_argument("--keep", default="", help="keep the workers' logs and scores in this folder (for debugging)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.state, args.threads)
    set_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    want = {s.strip() for s in args.methods.split(",") if s.strip()}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    methods = [m for m in all_methods() if (not want or m.key in want or m.library in want)
               and m.key not in skip and m.library not in skip]
    machine = machine_info(args)
    log("machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()))
    out = Path(args.out)
    specs = [s.strip() for s in args.workloads.split(",") if s.strip()]
    results: list[Result] = []
    for i, spec in enumerate(specs):
        try:
            results.append(run_workload(load_workload(spec, args), methods, args))
        except Exception:  # noqa: BLE001 — keep what finished
            traceback.print_exc()
            out.write_text(render(results, machine, command, finished=False))
            return 1
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(results, machine, command, finished=i == len(specs) - 1))
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
