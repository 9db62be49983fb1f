"""GuardAlign's OT-enhanced unsafe-patch detector (DESIGN §1A, Eqs. 7–11).

Patch features (g×g crops, or ViT tokens) are matched to the unsafe-concept bank by
per-category entropic OT, and :func:`~guardalign_core.rules.decide_patches` decides per
patch. Decoding, batching and the policy are the shared pipeline's
(:class:`~guardalign_core.detector.BaseDetector`); this module only scores.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .concepts import ConceptBank, bank_from_config
from .config import DetectorConfig
from ._findings import Finding as _Finding
from .detector import BaseDetector
from .results import PatchBox
from .encoders import default_cache_dir
from .masking import grid_boxes
from .rules import STATISTICS, PatchDecisions, decide_patches

__all__ = ["OTDetector"]

logger = logging.getLogger(__name__)

_MANY_PATCHES_FIRE = 0.5
"""More than this fraction of an image's patches firing logs a warning (see OTDetector)."""


class OTDetector(BaseDetector):
    """GuardAlign's OT-enhanced unsafe-patch detector (DESIGN §1A, Eqs. 7–11).

    Patch features (g×g crops, or ViT tokens) are matched to the unsafe-concept bank by
    per-category entropic OT, and :func:`~guardalign_core.rules.decide_patches` applies the
    configured rule (default ``"contrast"``: the patch is closer, under CLIP's zero-shot
    softmax, to an unsafe category than to the benign reference bank); unsafe patches are,
    under the ``mask`` policy, zeroed (Eq. 11).

    Example:
        >>> detector = OTDetector(DetectorConfig(model="ViT-B-32", pretrained="openai"))  # doctest: +SKIP
        >>> result = detector.scan_one("photo.jpg")  # doctest: +SKIP
        >>> result.decision, result.unsafe_boxes  # doctest: +SKIP
    """

    name = "ot"

    def __init__(
        self, config: DetectorConfig | None = None, *, bank: ConceptBank | None = None, reference: ConceptBank | None = None, **kwargs: Any
    ) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.bank = bank or bank_from_config(c.concepts, c.extra_concepts, c.categories, c.exclude_categories)
        if bank is not None and (c.categories or c.exclude_categories):
            self.bank = bank.select(c.categories, c.exclude_categories)
        if reference is None:
            reference = ConceptBank.from_file(c.reference_concepts) if c.reference_concepts else ConceptBank.default_reference()
        self.reference = reference

    @property
    def rule(self) -> str:  # type: ignore[override]
        return self.config.rule

    @property
    def threshold(self) -> float:
        return self.config.effective_threshold

    def _category_names(self) -> list[str]:
        return self.bank.names

    def _bank_embeddings(self, bank: ConceptBank) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [v for cat in bank.categories for v in cat.variants]
        cache_dir = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()
        # The encoder's identity (model, weights, device/dtype/backend) is part of the key.
        flat = self.encoder.cached_text_embeddings(f"bank:{bank.fingerprint()}", texts, cache_dir if self.config.disk_cache else None)
        n_cat, n_var = len(bank.categories), bank.max_variants
        concepts = torch.zeros(n_cat, n_var, flat.shape[-1])
        mask = torch.zeros(n_cat, n_var, dtype=torch.bool)
        offset = 0
        for i, cat in enumerate(bank.categories):
            k = len(cat.variants)
            concepts[i, :k], mask[i, :k] = flat[offset : offset + k], True
            offset += k
        return concepts, mask

    def concept_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsafe bank's text embeddings, padded: ((C, N, D) unit vectors, (C, N) bool mask). Cached."""
        return self._bank_embeddings(self.bank)

    def reference_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The benign reference bank's embeddings, padded: ((K, N', D), (K, N') mask). Cached."""
        return self._bank_embeddings(self.reference)

    def _model_input(self, image: Image.Image) -> torch.Tensor:
        if self.config.patch_mode == "grid":
            return self.encoder.grid_crops(image, self.config.grid_size)  # (g², 3, S, S)
        return self.encoder.whole(image)  # (1, 3, S, S)

    def patch_features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, M, D) normalised patch features and the (rows, cols) patch grid.

        ``images`` is a list of decoded images, or the :class:`~guardalign_core.detector.PreparedImages`
        of a scan, whose model input was already built (and moved to the device) off the critical path.
        """
        c, enc = self.config, self.encoder
        pixels = self._pixels(images)  # (B·g², 3, S, S) grid crops, or (B, 3, S, S) whole images
        if c.patch_mode == "grid":
            feats = enc.encode_images(pixels, c.batch_size)  # (B·g², D)
            return feats.reshape(len(images), c.grid_size**2, -1), (c.grid_size, c.grid_size)
        tokens, _ = enc.encode_tokens(pixels, c.batch_size)  # (B, rows·cols, D)
        return tokens, enc.token_grid

    def decide(self, features: torch.Tensor) -> PatchDecisions:
        """The decision stage on (B, M, D) patch features, exactly as :meth:`scan` runs it."""
        c = self.config
        device = self.encoder.device
        concepts, variant_mask = self.concept_embeddings()
        reference = reference_mask = None
        if c.rule == "contrast":
            reference, reference_mask = self.reference_embeddings()
            reference, reference_mask = reference.to(device), reference_mask.to(device)
        return decide_patches(
            features.to(device),
            concepts.to(device),
            variant_mask.to(device),
            rule=c.rule,
            threshold=c.threshold,
            reference=reference,
            reference_mask=reference_mask,
            logit_scale=self.encoder.logit_scale,
            temperature=c.temperature,
            weighting=c.entropy_weighting,
            reg=c.sinkhorn.reg,
            max_iter=c.sinkhorn.max_iter,
            tol=c.sinkhorn.tol,
            check_every=c.sinkhorn.check_every,
            backend=c.sinkhorn.backend,
        )

    def _score(self, images: Sequence[Image.Image]) -> tuple[list[_Finding], dict[str, float]]:
        t0 = time.perf_counter()
        feats, (rows, cols) = self.patch_features(images)
        t1 = time.perf_counter()
        out = self.decide(feats)
        t2 = time.perf_counter()
        cpu = {name: getattr(out, name).cpu() if getattr(out, name) is not None else None
               for name in ("statistic", "unsafe", "scores", "d_ot", "safe_probability", "expected_costs", "finite")}
        names = self.bank.names
        findings = []
        for b, image in enumerate(images):
            if not bool(cpu["finite"][b]):
                findings.append(_Finding((rows, cols), [], cpu["statistic"][b], cpu["unsafe"][b],
                                         error="the backbone produced non-finite features or scores for this image"))
                continue
            top = [names[k] for k in cpu["expected_costs"][b].argmin(-1).tolist()]
            p_safe = cpu["safe_probability"]
            findings.append(
                _Finding(
                    (rows, cols), grid_boxes(*image.size, rows, cols), cpu["statistic"][b], cpu["unsafe"][b],
                    scores=cpu["scores"][b], d_ot=cpu["d_ot"][b],
                    safe_probability=p_safe[b] if p_safe is not None else None,
                    expected_costs=cpu["expected_costs"][b], top_categories=top,
                )
            )
            fired = int(cpu["unsafe"][b].sum())
            if fired > _MANY_PATCHES_FIRE * rows * cols:
                logger.warning(
                    "%d of %d patches of one image fired (rule %s, threshold %g): unless the image is unsafe as a whole, "
                    "the threshold probably does not fit this backbone, grid and bank; run `guardalign calibrate`",
                    fired, rows * cols, self.rule, self.threshold,
                )
        return findings, {"encode": (t1 - t0) * 1000, "ot": (t2 - t1) * 1000}

    def _reason(self, finding: _Finding, boxes: list[PatchBox]) -> str:
        total = finding.statistic.numel()
        what = STATISTICS[self.rule]
        if not boxes:
            return f"no patch at or under τ={self.threshold:g} (rule {self.rule}: lowest {what} {float(finding.statistic.min()):.4f}, {total} patches)"
        cats = sorted({b.category for b in boxes}, key=lambda n: [b.category for b in boxes].count(n), reverse=True)
        return f"{len(boxes)} of {total} patches at or under τ={self.threshold:g} (rule {self.rule}); closest categories: {', '.join(cats)}"
