"""Memory estimates before big allocations: how much is available, and a check that raises
``InsufficientMemoryError`` (naming the size, the available memory and what to do instead)
before any work is done.

``UPWEIGHT_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix: ``"2G"``) caps the memory upweight
plans for, below what the machine reports (e.g. on a shared node or inside a job's allocation).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import InputError, InsufficientMemoryError

#: the share of the available memory one result or working set may take
DEFAULT_FRACTION = 0.8
ENV_LIMIT = "UPWEIGHT_MEMORY_LIMIT"
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def format_bytes(n: float) -> str:
    """``"1.5 GiB"``-style size.

    Examples:
        >>> format_bytes(3 * 2**30), format_bytes(512)
        ('3.0 GiB', '512 B')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _env_limit() -> int | None:
    raw = os.environ.get(ENV_LIMIT, "").strip()
    if not raw:
        return None
    num, unit = raw.upper().rstrip("IB"), ""
    if num and num[-1] in _SUFFIX:
        num, unit = num[:-1], num[-1]
    try:
        value = float(num) * _SUFFIX[unit]
    except ValueError as exc:
        raise InputError(
            f"{ENV_LIMIT}={raw!r} is not a size; use bytes or a K/M/G/T suffix, e.g."
            f" {ENV_LIMIT}=4G."
        ) from exc
    if value <= 0:
        raise InputError(f"{ENV_LIMIT}={raw!r} must be positive.")
    return int(value)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` less ``memory.current``), if
    any."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(open("/sys/fs/cgroup/memory.current").read().strip()))
    except (OSError, ValueError):
        return None


def _host_available() -> int:
    """Linux's MemAvailable if readable, else the free physical pages, else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            continue
    return 4 * 2**30


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes a new allocation on ``device`` can take: free GPU memory for a CUDA device; for the
    CPU the smallest of MemAvailable, the cgroup's remaining limit and ``UPWEIGHT_MEMORY_LIMIT``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        found = int(free)
    else:
        found = _host_available()
        cg = _cgroup_limit()
        if cg is not None:
            found = min(found, cg)
    env = _env_limit()
    return found if env is None else min(found, env)


def check_memory(
    nbytes: int,
    what: str,
    *,
    alternatives: str = "",
    device: torch.device | str | None = None,
    fraction: float = DEFAULT_FRACTION,
) -> None:
    """Raise ``InsufficientMemoryError`` if ``nbytes`` exceed ``fraction`` of the available memory.

    Args:
        nbytes: the size of what is about to be allocated (or its peak working set).
        what: what it is, with its shape (``"the (100, 55000) float64 score matrix"``).
        alternatives: what the user can do instead (a sentence).
        device: where it will live (CPU by default).

    Examples:
        >>> check_memory(1024, "a small buffer")           # fits: returns None
        >>> check_memory(2**62, "the dense Hessian", alternatives="Use CG.")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        upweight.errors.InsufficientMemoryError: the dense Hessian needs 4194304.0 TiB ... Use CG.
    """
    nbytes = int(nbytes)
    avail = available_memory(device)
    if nbytes > fraction * avail:
        where = (
            "GPU memory" if device is not None and torch.device(device).type == "cuda" else "memory"
        )
        raise InsufficientMemoryError(
            f"{what} needs {format_bytes(nbytes)} but only {format_bytes(avail)} of {where} is"
            f" available (upweight uses at most {fraction:.0%} of it; {ENV_LIMIT} lowers the"
            " limit)." + (f" {alternatives}" if alternatives else ""),
            required_bytes=nbytes,
            available_bytes=avail,
        )


def tensor_bytes(shape: Any, dtype: torch.dtype | str) -> int:
    """Bytes of a dense array of ``shape`` and ``dtype`` (torch or NumPy dtype name)."""
    n = 1
    for s in shape:
        n *= int(s)
    if isinstance(dtype, torch.dtype):
        item = torch.empty((), dtype=dtype).element_size()
    else:
        import numpy as np

        item = np.dtype(dtype).itemsize
    return n * item
