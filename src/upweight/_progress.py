"""Progress bars (tqdm) and the ``upweight`` logger."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
logger = logging.getLogger("upweight")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled``; bars shorter than 2 s stay hidden."""
    if not enabled:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, leave=False, mininterval=0.5, delay=2.0)
