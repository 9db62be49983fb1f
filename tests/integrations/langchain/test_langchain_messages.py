"""The pure message helpers, tested without any model."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompt_values import ChatPromptValue
from PIL import Image

from guardalign_core.guard import SafetyPrompt
from guardalign_integrations.langchain._messages import (
    ImageRef,
    apply_safety_prompt,
    combine_input_chunks,
    extract_images,
    image_to_block,
    refusal_message,
    replace_images,
    to_messages,
)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def test_to_messages_accepts_every_language_model_input() -> None:
    assert to_messages("hi")[0] == HumanMessage(content="hi")
    assert to_messages(ChatPromptValue(messages=[SystemMessage(content="s")]))[0].type == "system"
    assert [m.type for m in to_messages([("system", "s"), ("user", "u")])] == ["system", "human"]
    with pytest.raises(TypeError, match="expected a str"):
        to_messages(42)


@pytest.mark.parametrize(
    ("block", "source_prefix"),
    [
        ({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}, "data:image/png;base64,"),
        ({"type": "image", "base64": PNG, "mime_type": "image/png"}, "data:image/png;base64,"),
        ({"type": "image", "source_type": "base64", "data": PNG, "mime_type": "image/png"}, "data:image/png;base64,"),
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}, "data:image/png;base64,"),
        ({"type": "image", "url": f"data:image/png;base64,{PNG}"}, "data:image/png;base64,"),
        ({"type": "file", "base64": PNG, "mime_type": "image/png"}, "data:image/png;base64,"),
    ],
    ids=["openai-data-url", "v1-base64", "v0-source-type", "anthropic-source", "v1-data-url", "file-image-mime"],
)
def test_extract_images_reads_every_block_shape(block: dict, source_prefix: str) -> None:
    messages = [SystemMessage(content="sys"), HumanMessage(content=[{"type": "text", "text": "what?"}, block])]
    (ref,) = extract_images(messages)
    assert (ref.message_index, ref.content_index, ref.label) == (1, 1, "messages[1].content[1]")
    assert ref.source is not None and ref.source.startswith(source_prefix) and ref.source.endswith(PNG)
    assert ref.error is None and not ref.remote


def test_extract_images_finds_images_in_tool_messages_and_skips_text() -> None:
    messages = [
        HumanMessage(content="plain text"),
        HumanMessage(content=[{"type": "text", "text": "only text"}]),
        ToolMessage(content=[{"type": "image", "base64": PNG, "mime_type": "image/png"}], tool_call_id="1"),
    ]
    assert [r.label for r in extract_images(messages)] == ["messages[2].content[0]"]


@pytest.mark.parametrize(
    ("block", "why"),
    [
        ({"type": "image", "file_id": "file-123"}, "file_id"),
        ({"type": "image", "url": "file:///etc/passwd"}, "scheme 'file'"),
        ({"type": "image_url", "image_url": 12}, "unrecognised image block"),
        ({"type": "input_image", "image": "?"}, "unrecognised image block"),
    ],
    ids=["file-id", "file-url", "malformed-image-url", "unknown-image-type"],
)
def test_unreadable_image_blocks_are_reported_not_dropped(block: dict, why: str) -> None:
    (ref,) = extract_images([HumanMessage(content=[block])])
    assert ref.source is None and why in ref.error


def test_remote_urls_are_marked_remote() -> None:
    (ref,) = extract_images([HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}])])
    assert ref.remote and ref.source == "https://example.com/a.png"


def test_replace_images_rewrites_only_the_image_item() -> None:
    text = {"type": "text", "text": "keep me", "extras": {"x": 1}}
    original = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}}
    message = HumanMessage(content=[text, original, "a string item"], id="m1", name="alice", additional_kwargs={"k": "v"})
    other = SystemMessage(content="sys")
    refs = extract_images([other, message])
    new_block = image_to_block(Image.new("RGB", (2, 2)))
    out = replace_images([other, message], {refs[0]: new_block})
    assert out[0] is other
    assert out[1].content == [text, new_block, "a string item"]
    assert (out[1].id, out[1].name, out[1].additional_kwargs) == ("m1", "alice", {"k": "v"})
    assert message.content[1] == original  # the input message is not modified
    assert new_block["type"] == "image" and new_block["mime_type"] == "image/png"


def test_replace_images_ignores_unplaced_refs() -> None:
    message = HumanMessage(content="x")
    assert replace_images([message], {ImageRef(0, None, 0, "messages[0]"): {"type": "image"}}) == [message]


def test_apply_safety_prompt_merges_into_the_system_message() -> None:
    safety = SafetyPrompt(applied=True, system_instruction="Be safe.", begin_with='Begin with "As an AI assistant,".')
    system = SystemMessage(content="Be brief.", id="s1")
    out = apply_safety_prompt([system, HumanMessage(content="q")], safety)
    assert out[0].id == "s1" and out[0].content == 'Be brief.\n\nBe safe.\n\nBegin with "As an AI assistant,".'
    assert len(out) == 2


def test_apply_safety_prompt_adds_system_and_prefill() -> None:
    safety = SafetyPrompt(applied=True, system_instruction="Be safe.", prefill="As an AI assistant, ")
    out = apply_safety_prompt([HumanMessage(content="q")], safety)
    assert [m.type for m in out] == ["system", "human", "ai"]
    assert out[0].content == "Be safe." and out[-1].content == "As an AI assistant, "
    assert apply_safety_prompt([HumanMessage(content="q")], SafetyPrompt()) == [HumanMessage(content="q")]


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
