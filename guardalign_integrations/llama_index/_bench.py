"""Throughput of :class:`GuardAlignImagePostprocessor` against the bare detector (for ``guardalign bench``).

The postprocessor must screen all retrieved images in one batched scan, so its throughput
should stay close to the detector's own on the same images (target ≥ 0.95×). Both run on
the tiny random CLIP, where decoding and cropping dominate: the comparison measures the
adapter's overhead (base64, node copies, events, PNG encoding of masked images), not CLIP.
"""

from __future__ import annotations

import base64
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

logger = logging.getLogger(__name__)

TARGET_RATIO = 0.95
_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
_SUFFIXES = (".png", ".jpg", ".jpeg")


def _load_image_bytes(n: int, data_dir: Path | None, seed: int) -> tuple[list[bytes], str]:
    """``n`` encoded images: the shared test images (cycled) if found, else synthetic noise PNGs."""
    directory = data_dir or _DATA_DIR
    files = sorted(
        p for sub in ("benign", "figstep-tiny") if (directory / sub).is_dir()
        for p in (directory / sub).iterdir() if p.suffix.lower() in _SUFFIXES
    )
    if files:
        return [files[i % len(files)].read_bytes() for i in range(n)], f"{directory} ({len(files)} files)"
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out, "synthetic 512x512 noise (shared test images not found)"


def _timed(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    """Alternate the two runs so that load from other processes hits both alike."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_timed(a))
        times_b.append(_timed(b))
    return times_a, times_b


def bench_postprocessor(
    n: int = 32,
    *,
    repeats: int = 5,
    threshold: float | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Images/s of the postprocessor vs the detector alone on the same ``n`` images (tiny CLIP).

    Args:
        n: retrieved image nodes per query (default 32).
        repeats: timed runs of each, interleaved (the best run of each counts), after a warm-up.
        threshold: τ for the tiny CLIP (default: its preset's 0.42; tiny-CLIP scores are
            meaningless: 100 masks everything, -1 nothing).
        data_dir: folder holding ``benign/`` and ``figstep-tiny/`` (default ``../shared/data``
            next to the repository; synthetic images when absent).
        seed: seed of the tiny CLIP's weights and of synthetic images.

    Returns:
        A JSON-ready dict: ``detector_images_per_s``, ``postprocessor_images_per_s``,
        ``ratio`` (postprocessor / detector), ``target_ratio``, ``meets_target``,
        ``scan_calls_per_query`` (1 = one batched scan), ``masked``/``dropped`` node counts,
        timings and what images were used.

    Example:
        >>> from guardalign_integrations.llama_index._bench import bench_postprocessor
        >>> bench_postprocessor(n=8, repeats=1)["scan_calls_per_query"]  # doctest: +SKIP
        1
    """
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats must be at least 1, got n={n}, repeats={repeats}")
    from llama_index.core.schema import ImageNode, NodeWithScore

    from guardalign_core.config import GuardConfig
    from guardalign_core.guard import ImageGuard
    from guardalign_core.images import ImageLimits
    from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config

    from .postprocessor import GuardAlignImagePostprocessor

    images, source = _load_image_bytes(n, Path(data_dir) if data_dir else None, seed)
    with tempfile.TemporaryDirectory(prefix="guardalign-bench-") as tmp:
        checkpoint = save_tiny_clip_checkpoint(Path(tmp) / "tiny.pt", seed=seed)
        overrides = {"threshold": threshold} if threshold is not None else {}
        # One query's retrieved images form one request: the per-request budget must admit all n.
        config = GuardConfig(detector=tiny_detector_config(checkpoint, cache_dir=str(Path(tmp) / "cache"), **overrides),
                             images=ImageLimits(max_images=max(n, ImageLimits().max_images)))
        guard = ImageGuard(config)
        # Every timed run must scan: no reuse of verdicts on images seen in an earlier run.
        screen = GuardAlignImagePostprocessor(guard=guard, reuse_checked=False)
        detector = guard.detector
        nodes = [
            NodeWithScore(node=ImageNode(image=base64.b64encode(data).decode("ascii"), id_=f"image-{i}"), score=1.0)
            for i, data in enumerate(images)
        ]

        scan_calls: list[int] = []
        scan = detector.scan

        def counting_scan(batch: Any, **kwargs: Any) -> Any:
            scan_calls.append(len(batch))
            return scan(batch, **kwargs)

        def run_detector() -> Any:
            return scan(images, policy=guard.policy)

        def run_postprocessor() -> Any:
            return screen.postprocess_nodes(nodes)

        run_detector()  # warm-up: loads CLIP and the concept-bank embeddings
        detector.scan = counting_scan  # type: ignore[method-assign]
        try:
            out = run_postprocessor()
            calls_per_query = len(scan_calls)
            detector_times, post_times = _interleaved(run_detector, run_postprocessor, repeats)
        finally:
            del detector.scan  # back to the class method

    decisions = [n_.node.metadata["guardalign"]["decision"] for n_ in out]
    detector_rate, post_rate = n / min(detector_times), n / min(post_times)  # best run: least disturbed
    ratio = post_rate / detector_rate
    report = {
        "n": n,
        "repeats": repeats,
        "images": source,
        "backbone": config.detector.backbone_id,
        "threshold": config.detector.threshold,
        "detector_images_per_s": round(detector_rate, 2),
        "postprocessor_images_per_s": round(post_rate, 2),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "scan_calls_per_query": calls_per_query,
        "masked": decisions.count("mask"),
        "dropped": n - len(out),
        "detector_s": [round(t, 4) for t in detector_times],
        "postprocessor_s": [round(t, 4) for t in post_times],
        "median_overhead_ms": round((statistics.median(post_times) - statistics.median(detector_times)) * 1000, 2),
    }
    logger.info("postprocessor bench: %s", report)
    return report
