"""Attacks on the LlamaIndex adapters: images the guard used not to see, local files read on a message's say-so.

Each test plays the attacker and must fail on the code before the screening step: a hidden
image must reach the wrapped model as the guard's sanitised bytes (threshold 100: every
patch masked), a block the guard cannot check must be refused by name, and no local file
named in message content may be read (with errors that say nothing about the file system).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from llama_index.core.base.llms.types import ChatMessage, CitableBlock, DocumentBlock, ImageBlock, MessageRole, TextBlock, VideoBlock
from llama_index.core.schema import ImageDocument, ImageNode, MediaResource, Node, NodeWithScore
from PIL import Image

from guardalign_core.errors import GuardAlignViolation
from guardalign_core.guard import ImageGuard
from guardalign_integrations.llama_index import GuardAlignImagePostprocessor, GuardAlignLLM, GuardAlignMultiModalLLM


def _black(data: bytes) -> bool:
    return bool((np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 0).all())


def _sent_images(llm) -> list[bytes]:
    out = []
    for message in llm.last_messages:
        for block in message.blocks:
            inner = block.content if isinstance(block, CitableBlock) else [block]
            out.extend(b.resolve_image().read() for b in inner if isinstance(b, ImageBlock))
    return out


def test_image_data_in_a_document_block_is_masked(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0, local_files=False))
    llm.chat([ChatMessage(role="user", blocks=[DocumentBlock(data=benign_path.read_bytes(), title="scan"), TextBlock(text="read it")])])
    (sent,) = _sent_images(recording_llm)
    assert _black(sent)
    assert not any(isinstance(b, DocumentBlock) for m in recording_llm.last_messages for b in m.blocks)


def test_image_inside_a_citable_block_is_masked(make_config, recording_llm, benign_path):
    citable = CitableBlock(title="t", source="s", content=[TextBlock(text="p"), ImageBlock(image=benign_path.read_bytes())])
    GuardAlignLLM(recording_llm, make_config(100.0, local_files=False)).chat([ChatMessage(role="user", blocks=[citable])])
    (sent,) = _sent_images(recording_llm)
    assert _black(sent)


def test_a_video_block_is_refused_by_name(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(100.0, local_files=False), on_block="raise")
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.blocks\[0\].*VideoBlock"):
        llm.chat([ChatMessage(role="user", blocks=[VideoBlock(video=b"\x00\x00\x00\x18ftypmp42"), TextBlock(text="?")])])


@pytest.mark.parametrize("kind", ["file-url", "path", "image-node-path", "media-resource-path"])
def test_local_files_named_in_content_are_not_read(kind, make_config, recording_llm, benign_path, monkeypatch):
    reads: list[str] = []
    real = Path.read_bytes

    def spy(self: Path) -> bytes:
        reads.append(str(self))
        return real(self)

    config = make_config(-1.0, local_files=False)
    if kind in ("file-url", "path"):
        block = ImageBlock(url=f"file://{benign_path}") if kind == "file-url" else ImageBlock(path=benign_path)
        llm = GuardAlignLLM(recording_llm, config, on_block="raise")
        monkeypatch.setattr(Path, "read_bytes", spy)
        with pytest.raises(GuardAlignViolation) as caught:
            llm.chat([ChatMessage(role="user", blocks=[block])])
    else:
        node = ImageNode(image_path=str(benign_path), id_="n") if kind == "image-node-path" else Node(image_resource=MediaResource(path=benign_path), id_="n")
        screen = GuardAlignImagePostprocessor(config)
        monkeypatch.setattr(Path, "read_bytes", spy)
        assert screen.postprocess_nodes([NodeWithScore(node=node, score=1.0)]) == []  # dropped, not read
        caught = None
    assert str(benign_path) not in reads
    if caught is not None:
        message = str(caught.value)
        assert "local file" in message and "no such file" not in message and str(benign_path.parent) not in message


def test_a_missing_local_file_and_an_existing_one_give_the_same_error(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0, local_files=False))
    errors = []
    for path in (benign_path, benign_path.with_name("no-such-file.png")):
        verdict = llm.check([ChatMessage(role="user", blocks=[ImageBlock(url=f"file://{path}")])])
        errors.append(verdict.images[0].result.error.split(": ", 1)[1])
    assert errors[0] == errors[1]  # nothing reveals whether the file exists, or its size


def test_one_bad_node_does_not_abort_the_rag_query(make_config, benign_path, monkeypatch):
    import guardalign_core.detector as detector_module

    poison = benign_path.read_bytes()[:-7] + b"garbage"
    real = detector_module.decode_image

    def fragile(image, *args, **kwargs):
        if image == poison:
            raise struct_error("unpack requires a buffer of 4 bytes")
        return real(image, *args, **kwargs)

    import struct

    struct_error = struct.error
    monkeypatch.setattr(detector_module, "decode_image", fragile)
    good = ImageNode(image=base64.b64encode(benign_path.read_bytes()).decode(), id_="good")
    bad = ImageNode(image=base64.b64encode(poison).decode(), id_="bad")
    out = GuardAlignImagePostprocessor(make_config(-1.0, local_files=False)).postprocess_nodes(
        [NodeWithScore(node=bad, score=1.0), NodeWithScore(node=good, score=0.5)]
    )
    assert [n.node.node_id for n in out] == ["good"]


def test_a_rag_image_is_not_masked_twice_by_two_separately_built_guards(make_config, recording_llm, benign_path, partial_threshold):
    config = make_config(partial_threshold, local_files=False)
    node = ImageNode(image=base64.b64encode(benign_path.read_bytes()).decode(), image_mimetype="image/png", id_="n")
    (screened,) = GuardAlignImagePostprocessor(config).postprocess_nodes([NodeWithScore(node=node, score=1.0)])
    sanitised = base64.b64decode(screened.node.image)
    llm = GuardAlignLLM(recording_llm, config)  # another guard object, same config
    llm.chat([ChatMessage(role="user", blocks=[ImageBlock(image=sanitised, image_mimetype="image/png")])])
    (sent,) = _sent_images(recording_llm)
    assert sent == sanitised  # forwarded as the postprocessor made it, not masked a second time


def test_the_legacy_adapter_accepts_llamaindexs_own_image_document(make_config, benign_path):
    from test_llamaindex_legacy import RecordingMultiModalLLM

    inner = RecordingMultiModalLLM()
    mm = GuardAlignMultiModalLLM(inner, make_config(100.0, local_files=False))
    document = ImageDocument(image=base64.b64encode(benign_path.read_bytes()).decode(), image_mimetype="image/png")
    mm.complete("describe", image_documents=[document])
    (sent,) = inner.calls[-1][2]
    data = sent.image_resource.data
    assert _black(base64.b64decode(data) if not data.startswith(b"\x89PNG") else data)


def test_guard_spec_is_validated_at_construction(recording_llm, make_config):
    with pytest.raises(TypeError, match="guard: expected"):
        GuardAlignLLM(recording_llm, guard=42)
    with pytest.raises(ValueError, match="unknown preset"):
        GuardAlignLLM(recording_llm, guard="no-such-preset")
    shared = ImageGuard(make_config(-1.0))
    assert GuardAlignLLM(recording_llm, guard=shared).guard is shared
    assert GuardAlignLLM(recording_llm, guard=make_config(-1.0), refusal="No.").refusal == "No."


def test_prefill_without_trailing_whitespace_reaches_the_provider(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0, prefill=True, local_files=False))
    llm.chat([ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=benign_path.read_bytes())])])
    assert recording_llm.last_messages[-1].content == recording_llm.last_messages[-1].content.rstrip()


def test_documents_and_audio_naming_local_files_are_refused_not_forwarded(tmp_path) -> None:
    """Attack (red team): a text/plain DocumentBlock or an AudioBlock with a path is forwarded, and the
    provider's resolve_*() reads the server's file (here a PNG behind a .txt name)."""
    from llama_index.core.base.llms.types import AudioBlock, ChatMessage, DocumentBlock, TextBlock

    from guardalign_integrations.llama_index._messages import find_images

    secret = tmp_path / "secret.txt"
    secret.write_text("server secret")
    for block in (
        DocumentBlock(path=secret, document_mimetype="text/plain"),
        DocumentBlock(url="http://127.0.0.1:9/doc.txt", document_mimetype="text/plain"),
        AudioBlock(path=secret),
    ):
        found = find_images([ChatMessage(role="user", blocks=[TextBlock(text="q"), block])])
        assert len(found) == 1 and found[0].image.refusal, type(block).__name__
        assert str(tmp_path) not in found[0].image.refusal  # says nothing about the file system


def test_image_bytes_under_an_audio_label_are_refused(benign_path) -> None:
    from llama_index.core.base.llms.types import AudioBlock, ChatMessage

    from guardalign_integrations.llama_index._messages import find_images

    found = find_images([ChatMessage(role="user", blocks=[AudioBlock(audio=benign_path.read_bytes(), format="wav")])])
    assert len(found) == 1 and found[0].image.refusal


# -- blocks the walker does not know: subclasses, extra fields, data beside thinking --------------


def _smuggling_blocks(png: bytes) -> dict[str, object]:
    from pydantic import ConfigDict

    from llama_index.core.base.llms.types import AudioBlock, ThinkingBlock

    class AnnotatedText(TextBlock):  # a custom block: a provider adapter may serialise every field
        attachment: bytes | None = None

    class LooseText(TextBlock):
        model_config = ConfigDict(extra="allow")

    class TaggedAudio(AudioBlock):
        cover: str | None = None

    text = base64.b64encode(png).decode()
    return {
        "text-subclass-with-an-image-field": AnnotatedText(text="hi", attachment=png),
        "text-subclass-with-extra-fields": LooseText(text="hi", payload=text),
        "audio-subclass-with-an-image-field": TaggedAudio(audio=b"RIFF\x00\x00\x00\x00WAVE", cover=text),
        "thinking-with-an-image": ThinkingBlock(content="hmm", additional_information={"image": text}),
    }


@pytest.mark.parametrize("name", ["text-subclass-with-an-image-field", "text-subclass-with-extra-fields",
                                  "audio-subclass-with-an-image-field", "thinking-with-an-image"])
def test_blocks_the_guard_does_not_know_are_refused_by_name(name, make_config, recording_llm, benign_path):
    block = _smuggling_blocks(benign_path.read_bytes())[name]
    message = ChatMessage(role="user", blocks=[TextBlock(text="look"), block])
    llm = GuardAlignLLM(recording_llm, make_config(100.0, local_files=False), on_block="raise")
    with pytest.raises(GuardAlignViolation, match=rf"messages\[0\]\.blocks\[1\].*{type(block).__name__}"):
        llm.chat([message])
    assert recording_llm.calls == []  # nothing reached the model
    allowed = GuardAlignLLM(recording_llm, make_config(100.0, local_files=False), allow_block_types=(type(block).__name__,))
    allowed.chat([message])  # the caller's explicit choice
    assert any(b is block for m in recording_llm.last_messages for b in m.blocks)


def test_an_image_block_subclass_is_screened_and_forwarded_as_a_plain_block(make_config, recording_llm, benign_path):
    class TaggedImage(ImageBlock):
        thumbnail: bytes | None = None

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()  # opaque 8-bit RGB, no metadata: the checked bytes may go as they came
    block = TaggedImage(image=png, image_mimetype="image/png", thumbnail=benign_path.read_bytes())
    GuardAlignLLM(recording_llm, make_config(-1.0, local_files=False)).chat([ChatMessage(role="user", blocks=[block])])
    (sent,) = [b for m in recording_llm.last_messages for b in m.blocks if isinstance(b, ImageBlock)]
    assert type(sent) is ImageBlock and not hasattr(sent, "thumbnail")  # the unscreened thumbnail does not travel
    assert sent.resolve_image().read() == png


def test_thinking_signatures_still_pass(make_config, recording_llm):
    from llama_index.core.base.llms.types import ThinkingBlock

    token = base64.b64encode(bytes(range(256)) * 2).decode()
    history = [ChatMessage(role="user", blocks=[TextBlock(text="hi")]),
               ChatMessage(role="assistant", blocks=[ThinkingBlock(content="hmm", additional_information={"signature": token}), TextBlock(text="yes")]),
               ChatMessage(role="user", blocks=[TextBlock(text="go on")])]
    GuardAlignLLM(recording_llm, make_config(100.0, local_files=False), on_block="raise").chat(history)
    assert len(recording_llm.last_messages) >= 3


# -- the two adapters agree: guard forms, argument names, prefill ---------------------------------


def _guard_forms(config, tmp_path: Path) -> dict[str, object]:
    (tmp_path / "guard.json").write_text(config.model_dump_json())
    return {"preset": "fast-cpu", "config": config, "dict": config.model_dump(mode="json"), "file": str(tmp_path / "guard.json")}


@pytest.mark.parametrize("form", ["preset", "config", "dict", "file"])
def test_guard_accepts_what_the_langchain_side_accepts(form, make_config, recording_llm, tmp_path):
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from guardalign_core.config import get_preset
    from guardalign_integrations.langchain import GuardedChatModel

    config = make_config(-1.0)
    spec = _guard_forms(config, tmp_path)[form]
    expected = get_preset("fast-cpu") if form == "preset" else config
    li = GuardAlignLLM(recording_llm, guard=spec)
    lc = GuardedChatModel(model=FakeListChatModel(responses=["ok"]), guard=spec)
    assert li.guard.config == expected and lc.guard.config == expected
    assert GuardAlignMultiModalLLM(recording_llm, guard=spec).guard.config == expected


@pytest.mark.parametrize("bad, error", [(42, TypeError), ("no-such-preset", ValueError), ("missing.yaml", ValueError)])
def test_a_bad_guard_fails_at_construction_in_every_adapter(bad, error, recording_llm, tmp_path):
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from pydantic import ValidationError

    from guardalign_integrations.langchain import GuardedChatModel

    bad = str(tmp_path / bad) if bad == "missing.yaml" else bad
    with pytest.raises(error):
        GuardAlignLLM(recording_llm, guard=bad)
    with pytest.raises(error):
        GuardAlignMultiModalLLM(recording_llm, guard=bad)
    with pytest.raises((error, ValidationError)):
        GuardedChatModel(model=FakeListChatModel(responses=["ok"]), guard=bad)


def test_every_adapter_names_the_refusal_argument_refusal(make_config, recording_llm):
    import inspect

    from guardalign_integrations.langchain import GuardAlignMiddleware, GuardedChatModel

    assert "refusal" in GuardedChatModel.model_fields and "refusal" in inspect.signature(GuardAlignMiddleware).parameters
    for adapter in (GuardAlignLLM, GuardAlignMultiModalLLM):
        assert "refusal" in adapter.model_fields and "refusal_text" not in adapter.model_fields
        with pytest.warns(DeprecationWarning, match="refusal_text is renamed refusal"):
            assert adapter(recording_llm, make_config(-1.0), refusal_text="No.").refusal == "No."


def test_prefill_without_trailing_whitespace_reaches_a_chat_model_behind_the_legacy_adapter(make_config, recording_llm, benign_path):
    mm = GuardAlignMultiModalLLM(recording_llm, make_config(100.0, prefill=True, local_files=False))
    document = ImageDocument(image=base64.b64encode(benign_path.read_bytes()).decode(), image_mimetype="image/png")
    mm.complete("describe", image_documents=[document])
    last = recording_llm.last_messages[-1]
    assert last.role == MessageRole.ASSISTANT and last.content and last.content == last.content.rstrip()


# -- nodes whose image LlamaIndex finds where the guard did not look -------------------------------


def test_an_image_node_naming_its_file_only_in_metadata_is_screened(make_config, benign_path, monkeypatch):
    """Attack (red team): ImageNode(metadata={"file_path": ...}) with no image field was stamped
    "no image" and forwarded; LlamaIndex's image_node_to_image_block then sent that file unscreened."""
    from llama_index.core.base.llms.generic_utils import image_node_to_image_block

    reads: list[str] = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(str(self)) or real(self))
    node = ImageNode(text="caption", metadata={"file_path": str(benign_path), "file_name": benign_path.name}, id_="n")
    refused = GuardAlignImagePostprocessor(make_config(-1.0, local_files=False))
    assert refused.postprocess_nodes([NodeWithScore(node=node, score=1.0)]) == []  # a local file: refused, not read
    assert str(benign_path) not in reads
    (out,) = GuardAlignImagePostprocessor(make_config(100.0)).postprocess_nodes([NodeWithScore(node=node, score=1.0)])
    assert out.node.metadata["guardalign"]["decision"] == "mask"
    assert "file_path" not in out.node.metadata and out.node.metadata["file_name"] == benign_path.name
    block = image_node_to_image_block(out.node)
    assert block.path is None and block.url is None and _black(block.resolve_image().read())
    assert node.metadata["file_path"] == str(benign_path)  # the stored node is not modified


def test_a_stamp_is_not_trusted_beside_a_metadata_file_path(make_config, benign_path):
    from guardalign_integrations.llama_index._trust import inline_image

    node = ImageNode(image=base64.b64encode(benign_path.read_bytes()).decode(), metadata={"file_path": "/elsewhere.png"})
    assert inline_image(node) is None  # screened again, and the key cleared


@pytest.mark.parametrize("kind", ["audio-holding-png", "video-url", "image-and-audio-png"])
def test_media_nodes_are_refused_at_query_time_as_at_ingestion(kind, make_config, benign_path, decision_events):
    """Attack (red team): Node(audio_resource=<PNG>) / Node(video_resource=url) passed the postprocessor
    stamped "no image" although ingestion refuses them."""
    png = benign_path.read_bytes()
    node = {
        "audio-holding-png": Node(audio_resource=MediaResource(data=png, mimetype="audio/wav"), id_="n"),
        "video-url": Node(video_resource=MediaResource(url="https://evil.example/v.mp4"), id_="n"),
        "image-and-audio-png": Node(image_resource=MediaResource(data=png), audio_resource=MediaResource(data=png), id_="n"),
    }[kind]
    screen = GuardAlignImagePostprocessor(make_config(-1.0, fail_open=True, local_files=False))  # refused even under fail_open
    assert screen.postprocess_nodes([NodeWithScore(node=node, score=1.0)]) == []
    assert [e.decision for e in decision_events] == ["block"]
    if kind == "video-url":
        allowed = GuardAlignImagePostprocessor(make_config(-1.0), allow_media=("video",))
        assert [n.node.node_id for n in allowed.postprocess_nodes([NodeWithScore(node=node, score=1.0)])] == ["n"]
