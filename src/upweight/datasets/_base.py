"""The split container and the file helpers shared by the loaders (paths, npz, gzip, labels)."""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from ..errors import InputError

PathArg = str | PathLike


@dataclass(frozen=True)
class SplitData:
    """A train/test split with integer labels and the row each point came from.

    ``x_*`` are float32 features: pixels scaled to [0, 1] for MNIST, counts for bag-of-words,
    encoded columns for the hospital data (the loader's docstring says which). Enron's
    ``x_*`` may be a ``scipy.sparse`` CSR matrix. ``source_index_*`` give each row's position
    in the source the loader documents, so a point can be traced back to the original file.
    The ``*_val`` fields hold a validation split when the paper's pipeline has one (MNIST),
    else ``None``; ``feature_names`` names the columns when they have names.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source_index_train: np.ndarray
    source_index_test: np.ndarray
    name: str
    image_shape: tuple[int, int] | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    source_index_val: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None


def resolve_path(path: PathArg, what: str, expected: str) -> Path:
    """``path`` as a Path that exists; else an InputError saying what ``what`` expected."""
    if isinstance(path, bytes):
        path = path.decode()
    if not isinstance(path, (str, PathLike)):
        raise InputError(
            f"{what}: path must be a str or os.PathLike; got {type(path).__name__}. Pass"
            f" {expected}."
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what}: no such file or folder: '{p}'. Pass {expected}.")
    return p


def listing(folder: Path, limit: int = 8) -> str:
    """A short, sorted listing of a folder's entries for error messages."""
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def read_bytes(path: Path, what: str) -> bytes:
    """A file's bytes, gunzipped when its name ends in .gz (or it starts with the gzip magic)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{what}: cannot read '{path}' ({exc}).") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as exc:
            raise InputError(
                f"{what}: '{path}' looks gzipped but cannot be decompressed ({exc}); "
                "the file is damaged or truncated: download it again."
            ) from exc
    if path.suffix == ".gz":
        raise InputError(
            f"{what}: '{path}' ends in .gz but is not a gzip file; rename it or download it again."
        )
    return raw


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an .npz), or an empty one
NPY_MAGIC = b"\x93NUMPY"


def describe_start(path: Path, head: bytes | None = None) -> str:
    """What a file looks like from its first bytes, for messages: "it starts with 'a,b,c'", "it is
    empty" …"""
    if head is None:
        try:
            with open(path, "rb") as fh:
                head = fh.read(256)
        except OSError as exc:
            return f"it cannot be read: {exc.strerror or exc}"
    if not head:
        return "it is empty"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed"
    if head.startswith(NPY_MAGIC):
        return "it is a single .npy array"
    if head[:1] == b"\x80":
        return "it looks like a Python pickle, which upweight never loads"
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        shown = text if len(text) <= 40 else text[:40] + "…"
        return f"it is text starting with {shown!r}"
    return "it starts with the bytes " + " ".join(f"{b:02x}" for b in head[:8])


def _object_arrays(path: Path) -> list[str]:
    """Names of the arrays of an .npz whose dtype holds Python objects, read from the .npy headers
    only (nothing is unpickled)."""
    found = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        _, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    elif version == (2, 0):
                        _, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    else:  # a newer header: np.load(allow_pickle=False) below still refuses objects
                        continue
                except ValueError:
                    continue  # a damaged member: reported when it is loaded
            if dtype.hasobject:
                found.append(info.filename[: -len(".npy")])
    return found


def load_npz(
    path: Path, what: str, required: tuple[str, ...], expected: str | None = None
) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (never unpickled), with clear errors for other files or missing
    keys.

    Args:
        path: the file.
        what: who is loading (starts every message), e.g. ``"load_mnist"`` or ``"--data"``.
        required: the arrays the file must hold.
        expected: what the caller accepts, for the messages (default: an .npz with ``required``).

    Raises:
        InputError: the file is not an .npz archive (the message says what it looks like), holds
            a single .npy array, holds arrays of Python objects (refused without unpickling
            them), is damaged, or lacks one of ``required``.
    """
    if expected is None:
        expected = (
            f"a file written by np.savez / np.savez_compressed with arrays {', '.join(required)}"
        )
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError as exc:
        raise InputError(
            f"{what}: cannot read '{path}' ({exc.strerror or exc}). Pass {expected}."
        ) from exc
    if head.startswith(NPY_MAGIC):
        raise InputError(
            f"{what}: '{path}' holds a single .npy array, not an .npz archive; save the arrays "
            f"with np.savez(file, {', '.join(k + '=...' for k in required)})."
        )
    if not head.startswith(ZIP_MAGIC):
        raise InputError(
            f"{what}: cannot read '{path}' as an .npz archive: it is not one "
            f"({describe_start(path, head)}). Pass {expected}."
        )
    try:
        objects = _object_arrays(path)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(
            f"{what}: cannot read '{path}' as an .npz archive: it is a damaged zip file ({exc}). "
            "Write or download it again."
        ) from exc
    if objects:
        raise InputError(
            f"{what}: '{path}' holds array(s) of Python objects ({', '.join(objects)}), which "
            "upweight does not load: unpickling them could run code from the file. Save numeric "
            "arrays, e.g. np.savez(file, x_train=np.asarray(x, dtype=np.float32), ...)."
        )
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(
            f"{what}: cannot read '{path}' as an .npz archive ({exc}). Pass {expected}."
        ) from exc
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise InputError(
            f"{what}: '{path}' holds a single .npy array, not an .npz archive; save the arrays "
            f"with np.savez(file, {', '.join(k + '=...' for k in required)})."
        )
    try:
        arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(
            f"{what}: '{path}' is a damaged .npz archive ({exc}); write it again."
        ) from exc
    finally:
        f.close()
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(
            f"{what}: '{path}' lacks array(s) {', '.join(missing)}; it must hold "
            f"{', '.join(required)} (it has {', '.join(sorted(arrays)) or 'none'})."
        )
    return arrays


def binary_labels(positive: np.ndarray, labels: str, what: str) -> np.ndarray:
    """int64 labels from a boolean "is positive" array: ±1 (``"pm1"``) or 1/0 (``"01"``)."""
    if labels == "pm1":
        return np.where(positive, 1, -1).astype(np.int64)
    if labels == "01":
        return positive.astype(np.int64)
    raise InputError(
        f"{what}: labels must be 'pm1' (positive +1, negative −1) or '01' (1/0); got {labels!r}."
    )
