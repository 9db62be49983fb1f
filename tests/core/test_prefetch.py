"""The bounded prefetch iterator (issue 14, item 5): overlap, order, boundedness, errors, early close."""

from __future__ import annotations

import itertools
import threading

import pytest

from guardalign_core.prefetch import prefetch

WAIT = 30.0  # generous: a deadlock fails the test, a slow machine does not


def test_batch_k_plus_1_is_prepared_while_batch_k_is_consumed():
    started = {i: threading.Event() for i in range(4)}

    def prepare(i: int) -> int:
        started[i].set()
        return i

    seen = []
    for item in prefetch(range(4), prepare, depth=1, workers=1):
        if item < 3:  # while we hold batch k, batch k+1 is already being prepared
            assert started[item + 1].wait(WAIT), f"batch {item + 1} did not start while batch {item} was in use"
        seen.append(item)
    assert seen == [0, 1, 2, 3]


def test_look_ahead_is_bounded_on_an_endless_input():
    depth, consumed, started = 2, [0], []
    lock = threading.Lock()
    outstanding_max = [0]

    def prepare(i: int) -> int:
        with lock:
            started.append(i)
            outstanding_max[0] = max(outstanding_max[0], len(started) - consumed[0])
        return i

    for item in prefetch(itertools.count(), prepare, depth=depth, workers=3):
        with lock:
            consumed[0] += 1
        if item == 50:
            break
    # prepared but not yet handed over: at most `depth`, plus the one just handed over
    assert outstanding_max[0] <= depth + 1
    assert len(started) <= 51 + depth + 1  # the endless input was read only `depth` ahead


def test_order_is_kept_when_later_items_finish_first():
    gates = [threading.Event() for _ in range(3)]

    def prepare(i: int) -> int:
        if i == 0:
            assert gates[2].wait(WAIT)  # item 0 finishes only after item 2 has
        gates[i].set()
        return i

    assert list(prefetch(range(3), prepare, depth=3, workers=3)) == [0, 1, 2]


def test_an_error_surfaces_at_its_own_position():
    def prepare(i: int) -> int:
        if i == 2:
            raise ValueError("bad batch")
        return i

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in prefetch(range(5), prepare):
            got.append(item)
    assert got == [0, 1]


def test_no_thread_outlives_an_early_break():
    def prepare(i: int) -> int:
        return i

    before = {t.name for t in threading.enumerate()}
    iterator = prefetch(range(100), prepare, depth=4, workers=2)
    next(iterator)
    iterator.close()
    leftover = [t for t in threading.enumerate() if t.name.startswith("guardalign-prefetch") and t.name not in before]
    assert not leftover


@pytest.mark.parametrize("kwargs, field", [({"depth": 0}, "depth"), ({"workers": 0}, "workers")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        prefetch([1], lambda x: x, **kwargs)
