"""How many training points one batch may hold: a byte budget divided by the bytes one point
costs, between a floor and the caller's ``batch_size``.

**Why budgets.** glibc's malloc serves every allocation at or above its mmap threshold (dynamic,
at most 32 MiB on 64-bit Linux) with a fresh mapping and unmaps it on free, so a batch whose
tensors exceed the threshold page-faults each of them in anew, batch after batch; below it the
allocator reuses its heap. Batches sized so that their largest tensor stays within
``TENSOR_BYTES`` avoid most of that: per-sample-gradient sweeps and EK-FAC's correction pass run
markedly faster than in large chunks, while with glibc's threshold raised so that it never maps
(no page faults) the large chunks are the faster ones — the allocator is the cause, and the budget
recovers most of the loss without changing a process-wide allocator setting
(``bench/bench_batch_budget.py``, section ``batch-budget`` of bench/RESULTS.md). How much exactly
depends on the allocator's history in the process (its threshold grows to the largest mapped chunk
freed so far, at most 32 MiB, and its heap is trimmed above twice that). Users of the budgets:

* per-sample gradients (``core.grads.grad_chunk_size``): the (b, p) chunk ≤ ``TENSOR_BYTES``;
* K-FAC/EK-FAC factor passes (``core.kfac``): each captured layer input / cotangent block and
  EK-FAC's rotated pseudo-gradients ≤ ``TENSOR_BYTES``;
* generic HVPs (``Curvature.hvp_batch_size``), the gradient of the risk (``core.grads.risk_grad``)
  and K-FAC's captures: the whole autograd graph of a batch ≤ ``GRAPH_BYTES`` (its tensors are each
  far smaller);
* everything one layer capture holds — K-FAC's factor passes (``core.kfac``), structured scoring
  and structured per-sample gradients (``core.structured``): its layers' inputs and cotangents,
  the contractions' intermediates and the forward graph ≤ ``CAPTURE_BYTES``.
"""

from __future__ import annotations

#: the largest single tensor a batch should allocate: half of glibc's largest mmap threshold (32
#: MiB), leaving room for allocation headers and for the threshold not yet having grown to its
#: maximum
TENSOR_BYTES = 16 * 2**20
#: the autograd graph one batch may hold (forward activations, and for an HVP the first backward's
#: intermediates): 32 MiB, glibc's largest mmap threshold, so no tensor of it exceeds that
GRAPH_BYTES = 32 * 2**20
#: all that one capture of a batch's layer inputs and output cotangents may hold, with what is
#: computed from it. Twice the graph budget: a transformer's captures are of the graph's own size;
#: a larger budget buys fewer, larger batches at a higher peak (peak memory and time against
#: kronfluence's: ``bench/RESULTS.md``, sections ``peers-W5:1000`` and ``peers-W5:1000:K100``)
CAPTURE_BYTES = 2 * GRAPH_BYTES
#: the smallest batch a graph budget may choose (the per-batch forward and backward overhead grows
#: as batches shrink)
MIN_GRAPH_BATCH = 16


def points_within(budget: int, bytes_per_point: float, batch_size: int, min_points: int = 1) -> int:
    """Points per batch: ``budget // bytes_per_point``, at least ``min_points``, at most
    ``batch_size`` (``batch_size`` itself when ``bytes_per_point`` ≤ 0, i.e. nothing grows with the
    batch).

    Examples:
        >>> # softmax regression on MNIST: 7,850 float32 per point
        >>> points_within(16 * 2**20, 31_400, 2048)
        534
        >>> points_within(16 * 2**20, 4_275_240, 2048)  # a 1M-parameter MLP
        3
        >>> points_within(16 * 2**20, 4_275_240, 2048, min_points=16)
        16
    """
    if bytes_per_point <= 0:
        return max(1, batch_size)
    return max(1, min(batch_size, max(min_points, int(budget // bytes_per_point))))
