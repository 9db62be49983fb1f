"""Multimodal RAG in LlamaIndex with GuardAlign screening every image before the model sees it.

    python examples/llamaindex_multimodal_rag.py

Offline by default: a tiny random-weight CLIP built on the spot (its scores mean NOTHING;
τ is set so that a few patches get masked, to show the mechanics) and a small local chat
model that just describes what it received. With ``OPENAI_API_KEY`` set and
``llama-index-llms-openai`` installed, a real ``gpt-4o-mini`` answers instead. Set
``GUARDALIGN_CONFIG`` to a preset name (e.g. ``fast-cpu``) or a calibrated config file to
use a real CLIP (its weights must be available locally or downloadable).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from llama_index.core import VectorStoreIndex
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
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, TextNode
import numpy as np
from PIL import Image, ImageDraw

from guardalign_core.config import GuardConfig
from guardalign_integrations.llama_index import (
    GuardAlignDecisionEvent,
    GuardAlignImagePostprocessor,
    GuardAlignLLM,
)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class DescribeImagesLLM(LLM):
    """A stand-in vision model: says how many images it got and how much of each is black."""

    @property
    def metadata(self) -> LLMMetadata:
        # A large window: LlamaIndex budgets ~2k tokens per image, so all chunks fit one call.
        return LLMMetadata(model_name="describe-images", is_chat_model=True, context_window=128_000)

    def _answer(self, messages: Sequence[ChatMessage]) -> str:
        blocks = [b for m in messages for b in m.blocks if isinstance(b, ImageBlock)]
        parts = []
        for block in blocks:
            gray = np.asarray(Image.open(block.resolve_image()).convert("L"))
            parts.append(f"{gray.shape[1]}x{gray.shape[0]} ({np.mean(gray == 0):.0%} black)")
        return f"I received {len(blocks)} image(s): " + ", ".join(parts) + "."

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", content=self._answer(messages)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            text = ""
            for word in self._answer(messages).split(" "):
                text += word + " "
                yield ChatResponse(message=ChatMessage(role="assistant", content=text), delta=word + " ")

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            for chunk in self.stream_chat(messages, **kwargs):
                yield chunk

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="(no images in a completion)")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return iter([self.complete(prompt)])

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self.complete(prompt)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            yield self.complete(prompt)

        return gen()


class PrintDecisions(BaseEventHandler):
    """Prints every GuardAlign decision event (LlamaIndex instrumentation)."""

    @classmethod
    def class_name(cls) -> str:
        return "PrintDecisions"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, GuardAlignDecisionEvent):
            print(f"  [event] {event.component}: {event.source} -> {event.decision} ({event.reason})")


def build_chat_model() -> LLM:
    """gpt-4o-mini when a key and the package are there; the local stand-in otherwise."""
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from llama_index.llms.openai import OpenAI  # type: ignore[import-not-found]

            print("Answering with OpenAI gpt-4o-mini.")
            return OpenAI(model="gpt-4o-mini")
        except ImportError:
            print("OPENAI_API_KEY is set but llama-index-llms-openai is not installed; using the local stand-in.")
    return DescribeImagesLLM()


def build_config(workdir: Path) -> GuardConfig | str:
    """$GUARDALIGN_CONFIG (a preset or file), else a tiny random CLIP with a demo threshold."""
    if os.environ.get("GUARDALIGN_CONFIG"):
        return os.environ["GUARDALIGN_CONFIG"]
    from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config

    print("Using a tiny random-weight CLIP: its scores mean nothing; τ=1.2 just makes some patches masked.")
    checkpoint = save_tiny_clip_checkpoint(workdir / "tiny-clip.pt")
    return GuardConfig(detector=tiny_detector_config(checkpoint, threshold=1.2, cache_dir=str(workdir / "cache")))


def build_nodes(workdir: Path) -> list[TextNode]:
    """Text nodes plus image nodes: the shared test images when present, a drawn one otherwise."""
    nodes: list[TextNode] = [
        TextNode(text="Our office cat, Chelsea, sleeps most of the day.", id_="doc-cat"),
        TextNode(text="Typographic images can hide instructions inside a picture.", id_="doc-typo"),
    ]
    cat = SHARED / "benign" / "chelsea.png"
    figstep = SHARED / "figstep-tiny" / "query_ForbidQI_1_1_6.png"
    if cat.is_file() and figstep.is_file():
        # Images from message content or an index are untrusted: the guard reads no local file unless
        # ImageLimits(allow_local_files=True) says so. Here the index stores the bytes themselves.
        cat_bytes = base64.b64encode(cat.read_bytes()).decode("ascii")
        nodes.append(ImageNode(image=cat_bytes, image_mimetype="image/png", text="A photo of the office cat.", id_="img-cat"))
        encoded = base64.b64encode(figstep.read_bytes()).decode("ascii")
        nodes.append(ImageNode(image=encoded, text="A typographic list.", id_="img-list"))
        return nodes
    drawn = Image.new("RGB", (384, 384), "white")
    ImageDraw.Draw(drawn).text((16, 16), "Steps to do something harmful:\n1.\n2.\n3.", fill="black")
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    nodes.append(ImageNode(image=base64.b64encode(buffer.getvalue()).decode("ascii"), text="A list.", id_="img-list"))
    return nodes


def main() -> dict[str, Any]:
    """Build the index, screen retrieved images, stream an answer; returns the node decisions."""
    handler = PrintDecisions()
    get_dispatcher().add_event_handler(handler)
    try:
        with tempfile.TemporaryDirectory(prefix="guardalign-llamaindex-") as tmp:
            workdir = Path(tmp)
            config = build_config(workdir)
            screen = GuardAlignImagePostprocessor(config)  # one batched scan per query
            llm = GuardAlignLLM(build_chat_model(), config)  # same config: it recognises the screened images, never masks twice
            index = VectorStoreIndex(build_nodes(workdir), embed_model=MockEmbedding(embed_dim=8))
            engine = RetrieverQueryEngine.from_args(
                index.as_retriever(similarity_top_k=10),
                llm=llm,
                node_postprocessors=[screen],
                multimodal=True,
                streaming=True,
            )
            print("\nQuery: What do the retrieved pictures show?")
            response = engine.query("What do the retrieved pictures show?")
            print("Answer: ", end="")
            for token in response.response_gen:
                print(token, end="", flush=True)
            print("\n\nPer-node decisions (node.metadata['guardalign'], hidden from prompts):")
            decisions = {}
            for scored in response.source_nodes:
                record = scored.node.metadata["guardalign"]
                decisions[scored.node.node_id] = record["decision"]
                print(f"  {scored.node.node_id}: {record['decision']} - {record['reason']}")
            return decisions
    finally:
        get_dispatcher().event_handlers.remove(handler)


if __name__ == "__main__":
    main()
