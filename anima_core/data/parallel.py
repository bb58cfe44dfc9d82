"""Threads for the data path: decoding, checking and hashing images release the GIL, so threads use the cores."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def default_workers() -> int:
    """Threads for decoding and checking: every CPU this process may use, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, *, chunk: int = 1) -> Iterator[Any]:
    """fn over items, results in order. With workers > 1 the threads take `chunk` items at a time and up to
    2 × workers chunks are in flight (what bounds the memory of decoded images waiting to be used).

    Why chunks: a thread that hands back every item on its own spends its time passing the GIL and waking
    the caller, not working; for items of well under a millisecond (a small image's check, a cache file's
    key) a chunk of 32 made two threads 2.2× one thread instead of 1.25× (bench/RESULTS.md)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="anima-data")
    pending: deque[Future] = deque()
    try:
        for part in chunks(items, chunk):
            pending.append(pool.submit(lambda part: [fn(item) for item in part], part))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
