"""``GuardAlignImageTransform``: screen image nodes once, when a RAG index is built.

A LlamaIndex ``TransformComponent`` for ``IngestionPipeline``. Image-carrying nodes
(``ImageNode``, ``ImageDocument``, any ``Node`` with an ``image_resource``) are screened in
batches through the core's one screening step (:meth:`ImageGuard.screen`, one call per batch);
text nodes pass through untouched. Under the policy:

- ``mask``: the node's image is replaced by the sanitised one;
- ``block``: the node is dropped (logged, and reported by a decision event);
- ``flag``: the node is kept; the verdict says it is unsafe.

Every node that comes out with an image holds exactly the bytes that were checked (or their
sanitised re-encode), base64 inline in an ``ImageNode``, with ``image_path``, ``image_url`` and
``metadata["file_path"]`` (which LlamaIndex also loads as an image) cleared, so nothing in the index points back at the unscanned original. The verdict is
recorded in ``metadata["guardalign"]`` (hidden from embedding and LLM text) with the guard's
config fingerprint and the digest of the forwarded bytes, so the query-time
:class:`~.postprocessor.GuardAlignImagePostprocessor` skips nodes screened with the same
configuration whose image is still the one that was screened (see :mod:`._trust`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Literal, Sequence

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.schema import BaseNode, Document, ImageNode, Node, NodeRelationship, TransformComponent

from guardalign_core.guard import ImageGuard
from guardalign_core.memory import config_fingerprint
from guardalign_core.results import Decision
from guardalign_core.screening import ContentImage
from guardalign_core.verdicts import Forward, ImageVerdict

from ._endpoints import METADATA_KEY, GuardSpec, SharesGuardOnCopy, build_guard
from ._messages import FILE_PATH_KEY, has_image, node_image, node_label, node_refusal, with_image, with_metadata
from ._trust import stamped_summary
from .events import dispatch_decision_events

__all__ = ["GuardAlignImageTransform"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
"""Image nodes per screening call (and per detector batch) by default; at most ``ImageLimits.max_images``."""


def _image_node(node: BaseNode, data: bytes, mime: str) -> BaseNode:
    """The node holding only ``data`` as its image.

    An ``ImageDocument`` or ``Node`` becomes an ``ImageNode`` (same id, text, metadata and
    relationships; a document becomes its source), as LlamaIndex's own node parsers do:
    ``MediaResource.data`` is not serialised by LlamaIndex, so an inline image would vanish
    from the docstore and the ingestion cache, and only ``ImageNode`` is embedded as an image
    by the multimodal index.
    A ``Node`` that also keeps (allowed) audio or video stays a ``Node``.
    """
    if isinstance(node, Node) and node.audio_resource is None and node.video_resource is None:
        relationships = dict(node.relationships)
        if isinstance(node, Document) and NodeRelationship.SOURCE not in relationships:
            relationships[NodeRelationship.SOURCE] = node.as_related_node_info()  # ref_doc_id: delete_ref_doc still works
        return ImageNode(
            id_=node.id_,
            text=(node.text_resource.text or "") if node.text_resource is not None else "",
            image=base64.b64encode(data).decode("ascii"),
            image_mimetype=mime,
            embedding=node.embedding,
            metadata={k: v for k, v in node.metadata.items() if k != FILE_PATH_KEY},  # nothing points at the original
            excluded_embed_metadata_keys=list(node.excluded_embed_metadata_keys),
            excluded_llm_metadata_keys=list(node.excluded_llm_metadata_keys),
            relationships=relationships,
            metadata_template=node.metadata_template,
            metadata_separator=node.metadata_separator,
            text_template=node.text_template,
        )
    return with_image(node, data, mime)


class GuardAlignImageTransform(SharesGuardOnCopy, TransformComponent):
    """Screen image nodes in batches at ingestion: mask, drop or flag them; record each verdict.

    Args:
        config: a preset name, config file, :class:`GuardConfig` or its dict (default: ``GuardConfig()``).
        guard: an existing :class:`ImageGuard` to share (its detector and memory).
        action: shortcut for ``config.policy.action``: ``"mask"`` (default), ``"block"`` (drop
            unsafe nodes), ``"flag"`` (keep them, verdict recorded).
        fail_open: shortcut for ``config.policy.fail_open``: a node whose image cannot be
            checked is kept unchanged (``status: error``) instead of dropped.
        batch_size: image nodes per screening call (default 16, at most ``ImageLimits.max_images``).
        metadata_key: the metadata key of the verdict (default ``"guardalign"``).
        reuse_checked: reuse verdicts on images this guard already checked (duplicates in a corpus).
        allow_media: ``"audio"`` / ``"video"``: index nodes carrying such media, unchecked;
            by default they are refused (dropped), as the guard cannot check them.

    Raises:
        ValueError: a bad config or shortcut, ``batch_size`` above ``ImageLimits.max_images``.

    Example:
        >>> from llama_index.core.ingestion import IngestionPipeline
        >>> pipeline = IngestionPipeline(transformations=[GuardAlignImageTransform("fast-cpu")])  # doctest: +SKIP
        >>> nodes = pipeline.run(documents=[ImageDocument(image_path="cat.png"), Document(text="hi")])  # doctest: +SKIP
        >>> nodes[0].metadata["guardalign"]["decision"]  # doctest: +SKIP
        'allow'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    config: dict[str, Any] = Field(
        description="The guard's GuardConfig (JSON form): it rebuilds the guard in worker processes and keys the ingestion cache."
    )
    fingerprint: str = Field(
        description="guardalign_core.memory.config_fingerprint of the guard: what decides a verdict (also recorded in each verdict)."
    )
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Image nodes per screening call (one detector batch each).")
    metadata_key: str = Field(METADATA_KEY, min_length=1, description="Metadata key holding each screened node's verdict.")
    reuse_checked: bool = Field(True, description="Do not rescan images this guard already checked (the same bytes again).")
    allow_media: tuple[Literal["audio", "video"], ...] = Field(
        (), description="Media kinds indexed unchecked; nodes carrying any other audio or video are dropped (default deny)."
    )

    _guard: ImageGuard | None = PrivateAttr(default=None)

    def __init__(
        self,
        config: GuardSpec = None,
        *,
        guard: GuardSpec = None,
        action: Literal["mask", "block", "flag"] | None = None,
        fail_open: bool | None = None,
        fingerprint: str | None = None,
        **kwargs: Any,
    ) -> None:
        built = build_guard(config, guard=guard, action=action, fail_open=fail_open)  # fails here, not at the first node
        actual = config_fingerprint(built.config, built.detector)
        if fingerprint is not None and fingerprint != actual:
            # from_dict / unpickling in a worker rebuilds the guard from its config: a guard built
            # around a detector object that the config cannot reproduce would decide differently.
            raise ValueError(
                "fingerprint: the guard rebuilt from this config decides differently from the one the transform was made with "
                "(a custom detector cannot be rebuilt in another process); pass the same guard, or build it from a config"
            )
        limit = built.config.images.max_images
        batch_size = kwargs.setdefault("batch_size", min(DEFAULT_BATCH_SIZE, max(limit, 1)))  # default: what one request may hold
        if isinstance(batch_size, int) and batch_size > limit:
            raise ValueError(
                f"batch_size: {batch_size} is above ImageLimits.max_images={limit} (each batch is one screening request); "
                "lower it or raise the limit"
            )
        super().__init__(config=built.config.model_dump(mode="json"), fingerprint=actual, **kwargs)
        self._guard = built

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignImageTransform"

    @property
    def guard(self) -> ImageGuard:
        """The :class:`ImageGuard` (config, detector, policy) this transform uses."""
        if self._guard is None:
            raise RuntimeError("GuardAlignImageTransform has no guard (it was restored without its config); build it again")
        return self._guard

    # -- screening ---------------------------------------------------------------------------
    def _screen(self, nodes: list[BaseNode], images: list[ContentImage]) -> list[ImageVerdict]:
        """One screening call for a batch; a batch the per-request budget refuses is split, so only what alone is over it is dropped."""
        verdict = self.guard.screen(images, reuse=self.reuse_checked)
        if verdict.refused is not None and len(images) > 1:  # the only whole-batch refusal here is the budget
            half = len(images) // 2
            return self._screen(nodes[:half], images[:half]) + self._screen(nodes[half:], images[half:])
        dispatch_decision_events(verdict.images, component="ingestion", node_ids=[n.node_id for n in nodes])
        return list(verdict.images)

    def _refuse(self, node: BaseNode, why: str) -> ImageVerdict:
        verdict = self.guard.screen([ContentImage(node_label(node), refusal=why)], reuse=False)
        dispatch_decision_events(verdict.images, component="ingestion", node_ids=[node.node_id])
        return verdict.images[0]

    def _output(self, node: BaseNode, entry: ImageVerdict) -> BaseNode | None:
        """The node to index for its verdict, or ``None`` (dropped)."""
        result = entry.result
        if entry.forward == Forward.NOTHING:
            logger.info("GuardAlign dropped node %s at ingestion: %s", node.node_id, result.reason)
            return None
        stamp = stamped_summary(entry, self.fingerprint)
        if entry.forward == Forward.AS_SENT:  # fail_open: kept unchanged, marked unchecked (never trusted later)
            return with_metadata(node, self.metadata_key, stamp)
        new = _image_node(node, entry.data, entry.mime)  # type: ignore[arg-type]
        if result.decision == Decision.MASK and new.embedding is not None:
            # An embedding computed before this step encodes the unmasked original.
            new = new.model_copy(update={"embedding": None})
        return with_metadata(new, self.metadata_key, stamp)

    def screen_nodes(self, nodes: Sequence[BaseNode]) -> list[BaseNode]:
        """Screen ``nodes``: text nodes unchanged, image nodes masked / dropped / flagged, order kept.

        Args:
            nodes: the nodes (or documents) of an ingestion run.

        Returns:
            The nodes to index, in input order, without the dropped ones.
        """
        nodes = list(nodes)
        allowed = frozenset(self.allow_media)
        entries: dict[int, ImageVerdict] = {}
        pending: list[int] = []
        for i, node in enumerate(nodes):
            why = node_refusal(node, allowed)
            if why is not None:
                entries[i] = self._refuse(node, why)
            elif has_image(node):
                pending.append(i)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            images = [node_image(nodes[i], node_label(nodes[i])) for i in batch]
            for i, entry in zip(batch, self._screen([nodes[i] for i in batch], images)):
                entries[i] = entry
        out: list[BaseNode] = []
        for i, node in enumerate(nodes):
            if i not in entries:
                out.append(node)
                continue
            new = self._output(node, entries[i])
            if new is not None:
                out.append(new)
        return out

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[BaseNode]:
        return self.screen_nodes(nodes)

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[BaseNode]:
        """Async :meth:`__call__`: the CPU-heavy scan runs in a worker thread (text-only runs stay inline)."""
        if not any(has_image(n) or node_refusal(n, frozenset(self.allow_media)) is not None for n in nodes):
            return self.screen_nodes(nodes)
        return await asyncio.to_thread(self.screen_nodes, nodes)
