"""Overhead of the LangChain adapter (for ``guardalign bench``).

Two numbers from the issue: a text-only request through ``GuardedChatModel`` against the
bare chat model (target: at most 1 ms median extra), and a one-image request through the
guard against the detector alone on the same image (target: at most 5 % extra). Runs
offline: a random-weight CLIP (the tiny test model by default) and a fake chat model.
"""

from __future__ import annotations

import base64
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from guardalign_core.config import GuardConfig, PolicyConfig
from guardalign_core.testing.tiny_clip import TINY_CLIP, save_tiny_clip_checkpoint, tiny_detector_config


def _paired_median_ms(
    baseline: Callable[[], Any], candidate: Callable[[], Any], n: int, warmup: int = 3
) -> tuple[float, float, float]:
    """Median ms of two calls timed alternately, and the median of their paired differences.

    Alternating, and taking the median difference of neighbouring calls, keeps load drifts on
    a shared machine out of the overhead.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    a, b = [], []
    for _ in range(n):
        for fn, samples in ((baseline, a), (candidate, b)):
            start = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(a), statistics.median(b), statistics.median(y - x for x, y in zip(a, b))


def _demo_png(size: int = 512) -> bytes:
    """A deterministic synthetic photo-like PNG (gradients plus noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def bench_langchain(n: int = 50, *, backbone: str = TINY_CLIP, image: str | Path | None = None) -> dict[str, Any]:
    """Median overhead of the LangChain guard, offline.

    Args:
        n: timed repetitions per measurement (after 3 warm-up calls).
        backbone: open_clip config name for the random-weight CLIP (default the tiny test
            model; ``"ViT-B-32"`` gives realistic image costs).
        image: an image file for the one-image request (default: a synthetic 512×512 PNG).

    Returns:
        ``{"n", "backbone", "text_only": {...}, "one_image": {...}}``; times are median
        milliseconds, overheads the median of paired differences. ``text_only.overhead_ms``
        is GuardedChatModel minus the bare fake model; ``guard_runnable_ms`` is the guard
        Runnable alone. ``one_image`` compares ``guard.invoke`` with ``detector.scan`` on the same
        image, for an image that passes (``allow``) and one that is masked (``mask``, which
        adds the lossless PNG re-encoding of the sanitised image); ``adapter_ms`` is the
        guard call with the scan precomputed, i.e. the adapter's own cost without CLIP
        timing noise.

    Example:
        >>> bench_langchain(5)["text_only"]["overhead_ms"] < 5  # doctest: +SKIP
        True
    """
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import HumanMessage

    from .chat_models import GuardedChatModel
    from .guard import GuardAlignGuard

    data = Path(image).read_bytes() if image is not None else _demo_png()
    mime = "image/jpeg" if image is not None and Path(image).suffix.lower() in (".jpg", ".jpeg") else "image/png"
    encoded = base64.b64encode(data).decode("ascii")
    data_url = f"data:{mime};base64,{encoded}"
    request = [HumanMessage(content=[{"type": "text", "text": "What is in this image?"}, {"type": "image", "base64": encoded, "mime_type": mime}])]

    with tempfile.TemporaryDirectory(prefix="guardalign-bench-") as tmp:
        checkpoint = save_tiny_clip_checkpoint(Path(tmp) / "clip.pt", model=backbone)

        def guard_for(threshold: float) -> GuardAlignGuard:
            detector = tiny_detector_config(checkpoint, threshold=threshold, cache_dir=tmp).model_copy(update={"model": backbone})
            # reuse off: the same image every iteration would otherwise be scanned only once
            return GuardAlignGuard(config=GuardConfig(detector=detector, policy=PolicyConfig(action="mask")), reuse_checked=False)

        passing, masking = guard_for(-1.0), guard_for(100.0)
        bare = FakeListChatModel(responses=["ok"])
        guarded = GuardedChatModel(model=FakeListChatModel(responses=["ok"]), guard=passing)

        bare_ms, guarded_ms, text_overhead = _paired_median_ms(lambda: bare.invoke("hello"), lambda: guarded.invoke("hello"), n)
        _, runnable_ms, _ = _paired_median_ms(lambda: None, lambda: passing.invoke("hello"), n)

        one_image: dict[str, Any] = {}
        for name, threshold, guard in (("allow", -1.0, passing), ("mask", 100.0, masking)):
            detector = guard.engine.detector
            detector_ms, guard_ms, overhead = _paired_median_ms(
                lambda d=detector: d.scan([data_url], policy=d.policy), lambda g=guard: g.invoke(request), n
            )
            # The adapter's own cost, free of CLIP timing noise: the same call with the scan
            # result precomputed (extraction, write-back, PNG re-encoding, events).
            scanned = detector.scan([data_url], sources=["messages[0].content[1]"], policy=detector.policy)
            stubbed = guard_for(threshold)
            stubbed.engine.detector.scan = lambda *args, _r=scanned, **kwargs: _r  # type: ignore[method-assign]
            _, adapter_ms, _ = _paired_median_ms(lambda: None, lambda g=stubbed: g.invoke(request), n)
            one_image[name] = {
                "adapter_ms": round(adapter_ms, 3),
                "detector_ms": round(detector_ms, 3),
                "guard_ms": round(guard_ms, 3),
                "overhead_ms": round(overhead, 3),
                "overhead_pct": round(100.0 * overhead / detector_ms, 2),
            }
    return {
        "n": n,
        "backbone": backbone,
        "text_only": {
            "bare_model_ms": round(bare_ms, 3),
            "guarded_model_ms": round(guarded_ms, 3),
            "overhead_ms": round(text_overhead, 3),
            "guard_runnable_ms": round(runnable_ms, 3),
            "target_ms": 1.0,
        },
        "one_image": {**one_image, "target_pct": 5.0},
    }
