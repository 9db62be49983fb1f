"""Screening at ingestion: GuardAlignImageTransform in a real IngestionPipeline, and the postprocessor downstream."""

from __future__ import annotations

import base64
import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.ingestion import IngestionCache, IngestionPipeline
from llama_index.core.schema import Document, ImageDocument, ImageNode, MediaResource, MetadataMode, Node, NodeWithScore, TextNode

from guardalign_core.config import GuardConfig
from guardalign_core.guard import ImageGuard
from guardalign_core.images import ImageLimits
from guardalign_core.memory import CheckedImageMemory, config_fingerprint
from guardalign_core.screening import ContentImage, sniff_mime
from guardalign_integrations.llama_index import GuardAlignImagePostprocessor, GuardAlignImageTransform

from llamaindex_support import DATA_DIR, pixels

CAT_TEXT = "Cats sleep for most of the day."


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def count_scans(guard: ImageGuard, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every detector call of ``guard``."""
    calls: list[int] = []
    scan = guard.detector.scan

    def counting(images: Any, **kwargs: Any) -> Any:
        calls.append(len(images))
        return scan(images, **kwargs)

    monkeypatch.setattr(guard.detector, "scan", counting)
    return calls


def query_guard(config: GuardConfig) -> ImageGuard:
    """A guard with its own memory: what a query-time process (which never saw the ingestion) holds."""
    return ImageGuard(config, memory=CheckedImageMemory())


def image_bytes(node: Any) -> bytes:
    assert isinstance(node, ImageNode) and node.image is not None
    return base64.b64decode(node.image)


@pytest.fixture
def documents(benign_path: Path, figstep_path: Path) -> list[Any]:
    """A text document, an image document by path and one inline (ids fixed)."""
    return [
        Document(text=CAT_TEXT, id_="text-cats"),
        ImageDocument(image_path=str(benign_path), text="A photo of a cat.", id_="image-cat", metadata={"file_name": "chelsea.png"}),
        ImageDocument(image=b64(figstep_path), text="A typographic list.", id_="image-list"),
    ]


def by_id(nodes: list[Any]) -> dict[str, Any]:
    return {n.node_id: n for n in nodes}


# -- the transform in a pipeline ---------------------------------------------------------------
def test_pipeline_masks_images_and_passes_text_untouched(documents, make_config, partial_threshold, expected_pixels, benign_path, figstep_path, decision_events):
    config = make_config(partial_threshold)
    transform = GuardAlignImageTransform(config)
    nodes = by_id(IngestionPipeline(transformations=[transform]).run(documents=documents))

    assert sorted(nodes) == ["image-cat", "image-list", "text-cats"]
    text = nodes["text-cats"]
    assert text.text == CAT_TEXT and "guardalign" not in text.metadata
    reference = query_guard(config).screen([ContentImage("a", source=benign_path.read_bytes()), ContentImage("b", source=figstep_path.read_bytes())])
    for node_id, path, entry in (("image-cat", benign_path, reference.images[0]), ("image-list", figstep_path, reference.images[1])):
        node = nodes[node_id]
        assert isinstance(node, ImageNode) and node.image_path is None and node.image_url is None
        data = image_bytes(node)
        assert data == entry.data  # exactly the bytes the core's screening step forwards
        assert node.image_mimetype == sniff_mime(data)
        assert np.array_equal(pixels_of(data), expected_pixels(path, partial_threshold))
        stamp = node.metadata["guardalign"]
        assert stamp["decision"] == entry.result.decision.value and stamp["fingerprint"] == config_fingerprint(config, transform.guard.detector)
        assert stamp["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert nodes["image-cat"].metadata["guardalign"]["decision"] == "mask"  # the threshold masks part of the cat photo
    assert not np.array_equal(pixels_of(image_bytes(nodes["image-cat"])), pixels(benign_path))
    assert nodes["image-cat"].text == "A photo of a cat." and nodes["image-cat"].metadata["file_name"] == "chelsea.png"
    assert nodes["image-cat"].ref_doc_id == "image-cat"  # the document it came from, as LlamaIndex's parsers record
    assert sorted(e.node_id for e in decision_events if e.component == "ingestion") == ["image-cat", "image-list"]


def pixels_of(data: bytes) -> np.ndarray:
    from guardalign_core.images import load_image

    return np.asarray(load_image(data))


def test_verdict_is_hidden_from_embedding_and_llm_text(documents, make_config):
    nodes = by_id(IngestionPipeline(transformations=[GuardAlignImageTransform(make_config(100.0))]).run(documents=documents))
    for node_id in ("image-cat", "image-list"):
        node = nodes[node_id]
        assert node.metadata["guardalign"]["decision"] == "mask"  # recorded ...
        for mode in (MetadataMode.EMBED, MetadataMode.LLM):  # ... but never embedded or prompted
            content = node.get_content(metadata_mode=mode)
            assert "guardalign" not in content and "fingerprint" not in content and "mask" not in content
    assert "file_name: chelsea.png" in nodes["image-cat"].get_content(metadata_mode=MetadataMode.EMBED)  # the user's metadata still is


def test_block_drops_unsafe_image_nodes_with_log_and_event(documents, make_config, decision_events, caplog):
    caplog.set_level(logging.INFO, logger="guardalign_integrations.llama_index.ingestion")
    transform = GuardAlignImageTransform(make_config(100.0), action="block")
    nodes = IngestionPipeline(transformations=[transform]).run(documents=documents)

    assert [n.node_id for n in nodes] == ["text-cats"]
    events = {e.node_id: e.decision for e in decision_events if e.component == "ingestion"}
    assert events == {"image-cat": "block", "image-list": "block"}
    dropped = [r.getMessage() for r in caplog.records if "dropped node" in r.getMessage()]
    assert len(dropped) == 2 and str(DATA_DIR) not in "".join(dropped)  # no server paths in logs


def test_flag_keeps_the_checked_bytes_inline_with_the_verdict(documents, make_config, figstep_path, benign_path):
    nodes = by_id(IngestionPipeline(transformations=[GuardAlignImageTransform(make_config(100.0), action="flag")]).run(documents=documents))
    for node_id, path in (("image-cat", benign_path), ("image-list", figstep_path)):
        node = nodes[node_id]
        assert node.metadata["guardalign"]["decision"] == "flag" and node.metadata["guardalign"]["unsafe"] is True
        assert image_bytes(node) == path.read_bytes() and node.image_path is None  # the checked file, inline


def test_screens_in_batches_of_batch_size(make_config, data_dir, monkeypatch):
    paths = sorted((data_dir / "benign").glob("*.png"))[:5]
    assert len(paths) == 5
    transform = GuardAlignImageTransform(make_config(-1.0), batch_size=2)
    calls = count_scans(transform.guard, monkeypatch)
    docs = [ImageDocument(image=b64(p), id_=f"img-{k}") for k, p in enumerate(paths)] + [Document(text="t", id_="t")]
    out = transform(docs)
    assert calls == [2, 2, 1]  # one screening call per batch, not per node
    assert [n.node_id for n in out] == [*(f"img-{k}" for k in range(5)), "t"]


def test_batch_over_the_request_budget_is_split_not_dropped(make_config, benign_path, figstep_path):
    """Each batch is one screening request: a batch over the byte budget is split, each image still screened."""
    one = max(len(benign_path.read_bytes()), len(figstep_path.read_bytes()))
    config = make_config(-1.0).model_copy(update={"images": ImageLimits(allow_local_files=True, max_total_bytes=one + 1)})
    transform = GuardAlignImageTransform(config, batch_size=2)
    out = transform([ImageNode(image=b64(benign_path), id_="a"), ImageNode(image=b64(figstep_path), id_="b")])
    assert [n.node_id for n in out] == ["a", "b"] and all(n.metadata["guardalign"]["decision"] == "allow" for n in out)


def test_batch_size_above_max_images_is_refused(make_config):
    with pytest.raises(ValueError, match="batch_size"):
        GuardAlignImageTransform(make_config(-1.0), batch_size=21)
    assert GuardAlignImageTransform(make_config(-1.0).model_copy(update={"images": ImageLimits(max_images=4)})).batch_size == 4


def test_masking_clears_an_embedding_of_the_original(make_config, figstep_path):
    (out,) = GuardAlignImageTransform(make_config(100.0))([ImageNode(image=b64(figstep_path), embedding=[1.0, 2.0], id_="e")])
    assert out.metadata["guardalign"]["decision"] == "mask" and out.embedding is None


def test_default_deny_remote_local_and_media_nodes_are_dropped(make_config, benign_path, decision_events):
    """No network, no local reads without the limit, no unchecked video: refused, never indexed."""
    nodes = [
        ImageNode(image_url="https://example.invalid/x.png", id_="remote"),
        ImageNode(image_path=str(benign_path), id_="local"),
        Node(video_resource=MediaResource(data=b"\x00\x00\x00\x18ftypmp42"), id_="video"),
        Node(audio_resource=MediaResource(data=benign_path.read_bytes()), id_="audio-image"),
        TextNode(text="kept", id_="text"),
    ]
    out = GuardAlignImageTransform(make_config(-1.0, local_files=False))(nodes)
    assert [n.node_id for n in out] == ["text"]
    events = {e.node_id: e for e in decision_events}
    assert set(events) == {"remote", "local", "video", "audio-image"} and all(e.decision == "block" for e in events.values())
    assert all(str(benign_path.parent) not in (e.result.get("error") or "") + e.reason for e in events.values())
    kept = GuardAlignImageTransform(make_config(-1.0), allow_media=("video",))([nodes[2]])
    assert [n.node_id for n in kept] == ["video"]


async def test_text_only_ingestion_loads_nothing(make_config):
    transform = GuardAlignImageTransform(make_config(-1.0))
    docs = [Document(text="only text", id_="t")]
    out = await transform.acall(docs)
    assert out[0] is docs[0] and not transform.guard.detector_loaded


# -- the postprocessor downstream ----------------------------------------------------------------
def ingest_and_index(config: GuardConfig, documents: list[Any]) -> VectorStoreIndex:
    nodes = IngestionPipeline(transformations=[GuardAlignImageTransform(config)]).run(documents=documents)
    return VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))


def retrieve(index: VectorStoreIndex) -> list[NodeWithScore]:
    return index.as_retriever(similarity_top_k=10).retrieve("What do the pictures show?")


def test_postprocessor_trusts_nodes_screened_with_the_same_config(documents, make_config, partial_threshold, monkeypatch):
    config = make_config(partial_threshold)
    index = ingest_and_index(config, documents)
    retrieved = retrieve(index)
    screen = GuardAlignImagePostprocessor(guard=query_guard(config))
    calls = count_scans(screen.guard, monkeypatch)

    out = by_id([n.node for n in screen.postprocess_nodes(retrieved)])

    assert calls == []  # nothing rescanned ...
    stored = by_id([n.node for n in retrieved])
    for node_id in ("image-cat", "image-list"):
        assert out[node_id].image == stored[node_id].image  # ... and nothing masked a second time
        assert out[node_id].metadata["guardalign"] == stored[node_id].metadata["guardalign"]


def test_postprocessor_rescans_nodes_screened_with_another_config(documents, make_config, partial_threshold, monkeypatch):
    index = ingest_and_index(make_config(partial_threshold), documents)
    other = make_config(100.0)
    screen = GuardAlignImagePostprocessor(guard=query_guard(other))
    calls = count_scans(screen.guard, monkeypatch)

    out = by_id([n.node for n in screen.postprocess_nodes(retrieve(index))])

    assert calls == [2]
    fingerprint = config_fingerprint(other, screen.guard.detector)
    for node_id in ("image-cat", "image-list"):
        assert out[node_id].metadata["guardalign"]["fingerprint"] == fingerprint
        assert out[node_id].metadata["guardalign"]["threshold"] == 100.0
        assert np.count_nonzero(pixels_of(image_bytes(out[node_id]))) == 0  # the other config's verdict applies


def test_attack_swapped_image_under_a_valid_verdict_is_rescanned(documents, make_config, figstep_path, monkeypatch):
    """After ingestion, an image is swapped in the store and its (genuine) verdict left in place."""
    config = make_config(100.0)  # every patch unsafe: anything actually scanned comes out black
    index = ingest_and_index(config, documents)
    retrieved = retrieve(index)
    target = next(n for n in retrieved if n.node.node_id == "image-list")
    swapped = target.node.model_copy(update={"image": b64(figstep_path), "image_mimetype": "image/png"})  # the unmasked original
    assert swapped.metadata["guardalign"]["fingerprint"] == config_fingerprint(config, ImageGuard(config).detector)
    retrieved = [n if n is not target else NodeWithScore(node=swapped, score=n.score) for n in retrieved]
    screen = GuardAlignImagePostprocessor(guard=query_guard(config))
    calls = count_scans(screen.guard, monkeypatch)

    out = by_id([n.node for n in screen.postprocess_nodes(retrieved)])

    assert calls == [1]  # only the swapped node is scanned again
    assert np.count_nonzero(pixels_of(image_bytes(out["image-list"]))) == 0  # the swap never reaches the model
    assert out["image-list"].metadata["guardalign"]["image_sha256"] == hashlib.sha256(image_bytes(out["image-list"])).hexdigest()


def test_attack_forged_or_moved_verdicts_are_not_trusted(documents, make_config, figstep_path, benign_path, monkeypatch):
    """A verdict copied onto an unscreened node, a path added beside the screened bytes, a relabelled MIME type."""
    config = make_config(100.0)
    index = ingest_and_index(config, documents)
    genuine = by_id([n.node for n in retrieve(index)])["image-list"]
    stamp = genuine.metadata["guardalign"]
    forged = ImageNode(image=b64(figstep_path), image_mimetype="image/png", id_="forged", metadata={"guardalign": dict(stamp)})
    beside = genuine.model_copy(update={"image_path": str(benign_path)})
    relabelled = genuine.model_copy(update={"image_mimetype": "image/jpeg"})
    nodes = [NodeWithScore(node=n, score=1.0) for n in (forged, beside, relabelled)]
    screen = GuardAlignImagePostprocessor(guard=query_guard(config))
    calls = count_scans(screen.guard, monkeypatch)

    out = screen.postprocess_nodes(nodes)

    assert calls == [3]
    for scored in out:
        node = scored.node
        assert node.image_path is None and np.count_nonzero(pixels_of(image_bytes(node))) == 0
        assert node.image_mimetype == sniff_mime(image_bytes(node))


# -- the ingestion cache, async, serialisation --------------------------------------------------
def test_ingestion_cache_is_keyed_on_the_config(documents, make_config, partial_threshold, monkeypatch):
    cache = IngestionCache()
    first = GuardAlignImageTransform(make_config(partial_threshold))
    IngestionPipeline(transformations=[first], cache=cache).run(documents=documents)

    same = GuardAlignImageTransform(guard=query_guard(make_config(partial_threshold)))  # another object and memory, same config
    same_calls = count_scans(same.guard, monkeypatch)
    IngestionPipeline(transformations=[same], cache=cache).run(documents=documents)
    assert same_calls == []  # served from the cache: the identity is the config, not the object

    other = GuardAlignImageTransform(guard=query_guard(make_config(100.0)))
    other_calls = count_scans(other.guard, monkeypatch)
    nodes = by_id(IngestionPipeline(transformations=[other], cache=cache).run(documents=documents))
    assert other_calls == [2]  # a different config never reuses another's cached nodes
    assert nodes["image-list"].metadata["guardalign"]["threshold"] == 100.0


async def test_async_pipeline_matches_sync(documents, make_config, partial_threshold):
    config = make_config(partial_threshold)
    sync_nodes = by_id(IngestionPipeline(transformations=[GuardAlignImageTransform(config)]).run(documents=documents))
    async_nodes = by_id(await IngestionPipeline(transformations=[GuardAlignImageTransform(config, reuse_checked=False)]).arun(documents=documents))
    assert sorted(async_nodes) == sorted(sync_nodes)
    for node_id in ("image-cat", "image-list"):
        assert async_nodes[node_id].image == sync_nodes[node_id].image
        assert async_nodes[node_id].metadata["guardalign"]["decision"] == sync_nodes[node_id].metadata["guardalign"]["decision"]


def test_round_trips_through_dict_and_pickle_for_worker_processes(make_config, figstep_path):
    transform = GuardAlignImageTransform(make_config(100.0), batch_size=3)
    for restored in (GuardAlignImageTransform.from_dict(transform.to_dict()), pickle.loads(pickle.dumps(transform))):
        assert restored.fingerprint == transform.fingerprint and restored.batch_size == 3
        (out,) = restored([ImageNode(image=b64(figstep_path), id_="x")])
        assert out.metadata["guardalign"]["decision"] == "mask"
    with pytest.raises(ValueError, match="fingerprint"):
        GuardAlignImageTransform.from_dict({**transform.to_dict(), "fingerprint": "0" * 64})


def test_docs_recipe_runs(data_dir, monkeypatch, tmp_path, capsys):
    """The "Screening at ingestion" recipe in docs/llamaindex.md runs as written (on the shared images)."""
    from llamaindex_support import REPO_ROOT

    text = (REPO_ROOT / "docs" / "llamaindex.md").read_text(encoding="utf-8")
    section = text.split("## Screening at ingestion", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'Path("photos")' in code
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing written beside the user's real cache
    exec(compile(code.replace('Path("photos")', f"Path({str(data_dir / 'benign')!r})"), "docs/llamaindex.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("chelsea.png ") for line in out) and "text not an image" in out


def test_an_image_node_naming_its_file_only_in_metadata_is_screened_and_cleared(make_config, benign_path, decision_events):
    """Attack (red team): ImageNode(metadata={"file_path": ...}) with no image field was indexed
    unscreened; LlamaIndex loads that file as the node's image."""
    node = ImageNode(text="caption", metadata={"file_path": str(benign_path)}, id_="n")
    assert GuardAlignImageTransform(make_config(-1.0, local_files=False))([node]) == []  # a local file: refused
    assert str(benign_path.parent) not in decision_events[0].reason
    (out,) = GuardAlignImageTransform(make_config(100.0))([node])
    assert out.metadata["guardalign"]["decision"] == "mask" and "file_path" not in out.metadata
    import io

    from PIL import Image

    assert (pixels(Image.open(io.BytesIO(image_bytes(out)))) == 0).all()


def test_an_index_node_holding_an_image_node_is_not_indexed_unscreened(make_config, benign_path):
    """Attack (red team): IndexNode(obj=ImageNode(...)) passed ingestion untouched, its image never screened."""
    from llama_index.core.schema import IndexNode

    inner = ImageNode(image=b64(benign_path), image_mimetype="image/png", id_="inner")
    index_node = IndexNode(text="see image", index_id=inner.node_id, obj=inner, id_="idx")
    plain = IndexNode(text="see index", index_id="other", obj=TextNode(text="t"), id_="plain")
    out = GuardAlignImageTransform(make_config(-1.0))([index_node, plain])
    assert [n.node_id for n in out] == ["plain"]


def test_copies_of_the_transform_and_the_postprocessor_share_their_guard(make_config):
    # the guard holds a lock and the loaded CLIP: LlamaIndex deep-copies components, the copies must not copy it
    import copy

    for component in (GuardAlignImageTransform(make_config(100.0)), GuardAlignImagePostprocessor(make_config(100.0))):
        clone = copy.deepcopy(component)
        assert clone is not component and clone.guard is component.guard
