"""The legacy MultiModalLLM path: GuardAlignMultiModalLLM and SimpleMultiModalQueryEngine."""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ImageBlock,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.multi_modal_llms.base import MultiModalLLM, MultiModalLLMMetadata
from llama_index.core.schema import ImageNode, TextNode

from guardalign_integrations.llama_index import GuardAlignMultiModalLLM
from guardalign_integrations.llama_index._messages import node_image

from llamaindex_support import PIECES, RecordingLLM, block_pixels, call_endpoint, pixels

ENDPOINTS = ["complete", "stream_complete", "acomplete", "astream_complete"]
CHAT_ENDPOINTS = ["chat", "stream_chat", "achat", "astream_chat"]


class RecordingMultiModalLLM(MultiModalLLM):
    """A legacy multimodal model recording ``(endpoint, prompt, image_documents)``."""

    calls: list[tuple[str, Any, Any]] = Field(default_factory=list, exclude=True)
    rate_limiter: Any = None

    @property
    def metadata(self) -> MultiModalLLMMetadata:
        return MultiModalLLMMetadata(model_name="legacy-recorder", num_output=32)

    def to_payload(self) -> dict[str, Any]:  # read by the callback decorators MultiModalLLM adds
        return self.metadata.model_dump()

    def complete(self, prompt: str, image_documents: list, **kwargs: Any) -> CompletionResponse:
        self.calls.append(("complete", prompt, image_documents))
        return CompletionResponse(text="".join(PIECES))

    def stream_complete(self, prompt: str, image_documents: list, **kwargs: Any):
        self.calls.append(("stream_complete", prompt, image_documents))
        return (CompletionResponse(text="".join(PIECES[: i + 1]), delta=p) for i, p in enumerate(PIECES))

    async def acomplete(self, prompt: str, image_documents: list, **kwargs: Any) -> CompletionResponse:
        self.calls.append(("acomplete", prompt, image_documents))
        return CompletionResponse(text="".join(PIECES))

    async def astream_complete(self, prompt: str, image_documents: list, **kwargs: Any):
        self.calls.append(("astream_complete", prompt, image_documents))

        async def gen():
            for i, p in enumerate(PIECES):
                yield CompletionResponse(text="".join(PIECES[: i + 1]), delta=p)

        return gen()

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self.calls.append(("chat", list(messages), None))
        return ChatResponse(message=ChatMessage(role="assistant", content="".join(PIECES)))

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any):
        self.calls.append(("stream_chat", list(messages), None))
        return iter([ChatResponse(message=ChatMessage(role="assistant", content="".join(PIECES)), delta="".join(PIECES))])

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages)

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any):
        async def gen():
            for chunk in self.stream_chat(messages):
                yield chunk

        return gen()


def documents(benign_path: Path, figstep_path: Path) -> list:
    return [
        ImageNode(image=base64.b64encode(benign_path.read_bytes()).decode(), id_="cat"),
        ImageBlock(path=figstep_path),
    ]


def test_metadata_and_name(make_config):
    mm = GuardAlignMultiModalLLM(RecordingLLM(), make_config(-1.0))
    assert "multi" in mm.class_name()  # MultiModalVectorStoreIndex warns otherwise
    assert mm.metadata.is_chat_model and mm.metadata.model_name == "recording"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_legacy_inner_gets_sanitised_documents_of_same_type(endpoint, make_config, benign_path, figstep_path):
    inner = RecordingMultiModalLLM()
    mm = GuardAlignMultiModalLLM(inner, make_config(100.0))
    chunks = await call_endpoint(mm, endpoint, "Describe.", documents(benign_path, figstep_path))

    name, prompt, sent = inner.calls[-1]
    assert name == endpoint and prompt.endswith("Describe.") and "As an AI assistant" in prompt  # when_unsafe
    assert isinstance(sent[0], ImageNode) and isinstance(sent[1], ImageBlock)
    assert sent[0].node_id == "cat" and sent[0].image_mimetype == "image/png"
    for doc in sent:
        assert np.count_nonzero(pixels(node_image(doc, "doc").source)) == 0  # threshold 100: fully masked
    assert chunks[-1].text == "".join(PIECES)
    assert chunks[-1].additional_kwargs["guardalign"]["decision"] == "mask"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_chat_inner_gets_one_user_message(
    endpoint, make_config, benign_path, figstep_path, partial_threshold, expected_pixels
):
    inner = RecordingLLM()
    mm = GuardAlignMultiModalLLM(inner, make_config(partial_threshold))
    chunks = await call_endpoint(mm, endpoint, "Describe.", documents(benign_path, figstep_path))

    assert inner.calls[-1][0] == endpoint.replace("complete", "chat")
    user = inner.last_messages[-1]
    assert isinstance(user.blocks[-1], TextBlock) and user.blocks[-1].text == "Describe."
    got = [block_pixels(b) for b in inner.image_blocks()]
    assert np.array_equal(got[0], expected_pixels(benign_path, partial_threshold))
    assert np.array_equal(got[1], expected_pixels(figstep_path, partial_threshold))
    assert chunks[-1].text == "".join(PIECES)
    if "stream" in endpoint:
        assert [c.delta for c in chunks] == PIECES


@pytest.mark.parametrize("endpoint", CHAT_ENDPOINTS)
async def test_chat_endpoints(endpoint, make_config, benign_path):
    inner = RecordingLLM()
    mm = GuardAlignMultiModalLLM(inner, make_config(100.0))
    message = ChatMessage(role="user", blocks=[ImageBlock(path=benign_path), TextBlock(text="Describe.")])
    chunks = await call_endpoint(mm, endpoint, [message])
    assert np.count_nonzero(block_pixels(inner.image_blocks()[0])) == 0
    assert chunks[-1].additional_kwargs["guardalign"]["decision"] == "mask"


async def test_blocked_documents_refuse(make_config, benign_path, figstep_path):
    inner = RecordingMultiModalLLM()
    mm = GuardAlignMultiModalLLM(inner, make_config(100.0, action="block"))
    response = await mm.acomplete("Describe.", documents(benign_path, figstep_path))
    assert inner.calls == [] and response.additional_kwargs["guardalign"]["decision"] == "block"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_simple_multimodal_query_engine(use_async, make_config, benign_path, figstep_path, partial_threshold, expected_pixels):
    from llama_index.core.query_engine import SimpleMultiModalQueryEngine

    nodes = [
        TextNode(text="Cats sleep a lot.", id_="text"),
        ImageNode(image_path=str(benign_path), text="A cat.", id_="cat"),
        ImageNode(image_path=str(figstep_path), text="A list.", id_="list"),
    ]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    inner = RecordingLLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        engine = SimpleMultiModalQueryEngine(
            index.as_retriever(similarity_top_k=10), multi_modal_llm=GuardAlignMultiModalLLM(inner, make_config(partial_threshold))
        )
    response = await engine.aquery("What is shown?") if use_async else engine.query("What is shown?")

    assert str(response) == "".join(PIECES)
    received = {(a.shape, a.tobytes()) for a in (block_pixels(b) for b in inner.image_blocks())}
    want = {(a.shape, a.tobytes()) for a in (expected_pixels(p, partial_threshold) for p in (benign_path, figstep_path))}
    assert received == want


@pytest.mark.parametrize("inner", ["legacy", "chat"])
def test_documents_with_a_url_beside_forward_only_the_checked_bytes(inner, make_config, benign_path):
    """An ``ImageNode``/``ImageBlock`` with a path and an (unchecked) URL: only the checked bytes go on, every turn."""
    evil = "https://evil.example/harmful.png"
    model = RecordingMultiModalLLM() if inner == "legacy" else RecordingLLM()
    mm = GuardAlignMultiModalLLM(model, make_config(-1.0))
    documents = [ImageNode(image_path=str(benign_path), image_url=evil, id_="n"), ImageBlock(path=benign_path, url=evil)]
    for turn in ("fresh", "reused"):
        response = mm.complete("What is shown?", documents)
        assert [r["reason"].endswith("(reused)") for r in response.additional_kwargs["guardalign"]["images"]] == [turn == "reused"] * 2
        if inner == "legacy":
            node, block = model.calls[-1][2]
            assert isinstance(node, ImageNode) and node.image_url is None and node.image_path is None, turn
            assert base64.b64decode(node.image) == benign_path.read_bytes(), turn
        else:
            node, block = model.image_blocks()
            assert node.url is None and node.path is None and node.resolve_image().read() == benign_path.read_bytes(), turn
        assert isinstance(block, ImageBlock) and block.url is None and block.path is None, turn
        assert block.resolve_image().read() == benign_path.read_bytes(), turn
