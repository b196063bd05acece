"""One self-contained HTML page that explains one prediction (Koh & Liang 2017, §5.1–5.2, Fig. 2).

The page shows the test point (its image, feature values or text, true label and the model's
prediction), the training points that helped and hurt it most — I_up,loss(z, z_test) = −∇θL(z_test)ᵀ
H⁻¹ ∇θL(z) (Eq. 2) and the predicted change of the test loss if each were removed, −I_up,loss / n
(§2.1) — the leave-one-out scatter of predicted vs actual change (Fig. 2) with Pearson, Spearman and
slope, and the diagnostics of the inverse-HVP solve, read from the results' provenance. Given
several test points, an overview comes first: per test point its label, prediction, loss and most
helpful and harmful training ids, and the training points that recur in those lists.

Each input is shown the way its data is read: images as pictures, tabular points as their
feature values (columns named by ``feature_names``), text as text. Long rankings are paged: the
first ``page_size`` rows are open, the others sit in folded ``<details>`` sections of the same
size, so the page stays one file without scripts and no picture grows with the ranking.

Everything is inline: images are PNG ``data:`` URIs, the CSS is a ``<style>`` block, there is no
JavaScript and no reference to anything outside the file. Every piece of text goes through
``html.escape``. The builder takes plain inputs (numbers, strings, arrays, a provenance mapping
and optionally an ``LOOComparison``); it knows nothing about the command line.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np

from ..errors import InputError
from ..influence.provenance import as_provenance
from ._files import check_output_file, os_error_fix, write_text_atomic
from .plots import HARMFUL_COLOR, HELPFUL_COLOR, _as_image, loo_scatter, new_figure

__all__ = [
    "OverviewRow",
    "ReportPoint",
    "ReportTest",
    "check_report_path",
    "explain_report",
    "figure_png",
    "image_png",
    "write_report",
]

IMAGE_PX = 84  # on-page size of the longer side of a training image (pixels are shown as squares)
TEST_IMAGE_PX = 168
PAGE_SIZE = 25  # ranking rows per page; later pages are folded
# feature values shown per point (the first ones; the page says how many exist)
MAX_FEATURE_COLUMNS = 40
TEXT_CHARS = 300  # characters of a text point shown in a table cell (the whole text is its tooltip)
MAX_RECURRING = 30  # rows of the overview's table of recurring training points


@dataclass(frozen=True)
class ReportPoint:
    """One ranked training point: its id, label (as text), I_up,loss, removal effect and input.

    The input is shown as one of: ``image`` (flat or shaped, drawn as a picture), ``features``
    (a vector of numbers, shown as values) or ``text`` (shown as text); ``None`` shows nothing.
    """

    train_id: int
    label: str
    up_loss: float
    removal_effect: float
    image: Any = None
    features: Any = None
    text: str | None = None


@dataclass(frozen=True)
class ReportTest:
    """The explained test point: index, true and predicted label, loss, probabilities, input.

    The labels are text written the same way (the point counts as misclassified when they
    differ). ``p_positive`` is P(y = +1) of a binary model, ``p_predicted`` the probability the
    model gives its predicted label (multi-class); either may be ``None``. ``image``,
    ``features`` and ``text`` as in ``ReportPoint``.
    """

    index: int
    true_label: str
    predicted_label: str
    loss: float
    p_positive: float | None = None
    image: Any = None
    features: Any = None
    text: str | None = None
    p_predicted: float | None = None


@dataclass(frozen=True)
class OverviewRow:
    """One test point of the overview: its labels, loss and its most helpful and harmful points.

    ``helpful`` and ``harmful`` are ranked ``ReportPoint`` lists (their inputs are not drawn).
    """

    index: int
    true_label: str
    predicted_label: str
    loss: float
    helpful: Sequence[ReportPoint] = ()
    harmful: Sequence[ReportPoint] = ()


# ── PNG encoding ──────────────────────────────────────────────────────────────────────


def figure_png(fig: Any, *, dpi: float | None = None) -> bytes:
    """A matplotlib ``Figure`` (e.g. from ``new_figure``) as PNG bytes, on a white background."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return buf.getvalue()


def image_png(image: np.ndarray, *, vmin: float, vmax: float, cmap: str = "gray") -> bytes:
    """An image array as a PNG at its own resolution (one PNG pixel per array element).

    2-D arrays are mapped through ``cmap`` with intensities ``vmin``…``vmax``; (H, W, 3|4)
    arrays are scaled to [0, 1] by the same bounds. Upscaling is left to the page.
    """
    a = np.asarray(image, dtype=float)
    if vmax <= vmin:
        vmax = vmin + 1.0
    buf = io.BytesIO()
    if a.ndim == 3:
        matplotlib.image.imsave(buf, np.clip((a - vmin) / (vmax - vmin), 0.0, 1.0), format="png")
    else:
        matplotlib.image.imsave(
            buf, np.nan_to_num(a, nan=vmin), cmap=cmap, vmin=vmin, vmax=vmax, format="png"
        )
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ── formatting ────────────────────────────────────────────────────────────────────────


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, spec: str) -> str:
    """A table cell holding a number: shown with ``spec``; the exact value is in ``data-value``."""
    if x is None:
        return '<td class="num">n/a</td>'
    if isinstance(x, (bool, np.bool_)):
        return f'<td class="num">{_e(x)}</td>'
    if isinstance(x, (int, np.integer)):
        shown = exact = str(int(x))
    else:
        v = float(x)
        shown = format(v, spec) if math.isfinite(v) else str(v)
        exact = repr(v)
    return f'<td class="num" data-value="{_e(exact)}">{_e(shown)}</td>'


def _integer(x: Any, what: str) -> None:
    """Ids and indices go into the page as integers; anything else is refused, not written."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise InputError(
            f"explain_report: {what} must be an integer; got {type(x).__name__} {x!r}."
        )


def _setting(v: Any) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


# ── the page ──────────────────────────────────────────────────────────────────────────

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125;
       margin: 0 auto; max-width: 1180px; padding: 20px 28px 40px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d8dde3; padding-bottom: 3px; }
p.sub, p.note { color: #57606a; margin: 4px 0; }
p.note { font-size: 13px; }
.test { display: flex; gap: 24px; align-items: flex-start; }
.columns { display: flex; gap: 28px; flex-wrap: wrap; }
.columns > section { flex: 1 1 460px; min-width: 0; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 9px; border-bottom: 1px solid #eceff2; text-align: left;
         vertical-align: middle; }
table.ranking td, table.ranking th { white-space: nowrap; }
th { background: #f5f7f9; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums;
         font-family: ui-monospace, Menlo, Consolas, monospace; }
img.px { image-rendering: pixelated; image-rendering: crisp-edges; border: 1px solid #b7bec6;
         display: block; }
img.helpful { border: 2px solid HELPFUL; }
img.harmful { border: 2px solid HARMFUL; }
h2.helpful { color: HELPFUL; }
h2.harmful { color: HARMFUL; }
.verdict { font-weight: 700; }
.verdict.wrong { color: HARMFUL; }
.verdict.right { color: HELPFUL; }
.loo { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.loo img { width: 520px; max-width: 100%; height: auto; border: 1px solid #eceff2; }
.loo > div { flex: 1 1 320px; }
.columns.stacked > section { flex-basis: 100%; }
.scroll { overflow-x: auto; max-width: 100%; }
table.ranking td.text, table.overview td { white-space: normal; }
td.text { max-width: 460px; font-size: 13px; }
details.page > summary { cursor: pointer; color: #1f5fa8; margin: 8px 0 4px; }
table.features th { font-weight: 500; font-size: 12px; }
span.train-id + span.train-id::before { content: ", "; }
""".replace("HELPFUL", HELPFUL_COLOR).replace("HARMFUL", HARMFUL_COLOR)


def _img_tag(uri: str | None, shape: tuple[int, ...], size: int, cls: str, alt: str) -> str:
    if uri is None:
        return ""
    h, w = shape[0], shape[1]
    scale = size / max(h, w)
    return (
        f'<img class="px {cls}" src="{uri}" width="{max(1, round(w * scale))}" '
        f'height="{max(1, round(h * scale))}" alt="{_e(alt)}">'
    )


def _feature_names(names: Sequence[str] | None, d: int) -> list[str]:
    if names is None:
        return [f"x[{j}]" for j in range(d)]
    names = [str(n) for n in names]
    if len(names) != d:
        raise InputError(
            f"explain_report: feature_names has {len(names)} names but the points have {d}"
            " features; give one name per feature, or none."
        )
    return names


def _feature_cells(values: np.ndarray | None, shown: int) -> str:
    if values is None:
        return "".join("<td></td>" for _ in range(shown))
    return "".join(_num(float(v), ".4g") for v in values[:shown])


def _text_cell(text: str | None) -> str:
    if text is None:
        return "<td></td>"
    t = str(text)
    if len(t) <= TEXT_CHARS:
        return f'<td class="text">{_e(t)}</td>'
    return f'<td class="text" title="{_e(t)}">{_e(t[:TEXT_CHARS])} …</td>'


@dataclass(frozen=True)
class _Inputs:
    """How the inputs of one page are shown: which of images / features / text, and the columns."""

    images: bool
    names: list[str]  # feature columns shown (empty without features)
    d: int  # features per point
    text: bool


def _ranking_table(
    kind: str,
    table_id: str,
    first_rank: int,
    points: Sequence[ReportPoint],
    images: Sequence[tuple[str, tuple[int, ...]] | None],
    features: Sequence[np.ndarray | None],
    inputs: _Inputs,
) -> str:
    with_images = inputs.images and any(im is not None for im in images)
    head = "<tr><th>rank</th>" + ("<th>image</th>" if with_images else "")
    head += "<th>train id</th><th>label</th><th>I_up,loss</th><th>removal effect</th>"
    head += "<th>text</th>" if inputs.text else ""
    head += "".join(f"<th>{_e(n)}</th>" for n in inputs.names)
    rows = []
    for r, (pt, im, fv) in enumerate(zip(points, images, features), first_rank):
        cells = f'<td class="num">{r}</td>'
        if with_images:
            cells += (
                "<td>"
                + (
                    _img_tag(im[0], im[1], IMAGE_PX, kind, f"training point {pt.train_id}")
                    if im
                    else ""
                )
                + "</td>"
            )
        cells += (
            f'<td class="num train-id" data-value="{int(pt.train_id)}">{int(pt.train_id)}</td>'
            f"<td>{_e(pt.label)}</td>" + _num(pt.up_loss, "+.4e") + _num(pt.removal_effect, "+.4e")
        )
        if inputs.text:
            cells += _text_cell(pt.text)
        if inputs.names:
            cells += _feature_cells(fv, len(inputs.names))
        rows.append(f'<tr class="point">{cells}</tr>')
    return f'<table class="ranking {kind}" id="{table_id}">{head}</tr>{"".join(rows)}</table>'


def _ranking(
    kind: str,
    points: Sequence[ReportPoint],
    images: Sequence[tuple[str, tuple[int, ...]] | None],
    features: Sequence[np.ndarray | None],
    inputs: _Inputs,
    page_size: int,
) -> str:
    """The ranking in pages of ``page_size`` rows: the first open, each later one folded."""
    n = len(points)
    parts = []
    for start in range(0, max(n, 1), page_size):
        stop = min(start + page_size, n)
        page = slice(start, stop)
        table_id = kind if start == 0 else f"{kind}-page-{start // page_size + 1}"
        table = _ranking_table(
            kind, table_id, start + 1, points[page], images[page], features[page], inputs
        )
        table = f'<div class="scroll">{table}</div>'
        if start == 0:
            parts.append(table)
        else:
            parts.append(
                f'<details class="page"><summary>ranks {start + 1}–{stop} of'
                f" {n}</summary>{table}</details>"
            )
    return f'<div class="pages" id="{kind}-pages">{"".join(parts)}</div>'


def _id_list(points: Sequence[ReportPoint], kind: str) -> str:
    return (
        f'<td class="ids {kind}">'
        + "".join(
            f'<span class="train-id" data-value="{int(p.train_id)}">{int(p.train_id)}</span>'
            for p in points
        )
        + "</td>"
    )


def _verdict(true_label: str, predicted_label: str) -> str:
    if true_label != predicted_label:
        return '<span class="verdict wrong">misclassified</span>'
    return '<span class="verdict right">correct</span>'


def _overview(rows: Sequence[OverviewRow]) -> str:
    """Per test point its labels, loss and top ids; then the training points found in
    several lists."""
    head = (
        "<tr><th>test index</th><th>true label</th><th>prediction</th><th>test loss</th>"
        "<th>most helpful (train ids)</th><th>most harmful (train ids)</th></tr>"
    )
    body = []
    seen: dict[int, dict[str, Any]] = {}
    for row in rows:
        _integer(row.index, "OverviewRow.index")
        for kind, pts in (("helpful", row.helpful), ("harmful", row.harmful)):
            for pt in pts:
                _integer(pt.train_id, "ReportPoint.train_id")
                entry = seen.setdefault(
                    int(pt.train_id), {"label": pt.label, "helpful": [], "harmful": []}
                )
                if int(row.index) not in entry[kind]:
                    entry[kind].append(int(row.index))
        body.append(
            f'<tr class="overview-row" data-test="{int(row.index)}"><td'
            f' class="num">{int(row.index)}</td><td>{_e(row.true_label)}</td>'
            f"<td>{_e(row.predicted_label)}"
            f" — {_verdict(row.true_label, row.predicted_label)}</td>"
            + _num(row.loss, ".4f")
            + _id_list(row.helpful, "helpful")
            + _id_list(row.harmful, "harmful")
            + "</tr>"
        )
    recurring = sorted(
        ((tid, e) for tid, e in seen.items() if len(e["helpful"]) + len(e["harmful"]) >= 2),
        key=lambda te: (-(len(te[1]["helpful"]) + len(te[1]["harmful"])), te[0]),
    )
    parts = [
        (
            '<div class="scroll"><table class="overview"'
            f' id="overview">{head}{"".join(body)}</table></div>'
        ),
        "<h3>Training points in several of these lists</h3>",
    ]
    if not recurring:
        parts.append(
            '<p class="note" id="recurring-none">No training point is among the most helpful or'
            " harmful of more than one of these test points.</p>"
        )
        return "".join(parts)
    rec_rows = []
    for tid, e in recurring[:MAX_RECURRING]:
        rec_rows.append(
            '<tr class="recurring"><td class="num train-id"'
            f' data-value="{tid}">{tid}</td><td>{_e(e["label"])}</td>'
            f'<td class="num helpful-count">{len(e["helpful"])}</td><td class="num'
            f' harmful-count">{len(e["harmful"])}</td>'
            f"<td>{_e(', '.join(map(str, e['helpful'])) or '—')}</td>"
            f"<td>{_e(', '.join(map(str, e['harmful'])) or '—')}</td></tr>"
        )
    more = len(recurring) - MAX_RECURRING
    parts.append(
        '<div class="scroll"><table class="recurring" id="recurring"><tr><th>train'
        " id</th><th>label</th><th>helpful to</th><th>harmful to</th><th>helpful to test"
        " points</th><th>harmful to test points</th></tr>" + "".join(rec_rows) + "</table></div>"
    )
    if more > 0:
        parts.append(
            f'<p class="note">… and {more} more training points found in two or more lists.</p>'
        )
    return "".join(parts)


def _diagnostics(
    provenance: Mapping[str, Any], n_train: int, extra: Sequence[tuple[str, Any, str]]
) -> str:
    prov = as_provenance(provenance)
    cfg = dict(prov.solver)
    settings = (
        ", ".join(f"{k}={_setting(v)}" for k, v in cfg.items() if k not in ("name", "progress"))
        or "—"
    )
    bound = prov.max_residual_accepted
    accepted = prov.accepted
    verdict = "" if accepted is None else ("accepted" if accepted else "NOT accepted")
    if verdict:
        verdict += (
            f" (bound {_setting(float(bound))})"
            if isinstance(bound, (int, float))
            else " (no bound)"
        )
    rows: list[str] = [
        f'<tr id="diag-solver"><th>solver</th><td>{_e(cfg.get("name", "?"))}</td></tr>',
        f'<tr id="diag-settings"><th>settings</th><td>{_e(settings)}</td></tr>',
    ]
    stats = prov.solver_stats
    for key, label in (("chosen", "chosen"), ("reason", "why")):
        if key in stats:
            rows.append(f"<tr><th>{label}</th><td>{_e(stats[key])}</td></tr>")

    def num_row(rid: str, label: str, value: Any, spec: str, note: str = "") -> None:
        rows.append(
            f'<tr id="diag-{rid}"><th>{_e(label)}</th>{_num(value, spec)}'
            + (f"<td>{_e(note)}</td>" if note else "")
            + "</tr>"
        )

    num_row(
        "residual", "relative residual ‖(H+δI)x − v‖/‖v‖ (max)", prov.residual_max, ".2e", verdict
    )
    accuracy = prov.accuracy
    if isinstance(accuracy, Mapping):  # measured against CG (Influence.estimate_accuracy)
        where = (
            f"against CG on {accuracy.get('test_points')} test × {accuracy.get('train_points')}"
            " training points"
        )
        num_row(
            "accuracy-spearman",
            "Spearman of the scores (min)",
            accuracy.get("spearman_min"),
            ".4f",
            where,
        )
        num_row(
            "accuracy-error",
            "relative error of the scores (max)",
            accuracy.get("relative_error_max"),
            ".3g",
            where,
        )
    elif accuracy is not None:
        rows.append(f'<tr id="diag-accuracy"><th>accuracy</th><td>{_e(accuracy)}</td></tr>')
    num_row("iterations", "iterations", prov.iterations, "d")
    num_row("solve-seconds", "solve time [s]", prov.solve_seconds, ".2f")
    num_row("seconds", "influence time (gradients + solve) [s]", prov.seconds, ".2f")
    for j, (label, value, spec) in enumerate(extra):
        num_row(f"extra-{j}", label, value, spec)
    num_row("n", "n (training points)", int(n_train), "d")
    num_row("p", "p (parameters)", prov.p, "d")
    num_row("l2", "l2 (λ)", prov.l2, "g")
    num_row("damping", "damping (δ)", prov.damping, "g")
    num_row("grad-norm", "‖∇R(θ̂)‖ at the fitted parameters", prov.grad_norm, ".2e")
    if prov.dtype is not None:
        rows.append(f'<tr id="diag-dtype"><th>dtype</th><td>{_e(prov.dtype)}</td></tr>')
    for key in sorted(k for k in stats if k not in ("chosen", "reason")):
        v = stats[key]
        if isinstance(v, (bool, str)):
            rows.append(f"<tr><th>solver statistic: {_e(key)}</th><td>{_e(v)}</td></tr>")
        elif isinstance(v, (int, float, np.integer, np.floating)):
            rows.append(f"<tr><th>solver statistic: {_e(key)}</th>{_num(v, 'g')}</tr>")
    return f'<table class="diagnostics" id="diagnostics">{"".join(rows)}</table>'


def _loo_section(comparison: Any | None) -> str:
    if comparison is None:
        return '<p class="note" id="loo-skipped">Leave-one-out retraining was not run.</p>'
    fig = new_figure(figsize=(5.4, 5.0), dpi=110)
    loo_scatter(comparison, fig.add_subplot())
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.88)
    uri = _data_uri(figure_png(fig))
    k = len(np.asarray(comparison.predicted).reshape(-1))
    stats = [
        ("pearson", "Pearson R", getattr(comparison, "pearson", None), ".4f"),
        ("spearman", "Spearman ρ", getattr(comparison, "spearman", None), ".4f"),
        (
            "slope",
            "slope (actual ≈ slope · predicted + intercept)",
            getattr(comparison, "slope", None),
            ".4f",
        ),
        ("intercept", "intercept", getattr(comparison, "intercept", None), "+.2e"),
        ("k", "points retrained without", k, "d"),
        (
            "retrain-grad-norm",
            "largest ‖∇R‖ after a refit",
            getattr(comparison, "retrain_grad_norm", None),
            ".1e",
        ),
        ("seconds", "retraining time [s]", getattr(comparison, "seconds", None), ".2f"),
    ]
    rows = "".join(
        f'<tr id="loo-{rid}"><th>{_e(label)}</th>{_num(v, spec)}</tr>'
        for rid, label, v, spec in stats
    )
    return (
        f'<div class="loo"><img id="loo-scatter" src="{uri}" alt="Predicted vs actual change in'
        ' test loss when each training point is removed"><div><table class="loo-stats"'
        f' id="loo-stats">{rows}</table><p class="note">Each point is one training point removed: x'
        " = predicted change of the test loss (−I_up,loss / n), y = the change after actually"
        " retraining without it (Koh &amp; Liang 2017, Fig. 2). On the dashed line y = x the"
        " prediction is exact.</p></div></div>"
    )


def _feature_vector(x: Any, what: str) -> np.ndarray | None:
    if x is None:
        return None
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.dtype.kind not in "biuf":
        raise InputError(f"explain_report: {what} must be numbers; got dtype {a.dtype}.")
    return a.reshape(-1).astype(float)


def explain_report(
    *,
    title: str,
    test: ReportTest,
    helpful: Sequence[ReportPoint],
    harmful: Sequence[ReportPoint],
    provenance: Mapping[str, Any],
    n_train: int,
    comparison: Any | None = None,
    image_shape: Sequence[int] | None = None,
    subtitle: str = "",
    extra_diagnostics: Sequence[tuple[str, Any, str]] = (),
    cmap: str = "gray",
    feature_names: Sequence[str] | None = None,
    overview: Sequence[OverviewRow] = (),
    page_size: int = PAGE_SIZE,
) -> str:
    """The whole explain page as one HTML string (UTF-8, self-contained).

    Args:
        title: the page heading (escaped like all text).
        test: the explained test point; its image, feature values or text is shown when given.
        helpful, harmful: the ranked training points, most influential first (I_up,loss < 0 and
            > 0 respectively, Eq. 2); their removal effects are −I_up,loss / n.
        provenance: ``InfluenceScores.provenance`` (a ``Provenance``: solver config, residual,
            iterations, times, l2, damping, p, dtype), or a mapping of its flat keys; missing
            entries are shown as n/a.
        n_train: n, the number of training points the model was fitted on.
        comparison: an ``LOOComparison`` (drawn as the Fig. 2 scatter with its statistics), or
            ``None``.
        image_shape: how to reshape flat inputs into images, e.g. ``(28, 28)``.
        subtitle: a line under the heading (data set, model, accuracy).
        extra_diagnostics: more ``(label, number, format spec)`` rows for the solver table.
        cmap: colour map for 2-D images; all images share one intensity scale.
        feature_names: names of the features of tabular points (columns of their value
            tables); ``None`` names them x[0], x[1], … Only the first ``MAX_FEATURE_COLUMNS``
            features are shown.
        overview: one row per test point (the explained one included) for an overview section
            at the top, with the training points that recur in their lists; empty: no overview.
        page_size: ranking rows per page; the first page is open, the later ones folded.

    Raises:
        InputError: an id or index that is not an integer, feature values that are not numbers
            or of different lengths, ``feature_names`` of the wrong length, ``page_size`` < 1.
    """
    _integer(test.index, "ReportTest.index")
    for pt in (*helpful, *harmful):
        _integer(pt.train_id, "ReportPoint.train_id")
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise InputError(f"explain_report: page_size must be an integer ≥ 1; got {page_size!r}.")
    every = [test.image] + [p.image for p in helpful] + [p.image for p in harmful]
    arrays = [None if im is None else _as_image(im, image_shape) for im in every]
    finite = [a[np.isfinite(a)] for a in arrays if a is not None]
    finite = [a for a in finite if a.size]
    vmin = float(min(a.min() for a in finite)) if finite else 0.0
    vmax = float(max(a.max() for a in finite)) if finite else 1.0
    encoded = [
        None if a is None else (_data_uri(image_png(a, vmin=vmin, vmax=vmax, cmap=cmap)), a.shape)
        for a in arrays
    ]
    test_img, help_imgs, harm_imgs = (
        encoded[0],
        encoded[1 : 1 + len(helpful)],
        encoded[1 + len(helpful) :],
    )

    vectors = [_feature_vector(test.features, "ReportTest.features")]
    vectors += [
        _feature_vector(p.features, f"the features of training point {p.train_id}")
        for p in (*helpful, *harmful)
    ]
    sizes = {v.size for v in vectors if v is not None}
    if len(sizes) > 1:
        raise InputError(
            f"explain_report: the points have different numbers of features {sorted(sizes)}; "
            "each needs the same features."
        )
    d = sizes.pop() if sizes else 0
    names = _feature_names(feature_names, d)[:MAX_FEATURE_COLUMNS] if d else []
    inputs = _Inputs(
        images=any(a is not None for a in arrays),
        names=names,
        d=d,
        text=any(p.text is not None for p in (test, *helpful, *harmful)),
    )
    test_vec, help_vecs, harm_vecs = (
        vectors[0],
        vectors[1 : 1 + len(helpful)],
        vectors[1 + len(helpful) :],
    )

    facts = [
        (
            '<tr><th>test index</th><td class="num" id="test-index"'
            f' data-value="{int(test.index)}">{int(test.index)}</td></tr>'
        ),
        f'<tr><th>true label</th><td id="test-label">{_e(test.true_label)}</td></tr>',
        (
            f'<tr><th>prediction</th><td id="test-prediction">{_e(test.predicted_label)} — '
            f"{_verdict(test.true_label, test.predicted_label)}</td></tr>"
        ),
    ]
    if test.p_positive is not None:
        facts.append(f'<tr id="test-p"><th>P(y = +1)</th>{_num(test.p_positive, ".4f")}</tr>')
    if test.p_predicted is not None:
        facts.append(
            '<tr id="test-p-predicted"><th>P(predicted'
            f" label)</th>{_num(test.p_predicted, '.4f')}</tr>"
        )
    facts.append(f'<tr id="test-loss"><th>test loss</th>{_num(test.loss, ".4f")}</tr>')
    test_html = (
        '<div class="test">'
        + (
            _img_tag(test_img[0], test_img[1], TEST_IMAGE_PX, "test", f"test point {test.index}")
            if test_img
            else ""
        )
        + f'<table class="facts">{"".join(facts)}</table></div>'
    )
    if test.text is not None:
        test_html += f'<p id="test-text">{_e(test.text)}</p>'
    if names:
        shown = f"the first {len(names)} of {d} features" if d > len(names) else f"{d} features"
        test_html += (
            f'<p class="note">Feature values of the test point ({shown}); the rankings below show'
            ' the same columns for each training point.</p><div class="scroll"><table'
            ' class="features" id="test-features"><tr>'
            + "".join(f"<th>{_e(nm)}</th>" for nm in names)
            + "</tr><tr>"
            + _feature_cells(test_vec, len(names))
            + "</tr></table></div>"
        )

    n = int(n_train)
    overview_html = []
    if overview:
        overview_html = [
            f'<h2 id="overview-heading">Overview of {len(overview)} test points</h2>',
            (
                '<p class="note">The most helpful and most harmful training points of each test'
                " point, by I_up,loss; the explained test point is detailed below.</p>"
            ),
            _overview(overview),
        ]
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(subtitle)}</p>' if subtitle else "",
        *overview_html,
        f"<h2>Test point {int(test.index)}</h2>" if overview else "<h2>Test point</h2>",
        test_html,
        f'<div class="columns{" stacked" if names or inputs.text else ""}"><section>',
        f'<h2 class="helpful">Most helpful training points ({len(helpful)})</h2>',
        (
            '<p class="note">I_up,loss &lt; 0: upweighting the point lowers the test loss; removing'
            " it raises it.</p>"
        ),
        _ranking("helpful", helpful, help_imgs, help_vecs, inputs, int(page_size)),
        "</section><section>",
        f'<h2 class="harmful">Most harmful training points ({len(harmful)})</h2>',
        (
            '<p class="note">I_up,loss &gt; 0: upweighting the point raises the test loss; removing'
            " it lowers it.</p>"
        ),
        _ranking("harmful", harmful, harm_imgs, harm_vecs, inputs, int(page_size)),
        "</section></div>",
        (
            '<p class="note">I_up,loss(z, z_test) = −∇θL(z_test)ᵀ H⁻¹ ∇θL(z) (Koh &amp; Liang'
            f" 2017, Eq. 2). Removal effect = −I_up,loss / n with n = {n}: the predicted change of"
            " the test loss if the point is removed from the training set.</p>"
        ),
        "<h2>Leave-one-out check</h2>",
        _loo_section(comparison),
        "<h2>Solver diagnostics</h2>",
        _diagnostics(provenance, n, extra_diagnostics),
        "</body></html>",
    ]
    return "\n".join(part for part in page if part) + "\n"


# ── writing ───────────────────────────────────────────────────────────────────────────


def check_report_path(path: str | os.PathLike[str], *, what: str = "report") -> Path:
    """Check before any work that ``path`` can become an HTML report; returns it as a ``Path``.

    Nothing is written.

    Raises:
        InputError: the name does not end in ``.html`` or ``.htm``, it is an existing folder, a
            parent is a file, or the nearest existing parent folder is not writable.
    """
    return check_output_file(path, what=what, suffixes=(".html", ".htm"), example="out/report.html")


def write_report(page: str, path: str | os.PathLike[str], *, what: str = "report") -> Path:
    """Write ``page`` (from ``explain_report``) to ``path`` as UTF-8, creating parent folders.

    The page goes to a temporary file in the same folder, is fsynced and moved onto ``path``
    with ``os.replace``: a failed write (full disk, permissions) removes the temporary file and
    leaves ``path`` as it was — absent or with its previous content, never a partial page.

    Raises:
        InputError: ``path`` is not a usable ``.html``/``.htm`` file name (``check_report_path``),
            or writing it failed (the message carries the operating system's reason).
    """
    p = check_report_path(path, what=what)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p, page)
    except OSError as exc:
        raise InputError(
            f"{what} {path}: cannot write it ({exc.strerror or exc}); nothing was written there: "
            f"{os_error_fix(exc)}."
        ) from exc
    return p
