"""Finding images in LangChain messages: every image and every refused block, in order.

:func:`find_images` walks each message's raw ``content`` (what a provider integration actually
sends, so a translator that drops a block from ``content_blocks`` cannot hide an image) and
reports every image as a :class:`~guardalign_core.screening.ContentImage` for
:meth:`ImageGuard.screen`, with where it sits and the shape to write it back in.

Default deny: a content item is forwarded only if its type is known to carry no image (text,
reasoning, tool calls, ...) *and* nothing inline hides beside its text, or its image was
screened. An item of a type not understood here that carries binary data (bytes, base64 under
any key, a byte list), a URL, a path or a file id is refused (named in the verdict) unless its
type is allow-listed; so is a text-like item holding inline data or a nested media block
outside its text (tool-call arguments and provider tokens such as ``signature`` excepted:
providers never decode them as media).

Shapes understood: OpenAI ``image_url`` and Responses ``input_image``; LangChain v1 and v0
``image`` / ``file`` / ``text-plain`` blocks; Anthropic ``image`` / ``document`` with a
``source`` (``base64``, ``url``, ``file``, ``text``, nested ``content``) and ``tool_result``
with nested content; Google ``media`` blocks. A ``file`` block without a MIME type, or with
``application/octet-stream``, that holds image bytes is screened as an image.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage

from guardalign_core._payloads import carries_media, inline_media
from guardalign_core.screening import ContentImage, sniff_mime

__all__ = ["TEXT_ONLY_TYPES", "FoundImage", "find_images"]

TEXT_ONLY_TYPES = frozenset({
    "text", "reasoning", "thinking", "redacted_thinking", "tool_call", "tool_call_chunk", "invalid_tool_call", "tool_use",
    "server_tool_call", "server_tool_call_chunk", "function_call", "refusal", "citation",
})
"""Content item types known to carry no image: their text is forwarded without a look inside
(what sits beside it is checked for inline media)."""

_PRIMARY_TEXT = {"text": "text", "reasoning": "reasoning", "thinking": "thinking", "refusal": "refusal"}
_TOOL_ARGUMENT_KEYS = frozenset({"args", "input", "arguments"})
"""Tool-call arguments: JSON text to the model, never decoded as media by a provider."""
_OPAQUE_KEYS = frozenset({"signature", "encrypted_content", "encrypted_index"})
"""Provider-encrypted tokens (Anthropic thinking signatures, OpenAI encrypted reasoning)."""


@dataclass(frozen=True)
class FoundImage:
    """One image in a request: where it sits, its shape, and what the core reads for it.

    Attributes:
        path: the location: ``(message, item)`` for a top-level content item, longer for a
            nested one (``(m, c, "content", k)`` inside an Anthropic ``tool_result``).
        shape: the block family the image is written back as (``openai``, ``input_image``,
            ``anthropic``, ``v1``, ``file``, ``media``).
        image: what goes to :meth:`ImageGuard.screen` (or the refusal).
        inline_only: the block holds nothing but inline bytes, with a MIME type; it may then go
            as it is when the verdict forwards exactly those bytes.
    """

    path: tuple[Any, ...]
    shape: str
    image: ContentImage
    inline_only: bool = False

    @property
    def label(self) -> str:
        return self.image.label

    @property
    def message_index(self) -> int:
        return self.path[0]


# -- finding images -----------------------------------------------------------------------


def _b64_bytes(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class _Walker:
    """Walks one request's content and collects :class:`FoundImage` entries."""

    def __init__(self, allow: frozenset[str]) -> None:
        self.allow = allow
        self.found: list[FoundImage] = []

    def add(self, path: tuple[Any, ...], label: str, shape: str, source: Any = None, mime: str | None = None,
            refusal: str | None = None, inline_only: bool = False) -> None:
        self.found.append(FoundImage(path, shape, ContentImage(label, source=source, refusal=refusal, mime=mime), inline_only))

    def refuse(self, path: tuple[Any, ...], label: str, kind: str, why: str) -> None:
        if kind in self.allow:
            return
        self.add(path, label, "refused", refusal=f"content block of type {kind!r} {why}; it is not forwarded unless its type "
                 f"is allow-listed (allow_block_types=({kind!r},))")

    def items(self, items: Sequence[Any], path: tuple[Any, ...], label: str) -> None:
        for k, item in enumerate(items):
            self.item(item, (*path, k), f"{label}[{k}]")

    def item(self, item: Any, path: tuple[Any, ...], label: str) -> None:
        if isinstance(item, str):
            return
        if not isinstance(item, Mapping):
            if carries_media(item) or not isinstance(item, (int, float, bool, type(None))):
                self.refuse(path, label, type(item).__name__, "is not a content block the guard understands")
            return
        kind = str(item.get("type") or "")
        if kind in TEXT_ONLY_TYPES:
            self.text_only(item, path, label, kind)
            return
        if kind == "image_url":
            value = item.get("image_url")
            url = value.get("url") if isinstance(value, Mapping) else value
            self.url_image(path, label, "openai", url, None)
        elif kind == "input_image":
            if item.get("file_id"):
                self.add(path, label, "input_image", refusal="the image is a provider file id that cannot be checked locally")
            else:
                self.url_image(path, label, "input_image", item.get("image_url"), None)
        elif kind == "image":
            self.image(item, path, label)
        elif kind in ("file", "text-plain", "input_file", "audio", "video"):
            self.file(item, path, label, kind)
        elif kind == "media":
            self.media(item, path, label)
        elif kind == "tool_result":
            content = item.get("content")
            if isinstance(content, list):
                self.items(content, (*path, "content"), f"{label}.content")
            elif content is not None and not isinstance(content, str):
                self.refuse(path, label, kind, "holds content the guard does not understand")
        elif kind == "document":
            self.document(item, path, label)
        elif kind in self.allow:
            return
        elif carries_media(item):
            self.refuse(path, label, kind or "(no type)", "is not understood by the guard and carries data, a URL, a path or a file id")

    def text_only(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str, kind: str) -> None:
        """A block known to carry text: refused if its text is not text or inline media sits beside it."""
        primary = _PRIMARY_TEXT.get(kind)
        if primary is not None and not isinstance(item.get(primary), (str, type(None))):
            self.refuse(path, label, kind, f"holds a {type(item.get(primary)).__name__} where its text belongs")
            return
        opaque = _OPAQUE_KEYS | ({"data"} if kind == "redacted_thinking" else frozenset())
        rest = {k: v for k, v in item.items() if k not in ("type", primary) and k not in _TOOL_ARGUMENT_KEYS}
        if inline_media(rest, opaque_keys=opaque):
            self.refuse(path, label, kind, "carries inline data (bytes, base64, a data: URL or a nested media block) beside its text")

    def url_image(self, path: tuple[Any, ...], label: str, shape: str, url: Any, mime: str | None) -> None:
        if not isinstance(url, str) or not url.strip():
            self.add(path, label, shape, refusal="the image block holds no image (no URL or data)")
            return
        inline = url.strip().lower().startswith("data:")
        self.add(path, label, shape, source=url, mime=mime, inline_only=inline)

    def image(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str) -> None:
        source = item.get("source")
        if isinstance(source, Mapping):  # Anthropic
            kind = source.get("type")
            if kind == "base64" and isinstance(source.get("data"), str):
                self.add(path, label, "anthropic", source=source["data"], mime=source.get("media_type"), inline_only=True)
            elif kind == "url":
                self.url_image(path, label, "anthropic", source.get("url"), None)
            else:
                self.add(path, label, "anthropic", refusal=f"image source of type {kind!r} cannot be checked locally (send base64 data)")
            return
        self.v1(item, path, label, "v1")

    def ambiguous(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str, kind: str) -> bool:
        """Refuse a non-image block holding inline data under both ``base64`` and ``data``.

        Converters disagree on which key wins (langchain-core's OpenAI converter prefers
        ``data``), so the guard could find no image in one while the provider sends an image
        from the other, and such a block is forwarded as it came. Default deny: refused, not
        guessed at. (An image block with two sources is screened on one and rewritten to hold
        only the checked bytes, see :meth:`v1`.)
        """
        if not (item.get("base64") and item.get("data")):
            return False
        self.add(path, label, "refused", refusal=f"the {kind} block holds inline data twice (base64 and data); "
                 "providers differ on which one they send, so keep exactly one")
        return True

    def v1(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str, shape: str) -> None:
        """A LangChain v1 (``base64``/``url``/``file_id``) or v0 (``source_type`` + ``data``/``url``/``id``) block."""
        mime = item.get("mime_type")
        v0 = item.get("source_type")
        data = item.get("base64") or (item.get("data") if v0 == "base64" or (v0 is None and isinstance(item.get("data"), str)) else None)
        url = item.get("url") or (item.get("data") if v0 == "url" else None)
        file_id = item.get("file_id") or (item.get("id") if v0 == "id" else None)
        # every key that names content counts: base64 and data are two sources, not one (a converter
        # may send the other), so such a block is never forwarded as it came, only rewritten
        sources = sum(1 for key in ("base64", "data", "url", "file_id") if item.get(key)) + (v0 == "id" and bool(item.get("id")))
        if data:
            self.add(path, label, shape, source=data, mime=mime, inline_only=sources == 1 and bool(mime))
        elif url:
            self.url_image(path, label, shape, url, mime)
        elif file_id:
            self.add(path, label, shape, refusal="the image is a provider file id (file_id) that cannot be checked locally")
        else:
            self.add(path, label, shape, refusal="the image block holds no image data (no base64, url or file_id)")

    def file(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str, kind: str) -> None:
        mime = str(item.get("mime_type") or "").lower()
        if mime.startswith("image/"):
            self.v1(item, path, label, "file")
            return
        if self.ambiguous(item, path, label, kind):
            return
        if kind == "text-plain" and not (item.get("base64") or item.get("url") or item.get("file_id") or item.get("data")):
            return  # inline text only
        # Whatever the label says, inline bytes that are an image are screened as one: a block
        # declared audio or text/plain must not carry an unchecked picture.
        payload = item.get("base64") or (item.get("data") if isinstance(item.get("data"), str) else None)
        raw = _b64_bytes(payload) if isinstance(payload, str) and kind != "video" else None
        if raw is not None and sniff_mime(raw) is not None:
            self.add(path, label, "file", source=raw, mime=None)
            return
        if kind == "audio" or mime.startswith(("text/", "audio/")):
            return  # carries no image
        self.refuse(path, label, kind, f"({mime or 'no MIME type'}) may carry images the guard cannot check")

    def media(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str) -> None:
        mime = str(item.get("mime_type") or "").lower()
        data = item.get("data")
        raw = bytes(data) if isinstance(data, (bytes, bytearray)) else (_b64_bytes(data) if isinstance(data, str) else None)
        if mime.startswith("image/") or (raw is not None and sniff_mime(raw) is not None):
            if raw is None:
                self.add(path, label, "media", refusal="the media block's image is not inline data (file_uri) and cannot be checked locally")
            else:
                self.add(path, label, "media", source=raw, mime=mime or None, inline_only=not item.get("file_uri"))
        elif mime.startswith(("text/", "audio/")):
            return
        else:
            self.refuse(path, label, "media", f"({mime or 'no MIME type'}) may carry images the guard cannot check")

    def document(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str) -> None:
        source = item.get("source")
        kind = source.get("type") if isinstance(source, Mapping) else None
        if kind == "text":
            return
        if kind == "content" and isinstance(source.get("content"), list):  # type: ignore[union-attr]
            self.items(source["content"], (*path, "source", "content"), f"{label}.source.content")  # type: ignore[index]
            return
        if isinstance(source, Mapping) and kind == "base64" and str(source.get("media_type") or "").startswith("image/"):
            self.add(path, label, "anthropic", source=source.get("data"), mime=source.get("media_type"), inline_only=True)
            return
        if isinstance(source, Mapping) or carries_media(item):
            self.refuse(path, label, "document", f"(source {kind!r}) may carry images the guard cannot check")


def find_images(messages: Sequence[BaseMessage], *, allow_block_types: Iterable[str] = ()) -> list[FoundImage]:
    """Every image (and every refused block) in a request, in message and content order.

    Args:
        messages: the request.
        allow_block_types: content item types forwarded unscreened although they may carry
            data (the caller's explicit choice, e.g. ``("file",)`` for PDFs).

    Returns:
        One :class:`FoundImage` per image or refused block; empty for a text-only request.

    Example:
        >>> msg = HumanMessage(content=[{"type": "text", "text": "hi"},
        ...     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}])
        >>> [found.label for found in find_images([msg])]
        ['messages[0].content[1]']
    """
    walker = _Walker(frozenset(allow_block_types))
    for m, message in enumerate(messages):
        if isinstance(message.content, list):
            walker.items(message.content, (m,), f"messages[{m}].content")
    return walker.found


