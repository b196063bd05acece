#!/usr/bin/env python
"""Intra-op threads on a busy machine: small influence queries with 1 and 2 torch threads, with and
without a controlled background load; and the cost of CG's final residual check.

Queries (softmax regression with bias, λ = l2 = 0.01, float32 model, trained first in float64 with
``uw.refit``, not timed; I_up,loss of every training point for the first 10 test points, i.e. K =
10):

* ``digits-direct`` / ``digits-cg``: scikit-learn's 8×8 digits, pixels / 16, train = rows 0..1499
  (p = 650, n = 1,500), ``Direct()`` / ``CG()``.
* ``mnist5k-cg``: MNIST, the first 5,000 rows of the Koh & Liang training split (p = 7,850),
  ``CG()``.

Each query runs in a fresh child process (one warm-up, then the fastest of ``--repeats`` timed runs
of ``Influence(...).fit(train).up_loss(test)``) under one thread setting:

* ``torch 1`` / ``torch 2``: ``torch.set_num_threads(1 or 2)`` and ``upweight.set_threads("torch")``
  in the child before anything else (upweight leaves torch's setting alone);
* ``default``: torch's default threads and upweight's default rule (``upweight._threads``: one
  intra-op thread inside upweight's work where p·n is small, and no more threads than the cores
  other work leaves free);
* ``before`` (with ``--before-src DIR``): ``default`` with the upweight package of another checkout
  (e.g. ``git worktree add /tmp/before HEAD~1``), for a before/after comparison in one run.

Background load (``--loads``): ``idle``; ``half`` = one busy child process per two usable cores
(at least one); ``loaded`` = one per usable core. Each multiplies 256×256 numpy matrices in a loop
with a single BLAS thread, started before the query's child and stopped after it.

Section ``cg-residual``: block CG (K = 100 right-hand sides, the MNIST-5k problem) with the final
true residual measured on all K columns (``residual_sample=K``) against the default sample, and the
largest gap |true − recurrence| found on the measured columns.

Usage (from the repository root; the machine should otherwise be idle, which a shared machine may
not be — the load average is recorded)::

    .venv/bin/python bench/bench_threads.py --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_sections.py, bench_solvers.py

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
L2 = 0.01
N_TEST = 10
QUERIES = ("digits-direct", "digits-cg", "mnist5k-cg")
MODES = ("torch 1", "torch 2", "default")
LOADS = ("idle", "half", "loaded")
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ── data and θ̂ (cached) ──────────────────────────────────────────────────────────────────
def load_arrays(workload: str, mnist: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if workload == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)
        return X[:1500], y[:1500], X[1500 : 1500 + N_TEST], y[1500 : 1500 + N_TEST]
    with np.load(mnist) as f:
        x_train, y_train, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    X = x_train[5000:10000].reshape(-1, 784).astype(np.float64) / 255.0
    y = y_train[5000:10000].astype(np.int64)
    Xt = x_test[:N_TEST].reshape(-1, 784).astype(np.float64) / 255.0
    return X, y, Xt, y_test[:N_TEST].astype(np.int64)


def trained(workload: str, mnist: str) -> Path:
    """θ̂ of the workload (float64 L-BFGS), cached in bench/.cache."""
    path = CACHE / f"threads-{workload}.npz"
    if path.exists():
        return path
    import upweight as uw

    X, y, _, _ = load_arrays(workload, mnist)
    model = torch.nn.Linear(X.shape[1], 10).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    obj = uw.Objective(model, "cross_entropy", l2=L2)
    fit = uw.refit(obj, uw.Data.from_any((torch.from_numpy(X), torch.from_numpy(y))))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.detach().numpy() for k, v in fit.params.items()})
    return path


# ── the child: one query under one thread setting ─────────────────────────────────────────
def child(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import upweight as uw

    workload, solver_name = args.query.split("-")
    X, y, Xt, yt = load_arrays(workload, args.mnist)
    model = torch.nn.Linear(X.shape[1], 10).float()
    with np.load(args.params) as f, torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.from_numpy(f[name]))
    obj = uw.Objective(model, "cross_entropy", l2=L2)
    train = uw.Data.from_any((torch.from_numpy(X).float(), torch.from_numpy(y)))
    test = (torch.from_numpy(Xt).float(), torch.from_numpy(yt))
    threads_before = torch.get_num_threads()

    def query() -> float:
        solver = uw.Direct() if solver_name == "direct" else uw.CG()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uw.Influence(obj, solver=solver, progress=False).fit(train).up_loss(test)
        return time.perf_counter() - t0

    query()
    times = [query() for _ in range(args.repeats)]
    print(
        json.dumps(
            {
                "times": times,
                "torch_threads": threads_before,
                "threads_after": torch.get_num_threads(),
                "load": os.getloadavg()[0],
            }
        )
    )


# ── background load ───────────────────────────────────────────────────────────────────────
LOAD_CODE = """
import numpy as np
a = np.random.default_rng(0).standard_normal((256, 256))
while True:
    b = a @ a
"""


def start_load(n: int) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_CODE], env=env) for _ in range(n)]
    if procs:
        time.sleep(1.0)
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def load_procs(load: str, usable: int) -> int:
    """Busy background processes for the load named ``load`` (one of ``LOADS``)."""
    return {"idle": 0, "half": max(1, usable // 2), "loaded": usable}[load]


def run_child(query: str, mode: str, params: Path, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "UPWEIGHT_THREADS")}
    env["PYTHONPATH"] = str(Path(args.before_src) if mode == "before" else REPO / "src")
    if mode.startswith("torch "):
        env["UPWEIGHT_THREADS"] = "torch"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--query",
        query,
        "--params",
        str(params),
        "--mnist",
        args.mnist,
        "--repeats",
        str(args.repeats),
    ]
    if mode.startswith("torch "):
        cmd += ["--torch-threads", mode.split()[1]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        raise RuntimeError(f"{query} [{mode}] failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ── CG's final residual check ─────────────────────────────────────────────────────────────
def cg_residual(args: argparse.Namespace, params: Path) -> dict:
    import upweight as uw

    torch.set_num_threads(1)
    X, y, _, _ = load_arrays("mnist", args.mnist)
    model = torch.nn.Linear(784, 10).float()
    with np.load(params) as f, torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.from_numpy(f[name]))
    obj = uw.Objective(model, "cross_entropy", l2=L2)
    train = uw.Data.from_any((torch.from_numpy(X).float(), torch.from_numpy(y)))
    curv = uw.Curvature(obj, train)
    K = 100
    V = torch.randn(K, curv.p, generator=torch.Generator().manual_seed(0))
    rows = []
    for sample in (K, uw.CG().residual_sample):
        cg = uw.CG(rtol=1e-5, residual_sample=sample)
        best = None
        for _ in range(args.repeats):
            sol = cg.solve(cg.prepare(curv), V)
            if best is None or sol.seconds < best.seconds:
                best = sol
        rows.append(
            {
                "residual_sample": sample,
                "seconds": best.seconds,
                "iterations": best.iterations,
                "check_seconds": best.stats.get("residual_check_seconds"),
                "measured": int(best.measured_mask.sum()),
                "max_residual": best.max_residual,
                "recurrence_max": best.stats.get("recurrence_residual_max"),
                "gap_max": best.stats.get("residual_gap_max"),
            }
        )
        log(f"  cg-residual sample={sample}: {rows[-1]}")
    return {"K": K, "n": len(train), "p": curv.p, "rows": rows}


# ── report ────────────────────────────────────────────────────────────────────────────────
def render(results: dict, machine: dict[str, str], command: str) -> str:
    from _sections import embed_json

    modes = [*MODES, "before"] if results.get("before_commit") else list(MODES)
    lines = [
        "## Intra-op threads on a busy machine (`bench/bench_threads.py`)",
        "",
        f"Command: `{command}`",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in machine.items()]
    lines += [
        "",
        (
            f"Each cell: the fastest of {results['repeats']} runs of `Influence(obj,"
            f" solver).fit(train).up_loss(test)` (K = {N_TEST}), seconds, in a fresh process after"
            " one warm-up run; `torch N` = `torch.set_num_threads(N)` first and upweight leaving"
            " it alone (`UPWEIGHT_THREADS=torch`), `default` = torch's default threads and"
            " upweight's default rule (one intra-op thread where p·n is small, no more threads"
            " than the cores other work leaves free)"
            + (
                f", `before` = the same with the package at {results['before_commit']}"
                if results.get("before_commit")
                else ""
            )
            + ". Load: `half` = one busy numpy process per two usable cores, `loaded` = one per"
            " usable core."
        ),
        "",
        "| query | load | " + " | ".join(modes) + " |",
        "|---|---|" + "---:|" * len(modes),
    ]
    for q in QUERIES:
        for load in LOADS:
            if not any(f"{q}|{load}|{m}" in results["runs"] for m in modes):
                continue
            cells = []
            for m in modes:
                r = results["runs"].get(f"{q}|{load}|{m}")
                cells.append(f"{min(r['times']):.3f}" if r else "–")
            lines.append(f"| {q} | {load} | " + " | ".join(cells) + " |")
    cg = results.get("cg_residual")
    if cg:
        lines += [
            "",
            (
                f"CG's final residual check, block CG on the MNIST-5k curvature (n = {cg['n']:,}, p"
                f" = {cg['p']:,}), K = {cg['K']} random right-hand sides, rtol = 1e-5, one thread,"
                f" fastest of {results['repeats']}:"
            ),
            "",
            (
                "| residual_sample | measured | solve s | of which check s | iterations | max"
                " measured residual | max recurrence residual | max gap true − recurrence |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in cg["rows"]:
            lines.append(
                f"| {r['residual_sample']} | {r['measured']} | {r['seconds']:.3f} |"
                f" {r['check_seconds']:.3f} | {r['iterations']} | {r['max_residual']:.2e} |"
                f" {r['recurrence_max']:.2e} | {r['gap_max']:.1e} |"
            )
    lines += ["", embed_json(results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS-quick.md"))
    ap.add_argument(
        "--mnist",
        default=str(
            Path(os.environ.get("UPWEIGHT_DATA", REPO.parent / "shared" / "data"))
            / "mnist"
            / "mnist.npz"
        ),
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", default=",".join(QUERIES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--before-src", help="the src/ folder of another checkout: adds mode 'before'")
    ap.add_argument("--skip-cg-residual", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    # child
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--query", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--torch-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from _sections import replace_section
    from bench_solvers import machine_info

    machine = machine_info()
    results: dict = {"repeats": args.repeats, "runs": {}}
    modes = args.modes.split(",")
    if args.before_src:
        results["before_commit"] = subprocess.run(
            ["git", "-C", args.before_src, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        modes.append("before")
    params = {w: trained(w, args.mnist) for w in ("digits", "mnist")}
    usable = len(os.sched_getaffinity(0))
    for load in args.loads.split(","):
        procs = start_load(load_procs(load, usable))
        try:
            for q in args.queries.split(","):
                for m in modes:
                    r = run_child(
                        q, m, params["digits" if q.startswith("digits") else "mnist"], args
                    )
                    results["runs"][f"{q}|{load}|{m}"] = r
                    log(
                        f"{q:14s} {load:6s} {m:8s} fastest {min(r['times']):.3f}s of "
                        f"{', '.join(f'{t:.3f}' for t in r['times'])} (load avg {r['load']:.2f})"
                    )
        finally:
            stop_load(procs)
    if not args.skip_cg_residual:
        results["cg_residual"] = cg_residual(args, params["mnist"])
    command = "python bench/bench_threads.py " + " ".join(a for a in argv or sys.argv[1:])
    replace_section(args.out, "threads", render(results, machine, command))
    log(f"wrote section 'threads' of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
