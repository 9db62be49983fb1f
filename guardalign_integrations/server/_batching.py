"""Micro-batching: scans from concurrent requests share one detector batch.

What: :class:`ScanBatcher.scan` has the signature of ``ImageGuard.scan_checked`` for one
request; calls that arrive within ``window_ms`` of each other (up to ``max_images``) are
concatenated and scanned in one detector call by one worker thread, and each caller gets
its own slice back. On a GPU this turns 32 one-image forward passes into one.

Why a thread and not the event loop: the scan is blocking torch work, and the callers are
worker threads already (screening runs off the loop). A batch that raises is retried one
request at a time, so one hostile request cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from guardalign_core.guard import CheckedScan, ImageGuard

logger = logging.getLogger(__name__)


class _Item:
    __slots__ = ("images", "labels", "future")

    def __init__(self, images: list[bytes], labels: list[str]) -> None:
        self.images = images
        self.labels = labels
        self.future: Future[CheckedScan] = Future()


class ScanBatcher:
    """Merge concurrent scans into detector batches (or scan directly when disabled).

    Args:
        guard: the guard whose ``scan_checked`` runs the batches.
        enabled: batch (``True``) or call the guard directly (``False``).
        window_ms: how long a batch waits for more scans after its first.
        max_images: a batch never holds more images (a larger single request runs alone).
        on_batch: called with the number of images of every batch (metrics).
    """

    def __init__(
        self, guard: ImageGuard, *, enabled: bool, window_ms: float = 3.0, max_images: int = 64,
        on_batch: Callable[[int], Any] | None = None,
    ) -> None:
        self.guard = guard
        self.enabled = enabled
        self.window_s = window_ms / 1000
        self.max_images = max_images
        self.on_batch = on_batch
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def scan(self, images: list[bytes], labels: list[str]) -> CheckedScan:
        """Scan one request's images (blocking); the result is as ``guard.scan_checked`` gives it."""
        if not images:
            return CheckedScan([], [], [])
        if not self.enabled or self._closed:
            return self._direct(images, labels)
        self._start()
        item = _Item(images, labels)
        self._queue.put(item)
        return item.future.result()

    def _direct(self, images: list[bytes], labels: list[str]) -> CheckedScan:
        if self.on_batch is not None:
            self.on_batch(len(images))
        return self.guard.scan_checked(images, sources=labels)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="guardalign-scan-batcher", daemon=True)
                    self._thread.start()

    def close(self) -> None:
        """Stop the worker after the batches already queued (later calls scan directly)."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _run(self) -> None:
        pending: _Item | None = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if first is None:
                return
            batch, count = [first], len(first.images)
            deadline = time.monotonic() + self.window_s
            while count < self.max_images:
                timeout = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                if count + len(item.images) > self.max_images:
                    pending = item
                    break
                batch.append(item)
                count += len(item.images)
            self._scan_batch(batch)

    def _scan_batch(self, batch: list[_Item]) -> None:
        if len(batch) > 1:
            try:
                merged = self._direct([i for item in batch for i in item.images], [label for item in batch for label in item.labels])
            except Exception:  # noqa: BLE001 (isolate the failing request: retried one by one below)
                logger.warning("a merged scan batch failed; scanning its %d requests one by one", len(batch))
            else:
                start = 0
                for item in batch:
                    end = start + len(item.images)
                    results = [r.model_copy(update={"index": k}) for k, r in enumerate(merged.results[start:end])]
                    item.future.set_result(CheckedScan(results, merged.pngs[start:end], merged.contents[start:end]))
                    start = end
                return
        for item in batch:
            try:
                item.future.set_result(self._direct(item.images, item.labels))
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
                item.future.set_exception(err)
