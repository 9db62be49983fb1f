"""Pure helpers between LlamaIndex content and the core's screening step.

Nothing here runs a model or a guard. :func:`find_images` reports every image of a chat
request (``ImageBlock``, a ``DocumentBlock`` holding an image, images inside ``CitableBlock``
and ``CitationBlock``) as a :class:`~guardalign_core.screening.ContentImage`, and refuses by
name what it cannot check (``VideoBlock``, a non-image ``DocumentBlock``, any unknown block
type, a subclass of a known block other than ``ImageBlock``, a ``ThinkingBlock`` holding
inline data beside its signature) unless its type is allow-listed; :func:`write_back` puts the verdict's bytes back.
Nodes and legacy image documents get the same two steps.

Rules they share:

- An image reaches the core as bytes, a ``Path`` or a URL string and is read only by the core's
  content reader: local files (``ImageBlock(path=...)``, ``file://`` URLs, ``image_path``,
  ``MediaResource.path``) only with ``ImageLimits.allow_local_files``, remote URLs only for
  allowed hosts. LlamaIndex itself is never asked to resolve anything.
- What is forwarded for a checked image is exactly the verdict's bytes, inline, with no path
  or URL beside them; ``detail`` and other options are kept. Inputs are never mutated.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from io import IOBase
from pathlib import Path
from typing import Any, Iterable, Sequence

from llama_index.core.base.llms.types import (
    AudioBlock,
    CachePoint,
    ChatMessage,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.schema import BaseNode, ImageNode, IndexNode, MediaResource, Node

from guardalign_core._payloads import inline_media
from guardalign_core.screening import ContentImage, sniff_mime
from guardalign_core.verdicts import DEFAULT_REFUSAL, Forward, ImageVerdict, RequestVerdict, SafetyDelivery, SafetyPrompt

__all__ = [
    "DEFAULT_REFUSAL",
    "FoundBlock",
    "apply_safety_prompt",
    "apply_safety_to_prompt",
    "find_images",
    "has_image",
    "hf_turns",
    "media_refusal",
    "node_file_path",
    "node_image",
    "node_label",
    "node_refusal",
    "prepend_text",
    "with_image",
    "with_metadata",
    "write_back",
]

_TEXT_ONLY = (TextBlock, ThinkingBlock, ToolCallBlock, CachePoint)
"""Block types known to carry no image (tool-call arguments are JSON text to a model)."""
_KNOWN = (*_TEXT_ONLY, ImageBlock, AudioBlock, VideoBlock, DocumentBlock, CitableBlock, CitationBlock)
"""The block classes understood here; a subclass of one of them is refused unless allow-listed."""
_OPAQUE_KEYS = frozenset({"signature", "encrypted_content"})
"""Provider-encrypted tokens in ``ThinkingBlock.additional_information``, never decoded as media."""

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class FoundBlock:
    """One image (or refused block) in a chat request: ``path`` is ``(message, block)`` or ``(message, block, inner)``."""

    path: tuple[int, ...]
    image: ContentImage
    block: Any
    inline_only: bool = False

    @property
    def label(self) -> str:
        return self.image.label


def _raw(data: bytes | IOBase | str) -> bytes:
    """The raw bytes of LlamaIndex inline data (stored base64-encoded; strictly valid base64 is decoded)."""
    if isinstance(data, IOBase):
        data.seek(0)
        raw = data.read()
        data.seek(0)
        return raw if isinstance(raw, bytes) else str(raw).encode()
    if isinstance(data, str):
        data = data.encode("ascii", "ignore")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return bytes(data)


def _source(data: Any, path: Any, url: Any) -> Any:
    """What the core reads for one block or node: inline bytes, else a ``Path``, else the URL string."""
    if data is not None:
        return _raw(data)
    if path is not None:
        return Path(path)
    if url is not None:
        return str(url)
    return b""


def _image_block(block: ImageBlock, path: tuple[int, ...], label: str) -> FoundBlock:
    sources = sum(x is not None for x in (block.image, block.path, block.url))
    inline = type(block) is ImageBlock and block.image is not None and sources == 1  # only a plain block may go as it came
    return FoundBlock(path, ContentImage(label, source=_source(block.image, block.path, block.url), mime=block.image_mimetype), block, inline)


def _refused(path: tuple[int, ...], label: str, block: Any, why: str) -> FoundBlock:
    kind = type(block).__name__
    return FoundBlock(path, ContentImage(label, refusal=f"{kind} {why}; it is not forwarded unless allow-listed (allow_block_types=({kind!r},))"), block)


def _document(block: DocumentBlock, path: tuple[int, ...], label: str) -> FoundBlock | None:
    mime = (block.document_mimetype or "").lower()
    if block.data is not None:
        raw = _raw(block.data)
        if mime.startswith("image/") or sniff_mime(raw) is not None:
            return FoundBlock(path, ContentImage(label, source=raw, mime=mime or None), block)
    elif block.path is not None and (mime.startswith("image/") or str(block.path).lower().endswith(_IMAGE_SUFFIXES)):
        return FoundBlock(path, ContentImage(label, source=Path(block.path), mime=mime or None), block)
    elif block.url is not None and mime.startswith("image/"):
        return FoundBlock(path, ContentImage(label, source=str(block.url), mime=mime), block)
    if block.path is not None or block.url is not None:
        # A provider resolves these itself: a path is a local file read on the caller's behalf,
        # a URL content the guard never saw.
        return _refused(path, label, block, "names a file or URL the guard does not read; send the document inline")
    if mime.startswith("text/"):
        return None
    return _refused(path, label, block, f"({mime or 'no MIME type'}) may carry images the guard cannot check")


def _audio(block: AudioBlock, path: tuple[int, ...], label: str) -> FoundBlock | None:
    if block.path is not None or block.url is not None:
        return _refused(path, label, block, "names a file or URL the guard does not read; send the audio inline")
    if block.audio is not None and sniff_mime(_raw(block.audio)) is not None:
        return _refused(path, label, block, "holds image bytes under an audio label")
    return None


def _block(block: Any, path: tuple[int, ...], label: str, allow: frozenset[str]) -> list[FoundBlock]:
    if isinstance(block, ImageBlock):
        return [_image_block(block, path, label)]  # a subclass too: screened, then rewritten as a plain ImageBlock
    if type(block).__name__ in allow:
        return []
    if type(block) not in _KNOWN and isinstance(block, _KNOWN):
        # A subclass can add fields (or serialise itself) in ways a provider adapter forwards
        # and this walker cannot see: default deny.
        base = next(k for k in _KNOWN if isinstance(block, k))
        return [_refused(path, label, block, f"is a subclass of {base.__name__} the guard does not know")]
    if isinstance(block, _TEXT_ONLY):
        if isinstance(block, ThinkingBlock) and inline_media(block.additional_information, opaque_keys=_OPAQUE_KEYS):
            return [_refused(path, label, block, "carries inline data (bytes, base64 or a data: URL) in additional_information")]
        return []
    if isinstance(block, AudioBlock):
        found = _audio(block, path, label)
        return [found] if found is not None else []
    if isinstance(block, DocumentBlock):
        found = _document(block, path, label)
        return [found] if found is not None else []
    if isinstance(block, CitableBlock):
        out: list[FoundBlock] = []
        for k, inner in enumerate(block.content):
            out.extend(_block(inner, (*path, k), f"{label}.content[{k}]", allow))
        return out
    if isinstance(block, CitationBlock):
        return _block(block.cited_content, (*path, 0), f"{label}.cited_content", allow)
    if isinstance(block, VideoBlock):
        return [_refused(path, label, block, "holds video frames the guard cannot check")]
    return [_refused(path, label, block, "is not a block type the guard understands")]


def find_images(messages: Sequence[ChatMessage], *, allow_block_types: Iterable[str] = ()) -> list[FoundBlock]:
    """Every image and refused block of a chat request, in order.

    Example:
        >>> find_images([ChatMessage(role="user", blocks=[TextBlock(text="hi")])])
        []
    """
    allow = frozenset(allow_block_types)
    found: list[FoundBlock] = []
    for m, message in enumerate(messages):
        for b, block in enumerate(message.blocks):
            found.extend(_block(block, (m, b), f"messages[{m}].blocks[{b}]", allow))
    return found


def _forwarded_block(found: FoundBlock, entry: ImageVerdict) -> Any:
    """The block to forward for one image: kept, replaced by an inline ``ImageBlock`` of the verdict's bytes, or ``None``."""
    if entry.forward == Forward.AS_SENT:
        return found.block
    if entry.forward == Forward.NOTHING:
        return None
    old = found.block
    if found.inline_only and entry.verbatim:  # the core's call: unchanged bytes, declared type right
        return old
    return ImageBlock(image=entry.data, image_mimetype=entry.mime, detail=getattr(old, "detail", None))


def _nested(block: Any, inner: int, new: Any) -> Any:
    if isinstance(block, CitationBlock):
        return block.model_copy(update={"cited_content": new}) if new is not None else None
    content = list(block.content)
    content[inner] = new
    return block.model_copy(update={"content": [c for c in content if c is not None]})


def write_back(messages: Sequence[ChatMessage], found: Sequence[FoundBlock], verdict: RequestVerdict) -> list[ChatMessage]:
    """The messages with each image as its verdict says; messages without images are the same objects."""
    out = list(messages)
    changes: dict[int, dict[int, Any]] = {}
    for item, entry in zip(found, verdict.images):
        new = _forwarded_block(item, entry)
        m, b = item.path[0], item.path[1]
        current = changes.get(m, {}).get(b, messages[m].blocks[b])
        if len(item.path) > 2:
            new = _nested(current, item.path[2], new)
        changes.setdefault(m, {})[b] = new
    for m, blocks in changes.items():
        kept = [blocks.get(b, block) for b, block in enumerate(messages[m].blocks)]
        out[m] = messages[m].model_copy(update={"blocks": [block for block in kept if block is not None]})
    return out


def hf_turns(messages: Sequence[ChatMessage], found: Sequence[FoundBlock]) -> list[dict[str, Any]]:
    """Framework-free chat turns for :func:`guardalign_core.pipeline.to_checked_request`."""
    where: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(found):
        where.setdefault((item.path[0], item.path[1]), []).append(i)
    turns = []
    for m, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        for b, block in enumerate(message.blocks):
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            parts.extend({"type": "image", "index": i} for i in where.get((m, b), []))
        turns.append({"role": message.role.value, "content": parts})
    return turns


# -- safety prompt ------------------------------------------------------------------------


def apply_safety_prompt(
    messages: Sequence[ChatMessage], safety: SafetyPrompt, *, system_role: MessageRole = MessageRole.SYSTEM
) -> tuple[list[ChatMessage], SafetyDelivery]:
    """Deliver the safety prefix by prompt alone, through the core's one delivery rule.

    Example:
        >>> plan = SafetyPrompt(applied=True, system_instruction="Be safe.")
        >>> [m.role.value for m in apply_safety_prompt([ChatMessage(content="hi")], plan)[0]]
        ['system', 'user']
    """
    out = list(messages)
    delivery = safety.delivery(out[-1].role.value if out else None)
    if delivery.system_text:
        if out and out[0].role == system_role:
            out[0] = out[0].model_copy(update={"blocks": [*out[0].blocks, TextBlock(text=delivery.system_text)]})
        else:
            out.insert(0, ChatMessage(role=system_role, blocks=[TextBlock(text=delivery.system_text)]))
    if delivery.prefill:
        out.append(ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=delivery.prefill)]))
    return out, delivery


def apply_safety_to_prompt(prompt: str, safety: SafetyPrompt) -> str:
    """The completion-endpoint form: instructions before the prompt (a completion takes no prefill)."""
    delivery = safety.delivery("assistant")  # no trailing assistant turn: the prefix is asked for by instruction
    return f"{delivery.system_text}\n\n{prompt}" if delivery.system_text else prompt


def prepend_text(message: ChatMessage, text: str) -> ChatMessage:
    """A copy of ``message`` whose text starts with ``text`` (the kept safety prefix)."""
    if not text:
        return message
    blocks = list(message.blocks)
    for i, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            blocks[i] = TextBlock(text=text + block.text)
            break
    else:
        blocks.insert(0, TextBlock(text=text))
    return message.model_copy(update={"blocks": blocks})


# -- nodes and legacy image documents --------------------------------------------------------


FILE_PATH_KEY = "file_path"
"""The metadata key LlamaIndex reads as an ``ImageNode``'s image file when it has no ``image`` or
``image_path`` (``image_node_to_image_block``, ``image_documents_to_base64``): an image source."""


def node_file_path(node: Any) -> Path | None:
    """The image file an ``ImageNode``'s ``metadata["file_path"]`` names (LlamaIndex loads it), or ``None``."""
    if not isinstance(node, ImageNode):
        return None
    value = (node.metadata or {}).get(FILE_PATH_KEY)
    if value is None or value == "":
        return None
    return Path(str(value))


def has_image(node: Any) -> bool:
    """Whether a node (or legacy image document) carries an image (``metadata["file_path"]`` of an ``ImageNode`` too)."""
    if isinstance(node, ImageBlock):
        return True
    if isinstance(node, ImageNode):
        return any(x is not None for x in (node.image, node.image_path, node.image_url, node_file_path(node)))
    if isinstance(node, Node) and node.image_resource is not None:
        r = node.image_resource
        return any(x is not None for x in (r.data, r.path, r.url))
    return False


def node_label(node: Any) -> str:
    """A short label for a node's image: its file name when it has one (never the directory), else its node id."""
    path = None
    if isinstance(node, ImageNode):
        path = node.image_path or node_file_path(node)
    elif isinstance(node, Node) and node.image_resource is not None:
        path = node.image_resource.path
    return Path(str(path)).name if path else f"node {getattr(node, 'node_id', '?')}"


def node_image(node: Any, label: str) -> ContentImage:
    """What the core reads for a node's image (see :func:`has_image`; a node without one reads as empty)."""
    if isinstance(node, ImageBlock):
        return ContentImage(label, source=_source(node.image, node.path, node.url), mime=node.image_mimetype)
    if isinstance(node, ImageNode) and has_image(node):
        path = node.image_path if node.image_path is not None else node_file_path(node)  # LlamaIndex's own order
        return ContentImage(label, source=_source(node.image, path, node.image_url), mime=node.image_mimetype)
    if isinstance(node, Node) and node.image_resource is not None:
        r = node.image_resource
        return ContentImage(label, source=_source(r.data, r.path, r.url), mime=r.mimetype)
    return ContentImage(label, source=b"")


def with_image(node: Any, data: bytes, mime: str) -> Any:
    """A copy of an image-carrying node (or block) whose only image is ``data`` as ``mime``: no path, no URL."""
    if isinstance(node, ImageBlock):
        return ImageBlock(image=data, image_mimetype=mime, detail=node.detail)
    if isinstance(node, ImageNode):
        update: dict[str, Any] = {"image": base64.b64encode(data).decode("ascii"), "image_path": None, "image_url": None, "image_mimetype": mime}
        if FILE_PATH_KEY in node.metadata:  # nothing may point back at the unscanned original
            update["metadata"] = {k: v for k, v in node.metadata.items() if k != FILE_PATH_KEY}
        return node.model_copy(update=update)
    if isinstance(node, Node) and node.image_resource is not None:
        old = node.image_resource
        return node.model_copy(update={"image_resource": MediaResource(data=data, mimetype=mime, text=old.text, embeddings=old.embeddings)})
    raise TypeError(f"{type(node).__name__} carries no image to replace")


def media_refusal(node: Any, allowed: frozenset[str] = frozenset()) -> str | None:
    """Why a node's audio or video is refused (default deny: media the guard cannot check), or ``None``.

    One rule for ingestion and the postprocessor: what is not indexed is not forwarded either.
    """
    if not isinstance(node, Node):
        return None
    video = node.video_resource
    if video is not None and "video" not in allowed and any(x is not None for x in (video.data, video.path, video.url)):
        return "the node holds video frames the guard cannot check; it is refused unless allowed (allow_media=('video',))"
    audio = node.audio_resource
    if audio is not None and "audio" not in allowed:
        if audio.path is not None or audio.url is not None:
            return "the node's audio names a file or URL the guard does not read; it is refused unless allowed (allow_media=('audio',))"
        if audio.data is not None and sniff_mime(_raw(audio.data)) is not None:
            return "the node holds image bytes under an audio label; it is refused unless allowed (allow_media=('audio',))"
    return None


def node_refusal(node: Any, allowed: frozenset[str] = frozenset()) -> str | None:
    """Why a node is refused unscreened (:func:`media_refusal`, or an ``IndexNode`` whose ``obj`` is a node carrying an image or media), or ``None``."""
    if isinstance(node, IndexNode) and isinstance(node.obj, BaseNode):
        inner = node.obj
        if has_image(inner) or media_refusal(inner, allowed) is not None or node_refusal(inner, allowed) is not None:
            return "the IndexNode's obj is a node carrying an image or media the guard does not screen inside it; index that node itself"
    return media_refusal(node, allowed)


def forwarded_node(node: Any, entry: ImageVerdict) -> Any | None:
    """The node to forward for its verdict: ``None`` (dropped), as sent (``fail_open``), or holding exactly the verdict's bytes."""
    if entry.forward == Forward.NOTHING:
        return None
    if entry.forward == Forward.AS_SENT:
        return node
    return with_image(node, entry.data, entry.mime)  # type: ignore[arg-type]


def with_metadata(node: BaseNode, key: str, value: Any) -> BaseNode:
    """A copy of ``node`` with ``metadata[key] = value``, the key hidden from embedding and LLM text."""
    return node.model_copy(
        update={
            "metadata": {**node.metadata, key: value},
            "excluded_embed_metadata_keys": _with_key(node.excluded_embed_metadata_keys, key),
            "excluded_llm_metadata_keys": _with_key(node.excluded_llm_metadata_keys, key),
        }
    )


def _with_key(keys: list[str], key: str) -> list[str]:
    return list(keys) if key in keys else [*keys, key]


def image_document_to_block(document: Any) -> ImageBlock:
    """An :class:`ImageBlock` for a (screened) legacy image document, for a chat-style inner model."""
    if isinstance(document, ImageBlock):
        return document
    image = node_image(document, "document")
    if isinstance(image.source, bytes):
        return ImageBlock(image=image.source, image_mimetype=image.mime)
    if isinstance(image.source, Path):  # only an unchecked document under fail_open still names its file
        return ImageBlock(path=image.source, image_mimetype=image.mime)
    return ImageBlock(url=str(image.source), image_mimetype=image.mime)
