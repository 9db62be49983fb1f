"""ImageGuard.screen and its CheckedImageMemory: reuse, own output, invalidation, bounds, threads, sharing."""

from __future__ import annotations

import base64
import copy
import io
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from guardalign_core.config import GuardConfig, PolicyConfig
from guardalign_core.guard import ContentImage, ImageGuard
from guardalign_core.images import ImageLimits
from guardalign_core.memory import CheckedImageMemory, config_fingerprint
from guardalign_core.results import Decision, ScanResult, Status
from guardalign_core.testing.tiny_clip import tiny_detector_config

ALL_UNSAFE = 100.0  # above every tiny-CLIP patch score: every patch is masked


def _png(seed: int) -> bytes:
    """A random RGB PNG; its size varies with ``seed``, so that masked outputs differ too."""
    size = (40 + 4 * seed, 36 + 2 * seed)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def config(tiny_clip_checkpoint, embed_cache_dir) -> GuardConfig:
    detector = tiny_detector_config(tiny_clip_checkpoint, threshold=ALL_UNSAFE, cache_dir=str(embed_cache_dir))
    return GuardConfig(detector=detector, policy=PolicyConfig(action="mask"))


def scan(guard: ImageGuard, images: list[Any], sources: list[str] | None = None, reuse: bool = True):
    """(results, sanitised bytes or None) per image, through the one screening step."""
    labels = sources or [f"image {i}" for i in range(len(images))]
    verdict = guard.screen([ContentImage(label, source=image) for label, image in zip(labels, images)], reuse=reuse)
    return verdict.results, [entry.data if entry.sanitised else None for entry in verdict.images]


def _own(config: GuardConfig, **kwargs: Any) -> ImageGuard:
    """A guard with a memory of its own (the default memory is shared by the whole process)."""
    return ImageGuard(config, memory=CheckedImageMemory(), **kwargs)


def _counting(guard: ImageGuard, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every detector call."""
    calls: list[int] = []
    scan = guard.detector.scan

    def counting_scan(images: Any, **kwargs: Any) -> Any:
        calls.append(len(images))
        return scan(images, **kwargs)

    monkeypatch.setattr(guard.detector, "scan", counting_scan)
    return calls


def test_reuse_skips_the_detector(config, monkeypatch):
    guard = _own(config)
    calls = _counting(guard, monkeypatch)
    a, b = _png(0), _png(1)
    first, first_pngs = scan(guard, [a], sources=["a"])
    assert calls == [1] and first[0].decision == Decision.MASK and first[0].masked_image is not None
    assert first_pngs[0] is not None

    results, pngs = scan(guard, [b, a], sources=["new b", "again a"])
    assert calls == [1, 1]  # only the miss was scanned
    assert [r.index for r in results] == [0, 1] and [r.source for r in results] == ["new b", "again a"]
    assert results[1].reason == f"{first[0].reason} (reused)" and results[1].masked_image is None
    assert pngs[1] == first_pngs[0]  # the same sanitised pixels, not a re-masked image
    assert not results[0].reason.endswith("(reused)")


def test_the_same_bytes_are_recognised_from_a_file_or_a_data_url(config, monkeypatch, tmp_path):
    guard = _own(config.model_copy(update={"images": ImageLimits(allow_local_files=True)}))
    calls = _counting(guard, monkeypatch)
    path = tmp_path / "photo.png"
    path.write_bytes(_png(2))
    results, _ = scan(guard, [path], sources=["photo.png"])
    assert results[0].source == "photo.png" and results[0].status == Status.OK
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    again, _ = scan(guard, [path.read_bytes(), data_url])
    assert calls == [1] and all(r.reason.endswith("(reused)") for r in again)


def test_own_sanitised_output_is_not_masked_again(config, monkeypatch):
    guard = _own(config)
    calls = _counting(guard, monkeypatch)
    _, (png,) = scan(guard, [_png(3)])
    as_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    results, pngs = scan(guard, [png, as_url])
    assert calls == [1]
    assert all(r.reason.startswith("already sanitised by this guard: ") for r in results)
    assert pngs == [None, None]  # forwarded as they came


def test_config_change_invalidates(config, monkeypatch):
    guard = _own(config)
    calls = _counting(guard, monkeypatch)
    image = _png(4)
    scan(guard, [image])
    guard.config = config.model_copy(update={"policy": PolicyConfig(action="flag")})
    results, pngs = scan(guard, [image])
    assert calls == [1, 1] and results[0].decision == Decision.FLAG and pngs == [None]


def test_reuse_off_errors_and_remote_urls_are_never_remembered(config, monkeypatch):
    guard = _own(config)
    calls = _counting(guard, monkeypatch)
    image = _png(5)
    scan(guard, [image], reuse=False)
    scan(guard, [image], reuse=False)
    assert calls == [1, 1] and guard.memory.recall(config_fingerprint(config), image) is None
    for _ in range(2):
        results, _ = scan(guard, [b"not an image", "https://example.com/cat.png"])
        assert [r.status for r in results] == [Status.ERROR, Status.ERROR]
    assert calls == [1, 1, 1, 1]  # the refused URL never reaches the detector


def test_byte_bound_evicts_the_least_recently_used(config, monkeypatch):
    a, b = _png(6), _png(7)
    probe = _own(config)
    _, (png_a, png_b) = scan(probe, [a, b], reuse=False)
    guard = ImageGuard(config, memory=CheckedImageMemory(max_bytes=max(len(png_a), len(png_b)) + 1))
    calls = _counting(guard, monkeypatch)
    scan(guard, [a])
    scan(guard, [b])  # its PNG pushes a's out
    scan(guard, [b])
    assert calls == [1, 1]
    scan(guard, [a])
    assert calls == [1, 1, 1]


def test_entry_bound_evicts_the_least_recently_used():
    result = ScanResult(
        index=0, status=Status.OK, decision=Decision.ALLOW, unsafe=False, reason="r", detector="ot",
        threshold=0.4, backbone="b", policy="mask",
    )
    memory = CheckedImageMemory(max_entries=2)
    for content in (b"0", b"1"):
        memory.remember("f", content, result, None)
    assert memory.recall("f", b"0") is not None  # now the most recently used
    memory.remember("f", b"2", result, None)
    assert memory.recall("f", b"1") is None and memory.recall("f", b"0") is not None
    assert memory.recall("other config", b"0") is None
    with pytest.raises(ValueError, match="max_entries"):
        CheckedImageMemory(max_entries=-1)


def test_concurrent_scans_agree_and_keep_the_memory_consistent(config):
    guard = ImageGuard(config, memory=CheckedImageMemory(max_entries=5))
    images = [_png(10 + i) for i in range(6)]
    expected = {i: scan(guard, [image], reuse=False)[1][0] for i, image in enumerate(images)}
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for step in range(12):
                k = (offset + step) % len(images)
                results, pngs = scan(guard, [images[k]])
                assert results[0].decision == Decision.MASK and pngs[0] == expected[k]
        except BaseException as err:  # noqa: BLE001 (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    entries = guard.memory._entries  # the bookkeeping stayed consistent under contention
    assert len(entries) <= 5
    assert guard.memory._bytes == sum(len(entry.png or b"") for entry in entries.values())


def test_a_deep_copy_is_the_same_shared_guard(config):
    guard = _own(config)
    holder = {"guard": guard}
    assert copy.deepcopy(guard) is guard and copy.deepcopy(holder)["guard"] is guard


def test_a_shared_memory_never_lends_a_verdict_to_a_guard_whose_detector_differs(config):
    from guardalign_core.detector import create_detector

    strict = config.model_copy(update={"detector": config.detector.model_copy(update={"threshold": 100.0}),
                                       "policy": PolicyConfig(action="block")})
    lenient_detector = create_detector(config.model_copy(update={"detector": config.detector.model_copy(update={"threshold": -1.0})}))
    memory = CheckedImageMemory()
    misconfigured = ImageGuard(strict, detector=lenient_detector, memory=memory)  # strict config, lenient detector
    honest = ImageGuard(strict, memory=memory)
    image = _png(3)
    assert scan(misconfigured, [image])[0][0].decision == Decision.ALLOW
    assert scan(honest, [image])[0][0].decision == Decision.BLOCK  # not the other guard's "allow (reused)"
    assert config_fingerprint(strict, lenient_detector) != config_fingerprint(strict, honest.detector)


def test_each_entry_holds_the_bytes_that_were_checked(config, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(4))
    guard = _own(config.model_copy(update={"images": ImageLimits(allow_local_files=True)}))
    verdict = guard.screen([ContentImage("file", source=path), ContentImage("bytes", source=_png(5))])
    assert [entry.checked for entry in verdict.images] == [_png(4), _png(5)]


def test_two_guards_with_the_same_config_never_mask_twice(config, monkeypatch):
    """A RAG postprocessor and an LLM adapter each build their own guard: the LLM's must recognise the postprocessor's output."""
    postprocessor, llm = ImageGuard(config), ImageGuard(config)  # the default, process-wide memory
    image = _png(21)
    (masked,) = scan(postprocessor, [image])[1]
    assert masked is not None and masked != image
    calls = _counting(llm, monkeypatch)
    results, forwarded = scan(llm, [masked])
    assert calls == [] and forwarded == [None]  # recognised: not scanned, not masked a second time
    assert results[0].reason.startswith("already sanitised by this guard")


def test_an_entry_larger_than_the_byte_budget_is_not_stored(config, monkeypatch):
    small, big = _png(8), _png(9)
    _, (png_small, png_big) = scan(_own(config), [small, big], reuse=False)
    budget = min(len(png_small), len(png_big)) + 1
    if max(len(png_small), len(png_big)) <= budget:
        pytest.skip("the two masked images happened to encode to the same size")
    fits, too_big = (small, big) if len(png_small) < len(png_big) else (big, small)
    guard = ImageGuard(config, memory=CheckedImageMemory(max_bytes=budget))
    calls = _counting(guard, monkeypatch)
    scan(guard, [fits])
    scan(guard, [too_big])  # over the whole budget: not stored, and it does not evict the other
    scan(guard, [fits])
    assert calls == [1, 1]
