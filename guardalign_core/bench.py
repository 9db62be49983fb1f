"""Side-by-side timings for ``guardalign bench`` (never asserted in unit tests).

Speed does not depend on weights, so a named open_clip config with random weights gives
real timings where its checkpoint cannot be downloaded.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from typing import Any, Sequence

import torch
from PIL import Image

from .config import DetectorConfig
from .detector import CosineDetector, OTDetector
from .encoders import get_clip_encoder
from .images import load_image

logger = logging.getLogger(__name__)


def machine_label() -> str:
    """A short description of where the numbers were taken."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _stage_means(results) -> dict[str, float]:
    keys = {k for r in results for k in r.timings_ms}
    return {k: statistics.fmean(r.timings_ms.get(k, 0.0) for r in results) for k in sorted(keys)}


def bench_detector(
    images: Sequence[Image.Image | str],
    *,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str = "cpu",
    grid_size: int = 3,
    batch: int = 32,
    single: int = 8,
    patch_mode: str = "grid",
) -> dict[str, Any]:
    """Time decoding, encoding, the OT stage and masking for the OT detector and the cosine baseline.

    Both detectors share one encoder and run on the same ``batch`` images. The threshold of
    the OT detector is set at the median patch score of a first pass, so masking really runs.
    One-at-a-time scanning is timed on the first ``single`` images.

    Returns:
        A dict of per-detector stage timings (ms/image), images/s, the OT/encoding ratio and
        the batched vs one-at-a-time speed-up.
    """
    decoded = [load_image(img) if not isinstance(img, Image.Image) else img for img in images][:batch]
    if len(decoded) < batch:
        decoded = (decoded * (batch // max(1, len(decoded)) + 1))[:batch]
    encoder = get_clip_encoder(model, pretrained, device)
    config = DetectorConfig(model=model, pretrained=pretrained, device=device, grid_size=grid_size, patch_mode=patch_mode, disk_cache=False)
    ot = OTDetector(config, encoder=encoder)
    ot.scan(decoded[:2])  # warm-up, text embeddings
    first = ot.scan(decoded)
    median = statistics.median(s for r in first for row in r.scores for s in row)
    ot = OTDetector(config.model_copy(update={"threshold": median}), encoder=encoder)
    cosine = CosineDetector(config.model_copy(update={"kind": "cosine"}), encoder=encoder)
    cosine.scan(decoded[:2])
    report: dict[str, Any] = {"machine": machine_label(), "model": model, "weights": pretrained or "random", "grid": grid_size,
                              "patch_mode": patch_mode, "batch": batch}
    for name, detector in (("ot", ot), ("cosine", cosine)):
        t0 = time.perf_counter()
        results = detector.scan(decoded)
        wall = time.perf_counter() - t0
        stages = _stage_means(results)
        report[name] = {
            "ms_per_image": {k: round(v, 3) for k, v in stages.items()},
            "wall_ms_per_image": round(wall * 1000 / len(decoded), 3),
            "images_per_s": round(len(decoded) / wall, 2),
            "ot_over_encode": round(stages.get("ot", 0.0) / stages["encode"], 5) if stages.get("encode") else None,
            "masked_images": sum(r.decision.value == "mask" for r in results),
        }
    t0 = time.perf_counter()
    for image in decoded[:single]:
        ot.scan([image])
    one_ms = (time.perf_counter() - t0) * 1000 / single
    report["ot"]["one_at_a_time_ms_per_image"] = round(one_ms, 3)
    report["ot"]["batched_speedup"] = round(one_ms / report["ot"]["wall_ms_per_image"], 3)
    return report
