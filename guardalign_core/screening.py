"""The one screening step: from a request's content images to what may be forwarded.

Between "the detector returned a ScanResult" and "an adapter forwards bytes" this module
owns every decision: it reads each content image through the one reader
(:func:`~guardalign_core.images.read_content_bytes`: local files only when allowed, strings
never looked up on disk), enforces the per-request budget, looks the bytes up in the guard's
memory, scans the misses in one detector batch (with the ``flag`` policy: the detector
scores, it does not decide), applies the mask / block / flag policy here, and says per image
what to forward: nothing, these bytes with this MIME type, or, only under ``fail_open``, the
block as sent. Adapters only find images in their framework's shapes and write the answer
back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from .budget import RequestBudget
from .config import GuardConfig, PolicyConfig
from .errors import ImageError, RequestBudgetError
from .forwarding import EncodedImage, encode_for_forwarding
from .images import ImageLimits, ImageSource, read_content, read_image_bytes
from .memory import CheckedImageMemory, config_fingerprint
from .policy import apply_policy
from .results import Decision, ScanResult, Status
from .verdicts import Forward, ImageVerdict

__all__ = ["ContentImage", "screen_images", "sniff_mime"]


@dataclass(frozen=True)
class ContentImage:
    """One image an adapter found in a request, as it was sent.

    Attributes:
        label: where it sits, content-free (``"messages[1].content[0]"``); names it in verdicts and errors.
        source: what carries it: bytes, a ``data:`` URL, base64 text, an ``http(s)`` URL (fetched
            only if the image limits allow the host), or a path / ``file://`` URL (read only with
            ``ImageLimits.allow_local_files``). ``None`` with ``refusal``.
        refusal: the adapter refuses this block (a shape it does not understand, a provider file
            id it cannot check): never forwarded, whatever ``fail_open`` says.
        mime: the MIME type the block declares (a hint only: what is forwarded is named from its bytes).
        trusted: programmatic input (:meth:`ImageGuard.check`), not message content: files and
            PIL images are read as given.
    """

    label: str
    source: ImageSource | None = None
    refusal: str | None = None
    mime: str | None = None
    trusted: bool = False


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of image bytes from their first bytes (no decode), or ``None`` if not a known image.

    Example:
        >>> sniff_mime(b"\\x89PNG\\r\\n\\x1a\\n...")
        'image/png'
    """
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _encode_forwarded(image: Image.Image, like_format: str | None, limits: ImageLimits) -> EncodedImage:
    """The one re-encode of pixels that are forwarded (sanitised images, pixels whose original cannot go as sent).

    The input's format where that is safe (JPEG stays JPEG, PNG stays PNG), never more than
    ``limits.max_output_bytes`` (downscaled if needed: the verdict then says so), and a MIME
    type that names the bytes.
    """
    return encode_for_forwarding(image, like_format=like_format, max_bytes=limits.max_output_bytes)


def _forward_original(data: bytes, result: ScanResult, limits: ImageLimits) -> bool:
    """Whether the checked bytes themselves may be forwarded (else the checked pixels are re-encoded).

    Only when the decoder said a model decoding them sees exactly the scanned pixels (no
    alpha composited away, no later animation frames, no 16-bit depth, no EXIF rotation), and
    they fit the per-image output budget.
    """
    return bool(result.forward_as_sent) and len(data) <= limits.max_output_bytes


def _read(image: ContentImage, limits: ImageLimits) -> tuple[bytes | Image.Image, bool]:
    """The image's bytes (or a trusted PIL image), and whether its source spells them canonically.

    Canonical (raw bytes, or strictly valid standard base64 inline): the carrier may be
    forwarded as it came when the bytes are forwarded unchanged (:attr:`ImageVerdict.verbatim`).
    """
    source = image.source
    if image.trusted:
        if isinstance(source, Image.Image):
            return source, False
        return read_image_bytes(source, limits, source=image.label), isinstance(source, (bytes, bytearray, memoryview))  # type: ignore[arg-type]
    return read_content(source, limits, source=image.label)  # type: ignore[arg-type]


def _verbatim(canonical: bool, declared: str | None, mime: str) -> bool:
    """Whether a carrier that spells the checked bytes ``canonical``-ly, declaring ``declared``, may go as it came."""
    return canonical and declared is not None and declared.lower() == mime


def _error_result(index: int, label: str, detector: Any, policy: PolicyConfig, what: str, error: str, *, hard: bool = False) -> ScanResult:
    """A ``status=error`` result for an image the detector never saw (unreadable, refused, over budget)."""
    passes = policy.fail_open and not hard
    return ScanResult(
        index=index,
        source=label,
        status=Status.ERROR,
        decision=Decision.ALLOW if passes else Decision.BLOCK,
        unsafe=False,
        reason=f"image could not be checked ({what}); {'forwarded unchecked (fail_open)' if passes else 'blocked (fail-closed)'}",
        detector=detector.name,
        threshold=detector.threshold,
        backbone=getattr(detector, "backbone", detector.config.backbone_id),
        execution=getattr(detector, "execution", None),
        policy=policy.action,
        error=f"{label}: {error}" if not error.startswith(f"{label}: ") else error,
    )


def _scan(
    detector: Any, inputs: list, labels: list[str], policy: PolicyConfig, budget: RequestBudget, offset: int = 0
) -> list[ScanResult]:
    """One detector batch; a failure that is not an ``ImageError`` fails only the image that caused it.

    The detector turns decode errors into per-image results itself and charges each image's
    pixels to the request's ``budget`` from its header, before decoding it (an over-budget
    request raises :class:`RequestBudgetError`, which refuses the whole request). Anything
    else raised from inside a batch (a decoder bug, a malformed file the decoder did not
    expect) would abort every image of the request, so the batch is split until the culprit
    is alone; the pixels the failed batch charged are given back first, since the retries
    charge them again.
    """
    spent = budget.total_pixels
    try:
        return detector.scan(inputs, sources=labels, policy=policy, budget=budget)
    except RequestBudgetError:
        raise
    except Exception as err:  # noqa: BLE001 - becomes that image's status=error (the policy then decides)
        budget.total_pixels = spent  # the scan has returned (its threads joined): nothing else charges now
        if len(inputs) == 1:
            return [_error_result(offset, labels[0], detector, policy, type(err).__name__, f"the image could not be decoded ({type(err).__name__})")]
        half = len(inputs) // 2
        return (_scan(detector, inputs[:half], labels[:half], policy, budget, offset)
                + _scan(detector, inputs[half:], labels[half:], policy, budget, offset + half))


def _verdict(
    index: int, label: str, result: ScanResult, checked: bytes | Image.Image | None, declared: str | None, limits: ImageLimits,
    canonical: bool = False,
) -> ImageVerdict:
    """What to forward for one freshly scanned (policy-applied) image."""
    raw = checked if isinstance(checked, bytes) else None
    if result.decision == Decision.BLOCK:
        return ImageVerdict(index, label, result, Forward.NOTHING, checked=raw, limits=limits)
    if result.status != Status.OK:
        return ImageVerdict(index, label, result, Forward.AS_SENT, checked=raw, limits=limits)
    pixels = result.masked_image
    if result.decision != Decision.MASK and raw is not None and _forward_original(raw, result, limits):
        mime = sniff_mime(raw) or declared or "application/octet-stream"
        return ImageVerdict(index, label, result, Forward.BYTES, data=raw, mime=mime, checked=raw, pixels=pixels, limits=limits,
                            verbatim=_verbatim(canonical, declared, mime))
    encoded = _encode_forwarded(pixels, result.input_format, limits)
    if encoded.downscaled:
        result = result.model_copy(update={"reason": f"{result.reason}; downscaled to {encoded.size[0]}x{encoded.size[1]} to fit ImageLimits.max_output_bytes"})
    elif result.decision != Decision.MASK and result.reencode_reason:
        result = result.model_copy(update={"reason": f"{result.reason}; forwarded re-encoded ({result.reencode_reason})"})
    return ImageVerdict(
        index, label, result, Forward.BYTES, data=encoded.data, mime=encoded.mime, checked=raw, sanitised=True, pixels=pixels, limits=limits
    )


def screen_images(
    images: Sequence[ContentImage],
    *,
    config: GuardConfig,
    detector: Any,
    memory: CheckedImageMemory,
    reuse: bool = True,
) -> tuple[list[ImageVerdict], str | None]:
    """Screen one request's images: read, budget, recall, scan the misses in one batch, apply the policy.

    Args:
        images: the request's images in order, as the adapter found them.
        config: the guard's config (read once by the caller for the whole request).
        detector: the detector that scores (called with the ``flag`` policy).
        memory: verdicts remembered by SHA-256 of the checked bytes (see :mod:`guardalign_core.memory`).
        reuse: look images up and remember them.

    Returns:
        One :class:`ImageVerdict` per image, in order, and why the request is refused as a
        whole (over budget, a block refused by the adapter), or ``None``.
    """
    limits, policy = config.images, config.policy
    labels = [image.label for image in images]
    budget = RequestBudget(limits)

    def refuse_all(err: RequestBudgetError) -> tuple[list[ImageVerdict], str]:
        """Over budget: the whole request is refused, nothing forwarded, whatever ``fail_open`` says."""
        reason = str(err)
        results = [_error_result(k, label, detector, policy, "RequestBudget", reason, hard=True) for k, label in enumerate(labels)]
        return [ImageVerdict(k, labels[k], r, Forward.NOTHING, limits=limits) for k, r in enumerate(results)], reason

    try:
        budget.charge(images=len(images))  # the count is known before anything is read
    except RequestBudgetError as err:
        return refuse_all(err)
    refused: str | None = None
    verdicts: list[ImageVerdict | None] = [None] * len(images)
    contents: list[bytes | Image.Image | None] = [None] * len(images)
    canonical = [False] * len(images)
    for i, image in enumerate(images):
        if image.refusal is not None:
            result = _error_result(i, labels[i], detector, policy, "UnsupportedBlock", image.refusal, hard=True)
            verdicts[i] = ImageVerdict(i, labels[i], result, Forward.NOTHING, limits=limits)
            refused = refused or f"{labels[i]}: {image.refusal}"
            continue
        try:
            contents[i], canonical[i] = _read(image, limits)
        except ImageError as err:
            result = _error_result(i, labels[i], detector, policy, type(err).__name__, str(err))
            verdicts[i] = _verdict(i, labels[i], result, None, image.mime, limits)
            continue
        if isinstance(contents[i], bytes):
            try:
                budget.charge(nbytes=len(contents[i]), source=labels[i])  # type: ignore[arg-type]
            except RequestBudgetError as err:
                return refuse_all(err)
    fingerprint = config_fingerprint(config, detector) if reuse else ""
    for i, content in enumerate(contents):
        if verdicts[i] is not None or not reuse or not isinstance(content, bytes):
            continue
        entry = memory.recall(fingerprint, content)
        if entry is not None:
            result = entry.result.model_copy(update={"index": i, "source": labels[i]})
            sanitised_mime = sniff_mime(entry.png) if entry.png is not None else None
            if entry.png is not None and sanitised_mime is not None:
                # the sanitised re-encode keeps the input's format (JPEG stays JPEG): its type is read from its bytes
                verdicts[i] = ImageVerdict(i, labels[i], result, Forward.BYTES, data=entry.png, mime=sanitised_mime, checked=content,
                                           sanitised=True, reused=True, limits=limits)
            elif entry.png is not None:
                continue  # a remembered re-encode of no known type: scanned again rather than mislabelled
            elif result.decision == Decision.BLOCK:
                verdicts[i] = ImageVerdict(i, labels[i], result, Forward.NOTHING, checked=content, reused=True, limits=limits)
            else:
                mime = sniff_mime(content) or images[i].mime or "application/octet-stream"
                verdicts[i] = ImageVerdict(i, labels[i], result, Forward.BYTES, data=content, mime=mime, checked=content, reused=True,
                                           limits=limits, verbatim=_verbatim(canonical[i], images[i].mime, mime))
    misses = [i for i, v in enumerate(verdicts) if v is None]
    if misses:
        scan_policy = PolicyConfig(action="flag", fail_open=policy.fail_open)  # the detector scores; the policy is applied below
        try:
            # Each image's pixels are charged from its header before it is decoded: an image
            # that would take the request over max_total_pixels is never decoded.
            fresh = _scan(detector, [contents[i] for i in misses], [labels[i] for i in misses], scan_policy, budget)
        except RequestBudgetError as err:
            return refuse_all(err)
        mode = config.detector.mask_mode
        for i, result in zip(misses, fresh):
            fill = detector.encoder.mean_color if mode == "mean" and result.unsafe else (0, 0, 0)
            result = apply_policy(result.model_copy(update={"index": i}), policy, mask_mode=mode, fill=fill)
            verdict = verdicts[i] = _verdict(i, labels[i], result, contents[i], images[i].mime, limits, canonical[i])
            if reuse and result.status == Status.OK and isinstance(contents[i], bytes):
                memory.remember(fingerprint, contents[i], result, verdict.data if verdict.sanitised else None)  # type: ignore[arg-type]
    return [v for v in verdicts if v is not None], refused

