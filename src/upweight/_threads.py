"""How many intra-op threads torch uses inside upweight's own work (``upweight.set_threads``).

torch runs each operation on ``torch.get_num_threads()`` OpenMP threads (by default one per core).
On a machine whose cores are busy with other work, every parallel region then waits for a thread
that is not scheduled, and a small problem — thousands of short operations, each too small to gain
from a second thread — can run far slower than on one thread (``bench/RESULTS.md``, section
``threads``). Large products still gain from every core.

The setting, one of:

* ``"auto"`` (the default): a computation of upweight that knows its size — p parameters times n
  training points — runs on one intra-op thread when p·n < ``SMALL_WORK``; a larger one runs on
  torch's setting, lowered to the cores that other work leaves free (``free_cores``: on Linux, the
  tasks running elsewhere on the machine, counted when the computation starts) and at least one;
* a positive int N: N intra-op threads inside upweight's computations, whatever their size;
* ``"torch"``: never touch torch's setting.

It comes from ``set_threads``, else from the environment variable ``UPWEIGHT_THREADS`` (an int,
``auto`` or ``torch``), else ``"auto"``. Either way torch's own setting is changed only for the
duration of one of upweight's computations and restored after it: ``torch.get_num_threads()`` in the
user's code is never changed. ``threads(N)`` does both for a block of user code — the setting and
torch's threads — e.g. around a whole ``Influence`` query; the CLI's ``--threads N`` is that.

torch's thread count is per process: two Python threads that run upweight at once each change and
restore it, so the last to finish wins; set ``"torch"`` there and choose torch's threads yourself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Union

import torch

from .errors import InputError

#: the environment variable read when ``set_threads`` was not called
ENV = "UPWEIGHT_THREADS"

#: p·n (parameters × training points) below which ``"auto"`` runs a computation on one thread
SMALL_WORK = 10_000_000

ThreadSetting = Union[int, Literal["auto", "torch"]]

_UNSET = object()
_setting: object = _UNSET


def _check(value: object, source: str) -> ThreadSetting:
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "torch"):
            return v  # type: ignore[return-value]
        if v.isdigit() and int(v) >= 1:
            return int(v)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise InputError(
        f"{source} must be a positive int (intra-op threads), 'auto' or 'torch'; got {value!r}."
    )


def set_threads(n: ThreadSetting) -> None:
    """Set how many intra-op threads torch uses inside upweight's computations: a positive int,
    ``"auto"`` (one thread for small problems, p·n < ``SMALL_WORK``; for the rest torch's setting,
    lowered to the cores that other work leaves free)
    or ``"torch"`` (leave torch's setting alone). Overrides ``UPWEIGHT_THREADS``. torch's own
    setting outside upweight's calls is not changed.

    Raises:
        InputError: ``n`` is none of these.
    """
    global _setting
    _setting = _check(n, "upweight.set_threads(n)")


def get_threads() -> ThreadSetting:
    """The setting in force: ``set_threads``'s, else ``UPWEIGHT_THREADS``, else ``"auto"``.

    Raises:
        InputError: ``UPWEIGHT_THREADS`` holds none of the allowed values.
    """
    if _setting is not _UNSET:
        return _setting  # type: ignore[return-value]
    env = os.environ.get(ENV)
    if env is None or not env.strip():
        return "auto"
    return _check(env, f"The environment variable {ENV}")


def _own_running() -> int:
    """How many of this process's threads are running or runnable now (Linux ``/proc``)."""
    n = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        n += text[text.rfind(")") + 2 :].startswith("R")  # the state follows "(name) "
    return n


def free_cores(samples: int = 3, gap: float = 0.001) -> float | None:
    """The usable cores (``os.sched_getaffinity``) that other work leaves free now, or ``None``
    where the platform does not say (no ``/proc/loadavg``).

    Other work = the tasks running or runnable on the whole machine (``/proc/loadavg``'s fourth
    field) less this process's own threads (counted just before and just after it, the larger), the
    fewest of ``samples`` readings ``gap`` seconds apart: a task that runs for a moment is not load.
    The readings take a few milliseconds, so only computations too large for one thread make them.
    Where the process may use only some of the machine's cores (a container's cpuset), that work is
    taken to be spread evenly: its share on our cores is others × usable / ``os.cpu_count()``.
    """
    try:
        readings = []
        for i in range(max(1, samples)):
            if i:
                time.sleep(gap)
            before = _own_running()
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            readings.append(running - max(before, _own_running()))
        others = min(readings)
        usable = len(os.sched_getaffinity(0))
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    share = max(others, 0) * usable / max(os.cpu_count() or usable, usable)
    return max(usable - share, 0.0)


def _resolve(work: float | None) -> int | None:
    """The intra-op threads for a computation of size ``work`` (p·n; ``None`` or ≤ 0 if unknown), or
    ``None`` to leave torch's setting."""
    setting = get_threads()
    if setting == "torch":
        return None
    if setting != "auto":
        return int(setting)
    if work is not None and 0 < work < SMALL_WORK:
        return 1
    current = torch.get_num_threads()
    free = free_cores() if current > 1 else None
    if free is None or free >= current:
        return None
    return max(1, int(free + 0.5))


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def intra_op_threads(work: float | None = None) -> Iterator[None]:
    """Inside upweight: run the block on the intra-op threads the setting gives for a computation of
    size ``work`` (p·n), restoring torch's setting after it."""
    with _torch_threads(_resolve(work)):
        yield


@contextmanager
def threads(n: ThreadSetting) -> Iterator[None]:
    """``set_threads(n)`` for the duration of the block, and — for an int ``n`` — torch's intra-op
    threads too, so that all of upweight's work inside it (gradients, solves, scoring) runs on ``n``
    threads. Both are restored after it.

        with upweight.threads(1):
            scores = Influence(obj, solver=Direct()).fit(train).up_loss(test)
    """
    global _setting
    value = _check(n, "upweight.threads(n)")
    saved = _setting
    _setting = value
    try:
        with _torch_threads(value if isinstance(value, int) else None):
            yield
    finally:
        _setting = saved
