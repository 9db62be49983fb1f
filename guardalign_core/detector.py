"""Unsafe-patch detectors: GuardAlign's OT detector (Eqs. 7–11) and ETA's cosine baseline.

Both share one interface: ``scan(images) -> list[ScanResult]``, one result per input in
order. Decoding, the policy (mask / block / flag), fail-closed error handling and masking
live here once; the two detectors differ only in how they score pixels.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .concepts import ConceptBank, bank_from_config
from .config import DetectorConfig, GuardConfig, PolicyConfig, resolve_config
from .encoders import ClipEncoder, get_clip_encoder
from .errors import ImageError
from .images import DecodedImage, ImageLimits, ImageSource, decode_image, load_image
from .masking import Box, grid_boxes, mask_boxes
from .rules import STATISTICS, PatchDecisions, decide_patches
from .results import Decision, PatchBox, ScanResult, Status

logger = logging.getLogger(__name__)

_IMAGES_PER_CHUNK = 32


@dataclass
class _Finding:
    """What a detector measured for one decoded image, before the policy is applied."""

    grid: tuple[int, int]
    boxes: list[Box]
    statistic: torch.Tensor  # (M,) what the rule compares with the threshold (lower = more unsafe)
    unsafe: torch.Tensor  # (M,) bool
    scores: torch.Tensor | None = None  # (M,) scale-free score, when it differs from the statistic
    d_ot: torch.Tensor | None = None  # (M,) raw Eq. 9
    safe_probability: torch.Tensor | None = None  # (M,)
    expected_costs: torch.Tensor | None = None  # (M, C)
    top_categories: list[str] = field(default_factory=list)
    error: str | None = None  # the check could not run on this image (e.g. non-finite features)


_MANY_PATCHES_FIRE = 0.5
"""More than this fraction of an image's patches firing logs a warning (see OTDetector)."""


def _label(image: Any, index: int) -> str:
    if isinstance(image, (str, os.PathLike)) and not str(image).startswith("data:") and len(str(image)) < 1024:
        path = Path(str(image))
        if path.suffix and path.name and not str(image).startswith(("http://", "https://")):
            return path.name
    return f"image {index}"


class BaseDetector:
    """Decoding, batching, policy and masking shared by every detector.

    Subclasses set :attr:`name` and implement :meth:`_score`.
    """

    name: str = "base"
    rule: str | None = None

    def __init__(
        self,
        config: DetectorConfig | None = None,
        *,
        policy: PolicyConfig | None = None,
        image_limits: ImageLimits | None = None,
        encoder: ClipEncoder | None = None,
    ) -> None:
        self.config = config or DetectorConfig()
        self.policy = policy or PolicyConfig()
        self.image_limits = image_limits or ImageLimits()
        self._encoder = encoder

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.config.backbone_id!r}, threshold={self.threshold}, policy={self.policy.action!r})"

    @property
    def encoder(self) -> ClipEncoder:
        """The shared CLIP encoder, loaded on first use."""
        if self._encoder is None:
            c = self.config
            self._encoder = get_clip_encoder(c.model, c.pretrained, c.device, c.dtype)
        return self._encoder

    @property
    def is_loaded(self) -> bool:
        return self._encoder is not None

    @property
    def threshold(self) -> float:
        raise NotImplementedError

    def load(self) -> "BaseDetector":
        """Load the backbone now rather than on the first scan (e.g. at server start)."""
        _ = self.encoder
        return self

    def _score(self, images: list[Image.Image]) -> tuple[list[_Finding], dict[str, float]]:
        """Score decoded images; returns one finding per image and stage timings (ms, whole batch)."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    def scan(
        self,
        images: ImageSource | Sequence[ImageSource],
        *,
        sources: Sequence[str] | None = None,
        policy: PolicyConfig | None = None,
        raise_errors: bool = False,
        progress: bool = False,
    ) -> list[ScanResult]:
        """Scan images and apply the policy to each.

        Args:
            images: one input or a sequence (paths, bytes, base64, data URLs, PIL images).
            sources: labels for the results (default: file names or ``"image i"``).
            policy: overrides the detector's policy for this call.
            raise_errors: raise the first :class:`~guardalign_core.errors.ImageError` instead
                of returning a ``status=error`` result for that image.
            progress: show a progress bar (for long command-line runs).

        Returns:
            One :class:`ScanResult` per input, in order. A bad image fails only its own result
            (``status=error``; decision ``block`` unless ``policy.fail_open``).

        Example:
            >>> detector = create_detector("fast-cpu")  # doctest: +SKIP
            >>> [r.decision for r in detector.scan(["cat.jpg", "figstep.png"])]  # doctest: +SKIP
            [<Decision.ALLOW: 'allow'>, <Decision.MASK: 'mask'>]
        """
        if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)
        if sources is not None and len(sources) != len(images):
            raise ValueError(f"sources: got {len(sources)} labels for {len(images)} images")
        policy = policy or self.policy
        labels = list(sources) if sources is not None else [_label(img, i) for i, img in enumerate(images)]
        results: list[ScanResult] = []
        bar = None
        if progress and len(images) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(images), unit="img", desc=f"scan ({self.name})")
        try:
            for start in range(0, len(images), _IMAGES_PER_CHUNK):
                chunk = images[start : start + _IMAGES_PER_CHUNK]
                results.extend(self._scan_chunk(chunk, labels[start : start + len(chunk)], start, policy, raise_errors))
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return results

    def scan_one(self, image: ImageSource, **kwargs: Any) -> ScanResult:
        """Scan a single image (see :meth:`scan`)."""
        return self.scan([image], **kwargs)[0]

    check = scan_one

    # -- internals ---------------------------------------------------------------------------
    def _scan_chunk(
        self, images: list, labels: list[str], offset: int, policy: PolicyConfig, raise_errors: bool
    ) -> list[ScanResult]:
        t0 = time.perf_counter()
        decoded: dict[int, Image.Image] = {}
        reports: dict[int, DecodedImage] = {}
        errors: dict[int, ImageError] = {}
        for i, image in enumerate(images):
            try:
                if isinstance(image, (bytes, bytearray, memoryview)):
                    # Bytes are what adapters forward: keep the decoder's word on whether a model
                    # decoding them would see exactly these pixels (alpha, frames, 16-bit, EXIF).
                    reports[i] = decode_image(bytes(image), self.image_limits, source=labels[i])
                    decoded[i] = reports[i].rgb
                else:
                    decoded[i] = load_image(image, self.image_limits, source=labels[i])
            except ImageError as err:
                if raise_errors:
                    raise
                errors[i] = err
        decode_ms = (time.perf_counter() - t0) * 1000
        order = sorted(decoded)
        findings, timings = self._score([decoded[i] for i in order]) if order else ([], {})
        timings = {"decode": decode_ms, **timings}
        per_image = {k: v / max(1, len(images)) for k, v in timings.items()}
        by_index = dict(zip(order, findings))
        results = []
        for i in range(len(images)):
            if i in errors:
                results.append(self._error_result(offset + i, labels[i], errors[i], policy))
            elif by_index[i].error is not None:
                results.append(self._error_result(offset + i, labels[i], by_index[i].error, policy, image=decoded[i]))
            else:
                results.append(self._result(offset + i, labels[i], decoded[i], by_index[i], policy, per_image))
            if i in reports:
                report = reports[i]
                results[-1] = results[-1].model_copy(update={
                    "input_format": report.format,
                    "forward_as_sent": report.forward_as_sent,
                    "reencode_reason": report.why_reencode or None,
                })
        return results

    def _base_fields(self, index: int, label: str, policy: PolicyConfig) -> dict[str, Any]:
        return {
            "index": index,
            "source": label,
            "detector": self.name,
            "threshold": self.threshold,
            "backbone": self.config.backbone_id,
            "policy": policy.action,
            "rule": self.rule,
        }

    def _error_result(
        self, index: int, label: str, err: ImageError | str, policy: PolicyConfig, image: Image.Image | None = None
    ) -> ScanResult:
        decision = Decision.ALLOW if policy.fail_open else Decision.BLOCK
        what = "forwarded unchecked (fail_open)" if policy.fail_open else "blocked (fail-closed)"
        kind = type(err).__name__ if isinstance(err, Exception) else "non-finite scores"
        return ScanResult(
            **self._base_fields(index, label, policy),
            status=Status.ERROR,
            decision=decision,
            unsafe=False,
            reason=f"image could not be checked ({kind}); {what}",
            error=str(err),
            image_size=image.size if image is not None else None,
            masked_image=image if (policy.fail_open and image is not None) else None,
        )

    def _result(
        self, index: int, label: str, image: Image.Image, finding: _Finding, policy: PolicyConfig, timings: dict[str, float]
    ) -> ScanResult:
        rows, cols = finding.grid
        unsafe_idx = finding.unsafe.nonzero().flatten().tolist()
        boxes = [
            PatchBox(
                x0=finding.boxes[m][0], y0=finding.boxes[m][1], x1=finding.boxes[m][2], y1=finding.boxes[m][3],
                row=m // cols, col=m % cols, score=float(finding.statistic[m]), category=finding.top_categories[m],
            )
            for m in unsafe_idx
        ]
        unsafe = bool(unsafe_idx)
        t0 = time.perf_counter()
        if not unsafe:
            decision, output = Decision.ALLOW, image
        elif policy.action == "mask":
            decision = Decision.MASK
            output = mask_boxes(image, [finding.boxes[m] for m in unsafe_idx], self.config.mask_mode, self._mask_fill())
        elif policy.action == "block":
            decision, output = Decision.BLOCK, None
        else:
            decision, output = Decision.FLAG, image
        timings = {**timings, "mask": timings.get("mask", 0.0) + (time.perf_counter() - t0) * 1000}
        costs = finding.expected_costs

        def grid_of(values: torch.Tensor | None) -> list[list[float]] | None:
            return values.reshape(rows, cols).tolist() if values is not None else None

        return ScanResult(
            **self._base_fields(index, label, policy),
            status=Status.OK,
            decision=decision,
            unsafe=unsafe,
            score=float(finding.statistic.min()),
            reason=self._reason(finding, boxes),
            image_size=image.size,
            grid=(rows, cols),
            scores=grid_of(finding.scores if finding.scores is not None else finding.statistic),
            d_ot=grid_of(finding.d_ot),
            safe_probability=grid_of(finding.safe_probability),
            statistic=grid_of(finding.statistic) if finding.scores is not None else None,
            categories=self._category_names() if costs is not None else None,
            category_costs=costs.reshape(rows, cols, -1).tolist() if costs is not None else None,
            top_categories=[finding.top_categories[r * cols : (r + 1) * cols] for r in range(rows)],
            unsafe_boxes=boxes,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            masked_image=output,
        )

    def _mask_fill(self) -> tuple[int, int, int]:
        return self.encoder.mean_color if self.config.mask_mode == "mean" else (0, 0, 0)

    def _category_names(self) -> list[str] | None:
        return None

    def _reason(self, finding: _Finding, boxes: list[PatchBox]) -> str:
        raise NotImplementedError


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
        cache_dir = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else Path.home() / ".cache" / "guardalign"
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

    def patch_features(self, images: list[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, M, D) normalised patch features and the (rows, cols) patch grid."""
        c, enc = self.config, self.encoder
        if c.patch_mode == "grid":
            crops = torch.cat([enc.grid_crops(img, c.grid_size) for img in images])  # (B·g², 3, S, S)
            feats = enc.encode_images(crops, c.batch_size)  # (B·g², D)
            return feats.reshape(len(images), c.grid_size**2, -1), (c.grid_size, c.grid_size)
        grid = enc.token_grid
        whole = torch.cat([enc.whole(img) for img in images])  # (B, 3, S, S)
        tokens, _ = enc.encode_tokens(whole, c.batch_size)  # (B, rows·cols, D)
        return tokens, grid

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

    def _score(self, images: list[Image.Image]) -> tuple[list[_Finding], dict[str, float]]:
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


class CosineDetector(BaseDetector):
    """ETA's baseline (arXiv 2410.06625): one global CLIP cosine against a single unsafe prompt.

    The image is unsafe if cos(image, prompt) ≥ ``cosine_threshold`` (0.16). It has one
    "patch", the whole image, so under the ``mask`` policy the whole image is masked.
    """

    name = "cosine"

    @property
    def threshold(self) -> float:
        return self.config.cosine_threshold

    def _score(self, images: list[Image.Image]) -> tuple[list[_Finding], dict[str, float]]:
        enc = self.encoder
        t0 = time.perf_counter()
        feats = enc.encode_images(torch.cat([enc.center_crop(img) for img in images]), self.config.batch_size)  # (B, D)
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


def create_detector(
    spec: str | Path | GuardConfig | DetectorConfig | None = None,
    *,
    policy: PolicyConfig | None = None,
    image_limits: ImageLimits | None = None,
    bank: ConceptBank | None = None,
    **overrides: Any,
) -> BaseDetector:
    """Build a detector from a preset name, a config file, or a config object.

    Args:
        spec: a preset (``list_presets()``), a YAML/JSON file, a ``GuardConfig`` or a
            ``DetectorConfig``; ``None`` for the defaults (ViT-L-14-336/openai, grid 3, τ 0.42).
        policy, image_limits: override those parts of the config.
        bank: a concept bank to use instead of the configured one.
        **overrides: ``DetectorConfig`` fields, e.g. ``device="cuda"``, ``threshold=0.3``.

    Returns:
        An :class:`OTDetector` or a :class:`CosineDetector` (``kind='cosine'``). Nothing is
        loaded until the first scan (or :meth:`BaseDetector.load`).

    Raises:
        ValueError: unknown preset, missing file, or an invalid field (named in the message).

    Example:
        >>> detector = create_detector("tiny-random", grid_size=2)
        >>> detector.config.grid_size
        2
    """
    config = resolve_config(spec)
    detector_config = DetectorConfig.model_validate({**config.detector.model_dump(), **overrides}) if overrides else config.detector
    kwargs: dict[str, Any] = {"policy": policy or config.policy, "image_limits": image_limits or config.images}
    if detector_config.kind == "cosine":
        return CosineDetector(detector_config, **kwargs)
    return OTDetector(detector_config, bank=bank, **kwargs)
