"""``GuardAlignImagePostprocessor``: screen retrieved images in multimodal RAG before synthesis.

Retrieved image nodes (``ImageNode`` with a base64 image, an image path or ``metadata["file_path"]``
when local files are allowed, or an image URL when the guard's limits allow fetching it; or a
``Node`` with an ``image_resource``) are
scanned in **one** batched detector call per query. Under the policy, unsafe images are
masked (the node's image replaced by the sanitised PNG) or their nodes dropped; every node
that comes out carries its decision in ``metadata["guardalign"]``, hidden from the
embedding and LLM text of the node so it never pollutes a prompt.

Nodes already screened (at ingestion by :class:`~.ingestion.GuardAlignImageTransform`, or
by a postprocessor) by a guard with the same config fingerprint are not scanned again, but
only while their image is still exactly the bytes that were screened (see :mod:`._trust`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from guardalign_core.guard import ImageGuard
from guardalign_core.memory import config_fingerprint
from guardalign_core.screening import ContentImage
from guardalign_core.verdicts import RequestVerdict

from ._endpoints import METADATA_KEY, GuardSpec, SharesGuardOnCopy, build_guard
from ._messages import forwarded_node, has_image, node_image, node_label, node_refusal, with_metadata
from ._trust import stamped_summary, trusted_summary
from .events import dispatch_decision_events

TEXT_NODE_DECISION: dict[str, Any] = {"decision": "allow", "status": "ok", "unsafe": False, "reason": "no image in node"}
"""The metadata recorded on nodes that carry no image (nothing to check)."""


class GuardAlignImagePostprocessor(SharesGuardOnCopy, BaseNodePostprocessor):
    """Scan retrieved image nodes in one batch; mask or drop unsafe ones; record every decision.

    Nodes come out in their original order and score; nodes are copied, never modified in
    place, so the index's stored nodes stay untouched. A forwarded node carries only what was
    checked: a masked node the sanitised PNG, any other node exactly the bytes the guard
    checked (read once from its path or base64), inline, with its ``image_path`` and
    ``image_url`` cleared, so nothing downstream can load a file changed since, or a URL
    beside the checked image; a node whose image came by URL is given the checked pixels
    inline (LlamaIndex would otherwise fetch the URL again). A node whose image cannot be
    checked is dropped, unless ``fail_open`` is set: then it is forwarded unchanged with
    ``status: error`` in its metadata (LlamaIndex may then fetch an ``image_url`` itself).

    Args:
        config: a preset name, config file or :class:`GuardConfig` (default: ``GuardConfig()``).
        guard: an existing :class:`ImageGuard` to share (e.g. the one of a ``GuardAlignLLM``).
        action: shortcut for ``config.policy.action``: ``"mask"`` (default), ``"block"`` (drop
            unsafe nodes), ``"flag"`` (keep them unchanged, decision recorded).
        fail_open: shortcut for ``config.policy.fail_open``.
        metadata_key: the metadata key of the decision (default ``"guardalign"``).
        annotate_text_nodes: also record ``{"decision": "allow", ...}`` on nodes without images.
        reuse_checked: reuse this guard's verdicts on inline images it has already checked.
        trust_screened: skip nodes whose stamped verdict comes from a guard with the same config
            fingerprint and whose inline image still has the stamped digest.
        allow_media: ``"audio"`` / ``"video"``: forward nodes carrying such media, unchecked; by
            default they are refused (dropped) as at ingestion, by the same rule.

    Example:
        >>> from llama_index.core.query_engine import RetrieverQueryEngine
        >>> screen = GuardAlignImagePostprocessor("fast-cpu")  # doctest: +SKIP
        >>> engine = RetrieverQueryEngine.from_args(
        ...     retriever, llm=llm, node_postprocessors=[screen], multimodal=True
        ... )  # doctest: +SKIP
        >>> [n.node.metadata["guardalign"]["decision"] for n in engine.retrieve(QueryBundle("q"))]  # doctest: +SKIP
        ['allow', 'mask', 'allow']
    """

    metadata_key: str = Field(METADATA_KEY, description="Metadata key holding each node's decision summary.")
    annotate_text_nodes: bool = Field(True, description="Record an 'allow, no image' decision on nodes without images too.")
    reuse_checked: bool = Field(
        True, description="Do not rescan inline images this guard already checked (the same image retrieved again)."
    )
    trust_screened: bool = Field(
        True,
        description="Do not rescan nodes screened (e.g. at ingestion) under the same config fingerprint whose image is still the screened one.",
    )

    allow_media: tuple[Literal["audio", "video"], ...] = Field(
        (), description="Media kinds forwarded unchecked; nodes carrying any other audio or video are dropped (default deny)."
    )

    _guard: ImageGuard = PrivateAttr()

    def __init__(
        self,
        config: GuardSpec = None,
        *,
        guard: GuardSpec = None,
        action: Literal["mask", "block", "flag"] | None = None,
        fail_open: bool | None = None,
        **kwargs: Any,
    ) -> None:
        built = build_guard(config, guard=guard, action=action, fail_open=fail_open)  # fails here, not at the first node
        super().__init__(**kwargs)
        self._guard = built

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignImagePostprocessor"

    @property
    def guard(self) -> ImageGuard:
        """The :class:`ImageGuard` (config, detector, policy) this postprocessor uses."""
        return self._guard

    def _screened(self, node: BaseNode) -> bool:
        """Whether ``node`` goes through the screening step: it carries an image, or media refused by name."""
        return has_image(node) or node_refusal(node, frozenset(self.allow_media)) is not None

    def screen_nodes(self, nodes: list[BaseNode]) -> RequestVerdict:
        """One screening step over the images of ``nodes`` (one batch); sends one event per node.

        A node whose image cannot be read or decoded fails alone (``status: error``): the
        rest of the query's nodes are still screened and forwarded.
        """
        allowed = frozenset(self.allow_media)
        images = []
        for n in nodes:
            why = node_refusal(n, allowed)  # the ingestion transform's rule: what is not indexed is not forwarded
            images.append(ContentImage(node_label(n), refusal=why) if why is not None else node_image(n, node_label(n)))
        verdict = self._guard.screen(images, reuse=self.reuse_checked)
        if verdict.images:
            dispatch_decision_events(verdict.images, component="postprocessor", node_ids=[n.node_id for n in nodes])
        return verdict

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        positions = [i for i, n in enumerate(nodes) if self._screened(n.node)]
        fingerprint = config_fingerprint(self._guard.config, self._guard.detector) if positions else ""  # builds no CLIP
        trusted = set()
        if self.trust_screened:
            trusted = {
                i
                for i in positions
                if node_refusal(nodes[i].node, frozenset(self.allow_media)) is None
                and trusted_summary(nodes[i].node, self.metadata_key, fingerprint) is not None
            }
        positions = [i for i in positions if i not in trusted]
        verdict = self.screen_nodes([nodes[i].node for i in positions])
        entries = {i: verdict.images[k] for k, i in enumerate(positions)}  # over budget: every entry forwards nothing
        out = []
        for i, scored in enumerate(nodes):
            if i in trusted:  # already screened, image unchanged: forwarded as it is (never masked twice)
                out.append(scored)
                continue
            if i in entries:
                entry = entries[i]
                replaced = forwarded_node(scored.node, entry)
                if replaced is None:
                    continue
                new = with_metadata(replaced, self.metadata_key, stamped_summary(entry, fingerprint))
            elif self.annotate_text_nodes:
                new = with_metadata(scored.node, self.metadata_key, dict(TEXT_NODE_DECISION))
            else:
                new = scored.node
            out.append(scored.model_copy(update={"node": new}))
        return out

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not any(self._screened(n.node) for n in nodes):
            return self._postprocess_nodes(nodes, query_bundle)
        return await asyncio.to_thread(self._postprocess_nodes, nodes, query_bundle)
