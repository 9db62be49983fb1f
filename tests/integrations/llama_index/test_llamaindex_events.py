"""Instrumentation: one GuardAlignDecisionEvent per image, seen by a root-dispatcher handler."""

from __future__ import annotations

import base64

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.schema import ImageNode, NodeWithScore, TextNode

from guardalign_integrations.llama_index import (
    GuardAlignDecisionEvent,
    GuardAlignImagePostprocessor,
    GuardAlignLLM,
    GuardAlignMultiModalLLM,
)

from llamaindex_support import RecordingLLM


async def test_llm_sends_one_event_per_image(make_config, benign_path, benign_jpeg, figstep_path, decision_events):
    llm = GuardAlignLLM(RecordingLLM(), make_config(100.0))
    messages = [
        ChatMessage(role="user", blocks=[ImageBlock(path=benign_path), TextBlock(text="and")]),
        ChatMessage(role="assistant", content="ok"),
        ChatMessage(role="user", blocks=[ImageBlock(path=benign_jpeg), ImageBlock(path=figstep_path)]),
    ]
    await llm.achat(messages)

    assert all(isinstance(e, GuardAlignDecisionEvent) for e in decision_events)
    assert [e.source for e in decision_events] == ["messages[0].blocks[0]", "messages[2].blocks[0]", "messages[2].blocks[1]"]
    assert [e.index for e in decision_events] == [0, 1, 2]
    event = decision_events[0]
    assert (event.component, event.decision, event.status, event.unsafe) == ("llm", "mask", "ok", True)
    assert event.result["unsafe_patches"] == 9 and event.result["threshold"] == 100.0
    assert event.request is not None and event.request["decision"] == "mask" and "images" not in event.request
    assert event.model_dump()["class_name"] == "GuardAlignDecisionEvent"


def test_postprocessor_and_legacy_events(make_config, benign_path, figstep_path, decision_events):
    nodes = [
        NodeWithScore(node=ImageNode(image_path=str(benign_path), id_="a"), score=1.0),
        NodeWithScore(node=TextNode(text="no image", id_="t"), score=1.0),
        NodeWithScore(node=ImageNode(image=base64.b64encode(figstep_path.read_bytes()).decode(), id_="b"), score=1.0),
    ]
    GuardAlignImagePostprocessor(make_config(-1.0)).postprocess_nodes(nodes)
    assert [(e.component, e.node_id, e.decision) for e in decision_events] == [
        ("postprocessor", "a", "allow"),
        ("postprocessor", "b", "allow"),
    ]
    assert decision_events[0].source == "chelsea.png" and decision_events[1].source == "node b"

    decision_events.clear()
    GuardAlignMultiModalLLM(RecordingLLM(), make_config(-1.0)).complete("Describe.", [nodes[0].node, nodes[2].node])
    assert [(e.component, e.source) for e in decision_events] == [
        ("multi_modal_llm", "image_documents[0]"),
        ("multi_modal_llm", "image_documents[1]"),
    ]


def test_no_images_no_events(make_config, decision_events):
    GuardAlignLLM(RecordingLLM(), make_config(-1.0)).chat([ChatMessage(role="user", content="hi")])
    assert decision_events == []
