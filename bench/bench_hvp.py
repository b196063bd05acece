#!/usr/bin/env python
"""Generic Hessian-vector products: upweight's reverse-over-reverse ``hvp_sum`` against the
``vmap``-of-forward-over-reverse product it replaced, on real MNIST images.

Both compute Σ_{i∈batch} ∇²θL(zᵢ, θ) vⱼ for k vectors vⱼ (Pearlmutter 1994), the product every
generic solver (CG, LiSSA, Arnoldi, Nyström, Direct from HVPs) is built on when θ is not a single
linear output layer (Koh & Liang 2017, §3: "HVPs ... in O(np)"):

* **before** (upweight up to commit 91b3e60): ``vmap`` over the k tangents of
  ``jvp(grad(loss))`` — forward over reverse, the tangents batched through every operator, in
  groups of at most 8,192 (tangent, point) pairs (its memory grows with k·b);
* **now** (``upweight.core.curvature.hvp_sum``): one forward and backward pass that keeps its graph,
  then one backward pass through it per tangent, ∇θ⟨∇θL, vⱼ⟩.

Models (float32, parameters as initialised by torch, seed 0; cross-entropy summed over the batch):
``linear`` = ``nn.Linear(784, 10)`` (p = 7,850), the W3 ``mlp`` (784-1024-256-10 tanh,
p = 1,068,810) and ``cnn`` (2 conv + 2 linear, tanh, p = 46,730) of the peer benchmark, and the
``fig2-cnn`` (Koh & Liang's all-convolutional tanh net of §4.2, p = 2,616). Inputs: the first b
MNIST training images of Koh & Liang's split, /255. Each cell is the median of ``--repeats`` timed
calls after one warm-up, both paths in the same process, one thread; "agree" is the largest
relative difference ‖now − before‖/‖before‖ over the k products.

Usage (from the repository root)::

    .venv/bin/python bench/bench_hvp.py --out bench/RESULTS.md        # make bench-hvp
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, jvp, vmap

import upweight as uw
from upweight.core.curvature import hvp_sum
from upweight.datasets.mnist import load_mnist
from upweight.paper.fig2 import AllConvTanh

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from _sections import replace_section  # noqa: E402
from bench_solvers import machine_info  # noqa: E402
from methods import build_model  # noqa: E402

#: the previous path's cap on (tangent, point) pairs per vectorised pass
OLD_MAX_TANGENT_POINTS = 8192


def hvp_sum_vmap_forward_over_reverse(
    obj: uw.Objective, params: dict, V: torch.Tensor, batch: uw.Data
) -> torch.Tensor:
    """The product as upweight computed it before: vmap over tangents of jvp(grad(loss))."""
    group = max(1, OLD_MAX_TANGENT_POINTS // max(len(batch), 1))
    if len(V) > group:
        return torch.cat(
            [
                hvp_sum_vmap_forward_over_reverse(obj, params, V[s : s + group], batch)
                for s in range(0, len(V), group)
            ]
        )

    def batch_loss(p: dict) -> torch.Tensor:
        return obj.losses(p, batch.X, batch.y).sum()

    def hvp(v: dict) -> dict:
        return jvp(grad(batch_loss), (params,), (v,))[1]

    return obj.space.flatten(vmap(hvp)(obj.space.unflatten(V)), batch_dims=1)


def median_time(fn, args: tuple, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _what_is_measured() -> list[str]:
    """The docstring's description of the two paths and the models, as Markdown lines."""
    out: list[str] = []
    for para in __doc__.split("\n\n")[1:4]:
        bullets = para.lstrip().startswith("* ")
        for item in para.strip().split("\n* ") if bullets else [para]:
            text = " ".join(item.split())
            out.append("* " + text.removeprefix("* ") if bullets else text)
        out.append("")
    return out[:-1]


def model_for(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "fig2-cnn":
        return AllConvTanh().float().eval()
    return build_model(name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mnist", default="../shared/data/mnist/mnist.npz", help="mnist.npz (or the IDX folder)"
    )
    ap.add_argument("--out", default=None, help="Markdown file whose section 'hvp' is (re)written")
    ap.add_argument("--models", default="linear,mlp,cnn,fig2-cnn")
    ap.add_argument(
        "--cases", default="1x512,10x512,100x256", help="k×b pairs: k tangents over b images"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info(threads_set=True)
    data = load_mnist(args.mnist)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    t_start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        model = model_for(name)
        obj = uw.Objective(model, "cross_entropy")
        params = {k: v.detach() for k, v in model.named_parameters()}
        for k, b in cases:
            X = torch.tensor(data.x_train[:b], dtype=torch.float32).reshape(b, -1)
            y = torch.tensor(data.y_train[:b], dtype=torch.int64)
            batch = uw.Data.from_any((X, y))
            V = torch.randn(k, obj.p, generator=torch.Generator().manual_seed(1))
            t_old, old = median_time(
                hvp_sum_vmap_forward_over_reverse, (obj, params, V, batch), args.repeats
            )
            t_new, new = median_time(hvp_sum, (obj, params, V, batch), args.repeats)
            agree = float(((new - old).norm(dim=1) / old.norm(dim=1)).max())
            rows.append((name, obj.p, k, b, t_old, t_new, agree))
            print(
                f"{name:9s} p={obj.p:>9,} k={k:>3} b={b:>4}: before {t_old:8.3f}s  now"
                f" {t_new:8.3f}s  speed-up {t_old / t_new:5.2f}×  agree {agree:.1e}",
                flush=True,
            )
    wall = time.perf_counter() - t_start
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    machine["wall time of the script"] = f"{wall:.0f} s"
    command = "python bench/bench_hvp.py " + " ".join(shlex.quote(a) for a in argv or sys.argv[1:])
    lines = [
        "## Generic HVPs: reverse over reverse (now) vs vmap of forward over reverse (before)",
        "",
        f"Command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += [
        "",
        *_what_is_measured(),
        "",
        "| model | p | k tangents | b images | before s | now s | speed-up | agree |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {n} | {p:,} | {k} | {b} | {to:.4f} | {tn:.4f} | {to / tn:.2f}× | {a:.1e} |"
        for n, p, k, b, to, tn, a in rows
    ]
    if args.out:
        replace_section(args.out, "hvp", "\n".join(lines))
        print(f"wrote section 'hvp' of {args.out}")


if __name__ == "__main__":
    main()
