#!/usr/bin/env python
"""Batches within the tensor budget (``upweight.core.batching.TENSOR_BYTES``, 16 MiB) against the
batch sizes before it: the per-sample-gradient sweep and the K-FAC / EK-FAC factor passes.

glibc's malloc serves each allocation at or above its mmap threshold (dynamic, at most 32 MiB) with
a fresh mapping that it unmaps on free, so a chunk whose tensors exceed it page-faults them in anew,
chunk after chunk. Before the budget, per-sample gradients came in chunks of up to 256 MiB
(``iter_per_sample_grads``, b × p values) and the factor passes captured 512 points at a time (the
CNN's GGN cotangents of 10 output-Hessian factors: 189 MB), EK-FAC's correction rotating them in
chunks of 2²⁴ float64 values (128 MiB). Now each chunk's largest tensor stays within 16 MiB
(``grad_chunk_size``, ``core.kfac.capture_batch_size``, correction chunks of 2²¹ values).
``--malloc-check`` repeats the before/after pairs in a child process with ``MALLOC_MMAP_THRESHOLD_``
= 4 GiB (no mmap): if the allocator is the cause, the speed-ups disappear there.

Models (float32, torch's initialisation, seed 0; cross-entropy, l2 = 0.01): ``linear`` (softmax
regression, p = 7,850; the W2 sweep of the peer benchmark, n = ``--n-linear``), and the W3 ``mlp``
(784-1024-256-10 tanh, p = 1,068,810) and ``cnn`` (2 conv + 2 linear, tanh, p = 46,730) on n =
``--n`` images. Inputs: the first MNIST training images, /255. Each cell is the median of
``--repeats`` timed runs after one warm-up, one thread. For the factor passes, *agree* is the
largest relative difference (Frobenius) of A, S (pass 1) or Λ (pass 2) between the two batchings.

Usage (from the repository root)::

    .venv/bin/python bench/bench_batch_budget.py --out bench/RESULTS.md        # make
    bench-batch-budget
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import upweight as uw
import upweight.core.batching as batching
from upweight.core.grads import grad_chunk_size, iter_per_sample_grads
from upweight.core.kfac import capture_batch_size, correct_eigenvalues, fit_factors
from upweight.core.layers import find_layers
from upweight.datasets.mnist import load_mnist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_hvp  # noqa: E402
from _sections import replace_section  # noqa: E402
from bench_hvp import median_time  # noqa: E402
from bench_solvers import machine_info  # noqa: E402

SECTION = "batch-budget"
OLD_GRAD_BYTES = 2**28  # the per-sample-gradient chunk budget before (256 MiB)
OLD_CAPTURE = 512  # points per capture before (the curvature's batch_size)
OLD_CORRECTION_ELEMENTS = 2**24  # EK-FAC's rotation chunk before (float64 values)


def model_for(name: str) -> torch.nn.Module:
    if name == "linear":
        torch.manual_seed(0)
        return torch.nn.Linear(784, 10).eval()
    return bench_hvp.model_for(name)  # the W3 networks of the peer benchmark


def sweep(obj: uw.Objective, data: uw.Data, max_bytes: int) -> int:
    points = 0
    for batch, _ in iter_per_sample_grads(obj, obj.params, data, 2048, max_bytes=max_bytes):
        points += len(batch)
    return points


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def factor_rows(name: str, obj: uw.Objective, data: uw.Data, repeats: int) -> list[tuple]:
    """Pass 1 (A, S) and pass 2 (EK-FAC's Λ) before (512 points per capture, 2²⁴-value chunks) and
    now."""
    blocks = find_layers(obj, data, embeddings=True).blocks
    step = capture_batch_size(obj, data, blocks, None, OLD_CAPTURE)
    saved = batching.TENSOR_BYTES
    results = {}
    for label, budget, elements in (
        ("before", 2**62, OLD_CORRECTION_ELEMENTS),
        ("now", saved, saved // 8),
    ):
        batching.TENSOR_BYTES = budget
        try:
            t1, (factors, _) = median_time(
                partial(fit_factors, batch_size=OLD_CAPTURE), (obj, data, blocks), repeats
            )
            t2, _ = median_time(
                partial(correct_eigenvalues, batch_size=OLD_CAPTURE, max_elements=elements),
                (obj, data, factors),
                repeats,
            )
        finally:
            batching.TENSOR_BYTES = saved
        results[label] = (t1, t2, factors)
    (b1, b2, fb), (n1, n2, fn) = results["before"], results["now"]
    agree1 = max(max(rel(x.A, y.A), rel(x.S, y.S)) for x, y in zip(fn, fb))
    agree2 = max(rel(x.corrected, y.corrected) for x, y in zip(fn, fb))
    return [
        (
            name,
            "K-FAC factor pass (A, S)",
            f"{OLD_CAPTURE} points",
            f"{step} points",
            b1,
            n1,
            agree1,
        ),
        (
            name,
            "EK-FAC correction pass (Λ)",
            f"{OLD_CAPTURE} points, 2²⁴ values",
            f"{step} points, 2²¹ values",
            b2,
            n2,
            agree2,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mnist", default="../shared/data/mnist/mnist.npz", help="mnist.npz (or the IDX folder)"
    )
    ap.add_argument(
        "--out", default=None, help=f"Markdown file whose section {SECTION!r} is (re)written"
    )
    ap.add_argument("--models", default="linear,mlp,cnn")
    ap.add_argument(
        "--n", type=int, default=1000, help="images for the networks (default 1,000, the W3 size)"
    )
    ap.add_argument(
        "--n-linear", type=int, default=20000, help="images for softmax regression (default 20,000)"
    )
    ap.add_argument(
        "--factors", default="mlp,cnn", help="models whose K-FAC factor passes are timed"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--malloc-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "repeat linear's sweep and the CNN's factor passes with glibc's mmap threshold at 4 GiB"
            " in a child"
        ),
    )
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info(threads_set=True)
    mnist = load_mnist(args.mnist)
    t_start = time.perf_counter()
    rows: list[tuple] = []
    for name in args.models.split(","):
        n = args.n_linear if name == "linear" else args.n
        obj = uw.Objective(model_for(name), "cross_entropy", l2=0.01)
        X = torch.tensor(mnist.x_train[:n], dtype=torch.float32).reshape(n, -1)
        data = uw.Data.from_any((X, torch.tensor(mnist.y_train[:n], dtype=torch.int64)))
        before, now = OLD_GRAD_BYTES, batching.TENSOR_BYTES
        t_b, _ = median_time(sweep, (obj, data, before), args.repeats)
        t_n, _ = median_time(sweep, (obj, data, now), args.repeats)
        rows.append(
            (
                name,
                f"per-sample-gradient sweep, n = {n:,}",
                f"{grad_chunk_size(obj.p, 2048, obj.dtype, before)} points (≤ 256 MiB)",
                f"{grad_chunk_size(obj.p, 2048, obj.dtype, now)} points (≤ 16 MiB)",
                t_b,
                t_n,
                float("nan"),
            )
        )
        if name in args.factors.split(","):
            rows += factor_rows(name, obj, data, args.repeats)
        if not args.json:
            for r in rows[-3:] if name in args.factors.split(",") else rows[-1:]:
                print(
                    f"{r[0]:7s} {r[1]:34s} before {r[4]:7.3f}s  now {r[5]:7.3f}s "
                    f" {r[4] / r[5]:5.2f}×  agree {r[6]:.1e}",
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows))
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
            "linear,cnn",
            "--factors",
            "cnn",
            "--n",
            str(args.n),
            "--n-linear",
            str(args.n_linear),
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
        for r in json.loads(out):
            rows.append((f"{r[0]} (mmap threshold 4 GiB)", *r[1:6], float("nan")))
            print(
                f"{r[0]} with MALLOC_MMAP_THRESHOLD_=4 GiB, {r[1]}: before {r[4]:7.3f}s  now"
                f" {r[5]:7.3f}s  {r[4] / r[5]:5.2f}×",
                flush=True,
            )
    wall = time.perf_counter() - t_start
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["wall time of the script"] = f"{wall:.0f} s"
    command = "python bench/bench_batch_budget.py " + " ".join(
        shlex.quote(a) for a in argv or sys.argv[1:]
    )
    paras = __doc__.split("\n\n")
    lines = [
        "## Batches within the tensor budget: per-sample gradients and K-FAC factor passes",
        "",
        f"Command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += [
        "",
        " ".join(paras[1].split()),
        "",
        " ".join(paras[2].split()),
        "",
        (
            "*speed-up* = time before / time now, both measured in this run (the rows marked *mmap"
            " threshold 4 GiB*: in a child process with `MALLOC_MMAP_THRESHOLD_=4294967296`)."
        ),
        "",
        "| model | what | batches before | batches now | s before | s now | speed-up | agree |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {m} | {w} | {b} | {nw} | {tb:.3f} | {tn:.3f} | {tb / tn:.2f}× |"
        f" {'–' if a != a else f'{a:.1e}'} |"
        for m, w, b, nw, tb, tn, a in rows
    ]
    if args.out:
        replace_section(args.out, SECTION, "\n".join(lines))
        print(f"wrote section {SECTION!r} of {args.out}")


if __name__ == "__main__":
    main()
