"""Helpers shared by the LlamaIndex integration tests: a recording chat LLM, pixel decoding, an event collector."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM
from PIL import Image

from guardalign_core.images import load_image
from guardalign_integrations.llama_index import GuardAlignDecisionEvent
from guardalign_integrations.llama_index._messages import node_image

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"

PIECES = ["The ", "image ", "shows ", "a ", "cup."]
"""What the recording LLM streams, one piece per chunk."""


def block_pixels(block: ImageBlock) -> np.ndarray:
    """Decode an image block the way the core does (for comparisons)."""
    source = node_image(block, "block").source
    return np.asarray(load_image(source))


def pixels(image: Image.Image | Path) -> np.ndarray:
    return np.asarray(load_image(image))


# -- a recording chat LLM -----------------------------------------------------------------------
class RecordingLLM(LLM):
    """A mock chat LLM (all eight endpoints) that records what it receives and streams slowly.

    ``calls`` holds ``(endpoint, messages or prompt)``; ``produced``/``finished`` track the
    stream, so a test can see whether a chunk reached it before the stream ended.
    """

    delay_s: float = 0.0
    calls: list[tuple[str, Any]] = Field(default_factory=list, exclude=True)
    produced: int = 0
    finished: bool = False

    @classmethod
    def class_name(cls) -> str:
        return "RecordingLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="recording", is_chat_model=True, context_window=32000, num_output=64)

    @property
    def last_messages(self) -> list[ChatMessage]:
        return self.calls[-1][1]

    def image_blocks(self) -> list[ImageBlock]:
        """Every image block of the last chat request."""
        return [b for m in self.last_messages for b in m.blocks if isinstance(b, ImageBlock)]

    def _message(self, text: str) -> ChatMessage:
        return ChatMessage(role="assistant", content=text)

    def _start(self) -> None:
        self.produced, self.finished = 0, False

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self.calls.append(("chat", list(messages)))
        return ChatResponse(message=self._message("".join(PIECES)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        self.calls.append(("stream_chat", list(messages)))

        def gen() -> ChatResponseGen:
            self._start()
            text = ""
            for piece in PIECES:
                text += piece
                self.produced += 1
                yield ChatResponse(message=self._message(text), delta=piece)
                time.sleep(self.delay_s)
            self.finished = True

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self.calls.append(("achat", list(messages)))
        return ChatResponse(message=self._message("".join(PIECES)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        self.calls.append(("astream_chat", list(messages)))

        async def gen() -> ChatResponseAsyncGen:
            self._start()
            text = ""
            for piece in PIECES:
                text += piece
                self.produced += 1
                yield ChatResponse(message=self._message(text), delta=piece)
                await asyncio.sleep(self.delay_s)
            self.finished = True

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.calls.append(("complete", prompt))
        return CompletionResponse(text="".join(PIECES))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        self.calls.append(("stream_complete", prompt))

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in PIECES:
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.calls.append(("acomplete", prompt))
        return CompletionResponse(text="".join(PIECES))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        self.calls.append(("astream_complete", prompt))

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            for piece in PIECES:
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()


async def call_endpoint(target: Any, name: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Call any of the eight endpoints by name; returns the response(s) as a list of chunks."""
    method = getattr(target, name)
    if name.startswith("a"):
        out = await method(*args, **kwargs)
        return [chunk async for chunk in out] if "stream" in name else [out]
    out = method(*args, **kwargs)
    return list(out) if "stream" in name else [out]


# -- instrumentation ----------------------------------------------------------------------------
class EventCollector(BaseEventHandler):
    events: list[GuardAlignDecisionEvent] = []

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignTestCollector"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, GuardAlignDecisionEvent):
            self.events.append(event)
