"""``Store``: a folder of chunked NumPy arrays and a JSON manifest, so that long runs resume.

Layout::

    <folder>/manifest.json              fingerprint of the computation + which chunks are complete
    <folder>/<array>/000000.npy         one file per finished chunk (plain ``np.save`` format)
    <folder>/.lock                      the lock file of the process writing the store
    <folder>/<array>.assembled.npy      an array assembled on disk when it does not fit in memory

Guarantees:

* **atomic writes**: a chunk counts as complete only once its file is in place (written to a
  temporary file in the same folder, fsynced and moved with ``os.replace``, which is atomic) *and*
  the manifest, rewritten the same way, lists it with its SHA-256. A crash, ``KeyboardInterrupt``
  or SIGKILL between the two leaves a file the manifest does not list: it is simply recomputed.
  The manifest is never half-written. Temporary files left by a killed writer
  (``.<file>.<pid>.<hex>.tmp``) are deleted when the store is next opened for writing.
* **checked on resume**: every listed chunk is checked (header shape and dtype, file size,
  checksum); a truncated or altered file is reported in the log and recomputed.
* **fingerprinted**: the manifest records a fingerprint of what is being computed (model
  parameters, objective settings, damping, solver, data). Opening the folder for a different
  computation raises ``StoreMismatchError`` naming every difference and the fix (a new folder or
  ``overwrite=True``). Each array records the chunk size it was written with; continuing it with
  another chunk size is refused (results are only bit-for-bit identical when the chunks are the
  same).
* **confined**: the store reads, writes and deletes only inside its folder. A manifest is
  validated when read (array names must be identifiers, entries well formed) and refused with a
  ``StoreError`` otherwise, so a manifest cannot name a path outside the folder. ``clear()`` (and
  ``overwrite=True``) deletes only files the store writes itself (the manifest, chunk files
  ``NNNNNN.npy``, assembled arrays, its temporary files) and then array folders left empty; it never
  follows a symbolic link and never removes a folder tree, so files a user put in the folder stay.
* **one writer**: a Store takes an exclusive advisory lock (``fcntl.flock`` on ``<folder>/.lock``)
  when it is first bound or written, and keeps it until ``close()``, the end of its ``with`` block,
  its garbage collection or the end of the process (the kernel drops the lock of a killed process).
  A second process that tries to write the folder gets a ``StoreError`` at once, naming the folder
  and the process holding it, rather than waiting for a run that may last hours. Within one process
  the Stores of one folder share the lock (a rerun after an error reopens the folder while the
  failed run's Store may still be alive); each of them rereads the manifest after another one
  wrote it, so none overwrites what the other recorded.
* **memory**: written chunks are not kept in memory; ``ChunkedArray.assemble`` reads them back
  from disk one at a time into the result, and when the result does not fit in the available
  memory it is assembled into a memory-mapped file inside the folder (see ``assemble``).

Distributed workers return their chunks to the process that owns the store; they never write it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ._memory import check_memory, format_bytes, tensor_bytes
from ._progress import logger
from .errors import InputError, InsufficientMemoryError, StoreError, StoreMismatchError

try:  # POSIX; elsewhere a store is written without a lock (a warning says so)
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
ASSEMBLED_SUFFIX = ".assembled.npy"
FORMAT_VERSION = 1
#: the share of the available memory an assembled array may take in memory; above it, it is
#: assembled into a memory-mapped file (callers usually derive more arrays from it)
ASSEMBLE_FRACTION = 0.5

_CHUNK_FILE = re.compile(r"\d{6,}\.npy")
# the temporary files of ``atomic_write``: ".<target>.<pid>.<8 hex digits>.tmp"
_TEMP_FILE = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# ── fingerprints ─────────────────────────────────────────────────────────────────────────
def array_digest(
    a: np.ndarray, *, max_bytes: int = 2**28, sample_rows: int = 4096
) -> dict[str, Any]:
    """Shape, dtype and SHA-256 of an array's bytes — of every byte up to ``max_bytes``, above that
    of ``sample_rows`` evenly spaced rows (recorded as ``sampled``).

    Examples:
        >>> d = array_digest(np.arange(6.0).reshape(3, 2))
        >>> d["shape"], d["dtype"], d["sampled"], len(d["sha256"])
        ([3, 2], 'float64', False, 64)
    """
    a = np.asarray(a)
    sampled = a.nbytes > max_bytes and a.ndim > 0 and len(a) > sample_rows
    if sampled:
        rows = np.linspace(0, len(a) - 1, sample_rows).round().astype(np.int64)
        body = np.ascontiguousarray(a[rows])
    else:
        body = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(body.view(np.uint8).reshape(-1).data if body.size else b"")
    return {
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "sha256": h.hexdigest(),
        "sampled": bool(sampled),
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str, sort_keys=True))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    """``repr(v)`` for a message: checksums cut to their first 12 digits, anything else to 100
    characters."""
    s = repr(v)
    if isinstance(v, str) and len(v) > 16 and all(c in "0123456789abcdef" for c in v):
        return repr(v[:12] + "…")
    return s if len(s) <= 100 else s[:60] + "…" + s[-30:]


def describe_differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: stored X, now Y"`` for every dotted key whose value differs between two
    fingerprints."""
    a, b = _flatten(stored), _flatten(now)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(
                f"{key}: stored {_short(a.get(key, '<absent>'))}, now"
                f" {_short(b.get(key, '<absent>'))}"
            )
    return diffs


# ── files ────────────────────────────────────────────────────────────────────────────────
def _temp_name(target: str) -> str:
    """The name ``atomic_write`` and ``assemble`` give the temporary file of ``target``."""
    return f".{target}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(fh)`` to a temporary file next to ``path``, fsync, then
    ``os.replace``."""
    tmp = path.with_name(_temp_name(path.name))
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, expected file size) from an .npy header, or None if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return None
            offset = fh.tell()
    except (OSError, ValueError, EOFError):
        return None
    return (
        tuple(shape),
        np.dtype(dtype),
        offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists but belongs to another user (or not a pid at all)
    return True


def _open_subfolder(root_fd: int, name: str, store: Path, *, warn: bool = True) -> int | None:
    """A descriptor of the real folder ``name`` inside ``root_fd`` (never through a symbolic link),
    or None when there is none; anything else under that name is left alone (and logged)."""
    try:
        return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if warn:
            try:
                mode = os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode
                why = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
            except OSError:
                why = str(exc)
            logger.warning(
                "store %s: '%s' is %s, not a folder the store wrote; it was left alone",
                store,
                name,
                why,
            )
        return None


def _remove_own_files(dir_fd: int, own: Callable[[str], bool]) -> list[str]:
    """Delete the regular files of ``dir_fd`` whose names ``own`` accepts; the names of the
    others."""
    left = []
    with os.scandir(dir_fd) as entries:
        for e in entries:
            if own(e.name) and e.is_file(follow_symlinks=False):
                try:
                    os.unlink(e.name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
            else:
                left.append(e.name)
    return left


def _check_folder_path(path: Path) -> None:
    """Refuse a store path that is not (and cannot become) a folder, before any work is done."""
    if path.is_dir():
        return
    if path.exists() or path.is_symlink():
        kind = (
            "a broken symbolic link"
            if not path.exists()
            else "a file"
            if path.is_file()
            else "not a folder"
        )
        raise StoreError(
            f"store={str(path)!r} is {kind}; a store is a folder. Give a folder path (it is created"
            " if missing), e.g. a new name next to it."
        )
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise StoreError(
                f"store={str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder. "
                "Give a folder path whose parents are folders."
            )


# ── the writer's lock ────────────────────────────────────────────────────────────────────
class _FolderLock:
    """This process's exclusive ``flock`` on a store folder's lock file; the Stores of the process
    that write the folder share it (``count``). ``version`` counts the manifest writes made through
    it, so that each Store notices when another one of the process has written the manifest."""

    def __init__(self, fd: int, key: tuple[int, int], folder: Path) -> None:
        self.fd, self.key, self.folder = fd, key, folder
        self.pid = os.getpid()
        self.acquired_at = time.time()
        self.count = 1
        self.version = 0


_LOCKS: dict[tuple[int, int], _FolderLock] = {}
_LOCKS_GUARD = threading.Lock()


def _forget_inherited_locks() -> None:
    """In a forked child: close its copies of the parent's lock descriptors (so that the parent's
    lock ends when the parent releases it) and forget them (the child holds no lock)."""
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()
    for lock in _LOCKS.values():
        try:
            os.close(lock.fd)
        except OSError:
            pass
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def _lock_folder(folder: Path) -> _FolderLock:
    """Take the exclusive lock of ``folder`` for this process, or share the one it holds.

    Raises:
        StoreError: another process holds it (naming that process), or the lock file cannot be
            opened.
    """
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(
            f"Cannot open the lock file {path} of the store ({exc}). The store needs a folder it "
            "can write, with '.lock' a plain file (or absent)."
        ) from exc
    registered = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"The lock file {path} of the store is not a plain file; remove it.")
        key = (st.st_dev, st.st_ino)
        with _LOCKS_GUARD:
            held = _LOCKS.get(key)
            if held is not None and held.pid == os.getpid():
                held.count += 1
                return held
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = (
                        os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                        or "a process that has not yet written its pid"
                    )
                    raise StoreError(
                        f"The store {folder} is being written by another process ({holder}); a"
                        " store has one writer at a time. Wait until that run ends (or stop it),"
                        " or give this run another folder."
                    ) from None
                except OSError as exc:  # a file system without locks
                    logger.warning(
                        "store %s: cannot lock %s (%s); a second writer would not be refused",
                        folder,
                        path,
                        exc,
                    )
            else:  # pragma: no cover - not POSIX
                logger.warning(
                    "store %s: no file locks on this platform; a second writer would not be"
                    " refused",
                    folder,
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            lock = _FolderLock(fd, key, folder)
            _LOCKS[key] = lock
            registered = True
            return lock
    finally:
        if not registered:
            os.close(fd)  # refused, or the lock this process already holds is shared


def _unlock_folder(lock: _FolderLock) -> None:
    """Drop one Store's share of ``lock``; the last one closes the descriptor, which ends
    the flock."""
    with _LOCKS_GUARD:
        if lock.pid != os.getpid() or lock.count <= 0:
            return  # inherited through fork (the parent's lock), or already released
        lock.count -= 1
        if lock.count == 0:
            if _LOCKS.get(lock.key) is lock:
                del _LOCKS[lock.key]
            os.close(lock.fd)


# ── manifests ────────────────────────────────────────────────────────────────────────────
def _is_count(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _array_entry_problem(name: Any, e: Any) -> str | None:
    """What is wrong with the manifest entry of array ``name``, or None."""
    if not isinstance(name, str) or not name.isidentifier():
        return (
            f"array name {name!r} is not an identifier (array names are folder names inside the"
            " store)"
        )
    if not isinstance(e, dict):
        return f"the entry of array '{name}' is not a JSON object"
    shape = e.get("shape")
    if not (isinstance(shape, list) and shape and all(_is_count(s, 0) for s in shape)):
        return f"array '{name}' has shape {shape!r}, not a list of sizes"
    if not (_is_count(e.get("axis"), 0) and e["axis"] < len(shape)):
        return f"array '{name}' has axis {e.get('axis')!r}, not an axis of its shape {shape}"
    if not _is_count(e.get("chunk_size"), 1):
        return f"array '{name}' has chunk_size {e.get('chunk_size')!r}, not a positive integer"
    try:
        dtype = np.dtype(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.hasobject:
        return f"array '{name}' has dtype {e.get('dtype')!r}, not a numeric NumPy dtype"
    chunks = e.get("chunks")
    if not isinstance(chunks, dict) or not all(
        isinstance(k, str)
        and k.isdigit()
        and isinstance(v, dict)
        and isinstance(v.get("sha256"), str)
        for k, v in chunks.items()
    ):
        return (
            f"array '{name}' lists its chunks as {_short(chunks)}, not chunk numbers with their"
            " sha256"
        )
    if not isinstance(e.get("meta", {}), dict):
        return f"array '{name}' has meta {_short(e.get('meta'))}, not a JSON object"
    return None


def _manifest_problem(m: Any, f: Path) -> str | None:
    """Why ``m`` (a parsed manifest file ``f``) cannot be used, or None."""
    if not (
        isinstance(m, dict)
        and m.get("format") == FORMAT_VERSION
        and isinstance(m.get("fingerprint"), dict)
        and isinstance(m.get("arrays"), dict)
    ):
        return f"{f} is not an upweight store manifest (format {FORMAT_VERSION})"
    for name, entry in m["arrays"].items():
        why = _array_entry_problem(name, entry)
        if why is not None:
            return f"The store manifest {f} is not valid: {why}"
    return None


class Store:
    """A resumable folder of chunked arrays with a fingerprinted JSON manifest.

    Args:
        path: the folder (created on first use); a path that is a file, or lies under one, is
            refused at once (``StoreError``).
        overwrite: discard whatever the folder holds when it is first bound to a computation,
            instead of resuming it (or refusing a mismatched one). A manifest that cannot be read
            is discarded too; the folders next to it are then left alone (the store cannot tell
            whether it wrote them) and a warning names them.

    A Store writes its folder under an exclusive lock, held from its first ``bind`` (or write)
    until ``close()``; ``with Store(path) as s:`` closes it at the end of the block, and a Store
    that is garbage-collected releases it too. A second process writing the same folder meanwhile
    gets a ``StoreError`` naming the process that holds it.

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> s = Store(folder); s.bind({"what": "demo", "l2": 0.1})
        >>> a = s.chunked("scores", shape=(2, 5), axis=1, chunk_size=2, dtype="float64")
        >>> a.n_chunks, a.missing()
        (3, [0, 1, 2])
        >>> a.write(1, np.ones((2, 2))); Store.open(folder).chunked("scores", shape=(2, 5), axis=1,
        ...     chunk_size=2, dtype="float64").missing()
        [0, 2]
        >>> Store.open(folder).bind({"what": "demo", "l2": 1.0})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        upweight.errors.StoreMismatchError: The store ... l2: stored 0.1, now 1.0. ...
        >>> s.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = bool(overwrite)
        _check_folder_path(self.path)
        self._lock: _FolderLock | None = None
        self._release: weakref.finalize | None = None
        self._seen = 0  # the lock's manifest version this Store's copy of the manifest reflects
        # why an unusable manifest is to be discarded (overwrite=True)
        self._discarded: str | None = None
        self._manifest: dict[str, Any] | None = self._read_manifest()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, overwrite: bool = False) -> Store:
        """Open ``path`` to resume what it holds (an empty or missing folder starts a new store)."""
        return cls(path, overwrite=overwrite)

    # ── the lock ─────────────────────────────────────────────────────────────────────
    def close(self) -> None:
        """Release this Store's share of the folder's lock (a later write takes it again)."""
        if self._release is not None:
            self._release()
        self._lock, self._release = None, None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _acquire(self, *, same_computation: bool = True) -> None:
        """Hold the folder's lock before writing: on first taking it, reread the manifest (another
        writer may have changed it since it was read) and delete orphaned temporary files.

        Raises:
            StoreError: another process holds the lock; or, with ``same_computation``, the manifest
                now belongs to another computation (or was discarded) than the one this Store read.
        """
        lock = self._lock
        if lock is not None and lock.pid == os.getpid() and lock.count > 0:
            if lock.version != self._seen:
                self._reload(same_computation)
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the store folder {self.path} ({exc}); give a folder you can write."
            ) from exc
        lock = _lock_folder(self.path)
        self._lock, self._release = lock, weakref.finalize(self, _unlock_folder, lock)
        try:
            self._reload(same_computation)
            # just taken by this process (a shared lock has nothing new to clean)
            if lock.count == 1:
                self._remove_orphans()
        except BaseException:
            self.close()  # this Store cannot write: another run may use the folder
            raise

    def _reload(self, same_computation: bool) -> None:
        before = self._manifest
        self._manifest = self._read_manifest()
        self._seen = self._lock.version if self._lock is not None else 0
        if (
            same_computation
            and before is not None
            and (self._manifest is None or self._manifest["fingerprint"] != before["fingerprint"])
        ):
            raise StoreError(
                f"The store {self.path} was discarded or bound to another computation after this"
                " Store read it (by another Store or process). Open it again (Store.open) to see"
                " what it holds now."
            )

    def _changed_manifest(self) -> None:
        assert self._lock is not None
        self._lock.version += 1
        self._seen = self._lock.version

    def _remove_orphans(self) -> None:
        """Delete temporary files that no writer will finish: those named by a process that is no
        longer alive, or by this process before it took the lock (a pid reused after a restart).
        With the lock held no other process writes the store; a live one may only be assembling an
        array, so its files stay."""
        assert self._lock is not None
        me, since = os.getpid(), self._lock.acquired_at

        def orphan(dir_fd: int, name: str, target_ok: Callable[[str], bool]) -> bool:
            m = _TEMP_FILE.fullmatch(name)
            if m is None or not target_ok(m["target"]):
                return False
            pid = int(m["pid"])
            if pid != me:
                return not _pid_alive(pid)
            try:
                return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime < since
            except OSError:
                return False

        names = list(self._manifest["arrays"]) if self._manifest is not None else []
        assembled = {n + ASSEMBLED_SUFFIX for n in names}
        root = os.open(self.path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            _remove_own_files(
                root, lambda n: orphan(root, n, lambda t: t == MANIFEST or t in assembled)
            )
            for name in names:
                fd = _open_subfolder(root, name, self.path, warn=False)
                if fd is not None:
                    try:
                        _remove_own_files(fd, lambda n, fd=fd: orphan(fd, n, _CHUNK_FILE.fullmatch))  # type: ignore[misc]
                    finally:
                        os.close(fd)
        finally:
            os.close(root)

    # ── manifest ─────────────────────────────────────────────────────────────────────
    def _read_manifest(self) -> dict[str, Any] | None:
        """The manifest, validated; None for a new store. An unusable one raises ``StoreError``, or
        with ``overwrite=True`` is noted in ``_discarded`` (and read as None)."""
        f = self.path / MANIFEST
        self._discarded = None
        if not os.path.lexists(f):
            return None
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            why = f"The store manifest {f} cannot be read ({exc})"
        else:
            why = _manifest_problem(m, f)
            if why is None:
                return m
        if self.overwrite:
            self._discarded = why
            return None
        raise StoreError(
            f"{why}. Use a new folder, or pass overwrite=True (Store(path, overwrite=True)) to"
            " discard it."
        )

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        # compact: json's C encoder (an indent falls back to the much slower pure-Python one, which
        # matters for a store with thousands of arrays — a leave-one-out store has one per
        # retraining)
        self._acquire()
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self.path / MANIFEST, lambda fh: fh.write(text))
        self._manifest = manifest
        self._changed_manifest()

    def _write_array_entry(self, name: str, entry: dict[str, Any]) -> None:
        """Rewrite the manifest with the entry of array ``name`` replaced by ``entry`` (the other
        entries are shared, not copied: a store with thousands of arrays stays cheap to update)."""
        manifest = self._require_bound()
        self._write_manifest({**manifest, "arrays": {**manifest["arrays"], name: entry}})

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint the store was written for, or None for a new store."""
        return None if self._manifest is None else self._manifest["fingerprint"]

    def bind(self, fingerprint: Mapping[str, Any]) -> None:
        """Tie the store to a computation: record ``fingerprint`` in a new store, or check it
        against the recorded one. Takes the folder's lock (see the class).

        Raises:
            StoreMismatchError: the folder holds results of a different computation.
            StoreError: another process is writing the folder.
        """
        fp = _jsonable(dict(fingerprint))
        self._acquire(same_computation=False)
        if self.overwrite:
            self.clear()
            self.overwrite = False  # a later bind in the same run resumes what this run wrote
        if self._manifest is None:
            self._write_manifest(
                {"format": FORMAT_VERSION, "fingerprint": fp, "arrays": {}, "created": time.time()}
            )
            return
        diffs = describe_differences(self._manifest["fingerprint"], fp)
        if diffs:
            self.close()  # this Store writes nothing: another run may use the folder
            raise StoreMismatchError(
                f"The store {self.path} was written for a different computation; it differs in "
                + "; ".join(diffs)
                + ". Use a new folder for this run, or pass overwrite=True (e.g. store=Store(path,"
                " overwrite=True)) to discard the stored results."
            )

    def clear(self) -> None:
        """Delete the manifest and the files this store wrote: each array's chunk files, its
        assembled file and temporary files, then its folder if that is left empty.

        Only names the store itself gives are deleted, only as plain files, and never through a
        symbolic link: files a user put in the folder (or in an array folder) stay, and so does
        every folder when the manifest cannot be read (a warning names them).
        """
        self._acquire(same_computation=False)
        names = list(self._manifest["arrays"]) if self._manifest is not None else []
        root = os.open(self.path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            for name in names:  # identifiers: validated when the manifest was read
                fd = _open_subfolder(root, name, self.path)
                if fd is not None:
                    try:
                        left = _remove_own_files(
                            fd,
                            lambda n: bool(
                                _CHUNK_FILE.fullmatch(n)
                                or (
                                    (m := _TEMP_FILE.fullmatch(n))
                                    and _CHUNK_FILE.fullmatch(m["target"])
                                )
                            ),
                        )
                    finally:
                        os.close(fd)
                    if left:
                        logger.warning(
                            "store %s: kept the folder '%s': it holds files the store did not write"
                            " (%s)",
                            self.path,
                            name,
                            ", ".join(sorted(left)[:5]),
                        )
                    else:
                        try:
                            os.rmdir(name, dir_fd=root)
                        except OSError:
                            pass
            assembled = {n + ASSEMBLED_SUFFIX for n in names}
            _remove_own_files(
                root,
                lambda n: (
                    n == MANIFEST
                    or n in assembled
                    or bool(
                        (m := _TEMP_FILE.fullmatch(n))
                        and (m["target"] == MANIFEST or m["target"] in assembled)
                    )
                ),
            )
            if self._discarded is not None:
                folders = sorted(
                    e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)
                )
                logger.warning(
                    "store %s: discarded its manifest (%s); %s",
                    self.path,
                    self._discarded,
                    (
                        "left the folders "
                        + ", ".join(folders)
                        + " alone: without a manifest the store cannot tell whether it wrote them"
                        if folders
                        else "no folders were touched"
                    ),
                )
        finally:
            os.close(root)
        self._manifest, self._discarded = None, None
        self._changed_manifest()

    def _require_bound(self) -> dict[str, Any]:
        lock = self._lock
        if (
            lock is not None
            and lock.count > 0
            and lock.pid == os.getpid()
            and lock.version != self._seen
        ):
            self._reload(same_computation=True)  # another Store of this process wrote the manifest
        if self._manifest is None:
            raise StoreError(
                f"The store {self.path} is not bound to a computation yet; call"
                " store.bind(fingerprint) first."
            )
        return self._manifest

    def _array_folder(self, name: str, *, create: bool) -> Path:
        """The folder of array ``name``: a real folder directly inside the store (or refused)."""
        if not name.isidentifier():
            raise StoreError(f"Array name {name!r} must be an identifier (it names a folder).")
        folder = self.path / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise StoreError(
                f"{folder} is {'a symbolic link' if folder.is_symlink() else 'not a folder'}; the"
                f" store keeps array '{name}' only in a folder of its own inside {self.path}. Move"
                " it away, or use a new folder."
            )
        if create:
            folder.mkdir(exist_ok=True)
        return folder

    # ── arrays ───────────────────────────────────────────────────────────────────────
    def chunked(
        self,
        name: str,
        *,
        shape: tuple[int, ...],
        axis: int,
        chunk_size: int,
        dtype: str,
        hint: str = "",
    ) -> ChunkedArray:
        """The array ``name`` of ``shape``, split along ``axis`` into chunks of ``chunk_size``.

        Raises:
            StoreMismatchError: the store holds ``name`` with another shape, dtype or chunk size.
        """
        manifest = self._require_bound()
        self._array_folder(name, create=False)
        spec = {
            "shape": [int(s) for s in shape],
            "axis": int(axis),
            "chunk_size": int(chunk_size),
            "dtype": str(np.dtype(dtype)),
        }
        if name not in manifest["arrays"]:
            self._acquire()
            manifest = self._require_bound()
        old = manifest["arrays"].get(name)
        if old is None:
            self._write_array_entry(name, {**spec, "chunks": {}, "meta": {}})
        else:
            self._check_layout(name, old, spec, hint)
        return ChunkedArray(self, name)

    def _check_layout(
        self, name: str, old: Mapping[str, Any], spec: Mapping[str, Any], hint: str = ""
    ) -> None:
        diffs = describe_differences({k: old[k] for k in spec}, spec)
        if diffs:
            raise StoreMismatchError(
                f"The store {self.path} holds '{name}' with a different layout: "
                + "; ".join(diffs)
                + ". "
                + (hint + " " if hint else "")
                + "Results resume bit-for-bit only with the same chunks: use the same settings, a"
                " new folder, or overwrite=True."
            )

    def put(self, name: str, array: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
        """Store a whole array (one chunk) with JSON metadata."""
        array = np.asarray(array)
        self._require_bound()
        self._acquire()
        manifest = self._require_bound()
        folder = self._array_folder(name, create=False)
        if array.dtype.hasobject:
            raise StoreError(
                f"Array '{name}' has dtype {array.dtype}; a store keeps numeric arrays only."
            )
        shape = array.shape or (1,)
        spec = {
            "shape": [int(s) for s in shape],
            "axis": 0,
            "chunk_size": max(1, int(shape[0])),
            "dtype": str(array.dtype),
        }
        if name in manifest["arrays"]:
            self._check_layout(name, manifest["arrays"][name], spec)
        # the file first, then one manifest update that declares the array and lists its chunk
        self._array_folder(name, create=True)
        path = folder / f"{0:06d}.npy"
        atomic_write(
            path,
            lambda fh: np.save(fh, np.ascontiguousarray(array.reshape(shape)), allow_pickle=False),
        )
        entry = {
            **spec,
            "chunks": {"0": {"sha256": _sha256_file(path)}},
            "meta": _jsonable(dict(meta)) if meta is not None else {},
        }
        self._write_array_entry(name, entry)

    def get(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(array, meta)`` stored by ``put``, or None when absent or its file is damaged."""
        manifest = self._require_bound()
        if name not in manifest["arrays"]:
            return None
        a = ChunkedArray(self, name)
        if a.missing():
            return None
        return a.assemble(), dict(self._require_bound()["arrays"][name].get("meta", {}))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"


@contextmanager
def opened_store(store: str | os.PathLike[str] | Store | None) -> Iterator[Store | None]:
    """``as_store(store)`` for the length of a ``with`` block; a ``Store`` opened here from a path
    is closed at its end (its writer's lock released), one passed in is left open for its owner."""
    st = as_store(store)
    try:
        yield st
    finally:
        if st is not None and st is not store:
            st.close()


def as_store(store: str | os.PathLike[str] | Store | None) -> Store | None:
    """``None`` stays ``None`` (nothing kept); a folder path opens a ``Store``; a ``Store`` is used
    as given.

    Raises:
        InputError: ``store`` is neither.
        StoreError: the path is a file (or lies under one), or its manifest cannot be used.
    """
    if store is None or isinstance(store, Store):
        return store
    if not isinstance(store, (str, os.PathLike)):
        raise InputError(
            f"store must be a folder path or an upweight.Store; got {type(store).__name__}."
        )
    return Store(store)


class ChunkedArray:
    """One array of a ``Store``, written chunk by chunk along one axis (chunks live on
    disk only)."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        spec = store._require_bound()["arrays"][name]
        # chunks are read only from a real folder of the store
        store._array_folder(name, create=False)
        self.shape = tuple(spec["shape"])
        self.axis = spec["axis"]
        self.chunk_size = spec["chunk_size"]
        self.dtype = np.dtype(spec["dtype"])
        self.length = self.shape[self.axis]
        self.n_chunks = -(-self.length // self.chunk_size) if self.length else 0

    @property
    def _spec(self) -> dict[str, Any]:
        return self.store._require_bound()["arrays"][self.name]

    def _file(self, i: int) -> Path:
        return self.store.path / self.name / f"{i:06d}.npy"

    def chunk_shape(self, i: int) -> tuple[int, ...]:
        """Shape of chunk ``i``: ``chunk_size`` along the chunk axis (less for the last one)."""
        s = list(self.shape)
        s[self.axis] = min(self.chunk_size, self.length - i * self.chunk_size)
        return tuple(s)

    def chunk_slice(self, i: int) -> slice:
        """Positions along the chunk axis that chunk ``i`` covers."""
        return slice(i * self.chunk_size, min((i + 1) * self.chunk_size, self.length))

    def _valid(self, i: int, entry: Mapping[str, Any]) -> bool:
        path = self._file(i)
        head = None if path.is_symlink() else _npy_header(path)
        if head is None:
            why = "a symbolic link" if path.is_symlink() else "missing or unreadable"
        elif head[0] != self.chunk_shape(i) or head[1] != self.dtype:
            why = (
                f"shape {head[0]} / dtype {head[1]} instead of {self.chunk_shape(i)} / {self.dtype}"
            )
        elif path.stat().st_size != head[2]:
            why = f"{path.stat().st_size} bytes instead of {head[2]} (truncated)"
        elif _sha256_file(path) != entry.get("sha256"):
            why = "checksum mismatch"
        else:
            return True
        logger.warning(
            "store %s: chunk %d of '%s' is damaged (%s); it will be recomputed",
            self.store.path,
            i,
            self.name,
            why,
        )
        return False

    def missing(self) -> list[int]:
        """Chunks still to compute: those not listed complete, and listed ones whose file fails the
        checks (they are dropped from the manifest)."""
        chunks = self._spec["chunks"]
        bad = {
            str(i)
            for i in range(self.n_chunks)
            if str(i) in chunks and not self._valid(i, chunks[str(i)])
        }
        if bad:
            self.store._acquire()
            spec = self._spec
            self.store._write_array_entry(
                self.name,
                {**spec, "chunks": {k: v for k, v in spec["chunks"].items() if k not in bad}},
            )
        chunks = self._spec["chunks"]
        return [i for i in range(self.n_chunks) if str(i) not in chunks]

    def write(self, i: int, values: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
        """Write chunk ``i`` atomically, then record it (and ``meta``) in the manifest."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape != self.chunk_shape(i):
            raise StoreError(
                f"Chunk {i} of '{self.name}' must have shape {self.chunk_shape(i)}; got"
                f" {values.shape}."
            )
        self.store._acquire()
        path = self.store._array_folder(self.name, create=True) / f"{i:06d}.npy"
        atomic_write(path, lambda fh: np.save(fh, values, allow_pickle=False))
        spec = self._spec
        entry = {**spec, "chunks": {**spec["chunks"], str(i): {"sha256": _sha256_file(path)}}}
        if meta is not None:
            entry["meta"] = _jsonable(dict(meta))
        self.store._write_array_entry(self.name, entry)

    def read(self, i: int) -> np.ndarray:
        """Chunk ``i``, read from its file (never with pickles)."""
        return np.load(self._file(i), allow_pickle=False)

    def _index(self, i: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (self.chunk_slice(i),)

    def assemble(self) -> np.ndarray:
        """The whole array from its chunks (all must be complete), read from disk one at a time.

        When the array fits in memory (at most ``ASSEMBLE_FRACTION`` of the available memory,
        ``upweight._memory.available_memory``, which ``UPWEIGHT_MEMORY_LIMIT`` lowers) it is a plain
        array. Otherwise it is assembled into ``<store>/<name>.assembled.npy`` (built under a
        temporary name, flushed, then moved into place atomically) and returned as a read-only
        ``np.memmap`` of that file: the operating system pages it in as it is read. The file is
        rebuilt on each call and deleted with the store (``clear``).

        Raises:
            StoreError: a chunk is missing.
            InsufficientMemoryError: the array fits neither in memory nor on the store's disk.
        """
        left = [i for i in range(self.n_chunks) if str(i) not in self._spec["chunks"]]
        if left:
            raise StoreError(
                f"'{self.name}' in {self.store.path} is incomplete: chunks {left[:10]} are missing."
            )
        if not self.n_chunks:
            return np.zeros(self.shape, dtype=self.dtype)
        nbytes = tensor_bytes(self.shape, self.dtype)
        try:
            check_memory(
                nbytes,
                f"the {self.shape} {self.dtype} array '{self.name}'",
                fraction=ASSEMBLE_FRACTION,
            )
        except InsufficientMemoryError as exc:
            return self._assemble_on_disk(nbytes, exc)
        out = np.empty(self.shape, dtype=self.dtype)
        for i in range(self.n_chunks):
            out[self._index(i)] = self.read(i)
        return out

    def _assemble_on_disk(self, nbytes: int, memory: InsufficientMemoryError) -> np.memmap:
        folder = self.store.path
        target = folder / (self.name + ASSEMBLED_SUFFIX)
        free = shutil.disk_usage(folder).free
        if nbytes > free:
            raise InsufficientMemoryError(
                f"{memory} Assembling it on disk instead needs {format_bytes(nbytes)} but {folder}"
                f" has {format_bytes(free)} free: free disk space there, or select fewer points.",
                required_bytes=nbytes,
                available_bytes=memory.available_bytes,
            )
        logger.info(
            "store %s: '%s' (%s) does not fit in memory; assembled into %s",
            folder,
            self.name,
            format_bytes(nbytes),
            target,
        )
        tmp = folder / _temp_name(target.name)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=self.shape)
            for i in range(self.n_chunks):
                out[self._index(i)] = self.read(i)
            out.flush()
            del out
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return np.load(target, mmap_mode="r", allow_pickle=False)
