"""Pure conversion helpers between LlamaIndex content and the GuardAlign core.

Nothing here runs a model or a guard: these functions find images in chat messages and
nodes, say where their bytes are (without fetching anything), write sanitised images back
in LlamaIndex's own shapes, and add the black-box safety prompt (DESIGN §1C). Every
adapter in this package is built from them, and so can a later local-model LLM class.

Rules they share:

- An image is handed to the core as bytes, a path, or a URL *string*; the core's
  ``load_image`` is the only place where bytes become pixels, and it fetches a remote URL
  only when ``ImageLimits.allow_remote`` allows that host. LlamaIndex itself is never
  asked to resolve a URL.
- A sanitised image is written back as PNG bytes (lossless, so masked pixels stay exactly
  zero) with no ``path`` or ``url`` left beside it, so no downstream component can send
  the original instead.
- Inputs are never mutated: changed messages and nodes are copies.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from io import IOBase
from pathlib import Path
from typing import Any, Sequence

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.schema import BaseNode, ImageNode, MediaResource, Node
from PIL import Image

from guardalign_core.errors import ImageError
from guardalign_core.guard import GuardDecision, SafetyPrompt
from guardalign_core.images import ImageSource, decode_data_url
from guardalign_core.results import Decision, ScanResult, Status

DEFAULT_REFUSAL = (
    "I can't help with this request: an image in it was blocked by the safety guard."
)
"""The assistant text returned instead of calling the model when a request is blocked."""


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a sanitised image: lossless (masked pixels stay exactly zero), fast compression.

    ``compress_level=1`` encodes about 3× faster than Pillow's default for ~7% more bytes;
    it runs on every masked image of a request, so it is latency the user sees.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# -- chat messages ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """Where one image block sits in a list of chat messages."""

    message_index: int
    block_index: int
    block: ImageBlock

    @property
    def label(self) -> str:
        """A short, content-free label for results and errors, e.g. ``messages[0].blocks[1]``."""
        return f"messages[{self.message_index}].blocks[{self.block_index}]"


def find_image_blocks(messages: Sequence[ChatMessage]) -> list[ImageRef]:
    """Every :class:`ImageBlock` in ``messages``, in order (the images of one request).

    Args:
        messages: the chat messages of one request.

    Returns:
        One :class:`ImageRef` per image block; empty for a text-only request.

    Example:
        >>> msg = ChatMessage(role="user", blocks=[TextBlock(text="hi")])
        >>> find_image_blocks([msg])
        []
    """
    return [
        ImageRef(m, b, block)
        for m, message in enumerate(messages)
        for b, block in enumerate(message.blocks)
        if isinstance(block, ImageBlock)
    ]


def _inline_bytes(data: bytes | IOBase) -> bytes:
    """The raw bytes of an inline image (``ImageBlock.image`` or ``MediaResource.data``).

    LlamaIndex stores inline bytes base64-encoded; like its own ``resolve_binary``, strictly
    valid base64 is decoded and anything else is taken as raw bytes.
    """
    if isinstance(data, IOBase):
        data.seek(0)
        raw = data.read()
        data.seek(0)
        return raw if isinstance(raw, bytes) else str(raw).encode()
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        return bytes(data)


def image_block_source(block: ImageBlock) -> ImageSource:
    """What to hand the core for one image block, without fetching or decoding it.

    Inline bytes come back decoded from LlamaIndex's base64 storage, a path as a ``Path``
    (read by the core under its byte limit), a URL as a string (``data:`` URLs are decoded by
    the core; ``http(s)`` ones are fetched only if the guard's image limits allow the host).
    A block with no image at all gives ``b""``, which the core reports as an empty image.
    """
    if block.image is not None:
        return _inline_bytes(block.image)
    if block.path is not None:
        return Path(block.path)
    if block.url is not None:
        return _url_source(str(block.url))
    return b""


def _url_source(url: str) -> ImageSource:
    """A ``data:`` URL's bytes (LlamaIndex's chat templates inline images that way); other URLs as-is.

    A malformed data URL is passed on as a string: the core then reports it as a failed check.
    """
    if _is_data_url(url):
        try:
            return decode_data_url(url)
        except ImageError:
            return url
    return url


def _is_data_url(url: object) -> bool:
    return url is not None and str(url).startswith("data:")


def _forwards_unchecked_source(block: ImageBlock) -> bool:
    """True if forwarding ``block`` as-is could show the model something other than what was checked.

    A remote URL is fetched again by the provider (its content may differ from what the
    guard saw), and a block with several sources may be resolved from another one than the
    guard used. A ``data:`` URL is inline content, like bytes.
    """
    sources = sum(x is not None for x in (block.image, block.path, block.url))
    return (block.url is not None and not _is_data_url(block.url)) or sources > 1


def image_block_from_pil(image: Image.Image | bytes, *, detail: str | None = None) -> ImageBlock:
    """A PNG :class:`ImageBlock` of ``image`` (a PIL image, or PNG bytes already encoded).

    The block has no path and no URL; the original ``detail`` is kept.
    """
    png = image if isinstance(image, bytes) else encode_png(image)
    return ImageBlock(image=png, image_mimetype="image/png", detail=detail)


def _replacement(block: ImageBlock, result: ScanResult, png: bytes | None = None) -> ImageBlock | None:
    """The block to forward for one result: sanitised, unchanged, or ``None`` (removed)."""
    if result.decision == Decision.BLOCK:
        return None
    if png is not None:  # the sanitised image, already encoded
        return image_block_from_pil(png, detail=block.detail)
    if result.masked_image is None:
        if result.status == Status.OK and block.image is not None and _forwards_unchecked_source(block):
            # a reused verdict on the inline bytes: forward only those, not a path/URL beside them
            return block.model_copy(update={"path": None, "url": None})
        return block  # unchecked under fail_open, or already sanitised: as it came
    if result.decision == Decision.MASK or _forwards_unchecked_source(block):
        return image_block_from_pil(result.masked_image, detail=block.detail)
    return block


def _check_lengths(what: str, n: int, results: Sequence[ScanResult], pngs: Sequence[bytes | None] | None) -> None:
    if len(results) != n:
        raise ValueError(f"results: got {len(results)} results for {n} {what}")
    if pngs is not None and len(pngs) != n:
        raise ValueError(f"pngs: got {len(pngs)} entries for {n} {what}")


def replace_image_blocks(
    messages: Sequence[ChatMessage],
    refs: Sequence[ImageRef],
    results: Sequence[ScanResult],
    pngs: Sequence[bytes | None] | None = None,
) -> list[ChatMessage]:
    """Write the guard's per-image outcome back into the messages.

    Args:
        messages: the request's messages.
        refs: their image blocks (:func:`find_image_blocks`).
        results: one scan result per ref, in the same order.
        pngs: optional sanitised images already encoded as PNG, per ref (``None`` entries:
            use the result's ``masked_image``), so nothing is encoded twice.

    Returns:
        New messages: masked images (and checked images that came by URL) replaced by PNG
        blocks of the pixels the guard produced; allowed and flagged inline or file images
        kept as they were; images unchecked under ``fail_open`` kept; blocked images removed
        (a blocked request is normally never forwarded at all). Messages without images are
        the same objects.

    Raises:
        ValueError: if ``refs``, ``results`` and ``pngs`` differ in length.
    """
    _check_lengths("image blocks", len(refs), results, pngs)
    by_message: dict[int, dict[int, ImageBlock | None]] = {}
    for i, (ref, result) in enumerate(zip(refs, results)):
        png = pngs[i] if pngs is not None else None
        by_message.setdefault(ref.message_index, {})[ref.block_index] = _replacement(ref.block, result, png)
    out = list(messages)
    for m, replacements in by_message.items():
        blocks = []
        for b, block in enumerate(messages[m].blocks):
            new = replacements[b] if b in replacements else block
            if new is not None:
                blocks.append(new)
        out[m] = messages[m].model_copy(update={"blocks": blocks})
    return out


def apply_safety_prompt(
    messages: Sequence[ChatMessage],
    safety: SafetyPrompt,
    *,
    system_role: MessageRole = MessageRole.SYSTEM,
) -> list[ChatMessage]:
    """Deliver the safety prefix by prompt alone (black-box models, DESIGN §1C).

    The safety instruction (plus, without prefill, the request to begin the answer with the
    prefix) is appended to the leading system message, or added as one. With prefill, the
    prefix is appended as a trailing assistant message, for providers that continue one.

    Args:
        messages: the (already sanitised) messages.
        safety: the plan from the guard's decision; nothing changes unless ``applied``.
        system_role: the role the model uses for system text (``LLMMetadata.system_role``).

    Returns:
        New list of messages; the inputs are not modified.

    Example:
        >>> plan = SafetyPrompt(applied=True, system_instruction="Be safe.", begin_with=None)
        >>> [m.role.value for m in apply_safety_prompt([ChatMessage(content="hi")], plan)]
        ['system', 'user']
    """
    out = list(messages)
    if not safety.applied:
        return out
    text = safety.system_text()
    if text:
        if out and out[0].role == system_role:
            out[0] = out[0].model_copy(update={"blocks": [*out[0].blocks, TextBlock(text=text)]})
        else:
            out.insert(0, ChatMessage(role=system_role, blocks=[TextBlock(text=text)]))
    if safety.prefill and not (out and out[-1].role == MessageRole.ASSISTANT):
        out.append(ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=safety.prefill)]))
    return out


def apply_safety_to_prompt(prompt: str, safety: SafetyPrompt) -> str:
    """The completion-endpoint form of :func:`apply_safety_prompt`: instructions before the prompt.

    A completion cannot carry an assistant prefill reliably (the inner model may wrap the
    prompt in its own template), so a prefill plan is delivered as a begin-with request.
    """
    if not safety.applied:
        return prompt
    parts = [p for p in (safety.system_instruction, safety.begin_with) if p]
    if safety.prefill and safety.prefill.strip():
        parts.append(f'Begin your answer with "{safety.prefill.strip()}".')
    return "\n\n".join([*parts, prompt]) if parts else prompt


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


def blocked_reason(decision: GuardDecision) -> str:
    """Why a request was blocked, naming each blocked image (by label) and its error.

    Example output: ``"GuardAlign blocked the request (policy mask): messages[0].blocks[1]: image
    could not be checked (UnsupportedImageFormatError); blocked (fail-closed): the bytes are
    not an image format Pillow recognises ..."``.
    """
    parts = []
    for r in decision.results:
        if r.decision != Decision.BLOCK:
            continue
        label = r.source or f"image {r.index}"
        part = f"{label}: {r.reason}"
        if r.error:
            detail = r.error[len(label) + 2 :] if r.error.startswith(f"{label}: ") else r.error
            part += f": {detail}"
        parts.append(part)
    detail = "; ".join(parts) or decision.reason
    return f"GuardAlign blocked the request (policy {decision.policy}): {detail}"


# -- nodes and legacy image documents --------------------------------------------------------
def has_image(node: BaseNode) -> bool:
    """Whether a node carries an image: an :class:`ImageNode`, or a ``Node`` with ``image_resource``."""
    if isinstance(node, ImageNode):
        return any(x is not None for x in (node.image, node.image_path, node.image_url))
    if isinstance(node, Node) and node.image_resource is not None:
        r = node.image_resource
        return any(x is not None for x in (r.data, r.path, r.url))
    return False


def node_image_source(node: BaseNode) -> ImageSource:
    """What to hand the core for a node's image (see :func:`image_block_source`).

    An ``ImageNode``'s base64 string is decoded here when it is strictly valid (the fast
    path); otherwise it goes in as a ``data:`` URL, so that the core either accepts it
    (e.g. base64 broken into lines) or reports malformed base64 as a failed check of that
    image; nothing is raised here.

    Raises:
        TypeError: if the node carries no image (check :func:`has_image` first).
    """
    if isinstance(node, ImageNode) and has_image(node):
        if node.image is not None:
            try:
                return base64.b64decode(node.image, validate=True)
            except (binascii.Error, ValueError):
                return f"data:;base64,{node.image}"
        if node.image_path is not None:
            return Path(node.image_path)
        return str(node.image_url)
    resource = node.image_resource if isinstance(node, Node) and has_image(node) else None
    if resource is not None:
        r = resource
        if r.data is not None:
            return _inline_bytes(r.data)
        if r.path is not None:
            return Path(r.path)
        return str(r.url)
    raise TypeError(f"{type(node).__name__} {node.node_id} carries no image")


def node_label(node: BaseNode) -> str:
    """A short label for a node's image: its file name when it has one, else its node id."""
    path = None
    if isinstance(node, ImageNode):
        path = node.image_path
    elif isinstance(node, Node) and node.image_resource is not None:
        path = node.image_resource.path
    return Path(str(path)).name if path else f"node {node.node_id}"


def with_image(node: BaseNode, image: Image.Image | bytes) -> BaseNode:
    """A copy of an image-carrying node whose image is ``image`` (PIL, or PNG bytes) as PNG.

    The original path and URL are cleared, so nothing downstream can load the original.
    """
    png = image if isinstance(image, bytes) else encode_png(image)
    if isinstance(node, ImageNode):
        return node.model_copy(
            update={
                "image": base64.b64encode(png).decode("ascii"),
                "image_path": None,
                "image_url": None,
                "image_mimetype": "image/png",
            }
        )
    if isinstance(node, Node) and node.image_resource is not None:
        old = node.image_resource
        resource = MediaResource(data=png, mimetype="image/png", text=old.text, embeddings=old.embeddings)
        return node.model_copy(update={"image_resource": resource})
    raise TypeError(f"{type(node).__name__} carries no image to replace")


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


def image_document_source(document: ImageNode | ImageBlock) -> ImageSource:
    """What to hand the core for one legacy ``image_documents`` entry (node or block)."""
    if isinstance(document, ImageBlock):
        return image_block_source(document)
    if isinstance(document, ImageNode):
        return node_image_source(document) if has_image(document) else b""
    raise TypeError(f"image_documents: expected ImageNode or ImageBlock, got {type(document).__name__}")


def image_document_to_block(document: ImageNode | ImageBlock) -> ImageBlock:
    """An :class:`ImageBlock` for a legacy image document (for a chat-style inner model)."""
    if isinstance(document, ImageBlock):
        return document
    if document.image is not None:
        return ImageBlock(image=document.image.encode("ascii"), image_mimetype=document.image_mimetype)
    if document.image_path is not None:
        return ImageBlock(path=Path(document.image_path), image_mimetype=document.image_mimetype)
    if document.image_url is not None:
        return ImageBlock(url=document.image_url, image_mimetype=document.image_mimetype)
    raise TypeError(f"ImageNode {document.node_id} carries no image")


def replace_image_documents(
    documents: Sequence[ImageNode | ImageBlock],
    results: Sequence[ScanResult],
    pngs: Sequence[bytes | None] | None = None,
) -> list[ImageNode | ImageBlock]:
    """Legacy counterpart of :func:`replace_image_blocks`: same rules, same types out as in."""
    _check_lengths("image documents", len(documents), results, pngs)
    out: list[ImageNode | ImageBlock] = []
    for i, (document, result) in enumerate(zip(documents, results)):
        png = pngs[i] if pngs is not None else None
        if result.decision == Decision.BLOCK:
            continue
        if isinstance(document, ImageBlock):
            new_block = _replacement(document, result, png)
            if new_block is not None:
                out.append(new_block)
            continue
        out.append(_node_replacement(document, result, png))
    return out


def _node_replacement(node: BaseNode, result: ScanResult, png: bytes | None) -> BaseNode:
    """The node to forward for a non-blocked result (same rules as :func:`_replacement`)."""
    if png is not None:
        return with_image(node, png)
    came_by_url = isinstance(node, ImageNode) and node.image is None and node.image_path is None
    if result.masked_image is not None and (result.decision == Decision.MASK or came_by_url):
        return with_image(node, result.masked_image)
    return node


def replace_node_image(node: BaseNode, result: ScanResult, png: bytes | None = None) -> BaseNode | None:
    """The retrieved node to forward for one result: sanitised, unchanged, or ``None`` (dropped)."""
    if result.decision == Decision.BLOCK:
        return None
    return _node_replacement(node, result, png)
