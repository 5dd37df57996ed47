"""Host threads for the certified computations: independent chunks of work on every core.

NumPy releases the GIL inside its BLAS and LAPACK calls, so chunks of matrices
certified in threads run in parallel (SciPy's LAPACK wrappers, such as
``scipy.linalg.lapack.zpotrf``, hold it: code run here factors through NumPy). While
they run, BLAS is limited to one thread (threadpoolctl): many small products and
factorizations run one per core instead of BLAS's own threads competing for the same
cores.

``LIPNORM_NUM_THREADS`` sets the number of threads (default: the CPUs this process may
use).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from threadpoolctl import threadpool_limits

__all__ = ["parallel_map", "worker_count"]

Item = TypeVar("Item")
Result = TypeVar("Result")


def worker_count() -> int:
    """Threads for host computations: ``LIPNORM_NUM_THREADS``, else the usable CPUs.

    Raises
    ------
    ValueError
        If ``LIPNORM_NUM_THREADS`` is not a positive integer.
    """
    configured = os.environ.get("LIPNORM_NUM_THREADS")
    if configured is not None:
        if not configured.strip().isdigit() or int(configured) < 1:
            raise ValueError(f"LIPNORM_NUM_THREADS must be a positive integer, got {configured!r}")
        return int(configured)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parallel_map(function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """``[function(item) for item in items]``, in threads, with single-threaded BLAS.

    Results come back in the order of ``items``; the first exception raised by a call
    is raised here. A single item runs in the calling thread with BLAS's own threads.
    """
    items = list(items)
    if len(items) == 1:
        return [function(items[0])]
    workers = min(worker_count(), len(items))
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(function, items))
