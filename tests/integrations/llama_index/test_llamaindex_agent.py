"""FunctionAgent with GuardAlignLLM around a mock function-calling LLM: calls a tool and finishes."""

from __future__ import annotations

import numpy as np
import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.llms.mock import MockFunctionCallingLLMWithChatMemoryOfLastCall
from llama_index.core.tools import FunctionTool

from guardalign_integrations.llama_index import GuardAlignFunctionCallingLLM, GuardAlignLLM

from llamaindex_support import block_pixels

# The workflow engine inspects pydantic models with inspect.getmembers (LlamaIndex's own noise).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect")


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "whole"])
async def test_function_agent_calls_tool_and_finishes(streaming, make_config, figstep_path, decision_events):
    calls: list[str] = []

    def describe_policy(topic: str = "images") -> str:
        """Describe the content policy for a topic."""
        calls.append(topic)
        return f"policy for {topic}"

    inner = MockFunctionCallingLLMWithChatMemoryOfLastCall()
    llm = GuardAlignLLM(inner, make_config(100.0))
    assert isinstance(llm, GuardAlignFunctionCallingLLM)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=describe_policy)], llm=llm, streaming=streaming)

    question = ChatMessage(role="user", blocks=[ImageBlock(path=figstep_path), TextBlock(text="What does this say?")])
    result = await agent.run(user_msg=question)

    assert calls == ["images"]
    assert [t.tool_name for t in result.tool_calls] == ["describe_policy"]
    assert str(result.response.content) == "Tool calls complete."
    images = [b for m in inner.last_chat_messages for b in m.blocks if isinstance(b, ImageBlock)]
    assert images and all(np.count_nonzero(block_pixels(b)) == 0 for b in images)  # masked on every step
    assert {e.decision for e in decision_events} == {"mask"}
