"""``upweight explain`` end to end, checked against an independent NumPy/SciPy computation."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.optimize
import scipy.special

import upweight
from upweight.cli.main import main
from upweight.datasets import load_mnist_1v7

L2 = 0.01
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([+-]1)(?: \([^)]*\))?\s+(\S+)\s+(\S+)\s*$")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_1v7()


@pytest.fixture(scope="module")
def reference(mnist):
    """θ̂, I_up,loss and P(y=+1) by hand: logistic regression without bias, closed-form H."""
    X = mnist.x_train.astype(np.float64)
    y = mnist.y_train.astype(np.float64)
    n = len(y)

    def risk(w):
        m = y * (X @ w)
        g = -(X.T @ (y * scipy.special.expit(-m))) / n + L2 * w
        return np.logaddexp(0.0, -m).mean() + 0.5 * L2 * w @ w, g

    w = scipy.optimize.minimize(
        risk,
        np.zeros(X.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-11, "ftol": 0.0, "maxiter": 2000, "maxcor": 30},
    ).x
    s = X @ w
    sig = scipy.special.expit(s)
    H = (X * (sig * (1 - sig))[:, None]).T @ X / n + L2 * np.eye(X.shape[1])
    return {"w": w, "H": H, "n": n, "X": X, "y": y}


def _influence(ref, x_test, y_test):
    X, y, w = ref["X"], ref["y"], ref["w"]
    g_test = -y_test * scipy.special.expit(-y_test * (x_test @ w)) * x_test
    g_train = -(y * scipy.special.expit(-y * (X @ w)))[:, None] * X
    return -g_train @ np.linalg.solve(ref["H"], g_test)  # I_up,loss, shape (n,)


@pytest.fixture(scope="module")
def explain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "figs" / "explain.png"  # parent dir does not exist yet
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["explain", "--loo-k", "5", "--no-progress", "--out", str(out)])
    return {"rc": rc, "out": stdout.getvalue(), "err": stderr.getvalue(), "png": out}


def _tables(text: str) -> dict[str, list[tuple[int, int, int, float, float]]]:
    tables: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("top ") and ("helpful" in line or "harmful" in line):
            current = "helpful" if "helpful" in line else "harmful"
            tables[current] = []
            continue
        m = ROW.match(line)
        if current and m:
            r, j, lab, iup, rem = m.groups()
            tables[current].append((int(r), int(j), int(lab), float(iup), float(rem)))
        elif current and not line.lstrip().startswith("rank"):
            current = None
    return tables


def test_explain_prints_consistent_tables(explain_run, mnist, reference) -> None:
    assert explain_run["rc"] == 0, explain_run["err"]
    text = explain_run["out"]
    assert "Traceback" not in explain_run["err"]
    headers = [ln for ln in text.splitlines() if ln.lstrip().startswith("rank")]
    assert len(headers) == 2
    for h in headers:
        for col in ("rank", "train index", "label", "I_up,loss", "removal effect"):
            assert col in h
    n = int(re.search(r"with n = (\d+)", text).group(1))
    assert n == len(mnist.y_train) == 11_800

    tables = _tables(text)
    assert [r[0] for r in tables["helpful"]] == [1, 2, 3, 4, 5]
    assert [r[0] for r in tables["harmful"]] == [1, 2, 3, 4, 5]
    for kind, rows in tables.items():
        iup = np.array([r[3] for r in rows])
        rem = np.array([r[4] for r in rows])
        np.testing.assert_allclose(rem, -iup / n, rtol=2e-4)  # removal effect = −I_up,loss / n
        for _, j, lab, _, _ in rows:
            assert lab == mnist.y_train[j]
        if kind == "helpful":
            # most helpful (most negative) first
            assert (iup < 0).all() and (np.diff(iup) >= 0).all()
        else:
            assert (iup > 0).all() and (np.diff(iup) <= 0).all()

    # the test point: the first misclassified one, really misclassified, with the right P(y=+1)
    m = re.search(
        r"test point (\d+) \(first misclassified\): true label ([+-]1).*P\(y=\+1\) = ([0-9.]+)",
        text,
    )
    assert m, text
    i, y_i, p = int(m.group(1)), int(m.group(2)), float(m.group(3))
    scores = mnist.x_test.astype(np.float64) @ reference["w"]
    wrong = np.flatnonzero(np.where(scores > 0, 1, -1) != mnist.y_test)
    assert i == wrong[0] and y_i == mnist.y_test[i]
    assert (p > 0.5) != (y_i > 0)
    assert p == pytest.approx(scipy.special.expit(scores[i]), abs=1e-4)
    assert "MISCLASSIFIED" in text

    # the printed scores and rankings agree with the closed-form computation
    ref = _influence(reference, mnist.x_test[i].astype(np.float64), float(y_i))
    for kind, order in (("helpful", np.argsort(ref)[:5]), ("harmful", np.argsort(-ref)[:5])):
        rows = tables[kind]
        assert [r[1] for r in rows] == order.tolist()
        np.testing.assert_allclose([r[3] for r in rows], ref[order], rtol=1e-3)


def test_explain_prints_solver_and_loo(explain_run) -> None:
    text = explain_run["out"]
    assert re.search(r"solver\s+cg \(rtol=1e-08", text)
    residual = float(re.search(r"residual\s+(\S+)", text).group(1))
    iterations = int(re.search(r"iterations\s+(\d+)", text).group(1))
    solve_s, fit_s = (
        float(v) for v in re.search(r"seconds\s+(\S+) solve, (\S+) fit", text).groups()
    )
    assert 0 <= residual < 1e-6 and iterations > 0 and solve_s > 0 and fit_s > 0
    assert "leave-one-out retraining on the 5 most influential points" in text
    m = re.search(r"Pearson (\S+)\s+Spearman (\S+)\s+slope (\S+)", text)
    pearson, spearman, slope = (float(v) for v in m.groups())
    assert pearson > 0.95 and spearman > 0.5 and 0.8 < slope < 1.25  # Koh & Liang Fig. 2: R ≈ 1
    assert "figure written to" in text


def test_explain_writes_png(explain_run) -> None:
    png = explain_run["png"]
    assert png.is_file() and str(png) in explain_run["out"]
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and 350 < img.shape[0] < 1200 and 1000 < img.shape[1] < 2500
    assert img[..., :3].std() > 0.05  # not blank


def _small_npz(
    path: Path, mnist, *, labels01: bool = True, n_train: int = 600, n_test: int = 200
) -> Path:
    """A tiny 14×14 uint8 version of the bundled data with {0, 1} labels."""

    def shrink(x):
        img = (x.reshape(-1, 28, 28) * 255).round().astype(np.uint8)
        return img.reshape(-1, 14, 2, 14, 2).max(axis=(2, 4))

    lab = (lambda y: (y > 0).astype(np.int64)) if labels01 else (lambda y: y)
    np.savez(
        path,
        x_train=shrink(mnist.x_train[:n_train]),
        y_train=lab(mnist.y_train[:n_train]),
        x_test=shrink(mnist.x_test[:n_test]),
        y_test=lab(mnist.y_test[:n_test]),
    )
    return path


def test_explain_custom_npz_direct_without_loo(tmp_path, capsys, mnist) -> None:
    data = _small_npz(tmp_path / "small.npz", mnist)
    out = tmp_path / "e.png"
    rc = main(
        [
            "explain",
            "--data",
            str(data),
            "--solver",
            "direct",
            "--test-index",
            "3",
            "--top",
            "3",
            "--loo-k",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "600 training / 200 test points, 196 features" in cap.out
    assert "test point 3 (" in cap.out and "solver      direct" in cap.out
    tables = _tables(cap.out)
    assert len(tables["helpful"]) == len(tables["harmful"]) == 3
    for rows in tables.values():
        for _, j, lab, iup, rem in rows:
            assert lab == mnist.y_train[j]  # {0, 1} → {−1, +1}
            assert rem == pytest.approx(-iup / 600, rel=2e-4)
    assert "leave-one-out" not in cap.out
    assert matplotlib.image.imread(out).shape[0] > 300


def test_explain_check_accuracy_measures_an_approximate_solver(tmp_path, capsys, mnist) -> None:
    """--check-accuracy prints the approximation's Spearman against CG (and the report shows it);
    without it, an approximate solver's diagnostics say its accuracy was not estimated."""
    data = _small_npz(tmp_path / "small.npz", mnist)
    argv = [
        "explain",
        "--data",
        str(data),
        "--solver",
        "ekfac",
        "--damping",
        "0.01",
        "--test-index",
        "3",
        "--loo-k",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "e.png"),
    ]
    assert main(argv) == 0
    assert "accuracy    not estimated" in capsys.readouterr().out
    report = tmp_path / "r.html"
    assert main([*argv, "--check-accuracy", "--report", str(report)]) == 0
    line = next(
        ln
        for ln in capsys.readouterr().out.splitlines()
        if ln.strip().startswith("accuracy    Spearman")
    )
    rho = float(line.split("Spearman")[1].split()[0])
    assert 0.5 < rho <= 1.0  # EK-FAC of a linear model's Gauss–Newton matrix ranks much like CG
    assert 'id="diag-accuracy-spearman"' in report.read_text()


def test_explain_store_resumes_and_refuses_other_settings(tmp_path, capsys, mnist) -> None:
    data = _small_npz(tmp_path / "small.npz", mnist)
    store = tmp_path / "store"
    argv = [
        "explain",
        "--data",
        str(data),
        "--test-index",
        "3",
        "--top",
        "3",
        "--loo-k",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "e.png"),
        "--store",
        str(store),
    ]
    assert main(argv) == 0
    first = _tables(capsys.readouterr().out)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest  # the store was written
    assert main(argv) == 0  # the rerun reads s_test and the chunks back
    assert _tables(capsys.readouterr().out) == first
    assert main([*argv, "--l2", "0.02"]) == 2  # another l2 is another computation: refused, named
    err = capsys.readouterr().err
    assert "l2" in err and "overwrite=True" in err
    # the leave-one-out retrainings are kept in DIR/leave_one_out and read back by the rerun
    loo = [*argv, "--loo-k", "4"]
    assert main(loo) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "Pearson" in ln]
    assert (store / "leave_one_out" / "manifest.json").is_file()
    assert main(loo) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if "Pearson" in ln] == line and line
    assert "4 of 4 retrainings read from" in out


def test_explain_unreachable_scheduler_is_a_clear_error(tmp_path, capsys, mnist) -> None:
    pytest.importorskip("distributed")
    data = _small_npz(tmp_path / "small.npz", mnist)
    rc = main(
        [
            "explain",
            "--data",
            str(data),
            "--loo-k",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "e.png"),
            "--scheduler",
            "tcp://127.0.0.1:9",
        ]
    )
    assert rc == 2
    assert "Could not reach the Dask scheduler" in capsys.readouterr().err


@pytest.mark.parametrize("index", ["2100", "-1", "99999"])
def test_out_of_range_test_index(index, capsys, tmp_path) -> None:
    rc = main(["explain", "--test-index", index, "--no-progress", "--out", str(tmp_path / "x.png")])
    cap = capsys.readouterr()
    assert rc == 2
    assert (
        cap.err.startswith("upweight: error: --test-index")
        and "out of range" in cap.err
        and "2099" in cap.err
    )
    assert "Traceback" not in cap.err
    assert not (tmp_path / "x.png").exists()


def test_bad_data_files(capsys, tmp_path, mnist) -> None:
    rc = main(["explain", "--data", str(tmp_path / "missing.npz"), "--no-progress"])
    assert rc == 2 and "error: --data" in capsys.readouterr().err
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((3, 4)), y_train=np.ones(3))
    rc = main(["explain", "--data", str(tmp_path / "partial.npz"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "lacks array(s) x_test, y_test" in err
    np.savez(
        tmp_path / "fractional.npz",
        x_train=np.zeros((3, 4)),
        y_train=np.array([0.0, 1.5, 2.0]),
        x_test=np.zeros((2, 4)),
        y_test=np.array([0, 1]),
    )
    rc = main(
        [
            "explain",
            "--data",
            str(tmp_path / "fractional.npz"),
            "--no-progress",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "labels must be integers" in err and "1.5" in err and "--model" in err
    assert not (tmp_path / "x.png").exists()


def test_library_errors_become_messages(capsys, tmp_path, mnist) -> None:
    """An error raised deep in the library (an inaccurate LiSSA solve) is one line, exit code 2."""
    data = _small_npz(tmp_path / "small.npz", mnist, labels01=False)
    rc = main(
        [
            "explain",
            "--data",
            str(data),
            "--solver",
            "lissa",
            "--lissa-depth",
            "2",
            "--lissa-repeats",
            "1",
            "--max-residual",
            "0.01",
            "--test-index",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    # LiSSA's own warning on its truncated series may come first, one line too
    error = [line for line in err.splitlines() if line.startswith("upweight: error:")]
    assert len(error) == 1 and error[0].startswith("upweight: error: The lissa solve is inaccurate")
    assert "--lissa-depth" in error[0]
    assert all(line.startswith(("upweight: error:", "warning:")) for line in err.splitlines())
    assert "Traceback" not in err


def test_usage_errors(capsys) -> None:
    assert main(["explain", "--solver", "newton"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["explain", "--damping", "-1"]) == 2
    assert "--damping" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["explain", "--help"]) == 0
    help_text = capsys.readouterr().out
    for opt in (
        "--solver",
        "--damping",
        "--l2",
        "--test-index",
        "--top",
        "--loo-k",
        "--out",
        "--data",
        "--no-progress",
    ):
        assert opt in help_text


def test_python_dash_m(tmp_path) -> None:
    # the child imports the same upweight as this test (a relative PYTHONPATH would not survive
    # cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(upweight.__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "upweight", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("upweight ")
    proc = subprocess.run(
        [sys.executable, "-m", "upweight", "explain", "--test-index", "5000", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(
        "upweight: error: --test-index 5000 is out of range"
    )


@pytest.mark.parametrize("solver", ["nystrom-cg", "kfac-cg"])
def test_explain_preconditioned_cg_gives_directs_answer(tmp_path, capsys, mnist, solver) -> None:
    """The preconditioned CG choices are exact solvers: the same tables as Direct's (float64
    Cholesky)."""
    data = _small_npz(tmp_path / "small.npz", mnist)
    tables = {}
    for s in ("direct", solver):
        rc = main(
            [
                "explain",
                "--data",
                str(data),
                "--solver",
                s,
                "--test-index",
                "3",
                "--top",
                "3",
                "--loo-k",
                "0",
                "--no-progress",
                "--out",
                str(tmp_path / f"{s}.png"),
            ]
        )
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        tables[s] = _tables(cap.out)
    for kind in ("helpful", "harmful"):
        for a, b in zip(tables["direct"][kind], tables[solver][kind], strict=True):
            assert a[1] == b[1]
            assert b[3] == pytest.approx(a[3], rel=1e-4)
