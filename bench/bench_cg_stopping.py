"""Why block CG stops later than j* on W2: its iterations against the ranking they give.

Issue 24 times upweight's W2 query against a bound of j* HVP passes, j* being the fewest block-CG
iterations whose scores reach mean Spearman ≥ 0.99 (``bench_floor_bound.py``). A solver cannot know
j*: it stops when every right-hand side's relative residual ‖rⱼ‖/‖vⱼ‖ is ≤ rtol. This benchmark
measures, per iteration j, both the ranking (Spearman of the scores against the exact closed-form
ones, Koh & Liang 2017 Eq. 2) and the largest relative residual, for block CG (O'Leary 1980, the
breakdown-free form upweight uses: orthonormal search blocks, every column kept in the block) run
on the explicit damped Hessian of softmax regression in four precisions:

* float64 throughout — exact arithmetic, to the 1e-16 level;
* float32 products, float64 recurrences — the HVP rounded as a float32 model's, the rest exact;
* float32 throughout — what a float32 model's solve does;
* bfloat16 products (operands rounded to bfloat16, torch's product), float32 recurrences — what
  ``CG(hvp_dtype=torch.bfloat16)`` does;

and upweight's own ``CG(rtol=1e-2, block=True)`` on the float32 model (structured HVPs, converged
columns leave the block). The replicas multiply by the dense H (sums over p = 7,850 terms) rather
than through the data (sums over n): the rounding is of the same order, not the same numbers.

Command: ``python bench/bench_cg_stopping.py --out bench/RESULTS.md`` (about 4 minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.stats
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from _sections import replace_section  # noqa: E402
from bench_peers import (  # noqa: E402
    L2,
    closed_form_scores,
    closed_form_system,
    load_workload,
    train,
)
from bench_solvers import machine_info  # noqa: E402

import upweight as uw  # noqa: E402

SECTION = "cg-stopping"
ACCURATE = 0.99
RTOL = 1e-2
C = 10  # classes
#: (label, product dtype, recurrence dtype); "bfloat16": torch's product of bfloat16 operands
MODES = (
    ("float64", np.float64, np.float64),
    ("float32 products, float64 recurrences", np.float32, np.float64),
    ("float32", np.float32, np.float32),
    ("bfloat16 products, float32 recurrences", "bfloat16", np.float32),
)


def spearman(values: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rho = [scipy.stats.spearmanr(values[j], ref[j])[0] for j in range(len(ref))]
    return float(np.mean(rho)), float(np.min(rho))


def block_cg_curve(H, B, R, Xa, ref, prod, rec, max_iter: int) -> list[dict]:
    """Block CG on (H + λI)X = B with every column kept, per iteration: Spearman and the largest
    relative recurrence residual; products in ``prod``, everything else in ``rec``."""
    if prod == "bfloat16":
        Hb = torch.from_numpy(H).to(torch.bfloat16)

        def product(P: np.ndarray) -> np.ndarray:
            return (torch.from_numpy(P).to(torch.bfloat16) @ Hb).to(torch.float64).numpy()
    else:
        Hp = H.astype(prod)

        def product(P: np.ndarray) -> np.ndarray:
            return P.astype(prod) @ Hp

    bnorm = np.linalg.norm(B, axis=1)
    X = np.zeros(B.shape, rec)
    Rr = B.astype(rec)
    P = np.linalg.qr(Rr.T)[0].T
    rows = []
    for j in range(1, max_iter + 1):
        Q = product(P).astype(rec)
        PAP = P @ Q.T
        evals, U = np.linalg.eigh((PAP + PAP.T) / 2)
        PAP_inv = (U / evals) @ U.T
        alpha = PAP_inv @ (P @ Rr.T)
        X += alpha.T @ P
        Rr -= alpha.T @ Q
        mean, low = spearman(closed_form_scores(X, R, Xa), ref)
        res = float((np.linalg.norm(Rr.astype(np.float64), axis=1) / bnorm).max())
        rows.append({"j": j, "mean": mean, "min": low, "residual": res})
        if mean >= 0.9999 and res <= RTOL:
            break
        beta = -PAP_inv @ (Q @ Rr.T)
        P = np.linalg.qr((Rr + beta.T @ P).T)[0].T.astype(rec)
    return rows


def upweight_query(wl, W, b, ref, hvp_dtype: torch.dtype | None = None) -> dict:
    """upweight's CG(rtol=1e-2, block=True, hvp_dtype=…) on the float32 model: iterations and
    Spearman."""
    model = torch.nn.Linear(wl.X.shape[1], C).eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    inf = uw.Influence(
        uw.Objective(model, "cross_entropy", l2=L2),
        solver=uw.CG(rtol=RTOL, block=True, hvp_dtype=hvp_dtype),
        progress=False,
        grad_tol=1e9,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf.fit(uw.Data.from_any((torch.from_numpy(wl.X).float(), torch.from_numpy(wl.y))))
        s = inf.up_loss((torch.from_numpy(wl.Xt).float(), torch.from_numpy(wl.yt)))
    mean, low = spearman(np.asarray(s.values, np.float64), ref)
    return {"iterations": s.provenance["iterations"], "mean": mean, "min": low}


def first(rows: list[dict], test) -> int | None:
    return next((r["j"] for r in rows if test(r)), None)


def render(result: dict, machine: dict[str, str], command: str) -> str:
    curves = result["curves"]
    out = [
        f"## Block CG's stopping rule against the ranking it gives ({result['title']})",
        "",
        (__doc__ or "").split("\n\n", 1)[1].split("\n\nCommand:")[0].strip(),
        "",
        f"Command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine.items()),
        "",
        f"n = {result['n']:,}, p = {result['p']:,}, K = {result['k']} test points, λ = {L2:g};"
        f" {result['seconds']:.0f} s.",
        "",
        "| j | "
        + " | ".join(f"{label}: Spearman mean (min) | max ‖r‖/‖v‖" for label, _, _ in MODES)
        + " |",
        "|--:|" + "--:|--:|" * len(MODES),
    ]
    for j in range(1, max(len(c) for c in curves.values()) + 1):
        cells = []
        for label, _, _ in MODES:
            rows = curves[label]
            if j <= len(rows):
                r = rows[j - 1]
                cells += [f"{r['mean']:.4f} ({r['min']:.4f})", f"{r['residual']:.2e}"]
            else:
                cells += ["", ""]
        out.append(f"| {j} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"| block CG | j* (first mean Spearman ≥ {ACCURATE}) | first j with max ‖r‖/‖v‖ ≤"
        f" {RTOL:g} | Spearman mean (min) there |",
        "|---|--:|--:|--:|",
    ]
    for label, _, _ in MODES:
        rows = curves[label]
        js = first(rows, lambda r: r["mean"] >= ACCURATE)
        jr = first(rows, lambda r: r["residual"] <= RTOL)
        at = rows[jr - 1] if jr else None
        out.append(
            f"| {label} | {js or '–'} | {jr or '–'} |"
            + (f" {at['mean']:.4f} ({at['min']:.4f}) |" if at else " – |")
        )
    for label, uq in result["upweight"].items():
        out.append(
            f"| upweight `{label}`, float32 model (converged columns leave the block) | – |"
            f" {uq['iterations']} | {uq['mean']:.4f} ({uq['min']:.4f}) |"
        )
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS-quick.md"))
    ap.add_argument(
        "--mnist", default="../shared/data/mnist/mnist.npz", help="mnist.npz (from the repo root)"
    )
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=10, help="test points (default 10)")
    ap.add_argument("--max-iter", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ns = argparse.Namespace(n_test=args.k, mnist=args.mnist, n_train=args.n_train)
    wl = load_workload(f"W2:{args.n_train}", ns)
    W, b, _ = train(wl)
    H, B, R, Xa = closed_form_system(wl, W, b)
    S = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H), B.T).T
    ref = closed_form_scores(S, R, Xa)
    curves = {}
    for label, prod, rec in MODES:
        curves[label] = block_cg_curve(H, B, R, Xa, ref, prod, rec, args.max_iter)
        print(f"{label}: {curves[label][-1]}", flush=True)
    result = {
        "title": wl.title + f", K = {args.k}",
        "n": len(wl.X),
        "p": H.shape[0],
        "k": args.k,
        "curves": curves,
        "upweight": {
            f"CG(rtol={RTOL:g}, block=True)": upweight_query(wl, W, b, ref),
            f"CG(rtol={RTOL:g}, block=True, hvp_dtype=torch.bfloat16)": upweight_query(
                wl, W, b, ref, torch.bfloat16
            ),
        },
        "seconds": time.perf_counter() - t0,
    }
    command = "python bench/bench_cg_stopping.py --out bench/RESULTS.md"
    replace_section(args.out, SECTION, render(result, machine_info(), command))
    print(f"wrote section {SECTION} of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
