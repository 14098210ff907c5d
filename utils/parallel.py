"""An order-preserving worker pool with bounded memory, for the data pipeline's CPU-bound steps.

    from utils.parallel import WorkerPool
    with WorkerPool(num_workers=2, initializer=setup, initargs=(settings,)) as pool:
        for result in pool.imap(work, chunks):   # results in the order of `chunks`
            ...
        pending = pool.submit(work, chunk)        # ... .get() later

`num_workers <= 1` runs everything in the calling process (the initializer too), so the
same code path gives the same output with or without workers. With more, the workers are
started with "spawn", not "fork": the parent has pyarrow's and OpenMP's threads running,
and forking a process with threads can deadlock the child. Work functions must therefore
be module-level (picklable), which is what "spawn-safe" means here.

Not a test target of its own: tests/test_data_pipeline.py runs the cleaner and the
de-duplicator through it with 1 and 2 workers.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from typing import Callable, Iterable, Iterator


def default_num_workers() -> int:
    """The CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _worker_init(initializer, initargs):
    # Ctrl+C reaches the whole process group: let the parent alone handle it (it stops
    # the pool), instead of every worker printing its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


class _Done:
    """An in-process result, with the same .get() as multiprocessing's AsyncResult."""

    def __init__(self, value):
        self._value = value

    def get(self):
        return self._value


class WorkerPool:
    def __init__(self, num_workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.num_workers = max(1, int(num_workers))
        self._pool = None
        if self.num_workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.num_workers, _worker_init, (initializer, initargs))
        elif initializer is not None:
            initializer(*initargs)

    def submit(self, fn: Callable, *args):
        """Start fn(*args); returns an object whose .get() gives the result (or raises its error)."""
        if self._pool is None:
            return _Done(fn(*args))
        return self._pool.apply_async(fn, args)

    def imap(self, fn: Callable, items: Iterable, max_pending: int | None = None) -> Iterator:
        """fn(item) for each item, in order, with at most `max_pending` items in flight.

        Pool.imap would do, except that its feeder thread reads `items` as fast as it can:
        on a streamed input larger than memory the queue of pending tasks grows without
        limit. Here the next item is read only when a result has been handed out.
        """
        if self._pool is None:
            for item in items:
                yield fn(item)
            return
        max_pending = max_pending or 2 * self.num_workers + 1
        pending: deque = deque()
        for item in items:
            pending.append(self._pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self, wait: bool = True) -> None:
        """Stop the workers: let them finish (`wait`, after success) or kill them (after an error)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if wait:
            pool.close()
        else:
            pool.terminate()
        pool.join()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait=exc_type is None)
