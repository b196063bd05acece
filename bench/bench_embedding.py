#!/usr/bin/env python
"""Structured scoring of an embedding text classifier on real e-mail (Enron1 spam), against
per-sample gradients.

The train side of I_up,loss (Koh & Liang 2017, Eq. 2) for k rows sⱼ of s_test and every training
point: sⱼᵀ∇θL(zᵢ). For an ``nn.Embedding`` the per-sample gradient is Σₜ e_{xᵢₜ}bᵢₜᵀ (one-hot
token vectors), so ``upweight.core.structured`` scores it by gathering the query's columns at the
tokens, Σₜ bᵢₜᵀQⱼ[:, xᵢₜ], from one forward and one backward pass — never forming the V·d-wide
per-sample gradient that the generic path (``torch.func`` vmap of grad) materialises for every
point.

Workload: ``upweight.datasets.load_enron`` (Enron1, 4,137 training e-mails, the mislabel
experiment's split); scikit-learn's tokeniser (``CountVectorizer.build_analyzer``), the V − 1 most
frequent training words (id 0 = padding and out-of-vocabulary — ``padding_idx=0``, no gradient),
the first T tokens of each e-mail. Model: ``Embedding(V, d, padding_idx=0)`` → mean over the
sequence → tanh → ``Linear(d, 2)``, cross-entropy, float32, trained for a few Adam epochs (not
timed; influence needs only θ). Both paths score the same random queries S (k × p) in one process,
one thread, after a warm-up; "agree" = max |structured − generic| / max |generic|.

Usage (from the repository root)::

    .venv/bin/python bench/bench_embedding.py --out bench/RESULTS.md      # make bench-embedding
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import upweight as uw
from upweight.core.grads import per_sample_grads
from upweight.core.structured import scoring_plan, structured_scores
from upweight.datasets import load_enron

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sections import replace_section  # noqa: E402
from bench_solvers import machine_info  # noqa: E402


class MeanEmbeddingClassifier(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, classes: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim, padding_idx=0)
        self.fc = torch.nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(ids).mean(1)))


def token_ids(docs: list[str], vocab: int, length: int) -> tuple[torch.Tensor, dict[str, int]]:
    from sklearn.feature_extraction.text import CountVectorizer

    analyse = CountVectorizer().build_analyzer()
    tokens = [analyse(d) for d in docs]
    counts = Counter(w for t in tokens for w in t)
    index = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(vocab - 1))}
    ids = torch.zeros(len(docs), length, dtype=torch.int64)
    for r, t in enumerate(tokens):
        row = [index.get(w, 0) for w in t[:length]]
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return ids, index


def per_sample_scores(
    obj: uw.Objective, train: uw.Data, S: torch.Tensor, chunk: int
) -> torch.Tensor:
    """S ∇θL(zᵢ)ᵀ through per-sample gradients (torch.func vmap of grad), ``chunk`` points at a
    time."""
    parts = [
        S @ per_sample_grads(obj, obj.params, train.subset(range(s, min(s + chunk, len(train))))).T
        for s in range(0, len(train), chunk)
    ]
    return torch.cat(parts, dim=1)


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--enron", default="../shared/data/enron1/enron1.tar.gz", help="Enron1 tarball or CSV"
    )
    ap.add_argument(
        "--out", default=None, help="Markdown file whose section 'embedding-scoring' is (re)written"
    )
    ap.add_argument("--vocab", default="1024,4096", help="comma list of vocabulary sizes V")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension d")
    ap.add_argument("--length", type=int, default=128, help="tokens per e-mail T")
    ap.add_argument("--queries", default="1,10", help="comma list of k (rows of S)")
    ap.add_argument(
        "--chunk", type=int, default=256, help="points per per-sample-gradient chunk (generic path)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info(threads_set=True)
    t_start = time.perf_counter()
    data = load_enron(args.enron)
    y = torch.as_tensor((data.y_train > 0).astype("int64"))
    rows = []
    for V in (int(v) for v in args.vocab.split(",")):
        X, _ = token_ids(list(data.docs_train), V, args.length)
        torch.manual_seed(0)
        model = MeanEmbeddingClassifier(V, args.dim)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            for s in range(0, len(X), 128):
                loss = torch.nn.functional.cross_entropy(model(X[s : s + 128]), y[s : s + 128])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        obj = uw.Objective(model, "cross_entropy")
        train = uw.Data.from_any((X, y))
        plan, why = scoring_plan(obj, train)
        assert why is None and [b.kind for b in plan.blocks] == ["embedding", "linear"], why
        for k in (int(q) for q in args.queries.split(",")):
            S = torch.randn(k, obj.p, generator=torch.Generator().manual_seed(k))

            t_g, g = median_time(lambda: per_sample_scores(obj, train, S, args.chunk), args.repeats)  # noqa: B023
            t_s, st = median_time(lambda: structured_scores(obj, plan, train, S), args.repeats)  # noqa: B023
            agree = float((st - g).abs().max() / g.abs().max())
            rows.append((V, obj.p, k, t_g, t_s, agree))
            print(
                f"V={V:>5} p={obj.p:>7,} k={k:>3}: per-sample gradients {t_g:7.3f}s  structured"
                f" {t_s:7.3f}s  speed-up {t_g / t_s:5.2f}×  agree {agree:.1e}",
                flush=True,
            )
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["wall time of the script"] = f"{time.perf_counter() - t_start:.0f} s"
    command = "python bench/bench_embedding.py " + " ".join(
        shlex.quote(a) for a in argv or sys.argv[1:]
    )
    lines = [
        (
            "## Structured scoring of an embedding text classifier (Enron1 e-mail) vs per-sample"
            " gradients"
        ),
        "",
        f"Command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += [
        "",
        (
            f"n = {len(y):,} training e-mails, T = {args.length} tokens, d = {args.dim};"
            " `Embedding(V, d, padding_idx=0)` → mean → tanh → `Linear(d, 2)`, float32, one"
            f" thread; each cell the median of {args.repeats} timed calls after a warm-up, both"
            " paths in one process. See the script's docstring."
        ),
        "",
        "| V | p | k queries | per-sample gradients s | structured s | speed-up | agree |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {V:,} | {p:,} | {k} | {tg:.3f} | {ts:.3f} | {tg / ts:.2f}× | {a:.1e} |"
        for V, p, k, tg, ts, a in rows
    ]
    if args.out:
        replace_section(args.out, "embedding-scoring", "\n".join(lines))
        print(f"wrote section 'embedding-scoring' of {args.out}")


if __name__ == "__main__":
    main()
