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


# -- wired into the detector: scan(list) over several chunks -------------------------------------

import weakref  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import guardalign_core.detector as detector_module  # noqa: E402
from shared_images import shared_data  # noqa: E402
from guardalign_core.detector import OTDetector, PreparedImages  # noqa: E402
from guardalign_core.results import Status  # noqa: E402
from guardalign_core.testing.tiny_clip import tiny_detector_config  # noqa: E402

PER_CHUNK = 2


@pytest.fixture
def small_chunks(monkeypatch):
    """Two images per chunk, so a handful of shared images spans several chunks."""
    monkeypatch.setattr(detector_module, "_IMAGES_PER_CHUNK", PER_CHUNK)


@pytest.fixture(scope="module")
def shared_bytes() -> list[bytes]:
    benign = sorted(p for p in shared_data("benign").iterdir() if p.suffix in (".png", ".jpg"))[:5]
    unsafe = sorted(shared_data("figstep-tiny").glob("*.png"))[:2]
    return [p.read_bytes() for p in benign + unsafe]


def _detector(checkpoint, cache_dir, **overrides) -> OTDetector:
    return OTDetector(tiny_detector_config(checkpoint, cache_dir=str(cache_dir), **overrides))


def _median_threshold(detector: OTDetector, images) -> float:
    """A τ at the median patch statistic, so some patches are masked and some are not."""
    return float(np.median([s for r in detector.scan(images) for row in r.statistic for s in row]))


def test_results_are_identical_with_and_without_prefetch(small_chunks, tiny_clip_checkpoint, embed_cache_dir, shared_bytes):
    tau = _median_threshold(_detector(tiny_clip_checkpoint, embed_cache_dir, prefetch=False), shared_bytes)
    off = _detector(tiny_clip_checkpoint, embed_cache_dir, prefetch=False, threshold=tau).scan(shared_bytes)
    on = _detector(tiny_clip_checkpoint, embed_cache_dir, prefetch=True, threshold=tau).scan(shared_bytes)
    assert [r.index for r in on] == list(range(len(shared_bytes)))
    assert {r.decision.value for r in off} >= {"mask"}  # masking really ran, on the finisher thread too
    for a, b in zip(off, on):
        assert (a.decision, a.scores, a.statistic, a.unsafe_boxes) == (b.decision, b.scores, b.statistic, b.unsafe_boxes)
        assert np.array_equal(np.asarray(a.masked_image), np.asarray(b.masked_image))


def test_chunk_k_plus_1_is_prepared_while_chunk_k_is_encoded(small_chunks, tiny_clip_checkpoint, embed_cache_dir, shared_bytes, monkeypatch):
    detector = _detector(tiny_clip_checkpoint, embed_cache_dir)
    detector.load()
    prepared = {}
    prepare, score = detector._prepare, detector._score

    def recording_prepare(offset, *args):
        chunk = prepare(offset, *args)
        prepared.setdefault(offset, threading.Event()).set()
        return chunk

    def waiting_score(chunk):
        following = chunk.offset + PER_CHUNK
        if following < len(shared_bytes):  # encoding chunk k: chunk k+1 must be on its way meanwhile
            assert prepared.setdefault(following, threading.Event()).wait(WAIT), f"chunk at {following} was not prepared during the encode"
        return score(chunk)

    monkeypatch.setattr(detector, "_prepare", recording_prepare)
    monkeypatch.setattr(detector, "_score", waiting_score)
    finished_on = []
    finish = detector._finish
    monkeypatch.setattr(detector, "_finish", lambda *a: (finished_on.append(threading.current_thread().name), finish(*a))[1])
    results = detector.scan(shared_bytes)
    assert [r.status for r in results] == [Status.OK] * len(shared_bytes)
    assert finished_on and all(name.startswith("guardalign-finish") for name in finished_on)  # masking off the critical path


def test_prepared_chunks_in_flight_are_bounded_by_depth(small_chunks, tiny_clip_checkpoint, embed_cache_dir, monkeypatch):
    depth = 2
    detector = _detector(tiny_clip_checkpoint, embed_cache_dir, prefetch_depth=depth)
    detector.load()
    live, most = [0], [0]
    lock = threading.Lock()
    prepare, score = detector._prepare, detector._score

    def counting_prepare(*args) -> PreparedImages:
        chunk = prepare(*args)
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        weakref.finalize(chunk, lambda: live.__setitem__(0, live[0] - 1))
        return chunk

    def slow_score(chunk):
        for _ in range(20):  # give an unbounded producer every chance to run ahead
            threading.Event().wait(0.005)
        return score(chunk)

    monkeypatch.setattr(detector, "_prepare", counting_prepare)
    monkeypatch.setattr(detector, "_score", slow_score)
    images = [Image.new("RGB", (24, 24), (i, 0, 0)) for i in range(24)]  # 12 chunks
    results = detector.scan(images)
    assert len(results) == 24 and most[0] >= 2  # the look-ahead really ran
    # `depth` waiting for the encoder, one being encoded, one being finished: never the whole scan
    assert most[0] <= depth + 2, most[0]


def test_a_decode_failure_in_a_prefetched_chunk_fails_only_that_image(small_chunks, tiny_clip_checkpoint, embed_cache_dir, shared_bytes):
    broken = shared_bytes[4][: len(shared_bytes[4]) // 3]  # a truncated shared image, in the third chunk
    images = shared_bytes[:4] + [broken] + shared_bytes[5:]
    results = _detector(tiny_clip_checkpoint, embed_cache_dir).scan(images)
    assert [r.status for r in results] == [Status.OK] * 4 + [Status.ERROR] + [Status.OK] * (len(images) - 5)
    assert results[4].decision.value == "block" and results[4].masked_image is None and results[4].index == 4


def test_pixels_go_to_the_device_once_per_chunk(small_chunks, tiny_clip_checkpoint, embed_cache_dir, shared_bytes, monkeypatch):
    """One host→device transfer per chunk (the hook every transfer goes through), none per CLIP batch."""
    detector = _detector(tiny_clip_checkpoint, embed_cache_dir, batch_size=4)  # several CLIP batches per chunk
    encoder = detector.load().encoder
    transfers: list[tuple[int, ...]] = []
    to_device = encoder._to_device
    monkeypatch.setattr(encoder, "_to_device", lambda pixels: (transfers.append(tuple(pixels.shape)), to_device(pixels))[1])
    detector.scan(shared_bytes[:5])
    size = encoder.image_size
    assert transfers == [(18, 3, *size), (18, 3, *size), (9, 3, *size)]  # chunks of 2, 2, 1 images × 9 crops


def test_prefetch_is_configurable_and_off_is_sequential(small_chunks, tiny_clip_checkpoint, embed_cache_dir, shared_bytes, monkeypatch):
    detector = _detector(tiny_clip_checkpoint, embed_cache_dir, prefetch=False)
    monkeypatch.setattr(detector_module, "prefetch", lambda *a, **k: pytest.fail("prefetch=False must not start threads"))
    assert len(detector.scan(shared_bytes[:3])) == 3
    one_chunk = _detector(tiny_clip_checkpoint, embed_cache_dir, prefetch=True)
    assert len(one_chunk.scan(shared_bytes[:2])) == 2  # a single chunk has nothing to overlap: no threads either
    with pytest.raises(ValueError, match="prefetch_depth"):
        tiny_detector_config(tiny_clip_checkpoint, prefetch_depth=0)


def test_budget_errors_surface_from_a_prefetched_chunk(small_chunks, tiny_clip_checkpoint, embed_cache_dir, shared_bytes):
    from guardalign_core.budget import RequestBudget
    from guardalign_core.errors import RequestBudgetError
    from guardalign_core.images import ImageLimits

    sizes = [Image.open(__import__("io").BytesIO(b)).size for b in shared_bytes[:5]]
    budget = RequestBudget(ImageLimits(max_total_pixels=sum(w * h for w, h in sizes[:4])))  # the fifth is one too many
    with pytest.raises(RequestBudgetError, match="max_total_pixels"):
        _detector(tiny_clip_checkpoint, embed_cache_dir).scan(shared_bytes[:5], budget=budget)
    assert budget.total_pixels == sum(w * h for w, h in sizes[:4])
    assert not [t for t in threading.enumerate() if t.name.startswith(("guardalign-prefetch", "guardalign-finish"))]
