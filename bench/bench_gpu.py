#!/usr/bin/env python
"""The GPU check of ``make gpu-check``: two influence queries run on the model's device and on the
CPU in one process, timed, and compared with each other.

* **W2** — MNIST multinomial logistic regression (``nn.Linear(784, 10)``, float32, θ̂ from
  ``upweight.refit`` in float64), n = 20,000 training images, K = 10 test images, block CG to
  rtol 1e-3 (Koh & Liang 2017, Eq. 2 with H = ∇²R + λI exact: the output is linear in θ).
* **W5** — a 2-layer BERT-style classifier built from a config (``bench/peers``' W5: Enron-Spam
  enron1, n = 1,000 e-mails of 32 tokens, a few AdamW epochs, not timed), every parameter, the
  Gauss–Newton matrix with damping 0.01, EK-FAC (LayerNorms and position embeddings in exact
  module-local blocks).

Per query: wall time of ``Influence(...).fit`` + ``up_loss`` on each device (after one warm-up run
on that device, so CUDA initialisation and kernel selection are not counted) and the agreement of
the two answers (Spearman per test point, min; max relative difference). The table goes to the
section ``gpu-check`` of ``--out``.

Usage (from the repository root)::

    .venv/bin/python bench/bench_gpu.py --out bench/RESULTS.md          # make gpu-check
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

import upweight as uw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from _sections import replace_section  # noqa: E402
from bench_solvers import machine_info  # noqa: E402

DATA = Path(os.environ.get("UPWEIGHT_DATA", HERE.parent.parent / "shared" / "data"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, run: Any) -> tuple[float, np.ndarray]:
    run(device)  # warm-up on this device
    _sync(device)
    t0 = time.perf_counter()
    values = run(device)
    _sync(device)
    return time.perf_counter() - t0, values


def w2(args: argparse.Namespace) -> tuple[str, Any]:
    with np.load(args.mnist) as f:
        X = (
            torch.from_numpy(f["x_train"][: args.n_mnist].reshape(args.n_mnist, -1)).double()
            / 255.0
        )
        y = torch.from_numpy(f["y_train"][: args.n_mnist]).long()
        Xt = torch.from_numpy(f["x_test"][:10].reshape(10, -1)).double() / 255.0
        yt = torch.from_numpy(f["y_test"][:10]).long()
    model = torch.nn.Linear(784, 10).double()
    obj = uw.Objective(model, "cross_entropy", l2=0.01)
    model.load_state_dict(uw.refit(obj, uw.Data.from_any((X, y))).params)
    model = model.float().eval()
    train, test = (X.float(), y), (Xt.float(), yt)

    def run(device: str) -> np.ndarray:
        o = uw.Objective(copy.deepcopy(model).to(device), "cross_entropy", l2=0.01)
        inf = uw.Influence(o, solver=uw.CG(rtol=1e-3), progress=False).fit(train)
        return inf.up_loss(test).values

    return (
        f"W2 — MNIST softmax regression, n = {args.n_mnist:,}, K = 10, block CG rtol 1e-3, float32",
        run,
    )


def w5(args: argparse.Namespace) -> tuple[str, Any]:
    import bench_peers as bp
    from methods import build_model

    from upweight.solvers.kfac import EKFAC

    ns = argparse.Namespace(enron=str(args.enron), n_test=10, w5_epochs=2, w5_lr=2e-3, damping=None)
    wl = bp.load_workload("W5:1000", ns)
    sd = bp.train_transformer(wl, ns)
    model = build_model("bert", config=wl.config)
    model.load_state_dict(sd)
    model.eval()
    train = (bp._bert_inputs(wl.X, wl.mask), torch.from_numpy(wl.y))
    test = (bp._bert_inputs(wl.Xt, wl.mask_t), torch.from_numpy(wl.yt))

    def run(device: str) -> np.ndarray:
        o = uw.Objective(copy.deepcopy(model).to(device), "cross_entropy")
        inf = uw.Influence(
            o,
            solver=EKFAC(),
            curvature="gauss-newton",
            damping=bp.W5_DAMPING,
            progress=False,
            grad_tol=1e9,
            max_residual=None,
        ).fit(train)
        return inf.up_loss(test).values

    return (
        (
            "W5 — BERT-style classifier (2 layers, hidden 64) on Enron, n = 1,000, K = 10, EK-FAC,"
            " Gauss–Newton"
        ),
        run,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", default="cuda", help="the device to check against the CPU (default cuda)"
    )
    ap.add_argument("--out", default="bench/RESULTS.md")
    ap.add_argument("--mnist", default=str(DATA / "mnist" / "mnist.npz"))
    ap.add_argument("--enron", default=str(DATA / "enron1" / "enron1.csv.gz"))
    ap.add_argument("--n-mnist", type=int, default=20000)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"bench_gpu: no CUDA device here (torch {torch.__version__}); run it where a GPU is.",
            file=sys.stderr,
        )
        return 2
    info = machine_info()
    if args.device.startswith("cuda"):
        info["GPU"] = f"{torch.cuda.get_device_name(args.device)} (CUDA {torch.version.cuda})"
    rows = []
    for make in (w2, w5):
        title, run = make(args)
        t_dev, v_dev = timed(args.device, run)
        t_cpu, v_cpu = timed("cpu", run)
        rho = min(scipy.stats.spearmanr(a, b)[0] for a, b in zip(v_dev, v_cpu))
        rel = float(np.abs(v_dev - v_cpu).max() / np.abs(v_cpu).max())
        rows.append(
            f"| {title} | {t_dev:.2f} | {t_cpu:.2f} | {t_cpu / t_dev:.1f}× | {rho:.4f} |"
            f" {rel:.1e} |"
        )
        print(rows[-1], flush=True)
    command = [os.path.relpath(__file__, HERE.parent), *sys.argv[1:]]
    lines = [
        "## GPU check (`make gpu-check`)",
        "",
        "Command: `python " + " ".join(shlex.quote(a) for a in command) + "`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        (
            f"| query | {args.device} s | cpu s | speed-up | Spearman {args.device} vs cpu (min) |"
            " max rel. difference |"
        ),
        "|---|--:|--:|--:|--:|--:|",
        *rows,
    ]
    replace_section(args.out, "gpu-check", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
