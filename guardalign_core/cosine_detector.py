"""ETA's baseline (arXiv 2410.06625) behind the detector interface: one global CLIP cosine.

Decoding, batching and the policy are the shared pipeline's
(:class:`~guardalign_core.detector.BaseDetector`); this module only scores.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from PIL import Image

from ._findings import Finding as _Finding
from .detector import BaseDetector
from .results import PatchBox

__all__ = ["CosineDetector"]


class CosineDetector(BaseDetector):
    """ETA's baseline (arXiv 2410.06625): one global CLIP cosine against a single unsafe prompt.

    The image is unsafe if cos(image, prompt) ≥ ``cosine_threshold`` (0.16). It has one
    "patch", the whole image, so under the ``mask`` policy the whole image is masked. Its
    input is CLIP's standard short-side resize and centre crop, as ETA feeds it.

    Example:
        >>> detector = create_detector("eta-baseline")  # doctest: +SKIP
        >>> detector.scan_one("photo.jpg").score  # doctest: +SKIP
    """

    name = "cosine"

    @property
    def threshold(self) -> float:
        return self.config.cosine_threshold

    def _model_input(self, image: Image.Image) -> torch.Tensor:
        return self.encoder.center_crop(image)  # (1, 3, S, S)

    def _score(self, images: Sequence[Image.Image]) -> tuple[list[_Finding], dict[str, float]]:
        enc = self.encoder
        t0 = time.perf_counter()
        feats = enc.encode_images(self._pixels(images), self.config.batch_size)  # (B, D)
        t1 = time.perf_counter()
        prompt = enc.cached_text_embeddings(f"prompt:{self.config.cosine_prompt}", [self.config.cosine_prompt], None)
        cos = (feats @ prompt[0]).cpu()  # (B,)
        t2 = time.perf_counter()
        findings = [
            _Finding((1, 1), [(0, 0, *image.size)], cos[b : b + 1], cos[b : b + 1] >= self.threshold, top_categories=["unsafe"])
            if bool(torch.isfinite(cos[b]))
            else _Finding((1, 1), [], cos[b : b + 1], torch.zeros(1, dtype=torch.bool), error="the backbone produced a non-finite feature for this image")
            for b, image in enumerate(images)
        ]
        return findings, {"encode": (t1 - t0) * 1000, "ot": (t2 - t1) * 1000}

    def _reason(self, finding: _Finding, boxes: list[PatchBox]) -> str:
        cos = float(finding.statistic[0])
        relation = "≥" if boxes else "<"
        return f"global cosine to the unsafe prompt {cos:.4f} {relation} {self.threshold:g}"
