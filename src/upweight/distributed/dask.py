"""``DaskExecutor``: run upweight's map-reduce passes on a Dask cluster.

Implements ``upweight._executor.Executor``. The objective, the data and (for self-influence)
the prepared solver are placed on the workers once with ``Client.scatter(..., broadcast=True)``;
each task then receives only its partition of training-point indices and the small per-call
inputs (the HVP block V or s_test, scattered once per call). Results come back in partition
order and are reduced on the client in that order, so a run is deterministic.

Dask is an optional dependency: ``pip install upweight[dask]``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from .._executor import run_task
from ..errors import ExecutorConnectionError, InputError

R = TypeVar("R")


def _ignore_interrupts() -> None:
    """Run on each worker of a cluster this process started. Ctrl-C reaches the whole process
    group, workers included; the client handles it (the queued tasks are cancelled, the cluster
    closed, the store keeps what finished), so the workers ignore it instead of each printing a
    traceback of their event loop."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - exercised only without dask installed
        raise ImportError(
            "DaskExecutor needs dask.distributed, which is not installed. Install it with "
            "`pip install upweight[dask]` (or `pip install 'dask[distributed]'`)."
        ) from exc
    return distributed


class DaskExecutor:
    """Runs upweight's passes over the training data on a Dask cluster.

    Args:
        address: ``"local"`` starts a ``dask.distributed.LocalCluster`` on this machine (closed by
            ``close()``); ``"tcp://host:port"`` connects to a running scheduler; ``None`` uses the
            current default ``Client`` if there is one, else starts a local cluster; a
            ``distributed.Client`` is used as given (and not closed).
        n_workers: workers of the local cluster (default: Dask's choice).
        threads_per_worker: threads per local worker. 1 suits torch, whose own threads do the
            vectorised work.
        processes: local workers as processes (True) or threads of this process (False).
        connect_timeout: seconds to wait for a remote scheduler before ``ExecutorConnectionError``.
        max_in_flight: tasks queued at once per unit of parallelism (bounds client memory).
        inline_bytes: per-call arrays up to this size travel inside each task; larger ones are
            scattered once per call.

    Examples:
        >>> from upweight.distributed import DaskExecutor  # doctest: +SKIP
        >>> with DaskExecutor("local", n_workers=2) as ex:  # doctest: +SKIP
        ...     inf = Influence(objective).fit(train, executor=ex)
        ...     scores = inf.up_loss(test, store="runs/mnist")
    """

    def __init__(
        self,
        address: Any = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        processes: bool = True,
        connect_timeout: float = 10.0,
        max_in_flight: int = 4,
        inline_bytes: int = 2**20,
    ) -> None:
        distributed = _import_distributed()
        if n_workers is not None and (not isinstance(n_workers, int) or n_workers < 1):
            raise InputError(f"n_workers must be a positive integer or None; got {n_workers!r}.")
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise InputError(f"max_in_flight must be a positive integer; got {max_in_flight!r}.")
        self._cluster: Any = None
        self._owns_client = True
        self.max_in_flight = max_in_flight
        self.inline_bytes = int(inline_bytes)
        if isinstance(address, distributed.Client):
            self.client, self._owns_client = address, False
        elif address is None or address == "local":
            client = None
            if address is None:
                try:
                    client = distributed.default_client()
                    self._owns_client = False
                except ValueError:
                    client = None
            if client is None:
                try:
                    self._cluster = distributed.LocalCluster(
                        n_workers=n_workers,
                        threads_per_worker=threads_per_worker,
                        processes=processes,
                        dashboard_address=":0",
                        silence_logs=logging.ERROR,
                    )
                    client = distributed.Client(self._cluster, set_as_default=False)
                    if processes:
                        client.run(_ignore_interrupts)
                except Exception as exc:
                    self._close_cluster()
                    raise ExecutorConnectionError(
                        f"Could not start a local Dask cluster (n_workers={n_workers},"
                        f" processes={processes}): {exc}. Try DaskExecutor('local',"
                        " processes=False), or connect to a running scheduler with"
                        " DaskExecutor('tcp://host:8786')."
                    ) from exc
            self.client = client
        elif isinstance(address, str):
            if n_workers is not None:
                raise InputError(
                    "n_workers only applies to address='local'; a remote cluster has its own"
                    " workers."
                )
            try:
                self.client = distributed.Client(
                    address, timeout=connect_timeout, set_as_default=False
                )
            except (OSError, TimeoutError) as exc:
                raise ExecutorConnectionError(
                    f"Could not reach the Dask scheduler at {address!r} within {connect_timeout:g}"
                    f" s ({exc}). Check that `dask scheduler` runs there and the port is open, or"
                    " use DaskExecutor('local') to start a cluster on this machine."
                ) from exc
            # a malformed address (no port, a port out of range, …)
            except (ValueError, TypeError) as exc:
                raise InputError(
                    f"{address!r} is not a Dask scheduler address ({exc}). Use the form"
                    " 'tcp://host:8786', or DaskExecutor('local') to start a cluster on this"
                    " machine."
                ) from exc
        else:
            raise InputError(
                "address must be None, 'local', a scheduler address like 'tcp://host:8786', or a"
                f" distributed.Client; got {type(address).__name__}."
            )

    # ── Executor protocol ───────────────────────────────────────────────────────────
    @property
    def parallelism(self) -> int:
        """Threads across the cluster's workers (at least 1)."""
        return max(1, sum(self.client.nthreads().values()))

    def share(self, obj: Any) -> Any:
        """Send ``obj`` to every worker once; returns a Future to pass to ``map``."""
        return self.client.scatter(obj, broadcast=True, hash=False)

    def _place(self, arg: Any) -> Any:
        distributed = _import_distributed()
        if isinstance(arg, distributed.Future) or not isinstance(arg, (torch.Tensor, np.ndarray)):
            return arg
        nbytes = arg.nbytes if isinstance(arg, np.ndarray) else arg.numel() * arg.element_size()
        if nbytes <= self.inline_bytes:
            return arg  # cheaper inside each task than one more round trip to the scheduler
        # a large per-call array (V, s_test) goes to the cluster once, not once per task
        return self.client.scatter(arg, hash=False)

    def map(self, fn: Callable[..., R], partitions: Sequence[Any], *args: Any) -> Iterator[R]:
        """Yield ``fn(part, *args)`` per partition in partition order, keeping a bounded number
        queued.

        Closing the iterator early (an error, ``KeyboardInterrupt``) cancels the queued tasks.
        """
        if not len(partitions):
            return
        placed = [self._place(a) for a in args]
        window = self.max_in_flight * self.parallelism
        queue: deque[Any] = deque()
        todo = iter(partitions)
        try:
            for part in todo:
                queue.append(self.client.submit(run_task, fn, part, *placed, pure=False))
                if len(queue) >= window:
                    break
            while queue:
                result = queue.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append(self.client.submit(run_task, fn, nxt, *placed, pure=False))
                yield result
        finally:
            if queue:
                self.client.cancel(list(queue))

    def map_reduce(
        self,
        fn: Callable[..., R],
        partitions: Sequence[Any],
        reduce: Callable[[R, R], R],
        *args: Any,
    ) -> R:
        """``reduce`` folded left over the results in partition order (on the client)."""
        it = self.map(fn, partitions, *args)
        acc = next(it)
        for r in it:
            acc = reduce(acc, r)
        return acc

    # ── lifetime ───────────────────────────────────────────────────────────────────
    def _close_cluster(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def close(self) -> None:
        """Close the client and the local cluster this executor started (not a client it was
        given)."""
        if self._owns_client and getattr(self, "client", None) is not None:
            self.client.close()
        self._close_cluster()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        where = (
            "local cluster"
            if self._cluster is not None
            else getattr(self.client, "scheduler_info", lambda: {})().get("address", "?")
        )
        return f"DaskExecutor({where}, parallelism={self.parallelism})"
