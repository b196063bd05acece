"""Executors: where the map-reduce passes over the training data run.

Every expensive pass over the data — the full-data Hessian-vector product
H v = (1/n) Σᵢ ∇²θL(zᵢ, θ̂) v + l2·v (Koh & Liang 2017, §3) and the train-side scoring sweep
−s_testᵀ∇θL(zᵢ, θ̂) (Eq. 2) — is a sum or a concatenation over *partitions* of training-point
indices. An ``Executor`` runs one pure function per partition:

* ``LocalExecutor`` (the default) runs them one after another in this process;
* ``upweight.distributed.DaskExecutor`` runs them on a Dask cluster.

Large inputs every task needs (the objective and the data) are placed once with
``share(obj)``; the handle it returns is passed to ``map`` in place of the object, so a
distributed executor sends them to each worker once instead of once per task.

A task that itself reaches a full-data pass (a CG solve inside a self-influence chunk) runs
that pass in-process: ``inside_task()`` is true while a task function runs.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from .errors import InputError

R = TypeVar("R")

_state = threading.local()


def inside_task() -> bool:
    """True while this thread runs a task function of an executor (nested passes then stay
    local)."""
    return bool(getattr(_state, "depth", 0))


def run_task(fn: Callable[..., R], partition: Any, *args: Any) -> R:
    """Call ``fn(partition, *args)`` marked as a task (see ``inside_task``)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        return fn(partition, *args)
    finally:
        _state.depth -= 1


_private = threading.local()


def thread_private(obj: Any, *, share: tuple[Any, ...] = ()) -> Any:
    """``obj`` itself on the main thread; on any other thread (an executor's worker thread) a deep
    copy private to that thread, made once and cached.

    ``torch.func.functional_call`` swaps a module's parameters while it runs, so two worker
    threads — or a worker thread and the thread sending the shared object to a peer worker —
    must not use the same module at once. Objects in ``share`` (read-only data) are not copied.
    """
    if threading.current_thread() is threading.main_thread():
        return obj
    cache = getattr(_private, "cache", None)
    if cache is None:
        cache = _private.cache = weakref.WeakKeyDictionary()
    if obj not in cache:
        cache[obj] = copy.deepcopy(obj, {id(s): s for s in share})
    return cache[obj]


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn(partition, *args)`` over partitions of training-point indices.

    Attributes:
        parallelism: how many tasks it runs at once (1 for ``LocalExecutor``); callers split the
            data into at least this many partitions.
    """

    parallelism: int

    def share(self, obj: Any) -> Any:
        """Place ``obj`` where tasks run, once; pass the returned handle to ``map`` as an
        argument."""
        ...

    def map(self, fn: Callable[..., R], partitions: Sequence[Any], *args: Any) -> Iterator[R]:
        """Yield ``fn(part, *args)`` for each partition, in partition order."""
        ...

    def map_reduce(
        self,
        fn: Callable[..., R],
        partitions: Sequence[Any],
        reduce: Callable[[R, R], R],
        *args: Any,
    ) -> R:
        """``reduce`` folded left over ``map(fn, partitions, *args)`` in partition order
        (deterministic)."""
        ...


class LocalExecutor:
    """In-process, sequential executor: ``map`` is a plain loop, ``share`` returns the object
    itself.

    Examples:
        >>> ex = LocalExecutor()
        >>> list(ex.map(lambda part, c: int(part.sum()) * c, split_indices(6, 2), 10))
        [10, 50, 90]
        >>> ex.map_reduce(lambda part: int(part.sum()), split_indices(6, 4), lambda a, b: a + b)
        15
    """

    parallelism = 1

    def share(self, obj: Any) -> Any:
        return obj

    def map(self, fn: Callable[..., R], partitions: Sequence[Any], *args: Any) -> Iterator[R]:
        for part in partitions:
            yield run_task(fn, part, *args)

    def map_reduce(
        self,
        fn: Callable[..., R],
        partitions: Sequence[Any],
        reduce: Callable[[R, R], R],
        *args: Any,
    ) -> R:
        return functools.reduce(reduce, self.map(fn, partitions, *args))

    def __repr__(self) -> str:
        return "LocalExecutor()"


def split_indices(n: int, size: int, *, min_parts: int = 1, start: int = 0) -> list[np.ndarray]:
    """Consecutive index blocks covering ``start … start+n−1``: each at most ``size`` long, and at
    least ``min_parts`` of them when n allows (so every worker of a cluster gets work)."""
    if n <= 0:
        return []
    size = max(1, min(int(size), -(-n // max(1, min_parts))))
    return [
        np.arange(start + s, start + min(s + size, n), dtype=np.int64) for s in range(0, n, size)
    ]


def resolve(executor: Any) -> Executor:
    """``None`` → a ``LocalExecutor``; anything else must implement the ``Executor`` protocol."""
    if executor is None:
        return LocalExecutor()
    if not isinstance(executor, Executor):
        raise InputError(
            "executor must be an upweight Executor (LocalExecutor,"
            f" upweight.distributed.DaskExecutor) or None; got {type(executor).__name__}."
        )
    return executor
