"""GuardAlignMiddleware in a real ``create_agent`` loop with a fake tool-calling model and one tool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("langchain.agents", reason="the agents extra (langchain>=1) is not installed")

from lc_support import ALL_SAFE, ALL_UNSAFE, b64  # noqa: E402
from guardalign_lc_fakes import ScriptedToolModel, decode_block, image_blocks  # noqa: E402
from langchain.agents import create_agent  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langchain_core.tools import BaseTool, tool  # noqa: E402

from guardalign_core.config import DEFAULT_SAFETY_INSTRUCTION  # noqa: E402
from guardalign_core.errors import GuardAlignViolation  # noqa: E402
from guardalign_integrations.langchain import DEFAULT_REFUSAL, EVENT_NAME, GuardAlignMiddleware  # noqa: E402


def _script() -> list[AIMessage]:
    call = AIMessage(content="", tool_calls=[{"name": "fetch_image", "args": {"name": "chart"}, "id": "call-1", "type": "tool_call"}])
    return [call, AIMessage(content="The image is mostly black.")]


@pytest.fixture
def fetch_image(image_paths: list[Path]) -> BaseTool:
    @tool
    def fetch_image(name: str) -> list[dict[str, Any]]:
        """Return the stored image with this name."""
        return [{"type": "image", "base64": b64(image_paths[1]), "mime_type": "image/png"}]

    return fetch_image


def _question(path: Path) -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": "Fetch the chart and compare it with this."}, {"type": "image", "base64": b64(path), "mime_type": "image/png"}])


def _all_black(block: dict[str, Any]) -> bool:
    return bool((np.asarray(decode_block(block)) == 0).all())


def test_agent_sees_sanitised_images_at_every_step(
    make_config: Callable[..., Any], image_paths: list[Path], fetch_image: BaseTool
) -> None:
    model = ScriptedToolModel(script=_script())
    agent = create_agent(model, tools=[fetch_image], system_prompt="You compare images.", middleware=[GuardAlignMiddleware(make_config(ALL_UNSAFE))])
    question = _question(image_paths[0])
    result = agent.invoke({"messages": [question]})

    assert [m.type for m in result["messages"]] == ["human", "ai", "tool", "ai"]
    assert result["messages"][0].content == question.content  # the state keeps the original
    assert len(model.received) == 2
    first, second = model.received
    assert first[0].type == "system" and first[0].content.startswith("You compare images.")
    assert DEFAULT_SAFETY_INSTRUCTION in first[0].content
    assert _all_black(image_blocks(first[1])[0])
    assert second[-1].type == "tool" and _all_black(image_blocks(second[-1])[0])  # the tool's image is checked too
    assert model.bound_kwargs[0]["tools"][0]["function"]["name"] == "fetch_image"
    decisions = result["guardalign_decisions"]
    assert [d["decision"] for d in decisions] == ["mask", "mask"]
    assert [len(d["images"]) for d in decisions] == [1, 2]


def test_safe_images_pass_unchanged(make_config: Callable[..., Any], image_paths: list[Path], fetch_image: BaseTool) -> None:
    model = ScriptedToolModel(script=_script())
    agent = create_agent(model, tools=[fetch_image], middleware=[GuardAlignMiddleware(make_config(ALL_SAFE))])
    question = _question(image_paths[0])
    result = agent.invoke({"messages": [question]})
    assert model.received[0][0].content == question.content and model.received[0][0].type == "human"
    assert [d["decision"] for d in result["guardalign_decisions"]] == ["allow", "allow"]


def test_block_ends_the_run_with_a_refusal(make_config: Callable[..., Any], image_paths: list[Path], fetch_image: BaseTool) -> None:
    model = ScriptedToolModel(script=_script())
    agent = create_agent(model, tools=[fetch_image], middleware=[GuardAlignMiddleware(make_config(ALL_UNSAFE, action="block"))])
    result = agent.invoke({"messages": [_question(image_paths[0])]})
    assert model.received == []
    last = result["messages"][-1]
    assert [m.type for m in result["messages"]] == ["human", "ai"]
    assert last.text == DEFAULT_REFUSAL and any(b["type"] == "refusal" for b in last.content_blocks)
    assert result["guardalign_decisions"][0]["decision"] == "block"


def test_block_can_raise(make_config: Callable[..., Any], image_paths: list[Path], fetch_image: BaseTool) -> None:
    model = ScriptedToolModel(script=_script())
    middleware = GuardAlignMiddleware(make_config(ALL_UNSAFE, action="block"), on_block="raise")
    agent = create_agent(model, tools=[fetch_image], middleware=[middleware])
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.content\[1\]"):
        agent.invoke({"messages": [_question(image_paths[0])]})
    with pytest.raises(ValueError, match="on_block"):
        GuardAlignMiddleware(on_block="ignore")  # type: ignore[arg-type]
    assert GuardAlignMiddleware(make_config(ALL_SAFE), action="block").guard.config.policy.action == "block"


async def test_async_agent_dispatches_decision_events(
    make_config: Callable[..., Any], image_paths: list[Path], fetch_image: BaseTool
) -> None:
    model = ScriptedToolModel(script=_script())
    agent = create_agent(model, tools=[fetch_image], middleware=[GuardAlignMiddleware(make_config(ALL_UNSAFE))])
    events = [e async for e in agent.astream_events({"messages": [_question(image_paths[0])]}, version="v2")]
    decisions = [e["data"] for e in events if e["event"] == "on_custom_event" and e["name"] == EVENT_NAME]
    assert [d["decision"] for d in decisions] == ["mask", "mask"]
    assert _all_black(image_blocks(model.received[0][-1])[0])


def test_text_only_agent_never_loads_clip(make_config: Callable[..., Any], fetch_image: BaseTool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("guardalign_core.detector.get_clip_encoder", lambda *a, **k: pytest.fail("CLIP loaded"))
    middleware = GuardAlignMiddleware(make_config(ALL_UNSAFE))
    agent = create_agent(ScriptedToolModel(script=[AIMessage(content="hi")]), tools=[fetch_image], middleware=[middleware])
    result = agent.invoke({"messages": [HumanMessage(content="hello")]})
    assert result["guardalign_decisions"][0]["images"] == []
    assert not middleware.guard.engine.detector_loaded


def test_guarded_chat_model_as_agent_model_streams_tokens_once(make_config: Callable[..., Any], fetch_image: BaseTool) -> None:
    from guardalign_lc_fakes import RecordingChatModel

    from guardalign_integrations.langchain import GuardedChatModel

    call = AIMessage(content="", tool_calls=[{"name": "fetch_image", "args": {"name": "x"}, "id": "c1", "type": "tool_call"}])
    tools_agent = create_agent(GuardedChatModel(model=ScriptedToolModel(script=[call, AIMessage("done")]), guard=make_config(ALL_SAFE)), tools=[fetch_image])
    assert [m.type for m in tools_agent.invoke({"messages": [HumanMessage("hi")]})["messages"]] == ["human", "ai", "tool", "ai"]

    streaming = create_agent(GuardedChatModel(model=RecordingChatModel(reply="one two three"), guard=make_config(ALL_SAFE)), tools=[])
    tokens = [m.content for m, _ in streaming.stream({"messages": [HumanMessage("hi")]}, stream_mode="messages") if m.type == "AIMessageChunk"]
    assert "".join(tokens) == "one two three"  # the wrapped model's own run is not streamed a second time
