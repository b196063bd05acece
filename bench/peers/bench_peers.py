#!/usr/bin/env python
"""Side-by-side benchmark: upweight against pyDVL, captum, kronfluence and dattri.

Query (issue "Scale"): the influence I_up,loss of **all** training points on K test points
(Koh & Liang 2017, eq. 2) for classifiers trained with cross-entropy and the L2 term λ = 0.01 on
all parameters (float32 models):

* W1 — multinomial logistic regression on scikit-learn digits (first 1,500 rows train; p = 650);
* W2 — the same on real MNIST, Koh & Liang's split (train = official train rows 5,000..), cut to
  its first ``--n-train`` rows (p = 7,850); ``W2:2000`` sets n for that workload alone;
* W3-mlp — an MLP 784-1024-256-10 (tanh, p = 1,068,810) on MNIST, n = 5,000 by default;
* W3-cnn — a small CNN (2 × Conv2d + average pooling, 2 × Linear, tanh, p = 46,730), n = 10,000;
* W5 — a small BERT-style classifier (``transformers.BertForSequenceClassification`` from a config:
  2 layers, hidden 64, 2 heads, eager attention, word-level vocabulary of the training split) on
  spam/ham e-mails of Enron-Spam ``enron1``, n = 1,000 by default (``W5:<n>``); θ = every parameter;
  no L2 and a damping δ, with the **Gauss–Newton** matrix G + δI as the curvature of every method
  and of the reference.

W1/W2: θ̂ by ``upweight.refit`` (float64 L-BFGS) cast to float32; the **reference** is closed-form
float64 linear algebra, independent of every library: ∇L(z) = (p − e_y) ⊗ x̃ and
H = (1/n) Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + λI (x̃ = [x, 1]), formed densely and solved by
Cholesky; cross-checked against upweight's float64 Direct (p ≤ 2,000) or CG (rtol 1e-10).
W5: θ̂ by a few epochs of AdamW (not timed; not a minimum — influence is taken with the damped GGN,
as kronfluence does); the **reference** is upweight's float64 CG on the damped GGN of the float64
copy. W3: θ̂ by Adam then full-batch L-BFGS in float32 (not timed); a Lanczos run checks that H + λI
is positive definite at θ̂ (else a damping δ is added for every method and the reference); the
**reference** is long-run plain CG in float64 on the float64 copy of θ̂ (rtol 1e-10 or stagnation),
with Pearlmutter HVPs written here with torch.func, its final residual reported.

Each method runs in a **fresh worker process** (imports and data loading are not timed; the
library's own construction, fit/preprocessing and the scoring of all training points are), so
the peak RSS of the child (``ru_maxrss`` from ``os.wait4``) is per method; a cold run that took
< 20 s is repeated in the same process (the warm time); ``--timeout`` stops a method and reports it
as such. Methods that need a dense p × p matrix are skipped above p = 20,000 with that reason.
Scores are compared with the reference per test point after the library's documented sign is
applied (Spearman, Pearson; mean and min over the K test points); a negative correlation after
that is reported as a sign flip. The cost floor is one per-sample-gradient sweep over the
training set (upweight's ``iter_per_sample_grads``, float32, median of 3 after a warm-up),
measured in the same run.

Output: each workload replaces its section ``peers-<key>`` of ``--out`` (bench/RESULTS.md; keys
``W1``, ``W2:20000``, ``W3-mlp:5000``, …) and carries its rows as JSON in an HTML comment, from
which the section ``peers-summary`` (per-library bests, the issue's targets) is rebuilt.

Usage (from the repository root, in the bench environment made by bench/peers/setup.sh)::

    .venv-bench/bin/python bench/peers/bench_peers.py --workloads W1 --n-test 100
    .venv-bench/bin/python bench/peers/bench_peers.py --workloads W3-mlp:500 --methods upweight
    --out /tmp/w3.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata as md
import json
import os
import pickle
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
from typing import Any

import numpy as np
import scipy.linalg
import scipy.stats
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from methods import (  # noqa: E402
    NO_RESNET,
    NO_TRANSFORMER,
    W4_COVERS,
    W4_METHODS,
    Method,
    Problem,
    all_methods,
    build_model,
)

sys.path.insert(0, str(REPO / "bench"))
from _machine import bfloat16_support  # noqa: E402
from _sections import embed_json, read_sections, replace_section, section_json  # noqa: E402

L2 = 0.01
ACCURATE = 0.99  # the Spearman bar of the issue's target
DEFAULT_K = 10  # test points of a workload whose section key does not name K
# a method whose cold run took less runs once more in the same process (warm time)
WARM_BELOW_S = 20.0
T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def set_threads(n: int) -> None:
    """One setting for torch and the BLAS/OpenMP pools numpy/scipy use (set before they start)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


# ── workloads ────────────────────────────────────────────────────────────────────────────
#: default n_train of the W3 workloads (overridden by W3-mlp:<n> / W3-cnn:<n>)
W3_DEFAULT_N = {"mlp": 5000, "cnn": 10000}
#: W5: default n_train, tokens per sequence ([CLS] + words, truncated, padded), vocabulary cap,
#: damping δ
W5_DEFAULT_N, W5_TOKENS, W5_VOCAB, W5_DAMPING = 1000, 32, 3000, 1e-2
#: W4: default n_train, ResNet width (64 = ResNet-18 itself), damping δ of the Gauss–Newton matrix;
#: θ̂ by SGD (steps, batch, learning rate, momentum)
W4_DEFAULT_N, W4_WIDTH, W4_DAMPING = 2000, 64, 1e-2
W4_STEPS, W4_BATCH, W4_LR, W4_MOMENTUM = 300, 64, 0.05, 0.9
#: W5's model: BertConfig fields (vocab_size is the vocabulary built from the training split)
W5_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": W5_TOKENS,
    "num_labels": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
}


@dataclass
class Workload:
    # the report section's key: "W2:20000", "W3-mlp:1000", …, with ":K<k>" unless K = 10 ("W1:K100")
    key: str
    title: str
    source: str
    X: np.ndarray  # float64 (n, d)
    y: np.ndarray
    Xt: np.ndarray  # the K test points
    yt: np.ndarray
    arch: str = "linear"  # methods.build_model's architecture
    info: dict[str, str] = field(default_factory=dict)
    Xte_all: np.ndarray | None = None  # W3: the whole official test set, for the accuracy
    yte_all: np.ndarray | None = None
    data_key: str = ""  # the key without K: data set and n ("W3-mlp:1000")
    mask: np.ndarray | None = None  # W5: attention masks of X and Xt (X, Xt are token ids, int64)
    mask_t: np.ndarray | None = None
    config: str = ""  # W5: the BertConfig as JSON
    mask_te_all: np.ndarray | None = None  # W5: attention masks of Xte_all
    width: int = 64  # W4: the ResNet's base width

    def __post_init__(self) -> None:
        """Queries of another K on the same data get their own section: ":K<k>" in the key and the
        title."""
        self.data_key = self.key
        if len(self.Xt) != DEFAULT_K:
            self.key += f":K{len(self.Xt)}"
            self.title += f", K = {len(self.Xt)}"


def _mnist(args: argparse.Namespace) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    path = Path(args.mnist)
    path = (path if path.is_absolute() else (REPO / path)).resolve()
    with np.load(path) as f:
        return path, f["x_train"], f["y_train"], f["x_test"], f["y_test"]


def _enron(args: argparse.Namespace, n: int, k: int) -> Workload:
    """W5: enron1's 5,172 messages (1 = spam) shuffled with seed 0; train = the first n, test = the
    first K of the last 1,000 (the same test points for every n ≤ 4,172). Words = the lower-cased
    text split on white space (the corpus has punctuation separated already); a sequence = [CLS] +
    its first T − 1 words, padded; vocabulary = the words occurring ≥ 2 times in the training
    sequences, the most frequent 3,000 − 3 (0 = [PAD], 1 = [UNK], 2 = [CLS])."""
    import collections
    import csv
    import gzip

    path = Path(args.enron)
    path = (path if path.is_absolute() else (REPO / path)).resolve()
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not 1 <= n <= len(rows) - 1000:
        raise SystemExit(f"W5:{n}: n_train must be in 1..{len(rows) - 1000}")
    perm = np.random.default_rng(0).permutation(len(rows))
    words = [r["text"].lower().split()[: W5_TOKENS - 1] for r in rows]
    labels = np.array([int(r["label"]) for r in rows], np.int64)
    train, test = perm[:n], perm[len(rows) - 1000 :][:k]
    counts = collections.Counter(w for i in train for w in words[i])
    vocab = {w: j + 3 for j, (w, c) in enumerate(counts.most_common(W5_VOCAB - 3)) if c >= 2}

    def encode(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = (
            np.zeros((len(idx), W5_TOKENS), np.int64),
            np.zeros((len(idx), W5_TOKENS), np.int64),
        )
        for r, i in enumerate(idx):
            seq = [2] + [vocab.get(w, 1) for w in words[i]]
            ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
        return ids, mask

    X, M = encode(train)
    Xt, Mt = encode(test)
    config = json.dumps({**W5_CONFIG, "vocab_size": len(vocab) + 3}, sort_keys=True)
    wl = Workload(
        f"W5:{n}",
        f"W5 — Enron spam/ham, BERT-style classifier (2 layers, hidden 64), n = {n:,}",
        f"{path} (Enron-Spam enron1, 1 = spam); shuffled with seed 0, train = first {n:,}, test ="
        f" first K of the last 1,000; [CLS] + the first {W5_TOKENS - 1} words, word-level"
        f" vocabulary of {len(vocab) + 3:,} (words ≥ 2× in the training sequences, [PAD] [UNK]"
        f" [CLS]); {100 * float((X == 1).sum() / M.sum()):.1f} % of the training tokens [UNK],"
        f" {float(M.sum(1).mean()):.1f} tokens a sequence on average,"
        f" {100 * float(labels[train].mean()):.0f} % spam",
        X,
        labels[train],
        Xt,
        labels[test],
        "bert",
        mask=M,
        mask_t=Mt,
        config=config,
    )
    wl.Xte_all, wl.mask_te_all = encode(perm[len(rows) - 1000 :])
    wl.yte_all = labels[perm[len(rows) - 1000 :]]
    return wl


def _mnist_resnet(args: argparse.Namespace, n: int, k: int) -> Workload:
    """W4: ResNet-18 (``--w4-width``) on MNIST, Koh & Liang's split as W2/W3 (train = official
    train rows 5,000.., the first n; test = the first K of the official test set); key ``W4:<n>``,
    or ``W4-w<width>:<n>`` at another width than ResNet-18's 64."""
    path, xtr, ytr, xte, yte = _mnist(args)
    X = xtr[5000 : 5000 + n].reshape(-1, 784).astype(np.float64) / 255.0
    w = args.w4_width
    key = f"W4:{len(X)}" if w == 64 else f"W4-w{w}:{len(X)}"
    what = (
        "ResNet-18" if w == 64 else f"ResNet-18 at width {w} (widths {w}-{2 * w}-{4 * w}-{8 * w})"
    )
    wl = Workload(
        key,
        f"W4 — MNIST, {what}, every parameter, n = {len(X):,}",
        f"{path}; train = official train rows 5000..{5000 + len(X) - 1} (Koh & Liang "
        f"split, first {len(X):,}), /255, 1 channel 28 × 28; test = first K of the "
        "official test set",
        X,
        ytr[5000 : 5000 + n].astype(np.int64),
        xte[:k].reshape(-1, 784).astype(np.float64) / 255.0,
        yte[:k].astype(np.int64),
        "resnet",
        width=w,
    )
    wl.Xte_all, wl.yte_all = xte.reshape(-1, 784).astype(np.float64) / 255.0, yte.astype(np.int64)
    return wl


def load_workload(spec: str, args: argparse.Namespace) -> Workload:
    name, _, n_txt = spec.partition(":")
    name = {
        "digits": "W1",
        "mnist": "W2",
        "mlp": "W3-MLP",
        "cnn": "W3-CNN",
        "enron": "W5",
        "resnet": "W4",
    }.get(name.lower(), name.upper())
    k = args.n_test
    if name == "W4":
        return _mnist_resnet(args, int(n_txt) if n_txt else W4_DEFAULT_N, k)
    if name == "W5":
        return _enron(args, int(n_txt) if n_txt else W5_DEFAULT_N, k)
    if name == "W1":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)
        return Workload(
            "W1",
            "W1 — scikit-learn digits (8×8)",
            "sklearn load_digits, X/16; train = rows 0..1499, test = rows 1500.. (first K scored)",
            X[:1500],
            y[:1500],
            X[1500 : 1500 + k],
            y[1500 : 1500 + k],
        )
    if name in ("W2", "W3-MLP", "W3-CNN"):
        arch = {"W2": "linear", "W3-MLP": "mlp", "W3-CNN": "cnn"}[name]
        n = int(n_txt) if n_txt else (args.n_train if arch == "linear" else W3_DEFAULT_N[arch])
        path, xtr, ytr, xte, yte = _mnist(args)
        X = xtr[5000 : 5000 + n].reshape(-1, 784).astype(np.float64) / 255.0
        key = f"{'W2' if arch == 'linear' else 'W3-' + arch}:{len(X)}"
        what = {
            "linear": "W2 — MNIST (28×28)",
            "mlp": "W3-mlp — MNIST, MLP 784-1024-256-10 (tanh)",
            "cnn": "W3-cnn — MNIST, small CNN",
        }[arch]
        wl = Workload(
            key,
            f"{what}, n = {len(X):,}",
            f"{path}; train = official train rows 5000..{5000 + len(X) - 1} (Koh & Liang split, "
            f"first {len(X):,}), /255; test = first K of the official test set",
            X,
            ytr[5000 : 5000 + n].astype(np.int64),
            xte[:k].reshape(-1, 784).astype(np.float64) / 255.0,
            yte[:k].astype(np.int64),
            arch,
        )
        if arch != "linear":
            wl.Xte_all, wl.yte_all = (
                xte.reshape(-1, 784).astype(np.float64) / 255.0,
                yte.astype(np.int64),
            )
        return wl
    raise SystemExit(
        f"unknown workload {spec!r}: use W1, W2[:n], W3-mlp[:n], W3-cnn[:n], W4[:n] or W5[:n]"
    )


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
    wl.info["training (not counted)"] = (
        f"uw.refit, float64 L-BFGS from zero: {secs:.1f} s, {fit.iterations} iterations, "
        f"‖∇R(θ̂)‖₂ = {fit.grad_norm:.1e}"
    )
    return fit.params["weight"].numpy().copy(), fit.params["bias"].numpy().copy(), secs


def softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def closed_form_system(
    wl: Workload, W: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The closed-form gradient and Hessian of softmax regression at (W, b), float64: (H + λI
    (p, p), the test gradients ∇L_test (K, p), the training residuals R = P − Y (n, C), X̃ (n, q)).

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
            H[c * q : (c + 1) * q, c2 * q : (c2 + 1) * q] = blk
            if c2 != c:
                H[c2 * q : (c2 + 1) * q, c * q : (c + 1) * q] = blk.T
    H[np.diag_indices_from(H)] += L2
    Xta = np.hstack([wl.Xt, np.ones((len(wl.Xt), 1))])
    Rt = softmax(wl.Xt @ W.T + b) - np.eye(C)[wl.yt]
    Gt = (Rt[:, :, None] * Xta[:, None, :]).reshape(len(wl.Xt), C * q)  # test gradients
    return H, Gt, P - np.eye(C)[wl.y], Xa


def closed_form_scores(S: np.ndarray, R: np.ndarray, Xa: np.ndarray) -> np.ndarray:
    """I_up,loss (K, n) for the rows sₖ of S (K, p): −sₖᵀ∇L(zᵢ) = −Σ_c Rᵢc (x̃ᵢ · sₖ,c)."""
    q = Xa.shape[1]
    return np.stack([-(R * (Xa @ s.reshape(-1, q).T)).sum(axis=1) for s in S.astype(np.float64)])


def closed_form_reference(wl: Workload, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """I_up,loss (K, n) from the closed-form gradient and Hessian of softmax regression, float64
    (``closed_form_system``), s_test by a Cholesky solve."""
    H, Gt, R, Xa = closed_form_system(wl, W, b)
    S = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H), Gt.T).T  # H⁻¹∇L_test, (K, C·q)
    return closed_form_scores(S, R, Xa)


def upweight_float64(wl: Workload, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, str]:
    """The cross-check of the reference: upweight on the float64 model (Direct, or CG rtol
    1e-10)."""
    import upweight as uw

    model = torch.nn.Linear(wl.X.shape[1], 10).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    p = model.weight.numel() + model.bias.numel()
    # Direct forms H in closed form (one GEMM per class pair, like the reference, but through
    # upweight): cheaper than a float64 CG to 1e-10 for K = 100 right-hand sides at n = 55,000
    solver, label = (uw.Direct(), "Direct") if p <= 10_000 else (uw.CG(rtol=1e-10), "CG rtol=1e-10")
    inf = uw.Influence(uw.Objective(model, "cross_entropy", l2=L2), solver=solver, progress=False)
    inf.fit(uw.Data.from_any((torch.from_numpy(wl.X), torch.from_numpy(wl.y))))
    return (
        np.asarray(
            inf.up_loss((torch.from_numpy(wl.Xt), torch.from_numpy(wl.yt))).values, np.float64
        ),
        label,
    )


# ── W3: a network, trained in float32, and a long-run float64 CG reference ───────────────
def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


class NetProblem:
    """R(θ) = (1/n) Σᵢ CE(f(xᵢ; θ), yᵢ) + (λ/2)‖θ‖² for a ``build_model`` network, with Pearlmutter
    HVPs (reverse over reverse, ``torch.autograd``) and directional derivatives of the per-point
    losses (forward mode, ``torch.func.jvp``) — independent of every benchmarked library. Data are
    processed in chunks of ``chunk`` points."""

    def __init__(
        self, model: torch.nn.Module, X: np.ndarray, y: np.ndarray, l2: float, chunk: int = 500
    ) -> None:
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.names = [k for k, _ in model.named_parameters()]
        self.shapes = [t.shape for _, t in model.named_parameters()]
        self.params = {k: t.detach() for k, t in model.named_parameters()}
        self.p = sum(t.numel() for t in self.params.values())
        self.X = torch.as_tensor(X, dtype=self.dtype)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.l2, self.chunk = l2, chunk

    def unflat(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """(k, p) → {name: (k, *shape)} (views)."""
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes):
            m = int(np.prod(shape))
            out[name] = V[:, i : i + m].reshape(len(V), *shape)
            i += m
        return out

    def flat_params(self) -> torch.Tensor:
        return torch.cat([self.params[k].reshape(-1) for k in self.names])

    def _loss_sum(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        out = torch.func.functional_call(self.model, params, (x,))
        return torch.nn.functional.cross_entropy(out, y, reduction="sum")

    def _chunks(self):  # noqa: ANN202
        for i in range(0, len(self.X), self.chunk):
            yield self.X[i : i + self.chunk], self.y[i : i + self.chunk]

    def grad_risk(self) -> torch.Tensor:
        """∇R(θ̂), flat."""
        g = torch.zeros(self.p, dtype=self.dtype)
        for x, y in self._chunks():
            gd = torch.func.grad(self._loss_sum)(self.params, x, y)
            g += torch.cat([gd[k].reshape(-1) for k in self.names])
        return g / len(self.X) + self.l2 * self.flat_params()

    def hvp(self, V: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """(H + δI)V for V of shape (k, p), H = ∇²R(θ̂): reverse over reverse, ∇θ⟨∇θL, vⱼ⟩ —
        one forward and backward pass per chunk that keeps its graph, then one backward pass
        through it per vector (2× faster than ``vmap`` of forward over reverse on the CNN)."""
        out = torch.zeros_like(V)
        leaves = [self.params[k].detach().requires_grad_(True) for k in self.names]
        for x, y in self._chunks():
            with torch.enable_grad():
                loss = self._loss_sum(dict(zip(self.names, leaves)), x, y)
                g = torch.autograd.grad(loss, leaves, create_graph=True)
                for j in range(len(V)):
                    v = self.unflat(V[j : j + 1])
                    hv = torch.autograd.grad(
                        g, leaves, [v[k][0] for k in self.names], retain_graph=j < len(V) - 1
                    )
                    out[j] += torch.cat([t.reshape(-1) for t in hv])
        return out / len(self.X) + (self.l2 + damping) * V

    def test_grads(self, Xt: np.ndarray, yt: np.ndarray) -> torch.Tensor:
        """∇θL(z_test, θ̂) per test point, (K, p)."""
        rows = []
        for x, y in zip(
            torch.as_tensor(Xt, dtype=self.dtype), torch.as_tensor(yt, dtype=torch.long)
        ):
            gd = torch.func.grad(self._loss_sum)(self.params, x[None], y[None])
            rows.append(torch.cat([gd[k].reshape(-1) for k in self.names]))
        return torch.stack(rows)

    def train_directional(self, S: torch.Tensor) -> torch.Tensor:
        """sₖᵀ∇θL(zᵢ, θ̂) for every training point i and row k of S, (K, n): one forward-mode
        ``jvp`` of the per-point losses along sₖ (no per-sample gradient is formed)."""
        out = []
        for x, y in self._chunks():

            def losses(prm: dict[str, torch.Tensor]) -> torch.Tensor:
                o = torch.func.functional_call(self.model, prm, (x,))  # noqa: B023
                return torch.nn.functional.cross_entropy(o, y, reduction="none")  # noqa: B023

            rows = []
            for k in range(len(S)):
                tangent = {name: v[0] for name, v in self.unflat(S[k : k + 1]).items()}
                rows.append(torch.func.jvp(losses, (self.params,), (tangent,))[1])
            out.append(torch.stack(rows))
        return torch.cat(out, dim=1)


def train_network(wl: Workload, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """θ̂ of a W3 network in float32: Adam on minibatches of R, then full-batch L-BFGS (strong
    Wolfe) until ‖∇R‖₂ ≤ ``--lbfgs-gtol`` or ``--lbfgs-iter`` iterations. Not timed as a method."""
    torch.manual_seed(0)
    model = build_model(wl.arch)
    X, y = torch.as_tensor(wl.X, dtype=torch.float32), torch.as_tensor(wl.y)
    params = list(model.parameters())

    def risk(xb: torch.Tensor, yb: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(xb), yb, reduction="sum") * scale

    t0 = time.perf_counter()
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.adam_epochs):
        for idx in torch.randperm(len(X), generator=gen).split(128):
            opt.zero_grad()
            loss = risk(X[idx], y[idx], 1.0 / len(idx)) + 0.5 * L2 * sum(
                (t * t).sum() for t in params
            )
            loss.backward()
            opt.step()
    t_adam = time.perf_counter() - t0
    chunk = 2500

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        total = 0.5 * L2 * sum((t * t).sum() for t in params)
        total.backward()
        total = total.detach()
        for i in range(0, len(X), chunk):  # the full-data loss in chunks (bounded activations)
            part = risk(X[i : i + chunk], y[i : i + chunk], 1.0 / len(X))
            part.backward()
            total = total + part.detach()
        return total

    lbfgs = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=args.lbfgs_iter,
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    it = 0
    t1 = time.perf_counter()
    # LBFGS.step runs max_iter iterations; check ‖∇R‖₂ between blocks of 25
    while it < args.lbfgs_iter:
        lbfgs.param_groups[0]["max_iter"] = min(25, args.lbfgs_iter - it)
        lbfgs.step(closure)
        it += lbfgs.param_groups[0]["max_iter"]
        gnorm = float(torch.sqrt(sum((t.grad * t.grad).sum() for t in params)))
        if gnorm <= args.lbfgs_gtol or not np.isfinite(gnorm):
            break
    closure()
    gnorm = float(torch.sqrt(sum((t.grad * t.grad).sum() for t in params)))
    t_lbfgs = time.perf_counter() - t1
    with torch.no_grad():
        acc_tr = float((model(X).argmax(1) == y).double().mean())
        assert wl.Xte_all is not None and wl.yte_all is not None
        acc_te = float(
            (
                model(torch.as_tensor(wl.Xte_all, dtype=torch.float32)).argmax(1)
                == torch.as_tensor(wl.yte_all)
            )
            .double()
            .mean()
        )
    wl.info["training (not counted)"] = (
        f"float32, seed 0: Adam (lr 1e-3, batch 128) {args.adam_epochs} epochs {t_adam:.0f} s, then"
        f" full-batch L-BFGS (strong Wolfe, history 20) {it} iterations {t_lbfgs:.0f} s; ‖∇R(θ̂)‖₂"
        f" = {gnorm:.1e} (float32); accuracy train {acc_tr:.4f} / test {acc_te:.4f} (official test"
        " set, 10,000)"
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bert_inputs(ids: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def train_transformer(wl: Workload, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """W5's θ̂ in float32: AdamW (no weight decay) for ``--w5-epochs`` epochs, batch 32. Not timed;
    not a minimum of the training risk (influence here is taken with the damped Gauss–Newton
    matrix)."""
    torch.manual_seed(0)
    model = build_model("bert", config=wl.config)
    X, y = _bert_inputs(wl.X, wl.mask), torch.from_numpy(wl.y)
    opt = torch.optim.AdamW(model.parameters(), lr=args.w5_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.w5_epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            out = model(input_ids=X["input_ids"][idx], attention_mask=X["attention_mask"][idx])
            torch.nn.functional.cross_entropy(out.logits, y[idx]).backward()
            opt.step()
    model.eval()
    secs = time.perf_counter() - t0
    assert wl.Xte_all is not None and wl.mask_te_all is not None and wl.yte_all is not None
    with torch.no_grad():
        logits = model(**X).logits
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc_tr = float((logits.argmax(1) == y).double().mean())
        acc_te = float(
            (
                model(**_bert_inputs(wl.Xte_all, wl.mask_te_all)).logits.argmax(1)
                == torch.from_numpy(wl.yte_all)
            )
            .double()
            .mean()
        )
    p = sum(t.numel() for t in model.parameters())
    wl.info["training (not counted)"] = (
        f"float32, seed 0: AdamW (lr {args.w5_lr:g}, no weight decay, batch 32) {args.w5_epochs}"
        f" epochs, {secs:.0f} s; training loss {loss:.4f}, accuracy train {acc_tr:.4f} / held-out"
        f" test {acc_te:.4f} (1,000 messages); p = {p:,}"
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_resnet(wl: Workload, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """W4's θ̂ in float32, the issue's protocol: random initialisation (seed 0), ``W4_STEPS``
    steps of SGD (momentum, no weight decay) on minibatches of ``W4_BATCH`` of the n training
    images, BatchNorm in training mode; then eval mode (BatchNorm on its running statistics) for
    influence. Not timed; not a minimum (influence is taken with the damped Gauss–Newton matrix,
    as on W5)."""
    torch.manual_seed(0)
    model = build_model("resnet", width=wl.width)
    X, y = torch.as_tensor(wl.X, dtype=torch.float32), torch.from_numpy(wl.y)
    opt = torch.optim.SGD(model.parameters(), lr=W4_LR, momentum=W4_MOMENTUM)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    step = 0
    while step < W4_STEPS:
        for idx in torch.randperm(len(y), generator=gen).split(W4_BATCH):
            if step == W4_STEPS:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
            step += 1
    model.eval()
    secs = time.perf_counter() - t0
    assert wl.Xte_all is not None and wl.yte_all is not None
    with torch.no_grad():
        logits = torch.cat([model(X[i : i + 500]) for i in range(0, len(X), 500)])
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc_tr = float((logits.argmax(1) == y).double().mean())
        Xte = torch.as_tensor(wl.Xte_all, dtype=torch.float32)
        pred = torch.cat([model(Xte[i : i + 500]).argmax(1) for i in range(0, len(Xte), 500)])
        acc_te = float((pred == torch.from_numpy(wl.yte_all)).double().mean())
    p = sum(t.numel() for t in model.parameters())
    wl.info["training (not counted)"] = (
        f"float32, seed 0: SGD (lr {W4_LR:g}, momentum {W4_MOMENTUM:g}, no weight decay, batch "
        f"{W4_BATCH}, BatchNorm in training mode) {W4_STEPS} steps, {secs:.0f} s; then eval mode. "
        f"Training loss {loss:.4f} (eval mode), accuracy train {acc_tr:.4f} / test {acc_te:.4f} "
        f"(official test set, 10,000); p = {p:,}"
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ggn_problem(
    wl: Workload, sd: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[torch.nn.Module, Any, Any]:
    """W4/W5: the model at θ̂ in ``dtype`` (eval mode) and the train and test batches."""
    if wl.arch == "bert":
        model = build_model("bert", config=wl.config)
        train = (_bert_inputs(wl.X, wl.mask), torch.from_numpy(wl.y))
        test = (_bert_inputs(wl.Xt, wl.mask_t), torch.from_numpy(wl.yt))
    else:
        model = build_model("resnet", width=wl.width)
        train = (torch.as_tensor(wl.X, dtype=dtype), torch.from_numpy(wl.y))
        test = (torch.as_tensor(wl.Xt, dtype=dtype), torch.from_numpy(wl.yt))
    model = model.to(dtype)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval(), train, test


def _ggn_damping(wl: Workload, args: argparse.Namespace) -> float:
    if args.damping is not None:
        return args.damping
    return W5_DAMPING if wl.arch == "bert" else W4_DAMPING


def _ref_rtol(wl: Workload, args: argparse.Namespace) -> float:
    return args.w5_ref_rtol if wl.arch == "bert" else args.w4_ref_rtol


def _ggn_curvature(wl: Workload, damping: float) -> str:
    """The curvature line of W4's and W5's header."""
    covers = "its K-FAC/EK-FAC approximate the same G (true Fisher, labels sampled from the model)"
    if wl.arch == "resnet":
        covers += (
            " on the Conv2d and Linear layers only — the BatchNorm scales and shifts are "
            "left out of its scores; upweight's K-FAC/EK-FAC factor the Conv2d/Linear "
            "layers and give each BatchNorm its exact dense GGN block"
        )
    return (
        "the generalised Gauss–Newton matrix G = (1/n) Σᵢ Jᵢᵀ∇²_zL Jᵢ (PSD) + damping δ = "
        f"{damping:g}, no L2 — for every method and the reference (upweight: "
        "`Influence(curvature='gauss-newton', damping=δ)`; kronfluence: "
        f"`damping_factor=δ`, {covers})"
    )


def reference_cost(wl: Workload, sd: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """W4 without a reference: what the float64 GGN block-CG reference would cost here — one
    float64 GGN product of one vector over the training set (upweight's, as the reference's CG
    takes them), timed, and the cost of one block-CG iteration at K right-hand sides (K such
    products) against ``--ref-max-seconds``."""
    import upweight as uw

    model, train, _ = _ggn_problem(wl, sd, torch.float64)
    obj = uw.Objective(model, "cross_entropy", l2=0.0)
    inf = uw.Influence(
        obj,
        solver=uw.CG(),
        curvature="gauss-newton",
        damping=_ggn_damping(wl, args),
        grad_tol=1e9,
        progress=False,
    )
    inf.fit(train)
    V = torch.randn(1, obj.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    inf.curvature_.matvec(V)
    t = time.perf_counter() - t0
    k = len(wl.yt)
    fits = int(args.ref_max_seconds // (k * t))
    wl.info["reference"] = (
        "none (--no-reference). Measured here: one float64 Gauss–Newton product of one vector "
        f"over the {len(wl.y):,} training images (upweight's, as its CG reference takes them; "
        f"{torch.get_num_threads()} thread(s)) takes {t:.0f} s, so one block-CG iteration at "
        f"K = {k} takes ≈ {k * t:.0f} s and the reference's time cap of {args.ref_max_seconds:g} s "
        f"holds {fits} iteration(s) — against the tens to hundreds a damped-GGN CG needs (the "
        "width-8 W4 section gives the count measured there). No accuracy is measured at this "
        f"size: the rows are compared with {AGREE_WITH}'s scores (agreement, not accuracy)"
    )
    log(f"  {wl.info['reference']}")


def transformer_reference(
    wl: Workload, sd: dict[str, torch.Tensor], args: argparse.Namespace
) -> tuple[np.ndarray, float]:
    """W4's and W5's reference I_up,loss (K, n) = −∇L_testᵀ(G + δI)⁻¹∇L(zᵢ) with G the
    Gauss–Newton matrix (the curvature every W4/W5 method approximates): upweight's CG on the
    float64 copy of θ̂, tight rtol."""
    import upweight as uw

    damping = _ggn_damping(wl, args)
    rtol = _ref_rtol(wl, args)
    model, train, test = _ggn_problem(wl, sd, torch.float64)
    obj = uw.Objective(model, "cross_entropy", l2=0.0)
    t0 = time.perf_counter()
    inf = uw.Influence(
        obj,
        solver=uw.CG(rtol=rtol, maxiter=args.ref_maxiter),
        curvature="gauss-newton",
        damping=damping,
        grad_tol=1e9,
        progress=wl.arch == "resnet",
        on_inaccurate="warn",
    )
    inf.fit(train)
    scores = inf.up_loss(test)
    t_ref = time.perf_counter() - t0
    prov = scores.provenance
    wl.info["training (not counted)"] += f"; ‖∇R(θ̂)‖₂ = {inf.grad_norm_:.1e} (float64)"
    wl.info["curvature"] = _ggn_curvature(wl, damping)
    wl.info["reference"] = (
        f"upweight `CG(rtol={rtol:g})` (block CG, {len(wl.yt)} right-hand sides),"
        f" `curvature='gauss-newton'`, on the float64 copy of θ̂ (all {obj.p:,} parameters):"
        f" {prov.get('iterations')} iterations, final relative residual ‖(G + δI)x −"
        f" ∇L_test‖/‖∇L_test‖ = {float(prov.get('residual_max') or float('nan')):.1e} max;"
        f" {t_ref:.0f} s with {torch.get_num_threads()} thread(s)"
    )
    if float(prov.get("residual_max") or 1.0) > 1e-4:
        wl.info["⚠ reference not converged"] = (
            f"largest relative residual {prov.get('residual_max')} > 1e-4"
        )
    log(f"  reference: {wl.info['reference']}")
    return np.asarray(scores.values, np.float64), damping


def lanczos_min(
    matvec, p: int, steps: int, dtype: torch.dtype, seed: int = 0
) -> tuple[float, float]:  # noqa: ANN001
    """Extreme Ritz values (θ_min, θ_max) of a symmetric operator after ``steps`` Lanczos steps
    from a random start, with full reorthogonalisation. θ_min ≥ λmin: an upper bound on it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(p, generator=g, dtype=dtype)
    Q = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = matvec(Q[j][None])[0]
        a = float(w @ Q[j])
        alphas.append(a)
        Qm = torch.stack(Q)
        w = w - Qm.T @ (Qm @ w)
        w = w - Qm.T @ (Qm @ w)
        b = float(w.norm())
        if b < 1e-10 * abs(a) or j == steps - 1:
            break
        betas.append(b)
        Q.append(w / b)
    ev = scipy.linalg.eigvalsh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))
    return float(ev[0]), float(ev[-1])


def nystrom_preconditioner(hvp, p: int, rank: int, dtype: torch.dtype, seed: int = 0):  # noqa: ANN001, ANN201
    """P⁻¹ for A = H + δI from a randomized Nyström sketch of A (Frangella, Tropp & Udell 2023,
    Alg. 2.1 and eq. 5.3): Y = AΩ for an orthonormal Gaussian Ω (p, rank) — one block of ``rank``
    HVPs — then A_nys = U Λ̂ Uᵀ and P⁻¹ = λ̂_r U Λ̂⁻¹ Uᵀ + (I − UUᵀ). It changes how fast CG
    converges, not its answer: the reference is still certified by its final residual."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, rank, generator=g, dtype=dtype))
    Y = hvp(Q.T.contiguous()).T  # (p, rank) = A Ω
    nu = torch.finfo(dtype).eps * float(Y.norm())  # shift for a stable Cholesky
    Yn = Y + nu * Q
    C = torch.linalg.cholesky(Q.T @ Yn)  # lower, C Cᵀ = Ωᵀ A Ω + ν I
    B = torch.linalg.solve_triangular(C, Yn.T, upper=False).T
    U, sig, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sig**2 - nu).clamp_min(0)
    keep = lam > lam[0] * 1e-8
    U, lam = U[:, keep], lam[keep]
    lam_r = float(lam[-1])

    def apply(R: torch.Tensor) -> torch.Tensor:  # rows of R (k, p)
        c = R @ U
        return R - c @ U.T + (c * (lam_r / lam)) @ U.T

    return apply, {"rank": int(keep.sum()), "lambda_max": float(lam[0]), "lambda_r": lam_r}


def _orthonormal_rows(W: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """An orthonormal basis (rows) of the row space of W, dropping directions whose singular value
    is below ``rtol`` times the largest (thin SVD): how block CG stays breakdown-free when its
    residuals become linearly dependent (Ji & Li 2017)."""
    _, sig, Vh = torch.linalg.svd(W, full_matrices=False)
    return Vh[sig > rtol * sig[0]] if float(sig[0]) > 0 else Vh[:0]


def cg_reference(
    hvp,
    B: torch.Tensor,
    rtol: float,
    maxiter: int,
    max_seconds: float,  # noqa: ANN001
    stall: int = 50,
    precond=None,
    verbose: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:  # noqa: ANN001
    """X = (H + δI)⁻¹B for the rows of B by breakdown-free block PCG (O'Leary 1980; Ji & Li 2017,
    Alg. 2): the k right-hand sides share one Krylov space, so each iteration's k HVPs serve every
    row. With an orthonormal search block P (rows) and Z = P⁻¹R (``precond``, a map of rows, if
    given): α = (PAPᵀ)⁻¹PRᵀ, X += αᵀP, R −= αᵀAP, β = −(PAPᵀ)⁻¹(AP)Zᵀ, P ← orth(Z + βᵀP). For
    k = 1 this is plain PCG. Runs until ‖r‖ ≤ rtol·‖b‖ for every row, stagnation (no 1 % gain of
    the largest relative residual in ``stall`` iterations), ``maxiter`` or ``max_seconds``. Returns
    X and what stopped it, with the final relative residual ‖(H + δI)x − b‖/‖b‖ measured by one more
    HVP (not the recurrence's). ``verbose`` logs the largest residual every 5 iterations."""
    t0 = time.perf_counter()
    M = precond if precond is not None else (lambda R: R)
    X = torch.zeros_like(B)
    R = B.clone()
    bn = B.norm(dim=1)
    P = _orthonormal_rows(M(R))
    rel = R.norm(dim=1) / bn
    best, last = float(rel.max()), 0
    it, why = 0, "maxiter"
    while it < maxiter:
        if bool((rel <= rtol).all()):
            why = "rtol"
            break
        if it - last >= stall:
            why = "stagnation"
            break
        if time.perf_counter() - t0 > max_seconds:
            why = f"time cap ({max_seconds:g} s)"
            break
        it += 1
        AP = hvp(P)
        PAP = P @ AP.T
        lam, U = torch.linalg.eigh((PAP + PAP.T) / 2)
        if float(lam[0]) <= 0:
            raise RuntimeError(
                f"CG reference: pᵀ(H + δI)p ≤ 0 at iteration {it}: H + δI is not positive definite;"
                " rerun with a larger --damping"
            )
        PAP_inv = (U / lam) @ U.T
        alpha = PAP_inv @ (P @ R.T)  # (s, k)
        X += alpha.T @ P
        R -= alpha.T @ AP
        Z = M(R)
        P = _orthonormal_rows(Z - (PAP_inv @ (AP @ Z.T)).T @ P)
        rel = R.norm(dim=1) / bn
        if float(rel.max()) < 0.99 * best:
            best, last = float(rel.max()), it
        if verbose and it % 5 == 0:
            log(
                f"  reference CG iteration {it}: largest relative residual {float(rel.max()):.1e},"
                f" search block {len(P)}, {time.perf_counter() - t0:.0f} s"
            )
    res = (hvp(X) - B).norm(dim=1) / bn
    return X, {
        "iterations": it,
        "stopped": why,
        "residual_max": float(res.max()),
        "residual_median": float(res.median()),
        "recurrence_max": float(rel.max()),
        "seconds": time.perf_counter() - t0,
    }


def network_reference(
    wl: Workload, sd: dict[str, torch.Tensor], args: argparse.Namespace
) -> tuple[np.ndarray, float]:
    """The W3 reference I_up,loss (K, n) by long-run float64 CG on the float64 copy of θ̂, and the
    damping δ every method gets (0 unless the Lanczos check finds H + λI not positive definite)."""
    model32 = build_model(wl.arch)
    model32.load_state_dict(sd)
    prob32 = NetProblem(model32, wl.X, wl.y, L2)
    t0 = time.perf_counter()
    th_min, th_max = lanczos_min(prob32.hvp, prob32.p, args.lanczos_steps, torch.float32)
    t_lz = time.perf_counter() - t0
    damping = args.damping
    if damping is None:
        damping = 0.0 if th_min > 0.1 * L2 else (L2 - th_min)
    wl.info["curvature check"] = (
        f"{args.lanczos_steps} Lanczos steps on H + λI (float32, random start, {t_lz:.0f} s): Ritz"
        f" values in [{th_min:.3g}, {th_max:.3g}] (θ_min ≥ λmin(H + λI), an upper bound); "
        + (
            f"damping δ = {damping:.3g} added for every method and the reference"
            + (" (--damping)" if args.damping is not None else " (θ_min ≤ 0.1 λ)")
            if damping
            else "positive at λ = 0.01, no damping added (δ = 0)"
        )
    )
    model = build_model(wl.arch).double()
    model.load_state_dict({k: v.double() for k, v in sd.items()})
    prob = NetProblem(model, wl.X, wl.y, L2)
    g64 = float(prob.grad_risk().norm())
    wl.info["training (not counted)"] += f"; ‖∇R(θ̂)‖₂ = {g64:.1e} re-evaluated in float64"
    t0 = time.perf_counter()
    Gt = prob.test_grads(wl.Xt, wl.yt)
    A = lambda V: prob.hvp(V, damping)  # noqa: E731
    precond, how = None, "block CG"
    if args.ref_precond_rank:
        t1 = time.perf_counter()
        precond, pi = nystrom_preconditioner(A, prob.p, args.ref_precond_rank, torch.float64)
        how = (
            f"block CG preconditioned by a rank-{pi['rank']} randomized Nyström sketch of H + δI"
            f" (eigenvalues {pi['lambda_max']:.3g} … {pi['lambda_r']:.3g};"
            f" {time.perf_counter() - t1:.0f} s, counted below)"
        )
    S, st = cg_reference(
        A, Gt, args.ref_rtol, args.ref_maxiter, args.ref_max_seconds, precond=precond, verbose=True
    )
    # I_up,loss = −∇L_testᵀ(H + δI)⁻¹∇L(zᵢ), Koh & Liang eq. 2
    ref = -prob.train_directional(S).numpy()
    t_ref = time.perf_counter() - t0
    wl.info["reference"] = (
        f"float64 CG on the float64 copy of θ̂ ({how}, {len(Gt)} right-hand sides sharing one"
        " Krylov space; Pearlmutter HVPs with torch.autograd, independent of every library):"
        f" {st['iterations']} iterations, stopped by {st['stopped']} (rtol {args.ref_rtol:g}),"
        f" final relative residual ‖(H + δI)x − ∇L_test‖/‖∇L_test‖ = {st['residual_max']:.1e} max,"
        f" {st['residual_median']:.1e} median (one more HVP); scores by forward-mode directional"
        f" derivatives of the per-point losses; {t_ref:.0f} s with {torch.get_num_threads()}"
        " threads"
    )
    if st["residual_max"] > 1e-4:
        wl.info["⚠ reference not converged"] = (
            f"its largest relative residual is {st['residual_max']:.1e} > 1e-4: the correlations"
            " below are against an inexact answer; rerun with a larger --ref-max-seconds /"
            " --ref-maxiter (or a smaller n)"
        )
    log(
        f"  Lanczos θ ∈ [{th_min:.3g}, {th_max:.3g}] ({t_lz:.0f}s), δ = {damping:g}; reference CG"
        f" {st}"
    )
    return ref, damping


def floor_chunks(state: dict) -> str:
    """How the cost-floor sweep chunks the training set (``grad_chunk_size`` for the workload's p,
    float32)."""
    from upweight.core.batching import TENSOR_BYTES
    from upweight.core.grads import grad_chunk_size

    p = sum(t.numel() for t in state["params"].values())
    return (
        f"chunks of {grad_chunk_size(p, 2048, torch.float32)} points (≤ 2048, ≤"
        f" {TENSOR_BYTES / 2**20:g} MiB of gradients)"
    )


def time_floor(state: dict, repeats: int = 3) -> list[float]:
    """One per-sample-gradient sweep over the training set, float32 (the cost floor)."""
    import upweight as uw
    from upweight.core.grads import iter_per_sample_grads

    pb = make_problem(state, "")
    # chunks are cut to TENSOR_BYTES of gradients (p ≈ 1M: 3 points)
    obj = uw.Objective(pb.model, "cross_entropy", l2=pb.l2)
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
def time_pass(state: dict, repeats: int = 3) -> list[float]:
    """One batched forward and backward pass of the summed training loss over the whole training set
    (float32, one batch, no per-point quantities): the unit of cost of K-FAC's passes."""
    pb = make_problem(state, "")  # W5: a Hugging Face classifier on dict inputs

    def once() -> None:
        pb.model.zero_grad(set_to_none=True)
        out = pb.model(**pb.X).logits if isinstance(pb.X, dict) else pb.model(pb.X)
        torch.nn.functional.cross_entropy(out, pb.y, reduction="sum").backward()

    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return times


def make_problem(state: dict, workdir: str) -> Problem:
    if state["arch"] in ("resnet", "bert"):  # W4, W5: every parameter, eval mode, Gauss–Newton
        # W4: a ResNet of some width on image tensors; W5: an HF classifier on dict inputs
        arch = state["arch"]
        shape = {"width": int(state["width"])} if arch == "resnet" else {"config": state["config"]}
        model = build_model(arch, **shape)
        model.load_state_dict(state["params"])
        model.eval()
        extra = {"peer_batch": int(state["peer_batch"])} if "peer_batch" in state else {}
        return Problem(
            model,
            state["X"],
            state["y"],
            state["Xt"],
            state["yt"],
            float(state["l2"]),
            workdir,
            float(state["damping"]),
            curvature="gauss-newton",
            **extra,
        )
    model = build_model(state["arch"], state["X"].shape[1])
    model.load_state_dict(state["params"])
    return Problem(
        model,
        state["X"],
        state["y"],
        state["Xt"],
        state["yt"],
        float(state["l2"]),
        workdir,
        float(state.get("damping", 0.0)),
    )


def _proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in kB, or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(key: str, state_dir: str, threads: int) -> int:
    import resource
    import warnings

    set_threads(threads)
    method = {m.key: m for m in all_methods()}[key]
    for mod in method.requires:
        importlib.import_module(mod)
    # torch.func's first call imports torch._dynamo (seconds): a one-off of torch, not of any method
    f = lambda w: (w**2).sum()  # noqa: E731
    torch.func.vmap(torch.func.grad(f))(torch.ones(2, 3))
    torch.func.jvp(torch.func.grad(f), (torch.ones(3),), (torch.ones(3),))
    # tensors, str and numbers only
    state = torch.load(os.path.join(state_dir, "state.pt"), weights_only=True)
    workdir = tempfile.mkdtemp(prefix=f"{key}-", dir=state_dir)
    pb = make_problem(state, workdir)
    # Δ memory = the method's own peak above the RSS it starts from: loading may have peaked higher
    # (temporary copies), so the peak is reset here and read back as VmHWM after the runs
    reset = _reset_peak_rss()
    rss0 = _proc_status_kb("VmRSS") if reset else None
    out: dict = {
        "rss_start_kb": (
            rss0 if rss0 is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
    }

    def method_peak() -> None:
        if reset and (hwm := _proc_status_kb("VmHWM")) is not None:
            out["hwm_kb"] = hwm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            scores = method.run(pb)
            out["wall_s"] = time.perf_counter() - t0
            np.save(os.path.join(state_dir, f"{key}.npy"), scores)
            method_peak()
            # the cold result survives a timeout
            Path(state_dir, f"{key}.json").write_text(json.dumps(out))
            if out["wall_s"] < WARM_BELOW_S:  # once more in the same process: the warm time
                pb = make_problem(state, tempfile.mkdtemp(prefix=f"{key}-warm-", dir=state_dir))
                t0 = time.perf_counter()
                method.run(pb)
                out["warm_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 — reported in the table, the run goes on
            if "wall_s" in out:
                out["warm_error"] = (
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                )
            else:
                out["wall_s"] = time.perf_counter() - t0
                out["error"] = (
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                )
            traceback.print_exc()
    out["warnings"] = sorted(
        {f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught}
    )[:5]
    method_peak()
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
    warm_s: float = float("nan")
    agree: tuple[float, float] | None = None  # W4, no reference: Spearman with AGREE_WITH

    @property
    def time_s(self) -> float:
        """The time compared across methods: the warm run's where there is one, else the
        cold run's."""
        return self.warm_s if self.warm_s == self.warm_s else self.wall_s


def run_method(
    m: Method, state_dir: str, args: argparse.Namespace
) -> tuple[Row, np.ndarray | None]:
    row = Row(m)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        m.key,
        "--state",
        state_dir,
        "--threads",
        str(args.threads),
    ]
    logf = open(os.path.join(state_dir, f"{m.key}.log"), "w")  # noqa: SIM115
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        OPENBLAS_NUM_THREADS=str(args.threads),
        TQDM_DISABLE="1",
    )
    t0 = time.perf_counter()
    limit = int(args.mem_limit_gb * 2**30)

    def cap_memory() -> None:  # a method that needs more address space fails alone, not the machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(
        cmd,
        stdout=logf,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=cap_memory if limit > 0 else None,
    )
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
        if (
            res_path.exists()
            and "wall_s" in (res := json.loads(res_path.read_text()))
            and "error" not in res
        ):
            row.status = "ok"  # the cold run finished; the warm one did not
            row.wall_s = res["wall_s"]
            row.delta_mb = (res["hwm_kb"] / 1024 if "hwm_kb" in res else row.peak_mb) - res[
                "rss_start_kb"
            ] / 1024
            row.notes.append(f"warm run stopped by the {args.timeout:g} s timeout")
            return row, np.load(os.path.join(state_dir, f"{m.key}.npy"))
        row.wall_s = float(args.timeout)
        return row, None
    if not res_path.exists():
        tail = Path(state_dir, f"{m.key}.log").read_text().strip().splitlines()[-1:]
        row.status = f"crashed (exit {proc.returncode})" + (f": {tail[0][:200]}" if tail else "")
        return row, None
    res = json.loads(res_path.read_text())
    row.wall_s = res["wall_s"]
    row.warm_s = res.get("warm_s", float("nan"))
    if "warm_error" in res:
        row.notes.append(f"warm run failed: {res['warm_error']}")
    row.delta_mb = (res["hwm_kb"] / 1024 if "hwm_kb" in res else row.peak_mb) - res[
        "rss_start_kb"
    ] / 1024
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
    row.spearman, row.spearman_min, row.pearson = (
        float(np.mean(sp)),
        float(np.min(sp)),
        float(np.mean(pe)),
    )
    row.sign_ok = row.spearman >= 0
    if not row.sign_ok:
        row.notes.append(
            "sign opposite to the documented convention (correlations shown as measured)"
        )


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
    # W5: one batched forward + backward pass of the loss over the training set
    pass_s: float = float("nan")


def linear_reference(wl: Workload) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """W1/W2: θ̂ by float64 L-BFGS, the closed-form reference, and its cross-check by upweight
    float64."""
    n, d = wl.X.shape
    W, b, _ = train(wl)
    log("  trained; " + wl.info["training (not counted)"])
    t0 = time.perf_counter()
    ref = closed_form_reference(wl, W, b)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    chk, chk_label = upweight_float64(wl, W, b)
    t_chk = time.perf_counter() - t0
    rel = float(np.max(np.linalg.norm(chk - ref, axis=1) / np.linalg.norm(ref, axis=1)))
    log(
        f"  reference {t_ref:.1f}s; upweight float64 {chk_label} {t_chk:.1f}s, max rel. difference"
        f" {rel:.1e}"
    )
    if rel > 1e-6:
        raise RuntimeError(
            f"closed-form reference and upweight float64 {chk_label} disagree: {rel:.1e}"
        )
    wl.info["reference"] = (
        f"closed-form float64 H (dense) + Cholesky, {t_ref:.1f} s; agrees with upweight's float64 "
        f"{chk_label} ({t_chk:.1f} s) to a max relative L2 difference of {rel:.1e}"
    )
    return {"weight": torch.from_numpy(W).float(), "bias": torch.from_numpy(b).float()}, ref


def _network_setup_key(wl: Workload, args: argparse.Namespace) -> str:
    """What the untimed W3 set-up (training, curvature check, reference) depends on, hashed."""
    import hashlib

    h = hashlib.sha256()
    for a in (wl.X, wl.y, wl.Xt, wl.yt) + ((wl.mask, wl.mask_t) if wl.arch == "bert" else ()):
        h.update(np.ascontiguousarray(a).tobytes())
    if wl.arch == "bert":
        h.update(
            json.dumps(
                {
                    "config": wl.config,
                    "epochs": args.w5_epochs,
                    "lr": args.w5_lr,
                    "rtol": args.w5_ref_rtol,
                    "damping": W5_DAMPING if args.damping is None else args.damping,
                    "transformers": _version("transformers"),
                },
                sort_keys=True,
            ).encode()
        )
    if wl.arch == "resnet":
        h.update(
            json.dumps(
                {
                    "width": wl.width,
                    "steps": W4_STEPS,
                    "batch": W4_BATCH,
                    "lr": W4_LR,
                    "momentum": W4_MOMENTUM,
                    "rtol": args.w4_ref_rtol,
                    "damping": _ggn_damping(wl, args),
                    "reference": not args.no_reference,
                },
                sort_keys=True,
            ).encode()
        )
    h.update(
        json.dumps(
            {
                "arch": wl.arch,
                "torch": torch.__version__,
                "l2": L2,
                **{
                    k: getattr(args, k)
                    for k in (
                        "adam_epochs",
                        "lbfgs_iter",
                        "lbfgs_gtol",
                        "lanczos_steps",
                        "damping",
                        "ref_rtol",
                        "ref_maxiter",
                        "ref_max_seconds",
                    )
                },
                # only when set: keys computed before the option existed stay valid
                **({"ref_precond_rank": args.ref_precond_rank} if args.ref_precond_rank else {}),
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:16]


def network_setup(
    wl: Workload, args: argparse.Namespace
) -> tuple[dict[str, torch.Tensor], np.ndarray | None, float]:
    """W3's θ̂, reference and damping — from ``--cache`` when it holds this set-up (same data, test
    points and training/reference settings), else computed and, with ``--cache``, kept there: the
    K = 100 reference is half an hour of CG, not worth repeating when only the timed part is rerun.

    The cache file holds tensors, strings and a number only (the reference as a tensor, the notes
    as JSON text) and is read with ``torch.load(weights_only=True)``, which unpickles no code: a
    file that needs more (planted, or of another format) is ignored and the set-up recomputed."""
    path = None
    if args.cache:
        path = (
            Path(args.cache)
            / f"{wl.data_key.replace(':', '-')}-K{len(wl.Xt)}-{_network_setup_key(wl, args)}.pt"
        )
        if path.is_file():
            try:
                got = torch.load(path, weights_only=True)
                info, params, ref = json.loads(got["info_json"]), got["params"], got["ref"].numpy()
                damping, date = float(got["damping"]), str(got["date"])
                ref = None if ref.size == 0 else ref  # W4 --no-reference: θ̂ only
            except (
                pickle.UnpicklingError,
                RuntimeError,
                KeyError,
                TypeError,
                ValueError,
                AttributeError,
            ) as exc:
                log(
                    f"  cache {path} not used ({type(exc).__name__}: {str(exc)[:120]}); computing"
                    " the set-up"
                )
            else:
                wl.info.update(info)
                wl.info["set-up read from cache"] = f"{path} (computed {date})"
                log(f"  training and reference read from {path}")
                return params, ref, damping
    before = dict(wl.info)
    # untimed set-up: training, curvature check, reference
    torch.set_num_threads(args.setup_threads)
    try:
        if wl.arch == "bert":
            params = train_transformer(wl, args)
            log("  trained; " + wl.info["training (not counted)"])
            ref, damping = transformer_reference(wl, params, args)
        elif wl.arch == "resnet":
            params = train_resnet(wl, args)
            log("  trained; " + wl.info["training (not counted)"])
            if args.no_reference:
                ref, damping = None, _ggn_damping(wl, args)
                reference_cost(wl, params, args)
            else:
                ref, damping = transformer_reference(wl, params, args)
        else:
            params = train_network(wl, args)
            log("  trained; " + wl.info["training (not counted)"])
            ref, damping = network_reference(wl, params, args)
    finally:
        torch.set_num_threads(args.threads)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in wl.info.items() if before.get(k) != v}
        tmp = path.with_suffix(".tmp")
        ref_t = torch.zeros(0) if ref is None else torch.from_numpy(np.ascontiguousarray(ref))
        torch.save(
            {
                "params": params,
                "ref": ref_t,
                "damping": float(damping),
                "info_json": json.dumps(info),
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            },
            tmp,
        )
        os.replace(tmp, path)
    return params, ref, damping


def run_workload(wl: Workload, methods: list[Method], args: argparse.Namespace) -> Result:
    n, d = wl.X.shape
    p = sum(
        t.numel() for t in build_model(wl.arch, d, config=wl.config, width=wl.width).parameters()
    )
    log(f"{wl.title}: n = {n:,}, d = {d}, p = {p:,}, K = {len(wl.Xt)}")
    damping = 0.0
    if wl.arch == "linear":
        params, ref = linear_reference(wl)
    else:
        params, ref, damping = network_setup(wl, args)
    if wl.arch == "bert":
        assert wl.mask is not None and wl.mask_t is not None
        wl.info["sizes"] = (
            f"n_train = {n:,}, {d} tokens a sequence, classes = 2, p = {p:,} (every parameter,"
            f" embeddings and LayerNorms included), no L2, damping δ = {damping:g}, K ="
            f" {len(wl.Xt)} test points"
        )
        state = {
            "arch": "bert",
            "config": wl.config,
            "params": params,
            "X": _bert_inputs(wl.X, wl.mask),
            "y": torch.from_numpy(wl.y),
            "Xt": _bert_inputs(wl.Xt, wl.mask_t),
            "yt": torch.from_numpy(wl.yt),
            "l2": 0.0,
            "damping": float(damping),
        }
    elif wl.arch == "resnet":
        wl.info["sizes"] = (
            f"n_train = {n:,} images 1 × 28 × 28, classes = 10, p = {p:,} (every "
            "parameter: Conv2d, BatchNorm scales and shifts, fc), no L2, damping "
            f"δ = {damping:g}, K = {len(wl.Xt)} test points"
        )
        state = {
            "arch": "resnet",
            "width": wl.width,
            "params": params,
            "X": torch.from_numpy(wl.X).float(),
            "y": torch.from_numpy(wl.y),
            "Xt": torch.from_numpy(wl.Xt).float(),
            "yt": torch.from_numpy(wl.yt),
            "l2": 0.0,
            "damping": float(damping),
            "peer_batch": W4_BATCH,
        }
        wl.info["curvature"] = _ggn_curvature(wl, damping)
        wl.info["batches"] = (
            "kronfluence's per-device batch (factor and score passes): "
            f"{W4_BATCH} images, the training batch (the benchmark's "
            "per-sample-gradient budget would give it a few points at p = 11M); "
            "upweight chooses its own"
        )
    else:
        wl.info["sizes"] = (
            f"n_train = {n:,}, d = {d}, classes = 10, p = {p:,}, λ = {L2}"
            + (f", damping δ = {damping:.3g}" if damping else "")
            + f", K = {len(wl.Xt)} test points"
        )
        state = {
            "arch": wl.arch,
            "params": params,
            "X": torch.from_numpy(wl.X).float(),
            "y": torch.from_numpy(wl.y),
            "Xt": torch.from_numpy(wl.Xt).float(),
            "yt": torch.from_numpy(wl.yt),
            "l2": L2,
            "damping": float(damping),
        }
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        state_dir = args.keep or tmp
        os.makedirs(state_dir, exist_ok=True)
        torch.save(state, os.path.join(state_dir, "state.pt"))
        if wl.arch == "resnet":  # 4 per-sample-gradient sweeps of 11M parameters: one pass instead
            floor = float("nan")
            wl.info["cost floor"] = (
                "not measured on W4 (a per-sample-gradient sweep of every "
                "parameter, four times, on a shared machine); the unit of "
                "cost here is the training pass below"
            )
        else:
            floors = time_floor(state)
            floor = float(np.median(floors))
            wl.info["cost floor"] = (
                f"one per-sample-gradient sweep, float32: {floor:.3f} s (median of "
                f"{', '.join(f'{t:.3f}' for t in floors)} after a warm-up; upweight "
                f"`iter_per_sample_grads`, {floor_chunks(state)})"
            )
            log(f"  floor {floor:.3f}s")
        pass_s = float("nan")
        if wl.arch in ("bert", "resnet"):
            passes = time_pass(state)
            pass_s = float(np.median(passes))
            what = "training sequences" if wl.arch == "bert" else "training images (one batch)"
            each = ", ".join(f"{t:.3f}" for t in passes)
            wl.info["one training pass"] = (
                f"one batched forward + backward pass of the summed loss over all {len(wl.y):,} "
                f"{what}, float32: {pass_s:.3f} s (median of {each} after a warm-up). EK-FAC "
                "needs at least three passes over the data (factors, eigenvalue correction, "
                "scores), the first two with one backward pass per output-Hessian factor"
                + (
                    " (upweight's exact factors: one per class; kronfluence: one, with a sampled "
                    "label)"
                    if wl.arch == "resnet"
                    else ""
                )
            )
            log(f"  one pass {pass_s:.3f}s")
        rows = []
        scored: dict[str, np.ndarray] = {}  # no reference: each method's signed scores
        # only the methods that run on it, and one line for each library without one
        if wl.arch == "bert":
            libs = {m.library for m in methods if m.transformer}
            rows += [
                Row(
                    Method(f"{lib}-none", lib, "–", "–", -1, lambda pb: np.zeros(0)),
                    status=f"not run: {why}",
                )
                for lib, why in NO_TRANSFORMER.items()
                if lib not in libs and any(m.library == lib for m in methods)
            ]
            methods = [m for m in methods if m.transformer]
        if wl.arch == "resnet":  # the methods that run on it; a line per library's others, with why
            for lib, (keys, why) in NO_RESNET.items():
                names = list(dict.fromkeys(m.name for m in methods if m.key in keys))
                if names:
                    none = Method(
                        f"{lib}-none", lib, ", ".join(names), "–", -1, lambda pb: np.zeros(0)
                    )
                    rows.append(Row(none, status=f"not run: {why}"))
            methods = [m for m in methods if m.key in W4_METHODS]
        for m in methods:
            why = m.skipped(p, wl.arch) or available(m)
            if why:
                rows.append(Row(m, status=why))
                continue
            log(f"  {m.key} ...")
            row, values = run_method(m, state_dir, args)
            what = "upweight-cg" if m.key.startswith("uw-bcg") else m.library
            if wl.arch == "resnet" and (cover := W4_COVERS.get(what)):
                row.notes.insert(0, cover)
            if values is not None and ref is not None:
                score(row, values, ref)
            elif values is not None:
                scored[m.key] = m.sign * values
            log(
                f"    {row.status}; wall {row.wall_s:.2f}s, warm {row.warm_s:.2f}s, peak"
                f" {row.peak_mb:.0f} MB, Spearman {row.spearman:.4f} (min {row.spearman_min:.4f}),"
                f" Pearson {row.pearson:.4f}"
            )
            rows.append(row)
    if ref is None:
        agreement(rows, scored, AGREE_WITH)
    return Result(wl, floor, rows, pass_s)


#: W4 without a reference: each method's scores are compared with this row's (agreement only)
AGREE_WITH = "kron-ekfac"


def agreement(rows: list[Row], scored: dict[str, np.ndarray], key: str) -> None:
    """Without a reference (W4 at full width): the Spearman correlation of each method's scores
    with those of ``key`` (per test point, mean and min), as a row note — agreement between two
    approximations, not accuracy; the accuracy columns stay empty."""
    base = scored.get(key)
    for r in rows:
        v = scored.get(r.method.key)
        if v is None or base is None or r.method.key == key:
            continue
        if v.shape != base.shape or not (np.all(np.isfinite(v)) and np.all(np.isfinite(base))):
            continue
        sp = [float(scipy.stats.spearmanr(a, b)[0]) for a, b in zip(v, base)]
        r.agree = (float(np.mean(sp)), float(np.min(sp)))
        r.notes.append(
            "agreement (not accuracy: no reference at this size): Spearman with "
            f"{key}'s scores {np.mean(sp):.4f} mean, {np.min(sp):.4f} min over the "
            "test points"
        )


# ── report ───────────────────────────────────────────────────────────────────────────────
def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def machine_info(args: argparse.Namespace) -> dict[str, str]:
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "CPU": cpu,
        "bfloat16 arithmetic": bfloat16_support(),
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
        "threads": (
            f"{args.threads} (torch.set_num_threads and OMP/MKL/OpenBLAS_NUM_THREADS, every"
            " process)"
        ),
        "limits per method": (
            f"timeout {args.timeout:g} s, address space {args.mem_limit_gb:g} GiB (RLIMIT_AS)"
        ),
        "Python": platform.python_version(),
        "libraries": ", ".join(
            f"{d} {_version(d)}"
            for d in (
                "torch",
                "upweight",
                "pydvl",
                "captum",
                "kronfluence",
                "dattri",
                "transformers",
                "numpy",
                "scipy",
            )
        ),
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


LEGEND = (
    "Influence I_up,loss of **all** training points on K test points (Koh & Liang 2017, eq. 2)."
    " W1/W2: multinomial logistic regression (`nn.Linear`, float32, θ̂ from float64 L-BFGS, exact"
    " closed-form float64 reference); W3: an MLP (784-1024-256-10, tanh, p = 1,068,810) and a"
    " small CNN (2 × Conv2d + average pooling + 2 × Linear, tanh, p = 46,730), float32, θ̂ from"
    " Adam + full-batch L-BFGS in float32, reference = long-run float64 CG (its final residual is"
    " in the workload's header); W5: a 2-layer BERT-style classifier on Enron spam/ham (dict"
    " batches, every parameter, no L2, Gauss–Newton curvature G + δI for every method, reference ="
    " upweight's float64 GGN CG). Cross-entropy, L2 λ = 0.01 on all parameters on W1–W3; every"
    " method gets the damping/regularisation that makes its curvature H + λI (+ δI where a"
    " workload needs a damping δ; see bench/peers/methods.py). Columns: *wall s* = the method's"
    " **cold** run in a fresh process, from constructing the library's object through"
    " fit/preprocessing to the scores of all n training points (imports and data loading not"
    " counted); *warm s* = a second run in the same process, done when the cold one took <"
    f" {WARM_BELOW_S:g} s (one-off costs — lazy imports, torch.func tracing, allocator growth —"
    " gone); *peak MB* = peak RSS of that process over both runs (`ru_maxrss`), Δ = the method's"
    " own peak (VmHWM, reset after imports and data loading) above its RSS at that point;"
    " *Spearman*, *Pearson* = correlation with the reference per test point after the library's"
    " documented sign (pyDVL, captum, kronfluence and dattri document ∇L_testᵀH⁻¹∇L_train ="
    " −I_up,loss), mean (min) over the K test points; *sign* ✗ = negative correlation after that;"
    " *× floor* = time / one per-sample-gradient sweep over the training set (the cost floor,"
    " measured warm in the same run), with time = the **warm** time where there is one, else the"
    " cold; *× upweight best* = the same time / that of upweight's fastest method with Spearman ≥"
    f" {ACCURATE}. Speed comparisons below use that same time (warm where available)."
)


def best_accurate(rows: list[dict], library: str) -> dict | None:
    ok = [
        r
        for r in rows
        if r["library"] == library and r["status"] == "ok" and abs(r["spearman"]) >= ACCURATE
    ]
    return min(ok, key=lambda r: r["time_s"]) if ok else None


def row_data(r: Row) -> dict:
    """The machine-readable form of a row (embedded in the report section)."""
    return {
        "key": r.method.key,
        "library": r.method.library,
        "name": r.method.name,
        "settings": r.method.settings,
        "status": r.status,
        "wall_s": r.wall_s,
        "warm_s": r.warm_s,
        "time_s": r.time_s,
        "peak_mb": r.peak_mb,
        "delta_mb": r.delta_mb,
        "spearman": r.spearman,
        "spearman_min": r.spearman_min,
        "pearson": r.pearson,
        "sign_ok": r.sign_ok,
        "notes": r.notes,
        **({"agree": list(r.agree)} if r.agree else {}),
    }


def render_section(res: Result, machine: dict[str, str], command: str, seconds: float) -> str:
    """One workload's section: its machine table, header, all rows, and the per-library bests."""
    rows = [row_data(r) for r in res.rows]
    wl = res.wl
    out = [
        f"### {wl.title}",
        "",
        f"Command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        f"| load average at end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
        f"| wall time of this workload | {seconds:.0f} s |",
        "",
        f"- **data**: {wl.source}",
    ]
    out += [f"- **{k}**: {v}" for k, v in wl.info.items()]
    uw_best = best_accurate(rows, "upweight")
    out += [
        f"- **upweight's fastest method with Spearman ≥ {ACCURATE}**: "
        + (
            f"{uw_best['name']} ({uw_best['settings']}), {uw_best['time_s']:.2f} s"
            if uw_best
            else "none"
        ),
        "",
    ]
    out += [
        (
            "| method | library | settings | wall s | warm s | peak MB (Δ) | Spearman mean (min) |"
            " Pearson mean | sign | × floor | × upweight best | status |"
        ),
        "|---|---|---|--:|--:|--:|--:|--:|:-:|--:|--:|---|",
    ]
    notes = []
    for i, r in enumerate(rows, 1):
        mark = f" [{i}]" if r["notes"] else ""
        sign = "–" if r["sign_ok"] is None else ("✓" if r["sign_ok"] else "✗ flipped")
        vs = r["time_s"] / uw_best["time_s"] if (uw_best and r["status"] == "ok") else float("nan")
        gt = "> " if r["status"].startswith("timeout") else ""
        out.append(
            f"| {r['name']}{mark} | {r['library']} | {r['settings']} | {gt}{_f(r['wall_s'], '.2f')}"
            f" | {_f(r['warm_s'], '.2f')} | {_f(r['peak_mb'], '.0f')} ({_f(r['delta_mb'], '+.0f')})"
            f" | {_corr(r['spearman'])} ({_corr(r['spearman_min'])}) | {_corr(r['pearson'])} |"
            f" {sign} | {gt}{_f(r['time_s'] / res.floor_s, '.1f')} | {_f(vs, '.2f')} |"
            f" {r['status']} |"
        )
        if r["notes"]:
            notes.append(f"[{i}] " + "; ".join(r["notes"]))
    out += ["", *[f"- {n}" for n in notes], ""] if notes else [""]
    out += best_table(rows)
    data = {
        "key": wl.key,
        "title": wl.title,
        "floor_s": res.floor_s,
        "machine": machine,
        "rows": rows,
        **({} if res.pass_s != res.pass_s else {"pass_s": res.pass_s}),
    }
    return "\n".join(out + ["", embed_json(data)])


def best_table(rows: list[dict]) -> list[str]:
    uw_best = best_accurate(rows, "upweight")
    out = [
        (
            f"**Fastest method with |Spearman| ≥ {ACCURATE}, per library** (time = warm where"
            " available):"
        ),
        "",
        "| library | method | wall s | warm s | Spearman | upweight's speed-up |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for lib in dict.fromkeys(r["library"] for r in rows):
        b = best_accurate(rows, lib)
        if b is None:
            out.append(f"| {lib} | none reached {ACCURATE} | – | – | – | – |")
        else:
            sp = f"{b['time_s'] / uw_best['time_s']:.1f}×" if uw_best else "–"
            out.append(
                f"| {lib} | {b['name']} ({b['settings']}) | {b['wall_s']:.2f} |"
                f" {_f(b['warm_s'], '.2f')} | {_corr(b['spearman'])} | {sp} |"
            )
    return out + [""]


def render_summary(path: Path) -> str:
    """The ``peers-summary`` section, rebuilt from the data of every ``peers-*`` section in
    ``path``."""
    sections = read_sections(path)
    data = [
        d
        for k, t in sections.items()
        if k.startswith("peers-") and k != "peers-summary" and (d := section_json(t)) is not None
    ]
    # lower bounds of the floor ratios, per workload key, from bench/bench_floor_bound.py's section
    bounds = (
        (section_json(sections["floor-bound"]) or {}).get("bounds", {})
        if "floor-bound" in sections
        else {}
    )
    out = [
        "## Peer libraries — summary",
        "",
        (
            "Regenerated by `bench/peers/bench_peers.py` from the workload sections "
            "below (each carries its rows as JSON in an HTML comment), whichever of them ran last."
        ),
        "",
        LEGEND,
        "",
    ]
    if not data:
        return "\n".join(out + ["No peer workload has been run yet.", ""])
    out += ["### Targets of the issue", ""]
    w2 = [d for d in data if d["key"] == "W2:20000"]
    if not w2:
        out.append(
            "- **5× against every peer** (W2, MNIST n = 20,000, 10 test points): not measured yet "
            "(no `peers-W2:20000` section)."
        )
    for d in w2:
        uw = best_accurate(d["rows"], "upweight")
        peers = [lib for lib in dict.fromkeys(r["library"] for r in d["rows"]) if lib != "upweight"]
        if uw is None:
            out.append(
                f"- **5× against every peer** ({d['title']}): **NOT met** — no upweight method"
                f" reached Spearman {ACCURATE}."
            )
            continue
        parts, ok = [], True
        for lib in peers:
            b = best_accurate(d["rows"], lib)
            if b is None:
                slow = [
                    r["time_s"]
                    for r in d["rows"]
                    if r["library"] == lib and r["status"].startswith("timeout")
                ]
                parts.append(
                    f"{lib}: no method reached {ACCURATE}"
                    + (
                        f" (its timed-out methods ran > {min(slow):.0f} s = "
                        f"{min(slow) / uw['time_s']:.1f}× upweight's best)"
                        if slow
                        else ""
                    )
                )
            else:
                x = b["time_s"] / uw["time_s"]
                ok &= x >= 5.0
                parts.append(
                    f"{lib}: {b['name']} {b['time_s']:.2f} s → {x:.1f}× {'✓' if x >= 5 else '✗'}"
                )
        out.append(
            f"- **5× against every peer** ({d['title']}, K = 10): **{'met' if ok else 'NOT met'}**"
            f" — upweight's {uw['name']} ({uw['settings']}) {uw['time_s']:.2f} s; "
            + "; ".join(parts)
            + "."
        )
    for prefix, bound in (("W1", 3.0), ("W2", 10.0)):
        secs = [d for d in data if d["key"].split(":")[0] == prefix]
        if not secs:
            out.append(f"- **whole exact query ≤ {bound:g}× floor on {prefix}**: not measured yet.")
        for d in secs:
            uw = best_accurate(d["rows"], "upweight")
            if uw is None:
                out.append(
                    f"- **whole exact query ≤ {bound:g}× floor** ({d['title']}): **NOT met** — no"
                    f" upweight method reached Spearman {ACCURATE}."
                )
                continue
            x = uw["time_s"] / d["floor_s"]
            lb = bounds.get(d["key"])
            why = (
                ""
                if lb is None or lb.get("bound_float32") is None
                else (
                    f" The bare matrix products any method needs take ≥ {lb['bound_float32']:.1f}×"
                    f" the floor in float32 (≥ {lb['bound_any']:.1f}× with bfloat16 products;"
                    " section `floor-bound`, against the floor measured there)."
                )
            )
            out.append(
                f"- **whole exact query ≤ {bound:g}× floor** ({d['title']}):"
                f" **{'met' if x <= bound else 'NOT met'}** — upweight's fastest method with"
                f" Spearman ≥ {ACCURATE}, {uw['name']} ({uw['settings']}), {uw['time_s']:.2f} s ="
                f" {x:.1f}× the floor ({d['floor_s']:.3f} s).{why}"
            )
    out += bound_targets(bounds)
    for d in (d for d in data if d["key"].startswith("W4")):
        out.append(w4_target(d))
    for d in (d for d in data if d["key"].startswith("W5")):
        out.append(w5_target(d))
    out += ["", "### Fastest accurate method per library, per workload", ""]
    for d in data:
        out += [f"#### {d['title']}", "", *best_table(d["rows"])]
    return "\n".join(out)


def bound_targets(bounds: dict) -> list[str]:
    """Issue 24's targets, as section ``floor-bound`` measured them: upweight's whole query within
    1.3× (W2) / 1.5× (W1) of the bound of its kind, the query and the bound timed in one run."""
    out = []
    for key, b in bounds.items():
        for t in b.get("targets", []):
            ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}×"
            own = t.get("ratio_at_iterations")
            at = "" if own is None else f"; {own:.2f}× the products of the iterations it took"
            out.append(
                f"- **whole query ≤ {t['limit']:g}× its bound** ({key}, `{t['method']}` against the"
                f" {t['against']} bound): **{'met' if t['met'] else 'NOT met'}** —"
                f" {t['seconds']:.3f} s = {ratio} the bound ({t['bound']:.3f} s), Spearman"
                f" {t['spearman']:.4f}{at} (section `floor-bound`, one run)."
            )
    return out


def w5_target(d: dict) -> str:
    """W5's target: upweight's EK-FAC at least as accurate as kronfluence's (mean and min Spearman),
    ≥ 3× faster end to end, in no more peak memory — against upweight's faster EK-FAC row (with or
    without the residual check).
    """
    rows = {r["key"]: r for r in d["rows"] if r["status"] == "ok"}
    kron = rows.get("kron-ekfac")
    uws = [rows[k] for k in ("uw-ekfac", "uw-ekfac-unchecked") if k in rows]
    head = f"- **W5: upweight EK-FAC vs kronfluence EK-FAC** ({d['title']}): "
    if kron is None or not uws:
        return head + "not measured (a row is missing or failed)."
    uw = min(uws, key=lambda r: r["time_s"])
    acc = uw["spearman"] >= kron["spearman"] and uw["spearman_min"] >= kron["spearman_min"]
    speed = kron["time_s"] / uw["time_s"]
    mem = uw["peak_mb"] <= kron["peak_mb"]
    return (
        head + f"upweight {uw['name']} ({uw['settings']}) vs kronfluence {kron['name']}: accuracy"
        f" {'met' if acc else 'NOT met'} (Spearman mean {uw['spearman']:.4f} vs"
        f" {kron['spearman']:.4f}, min {uw['spearman_min']:.4f} vs {kron['spearman_min']:.4f});"
        f" speed ≥ 3× {'met' if speed >= 3 else 'NOT met'} ({uw['time_s']:.2f} s vs"
        f" {kron['time_s']:.2f} s: upweight"
        f" {f'{speed:.1f}× faster' if speed >= 1 else f'{1 / speed:.1f}× slower'}); peak memory"
        f" {'met' if mem else 'NOT met'} ({uw['peak_mb']:.0f} MB vs {kron['peak_mb']:.0f} MB; Δ"
        f" over the loaded process {uw['delta_mb']:+.0f} vs {kron['delta_mb']:+.0f} MB)."
        + _w5_same_theta(rows, kron)
        + _w5_bound(d, kron)
    )


def _w5_same_theta(rows: dict, kron: dict) -> str:
    """The same comparison with upweight's θ restricted to kronfluence's parameters (the nn.Linear
    layers): the same scores' definition, so the times compare the same arithmetic."""
    lin = rows.get("uw-ekfac-linear-unchecked")
    if lin is None:
        return ""
    speed = kron["time_s"] / lin["time_s"]
    return (
        " On kronfluence's own parameters (θ = the nn.Linear layers; upweight's rows above score"
        f" every parameter): upweight {lin['name']} {lin['time_s']:.2f} s vs {kron['time_s']:.2f}"
        f" s ({_x(speed)}), Spearman mean {lin['spearman']:.4f} vs {kron['spearman']:.4f}, min"
        f" {lin['spearman_min']:.4f} vs {kron['spearman_min']:.4f}, peak {lin['peak_mb']:.0f} MB"
        f" vs {kron['peak_mb']:.0f} MB (Δ {lin['delta_mb']:+.0f} vs {kron['delta_mb']:+.0f} MB)."
    )


#: upweight's rows that W4's target compares (its K-FAC/EK-FAC variants and its exact GGN block CG)
W4_UW = (
    "uw-kfac",
    "uw-kfac-unchecked",
    "uw-ekfac",
    "uw-ekfac-unchecked",
    "uw-kfac-sampled",
    "uw-ekfac-sampled",
    "uw-kfac-sampled-unchecked",
    "uw-ekfac-sampled-unchecked",
    "uw-bcg-1e-3",
)


def _x(speed: float) -> str:
    return f"{speed:.2f}× faster" if speed >= 1 else f"{1 / speed:.2f}× slower"


def w4_target(d: dict) -> str:
    """W4's target: upweight's fastest method at least as accurate as kronfluence's EK-FAC (mean
    and min Spearman) and faster end to end. Without a reference (full width): the speed half only,
    with the agreement of upweight's EK-FAC with kronfluence's (not accuracy); then the one-pass
    bound."""
    rows = {r["key"]: r for r in d["rows"] if r["status"] == "ok"}
    kron = rows.get("kron-ekfac")
    head = f"- **W4: upweight's fastest method vs kronfluence EK-FAC** ({d['title']}): "
    uws = [rows[k] for k in W4_UW if k in rows]
    kfac = _w4_kfac(rows)
    if kron is None:
        late = [
            r for r in d["rows"] if r["key"] == "kron-ekfac" and r["status"].startswith("timeout")
        ]
        if not late:
            return head + "not measured (kronfluence's EK-FAC row is missing or failed)."
        if not uws:
            return head + f"kronfluence's EK-FAC {late[0]['status']}; no upweight row finished."
        uw = min(uws, key=lambda r: r["time_s"])
        ek = [
            rows[k]
            for k in (
                "uw-ekfac",
                "uw-ekfac-unchecked",
                "uw-ekfac-sampled",
                "uw-ekfac-sampled-unchecked",
            )
            if k in rows
        ]
        eks = "; ".join(f"{r['name']} ({r['settings']}) {r['time_s']:.0f} s" for r in ek)
        return head + (
            f"kronfluence's EK-FAC {late[0]['status']}, so it gave no scores (no agreement "
            f"either); upweight's fastest row, {uw['name']} ({uw['settings']}), "
            f"{uw['time_s']:.0f} s — **faster** than that"
            + (f"; upweight's EK-FAC: {eks}" if eks else "")
            + "."
            + kfac
            + _w4_bound(d, {**late[0], "time_s": late[0]["wall_s"]}).replace(
                "kronfluence's EK-FAC took", "kronfluence's EK-FAC ran for more than"
            )
        )
    if not uws:
        return head + "not measured (no upweight row finished)."
    ks, kmin = kron["spearman"], kron["spearman_min"]
    if ks == ks:  # with a reference: the fastest upweight row at least as accurate
        good = [r for r in uws if r["spearman"] >= ks and r["spearman_min"] >= kmin]
        if not good:
            b = max(uws, key=lambda r: r["spearman"])
            return head + (
                "accuracy **NOT met** — no upweight row reaches kronfluence's Spearman "
                f"{ks:.4f} (min {kmin:.4f}); the best is {b['name']} ({b['settings']}) "
                f"{b['spearman']:.4f} (min {b['spearman_min']:.4f})." + _w4_bound(d, kron)
            )
        uw = min(good, key=lambda r: r["time_s"])
        speed = kron["time_s"] / uw["time_s"]
        return head + (
            f"**{'met' if speed > 1 else 'NOT met'}** — upweight {uw['name']} ({uw['settings']}) "
            f"Spearman {uw['spearman']:.4f} (min {uw['spearman_min']:.4f}) vs kronfluence {ks:.4f} "
            f"(min {kmin:.4f}); {uw['time_s']:.2f} s vs {kron['time_s']:.2f} s: upweight "
            f"{_x(speed)}; peak memory {uw['peak_mb']:.0f} MB vs {kron['peak_mb']:.0f} MB."
            + _w4_bound(d, kron)
        )
    uw = min(uws, key=lambda r: r["time_s"])
    speed = kron["time_s"] / uw["time_s"]
    ek = [
        rows[k]
        for k in (
            "uw-ekfac",
            "uw-ekfac-unchecked",
            "uw-ekfac-sampled",
            "uw-ekfac-sampled-unchecked",
        )
        if k in rows and rows[k].get("agree")
    ]
    agree = "; ".join(
        f"{r['name']} ({r['settings']}) {r['agree'][0]:.4f} (min {r['agree'][1]:.4f})" for r in ek
    )
    return head + (
        "no reference at this size, so accuracy is not measured; speed: upweight's fastest row, "
        f"{uw['name']} ({uw['settings']}), {uw['time_s']:.2f} s vs kronfluence "
        f"{kron['time_s']:.2f} s: **{'faster' if speed > 1 else 'NOT faster'}** ({_x(speed)}); "
        f"peak memory {uw['peak_mb']:.0f} MB vs {kron['peak_mb']:.0f} MB."
        + (
            f" Agreement (Spearman with kronfluence EK-FAC's scores, not accuracy): {agree}."
            if agree
            else ""
        )
        + kfac
        + _w4_bound(d, kron)
    )


def _w4_kfac(rows: dict[str, dict]) -> str:
    """W4: upweight's K-FAC rows against kronfluence's K-FAC, time and peak memory."""
    kk = rows.get("kron-kfac")
    uk = [
        rows[k]
        for k in ("uw-kfac", "uw-kfac-unchecked", "uw-kfac-sampled", "uw-kfac-sampled-unchecked")
        if k in rows
    ]
    if kk is None or not uk:
        return ""
    parts = [
        f"{r['name']} ({r['settings']}) {r['time_s']:.0f} s, {r['peak_mb']:.0f} MB "
        f"({_x(kk['time_s'] / r['time_s'])})"
        for r in uk
    ]
    return (
        f" K-FAC: kronfluence {kk['time_s']:.0f} s, {kk['peak_mb']:.0f} MB; upweight "
        + "; ".join(parts)
        + "."
    )


def _w4_bound(d: dict, kron: dict) -> str:
    """The one-pass bound: any EK-FAC takes three passes over the data (one training pass each,
    measured in the same run); kronfluence's EK-FAC time in such passes."""
    p = d.get("pass_s")
    if p is None or not p == p:
        return ""
    t = kron["time_s"]
    return (
        " Bound: one training pass (batched forward + backward of the loss over the training "
        f"set) takes {p:.2f} s, so any EK-FAC takes ≥ 3 passes = {3 * p:.2f} s (more with "
        f"several output-Hessian factors); kronfluence's EK-FAC took {t:.2f} s = "
        f"{t / p:.1f} passes."
    )


def _w5_bound(d: dict, kron: dict) -> str:
    """Why ≥ 3× is out of reach where it is: 3× kronfluence's time against the cheapest EK-FAC,
    three passes over the data (one training pass each, measured in the same run)."""
    p = d.get("pass_s")
    if p is None or not p == p:
        return ""
    target = kron["time_s"] / 3
    return (
        f" Bound: one training pass takes {p:.2f} s, so any EK-FAC takes ≥ 3 passes = {3 * p:.2f} s"
        f" (more with several output-Hessian factors); 3× kronfluence would be {target:.2f} s"
        + (", below that bound." if target < 3 * p else ".")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workloads",
        default="W1,W2",
        help=(
            "comma list of W1, W2[:n_train], W3-mlp[:n_train] (default n 5,000), W3-cnn[:n_train]"
            f" (10,000), W4[:n_train] ({W4_DEFAULT_N:,}), W5[:n_train] ({W5_DEFAULT_N:,})"
        ),
    )
    ap.add_argument(
        "--n-train", type=int, default=20000, help="MNIST training points for W2 (default 20,000)"
    )
    ap.add_argument(
        "--n-test",
        type=int,
        default=DEFAULT_K,
        help=f"K, the number of test points (default {DEFAULT_K})",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds per method before it is stopped (default 300)",
    )
    ap.add_argument(
        "--mem-limit-gb",
        type=float,
        default=12.0,
        help="address-space limit per method process (RLIMIT_AS; 0 = none; default 12)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="threads per process (default 1, for fairness)"
    )
    ap.add_argument(
        "--methods",
        default="",
        help="comma list of method keys or library names to run (default all)",
    )
    ap.add_argument(
        "--skip", default="", help="comma list of method keys or library names to leave out"
    )
    ap.add_argument(
        "--mnist",
        default="../shared/data/mnist/mnist.npz",
        help="mnist.npz; relative to the repo root",
    )
    ap.add_argument(
        "--out",
        default="bench/RESULTS.md",
        help=(
            "Markdown file: each workload replaces its section peers-<workload>, then peers-summary"
            " is rebuilt"
        ),
    )
    ap.add_argument(
        "--enron",
        default="../shared/data/enron1/enron1.csv.gz",
        help="enron1.csv.gz (W5); relative to the repo root",
    )
    ap.add_argument(
        "--keep",
        default="",
        help="keep the workers' logs and scores in this folder (for debugging)",
    )
    w3 = ap.add_argument_group("W3 (networks)")
    w3.add_argument(
        "--adam-epochs", type=int, default=10, help="Adam epochs before L-BFGS (default 10)"
    )
    w3.add_argument(
        "--lbfgs-iter", type=int, default=500, help="full-batch L-BFGS iteration cap (default 500)"
    )
    w3.add_argument(
        "--lbfgs-gtol", type=float, default=1e-5, help="stop L-BFGS at ‖∇R‖₂ ≤ this (default 1e-5)"
    )
    w3.add_argument(
        "--lanczos-steps",
        type=int,
        default=60,
        help="Lanczos steps of the curvature check (default 60)",
    )
    w3.add_argument(
        "--damping",
        type=float,
        default=None,
        help=(
            "δ for every method and the reference (default: 0, or λ − θ_min when the check finds"
            " θ_min ≤ 0.1 λ)"
        ),
    )
    w3.add_argument(
        "--setup-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help=(
            "torch threads for the untimed training, curvature check and reference (default: all"
            " usable)"
        ),
    )
    w3.add_argument(
        "--ref-rtol",
        type=float,
        default=1e-10,
        help="relative residual of the CG reference (default 1e-10)",
    )
    w3.add_argument(
        "--ref-maxiter",
        type=int,
        default=5000,
        help="iteration cap of the CG reference (default 5,000)",
    )
    w3.add_argument(
        "--cache",
        default="",
        help=(
            "folder keeping each network's trained θ̂ and reference, reused by a rerun with the"
            " same data, test points and settings (default: none)"
        ),
    )
    w3.add_argument(
        "--setup-only",
        action="store_true",
        help="compute each network's θ̂ and reference into --cache, time nothing, write no report",
    )
    w3.add_argument(
        "--ref-max-seconds",
        type=float,
        default=3600.0,
        help="time cap of the CG reference (default 3,600)",
    )
    w3.add_argument(
        "--ref-precond-rank",
        type=int,
        default=0,
        help=(
            "precondition the CG reference by a randomized Nyström sketch of this rank (default 0:"
            " plain CG; the answer is the same, certified by its residual; fewer iterations on an"
            " ill-conditioned H)"
        ),
    )
    w4 = ap.add_argument_group(
        f"W4 (ResNet-18 on MNIST; --damping sets its δ too, default {W4_DAMPING:g})"
    )
    w4.add_argument(
        "--w4-width",
        type=int,
        default=W4_WIDTH,
        help=(
            "base width of W4's ResNet (default 64 = ResNet-18; e.g. 8: same depth, "
            "widths 8-16-32-64)"
        ),
    )
    w4.add_argument(
        "--w4-ref-rtol",
        type=float,
        default=1e-8,
        help="rtol of W4's float64 Gauss–Newton CG reference (default 1e-8)",
    )
    w4.add_argument(
        "--no-reference",
        action="store_true",
        help=(
            "W4: no reference (too costly at full width): time and memory only, and "
            f"each method's agreement with {AGREE_WITH}'s scores"
        ),
    )
    w5 = ap.add_argument_group(
        f"W5 (transformer; --damping sets its δ too, default {W5_DAMPING:g})"
    )
    w5.add_argument(
        "--w5-epochs", type=int, default=2, help="AdamW epochs of the W5 classifier (default 2)"
    )
    w5.add_argument("--w5-lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    w5.add_argument(
        "--w5-ref-rtol",
        type=float,
        default=1e-8,
        help="rtol of W5's float64 Gauss–Newton CG reference (default 1e-8)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.state, args.threads)
    set_threads(args.threads)
    command = " ".join(
        shlex.quote(a)
        for a in ["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]
    )
    want = {s.strip() for s in args.methods.split(",") if s.strip()}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    methods = [
        m
        for m in all_methods()
        if (not want or m.key in want or m.library in want)
        and m.key not in skip
        and m.library not in skip
    ]
    out = Path(args.out)
    specs = [s.strip() for s in args.workloads.split(",") if s.strip()]
    status = 0
    if args.setup_only:
        if not args.cache:
            ap.error("--setup-only needs --cache (where the set-up is kept)")
        for spec in specs:
            wl = load_workload(spec, args)
            if wl.arch == "linear":
                log(
                    f"{wl.title}: nothing to set up (the linear workloads' reference is"
                    " closed-form)"
                )
                continue
            log(f"{wl.title}: set-up only, K = {len(wl.Xt)}")
            network_setup(wl, args)
        return status
    if "peers-summary" not in read_sections(out):  # the summary goes before the workload sections
        replace_section(out, "peers-summary", render_summary(out))
    for spec in specs:
        machine = machine_info(args)
        log("machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()))
        t0 = time.perf_counter()
        try:
            wl = load_workload(spec, args)
            res = run_workload(wl, methods, args)
        except Exception:  # noqa: BLE001 — the other workloads go on; this one's section stays as it was
            traceback.print_exc()
            status = 1
            continue
        replace_section(
            out, f"peers-{wl.key}", render_section(res, machine, command, time.perf_counter() - t0)
        )
        replace_section(out, "peers-summary", render_summary(out))
        log(f"wrote sections peers-{wl.key} and peers-summary of {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
