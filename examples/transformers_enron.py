"""Influence functions on real text: a small BERT spam filter and a small GPT-2 language model
trained here, from configs, on the Enron-Spam e-mails (subset enron1).

What it does (Koh & Liang 2017, applied to today's black boxes):

1. Reads the raw e-mails (``enron1.csv.gz``), splits them 80/20 with ``--seed``, builds word-level
   vocabularies from the training e-mails and tokenises every e-mail (truncated, padded, with an
   attention mask).
2. **Classifier.** Trains a 2-layer ``BertForSequenceClassification`` (eager attention) on spam/ham
   and reports its accuracy. θ is the classification head (``classifier``: one linear layer on the
   frozen pooled features), refitted to the exact minimum of its L2-regularised training risk so
   that θ̂ is the minimiser the influence function assumes; then H is positive definite and
   ``Direct`` solves exactly. For one test e-mail (by default the one with the largest loss) it
   lists the most helpful and most harmful training e-mails (I_up,loss and the predicted effect of
   removing each), and checks the predictions against actual retraining: ``uw.leave_one_out`` on
   the top-|I| training e-mails and ``uw.leave_group_out`` on groups of similar e-mails (nearest
   neighbours in the pooled feature space), both with exact float64 refits of θ; it reports
   Pearson, Spearman and the slope, to first and to second order. With ``--pooler`` it also scores
   θ = pooler + head, which is not convex: CG on the Hessian with damping, CG on the Gauss–Newton
   matrix and EK-FAC, against each other and against the head-only scores.
3. **Language model.** Trains a 2-layer ``GPT2LMHeadModel`` on the training e-mails and reports
   the train and test loss per token. For a prompt taken from a test e-mail it generates a greedy
   continuation and computes the influence of every training e-mail on −log p(continuation |
   prompt) (the ``causal_lm`` loss with the prompt labelled −100). θ is the last transformer
   block's MLP and the final layer norm; their Hessian is indefinite, so the damping comes from a
   Lanczos estimate of its smallest eigenvalue, and CG solves with it. The same θ and damping with
   the Gauss–Newton matrix (``Influence(curvature="gauss-newton")``) is compared with it, and so is
   EK-FAC on that Gauss–Newton matrix (``--lm-samples``), its output Hessian over the T·V logits of
   an e-mail sampled: labels drawn from the model at every position (``KFAC``'s output factors).
   The removal predictions are checked against actual retraining on a subset of the training
   e-mails: ``uw.leave_one_out`` with ``uw.ProximalRefit`` (θ̂ is no minimum, so the damped
   influence predicts the refit of the damped objective that is stationary at θ̂).
4. Writes ``results.json`` (every number, the solvers' provenance and the timings), ``report.md``,
   the scores of every training e-mail (``scores_classifier.npz``, ``scores_lm.npz``,
   ``scores_lm_gauss_newton.npz``, ``scores_lm_ekfac.npz``; ``uw.InfluenceScores.load``) and
   both models' weights (``classifier.pt``, ``lm.pt``; their configs are in ``results.json``) into
   ``--out``.

Run it from the repository root (the command, run time and numbers of a full run are in
docs/transformers.md)::

    python examples/transformers_enron.py --data ../shared/data/enron1 --out
    out/transformers_enron   # or: make example-transformers

No network is used: the models are built from configs with random initial weights and the
vocabularies are built from the training e-mails.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import gzip
import io
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import upweight as uw
from upweight.core.losses import IGNORE_INDEX
from upweight.errors import NotAtMinimumWarning, NotPositiveDefiniteError
from upweight.loo import RefitResult
from upweight.solvers.direct import suggest_damping
from upweight.store import atomic_write

PAD, UNK, CLS, BOS = "[PAD]", "[UNK]", "[CLS]", "[BOS]"
SPECIALS = (PAD, UNK, CLS, BOS)


# ── settings ──────────────────────────────────────────────────────────────────────────────────
@dataclass
class Sizes:
    """Everything that sets the size (and so the run time) of the experiment."""

    n_train: int  # training e-mails (of the 80 % split) for both models
    n_test: int  # test e-mails (of the 20 % split) for accuracies and test losses
    vocab: int  # word-level vocabulary, including the 4 special tokens
    cls_len: int  # classifier: tokens per e-mail ([CLS] + words)
    cls_hidden: int
    cls_epochs: int
    cls_lr: float
    batch: int  # minibatch size of both trainings
    lm_n_train: int  # language model: the first lm_n_train of the training e-mails
    # its own, smaller vocabulary (the output layer dominates the Hessian-vector products)
    lm_vocab: int
    lm_len: int  # tokens per e-mail ([BOS] + words)
    lm_hidden: int
    lm_epochs: int
    # training points of the Lanczos estimate of a Hessian spectrum (for the damping)
    lanczos_points: int
    lanczos_k: int  # its steps
    loo_k: int  # leave-one-out retrainings
    lm_loo_points: int  # training e-mails of the LM's retraining check (a subset, for CPU)
    lm_loo_k: int  # its leave-one-out retrainings
    groups: int  # leave-group-out retrainings
    # e-mails per removed group: a random training e-mail and its nearest neighbours
    group_size: int
    prompt_len: int  # prompt tokens ([BOS] + words) for the generation
    gen_len: int  # greedily generated tokens


FULL = Sizes(
    n_train=4137,
    n_test=1035,
    vocab=3000,
    cls_len=96,
    cls_hidden=64,
    cls_epochs=4,
    cls_lr=1e-3,
    batch=32,
    lm_n_train=4137,
    lm_vocab=1500,
    lm_len=32,
    lm_hidden=64,
    lm_epochs=6,
    lanczos_points=256,
    lanczos_k=20,
    loo_k=60,
    lm_loo_points=200,
    lm_loo_k=8,
    groups=30,
    group_size=40,
    prompt_len=10,
    gen_len=6,
)
TINY = Sizes(
    n_train=240,
    n_test=120,
    vocab=600,
    cls_len=32,
    cls_hidden=32,
    cls_epochs=6,
    cls_lr=3e-3,
    batch=16,
    lm_n_train=240,
    lm_vocab=400,
    lm_len=24,
    lm_hidden=32,
    lm_epochs=2,
    lanczos_points=64,
    lanczos_k=10,
    loo_k=16,
    lm_loo_points=60,
    lm_loo_k=6,
    groups=8,
    group_size=12,
    prompt_len=6,
    gen_len=4,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(
            "Influence of training e-mails on a small BERT spam classifier and a small GPT-2"
            " language model (Enron-Spam enron1), both trained here from configs. Numbers of a full"
            " run: docs/transformers.md."
        )
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help=(
            "the enron1 folder (holding enron1.csv.gz) or the CSV itself; default:"
            " shared/data/enron1 next to or above the repository"
        ),
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("out/transformers_enron"),
        help="output folder (default: out/transformers_enron)",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="a seconds-long version: few e-mails, tiny models (for tests)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the initial weights and the training (default: 0)",
    )
    ap.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training e-mails (default 4137 = all of the 80 %% split; tiny 240)",
    )
    ap.add_argument(
        "--n-test", type=int, default=None, help="test e-mails (default 1035; tiny 120)"
    )
    ap.add_argument(
        "--test-index",
        type=int,
        default=None,
        help=(
            "position in the test split of the e-mail the classifier is explained for "
            "(default: the test e-mail with the largest loss)"
        ),
    )
    ap.add_argument(
        "--lm-test-index",
        type=int,
        default=None,
        help=(
            "position in the test split of the e-mail whose start is the LM prompt "
            "(default: the first long enough with no [UNK] in its prompt)"
        ),
    )
    ap.add_argument(
        "--l2",
        type=float,
        default=1e-3,
        help="L2 penalty of the classifier head's training risk (default: 1e-3)",
    )
    ap.add_argument(
        "--lm-damping",
        type=float,
        default=None,
        help=(
            "damping δ of the LM's Hessian (default: from a Lanczos estimate of its spectrum, "
            "max(1.5·|λmin|, 0.01·λmax) rounded)"
        ),
    )
    ap.add_argument(
        "--lm-float64", action="store_true", help="the LM's influence in float64 (default float32)"
    )
    ap.add_argument(
        "--lm-samples",
        type=int,
        default=1,
        help=(
            "also score the LM with EK-FAC on the Gauss-Newton matrix, its output "
            "Hessian sampled with this many label draws per e-mail "
            "(default: 1; 0: no EK-FAC)"
        ),
    )
    ap.add_argument(
        "--pooler",
        action="store_true",
        help=(
            "also score θ = pooler + head (CG on the damped Hessian and on the Gauss–Newton matrix,"
            " and EK-FAC)"
        ),
    )
    ap.add_argument(
        "--top", type=int, default=5, help="helpful / harmful training e-mails listed (default: 5)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; on a busy 2-core machine 1 is fastest)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def default_data_path() -> Path | None:
    """shared/data/enron1 in the repository's parent folders (the layout of this project's
    machines)."""
    here = Path(__file__).resolve().parent
    for base in [here, *here.parents]:
        cand = base / "shared" / "data" / "enron1"
        if (cand / "enron1.csv.gz").exists():
            return cand
    return None


# ── data and vocabulary ───────────────────────────────────────────────────────────────────────
@dataclass
class Email:
    file: str
    label: int  # 1 spam, 0 ham
    text: str


def load_emails(path: Path) -> list[Email]:
    """The raw e-mails of enron1.csv.gz (columns file, label, text; README.md next to it)."""
    csv_path = path / "enron1.csv.gz" if path.is_dir() else path
    if not csv_path.exists():
        raise SystemExit(
            f"{csv_path} does not exist: pass --data pointing at the enron1 folder or its CSV."
        )
    csv.field_size_limit(1 << 30)
    opener = gzip.open if csv_path.suffix == ".gz" else open
    with opener(csv_path, "rt", encoding="utf-8", newline="") as fh:
        return [Email(r["file"], int(r["label"]), r["text"]) for r in csv.DictReader(fh)]


def words(text: str) -> list[str]:
    """The release is lower-cased with punctuation split off, so whitespace splits it into words;
    digits become 0 (prices, dates and phone numbers share a few tokens)."""
    return re.sub(r"\d", "0", text.lower()).split()


class Vocab:
    """A word-level vocabulary: the most frequent training words, the rest [UNK]."""

    def __init__(self, texts: list[str], size: int) -> None:
        counts = collections.Counter(w for t in texts for w in words(t))
        self.itos = list(SPECIALS) + [
            w for w, c in counts.most_common(size - len(SPECIALS)) if c >= 2
        ]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        total = sum(counts.values())
        # share of training words kept
        self.coverage = sum(counts[w] for w in self.itos) / max(total, 1)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(
        self, texts: list[str], length: int, first: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), shape (n, length): ``first`` then the words, truncated,
        padded."""
        ids = torch.full((len(texts), length), self.stoi[PAD], dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        unk = self.stoi[UNK]
        for i, t in enumerate(texts):
            row = [self.stoi[first]] + [self.stoi.get(w, unk) for w in words(t)[: length - 1]]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Any) -> str:
        return " ".join(self.itos[int(i)] for i in ids)


def snippet(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# ── training ──────────────────────────────────────────────────────────────────────────────────
def _bar(it: Any, desc: str, quiet: bool, total: int | None = None) -> Any:
    if quiet:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of upweight, but be lenient
        return it
    return tqdm(it, desc=desc, total=total, leave=False, file=sys.stderr)


def train_model(
    model: torch.nn.Module, batches: Any, epochs: int, lr: float, quiet: bool, desc: str
) -> list[float]:
    """AdamW with a linear warm-up and decay; ``batches()`` yields keyword dicts holding ``labels``.
    Returns the mean training loss of each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * sum(1 for _ in batches())
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.05, (steps - s) / (steps - warm)))
    )
    model.train()
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in _bar(batches(), f"{desc} epoch {epoch + 1}/{epochs}", quiet, steps // epochs):
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, count = total + loss.item(), count + 1
        history.append(total / count)
    model.eval()
    return history


def minibatches(tensors: dict[str, torch.Tensor], size: int, gen: torch.Generator):
    """A function yielding shuffled minibatches of the dict of tensors (one epoch per call)."""
    n = len(next(iter(tensors.values())))

    def run():
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, size):
            idx = order[s : s + size]
            yield {k: v[idx] for k, v in tensors.items()}

    return run


@torch.no_grad()
def predict(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    return torch.cat(
        [
            model(input_ids=ids[s : s + batch], attention_mask=mask[s : s + batch]).logits
            for s in range(0, len(ids), batch)
        ]
    )


@torch.no_grad()
def token_loss(
    lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 128
) -> float:
    """Mean −log p(token | previous tokens) over every predicted (non-padding) token, in nats."""
    total, count = 0.0, 0
    for s in range(0, len(ids), batch):
        i, m = ids[s : s + batch], mask[s : s + batch]
        logp = torch.log_softmax(lm(input_ids=i, attention_mask=m).logits[:, :-1].double(), -1)
        tok = logp.gather(-1, i[:, 1:, None])[..., 0]
        keep = m[:, 1:].bool()
        total, count = total - float(tok[keep].sum()), count + int(keep.sum())
    return total / count


# ── explanations ──────────────────────────────────────────────────────────────────────────────
def ranked(
    scores: uw.InfluenceScores, emails: list[Email], k: int
) -> dict[str, list[dict[str, Any]]]:
    """The k most helpful (most negative I_up,loss: upweighting them lowers the test measure,
    removing them raises it) and most harmful (most positive) training e-mails of test row 0. A list
    holds only e-mails of its sign, so it is shorter than k (or empty) when fewer have that sign —
    e.g. for a misclassified test e-mail every well-fitted training e-mail may be harmful, since
    upweighting it makes the model more confident.
    """
    removal = scores.as_removal_effect().values[0]
    out = {}
    for kind, harmful in (("helpful", False), ("harmful", True)):
        top = scores.top_k(k, harmful=harmful)
        out[kind] = [
            {
                "train_id": int(i),
                "file": emails[int(i)].file,
                "label": "spam" if emails[int(i)].label else "ham",
                "up_loss": float(v),
                "removal_effect": float(removal[int(i)]),
                "snippet": snippet(emails[int(i)].text),
            }
            for i, v in zip(top.train_ids, top.values)
            if (v > 0 if harmful else v < 0)
        ]
    return out


def print_ranked(title: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    for kind in ("helpful", "harmful"):
        print(f"  {kind} training e-mails ({title}):")
        if not rows[kind]:
            print(
                f"    none: no training e-mail is {kind} (I_up,loss"
                f" {'< 0' if kind == 'helpful' else '> 0'})"
            )
            continue
        print(f"    {'id':>5} {'label':>5} {'I_up,loss':>11} {'removal Δ':>11}  text")
        for r in rows[kind]:
            print(
                f"    {r['train_id']:>5} {r['label']:>5} {r['up_loss']:>11.3e}"
                f" {r['removal_effect']:>11.3e}  {r['snippet']}"
            )


def agreement(cmp: Any) -> dict[str, Any]:
    return {
        "pearson": cmp.pearson,
        "spearman": cmp.spearman,
        "slope": cmp.slope,
        "intercept": cmp.intercept,
        "k": int(len(cmp.train_ids)),
        "retrain_grad_norm": cmp.retrain_grad_norm,
        "seconds": cmp.seconds,
        "predicted": cmp.predicted.tolist(),
        "actual": cmp.actual.tolist(),
        "train_ids": cmp.train_ids.tolist(),
    }


class HeadRefit:
    """``train_fn`` for ``uw.leave_one_out`` on the Hugging Face objective with θ = the classifier
    head: refits the head exactly (float64 L-BFGS, ``uw.refit``) on the cached pooled features,
    with weight 0 on the removed e-mails and the same n and l2 — the retraining the default refit
    would do, without re-running BERT's frozen encoder at every L-BFGS step."""

    def __init__(
        self, head_objective: uw.Objective, features: uw.Data, prefix: str, gtol: float
    ) -> None:
        self.head_objective, self.features, self.prefix, self.gtol = (
            head_objective,
            features,
            prefix,
            gtol,
        )

    def config(self) -> dict[str, Any]:
        return {"what": "uw.refit of the head on cached pooled features", "gtol": self.gtol}

    def __call__(
        self, objective: uw.Objective, data_without: uw.Data, init: dict[str, torch.Tensor]
    ) -> RefitResult:
        w = torch.zeros(len(self.features), dtype=torch.float64)
        w[data_without.ids] = 1.0  # ids are positions in the fitted training data
        start = {n: init[self.prefix + n].double() for n in ("weight", "bias")}
        res = uw.refit(self.head_objective, self.features, weights=w, init=start, gtol=self.gtol)
        return RefitResult(
            {self.prefix + n: t for n, t in res.params.items()}, res.grad_norm, res.iterations
        )


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


# ── the experiment ────────────────────────────────────────────────────────────────────────────
@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str) -> Any:
        timer = self

        class _Span:
            def __enter__(self) -> None:
                self.t0 = time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                timer.seconds[name] = round(time.perf_counter() - self.t0, 3)

        return _Span()


def run_classifier(
    args, sz: Sizes, vocab: Vocab, train: list[Email], test: list[Email], timer: Timer, quiet: bool
) -> tuple[dict, Any]:
    import transformers

    ids, mask = vocab.encode([e.text for e in train], sz.cls_len, CLS)
    tids, tmask = vocab.encode([e.text for e in test], sz.cls_len, CLS)
    y, ty = torch.tensor([e.label for e in train]), torch.tensor([e.label for e in test])
    torch.manual_seed(args.seed)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=sz.cls_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * sz.cls_hidden,
        max_position_embeddings=sz.cls_len,
        type_vocab_size=1,
        num_labels=2,
        pad_token_id=vocab.stoi[PAD],
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"[classifier] BERT {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size},"
        f" {sum(p.numel() for p in model.parameters()):,} parameters; {len(train)} training e-mails"
        f" × {sz.cls_len} tokens"
    )
    with timer("classifier_train"):
        history = train_model(
            model,
            minibatches({"input_ids": ids, "attention_mask": mask, "labels": y}, sz.batch, gen),
            sz.cls_epochs,
            sz.cls_lr,
            quiet,
            "classifier",
        )
    model = model.double().eval()  # influence and refits in float64
    with timer("classifier_eval"):
        train_acc = float((predict(model, ids, mask).argmax(1) == y).double().mean())
        test_logits = predict(model, tids, tmask)
        test_acc_trained = float((test_logits.argmax(1) == ty).double().mean())

    # θ = the head on the frozen pooled features, refitted to the exact minimum of its L2 risk
    with timer("classifier_features"), torch.no_grad():
        feats = torch.cat(
            [
                model.bert(
                    input_ids=ids[s : s + 256], attention_mask=mask[s : s + 256]
                ).pooler_output
                for s in range(0, len(ids), 256)
            ]
        )
    head = torch.nn.Linear(cfg.hidden_size, 2).double().eval()
    head.load_state_dict(
        {k.removeprefix("classifier."): v for k, v in model.classifier.state_dict().items()}
    )
    fdata = uw.Data.from_any((feats, y))
    gtol = 1e-10
    with timer("classifier_head_refit"):
        fit = uw.refit(uw.Objective(head, "cross_entropy", l2=args.l2), fdata, gtol=gtol)
    with torch.no_grad():
        model.classifier.weight.copy_(fit.params["weight"])
        model.classifier.bias.copy_(fit.params["bias"])
        head.load_state_dict({"weight": fit.params["weight"], "bias": fit.params["bias"]})
    head_obj = uw.Objective(head, "cross_entropy", l2=args.l2)  # θ̂ is copied here: after the refit
    test_logits = predict(model, tids, tmask)
    test_acc = float((test_logits.argmax(1) == ty).double().mean())
    test_losses = torch.nn.functional.cross_entropy(test_logits, ty, reduction="none")
    t_pos = int(test_losses.argmax()) if args.test_index is None else args.test_index
    t_email = test[t_pos]
    prob_spam = float(torch.softmax(test_logits[t_pos], -1)[1])
    print(
        f"[classifier] train accuracy {train_acc:.4f}, test accuracy {test_acc_trained:.4f} as"
        f" trained, {test_acc:.4f} with the head refitted (l2={args.l2:g}, ‖∇R‖ ="
        f" {fit.grad_norm:.1e})"
    )
    print(
        f"[classifier] explained test e-mail #{t_pos} ({t_email.file},"
        f" {'spam' if t_email.label else 'ham'}, p(spam) = {prob_spam:.3f}, loss"
        f" {float(test_losses[t_pos]):.3f}): {snippet(t_email.text)}"
    )

    # influence on the Hugging Face model itself: dict batches, θ = classifier.weight/bias
    train_data = ({"input_ids": ids, "attention_mask": mask}, y)
    test_point = (
        {"input_ids": tids[t_pos : t_pos + 1], "attention_mask": tmask[t_pos : t_pos + 1]},
        ty[t_pos : t_pos + 1],
    )
    obj = uw.Objective(model, "cross_entropy", l2=args.l2, params=["classifier"])
    with timer("classifier_influence"):
        inf = uw.Influence(obj, solver=uw.Direct(), progress=not quiet, grad_tol=1e-6).fit(
            train_data
        )
        scores = inf.up_loss(test_point)
    scores.save(args.out / "scores_classifier.npz")
    rows = ranked(scores, train, args.top)
    print_ranked("θ = classifier head, Direct", rows)

    # the same head on cached features: the plain-tensor path must give the same scores
    with timer("classifier_features_influence"):
        finf = uw.Influence(head_obj, solver=uw.Direct(), progress=False, grad_tol=1e-6).fit(fdata)
        feats_test = feats_of(model, tids[t_pos : t_pos + 1], tmask[t_pos : t_pos + 1])
        fscores = finf.up_loss((feats_test, ty[t_pos : t_pos + 1]))
    same = float(np.abs(fscores.values - scores.values).max() / np.abs(scores.values).max())

    # leave-one-out: exact refits of θ without each of the top-|I| e-mails
    with timer("classifier_leave_one_out"):
        loo = uw.leave_one_out(
            inf,
            test_point,
            k=min(sz.loo_k, len(train)),
            scores=scores,
            progress=not quiet,
            train_fn=HeadRefit(head_obj, fdata, "classifier.", gtol),
        )
    print(f"[classifier] {loo}")
    # the same removals to second order, with the third-derivative term that Basu et al. drop: the
    # largest removals move θ̂ far enough for the curvature of the other e-mails to change along the
    # way
    with timer("classifier_leave_one_out_second_order"):
        loo2 = uw.leave_group_out(
            finf,
            (feats_test, ty[t_pos : t_pos + 1]),
            [[int(i)] for i in loo.train_ids],
            orders=(1, 2),
            third_derivative=True,
            gtol=gtol,
            progress=not quiet,
        )
    print(
        f"[classifier] the same {len(loo.train_ids)} removals, second order (with ∇³R): Pearson"
        f" {loo2.pearson[2]:.4f}, slope {loo2.slope[2]:.3f} (first order through leave_group_out:"
        f" slope {loo2.slope[1]:.3f})"
    )

    # leave-group-out: groups of similar e-mails — a random training e-mail and its nearest
    # neighbours in the pooled feature space — removed at once, against the first- and second-order
    # group influence
    with timer("classifier_leave_group_out"):
        rng = np.random.default_rng(args.seed)
        centres = rng.choice(len(train), size=min(sz.groups, len(train)), replace=False)
        size = min(sz.group_size, len(train) // 4)
        dist = torch.cdist(feats[centres], feats)
        groups = [
            np.sort(dist[j].topk(size, largest=False).indices.numpy()) for j in range(len(centres))
        ]
        lgo = uw.leave_group_out(
            finf,
            (feats_test, ty[t_pos : t_pos + 1]),
            groups,
            orders=(1, 2),
            third_derivative=True,
            gtol=gtol,
            progress=not quiet,
        )
    print("[classifier] " + str(lgo).replace("\n", "\n[classifier] "))

    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "train_loss_per_epoch": history,
        "train_accuracy": train_acc,
        "test_accuracy_as_trained": test_acc_trained,
        "test_accuracy": test_acc,
        "theta": list(obj.params),
        "p": obj.p,
        "l2": args.l2,
        "head_refit_grad_norm": fit.grad_norm,
        "test_email": {
            "position": t_pos,
            "file": t_email.file,
            "label": t_email.label,
            "p_spam": prob_spam,
            "loss": float(test_losses[t_pos]),
            "snippet": snippet(t_email.text, 200),
        },
        "influence": {
            "solver": "Direct (exact Hessian of the head, float64)",
            "provenance": dict(scores.provenance),
            "up_loss_min": float(scores.values.min()),
            "up_loss_max": float(scores.values.max()),
            "all_finite": bool(np.isfinite(scores.values).all()),
            "scoring": inf.scoring_,
            "scoring_reason": inf.scoring_reason_,
            "features_path_max_rel_diff": same,
        },
        "top": rows,
        "leave_one_out": {
            **agreement(loo),
            "select": "top |I_up,loss|",
            "retraining": (
                "float64 L-BFGS refit of the head on the cached pooled features (HeadRefit)"
            ),
        },
        "leave_one_out_second_order": {
            "what": (
                "the same removals by leave_group_out with singleton groups: order 1, and order 2"
                " with the third-derivative term (third_derivative=True)"
            ),
            "actual": loo2.actual.tolist(),
            "retrain_grad_norm": loo2.retrain_grad_norm,
            **{
                f"order{o}": {**loo2.agreement(o), "predicted": loo2.predicted[o].tolist()}
                for o in loo2.orders
            },
        },
        "leave_group_out": {
            "third_derivative": True,
            "groups": len(groups),
            "group_size": size,
            "grouping": (
                f"{len(groups)} random training e-mails, each with its {size - 1} nearest"
                " neighbours (Euclidean, pooled features)"
            ),
            "retrain_grad_norm": lgo.retrain_grad_norm,
            "seconds": lgo.seconds,
            "actual": lgo.actual.tolist(),
            **{
                f"order{o}": {**lgo.agreement(o), "predicted": lgo.predicted[o].tolist()}
                for o in lgo.orders
            },
        },
    }
    if args.pooler:
        result["pooler"] = pooler_influence(
            model, args, sz, train_data, test_point, scores, timer, quiet
        )
    return result, model


@torch.no_grad()
def feats_of(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.bert(input_ids=ids, attention_mask=mask).pooler_output


def pooler_influence(
    model, args, sz: Sizes, train_data, test_point, head_scores, timer: Timer, quiet: bool
) -> dict[str, Any]:
    """θ = pooler + head: not convex (a tanh between the two layers) and not at a minimum (trained
    by AdamW), so H is indefinite. Scored twice: CG on the exact Hessian plus the damping a Lanczos
    estimate asks for, and EK-FAC on the Gauss–Newton matrix with the same damping; both compared
    with the exact head-only scores.
    """
    obj = uw.Objective(model, "cross_entropy", l2=args.l2, params=["classifier", "bert.pooler"])
    data = uw.Data.from_any(train_data)
    out: dict[str, Any] = {"theta": ["classifier", "bert.pooler"], "p": obj.p}
    with timer("classifier_pooler_spectrum"):
        spec, damping = choose_damping(obj, data, sz, args.seed)
    out.update(spectrum=spec.as_stats(""), damping=damping)
    ref = head_scores.values[0]
    got = {}
    for name, solver, curvature in (
        ("cg", uw.CG(rtol=1e-4), "hessian"),
        ("gn_cg", uw.CG(rtol=1e-4), "gauss-newton"),
        ("ekfac", uw.EKFAC(), "gauss-newton"),
    ):
        with timer(f"classifier_pooler_{name}"):
            inf, scores, damping, tries = fit_damped(
                obj, data, test_point, solver, damping, quiet, "[classifier]", curvature
            )
        got[name] = scores.values[0]
        out[name] = {
            "provenance": dict(scores.provenance),
            "damping_tries": tries,
            **compare_scores(got[name], ref, "head_only"),
        }
    out["damping"] = damping
    out["grad_norm"] = inf.grad_norm_
    # Kronecker factors + Gauss–Newton vs exact H
    out["ekfac_vs_cg"] = compare_scores(got["ekfac"], got["cg"], "cg")
    # the Kronecker factors alone
    out["ekfac_vs_gn_cg"] = compare_scores(got["ekfac"], got["gn_cg"], "gn_cg")
    # Gauss–Newton vs Hessian, both exact
    out["gn_cg_vs_cg"] = compare_scores(got["gn_cg"], got["cg"], "cg")
    print(
        f"[classifier] θ = pooler + head (p = {obj.p}, damping {damping:g} from Lanczos λmin ≈"
        f" {spec.lambda_min:.2g}): Hessian-CG vs head-only Pearson"
        f" {out['cg']['pearson_vs_head_only']:.3f}, top-10 overlap"
        f" {out['cg']['top10_overlap_vs_head_only']:.1f}; Gauss–Newton-CG vs Hessian-CG Pearson"
        f" {out['gn_cg_vs_cg']['pearson_vs_cg']:.4f}, top-10 overlap"
        f" {out['gn_cg_vs_cg']['top10_overlap_vs_cg']:.1f}; EK-FAC vs Gauss–Newton-CG Pearson"
        f" {out['ekfac_vs_gn_cg']['pearson_vs_gn_cg']:.4f}, Spearman"
        f" {out['ekfac_vs_gn_cg']['spearman_vs_gn_cg']:.3f}, top-10 overlap"
        f" {out['ekfac_vs_gn_cg']['top10_overlap_vs_gn_cg']:.1f}"
    )
    return out


def fit_damped(
    obj: uw.Objective,
    data: uw.Data,
    test_point: Any,
    solver: Any,
    damping: float,
    quiet: bool,
    tag: str,
    curvature: str = "hessian",
) -> tuple[uw.Influence, uw.InfluenceScores, float, list[dict[str, Any]]]:
    """``Influence(obj, solver, damping, curvature).fit(data).up_loss(test_point)``; where the
    solver still meets negative curvature (the Lanczos estimate of λmin was too optimistic) again
    with the damping the error names."""
    tries: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        # θ̂ is no minimum here; ‖∇R(θ̂)‖ is recorded instead
        warnings.simplefilter("ignore", NotAtMinimumWarning)
        for _ in range(3):
            t0 = time.perf_counter()
            try:
                inf = uw.Influence(
                    obj,
                    solver=solver,
                    damping=damping,
                    progress=not quiet,
                    grad_tol=1e9,
                    curvature=curvature,
                ).fit(data)
                scores = inf.up_loss(test_point)
                tries.append(
                    {
                        "damping": damping,
                        "outcome": "ok",
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                return inf, scores, damping, tries
            except NotPositiveDefiniteError as exc:
                tries.append(
                    {
                        "damping": damping,
                        "outcome": f"NotPositiveDefiniteError: λmin ≈ {exc.min_eigenvalue:.3e}",
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                print(
                    f"{tag} damping {damping:g}: H + δI is indefinite (λmin ≈"
                    f" {exc.min_eigenvalue:.2e}); retrying with δ = {exc.suggested_damping:g}"
                )
                damping = exc.suggested_damping
    raise RuntimeError(f"no damping made the Hessian positive definite: {tries}")


def compare_scores(a: np.ndarray, b: np.ndarray, name: str) -> dict[str, float]:
    """Pearson and Spearman of two score vectors, and the overlap of their 10 largest
    |I_up,loss|."""
    import scipy.stats

    top = len(set(np.argsort(-np.abs(a))[:10]) & set(np.argsort(-np.abs(b))[:10])) / 10
    return {
        f"pearson_vs_{name}": float(scipy.stats.pearsonr(a, b)[0]),
        f"spearman_vs_{name}": float(scipy.stats.spearmanr(a, b)[0]),
        f"top10_overlap_vs_{name}": top,
    }


def choose_damping(obj: uw.Objective, data: uw.Data, sz: Sizes, seed: int) -> tuple[Any, float]:
    """A damping δ that makes H + δI positive definite, from Lanczos (a few dozen Hessian-vector
    products) on a random subset of the training points: the round δ ≥ 1.5·|λmin| (upweight's
    suggest_damping), and at least 1 % of λmax. The subset's Hessian is the full one's unbiased
    estimate; its λmin is noisier."""
    from upweight.solvers.spectrum import lanczos

    rng = np.random.default_rng(seed)
    sub = data.subset(
        np.sort(rng.choice(len(data), min(sz.lanczos_points, len(data)), replace=False))
    )
    spec = lanczos(
        uw.Curvature(obj, sub).matvec,
        obj.p,
        k=sz.lanczos_k,
        dtype=obj.dtype,
        seed=seed,
        source=f"{len(sub)} random training points",
    )
    damping = suggest_damping(min(spec.lambda_min, 0.0), 0.0, spec.lambda_max)
    return spec, max(damping, float(f"{0.01 * spec.lambda_max:.1g}"))


@torch.no_grad()
def greedy(lm: Any, prompt: torch.Tensor, steps: int, banned: list[int]) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (1-D ids), never choosing the ``banned`` (special)
    tokens."""
    ids = prompt.clone()
    for _ in range(steps):
        logits = lm(input_ids=ids[None]).logits[0, -1].clone()
        logits[banned] = -math.inf
        ids = torch.cat([ids, logits.argmax()[None]])
    return ids[len(prompt) :]


def run_lm(
    args, sz: Sizes, train: list[Email], test: list[Email], timer: Timer, quiet: bool
) -> tuple[dict, Any]:
    import transformers

    train = train[: sz.lm_n_train]
    vocab = Vocab([e.text for e in train], sz.lm_vocab)
    ids, mask = vocab.encode([e.text for e in train], sz.lm_len, BOS)
    tids, tmask = vocab.encode([e.text for e in test], sz.lm_len, BOS)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    torch.manual_seed(args.seed)
    cfg = transformers.GPT2Config(
        vocab_size=len(vocab),
        n_embd=sz.lm_hidden,
        n_layer=2,
        n_head=2,
        n_positions=sz.lm_len,
        bos_token_id=vocab.stoi[BOS],
        eos_token_id=vocab.stoi[BOS],
        pad_token_id=vocab.stoi[PAD],
        attn_implementation="eager",
    )
    lm = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(
        f"[lm] GPT-2 {cfg.n_layer} layers, width {cfg.n_embd},"
        f" {sum(p.numel() for p in lm.parameters()):,} parameters (tied input/output embedding),"
        f" vocabulary {len(vocab)} words ({100 * vocab.coverage:.1f} % of training words);"
        f" {len(train)} training e-mails × {sz.lm_len} tokens"
    )
    with timer("lm_train"):
        history = train_model(
            lm,
            minibatches(
                {"input_ids": ids, "attention_mask": mask, "labels": labels}, sz.batch, gen
            ),
            sz.lm_epochs,
            3e-3,
            quiet,
            "language model",
        )
    dtype = torch.float64 if args.lm_float64 else torch.float32
    lm = lm.to(dtype).eval()
    with timer("lm_eval"):
        train_loss, test_loss = token_loss(lm, ids, mask), token_loss(lm, tids, tmask)
    print(
        f"[lm] loss per token: train {train_loss:.3f}, test {test_loss:.3f} nats (perplexity"
        f" {math.exp(train_loss):.1f} / {math.exp(test_loss):.1f}; uniform over the vocabulary:"
        f" {math.log(len(vocab)):.3f})"
    )

    # the prompt: the start of a test e-mail (the first long enough without [UNK] in its prompt) and
    # its greedy continuation, special tokens excluded
    need = sz.prompt_len + sz.gen_len
    pos = args.lm_test_index
    if pos is None:
        long_enough = [i for i in range(len(test)) if int(tmask[i].sum()) >= need]
        known = [i for i in long_enough if vocab.stoi[UNK] not in tids[i, : sz.prompt_len].tolist()]
        pos = (known or long_enough or [0])[0]
    prompt = tids[pos, : sz.prompt_len]
    banned = [vocab.stoi[s] for s in SPECIALS]
    cont = greedy(lm, prompt, sz.gen_len, banned)
    full = torch.cat([prompt, cont])[None]
    completion = full.clone()
    completion[:, : sz.prompt_len] = IGNORE_INDEX  # the measure: −log p(continuation | prompt)
    test_point = ({"input_ids": full, "attention_mask": torch.ones_like(full)}, completion)
    print(f"[lm] prompt (test e-mail #{pos}, {test[pos].file}): {vocab.decode(prompt)!r}")
    print(
        f"[lm] greedy continuation: {vocab.decode(cont)!r}; the e-mail goes on:"
        f" {vocab.decode(tids[pos, sz.prompt_len : need])!r}"
    )

    last = f"transformer.h.{cfg.n_layer - 1}.mlp"
    theta = [last, "transformer.ln_f"]
    obj = uw.Objective(lm, "causal_lm", params=theta)
    measure = float(obj.measurements(obj.params, test_point[0], completion)[0])
    print(
        f"[lm] measure −log p(continuation | prompt) = {measure:.4f} nats; θ = {theta} (p ="
        f" {obj.p:,}), {dtype}"
    )

    train_data = uw.Data.from_any(({"input_ids": ids, "attention_mask": mask}, labels))
    with timer("lm_spectrum"):  # H of this non-convex θ is indefinite
        spec, damping = choose_damping(obj, train_data, sz, args.seed)
    if args.lm_damping is not None:
        damping = args.lm_damping
    print(
        f"[lm] Lanczos ({spec.iterations} steps on {spec.source}): λmin ≈ {spec.lambda_min:.3g}, "
        f"λmax ≈ {spec.lambda_max:.3g} → damping δ = {damping:g}"
    )
    with timer("lm_influence"):
        inf, scores, damping, tries = fit_damped(
            obj, train_data, test_point, uw.CG(rtol=1e-3, maxiter=300), damping, quiet, "[lm]"
        )
    scores.save(args.out / "scores_lm.npz")
    # the same θ and damping with the Gauss–Newton matrix (positive semi-definite) in place of the
    # Hessian
    with timer("lm_influence_gauss_newton"):
        _, gn_scores, gn_damping, gn_tries = fit_damped(
            obj,
            train_data,
            test_point,
            uw.CG(rtol=1e-3, maxiter=300),
            damping,
            quiet,
            "[lm]",
            "gauss-newton",
        )
    gn_scores.save(args.out / "scores_lm_gauss_newton.npz")
    gn = {
        "damping": gn_damping,
        "damping_tries": gn_tries,
        "provenance": dict(gn_scores.provenance),
        "top": ranked(gn_scores, train, args.top),
        **compare_scores(gn_scores.values[0], scores.values[0], "hessian"),
    }
    # EK-FAC on the same Gauss–Newton matrix and damping: its output Hessian (T·V logits per
    # e-mail) is sampled, labels drawn from the model at every position (output_factors="auto")
    ekfac = None
    if args.lm_samples > 0:
        with timer("lm_influence_ekfac"), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotAtMinimumWarning)
            ekfac_solver = uw.EKFAC(samples=args.lm_samples, seed=args.seed)
            ek_scores = (
                uw.Influence(
                    obj,
                    solver=ekfac_solver,
                    damping=gn_damping,
                    curvature="gauss-newton",
                    progress=not quiet,
                    grad_tol=1e9,
                    max_residual=None,
                )
                .fit(train_data)
                .up_loss(test_point)
            )
        ek_scores.save(args.out / "scores_lm_ekfac.npz")
        ekfac = {
            "damping": gn_damping,
            "samples": args.lm_samples,
            "provenance": dict(ek_scores.provenance),
            "top": ranked(ek_scores, train, args.top),
            "seconds": timer.seconds["lm_influence_ekfac"],
            "gauss_newton_cg_seconds": timer.seconds["lm_influence_gauss_newton"],
            **compare_scores(ek_scores.values[0], gn_scores.values[0], "gn_cg"),
        }
    with timer("lm_leave_one_out"):
        lm_loo = lm_retraining_check(obj, train_data, test_point, damping, sz, quiet)
    rows = ranked(scores, train, args.top)
    print_ranked(f"θ = last MLP + ln_f, CG, damping {damping:g}", rows)

    # how many of the most helpful / harmful e-mails contain a word pair of the generated text (the
    # last prompt word and the continuation), against all training e-mails
    gen_ids = [int(prompt[-1])] + cont.tolist()
    pairs = {(a, b) for a, b in zip(gen_ids[:-1], gen_ids[1:])}
    has = np.array([_has_pair(ids[i][mask[i].bool()].tolist(), pairs) for i in range(len(train))])
    k = min(20, len(train))
    helpful = np.argsort(scores.values[0], kind="stable")[:k]
    harmful = np.argsort(-scores.values[0], kind="stable")[:k]
    result = {
        "config": cfg.to_dict(),
        "dtype": str(dtype),
        "vocab": len(vocab),
        "vocab_coverage": vocab.coverage,
        "n_train": len(train),
        "train_loss_per_epoch": history,
        "train_loss_per_token": train_loss,
        "test_loss_per_token": test_loss,
        "prompt": {
            "test_position": pos,
            "file": test[pos].file,
            "ids": prompt.tolist(),
            "text": vocab.decode(prompt),
        },
        "continuation": {"ids": cont.tolist(), "text": vocab.decode(cont), "banned_ids": banned},
        "measure": measure,
        "theta": theta,
        "p": obj.p,
        "grad_norm": inf.grad_norm_,
        "spectrum": spec.as_stats(""),
        "damping": damping,
        "damping_tries": tries,
        "influence": {
            "solver": f"CG on the exact Hessian of θ plus damping, {dtype}",
            "provenance": dict(scores.provenance),
            "up_loss_min": float(scores.values.min()),
            "up_loss_max": float(scores.values.max()),
            "all_finite": bool(np.isfinite(scores.values).all()),
        },
        "top": rows,
        "word_pairs": {
            "pairs": sorted(f"{vocab.itos[a]} {vocab.itos[b]}" for a, b in pairs),
            "k": k,
            "in_top_helpful": int(has[helpful].sum()),
            "in_top_harmful": int(has[harmful].sum()),
            "in_all_training": int(has.sum()),
            "n_train": len(train),
        },
        "gauss_newton": gn,
        "ekfac": ekfac,
        "leave_one_out": lm_loo,
        "vocab_itos": vocab.itos,
    }
    print(
        f"[lm] {int(has[helpful].sum())} of the top-{k} helpful e-mails contain a word pair of the"
        f" generated text, {int(has[harmful].sum())} of the top-{k} harmful, {int(has.sum())} of"
        f" all {len(train)} ({100 * has.mean():.1f} %)"
    )
    print(
        f"[lm] Gauss–Newton instead of the Hessian (same θ, damping {gn_damping:g}): Pearson"
        f" {gn['pearson_vs_hessian']:.3f}, Spearman {gn['spearman_vs_hessian']:.3f}, top-10 overlap"
        f" {gn['top10_overlap_vs_hessian']:.1f}; its most helpful"
        f" {[r['train_id'] for r in gn['top']['helpful']]}, most harmful"
        f" {[r['train_id'] for r in gn['top']['harmful']]}"
    )
    if ekfac is not None:
        print(
            "[lm] EK-FAC on the Gauss–Newton matrix "
            f"({ekfac['provenance']['solver_output_factors']} output factors, {args.lm_samples} "
            f"per e-mail): {ekfac['seconds']:.1f} s against "
            f"{ekfac['gauss_newton_cg_seconds']:.1f} s for CG; Pearson "
            f"{ekfac['pearson_vs_gn_cg']:.3f}, Spearman {ekfac['spearman_vs_gn_cg']:.3f}, "
            "top-10 overlap "
            f"{ekfac['top10_overlap_vs_gn_cg']:.1f} with Gauss–Newton CG"
        )
    return result, lm


def lm_retraining_check(
    obj: uw.Objective,
    train_data: uw.Data,
    test_point: Any,
    damping: float,
    sz: Sizes,
    quiet: bool,
) -> dict[str, Any]:
    """The LM's removal predictions against actual retraining, on the first ``lm_loo_points``
    training e-mails (each L-BFGS step runs the LM over all of them): influence with the exact
    Hessian of θ plus the damping, and for each of the ``lm_loo_k`` most influential e-mails the
    proximal refit without it (``uw.ProximalRefit``: θ̂ is no minimum here, so the damped influence
    predicts the response of the objective that is stationary at θ̂ with curvature H + δI, not a
    retraining from scratch)."""
    sub = train_data.subset(range(min(sz.lm_loo_points, len(train_data))))
    inf, scores, damping, tries = fit_damped(
        obj, sub, test_point, uw.CG(rtol=1e-8, maxiter=1000), damping, quiet, "[lm]"
    )
    cmp = uw.leave_one_out(
        inf,
        test_point,
        k=sz.lm_loo_k,
        scores=scores,
        train_fn=uw.ProximalRefit(inf, gtol=1e-7),
        progress=not quiet,
    )
    print(
        f"[lm] leave-one-out on {len(sub)} e-mails, {len(cmp.train_ids)} proximal retrainings"
        f" (damping {damping:g}): Pearson {cmp.pearson:.4f}, Spearman {cmp.spearman:.4f}, slope"
        f" {cmp.slope:.3f}, largest ‖∇J‖ after a refit {cmp.retrain_grad_norm:.1e}"
    )
    return {
        "n_train": len(sub),
        "damping": damping,
        "damping_tries": tries,
        "retraining": (
            "uw.ProximalRefit: float64 L-BFGS from θ̂ on the damped, gradient-corrected objective"
            " (Bae et al. 2022), the retraining the damped influence function predicts"
        ),
        "train_ids": cmp.train_ids,
        "predicted": cmp.predicted,
        "actual": cmp.actual,
        "pearson": cmp.pearson,
        "spearman": cmp.spearman,
        "slope": cmp.slope,
        "intercept": cmp.intercept,
        "retrain_grad_norm": cmp.retrain_grad_norm,
        "seconds": cmp.seconds,
    }


def _has_pair(row: list[int], pairs: set[tuple[int, int]]) -> bool:
    return any((a, b) in pairs for a, b in zip(row[:-1], row[1:]))


def _tables(top: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = []
    for kind in ("helpful", "harmful"):
        if not top[kind]:
            lines += [
                (
                    f"No training e-mail is {kind} (I_up,loss"
                    f" {'< 0' if kind == 'helpful' else '> 0'})."
                ),
                "",
            ]
            continue
        lines += [f"| {kind} | label | I_up,loss | removal Δ | text |", "|---:|---|---:|---:|---|"]
        lines += [
            f"| {r['train_id']} | {r['label']} | {r['up_loss']:.3e} | {r['removal_effect']:.3e} | "
            f"{r['snippet'].replace('|', '/')} |"
            for r in top[kind]
        ]
        lines.append("")
    return lines


def write_report(out: Path, res: dict[str, Any]) -> None:
    c, lm = res["classifier"], res["lm"]
    loo, lgo = c["leave_one_out"], c["leave_group_out"]
    tries = ", ".join(f"{t['damping']} {t['outcome'].split(':')[0]}" for t in lm["damping_tries"])
    lines = [
        "# Influence on a small BERT and a small GPT-2 trained on Enron-Spam (enron1)",
        "",
        (
            f"Run {res['started']} on {res['machine']['cpu_count']} CPU(s)"
            f" ({res['machine']['torch_threads']} torch thread(s)), torch"
            f" {res['machine']['torch']}, transformers {res['machine']['transformers']};"
            f" {'--tiny' if res['tiny'] else 'full'} mode, seed {res['seed']}; wall time"
            f" {res['timings']['total']:.0f} s."
        ),
        "",
        (
            f"Data: {res['data']['n_train']} training / {res['data']['n_test']} test e-mails;"
            f" vocabulary {res['data']['vocab']} words ({100 * res['data']['vocab_coverage']:.1f} %"
            " of training word occurrences)."
        ),
        "",
        "## Classifier (BertForSequenceClassification)",
        "",
        (
            f"* test accuracy {c['test_accuracy']:.4f} (train {c['train_accuracy']:.4f}); θ ="
            f" {c['theta']} (p = {c['p']}), refitted to ‖∇R‖ = {c['head_refit_grad_norm']:.1e} with"
            f" l2 = {c['l2']:g}; solver Direct."
        ),
        (
            f"* explained test e-mail: `{c['test_email']['file']}` (p(spam) ="
            f" {c['test_email']['p_spam']:.3f}): {c['test_email']['snippet']}"
        ),
        (
            f"* leave-one-out ({loo['k']} exact refits): Pearson {loo['pearson']:.4f}, Spearman"
            f" {loo['spearman']:.4f}, slope {loo['slope']:.3f}; to second order (with the"
            " third-derivative term) Pearson"
            f" {res['classifier']['leave_one_out_second_order']['order2']['pearson']:.4f}, slope"
            f" {res['classifier']['leave_one_out_second_order']['order2']['slope']:.3f}"
        ),
        (
            f"* leave-group-out ({lgo['grouping']}): order 1 Pearson"
            f" {lgo['order1']['pearson']:.4f}, slope {lgo['order1']['slope']:.3f}; order 2 Pearson"
            f" {lgo['order2']['pearson']:.4f}, slope {lgo['order2']['slope']:.3f}"
        ),
        "",
    ]
    lines += _tables(c["top"])
    if "pooler" in c:
        pool = c["pooler"]
        lines += [
            (
                f"θ = pooler + head (p = {pool['p']:,}, not convex; damping {pool['damping']:g}"
                f" from Lanczos λmin ≈ {pool['spectrum']['lambda_min']:.2g}): CG vs the head-only"
                f" scores Pearson {pool['cg']['pearson_vs_head_only']:.3f}, top-10 overlap"
                f" {pool['cg']['top10_overlap_vs_head_only']:.1f}; EK-FAC vs CG Pearson"
                f" {pool['ekfac_vs_cg']['pearson_vs_cg']:.3f}, Spearman"
                f" {pool['ekfac_vs_cg']['spearman_vs_cg']:.3f}, top-10 overlap"
                f" {pool['ekfac_vs_cg']['top10_overlap_vs_cg']:.1f}; Gauss–Newton-CG vs Hessian-CG"
                f" Pearson {pool['gn_cg_vs_cg']['pearson_vs_cg']:.3f}, top-10 overlap"
                f" {pool['gn_cg_vs_cg']['top10_overlap_vs_cg']:.1f}; EK-FAC vs Gauss–Newton-CG"
                f" Pearson {pool['ekfac_vs_gn_cg']['pearson_vs_gn_cg']:.3f}, top-10 overlap"
                f" {pool['ekfac_vs_gn_cg']['top10_overlap_vs_gn_cg']:.1f}."
            ),
            "",
        ]
    lines += [
        "## Language model (GPT2LMHeadModel)",
        "",
        (
            f"* loss per token: train {lm['train_loss_per_token']:.3f}, test"
            f" {lm['test_loss_per_token']:.3f} nats"
        ),
        (
            f"* prompt `{lm['prompt']['text']}` → greedy `{lm['continuation']['text']}`; "
            f"−log p(continuation | prompt) = {lm['measure']:.4f}"
        ),
        (
            f"* θ = {lm['theta']} (p = {lm['p']:,}), CG with damping {lm['damping']:g} (tries:"
            f" {tries});"
            f" ‖∇R(θ̂)‖ = {lm['grad_norm']:.2e}"
        ),
        (
            "* the same with the Gauss–Newton matrix: Pearson"
            f" {lm['gauss_newton']['pearson_vs_hessian']:.3f}, Spearman"
            f" {lm['gauss_newton']['spearman_vs_hessian']:.3f}, top-10 overlap"
            f" {lm['gauss_newton']['top10_overlap_vs_hessian']:.1f} with the Hessian's scores"
        ),
        (
            f"* leave-one-out against proximal retraining (`uw.ProximalRefit`) on"
            f" {lm['leave_one_out']['n_train']} e-mails, {len(lm['leave_one_out']['train_ids'])}"
            f" removals: Pearson {lm['leave_one_out']['pearson']:.4f}, Spearman"
            f" {lm['leave_one_out']['spearman']:.4f}, slope {lm['leave_one_out']['slope']:.3f}"
        ),
        *(
            [
                "* EK-FAC on the Gauss–Newton matrix"
                f" ({lm['ekfac']['provenance']['solver_output_factors']} output factors):"
                f" {lm['ekfac']['seconds']:.1f} s against"
                f" {lm['ekfac']['gauss_newton_cg_seconds']:.1f} s for CG; Spearman"
                f" {lm['ekfac']['spearman_vs_gn_cg']:.3f}, top-10 overlap"
                f" {lm['ekfac']['top10_overlap_vs_gn_cg']:.1f} with Gauss–Newton CG"
            ]
            if lm.get("ekfac")
            else []
        ),
        (
            f"* {lm['word_pairs']['in_top_helpful']} of the top-{lm['word_pairs']['k']} helpful and"
            f" {lm['word_pairs']['in_top_harmful']} of the top-{lm['word_pairs']['k']} harmful"
            " e-mails contain a word pair of the generated text"
            f" ({lm['word_pairs']['in_all_training']} of all {lm['word_pairs']['n_train']})"
        ),
        "",
    ]
    lines += _tables(lm["top"])
    lines += ["## Timings (s)", "", *[f"* {k}: {v:.1f}" for k, v in res["timings"].items()], ""]
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda fh: fh.write(text.encode()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    sz = TINY if args.tiny else FULL
    sz = dataclasses.replace(
        sz,
        n_train=args.n_train or sz.n_train,
        n_test=args.n_test or sz.n_test,
        lm_n_train=min(sz.lm_n_train, args.n_train or sz.n_train),
    )
    quiet = args.no_progress
    data_path = args.data or default_data_path()
    if data_path is None:
        raise SystemExit(
            "Cannot find the Enron data: pass --data pointing at the enron1 folder or"
            " enron1.csv.gz."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer()

    with timer("data"):
        emails = load_emails(Path(data_path))
        order = np.random.default_rng(args.seed).permutation(len(emails))
        cut = int(0.8 * len(emails))  # 4137 / 1035, the paper's split sizes
        train = [emails[i] for i in order[:cut][: sz.n_train]]
        test = [emails[i] for i in order[cut:][: sz.n_test]]
        vocab = Vocab([e.text for e in train], sz.vocab)
    print(
        f"[data] {len(emails)} e-mails from {data_path}: {len(train)} train"
        f" ({sum(e.label for e in train)} spam), {len(test)} test; vocabulary {len(vocab)} words"
        f" covering {100 * vocab.coverage:.1f} % of training words"
    )

    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tiny": args.tiny,
        "seed": args.seed,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "upweight": uw.__version__,
        },
        "sizes": vars(sz),
        "data": {
            "path": str(data_path),
            "n_emails": len(emails),
            "n_train": len(train),
            "n_test": len(test),
            "train_spam": sum(e.label for e in train),
            "test_spam": sum(e.label for e in test),
            "vocab": len(vocab),
            "vocab_coverage": vocab.coverage,
        },
    }
    res["classifier"], model = run_classifier(args, sz, vocab, train, test, timer, quiet)
    res["lm"], lm = run_lm(args, sz, train, test, timer, quiet)
    res["timings"] = {**timer.seconds, "total": round(time.perf_counter() - t_start, 3)}

    for name, m in (("classifier.pt", model), ("lm.pt", lm)):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        atomic_write(args.out / name, lambda fh, b=buf: fh.write(b.getvalue()))
    res["vocab_itos"] = vocab.itos
    text = json.dumps(jsonable(res), indent=1, ensure_ascii=False)
    atomic_write(args.out / "results.json", lambda fh: fh.write(text.encode()))
    write_report(args.out, res)
    print("[timings] " + ", ".join(f"{k} {v:.1f} s" for k, v in res["timings"].items()))
    print(
        f"[done] {res['timings']['total']:.1f} s; wrote {args.out / 'results.json'} and"
        f" {args.out / 'report.md'}"
    )
    return res


if __name__ == "__main__":
    main()
