"""Scale-out executors (optional extra: ``pip install upweight[dask]``).

``from upweight.distributed import DaskExecutor`` imports no Dask: Dask is imported when an
executor is constructed, and a missing install is reported with the command that fixes it.
"""

from __future__ import annotations

from .dask import DaskExecutor, ExecutorConnectionError

__all__ = ["DaskExecutor", "ExecutorConnectionError"]
