"""Multimodal RAG: RetrieverQueryEngine(multimodal=True) with the image postprocessor and the guarded LLM."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, MetadataMode, NodeWithScore, QueryBundle, TextNode

from guardalign_integrations.llama_index import GuardAlignImagePostprocessor, GuardAlignLLM

from llamaindex_support import PIECES, RecordingLLM, block_pixels, pixels

QUESTION = "What do the pictures show?"


@pytest.fixture
def index(benign_path: Path, figstep_path: Path) -> VectorStoreIndex:
    """Two text nodes and two image nodes (one inline base64, one by path); every embedding is equal."""
    nodes = [
        TextNode(text="Cats sleep for most of the day.", id_="text-cats"),
        ImageNode(image=base64.b64encode(benign_path.read_bytes()).decode(), text="A photo of a cat.", id_="image-cat"),
        ImageNode(image_path=str(figstep_path), text="A typographic list.", id_="image-list"),
        TextNode(text="Numbered lists have items.", id_="text-lists"),
    ]
    return VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))


def pixel_set(arrays: list[np.ndarray]) -> set[tuple[tuple[int, ...], bytes]]:
    return {(a.shape, a.tobytes()) for a in arrays}


async def run_query(engine: RetrieverQueryEngine, streaming: bool, use_async: bool) -> str:
    if use_async:
        response = await engine.aquery(QUESTION)
        return "".join([t async for t in response.async_response_gen()]) if streaming else str(response)
    response = engine.query(QUESTION)
    return "".join(response.response_gen) if streaming else str(response)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
async def test_postprocessor_and_guarded_llm_in_query_engine(
    streaming, use_async, index, make_config, partial_threshold, expected_pixels, benign_path, figstep_path, decision_events
):
    inner = RecordingLLM()
    screen = GuardAlignImagePostprocessor(make_config(partial_threshold))
    llm = GuardAlignLLM(inner, make_config(-1.0))  # already screened: the LLM guard passes them on
    engine = RetrieverQueryEngine.from_args(
        index.as_retriever(similarity_top_k=10), llm=llm, node_postprocessors=[screen], multimodal=True, streaming=streaming
    )

    answer = await run_query(engine, streaming, use_async)

    assert answer == "".join(PIECES)
    assert inner.calls[-1][0] == ("a" if use_async else "") + ("stream_chat" if streaming else "chat")
    received = [block_pixels(b) for b in inner.image_blocks()]
    want = [expected_pixels(benign_path, partial_threshold), expected_pixels(figstep_path, partial_threshold)]
    assert pixel_set(received) == pixel_set(want)
    assert pixel_set(want) != pixel_set([pixels(benign_path), pixels(figstep_path)])  # something was masked
    prompt_text = "\n".join(m.content or "" for m in inner.last_messages)
    assert "guardalign" not in prompt_text and "Cats sleep" in prompt_text
    postprocessor_events = [e for e in decision_events if e.component == "postprocessor"]
    assert sorted(e.node_id for e in postprocessor_events) == ["image-cat", "image-list"]


async def test_guarded_llm_masks_without_postprocessor(index, make_config, partial_threshold, expected_pixels, benign_path, figstep_path):
    inner = RecordingLLM()
    llm = GuardAlignLLM(inner, make_config(partial_threshold))
    engine = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=10), llm=llm, multimodal=True)
    await engine.aquery(QUESTION)
    received = [block_pixels(b) for b in inner.image_blocks()]
    want = [expected_pixels(benign_path, partial_threshold), expected_pixels(figstep_path, partial_threshold)]
    assert pixel_set(received) == pixel_set(want)


def test_one_batched_scan_and_metadata_on_every_node(index, make_config, partial_threshold, monkeypatch):
    screen = GuardAlignImagePostprocessor(make_config(partial_threshold))
    calls: list[int] = []
    scan = screen.guard.detector.scan

    def counting_scan(images, **kwargs):
        calls.append(len(images))
        return scan(images, **kwargs)

    monkeypatch.setattr(screen.guard.detector, "scan", counting_scan)
    retrieved = index.as_retriever(similarity_top_k=10).retrieve(QUESTION)
    out = screen.postprocess_nodes(retrieved, query_bundle=QueryBundle(QUESTION))

    assert calls == [2]  # one call for both image nodes
    assert [n.node.node_id for n in out] == [n.node.node_id for n in retrieved]
    assert [n.score for n in out] == [n.score for n in retrieved]
    decisions = {n.node.node_id: n.node.metadata["guardalign"] for n in out}
    assert decisions["text-cats"]["decision"] == "allow" and decisions["text-cats"]["reason"] == "no image in node"
    assert {decisions["image-cat"]["decision"], decisions["image-list"]["decision"]} <= {"allow", "mask"}
    assert decisions["image-list"]["source"] == "query_ForbidQI_1_1_6.png"
    for n in out:
        assert "guardalign" in n.node.excluded_llm_metadata_keys and "guardalign" in n.node.excluded_embed_metadata_keys
        assert "guardalign" not in n.node.get_content(metadata_mode=MetadataMode.LLM)


def test_masked_node_is_a_copy_with_png_and_no_original_path(index, make_config, figstep_path):
    screen = GuardAlignImagePostprocessor(make_config(100.0))
    out = screen.postprocess_nodes(index.as_retriever(similarity_top_k=10).retrieve(QUESTION))
    masked = next(n.node for n in out if n.node.node_id == "image-list")
    assert isinstance(masked, ImageNode)
    assert masked.image_path is None and masked.image_url is None and masked.image_mimetype == "image/png"
    assert masked.metadata["guardalign"]["decision"] == "mask"
    assert np.count_nonzero(pixels(base64.b64decode(masked.image))) == 0
    stored = index.docstore.get_node("image-list")
    assert stored.image_path == str(figstep_path) and "guardalign" not in stored.metadata  # index untouched


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_block_policy_drops_unsafe_image_nodes(use_async, index, make_config):
    screen = GuardAlignImagePostprocessor(make_config(100.0), action="block")
    retrieved = index.as_retriever(similarity_top_k=10).retrieve(QUESTION)
    out = await screen.apostprocess_nodes(retrieved) if use_async else screen.postprocess_nodes(retrieved)
    assert sorted(n.node.node_id for n in out) == ["text-cats", "text-lists"]


def test_undecodable_and_remote_images_fail_closed(make_config, decision_events):
    nodes = [
        NodeWithScore(node=ImageNode(image=base64.b64encode(b"not an image").decode(), id_="broken"), score=1.0),
        NodeWithScore(node=ImageNode(image_url="https://example.invalid/x.png", id_="remote"), score=0.9),
        NodeWithScore(node=TextNode(text="kept", id_="text"), score=0.8),
    ]
    out = GuardAlignImagePostprocessor(make_config(-1.0)).postprocess_nodes(nodes)
    assert [n.node.node_id for n in out] == ["text"]
    errors = {e.node_id: e.result["error"] for e in decision_events}
    assert "not an image format" in errors["broken"] and "remote URLs are not fetched" in errors["remote"]

    opened = GuardAlignImagePostprocessor(make_config(-1.0), fail_open=True).postprocess_nodes(nodes)
    assert [n.node.node_id for n in opened] == ["broken", "remote", "text"]
    assert [n.node.metadata["guardalign"]["status"] for n in opened] == ["error", "error", "ok"]
    assert opened[0].node.image == nodes[0].node.image  # forwarded unchanged


def test_allowed_url_image_is_inlined(make_config, benign_path):
    """A checked URL image is forwarded as the checked pixels, so nothing fetches it again."""
    data_url = "data:image/png;base64," + base64.b64encode(benign_path.read_bytes()).decode()
    node = NodeWithScore(node=ImageNode(image_url=data_url, id_="url"), score=1.0)
    (out,) = GuardAlignImagePostprocessor(make_config(-1.0)).postprocess_nodes([node])
    assert out.node.image_url is None and out.node.metadata["guardalign"]["decision"] == "allow"
    assert np.array_equal(pixels(base64.b64decode(out.node.image)), pixels(benign_path))


async def test_text_only_retrieval_loads_nothing(make_config):
    screen = GuardAlignImagePostprocessor(make_config(-1.0), annotate_text_nodes=False)
    nodes = [NodeWithScore(node=TextNode(text="only text", id_="t"), score=1.0)]
    out = await screen.apostprocess_nodes(nodes)
    assert out[0].node is nodes[0].node and not screen.guard.detector_loaded


async def test_shared_guard_does_not_rescan_postprocessor_output(
    index, make_config, partial_threshold, expected_pixels, benign_path, figstep_path, monkeypatch, decision_events
):
    """A guarded LLM behind the postprocessor forwards the images that guard already sanitised, unchanged."""
    screen = GuardAlignImagePostprocessor(make_config(partial_threshold))
    inner = RecordingLLM()
    llm = GuardAlignLLM(inner, guard=screen.guard)
    scans: list[int] = []
    scan = screen.guard.detector.scan
    monkeypatch.setattr(screen.guard.detector, "scan", lambda images, **kw: scans.append(len(images)) or scan(images, **kw))
    engine = RetrieverQueryEngine.from_args(
        index.as_retriever(similarity_top_k=10), llm=llm, node_postprocessors=[screen], multimodal=True
    )
    await engine.aquery(QUESTION)

    assert scans == [2]  # the postprocessor's batch; the LLM scanned nothing
    received = [block_pixels(b) for b in inner.image_blocks()]
    want = [expected_pixels(benign_path, partial_threshold), expected_pixels(figstep_path, partial_threshold)]
    assert pixel_set(received) == pixel_set(want)  # not masked a second time
    llm_events = [e for e in decision_events if e.component == "llm"]
    assert len(llm_events) == 2 and all(e.status == "ok" for e in llm_events)
