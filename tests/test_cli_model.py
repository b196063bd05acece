"""``upweight explain`` for any model: ``--model FILE.py:FUNCTION``, multi-class data, tabular and
text inputs, long rankings in pages, and the overview of several test points.

The rankings are checked against influence computed by hand in float64 (closed-form gradients
and Hessian of softmax regression, ``numpy.linalg.solve``), and against ``upweight.Influence``
with the ``Direct`` solver on the same model and data.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch

import upweight as uw
from test_report_html import parse, png_of
from upweight.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/cli_model.py:build"
TESTS = [3, 0, 7, 12]
TOP = 6


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header (IHDR), without decoding the image."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def softmax_influence(
    W: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    Xt: np.ndarray,
    yt: np.ndarray,
    l2: float,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """I_up,loss (n_test, n) of softmax regression, by hand: g(z) = (p − e_y) ⊗ x̃, H = mean (diag p
    − ppᵀ) ⊗ x̃x̃ᵀ + l2·I."""

    def aug(A):
        return A if bias is None else np.hstack([A, np.ones((len(A), 1))])

    V = W if bias is None else np.hstack([W, bias[:, None]])
    Xa, Xta = aug(X), aug(Xt)
    C = V.shape[0]

    def grads(A, labels):
        P = scipy.special.softmax(A @ V.T, axis=1)
        R = P - np.eye(C)[labels]
        return np.einsum("nc,nk->nck", R, A).reshape(len(A), -1), P

    G, P = grads(Xa, y)
    Gt, _ = grads(Xta, yt)
    n, k = Xa.shape
    H = np.zeros((C * k, C * k))
    for a, p in zip(Xa, P):
        H += np.kron(np.diag(p) - np.outer(p, p), np.outer(a, a))
    H = H / n + l2 * np.eye(C * k)
    return -Gt @ np.linalg.solve(H, G.T)


# ── --model examples/cli_model.py:build ─────────────────────────────────────────────


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    """The example model explained once, through the real entry point, from the repository root."""
    tmp = tmp_path_factory.mktemp("wine")
    argv = [
        "explain",
        "--model",
        EXAMPLE,
        "--solver",
        "direct",
        "--test-index",
        ",".join(map(str, TESTS)),
        "--top",
        str(TOP),
        "--loo-k",
        "0",
        "--no-progress",
        "--out",
        str(tmp / "w.png"),
        "--report",
        str(tmp / "w.html"),
    ]
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        mp.chdir(ROOT)
        rc = main(argv)
        sys.path.insert(0, str(ROOT / "examples"))
        try:
            import cli_model

            spec = cli_model.build()  # the same model: build() is deterministic
        finally:
            sys.path.remove(str(ROOT / "examples"))
    assert rc == 0, err.getvalue()
    page = (tmp / "w.html").read_text(encoding="utf-8")
    return {
        "out": out.getvalue(),
        "err": err.getvalue(),
        "page": page,
        "dom": parse(page),
        "png": tmp / "w.png",
        "spec": spec,
    }


@pytest.fixture(scope="module")
def wine_reference(wine):
    spec = wine["spec"]
    (X, y), (Xt, yt) = spec.train, spec.test
    W = spec.model.weight.detach().numpy()
    b = spec.model.bias.detach().numpy()
    ref = softmax_influence(
        W, X.numpy(), y.numpy(), Xt.numpy()[TESTS], yt.numpy()[TESTS], spec.l2, bias=b
    )
    probs = scipy.special.softmax(Xt.numpy() @ W.T + b, axis=1)
    return {
        "I": ref,
        "probs": probs,
        "X": X.numpy(),
        "Xt": Xt.numpy(),
        "y": y.numpy(),
        "yt": yt.numpy(),
    }


def _ranked(dom, kind: str) -> tuple[list[int], list[float]]:
    """Train ids and I_up,loss of a ranking, over all its pages, in order."""
    ids, values = [], []
    for tr in dom.one("div", id=f"{kind}-pages").find_all("tr", class_="point"):
        tds = [c for c in tr.children if c.tag == "td"]
        k = next(n for n, td in enumerate(tds) if "train-id" in td.attrs.get("class", ""))
        ids.append(int(tds[k].attrs["data-value"]))
        values.append(float(tds[k + 2].attrs["data-value"]))
    return ids, values


def test_model_report_ranks_as_the_closed_form_and_direct(wine, wine_reference) -> None:
    """The report's top points for test point 3 are those of I_up,loss by hand and of
    Influence(Direct)."""
    dom, ref = wine["dom"], wine_reference["I"][0]
    spec = wine["spec"]
    direct = (
        uw.Influence(
            uw.Objective(spec.model, "cross_entropy", l2=spec.l2),
            solver=uw.Direct(),
            progress=False,
        )
        .fit(spec.train)
        .up_loss((spec.test[0][TESTS[:1]], spec.test[1][TESTS[:1]]))
    )
    for kind, order in (("helpful", np.argsort(ref)), ("harmful", np.argsort(-ref))):
        ids, values = _ranked(dom, kind)
        assert ids == order[:TOP].tolist()
        assert ids == direct.top_k(TOP, harmful=kind == "harmful").train_ids.tolist()
        np.testing.assert_allclose(values, ref[ids], rtol=1e-8)
        np.testing.assert_allclose(values, direct.values[0, ids], rtol=1e-10)
    assert int(dom.one(id="test-index").all_text()) == TESTS[0]
    assert "Traceback" not in wine["err"]


def test_model_report_shows_tabular_feature_values(wine, wine_reference) -> None:
    dom, spec = wine["dom"], wine["spec"]
    assert not dom.find_all("img")  # tabular: values, not pictures
    header = [th.all_text() for th in dom.one("table", id="test-features").find_all("th")]
    assert header == list(spec.feature_names) and len(header) == 13
    shown = [
        float(td.attrs["data-value"]) for td in dom.one("table", id="test-features").find_all("td")
    ]
    np.testing.assert_allclose(shown, wine_reference["Xt"][TESTS[0]], rtol=1e-12)
    table = dom.one("table", id="harmful")
    assert [th.all_text() for th in table.find_all("th")][-13:] == list(spec.feature_names)
    for tr in table.find_all("tr", class_="point"):
        tds = [c for c in tr.children if c.tag == "td"]
        j = int(tds[1].attrs["data-value"])
        np.testing.assert_allclose(
            [float(td.attrs["data-value"]) for td in tds[-13:]], wine_reference["X"][j], rtol=1e-12
        )
        assert tds[2].all_text() == f"{wine_reference['y'][j]} (class_{wine_reference['y'][j]})"
    w, h = png_size(wine["png"])
    assert 600 < w < 2000 and 300 < h < 1200


def test_model_overview_lists_every_test_point(wine, wine_reference) -> None:
    dom, ref, probs = wine["dom"], wine_reference["I"], wine_reference["probs"]
    rows = dom.one("table", id="overview").find_all("tr", class_="overview-row")
    assert [int(r.attrs["data-test"]) for r in rows] == TESTS
    tops = []
    for r, row in enumerate(rows):
        i = TESTS[r]
        tds = [c for c in row.children if c.tag == "td"]
        assert tds[1].all_text() == f"{wine_reference['yt'][i]} (class_{wine_reference['yt'][i]})"
        c = int(np.argmax(probs[i]))
        assert tds[2].all_text().startswith(f"{c} (class_{c}) — ")
        assert float(tds[3].attrs["data-value"]) == pytest.approx(
            -np.log(probs[i, wine_reference["yt"][i]]), rel=1e-9
        )
        helpful = [int(s.attrs["data-value"]) for s in tds[4].find_all("span")]
        harmful = [int(s.attrs["data-value"]) for s in tds[5].find_all("span")]
        assert (
            helpful == np.argsort(ref[r])[:5].tolist()
            and harmful == np.argsort(-ref[r])[:5].tolist()
        )
        tops.append((i, helpful, harmful))
    # the recurring training points: every id in the lists of ≥ 2 test points, with its counts
    counts: dict[int, list[int]] = {}
    for _, helpful, harmful in tops:
        for j in helpful:
            counts.setdefault(j, [0, 0])[0] += 1
        for j in harmful:
            counts.setdefault(j, [0, 0])[1] += 1
    want = {j: c for j, c in counts.items() if sum(c) >= 2}
    got = {}
    for tr in dom.one("table", id="recurring").find_all("tr", class_="recurring"):
        j = int(tr.one("td", class_="train-id").attrs["data-value"])
        got[j] = [
            int(tr.one("td", class_="helpful-count").all_text()),
            int(tr.one("td", class_="harmful-count").all_text()),
        ]
    assert got == want and want
    assert "overview of 4 test points" in wine["out"]


# ── multi-class data through --data (softmax regression trained here) ───────────────


def _three_class_npz(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.2, size=(3, 6))
    lab = rng.integers(0, 3, size=120)
    x = centres[lab] + rng.normal(size=(120, 6))
    values = np.array([3, 5, 8])[lab]  # labels as in the file: not 0 … C−1
    arrays = {
        "x_train": x[:90],
        "y_train": values[:90],
        "x_test": x[90:],
        "y_test": values[90:],
        "feature_names": np.array([f"f<{k}>" for k in range(6)]),
        "class_names": np.array(["three", "five", "eight"]),
    }
    np.savez(path, **arrays)
    return arrays


def _printed(text: str) -> dict[str, list[tuple[int, float]]]:
    tables: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"top \d+ most (helpful|harmful)", line)
        if m:
            current = m.group(1)
            tables[current] = []
            continue
        parts = line.split()
        if current and parts and parts[0].isdigit() and len(parts) >= 5:
            tables[current].append((int(parts[1]), float(parts[-2])))
        elif current and not line.lstrip().startswith("rank"):
            current = None
    return tables


def test_multiclass_npz_is_softmax_regression(tmp_path, capsys) -> None:
    a = _three_class_npz(tmp_path / "three.npz")
    l2 = 0.01
    rc, out, err = run(
        [
            "explain",
            "--data",
            str(tmp_path / "three.npz"),
            "--solver",
            "direct",
            "--test-index",
            "4",
            "--top",
            "4",
            "--loo-k",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "e.png"),
            "--report",
            str(tmp_path / "r.html"),
        ],
        capsys,
    )
    assert rc == 0, err
    assert "softmax regression" in out and "Linear(6 → 3, no bias)" in out

    # θ̂ by SciPy: mean cross-entropy + l2/2‖W‖², no bias, classes in label order 3, 5, 8
    X, Xt = a["x_train"], a["x_test"]
    y, yt = np.searchsorted([3, 5, 8], a["y_train"]), np.searchsorted([3, 5, 8], a["y_test"])

    def risk(w):
        W = w.reshape(3, 6)
        P = scipy.special.softmax(X @ W.T, axis=1)
        loss = -np.log(P[np.arange(len(y)), y]).mean() + 0.5 * l2 * w @ w
        return loss, ((P - np.eye(3)[y]).T @ X / len(y) + l2 * W).ravel()

    W = scipy.optimize.minimize(
        risk,
        np.zeros(18),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 5000},
    ).x.reshape(3, 6)
    ref = softmax_influence(W, X, y, Xt[[4]], yt[[4]], l2)[0]
    tables = _printed(out)
    for kind, order in (("helpful", np.argsort(ref)), ("harmful", np.argsort(-ref))):
        assert [j for j, _ in tables[kind]] == order[:4].tolist()
        np.testing.assert_allclose([v for _, v in tables[kind]], ref[order[:4]], rtol=1e-4)
    p = scipy.special.softmax(Xt[4] @ W.T)
    c = int(np.argmax(p))
    names = ["three", "five", "eight"]
    assert (
        f"true label {a['y_test'][4]} ({names[yt[4]]}), predicted {[3, 5, 8][c]} ({names[c]}) with"
        f" P = {p[c]:.4f}" in out
    )
    dom = parse((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert [th.all_text() for th in dom.one("table", id="test-features").find_all("th")] == [
        f"f<{k}>" for k in range(6)
    ]
    assert float(
        dom.one("tr", id="test-p-predicted").one("td").attrs["data-value"]
    ) == pytest.approx(p[c], rel=1e-6)


# ── long rankings ────────────────────────────────────────────────────────────────────


def test_top_200_is_paged_and_no_picture_grows(tmp_path, capsys, mnist_1v7) -> None:
    d = mnist_1v7

    def shrink(x):
        return (
            (x.reshape(-1, 28, 28) * 255)
            .round()
            .astype(np.uint8)
            .reshape(-1, 14, 2, 14, 2)
            .max(axis=(2, 4))
        )

    np.savez(
        tmp_path / "small.npz",
        x_train=shrink(d.x_train[:500]),
        y_train=d.y_train[:500],
        x_test=shrink(d.x_test[:20]),
        y_test=d.y_test[:20],
    )
    rc, out, err = run(
        [
            "explain",
            "--data",
            str(tmp_path / "small.npz"),
            "--solver",
            "direct",
            "--test-index",
            "2",
            "--top",
            "200",
            "--loo-k",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "e.png"),
            "--report",
            str(tmp_path / "r.html"),
        ],
        capsys,
    )
    assert rc == 0, err
    w, h = png_size(tmp_path / "e.png")
    assert w <= 2000 and h <= 1200  # the figure draws the top 10 of each kind, whatever --top
    assert "the top 10 of each kind; all 200 are listed above and in --report" in out
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    dom = parse(page)
    for img in dom.find_all("img"):
        # each training image at its own resolution: no strip of 200
        assert png_of(img).size == (14, 14)
    printed = _printed(out)
    for kind in ("helpful", "harmful"):
        ids, _ = _ranked(dom, kind)
        assert ids == [j for j, _ in printed[kind]] and len(ids) == 200 == len(set(ids))
        pages = dom.one("div", id=f"{kind}-pages")
        assert len(pages.find_all("details")) == 7  # ranks 26–50, …, 176–200 folded
        assert len(dom.one("table", id=kind).find_all("tr", class_="point")) == 25
        ranks = [
            int([c for c in tr.children if c.tag == "td"][0].all_text())
            for tr in pages.find_all("tr", class_="point")
        ]
        assert ranks == list(range(1, 201))


# ── user models of other forms ──────────────────────────────────────────────────────

USER_MODULE = """
import torch
import upweight as uw


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, input_ids):
        return self.out(self.emb(input_ids).mean(dim=1))


def _fitted(model, loss, l2, data):
    fit = uw.refit(uw.Objective(model, loss, l2=l2), uw.Data.from_any(data))
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(fit.params[name])
    return model.eval()


def binary():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 9, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(70, generator=g, dtype=torch.float64) > 0).long()
    model = _fitted(torch.nn.Linear(9, 1, bias=False).double(), "logistic", 0.1, (x[:50], y[:50]))
    return {"model": model, "train": (x[:50], y[:50]), "test": (x[50:], y[50:]),
            "loss": "logistic", "l2": 0.1,
            "kind": "image", "image_shape": (3, 3), "class_names": {0: "no", 1: "yes"}}


TEXTS = ["<b>spam</b> & offer %d", "hello <i>friend</i> %d"]


def text(with_text=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (40, 5), generator=g)
    y = (ids[:, 0] > 5).long()
    data = {"input_ids": ids, "labels": y}
    torch.manual_seed(0)
    model = _fitted(Bag().double(), "cross_entropy", 0.05, data)
    spec = {"model": model, "train": {"input_ids": ids[:30], "labels": y[:30]},
            "test": {"input_ids": ids[30:], "labels": y[30:]}, "l2": 0.05}
    if with_text:
        spec["train_text"] = [TEXTS[j % 2] % j for j in range(30)]
        spec["test_text"] = [TEXTS[j % 2] % (100 + j) for j in range(10)]
    return spec


def token_ids():
    return text(with_text=False)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "upweight_test_user_models"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_dotted_module_returning_a_dict_binary(user_module, tmp_path, capsys) -> None:
    rc, out, err = run(
        [
            "explain",
            "--model",
            f"{user_module}:binary",
            "--solver",
            "direct",
            "--top",
            "3",
            "--loo-k",
            "3",
            "--no-progress",
            "--out",
            str(tmp_path / "b.png"),
            "--report",
            str(tmp_path / "b.html"),
        ],
        capsys,
    )
    assert rc == 0, err
    m = re.search(
        r"test point (\d+) \((\w+ \w+|first misclassified)[^)]*\): true label (\d) \((no|yes)\), "
        r"predicted P\(y=\+1\) = (\S+) → (MISCLASSIFIED|correct)",
        out,
    )
    assert m, out
    assert "Pearson" in out  # --loo-k given: retrained with the default convex refit
    dom = parse((tmp_path / "b.html").read_text(encoding="utf-8"))
    # kind="image", image_shape
    assert {png_of(img).size for img in dom.find_all("img", class_="px")} == {(3, 3)}


def test_text_inputs_show_their_text_escaped(user_module, tmp_path, capsys) -> None:
    rc, out, err = run(
        [
            "explain",
            "--model",
            f"{user_module}:text",
            "--solver",
            "direct",
            "--damping",
            "0.01",
            "--test-index",
            "0,1,2",
            "--top",
            "3",
            "--no-progress",
            "--out",
            str(tmp_path / "t.png"),
            "--report",
            str(tmp_path / "t.html"),
        ],
        capsys,
    )
    assert rc == 0, err
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    dom = parse(page)
    assert not dom.find_all("b") and not dom.find_all("i") and not dom.find_all("img")
    assert dom.one("p", id="test-text").all_text() == "<b>spam</b> & offer 100"
    for tr in dom.one("table", id="harmful").find_all("tr", class_="point"):
        j = int(tr.one("td", class_="train-id").attrs["data-value"])
        assert (
            tr.one("td", class_="text").all_text()
            == ["<b>spam</b> & offer %d", "hello <i>friend</i> %d"][j % 2] % j
        )
    assert len(dom.one("table", id="overview").find_all("tr", class_="overview-row")) == 3

    rc, out, err = run(
        [
            "explain",
            "--model",
            f"{user_module}:token_ids",
            "--solver",
            "direct",
            "--damping",
            "0.01",
            "--top",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "u.png"),
            "--report",
            str(tmp_path / "u.html"),
        ],
        capsys,
    )
    assert rc == 0, err
    dom = parse((tmp_path / "u.html").read_text(encoding="utf-8"))
    assert dom.one("p", id="test-text").all_text().startswith("token ids: ")


# ── mistakes: one line, exit status 2, nothing written ──────────────────────────────

BAD_MODULES = {
    "raises_on_import.py": "raise RuntimeError('boom at import')\n",
    "bad_returns.py": (
        "import torch\ndef number():\n    return 42\ndef unknown_key():\n    return {'model':"
        " torch.nn.Linear(2, 2), 'train': 1, 'test': 1, 'lr': 0.1}\ndef missing():\n    return"
        " {'model': torch.nn.Linear(2, 2)}\ndef not_a_module():\n    return {'model': 'linear',"
        " 'train': 1, 'test': 1}\ndef bad_kind():\n    return {'model': torch.nn.Linear(2, 2),"
        " 'train': 1, 'test': 1, 'kind': 'video'}\ndef raises():\n    raise ValueError('no data"
        " here')\nnot_callable = 3\n"
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        "no_colon",
        "missing_file",
        "not_py",
        "no_function",
        "bad_name",
        "no_module",
        "raises_on_import",
        "raises_in_call",
        "returns_number",
        "unknown_key",
        "missing_keys",
        "not_a_module",
        "bad_kind",
        "not_callable",
        "l2_with_model",
        "index_out_of_range",
        "index_and_n_test",
    ],
)
def test_model_mistakes_are_one_line(case, tmp_path, capsys, monkeypatch) -> None:
    for name, text in BAD_MODULES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("x")
    bad = str(tmp_path / "bad_returns.py")
    argv, words = {
        "no_colon": (
            ["--model", "examples/cli_model.py"],
            ["expected FILE.py:FUNCTION or MODULE:FUNCTION"],
        ),
        "missing_file": (["--model", "nothere/model.py:build"], ["no such file nothere/model.py"]),
        "not_py": (["--model", f"{tmp_path / 'notes.txt'}:build"], ["is not a .py file"]),
        "no_function": (
            ["--model", "examples/cli_model.py:nope"],
            ["has no function 'nope'", "(it defines build)"],
        ),
        "bad_name": (["--model", "examples/cli_model.py:9x"], ["is not a Python function name"]),
        "no_module": (
            ["--model", "no_such_module_xyz.models:build"],
            ["no module named 'no_such_module_xyz'"],
        ),
        "raises_on_import": (
            ["--model", f"{tmp_path / 'raises_on_import.py'}:build"],
            ["raised RuntimeError: boom at import at ", "raises_on_import.py:1"],
        ),
        "raises_in_call": (
            ["--model", f"{bad}:raises"],
            ["calling raises() raised ValueError: no data here", "bad_returns.py:"],
        ),
        "returns_number": (["--model", f"{bad}:number"], ["returned a int", "ModelSpec"]),
        "unknown_key": (["--model", f"{bad}:unknown_key"], ["unknown key(s) lr"]),
        "missing_keys": (["--model", f"{bad}:missing"], ["lacks train, test"]),
        "not_a_module": (
            ["--model", f"{bad}:not_a_module"],
            ["'model' must be a trained torch.nn.Module; got str"],
        ),
        "bad_kind": (
            ["--model", f"{bad}:bad_kind"],
            ["kind must be one of image, tabular, text", "'video'"],
        ),
        "not_callable": (["--model", f"{bad}:not_callable"], ["is a int, not a function"]),
        "l2_with_model": (
            ["--model", EXAMPLE, "--l2", "0.1"],
            ["--l2 sets the L2 strength", "Leave --l2 out"],
        ),
        "index_out_of_range": (
            ["--model", EXAMPLE, "--test-index", "2,54"],
            ["--test-index 54 is out of range", "53"],
        ),
        "index_and_n_test": (
            ["--model", EXAMPLE, "--test-index", "2", "--n-test", "3"],
            ["pass one of the two"],
        ),
    }[case]
    monkeypatch.chdir(ROOT)
    out_png = tmp_path / "e.png"
    rc, out, err = run(
        [
            "explain",
            *argv,
            "--no-progress",
            "--out",
            str(out_png),
            "--report",
            str(tmp_path / "r.html"),
        ],
        capsys,
    )
    assert rc == 2, (out, err)
    assert (
        err.startswith("upweight: error: ") and err.count("\n") == 1 and "Traceback" not in err
    ), err
    for w in words:
        assert w in err, (w, err)
    assert not out_png.exists() and not (tmp_path / "r.html").exists()


def test_model_and_data_together_is_a_usage_error(capsys, tmp_path) -> None:
    rc, out, err = run(
        ["explain", "--model", EXAMPLE, "--data", "x.npz", "--out", str(tmp_path / "e.png")], capsys
    )
    assert rc == 2 and "not allowed with argument" in err and not (tmp_path / "e.png").exists()


def test_help_describes_model_and_warns_that_it_runs_code(capsys) -> None:
    rc, out, _ = run(["explain", "--help"], capsys)
    text = " ".join(out.split())
    assert rc == 0
    assert (
        "--model FILE.py:FUNCTION" in text
        and "ModelSpec" in text
        and "only name code you trust" in text
    )
    assert "--n-test" in text and "--test-index I[,J,…]" in text


def test_shared_data_follows_the_environment(monkeypatch, tmp_path) -> None:
    from conftest import DATA_ENV, shared_data

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert shared_data("mnist", "mnist.npz") == tmp_path / "mnist" / "mnist.npz"
    monkeypatch.delenv(DATA_ENV)
    assert shared_data() == ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("ci", ["", "true"])
def test_real_data_tests_skip_without_the_data_but_fail_under_ci(tmp_path, ci) -> None:
    """A real-data test module with ``$UPWEIGHT_DATA`` pointing at an empty folder: skipped
    locally, failed (naming the folder) when CI is set."""
    import os
    import subprocess

    env = {**os.environ, "UPWEIGHT_DATA": str(tmp_path), "CI": ci, "UPWEIGHT_PROGRESS": "0"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            str(ROOT / "tests" / "test_mismatch.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    if ci:
        assert run.returncode == 1 and re.search(r"\d+ (failed|errors?)", out), out[-2000:]
        assert "skipped" not in out, out[-2000:]
        assert str(tmp_path) in out and "CI is set" in out, out[-2000:]
    else:
        assert run.returncode == 0 and " skipped" in out and "failed" not in out, out[-2000:]


def test_softmax_reference_matches_autograd() -> None:
    """The hand-written softmax-regression influence above equals autograd's on random numbers."""
    rng = np.random.default_rng(5)
    X, W, b = rng.normal(size=(12, 3)), rng.normal(size=(4, 3)), rng.normal(size=4)
    y, Xt, yt = rng.integers(0, 4, 12), rng.normal(size=(2, 3)), rng.integers(0, 4, 2)
    theta = torch.tensor(np.hstack([W, b[:, None]]).ravel(), requires_grad=True)

    def loss(A, labels, t):
        V = t.reshape(4, 4)
        return torch.nn.functional.cross_entropy(
            torch.tensor(A) @ V[:, :3].T + V[:, 3], torch.tensor(labels), reduction="none"
        )

    H = torch.autograd.functional.hessian(
        lambda t: loss(X, y, t).mean() + 0.05 * (t**2).sum(), theta
    ).numpy()
    G = np.stack(
        [torch.autograd.grad(li, theta, retain_graph=True)[0].numpy() for li in loss(X, y, theta)]
    )
    Gt = np.stack(
        [torch.autograd.grad(li, theta, retain_graph=True)[0].numpy() for li in loss(Xt, yt, theta)]
    )
    np.testing.assert_allclose(
        softmax_influence(W, X, y, Xt, yt, 0.1, bias=b),
        -Gt @ np.linalg.solve(H, G.T),
        rtol=1e-10,
        atol=1e-12,
    )
