"""Progress bars (tqdm) and the ``upweight`` logger.

Every long step draws its bar through this module: ``progress(iterable, ...)`` wraps a loop
over an iterable, ``progress_bar(total=..., desc=...)`` is a bar a loop updates itself, with
live values in its postfix (CG's current residual, …). tqdm draws them on stderr; a bar waits
``DELAY`` seconds before it first draws, so a step that finishes sooner prints nothing.

One switch silences every bar, at three levels:

* ``progress(..., enabled=False)`` / ``progress_bar(..., enabled=False)`` for one loop;
* ``progress_enabled(False)`` for everything run inside it (``Influence(progress=False)`` wraps
  its gradient pass and its solvers' work in it, so a solver's own bars follow the estimator's
  setting);
* the environment variable ``UPWEIGHT_PROGRESS``: ``0`` (or ``false``, ``no``, ``off``)
  silences every bar of the process, read whenever a bar is created — for CI logs and notebooks,
  without code changes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Integral, Real
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
logger = logging.getLogger("upweight")
_ENABLED: ContextVar[bool] = ContextVar("upweight_progress", default=True)

#: the environment variable that silences every bar when set to 0, false, no or off
ENV_VAR = "UPWEIGHT_PROGRESS"
#: seconds a bar waits before it first draws: shorter loops print nothing
DELAY = 2.0
#: least seconds between two redraws of a bar (and between two evaluations of its lazy postfix
#: values)
MININTERVAL = 0.5


def _env_allows() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def progress_on(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` shows here: not turned off for this loop, by an
    enclosing ``progress_enabled(False)``, or by ``UPWEIGHT_PROGRESS=0``."""
    return bool(enabled) and _ENABLED.get() and _env_allows()


@contextmanager
def progress_enabled(enabled: bool) -> Iterator[None]:
    """Within this block, bars show only if ``enabled`` (and no enclosing block turned them off)."""
    token = _ENABLED.set(bool(enabled) and _ENABLED.get())
    try:
        yield
    finally:
        _ENABLED.reset(token)


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (and bars are on here); bars shorter than
    ``DELAY`` stay hidden."""
    if not progress_on(enabled):
        yield from iterable
        return
    yield from tqdm(
        iterable,
        desc=desc,
        total=total,
        leave=False,
        mininterval=MININTERVAL,
        miniters=1,
        delay=DELAY,
    )


PostfixValue = Any  # a number, a string, a 0-d tensor, or a callable returning one of these


class NoBar:
    """What ``progress_bar`` gives when bars are off: every method does nothing, and the object is
    false, so ``if bar:`` skips work done only for the display."""

    def __bool__(self) -> bool:
        return False

    def update(self, n: int = 1, **postfix: PostfixValue) -> None:
        """Nothing (see ``ProgressBar.update``)."""

    def set_postfix(self, **postfix: PostfixValue) -> None:
        """Nothing (see ``ProgressBar.set_postfix``)."""


class ProgressBar:
    """A tqdm bar that a loop advances itself: ``update(n, **postfix)``.

    Postfix values show as ``name=value`` after the bar; floats in ``.2e``. A value may be a
    callable (or a tensor): it is evaluated only when the bar is about to redraw (at most every
    ``MININTERVAL`` seconds, never before ``DELAY``), so a live value that costs a device sync
    (a residual norm on the GPU) costs it about twice a second, not every iteration.
    """

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._postfix: dict[str, PostfixValue] = {}
        self._next = time.monotonic() + DELAY

    def __bool__(self) -> bool:
        return True

    @property
    def n(self) -> int:
        """The updates so far."""
        return int(self._bar.n)

    def set_postfix(self, **postfix: PostfixValue) -> None:
        """Set postfix values (kept until replaced), shown at the next redraw."""
        self._postfix.update(postfix)
        self._refresh_postfix()

    def update(self, n: int = 1, **postfix: PostfixValue) -> None:
        """Advance by ``n`` steps, with new postfix values (see the class docstring)."""
        if postfix:
            self._postfix.update(postfix)
        self._refresh_postfix()
        self._bar.update(n)

    def _refresh_postfix(self) -> None:
        """Evaluate and format the postfix values, if the bar may redraw now."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + MININTERVAL
        self._bar.set_postfix({k: _format(v) for k, v in self._postfix.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _format(value: PostfixValue) -> str:
    if callable(value):
        value = value()
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:  # a 0-d tensor / array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        return str(value)
    if isinstance(value, Integral):
        return str(value)
    return f"{value:.2e}" if math.isfinite(value) else str(value)


@contextmanager
def progress_bar(
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "it",
    postfix: dict[str, PostfixValue] | None = None,
) -> Iterator[ProgressBar | NoBar]:
    """A bar for a loop that is not a plain iterable, or whose postfix carries live values.

    Yields a ``ProgressBar`` when bars show here (``progress_on(enabled)``), else a ``NoBar``
    whose methods do nothing. The bar is removed when the block exits.

    Examples:
        >>> with progress_bar(desc="CG", total=100, postfix={"rtol": 1e-6}) as bar:
        ...     for it in range(3):
        ...         bar.update(1, residual=10.0 ** -it)
    """
    if not progress_on(enabled):
        yield NoBar()
        return
    bar = ProgressBar(
        tqdm(
            desc=desc,
            total=total,
            unit=unit,
            leave=False,
            mininterval=MININTERVAL,
            miniters=1,
            delay=DELAY,
        )
    )
    try:
        if postfix:
            bar.set_postfix(**postfix)
        yield bar
    finally:
        bar.close()
