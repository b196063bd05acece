"""``Store``: a folder of chunked NumPy arrays and a JSON manifest, so that long runs resume.

Layout::

    <folder>/manifest.json            fingerprint of the computation + which chunks are complete
    <folder>/<array>/000000.npy       one file per finished chunk (plain ``np.save`` format)

Guarantees:

* a chunk counts as complete only once its file is in place (written to a temporary file and
  moved with ``os.replace``, which is atomic) *and* the manifest, rewritten the same way,
  lists it with its SHA-256. A crash or ``KeyboardInterrupt`` between the two leaves a file the
  manifest does not list: it is simply recomputed. The folder is never half-written.
* on resume every listed chunk is checked (header shape and dtype, file size, checksum); a
  truncated or altered file is reported in the log and recomputed.
* the manifest records a fingerprint of what is being computed (model parameters, objective
  settings, damping, solver, data). Opening the folder for a different computation raises
  ``StoreMismatchError`` naming every difference and the fix (a new folder or ``overwrite=True``).
* each array records the chunk size it was written with; continuing it with another chunk size
  is refused (results are only bit-for-bit identical when the chunks are the same).

One process writes a store at a time (distributed workers return their chunks to the process
that owns the store).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._progress import logger
from .errors import InputError, StoreError, StoreMismatchError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ── fingerprints ─────────────────────────────────────────────────────────────────────────
def array_digest(a: np.ndarray, *, max_bytes: int = 2**28, sample_rows: int = 4096) -> dict[str, Any]:
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
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": h.hexdigest(), "sampled": bool(sampled)}


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
    """``repr(v)`` for a message: checksums cut to their first 12 digits, anything else to 100 characters."""
    s = repr(v)
    if isinstance(v, str) and len(v) > 16 and all(c in "0123456789abcdef" for c in v):
        return repr(v[:12] + "…")
    return s if len(s) <= 100 else s[:60] + "…" + s[-30:]


def describe_differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: stored X, now Y"`` for every dotted key whose value differs between two fingerprints."""
    a, b = _flatten(stored), _flatten(now)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: stored {_short(a.get(key, '<absent>'))}, now {_short(b.get(key, '<absent>'))}")
    return diffs


# ── atomic file writes ───────────────────────────────────────────────────────────────────
def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(fh)`` to a temporary file next to ``path``, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
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
    return tuple(shape), np.dtype(dtype), offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class Store:
    """A resumable folder of chunked arrays with a fingerprinted JSON manifest.

    Args:
        path: the folder (created on first use).
        overwrite: discard whatever the folder holds when it is first bound to a computation,
            instead of resuming it (or refusing a mismatched one).

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
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = bool(overwrite)
        self._manifest: dict[str, Any] | None = self._read_manifest()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, overwrite: bool = False) -> Store:
        """Open ``path`` to resume what it holds (an empty or missing folder starts a new store)."""
        return cls(path, overwrite=overwrite)

    # ── manifest ─────────────────────────────────────────────────────────────────────
    def _read_manifest(self) -> dict[str, Any] | None:
        f = self.path / MANIFEST
        if not f.is_file():
            return None
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"The store manifest {f} cannot be read ({exc}). Use a new folder, or pass overwrite=True "
                "to discard this one."
            ) from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT_VERSION or "fingerprint" not in m:
            raise StoreError(
                f"{f} is not an upweight store manifest (format {FORMAT_VERSION}). Use a new folder, or pass "
                "overwrite=True to discard it."
            )
        return m

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        # compact: json's C encoder (an indent falls back to the pure-Python one, 4× slower on the
        # manifest of a store with thousands of arrays — a leave-one-out store has one per retraining)
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        _atomic_write(self.path / MANIFEST, lambda fh: fh.write(text))
        self._manifest = manifest

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
        """Tie the store to a computation: record ``fingerprint`` in a new store, or check it against
        the recorded one.

        Raises:
            StoreMismatchError: the folder holds results of a different computation.
        """
        fp = _jsonable(dict(fingerprint))
        if self.overwrite:
            self.clear()
            self.overwrite = False  # a later bind in the same run resumes what this run wrote
        if self._manifest is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_manifest({"format": FORMAT_VERSION, "fingerprint": fp, "arrays": {}, "created": time.time()})
            return
        diffs = describe_differences(self._manifest["fingerprint"], fp)
        if diffs:
            raise StoreMismatchError(
                f"The store {self.path} was written for a different computation; it differs in "
                + "; ".join(diffs)
                + ". Use a new folder for this run, or pass overwrite=True (e.g. store=Store(path, overwrite=True)) "
                "to discard the stored results."
            )

    def clear(self) -> None:
        """Delete the manifest and every array folder of this store (other files are left alone)."""
        if self._manifest is not None:
            for name in self._manifest.get("arrays", {}):
                shutil.rmtree(self.path / name, ignore_errors=True)
        (self.path / MANIFEST).unlink(missing_ok=True)
        self._manifest = None

    def _require_bound(self) -> dict[str, Any]:
        if self._manifest is None:
            raise StoreError(f"The store {self.path} is not bound to a computation yet; call store.bind(fingerprint) first.")
        return self._manifest

    # ── arrays ───────────────────────────────────────────────────────────────────────
    def chunked(
        self, name: str, *, shape: tuple[int, ...], axis: int, chunk_size: int, dtype: str, hint: str = ""
    ) -> ChunkedArray:
        """The array ``name`` of ``shape``, split along ``axis`` into chunks of ``chunk_size``.

        Raises:
            StoreMismatchError: the store holds ``name`` with another shape, dtype or chunk size.
        """
        manifest = self._require_bound()
        if not name.isidentifier():
            raise StoreError(f"Array name {name!r} must be an identifier (it names a folder).")
        spec = {"shape": [int(s) for s in shape], "axis": int(axis), "chunk_size": int(chunk_size), "dtype": str(np.dtype(dtype))}
        old = manifest["arrays"].get(name)
        if old is None:
            self._write_array_entry(name, {**spec, "chunks": {}, "meta": {}})
        else:
            self._check_layout(name, old, spec, hint)
        return ChunkedArray(self, name)

    def _check_layout(self, name: str, old: Mapping[str, Any], spec: Mapping[str, Any], hint: str = "") -> None:
        diffs = describe_differences({k: old[k] for k in spec}, spec)
        if diffs:
            raise StoreMismatchError(
                f"The store {self.path} holds '{name}' with a different layout: " + "; ".join(diffs) + ". "
                + (hint + " " if hint else "")
                + "Results resume bit-for-bit only with the same chunks: use the same settings, a new folder, "
                "or overwrite=True."
            )

    def put(self, name: str, array: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
        """Store a whole array (one chunk) with JSON metadata."""
        array = np.asarray(array)
        manifest = self._require_bound()
        if not name.isidentifier():
            raise StoreError(f"Array name {name!r} must be an identifier (it names a folder).")
        shape = array.shape or (1,)
        spec = {"shape": [int(s) for s in shape], "axis": 0, "chunk_size": max(1, int(shape[0])), "dtype": str(array.dtype)}
        if name in manifest["arrays"]:
            self._check_layout(name, manifest["arrays"][name], spec)
        # the file first, then one manifest update that declares the array and lists its chunk
        path = self.path / name / f"{0:06d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array.reshape(shape)), allow_pickle=False))
        entry = {**spec, "chunks": {"0": {"sha256": _sha256_file(path)}},
                 "meta": _jsonable(dict(meta)) if meta is not None else {}}
        self._write_array_entry(name, entry)

    def get(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(array, meta)`` stored by ``put``, or None when absent or its file is damaged."""
        manifest = self._require_bound()
        if name not in manifest["arrays"]:
            return None
        a = ChunkedArray(self, name)
        if a.missing():
            return None
        return a.assemble(), dict(manifest["arrays"][name].get("meta", {}))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"


def as_store(store: str | os.PathLike[str] | Store | None) -> Store | None:
    """``None`` stays ``None`` (nothing kept); a folder path opens a ``Store``; a ``Store`` is used as given."""
    if store is None or isinstance(store, Store):
        return store
    if not isinstance(store, (str, os.PathLike)):
        raise InputError(f"store must be a folder path or an upweight.Store; got {type(store).__name__}.")
    return Store(store)


class ChunkedArray:
    """One array of a ``Store``, written chunk by chunk along one axis."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        spec = store._require_bound()["arrays"][name]
        self.shape = tuple(spec["shape"])
        self.axis = spec["axis"]
        self.chunk_size = spec["chunk_size"]
        self.dtype = np.dtype(spec["dtype"])
        self.length = self.shape[self.axis]
        self.n_chunks = -(-self.length // self.chunk_size) if self.length else 0
        self._loaded: dict[int, np.ndarray] = {}

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
        head = _npy_header(path)
        if head is None:
            why = "missing or unreadable"
        elif head[0] != self.chunk_shape(i) or head[1] != self.dtype:
            why = f"shape {head[0]} / dtype {head[1]} instead of {self.chunk_shape(i)} / {self.dtype}"
        elif path.stat().st_size != head[2]:
            why = f"{path.stat().st_size} bytes instead of {head[2]} (truncated)"
        elif _sha256_file(path) != entry.get("sha256"):
            why = "checksum mismatch"
        else:
            return True
        logger.warning("store %s: chunk %d of '%s' is damaged (%s); it will be recomputed", self.store.path, i, self.name, why)
        return False

    def missing(self) -> list[int]:
        """Chunks still to compute: those not listed complete, and listed ones whose file fails the
        checks (they are dropped from the manifest)."""
        chunks = self._spec["chunks"]
        bad = [i for i in range(self.n_chunks) if str(i) in chunks and not self._valid(i, chunks[str(i)])]
        if bad:
            chunks = {k: v for k, v in chunks.items() if k not in {str(i) for i in bad}}
            for i in bad:
                self._loaded.pop(i, None)
            self.store._write_array_entry(self.name, {**self._spec, "chunks": chunks})
        chunks = self._spec["chunks"]
        return [i for i in range(self.n_chunks) if str(i) not in chunks]

    def write(self, i: int, values: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
        """Write chunk ``i`` atomically, then record it (and ``meta``) in the manifest."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape != self.chunk_shape(i):
            raise StoreError(f"Chunk {i} of '{self.name}' must have shape {self.chunk_shape(i)}; got {values.shape}.")
        path = self._file(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda fh: np.save(fh, values, allow_pickle=False))
        entry = {**self._spec, "chunks": {**self._spec["chunks"], str(i): {"sha256": _sha256_file(path)}}}
        if meta is not None:
            entry["meta"] = _jsonable(dict(meta))
        self.store._write_array_entry(self.name, entry)
        self._loaded[i] = values

    def read(self, i: int) -> np.ndarray:
        if i not in self._loaded:
            self._loaded[i] = np.load(self._file(i), allow_pickle=False)
        return self._loaded[i]

    def assemble(self) -> np.ndarray:
        """The whole array from its chunks (all must be complete)."""
        left = [i for i in range(self.n_chunks) if str(i) not in self._spec["chunks"]]
        if left:
            raise StoreError(f"'{self.name}' in {self.store.path} is incomplete: chunks {left[:10]} are missing.")
        if not self.n_chunks:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.concatenate([self.read(i) for i in range(self.n_chunks)], axis=self.axis)
