"""``upweight explain --report``: one self-contained HTML page, checked as a reader would see it.

The page is parsed with the standard library (every image must be an inline PNG that decodes,
every number must equal the one the command printed, every training image must be the pixels of
the training point whose id it sits next to), then rendered by headless Chromium: its images must
really decode in a browser and the screenshot must show them. Without Chromium the browser test
skips locally but fails when the environment variable CI is set.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from upweight.cli.main import main
from upweight.datasets import load_mnist_1v7
from upweight.errors import InputError
from upweight.report.html import OverviewRow, ReportPoint, ReportTest, explain_report, write_report

LOO_K = 3
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([+-]1 \([^)]*\))\s+(\S+)\s+(\S+)\s*$")
VOID = {"img", "meta", "br", "link", "input", "hr", "source", "col", "area", "base", "wbr"}


# ── a small DOM from html.parser ──────────────────────────────────────────────────────


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        def ok(n: Node) -> bool:
            if tag is not None and n.tag != tag:
                return False
            for k, v in attrs.items():
                key = k.rstrip("_")
                if key == "class":
                    if v not in n.attrs.get("class", "").split():
                        return False
                elif n.attrs.get(key) != v:
                    return False
            return True

        return [n for n in self.walk() if ok(n)]

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(page: str) -> Node:
    b = _Builder()
    b.feed(page)
    b.close()
    return b.root


def png_of(img: Node) -> Image.Image:
    src = img.attrs["src"]
    assert src.startswith("data:image/png;base64,"), src[:60]
    raw = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(raw)).verify()  # checksums and structure
    im = Image.open(io.BytesIO(raw))
    im.load()  # decodes every pixel
    return im


def cell_value(td: Node) -> float:
    return float(td.attrs["data-value"])


# ── the command, run once ─────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_1v7()


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    report = tmp / "not" / "yet" / "explain.html"  # its folders do not exist yet
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(
            [
                "explain",
                "--loo-k",
                str(LOO_K),
                "--no-progress",
                "--out",
                str(tmp / "e.png"),
                "--report",
                str(report),
            ]
        )
    assert rc == 0, stderr.getvalue()
    page = report.read_text(encoding="utf-8")
    return {"out": stdout.getvalue(), "path": report, "page": page, "dom": parse(page)}


def _printed_tables(text: str) -> dict[str, list[tuple[int, str, str, str]]]:
    tables: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("top ") and ("helpful" in line or "harmful" in line):
            current = "helpful" if "helpful" in line else "harmful"
            tables[current] = []
            continue
        m = ROW.match(line)
        if current and m:
            _, j, lab, iup, rem = m.groups()
            tables[current].append((int(j), lab, iup, rem))
        elif current and not line.lstrip().startswith("rank"):
            current = None
    return tables


# ── tests ─────────────────────────────────────────────────────────────────────────────


def test_report_is_self_contained(explained) -> None:
    out, path, page, dom = explained["out"], explained["path"], explained["page"], explained["dom"]
    assert f"report written to {path}" in out
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert not dom.find_all("script") and not dom.find_all("link") and not dom.find_all("iframe")
    assert "url(" not in page and "http://" not in page and "https://" not in page
    for node in dom.walk():
        for attr in ("src", "href", "srcset", "action"):
            if attr in node.attrs:
                assert node.attrs[attr].startswith("data:"), (node.tag, attr, node.attrs[attr][:80])
    imgs = dom.find_all("img")
    assert len(imgs) == 1 + 5 + 5 + 1  # test point, 5 helpful, 5 harmful, leave-one-out scatter
    sizes = [png_of(img).size for img in imgs]
    assert all(s == (28, 28) for s in sizes[:11])  # the digits at their own resolution
    w, h = sizes[11]
    assert w > 300 and h > 300  # the scatter


def test_report_numbers_are_the_printed_ones(explained, mnist) -> None:
    out, dom = explained["out"], explained["dom"]
    printed = _printed_tables(out)
    n = int(re.search(r"with n = (\d+)", out).group(1))
    assert n == len(mnist.y_train) == int(cell_value(dom.one("tr", id="diag-n").one("td")))
    for kind in ("helpful", "harmful"):
        rows = dom.one("table", id=kind).find_all("tr", class_="point")
        assert len(rows) == len(printed[kind]) == 5
        ups, rems = [], []
        for tr, (j, lab, iup, rem) in zip(rows, printed[kind]):
            tds = [c for c in tr.children if c.tag == "td"]
            _, _, id_td, lab_td, up_td, rem_td = tds
            assert int(id_td.attrs["data-value"]) == int(id_td.all_text()) == j
            assert lab_td.all_text() == lab
            assert up_td.all_text() == iup and rem_td.all_text() == rem  # as printed
            assert (
                format(cell_value(up_td), "+.4e") == iup
                and format(cell_value(rem_td), "+.4e") == rem
            )
            assert lab.startswith(f"{int(mnist.y_train[j]):+d}")
            ups.append(cell_value(up_td))
            rems.append(cell_value(rem_td))
        ups, rems = np.array(ups), np.array(rems)
        np.testing.assert_allclose(rems, -ups / n, rtol=1e-12)  # removal effect = −I_up,loss / n
        if kind == "helpful":
            assert (ups < 0).all() and (np.diff(ups) >= 0).all()
        else:
            assert (ups > 0).all() and (np.diff(ups) <= 0).all()
    harm = dom.one("table", id="harmful").find_all("tr", class_="point")[0]
    top_id, top_score = printed["harmful"][0][0], printed["harmful"][0][2]
    assert f">{top_id}<" in explained["page"] and top_score in harm.all_text()

    m = re.search(
        r"test point (\d+) \(first misclassified\): true label ([^,]+), predicted P\(y=\+1\) ="
        r" (\S+) → "
        r"MISCLASSIFIED, test loss (\S+)",
        out,
    )
    i, label, p, loss = m.groups()
    assert dom.one(id="test-index").all_text() == i
    assert dom.one(id="test-label").all_text() == label
    prediction = dom.one(id="test-prediction").all_text()
    assert "misclassified" in prediction and not prediction.startswith(label)
    assert dom.one("tr", id="test-p").one("td").all_text() == p
    assert dom.one("tr", id="test-loss").one("td").all_text() == loss

    stats = re.search(
        r"Pearson (\S+)\s+Spearman (\S+)\s+slope (\S+)\s+\(intercept (\S+)\)", out
    ).groups()
    for name, value in zip(("pearson", "spearman", "slope", "intercept"), stats):
        assert dom.one("tr", id=f"loo-{name}").one("td").all_text() == value, name
    assert int(dom.one("tr", id="loo-k").one("td").all_text()) == LOO_K

    diag = {
        tr.attrs["id"]: tr
        for tr in dom.one("table", id="diagnostics").find_all("tr")
        if "id" in tr.attrs
    }
    assert diag["diag-solver"].find_all("td")[0].all_text() == "cg"
    assert "rtol=1e-08" in diag["diag-settings"].all_text()
    residual = re.search(r"residual\s+(\S+)", out).group(1)
    assert diag["diag-residual"].find_all("td")[0].all_text() == residual
    assert "accepted" in diag["diag-residual"].all_text()
    assert diag["diag-iterations"].find_all("td")[0].all_text() == re.search(
        r"iterations\s+(\d+)", out
    ).group(1)
    assert diag["diag-solve-seconds"].find_all("td")[0].all_text() == re.search(
        r"seconds\s+(\S+) solve", out
    ).group(1)
    assert int(cell_value(diag["diag-p"].find_all("td")[0])) == 784
    assert cell_value(diag["diag-l2"].find_all("td")[0]) == 0.01
    assert cell_value(diag["diag-damping"].find_all("td")[0]) == 0.0


def test_report_images_are_the_data(explained, mnist) -> None:
    """Each image is the training (or test) point named beside it, on one shared intensity scale."""
    dom = explained["dom"]
    i = int(dom.one(id="test-index").all_text())
    shown = [(dom.one("img", class_="test"), mnist.x_test[i])]
    for kind in ("helpful", "harmful"):
        for tr in dom.one("table", id=kind).find_all("tr", class_="point"):
            j = int(tr.one("td", class_="train-id").attrs["data-value"])
            shown.append((tr.one("img"), mnist.x_train[j]))
    data = np.stack([np.asarray(x, dtype=float).reshape(28, 28) for _, x in shown])
    lo, hi = data.min(), data.max()
    for (img, _), x in zip(shown, data):
        px = np.asarray(png_of(img).convert("L"), dtype=float) / 255.0
        assert np.abs(px - (x - lo) / (hi - lo)).max() <= 1.5 / 255


def test_report_escapes_text_and_omits_missing_parts(tmp_path) -> None:
    """No images given, no leave-one-out: no <img>; hostile text stays text."""
    evil = '<script>alert("x")</script> & "q"'
    pts = [ReportPoint(3, evil, 2.5, -0.25), ReportPoint(7, "b", 1.0, -0.1)]
    page = explain_report(
        title=evil,
        test=ReportTest(index=1, true_label="+1", predicted_label="-1", loss=0.7),
        helpful=[],
        harmful=pts,
        provenance={"solver": {"name": evil}, "residual_max": 1e-9},
        n_train=10,
    )
    dom = parse(page)
    assert not dom.find_all("script") and not dom.find_all("img")
    assert dom.one("title").all_text() == evil and dom.one("h1").all_text() == evil
    assert dom.one(id="loo-skipped")
    assert [int(td.attrs["data-value"]) for td in dom.find_all("td", class_="train-id")] == [3, 7]
    assert dom.one("tr", id="diag-p").one("td").all_text() == "n/a"
    path = write_report(page, tmp_path / "a" / "b.html")
    assert path.read_text(encoding="utf-8") == page
    with pytest.raises(InputError, match=r"must end in \.html"):
        write_report(page, tmp_path / "b.txt")


HOSTILE = ["<script>alert(1)</script>", '" onload="x', "<img src=x onerror=alert(1)> & 'q'"]


def _assert_inert(page: str, dom: Node, evil: str) -> None:
    """The hostile text is nowhere raw, made no element and no attribute: it is text."""
    assert evil not in page
    assert not dom.find_all("script") and not dom.find_all("iframe")
    for node in dom.walk():
        assert not [a for a in node.attrs if a.startswith("on")], (node.tag, node.attrs)
        if node.tag == "img":
            assert node.attrs["src"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("evil", HOSTILE)
def test_report_escapes_every_string(evil) -> None:
    """Title, subtitle, labels, solver settings and every provenance string are shown as text."""
    img = np.arange(4.0)
    pts = [ReportPoint(3, evil, 2.5, -0.25, img), ReportPoint(np.int64(7), evil, 1.0, -0.1, img)]
    provenance = {
        "solver": {"name": evil, "mode": evil, evil: 1.5},
        "solver_chosen": evil,
        "solver_reason": evil,
        "dtype": evil,
        f"solver_{evil}": evil,
        "solver_note": evil,
        "residual_max": 1e-9,
        "accepted": True,
        "max_residual_accepted": 1e-6,
    }
    page = explain_report(
        title=evil,
        subtitle=evil,
        image_shape=(2, 2),
        provenance=provenance,
        n_train=10,
        test=ReportTest(index=1, true_label=evil, predicted_label=evil + "!", loss=0.7, image=img),
        helpful=pts,
        harmful=pts,
        extra_diagnostics=[(evil, 2.0, ".2f")],
    )
    dom = parse(page)
    _assert_inert(page, dom, evil)
    assert dom.one("title").all_text() == evil and dom.one("h1").all_text() == evil
    assert dom.one("p", class_="sub").all_text() == evil
    assert dom.one(id="test-label").all_text() == evil
    assert dom.one(id="test-prediction").all_text().startswith(evil + "! — ")
    for kind in ("helpful", "harmful"):
        labels = [
            [c for c in tr.children if c.tag == "td"][3].all_text()
            for tr in dom.one("table", id=kind).find_all("tr", class_="point")
        ]
        assert labels == [evil, evil]
    diag = dom.one("table", id="diagnostics")
    rows = {
        tr.find_all("th")[0].all_text(): tr.find_all("td")[0].all_text()
        for tr in diag.find_all("tr")
    }
    assert (
        rows["solver"] == evil
        and rows["chosen"] == evil
        and rows["why"] == evil
        and rows["dtype"] == evil
    )
    assert rows["settings"] == f"mode={evil}, {evil}=1.5"
    assert rows[f"solver statistic: {evil}"] == evil and rows["solver statistic: note"] == evil
    assert rows[evil] == "2.00"  # an extra diagnostics row: its label is text too


@pytest.mark.parametrize("evil", HOSTILE)
def test_report_escapes_features_text_and_overview(evil) -> None:
    """Feature names, texts of points and every label of the overview are shown as text too."""
    feats = np.array([1.5, -2.0])
    pts = [
        ReportPoint(3, evil, 2.5, -0.25, features=feats, text=evil),
        ReportPoint(7, evil, 1.0, -0.1, features=feats),
    ]
    rows = [
        OverviewRow(1, evil, evil + "!", 0.7, pts, pts),
        OverviewRow(4, evil, evil, 0.2, pts[:1], []),
    ]
    page = explain_report(
        title="t",
        provenance={},
        n_train=10,
        feature_names=[evil, "b"],
        overview=rows,
        test=ReportTest(
            index=1,
            true_label=evil,
            predicted_label=evil + "!",
            loss=0.7,
            features=feats,
            text=evil,
        ),
        helpful=pts,
        harmful=pts,
    )
    dom = parse(page)
    _assert_inert(page, dom, evil)
    assert [th.all_text() for th in dom.one("table", id="test-features").find_all("th")] == [
        evil,
        "b",
    ]
    assert [
        float(td.attrs["data-value"]) for td in dom.one("table", id="test-features").find_all("td")
    ] == [1.5, -2.0]
    assert dom.one("p", id="test-text").all_text() == evil
    assert [
        td.all_text() for td in dom.one("table", id="harmful").find_all("td", class_="text")
    ] == [evil]
    overview = dom.one("table", id="overview").find_all("tr", class_="overview-row")
    assert [[c for c in tr.children if c.tag == "td"][1].all_text() for tr in overview] == [
        evil,
        evil,
    ]
    recurring = dom.one("table", id="recurring").find_all("tr", class_="recurring")
    assert [
        (
            int(tr.one("td", class_="train-id").all_text()),
            tr.one("td", class_="helpful-count").all_text(),
            tr.one("td", class_="harmful-count").all_text(),
        )
        for tr in recurring
    ] == [(3, "2", "1"), (7, "1", "1")]
    assert [c for c in recurring[0].children if c.tag == "td"][1].all_text() == evil


def test_report_pages_long_rankings() -> None:
    pts = [
        ReportPoint(j, "a", float(-j), float(j) / 10, image=np.full(4, j, dtype=float))
        for j in range(1, 9)
    ]
    page = explain_report(
        title="t",
        test=ReportTest(index=0, true_label="a", predicted_label="a", loss=0.1),
        helpful=pts,
        harmful=[],
        provenance={},
        n_train=10,
        image_shape=(2, 2),
        page_size=3,
    )
    dom = parse(page)
    pages = dom.one("div", id="helpful-pages")
    assert [d.one("summary").all_text() for d in pages.find_all("details")] == [
        "ranks 4–6 of 8",
        "ranks 7–8 of 8",
    ]
    assert [int(td.attrs["data-value"]) for td in pages.find_all("td", class_="train-id")] == list(
        range(1, 9)
    )
    assert len(dom.one("table", id="helpful").find_all("tr", class_="point")) == 3
    assert len(pages.find_all("img")) == 8 and not dom.find_all("table", id="overview")
    with pytest.raises(
        InputError, match="feature_names has 3 names but the points have 2 features"
    ):
        explain_report(
            title="t",
            test=ReportTest(0, "a", "a", 0.1, features=[1.0, 2.0]),
            helpful=[],
            harmful=[],
            provenance={},
            n_train=1,
            feature_names=["x", "y", "z"],
        )
    with pytest.raises(InputError, match="page_size must be an integer ≥ 1"):
        explain_report(
            title="t",
            test=ReportTest(0, "a", "a", 0.1),
            helpful=[],
            harmful=[],
            provenance={},
            n_train=1,
            page_size=0,
        )


@pytest.mark.parametrize("evil", HOSTILE[:2])
def test_report_refuses_ids_that_are_not_integers(evil, tmp_path) -> None:
    """Training ids and the test index go into the page (and its attributes) only as integers."""
    test = ReportTest(index=1, true_label="+1", predicted_label="-1", loss=0.7)
    with pytest.raises(InputError, match=r"ReportPoint\.train_id must be an integer; got str"):
        explain_report(
            title="t",
            test=test,
            helpful=[ReportPoint(evil, "a", 1.0, -0.1)],
            harmful=[],
            provenance={},
            n_train=3,
        )
    with pytest.raises(InputError, match=r"ReportTest\.index must be an integer; got str"):
        explain_report(
            title="t",
            test=ReportTest(index=evil, true_label="+1", predicted_label="-1", loss=0.7),
            helpful=[],
            harmful=[],
            provenance={},
            n_train=3,
        )


def test_report_escapes_the_data_file_name(tmp_path, capsys) -> None:
    """``explain --data`` with a hostile file name: the name reaches the page's title only
    as text."""
    name = '<img src=x onerror=alert(1)>" onload="x.npz'
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(50, 9)), rng.normal(size=9)
    y = (x @ w + rng.normal(size=50) > 0).astype(np.int64)
    np.savez(tmp_path / name, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    report = tmp_path / "r.html"
    rc = main(
        [
            "explain",
            "--data",
            str(tmp_path / name),
            "--solver",
            "direct",
            "--test-index",
            "0",
            "--top",
            "2",
            "--loo-k",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "e.png"),
            "--report",
            str(report),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    page = report.read_text(encoding="utf-8")
    dom = parse(page)
    _assert_inert(page, dom, name)
    assert dom.one("title").all_text() == f"Why does the model predict this? Test point 0 of {name}"
    assert dom.one("h1").all_text() == dom.one("title").all_text()
    # 9 features in one axis are tabular: their values in tables, no pictures, nothing injected
    assert not dom.find_all("img")
    assert len(dom.one("table", id="test-features").find_all("td")) == 9


@pytest.mark.parametrize("case", ["suffix", "under_a_file", "folder"])
def test_bad_report_path_fails_before_any_work(case, tmp_path, capsys) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.html").mkdir()
    path = {
        "suffix": tmp_path / "report.txt",
        "under_a_file": tmp_path / "file.txt" / "sub" / "r.html",
        "folder": tmp_path / "dir.html",
    }[case]
    expect = {
        "suffix": "must end in .html",
        "under_a_file": "is a file, not a folder",
        "folder": "that is a folder",
    }[case]
    rc = main(["explain", "--no-progress", "--out", str(tmp_path / "e.png"), "--report", str(path)])
    cap = capsys.readouterr()
    assert (
        rc == 2 and cap.err.startswith(f"upweight: error: --report {path}:") and expect in cap.err
    )
    assert "Traceback" not in cap.err and cap.out == ""  # refused before loading data or training
    assert not (tmp_path / "e.png").exists()


# ── in a real browser ─────────────────────────────────────────────────────────────────

PROBE = """<script>
window.addEventListener("load", () => {
  const seen = Array.from(document.images).map(i => {
    const r = i.getBoundingClientRect();
    return [i.complete, i.naturalWidth, i.naturalHeight,
            r.left + i.clientLeft, r.top + i.clientTop, i.clientWidth, i.clientHeight];
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images: seen, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""
BROKEN = '<img id="control-broken" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'
WINDOW = (1280, 2600)


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable; asked for before ``explained`` so that a skip costs nothing."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(
                f"{reason}; CI is set, so the browser check must run (.ci/run installs it)."
            )
        pytest.skip(reason)
    return exe


def _run_chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="upweight-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--force-device-scale-factor=1",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--user-data-dir={profile}",
            *args,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"headless Chromium did not finish within 90 s: {' '.join(cmd)}")
    if proc.returncode != 0:
        pytest.fail(
            f"headless Chromium failed (exit {proc.returncode}):"
            f" {' '.join(cmd)}\n{proc.stderr[-2000:]}"
        )
    return proc


def test_report_renders_in_chromium(chromium, explained, tmp_path) -> None:
    """Chromium decodes every image at the PNG's size, and the screenshot shows those pixels where
    they are."""
    exe = chromium
    pngs = [png_of(img) for img in explained["dom"].find_all("img")]

    # A copy of the page with a probe that writes each image's decoded size and on-screen box into
    # the DOM, and one deliberately broken PNG to show that the probe can tell.
    probed = tmp_path / "probed.html"
    probed.write_text(
        explained["page"].replace("</body>", BROKEN + PROBE + "</body>"), encoding="utf-8"
    )
    proc = _run_chromium(exe, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the probe did not run; Chromium's DOM starts with {proc.stdout[:300]!r}"
    probe = json.loads(m.group(1).replace("&quot;", '"'))
    seen = probe["images"]
    assert len(seen) == len(pngs) + 1
    for (complete, w, h, *_), png in zip(seen, pngs):
        assert complete and (w, h) == png.size  # decoded by the browser at the PNG's own size
    assert seen[-1][1] == 0  # the broken control image did not decode
    assert probe["height"] <= WINDOW[1], "the page no longer fits the screenshot; raise WINDOW"

    shot = tmp_path / "shot.png"
    _run_chromium(exe, f"--screenshot={shot}", probed.as_uri())
    screen = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert screen.shape == (WINDOW[1], WINDOW[0])
    for (_, _, _, x, y, w, h), png in zip(seen[:-1], pngs):
        x, y, w, h = round(x), round(y), round(w), round(h)
        crop = screen[y : y + h, x : x + w]
        want = np.asarray(png.convert("L"), dtype=float)
        if png.size == (28, 28):  # a digit, drawn with square pixels: sample each block's centre
            rows = ((np.arange(28) + 0.5) * h / 28).astype(int)
            cols = ((np.arange(28) + 0.5) * w / 28).astype(int)
            diff = np.abs(crop[np.ix_(rows, cols)] - want)
            assert diff.max() <= 12, (x, y, diff.max())
        else:  # the scatter, scaled to fit: compare with the PNG resampled to the same box
            # on a coarse 8-px grid, where thin lines survive whichever filter scaled them
            ref = png.convert("L").resize((w // 8, h // 8), Image.Resampling.BOX)
            got = Image.fromarray(crop.astype(np.uint8)).resize(
                (w // 8, h // 8), Image.Resampling.BOX
            )
            ref, got = np.asarray(ref, dtype=float), np.asarray(got, dtype=float)
            assert got.std() > 5  # not blank
            assert (
                np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95 and np.abs(got - ref).mean() < 3
            )
