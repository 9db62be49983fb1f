"""Pure helpers between LangChain messages and the core's screening step.

Nothing here touches a model, a detector or a callback. :func:`find_images` walks each
message's raw ``content`` (what a provider integration actually sends, so a translator that
drops a block from ``content_blocks`` cannot hide an image) and reports every image, in order,
as a :class:`~guardalign_core.screening.ContentImage` for :meth:`ImageGuard.screen`;
:func:`write_back` puts the verdict's bytes back in the block's own shape, keeping every key
that is not an image source (OpenAI ``detail``, Anthropic ``cache_control``, ids).

Default deny: a content item is forwarded only if its type is known to carry no image
(text, reasoning, tool calls, ...) or its image was screened. An item of a type not
understood here that carries binary data, a URL, a path or a file id is refused (named in
the verdict) unless its type is allow-listed.

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

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.utils import convert_to_messages
from langchain_core.prompt_values import PromptValue

from guardalign_core.screening import ContentImage, sniff_mime
from guardalign_core.verdicts import Forward, RequestVerdict, SafetyDelivery, SafetyPrompt

__all__ = [
    "FoundImage",
    "apply_safety_prompt",
    "combine_input_chunks",
    "find_images",
    "hf_turns",
    "merge_system_text",
    "prepend_text",
    "refusal_message",
    "role_of",
    "to_messages",
    "write_back",
]

TEXT_ONLY_TYPES = frozenset({
    "text", "reasoning", "thinking", "redacted_thinking", "tool_call", "tool_call_chunk", "invalid_tool_call", "tool_use",
    "server_tool_call", "server_tool_call_chunk", "function_call", "refusal", "citation",
})
"""Content item types known to carry no image: forwarded without a look inside."""

_SOURCE_KEYS = frozenset({"base64", "url", "file_id", "data", "source_type", "mime_type", "image_url", "source", "file_uri", "path"})
_MEDIA_KEYS = frozenset({"data", "base64", "url", "image_url", "file_id", "path", "source", "image", "bytes", "uri", "file_uri",
                         "file_data", "inline_data", "file"})
_MEDIA_PREFIXES = ("data:", "http://", "https://", "file:", "/", "s3://", "gs://")


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


# -- input conversion ---------------------------------------------------------------------


def to_messages(value: Any) -> list[BaseMessage]:
    """Turn any ``LanguageModelInput`` (str, message list, ``PromptValue``) into messages.

    Raises:
        TypeError: for anything else.

    Example:
        >>> to_messages("hi")[0].type
        'human'
    """
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, str):
        return [HumanMessage(content=value)]
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence):
        return convert_to_messages(value)
    raise TypeError(f"expected a str, a PromptValue or a sequence of messages, got {type(value).__name__}")


def combine_input_chunks(chunks: Iterable[Any]) -> Any:
    """Assemble a streamed input into one value (for ``transform``).

    Raises:
        ValueError: if the stream is empty.
    """
    final: Any = None
    seen = False
    for chunk in chunks:
        if not seen:
            final, seen = chunk, True
        elif isinstance(final, str) and isinstance(chunk, str):
            final = final + chunk
        elif isinstance(final, BaseMessageChunk) and isinstance(chunk, BaseMessageChunk):
            final = final + chunk
        else:
            final = chunk
    if not seen:
        raise ValueError("the guard received an empty input stream")
    return final


# -- finding images -----------------------------------------------------------------------


def _carries_media(value: Any, depth: int = 0) -> bool:
    """Whether a structure holds binary data, a URL, a path or a file id anywhere (default deny)."""
    if depth > 16:
        return True
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, str):
        return value.strip().lower().startswith(_MEDIA_PREFIXES)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in _MEDIA_KEYS and item not in (None, "", [], {}):
                return True
            if _carries_media(item, depth + 1):
                return True
        return False
    if isinstance(value, (list, tuple)):
        return any(_carries_media(item, depth + 1) for item in value)
    return False


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
            if _carries_media(item) or not isinstance(item, (int, float, bool, type(None))):
                self.refuse(path, label, type(item).__name__, "is not a content block the guard understands")
            return
        kind = str(item.get("type") or "")
        if kind in TEXT_ONLY_TYPES:
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
        elif _carries_media(item):
            self.refuse(path, label, kind or "(no type)", "is not understood by the guard and carries data, a URL, a path or a file id")

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

    def v1(self, item: Mapping[str, Any], path: tuple[Any, ...], label: str, shape: str) -> None:
        """A LangChain v1 (``base64``/``url``/``file_id``) or v0 (``source_type`` + ``data``/``url``/``id``) block."""
        mime = item.get("mime_type")
        v0 = item.get("source_type")
        data = item.get("base64") or (item.get("data") if v0 == "base64" or (v0 is None and isinstance(item.get("data"), str)) else None)
        url = item.get("url") or (item.get("data") if v0 == "url" else None)
        file_id = item.get("file_id") or (item.get("id") if v0 == "id" else None)
        sources = sum(1 for x in (data, url, file_id) if x)
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
        if isinstance(source, Mapping) or _carries_media(item):
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


# -- writing back -------------------------------------------------------------------------


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


_MAX_OPTION_TEXT = 256
"""Option values (``detail``, ``cache_control``, ...) are short; a longer string may be a payload."""


def _long_text(value: Any, depth: int = 0) -> bool:
    if depth > 16:
        return True
    if isinstance(value, str):
        return len(value) > _MAX_OPTION_TEXT
    if isinstance(value, Mapping):
        return any(_long_text(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_long_text(v, depth + 1) for v in value)
    return False


def _options(item: Mapping[str, Any], drop: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The keys of a block that are provider options, never a second source of the image.

    Everything that could carry media (a source key, binary data, a URL or path, any long
    string) is dropped: a provider must find no other copy of the image than the checked one.
    """
    return {
        k: v for k, v in item.items()
        if k not in drop and k not in _SOURCE_KEYS and k not in _MEDIA_KEYS and not _carries_media(v) and not _long_text(v)
    }


def _rewrite(item: Mapping[str, Any], shape: str, data: bytes, mime: str) -> dict[str, Any]:
    """The block ``item`` holding exactly ``data`` as ``mime``, inline; only option keys kept."""
    b64 = base64.b64encode(data).decode("ascii")
    if shape == "openai":
        value = item.get("image_url")
        nested = _options(value) if isinstance(value, Mapping) else {}
        return {**_options(item), "type": item.get("type", "image_url"), "image_url": {**nested, "url": _data_url(mime, data)}}
    if shape == "input_image":
        return {**_options(item), "type": item.get("type", "input_image"), "image_url": _data_url(mime, data)}
    if shape == "anthropic":
        return {**_options(item), "type": "image", "source": {"type": "base64", "media_type": mime, "data": b64}}
    if shape == "media":
        payload: Any = data if isinstance(item.get("data"), (bytes, bytearray)) else b64
        return {**_options(item), "type": item.get("type", "media"), "mime_type": mime, "data": payload}
    # v1 / v0 / file blocks: the standard v1 image block
    drop = {"id"} if item.get("source_type") == "id" else set()
    return {**_options(item, drop | {"filename"}), "type": "image", "base64": b64, "mime_type": mime}


def _replace_at(container: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``container`` with the element at ``path`` replaced (``_DROP``: removed); copies only along the path."""
    key, rest = path[0], path[1:]
    copy: Any = list(container) if isinstance(container, list) else dict(container)
    copy[key] = _replace_at(container[key], rest, new) if rest else new
    return copy


_DROP = object()


def _get(container: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        container = container[key]
    return container


def _without_dropped(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_dropped(v) for v in value if v is not _DROP]
    if isinstance(value, dict):
        return {k: _without_dropped(v) for k, v in value.items()}
    return value


def write_back(messages: Sequence[BaseMessage], found: Sequence[FoundImage], verdict: RequestVerdict) -> list[BaseMessage]:
    """The messages with each image replaced as its verdict says; untouched messages are the same objects.

    ``BYTES``: the block holds exactly the verdict's bytes and MIME type, inline, in its own
    shape (a block that already holds only those bytes with that type is kept as it is);
    ``NOTHING``: the block is removed; ``AS_SENT`` (``fail_open`` only): kept as it came.
    Messages are copied with ``model_copy`` (id, name, metadata, tool calls stay).
    """
    by_message: dict[int, list[tuple[FoundImage, Any]]] = {}
    for entry, image in zip(verdict.images, found):
        if entry.forward == Forward.AS_SENT:
            continue
        by_message.setdefault(image.message_index, []).append((image, entry))
    out = list(messages)
    for m, changes in by_message.items():
        content: Any = messages[m].content
        changed = False
        for image, entry in changes:
            item = _get(content, image.path[1:])
            if entry.forward == Forward.NOTHING:
                new: Any = _DROP
            elif image.inline_only and not entry.sanitised and entry.data == entry.checked and _declared(image) == entry.mime:
                continue
            else:
                new = _rewrite(item, image.shape, entry.data, entry.mime)
            content = _replace_at(content, image.path[1:], new)
            changed = True
        if changed:
            out[m] = messages[m].model_copy(update={"content": _without_dropped(content)})
    return out


def _declared(image: FoundImage) -> str | None:
    return image.image.mime.lower() if image.image.mime else None


# -- safety prompt (black-box delivery, DESIGN §1C) -----------------------------------------


def role_of(message: BaseMessage) -> str:
    """The chat role of a message (streamed chunks count as their message type)."""
    if isinstance(message, ChatMessage):
        return message.role
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    return "user"


def merge_system_text(system: SystemMessage | None, text: str) -> SystemMessage:
    """Add ``text`` to a system message (or make one), keeping its id and metadata.

    Example:
        >>> merge_system_text(SystemMessage(content="Be brief."), "Be safe.").content
        'Be brief.\\n\\nBe safe.'
    """
    if system is None:
        return SystemMessage(content=text)
    if isinstance(system.content, str):
        content: Any = f"{system.content}\n\n{text}" if system.content else text
    else:
        content = [*system.content, {"type": "text", "text": text}]
    return system.model_copy(update={"content": content})


def apply_safety_prompt(messages: Sequence[BaseMessage], safety: SafetyPrompt) -> tuple[list[BaseMessage], SafetyDelivery]:
    """Deliver the safety prefix by prompt alone, through the core's one delivery rule.

    Returns:
        The new messages (system text merged into the leading system message or put first,
        the prefill appended as an assistant message) and the delivery used.
    """
    out = list(messages)
    delivery = safety.delivery(role_of(out[-1]) if out else None)
    if delivery.system_text:
        if out and isinstance(out[0], SystemMessage):
            out[0] = merge_system_text(out[0], delivery.system_text)
        else:
            out.insert(0, merge_system_text(None, delivery.system_text))
    if delivery.prefill:
        out.append(AIMessage(content=delivery.prefill))
    return out, delivery


def prepend_text(message: AIMessage, text: str) -> AIMessage:
    """A copy of an answer whose text starts with ``text`` (the kept prefill), whatever its content shape."""
    if not text:
        return message
    content = message.content
    if isinstance(content, str):
        return message.model_copy(update={"content": text + content})
    items = list(content)
    for i, item in enumerate(items):
        if isinstance(item, str):
            items[i] = text + item
            break
        if isinstance(item, Mapping) and item.get("type") == "text":
            items[i] = {**item, "text": text + str(item.get("text") or "")}
            break
    else:
        items.insert(0, {"type": "text", "text": text})
    return message.model_copy(update={"content": items})


def answer_start(message: BaseMessage) -> str:
    """The first characters of an answer's text (to know whether it begins with a space)."""
    return message.text[:1] if message.text else ""


def refusal_message(text: str, *, metadata: Mapping[str, Any] | None = None, chunk: bool = False) -> AIMessage:
    """An assistant message that refuses: a text block plus LangChain's standard refusal block."""
    content: list[str | dict[str, Any]] = [{"type": "text", "text": text}, {"type": "refusal", "refusal": text}]
    response_metadata = {"finish_reason": "content_filter", **(metadata or {})}
    if chunk:
        return AIMessageChunk(content=content, response_metadata=response_metadata, chunk_position="last")
    return AIMessage(content=content, response_metadata=response_metadata)


# -- to a local model (ChatGuardAlign) ------------------------------------------------------


def hf_turns(messages: Sequence[BaseMessage], found: Sequence[FoundImage]) -> list[dict[str, Any]]:
    """Framework-free chat turns for :func:`guardalign_core.pipeline.to_checked_request`.

    Text items become text parts and each image an ``{"type": "image", "index": i}`` part (its
    position in the verdict), in content order; nested images (tool results) follow their item.
    """
    where: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(found):
        where.setdefault((image.path[0], image.path[1]), []).append(i)
    turns = []
    for m, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        items = [message.content] if isinstance(message.content, str) else message.content
        for c, item in enumerate(items):
            if isinstance(item, str):
                parts.append({"type": "text", "text": item})
            elif isinstance(item, Mapping) and item.get("type") == "text":
                parts.append({"type": "text", "text": str(item.get("text") or "")})
            for i in where.get((m, c), []) if not isinstance(message.content, str) else []:
                parts.append({"type": "image", "index": i})
        name = (message.name or getattr(message, "tool_call_id", None)) if isinstance(message, ToolMessage) else None
        turns.append({"role": role_of(message), "name": name, "content": parts})
    return turns
