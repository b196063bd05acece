"""Output files of figures, reports and results: checked before any work, written atomically.

``check_output_file`` / ``check_output_folder`` answer, without writing anything, whether a
path can become the file or folder asked for: a command calls them before it trains, so that a
typo in ``--out`` costs a second, not the run. ``write_text_atomic`` and ``write_atomic`` write
through ``upweight.store``'s temporary-file-then-``os.replace`` helper: a reader, a crash or a
full disk never leaves a partial or empty file at the target (it keeps its previous content, or
does not exist), and the temporary file is removed on failure.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError
from ..store import atomic_write

__all__ = [
    "check_output_file",
    "os_error_fix",
    "check_output_folder",
    "figure_formats",
    "write_atomic",
    "write_text_atomic",
]


def figure_formats() -> tuple[str, ...]:
    """The file suffixes matplotlib can write here (without the dot, sorted), e.g. ``png``,
    ``pdf``."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def _nearest_existing(p: Path) -> Path:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_parent(p: Path, what: str, shown: str) -> None:
    """The folders above ``p`` exist or can be created, and the nearest existing one is writable."""
    base = _nearest_existing(p)
    if not base.is_dir():
        raise InputError(
            f"{what} {shown}: cannot create the folder {p.parent}, because {base} is a file, "
            "not a folder; choose another place."
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what} {shown}: no permission to write in {base}; choose another place.")


def check_output_file(
    path: str | os.PathLike[str], *, what: str, suffixes: Iterable[str], example: str
) -> Path:
    """``path`` as a ``Path`` once it is sure that a file of one of ``suffixes`` can be written
    there.

    Nothing is created. Refused: a name whose suffix is not in ``suffixes`` (compared without
    case), a path ending in a separator or naming an existing folder, a path under a regular
    file, and a nearest existing folder without write permission.

    Args:
        path: the file to be written.
        what: how the user named it, e.g. ``"--report"`` (starts the message).
        suffixes: accepted suffixes with their dot, e.g. ``(".html", ".htm")``.
        example: a file name to suggest, e.g. ``"out/report.html"``.

    Raises:
        InputError: saying what is wrong with the path and what to pass instead.
    """
    shown = os.fspath(path)
    accepted = tuple(s.lower() for s in suffixes)
    p = Path(path)
    if shown.endswith(("/", os.sep)) or p.is_dir():
        kind = "that is a folder" if p.is_dir() else "that names a folder (it ends in a separator)"
        raise InputError(
            f"{what} {shown}: {kind}; give a file name inside it, e.g. "
            f"{Path(shown) / Path(example).name}."
        )
    if p.suffix.lower() not in accepted:
        if len(accepted) <= 2:
            listed = " or ".join(accepted)
        else:
            listed = "one of " + ", ".join(accepted)
        got = f"'{p.suffix}'" if p.suffix else "no suffix"
        raise InputError(
            f"{what} {shown}: the file name must end in {listed} (it has {got}); e.g. {example}."
        )
    if p.exists() and not p.is_file():
        raise InputError(f"{what} {shown}: exists and is not a regular file; choose another name.")
    _check_parent(p, what, shown)
    return p


def check_output_folder(
    path: str | os.PathLike[str],
    *,
    what: str,
    inside: Iterable[str] = (),
    folders: Iterable[str] = (),
) -> Path:
    """``path`` as a ``Path`` once it is sure that it is, or can become, a writable folder.

    Nothing is created. Refused: an existing regular file (or anything but a folder), a path
    under a regular file, a folder (or nearest existing parent) without write permission, a
    folder in which one of the names in ``inside`` (files the command will write there) is a
    folder, or one of the names in ``folders`` (sub-folders it will write) is not a folder.

    Raises:
        InputError: saying what is wrong with the path and what to pass instead.
    """
    shown = os.fspath(path)
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise InputError(
                f"{what} {shown}: that is a file, but a folder is needed here; give a folder "
                "(it is created if missing)."
            )
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(
                f"{what} {shown}: no permission to write in this folder; choose another place."
            )
        for name in inside:
            if (p / name).is_dir():
                raise InputError(
                    f"{what} {shown}: {p / name} is a folder, but this command writes a file of "
                    "that name there; move it away or choose another folder."
                )
        for name in folders:
            if (p / name).exists() and not (p / name).is_dir():
                raise InputError(
                    f"{what} {shown}: {p / name} is a file, but this command keeps a folder of "
                    "that name there; move it away or choose another folder."
                )
        return p
    _check_parent(p, what, shown)
    return p


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(fh)`` (a binary file object) atomically; returns the path.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and moved
    onto ``path`` with ``os.replace``. If anything fails (``OSError`` such as a full disk, or an
    exception of ``write``) the temporary file is removed and the exception propagates — an
    ``OSError`` with ``filename`` set to ``path`` — and ``path`` is untouched.
    """
    p = Path(path)
    try:
        atomic_write(p, write)
    except OSError as exc:
        if exc.filename is None or Path(os.fsdecode(exc.filename)) != p:
            # a failed write or fsync names no file, a failed open names the temporary one: name the
            # target
            raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(p)) from exc
        raise
    return p


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see ``write_atomic``); returns the path."""
    data = text.encode(encoding)
    return write_atomic(path, lambda fh: fh.write(data))


def os_error_fix(exc: OSError) -> str:
    """What to do about a failed read or write, from its ``errno`` (for one-line error messages)."""
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "free some disk space or choose a folder on another disk"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a place you may write to (or read from), or change its permissions"
    if code == errno.ENOENT:
        return "check the path: the file or a folder above it does not exist"
    if code == errno.EISDIR:
        return "give a file name, not a folder"
    if code == errno.EPIPE:
        return (
            "the output was closed before the command finished (e.g. piped into head); let it run"
            " to the end"
        )
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder; check the path"
    return "check the path and try again"
