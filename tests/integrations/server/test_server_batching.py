"""Micro-batching and admission: concurrent scans share detector batches; a full queue refuses at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from guardalign_core.guard import CheckedScan
from guardalign_integrations.server._admission import AdmissionGate, QueueFull
from guardalign_integrations.server._batching import ScanBatcher
from server_helpers import ALL_UNSAFE, jpeg_bytes, make_guard, png_bytes  # noqa: F401


class CountingGuard:
    """Wraps a real guard and records the size of every detector call."""

    def __init__(self, guard, fail_on: str | None = None) -> None:
        self.guard, self.fail_on, self.calls = guard, fail_on, []

    def scan_checked(self, images, sources=None, reuse=True):
        self.calls.append(list(sources))
        if self.fail_on is not None and self.fail_on in sources:
            raise RuntimeError("boom")
        return self.guard.scan_checked(images, sources=sources, reuse=False)


def run_concurrently(batcher, requests):
    results, barrier = [None] * len(requests), threading.Barrier(len(requests))

    def one(i, images, labels):
        barrier.wait()
        try:
            results[i] = batcher.scan(images, labels)
        except Exception as err:  # noqa: BLE001
            results[i] = err

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_scans_share_batches_and_get_their_own_results(make_guard, png_bytes, jpeg_bytes):
    guard = CountingGuard(make_guard(ALL_UNSAFE))
    batcher = ScanBatcher(guard, enabled=True, window_ms=200, max_images=64)
    requests = [([png_bytes if i % 2 else jpeg_bytes], [f"req{i}"]) for i in range(8)]
    results = run_concurrently(batcher, requests)
    batcher.close()
    assert len(guard.calls) < 8  # merged
    assert sorted(label for call in guard.calls for label in call) == sorted(f"req{i}" for i in range(8))
    reference = {True: guard.guard.scan_checked([png_bytes], reuse=False), False: guard.guard.scan_checked([jpeg_bytes], reuse=False)}
    for i, result in enumerate(results):
        assert isinstance(result, CheckedScan) and len(result.results) == 1
        assert result.results[0].index == 0 and result.results[0].source == f"req{i}"
        expected = reference[bool(i % 2)]
        assert result.pngs[0] == expected.pngs[0]  # the same sanitised image as scanned alone
        assert result.results[0].score == pytest.approx(expected.results[0].score, abs=1e-5)


def test_a_failing_request_does_not_fail_its_batch_neighbours(make_guard, png_bytes):
    guard = CountingGuard(make_guard(ALL_UNSAFE), fail_on="bad")
    batcher = ScanBatcher(guard, enabled=True, window_ms=200)
    results = run_concurrently(batcher, [([png_bytes], ["good1"]), ([png_bytes], ["bad"]), ([png_bytes], ["good2"])])
    batcher.close()
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[0], CheckedScan) and isinstance(results[2], CheckedScan)


def test_batch_never_exceeds_max_images(make_guard, png_bytes):
    guard = CountingGuard(make_guard(ALL_UNSAFE))
    batcher = ScanBatcher(guard, enabled=True, window_ms=200, max_images=2)
    run_concurrently(batcher, [([png_bytes], [f"r{i}"]) for i in range(5)])
    batcher.close()
    assert max(len(c) for c in guard.calls) <= 2 and sum(len(c) for c in guard.calls) == 5


def test_disabled_batching_scans_directly(make_guard, png_bytes):
    guard = CountingGuard(make_guard(ALL_UNSAFE))
    batcher = ScanBatcher(guard, enabled=False)
    run_concurrently(batcher, [([png_bytes], [f"r{i}"]) for i in range(3)])
    assert sorted(map(tuple, guard.calls)) == [("r0",), ("r1",), ("r2",)]


async def test_admission_gate_queues_then_refuses():
    gate = AdmissionGate(max_active=1, max_queue=1)
    first = await gate.acquire()
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    assert gate.waiting == 1
    with pytest.raises(QueueFull):
        await gate.acquire()
    first.release()
    first.release()  # idempotent: a second release must not free a second slot
    second = await waiter
    assert gate.active == 1 and gate.waiting == 0
    third = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):  # still only one slot: the released one was not counted twice
        await gate.acquire()
    second.release()
    (await third).release()
    assert gate.active == 0
