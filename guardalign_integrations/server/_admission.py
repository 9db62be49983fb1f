"""A concurrency limit with a bounded queue: excess load is answered 429 at once, not buffered.

Why: a guard in front of a model must not accumulate unbounded work (memory, latency) when
clients outpace the detector; a full queue tells clients to retry (``Retry-After``).
"""

from __future__ import annotations

import asyncio


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full."""


class Slot:
    """One held processing slot; :meth:`release` is idempotent (streaming responses release it when they end)."""

    def __init__(self, gate: "AdmissionGate") -> None:
        self._gate = gate
        self._held = True
        self.handed_over = False

    def hand_over(self) -> None:
        """A streaming response now owns the slot and releases it when the stream ends."""
        self.handed_over = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate._release()


class AdmissionGate:
    """``max_active`` requests run; up to ``max_queue`` wait in order; the rest get :class:`QueueFull`."""

    def __init__(self, max_active: int, max_queue: int) -> None:
        self.max_active = max_active
        self.max_queue = max_queue
        self.active = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(max_active)

    async def acquire(self) -> Slot:
        """Take a slot, waiting in the queue if needed.

        Raises:
            QueueFull: no slot is free and the queue already holds ``max_queue`` requests.
        """
        if self._semaphore.locked() or self.waiting:
            if self.waiting >= self.max_queue:
                raise QueueFull()
            self.waiting += 1
            try:
                await self._semaphore.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._semaphore.acquire()
        self.active += 1
        return Slot(self)

    def _release(self) -> None:
        self.active -= 1
        self._semaphore.release()
