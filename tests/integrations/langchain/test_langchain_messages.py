"""The pure message helpers, tested without any model."""

from __future__ import annotations

import base64

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompt_values import ChatPromptValue

from guardalign_core.results import Decision, ScanResult, Status
from guardalign_core.verdicts import Forward, ImageVerdict, RequestVerdict, SafetyPrompt
from guardalign_integrations.langchain._messages import (
    apply_safety_prompt,
    combine_input_chunks,
    find_images,
    refusal_message,
    to_messages,
    write_back,
)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
PNG_BYTES = base64.b64decode(PNG)


def _verdict(*forwards: tuple[Forward, bytes | None]) -> RequestVerdict:
    entries = []
    for i, (forward, data) in enumerate(forwards):
        result = ScanResult(index=i, status=Status.OK, decision=Decision.MASK, unsafe=True, reason="r", detector="ot",
                            threshold=0.4, backbone="b", policy="mask")
        entries.append(ImageVerdict(i, f"image {i}", result, forward, data=data, mime="image/png" if data else None,
                                    checked=PNG_BYTES, sanitised=True))
    return RequestVerdict(decision=Decision.MASK, status=Status.OK, policy="mask", reason="r", images=entries)


def test_to_messages_accepts_every_language_model_input() -> None:
    assert to_messages("hi")[0] == HumanMessage(content="hi")
    assert to_messages(ChatPromptValue(messages=[SystemMessage(content="s")]))[0].type == "system"
    assert [m.type for m in to_messages([("system", "s"), ("user", "u")])] == ["system", "human"]
    with pytest.raises(TypeError, match="expected a str"):
        to_messages(42)


@pytest.mark.parametrize(
    "block",
    [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image", "base64": PNG, "mime_type": "image/png"},
        {"type": "image", "source_type": "base64", "data": PNG, "mime_type": "image/png"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "url": f"data:image/png;base64,{PNG}"},
        {"type": "file", "base64": PNG, "mime_type": "image/png"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
        {"type": "media", "mime_type": "image/png", "data": PNG_BYTES},
    ],
    ids=["openai-data-url", "v1-base64", "v0-source-type", "anthropic-source", "v1-data-url", "file-image-mime", "responses", "google-media"],
)
def test_find_images_reads_every_block_shape(block: dict) -> None:
    messages = [SystemMessage(content="sys"), HumanMessage(content=[{"type": "text", "text": "what?"}, block])]
    (found,) = find_images(messages)
    assert found.path == (1, 1) and found.label == "messages[1].content[1]"
    assert found.image.refusal is None and found.image.source is not None


def test_find_images_skips_text_only_items_and_string_content() -> None:
    messages = [
        HumanMessage(content="plain text"),
        AIMessage(content=[{"type": "text", "text": "t"}, {"type": "reasoning", "reasoning": "r"},
                           {"type": "tool_use", "id": "1", "name": "fetch", "input": {"url": "https://example.com"}}]),
        ToolMessage(content=[{"type": "image", "base64": PNG, "mime_type": "image/png"}], tool_call_id="1"),
    ]
    assert [f.label for f in find_images(messages)] == ["messages[2].content[0]"]


@pytest.mark.parametrize(
    ("block", "why"),
    [
        ({"type": "image", "file_id": "file-123"}, "file id"),
        ({"type": "image_url", "image_url": 12}, "holds no image"),
        ({"type": "video", "base64": PNG, "mime_type": "video/mp4"}, "'video'"),
        ({"type": "file", "base64": "JVBERi0xLjQK", "mime_type": "application/pdf"}, "'file'"),
        ({"type": "hologram", "payload": {"url": "https://example.com/x"}}, "'hologram'"),
    ],
    ids=["file-id", "malformed-image-url", "video", "pdf", "unknown-type-with-url"],
)
def test_blocks_that_cannot_be_checked_are_refused_by_name(block: dict, why: str) -> None:
    (found,) = find_images([HumanMessage(content=[block])])
    assert found.image.source is None and why in found.image.refusal


def test_an_allow_listed_type_is_not_refused_and_an_unknown_type_without_data_passes() -> None:
    pdf = {"type": "file", "base64": "JVBERi0xLjQK", "mime_type": "application/pdf"}
    assert find_images([HumanMessage(content=[pdf])], allow_block_types=("file",)) == []
    assert find_images([HumanMessage(content=[{"type": "annotation", "note": "plain words"}])]) == []


def test_write_back_keeps_provider_options_and_every_other_item() -> None:
    text = {"type": "text", "text": "keep me", "extras": {"x": 1}}
    original = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}, "cache_control": {"type": "ephemeral"}}
    message = HumanMessage(content=[text, original, "a string item"], id="m1", name="alice", additional_kwargs={"k": "v"})
    other = SystemMessage(content="sys")
    found = find_images([other, message])
    out = write_back([other, message], found, _verdict((Forward.BYTES, b"\x89PNG\r\n\x1a\nnew")))
    assert out[0] is other
    new = out[1].content[1]
    assert new["image_url"]["detail"] == "high" and new["cache_control"] == {"type": "ephemeral"}
    assert new["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnew").decode()
    assert out[1].content[0] == text and out[1].content[2] == "a string item"
    assert (out[1].id, out[1].name, out[1].additional_kwargs) == ("m1", "alice", {"k": "v"})
    assert message.content[1] == original  # the input message is not modified


def test_write_back_drops_blocked_images_and_keeps_fail_open_ones() -> None:
    blocks = [{"type": "image", "base64": PNG, "mime_type": "image/png"}, {"type": "image", "base64": PNG, "mime_type": "image/png"}]
    message = HumanMessage(content=blocks)
    out = write_back([message], find_images([message]), _verdict((Forward.NOTHING, None), (Forward.AS_SENT, None)))
    assert out[0].content == [blocks[1]]


def test_apply_safety_prompt_merges_into_the_system_message() -> None:
    safety = SafetyPrompt(applied=True, system_instruction="Be safe.", begin_with='Begin with "As an AI assistant,".')
    system = SystemMessage(content="Be brief.", id="s1")
    out, _ = apply_safety_prompt([system, HumanMessage(content="q")], safety)
    assert out[0].id == "s1" and out[0].content == 'Be brief.\n\nBe safe.\n\nBegin with "As an AI assistant,".'
    assert len(out) == 2


def test_apply_safety_prompt_adds_system_and_a_prefill_without_trailing_whitespace() -> None:
    safety = SafetyPrompt(applied=True, system_instruction="Be safe.", prefill="As an AI assistant, ")
    out, delivery = apply_safety_prompt([HumanMessage(content="q")], safety)
    assert [m.type for m in out] == ["system", "human", "ai"]
    assert out[0].content == "Be safe." and out[-1].content == "As an AI assistant,"  # Anthropic rejects trailing whitespace
    assert safety.kept_prefix(delivery, "I") == "As an AI assistant, " and safety.kept_prefix(delivery, " I") == "As an AI assistant,"
    assert apply_safety_prompt([HumanMessage(content="q")], SafetyPrompt())[0] == [HumanMessage(content="q")]


def test_refusal_message_has_text_and_standard_refusal_block() -> None:
    message = refusal_message("No.", metadata={"guardalign": {"decision": "block"}})
    assert message.text == "No."
    assert {"type": "refusal", "refusal": "No."} in message.content_blocks
    assert message.response_metadata["guardalign"] == {"decision": "block"}
    assert refusal_message("No.", chunk=True).chunk_position == "last"


def test_combine_input_chunks() -> None:
    assert combine_input_chunks(["a", "b"]) == "ab"
    prompt = ChatPromptValue(messages=[HumanMessage(content="x")])
    assert combine_input_chunks([prompt]) is prompt
    with pytest.raises(ValueError, match="empty"):
        combine_input_chunks([])
    assert isinstance(combine_input_chunks([[AIMessage(content="a")]]), list)
