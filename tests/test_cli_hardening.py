"""The command line never loses work and never answers a user error with a traceback.

Everything runs through the real entry point, ``upweight.cli.main.main`` (plus ``python -m
upweight`` in a subprocess): bad output paths are refused before any training, figures, reports
and results are written atomically, every user error is one ``upweight: error:`` line with exit
status 2 while a bug keeps its traceback (exit 1), ``explain --fresh`` starts a store over, an
``--out`` without a suffix becomes a PNG, and data files that are not .npz archives (or hold
pickled objects) get a message about what they are — without being unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import upweight
from upweight import errors
from upweight.cli import main as cli_main
from upweight.cli.main import main
from upweight.datasets import load_enron, load_hospital, load_mnist
from upweight.paper.cli import experiments
from upweight.report import new_figure, save_figure
from upweight.report.html import ReportTest, explain_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ── helpers ───────────────────────────────────────────────────────────────────────────


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` → (exit status, stdout, stderr); a ``SystemExit`` counts as its code."""
    try:
        rc = main(argv)
    # the entry point returns its status; this keeps the test honest if it exits
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert err.startswith("upweight: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    for w in words:
        assert w in err, (w, err)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def tiny_npz(path: Path, n: int = 60, n_test: int = 12, d: int = 16, seed: int = 0) -> Path:
    """A small binary problem (labels 0/1 with some noise): 16 tabular features."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n + n_test, d))
    y = ((x @ w + rng.normal(scale=1.5, size=n + n_test)) > 0).astype(np.int64)
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    return path


FAST = ["--solver", "direct", "--test-index", "0", "--top", "2", "--loo-k", "0", "--no-progress"]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test (through the recorded calls) if explain trains or a reproduce
    experiment runs."""
    calls: list[str] = []

    def refit(*args, **kwargs):
        calls.append("upweight.refit")
        raise AssertionError("training started although an argument was bad")

    monkeypatch.setattr(upweight, "refit", refit)
    for mod in experiments():

        def fake_run(args, out, _name=mod.NAME):
            calls.append(f"reproduce {_name}")
            raise AssertionError("the experiment ran although an argument was bad")

        monkeypatch.setattr(mod, "run", fake_run)
    return calls


class _RunsCode:
    """Unpickling this creates ``marker``: proof that a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled_npz(path: Path, marker: Path, names=("x_train", "y_train", "x_test", "y_test")) -> Path:
    arrays = {k: np.zeros((3, 4)) for k in names}
    arrays[names[0]] = np.array([_RunsCode(marker), 1, 2], dtype=object)
    np.savez(path, **arrays)  # np.savez pickles object arrays
    return path


# ── 1. every output path is checked before any work ───────────────────────────────────


def _bad_explain_path(case: str, tmp: Path, monkeypatch) -> tuple[list[str], list[str]]:
    (tmp / "file.txt").write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "dir.html").mkdir()
    (tmp / "store").mkdir()
    (tmp / "store" / "leave_one_out").write_text("x")
    ok = str(tmp / "e.png")
    if case == "readonly":
        (tmp / "ro").mkdir()
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, *a, **k: Path(p) != tmp / "ro" and real(p, mode, *a, **k)
        )
    return {
        "out_folder": (
            ["--out", str(tmp / "adir")],
            ["--out", "that is a folder", "adir/explain.png"],
        ),
        "out_trailing_sep": (
            ["--out", str(tmp / "new") + os.sep],
            ["--out", "that names a folder"],
        ),
        "out_under_file": (
            ["--out", str(tmp / "file.txt" / "sub" / "e.png")],
            ["--out", "is a file, not a folder"],
        ),
        "out_bad_suffix": (
            ["--out", str(tmp / "e.xyz")],
            ["--out", "'.xyz'", ".png", ".pdf", ".svg"],
        ),
        "readonly": (
            ["--out", str(tmp / "ro" / "e.png")],
            ["--out", "no permission to write in", "choose another"],
        ),
        "report_suffix": (
            ["--out", ok, "--report", str(tmp / "r.txt")],
            ["--report", ".html or .htm"],
        ),
        "report_folder": (
            ["--out", ok, "--report", str(tmp / "dir.html")],
            ["--report", "that is a folder"],
        ),
        "report_under_file": (
            ["--out", ok, "--report", str(tmp / "file.txt" / "r.html")],
            ["--report", "is a file, not a folder"],
        ),
        "store_is_file": (
            ["--out", ok, "--store", str(tmp / "file.txt")],
            ["--store", "a folder is needed"],
        ),
        "store_under_file": (
            ["--out", ok, "--store", str(tmp / "file.txt" / "s")],
            ["--store", "is a file, not a folder"],
        ),
        "store_loo_is_file": (
            ["--out", ok, "--store", str(tmp / "store")],
            ["--store", "leave_one_out is a file"],
        ),
        "fresh_without_store": (["--out", ok, "--fresh"], ["--fresh", "no --store was given"]),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "out_folder",
        "out_trailing_sep",
        "out_under_file",
        "out_bad_suffix",
        "readonly",
        "report_suffix",
        "report_folder",
        "report_under_file",
        "store_is_file",
        "store_under_file",
        "store_loo_is_file",
        "fresh_without_store",
    ],
)
def test_explain_refuses_a_bad_output_path_before_training(
    case, tmp_path, capsys, monkeypatch, no_training
) -> None:
    args, words = _bad_explain_path(case, tmp_path, monkeypatch)
    before = files_under(tmp_path)
    rc, out, err = run(
        ["explain", "--data", str(tiny_npz(tmp_path / "d.npz")), *FAST, *args], capsys
    )
    assert_one_line_error(rc, err, *words)
    assert out == ""  # refused before the data were even loaded
    assert no_training == []
    assert files_under(tmp_path) == before | {"d.npz"}  # nothing written


@pytest.mark.parametrize("mod", experiments(), ids=lambda m: m.NAME)
def test_reproduce_refuses_a_bad_out_before_running(mod, tmp_path, capsys, no_training) -> None:
    (tmp_path / "file.txt").write_text("x")
    before = files_under(tmp_path)
    rc, out, err = run(
        ["reproduce", mod.NAME, "--data", "bundled", "--out", str(tmp_path / "file.txt")], capsys
    )
    assert_one_line_error(rc, err, "--out", "file.txt", "a folder is needed")
    taken = tmp_path / "taken"
    (taken / mod.OUTPUTS[0]).mkdir(parents=True)  # a folder where the figure is to go
    rc, out2, err = run(["reproduce", mod.NAME, "--data", "bundled", "--out", str(taken)], capsys)
    assert_one_line_error(rc, err, "--out", mod.OUTPUTS[0], "is a folder")
    assert out == out2 == "" and no_training == []
    assert files_under(tmp_path) == before | {"taken", f"taken/{mod.OUTPUTS[0]}"}


def test_reproduce_fig2_refuses_a_file_where_its_retrainings_go(
    tmp_path, capsys, no_training
) -> None:
    (tmp_path / "retrainings").write_text("not a folder")
    rc, _, err = run(["reproduce", "fig2", "--data", "bundled", "--out", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "retrainings is a file")
    assert no_training == [] and files_under(tmp_path) == {"retrainings"}


def test_reproduce_fig2_refuses_an_unreadable_merge_before_loading_data(tmp_path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text("{half a json")
    rc, out, err = run(
        [
            "reproduce",
            "fig2",
            "--data",
            str(tmp_path / "mnist"),
            "--out",
            str(tmp_path / "o"),
            "--merge",
            str(other),
        ],
        capsys,
    )
    assert_one_line_error(
        rc, err, "--merge", "is not a results.json written by fig2", "finished fig2 run"
    )
    assert out == "" and os.listdir(tmp_path / "o") == []


# ── 2. figures, reports and results are written atomically ────────────────────────────


def _full_disk_after(nbytes: int):
    """A ``savefig`` that writes ``nbytes`` and then fails as a full disk does."""

    def savefig(self, fh, **kwargs):
        fh.write(b"\x89PNG partial" + b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return savefig


@pytest.mark.parametrize("existing", [False, True])
def test_save_figure_on_a_full_disk_leaves_no_partial_file(existing, tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    target = tmp_path / "fig.png"
    if existing:
        target.write_bytes(b"previous figure")
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    monkeypatch.setattr(Figure, "savefig", _full_disk_after(4096))
    with pytest.raises(OSError) as info:
        save_figure(fig, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert os.listdir(tmp_path) == (["fig.png"] if existing else [])  # no temporary file left
    if existing:
        assert target.read_bytes() == b"previous figure"
    monkeypatch.undo()
    assert save_figure(fig, target) == target and target.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path) == ["fig.png"]


def test_write_report_on_a_full_disk_leaves_no_partial_page(tmp_path, monkeypatch) -> None:
    page = explain_report(
        title="t",
        test=ReportTest(index=0, true_label="+1", predicted_label="+1", loss=0.1),
        helpful=[],
        harmful=[],
        provenance={},
        n_train=3,
    )
    target = tmp_path / "r.html"
    target.write_text("previous page")

    def fsync(fd):  # the bytes went to the temporary file; the disk is found full at fsync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(
        errors.InputError, match=r"r\.html: cannot write it \(No space left on device\).*disk space"
    ):
        write_report(page, target)
    assert os.listdir(tmp_path) == ["r.html"] and target.read_text() == "previous page"
    new = tmp_path / "sub" / "new.htm"
    with pytest.raises(errors.InputError):
        write_report(page, new)
    assert not new.exists() and os.listdir(tmp_path / "sub") == []


def test_explain_on_a_full_disk_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
) -> None:
    data = tiny_npz(tmp_path / "d.npz")
    out = tmp_path / "figs" / "e.png"

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    rc, stdout, err = run(
        [
            "explain",
            "--data",
            str(data),
            *FAST,
            "--out",
            str(out),
            "--report",
            str(tmp_path / "figs" / "r.html"),
        ],
        capsys,
    )
    assert_one_line_error(rc, err, "No space left on device", str(out), "free some disk space")
    assert "test point 0" in stdout  # it failed at the end, when writing
    assert os.listdir(tmp_path / "figs") == []  # no figure, no report, no temporary file


def test_reproduce_writes_results_atomically(tmp_path, capsys, monkeypatch) -> None:
    mod = next(m for m in experiments() if m.NAME == "fig1")

    def fake_run(args, out):
        from upweight.report._files import write_text_atomic

        write_text_atomic(out / "report.md", "# report\n")
        return {"answer": np.float64(4.5)}

    monkeypatch.setattr(mod, "run", fake_run)
    out = tmp_path / "o"
    rc, stdout, err = run(["reproduce", "fig1", "--data", "bundled", "--out", str(out)], capsys)
    assert rc == 0, err
    assert json.loads((out / "results.json").read_text())["answer"] == 4.5
    assert (
        sorted(os.listdir(out)) == ["report.md", "results.json"]
        and "wrote report.md, results.json" in stdout
    )

    full = []

    def fake_run_then_full_disk(args, out):
        result = fake_run(args, out)  # report.md goes through; results.json finds the disk full
        full.append(True)
        return result

    real_fsync = os.fsync

    def fsync(fd):
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(mod, "run", fake_run_then_full_disk)
    monkeypatch.setattr(os, "fsync", fsync)
    (out / "results.json").write_text('{"previous": true}')
    rc, _, err = run(["reproduce", "fig1", "--data", "bundled", "--out", str(out)], capsys)
    assert_one_line_error(rc, err, "No space left on device", "results.json")
    assert json.loads((out / "results.json").read_text()) == {"previous": True}
    assert sorted(os.listdir(out)) == ["report.md", "results.json"]


# ── 3. one-line errors, exit status 2, in one place; bugs keep their traceback ────────


@pytest.mark.parametrize(
    "exc, words",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/out/e.png"),
            ["Permission denied", "/data/out/e.png", "choose a place you may write to"],
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            ["No space left on device", "free some disk space"],
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/x.npz"),
            ["No such file or directory", "/nowhere/x.npz", "check the path"],
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/d/.e.png.123.0123abcd.tmp"),
            ["(/d/e.png)"],
        ),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), ["Broken pipe", "output was closed"]),
        (errors.InputError("bad input\nsecond line"), ["bad input second line"]),
        (errors.DtypeError("float labels"), ["float labels"]),
        (errors.StoreError("manifest unreadable"), ["manifest unreadable"]),
        (errors.StoreMismatchError("other computation"), ["other computation"]),
        (errors.ExecutorConnectionError("cannot reach tcp://h:1"), ["cannot reach tcp://h:1"]),
        (errors.InaccurateSolveError("residual 0.5"), ["residual 0.5", "--on-inaccurate warn"]),
        (errors.NotPositiveDefiniteError("not PD", -1.0, 0.5), ["not PD", "--damping"]),
        (errors.InsufficientMemoryError("needs 9 GiB"), ["needs 9 GiB"]),
        (errors.DivergenceError("LiSSA diverged"), ["LiSSA diverged"]),
        (
            ModuleNotFoundError("No module named 'distributed'", name="distributed"),
            ["'distributed'", "upweight[dask]"],
        ),
        (
            ModuleNotFoundError("No module named 'sklearn'", name="sklearn"),
            ["'sklearn'", "upweight[sklearn]"],
        ),
    ],
)
def test_user_errors_are_one_line(exc, words, capsys, monkeypatch) -> None:
    def fail(args, stack):
        raise exc

    monkeypatch.setattr(cli_main, "_explain_in", fail)
    rc, out, err = run(["explain"], capsys)
    assert_one_line_error(rc, err, *words)
    assert out == ""


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("boom"),
        TypeError("boom"),
        KeyError("boom"),
        ValueError("boom"),
        ImportError("cannot import name 'x' from 'upweight.core'", name="upweight.core"),
    ],
)
def test_bugs_keep_their_traceback(exc, capsys, monkeypatch) -> None:
    def fail(args, stack):
        raise exc

    monkeypatch.setattr(cli_main, "_explain_in", fail)
    rc, _, err = run(["explain"], capsys)
    assert rc == 1
    assert err.startswith("Traceback (most recent call last)") and f"{type(exc).__name__}: " in err
    assert f"upweight: internal error ({type(exc).__name__}): this is a bug in upweight" in err
    assert "upweight: error:" not in err


@pytest.mark.parametrize(
    "address, words",
    [
        ("nonsense::", ["'nonsense:' is not a host name"]),
        ("tcp://", ["no host"]),
        ("tcp://127.0.0.1:70000", ["port 70000 is out of range"]),
        ("tcp://127.0.0.1:0", ["port 0 is out of range"]),
        ("tcp://scheduler", ["no port"]),
        ("tcp://h:port", ["'port' is not a number"]),
        ("udp://h:8786", ["unknown scheme 'udp'"]),
        ("[::1:8786", ["[ADDRESS]:PORT"]),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["explain"],
        ["reproduce", "fig2", "--data", "bundled"],
        ["reproduce", "attack", "--data", "bundled"],
    ],
    ids=lambda c: c[-3] if len(c) > 1 else c[0],
)
def test_bad_scheduler_address_before_any_work(
    address, words, command, tmp_path, capsys, no_training
) -> None:
    rc, out, err = run(
        [
            *command,
            "--out",
            str(tmp_path / ("e.png" if command == ["explain"] else "o")),
            "--scheduler",
            address,
        ],
        capsys,
    )
    assert_one_line_error(rc, err, "--scheduler", repr(address), "tcp://127.0.0.1:8786", *words)
    assert out == "" and no_training == [] and os.listdir(tmp_path) == []


def test_missing_dask_is_one_line_before_training(
    tmp_path, capsys, monkeypatch, no_training
) -> None:
    # `import distributed` fails as if not installed
    monkeypatch.setitem(sys.modules, "distributed", None)
    for argv in (
        ["explain", "--out", str(tmp_path / "e.png")],
        ["reproduce", "fig2", "--data", "bundled", "--out", str(tmp_path / "o")],
    ):
        rc, out, err = run([*argv, "--scheduler", "local"], capsys)
        assert_one_line_error(
            rc, err, "'distributed'", "not installed", "pip install 'upweight[dask]'"
        )
        assert out == ""
    assert no_training == [] and os.listdir(tmp_path) == []


def test_missing_scikit_learn_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] or [
        "sklearn"
    ]:
        monkeypatch.setitem(sys.modules, name, None)
    rc, _, err = run(
        [
            "reproduce",
            "mislabel",
            "--data",
            str(tmp_path / "enron1.csv"),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert_one_line_error(rc, err, "'sklearn'", "pip install 'upweight[sklearn]'")
    assert os.listdir(tmp_path / "o") == []


def test_missing_data_files_are_one_line(tmp_path, capsys) -> None:
    rc, _, err = run(
        ["explain", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "e.png")], capsys
    )
    assert_one_line_error(rc, err, "--data", "none.npz", "no such file", "x_train")
    rc, _, err = run(["explain", "--data", str(tmp_path), "--out", str(tmp_path / "e.png")], capsys)
    assert_one_line_error(rc, err, "--data", "that is a folder, not a file")
    rc, _, err = run(
        ["reproduce", "fig1", "--data", str(tmp_path / "mnist"), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert_one_line_error(rc, err, "load_mnist", "no such file or folder", "IDX files")
    assert not (tmp_path / "e.png").exists() and os.listdir(tmp_path / "o") == []


def test_python_dash_m_errors_are_one_line(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(upweight.__file__).resolve().parents[1])}
    csv = tmp_path / "data.csv"
    csv.write_text("a,b,c\n1,2,3\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "upweight",
            "explain",
            "--no-progress",
            "--data",
            str(csv),
            "--out",
            str(tmp_path / "e.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "--data", "'a,b,c'", "x_train")
    assert "allow_pickle" not in proc.stderr and proc.stdout == ""
    assert os.listdir(tmp_path) == ["data.csv"]


# ── 4. explain --fresh ────────────────────────────────────────────────────────────────


def test_explain_fresh_discards_the_store(tmp_path, capsys) -> None:
    data = tiny_npz(tmp_path / "d.npz")
    store = tmp_path / "store"
    base = [
        "explain",
        "--data",
        str(data),
        *FAST[:-3],
        "--loo-k",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "e.png"),
        "--store",
        str(store),
    ]
    rc, _, err = run(base, capsys)
    assert rc == 0, err
    (store / "notes.txt").write_text("mine")  # not upweight's: --fresh must leave it alone
    rc, _, err = run([*base, "--l2", "0.02"], capsys)
    assert_one_line_error(rc, err, "l2", "rerun with --fresh", f"--store {store}")
    rc, out, err = run([*base, "--l2", "0.02", "--fresh"], capsys)
    assert rc == 0, err
    assert "read from" not in out  # nothing resumed: started over
    assert (
        json.loads((store / "manifest.json").read_text())["fingerprint"]["objective"]["l2"] == 0.02
    )
    assert (store / "notes.txt").read_text() == "mine"
    rc, out, err = run([*base, "--l2", "0.02"], capsys)  # without --fresh the new store resumes
    assert rc == 0, err
    assert "2 of 2 retrainings read from" in out


def test_explain_unreadable_store_before_training(tmp_path, capsys, no_training) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{broken")
    rc, out, err = run(["explain", "--out", str(tmp_path / "e.png"), "--store", str(store)], capsys)
    assert_one_line_error(
        rc, err, "manifest", "cannot be read", "pass another --store", f"move {store} away"
    )
    assert (
        out == ""
        and no_training == []
        and files_under(tmp_path) == {"store", "store/manifest.json"}
    )
    assert (store / "manifest.json").read_text() == "{broken"


# ── 5. --out without a suffix ─────────────────────────────────────────────────────────


def test_out_without_suffix_writes_a_png_and_says_so(tmp_path, capsys, monkeypatch) -> None:
    data = tiny_npz(tmp_path / "d.npz")
    rc, out, err = run(
        ["explain", "--data", str(data), *FAST, "--out", str(tmp_path / "out" / "explain")], capsys
    )
    assert rc == 0, err
    png = tmp_path / "out" / "explain.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (
        f"figure written to {png} (--out {tmp_path / 'out' / 'explain'} has no suffix: a PNG)"
        in out
    )
    assert os.listdir(tmp_path / "out") == ["explain.png"]
    rc, out, err = run(
        ["explain", "--data", str(data), *FAST, "--out", str(tmp_path / "out" / "e.pdf")], capsys
    )
    assert rc == 0, err
    assert (tmp_path / "out" / "e.pdf").read_bytes()[:5] == b"%PDF-"
    assert f"figure written to {tmp_path / 'out' / 'e.pdf'}\n" in out
    # a relative --out with ./ is written as given, and not taken for a name without suffix
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["explain", "--data", str(data), *FAST, "--out", "./out/e.svg"], capsys)
    assert rc == 0, err
    assert "figure written to out/e.svg\n" in out and (
        tmp_path / "out" / "e.svg"
    ).read_text().startswith("<?xml")


# ── 6. data files that are not .npz archives ──────────────────────────────────────────


def _not_npz_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    csv = tmp / "table.csv"
    csv.write_text("a,b,c\n1,2,3\n")
    txt = tmp / "notes.npz"
    txt.write_text("hello world\nsecond line\n")
    return {
        "csv": (csv, "it is text starting with 'a,b,c'"),
        "text": (txt, "it is text starting with 'hello world'"),
    }


def test_explain_describes_files_that_are_not_npz(tmp_path, capsys, no_training) -> None:
    for path, looks in _not_npz_files(tmp_path).values():
        rc, _, err = run(["explain", "--data", str(path), "--out", str(tmp_path / "e.png")], capsys)
        assert_one_line_error(
            rc,
            err,
            "--data",
            str(path),
            "as an .npz archive",
            looks,
            "x_train, y_train, x_test, y_test",
            "bundled",
        )
        assert "allow_pickle" not in err and "trust" not in err
    assert no_training == [] and not (tmp_path / "e.png").exists()


def test_explain_refuses_pickled_arrays_without_unpickling(tmp_path, capsys, no_training) -> None:
    marker = tmp_path / "code-ran"
    data = pickled_npz(tmp_path / "evil.npz", marker)
    rc, _, err = run(["explain", "--data", str(data), "--out", str(tmp_path / "e.png")], capsys)
    assert_one_line_error(
        rc, err, "--data", "Python objects (x_train)", "does not load", "np.savez"
    )
    assert "allow_pickle" not in err
    assert not marker.exists() and no_training == []
    # the payload is live: x_train is a pickled object array whose stream names the marker file
    import zipfile

    raw = zipfile.ZipFile(data).read("x_train.npy")
    # a pickle stream that reaches the marker
    assert b"'descr': '|O'" in raw and marker.name.encode() in raw


@pytest.mark.parametrize(
    "loader, names, expected",
    [
        (load_mnist, ("x_train", "y_train", "x_test", "y_test"), "four MNIST IDX files"),
        (
            load_hospital,
            ("X_train", "y_train", "X_test", "y_test", "train_rows", "test_rows", "feature_names"),
            "hospital_koh2017.npz",
        ),
    ],
)
def test_dataset_loaders_describe_files_that_are_not_npz(loader, names, expected, tmp_path) -> None:
    for path, looks in _not_npz_files(tmp_path).values():
        target = path.with_suffix(".npz")  # load_hospital picks the format by name: an .npz
        if target != path:
            path.rename(target)
        with pytest.raises(errors.InputError) as info:
            loader(target)
        msg = str(info.value)
        assert "as an .npz archive" in msg and looks in msg and expected in msg
        assert "allow_pickle" not in msg and "trust" not in msg
    marker = tmp_path / "code-ran"
    with pytest.raises(errors.InputError, match=rf"Python objects \({names[0]}\).*does not load"):
        loader(pickled_npz(tmp_path / "evil.npz", marker, names))
    assert not marker.exists()
    with pytest.raises(errors.InputError, match="no such file or folder"):
        loader(tmp_path / "missing.npz")


def test_load_enron_never_opens_an_npz(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    with pytest.raises(errors.InputError, match="cannot tell the format"):
        load_enron(pickled_npz(tmp_path / "evil.npz", marker))
    assert not marker.exists()
