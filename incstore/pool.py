"""Pool: a thread pool for per-item work that keeps only a window of items in flight.

`ThreadPoolExecutor.map` submits every item at once; with 200,000 items that is 200,000
futures and their results held together. `bounded_map` submits at most `window` at a time and
yields results in submission order, so memory stays flat whatever the item count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int,
                window: int | None = None) -> Iterator[tuple[T, R]]:
    """Yield `(item, fn(item))` in order, running `workers` calls at once. An exception from
    `fn` propagates when its result is reached (the others in flight are waited for)."""
    limit = window or workers * 4
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        flight: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            flight.append((item, pool.submit(fn, item)))
            if len(flight) >= limit:
                done, future = flight.popleft()
                yield done, future.result()
        while flight:
            done, future = flight.popleft()
            yield done, future.result()
