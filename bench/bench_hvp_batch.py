#!/usr/bin/env python
"""The generic HVP's batch cap: ``Curvature.matvec`` over n MNIST images with its batches capped by
the autograd-graph budget (``upweight.core.curvature.HVP_GRAPH_BYTES``) against uncapped batches.

``Curvature.matvec`` sums Pearlmutter's product Σᵢ ∇²θL(zᵢ, θ̂)V over the training set batch by
batch (``hvp_sum``: one forward and backward pass that keeps its graph, then one backward pass per
tangent). Each tangent pass allocates tensors as large as the batch's activations; glibc's malloc
serves allocations above its mmap threshold (at most 32 MiB) with fresh mappings that it unmaps on
free, so in a large batch every pass page-faults them in anew. ``Curvature.hvp_batch_size`` measures
the graph's bytes per point once (the saved tensors of 8 points minus those of 1) and caps the batch
at budget / bytes-per-point (at least ``MIN_HVP_BATCH``, at most ``batch_size``); the library's
budget, 32 MiB, keeps every tensor of the graph below that threshold. ``--malloc-check`` repeats the
CNN uncapped and capped in a child process with ``MALLOC_MMAP_THRESHOLD_`` = 4 GiB (no mmap): if the
allocator is the cause, the speed-up disappears there. This benchmark times the same product with
the cap at several budgets and with none (every image in one batch of ``batch_size`` = 2,048, the
behaviour before the cap), all in one process.

Models (float32, torch's initialisation, seed 0; cross-entropy, l2 = 0.01, damping 0.01): the W3
``mlp`` (784-1024-256-10 tanh, p = 1,068,810) and ``cnn`` (2 conv + 2 linear, tanh, p = 46,730) of
the peer benchmark, and the ``fig2-cnn`` (Koh & Liang's all-convolutional tanh net of §4.2, p =
2,616). Inputs: the first n MNIST training images of Koh & Liang's split, /255. Each cell is the
median of ``--repeats`` timed ``matvec`` calls after one warm-up, one thread; "agree" is the largest
relative difference of the k products from the uncapped ones.

Usage (from the repository root)::

    .venv/bin/python bench/bench_hvp_batch.py --out bench/RESULTS.md        # make bench-hvp-batch
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import upweight as uw
import upweight.core.curvature as curvature_module
from upweight.core.curvature import Curvature, graph_bytes_per_point
from upweight.datasets.mnist import load_mnist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _sections import replace_section  # noqa: E402
from bench_hvp import median_time, model_for  # noqa: E402
from bench_solvers import machine_info  # noqa: E402

SECTION = "hvp-batch"
UNCAPPED = 0  # a budget of 0 stands for "no cap": the bytes budget is set beyond any graph


def time_matvec(obj: uw.Objective, data: uw.Data, V: torch.Tensor, budget_mib: int, repeats: int):
    """(median seconds, points per batch, the product) of Curvature.matvec with the given graph
    budget."""
    saved = curvature_module.HVP_GRAPH_BYTES
    curvature_module.HVP_GRAPH_BYTES = 2**62 if budget_mib == UNCAPPED else budget_mib * 2**20
    try:
        curv = Curvature(obj, data, damping=0.01, batch_size=2048, structured=False)
        batch = min(curv.hvp_batch_size, len(data))
        seconds, out = median_time(curv.matvec, (V,), repeats)
    finally:
        curvature_module.HVP_GRAPH_BYTES = saved
    return seconds, batch, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mnist", default="../shared/data/mnist/mnist.npz", help="mnist.npz (or the IDX folder)"
    )
    ap.add_argument(
        "--out", default=None, help=f"Markdown file whose section {SECTION!r} is (re)written"
    )
    ap.add_argument("--models", default="mlp,cnn,fig2-cnn")
    ap.add_argument(
        "--n", type=int, default=1000, help="training images (default 1,000, the W3 size)"
    )
    ap.add_argument("--k", type=int, default=16, help="tangents per product (default 16)")
    ap.add_argument(
        "--budgets", default="0,8,16,32,64,128", help="graph budgets in MiB; 0 = no cap"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--malloc-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="repeat the CNN with glibc's mmap threshold at 4 GiB in a child process (default on)",
    )
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info(threads_set=True)
    mnist = load_mnist(args.mnist)
    budgets = [int(b) for b in args.budgets.split(",")]
    default_mib = curvature_module.HVP_GRAPH_BYTES / 2**20
    t_start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        model = model_for(name)
        obj = uw.Objective(model, "cross_entropy", l2=0.01)
        X = torch.tensor(mnist.x_train[: args.n], dtype=torch.float32).reshape(args.n, -1)
        data = uw.Data.from_any((X, torch.tensor(mnist.y_train[: args.n], dtype=torch.int64)))
        per_point = graph_bytes_per_point(obj, obj.params, data)
        V = torch.randn(args.k, obj.p, generator=torch.Generator().manual_seed(1))
        results = {b: time_matvec(obj, data, V, b, args.repeats) for b in budgets}
        t_off, _, ref = results.get(UNCAPPED) or time_matvec(obj, data, V, UNCAPPED, args.repeats)
        for b, (t, batch, out) in results.items():
            agree = float(((out - ref).norm(dim=1) / ref.norm(dim=1)).max())
            rows.append((name, obj.p, per_point, b, batch, t, t_off / t, agree))
            label = "none" if b == UNCAPPED else f"{b} MiB"
            if not args.json:
                print(
                    f"{name:9s} p={obj.p:>9,} {per_point / 1e3:7.1f} kB/point  cap {label:>8s}:"
                    f" batch {batch:>4}  {t:7.3f}s  speed-up {t_off / t:5.2f}×  agree {agree:.1e}",
                    flush=True,
                )
    if args.json:
        print(json.dumps([r[:7] for r in rows]))
        return
    if args.malloc_check:
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": str(2**32),
            "MALLOC_TRIM_THRESHOLD_": str(2**32),
        }
        child = [
            sys.executable,
            __file__,
            "--mnist",
            args.mnist,
            "--models",
            "cnn",
            "--budgets",
            "0,32",
            "--n",
            str(args.n),
            "--k",
            str(args.k),
            "--repeats",
            str(args.repeats),
            "--no-malloc-check",
            "--json",
        ]
        out = (
            subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        for n, p, pp, b, bs, t, s in json.loads(out):
            rows.append((f"{n} (mmap threshold 4 GiB)", p, pp, b, bs, t, s, float("nan")))
            print(
                f"{n} with MALLOC_MMAP_THRESHOLD_=4 GiB, cap {b} MiB: batch {bs}  {t:7.3f}s "
                f" speed-up {s:5.2f}×",
                flush=True,
            )
    wall = time.perf_counter() - t_start
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["wall time of the script"] = f"{wall:.0f} s"
    command = "python bench/bench_hvp_batch.py " + " ".join(
        shlex.quote(a) for a in argv or sys.argv[1:]
    )
    lines = [
        "## Generic HVPs: batches capped by the autograd-graph budget",
        "",
        f"Command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += [
        "",
        " ".join(__doc__.split("\n\n")[1].split()),
        "",
        " ".join(__doc__.split("\n\n")[2].split()),
        "",
        (
            f"n = {args.n:,} images, k = {args.k} tangents per product; the library's budget is"
            f" {default_mib:g} MiB. *speed-up* = uncapped time / capped time, measured in this run"
            " (the rows marked *mmap threshold 4 GiB*: in a child process with"
            " `MALLOC_MMAP_THRESHOLD_=4294967296`)."
        ),
        "",
        (
            "| model | p | graph kB / point | budget | points per batch | matvec s | speed-up |"
            " agree |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {n} | {p:,} | {pp / 1e3:.1f} | {'none' if b == UNCAPPED else f'{b} MiB'} | {bs} |"
        f" {t:.3f} | {s:.2f}× | {'–' if a != a else f'{a:.1e}'} |"
        for n, p, pp, b, bs, t, s, a in rows
    ]
    if args.out:
        replace_section(args.out, SECTION, "\n".join(lines))
        print(f"wrote section {SECTION!r} of {args.out}")


if __name__ == "__main__":
    main()
