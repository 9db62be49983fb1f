"""GuardAlignLLM: all eight endpoints, policies, fail-closed, streaming, async, safety prompt."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.mock import MockFunctionCallingLLM

from guardalign_core.config import DEFAULT_SAFETY_INSTRUCTION
from guardalign_core.errors import GuardAlignViolation
from guardalign_integrations.llama_index import (
    DEFAULT_REFUSAL,
    GuardAlignFunctionCallingLLM,
    GuardAlignLLM,
)

from llamaindex_support import PIECES, RecordingLLM, block_pixels, call_endpoint, pixels

CHAT_ENDPOINTS = ["chat", "stream_chat", "achat", "astream_chat"]
COMPLETION_ENDPOINTS = ["complete", "stream_complete", "acomplete", "astream_complete"]


def image_request(*blocks: object, text: str = "What is in this picture?") -> list[ChatMessage]:
    return [ChatMessage(role="user", blocks=[*blocks, TextBlock(text=text)])]


def test_metadata_mirrors_inner_as_chat_model(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    assert type(llm) is GuardAlignLLM
    assert llm.metadata.is_chat_model is True
    assert llm.metadata.model_name == "recording"
    assert llm.metadata.context_window == 32000 and llm.metadata.num_output == 64
    assert llm.metadata.is_function_calling_model is False


def test_function_calling_inner_gives_function_calling_wrapper(make_config):
    llm = GuardAlignLLM(MockFunctionCallingLLM(), make_config(-1.0))
    assert isinstance(llm, GuardAlignFunctionCallingLLM)
    assert isinstance(llm, FunctionCallingLLM) and isinstance(llm, GuardAlignLLM)
    assert llm.metadata.is_function_calling_model is True and llm.metadata.is_chat_model is True


def test_rejects_non_llm(make_config):
    with pytest.raises(TypeError, match="llm: expected a LlamaIndex LLM"):
        GuardAlignLLM(object(), make_config(-1.0))  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", CHAT_ENDPOINTS)
async def test_chat_endpoints_forward_masked_pixels(
    endpoint, make_config, recording_llm, benign_path, partial_threshold, expected_pixels
):
    llm = GuardAlignLLM(recording_llm, make_config(partial_threshold))
    chunks = await call_endpoint(llm, endpoint, image_request(ImageBlock(path=benign_path)))

    assert recording_llm.calls[-1][0] == endpoint
    (received,) = recording_llm.image_blocks()
    assert received.path is None and received.url is None and received.image_mimetype == "image/png"
    got, want = block_pixels(received), expected_pixels(benign_path, partial_threshold)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, pixels(benign_path))  # something was masked
    assert recording_llm.last_messages[-1].blocks[-1].text == "What is in this picture?"

    record = chunks[-1].additional_kwargs["guardalign"]
    assert record["decision"] == "mask" and record["images"][0]["source"] == "messages[0].blocks[0]"
    text = chunks[-1].message.content
    assert text == "".join(PIECES)
    if "stream" in endpoint:
        assert [c.delta for c in chunks] == PIECES


@pytest.mark.parametrize("endpoint", COMPLETION_ENDPOINTS)
async def test_completion_endpoints_apply_prefix_policy(endpoint, make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0, policy="always"))
    chunks = await call_endpoint(llm, endpoint, "Say hi.")

    name, prompt = recording_llm.calls[-1]
    assert name == endpoint
    assert prompt.endswith("Say hi.") and prompt.startswith(DEFAULT_SAFETY_INSTRUCTION)
    assert 'Begin your answer with "As an AI assistant,".' in prompt
    assert chunks[-1].text == "".join(PIECES)
    assert chunks[-1].additional_kwargs["guardalign"]["prefix_applied"] is True
    assert not llm.guard.detector_loaded  # no image, no CLIP


async def test_completion_prompt_untouched_without_prefix(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    await call_endpoint(llm, "acomplete", "Say hi.")
    assert recording_llm.calls[-1][1] == "Say hi."


def test_stream_chat_yields_before_inner_stream_finishes(make_config, benign_path):
    inner = RecordingLLM(delay_s=0.02)
    llm = GuardAlignLLM(inner, make_config(-1.0))
    stream = llm.stream_chat(image_request(ImageBlock(path=benign_path)))
    first = next(stream)
    assert first.delta == PIECES[0]
    assert inner.produced == 1 and inner.finished is False
    rest = list(stream)
    assert inner.finished is True and len(rest) == len(PIECES) - 1


async def test_astream_chat_yields_before_inner_stream_finishes(make_config, benign_path):
    inner = RecordingLLM(delay_s=0.02)
    llm = GuardAlignLLM(inner, make_config(-1.0))
    stream = await llm.astream_chat(image_request(ImageBlock(path=benign_path)))
    first = await stream.__anext__()
    assert first.delta == PIECES[0]
    assert inner.produced == 1 and inner.finished is False
    assert len([c async for c in stream]) == len(PIECES) - 1 and inner.finished is True


async def test_async_scan_runs_off_the_event_loop(make_config, recording_llm, benign_path, monkeypatch):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    threads: list[threading.Thread] = []
    original = llm.guard.detector.scan

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(llm.guard.detector, "scan", spy)
    await llm.achat(image_request(ImageBlock(path=benign_path)))
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.parametrize("endpoint", CHAT_ENDPOINTS)
async def test_block_policy_refuses_without_calling_model(endpoint, make_config, recording_llm, figstep_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0, action="block"))
    chunks = await call_endpoint(llm, endpoint, image_request(ImageBlock(path=figstep_path)))
    assert recording_llm.calls == []
    assert chunks[-1].message.content == DEFAULT_REFUSAL
    assert chunks[-1].additional_kwargs["guardalign"]["decision"] == "block"


@pytest.mark.parametrize("endpoint", CHAT_ENDPOINTS)
async def test_block_policy_can_raise(endpoint, make_config, recording_llm, figstep_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0, action="block"), on_block="raise")
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.blocks\[0\]: 9 of 9 patches") as info:
        await call_endpoint(llm, endpoint, image_request(ImageBlock(path=figstep_path)))
    assert info.value.decision.blocked and recording_llm.calls == []


async def test_undecodable_image_fails_closed_naming_it(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0), on_block="raise")
    request = image_request(ImageBlock(path=benign_path), ImageBlock(image=b"this is not an image"))
    with pytest.raises(GuardAlignViolation) as info:
        await llm.achat(request)
    message = str(info.value)
    assert "messages[0].blocks[1]" in message and "messages[0].blocks[0]" not in message
    assert "UnsupportedImageFormatError" in message and "not an image format" in message
    assert recording_llm.calls == []

    refusing = GuardAlignLLM(recording_llm, make_config(-1.0))
    record = refusing.chat(request).additional_kwargs["guardalign"]
    assert (record["decision"], record["status"]) == ("block", "error")
    assert record["images"][1]["error"].startswith("messages[0].blocks[1]")
    assert recording_llm.calls == []


async def test_fail_open_forwards_unchecked_image_with_status_error(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0), fail_open=True)
    broken = ImageBlock(image=b"this is not an image")
    response = await llm.achat(image_request(broken))
    record = response.additional_kwargs["guardalign"]
    assert (record["status"], record["decision"]) == ("error", "allow")
    assert record["images"][0]["status"] == "error"
    (forwarded,) = recording_llm.image_blocks()
    assert forwarded is broken


def test_remote_url_is_not_fetched(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0), on_block="raise")
    with pytest.raises(GuardAlignViolation, match="remote URLs are not fetched"):
        llm.chat(image_request(ImageBlock(url="https://example.invalid/cat.png")))
    assert recording_llm.calls == []


def test_text_only_request_loads_nothing(make_config, recording_llm, decision_events):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    response = llm.chat([ChatMessage(role="user", content="hello")])
    assert response.additional_kwargs["guardalign"]["decision"] == "allow"
    assert not llm.guard.detector_loaded
    assert decision_events == []
    assert [m.role for m in recording_llm.last_messages] == [MessageRole.USER]


def test_safety_prompt_added_when_unsafe(make_config, recording_llm, figstep_path, benign_jpeg, tmp_path):
    unsafe = GuardAlignLLM(recording_llm, make_config(100.0))
    system = ChatMessage(role="system", content="You are a helpful assistant.")
    unsafe.chat([system, *image_request(ImageBlock(path=figstep_path))])
    sent = recording_llm.last_messages
    assert [m.role for m in sent] == [MessageRole.SYSTEM, MessageRole.USER]
    assert sent[0].blocks[0].text == "You are a helpful assistant."
    assert DEFAULT_SAFETY_INSTRUCTION in sent[0].content and 'Begin your answer with "As an AI assistant,"' in sent[0].content
    assert np.count_nonzero(block_pixels(recording_llm.image_blocks()[0])) == 0  # threshold 100: all masked

    # rocket.jpg carries an Adobe RGB profile (its pixels render differently once converted, so
    # they would be forwarded re-encoded): the same photo without a profile can go as it is.
    plain_jpeg = tmp_path / "rocket-srgb.jpg"
    Image.open(benign_jpeg).convert("RGB").save(plain_jpeg, "JPEG", quality=90)
    safe = GuardAlignLLM(recording_llm, make_config(-1.0))
    safe.chat(image_request(ImageBlock(path=plain_jpeg)))
    assert [m.role for m in recording_llm.last_messages] == [MessageRole.USER]
    (kept,) = recording_llm.image_blocks()
    # allowed local image: forwarded as the exact file bytes that were checked (no re-encode, no second read)
    assert kept.path is None and kept.url is None and kept.image_mimetype == "image/jpeg"
    assert kept.resolve_image().read() == plain_jpeg.read_bytes()


async def test_prefill_is_sent_and_kept_in_output(make_config, recording_llm, figstep_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0, prefill=True))
    response = llm.chat(image_request(ImageBlock(path=figstep_path)))
    assert recording_llm.last_messages[-1].role == MessageRole.ASSISTANT
    assert recording_llm.last_messages[-1].content == "As an AI assistant,"  # no trailing whitespace (Anthropic 400s on it)
    assert response.message.content == "As an AI assistant, " + "".join(PIECES)

    chunks = await call_endpoint(llm, "astream_chat", image_request(ImageBlock(path=figstep_path)))
    assert chunks[0].delta == "As an AI assistant, " + PIECES[0]
    assert [c.delta for c in chunks[1:]] == PIECES[1:]
    assert chunks[-1].message.content == "As an AI assistant, " + "".join(PIECES)


def test_check_only_does_not_call_model(make_config, recording_llm, benign_path, figstep_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0))
    decision = llm.check(image_request(ImageBlock(path=benign_path), ImageBlock(path=figstep_path)))
    assert decision.decision.value == "mask"
    assert [r.source for r in decision.results] == ["messages[0].blocks[0]", "messages[0].blocks[1]"]
    assert recording_llm.calls == []


def test_input_messages_are_not_mutated(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0))
    request = image_request(ImageBlock(path=benign_path))
    before = request[0].model_dump()
    llm.chat(request)
    assert request[0].model_dump() == before


def test_deepcopy_shares_the_guard(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    clone = copy.deepcopy(llm)
    assert clone.guard is llm.guard and clone.llm is not llm.llm


def test_policy_shortcuts_validate(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0), action="flag", fail_open=True)
    assert (llm.guard.policy.action, llm.guard.policy.fail_open) == ("flag", True)
    with pytest.raises(ValueError):
        GuardAlignLLM(recording_llm, make_config(-1.0), action="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guard: pass the guard either positionally or as guard="):
        GuardAlignLLM(recording_llm, make_config(-1.0), guard=llm.guard)


def test_path_fixture_is_real_file(benign_path: Path):
    assert benign_path.is_file()


@pytest.mark.parametrize("reuse", [True, False])
def test_resent_inline_image_is_not_rescanned(reuse, make_config, recording_llm, benign_path, partial_threshold, monkeypatch):
    """Chat histories resend images every turn: a guard reuses its verdict on identical inline bytes."""
    llm = GuardAlignLLM(recording_llm, make_config(partial_threshold), reuse_checked=reuse)
    scans: list[int] = []
    scan = llm.guard.detector.scan
    monkeypatch.setattr(llm.guard.detector, "scan", lambda images, **kw: scans.append(len(images)) or scan(images, **kw))
    turn = image_request(ImageBlock(image=benign_path.read_bytes()))

    first = llm.chat(turn).additional_kwargs["guardalign"]
    first_pixels = block_pixels(recording_llm.image_blocks()[0])
    second = llm.chat([*turn, ChatMessage(role="assistant", content="A cat."), ChatMessage(role="user", content="Sure?")])
    assert scans == ([1] if reuse else [1, 1])
    assert np.array_equal(block_pixels(recording_llm.image_blocks()[0]), first_pixels)
    record = second.additional_kwargs["guardalign"]
    assert record["decision"] == first["decision"] == "mask"
    assert record["images"][0]["reason"].endswith("(reused)") == reuse


def test_checked_images_memory_is_bounded():
    from guardalign_core.results import Decision, ScanResult, Status
    from guardalign_core.memory import CheckedImageMemory as _CheckedImages

    result = ScanResult(
        index=0, status=Status.OK, decision=Decision.MASK, unsafe=True, reason="r", detector="ot",
        threshold=0.4, backbone="b", policy="mask",
    )
    memory = _CheckedImages(max_entries=3, max_bytes=10)
    for i in range(5):
        memory.put(("f", str(i)), (result, b"1234"))
    assert memory.get(("f", "0")) is None and memory.get(("f", "2")) is None  # 2 × 4 bytes fit in 10
    assert memory.get(("f", "3")) is not None and memory.get(("f", "4")) is not None


def test_config_change_invalidates_reuse(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0))
    turn = image_request(ImageBlock(image=benign_path.read_bytes()))
    assert llm.chat(turn).additional_kwargs["guardalign"]["decision"] == "mask"
    llm.guard.config = make_config(100.0, action="block")  # the policy is read per call
    assert llm.chat(turn).additional_kwargs["guardalign"]["decision"] == "block"
