"""A bounded prefetch iterator: prepare batch k+1 on a thread pool while the caller works on batch k.

On a GPU the CLIP forward is fast enough that CPU work per image (PNG decoding, resizing,
masking) dominates a scan. :func:`prefetch` moves that work off the critical path: while
the caller encodes batch k, up to ``depth`` later batches are being prepared by ``workers``
threads (PIL and NumPy release the GIL for decoding and resampling). The look-ahead is
bounded, so memory is too: at most ``depth`` prepared batches exist beyond the one the
caller holds, however long the input. Results come back in input order, and an exception
raised while preparing a batch is re-raised by the iterator at that batch's position.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["prefetch"]


def prefetch(
    items: Iterable[T], prepare: Callable[[T], R], *, depth: int = 2, workers: int = 2
) -> Iterator[R]:
    """Yield ``prepare(item)`` for each item, in order, preparing up to ``depth`` items ahead in threads.

    Args:
        items: the work items (e.g. chunks of raw images); consumed lazily, ``depth`` ahead.
        prepare: the CPU-side work for one item (e.g. decode and preprocess a chunk).
        depth: how many prepared items may wait beyond the one being consumed (≥ 1).
        workers: threads preparing items (≥ 1).

    Returns:
        An iterator of prepared items in input order. Closing it early (``break``) cancels
        what has not started and waits for what has, so no thread outlives the loop.

    Raises:
        ValueError: ``depth`` or ``workers`` below 1.
        Whatever ``prepare`` raised, at that item's position in the iteration.

    Example:
        >>> list(prefetch(range(4), lambda x: x * x))
        [0, 1, 4, 9]
    """
    if depth < 1:
        raise ValueError(f"depth: must be at least 1, got {depth}")
    if workers < 1:
        raise ValueError(f"workers: must be at least 1, got {workers}")
    return _prefetch(iter(items), prepare, depth, workers)


def _prefetch(items: Iterator[T], prepare: Callable[[T], R], depth: int, workers: int) -> Iterator[R]:
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guardalign-prefetch")
    try:
        # Keep one item in the caller's hands plus ``depth`` being prepared.
        for item in items:
            pending.append(pool.submit(prepare, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
