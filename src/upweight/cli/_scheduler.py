"""``--scheduler local|tcp://HOST:PORT``: the Dask executor of a command, opened for its duration."""

from __future__ import annotations

import contextlib
from typing import Any

from .._executor import Executor


def open_executor(stack: contextlib.ExitStack, scheduler: str | None, say: Any) -> Executor | None:
    """``None`` (work in this process) without ``--scheduler``; else a ``DaskExecutor`` closed with ``stack``."""
    if scheduler is None:
        return None
    from ..distributed import DaskExecutor

    executor = stack.enter_context(DaskExecutor(scheduler))
    say(f"Dask: {executor}")
    return executor
