"""Unsafe-patch detectors: the shared scan pipeline, and the one factory.

Every detector shares one interface, ``scan(images) -> list[ScanResult]``, one result per
input in order, and this pipeline: images are split into chunks; each chunk is *prepared* on
the CPU (decoded, checked against the request's pixel budget from its header, resized and
cut into the model input, moved to the device once), *scored* (CLIP forward and the rule),
and *finished* (results built, the policy of :func:`~guardalign_core.policy.apply_policy`
applied, unsafe patches masked). When a scan spans more than one chunk, chunk k+1 is
prepared on a thread while chunk k is scored, and chunk k is finished while chunk k+1 is
scored (``DetectorConfig.prefetch``), so the accelerator is not left waiting for PNG
decoding; results are identical either way. The same three stages are public
(:meth:`BaseDetector.prepare`, :meth:`~BaseDetector.score_prepared`,
:meth:`~BaseDetector.finish_prepared`) for callers that merge the backbone work of several
requests, each prepared in its own thread (the server's micro-batcher).

The detectors themselves differ only in how they score pixels:
:class:`~guardalign_core.ot_detector.OTDetector` (GuardAlign, Eqs. 7–11) and
:class:`~guardalign_core.cosine_detector.CosineDetector` (ETA's baseline). Both are
importable from here (``from guardalign_core.detector import OTDetector``).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from PIL import Image

from ._decode import check_shape
from ._findings import Finding, PreparedImages, error_finding, finding_result, unsafe_boxes
from .budget import RequestBudget
from .concepts import ConceptBank
from .config import DetectorConfig, GuardConfig, PolicyConfig, resolve_config
from .encoders import ClipEncoder, encoder_for_config, get_clip_encoder
from .errors import ImageError, RequestBudgetError
from .images import DecodedImage, ImageLimits, ImageSource, decode_image, load_image, read_image_bytes
from .policy import apply_policy
from .prefetch import prefetch
from .results import PatchBox, ScanResult

if TYPE_CHECKING:
    from .cosine_detector import CosineDetector
    from .ot_detector import OTDetector

__all__ = ["BaseDetector", "CosineDetector", "OTDetector", "PreparedImages", "create_detector"]

logger = logging.getLogger(__name__)

_IMAGES_PER_CHUNK = 32
"""Images per chunk: one CLIP batch of g² crops each, one host→device transfer."""


def _label(image: Any, index: int) -> str:
    if isinstance(image, (str, os.PathLike)) and not str(image).startswith("data:") and len(str(image)) < 1024:
        path = Path(str(image))
        if path.suffix and path.name and not str(image).startswith(("http://", "https://")):
            return path.name
    return f"image {index}"


def _decode(
    image: ImageSource, limits: ImageLimits, label: str, budget: RequestBudget | None
) -> tuple[Image.Image, DecodedImage | None]:
    """One input → checked RGB pixels; with a budget, its pixels are charged before they are decoded.

    Bytes are what adapters forward, so the decoder's report (alpha, frames, 16-bit, EXIF:
    may a model decoding them see other pixels?) is kept for them.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        report = decode_image(bytes(image), limits, source=label, budget=budget)
        return report.rgb, report
    if isinstance(image, Image.Image):
        if budget is not None:
            check_shape(image.size, limits, label)  # the per-image limit names itself first
            budget.charge(pixels=image.size[0] * image.size[1], source=label)
        return load_image(image, limits, source=label), None
    if budget is None:
        return load_image(image, limits, source=label), None
    return decode_image(read_image_bytes(image, limits, source=label), limits, source=label, budget=budget).rgb, None


class BaseDetector:
    """Decoding, batching, the prefetch pipeline and result building shared by every detector.

    Subclasses set :attr:`name` and implement :meth:`_model_input` (one decoded image → its
    model input), :meth:`_score` and :meth:`_reason`.
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
        return f"{type(self).__name__}(backbone={self.backbone!r}, threshold={self.threshold}, policy={self.policy.action!r})"

    @property
    def encoder(self) -> ClipEncoder:
        """The shared CLIP encoder for this config's device, dtype and backend, loaded on first use."""
        if self._encoder is None:
            # Through this module's name, so patching ``guardalign_core.detector.get_clip_encoder``
            # (tests proving a text-only request loads nothing) reaches every detector.
            self._encoder = encoder_for_config(self.config, loader=get_clip_encoder)
        return self._encoder

    @property
    def is_loaded(self) -> bool:
        return self._encoder is not None

    @property
    def execution(self) -> str | None:
        """The resolved execution path of the loaded encoder (``'cpu/float32/openvino'``); ``None`` before it loads."""
        execution = getattr(self._encoder, "execution", None)
        return str(execution) if execution is not None else None

    @property
    def backbone(self) -> str:
        """What every verdict names: the backbone and, once loaded, the path it ran on (``'ViT-B-32/openai (cpu/float32/torch)'``)."""
        execution = self.execution
        return f"{self.config.backbone_id} ({execution})" if execution else self.config.backbone_id

    @property
    def threshold(self) -> float:
        raise NotImplementedError

    def load(self) -> "BaseDetector":
        """Load the backbone now rather than on the first scan (e.g. at server start)."""
        _ = self.encoder
        return self

    def _model_input(self, image: Image.Image) -> torch.Tensor:
        """One decoded image → its normalised model input on the CPU, (k, 3, S, S)."""
        raise NotImplementedError

    def _score(self, images: Sequence[Image.Image]) -> tuple[list[Finding], dict[str, float]]:
        """Score decoded images (a :class:`PreparedImages` in a scan); one finding per image and stage timings (ms)."""
        raise NotImplementedError

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model input of ``images``: prepared on the prefetch thread in a scan, else built now."""
        pixels = getattr(images, "pixels", None)
        if pixels is None:
            pixels = torch.cat([self._model_input(image) for image in images])
        return pixels

    # -- public API --------------------------------------------------------------------------
    def scan(
        self,
        images: ImageSource | Sequence[ImageSource],
        *,
        sources: Sequence[str] | None = None,
        policy: PolicyConfig | None = None,
        raise_errors: bool = False,
        progress: bool = False,
        budget: RequestBudget | Sequence[RequestBudget | None] | None = None,
    ) -> list[ScanResult]:
        """Scan images and apply the policy to each.

        Args:
            images: one input or a sequence (paths, bytes, base64, data URLs, PIL images).
            sources: labels for the results (default: file names or ``"image i"``).
            policy: overrides the detector's policy for this call.
            raise_errors: raise the first :class:`~guardalign_core.errors.ImageError` instead
                of returning a ``status=error`` result for that image.
            progress: show a progress bar (for long command-line runs).
            budget: the request's :class:`~guardalign_core.budget.RequestBudget`. Each
                image's pixels are charged from its header before it is decoded, so an image
                that would take the request over ``max_total_pixels`` is never decoded. A
                sequence gives one budget per image (a batch merging several requests).

        Returns:
            One :class:`ScanResult` per input, in order. A bad image fails only its own result
            (``status=error``; decision ``block`` unless ``policy.fail_open``).

        Raises:
            RequestBudgetError: the request's images add up to more than its budget (the
                whole request is over budget, not one image).

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
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * len(images)
        if len(budgets) != len(images):
            raise ValueError(f"budget: got {len(budgets)} budgets for {len(images)} images")
        chunks = [(start, images[start : start + _IMAGES_PER_CHUNK]) for start in range(0, len(images), _IMAGES_PER_CHUNK)]

        def prepare(chunk: tuple[int, list]) -> PreparedImages:
            start, items = chunk
            end = start + len(items)
            return self._prepare(start, items, labels[start:end], raise_errors, budgets[start:end])

        overlap = self.config.prefetch and len(chunks) > 1
        bar = None
        if progress and len(images) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(images), unit="img", desc=f"scan ({self.name})")
        # One worker prepares chunks in input order, so the budget is charged in input order
        # too; ``depth`` bounds how many prepared chunks may wait (memory stays bounded).
        ready: Iterator[PreparedImages] = (
            prefetch(chunks, prepare, depth=self.config.prefetch_depth, workers=1) if overlap else map(prepare, chunks)
        )
        finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardalign-finish") if overlap else None
        results: list[ScanResult] = []
        pending: Future | None = None
        try:
            for chunk in ready:
                findings, timings = self._score(chunk) if chunk.images else ([], {})
                if finisher is None:
                    results.extend(self._finish(chunk, findings, timings, policy))
                else:
                    if pending is not None:  # at most one chunk being finished while the next is scored
                        results.extend(pending.result())
                    pending = finisher.submit(self._finish, chunk, findings, timings, policy)
                    del chunk  # the finisher holds it now
                if bar is not None:
                    bar.update(len(results) - bar.n)
            if pending is not None:
                results.extend(pending.result())
        finally:
            close = getattr(ready, "close", None)
            if close is not None:
                close()  # an early exit (an error) stops the prefetch thread before returning
            if finisher is not None:
                finisher.shutdown(wait=True)
            if bar is not None:
                bar.update(len(results) - bar.n)
                bar.close()
        return results

    # -- a scan in three steps (micro-batching across callers) ---------------------------------
    def prepare(
        self, images: Sequence[ImageSource], *, sources: Sequence[str] | None = None, budget: RequestBudget | None = None
    ) -> PreparedImages:
        """Step 1 of :meth:`scan` for one group of images: decode (the budget charged first) and build the model input.

        ``prepare`` → :meth:`score_prepared` → :meth:`finish_prepared` is :meth:`scan` cut
        where the backbone runs, so that a server can do the CPU work of each request in that
        request's own thread (PNG decoding releases the GIL: many decode at once) and still
        run the backbone once for many requests. An image that cannot be decoded is kept as
        an error entry of the group (its result is ``status=error``, as in a scan).

        Raises:
            RequestBudgetError: the group's images take ``budget`` over its limit (nothing
                beyond the image that would cross it is decoded).
        """
        images = list(images)
        labels = list(sources) if sources is not None else [_label(img, i) for i, img in enumerate(images)]
        if len(labels) != len(images):
            raise ValueError(f"sources: got {len(labels)} labels for {len(images)} images")
        return self._prepare(0, images, labels, False, [budget] * len(images))

    def score_prepared(self, groups: Sequence[PreparedImages]) -> list[tuple[list[Finding], dict[str, float]]]:
        """Step 2: score the decoded images of several prepared groups in one backbone call.

        Returns, per group and in order, its findings (one per decoded image) and its share
        of the stage timings (in proportion to its images), for :meth:`finish_prepared`.

        Raises:
            RuntimeError: the backbone returned a finding count that does not match its inputs.
        """
        live = [group for group in groups if group.images]
        if not live:
            return [([], {}) for _ in groups]
        pixels = live[0].pixels if len(live) == 1 else torch.cat([group.pixels for group in live])
        merged = PreparedImages(0, [], [image for group in live for image in group.images], [], {}, {}, pixels)
        findings, timings = self._score(merged)
        if len(findings) != len(merged.images):
            raise RuntimeError(f"the detector returned {len(findings)} findings for {len(merged.images)} images")
        scored, start = [], 0
        for group in groups:
            count = len(group.images)
            share = count / len(merged.images)
            scored.append((findings[start : start + count], {name: ms * share for name, ms in timings.items()}))
            start += count
        return scored

    def finish_prepared(
        self, group: PreparedImages, scored: tuple[list[Finding], dict[str, float]], policy: PolicyConfig | None = None
    ) -> list[ScanResult]:
        """Step 3: one result per input of ``group``, in order, with ``policy`` applied (masking happens here)."""
        findings, timings = scored
        return self._finish(group, findings, timings, policy or self.policy)

    def scan_one(self, image: ImageSource, **kwargs: Any) -> ScanResult:
        """Scan a single image (see :meth:`scan`)."""
        return self.scan([image], **kwargs)[0]

    check = scan_one

    # -- the pipeline's stages -----------------------------------------------------------------
    def _prepare(
        self, offset: int, images: list, labels: list[str], raise_errors: bool, budgets: list[RequestBudget | None]
    ) -> PreparedImages:
        """The CPU stage of one chunk: decode (budget first), build the model input, one transfer to the device."""
        t0 = time.perf_counter()
        decoded: list[Image.Image] = []
        positions: list[int] = []
        reports: dict[int, DecodedImage] = {}
        errors: dict[int, ImageError] = {}
        for i, image in enumerate(images):
            try:
                rgb, report = _decode(image, self.image_limits, labels[i], budgets[i])
            except RequestBudgetError:
                raise  # the request as a whole is over budget: not this image's error
            except ImageError as err:
                if raise_errors:
                    raise
                errors[i] = err
                continue
            decoded.append(rgb)
            positions.append(i)
            if report is not None:
                reports[i] = report
        t1 = time.perf_counter()
        pixels = None
        if decoded:
            pixels = self.encoder.to_device(torch.cat([self._model_input(image) for image in decoded]))
        t2 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1000, "preprocess": (t2 - t1) * 1000}
        return PreparedImages(offset, labels, decoded, positions, errors, reports, pixels, timings)

    def _finish(
        self, chunk: PreparedImages, findings: list[Finding], timings: dict[str, float], policy: PolicyConfig
    ) -> list[ScanResult]:
        """Results for one chunk, in order, with the policy applied (masking happens here)."""
        per_image = {k: v / max(1, len(chunk.labels)) for k, v in {**chunk.timings, **timings}.items()}
        by_position = {p: (image, finding) for p, image, finding in zip(chunk.positions, chunk.images, findings)}
        fill = self._mask_fill() if chunk.images else (0, 0, 0)  # an all-error chunk never loads the backbone
        results = []
        for i, label in enumerate(chunk.labels):
            index = chunk.offset + i
            if i in chunk.errors:
                result = self._error_result(index, label, chunk.errors[i], policy)
            else:
                image, finding = by_position[i]
                if finding.error is not None:
                    result = self._error_result(index, label, finding.error, policy, image=image)
                else:
                    result = self._result(index, label, image, finding, policy, per_image)
            result = apply_policy(result, policy, mask_mode=self.config.mask_mode, fill=fill)
            if i in chunk.reports:
                report = chunk.reports[i]
                result = result.model_copy(update={
                    "input_format": report.format,
                    "forward_as_sent": report.forward_as_sent,
                    "reencode_reason": report.why_reencode or None,
                })
            results.append(result)
        return results

    # -- results -----------------------------------------------------------------------------
    def _base_fields(self, index: int, label: str, policy: PolicyConfig) -> dict[str, Any]:
        return {
            "index": index,
            "source": label,
            "detector": self.name,
            "threshold": self.threshold,
            "backbone": self.backbone,
            "execution": self.execution,
            "policy": policy.action,
            "rule": self.rule,
        }

    def _error_result(
        self, index: int, label: str, err: ImageError | str, policy: PolicyConfig, image: Image.Image | None = None
    ) -> ScanResult:
        """A ``status=error`` finding; :func:`apply_policy` then blocks it, or passes it under ``fail_open``."""
        return error_finding(self._base_fields(index, label, policy), err, policy, image)

    def _result(
        self, index: int, label: str, image: Image.Image, finding: Finding, policy: PolicyConfig, timings: dict[str, float]
    ) -> ScanResult:
        """The finding for one image: scores, boxes and the checked (unmasked) pixels; the policy is applied after."""
        boxes = unsafe_boxes(finding)
        return finding_result(
            self._base_fields(index, label, policy), image, finding, boxes, self._reason(finding, boxes), self._category_names(), timings
        )

    def _mask_fill(self) -> tuple[int, int, int]:
        return self.encoder.mean_color if self.config.mask_mode == "mean" else (0, 0, 0)

    def _category_names(self) -> list[str] | None:
        return None

    def _reason(self, finding: Finding, boxes: list[PatchBox]) -> str:
        raise NotImplementedError


def __getattr__(name: str) -> Any:
    # The detectors live in their own modules, which import this one; resolving them lazily
    # keeps ``from guardalign_core.detector import OTDetector`` working without an import cycle.
    if name == "OTDetector":
        from .ot_detector import OTDetector

        return OTDetector
    if name == "CosineDetector":
        from .cosine_detector import CosineDetector

        return CosineDetector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from .cosine_detector import CosineDetector
    from .ot_detector import OTDetector

    config = resolve_config(spec)
    detector_config = DetectorConfig.model_validate({**config.detector.model_dump(), **overrides}) if overrides else config.detector
    kwargs: dict[str, Any] = {"policy": policy or config.policy, "image_limits": image_limits or config.images}
    if detector_config.kind == "cosine":
        return CosineDetector(detector_config, **kwargs)
    return OTDetector(detector_config, bank=bank, **kwargs)
