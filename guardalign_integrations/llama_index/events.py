"""GuardAlign decisions as LlamaIndex instrumentation events.

Every image GuardAlign checks inside LlamaIndex produces one :class:`GuardAlignDecisionEvent`,
sent through LlamaIndex's instrumentation dispatcher. Events propagate to the root
dispatcher, so a handler added there sees them along with LlamaIndex's own LLM events,
inside the same spans.

Example:
    >>> from llama_index.core.instrumentation import get_dispatcher
    >>> from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    >>> class Printer(BaseEventHandler):
    ...     def handle(self, event, **kwargs):
    ...         if isinstance(event, GuardAlignDecisionEvent):
    ...             print(event.source, event.decision)
    >>> get_dispatcher().add_event_handler(Printer())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.base import BaseEvent

from guardalign_core.verdicts import ImageVerdict

dispatcher = get_dispatcher(__name__)

Component = Literal["llm", "multi_modal_llm", "postprocessor", "ingestion"]


class GuardAlignDecisionEvent(BaseEvent):
    """The guard's verdict on one image (no pixels, no user text).

    Attributes:
        component: which adapter checked it: ``"llm"`` (:class:`GuardAlignLLM`),
            ``"multi_modal_llm"``, ``"postprocessor"`` or ``"ingestion"``
            (:class:`GuardAlignImageTransform`).
        index: the image's position among the images checked together (one request, or
            one batch of retrieved nodes).
        source: a short label: ``"messages[0].blocks[1]"`` in a chat request, the file name
            or node id for a retrieved node.
        node_id: the node's id (postprocessor and ingestion only).
        decision: ``allow``, ``mask``, ``block`` or ``flag``.
        status: ``ok``, or ``error`` when the image could not be checked.
        unsafe: whether any patch scored at or under the threshold.
        reason: what was found, without echoing the input.
        result: the full per-image summary (:meth:`ImageVerdict.summary`, the per-image part of the one verdict summary): score, threshold,
            categories, number of unsafe patches, error.
        request: the request-level summary (combined decision, policy, whether the safety
            prefix was applied; without the per-image list); ``None`` for the postprocessor and ingestion.
    """

    component: str
    index: int
    source: str | None = None
    node_id: str | None = None
    decision: str
    status: str
    unsafe: bool
    reason: str
    result: dict[str, Any] = Field(default_factory=dict)
    request: dict[str, Any] | None = None

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignDecisionEvent"


def dispatch_decision_events(
    results: Sequence[ImageVerdict],
    *,
    component: Component,
    request: dict[str, Any] | None = None,
    node_ids: Sequence[str | None] | None = None,
) -> list[GuardAlignDecisionEvent]:
    """Send one :class:`GuardAlignDecisionEvent` per scan result; returns the events sent.

    Args:
        results: the per-image verdicts, in order.
        component: the adapter that checked them.
        request: the request-level summary to attach (its ``images`` list is dropped).
        node_ids: node ids aligned with ``results`` (postprocessor).
    """
    if node_ids is not None and len(node_ids) != len(results):
        raise ValueError(f"node_ids: got {len(node_ids)} ids for {len(results)} results")
    request_view = {k: v for k, v in request.items() if k != "images"} if request is not None else None
    events = []
    for position, entry in enumerate(results):
        result = entry.result
        event = GuardAlignDecisionEvent(
            component=component,
            index=result.index,
            source=result.source,
            node_id=node_ids[position] if node_ids is not None else None,
            decision=result.decision.value,
            status=result.status.value,
            unsafe=result.unsafe,
            reason=result.reason,
            result=entry.summary(),
            request=request_view,
        )
        dispatcher.event(event)
        events.append(event)
    return events
