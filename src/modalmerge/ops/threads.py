"""The threads that share one kernel call on a large block, owned by whoever runs a merge.

The streaming executor makes a KernelThreads, sets it with threads_in_use() around its passes,
and closes it when its run ends: no pool outlives a merge, and a library caller that calls the
ops outside any merge runs them on its own thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class KernelThreads:
    """The threads that share a kernel call on a large block: `threads` in all, the calling thread
    among them. Whoever runs a merge owns one (the streaming executor) and closes it; the kernels
    use it within threads_in_use(pool)."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        # helper threads start on the first split call (ThreadPoolExecutor starts them as needed)
        self._helpers = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="modalmerge-kernel") \
            if self.threads > 1 else None

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> KernelThreads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """[fn(x) for x in items], the items shared out over the threads (the calling one too)."""
        items = list(items)
        if self._helpers is None or len(items) < 2:
            return [fn(x) for x in items]
        later = [self._helpers.submit(fn, x) for x in items[1:]]
        return [fn(items[0])] + [f.result() for f in later]

    def run(self, workers: int, work) -> None:
        """work(worker) on `workers` threads (at most self.threads), worker 0 the calling one."""
        helpers = [self._helpers.submit(work, w) for w in range(1, min(workers, self.threads))]
        work(0)
        for h in helpers:
            h.result()


_in_use: ContextVar[KernelThreads | None] = ContextVar("modalmerge_kernel_threads", default=None)


@contextmanager
def threads_in_use(pool: KernelThreads | None) -> Iterator[None]:
    """Kernel calls in this context (this thread, or task) split large blocks over `pool`;
    outside any, a call runs on the calling thread alone."""
    token = _in_use.set(pool)
    try:
        yield
    finally:
        _in_use.reset(token)


def in_use() -> KernelThreads | None:
    """The pool set by the innermost threads_in_use(), or None."""
    return _in_use.get()
