"""Writing the screening verdict back into LangChain messages, in each block's own shape.

:func:`write_back` puts exactly the verdict's bytes back, inline, keeping every key that is a
provider option (OpenAI ``detail``, Anthropic ``cache_control``, ids) and dropping every key
that could carry a second copy of the image. Messages that change are copied with
``model_copy``; inputs are never mutated.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage

from guardalign_core._payloads import MEDIA_KEYS, carries_media
from guardalign_core.verdicts import Forward, RequestVerdict

from ._content import FoundImage

__all__ = ["write_back"]

_SOURCE_KEYS = frozenset({"base64", "url", "file_id", "data", "source_type", "mime_type", "image_url", "source", "file_uri", "path"})


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
        if k not in drop and k not in _SOURCE_KEYS and k not in MEDIA_KEYS and not carries_media(v) and not _long_text(v)
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
            elif image.inline_only and entry.verbatim:  # the core's call: unchanged bytes, declared type right, canonical spelling
                continue
            else:
                new = _rewrite(item, image.shape, entry.data, entry.mime)
            content = _replace_at(content, image.path[1:], new)
            changed = True
        if changed:
            out[m] = messages[m].model_copy(update={"content": _without_dropped(content)})
    return out
