"""The pure LlamaIndex helpers, tested without a model or a guard."""

from __future__ import annotations

import base64
import io

import numpy as np
from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    CitableBlock,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    VideoBlock,
)
from llama_index.core.schema import ImageNode, MediaResource, Node, TextNode
from PIL import Image

from guardalign_core.results import Decision, ScanResult, Status
from guardalign_core.verdicts import Forward, ImageVerdict, RequestVerdict, SafetyPrompt
from guardalign_integrations.llama_index._messages import (
    apply_safety_prompt,
    apply_safety_to_prompt,
    find_images,
    forwarded_node,
    has_image,
    node_image,
    node_label,
    prepend_text,
    write_back,
)


def _png(color: int = 200) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _verdict(*forwards: tuple[Forward, bytes | None]) -> RequestVerdict:
    entries = []
    for i, (forward, data) in enumerate(forwards):
        result = ScanResult(index=i, status=Status.OK, decision=Decision.ALLOW, unsafe=False, reason="r", detector="ot",
                            threshold=0.4, backbone="b", policy="mask")
        entries.append(ImageVerdict(i, f"image {i}", result, forward, data=data, mime="image/png" if data else None, checked=None))
    return RequestVerdict(decision=Decision.ALLOW, status=Status.OK, policy="mask", reason="r", images=entries)


def test_find_images_in_order_with_labels_and_nothing_read(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    messages = [
        ChatMessage(role="user", blocks=[TextBlock(text="hi"), ImageBlock(path=path), AudioBlock(audio=b"RIFF....WAVE")]),
        ChatMessage(role="user", blocks=[ImageBlock(url="https://example.com/x.png"), ImageBlock(image=_png())]),
    ]
    found = find_images(messages)
    assert [f.label for f in found] == ["messages[0].blocks[1]", "messages[1].blocks[0]", "messages[1].blocks[1]"]
    assert found[0].image.source == path and found[1].image.source == "https://example.com/x.png"  # the core decides whether to read
    assert found[2].image.source == _png() and found[2].inline_only


def test_images_inside_documents_and_citable_blocks_are_found_and_videos_refused():
    citable = CitableBlock(title="t", source="s", content=[TextBlock(text="x"), ImageBlock(image=_png())])
    message = ChatMessage(role="user", blocks=[DocumentBlock(data=_png(), document_mimetype="image/png"), citable, VideoBlock(video=b"\x00\x00\x00 ftypmp4")])
    found = find_images([message])
    assert [f.label for f in found] == ["messages[0].blocks[0]", "messages[0].blocks[1].content[1]", "messages[0].blocks[2]"]
    assert found[0].image.source == _png() and found[1].image.source == _png()
    assert "VideoBlock" in found[2].image.refusal
    assert find_images([message], allow_block_types=("VideoBlock",))[-1].label != "messages[0].blocks[2]"


def test_write_back_forwards_exactly_the_verdict_bytes_and_keeps_detail(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    citable = CitableBlock(title="t", source="s", content=[ImageBlock(image=_png(10))])
    messages = [ChatMessage(role="user", blocks=[ImageBlock(path=path, detail="high"), TextBlock(text="q"), citable, ImageBlock(image=_png(30))]),
                ChatMessage(role="assistant", content="ok")]
    found = find_images(messages)
    out = write_back(messages, found, _verdict((Forward.BYTES, _png(1)), (Forward.BYTES, _png(2)), (Forward.NOTHING, None)))
    first, text, nested = out[0].blocks
    assert first.path is None and first.url is None and first.detail == "high" and first.resolve_image().read() == _png(1)
    assert nested.content[0].resolve_image().read() == _png(2)
    assert text.text == "q" and out[1] is messages[1] and messages[0].blocks[0].path == path  # inputs untouched


def test_safety_prompt_delivery():
    plan = SafetyPrompt(applied=True, system_instruction="Be safe.", prefill="As an AI assistant, ")
    out, delivery = apply_safety_prompt([ChatMessage(role=MessageRole.USER, content="q")], plan)
    assert [m.role for m in out] == [MessageRole.SYSTEM, MessageRole.USER, MessageRole.ASSISTANT]
    assert out[-1].content == "As an AI assistant," and delivery.prefill == "As an AI assistant,"
    again, _ = apply_safety_prompt([ChatMessage(role=MessageRole.ASSISTANT, content="partial")], plan)
    assert again[-1].content == "partial" and 'Begin your answer with "As an AI assistant,"' in again[0].content
    assert apply_safety_to_prompt("Q", plan).endswith("\n\nQ") and "Begin your answer" in apply_safety_to_prompt("Q", plan)
    assert prepend_text(ChatMessage(role="assistant", content="x"), "P ").content == "P x"


def test_node_helpers(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(_png())
    by_path = ImageNode(image_path=str(path), id_="a")
    inline = Node(image_resource=MediaResource(data=_png(), mimetype="image/png"), id_="b")
    assert has_image(by_path) and has_image(inline) and not has_image(TextNode(text="t"))
    assert node_label(by_path) == "cat.png" and node_label(inline) == "node b"
    assert node_image(by_path, "x").source == path and node_image(inline, "x").source == _png()
    entry = _verdict((Forward.BYTES, _png(5))).images[0]
    new = forwarded_node(by_path, entry)
    assert new.image_path is None and base64.b64decode(new.image) == _png(5) and by_path.image_path == str(path)
    assert forwarded_node(inline, _verdict((Forward.NOTHING, None)).images[0]) is None
