"""Hardening of ``upweight.store``: confinement to the store folder, unreadable manifests, the
writer's lock, orphaned temporary files, memory, a writer killed by SIGKILL, and no unpickling.

Each test builds hostile or damaged folders on disk and checks the exact files that remain, the
exact values read back, or the error type and the words of its message.
"""

from __future__ import annotations

import ast
import fcntl
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import upweight as uw
import upweight.influence.engine as engine
from upweight.errors import InsufficientMemoryError, StoreError
from upweight.store import Store, _sha256_file, as_store

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
FP = {"what": "hardening", "l2": 0.1}


def make_victim(tmp_path: Path) -> Path:
    """A folder outside every store, holding a file named like a chunk and a user file."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "000000.npy").write_bytes(b"not yours")
    (victim / "keep.txt").write_text("precious")
    return victim


def assert_victim_intact(victim: Path) -> None:
    assert sorted(os.listdir(victim)) == ["000000.npy", "keep.txt"]
    assert (victim / "000000.npy").read_bytes() == b"not yours"
    assert (victim / "keep.txt").read_text() == "precious"


def write_manifest(folder: Path, arrays: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(
        json.dumps({"format": 1, "fingerprint": FP, "arrays": arrays, "created": 0.0})
    )


def entry(chunks: int = 0) -> dict:
    return {
        "shape": [4],
        "axis": 0,
        "chunk_size": 4,
        "dtype": "float64",
        "chunks": {str(i): {"sha256": "0" * 64} for i in range(chunks)},
        "meta": {},
    }


def lock_is_free(folder: Path) -> bool:
    """Whether a new open file description can take the flock of ``folder/.lock`` (flock locks of
    different descriptions conflict, in one process too)."""
    fd = os.open(folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing also drops the probe's own lock
    return True


def spawn(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


# ── 1. confinement ───────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("kind", ["parent", "absolute", "slash", "dotdot"])
def test_hostile_manifest_names_are_refused_and_overwrite_deletes_nothing_outside(
    tmp_path, caplog, kind
):
    victim = make_victim(tmp_path)
    folder = tmp_path / "deep" / "store"
    folder.mkdir(parents=True)
    (folder / "sub" / "inner").mkdir(parents=True)
    (folder / "sub" / "inner" / "000000.npy").write_bytes(b"user data")
    name = {
        "parent": "../../victim",
        "absolute": str(victim),
        "slash": "sub/inner",
        "dotdot": "..",
    }[kind]
    write_manifest(folder, {name: entry(chunks=1), "ok": entry()})

    with pytest.raises(StoreError) as err:
        Store.open(folder)
    msg = str(err.value)
    assert f"array name {name!r} is not an identifier" in msg and "overwrite=True" in msg

    with caplog.at_level(logging.WARNING, logger="upweight"):
        s = Store(folder, overwrite=True)
        s.bind(FP)
    s.clear()
    s.close()
    assert_victim_intact(victim)
    assert (folder / "sub" / "inner" / "000000.npy").read_bytes() == b"user data"
    assert "discarded its manifest" in caplog.text and "left the folders sub alone" in caplog.text
    assert sorted(os.listdir(folder)) == [".lock", "sub"]


def test_symlinked_array_folder_is_neither_followed_nor_written_through(tmp_path, caplog):
    victim = make_victim(tmp_path)
    folder = tmp_path / "store"
    with Store(folder) as s:
        s.bind(FP)
        s.chunked("scores", shape=(2, 4), axis=1, chunk_size=2, dtype="float64").write(
            0, np.ones((2, 2))
        )
    # the array folder is swapped for a link to the victim (the manifest stays valid)
    for f in (folder / "scores").iterdir():
        f.unlink()
    (folder / "scores").rmdir()
    (folder / "scores").symlink_to(victim, target_is_directory=True)

    with pytest.raises(
        StoreError,
        match=r"scores is a symbolic link; the store keeps array 'scores' only in a folder",
    ):
        Store.open(folder).get("scores")  # not read through the link either
    with caplog.at_level(logging.WARNING, logger="upweight"):
        s = Store(folder, overwrite=True)
        s.bind(FP)
    assert_victim_intact(victim)
    assert (folder / "scores").is_symlink() and "'scores' is a symbolic link" in caplog.text
    with pytest.raises(
        StoreError,
        match=r"scores is a symbolic link; the store keeps array 'scores' only in a folder",
    ):
        s.chunked("scores", shape=(2, 4), axis=1, chunk_size=2, dtype="float64")
    with pytest.raises(StoreError, match="scores is a symbolic link"):
        s.put("scores", np.zeros(3))
    s.close()
    assert_victim_intact(victim)


def test_a_chunk_file_that_is_a_symbolic_link_is_recomputed_not_read(tmp_path, caplog):
    folder = tmp_path / "store"
    with Store(folder) as s:
        s.bind(FP)
        a = s.chunked("x", shape=(4,), axis=0, chunk_size=2, dtype="float64")
        a.write(0, np.array([1.0, 2.0]))
        a.write(1, np.array([3.0, 4.0]))
    # chunk 1 swapped for a link to an identical file outside the store: its checksum still matches
    outside = tmp_path / "outside.npy"
    shutil.copy(folder / "x" / "000001.npy", outside)
    before = outside.read_bytes()
    (folder / "x" / "000001.npy").unlink()
    (folder / "x" / "000001.npy").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="upweight"), Store.open(folder) as s:
        a = s.chunked("x", shape=(4,), axis=0, chunk_size=2, dtype="float64")
        assert a.missing() == [1]
        a.write(1, np.array([3.0, 4.0]))
        assert a.assemble().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert "chunk 1 of 'x' is damaged (a symbolic link)" in caplog.text
    assert not (folder / "x" / "000001.npy").is_symlink() and outside.read_bytes() == before


def test_clear_deletes_only_the_files_the_store_wrote(tmp_path):
    folder = tmp_path / "store"
    s = Store(folder)
    s.bind(FP)
    a = s.chunked("a", shape=(6,), axis=0, chunk_size=2, dtype="float32")
    for i in range(3):
        a.write(i, np.full(2, i, dtype=np.float32))
    s.put("b", np.arange(5.0))
    (folder / "a.assembled.npy").write_bytes(b"x")
    (folder / "notes.txt").write_text("mine")
    (folder / "userdir").mkdir()
    (folder / "userdir" / "000000.npy").write_bytes(b"mine too")
    (folder / "a" / "notes.txt").write_text("mine")
    (folder / "a" / "0001.npy").write_bytes(b"not a store name")
    (folder / "a" / f".000007.npy.{os.getpid()}.abcdef12.tmp").write_bytes(b"store temp")
    s.clear()
    assert sorted(os.listdir(folder)) == [".lock", "a", "notes.txt", "userdir"]
    assert sorted(os.listdir(folder / "a")) == ["0001.npy", "notes.txt"]
    assert (folder / "userdir" / "000000.npy").read_bytes() == b"mine too"
    assert s.fingerprint is None
    with pytest.raises(StoreError, match="not bound to a computation yet"):
        s.get("b")
    s.close()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("shape", "x", "has shape 'x', not a list of sizes"),
        ("axis", 3, "has axis 3, not an axis of its shape [4]"),
        ("chunk_size", 0, "has chunk_size 0, not a positive integer"),
        ("dtype", "O", "has dtype 'O', not a numeric NumPy dtype"),
        ("chunks", {"../0": {"sha256": "0"}}, "lists its chunks as"),
        ("meta", [1], "has meta [1], not a JSON object"),
    ],
)
def test_malformed_manifest_entries_are_refused(tmp_path, field, value, words):
    folder = tmp_path / "store"
    write_manifest(folder, {"scores": {**entry(), field: value}})
    with pytest.raises(StoreError) as err:
        Store.open(folder)
    assert f"array 'scores' {words}" in str(err.value) and "overwrite=True" in str(err.value)


# ── 2. overwrite=True on an unusable manifest ────────────────────────────────────────────
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "cannot be read"),
        (b"\xff\xfe\x00garbage", "cannot be read"),
        (b"[1, 2]", "is not an upweight store manifest"),
        (b'{"format": 99, "fingerprint": {}, "arrays": {}}', "is not an upweight store manifest"),
    ],
)
def test_overwrite_discards_an_unreadable_manifest_and_leaves_unknown_folders(
    tmp_path, caplog, raw, words
):
    folder = tmp_path / "store"
    (folder / "old").mkdir(parents=True)
    (folder / "old" / "000000.npy").write_bytes(b"unknown owner")
    (folder / "manifest.json").write_bytes(raw)
    with pytest.raises(StoreError) as err:
        Store.open(folder)
    assert words in str(err.value) and "overwrite=True" in str(err.value)

    with caplog.at_level(logging.WARNING, logger="upweight"), Store(folder, overwrite=True) as s:
        s.bind(FP)
        s.put("v", np.arange(3.0))
    assert (
        "discarded its manifest" in caplog.text
        and words in caplog.text
        and "left the folders old alone" in caplog.text
    )
    assert (folder / "old" / "000000.npy").read_bytes() == b"unknown owner"
    with Store.open(folder) as again:
        assert again.fingerprint == FP
        value, meta = again.get("v")
    assert value.tolist() == [0.0, 1.0, 2.0] and meta == {}


# ── 3. a path that is a file ─────────────────────────────────────────────────────────────
def test_store_path_that_is_a_file_is_refused_before_any_work(tmp_path, small_logreg, monkeypatch):
    f = tmp_path / "results.txt"
    f.write_text("a file")
    with pytest.raises(StoreError, match=r"store='.*results\.txt' is a file; a store is a folder"):
        Store(f)
    with pytest.raises(
        StoreError,
        match=r"store='.*results\.txt/run' cannot be created: '.*results\.txt' is a file",
    ):
        as_store(str(f / "run"))
    model, l2, train, test = small_logreg
    inf = uw.Influence(
        uw.Objective(model, "logistic", l2=l2), solver=uw.Direct(), batch_size=80, progress=False
    ).fit(train)
    monkeypatch.setattr(
        uw.Influence,
        "s_test",
        lambda *a, **k: pytest.fail("s_test ran before the store was checked"),
    )
    monkeypatch.setattr(
        engine, "_up_loss_chunk", lambda *a: pytest.fail("a chunk ran before the store was checked")
    )
    with pytest.raises(StoreError, match=r"results\.txt' is a file"):
        inf.up_loss(test, store=f)
    assert f.read_text() == "a file"


# ── 4. orphaned temporary files ──────────────────────────────────────────────────────────
def test_orphaned_temp_files_are_removed_when_the_store_is_opened_for_writing(tmp_path):
    folder = tmp_path / "store"
    with Store(folder) as s:
        s.bind(FP)
        s.chunked("a", shape=(4,), axis=0, chunk_size=2, dtype="float64").write(0, np.ones(2))
    dead, me, alive = dead_pid(), os.getpid(), os.getppid()
    removed = [
        f".manifest.json.{dead}.deadbeef.tmp",
        f"a/.000001.npy.{dead}.0badc0de.tmp",
        # own pid, before the lock
        f".a.assembled.npy.{dead}.12345678.tmp",
        f".manifest.json.{me}.00000001.tmp",
    ]
    kept = [
        f".manifest.json.{alive}.feedface.tmp",  # a live process (e.g. assembling)
        f".manifest.json.{me}.00000002.tmp",  # this process, after the lock: in flight
        f".notes.txt.{dead}.deadbeef.tmp",
        f"a/.notes.{dead}.deadbeef.tmp",  # not store files
        ".manifest.json.bak",
        "notes.tmp",
    ]
    for name in removed + kept:
        (folder / name).write_bytes(b"partial")
    past = time.time() - 3600
    os.utime(folder / f".manifest.json.{me}.00000001.tmp", (past, past))
    future = time.time() + 3600
    os.utime(folder / f".manifest.json.{me}.00000002.tmp", (future, future))

    s = Store.open(folder)
    assert all((folder / n).exists() for n in removed)  # opening to read deletes nothing
    s.bind(FP)
    assert sorted(n for n in removed + kept if (folder / n).exists()) == sorted(kept)
    assert s.chunked("a", shape=(4,), axis=0, chunk_size=2, dtype="float64").missing() == [1]
    s.close()


# ── 5. one writer ────────────────────────────────────────────────────────────────────────
def test_lock_is_held_while_bound_and_released_by_close_with_and_gc(tmp_path):
    folder = tmp_path / "store"
    s = Store(folder)
    s.bind(FP)
    assert not lock_is_free(folder)
    assert (folder / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    s.close()
    assert lock_is_free(folder)

    with Store(folder) as t:
        t.bind(FP)
        assert not lock_is_free(folder)
    assert lock_is_free(folder)

    u = Store(folder)
    u.bind(FP)
    assert not lock_is_free(folder)
    del u
    gc.collect()
    assert lock_is_free(folder)

    v = Store.open(folder)  # opening to read takes no lock; the first write does
    assert lock_is_free(folder)
    v.put("x", np.zeros(2))
    assert not lock_is_free(folder)
    v.close()
    assert lock_is_free(folder)


def test_stores_of_one_process_share_the_lock_and_keep_each_others_chunks(tmp_path):
    folder = tmp_path / "store"
    a, b = Store(folder), Store(folder)
    a.bind(FP)
    b.bind(FP)  # same process: shares the lock instead of refusing
    xa = a.chunked("x", shape=(6,), axis=0, chunk_size=2, dtype="float64")
    xb = b.chunked("x", shape=(6,), axis=0, chunk_size=2, dtype="float64")
    xa.write(0, np.array([0.0, 1.0]))
    xb.write(1, np.array([2.0, 3.0]))
    xa.write(2, np.array([4.0, 5.0]))
    assert sorted(json.loads((folder / "manifest.json").read_text())["arrays"]["x"]["chunks"]) == [
        "0",
        "1",
        "2",
    ]
    assert xb.assemble().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    a.close()
    assert not lock_is_free(folder)  # b still holds it
    # a Store that another one of the process rebound to another computation refuses to write
    c = Store(folder, overwrite=True)
    c.bind({"what": "other"})
    with pytest.raises(
        StoreError, match="was discarded or bound to another computation after this Store read it"
    ):
        xb.write(0, np.zeros(2))
    b.close()
    c.close()
    assert lock_is_free(folder)
    assert json.loads((folder / "manifest.json").read_text())["fingerprint"] == {"what": "other"}


HOLDER = """
import sys, time
from upweight.store import Store
s = Store(sys.argv[1]); s.bind({"what": "hardening", "l2": 0.1})
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_process_is_refused_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "store"
    child = spawn(HOLDER, str(folder))
    try:
        assert child.stdout.readline().strip() == "locked", child.stderr.read()
        t0 = time.perf_counter()
        with pytest.raises(StoreError) as err:
            Store(folder).bind(FP)
        assert time.perf_counter() - t0 < 10  # refused, not waiting for the holder's two minutes
        msg = str(err.value)
        assert (
            str(folder) in msg and f"pid {child.pid} on " in msg and "one writer at a time" in msg
        )
    finally:
        child.kill()
        child.wait()
    with Store(folder) as s:  # the kernel dropped the killed holder's lock
        s.bind(FP)
        assert s.fingerprint == FP


# ── 6. memory ────────────────────────────────────────────────────────────────────────────
def test_written_chunks_are_not_kept_in_memory(tmp_path):
    chunk = 2**17  # float64: 1 MiB per chunk, 12 MiB in all
    with Store(tmp_path / "store") as s:
        s.bind(FP)
        a = s.chunked("big", shape=(12 * chunk,), axis=0, chunk_size=chunk, dtype="float64")
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(a.n_chunks):
                a.write(i, np.full(chunk, float(i)))
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert held < 2**20, f"{held} bytes still held after writing 12 MiB of chunks"
        out = a.assemble()
    assert type(out) is np.ndarray and np.array_equal(out, np.repeat(np.arange(12.0), chunk))


def test_assemble_uses_a_memmap_in_the_store_when_the_array_does_not_fit(tmp_path, monkeypatch):
    folder = tmp_path / "store"
    values = np.arange(40 * 300, dtype=np.float64).reshape(40, 300)  # 96,000 bytes
    with Store(folder) as s:
        s.bind(FP)
        a = s.chunked("scores", shape=(40, 300), axis=1, chunk_size=70, dtype="float64")
        for i in range(a.n_chunks):
            a.write(i, values[:, a.chunk_slice(i)])
        plain = a.assemble()
        assert type(plain) is np.ndarray and np.array_equal(plain, values)

        monkeypatch.setenv("UPWEIGHT_MEMORY_LIMIT", "100K")  # half of it is below 96,000 bytes
        out = a.assemble()
        assert isinstance(out, np.memmap) and not out.flags.writeable
        assert np.array_equal(out, values) and out.dtype == np.float64
        assert Path(out.filename).resolve() == (folder / "scores.assembled.npy").resolve()
        assert not [p.name for p in folder.rglob("*.tmp")]
        del out

        monkeypatch.setattr(
            "upweight.store.shutil.disk_usage",
            lambda p: SimpleNamespace(total=10**6, used=0, free=1000),
        )
        with pytest.raises(
            InsufficientMemoryError,
            match=r"scores.*needs 93\.8 KiB.*on disk instead needs 93\.8 KiB.*1000 B free",
        ):
            a.assemble()
    s.clear()
    assert sorted(os.listdir(folder)) == [".lock"]


# ── 7. SIGKILL in the middle of a run ────────────────────────────────────────────────────
WRITER = """
import sys, time
import numpy as np
from upweight.store import Store
s = Store(sys.argv[1]); s.bind({"what": "hardening", "l2": 0.1})
a = s.chunked("x", shape=(3, 40), axis=1, chunk_size=4, dtype="float64")
for i in a.missing():
    a.write(i, np.arange(120.0).reshape(3, 40)[:, a.chunk_slice(i)] * (i + 1))
    print(i, flush=True)
    time.sleep(0.5)
print("done", flush=True)
"""


def test_sigkill_mid_run_leaves_a_store_that_resumes_exactly(tmp_path):
    folder = tmp_path / "store"
    child = spawn(WRITER, str(folder))
    try:
        reported = [child.stdout.readline().strip() for _ in range(3)]
        assert reported == ["0", "1", "2"], child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    manifest = json.loads((folder / "manifest.json").read_text())  # parses: never half-written
    listed = sorted(int(k) for k in manifest["arrays"]["x"]["chunks"])
    assert listed[:3] == [0, 1, 2] and listed == list(range(len(listed))) and len(listed) < 10
    for i in listed:
        assert (
            _sha256_file(folder / "x" / f"{i:06d}.npy")
            == manifest["arrays"]["x"]["chunks"][str(i)]["sha256"]
        )

    expected = np.concatenate(
        [np.arange(120.0).reshape(3, 40)[:, 4 * i : 4 * i + 4] * (i + 1) for i in range(10)], axis=1
    )
    with Store.open(folder) as s:
        s.bind(FP)
        assert not [p.name for p in folder.rglob("*.tmp")]
        a = s.chunked("x", shape=(3, 40), axis=1, chunk_size=4, dtype="float64")
        assert a.missing() == [i for i in range(10) if i not in listed]
        for i in a.missing():
            a.write(i, expected[:, a.chunk_slice(i)])
        assert np.array_equal(a.assemble(), expected)


# ── 8. no unpickling ─────────────────────────────────────────────────────────────────────
#: loaders that unpickle whatever file they are given (and so run code planted in it)
UNPICKLERS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "pd.read_pickle",
    "pandas.read_pickle",
}
#: "file:line" → why the call there is safe; empty: every hit must be fixed, none is waved through
ALLOWED: dict[str, str] = {}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    return ""


def unpickling_calls(source: str, filename: str) -> list[tuple[str, str]]:
    """``("file:line", what)`` for each call in ``source`` that may unpickle a file: ``torch.load``
    without ``weights_only=True``, any call with ``allow_pickle`` not literally False, and the
    pickle-family loaders. Calls spread over several lines count at their first line."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        literal = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        if "allow_pickle" in kw and literal.get("allow_pickle", True) is not False:
            what = f"{name}(allow_pickle=...)"
        elif (name == "torch.load" or name.endswith(".torch.load")) and literal.get(
            "weights_only"
        ) is not True:
            what = "torch.load without weights_only=True"
        elif name in UNPICKLERS:
            what = name
        else:
            continue
        found.append((f"{filename}:{node.lineno}", what))
    return found


def test_the_scanner_finds_planted_unpickling():
    planted = (
        "import pickle, torch, numpy as np\na = torch.load(p)\nb = torch.load(p,"
        " weights_only=False)\nc = torch.load(p, weights_only=True)\nd = np.load(p,"
        " allow_pickle=True)\ne = np.load(p)\nf = pickle.loads(b'')\ng = torch.load(\n    p,\n   "
        " map_location='cpu',\n)\nh = np.load(p, allow_pickle=flag)\n"
    )
    assert unpickling_calls(planted, "x.py") == [
        ("x.py:2", "torch.load without weights_only=True"),
        ("x.py:3", "torch.load without weights_only=True"),
        ("x.py:5", "np.load(allow_pickle=...)"),
        ("x.py:7", "pickle.loads"),
        ("x.py:8", "torch.load without weights_only=True"),
        ("x.py:12", "np.load(allow_pickle=...)"),
    ]


def test_nothing_in_the_repository_unpickles_a_file():
    files = sorted(
        p for top in ("src", "tests", "bench", "tools") for p in (REPO / top).rglob("*.py")
    )
    assert len(files) > 50 and REPO / "bench" / "peers" / "bench_peers.py" in files
    found = []
    for p in files:
        rel = p.relative_to(REPO).as_posix()
        found += [
            f"{where}: {what}"
            for where, what in unpickling_calls(p.read_text(), rel)
            if where not in ALLOWED
        ]
    assert found == [], (
        "calls that may unpickle a file (pass weights_only=True / allow_pickle=False, or keep "
        "tensors + JSON):\n" + "\n".join(found)
    )
