"""Fake chat models for the LangChain tests: they record what they receive and never touch a network.

The module name is unique on purpose: the test tree has no ``__init__.py`` files, so test
helpers are imported by basename.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image
from pydantic import Field


def _tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


def _usage(messages: Sequence[BaseMessage], output_tokens: int) -> UsageMetadata:
    """A made-up but consistent token count: 1 per 4 characters of text, 85 per image."""
    chars = sum(len(m.text) for m in messages)
    images = sum(1 for m in messages for b in m.content_blocks if b.get("type") == "image")
    input_tokens = chars // 4 + 1 + 85 * images
    return UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens)


class RecordingChatModel(BaseChatModel):
    """A fake vision chat model: records every request, answers a fixed text, streams word by word."""

    reply: str = "A calm and helpful answer about the request."
    """The answer (cut at the first stop sequence)."""

    model_name: str = "fake-vision-1"
    """Reported as ``response_metadata['model_name']``; a call's ``model=`` kwarg overrides it."""

    temperature: float | None = None
    """Accepted and reported in tracing params (no effect)."""

    max_tokens: int | None = None
    """Accepted and reported in tracing params (no effect)."""

    delay_s: float = 0.0
    """Pause between streamed chunks."""

    received: list[list[BaseMessage]] = Field(default_factory=list)
    """Every request, in arrival order."""

    produced_at: list[float] = Field(default_factory=list)
    """``time.perf_counter()`` when each streamed chunk was produced."""

    @property
    def _llm_type(self) -> str:
        return "recording-fake"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="fakevision", ls_model_name=kwargs.get("model", self.model_name), ls_model_type="chat"
        )
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop:
            params["ls_stop"] = stop
        return params

    def _answer(self, stop: list[str] | None) -> str:
        text = self.reply
        for s in stop or []:
            if s and s in text:
                text = text[: text.index(s)] or text
        return text

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.received.append(list(messages))
        text = self._answer(stop)
        message = AIMessage(
            content=text,
            usage_metadata=_usage(messages, len(_tokens(text))),
            response_metadata={"model_name": kwargs.get("model", self.model_name)},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> list[AIMessageChunk]:
        self.received.append(list(messages))
        tokens = _tokens(self._answer(stop))
        chunks = []
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            chunks.append(
                AIMessageChunk(
                    content=token,
                    chunk_position="last" if last else None,
                    usage_metadata=_usage(messages, len(tokens)) if last else None,
                    response_metadata={"model_name": kwargs.get("model", self.model_name)} if last else {},
                )
            )
        return chunks

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for i, chunk in enumerate(self._chunks(messages, stop, kwargs)):
            if i and self.delay_s:
                time.sleep(self.delay_s)
            self.produced_at.append(time.perf_counter())
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for i, chunk in enumerate(self._chunks(messages, stop, kwargs)):
            if i and self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.produced_at.append(time.perf_counter())
            yield ChatGenerationChunk(message=chunk)


class ScriptedToolModel(BaseChatModel):
    """A fake tool-calling model: answers with the scripted messages in turn, records requests and bound tools."""

    script: list[AIMessage]
    """Answers, in order (the last one repeats)."""

    received: list[list[BaseMessage]] = Field(default_factory=list)
    """Every request, in arrival order."""

    bound_kwargs: list[dict[str, Any]] = Field(default_factory=list)
    """The call kwargs of every request (e.g. the formatted tools)."""

    max_tokens: int | None = None
    """Accepted (no effect)."""

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-fake"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider="fakescript", ls_model_name=kwargs.get("model", "fake-tools-1"), ls_model_type="chat")

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.received.append(list(messages))
        self.bound_kwargs.append(dict(kwargs))
        answer = self.script[min(len(self.received), len(self.script)) - 1]
        return ChatResult(generations=[ChatGeneration(message=answer.model_copy(deep=True))])


def image_blocks(message: BaseMessage) -> list[dict[str, Any]]:
    """The v1 image blocks of a message."""
    return [dict(b) for b in message.content_blocks if b.get("type") == "image"]


def decode_block(block: dict[str, Any]) -> Image.Image:
    """The RGB image of a v1 base64 block (or a data-URL block)."""
    data = block.get("base64")
    if data is None:
        data = block["url"].split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
