"""The pools that run per-item work: every item once, errors reach the caller, memory bounded,
and `overlapped_map` really runs light items in the caller's thread beside the heavy ones."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from incstore.pool import bounded_map, overlapped_map


def test_bounded_map_keeps_order_and_a_window() -> None:
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        with lock:
            in_flight -= 1
        return n * n

    submitted: list[int] = []

    def items() -> Iterator[int]:
        for n in range(1000):
            submitted.append(n)
            yield n

    out: list[tuple[int, int]] = []
    for n, sq in bounded_map(work, items(), workers=3):
        # never more than the window ahead of what the caller has taken
        assert len(submitted) - len(out) <= 12
        out.append((n, sq))
    assert out == [(n, n * n) for n in range(1000)]


def test_overlapped_map_runs_each_item_once_and_light_ones_here() -> None:
    me = threading.get_ident()
    where: dict[str, int] = {}

    def work(item: str) -> str:
        where[item] = threading.get_ident()
        return item.upper()

    light = [f"l{n}" for n in range(300)]
    heavy = [f"h{n}" for n in range(40)]
    got = dict(overlapped_map(work, light, heavy, workers=2))
    assert got == {i: i.upper() for i in light + heavy}
    assert all(where[i] == me for i in light)
    assert all(where[i] != me for i in heavy)


@pytest.mark.parametrize("bad", ["l7", "h3"])
def test_overlapped_map_raises_what_an_item_raised(bad: str) -> None:
    def work(item: str) -> str:
        if item == bad:
            raise ValueError(item)
        return item

    with pytest.raises(ValueError, match=bad):
        list(overlapped_map(work, [f"l{n}" for n in range(20)], [f"h{n}" for n in range(20)],
                            workers=2))


def test_overlapped_map_stopped_early_leaves_no_thread_behind() -> None:
    before = threading.active_count()
    gen = overlapped_map(lambda i: i, range(100), range(1000, 3000), workers=2)
    for n, _pair in enumerate(gen):
        if n == 5:
            break
    gen.close()
    assert threading.active_count() == before
