"""Micro-batching and admission: concurrent scans share detector batches; a full queue refuses at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from guardalign_core.guard import ContentImage, ImageGuard
from guardalign_core.memory import CheckedImageMemory
from guardalign_core.results import Status
from guardalign_core.verdicts import Forward
from guardalign_integrations.server._admission import AdmissionGate, QueueFull
from guardalign_integrations.server._batching import ScanBatcher
from server_helpers import ALL_UNSAFE, jpeg_bytes, make_guard, png_bytes  # noqa: F401


def counting(guard: ImageGuard, fail_on: str | None = None) -> list[list[str]]:
    """Record the labels of every backbone call of the guard's real detector (optionally raising for one label).

    A backbone call is a direct ``scan`` (batching off, or a request too large to merge) or
    one ``score_prepared`` of the groups the batcher merged.
    """
    detector, calls = guard.detector, []
    real_scan, real_score = detector.scan, detector.score_prepared

    def record(labels):
        calls.append(list(labels))
        if fail_on is not None and fail_on in labels:
            raise RuntimeError("boom")

    def scan(images, *, sources=None, policy=None, **kwargs):
        record(sources)
        return real_scan(images, sources=sources, policy=policy, **kwargs)

    def score_prepared(groups):
        record([label for group in groups for label in group.labels])
        return real_score(groups)

    detector.scan, detector.score_prepared = scan, score_prepared
    return calls


def fresh(guard: ImageGuard) -> ImageGuard:
    """The guard with a memory of its own (so each test scans, instead of recalling another test's verdicts)."""
    guard.memory = CheckedImageMemory()
    return guard


def run_concurrently(batcher, requests):
    results, barrier = [None] * len(requests), threading.Barrier(len(requests))

    def one(i, images, labels):
        barrier.wait()
        try:
            results[i] = batcher.screen([ContentImage(label, source=image) for image, label in zip(images, labels)])
        except Exception as err:  # noqa: BLE001
            results[i] = err

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_screens_share_detector_batches_and_get_their_own_verdicts(make_guard, png_bytes, jpeg_bytes):
    guard = fresh(make_guard(ALL_UNSAFE))
    calls = counting(guard)
    batcher = ScanBatcher(guard, enabled=True, window_ms=200, max_images=64)
    # a trailing byte each: the same pixels, but not recalled from memory by a neighbour that finished first
    requests = [([(png_bytes if i % 2 else jpeg_bytes) + bytes([i])], [f"req{i}"]) for i in range(8)]
    results = run_concurrently(batcher, requests)
    batcher.close()
    assert len(calls) < 8  # merged
    assert sorted(label for call in calls for label in call) == sorted(f"req{i}" for i in range(8))
    reference = {True: guard.screen([ContentImage("a", source=png_bytes)], reuse=False),
                 False: guard.screen([ContentImage("b", source=jpeg_bytes)], reuse=False)}
    for i, verdict in enumerate(results):
        assert len(verdict.images) == 1, verdict
        entry, expected = verdict.images[0], reference[bool(i % 2)].images[0]
        assert entry.result.index == 0 and entry.result.source == f"req{i}" and entry.label == f"req{i}"
        assert entry.forward == Forward.BYTES and entry.sanitised and verdict.decision.value == "mask"
        assert entry.data == expected.data and entry.mime == expected.mime  # the same sanitised image as screened alone
        assert entry.result.score == pytest.approx(expected.result.score, abs=1e-5)


def test_batched_verdicts_are_remembered_for_direct_screens(make_guard, png_bytes):
    # the batcher's detector view must fingerprint like the real detector, or the memory splits in two
    guard = fresh(make_guard(ALL_UNSAFE))
    calls = counting(guard)
    batcher = ScanBatcher(guard, enabled=True, window_ms=1)
    first = batcher.screen([ContentImage("x", source=png_bytes)])
    batcher.close()
    again = guard.screen([ContentImage("y", source=png_bytes)])
    assert len(calls) == 1 and again.images[0].reused and again.images[0].data == first.images[0].data


def test_a_failing_request_does_not_fail_its_batch_neighbours(make_guard, png_bytes, jpeg_bytes):
    guard = fresh(make_guard(ALL_UNSAFE))
    counting(guard, fail_on="bad")
    batcher = ScanBatcher(guard, enabled=True, window_ms=200)
    results = run_concurrently(batcher, [([png_bytes], ["good1"]), ([jpeg_bytes], ["bad"]), ([png_bytes + b"\0"], ["good2"])])
    batcher.close()
    # the core turns the detector failure into that image's status=error verdict: blocked, fail-closed
    bad = results[1]
    assert bad.blocked and bad.images[0].result.status == Status.ERROR and bad.images[0].forward == Forward.NOTHING
    for good in (results[0], results[2]):
        assert good.images[0].result.status == Status.OK and good.images[0].forward == Forward.BYTES


def test_batch_never_exceeds_max_images(make_guard, png_bytes):
    guard = fresh(make_guard(ALL_UNSAFE))
    calls = counting(guard)
    batcher = ScanBatcher(guard, enabled=True, window_ms=200, max_images=2)
    # distinct bytes: identical ones would be recalled from memory instead of scanned
    run_concurrently(batcher, [([png_bytes + bytes([i])], [f"r{i}"]) for i in range(5)])
    batcher.close()
    assert max(len(c) for c in calls) <= 2 and sum(len(c) for c in calls) == 5


def test_disabled_batching_scans_directly(make_guard, png_bytes):
    guard = fresh(make_guard(ALL_UNSAFE))
    calls = counting(guard)
    batcher = ScanBatcher(guard, enabled=False)
    run_concurrently(batcher, [([png_bytes + bytes([i])], [f"r{i}"]) for i in range(3)])
    assert sorted(map(tuple, calls)) == [("r0",), ("r1",), ("r2",)]


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


def test_each_request_decodes_in_its_own_thread_and_the_backbone_runs_once(make_guard, png_bytes, jpeg_bytes, monkeypatch):
    # Decoding a PNG is CPU work that releases the GIL: serialised on the batch worker it would
    # cap a batched GPU server at one decode at a time. Only the backbone call is shared.
    import guardalign_core.detector as detector_module

    guard = fresh(make_guard(ALL_UNSAFE))
    calls = counting(guard)
    decoded_in, real = [], detector_module.decode_image

    def decode(data, *args, **kwargs):
        decoded_in.append(threading.current_thread().name)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(detector_module, "decode_image", decode)
    batcher = ScanBatcher(guard, enabled=True, window_ms=500, max_images=64)
    requests = [([(png_bytes if i % 2 else jpeg_bytes) + bytes([i])], [f"req{i}"]) for i in range(6)]
    results = run_concurrently(batcher, requests)
    batcher.close()
    assert all(not isinstance(r, Exception) and r.decision.value == "mask" for r in results), results
    assert len(decoded_in) == 6 and len(set(decoded_in)) == 6  # one decode in each request's own thread
    assert "guardalign-scan-batcher" not in decoded_in
    assert len(calls) < 6  # while their backbone work was merged


def test_requests_after_close_are_still_screened(make_guard, png_bytes):
    # a request racing the shutdown must get its verdict, not wait forever on a stopped worker
    guard = fresh(make_guard(ALL_UNSAFE))
    batcher = ScanBatcher(guard, enabled=True, window_ms=1)
    assert batcher.screen([ContentImage("x", source=png_bytes)]).decision.value == "mask"
    batcher.close()
    done = []
    worker = threading.Thread(target=lambda: done.append(batcher.screen([ContentImage("y", source=png_bytes + b"\0")])))
    worker.start()
    worker.join(timeout=60)
    assert done and done[0].decision.value == "mask"


@pytest.mark.parametrize("device, cuda, expected", [("auto", True, True), ("auto", False, False), ("cpu", True, False), ("cuda", True, True)])
def test_batching_is_on_by_default_exactly_when_the_detector_runs_on_a_gpu(make_guard, monkeypatch, device, cuda, expected):
    # every preset says device 'auto': on a GPU machine that is the GPU, and batching must be on
    import torch

    from guardalign_integrations.server.app import ServerState
    from guardalign_integrations.server.config import ServerConfig

    guard = make_guard(ALL_UNSAFE)
    guard = ImageGuard(guard.config.model_copy(update={"detector": guard.config.detector.model_copy(update={"device": device})}),
                       detector=guard.detector, memory=guard.memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    state = ServerState(ServerConfig(upstream={"base_url": "http://127.0.0.1:9/v1"}), guard)
    assert state.batcher.enabled is expected
    explicit = ServerState(ServerConfig(upstream={"base_url": "http://127.0.0.1:9/v1"}, batching={"enabled": not expected}), guard)
    assert explicit.batcher.enabled is (not expected)
