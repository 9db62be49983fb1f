"""Every decision about OpenAI chat-message content, in one place.

What: :func:`screen_chat_body` takes an OpenAI ``/v1/chat/completions`` body, finds its
images (``image_url`` parts), reads them through the core's one reader of content images
(:func:`guardalign_core.images.read_content_bytes`), scans them in one batch, decides, and
returns the body to forward: allowed images byte-identical, masked ones as PNG data URLs
(``detail`` and other keys kept), remote images as the exact bytes that were checked, and
the black-box safety prompt applied.

Why one module: the core screening step (``ImageGuard.screen``) will replace the scanning
here; the rest of the server only sees :class:`ScreenedBody`. Default deny: a content part
or message field this module does not understand and that carries data, a URL, a path or a
file id is refused (:class:`ContentError`, a 400), never forwarded.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from guardalign_core.errors import ImageError
from guardalign_core.guard import CheckedScan, GuardDecision, ImageGuard, SafetyPrompt
from guardalign_core.images import ImageLimits, read_content_bytes
from guardalign_core.results import Decision, Status

ScanFn = Callable[[list[bytes], list[str]], CheckedScan]
"""Scans a request's images (bytes, labels) in one batch: ``guard.scan_checked`` or a micro-batcher."""

_TEXT_PARTS = {"text": ("text",), "refusal": ("refusal",), "input_audio": ("input_audio",)}
"""Part types that cannot carry an image, with the keys they may hold besides ``type``."""

_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio", "reasoning_content"}
"""Message fields understood (none of them carries an image except ``content``)."""

_DATA_KEYS = {"url", "data", "file_id", "file_data", "path", "image", "image_url", "file", "base64", "b64_json", "source", "uri", "bytes"}
_MIME_BY_FORMAT = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}


class ContentError(ValueError):
    """The request cannot be screened as sent (a 400): unknown data-carrying part, unreadable source, over budget.

    ``code`` is a stable machine-readable code; the message names the position and the part
    type, never the content.
    """

    def __init__(self, message: str, *, code: str = "guardalign_invalid_content", param: str | None = None) -> None:
        self.code = code
        self.param = param
        super().__init__(message)


@dataclass
class ImageRef:
    """One image of the request: where it sits, the exact bytes read, how it was given."""

    message: int
    part: int
    label: str
    data: bytes
    remote: bool


@dataclass
class ScreenedBody:
    """The outcome of :func:`screen_chat_body`.

    ``body`` is what to forward (``None`` when blocked); ``changed`` is false when it is the
    input object untouched (so the raw request bytes can be forwarded as they came).
    """

    body: dict[str, Any] | None
    decision: GuardDecision
    refs: list[ImageRef] = field(default_factory=list)
    changed: bool = False
    pngs: list[bytes | None] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.body is None

    @property
    def unreadable(self) -> bool:
        """Blocked because an image could not be checked (fail-closed), not because it was unsafe."""
        return self.blocked and self.decision.status == Status.ERROR and not self.decision.unsafe


def _carries_data(value: Any, depth: int = 0) -> bool:
    """Whether an unknown part/field holds something that could be (or point to) an image."""
    if depth > 8:
        return True
    if isinstance(value, dict):
        return any(k in _DATA_KEYS or _carries_data(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_carries_data(v, depth + 1) for v in value)
    if isinstance(value, str):
        text = value.strip().lower()
        return len(text) > 256 or text.startswith(("data:", "http:", "https:", "file:", "/", "\\", "~"))
    return isinstance(value, (bytes, bytearray))


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.strip():
        raise ContentError(f"{where}: image_url part without a url string", param=where)
    return url


class ImageBudget:
    """Reads a request's images one by one through the core reader, enforcing the per-request budget."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.count = self.total_bytes = self.total_pixels = 0

    def read(self, source: str | bytes, label: str, message: int = -1, part: int = -1) -> ImageRef:
        """The :class:`ImageRef` of one image source (a data URL, base64, an allowed http(s) URL, or bytes).

        Raises:
            ContentError: the source cannot be read, or the request goes over its budget.
        """
        limits = self.limits
        if self.count >= limits.max_images:
            raise ContentError(f"the request holds more than {limits.max_images} images (ImageLimits.max_images)", code="guardalign_image_budget")
        try:
            data = read_content_bytes(source, limits, source=label)
        except ImageError as err:
            raise ContentError(str(err), code="guardalign_invalid_image", param=label) from None
        self.count += 1
        self.total_bytes += len(data)
        if self.total_bytes > limits.max_total_bytes:
            raise ContentError(
                f"the request's images add up to more than {limits.max_total_bytes} bytes (ImageLimits.max_total_bytes)",
                code="guardalign_image_budget",
            )
        self.total_pixels += _pixels(data)
        if self.total_pixels > limits.max_total_pixels:
            raise ContentError(
                f"the request's images add up to more than {limits.max_total_pixels} pixels (ImageLimits.max_total_pixels)",
                code="guardalign_image_budget",
            )
        remote = isinstance(source, str) and source.strip().lower().startswith(("http:", "https:"))
        return ImageRef(message, part, label, data, remote=remote)


def collect_images(messages: Any, limits: ImageLimits) -> list[ImageRef]:
    """Find and read every image of the messages, refusing what cannot be screened.

    Raises:
        ContentError: messages malformed, an unknown part type or message field carrying
            data, an image source that cannot be read (remote off, file path, bad base64),
            or the per-request image budget exceeded.
    """
    if not isinstance(messages, list) or not messages:
        raise ContentError("messages: expected a non-empty list of messages", param="messages")
    refs: list[ImageRef] = []
    budget = ImageBudget(limits)
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ContentError(f"{where}: expected an object with a string 'role'", param=where)
        for key in message:
            if key not in _MESSAGE_KEYS and _carries_data(message[key]):
                raise ContentError(f"{where}: field {key!r} is not understood and carries data; it is refused, not forwarded", param=f"{where}.{key}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ContentError(f"{where}.content: expected a string or a list of parts", param=f"{where}.content")
        for p, part in enumerate(content):
            pwhere = f"{where}.content[{p}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ContentError(f"{pwhere}: expected an object with a string 'type'", param=pwhere)
            kind = part["type"]
            known = _TEXT_PARTS.get(kind, ("image_url",) if kind == "image_url" else None)
            if known is not None:
                extra = {k: v for k, v in part.items() if k != "type" and k not in known}
                inner = part.get("image_url") if kind == "image_url" and isinstance(part.get("image_url"), dict) else {}
                extra.update({f"image_url.{k}": v for k, v in inner.items() if k not in ("url", "detail")})
                if _carries_data(extra):
                    raise ContentError(
                        f"{pwhere}: a {kind!r} part with extra fields that carry data ({', '.join(sorted(extra))}); refused, not forwarded",
                        code="guardalign_unsupported_content",
                        param=pwhere,
                    )
            if kind in _TEXT_PARTS:
                continue
            if kind != "image_url":
                if _carries_data({k: v for k, v in part.items() if k != "type"}):
                    raise ContentError(
                        f"{pwhere}: content part type {kind!r} is not screened by GuardAlign and carries data; "
                        "it is refused, not forwarded",
                        code="guardalign_unsupported_content",
                        param=pwhere,
                    )
                continue
            url = _image_url(part, pwhere)
            refs.append(budget.read(url, pwhere, m, p))
    return refs


def _pixels(data: bytes) -> int:
    """Width×height from the image header (no decoding); 0 when unreadable (the detector then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 (undecodable bytes are reported by the detector, fail-closed)
        return 0
    return width * height


def data_url(data: bytes) -> str:
    """A ``data:`` URL for image bytes, with the MIME type of their real format."""
    from PIL import Image

    mime = "image/png"
    try:
        with Image.open(io.BytesIO(data)) as image:
            mime = _MIME_BY_FORMAT.get(image.format or "", mime)
    except Exception:  # noqa: BLE001 (only reached for fail_open images the detector could not read)
        pass
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _set_url(part: dict[str, Any], url: str) -> dict[str, Any]:
    value = part.get("image_url")
    new = dict(part)
    new["image_url"] = {**value, "url": url} if isinstance(value, dict) else {"url": url}
    return new


def apply_safety_prompt(messages: list[dict[str, Any]], safety: SafetyPrompt) -> list[dict[str, Any]]:
    """Add the planned safety instruction to the leading system/developer message (or put one first); prefill as a trailing assistant turn."""
    if not safety.applied:
        return messages
    out = list(messages)
    text = safety.system_text()
    if text:
        first = out[0] if out else None
        if first is not None and first.get("role") in ("system", "developer"):
            content = first.get("content")
            if isinstance(content, list):
                merged: Any = [*content, {"type": "text", "text": text}]
            else:
                merged = f"{content}\n\n{text}" if content else text
            out[0] = {**first, "content": merged}
        else:
            out.insert(0, {"role": "system", "content": text})
    if safety.prefill:
        out.append({"role": "assistant", "content": safety.prefill})
    return out


def rewrite_messages(messages: list[dict[str, Any]], refs: Sequence[ImageRef], scanned: CheckedScan) -> tuple[list[dict[str, Any]], bool]:
    """The messages with each image replaced as its verdict says; unchanged parts are the same objects."""
    replacements: dict[tuple[int, int], str] = {}
    for ref, result, png in zip(refs, scanned.results, scanned.pngs):
        if png is not None and result.decision == Decision.MASK:
            replacements[(ref.message, ref.part)] = data_url(png)
        elif ref.remote:
            # the model must get exactly what was checked, never what the URL serves later
            replacements[(ref.message, ref.part)] = data_url(ref.data)
    if not replacements:
        return messages, False
    out = list(messages)
    for (m, p), url in replacements.items():
        if out[m] is messages[m]:
            out[m] = {**messages[m], "content": list(messages[m]["content"])}
        out[m]["content"][p] = _set_url(out[m]["content"][p], url)
    return out, True


def screen_chat_body(
    body: dict[str, Any], guard: ImageGuard, *, scan: ScanFn | None = None, safety_prompt: bool = True
) -> ScreenedBody:
    """Screen an OpenAI chat-completions body and return what may be forwarded.

    Args:
        body: the parsed request body (not modified).
        guard: the core guard (policy, limits, prefix settings).
        scan: how the images are scanned (default ``guard.scan_checked``; the server passes
            its micro-batcher).
        safety_prompt: add the black-box safety prompt the guard plans.

    Returns:
        A :class:`ScreenedBody`; ``body`` is ``None`` when the request is blocked.

    Raises:
        ContentError: the request cannot be screened as sent (see :func:`collect_images`).

    Example:
        >>> screen_chat_body({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, guard).changed  # doctest: +SKIP
        False
    """
    messages = body.get("messages")
    refs = collect_images(messages, guard.config.images)
    if refs:
        scanner = scan or (lambda images, labels: guard.scan_checked(images, sources=labels))
        scanned = scanner([r.data for r in refs], [r.label for r in refs])
    else:
        scanned = CheckedScan([], [], [])
    decision = guard.decide(scanned.results)
    if decision.blocked:
        return ScreenedBody(None, decision, refs, pngs=list(scanned.pngs))
    new_messages, changed = rewrite_messages(messages, refs, scanned)
    if safety_prompt and decision.safety_prompt.applied:
        new_messages, changed = apply_safety_prompt(new_messages, decision.safety_prompt), True
    if not changed:
        return ScreenedBody(body, decision, refs, changed=False, pngs=list(scanned.pngs))
    return ScreenedBody({**body, "messages": new_messages}, decision, refs, changed=True, pngs=list(scanned.pngs))


def decision_header(decision: GuardDecision) -> str:
    """The ``x-guardalign-decision`` value: the decision, plus ``; status=error`` when a check could not run."""
    return decision.decision.value + ("; status=error" if decision.status == Status.ERROR else "")

