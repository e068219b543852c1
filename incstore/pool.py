"""Pool: a thread pool for per-item work that keeps only a window of items in flight.

`ThreadPoolExecutor.map` submits every item at once; with 200,000 items that is 200,000
futures and their results held together. `bounded_map` submits at most `window` at a time and
yields results in submission order, so memory stays flat whatever the item count.

`overlapped_map` runs two kinds of work at once: heavy items (large NARs, whose hashing and
compression release the GIL) on the pool, light ones (small items: mostly Python, so threads
would only take turns on the GIL) in the calling thread meanwhile. A store of thousands of
small items beside a few large ones then keeps every core busy, instead of running the small
ones on one core after the large ones are done.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

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


_END = object()


def overlapped_map(fn: Callable[[T], R], light: Iterable[T], heavy: Iterable[T], *,
                   workers: int) -> Generator[tuple[T, R], None, None]:
    """Yield `(item, fn(item))` for every item of `light` and `heavy`, in no set order: the
    heavy ones on `workers` pool threads (fed from a helper thread), the light ones in the
    calling thread meanwhile. An exception from `fn` propagates (for a heavy item, when its
    result is reached); a caller that stops early waits for the heavy calls in flight."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue(maxsize=4 * max(1, workers))
    stop = threading.Event()

    def feed() -> None:
        try:
            wanted = (item for item in heavy if not stop.is_set())
            for pair in bounded_map(fn, wanted, workers=workers):
                results.put(pair)
        except BaseException as e:  # re-raised in the caller's thread
            results.put((_END, e))
            return
        results.put((_END, None))

    helper = threading.Thread(target=feed, name="incstore-heavy", daemon=True)
    helper.start()
    ended = False

    def take(block: bool) -> Iterator[tuple[T, R]]:
        nonlocal ended
        while not ended:
            try:
                item, result = results.get(block=block)
            except queue.Empty:
                return
            if item is _END:
                ended = True
                if result is not None:
                    raise result
                return
            yield item, result

    try:
        for item in light:
            yield item, fn(item)
            yield from take(block=False)
        yield from take(block=True)
    finally:
        stop.set()
        while helper.is_alive():  # let it finish its calls in flight and put their results
            with contextlib.suppress(queue.Empty):
                results.get(timeout=0.05)


def map_by_size(fn: Callable[[T], R], items: Iterable[T], size: Callable[[T], int], *,
                small: int, workers: int, overlap: bool) -> Iterator[tuple[T, R]]:
    """`bounded_map`, or with `overlap` (a local store, more than one job) `overlapped_map`
    with the items of `size` up to `small` as the light ones."""
    if not overlap:
        return bounded_map(fn, items, workers=workers)
    items = list(items)
    return overlapped_map(fn, [i for i in items if size(i) <= small],
                          [i for i in items if size(i) > small], workers=workers)
