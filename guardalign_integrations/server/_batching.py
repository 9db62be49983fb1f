"""Micro-batching: the backbone work of concurrent ``ImageGuard.screen`` calls shares one batch.

What: :meth:`ScanBatcher.screen` is ``guard.screen`` for one request, run through the core
screening step unchanged (reader, budget, memory, policy, what to forward: all the core's).
Only the one detector call that step makes for the images it has not seen before is routed
through this batcher, and only its backbone stage is shared. Each request prepares its own
images in its own thread (:meth:`~guardalign_core.detector.BaseDetector.prepare`: decode
with the request's budget, model input on the device; PNG decoding releases the GIL, so
many requests decode at once); the prepared groups that arrive within ``window_ms`` of each
other (up to ``max_images``) are scored in one backbone call by one worker thread
(:meth:`~guardalign_core.detector.BaseDetector.score_prepared`); each request then finishes
its own results with its own policy (:meth:`~guardalign_core.detector.BaseDetector.finish_prepared`).
On a GPU this turns 32 one-image forward passes into one, without serialising 32 PNG decodes
behind it.

How: each request is screened by a throw-away :class:`ImageGuard` view of the server's guard
(same config, same memory) whose detector is a :class:`_BatchedDetector`: the real detector
with ``scan`` sent through the batcher. The view's type name is the real detector's, so the
memory fingerprint (:func:`guardalign_core.memory.config_fingerprint`) is the same and
verdicts are shared with direct ``guard.screen`` calls.

Why a thread and not the event loop: the backbone is blocking torch work, and the callers are
worker threads already (screening runs off the loop). A merged batch that raises is retried
one request at a time, so one hostile request cannot fail its neighbours (the core then
splits that request's own images until the culprit is alone).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from guardalign_core.config import PrefixConfig
from guardalign_core.detector import PreparedImages
from guardalign_core.guard import ContentImage, ImageGuard, RequestVerdict
from guardalign_core.results import ScanResult

logger = logging.getLogger(__name__)

Scored = tuple[list[Any], dict[str, float]]
"""What the backbone stage gives one prepared group: its findings and its share of the timings."""


class _Item:
    __slots__ = ("detector", "group", "future")

    def __init__(self, detector: Any, group: PreparedImages) -> None:
        self.detector, self.group = detector, group
        self.future: Future[Scored] = Future()


class _BatchedDetector:
    """The guard's detector with :meth:`scan` sent through a :class:`ScanBatcher`; everything else is the detector's."""

    def __init__(self, detector: Any, batcher: ScanBatcher) -> None:
        self._detector = detector
        self._batcher = batcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)

    def scan(
        self, images: Any, *, sources: Sequence[str] | None = None, policy: Any = None, budget: Any = None, **kwargs: Any
    ) -> list[ScanResult]:
        images = list(images)
        if kwargs or sources is None or len(sources) != len(images) or isinstance(budget, (list, tuple)):
            return self._detector.scan(images, sources=sources, policy=policy, budget=budget, **kwargs)  # not the screening step's call
        return self._batcher.submit(self._detector, images, list(sources), policy, budget)


_PROXY_TYPES: dict[type, type] = {}


def _proxy_type(cls: type) -> type:
    """A :class:`_BatchedDetector` type named like ``cls`` (the memory fingerprint includes the detector's type name)."""
    proxy = _PROXY_TYPES.get(cls)
    if proxy is None:
        proxy = _PROXY_TYPES.setdefault(cls, type(cls.__name__, (_BatchedDetector,), {"__qualname__": cls.__qualname__}))
    return proxy


class ScanBatcher:
    """Run ``guard.screen`` with the detector calls of concurrent requests merged (or directly when disabled).

    Args:
        guard: the server's guard (config, detector, memory).
        enabled: batch (``True``) or let each request's detector call run alone (``False``).
        window_ms: how long a batch waits for more scans after its first.
        max_images: a batch never holds more images (a larger single request runs alone).
        on_batch: called with the number of images of every detector call (metrics).
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

    def screen(self, images: Sequence[ContentImage], *, prefix: PrefixConfig | None = None) -> RequestVerdict:
        """``guard.screen(images, prefix=prefix)`` for one request (blocking), its detector work batched with its neighbours'."""
        guard = self.guard
        images = list(images)
        if not images:
            return guard.screen([], prefix=prefix)
        detector = guard.detector
        view = ImageGuard(guard.config, detector=_proxy_type(type(detector))(detector, self), memory=guard.memory)
        return view.screen(images, prefix=prefix)

    def submit(self, detector: Any, images: list[Any], labels: list[str], policy: Any, budget: Any = None) -> list[ScanResult]:
        """One request's detector call (blocking): prepared here, scored with its neighbours, finished here."""
        if not images:
            return []
        if not self.enabled or self._closed or len(images) > self.max_images or not hasattr(detector, "score_prepared"):
            return self._direct(detector, images, labels, policy, budget)
        group = detector.prepare(images, sources=labels, budget=budget)  # this thread: decodes run in parallel across requests
        if not group.images:  # nothing decoded: nothing for the backbone
            return detector.finish_prepared(group, ([], {}), policy)
        item = _Item(detector, group)
        with self._lock:
            closed = self._closed
            if not closed:
                self._start()
                self._queue.put(item)
        scored = self._score([item])[0] if closed else item.future.result()
        return detector.finish_prepared(group, scored, policy)

    def _direct(self, detector: Any, images: list[Any], labels: list[str], policy: Any, budget: Any = None) -> list[ScanResult]:
        if self.on_batch is not None:
            self.on_batch(len(images))
        return detector.scan(images, sources=labels, policy=policy, budget=budget)

    def _start(self) -> None:
        if self._thread is None:  # under self._lock
            self._thread = threading.Thread(target=self._run, name="guardalign-scan-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the worker after the batches already queued (later calls scan directly)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout=30)

    def _run(self) -> None:
        pending: _Item | None = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if first is None:
                return
            batch, count = [first], len(first.group.images)
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
                if count + len(item.group.images) > self.max_images or item.detector is not first.detector:
                    pending = item  # a batch is one backbone call of one detector
                    break
                batch.append(item)
                count += len(item.group.images)
            self._resolve(batch)

    def _score(self, batch: list[_Item]) -> list[Scored]:
        if self.on_batch is not None:
            self.on_batch(sum(len(item.group.images) for item in batch))
        return batch[0].detector.score_prepared([item.group for item in batch])

    def _resolve(self, batch: list[_Item]) -> None:
        """Score ``batch`` in one call and hand each request its share; on failure, each request alone."""
        if len(batch) > 1:
            try:
                scored = self._score(batch)
            except Exception:  # noqa: BLE001 (isolate the failing request: retried one by one below)
                logger.warning("a merged scan batch failed; scoring its %d requests one by one", len(batch))
            else:
                for item, share in zip(batch, scored):
                    item.future.set_result(share)
                return
        for item in batch:
            try:
                item.future.set_result(self._score([item])[0])
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
                item.future.set_exception(err)
