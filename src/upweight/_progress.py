"""Progress bars (tqdm) and the ``upweight`` logger.

One switch silences every bar: ``progress(..., enabled=False)`` for one loop, and
``progress_enabled(False)`` for everything run inside it (``Influence(progress=False)`` wraps its
solvers' work in it, so a solver's own bar follows the estimator's setting).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
logger = logging.getLogger("upweight")
_ENABLED: ContextVar[bool] = ContextVar("upweight_progress", default=True)


@contextmanager
def progress_enabled(enabled: bool) -> Iterator[None]:
    """Within this block, bars show only if ``enabled`` (and no enclosing block turned them off)."""
    token = _ENABLED.set(bool(enabled) and _ENABLED.get())
    try:
        yield
    finally:
        _ENABLED.reset(token)


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (and bars are on here); bars shorter than 2 s stay hidden."""
    if not (enabled and _ENABLED.get()):
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, leave=False, mininterval=0.5, delay=2.0)
