"""GuardedChatModel: masking, refusal or raise on block, real streaming, tools, structured output, tracing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lc_support import ALL_SAFE, ALL_UNSAFE
from guardalign_lc_fakes import RecordingChatModel, ScriptedToolModel, decode_block, image_blocks
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from langchain_core.tracers.context import collect_runs
from pydantic import BaseModel

from guardalign_core.errors import GuardAlignViolation
from guardalign_integrations.langchain import DEFAULT_REFUSAL, EVENT_NAME, METADATA_KEY, GuardAlignGuard, GuardedChatModel


def _user(block: dict[str, Any], text: str = "What is in this image?") -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": text}, block])


def test_masked_image_reaches_the_wrapped_model(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable) -> None:
    inner = RecordingChatModel()
    llm = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE))
    answer = llm.invoke([_user(v1_block(image_paths[0]))])
    assert answer.text == inner.reply
    assert answer.response_metadata[METADATA_KEY]["decision"] == "mask"
    assert answer.response_metadata["model_name"] == "fake-vision-1"
    system, user = inner.received[0]
    assert system.type == "system" and user.content[0]["text"] == "What is in this image?"
    pixels = np.asarray(decode_block(image_blocks(user)[0]))
    assert (pixels == 0).all()  # threshold above every score: every patch masked


@pytest.mark.parametrize("use_stream", [False, True], ids=["invoke", "stream"])
def test_blocked_request_gets_a_standard_refusal(
    make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable, use_stream: bool
) -> None:
    inner = RecordingChatModel()
    llm = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE, action="block"))
    request = [_user(v1_block(image_paths[0]))]
    if use_stream:
        chunks = list(llm.stream(request))
        assert chunks[-1].chunk_position == "last"
        answer = chunks[0]
        for chunk in chunks[1:]:
            answer = answer + chunk
    else:
        answer = llm.invoke(request)
    assert answer.text == DEFAULT_REFUSAL
    assert [b for b in answer.content_blocks if b["type"] == "refusal"] == [{"type": "refusal", "refusal": DEFAULT_REFUSAL}]
    assert answer.response_metadata[METADATA_KEY]["decision"] == "block"
    assert answer.response_metadata["finish_reason"] == "content_filter"
    assert inner.received == []


async def test_on_block_raise(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable) -> None:
    llm = GuardedChatModel(model=RecordingChatModel(), guard=make_config(ALL_UNSAFE, action="block"), on_block="raise")
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.content\[1\]"):
        llm.invoke([_user(v1_block(image_paths[0]))])
    with pytest.raises(GuardAlignViolation):
        await llm.ainvoke([_user(v1_block(image_paths[0]))])
    with pytest.raises(GuardAlignViolation):
        [c async for c in llm.astream([_user(v1_block(image_paths[0]))])]


@pytest.mark.parametrize("use_async", [False, True], ids=["stream", "astream"])
def test_streaming_is_real(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable, use_async: bool) -> None:
    inner = RecordingChatModel(reply="one two three four five six", delay_s=0.15)
    llm = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE))
    request = [_user(v1_block(image_paths[0]))]
    arrivals: list[float] = []
    chunks: list[Any] = []

    async def consume() -> None:
        async for chunk in llm.astream(request):
            arrivals.append(time.perf_counter())
            chunks.append(chunk)

    if use_async:
        asyncio.run(consume())
    else:
        for chunk in llm.stream(request):
            arrivals.append(time.perf_counter())
            chunks.append(chunk)
    assert arrivals[0] < inner.produced_at[-1]  # the caller had chunk 1 before the model produced its last
    assert arrivals[-1] - arrivals[0] > 0.5  # and the chunks kept arriving as they were produced
    assert chunks[-1].chunk_position == "last"
    assert chunks[0].response_metadata[METADATA_KEY]["decision"] == "mask"
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.text == inner.reply and full.usage_metadata["output_tokens"] == 6


def test_prefill_prefix_is_kept_in_the_answer(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable) -> None:
    inner = RecordingChatModel(reply="I cannot help with that.")
    llm = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE, prefix={"prefill": True}))
    answer = llm.invoke([_user(v1_block(image_paths[0]))])
    assert inner.received[0][-1] == AIMessage(content="As an AI assistant,")  # no trailing whitespace (Anthropic 400s on it)
    assert answer.text == "As an AI assistant, I cannot help with that."


def test_text_only_costs_no_model_load(make_config: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("guardalign_core.detector.get_clip_encoder", lambda *a, **k: pytest.fail("CLIP loaded"))
    llm = GuardedChatModel(model=RecordingChatModel(), guard=make_config(ALL_UNSAFE))
    assert llm.invoke("hello").response_metadata[METADATA_KEY]["images"] == []
    assert not llm.guard.engine.detector_loaded


async def test_events_and_traces(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable) -> None:
    llm = GuardedChatModel(model=RecordingChatModel(), guard=make_config(ALL_UNSAFE))
    request = [_user(v1_block(image_paths[0]))]
    events = [e async for e in llm.astream_events(request, version="v2")]
    (custom,) = [e for e in events if e["event"] == "on_custom_event"]
    assert custom["name"] == EVENT_NAME and custom["data"]["decision"] == "mask"
    starts = [e for e in events if e["event"] == "on_chat_model_start"]
    assert [e["name"] for e in starts] == ["GuardedChatModel", "RecordingChatModel"]
    assert "nostream" in starts[1]["tags"]  # the inner run is traced, not streamed twice
    for call in (llm.invoke, lambda r: list(llm.stream(r))):
        with collect_runs() as collector:
            call(request)
        (run,) = collector.traced_runs  # one trace: the wrapped model's run is nested, not a second root
        assert run.extra["metadata"][METADATA_KEY]["decision"] == "mask"
        assert run.extra["metadata"]["ls_provider"] == "fakevision"
        assert [child.name for child in run.child_runs] == ["RecordingChatModel"]


def test_bind_tools_delegates_and_keeps_the_guard(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable) -> None:
    @tool
    def describe(label: str) -> str:
        """Describe a label."""
        return label

    call = AIMessage(content="", tool_calls=[{"name": "describe", "args": {"label": "x"}, "id": "c1", "type": "tool_call"}])
    inner = ScriptedToolModel(script=[call])
    llm = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE))
    bound = llm.bind_tools([describe], tool_choice="any")
    assert isinstance(bound, RunnableBinding) and bound.bound is llm
    answer = bound.invoke([_user(v1_block(image_paths[0]))])
    assert answer.tool_calls[0]["name"] == "describe"
    assert inner.bound_kwargs[0]["tools"][0]["function"]["name"] == "describe"
    assert inner.bound_kwargs[0]["tool_choice"] == "any"
    assert (np.asarray(decode_block(image_blocks(inner.received[0][-1])[0])) == 0).all()


def test_with_structured_output_delegates_behind_the_guard(
    make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable
) -> None:
    class Caption(BaseModel):
        """A caption."""

        text: str

    call = AIMessage(content="", tool_calls=[{"name": "Caption", "args": {"text": "a cat"}, "id": "c1", "type": "tool_call"}])
    inner = ScriptedToolModel(script=[call])
    structured = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE)).with_structured_output(Caption)
    assert structured.invoke([_user(v1_block(image_paths[0]))]) == Caption(text="a cat")
    assert (np.asarray(decode_block(image_blocks(inner.received[0][-1])[0])) == 0).all()
    blocking = GuardedChatModel(model=inner, guard=make_config(ALL_UNSAFE, action="block")).with_structured_output(Caption)
    with pytest.raises(GuardAlignViolation):
        blocking.invoke([_user(v1_block(image_paths[0]))])


def test_tracing_params_and_settings_forwarding(make_config: Callable[..., Any]) -> None:
    llm = GuardedChatModel(model=RecordingChatModel(model_name="vision-x"), guard=make_config(ALL_SAFE), temperature=0.2, max_tokens=7)
    params = llm._get_ls_params(stop=["\n"])
    assert params["ls_provider"] == "fakevision" and params["ls_model_name"] == "vision-x"
    assert (params["ls_temperature"], params["ls_max_tokens"], params["ls_stop"]) == (0.2, 7, ["\n"])
    assert llm._get_ls_params(model="vision-y")["ls_model_name"] == "vision-y"
    with pytest.raises(ValueError, match="api_key: set it on the wrapped chat model"):
        GuardedChatModel(model=RecordingChatModel(), api_key="sk-test")
    with pytest.raises(ValueError, match="temperature"):
        GuardedChatModel(model=ScriptedToolModel(script=[]), temperature=0.5)
    with pytest.raises(ValueError, match="Extra inputs"):
        GuardedChatModel(model=RecordingChatModel(), tempreature=0.5)
    assert isinstance(GuardedChatModel(model=RecordingChatModel(), guard=GuardAlignGuard()).guard, GuardAlignGuard)
    flagged = GuardedChatModel(model=RecordingChatModel(), guard=make_config(ALL_SAFE), action="flag", fail_open=True)
    assert (flagged.guard.config.policy.action, flagged.guard.config.policy.fail_open) == ("flag", True)
